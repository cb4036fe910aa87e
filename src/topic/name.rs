//! Topic names and patterns.

use std::fmt;

/// Most segments a topic or pattern may have.
pub const MAX_SEGMENTS: usize = 16;
/// Longest segment, in bytes.
pub const MAX_SEGMENT_LEN: usize = 64;
/// Longest topic or pattern, in bytes. Bounds index keys and every frame's topic field.
pub const MAX_TOPIC_LEN: usize = 256;

/// The first segment of the topics the gateway itself publishes to (`_tidings:stats`).
/// Patterns never match them, publishers cannot write to them, and with authentication
/// on only an admin identity may read them.
pub const RESERVED_SEGMENT: &str = "_tidings";

/// Whether `topic` is one of the gateway's own topics (its first segment is
/// [`RESERVED_SEGMENT`]).
pub fn is_reserved(topic: &str) -> bool {
    topic.split(':').next() == Some(RESERVED_SEGMENT)
}

/// Why a topic or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty, too long, too many segments, an empty segment or a forbidden character.
    #[error(
        "invalid topic {0:?}: use 1-16 ':'-separated segments of [A-Za-z0-9_.-], at most 256 bytes"
    )]
    InvalidTopic(String),
    /// As for topics, with `*` segments and an optional trailing `**`.
    #[error(
        "invalid pattern {0:?}: segments of [A-Za-z0-9_.-], '*' for one segment, a trailing '**' for one or more"
    )]
    InvalidPattern(String),
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SEGMENT_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Validates a topic name; the characters allowed need no escaping in JSON or URLs.
pub fn validate_topic(topic: &str) -> Result<(), NameError> {
    // One pass over the bytes: every publication's topic is checked.
    let mut segments = 1;
    let mut segment_len = 0;
    let mut ok = !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN;
    for &b in topic.as_bytes() {
        if b == b':' {
            ok &= segment_len > 0 && segment_len <= MAX_SEGMENT_LEN;
            segments += 1;
            segment_len = 0;
        } else {
            ok &= b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.');
            segment_len += 1;
        }
        if !ok {
            break;
        }
    }
    let ok = ok && segment_len > 0 && segment_len <= MAX_SEGMENT_LEN && segments <= MAX_SEGMENTS;
    if ok {
        Ok(())
    } else {
        Err(NameError::InvalidTopic(topic.to_owned()))
    }
}

/// One segment of a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    /// Matches this exact segment.
    Literal(Box<str>),
    /// `*`: matches exactly one segment.
    Any,
    /// `**` (last only): matches one or more segments.
    Rest,
}

/// A validated topic pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    segments: Vec<Segment>,
}

impl Pattern {
    /// Parses `a:*:c`, `a:**` and the like.
    pub fn parse(pattern: &str) -> Result<Pattern, NameError> {
        let err = || NameError::InvalidPattern(pattern.to_owned());
        if pattern.is_empty() || pattern.len() > MAX_TOPIC_LEN {
            return Err(err());
        }
        let parts: Vec<&str> = pattern.split(':').collect();
        if parts.len() > MAX_SEGMENTS {
            return Err(err());
        }
        let last = parts.len() - 1;
        let segments = parts
            .iter()
            .enumerate()
            .map(|(i, part)| match *part {
                "*" => Ok(Segment::Any),
                "**" if i == last => Ok(Segment::Rest),
                s if valid_segment(s) => Ok(Segment::Literal(s.into())),
                _ => Err(err()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Pattern { segments })
    }

    /// The pattern's segments, in order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Whether `topic` matches; the reference semantics the index must agree with.
    /// A reserved topic ([`is_reserved`]) matches no pattern: it is read by its name only.
    pub fn matches(&self, topic: &str) -> bool {
        if is_reserved(topic) {
            return false;
        }
        let mut parts = topic.split(':');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return parts.next().is_some(),
                Segment::Any => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(lit) => {
                    if parts.next() != Some(lit) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            f.write_str(match seg {
                Segment::Literal(s) => s,
                Segment::Any => "*",
                Segment::Rest => "**",
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        for ok in [
            "a",
            "myapp:prod",
            "runs:abc-123",
            "executions:exec_42",
            "v1.2:x",
        ] {
            assert!(validate_topic(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(65);
        let many = vec!["a"; 17].join(":");
        for bad in ["", ":", "a:", ":a", "a::b", "a b", "a:*", "ü", &long, &many] {
            assert!(validate_topic(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// The one-pass check says what the rules say, segment by segment.
        #[test]
        fn one_pass_validation_follows_the_rules(topic in "[a-c:_.ü* -]{0,12}|[a:]{60,80}") {
            let by_rules = !topic.is_empty()
                && topic.len() <= MAX_TOPIC_LEN
                && topic.split(':').count() <= MAX_SEGMENTS
                && topic.split(':').all(valid_segment);
            proptest::prop_assert_eq!(validate_topic(&topic).is_ok(), by_rules, "{:?}", topic);
        }
    }

    #[test]
    fn patterns() {
        let p = Pattern::parse("myapp:*").unwrap();
        assert!(p.matches("myapp:prod"));
        assert!(!p.matches("myapp"));
        assert!(!p.matches("myapp:prod:eu"));
        let p = Pattern::parse("*:prod").unwrap();
        assert!(p.matches("x:prod") && !p.matches("prod"));
        let p = Pattern::parse("shared:**").unwrap();
        assert!(p.matches("shared:a") && p.matches("shared:a:b:c"));
        assert!(!p.matches("shared") && !p.matches("other:a"));
        assert!(Pattern::parse("**").unwrap().matches("anything:at:all"));
        for bad in ["", "a:**:b", "a:***", "a:b*", "a::*"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Pattern::parse("a:*:**").unwrap().to_string(), "a:*:**");
    }
}
