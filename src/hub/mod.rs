//! The hub: connection registry, subscriptions, topics and fan-out.
//!
//! Connections are spread over shards; each shard owns a slab of connection slots
//! (addressed by generational [`ConnId`]s), the subscription [`Index`] of those connections,
//! and one fan-out thread. A publication is encoded once, then handed to every shard's
//! thread, so one publication's fan-out runs on every core at once while each shard writes
//! to its own subscribers in publication order.

pub mod conn;
pub mod index;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, RwLock};
use slab::Slab;

use crate::Config;
use crate::heartbeat::{self, Action, Beat, Wheel};
use crate::metrics::Metrics;
use crate::proto::CloseCode;
use crate::proto::frame::{self, Kind};
use crate::proto::message::{ServerMessage, encode_event, now_ms};
use crate::topic::{NameError, Pattern, validate_topic};
pub use conn::{Conn, Delivery, OutState};
pub use index::{Index, SlotId};

/// A connection's identity: shard, slab slot, and the slot's generation, so an id kept after
/// its connection ended never reaches the connection that reuses the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    shard: u32,
    slot: SlotId,
    generation: u32,
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.shard, self.slot, self.generation)
    }
}

/// The result of a successful publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The topic published to.
    pub topic: String,
    /// The publication's offset within the topic (the first is 1).
    pub offset: u64,
}

/// Why a publication was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The topic name is invalid.
    #[error(transparent)]
    InvalidTopic(#[from] NameError),
    /// The payload is not one JSON value.
    #[error("the payload is not valid JSON: {0}")]
    InvalidJson(String),
    /// The payload is larger than `max_publish_bytes`.
    #[error("the payload is larger than {limit} bytes")]
    TooLarge {
        /// The configured limit.
        limit: usize,
    },
}

/// Why a subscription request was refused, per topic or pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// A topic or pattern is malformed.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The connection would exceed `max_subscriptions`.
    #[error("more than {0} subscriptions on one connection")]
    TooMany(usize),
}

impl SubscribeError {
    /// The stable error code sent to the client.
    pub fn code(&self) -> &'static str {
        match self {
            SubscribeError::Name(NameError::InvalidTopic(_)) => "invalid_topic",
            SubscribeError::Name(NameError::InvalidPattern(_)) => "invalid_pattern",
            SubscribeError::TooMany(_) => "too_many_subscriptions",
        }
    }
}

/// One subscription of a connection, kept so it can be removed when the connection ends.
#[derive(Debug)]
enum Subscription {
    Topic(Arc<str>),
    Pattern(Box<Pattern>),
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    conn: Arc<Conn>,
    subscriptions: Vec<Subscription>,
    /// The shard sequence number of the last publication delivered, to deliver once to a
    /// connection subscribed to a topic both directly and through patterns.
    last_seq: u64,
    beat: Beat,
}

#[derive(Debug)]
struct ShardState {
    slots: Slab<Slot>,
    index: Index,
    seq: u64,
    next_generation: u32,
    /// Heartbeat deadlines of this shard's connections.
    wheel: Wheel<(SlotId, u32)>,
}

#[derive(Debug)]
struct Shard {
    state: Mutex<ShardState>,
}

enum Job {
    Publish {
        topic: Arc<str>,
        frame: Bytes,
    },
    /// Close every connection of the shard, after the publications queued before this job.
    CloseAll {
        code: CloseCode,
        reason: &'static str,
    },
}

#[derive(Debug)]
struct Topic {
    name: Arc<str>,
    /// The last offset published; the lock also orders the hand-off to the shards.
    last_offset: Mutex<u64>,
}

/// The shared core of a gateway.
#[derive(Debug)]
pub struct Hub {
    config: Config,
    shards: Box<[Arc<Shard>]>,
    senders: Box<[Sender<Job>]>,
    topics: RwLock<HashMap<Arc<str>, Arc<Topic>>>,
    next_shard: AtomicUsize,
    metrics: Arc<Metrics>,
    shutting_down: AtomicBool,
    started: Instant,
    /// The heartbeat clock, in ticks since start; advanced by [`Hub::heartbeat_tick`].
    clock: AtomicU64,
    tick: Duration,
    interval_ticks: u32,
    timeout_ticks: u32,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Publish { topic, .. } => write!(f, "Publish({topic})"),
            Job::CloseAll { code, .. } => write!(f, "CloseAll({code:?})"),
        }
    }
}

impl Hub {
    /// Creates the hub and starts its fan-out threads; they stop when the hub is dropped.
    pub fn new(config: Config) -> Hub {
        let threads = match config.fanout_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let metrics = Arc::new(Metrics::default());
        let mut shards = Vec::with_capacity(threads);
        let mut senders = Vec::with_capacity(threads);
        let tick = heartbeat::tick_for(config.ping_interval, config.pong_timeout);
        let interval_ticks = heartbeat::ticks(config.ping_interval, tick);
        let timeout_ticks = heartbeat::ticks(config.pong_timeout, tick);
        for i in 0..threads {
            let shard = Arc::new(Shard {
                state: Mutex::new(ShardState {
                    slots: Slab::new(),
                    index: Index::default(),
                    seq: 0,
                    next_generation: 0,
                    wheel: Wheel::new(interval_ticks + timeout_ticks),
                }),
            });
            let (tx, rx) = crossbeam_channel::unbounded();
            let worker = shard.clone();
            let worker_metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("tidings-fanout-{i}"))
                .spawn(move || fanout_loop(&worker, &rx, &worker_metrics))
                .expect("spawning a fan-out thread");
            shards.push(shard);
            senders.push(tx);
        }
        Hub {
            config,
            shards: shards.into(),
            senders: senders.into(),
            topics: RwLock::new(HashMap::new()),
            next_shard: AtomicUsize::new(0),
            metrics,
            shutting_down: AtomicBool::new(false),
            started: Instant::now(),
            clock: AtomicU64::new(0),
            tick,
            interval_ticks,
            timeout_ticks,
        }
    }

    /// The configuration the hub runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The hub's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Registers an upgraded connection in the next shard.
    pub fn register(&self, conn: Arc<Conn>) -> ConnId {
        let shard_no = self.next_shard.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        let mut state = self.shards[shard_no].state.lock();
        state.next_generation = state.next_generation.wrapping_add(1);
        let generation = state.next_generation;
        let now = self.clock();
        conn.touch(now);
        let slot = state.slots.insert(Slot {
            generation,
            conn,
            subscriptions: Vec::new(),
            last_seq: 0,
            beat: Beat::Idle,
        }) as SlotId;
        if self.heartbeats_enabled() {
            let at = now + u64::from(self.interval_ticks);
            state.wheel.insert(at, (slot, generation));
        }
        self.metrics.connection_opened();
        ConnId {
            shard: shard_no as u32,
            slot,
            generation,
        }
    }

    /// Removes a connection and all its subscriptions.
    pub fn unregister(&self, id: ConnId) {
        let mut guard = self.shards[id.shard as usize].state.lock();
        let state = &mut *guard;
        let live = state
            .slots
            .get(id.slot as usize)
            .is_some_and(|s| s.generation == id.generation);
        if !live {
            return;
        }
        let slot = state.slots.remove(id.slot as usize);
        for sub in slot.subscriptions {
            match sub {
                Subscription::Topic(t) => state.index.remove_topic(&t, id.slot),
                Subscription::Pattern(p) => state.index.remove_pattern(&p, id.slot),
            }
        }
        if state.slots.is_empty() {
            // Release the slab's memory after a wave of connections has gone.
            state.slots.shrink_to_fit();
        }
    }

    /// Subscribes a connection to topics and patterns, all or nothing.
    /// Subscribing to what is already subscribed is a no-op.
    pub fn subscribe(
        &self,
        id: ConnId,
        topics: &[String],
        patterns: &[String],
    ) -> Result<(), SubscribeError> {
        for t in topics {
            validate_topic(t)?;
        }
        let parsed = patterns
            .iter()
            .map(|p| Pattern::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut guard = self.shards[id.shard as usize].state.lock();
        let state = &mut *guard;
        let Some(slot) = state.slots.get_mut(id.slot as usize) else {
            return Ok(());
        };
        if slot.generation != id.generation {
            return Ok(());
        }
        let new_topics: Vec<&String> = topics
            .iter()
            .filter(|t| {
                !slot
                    .subscriptions
                    .iter()
                    .any(|s| matches!(s, Subscription::Topic(x) if **x == ***t))
            })
            .collect();
        let new_patterns: Vec<Pattern> = parsed
            .into_iter()
            .filter(|p| {
                !slot
                    .subscriptions
                    .iter()
                    .any(|s| matches!(s, Subscription::Pattern(x) if **x == *p))
            })
            .collect();
        let total = slot.subscriptions.len() + new_topics.len() + new_patterns.len();
        if total > self.config.max_subscriptions {
            return Err(SubscribeError::TooMany(self.config.max_subscriptions));
        }
        for t in new_topics {
            // Share one allocation of the name between the index and every subscriber.
            let name: Arc<str> = match state.index.topic_key(t) {
                Some(existing) => existing,
                None => Arc::from(t.as_str()),
            };
            state.index.add_topic(&name, id.slot);
            slot.subscriptions.push(Subscription::Topic(name));
        }
        for p in new_patterns {
            state.index.add_pattern(&p, id.slot);
            slot.subscriptions.push(Subscription::Pattern(Box::new(p)));
        }
        Ok(())
    }

    /// Removes subscriptions; names not subscribed are ignored, malformed ones refused.
    pub fn unsubscribe(
        &self,
        id: ConnId,
        topics: &[String],
        patterns: &[String],
    ) -> Result<(), SubscribeError> {
        for t in topics {
            validate_topic(t)?;
        }
        let parsed = patterns
            .iter()
            .map(|p| Pattern::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut guard = self.shards[id.shard as usize].state.lock();
        let state = &mut *guard;
        let Some(slot) = state.slots.get_mut(id.slot as usize) else {
            return Ok(());
        };
        if slot.generation != id.generation {
            return Ok(());
        }
        slot.subscriptions.retain(|s| match s {
            Subscription::Topic(t) if topics.iter().any(|x| **x == **t) => {
                state.index.remove_topic(t, id.slot);
                false
            }
            Subscription::Pattern(p) if parsed.contains(p) => {
                state.index.remove_pattern(p, id.slot);
                false
            }
            _ => true,
        });
        Ok(())
    }

    /// Publishes one JSON value (already validated) to `topic`.
    ///
    /// The event frame is encoded here, once; each shard's fan-out thread writes a reference
    /// to it to every matching subscriber. Returns once the fan-out is handed off.
    pub fn publish(&self, topic: &str, data: &[u8]) -> Result<Published, PublishError> {
        validate_topic(topic)?;
        let topic = self.topic(topic);
        let mut last = topic.last_offset.lock();
        *last += 1;
        let offset = *last;
        let frame = encode_event(&topic.name, offset, data, now_ms());
        // Handing off under the topic's lock keeps every shard's queue in offset order.
        for tx in self.senders.iter() {
            let job = Job::Publish {
                topic: topic.name.clone(),
                frame: frame.clone(),
            };
            // A send fails only if a fan-out thread died, which it does only on hub drop.
            let _ = tx.send(job);
        }
        drop(last);
        self.metrics.published();
        Ok(Published {
            topic: topic.name.to_string(),
            offset,
        })
    }

    fn topic(&self, name: &str) -> Arc<Topic> {
        if let Some(t) = self.topics.read().get(name) {
            return t.clone();
        }
        let mut topics = self.topics.write();
        topics
            .entry(Arc::from(name))
            .or_insert_with_key(|key| {
                self.metrics.topic_created();
                Arc::new(Topic {
                    name: key.clone(),
                    last_offset: Mutex::new(0),
                })
            })
            .clone()
    }

    /// The heartbeat clock: ticks since start.
    pub fn clock(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }

    /// Milliseconds since the hub started, for rate limiting.
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The heartbeat tick length; [`Hub::heartbeat_tick`] should run this often.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// Whether connections are pinged at all.
    pub fn heartbeats_enabled(&self) -> bool {
        !self.config.ping_interval.is_zero()
    }

    /// Advances the heartbeat clock one tick: pings connections silent for a ping interval
    /// and closes (1011) those silent for the pong timeout after a ping. Costs time in
    /// proportion to the connections due, not to all connections.
    pub fn heartbeat_tick(&self) {
        let now = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
        let ping = frame::encode(Kind::Ping, b"");
        let json_ping = self
            .config
            .json_ping
            .then(|| ServerMessage::Ping { ts: now_ms() }.to_frame());
        let mut due = Vec::new();
        let mut to_ping = Vec::new();
        let mut to_close = Vec::new();
        for shard in self.shards.iter() {
            {
                let mut guard = shard.state.lock();
                let state = &mut *guard;
                state.wheel.advance(now, &mut due);
                for (slot_id, generation) in due.drain(..) {
                    let Some(slot) = state.slots.get_mut(slot_id as usize) else {
                        continue;
                    };
                    if slot.generation != generation {
                        continue;
                    }
                    let last_seen = slot.conn.last_seen();
                    match heartbeat::decide(
                        &mut slot.beat,
                        now,
                        last_seen,
                        self.interval_ticks,
                        self.timeout_ticks,
                    ) {
                        Action::Recheck(at) => state.wheel.insert(at, (slot_id, generation)),
                        Action::Ping(at) => {
                            to_ping.push(slot.conn.clone());
                            state.wheel.insert(at, (slot_id, generation));
                        }
                        Action::Close => to_close.push(slot.conn.clone()),
                    }
                }
            }
            for conn in to_ping.drain(..) {
                conn.send(ping.clone());
                if let Some(json) = &json_ping {
                    conn.send(json.clone());
                }
            }
            for conn in to_close.drain(..) {
                conn.close(CloseCode::Internal, "ping timeout", false);
            }
        }
    }

    /// Marks the hub as shutting down: connections upgraded from now on close at once.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether [`Hub::begin_shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Starts a close handshake with every connection (shutdown). Each shard does it after
    /// the publications already handed to it, so everything accepted before is delivered
    /// (queued frames are flushed before the close frame).
    pub fn close_all(&self, code: CloseCode, reason: &'static str) {
        for tx in self.senders.iter() {
            let _ = tx.send(Job::CloseAll { code, reason });
        }
    }
}

fn fanout_loop(shard: &Shard, jobs: &Receiver<Job>, metrics: &Metrics) {
    let mut targets: Vec<Arc<Conn>> = Vec::new();
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Publish { topic, frame } => {
                {
                    let mut guard = shard.state.lock();
                    let state = &mut *guard;
                    state.seq += 1;
                    let seq = state.seq;
                    let slots = &mut state.slots;
                    state.index.for_each_match(&topic, |slot| {
                        if let Some(s) = slots.get_mut(slot as usize)
                            && s.last_seq != seq
                        {
                            s.last_seq = seq;
                            targets.push(s.conn.clone());
                        }
                    });
                }
                // Write outside the shard lock: subscribes on this shard need not wait for
                // the sockets.
                let mut delivered = 0;
                for conn in targets.drain(..) {
                    if matches!(
                        conn.send(frame.clone()),
                        Delivery::Written | Delivery::Queued
                    ) {
                        delivered += 1;
                    }
                }
                metrics.delivered(delivered);
                if targets.capacity() > 4096 {
                    targets.shrink_to(4096);
                }
            }
            Job::CloseAll { code, reason } => {
                let conns: Vec<Arc<Conn>> = shard
                    .state
                    .lock()
                    .slots
                    .iter()
                    .map(|(_, s)| s.conn.clone())
                    .collect();
                for conn in conns {
                    conn.close(code, reason, true);
                }
            }
        }
    }
}
