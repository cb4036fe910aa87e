//! A real WebSocket client (tokio-tungstenite) speaking the tidings message protocol.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::within;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// Every server message has a string `type` and a `ts` in ms since the epoch.
pub fn assert_server_message(message: &Value) {
    assert!(
        message["type"].is_string(),
        "server message without type: {message}"
    );
    let ts = message["ts"]
        .as_u64()
        .unwrap_or_else(|| panic!("server message without numeric ts: {message}"));
    let now = now_ms();
    let day = 24 * 3600 * 1000;
    assert!(
        ts > now - day && ts < now + day,
        "ts {ts} is not ms since the epoch (now {now}): {message}"
    );
}

/// A real WebSocket client speaking the tidings message protocol.
pub struct WsClient {
    pub ws: WebSocketStream<TcpStream>,
}

/// Small buffers: some tests open a thousand of these.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

impl WsClient {
    /// Connects to `/ws`.
    pub async fn connect(addr: SocketAddr) -> WsClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        WsClient::connect_on(stream, addr).await
    }

    /// Connects to `/ws` over a stream the caller opened.
    pub async fn connect_on(stream: TcpStream, addr: SocketAddr) -> WsClient {
        stream.set_nodelay(true).expect("nodelay");
        let request = format!("ws://{addr}/ws")
            .into_client_request()
            .expect("request");
        let (ws, response) = within(
            "WebSocket handshake",
            tokio_tungstenite::client_async_with_config(request, stream, Some(client_config())),
        )
        .await
        .expect("WebSocket handshake");
        assert_eq!(response.status(), 101);
        WsClient { ws }
    }

    pub async fn send_text(&mut self, text: &str) {
        within("send", self.ws.send(Message::text(text.to_string())))
            .await
            .expect("send text");
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string()).await;
    }

    /// The next text message, skipping WebSocket pings and pongs. Fails on anything
    /// else (close, binary, EOF).
    pub async fn next_text(&mut self) -> String {
        loop {
            let message = within("a message from the gateway", self.ws.next()).await;
            match message {
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// The next message as JSON; checks the `type` and `ts` every message carries.
    pub async fn next_json(&mut self) -> Value {
        let text = self.next_text().await;
        let value: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("server sent invalid JSON ({e}): {text:?}"));
        assert_server_message(&value);
        value
    }

    /// The next message, which must be an event; returns (topic, offset, data).
    pub async fn next_event(&mut self) -> (String, u64, Value) {
        let message = self.next_json().await;
        assert_eq!(message["type"], "event", "expected an event, got {message}");
        let topic = message["topic"]
            .as_str()
            .unwrap_or_else(|| panic!("event without topic: {message}"))
            .to_string();
        let offset = message["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("event without offset: {message}"));
        (topic, offset, message["data"].clone())
    }

    /// The next `n` events as (topic, offset) pairs.
    pub async fn next_events(&mut self, n: usize) -> Vec<(String, u64)> {
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            let (topic, offset, _) = self.next_event().await;
            events.push((topic, offset));
        }
        events
    }

    /// Sends a subscribe request and waits for its acknowledgement, which must be the
    /// next message.
    pub async fn subscribe(&mut self, topics: &[&str], patterns: &[&str], id: u64) -> Value {
        self.send_json(&json!({
            "type": "subscribe",
            "topics": topics,
            "patterns": patterns,
            "id": id,
        }))
        .await;
        let ack = self.next_json().await;
        assert_eq!(ack["type"], "subscribed", "subscribe {id}: got {ack}");
        assert_eq!(ack["id"], id, "subscribe ack: {ack}");
        ack
    }

    /// Sends an unsubscribe request and waits for its acknowledgement.
    pub async fn unsubscribe(&mut self, topics: &[&str], patterns: &[&str], id: u64) -> Value {
        self.send_json(&json!({
            "type": "unsubscribe",
            "topics": topics,
            "patterns": patterns,
            "id": id,
        }))
        .await;
        let ack = self.next_json().await;
        assert_eq!(ack["type"], "unsubscribed", "unsubscribe {id}: got {ack}");
        assert_eq!(ack["id"], id, "unsubscribe ack: {ack}");
        ack
    }

    /// A protocol-level ping/pong round trip: proves the connection is up and that
    /// everything the gateway sent before the pong has been read.
    pub async fn ping(&mut self, id: u64) {
        self.send_json(&json!({"type": "ping", "id": id})).await;
        let pong = self.next_json().await;
        assert_eq!(pong["type"], "pong", "ping {id}: got {pong}");
        assert_eq!(pong["id"], id, "pong: {pong}");
    }

    /// The next message must be an error with `code`; returns it.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let message = self.next_json().await;
        assert_eq!(
            message["type"], "error",
            "expected error {code}, got {message}"
        );
        assert_eq!(message["code"], code, "error: {message}");
        assert!(
            message["message"].is_string(),
            "error without message: {message}"
        );
        message
    }

    /// Completes a client-initiated close handshake.
    pub async fn close(mut self) {
        within("close", self.ws.close(None))
            .await
            .expect("send close");
        loop {
            match within("close reply", self.ws.next()).await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_))) => continue,
                Some(Ok(_)) => continue,
            }
        }
    }
}

/// Fast reading of an event frame's envelope without parsing a large `data` value: the
/// contract fixes the field order (type, topic, offset, data, ts), so the offset sits in
/// a known prefix. Falls back to a full parse if the prefix is not as expected.
pub fn event_offset(text: &str, topic: &str) -> u64 {
    let prefix = format!(r#"{{"type":"event","topic":"{topic}","offset":"#);
    if let Some(rest) = text.strip_prefix(&prefix) {
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if let Ok(offset) = digits.parse() {
            return offset;
        }
    }
    let value: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("invalid JSON from server: {e}"));
    assert_eq!(value["type"], "event", "expected an event: {text:.200}");
    assert_eq!(value["topic"], topic, "event topic: {text:.200}");
    value["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("event without offset: {text:.200}"))
}
