//! A topic's recent publications, kept as their already-encoded frames for exact resume and
//! as raw JSON for polling.
//!
//! The ring is bounded by count and by age. Time is an argument (`now: Instant`), never read
//! here, so eviction is tested without sleeping and the caller decides when to look at the
//! clock (once per publication, or on a sweep).

use std::collections::VecDeque;
use std::collections::vec_deque;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::filter::EventFields;
use super::version::{Epoch, Version};

/// Default for [`HistoryLimits::max_len`]: a reconnecting client typically misses seconds of
/// traffic; 1,024 entries of ~1 KiB frames cost about 2 MiB per busy topic (frame plus data).
pub const DEFAULT_HISTORY_LEN: usize = 1024;

/// Default for [`HistoryLimits::max_age`]: long enough to ride out a network change or a
/// laptop lid, short enough that a quiet topic does not hold stale frames for hours.
pub const DEFAULT_HISTORY_AGE: Duration = Duration::from_secs(300);

/// Default for [`HistoryLimits::max_bytes`]: 1,024 events of 8 KiB.
pub const DEFAULT_HISTORY_BYTES: usize = 8 * 1024 * 1024;

/// How much history a topic keeps. Whichever bound is reached first evicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Most entries kept. Memory per topic is about `max_len` × (frame + data) bytes; a
    /// client that misses more than this gets `history_truncated` (events) or a snapshot
    /// (state). 0 keeps no history at all.
    pub max_len: usize,
    /// Oldest entry kept. Bounds how long a disconnected client can resume exactly.
    pub max_age: Duration,
    /// Most bytes kept (each entry's [`Entry::cost`]). Bounds a topic of large events the
    /// way `max_len` bounds a topic of many small ones.
    pub max_bytes: usize,
}

impl Default for HistoryLimits {
    fn default() -> HistoryLimits {
        HistoryLimits {
            max_len: DEFAULT_HISTORY_LEN,
            max_age: DEFAULT_HISTORY_AGE,
            max_bytes: DEFAULT_HISTORY_BYTES,
        }
    }
}

/// One publication kept in history.
#[derive(Debug)]
pub struct Entry {
    /// The publication's offset within the history's epoch.
    pub offset: u64,
    /// The publication's WebSocket frame (`event` or `change`), shared with live subscribers.
    pub frame: Bytes,
    /// The raw JSON published (the event's data, or a change's diff), for polling and SSE.
    pub data: Bytes,
    /// When it was published, for age eviction.
    pub at: Instant,
    /// Top-level fields of `data`, extracted at most once, on first use by a filter.
    fields: OnceLock<EventFields>,
    /// Bytes this entry keeps alive (see [`Entry::cost`]).
    cost: usize,
}

impl Entry {
    /// An entry for publication `offset`.
    pub fn new(offset: u64, frame: Bytes, data: Bytes, at: Instant) -> Entry {
        let (f, d) = (frame.as_ptr_range(), data.as_ptr_range());
        // An event's data is a slice of its frame: its bytes are counted once.
        let shared = f.start <= d.start && d.end <= f.end;
        let cost = std::mem::size_of::<Entry>() + frame.len() + if shared { 0 } else { data.len() };
        Entry {
            offset,
            frame,
            data,
            at,
            fields: OnceLock::new(),
            cost,
        }
    }

    /// Bytes this entry keeps alive: itself, its frame, and its data unless that is a slice
    /// of the frame. History bounds and budgets are counted in this.
    pub fn cost(&self) -> usize {
        self.cost
    }

    /// The top-level scalar fields of `data`, parsed on the first call only: a replay to many
    /// filtered subscribers parses each entry once, and unfiltered topics never parse.
    pub fn fields(&self) -> &EventFields {
        self.fields.get_or_init(|| EventFields::parse(&self.data))
    }
}

/// The answer to "what happened after offset N?".
#[derive(Debug, Clone)]
pub enum Since<'a> {
    /// History reaches back far enough: exactly the entries after the offset, in order
    /// (possibly none).
    Replay(vec_deque::Iter<'a, Entry>),
    /// History no longer reaches back to the offset after the one asked for, or the version
    /// was from another epoch: `entries` is what history has, starting at `first_available`.
    Truncated {
        /// The oldest offset history can still deliver (`last + 1` when history is empty).
        first_available: u64,
        /// Everything history has, in order.
        entries: vec_deque::Iter<'a, Entry>,
    },
    /// The offset asked for lies after the last publication: the client's version did not
    /// come from this history. Treat as truncated (fresh snapshot / `history_truncated`).
    Ahead {
        /// The last offset published in this history.
        last: u64,
    },
}

impl<'a> Since<'a> {
    /// Whether the entries delivered are exactly the ones missed.
    pub fn is_exact(&self) -> bool {
        matches!(self, Since::Replay(_))
    }

    /// The entries to deliver (none when [`Since::Ahead`]).
    pub fn entries(&self) -> vec_deque::Iter<'a, Entry> {
        match self {
            Since::Replay(entries) | Since::Truncated { entries, .. } => entries.clone(),
            Since::Ahead { .. } => vec_deque::Iter::default(),
        }
    }
}

/// One page of a polling request (see [`History::page`]).
#[derive(Debug, Clone)]
pub struct Page<'a> {
    /// At most `limit` entries after the requested offset, in order.
    pub entries: vec_deque::Iter<'a, Entry>,
    /// `Some(first_available)` when history no longer reached back to `since + 1` (the
    /// poller missed entries), `None` when the page continues exactly from `since`.
    pub truncated: Option<u64>,
    /// The offset to poll with next: the last entry returned, or, when nothing is returned,
    /// the last offset history knows (never behind `since` unless `since` was ahead).
    pub next_since: u64,
    /// Whether more entries were available than `limit` allowed.
    pub more: bool,
}

/// Why [`History::push`] refused an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// Offsets must strictly increase; replaying in order depends on it.
    #[error("offset {offset} is not after the last offset {last}")]
    OutOfOrder {
        /// The offset refused.
        offset: u64,
        /// The last offset accepted.
        last: u64,
    },
}

/// A topic's recent publications, oldest first, with strictly increasing offsets.
#[derive(Debug)]
pub struct History {
    epoch: Epoch,
    limits: HistoryLimits,
    entries: VecDeque<Entry>,
    /// The last offset ever pushed, kept when its entry is evicted.
    last: u64,
    /// The highest offset no longer held (evicted, or before this history started): a
    /// client that saw at least this much can be served exactly, even across offset gaps.
    evicted_through: u64,
    /// Sum of the entries' costs.
    bytes: usize,
}

impl History {
    /// An empty history of `epoch` whose last offset is 0 (nothing published yet).
    pub fn new(epoch: Epoch, limits: HistoryLimits) -> History {
        History::starting_after(epoch, 0, limits)
    }

    /// An empty history of `epoch` that continues after `last` (a state document restored at
    /// a known version, or a node joining a shared topic): nothing at or before `last` can be
    /// replayed from it.
    pub fn starting_after(epoch: Epoch, last: u64, limits: HistoryLimits) -> History {
        History {
            epoch,
            limits,
            entries: VecDeque::new(),
            last,
            evicted_through: last,
            bytes: 0,
        }
    }

    /// The epoch of this history.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The limits in force.
    pub fn limits(&self) -> HistoryLimits {
        self.limits
    }

    /// The last offset pushed (0 before the first publication).
    pub fn last_offset(&self) -> u64 {
        self.last
    }

    /// The version of the last publication.
    pub fn version(&self) -> Version {
        Version::new(self.epoch, self.last)
    }

    /// The oldest offset history can deliver; `last_offset() + 1` when it holds nothing.
    pub fn first_available(&self) -> u64 {
        self.entries
            .front()
            .map_or(self.last.saturating_add(1), |e| e.offset)
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes held: the sum of the entries' [`Entry::cost`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether history holds no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry held, oldest first.
    pub fn iter(&self) -> vec_deque::Iter<'_, Entry> {
        self.entries.iter()
    }

    /// Appends a publication, then evicts what `now` and the limits say is too old or too
    /// many. The entry is refused unless its offset is after the last one.
    pub fn push(&mut self, entry: Entry, now: Instant) -> Result<(), PushError> {
        if entry.offset <= self.last {
            return Err(PushError::OutOfOrder {
                offset: entry.offset,
                last: self.last,
            });
        }
        self.last = entry.offset;
        self.bytes += entry.cost;
        self.entries.push_back(entry);
        self.evict(now);
        Ok(())
    }

    /// Drops entries beyond `max_len` and entries older than `max_age` at `now`; returns how
    /// many were dropped. Call it from a periodic sweep too, so a topic that went quiet does
    /// not hold its last burst forever.
    pub fn evict(&mut self, now: Instant) -> usize {
        let excess = self.entries.len().saturating_sub(self.limits.max_len);
        let max_age = self.limits.max_age;
        // Entries are in publication order, so the old ones are a prefix: counted from the
        // front, which touches one entry when none is old (the case on every push).
        let old = self
            .entries
            .iter()
            .take_while(|e| now.saturating_duration_since(e.at) > max_age)
            .count();
        let mut n = excess.max(old);
        let mut bytes = self.bytes - self.entries.range(..n).map(|e| e.cost).sum::<usize>();
        while bytes > self.limits.max_bytes
            && let Some(entry) = self.entries.get(n)
        {
            bytes -= entry.cost;
            n += 1;
        }
        self.drop_front(n)
    }

    /// Drops every entry at or before `offset` (a shared memory budget needs room); returns
    /// how many were dropped.
    pub fn evict_through(&mut self, offset: u64) -> usize {
        // Counted from the front: the budget evicts one entry at a time, the oldest.
        let n = self
            .entries
            .iter()
            .take_while(|e| e.offset <= offset)
            .count();
        self.drop_front(n)
    }

    fn drop_front(&mut self, n: usize) -> usize {
        if let Some(newest_dropped) = n.checked_sub(1).and_then(|i| self.entries.get(i)) {
            self.evicted_through = newest_dropped.offset;
        }
        for entry in self.entries.drain(..n) {
            self.bytes -= entry.cost;
        }
        n
    }

    /// Exactly the entries after `offset`, in order, if history still reaches back to
    /// `offset + 1`; otherwise what it has, marked truncated.
    pub fn since(&self, offset: u64) -> Since<'_> {
        if offset > self.last {
            return Since::Ahead { last: self.last };
        }
        // Offsets may have gaps (never published), so "reaches back" is not "the oldest entry
        // is offset + 1" but "nothing after `offset` has been evicted".
        if offset >= self.evicted_through {
            let start = self.entries.partition_point(|e| e.offset <= offset);
            Since::Replay(self.entries.range(start..))
        } else {
            Since::Truncated {
                first_available: self.first_available(),
                entries: self.entries.iter(),
            }
        }
    }

    /// As [`History::since`] for a client's full version: a version from another epoch is
    /// truncated (the client's history is gone), whatever its offset.
    pub fn resume(&self, version: Version) -> Since<'_> {
        if version.epoch != self.epoch {
            return Since::Truncated {
                first_available: self.first_available(),
                entries: self.entries.iter(),
            };
        }
        self.since(version.offset)
    }

    /// A page of at most `limit` entries after `since`, for the polling endpoint, whose
    /// data adds up to at most `max_bytes` (but at least one entry, whatever its size).
    pub fn page(&self, since: u64, limit: usize, max_bytes: usize) -> Page<'_> {
        let (all, truncated) = match self.since(since) {
            Since::Replay(entries) => (entries, None),
            Since::Truncated {
                first_available,
                entries,
            } => (entries, Some(first_available)),
            Since::Ahead { last } => {
                return Page {
                    entries: vec_deque::Iter::default(),
                    truncated: Some(last.saturating_add(1)),
                    next_since: last,
                    more: false,
                };
            }
        };
        let mut take = 0;
        let mut bytes = 0usize;
        for entry in all.clone().take(limit) {
            bytes += entry.data.len();
            if take > 0 && bytes > max_bytes {
                break;
            }
            take += 1;
        }
        let more = all.len() > take;
        let skip = self.entries.len() - all.len();
        let entries = self.entries.range(skip..skip + take);
        let next_since = entries.clone().next_back().map_or(
            // Nothing returned: either up to date (since == last), or truncated with nothing
            // held, where continuing from `last` avoids reporting the same loss forever.
            if truncated.is_some() {
                self.last
            } else {
                since
            },
            |e| e.offset,
        );
        Page {
            entries,
            truncated,
            next_since,
            more,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u64, at: Instant) -> Entry {
        let data = Bytes::from(format!(r#"{{"n":{offset}}}"#));
        let frame = Bytes::from(format!("frame {offset}"));
        Entry::new(offset, frame, data, at)
    }

    fn offsets<'a>(entries: impl Iterator<Item = &'a Entry>) -> Vec<u64> {
        entries.map(|e| e.offset).collect()
    }

    fn filled(limits: HistoryLimits, n: u64, t0: Instant) -> History {
        let mut h = History::new(Epoch::from_u64(7), limits);
        for o in 1..=n {
            h.push(entry(o, t0), t0).unwrap();
        }
        h
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn since_replays_exactly_the_missing_entries() {
        let t0 = Instant::now();
        let h = filled(
            HistoryLimits {
                max_len: 100,
                max_age: LONG,
                max_bytes: usize::MAX,
            },
            60,
            t0,
        );
        match h.since(10) {
            Since::Replay(entries) => assert_eq!(offsets(entries), (11..=60).collect::<Vec<_>>()),
            other => panic!("{other:?}"),
        }
        assert!(h.since(0).is_exact());
        assert_eq!(h.since(0).entries().len(), 60);
        assert_eq!(h.since(60).entries().len(), 0);
        assert!(h.since(60).is_exact());
        assert!(matches!(h.since(61), Since::Ahead { last: 60 }));
    }

    #[test]
    fn truncation_is_reported_when_due() {
        let t0 = Instant::now();
        let h = filled(
            HistoryLimits {
                max_len: 10,
                max_age: LONG,
                max_bytes: usize::MAX,
            },
            60,
            t0,
        );
        assert_eq!(h.len(), 10);
        assert_eq!(h.first_available(), 51);
        // 50 was seen: 51.. is all there, exactly.
        assert_eq!(
            offsets(h.since(50).entries()),
            (51..=60).collect::<Vec<_>>()
        );
        assert!(h.since(50).is_exact());
        // 49 was seen: 50 is gone.
        match h.since(49) {
            Since::Truncated {
                first_available,
                entries,
            } => {
                assert_eq!(first_available, 51);
                assert_eq!(offsets(entries), (51..=60).collect::<Vec<_>>());
            }
            other => panic!("{other:?}"),
        }
        assert!(!h.since(0).is_exact());
    }

    #[test]
    fn empty_history() {
        let h = History::new(Epoch::from_u64(1), HistoryLimits::default());
        assert!(h.since(0).is_exact());
        assert_eq!(h.first_available(), 1);
        assert!(matches!(h.since(1), Since::Ahead { last: 0 }));

        let none = HistoryLimits {
            max_len: 0,
            max_age: LONG,
            max_bytes: usize::MAX,
        };
        let t0 = Instant::now();
        let h = filled(none, 5, t0);
        assert!(h.is_empty());
        assert_eq!(h.last_offset(), 5);
        assert!(h.since(5).is_exact());
        match h.since(4) {
            Since::Truncated {
                first_available,
                entries,
            } => assert_eq!((first_available, entries.len()), (6, 0)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn resume_checks_the_epoch() {
        let t0 = Instant::now();
        let h = filled(HistoryLimits::default(), 5, t0);
        assert_eq!(h.version(), Version::new(Epoch::from_u64(7), 5));
        assert!(h.resume(Version::new(Epoch::from_u64(7), 2)).is_exact());
        match h.resume(Version::new(Epoch::from_u64(8), 2)) {
            Since::Truncated {
                first_available,
                entries,
            } => assert_eq!((first_available, entries.len()), (1, 5)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn push_refuses_out_of_order() {
        let t0 = Instant::now();
        let mut h = filled(HistoryLimits::default(), 3, t0);
        assert_eq!(
            h.push(entry(3, t0), t0),
            Err(PushError::OutOfOrder { offset: 3, last: 3 })
        );
        assert_eq!(h.len(), 3);
        // Gaps are allowed; they were never published.
        h.push(entry(10, t0), t0).unwrap();
        assert_eq!(offsets(h.since(3).entries()), vec![10]);
        // A gap right after the resume point is not a loss.
        let one = HistoryLimits {
            max_len: 1,
            max_age: LONG,
            max_bytes: usize::MAX,
        };
        let mut h = History::new(Epoch::from_u64(1), one);
        h.push(entry(1, t0), t0).unwrap();
        h.push(entry(3, t0), t0).unwrap();
        assert_eq!(h.first_available(), 3);
        assert!(h.since(1).is_exact());
        assert!(!h.since(0).is_exact());
    }

    #[test]
    fn age_eviction_with_an_injected_clock() {
        let t0 = Instant::now();
        let sec = Duration::from_secs(1);
        let limits = HistoryLimits {
            max_len: 100,
            max_age: Duration::from_secs(10),
            max_bytes: usize::MAX,
        };
        let mut h = History::new(Epoch::from_u64(1), limits);
        for o in 1..=20u64 {
            h.push(entry(o, t0 + sec * o as u32), t0 + sec * o as u32)
                .unwrap();
        }
        // At t0+20 s, entries published at t0+10 s and later are at most 10 s old.
        assert_eq!(h.first_available(), 10);
        assert_eq!(h.evict(t0 + sec * 25), 5);
        assert_eq!(h.first_available(), 15);
        assert!(h.since(14).is_exact());
        assert!(!h.since(13).is_exact());
        // A quiet topic empties, but remembers its last offset.
        assert_eq!(h.evict(t0 + sec * 1000), 6);
        assert!(h.is_empty());
        assert_eq!(h.last_offset(), 20);
        assert!(h.since(20).is_exact());
        assert!(!h.since(19).is_exact());
        // A clock that went backwards (an `Instant` from before the entries) evicts nothing.
        h.push(entry(21, t0 + sec * 1000), t0 + sec * 1000).unwrap();
        assert_eq!(h.evict(t0), 0);
    }

    #[test]
    fn pages_for_polling() {
        let t0 = Instant::now();
        let h = filled(
            HistoryLimits {
                max_len: 10,
                max_age: LONG,
                max_bytes: usize::MAX,
            },
            30,
            t0,
        );
        let p = h.page(22, 3, usize::MAX);
        assert_eq!(offsets(p.entries), vec![23, 24, 25]);
        assert_eq!((p.truncated, p.next_since, p.more), (None, 25, true));
        let p = h.page(27, 3, usize::MAX);
        assert_eq!(offsets(p.entries), vec![28, 29, 30]);
        assert_eq!((p.truncated, p.next_since, p.more), (None, 30, false));
        let p = h.page(30, 3, usize::MAX);
        assert_eq!(p.entries.len(), 0);
        assert_eq!((p.truncated, p.next_since, p.more), (None, 30, false));
        let p = h.page(5, 4, usize::MAX);
        assert_eq!(offsets(p.entries), vec![21, 22, 23, 24]);
        assert_eq!((p.truncated, p.next_since, p.more), (Some(21), 24, true));
        let p = h.page(99, 4, usize::MAX);
        assert_eq!(
            (p.truncated, p.next_since, p.entries.len()),
            (Some(31), 30, 0)
        );
        assert_eq!(h.page(0, 0, usize::MAX).next_since, 30);
    }

    #[test]
    fn entry_fields_are_parsed_once() {
        let e = entry(1, Instant::now());
        let a: *const EventFields = e.fields();
        let b: *const EventFields = e.fields();
        assert_eq!(a, b);
    }

    proptest::proptest! {
        /// For any sequence of pushes with offset gaps, evictions and a resume point, `since`
        /// returns exactly the published offsets after it when they are all still held, and
        /// reports truncation exactly when one of them was evicted.
        #[test]
        fn since_is_exact(
            steps in proptest::collection::vec((1u64..4, 0u64..3), 0..80),
            max_len in 0usize..20,
            max_age in 1u64..30,
            query in 0u64..300,
        ) {
            let t0 = Instant::now();
            let limits = HistoryLimits { max_len, max_age: Duration::from_secs(max_age), max_bytes: usize::MAX };
            let mut h = History::new(Epoch::from_u64(1), limits);
            let mut published = Vec::new();
            let (mut offset, mut secs) = (0u64, 0u64);
            for (gap, dt) in steps {
                offset += gap;
                secs += dt;
                let now = t0 + Duration::from_secs(secs);
                h.push(entry(offset, now), now).unwrap();
                published.push((offset, secs));
            }
            let missed: Vec<u64> = published.iter().map(|p| p.0).filter(|&o| o > query).collect();
            let kept: Vec<u64> = published
                .iter()
                .rev()
                .take(max_len)
                .filter(|p| secs - p.1 <= max_age)
                .map(|p| p.0)
                .rev()
                .collect();
            proptest::prop_assert_eq!(offsets(h.iter()), kept.clone());
            match h.since(query) {
                Since::Replay(entries) => {
                    proptest::prop_assert_eq!(offsets(entries), missed);
                }
                Since::Truncated { first_available, entries } => {
                    proptest::prop_assert!(missed.iter().any(|o| !kept.contains(o)));
                    proptest::prop_assert_eq!(offsets(entries), kept);
                    proptest::prop_assert!(first_available > query + 1);
                }
                Since::Ahead { last } => {
                    proptest::prop_assert!(query > last && missed.is_empty());
                }
            }
        }
    }

    #[test]
    fn bytes_bound_history_and_pages() {
        let t0 = Instant::now();
        let mut h = History::new(
            Epoch::from_u64(7),
            HistoryLimits {
                max_len: 1000,
                max_age: LONG,
                max_bytes: 10_000,
            },
        );
        let big = |o: u64| {
            let frame = Bytes::from(vec![b'x'; 3000]);
            let data = frame.slice(100..2900);
            Entry::new(o, frame, data, t0)
        };
        for o in 1..=10 {
            h.push(big(o), t0).unwrap();
        }
        // Each entry costs its frame (the data is a slice of it) plus the entry itself.
        let cost = 3000 + std::mem::size_of::<Entry>();
        assert_eq!(h.iter().next().unwrap().cost(), cost);
        assert_eq!(h.len(), 10_000 / cost);
        assert_eq!(h.bytes(), h.len() * cost);
        assert!(
            !h.since(0).is_exact(),
            "evicted by bytes, reported as truncated"
        );
        let held = h.len();
        assert_eq!(h.evict_through(8), held - 2);
        assert_eq!(h.first_available(), 9);
        assert_eq!(h.bytes(), 2 * cost);

        // A page stops at max_bytes of data, but always returns one entry.
        let mut h = filled(
            HistoryLimits {
                max_len: 100,
                max_age: LONG,
                max_bytes: usize::MAX,
            },
            0,
            t0,
        );
        for o in 1..=5 {
            h.push(big(o), t0).unwrap();
        }
        let p = h.page(0, 100, 6000);
        assert_eq!(offsets(p.entries), vec![1, 2]);
        assert!(p.more);
        assert_eq!(p.next_since, 2);
        let p = h.page(2, 100, 10);
        assert_eq!(offsets(p.entries), vec![3]);
        assert!(p.more);
    }
}
