//! The topics a node knows: each one's history, state document and status.
//!
//! Every change to a topic happens under its lock, and so does the hand-off of the change's
//! frame to the shards: each shard therefore sees a topic's publications in offset order,
//! and a subscriber that reads the topic under the same lock (snapshot or replay) knows
//! exactly which offsets it already has.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde_json::Value;

use crate::proto::message::now_ms;
use crate::proto::versioned::{encode_change, encode_closed, encode_versioned_event};
use crate::topic::history::PushError;
use crate::topic::{Entry, Epoch, History, HistoryLimits, PatchError, StateDoc, Version};

/// What a topic holds.
#[derive(Debug)]
pub enum Content {
    /// Nothing published yet.
    Empty,
    /// An event stream.
    Events,
    /// A state document.
    State(StateDoc),
}

/// A topic's mutable part, under its lock.
#[derive(Debug)]
pub struct TopicState {
    /// Recent publications as encoded frames.
    pub history: History,
    /// Event stream or state document.
    pub content: Content,
    /// Terminal: nothing more is published.
    pub closed: bool,
    /// Removed from the registry by the sweep: whoever still holds it must look it up again.
    pub retired: bool,
}

impl TopicState {
    /// The topic's current version.
    pub fn version(&self) -> Version {
        self.history.version()
    }
}

/// One topic.
#[derive(Debug)]
pub struct Topic {
    /// The validated name, shared with frames and indexes.
    pub name: Arc<str>,
    /// History, content and status.
    pub state: Mutex<TopicState>,
    /// Connections subscribed to this exact topic, on every shard. A topic with subscribers
    /// is never swept: their replay marks are offsets of its epoch.
    pub subscribers: AtomicUsize,
}

/// Why a change to a topic was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The topic was swept from the registry meanwhile; look it up again.
    #[error("topic {0} was retired")]
    Retired(String),
    /// The topic was closed; it takes no more publications.
    #[error("topic {0} is closed")]
    Closed(String),
    /// An event published to a state topic, or state written to an event topic.
    #[error("topic {topic} holds {holds}; it cannot take {wanted}")]
    WrongKind {
        /// The topic.
        topic: String,
        /// What it holds.
        holds: &'static str,
        /// What was attempted.
        wanted: &'static str,
    },
    /// `If-Match` named another version.
    #[error("the topic is at version {current}, not the one in If-Match")]
    PreconditionFailed {
        /// The current version.
        current: Version,
    },
    /// A JSON Patch that does not apply; the document is unchanged.
    #[error(transparent)]
    Patch(#[from] PatchError),
}

/// A publication to hand to the shards.
#[derive(Debug, Clone)]
pub struct Publication {
    /// The topic.
    pub topic: Arc<str>,
    /// Its offset.
    pub offset: u64,
    /// The encoded frame shared by every subscriber.
    pub frame: Bytes,
    /// Event data, for subscribers' filters (none for state changes).
    pub data: Option<Bytes>,
}

/// All topics of a node.
#[derive(Debug)]
pub struct Topics {
    map: RwLock<HashMap<Arc<str>, Arc<Topic>>>,
    limits: HistoryLimits,
}

impl Topics {
    /// An empty registry whose topics keep history within `limits`.
    pub fn new(limits: HistoryLimits) -> Topics {
        Topics {
            map: RwLock::new(HashMap::new()),
            limits,
        }
    }

    /// A topic, if known.
    pub fn get(&self, name: &str) -> Option<Arc<Topic>> {
        self.map.read().get(name).cloned()
    }

    /// A topic, created (with a fresh epoch) if unknown; `created` runs when it is new.
    /// `name` must be validated.
    pub fn get_or_create(&self, name: &str, created: impl FnOnce()) -> Arc<Topic> {
        if let Some(t) = self.get(name) {
            return t;
        }
        let mut map = self.map.write();
        map.entry(Arc::from(name))
            .or_insert_with_key(|key| {
                created();
                Arc::new(Topic {
                    name: key.clone(),
                    state: Mutex::new(TopicState {
                        history: History::new(Epoch::random(), self.limits),
                        content: Content::Empty,
                        closed: false,
                        retired: false,
                    }),
                    subscribers: AtomicUsize::new(0),
                })
            })
            .clone()
    }
}

impl Topics {
    /// Removes topics nobody needs any more: no subscriber, nothing left in history (by
    /// age), and not a state document (a document is data; it stays). Returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut map = self.map.write();
        let before = map.len();
        map.retain(|_, topic| {
            let mut state = topic.state.lock();
            state.history.evict(now);
            let idle = topic.subscribers.load(Ordering::SeqCst) == 0
                && state.history.is_empty()
                && !matches!(state.content, Content::State(_));
            if idle {
                state.retired = true;
            }
            !idle
        });
        before - map.len()
    }

    /// How many topics are known.
    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    /// Whether no topic is known.
    pub fn is_empty(&self) -> bool {
        self.map.read().is_empty()
    }
}

impl Topic {
    /// Appends an event; `hand_off` runs under the lock with the publication.
    pub fn publish_event(
        &self,
        data: &[u8],
        hand_off: impl FnOnce(Publication),
    ) -> Result<u64, TopicError> {
        let mut state = self.state.lock();
        self.check_open(&state)?;
        match state.content {
            Content::Empty => state.content = Content::Events,
            Content::Events => {}
            Content::State(_) => return Err(self.wrong_kind("a state document", "events")),
        }
        let offset = state.history.last_offset() + 1;
        let version = Version::new(state.history.epoch(), offset).to_buf();
        let ts = now_ms();
        let frame = encode_versioned_event(&self.name, offset, version.as_str(), data, ts);
        // History and filters read the data inside the frame, not a copy of it: the frame
        // ends with `<data>,"ts":<ts>}`.
        let tail = br#","ts":"#.len() + itoa::Buffer::new().format(ts).len() + 1;
        let end = frame.len() - tail;
        let data = frame.slice(end - data.len()..end);
        push(
            &mut state.history,
            Entry::new(offset, frame.clone(), data.clone(), Instant::now()),
        );
        hand_off(Publication {
            topic: self.name.clone(),
            offset,
            frame,
            data: Some(data),
        });
        Ok(offset)
    }

    /// Replaces or patches the state document. `change` gets the document and returns the
    /// change it made (none when nothing changed, and then nothing is published).
    pub fn write_state(
        &self,
        if_match: Option<&str>,
        change: impl FnOnce(&mut StateDoc) -> Result<Option<crate::topic::Change>, PatchError>,
        hand_off: impl FnOnce(Publication),
    ) -> Result<(Version, bool), TopicError> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        self.check_open(state)?;
        if let Some(if_match) = if_match
            && !state.history.version().matches_if_match(if_match)
        {
            return Err(TopicError::PreconditionFailed {
                current: state.history.version(),
            });
        }
        if matches!(state.content, Content::Events) {
            return Err(self.wrong_kind("an event stream", "state"));
        }
        // An empty topic becomes a state topic only if this write changes something: a
        // refused or empty first write leaves it as it was.
        let mut fresh = match state.content {
            Content::Empty => Some(StateDoc::restore(state.history.version(), Value::Null)),
            Content::Events | Content::State(_) => None,
        };
        let doc = match (&mut fresh, &mut state.content) {
            (Some(doc), _) => doc,
            (None, Content::State(doc)) => doc,
            (None, Content::Empty | Content::Events) => {
                unreachable!("an empty topic has a fresh document; events were refused above")
            }
        };
        let Some(change) = change(doc)? else {
            return Ok((state.history.version(), false));
        };
        if let Some(doc) = fresh {
            state.content = Content::State(doc);
        }
        let (old, new) = (change.old.to_buf(), change.new.to_buf());
        let frame = encode_change(
            &self.name,
            &change.diff,
            old.as_str(),
            new.as_str(),
            now_ms(),
        );
        let entry = Entry::new(
            change.new.offset,
            frame.clone(),
            change.diff.clone(),
            Instant::now(),
        );
        push(&mut state.history, entry);
        hand_off(Publication {
            topic: self.name.clone(),
            offset: change.new.offset,
            frame,
            data: None,
        });
        Ok((change.new, true))
    }

    /// Marks the topic terminal and tells its subscribers; closing twice is a no-op.
    pub fn close(&self, hand_off: impl FnOnce(Publication)) -> Result<Version, TopicError> {
        let mut state = self.state.lock();
        if state.retired {
            return Err(TopicError::Retired(self.name.to_string()));
        }
        let version = state.history.version();
        if !state.closed {
            state.closed = true;
            hand_off(Publication {
                topic: self.name.clone(),
                // Delivered to everyone subscribed, whatever they have seen.
                offset: u64::MAX,
                frame: encode_closed(&self.name, version.to_buf().as_str(), now_ms()),
                data: None,
            });
        }
        Ok(version)
    }

    fn check_open(&self, state: &TopicState) -> Result<(), TopicError> {
        if state.retired {
            return Err(TopicError::Retired(self.name.to_string()));
        }
        if state.closed {
            return Err(TopicError::Closed(self.name.to_string()));
        }
        Ok(())
    }

    fn wrong_kind(&self, holds: &'static str, wanted: &'static str) -> TopicError {
        TopicError::WrongKind {
            topic: self.name.to_string(),
            holds,
            wanted,
        }
    }
}

/// Appends to history. Offsets come from the history itself (or the state document that
/// shares its epoch and counter), so they always increase.
fn push(history: &mut History, entry: Entry) {
    if let Err(PushError::OutOfOrder { offset, last }) = history.push(entry, Instant::now()) {
        tracing::error!(offset, last, "history offsets out of order");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sweep_keeps_what_is_needed() {
        let limits = HistoryLimits {
            max_len: 10,
            max_age: Duration::from_secs(60),
        };
        let topics = Topics::new(limits);
        let events = topics.get_or_create("a:events", || {});
        events.publish_event(b"1", |_| {}).unwrap();
        let watched = topics.get_or_create("a:watched", || {});
        watched.publish_event(b"1", |_| {}).unwrap();
        watched.subscribers.fetch_add(1, Ordering::SeqCst);
        let doc = topics.get_or_create("a:doc", || {});
        doc.write_state(None, |d| Ok(d.replace(serde_json::json!({"k": 1}))), |_| {})
            .unwrap();
        // History keeps the data as a slice of the event's frame.
        assert_eq!(&fresh_data(&topics, "a:watched")[..], b"1");
        // Nothing has aged yet.
        assert_eq!(topics.sweep(Instant::now()), 0);
        // Past the history age: only the unwatched event topic goes.
        assert_eq!(topics.sweep(Instant::now() + Duration::from_secs(61)), 1);
        assert!(topics.get("a:events").is_none());
        assert!(topics.get("a:watched").is_some() && topics.get("a:doc").is_some());
        // Whoever still held the swept topic is told to look it up again.
        assert_eq!(
            events.publish_event(b"2", |_| {}),
            Err(TopicError::Retired("a:events".into()))
        );
        let fresh = topics.get_or_create("a:events", || {});
        assert_eq!(
            fresh.publish_event(b"2", |_| {}),
            Ok(1),
            "a new epoch starts at 1"
        );
    }

    fn fresh_data(topics: &Topics, name: &str) -> Bytes {
        let topic = topics.get(name).unwrap();
        let state = topic.state.lock();
        state.history.iter().last().unwrap().data.clone()
    }
}
