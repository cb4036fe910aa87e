//! The hub: topics, publication, and the shards that own the connections.
//!
//! Connections are spread over shards, one thread each (see [`shard`]). A publication is
//! encoded once, here, and handed to every shard as the same `Bytes`; each shard writes it
//! to its own subscribers, so one publication's fan-out runs on every core at once while
//! each shard keeps publication order.

pub mod connection;
pub mod index;
mod requests;
pub mod shard;
pub mod topics;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use crossbeam_channel::Sender;

use crate::Config;
use crate::metrics::{CloseReason, Metrics};
use crate::proto::CloseCode;
use crate::proto::versioned::{PollPage, TopicStatus, encode_poll_body};
use crate::topic::{HistoryLimits, NameError, PatchError, Version, validate_topic};
pub use connection::Mode;
pub use index::{Index, SlotId};
use topics::{Content, Publication, TopicError, Topics};

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
    /// The topic refused the change (closed, wrong kind, precondition, patch).
    #[error(transparent)]
    Topic(#[from] TopicError),
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
}

impl SubscribeError {
    /// The stable error code sent to the client.
    pub fn code(&self) -> &'static str {
        match self {
            SubscribeError::Name(NameError::InvalidTopic(_)) => "invalid_topic",
            SubscribeError::Name(NameError::InvalidPattern(_)) => "invalid_pattern",
            SubscribeError::TooMany(_) => "too_many_subscriptions",
            SubscribeError::InvalidVersion { .. } => "invalid_version",
            SubscribeError::InvalidFilter(_) => "invalid_filter",
            SubscribeError::NotSubscribed(_) => "not_subscribed",
        }
    }
}

/// Work for a shard.
pub enum Job {
    /// Write a publication's frame to every subscriber of its topic.
    Publish(Publication),
    /// Adopt an upgraded socket; `leftover` holds bytes read past the HTTP request.
    Register {
        /// The socket, non-blocking.
        stream: std::net::TcpStream,
        /// Bytes the client sent after its upgrade request.
        leftover: Vec<u8>,
        /// What the connection serves.
        mode: Mode,
        /// A topic to subscribe at once (snapshot first), for `GET /ws/{app}/{profile}`.
        subscribe: Option<String>,
        /// The client's place under `max_connections_per_ip`, given back when dropped.
        peer: crate::net::IpSlot,
    },
    /// Close every connection, after the publications queued before this job.
    CloseAll {
        /// The close code.
        code: CloseCode,
        /// The close reason.
        reason: &'static str,
    },
    /// Drop every connection at once (the shutdown deadline passed).
    DropAll,
}

/// What the shards share with the rest of the gateway.
#[derive(Debug)]
pub struct Shared {
    /// The configuration in force.
    pub config: Config,
    /// The counters.
    pub metrics: Metrics,
    /// The topics.
    pub topics: Topics,
    /// WebSocket connections open or being upgraded.
    open: AtomicUsize,
    /// Signalled whenever a connection ends, for shutdown's drain.
    drained: tokio::sync::Notify,
    shutting_down: AtomicBool,
}

impl Shared {
    /// Whether the gateway is shutting down.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Counts a connection as ended.
    pub fn connection_released(&self, reason: CloseReason) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        self.metrics.connection_closed(reason);
        self.drained.notify_waiters();
    }
}

#[derive(Debug)]
struct ShardHandle {
    jobs: Sender<Job>,
    waker: Arc<mio::Waker>,
}

impl ShardHandle {
    fn send(&self, job: Job) {
        // Sending fails only once the shard thread is gone, which happens only on drop.
        if self.jobs.send(job).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

/// The shared core of a gateway.
#[derive(Debug)]
pub struct Hub {
    shared: Arc<Shared>,
    shards: Vec<ShardHandle>,
    next_shard: AtomicUsize,
}

impl Hub {
    /// Creates the hub and starts its shard threads; they stop when the hub is dropped.
    pub fn new(config: Config) -> std::io::Result<Hub> {
        let threads = match config.fanout_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let limits = HistoryLimits {
            max_len: config.history_max_len,
            max_age: config.history_max_age,
        };
        let shared = Arc::new(Shared {
            config,
            metrics: Metrics::default(),
            topics: Topics::new(limits),
            open: AtomicUsize::new(0),
            drained: tokio::sync::Notify::new(),
            shutting_down: AtomicBool::new(false),
        });
        let mut shards = Vec::with_capacity(threads);
        for i in 0..threads {
            let poll = mio::Poll::new()?;
            let waker = Arc::new(mio::Waker::new(poll.registry(), shard::WAKER)?);
            let (tx, rx) = crossbeam_channel::unbounded();
            let shard = shard::Shard::new(poll, rx, shared.clone());
            std::thread::Builder::new()
                .name(format!("tidings-shard-{i}"))
                .spawn(move || shard.run())?;
            shards.push(ShardHandle { jobs: tx, waker });
        }
        Ok(Hub {
            shared,
            shards,
            next_shard: AtomicUsize::new(0),
        })
    }

    /// The configuration the hub runs with.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The hub's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
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

    /// Hands an upgraded socket (with a reserved place) to the next shard.
    pub fn register(
        &self,
        stream: std::net::TcpStream,
        leftover: Vec<u8>,
        mode: Mode,
        subscribe: Option<String>,
        peer: crate::net::IpSlot,
    ) {
        let shard = self.next_shard.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        self.shards[shard].send(Job::Register {
            stream,
            leftover,
            mode,
            subscribe,
            peer,
        });
    }

    /// Connections open or being upgraded.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    fn topic(&self, name: &str) -> Result<Arc<topics::Topic>, NameError> {
        validate_topic(name)?;
        let metrics = &self.shared.metrics;
        Ok(self
            .shared
            .topics
            .get_or_create(name, || metrics.topic_created()))
    }

    fn hand_off(&self, publication: Publication) {
        for shard in &self.shards {
            shard.send(Job::Publish(publication.clone()));
        }
    }

    /// Publishes one JSON value (already validated) to the event topic `topic`.
    ///
    /// The event frame is encoded here, once; every shard writes a reference to it to each
    /// matching subscriber. Returns once the fan-out is handed off.
    pub fn publish(&self, name: &str, data: &[u8]) -> Result<Published, PublishError> {
        let (topic, offset) = self.retrying(name, |topic| {
            topic.publish_event(data, |p| self.hand_off(p))
        })?;
        self.shared.metrics.published();
        Ok(Published {
            topic: topic.name.to_string(),
            offset,
        })
    }

    /// Replaces a state document (`PUT`); publishes the diff if anything changed.
    pub fn put_state(
        &self,
        topic: &str,
        document: serde_json::Value,
        if_match: Option<&str>,
    ) -> Result<StateWritten, PublishError> {
        // Taken by the first attempt that reaches the document (a retired topic is
        // looked up again before that).
        let mut document = Some(document);
        self.write_state(topic, if_match, |doc| {
            Ok(doc.replace(document.take().unwrap_or_default()))
        })
    }

    /// Applies an RFC 6902 JSON Patch to a state document (`PATCH`), atomically.
    pub fn patch_state(
        &self,
        topic: &str,
        patch: &[u8],
        if_match: Option<&str>,
    ) -> Result<StateWritten, PublishError> {
        let ops = crate::topic::state::parse_patch(patch).map_err(TopicError::Patch)?;
        self.write_state(topic, if_match, |doc| doc.patch(&ops))
    }

    fn write_state(
        &self,
        topic: &str,
        if_match: Option<&str>,
        mut change: impl FnMut(
            &mut crate::topic::StateDoc,
        ) -> Result<Option<crate::topic::Change>, PatchError>,
    ) -> Result<StateWritten, PublishError> {
        let (topic, (version, changed)) = self.retrying(topic, |topic| {
            topic.write_state(if_match, &mut change, |p| self.hand_off(p))
        })?;
        if changed {
            self.shared.metrics.published();
        }
        Ok(StateWritten {
            topic: topic.name.to_string(),
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
    /// be the topic's), at most `limit`, as the JSON body of `GET .../events`.
    pub fn poll(&self, topic: &str, since: &str, limit: usize) -> Result<Vec<u8>, PollError> {
        let topic = self.topic(topic)?;
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
        let page = state.history.page(offset, limit);
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
        };
        Ok(encode_poll_body(
            &poll_page,
            page.entries.map(|e| (e.offset, &e.data[..])),
        ))
    }

    /// Closes a topic: subscribers get `closed`, later publications are refused.
    pub fn close_topic(&self, topic: &str) -> Result<Version, PublishError> {
        let (_, version) = self.retrying(topic, |topic| topic.close(|p| self.hand_off(p)))?;
        Ok(version)
    }

    /// Runs `op` on the topic, looking it up again if the sweep retired it meanwhile.
    fn retrying<T>(
        &self,
        name: &str,
        mut op: impl FnMut(&topics::Topic) -> Result<T, TopicError>,
    ) -> Result<(Arc<topics::Topic>, T), PublishError> {
        loop {
            let topic = self.topic(name)?;
            match op(&topic) {
                Err(TopicError::Retired(_)) => continue,
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

impl Drop for Hub {
    fn drop(&mut self) {
        // Disconnect each shard's channel, then wake it to notice and exit.
        for ShardHandle { jobs, waker } in std::mem::take(&mut self.shards) {
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
}

impl From<PatchError> for PublishError {
    fn from(e: PatchError) -> Self {
        PublishError::Topic(TopicError::Patch(e))
    }
}
