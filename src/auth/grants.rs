//! Grants: the topics and patterns an identity may subscribe or publish to.
//!
//! A topic is granted when it is listed or a granted pattern matches it. A pattern is
//! granted when one granted pattern covers it: every topic it can match is matched by the
//! granted one (checked segment by segment, never by enumerating topics). Coverage by
//! several grants together (`a:**` by `a:*` and `a:*:**`) is not recognised; that only
//! ever refuses, never widens.
//!
//! Identities with the same grants share one [`Grants`] through [`GrantCache`], so
//! 10,000 connections with the same claims hold 10,000 pointers to one set.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::topic::{Pattern, Segment, validate_topic};

/// What a template's `{sub}` stands for.
pub(crate) const SUB_PLACEHOLDER: &str = "{sub}";

/// Most topics and patterns one claim may list. Bounds what a token makes the gateway
/// build and hold; a claim with more is refused.
pub(crate) const MAX_CLAIM_ENTRIES: usize = 256;

/// Most distinct grant sets cached at once. Past it, entries no identity holds any more are
/// dropped; if all are held, a new set is built unshared rather than growing the cache.
pub(crate) const GRANT_CACHE_CAP: usize = 4096;

/// A set of granted topics and patterns.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Grants {
    /// Everything (no authentication configured, or an admin API key), the gateway's
    /// reserved topics included.
    everything: bool,
    topics: HashSet<Box<str>>,
    patterns: Vec<Pattern>,
}

/// A grant entry that is neither a topic nor a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InvalidGrant(pub(crate) String);

impl Grants {
    /// Grants every topic and pattern.
    pub(crate) fn everything() -> Grants {
        Grants {
            everything: true,
            ..Grants::default()
        }
    }

    /// Builds grants from entries, each a topic (`runs:42`) or a pattern (`runs:*`,
    /// `runs:**`).
    pub(crate) fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Grants, InvalidGrant> {
        let mut grants = Grants::default();
        for entry in entries {
            let entry = entry.as_ref();
            if validate_topic(entry).is_ok() {
                grants.topics.insert(entry.into());
            } else {
                let pattern = Pattern::parse(entry).map_err(|_| InvalidGrant(entry.to_owned()))?;
                if !grants.patterns.contains(&pattern) {
                    grants.patterns.push(pattern);
                }
            }
        }
        Ok(grants)
    }

    /// Whether nothing is granted.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        !self.everything && self.topics.is_empty() && self.patterns.is_empty()
    }

    /// Whether `topic` (a valid topic name) is granted.
    pub(crate) fn allows_topic(&self, topic: &str) -> bool {
        // The gateway's own topics (`_tidings:stats`) are never granted by a claim or a
        // pattern: only `everything` (no authentication, or an admin API key) reads them.
        if crate::topic::is_reserved(topic) {
            return self.everything;
        }
        self.everything
            || self.topics.contains(topic)
            || self.patterns.iter().any(|p| p.matches(topic))
    }

    /// Whether every topic `pattern` can match is granted.
    pub(crate) fn allows_pattern(&self, pattern: &Pattern) -> bool {
        if self.everything {
            return true;
        }
        let literal = pattern
            .segments()
            .iter()
            .all(|s| matches!(s, Segment::Literal(_)));
        if literal && self.allows_topic(&pattern.to_string()) {
            return true;
        }
        self.patterns.iter().any(|granted| covers(granted, pattern))
    }
}

/// Whether every topic `inner` matches is matched by `outer`.
///
/// Walks `outer`'s segments: `**` accepts whatever `inner` still has, as long as it has
/// one more segment; `*` accepts any one segment of `inner` but its `**`; a literal
/// accepts only the same literal. Without a `**`, both must end together.
pub(crate) fn covers(outer: &Pattern, inner: &Pattern) -> bool {
    let inner = inner.segments();
    for (i, seg) in outer.segments().iter().enumerate() {
        let Some(theirs) = inner.get(i) else {
            // `inner` matches shorter topics than `outer` accepts.
            return false;
        };
        match (seg, theirs) {
            (Segment::Rest, _) => return true,
            (_, Segment::Rest) => return false,
            (Segment::Any, _) => {}
            (Segment::Literal(a), Segment::Literal(b)) if a == b => {}
            (Segment::Literal(_), _) => return false,
        }
    }
    inner.len() == outer.segments().len()
}

/// Expands a template's `{sub}` with `sub`, or `None` when `sub` is not a valid topic
/// segment: a subject with `:`, `*` or any other character outside `[A-Za-z0-9_.-]` must
/// not widen what the template grants (`sub = "*"` would otherwise grant `user:*:**`).
pub(crate) fn expand(template: &str, sub: &str) -> Option<String> {
    let valid_segment = !sub.is_empty()
        && sub.len() <= crate::topic::MAX_TOPIC_LEN
        && validate_topic(sub).is_ok()
        && !sub.contains(':');
    if !valid_segment {
        return None;
    }
    let expanded = template.replace(SUB_PLACEHOLDER, sub);
    let ok = validate_topic(&expanded).is_ok() || Pattern::parse(&expanded).is_ok();
    ok.then_some(expanded)
}

/// Interns grant sets: identities whose entries are the same (after template expansion)
/// share one `Arc<Grants>`.
#[derive(Debug, Default)]
pub(crate) struct GrantCache {
    sets: Mutex<HashMap<GrantKey, Weak<Grants>>>,
}

/// A grant set's entries, sorted and deduplicated: the key it is interned under.
type GrantKey = Box<[Box<str>]>;

impl GrantCache {
    /// The shared grants of `entries` (sorted and deduplicated here, so order does not
    /// matter).
    pub(crate) fn get(&self, mut entries: Vec<Box<str>>) -> Result<Arc<Grants>, InvalidGrant> {
        entries.sort_unstable();
        entries.dedup();
        let key: GrantKey = entries.into_boxed_slice();
        let mut sets = self.sets.lock();
        if let Some(grants) = sets.get(&key).and_then(Weak::upgrade) {
            return Ok(grants);
        }
        let grants = Arc::new(Grants::parse(&key)?);
        if sets.len() >= GRANT_CACHE_CAP {
            sets.retain(|_, set| set.strong_count() > 0);
        }
        if sets.len() < GRANT_CACHE_CAP {
            sets.insert(key, Arc::downgrade(&grants));
        }
        Ok(grants)
    }

    /// Grant sets cached now (live or not yet pruned).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.sets.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    fn grants(entries: &[&str]) -> Grants {
        Grants::parse(entries).unwrap()
    }

    #[test]
    fn topics_and_patterns() {
        let g = grants(&["news", "runs:*", "user:7:**"]);
        assert!(g.allows_topic("news") && g.allows_topic("runs:1"));
        assert!(!g.allows_topic("runs:1:log") && !g.allows_topic("newsx"));
        assert!(g.allows_topic("user:7:a:b") && !g.allows_topic("user:7"));
        assert!(g.allows_pattern(&p("runs:*")));
        assert!(!g.allows_pattern(&p("runs:**")));
        assert!(g.allows_pattern(&p("user:7:*")) && g.allows_pattern(&p("user:7:x:**")));
        assert!(!g.allows_pattern(&p("user:*:**")) && !g.allows_pattern(&p("*")));
        // A literal-only pattern is its topic.
        assert!(g.allows_pattern(&p("news")));
        assert!(Grants::everything().allows_pattern(&p("**")));
        // Reserved topics: never through a claim or a pattern, only for an admin.
        let claimed = Grants::parse(&["_tidings:stats", "**"]).unwrap();
        assert!(!claimed.allows_topic("_tidings:stats"));
        assert!(Grants::everything().allows_topic("_tidings:stats"));
        assert!(Grants::default().is_empty());
        assert!(Grants::parse(&["a::b"]).is_err());
    }

    #[test]
    fn coverage() {
        assert!(covers(&p("a:*"), &p("a:b")));
        assert!(covers(&p("a:*"), &p("a:*")));
        assert!(!covers(&p("a:*"), &p("a:**")));
        assert!(covers(&p("a:**"), &p("a:*:**")));
        assert!(covers(&p("a:**"), &p("a:**")));
        assert!(!covers(&p("a:**"), &p("a")));
        assert!(!covers(&p("a:*:c"), &p("a:*:*")));
        assert!(!covers(&p("a:b"), &p("a:b:c")));
        assert!(covers(&p("**"), &p("*:x:**")));
    }

    #[test]
    fn hostile_subjects_grant_nothing() {
        assert_eq!(
            expand("user:{sub}:**", "u42").as_deref(),
            Some("user:u42:**")
        );
        for hostile in [
            "*",
            "**",
            "a:b",
            "",
            "a b",
            "x*",
            "ü",
            "{sub}",
            &"a".repeat(65),
        ] {
            assert_eq!(expand("user:{sub}:**", hostile), None, "{hostile:?}");
        }
        // Within a segment, a long subject can make the segment too long.
        assert_eq!(expand("u-{sub}", &"a".repeat(64)), None);
    }

    #[test]
    fn the_cache_shares_and_stays_bounded() {
        let cache = GrantCache::default();
        let a = cache.get(vec!["x".into(), "y:*".into()]).unwrap();
        let b = cache
            .get(vec!["y:*".into(), "x".into(), "x".into()])
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        let mut held = Vec::new();
        for i in 0..GRANT_CACHE_CAP + 10 {
            held.push(cache.get(vec![format!("t{i}").into()]).unwrap());
        }
        assert!(cache.len() <= GRANT_CACHE_CAP);
        // Nothing holds these: the next miss prunes them.
        drop(held);
        let _c = cache.get(vec!["z".into()]).unwrap();
        assert!(cache.len() <= 2, "{}", cache.len());
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("c".to_string()),
            Just("*".to_string()),
        ]
    }

    fn pattern() -> impl Strategy<Value = String> {
        (prop::collection::vec(segment(), 1..5), any::<bool>()).prop_map(|(mut segs, rest)| {
            if rest {
                segs.push("**".to_string());
            }
            segs.join(":")
        })
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![Just("a"), Just("b"), Just("c"), Just("d")],
            1..7,
        )
        .prop_map(|segs| segs.join(":"))
    }

    proptest! {
        /// `allows_pattern(p)` implies every topic `p` matches is allowed.
        #[test]
        fn an_allowed_pattern_only_matches_allowed_topics(
            granted in prop::collection::vec(pattern(), 0..4),
            exact in prop::collection::vec(topic(), 0..3),
            asked in pattern(),
            mut samples in prop::collection::vec(topic(), 32),
            picks in prop::collection::vec(0usize..4, 8),
        ) {
            let mut entries = granted.clone();
            entries.extend(exact);
            let grants = Grants::parse(&entries).unwrap();
            let asked = Pattern::parse(&asked).unwrap();
            // Topics made to match `asked`, besides the random ones.
            let letters = ["a", "b", "c", "d"];
            let mut made = Vec::new();
            for (i, seg) in asked.segments().iter().enumerate() {
                let pick = letters[picks[i % picks.len()]];
                match seg {
                    Segment::Literal(l) => made.push(l.to_string()),
                    Segment::Any => made.push(pick.to_string()),
                    Segment::Rest => made.extend(std::iter::repeat_n(pick.to_string(), 1 + picks[0])),
                }
            }
            samples.push(made.join(":"));
            if grants.allows_pattern(&asked) {
                for t in samples.iter().filter(|t| asked.matches(t)) {
                    prop_assert!(grants.allows_topic(t), "{asked} allowed but not {t}");
                }
            }
        }

        /// Expansion never yields something wider than the template with a literal.
        #[test]
        fn expansion_stays_within_the_template(sub in "\\PC{0,70}") {
            if let Some(expanded) = expand("user:{sub}:**", &sub) {
                let expanded = Pattern::parse(&expanded).unwrap();
                prop_assert_eq!(expanded.segments().len(), 3);
                prop_assert!(matches!(expanded.segments()[1], Segment::Literal(_)));
            }
        }
    }
}
