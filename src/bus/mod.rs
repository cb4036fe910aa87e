//! The bus: where a topic's versions are assigned.
//!
//! On one node (`kind = "local"`, the default) the topic registry assigns offsets itself, under
//! each topic's lock, as it always has. With several nodes (`kind = "redis"`) an engine
//! assigns them: a publication goes to the engine first, which gives it the topic's next
//! `epoch:offset`, stores it in the topic's shared history and passes it to every node that
//! has subscribers for the topic. Each node then *applies* it: encodes it once, keeps it in
//! its local history cache and hands it to its shards, in offset order. Shards never see the
//! bus.
//!
//! This module holds what every engine shares: the configuration, the sequenced
//! publication an engine hands to a node, its compact wire form, and the translation of
//! tidings patterns into the engine's coarser subscriptions. The Redis engine is
//! [`redis`]; another engine (NATS JetStream, say) is one more file beside it that offers
//! the same few operations (see `docs/ARCHITECTURE.md`, "The bus").

pub(crate) mod redis;

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::topic::{Epoch, Pattern, Segment};

/// Which engine assigns versions (`[bus]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// This node alone: versions are assigned in memory. No other process is involved.
    #[default]
    Local,
    /// Several nodes on one Redis: versions, history and state documents live in Redis.
    Redis,
}

/// The `[bus]` section: how nodes share topics (`TIDINGS_BUS_<KEY>` in the environment).
/// Its `Debug` hides a password in `url`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// `local` (the default: one node, nothing shared) or `redis`.
    pub kind: BusKind,
    /// The Redis server, as a `redis://host:port/db` URL (`rediss://` is not built in).
    pub url: String,
    /// Prefix of every key and channel tidings uses in Redis, so several clusters (or other
    /// applications) can share one server.
    pub prefix: String,
    /// Most publications Redis keeps per topic for resume (the stream's exact `MAXLEN`).
    /// A node's local cache keeps `history_max_len` of them; a resume that reaches further
    /// back than the cache but not than this is served from Redis.
    pub history_len: usize,
    /// How long an event topic nobody publishes to is kept in Redis (refreshed by every
    /// publication); afterwards it starts again with a new epoch. State documents never
    /// expire.
    #[serde(with = "humantime_serde")]
    pub topic_ttl: Duration,
    /// How long one Redis command may take before the node treats Redis as unreachable:
    /// the request answers `503 bus_unavailable` and `/readyz` fails until Redis answers
    /// again.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl BusConfig {
    /// `url` with any password replaced by `***`, for logs and errors.
    pub fn shown_url(&self) -> String {
        let Some((scheme, rest)) = self.url.split_once("://") else {
            return self.url.clone();
        };
        match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or("", |(u, _)| u);
                format!("{scheme}://{user}:***@{host}")
            }
            None => self.url.clone(),
        }
    }
}

impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusConfig")
            .field("kind", &self.kind)
            .field("url", &self.shown_url())
            .field("prefix", &self.prefix)
            .field("history_len", &self.history_len)
            .field("topic_ttl", &self.topic_ttl)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Default for BusConfig {
    fn default() -> BusConfig {
        BusConfig {
            kind: BusKind::Local,
            url: "redis://127.0.0.1:6379/0".to_string(),
            prefix: "tidings".to_string(),
            history_len: 10_000,
            topic_ttl: Duration::from_secs(24 * 3600),
            timeout: Duration::from_secs(1),
        }
    }
}

/// Why the bus could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The engine did not answer within `bus.timeout`, or the connection is down. The
    /// outcome of a write that timed out is unknown: it may still be applied.
    #[error("the bus ({0}) is unavailable; retry later")]
    Unavailable(String),
    /// Writers kept racing for one state document; the write was not applied.
    #[error("the state document kept changing under the write; retry")]
    Contended,
}

/// What a sequenced publication carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Body {
    /// An event: its JSON data.
    Event(Bytes),
    /// A state change: the RFC 6902 diff from the previous version, computed once by the
    /// node that wrote it.
    Change(Bytes),
    /// The topic was closed at this version.
    Closed,
}

/// A publication with its version assigned by the engine, as a node applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sequenced {
    /// The topic's epoch.
    pub epoch: Epoch,
    /// Its offset within the epoch (for `Closed`, the version the topic closed at).
    pub offset: u64,
    /// When it was published (Unix ms), the same on every node.
    pub ts: u64,
    /// What it carries.
    pub body: Body,
}

impl Sequenced {
    /// The compact wire form passed between nodes: one header line
    /// `<kind> <epoch hex> <offset> <ts>` (kind `e`, `s` or `x`), a newline, the payload.
    /// The engine's scripts write it; this is its reference, for tests.
    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload): (&str, &[u8]) = match &self.body {
            Body::Event(data) => ("e", data),
            Body::Change(diff) => ("s", diff),
            Body::Closed => ("x", b""),
        };
        let mut out = format!("{kind} {} {} {}\n", self.epoch, self.offset, self.ts).into_bytes();
        out.extend_from_slice(payload);
        out
    }

    /// Parses the wire form; `None` for anything else (which a node logs and skips: it
    /// did not come from a tidings engine).
    pub fn decode(message: &[u8]) -> Option<Sequenced> {
        let newline = message.iter().position(|&b| b == b'\n')?;
        let header = std::str::from_utf8(&message[..newline]).ok()?;
        let payload = Bytes::copy_from_slice(&message[newline + 1..]);
        let mut fields = header.split(' ');
        let kind = fields.next()?;
        let epoch: Epoch = fields.next()?.parse().ok()?;
        let offset: u64 = fields.next()?.parse().ok()?;
        let ts: u64 = fields.next()?.parse().ok()?;
        if fields.next().is_some() {
            return None;
        }
        let body = match kind {
            "e" => Body::Event(payload),
            "s" => Body::Change(payload),
            "x" => Body::Closed,
            _ => return None,
        };
        Some(Sequenced {
            epoch,
            offset,
            ts,
            body,
        })
    }
}

/// What applying a sequenced publication did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// Applied and handed to the shards.
    Done,
    /// Already applied (it came twice, or with the load that preceded it): nothing to do.
    Duplicate,
    /// Publications after `after` are missing: fetch them, then apply this one.
    Gap {
        /// The last offset applied.
        after: u64,
    },
    /// This node's copy cannot take it (another epoch, another kind of content, a diff
    /// that does not apply): load the topic afresh.
    Resync,
    /// The topic is not followed here (cold or swept): nothing to do.
    Cold,
}

/// What a topic holds in the engine.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ViewContent {
    /// Nothing published yet.
    Empty,
    /// An event stream.
    Events,
    /// A state document.
    State(serde_json::Value),
}

/// One publication of a topic's shared history: events' data, or state changes' diffs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ViewEntry {
    /// Its offset.
    pub offset: u64,
    /// When it was published (Unix ms).
    pub ts: u64,
    /// The event data or the diff.
    pub payload: Bytes,
}

/// A topic as the engine holds it, read in one atomic step: what a node loads when it
/// starts following the topic, or after it lost track (a gap history cannot fill, a new
/// epoch).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TopicView {
    /// The topic's epoch.
    pub epoch: Epoch,
    /// Its last offset.
    pub offset: u64,
    /// Events, state, or nothing yet.
    pub content: ViewContent,
    /// Whether it was closed.
    pub closed: bool,
    /// The newest publications, oldest first, ending at `offset` (possibly none).
    pub entries: Vec<ViewEntry>,
}

/// The engine-side glob that covers a tidings pattern: every topic the pattern matches
/// matches the glob (Redis' `*` spans `:` too, so it covers both `*` and a trailing `**`);
/// the node filters what arrives with the pattern's own rules. Topic names use only
/// `[A-Za-z0-9_.-:]`, none of which is special in a Redis glob.
pub(crate) fn covering_glob(pattern: &Pattern) -> String {
    pattern
        .segments()
        .iter()
        .map(|s| match s {
            Segment::Literal(l) => l.as_ref(),
            Segment::Any | Segment::Rest => "*",
        })
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_form_round_trips_and_refuses_strangers() {
        let event = Sequenced {
            epoch: Epoch::from_u64(0x9f86_d081_884c_7d65),
            offset: 42,
            ts: 1_700_000_000_000,
            body: Body::Event(Bytes::from_static(b"{\"a\":\"x\\ny\"}")),
        };
        let wire = event.encode();
        assert!(wire.starts_with(b"e 9f86d081884c7d65 42 1700000000000\n"));
        assert_eq!(Sequenced::decode(&wire), Some(event));
        let closed = Sequenced {
            epoch: Epoch::from_u64(1),
            offset: 7,
            ts: 5,
            body: Body::Closed,
        };
        assert_eq!(Sequenced::decode(&closed.encode()), Some(closed));
        for bad in [
            &b""[..],
            b"e 1 2 3",
            b"q 0000000000000001 2 3\n{}",
            b"e zz 2 3\n{}",
            b"e 0000000000000001 -2 3\n{}",
            b"e 0000000000000001 2 3 4\n{}",
        ] {
            assert_eq!(
                Sequenced::decode(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_password_in_the_url_is_never_shown() {
        let with = BusConfig {
            url: "redis://app:s3cret@10.0.0.5:6379/0".into(),
            ..BusConfig::default()
        };
        assert_eq!(with.shown_url(), "redis://app:***@10.0.0.5:6379/0");
        assert!(!format!("{with:?}").contains("s3cret"));
        let without = BusConfig::default();
        assert_eq!(without.shown_url(), without.url);
    }

    #[test]
    fn globs_cover_what_patterns_match() {
        let cases = [
            ("runs:*", "runs:*"),
            ("runs:**", "runs:*"),
            ("a:*:c", "a:*:c"),
            ("a.b-c:*:x_y:**", "a.b-c:*:x_y:*"),
        ];
        for (pattern, glob) in cases {
            assert_eq!(covering_glob(&Pattern::parse(pattern).unwrap()), glob);
        }
    }
}
