//! One WebSocket session, sans-IO: the close handshake, the partial frame, fragment
//! reassembly, the heartbeat and the close deadline, with no socket and no clock.
//!
//! The shape is quinn-proto's. Input comes through [`Session::handle_bytes`] (bytes read,
//! with the current tick) and [`Session::handle_timeout`] (a timer came due); output goes
//! into a caller-provided `Vec<Output>`: complete messages for the application and frames
//! owed to the peer (pongs, the close echo, echoed messages), in the order they arose.
//! The shard owns the socket, the outbox and the timer wheel; tests drive a session with
//! in-memory bytes and a tick counter, so heartbeats and close handshakes run in virtual
//! time.
//!
//! While idle a session owns no buffer: `partial` is empty (unallocated) between frames
//! and `fragments` is `None` between messages. With permessage-deflate agreed, a compressed
//! message is inflated whole, once complete, by the owner's [`Codec`] (shared by all its
//! sessions), so no inflate state outlives a message either.

use std::num::NonZeroU64;

use bytes::Bytes;

use super::deflate::{Agreed, Codec};
use super::frame::{self, Fragments, Kind, Message};
use super::{CloseCode, ProtocolViolation};
use crate::heartbeat::{self, Action, Beat};

/// Message limit of the echo endpoint: Autobahn's 9.* cases send 16 MiB messages.
pub const ECHO_MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// What the session serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The tidings protocol: text messages are requests, binary ones a violation.
    Gateway,
    /// Echo every data message back (conformance testing).
    Echo,
}

/// Where a connection's close stands; shared by every transport (an SSE stream only ever
/// is `Open`, `Closing` or `Broken`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Messages flow both ways.
    Open,
    /// We sent a close frame and wait for the peer's; its other frames are still read.
    CloseSent,
    /// Nothing more is read: the peer's close came (ours is queued), or we broke off after
    /// a protocol violation, or the stream ended. It ends once its queue is flushed.
    Closing,
    /// Nothing more can be written (the socket failed, or the peer is gone): end now.
    Broken,
}

impl Phase {
    /// Whether messages are still accepted both ways.
    pub fn is_open(self) -> bool {
        self == Phase::Open
    }

    /// Whether the connection ends as soon as its queue is flushed.
    pub fn ends_when_flushed(self) -> bool {
        self == Phase::Closing
    }

    /// Whether inbound bytes are still read and handled.
    pub fn reads(self) -> bool {
        matches!(self, Phase::Open | Phase::CloseSent)
    }
}

/// What a session gives its owner, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// A complete text message of the tidings protocol.
    Message(String),
    /// A frame to queue for the peer (a pong, an echoed message).
    Send(Bytes),
    /// A close frame: drop what is queued (but finish a partly written frame), then send it.
    Close {
        /// The close frame.
        frame: Bytes,
        /// Whether it answers a protocol violation (rather than the peer's close, or a
        /// heartbeat timeout).
        violation: bool,
    },
}

/// The heartbeat and close timing, in ticks of the owner's wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A silent connection is pinged after this long; 0 disables heartbeats.
    pub interval: u32,
    /// A pinged connection that stays silent this long is closed.
    pub timeout: u32,
    /// A close handshake that takes longer is cut off.
    pub close: u32,
}

/// What a timer that came due asks of the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Nothing now; look again at this tick.
    At(u64),
    /// Send a ping (and a JSON ping if configured), then look again at this tick.
    Ping(u64),
    /// Silent past the pong timeout: `Output::Close` was produced with 1011; the close
    /// deadline follows.
    PongTimeout,
    /// The close handshake did not finish in time: end the connection now.
    CloseTimeout,
    /// No timer is needed any more.
    Never,
}

/// The tick after which a closing connection is cut off, whatever its transport: armed
/// once, when the close starts. 8 bytes (ticks start at 1, so zero means "not armed").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CloseDeadline(Option<NonZeroU64>);

impl CloseDeadline {
    /// Arms it at `now` plus the close timeout, the first time only: returns the tick to
    /// be woken at then, and `None` after.
    pub fn arm(&mut self, now: u64, timing: &Timing) -> Option<u64> {
        if self.0.is_some() {
            return None;
        }
        let at = NonZeroU64::new(now + u64::from(timing.close)).unwrap_or(NonZeroU64::MIN);
        self.0 = Some(at);
        Some(at.get())
    }

    /// What a timer due at `now` means, when armed: the end, or another look at the
    /// deadline.
    pub fn check(self, now: u64) -> Option<Due> {
        let at = self.0?.get();
        Some(if now >= at {
            Due::CloseTimeout
        } else {
            Due::At(at)
        })
    }
}

/// A complete frame as the session sees it.
struct Received<'a> {
    kind: Kind,
    fin: bool,
    /// RSV1 on a message's first frame: the message is compressed.
    compressed: bool,
    payload: &'a [u8],
}

/// One WebSocket session's protocol state.
#[derive(Debug)]
pub struct Session {
    mode: Mode,
    phase: Phase,
    /// Bytes of an incomplete frame; empty (unallocated) between frames.
    partial: Vec<u8>,
    /// A fragmented message being reassembled.
    fragments: Option<Box<Fragments>>,
    beat: Beat,
    /// Tick of the last inbound bytes.
    last_seen: u64,
    /// Ticks by which this connection's heartbeat runs early ([`heartbeat::stagger`]).
    stagger: u32,
    /// When a closing session is cut off.
    close_deadline: CloseDeadline,
    /// permessage-deflate, if the handshake agreed it.
    deflate: Option<Agreed>,
}

impl Session {
    /// A new open session at tick `now`.
    pub fn new(mode: Mode, now: u64) -> Session {
        Session {
            mode,
            phase: Phase::Open,
            partial: Vec::new(),
            fragments: None,
            beat: Beat::Idle,
            last_seen: now,
            stagger: 0,
            close_deadline: CloseDeadline::default(),
            deflate: None,
        }
    }

    /// The session with its heartbeat running `early` ticks before the ping interval
    /// ([`heartbeat::stagger`]).
    pub fn with_stagger(mut self, early: u32) -> Session {
        self.stagger = early;
        self
    }

    /// The session with permessage-deflate as its handshake agreed (or not).
    pub fn with_deflate(mut self, deflate: Option<Agreed>) -> Session {
        self.deflate = deflate;
        self
    }

    /// permessage-deflate, if agreed: messages may then be sent compressed.
    pub fn deflate(&self) -> Option<Agreed> {
        self.deflate
    }

    /// What the session serves.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The close handshake's progress.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Largest message this session accepts, given the gateway's `max_message_bytes`.
    pub fn max_message(&self, configured: usize) -> usize {
        match self.mode {
            Mode::Gateway => configured,
            Mode::Echo => ECHO_MAX_MESSAGE,
        }
    }

    /// Bytes held for inbound data: an incomplete frame and a fragmented message.
    pub fn inbound_bytes(&self) -> usize {
        self.partial.capacity() + self.fragments.as_ref().map_or(0, |f| f.held())
    }

    /// Handles bytes read at tick `now`, unmasking them in place. Complete frames are served
    /// straight from `data`; only an incomplete trailing frame is copied (into `partial`).
    /// Compressed messages are inflated, and echoes compressed, with `codec`.
    pub fn handle_bytes(
        &mut self,
        data: &mut [u8],
        now: u64,
        max_message: usize,
        codec: &mut Codec,
        out: &mut Vec<Output>,
    ) {
        self.last_seen = now;
        if !self.phase.reads() {
            return;
        }
        if self.partial.is_empty() {
            if let Some(consumed) = self.process(data, max_message, codec, out) {
                self.partial.extend_from_slice(&data[consumed..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(data);
            if let Some(consumed) = self.process(&mut buf, max_message, codec, out) {
                buf.drain(..consumed);
                if !buf.is_empty() {
                    self.partial = buf;
                }
            }
        }
    }

    /// Handles every complete frame in `buf`; returns the bytes consumed, or `None` once
    /// input is no longer read (the rest is ignored).
    fn process(
        &mut self,
        buf: &mut [u8],
        max_message: usize,
        codec: &mut Codec,
        out: &mut Vec<Output>,
    ) -> Option<usize> {
        let mut pos = 0;
        while pos < buf.len() {
            if !self.phase.reads() {
                return None;
            }
            let deflate = self.deflate.is_some();
            let parsed = match frame::parse_with(&mut buf[pos..], max_message, deflate) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(v) => {
                    self.fail(v, out);
                    return None;
                }
            };
            let payload = &buf[pos + parsed.payload.start..pos + parsed.payload.end];
            pos += parsed.len;
            let frame = Received {
                kind: parsed.kind,
                fin: parsed.fin,
                compressed: parsed.compressed,
                payload,
            };
            if let Err(v) = self.on_frame(frame, max_message, codec, out) {
                self.fail(v, out);
                return None;
            }
        }
        Some(pos)
    }

    fn on_frame(
        &mut self,
        frame: Received<'_>,
        max_message: usize,
        codec: &mut Codec,
        out: &mut Vec<Output>,
    ) -> Result<(), ProtocolViolation> {
        let Received {
            kind,
            fin,
            compressed,
            payload,
        } = frame;
        match kind {
            Kind::Text | Kind::Binary => {
                // §5.4: a fragmented message's frames must not be interleaved with another.
                if self.fragments.is_some() {
                    return Err(ProtocolViolation::ExpectedContinuation);
                }
                let text = kind == Kind::Text;
                if !fin {
                    self.fragments = Some(Fragments::start_with(text, compressed, payload)?);
                } else if compressed {
                    let inflated = codec.inflater.inflate(payload, max_message)?;
                    let message = frame::whole_message(text, &inflated)?;
                    self.on_message(message, codec, out)?;
                } else {
                    let message = frame::whole_message(text, payload)?;
                    self.on_message(message, codec, out)?;
                }
            }
            Kind::Continuation => {
                let Some(fragments) = self.fragments.as_mut() else {
                    return Err(ProtocolViolation::UnexpectedContinuation);
                };
                fragments.push(payload, max_message)?;
                if fin && let Some(fragments) = self.fragments.take() {
                    if fragments.is_compressed() {
                        let inflated = codec.inflater.inflate(fragments.data(), max_message)?;
                        // The compressed fragments are let go before the message is served.
                        let text = fragments.is_text();
                        drop(fragments);
                        let message = frame::whole_message(text, &inflated)?;
                        self.on_message(message, codec, out)?;
                    } else {
                        self.on_message(fragments.finish()?, codec, out)?;
                    }
                }
            }
            Kind::Ping => {
                // §5.5.2: "Upon receipt of a Ping frame, an endpoint MUST send a Pong frame in
                // response [...] with identical Application data".
                if self.phase.is_open() {
                    out.push(Output::Send(frame::encode(Kind::Pong, payload)));
                }
            }
            Kind::Pong => {}
            Kind::Close => {
                let received = frame::parse_close(payload)?;
                match self.phase {
                    Phase::Open => {
                        // §5.5.1: answer with a close frame, echoing the status code.
                        let code = received.map_or(CloseCode::Normal, |(c, _)| CloseCode::Other(c));
                        out.push(Output::Close {
                            frame: frame::encode_close(code, ""),
                            violation: false,
                        });
                        self.phase = Phase::Closing;
                    }
                    // Our close was answered: the handshake is complete.
                    Phase::CloseSent => self.phase = Phase::Closing,
                    Phase::Closing | Phase::Broken => {}
                }
            }
        }
        Ok(())
    }

    fn on_message(
        &mut self,
        message: Message<'_>,
        codec: &mut Codec,
        out: &mut Vec<Output>,
    ) -> Result<(), ProtocolViolation> {
        if !self.phase.is_open() {
            return Ok(());
        }
        match (self.mode, message) {
            (Mode::Echo, Message::Text(text)) => {
                let echo = codec.encode(Kind::Text, text.as_bytes(), self.deflate);
                out.push(Output::Send(echo));
            }
            (Mode::Echo, Message::Binary(data)) => {
                out.push(Output::Send(codec.encode(Kind::Binary, data, self.deflate)));
            }
            (Mode::Gateway, Message::Text(text)) => out.push(Output::Message(text.to_owned())),
            (Mode::Gateway, Message::Binary(_)) => return Err(ProtocolViolation::Binary),
        }
        Ok(())
    }

    /// Fails the session after a protocol violation (RFC 6455 §7.1.7).
    fn fail(&mut self, violation: ProtocolViolation, out: &mut Vec<Output>) {
        tracing::debug!(%violation, "protocol violation");
        if self.phase.is_open() {
            out.push(Output::Close {
                frame: frame::encode_close(violation.close_code(), &violation.to_string()),
                violation: true,
            });
        }
        self.stop_reading();
    }

    /// Stops reading and lets go of inbound buffers; the session ends once flushed.
    fn stop_reading(&mut self) {
        if self.phase != Phase::Broken {
            self.phase = Phase::Closing;
        }
        self.partial = Vec::new();
        self.fragments = None;
    }

    /// Starts a close handshake from our side, if none is under way: returns the close
    /// frame to queue.
    pub fn close(&mut self, code: CloseCode, reason: &str) -> Option<Bytes> {
        if !self.phase.is_open() {
            return None;
        }
        self.phase = Phase::CloseSent;
        Some(frame::encode_close(code, reason))
    }

    /// Stops reading and, if still open, returns a 1013 close frame: the gateway holds too
    /// much half-received input, and this session's share is let go.
    pub fn shed_inbound(&mut self) -> Option<Bytes> {
        let frame = self.phase.is_open().then(|| {
            frame::encode_close(
                CloseCode::TryAgainLater,
                "gateway inbound buffers full; retry later",
            )
        });
        self.stop_reading();
        frame
    }

    /// Nothing more can be written: the socket failed or the peer is gone.
    pub fn break_off(&mut self) {
        self.phase = Phase::Broken;
        self.partial = Vec::new();
        self.fragments = None;
    }

    /// Arms the close deadline once a close is under way; returns the tick to be woken at,
    /// the first time only.
    pub fn arm_close_deadline(&mut self, now: u64, timing: &Timing) -> Option<u64> {
        if matches!(self.phase, Phase::Open | Phase::Broken) {
            return None;
        }
        self.close_deadline.arm(now, timing)
    }

    /// A timer of this session came due at tick `now`.
    pub fn handle_timeout(&mut self, now: u64, timing: &Timing, out: &mut Vec<Output>) -> Due {
        if let Some(due) = self.close_deadline.check(now) {
            return due;
        }
        if timing.interval == 0 || !self.phase.is_open() {
            return Due::Never;
        }
        match heartbeat::decide(
            &mut self.beat,
            now,
            self.last_seen,
            timing.interval.saturating_sub(self.stagger).max(1),
            timing.timeout,
        ) {
            Action::Recheck(at) => Due::At(at),
            Action::Ping(at) => Due::Ping(at),
            Action::Close => {
                if let Some(frame) = self.close(CloseCode::Internal, "ping timeout") {
                    out.push(Output::Close {
                        frame,
                        violation: false,
                    });
                }
                Due::PongTimeout
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::encode;

    const MAX: usize = 64 * 1024;
    const TIMING: Timing = Timing {
        interval: 30,
        timeout: 10,
        close: 5,
    };

    /// A client frame: masked, as RFC 6455 §5.3 requires.
    fn client_frame(kind: Kind, fin: bool, payload: &[u8]) -> Vec<u8> {
        let server = encode(kind, payload);
        let mut header = server[..server.len() - payload.len()].to_vec();
        if !fin {
            header[0] &= 0x7f;
        }
        header[1] |= 0x80;
        let mask = [1, 2, 3, 4];
        header.extend_from_slice(&mask);
        header.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        header
    }

    /// The server side of an in-memory pair: feeds client bytes at a tick, collects output.
    struct Pair {
        server: Session,
        codec: Codec,
        now: u64,
    }

    impl Pair {
        fn new(mode: Mode) -> Pair {
            Pair {
                server: Session::new(mode, 0),
                codec: Codec::new(16),
                now: 0,
            }
        }

        fn send(&mut self, bytes: &[u8]) -> Vec<Output> {
            let mut out = Vec::new();
            let mut bytes = bytes.to_vec();
            self.server
                .handle_bytes(&mut bytes, self.now, MAX, &mut self.codec, &mut out);
            out
        }

        fn advance_to(&mut self, tick: u64) -> (Due, Vec<Output>) {
            self.now = tick;
            let mut out = Vec::new();
            let due = self.server.handle_timeout(tick, &TIMING, &mut out);
            (due, out)
        }
    }

    #[test]
    fn a_message_split_anywhere_arrives_whole() {
        let frame = client_frame(Kind::Text, true, br#"{"type":"ping"}"#);
        for split in 0..=frame.len() {
            let mut pair = Pair::new(Mode::Gateway);
            let mut out = pair.send(&frame[..split]);
            out.extend(pair.send(&frame[split..]));
            assert_eq!(out, vec![Output::Message(r#"{"type":"ping"}"#.into())]);
            assert_eq!(
                pair.server.inbound_bytes(),
                0,
                "nothing held after the frame"
            );
        }
    }

    #[test]
    fn fragments_reassemble_and_pings_interleave() {
        let mut pair = Pair::new(Mode::Gateway);
        let mut bytes = client_frame(Kind::Text, false, b"hel");
        bytes.extend(client_frame(Kind::Ping, true, b"p"));
        bytes.extend(client_frame(Kind::Continuation, true, b"lo"));
        let out = pair.send(&bytes);
        assert_eq!(
            out,
            vec![
                Output::Send(encode(Kind::Pong, b"p")),
                Output::Message("hello".into())
            ]
        );
    }

    #[test]
    fn the_peers_close_is_echoed_and_input_after_it_ignored() {
        let mut pair = Pair::new(Mode::Gateway);
        let mut bytes = client_frame(Kind::Close, true, &4000u16.to_be_bytes());
        bytes.extend(client_frame(Kind::Text, true, b"late"));
        let out = pair.send(&bytes);
        assert_eq!(
            out,
            vec![Output::Close {
                frame: frame::encode_close(CloseCode::Other(4000), ""),
                violation: false
            }]
        );
        assert_eq!(pair.server.phase(), Phase::Closing);
        assert!(pair.server.phase().ends_when_flushed());
    }

    #[test]
    fn a_violation_closes_with_its_code() {
        let mut pair = Pair::new(Mode::Gateway);
        let out = pair.send(&client_frame(Kind::Binary, true, b"x"));
        let expected = frame::encode_close(
            ProtocolViolation::Binary.close_code(),
            &ProtocolViolation::Binary.to_string(),
        );
        assert_eq!(
            out,
            vec![Output::Close {
                frame: expected,
                violation: true
            }]
        );
        assert!(
            pair.send(&client_frame(Kind::Text, true, b"more"))
                .is_empty()
        );
    }

    #[test]
    fn echo_mode_echoes() {
        let mut pair = Pair::new(Mode::Echo);
        let out = pair.send(&client_frame(Kind::Binary, true, b"\x00\x01"));
        assert_eq!(out, vec![Output::Send(encode(Kind::Binary, b"\x00\x01"))]);
    }

    #[test]
    fn a_silent_peer_is_pinged_then_closed_in_virtual_time() {
        let mut pair = Pair::new(Mode::Gateway);
        assert_eq!(pair.advance_to(10).0, Due::At(30), "heard from at 0: wait");
        assert_eq!(pair.advance_to(30).0, Due::Ping(40));
        let (due, out) = pair.advance_to(40);
        assert_eq!(due, Due::PongTimeout);
        assert_eq!(
            out,
            vec![Output::Close {
                frame: frame::encode_close(CloseCode::Internal, "ping timeout"),
                violation: false
            }]
        );
        assert_eq!(pair.server.phase(), Phase::CloseSent);
        assert_eq!(pair.server.arm_close_deadline(40, &TIMING), Some(45));
        assert_eq!(
            pair.server.arm_close_deadline(41, &TIMING),
            None,
            "armed once"
        );
        assert_eq!(pair.advance_to(44).0, Due::At(45));
        assert_eq!(pair.advance_to(45).0, Due::CloseTimeout);
    }

    #[test]
    fn any_inbound_frame_answers_a_ping() {
        let mut pair = Pair::new(Mode::Gateway);
        assert_eq!(pair.advance_to(30).0, Due::Ping(40));
        pair.now = 35;
        pair.send(&client_frame(Kind::Pong, true, b""));
        assert_eq!(
            pair.advance_to(40).0,
            Due::At(65),
            "answered at 35: next ping at 65"
        );
        assert_eq!(pair.server.phase(), Phase::Open);
    }

    #[test]
    fn a_staggered_heartbeat_keeps_its_lead_after_every_pong() {
        let mut pair = Pair::new(Mode::Gateway);
        pair.server = Session::new(Mode::Gateway, 0).with_stagger(8);
        assert_eq!(
            pair.advance_to(21).0,
            Due::At(22),
            "22 ticks of silence, not 30"
        );
        assert_eq!(pair.advance_to(22).0, Due::Ping(32));
        pair.now = 25;
        pair.send(&client_frame(Kind::Pong, true, b""));
        assert_eq!(
            pair.advance_to(32).0,
            Due::At(47),
            "answered at 25: next at 47"
        );
    }

    #[test]
    fn our_close_answered_completes_the_handshake() {
        let mut pair = Pair::new(Mode::Gateway);
        assert!(pair.server.close(CloseCode::GoingAway, "bye").is_some());
        assert!(pair.server.close(CloseCode::GoingAway, "twice").is_none());
        // Data frames still arrive while our close is on its way; they are not served.
        assert!(pair.send(&client_frame(Kind::Text, true, b"x")).is_empty());
        pair.send(&client_frame(Kind::Close, true, &1000u16.to_be_bytes()));
        assert_eq!(pair.server.phase(), Phase::Closing);
    }

    #[test]
    fn heartbeats_off_needs_no_timer() {
        let mut session = Session::new(Mode::Gateway, 0);
        let timing = Timing {
            interval: 0,
            ..TIMING
        };
        assert_eq!(
            session.handle_timeout(100, &timing, &mut Vec::new()),
            Due::Never
        );
    }

    /// A client's compressed payload, made by an independent compressor. miniz ends it
    /// with a final block, which RFC 7692 allows a client to send (§7.2.3.4).
    fn deflated(data: &[u8]) -> Vec<u8> {
        miniz_oxide::deflate::compress_to_vec(data, 6)
    }

    fn compressed_frame(kind: Kind, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut frame = client_frame(kind, fin, payload);
        frame[0] |= 0x40;
        frame
    }

    fn agreed() -> Option<Agreed> {
        crate::proto::deflate::negotiate([&b"permessage-deflate"[..]])
    }

    fn deflate_pair(mode: Mode) -> Pair {
        let mut pair = Pair::new(mode);
        pair.server = Session::new(mode, 0).with_deflate(agreed());
        pair
    }

    fn violation(v: ProtocolViolation) -> Vec<Output> {
        vec![Output::Close {
            frame: frame::encode_close(v.close_code(), &v.to_string()),
            violation: true,
        }]
    }

    #[test]
    fn compressed_messages_are_inflated_whole_or_in_fragments() {
        let text = r#"{"type":"subscribe","topics":["config:prod"]}"#.repeat(20);
        let packed = deflated(text.as_bytes());
        let mut pair = deflate_pair(Mode::Gateway);
        assert_eq!(
            pair.send(&compressed_frame(Kind::Text, true, &packed)),
            vec![Output::Message(text.clone())]
        );
        // Fragmented: RSV1 on the first frame only, pings between.
        let (a, b) = packed.split_at(packed.len() / 2);
        let mut bytes = compressed_frame(Kind::Text, false, a);
        bytes.extend(client_frame(Kind::Ping, true, b"p"));
        bytes.extend(client_frame(Kind::Continuation, true, b));
        assert_eq!(
            pair.send(&bytes),
            vec![
                Output::Send(encode(Kind::Pong, b"p")),
                Output::Message(text.clone())
            ]
        );
        // Uncompressed messages still pass on a compressed connection.
        assert_eq!(
            pair.send(&client_frame(Kind::Text, true, b"plain")),
            vec![Output::Message("plain".into())]
        );
        assert_eq!(
            pair.server.inbound_bytes(),
            0,
            "nothing held between messages"
        );
    }

    #[test]
    fn misplaced_compressed_bits_fail_with_1002() {
        let packed = deflated(b"hello");
        // RSV1 without the extension.
        let mut pair = Pair::new(Mode::Gateway);
        assert_eq!(
            pair.send(&compressed_frame(Kind::Text, true, &packed)),
            violation(ProtocolViolation::ReservedBits)
        );
        // RSV1 on a continuation.
        let mut pair = deflate_pair(Mode::Gateway);
        let mut bytes = client_frame(Kind::Text, false, b"he");
        bytes.extend(compressed_frame(Kind::Continuation, true, b"llo"));
        assert_eq!(
            pair.send(&bytes),
            violation(ProtocolViolation::MisplacedCompressedBit)
        );
        // RSV1 on a control frame.
        let mut pair = deflate_pair(Mode::Gateway);
        assert_eq!(
            pair.send(&compressed_frame(Kind::Ping, true, b"")),
            violation(ProtocolViolation::MisplacedCompressedBit)
        );
        for v in [
            ProtocolViolation::ReservedBits,
            ProtocolViolation::MisplacedCompressedBit,
        ] {
            assert_eq!(v.close_code(), CloseCode::Protocol);
        }
    }

    #[test]
    fn an_inflate_bomb_closes_with_1009_and_garbage_with_1007() {
        let bomb = deflated(&vec![b'a'; 10 * MAX]);
        assert!(bomb.len() < MAX / 4);
        let mut pair = deflate_pair(Mode::Gateway);
        assert_eq!(
            pair.send(&compressed_frame(Kind::Text, true, &bomb)),
            violation(ProtocolViolation::TooBig)
        );
        assert_eq!(ProtocolViolation::TooBig.close_code(), CloseCode::TooBig);
        let mut pair = deflate_pair(Mode::Gateway);
        assert_eq!(
            pair.send(&compressed_frame(Kind::Text, true, &[0xff, 0xff])),
            violation(ProtocolViolation::BadDeflate)
        );
        // Invalid UTF-8 inside compressed text is still 1007.
        let mut pair = deflate_pair(Mode::Gateway);
        assert_eq!(
            pair.send(&compressed_frame(Kind::Text, true, &deflated(&[0xff; 40]))),
            violation(ProtocolViolation::InvalidUtf8)
        );
    }

    #[test]
    fn echoes_are_compressed_when_agreed_and_long_enough() {
        let text = "echo ".repeat(100);
        let mut pair = deflate_pair(Mode::Echo);
        let out = pair.send(&compressed_frame(
            Kind::Text,
            true,
            &deflated(text.as_bytes()),
        ));
        let [Output::Send(echo)] = &out[..] else {
            panic!("{out:?}");
        };
        assert_eq!(echo[0], 0xC1, "FIN, RSV1, text");
        let mut plain = Pair::new(Mode::Echo);
        let out = plain.send(&client_frame(Kind::Text, true, text.as_bytes()));
        assert_eq!(out, vec![Output::Send(encode(Kind::Text, text.as_bytes()))]);
        // Under the codec's minimum, even an agreed connection gets it plain.
        let out = pair.send(&client_frame(Kind::Text, true, b"tiny"));
        assert_eq!(out, vec![Output::Send(encode(Kind::Text, b"tiny"))]);
    }
}
