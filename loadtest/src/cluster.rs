//! The `cluster` scenario: several tidings nodes on one Redis against one node alone, in
//! the same run and measured the same way.
//!
//! The cluster configuration starts a `redis-server` of its own ([`RedisServer`]) and N
//! nodes with `TIDINGS_BUS_KIND=redis`; each node gets its own subscribers (its own client
//! worker processes, numbered on from the previous node's so that source addresses and
//! topics spread as in one set), every subscriber is subscribed before the first
//! publication, and every publication goes through the first node. The single
//! configuration is one node with `TIDINGS_BUS_KIND=local` and no Redis. Both run through
//! [`run_nodes`], which is the `fanout` driver's sequence (connect, settle, publish at a
//! rate, drain) over several servers: latency, loss and duplicates over all subscribers
//! and per node, CPU per delivery per node, Redis CPU per publication.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::Result;
use crate::conn::Transport;
use crate::coord::{Aggregate, Workers};
use crate::offsets::Ranges;
use crate::redis_server::{CommandStat, RedisServer};
use crate::report::{Row, listing, mib, round};
use crate::run::{self, ClientOpts, Plan, PublishTotals, Publishing, SAMPLE_EVERY};
use crate::target::{ProcSample, Target};

/// One of the configurations a `cluster` run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Config {
    /// One node on the local bus, no Redis.
    Single,
    /// Several nodes on one Redis.
    Cluster,
}

impl Config {
    /// The configuration's name on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Config::Single => "single",
            Config::Cluster => "cluster",
        }
    }
}

/// What a `cluster` run does.
#[derive(Debug, Clone)]
pub struct ClusterPlan {
    /// The gateway binary every node runs.
    pub server: PathBuf,
    /// Extra arguments for every node (`--server-arg`).
    pub server_args: Vec<String>,
    /// The `redis-server` binary.
    pub redis_server: PathBuf,
    /// Nodes of the cluster configuration.
    pub nodes: usize,
    /// Subscribers on each node of the cluster configuration.
    pub per_node: usize,
    /// Subscribers of the single node.
    pub single: usize,
    /// Topics the subscribers spread over (subscriber i takes topic i % T, on every node).
    pub topics: usize,
    /// Publishing, through the first node.
    pub publish: Publishing,
}

/// What one node of a configuration measured.
#[derive(Debug, Clone, Default)]
pub struct NodeData {
    /// The node's label (also the name of its log).
    pub label: String,
    /// Sample once every subscriber is connected and settled.
    pub connected: Option<ProcSample>,
    /// Largest RSS from connecting to the end of publishing.
    pub rss_max: Option<u64>,
    /// Sample when publishing started (CPU baseline).
    pub publish_start: Option<ProcSample>,
    /// Sample once the drain finished.
    pub drained: Option<ProcSample>,
    /// Whether the node was still running at the end.
    pub alive: bool,
    /// The results of this node's subscribers.
    pub agg: Aggregate,
}

impl NodeData {
    /// CPU seconds (user, system) from the start of publishing to the drain.
    pub fn cpu(&self) -> Option<(f64, f64)> {
        cpu_between(self.publish_start, self.drained)
    }
}

/// What one configuration measured.
#[derive(Debug, Clone)]
pub struct ClusterData {
    /// Which configuration.
    pub config: Config,
    /// Subscribers per node.
    pub per_node: usize,
    /// Every node, the publishing one first.
    pub nodes: Vec<NodeData>,
    /// Every subscriber's results merged.
    pub agg: Aggregate,
    /// What the publisher got back.
    pub publish: PublishTotals,
    /// Redis when publishing started, if the configuration has one.
    pub redis_start: Option<ProcSample>,
    /// Redis once the last publication was answered. Its part of a publication is done by
    /// then (the script ran, the message went out to the nodes), and a long drain would
    /// add only Redis' own timers.
    pub redis_published: Option<ProcSample>,
    /// What Redis says it spent in each command over the whole run (`INFO commandstats`),
    /// if it answered.
    pub redis_commands: Option<BTreeMap<String, CommandStat>>,
    /// Largest Redis RSS seen while publishing.
    pub redis_rss_max: Option<u64>,
}

fn cpu_between(a: Option<ProcSample>, b: Option<ProcSample>) -> Option<(f64, f64)> {
    let (a, b) = (a?, b?);
    Some((b.user_s - a.user_s, b.sys_s - a.sys_s))
}

/// Starts `config`'s servers (Redis and nodes), runs it, and stops them.
pub fn measure(plan: &ClusterPlan, config: Config, opts: &ClientOpts) -> Result<ClusterData> {
    let (count, per_node) = match config {
        Config::Single => (1, plan.single),
        Config::Cluster => (plan.nodes.max(1), plan.per_node),
    };
    // Declared before the nodes so that it is dropped after them: nodes stop first.
    let mut redis = match config {
        Config::Single => None,
        Config::Cluster => Some(RedisServer::spawn(&plan.redis_server)?),
    };
    let env: Vec<(String, String)> = match &redis {
        None => vec![("TIDINGS_BUS_KIND".into(), "local".into())],
        Some(r) => vec![
            ("TIDINGS_BUS_KIND".into(), "redis".into()),
            ("TIDINGS_BUS_URL".into(), r.url()),
        ],
    };
    let name = plan
        .server
        .file_name()
        .map_or_else(|| "tidings".into(), |n| n.to_string_lossy().into_owned());
    let mut nodes = Vec::with_capacity(count);
    for k in 0..count {
        let label = format!("{name}-{}-{k}", config.name());
        nodes.push(Target::spawn_as(
            &plan.server,
            &plan.server_args,
            &env,
            label,
        )?);
    }
    if opts.progress {
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
        let on = redis
            .as_ref()
            .map_or_else(String::new, |r| format!(", Redis {}", r.addr));
        eprintln!("cluster: {} on {}{on}", config.name(), addrs.join(" "));
    }
    let sub_plan = Plan {
        conns: per_node,
        topics: plan.topics.max(1),
        slow_fraction: 0.0,
        slow_rcvbuf: 0,
        churn_rate: 0.0,
        churn_hold: Duration::ZERO,
        publish: Some(plan.publish),
        track_offsets: false,
    };
    run_nodes(config, &mut nodes, redis.as_mut(), &sub_plan, opts)
}

/// Fails if a node or Redis exited.
fn check_alive(nodes: &mut [Target], redis: &mut Option<&mut RedisServer>) -> Result<()> {
    for n in nodes.iter_mut() {
        if !n.alive() {
            let log = n.log.as_ref().map(|l| l.display().to_string());
            return Err(format!("{} exited; its log: {}", n.label, log.unwrap_or_default()).into());
        }
    }
    if let Some(r) = redis
        && !r.alive()
    {
        return Err("redis-server exited".into());
    }
    Ok(())
}

/// Raises each node's peak RSS, and Redis'.
fn track_peaks(
    nodes: &[Target],
    peaks: &mut [Option<u64>],
    redis: Option<&RedisServer>,
    redis_peak: &mut Option<u64>,
) {
    for (n, p) in nodes.iter().zip(peaks.iter_mut()) {
        run::track_peak(n, p);
    }
    if let Some(s) = redis.and_then(RedisServer::sample) {
        *redis_peak = Some(redis_peak.map_or(s.rss, |p| p.max(s.rss)));
    }
}

/// Runs `plan` with `plan.conns` subscribers on every node of `nodes`, publishing through
/// the first; `config` only labels the result.
pub fn run_nodes(
    config: Config,
    nodes: &mut [Target],
    mut redis: Option<&mut RedisServer>,
    plan: &Plan,
    opts: &ClientOpts,
) -> Result<ClusterData> {
    let publish = plan.publish.ok_or("cluster runs publish")?;
    let first_addr = nodes.first().ok_or("no node")?.addr;
    std::thread::sleep(opts.settle);
    let mut specs = Vec::new();
    let mut groups: Vec<Range<usize>> = Vec::new();
    for (k, node) in nodes.iter().enumerate() {
        let node_specs = run::specs_at(node.addr, k * plan.conns, plan, opts);
        groups.push(specs.len()..specs.len() + node_specs.len());
        specs.extend(node_specs);
    }
    let mut workers = Workers::spawn(&specs)?;
    let total = (plan.conns * nodes.len()) as u64;
    let pb = run::bar(opts.progress, total, "connecting");
    while !workers.all_ready() {
        workers.poll_until(Instant::now() + Duration::from_millis(100))?;
        let p = workers.progress();
        pb.set_position(p.subscribed + p.failed);
        pb.set_message(format!("{} failed", p.failed));
        check_alive(nodes, &mut redis)?;
    }
    pb.finish_and_clear();

    let mut peaks = vec![None; nodes.len()];
    let mut redis_peak = None;
    let settle_end = Instant::now() + opts.settle;
    while Instant::now() < settle_end {
        workers.poll_until((Instant::now() + SAMPLE_EVERY).min(settle_end))?;
        track_peaks(nodes, &mut peaks, redis.as_deref(), &mut redis_peak);
    }
    let connected: Vec<Option<ProcSample>> = nodes.iter().map(Target::sample).collect();

    let mut published = vec![0u64; plan.topics.max(1)];
    let redis_start = redis.as_deref().and_then(RedisServer::sample);
    let publish_start: Vec<Option<ProcSample>> = nodes.iter().map(Target::sample).collect();
    let totals = run::publish_for(
        first_addr,
        crate::publisher::Route::Gateway,
        &mut workers,
        publish,
        &mut published,
        opts,
        || track_peaks(nodes, &mut peaks, redis.as_deref(), &mut redis_peak),
    )?;
    let redis_published = redis.as_deref().and_then(RedisServer::sample);
    workers.stop(published, Ranges::default(), opts.drain)?;
    let results = workers.collect_each()?;
    let drained: Vec<Option<ProcSample>> = nodes.iter().map(Target::sample).collect();
    let redis_commands = match redis.as_deref().map(RedisServer::command_stats) {
        Some(Ok(stats)) => Some(stats),
        Some(Err(e)) => {
            eprintln!("cluster: INFO commandstats: {e}");
            None
        }
        None => None,
    };

    let mut node_data = Vec::with_capacity(nodes.len());
    for (k, node) in nodes.iter_mut().enumerate() {
        node_data.push(NodeData {
            label: node.label.clone(),
            connected: connected[k],
            rss_max: peaks[k],
            publish_start: publish_start[k],
            drained: drained[k],
            alive: node.alive(),
            agg: Aggregate::of(&results[groups[k].clone()])?,
        });
    }
    Ok(ClusterData {
        config,
        per_node: plan.conns,
        nodes: node_data,
        agg: Aggregate::of(&results)?,
        publish: totals,
        redis_start,
        redis_published,
        redis_commands,
        redis_rss_max: redis_peak,
    })
}

/// The table label of a configuration measured over `transport`.
pub fn label(d: &ClusterData, transport: Transport) -> String {
    let base = match d.config {
        Config::Single => "1 node, local bus".to_string(),
        Config::Cluster => format!("{} nodes, Redis", d.nodes.len()),
    };
    if transport == Transport::Ws {
        base
    } else {
        format!("{base} ({})", transport.name())
    }
}

/// One value per node, for a table cell (`a / b / c`) or a JSON array.
fn per_node<T: Into<Value>>(d: &ClusterData, f: impl Fn(&NodeData) -> Option<T>) -> Value {
    Value::Array(
        d.nodes
            .iter()
            .map(|n| f(n).map_or(Value::Null, Into::into))
            .collect(),
    )
}

/// µs of `cpu_s` per one of `n`, if there were any.
fn micros_per(cpu_s: f64, n: u64) -> Option<f64> {
    (n > 0).then(|| round(cpu_s * 1e6 / n as f64, 3))
}

/// Commands by time spent, most first: `evalsha 300 × 41.2 µs, ping 90 × 0.5 µs`.
fn command_listing(stats: &BTreeMap<String, CommandStat>) -> String {
    let mut by_time: Vec<(&String, &CommandStat)> = stats.iter().collect();
    by_time.sort_by_key(|c| std::cmp::Reverse(c.1.usec));
    let items: Vec<String> = by_time
        .iter()
        .filter(|(_, c)| c.calls > 0)
        .map(|(name, c)| {
            let per = c.usec as f64 / c.calls as f64;
            format!("{name} {} × {per:.1} µs", c.calls)
        })
        .collect();
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// The figures of one configuration. `single_p99_ms`, the single node's p99 in the same
/// run, gives the cluster's ratio to it.
pub fn row(label: &str, d: &ClusterData, single_p99_ms: Option<f64>) -> Row {
    let mut r = Row::new(label);
    let a = &d.agg;
    let p = &a.progress;
    r.add("config", "configuration", d.config.name());
    r.add("nodes", "nodes", d.nodes.len() as u64);
    let bus = if d.redis_start.is_some() {
        "redis"
    } else {
        "local"
    };
    r.add("bus", "bus", bus);
    r.add(
        "subscribers_per_node",
        "subscribers per node",
        d.per_node as u64,
    );
    r.add(
        "subscribers",
        "subscribers",
        (d.per_node * d.nodes.len()) as u64,
    );
    r.add("subscribed", "subscribed", p.subscribed);
    r.add("failed", "failed", p.failed);
    r.add(
        "connect_s",
        "connect s",
        round(a.connect_ms as f64 / 1000.0, 2),
    );
    r.add("published", "publications", d.publish.accepted);
    r.add("publish_errors", "publish errors", d.publish.errors);
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
    let ratio = single_p99_ms
        .filter(|s| *s > 0.0 && d.config == Config::Cluster)
        .map(|s| round(l.p99_ms / s, 2));
    r.opt("p99_vs_single", "p99 / single p99", ratio);
    r.add(
        "node_p50_ms",
        "p50 ms per node",
        per_node(d, |n| Some(round(n.agg.latency.p50_ms, 2))),
    );
    r.add(
        "node_p99_ms",
        "p99 ms per node",
        per_node(d, |n| Some(round(n.agg.latency.p99_ms, 2))),
    );
    r.add(
        "node_deliveries",
        "deliveries per node",
        per_node(d, |n| Some(n.agg.deliveries)),
    );
    r.add(
        "node_lost",
        "lost per node",
        per_node(d, |n| Some(n.agg.lost)),
    );
    r.add(
        "node_cpu_s",
        "cpu s per node",
        per_node(d, |n| n.cpu().map(|c| round(c.0 + c.1, 2))),
    );
    r.add(
        "node_us_per_delivery",
        "µs/delivery per node",
        per_node(d, |n| {
            n.cpu()
                .and_then(|c| micros_per(c.0 + c.1, n.agg.deliveries))
        }),
    );
    r.add(
        "node_user_us_per_delivery",
        "user µs/delivery per node",
        per_node(d, |n| {
            n.cpu().and_then(|c| micros_per(c.0, n.agg.deliveries))
        }),
    );
    // Every node's CPU over every delivery: what a delivery costs the whole configuration.
    let all_cpu: Option<f64> = d.nodes.iter().map(|n| n.cpu().map(|c| c.0 + c.1)).sum();
    r.opt(
        "us_per_delivery",
        "µs/delivery, all nodes",
        all_cpu.and_then(|c| micros_per(c, a.deliveries)),
    );
    let redis_cpu = cpu_between(d.redis_start, d.redis_published);
    r.opt(
        "redis_cpu_s",
        "redis cpu s",
        redis_cpu.map(|c| round(c.0 + c.1, 2)),
    );
    r.opt(
        "redis_us_per_publication",
        "redis µs/publication",
        redis_cpu.and_then(|c| micros_per(c.0 + c.1, d.publish.accepted)),
    );
    // Time in scripts: the publish script, plus each node's one load of the topic. Redis
    // also lists the commands a script calls (`xadd`, `publish`, ...) on their own lines,
    // and a script's time includes theirs, so the lines do not add up.
    let script_us = d.redis_commands.as_ref().map(|m| {
        ["evalsha", "eval"]
            .iter()
            .filter_map(|k| m.get(*k))
            .map(|c| c.usec)
            .sum::<u64>()
    });
    r.opt(
        "redis_script_us_per_publication",
        "redis script µs/publication",
        script_us.and_then(|u| micros_per(u as f64 / 1e6, d.publish.accepted)),
    );
    r.opt(
        "redis_commands",
        "redis commands",
        d.redis_commands.as_ref().map(command_listing),
    );
    r.add(
        "node_rss_connected_mib",
        "rss connected MiB per node",
        per_node(d, |n| n.connected.map(|s| mib(s.rss))),
    );
    r.add(
        "node_rss_max_mib",
        "rss max MiB per node",
        per_node(d, |n| n.rss_max.map(mib)),
    );
    r.opt(
        "redis_rss_max_mib",
        "redis rss max MiB",
        d.redis_rss_max.map(mib),
    );
    let exited: Vec<&str> = d
        .nodes
        .iter()
        .filter(|n| !n.alive)
        .map(|n| n.label.as_str())
        .collect();
    let exited = if exited.is_empty() {
        "none".to_string()
    } else {
        exited.join(", ")
    };
    r.add("nodes_exited", "nodes exited", exited);
    r.add(
        "regular_closed",
        "closed by a node",
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

/// The scenario's parameters for the JSON document and the table's title.
pub fn params(plan: &ClusterPlan, configs: &[Config]) -> Value {
    json!({
        "nodes": plan.nodes, "subscribers_per_node": plan.per_node,
        "single_subscribers": plan.single, "topics": plan.topics,
        "rate": plan.publish.rate, "payload": plan.publish.payload,
        "duration_s": plan.publish.duration.as_secs_f64(),
        "configs": configs.iter().map(|c| c.name()).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(config: Config, nodes: usize, p99_ms: f64) -> ClusterData {
        let node = |k: usize| NodeData {
            label: format!("tidings-{}-{k}", config.name()),
            publish_start: Some(ProcSample {
                rss: 0,
                user_s: 1.0,
                sys_s: 1.0,
            }),
            drained: Some(ProcSample {
                rss: 0,
                user_s: 1.5,
                sys_s: 3.0,
            }),
            alive: true,
            agg: Aggregate {
                deliveries: 1_000_000,
                ..Aggregate::default()
            },
            ..NodeData::default()
        };
        let mut agg = Aggregate {
            deliveries: 1_000_000 * nodes as u64,
            ..Aggregate::default()
        };
        agg.latency.p99_ms = p99_ms;
        ClusterData {
            config,
            per_node: 100,
            nodes: (0..nodes).map(node).collect(),
            agg,
            publish: PublishTotals {
                accepted: 300,
                errors: 0,
                secs: 30.0,
            },
            redis_start: (config == Config::Cluster).then_some(ProcSample {
                rss: 1 << 20,
                user_s: 0.0,
                sys_s: 0.0,
            }),
            redis_published: (config == Config::Cluster).then_some(ProcSample {
                rss: 1 << 20,
                user_s: 0.03,
                sys_s: 0.03,
            }),
            redis_commands: (config == Config::Cluster).then(|| {
                BTreeMap::from([
                    (
                        "evalsha".to_string(),
                        CommandStat {
                            calls: 300,
                            usec: 12_000,
                        },
                    ),
                    (
                        "ping".to_string(),
                        CommandStat {
                            calls: 100,
                            usec: 50,
                        },
                    ),
                ])
            }),
            redis_rss_max: None,
        }
    }

    fn metric<'a>(r: &'a Row, key: &str) -> &'a Value {
        &r.metrics.iter().find(|m| m.key == key).unwrap().value
    }

    #[test]
    fn cluster_row_has_per_node_cpu_redis_cost_and_the_ratio() {
        let single = data(Config::Single, 1, 10.0);
        let cluster = data(Config::Cluster, 3, 11.0);
        let s = row("1 node", &single, Some(10.0));
        let c = row("3 nodes", &cluster, Some(10.0));
        // Same metrics in the same order: the table lines them up by position.
        let keys = |r: &Row| r.metrics.iter().map(|m| m.key).collect::<Vec<_>>();
        assert_eq!(keys(&s), keys(&c));
        assert_eq!(metric(&c, "p99_vs_single"), &json!(1.1));
        assert!(metric(&s, "p99_vs_single").is_null());
        // (0.5 + 2.0) s over 1,000,000 deliveries.
        assert_eq!(metric(&c, "node_us_per_delivery"), &json!([2.5, 2.5, 2.5]));
        assert_eq!(metric(&c, "us_per_delivery"), &json!(2.5));
        // 0.06 s over 300 publications.
        assert_eq!(metric(&c, "redis_us_per_publication"), &json!(200.0));
        assert!(metric(&s, "redis_us_per_publication").is_null());
        // 12,000 µs of scripts over 300 publications (the ping is not a script).
        assert_eq!(metric(&c, "redis_script_us_per_publication"), &json!(40.0));
        assert_eq!(
            metric(&c, "redis_commands"),
            &json!("evalsha 300 × 40.0 µs, ping 100 × 0.5 µs")
        );
        assert_eq!(metric(&s, "bus"), &json!("local"));
        assert_eq!(metric(&c, "nodes_exited"), &json!("none"));
    }

    #[test]
    fn labels_name_the_configuration_and_transport() {
        let c = data(Config::Cluster, 3, 1.0);
        assert_eq!(label(&c, Transport::Ws), "3 nodes, Redis");
        assert_eq!(label(&c, Transport::Sse), "3 nodes, Redis (sse)");
        assert_eq!(
            label(&data(Config::Single, 1, 1.0), Transport::Ws),
            "1 node, local bus"
        );
    }
}
