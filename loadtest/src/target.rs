//! The server under test: spawned by the harness (`--spawn`) or already running
//! (`--url` + `--pid`), and its memory and CPU as `/proc/<pid>` reports them.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::Result;
use crate::peer::{Peer, PeerClient, Publish, START_VARS, Template};

/// The line prefix every server prints on stdout once bound.
const LISTENING: &str = "tidings listening on http://";

/// How long a spawned server may take to print its listening line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a spawned server gets to exit after SIGTERM before SIGKILL.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How often a started peer's port is tried until it accepts.
const READY_POLL: Duration = Duration::from_millis(50);

/// A peer's protocol, for the driver and its workers.
#[derive(Debug, Clone)]
pub struct PeerProto {
    /// The subscriber side (sent to the workers).
    pub client: PeerClient,
    /// How publications are sent.
    pub publish: Publish,
}

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
    /// The protocol of a server described by a peer file; `None` is tidings' own.
    pub peer: Option<PeerProto>,
    /// A started peer's `{dir}`, removed once it stopped.
    scratch: Option<PathBuf>,
}

/// Restricts the process about to `exec` to `cpus` (none: no restriction), so that the
/// server's threads, created later, all inherit it.
fn pin(cmd: &mut Command, cpus: &[usize]) {
    if cpus.is_empty() {
        return;
    }
    let cpus = cpus.to_vec();
    // SAFETY: the closure runs between fork and exec and only calls sched_setaffinity(2)
    // on a set built on its own stack, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in &cpus {
                libc::CPU_SET(c, &mut set);
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A loopback port free now (the kernel's pick; released at once, so a peer that starts
/// within moments binds it).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The log file of a target labelled `label`.
fn log_path(label: &str) -> PathBuf {
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
    std::env::temp_dir().join(format!(
        "tidings-loadtest-{file_label}-{}.log",
        std::process::id()
    ))
}

impl Target {
    /// Spawns `path serve --listen 127.0.0.1:0 ARGS..` and waits for its listening line.
    pub fn spawn(path: &Path, args: &[String]) -> Result<Target> {
        Target::spawn_pinned(path, args, &[])
    }

    /// [`Target::spawn`] restricted to `cpus` (none: no restriction).
    pub fn spawn_pinned(path: &Path, args: &[String], cpus: &[usize]) -> Result<Target> {
        let label = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Target::launch(path, args, &[], label, cpus)
    }

    /// [`Target::spawn`] with extra environment variables and a label of its own (which
    /// also names its log, so several copies of one binary keep separate logs).
    pub fn spawn_as(
        path: &Path,
        args: &[String],
        env: &[(String, String)],
        label: String,
    ) -> Result<Target> {
        Target::launch(path, args, env, label, &[])
    }

    fn launch(
        path: &Path,
        args: &[String],
        env: &[(String, String)],
        label: String,
        cpus: &[usize],
    ) -> Result<Target> {
        let log = log_path(&label);
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(path);
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        pin(&mut cmd, cpus);
        let mut child = cmd
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
            peer: None,
            scratch: None,
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
            peer: None,
            scratch: None,
        })
    }

    /// Starts the server a peer file describes (restricted to `cpus`; none: no
    /// restriction) on a free loopback port in a fresh directory, its config file written
    /// there first, and waits until the port accepts; or attaches to its running `url`.
    pub fn start_peer(peer: &Peer, cpus: &[usize]) -> Result<Target> {
        let proto = PeerProto {
            client: peer.client(),
            publish: peer.publish.clone(),
        };
        let Some(command) = &peer.start.command else {
            let url = peer
                .start
                .url
                .as_deref()
                .ok_or("peer without command or url")?;
            let mut target = Target::attach(url, peer.start.pid)?;
            target.label = peer.name.clone();
            target.peer = Some(proto);
            return Ok(target);
        };
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!(
            "tidings-loadtest-peer-{}-{}-{port}",
            peer.name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        let value = |t: &Template| -> String { peer.start_value(t, port, &dir) };
        if let Some(config) = &peer.start.config {
            let path = peer.dir.join(&config.template);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            let template = Template::new(&text);
            template.check(&path.display().to_string(), START_VARS)?;
            std::fs::write(dir.join(&config.name), value(&template))?;
        }
        let program = value(command);
        let log = log_path(&peer.name);
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(&program);
        cmd.args(peer.start.args.iter().map(value))
            .envs(peer.start.env.iter().map(|(k, v)| (k, value(v))))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        pin(&mut cmd, cpus);
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting peer {}: {program}: {e}", peer.name))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut target = Target {
            label: peer.name.clone(),
            addr,
            pid: Some(child.id()),
            child: Some(child),
            log: Some(log.clone()),
            peer: Some(proto),
            scratch: Some(dir),
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while TcpStream::connect_timeout(&addr, READY_POLL).is_err() {
            if !target.alive() {
                return Err(
                    format!("peer {} exited at start; see {}", peer.name, log.display()).into(),
                );
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "peer {} did not accept on {addr} within {STARTUP_TIMEOUT:?}; see {}",
                    peer.name,
                    log.display()
                )
                .into());
            }
            std::thread::sleep(READY_POLL);
        }
        Ok(target)
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
        self.stop();
        if let Some(dir) = self.scratch.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Target {
    /// Stops a spawned server: SIGTERM, then SIGKILL after [`SHUTDOWN_GRACE`].
    fn stop(&mut self) {
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
