//! Raw WebSocket frames: a client that performs the handshake by hand and then writes
//! exactly the bytes a test gives it, and reads the server's frames back.

use std::io;
use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{
    HttpResponse, MASK, OP_CLOSE, OP_PING, OP_TEXT, RFC_ACCEPT, UpgradeRequest,
    assert_server_message, within,
};

/// One frame as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The status code of a close frame (`None` for an empty close payload).
    pub fn close_code(&self) -> Option<u16> {
        assert_eq!(self.opcode, OP_CLOSE, "not a close frame: {self:?}");
        if self.payload.len() >= 2 {
            Some(u16::from_be_bytes([self.payload[0], self.payload[1]]))
        } else {
            assert!(
                self.payload.is_empty(),
                "close payload of one byte from the server"
            );
            None
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.payload.clone()).expect("server text frame is UTF-8")
    }
}

/// Encodes one frame. `rsv` is the three RSV bits (0..=7); `mask` masks the payload as a
/// client must (RFC 6455 §5.3), or leaves it bare when `None`.
pub fn encode_frame(
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(((fin as u8) << 7) | ((rsv & 0x7) << 4) | (opcode & 0xF));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => out.push(mask_bit | len as u8),
        len @ 126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A complete masked frame, the way a well-behaved client sends it.
pub fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame(fin, 0, opcode, payload, Some(MASK))
}

/// A masked close frame with `code` and `reason`.
pub fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    masked(true, OP_CLOSE, &payload)
}

/// How a connection ended after the server's close frame (or without one).
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// The server sent a close frame with this code (`None`: empty payload).
    Close(Option<u16>),
    /// The TCP stream ended (EOF or reset) without a close frame.
    Eof,
}

/// A WebSocket client that writes whatever bytes a test hands it.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// The handshake response.
    pub response: HttpResponse,
}

impl RawWs {
    /// Connects to `/ws` with a hand-made handshake.
    pub async fn connect(addr: SocketAddr) -> RawWs {
        let stream = TcpStream::connect(addr).await.expect("connect");
        RawWs::handshake(stream, addr).await
    }

    /// Performs the opening handshake on a stream the caller opened (e.g. one with a
    /// tiny receive buffer).
    pub async fn handshake(stream: TcpStream, addr: SocketAddr) -> RawWs {
        stream.set_nodelay(true).expect("nodelay");
        let (response, stream, buf) = UpgradeRequest::new(addr).send_on(stream).await;
        assert_eq!(
            response.status,
            101,
            "handshake refused: {response:?} {:?}",
            String::from_utf8_lossy(&response.body)
        );
        assert_eq!(response.header("sec-websocket-accept"), Some(RFC_ACCEPT));
        RawWs {
            stream,
            buf,
            response,
        }
    }

    /// Wraps a stream whose handshake the caller did by hand; `buf` holds any bytes
    /// read past the response.
    pub fn from_parts(stream: TcpStream, buf: Vec<u8>, response: HttpResponse) -> RawWs {
        RawWs {
            stream,
            buf,
            response,
        }
    }

    /// Writes `bytes` as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        within("write", self.stream.write_all(bytes))
            .await
            .expect("write raw bytes");
    }

    /// Writes `bytes`, tolerating a peer that already closed.
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        within("write", self.stream.write_all(bytes)).await
    }

    /// Sends a complete masked text message in one frame.
    pub async fn send_text(&mut self, text: &str) {
        let frame = masked(true, OP_TEXT, text.as_bytes());
        self.send_raw(&frame).await;
    }

    /// Reads one frame. `Ok(None)` is a clean EOF at a frame boundary.
    pub async fn read_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(Some(frame));
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF inside a frame ({} bytes pending)", self.buf.len()),
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next frame, with a timeout; fails on EOF or error.
    pub async fn next_frame(&mut self) -> Frame {
        within("a frame from the gateway", self.read_frame())
            .await
            .expect("read frame")
            .expect("EOF while expecting a frame")
    }

    /// The next text message frame as JSON, skipping server pings.
    pub async fn next_json(&mut self) -> Value {
        loop {
            let frame = self.next_frame().await;
            match frame.opcode {
                OP_PING => continue,
                OP_TEXT => {
                    assert!(frame.fin, "server fragmented a message: {frame:?}");
                    let value: Value = serde_json::from_slice(&frame.payload)
                        .unwrap_or_else(|e| panic!("server sent invalid JSON: {e}"));
                    assert_server_message(&value);
                    return value;
                }
                _ => panic!("expected a text frame, got {frame:?}"),
            }
        }
    }

    /// Reads until the connection ends: returns the server's close code if a close
    /// frame came, or `Eof` if the stream ended (or was reset) without one. Data frames
    /// before the close are skipped and counted.
    pub async fn read_to_end(&mut self) -> (Ending, usize) {
        let mut skipped = 0;
        loop {
            match within("the connection to end", self.read_frame()).await {
                Ok(Some(frame)) if frame.opcode == OP_CLOSE => {
                    return (Ending::Close(frame.close_code()), skipped);
                }
                Ok(Some(_)) => skipped += 1,
                Ok(None) => return (Ending::Eof, skipped),
                Err(e) if is_reset(&e) => return (Ending::Eof, skipped),
                Err(e) => panic!("error reading to the end: {e}"),
            }
        }
    }

    /// Expects the server to fail the connection with close `code` and then close TCP
    /// (RFC 6455 §7.1.7). Any data frames before the close fail the test.
    pub async fn expect_close(&mut self, code: u16) {
        let frame = loop {
            let frame = within("the gateway's close frame", self.read_frame())
                .await
                .unwrap_or_else(|e| panic!("expected close {code}, got error {e}"))
                .unwrap_or_else(|| panic!("expected close {code}, got EOF without a close frame"));
            match frame.opcode {
                OP_PING => continue,
                OP_CLOSE => break frame,
                _ => panic!("expected close {code}, got frame {frame:?}"),
            }
        };
        assert_eq!(
            frame.close_code(),
            Some(code),
            "close frame {:?} (reason {:?})",
            frame,
            String::from_utf8_lossy(frame.payload.get(2..).unwrap_or_default())
        );
        assert!(frame.fin, "close frame not final");
        // The reason, if any, must be UTF-8 (§5.5.1).
        assert!(
            std::str::from_utf8(&frame.payload[2..]).is_ok(),
            "close reason is not UTF-8"
        );
        // Answer the close as a client should; the gateway may already have closed TCP.
        let _ = self.try_send_raw(&close_frame(code, b"")).await;
        self.expect_eof().await;
    }

    /// Expects the TCP stream to end (EOF, or a reset if the gateway closed before our
    /// last bytes arrived) with no further frames.
    pub async fn expect_eof(&mut self) {
        match within("the gateway to close TCP", self.read_frame()).await {
            Ok(None) => {}
            Err(e) if is_reset(&e) => {}
            Ok(Some(frame)) => panic!("expected EOF, got frame {frame:?}"),
            Err(e) => panic!("expected EOF, got error {e}"),
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// Parses one server frame from the front of `buf`: `None` if more bytes are needed.
/// Server frames must not be masked (RFC 6455 §5.1).
pub fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let rsv = (buf[0] >> 4) & 0x7;
    let opcode = buf[0] & 0xF;
    assert!(buf[1] & 0x80 == 0, "server frame is masked (RFC 6455 §5.1)");
    let (len, mut at) = match buf[1] & 0x7F {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut len = [0u8; 8];
            len.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(len) as usize, 10)
        }
        len => (len as usize, 2),
    };
    if buf.len() < at + len {
        return None;
    }
    let payload = buf[at..at + len].to_vec();
    at += len;
    Some((
        Frame {
            fin,
            rsv,
            opcode,
            payload,
        },
        at,
    ))
}
