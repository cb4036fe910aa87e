//! What the hub and its shards share: the jobs sent to a shard, and the state every shard
//! reads (configuration, counters, topics, the publish queues' bound).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crossbeam_channel::Sender;

use super::backlog::Backlog;
use super::peers::IpSlot;
use super::topics::{Publication, Topics};
use crate::Config;
use crate::auth::{Auth, Identity};
use crate::metrics::{CloseReason, Metrics};
use crate::proto::CloseCode;
use crate::proto::message::SubscriptionRequest;
use crate::proto::session::Mode;

/// Work for a shard.
pub(crate) enum Job {
    /// Write a publication to every subscriber of its topic.
    Publish(Arc<Publication>),
    /// Adopt a socket whose HTTP request was answered; `leftover` holds bytes read past it.
    Register {
        /// The socket, non-blocking.
        stream: std::net::TcpStream,
        /// A TLS connection's record layer, with what it had read and not yet handed on.
        tls: Option<Box<rustls::ServerConnection>>,
        /// Bytes the client sent after its request.
        leftover: Vec<u8>,
        /// What the peer is (boxed: a register is rare next to a publication).
        open: Box<Open>,
        /// The client's place under `max_connections_per_ip`, given back when dropped.
        ip: IpSlot,
    },
    /// Close every peer, after the publications queued before this job.
    CloseAll {
        /// The close code.
        code: CloseCode,
        /// The close reason.
        reason: &'static str,
    },
    /// Drop every peer at once (the shutdown deadline passed).
    DropAll,
    /// A topic was loaded from the shared bus: answer the subscription requests that
    /// waited for it.
    Loaded,
    /// A shared bus's history after a version: answer the resumes that waited for it.
    Backfill(Arc<Backfill>),
}

/// A topic's history after `from`, read from the shared bus for resumes that reach further
/// back than this node's history (encoded once, shared by every shard).
#[derive(Debug)]
pub(crate) struct Backfill {
    /// The topic.
    pub topic: Arc<str>,
    /// The version the resumes start after.
    pub from: crate::topic::Version,
    /// The entries after it, in order (none if the engine's epoch differs).
    pub entries: Vec<crate::topic::Entry>,
}

/// A new peer's transport and what it subscribes to at once.
#[derive(Debug)]
pub(crate) enum Open {
    /// A WebSocket after its `101`.
    WebSocket {
        /// What the session serves.
        mode: Mode,
        /// A topic to subscribe at once (snapshot first), for `GET /ws/{app}/{profile}`.
        subscribe: Option<String>,
        /// Who it is, when authentication is on.
        identity: Option<Identity>,
        /// permessage-deflate, if the handshake agreed it.
        deflate: Option<crate::proto::deflate::Agreed>,
    },
    /// An SSE stream after its `200` head.
    Sse(SseOpen),
}

/// An SSE stream's subscription, checked by the HTTP layer before its `200`.
#[derive(Debug)]
pub(crate) struct SseOpen {
    /// Topics, patterns, filter, and `since` from `Last-Event-ID`.
    pub request: SubscriptionRequest,
    /// `GET /v1/topics/{topic}/sse`: ids are plain versions.
    pub single: bool,
    /// A resumed pattern stream's base time (Unix ms), from its cursor.
    pub base_ms: Option<u64>,
    /// Who it is, when authentication is on.
    pub identity: Option<Identity>,
}

/// What the shards share with the rest of the gateway.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The configuration in force.
    pub config: Config,
    /// The counters.
    pub metrics: Metrics,
    /// The topics.
    pub topics: Topics,
    /// Authentication: token refreshes are verified on the shards.
    pub auth: Arc<Auth>,
    /// The publish queues' bound.
    pub backlog: Arc<Backlog>,
    /// With a shared bus: tells it which topics and patterns this node needs. The shards
    /// only report interest; they never call the bus.
    pub interest: Option<super::cluster::Interest>,
    /// Pattern subscriptions on every shard: while there are none, a publication of a
    /// topic with no subscriber is not handed to the shards at all.
    pub patterns: AtomicUsize,
    /// Peers open or being set up.
    pub open: AtomicUsize,
    /// Signalled whenever a peer ends, for shutdown's drain.
    pub drained: tokio::sync::Notify,
    pub shutting_down: AtomicBool,
}

impl Shared {
    /// Whether the gateway is shutting down.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Counts a peer as ended.
    pub fn connection_released(&self, reason: CloseReason) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        self.metrics.connection_closed(reason);
        self.drained.notify_waiters();
    }
}

/// The hub's end of one shard: its job channel and the waker that interrupts its poll.
#[derive(Debug, Clone)]
pub(crate) struct ShardHandle {
    pub jobs: Sender<Job>,
    pub waker: Arc<mio::Waker>,
    /// Set by the shard while it sleeps with nothing to do.
    pub parked: Arc<AtomicBool>,
}

impl ShardHandle {
    /// Sends a job, and wakes the shard if it sleeps: a busy shard reads its channel every
    /// turn, so a burst of jobs costs one wake-up, not one each.
    pub fn send(&self, job: Job) {
        // Sending fails only once the shard thread is gone, which happens only on drop.
        if self.jobs.send(job).is_ok() {
            // Pairs with the shard's fence between setting `parked` and its last look at
            // the channel: one of the two sees the other.
            std::sync::atomic::fence(Ordering::SeqCst);
            if self.parked.swap(false, Ordering::SeqCst) {
                let _ = self.waker.wake();
            }
        }
    }
}
