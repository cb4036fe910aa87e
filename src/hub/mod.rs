//! The hub: topics, publication, and the shards that own the connections.
//!
//! Connections are spread over shards, one thread each (see [`shard`]). A publication is
//! encoded once, here, and handed to every shard as the same `Bytes`; each shard writes it
//! to its own subscribers, so one publication's fan-out runs on every core at once while
//! each shard keeps publication order.

pub mod connection;
pub mod index;
pub mod shard;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use crossbeam_channel::Sender;
use parking_lot::{Mutex, RwLock};

use crate::Config;
use crate::metrics::{CloseReason, Metrics};
use crate::proto::CloseCode;
use crate::proto::message::{encode_event, now_ms};
use crate::topic::{NameError, validate_topic};
pub use connection::Mode;
pub use index::{Index, SlotId};

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

/// Why a subscription request was refused.
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

/// Work for a shard.
pub enum Job {
    /// Write this frame to every subscriber of `topic`.
    Publish {
        /// The topic published to.
        topic: Arc<str>,
        /// The encoded frame, shared by every subscriber.
        frame: Bytes,
    },
    /// Adopt an upgraded socket; `leftover` holds bytes read past the HTTP request.
    Register {
        /// The socket, non-blocking.
        stream: std::net::TcpStream,
        /// Bytes the client sent after its upgrade request.
        leftover: Vec<u8>,
        /// What the connection serves.
        mode: Mode,
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

#[derive(Debug)]
struct Topic {
    name: Arc<str>,
    /// The last offset published; the lock also orders the hand-off to the shards.
    last_offset: Mutex<u64>,
}

/// What the shards share with the rest of the gateway.
#[derive(Debug)]
pub struct Shared {
    /// The configuration in force.
    pub config: Config,
    /// The counters.
    pub metrics: Metrics,
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
    topics: RwLock<HashMap<Arc<str>, Arc<Topic>>>,
    next_shard: AtomicUsize,
}

impl Hub {
    /// Creates the hub and starts its shard threads; they stop when the hub is dropped.
    pub fn new(config: Config) -> std::io::Result<Hub> {
        let threads = match config.fanout_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let shared = Arc::new(Shared {
            config,
            metrics: Metrics::default(),
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
            topics: RwLock::new(HashMap::new()),
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
    pub fn register(&self, stream: std::net::TcpStream, leftover: Vec<u8>, mode: Mode) {
        let shard = self.next_shard.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        self.shards[shard].send(Job::Register {
            stream,
            leftover,
            mode,
        });
    }

    /// Connections open or being upgraded.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Publishes one JSON value (already validated) to `topic`.
    ///
    /// The event frame is encoded here, once; every shard writes a reference to it to each
    /// matching subscriber. Returns once the fan-out is handed off.
    pub fn publish(&self, topic: &str, data: &[u8]) -> Result<Published, PublishError> {
        validate_topic(topic)?;
        let topic = self.topic(topic);
        let mut last = topic.last_offset.lock();
        *last += 1;
        let offset = *last;
        let frame = encode_event(&topic.name, offset, data, now_ms());
        // Handing off under the topic's lock keeps every shard's queue in offset order.
        for shard in &self.shards {
            shard.send(Job::Publish {
                topic: topic.name.clone(),
                frame: frame.clone(),
            });
        }
        drop(last);
        self.shared.metrics.published();
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
                self.shared.metrics.topic_created();
                Arc::new(Topic {
                    name: key.clone(),
                    last_offset: Mutex::new(0),
                })
            })
            .clone()
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
