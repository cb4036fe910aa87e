//! The hub's side of a shared bus: what this node needs from it ([`Interest`]) and how
//! what it sequenced is applied here (the hub is the engine's [`Node`]).
//!
//! A topic is followed while a subscriber or a poll on this node needs it. Its first
//! subscriber makes the engine listen for it and load it; subscriptions that arrive before
//! the load waits in their shard's index and are attached when [`Job::Loaded`] reaches the
//! shard, under the topic's lock like any subscription, so each sees every offset exactly
//! once. Its last subscriber leaving makes the copy cold again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::job::Job;
use super::topics::{Publication, Topic, TopicError, encode_sequenced};
use super::{Hub, PollError, PublishError, Published, StateWritten, wake_pollers};
use crate::bus::redis::{Node, RedisBus, Refusal, StateRefusal};
use crate::bus::{Applied, Body, BusError, Sequenced, TopicView, ViewContent, covering_glob};
use crate::proto::message::now_ms;
use crate::topic::state::Prepared;
use crate::topic::{Pattern, StateDoc, StateError, StateLimits, Version, validate_topic};

/// What the shards tell a shared bus: the topics and patterns this node needs.
#[derive(Debug)]
pub(crate) struct Interest {
    bus: Arc<RedisBus>,
}

impl Interest {
    /// Interest for the shards, reported to `bus`.
    pub fn new(bus: Arc<RedisBus>) -> Interest {
        Interest { bus }
    }

    /// `topic` got its first subscriber on this node (a reserved topic is this node's
    /// own: the bus never hears of it).
    pub fn follow(&self, topic: &Arc<str>) {
        if !crate::topic::is_reserved(topic) {
            self.bus.follow(topic.clone());
        }
    }

    /// `topic` lost its last subscriber on this node.
    pub fn unfollow(&self, topic: &Arc<str>) {
        if !crate::topic::is_reserved(topic) {
            self.bus.unfollow(topic.clone());
        }
    }

    /// A subscription resumes from `from`, further back than this node's history.
    pub fn backfill(&self, topic: &Arc<str>, from: Version) {
        self.bus.backfill(topic.clone(), from);
    }

    /// A pattern subscription was added.
    pub fn follow_pattern(&self, pattern: &Pattern) {
        self.bus.follow_pattern(covering_glob(pattern));
    }

    /// A pattern subscription ended.
    pub fn unfollow_pattern(&self, pattern: &Pattern) {
        self.bus.unfollow_pattern(covering_glob(pattern));
    }
}

/// How long an applied publication waits for room in the publish queues before it waits
/// again. It never gives up (that would lose it): the engine stops reading meanwhile, and
/// Redis' own bound on a subscriber's output buffer ends the connection if this lasts,
/// after which the node reloads what it follows.
const APPLY_WAIT: Duration = Duration::from_secs(1);

impl Hub {
    fn sequenced_cost(&self, topic: &str, seq: &Sequenced) -> usize {
        let len = match &seq.body {
            Body::Event(data) | Body::Change(data) => data.len(),
            Body::Closed => 0,
        };
        self.queue_cost(topic, len)
    }
}

impl Node for Hub {
    fn apply<'a>(&'a self, name: &'a str, seq: &'a Sequenced) -> BoxFuture<'a, Applied> {
        Box::pin(async move {
            let Some(topic) = self.shared.topics.get(name) else {
                return Applied::Cold;
            };
            let cost = self.sequenced_cost(name, seq);
            let ticket = loop {
                if let Some(ticket) = self.shared.backlog.admit(&topic, cost, APPLY_WAIT).await {
                    break ticket;
                }
            };
            let mut ticket = Some(ticket);
            let applied = self
                .shared
                .topics
                .apply(&topic, seq, |p| self.hand_off(&topic, p, ticket.take()));
            if applied == Applied::Done {
                wake_pollers(&topic);
            }
            applied
        })
    }

    fn apply_matched<'a>(&'a self, name: &'a str, seq: &'a Sequenced) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            // Validated too: the name came from a Redis channel.
            let Ok(topic) = self.topic(name) else {
                return;
            };
            if topic.state.lock().synced {
                // Followed here: the topic's own channel brings it too, and whichever comes
                // first is applied (the other is a duplicate).
                let _ = self.apply(name, seq).await;
                return;
            }
            // Only pattern subscribers want it: hand it to them as it is, in the order the
            // channel keeps, without a local copy of the topic.
            let cost = self.sequenced_cost(name, seq);
            let Some(ticket) = self.shared.backlog.admit(&topic, cost, APPLY_WAIT).await else {
                return;
            };
            let (frame, data) = encode_sequenced(&topic.name, seq);
            let offset = match seq.body {
                Body::Closed => u64::MAX,
                Body::Event(_) | Body::Change(_) => seq.offset,
            };
            self.hand_off(
                &topic,
                Publication::new(topic.name.clone(), offset, frame, data),
                Some(ticket),
            );
        })
    }

    fn rebase(&self, name: &str, view: &TopicView) {
        let Ok(topic) = self.topic(name) else {
            return;
        };
        let backlog = &self.shared.backlog;
        self.shared.topics.rebase(&topic, view, |p| {
            // A reload is rare and must not be refused: its publications are counted in
            // the queues but always admitted.
            let ticket = backlog.admit_always(&topic, p.frame.len() + self.queue_cost(name, 0));
            self.hand_off(&topic, p, Some(ticket));
        });
        wake_pollers(&topic);
        for shard in &self.shards {
            shard.send(Job::Loaded);
        }
    }

    fn backfilled(&self, name: &str, from: Version, view: &TopicView) {
        let Some(topic) = self.shared.topics.get(name) else {
            return;
        };
        let entries = if view.epoch == from.epoch && !matches!(view.content, ViewContent::State(_))
        {
            let now = std::time::Instant::now();
            view.entries
                .iter()
                .map(|e| {
                    let seq = Sequenced {
                        epoch: view.epoch,
                        offset: e.offset,
                        ts: e.ts,
                        body: Body::Event(e.payload.clone()),
                    };
                    let (frame, data) = encode_sequenced(name, &seq);
                    crate::topic::Entry::new(e.offset, frame, data.unwrap_or_default(), now)
                })
                .collect()
        } else {
            Vec::new()
        };
        let backfill = Arc::new(super::job::Backfill {
            topic: topic.name.clone(),
            from,
            entries,
        });
        for shard in &self.shards {
            shard.send(Job::Backfill(backfill.clone()));
        }
    }

    fn followed(&self) -> Vec<Arc<str>> {
        self.shared
            .topics
            .followed()
            .into_iter()
            .map(|t| t.name.clone())
            .collect()
    }

    fn cool(&self, name: &str) -> bool {
        self.shared
            .topics
            .get(name)
            .is_none_or(|t| self.shared.topics.cool(&t))
    }

    fn cache_len(&self) -> usize {
        self.shared
            .config
            .history_max_len
            .min(self.shared.config.bus.history_len)
    }
}

/// Writes, whichever bus sequences them: on a local bus the registry assigns the version
/// (after the publish queues admit the write); on a shared bus the engine does, and this
/// node applies the result when the engine passes it back (if anything here follows the
/// topic).
impl Hub {
    /// Publishes one JSON value (checked already) to an event topic.
    pub async fn publish_value(&self, name: &str, data: &[u8]) -> Result<Published, PublishError> {
        let Some(bus) = &self.bus else {
            let admitted = self.admit(name, data.len()).await?;
            return self.publish(admitted, data);
        };
        validate_topic(name)?;
        match bus.publish(name, data, now_ms()).await {
            Ok(version) => {
                self.shared.metrics.published();
                Ok(Published {
                    topic: name.to_owned(),
                    offset: version.offset,
                })
            }
            Err(refusal) => Err(refused(name, refusal)),
        }
    }

    /// As [`Hub::publish_value`], blocking the calling thread (not for async code).
    pub fn publish_value_blocking(
        self: &Arc<Self>,
        name: &str,
        data: &[u8],
    ) -> Result<Published, PublishError> {
        let Some(bus) = &self.bus else {
            let admitted = self.admit_blocking(name, data.len())?;
            return self.publish(admitted, data);
        };
        let (hub, name, data) = (self.clone(), name.to_owned(), data.to_vec());
        bus.block_on(async move { hub.publish_value(&name, &data).await })
            .unwrap_or_else(|| Err(BusError::Unavailable("the bus stopped".into()).into()))
    }

    /// Replaces a state document (`PUT`).
    pub async fn put_state_value(
        &self,
        name: &str,
        document: serde_json::Value,
        if_match: Option<&str>,
    ) -> Result<StateWritten, PublishError> {
        if self.bus.is_none() {
            let admitted = self.admit(name, 0).await?;
            return self.put_state(admitted, document, if_match);
        }
        self.write_shared(name, if_match, |doc, limits| {
            doc.prepare_replace(document.clone(), limits)
        })
        .await
    }

    /// Applies an RFC 6902 patch to a state document (`PATCH`).
    pub async fn patch_state_value(
        &self,
        name: &str,
        patch: &[u8],
        if_match: Option<&str>,
    ) -> Result<StateWritten, PublishError> {
        if self.bus.is_none() {
            let admitted = self.admit(name, patch.len()).await?;
            return self.patch_state(admitted, patch, if_match);
        }
        let ops = crate::topic::state::parse_patch(patch).map_err(StateError::from)?;
        self.write_shared(name, if_match, |doc, limits| {
            doc.prepare_patch(&ops, limits)
        })
        .await
    }

    /// A state write through the engine: read the document, change it here (the diff is
    /// computed once, on this node), compare-and-set it in Redis, again if another writer
    /// got there first. `If-Match` is checked against the version each attempt read, so it
    /// means the same as on one node.
    async fn write_shared(
        &self,
        name: &str,
        if_match: Option<&str>,
        mut change: impl FnMut(&StateDoc, &StateLimits) -> Result<Option<Prepared>, StateError>,
    ) -> Result<StateWritten, PublishError> {
        validate_topic(name)?;
        let Some(bus) = &self.bus else {
            return Err(BusError::Unavailable("no shared bus".into()).into());
        };
        let limits = self.shared.topics.limits().state;
        let result = bus
            .write_state(name, now_ms(), |at, content| {
                if let Some(header) = if_match
                    && !at.matches_if_match(header)
                {
                    return Err(PublishError::Topic(TopicError::PreconditionFailed {
                        current: at,
                    }));
                }
                let value = match content {
                    ViewContent::State(value) => value,
                    ViewContent::Empty | ViewContent::Events => serde_json::Value::Null,
                };
                let mut doc = StateDoc::restore(at, value);
                let Some(prepared) = change(&doc, &limits)? else {
                    return Ok(None);
                };
                let committed = doc.commit(prepared);
                Ok(Some((doc.json(), committed.diff)))
            })
            .await;
        match result {
            Ok((version, changed)) => {
                if changed {
                    self.shared.metrics.published();
                }
                Ok(StateWritten {
                    topic: name.to_owned(),
                    version,
                    changed,
                })
            }
            Err(StateRefusal::Bus(e)) => Err(e.into()),
            Err(StateRefusal::Topic(why)) => Err(refused(name, Refusal::Topic(why))),
            Err(StateRefusal::Change(e)) => Err(e),
        }
    }

    /// Closes a topic, on every node.
    pub async fn close_topic_value(&self, name: &str) -> Result<Version, PublishError> {
        let Some(bus) = &self.bus else {
            return self.close_topic(name);
        };
        validate_topic(name)?;
        bus.close(name, now_ms())
            .await
            .map_err(|refusal| refused(name, refusal))
    }

    /// A state document and its version. On a shared bus it is read from Redis, so a
    /// `GET` after a write on any node sees that write.
    pub async fn state_value(&self, name: &str) -> Result<Option<(Version, Bytes)>, PublishError> {
        let Some(bus) = &self.bus else {
            return Ok(self.state(name)?);
        };
        validate_topic(name)?;
        let view = bus.load(name, 0, None).await?;
        Ok(match view.content {
            ViewContent::State(doc) => {
                let version = Version::new(view.epoch, view.offset);
                Some((
                    version,
                    Bytes::from(serde_json::to_vec(&doc).unwrap_or_default()),
                ))
            }
            ViewContent::Empty | ViewContent::Events => None,
        })
    }

    /// On a shared bus, makes sure this node follows `topic` and has loaded it, for a
    /// poll (the caller holds a [`Poller`] place, which keeps it followed). Waits up to
    /// twice `bus.timeout`.
    pub(super) async fn ensure_loaded(&self, topic: &Topic) -> Result<(), PollError> {
        let Some(bus) = &self.bus else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + bus.config().timeout * 2;
        let mut asked = false;
        loop {
            let notified = topic.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if topic.state.lock().synced {
                return Ok(());
            }
            if !asked {
                bus.follow(topic.name.clone());
                asked = true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(PollError::Bus(BusError::Unavailable(
                    "the topic could not be loaded from redis in time".into(),
                )));
            }
        }
    }

    /// A poll's place ended: a shared bus stops following the topic if nothing else here
    /// needs it.
    pub(super) fn poll_ended(&self, topic: &Topic) {
        if let Some(bus) = &self.bus
            && topic.pollers.load(std::sync::atomic::Ordering::SeqCst) == 0
            && topic.subscribers.load(std::sync::atomic::Ordering::SeqCst) == 0
        {
            bus.unfollow(topic.name.clone());
        }
    }
}

/// A topic's refusal from the engine, as the same error one node gives.
fn refused(name: &str, refusal: Refusal) -> PublishError {
    match refusal {
        Refusal::Bus(e) => e.into(),
        Refusal::Topic("closed") => TopicError::Closed(name.to_owned()).into(),
        Refusal::Topic("state") => TopicError::WrongKind {
            topic: name.to_owned(),
            holds: "a state document",
            wanted: "events",
        }
        .into(),
        Refusal::Topic(_) => TopicError::WrongKind {
            topic: name.to_owned(),
            holds: "an event stream",
            wanted: "state",
        }
        .into(),
    }
}
