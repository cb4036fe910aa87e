//! Publisher back-pressure: the bounded queues between publishers and the shards.
//!
//! A publication takes a [`Ticket`] before it is sequenced: room for its bytes in the
//! gateway-wide `publish_queue_bytes`, and one of its topic's `topic_queue_len` places. The
//! ticket travels with the publication to every shard and is given back when the last shard
//! has written it out, so what the queues hold is bounded in bytes (frames are shared, so
//! the bytes are counted once however many shards hold them) and a flooded topic is refused
//! long before it can crowd out the others. A publisher that finds no room waits up to
//! `publish_wait` and is then refused with `overloaded`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::topics::Topic;

/// Bytes a publication's jobs cost beyond its frame, per shard: the job, the entry in the
/// shard's queue, and the publication's fields.
pub const JOB_OVERHEAD: usize = 128;

/// The gateway-wide queue bound and the publishers waiting on it.
#[derive(Debug)]
pub struct Backlog {
    bytes: AtomicUsize,
    limit: usize,
    topic_limit: usize,
    /// Publishers waiting for room; releases notify only while there are some.
    waiters: AtomicUsize,
    freed: tokio::sync::Notify,
    lock: Mutex<()>,
    freed_sync: Condvar,
}

/// A publication's place in the queues; dropping it gives the place back.
#[derive(Debug)]
pub struct Ticket {
    backlog: Arc<Backlog>,
    topic: Arc<Topic>,
    bytes: AtomicUsize,
}

impl Backlog {
    /// Queues of at most `limit` bytes in all and `topic_limit` publications per topic.
    pub fn new(limit: usize, topic_limit: usize) -> Arc<Backlog> {
        Arc::new(Backlog {
            bytes: AtomicUsize::new(0),
            limit,
            topic_limit,
            waiters: AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
            lock: Mutex::new(()),
            freed_sync: Condvar::new(),
        })
    }

    /// Bytes queued now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// A ticket for `bytes` on `topic` if both queues have room now. An empty gateway queue
    /// takes any one publication, however large, so nothing is refused for ever.
    pub fn try_admit(self: &Arc<Self>, topic: &Arc<Topic>, bytes: usize) -> Option<Ticket> {
        let limit = self.topic_limit;
        topic
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        let taken = self
            .bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                (b == 0 || b.saturating_add(bytes) <= self.limit).then_some(b + bytes)
            });
        if taken.is_err() {
            topic.queued.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(self.ticket(topic, bytes))
    }

    /// A ticket whatever the queues hold: for a topic's close, which is sent once and must
    /// never be refused.
    pub fn admit_always(self: &Arc<Self>, topic: &Arc<Topic>, bytes: usize) -> Ticket {
        topic.queued.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        self.ticket(topic, bytes)
    }

    fn ticket(self: &Arc<Self>, topic: &Arc<Topic>, bytes: usize) -> Ticket {
        Ticket {
            backlog: self.clone(),
            topic: topic.clone(),
            bytes: AtomicUsize::new(bytes),
        }
    }

    /// Waits up to `wait` for a ticket, blocking the calling thread.
    pub fn admit_blocking(
        self: &Arc<Self>,
        topic: &Arc<Topic>,
        bytes: usize,
        wait: Duration,
    ) -> Option<Ticket> {
        if let Some(ticket) = self.try_admit(topic, bytes) {
            return Some(ticket);
        }
        let deadline = Instant::now() + wait;
        let mut guard = self.lock.lock();
        let _waiting = Waiting::new(&self.waiters);
        loop {
            // Checked under the lock a release notifies under, so no wake-up is lost.
            if let Some(ticket) = self.try_admit(topic, bytes) {
                break Some(ticket);
            }
            if self.freed_sync.wait_until(&mut guard, deadline).timed_out() {
                return self.try_admit(topic, bytes);
            }
        }
    }

    /// Waits up to `wait` for a ticket without blocking the thread.
    pub async fn admit(
        self: &Arc<Self>,
        topic: &Arc<Topic>,
        bytes: usize,
        wait: Duration,
    ) -> Option<Ticket> {
        if let Some(ticket) = self.try_admit(topic, bytes) {
            return Some(ticket);
        }
        let deadline = tokio::time::Instant::now() + wait;
        // Counted out again however the wait ends, even if the caller drops this future.
        let _waiting = Waiting::new(&self.waiters);
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(ticket) = self.try_admit(topic, bytes) {
                break Some(ticket);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return self.try_admit(topic, bytes);
            }
        }
    }

    fn notify(&self) {
        // SeqCst, with the waiter's count and the releaser's bytes: either the waiter sees
        // the room, or the releaser sees the waiter.
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.freed.notify_waiters();
            let _guard = self.lock.lock();
            self.freed_sync.notify_all();
        }
    }
}

/// One publisher counted among the waiters while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(waiters: &'a AtomicUsize) -> Waiting<'a> {
        waiters.fetch_add(1, Ordering::SeqCst);
        Waiting(waiters)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ticket {
    /// Corrects the bytes held once the frame is encoded (a state change's diff is only
    /// known then). Never waits: the publication is already sequenced.
    pub fn settle(&self, bytes: usize) {
        let before = self.bytes.swap(bytes, Ordering::AcqRel);
        if bytes >= before {
            self.backlog
                .bytes
                .fetch_add(bytes - before, Ordering::SeqCst);
        } else {
            self.backlog
                .bytes
                .fetch_sub(before - bytes, Ordering::SeqCst);
            self.backlog.notify();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.backlog
            .bytes
            .fetch_sub(self.bytes.load(Ordering::Acquire), Ordering::SeqCst);
        self.topic.queued.fetch_sub(1, Ordering::AcqRel);
        self.backlog.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::topics::{TopicLimits, Topics};

    fn topic(topics: &Topics, name: &str) -> Arc<Topic> {
        topics.get_or_create(name, || {}).expect("room for a topic")
    }

    #[test]
    fn bounds_bytes_overall_and_publications_per_topic() {
        let topics = Topics::new(TopicLimits::default());
        let (a, b) = (topic(&topics, "q:a"), topic(&topics, "q:b"));
        let backlog = Backlog::new(1000, 2);
        // An empty queue takes one publication of any size.
        let huge = backlog.try_admit(&a, 5000).expect("first always fits");
        assert!(backlog.try_admit(&b, 1).is_none(), "over the byte bound");
        drop(huge);
        assert_eq!(backlog.bytes(), 0);
        let t1 = backlog.try_admit(&a, 100).expect("room");
        let _t2 = backlog.try_admit(&a, 100).expect("room");
        assert!(backlog.try_admit(&a, 100).is_none(), "a has its 2 places");
        let tb = backlog.try_admit(&b, 100).expect("b is not held up by a");
        assert_eq!(a.queued.load(Ordering::Acquire), 2);
        tb.settle(300);
        assert_eq!(backlog.bytes(), 500);
        drop(tb);
        drop(t1);
        assert_eq!(backlog.bytes(), 100);
        assert_eq!(a.queued.load(Ordering::Acquire), 1);
        // A close always gets through.
        let _close = backlog.admit_always(&a, 5000);
        assert_eq!(a.queued.load(Ordering::Acquire), 2);
    }

    #[test]
    fn a_blocking_publisher_waits_for_room_then_gives_up() {
        let topics = Topics::new(TopicLimits::default());
        let a = topic(&topics, "q:a");
        let backlog = Backlog::new(100, 1);
        let held = backlog.try_admit(&a, 10).expect("room");
        assert!(
            backlog
                .admit_blocking(&a, 10, Duration::from_millis(20))
                .is_none(),
            "no room came within the wait"
        );
        let waiter = {
            let (backlog, a) = (backlog.clone(), a.clone());
            std::thread::spawn(move || {
                backlog
                    .admit_blocking(&a, 10, Duration::from_secs(30))
                    .is_some()
            })
        };
        // Released while the other thread waits (or before it starts: either way it gets in).
        drop(held);
        assert!(waiter.join().expect("waiter"), "woken by the release");
    }

    #[tokio::test]
    async fn an_async_publisher_is_woken_by_a_release() {
        let topics = Topics::new(TopicLimits::default());
        let a = topic(&topics, "q:a");
        let backlog = Backlog::new(100, 1);
        let held = backlog.try_admit(&a, 10).expect("room");
        assert!(
            backlog
                .admit(&a, 10, Duration::from_millis(20))
                .await
                .is_none()
        );
        let waiter = {
            let (backlog, a) = (backlog.clone(), a.clone());
            tokio::spawn(async move {
                backlog
                    .admit(&a, 10, Duration::from_secs(30))
                    .await
                    .is_some()
            })
        };
        drop(held);
        assert!(waiter.await.expect("waiter"));
    }

    #[tokio::test]
    async fn a_cancelled_wait_is_no_longer_counted_as_waiting() {
        let topics = Topics::new(TopicLimits::default());
        let a = topic(&topics, "q:a");
        let backlog = Backlog::new(100, 1);
        let _held = backlog.try_admit(&a, 10).expect("room");
        let waiter = {
            let (backlog, a) = (backlog.clone(), a.clone());
            tokio::spawn(async move { backlog.admit(&a, 10, Duration::from_secs(30)).await })
        };
        while backlog.waiters.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // The publisher's request is dropped mid-wait (its client went away).
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(backlog.waiters.load(Ordering::SeqCst), 0);
    }
}
