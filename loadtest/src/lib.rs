//! The tidings load-test harness and its two comparison servers.
//!
//! Layout:
//! - [`wire`]: sans-IO WebSocket frames, handshake, event scanning, HTTP heads;
//! - [`sse`]: sans-IO Server-Sent Events: the stream request, an incremental parser;
//! - [`conn`]: one cheap client connection, WebSocket or SSE (raw bytes, shared scratch
//!   buffer);
//! - [`worker`]: a client worker process (single-threaded tokio runtime);
//! - [`coord`]: the coordinator's handle on worker processes and result merging;
//! - [`run`]: one measured run (connect, churn, publish, drain, sample the server);
//! - [`scenarios`]: `idle`, `fanout`, `churn`, `slow` as plans and figures;
//! - [`cluster`]: several nodes on one Redis ([`redis_server`], the harness's own) against
//!   one node alone, driven like `fanout` over several servers;
//! - [`flood`]: publishers as fast as they can against a bounded gateway, a control topic,
//!   and the exact delivery check of [`offsets`];
//! - [`many`]: many topics with a few subscribers each, the publication rate stepped up
//!   until the p99 passes a limit or anything is lost;
//! - [`peer`]: peer files, which describe any WebSocket pub/sub server (how to start it,
//!   subscribe, publish, and read the harness's timestamp back);
//! - [`stall`]: stalled request heads and bodies from one address, connect attempts
//!   from another;
//! - [`target`]: spawning or attaching to the server, `/proc` memory and CPU;
//! - [`publisher`], [`histo`], [`report`], [`server`]: HTTP publishing, latency
//!   histograms, tables/JSON, and what the comparison servers share.
//!
//! The binaries are `tidings-loadtest` (the harness), `tidings-floor` (the physical
//! floor: one pre-encoded frame written to every socket from one thread per core) and
//! `tidings-naive` (a task pair per connection, a broadcast channel, serialization per
//! subscriber).
#![deny(missing_docs)]

pub mod cluster;
pub mod conn;
pub mod coord;
pub mod flood;
pub mod histo;
pub mod many;
pub mod offsets;
pub mod peer;
pub mod publisher;
pub mod redis_server;
pub mod report;
pub mod run;
pub mod scenarios;
pub mod server;
pub mod sse;
pub mod stall;
pub mod target;
pub mod wire;
pub mod worker;

/// The harness's error type: every failure here ends a run with a message.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The soft open-file limit of this process, if it can be read.
pub fn nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to an rlimit.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    ok.then_some(lim.rlim_cur)
}

/// Raises the soft open-file limit to the hard one (each process holds one file per
/// connection; the coordinator keeps every process within the hard limit).
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
