//! The bytes waiting for one peer's socket, whatever its transport: a bounded queue of
//! shared `Bytes`, the partly written head, and the count that decides overflow.
//!
//! A frame to send is written straight to the socket when nothing is queued; only what the
//! socket does not take is queued, as a `Bytes` clone of the shared frame, and flushed
//! with vectored writes when the socket is writable again. The outbox never calls back:
//! it reports what happened ([`Push`], [`Flush`]) and the peer decides.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::Bytes;

/// At most this many frames go into one vectored write. Linux accepts up to 1024 (IOV_MAX);
/// 64 frames of a typical event already fill a loopback socket buffer in one call.
const MAX_IOVECS: usize = 64;

/// A queue that grew past this capacity is released when it drains, so a burst does not
/// pin memory on an idle connection.
const RETAINED_QUEUE_CAPACITY: usize = 8;

/// What became of bytes handed to [`Outbox::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Written to the socket in full.
    Written,
    /// Queued (in part or whole) behind earlier bytes or a full socket.
    Queued,
    /// The socket failed: nothing more can be written.
    Broken,
}

/// What a [`Outbox::flush`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Everything queued is written.
    Drained,
    /// The socket is full; the rest waits for writability.
    Blocked,
    /// The socket failed.
    Broken,
}

/// One peer's queue of outbound bytes.
#[derive(Debug, Default)]
pub struct Outbox {
    out: VecDeque<Bytes>,
    /// Bytes of the head already written.
    head_written: usize,
    /// Bytes queued, not counting what of the head is written.
    queued: usize,
}

impl Outbox {
    /// Whether anything is queued.
    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Bytes queued for the socket (what of the head is written not counted).
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Sends `bytes`: straight to `socket` if nothing is queued, else behind what is.
    /// Never blocks and never refuses: the caller compares [`Outbox::queued`] with its limit.
    pub fn push(&mut self, bytes: Bytes, mut socket: impl Write) -> Push {
        if !self.out.is_empty() {
            self.queued += bytes.len();
            self.out.push_back(bytes);
            return Push::Queued;
        }
        loop {
            match socket.write(&bytes) {
                Ok(n) if n == bytes.len() => return Push::Written,
                Ok(n) => {
                    self.head_written = n;
                    self.queued += bytes.len() - n;
                    self.out.push_back(bytes);
                    return Push::Queued;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.queued += bytes.len();
                    self.out.push_back(bytes);
                    return Push::Queued;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Push::Broken,
            }
        }
    }

    /// Queues `bytes` without trying the socket (a reply while a flush is owed anyway).
    pub fn enqueue(&mut self, bytes: Bytes) {
        self.queued += bytes.len();
        self.out.push_back(bytes);
    }

    /// Drops everything queued except a partly written head, which must be finished to keep
    /// the stream well-formed.
    pub fn drop_unstarted(&mut self) {
        let keep = usize::from(self.head_written > 0);
        self.out.truncate(keep);
        self.queued = self.out.front().map_or(0, |f| f.len() - self.head_written);
    }

    /// Drops everything: the socket is gone.
    pub fn clear(&mut self) {
        *self = Outbox::default();
    }

    /// Writes queued bytes until none are left or the socket is full.
    pub fn flush(&mut self, mut socket: impl Write) -> Flush {
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (i, frame) in self.out.iter().take(MAX_IOVECS).enumerate() {
                let skip = if i == 0 { self.head_written } else { 0 };
                slices[i] = IoSlice::new(&frame[skip..]);
                n += 1;
            }
            match socket.write_vectored(&slices[..n]) {
                Ok(written) => self.advance(written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flush::Blocked,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.clear();
                    return Flush::Broken;
                }
            }
        }
        if self.out.capacity() > RETAINED_QUEUE_CAPACITY {
            self.out = VecDeque::new();
        }
        Flush::Drained
    }

    fn advance(&mut self, mut written: usize) {
        self.queued -= written;
        while written > 0 {
            let Some(head) = self.out.front() else {
                return;
            };
            let left = head.len() - self.head_written;
            if written >= left {
                written -= left;
                self.head_written = 0;
                self.out.pop_front();
            } else {
                self.head_written += written;
                written = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes `room` bytes, then would block (or fails, with `fail`).
    struct Socket {
        taken: Vec<u8>,
        room: usize,
        fail: bool,
    }

    impl Write for Socket {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.fail {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn socket(room: usize) -> Socket {
        Socket {
            taken: Vec::new(),
            room,
            fail: false,
        }
    }

    #[test]
    fn writes_through_then_queues_and_flushes_in_order() {
        let mut outbox = Outbox::default();
        let mut s = socket(5);
        assert_eq!(
            outbox.push(Bytes::from_static(b"abc"), &mut s),
            Push::Written
        );
        assert_eq!(
            outbox.push(Bytes::from_static(b"defg"), &mut s),
            Push::Queued
        );
        assert_eq!(outbox.queued(), 2, "two of four bytes written");
        assert_eq!(outbox.push(Bytes::from_static(b"hi"), &mut s), Push::Queued);
        assert_eq!(outbox.queued(), 4);
        assert_eq!(outbox.flush(&mut s), Flush::Blocked);
        s.room = 100;
        assert_eq!(outbox.flush(&mut s), Flush::Drained);
        assert_eq!(s.taken, b"abcdefghi");
        assert_eq!(outbox.queued(), 0);
    }

    #[test]
    fn dropping_keeps_a_started_frame() {
        let mut outbox = Outbox::default();
        let mut s = socket(1);
        outbox.push(Bytes::from_static(b"abc"), &mut s);
        outbox.enqueue(Bytes::from_static(b"def"));
        outbox.drop_unstarted();
        assert_eq!(outbox.queued(), 2, "the rest of the started frame");
        s.room = 100;
        outbox.flush(&mut s);
        assert_eq!(s.taken, b"abc");
    }

    #[test]
    fn a_failed_socket_is_reported() {
        let mut outbox = Outbox::default();
        let mut s = socket(0);
        s.fail = true;
        assert_eq!(outbox.push(Bytes::from_static(b"x"), &mut s), Push::Broken);
        outbox.enqueue(Bytes::from_static(b"y"));
        assert_eq!(outbox.flush(&mut s), Flush::Broken);
        assert!(outbox.is_empty());
    }
}
