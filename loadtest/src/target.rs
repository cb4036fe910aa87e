//! The server under test: spawned by the harness (`--spawn`) or already running
//! (`--url` + `--pid`), and its memory and CPU as `/proc/<pid>` reports them.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::Result;

/// The line prefix every server prints on stdout once bound.
const LISTENING: &str = "tidings listening on http://";

/// How long a spawned server may take to print its listening line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a spawned server gets to exit after SIGTERM before SIGKILL.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A server the scenarios drive.
#[derive(Debug)]
pub struct Target {
    /// Short name for tables (the binary's file name, or the URL).
    pub label: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its process, when known; memory and CPU are only reported with one.
    pub pid: Option<u32>,
    child: Option<Child>,
    /// Where a spawned server's stderr goes.
    pub log: Option<PathBuf>,
}

impl Target {
    /// Spawns `path serve --listen 127.0.0.1:0 ARGS..` and waits for its listening line.
    pub fn spawn(path: &Path, args: &[String]) -> Result<Target> {
        let label = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Target::spawn_as(path, args, &[], label)
    }

    /// [`Target::spawn`] with extra environment variables and a label of its own (which
    /// also names its log, so several copies of one binary keep separate logs).
    pub fn spawn_as(
        path: &Path,
        args: &[String],
        env: &[(String, String)],
        label: String,
    ) -> Result<Target> {
        let file_label: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let log = std::env::temp_dir().join(format!(
            "tidings-loadtest-{file_label}-{}.log",
            std::process::id()
        ));
        let log_file = std::fs::File::create(&log)?;
        let mut child = Command::new(path)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", path.display()))?;
        let stdout = child.stdout.take().ok_or("child without stdout")?;
        // Read stdout on a thread so that a silent server cannot hang us, and keep
        // draining it afterwards so that the server never blocks on a full pipe.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sent {
                    continue;
                }
                if let Some(addr) = line.trim().strip_prefix(LISTENING) {
                    sent = true;
                    let _ = tx.send(addr.trim_end_matches('/').to_string());
                }
            }
        });
        let pid = child.id();
        let mut target = Target {
            label,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            pid: Some(pid),
            child: Some(child),
            log: Some(log.clone()),
        };
        let addr = match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(a) => a,
            Err(_) => {
                return Err(format!(
                    "{} did not print '{LISTENING}ADDR' within {STARTUP_TIMEOUT:?}; see {}",
                    path.display(),
                    log.display()
                )
                .into());
            }
        };
        target.addr = addr
            .parse()
            .map_err(|e| format!("bad listening address {addr:?}: {e}"))?;
        Ok(target)
    }

    /// A server already running at `url` (`http://host:port`), optionally with its pid.
    pub fn attach(url: &str, pid: Option<u32>) -> Result<Target> {
        let hostport = url
            .strip_prefix("http://")
            .ok_or("--url must start with http://")?
            .trim_end_matches('/');
        let addr = hostport
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| format!("{hostport} does not resolve"))?;
        if !addr.ip().is_loopback() {
            return Err("load is only ever sent to loopback addresses".into());
        }
        Ok(Target {
            label: hostport.to_string(),
            addr,
            pid,
            child: None,
            log: None,
        })
    }

    /// A memory and CPU sample of the server, if its pid is known and readable.
    pub fn sample(&self) -> Option<ProcSample> {
        ProcSample::read(self.pid?)
    }

    /// Whether a spawned server is still running (always true for attached ones).
    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = std::time::Instant::now() + SHUTDOWN_GRACE;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// One reading of a process's resident memory and CPU time.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// Resident set size in bytes (`VmRSS`).
    pub rss: u64,
    /// User CPU seconds since the process started.
    pub user_s: f64,
    /// System CPU seconds since the process started.
    pub sys_s: f64,
}

impl ProcSample {
    /// Reads `/proc/<pid>/status` and `/proc/<pid>/stat`.
    pub fn read(pid: u32) -> Option<ProcSample> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (user_s, sys_s) = cpu_from_stat(&stat)?;
        Some(ProcSample {
            rss: rss_kb * 1024,
            user_s,
            sys_s,
        })
    }

    /// This process's own sample.
    pub fn current() -> Option<ProcSample> {
        ProcSample::read(std::process::id())
    }
}

/// utime and stime (fields 14 and 15 of proc(5) `stat`) in seconds. The command name is
/// parenthesised and may contain spaces, so fields are counted after the last `)`.
fn cpu_from_stat(stat: &str) -> Option<(f64, f64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')' come field 3 (state) onwards: utime is field 14, the 12th from here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let hz = clock_ticks();
    Some((utime as f64 / hz, stime as f64 / hz))
}

/// Clock ticks per second, `sysconf(_SC_CLK_TCK)`.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_parenthesised_name() {
        let stat = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        let (u, s) = cpu_from_stat(stat).unwrap();
        let hz = clock_ticks();
        assert!((u - 250.0 / hz).abs() < 1e-9);
        assert!((s - 50.0 / hz).abs() < 1e-9);
    }

    #[test]
    fn own_process_is_readable() {
        let s = ProcSample::current().unwrap();
        assert!(s.rss > 0);
    }
}
