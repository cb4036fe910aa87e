//! One WebSocket connection, owned by its shard's thread: the socket, the outbox, and the
//! protocol state of the session.
//!
//! Nothing here is shared or locked. While idle a connection owns no buffer: reads go into
//! the shard's scratch buffer, and bytes are kept only while a frame is incomplete
//! (`partial`) or a message is fragmented (`fragments`). A frame to send is written straight
//! to the socket when nothing is queued; only what the socket does not take is queued, as
//! `Bytes` clones of the shared frame, and flushed with vectored writes when the socket is
//! writable again.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;

use bytes::Bytes;
use mio::net::TcpStream;

use crate::heartbeat::Beat;
use crate::metrics::CloseReason;
use crate::proto::frame::{self, Fragments, Kind, Message, encode_close};
use crate::proto::{CloseCode, ProtocolViolation};
use crate::topic::Pattern;

/// At most this many frames go into one vectored write. Linux accepts up to 1024 (IOV_MAX);
/// 64 frames of a typical event already fill a loopback socket buffer in one call.
const MAX_IOVECS: usize = 64;

/// An outbox whose queue grew past this capacity is released when it drains, so a burst
/// does not pin memory on an idle connection.
const RETAINED_QUEUE_CAPACITY: usize = 8;

/// Message limit of the echo endpoint: Autobahn's 9.* cases send 16 MiB messages.
pub const ECHO_MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// What the connection serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The tidings protocol.
    Gateway,
    /// Echo every data message back (conformance testing).
    Echo,
}

/// Where the close handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Messages flow both ways.
    Open,
    /// We queued a close frame and wait for the peer's.
    CloseSent,
    /// The peer's close frame came (ours is queued): end once the outbox is flushed.
    CloseReceived,
    /// We broke off after a protocol violation: send our close frame, then end.
    Failed,
    /// Nothing more can be written (the socket failed, or the peer is gone): end now.
    Broken,
}

impl Phase {
    /// Whether messages are still accepted both ways.
    pub fn is_open(self) -> bool {
        self == Phase::Open
    }

    /// Whether the connection ends as soon as its outbox is flushed.
    pub fn ends_when_flushed(self) -> bool {
        matches!(self, Phase::CloseReceived | Phase::Failed)
    }
}

/// What happened to a frame handed to [`Connection::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written to the socket in full.
    Written,
    /// Queued (in part or whole) behind earlier frames or a full socket.
    Queued,
    /// The queue overflowed: the connection is now closing with 1013.
    Overflowed,
    /// The connection is closing or broken; the frame was dropped.
    Dropped,
}

/// One subscription, kept so it can be removed from the shard's index.
#[derive(Debug)]
pub enum Subscription {
    /// An exact topic.
    Topic(std::sync::Arc<str>),
    /// A pattern.
    Pattern(Box<Pattern>),
}

/// A token bucket over inbound messages, with one second of burst.
#[derive(Debug, Clone, Copy)]
pub struct RateLimiter {
    tokens: f32,
    /// When `tokens` was last refilled, ms since the shard started.
    at_ms: u32,
    /// Messages refused since the bucket last had a token.
    refused: u32,
}

/// What the rate limiter says of one more inbound message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Serve it.
    Yes,
    /// Refused; tell the client on the first refusal of a run.
    No {
        /// Whether this is the first refusal since the last admitted message.
        first: bool,
    },
    /// Over the limit for a further second's worth of messages: close with 1008.
    Close,
}

impl RateLimiter {
    /// A full bucket for `rate` messages per second.
    pub fn new(rate: u32, now_ms: u32) -> RateLimiter {
        RateLimiter {
            tokens: rate as f32,
            at_ms: now_ms,
            refused: 0,
        }
    }

    /// Takes a token for one message, if there is one. `rate` 0 admits everything.
    pub fn admit(&mut self, rate: u32, now_ms: u32) -> Admit {
        if rate == 0 {
            return Admit::Yes;
        }
        let elapsed = now_ms.wrapping_sub(self.at_ms) as f32;
        self.tokens = (self.tokens + elapsed * rate as f32 / 1000.0).min(rate as f32);
        self.at_ms = now_ms;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = 0;
            return Admit::Yes;
        }
        self.refused += 1;
        if self.refused > rate {
            Admit::Close
        } else {
            Admit::No {
                first: self.refused == 1,
            }
        }
    }
}

/// A complete message from the peer, for the shard to serve.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// A text message of the tidings protocol.
    Request(&'a str),
}

/// Why frame processing stopped early: input after this point is ignored.
pub struct Discard;

/// A connection's whole state.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    /// The slab slot's generation, so a stale reference never reaches a reused slot.
    pub generation: u32,
    /// What the connection serves.
    pub mode: Mode,
    /// Close handshake progress.
    pub phase: Phase,
    /// Why it will have ended, once it ends.
    pub reason: CloseReason,
    out: VecDeque<Bytes>,
    /// Bytes of the head frame already written.
    head_written: usize,
    /// Bytes queued, not counting what of the head is written.
    queued: usize,
    max_queued: usize,
    /// Bytes of an incomplete frame; empty (unallocated) between frames.
    partial: Vec<u8>,
    /// A fragmented message being reassembled.
    fragments: Option<Box<Fragments>>,
    /// This connection's subscriptions.
    pub subscriptions: Vec<Subscription>,
    /// The shard sequence number of the last publication delivered, to deliver once to a
    /// connection subscribed to a topic both directly and through patterns.
    pub last_seq: u64,
    /// Heartbeat state.
    pub beat: Beat,
    /// Heartbeat tick of the last inbound bytes.
    pub last_seen: u64,
    /// Heartbeat tick after which a closing connection is dropped.
    pub close_deadline: Option<u64>,
    /// Inbound message rate limit.
    pub limiter: RateLimiter,
    /// Whether the socket is registered for writability (only while frames are queued).
    pub write_interest: bool,
    /// `queued_bytes()` and `inbound_bytes()` as last added to the shard's budgets.
    pub accounted: (u32, u32),
    /// The client's place under `max_connections_per_ip`, given back with the connection.
    pub peer: crate::hub::peers::IpSlot,
}

impl Connection {
    /// Wraps an upgraded, registered socket.
    pub fn new(
        stream: TcpStream,
        generation: u32,
        mode: Mode,
        max_queued: usize,
        now: u64,
        limiter: RateLimiter,
        peer: crate::hub::peers::IpSlot,
    ) -> Connection {
        Connection {
            stream,
            generation,
            mode,
            phase: Phase::Open,
            reason: CloseReason::Normal,
            out: VecDeque::new(),
            head_written: 0,
            queued: 0,
            max_queued,
            partial: Vec::new(),
            fragments: None,
            subscriptions: Vec::new(),
            last_seq: 0,
            beat: Beat::Idle,
            last_seen: now,
            close_deadline: None,
            limiter,
            write_interest: false,
            accounted: (0, 0),
            peer,
        }
    }

    /// The socket, for (de)registration.
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Whether frames are queued.
    pub fn has_queued(&self) -> bool {
        !self.out.is_empty()
    }

    /// Bytes queued for the socket (what of the head frame is written not counted).
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    /// Bytes held for inbound data: an incomplete frame and a fragmented message.
    pub fn inbound_bytes(&self) -> usize {
        self.partial.capacity() + self.fragments.as_ref().map_or(0, |f| f.held())
    }

    /// Delivers one encoded frame: straight to the socket if nothing is queued, else queued.
    /// Never blocks. Overflowing the queue starts a 1013 close instead of growing it.
    pub fn send(&mut self, frame: Bytes) -> Delivery {
        if !self.phase.is_open() {
            return Delivery::Dropped;
        }
        if self.out.is_empty() {
            match (&self.stream).write(&frame) {
                Ok(n) if n == frame.len() => return Delivery::Written,
                Ok(n) => {
                    self.head_written = n;
                    self.queued += frame.len() - n;
                    self.out.push_back(frame);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.queued += frame.len();
                    self.out.push_back(frame);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return self.send(frame),
                Err(_) => {
                    self.break_off(CloseReason::IoError);
                    return Delivery::Dropped;
                }
            }
        } else {
            self.queued += frame.len();
            self.out.push_back(frame);
        }
        if self.over_limit() {
            // The shard decides: fresh snapshots, or a 1013 close after what is queued.
            return Delivery::Overflowed;
        }
        Delivery::Queued
    }

    /// Whether more than `max_queued` bytes wait for the socket.
    pub fn over_limit(&self) -> bool {
        self.queued > self.max_queued
    }

    /// Sends a control or reply frame even while closing is not yet started.
    fn send_reply(&mut self, frame: Bytes) {
        let _ = self.send(frame);
    }

    /// Queues a close frame; nothing is sent after it. With `keep_queue` the frames already
    /// queued go first (shutdown flushes what was accepted); without it they are dropped,
    /// except a partly written head frame, which must be finished to keep the stream
    /// well-formed.
    fn start_close(&mut self, code: CloseCode, reason: &str, keep_queue: bool) {
        if !keep_queue {
            let keep = usize::from(self.head_written > 0);
            self.out.truncate(keep);
            self.queued = self.out.front().map_or(0, |f| f.len() - self.head_written);
        }
        let frame = encode_close(code, reason);
        self.queued += frame.len();
        self.out.push_back(frame);
    }

    /// Starts a close handshake from our side, if none is under way. Returns whether it did.
    pub fn close(
        &mut self,
        code: CloseCode,
        reason: &str,
        why: CloseReason,
        keep_queue: bool,
    ) -> bool {
        if !self.phase.is_open() {
            return false;
        }
        self.start_close(code, reason, keep_queue);
        self.reason = why;
        self.phase = Phase::CloseSent;
        true
    }

    /// Drops everything queued except a partly written head frame (which must be finished
    /// to keep the stream well-formed): for a connection that only follows state
    /// documents, fresh snapshots replace the backlog.
    pub fn drop_queued(&mut self) {
        let keep = usize::from(self.head_written > 0);
        self.out.truncate(keep);
        self.queued = self.out.front().map_or(0, |f| f.len() - self.head_written);
    }

    /// Gives up on the connection: nothing more can be written.
    pub fn break_off(&mut self, why: CloseReason) {
        if self.phase != Phase::Broken {
            if self.phase.is_open() {
                self.reason = why;
            }
            self.phase = Phase::Broken;
        }
        self.out = VecDeque::new();
        self.queued = 0;
        self.head_written = 0;
    }

    /// Writes queued frames until the queue is empty (true) or the socket is full (false).
    pub fn flush(&mut self) -> bool {
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (i, frame) in self.out.iter().take(MAX_IOVECS).enumerate() {
                let skip = if i == 0 { self.head_written } else { 0 };
                slices[i] = IoSlice::new(&frame[skip..]);
                n += 1;
            }
            match (&self.stream).write_vectored(&slices[..n]) {
                Ok(written) => self.advance(written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.break_off(CloseReason::IoError);
                    return true;
                }
            }
        }
        if self.out.capacity() > RETAINED_QUEUE_CAPACITY {
            self.out = VecDeque::new();
        }
        true
    }

    fn advance(&mut self, mut written: usize) {
        self.queued -= written;
        while written > 0 {
            let Some(head) = self.out.front() else {
                return;
            };
            let left = head.len() - self.head_written;
            if written >= left {
                written -= left;
                self.head_written = 0;
                self.out.pop_front();
            } else {
                self.head_written += written;
                written = 0;
            }
        }
    }

    /// Reads what the socket has into `scratch` and handles it, calling `serve` for each
    /// complete request. Returns false at EOF or on a read error (the connection is over).
    /// Reads at most `budget` times; `more` tells whether the socket may still have data.
    pub fn read(
        &mut self,
        scratch: &mut [u8],
        max_message: usize,
        budget: usize,
        more: &mut bool,
        serve: &mut dyn FnMut(&mut Connection, Inbound<'_>),
    ) -> bool {
        *more = false;
        for _ in 0..budget {
            match (&self.stream).read(scratch) {
                Ok(0) => return false,
                Ok(n) => {
                    let _ = self.on_bytes(&mut scratch[..n], max_message, serve);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        *more = true;
        true
    }

    /// Handles bytes read past the HTTP request, before the first read.
    pub fn on_leftover(
        &mut self,
        bytes: &[u8],
        max_message: usize,
        serve: &mut dyn FnMut(&mut Connection, Inbound<'_>),
    ) {
        let mut bytes = bytes.to_vec();
        let _ = self.on_bytes(&mut bytes, max_message, serve);
    }

    /// Handles freshly read bytes, keeping an incomplete trailing frame in `partial`.
    fn on_bytes(
        &mut self,
        data: &mut [u8],
        max_message: usize,
        serve: &mut dyn FnMut(&mut Connection, Inbound<'_>),
    ) -> Result<(), Discard> {
        if self.partial.is_empty() {
            let consumed = self.process(data, max_message, serve)?;
            self.partial.extend_from_slice(&data[consumed..]);
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(data);
            let consumed = self.process(&mut buf, max_message, serve)?;
            buf.drain(..consumed);
            if !buf.is_empty() {
                self.partial = buf;
            }
        }
        Ok(())
    }

    /// Handles every complete frame in `buf`; returns the bytes consumed.
    fn process(
        &mut self,
        buf: &mut [u8],
        max_message: usize,
        serve: &mut dyn FnMut(&mut Connection, Inbound<'_>),
    ) -> Result<usize, Discard> {
        let mut pos = 0;
        while pos < buf.len() {
            if !matches!(self.phase, Phase::Open | Phase::CloseSent) {
                return Err(Discard);
            }
            let parsed = match frame::parse(&mut buf[pos..], max_message) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(v) => return Err(self.fail(v)),
            };
            let payload = &buf[pos + parsed.payload.start..pos + parsed.payload.end];
            pos += parsed.len;
            if let Err(v) = self.on_frame(parsed.kind, parsed.fin, payload, max_message, serve) {
                return Err(self.fail(v));
            }
        }
        Ok(pos)
    }

    /// Closes with 1013 because the shard's inbound buffers are over their budget, and lets
    /// go of this connection's share: nothing more it sends is read.
    pub fn shed_inbound(&mut self) {
        if self.phase.is_open() {
            self.start_close(
                CloseCode::TryAgainLater,
                "gateway inbound buffers full; retry later",
                false,
            );
            self.reason = CloseReason::Overloaded;
        }
        if self.phase != Phase::Broken {
            self.phase = Phase::Failed;
        }
        self.partial = Vec::new();
        self.fragments = None;
    }

    /// Fails the connection after a protocol violation (RFC 6455 §7.1.7).
    fn fail(&mut self, violation: ProtocolViolation) -> Discard {
        tracing::debug!(%violation, "protocol violation");
        if self.phase.is_open() {
            self.start_close(violation.close_code(), &violation.to_string(), false);
            self.reason = CloseReason::ProtocolError;
        }
        if self.phase != Phase::Broken {
            self.phase = Phase::Failed;
        }
        self.partial = Vec::new();
        self.fragments = None;
        Discard
    }

    fn on_frame(
        &mut self,
        kind: Kind,
        fin: bool,
        payload: &[u8],
        max_message: usize,
        serve: &mut dyn FnMut(&mut Connection, Inbound<'_>),
    ) -> Result<(), ProtocolViolation> {
        match kind {
            Kind::Text | Kind::Binary => {
                // §5.4: a fragmented message's frames must not be interleaved with another.
                if self.fragments.is_some() {
                    return Err(ProtocolViolation::ExpectedContinuation);
                }
                let text = kind == Kind::Text;
                if fin {
                    let message = frame::whole_message(text, payload)?;
                    self.on_message(message, serve)?;
                } else {
                    self.fragments = Some(Fragments::start(text, payload)?);
                }
            }
            Kind::Continuation => {
                let Some(fragments) = self.fragments.as_mut() else {
                    return Err(ProtocolViolation::UnexpectedContinuation);
                };
                fragments.push(payload, max_message)?;
                if fin && let Some(fragments) = self.fragments.take() {
                    self.on_message(fragments.finish()?, serve)?;
                }
            }
            Kind::Ping => {
                // §5.5.2: "Upon receipt of a Ping frame, an endpoint MUST send a Pong frame in
                // response [...] with identical Application data".
                if self.phase.is_open() {
                    self.send_reply(frame::encode(Kind::Pong, payload));
                }
            }
            Kind::Pong => {}
            Kind::Close => {
                let received = frame::parse_close(payload)?;
                match self.phase {
                    Phase::Open => {
                        // §5.5.1: answer with a close frame, echoing the status code.
                        let code = received.map_or(CloseCode::Normal, |(c, _)| CloseCode::Other(c));
                        self.start_close(code, "", false);
                        self.reason = CloseReason::Normal;
                        self.phase = Phase::CloseReceived;
                    }
                    // Our close was answered: the handshake is complete.
                    Phase::CloseSent => self.phase = Phase::CloseReceived,
                    Phase::CloseReceived | Phase::Failed | Phase::Broken => {}
                }
            }
        }
        Ok(())
    }

    fn on_message(
        &mut self,
        message: Message<'_>,
        serve: &mut dyn FnMut(&mut Connection, Inbound<'_>),
    ) -> Result<(), ProtocolViolation> {
        if !self.phase.is_open() {
            return Ok(());
        }
        match (self.mode, message) {
            (Mode::Echo, Message::Text(text)) => {
                self.send_reply(frame::encode(Kind::Text, text.as_bytes()));
            }
            (Mode::Echo, Message::Binary(data)) => {
                self.send_reply(frame::encode(Kind::Binary, data));
            }
            (Mode::Gateway, Message::Text(text)) => serve(self, Inbound::Request(text)),
            (Mode::Gateway, Message::Binary(_)) => return Err(ProtocolViolation::Binary),
        }
        Ok(())
    }

    /// Sends FIN; the socket closes when the connection is dropped.
    pub fn shutdown(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/ARCHITECTURE.md states this size; an idle connection costs its slab entry.
    #[test]
    fn a_connection_is_216_bytes() {
        assert_eq!(std::mem::size_of::<Connection>(), 216);
    }

    #[test]
    fn rate_limiter_refuses_then_closes() {
        let mut limiter = RateLimiter::new(10, 0);
        // A full second of burst, all at t = 0.
        for _ in 0..10 {
            assert_eq!(limiter.admit(10, 0), Admit::Yes);
        }
        assert_eq!(limiter.admit(10, 0), Admit::No { first: true });
        for _ in 0..9 {
            assert_eq!(limiter.admit(10, 0), Admit::No { first: false });
        }
        assert_eq!(limiter.admit(10, 0), Admit::Close);
        // A client that keeps to the rate is never refused.
        let mut polite = RateLimiter::new(10, 0);
        for i in 0..1000 {
            assert_eq!(polite.admit(10, i * 100), Admit::Yes);
        }
        assert_eq!(RateLimiter::new(0, 0).admit(0, 0), Admit::Yes);
    }
}
