//! Exact delivery checking for the `flood` scenario, as plain functions over offsets:
//! sets of offsets as sorted inclusive ranges, what one subscriber received, the version a
//! 1013 close names, and the verdict (complete, closed 1013 after a gapless prefix, or a
//! violation).
//!
//! A subscriber receives one topic's offsets in increasing order, so what it received is
//! a handful of ranges however many publications there were.

use serde::{Deserialize, Serialize};

/// The prefix of the gateway's 1013 close reason, before the topic.
const SLOW_PREFIX: &str = "slow consumer; last queued ";

/// The suffix of the gateway's 1013 close reason, after the version.
const SLOW_SUFFIX: &str = "; resume with since";

/// How many violations a worker describes in words (the rest are only counted).
pub const MAX_EXAMPLES: usize = 5;

/// A set of offsets as sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ranges(pub Vec<(u64, u64)>);

impl Ranges {
    /// The set of `offsets` (any order, duplicates ignored).
    pub fn from_offsets(mut offsets: Vec<u64>) -> Ranges {
        offsets.sort_unstable();
        offsets.dedup();
        let mut r = Ranges::default();
        for o in offsets {
            r.push(o);
        }
        r
    }

    /// Adds `offset` if it is above every offset held; returns false (and adds nothing)
    /// otherwise, i.e. for a duplicate or an offset that arrived out of order.
    pub fn push(&mut self, offset: u64) -> bool {
        match self.0.last_mut() {
            Some((_, hi)) if offset <= *hi => false,
            Some((_, hi)) if offset == *hi + 1 => {
                *hi = offset;
                true
            }
            _ => {
                self.0.push((offset, offset));
                true
            }
        }
    }

    /// Number of offsets in the set.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|(lo, hi)| hi - lo + 1).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Offsets of `self` that are at most `bound`, as a new set.
    pub fn up_to(&self, bound: u64) -> Ranges {
        Ranges(
            self.0
                .iter()
                .filter(|(lo, _)| *lo <= bound)
                .map(|&(lo, hi)| (lo, hi.min(bound)))
                .collect(),
        )
    }

    /// Number of offsets in both sets (a two-pointer walk over the ranges).
    pub fn common(&self, other: &Ranges) -> u64 {
        let (a, b) = (&self.0, &other.0);
        let (mut i, mut j, mut n) = (0, 0, 0);
        while i < a.len() && j < b.len() {
            let lo = a[i].0.max(b[j].0);
            let hi = a[i].1.min(b[j].1);
            if lo <= hi {
                n += hi - lo + 1;
            }
            if a[i].1 < b[j].1 { i += 1 } else { j += 1 }
        }
        n
    }

    /// The smallest offset of `self` that `other` lacks.
    pub fn first_missing_from(&self, other: &Ranges) -> Option<u64> {
        let mut j = 0;
        for &(lo, hi) in &self.0 {
            let mut next = lo;
            while next <= hi {
                while j < other.0.len() && other.0[j].1 < next {
                    j += 1;
                }
                match other.0.get(j) {
                    Some(&(olo, ohi)) if olo <= next => next = ohi.saturating_add(1),
                    _ => return Some(next),
                }
            }
        }
        None
    }
}

/// The version a 1013 close reason names: `slow consumer; last queued <topic>
/// <epoch>:<offset>; resume with since`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Named {
    /// The topic.
    pub topic: String,
    /// The topic's epoch (16 hex digits).
    pub epoch: String,
    /// The last offset queued for the connection.
    pub offset: u64,
}

/// Parses a 1013 close reason; `None` if it does not name a version.
pub fn parse_slow_reason(reason: &[u8]) -> Option<Named> {
    let text = std::str::from_utf8(reason).ok()?;
    let rest = text.strip_prefix(SLOW_PREFIX)?.strip_suffix(SLOW_SUFFIX)?;
    let (topic, version) = rest.rsplit_once(' ')?;
    let (epoch, offset) = version.split_once(':')?;
    let hex = !epoch.is_empty() && epoch.bytes().all(|b| b.is_ascii_hexdigit());
    (hex && !topic.is_empty()).then_some(())?;
    Some(Named {
        topic: topic.to_string(),
        epoch: epoch.to_string(),
        offset: offset.parse().ok()?,
    })
}

/// The epoch of an event's `"version":"<epoch>:<offset>"`, if it carries one.
pub fn event_epoch(text: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b"\"version\":\"";
    let start = memchr::memmem::find(text, KEY)? + KEY.len();
    let len = memchr::memchr(b':', &text[start..])?;
    Some(&text[start..start + len])
}

/// What one reading subscriber of the flood topic received.
#[derive(Debug, Clone, Default)]
pub struct OffsetLog {
    /// Offsets received, in arrival order (out-of-order ones count as duplicates).
    pub received: Ranges,
    /// Events whose offset was not above the last one received.
    pub duplicates: u64,
    /// The epoch of the first event's version.
    pub epoch: Option<String>,
}

impl OffsetLog {
    /// Records one event.
    pub fn record(&mut self, offset: u64, text: &[u8]) {
        if !self.received.push(offset) {
            self.duplicates += 1;
        }
        if self.epoch.is_none() {
            self.epoch = event_epoch(text).map(|e| String::from_utf8_lossy(e).into_owned());
        }
    }
}

/// How a reading subscriber ended, as far as the check cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Still open, or ended by anything other than a 1013 close (labelled).
    Other(String),
    /// Close 1013 with this reason.
    Slow(Vec<u8>),
}

/// The verdict on one reading subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every accepted offset, once, in order.
    Complete,
    /// Close 1013 naming `offset`, with every accepted offset up to it, once.
    Slow {
        /// The offset the close named.
        offset: u64,
    },
    /// Neither: what is wrong.
    Violation(String),
}

/// Judges a subscriber of `topic` against the `accepted` offsets (those with a 202).
pub fn judge(log: &OffsetLog, ending: &Ending, topic: &str, accepted: &Ranges) -> Verdict {
    if log.duplicates > 0 {
        return Verdict::Violation(format!("{} duplicate or out-of-order", log.duplicates));
    }
    match ending {
        Ending::Slow(reason) => {
            let Some(named) = parse_slow_reason(reason) else {
                let text = String::from_utf8_lossy(reason);
                return Verdict::Violation(format!("1013 without a version: {text:?}"));
            };
            if named.topic != topic {
                return Verdict::Violation(format!("1013 names topic {}", named.topic));
            }
            if let Some(epoch) = log.epoch.as_deref().filter(|e| *e != named.epoch) {
                return Verdict::Violation(format!(
                    "1013 names epoch {}, events had {epoch}",
                    named.epoch
                ));
            }
            let want = accepted.up_to(named.offset);
            match gap(&want, &log.received) {
                None => Verdict::Slow {
                    offset: named.offset,
                },
                Some(g) => Verdict::Violation(format!("1013 at {}: {g}", named.offset)),
            }
        }
        Ending::Other(how) => match gap(accepted, &log.received) {
            None => Verdict::Complete,
            Some(g) => Verdict::Violation(format!("{g}, ended: {how}")),
        },
    }
}

/// Describes what of `want` is missing from `got`, if anything: a hole (something
/// later arrived) or only a tail that never arrived.
fn gap(want: &Ranges, got: &Ranges) -> Option<String> {
    let first = want.first_missing_from(got)?;
    let missing = want.len() - want.common(got);
    let total = want.len();
    let last_got = got.0.last().map_or(0, |r| r.1);
    Some(if first > last_got {
        format!("last {missing} of {total} never arrived (from {first})")
    } else {
        format!("hole: missing {missing} of {total} (first {first})")
    })
}

/// The verdicts of a set of subscribers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tally {
    /// Subscribers with every accepted offset.
    pub complete: u64,
    /// Subscribers closed with 1013 after a gapless prefix.
    pub slow_closed: u64,
    /// Subscribers that are neither.
    pub violations: u64,
    /// Offsets received that no 202 reported (a publish whose answer was lost).
    pub unacknowledged: u64,
    /// Up to [`MAX_EXAMPLES`] violations in words.
    pub examples: Vec<String>,
}

impl Tally {
    /// Counts one subscriber's verdict.
    pub fn add(&mut self, verdict: Verdict, log: &OffsetLog, accepted: &Ranges) {
        self.unacknowledged += log.received.len() - log.received.common(accepted);
        match verdict {
            Verdict::Complete => self.complete += 1,
            Verdict::Slow { .. } => self.slow_closed += 1,
            Verdict::Violation(what) => {
                self.violations += 1;
                if self.examples.len() < MAX_EXAMPLES {
                    self.examples.push(what);
                }
            }
        }
    }

    /// Adds another tally (another worker's).
    pub fn merge(&mut self, other: &Tally) {
        self.complete += other.complete;
        self.slow_closed += other.slow_closed;
        self.violations += other.violations;
        self.unacknowledged += other.unacknowledged;
        let room = MAX_EXAMPLES.saturating_sub(self.examples.len());
        self.examples
            .extend(other.examples.iter().take(room).cloned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(offsets: &[u64]) -> OffsetLog {
        let mut log = OffsetLog::default();
        for &o in offsets {
            log.record(
                o,
                br#"{"type":"event","topic":"f","offset":1,"version":"00ff:1"}"#,
            );
        }
        log
    }

    fn reason(offset: u64) -> Ending {
        Ending::Slow(
            format!("slow consumer; last queued f 00ff:{offset}; resume with since").into(),
        )
    }

    #[test]
    fn ranges_merge_and_count() {
        let r = Ranges::from_offsets(vec![5, 1, 2, 3, 3, 7, 8]);
        assert_eq!(r.0, vec![(1, 3), (5, 5), (7, 8)]);
        assert_eq!(r.len(), 6);
        assert_eq!(r.up_to(5).0, vec![(1, 3), (5, 5)]);
        assert_eq!(r.up_to(2).0, vec![(1, 2)]);
        let other = Ranges(vec![(2, 7)]);
        assert_eq!(r.common(&other), 4);
        assert_eq!(r.first_missing_from(&other), Some(1));
        assert_eq!(Ranges(vec![(2, 6)]).first_missing_from(&other), None);
        assert_eq!(other.first_missing_from(&r), Some(4));
    }

    #[test]
    fn parses_the_gateway_reason() {
        let n = parse_slow_reason(
            b"slow consumer; last queued bench:0 6a2f04586e6e7d74:42; resume with since",
        );
        assert_eq!(
            n,
            Some(Named {
                topic: "bench:0".into(),
                epoch: "6a2f04586e6e7d74".into(),
                offset: 42
            })
        );
        assert_eq!(parse_slow_reason(b"slow consumer; resume with since"), None);
        assert_eq!(
            parse_slow_reason(b"slow consumer; last queued t zz:1; resume with since"),
            None
        );
        assert_eq!(
            event_epoch(br#"{"offset":3,"version":"ab12:3"}"#),
            Some(&b"ab12"[..])
        );
    }

    #[test]
    fn verdicts() {
        let accepted = Ranges::from_offsets((1..=10).filter(|o| *o != 4).collect());
        let all: Vec<u64> = accepted.0.iter().flat_map(|&(a, b)| a..=b).collect();
        let open = Ending::Other("still open".into());
        // Everything accepted, and a refused offset (4) never expected.
        assert_eq!(
            judge(&log_of(&all), &open, "f", &accepted),
            Verdict::Complete
        );
        // A gapless prefix up to the named offset, then 1013.
        let prefix = log_of(&[1, 2, 3, 5, 6]);
        assert_eq!(
            judge(&prefix, &reason(6), "f", &accepted),
            Verdict::Slow { offset: 6 }
        );
        // A gap before the named offset.
        let holed = log_of(&[1, 2, 5, 6]);
        assert!(matches!(
            judge(&holed, &reason(6), "f", &accepted),
            Verdict::Violation(v) if v.contains("hole: missing 1 of 5 (first 3)")
        ));
        // Incomplete without 1013.
        assert!(matches!(
            judge(&prefix, &open, "f", &accepted),
            Verdict::Violation(v) if v.starts_with("last 4 of 9 never arrived (from 7)")
        ));
        // A duplicate.
        let dup = log_of(&[1, 2, 2, 3]);
        assert!(matches!(
            judge(&dup, &reason(3), "f", &accepted),
            Verdict::Violation(_)
        ));
        // Another epoch or topic in the reason.
        let wrong =
            Ending::Slow(b"slow consumer; last queued f 0ee0:3; resume with since".to_vec());
        assert!(matches!(
            judge(&prefix, &wrong, "f", &accepted),
            Verdict::Violation(_)
        ));
        assert!(matches!(
            judge(&prefix, &reason(3), "g", &accepted),
            Verdict::Violation(_)
        ));
    }

    #[test]
    fn tally_counts_and_bounds_examples() {
        let accepted = Ranges(vec![(1, 3)]);
        let mut t = Tally::default();
        for _ in 0..MAX_EXAMPLES + 2 {
            t.add(Verdict::Violation("x".into()), &log_of(&[1, 9]), &accepted);
        }
        t.add(Verdict::Complete, &log_of(&[1, 2, 3]), &accepted);
        assert_eq!(t.violations, MAX_EXAMPLES as u64 + 2);
        assert_eq!(t.examples.len(), MAX_EXAMPLES);
        assert_eq!(t.complete, 1);
        assert_eq!(t.unacknowledged, MAX_EXAMPLES as u64 + 2);
    }
}
