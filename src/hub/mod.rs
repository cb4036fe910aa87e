//! The hub: topics, publication, and the shards that own the connections.
//!
//! Connections are spread over shards, one thread each (see [`shard`]). A publication is
//! encoded once, here, and handed to every shard as the same `Bytes`; each shard writes it
//! to its own subscribers, so one publication's fan-out runs on every core at once while
//! each shard keeps publication order.

mod backlog;
mod cluster;
mod job;
mod outbox;
mod peer;
pub(crate) mod peers;
mod requests;
mod shard;
mod sse;
mod tls;
pub(crate) mod topics;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;

use crate::Config;
use crate::bus::redis::{Node, RedisBus};
use crate::bus::{BusError, BusKind};
use crate::metrics::{CloseReason, Metrics};
use crate::proto::CloseCode;
use crate::proto::json::JsonLimitError;
use crate::proto::versioned::{PollPage, TopicStatus, encode_poll_body};
use crate::topic::{HistoryLimits, NameError, StateError, StateLimits, Version, validate_topic};
use backlog::{Backlog, JOB_OVERHEAD, Ticket};
use job::{Job, ShardHandle, Shared};
pub(crate) use job::{Open, SseOpen};
pub(crate) use sse::parse_last_event_id;
pub use topics::TopicError;
pub(crate) use topics::TopicSummary;
use topics::{Content, Publication, Topic, TopicLimits, Topics};

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
    /// The payload passes a JSON bound (`max_json_depth`).
    #[error("the payload is {0}")]
    Limit(#[from] JsonLimitError),
    /// The publish queues had no room within `publish_wait`: retry after `retry_after`.
    #[error("the gateway is overloaded: the publish queues are full; retry later")]
    Overloaded {
        /// When to retry.
        retry_after: std::time::Duration,
    },
    /// The topic refused the change (closed, wrong kind, precondition, patch).
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The shared bus (Redis) did not take the write: retry after `Retry-After`. After a
    /// timeout the write may still have been applied.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The result of writing a state document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateWritten {
    /// The topic.
    pub topic: String,
    /// The document's version after the write.
    pub version: Version,
    /// Whether the document changed (a change was published).
    pub changed: bool,
}

/// Why a subscription request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// A topic or pattern is malformed.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The connection would exceed `max_subscriptions`.
    #[error("more than {0} subscriptions on one connection")]
    TooMany(usize),
    /// The connection would exceed `max_patterns`.
    #[error("more than {0} pattern subscriptions on one connection")]
    TooManyPatterns(usize),
    /// A `since` or `last_version` that is not `epoch:offset`.
    #[error("invalid version for {topic}: {reason}")]
    InvalidVersion {
        /// The topic it was given for.
        topic: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A filter that is not an object of field name to value list.
    #[error("invalid filter: {0}")]
    InvalidFilter(String),
    /// `resync` of a topic the connection is not subscribed to.
    #[error("not subscribed to {0}")]
    NotSubscribed(String),
    /// A new topic, and the gateway holds `max_topics` topics.
    #[error("the gateway holds {0} topics, its limit")]
    TooManyTopics(usize),
    /// The connection's grants do not cover this topic or pattern.
    #[error("not allowed to subscribe to {0}")]
    Forbidden(String),
    /// A `since` or `last_version` of the topic's epoch past its last publication: it did
    /// not come from this topic, and resuming from it would skip what comes next.
    #[error("{since} is past {topic}'s last version {current}")]
    VersionAhead {
        /// The topic.
        topic: String,
        /// The version given.
        since: Version,
        /// The topic's current version.
        current: Version,
    },
}

impl SubscribeError {
    /// The stable error code sent to the client.
    pub fn code(&self) -> &'static str {
        match self {
            SubscribeError::Name(NameError::InvalidTopic(_)) => "invalid_topic",
            SubscribeError::Name(NameError::InvalidPattern(_)) => "invalid_pattern",
            SubscribeError::TooMany(_) => "too_many_subscriptions",
            SubscribeError::TooManyPatterns(_) => "too_many_patterns",
            SubscribeError::InvalidVersion { .. } => "invalid_version",
            SubscribeError::InvalidFilter(_) => "invalid_filter",
            SubscribeError::NotSubscribed(_) => "not_subscribed",
            SubscribeError::TooManyTopics(_) => "too_many_topics",
            SubscribeError::VersionAhead { .. } => "version_ahead",
            SubscribeError::Forbidden(_) => "forbidden",
        }
    }
}

/// The shared core of a gateway.
#[derive(Debug)]
pub(crate) struct Hub {
    shared: Arc<Shared>,
    /// The shared bus, unless this node is alone (`bus.kind = "local"`).
    bus: Option<Arc<RedisBus>>,
    /// Long-polls waiting now (`max_poll_waiters`).
    poll_waiters: AtomicUsize,
    shards: Vec<ShardHandle>,
    next_shard: AtomicUsize,
}

impl Hub {
    /// Creates the hub and starts its shard threads; they stop when the hub is dropped.
    /// With `bus.kind = "redis"` it connects to Redis first, and fails if Redis does not
    /// answer.
    pub fn new(config: Config) -> std::io::Result<Arc<Hub>> {
        let threads = match config.fanout_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let limits = TopicLimits {
            history: HistoryLimits {
                max_len: config.history_max_len,
                max_age: config.history_max_age,
                max_bytes: config.history_max_bytes,
            },
            history_budget: config.history_memory_budget,
            max_topics: config.max_topics,
            state: StateLimits {
                max_depth: config.max_json_depth,
                max_bytes: config.max_state_bytes,
                max_ops: config.max_patch_ops,
            },
            state_budget: config.state_memory_budget,
        };
        let backlog = Backlog::new(config.publish_queue_bytes, config.topic_queue_len.max(1));
        let auth = crate::auth::Auth::from_config(&config.auth)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let metrics = Metrics::default();
        let bus = match config.bus.kind {
            BusKind::Local => None,
            BusKind::Redis => Some(RedisBus::connect(&config.bus, metrics.bus().clone())?),
        };
        let shared = Arc::new(Shared {
            config,
            metrics,
            topics: Topics::with_bus(limits, bus.is_some()),
            auth: Arc::new(auth),
            backlog,
            interest: bus.clone().map(cluster::Interest::new),
            patterns: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            drained: tokio::sync::Notify::new(),
            shutting_down: AtomicBool::new(false),
        });
        let mut shards = Vec::with_capacity(threads);
        for i in 0..threads {
            let poll = mio::Poll::new()?;
            let waker = Arc::new(mio::Waker::new(poll.registry(), shard::WAKER)?);
            let (tx, rx) = crossbeam_channel::unbounded();
            let parked = Arc::new(AtomicBool::new(false));
            let shard = shard::Shard::new(poll, rx, parked.clone(), shared.clone(), threads);
            std::thread::Builder::new()
                .name(format!("tidings-shard-{i}"))
                .spawn(move || shard.run())?;
            shards.push(ShardHandle {
                jobs: tx,
                waker,
                parked,
            });
        }
        let hub = Arc::new(Hub {
            shared,
            bus,
            poll_waiters: AtomicUsize::new(0),
            shards,
            next_shard: AtomicUsize::new(0),
        });
        if let Some(bus) = &hub.bus {
            let node: std::sync::Weak<dyn Node> = Arc::downgrade(&hub) as std::sync::Weak<dyn Node>;
            bus.serve(node);
        }
        Ok(hub)
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.is_shutting_down()
    }

    /// The shared bus, if this node has one.
    pub fn bus(&self) -> Option<&Arc<RedisBus>> {
        self.bus.as_ref()
    }

    /// Whether the node can take writes: always on a local bus; with a shared one, while
    /// Redis answers.
    pub fn is_ready(&self) -> bool {
        self.bus.as_ref().is_none_or(|b| b.is_healthy())
    }

    /// Authentication and authorization, built from `config.auth`.
    pub(crate) fn auth(&self) -> &Arc<crate::auth::Auth> {
        &self.shared.auth
    }

    /// The configuration the hub runs with.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The hub's counters, with the memory gauges read now.
    pub fn metrics(&self) -> &Metrics {
        let shared = &self.shared;
        shared.metrics.set_memory(
            shared.topics.history_bytes(),
            shared.topics.state_bytes(),
            shared.backlog.bytes(),
        );
        shared
            .metrics
            .set_poll_waiters(self.poll_waiters.load(Ordering::SeqCst));
        &shared.metrics
    }

    /// Takes a place for a new connection, unless `max_connections` are open.
    pub fn reserve_connection(&self) -> bool {
        let max = self.shared.config.max_connections;
        let taken = self
            .shared
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_ok() {
            self.shared.metrics.connection_opened();
        }
        taken.is_ok()
    }

    /// Gives back a place taken by [`Hub::reserve_connection`] whose upgrade failed.
    pub fn release_unused(&self) {
        self.shared.connection_released(CloseReason::IoError);
    }

    /// Hands a socket whose request was answered (with a reserved place) to the next shard.
    pub fn register(
        &self,
        stream: std::net::TcpStream,
        tls: Option<Box<rustls::ServerConnection>>,
        leftover: Vec<u8>,
        open: Open,
        ip: peers::IpSlot,
    ) {
        let shard = self.next_shard.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        self.shards[shard].send(Job::Register {
            stream,
            tls,
            leftover,
            open: Box::new(open),
            ip,
        });
    }

    /// Connections open or being upgraded.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Checks a publication body against `max_publish_bytes` and `max_json_depth` and that it
    /// is one JSON value; returns the range of the value without surrounding whitespace.
    pub fn check_publication(&self, json: &[u8]) -> Result<std::ops::Range<usize>, PublishError> {
        let config = &self.shared.config;
        if json.len() > config.max_publish_bytes {
            return Err(PublishError::TooLarge {
                limit: config.max_publish_bytes,
            });
        }
        crate::proto::message::validate_json(json, config.max_json_depth).map_err(|e| match e {
            crate::proto::message::JsonError::Invalid(e) => PublishError::InvalidJson(e),
            crate::proto::message::JsonError::Limit(e) => PublishError::Limit(e),
        })
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>, PublishError> {
        validate_topic(name)?;
        let metrics = &self.shared.metrics;
        Ok(self
            .shared
            .topics
            .get_or_create(name, || metrics.topic_created())?)
    }

    /// Bytes a publication of `len` bytes of JSON holds in the queues: its frame (with room
    /// for the envelope) and a job per shard.
    fn queue_cost(&self, topic: &str, len: usize) -> usize {
        len + topic.len() + FRAME_ENVELOPE + JOB_OVERHEAD * self.shards.len()
    }

    fn overloaded(&self) -> PublishError {
        PublishError::Overloaded {
            retry_after: OVERLOAD_RETRY_AFTER,
        }
    }

    /// Takes room in the publish queues for `len` bytes on topic `name`, waiting up to
    /// `publish_wait` without blocking the thread.
    pub async fn admit(&self, name: &str, len: usize) -> Result<Admitted, PublishError> {
        let topic = self.topic(name)?;
        let cost = self.queue_cost(name, len);
        let wait = self.shared.config.publish_wait;
        match self.shared.backlog.admit(&topic, cost, wait).await {
            Some(ticket) => Ok(Admitted { topic, ticket }),
            None => Err(self.overload_refused()),
        }
    }

    /// As [`Hub::admit`], blocking the calling thread while it waits.
    pub fn admit_blocking(&self, name: &str, len: usize) -> Result<Admitted, PublishError> {
        let topic = self.topic(name)?;
        let cost = self.queue_cost(name, len);
        let wait = self.shared.config.publish_wait;
        match self.shared.backlog.admit_blocking(&topic, cost, wait) {
            Some(ticket) => Ok(Admitted { topic, ticket }),
            None => Err(self.overload_refused()),
        }
    }

    fn overload_refused(&self) -> PublishError {
        self.shared.metrics.publish_refused();
        self.overloaded()
    }

    /// Hands a publication of `topic` to every shard, unless no connection could want it:
    /// no subscriber of the topic (counted under its lock, which the caller holds) and no
    /// pattern subscription anywhere. Then it only stays in history, and dropping its
    /// ticket gives its place in the queues back at once.
    fn hand_off(&self, topic: &Topic, mut publication: Publication, ticket: Option<Ticket>) {
        if topic.subscribers.load(Ordering::SeqCst) == 0
            && self.shared.patterns.load(Ordering::SeqCst) == 0
        {
            return;
        }
        if let Some(ticket) = ticket {
            ticket.settle(publication.frame.len() + JOB_OVERHEAD * self.shards.len());
            publication.ticket = Some(ticket);
        }
        let publication = Arc::new(publication);
        for shard in &self.shards {
            shard.send(Job::Publish(publication.clone()));
        }
    }

    /// Publishes one JSON value (already validated) to the event topic it was admitted for.
    ///
    /// The event frame is encoded here, once; every shard writes a reference to it to each
    /// matching subscriber. Returns once the fan-out is handed off.
    pub fn publish(&self, admitted: Admitted, data: &[u8]) -> Result<Published, PublishError> {
        let Admitted { topic, ticket } = admitted;
        let mut ticket = Some(ticket);
        let topics = &self.shared.topics;
        let (topic, offset) = self.retrying(topic, |topic| {
            topics.publish_event(topic, data, |p| self.hand_off(topic, p, ticket.take()))
        })?;
        wake_pollers(&topic);
        self.shared.metrics.published();
        Ok(Published {
            topic: String::from(&*topic.name),
            offset,
        })
    }

    /// Replaces a state document (`PUT`); publishes the diff if anything changed.
    pub fn put_state(
        &self,
        admitted: Admitted,
        document: serde_json::Value,
        if_match: Option<&str>,
    ) -> Result<StateWritten, PublishError> {
        // Taken by the first attempt that reaches the document (a retired topic is
        // looked up again before that).
        let mut document = Some(document);
        self.write_state(admitted, if_match, |doc, limits| {
            doc.prepare_replace(document.take().unwrap_or_default(), limits)
        })
    }

    /// Applies an RFC 6902 JSON Patch to a state document (`PATCH`), atomically.
    pub fn patch_state(
        &self,
        admitted: Admitted,
        patch: &[u8],
        if_match: Option<&str>,
    ) -> Result<StateWritten, PublishError> {
        let ops = crate::topic::state::parse_patch(patch).map_err(StateError::from)?;
        self.write_state(admitted, if_match, |doc, limits| {
            doc.prepare_patch(&ops, limits)
        })
    }

    fn write_state(
        &self,
        admitted: Admitted,
        if_match: Option<&str>,
        mut change: impl FnMut(
            &crate::topic::StateDoc,
            &StateLimits,
        ) -> Result<Option<crate::topic::state::Prepared>, StateError>,
    ) -> Result<StateWritten, PublishError> {
        let Admitted { topic, ticket } = admitted;
        let mut ticket = Some(ticket);
        let topics = &self.shared.topics;
        let (topic, (version, changed)) = self.retrying(topic, |topic| {
            topics.write_state(topic, if_match, &mut change, |p| {
                self.hand_off(topic, p, ticket.take())
            })
        })?;
        if changed {
            wake_pollers(&topic);
            self.shared.metrics.published();
        }
        Ok(StateWritten {
            topic: String::from(&*topic.name),
            version,
            changed,
        })
    }

    /// A state document and its version, if the topic holds one.
    pub fn state(&self, topic: &str) -> Result<Option<(Version, Bytes)>, NameError> {
        validate_topic(topic)?;
        let Some(topic) = self.shared.topics.get(topic) else {
            return Ok(None);
        };
        let mut state = topic.state.lock();
        let version = state.version();
        Ok(match &mut state.content {
            Content::State(doc) => Some((version, doc.json())),
            Content::Empty | Content::Events => None,
        })
    }

    /// The polling fallback: events after `since` (an offset, or a version whose epoch must
    /// be the topic's), at most `limit` and about `max_poll_bytes`, as the JSON body of
    /// `GET .../events`.
    pub fn poll(&self, topic: &str, since: &str, limit: usize) -> Result<Vec<u8>, PollError> {
        let topic = self.poll_topic(topic)?;
        self.poll_page(&topic, since, limit).map(|(body, _)| body)
    }

    /// The long-poll: as [`Hub::poll`], but when there is nothing after `since` yet (and
    /// the topic is open), waits up to `wait` for a publication first. The flag says the
    /// poll did not wait because `max_poll_waiters` were waiting already.
    pub async fn poll_wait(
        &self,
        topic: &str,
        since: &str,
        limit: usize,
        wait: std::time::Duration,
    ) -> Result<(Vec<u8>, bool), PollError> {
        let deadline = tokio::time::Instant::now() + wait;
        let max = self.shared.config.max_poll_waiters;
        let mut place: Option<Waiter<'_>> = None;
        loop {
            let current = self.poll_topic(topic)?;
            let _waiting = Poller::enter(self, &current);
            self.ensure_loaded(&current).await?;
            let notified = current.changed.notified();
            tokio::pin!(notified);
            // Registered before looking, so a publication in between is not missed.
            notified.as_mut().enable();
            let (body, news) = self.poll_page(&current, since, limit)?;
            if news || wait.is_zero() {
                return Ok((body, false));
            }
            if place.is_none() {
                // Past `max_poll_waiters` the poll answers now: a client polls again, and
                // the HTTP places stay free for new connections.
                let Some(taken) = Waiter::enter(&self.poll_waiters, max) else {
                    return Ok((body, true));
                };
                place = Some(taken);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok((body, false));
            }
        }
    }

    /// The topic a poll reads, created if unknown (its refusals as poll errors).
    fn poll_topic(&self, name: &str) -> Result<Arc<Topic>, PollError> {
        self.topic(name).map_err(|e| match e {
            PublishError::InvalidTopic(e) => PollError::InvalidTopic(e),
            PublishError::Topic(TopicError::TooManyTopics { limit }) => {
                PollError::TooManyTopics(limit)
            }
            other => PollError::InvalidSince(other.to_string()),
        })
    }

    /// A poll page, and whether it has anything a waiting poller would wake for (entries,
    /// or the topic's end).
    fn poll_page(
        &self,
        topic: &Topic,
        since: &str,
        limit: usize,
    ) -> Result<(Vec<u8>, bool), PollError> {
        let state = topic.state.lock();
        if matches!(state.content, Content::State(_)) {
            // A document is read with GET .../state; its history holds diffs, not events.
            return Err(PollError::StateTopic(topic.name.to_string()));
        }
        let epoch = state.history.epoch();
        let offset = if since.is_empty() {
            0
        } else if let Ok(n) = since.parse::<u64>() {
            n
        } else {
            let version: Version = since
                .parse()
                .map_err(|e: crate::topic::VersionError| PollError::InvalidSince(e.to_string()))?;
            // Another epoch's offsets mean nothing here: everything history has is new.
            if version.epoch == epoch {
                version.offset
            } else {
                0
            }
        };
        if offset > state.history.last_offset() {
            return Err(PollError::Ahead {
                since: since.to_owned(),
                current: state.history.version(),
            });
        }
        let page = state
            .history
            .page(offset, limit, self.shared.config.max_poll_bytes);
        let news = page.entries.len() > 0 || page.truncated.is_some() || state.closed;
        let epoch_hex = epoch.to_string();
        let poll_page = PollPage {
            topic: &topic.name,
            epoch: &epoch_hex,
            next_offset: page.next_since,
            truncated: page.truncated,
            status: if state.closed {
                TopicStatus::Closed
            } else {
                TopicStatus::Open
            },
            more: page.more,
        };
        Ok((
            encode_poll_body(&poll_page, page.entries.map(|e| (e.offset, &e.data[..]))),
            news,
        ))
    }

    /// Closes a topic: subscribers get `closed`, later publications are refused.
    pub fn close_topic(&self, name: &str) -> Result<Version, PublishError> {
        let topic = self.topic(name)?;
        // A close is sent once per topic and must get through however busy the queues are.
        let cost = self.queue_cost(name, 0);
        let mut ticket = Some(self.shared.backlog.admit_always(&topic, cost));
        let topics = &self.shared.topics;
        let (topic, version) = self.retrying(topic, |topic| {
            topics.close(topic, |p| self.hand_off(topic, p, ticket.take()))
        })?;
        wake_pollers(&topic);
        Ok(version)
    }

    /// Runs `op` on the topic, looking it up again if the sweep retired it meanwhile.
    fn retrying<T>(
        &self,
        mut topic: Arc<Topic>,
        mut op: impl FnMut(&Arc<Topic>) -> Result<T, TopicError>,
    ) -> Result<(Arc<Topic>, T), PublishError> {
        loop {
            match op(&topic) {
                Err(TopicError::Retired(_)) => topic = self.topic(&topic.name.clone())?,
                Err(e) => return Err(e.into()),
                Ok(value) => return Ok((topic, value)),
            }
        }
    }

    /// Forgets topics that are idle (see [`Topics::sweep`]).
    pub fn sweep_topics(&self) {
        let removed = self.shared.topics.sweep(std::time::Instant::now());
        self.shared.metrics.topics_removed(removed);
    }

    /// How often [`Hub::sweep_topics`] should run: a tenth of the history age, within
    /// one second and one minute.
    pub fn sweep_interval(&self) -> std::time::Duration {
        (self.shared.config.history_max_age / 10).clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(60),
        )
    }

    /// Starts shutdown: connections upgraded from now on close at once, and every shard
    /// closes its connections with `code` after the publications already handed to it, so
    /// everything accepted before is delivered (queued frames go before the close frame).
    pub fn close_all(&self, code: CloseCode, reason: &'static str) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        for shard in &self.shards {
            shard.send(Job::CloseAll { code, reason });
        }
    }

    /// Drops every connection at once.
    pub fn drop_all(&self) {
        for shard in &self.shards {
            shard.send(Job::DropAll);
        }
    }

    /// Waits until no connection is open.
    pub async fn drained(&self) {
        loop {
            let notified = self.shared.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open_connections() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Hub {
    /// A page of the topic registry for `GET /v1/topics` (see [`Topics::page`]).
    pub fn topics_page(
        &self,
        after: Option<&str>,
        prefix: &str,
        limit: usize,
    ) -> (Vec<TopicSummary>, bool) {
        self.shared.topics.page(after, prefix, limit)
    }

    /// Publishes one JSON value to a topic of this node only (the gateway's own topics,
    /// such as the dashboard's `_tidings:stats`), as [`Hub::publish`] after admission, but
    /// only while a connection subscribes to it by name: `Ok(None)` otherwise, so an
    /// unwatched gateway's counters and topics are not touched.
    pub fn publish_local(
        &self,
        topic: &str,
        json: &[u8],
    ) -> Result<Option<Published>, PublishError> {
        let watched = self
            .shared
            .topics
            .get(topic)
            .is_some_and(|t| t.subscribers.load(Ordering::SeqCst) > 0);
        if !watched {
            return Ok(None);
        }
        let range = self.check_publication(json)?;
        let admitted = self.admit_blocking(topic, range.len())?;
        self.publish(admitted, &json[range]).map(Some)
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(bus) = &self.bus {
            bus.stop();
        }
        // Disconnect each shard's channel, then wake it to notice and exit.
        for ShardHandle { jobs, waker, .. } in std::mem::take(&mut self.shards) {
            drop(jobs);
            let _ = waker.wake();
        }
    }
}

/// Why a poll was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PollError {
    /// The topic name is invalid.
    #[error(transparent)]
    InvalidTopic(#[from] NameError),
    /// `since` is neither an offset nor a version.
    #[error("invalid since: {0}")]
    InvalidSince(String),
    /// The topic holds a state document: read it with `GET .../state`.
    #[error("topic {0} holds a state document; GET /v1/topics/{0}/state reads it")]
    StateTopic(String),
    /// `since` is past the topic's last publication: it did not come from this topic's
    /// history (the topic was forgotten and started again, or the value is wrong).
    #[error(
        "since {since} is past the topic's last version {current}; poll again from its version or from 0"
    )]
    Ahead {
        /// The `since` given.
        since: String,
        /// The topic's current version.
        current: Version,
    },
    /// The topic is unknown and the gateway holds `max_topics` topics.
    #[error("the gateway holds {0} topics, its limit")]
    TooManyTopics(usize),
    /// The shared bus could not load the topic: retry later.
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl From<StateError> for PublishError {
    fn from(e: StateError) -> Self {
        PublishError::Topic(TopicError::State(e))
    }
}

/// Wakes the long-polls waiting on `topic`, if any.
fn wake_pollers(topic: &Topic) {
    if topic.pollers.load(Ordering::SeqCst) > 0 {
        topic.changed.notify_waiters();
    }
}

/// A long-poll's place under `max_poll_waiters`, given back when dropped.
struct Waiter<'a>(&'a AtomicUsize);

impl<'a> Waiter<'a> {
    fn enter(count: &'a AtomicUsize, max: usize) -> Option<Waiter<'a>> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Waiter(count))
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One poll reading or waiting on a topic, counted while it lives (a shared bus follows
/// the topic meanwhile).
struct Poller<'a>(&'a Hub, &'a Topic);

impl<'a> Poller<'a> {
    fn enter(hub: &'a Hub, topic: &'a Topic) -> Poller<'a> {
        topic.pollers.fetch_add(1, Ordering::SeqCst);
        Poller(hub, topic)
    }
}

impl Drop for Poller<'_> {
    fn drop(&mut self) {
        self.1.pollers.fetch_sub(1, Ordering::SeqCst);
        self.0.poll_ended(self.1);
    }
}

/// Room for an event frame's envelope around the published JSON: the header, the type,
/// offset, version and timestamp fields.
const FRAME_ENVELOPE: usize = 128;

/// What an `overloaded` refusal tells the publisher to wait before retrying.
pub const OVERLOAD_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Room taken in the publish queues for one publication to a topic; see [`Hub::admit`].
#[derive(Debug)]
pub struct Admitted {
    topic: Arc<Topic>,
    ticket: Ticket,
}
