//! The `stall` scenario: thousands of connections from one source address send an
//! incomplete request head or the start of a long body and then nothing (a slowloris
//! attack), re-opened whenever the server ends them; meanwhile a client from another
//! address makes sequential attempts to connect, upgrade and subscribe, and each attempt
//! is timed. A gateway with per-address handshake limits and request deadlines keeps those
//! attempts fast; one without them makes them wait behind the attack.

mod attack;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::watch;

use crate::Result;
use crate::conn::{self, Fail, WsConn};
use crate::histo::{self, Latency};
use crate::report::{Row, listing, mib, round};
use crate::run::{self, SAMPLE_EVERY};
use crate::target::{ProcSample, Target};

pub use attack::{AttackTally, BODY_LENGTH, KindTally};

/// Files the harness needs besides the stalled sockets: stdio, the runtimes' epoll and
/// wake-up descriptors, the client attempt's socket, a spawned server's pipes.
const FD_HEADROOM: u64 = 64;

/// The longest the attack may take to open every stalled connection once before the
/// client attempts start anyway.
const RAMP_TIMEOUT: Duration = Duration::from_secs(30);

/// The latency target: every attempt's p99 under this.
const TARGET_P99: Duration = Duration::from_secs(1);

/// What `stall` does.
#[derive(Debug, Clone)]
pub struct StallPlan {
    /// The attacking source address.
    pub attack_addr: Ipv4Addr,
    /// The client's source address.
    pub client_addr: Ipv4Addr,
    /// Connections that send an incomplete head.
    pub stalled_heads: usize,
    /// Connections that send a complete `POST` head and a few body bytes.
    pub stalled_bodies: usize,
    /// Wait before re-opening a stalled connection the server ended.
    pub reopen: Duration,
    /// Sequential client attempts.
    pub tries: usize,
    /// Deadline of one attempt (connect + upgrade + subscribe).
    pub try_timeout: Duration,
    /// The attempts are paced to start over at least this long, so that they sample the
    /// attack across the server's request deadlines and the attack's re-opens.
    pub spread: Duration,
    /// Longest the attempts may take in all; the rest are not made.
    pub max_time: Duration,
}

/// What the client attempts got.
#[derive(Debug, Clone)]
pub struct TryTally {
    /// Attempts made.
    pub made: u64,
    /// Attempts that ended subscribed.
    pub ok: u64,
    /// Failed attempts by reason.
    pub failures: BTreeMap<String, u64>,
    /// Every attempt's time in µs (failures included, a timeout as its deadline).
    pub time_us: Histogram<u64>,
}

/// What a `stall` run measured.
#[derive(Debug, Clone)]
pub struct StallData {
    /// Server sample before the attack.
    pub before: Option<ProcSample>,
    /// Largest RSS seen during the run.
    pub rss_max: Option<u64>,
    /// Stalled connections open when the client attempts started.
    pub open_at_start: u64,
    /// Fewest and most stalled connections open while the attempts ran (sampled).
    pub open_range: (u64, u64),
    /// Stalled connections opened in all (re-opens included).
    pub opened: u64,
    /// How the server ended them.
    pub attack: AttackTally,
    /// The client attempts.
    pub tries: TryTally,
    /// Seconds the attempts took.
    pub tries_secs: f64,
}

/// One attempt: connect from `src`, upgrade, subscribe to `topic`.
async fn attempt(
    addr: SocketAddr,
    src: Ipv4Addr,
    path: &str,
    topic: &str,
    seed: u64,
    scratch: &RefCell<Vec<u8>>,
) -> std::result::Result<WsConn, Fail> {
    let stream = conn::connect_from(addr, src, true, 0).await?;
    let mut ws = WsConn::upgrade(stream, &addr.to_string(), path, seed).await?;
    conn::subscribe(&mut ws, scratch, topic).await?;
    Ok(ws)
}

/// Makes the plan's client attempts one after another, on this thread.
fn client_tries(addr: SocketAddr, plan: &StallPlan, path: &str, topic: &str) -> Result<TryTally> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let scratch = RefCell::new(Vec::new());
    let mut t = TryTally {
        made: 0,
        ok: 0,
        failures: BTreeMap::new(),
        time_us: histo::new(),
    };
    let start = Instant::now();
    // Never shorter than the pacing itself.
    let give_up = start + plan.max_time.max(plan.spread + plan.try_timeout);
    let every = plan.spread.div_f64(plan.tries.max(1) as f64);
    rt.block_on(async {
        for k in 0..plan.tries {
            let due = start + every.mul_f64(k as f64);
            tokio::time::sleep_until(due.into()).await;
            if Instant::now() >= give_up {
                break;
            }
            let start = Instant::now();
            let res = tokio::time::timeout(
                plan.try_timeout,
                attempt(addr, plan.client_addr, path, topic, k as u64, &scratch),
            )
            .await;
            let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
            t.time_us.saturating_record(us.max(1));
            t.made += 1;
            let fail = match res {
                // Dropping the connection closes it: the next attempt starts afresh.
                Ok(Ok(_ws)) => None,
                Ok(Err(fail)) => Some(fail.label()),
                Err(_) => Some("timeout".to_string()),
            };
            match fail {
                None => t.ok += 1,
                Some(why) => *t.failures.entry(why).or_default() += 1,
            }
        }
    });
    Ok(t)
}

/// Runs `stall` against `target`.
pub fn run(target: &mut Target, plan: &StallPlan, opts: &run::ClientOpts) -> Result<StallData> {
    for ip in [plan.attack_addr, plan.client_addr] {
        if !ip.is_loopback() {
            return Err(format!("{ip} is not a loopback address").into());
        }
    }
    let stalled = (plan.stalled_heads + plan.stalled_bodies) as u64;
    let limit = crate::nofile_limit().unwrap_or(0);
    if stalled + FD_HEADROOM > limit {
        return Err(format!(
            "{stalled} stalled connections need {} open files, the limit is {limit}",
            stalled + FD_HEADROOM
        )
        .into());
    }
    std::thread::sleep(opts.settle);
    let before = target.sample();
    let mut peak = before.map(|s| s.rss);
    let live = Arc::new(attack::Live::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let attack = attack::Attack {
        addr: target.addr,
        src: plan.attack_addr,
        heads: plan.stalled_heads,
        bodies: plan.stalled_bodies,
        reopen: plan.reopen,
        path: opts.path.clone(),
        topic: format!("{}:stall", opts.prefix),
    };
    let attacker = {
        let live = live.clone();
        std::thread::spawn(move || attack.run(live, stop_rx))
    };
    let stop = || {
        // The receivers outlive this send: the attack thread holds them until it ends.
        let _ = stop_tx.send(true);
    };
    let pb = run::bar(opts.progress, stalled, "stalling");
    let ramp_end = Instant::now() + RAMP_TIMEOUT;
    while live.first_done.load(Ordering::Relaxed) < stalled && Instant::now() < ramp_end {
        std::thread::sleep(SAMPLE_EVERY);
        run::track_peak(target, &mut peak);
        pb.set_position(live.first_done.load(Ordering::Relaxed));
        pb.set_message(format!("{} open", live.open.load(Ordering::Relaxed)));
        if attacker.is_finished() || !target.alive() {
            break;
        }
    }
    pb.finish_and_clear();
    let open_at_start = live.open.load(Ordering::Relaxed);
    let mut open_range = (open_at_start, open_at_start);
    let start = Instant::now();
    let client = {
        let (addr, plan) = (target.addr, plan.clone());
        let (path, topic) = (opts.path.clone(), format!("{}:stall-client", opts.prefix));
        std::thread::spawn(move || client_tries(addr, &plan, &path, &topic))
    };
    let pb = run::bar(opts.progress, 0, "trying");
    while !client.is_finished() {
        std::thread::sleep(SAMPLE_EVERY);
        run::track_peak(target, &mut peak);
        let open = live.open.load(Ordering::Relaxed);
        open_range = (open_range.0.min(open), open_range.1.max(open));
        pb.set_message(format!("{open} stalled open"));
        if !target.alive() {
            break;
        }
    }
    pb.finish_and_clear();
    stop();
    let tries = client
        .join()
        .map_err(|_| "the client attempts panicked")??;
    let tries_secs = start.elapsed().as_secs_f64();
    let tally = attacker.join().map_err(|_| "the attack panicked")??;
    if !target.alive() {
        return Err(format!("{} exited during the attack", target.label).into());
    }
    Ok(StallData {
        before,
        rss_max: peak,
        open_at_start,
        open_range,
        opened: live.opened.load(Ordering::Relaxed),
        attack: tally,
        tries,
        tries_secs,
    })
}

/// Seconds at quantile `q` of a histogram of milliseconds (`None` if empty).
fn held_s(h: &Histogram<u64>, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| round(h.value_at_quantile(q) as f64 / 1000.0, 2))
}

/// The figures of a `stall` run for one target.
pub fn row(label: &str, plan: &StallPlan, d: &StallData) -> Row {
    let mut r = Row::new(label);
    r.add("attack_addr", "attack from", plan.attack_addr.to_string());
    r.add("stalled_heads", "stalled heads", plan.stalled_heads as u64);
    r.add(
        "stalled_bodies",
        "stalled bodies",
        plan.stalled_bodies as u64,
    );
    r.add("stalled_opened", "stalled opened (re-opens too)", d.opened);
    r.add(
        "open_at_start",
        "stalled open at first try",
        d.open_at_start,
    );
    r.add("open_min", "stalled open min during tries", d.open_range.0);
    r.add("open_max", "stalled open max during tries", d.open_range.1);
    let a = &d.attack;
    r.add(
        "heads_ended",
        "heads ended by",
        listing(&a.heads.outcomes, &[]),
    );
    r.opt(
        "heads_held_p50_s",
        "heads held p50 s",
        held_s(&a.heads.held_ms, 0.5),
    );
    r.opt(
        "heads_held_max_s",
        "heads held max s",
        held_s(&a.heads.held_ms, 1.0),
    );
    r.add(
        "bodies_ended",
        "bodies ended by",
        listing(&a.bodies.outcomes, &[]),
    );
    r.opt(
        "bodies_held_p50_s",
        "bodies held p50 s",
        held_s(&a.bodies.held_ms, 0.5),
    );
    r.opt(
        "bodies_held_max_s",
        "bodies held max s",
        held_s(&a.bodies.held_ms, 1.0),
    );
    let t = &d.tries;
    r.add("client_addr", "client from", plan.client_addr.to_string());
    r.add("tries", "tries", plan.tries as u64);
    r.add("tries_made", "tries made", t.made);
    r.add("tries_ok", "tries ok", t.ok);
    r.add("tries_failed", "tries failed", t.made - t.ok);
    r.add("try_failures", "try failures", listing(&t.failures, &[]));
    let l = Latency::of(&t.time_us);
    r.add("try_p50_ms", "try p50 ms", round(l.p50_ms, 2));
    r.add("try_p99_ms", "try p99 ms", round(l.p99_ms, 2));
    r.add("try_max_ms", "try max ms", round(l.max_ms, 2));
    let target_ms = TARGET_P99.as_secs_f64() * 1000.0;
    let met = t.made > 0 && t.ok == t.made && l.p99_ms < target_ms;
    r.add("p99_under_1s", "p99 under 1 s, no failure", met);
    r.add("tries_s", "tries took s", round(d.tries_secs, 2));
    let rss = |s: Option<ProcSample>| s.map(|s| mib(s.rss));
    r.opt("rss_before_mib", "rss before MiB", rss(d.before));
    r.opt("rss_peak_mib", "rss peak MiB", d.rss_max.map(mib));
    r
}
