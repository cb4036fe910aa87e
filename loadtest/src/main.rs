//! `tidings-loadtest`: measures a tidings gateway (or the floor and naive comparison
//! servers) with the same client, one scenario per subcommand. See loadtest/README.md.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use tidings_loadtest::Result;
use tidings_loadtest::cluster::{self, ClusterPlan, Config};
use tidings_loadtest::conn::Transport;
use tidings_loadtest::flood::{self, FloodPlan};
use tidings_loadtest::many::{self, ManyPlan};
use tidings_loadtest::peer::Peer;
use tidings_loadtest::report::{self, Row};
use tidings_loadtest::run::{self, ClientOpts, Plan, Publishing};
use tidings_loadtest::scenarios::{self, Scenario};
use tidings_loadtest::stall::{self, StallPlan};
use tidings_loadtest::target::Target;

/// Load-test harness for tidings: idle memory, fan-out latency, churn, slow consumers,
/// publish floods, stalled requests.
#[derive(Parser, Debug)]
#[command(name = "tidings-loadtest", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// N subscribed, quiet connections: server RSS growth per connection, connect rate.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Connections to open.
        #[arg(long, short = 'n', default_value_t = 1000)]
        connections: usize,
    },
    /// N subscribers over T topics, R publications/s of P bytes for D seconds: latency,
    /// loss, duplicates, server CPU per delivery.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: Load,
    },
    /// Connections opening and closing at a rate while publishing: failures, and
    /// whether server memory returns to its baseline.
    Churn {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: Load,
        /// New connections per second (each subscribes, stays, then leaves).
        #[arg(long, default_value_t = 500.0)]
        churn_rate: f64,
        /// How long each churn connection stays (ms).
        #[arg(long, default_value_t = 1000)]
        hold_ms: u64,
        /// RSS may exceed the baseline by this many percent (plus 1 MiB) and still count
        /// as returned.
        #[arg(long, default_value_t = 10.0)]
        tolerance_pct: f64,
    },
    /// A fraction of subscribers stop reading: the others' latency, server memory
    /// boundedness, and how many slow ones the server closed. Defaults send 800 KB/s per
    /// subscriber, enough to fill kernel buffers and a 1 MiB server queue within seconds.
    #[command(
        mut_arg("rate", |a| a.default_value("50")),
        mut_arg("payload", |a| a.default_value("16384"))
    )]
    Slow {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: Load,
        /// Fraction of subscribers that stop reading once subscribed.
        #[arg(long, default_value_t = 0.1)]
        slow_fraction: f64,
        /// SO_RCVBUF of slow subscribers in bytes (small, so the server's own queue
        /// fills instead of kernel buffers; 0 = kernel default).
        #[arg(long, default_value_t = 4096)]
        slow_rcvbuf: usize,
    },
    /// Flood publishers as fast as they can on one topic (a fraction of its subscribers
    /// not reading) beside a 5/s control topic: refusals (503), control latency, exact
    /// delivery to reading subscribers (or an explicit 1013), the server's peak memory.
    /// Exits non-zero if a reading subscriber got neither.
    Flood {
        #[command(flatten)]
        common: Common,
        /// Subscribers of the flood topic.
        #[arg(long, short = 'n', default_value_t = 2000)]
        subscribers: usize,
        /// Fraction of flood subscribers that never read.
        #[arg(long, default_value_t = 0.5)]
        slow_fraction: f64,
        /// SO_RCVBUF of the subscribers that never read, in bytes (0 = kernel default).
        #[arg(long, default_value_t = 4096)]
        slow_rcvbuf: usize,
        /// Flood publisher connections (keep-alive HTTP/1.1, one request in flight each).
        #[arg(long, default_value_t = 4)]
        publishers: usize,
        /// Payload size in bytes (flood and control).
        #[arg(long, default_value_t = 8192)]
        payload: usize,
        /// Seconds of flooding.
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
        /// Publications per second on the control topic.
        #[arg(long, default_value_t = 5.0)]
        control_rate: f64,
        /// Memory ceiling in MiB: report whether the server's peak RSS stayed under it.
        #[arg(long)]
        ceiling_mib: Option<f64>,
    },
    /// Stalled request heads and bodies from one address, kept open (re-opened when the
    /// server ends them), while a client from another address times sequential attempts
    /// to connect, upgrade and subscribe.
    Stall {
        #[command(flatten)]
        common: Common,
        /// Source address of the stalled connections (loopback).
        #[arg(long, default_value = "127.0.0.2")]
        attack_addr: Ipv4Addr,
        /// Source address of the client attempts (loopback).
        #[arg(long, default_value = "127.0.0.1")]
        client_addr: Ipv4Addr,
        /// Connections that send an incomplete request head, then nothing.
        #[arg(long, default_value_t = 5000)]
        stalled_heads: usize,
        /// Connections that send a POST head (Content-Length 100000) and a few body
        /// bytes, then nothing.
        #[arg(long, default_value_t = 1000)]
        stalled_bodies: usize,
        /// Wait before re-opening a stalled connection the server ended (ms).
        #[arg(long, default_value_t = 1000)]
        reopen_ms: u64,
        /// Sequential client attempts (connect + upgrade + subscribe).
        #[arg(long, default_value_t = 100)]
        tries: usize,
        /// Deadline of one attempt (ms); past it the attempt fails as `timeout`.
        #[arg(long, default_value_t = 5000)]
        try_timeout_ms: u64,
        /// Pace the attempts to start over at least this many seconds (the default spans
        /// two of the gateway's 10 s request deadlines, so the attack's re-opens are
        /// sampled too; 0 = back to back).
        #[arg(long, default_value_t = 25.0)]
        spread_secs: f64,
        /// Longest all attempts may take (s); the rest are not made.
        #[arg(long, default_value_t = 120)]
        max_secs: u64,
    },
    /// Several nodes on one Redis against one node alone, in the same run: the harness
    /// starts its own redis-server and `--nodes` nodes of the one `--spawn` binary with
    /// `TIDINGS_BUS_KIND=redis`, subscribes `-n` subscribers on each node and publishes
    /// through the first node; one node on the local bus is measured the same way, before
    /// or after (`--configs`).
    /// Latency over all subscribers and per node, loss, duplicates, CPU per delivery per
    /// node, Redis CPU per publication, RSS.
    #[command(
        mut_arg("subscribers", |a| a
            .default_value("15000")
            .help("Subscribers on each node (the single node too, unless --single-subscribers)")),
        mut_arg("drain_ms", |a| a.default_value("30000"))
    )]
    Cluster {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: Load,
        /// Nodes of the cluster configuration.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Subscribers of the single node [default: -n].
        #[arg(long)]
        single_subscribers: Option<usize>,
        /// Configurations to measure, in this order: `single` (one node, local bus, no
        /// Redis) and `cluster` (`--nodes` nodes on one Redis).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "single,cluster"
        )]
        configs: Vec<Config>,
        /// The redis-server binary (started on a free loopback port, in a temporary
        /// directory, without persistence).
        #[arg(long, default_value = "redis-server")]
        redis_server: PathBuf,
    },
    /// Many topics with a few subscribers each (`--topics` × `--per-topic`),
    /// publications round-robin over the topics at each rate of `--rates` in turn
    /// (`--step-secs` each, from `--publishers` keep-alive connections) until a step's p99
    /// passes `--p99-limit-ms` or anything is lost: the highest rate held, deliveries/s,
    /// p50/p99 per step and server CPU per delivery.
    #[command(mut_arg("processes", |a| a.default_value("2")))]
    Many {
        #[command(flatten)]
        common: Common,
        /// Topics. The default keeps the server's connections (topics × per-topic, plus
        /// publishers) under this box's 20,000 open files per process.
        #[arg(long, default_value_t = 9000)]
        topics: usize,
        /// Subscribers per topic.
        #[arg(long, default_value_t = 2)]
        per_topic: usize,
        /// Publication rates per second, one step each, in order.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "1000,2000,3000,5000,7000,10000,14000,20000,28000,40000,56000,80000"
        )]
        rates: Vec<f64>,
        /// Seconds each step publishes.
        #[arg(long, default_value_t = 10.0)]
        step_secs: f64,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 256)]
        payload: usize,
        /// Publisher connections (one thread and one request in flight each).
        #[arg(long, default_value_t = 8)]
        publishers: usize,
        /// A step whose p99 passes this many ms ends the run.
        #[arg(long, default_value_t = 50.0)]
        p99_limit_ms: f64,
        /// Publications per request through tidings' batch `POST /v1/publish` (`--spawn`
        /// only; 0: one POST per publication, as for every server).
        #[arg(long, default_value_t = 0)]
        batch: usize,
    },
    /// Internal: one client worker process (spec and commands on stdin).
    #[command(hide = true)]
    Worker,
}

/// Where the server is and how the client behaves.
#[derive(Args, Debug)]
struct Common {
    /// Spawn this server binary with `serve --listen 127.0.0.1:0` (repeat to measure
    /// several servers in one run, one table column each).
    #[arg(long, value_name = "PATH")]
    spawn: Vec<PathBuf>,
    /// A server described by a peer file (loadtest/peers/*.toml): started (or attached
    /// to) and driven as it says; repeatable, measured after the `--spawn` ones, one
    /// column each. WebSocket only.
    #[arg(long, value_name = "FILE")]
    peer: Vec<PathBuf>,
    /// Restrict spawned servers and peers to these CPUs (`0`, `0,1`), e.g. the server on
    /// core 0 while the harness runs under `taskset -c 1`.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    server_cpus: Vec<usize>,
    /// Extra argument for spawned servers (repeatable).
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// A running server, `http://host:port` (loopback only).
    #[arg(long, conflicts_with = "spawn")]
    url: Option<String>,
    /// The running server's pid, for memory and CPU figures.
    #[arg(long, requires = "url")]
    pid: Option<u32>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// WebSocket upgrade path.
    #[arg(long, default_value = "/ws")]
    path: String,
    /// How subscribers connect: `ws` (upgrade at `--path`, then `subscribe`) or `sse`
    /// (`GET /v1/topics/{topic}/sse`, one fresh connection per stream). Several
    /// (`--transport ws,sse`) measure each spawned server once per transport, a fresh
    /// process each time, one after another in the same run; SSE columns are labelled
    /// `SERVER (sse)`.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ws")]
    transport: Vec<Transport>,
    /// Topic prefix: topics are PREFIX:0 .. PREFIX:T-1.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Spread client sockets over source addresses 127.0.0.1 ..= 127.0.0.K.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=254))]
    source_addrs: u8,
    /// Most connections per client process (each stays under 20,000 open files).
    #[arg(long, default_value_t = 18_000)]
    per_process: usize,
    /// Least number of client processes.
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Connection attempts in flight per client process.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Connect + upgrade + subscribe timeout (ms).
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Settle time before memory samples (ms).
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    /// How long subscribers may take to receive the last publications (ms).
    #[arg(long, default_value_t = 5000)]
    drain_ms: u64,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// WebSocket subscribers offer permessage-deflate (RFC 7692), as browsers do, and
    /// inflate what arrives compressed.
    #[arg(long)]
    deflate: bool,
    /// Connections to open and close before the baseline memory sample (one-time costs
    /// of first use are then not counted per connection).
    #[arg(long, default_value_t = 0)]
    warmup: usize,
}

/// Subscribers and publishing.
#[derive(Args, Debug)]
struct Load {
    /// Subscribers (connections opened before publishing).
    #[arg(long, short = 'n', default_value_t = 1000)]
    subscribers: usize,
    /// Topics the subscribers spread over (subscriber i takes topic i % T).
    #[arg(long, default_value_t = 1)]
    topics: usize,
    /// Publications per second, over all topics (round-robin).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Payload size in bytes (a JSON object carrying the send time, padded).
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Publish a realistic JSON configuration document of about 5 KB (with the send time)
    /// instead of `--payload` bytes of padding, which compress unrealistically well.
    #[arg(long)]
    config_doc: bool,
}

impl Load {
    fn plan(&self) -> Plan {
        Plan {
            conns: self.subscribers,
            topics: self.topics.max(1),
            slow_fraction: 0.0,
            slow_rcvbuf: 0,
            churn_rate: 0.0,
            churn_hold: Duration::ZERO,
            publish: Some(Publishing {
                rate: self.rate,
                payload: self.payload,
                config_doc: self.config_doc,
                duration: Duration::from_secs_f64(self.duration.max(0.0)),
            }),
            track_offsets: false,
        }
    }

    fn params(&self) -> serde_json::Value {
        json!({
            "subscribers": self.subscribers, "topics": self.topics, "rate": self.rate,
            "payload": if self.config_doc { json!("config_doc") } else { json!(self.payload) },
            "duration_s": self.duration,
        })
    }
}

fn main() {
    tidings_loadtest::raise_nofile_limit();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Worker => tidings_loadtest::worker::run(),
        cmd => measure(cmd),
    };
    if let Err(e) = res {
        eprintln!("tidings-loadtest: {e}");
        std::process::exit(1);
    }
}

/// The client options of `common`.
fn client_opts(common: &Common) -> ClientOpts {
    ClientOpts {
        path: common.path.clone(),
        prefix: common.prefix.clone(),
        source_addrs: common.source_addrs,
        per_process: common.per_process,
        processes: common.processes,
        concurrency: common.concurrency,
        timeout: Duration::from_millis(common.timeout_ms),
        settle: Duration::from_millis(common.settle_ms),
        drain: Duration::from_millis(common.drain_ms),
        progress: !common.quiet && !common.json,
        warmup: common.warmup,
        transport: Transport::Ws,
        deflate: common.deflate,
    }
}

/// The table label of `target` measured over `transport`: the server's own label for
/// WebSocket (so WebSocket-only results read as before), `SERVER (sse)` for SSE.
fn labelled(target: &mut Target, transport: Transport) {
    if transport != Transport::Ws {
        target.label = format!("{} ({})", target.label, transport.name());
    }
}

/// Runs `one` against every target of `common` (the attached one, then each spawned
/// one in turn), once per transport of `common` (a freshly spawned server each time),
/// and prints the rows.
fn each_target(
    common: &Common,
    name: &str,
    params: serde_json::Value,
    mut one: impl FnMut(&mut Target, Transport) -> Result<Row>,
) -> Result<()> {
    let mut rows: Vec<Row> = Vec::new();
    if let Some(url) = &common.url {
        for &transport in &common.transport {
            let mut target = Target::attach(url, common.pid)?;
            labelled(&mut target, transport);
            rows.push(one(&mut target, transport)?);
        }
    } else if common.spawn.is_empty() && common.peer.is_empty() {
        return Err(
            "give --spawn PATH or --peer FILE (repeatable) or --url http://host:port".into(),
        );
    }
    for path in &common.spawn {
        for &transport in &common.transport {
            let mut target = Target::spawn_pinned(path, &common.server_args, &common.server_cpus)?;
            labelled(&mut target, transport);
            if !common.quiet && !common.json {
                eprintln!("{name}: {} on {}", target.label, target.addr);
            }
            rows.push(one(&mut target, transport)?);
            // Dropping the target stops the server before the next one starts.
        }
    }
    let peers = common
        .peer
        .iter()
        .map(|p| Peer::load(p))
        .collect::<Result<Vec<_>>>()?;
    if !peers.is_empty() && common.transport != [Transport::Ws] {
        return Err("peers are WebSocket servers: drop --transport with --peer".into());
    }
    for peer in &peers {
        let mut target = Target::start_peer(peer, &common.server_cpus)?;
        if !common.quiet && !common.json {
            eprintln!("{name}: {} on {}", target.label, target.addr);
        }
        rows.push(one(&mut target, Transport::Ws)?);
    }
    if common.json {
        let doc = report::to_json(name, params, &rows);
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let title = format!("{name} {params}");
        print!("{}", report::to_table(&title, &rows));
    }
    Ok(())
}

fn measure(cmd: Cmd) -> Result<()> {
    let (scenario, common, plan, params, tolerance) = match cmd {
        Cmd::Flood {
            common,
            subscribers,
            slow_fraction,
            slow_rcvbuf,
            publishers,
            payload,
            duration,
            control_rate,
            ceiling_mib,
        } => {
            let plan = FloodPlan {
                subscribers,
                slow_fraction,
                slow_rcvbuf,
                publishers,
                payload,
                duration: Duration::from_secs_f64(duration.max(0.0)),
                control_rate,
                ceiling_mib,
            };
            let params = json!({
                "subscribers": subscribers, "slow_fraction": slow_fraction,
                "slow_rcvbuf": slow_rcvbuf, "publishers": publishers, "payload": payload,
                "duration_s": duration, "control_rate": control_rate,
                "ceiling_mib": ceiling_mib,
            });
            if !common.peer.is_empty() {
                return Err("flood checks tidings' own offsets and 503s: drop --peer".into());
            }
            return measure_flood(&common, &plan, params);
        }
        Cmd::Cluster {
            common,
            load,
            nodes,
            single_subscribers,
            configs,
            redis_server,
        } => {
            let [server] = common.spawn.as_slice() else {
                return Err("cluster spawns its nodes: give exactly one --spawn PATH".into());
            };
            if common.warmup > 0 {
                return Err("cluster has no warm-up: drop --warmup".into());
            }
            if !common.peer.is_empty() {
                return Err("cluster spawns tidings nodes: drop --peer".into());
            }
            let plan = ClusterPlan {
                server: server.clone(),
                server_args: common.server_args.clone(),
                redis_server,
                nodes,
                per_node: load.subscribers,
                single: single_subscribers.unwrap_or(load.subscribers),
                topics: load.topics.max(1),
                publish: Publishing {
                    rate: load.rate,
                    payload: load.payload,
                    duration: Duration::from_secs_f64(load.duration.max(0.0)),
                    config_doc: false,
                },
            };
            return measure_cluster(&common, &plan, &configs);
        }
        Cmd::Stall {
            common,
            attack_addr,
            client_addr,
            stalled_heads,
            stalled_bodies,
            reopen_ms,
            tries,
            try_timeout_ms,
            spread_secs,
            max_secs,
        } => {
            let plan = StallPlan {
                attack_addr,
                client_addr,
                stalled_heads,
                stalled_bodies,
                reopen: Duration::from_millis(reopen_ms),
                tries,
                try_timeout: Duration::from_millis(try_timeout_ms),
                spread: Duration::from_secs_f64(spread_secs.max(0.0)),
                max_time: Duration::from_secs(max_secs),
            };
            let params = json!({
                "attack_addr": attack_addr.to_string(), "client_addr": client_addr.to_string(),
                "stalled_heads": stalled_heads, "stalled_bodies": stalled_bodies,
                "body_length": stall::BODY_LENGTH, "reopen_ms": reopen_ms, "tries": tries,
                "try_timeout_ms": try_timeout_ms, "spread_s": spread_secs,
            });
            if common.transport != [Transport::Ws] {
                return Err("stall measures WebSocket upgrades only: drop --transport".into());
            }
            if !common.peer.is_empty() {
                return Err("stall subscribes with tidings' own protocol: drop --peer".into());
            }
            let opts = client_opts(&common);
            return each_target(&common, "stall", params, |target, _| {
                let data = stall::run(target, &plan, &opts)?;
                Ok(stall::row(&target.label, &plan, &data))
            });
        }
        Cmd::Many {
            common,
            topics,
            per_topic,
            rates,
            step_secs,
            payload,
            publishers,
            p99_limit_ms,
            batch,
        } => {
            let plan = ManyPlan {
                topics,
                per_topic,
                rates,
                step: Duration::from_secs_f64(step_secs.max(0.0)),
                payload,
                publishers,
                p99_limit_ms,
                batch,
            };
            if common.transport != [Transport::Ws] {
                return Err("many measures WebSocket subscribers only: drop --transport".into());
            }
            let opts = client_opts(&common);
            return each_target(&common, "many", plan.params(), |target, _| {
                let data = many::run(target, &plan, &opts)?;
                Ok(many::row(&target.label, &plan, &data))
            });
        }
        Cmd::Idle {
            common,
            connections,
        } => {
            let plan = Plan {
                conns: connections,
                topics: 1,
                slow_fraction: 0.0,
                slow_rcvbuf: 0,
                churn_rate: 0.0,
                churn_hold: Duration::ZERO,
                publish: None,
                track_offsets: false,
            };
            let params = json!({ "connections": connections });
            (Scenario::Idle, common, plan, params, 0.0)
        }
        Cmd::Fanout { common, load } => (Scenario::Fanout, common, load.plan(), load.params(), 0.0),
        Cmd::Churn {
            common,
            load,
            churn_rate,
            hold_ms,
            tolerance_pct,
        } => {
            let mut plan = load.plan();
            plan.churn_rate = churn_rate;
            plan.churn_hold = Duration::from_millis(hold_ms);
            let mut params = load.params();
            params["churn_rate"] = json!(churn_rate);
            params["hold_ms"] = json!(hold_ms);
            (Scenario::Churn, common, plan, params, tolerance_pct)
        }
        Cmd::Slow {
            common,
            load,
            slow_fraction,
            slow_rcvbuf,
        } => {
            let mut plan = load.plan();
            plan.slow_fraction = slow_fraction.clamp(0.0, 1.0);
            plan.slow_rcvbuf = slow_rcvbuf;
            let mut params = load.params();
            params["slow_fraction"] = json!(slow_fraction);
            params["slow_rcvbuf"] = json!(slow_rcvbuf);
            (Scenario::Slow, common, plan, params, 0.0)
        }
        Cmd::Worker => return Err("worker is not a scenario".into()),
    };
    let opts = client_opts(&common);
    each_target(&common, scenario.name(), params, |target, transport| {
        let opts = ClientOpts {
            transport,
            ..opts.clone()
        };
        let data = run::run(target, &plan, &opts)?;
        let mut row = scenarios::row(scenario, &target.label, &plan, &data, tolerance);
        row.add("transport", "transport", transport.name());
        Ok(row)
    })
}

/// `flood` against every target; fails (after printing) if any reading subscriber got
/// neither every accepted publication nor a valid 1013.
fn measure_flood(common: &Common, plan: &FloodPlan, params: serde_json::Value) -> Result<()> {
    let opts = client_opts(common);
    let mut violations = Vec::new();
    each_target(common, "flood", params, |target, transport| {
        let opts = ClientOpts {
            transport,
            ..opts.clone()
        };
        let data = flood::run(target, plan, &opts)?;
        if data.violations() > 0 {
            violations.push(format!("{}: {}", target.label, data.violations()));
            for e in &data.agg.flood.examples {
                eprintln!("flood: {}: VIOLATION: {e}", target.label);
            }
        }
        Ok(flood::row(&target.label, plan, &data))
    })?;
    if violations.is_empty() {
        return Ok(());
    }
    Err(format!(
        "DELIVERY VIOLATED: reading subscribers with neither every accepted publication \
         nor a 1013 after a gapless prefix: {}",
        violations.join(", ")
    )
    .into())
}

/// `cluster`: every configuration once per transport, then one row each, the cluster's
/// p99 compared with the single node's of the same transport.
fn measure_cluster(common: &Common, plan: &ClusterPlan, configs: &[Config]) -> Result<()> {
    if configs.is_empty() {
        return Err("--configs needs at least one of single, cluster".into());
    }
    let opts = client_opts(common);
    let mut measured = Vec::new();
    for &transport in &common.transport {
        let opts = ClientOpts {
            transport,
            ..opts.clone()
        };
        for &config in configs {
            measured.push((transport, cluster::measure(plan, config, &opts)?));
        }
    }
    let rows: Vec<Row> = measured
        .iter()
        .map(|(transport, d)| {
            let single_p99 = measured
                .iter()
                .find(|(t, s)| t == transport && s.config == Config::Single)
                .map(|(_, s)| s.agg.latency.p99_ms);
            let mut row = cluster::row(&cluster::label(d, *transport), d, single_p99);
            row.add("transport", "transport", transport.name());
            row
        })
        .collect();
    let params = cluster::params(plan, configs);
    if common.json {
        let doc = report::to_json("cluster", params, &rows);
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", report::to_table(&format!("cluster {params}"), &rows));
    }
    Ok(())
}
