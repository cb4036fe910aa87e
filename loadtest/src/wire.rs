//! Sans-IO wire helpers shared by the harness client and the comparison servers:
//! RFC 6455 frame parsing and encoding, the upgrade handshake, byte scanning of event
//! messages, publication payloads and a minimal HTTP/1.1 head parser.
//!
//! Everything here is a plain function over byte slices, so the per-frame cost of the
//! client is visible in one place and tested without sockets.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The GUID that RFC 6455 §1.3 appends to `Sec-WebSocket-Key` before hashing.
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A fixed, valid `Sec-WebSocket-Key` (16 bytes, base64): the harness does not need a
/// fresh nonce per connection, and a constant keeps the handshake allocation-free.
pub const CLIENT_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// WebSocket opcodes (RFC 6455 §5.2).
pub mod opcode {
    /// Continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// UTF-8 text message.
    pub const TEXT: u8 = 0x1;
    /// Binary message.
    pub const BINARY: u8 = 0x2;
    /// Connection close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// One parsed frame borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// FIN bit: the last frame of a message.
    pub fin: bool,
    /// The opcode (see [`opcode`]).
    pub opcode: u8,
    /// RSV1: a compressed message (permessage-deflate, RFC 7692 §6).
    pub rsv1: bool,
    /// The unmasked payload.
    pub payload: &'a [u8],
}

/// Why a frame from the server could not be parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// RFC 6455 §5.1: "A server MUST NOT mask any frames that it sends to the client."
    MaskedServerFrame,
    /// A frame too large to be a plausible server message for this harness.
    TooLarge(u64),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::MaskedServerFrame => write!(f, "server sent a masked frame"),
            FrameError::TooLarge(n) => write!(f, "server frame of {n} bytes"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Largest server frame the client accepts (16 MiB); anything bigger is a broken peer.
const MAX_SERVER_FRAME: u64 = 16 << 20;

/// Parses one unmasked (server-to-client) frame at the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed (nothing is consumed), otherwise the
/// frame and the number of bytes it occupies.
pub fn parse_server_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b1 & 0x80 != 0 {
        return Err(FrameError::MaskedServerFrame);
    }
    let (len, header) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    if len > MAX_SERVER_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    // Bounded by MAX_SERVER_FRAME above, so this cannot truncate.
    let total = header + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let frame = Frame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        rsv1: b0 & 0x40 != 0,
        payload: &buf[header..total],
    };
    Ok(Some((frame, total)))
}

/// Total size of the frame starting at `buf`, once its header is complete: lets a reader
/// grow its buffer for a frame larger than the scratch space.
pub fn frame_len_hint(buf: &[u8]) -> Option<usize> {
    if buf.len() < 2 {
        return None;
    }
    match buf[1] & 0x7f {
        126 if buf.len() >= 4 => Some(4 + usize::from(u16::from_be_bytes([buf[2], buf[3]]))),
        127 if buf.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            usize::try_from(u64::from_be_bytes(b)).ok()?.checked_add(10)
        }
        126 | 127 => None,
        n => Some(2 + usize::from(n)),
    }
}

/// Appends a masked client frame (RFC 6455 §5.3: "The client MUST mask all frames that it
/// sends to the server") with FIN set.
pub fn encode_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    push_len(out, 0x80, payload.len());
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Appends an unmasked server frame with FIN set.
pub fn encode_server_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    push_len(out, 0, payload.len());
    out.extend_from_slice(payload);
}

fn push_len(out: &mut Vec<u8>, mask_bit: u8, len: usize) {
    if len < 126 {
        // len < 126 fits in the 7-bit field.
        out.push(mask_bit | len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Parses one masked (client-to-server) frame and unmasks its payload into `payload`.
/// Returns the opcode and the bytes consumed, or `None` if incomplete or unmasked.
pub fn parse_client_frame(buf: &[u8], payload: &mut Vec<u8>) -> Option<(u8, usize)> {
    if buf.len() < 2 || buf[1] & 0x80 == 0 {
        return None;
    }
    let (len, header): (usize, usize) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (usize::try_from(u64::from_be_bytes(b)).ok()?, 10)
        }
        126 | 127 => return None,
        n => (usize::from(n), 2),
    };
    let total = header.checked_add(4)?.checked_add(len)?;
    if buf.len() < total {
        return None;
    }
    let mask = [
        buf[header],
        buf[header + 1],
        buf[header + 2],
        buf[header + 3],
    ];
    payload.clear();
    payload.extend_from_slice(&buf[header + 4..total]);
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
    Some((buf[0] & 0x0f, total))
}

/// The client's upgrade request for `path` on `host`.
pub fn upgrade_request(host: &str, path: &str) -> Vec<u8> {
    upgrade_request_with(host, path, false)
}

/// [`upgrade_request`], offering permessage-deflate (RFC 7692) when `deflate` is set, as
/// browsers do.
pub fn upgrade_request_with(host: &str, path: &str, deflate: bool) -> Vec<u8> {
    let offer = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {CLIENT_KEY}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: tidings.v1\r\n{offer}\r\n"
    )
    .into_bytes()
}

/// Inflates a compressed server message (RFC 7692 §7.2.2: the payload plus the 4 octets
/// `00 00 ff ff`) into `out`, with `inflater` reset first (the gateway agrees
/// `server_no_context_takeover`). At most `max` bytes; `None` if it does not inflate.
pub fn inflate_message(
    inflater: &mut flate2::Decompress,
    payload: &[u8],
    out: &mut Vec<u8>,
    max: usize,
) -> Option<()> {
    use flate2::{FlushDecompress, Status};
    inflater.reset(false);
    out.clear();
    for input in [payload, &[0x00, 0x00, 0xff, 0xff][..]] {
        let mut rest = input;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= max {
                    return None;
                }
                out.reserve(out.len().max(4096));
            }
            let before = inflater.total_in();
            let status = inflater
                .decompress_vec(rest, out, FlushDecompress::Sync)
                .ok()?;
            rest = &rest[usize::try_from(inflater.total_in() - before).ok()?..];
            if status == Status::StreamEnd {
                return Some(());
            }
            if rest.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
    }
    Some(())
}

/// A realistic JSON configuration document of about 5 KB (feature flags of one
/// application profile), for measuring compression: its text varies the way real
/// documents do, unlike `build_payload`'s padding.
pub fn config_document() -> String {
    use std::fmt::Write as _;
    let mut doc = String::from(r#"{"app":"checkout","profile":"prod","revision":4242,"flags":["#);
    for i in 0..48u32 {
        if i > 0 {
            doc.push(',');
        }
        let owner = ["payments", "growth", "platform"][(i % 3) as usize];
        // Writing into a String cannot fail.
        let _ = write!(
            doc,
            r#"{{"key":"checkout.feature_{i}","enabled":{},"rollout_percent":{},"owner":"{owner}","updated_at":"2026-11-{:02}T10:{:02}:00Z"}}"#,
            i % 3 != 0,
            (i * 17) % 100,
            1 + i % 28,
            i % 60
        );
    }
    doc.push_str("]}");
    doc
}

/// A publication body `{"t":<ns>,"seq":N,"doc":<doc>}`: `doc` (a JSON value) carrying the
/// send time, into `out`.
pub fn build_doc_payload(out: &mut Vec<u8>, t_ns: u64, seq: u64, doc: &str) {
    use std::io::Write as _;
    out.clear();
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{{\"t\":{t_ns},\"seq\":{seq},\"doc\":{doc}}}");
}

/// `Sec-WebSocket-Accept` for a request key (RFC 6455 §4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(WS_GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Position just past the `\r\n\r\n` that ends an HTTP head, if present.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    memchr::memmem::find(buf, b"\r\n\r\n").map(|p| p + 4)
}

/// The status code of an HTTP response head.
pub fn response_status(head: &[u8]) -> Option<u16> {
    let rest = head.strip_prefix(b"HTTP/1.1 ")?;
    let code = rest.get(..3)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// A parsed HTTP request head (method, path, headers), borrowed from the buffer.
#[derive(Debug)]
pub struct RequestHead<'a> {
    /// Request method.
    pub method: &'a str,
    /// Request target.
    pub path: &'a str,
    headers: Vec<(&'a str, &'a str)>,
}

impl<'a> RequestHead<'a> {
    /// Parses the head (everything up to and including the blank line).
    pub fn parse(head: &'a [u8]) -> Option<RequestHead<'a>> {
        let text = std::str::from_utf8(head).ok()?;
        let mut lines = text.split("\r\n");
        let mut first = lines.next()?.split(' ');
        let method = first.next()?;
        let path = first.next()?;
        let headers = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim(), v.trim()))
            })
            .collect();
        Some(RequestHead {
            method,
            path,
            headers,
        })
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// The request's `Content-Length`, 0 when absent.
    pub fn content_length(&self) -> Option<usize> {
        match self.header("content-length") {
            Some(v) => v.parse().ok(),
            None => Some(0),
        }
    }
}

/// Current time in nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Current time in milliseconds since the Unix epoch (the protocol's `ts`).
pub fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

/// Builds a publication body `{"t":<ns>,"seq":N,"pad":"xx.."}` of exactly `size` bytes
/// when `size` is larger than the unpadded object, into `out`.
pub fn build_payload(out: &mut Vec<u8>, t_ns: u64, seq: u64, size: usize) {
    use std::io::Write as _;
    out.clear();
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{{\"t\":{t_ns},\"seq\":{seq},\"pad\":\"");
    let fixed = out.len() + 2;
    out.resize(out.len() + size.saturating_sub(fixed), b'x');
    out.extend_from_slice(b"\"}");
}

/// The fields the harness needs from an `event` message.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct EventFields {
    /// The publication's offset within its topic.
    pub offset: u64,
    /// The send time embedded in the payload (`"t"`), if present.
    pub t_ns: Option<u64>,
}

/// What a text message from the server is, judged by scanning bytes only.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerText {
    /// An `event` with its offset and payload send time.
    Event(EventFields),
    /// The acknowledgement of a subscribe.
    Subscribed,
    /// An `error` message.
    Error,
    /// An application-level `ping`, to be answered with a `pong`.
    Ping,
    /// Anything else (pong, notices).
    Other,
}

/// Classifies a server text message without parsing JSON: the contract fixes `type` as
/// the first field, and an event's `offset` before its `data`, so two scans suffice.
pub fn classify(text: &[u8]) -> ServerText {
    const EVENT: &[u8] = b"{\"type\":\"event\"";
    if text.starts_with(EVENT) {
        let Some(offset) = number_after(text, b"\"offset\":") else {
            return ServerText::Other;
        };
        let t_ns = memchr::memmem::find(text, b"\"data\":")
            .and_then(|p| number_after(&text[p..], b"\"t\":"));
        return ServerText::Event(EventFields { offset, t_ns });
    }
    let ty = match memchr::memmem::find(text, b"\"type\":\"") {
        Some(p) => &text[p + 8..],
        None => return ServerText::Other,
    };
    if ty.starts_with(b"subscribed\"") {
        ServerText::Subscribed
    } else if ty.starts_with(b"error\"") {
        ServerText::Error
    } else if ty.starts_with(b"ping\"") {
        ServerText::Ping
    } else {
        ServerText::Other
    }
}

/// The unsigned integer that follows the first occurrence of `key` in `text`.
pub fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let start = memchr::memmem::find(text, key)? + key.len();
    let mut n: u64 = 0;
    let mut digits = 0;
    for &b in text[start..].iter().skip_while(|b| **b == b' ') {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(n)
}

/// The first string of the `"topics":[...]` array of a subscribe message.
pub fn first_topic(text: &[u8]) -> Option<&[u8]> {
    let start = memchr::memmem::find(text, b"\"topics\":[")? + 10;
    let rest = &text[start..];
    let open = memchr::memchr(b'"', rest)? + 1;
    let len = memchr::memchr(b'"', &rest[open..])?;
    Some(&rest[open..open + len])
}

/// A cheap xorshift64 generator for mask keys; masking exists for proxies, not secrecy,
/// and a per-connection stream keeps the client allocation- and syscall-free.
#[derive(Debug, Clone)]
pub struct MaskRng(u64);

impl MaskRng {
    /// A generator seeded from `seed` (any value; zero is remapped).
    pub fn new(seed: u64) -> MaskRng {
        MaskRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next mask key.
    pub fn next_mask(&mut self) -> [u8; 4] {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        // Truncation intended: any 32 bits of the state make a mask key.
        (self.0 as u32).to_ne_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_frame_roundtrip_all_length_forms() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![b'a'; len];
            let mut buf = Vec::new();
            encode_server_frame(&mut buf, opcode::TEXT, &payload);
            for cut in [0, 1, buf.len() - 1] {
                if cut < buf.len() {
                    assert_eq!(parse_server_frame(&buf[..cut]), Ok(None));
                }
            }
            let (frame, used) = parse_server_frame(&buf).unwrap().unwrap();
            assert_eq!(used, buf.len());
            assert_eq!(frame_len_hint(&buf), Some(buf.len()));
            assert!(frame.fin);
            assert_eq!(frame.opcode, opcode::TEXT);
            assert_eq!(frame.payload, &payload[..]);
        }
    }

    #[test]
    fn masked_server_frame_is_an_error() {
        assert_eq!(
            parse_server_frame(&[0x81, 0x81, 0, 0, 0, 0, b'a']),
            Err(FrameError::MaskedServerFrame)
        );
    }

    #[test]
    fn client_frame_roundtrip() {
        let mut buf = Vec::new();
        encode_client_frame(&mut buf, opcode::TEXT, b"hello", [1, 2, 3, 4]);
        assert_ne!(&buf[6..], b"hello");
        let mut out = Vec::new();
        assert_eq!(
            parse_client_frame(&buf, &mut out),
            Some((opcode::TEXT, buf.len()))
        );
        assert_eq!(out, b"hello");
        assert_eq!(parse_client_frame(&buf[..buf.len() - 1], &mut out), None);
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key(CLIENT_KEY.as_bytes()),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn payload_has_requested_size() {
        let mut out = Vec::new();
        build_payload(&mut out, 1_700_000_000_000_000_000, 42, 256);
        assert_eq!(out.len(), 256);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["seq"], 42);
        build_payload(&mut out, 5, 1, 0);
        assert_eq!(out, b"{\"t\":5,\"seq\":1,\"pad\":\"\"}");
    }

    #[test]
    fn classify_event_and_others() {
        let ev = br#"{"type":"event","topic":"bench:0","offset":17,"data":{"t":123456,"seq":16,"pad":"x"},"ts":99}"#;
        assert_eq!(
            classify(ev),
            ServerText::Event(EventFields {
                offset: 17,
                t_ns: Some(123456)
            })
        );
        let no_t = br#"{"type":"event","topic":"a","offset":3,"data":[1],"ts":1}"#;
        assert_eq!(
            classify(no_t),
            ServerText::Event(EventFields {
                offset: 3,
                t_ns: None
            })
        );
        assert_eq!(
            classify(br#"{"type":"subscribed","topics":["a"],"ts":1}"#),
            ServerText::Subscribed
        );
        assert_eq!(
            classify(br#"{"type":"error","code":"x"}"#),
            ServerText::Error
        );
        assert_eq!(classify(br#"{"type":"ping","ts":1}"#), ServerText::Ping);
        assert_eq!(classify(b"garbage"), ServerText::Other);
    }

    #[test]
    fn number_after_rejects_overflow_and_missing_digits() {
        assert_eq!(
            number_after(b"\"a\":99999999999999999999999", b"\"a\":"),
            None
        );
        assert_eq!(number_after(b"\"a\":x", b"\"a\":"), None);
        assert_eq!(number_after(b"\"a\": 12,", b"\"a\":"), Some(12));
    }

    #[test]
    fn first_topic_of_subscribe() {
        let msg = br#"{"type":"subscribe","topics":["bench:3","x"]}"#;
        assert_eq!(first_topic(msg), Some(&b"bench:3"[..]));
        assert_eq!(first_topic(b"{}"), None);
    }

    #[test]
    fn request_head_parse() {
        let head = b"GET /ws HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Key: k\r\n\r\n";
        let req = RequestHead::parse(head).unwrap();
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/ws");
        assert_eq!(req.header("sec-websocket-key"), Some("k"));
        assert_eq!(req.content_length(), Some(0));
        assert_eq!(response_status(b"HTTP/1.1 101 Switching"), Some(101));
    }
}
