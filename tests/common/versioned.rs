//! Versioned topics: state documents over HTTP, polling, versions, and a client-side mirror
//! of a state document that applies `snapshot` and `change` messages the way a real client
//! would, refusing any gap or duplicate.

use std::net::SocketAddr;

use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{HttpResponse, TestGateway, WsClient, http_get, http_request, publish_ok, within};

/// A version string split into its epoch (16 hex digits) and offset.
pub fn split_version(version: &str) -> (String, u64) {
    let (epoch, offset) = version
        .split_once(':')
        .unwrap_or_else(|| panic!("version {version:?} is not epoch:offset"));
    assert!(
        epoch.len() == 16
            && epoch
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "epoch of {version:?} is not 16 lowercase hex digits"
    );
    let offset = offset
        .parse()
        .unwrap_or_else(|_| panic!("offset of {version:?} is not a decimal u64"));
    (epoch.to_string(), offset)
}

/// The version string of `offset` in `epoch`.
pub fn version_of(epoch: &str, offset: u64) -> String {
    format!("{epoch}:{offset}")
}

/// A string field of a message, or a failure naming the message.
pub fn str_field<'a>(message: &'a Value, field: &str) -> &'a str {
    message[field]
        .as_str()
        .unwrap_or_else(|| panic!("message has no string {field:?}: {message}"))
}

/// Connects a WebSocket client to `path` (e.g. `/ws/app/profile`).
pub async fn connect_path(addr: SocketAddr, path: &str) -> WsClient {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let request = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (ws, response) = within(
        "WebSocket handshake",
        tokio_tungstenite::client_async_with_config(request, stream, Some(config)),
    )
    .await
    .expect("WebSocket handshake");
    assert_eq!(response.status(), 101);
    WsClient { ws }
}

/// Sends `request` (a full `subscribe` message with `"id"`) and waits for its ack.
pub async fn subscribe_with(client: &mut WsClient, request: Value) -> Value {
    let id = request["id"].clone();
    client.send_json(&request).await;
    let ack = client.next_json().await;
    assert_eq!(ack["type"], "subscribed", "subscribe {request}: got {ack}");
    assert_eq!(ack["id"], id, "subscribe ack: {ack}");
    ack
}

/// Subscribes to one topic with a `since` version.
pub async fn subscribe_since(client: &mut WsClient, topic: &str, since: &str, id: u64) -> Value {
    subscribe_with(
        client,
        json!({"type": "subscribe", "topics": [topic], "since": {topic: since}, "id": id}),
    )
    .await
}

/// The next message, which must be of `kind` about `topic`.
pub async fn next_of(client: &mut WsClient, kind: &str, topic: &str) -> Value {
    let message = client.next_json().await;
    assert_eq!(message["type"], kind, "expected {kind}, got {message}");
    assert_eq!(
        message["topic"], topic,
        "{kind} for another topic: {message}"
    );
    message
}

/// `PUT /v1/topics/{topic}/state` with `document`.
pub async fn put_state(addr: SocketAddr, topic: &str, document: &Value) -> HttpResponse {
    put_state_raw(addr, topic, document.to_string().as_bytes(), &[]).await
}

/// `PUT /v1/topics/{topic}/state` with a raw body and extra headers.
pub async fn put_state_raw(
    addr: SocketAddr,
    topic: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    http_request(
        addr,
        "PUT",
        &format!("/v1/topics/{topic}/state"),
        &all,
        body,
    )
    .await
}

/// What a successful `PUT` or `PATCH` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub version: String,
    pub changed: bool,
}

/// Checks a `200 {"topic","version","changed"}` with a matching `ETag`.
pub fn written(response: &HttpResponse, topic: &str) -> Written {
    assert_eq!(response.status, 200, "state write to {topic}: {response:?}");
    let body = response.json();
    assert_eq!(body["topic"], topic, "state write response {body}");
    let version = str_field(&body, "version").to_string();
    split_version(&version);
    assert_eq!(
        response.header("etag"),
        Some(format!("\"{version}\"").as_str()),
        "ETag of the write response {response:?}"
    );
    let changed = body["changed"]
        .as_bool()
        .unwrap_or_else(|| panic!("no boolean changed: {body}"));
    Written { version, changed }
}

/// PUTs `document` and expects a 200; returns what was written.
pub async fn put_state_ok(addr: SocketAddr, topic: &str, document: &Value) -> Written {
    written(&put_state(addr, topic, document).await, topic)
}

/// `PATCH /v1/topics/{topic}/state` with an RFC 6902 patch.
pub async fn patch_state(addr: SocketAddr, topic: &str, patch: &Value) -> HttpResponse {
    patch_state_raw(addr, topic, patch.to_string().as_bytes(), &[]).await
}

/// `PATCH` with a raw body; `Content-Type: application/json-patch+json` unless `headers`
/// names another.
pub async fn patch_state_raw(
    addr: SocketAddr,
    topic: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        all.push(("Content-Type", "application/json-patch+json"));
    }
    http_request(
        addr,
        "PATCH",
        &format!("/v1/topics/{topic}/state"),
        &all,
        body,
    )
    .await
}

/// PATCHes and expects a 200; returns what was written.
pub async fn patch_state_ok(addr: SocketAddr, topic: &str, patch: &Value) -> Written {
    written(&patch_state(addr, topic, patch).await, topic)
}

/// `GET /v1/topics/{topic}/state`: returns (version, state), checking body and `ETag`.
pub async fn get_state(addr: SocketAddr, topic: &str) -> (String, Value) {
    let response = http_get(addr, &format!("/v1/topics/{topic}/state")).await;
    assert_eq!(response.status, 200, "GET state of {topic}: {response:?}");
    let body = response.json();
    assert_eq!(body["topic"], topic, "GET state body {body}");
    let version = str_field(&body, "version").to_string();
    assert_eq!(
        response.header("etag"),
        Some(format!("\"{version}\"").as_str()),
        "ETag of GET state {response:?}"
    );
    (version, body["state"].clone())
}

/// `GET /v1/topics/{topic}/events?{query}` as JSON, checking its shape.
pub async fn poll(addr: SocketAddr, topic: &str, query: &str) -> Value {
    let response = http_get(addr, &format!("/v1/topics/{topic}/events?{query}")).await;
    assert_eq!(response.status, 200, "poll {topic}?{query}: {response:?}");
    let body = response.json();
    assert_eq!(body["topic"], topic, "poll body {body}");
    assert!(body["events"].is_array(), "poll body {body}");
    assert!(body["next_offset"].is_u64(), "poll body {body}");
    assert!(
        body["status"] == "open" || body["status"] == "closed",
        "poll status: {body}"
    );
    body
}

/// The epoch of an event topic, read from a poll.
pub async fn epoch_of(addr: SocketAddr, topic: &str) -> String {
    let body = poll(addr, topic, "limit=1").await;
    let epoch = str_field(&body, "epoch").to_string();
    split_version(&version_of(&epoch, 0));
    epoch
}

/// `POST /v1/topics/{topic}/close`.
pub async fn close_topic(addr: SocketAddr, topic: &str) -> HttpResponse {
    http_request(addr, "POST", &format!("/v1/topics/{topic}/close"), &[], b"").await
}

/// A client's copy of a state document, kept by applying `snapshot` and `change`
/// messages. Any change that does not start at the version the mirror is at (a gap or a
/// duplicate) fails the test.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub topic: String,
    pub version: String,
    pub doc: Value,
    /// Every version applied, in order (the snapshot's first).
    pub seen: Vec<String>,
}

impl Mirror {
    /// A mirror starting from a `snapshot` message.
    pub fn from_snapshot(message: &Value) -> Mirror {
        assert_eq!(
            message["type"], "snapshot",
            "expected a snapshot: {message}"
        );
        let version = str_field(message, "version").to_string();
        split_version(&version);
        assert!(
            message.get("state").is_some(),
            "snapshot without state: {message}"
        );
        Mirror {
            topic: str_field(message, "topic").to_string(),
            seen: vec![version.clone()],
            version,
            doc: message["state"].clone(),
        }
    }

    /// A mirror of a document the client already holds at `version`.
    pub fn at(topic: &str, version: &str, doc: Value) -> Mirror {
        Mirror {
            topic: topic.to_string(),
            version: version.to_string(),
            doc,
            seen: vec![version.to_string()],
        }
    }

    /// Applies one `change` message: its `old_version` must be this mirror's version and
    /// its `new_version` the next offset of the same epoch.
    pub fn apply(&mut self, message: &Value) {
        assert_eq!(message["type"], "change", "expected a change: {message}");
        assert_eq!(message["topic"], self.topic.as_str(), "change: {message}");
        let old = str_field(message, "old_version");
        let new = str_field(message, "new_version");
        assert_eq!(
            old, self.version,
            "change does not follow the version the client has (gap or duplicate): {message}; \
             versions seen {:?}",
            self.seen
        );
        let (old_epoch, old_offset) = split_version(old);
        let (new_epoch, new_offset) = split_version(new);
        assert_eq!(old_epoch, new_epoch, "change crosses epochs: {message}");
        assert_eq!(
            new_offset,
            old_offset + 1,
            "change skips offsets: {message}"
        );
        let patch: json_patch::Patch = serde_json::from_value(message["diff"].clone())
            .unwrap_or_else(|e| panic!("diff is not an RFC 6902 patch ({e}): {message}"));
        json_patch::patch(&mut self.doc, &patch)
            .unwrap_or_else(|e| panic!("diff does not apply ({e}): {message} to {}", self.doc));
        self.version = new.to_string();
        self.seen.push(self.version.clone());
    }

    /// Reads and applies changes until the mirror is at `version`.
    pub async fn follow_to(&mut self, client: &mut WsClient, version: &str) {
        let (_, target) = split_version(version);
        while self.version != version {
            let (_, at) = split_version(&self.version);
            assert!(
                at < target,
                "mirror passed {version} without reaching it: {:?}",
                self.seen
            );
            let message = client.next_json().await;
            self.apply(&message);
        }
    }
}

// Shared by tests/versioned.rs and tests/state.rs.

/// An epoch no topic of these tests can have (topics draw 64 random bits).
pub const FOREIGN_EPOCH: &str = "0123456789abcdef";

/// Reads `offsets` in order as events of `topic`, checking each one's data is `{"n":
/// offset}`.
pub async fn expect_numbered_events(
    client: &mut WsClient,
    topic: &str,
    offsets: impl Iterator<Item = u64>,
) {
    for expected in offsets {
        let (t, offset, data) = client.next_event().await;
        assert_eq!(t, topic);
        assert_eq!(offset, expected, "events out of order or missing");
        assert_eq!(data, json!({"n": expected}), "data of event {offset}");
    }
}

/// Publishes `{"n": i}` for each `i` of `range`, checking each gets offset `i`.
pub async fn publish_numbered(gw: &TestGateway, topic: &str, range: std::ops::RangeInclusive<u64>) {
    for n in range {
        let body = json!({"n": n}).to_string();
        assert_eq!(publish_ok(gw.addr, topic, body.as_bytes()).await, n);
    }
}

/// The first frames a subscriber of a state topic gets after its ack: a snapshot, or (for
/// a topic with no document yet) the first change, applied to `null`.
pub async fn first_state(client: &mut WsClient, topic: &str) -> Mirror {
    let first = client.next_json().await;
    assert_eq!(first["topic"], topic, "{first}");
    match first["type"].as_str() {
        Some("snapshot") => Mirror::from_snapshot(&first),
        Some("change") => {
            let old = str_field(&first, "old_version");
            assert_eq!(
                split_version(old).1,
                0,
                "first change of a new document: {first}"
            );
            let mut mirror = Mirror::at(topic, old, Value::Null);
            mirror.apply(&first);
            mirror
        }
        _ => panic!("expected a snapshot or change, got {first}"),
    }
}

/// Expects `history_truncated` for `topic` with these versions.
pub async fn expect_truncated(
    client: &mut WsClient,
    topic: &str,
    last: &str,
    first: &str,
    current: &str,
) {
    let message = next_of(client, "history_truncated", topic).await;
    assert_eq!(message["last_version"], last, "{message}");
    assert_eq!(message["first_available"], first, "{message}");
    assert_eq!(message["version"], current, "{message}");
}
