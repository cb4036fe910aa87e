//! The four scenarios: each is a [`Plan`] for the shared driver and a choice of figures
//! from what the run measured.

use crate::report::{Row, listing, mib, round};
use crate::run::{Plan, RunData};

/// Which scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Connected, subscribed, quiet connections: memory per connection, connect rate.
    Idle,
    /// Publications fanned out to subscribers: latency, loss, CPU per delivery.
    Fanout,
    /// Connections opening and closing while publishing: failures, memory baseline.
    Churn,
    /// Some subscribers stop reading: others' latency, memory bound, slow ones closed.
    Slow,
}

impl Scenario {
    /// The scenario's name on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Fanout => "fanout",
            Scenario::Churn => "churn",
            Scenario::Slow => "slow",
        }
    }
}

fn per_conn(delta_bytes: i64, conns: u64) -> Option<i64> {
    (conns > 0).then(|| delta_bytes / i64::try_from(conns).unwrap_or(i64::MAX))
}

fn delta(a: u64, b: u64) -> i64 {
    i64::try_from(b).unwrap_or(i64::MAX) - i64::try_from(a).unwrap_or(i64::MAX)
}

/// The figures of `scenario` for one target.
pub fn row(scenario: Scenario, label: &str, plan: &Plan, d: &RunData, tolerance_pct: f64) -> Row {
    let mut r = Row::new(label);
    let a = &d.agg;
    let p = &a.progress;
    let connect_s = a.connect_ms as f64 / 1000.0;
    r.add("connections", "connections", plan.conns as u64);
    r.add("subscribed", "subscribed", p.subscribed);
    r.add("failed", "failed", p.failed);
    r.add("connect_s", "connect s", round(connect_s, 2));
    let rate = (connect_s > 0.0).then(|| round(p.subscribed as f64 / connect_s, 0));
    r.opt("connect_rate", "connects/s", rate);
    let rss = |s: Option<crate::target::ProcSample>| s.map(|s| mib(s.rss));
    match scenario {
        Scenario::Idle => {
            r.opt("rss_before_mib", "rss before MiB", rss(d.before));
            r.opt("rss_connected_mib", "rss connected MiB", rss(d.connected));
            let growth = d
                .before
                .zip(d.connected)
                .and_then(|(b, c)| per_conn(delta(b.rss, c.rss), p.subscribed));
            r.opt("bytes_per_conn", "bytes/conn", growth);
            // Server CPU from before the first connect to the connected sample: the
            // handshakes (upgrade, authentication, subscribe), plus the settle time's idle
            // ticks.
            let connect_cpu = d
                .before
                .zip(d.connected)
                .map(|(b, c)| (c.user_s + c.sys_s) - (b.user_s + b.sys_s));
            r.opt(
                "server_connect_cpu_s",
                "server cpu s",
                connect_cpu.map(|c| round(c, 2)),
            );
            r.opt(
                "server_us_per_connect",
                "server µs/connect",
                connect_cpu
                    .filter(|_| p.subscribed > 0)
                    .map(|c| round(c * 1e6 / p.subscribed as f64, 1)),
            );
            r.opt(
                "rss_after_close_mib",
                "rss after close MiB",
                rss(d.after_close),
            );
        }
        Scenario::Fanout | Scenario::Slow | Scenario::Churn => {
            publish_metrics(&mut r, d);
        }
    }
    match scenario {
        Scenario::Idle => {}
        Scenario::Fanout => {
            r.opt("rss_connected_mib", "rss connected MiB", rss(d.connected));
            r.opt("rss_max_mib", "rss max MiB", d.rss_max.map(mib));
        }
        Scenario::Churn => {
            r.add("churn_rate", "churn connects/s", plan.churn_rate);
            r.add("churn_ok", "churn ok", p.churn_ok);
            r.add("churn_failed", "churn failed", p.churn_failed);
            r.opt("rss_before_mib", "rss before MiB", rss(d.before));
            r.opt("rss_baseline_mib", "rss baseline MiB", rss(d.connected));
            r.opt("rss_max_mib", "rss max MiB", d.rss_max.map(mib));
            r.opt(
                "rss_after_churn_mib",
                "rss after churn MiB",
                rss(d.after_churn),
            );
            let returned = d.connected.zip(d.after_churn).map(|(b, c)| {
                c.rss as f64 <= b.rss as f64 * (1.0 + tolerance_pct / 100.0) + 1024.0 * 1024.0
            });
            r.opt("rss_returned", "rss back to baseline", returned);
            r.opt(
                "rss_after_close_mib",
                "rss after close MiB",
                rss(d.after_close),
            );
        }
        Scenario::Slow => {
            r.add("slow_total", "slow subscribers", a.slow_total);
            let closed: u64 = a
                .slow_outcomes
                .iter()
                .filter(|(k, _)| k.as_str() != "still open")
                .map(|(_, v)| v)
                .sum();
            r.add("slow_closed", "slow closed by server", closed);
            r.add(
                "slow_outcomes",
                "slow outcomes",
                listing(&a.slow_outcomes, &[]),
            );
            r.opt("rss_connected_mib", "rss connected MiB", rss(d.connected));
            r.opt("rss_max_mib", "rss max MiB", d.rss_max.map(mib));
            let growth = d
                .connected
                .zip(d.rss_max)
                .and_then(|(c, m)| per_conn(delta(c.rss, m), a.slow_total));
            r.opt("max_growth_per_slow", "max growth bytes/slow", growth);
            r.opt("rss_drained_mib", "rss drained MiB", rss(d.drained));
        }
    }
    r.add(
        "regular_closed",
        "regular closed by server",
        listing(&a.regular_closed, &[]),
    );
    r.add("fail_reasons", "failures", listing(&a.fail_reasons, &[]));
    r.add(
        "client_cpu_s",
        "client cpu s",
        round(a.client_cpu_s.0 + a.client_cpu_s.1, 2),
    );
    r
}

fn publish_metrics(r: &mut Row, d: &RunData) {
    let a = &d.agg;
    r.add("published", "publications", d.published);
    r.add("publish_errors", "publish errors", d.publish_errors);
    r.add("deliveries", "deliveries", a.deliveries);
    r.add("expected", "expected", a.expected);
    r.add("lost", "lost", a.lost);
    r.add("duplicates", "duplicates", a.duplicates);
    let l = &a.latency;
    r.add("p50_ms", "p50 ms", round(l.p50_ms, 2));
    r.add("p90_ms", "p90 ms", round(l.p90_ms, 2));
    r.add("p99_ms", "p99 ms", round(l.p99_ms, 2));
    r.add("p999_ms", "p99.9 ms", round(l.p999_ms, 2));
    r.add("max_ms", "max ms", round(l.max_ms, 2));
    let cpu = d.cpu();
    r.opt("server_user_s", "server user s", cpu.map(|c| round(c.0, 2)));
    r.opt("server_sys_s", "server sys s", cpu.map(|c| round(c.1, 2)));
    let per = |s: f64| (a.deliveries > 0).then(|| round(s * 1e6 / a.deliveries as f64, 3));
    r.opt(
        "user_us_per_delivery",
        "user µs/delivery",
        cpu.and_then(|c| per(c.0)),
    );
    r.opt(
        "total_us_per_delivery",
        "total µs/delivery",
        cpu.and_then(|c| per(c.0 + c.1)),
    );
    r.opt(
        "wire_bytes_per_delivery",
        "wire bytes/delivery",
        (a.deliveries > 0).then(|| round(a.text_bytes as f64 / a.deliveries as f64, 1)),
    );
}
