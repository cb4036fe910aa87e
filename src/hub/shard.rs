//! A shard: one thread with its own event loop (mio), owning a share of the peers
//! (WebSocket connections and SSE streams alike).
//!
//! The thread owns its peers outright: their sockets, outboxes and protocol state live in
//! its slab, and its subscription index maps topics to slab slots. Publications,
//! new connections and shutdown arrive as jobs on a channel, with a waker to interrupt the
//! poll. Because a publication goes to every shard at once, its fan-out runs on every core,
//! and each socket is written by the thread that owns it: no lock, no task wake-up, one
//! `send` per up-to-date subscriber.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, TryRecvError};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::job::Backfill;
use super::job::{Job, Open, Shared, SseOpen};
use super::peer::{Access, Delivery, Peer, RateLimiter, Received, Subscription, Transport};
use super::requests::{
    attach_waiting, detach, error_frame, replay_backfilled, serve, subscribe, unfollow_pattern,
};
use super::sse::SseStream;
use super::topics::{Content, Publication};
use crate::heartbeat::{self, Wheel};
use crate::metrics::CloseReason;
use crate::proto::CloseCode;
use crate::proto::deflate::Codec;
use crate::proto::frame::{self, Kind};
use crate::proto::message::{ServerMessage, SubscriptionRequest, now_ms};
use crate::proto::session::{Due, Mode, Output, Phase, Session, Timing};
use crate::proto::sse;
use crate::proto::versioned::encode_closed;
use crate::topic::index::{Ack, Index, Opening, SlotId};
use crate::topic::{EventFields, Version};

/// The token of the shard's waker; connection tokens are slab keys.
pub const WAKER: Token = Token(usize::MAX);

/// Size of the shard's read buffer. Big enough for a whole default-size message in one
/// read; only an incomplete frame is ever copied out of it.
const SCRATCH_BYTES: usize = 64 * 1024;

/// Reads handled for one connection per event before serving others, so a flooding peer
/// cannot starve the rest of the shard.
const READ_BUDGET: usize = 16;

/// Events taken from one poll.
const EVENTS_PER_POLL: usize = 1024;

/// Jobs taken from the channel per turn of the loop. Moving a publication into its topic's
/// queue costs a hash lookup, so this only bounds how long sockets and timers wait while a
/// deep channel is drained.
const JOBS_PER_TURN: usize = 4096;

/// Subscriber writes (deliveries attempted) per turn of the loop before the shard polls its
/// sockets and runs its timers again: a flood on one topic delays heartbeats, closes and
/// other connections' reads by at most this much work (about a millisecond on loopback).
const FANOUT_BUDGET: usize = 256;

/// One shard's event loop and everything it owns.
pub(crate) struct Shard {
    poll: Poll,
    jobs: Receiver<Job>,
    /// Set while the shard sleeps in its poll with nothing to do: only then do senders
    /// wake it.
    parked: Arc<AtomicBool>,
    shared: Arc<Shared>,
    slots: Slab<Peer>,
    index: Index,
    /// Sequence number of the last publication fanned out, for once-per-connection delivery.
    seq: u64,
    next_generation: u32,
    /// Heartbeat and close deadlines, by (slot, generation).
    wheel: Wheel<(SlotId, u32)>,
    scratch: Box<[u8]>,
    /// permessage-deflate's compressor and inflater, shared by every connection here.
    codec: Codec,
    started: Instant,
    tick: Duration,
    timing: Timing,
    /// Connections whose read budget ran out with data possibly left (edge-triggered
    /// readiness will not report them again).
    more_to_read: Vec<(SlotId, u32)>,
    /// Bytes queued for all of this shard's connections, and this shard's share of
    /// `max_queued_total_bytes`.
    queued_total: usize,
    queued_share: usize,
    /// Bytes of incomplete inbound frames and fragmented messages held for this shard's
    /// connections, and this shard's share of `max_inbound_buffered_bytes`.
    inbound_total: usize,
    inbound_share: usize,
    /// Publications not fanned out yet, per topic, in offset order.
    pending: HashMap<Arc<str>, VecDeque<Arc<Publication>>>,
    /// Topics with pending publications, served round-robin one publication at a time, so a
    /// flooded topic delays another topic's publication by at most one of its own.
    ready: VecDeque<Arc<str>>,
    /// Reused buffers.
    targets: Vec<SlotId>,
    due: Vec<(SlotId, u32)>,
    outputs: Vec<Output>,
}

impl Shard {
    /// Creates a shard around its poll (whose waker the hub holds) and job channel.
    /// `shards` is how many shards share the gateway-wide buffer budgets.
    pub fn new(
        poll: Poll,
        jobs: Receiver<Job>,
        parked: Arc<AtomicBool>,
        shared: Arc<Shared>,
        shards: usize,
    ) -> Shard {
        let config = &shared.config;
        let shards = shards.max(1);
        let queued_share = config.max_queued_total_bytes / shards;
        let inbound_share = config.max_inbound_buffered_bytes / shards;
        let tick = heartbeat::tick_for(config.ping_interval, config.pong_timeout)
            .min((config.close_timeout / 10).max(heartbeat::MIN_TICK));
        let timing = Timing {
            interval: if config.ping_interval.is_zero() {
                0
            } else {
                heartbeat::ticks(config.ping_interval, tick)
            },
            timeout: heartbeat::ticks(config.pong_timeout, tick),
            close: heartbeat::ticks(config.close_timeout, tick),
        };
        let span = (timing.interval + timing.timeout).max(timing.close);
        let codec = Codec::new(config.deflate_min_bytes);
        Shard {
            poll,
            jobs,
            parked,
            shared,
            slots: Slab::new(),
            index: Index::default(),
            seq: 0,
            next_generation: 0,
            wheel: Wheel::new(span),
            scratch: vec![0; SCRATCH_BYTES].into_boxed_slice(),
            codec,
            started: Instant::now(),
            tick,
            timing,
            more_to_read: Vec::new(),
            queued_total: 0,
            queued_share,
            inbound_total: 0,
            inbound_share,
            pending: HashMap::new(),
            ready: VecDeque::new(),
            targets: Vec::new(),
            due: Vec::new(),
            outputs: Vec::new(),
        }
    }

    fn now_tick(&self) -> u64 {
        (self.started.elapsed().as_nanos() / self.tick.as_nanos().max(1)) as u64
    }

    fn now_ms(&self) -> u32 {
        self.started.elapsed().as_millis() as u32
    }

    /// Runs until the hub is dropped.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        loop {
            // Work left over (the waker will not fire again for jobs already sent) means a
            // poll that only looks at the sockets.
            let mut idle =
                self.more_to_read.is_empty() && self.ready.is_empty() && self.jobs.is_empty();
            if idle {
                // Senders wake a parked shard only (one eventfd write per sleep, not per
                // job). Announced before the last look at the channel, so a job sent after
                // that look sees the flag and wakes the poll.
                self.parked.store(true, Ordering::SeqCst);
                std::sync::atomic::fence(Ordering::SeqCst);
                if !self.jobs.is_empty() {
                    self.parked.store(false, Ordering::SeqCst);
                    idle = false;
                }
            }
            let timeout = if idle {
                let next = (self.now_tick() + 1) as u128 * self.tick.as_nanos();
                let elapsed = self.started.elapsed().as_nanos();
                Duration::from_nanos(next.saturating_sub(elapsed) as u64)
            } else {
                Duration::ZERO
            };
            let polled = self.poll.poll(&mut events, Some(timeout));
            if idle {
                self.parked.store(false, Ordering::SeqCst);
            }
            if let Err(e) = polled
                && e.kind() != std::io::ErrorKind::Interrupted
            {
                tracing::error!(error = %e, "shard poll failed");
                return;
            }
            for event in events.iter() {
                let token = event.token();
                if token == WAKER {
                    continue;
                }
                let slot = token.0 as SlotId;
                if event.is_writable() {
                    self.on_writable(slot);
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.on_readable(slot);
                }
            }
            for (slot, generation) in std::mem::take(&mut self.more_to_read) {
                if self
                    .slots
                    .get(slot as usize)
                    .is_some_and(|c| c.generation == generation)
                {
                    self.on_readable(slot);
                }
            }
            for _ in 0..JOBS_PER_TURN {
                match self.jobs.try_recv() {
                    Ok(job) => self.on_job(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.drop_all(CloseReason::Shutdown);
                        return;
                    }
                }
            }
            self.serve_pending(FANOUT_BUDGET);
            self.shared
                .metrics
                .add_peer_meter(super::peer::take_meter());
            let now = self.now_tick();
            if now > self.wheel.now() {
                self.on_tick(now);
            }
        }
    }

    fn on_job(&mut self, job: Job) {
        match job {
            Job::Publish(publication) => self.enqueue(publication),
            Job::Register {
                stream,
                tls,
                leftover,
                open,
                ip,
            } => self.register(stream, tls, &leftover, *open, ip),
            Job::CloseAll { code, reason } => {
                // Everything accepted before shutdown goes out before the close frames.
                self.serve_pending(usize::MAX);
                let keys: Vec<usize> = self.slots.iter().map(|(k, _)| k).collect();
                for key in keys {
                    if let Some(peer) = self.slots.get_mut(key) {
                        peer.close(code, reason, CloseReason::Shutdown, true);
                    }
                    self.settle(key as SlotId);
                }
            }
            Job::DropAll => self.drop_all(CloseReason::Shutdown),
            Job::Loaded => self.on_loaded(),
            Job::Backfill(backfill) => self.on_backfill(&backfill),
        }
    }

    /// A topic was loaded from the shared bus: the subscription requests that waited for
    /// it (and for nothing else still loading) are answered now. Each topic is read under
    /// its lock like any subscription, so a publication already queued here reaches each
    /// subscriber exactly once: at or before its mark it is skipped, after it delivered.
    fn on_loaded(&mut self) {
        if !self.index.has_openings() {
            return;
        }
        let topics = &self.shared.topics;
        let opened = self
            .index
            .take_opened(|name| topics.get(name).is_some_and(|t| t.state.lock().synced));
        for opening in opened {
            let slot = opening.slot;
            let mut frames = Vec::new();
            let mut marks = Vec::new();
            for (name, since) in opening.topics {
                if let Some((attached, version)) =
                    attach_waiting(slot, &mut self.index, &self.shared, &name, since)
                {
                    frames.extend(attached);
                    if let Some(version) = version {
                        marks.push((name, version));
                    }
                }
            }
            let Some(peer) = self.slots.get_mut(slot as usize) else {
                continue;
            };
            if let Some(ack) = opening.ack {
                let ack = ServerMessage::Subscribed {
                    id: ack.id.as_ref(),
                    topics: &ack.topics,
                    patterns: &ack.patterns,
                    versions: &crate::proto::message::TopicVersions::of(&marks),
                    ts: now_ms(),
                };
                peer.send(ack.to_frame());
            }
            for frame in frames {
                peer.send_message(frame, &mut self.codec);
            }
            if let Transport::Sse(stream) = peer.transport_mut()
                && let Some(line) = stream.mark(&marks)
            {
                peer.send(line);
            }
            self.settle(slot);
        }
    }

    /// The engine's history after a version arrived: the subscriptions that resumed from
    /// it, further back than this node's history, get their replay now.
    fn on_backfill(&mut self, backfill: &Backfill) {
        let slots = self.index.take_backfilled(&backfill.topic, backfill.from);
        if slots.is_empty() {
            return;
        }
        let Some(topic) = self.shared.topics.get(&backfill.topic) else {
            return;
        };
        for slot in slots {
            let filter = self.index.filter_of(&backfill.topic, slot);
            let mut state = topic.state.lock();
            let version = state.history.version();
            let (frames, after) = replay_backfilled(
                &mut state,
                &backfill.topic,
                backfill.from,
                &backfill.entries,
                filter.as_deref(),
            );
            drop(state);
            self.index.set_after(&backfill.topic, slot, after);
            let Some(peer) = self.slots.get_mut(slot as usize) else {
                continue;
            };
            for frame in frames {
                peer.send_message(frame, &mut self.codec);
            }
            if let Transport::Sse(stream) = peer.transport_mut()
                && let Some(line) = stream.mark(&[(topic.name.clone(), version)])
            {
                peer.send(line);
            }
            self.settle(slot);
        }
    }

    /// Queues a publication behind its topic's earlier ones.
    fn enqueue(&mut self, publication: Arc<Publication>) {
        let queue = self.pending.entry(publication.topic.clone()).or_default();
        if queue.is_empty() {
            self.ready.push_back(publication.topic.clone());
        }
        queue.push_back(publication);
    }

    /// Fans out pending publications, one per topic in turn, until `budget` deliveries were
    /// attempted or nothing is pending.
    fn serve_pending(&mut self, budget: usize) {
        let mut spent = 0;
        while spent < budget {
            let Some(topic) = self.ready.pop_front() else {
                break;
            };
            let Some(queue) = self.pending.get_mut(&topic) else {
                continue;
            };
            let Some(publication) = queue.pop_front() else {
                self.pending.remove(&topic);
                continue;
            };
            if queue.is_empty() {
                // Dropped, so the map holds only topics with something pending.
                self.pending.remove(&topic);
            } else {
                self.ready.push_back(topic);
            }
            spent += self.fan_out(publication).max(1);
        }
        if self.pending.is_empty() && self.pending.capacity() > 1024 {
            self.pending.shrink_to(64);
            self.ready.shrink_to(64);
        }
    }

    /// Writes one publication's shared frame to every subscriber of its topic on this shard
    /// that has not already had it (snapshot or replay) and whose filter matches.
    /// Returns the deliveries attempted. Its ticket (the publication's place in the publish
    /// queues) is given back when this returns, once every shard has done the same.
    fn fan_out(&mut self, publication: Arc<Publication>) -> usize {
        let topic = &publication.topic;
        let offset = publication.offset;
        self.seq += 1;
        let seq = self.seq;
        let targets = &mut self.targets;
        // Parsed at most once per publication, and only if some subscriber filters.
        let mut fields: Option<EventFields> = None;
        self.index.for_each_match(topic, |sub| {
            if offset <= sub.after {
                return;
            }
            if let Some(filter) = &sub.filter {
                let Some(data) = &publication.data else {
                    return;
                };
                let fields = fields.get_or_insert_with(|| EventFields::parse(data));
                if !filter.matches_fields(fields) {
                    return;
                }
            }
            targets.push(sub.slot);
        });
        let attempted = self.targets.len();
        if let Some(mark) = publication.rebase {
            // The topic's history was replaced: after this frame, its subscribers continue
            // from the new history's positions.
            for &slot in &self.targets {
                self.index.set_after(topic, slot, mark);
            }
        }
        let mut delivered = 0;
        let mut unsettled = Vec::new();
        for slot in self.targets.drain(..) {
            let Some(peer) = self.slots.get_mut(slot as usize) else {
                continue;
            };
            if peer.last_seq == seq {
                continue;
            }
            peer.last_seq = seq;
            match peer.deliver(&publication, &mut self.codec) {
                Delivery::Written => delivered += 1,
                Delivery::Queued => {
                    delivered += 1;
                    reconcile(peer, &mut self.queued_total, &mut self.inbound_total);
                    // The socket was full: ask to hear when it drains. Past the shard's
                    // share of the queue budget, it is treated as a slow consumer.
                    if !peer.write_interest || self.queued_total > self.queued_share {
                        unsettled.push(slot);
                    }
                }
                Delivery::Overflowed => unsettled.push(slot),
                // The write just failed: end the peer now.
                Delivery::Dropped if peer.phase() == Phase::Broken => unsettled.push(slot),
                // Closing (or a multi-topic stream that already had it): nothing to do.
                Delivery::Dropped => {}
            }
        }
        self.shared.metrics.delivered(delivered);
        for slot in unsettled {
            let force = self.queued_total > self.queued_share;
            self.on_overflow(slot, topic, offset, force);
            self.settle(slot);
        }
        if self.targets.capacity() > 4096 {
            self.targets.shrink_to(4096);
        }
        // The ticket (the publication's place in the publish queues) is given back when the
        // last shard drops its reference.
        attempted
    }

    /// A peer whose queue overflowed on `topic`'s publication `offset`. One that
    /// follows only state documents drops its backlog for fresh snapshots. Any other gets
    /// what is already queued and then close 1013, whose reason names the last version
    /// queued, so it resumes exactly with `since` (or is told by `history_truncated` what
    /// history no longer has): never silent loss.
    /// With `force` it acts though the connection is within its own limit: the shard is
    /// over its share of `max_queued_total_bytes`.
    fn on_overflow(&mut self, slot: SlotId, topic: &str, offset: u64, force: bool) {
        let Some(peer) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if !peer.phase().is_open() || !(force || peer.over_limit()) {
            return;
        }
        let topics: Vec<Arc<str>> = peer
            .subscriptions
            .iter()
            .filter_map(|s| match s {
                Subscription::Topic(t) => Some(t.clone()),
                Subscription::Pattern(_) => None,
            })
            .collect();
        // Over the shared budget, fresh snapshots would only add to it: close instead.
        let state_only = !force
            && topics.len() == peer.subscriptions.len()
            && !topics.is_empty()
            && topics.iter().all(|t| {
                self.shared
                    .topics
                    .get(t)
                    .is_some_and(|topic| matches!(topic.state.lock().content, Content::State(_)))
            });
        if !state_only {
            let epoch = self
                .shared
                .topics
                .get(topic)
                .map(|t| t.state.lock().history.epoch());
            let reason = match epoch {
                Some(epoch) => {
                    let version = Version::new(epoch, offset);
                    format!("slow consumer; last queued {topic} {version}; resume with since")
                }
                None => "slow consumer; resume with since".to_string(),
            };
            peer.close(
                CloseCode::TryAgainLater,
                &reason,
                CloseReason::SlowConsumer,
                true,
            );
            return;
        }
        peer.drop_queued();
        for name in topics {
            let Some(topic) = self.shared.topics.get(&name) else {
                continue;
            };
            let mut state = topic.state.lock();
            let version = state.version();
            let Content::State(doc) = &mut state.content else {
                continue;
            };
            let snapshot = doc.snapshot(&name);
            // A `closed` that was in the dropped backlog is not fanned out again: say it here.
            let closed = state
                .closed
                .then(|| encode_closed(&name, version.to_buf().as_str(), now_ms()));
            drop(state);
            let after = if closed.is_some() {
                u64::MAX
            } else {
                version.offset
            };
            self.index.set_after(&name, slot, after);
            let _ = peer.send_message(snapshot, &mut self.codec);
            if let Some(closed) = closed {
                let _ = peer.send_message(closed, &mut self.codec);
            }
        }
    }

    fn register(
        &mut self,
        stream: std::net::TcpStream,
        mut tls: Option<Box<rustls::ServerConnection>>,
        leftover: &[u8],
        open: Open,
        ip: crate::hub::peers::IpSlot,
    ) {
        if let Some(conn) = &mut tls {
            super::tls::adopt(conn);
        }
        let mut stream = mio::net::TcpStream::from_std(stream);
        let clock_ms = self.now_ms();
        let entry = self.slots.vacant_entry();
        let slot = entry.key();
        // Readable only: writability is asked for only while bytes are queued, since with
        // edge-triggered polling every ACK that frees send-buffer space would otherwise wake
        // the shard once per delivery.
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(slot), Interest::READABLE)
        {
            tracing::warn!(error = %e, "cannot register a connection");
            self.shared.connection_released(CloseReason::IoError);
            return;
        }
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let config = &self.shared.config;
        let now = self.wheel.now();
        let limiter = RateLimiter::new(config.rate_limit, clock_ms);
        // Each connection's heartbeat runs its own few ticks early, so connections opened
        // together do not ping (and read pongs) together.
        let early = heartbeat::stagger(self.timing.interval, rand::random());
        let (transport, max_queued, subscribe_to, identity) = match open {
            Open::WebSocket {
                mode,
                subscribe,
                identity,
                deflate,
            } => {
                let max_queued = match mode {
                    // An echoed message must fit the outbox whole.
                    Mode::Echo => config
                        .max_queued_bytes
                        .max(2 * crate::proto::session::ECHO_MAX_MESSAGE),
                    Mode::Gateway => config.max_queued_bytes,
                };
                let request = subscribe.map(|topic| SubscriptionRequest {
                    topics: vec![topic],
                    ..SubscriptionRequest::default()
                });
                let session = Session::new(mode, now)
                    .with_deflate(deflate)
                    .with_stagger(early);
                let transport = Transport::WebSocket(session);
                (transport, max_queued, request.map(|r| (r, None)), identity)
            }
            Open::Sse(SseOpen {
                request,
                single,
                base_ms,
                identity,
            }) => {
                let stream = if single {
                    SseStream::single()
                } else {
                    let base =
                        (!request.patterns.is_empty()).then(|| base_ms.unwrap_or_else(now_ms));
                    SseStream::multi(&request.topics, base)
                };
                let transport = Transport::Sse(Box::new(stream));
                let subscribe = Some((request, base_ms));
                (transport, config.max_queued_bytes, subscribe, identity)
            }
        };
        let is_sse = matches!(transport, Transport::Sse(_));
        let is_tls = tls.is_some();
        entry.insert(Peer::new(
            stream, tls, generation, transport, max_queued, limiter, ip,
        ));
        let slot = slot as SlotId;
        tracing::debug!(slot, generation, sse = is_sse, "peer open");
        if let Some(peer) = self.slots.get_mut(slot as usize) {
            peer.set_access(identity.map(|identity| Access {
                identity,
                warned: false,
            }));
        }
        let first = (self.timing.interval != 0)
            .then(|| now + u64::from(self.timing.interval.saturating_sub(early)));
        if let Some(at) = self.with_expiry(slot, first) {
            self.wheel.insert(at, (slot, generation));
        }
        if let Some(peer) = self.slots.get_mut(slot as usize) {
            if is_sse {
                let retry = self.shared.config.sse_retry.as_millis() as u64;
                let _ = peer.send(sse::retry(retry));
            }
            if let Some((request, base_ms)) = subscribe_to {
                open_subscription(
                    peer,
                    slot,
                    &mut self.index,
                    &self.shared,
                    &request,
                    base_ms,
                    &mut self.codec,
                );
            }
            if self.shared.is_shutting_down() {
                peer.close(
                    CloseCode::GoingAway,
                    "server shutting down",
                    CloseReason::Shutdown,
                    true,
                );
            }
        }
        if !leftover.is_empty() {
            let mut leftover = leftover.to_vec();
            self.on_bytes(slot, &mut leftover, now);
        }
        if is_tls {
            // rustls may hold records read with the request but not yet decrypted or
            // handed on: no readiness event will announce those.
            self.more_to_read.push((slot, generation));
        }
        self.settle(slot);
    }

    /// Feeds bytes a peer sent to its transport and serves what they complete.
    fn on_bytes(&mut self, slot: SlotId, data: &mut [u8], now: u64) {
        let max_message = self.shared.config.max_message_bytes;
        let now_ms = self.now_ms();
        let Some(peer) = self.slots.get_mut(slot as usize) else {
            return;
        };
        let Transport::WebSocket(session) = peer.transport_mut() else {
            // An SSE client has nothing to say after its request (HTTP/1.1 pipelining
            // behind a stream that never ends is no request either): end the stream rather
            // than keep reading what it sends.
            peer.close(
                CloseCode::Policy,
                "an SSE client sends nothing after its request",
                CloseReason::ProtocolError,
                false,
            );
            return;
        };
        let max_message = session.max_message(max_message);
        let mut outputs = std::mem::take(&mut self.outputs);
        session.handle_bytes(data, now, max_message, &mut self.codec, &mut outputs);
        // Messages before a close in the same read were received while open: serve them.
        peer.replying = true;
        for output in outputs.drain(..) {
            if matches!(output, Output::Close { .. }) {
                peer.replying = false;
            }
            if let Some(text) = peer.apply(output) {
                serve(
                    peer,
                    &text,
                    slot,
                    &mut self.index,
                    &self.shared,
                    now_ms,
                    &mut self.codec,
                );
            }
        }
        peer.replying = false;
        self.outputs = outputs;
    }

    fn on_readable(&mut self, slot: SlotId) {
        let now = self.wheel.now().max(self.now_tick());
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut alive = true;
        let mut more = true;
        for _ in 0..READ_BUDGET {
            let Some(peer) = self.slots.get_mut(slot as usize) else {
                more = false;
                break;
            };
            match peer.read(&mut scratch) {
                // TLS records without application data (yet).
                Received::Bytes(0) => {}
                Received::Bytes(n) => self.on_bytes(slot, &mut scratch[..n], now),
                Received::WouldBlock => {
                    more = false;
                    break;
                }
                Received::Gone => {
                    alive = false;
                    more = false;
                    break;
                }
            }
        }
        self.scratch = scratch;
        let Some(peer) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if !alive {
            // EOF or a read error: the peer is gone. Without a close frame first, that is
            // an I/O error; during a close handshake it ends the handshake.
            peer.break_off(CloseReason::IoError);
        } else if more {
            self.more_to_read.push((slot, peer.generation));
        }
        self.settle(slot);
    }

    fn on_writable(&mut self, slot: SlotId) {
        if let Some(peer) = self.slots.get_mut(slot as usize)
            && peer.has_queued()
        {
            peer.flush();
            self.settle(slot);
        }
    }

    /// Moves a peer along after anything happened to it: flush what a reply queued, end it
    /// when its close is done or it broke, arm its close deadline.
    fn settle(&mut self, slot: SlotId) {
        let now = self.wheel.now().max(self.now_tick());
        let Some(peer) = self.slots.get_mut(slot as usize) else {
            return;
        };
        reconcile(peer, &mut self.queued_total, &mut self.inbound_total);
        if self.inbound_total > self.inbound_share && peer.inbound_bytes() > 0 {
            // The shard holds too much half-received input: this peer, which holds some of
            // it, is told to come back later.
            peer.shed_inbound();
        }
        // While registered for writability the socket was full at the last try: wait for
        // the event instead of a write that would fail again.
        if peer.has_queued() && peer.phase() != Phase::Broken && !peer.write_interest {
            peer.flush();
        }
        let want_write = peer.has_queued() && peer.phase() != Phase::Broken;
        if want_write != peer.write_interest {
            let interest = if want_write {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            // Modifying the registration re-checks readiness, so a socket that became
            // writable meanwhile is reported at once.
            if self
                .poll
                .registry()
                .reregister(peer.stream_mut(), Token(slot as usize), interest)
                .is_ok()
            {
                peer.write_interest = want_write;
            }
        }
        reconcile(peer, &mut self.queued_total, &mut self.inbound_total);
        if peer.phase().is_open() && peer.over_limit() {
            // Overflowed by a reply or a ping rather than a publication.
            peer.close(
                CloseCode::TryAgainLater,
                "slow consumer",
                CloseReason::SlowConsumer,
                true,
            );
        }
        match peer.phase() {
            Phase::Open => {}
            Phase::Broken => self.finish(slot),
            Phase::Closing if !peer.has_queued() => self.finish(slot),
            Phase::CloseSent | Phase::Closing => {
                let generation = peer.generation;
                let deadline = match peer.transport_mut() {
                    Transport::WebSocket(session) => session.arm_close_deadline(now, &self.timing),
                    // An SSE stream has no handshake, but its last bytes may never drain.
                    Transport::Sse(stream) => stream.arm_close_deadline(now, &self.timing),
                };
                if let Some(deadline) = deadline {
                    self.wheel.insert(deadline, (slot, generation));
                }
            }
        }
    }

    /// Ends a peer: out of the index and the slab, counted, FIN to the client.
    fn finish(&mut self, slot: SlotId) {
        if !self.slots.contains(slot as usize) {
            return;
        }
        let mut peer = self.slots.remove(slot as usize);
        let (queued, inbound) = peer.accounted;
        self.queued_total -= queued as usize;
        self.inbound_total -= inbound as usize;
        for sub in peer.subscriptions.drain(..) {
            match sub {
                Subscription::Topic(t) => {
                    self.index.remove_topic(&t, slot);
                    detach(&self.shared, &t);
                }
                Subscription::Pattern(p) => {
                    self.index.remove_pattern(&p, slot);
                    unfollow_pattern(&self.shared, &p);
                }
            }
        }
        let _ = self.poll.registry().deregister(peer.stream_mut());
        // Counted before the client can see the end, so what it observes is already counted.
        self.shared.connection_released(peer.reason);
        tracing::debug!(slot, reason = ?peer.reason, "peer closed");
        peer.shutdown();
        if self.slots.is_empty() {
            // Release the slab's memory after a wave of connections has gone.
            self.slots.shrink_to_fit();
        }
    }

    fn drop_all(&mut self, reason: CloseReason) {
        self.pending.clear();
        self.ready.clear();
        let keys: Vec<usize> = self.slots.iter().map(|(k, _)| k).collect();
        for key in keys {
            if let Some(peer) = self.slots.get_mut(key) {
                peer.break_off(reason);
            }
            self.finish(key as SlotId);
        }
    }

    /// Heartbeats and close deadlines that came due.
    fn on_tick(&mut self, now: u64) {
        let mut due = std::mem::take(&mut self.due);
        self.wheel.advance(now, &mut due);
        let mut outputs = std::mem::take(&mut self.outputs);
        // One ping frame (and JSON ping) per tick, shared by every peer due.
        let mut ping: Option<Bytes> = None;
        let mut json_ping: Option<Bytes> = None;
        for (slot, generation) in due.drain(..) {
            let Some(peer) = self.slots.get_mut(slot as usize) else {
                continue;
            };
            if peer.generation != generation {
                continue;
            }
            if self.on_expiry(slot) {
                // Closed for its expired token; its close deadline is armed by `settle`.
                self.settle(slot);
                continue;
            }
            let Some(peer) = self.slots.get_mut(slot as usize) else {
                continue;
            };
            let verdict = match peer.transport_mut() {
                Transport::WebSocket(session) => {
                    session.handle_timeout(now, &self.timing, &mut outputs)
                }
                Transport::Sse(stream) => stream.handle_timeout(now, &self.timing),
            };
            let Some(peer) = self.slots.get_mut(slot as usize) else {
                continue;
            };
            match verdict {
                Due::Never => {
                    if let Some(at) = self.with_expiry(slot, None) {
                        self.wheel.insert(at, (slot, generation));
                    }
                }
                Due::At(at) => {
                    if let Some(at) = self.with_expiry(slot, Some(at)) {
                        self.wheel.insert(at, (slot, generation));
                    }
                }
                Due::Ping(at) => {
                    if matches!(peer.transport(), Transport::Sse(_)) {
                        let _ = peer.send(Bytes::from_static(sse::HEARTBEAT));
                    } else {
                        let ping = ping
                            .get_or_insert_with(|| frame::encode(Kind::Ping, b""))
                            .clone();
                        let _ = peer.send(ping);
                        if self.shared.config.json_ping {
                            let json = json_ping
                                .get_or_insert_with(|| {
                                    ServerMessage::Ping { ts: now_ms() }.to_frame()
                                })
                                .clone();
                            let _ = peer.send(json);
                        }
                    }
                    if let Some(at) = self.with_expiry(slot, Some(at)) {
                        self.wheel.insert(at, (slot, generation));
                    }
                    self.settle(slot);
                }
                Due::PongTimeout => {
                    for output in outputs.drain(..) {
                        let _ = peer.apply(output);
                    }
                    peer.reason = CloseReason::Timeout;
                    self.settle(slot);
                }
                Due::CloseTimeout => {
                    // The client never finished the close handshake (or never read its last
                    // bytes).
                    if peer.reason == CloseReason::Normal {
                        peer.reason = CloseReason::Timeout;
                    }
                    peer.break_off(peer.reason);
                    self.finish(slot);
                }
            }
            outputs.clear();
        }
        self.outputs = outputs;
        self.due = due;
    }

    /// The tick to look at a peer again: `at` (its transport's next timer), or sooner when
    /// its token's expiry warning or expiry comes first. Expiry rides the heartbeat's wheel
    /// entry, so it costs no timer of its own.
    fn with_expiry(&self, slot: SlotId, at: Option<u64>) -> Option<u64> {
        let peer = self.slots.get(slot as usize)?;
        let expiry = peer.access().and_then(|access| {
            let expires = access.identity.expires?;
            let warn = self.shared.auth.token_expiring().as_secs();
            // An SSE client cannot refresh: it is only ended at expiry.
            let sse = matches!(peer.transport(), Transport::Sse(_));
            let next = if access.warned || sse {
                expires
            } else {
                expires.saturating_sub(warn)
            };
            let wait = next.saturating_sub(crate::auth::unix_now());
            let ticks = (wait * 1000) / (self.tick.as_millis().max(1) as u64);
            Some(self.now_tick() + ticks)
        });
        match (at, expiry) {
            (Some(a), Some(e)) => Some(a.min(e)),
            (a, e) => a.or(e),
        }
    }

    /// Warns a peer whose token expires within `token_expiring`, or closes one whose token
    /// has expired (4001 `token_expired`; an SSE stream's final `close` event says so).
    /// Returns whether it closed it.
    fn on_expiry(&mut self, slot: SlotId) -> bool {
        let warn = self.shared.auth.token_expiring().as_secs();
        let Some(peer) = self.slots.get_mut(slot as usize) else {
            return false;
        };
        let is_sse = matches!(peer.transport(), Transport::Sse(_));
        let Some(access) = peer.access_mut() else {
            return false;
        };
        let Some(expires) = access.identity.expires else {
            return false;
        };
        let now = crate::auth::unix_now();
        if now >= expires {
            if peer.phase().is_open() {
                peer.close(
                    CloseCode::Other(crate::auth::TOKEN_EXPIRED_CLOSE_CODE),
                    crate::auth::TOKEN_EXPIRED_REASON,
                    CloseReason::TokenExpired,
                    false,
                );
                return true;
            }
            return false;
        }
        if !access.warned && !is_sse && now + warn >= expires {
            access.warned = true;
            let frame = ServerMessage::TokenExpiring {
                expires,
                ts: now_ms(),
            }
            .to_frame();
            let _ = peer.send(frame);
        }
        false
    }
}

/// Subscribes a new peer to what its request or stream named, and says so: a WebSocket
/// gets `subscribed` (or an `error`) before its snapshots; an SSE stream gets its snapshots
/// and replays, then its first cursor, or an `error` event and its end.
fn open_subscription(
    peer: &mut Peer,
    slot: SlotId,
    index: &mut Index,
    shared: &Shared,
    request: &SubscriptionRequest,
    base_ms: Option<u64>,
    codec: &mut Codec,
) {
    let is_sse = matches!(peer.transport(), Transport::Sse(_));
    match subscribe(peer, slot, index, shared, request, base_ms) {
        Ok(opened) => {
            if let Some(topics) = opened.waiting {
                let ack = (!is_sse).then(|| Ack {
                    id: None,
                    topics: request.topics.clone(),
                    patterns: request.patterns.clone(),
                });
                index.wait(Opening { slot, topics, ack });
                return;
            }
            if !is_sse {
                let ack = ServerMessage::Subscribed {
                    id: None,
                    topics: &request.topics,
                    patterns: &request.patterns,
                    versions: &crate::proto::message::TopicVersions::of(&opened.marks),
                    ts: now_ms(),
                };
                peer.send(ack.to_frame());
            }
            for frame in opened.frames {
                peer.send_message(frame, codec);
            }
            if let Transport::Sse(stream) = peer.transport_mut()
                && let Some(line) = stream.mark(&opened.marks)
            {
                peer.send(line);
            }
        }
        Err(e) => {
            peer.send_message(error_frame(e.code(), &e.to_string(), None), codec);
            if is_sse {
                peer.close(
                    CloseCode::Policy,
                    e.code(),
                    CloseReason::ProtocolError,
                    true,
                );
            }
        }
    }
}

/// Brings the shard's budget totals up to date with what `peer` holds now.
fn reconcile(peer: &mut Peer, queued_total: &mut usize, inbound_total: &mut usize) {
    // Both fit in u32: a queue is bounded by `max_queued_bytes` plus one frame, inbound data
    // by twice `max_message_bytes`.
    let now = (
        peer.queued_bytes().min(u32::MAX as usize) as u32,
        peer.inbound_bytes().min(u32::MAX as usize) as u32,
    );
    let (queued, inbound) = peer.accounted;
    *queued_total = *queued_total + now.0 as usize - queued as usize;
    *inbound_total = *inbound_total + now.1 as usize - inbound as usize;
    peer.accounted = now;
}
