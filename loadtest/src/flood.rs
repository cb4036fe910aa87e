//! The `flood` scenario: publishers as fast as they can on one topic whose subscribers
//! are half not reading, beside a quiet control topic. It measures what a bounded gateway
//! does under publish pressure: how much it refuses (503), whether the control topic stays
//! fast, whether every reading subscriber gets exactly what was accepted (or an explicit
//! 1013 naming where it stopped), and how high the gateway's memory goes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::Result;
use crate::coord::{Aggregate, Workers};
use crate::offsets::Ranges;
use crate::publisher::{Published, Publisher};
use crate::report::{Row, listing, mib, round};
use crate::run::{self, ClientOpts, Plan, SAMPLE_EVERY};
use crate::target::{ProcSample, Target};
use crate::wire;

/// A flood publish that takes longer than this counts as an error: short, so that the
/// publishers stop close to `--duration` even when the gateway stops answering.
const FLOOD_PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause after a failed publish (connection refused, timeout) so that a dead gateway
/// does not turn the publishers into a busy loop.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// How long the coordinator waits for publishers past `--duration`: each may be inside
/// one publish and its one retry on a fresh connection.
const PUBLISHER_GRACE: Duration = Duration::from_secs(5);

/// What `flood` does.
#[derive(Debug, Clone)]
pub struct FloodPlan {
    /// Subscribers of the flood topic.
    pub subscribers: usize,
    /// Fraction of them that never read (small `SO_RCVBUF`).
    pub slow_fraction: f64,
    /// `SO_RCVBUF` of the ones that never read.
    pub slow_rcvbuf: usize,
    /// Flood publisher connections, each publishing back to back.
    pub publishers: usize,
    /// Payload bytes per publication (flood and control).
    pub payload: usize,
    /// How long the flood lasts.
    pub duration: Duration,
    /// Publications per second on the control topic.
    pub control_rate: f64,
    /// Memory ceiling the gateway's peak RSS is checked against, in MiB.
    pub ceiling_mib: Option<f64>,
}

/// What a set of publishers got back.
#[derive(Debug, Clone, Default)]
pub struct PublishTally {
    /// Publications attempted.
    pub attempted: u64,
    /// Accepted (202).
    pub accepted: u64,
    /// Refused with 503.
    pub refused: u64,
    /// 503s that carried `Retry-After`.
    pub retry_after: u64,
    /// Responses by status (`"202"`, `"503"`, ...) and failures (`"error: ..."`).
    pub statuses: BTreeMap<String, u64>,
    /// Offsets of the accepted publications.
    pub offsets: Vec<u64>,
}

impl PublishTally {
    fn record(&mut self, res: Result<Published>) {
        self.attempted += 1;
        let key = match res {
            Ok(p) => {
                match p.status {
                    202 => {
                        self.accepted += 1;
                        match p.offset {
                            Some(o) => self.offsets.push(o),
                            None => self.count("202 without offset".into()),
                        }
                    }
                    503 => {
                        self.refused += 1;
                        self.retry_after += u64::from(p.retry_after);
                    }
                    _ => {}
                }
                p.status.to_string()
            }
            Err(e) => format!("error: {e}"),
        };
        self.count(key);
    }

    fn count(&mut self, key: String) {
        *self.statuses.entry(key).or_default() += 1;
    }

    fn merge(&mut self, other: PublishTally) {
        self.attempted += other.attempted;
        self.accepted += other.accepted;
        self.refused += other.refused;
        self.retry_after += other.retry_after;
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.offsets.extend(other.offsets);
    }
}

/// What a `flood` run measured.
#[derive(Debug, Clone, Default)]
pub struct FloodData {
    /// Server sample before any connection.
    pub before: Option<ProcSample>,
    /// Server sample once every subscriber is connected and settled.
    pub connected: Option<ProcSample>,
    /// Largest RSS seen from connecting to the end of the flood.
    pub rss_max: Option<u64>,
    /// Server sample once the drain finished.
    pub drained: Option<ProcSample>,
    /// The flood publishers' results.
    pub flood: PublishTally,
    /// The control publisher's results.
    pub control: PublishTally,
    /// Seconds the flood lasted.
    pub flood_secs: f64,
    /// The flood subscribers' results (with the exact delivery verdicts).
    pub agg: Aggregate,
    /// The control subscriber's results (its latency is the control latency).
    pub control_agg: Aggregate,
}

impl FloodData {
    /// Reading subscribers that got neither everything nor a valid 1013.
    pub fn violations(&self) -> u64 {
        self.agg.flood.violations
    }
}

/// Publishes back to back on `topic` until `end`, never retrying a refusal.
fn flood_publisher(
    addr: SocketAddr,
    topic: &str,
    payload: usize,
    end: Instant,
    seq: &AtomicU64,
) -> PublishTally {
    let mut publisher = Publisher::with_timeout(addr, FLOOD_PUBLISH_TIMEOUT);
    let mut body = Vec::with_capacity(payload + 64);
    let mut tally = PublishTally::default();
    while Instant::now() < end {
        let n = seq.fetch_add(1, Ordering::Relaxed);
        wire::build_payload(&mut body, wire::now_ns(), n, payload);
        let res = publisher.publish(topic, &body);
        let failed = res.is_err();
        tally.record(res);
        if failed {
            std::thread::sleep(ERROR_BACKOFF);
        }
    }
    tally
}

/// Publishes `rate` per second on `topic`, paced from the start, until `end`.
fn control_publisher(
    addr: SocketAddr,
    topic: &str,
    payload: usize,
    rate: f64,
    end: Instant,
) -> PublishTally {
    let mut publisher = Publisher::with_timeout(addr, FLOOD_PUBLISH_TIMEOUT);
    let mut body = Vec::with_capacity(payload + 64);
    let mut tally = PublishTally::default();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let start = Instant::now();
    for seq in 0u64.. {
        let due = start + interval.mul_f64(seq as f64);
        if due >= end {
            break;
        }
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        wire::build_payload(&mut body, wire::now_ns(), seq, payload);
        tally.record(publisher.publish(topic, &body));
    }
    tally
}

/// Waits until every worker of `workers` finished connecting.
fn connect_all(workers: &mut Workers, target: &mut Target, what: &str) -> Result<()> {
    while !workers.all_ready() {
        workers.poll_until(Instant::now() + Duration::from_millis(100))?;
        if !target.alive() {
            return Err(format!("{} exited while connecting {what}", target.label).into());
        }
    }
    Ok(())
}

/// Runs `flood` against `target`.
pub fn run(target: &mut Target, plan: &FloodPlan, opts: &ClientOpts) -> Result<FloodData> {
    let mut data = FloodData::default();
    std::thread::sleep(opts.settle);
    data.before = target.sample();
    let flood_plan = Plan {
        conns: plan.subscribers,
        topics: 1,
        slow_fraction: plan.slow_fraction.clamp(0.0, 1.0),
        slow_rcvbuf: plan.slow_rcvbuf,
        churn_rate: 0.0,
        churn_hold: Duration::ZERO,
        publish: None,
        track_offsets: true,
    };
    let control_opts = ClientOpts {
        prefix: format!("{}-control", opts.prefix),
        processes: 1,
        ..opts.clone()
    };
    let control_plan = Plan {
        conns: 1,
        slow_fraction: 0.0,
        ..flood_plan.clone()
    };
    let flood_topic = format!("{}:0", opts.prefix);
    let control_topic = format!("{}:0", control_opts.prefix);

    let pb = run::bar(opts.progress, plan.subscribers as u64, "connecting");
    let mut workers = Workers::spawn(&run::specs(target, &flood_plan, opts))?;
    let mut control = Workers::spawn(&run::specs(target, &control_plan, &control_opts))?;
    connect_all(&mut control, target, "the control subscriber")?;
    run::connect_showing(&mut workers, target, &pb)?;
    pb.finish_and_clear();
    let mut peak = None;
    let settle_end = Instant::now() + opts.settle;
    while Instant::now() < settle_end {
        workers.poll_until((Instant::now() + SAMPLE_EVERY).min(settle_end))?;
        run::track_peak(target, &mut peak);
    }
    data.connected = target.sample();

    let start = Instant::now();
    let end = start + plan.duration;
    let seq = AtomicU64::new(0);
    let addr = target.addr;
    let pb = run::bar(opts.progress, plan.duration.as_secs().max(1), "flooding");
    let (flood, ctl) = std::thread::scope(|s| -> Result<_> {
        let floods: Vec<_> = (0..plan.publishers.max(1))
            .map(|_| s.spawn(|| flood_publisher(addr, &flood_topic, plan.payload, end, &seq)))
            .collect();
        let ctl = s.spawn(|| {
            control_publisher(addr, &control_topic, plan.payload, plan.control_rate, end)
        });
        let limit = end + PUBLISHER_GRACE;
        while Instant::now() < limit
            && !(ctl.is_finished() && floods.iter().all(|h| h.is_finished()))
        {
            workers.poll_until(Instant::now() + SAMPLE_EVERY)?;
            run::track_peak(target, &mut peak);
            pb.set_position(start.elapsed().as_secs());
            pb.set_message(format!("{} subscribers closed", workers.progress().closed));
        }
        let mut flood = PublishTally::default();
        for h in floods {
            flood.merge(h.join().map_err(|_| "a flood publisher panicked")?);
        }
        let ctl = ctl.join().map_err(|_| "the control publisher panicked")?;
        Ok((flood, ctl))
    })?;
    pb.finish_and_clear();
    data.flood_secs = start.elapsed().as_secs_f64();
    run::track_peak(target, &mut peak);
    data.rss_max = peak;
    // Both drains run at once, so the control subscriber is judged over the same time.
    let control_accepted = Ranges::from_offsets(ctl.offsets.clone());
    let n = control_accepted.len();
    control.stop(vec![n], control_accepted, opts.drain)?;
    let accepted = Ranges::from_offsets(flood.offsets.clone());
    workers.stop(vec![accepted.len()], accepted, opts.drain)?;
    data.control_agg = control.collect()?;
    data.agg = workers.collect()?;
    data.drained = target.sample();
    data.flood = flood;
    data.control = ctl;
    Ok(data)
}

/// The figures of a `flood` run for one target.
pub fn row(label: &str, plan: &FloodPlan, d: &FloodData) -> Row {
    let mut r = Row::new(label);
    let a = &d.agg;
    let f = &d.flood;
    r.add("subscribers", "subscribers", plan.subscribers as u64);
    r.add("subscribed", "subscribed", a.progress.subscribed);
    r.add("connect_failed", "connect failed", a.progress.failed);
    r.add("not_reading", "not reading", a.slow_total);
    r.add("publishers", "flood publishers", plan.publishers as u64);
    r.add("flood_attempted", "flood attempted", f.attempted);
    r.add("flood_accepted", "flood accepted (202)", f.accepted);
    r.add("flood_refused", "flood refused (503)", f.refused);
    let share = (f.attempted > 0).then(|| round(100.0 * f.refused as f64 / f.attempted as f64, 2));
    r.opt("refused_pct", "refused %", share);
    r.add("refused_retry_after", "503 with Retry-After", f.retry_after);
    r.add(
        "flood_other",
        "flood other statuses",
        listing(&f.statuses, &["202", "503"]),
    );
    let rate = (d.flood_secs > 0.0).then(|| round(f.accepted as f64 / d.flood_secs, 0));
    r.opt("accepted_per_s", "accepted/s", rate);
    r.add("reading_complete", "reading: complete", a.flood.complete);
    r.add("reading_1013", "reading: 1013, no gap", a.flood.slow_closed);
    r.add(
        "reading_violations",
        "reading: VIOLATIONS",
        a.flood.violations,
    );
    let first = a.flood.examples.first().map_or("none", String::as_str);
    r.add("violation_examples", "first violation", first);
    r.add(
        "unacknowledged",
        "offsets without a 202",
        a.flood.unacknowledged,
    );
    r.add(
        "reading_ended",
        "reading ended by",
        listing(&a.regular_closed, &[]),
    );
    r.add(
        "not_reading_ended",
        "not reading ended by",
        listing(&a.slow_outcomes, &[]),
    );
    r.add("flood_p50_ms", "flood p50 ms", round(a.latency.p50_ms, 2));
    r.add("flood_p99_ms", "flood p99 ms", round(a.latency.p99_ms, 2));
    let c = &d.control_agg;
    r.add(
        "control_p50_ms",
        "control p50 ms",
        round(c.latency.p50_ms, 2),
    );
    r.add(
        "control_p99_ms",
        "control p99 ms",
        round(c.latency.p99_ms, 2),
    );
    r.add(
        "control_max_ms",
        "control max ms",
        round(c.latency.max_ms, 2),
    );
    r.add("control_received", "control received", c.latency.count);
    r.add("control_lost", "control lost", c.lost);
    let control_ok = c.flood.violations == 0 && c.flood.complete + c.flood.slow_closed == 1;
    r.add("control_exact", "control got every accepted", control_ok);
    r.add(
        "control_statuses",
        "control statuses",
        listing(&d.control.statuses, &[]),
    );
    let rss = |s: Option<ProcSample>| s.map(|s| mib(s.rss));
    r.opt("rss_before_mib", "rss before MiB", rss(d.before));
    r.opt("rss_connected_mib", "rss connected MiB", rss(d.connected));
    r.opt("rss_peak_mib", "rss peak MiB", d.rss_max.map(mib));
    r.opt("ceiling_mib", "ceiling MiB", plan.ceiling_mib);
    let under = plan.ceiling_mib.zip(d.rss_max).map(|(c, m)| mib(m) <= c);
    r.opt("under_ceiling", "peak under ceiling", under);
    r.opt("rss_drained_mib", "rss drained MiB", rss(d.drained));
    let mut fails = a.fail_reasons.clone();
    for (k, v) in &c.fail_reasons {
        *fails.entry(format!("control {k}")).or_default() += v;
    }
    r.add("fail_reasons", "failures", listing(&fails, &[]));
    let cpu = a.client_cpu_s.0 + a.client_cpu_s.1 + c.client_cpu_s.0 + c.client_cpu_s.1;
    r.add("client_cpu_s", "client cpu s", round(cpu, 2));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_statuses_and_offsets() {
        let mut t = PublishTally::default();
        let ok = |o| {
            Ok(Published {
                status: 202,
                offset: Some(o),
                retry_after: false,
            })
        };
        t.record(ok(1));
        t.record(Ok(Published {
            status: 503,
            offset: None,
            retry_after: true,
        }));
        t.record(ok(2));
        t.record(Err("publisher connection closed".into()));
        assert_eq!(
            (t.attempted, t.accepted, t.refused, t.retry_after),
            (4, 2, 1, 1)
        );
        assert_eq!(t.offsets, vec![1, 2]);
        assert_eq!(
            listing(&t.statuses, &["202", "503"]),
            "error: publisher connection closed: 1"
        );
    }
}
