//! WebSocket frames: parsing client frames, reassembling messages, encoding server frames.
//!
//! The header layout is tungstenite's (`FrameHeader::parse` / `format`); everything tungstenite
//! keeps per connection (a 128 KiB read buffer, an output buffer) is replaced by the caller's
//! buffers: [`parse`] works on whatever bytes the caller has, consumes nothing when a frame is
//! incomplete, and unmasks the payload in place.

use std::io::Cursor;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{CloseCode as WireCloseCode, Control, Data, OpCode};

use super::close::{CloseCode, ProtocolViolation};

/// RFC 6455 §5.5: "All control frames MUST have a payload length of 125 bytes or less".
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Longest frame header: 2 bytes, 8 bytes of extended length, 4 bytes of mask.
pub const MAX_HEADER_LEN: usize = 14;

/// What kind of frame was parsed, reduced to what the connection acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// First frame of a text message.
    Text,
    /// First frame of a binary message.
    Binary,
    /// A continuation frame.
    Continuation,
    /// Close control frame.
    Close,
    /// Ping control frame.
    Ping,
    /// Pong control frame.
    Pong,
}

/// A complete, validated and unmasked client frame inside the caller's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFrame {
    /// Frame kind.
    pub kind: Kind,
    /// FIN bit.
    pub fin: bool,
    /// Where the (now unmasked) payload lies in the buffer.
    pub payload: Range<usize>,
    /// Bytes of the buffer this frame occupies, header included.
    pub len: usize,
    /// RSV1 on the first frame of a data message: the message is compressed
    /// (permessage-deflate, RFC 7692 §6). Only [`parse_with`] with `deflate` ever sets it.
    pub compressed: bool,
}

/// Parses one client frame at the start of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame (nothing is consumed or changed),
/// `Ok(Some(frame))` with the payload unmasked in place, or the violation to close with.
/// `max_payload` bounds a single frame so that a peer cannot make us buffer an announced
/// 2^63-byte frame: the check happens as soon as the header is complete.
pub fn parse(buf: &mut [u8], max_payload: usize) -> Result<Option<ParsedFrame>, ProtocolViolation> {
    parse_with(buf, max_payload, false)
}

/// [`parse`] on a connection that negotiated permessage-deflate when `deflate` is true:
/// RSV1 then marks a compressed message on its first frame (RFC 7692 §6) and is a
/// violation anywhere else.
pub fn parse_with(
    buf: &mut [u8],
    max_payload: usize,
    deflate: bool,
) -> Result<Option<ParsedFrame>, ProtocolViolation> {
    let mut cursor = Cursor::new(&*buf);
    let (header, length) = match FrameHeader::parse(&mut cursor) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return Ok(None),
        // tungstenite rejects reserved opcodes while parsing the header.
        Err(_) => return Err(ProtocolViolation::ReservedOpcode),
    };
    let header_len = cursor.position() as usize;
    // §5.2: "the most significant bit MUST be 0" for the 64-bit length.
    if length >> 63 != 0 {
        return Err(ProtocolViolation::LengthTopBit);
    }
    // §5.2: RSV1-3 "MUST be 0 unless an extension is negotiated that defines meanings for
    // non-zero values"; permessage-deflate defines RSV1 only.
    if header.rsv2 || header.rsv3 || (header.rsv1 && !deflate) {
        return Err(ProtocolViolation::ReservedBits);
    }
    let kind = match header.opcode {
        OpCode::Data(Data::Text) => Kind::Text,
        OpCode::Data(Data::Binary) => Kind::Binary,
        OpCode::Data(Data::Continue) => Kind::Continuation,
        OpCode::Control(Control::Close) => Kind::Close,
        OpCode::Control(Control::Ping) => Kind::Ping,
        OpCode::Control(Control::Pong) => Kind::Pong,
        OpCode::Data(Data::Reserved(_)) | OpCode::Control(Control::Reserved(_)) => {
            return Err(ProtocolViolation::ReservedOpcode);
        }
    };
    // RFC 7692 §6.1: "An endpoint MUST NOT set the "Per-Message Compressed" bit of control
    // frames and non-first fragments of a data message."
    if header.rsv1 && !matches!(kind, Kind::Text | Kind::Binary) {
        return Err(ProtocolViolation::MisplacedCompressedBit);
    }
    if matches!(kind, Kind::Close | Kind::Ping | Kind::Pong) {
        // §5.5: control frames "MUST have a payload length of 125 bytes or less and MUST NOT
        // be fragmented."
        if !header.is_final {
            return Err(ProtocolViolation::FragmentedControl);
        }
        if length > MAX_CONTROL_PAYLOAD as u64 {
            return Err(ProtocolViolation::ControlTooLong);
        }
    }
    // §5.1: "The server MUST close the connection upon receiving a frame that is not masked."
    let Some(mask) = header.mask else {
        return Err(ProtocolViolation::Unmasked);
    };
    if length > max_payload as u64 {
        return Err(ProtocolViolation::TooBig);
    }
    let total = header_len + length as usize;
    if buf.len() < total {
        return Ok(None);
    }
    unmask(&mut buf[header_len..total], mask);
    Ok(Some(ParsedFrame {
        kind,
        fin: header.is_final,
        payload: header_len..total,
        len: total,
        compressed: header.rsv1,
    }))
}

/// XORs `data` with the 4-byte masking key (RFC 6455 §5.3), a word at a time.
pub fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes(chunk.try_into().unwrap_or([0; 8])) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// A message being reassembled from fragments; exists only while a message is fragmented.
#[derive(Debug)]
pub struct Fragments {
    text: bool,
    /// The message is compressed: `data` holds DEFLATE bytes, judged once inflated.
    compressed: bool,
    data: Vec<u8>,
    /// Prefix of `data` already known to be valid UTF-8 (text only).
    checked: usize,
}

/// A complete data message.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message, validated as UTF-8.
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

impl Fragments {
    /// Starts reassembly with the first (non-final) frame's payload.
    pub fn start(text: bool, payload: &[u8]) -> Result<Box<Fragments>, ProtocolViolation> {
        Fragments::start_with(text, false, payload)
    }

    /// Starts reassembly of a message that is compressed (`compressed`) or not. A
    /// compressed message's fragments are kept as they came; its UTF-8 is checked once it
    /// is inflated.
    pub fn start_with(
        text: bool,
        compressed: bool,
        payload: &[u8],
    ) -> Result<Box<Fragments>, ProtocolViolation> {
        let mut f = Box::new(Fragments {
            text,
            compressed,
            data: Vec::with_capacity(payload.len() * 2),
            checked: 0,
        });
        f.push(payload, usize::MAX)?;
        Ok(f)
    }

    /// Appends a continuation's payload, failing fast on invalid UTF-8 (§8.1) or size.
    pub fn push(&mut self, payload: &[u8], max_message: usize) -> Result<(), ProtocolViolation> {
        if self.data.len() + payload.len() > max_message {
            return Err(ProtocolViolation::TooBig);
        }
        self.data.extend_from_slice(payload);
        if self.text && !self.compressed {
            match std::str::from_utf8(&self.data[self.checked..]) {
                Ok(_) => self.checked = self.data.len(),
                // An incomplete sequence at the end may be completed by the next fragment.
                Err(e) if e.error_len().is_none() => self.checked += e.valid_up_to(),
                Err(_) => return Err(ProtocolViolation::InvalidUtf8),
            }
        }
        Ok(())
    }

    /// Bytes held for the message so far (its buffer's capacity).
    pub fn held(&self) -> usize {
        self.data.capacity()
    }

    /// Whether it is a text message.
    pub fn is_text(&self) -> bool {
        self.text
    }

    /// Whether it is compressed: [`Fragments::data`] must be inflated, then judged.
    pub fn is_compressed(&self) -> bool {
        self.compressed
    }

    /// The payload bytes so far, as they came (compressed or not).
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The complete message, once the final fragment has been pushed.
    pub fn finish(&self) -> Result<Message<'_>, ProtocolViolation> {
        if !self.text {
            return Ok(Message::Binary(&self.data));
        }
        std::str::from_utf8(&self.data)
            .map(Message::Text)
            .map_err(|_| ProtocolViolation::InvalidUtf8)
    }
}

/// Validates a single-frame message.
pub fn whole_message(text: bool, payload: &[u8]) -> Result<Message<'_>, ProtocolViolation> {
    if !text {
        return Ok(Message::Binary(payload));
    }
    std::str::from_utf8(payload)
        .map(Message::Text)
        .map_err(|_| ProtocolViolation::InvalidUtf8)
}

/// Parses a close frame's payload: nothing, or a 2-byte code and a UTF-8 reason (§5.5.1).
pub fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, ProtocolViolation> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolViolation::CloseOneByte),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            // §7.4: 1004-1006 and 1015 must not be sent; below 1000 and 1016-2999 are unassigned.
            if !WireCloseCode::from(code).is_allowed() || (1016..3000).contains(&code) {
                return Err(ProtocolViolation::InvalidCloseCode);
            }
            let reason = std::str::from_utf8(reason).map_err(|_| ProtocolViolation::InvalidUtf8)?;
            Ok(Some((code, reason)))
        }
    }
}

/// Encodes an unmasked server frame with `payload` into one contiguous buffer.
pub fn encode(kind: Kind, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(MAX_HEADER_LEN + payload.len());
    write_header(&mut out, kind, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// Writes the header of an unmasked, final server frame of `len` payload bytes.
pub fn write_header(out: &mut BytesMut, kind: Kind, len: usize) {
    let mut raw = [0u8; MAX_HEADER_LEN];
    let n = format_header(&mut raw, kind, len, false);
    out.put_slice(&raw[..n]);
}

/// Formats the header of an unmasked, final server frame of `len` payload bytes at the
/// start of `raw`, with RSV1 set for a compressed message; returns its length. Written by
/// hand (RFC 6455 §5.2): it is on every publication's path. A test checks it against
/// tungstenite's `FrameHeader::format`.
pub fn format_header(raw: &mut [u8; MAX_HEADER_LEN], kind: Kind, len: usize, rsv1: bool) -> usize {
    let opcode: u8 = match kind {
        Kind::Continuation => 0x0,
        Kind::Text => 0x1,
        Kind::Binary => 0x2,
        Kind::Close => 0x8,
        Kind::Ping => 0x9,
        Kind::Pong => 0xA,
    };
    raw[0] = 0x80 | if rsv1 { 0x40 } else { 0 } | opcode;
    if len < 126 {
        raw[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        raw[1] = 126;
        raw[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        raw[1] = 127;
        raw[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Encodes a close frame with `code` and a reason cut to fit the 125-byte control limit.
pub fn encode_close(code: CloseCode, reason: &str) -> Bytes {
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.as_u16().to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode(Kind::Close, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_match_tungstenite() {
        for kind in [
            Kind::Continuation,
            Kind::Text,
            Kind::Binary,
            Kind::Close,
            Kind::Ping,
            Kind::Pong,
        ] {
            for (len, rsv1) in [0usize, 1, 125, 126, 127, 65_535, 65_536, 1 << 20]
                .into_iter()
                .flat_map(|len| [(len, false), (len, true)])
            {
                let mut raw = [0u8; MAX_HEADER_LEN];
                let n = format_header(&mut raw, kind, len, rsv1);
                let ours = &raw[..n];
                let opcode = match kind {
                    Kind::Text => OpCode::Data(Data::Text),
                    Kind::Binary => OpCode::Data(Data::Binary),
                    Kind::Continuation => OpCode::Data(Data::Continue),
                    Kind::Close => OpCode::Control(Control::Close),
                    Kind::Ping => OpCode::Control(Control::Ping),
                    Kind::Pong => OpCode::Control(Control::Pong),
                };
                let header = FrameHeader {
                    is_final: true,
                    rsv1,
                    rsv2: false,
                    rsv3: false,
                    opcode,
                    mask: None,
                };
                let mut theirs = Vec::new();
                header.format(len as u64, &mut theirs).unwrap();
                assert_eq!(ours, &theirs[..], "{kind:?} {len} {rsv1}");
            }
        }
    }

    /// A client frame: FIN + opcode, masked with a fixed key.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn parses_and_unmasks_rfc_example() {
        // RFC 6455 §5.7: a single-frame masked text message "Hello".
        let mut buf = vec![
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let f = parse(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((f.kind, f.fin, f.len), (Kind::Text, true, 11));
        assert_eq!(&buf[f.payload], b"Hello");
    }

    #[test]
    fn incomplete_consumes_nothing() {
        let full = client_frame(0x81, &[b'x'; 300]);
        for cut in 0..full.len() {
            let mut part = full[..cut].to_vec();
            assert_eq!(parse(&mut part, 1024), Ok(None), "cut at {cut}");
            assert_eq!(part, full[..cut], "buffer changed at {cut}");
        }
    }

    #[test]
    fn violations() {
        let cases: Vec<(Vec<u8>, ProtocolViolation)> = vec![
            (
                vec![0x81, 0x05, b'h', b'e', b'l', b'l', b'o'],
                ProtocolViolation::Unmasked,
            ),
            (client_frame(0xC1, b"x"), ProtocolViolation::ReservedBits),
            (client_frame(0x83, b"x"), ProtocolViolation::ReservedOpcode),
            (client_frame(0x8B, b"x"), ProtocolViolation::ReservedOpcode),
            (
                client_frame(0x09, b"x"),
                ProtocolViolation::FragmentedControl,
            ),
            (
                client_frame(0x89, &[0; 126]),
                ProtocolViolation::ControlTooLong,
            ),
            (client_frame(0x82, &[0; 2000]), ProtocolViolation::TooBig),
            (
                vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
                ProtocolViolation::LengthTopBit,
            ),
        ];
        for (mut frame, want) in cases {
            assert_eq!(parse(&mut frame, 1024), Err(want));
        }
    }

    #[test]
    fn utf8_split_across_fragments() {
        let euro = "€".as_bytes();
        let mut f = Fragments::start(true, &euro[..1]).unwrap();
        f.push(&euro[1..], 100).unwrap();
        assert_eq!(f.finish(), Ok(Message::Text("€")));

        let mut bad = Fragments::start(true, b"ok").unwrap();
        assert_eq!(bad.push(&[0xff], 100), Err(ProtocolViolation::InvalidUtf8));
        // A dangling lead byte is only an error once the message ends.
        let dangling = Fragments::start(true, &euro[..2]).unwrap();
        assert_eq!(dangling.finish(), Err(ProtocolViolation::InvalidUtf8));
    }

    #[test]
    fn close_payloads() {
        assert_eq!(parse_close(&[]), Ok(None));
        assert_eq!(parse_close(&[3]), Err(ProtocolViolation::CloseOneByte));
        assert_eq!(
            parse_close(&[0x03, 0xe8, b'o', b'k']),
            Ok(Some((1000, "ok")))
        );
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            let p = code.to_be_bytes();
            assert_eq!(
                parse_close(&p),
                Err(ProtocolViolation::InvalidCloseCode),
                "{code}"
            );
        }
        for code in [1000u16, 1001, 1003, 1007, 1011, 3000, 4999] {
            assert!(parse_close(&code.to_be_bytes()).is_ok(), "{code}");
        }
        assert_eq!(
            parse_close(&[0x03, 0xe8, 0xff]),
            Err(ProtocolViolation::InvalidUtf8)
        );
    }

    #[test]
    fn encodes_every_length_form() {
        for n in [0usize, 125, 126, 65535, 65536] {
            let frame = encode(Kind::Text, &vec![b'a'; n]);
            let mut cursor = Cursor::new(&frame[..]);
            let (h, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert_eq!(len as usize, n);
            assert!(h.is_final && h.mask.is_none());
            assert_eq!(frame.len(), cursor.position() as usize + n);
        }
        let close = encode_close(CloseCode::TryAgainLater, &"é".repeat(100));
        assert_eq!(close.len(), 2 + 2 + 122);
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the parser, and what it reports lies in the buffer.
        #[test]
        fn arbitrary_bytes_parse_safely(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut buf = data.clone();
            match parse(&mut buf, 128) {
                Ok(Some(f)) => {
                    proptest::prop_assert!(f.len <= buf.len() && f.payload.end == f.len);
                    let payload = &buf[f.payload];
                    let _ = whole_message(f.kind == Kind::Text, payload);
                    let _ = parse_close(payload);
                }
                Ok(None) => proptest::prop_assert_eq!(&buf, &data),
                Err(v) => { let _ = v.close_code(); }
            }
        }

        /// A masked client frame of any payload parses back to that payload.
        #[test]
        fn masked_frames_round_trip(
            len in proptest::prop_oneof![0usize..300, 65_530usize..65_540],
            seed in proptest::prelude::any::<u8>(),
        ) {
            let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            let mut buf = client_frame(0x82, &payload);
            let f = parse(&mut buf, 1 << 20).unwrap().unwrap();
            proptest::prop_assert_eq!(&buf[f.payload], &payload[..]);
        }

        /// Fragment reassembly accepts exactly the valid UTF-8, however it is split.
        #[test]
        fn fragmented_utf8_is_judged_whole(text in ".{0,40}", bad in proptest::prelude::any::<bool>(), cut in 0usize..200) {
            let mut bytes = text.into_bytes();
            if bad {
                bytes.push(0xff);
            }
            let cut = cut.min(bytes.len());
            let result = Fragments::start(true, &bytes[..cut])
                .and_then(|mut f| f.push(&bytes[cut..], usize::MAX).map(|()| f))
                .and_then(|f| f.finish().map(|_| ()));
            proptest::prop_assert_eq!(result.is_ok(), std::str::from_utf8(&bytes).is_ok());
        }
    }

    #[test]
    fn unmask_matches_bytewise() {
        let mask = [1, 2, 3, 4];
        for n in 0..40 {
            let data: Vec<u8> = (0..n as u8).collect();
            let mut fast = data.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }
}
