//! Server-Sent Events and long-polling through real sockets: streams, resume with
//! `Last-Event-ID`, patterns, state documents, CORS, overflow, shutdown, and a client that
//! moves between transports without losing or repeating a publication.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Publishes `n` events `{"i":k}` to `topic`; returns their offsets.
async fn publish_n(addr: std::net::SocketAddr, topic: &str, n: usize) -> Vec<u64> {
    let mut offsets = Vec::with_capacity(n);
    for i in 0..n {
        offsets.push(publish_ok(addr, topic, format!("{{\"i\":{i}}}").as_bytes()).await);
    }
    offsets
}

#[tokio::test]
async fn a_single_topic_stream_carries_events_with_their_version_as_id() {
    let gw = TestGateway::start_default().await;
    let mut sse = SseClient::open(gw.addr, "/v1/topics/runs:1/sse", &[]).await;
    // Live once its retry hint arrives (the shard writes it as it subscribes the stream).
    sse.live().await;
    publish_ok(gw.addr, "runs:1", br#"{"status":"running"}"#).await;
    let message = sse.next_message().await;
    assert_eq!(message["type"], "event");
    assert_eq!(message["data"], json!({"status": "running"}));
    assert_eq!(sse.last_id.as_deref(), message["version"].as_str());
    assert_eq!(sse.retry, Some(3000), "the retry hint comes first");
}

#[tokio::test]
async fn a_payload_with_newlines_arrives_intact() {
    let gw = TestGateway::start_default().await;
    let mut sse = SseClient::open(gw.addr, "/v1/topics/t/sse", &[]).await;
    // Live once its retry hint arrives (the shard writes it as it subscribes the stream).
    sse.live().await;
    let body = b"{\n  \"a\": \"x\",\r\n  \"b\": [1,\r2]\n}";
    publish_ok(gw.addr, "t", body).await;
    let event = sse.next().await.expect("an event");
    assert!(
        event.data.lines().count() >= 4,
        "one data line per line: {event:?}"
    );
    let message = event.json();
    assert_eq!(message["data"], json!({"a": "x", "b": [1, 2]}));
}

#[tokio::test]
async fn last_event_id_resumes_three_topics_exactly() {
    let gw = TestGateway::start_default().await;
    let path = "/v1/sse?topics=a,b,c";
    let mut sse = SseClient::open(gw.addr, path, &[]).await;
    // Live once its retry hint arrives (the shard writes it as it subscribes the stream).
    sse.live().await;
    for topic in ["a", "b", "c"] {
        publish_ok(gw.addr, topic, b"{\"before\":true}").await;
    }
    let seen = sse.next_events(3).await;
    assert_eq!(seen.len(), 3);
    let id = sse.last_id.clone().expect("an id");
    assert!(id.starts_with("c1;"), "a multi-topic cursor: {id}");
    drop(sse);
    gw.stats_until("the stream to end", |s| s.connections == 0)
        .await;
    let mut expected: HashMap<&str, Vec<u64>> = HashMap::new();
    for topic in ["a", "b", "c"] {
        expected.insert(topic, publish_n(gw.addr, topic, 50).await);
    }
    let mut resumed = SseClient::open(gw.addr, path, &[("Last-Event-ID", &id)]).await;
    let events = resumed.next_events(150).await;
    let mut got: HashMap<&str, Vec<u64>> = HashMap::new();
    for (topic, offset) in &events {
        let key = ["a", "b", "c"]
            .into_iter()
            .find(|t| t == topic)
            .expect("one of the stream's topics");
        got.entry(key).or_default().push(*offset);
    }
    assert_eq!(got, expected, "exactly the 50 missed per topic, in order");
    // Nothing more: a live publication comes next, not a repeat.
    publish_ok(gw.addr, "b", b"{\"live\":true}").await;
    let next = resumed.next_message().await;
    assert_eq!(
        (next["topic"].as_str(), next["offset"].as_u64()),
        (Some("b"), Some(52))
    );
}

#[tokio::test]
async fn last_event_id_of_a_single_topic_stream_is_the_websocket_since() {
    let gw = TestGateway::start_default().await;
    let mut sse = SseClient::open(gw.addr, "/v1/topics/jobs:7/sse", &[]).await;
    // Live once its retry hint arrives (the shard writes it as it subscribes the stream).
    sse.live().await;
    publish_n(gw.addr, "jobs:7", 3).await;
    sse.next_events(3).await;
    let id = sse.last_id.clone().expect("an id");
    drop(sse);
    publish_n(gw.addr, "jobs:7", 2).await;
    // The same id as a query parameter, for clients that cannot set headers.
    let path = format!("/v1/topics/jobs:7/sse?last_event_id={id}");
    let mut resumed = SseClient::open(gw.addr, &path, &[]).await;
    let events = resumed.next_events(2).await;
    assert_eq!(events, vec![("jobs:7".into(), 4), ("jobs:7".into(), 5)]);
    // And as a WebSocket `since`.
    let mut ws = WsClient::connect(gw.addr).await;
    subscribe_since(&mut ws, "jobs:7", &id, 1).await;
    assert_eq!(ws.next_events(2).await.len(), 2);
}

#[tokio::test]
async fn a_pattern_stream_dropped_mid_way_gets_exactly_what_it_missed() {
    let gw = TestGateway::start_default().await;
    let path = "/v1/sse?patterns=w:**";
    let mut sse = SseClient::open(gw.addr, path, &[]).await;
    // Live once its retry hint arrives (the shard writes it as it subscribes the stream).
    sse.live().await;
    publish_ok(gw.addr, "w:a", b"{}").await;
    assert_eq!(sse.next_events(1).await, vec![("w:a".into(), 1)]);
    let id = sse.last_id.clone().expect("an id");
    drop(sse);
    gw.stats_until("the stream to end", |s| s.connections == 0)
        .await;
    publish_n(gw.addr, "w:a", 2).await;
    publish_n(gw.addr, "w:b:c", 3).await;
    let mut resumed = SseClient::open(gw.addr, path, &[("Last-Event-ID", &id)]).await;
    let mut got = resumed.next_events(5).await;
    got.sort();
    assert_eq!(
        got,
        vec![
            ("w:a".into(), 2),
            ("w:a".into(), 3),
            ("w:b:c".into(), 1),
            ("w:b:c".into(), 2),
            ("w:b:c".into(), 3)
        ]
    );
    publish_ok(gw.addr, "w:a", b"{}").await;
    assert_eq!(
        resumed.next_events(1).await,
        vec![("w:a".into(), 4)],
        "no repeat"
    );
}

#[tokio::test]
async fn a_state_document_streams_a_snapshot_then_changes() {
    let gw = TestGateway::start_default().await;
    let put = http_request(
        gw.addr,
        "PUT",
        "/v1/topics/cfg:prod/state",
        &[("Content-Type", "application/json")],
        br#"{"a":1}"#,
    )
    .await;
    assert_eq!(put.status, 200, "{put:?}");
    let mut sse = SseClient::open(gw.addr, "/v1/topics/cfg:prod/sse", &[]).await;
    let snapshot = sse.next_message().await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["state"], json!({"a": 1}));
    assert_eq!(sse.last_id.as_deref(), snapshot["version"].as_str());
    let patch = http_request(
        gw.addr,
        "PATCH",
        "/v1/topics/cfg:prod/state",
        &[("Content-Type", "application/json-patch+json")],
        br#"[{"op":"replace","path":"/a","value":2}]"#,
    )
    .await;
    assert_eq!(patch.status, 200, "{patch:?}");
    let change = sse.next_message().await;
    assert_eq!(change["type"], "change");
    assert_eq!(change["old_version"], snapshot["version"]);
    assert_eq!(sse.last_id.as_deref(), change["new_version"].as_str());
}

#[tokio::test]
async fn a_filter_applies_as_on_websocket() {
    let gw = TestGateway::start_default().await;
    let filter = "%7B%22status%22%3A%5B%22done%22%5D%7D"; // {"status":["done"]}
    let path = format!("/v1/sse?topics=f&filter={filter}");
    let mut sse = SseClient::open(gw.addr, &path, &[]).await;
    // Live once its retry hint arrives (the shard writes it as it subscribes the stream).
    sse.live().await;
    publish_ok(gw.addr, "f", br#"{"status":"running"}"#).await;
    publish_ok(gw.addr, "f", br#"{"status":"done"}"#).await;
    let message = sse.next_message().await;
    assert_eq!(message["offset"], 2, "{message}");
}

#[tokio::test]
async fn bad_streams_are_refused_before_the_stream_starts() {
    let gw = TestGateway::start_default().await;
    for (path, status, code) in [
        ("/v1/sse", 400, "invalid_request"),
        ("/v1/sse?topics=bad%20topic", 400, "invalid_topic"),
        ("/v1/sse?patterns=a:**:b", 400, "invalid_pattern"),
        ("/v1/sse?topics=a&filter=%7B", 400, "invalid_filter"),
        (
            "/v1/topics/a/sse?last_event_id=12",
            400,
            "invalid_last_event_id",
        ),
    ] {
        let sse = SseClient::open_any(gw.addr, path, &[]).await;
        sse.head.assert_error(status, code);
    }
    let post = http_request(gw.addr, "POST", "/v1/topics/a/sse", &[], b"").await;
    post.assert_error(405, "method_not_allowed");
    gw.assert_alive().await;
}

#[tokio::test]
async fn cors_follows_allowed_origins() {
    let config =
        tidings::Config::default().allowed_origins(vec!["https://app.example".to_string()]);
    let gw = TestGateway::start(config).await;
    let ok = SseClient::open(
        gw.addr,
        "/v1/topics/t/sse",
        &[("Origin", "https://app.example")],
    )
    .await;
    assert_eq!(
        ok.head.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let refused = SseClient::open_any(
        gw.addr,
        "/v1/topics/t/sse",
        &[("Origin", "https://evil.example")],
    )
    .await;
    refused.head.assert_error(403, "origin_forbidden");
    let poll = http_request(
        gw.addr,
        "GET",
        "/v1/topics/t/events",
        &[("Origin", "https://app.example")],
        b"",
    )
    .await;
    assert_eq!(
        poll.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let poll = http_request(
        gw.addr,
        "GET",
        "/v1/topics/t/events",
        &[("Origin", "https://evil.example")],
        b"",
    )
    .await;
    poll.assert_error(403, "origin_forbidden");
    let preflight = http_request(
        gw.addr,
        "OPTIONS",
        "/v1/topics/t/sse",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "last-event-id"),
        ],
        b"",
    )
    .await;
    assert_eq!(preflight.status, 204, "{preflight:?}");
    assert!(
        preflight
            .header("access-control-allow-headers")
            .is_some_and(|h| h.to_ascii_lowercase().contains("last-event-id"))
    );
    // With no list, a stream opens for any origin but carries no CORS headers: only
    // same-origin pages (and clients that are not browsers) can read it.
    let open = TestGateway::start_default().await;
    let any = SseClient::open(
        open.addr,
        "/v1/topics/t/sse",
        &[("Origin", "https://x.example")],
    )
    .await;
    assert_eq!(any.head.header("access-control-allow-origin"), None);
}

#[tokio::test]
async fn an_sse_request_on_a_kept_alive_connection_is_sent_to_a_fresh_one() {
    let gw = TestGateway::start_default().await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    use tokio::io::AsyncWriteExt;
    let first = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", gw.addr);
    stream.write_all(first.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut stream, &mut buf).await.status, 200);
    let second = format!("GET /v1/topics/t/sse HTTP/1.1\r\nHost: {}\r\n\r\n", gw.addr);
    stream.write_all(second.as_bytes()).await.expect("write");
    let response = read_response(&mut stream, &mut buf).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("connection"), Some("close"));
    assert!(String::from_utf8_lossy(&response.body).starts_with("retry:"));
}

#[tokio::test]
async fn sse_streams_count_against_max_connections() {
    let gw = TestGateway::start(tidings::Config::default().max_connections(1)).await;
    let _first = SseClient::open(gw.addr, "/v1/topics/t/sse", &[]).await;
    let second = SseClient::open_any(gw.addr, "/v1/topics/t/sse", &[]).await;
    second.head.assert_error(503, "over_capacity");
    assert_eq!(second.head.header("retry-after"), Some("1"));
}

#[tokio::test]
async fn heartbeats_are_comment_lines_on_the_wheel() {
    let config = tidings::Config::default().ping_interval(Duration::from_millis(50));
    let gw = TestGateway::start(config).await;
    let mut sse = SseClient::open(gw.addr, "/v1/topics/t/sse", &[]).await;
    within("two heartbeats", async {
        while sse.comments < 2 {
            // Heartbeats are not events: `next` only returns at a publication.
            tokio::select! {
                _ = sse.next() => {}
                () = tokio::task::yield_now() => {}
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_slow_sse_consumer_is_told_where_to_resume() {
    let config = tidings::Config::default().max_queued_bytes(64 * 1024);
    let gw = TestGateway::start(config).await;
    let mut slow = SseClient::open_stalled(gw.addr, "/v1/topics/big/sse").await;
    let payload = format!("{{\"pad\":\"{}\"}}", "x".repeat(8 * 1024));
    for _ in 0..rounds(payload.len(), 64 * 1024) {
        publish_ok(gw.addr, "big", payload.as_bytes()).await;
    }
    // The backlog arrives whole and in order, then the close that says where to resume.
    let mut last = 0;
    let close = loop {
        let message = slow.next_message().await;
        if message["type"] == "close" {
            break message;
        }
        assert_eq!(message["offset"], last + 1, "a gap in the backlog");
        last += 1;
    };
    assert!(last > 0);
    assert_eq!(close["code"], 1013, "{close}");
    let reason = close["reason"].as_str().expect("a reason");
    assert!(reason.contains("resume with since"), "{reason}");
    gw.assert_alive().await;
}

#[tokio::test]
async fn shutdown_ends_streams_after_what_was_accepted() {
    let gw = TestGateway::start_default().await;
    let mut sse = SseClient::open(gw.addr, "/v1/topics/t/sse", &[]).await;
    // Live once its retry hint arrives (the shard writes it as it subscribes the stream).
    sse.live().await;
    publish_n(gw.addr, "t", 5).await;
    let shutdown = tokio::spawn(gw.shutdown());
    assert_eq!(sse.next_events(5).await.len(), 5);
    let close = sse.until_close().await;
    assert_eq!(close["code"], 1001, "{close}");
    within("shutdown", shutdown)
        .await
        .expect("join")
        .expect("serve");
}

#[tokio::test]
async fn a_long_poll_answers_when_something_is_published() {
    let gw = TestGateway::start_default().await;
    publish_ok(gw.addr, "lp", b"{\"n\":1}").await;
    let addr = gw.addr;
    let poll =
        tokio::spawn(async move { http_get(addr, "/v1/topics/lp/events?since=1&wait=30").await });
    publish_ok(gw.addr, "lp", b"{\"n\":2}").await;
    let page = within("the long-poll", poll).await.expect("join");
    assert_eq!(page.status, 200, "{page:?}");
    let body = page.json();
    assert_eq!(body["events"][0]["offset"], 2, "{body}");
    // Something already there answers at once, as a plain poll does.
    let page = within(
        "an immediate poll",
        http_get(gw.addr, "/v1/topics/lp/events?since=0&wait=30"),
    )
    .await;
    assert_eq!(page.json()["events"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn a_long_poll_waits_at_most_max_poll_wait() {
    let config = tidings::Config::default().max_poll_wait(Duration::from_millis(200));
    let gw = TestGateway::start(config).await;
    let page = http_get(gw.addr, "/v1/topics/quiet/events?since=0&wait=3600").await;
    assert_eq!(page.status, 200);
    assert_eq!(page.json()["events"], json!([]));
    http_get(gw.addr, "/v1/topics/quiet/events?wait=soon")
        .await
        .assert_error(400, "invalid_wait");
}

#[tokio::test]
async fn a_client_moving_ws_then_long_poll_then_sse_sees_each_publication_once() {
    let gw = TestGateway::start_default().await;
    let topic = "move:1";
    let mut seen: Vec<u64> = Vec::new();
    // WebSocket first.
    let mut ws = WsClient::connect(gw.addr).await;
    ws.subscribe(&[topic], &[], 1).await;
    publish_n(gw.addr, topic, 3).await;
    let mut last_version = String::new();
    for _ in 0..3 {
        let m = ws.next_json().await;
        seen.push(m["offset"].as_u64().expect("offset"));
        last_version = str_field(&m, "version").to_string();
    }
    ws.close().await;
    // Dropped: three more while away, then long-polls from the last version.
    publish_n(gw.addr, topic, 3).await;
    let mut since = last_version.clone();
    let (epoch, _) = split_version(&last_version);
    while seen.len() < 6 {
        let page = http_get(
            gw.addr,
            &format!("/v1/topics/{topic}/events?since={since}&wait=30&limit=2"),
        )
        .await;
        let body = page.json();
        for e in body["events"].as_array().expect("events") {
            seen.push(e["offset"].as_u64().expect("offset"));
        }
        since = version_of(&epoch, body["next_offset"].as_u64().expect("next"));
    }
    // Then SSE, resuming from the poll's position.
    publish_n(gw.addr, topic, 2).await;
    let path = format!("/v1/topics/{topic}/sse?last_event_id={since}");
    let mut sse = SseClient::open(gw.addr, &path, &[]).await;
    for (_, offset) in sse.next_events(2).await {
        seen.push(offset);
    }
    publish_ok(gw.addr, topic, b"{}").await;
    seen.push(sse.next_events(1).await[0].1);
    assert_eq!(seen, (1..=9).collect::<Vec<u64>>());
}

#[tokio::test]
async fn a_multi_topic_stream_sees_a_topic_close() {
    let gw = TestGateway::start_default().await;
    let mut sse = SseClient::open(gw.addr, "/v1/sse?topics=c1,c2", &[]).await;
    publish_ok(gw.addr, "c1", b"{}").await;
    assert_eq!(sse.next_events(1).await, vec![("c1".into(), 1)]);
    let closed = http_request(gw.addr, "POST", "/v1/topics/c1/close", &[], b"").await;
    assert_eq!(closed.status, 200, "{closed:?}");
    let message = sse.next_message().await;
    assert_eq!(message["type"], "closed", "{message}");
    assert_eq!(message["version"], closed.json()["version"]);
}

#[tokio::test]
async fn past_max_poll_waiters_a_long_poll_answers_at_once() {
    let gw = TestGateway::start(tidings::Config::default().max_poll_waiters(1)).await;
    let addr = gw.addr;
    let first =
        tokio::spawn(async move { http_get(addr, "/v1/topics/w1/events?since=0&wait=30").await });
    gw.stats_until("one waiting long-poll", |s| s.long_polls_waiting == 1)
        .await;
    // The one place is taken: this one answers now, empty, instead of waiting.
    let second = within(
        "a poll past the cap",
        http_get(gw.addr, "/v1/topics/w2/events?since=0&wait=30"),
    )
    .await;
    assert_eq!(second.json()["events"], json!([]));
    assert_eq!(
        second.header("connection"),
        Some("close"),
        "it frees its place"
    );
    publish_ok(gw.addr, "w1", b"{}").await;
    let first = within("the waiting poll", first).await.expect("join");
    assert_eq!(first.json()["events"][0]["offset"], 1);
    gw.stats_until("no waiting long-poll", |s| s.long_polls_waiting == 0)
        .await;
}

#[tokio::test]
async fn a_slow_multi_topic_state_stream_gets_fresh_snapshots_that_parse() {
    let config = tidings::Config::default().max_queued_bytes(64 * 1024);
    let gw = TestGateway::start(config).await;
    let addr = gw.addr;
    let put = |n: usize| {
        // A different pad each time, so every change carries 8 KiB.
        let pad = char::from(b'a' + (n % 26) as u8)
            .to_string()
            .repeat(8 * 1024);
        let body = json!({"n": n, "pad": pad}).to_string();
        async move {
            let response = http_request(
                addr,
                "PUT",
                "/v1/topics/doc:a/state",
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
            .await;
            assert_eq!(response.status, 200, "{response:?}");
            response.json()["version"]
                .as_str()
                .expect("version")
                .to_string()
        }
    };
    put(0).await;
    // Both topics hold documents, so the stream follows only state: it gets snapshots.
    let other = http_request(
        gw.addr,
        "PUT",
        "/v1/topics/doc:b/state",
        &[("Content-Type", "application/json")],
        b"{}",
    )
    .await;
    assert_eq!(other.status, 200, "{other:?}");
    let mut slow = SseClient::open_stalled(gw.addr, "/v1/sse?topics=doc:a,doc:b").await;
    let mut last = String::new();
    for n in 1..=rounds(8 * 1024, 64 * 1024) as usize {
        last = put(n).await;
    }
    // Whatever was dropped for a fresh snapshot, every event read parses, changes chain
    // from the version before them, and the stream reaches the last version.
    let mut at: HashMap<String, String> = HashMap::new();
    let mut snapshots = 0;
    loop {
        let message = slow.next_message().await;
        let topic = str_field(&message, "topic").to_string();
        let version = match message["type"].as_str() {
            Some("snapshot") => {
                snapshots += 1;
                str_field(&message, "version").to_string()
            }
            Some("change") => {
                if let Some(at) = at.get(&topic) {
                    assert_eq!(str_field(&message, "old_version"), at, "a gap in {topic}");
                }
                str_field(&message, "new_version").to_string()
            }
            other => panic!("unexpected {other:?}: {message}"),
        };
        if topic == "doc:a" && version == last {
            break;
        }
        at.insert(topic, version);
    }
    assert!(
        snapshots >= 3,
        "the backlog was replaced by fresh snapshots"
    );
}

#[tokio::test]
async fn a_stream_whose_client_sends_bytes_is_ended() {
    let gw = TestGateway::start_default().await;
    let stream = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let mut sse = SseClient::open_on_stream(stream, gw.addr, "/v1/topics/t/sse").await;
    sse.send_raw(b"GET /healthz HTTP/1.1\r\n\r\n").await;
    let close = sse.until_close().await;
    assert_eq!(close["code"], 1008, "{close}");
    gw.stats_until("the end to count", |s| {
        s.connections_closed.protocol_error == 1
    })
    .await;
}

#[tokio::test]
async fn a_stalled_or_oversized_sse_head_is_refused() {
    use tokio::io::AsyncWriteExt;
    let config = tidings::Config::default().handshake_timeout(Duration::from_millis(300));
    let gw = TestGateway::start(config).await;
    // The request line arrives (so it is read as SSE), the rest never does.
    let mut stalled = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    stalled
        .write_all(b"GET /v1/topics/t/sse HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    read_response(&mut stalled, &mut buf)
        .await
        .assert_error(408, "request_timeout");
    // A head past 16 KiB.
    let big = format!(
        "GET /v1/topics/t/sse HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(20 * 1024)
    );
    raw_http(gw.addr, big.as_bytes())
        .await
        .assert_error(431, "head_too_large");
    gw.assert_alive().await;
}
