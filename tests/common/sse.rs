//! A Server-Sent Events client by hand: one fresh connection per stream, the response head,
//! then events parsed as the WHATWG spec says (fields, comments, dispatch at a blank line,
//! `data:` lines joined with `\n`, the last event ID kept across id-only events).

use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{HttpResponse, assert_server_message, read_body, read_head, within};

/// One dispatched SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` type (`message` if none).
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

impl SseEvent {
    /// The data as JSON (every tidings event is a JSON message).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {:?}", self.data))
    }
}

/// An open SSE stream.
pub struct SseClient {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The response head.
    pub head: HttpResponse,
    /// The last event ID seen, as a browser's `EventSource` keeps it.
    pub last_id: Option<String>,
    /// The last `retry:` value seen.
    pub retry: Option<u64>,
    /// Comment lines seen (heartbeats).
    pub comments: usize,
}

/// A GET for `path` with `headers`, as one write on a fresh connection.
fn request(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

impl SseClient {
    /// Opens `path`; returns the stream, whatever the status (refusals included).
    pub async fn open_any(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        SseClient::open_on(stream, addr, path, headers).await
    }

    /// Opens `path` on a socket with a tiny receive buffer, waits until it is live, and
    /// then reads nothing until the test says so.
    pub async fn open_stalled(addr: SocketAddr, path: &str) -> SseClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        let mut client = SseClient::open_on(stream, addr, path, &[]).await;
        assert_eq!(client.head.status, 200, "{:?}", client.head);
        client.live().await;
        client
    }

    /// Opens `path` on a stream the caller connected, and waits until it is live.
    pub async fn open_on_stream(stream: TcpStream, addr: SocketAddr, path: &str) -> SseClient {
        let mut client = SseClient::open_on(stream, addr, path, &[]).await;
        assert_eq!(client.head.status, 200, "{:?}", client.head);
        client.live().await;
        client
    }

    /// Writes `bytes` to the server, which an SSE server does not expect.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    async fn open_on(
        mut stream: TcpStream,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> SseClient {
        stream
            .write_all(&request(addr, path, headers))
            .await
            .expect("write request");
        let mut buf = Vec::new();
        let head = read_stream_head(&mut stream, &mut buf).await;
        SseClient {
            stream,
            buf,
            head,
            last_id: None,
            retry: None,
            comments: 0,
        }
    }

    /// Opens `path` and asserts a `200 text/event-stream` with no declared length.
    pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let client = SseClient::open_any(addr, path, headers).await;
        assert_eq!(
            client.head.status, 200,
            "SSE open {path}: {:?}",
            client.head
        );
        assert_eq!(
            client.head.header("content-type"),
            Some("text/event-stream"),
            "{:?}",
            client.head
        );
        assert_eq!(client.head.header("content-length"), None);
        let mut client = client;
        client.live().await;
        client
    }

    /// Reads up to the stream's `retry:` hint, which the gateway writes in the same turn
    /// as it attaches the subscriptions: from then on every publication reaches it.
    pub async fn live(&mut self) {
        within("the stream's retry hint", async {
            while self.retry.is_none() {
                let line = self
                    .line()
                    .await
                    .expect("the stream ended before its retry hint");
                if let Some(ms) = line.strip_prefix("retry:") {
                    self.retry = ms.trim().parse().ok();
                }
            }
        })
        .await
    }

    /// Reconnects to `path` as an `EventSource` does: with `Last-Event-ID` if an id was seen.
    pub async fn reconnect(&self, addr: SocketAddr, path: &str) -> SseClient {
        let id = self.last_id.clone();
        let headers: Vec<(&str, &str)> =
            id.iter().map(|id| ("Last-Event-ID", id.as_str())).collect();
        SseClient::open(addr, path, &headers).await
    }

    /// The next dispatched event, or `None` when the stream ends.
    pub async fn next(&mut self) -> Option<SseEvent> {
        within("an SSE event", async {
            let mut event = String::new();
            let mut data: Option<String> = None;
            let mut id: Option<String> = None;
            loop {
                let line = self.line().await?;
                if line.is_empty() {
                    if let Some(id) = id.take() {
                        self.last_id = Some(id);
                    }
                    match data.take() {
                        Some(data) => {
                            let event = std::mem::take(&mut event);
                            let event = if event.is_empty() {
                                "message".to_string()
                            } else {
                                event
                            };
                            return Some(SseEvent { event, data });
                        }
                        None => {
                            event.clear();
                            continue;
                        }
                    }
                }
                if line.starts_with(':') {
                    self.comments += 1;
                    continue;
                }
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
                    None => (line.clone(), String::new()),
                };
                match field.as_str() {
                    "event" => event = value,
                    "data" => match &mut data {
                        Some(d) => {
                            d.push('\n');
                            d.push_str(&value);
                        }
                        None => data = Some(value),
                    },
                    "id" => id = Some(value),
                    "retry" => self.retry = value.parse().ok(),
                    _ => {}
                }
            }
        })
        .await
    }

    /// The next event's JSON message; asserts its SSE type is the message's `type`.
    pub async fn next_message(&mut self) -> Value {
        let event = self.next().await.expect("the stream ended");
        let json = event.json();
        assert_eq!(json["type"], event.event.as_str(), "{event:?}");
        if event.event != "close" {
            assert_server_message(&json);
        }
        json
    }

    /// The next `n` events as (topic, offset).
    pub async fn next_events(&mut self, n: usize) -> Vec<(String, u64)> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let m = self.next_message().await;
            assert_eq!(m["type"], "event", "{m}");
            out.push((
                m["topic"].as_str().expect("topic").to_string(),
                m["offset"].as_u64().expect("offset"),
            ));
        }
        out
    }

    /// Reads until the stream's final `close` event; returns it.
    pub async fn until_close(&mut self) -> Value {
        loop {
            let Some(event) = self.next().await else {
                panic!("the stream ended without a close event");
            };
            if event.event == "close" {
                return event.json();
            }
        }
    }

    /// Reads until the server ends the connection, returning the raw bytes that were left.
    pub async fn until_eof(&mut self) -> Vec<u8> {
        within("the end of the stream", async {
            let mut rest = std::mem::take(&mut self.buf);
            let mut chunk = [0u8; 8192];
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return rest,
                    Ok(n) => rest.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
    }

    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Some(String::from_utf8(line).expect("SSE is UTF-8"));
            }
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Reads a response head; leaves what follows (the stream) in `buf`. A response with a
/// declared length (a refusal) has its body read too.
async fn read_stream_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> HttpResponse {
    within("an SSE response head", async {
        let mut response = read_head(stream, buf).await;
        if response.header("content-length").is_some() {
            read_body(stream, buf, &mut response).await;
        }
        response
    })
    .await
}
