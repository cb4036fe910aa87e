//! Counters of the gateway, exposed as `GET /stats` (JSON) and `GET /metrics` (Prometheus).
//!
//! `/metrics` speaks both Prometheus formats: OpenMetrics 1.0.0 (what prometheus-client
//! encodes, and what Prometheus asks for first) and the classic text format 0.0.4, which
//! [`openmetrics_to_classic`] derives from it for scrapers that ask for nothing else.

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
    /// A gateway-wide buffer budget was full (`max_inbound_buffered_bytes`): close 1013.
    Overloaded,
    /// The connection's token expired without a `refresh` (close 4001).
    TokenExpired,
}

impl CloseReason {
    /// Every reason, in the order `/stats` lists them.
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Normal,
        CloseReason::ProtocolError,
        CloseReason::SlowConsumer,
        CloseReason::Timeout,
        CloseReason::RateLimited,
        CloseReason::Shutdown,
        CloseReason::IoError,
        CloseReason::Overloaded,
        CloseReason::TokenExpired,
    ];

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
            CloseReason::Overloaded => "overloaded",
            CloseReason::TokenExpired => "token_expired",
        }
    }
}

impl EncodeLabelValue for CloseReason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
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
    poll_waiters: Gauge,
    sse_streams: Gauge,
    bytes_out: Counter,
    bus: BusMetrics,
    tls: crate::net::tls::ReloadCounters,
}

/// What the shared bus reports (all zero on a local bus); the engine holds a clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct BusMetrics {
    /// 1 while Redis does not answer.
    pub degraded: Gauge,
    /// Topics this node follows now.
    pub followed: Gauge,
    /// Gaps filled from the engine's history.
    pub gaps_filled: Counter,
    /// Topics loaded from the engine (first subscribers, reconnects, new epochs).
    pub reloads: Counter,
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
        let poll_waiters = Gauge::default();
        let sse_streams = Gauge::default();
        let bytes_out = Counter::default();
        registry.register(
            "sse_streams",
            "SSE streams open now (they count under connections too)",
            sse_streams.clone(),
        );
        registry.register(
            "bytes_out",
            "Bytes written to WebSocket and SSE sockets",
            bytes_out.clone(),
        );
        let bus = BusMetrics::default();
        let tls_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "tls_reloads",
            "TLS certificate reloads (SIGHUP), by result",
            tls_reloads.clone(),
        );
        // One statement each: a family's read guard must be gone before the next insert.
        let ok = tls_reloads
            .get_or_create(&ResultLabel { result: "ok" })
            .clone();
        let error = tls_reloads
            .get_or_create(&ResultLabel { result: "error" })
            .clone();
        let tls = crate::net::tls::ReloadCounters { ok, error };
        registry.register(
            "bus_degraded",
            "1 while this node's Redis bus does not answer (writes refused, /readyz failing)",
            bus.degraded.clone(),
        );
        registry.register(
            "bus_followed_topics",
            "Topics this node follows on the Redis bus now",
            bus.followed.clone(),
        );
        registry.register(
            "bus_gaps_filled",
            "Gaps in a topic's offsets filled from Redis before delivery",
            bus.gaps_filled.clone(),
        );
        registry.register(
            "bus_reloads",
            "Topics loaded from Redis: first subscribers, reconnects, new epochs",
            bus.reloads.clone(),
        );
        registry.register(
            "long_polls_waiting",
            "Long-polls waiting for a publication now (bounded by max_poll_waiters)",
            poll_waiters.clone(),
        );
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
            "WebSocket connections and SSE streams open now",
            connections.clone(),
        );
        registry.register(
            "connections_opened",
            "WebSocket connections and SSE streams accepted",
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
        // Every reason is exposed from the start, at 0, so that `rate()` and `increase()`
        // see the first close of a kind instead of a series appearing out of nowhere.
        for reason in CloseReason::ALL {
            drop(closed.get_or_create(&ReasonLabel { reason }));
        }
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
            poll_waiters,
            sse_streams,
            bytes_out,
            bus,
            tls,
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

    /// Adds what a shard thread reports: bytes written to sockets, and the change in its
    /// SSE streams.
    pub(crate) fn add_peer_meter(&self, (bytes, sse): (u64, i64)) {
        if bytes > 0 {
            self.bytes_out.inc_by(bytes);
        }
        if sse != 0 {
            self.sse_streams.inc_by(sse);
        }
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

    pub(crate) fn set_poll_waiters(&self, n: usize) {
        self.poll_waiters.set(n as i64);
    }

    /// The TLS reload counters, for the certificate store to update.
    pub(crate) fn tls_reloads(&self) -> &crate::net::tls::ReloadCounters {
        &self.tls
    }

    /// The bus's counters, for the engine to update.
    pub(crate) fn bus(&self) -> &BusMetrics {
        &self.bus
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
                overloaded: self.closed(CloseReason::Overloaded),
                token_expired: self.closed(CloseReason::TokenExpired),
            },
            publications: self.publications.get(),
            deliveries: self.deliveries.get(),
            topics: self.topics.get().max(0) as u64,
            publications_refused: self.refused.get(),
            history_bytes: self.history_bytes.get().max(0) as u64,
            state_bytes: self.state_bytes.get().max(0) as u64,
            publish_queue_bytes: self.queued_publish_bytes.get().max(0) as u64,
            long_polls_waiting: self.poll_waiters.get().max(0) as u64,
            sse_streams: self.sse_streams.get().max(0) as u64,
            bytes_out: self.bytes_out.get(),
            bus_degraded: self.bus.degraded.get() > 0,
            bus_followed_topics: self.bus.followed.get().max(0) as u64,
            bus_gaps_filled: self.bus.gaps_filled.get(),
            bus_reloads: self.bus.reloads.get(),
        }
    }

    /// Every counter in the OpenMetrics 1.0.0 text format (ends with `# EOF`).
    pub fn openmetrics_text(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Every counter in the classic Prometheus text format 0.0.4.
    pub fn prometheus_text(&self) -> String {
        openmetrics_to_classic(&self.openmetrics_text())
    }

    /// Every counter in `format`.
    pub fn encode(&self, format: MetricsFormat) -> String {
        match format {
            MetricsFormat::OpenMetrics => self.openmetrics_text(),
            MetricsFormat::Classic => self.prometheus_text(),
        }
    }
}

/// The two text formats `GET /metrics` can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsFormat {
    /// OpenMetrics 1.0.0: counters' samples end in `_total`, the body ends with `# EOF`.
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4.
    Classic,
}

impl MetricsFormat {
    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            MetricsFormat::OpenMetrics => {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            }
            MetricsFormat::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format to answer a request's `Accept` header with: OpenMetrics when the client
    /// prefers it (Prometheus asks for `application/openmetrics-text;version=1.0.0` first),
    /// the classic format otherwise, including when there is no header or it accepts both
    /// equally.
    ///
    /// Media ranges are weighed as RFC 9110 §12.5.1 says: the most specific range that
    /// matches a format gives its `q`. An OpenMetrics range naming a `version` other than
    /// 1.0.0, or a `text/plain` one naming a version other than 0.0.4, does not match.
    pub fn negotiate(accept: Option<&str>) -> MetricsFormat {
        let Some(accept) = accept else {
            return MetricsFormat::Classic;
        };
        let mut open_metrics = Weight::default();
        let mut classic = Weight::default();
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let mut q = 1.0_f32;
            let mut version = None;
            for param in parts {
                let Some((name, value)) = param.split_once('=') else {
                    continue;
                };
                let value = value.trim().trim_matches('"');
                match name.trim().to_ascii_lowercase().as_str() {
                    "q" => q = value.parse().unwrap_or(0.0),
                    "version" => version = Some(value.to_owned()),
                    _ => {}
                }
            }
            let version_is = |wanted: &str| version.as_deref().is_none_or(|v| v == wanted);
            match media.as_str() {
                "application/openmetrics-text" if version_is("1.0.0") => open_metrics.offer(2, q),
                "text/plain" if version_is("0.0.4") => classic.offer(2, q),
                "application/*" => open_metrics.offer(1, q),
                "text/*" => classic.offer(1, q),
                "*/*" => {
                    open_metrics.offer(0, q);
                    classic.offer(0, q);
                }
                _ => {}
            }
        }
        if open_metrics.q() > 0.0 && open_metrics.q() > classic.q() {
            MetricsFormat::OpenMetrics
        } else {
            MetricsFormat::Classic
        }
    }
}

/// The `q` of the most specific media range that matched a format so far.
#[derive(Debug, Default)]
struct Weight {
    /// (specificity, q): 2 for `type/subtype`, 1 for `type/*`, 0 for `*/*`.
    best: Option<(u8, f32)>,
}

impl Weight {
    fn offer(&mut self, specificity: u8, q: f32) {
        match self.best {
            Some((s, old)) if s > specificity || (s == specificity && old >= q) => {}
            _ => self.best = Some((specificity, q)),
        }
    }

    fn q(&self) -> f32 {
        self.best.map_or(0.0, |(_, q)| q)
    }
}

/// Rewrites an OpenMetrics text exposition (as prometheus-client encodes it) into the
/// classic Prometheus text format 0.0.4.
///
/// The differences that matter to a classic parser: a counter's `# HELP`/`# TYPE` name the
/// sample (`x_total`), not the family (`x`), or every counter reads as untyped; `unknown`
/// is `untyped`; `info` and `stateset` are gauges (an info family's samples are `x_info`);
/// there are no `# UNIT` lines, `_created` samples, exemplars or `# EOF`. A
/// `gaugehistogram` has no classic type, so its samples are left untyped.
pub fn openmetrics_to_classic(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // `# HELP` comes before `# TYPE`; hold it until the type says what to call it.
    let mut help: Option<(&str, &str)> = None;
    // The family being copied, and whether its `_created` samples are dropped.
    let mut family: Option<(&str, bool)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let (sample_name, classic_kind) = match kind {
                "counter" => (suffixed(name, "_total"), Some("counter")),
                "gauge" => (name.to_owned(), Some("gauge")),
                "histogram" => (name.to_owned(), Some("histogram")),
                "summary" => (name.to_owned(), Some("summary")),
                "info" => (suffixed(name, "_info"), Some("gauge")),
                "stateset" => (name.to_owned(), Some("gauge")),
                "gaugehistogram" => (name.to_owned(), None),
                _ => (name.to_owned(), Some("untyped")),
            };
            family = Some((name, matches!(kind, "counter" | "histogram" | "summary")));
            if let Some(classic_kind) = classic_kind {
                if let Some((help_name, help_text)) = help.take()
                    && help_name == name
                {
                    out.push_str("# HELP ");
                    out.push_str(&sample_name);
                    out.push(' ');
                    out.push_str(&escape_help(help_text));
                    out.push('\n');
                }
                out.push_str("# TYPE ");
                out.push_str(&sample_name);
                out.push(' ');
                out.push_str(classic_kind);
                out.push('\n');
            }
            help = None;
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            // `# UNIT`, `# EOF`, and anything else a classic parser would not expect.
            continue;
        }
        let sample = strip_exemplar(line);
        let name_end = sample.find(['{', ' ']).unwrap_or(sample.len());
        if let Some((name, drops_created)) = family
            && drops_created
            && sample[..name_end].strip_prefix(name) == Some("_created")
        {
            continue;
        }
        out.push_str(sample);
        out.push('\n');
    }
    out
}

/// `name` with `suffix`, unless it already ends with it.
fn suffixed(name: &str, suffix: &str) -> String {
    if name.ends_with(suffix) {
        name.to_owned()
    } else {
        format!("{name}{suffix}")
    }
}

/// A classic `# HELP` text escapes only backslashes and line feeds; OpenMetrics also escapes
/// double quotes, which the classic format would show as `\"`.
fn escape_help(help: &str) -> String {
    help.replace("\\\"", "\"")
}

/// A sample line without its OpenMetrics exemplar (` # {labels} value [timestamp]`), which
/// follows the value; a `#` inside a quoted label value is not one.
fn strip_exemplar(line: &str) -> &str {
    let mut in_quotes = false;
    let mut escaped = false;
    let mut after_labels = 0;
    if line.contains('{') {
        for (i, c) in line.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_quotes => escaped = true,
                '"' => in_quotes = !in_quotes,
                '}' if !in_quotes => {
                    after_labels = i;
                    break;
                }
                _ => {}
            }
        }
    }
    match line[after_labels..].find(" # ") {
        Some(at) => &line[..after_labels + at],
        None => line,
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
    /// Long-polls waiting for a publication now.
    pub long_polls_waiting: u64,
    /// SSE streams open now (counted in `connections` too; WebSockets are the rest).
    pub sse_streams: u64,
    /// Bytes written to WebSocket and SSE sockets since start.
    pub bytes_out: u64,
    /// Whether this node's Redis bus does not answer now (always false on a local bus).
    pub bus_degraded: bool,
    /// Topics this node follows on the Redis bus now.
    pub bus_followed_topics: u64,
    /// Gaps in offsets filled from Redis since start.
    pub bus_gaps_filled: u64,
    /// Topics loaded from Redis since start.
    pub bus_reloads: u64,
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
    /// Closed because a gateway-wide buffer budget was full (1013).
    pub overloaded: u64,
    /// Tokens that expired without a `refresh` (close 4001).
    pub token_expired: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
        application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,\
        */*;q=0.1";

    #[test]
    fn negotiates_like_prometheus_asks() {
        use MetricsFormat::*;
        assert_eq!(
            MetricsFormat::negotiate(Some(PROMETHEUS_ACCEPT)),
            OpenMetrics
        );
        assert_eq!(MetricsFormat::negotiate(None), Classic);
        assert_eq!(MetricsFormat::negotiate(Some("*/*")), Classic);
        assert_eq!(MetricsFormat::negotiate(Some("text/plain")), Classic);
        assert_eq!(
            MetricsFormat::negotiate(Some("application/openmetrics-text")),
            OpenMetrics
        );
        assert_eq!(
            MetricsFormat::negotiate(Some("application/openmetrics-text; version=0.0.1")),
            Classic
        );
        assert_eq!(
            MetricsFormat::negotiate(Some(
                "application/openmetrics-text;q=0.2, text/plain;version=0.0.4;q=0.9"
            )),
            Classic
        );
        assert_eq!(
            MetricsFormat::negotiate(Some("application/openmetrics-text;q=0, */*")),
            Classic
        );
        assert_eq!(
            MetricsFormat::negotiate(Some("text/plain;q=0.1, application/*")),
            OpenMetrics
        );
    }

    #[test]
    fn classic_names_counters_by_their_samples() {
        let open = "# HELP a_requests Requests.\n# TYPE a_requests counter\n# UNIT a_requests \
            seconds\na_requests_total{x=\"a # b\"} 2 # {trace=\"1\"} 1.0\na_requests_created \
            1.5\n# HELP a_up Up, \\\"really\\\".\n# TYPE a_up gauge\na_up 1\n# TYPE a_odd \
            unknown\na_odd 3\n# TYPE a_build info\na_build_info{v=\"1\"} 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_classic(open),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\n\
             a_requests_total{x=\"a # b\"} 2\n# HELP a_up Up, \"really\".\n# TYPE a_up gauge\n\
             a_up 1\n# TYPE a_odd untyped\na_odd 3\n# TYPE a_build_info gauge\n\
             a_build_info{v=\"1\"} 1\n"
        );
    }

    #[test]
    fn every_close_reason_is_exposed_from_the_start() {
        let text = Metrics::default().prometheus_text();
        for reason in CloseReason::ALL {
            let sample = format!(
                "tidings_connections_closed_total{{reason=\"{}\"}} 0\n",
                reason.as_str()
            );
            assert!(text.contains(&sample), "no {sample:?} in {text}");
        }
        assert!(!text.contains("# EOF"));
        assert!(Metrics::default().openmetrics_text().ends_with("# EOF\n"));
    }
}
