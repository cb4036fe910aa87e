//! One peer in a shard's slab, whatever its transport: the socket, the outbox, the
//! transport's protocol state (a WebSocket session or an SSE stream), subscriptions and the
//! rate limiter.
//!
//! Fan-out, the overflow policy and the heartbeat wheel work on peers; only encoding (a
//! WebSocket frame or an SSE event, both built once per publication and shared) and
//! reading differ by transport. Nothing here is shared or locked.

use std::cell::Cell;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

use bytes::Bytes;
use mio::net::TcpStream;

use super::outbox::{Flush, Outbox, Push};
use super::peers::IpSlot;
use super::sse::SseStream;
use super::tls;
use super::topics::Publication;
use crate::auth::Identity;
use crate::metrics::CloseReason;
use crate::proto::CloseCode;
use crate::proto::deflate::Codec;
use crate::proto::session::{Output, Phase, Session};
use crate::topic::Pattern;

thread_local! {
    /// Bytes this shard thread wrote to peer sockets, and the change in its SSE streams,
    /// since the shard last reported them ([`take_meter`]). Kept per thread rather than per
    /// peer, so a peer stays its size and a write costs no atomic operation.
    static METER: Cell<(u64, i64)> = const { Cell::new((0, 0)) };
}

/// Bytes written and the change in SSE streams on this thread since the last call.
pub(crate) fn take_meter() -> (u64, i64) {
    METER.with(|m| m.replace((0, 0)))
}

fn meter(bytes: u64, sse: i64) {
    METER.with(|m| {
        let (b, s) = m.get();
        m.set((b + bytes, s + sse));
    });
}

/// A socket whose writes are counted in [`METER`].
struct Metered<'a>(&'a TcpStream);

impl Write for Metered<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (&mut &*self.0).write(buf)?;
        meter(n as u64, 0);
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = (&mut &*self.0).write_vectored(bufs)?;
        meter(n as u64, 0);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&mut &*self.0).flush()
    }
}

/// What happened to bytes handed to [`Peer::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written to the socket in full.
    Written,
    /// Queued (in part or whole) behind earlier bytes or a full socket.
    Queued,
    /// The queue is past `max_queued_bytes`: the shard applies the overflow policy.
    Overflowed,
    /// The peer is closing or broken; the bytes were dropped.
    Dropped,
}

/// One subscription, kept so it can be removed from the shard's index.
#[derive(Debug)]
pub enum Subscription {
    /// An exact topic.
    Topic(Arc<str>),
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

/// The protocol a peer speaks.
#[derive(Debug)]
pub enum Transport {
    /// A WebSocket session.
    WebSocket(Session),
    /// A Server-Sent Events stream (boxed: rarer, and its cursor makes it larger).
    Sse(Box<SseStream>),
}

/// What one read of a peer's socket gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// This many bytes, at the start of the buffer.
    Bytes(usize),
    /// Nothing more for now.
    WouldBlock,
    /// EOF or a read error: the peer is gone.
    Gone,
}

/// One peer's whole state.
#[derive(Debug)]
pub struct Peer {
    stream: TcpStream,
    /// Whether the socket carries TLS records (the record layer is in `extras`). A flag
    /// here, in padding, so a plain peer is its old size and tells itself apart without
    /// reading the box.
    tls: bool,
    /// The slab slot's generation, so a stale reference never reaches a reused slot.
    pub(super) generation: u32,
    transport: Transport,
    outbox: Outbox,
    max_queued: usize,
    /// Why it will have ended, once it ends.
    pub(super) reason: CloseReason,
    /// This peer's subscriptions.
    pub(super) subscriptions: Vec<Subscription>,
    /// The shard sequence number of the last publication delivered, to deliver once to a
    /// peer subscribed to a topic both directly and through patterns.
    pub(super) last_seq: u64,
    /// Inbound message rate limit.
    pub(super) limiter: RateLimiter,
    /// Whether the socket is registered for writability (only while bytes are queued).
    pub(super) write_interest: bool,
    /// While the shard serves messages that arrived before a close the session already
    /// saw in the same read: their replies still go out, ahead of the close frame.
    pub(super) replying: bool,
    /// `queued_bytes()` and `inbound_bytes()` as last added to the shard's budgets.
    pub(super) accounted: (u32, u32),
    /// What few peers carry (an identity with authentication on, a TLS record layer);
    /// `None` on a plain peer with authentication off.
    extras: Option<Box<Extras>>,
    /// The client's place under `max_connections_per_ip`, given back with the peer.
    _ip: IpSlot,
}

/// A peer's rarer state, boxed so that a peer without any costs one pointer.
#[derive(Debug, Default)]
struct Extras {
    /// Who the client is and what it may subscribe to; `None` with authentication off.
    access: Option<Access>,
    /// A TLS peer's record layer (boxed: rustls' connection is over a kilobyte).
    tls: Option<Box<rustls::ServerConnection>>,
}

/// An authenticated peer's identity, and whether it was told its token is expiring.
#[derive(Debug)]
pub struct Access {
    /// The identity of the last token verified (grants shared with every peer that has the
    /// same claims).
    pub identity: Identity,
    /// Whether `token_expiring` was sent for this token.
    pub warned: bool,
}

impl Peer {
    /// Wraps a registered socket.
    pub fn new(
        stream: TcpStream,
        tls: Option<Box<rustls::ServerConnection>>,
        generation: u32,
        transport: Transport,
        max_queued: usize,
        limiter: RateLimiter,
        ip: IpSlot,
    ) -> Peer {
        if matches!(transport, Transport::Sse(_)) {
            meter(0, 1);
        }
        let extras = tls.map(|conn| {
            Box::new(Extras {
                access: None,
                tls: Some(conn),
            })
        });
        Peer {
            stream,
            tls: extras.is_some(),
            generation,
            transport,
            outbox: Outbox::default(),
            max_queued,
            reason: CloseReason::Normal,
            subscriptions: Vec::new(),
            last_seq: 0,
            limiter,
            write_interest: false,
            replying: false,
            accounted: (0, 0),
            extras,
            _ip: ip,
        }
    }

    /// Who the client is, with authentication on.
    pub fn access(&self) -> Option<&Access> {
        self.extras.as_ref()?.access.as_ref()
    }

    /// Who the client is, to record a refreshed token or a warning sent.
    pub fn access_mut(&mut self) -> Option<&mut Access> {
        self.extras.as_mut()?.access.as_mut()
    }

    /// Sets who the client is.
    pub fn set_access(&mut self, access: Option<Access>) {
        match &mut self.extras {
            Some(extras) => extras.access = access,
            None if access.is_some() => {
                self.extras = Some(Box::new(Extras { access, tls: None }));
            }
            None => {}
        }
    }

    /// The TLS record layer, on a TLS peer.
    fn record_layer(&self) -> Option<&rustls::ServerConnection> {
        if !self.tls {
            return None;
        }
        self.extras.as_ref()?.tls.as_deref()
    }

    /// The socket, for (de)registration.
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// The transport's state.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The transport's state, to feed it.
    pub fn transport_mut(&mut self) -> &mut Transport {
        &mut self.transport
    }

    /// The close phase, whatever the transport.
    pub fn phase(&self) -> Phase {
        match &self.transport {
            Transport::WebSocket(session) => session.phase(),
            Transport::Sse(stream) => stream.phase(),
        }
    }

    /// Whether bytes are queued (in the outbox, or as TLS records rustls holds).
    pub fn has_queued(&self) -> bool {
        !self.outbox.is_empty() || self.record_layer().is_some_and(|c| c.wants_write())
    }

    /// Bytes queued for the socket, TLS records rustls holds included.
    pub fn queued_bytes(&self) -> usize {
        match self.record_layer() {
            None => self.outbox.queued(),
            Some(conn) => self.outbox.queued() + tls::held_ciphertext(conn),
        }
    }

    /// Bytes held for inbound data.
    pub fn inbound_bytes(&self) -> usize {
        match &self.transport {
            Transport::WebSocket(session) => session.inbound_bytes(),
            Transport::Sse(_) => 0,
        }
    }

    /// Whether more than `max_queued_bytes` wait for the socket.
    pub fn over_limit(&self) -> bool {
        self.queued_bytes() > self.max_queued
    }

    /// Sends bytes already in this peer's encoding. Never blocks; past the queue limit the
    /// caller applies the overflow policy.
    pub fn send(&mut self, bytes: Bytes) -> Delivery {
        if !(self.phase().is_open() || self.replying && self.phase() != Phase::Broken) {
            return Delivery::Dropped;
        }
        let pushed = match tls_of(self.tls, &mut self.extras) {
            None => self.outbox.push(bytes, Metered(&self.stream)),
            Some(conn) => self
                .outbox
                .push(bytes, tls::Sealed::new(conn, Metered(&self.stream))),
        };
        match pushed {
            Push::Written => Delivery::Written,
            Push::Broken => {
                self.break_off(CloseReason::IoError);
                Delivery::Dropped
            }
            Push::Queued if self.over_limit() => Delivery::Overflowed,
            Push::Queued => Delivery::Queued,
        }
    }

    /// Sends a message given as its WebSocket frame (a snapshot, a replayed publication, a
    /// reply), re-encoded for an SSE stream, or compressed with `codec` (once per shard
    /// for a frame many subscribers get) on a WebSocket that agreed permessage-deflate.
    pub fn send_message(&mut self, frame: Bytes, codec: &mut Codec) -> Delivery {
        match &mut self.transport {
            Transport::WebSocket(session) => {
                let frame = session
                    .deflate()
                    .and_then(|agreed| codec.shared(&frame, agreed.window()))
                    .unwrap_or(frame);
                self.send(frame)
            }
            Transport::Sse(stream) => match stream.encode_message(&frame) {
                Some(bytes) => self.send(bytes),
                None => Delivery::Dropped,
            },
        }
    }

    /// Delivers a publication in this peer's encoding: the shared WebSocket frame (its
    /// shared compressed form, with permessage-deflate agreed, built with `codec` if this
    /// is the first connection to need it), or the shared SSE event (plus, on a
    /// multi-topic stream, its cursor).
    pub fn deliver(&mut self, publication: &Publication, codec: &mut Codec) -> Delivery {
        match &mut self.transport {
            Transport::WebSocket(session) => {
                let frame = session
                    .deflate()
                    .and_then(|agreed| publication.deflated(agreed.window(), codec))
                    .unwrap_or_else(|| publication.frame.clone());
                self.send(frame)
            }
            Transport::Sse(stream) => {
                let Some((event, cursor)) = stream.encode_publication(publication) else {
                    return Delivery::Dropped;
                };
                match cursor {
                    None => self.send(event),
                    Some(cursor) => match self.send(event) {
                        // The later outcome tells the shard what to do next (queued
                        // bytes need writability, an overflow the policy).
                        first @ (Delivery::Written | Delivery::Queued) => match self.send(cursor) {
                            Delivery::Written => first,
                            later => later,
                        },
                        other => {
                            // An event without its blank line must still be ended.
                            if self.phase().is_open() {
                                self.outbox.enqueue(cursor);
                            }
                            other
                        }
                    },
                }
            }
        }
    }

    /// Applies what the WebSocket session produced, except messages, which the caller
    /// serves (it returns them).
    pub fn apply(&mut self, output: Output) -> Option<String> {
        match output {
            Output::Message(text) => return Some(text),
            Output::Send(frame) => {
                let _ = self.send(frame);
            }
            Output::Close { frame, violation } => {
                self.outbox.drop_unstarted();
                self.outbox.enqueue(frame);
                if violation {
                    self.reason = CloseReason::ProtocolError;
                }
            }
        }
        None
    }

    /// Starts closing from our side, if not already closing: a WebSocket close frame, or
    /// an SSE stream's final `close` event. With `keep_queue` what is already queued goes
    /// first (shutdown delivers what was accepted); without it, it is dropped.
    pub fn close(&mut self, code: CloseCode, reason: &str, why: CloseReason, keep_queue: bool) {
        let last = match &mut self.transport {
            Transport::WebSocket(session) => session.close(code, reason),
            Transport::Sse(stream) => stream.end(code, reason),
        };
        let Some(last) = last else {
            return;
        };
        if !keep_queue {
            self.drop_queued();
        }
        self.outbox.enqueue(last);
        self.reason = why;
    }

    /// Drops everything queued but a partly written frame: a peer that follows only state
    /// documents gets fresh snapshots instead of its backlog.
    pub fn drop_queued(&mut self) {
        self.outbox.drop_unstarted();
        if matches!(self.transport, Transport::Sse(_)) && self.has_queued() {
            // The frame kept may be an event's lines without the blank line its cursor
            // would have brought: end it here, so the next event does not run into it (an
            // empty line after a complete event dispatches nothing).
            self.outbox.enqueue(Bytes::from_static(b"\n"));
        }
    }

    /// Closes with 1013 because the shard's inbound buffers are over their budget.
    pub fn shed_inbound(&mut self) {
        if let Transport::WebSocket(session) = &mut self.transport
            && let Some(frame) = session.shed_inbound()
        {
            self.outbox.drop_unstarted();
            self.outbox.enqueue(frame);
            self.reason = CloseReason::Overloaded;
        }
    }

    /// Gives up: nothing more can be written.
    pub fn break_off(&mut self, why: CloseReason) {
        if self.phase().is_open() {
            self.reason = why;
        }
        match &mut self.transport {
            Transport::WebSocket(session) => session.break_off(),
            Transport::Sse(stream) => stream.break_off(),
        }
        self.outbox.clear();
    }

    /// Writes what is queued until done or the socket is full.
    pub fn flush(&mut self) {
        let flushed = match tls_of(self.tls, &mut self.extras) {
            None => self.outbox.flush(Metered(&self.stream)),
            Some(conn) => {
                let mut sealed = tls::Sealed::new(conn, Metered(&self.stream));
                match sealed.drain() {
                    Ok(()) => self.outbox.flush(sealed),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Flush::Blocked,
                    Err(_) => Flush::Broken,
                }
            }
        };
        if flushed == Flush::Broken {
            self.break_off(CloseReason::IoError);
        }
    }

    /// Reads once from the socket into `buf`.
    pub fn read(&mut self, buf: &mut [u8]) -> Received {
        if let Some(conn) = tls_of(self.tls, &mut self.extras) {
            return tls::read(conn, &self.stream, buf);
        }
        loop {
            return match (&self.stream).read(buf) {
                Ok(0) => Received::Gone,
                Ok(n) => Received::Bytes(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Received::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => Received::Gone,
            };
        }
    }

    /// Sends FIN; the socket closes when the peer is dropped.
    pub fn shutdown(&mut self) {
        if let Some(conn) = tls_of(self.tls, &mut self.extras) {
            tls::close(conn, Metered(&self.stream));
        }
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

/// The record layer in `extras`, on a TLS peer: a plain peer (`tls` false) never reads the
/// box. A function of the fields, so the socket and outbox stay borrowable beside it.
fn tls_of(tls: bool, extras: &mut Option<Box<Extras>>) -> Option<&mut rustls::ServerConnection> {
    if !tls {
        return None;
    }
    extras.as_mut()?.tls.as_deref_mut()
}

impl Drop for Peer {
    fn drop(&mut self) {
        if matches!(self.transport, Transport::Sse(_)) {
            meter(0, -1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/ARCHITECTURE.md states this size; an idle WebSocket costs its slab entry.
    #[test]
    fn a_peer_is_224_bytes() {
        assert_eq!(std::mem::size_of::<Peer>(), 224);
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
