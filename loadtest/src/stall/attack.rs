//! The attacking side of `stall`: connections from one source address that send an
//! incomplete request head, or a complete `POST` head and a few bytes of a long body, and
//! then nothing. Each is re-opened once the server ends it, until told to stop, and how
//! the server ended it is counted.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, watch};

use crate::conn;
use crate::histo;
use crate::wire;

/// How long an attacking connect may take: past it the attempt counts as
/// `connect timeout` (a full accept queue makes connects hang, not fail).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A server that ends a stalled connection within this time of its last byte "closed
/// it at once" (a limit refusing it); later, it waited for a timeout.
const AT_ONCE: Duration = Duration::from_secs(1);

/// Connects in flight while the attack ramps up, as the subscribers' default: enough to
/// open thousands in a second without a SYN storm overflowing the accept queue.
const RAMP_CONCURRENCY: usize = 256;

/// Most response bytes kept to read a status line from.
const MAX_RESPONSE: usize = 1024;

/// The declared body length of a stalled `POST`: far more than is ever sent.
pub const BODY_LENGTH: usize = 100_000;

/// Body bytes a stalled `POST` sends before stalling.
const BODY_SENT: usize = 16;

/// Which stall a connection performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An incomplete `GET` head.
    Head,
    /// A complete `POST` head and the start of its body.
    Body,
}

/// Counters the coordinator reads while the attack runs.
#[derive(Debug, Default)]
pub struct Live {
    /// Stalled connections currently open.
    pub open: AtomicU64,
    /// Connections opened so far (re-opens included).
    pub opened: AtomicU64,
    /// Connections whose first attempt is done (opened or failed).
    pub first_done: AtomicU64,
}

/// How the server ended the stalled connections of one kind.
#[derive(Debug, Clone)]
pub struct KindTally {
    /// Endings by kind (`closed at once`, `HTTP 503`, `closed after timeout`, ...).
    pub outcomes: BTreeMap<String, u64>,
    /// How long the server held the ones it ended, in ms.
    pub held_ms: Histogram<u64>,
}

impl Default for KindTally {
    fn default() -> KindTally {
        KindTally {
            outcomes: BTreeMap::new(),
            held_ms: histo::new(),
        }
    }
}

/// What the attack saw, per kind.
#[derive(Debug, Clone, Default)]
pub struct AttackTally {
    /// Stalled heads.
    pub heads: KindTally,
    /// Stalled bodies.
    pub bodies: KindTally,
}

/// What the attack needs to know.
#[derive(Debug, Clone)]
pub struct Attack {
    /// The server.
    pub addr: SocketAddr,
    /// The attacking source address.
    pub src: Ipv4Addr,
    /// Stalled heads to keep open.
    pub heads: usize,
    /// Stalled bodies to keep open.
    pub bodies: usize,
    /// Wait before re-opening a connection the server ended.
    pub reopen: Duration,
    /// WebSocket path for the stalled heads.
    pub path: String,
    /// Topic the stalled bodies publish on.
    pub topic: String,
}

/// How one stalled connection ended.
enum Outcome {
    /// The server answered with this status.
    Http(u16, Duration),
    /// The server closed (or reset) without a response after this long.
    Closed(Duration),
    /// It could not be opened (the label says why).
    NotOpened(String),
    /// The attack stopped first.
    StillOpen,
}

impl Attack {
    fn request(&self, kind: Kind) -> Vec<u8> {
        match kind {
            Kind::Head => format!("GET {} HTTP/1.1\r\nHost: x\r\n", self.path).into_bytes(),
            Kind::Body => {
                let mut r = format!(
                    "POST /v1/topics/{}/events HTTP/1.1\r\nHost: x\r\n\
                     Content-Type: application/json\r\nContent-Length: {BODY_LENGTH}\r\n\r\n",
                    self.topic
                )
                .into_bytes();
                r.extend_from_slice(&b"{\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxx"[..BODY_SENT]);
                r
            }
        }
    }

    /// Runs the attack on this thread until `stop` turns true; returns the tally.
    pub fn run(self, live: Arc<Live>, stop: watch::Receiver<bool>) -> crate::Result<AttackTally> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = tokio::task::LocalSet::new();
        let tally = Rc::new(RefCell::new(AttackTally::default()));
        let attack = Rc::new(self);
        let ramp = Rc::new(Semaphore::new(RAMP_CONCURRENCY));
        local.block_on(&rt, async {
            let kinds = std::iter::repeat_n(Kind::Head, attack.heads)
                .chain(std::iter::repeat_n(Kind::Body, attack.bodies));
            let tasks: Vec<_> = kinds
                .map(|kind| {
                    let ctx = Task {
                        attack: attack.clone(),
                        live: live.clone(),
                        tally: tally.clone(),
                        ramp: ramp.clone(),
                        stop: stop.clone(),
                    };
                    tokio::task::spawn_local(ctx.keep_stalled(kind))
                })
                .collect();
            for t in tasks {
                let _ = t.await;
            }
        });
        let tally = tally.borrow().clone();
        Ok(tally)
    }
}

/// One stalled connection slot and what it shares.
struct Task {
    attack: Rc<Attack>,
    live: Arc<Live>,
    tally: Rc<RefCell<AttackTally>>,
    ramp: Rc<Semaphore>,
    stop: watch::Receiver<bool>,
}

impl Task {
    /// Keeps one stalled connection of `kind` open until the attack stops.
    async fn keep_stalled(mut self, kind: Kind) {
        let mut first = true;
        while !*self.stop.borrow() {
            let outcome = self.one(kind, first).await;
            first = false;
            let (label, held) = match outcome {
                Outcome::StillOpen => ("still open".to_string(), None),
                Outcome::Http(status, held) => (format!("HTTP {status}"), Some(held)),
                Outcome::Closed(held) if held < AT_ONCE => ("closed at once".into(), Some(held)),
                Outcome::Closed(held) => ("closed after a timeout".into(), Some(held)),
                Outcome::NotOpened(why) => (why, None),
            };
            {
                let mut tally = self.tally.borrow_mut();
                let t = match kind {
                    Kind::Head => &mut tally.heads,
                    Kind::Body => &mut tally.bodies,
                };
                *t.outcomes.entry(label).or_default() += 1;
                if let Some(held) = held {
                    let ms = u64::try_from(held.as_millis()).unwrap_or(u64::MAX);
                    t.held_ms.saturating_record(ms.max(1));
                }
            }
            let mut stop = self.stop.clone();
            let _ = tokio::time::timeout(self.attack.reopen, stop.wait_for(|s| *s)).await;
        }
    }

    /// Opens one stalled connection and waits until the server ends it or the attack
    /// stops.
    async fn one(&mut self, kind: Kind, first: bool) -> Outcome {
        let attack = self.attack.clone();
        let ramp = self.ramp.clone();
        let permit = if first {
            ramp.acquire().await.ok()
        } else {
            None
        };
        let connect = conn::connect_from(attack.addr, attack.src, true, 0);
        let opened = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(mut s)) => match s.write_all(&attack.request(kind)).await {
                Ok(()) => Ok(s),
                Err(e) => Err(format!("write: {}", e.kind())),
            },
            Ok(Err(fail)) => Err(fail.label()),
            Err(_) => Err("connect timeout".into()),
        };
        drop(permit);
        if first {
            self.live.first_done.fetch_add(1, Ordering::Relaxed);
        }
        let mut stream = match opened {
            Ok(s) => s,
            Err(why) => return Outcome::NotOpened(why),
        };
        let sent = Instant::now();
        self.live.opened.fetch_add(1, Ordering::Relaxed);
        self.live.open.fetch_add(1, Ordering::Relaxed);
        let mut response = Vec::new();
        let mut buf = [0u8; 512];
        let outcome = loop {
            tokio::select! {
                _ = self.stop.wait_for(|s| *s) => break Outcome::StillOpen,
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break Outcome::Closed(sent.elapsed()),
                    Ok(n) => {
                        let room = MAX_RESPONSE.saturating_sub(response.len());
                        response.extend_from_slice(&buf[..n.min(room)]);
                        if let Some(status) = wire::response_status(&response) {
                            break Outcome::Http(status, sent.elapsed());
                        }
                        if response.len() >= MAX_RESPONSE {
                            break Outcome::Http(0, sent.elapsed());
                        }
                    }
                }
            }
        };
        self.live.open.fetch_sub(1, Ordering::Relaxed);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_requests_are_incomplete() {
        let a = Attack {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            src: Ipv4Addr::new(127, 0, 0, 2),
            heads: 0,
            bodies: 0,
            reopen: Duration::ZERO,
            path: "/ws".into(),
            topic: "t".into(),
        };
        let head = a.request(Kind::Head);
        assert!(head.starts_with(b"GET /ws HTTP/1.1\r\n"));
        assert_eq!(wire::head_end(&head), None);
        let body = a.request(Kind::Body);
        let end = wire::head_end(&body).unwrap_or(0);
        assert!(end > 0);
        assert_eq!(body.len() - end, BODY_SENT);
        const { assert!(BODY_SENT < BODY_LENGTH) };
    }
}
