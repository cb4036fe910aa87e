//! The `many` scenario: many topics with a few subscribers each (the shape of workflow
//! runs, jobs and config profiles: the cost per publication decides), publications
//! round-robin over the topics, the rate stepped up until the p99 passes a limit or
//! anything is lost.
//!
//! Every subscriber connects once; each step publishes at its rate for a fixed time from
//! several keep-alive HTTP connections (one thread each, one request in flight), then the
//! workers drain and report the step ([`crate::coord::Workers::checkpoint`]) and go on to
//! the next one with the same connections.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::Result;
use crate::coord::{Aggregate, Workers};
use crate::publisher::{Publisher, Route};
use crate::report::{Row, listing, mib, round};
use crate::run::{self, ClientOpts, Plan};
use crate::target::{ProcSample, Target};
use crate::wire;

/// Publishers start this long after the step begins, so that every thread is running
/// before the first publication is due.
const STEP_LEAD: Duration = Duration::from_millis(20);

/// A publisher thread that falls this far behind its schedule stops: the step's rate
/// was not held, and a backlog of sends would only blur the next step.
const LATE_CUTOFF: Duration = Duration::from_secs(1);

/// A step holds its rate if its publications were accepted at least at this share of
/// it, counted from the first publication to the last answer (publishers and server
/// keeping up; publishers that run late stretch the time, so the share falls).
const ACHIEVED_SHARE: f64 = 0.95;

/// How often the coordinator follows workers and the server's memory while a step
/// publishes.
const FOLLOW_EVERY: Duration = Duration::from_millis(50);

/// What `many` does.
#[derive(Debug, Clone)]
pub struct ManyPlan {
    /// Topics `PREFIX:0 .. PREFIX:N-1`.
    pub topics: usize,
    /// Subscribers per topic.
    pub per_topic: usize,
    /// Publication rates (per second, over all topics), one step each, in order.
    pub rates: Vec<f64>,
    /// How long each step publishes.
    pub step: Duration,
    /// Payload size in bytes.
    pub payload: usize,
    /// Publisher connections (one thread and one request in flight each).
    pub publishers: usize,
    /// A step whose p99 passes this (ms) ends the run.
    pub p99_limit_ms: f64,
    /// Publications per request through tidings' batch `POST /v1/publish` (0: one
    /// `POST /v1/topics/{topic}/events` each, as for every server).
    pub batch: usize,
}

impl ManyPlan {
    /// The plan's parameters for reports.
    pub fn params(&self) -> serde_json::Value {
        serde_json::json!({
            "topics": self.topics, "per_topic": self.per_topic, "rates": self.rates,
            "step_s": self.step.as_secs_f64(), "payload": self.payload,
            "publishers": self.publishers, "p99_limit_ms": self.p99_limit_ms,
            "batch": self.batch,
        })
    }
}

/// One step's figures.
#[derive(Debug, Clone)]
pub struct Step {
    /// The rate asked for.
    pub rate: f64,
    /// Publications accepted.
    pub accepted: u64,
    /// Publications refused or failed.
    pub errors: u64,
    /// Publications not sent because the publishers fell behind.
    pub unsent: u64,
    /// Seconds from the first publication to the last answer.
    pub secs: f64,
    /// What the subscribers received in this step (latency, deliveries, duplicates).
    pub agg: Aggregate,
    /// Publications of this step (or before) some subscriber never received.
    pub lost: u64,
    /// Server CPU seconds (user + system) from the step's start to its drain.
    pub cpu_s: Option<f64>,
    /// Why the step did not hold its rate; `None` if it did.
    pub failed: Option<String>,
}

impl Step {
    /// Accepted publications per second.
    pub fn achieved(&self) -> f64 {
        self.accepted as f64 / self.secs.max(1e-9)
    }

    /// Deliveries per second.
    pub fn deliveries_per_s(&self) -> f64 {
        self.agg.deliveries as f64 / self.secs.max(1e-9)
    }

    /// Server CPU µs per delivery.
    pub fn us_per_delivery(&self) -> Option<f64> {
        let cpu = self.cpu_s?;
        (self.agg.deliveries > 0).then(|| cpu * 1e6 / self.agg.deliveries as f64)
    }
}

/// What a `many` run measured.
#[derive(Debug, Clone, Default)]
pub struct ManyData {
    /// Subscribers that subscribed.
    pub subscribed: u64,
    /// Subscribers that failed to, by kind.
    pub fail_reasons: std::collections::BTreeMap<String, u64>,
    /// Failed subscribers.
    pub failed: u64,
    /// Seconds until every subscriber was subscribed.
    pub connect_s: f64,
    /// Server sample once connected and settled.
    pub connected: Option<ProcSample>,
    /// Largest server RSS while publishing.
    pub rss_max: Option<u64>,
    /// The steps run, the last one the first that failed (if any did).
    pub steps: Vec<Step>,
    /// Client CPU seconds of every worker, at the end.
    pub client_cpu_s: f64,
}

/// What the publisher threads of one step did.
#[derive(Debug, Default)]
struct Lane {
    /// Accepted publications per topic index.
    per_topic: Vec<u64>,
    accepted: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Runs `plan` against `target`.
pub fn run(target: &mut Target, plan: &ManyPlan, opts: &ClientOpts) -> Result<ManyData> {
    if plan.batch > 0 && target.peer.is_some() {
        return Err("--batch is tidings' own POST /v1/publish: give tidings with --spawn".into());
    }
    let topics = plan.topics.max(1);
    let subs = Plan {
        conns: topics * plan.per_topic.max(1),
        topics,
        slow_fraction: 0.0,
        slow_rcvbuf: 0,
        churn_rate: 0.0,
        churn_hold: Duration::ZERO,
        publish: None,
        track_offsets: false,
    };
    let mut workers = Workers::spawn(&run::specs(target, &subs, opts))?;
    let pb = run::bar(opts.progress, subs.conns as u64, "connecting");
    run::connect_showing(&mut workers, target, &pb)?;
    pb.finish_and_clear();
    let mut data = ManyData::default();
    workers.poll_until(Instant::now() + opts.settle)?;
    data.connected = target.sample();
    let names: Vec<String> = (0..topics)
        .map(|t| format!("{}:{t}", opts.prefix))
        .collect();
    let peer_publish = target.peer.as_ref().map(|p| p.publish.clone());
    let route = match (&peer_publish, plan.batch) {
        (Some(p), _) => Route::Peer(p),
        (None, 0) => Route::Gateway,
        (None, _) => Route::Batch,
    };
    let mut published = vec![0u64; topics];
    let mut seq = 0u64;
    let mut lost_before = 0u64;
    for &rate in &plan.rates {
        let before = target.sample();
        let started = Instant::now();
        let lanes = publish_step(
            target.addr,
            route,
            &names,
            rate,
            plan,
            seq,
            &mut workers,
            || run::track_peak(target, &mut data.rss_max),
        )?;
        let secs = started
            .elapsed()
            .saturating_sub(STEP_LEAD)
            .max(plan.step)
            .as_secs_f64();
        seq += (rate * plan.step.as_secs_f64()).round() as u64;
        let mut step = Step {
            rate,
            accepted: 0,
            errors: 0,
            unsent: 0,
            secs,
            agg: Aggregate::default(),
            lost: 0,
            cpu_s: None,
            failed: None,
        };
        let mut first_error = None;
        for lane in lanes {
            for (t, n) in lane.per_topic.iter().enumerate() {
                published[t] += n;
            }
            step.accepted += lane.accepted;
            step.errors += lane.errors;
            first_error = first_error.or(lane.first_error);
        }
        let total = (rate * plan.step.as_secs_f64()).round() as u64;
        step.unsent = total.saturating_sub(step.accepted + step.errors);
        step.agg = workers.checkpoint(published.clone(), opts.drain)?;
        let after = target.sample();
        step.cpu_s = before
            .zip(after)
            .map(|(b, a)| (a.user_s + a.sys_s) - (b.user_s + b.sys_s));
        step.lost = step.agg.lost.saturating_sub(lost_before);
        lost_before = step.agg.lost;
        step.failed = verdict(&step, plan, first_error.as_deref());
        let stop = step.failed.is_some();
        if opts.progress {
            eprintln!(
                "many: {} {rate}/s: p99 {:.2} ms, lost {}{}",
                target.label,
                step.agg.latency.p99_ms,
                step.lost,
                step.failed
                    .as_deref()
                    .map_or(String::new(), |f| format!(" ({f})"))
            );
        }
        data.steps.push(step);
        if stop || !target.alive() {
            break;
        }
    }
    let end = workers.finish(published, Duration::ZERO)?;
    data.connect_s = end.connect_ms as f64 / 1000.0;
    data.subscribed = end.progress.subscribed;
    data.failed = end.progress.failed;
    data.fail_reasons = end.fail_reasons;
    data.client_cpu_s = end.client_cpu_s.0 + end.client_cpu_s.1;
    Ok(data)
}

/// Why `step` did not hold its rate, or `None` if it did: anything lost, duplicated or
/// refused, a p99 past the limit, or fewer publications than asked for.
fn verdict(step: &Step, plan: &ManyPlan, first_error: Option<&str>) -> Option<String> {
    let p99 = step.agg.latency.p99_ms;
    if step.lost > 0 {
        Some(format!("lost {}", step.lost))
    } else if step.agg.duplicates > 0 {
        Some(format!("{} duplicates", step.agg.duplicates))
    } else if step.errors > 0 {
        Some(format!(
            "{} publish errors ({})",
            step.errors,
            first_error.unwrap_or("?")
        ))
    } else if p99 > plan.p99_limit_ms {
        Some(format!("p99 {p99:.1} ms > {} ms", plan.p99_limit_ms))
    } else if step.achieved() < step.rate * ACHIEVED_SHARE {
        Some(format!(
            "{:.0}/s published of {}/s",
            step.achieved(),
            step.rate
        ))
    } else {
        None
    }
}

/// Publishes `rate` per second for the step's duration from `plan.publishers` threads,
/// publication `i` (global sequence number `seq0 + i`) on topic `(seq0 + i) % N`, due at
/// `i / rate` after the start; `follow` runs while they do. With `plan.batch` B > 0, each
/// request carries publications `kB .. (k+1)B`, due when its first one is.
#[allow(clippy::too_many_arguments)]
fn publish_step(
    addr: SocketAddr,
    route: Route<'_>,
    topics: &[String],
    rate: f64,
    plan: &ManyPlan,
    seq0: u64,
    workers: &mut Workers,
    mut follow: impl FnMut(),
) -> Result<Vec<Lane>> {
    let total = (rate * plan.step.as_secs_f64()).round() as u64;
    let per_request = plan.batch.max(1) as u64;
    let requests = total.div_ceil(per_request);
    let lanes = plan.publishers.max(1) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let start = Instant::now() + STEP_LEAD;
    let cutoff = start + plan.step + LATE_CUTOFF;
    let payload = plan.payload;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..lanes)
            .map(|j| {
                s.spawn(move || {
                    let mut lane = Lane {
                        per_topic: vec![0; topics.len()],
                        ..Lane::default()
                    };
                    let mut publisher = Publisher::new(addr);
                    let mut one = Vec::with_capacity(payload + 64);
                    let mut body = Vec::with_capacity(payload + 64);
                    let mut items = Vec::with_capacity(per_request as usize);
                    for k in (j..requests).step_by(lanes as usize) {
                        let first = k * per_request;
                        let due = start + interval.mul_f64(first as f64);
                        let now = Instant::now();
                        if now >= cutoff {
                            break;
                        }
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        items.clear();
                        items.extend((first..total.min(first + per_request)).map(|i| {
                            let seq = seq0 + i;
                            (seq, (seq % topics.len() as u64) as usize)
                        }));
                        let sent = match route {
                            Route::Batch => {
                                batch_body(&mut body, &mut one, topics, &items, payload);
                                publisher.publish_via(route, "", &body)
                            }
                            _ => {
                                let (seq, t) = items[0];
                                wire::build_payload(&mut body, wire::now_ns(), seq, payload);
                                publisher.publish_via(route, &topics[t], &body)
                            }
                        };
                        lane.count(sent, &publisher, route, &items);
                    }
                    lane
                })
            })
            .collect();
        while !handles.iter().all(|h| h.is_finished()) {
            workers.poll_until(Instant::now() + FOLLOW_EVERY)?;
            follow();
        }
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "a publisher thread panicked".into()))
            .collect()
    })
}

/// The batch body `[{"topic":T,"data":PAYLOAD},..]` of `items` (sequence number, topic
/// index) into `body`, each payload built into `one`.
fn batch_body(
    body: &mut Vec<u8>,
    one: &mut Vec<u8>,
    topics: &[String],
    items: &[(u64, usize)],
    payload: usize,
) {
    body.clear();
    body.push(b'[');
    let now = wire::now_ns();
    for (n, &(seq, t)) in items.iter().enumerate() {
        if n > 0 {
            body.push(b',');
        }
        wire::build_payload(one, now, seq, payload);
        body.extend_from_slice(br#"{"topic":""#);
        body.extend_from_slice(topics[t].as_bytes());
        body.extend_from_slice(br#"","data":"#);
        body.extend_from_slice(one);
        body.push(b'}');
    }
    body.push(b']');
}

impl Lane {
    /// Counts the answer to one request carrying `items` (sequence number, topic index).
    fn count(
        &mut self,
        sent: Result<crate::publisher::Published>,
        publisher: &Publisher,
        route: Route<'_>,
        items: &[(u64, usize)],
    ) {
        let n = items.len() as u64;
        let p = match sent {
            Ok(p) => p,
            Err(e) => {
                self.errors += n;
                self.first_error.get_or_insert(e.to_string());
                return;
            }
        };
        if !p.accepted() {
            self.errors += n;
            self.first_error.get_or_insert(format!("HTTP {}", p.status));
            return;
        }
        let published = match route {
            Route::Batch => publisher.batch_accepted(),
            _ => Some(vec![true]),
        };
        let Some(published) = published.filter(|p| p.len() == items.len()) else {
            self.errors += n;
            self.first_error
                .get_or_insert("unreadable batch answer".into());
            return;
        };
        for (&(_, t), ok) in items.iter().zip(published) {
            if ok {
                self.per_topic[t] += 1;
                self.accepted += 1;
            } else {
                self.errors += 1;
                self.first_error
                    .get_or_insert("a batch item refused".into());
            }
        }
    }
}

/// The figures of one target.
pub fn row(label: &str, plan: &ManyPlan, d: &ManyData) -> Row {
    let mut r = Row::new(label);
    r.add(
        "connections",
        "connections",
        (plan.topics * plan.per_topic) as u64,
    );
    r.add("subscribed", "subscribed", d.subscribed);
    r.add("failed", "failed", d.failed);
    r.add("connect_s", "connect s", round(d.connect_s, 2));
    let held = d.steps.iter().take_while(|s| s.failed.is_none()).last();
    r.opt("held_rate", "highest rate held /s", held.map(|s| s.rate));
    r.opt(
        "held_deliveries_per_s",
        "deliveries/s at it",
        held.map(|s| round(s.deliveries_per_s(), 0)),
    );
    r.opt(
        "held_p50_ms",
        "p50 ms at it",
        held.map(|s| round(s.agg.latency.p50_ms, 2)),
    );
    r.opt(
        "held_p99_ms",
        "p99 ms at it",
        held.map(|s| round(s.agg.latency.p99_ms, 2)),
    );
    r.opt(
        "held_us_per_delivery",
        "server µs/delivery at it",
        held.and_then(Step::us_per_delivery).map(|u| round(u, 2)),
    );
    let stop = d
        .steps
        .iter()
        .find_map(|s| s.failed.as_ref().map(|f| format!("{}/s: {f}", s.rate)));
    r.add(
        "stopped_by",
        "stopped by",
        stop.unwrap_or_else(|| "none".into()),
    );
    let each = |f: &dyn Fn(&Step) -> serde_json::Value| -> serde_json::Value {
        d.steps.iter().map(f).collect::<Vec<_>>().into()
    };
    r.add("rates", "steps: rate /s", each(&|s| s.rate.into()));
    r.add(
        "achieved",
        "steps: published /s",
        each(&|s| round(s.achieved(), 0).into()),
    );
    r.add(
        "deliveries_per_s",
        "steps: deliveries /s",
        each(&|s| round(s.deliveries_per_s(), 0).into()),
    );
    r.add(
        "p50_ms",
        "steps: p50 ms",
        each(&|s| round(s.agg.latency.p50_ms, 2).into()),
    );
    r.add(
        "p99_ms",
        "steps: p99 ms",
        each(&|s| round(s.agg.latency.p99_ms, 2).into()),
    );
    r.add("lost", "steps: lost", each(&|s| s.lost.into()));
    r.add(
        "duplicates",
        "steps: duplicates",
        each(&|s| s.agg.duplicates.into()),
    );
    r.add(
        "errors",
        "steps: publish errors",
        each(&|s| s.errors.into()),
    );
    r.add(
        "us_per_delivery",
        "steps: server µs/delivery",
        each(&|s| s.us_per_delivery().map(|u| round(u, 2)).into()),
    );
    let rss = |s: Option<ProcSample>| s.map(|s| mib(s.rss));
    r.opt("rss_connected_mib", "rss connected MiB", rss(d.connected));
    r.opt("rss_max_mib", "rss max MiB", d.rss_max.map(mib));
    r.add("fail_reasons", "failures", listing(&d.fail_reasons, &[]));
    r.add("client_cpu_s", "client cpu s", round(d.client_cpu_s, 2));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> ManyPlan {
        ManyPlan {
            topics: 10,
            per_topic: 2,
            rates: vec![100.0, 200.0],
            step: Duration::from_secs(10),
            payload: 256,
            publishers: 2,
            p99_limit_ms: 50.0,
            batch: 0,
        }
    }

    fn step(accepted: u64, p99_ms: f64, lost: u64) -> Step {
        let mut agg = Aggregate::default();
        agg.latency.p99_ms = p99_ms;
        Step {
            rate: 100.0,
            accepted,
            errors: 0,
            unsent: 0,
            secs: 10.0,
            agg,
            lost,
            cpu_s: Some(1.0),
            failed: None,
        }
    }

    #[test]
    fn a_step_holds_only_without_loss_within_the_limit_at_its_rate() {
        let p = plan();
        assert_eq!(verdict(&step(1000, 12.0, 0), &p, None), None);
        assert_eq!(verdict(&step(960, 12.0, 0), &p, None), None);
        assert!(
            verdict(&step(1000, 12.0, 1), &p, None)
                .unwrap()
                .contains("lost 1")
        );
        assert!(
            verdict(&step(1000, 51.0, 0), &p, None)
                .unwrap()
                .contains("p99")
        );
        assert!(
            verdict(&step(900, 12.0, 0), &p, None)
                .unwrap()
                .contains("published")
        );
    }

    #[test]
    fn the_row_reports_the_last_step_held() {
        let mut held = step(1000, 12.0, 0);
        held.agg.deliveries = 2000;
        let mut over = step(2000, 80.0, 0);
        over.rate = 200.0;
        over.failed = verdict(&over, &plan(), None);
        let d = ManyData {
            steps: vec![held, over],
            ..ManyData::default()
        };
        let r = row("x", &plan(), &d);
        let get = |k: &str| r.metrics.iter().find(|m| m.key == k).unwrap().value.clone();
        assert_eq!(get("held_rate"), 100.0);
        assert_eq!(get("held_deliveries_per_s"), 200.0);
        assert_eq!(get("held_us_per_delivery"), 500.0);
        assert!(
            get("stopped_by")
                .as_str()
                .unwrap()
                .starts_with("200/s: p99")
        );
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    #[test]
    fn a_batch_body_is_a_json_array_of_items() {
        let topics = vec!["b:0".to_string(), "b:1".to_string()];
        let (mut body, mut one) = (Vec::new(), Vec::new());
        batch_body(&mut body, &mut one, &topics, &[(4, 0), (5, 1)], 64);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v[1]["topic"], "b:1");
        assert_eq!(v[1]["data"]["seq"], 5);
        assert_eq!(v.as_array().unwrap().len(), 2);
    }
}
