//! One client connection, WebSocket or Server-Sent Events, kept as cheap as the
//! measurement needs: a socket, a leftover buffer that only holds bytes of a partial frame
//! (or event block), and reads into a scratch buffer shared by every connection of the
//! (single-threaded) worker.

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};
use std::io::{Read as _, Write as _};

use tokio::io::AsyncWriteExt;
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpSocket, TcpStream};

use crate::wire::{self, FrameError, MaskRng, ServerText, opcode};

/// Bytes a read asks the kernel for beyond any partial frame already held.
const READ_CHUNK: usize = 64 * 1024;

/// Largest HTTP response head accepted during the upgrade.
const MAX_HEAD: usize = 16 * 1024;

/// Why a connection ended or failed; `label()` is the key used in reports.
#[derive(Debug)]
pub enum Fail {
    /// TCP connect failed.
    Connect(io::Error),
    /// The upgrade was refused (the HTTP status) or the response was malformed (0).
    Upgrade(u16),
    /// The server answered the subscribe with an `error` message.
    SubscribeError,
    /// The server sent a frame the client cannot accept.
    Frame(FrameError),
    /// I/O error after the connection was established.
    Io(io::Error),
    /// The connection ended (close frame with its code, or EOF) before it was ready.
    Ended(End),
    /// Connect, upgrade and subscribe did not finish in time.
    Timeout,
    /// The worker stopped before the connection ended.
    Stopped,
}

impl Fail {
    /// Short stable label for counting failures by kind.
    pub fn label(&self) -> String {
        match self {
            Fail::Connect(e) => format!("connect: {}", e.kind()),
            Fail::Upgrade(0) => "upgrade: malformed response".into(),
            Fail::Upgrade(s) => format!("upgrade: HTTP {s}"),
            Fail::SubscribeError => "subscribe: error message".into(),
            Fail::Frame(e) => format!("frame: {e}"),
            Fail::Io(e) => format!("io: {}", e.kind()),
            Fail::Ended(end) => format!("ended early: {}", end.label()),
            Fail::Timeout => "timeout".into(),
            Fail::Stopped => "worker stopped".into(),
        }
    }
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Fail {
        Fail::Io(e)
    }
}

impl From<FrameError> for Fail {
    fn from(e: FrameError) -> Fail {
        Fail::Frame(e)
    }
}

/// How a connection ended from the server's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// A close frame, with its status code if it carried one.
    Close(Option<u16>),
    /// TCP EOF without a close frame.
    Eof,
    /// TCP EOF in the middle of a frame (the server dropped part of a frame).
    EofMidFrame,
}

impl End {
    /// Short stable label for reports (`close 1013`, `eof`).
    pub fn label(&self) -> String {
        match self {
            End::Close(Some(code)) => format!("close {code}"),
            End::Close(None) => "close (no code)".into(),
            End::Eof => "eof".into(),
            End::EofMidFrame => "eof mid-frame".into(),
        }
    }
}

/// What the text handler asks the connection to send back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Nothing.
    None,
    /// An application-level `{"type":"pong"}`.
    Pong,
}

/// Counters a connection bumps while reading frames.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCounts {
    /// Text frames that were part of a fragmented message (not measured).
    pub fragmented: u64,
    /// Bytes of whole text frames as they came off the wire (header and payload,
    /// compressed or not).
    pub text_bytes: u64,
}

/// A client WebSocket connection.
///
/// Moves a connected stream out of tokio's `TcpStream` into an `AsyncFd` the reads drive.
fn register(stream: TcpStream) -> Result<AsyncFd<std::net::TcpStream>, Fail> {
    let std = stream.into_std()?;
    std.set_nonblocking(true)?;
    // SAFETY: `register` requires that the fd stays open and owned by the AsyncFd for its
    // whole registration; the std TcpStream owns it and moves in here.
    unsafe { AsyncFd::register(std) }.map_err(|e| Fail::Io(e.into()))
}

/// One read of a ready socket into `scratch`, after the bytes `pending` from the last read
/// (copied to its front), with room for at least `want` bytes in all. `Ok(Ok(n))`: the
/// data is `scratch[..pending.len() + n]`. `Ok(Err(None))`: nothing to read now.
/// `Ok(Err(Some(end)))`: the server ended the stream.
fn read_after(
    guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, std::net::TcpStream>,
    pending: &[u8],
    scratch: &mut Vec<u8>,
    want: usize,
) -> Result<Result<usize, Option<End>>, Fail> {
    let held = pending.len();
    if scratch.len() < want {
        scratch.resize(want, 0);
    }
    scratch[..held].copy_from_slice(pending);
    let space = scratch.len() - held;
    let n = match guard.get_inner().read(&mut scratch[held..]) {
        Ok(0) if held > 0 => return Ok(Err(Some(End::EofMidFrame))),
        Ok(0) => return Ok(Err(Some(End::Eof))),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            guard.clear_ready();
            return Ok(Err(None));
        }
        Err(e) => return Err(Fail::Io(e)),
    };
    if n < space {
        // The socket is drained. Readiness is edge-triggered and tracked by tick, so data
        // arriving after this read still wakes the next `readable()`.
        guard.clear_ready();
    }
    Ok(Ok(n))
}

/// The socket is an `AsyncFd` rather than a tokio `TcpStream` so that a read that did
/// not fill the buffer can clear readiness itself: a `TcpStream` only clears it on
/// `WouldBlock`, which costs a second `recv` per delivery.
#[derive(Debug)]
pub struct WsConn {
    fd: AsyncFd<std::net::TcpStream>,
    pending: Vec<u8>,
    out: Vec<u8>,
    rng: MaskRng,
    close_reason: Vec<u8>,
}

/// Largest inflated server message the client accepts.
const MAX_INFLATED: usize = 16 << 20;

thread_local! {
    /// One inflater and output buffer per worker thread, for compressed server messages
    /// (the gateway takes no context over, so nothing is kept per connection).
    static INFLATE: RefCell<(flate2::Decompress, Vec<u8>)> =
        RefCell::new((flate2::Decompress::new(false), Vec::new()));
}

/// Appends the frame a [`Reply`] asks for.
fn push_reply(out: &mut Vec<u8>, rng: &mut MaskRng, reply: Reply) {
    match reply {
        Reply::None => {}
        Reply::Pong => {
            let pong = br#"{"type":"pong"}"#;
            wire::encode_client_frame(out, opcode::TEXT, pong, rng.next_mask());
        }
    }
}

/// Opens a TCP connection from source address `127.0.0.<1 + spread % source_addrs>`.
pub async fn connect(
    addr: SocketAddr,
    spread: usize,
    source_addrs: u8,
    rcvbuf: usize,
) -> Result<TcpStream, Fail> {
    let k = usize::from(source_addrs.max(1));
    // (spread % k) < 255, so the cast cannot truncate.
    let src = Ipv4Addr::new(127, 0, 0, 1 + (spread % k) as u8);
    connect_from(addr, src, k > 1 || src != Ipv4Addr::LOCALHOST, rcvbuf).await
}

/// Opens a TCP connection to `addr`, bound to source address `src` first when `bind` is
/// set (otherwise the kernel picks it), with `SO_RCVBUF` `rcvbuf` (0 = default).
///
/// `IP_BIND_ADDRESS_NO_PORT` defers the port choice to `connect`, so each source address
/// offers its whole ephemeral range per destination instead of a port per bind.
pub async fn connect_from(
    addr: SocketAddr,
    src: Ipv4Addr,
    bind: bool,
    rcvbuf: usize,
) -> Result<TcpStream, Fail> {
    let socket =
        Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).map_err(Fail::Connect)?;
    if bind {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on an fd we own, with a valid pointer and length for an int.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(Fail::Connect(io::Error::last_os_error()));
        }
        socket
            .bind(&SocketAddr::new(IpAddr::V4(src), 0).into())
            .map_err(Fail::Connect)?;
    }
    if rcvbuf > 0 {
        // Before connect, so the advertised window scale matches the small buffer.
        socket.set_recv_buffer_size(rcvbuf).map_err(Fail::Connect)?;
    }
    socket.set_tcp_nodelay(true).map_err(Fail::Connect)?;
    socket.set_nonblocking(true).map_err(Fail::Connect)?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    socket.connect(addr).await.map_err(Fail::Connect)
}

/// Sends `{"type":"subscribe","topics":[topic]}` and reads until the server acknowledges
/// it (answering pings meanwhile).
pub async fn subscribe(
    ws: &mut WsConn,
    scratch: &RefCell<Vec<u8>>,
    topic: &str,
) -> Result<(), Fail> {
    let msg = format!(r#"{{"type":"subscribe","topics":["{topic}"]}}"#);
    ws.send_text(msg.as_bytes()).await?;
    let mut counts = FrameCounts::default();
    loop {
        let mut state = None;
        let end = ws
            .read_some(scratch, &mut counts, |text, _| {
                match wire::classify(text) {
                    ServerText::Subscribed => state = Some(Ok(())),
                    ServerText::Error => state = Some(Err(Fail::SubscribeError)),
                    ServerText::Ping => return Reply::Pong,
                    _ => {}
                }
                Reply::None
            })
            .await?;
        if let Some(state) = state {
            return state;
        }
        if let Some(end) = end {
            return Err(Fail::Ended(end));
        }
    }
}

/// Subscribes a connection to a peer described by a peer file: sends its subscribe frame
/// if it has one and, if it names an acknowledgement, reads until a message contains it
/// (one containing its error text fails the subscribe).
pub async fn subscribe_peer(
    ws: &mut WsConn,
    scratch: &RefCell<Vec<u8>>,
    how: &crate::peer::Subscribe,
    topic: &str,
) -> Result<(), Fail> {
    if let Some(frame) = how.frame(topic) {
        ws.send_text(frame.as_bytes()).await?;
    }
    let Some(ack) = &how.ack else {
        return Ok(());
    };
    let contains = |text: &[u8], s: &str| memchr::memmem::find(text, s.as_bytes()).is_some();
    let mut counts = FrameCounts::default();
    loop {
        let mut state = None;
        let end = ws
            .read_some(scratch, &mut counts, |text, _| {
                if contains(text, ack) {
                    state = Some(Ok(()));
                } else if how.error.as_deref().is_some_and(|e| contains(text, e)) {
                    state = Some(Err(Fail::SubscribeError));
                }
                Reply::None
            })
            .await?;
        if let Some(state) = state {
            return state;
        }
        if let Some(end) = end {
            return Err(Fail::Ended(end));
        }
    }
}

impl WsConn {
    /// Performs the upgrade on a connected stream; bytes after the 101 head are kept.
    pub async fn upgrade(
        stream: TcpStream,
        host: &str,
        path: &str,
        seed: u64,
    ) -> Result<WsConn, Fail> {
        WsConn::upgrade_with(stream, host, path, seed, false).await
    }

    /// [`WsConn::upgrade`], offering permessage-deflate when `deflate` is set; compressed
    /// messages are then inflated before `on_text` sees them.
    pub async fn upgrade_with(
        mut stream: TcpStream,
        host: &str,
        path: &str,
        seed: u64,
        deflate: bool,
    ) -> Result<WsConn, Fail> {
        stream
            .write_all(&wire::upgrade_request_with(host, path, deflate))
            .await?;
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        let head_len = loop {
            stream.readable().await?;
            match stream.try_read(&mut chunk) {
                Ok(0) => return Err(Fail::Ended(End::Eof)),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Fail::Io(e)),
            }
            if let Some(end) = wire::head_end(&buf) {
                break end;
            }
            if buf.len() > MAX_HEAD {
                return Err(Fail::Upgrade(0));
            }
        };
        match wire::response_status(&buf[..head_len]) {
            Some(101) => {}
            Some(s) => return Err(Fail::Upgrade(s)),
            None => return Err(Fail::Upgrade(0)),
        }
        buf.drain(..head_len);
        buf.shrink_to_fit();
        let fd = register(stream)?;
        Ok(WsConn {
            fd,
            pending: buf,
            out: Vec::new(),
            rng: MaskRng::new(seed),
            close_reason: Vec::new(),
        })
    }

    /// Sends one masked text frame.
    pub async fn send_text(&mut self, text: &[u8]) -> io::Result<()> {
        self.out.clear();
        let mask = self.rng.next_mask();
        wire::encode_client_frame(&mut self.out, opcode::TEXT, text, mask);
        self.flush_out().await
    }

    /// Sends a close frame with `code` (RFC 6455 §5.5.1).
    pub async fn send_close(&mut self, code: u16) -> io::Result<()> {
        self.out.clear();
        let mask = self.rng.next_mask();
        wire::encode_client_frame(&mut self.out, opcode::CLOSE, &code.to_be_bytes(), mask);
        self.flush_out().await
    }

    /// The reason of the server's close frame, once one arrived (empty otherwise).
    pub fn close_reason(&self) -> &[u8] {
        &self.close_reason
    }

    async fn flush_out(&mut self) -> io::Result<()> {
        let mut done = 0;
        while done < self.out.len() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| fd.get_ref().write(&self.out[done..])) {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => done += n,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        self.out.clear();
        Ok(())
    }

    /// Waits for readability, reads once into `scratch` and hands each complete text
    /// frame to `on_text` with the time of the read (one clock reading per read, not per
    /// frame). Answers pings. Returns `Ok(Some(end))` once the server ended the stream.
    pub async fn read_some(
        &mut self,
        scratch: &RefCell<Vec<u8>>,
        counts: &mut FrameCounts,
        mut on_text: impl FnMut(&[u8], u64) -> Reply,
    ) -> Result<Option<End>, Fail> {
        let mut guard = self.fd.readable().await?;
        let mut end = None;
        {
            let mut scratch = scratch.borrow_mut();
            let held = self.pending.len();
            let want = wire::frame_len_hint(&self.pending).unwrap_or(0).max(held) + READ_CHUNK;
            let n = match read_after(&mut guard, &self.pending, &mut scratch, want)? {
                Ok(n) => n,
                Err(stop) => return Ok(stop),
            };
            let now = wire::now_ns();
            let data = &scratch[..held + n];
            let mut pos = 0;
            while let Some((frame, used)) = wire::parse_server_frame(&data[pos..])? {
                pos += used;
                match frame.opcode {
                    opcode::TEXT if frame.fin && frame.rsv1 => {
                        counts.text_bytes += used as u64;
                        let reply = INFLATE.with(|cell| {
                            let (inflater, text) = &mut *cell.borrow_mut();
                            wire::inflate_message(inflater, frame.payload, text, MAX_INFLATED)
                                .map(|()| on_text(text, now))
                        });
                        let Some(reply) = reply else {
                            return Err(Fail::Io(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "a compressed message that does not inflate",
                            )));
                        };
                        push_reply(&mut self.out, &mut self.rng, reply);
                    }
                    opcode::TEXT if frame.fin => {
                        counts.text_bytes += used as u64;
                        let reply = on_text(frame.payload, now);
                        push_reply(&mut self.out, &mut self.rng, reply);
                    }
                    opcode::TEXT | opcode::CONTINUATION => counts.fragmented += 1,
                    opcode::PING => {
                        let mask = self.rng.next_mask();
                        wire::encode_client_frame(&mut self.out, opcode::PONG, frame.payload, mask);
                    }
                    opcode::CLOSE => {
                        let code = (frame.payload.len() >= 2)
                            .then(|| u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
                        if let Some(reason) = frame.payload.get(2..) {
                            self.close_reason.clear();
                            self.close_reason.extend_from_slice(reason);
                        }
                        end = Some(End::Close(code));
                        break;
                    }
                    _ => {}
                }
            }
            self.pending.clear();
            if end.is_none() {
                self.pending.extend_from_slice(&data[pos..]);
            }
        }
        self.flush_out().await?;
        Ok(end)
    }
}

/// A client Server-Sent Events stream of one topic: like [`WsConn`], a socket and the
/// bytes of a partial event block, parsed by [`crate::sse`].
#[derive(Debug)]
pub struct SseConn {
    fd: AsyncFd<std::net::TcpStream>,
    pending: Vec<u8>,
    close_reason: Vec<u8>,
}

impl SseConn {
    /// Sends the stream request for `topic` in one write on a fresh connection, checks
    /// the `200` head and waits for the stream's `retry:` hint, which the gateway writes
    /// once the stream is subscribed. Bytes after it are kept.
    pub async fn open(mut stream: TcpStream, host: &str, topic: &str) -> Result<SseConn, Fail> {
        stream
            .write_all(&crate::sse::topic_request(host, topic))
            .await?;
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        let mut head_len = None;
        loop {
            stream.readable().await?;
            match stream.try_read(&mut chunk) {
                Ok(0) => return Err(Fail::Ended(End::Eof)),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Fail::Io(e)),
            }
            if head_len.is_none() {
                let Some(end) = wire::head_end(&buf) else {
                    if buf.len() > MAX_HEAD {
                        return Err(Fail::Upgrade(0));
                    }
                    continue;
                };
                match wire::response_status(&buf[..end]) {
                    Some(200) => {}
                    Some(s) => return Err(Fail::Upgrade(s)),
                    None => return Err(Fail::Upgrade(0)),
                }
                head_len = Some(end);
                buf.drain(..end);
            }
            let mut pos = 0;
            let mut subscribed = false;
            while let Some((block, used)) = crate::sse::next_event(&buf[pos..]) {
                pos += used;
                if block.retry.is_some() {
                    subscribed = true;
                    break;
                }
            }
            buf.drain(..pos);
            if subscribed {
                break;
            }
            if buf.len() > MAX_HEAD {
                return Err(Fail::Upgrade(0));
            }
        }
        buf.shrink_to_fit();
        let fd = register(stream)?;
        Ok(SseConn {
            fd,
            pending: buf,
            close_reason: Vec::new(),
        })
    }

    /// The reason of the server's `close` event, once one arrived (empty otherwise).
    pub fn close_reason(&self) -> &[u8] {
        &self.close_reason
    }

    /// Like [`WsConn::read_some`]: one read, then each event's `data:` (the message
    /// JSON) to `on_text` with the time of the read. A `close` event ends the stream
    /// with its code; there is nothing to answer, so replies are ignored.
    pub async fn read_some(
        &mut self,
        scratch: &RefCell<Vec<u8>>,
        mut on_text: impl FnMut(&[u8], u64) -> Reply,
    ) -> Result<Option<End>, Fail> {
        let mut guard = self.fd.readable().await?;
        let mut scratch = scratch.borrow_mut();
        let held = self.pending.len();
        let n = match read_after(&mut guard, &self.pending, &mut scratch, held + READ_CHUNK)? {
            Ok(n) => n,
            Err(stop) => return Ok(stop),
        };
        let now = wire::now_ns();
        let data = &scratch[..held + n];
        let mut pos = 0;
        while let Some((block, used)) = crate::sse::next_event(&data[pos..]) {
            pos += used;
            let Some(text) = block.data else { continue };
            if block.event == Some(b"close") {
                if let Some(reason) = json_string_after(&text, b"\"reason\":\"") {
                    self.close_reason.clear();
                    self.close_reason.extend_from_slice(reason);
                }
                let code = wire::number_after(&text, b"\"code\":").and_then(|c| c.try_into().ok());
                self.pending.clear();
                return Ok(Some(End::Close(code)));
            }
            on_text(&text, now);
        }
        self.pending.clear();
        self.pending.extend_from_slice(&data[pos..]);
        Ok(None)
    }
}

/// The raw (still escaped) JSON string value after `key`, up to its closing quote.
fn json_string_after<'a>(json: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let start = memchr::memmem::find(json, key)? + key.len();
    let rest = &json[start..];
    let mut i = 0;
    while i < rest.len() {
        match rest[i] {
            b'\\' => i += 2,
            b'"' => return Some(&rest[..i]),
            _ => i += 1,
        }
    }
    None
}

/// Which transport a subscriber uses.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// A WebSocket (`--path`, then a `subscribe` message).
    #[default]
    Ws,
    /// A Server-Sent Events stream of one topic, `GET /v1/topics/{topic}/sse`.
    Sse,
}

impl Transport {
    /// The transport's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }
}

/// A subscribed client connection of either transport.
#[derive(Debug)]
pub enum Conn {
    /// A WebSocket.
    Ws(WsConn),
    /// A Server-Sent Events stream.
    Sse(SseConn),
}

impl Conn {
    /// One read, handing every complete message's JSON to `on_text`; see
    /// [`WsConn::read_some`] and [`SseConn::read_some`].
    pub async fn read_some(
        &mut self,
        scratch: &RefCell<Vec<u8>>,
        counts: &mut FrameCounts,
        on_text: impl FnMut(&[u8], u64) -> Reply,
    ) -> Result<Option<End>, Fail> {
        match self {
            Conn::Ws(ws) => ws.read_some(scratch, counts, on_text).await,
            Conn::Sse(sse) => sse.read_some(scratch, on_text).await,
        }
    }

    /// The reason the server gave when it ended the connection (empty otherwise).
    pub fn close_reason(&self) -> &[u8] {
        match self {
            Conn::Ws(ws) => ws.close_reason(),
            Conn::Sse(sse) => sse.close_reason(),
        }
    }

    /// A WebSocket sends a close frame with `code`; an SSE client has no way to say
    /// goodbye but closing the socket, so this is `Unsupported` for it.
    pub async fn send_close(&mut self, code: u16) -> io::Result<()> {
        match self {
            Conn::Ws(ws) => ws.send_close(code).await,
            Conn::Sse(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reason_is_taken_up_to_its_quote() {
        let json = br#"{"type":"close","code":1013,"reason":"slow \"x\" consumer"}"#;
        assert_eq!(
            json_string_after(json, b"\"reason\":\""),
            Some(&br#"slow \"x\" consumer"#[..])
        );
        assert_eq!(json_string_after(b"{}", b"\"reason\":\""), None);
    }
}
