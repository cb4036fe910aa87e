//! Subscription index of one shard (pure: slots are numbers, no sockets): exact topics in a hash map, patterns in a segment trie.
//!
//! Matching a publication costs one hash lookup plus a walk of the trie along the topic's
//! segments (each level tries the literal child and the `*` child and collects `**`
//! subscribers), independent of how many patterns other connections hold.

use std::collections::HashMap;
use std::sync::Arc;

use crate::topic::{Filter, Pattern, Segment};

/// A connection's position in its shard's slab.
pub type SlotId = u32;

/// One subscriber in the index.
#[derive(Debug, Clone)]
pub struct Sub {
    /// The subscribing connection.
    pub slot: SlotId,
    /// Publications up to this offset were already sent to it (snapshot or replay), so
    /// fan-out skips them; later ones are live.
    pub after: u64,
    /// Only events whose data matches are sent.
    pub filter: Option<Arc<Filter>>,
}

impl Sub {
    /// A live subscriber with no filter.
    pub fn live(slot: SlotId) -> Sub {
        Sub {
            slot,
            after: 0,
            filter: None,
        }
    }
}

/// Subscribers of exact topics and of patterns, by slab slot.
#[derive(Debug, Default)]
pub struct Index {
    exact: HashMap<Arc<str>, Vec<Sub>>,
    patterns: Node,
    /// Subscription requests waiting for their topics to be loaded from a shared bus. Their
    /// topics are in `exact` already, at `after = u64::MAX`, so nothing is sent to them
    /// until the whole request is attached.
    opening: Vec<Opening>,
    /// Subscriptions held until a shared bus's history after a version arrives (a resume
    /// that reaches further back than this node's history).
    backfilling: Vec<(Arc<str>, SlotId, crate::topic::Version)>,
}

/// A subscription request waiting for topics to load (see [`Index::wait`]).
#[derive(Debug)]
pub struct Opening {
    /// The subscribing connection.
    pub slot: SlotId,
    /// Its topics, and the version each resumes from.
    pub topics: Vec<(Arc<str>, Option<crate::topic::Version>)>,
    /// The acknowledgement to send first, once they are attached (a WebSocket request's
    /// `subscribed`, with the versions the topics start from).
    pub ack: Option<Ack>,
}

/// What a waiting request's `subscribed` acknowledgement names.
#[derive(Debug)]
pub struct Ack {
    /// The request's `id`.
    pub id: Option<serde_json::Value>,
    /// Its topics, as asked.
    pub topics: Vec<String>,
    /// Its patterns, as asked.
    pub patterns: Vec<String>,
}

#[derive(Debug, Default)]
struct Node {
    literal: HashMap<Box<str>, Node>,
    any: Option<Box<Node>>,
    /// Patterns that end at this node.
    here: Vec<Sub>,
    /// Patterns that end with `**` after this node's segments.
    rest: Vec<Sub>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.any.is_none()
            && self.here.is_empty()
            && self.rest.is_empty()
    }
}

impl Index {
    /// Adds a subscriber of `topic`.
    pub fn add_topic(&mut self, topic: &Arc<str>, sub: Sub) {
        self.exact.entry(topic.clone()).or_default().push(sub);
    }

    /// The filter of `slot`'s subscription to `topic`.
    pub fn filter_of(&self, topic: &str, slot: SlotId) -> Option<Arc<Filter>> {
        self.exact
            .get(topic)
            .and_then(|subs| subs.iter().find(|s| s.slot == slot))
            .and_then(|s| s.filter.clone())
    }

    /// Moves the replay mark of `slot`'s subscription to `topic` (after a fresh snapshot).
    pub fn set_after(&mut self, topic: &str, slot: SlotId, after: u64) {
        if let Some(sub) = self
            .exact
            .get_mut(topic)
            .and_then(|subs| subs.iter_mut().find(|s| s.slot == slot))
        {
            sub.after = after;
        }
    }

    /// The shared name of `topic` if anyone on this shard subscribes to it.
    pub fn topic_key(&self, topic: &str) -> Option<Arc<str>> {
        self.exact.get_key_value(topic).map(|(k, _)| k.clone())
    }

    /// Records a subscription request that waits for its topics to load.
    pub fn wait(&mut self, opening: Opening) {
        self.opening.push(opening);
    }

    /// The waiting requests all of whose topics pass `loaded`, no longer waiting.
    pub fn take_opened(&mut self, mut loaded: impl FnMut(&str) -> bool) -> Vec<Opening> {
        let (ready, waiting) = std::mem::take(&mut self.opening)
            .into_iter()
            .partition(|o| o.topics.iter().all(|(t, _)| loaded(t)));
        self.opening = waiting;
        ready
    }

    /// Records that `slot`'s subscription to `topic` waits for history after `from`.
    pub fn wait_backfill(&mut self, topic: &Arc<str>, slot: SlotId, from: crate::topic::Version) {
        self.backfilling.push((topic.clone(), slot, from));
    }

    /// The subscriptions of `topic` that waited for history after `from`, no longer waiting.
    pub fn take_backfilled(&mut self, topic: &str, from: crate::topic::Version) -> Vec<SlotId> {
        let mut slots = Vec::new();
        self.backfilling.retain(|(t, slot, f)| {
            let matched = **t == *topic && *f == from;
            if matched {
                slots.push(*slot);
            }
            !matched
        });
        slots
    }

    /// Whether any request waits for a topic to load.
    pub fn has_openings(&self) -> bool {
        !self.opening.is_empty()
    }

    /// Removes `slot` from `topic`'s subscribers.
    pub fn remove_topic(&mut self, topic: &str, slot: SlotId) {
        self.backfilling
            .retain(|(t, s, _)| !(*s == slot && **t == *topic));
        for opening in self.opening.iter_mut().filter(|o| o.slot == slot) {
            opening.topics.retain(|(t, _)| **t != *topic);
        }
        self.opening.retain(|o| !o.topics.is_empty());
        if let Some(slots) = self.exact.get_mut(topic) {
            remove_one(slots, slot);
            if slots.is_empty() {
                self.exact.remove(topic);
            }
        }
    }

    /// Adds a subscriber of `pattern`.
    pub fn add_pattern(&mut self, pattern: &Pattern, sub: Sub) {
        let mut node = &mut self.patterns;
        for seg in pattern.segments() {
            node = match seg {
                Segment::Literal(lit) => node.literal.entry(lit.clone()).or_default(),
                Segment::Any => node.any.get_or_insert_with(Default::default),
                Segment::Rest => {
                    node.rest.push(sub);
                    return;
                }
            };
        }
        node.here.push(sub);
    }

    /// Removes `slot` from `pattern`'s subscribers, pruning emptied trie nodes.
    pub fn remove_pattern(&mut self, pattern: &Pattern, slot: SlotId) {
        fn remove(node: &mut Node, segs: &[Segment], slot: SlotId) {
            match segs.split_first() {
                None => remove_one(&mut node.here, slot),
                Some((Segment::Rest, _)) => remove_one(&mut node.rest, slot),
                Some((Segment::Any, rest)) => {
                    if let Some(child) = node.any.as_deref_mut() {
                        remove(child, rest, slot);
                        if child.is_empty() {
                            node.any = None;
                        }
                    }
                }
                Some((Segment::Literal(lit), rest)) => {
                    if let Some(child) = node.literal.get_mut(lit) {
                        remove(child, rest, slot);
                        if child.is_empty() {
                            node.literal.remove(lit);
                        }
                    }
                }
            }
        }
        remove(&mut self.patterns, pattern.segments(), slot);
    }

    /// Calls `f` for every subscriber of `topic`, directly or through patterns.
    ///
    /// A slot subscribed several ways is reported once per way; the caller deduplicates.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&Sub)) {
        if let Some(subs) = self.exact.get(topic) {
            subs.iter().for_each(&mut f);
        }
        // A reserved topic is read by its name only (see `Pattern::matches`).
        if self.patterns.is_empty() || crate::topic::is_reserved(topic) {
            return;
        }
        // Topics have at most MAX_SEGMENTS segments; collect them without allocating.
        let mut segs: [&str; crate::topic::MAX_SEGMENTS] = [""; crate::topic::MAX_SEGMENTS];
        let mut n = 0;
        for s in topic.split(':') {
            if n == segs.len() {
                return;
            }
            segs[n] = s;
            n += 1;
        }
        walk(&self.patterns, &segs[..n], &mut f);
    }

    /// Whether nothing is subscribed.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.patterns.is_empty()
    }
}

fn walk(node: &Node, segs: &[&str], f: &mut impl FnMut(&Sub)) {
    let Some((first, rest)) = segs.split_first() else {
        node.here.iter().for_each(f);
        return;
    };
    // `**` needs one or more remaining segments; there is at least `first`.
    node.rest.iter().for_each(&mut *f);
    if let Some(child) = node.literal.get(*first) {
        walk(child, rest, f);
    }
    if let Some(child) = node.any.as_deref() {
        walk(child, rest, f);
    }
}

fn remove_one(subs: &mut Vec<Sub>, slot: SlotId) {
    if let Some(i) = subs.iter().position(|s| s.slot == slot) {
        subs.swap_remove(i);
    }
    if subs.is_empty() {
        *subs = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matches(index: &Index, topic: &str) -> Vec<SlotId> {
        let mut out = Vec::new();
        index.for_each_match(topic, |s| out.push(s.slot));
        out.sort_unstable();
        out
    }

    #[test]
    fn exact_and_patterns() {
        let mut ix = Index::default();
        ix.add_topic(&Arc::from("a:b"), Sub::live(1));
        ix.add_pattern(&Pattern::parse("a:*").unwrap(), Sub::live(2));
        ix.add_pattern(&Pattern::parse("a:**").unwrap(), Sub::live(3));
        ix.add_pattern(&Pattern::parse("*:b").unwrap(), Sub::live(4));
        assert_eq!(matches(&ix, "a:b"), vec![1, 2, 3, 4]);
        assert_eq!(matches(&ix, "a:c:d"), vec![3]);
        assert_eq!(matches(&ix, "a"), Vec::<SlotId>::new());
        ix.remove_pattern(&Pattern::parse("a:**").unwrap(), 3);
        ix.remove_pattern(&Pattern::parse("a:*").unwrap(), 2);
        ix.remove_pattern(&Pattern::parse("*:b").unwrap(), 4);
        ix.remove_topic("a:b", 1);
        assert!(ix.is_empty());
    }

    #[test]
    fn reserved_topics_match_no_pattern() {
        let mut ix = Index::default();
        ix.add_topic(&Arc::from("_tidings:stats"), Sub::live(1));
        ix.add_pattern(&Pattern::parse("**").unwrap(), Sub::live(2));
        ix.add_pattern(&Pattern::parse("*:stats").unwrap(), Sub::live(3));
        ix.add_pattern(&Pattern::parse("_tidings:*").unwrap(), Sub::live(4));
        assert_eq!(matches(&ix, "_tidings:stats"), vec![1]);
        assert!(!Pattern::parse("**").unwrap().matches("_tidings:stats"));
        assert_eq!(matches(&ix, "a:stats"), vec![2, 3]);
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("c".to_string())
        ]
    }

    fn pattern() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof![segment(), Just("*".to_string())], 1..4),
            any::<bool>(),
        )
            .prop_map(|(mut segs, rest)| {
                if rest {
                    segs.push("**".into());
                }
                segs.join(":")
            })
    }

    proptest! {
        /// The trie agrees with the reference matcher, and removal leaves nothing behind.
        #[test]
        fn trie_agrees_with_reference(
            patterns in prop::collection::vec(pattern(), 1..20),
            topics in prop::collection::vec(prop::collection::vec(segment(), 1..5), 1..20),
        ) {
            let parsed: Vec<Pattern> = patterns.iter().map(|p| Pattern::parse(p).unwrap()).collect();
            let mut ix = Index::default();
            for (i, p) in parsed.iter().enumerate() {
                ix.add_pattern(p, Sub::live(i as SlotId));
            }
            for t in topics {
                let topic = t.join(":");
                let want: Vec<SlotId> = parsed.iter().enumerate()
                    .filter(|(_, p)| p.matches(&topic)).map(|(i, _)| i as SlotId).collect();
                prop_assert_eq!(matches(&ix, &topic), want, "topic {}", topic);
            }
            for (i, p) in parsed.iter().enumerate() {
                ix.remove_pattern(p, i as SlotId);
            }
            prop_assert!(ix.is_empty());
        }
    }
}
