//! A Server-Sent Events stream as a peer's transport: its phase and, for a stream of
//! several topics or patterns, its resume cursor.
//!
//! A single-topic stream's `id:` is the version itself, part of the event bytes every
//! subscriber shares. A multi-topic stream writes the shared `event:`/`data:` lines and
//! then its own `id:` line: the cursor, a compact list of the versions it delivered per
//! topic (see docs/PROTOCOL.md, "Server-Sent Events"), so a reconnecting `EventSource`
//! that sends only `Last-Event-ID` resumes every topic exactly.

use std::fmt::Write as _;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::topics::Publication;
use crate::proto::CloseCode;
use crate::proto::session::{CloseDeadline, Due, Phase, Timing};
use crate::proto::sse;
use crate::topic::{Version, validate_topic};

/// Topics reached through patterns that a cursor remembers. Past it the least recently
/// delivered is forgotten, and a resume replays that topic from the stream's base time
/// (repeats are possible, never loss; each event carries its version).
pub const MAX_CURSOR_MATCHED: usize = 64;

/// Longest cursor accepted in `Last-Event-ID` (128 exact topics fit in about 5.5 KiB).
pub const MAX_CURSOR_BYTES: usize = 8 * 1024;

/// The first field of every multi-topic cursor, naming its format.
const CURSOR_FORMAT: &str = "c1";

/// A multi-topic stream's record of what it delivered.
#[derive(Debug, Default)]
struct Cursor {
    /// The stream's exact topics, in request order: the cursor names them by index.
    topics: Vec<Arc<str>>,
    /// The last version delivered per topic, least recently delivered first.
    positions: Vec<(Arc<str>, Version)>,
    /// For a stream with patterns: when they were first attached (Unix ms). A matched topic
    /// absent from the cursor resumes with what was published from then on.
    base_ms: Option<u64>,
}

impl Cursor {
    fn record(&mut self, topic: &str, version: Version) {
        if let Some(i) = self.positions.iter().position(|(t, _)| **t == *topic) {
            let (name, _) = self.positions.remove(i);
            self.positions.push((name, version));
        } else {
            let name: Arc<str> = self
                .topics
                .iter()
                .find(|t| ***t == *topic)
                .cloned()
                .unwrap_or_else(|| Arc::from(topic));
            self.positions.push((name, version));
        }
        let matched = self
            .positions
            .iter()
            .filter(|(t, _)| !self.topics.contains(t))
            .count();
        if matched > MAX_CURSOR_MATCHED
            && let Some(i) = self
                .positions
                .iter()
                .position(|(t, _)| !self.topics.contains(t))
        {
            self.positions.remove(i);
        }
    }

    /// Whether `version` of `topic` was already delivered.
    fn has(&self, topic: &str, version: Version) -> bool {
        self.positions
            .iter()
            .any(|(t, v)| **t == *topic && v.epoch == version.epoch && v.offset >= version.offset)
    }

    fn encode(&self) -> String {
        let mut out = String::from(CURSOR_FORMAT);
        if let Some(base) = self.base_ms {
            let _ = write!(out, ";b={base}");
        }
        for (topic, version) in &self.positions {
            match self.topics.iter().position(|t| t == topic) {
                Some(i) => {
                    let _ = write!(out, ";#{i}={version}");
                }
                None => {
                    let _ = write!(out, ";{topic}={version}");
                }
            }
        }
        out
    }
}

/// What a `Last-Event-ID` said, for the stream it resumes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The last version delivered per topic (exact or matched).
    pub since: Vec<(String, Version)>,
    /// The base time of the stream's patterns.
    pub base_ms: Option<u64>,
}

/// Why a `Last-Event-ID` (or `last_event_id`) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Last-Event-ID: {0}")]
pub struct CursorError(&'static str);

/// Reads the `Last-Event-ID` of a stream of `topics` (exact, in request order); a
/// single-topic stream's id is a plain version.
pub fn parse_last_event_id(
    id: &str,
    topics: &[String],
    single: bool,
) -> Result<Resume, CursorError> {
    if id.len() > MAX_CURSOR_BYTES {
        return Err(CursorError("longer than 8 KiB"));
    }
    if single {
        let version: Version = id.parse().map_err(|_| CursorError("not a version"))?;
        let topic = topics.first().ok_or(CursorError("no topic"))?;
        return Ok(Resume {
            since: vec![(topic.clone(), version)],
            base_ms: None,
        });
    }
    let mut fields = id.split(';');
    if fields.next() != Some(CURSOR_FORMAT) {
        return Err(CursorError("not a tidings cursor"));
    }
    let mut resume = Resume::default();
    for field in fields {
        let (key, value) = field
            .split_once('=')
            .ok_or(CursorError("a field without ="))?;
        if key == "b" {
            resume.base_ms = Some(value.parse().map_err(|_| CursorError("bad base time"))?);
            continue;
        }
        let version: Version = value.parse().map_err(|_| CursorError("bad version"))?;
        let topic = match key.strip_prefix('#') {
            Some(i) => {
                let i: usize = i.parse().map_err(|_| CursorError("bad topic index"))?;
                topics
                    .get(i)
                    .ok_or(CursorError("topic index out of range"))?
                    .clone()
            }
            None => {
                validate_topic(key).map_err(|_| CursorError("bad topic"))?;
                key.to_owned()
            }
        };
        resume.since.push((topic, version));
    }
    Ok(resume)
}

/// One SSE stream's state.
#[derive(Debug)]
pub struct SseStream {
    phase: Phase,
    /// `None` for a single-topic stream, whose ids are the shared versions.
    cursor: Option<Cursor>,
    /// When an ending stream whose last bytes never drain is cut off.
    close_deadline: CloseDeadline,
}

impl SseStream {
    /// A stream of one topic.
    pub fn single() -> SseStream {
        SseStream {
            phase: Phase::Open,
            cursor: None,
            close_deadline: CloseDeadline::default(),
        }
    }

    /// A stream of several topics or of patterns.
    pub fn multi(topics: &[String], base_ms: Option<u64>) -> SseStream {
        SseStream {
            phase: Phase::Open,
            cursor: Some(Cursor {
                topics: topics.iter().map(|t| Arc::from(t.as_str())).collect(),
                positions: Vec::new(),
                base_ms,
            }),
            close_deadline: CloseDeadline::default(),
        }
    }

    /// Open, closing (ends once flushed) or broken.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Ends the stream from our side: returns its final `close` event.
    pub fn end(&mut self, code: CloseCode, reason: &str) -> Option<Bytes> {
        if !self.phase.is_open() {
            return None;
        }
        self.phase = Phase::Closing;
        Some(sse::close_event(code.as_u16(), reason))
    }

    /// Nothing more can be written.
    pub fn break_off(&mut self) {
        self.phase = Phase::Broken;
    }

    /// Arms the close deadline once the stream is ending; returns the tick to be woken at,
    /// the first time only.
    pub fn arm_close_deadline(&mut self, now: u64, timing: &Timing) -> Option<u64> {
        if self.phase != Phase::Closing {
            return None;
        }
        self.close_deadline.arm(now, timing)
    }

    /// A timer came due: a heartbeat comment every `ping_interval` (a client cannot answer,
    /// so a dead one is found when writes fail or its queue overflows), or the close
    /// deadline.
    pub fn handle_timeout(&mut self, now: u64, timing: &Timing) -> Due {
        if let Some(due) = self.close_deadline.check(now) {
            return due;
        }
        if timing.interval == 0 || !self.phase.is_open() {
            return Due::Never;
        }
        Due::Ping(now + u64::from(timing.interval))
    }

    /// Records `topic` at `version` (the version a subscription started from) and returns
    /// the id-only event that makes it the client's `Last-Event-ID`; `None` for a
    /// single-topic stream.
    pub fn mark(&mut self, marks: &[(Arc<str>, Version)]) -> Option<Bytes> {
        let cursor = self.cursor.as_mut()?;
        for (topic, version) in marks {
            cursor.record(topic, *version);
        }
        Some(sse::id_line(&cursor.encode()))
    }

    /// A message given as its WebSocket frame, as this stream writes it; `None` if a
    /// multi-topic stream already delivered it.
    pub fn encode_message(&mut self, frame: &[u8]) -> Option<Bytes> {
        let event = sse::encode(frame)?;
        let Some(cursor) = self.cursor.as_mut() else {
            return Some(event.with_id);
        };
        if let Some((topic, version)) = &event.position
            && let Ok(version) = version.parse::<Version>()
        {
            if event.once && cursor.has(topic, version) {
                return None;
            }
            cursor.record(topic, version);
        }
        Some(concat(&event.body, &sse::id_line(&cursor.encode())))
    }

    /// A publication's shared SSE event, and for a multi-topic stream its cursor to write
    /// after it; `None` if a multi-topic stream already delivered it (a replay raced it).
    pub fn encode_publication(
        &mut self,
        publication: &Publication,
    ) -> Option<(Bytes, Option<Bytes>)> {
        let cached = publication.sse()?;
        let event = &cached.event;
        let Some(cursor) = self.cursor.as_mut() else {
            return Some((event.with_id.clone(), None));
        };
        if let Some(version) = cached.version {
            if event.once && cursor.has(&publication.topic, version) {
                return None;
            }
            cursor.record(&publication.topic, version);
        }
        Some((event.body.clone(), Some(sse::id_line(&cursor.encode()))))
    }
}

fn concat(a: &[u8], b: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(a.len() + b.len());
    out.put_slice(a);
    out.put_slice(b);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Epoch;

    fn v(offset: u64) -> Version {
        Version::new(Epoch::from_u64(0xab), offset)
    }

    #[test]
    fn a_cursor_round_trips() {
        let topics = vec!["a".to_string(), "b".to_string()];
        let mut stream = SseStream::multi(&topics, Some(1234));
        let marks = [(Arc::from("a"), v(3)), (Arc::from("b"), v(0))];
        let line = stream.mark(&marks).expect("multi-topic");
        let id = std::str::from_utf8(&line)
            .expect("utf-8")
            .strip_prefix("id: ")
            .expect("an id line")
            .trim_end();
        assert_eq!(id, "c1;b=1234;#0=00000000000000ab:3;#1=00000000000000ab:0");
        let resume = parse_last_event_id(id, &topics, false).expect("valid");
        assert_eq!(resume.base_ms, Some(1234));
        assert_eq!(
            resume.since,
            vec![("a".to_string(), v(3)), ("b".to_string(), v(0))]
        );
    }

    #[test]
    fn matched_topics_are_named_and_bounded() {
        let mut stream = SseStream::multi(&[], Some(0));
        for i in 0..(MAX_CURSOR_MATCHED + 10) {
            stream.mark(&[(Arc::from(format!("runs:{i}").as_str()), v(1))]);
        }
        let cursor = stream.cursor.as_ref().expect("multi");
        assert_eq!(cursor.positions.len(), MAX_CURSOR_MATCHED);
        assert_eq!(
            &*cursor.positions[0].0, "runs:10",
            "the oldest were forgotten"
        );
        let resume = parse_last_event_id(&cursor.encode(), &[], false).expect("valid");
        assert_eq!(resume.since.len(), MAX_CURSOR_MATCHED);
    }

    #[test]
    fn bad_ids_are_refused() {
        let topics = vec!["a".to_string()];
        for bad in [
            "",
            "c2;#0=00000000000000ab:1",
            "c1;#5=00000000000000ab:1",
            "c1;#0",
            "c1;x y=00000000000000ab:1",
        ] {
            assert!(parse_last_event_id(bad, &topics, false).is_err(), "{bad:?}");
        }
        assert!(parse_last_event_id("nope", &topics, true).is_err());
        assert!(parse_last_event_id(&"x".repeat(MAX_CURSOR_BYTES + 1), &topics, false).is_err());
        let single = parse_last_event_id("00000000000000ab:9", &topics, true).expect("valid");
        assert_eq!(single.since, vec![("a".to_string(), v(9))]);
    }

    proptest::proptest! {
        /// Whatever a client sends as `Last-Event-ID`, parsing it never panics, and what
        /// it accepts names only valid topics (of the stream, by index, or by name).
        #[test]
        fn any_last_event_id_parses_or_is_refused(id in "(c1)?(;[#a-z0-9:=.]{0,24}){0,6}|.{0,64}") {
            let topics = vec!["a".to_string(), "b:c".to_string()];
            if let Ok(resume) = parse_last_event_id(&id, &topics, false) {
                for (topic, _) in resume.since {
                    proptest::prop_assert!(validate_topic(&topic).is_ok());
                }
            }
            let _ = parse_last_event_id(&id, &topics, true);
        }
    }

    #[test]
    fn a_multi_topic_stream_skips_what_it_delivered() {
        let frame = crate::proto::versioned::encode_versioned_event(
            "a",
            3,
            v(3).to_buf().as_str(),
            b"1",
            0,
        );
        let mut stream = SseStream::multi(&["a".to_string()], None);
        let first = stream.encode_message(&frame).expect("new");
        assert!(first.ends_with(b"id: c1;#0=00000000000000ab:3\n\n"));
        assert_eq!(stream.encode_message(&frame), None, "delivered once");
    }
}
