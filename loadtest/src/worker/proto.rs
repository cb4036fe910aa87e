//! The messages between the coordinator and a worker process, as JSON lines: the spec
//! (first line of the worker's stdin), commands, and the worker's reports.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::conn::Transport;
use crate::offsets::{Ranges, Tally};
use crate::peer::PeerClient;

/// What one worker process is asked to do (first line of its stdin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// The server.
    pub addr: SocketAddr,
    /// Upgrade path.
    pub path: String,
    /// Global index of this worker's first connection (topic and source address spread).
    pub first: usize,
    /// Connections this worker opens and keeps (regular and slow).
    pub count: usize,
    /// Topics `PREFIX:0 .. PREFIX:T-1`; connection `i` subscribes to `i % T`.
    pub topics: usize,
    /// Topic name prefix.
    pub prefix: String,
    /// Source addresses 127.0.0.1 ..= 127.0.0.k.
    pub source_addrs: u8,
    /// Connection attempts in flight at once.
    pub concurrency: usize,
    /// Fraction of connections that stop reading once subscribed.
    pub slow_fraction: f64,
    /// `SO_RCVBUF` of slow connections (0 = kernel default).
    pub slow_rcvbuf: usize,
    /// Connects per second this worker adds while churn runs.
    pub churn_rate: f64,
    /// How long a churn connection stays subscribed before closing.
    pub churn_hold_ms: u64,
    /// Connect + upgrade + subscribe deadline.
    pub timeout_ms: u64,
    /// Record every offset regular subscribers receive and judge them against the
    /// accepted offsets at the end (the `flood` check).
    #[serde(default)]
    pub track_offsets: bool,
    /// How subscribers connect and subscribe.
    #[serde(default)]
    pub transport: Transport,
    /// WebSocket subscribers offer permessage-deflate.
    #[serde(default)]
    pub deflate: bool,
    /// A server described by a peer file: how to subscribe and read its deliveries
    /// (`None`: tidings' own protocol).
    #[serde(default)]
    pub peer: Option<PeerClient>,
}

impl WorkerSpec {
    /// Whether global connection `i` is one of the slow ones: spread evenly, so that a
    /// fraction f marks exactly ⌊N·f⌋ of any prefix of N connections.
    pub fn is_slow(&self, i: usize) -> bool {
        let f = self.slow_fraction;
        f > 0.0 && ((i + 1) as f64 * f).floor() > (i as f64 * f).floor()
    }

    /// The topic connection `i` subscribes to.
    pub fn topic(&self, i: usize) -> String {
        format!("{}:{}", self.prefix, i % self.topics.max(1))
    }
}

/// Coordinator → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Start opening and closing churn connections.
    ChurnStart,
    /// Stop starting churn connections (open ones finish their hold).
    ChurnStop,
    /// Publishing is over: `published[t]` publications went to topic `t`. Wait up to
    /// `drain_ms` for every subscriber to have them all, then report and exit.
    Stop {
        /// Publications per topic index.
        published: Vec<u64>,
        /// Drain deadline in milliseconds.
        drain_ms: u64,
        /// With `track_offsets`: the offsets that were accepted (202), all on topic 0.
        #[serde(default)]
        accepted: Ranges,
    },
    /// A step of a stepped run is over: `published[t]` publications went to topic `t`
    /// since the start. Wait up to `drain_ms` for every subscriber to have them all,
    /// report a [`Report::Checkpoint`] of what arrived since the last one, and go on.
    Checkpoint {
        /// Publications per topic index since the start.
        published: Vec<u64>,
        /// Drain deadline in milliseconds.
        drain_ms: u64,
    },
}

/// Worker → coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Report {
    /// Periodic counters.
    Progress(Progress),
    /// Every connection of the initial set finished connecting (or failed).
    Ready(Progress),
    /// Final result; the worker exits after it.
    Result(Box<WorkerResult>),
    /// What arrived since the previous checkpoint (latency, deliveries, duplicates; loss
    /// and expected are since the start); the worker goes on.
    Checkpoint(Box<WorkerResult>),
}

/// Live counters of a worker.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Connections subscribed.
    pub subscribed: u64,
    /// Connections that failed to connect, upgrade or subscribe.
    pub failed: u64,
    /// Subscribed connections the server has since closed.
    pub closed: u64,
    /// Churn connections that subscribed.
    pub churn_ok: u64,
    /// Churn connections that failed.
    pub churn_failed: u64,
    /// Churn connections currently open.
    pub churn_open: u64,
    /// Milliseconds since the worker started.
    pub elapsed_ms: u64,
}

/// Everything a worker measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    /// Final counters.
    pub progress: Progress,
    /// Milliseconds from start until the last initial connection subscribed.
    pub connect_ms: u64,
    /// Failures by kind (initial and churn connections).
    pub fail_reasons: BTreeMap<String, u64>,
    /// Events received by regular subscribers.
    pub deliveries: u64,
    /// Events whose offset was not above the last one seen on that connection.
    pub duplicates: u64,
    /// Events regular subscribers should have received.
    pub expected: u64,
    /// Expected events never received.
    pub lost: u64,
    /// Fragmented text frames (not measured).
    pub fragmented: u64,
    /// Bytes of whole text frames received, as on the wire.
    #[serde(default)]
    pub text_bytes: u64,
    /// Latency histogram in µs (hdrhistogram V2, base64).
    pub histogram: String,
    /// How the server ended regular subscribers, by kind.
    pub regular_closed: BTreeMap<String, u64>,
    /// Slow subscribers in this worker.
    pub slow_total: u64,
    /// How slow subscribers ended up, by kind (`close 1013`, `eof`, `still open`).
    pub slow_outcomes: BTreeMap<String, u64>,
    /// The worker's own CPU seconds (user, system).
    pub client_cpu_s: (f64, f64),
    /// With `track_offsets`: the verdicts on regular subscribers.
    #[serde(default)]
    pub flood: Tally,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(f: f64) -> WorkerSpec {
        WorkerSpec {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            path: "/ws".into(),
            first: 0,
            count: 0,
            topics: 3,
            prefix: "bench".into(),
            source_addrs: 1,
            concurrency: 1,
            slow_fraction: f,
            slow_rcvbuf: 0,
            churn_rate: 0.0,
            churn_hold_ms: 0,
            timeout_ms: 0,
            track_offsets: false,
            transport: Transport::Ws,
            deflate: false,
            peer: None,
        }
    }

    #[test]
    fn slow_fraction_is_exact_and_spread() {
        let s = spec(0.1);
        let slow: Vec<usize> = (0..100).filter(|&i| s.is_slow(i)).collect();
        assert_eq!(slow.len(), 10);
        assert_eq!(slow[0], 9);
        assert_eq!(slow[1], 19);
        assert!(!(0..100).any(|i| spec(0.0).is_slow(i)));
        assert!((0..100).all(|i| spec(1.0).is_slow(i)));
    }

    #[test]
    fn topics_round_robin() {
        let s = spec(0.0);
        assert_eq!(s.topic(4), "bench:1");
    }
}
