//! Slow, stalled and greedy HTTP clients: body and request deadlines, per-address limits
//! (with trusted proxies), conflicting lengths, repeated Origins, and a shutdown that does
//! not wait for requests that will never finish.
//!
//! Deadlines are configured short (hundreds of milliseconds) and every wait is for the
//! gateway's reaction, bounded by `within`; nothing sleeps.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use tidings::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The source address of the greedy client; the legitimate one uses 127.0.0.1.
const OTHER_SOURCE: [u8; 4] = [127, 0, 0, 2];

/// Connects to `addr` from `source` (any loopback address works as a source on Linux).
async fn connect_from(source: impl Into<IpAddr>, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source.into(), 0))
        .expect("bind the source address");
    within("connect", socket.connect(addr))
        .await
        .expect("connect")
}

/// A publish head announcing 10 bytes, followed by only 3 of them.
fn stalled_publish(addr: SocketAddr) -> Vec<u8> {
    format!(
        "POST /v1/topics/edge:t/events HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/json\r\nContent-Length: 10\r\n\r\n[1,"
    )
    .into_bytes()
}

/// Expects the gateway to close `stream` (EOF, or a reset if our bytes were unread).
async fn expect_closed(stream: &mut TcpStream) {
    let mut byte = [0u8; 1];
    match within(
        "the gateway to close the connection",
        stream.read(&mut byte),
    )
    .await
    {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection to close, got {other:?}"),
    }
}

/// Reads one response on `stream` and expects the connection to close after it.
async fn response_then_close(stream: &mut TcpStream) -> HttpResponse {
    let mut buf = Vec::new();
    let response = read_response(stream, &mut buf).await;
    assert!(buf.is_empty(), "bytes after the response: {buf:?}");
    expect_closed(stream).await;
    response
}

#[tokio::test]
async fn stalled_bodies_get_408_and_free_their_handshake_places() {
    let config = Config::default()
        .max_handshakes(4)
        .body_timeout(Duration::from_millis(200));
    let gw = TestGateway::start(config).await;
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
        stream
            .write_all(&stalled_publish(gw.addr))
            .await
            .expect("write");
        stalled.push(stream);
    }
    // All four places are taken by stalled bodies; a fifth client is served once they
    // time out, not never.
    publish_ok(gw.addr, "edge:t", b"1").await;
    for stream in &mut stalled {
        let response = response_then_close(stream).await;
        response.assert_error(408, "request_timeout");
        assert_eq!(response.header("connection"), Some("close"));
    }
    gw.assert_alive().await;
}

#[tokio::test]
async fn the_whole_request_has_a_deadline() {
    // The body deadline is far away; the request deadline cuts the request first.
    let config = Config::default()
        .body_timeout(Duration::from_secs(600))
        .request_timeout(Duration::from_millis(300));
    let gw = TestGateway::start(config).await;
    let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
    stream
        .write_all(&stalled_publish(gw.addr))
        .await
        .expect("write");
    let response = response_then_close(&mut stream).await;
    response.assert_error(408, "request_timeout");
    // A request that finishes in time is untouched.
    publish_ok(gw.addr, "edge:t", b"2").await;
}

#[tokio::test]
async fn one_address_cannot_take_every_handshake() {
    let config = Config::default().max_handshakes(4).max_handshakes_per_ip(2);
    let gw = TestGateway::start(config).await;
    // Two half-sent requests from the greedy address hold its share...
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = connect_from(OTHER_SOURCE, gw.addr).await;
        stream
            .write_all(b"GET /ws HTTP/1.1\r\n")
            .await
            .expect("write");
        held.push(stream);
    }
    // ...and each further connection from it is refused at once (connections are
    // accepted in order, so the two above were accepted before these).
    for _ in 0..3 {
        let mut stream = connect_from(OTHER_SOURCE, gw.addr).await;
        let response = response_then_close(&mut stream).await;
        response.assert_error(503, "too_many_handshakes");
        assert_eq!(response.header("retry-after"), Some("1"));
        assert_eq!(response.header("connection"), Some("close"));
    }
    // Another address still connects and upgrades while the greedy one holds its share.
    let mut client = WsClient::connect(gw.addr).await;
    client.ping(1).await;
    gw.assert_alive().await;
    drop(held);
}

#[tokio::test]
async fn a_client_that_stops_reading_responses_is_dropped() {
    // One handshake place, so the next client is served only once the first is gone.
    let config = Config::default()
        .max_handshakes(1)
        .request_timeout(Duration::from_millis(300));
    let gw = TestGateway::start(config).await;
    // Responses of about 900 KB: ten of them are far more than the socket buffers hold.
    let event = format!("\"{}\"", "x".repeat(900 * 1024));
    publish_ok(gw.addr, "edge:big", event.as_bytes()).await;
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut reader = within("connect", socket.connect(gw.addr))
        .await
        .expect("connect");
    let poll = format!(
        "GET /v1/topics/edge:big/events?since=0 HTTP/1.1\r\nHost: {}\r\n\r\n",
        gw.addr
    );
    reader
        .write_all(poll.repeat(10).as_bytes())
        .await
        .expect("write");
    // It never reads; once its writes have stalled for request_timeout it is dropped and
    // its place goes to the next client.
    let health = http_get(gw.addr, "/healthz").await;
    assert_eq!(health.status, 200, "{health:?}");
    drop(reader);
}

#[tokio::test]
async fn per_address_websocket_cap_is_released_when_a_connection_ends() {
    let config = Config::default().max_connections_per_ip(2);
    let gw = TestGateway::start(config).await;
    let first = WsClient::connect(gw.addr).await;
    let mut second = WsClient::connect(gw.addr).await;
    let (response, _stream, _) = UpgradeRequest::new(gw.addr).send(gw.addr).await;
    response.assert_error(503, "too_many_connections");
    assert_eq!(response.header("retry-after"), Some("1"));
    // The cap is per address: another one is not affected.
    let stream = connect_from(OTHER_SOURCE, gw.addr).await;
    let mut other = WsClient::connect_on(stream, gw.addr).await;
    other.ping(2).await;
    // Once a connection ends its place is given back. The shard gives it back as it
    // forgets the connection, just after the close reaches us, so look again until then.
    first.close().await;
    let upgraded = within("a place to be given back", async {
        loop {
            let (response, stream, buf) = UpgradeRequest::new(gw.addr).send(gw.addr).await;
            match response.status {
                101 => return RawWs::from_parts(stream, buf, response),
                503 => tokio::task::yield_now().await,
                _ => panic!("unexpected answer {response:?}"),
            }
        }
    })
    .await;
    drop(upgraded);
    second.ping(3).await;
}

#[tokio::test]
async fn trusted_proxies_name_the_client_in_the_forwarded_header() {
    let config = Config::default()
        .trusted_proxies(vec!["127.0.0.1/32".to_string()])
        .max_connections_per_ip(1)
        .max_handshakes_per_ip(1);
    let gw = TestGateway::start(config).await;
    let via_proxy =
        |forwarded: &str| UpgradeRequest::new(gw.addr).set("X-Forwarded-For", forwarded);
    // The proxy's own address is not held to the per-address handshake cap: it carries
    // many clients. One stalled request from it leaves room for the others.
    let mut stalled = TcpStream::connect(gw.addr).await.expect("connect");
    stalled
        .write_all(b"GET /ws HTTP/1.1\r\n")
        .await
        .expect("write");
    let (response, _a, _) = via_proxy("203.0.113.5").send(gw.addr).await;
    assert_eq!(response.status, 101, "{response:?}");
    // The client is the rightmost address that is not a trusted proxy, whatever is to its
    // left (which the client itself may have written).
    let (response, _, _) = via_proxy("198.51.100.1, 203.0.113.5").send(gw.addr).await;
    response.assert_error(503, "too_many_connections");
    let (response, _, _) = via_proxy("203.0.113.5, 127.0.0.1").send(gw.addr).await;
    response.assert_error(503, "too_many_connections");
    let (response, _b, _) = via_proxy("203.0.113.6").send(gw.addr).await;
    assert_eq!(response.status, 101, "another client: {response:?}");
    // An untrusted peer cannot name a client: it counts as itself.
    let untrusted = |forwarded: &'static str| {
        let request = UpgradeRequest::new(gw.addr).set("X-Forwarded-For", forwarded);
        async move {
            let stream = connect_from(OTHER_SOURCE, gw.addr).await;
            request.send_on(stream).await
        }
    };
    let (response, _c, _) = untrusted("203.0.113.7").await;
    assert_eq!(response.status, 101, "{response:?}");
    let (response, _, _) = untrusted("203.0.113.8").await;
    response.assert_error(503, "too_many_connections");
    drop(stalled);
}

#[tokio::test]
async fn a_bad_trusted_proxy_entry_is_a_config_error() {
    let listener = tidings::listen("127.0.0.1:0".parse().expect("addr")).expect("listen");
    let gw =
        tidings::Gateway::new(Config::default().trusted_proxies(vec!["10.0.0.0/40".to_string()]));
    let e = within(
        "serve to refuse",
        gw.serve(listener, std::future::pending()),
    )
    .await
    .expect_err("a bad trusted_proxies entry must be refused");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("trusted_proxies"), "{e}");
}

/// RFC 9112 §6.1: a server may reject a request with both `Content-Length` and
/// `Transfer-Encoding` (the start of request smuggling). hyper would let Transfer-Encoding
/// win; the gateway refuses it, and a request smuggled behind it is never read.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_400() {
    let gw = TestGateway::start_default().await;
    let request = format!(
        "POST /v1/topics/edge:t/events HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/json\r\nContent-Length: 3\r\n\
         Transfer-Encoding: chunked\r\n\r\n1\r\n1\r\n0\r\n\r\n\
         POST /v1/topics/edge:smuggled/events HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Length: 1\r\n\r\n2",
        addr = gw.addr
    );
    let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let response = response_then_close(&mut stream).await;
    response.assert_error(400, "bad_request");
    let stats = get_stats(gw.addr).await;
    assert_eq!(stats["publications"], 0, "a request ran: {stats}");
    // The same publication with one length, after a good request on the same connection.
    let good = format!(
        "POST /v1/topics/edge:t/events HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 1\r\n\r\n1\
         POST /v1/topics/edge:t/events HTTP/1.1\r\nHost: {addr}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n1\r\n2\r\n0\r\n\r\n",
        addr = gw.addr
    );
    let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
    stream.write_all(good.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut stream, &mut buf).await.status, 202);
    assert_eq!(read_response(&mut stream, &mut buf).await.status, 202);
}

#[tokio::test]
async fn two_origin_headers_are_403() {
    let allowed = "https://app.example";
    let gw = TestGateway::start(Config::default().allowed_origins(vec![allowed.into()])).await;
    let one = UpgradeRequest::new(gw.addr).set("Origin", allowed);
    let (response, _stream, _) = one.send(gw.addr).await;
    assert_eq!(response.status, 101, "{response:?}");
    let mut two = UpgradeRequest::new(gw.addr).set("Origin", allowed);
    two.headers
        .push(("Origin".into(), "https://evil.example".into()));
    let (response, _, _) = two.send(gw.addr).await;
    response.assert_error(403, "origin_forbidden");
}

#[tokio::test]
async fn shutdown_does_not_wait_for_half_sent_requests() {
    // Every deadline that would end these requests on its own is far beyond the test's.
    let far = Duration::from_secs(600);
    let config = Config::default()
        .handshake_timeout(far)
        .body_timeout(far)
        .request_timeout(far)
        .shutdown_timeout(far);
    let gw = TestGateway::start(config).await;
    // Half a request head...
    let mut half_head = TcpStream::connect(gw.addr).await.expect("connect");
    half_head
        .write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .expect("write");
    // ...and a request whose handler is reading a body that stops coming: hyper answers
    // `Expect: 100-continue` when the handler starts reading, which is how we know it has.
    let mut mid_body = TcpStream::connect(gw.addr).await.expect("connect");
    let head = format!(
        "POST /v1/topics/edge:t/events HTTP/1.1\r\nHost: {}\r\nContent-Length: 10\r\n\
         Expect: 100-continue\r\n\r\n",
        gw.addr
    );
    mid_body.write_all(head.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 256];
        let n = within("100 Continue", mid_body.read(&mut chunk))
            .await
            .expect("read");
        assert!(n > 0, "EOF before 100 Continue");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert!(
        buf.starts_with(b"HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    mid_body.write_all(b"[1,").await.expect("write");
    // Connections are accepted in order, so the half head was accepted before the body.
    gw.shutdown().await.expect("serve");
    let response = response_then_close(&mut mid_body).await;
    response.assert_error(503, "shutting_down");
    expect_closed(&mut half_head).await;
}
