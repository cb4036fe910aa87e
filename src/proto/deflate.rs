//! permessage-deflate (RFC 7692), sans-IO: the negotiation as a function of the request's
//! `Sec-WebSocket-Extensions`, compressing a server message, and inflating a client message
//! with its output bounded.
//!
//! The gateway always answers `server_no_context_takeover` and `client_no_context_takeover`
//! (§7.1.1: a server may include either even when the client did not offer it, and the
//! client must then comply). With the first, every message is compressed on its own, so one
//! compressed frame of a publication serves every connection that negotiated a window the
//! message fits ([`SharedDeflate`]), built once by whichever shard needs it first. With the
//! second, a connection keeps no inflate state between messages: one [`Inflater`] per shard
//! serves all of its connections, a whole message at a time, and an idle compressed
//! connection owns no buffer at all.

use std::collections::VecDeque;
use std::sync::OnceLock;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::ProtocolViolation;
use super::frame::{self, Kind, MAX_HEADER_LEN};

/// The extension token (RFC 7692 §7).
pub const EXTENSION: &str = "permessage-deflate";

/// RFC 7692 §7.2.1: a sync flush ends with these 4 octets; the sender removes them and the
/// receiver appends them again (§7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// zlib's compression level. A publication is compressed once however many subscribers
/// share it, so a better ratio is worth more than speed: level 6 (zlib's default) cut a
/// 5 KB JSON document to about a fifth; see docs/BENCHMARKS.md for the measured cost.
const LEVEL: u32 = 6;

/// Shared frames sent one subscriber at a time (snapshots, replays from history) whose
/// compressed forms a shard keeps, so that subscribers catching up on the same frame cost
/// one compression per shard: at most this many, and at most [`RECENT_BYTES`] of plain
/// and compressed bytes together (a frame larger than that is compressed for each
/// subscriber and not kept).
const RECENT_FRAMES: usize = 16;

/// See [`RECENT_FRAMES`]: 4 MiB per shard bounds what the cache can pin, a few snapshots
/// of the largest documents (`max_state_bytes` is 1 MiB by default).
const RECENT_BYTES: usize = 4 << 20;

/// The first output allocation of an inflate; it doubles from there up to the message
/// limit, so a small message costs a small buffer and a large one a few reallocations.
const INFLATE_FIRST_CHUNK: usize = 4096;

/// An LZ77 sliding window of 2^bits bytes (RFC 7692 §7.1.2), bits in 8..=15.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WindowBits(u8);

impl WindowBits {
    /// The widest window, 32 KiB: what a client that did not limit the server's window can
    /// inflate.
    pub const MAX: WindowBits = WindowBits(15);

    /// A window of 2^bits bytes, for bits in 8..=15.
    pub fn new(bits: u8) -> Option<WindowBits> {
        (8..=15).contains(&bits).then_some(WindowBits(bits))
    }

    /// Its base-2 logarithm.
    pub fn get(self) -> u8 {
        self.0
    }

    /// The window a message of `len` bytes is compressed with for a client with this
    /// window: without context takeover no match reaches back past the message's start,
    /// so the widest window's encoding suits any window at least as long as the message.
    fn for_message(self, len: usize) -> WindowBits {
        if len <= 1 << self.0 {
            WindowBits::MAX
        } else {
            self
        }
    }

    /// The window zlib compresses with. zlib refuses 8 bits for raw DEFLATE, but never
    /// reaches further back than its window less 262 bytes (`MAX_DIST`), so its 9-bit
    /// window (at most 250 bytes back) also suits a client that asked for 8.
    fn zlib_bits(self) -> u8 {
        self.0.max(9)
    }
}

/// What was agreed with one client: 2 bytes (as an `Option`), kept in its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// `server_max_window_bits` as the client asked for it, if it did.
    server_max_window_bits: Option<WindowBits>,
}

impl Agreed {
    /// The window this connection's messages may be compressed with.
    pub fn window(self) -> WindowBits {
        self.server_max_window_bits.unwrap_or(WindowBits::MAX)
    }

    /// The `Sec-WebSocket-Extensions` value of the `101`: both no-context-takeover
    /// parameters, and the server's window only if the client asked to limit it (§7.1.2.1:
    /// "the same or smaller value as the offer").
    pub fn response(self) -> String {
        let mut value =
            format!("{EXTENSION}; server_no_context_takeover; client_no_context_takeover");
        if let Some(bits) = self.server_max_window_bits {
            value.push_str(&format!("; server_max_window_bits={}", bits.get()));
        }
        value
    }
}

/// Chooses the client's first acceptable permessage-deflate offer, if any, from the
/// values of its `Sec-WebSocket-Extensions` headers, in order (RFC 7692 §5: "An element
/// preceding another element has higher preference").
///
/// An offer is declined, and the next one considered, when it has a parameter RFC 7692
/// does not define for an offer, a parameter twice, or an invalid value (§7: "A server
/// MUST decline an extension negotiation offer for this extension if any of the following
/// conditions are met"). A header that is not the RFC 6455 §9.1 grammar is not guessed at:
/// nothing is negotiated and the connection goes on uncompressed. Other extensions are
/// ignored.
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Option<Agreed> {
    let mut chosen = None;
    for value in values {
        let mut scan = Scan { s: value, i: 0 };
        loop {
            scan.ows();
            if scan.at_end() {
                break;
            }
            // RFC 9110 §5.6.1: a list may have empty elements, which are ignored.
            if scan.eat(b',') {
                continue;
            }
            let name = scan.token()?;
            let mut offer = Offer::new(name.eq_ignore_ascii_case(EXTENSION.as_bytes()));
            loop {
                scan.ows();
                if !scan.eat(b';') {
                    break;
                }
                scan.ows();
                let param = scan.token()?;
                scan.ows();
                let value = if scan.eat(b'=') {
                    scan.ows();
                    Some(scan.value()?)
                } else {
                    None
                };
                offer.param(param, value);
            }
            scan.ows();
            if !(scan.at_end() || scan.eat(b',')) {
                return None;
            }
            if chosen.is_none() {
                chosen = offer.accept();
            }
        }
    }
    chosen
}

/// One offer being read: whether it can still be accepted, and what it asked.
struct Offer {
    acceptable: bool,
    /// Parameters seen, one bit each, to decline duplicates.
    seen: u8,
    server_max_window_bits: Option<WindowBits>,
}

impl Offer {
    fn new(is_deflate: bool) -> Offer {
        Offer {
            acceptable: is_deflate,
            seen: 0,
            server_max_window_bits: None,
        }
    }

    fn param(&mut self, name: &[u8], value: Option<Value>) {
        let is = |p: &str| name.eq_ignore_ascii_case(p.as_bytes());
        let (bit, valid) = if is("server_no_context_takeover") {
            // §7.1.1.1: "This extension parameter has no value."
            (1, value.is_none())
        } else if is("client_no_context_takeover") {
            (2, value.is_none())
        } else if is("server_max_window_bits") {
            // §7.1.2.1: it has a value, a decimal integer 8..15 without leading zeros.
            let bits = value.and_then(Value::window_bits);
            self.server_max_window_bits = bits;
            (4, bits.is_some())
        } else if is("client_max_window_bits") {
            // §7.1.2.2: "This parameter has no value or a decimal integer value without
            // leading zeroes between 8 to 15". The gateway inflates with the widest
            // window, so it needs no answer: its absence in the response means 15.
            (8, value.is_none_or(|v| v.window_bits().is_some()))
        } else {
            (0, false)
        };
        if !valid || self.seen & bit != 0 {
            self.acceptable = false;
        }
        self.seen |= bit;
    }

    fn accept(self) -> Option<Agreed> {
        self.acceptable.then_some(Agreed {
            server_max_window_bits: self.server_max_window_bits,
        })
    }
}

/// A parameter's value, token or quoted-string (unescaped), of which only the first two
/// bytes are kept: no valid value is longer.
#[derive(Clone, Copy)]
struct Value {
    head: [u8; 2],
    len: usize,
}

impl Value {
    fn push(&mut self, b: u8) {
        if let Some(slot) = self.head.get_mut(self.len) {
            *slot = b;
        }
        self.len += 1;
    }

    fn window_bits(self) -> Option<WindowBits> {
        let bits = match (self.len, self.head) {
            (1, [d @ b'8'..=b'9', _]) => d - b'0',
            (2, [b'1', d @ b'0'..=b'5']) => 10 + d - b'0',
            _ => return None,
        };
        WindowBits::new(bits)
    }
}

/// A cursor over one header value (RFC 6455 §9.1, RFC 9110 §5.6).
struct Scan<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn at_end(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        self.i += usize::from(hit);
        hit
    }

    /// Optional whitespace.
    fn ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    /// `token = 1*tchar`.
    fn token(&mut self) -> Option<&'a [u8]> {
        let start = self.i;
        while self.peek().is_some_and(is_tchar) {
            self.i += 1;
        }
        (self.i > start).then(|| &self.s[start..self.i])
    }

    /// `token | quoted-string`; RFC 6455 §9.1: a quoted value, unescaped, must be a token.
    fn value(&mut self) -> Option<Value> {
        let mut value = Value {
            head: [0; 2],
            len: 0,
        };
        if !self.eat(b'"') {
            for &b in self.token()? {
                value.push(b);
            }
            return Some(value);
        }
        loop {
            let b = self.peek()?;
            self.i += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    let escaped = self.peek()?;
                    self.i += 1;
                    value.push(escaped);
                }
                _ => value.push(b),
            }
        }
        let mut token = true;
        for &b in &value.head[..value.len.min(2)] {
            token &= is_tchar(b);
        }
        (token && value.len > 0).then_some(value)
    }
}

/// RFC 9110 §5.6.2: `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Compresses server messages, each on its own (no context taken over), one zlib stream
/// per window size in use, reset between messages. A shard owns one: a stream costs about
/// 256 KiB with the widest window, paid per shard, never per connection.
#[derive(Default)]
pub struct Deflater {
    /// By zlib window bits, 9..=15.
    streams: [Option<Box<Compress>>; 7],
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open = self.streams.iter().filter(|s| s.is_some()).count();
        f.debug_struct("Deflater").field("streams", &open).finish()
    }
}

impl Deflater {
    /// `payload` compressed as one message in a final frame of `kind` with RSV1 set, or
    /// `None` when compressing would not make it smaller (then it goes as it is).
    pub fn frame(&mut self, kind: Kind, payload: &[u8], window: WindowBits) -> Option<Bytes> {
        let bits = window.zlib_bits();
        let stream = self.streams[usize::from(bits - 9)].get_or_insert_with(|| {
            Box::new(Compress::new_with_window_bits(
                Compression::new(LEVEL),
                false,
                bits,
            ))
        });
        stream.reset();
        // Room for the header in front, so the frame is one buffer with no copy; no more
        // room than the payload itself, since a larger result is not sent.
        let mut out = Vec::with_capacity(MAX_HEADER_LEN + payload.len() + TAIL.len());
        out.resize(MAX_HEADER_LEN, 0);
        loop {
            let consumed = usize::try_from(stream.total_in()).ok()?;
            let rest = payload.get(consumed..)?;
            let status = stream
                .compress_vec(rest, &mut out, FlushCompress::Sync)
                .ok()?;
            let all_in = usize::try_from(stream.total_in()).ok()? == payload.len();
            // A sync flush is complete when the input is all in and output room is left.
            if all_in && out.len() < out.capacity() {
                break;
            }
            if out.len() == out.capacity() || status == Status::BufError {
                return None;
            }
        }
        // §7.2.1: "Remove 4 octets (that are 0x00 0x00 0xff 0xff) from the tail end."
        if !out.ends_with(&TAIL) {
            return None;
        }
        out.truncate(out.len() - TAIL.len());
        let body = out.len() - MAX_HEADER_LEN;
        if body >= payload.len() {
            return None;
        }
        let mut raw = [0u8; MAX_HEADER_LEN];
        let n = frame::format_header(&mut raw, kind, body, true);
        let start = MAX_HEADER_LEN - n;
        out[start..MAX_HEADER_LEN].copy_from_slice(&raw[..n]);
        Some(Bytes::from(out).slice(start..))
    }
}

/// Inflates client messages one whole message at a time, with a fresh context for each
/// (`client_no_context_takeover` was agreed), so nothing is kept between messages. A
/// shard owns one (about 40 KiB once used) for all of its connections.
#[derive(Default)]
pub struct Inflater {
    stream: Option<Box<Decompress>>,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("used", &self.stream.is_some())
            .finish()
    }
}

impl Inflater {
    /// Inflates one message's payload (its frames' payloads, joined). More than `max`
    /// bytes out is [`ProtocolViolation::TooBig`] (1009), found after at most `max + 1`
    /// bytes were produced, so an inflate bomb costs no more than the message limit; data
    /// that is not DEFLATE is [`ProtocolViolation::BadDeflate`].
    pub fn inflate(&mut self, compressed: &[u8], max: usize) -> Result<Vec<u8>, ProtocolViolation> {
        let stream = self
            .stream
            .get_or_insert_with(|| Box::new(Decompress::new(false)));
        stream.reset(false);
        let mut out: Vec<u8> = Vec::new();
        let mut input = compressed;
        let mut tail = false;
        loop {
            if out.len() == out.capacity() {
                if out.len() > max {
                    return Err(ProtocolViolation::TooBig);
                }
                let more = out.len().max(INFLATE_FIRST_CHUNK).min(max + 1 - out.len());
                out.reserve_exact(more);
            }
            let before = stream.total_in();
            let status = stream
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
                .map_err(|_| ProtocolViolation::BadDeflate)?;
            let used = usize::try_from(stream.total_in() - before)
                .map_err(|_| ProtocolViolation::BadDeflate)?;
            input = input.get(used..).ok_or(ProtocolViolation::BadDeflate)?;
            if out.len() > max {
                return Err(ProtocolViolation::TooBig);
            }
            if status == Status::StreamEnd {
                // A final block (BFINAL) ends the stream: only the appended tail may follow.
                return if tail || input.is_empty() {
                    Ok(out)
                } else {
                    Err(ProtocolViolation::BadDeflate)
                };
            }
            // All input taken and room left: everything it gives is out.
            if input.is_empty() && out.len() < out.capacity() {
                if tail {
                    return Ok(out);
                }
                // §7.2.2: "Append 4 octets of 0x00 0x00 0xff 0xff to the tail end of the
                // payload of the message."
                input = &TAIL;
                tail = true;
            } else if used == 0 && status == Status::BufError && out.len() < out.capacity() {
                return Err(ProtocolViolation::BadDeflate);
            }
        }
    }
}

/// A shard's compression state: its [`Deflater`], its [`Inflater`], the compressed forms
/// of the shared frames it sent last, and the size under which messages go uncompressed
/// (`deflate_min_bytes`).
#[derive(Debug)]
pub struct Codec {
    /// Compresses outbound messages.
    pub deflater: Deflater,
    /// Inflates inbound messages.
    pub inflater: Inflater,
    min_bytes: usize,
    /// Recently compressed shared frames, oldest first (see [`RECENT_FRAMES`]).
    recent: VecDeque<Recent>,
    /// Plain and compressed bytes `recent` holds.
    recent_bytes: usize,
}

/// A shared frame and its compressed form for one window.
#[derive(Debug)]
struct Recent {
    /// The frame itself: holding it keeps its address from being reused by another frame.
    plain: Bytes,
    window: WindowBits,
    packed: Option<Bytes>,
}

impl Codec {
    /// A codec that leaves payloads under `min_bytes` uncompressed.
    pub fn new(min_bytes: usize) -> Codec {
        Codec {
            deflater: Deflater::default(),
            inflater: Inflater::default(),
            min_bytes,
            recent: VecDeque::new(),
            recent_bytes: 0,
        }
    }

    /// A shared frame sent to one subscriber at a time (a snapshot, a replayed
    /// publication) compressed for a connection with `window`, or `None` to send it plain
    /// (under `min_bytes`, not a data frame, or it does not shrink). The same frame
    /// (the same `Bytes`) for the same window is compressed once while it stays among the
    /// shard's recent ones, so a thousand reconnecting subscribers getting one snapshot
    /// cost one compression per shard.
    pub fn shared(&mut self, plain: &Bytes, window: WindowBits) -> Option<Bytes> {
        let (kind, payload) = data_payload(plain)?;
        if payload.len() < self.min_bytes {
            return None;
        }
        let window = window.for_message(payload.len());
        let same = |r: &Recent| {
            r.window == window && r.plain.as_ptr() == plain.as_ptr() && r.plain.len() == plain.len()
        };
        if let Some(hit) = self.recent.iter().find(|r| same(r)) {
            return hit.packed.clone();
        }
        let packed = self.deflater.frame(kind, payload, window);
        let size = plain.len() + packed.as_ref().map_or(0, Bytes::len);
        if size <= RECENT_BYTES {
            while self.recent.len() >= RECENT_FRAMES || self.recent_bytes + size > RECENT_BYTES {
                let Some(old) = self.recent.pop_front() else {
                    break;
                };
                self.recent_bytes -= old.plain.len() + old.packed.as_ref().map_or(0, Bytes::len);
            }
            self.recent_bytes += size;
            self.recent.push_back(Recent {
                plain: plain.clone(),
                window,
                packed: packed.clone(),
            });
        }
        packed
    }

    /// Payloads shorter than this go uncompressed.
    pub fn min_bytes(&self) -> usize {
        self.min_bytes
    }

    /// A data message's frame for a connection that agreed `deflate` (or nothing):
    /// compressed when agreed, at least `min_bytes` long and smaller compressed.
    pub fn encode(&mut self, kind: Kind, payload: &[u8], deflate: Option<Agreed>) -> Bytes {
        deflate
            .filter(|_| payload.len() >= self.min_bytes)
            .and_then(|agreed| self.deflater.frame(kind, payload, agreed.window()))
            .unwrap_or_else(|| frame::encode(kind, payload))
    }
}

/// The compressed forms of one shared frame (a publication's), each built the first time
/// a connection needs it and then shared like the frame itself. 56 bytes, and nothing
/// allocated until a compressed subscriber needs one.
#[derive(Debug, Default)]
pub struct SharedDeflate {
    /// Compressed with the widest window. Without context takeover no match reaches back
    /// past the message's own start, so this also suits any client whose window is at least
    /// as long as the message: nearly every one.
    wide: OnceLock<Option<Bytes>>,
    /// For a client whose window is shorter than the message, by zlib window bits 9..=14.
    narrow: OnceLock<Box<[OnceLock<Option<Bytes>>; 6]>>,
}

impl SharedDeflate {
    /// `plain` (an unmasked, final text or binary frame) compressed for a connection with
    /// `window`, or `None` to send `plain` itself: its payload is under the codec's
    /// `min_bytes`, or does not shrink.
    pub fn frame(&self, plain: &Bytes, window: WindowBits, codec: &mut Codec) -> Option<Bytes> {
        let (kind, payload) = data_payload(plain)?;
        if payload.len() < codec.min_bytes() {
            return None;
        }
        let window = window.for_message(payload.len());
        let cell = if window == WindowBits::MAX {
            &self.wide
        } else {
            let narrow = self.narrow.get_or_init(Box::default);
            &narrow[usize::from(window.zlib_bits() - 9)]
        };
        cell.get_or_init(|| codec.deflater.frame(kind, payload, window))
            .clone()
    }
}

/// The kind and payload of an unmasked, final, uncompressed data frame; `None` for anything
/// else.
fn data_payload(frame: &[u8]) -> Option<(Kind, &[u8])> {
    let (&b0, &b1) = (frame.first()?, frame.get(1)?);
    // FIN, no RSV bits; then the opcode.
    let kind = match b0 {
        0x81 => Kind::Text,
        0x82 => Kind::Binary,
        _ => return None,
    };
    if b1 & 0x80 != 0 {
        return None;
    }
    let (len, at) = match b1 & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes([*frame.get(2)?, *frame.get(3)?])),
            4,
        ),
        127 => {
            let raw: [u8; 8] = frame.get(2..10)?.try_into().ok()?;
            (usize::try_from(u64::from_be_bytes(raw)).ok()?, 10)
        }
        n => (usize::from(n), 2),
    };
    let payload = frame.get(at..)?;
    (payload.len() == len).then_some((kind, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(values: &[&str]) -> Option<Agreed> {
        negotiate(values.iter().map(|v| v.as_bytes()))
    }

    fn window(bits: u8) -> WindowBits {
        WindowBits::new(bits).unwrap()
    }

    const PLAIN: Agreed = Agreed {
        server_max_window_bits: None,
    };

    #[test]
    fn accepted_offers_and_their_answers() {
        for value in [
            "permessage-deflate",
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; client_no_context_takeover; client_max_window_bits=10",
            "permessage-deflate;server_no_context_takeover",
            "Permessage-Deflate ; Client_Max_Window_Bits",
            "x-webkit-deflate-frame, permessage-deflate",
            " , permessage-deflate ,",
            "permessage-deflate; client_max_window_bits=\"12\"",
        ] {
            assert_eq!(offer(&[value]), Some(PLAIN), "{value}");
        }
        assert_eq!(
            PLAIN.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        let asked = offer(&["permessage-deflate; server_max_window_bits=10"]).unwrap();
        assert_eq!(asked.window(), window(10));
        assert_eq!(
            asked.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=10"
        );
        let quoted = offer(&["permessage-deflate; server_max_window_bits=\"8\""]).unwrap();
        assert_eq!(quoted.window(), window(8));
        // Several header lines are one list, in order.
        assert_eq!(
            offer(&["foo", "permessage-deflate; server_max_window_bits=9"]).map(Agreed::window),
            Some(window(9))
        );
    }

    #[test]
    fn invalid_offers_are_declined_and_the_next_one_taken() {
        for bad in [
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover=\"x\"",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=08",
            "permessage-deflate; server_max_window_bits=+9",
            "permessage-deflate; client_max_window_bits=1x",
            "permessage-deflate; client_max_window_bits; client_max_window_bits",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; mux",
            "deflate-frame",
        ] {
            assert_eq!(offer(&[bad]), None, "{bad}");
            let two = format!("{bad}, permessage-deflate; server_max_window_bits=11");
            assert_eq!(
                offer(&[&two]).map(Agreed::window),
                Some(window(11)),
                "{two}"
            );
        }
    }

    #[test]
    fn malformed_headers_negotiate_nothing() {
        for bad in [
            "permessage-deflate;",
            "permessage-deflate; =1",
            "permessage-deflate; a=",
            "permessage-deflate; a=\"unterminated",
            "permessage-deflate permessage-deflate",
            "permessage-deflate; a=b c",
            "permessage-deflate; client_max_window_bits=\"1\\",
            "permessage-deflate; client_max_window_bits=\"\"",
            "\u{7f}",
        ] {
            assert_eq!(offer(&[bad]), None, "{bad}");
            // Even with a good offer before it: the header is not guessed at.
            assert_eq!(offer(&["permessage-deflate", bad]), None, "{bad}");
        }
    }

    /// A frame's payload compressed by us inflates, with another implementation, to what
    /// was compressed.
    #[test]
    fn compressed_frames_inflate_with_an_independent_inflater() {
        let json = br#"{"type":"event","topic":"config:prod","data":{"feature":true}}"#.repeat(40);
        let frame = Deflater::default()
            .frame(Kind::Text, &json, WindowBits::MAX)
            .unwrap();
        assert_eq!(frame[0], 0xC1, "FIN, RSV1, text");
        let (_, payload) = strip_header(&frame);
        assert!(payload.len() < json.len() / 4, "{} bytes", payload.len());
        let mut stream = payload.to_vec();
        // The tail, then an empty final block (BFINAL, fixed codes, end of block).
        stream.extend_from_slice(&TAIL);
        stream.extend_from_slice(&[0x03, 0x00]);
        let inflated = miniz_oxide::inflate::decompress_to_vec(&stream).unwrap();
        assert_eq!(inflated, json);
    }

    #[test]
    fn incompressible_payloads_are_not_compressed() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..2000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(
            Deflater::default().frame(Kind::Binary, &noise, WindowBits::MAX),
            None
        );
    }

    #[test]
    fn inflates_what_an_independent_deflater_made() {
        let text = "tidings ".repeat(1000);
        let raw = miniz_oxide::deflate::compress_to_vec(text.as_bytes(), 6);
        let mut inflater = Inflater::default();
        // A final block, as miniz ends its stream, and twice: no state is kept.
        for _ in 0..2 {
            assert_eq!(inflater.inflate(&raw, 1 << 16).unwrap(), text.as_bytes());
        }
        // Our own sync-flushed stream, tail removed.
        let frame = Deflater::default()
            .frame(Kind::Text, text.as_bytes(), WindowBits::MAX)
            .unwrap();
        let (_, payload) = strip_header(&frame);
        assert_eq!(
            inflater.inflate(payload, text.len()).unwrap(),
            text.as_bytes()
        );
        assert_eq!(
            inflater.inflate(payload, text.len() - 1),
            Err(ProtocolViolation::TooBig)
        );
        // An empty message: one empty stored block.
        assert_eq!(inflater.inflate(&[0x00], 10).unwrap(), b"");
    }

    #[test]
    fn an_inflate_bomb_stops_at_the_limit() {
        let zeros = vec![0u8; 50 << 20];
        let bomb = miniz_oxide::deflate::compress_to_vec(&zeros, 9);
        assert!(bomb.len() < 100 << 10, "{} bytes", bomb.len());
        let mut inflater = Inflater::default();
        assert_eq!(
            inflater.inflate(&bomb, 64 << 10),
            Err(ProtocolViolation::TooBig)
        );
        // The inflater is fine for the next message.
        let ok = miniz_oxide::deflate::compress_to_vec(b"hello", 6);
        assert_eq!(inflater.inflate(&ok, 64 << 10).unwrap(), b"hello");
    }

    #[test]
    fn garbage_does_not_inflate() {
        let mut inflater = Inflater::default();
        for bad in [&[0xff, 0xff, 0xff][..], &[0x07], &[0x03, 0x00, 0x41]] {
            assert_eq!(
                inflater.inflate(bad, 1 << 16),
                Err(ProtocolViolation::BadDeflate),
                "{bad:?}"
            );
        }
    }

    /// Inflates `frame`'s payload through a circular window of `size` bytes (miniz's
    /// wrapping output buffer), as a client with that window would: a match reaching
    /// further back reads overwritten bytes, so the output comes out wrong (or miniz
    /// refuses it: `None`).
    fn inflate_through_window(frame: &[u8], size: usize) -> Option<Vec<u8>> {
        use miniz_oxide::inflate::TINFLStatus;
        use miniz_oxide::inflate::core::{DecompressorOxide, decompress};
        let (_, payload) = strip_header(frame);
        let mut stream = payload.to_vec();
        // The tail, then an empty final block so the stream ends.
        stream.extend_from_slice(&TAIL);
        stream.extend_from_slice(&[0x03, 0x00]);
        let mut r = DecompressorOxide::new();
        let mut window = vec![0u8; size];
        let (mut out, mut at, mut pos) = (Vec::new(), 0, 0);
        loop {
            let (status, used, written) = decompress(&mut r, &stream[at..], &mut window, pos, 0);
            out.extend_from_slice(&window[pos..pos + written]);
            pos = (pos + written) % size;
            at += used;
            match status {
                TINFLStatus::Done => return Some(out),
                TINFLStatus::HasMoreOutput => {}
                _ => return None,
            }
        }
    }

    /// A narrow window is honoured: the 8- and 9-bit streams inflate through 256- and
    /// 512-byte windows, and the 15-bit one does not (which proves the check has teeth).
    #[test]
    fn narrow_windows_reach_back_no_further() {
        let mut data = Vec::new();
        let block: Vec<u8> = (0..700u32).map(|i| (i * 7 % 251) as u8).collect();
        for _ in 0..4 {
            data.extend_from_slice(&block);
        }
        let mut deflater = Deflater::default();
        let nine = deflater.frame(Kind::Binary, &data, window(9)).unwrap();
        assert_eq!(inflate_through_window(&nine, 512), Some(data.clone()));
        let eight = deflater.frame(Kind::Binary, &data, window(8)).unwrap();
        assert_eq!(inflate_through_window(&eight, 256), Some(data.clone()));
        let wide = deflater
            .frame(Kind::Binary, &data, WindowBits::MAX)
            .unwrap();
        assert_eq!(inflate_through_window(&wide, 1 << 15), Some(data.clone()));
        assert_ne!(
            inflate_through_window(&wide, 512),
            Some(data),
            "a 15-bit stream reaches back 700 bytes"
        );
    }

    #[test]
    fn shared_frames_are_compressed_once_per_window_that_needs_one() {
        let json = br#"{"k":"value","n":12345}"#.repeat(100);
        let plain = frame::encode(Kind::Text, &json);
        let shared = SharedDeflate::default();
        let mut codec = Codec::new(1024);
        let first = shared.frame(&plain, WindowBits::MAX, &mut codec).unwrap();
        let again = shared.frame(&plain, WindowBits::MAX, &mut codec).unwrap();
        assert_eq!(
            first.as_ptr(),
            again.as_ptr(),
            "one compressed frame, shared"
        );
        // A 12-bit client's window holds the whole message: it shares the wide frame.
        let twelve = shared.frame(&plain, window(12), &mut codec).unwrap();
        assert_eq!(twelve.as_ptr(), first.as_ptr());
        // A 9-bit one does not: it gets its own, once.
        let nine = shared.frame(&plain, window(9), &mut codec).unwrap();
        assert_ne!(nine.as_ptr(), first.as_ptr());
        let eight = shared.frame(&plain, window(8), &mut codec).unwrap();
        assert_eq!(
            eight.as_ptr(),
            nine.as_ptr(),
            "8 and 9 share zlib's 9-bit stream"
        );
        // Under the threshold, nothing is compressed.
        let small = frame::encode(Kind::Text, &json[..1000]);
        assert_eq!(
            SharedDeflate::default().frame(&small, WindowBits::MAX, &mut codec),
            None
        );
        assert_eq!(codec.encode(Kind::Text, &json[..1000], Some(PLAIN)), small);
        assert_eq!(codec.encode(Kind::Text, &json, None), plain);
        assert_eq!(codec.encode(Kind::Text, &json, Some(PLAIN)), first);
    }

    #[test]
    fn recent_shared_frames_are_compressed_once_and_bounded() {
        let mut codec = Codec::new(100);
        let snapshot = frame::encode(Kind::Text, &br#"{"doc":"state"}"#.repeat(50));
        let first = codec.shared(&snapshot, WindowBits::MAX).unwrap();
        let again = codec.shared(&snapshot.clone(), WindowBits::MAX).unwrap();
        assert_eq!(first.as_ptr(), again.as_ptr(), "compressed once");
        // Equal bytes elsewhere are another frame: compressed again (and right).
        let copy = Bytes::copy_from_slice(&snapshot);
        let other = codec.shared(&copy, WindowBits::MAX).unwrap();
        assert_ne!(other.as_ptr(), first.as_ptr());
        assert_eq!(other, first);
        for i in 0..3 * RECENT_FRAMES {
            let frame = frame::encode(Kind::Text, format!("{i:>500}").as_bytes());
            codec.shared(&frame, window(9));
        }
        assert_eq!(codec.recent.len(), RECENT_FRAMES);
        let held: usize = codec
            .recent
            .iter()
            .map(|r| r.plain.len() + r.packed.as_ref().map_or(0, Bytes::len))
            .sum();
        assert_eq!(held, codec.recent_bytes);
        // Too large to keep: compressed, not kept.
        let huge = frame::encode(Kind::Text, &vec![b'a'; RECENT_BYTES]);
        assert!(codec.shared(&huge, WindowBits::MAX).is_some());
        assert!(codec.recent_bytes <= RECENT_BYTES);
        assert!(codec.recent.iter().all(|r| r.plain.len() < RECENT_BYTES));
        // Under the threshold or not data: plain.
        assert_eq!(
            codec.shared(&frame::encode(Kind::Text, b"small"), WindowBits::MAX),
            None
        );
        assert_eq!(
            codec.shared(&frame::encode(Kind::Ping, b""), WindowBits::MAX),
            None
        );
    }

    #[test]
    fn only_plain_final_data_frames_are_shared_compressed() {
        assert_eq!(data_payload(&frame::encode(Kind::Ping, b"x")), None);
        assert_eq!(data_payload(&[0x81]), None);
        assert_eq!(data_payload(&[0x81, 0x05, b'a']), None);
        let long = frame::encode(Kind::Binary, &[7; 70_000]);
        assert_eq!(
            data_payload(&long).map(|(k, p)| (k, p.len())),
            Some((Kind::Binary, 70_000))
        );
    }

    #[test]
    fn the_shared_state_stays_small() {
        assert_eq!(std::mem::size_of::<SharedDeflate>(), 56);
        assert_eq!(std::mem::size_of::<Option<Agreed>>(), 2);
    }

    proptest::proptest! {
        /// Arbitrary header values never panic the negotiation, and what it agrees is a
        /// window the RFC allows.
        #[test]
        fn arbitrary_offers_never_panic(value in "[ -~]{0,80}") {
            if let Some(agreed) = negotiate([value.as_bytes()]) {
                proptest::prop_assert!((8..=15).contains(&agreed.window().get()));
            }
        }

        /// Arbitrary bytes inflate or fail, never past the limit; a compressed payload of
        /// any data inflates back to it.
        #[test]
        fn inflation_is_bounded_and_round_trips(
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            data in proptest::collection::vec(0u8..4, 0..3000),
        ) {
            let mut inflater = Inflater::default();
            if let Ok(out) = inflater.inflate(&junk, 1000) {
                proptest::prop_assert!(out.len() <= 1000);
            }
            if let Some(frame) = Deflater::default().frame(Kind::Binary, &data, WindowBits::MAX) {
                let (_, payload) = strip_header(&frame);
                proptest::prop_assert_eq!(inflater.inflate(payload, data.len()).unwrap(), data);
            }
        }
    }

    fn strip_header(frame: &[u8]) -> (u8, &[u8]) {
        let at = match frame[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        (frame[0], &frame[at..])
    }
}
