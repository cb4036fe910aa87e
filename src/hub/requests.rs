//! Protocol requests of one connection (`subscribe`, `unsubscribe`, `resync`, `ping`),
//! served on the shard that owns it.
//!
//! Subscribing to a topic reads its snapshot or replay under the topic's lock and records
//! in the index the offset reached, so publications already on their way to the shard are
//! not sent twice and none after is missed.

use std::sync::Arc;

use bytes::Bytes;

use super::SubscribeError;
use super::job::Shared;
use super::peer::{Admit, Peer, Subscription};
use super::topics::{Content, TopicState};
use crate::metrics::CloseReason;
use crate::proto::CloseCode;
use crate::proto::deflate::Codec;
use crate::proto::message::{
    ClientMessage, ServerMessage, SubscriptionRequest, TopicVersions, now_ms, parse_client,
};
use crate::proto::versioned::{encode_closed, encode_history_truncated};
use crate::topic::index::{Ack, Index, Opening, SlotId, Sub};
use crate::topic::{Filter, Pattern, Since, Version, validate_topic};

/// Serves one protocol request; failures answer with `error` and keep the connection.
pub(super) fn serve(
    conn: &mut Peer,
    text: &str,
    slot: SlotId,
    index: &mut Index,
    shared: &Shared,
    clock_ms: u32,
    codec: &mut Codec,
) {
    let rate = shared.config.rate_limit;
    match conn.limiter.admit(rate, clock_ms) {
        Admit::Yes => {}
        Admit::No { first } => {
            if first {
                let message = format!("over {rate} messages per second; slow down");
                conn.send(error_frame("rate_limited", &message, None));
            }
            return;
        }
        Admit::Close => {
            conn.close(
                CloseCode::Policy,
                "rate limit exceeded",
                CloseReason::RateLimited,
                false,
            );
            return;
        }
    }
    let reply = match parse_client(text, shared.config.max_json_depth) {
        Err(e) => error_frame(e.code(), &e.to_string(), None),
        Ok(ClientMessage::Subscribe(req)) => {
            match subscribe(conn, slot, index, shared, &req, None) {
                Ok(Opened {
                    frames,
                    waiting,
                    marks,
                }) => {
                    let ack = ServerMessage::Subscribed {
                        id: req.id.as_ref(),
                        topics: &req.topics,
                        patterns: &req.patterns,
                        versions: &TopicVersions::of(&marks),
                        ts: now_ms(),
                    };
                    if let Some(topics) = waiting {
                        index.wait(Opening {
                            slot,
                            topics,
                            ack: Some(Ack {
                                id: req.id.clone(),
                                topics: req.topics.clone(),
                                patterns: req.patterns.clone(),
                            }),
                        });
                        return;
                    }
                    // Acknowledge first; snapshots and replays follow, then live frames.
                    conn.send(ack.to_frame());
                    for frame in frames {
                        conn.send_message(frame, codec);
                    }
                    return;
                }
                Err(e) => error_frame(e.code(), &e.to_string(), req.id.as_ref()),
            }
        }
        Ok(ClientMessage::Unsubscribe(req)) => {
            match unsubscribe(conn, slot, index, shared, &req.topics, &req.patterns) {
                Ok(()) => ServerMessage::Unsubscribed {
                    id: req.id.as_ref(),
                    topics: &req.topics,
                    patterns: &req.patterns,
                    ts: now_ms(),
                }
                .to_frame(),
                Err(e) => error_frame(e.code(), &e.to_string(), req.id.as_ref()),
            }
        }
        Ok(ClientMessage::Resync {
            topic,
            last_version,
            id,
        }) => {
            match resync(conn, slot, index, shared, &topic, &last_version) {
                // The replay (or snapshot, or history_truncated) is the answer.
                Ok(frames) => {
                    for frame in frames {
                        conn.send_message(frame, codec);
                    }
                    return;
                }
                Err(e) => error_frame(e.code(), &e.to_string(), id.as_ref()),
            }
        }
        Ok(ClientMessage::Ping { id }) => ServerMessage::Pong {
            id: id.as_ref(),
            ts: now_ms(),
        }
        .to_frame(),
        Ok(ClientMessage::Pong) => return,
        Ok(ClientMessage::Refresh { token, id }) => match conn.access_mut() {
            None => error_frame(
                "auth_disabled",
                "authentication is off: there is no token to refresh",
                id.as_ref(),
            ),
            Some(access) => {
                match shared
                    .auth
                    .refresh(&access.identity, &token, crate::auth::unix_now())
                {
                    Ok(identity) => {
                        let expires = identity.expires;
                        access.identity = identity;
                        access.warned = false;
                        ServerMessage::Refreshed {
                            id: id.as_ref(),
                            expires,
                            ts: now_ms(),
                        }
                        .to_frame()
                    }
                    Err(e) => error_frame(e.code(), &e.to_string(), id.as_ref()),
                }
            }
        },
    };
    conn.send(reply);
}

pub(super) fn error_frame(code: &str, message: &str, id: Option<&serde_json::Value>) -> Bytes {
    ServerMessage::Error {
        code,
        message,
        id,
        ts: now_ms(),
    }
    .to_frame()
}

/// What a subscription sends before live publications, and (for an SSE cursor) the version
/// each exact topic started from.
#[derive(Debug, Default)]
pub(super) struct Opened {
    /// Acknowledgements aside: snapshots, replays, `history_truncated`, `closed`.
    pub frames: Vec<Bytes>,
    /// Each new exact topic and its version when it was attached.
    pub marks: Vec<(Arc<str>, Version)>,
    /// With a shared bus: the new topics wait for this node to load some of them, and the
    /// whole request is answered when they are (see [`Opening`]); the caller records it.
    pub waiting: Option<Vec<(Arc<str>, Option<Version>)>>,
}

/// Most topics an SSE pattern stream's resume replays (the registry scan stops there).
const MAX_PATTERN_RESUME_TOPICS: usize = 1024;

/// Subscribes a connection to topics and patterns, all or nothing. Subscribing to what is
/// already subscribed is a no-op.
///
/// For each new topic, under the topic's lock: a state topic sends a snapshot (or, with a
/// `since` that history still covers, exactly the changes after it); an event topic with a
/// `since` replays exactly what came after it, or says `history_truncated` and sends what
/// history has. The index entry records the topic's offset at that moment, so publications
/// already on their way to this shard are not sent twice, and none after it is missed.
pub(super) fn subscribe(
    conn: &mut Peer,
    slot: SlotId,
    index: &mut Index,
    shared: &Shared,
    req: &SubscriptionRequest,
    base_ms: Option<u64>,
) -> Result<Opened, SubscribeError> {
    for t in &req.topics {
        validate_topic(t)?;
    }
    let parsed = req
        .patterns
        .iter()
        .map(|p| Pattern::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut since: Vec<(&str, Version)> = Vec::with_capacity(req.since.len());
    for (topic, version) in &req.since {
        validate_topic(topic)?;
        let version = version.parse().map_err(|e: crate::topic::VersionError| {
            SubscribeError::InvalidVersion {
                topic: topic.clone(),
                reason: e.to_string(),
            }
        })?;
        since.push((topic, version));
    }
    let filter = match &req.filter {
        None => None,
        Some(f) => Some(Arc::new(
            Filter::from_value(f).map_err(|e| SubscribeError::InvalidFilter(e.to_string()))?,
        )),
    };
    let subs = &conn.subscriptions;
    let mut new_topics: Vec<&String> = req
        .topics
        .iter()
        .filter(|t| {
            !subs
                .iter()
                .any(|s| matches!(s, Subscription::Topic(x) if **x == ***t))
        })
        .collect();
    new_topics.dedup();
    let mut new_patterns: Vec<Pattern> = parsed
        .into_iter()
        .filter(|p| {
            !subs
                .iter()
                .any(|s| matches!(s, Subscription::Pattern(x) if **x == *p))
        })
        .collect();
    new_patterns.dedup();
    if let Some(access) = conn.access() {
        let grants = &access.identity.subscribe;
        if let Some(t) = new_topics.iter().find(|t| !grants.allows_topic(t)) {
            return Err(SubscribeError::Forbidden(t.to_string()));
        }
        if let Some(p) = new_patterns.iter().find(|p| !grants.allows_pattern(p)) {
            return Err(SubscribeError::Forbidden(p.to_string()));
        }
    }
    let max = shared.config.max_subscriptions;
    if subs.len() + new_topics.len() + new_patterns.len() > max {
        return Err(SubscribeError::TooMany(max));
    }
    let max_patterns = shared.config.max_patterns;
    let patterns = subs
        .iter()
        .filter(|s| matches!(s, Subscription::Pattern(_)))
        .count();
    if patterns + new_patterns.len() > max_patterns {
        return Err(SubscribeError::TooManyPatterns(max_patterns));
    }
    // Checked before anything is attached, so a refused request changes nothing.
    for t in &new_topics {
        let topic = shared
            .topics
            .get_or_create(t, || shared.metrics.topic_created())
            .map_err(|_| SubscribeError::TooManyTopics(shared.topics.limits().max_topics))?;
        if let Some((_, from)) = since.iter().find(|(name, _)| name == t) {
            let current = topic.state.lock().version();
            if from.epoch == current.epoch && from.offset > current.offset {
                return Err(SubscribeError::VersionAhead {
                    topic: t.to_string(),
                    since: *from,
                    current,
                });
            }
        }
    }
    // Exactly the room needed: most connections subscribe once, to one topic.
    conn.subscriptions
        .reserve_exact(new_topics.len() + new_patterns.len());
    let mut opened = Opened::default();
    if shared.interest.is_some()
        && new_topics.iter().any(|t| {
            shared
                .topics
                .get(t)
                .is_none_or(|topic| !topic.state.lock().synced)
        })
    {
        // Some topic is not followed here yet: every topic of the request waits for the
        // loads, so the answer (acknowledgement, snapshots, replays) comes whole, and
        // "subscribed" still means that every later publication will be delivered.
        let mut waiting = Vec::with_capacity(new_topics.len());
        for t in new_topics.drain(..) {
            let from = since.iter().find(|(name, _)| name == t).map(|(_, v)| *v);
            let name = hold(conn, slot, index, shared, t, filter.clone())?;
            waiting.push((name, from));
        }
        opened.waiting = Some(waiting);
    }
    for t in new_topics {
        let from = since.iter().find(|(name, _)| name == t).map(|(_, v)| *v);
        match attach(conn, slot, index, shared, t, from, filter.clone()) {
            Ok((attached, version)) => {
                opened.frames.extend(attached);
                if let (Some(Subscription::Topic(name)), Some(version)) =
                    (conn.subscriptions.last(), version)
                {
                    opened.marks.push((name.clone(), version));
                }
            }
            // Swept and refilled by others between the check and here: say so, go on.
            Err(e) => opened
                .frames
                .push(error_frame(e.code(), &e.to_string(), req.id.as_ref())),
        }
    }
    // Counted (and followed) before any history is read for them: a publication of a
    // matching topic with no direct subscriber is handed to the shards only while some
    // pattern is counted, so one published after the replay's read and before the count
    // would reach this stream neither way. One both replayed and handed off is
    // delivered once (the SSE cursor drops what it already wrote).
    for p in &new_patterns {
        shared
            .patterns
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(interest) = &shared.interest {
            interest.follow_pattern(p);
        }
    }
    if let Some(base_ms) = base_ms
        && !new_patterns.is_empty()
    {
        replay_patterns(
            shared,
            req,
            &new_patterns,
            &since,
            base_ms,
            filter.as_deref(),
            &mut opened,
        );
    }
    for p in new_patterns {
        index.add_pattern(
            &p,
            Sub {
                slot,
                after: 0,
                filter: filter.clone(),
            },
        );
        conn.subscriptions.push(Subscription::Pattern(Box::new(p)));
    }
    Ok(opened)
}

/// A resumed SSE pattern stream: what the topics its patterns match (other than its exact
/// topics) published while it was away. A topic in the cursor resumes after its version;
/// one not in it replays what was published since the stream's base time. Publications
/// also on their way live are written once: the stream's cursor skips what it delivered.
fn replay_patterns(
    shared: &Shared,
    req: &SubscriptionRequest,
    patterns: &[Pattern],
    since: &[(&str, Version)],
    base_ms: u64,
    filter: Option<&Filter>,
    opened: &mut Opened,
) {
    let now = std::time::Instant::now();
    let age = std::time::Duration::from_millis(now_ms().saturating_sub(base_ms));
    let base = now.checked_sub(age);
    let topics = shared.topics.matching(MAX_PATTERN_RESUME_TOPICS, |name| {
        !req.topics.iter().any(|t| t == name) && patterns.iter().any(|p| p.matches(name))
    });
    let passes = |e: &crate::topic::Entry| filter.is_none_or(|f| f.matches_fields(e.fields()));
    for topic in topics {
        let state = topic.state.lock();
        if state.retired {
            continue;
        }
        let version = state.history.version();
        match since.iter().find(|(name, _)| **name == *topic.name) {
            Some((_, from)) => match state.history.resume(*from) {
                Since::Replay(entries) => opened
                    .frames
                    .extend(entries.filter(|e| passes(e)).map(|e| e.frame.clone())),
                Since::Truncated {
                    first_available,
                    entries,
                } => {
                    let first = Version::new(version.epoch, first_available);
                    opened.frames.push(encode_history_truncated(
                        &topic.name,
                        Some(from.to_buf().as_str()),
                        first.to_buf().as_str(),
                        version.to_buf().as_str(),
                        now_ms(),
                    ));
                    opened
                        .frames
                        .extend(entries.filter(|e| passes(e)).map(|e| e.frame.clone()));
                }
                Since::Ahead { .. } => {}
            },
            None => opened.frames.extend(
                state
                    .history
                    .iter()
                    .filter(|e| base.is_none_or(|b| e.at >= b) && passes(e))
                    .map(|e| e.frame.clone()),
            ),
        }
    }
}

/// Adds one topic subscription; returns what the client needs before live publications
/// and the version it starts from. With a shared bus, a topic this node does not follow yet
/// is loaded first: the subscription waits in the index (it gets nothing meanwhile) and is
/// attached by [`attach_waiting`] once the topic is loaded; the version is then `None`.
pub(super) fn attach(
    conn: &mut Peer,
    slot: SlotId,
    index: &mut Index,
    shared: &Shared,
    name: &str,
    since: Option<Version>,
    filter: Option<Arc<Filter>>,
) -> Result<(Vec<Bytes>, Option<Version>), SubscribeError> {
    let (topic, frames, after, at) = loop {
        let topic = shared
            .topics
            .get_or_create(name, || shared.metrics.topic_created())
            .map_err(|_| SubscribeError::TooManyTopics(shared.topics.limits().max_topics))?;
        let mut guard = topic.state.lock();
        if guard.retired {
            // Swept between the lookup and the lock: look it up again.
            continue;
        }
        // Counted under the lock the sweep holds while it checks for subscribers.
        let before = topic
            .subscribers
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if before == 0
            && let Some(interest) = &shared.interest
        {
            interest.follow(&topic.name);
        }
        if !guard.synced {
            drop(guard);
            index.wait(Opening {
                slot,
                topics: vec![(topic.name.clone(), since)],
                ack: None,
            });
            break (topic, Vec::new(), u64::MAX, None);
        }
        let deep = shared.interest.is_some();
        let Some((frames, after)) = replay(&mut guard, name, since, filter.as_deref(), deep) else {
            drop(guard);
            deep_resume(index, shared, &topic.name, slot, since);
            break (topic, Vec::new(), u64::MAX, None);
        };
        let version = guard.history.version();
        drop(guard);
        break (topic, frames, after, Some(version));
    };
    index.add_topic(
        &topic.name,
        Sub {
            slot,
            after,
            filter,
        },
    );
    conn.subscriptions
        .push(Subscription::Topic(topic.name.clone()));
    Ok((frames, at))
}

/// Adds a topic subscription that waits for the topic to load: in the index at
/// `u64::MAX` (nothing is sent to it yet), counted as a subscriber, so the bus follows it.
fn hold(
    conn: &mut Peer,
    slot: SlotId,
    index: &mut Index,
    shared: &Shared,
    name: &str,
    filter: Option<Arc<Filter>>,
) -> Result<Arc<str>, SubscribeError> {
    let topic = loop {
        let topic = shared
            .topics
            .get_or_create(name, || shared.metrics.topic_created())
            .map_err(|_| SubscribeError::TooManyTopics(shared.topics.limits().max_topics))?;
        let guard = topic.state.lock();
        if guard.retired {
            continue;
        }
        let before = topic
            .subscribers
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        drop(guard);
        if before == 0
            && let Some(interest) = &shared.interest
        {
            interest.follow(&topic.name);
        }
        break topic;
    };
    index.add_topic(
        &topic.name,
        Sub {
            slot,
            after: u64::MAX,
            filter,
        },
    );
    conn.subscriptions
        .push(Subscription::Topic(topic.name.clone()));
    Ok(topic.name.clone())
}

/// Attaches a subscription that waited for its topic to load (see [`attach`]): what it
/// needs before live publications, and the version it starts from (none yet for a deep
/// resume, which waits on). `None` if the topic is gone (its subscriber holds it, so only
/// a bug could make it so).
pub(super) fn attach_waiting(
    slot: SlotId,
    index: &mut Index,
    shared: &Shared,
    name: &str,
    since: Option<Version>,
) -> Option<(Vec<Bytes>, Option<Version>)> {
    let topic = shared.topics.get(name)?;
    let mut guard = topic.state.lock();
    if guard.retired {
        return None;
    }
    let filter = index.filter_of(name, slot);
    let Some((frames, after)) = replay(&mut guard, name, since, filter.as_deref(), true) else {
        drop(guard);
        deep_resume(index, shared, &topic.name, slot, since);
        return Some((Vec::new(), None));
    };
    let version = guard.history.version();
    drop(guard);
    index.set_after(name, slot, after);
    Some((frames, Some(version)))
}

/// Asks the engine for `topic`'s history after `since` for `slot`'s subscription, which
/// stays held (nothing is sent to it) until [`replay_backfilled`] answers it.
fn deep_resume(
    index: &mut Index,
    shared: &Shared,
    topic: &Arc<str>,
    slot: SlotId,
    since: Option<Version>,
) {
    if let (Some(interest), Some(from)) = (&shared.interest, since) {
        index.wait_backfill(topic, slot, from);
        interest.backfill(topic, from);
    }
}

/// What a new subscriber of a topic needs before live publications (under the topic's
/// lock), and the offset after which publications are live for it.
///
/// With `deep` (a shared bus) a resume that this node's history no longer covers, but that
/// is of the topic's epoch, answers `None`: the engine's longer history is asked for it
/// ([`replay_backfilled`] answers then).
fn replay(
    state: &mut TopicState,
    name: &str,
    since: Option<Version>,
    filter: Option<&Filter>,
    deep: bool,
) -> Option<(Vec<Bytes>, u64)> {
    let version = state.history.version();
    if deep
        && let Some(from) = since
        && from.epoch == version.epoch
        && from.offset <= version.offset
        && matches!(state.content, Content::Events)
        && !state.history.since(from.offset).is_exact()
    {
        return None;
    }
    let mut frames: Vec<Bytes> = Vec::new();
    let mut mark = version.offset;
    let passes = |e: &&crate::topic::Entry| filter.is_none_or(|f| f.matches_fields(e.fields()));
    match (&mut state.content, since) {
        (Content::State(doc), since) => match since.map(|v| state.history.resume(v)) {
            Some(Since::Replay(entries)) => frames.extend(entries.map(|e| e.frame.clone())),
            _ => frames.push(doc.snapshot(name)),
        },
        (Content::Events | Content::Empty, Some(from)) => match state.history.resume(from) {
            Since::Replay(entries) => {
                frames.extend(entries.filter(passes).map(|e| e.frame.clone()))
            }
            since @ (Since::Truncated { .. } | Since::Ahead { .. }) => {
                // Ahead (a version this history never reached): treat it as lost
                // and send everything history has, as for a truncated one.
                let (first, entries) = match since {
                    Since::Truncated {
                        first_available,
                        entries,
                    } => (first_available, entries),
                    _ => (state.history.first_available(), state.history.iter()),
                };
                let first = Version::new(version.epoch, first);
                frames.push(encode_history_truncated(
                    name,
                    Some(from.to_buf().as_str()),
                    first.to_buf().as_str(),
                    version.to_buf().as_str(),
                    now_ms(),
                ));
                frames.extend(entries.filter(passes).map(|e| e.frame.clone()));
            }
        },
        (Content::Events | Content::Empty, None) => {}
    }
    if state.closed {
        frames.push(encode_closed(name, version.to_buf().as_str(), now_ms()));
        // The `closed` publication may still be on its way to this shard: it is sent
        // here already, so nothing after this point is.
        mark = u64::MAX;
    }
    Some((frames, mark))
}

/// A deep resume (see [`replay`]) once the engine's history after `from` arrived: those
/// entries up to where this node's history starts, then the node's own; `history_truncated`
/// first if the engine's history does not reach back to `from` either. If the two do not
/// join up (the node's history moved on meanwhile), it is answered as any truncated resume
/// from this node's history: never a silent skip.
pub(super) fn replay_backfilled(
    state: &mut TopicState,
    name: &str,
    from: Version,
    backfill: &[crate::topic::Entry],
    filter: Option<&Filter>,
) -> (Vec<Bytes>, u64) {
    let version = state.history.version();
    let local_first = state
        .history
        .iter()
        .next()
        .map_or(version.offset + 1, |e| e.offset);
    let older: Vec<&crate::topic::Entry> = backfill
        .iter()
        .filter(|e| e.offset > from.offset && e.offset < local_first)
        .collect();
    let first = older.first().map_or(local_first, |e| e.offset);
    let joins = from.epoch == version.epoch
        && older.last().map_or(local_first, |e| e.offset + 1) == local_first
        && older.windows(2).all(|w| w[1].offset == w[0].offset + 1);
    if !joins {
        return replay(state, name, Some(from), filter, false).unwrap_or_default();
    }
    let passes = |e: &&crate::topic::Entry| filter.is_none_or(|f| f.matches_fields(e.fields()));
    let mut frames = Vec::new();
    if first > from.offset + 1 {
        // The engine's history does not reach back that far either.
        frames.push(encode_history_truncated(
            name,
            Some(from.to_buf().as_str()),
            Version::new(version.epoch, first).to_buf().as_str(),
            version.to_buf().as_str(),
            now_ms(),
        ));
    }
    frames.extend(older.into_iter().filter(passes).map(|e| e.frame.clone()));
    frames.extend(state.history.iter().filter(passes).map(|e| e.frame.clone()));
    let mut mark = version.offset;
    if state.closed {
        frames.push(encode_closed(name, version.to_buf().as_str(), now_ms()));
        mark = u64::MAX;
    }
    (frames, mark)
}

/// `resync`: sends again what the client missed on a subscribed topic since `last_version`.
pub(super) fn resync(
    conn: &mut Peer,
    slot: SlotId,
    index: &mut Index,
    shared: &Shared,
    topic: &str,
    last_version: &str,
) -> Result<Vec<Bytes>, SubscribeError> {
    validate_topic(topic)?;
    let version: Version = last_version
        .parse()
        .map_err(
            |e: crate::topic::VersionError| SubscribeError::InvalidVersion {
                topic: topic.to_owned(),
                reason: e.to_string(),
            },
        )?;
    if let Some(topic) = shared.topics.get(topic) {
        let current = topic.state.lock().version();
        if version.epoch == current.epoch && version.offset > current.offset {
            return Err(SubscribeError::VersionAhead {
                topic: topic.name.to_string(),
                since: version,
                current,
            });
        }
    }
    let Some(position) = conn
        .subscriptions
        .iter()
        .position(|s| matches!(s, Subscription::Topic(t) if **t == *topic))
    else {
        return Err(SubscribeError::NotSubscribed(topic.to_owned()));
    };
    let filter = index.filter_of(topic, slot);
    conn.subscriptions.swap_remove(position);
    index.remove_topic(topic, slot);
    detach(shared, topic);
    attach(conn, slot, index, shared, topic, Some(version), filter).map(|(frames, _)| frames)
}

/// Removes subscriptions; names not subscribed are ignored, malformed ones refused.
pub(super) fn unsubscribe(
    conn: &mut Peer,
    slot: SlotId,
    index: &mut Index,
    shared: &Shared,
    topics: &[String],
    patterns: &[String],
) -> Result<(), SubscribeError> {
    for t in topics {
        validate_topic(t)?;
    }
    let parsed = patterns
        .iter()
        .map(|p| Pattern::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    conn.subscriptions.retain(|s| match s {
        Subscription::Topic(t) if topics.iter().any(|x| **x == **t) => {
            index.remove_topic(t, slot);
            detach(shared, t);
            false
        }
        Subscription::Pattern(p) if parsed.contains(p) => {
            index.remove_pattern(p, slot);
            unfollow_pattern(shared, p);
            false
        }
        _ => true,
    });
    Ok(())
}

/// Counts one subscriber of `topic` gone; the last one on this node stops the node
/// following it on a shared bus.
pub(super) fn detach(shared: &Shared, topic: &str) {
    if let Some(topic) = shared.topics.get(topic) {
        let before = topic
            .subscribers
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        if before == 1
            && let Some(interest) = &shared.interest
        {
            interest.unfollow(&topic.name);
        }
    }
}

/// One pattern subscription gone (counted out; a shared bus stops listening for it once
/// none is left).
pub(super) fn unfollow_pattern(shared: &Shared, pattern: &Pattern) {
    shared
        .patterns
        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    if let Some(interest) = &shared.interest {
        interest.unfollow_pattern(pattern);
    }
}
