//! One WebSocket connection after the upgrade: a hand-written future with a small state.
//!
//! While idle it owns no buffer: it waits for readability, reads into a per-thread scratch
//! buffer, and keeps bytes only while a frame is incomplete (`partial`) or a message is
//! fragmented (`fragments`). Outgoing frames go through the shared [`Conn`] outbox, which
//! fan-out threads also write to directly.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::time::Sleep;

use crate::hub::{Conn, ConnId, Hub, OutState};
use crate::metrics::CloseReason;
use crate::proto::frame::{self, Fragments, Kind, Message};
use crate::proto::message::{ClientMessage, ServerMessage, now_ms, parse_client};
use crate::proto::{CloseCode, ProtocolViolation};

/// Size of each worker thread's read buffer. Big enough for a whole default-size message in
/// one read; only an incomplete frame is ever copied out of it.
const SCRATCH_BYTES: usize = 64 * 1024;

/// Reads handled in one poll before yielding, so a flooding peer cannot starve others.
const READ_BUDGET: usize = 16;

/// Message limit of the echo endpoint: Autobahn's 9.* cases send 16 MiB messages.
pub const ECHO_MAX_MESSAGE: usize = 16 * 1024 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

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
enum Phase {
    /// Messages flow both ways.
    Open,
    /// We sent (or queued) a close frame and wait for the peer's.
    CloseSent,
    /// The peer sent a close frame; ours is queued; the TCP connection ends once it is out.
    CloseReceived,
    /// We broke off after a protocol violation: send our close frame, then end.
    Failed,
}

impl Phase {
    fn is_open(self) -> bool {
        self == Phase::Open
    }
}

/// Why frame processing stopped early: input after this point is ignored (a close was
/// received or the peer broke the protocol).
enum Stop {
    Discard,
}

/// The future driving one connection.
pub struct Session {
    hub: Arc<Hub>,
    conn: Arc<Conn>,
    id: ConnId,
    mode: Mode,
    phase: Phase,
    /// Bytes of an incomplete frame; empty (unallocated) between frames.
    partial: Vec<u8>,
    /// A fragmented message being reassembled.
    fragments: Option<Box<Fragments>>,
    /// Deadline for the peer's close frame, armed when we start closing.
    close_timer: Option<Pin<Box<Sleep>>>,
    reason: CloseReason,
    limiter: RateLimiter,
}

/// A token bucket over inbound messages, with one second of burst.
#[derive(Debug, Clone, Copy)]
struct RateLimiter {
    tokens: f32,
    /// When `tokens` was last refilled, ms since the hub started.
    at_ms: u64,
    /// Messages refused since the bucket last had a token.
    refused: u32,
}

/// What the rate limiter says of one more inbound message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    Yes,
    /// Refused; tell the client (first refusal of a run only).
    No {
        first: bool,
    },
    /// Over the limit for a whole further second's worth of messages: close with 1008.
    Close,
}

impl RateLimiter {
    fn new(rate: u32) -> RateLimiter {
        RateLimiter {
            tokens: rate as f32,
            at_ms: 0,
            refused: 0,
        }
    }

    fn admit(&mut self, rate: u32, now_ms: u64) -> Admit {
        if rate == 0 {
            return Admit::Yes;
        }
        let elapsed = now_ms.saturating_sub(self.at_ms) as f32;
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

impl Session {
    /// Registers an upgraded connection; `leftover` holds bytes read past the HTTP request.
    pub fn new(hub: Arc<Hub>, conn: Arc<Conn>, leftover: &[u8], mode: Mode) -> Session {
        let id = hub.register(conn.clone());
        tracing::debug!(conn = %id, ?mode, "websocket open");
        let mut session = Session {
            hub,
            conn,
            id,
            mode,
            phase: Phase::Open,
            partial: Vec::new(),
            fragments: None,
            close_timer: None,
            reason: CloseReason::Normal,
            limiter: RateLimiter::new(0),
        };
        session.limiter = RateLimiter::new(session.hub.config().rate_limit);
        session.limiter.at_ms = session.hub.elapsed_ms();
        if session.hub.is_shutting_down() {
            session
                .conn
                .close(CloseCode::GoingAway, "server shutting down", true);
        }
        if !leftover.is_empty() {
            let mut bytes = leftover.to_vec();
            let _ = session.on_bytes(&mut bytes);
        }
        session
    }

    fn max_message(&self) -> usize {
        match self.mode {
            Mode::Gateway => self.hub.config().max_message_bytes,
            Mode::Echo => ECHO_MAX_MESSAGE,
        }
    }

    /// Reacts to closes started outside this task: queue overflow, shutdown, a failed write.
    fn notice_outside_close(&mut self) -> Option<CloseReason> {
        match self.conn.state() {
            OutState::Open => None,
            OutState::Broken => Some(CloseReason::IoError),
            OutState::Closing(code) => {
                if self.phase.is_open() {
                    self.phase = Phase::CloseSent;
                    self.reason = match code {
                        CloseCode::TryAgainLater => CloseReason::SlowConsumer,
                        CloseCode::GoingAway => CloseReason::Shutdown,
                        CloseCode::Internal => CloseReason::Timeout,
                        _ => CloseReason::Normal,
                    };
                    self.arm_close_timer();
                }
                None
            }
        }
    }

    fn arm_close_timer(&mut self) {
        if self.close_timer.is_none() {
            let timeout = self.hub.config().close_timeout;
            self.close_timer = Some(Box::pin(tokio::time::sleep(timeout)));
        }
    }

    /// Fails the connection after a protocol violation (RFC 6455 §7.1.7).
    fn fail(&mut self, violation: ProtocolViolation) -> Stop {
        tracing::debug!(conn = %self.id, %violation, "protocol violation");
        if self
            .conn
            .close(violation.close_code(), &violation.to_string(), false)
        {
            self.reason = CloseReason::ProtocolError;
        }
        self.phase = Phase::Failed;
        self.arm_close_timer();
        Stop::Discard
    }

    /// Reads until the socket has nothing more or the budget is spent.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        for _ in 0..READ_BUDGET {
            match self.conn.stream().poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(CloseReason::IoError),
                Poll::Ready(Ok(())) => {}
            }
            let conn = self.conn.clone();
            let result = SCRATCH.with_borrow_mut(|scratch| match conn.stream().try_read(scratch) {
                Ok(0) => Err(Some(self.eof_reason())),
                Ok(n) => {
                    self.conn.touch(self.hub.clock());
                    let (Ok(()) | Err(Stop::Discard)) = self.on_bytes(&mut scratch[..n]);
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(None),
                Err(_) => Err(Some(CloseReason::IoError)),
            });
            match result {
                Ok(()) => {}
                Err(None) => continue,
                Err(Some(reason)) => return Poll::Ready(reason),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn eof_reason(&self) -> CloseReason {
        match self.phase {
            // The peer closed TCP without a close frame.
            Phase::Open => CloseReason::IoError,
            _ => self.reason,
        }
    }

    /// Handles freshly read bytes, keeping an incomplete trailing frame in `partial`.
    fn on_bytes(&mut self, data: &mut [u8]) -> Result<(), Stop> {
        if self.partial.is_empty() {
            let consumed = self.process(data)?;
            self.partial.extend_from_slice(&data[consumed..]);
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(data);
            let consumed = self.process(&mut buf)?;
            buf.drain(..consumed);
            if !buf.is_empty() {
                self.partial = buf;
            }
        }
        Ok(())
    }

    /// Handles every complete frame in `buf`; returns the bytes consumed.
    fn process(&mut self, buf: &mut [u8]) -> Result<usize, Stop> {
        let max = self.max_message();
        let mut pos = 0;
        while pos < buf.len() {
            if matches!(self.phase, Phase::Failed | Phase::CloseReceived) {
                return Err(Stop::Discard);
            }
            let parsed = match frame::parse(&mut buf[pos..], max) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(v) => return Err(self.fail(v)),
            };
            let payload = &buf[pos + parsed.payload.start..pos + parsed.payload.end];
            pos += parsed.len;
            if let Err(v) = self.on_frame(parsed.kind, parsed.fin, payload) {
                return Err(self.fail(v));
            }
        }
        Ok(pos)
    }

    fn on_frame(&mut self, kind: Kind, fin: bool, payload: &[u8]) -> Result<(), ProtocolViolation> {
        match kind {
            Kind::Text | Kind::Binary => {
                // §5.4: a fragmented message's frames must not be interleaved with another.
                if self.fragments.is_some() {
                    return Err(ProtocolViolation::ExpectedContinuation);
                }
                let text = kind == Kind::Text;
                if fin {
                    let message = frame::whole_message(text, payload)?;
                    self.on_message(message)?;
                } else {
                    self.fragments = Some(Fragments::start(text, payload)?);
                }
            }
            Kind::Continuation => {
                let max = self.max_message();
                let Some(fragments) = self.fragments.as_mut() else {
                    return Err(ProtocolViolation::UnexpectedContinuation);
                };
                fragments.push(payload, max)?;
                if fin {
                    let fragments = self.fragments.take().expect("checked above");
                    self.on_message(fragments.finish()?)?;
                }
            }
            Kind::Ping => {
                // §5.5.2: "Upon receipt of a Ping frame, an endpoint MUST send a Pong frame in
                // response [...] with identical Application data".
                if self.phase.is_open() {
                    self.conn.send(frame::encode(Kind::Pong, payload));
                }
            }
            Kind::Pong => {}
            Kind::Close => {
                let received = frame::parse_close(payload)?;
                match self.phase {
                    Phase::Open => {
                        // §5.5.1: answer with a close frame, echoing the status code.
                        let code = received.map_or(CloseCode::Normal, |(c, _)| CloseCode::Other(c));
                        self.conn.close(code, "", false);
                        self.reason = CloseReason::Normal;
                        self.phase = Phase::CloseReceived;
                    }
                    // Our close was answered: the handshake is complete.
                    Phase::CloseSent => self.phase = Phase::CloseReceived,
                    Phase::CloseReceived | Phase::Failed => {}
                }
            }
        }
        Ok(())
    }

    fn on_message(&mut self, message: Message<'_>) -> Result<(), ProtocolViolation> {
        if !self.phase.is_open() {
            return Ok(());
        }
        match (self.mode, message) {
            (Mode::Echo, Message::Text(text)) => {
                self.conn.send(frame::encode(Kind::Text, text.as_bytes()));
            }
            (Mode::Echo, Message::Binary(data)) => {
                self.conn.send(frame::encode(Kind::Binary, data));
            }
            (Mode::Gateway, Message::Text(text)) => {
                let rate = self.hub.config().rate_limit;
                match self.limiter.admit(rate, self.hub.elapsed_ms()) {
                    Admit::Yes => self.on_request(text),
                    Admit::No { first } => {
                        if first {
                            let message = format!("over {rate} messages per second; slow down");
                            self.conn.send(
                                ServerMessage::Error {
                                    code: "rate_limited",
                                    message: &message,
                                    id: None,
                                    ts: now_ms(),
                                }
                                .to_frame(),
                            );
                        }
                    }
                    Admit::Close => {
                        if self
                            .conn
                            .close(CloseCode::Policy, "rate limit exceeded", false)
                        {
                            self.reason = CloseReason::RateLimited;
                        }
                        self.phase = Phase::CloseSent;
                        self.arm_close_timer();
                    }
                }
            }
            (Mode::Gateway, Message::Binary(_)) => return Err(ProtocolViolation::Binary),
        }
        Ok(())
    }

    /// Serves one protocol request; failures answer with `error` and keep the connection.
    fn on_request(&mut self, text: &str) {
        let reply = match parse_client(text) {
            Err(e) => ServerMessage::Error {
                code: e.code(),
                message: &e.to_string(),
                id: None,
                ts: now_ms(),
            }
            .to_frame(),
            Ok(ClientMessage::Subscribe(req)) => {
                match self.hub.subscribe(self.id, &req.topics, &req.patterns) {
                    Ok(()) => ServerMessage::Subscribed {
                        id: req.id.as_ref(),
                        topics: &req.topics,
                        patterns: &req.patterns,
                        ts: now_ms(),
                    }
                    .to_frame(),
                    Err(e) => ServerMessage::Error {
                        code: e.code(),
                        message: &e.to_string(),
                        id: req.id.as_ref(),
                        ts: now_ms(),
                    }
                    .to_frame(),
                }
            }
            Ok(ClientMessage::Unsubscribe(req)) => {
                match self.hub.unsubscribe(self.id, &req.topics, &req.patterns) {
                    Ok(()) => ServerMessage::Unsubscribed {
                        id: req.id.as_ref(),
                        topics: &req.topics,
                        patterns: &req.patterns,
                        ts: now_ms(),
                    }
                    .to_frame(),
                    Err(e) => ServerMessage::Error {
                        code: e.code(),
                        message: &e.to_string(),
                        id: req.id.as_ref(),
                        ts: now_ms(),
                    }
                    .to_frame(),
                }
            }
            Ok(ClientMessage::Ping { id }) => ServerMessage::Pong {
                id: id.as_ref(),
                ts: now_ms(),
            }
            .to_frame(),
            Ok(ClientMessage::Pong) => return,
        };
        self.conn.send(reply);
    }

    /// Ends the connection: FIN to the peer, out of the registry, counted.
    fn finish(&mut self, reason: CloseReason) -> Poll<()> {
        // Counted before the peer can see the end, so what it observes is already counted.
        self.hub.unregister(self.id);
        self.hub.metrics().connection_closed(reason);
        self.conn.set_broken();
        let _ = socket2::SockRef::from(self.conn.stream()).shutdown(Shutdown::Write);
        tracing::debug!(conn = %self.id, ?reason, "websocket closed");
        Poll::Ready(())
    }
}

impl Future for Session {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        // Register before looking at the outbox, so a frame queued meanwhile wakes us.
        this.conn.register(cx);
        if let Some(reason) = this.notice_outside_close() {
            return this.finish(reason);
        }
        let flushed = match this.conn.poll_flush(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(_)) => return this.finish(CloseReason::IoError),
            Poll::Pending => false,
        };
        if flushed && matches!(this.phase, Phase::CloseReceived | Phase::Failed) {
            // §7.1.1: the server closes the TCP connection first, once the handshake is done.
            return this.finish(this.reason);
        }
        if let Poll::Ready(reason) = this.poll_read(cx) {
            if this.phase.is_open() || reason == CloseReason::IoError {
                return this.finish(reason);
            }
            // EOF while closing: the peer is gone; nothing more can be delivered.
            return this.finish(this.reason);
        }
        // Reading may have queued replies or completed the handshake.
        if this.phase != Phase::Open || !this.partial.is_empty() {
            let flushed = match this.conn.poll_flush(cx) {
                Poll::Ready(Ok(())) => true,
                Poll::Ready(Err(_)) => return this.finish(CloseReason::IoError),
                Poll::Pending => false,
            };
            if flushed && matches!(this.phase, Phase::CloseReceived | Phase::Failed) {
                return this.finish(this.reason);
            }
        }
        if let Some(timer) = this.close_timer.as_mut()
            && timer.as_mut().poll(cx).is_ready()
        {
            let reason = match this.reason {
                CloseReason::Normal => CloseReason::Timeout,
                other => other,
            };
            return this.finish(reason);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_refuses_then_closes() {
        let mut limiter = RateLimiter::new(10);
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
        let mut polite = RateLimiter::new(10);
        for i in 0..1000 {
            assert_eq!(polite.admit(10, i * 100), Admit::Yes);
        }
        assert_eq!(RateLimiter::new(0).admit(0, 0), Admit::Yes);
    }
}
