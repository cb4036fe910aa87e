//! Native TLS through real sockets: WebSocket (wss), SSE, long-polling and publishing over
//! https with certificates made here; plain HTTP on the TLS port, a handshake that stalls,
//! and certificate reloads on SIGHUP (good and broken) against the binary.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A certificate for `localhost` and 127.0.0.1, with its key, as PEM and DER.
struct Cert {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn new_cert() -> Cert {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("generate a certificate");
    Cert {
        cert_pem: made.cert.pem(),
        key_pem: made.signing_key.serialize_pem(),
        der: made.cert.der().clone(),
    }
}

/// A directory of its own under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tidings-tls-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `cert`'s files into `dir` (atomically, by rename, as a certificate renewal
/// should); returns their paths.
fn write_cert(dir: &TempDir, cert: &Cert) -> (PathBuf, PathBuf) {
    let (cert_file, key_file) = (dir.path("cert.pem"), dir.path("key.pem"));
    replace_file(&cert_file, &cert.cert_pem);
    replace_file(&key_file, &cert.key_pem);
    (cert_file, key_file)
}

fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn tls_config(cert_file: &Path, key_file: &Path) -> tidings::Config {
    tidings::Config::default().tls(tidings::TlsConfig {
        cert_file: cert_file.display().to_string(),
        key_file: key_file.display().to_string(),
    })
}

/// A client trusting exactly `trusted`.
fn connector(trusted: &[&Cert]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.der.clone()).expect("a root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(addr: SocketAddr, connector: &TlsConnector) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = ServerName::try_from("localhost").expect("name");
    within("the TLS handshake", connector.connect(name, tcp))
        .await
        .expect("TLS handshake")
}

/// The certificate the server presented.
fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a server certificate")
        .clone()
        .into_owned()
}

/// One HTTPS request on its own connection; returns the status and body.
async fn https(
    addr: SocketAddr,
    connector: &TlsConnector,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut stream = tls_connect(addr, connector).await;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write");
    let mut got = Vec::new();
    // The gateway ends with close_notify; a bare FIN would be an error here.
    within("the HTTPS response", stream.read_to_end(&mut got))
        .await
        .expect("read the response to its close_notify");
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let at = text.find("\r\n\r\n").expect("a head") + 4;
    (status, got[at..].to_vec())
}

async fn publish_tls(addr: SocketAddr, connector: &TlsConnector, topic: &str, body: &[u8]) -> u64 {
    let (status, body) = https(
        addr,
        connector,
        "POST",
        &format!("/v1/topics/{topic}/events"),
        body,
    )
    .await;
    assert_eq!(status, 202, "publish: {}", String::from_utf8_lossy(&body));
    let value: Value = serde_json::from_slice(&body).expect("JSON");
    value["offset"].as_u64().expect("an offset")
}

type Wss = WebSocketStream<TlsStream<TcpStream>>;

async fn wss_connect(addr: SocketAddr, connector: &TlsConnector) -> Wss {
    let stream = tls_connect(addr, connector).await;
    let request = "wss://localhost/ws".into_client_request().expect("request");
    let (ws, response) = within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .expect("WebSocket handshake over TLS");
    assert_eq!(response.status(), 101);
    ws
}

async fn next_json(ws: &mut Wss) -> Value {
    loop {
        match within("a message over wss", ws.next()).await {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).expect("JSON"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

async fn wss_subscribe(ws: &mut Wss, topic: &str) {
    let request = json!({"type": "subscribe", "topics": [topic], "id": 1});
    ws.send(Message::text(request.to_string()))
        .await
        .expect("send");
    let ack = next_json(ws).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
}

async fn next_event(ws: &mut Wss) -> Value {
    let message = next_json(ws).await;
    assert_eq!(message["type"], "event", "{message}");
    message
}

#[tokio::test]
async fn wss_subscribers_receive_small_large_and_many_publications() {
    let dir = TempDir::new("wss");
    let cert = new_cert();
    let (cert_file, key_file) = write_cert(&dir, &cert);
    let gw = TestGateway::start(tls_config(&cert_file, &key_file)).await;
    let tls = connector(&[&cert]);
    let mut ws = wss_connect(gw.addr, &tls).await;
    wss_subscribe(&mut ws, "runs:1").await;

    let offset = publish_tls(gw.addr, &tls, "runs:1", br#"{"status":"running"}"#).await;
    let event = next_event(&mut ws).await;
    assert_eq!(event["offset"], offset);
    assert_eq!(event["data"], json!({"status": "running"}));

    // Larger than one TLS record: the frame is split over several.
    let big = format!("{{\"blob\":\"{}\"}}", "x".repeat(100_000));
    publish_tls(gw.addr, &tls, "runs:1", big.as_bytes()).await;
    let event = next_event(&mut ws).await;
    assert_eq!(event["data"]["blob"].as_str().map(str::len), Some(100_000));

    // A burst from the gateway's own API (no HTTP in between), so frames queue up in the
    // outbox and leave in vectored writes, each encrypted for this connection.
    for i in 0..500 {
        gw.gw
            .publish_async("runs:1", format!("{{\"i\":{i}}}").as_bytes())
            .await
            .expect("publish");
    }
    for i in 0..500 {
        let event = next_event(&mut ws).await;
        assert_eq!(event["data"]["i"], i, "in order, none lost");
    }

    // The client's messages are read through the record layer too.
    ws.send(Message::text(json!({"type": "ping", "id": 7}).to_string()))
        .await
        .expect("ping");
    let pong = next_json(&mut ws).await;
    assert_eq!(pong["type"], "pong", "{pong}");
    ws.close(None).await.expect("close");
    gw.stats_until("the connection to end", |s| s.connections == 0)
        .await;
}

#[tokio::test]
async fn sse_long_poll_and_publish_run_over_https() {
    let dir = TempDir::new("sse");
    let cert = new_cert();
    let (cert_file, key_file) = write_cert(&dir, &cert);
    let gw = TestGateway::start(tls_config(&cert_file, &key_file)).await;
    let tls = connector(&[&cert]);

    let (status, body) = https(gw.addr, &tls, "GET", "/healthz", b"").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    let mut sse = tls_connect(gw.addr, &tls).await;
    sse.write_all(b"GET /v1/topics/jobs:9/sse HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("retry:") {
        let n = within("the SSE head", sse.read(&mut chunk))
            .await
            .expect("read");
        assert!(
            n > 0,
            "the stream ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("text/event-stream"), "{text}");
    gw.stats_until("the stream to count", |s| s.connections == 1)
        .await;

    let offset = publish_tls(gw.addr, &tls, "jobs:9", br#"{"step":"build"}"#).await;
    while !String::from_utf8_lossy(&seen).contains("\"step\":\"build\"") {
        let n = within("the SSE event", sse.read(&mut chunk))
            .await
            .expect("read");
        assert!(n > 0, "the stream ended");
        seen.extend_from_slice(&chunk[..n]);
    }

    // The polling fallback answers what was published.
    let (status, body) = https(
        gw.addr,
        &tls,
        "GET",
        "/v1/topics/jobs:9/events?since=0",
        b"",
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let polled: Value = serde_json::from_slice(&body).expect("JSON");
    assert!(
        polled.to_string().contains("build"),
        "the poll carries offset {offset}: {polled}"
    );
}

#[tokio::test]
async fn plain_http_on_the_tls_port_is_refused_and_closed() {
    let dir = TempDir::new("plain");
    let cert = new_cert();
    let (cert_file, key_file) = write_cert(&dir, &cert);
    let gw = TestGateway::start(tls_config(&cert_file, &key_file)).await;
    let mut plain = TcpStream::connect(gw.addr).await.expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    within("the refusal", plain.read_to_end(&mut got))
        .await
        .expect("read to EOF");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("tls_required"), "{text}");

    // Bytes that are neither HTTP nor TLS: the handshake fails, the connection closes.
    let mut junk = TcpStream::connect(gw.addr).await.expect("connect");
    junk.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .await
        .expect("write");
    let mut got = Vec::new();
    let _ = within("the close", junk.read_to_end(&mut got)).await;

    let tls = connector(&[&cert]);
    let (status, _) = https(gw.addr, &tls, "GET", "/healthz", b"").await;
    assert_eq!(status, 200, "still serving");
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_at_the_handshake_timeout() {
    let dir = TempDir::new("stall");
    let cert = new_cert();
    let (cert_file, key_file) = write_cert(&dir, &cert);
    let config = tls_config(&cert_file, &key_file)
        .handshake_timeout(Duration::from_millis(500))
        .max_handshakes_per_ip(2);
    let gw = TestGateway::start(config).await;
    // Two clients hold this address's every handshake place: one sends half a
    // ClientHello record and stalls, the other sends nothing.
    let mut half = TcpStream::connect(gw.addr).await.expect("connect");
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .expect("write");
    let mut silent = TcpStream::connect(gw.addr).await.expect("connect");
    let started = std::time::Instant::now();
    for stream in [&mut half, &mut silent] {
        let mut got = Vec::new();
        // A FIN or a reset: either ends the read; a connection left open fails `within`.
        let _ = within(
            "the stalled handshake to be cut",
            stream.read_to_end(&mut got),
        )
        .await;
        assert!(
            got.is_empty(),
            "nothing is sent to a handshake that never completed"
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "cut by the timeout, not at once"
    );
    // Their places are free again: a real client gets through.
    let tls = connector(&[&cert]);
    let (status, _) = https(gw.addr, &tls, "GET", "/healthz", b"").await;
    assert_eq!(status, 200);
}

/// `tidings_tls_reloads_total{result}` as the gateway reports it.
async fn reloads(addr: SocketAddr, connector: &TlsConnector, result: &str) -> u64 {
    let (status, body) = https(addr, connector, "GET", "/metrics", b"").await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body).into_owned();
    let series = format!("tidings_tls_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

async fn reloads_reach(addr: SocketAddr, connector: &TlsConnector, result: &str, n: u64) {
    within("the reload to be counted", async {
        while reloads(addr, connector, result).await < n {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

fn hangup(child: &tokio::process::Child) {
    let pid = child.id().expect("a running child") as libc::pid_t;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_keeps_connections() {
    let dir = TempDir::new("reload");
    let (old, new) = (new_cert(), new_cert());
    let (cert_file, key_file) = write_cert(&dir, &old);
    let mut command = tidings_command();
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("TIDINGS_TLS_CERT_FILE", &cert_file)
        .env("TIDINGS_TLS_KEY_FILE", &key_file);
    let (child, addr) = tidings_serving(command).await;
    let either = connector(&[&old, &new]);

    let mut ws = wss_connect(addr, &connector(&[&old])).await;
    wss_subscribe(&mut ws, "cfg:prod").await;
    let first = tls_connect(addr, &either).await;
    assert_eq!(presented(&first), old.der);

    // A renewal: new files, SIGHUP.
    write_cert(&dir, &new);
    hangup(&child);
    reloads_reach(addr, &either, "ok", 1).await;
    let after = tls_connect(addr, &connector(&[&new])).await;
    assert_eq!(
        presented(&after),
        new.der,
        "new handshakes get the new certificate"
    );
    drop(after);

    // The connection opened before the reload is untouched.
    publish_tls(addr, &either, "cfg:prod", br#"{"v":1}"#).await;
    assert_eq!(next_event(&mut ws).await["data"], json!({"v": 1}));

    // A broken key: the reload fails, the certificate in force stays.
    replace_file(
        &key_file,
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    );
    hangup(&child);
    reloads_reach(addr, &either, "error", 1).await;
    assert_eq!(reloads(addr, &either, "ok").await, 1);
    let kept = tls_connect(addr, &connector(&[&new])).await;
    assert_eq!(presented(&kept), new.der, "the old certificate is kept");
    publish_tls(addr, &either, "cfg:prod", br#"{"v":2}"#).await;
    assert_eq!(next_event(&mut ws).await["data"], json!({"v": 2}));
    drop(child);
}

#[tokio::test]
async fn a_missing_or_broken_file_stops_startup_naming_it() {
    let dir = TempDir::new("startup");
    let cert = new_cert();
    let (cert_file, key_file) = write_cert(&dir, &cert);
    let missing = dir.path("missing.pem");
    for (cert, key, named) in [
        (&missing, &key_file, &missing),
        (&cert_file, &cert_file, &cert_file),
    ] {
        let output = tidings_command()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("TIDINGS_TLS_CERT_FILE", cert)
            .env("TIDINGS_TLS_KEY_FILE", key)
            .output()
            .await
            .expect("run tidings");
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&named.display().to_string()),
            "the error names {}: {stderr}",
            named.display()
        );
    }
}
