//! Configuration: one struct whose `Default` runs with no file.
//!
//! Layers, later winning: defaults, an optional TOML file, `TIDINGS_*` environment
//! variables, command-line flags. Every key of the file is also an environment variable:
//! `max_queued_bytes` is `TIDINGS_MAX_QUEUED_BYTES`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::auth::AuthConfig;
pub use crate::bus::BusConfig;
pub use crate::net::tls::TlsConfig;

/// Gateway settings. Each limit states the trade-off it makes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1:8080`: loopback until an operator opens it.
    /// The file, `TIDINGS_LISTEN` and `--listen` may name a host (`localhost:8080`), which
    /// [`Config::load`] resolves.
    #[serde(deserialize_with = "deserialize_listen")]
    pub listen: SocketAddr,
    /// Most WebSocket connections at once; an upgrade beyond it gets 503 with `Retry-After`.
    /// Each idle connection costs well under 1 KiB of gateway memory plus the kernel's
    /// socket buffers, so the file-descriptor limit is usually the real bound.
    pub max_connections: usize,
    /// Largest inbound message (after reassembly), in bytes; larger closes with 1009.
    /// Client messages are small requests; 64 KiB bounds what a peer can make us buffer.
    pub max_message_bytes: usize,
    /// Largest HTTP publish body, in bytes; larger is refused with 413. Every subscriber's
    /// frame shares one copy, so this bounds memory per publication, not per subscriber.
    pub max_publish_bytes: usize,
    /// Most bytes queued for one connection whose socket is full; past it the connection is
    /// closed with 1013 so a slow consumer never slows the publisher or other subscribers.
    /// Queued frames are shared, so this is an upper bound, not a per-connection cost.
    pub max_queued_bytes: usize,
    /// Most subscriptions (topics plus patterns) per connection. Each topic subscription
    /// costs about 100 bytes in the shard's index (the topic itself is counted under
    /// `max_topics`), so this bounds what one connection can make the gateway hold.
    pub max_subscriptions: usize,
    /// Most pattern subscriptions per connection (they count under `max_subscriptions`
    /// too). A pattern costs up to about 10 KiB (its segments, and a node of the pattern
    /// trie per segment), so patterns get a tighter bound than exact topics.
    pub max_patterns: usize,
    /// Origins allowed to open WebSockets (exact match). Empty allows any Origin, which suits
    /// service clients; browsers facing the public internet should list their origins.
    pub allowed_origins: Vec<String>,
    /// Fan-out threads, each writing to its own share of the connections. 0 means one per
    /// core, so one publication's fan-out uses every core.
    pub fanout_threads: usize,
    /// Serve `GET /echo`, a WebSocket echo on the same frame code, for conformance suites.
    /// Its message limit is 16 MiB. Off by default.
    pub echo: bool,
    /// How often an otherwise silent connection is pinged. Shorter detects dead peers sooner
    /// and keeps proxies' idle timers alive, at one small frame per connection per interval.
    /// Zero disables heartbeats.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How long a pinged connection may stay silent before it is closed with 1011. Any inbound
    /// frame counts as an answer.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// Also send a JSON `{"type":"ping"}` with each heartbeat, for clients (browsers) that
    /// cannot see WebSocket pings and answer with `{"type":"pong"}`.
    pub json_ping: bool,
    /// Inbound messages per second per connection (a token bucket with one second of burst).
    /// Past it a client gets an `error`; if it keeps going for another second's worth, it is
    /// closed with 1008. Zero disables the limit.
    pub rate_limit: u32,
    /// How long a client has to send a complete HTTP request head once it started one or
    /// connected (slowloris defence).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Most HTTP connections not yet upgraded at once. Accepting waits while at the cap, so a
    /// flood of half-open handshakes queues in the kernel instead of in the gateway.
    pub max_handshakes: usize,
    /// Publications each topic keeps for resume and polling. More lets clients that were
    /// away longer resume exactly instead of getting a snapshot or `history_truncated`, at
    /// the cost of the encoded frames kept (shared with what was sent, not copied).
    pub history_max_len: usize,
    /// How long a publication stays in its topic's history.
    #[serde(with = "humantime_serde")]
    pub history_max_age: Duration,
    /// How long a closing connection waits for the peer's close frame before dropping it.
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    /// How long to drain connections on shutdown before dropping what is left.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,

    /// Deepest nesting of arrays and objects accepted in any JSON a peer sends: publications,
    /// state documents (checked on the result of every PUT and PATCH) and client messages.
    /// Deeper is refused (`400`/`422`, or an `error` message). 64 is far beyond what real
    /// documents need and well below what browsers' and common libraries' parsers accept,
    /// so everything the gateway forwards can be parsed by its subscribers.
    pub max_json_depth: usize,
    /// Largest state document, in bytes of its JSON, checked on the result of every PUT and
    /// PATCH (`413`, the document unchanged). Every snapshot of it is this big.
    pub max_state_bytes: usize,
    /// Most operations in one JSON Patch (`413` beyond). Each operation costs a pointer walk
    /// under the topic's lock.
    pub max_patch_ops: usize,
    /// Memory all state documents together may take (their estimated in-memory size plus
    /// their serialized copies); a write that would pass it gets `507 state_budget_exhausted`
    /// and changes nothing.
    pub state_memory_budget: usize,
    /// Most topics known at once (each costs a few hundred bytes plus its history); a
    /// publication or subscription to a new topic beyond it is refused with `503
    /// too_many_topics` until idle topics are swept.
    pub max_topics: usize,
    /// Most bytes of history one topic keeps (frames, counted once). Whichever of
    /// `history_max_len`, `history_max_bytes` and `history_max_age` is reached first evicts.
    pub history_max_bytes: usize,
    /// Most bytes of history all topics together keep. Past it the oldest publications, of
    /// whichever topic, are evicted first; resume reports them as `history_truncated`.
    pub history_memory_budget: usize,
    /// Largest polling response body, in bytes (at least one event is always returned); the
    /// page says where to continue (`next_offset`, `more`).
    pub max_poll_bytes: usize,
    /// Most bytes of publications accepted but not yet written out by every shard. A publish
    /// that finds no room within `publish_wait` is refused with `503 overloaded` and
    /// `Retry-After`, so a publisher faster than the sockets cannot grow the gateway.
    pub publish_queue_bytes: usize,
    /// Most publications of one topic waiting for the shards. A flooded topic hits this bound
    /// and is refused (`503 overloaded`) long before the shared `publish_queue_bytes`, so
    /// other topics keep flowing.
    pub topic_queue_len: usize,
    /// How long a publish may wait for room in the queues before it is refused.
    #[serde(with = "humantime_serde")]
    pub publish_wait: Duration,
    /// Most bytes queued for all connections together (each connection's queue counted in
    /// full, though its frames are shared). A connection whose queue would push the total
    /// past it is treated as a slow consumer.
    pub max_queued_total_bytes: usize,
    /// Most bytes of incomplete inbound frames and fragmented messages held for all
    /// connections together; a connection that would pass it is closed with 1013.
    pub max_inbound_buffered_bytes: usize,
    /// How long a client has to send a request body once its head arrived (between the head
    /// and the last byte of the body). Past it the answer is `408 request_timeout` and the
    /// connection closes, so a body that stalls holds its `max_handshakes` place this long
    /// at most. Longer suits slow uplinks sending large publications.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// The longest one HTTP request may take, from its complete head to its response (the
    /// head itself is bounded by `handshake_timeout`); past it the answer is `408
    /// request_timeout` and the connection closes. Bounds what a request can hold,
    /// whatever it waits for. A response the client stops reading for this long (no byte
    /// of it accepted by the socket) ends the connection too.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Most HTTP connections not yet upgraded from one source address. A connection past
    /// it is answered `503 too_many_handshakes` and closed at once, so one address cannot
    /// take the whole `max_handshakes` budget. Trusted proxies are exempt (they carry many
    /// clients). 0 turns the limit off.
    pub max_handshakes_per_ip: usize,
    /// Most WebSocket connections from one client address (behind a trusted proxy, the
    /// client it names); past it an upgrade gets `503 too_many_connections` with
    /// `Retry-After`. 0 turns the limit off.
    pub max_connections_per_ip: usize,
    /// Peers (addresses or CIDR blocks, `10.0.0.0/8`) trusted to name the client in
    /// `forwarded_header`. For a connection from one of them, per-address limits apply to
    /// the client it names, not to the proxy. An entry that is neither makes `serve` fail
    /// with an error naming this key.
    pub trusted_proxies: Vec<String>,
    /// The header a trusted proxy names the client in (`X-Forwarded-For` style: the last
    /// address not itself a trusted proxy is the client).
    pub forwarded_header: String,
    /// The `retry:` hint an SSE stream starts with: how long a client's `EventSource`
    /// waits before reconnecting. Shorter resumes sooner after a restart, at the cost of
    /// a reconnection storm hitting sooner too (clients add no jitter of their own).
    #[serde(with = "humantime_serde")]
    pub sse_retry: Duration,
    /// Longest `wait` a long-poll may ask for. Each waiting poller holds an HTTP
    /// connection and its task (see docs/BENCHMARKS.md for the measured cost), so this
    /// bounds how long a client can hold them with one request; proxies often cut idle
    /// requests at 30–60 s.
    #[serde(with = "humantime_serde")]
    pub max_poll_wait: Duration,
    /// Most long-polls waiting at once; past it a long-poll answers at once, as a plain
    /// poll. Each waiting poll holds an HTTP connection, which counts under
    /// `max_handshakes` like any HTTP connection, and costs about 40 KiB (hyper's
    /// connection task and buffers; see docs/BENCHMARKS.md): keep it well below
    /// `max_handshakes`, so waiting polls never take every place new connections need.
    pub max_poll_waiters: usize,
    /// Most items in one `POST /v1/publish` batch (its body is bounded by
    /// `max_publish_bytes` like any publication).
    pub max_batch_items: usize,
    /// Negotiate permessage-deflate (RFC 7692) with WebSocket clients that offer it. On by
    /// default: a publication is compressed once however many subscribers share it, and a
    /// compressed connection holds no compression state between messages, so the cost is
    /// CPU once per publication (plus, per shard, one compressor and one inflater), for
    /// JSON frames several times smaller on the wire. Turn it off where a compression side
    /// channel matters (secrets and attacker-chosen text in one message, over TLS) or
    /// where publications do not compress (already compressed or encrypted data).
    pub permessage_deflate: bool,
    /// Messages shorter than this many bytes go uncompressed even to a connection that
    /// negotiated permessage-deflate: below about a kilobyte, DEFLATE saves a few hundred
    /// bytes at most and the compressor's fixed cost per message dominates.
    pub deflate_min_bytes: usize,
    /// Authentication and authorization (`[auth]`; `TIDINGS_AUTH_<KEY>` in the
    /// environment). The default authenticates no one and lets everyone do everything,
    /// which [`Config::load`] accepts only on a loopback `listen` address.
    pub auth: AuthConfig,
    /// How nodes share topics (`[bus]`; `TIDINGS_BUS_<KEY>` in the environment). The
    /// default is one node on its own, with nothing shared and no Redis.
    pub bus: BusConfig,
    /// Native TLS (`[tls]`; `TIDINGS_TLS_<KEY>` in the environment): a certificate and key
    /// in PEM files, reloaded on SIGHUP. The default is plain HTTP, as behind a
    /// terminating proxy.
    pub tls: TlsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_connections: 20_000,
            max_message_bytes: 64 * 1024,
            max_publish_bytes: 1024 * 1024,
            max_queued_bytes: 1024 * 1024,
            max_subscriptions: 128,
            max_patterns: 8,
            allowed_origins: Vec::new(),
            fanout_threads: 0,
            echo: false,
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(10),
            json_ping: false,
            rate_limit: 100,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 1024,
            history_max_len: 1024,
            history_max_age: Duration::from_secs(300),
            close_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
            max_json_depth: 64,
            max_state_bytes: 1024 * 1024,
            max_patch_ops: 1000,
            state_memory_budget: 256 * 1024 * 1024,
            max_topics: 100_000,
            history_max_bytes: 8 * 1024 * 1024,
            history_memory_budget: 256 * 1024 * 1024,
            max_poll_bytes: 1024 * 1024,
            publish_queue_bytes: 64 * 1024 * 1024,
            topic_queue_len: 256,
            publish_wait: Duration::from_millis(100),
            max_queued_total_bytes: 1024 * 1024 * 1024,
            max_inbound_buffered_bytes: 256 * 1024 * 1024,
            body_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_handshakes_per_ip: 128,
            max_connections_per_ip: 10_000,
            trusted_proxies: Vec::new(),
            forwarded_header: "x-forwarded-for".to_string(),
            sse_retry: Duration::from_secs(3),
            max_poll_wait: Duration::from_secs(30),
            max_poll_waiters: 512,
            max_batch_items: 1000,
            permessage_deflate: true,
            deflate_min_bytes: 1024,
            auth: AuthConfig::default(),
            bus: BusConfig::default(),
            tls: TlsConfig::default(),
        }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $field:ident: $ty:ty),* $(,)?) => {
        impl Config {
            $(
                $(#[$doc])*
                pub fn $field(mut self, value: $ty) -> Self {
                    self.$field = value;
                    self
                }
            )*
        }
    };
}

setters! {
    /// Sets [`Config::listen`].
    listen: SocketAddr,
    /// Sets [`Config::max_connections`].
    max_connections: usize,
    /// Sets [`Config::max_message_bytes`].
    max_message_bytes: usize,
    /// Sets [`Config::max_publish_bytes`].
    max_publish_bytes: usize,
    /// Sets [`Config::max_queued_bytes`].
    max_queued_bytes: usize,
    /// Sets [`Config::max_subscriptions`].
    max_subscriptions: usize,
    /// Sets [`Config::max_patterns`].
    max_patterns: usize,
    /// Sets [`Config::allowed_origins`].
    allowed_origins: Vec<String>,
    /// Sets [`Config::fanout_threads`].
    fanout_threads: usize,
    /// Sets [`Config::echo`].
    echo: bool,
    /// Sets [`Config::ping_interval`].
    ping_interval: Duration,
    /// Sets [`Config::pong_timeout`].
    pong_timeout: Duration,
    /// Sets [`Config::json_ping`].
    json_ping: bool,
    /// Sets [`Config::rate_limit`].
    rate_limit: u32,
    /// Sets [`Config::handshake_timeout`].
    handshake_timeout: Duration,
    /// Sets [`Config::max_handshakes`].
    max_handshakes: usize,
    /// Sets [`Config::history_max_len`].
    history_max_len: usize,
    /// Sets [`Config::history_max_age`].
    history_max_age: Duration,
    /// Sets [`Config::close_timeout`].
    close_timeout: Duration,
    /// Sets [`Config::shutdown_timeout`].
    shutdown_timeout: Duration,
    /// Sets [`Config::max_json_depth`].
    max_json_depth: usize,
    /// Sets [`Config::max_state_bytes`].
    max_state_bytes: usize,
    /// Sets [`Config::max_patch_ops`].
    max_patch_ops: usize,
    /// Sets [`Config::state_memory_budget`].
    state_memory_budget: usize,
    /// Sets [`Config::max_topics`].
    max_topics: usize,
    /// Sets [`Config::history_max_bytes`].
    history_max_bytes: usize,
    /// Sets [`Config::history_memory_budget`].
    history_memory_budget: usize,
    /// Sets [`Config::max_poll_bytes`].
    max_poll_bytes: usize,
    /// Sets [`Config::publish_queue_bytes`].
    publish_queue_bytes: usize,
    /// Sets [`Config::topic_queue_len`].
    topic_queue_len: usize,
    /// Sets [`Config::publish_wait`].
    publish_wait: Duration,
    /// Sets [`Config::max_queued_total_bytes`].
    max_queued_total_bytes: usize,
    /// Sets [`Config::max_inbound_buffered_bytes`].
    max_inbound_buffered_bytes: usize,
    /// Sets [`Config::body_timeout`].
    body_timeout: Duration,
    /// Sets [`Config::request_timeout`].
    request_timeout: Duration,
    /// Sets [`Config::max_handshakes_per_ip`].
    max_handshakes_per_ip: usize,
    /// Sets [`Config::max_connections_per_ip`].
    max_connections_per_ip: usize,
    /// Sets [`Config::trusted_proxies`].
    trusted_proxies: Vec<String>,
    /// Sets [`Config::forwarded_header`].
    forwarded_header: String,
    /// Sets [`Config::sse_retry`].
    sse_retry: Duration,
    /// Sets [`Config::max_poll_wait`].
    max_poll_wait: Duration,
    /// Sets [`Config::max_poll_waiters`].
    max_poll_waiters: usize,
    /// Sets [`Config::max_batch_items`].
    max_batch_items: usize,
    /// Sets [`Config::permessage_deflate`].
    permessage_deflate: bool,
    /// Sets [`Config::deflate_min_bytes`].
    deflate_min_bytes: usize,
    /// Sets [`Config::auth`].
    auth: AuthConfig,
    /// Sets [`Config::bus`].
    bus: BusConfig,
    /// Sets [`Config::tls`].
    tls: TlsConfig,
}

/// Where a setting came from; configuration errors name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// The TOML file (`--config` / `TIDINGS_CONFIG`).
    File(PathBuf),
    /// A `TIDINGS_*` environment variable, with its raw value.
    Env {
        /// The variable, e.g. `TIDINGS_PING_INTERVAL`.
        name: String,
        /// Its value as set.
        value: String,
    },
    /// A command-line flag, with its value.
    Flag {
        /// The key it sets, e.g. `listen` for `--listen`.
        key: String,
        /// Its value as given.
        value: String,
    },
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::File(path) => write!(f, "{}", path.display()),
            ConfigSource::Env { name, value } => write!(f, "{name}={value}"),
            ConfigSource::Flag { key, value } => {
                write!(f, "--{}", key.replace('_', "-"))?;
                if value != "true" {
                    write!(f, " {value}")?;
                }
                Ok(())
            }
        }
    }
}

/// A configuration that could not be loaded; the message names the file, variable or flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path}:{line}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The line (from 1) the parser stopped at.
        line: usize,
        /// What the parser expected.
        message: String,
    },
    /// A key that is no setting: a misspelling in the file, or a `TIDINGS_*` variable
    /// (other than `TIDINGS_CONFIG` and `TIDINGS_LOG`) that names none.
    #[error("{origin}: unknown key `{key}` (`tidings serve --help` lists them)")]
    UnknownKey {
        /// Where it was set.
        origin: ConfigSource,
        /// The key, lower case.
        key: String,
    },
    /// A value of the wrong type or syntax; for a duration the message shows the syntax.
    #[error("{}", describe_invalid(.origin, .key, .message))]
    Invalid {
        /// Where it was set.
        origin: ConfigSource,
        /// The key it was set for.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// Values each valid on their own that do not make a configuration together.
    #[error("invalid configuration: {0}")]
    Conflict(String),
}

/// `/etc/tidings.toml: ping_interval: ...`, `TIDINGS_PING_INTERVAL=abc: ...`,
/// `--listen nowhere:1: ...`: a variable or flag already names its key.
fn describe_invalid(origin: &ConfigSource, key: &str, message: &str) -> String {
    match origin {
        ConfigSource::File(_) => format!("{origin}: {key}: {message}"),
        ConfigSource::Env { .. } | ConfigSource::Flag { .. } => format!("{origin}: {message}"),
    }
}

/// What a duration error adds, so the fix is in the message.
const DURATION_EXAMPLES: &str = r#"(examples: "500ms", "30s", "1m 30s")"#;

/// Environment variables that are read elsewhere, not configuration keys.
const NON_KEY_VARS: &[&str] = &["TIDINGS_CONFIG", "TIDINGS_LOG"];

impl Config {
    /// Builds the configuration from defaults, `file`, `TIDINGS_*` variables of `env`, then
    /// `overrides` (`key = value` pairs from flags), later layers winning.
    ///
    /// Each setting is checked on its own as it is read, so an error names the file,
    /// variable or flag it came from. `listen` may name a host (`localhost:8080`), which is
    /// resolved here.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, toml::Value)],
    ) -> Result<Config, ConfigError> {
        let mut settings: Vec<(ConfigSource, String, toml::Value)> = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let table = text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Syntax {
                    path: path.display().to_string(),
                    line: e
                        .span()
                        .map_or(1, |span| text[..span.start].matches('\n').count() + 1),
                    message: e.message().to_owned(),
                })?;
            for (key, value) in table {
                settings.push((ConfigSource::File(path.to_owned()), key, value));
            }
        }
        for (name, raw) in env {
            let Some(key) = name.strip_prefix("TIDINGS_") else {
                continue;
            };
            if NON_KEY_VARS.contains(&name.as_str()) {
                continue;
            }
            let key = key.to_ascii_lowercase();
            let (key, value) = nest_env(key, &raw);
            // A secret must not reach an error message through its variable.
            let shown = if name.contains("SECRET") {
                "<redacted>".to_string()
            } else {
                raw
            };
            settings.push((ConfigSource::Env { name, value: shown }, key, value));
        }
        for (key, value) in overrides {
            let shown = match value {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            settings.push((
                ConfigSource::Flag {
                    key: key.clone(),
                    value: shown,
                },
                key.clone(),
                value.clone(),
            ));
        }

        let defaults = toml::Table::try_from(Config::default())
            .map_err(|e| ConfigError::Conflict(e.to_string()))?;
        let mut table = toml::Table::new();
        for (origin, key, value) in settings {
            let Some(default) = defaults.get(&key) else {
                return Err(ConfigError::UnknownKey { origin, key });
            };
            let mut alone = toml::Table::new();
            alone.insert(key.clone(), value.clone());
            let checked = match Config::deserialize(alone) {
                Ok(checked) => checked,
                Err(e) => {
                    let mut message = e.message().to_owned();
                    if is_duration(default) {
                        message = format!("invalid duration: {message} {DURATION_EXAMPLES}");
                    }
                    return Err(ConfigError::Invalid {
                        origin,
                        key,
                        message,
                    });
                }
            };
            // A section merges key by key with the layers before it.
            if let toml::Value::Table(section) = &value
                && let Some(toml::Value::Table(merged)) = table.get_mut(&key)
            {
                merged.extend(section.clone());
                continue;
            }
            if value.is_table() {
                table.insert(key, value);
                continue;
            }
            // Keep the value as checked (a resolved `listen`), so it is not resolved twice.
            let normal = toml::Table::try_from(checked)
                .ok()
                .and_then(|mut t| t.remove(&key));
            if let Some(normal) = normal {
                table.insert(key, normal);
            }
        }
        let config = Config::deserialize(table)
            .map_err(|e| ConfigError::Conflict(e.message().to_owned()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the settings that only make sense together: the `[auth]` section (its keys
    /// are loaded, so a bad PEM or JWKS file is named here), and that a gateway open to
    /// everyone listens on loopback only, unless `allow_anonymous` says so.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::auth::Auth::from_config(&self.auth)
            .map_err(|e| ConfigError::Conflict(e.to_string()))?;
        if self.tls.is_enabled() {
            crate::net::tls::load(&self.tls).map_err(|e| ConfigError::Conflict(e.to_string()))?;
        }
        if !self.auth.is_enabled() && !self.auth.allow_anonymous && !self.listen.ip().is_loopback()
        {
            return Err(ConfigError::Conflict(open_beyond_loopback(self.listen)));
        }
        Ok(())
    }
}

/// Why a gateway with no authentication does not listen on `addr`, and what to do.
pub(crate) fn open_beyond_loopback(addr: SocketAddr) -> String {
    format!(
        "listen = {addr} is not a loopback address, and no authentication is configured: \
         anyone who can reach it could subscribe, publish and close topics. Configure \
         [auth] (hmac_secret, public_key_file, jwks or [[auth.api_keys]]), or set \
         auth.allow_anonymous = true (TIDINGS_AUTH_ALLOW_ANONYMOUS=true) to serve everyone \
         without authentication"
    )
}

/// Maps `auth_<key>` (from `TIDINGS_AUTH_<KEY>`) to the `auth` section's `<key>`, and
/// `bus_<key>` and `tls_<key>` to theirs; any other key stays as it is. A string setting
/// takes the raw text (a secret of digits is still a string).
fn nest_env(key: String, raw: &str) -> (String, toml::Value) {
    let sections = [
        (
            "auth",
            toml::Table::try_from(AuthConfig::default()).unwrap_or_default(),
        ),
        (
            "bus",
            toml::Table::try_from(BusConfig::default()).unwrap_or_default(),
        ),
        (
            "tls",
            toml::Table::try_from(TlsConfig::default()).unwrap_or_default(),
        ),
    ];
    for (section, defaults) in sections {
        let Some(inner) = key.strip_prefix(section).and_then(|k| k.strip_prefix('_')) else {
            continue;
        };
        if let Some(default) = defaults.get(inner) {
            let value = if default.is_str() && !is_duration(default) {
                toml::Value::String(raw.to_owned())
            } else {
                env_value(raw)
            };
            let mut table = toml::Table::new();
            table.insert(inner.to_owned(), value);
            return (section.to_owned(), toml::Value::Table(table));
        }
    }
    (key, env_value(raw))
}

/// Whether a key's default (as TOML) is a duration: a string in humantime's syntax.
fn is_duration(default: &toml::Value) -> bool {
    default
        .as_str()
        .is_some_and(|s| humantime_serde::re::humantime::parse_duration(s).is_ok())
}

/// Deserializes `listen`: a socket address, or `host:port` resolved now (the first address,
/// except that IPv4 loopback is preferred, so `localhost` means `127.0.0.1` even where it
/// resolves to `::1` first). It stays a [`SocketAddr`] for embedders.
fn deserialize_listen<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    resolve_listen(&text).map_err(serde::de::Error::custom)
}

/// Resolves a `listen` value; the error says what was expected.
pub(crate) fn resolve_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let expected = r#"expected host:port, e.g. "127.0.0.1:8080", "localhost:8080" or "[::]:8080""#;
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?}: {e} ({expected})"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4() && a.ip().is_loopback())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{text:?} resolves to no address ({expected})"))
}

/// An environment value as TOML when it parses as a TOML value (numbers, booleans, arrays),
/// else as a plain string (addresses, durations).
fn env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_in_order() {
        let dir = std::env::temp_dir().join(format!("tidings-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nmax_subscriptions = 5\nclose_timeout = \"2s\"\n",
        )
        .unwrap();
        let env = vec![
            ("TIDINGS_MAX_SUBSCRIPTIONS".to_string(), "6".to_string()),
            (
                "TIDINGS_ALLOWED_ORIGINS".to_string(),
                "[\"https://a\"]".to_string(),
            ),
            ("TIDINGS_LOG".to_string(), "debug".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let flags = vec![("listen".to_string(), toml::Value::from("127.0.0.1:9001"))];
        let c = Config::load(Some(&file), env, &flags).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(c.max_subscriptions, 6);
        assert_eq!(c.allowed_origins, vec!["https://a".to_string()]);
        assert_eq!(c.close_timeout, Duration::from_secs(2));
        assert_eq!(c.max_message_bytes, Config::default().max_message_bytes);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::load(
            None,
            vec![("TIDINGS_MAX_SUBSCRIPTION".into(), "1".into())],
            &[],
        );
        assert!(e.unwrap_err().to_string().contains("max_subscription"));
        let e = Config::load(
            None,
            vec![("TIDINGS_MAX_SUBSCRIPTIONS".into(), "many".into())],
            &[],
        );
        assert!(e.unwrap_err().to_string().contains("invalid type"));
        assert_eq!(
            Config::load(None, Vec::new(), &[]).unwrap(),
            Config::default()
        );
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tidings-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        file
    }

    fn env(name: &str, value: &str) -> Vec<(String, String)> {
        vec![(name.to_string(), value.to_string())]
    }

    #[test]
    fn a_bad_env_duration_names_the_variable_and_shows_the_syntax() {
        let e = Config::load(None, env("TIDINGS_PING_INTERVAL", "abc"), &[]).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("TIDINGS_PING_INTERVAL=abc: invalid duration"),
            "{text}"
        );
        assert!(
            text.ends_with(r#"(examples: "500ms", "30s", "1m 30s")"#),
            "{text}"
        );
        assert!(matches!(e, ConfigError::Invalid { ref key, .. } if key == "ping_interval"));
        // A value that is no duration at all, not just a bad one, gets the hint too.
        let text = Config::load(None, env("TIDINGS_CLOSE_TIMEOUT", "5"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("TIDINGS_CLOSE_TIMEOUT=5: invalid duration"),
            "{text}"
        );
        assert!(text.contains(r#""500ms""#), "{text}");
    }

    #[test]
    fn a_bad_file_value_names_the_file_and_the_key() {
        let file = temp_file(
            "bad-value.toml",
            "max_connections = 5\nping_interval = \"3 parsecs\"\n",
        );
        let text = Config::load(Some(&file), Vec::new(), &[])
            .unwrap_err()
            .to_string();
        let prefix = format!("{}: ping_interval: invalid duration", file.display());
        assert!(text.starts_with(&prefix), "{text}");
        assert!(text.contains(r#""1m 30s""#), "{text}");

        let file = temp_file("bad-type.toml", "max_connections = \"lots\"\n");
        let text = Config::load(Some(&file), Vec::new(), &[])
            .unwrap_err()
            .to_string();
        let prefix = format!("{}: max_connections: invalid type", file.display());
        assert!(text.starts_with(&prefix), "{text}");
        assert!(!text.contains("examples"), "not a duration: {text}");

        let file = temp_file("unknown.toml", "max_conections = 5\n");
        let e = Config::load(Some(&file), Vec::new(), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: unknown key `max_conections` (`tidings serve --help` lists them)",
                file.display()
            )
        );

        let file = temp_file("syntax.toml", "echo = true\nmax_connections = = 5\n");
        let text = Config::load(Some(&file), Vec::new(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            text.starts_with(&format!("{}:2: ", file.display())),
            "{text}"
        );
    }

    #[test]
    fn an_env_error_is_blamed_on_the_variable_not_the_file() {
        // The file is fine; the variable that overrides one of its keys is not.
        let file = temp_file("fine.toml", "max_subscriptions = 5\n");
        let text = Config::load(Some(&file), env("TIDINGS_MAX_SUBSCRIPTIONS", "many"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            text.starts_with("TIDINGS_MAX_SUBSCRIPTIONS=many: invalid type"),
            "{text}"
        );
        let text = Config::load(None, env("TIDINGS_FOO", "1"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            text.starts_with("TIDINGS_FOO=1: unknown key `foo`"),
            "{text}"
        );
    }

    #[test]
    fn a_bad_flag_names_the_flag() {
        let flags = [(
            "listen".to_string(),
            toml::Value::from("nowhere.invalid:80"),
        )];
        let e = Config::load(None, Vec::new(), &flags).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("--listen nowhere.invalid:80: cannot resolve"),
            "{text}"
        );
        assert!(matches!(e, ConfigError::Invalid { ref key, .. } if key == "listen"));
        let flags = [("listen".to_string(), toml::Value::from("localhost"))];
        let text = Config::load(None, Vec::new(), &flags)
            .unwrap_err()
            .to_string();
        assert!(text.starts_with("--listen localhost: "), "{text}");
        assert!(text.contains("expected host:port"), "{text}");
    }

    /// docs/OPERATIONS.md lists every key at its default, and a row for each: a key added,
    /// renamed or given a new default without the docs fails here.
    #[test]
    fn operations_md_lists_every_key_at_its_default() {
        let doc = include_str!("../docs/OPERATIONS.md");
        let start = doc.find("```toml\n").expect("the settings block") + "```toml\n".len();
        let end = start + doc[start..].find("```").expect("its end");
        let documented: toml::Table = doc[start..end].parse().expect("the block is TOML");
        let defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
        let mut keys: Vec<&String> = documented.keys().collect();
        let mut wanted: Vec<&String> = defaults.keys().collect();
        keys.sort();
        wanted.sort();
        assert_eq!(keys, wanted, "keys of the documented block");
        let parsed: Config = documented.clone().try_into().expect("the block loads");
        assert_eq!(
            parsed,
            Config::default(),
            "the documented values are the defaults"
        );
        for key in wanted {
            assert!(
                doc.contains(&format!("| `{key}` |")),
                "no table row for {key}"
            );
        }
    }

    #[test]
    fn auth_keys_merge_across_layers_and_secrets_stay_hidden() {
        let file = temp_file(
            "auth.toml",
            "[auth]\nhmac_secret = \"file-secret-0123456789abcdef-01234\"\npublic = [\"news\"]\n",
        );
        let env = vec![
            ("TIDINGS_AUTH_LEEWAY".to_string(), "5".to_string()),
            (
                "TIDINGS_AUTH_USER_TOPICS".to_string(),
                "[\"user:{sub}\"]".to_string(),
            ),
            ("TIDINGS_AUTH_TOKEN_EXPIRING".to_string(), "30s".to_string()),
        ];
        let c = Config::load(Some(&file), env, &[]).unwrap();
        assert_eq!(
            c.auth.hmac_secret.expose(),
            "file-secret-0123456789abcdef-01234"
        );
        assert_eq!(c.auth.public, vec!["news".to_string()]);
        assert_eq!(c.auth.leeway, 5);
        assert_eq!(c.auth.user_topics, vec!["user:{sub}".to_string()]);
        assert_eq!(c.auth.token_expiring, Duration::from_secs(30));
        // A secret of digits is still a string.
        let digits = "12345678901234567890123456789012345";
        let c = Config::load(None, env_pair("TIDINGS_AUTH_HMAC_SECRET", digits), &[]).unwrap();
        assert_eq!(c.auth.hmac_secret.expose(), digits);
        let e = Config::load(None, env_pair("TIDINGS_AUTH_NOPE", "1"), &[]).unwrap_err();
        assert!(e.to_string().contains("unknown key `auth_nope`"), "{e}");
        let e = Config::load(
            None,
            env_pair("TIDINGS_AUTH_HMAC_SECRET", "short-secret"),
            &[],
        );
        let text = e.unwrap_err().to_string();
        assert!(
            text.contains("hmac_secret") && !text.contains("short-secret"),
            "{text}"
        );
        let file = temp_file("auth-bad.toml", "[auth]\nleeway = \"lots\"\n");
        let text = Config::load(Some(&file), Vec::new(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("auth") && text.contains("invalid type"),
            "{text}"
        );
    }

    fn env_pair(name: &str, value: &str) -> Vec<(String, String)> {
        vec![(name.to_string(), value.to_string())]
    }

    #[test]
    fn listen_accepts_host_names() {
        let flags = [("listen".to_string(), toml::Value::from("localhost:8123"))];
        let c = Config::load(None, Vec::new(), &flags).unwrap();
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 8123)));
        let c = Config::load(None, env("TIDINGS_LISTEN", "localhost:0"), &[]).unwrap();
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 0)));
        let file = temp_file("listen.toml", "listen = \"[::1]:9\"\n");
        let c = Config::load(Some(&file), Vec::new(), &[]).unwrap();
        assert_eq!(c.listen, "[::1]:9".parse().unwrap());
        let file = temp_file("listen-bad.toml", "listen = \"nowhere.invalid:9\"\n");
        let text = Config::load(Some(&file), Vec::new(), &[])
            .unwrap_err()
            .to_string();
        let prefix = format!("{}: listen: cannot resolve", file.display());
        assert!(text.starts_with(&prefix), "{text}");
    }
}
