//! The part of a connection that publishers touch: its socket and its bounded outbox.
//!
//! A frame is written straight to the socket when nothing is queued, by whichever thread
//! delivers it (a fan-out thread, or the connection's own task), so an up-to-date
//! subscriber costs one `send` syscall per publication and no task wake-up. Only what the
//! socket does not take is queued (as `Bytes` clones of the shared frame, never copies), and
//! the connection's task is woken once to flush it with vectored writes when the socket is
//! writable again.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::net::TcpStream;

use crate::proto::CloseCode;
use crate::proto::frame::encode_close;

/// At most this many frames go into one vectored write. Linux accepts up to 1024 (IOV_MAX);
/// 64 frames of a typical event already fill a loopback socket buffer in one call.
const MAX_IOVECS: usize = 64;

/// An outbox whose queue grew past this capacity is released when it drains, so a burst
/// does not pin memory on an idle connection.
const RETAINED_QUEUE_CAPACITY: usize = 8;

/// What happened to a frame handed to [`Conn::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written to the socket in full.
    Written,
    /// Queued (in part or whole) behind earlier frames or a full socket.
    Queued,
    /// The queue overflowed: the connection is now closing with 1013.
    Overflowed,
    /// The connection is closing or broken; the frame was dropped.
    Closed,
}

/// Lifecycle of the outgoing side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutState {
    /// Frames are accepted.
    Open,
    /// A close frame is queued or sent; nothing more is accepted.
    Closing(CloseCode),
    /// A write failed; the connection is gone.
    Broken,
}

impl OutState {
    /// Whether frames are still accepted.
    pub fn is_open(self) -> bool {
        matches!(self, OutState::Open)
    }
}

#[derive(Debug)]
struct Outbox {
    queue: VecDeque<Bytes>,
    /// Bytes of the head frame already written.
    head_written: usize,
    /// Bytes queued, not counting what of the head is written.
    queued: usize,
    state: OutState,
}

/// A connection as shared between its task and the fan-out threads.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    out: Mutex<Outbox>,
    /// The connection task's waker, for "the outbox needs flushing or closing".
    waker: AtomicWaker,
    max_queued: usize,
    /// Heartbeat tick of the last inbound frame.
    last_seen: AtomicU64,
}

impl Conn {
    /// Wraps an upgraded socket; `max_queued` bounds the outbox in bytes.
    pub fn new(stream: TcpStream, max_queued: usize) -> Conn {
        Conn {
            stream,
            out: Mutex::new(Outbox {
                queue: VecDeque::new(),
                head_written: 0,
                queued: 0,
                state: OutState::Open,
            }),
            waker: AtomicWaker::new(),
            max_queued,
            last_seen: AtomicU64::new(0),
        }
    }

    /// Records that the peer was heard from at heartbeat tick `now`.
    pub fn touch(&self, now: u64) {
        self.last_seen.store(now, Ordering::Relaxed);
    }

    /// The heartbeat tick of the last inbound frame.
    pub fn last_seen(&self) -> u64 {
        self.last_seen.load(Ordering::Relaxed)
    }

    /// The socket, for the connection task's reads.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Registers the connection task's waker.
    pub fn register(&self, cx: &Context<'_>) {
        self.waker.register(cx.waker());
    }

    /// The outgoing side's state.
    pub fn state(&self) -> OutState {
        self.out.lock().state
    }

    /// Delivers one encoded frame: straight to the socket if nothing is queued, else queued.
    /// Never waits. Overflowing the queue starts a 1013 close instead of growing it.
    pub fn send(&self, frame: Bytes) -> Delivery {
        let mut out = self.out.lock();
        if !out.state.is_open() {
            return Delivery::Closed;
        }
        let was_empty = out.queue.is_empty();
        if was_empty {
            match self.stream.try_write(&frame) {
                Ok(n) if n == frame.len() => return Delivery::Written,
                Ok(n) => {
                    out.head_written = n;
                    out.queued += frame.len() - n;
                    out.queue.push_back(frame);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    out.queued += frame.len();
                    out.queue.push_back(frame);
                }
                Err(_) => {
                    out.state = OutState::Broken;
                    drop(out);
                    self.waker.wake();
                    return Delivery::Closed;
                }
            }
        } else {
            out.queued += frame.len();
            out.queue.push_back(frame);
        }
        if out.queued > self.max_queued {
            Self::start_close(&mut out, CloseCode::TryAgainLater, "slow consumer", false);
            drop(out);
            self.waker.wake();
            return Delivery::Overflowed;
        }
        drop(out);
        if was_empty {
            self.waker.wake();
        }
        Delivery::Queued
    }

    /// Queues a close frame; nothing is accepted after it. With `keep_queue` the frames
    /// already queued are sent first (shutdown flushes what was accepted); without it they
    /// are dropped, except a partly written head frame, which must be finished to keep the
    /// stream well-formed. Returns false if the connection was already closing.
    pub fn close(&self, code: CloseCode, reason: &str, keep_queue: bool) -> bool {
        let mut out = self.out.lock();
        if !out.state.is_open() {
            return false;
        }
        Self::start_close(&mut out, code, reason, keep_queue);
        drop(out);
        self.waker.wake();
        true
    }

    fn start_close(out: &mut Outbox, code: CloseCode, reason: &str, keep_queue: bool) {
        if !keep_queue {
            let keep = usize::from(out.head_written > 0);
            out.queue.truncate(keep);
            out.queued = out.queue.front().map_or(0, |f| f.len() - out.head_written);
        }
        let frame = encode_close(code, reason);
        out.queued += frame.len();
        out.queue.push_back(frame);
        out.state = OutState::Closing(code);
    }

    /// Marks the connection broken (the peer is gone); queued frames are dropped.
    pub fn set_broken(&self) {
        let mut out = self.out.lock();
        out.state = OutState::Broken;
        out.queue = VecDeque::new();
        out.queued = 0;
        out.head_written = 0;
    }

    /// Writes queued frames until the queue is empty (`Ready(Ok)`) or the socket is full
    /// (`Pending`, with the task registered for writability).
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut out = self.out.lock();
            if out.queue.is_empty() {
                if out.queue.capacity() > RETAINED_QUEUE_CAPACITY {
                    out.queue = VecDeque::new();
                }
                return Poll::Ready(Ok(()));
            }
            if out.state == OutState::Broken {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (i, frame) in out.queue.iter().take(MAX_IOVECS).enumerate() {
                let skip = if i == 0 { out.head_written } else { 0 };
                slices[i] = IoSlice::new(&frame[skip..]);
                n += 1;
            }
            match self.stream.try_write_vectored(&slices[..n]) {
                Ok(written) => out.advance(written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(out);
                    ready!(self.stream.poll_write_ready(cx))?;
                }
                Err(e) => {
                    out.state = OutState::Broken;
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

impl Outbox {
    fn advance(&mut self, mut written: usize) {
        self.queued -= written;
        while written > 0 {
            let Some(head) = self.queue.front() else {
                return;
            };
            let left = head.len() - self.head_written;
            if written >= left {
                written -= left;
                self.head_written = 0;
                self.queue.pop_front();
            } else {
                self.head_written += written;
                written = 0;
            }
        }
    }
}
