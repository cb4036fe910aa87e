//! Counters of the gateway, exposed as `GET /stats` (JSON) and `GET /metrics` (Prometheus).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Why a connection ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// A close handshake the peer started, or an orderly end.
    Normal,
    /// The peer broke RFC 6455 or sent what the protocol does not accept.
    ProtocolError,
    /// The outbox overflowed (close 1013).
    SlowConsumer,
    /// The peer stopped answering (close handshake or heartbeat timeout).
    Timeout,
    /// The peer exceeded its inbound rate limit (close 1008).
    RateLimited,
    /// The gateway shut down (close 1001).
    Shutdown,
    /// The socket failed or the peer vanished without a close frame.
    IoError,
}

impl CloseReason {
    /// The name used in `/stats` and as the `reason` label in `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Timeout => "timeout",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::Shutdown => "shutdown",
            CloseReason::IoError => "io_error",
        }
    }
}

impl EncodeLabelValue for CloseReason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: CloseReason,
}

/// The gateway's counters; cheap to update from any thread.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: Gauge,
    opened: Counter,
    closed: Family<ReasonLabel, Counter>,
    publications: Counter,
    deliveries: Counter,
    topics: Gauge,
    refused: Counter,
    history_bytes: Gauge,
    state_bytes: Gauge,
    queued_publish_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tidings");
        let connections = Gauge::default();
        let opened = Counter::default();
        let closed = Family::<ReasonLabel, Counter>::default();
        let publications = Counter::default();
        let deliveries = Counter::default();
        let topics = Gauge::default();
        let refused = Counter::default();
        let history_bytes = Gauge::default();
        let state_bytes = Gauge::default();
        let queued_publish_bytes = Gauge::default();
        registry.register(
            "publications_refused",
            "Publications refused with 503 overloaded: the publish queues were full",
            refused.clone(),
        );
        registry.register(
            "history_bytes",
            "Bytes of history all topics keep (bounded by history_memory_budget)",
            history_bytes.clone(),
        );
        registry.register(
            "state_bytes",
            "Estimated bytes all state documents take (bounded by state_memory_budget)",
            state_bytes.clone(),
        );
        registry.register(
            "publish_queue_bytes",
            "Bytes of publications waiting for the shards (bounded by publish_queue_bytes)",
            queued_publish_bytes.clone(),
        );
        registry.register(
            "connections",
            "WebSocket connections open now",
            connections.clone(),
        );
        registry.register(
            "connections_opened",
            "WebSocket connections accepted",
            opened.clone(),
        );
        registry.register(
            "connections_closed",
            "WebSocket connections ended, by reason",
            closed.clone(),
        );
        registry.register(
            "publications",
            "Publications accepted",
            publications.clone(),
        );
        registry.register(
            "deliveries",
            "Frames handed to subscriber sockets or queues",
            deliveries.clone(),
        );
        registry.register("topics", "Topics known to this node", topics.clone());
        Metrics {
            registry,
            connections,
            opened,
            closed,
            publications,
            deliveries,
            topics,
            refused,
            history_bytes,
            state_bytes,
            queued_publish_bytes,
        }
    }
}

impl Metrics {
    pub(crate) fn connection_opened(&self) {
        self.opened.inc();
        self.connections.inc();
    }

    pub(crate) fn connection_closed(&self, reason: CloseReason) {
        self.connections.dec();
        self.closed.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub(crate) fn published(&self) {
        self.publications.inc();
    }

    pub(crate) fn delivered(&self, n: u64) {
        self.deliveries.inc_by(n);
    }

    pub(crate) fn publish_refused(&self) {
        self.refused.inc();
    }

    /// Sets the memory gauges: history, state documents and the publish queues, in bytes.
    pub(crate) fn set_memory(&self, history: usize, state: usize, queued: usize) {
        self.history_bytes.set(history as i64);
        self.state_bytes.set(state as i64);
        self.queued_publish_bytes.set(queued as i64);
    }

    pub(crate) fn topic_created(&self) {
        self.topics.inc();
    }

    pub(crate) fn topics_removed(&self, n: usize) {
        self.topics.dec_by(n as i64);
    }

    /// Connections open now.
    pub fn open_connections(&self) -> u64 {
        self.connections.get().max(0) as u64
    }

    fn closed(&self, reason: CloseReason) -> u64 {
        self.closed.get_or_create(&ReasonLabel { reason }).get()
    }

    /// A snapshot for `GET /stats`.
    pub fn stats(&self) -> Stats {
        Stats {
            connections: self.open_connections(),
            connections_opened: self.opened.get(),
            connections_closed: ClosedStats {
                normal: self.closed(CloseReason::Normal),
                protocol_error: self.closed(CloseReason::ProtocolError),
                slow_consumer: self.closed(CloseReason::SlowConsumer),
                timeout: self.closed(CloseReason::Timeout),
                rate_limited: self.closed(CloseReason::RateLimited),
                shutdown: self.closed(CloseReason::Shutdown),
                io_error: self.closed(CloseReason::IoError),
            },
            publications: self.publications.get(),
            deliveries: self.deliveries.get(),
            topics: self.topics.get().max(0) as u64,
            publications_refused: self.refused.get(),
            history_bytes: self.history_bytes.get().max(0) as u64,
            state_bytes: self.state_bytes.get().max(0) as u64,
            publish_queue_bytes: self.queued_publish_bytes.get().max(0) as u64,
        }
    }

    /// The Prometheus text exposition of every counter.
    pub fn prometheus_text(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A snapshot of the gateway's counters, as served by `GET /stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// WebSocket connections open now.
    pub connections: u64,
    /// WebSocket connections accepted since start.
    pub connections_opened: u64,
    /// WebSocket connections ended since start, by reason.
    pub connections_closed: ClosedStats,
    /// Publications accepted since start.
    pub publications: u64,
    /// Frames handed to subscriber sockets or queues since start.
    pub deliveries: u64,
    /// Topics known to this node.
    pub topics: u64,
    /// Publications refused with `503 overloaded` since start.
    pub publications_refused: u64,
    /// Bytes of history all topics keep now.
    pub history_bytes: u64,
    /// Estimated bytes all state documents take now.
    pub state_bytes: u64,
    /// Bytes of publications waiting for the shards now.
    pub publish_queue_bytes: u64,
}

/// Ended connections by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClosedStats {
    /// Close handshakes the peer started, and orderly ends.
    pub normal: u64,
    /// Protocol violations (1002, 1003, 1007, 1009).
    pub protocol_error: u64,
    /// Outbox overflows (1013).
    pub slow_consumer: u64,
    /// Peers that stopped answering.
    pub timeout: u64,
    /// Peers over their inbound rate limit (1008).
    pub rate_limited: u64,
    /// Closed by shutdown (1001).
    pub shutdown: u64,
    /// Socket failures and peers gone without a close frame.
    pub io_error: u64,
}
