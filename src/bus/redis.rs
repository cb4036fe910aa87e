//! The Redis engine: versions, history and state documents in Redis, shared by every node.
//!
//! Per topic `T` (under `prefix`, default `tidings`):
//! - `tidings:{T}:m`, a hash: `e` the epoch (16 hex digits), `o` the last offset, `k` the kind
//!   (`n` nothing yet, `e` events, `s` a state document), `c` `1` once closed, `d` the
//!   document's JSON;
//! - `tidings:{T}:h`, a stream of the newest `history_len` publications, entry id
//!   `<offset>-1`, fields `d` (the event data or the state diff) and `t` (Unix ms);
//! - the channel `tidings:c:T`, on which each publication is sent in the form
//!   [`Sequenced::encode`] describes.
//!
//! The braces make both keys of a topic one Redis Cluster hash slot, so each script touches
//! one slot. Every write is one Lua script, run atomically by Redis: it takes the next offset,
//! appends to the stream (trimmed to an exact `MAXLEN`) and publishes, so the channel's order
//! is the offsets' order. A missing hash means Redis lost the topic (a restart without
//! persistence, an eviction, the TTL of an idle event topic): the next script starts a new
//! epoch, drawn by the node that runs it.
//!
//! Commands go through one multiplexed [`ConnectionManager`] (it reconnects by itself); a
//! follower task on this engine's own thread holds a pub/sub connection with the
//! subscriptions this node needs, applies what arrives through the [`Node`], fills gaps from
//! the streams, and reloads every followed topic after it reconnects. A health check (a
//! `PING` every `timeout`) decides whether writes are tried at all: while Redis does not
//! answer, they fail at once with [`BusError::Unavailable`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use tokio::sync::mpsc;

use super::{Applied, BusConfig, BusError, Sequenced, TopicView, ViewContent, ViewEntry};
use crate::metrics::BusMetrics;
use crate::topic::{Epoch, Version};

/// What the engine needs from the node it serves (implemented by the hub).
pub(crate) trait Node: Send + Sync + 'static {
    /// Applies one publication of a followed topic, in offset order.
    fn apply<'a>(&'a self, topic: &'a str, seq: &'a Sequenced) -> BoxFuture<'a, Applied>;
    /// Applies one publication that arrived for a pattern subscription.
    fn apply_matched<'a>(&'a self, topic: &'a str, seq: &'a Sequenced) -> BoxFuture<'a, ()>;
    /// Makes the node's copy of `topic` the engine's view (and wakes the subscribers that
    /// waited for it).
    fn rebase(&self, topic: &str, view: &TopicView);
    /// `topic`'s history after `from`, for resumes that reach further back than the node's.
    fn backfilled(&self, topic: &str, from: Version, view: &TopicView);
    /// The topics this node follows now.
    fn followed(&self) -> Vec<Arc<str>>;
    /// Stops following `topic` if nothing here needs it any more; whether it stopped.
    fn cool(&self, topic: &str) -> bool;
    /// Entries of the local history to load when a topic starts being followed.
    fn cache_len(&self) -> usize;
}

/// A change to what this node listens for.
#[derive(Debug)]
enum Follow {
    Topic(Arc<str>),
    Unfollow(Arc<str>),
    Pattern(String),
    Unpattern(String),
    /// Something may have been missed (a write timed out): reload every followed topic.
    Resync,
    /// A resume reaches further back than the node's history: read the engine's after it.
    Backfill(Arc<str>, Version),
}

/// The Redis engine of one node.
pub(crate) struct RedisBus {
    config: BusConfig,
    conn: ConnectionManager,
    runtime: tokio::runtime::Handle,
    follow: mpsc::UnboundedSender<Follow>,
    follow_rx: Mutex<Option<mpsc::UnboundedReceiver<Follow>>>,
    healthy: AtomicBool,
    stop: tokio::sync::Notify,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    metrics: BusMetrics,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("url", &self.config.shown_url())
            .field("healthy", &self.healthy.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

struct Scripts {
    publish: Script,
    write_state: Script,
    close: Script,
    load: Script,
}

/// Takes the topic's next offset, appends the event, publishes it.
const PUBLISH: &str = r"
local m = redis.call('HMGET', KEYS[1], 'e', 'o', 'k', 'c')
local epoch = m[1]
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0, 'k', 'e')
elseif m[4] == '1' then
  return {'closed', epoch, m[2]}
elseif m[3] == 's' then
  return {'state', epoch, m[2]}
elseif m[3] ~= 'e' then
  redis.call('HSET', KEYS[1], 'k', 'e')
end
local o = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], o .. '-1', 'd', ARGV[2], 't', ARGV[3])
local ttl = tonumber(ARGV[6])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
redis.call('PUBLISH', ARGV[5], 'e ' .. epoch .. ' ' .. o .. ' ' .. ARGV[3] .. '\n' .. ARGV[2])
return {'ok', epoch, tostring(o)}
";

/// Compare-and-set of a state document: applies only at the version the writer read.
const WRITE_STATE: &str = r"
local m = redis.call('HMGET', KEYS[1], 'e', 'o', 'k', 'c')
if m[1] ~= ARGV[1] or m[2] ~= ARGV[2] then
  return {'moved', m[1] or '', m[2] or '0'}
end
if m[4] == '1' then
  return {'closed', m[1], m[2]}
end
if m[3] == 'e' then
  return {'events', m[1], m[2]}
end
local o = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('HSET', KEYS[1], 'k', 's', 'd', ARGV[3])
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[6], o .. '-1', 'd', ARGV[4], 't', ARGV[5])
redis.call('PUBLISH', ARGV[7], 's ' .. m[1] .. ' ' .. o .. ' ' .. ARGV[5] .. '\n' .. ARGV[4])
return {'ok', m[1], tostring(o)}
";

/// Closes a topic (once) and tells every node.
const CLOSE: &str = r"
local m = redis.call('HMGET', KEYS[1], 'e', 'o', 'c')
local epoch = m[1]
local o = m[2]
if not epoch then
  epoch = ARGV[1]
  o = '0'
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0, 'k', 'n')
end
if m[3] ~= '1' then
  redis.call('HSET', KEYS[1], 'c', '1')
  redis.call('PUBLISH', ARGV[2], 'x ' .. epoch .. ' ' .. o .. ' ' .. ARGV[3] .. '\n')
end
return {'ok', epoch, o}
";

/// Reads a topic in one step: the hash, and the newest entries (or those after an
/// offset). A topic Redis does not have is started with the caller's epoch.
const LOAD: &str = r"
local m = redis.call('HMGET', KEYS[1], 'e', 'o', 'k', 'c', 'd')
if not m[1] then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', ARGV[1], 'o', 0, 'k', 'n')
  local ttl = tonumber(ARGV[4])
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[1], ttl)
  end
  return {ARGV[1], '0', 'n', '0', false, {}}
end
local entries = {}
local n = tonumber(ARGV[2])
if n > 0 then
  if ARGV[3] == '' then
    entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', n)
  else
    entries = redis.call('XRANGE', KEYS[2], (tonumber(ARGV[3]) + 1) .. '-0', '+', 'COUNT', n)
  end
end
return {m[1], m[2], m[3] or 'n', m[4] or '0', m[5] or false, entries, ARGV[3] == '' and 'tail' or 'after'}
";

/// A state write's CAS attempts before the writer gives up with `contended`.
const CAS_ATTEMPTS: usize = 32;

/// Reconnect backoff of the pub/sub connection: full jitter up to a cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// What a write script answered.
enum Outcome {
    /// Applied at this version.
    Ok(Version),
    /// Refused: the topic is closed, the wrong kind, or moved on.
    Refused(&'static str),
}

impl RedisBus {
    /// Connects to Redis (failing after `timeout` if it does not answer) and starts the
    /// engine's thread. The follower starts with [`RedisBus::serve`].
    pub fn connect(config: &BusConfig, metrics: BusMetrics) -> std::io::Result<Arc<RedisBus>> {
        let invalid = |e: redis::RedisError| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("bus.url {:?}: {e}", config.shown_url()),
            )
        };
        let client = redis::Client::open(config.url.as_str()).map_err(invalid)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tidings-bus")
            .enable_all()
            .build()?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_CAP);
        // Run on the engine's own runtime (the caller may be inside another one).
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = tx.send(
                client
                    .get_connection_manager_with_config(manager_config)
                    .await,
            );
        });
        let conn = rx
            .recv()
            .map_err(|_| std::io::Error::other("the bus runtime stopped"))?
            .map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!(
                        "bus.url {:?}: Redis does not answer: {e}",
                        config.shown_url()
                    ),
                )
            })?;
        let (follow, follow_rx) = mpsc::unbounded_channel();
        let handle = runtime.handle().clone();
        let bus = Arc::new(RedisBus {
            config: config.clone(),
            conn,
            runtime: handle,
            follow,
            follow_rx: Mutex::new(Some(follow_rx)),
            healthy: AtomicBool::new(true),
            stop: tokio::sync::Notify::new(),
            thread: Mutex::new(None),
            metrics,
            scripts: Scripts {
                publish: Script::new(PUBLISH),
                write_state: Script::new(WRITE_STATE),
                close: Script::new(CLOSE),
                load: Script::new(LOAD),
            },
        });
        let owner = bus.clone();
        let thread = std::thread::Builder::new()
            .name("tidings-bus-main".into())
            .spawn(move || {
                runtime.block_on(async { owner.stop.notified().await });
                drop(owner);
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        *bus.thread.lock() = Some(thread);
        Ok(bus)
    }

    /// Starts following for `node`: the pub/sub connection, the health check.
    pub fn serve(self: &Arc<Self>, node: Weak<dyn Node>) {
        let Some(rx) = self.follow_rx.lock().take() else {
            return;
        };
        let bus = Arc::downgrade(self);
        self.runtime.spawn(follower(bus.clone(), node.clone(), rx));
        self.runtime.spawn(health(bus, node));
    }

    /// Stops the engine's tasks and thread.
    pub fn stop(&self) {
        self.stop.notify_one();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }

    /// Whether Redis answered the last health check.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// The configuration in force.
    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    /// Runs `future` on the engine's runtime and blocks the calling thread for its result
    /// (for embedders' blocking calls; it must not be called from async code).
    pub fn block_on<T: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().ok()
    }

    /// Starts following `topic` (its first subscriber or poll on this node).
    pub fn follow(&self, topic: Arc<str>) {
        let _ = self.follow.send(Follow::Topic(topic));
    }

    /// `topic` lost its last subscriber here; it stops being followed unless one came back.
    pub fn unfollow(&self, topic: Arc<str>) {
        let _ = self.follow.send(Follow::Unfollow(topic));
    }

    /// Reads `topic`'s history after `from` for the node (see [`Node::backfilled`]).
    pub fn backfill(&self, topic: Arc<str>, from: Version) {
        let _ = self.follow.send(Follow::Backfill(topic, from));
    }

    /// Listens for topics a pattern matches (one per local pattern subscription).
    pub fn follow_pattern(&self, glob: String) {
        let _ = self.follow.send(Follow::Pattern(glob));
    }

    /// Undoes one [`RedisBus::follow_pattern`].
    pub fn unfollow_pattern(&self, glob: String) {
        let _ = self.follow.send(Follow::Unpattern(glob));
    }

    fn key_meta(&self, topic: &str) -> String {
        format!("{}:{{{topic}}}:m", self.config.prefix)
    }

    fn key_log(&self, topic: &str) -> String {
        format!("{}:{{{topic}}}:h", self.config.prefix)
    }

    fn channel(&self, topic: &str) -> String {
        format!("{}:c:{topic}", self.config.prefix)
    }

    fn topic_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.config.prefix.as_str())?
            .strip_prefix(":c:")
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> BusError {
        BusError::Unavailable(format!("redis: {e}"))
    }

    fn ttl_secs(&self) -> u64 {
        self.config.topic_ttl.as_secs()
    }

    /// Fails at once while Redis is known to be down.
    fn check_healthy(&self) -> Result<(), BusError> {
        if self.is_healthy() {
            Ok(())
        } else {
            Err(self.unavailable("not answering"))
        }
    }

    /// A write whose outcome is unknown (it timed out): whatever it did reaches this node
    /// through the channel, or, if the channel missed it, through a reload.
    fn after_failed_write(&self, e: &redis::RedisError) {
        if e.is_timeout() || e.is_io_error() || e.is_connection_dropped() {
            self.healthy.store(false, Ordering::SeqCst);
            self.metrics.degraded.set(1);
            let _ = self.follow.send(Follow::Resync);
        }
    }

    /// Runs a write script. A command that found its connection dropped (Redis restarted,
    /// say) is sent once more on the connection the manager makes anew: it did not reach
    /// the server that answers now. A timeout is not retried: its outcome is unknown.
    async fn invoke(&self, invocation: &redis::ScriptInvocation<'_>) -> redis::RedisResult<Value> {
        let mut conn = self.conn.clone();
        match invocation.invoke_async(&mut conn).await {
            Err(e) if e.is_connection_dropped() && !e.is_timeout() => {
                invocation.invoke_async(&mut conn).await
            }
            other => other,
        }
    }

    /// Runs a write script that answers `{status, epoch, offset}`: the version it
    /// assigned, or the topic's refusal.
    async fn write(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<Version, Refusal> {
        match self.invoke(invocation).await {
            Ok(value) => match parse_outcome(&value) {
                Some(Outcome::Ok(version)) => Ok(version),
                Some(Outcome::Refused(why)) => Err(Refusal::Topic(why)),
                None => Err(self.unavailable("unexpected script result").into()),
            },
            Err(e) => {
                self.after_failed_write(&e);
                Err(self.unavailable(e).into())
            }
        }
    }

    /// Publishes an event; returns its version.
    pub async fn publish(&self, topic: &str, data: &[u8], ts: u64) -> Result<Version, Refusal> {
        self.check_healthy()?;
        let mut invocation = self.scripts.publish.prepare_invoke();
        invocation
            .key(self.key_meta(topic))
            .key(self.key_log(topic))
            .arg(Epoch::random().to_string())
            .arg(data)
            .arg(ts)
            .arg(self.config.history_len.max(1))
            .arg(self.channel(topic))
            .arg(self.ttl_secs());
        self.write(&invocation).await
    }

    /// Closes a topic everywhere; returns the version it closed at.
    pub async fn close(&self, topic: &str, ts: u64) -> Result<Version, Refusal> {
        self.check_healthy()?;
        let mut invocation = self.scripts.close.prepare_invoke();
        invocation
            .key(self.key_meta(topic))
            .key(self.key_log(topic))
            .arg(Epoch::random().to_string())
            .arg(self.channel(topic))
            .arg(ts);
        self.write(&invocation).await
    }

    /// Reads a topic: the newest `count` entries, or (with `after`) up to `count` entries
    /// after that offset.
    pub async fn load(
        &self,
        topic: &str,
        count: usize,
        after: Option<u64>,
    ) -> Result<TopicView, BusError> {
        let mut conn = self.conn.clone();
        let value: Value = self
            .scripts
            .load
            .key(self.key_meta(topic))
            .key(self.key_log(topic))
            .arg(Epoch::random().to_string())
            .arg(count)
            .arg(after.map(|a| a.to_string()).unwrap_or_default())
            .arg(self.ttl_secs())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.unavailable(e))?;
        parse_view(&value).ok_or_else(|| self.unavailable("unexpected load result"))
    }

    /// Writes a state document with compare-and-set: `change` gets the document and its
    /// version as Redis has it and returns the new document's JSON and the diff (or `None`
    /// when nothing changes, or an error of its own); it is retried when another writer got
    /// there first. Returns the new version, or the unchanged one with `false`.
    pub async fn write_state<E>(
        &self,
        topic: &str,
        ts: u64,
        mut change: impl FnMut(Version, ViewContent) -> Result<Option<(Bytes, Bytes)>, E>,
    ) -> Result<(Version, bool), StateRefusal<E>> {
        self.check_healthy().map_err(StateRefusal::Bus)?;
        for _ in 0..CAS_ATTEMPTS {
            let view = self.load(topic, 0, None).await.map_err(StateRefusal::Bus)?;
            let at = Version::new(view.epoch, view.offset);
            if view.closed {
                return Err(StateRefusal::Topic("closed"));
            }
            if matches!(view.content, ViewContent::Events) {
                return Err(StateRefusal::Topic("events"));
            }
            let Some((json, diff)) = change(at, view.content).map_err(StateRefusal::Change)? else {
                return Ok((at, false));
            };
            let mut invocation = self.scripts.write_state.prepare_invoke();
            invocation
                .key(self.key_meta(topic))
                .key(self.key_log(topic))
                .arg(view.epoch.to_string())
                .arg(view.offset)
                .arg(&json[..])
                .arg(&diff[..])
                .arg(ts)
                .arg(self.config.history_len.max(1))
                .arg(self.channel(topic));
            match self.invoke(&invocation).await {
                Ok(value) => match parse_outcome(&value) {
                    Some(Outcome::Ok(version)) => return Ok((version, true)),
                    Some(Outcome::Refused("moved")) => continue,
                    Some(Outcome::Refused(why)) => return Err(StateRefusal::Topic(why)),
                    None => {
                        return Err(StateRefusal::Bus(
                            self.unavailable("unexpected script result"),
                        ));
                    }
                },
                Err(e) => {
                    self.after_failed_write(&e);
                    return Err(StateRefusal::Bus(self.unavailable(e)));
                }
            }
        }
        Err(StateRefusal::Bus(BusError::Contended))
    }
}

/// Why a write was refused.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The bus did not take it.
    Bus(BusError),
    /// The topic refused it: `closed`, or `state` (it holds a document).
    Topic(&'static str),
}

impl From<BusError> for Refusal {
    fn from(e: BusError) -> Refusal {
        Refusal::Bus(e)
    }
}

/// Why a state write was refused.
#[derive(Debug)]
pub(crate) enum StateRefusal<E> {
    /// The bus did not take it.
    Bus(BusError),
    /// The topic refused it: `closed`, or `events` (it is an event stream).
    Topic(&'static str),
    /// The change itself failed (a patch that does not apply, a bound, a precondition).
    Change(E),
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn bytes(value: &Value) -> Option<Bytes> {
    match value {
        Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
        Value::SimpleString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        _ => None,
    }
}

fn version(epoch: &Value, offset: &Value) -> Option<Version> {
    let epoch: Epoch = text(epoch)?.parse().ok()?;
    let offset: u64 = text(offset)?.parse().ok()?;
    Some(Version::new(epoch, offset))
}

fn parse_outcome(value: &Value) -> Option<Outcome> {
    let Value::Array(items) = value else {
        return None;
    };
    let [status, epoch, offset] = items.as_slice() else {
        return None;
    };
    let status = text(status)?;
    Some(match status.as_str() {
        "ok" => Outcome::Ok(version(epoch, offset)?),
        "moved" => Outcome::Refused("moved"),
        "closed" => Outcome::Refused("closed"),
        "state" => Outcome::Refused("state"),
        "events" => Outcome::Refused("events"),
        _ => return None,
    })
}

fn parse_view(value: &Value) -> Option<TopicView> {
    let Value::Array(items) = value else {
        return None;
    };
    let [epoch, offset, kind, closed, doc, entries, rest @ ..] = items.as_slice() else {
        return None;
    };
    let at = version(epoch, offset)?;
    let content = match text(kind)?.as_str() {
        "e" => ViewContent::Events,
        "s" => {
            let doc = bytes(doc)?;
            ViewContent::State(serde_json::from_slice(&doc).ok()?)
        }
        _ => ViewContent::Empty,
    };
    let Value::Array(raw) = entries else {
        return None;
    };
    let mut entries = Vec::with_capacity(raw.len());
    for entry in raw {
        let Value::Array(pair) = entry else {
            return None;
        };
        let [id, Value::Array(fields)] = pair.as_slice() else {
            return None;
        };
        let id = text(id)?;
        let offset: u64 = id.split('-').next()?.parse().ok()?;
        let (mut payload, mut ts) = (None, 0);
        for kv in fields.chunks(2) {
            match (text(&kv[0]).as_deref(), kv.get(1)) {
                (Some("d"), Some(v)) => payload = bytes(v),
                (Some("t"), Some(v)) => ts = text(v)?.parse().ok()?,
                _ => {}
            }
        }
        entries.push(ViewEntry {
            offset,
            ts,
            payload: payload?,
        });
    }
    // The newest entries come newest first.
    if rest.first().and_then(text).as_deref() == Some("tail") {
        entries.reverse();
    }
    Some(TopicView {
        epoch: at.epoch,
        offset: at.offset,
        content,
        closed: text(closed)?.as_str() == "1",
        entries,
    })
}

/// Checks Redis every `timeout`; a node that hears again after silence reloads what it
/// follows, so nothing published meanwhile is skipped.
async fn health(bus: Weak<RedisBus>, node: Weak<dyn Node>) {
    loop {
        let Some(engine) = bus.upgrade() else {
            return;
        };
        if node.strong_count() == 0 {
            return;
        }
        let period = engine.config.timeout.max(Duration::from_millis(100));
        let mut conn = engine.conn.clone();
        let answered =
            tokio::time::timeout(period, redis::cmd("PING").query_async::<String>(&mut conn))
                .await
                .is_ok_and(|r| r.is_ok());
        let was = engine.healthy.swap(answered, Ordering::SeqCst);
        engine.metrics.degraded.set(i64::from(!answered));
        if answered && !was {
            tracing::info!("redis answers again; reloading followed topics");
            let _ = engine.follow.send(Follow::Resync);
        } else if !answered && was {
            tracing::warn!(url = %engine.config.shown_url(), "redis does not answer; writes refused");
        }
        drop(engine);
        tokio::time::sleep(period).await;
    }
}

/// The follower: one pub/sub connection with this node's subscriptions, reconnected with
/// backoff; everything it receives is applied in order through the node.
async fn follower(
    bus: Weak<RedisBus>,
    node: Weak<dyn Node>,
    mut rx: mpsc::UnboundedReceiver<Follow>,
) {
    let mut topics: HashSet<Arc<str>> = HashSet::new();
    let mut patterns: HashMap<String, usize> = HashMap::new();
    // Followed topics whose load failed: retried every `timeout` while connected.
    let mut unloaded: HashSet<Arc<str>> = HashSet::new();
    // Backfills that failed, retried the same way.
    let mut unfilled: Vec<(Arc<str>, Version)> = Vec::new();
    let mut backoff = BACKOFF_FIRST;
    loop {
        let Some(engine) = bus.upgrade() else {
            return;
        };
        let client = match redis::Client::open(engine.config.url.as_str()) {
            Ok(c) => c,
            Err(_) => return,
        };
        let timeout = engine.config.timeout;
        let pubsub = tokio::time::timeout(timeout, client.get_async_pubsub()).await;
        let Ok(Ok(pubsub)) = pubsub else {
            drop(engine);
            // Full jitter: nodes that lost Redis together do not come back in lockstep.
            let wait = backoff.mul_f64(rand::random::<f64>());
            backoff = (backoff * 2).min(BACKOFF_CAP);
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            // Changes keep being recorded while disconnected.
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    change = rx.recv() => match change {
                        None => return,
                        Some(change) => record(&mut topics, &mut patterns, &mut unfilled, change, &node),
                    },
                }
            }
            continue;
        };
        let (mut sink, mut stream) = pubsub.split();
        let channels: Vec<String> = topics.iter().map(|t| engine.channel(t)).collect();
        let globs: Vec<String> = patterns.keys().map(|g| engine.channel(g)).collect();
        let subscribed = tokio::time::timeout(timeout * 4, async {
            if !channels.is_empty() {
                sink.subscribe(&channels).await?;
            }
            if !globs.is_empty() {
                sink.psubscribe(&globs).await?;
            }
            Ok::<(), redis::RedisError>(())
        })
        .await;
        if !matches!(subscribed, Ok(Ok(()))) {
            continue;
        }
        backoff = BACKOFF_FIRST;
        // Whatever happened while this node was not listening: load it now.
        let Some(local) = node.upgrade() else {
            return;
        };
        for topic in local.followed() {
            topics.insert(topic);
        }
        let followed: Vec<Arc<str>> = topics.iter().cloned().collect();
        for topic in &followed {
            // Subscribed above or now; a topic that joined while disconnected needs it.
            if !channels.contains(&engine.channel(topic)) {
                let _ = tokio::time::timeout(timeout, sink.subscribe(engine.channel(topic))).await;
            }
            if !reload(&engine, &*local, topic).await {
                unloaded.insert(topic.clone());
            }
        }
        drop(local);
        let mut retry = tokio::time::interval(timeout);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            engine.metrics.followed.set(topics.len() as i64);
            tokio::select! {
                _ = retry.tick(), if !unloaded.is_empty() || !unfilled.is_empty() => {
                    let Some(local) = node.upgrade() else {
                        return;
                    };
                    for (topic, from) in std::mem::take(&mut unfilled) {
                        if !backfill(&engine, &*local, &topic, from).await {
                            unfilled.push((topic, from));
                        }
                    }
                    let pending: Vec<Arc<str>> = unloaded.drain().collect();
                    for topic in pending {
                        if topics.contains(&topic) && !reload(&engine, &*local, &topic).await {
                            unloaded.insert(topic);
                        }
                    }
                }
                message = stream.next() => {
                    let Some(message) = message else {
                        tracing::warn!("redis pub/sub connection lost; reconnecting");
                        break;
                    };
                    let Some(local) = node.upgrade() else {
                        return;
                    };
                    on_message(&engine, &*local, &message).await;
                }
                change = rx.recv() => {
                    let Some(change) = change else {
                        return;
                    };
                    let Some(local) = node.upgrade() else {
                        return;
                    };
                    match change {
                        Follow::Topic(topic) => {
                            if topics.insert(topic.clone()) {
                                let ch = engine.channel(&topic);
                                if !matches!(tokio::time::timeout(timeout, sink.subscribe(ch)).await, Ok(Ok(()))) {
                                    break;
                                }
                            }
                            if !reload(&engine, &*local, &topic).await {
                                unloaded.insert(topic);
                            }
                        }
                        Follow::Unfollow(topic) => {
                            if topics.contains(&topic) && local.cool(&topic) {
                                topics.remove(&topic);
                                let ch = engine.channel(&topic);
                                if !matches!(tokio::time::timeout(timeout, sink.unsubscribe(ch)).await, Ok(Ok(()))) {
                                    break;
                                }
                            }
                        }
                        Follow::Pattern(glob) => {
                            let count = patterns.entry(glob.clone()).or_insert(0);
                            *count += 1;
                            if *count == 1 {
                                let ch = engine.channel(&glob);
                                if !matches!(tokio::time::timeout(timeout, sink.psubscribe(ch)).await, Ok(Ok(()))) {
                                    break;
                                }
                            }
                        }
                        Follow::Unpattern(glob) => {
                            if let Some(count) = patterns.get_mut(&glob) {
                                *count -= 1;
                                if *count == 0 {
                                    patterns.remove(&glob);
                                    let ch = engine.channel(&glob);
                                    if !matches!(tokio::time::timeout(timeout, sink.punsubscribe(ch)).await, Ok(Ok(()))) {
                                        break;
                                    }
                                }
                            }
                        }
                        Follow::Backfill(topic, from) => {
                            if !backfill(&engine, &*local, &topic, from).await {
                                unfilled.push((topic, from));
                            }
                        }
                        Follow::Resync => {
                            let followed: Vec<Arc<str>> = topics.iter().cloned().collect();
                            for topic in followed {
                                if !reload(&engine, &*local, &topic).await {
                                    unloaded.insert(topic);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Records a change to what is followed while there is no connection to make it with.
fn record(
    topics: &mut HashSet<Arc<str>>,
    patterns: &mut HashMap<String, usize>,
    unfilled: &mut Vec<(Arc<str>, Version)>,
    change: Follow,
    node: &Weak<dyn Node>,
) {
    match change {
        Follow::Topic(topic) => {
            topics.insert(topic);
        }
        Follow::Unfollow(topic) => {
            if node.upgrade().is_some_and(|n| n.cool(&topic)) {
                topics.remove(&topic);
            }
        }
        Follow::Pattern(glob) => *patterns.entry(glob).or_insert(0) += 1,
        Follow::Unpattern(glob) => {
            if let Some(count) = patterns.get_mut(&glob) {
                *count -= 1;
                if *count == 0 {
                    patterns.remove(&glob);
                }
            }
        }
        Follow::Resync => {}
        // Read once connected: the subscription still waits.
        Follow::Backfill(topic, from) => unfilled.push((topic, from)),
    }
}

/// Reads `topic`'s history after `from` and hands it to the node; whether it did.
async fn backfill(engine: &RedisBus, node: &dyn Node, topic: &str, from: Version) -> bool {
    match engine
        .load(topic, engine.config.history_len.max(1), Some(from.offset))
        .await
    {
        Ok(view) => {
            node.backfilled(topic, from, &view);
            true
        }
        Err(e) => {
            tracing::warn!(topic, error = %e, "could not read history from redis; will retry");
            false
        }
    }
}

/// Loads a followed topic and makes the node's copy match: only what is new if the copy
/// is current, everything otherwise. Whether it did; the follower retries a failure every
/// `timeout` until it succeeds.
async fn reload(engine: &RedisBus, node: &dyn Node, topic: &str) -> bool {
    match engine.load(topic, node.cache_len(), None).await {
        Ok(view) => {
            engine.metrics.reloads.inc();
            node.rebase(topic, &view);
            true
        }
        Err(e) => {
            tracing::warn!(topic, error = %e, "could not load a topic from redis; will retry");
            false
        }
    }
}

async fn on_message(engine: &RedisBus, node: &dyn Node, message: &redis::Msg) {
    let Some(topic) = engine.topic_of(message.get_channel_name()) else {
        return;
    };
    let Some(seq) = Sequenced::decode(message.get_payload_bytes()) else {
        tracing::warn!(
            topic,
            "a message on a tidings channel that tidings did not write"
        );
        return;
    };
    if message.from_pattern() {
        node.apply_matched(topic, &seq).await;
        return;
    }
    match node.apply(topic, &seq).await {
        Applied::Done | Applied::Duplicate | Applied::Cold => {}
        Applied::Gap { after } => {
            // Fetch what is missing, then everything after it (this one included).
            match engine
                .load(topic, engine.config.history_len.max(1), Some(after))
                .await
            {
                Ok(view) => {
                    engine.metrics.gaps_filled.inc();
                    node.rebase(topic, &view);
                }
                Err(e) => tracing::warn!(topic, error = %e, "could not fill a gap from redis"),
            }
        }
        Applied::Resync => {
            reload(engine, node, topic).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn script_results_parse() {
        let ok = Value::Array(vec![bulk("ok"), bulk("00000000000000ff"), bulk("3")]);
        assert!(matches!(parse_outcome(&ok), Some(Outcome::Ok(v)) if v.offset == 3));
        let moved = Value::Array(vec![bulk("moved"), bulk(""), bulk("0")]);
        assert!(matches!(
            parse_outcome(&moved),
            Some(Outcome::Refused("moved"))
        ));
        assert!(parse_outcome(&Value::Nil).is_none());
        let entry = |o: &str, d: &str| {
            Value::Array(vec![
                bulk(&format!("{o}-1")),
                Value::Array(vec![bulk("d"), bulk(d), bulk("t"), bulk("7")]),
            ])
        };
        let view = Value::Array(vec![
            bulk("00000000000000ff"),
            bulk("5"),
            bulk("e"),
            bulk("0"),
            Value::Nil,
            Value::Array(vec![entry("5", "{\"n\":5}"), entry("4", "{\"n\":4}")]),
            bulk("tail"),
        ]);
        let view = parse_view(&view).unwrap();
        assert_eq!(view.offset, 5);
        assert_eq!(view.content, ViewContent::Events);
        assert_eq!(
            view.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
            [4, 5],
            "the tail comes newest first and is put in order"
        );
        let doc = Value::Array(vec![
            bulk("00000000000000ff"),
            bulk("2"),
            bulk("s"),
            bulk("1"),
            bulk("{\"a\":1}"),
            Value::Array(vec![]),
            bulk("after"),
        ]);
        let doc = parse_view(&doc).unwrap();
        assert!(doc.closed);
        assert_eq!(doc.content, ViewContent::State(serde_json::json!({"a": 1})));
    }
}
