//! One hashed timing wheel for every connection's ping/pong deadline.
//!
//! Time is counted in ticks. Each connection sits in exactly one slot of the wheel, at the
//! tick when it must next be looked at; advancing the wheel takes out only the connections
//! due, so the cost of a tick is proportional to those, not to every connection.

use std::time::Duration;

/// The shortest tick. Heartbeat deadlines are seconds apart; finer ticks only cost wake-ups.
pub const MIN_TICK: Duration = Duration::from_millis(10);
/// The longest tick, so a 30 s interval is honoured to within a second.
pub const MAX_TICK: Duration = Duration::from_secs(1);

/// The tick length for a ping interval and pong timeout: a tenth of the shorter one, so a
/// deadline fires at most 10% late, within [`MIN_TICK`, `MAX_TICK`].
pub fn tick_for(ping_interval: Duration, pong_timeout: Duration) -> Duration {
    if ping_interval.is_zero() {
        // Heartbeats are off: nothing to be precise about.
        return MAX_TICK;
    }
    (ping_interval.min(pong_timeout) / 10).clamp(MIN_TICK, MAX_TICK)
}

/// Converts a duration into whole ticks, at least one.
pub fn ticks(d: Duration, tick: Duration) -> u32 {
    (d.as_nanos().div_ceil(tick.as_nanos().max(1))).clamp(1, u32::MAX as u128) as u32
}

/// How many ticks early a connection's heartbeat runs, for a ping `interval` of `interval`
/// ticks and a uniform `spread` in [0, 1): up to half an interval. A connection is pinged
/// after an interval of silence and each pong restarts its interval, so connections opened
/// together (a reconnect wave after a restart, or a load test's connect phase) would ping
/// together forever: one ping and one pong per connection in one burst every interval,
/// delaying every publication queued behind it. Each connection draws its own stagger once
/// and keeps it, so they stay spread over half an interval.
pub fn stagger(interval: u32, spread: f64) -> u32 {
    let early = (f64::from(interval / 2) * spread.clamp(0.0, 1.0)) as u32;
    early.min(interval.saturating_sub(1))
}

/// A hashed timing wheel of items due at a tick.
#[derive(Debug)]
pub struct Wheel<T> {
    slots: Vec<Vec<T>>,
    /// The last tick advanced to; items are due strictly after it.
    now: u64,
}

impl<T> Wheel<T> {
    /// A wheel that can hold deadlines up to `span` ticks ahead.
    pub fn new(span: u32) -> Wheel<T> {
        let len = span.max(1) as usize + 1;
        Wheel {
            slots: (0..len).map(|_| Vec::new()).collect(),
            now: 0,
        }
    }

    /// The tick the wheel was last advanced to.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Schedules `item` at tick `at`. A tick already past is due at the next advance; one
    /// beyond the span is moved to the span's end (the item is then looked at early, and
    /// rescheduled by its owner).
    pub fn insert(&mut self, at: u64, item: T) {
        let span = self.slots.len() as u64 - 1;
        let at = at.clamp(self.now + 1, self.now + span);
        let index = (at % self.slots.len() as u64) as usize;
        self.slots[index].push(item);
    }

    /// Advances to tick `to`, moving every item due at or before it into `due`.
    pub fn advance(&mut self, to: u64, due: &mut Vec<T>) {
        let len = self.slots.len() as u64;
        let from = self.now + 1;
        // Past a full turn every slot is due once.
        let last = to.min(self.now + len);
        for tick in from..=last {
            let slot = &mut self.slots[(tick % len) as usize];
            due.append(slot);
            if slot.capacity() > 64 {
                // Keep no memory from a burst of connections that has gone.
                slot.shrink_to(64);
            }
        }
        self.now = self.now.max(to);
    }

    /// How many items are scheduled.
    pub fn len(&self) -> usize {
        self.slots.iter().map(Vec::len).sum()
    }

    /// Whether nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Vec::is_empty)
    }
}

/// The heartbeat state of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// No ping outstanding.
    Idle,
    /// A ping was sent at this tick and not yet answered by any inbound frame.
    Pinged(u64),
}

/// What to do with a connection whose heartbeat deadline came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// It was heard from recently: look again at this tick.
    Recheck(u64),
    /// Silent for a ping interval: ping it, and look again at this tick.
    Ping(u64),
    /// Silent for the pong timeout after a ping: close it.
    Close,
}

/// Decides a due connection's fate: `now` and `last_seen` (its last inbound frame) in ticks.
pub fn decide(beat: &mut Beat, now: u64, last_seen: u64, interval: u32, timeout: u32) -> Action {
    match *beat {
        Beat::Pinged(at) if last_seen < at => {
            if now >= at + u64::from(timeout) {
                Action::Close
            } else {
                Action::Recheck(at + u64::from(timeout))
            }
        }
        // Any inbound frame since the ping counts as the answer.
        Beat::Pinged(_) | Beat::Idle => {
            *beat = Beat::Idle;
            let next = last_seen + u64::from(interval);
            if now >= next {
                *beat = Beat::Pinged(now);
                Action::Ping(now + u64::from(timeout))
            } else {
                Action::Recheck(next)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stagger_is_at_most_half_an_interval() {
        assert_eq!(stagger(300, 0.0), 0);
        assert_eq!(stagger(300, 0.5), 75);
        assert_eq!(stagger(300, 0.999_999), 149);
        // Out-of-range spreads are clamped; a heartbeat never comes due at once.
        assert_eq!(stagger(300, 7.0), 150);
        assert_eq!(stagger(300, -1.0), 0);
        assert_eq!(stagger(1, 0.9), 0);
        assert_eq!(stagger(3, 1.0), 1);
        let staggers: Vec<u32> = (0..100)
            .map(|i| stagger(300, f64::from(i) / 100.0))
            .collect();
        assert!(staggers.iter().all(|&t| t <= 150));
        assert!(staggers.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn items_come_out_at_their_tick() {
        let mut w = Wheel::new(10);
        w.insert(3, "a");
        w.insert(5, "b");
        w.insert(100, "far");
        let mut due = Vec::new();
        w.advance(2, &mut due);
        assert!(due.is_empty());
        w.advance(4, &mut due);
        assert_eq!(due, vec!["a"]);
        due.clear();
        w.advance(10, &mut due);
        assert_eq!(due, vec!["b", "far"]);
        assert!(w.is_empty());
    }

    #[test]
    fn a_long_jump_empties_every_slot_once() {
        let mut w = Wheel::new(4);
        for at in 1..=4 {
            w.insert(at, at);
        }
        let mut due = Vec::new();
        w.advance(1000, &mut due);
        due.sort_unstable();
        assert_eq!(due, vec![1, 2, 3, 4]);
        w.insert(0, 9);
        due.clear();
        w.advance(1001, &mut due);
        assert_eq!(due, vec![9], "a past deadline is due at the next advance");
    }

    /// Drives one connection through virtual time: a peer that answers is never closed;
    /// one that stops is closed one pong timeout after the first unanswered ping.
    #[test]
    fn heartbeat_in_virtual_time() {
        let (interval, timeout) = (30, 10);
        let run = |answers_until: u64| -> Option<u64> {
            let mut wheel = Wheel::new(interval + timeout);
            let mut beat = Beat::Idle;
            let mut last_seen = 0;
            wheel.insert(u64::from(interval), ());
            let mut due = Vec::new();
            for now in 1..=500u64 {
                wheel.advance(now, &mut due);
                if due.drain(..).count() == 0 {
                    continue;
                }
                match decide(&mut beat, now, last_seen, interval, timeout) {
                    Action::Recheck(at) => wheel.insert(at, ()),
                    Action::Ping(at) => {
                        // The peer answers the ping at once while it is alive.
                        if now < answers_until {
                            last_seen = now;
                        }
                        wheel.insert(at, ());
                    }
                    Action::Close => return Some(now),
                }
            }
            None
        };
        assert_eq!(run(u64::MAX), None, "an answering peer is never closed");
        // Pings at 30, 60, ...; the one at 120 goes unanswered: closed at 130.
        assert_eq!(run(100), Some(130));
    }

    #[test]
    fn tick_bounds() {
        assert_eq!(
            tick_for(Duration::from_secs(30), Duration::from_secs(10)),
            MAX_TICK
        );
        assert_eq!(
            tick_for(Duration::from_millis(200), Duration::from_millis(300)),
            Duration::from_millis(20)
        );
        assert_eq!(
            ticks(Duration::from_millis(250), Duration::from_millis(100)),
            3
        );
    }
}
