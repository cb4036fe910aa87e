//! A `redis-server` of the harness's own for the `cluster` scenario: on a free loopback
//! port, in a fresh temporary directory, with persistence off, stopped (and its directory
//! removed) when dropped. The nodes speak the Redis protocol; the harness needs the process
//! for its CPU and memory, and asks it one thing, `INFO commandstats`: the time Redis spent
//! in each command, which (unlike `/proc` with its 10 ms ticks and Redis' own idle timers)
//! is the cost of the publications alone.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::Result;
use crate::target::ProcSample;

/// The line Redis logs once it accepts clients (7.0 ends it there, 7.2 adds `tcp`).
const READY: &str = "Ready to accept connections";

/// How long `redis-server` may take to log [`READY`].
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long it gets to exit after SIGTERM before SIGKILL (persistence is off, so
/// shutting down has nothing to write).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long the `INFO` exchange may take (a local Redis answers in microseconds).
const INFO_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest `INFO` reply accepted (`commandstats` is a few KiB).
const MAX_INFO: usize = 1 << 20;

/// Attempts at a free port: the port is found by binding port 0 and closing it again, so
/// another process may take it before Redis binds it; Redis then exits and we try another.
const PORT_ATTEMPTS: usize = 5;

/// A running `redis-server` owned by the harness.
#[derive(Debug)]
pub struct RedisServer {
    /// Where it listens (loopback).
    pub addr: SocketAddr,
    /// Its process id, for `/proc` samples.
    pub pid: u32,
    child: Child,
    dir: PathBuf,
}

/// How one start attempt ended.
enum Started {
    Ready,
    /// Exited (or closed its output) before it was ready, e.g. because the port was taken.
    Exited,
}

impl RedisServer {
    /// Starts `path` (`redis-server`) on a free port in a new temporary directory and waits
    /// until it logs that it accepts connections. Its log is `redis.log` in that directory
    /// (kept until the server is dropped).
    pub fn spawn(path: &Path) -> Result<RedisServer> {
        let dir = std::env::temp_dir().join(format!(
            "tidings-loadtest-redis-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("redis.log");
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let mut child = Command::new(path)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .args(["--daemonize", "no", "--logfile", ""])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("spawning {}: {e}", path.display()))?;
            match wait_ready(&mut child, &log) {
                Ok(Started::Ready) => {
                    return Ok(RedisServer {
                        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                        pid: child.id(),
                        child,
                        dir,
                    });
                }
                // Most likely the port was taken meanwhile: try another, in the same
                // directory (its log keeps every attempt).
                Ok(Started::Exited) => stop(&mut child),
                Err(e) => {
                    stop(&mut child);
                    return Err(e);
                }
            }
        }
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        Err(format!(
            "{} did not start after {PORT_ATTEMPTS} attempts; its last lines:\n{}",
            path.display(),
            last_lines(&tail, 10)
        )
        .into())
    }

    /// The URL the nodes are given (`TIDINGS_BUS_URL`).
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// A memory and CPU sample of the server.
    pub fn sample(&self) -> Option<ProcSample> {
        ProcSample::read(self.pid)
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The calls and time of every command Redis ran since it started (`INFO
    /// commandstats`), by command name.
    pub fn command_stats(&self) -> Result<BTreeMap<String, CommandStat>> {
        let mut s = TcpStream::connect_timeout(&self.addr, INFO_TIMEOUT)?;
        s.set_read_timeout(Some(INFO_TIMEOUT))?;
        s.set_write_timeout(Some(INFO_TIMEOUT))?;
        // An inline command: one line, no RESP array needed.
        s.write_all(b"INFO commandstats\r\n")?;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(reply) = bulk_reply(&buf)? {
                let text = std::str::from_utf8(reply).map_err(|_| "INFO reply is not UTF-8")?;
                return Ok(parse_commandstats(text));
            }
            if buf.len() > MAX_INFO {
                return Err("INFO reply too large".into());
            }
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err("redis-server closed the INFO connection".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One command's line of `INFO commandstats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommandStat {
    /// Times it ran.
    pub calls: u64,
    /// Microseconds Redis spent in it, in all. A script's time includes the commands it
    /// calls, which are also counted on their own lines.
    pub usec: u64,
}

/// The payload of a complete RESP bulk string reply (`$<len>\r\n<bytes>\r\n`) at the start
/// of `buf`: `Ok(None)` while more bytes are needed, an error for an error reply (`-ERR ..`)
/// or anything else.
pub fn bulk_reply(buf: &[u8]) -> Result<Option<&[u8]>> {
    let Some(eol) = memchr::memmem::find(buf, b"\r\n") else {
        return Ok(None);
    };
    let head = &buf[..eol];
    match head.first() {
        Some(b'$') => {}
        Some(b'-') => {
            return Err(format!("redis-server: {}", String::from_utf8_lossy(&head[1..])).into());
        }
        _ => return Err("unexpected reply from redis-server".into()),
    }
    let len: usize = std::str::from_utf8(&head[1..])
        .ok()
        .and_then(|l| l.parse().ok())
        .ok_or("bad bulk length from redis-server")?;
    let start = eol + 2;
    let end = start.checked_add(len).ok_or("bad bulk length")?;
    if buf.len() < end + 2 {
        return Ok(None);
    }
    Ok(Some(&buf[start..end]))
}

/// The `cmdstat_<name>:calls=N,usec=U,...` lines of an `INFO commandstats` reply (other
/// lines, and fields it does not know, are ignored).
pub fn parse_commandstats(text: &str) -> BTreeMap<String, CommandStat> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((name, fields)) = line
            .trim()
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let mut stat = CommandStat::default();
        for field in fields.split(',') {
            match field.split_once('=') {
                Some(("calls", v)) => stat.calls = v.parse().unwrap_or(0),
                Some(("usec", v)) => stat.usec = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        out.insert(name.to_string(), stat);
    }
    out
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        stop(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SIGTERM, then SIGKILL after [`SHUTDOWN_GRACE`].
fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Copies the child's stdout and stderr into `log` (for as long as it runs, so that it
/// never blocks on a full pipe) and waits for [`READY`] on either.
fn wait_ready(child: &mut Child, log: &Path) -> Result<Started> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().ok_or("redis-server without stdout")?;
    let err = child.stderr.take().ok_or("redis-server without stderr")?;
    for (stream, file) in [
        (
            Box::new(out) as Box<dyn std::io::Read + Send>,
            file.try_clone()?,
        ),
        (Box::new(err), file),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut file = file;
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                if line.contains(READY) {
                    let _ = tx.send(true);
                }
            }
            let _ = tx.send(false);
        });
    }
    drop(tx);
    match rx.recv_timeout(STARTUP_TIMEOUT) {
        Ok(true) => Ok(Started::Ready),
        // One of its two streams closed: it exited (or is exiting) without being ready.
        Ok(false) | Err(mpsc::RecvTimeoutError::Disconnected) => Ok(Started::Exited),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "redis-server did not log {READY:?} within {STARTUP_TIMEOUT:?}; see {}",
            log.display()
        )
        .into()),
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// A number distinct for every call in this process (several servers in one run).
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_replies_wait_for_their_last_byte() {
        assert_eq!(bulk_reply(b"").unwrap(), None);
        assert_eq!(bulk_reply(b"$5\r\nhel").unwrap(), None);
        assert_eq!(bulk_reply(b"$5\r\nhello").unwrap(), None);
        assert_eq!(bulk_reply(b"$5\r\nhello\r\n").unwrap(), Some(&b"hello"[..]));
        assert!(bulk_reply(b"-ERR unknown command\r\n").is_err());
        assert!(bulk_reply(b"+OK\r\n").is_err());
        assert!(bulk_reply(b"$x\r\n").is_err());
        assert!(bulk_reply(b"$99999999999999999999999\r\n").is_err());
    }

    #[test]
    fn commandstats_lines_by_command() {
        let text = "# Commandstats\r\n\
                    cmdstat_evalsha:calls=300,usec=12345,usec_per_call=41.15,rejected_calls=0,failed_calls=0\r\n\
                    cmdstat_ping:calls=90,usec=45,usec_per_call=0.50\r\n\
                    cmdstat_broken\r\n";
        let stats = parse_commandstats(text);
        assert_eq!(stats.len(), 2);
        assert_eq!(
            stats["evalsha"],
            CommandStat {
                calls: 300,
                usec: 12345
            }
        );
        assert_eq!(stats["ping"].calls, 90);
    }

    #[test]
    fn last_lines_keeps_the_tail() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
        assert_eq!(last_lines("", 5), "");
    }

    /// Starts a real server when one is installed (CI installs Debian's); skipped
    /// otherwise, since the harness itself does not need Redis to build.
    #[test]
    fn spawns_and_stops_a_real_server() {
        let path = Path::new("/usr/bin/redis-server");
        if !path.exists() {
            eprintln!("no {}: skipped", path.display());
            return;
        }
        let mut server = RedisServer::spawn(path).unwrap();
        assert!(server.alive());
        assert!(server.sample().is_some());
        let mut s = std::net::TcpStream::connect(server.addr).unwrap();
        s.write_all(b"PING\r\n").unwrap();
        let mut buf = [0u8; 7];
        std::io::Read::read_exact(&mut s, &mut buf).unwrap();
        assert_eq!(&buf, b"+PONG\r\n");
        let stats = server.command_stats().unwrap();
        assert_eq!(stats["ping"].calls, 1, "{stats:?}");
        let dir = server.dir.clone();
        drop(server);
        assert!(!dir.exists());
    }
}
