//! A client worker process: opens its share of the connections on a single-threaded
//! tokio runtime (the gateway needs the other core), measures what it receives, and talks
//! to the coordinator in JSON lines — commands on stdin, progress and the result on stdout.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::Result;
use crate::conn::{self, Conn, End, Fail, FrameCounts, Reply, SseConn, Transport, WsConn};
use crate::histo;
use crate::offsets::{Ending, OffsetLog, Ranges, Tally};
use crate::target::ProcSample;
use crate::wire::{self, ServerText};

mod churn;
mod proto;

pub use proto::{Command, Progress, Report, WorkerResult, WorkerSpec};

/// How often a worker reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Longest drain of a worker that tracks offsets: its drain deadline moves on while
/// deliveries still arrive (a flood can leave a backlog of many seconds), up to this.
pub const TRACKED_DRAIN_CAP: Duration = Duration::from_secs(60);

/// The close code of a slow consumer (RFC 6455 §7.4.1 "Try Again Later").
const SLOW_CONSUMER: u16 = 1013;

/// How often the drain phase checks whether every subscriber has everything.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// The life of one of the initial connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    Connecting,
    Subscribed,
    Failed,
    Ended,
}

#[derive(Debug, Clone, Copy)]
struct ConnRecord {
    topic: usize,
    slow: bool,
    state: ConnState,
    unique: u64,
    max_seen: u64,
}

/// When the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Running,
    Drain,
}

/// State shared by every task of the worker (one thread, so `Cell`/`RefCell`).
struct Shared {
    spec: WorkerSpec,
    host: String,
    start: Instant,
    scratch: RefCell<Vec<u8>>,
    hist: RefCell<Histogram<u64>>,
    conns: RefCell<Vec<ConnRecord>>,
    progress: Cell<Progress>,
    last_connect_ms: Cell<u64>,
    deliveries: Cell<u64>,
    duplicates: Cell<u64>,
    counts: Cell<FrameCounts>,
    fail_reasons: RefCell<BTreeMap<String, u64>>,
    regular_closed: RefCell<BTreeMap<String, u64>>,
    slow_outcomes: RefCell<BTreeMap<String, u64>>,
    phase: watch::Sender<Phase>,
    churn_on: Cell<bool>,
    /// With `track_offsets`: what each initial connection received (empty otherwise).
    logs: RefCell<Vec<OffsetLog>>,
    /// With `track_offsets`: how each initial connection ended, once it did.
    endings: RefCell<Vec<Option<Ending>>>,
}

impl Shared {
    fn bump(&self, f: impl FnOnce(&mut Progress)) {
        let mut p = self.progress.get();
        f(&mut p);
        self.progress.set(p);
    }

    fn count(map: &RefCell<BTreeMap<String, u64>>, key: String) {
        *map.borrow_mut().entry(key).or_default() += 1;
    }

    fn snapshot(&self) -> Progress {
        let mut p = self.progress.get();
        p.elapsed_ms = ms(self.start.elapsed());
        p
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs a worker: reads its spec from stdin, works, prints its result, returns.
pub fn run() -> Result<()> {
    let stdin = std::io::stdin();
    let mut first = String::new();
    stdin.lock().read_line(&mut first)?;
    let spec: WorkerSpec = serde_json::from_str(&first)?;
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Command>(&line) {
                Ok(cmd) => {
                    if tx.send(cmd).is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("worker: bad command {line:?}: {e}"),
            }
        }
        // The coordinator is gone: nobody will read our result.
        std::process::exit(2);
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&rt, work(spec, rx))?;
    emit(&Report::Result(Box::new(result)))?;
    // Exiting closes every socket at once; dropping 10k tasks one by one buys nothing.
    std::process::exit(0)
}

fn emit(report: &Report) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, report)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

async fn work(spec: WorkerSpec, mut rx: mpsc::UnboundedReceiver<Command>) -> Result<WorkerResult> {
    let (phase, _) = watch::channel(Phase::Running);
    let records = (0..spec.count)
        .map(|i| ConnRecord {
            topic: (spec.first + i) % spec.topics.max(1),
            slow: spec.is_slow(spec.first + i),
            state: ConnState::Connecting,
            unique: 0,
            max_seen: 0,
        })
        .collect();
    let tracked = if spec.track_offsets { spec.count } else { 0 };
    let shared = Rc::new(Shared {
        host: spec.addr.to_string(),
        spec,
        start: Instant::now(),
        scratch: RefCell::new(Vec::new()),
        hist: RefCell::new(histo::new()),
        conns: RefCell::new(records),
        progress: Cell::new(Progress::default()),
        last_connect_ms: Cell::new(0),
        deliveries: Cell::new(0),
        duplicates: Cell::new(0),
        counts: Cell::new(FrameCounts::default()),
        fail_reasons: RefCell::default(),
        regular_closed: RefCell::default(),
        slow_outcomes: RefCell::default(),
        phase,
        churn_on: Cell::new(false),
        logs: RefCell::new(vec![OffsetLog::default(); tracked]),
        endings: RefCell::new(vec![None; tracked]),
    });
    let permits = Rc::new(Semaphore::new(shared.spec.concurrency.max(1)));
    for i in 0..shared.spec.count {
        tokio::task::spawn_local(initial_conn(shared.clone(), permits.clone(), i));
    }
    let mut ticker = tokio::time::interval(PROGRESS_EVERY);
    let mut ready_sent = false;
    let (published, drain_ms, accepted) = loop {
        tokio::select! {
            _ = ticker.tick() => {
                let p = shared.snapshot();
                let done = p.subscribed + p.failed >= shared.spec.count as u64;
                if done && !ready_sent {
                    ready_sent = true;
                    emit(&Report::Ready(p))?;
                } else {
                    emit(&Report::Progress(p))?;
                }
            }
            cmd = rx.recv() => match cmd {
                Some(Command::ChurnStart) => {
                    shared.churn_on.set(true);
                    tokio::task::spawn_local(churn::churn_driver(shared.clone()));
                }
                Some(Command::ChurnStop) => shared.churn_on.set(false),
                Some(Command::Stop { published, drain_ms, accepted }) => {
                    break (published, drain_ms, accepted)
                }
                Some(Command::Checkpoint { published, drain_ms }) => {
                    checkpoint(&shared, &published, Duration::from_millis(drain_ms)).await?;
                }
                None => return Err("command channel closed".into()),
            }
        }
    };
    shared.churn_on.set(false);
    shared.phase.send_replace(Phase::Drain);
    let drain = Duration::from_millis(drain_ms);
    let tracked = shared.spec.track_offsets;
    let cap = Instant::now()
        + if tracked {
            drain.max(TRACKED_DRAIN_CAP)
        } else {
            drain
        };
    let mut deadline = Instant::now() + drain;
    let mut seen = shared.deliveries.get();
    while Instant::now() < deadline.min(cap) && !drained(&shared, &published) {
        tokio::time::sleep(DRAIN_POLL).await;
        if tracked && shared.deliveries.get() != seen {
            // Still receiving a backlog: the drain is measured from the last progress.
            seen = shared.deliveries.get();
            deadline = Instant::now() + drain;
        }
    }
    Ok(finish(&shared, &published, &accepted))
}

/// Waits up to `drain` for every subscriber to have `published`, reports what arrived
/// since the last checkpoint, and starts the next step's latency and counts afresh.
async fn checkpoint(shared: &Shared, published: &[u64], drain: Duration) -> Result<()> {
    let deadline = Instant::now() + drain;
    while Instant::now() < deadline && !drained(shared, published) {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let result = finish(shared, published, &Ranges::default());
    emit(&Report::Checkpoint(Box::new(result)))?;
    shared.hist.borrow_mut().reset();
    shared.deliveries.set(0);
    shared.duplicates.set(0);
    Ok(())
}

/// Whether every live regular subscriber has all its topic's publications and every
/// slow subscriber has resolved.
fn drained(shared: &Shared, published: &[u64]) -> bool {
    shared.conns.borrow().iter().all(|r| match r.state {
        ConnState::Subscribed if r.slow => false,
        ConnState::Subscribed => r.unique >= published.get(r.topic).copied().unwrap_or(0),
        ConnState::Connecting => false,
        ConnState::Failed | ConnState::Ended => true,
    })
}

fn finish(shared: &Shared, published: &[u64], accepted: &Ranges) -> WorkerResult {
    let mut expected = 0;
    let mut lost = 0;
    let mut slow_total = 0;
    for r in shared.conns.borrow().iter() {
        if r.slow {
            slow_total += 1;
            if r.state == ConnState::Subscribed {
                Shared::count(&shared.slow_outcomes, "still open".into());
            }
            continue;
        }
        if matches!(r.state, ConnState::Subscribed | ConnState::Ended) {
            let want = published.get(r.topic).copied().unwrap_or(0);
            expected += want;
            lost += want.saturating_sub(r.unique);
        }
    }
    let cpu = ProcSample::current().unwrap_or_default();
    WorkerResult {
        progress: shared.snapshot(),
        connect_ms: shared.last_connect_ms.get(),
        fail_reasons: shared.fail_reasons.borrow().clone(),
        deliveries: shared.deliveries.get(),
        duplicates: shared.duplicates.get(),
        expected,
        lost,
        fragmented: shared.counts.get().fragmented,
        text_bytes: shared.counts.get().text_bytes,
        histogram: histo::encode(&shared.hist.borrow()),
        regular_closed: shared.regular_closed.borrow().clone(),
        slow_total,
        slow_outcomes: shared.slow_outcomes.borrow().clone(),
        client_cpu_s: (cpu.user_s, cpu.sys_s),
        flood: judge_all(shared, accepted),
    }
}

/// With `track_offsets`: the verdict on every regular subscriber that subscribed.
fn judge_all(shared: &Shared, accepted: &Ranges) -> Tally {
    let mut tally = Tally::default();
    let logs = shared.logs.borrow();
    let endings = shared.endings.borrow();
    let conns = shared.conns.borrow();
    for ((r, log), ending) in conns.iter().zip(logs.iter()).zip(endings.iter()) {
        if r.slow || !matches!(r.state, ConnState::Subscribed | ConnState::Ended) {
            continue;
        }
        let still_open = Ending::Other("still open".into());
        let ending = ending.as_ref().unwrap_or(&still_open);
        let topic = format!("{}:{}", shared.spec.prefix, r.topic);
        let verdict = crate::offsets::judge(log, ending, &topic, accepted);
        tally.add(verdict, log, accepted);
    }
    tally
}

/// Connect and subscribe to `topic`: a WebSocket upgrades, subscribes and waits for
/// `subscribed`; an SSE stream requests the topic's stream and waits for its `retry:`.
async fn open_subscribed(
    shared: &Shared,
    global: usize,
    topic: &str,
    rcvbuf: usize,
) -> std::result::Result<Conn, Fail> {
    let spec = &shared.spec;
    let stream = conn::connect(spec.addr, global, spec.source_addrs, rcvbuf).await?;
    if let Some(peer) = &spec.peer {
        // Peers are WebSocket servers; the coordinator refuses other transports for them.
        let path = peer.subscribe.path(topic);
        let mut ws = WsConn::upgrade(stream, &shared.host, &path, global as u64).await?;
        conn::subscribe_peer(&mut ws, &shared.scratch, &peer.subscribe, topic).await?;
        return Ok(Conn::Ws(ws));
    }
    match spec.transport {
        Transport::Ws => {
            let mut ws = WsConn::upgrade_with(
                stream,
                &shared.host,
                &spec.path,
                global as u64,
                spec.deflate,
            )
            .await?;
            conn::subscribe(&mut ws, &shared.scratch, topic).await?;
            Ok(Conn::Ws(ws))
        }
        Transport::Sse => Ok(Conn::Sse(SseConn::open(stream, &shared.host, topic).await?)),
    }
}

async fn initial_conn(shared: Rc<Shared>, permits: Rc<Semaphore>, i: usize) {
    let global = shared.spec.first + i;
    let (slow, topic) = {
        let r = shared.conns.borrow()[i];
        (r.slow, r.topic)
    };
    let rcvbuf = if slow { shared.spec.slow_rcvbuf } else { 0 };
    let topic = format!("{}:{topic}", shared.spec.prefix);
    let timeout = Duration::from_millis(shared.spec.timeout_ms);
    let opened = {
        let Ok(_permit) = permits.acquire().await else {
            return;
        };
        tokio::time::timeout(timeout, open_subscribed(&shared, global, &topic, rcvbuf)).await
    };
    let mut ws = match opened {
        Ok(Ok(ws)) => ws,
        Ok(Err(fail)) => return failed(&shared, i, fail),
        Err(_) => return failed(&shared, i, Fail::Timeout),
    };
    shared.conns.borrow_mut()[i].state = ConnState::Subscribed;
    shared.bump(|p| p.subscribed += 1);
    shared.last_connect_ms.set(ms(shared.start.elapsed()));
    let ended = if slow {
        slow_conn(&shared, &mut ws).await
    } else {
        regular_conn(&shared, &mut ws, i).await
    };
    let outcome = match &ended {
        Ok(end) => end.label(),
        Err(fail) => fail.label(),
    };
    if let Some(slot) = shared.endings.borrow_mut().get_mut(i) {
        *slot = Some(match ended {
            Ok(End::Close(Some(SLOW_CONSUMER))) => Ending::Slow(ws.close_reason().to_vec()),
            _ => Ending::Other(outcome.clone()),
        });
    }
    shared.conns.borrow_mut()[i].state = ConnState::Ended;
    let map = if slow {
        &shared.slow_outcomes
    } else {
        shared.bump(|p| p.closed += 1);
        &shared.regular_closed
    };
    Shared::count(map, outcome);
}

fn failed(shared: &Shared, i: usize, fail: Fail) {
    shared.conns.borrow_mut()[i].state = ConnState::Failed;
    shared.bump(|p| p.failed += 1);
    Shared::count(&shared.fail_reasons, fail.label());
}

/// Reads and measures until the server ends the connection; returns how it ended.
async fn regular_conn(shared: &Shared, ws: &mut Conn, i: usize) -> std::result::Result<End, Fail> {
    let mut counts = FrameCounts::default();
    loop {
        let res = ws
            .read_some(&shared.scratch, &mut counts, |text, now| {
                on_event(shared, i, text, now)
            })
            .await;
        if counts.fragmented > 0 || counts.text_bytes > 0 {
            let mut c = shared.counts.get();
            c.fragmented += counts.fragmented;
            c.text_bytes += counts.text_bytes;
            shared.counts.set(c);
            counts.fragmented = 0;
            counts.text_bytes = 0;
        }
        match res {
            Ok(None) => {}
            Ok(Some(end)) => return Ok(end),
            Err(fail) => return Err(fail),
        }
    }
}

/// The per-message work of a regular subscriber: a byte scan, a histogram record and
/// an offset comparison; no allocation.
fn on_event(shared: &Shared, i: usize, text: &[u8], now: u64) -> Reply {
    if let Some(peer) = &shared.spec.peer {
        if let Some(echo) = peer.message.read(text) {
            let ev = wire::EventFields {
                offset: echo.order_key(),
                t_ns: Some(echo.t_ns),
            };
            count_event(shared, i, text, ev, now);
        }
        return Reply::None;
    }
    match wire::classify(text) {
        ServerText::Event(ev) => {
            count_event(shared, i, text, ev, now);
            Reply::None
        }
        ServerText::Ping => Reply::Pong,
        _ => Reply::None,
    }
}

/// Counts one delivery to connection `i`: a duplicate unless its offset (or, for peers
/// without offsets, its sequence key) is above the last one seen; its latency.
fn count_event(shared: &Shared, i: usize, text: &[u8], ev: wire::EventFields, now: u64) {
    shared.deliveries.set(shared.deliveries.get() + 1);
    {
        let mut conns = shared.conns.borrow_mut();
        let r = &mut conns[i];
        if let Some(log) = shared.logs.borrow_mut().get_mut(i) {
            log.record(ev.offset, text);
        }
        if ev.offset <= r.max_seen {
            shared.duplicates.set(shared.duplicates.get() + 1);
        } else {
            r.unique += 1;
            r.max_seen = ev.offset;
        }
    }
    if let Some(t) = ev.t_ns {
        let us = now.saturating_sub(t) / 1000;
        shared.hist.borrow_mut().saturating_record(us.max(1));
    }
}

/// A slow subscriber reads nothing until the drain phase, then reads everything the
/// server sent to learn whether (and how) the server closed it.
async fn slow_conn(shared: &Shared, ws: &mut Conn) -> std::result::Result<End, Fail> {
    let mut phase = shared.phase.subscribe();
    if phase.wait_for(|p| *p >= Phase::Drain).await.is_err() {
        return Err(Fail::Stopped);
    }
    let mut counts = FrameCounts::default();
    loop {
        match ws
            .read_some(&shared.scratch, &mut counts, |_, _| Reply::None)
            .await
        {
            Ok(None) => {}
            Ok(Some(end)) => return Ok(end),
            Err(fail) => return Err(fail),
        }
    }
}
