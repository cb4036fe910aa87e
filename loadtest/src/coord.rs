//! The coordinator's side of the worker processes: it re-executes this binary as hidden
//! `worker` children (each within the per-process open-file budget), feeds them their spec
//! and commands, follows their progress and merges their results.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::Result;
use crate::histo::{self, Latency};
use crate::offsets::{Ranges, Tally};
use crate::worker::{Command, Progress, Report, TRACKED_DRAIN_CAP, WorkerResult, WorkerSpec};

/// Time a worker has past its drain to read slow connections' backlog and report.
const REPORT_GRACE: Duration = Duration::from_secs(30);

/// What a worker's reader thread forwards.
enum Msg {
    Report(usize, Report),
    Gone(usize),
}

/// The running worker processes.
pub struct Workers {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    rx: Receiver<Msg>,
    progress: Vec<Progress>,
    ready: Vec<bool>,
    results: Vec<Option<WorkerResult>>,
    checkpoints: Vec<Option<WorkerResult>>,
    gone: Vec<bool>,
    /// Whether the workers track offsets (their drain may last longer).
    tracked: bool,
    /// When every result must be in, once `Stop` was sent.
    report_by: Option<Instant>,
}

impl Workers {
    /// Starts one worker process per spec.
    pub fn spawn(specs: &[WorkerSpec]) -> Result<Workers> {
        let exe = std::env::current_exe()?;
        let (tx, rx) = mpsc::channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        for (idx, spec) in specs.iter().enumerate() {
            let mut child = Process::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            let mut stdin = child.stdin.take().ok_or("worker without stdin")?;
            let stdout = child.stdout.take().ok_or("worker without stdout")?;
            serde_json::to_writer(&mut stdin, spec)?;
            stdin.write_all(b"\n")?;
            stdin.flush()?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Report>(&line) {
                        Ok(r) => {
                            if tx.send(Msg::Report(idx, r)).is_err() {
                                return;
                            }
                        }
                        Err(e) => eprintln!("worker {idx}: unreadable line ({e}): {line}"),
                    }
                }
                let _ = tx.send(Msg::Gone(idx));
            });
            children.push(child);
            stdins.push(stdin);
        }
        let n = specs.len();
        Ok(Workers {
            children,
            stdins,
            rx,
            progress: vec![Progress::default(); n],
            ready: vec![false; n],
            results: vec![None; n],
            checkpoints: vec![None; n],
            gone: vec![false; n],
            tracked: specs.iter().any(|s| s.track_offsets),
            report_by: None,
        })
    }

    /// Sends a command to every worker.
    pub fn send(&mut self, cmd: &Command) -> Result<()> {
        let line = serde_json::to_string(cmd)?;
        for stdin in &mut self.stdins {
            stdin.write_all(line.as_bytes())?;
            stdin.write_all(b"\n")?;
            stdin.flush()?;
        }
        Ok(())
    }

    /// Handles worker messages until `deadline`. Fails if a worker died without a result.
    pub fn poll_until(&mut self, deadline: Instant) -> Result<()> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            match self.rx.recv_timeout(deadline - now) {
                Ok(msg) => self.handle(msg)?,
                Err(RecvTimeoutError::Timeout) => return Ok(()),
                Err(RecvTimeoutError::Disconnected) => {
                    if self.results.iter().all(Option::is_some) {
                        return Ok(());
                    }
                    return Err("all workers gone".into());
                }
            }
        }
    }

    fn handle(&mut self, msg: Msg) -> Result<()> {
        match msg {
            Msg::Report(i, Report::Progress(p)) => self.progress[i] = p,
            Msg::Report(i, Report::Ready(p)) => {
                self.progress[i] = p;
                self.ready[i] = true;
            }
            Msg::Report(i, Report::Checkpoint(r)) => {
                self.progress[i] = r.progress;
                self.checkpoints[i] = Some(*r);
            }
            Msg::Report(i, Report::Result(r)) => {
                self.progress[i] = r.progress;
                self.results[i] = Some(*r);
            }
            Msg::Gone(i) => {
                self.gone[i] = true;
                if self.results[i].is_none() {
                    return Err(format!("worker {i} exited without a result").into());
                }
            }
        }
        Ok(())
    }

    /// Counters summed over workers.
    pub fn progress(&self) -> Progress {
        let mut sum = Progress::default();
        for p in &self.progress {
            sum.subscribed += p.subscribed;
            sum.failed += p.failed;
            sum.closed += p.closed;
            sum.churn_ok += p.churn_ok;
            sum.churn_failed += p.churn_failed;
            sum.churn_open += p.churn_open;
            sum.elapsed_ms = sum.elapsed_ms.max(p.elapsed_ms);
        }
        sum
    }

    /// Whether every worker finished its initial connections.
    pub fn all_ready(&self) -> bool {
        self.ready.iter().all(|r| *r)
    }

    /// Ends a step of a stepped run: every worker waits up to `drain` for its
    /// subscribers to have `published` (per topic, since the start) and reports what
    /// arrived since the previous checkpoint; merged here. The workers go on.
    pub fn checkpoint(&mut self, published: Vec<u64>, drain: Duration) -> Result<Aggregate> {
        let drain_ms = u64::try_from(drain.as_millis()).unwrap_or(u64::MAX);
        self.send(&Command::Checkpoint {
            published,
            drain_ms,
        })?;
        let deadline = Instant::now() + drain + REPORT_GRACE;
        while self.checkpoints.iter().any(Option::is_none) {
            if Instant::now() >= deadline {
                return Err("workers did not report their checkpoint in time".into());
            }
            self.poll_until(Instant::now() + Duration::from_millis(20))?;
        }
        let each: Vec<WorkerResult> = self
            .checkpoints
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        Aggregate::of(&each)
    }

    /// Sends `Stop` and collects every worker's result.
    pub fn finish(mut self, published: Vec<u64>, drain: Duration) -> Result<Aggregate> {
        self.stop(published, Ranges::default(), drain)?;
        self.collect()
    }

    /// Sends `Stop`, with the `accepted` offsets that workers tracking offsets judge
    /// their subscribers against; [`Workers::collect`] then gathers the results.
    pub fn stop(&mut self, published: Vec<u64>, accepted: Ranges, drain: Duration) -> Result<()> {
        let drain_ms = u64::try_from(drain.as_millis()).unwrap_or(u64::MAX);
        self.send(&Command::Stop {
            published,
            drain_ms,
            accepted,
        })?;
        let drain = if self.tracked {
            drain.max(TRACKED_DRAIN_CAP)
        } else {
            drain
        };
        self.report_by = Some(Instant::now() + drain + REPORT_GRACE);
        Ok(())
    }

    /// Waits for every worker's result (after [`Workers::stop`]) and merges them.
    pub fn collect(self) -> Result<Aggregate> {
        Aggregate::of(&self.collect_each()?)
    }

    /// Waits for every worker's result (after [`Workers::stop`]), in the order of the
    /// specs the workers were spawned with, so that callers can merge groups of them.
    pub fn collect_each(mut self) -> Result<Vec<WorkerResult>> {
        let deadline = self
            .report_by
            .unwrap_or_else(|| Instant::now() + REPORT_GRACE);
        while self.results.iter().any(Option::is_none) {
            if Instant::now() >= deadline {
                return Err("workers did not report in time".into());
            }
            self.poll_until(Instant::now() + Duration::from_millis(100))?;
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        Ok(self.results.iter_mut().filter_map(Option::take).collect())
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.children {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Every worker's result merged.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Aggregate {
    /// Final summed counters.
    pub progress: Progress,
    /// Slowest worker's time to get its initial connections subscribed (ms).
    pub connect_ms: u64,
    /// Failures by kind.
    pub fail_reasons: BTreeMap<String, u64>,
    /// Events received by regular subscribers.
    pub deliveries: u64,
    /// Duplicate events.
    pub duplicates: u64,
    /// Events regular subscribers should have received.
    pub expected: u64,
    /// Expected events never received.
    pub lost: u64,
    /// Fragmented text frames (not measured).
    pub fragmented: u64,
    /// Bytes of whole text frames received, as on the wire.
    pub text_bytes: u64,
    /// Publish-to-receive latency.
    pub latency: Latency,
    /// Regular subscribers the server closed, by kind.
    pub regular_closed: BTreeMap<String, u64>,
    /// Slow subscribers.
    pub slow_total: u64,
    /// What happened to slow subscribers, by kind.
    pub slow_outcomes: BTreeMap<String, u64>,
    /// CPU seconds of all client workers (user, system).
    pub client_cpu_s: (f64, f64),
    /// Verdicts on subscribers of workers that tracked offsets.
    pub flood: Tally,
}

impl Aggregate {
    /// The results of several workers merged (counters summed, histograms added).
    pub fn of(results: &[WorkerResult]) -> Result<Aggregate> {
        let mut hist: Histogram<u64> = histo::new();
        let mut a = Aggregate::default();
        let merge = |into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>| {
            for (k, v) in from {
                *into.entry(k.clone()).or_default() += v;
            }
        };
        for r in results {
            let p = &mut a.progress;
            p.subscribed += r.progress.subscribed;
            p.failed += r.progress.failed;
            p.closed += r.progress.closed;
            p.churn_ok += r.progress.churn_ok;
            p.churn_failed += r.progress.churn_failed;
            p.churn_open += r.progress.churn_open;
            a.connect_ms = a.connect_ms.max(r.connect_ms);
            merge(&mut a.fail_reasons, &r.fail_reasons);
            a.deliveries += r.deliveries;
            a.duplicates += r.duplicates;
            a.expected += r.expected;
            a.lost += r.lost;
            a.fragmented += r.fragmented;
            a.text_bytes += r.text_bytes;
            hist.add(histo::decode(&r.histogram)?)
                .map_err(|e| format!("merging histograms: {e:?}"))?;
            merge(&mut a.regular_closed, &r.regular_closed);
            a.slow_total += r.slow_total;
            merge(&mut a.slow_outcomes, &r.slow_outcomes);
            a.client_cpu_s.0 += r.client_cpu_s.0;
            a.client_cpu_s.1 += r.client_cpu_s.1;
            a.flood.merge(&r.flood);
        }
        a.latency = Latency::of(&hist);
        Ok(a)
    }
}
