//! HTTP/1.1 by hand: refusals, publishing, stats, and upgrade requests bent out of shape.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{RFC_KEY, within};

/// A parsed HTTP response.
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Shows the body as text, which is what a failing assertion needs.
impl std::fmt::Debug for HttpResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; fails the test if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body of {} response is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts an error response: `status`, a JSON body with `code` and a string
    /// `message`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status,
            status,
            "expected {status} {code}, got {} with body {:?}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        let body = self.json();
        assert_eq!(body["code"], code, "error body: {body}");
        assert!(
            body["message"].is_string(),
            "error body has no string message: {body}"
        );
        let content_type = self.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "error content-type is {content_type:?}"
        );
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, what: &str) {
    let mut chunk = [0u8; 16 * 1024];
    let n = within(what, stream.read(&mut chunk))
        .await
        .unwrap_or_else(|e| panic!("read error while waiting for {what}: {e}"));
    assert!(
        n > 0,
        "EOF while waiting for {what}; have {:?}",
        String::from_utf8_lossy(buf)
    );
    buf.extend_from_slice(&chunk[..n]);
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads and parses one response head from `stream`; what follows it stays in `buf`.
pub async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> HttpResponse {
    let head_end = loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            break pos;
        }
        fill(stream, buf, "response head").await;
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("response head is UTF-8");
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    assert!(
        version.starts_with("HTTP/1."),
        "bad status line {status_line:?}"
    );
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (k, v) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {line:?}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    HttpResponse {
        status,
        headers,
        body: Vec::new(),
    }
}

/// Reads one response from `stream`. Bytes after the response (for a 101, the first
/// WebSocket frames) stay in `buf`.
pub async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> HttpResponse {
    let mut response = read_head(stream, buf).await;
    read_body(stream, buf, &mut response).await;
    response
}

/// Reads `response`'s body, as its head frames it: none (101, 204, 304), by
/// `Content-Length`, chunked, or to EOF.
pub async fn read_body(stream: &mut TcpStream, buf: &mut Vec<u8>, response: &mut HttpResponse) {
    let status = response.status;
    if status == 101 || status == 204 || status == 304 {
        return;
    }
    if let Some(len) = response.header("content-length") {
        let len: usize = len.parse().expect("content-length");
        while buf.len() < len {
            fill(stream, buf, "response body").await;
        }
        response.body = buf.drain(..len).collect();
    } else if response
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        loop {
            let line_end = loop {
                if let Some(pos) = find(buf, b"\r\n") {
                    break pos;
                }
                fill(stream, buf, "chunk size").await;
            };
            let size_text = String::from_utf8_lossy(&buf[..line_end]).to_string();
            let size_hex = size_text.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16).expect("chunk size");
            buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers (none expected) end with an empty line.
                while find(buf, b"\r\n").is_none() {
                    fill(stream, buf, "chunked trailer").await;
                }
                let end = find(buf, b"\r\n").unwrap_or_default();
                buf.drain(..end + 2);
                break;
            }
            while buf.len() < size + 2 {
                fill(stream, buf, "chunk data").await;
            }
            response.body.extend(buf.drain(..size));
            buf.drain(..2);
        }
    } else {
        // No length: the body runs to EOF.
        let mut rest = Vec::new();
        within("response body to EOF", stream.read_to_end(&mut rest))
            .await
            .expect("read body");
        buf.extend_from_slice(&rest);
        response.body = std::mem::take(buf);
    }
}

/// Sends `request` verbatim on a new connection and reads one response.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    let mut buf = Vec::new();
    read_response(&mut stream, &mut buf).await
}

/// A well-formed request with `Connection: close`.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    raw_http(addr, &bytes).await
}

pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(addr, "GET", path, &[], b"").await
}

/// `POST /v1/topics/{topic}/events` with `body`.
pub async fn publish(addr: SocketAddr, topic: &str, body: &[u8]) -> HttpResponse {
    http_request(
        addr,
        "POST",
        &format!("/v1/topics/{topic}/events"),
        &[("Content-Type", "application/json")],
        body,
    )
    .await
}

/// Publishes and asserts `202 {"topic":topic,"offset":N}`; returns N.
pub async fn publish_ok(addr: SocketAddr, topic: &str, body: &[u8]) -> u64 {
    let response = publish(addr, topic, body).await;
    assert_eq!(
        response.status,
        202,
        "publish to {topic}: {:?}",
        String::from_utf8_lossy(&response.body)
    );
    let json = response.json();
    assert_eq!(json["topic"], topic, "publish response {json}");
    json["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("publish response has no offset: {json}"))
}

/// `GET /stats` as JSON.
pub async fn get_stats(addr: SocketAddr) -> Value {
    let response = http_get(addr, "/stats").await;
    assert_eq!(response.status, 200, "stats: {response:?}");
    response.json()
}

/// An upgrade request a test can bend out of shape, one header at a time.
#[derive(Clone)]
pub struct UpgradeRequest {
    pub method: String,
    pub path: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
}

impl UpgradeRequest {
    /// A valid RFC 6455 opening handshake for `/ws` using the RFC's example key.
    pub fn new(addr: SocketAddr) -> UpgradeRequest {
        UpgradeRequest {
            method: "GET".into(),
            path: "/ws".into(),
            version: "HTTP/1.1".into(),
            headers: vec![
                ("Host".into(), addr.to_string()),
                ("Upgrade".into(), "websocket".into()),
                ("Connection".into(), "Upgrade".into()),
                ("Sec-WebSocket-Key".into(), RFC_KEY.into()),
                ("Sec-WebSocket-Version".into(), "13".into()),
            ],
        }
    }

    pub fn method(mut self, method: &str) -> Self {
        self.method = method.into();
        self
    }

    /// Replaces header `name` (or adds it).
    pub fn set(mut self, name: &str, value: &str) -> Self {
        self = self.without(name);
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Removes header `name`.
    pub fn without(mut self, name: &str) -> Self {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut text = format!("{} {} {}\r\n", self.method, self.path, self.version);
        for (k, v) in &self.headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str("\r\n");
        text.into_bytes()
    }

    /// Sends the request on a new connection; returns the response and, for a 101, the
    /// stream and any bytes already read past the response.
    pub async fn send(&self, addr: SocketAddr) -> (HttpResponse, TcpStream, Vec<u8>) {
        let stream = TcpStream::connect(addr).await.expect("connect");
        self.send_on(stream).await
    }

    /// As [`send`](Self::send), on a stream the caller connected.
    pub async fn send_on(&self, mut stream: TcpStream) -> (HttpResponse, TcpStream, Vec<u8>) {
        stream
            .write_all(&self.to_bytes())
            .await
            .expect("write upgrade request");
        let mut buf = Vec::new();
        let response = read_response(&mut stream, &mut buf).await;
        (response, stream, buf)
    }
}

/// `Sec-WebSocket-Accept` for `key` (RFC 6455 §4.2.2), computed independently of the
/// gateway.
pub fn accept_key(key: &str) -> String {
    use base64::Engine as _;
    use sha1::Digest as _;
    let mut hasher = sha1::Sha1::new();
    hasher.update(key.as_bytes());
    hasher.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(hasher.finalize())
}
