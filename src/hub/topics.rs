//! The topics a node knows: each one's history, state document and status.
//!
//! Every change to a topic happens under its lock, and so does the hand-off of the change's
//! frame to the shards: each shard therefore sees a topic's publications in offset order,
//! and a subscriber that reads the topic under the same lock (snapshot or replay) knows
//! exactly which offsets it already has.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde_json::Value;

use super::backlog::Ticket;
use crate::bus::{Applied, Body, Sequenced, TopicView, ViewContent};
use crate::proto::message::now_ms;
use crate::proto::versioned::{
    encode_change, encode_closed, encode_history_truncated, encode_versioned_event,
};
use crate::topic::history::PushError;
use crate::topic::state::Prepared;
use crate::topic::{
    Entry, Epoch, History, HistoryLimits, StateDoc, StateError, StateLimits, Version,
};

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
    /// Whether this node's copy follows the bus. Always true on a local bus. With a shared
    /// bus a topic is cold until a subscriber or poll needs it: then it is loaded from the
    /// engine, and subscribers that came meanwhile are attached once it is (see
    /// `hub::cluster`).
    pub synced: bool,
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
    /// Publications handed to the shards and not yet written out by all of them (see
    /// `topic_queue_len`).
    pub queued: AtomicUsize,
    /// The oldest offset its history still holds, so the shared history budget can tell a
    /// stale record of an entry already evicted without taking this topic's lock.
    first_held: AtomicU64,
    /// Long-polls waiting for this topic's next publication, and their wake-up. Publishing
    /// notifies only while the count is above zero, so topics nobody long-polls pay one
    /// atomic load.
    pub pollers: AtomicUsize,
    /// Notified after each publication while `pollers` is above zero.
    pub changed: tokio::sync::Notify,
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
    /// A state write that does not apply or passes a bound; the document is unchanged.
    #[error(transparent)]
    State(#[from] StateError),
    /// The registry holds `max_topics` topics; a new one cannot be created.
    #[error("the gateway holds {limit} topics, its limit; idle ones are forgotten over time")]
    TooManyTopics {
        /// The configured limit.
        limit: usize,
    },
    /// State documents take `state_memory_budget` bytes already.
    #[error("state documents take the gateway's whole state memory budget ({budget} bytes)")]
    StateBudget {
        /// The configured budget.
        budget: usize,
    },
}

/// A publication to hand to the shards, shared by all of them behind one `Arc`.
#[derive(Debug)]
pub struct Publication {
    /// The topic.
    pub topic: Arc<str>,
    /// Its offset (`u64::MAX` for `closed`, which every subscriber gets).
    pub offset: u64,
    /// The encoded WebSocket frame shared by every WebSocket subscriber.
    pub frame: Bytes,
    /// Event data, for subscribers' filters (none for state changes).
    pub data: Option<Bytes>,
    /// Its place in the publish queues, given back when the last shard is done with it.
    pub ticket: Option<Ticket>,
    /// Its SSE event, built from `frame` the first time any shard has an SSE subscriber
    /// for it, then shared like the frame.
    sse: OnceLock<Option<SseEvent>>,
    /// Its frame compressed (permessage-deflate), built the first time any shard has a
    /// subscriber that negotiated it, then shared like the frame.
    deflated: crate::proto::deflate::SharedDeflate,
    /// A rebase: the topic's history was replaced (a new epoch, or history the engine no
    /// longer has). Every subscriber gets `frame` and then continues after this offset.
    pub rebase: Option<u64>,
}

/// A publication's SSE encoding, and the version it carries (for multi-topic cursors).
#[derive(Debug)]
pub struct SseEvent {
    /// The event's bytes.
    pub event: crate::proto::sse::Event,
    /// Its version, parsed once.
    pub version: Option<Version>,
}

impl Publication {
    /// A publication with no ticket yet.
    pub fn new(topic: Arc<str>, offset: u64, frame: Bytes, data: Option<Bytes>) -> Publication {
        Publication {
            topic,
            offset,
            frame,
            data,
            ticket: None,
            sse: OnceLock::new(),
            deflated: Default::default(),
            rebase: None,
        }
    }

    /// The offset a rebase publication is sent with: past every subscriber's mark except
    /// those that must not get it (a topic already closed for them, or a subscription
    /// still waiting for the topic to load, both at `u64::MAX`).
    pub const REBASE: u64 = u64::MAX - 1;

    /// Its frame compressed for a connection with `window`, built on first use (with
    /// `codec`) and shared; `None` when it goes uncompressed (under `deflate_min_bytes`, or
    /// it does not shrink).
    pub fn deflated(
        &self,
        window: crate::proto::deflate::WindowBits,
        codec: &mut crate::proto::deflate::Codec,
    ) -> Option<Bytes> {
        self.deflated.frame(&self.frame, window, codec)
    }

    /// Its SSE event, built on first use.
    pub fn sse(&self) -> Option<&SseEvent> {
        self.sse
            .get_or_init(|| {
                let event = crate::proto::sse::encode(&self.frame)?;
                let version = event.position.as_ref().and_then(|(_, v)| v.parse().ok());
                Some(SseEvent { event, version })
            })
            .as_ref()
    }
}

/// The bounds of a node's topics.
#[derive(Debug, Clone, Copy)]
pub struct TopicLimits {
    /// Each topic's history.
    pub history: HistoryLimits,
    /// Bytes of history all topics together keep (`history_memory_budget`).
    pub history_budget: usize,
    /// Most topics at once (`max_topics`).
    pub max_topics: usize,
    /// Each state write's bounds.
    pub state: StateLimits,
    /// Footprint of all state documents together (`state_memory_budget`).
    pub state_budget: usize,
}

impl Default for TopicLimits {
    fn default() -> TopicLimits {
        TopicLimits {
            history: HistoryLimits::default(),
            history_budget: usize::MAX,
            max_topics: usize::MAX,
            state: StateLimits::default(),
            state_budget: usize::MAX,
        }
    }
}

/// A history entry of some topic, in publication order across topics, so the shared
/// history budget evicts the oldest first.
#[derive(Debug)]
struct Held {
    topic: Weak<Topic>,
    offset: u64,
}

impl Held {
    /// Whether the entry is still in its topic's history.
    fn is_live(&self) -> bool {
        self.topic
            .upgrade()
            .is_some_and(|t| self.offset >= t.first_held.load(Ordering::Acquire))
    }
}

/// All topics of a node.
#[derive(Debug)]
pub struct Topics {
    map: RwLock<HashMap<Arc<str>, Arc<Topic>>>,
    limits: TopicLimits,
    /// Bytes of history held by all topics.
    history_bytes: AtomicUsize,
    /// Entries held by all topics.
    history_entries: AtomicUsize,
    /// Every entry pushed and not yet known to be gone, oldest first. Records of entries
    /// that their own topic evicted go stale and are compacted away once they outnumber
    /// the live ones, so this never holds more than about twice the entries held.
    order: Mutex<VecDeque<Held>>,
    /// Footprint of all state documents.
    state_bytes: AtomicUsize,
    /// New topics start cold: their versions come from a shared bus.
    shared_bus: bool,
}

/// Records kept beyond twice the live entries before the order queue is compacted.
const ORDER_SLACK: usize = 1024;

impl Topics {
    /// An empty registry whose topics keep within `limits`, on a local bus.
    #[cfg(test)]
    pub fn new(limits: TopicLimits) -> Topics {
        Topics::with_bus(limits, false)
    }

    /// As [`Topics::new`]; with `shared_bus`, topics start cold (see [`TopicState::synced`]).
    pub fn with_bus(limits: TopicLimits, shared_bus: bool) -> Topics {
        Topics {
            shared_bus,
            map: RwLock::new(HashMap::new()),
            limits,
            history_bytes: AtomicUsize::new(0),
            history_entries: AtomicUsize::new(0),
            order: Mutex::new(VecDeque::new()),
            state_bytes: AtomicUsize::new(0),
        }
    }

    /// The bounds in force.
    pub fn limits(&self) -> &TopicLimits {
        &self.limits
    }

    /// A topic, if known.
    pub fn get(&self, name: &str) -> Option<Arc<Topic>> {
        self.map.read().get(name).cloned()
    }

    /// The topics whose names pass `matches`, at most `limit` of them. A scan of the
    /// registry (bounded by `max_topics`), for the rare resume of an SSE pattern stream.
    pub fn matching(&self, limit: usize, mut matches: impl FnMut(&str) -> bool) -> Vec<Arc<Topic>> {
        self.map
            .read()
            .iter()
            .filter(|(name, _)| matches(name))
            .take(limit)
            .map(|(_, topic)| topic.clone())
            .collect()
    }

    /// A topic, created (with a fresh epoch) if unknown and there is room; `created` runs
    /// when it is new. `name` must be validated.
    pub fn get_or_create(
        &self,
        name: &str,
        created: impl FnOnce(),
    ) -> Result<Arc<Topic>, TopicError> {
        if let Some(t) = self.get(name) {
            return Ok(t);
        }
        let mut map = self.map.write();
        if let Some(t) = map.get(name) {
            return Ok(t.clone());
        }
        if map.len() >= self.limits.max_topics {
            return Err(TopicError::TooManyTopics {
                limit: self.limits.max_topics,
            });
        }
        created();
        let name: Arc<str> = Arc::from(name);
        let topic = Arc::new(Topic {
            name: name.clone(),
            state: Mutex::new(TopicState {
                history: History::new(Epoch::random(), self.limits.history),
                content: Content::Empty,
                closed: false,
                retired: false,
                // Reserved topics (the gateway's own, such as its stats) are this node's:
                // they never go through a shared bus.
                synced: !self.shared_bus || crate::topic::is_reserved(&name),
            }),
            subscribers: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            first_held: AtomicU64::new(1),
            pollers: AtomicUsize::new(0),
            changed: tokio::sync::Notify::new(),
        });
        map.insert(name, topic.clone());
        Ok(topic)
    }

    /// Removes topics nobody needs any more: no subscriber, nothing left in history (by
    /// age), and not a state document (a document is data; it stays). Returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut map = self.map.write();
        let before = map.len();
        map.retain(|_, topic| {
            let mut state = topic.state.lock();
            self.changed_history(topic, &mut state.history, |h| {
                h.evict(now);
            });
            // A topic with publications still on their way to the shards is kept: a new
            // topic of the same name must not receive them.
            // With a shared bus a cold copy is only a cache: documents live in the engine.
            let unneeded = match &state.content {
                Content::State(_) => self.shared_bus && !state.synced,
                Content::Empty | Content::Events => state.history.is_empty(),
            };
            let idle = topic.subscribers.load(Ordering::SeqCst) == 0
                && topic.queued.load(Ordering::Acquire) == 0
                && topic.pollers.load(Ordering::Acquire) == 0
                && unneeded;
            if idle {
                state.retired = true;
                if let Content::State(doc) = &state.content {
                    self.state_bytes
                        .fetch_sub(doc.footprint(), Ordering::AcqRel);
                }
            }
            !idle
        });
        before - map.len()
    }

    /// Bytes of history all topics hold.
    pub fn history_bytes(&self) -> usize {
        self.history_bytes.load(Ordering::Relaxed)
    }

    /// Footprint of all state documents.
    pub fn state_bytes(&self) -> usize {
        self.state_bytes.load(Ordering::Relaxed)
    }

    /// Runs `change` on a topic's history (under the topic's lock) and keeps the shared
    /// counters and the topic's `first_held` true to what it did.
    fn changed_history(
        &self,
        topic: &Topic,
        history: &mut History,
        change: impl FnOnce(&mut History),
    ) {
        let (bytes, len) = (history.bytes(), history.len());
        change(history);
        adjust(&self.history_bytes, bytes, history.bytes());
        adjust(&self.history_entries, len, history.len());
        topic
            .first_held
            .store(history.first_available(), Ordering::Release);
    }

    /// Appends to a topic's history (under its lock) and records the entry for the shared
    /// budget. Offsets come from the history itself (or the state document that shares its
    /// epoch and counter), so they always increase.
    fn push(&self, topic: &Arc<Topic>, history: &mut History, entry: Entry) {
        let offset = entry.offset;
        let now = entry.at;
        self.changed_history(topic, history, |h| {
            if let Err(PushError::OutOfOrder { offset, last }) = h.push(entry, now) {
                tracing::error!(offset, last, "history offsets out of order");
            }
        });
        if history.last_offset() == offset && !history.is_empty() {
            let mut order = self.order.lock();
            order.push_back(Held {
                topic: Arc::downgrade(topic),
                offset,
            });
            let live = self.history_entries.load(Ordering::Relaxed);
            if order.len() > 2 * live + ORDER_SLACK {
                order.retain(Held::is_live);
            }
        }
    }

    /// Evicts the oldest entries of any topic until all history fits its budget. Called
    /// with no topic lock held, after a publication.
    fn enforce_history_budget(&self) {
        while self.history_bytes.load(Ordering::Relaxed) > self.limits.history_budget {
            let Some(held) = self.order.lock().pop_front() else {
                return;
            };
            let Some(topic) = held.topic.upgrade() else {
                continue;
            };
            let mut state = topic.state.lock();
            self.changed_history(&topic, &mut state.history, |h| {
                h.evict_through(held.offset);
            });
        }
    }
}

/// Moves `counter` by the change from `before` to `after`.
fn adjust(counter: &AtomicUsize, before: usize, after: usize) {
    if after >= before {
        counter.fetch_add(after - before, Ordering::Relaxed);
    } else {
        counter.fetch_sub(before - after, Ordering::Relaxed);
    }
}

impl Topics {
    /// Appends an event to `topic`; `hand_off` runs under the topic's lock with the
    /// publication.
    pub fn publish_event(
        &self,
        topic: &Arc<Topic>,
        data: &[u8],
        hand_off: impl FnOnce(Publication),
    ) -> Result<u64, TopicError> {
        let mut state = topic.state.lock();
        topic.check_open(&state)?;
        match state.content {
            Content::Empty => state.content = Content::Events,
            Content::Events => {}
            Content::State(_) => return Err(topic.wrong_kind("a state document", "events")),
        }
        let offset = state.history.last_offset() + 1;
        let (frame, data) = event_frame(&topic.name, state.history.epoch(), offset, data, now_ms());
        let entry = Entry::new(offset, frame.clone(), data.clone(), Instant::now());
        self.push(topic, &mut state.history, entry);
        hand_off(Publication::new(
            topic.name.clone(),
            offset,
            frame,
            Some(data),
        ));
        drop(state);
        self.enforce_history_budget();
        Ok(offset)
    }

    /// Replaces or patches `topic`'s state document. `change` gets the document and the
    /// limits and prepares the new document (none when nothing would change, and then
    /// nothing is published). Its growth is then taken from `state_memory_budget` with one
    /// atomic step before it is committed, so concurrent writes to different topics cannot
    /// pass the budget together.
    pub fn write_state(
        &self,
        topic: &Arc<Topic>,
        if_match: Option<&str>,
        change: impl FnOnce(&StateDoc, &StateLimits) -> Result<Option<Prepared>, StateError>,
        hand_off: impl FnOnce(Publication),
    ) -> Result<(Version, bool), TopicError> {
        let mut guard = topic.state.lock();
        let state = &mut *guard;
        topic.check_open(state)?;
        if let Some(if_match) = if_match
            && !state.history.version().matches_if_match(if_match)
        {
            return Err(TopicError::PreconditionFailed {
                current: state.history.version(),
            });
        }
        if matches!(state.content, Content::Events) {
            return Err(topic.wrong_kind("an event stream", "state"));
        }
        // An empty topic becomes a state topic only if this write changes something: a
        // refused or empty first write leaves it as it was.
        let mut fresh = match state.content {
            Content::Empty => Some(StateDoc::restore(state.history.version(), Value::Null)),
            Content::Events | Content::State(_) => None,
        };
        let is_fresh = fresh.is_some();
        let doc = match (&mut fresh, &mut state.content) {
            (Some(doc), _) => doc,
            (None, Content::State(doc)) => doc,
            (None, Content::Empty | Content::Events) => {
                unreachable!("an empty topic has a fresh document; events were refused above")
            }
        };
        let old_footprint = if is_fresh { 0 } else { doc.footprint() };
        let Some(prepared) = change(doc, &self.limits.state)? else {
            return Ok((state.history.version(), false));
        };
        let new_footprint = prepared.footprint();
        if new_footprint > old_footprint {
            let growth = new_footprint - old_footprint;
            let budget = self.limits.state_budget;
            self.state_bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    (used.saturating_add(growth) <= budget).then_some(used + growth)
                })
                .map_err(|_| TopicError::StateBudget { budget })?;
        } else {
            self.state_bytes
                .fetch_sub(old_footprint - new_footprint, Ordering::AcqRel);
        }
        let change = doc.commit(prepared);
        if let Some(doc) = fresh {
            state.content = Content::State(doc);
        }
        let (old, new) = (change.old.to_buf(), change.new.to_buf());
        let frame = encode_change(
            &topic.name,
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
        self.push(topic, &mut state.history, entry);
        hand_off(Publication::new(
            topic.name.clone(),
            change.new.offset,
            frame,
            None,
        ));
        drop(guard);
        self.enforce_history_budget();
        Ok((change.new, true))
    }

    /// Marks `topic` terminal and tells its subscribers; closing twice is a no-op.
    pub fn close(
        &self,
        topic: &Arc<Topic>,
        hand_off: impl FnOnce(Publication),
    ) -> Result<Version, TopicError> {
        let mut state = topic.state.lock();
        if state.retired {
            return Err(TopicError::Retired(topic.name.to_string()));
        }
        let version = state.history.version();
        if !state.closed {
            state.closed = true;
            hand_off(Publication::new(
                topic.name.clone(),
                // Delivered to everyone subscribed, whatever they have seen.
                u64::MAX,
                encode_closed(&topic.name, version.to_buf().as_str(), now_ms()),
                None,
            ));
        }
        Ok(version)
    }
}

/// An event's frame, and its data as a slice of the frame: history and filters read the
/// data inside the frame, not a copy of it (the frame ends with `<data>,"ts":<ts>}`).
fn event_frame(name: &str, epoch: Epoch, offset: u64, data: &[u8], ts: u64) -> (Bytes, Bytes) {
    let version = Version::new(epoch, offset).to_buf();
    let frame = encode_versioned_event(name, offset, version.as_str(), data, ts);
    let tail = br#","ts":"#.len() + itoa::Buffer::new().format(ts).len() + 1;
    let end = frame.len() - tail;
    let data = frame.slice(end - data.len()..end);
    (frame, data)
}

/// The frame of a publication the bus sequenced, and an event's data (for filters).
pub fn encode_sequenced(name: &str, seq: &Sequenced) -> (Bytes, Option<Bytes>) {
    match &seq.body {
        Body::Event(data) => {
            let (frame, data) = event_frame(name, seq.epoch, seq.offset, data, seq.ts);
            (frame, Some(data))
        }
        Body::Change(diff) => (
            change_frame(name, seq.epoch, seq.offset, diff, seq.ts),
            None,
        ),
        Body::Closed => {
            let version = Version::new(seq.epoch, seq.offset).to_buf();
            (encode_closed(name, version.as_str(), seq.ts), None)
        }
    }
}

/// A state change's frame from `offset - 1` to `offset`.
fn change_frame(name: &str, epoch: Epoch, offset: u64, diff: &[u8], ts: u64) -> Bytes {
    let old = Version::new(epoch, offset.saturating_sub(1)).to_buf();
    let new = Version::new(epoch, offset).to_buf();
    encode_change(name, diff, old.as_str(), new.as_str(), ts)
}

impl Topics {
    /// Applies a publication the bus sequenced, in offset order: encoded once for this node,
    /// kept in the local history, handed to the shards (`hand_off` runs under the topic's
    /// lock, as for local publications).
    pub fn apply(
        &self,
        topic: &Arc<Topic>,
        seq: &Sequenced,
        mut hand_off: impl FnMut(Publication),
    ) -> Applied {
        let mut guard = topic.state.lock();
        if guard.retired || !guard.synced {
            return Applied::Cold;
        }
        let applied = self.apply_locked(topic, &mut guard, seq, &mut hand_off);
        drop(guard);
        if applied == Applied::Done {
            self.enforce_history_budget();
        }
        applied
    }

    fn apply_locked(
        &self,
        topic: &Arc<Topic>,
        state: &mut TopicState,
        seq: &Sequenced,
        hand_off: &mut impl FnMut(Publication),
    ) -> Applied {
        let epoch = state.history.epoch();
        if seq.epoch != epoch {
            return Applied::Resync;
        }
        let last = state.history.last_offset();
        let name = &topic.name;
        match &seq.body {
            Body::Closed if seq.offset > last => Applied::Gap { after: last },
            Body::Closed if state.closed => Applied::Duplicate,
            Body::Closed => {
                state.closed = true;
                let version = Version::new(epoch, last).to_buf();
                hand_off(Publication::new(
                    name.clone(),
                    u64::MAX,
                    encode_closed(name, version.as_str(), seq.ts),
                    None,
                ));
                Applied::Done
            }
            _ if seq.offset <= last => Applied::Duplicate,
            _ if seq.offset > last + 1 => Applied::Gap { after: last },
            Body::Event(data) => {
                match state.content {
                    Content::Empty => state.content = Content::Events,
                    Content::Events => {}
                    Content::State(_) => return Applied::Resync,
                }
                let (frame, data) = event_frame(name, epoch, seq.offset, data, seq.ts);
                let entry = Entry::new(seq.offset, frame.clone(), data.clone(), Instant::now());
                self.push(topic, &mut state.history, entry);
                hand_off(Publication::new(
                    name.clone(),
                    seq.offset,
                    frame,
                    Some(data),
                ));
                Applied::Done
            }
            Body::Change(diff) => {
                if matches!(state.content, Content::Events) {
                    return Applied::Resync;
                }
                if matches!(state.content, Content::Empty) {
                    state.content =
                        Content::State(StateDoc::restore(Version::new(epoch, last), Value::Null));
                }
                let Content::State(doc) = &mut state.content else {
                    return Applied::Resync;
                };
                let before = doc.footprint();
                if doc
                    .apply_remote(diff, Version::new(epoch, seq.offset))
                    .is_err()
                {
                    return Applied::Resync;
                }
                adjust(&self.state_bytes, before, doc.footprint());
                let frame = change_frame(name, epoch, seq.offset, diff, seq.ts);
                let entry = Entry::new(seq.offset, frame.clone(), diff.clone(), Instant::now());
                self.push(topic, &mut state.history, entry);
                hand_off(Publication::new(name.clone(), seq.offset, frame, None));
                Applied::Done
            }
        }
    }

    /// Makes this node's copy of `topic` the engine's `view`, and marks it synced.
    ///
    /// When the view continues what this node has (same epoch, its entries join up), only
    /// what is new is applied, as publications. Otherwise the copy is replaced, and if the
    /// topic was followed already its subscribers are told, since what they hold is no
    /// longer a position in this history: event subscribers get `history_truncated` (then
    /// the entries the engine still has), state subscribers a fresh snapshot. Never a silent
    /// skip.
    pub fn rebase(
        &self,
        topic: &Arc<Topic>,
        view: &TopicView,
        mut hand_off: impl FnMut(Publication),
    ) {
        let mut guard = topic.state.lock();
        if guard.retired {
            return;
        }
        let state = &mut *guard;
        let local = state.history.version();
        let kinds_agree = matches!(
            (&state.content, &view.content),
            (Content::Empty, _)
                | (Content::Events, ViewContent::Events)
                | (Content::State(_), ViewContent::State(_))
        );
        let joins = view.offset == local.offset
            || view
                .entries
                .first()
                .is_some_and(|e| e.offset <= local.offset + 1);
        if state.synced
            && view.epoch == local.epoch
            && view.offset >= local.offset
            && kinds_agree
            && joins
        {
            for entry in view.entries.iter().filter(|e| e.offset > local.offset) {
                let seq = Sequenced {
                    epoch: view.epoch,
                    offset: entry.offset,
                    ts: entry.ts,
                    body: match view.content {
                        ViewContent::State(_) => Body::Change(entry.payload.clone()),
                        ViewContent::Events | ViewContent::Empty => {
                            Body::Event(entry.payload.clone())
                        }
                    },
                };
                if self.apply_locked(topic, state, &seq, &mut hand_off) == Applied::Resync {
                    break;
                }
            }
            if view.closed {
                let seq = Sequenced {
                    epoch: view.epoch,
                    offset: view.offset,
                    ts: now_ms(),
                    body: Body::Closed,
                };
                self.apply_locked(topic, state, &seq, &mut hand_off);
            }
            if state.history.last_offset() == view.offset {
                drop(guard);
                self.enforce_history_budget();
                return;
            }
        }
        let was_followed = state.synced && topic.subscribers.load(Ordering::SeqCst) > 0;
        let first = view.entries.first().map_or(view.offset + 1, |e| e.offset);
        let limits = self.limits.history;
        self.changed_history(topic, &mut state.history, |h| {
            *h = History::starting_after(view.epoch, first - 1, limits);
        });
        let before = match &state.content {
            Content::State(doc) => doc.footprint(),
            Content::Empty | Content::Events => 0,
        };
        let was_state = matches!(state.content, Content::State(_));
        state.content = match &view.content {
            // A document the engine lost is `null` at the new version, for its
            // subscribers' sake: they get a snapshot of that.
            ViewContent::Empty if was_state && was_followed => Content::State(StateDoc::restore(
                Version::new(view.epoch, view.offset),
                Value::Null,
            )),
            ViewContent::Empty => Content::Empty,
            ViewContent::Events => Content::Events,
            ViewContent::State(doc) => Content::State(StateDoc::restore(
                Version::new(view.epoch, view.offset),
                doc.clone(),
            )),
        };
        let after = match &state.content {
            Content::State(doc) => doc.footprint(),
            Content::Empty | Content::Events => 0,
        };
        adjust(&self.state_bytes, before, after);
        state.closed = view.closed;
        state.synced = true;
        let name = &topic.name;
        let mut live = Vec::with_capacity(view.entries.len());
        for e in &view.entries {
            let (frame, data) = match view.content {
                ViewContent::State(_) => (
                    change_frame(name, view.epoch, e.offset, &e.payload, e.ts),
                    e.payload.clone(),
                ),
                ViewContent::Events | ViewContent::Empty => {
                    event_frame(name, view.epoch, e.offset, &e.payload, e.ts)
                }
            };
            let entry = Entry::new(e.offset, frame.clone(), data.clone(), Instant::now());
            self.push(topic, &mut state.history, entry);
            live.push((e.offset, frame, data));
        }
        if was_followed {
            let version = Version::new(view.epoch, view.offset).to_buf();
            let (frame, mark) = match &mut state.content {
                Content::State(doc) => (doc.snapshot(name), view.offset),
                Content::Empty | Content::Events => {
                    let first = Version::new(view.epoch, first).to_buf();
                    let frame = encode_history_truncated(
                        name,
                        Some(local.to_buf().as_str()),
                        first.as_str(),
                        version.as_str(),
                        now_ms(),
                    );
                    (
                        frame,
                        view.entries.first().map_or(view.offset, |e| e.offset - 1),
                    )
                }
            };
            let mut reset = Publication::new(name.clone(), Publication::REBASE, frame, None);
            reset.rebase = Some(mark);
            hand_off(reset);
            if !matches!(state.content, Content::State(_)) {
                for (offset, frame, data) in live {
                    hand_off(Publication::new(name.clone(), offset, frame, Some(data)));
                }
            }
            if view.closed {
                hand_off(Publication::new(
                    name.clone(),
                    u64::MAX,
                    encode_closed(name, version.as_str(), now_ms()),
                    None,
                ));
            }
        }
        drop(guard);
        self.enforce_history_budget();
    }

    /// Marks `topic` cold, if nothing on this node follows it any more: its copy stops
    /// following the bus, and the next subscriber or poll loads it afresh. Returns whether
    /// it did (the bus then stops listening for the topic).
    pub fn cool(&self, topic: &Topic) -> bool {
        let mut state = topic.state.lock();
        let idle = topic.subscribers.load(Ordering::SeqCst) == 0
            && topic.pollers.load(Ordering::Acquire) == 0;
        if idle {
            state.synced = false;
        }
        idle
    }

    /// The topics this node follows on the bus (a subscriber or a poll needs them).
    pub fn followed(&self) -> Vec<Arc<Topic>> {
        self.map
            .read()
            .values()
            .filter(|t| {
                t.subscribers.load(Ordering::SeqCst) > 0 || t.pollers.load(Ordering::Acquire) > 0
            })
            .cloned()
            .collect()
    }
}

impl Topic {
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

/// One topic as `GET /v1/topics` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TopicSummary {
    /// The topic's name.
    pub topic: String,
    /// `events`, `state`, or `empty` (nothing published yet).
    pub kind: &'static str,
    /// The current version, `epoch:offset`.
    pub version: String,
    /// Connections subscribed to this exact topic, on every shard (pattern subscribers
    /// are not counted: a pattern is not tied to a topic).
    pub subscribers: usize,
    /// Publications its history holds now.
    pub history: usize,
    /// Bytes its history holds now.
    pub history_bytes: usize,
    /// Whether the topic is closed.
    pub closed: bool,
}

impl Topics {
    /// The topics whose names start with `prefix` and sort after `after` (from the first
    /// for `None`), in byte order, at most `limit`, and whether more follow. One pass over the registry keeping the
    /// `limit + 1` smallest names, so a page costs O(topics × log limit) and holds
    /// `limit + 1` names, however many topics there are; each topic's lock is taken only
    /// for the page's own topics, after the registry's lock is released.
    pub fn page(
        &self,
        after: Option<&str>,
        prefix: &str,
        limit: usize,
    ) -> (Vec<TopicSummary>, bool) {
        let mut smallest: std::collections::BinaryHeap<Arc<str>> =
            std::collections::BinaryHeap::with_capacity(limit + 1);
        let topics: Vec<Arc<Topic>> = {
            let map = self.map.read();
            for name in map.keys() {
                if !name.starts_with(prefix) || after.is_some_and(|after| &**name <= after) {
                    continue;
                }
                if smallest.len() <= limit {
                    smallest.push(name.clone());
                } else if smallest.peek().is_some_and(|largest| name < largest) {
                    smallest.pop();
                    smallest.push(name.clone());
                }
            }
            let names = smallest.into_sorted_vec();
            names.iter().filter_map(|n| map.get(n).cloned()).collect()
        };
        let more = topics.len() > limit;
        let page = topics
            .iter()
            .take(limit)
            .map(|topic| {
                let state = topic.state.lock();
                TopicSummary {
                    topic: topic.name.to_string(),
                    kind: match state.content {
                        Content::Empty => "empty",
                        Content::Events => "events",
                        Content::State(_) => "state",
                    },
                    version: state.version().to_string(),
                    subscribers: topic.subscribers.load(Ordering::Relaxed),
                    history: state.history.len(),
                    history_bytes: state.history.bytes(),
                    closed: state.closed,
                }
            })
            .collect();
        (page, more)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn registry(history: HistoryLimits) -> Topics {
        Topics::new(TopicLimits {
            history,
            ..TopicLimits::default()
        })
    }

    #[test]
    fn sweep_keeps_what_is_needed() {
        let topics = registry(HistoryLimits {
            max_len: 10,
            max_age: Duration::from_secs(60),
            max_bytes: usize::MAX,
        });
        let events = topics.get_or_create("a:events", || {}).unwrap();
        topics.publish_event(&events, b"1", |_| {}).unwrap();
        let watched = topics.get_or_create("a:watched", || {}).unwrap();
        topics.publish_event(&watched, b"1", |_| {}).unwrap();
        watched.subscribers.fetch_add(1, Ordering::SeqCst);
        let doc = topics.get_or_create("a:doc", || {}).unwrap();
        topics
            .write_state(
                &doc,
                None,
                |d, l| d.prepare_replace(serde_json::json!({"k": 1}), l),
                |_| {},
            )
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
            topics.publish_event(&events, b"2", |_| {}),
            Err(TopicError::Retired("a:events".into()))
        );
        let fresh = topics.get_or_create("a:events", || {}).unwrap();
        assert_eq!(
            topics.publish_event(&fresh, b"2", |_| {}),
            Ok(1),
            "a new epoch starts at 1"
        );
        // Aged-out history is no longer counted.
        assert_eq!(topics.history_bytes(), history_of(&topics, "a:events"));
    }

    fn history_of(topics: &Topics, name: &str) -> usize {
        topics
            .get(name)
            .map_or(0, |t| t.state.lock().history.bytes())
    }

    #[test]
    fn the_shared_history_budget_evicts_the_oldest_first() {
        let topics = Topics::new(TopicLimits {
            history_budget: 20_000,
            ..TopicLimits::default()
        });
        let a = topics.get_or_create("t:a", || {}).unwrap();
        let b = topics.get_or_create("t:b", || {}).unwrap();
        let big = vec![b'1'; 3000];
        for _ in 0..3 {
            topics.publish_event(&a, &big, |_| {}).unwrap();
        }
        for _ in 0..6 {
            topics.publish_event(&b, &big, |_| {}).unwrap();
        }
        assert!(
            topics.history_bytes() <= 20_000,
            "{}",
            topics.history_bytes()
        );
        assert_eq!(
            topics.history_bytes(),
            history_of(&topics, "t:a") + history_of(&topics, "t:b")
        );
        // a's entries were the oldest: they went first, b kept its newest.
        let a_len = a.state.lock().history.len();
        let b_state = b.state.lock();
        assert_eq!(a_len, 0);
        assert_eq!(b_state.history.last_offset(), 6);
        assert!(b_state.history.len() >= 5, "{}", b_state.history.len());
        // What is evicted is reported as truncated on resume.
        assert!(!a.state.lock().history.since(0).is_exact());
    }

    #[test]
    fn topic_count_and_state_budget_refuse_cleanly() {
        let topics = Topics::new(TopicLimits {
            max_topics: 2,
            state_budget: 4096,
            ..TopicLimits::default()
        });
        let one = topics.get_or_create("s:1", || {}).unwrap();
        let _two = topics.get_or_create("s:2", || {}).unwrap();
        assert_eq!(
            topics.get_or_create("s:3", || {}).unwrap_err(),
            TopicError::TooManyTopics { limit: 2 }
        );
        assert!(
            topics.get_or_create("s:1", || {}).is_ok(),
            "known topics are found"
        );
        let small = serde_json::json!({"k": "v"});
        topics
            .write_state(
                &one,
                None,
                |d, l| d.prepare_replace(small.clone(), l),
                |_| {},
            )
            .unwrap();
        let used = topics.state_bytes();
        assert!(used > 0);
        let big = serde_json::json!({"k": "v".repeat(5000)});
        let refused =
            topics.write_state(&one, None, |d, l| d.prepare_replace(big.clone(), l), |_| {});
        assert_eq!(refused, Err(TopicError::StateBudget { budget: 4096 }));
        assert_eq!(
            topics.state_bytes(),
            used,
            "a refused write changes nothing"
        );
        let state = one.state.lock();
        let Content::State(doc) = &state.content else {
            panic!("a state topic");
        };
        assert_eq!(doc.doc(), &small);
    }

    #[test]
    fn sequenced_publications_apply_in_offset_order_only() {
        let topics = Topics::with_bus(TopicLimits::default(), true);
        let topic = topics.get_or_create("c:t", || {}).unwrap();
        let epoch = Epoch::from_u64(7);
        let seq = |offset: u64| Sequenced {
            epoch,
            offset,
            ts: 1,
            body: Body::Event(Bytes::from(format!("{{\"n\":{offset}}}"))),
        };
        let mut handed = Vec::new();
        assert_eq!(
            topics.apply(&topic, &seq(1), |p| handed.push(p.offset)),
            Applied::Cold,
            "a cold copy takes nothing"
        );
        let view = TopicView {
            epoch,
            offset: 2,
            content: ViewContent::Events,
            closed: false,
            entries: vec![
                crate::bus::ViewEntry {
                    offset: 1,
                    ts: 1,
                    payload: Bytes::from_static(b"1"),
                },
                crate::bus::ViewEntry {
                    offset: 2,
                    ts: 1,
                    payload: Bytes::from_static(b"2"),
                },
            ],
        };
        topics.rebase(&topic, &view, |p| handed.push(p.offset));
        assert!(handed.is_empty(), "loading a cold copy tells nobody");
        assert_eq!(topic.state.lock().history.version(), Version::new(epoch, 2));
        let mut apply = |s: Sequenced| topics.apply(&topic, &s, |p| handed.push(p.offset));
        assert_eq!(apply(seq(2)), Applied::Duplicate);
        assert_eq!(apply(seq(4)), Applied::Gap { after: 2 });
        assert_eq!(apply(seq(3)), Applied::Done);
        assert_eq!(apply(seq(4)), Applied::Done);
        let other = Sequenced {
            epoch: Epoch::from_u64(8),
            ..seq(5)
        };
        assert_eq!(apply(other), Applied::Resync, "another epoch reloads");
        let change = Sequenced {
            body: Body::Change(Bytes::from_static(b"[]")),
            ..seq(5)
        };
        assert_eq!(apply(change), Applied::Resync, "a change to an event topic");
        assert_eq!(handed, [3, 4]);
        // A continuation applies only what is new; a new epoch replaces and tells.
        topic.subscribers.fetch_add(1, Ordering::SeqCst);
        let next = TopicView {
            offset: 5,
            entries: vec![crate::bus::ViewEntry {
                offset: 5,
                ts: 1,
                payload: Bytes::from_static(b"5"),
            }],
            ..view.clone()
        };
        topics.rebase(&topic, &next, |p| handed.push(p.offset));
        assert_eq!(handed, [3, 4, 5]);
        let lost = TopicView {
            epoch: Epoch::from_u64(9),
            offset: 0,
            content: ViewContent::Empty,
            closed: false,
            entries: Vec::new(),
        };
        let mut rebased = Vec::new();
        topics.rebase(&topic, &lost, |p| rebased.push((p.offset, p.rebase)));
        assert_eq!(rebased, [(Publication::REBASE, Some(0))]);
        assert_eq!(
            topic.state.lock().history.version(),
            Version::new(Epoch::from_u64(9), 0)
        );
    }

    fn fresh_data(topics: &Topics, name: &str) -> Bytes {
        let topic = topics.get(name).unwrap();
        let state = topic.state.lock();
        state.history.iter().last().unwrap().data.clone()
    }

    #[test]
    fn concurrent_writes_to_different_documents_cannot_pass_the_state_budget() {
        let topics = Arc::new(Topics::new(TopicLimits {
            state_budget: 64 * 1024,
            ..TopicLimits::default()
        }));
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let topics = topics.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let t = topics
                            .get_or_create(&format!("race:{w}:{i}"), || {})
                            .unwrap();
                        let doc = serde_json::json!({"pad": "x".repeat(3000)});
                        let _ =
                            topics.write_state(&t, None, |d, l| d.prepare_replace(doc, l), |_| {});
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        assert!(
            topics.state_bytes() <= 64 * 1024,
            "{}",
            topics.state_bytes()
        );
        let held: usize = topics
            .map
            .read()
            .values()
            .map(|t| match &t.state.lock().content {
                Content::State(doc) => doc.footprint(),
                Content::Empty | Content::Events => 0,
            })
            .sum();
        assert_eq!(
            topics.state_bytes(),
            held,
            "the count is the documents' footprints"
        );
    }
}
