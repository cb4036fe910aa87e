//! One measured run against one target: connect the subscribers through worker
//! processes, optionally churn and publish, drain, and sample the server's memory and CPU
//! at each step. The scenarios are different [`Plan`]s over this one driver.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::Result;
use crate::conn::Transport;
use crate::coord::{Aggregate, Workers};
use crate::publisher::{Publisher, Route};
use crate::target::{ProcSample, Target};
use crate::wire;
use crate::worker::{Command, WorkerSpec};

/// How often RSS is sampled while a phase runs.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Consecutive failed publishes after which the run is abandoned.
const MAX_PUBLISH_ERRORS: u32 = 20;

/// Client-side settings common to every scenario.
#[derive(Debug, Clone)]
pub struct ClientOpts {
    /// Upgrade path.
    pub path: String,
    /// Topic name prefix.
    pub prefix: String,
    /// Source addresses 127.0.0.1 ..= 127.0.0.k.
    pub source_addrs: u8,
    /// Most connections per worker process (open-file budget).
    pub per_process: usize,
    /// Least number of worker processes.
    pub processes: usize,
    /// Connection attempts in flight per worker.
    pub concurrency: usize,
    /// Connect + upgrade + subscribe deadline.
    pub timeout: Duration,
    /// Wait before memory samples, so the server's allocator and kernel settle.
    pub settle: Duration,
    /// How long subscribers may take to receive the last publications.
    pub drain: Duration,
    /// Show progress bars.
    pub progress: bool,
    /// Connections opened and closed before the baseline sample, so that one-time costs
    /// (allocator segments, thread buffers touched on first use) are not counted per
    /// connection.
    pub warmup: usize,
    /// How subscribers connect and subscribe (WebSocket or an SSE stream).
    pub transport: Transport,
    /// WebSocket subscribers offer permessage-deflate (RFC 7692).
    pub deflate: bool,
}

/// Publishing during a run.
#[derive(Debug, Clone, Copy)]
pub struct Publishing {
    /// Publications per second, over all topics (round-robin).
    pub rate: f64,
    /// Payload size in bytes.
    pub payload: usize,
    /// Publish a realistic ~5 KB JSON configuration document (with the send time) instead
    /// of `payload` padded bytes.
    pub config_doc: bool,
    /// How long to publish.
    pub duration: Duration,
}

/// What a run does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Subscribers opened before anything else (regular and slow).
    pub conns: usize,
    /// Topics they spread over.
    pub topics: usize,
    /// Fraction of subscribers that stop reading.
    pub slow_fraction: f64,
    /// `SO_RCVBUF` of slow subscribers (0 = default).
    pub slow_rcvbuf: usize,
    /// Churn connects per second (0 = none) while publishing.
    pub churn_rate: f64,
    /// How long a churn connection stays.
    pub churn_hold: Duration,
    /// Publishing, if any.
    pub publish: Option<Publishing>,
    /// Whether workers record every offset for an exact check (`flood`).
    pub track_offsets: bool,
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct RunData {
    /// Server sample before any connection.
    pub before: Option<ProcSample>,
    /// Server sample once every subscriber is connected and settled.
    pub connected: Option<ProcSample>,
    /// Largest RSS seen while publishing.
    pub rss_max: Option<u64>,
    /// Server sample after churn stopped and settled.
    pub after_churn: Option<ProcSample>,
    /// Server sample once the drain finished.
    pub drained: Option<ProcSample>,
    /// Server sample after every client exited and settled.
    pub after_close: Option<ProcSample>,
    /// Server sample when publishing started (CPU baseline).
    pub publish_start: Option<ProcSample>,
    /// Publications accepted (202).
    pub published: u64,
    /// Publications refused or failed.
    pub publish_errors: u64,
    /// Seconds spent publishing.
    pub publish_secs: f64,
    /// The merged client results.
    pub agg: Aggregate,
}

impl RunData {
    /// Server CPU seconds (user, system) from the start of publishing to the drain.
    pub fn cpu(&self) -> Option<(f64, f64)> {
        let (a, b) = (self.publish_start?, self.drained?);
        Some((b.user_s - a.user_s, b.sys_s - a.sys_s))
    }
}

/// A progress bar (hidden unless `show`).
pub(crate) fn bar(show: bool, len: u64, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_prefix(what.to_string());
    pb
}

/// Waits until every worker has opened its connections, showing them on `pb`; fails if
/// the server exits meanwhile.
pub(crate) fn connect_showing(
    workers: &mut Workers,
    target: &mut Target,
    pb: &ProgressBar,
) -> Result<()> {
    while !workers.all_ready() {
        workers.poll_until(Instant::now() + Duration::from_millis(100))?;
        let p = workers.progress();
        pb.set_position(p.subscribed + p.failed);
        pb.set_message(format!("{} failed", p.failed));
        if !target.alive() {
            return Err(format!("{} exited while connecting", target.label).into());
        }
    }
    Ok(())
}

/// The worker processes' specs for `plan`: connections split evenly, each process
/// within the per-process open-file budget.
pub(crate) fn specs(target: &Target, plan: &Plan, opts: &ClientOpts) -> Vec<WorkerSpec> {
    let mut specs = specs_at(target.addr, 0, plan, opts);
    if let Some(peer) = &target.peer {
        for s in &mut specs {
            s.peer = Some(peer.client.clone());
        }
    }
    specs
}

/// [`specs`] for the server at `addr`, numbering the connections from `first` (several
/// servers' workers then spread over the source addresses and topics as one set does).
pub(crate) fn specs_at(
    addr: SocketAddr,
    mut first: usize,
    plan: &Plan,
    opts: &ClientOpts,
) -> Vec<WorkerSpec> {
    let per = opts.per_process.max(1);
    let n = opts.processes.max(plan.conns.div_ceil(per)).max(1);
    (0..n)
        .map(|w| {
            let count = plan.conns / n + usize::from(w < plan.conns % n);
            let spec = WorkerSpec {
                addr,
                path: opts.path.clone(),
                first,
                count,
                topics: plan.topics.max(1),
                prefix: opts.prefix.clone(),
                source_addrs: opts.source_addrs,
                concurrency: opts.concurrency,
                slow_fraction: plan.slow_fraction,
                slow_rcvbuf: plan.slow_rcvbuf,
                churn_rate: plan.churn_rate / n as f64,
                churn_hold_ms: u64::try_from(plan.churn_hold.as_millis()).unwrap_or(u64::MAX),
                timeout_ms: u64::try_from(opts.timeout.as_millis()).unwrap_or(u64::MAX),
                track_offsets: plan.track_offsets,
                transport: opts.transport,
                deflate: opts.deflate,
                peer: None,
            };
            first += count;
            spec
        })
        .collect()
}

/// Waits `d` while following workers and sampling the server's peak RSS.
fn wait(workers: &mut Workers, target: &Target, d: Duration, peak: &mut Option<u64>) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        workers.poll_until((Instant::now() + SAMPLE_EVERY).min(end))?;
        track_peak(target, peak);
    }
    Ok(())
}

/// Raises `peak` to the server's current RSS.
pub(crate) fn track_peak(target: &Target, peak: &mut Option<u64>) {
    if let Some(s) = target.sample() {
        *peak = Some(peak.map_or(s.rss, |p| p.max(s.rss)));
    }
}

/// Runs `plan` against `target`.
pub fn run(target: &mut Target, plan: &Plan, opts: &ClientOpts) -> Result<RunData> {
    let mut data = RunData::default();
    if opts.warmup > 0 {
        let warm = Plan {
            conns: opts.warmup,
            topics: plan.topics,
            slow_fraction: 0.0,
            slow_rcvbuf: 0,
            churn_rate: 0.0,
            churn_hold: Duration::ZERO,
            publish: None,
            track_offsets: false,
        };
        let mut workers = Workers::spawn(&specs(target, &warm, opts))?;
        while !workers.all_ready() {
            workers.poll_until(Instant::now() + Duration::from_millis(100))?;
        }
        // Dropping the workers ends their processes, closing every warm-up connection.
        drop(workers);
    }
    std::thread::sleep(opts.settle);
    data.before = target.sample();
    let mut workers = Workers::spawn(&specs(target, plan, opts))?;

    let pb = bar(opts.progress, plan.conns as u64, "connecting");
    connect_showing(&mut workers, target, &pb)?;
    pb.finish_and_clear();
    let mut peak = None;
    wait(&mut workers, target, opts.settle, &mut peak)?;
    data.connected = target.sample();

    if plan.churn_rate > 0.0 {
        workers.send(&Command::ChurnStart)?;
    }
    let mut published = vec![0u64; plan.topics.max(1)];
    if let Some(publish) = plan.publish {
        data.publish_start = target.sample();
        let route = target
            .peer
            .as_ref()
            .map_or(Route::Gateway, |p| Route::Peer(&p.publish));
        let totals = publish_for(
            target.addr,
            route,
            &mut workers,
            publish,
            &mut published,
            opts,
            || track_peak(target, &mut peak),
        )?;
        data.published = totals.accepted;
        data.publish_errors = totals.errors;
        data.publish_secs = totals.secs;
    }
    if plan.churn_rate > 0.0 {
        workers.send(&Command::ChurnStop)?;
        let limit = Instant::now() + plan.churn_hold + opts.timeout + Duration::from_secs(5);
        while workers.progress().churn_open > 0 && Instant::now() < limit {
            workers.poll_until(Instant::now() + Duration::from_millis(100))?;
        }
        wait(&mut workers, target, opts.settle, &mut peak)?;
        data.after_churn = target.sample();
    }
    data.rss_max = peak;
    data.agg = workers.finish(published, opts.drain)?;
    data.drained = target.sample();
    std::thread::sleep(opts.settle);
    data.after_close = target.sample();
    Ok(data)
}

/// What the publisher of a run got back.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishTotals {
    /// Publications accepted (202).
    pub accepted: u64,
    /// Publications refused or failed.
    pub errors: u64,
    /// Seconds spent publishing.
    pub secs: f64,
}

/// Publishes at the planned rate to the server at `addr`, round-robin over topics,
/// counting per topic; `sample` runs every [`SAMPLE_EVERY`] (to follow servers' memory).
pub(crate) fn publish_for(
    addr: SocketAddr,
    route: Route<'_>,
    workers: &mut Workers,
    publish: Publishing,
    published: &mut [u64],
    opts: &ClientOpts,
    mut sample: impl FnMut(),
) -> Result<PublishTotals> {
    let mut totals = PublishTotals::default();
    let mut publisher = Publisher::new(addr);
    let topics: Vec<String> = (0..published.len())
        .map(|t| format!("{}:{t}", opts.prefix))
        .collect();
    let total = (publish.rate * publish.duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / publish.rate.max(1e-3));
    let pb = bar(opts.progress, total, "publishing");
    let doc = publish.config_doc.then(wire::config_document);
    let mut body = Vec::with_capacity(publish.payload + 64);
    let mut consecutive_errors = 0;
    let mut next_sample = Instant::now();
    let start = Instant::now();
    for seq in 0..total {
        let due = start + interval.mul_f64(seq as f64);
        workers.poll_until(due)?;
        let t = (seq as usize) % topics.len();
        match &doc {
            Some(doc) => wire::build_doc_payload(&mut body, wire::now_ns(), seq, doc),
            None => wire::build_payload(&mut body, wire::now_ns(), seq, publish.payload),
        }
        match publisher.publish_via(route, &topics[t], &body) {
            Ok(p) if p.accepted() => {
                published[t] += 1;
                totals.accepted += 1;
                consecutive_errors = 0;
            }
            Ok(p) => {
                totals.errors += 1;
                consecutive_errors += 1;
                if totals.errors == 1 {
                    eprintln!("publish refused: HTTP {}", p.status);
                }
            }
            Err(e) => {
                totals.errors += 1;
                consecutive_errors += 1;
                if totals.errors == 1 {
                    eprintln!("publish failed: {e}");
                }
            }
        }
        if consecutive_errors >= MAX_PUBLISH_ERRORS {
            return Err(format!("{consecutive_errors} publishes in a row failed").into());
        }
        if Instant::now() >= next_sample {
            sample();
            next_sample = Instant::now() + SAMPLE_EVERY;
            pb.set_position(seq + 1);
            let p = workers.progress();
            pb.set_message(format!(
                "{} closed, churn {}/{}",
                p.closed, p.churn_ok, p.churn_failed
            ));
        }
    }
    // Let the last interval elapse so that the run lasts its duration.
    workers.poll_until(start + publish.duration)?;
    totals.secs = start.elapsed().as_secs_f64();
    pb.finish_and_clear();
    Ok(totals)
}
