//! The gateway's browser-side endpoints through real sockets: the embedded client and
//! dashboard files, `GET /v1/topics`, the reserved stats topic, the new counters, and the
//! version in `subscribed` acknowledgements. (tests/browser.rs drives them from a browser.)

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn the_client_and_the_dashboard_are_served_with_tags_and_revalidated() {
    let gw = TestGateway::start_default().await;
    for (path, kind) in [
        ("/v1/client.js", "text/javascript"),
        ("/v1/fast-json-patch.js", "text/javascript"),
        ("/dashboard", "text/html"),
        ("/dashboard/dashboard.js", "text/javascript"),
        ("/dashboard/uPlot.iife.min.js", "text/javascript"),
    ] {
        let r = http_get(gw.addr, path).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("content-type").unwrap().starts_with(kind),
            "{path}"
        );
        assert!(r.header("cache-control").is_some(), "{path}");
        let tag = r.header("etag").expect("an ETag").to_owned();
        let again = http_request(gw.addr, "GET", path, &[("If-None-Match", &tag)], b"").await;
        assert_eq!(again.status, 304, "{path}");
        assert!(again.body.is_empty());
    }
    let client = http_get(gw.addr, "/v1/client.js").await;
    let source = String::from_utf8_lossy(&client.body);
    assert!(source.contains("export class Tidings"));
    assert!(
        source.contains("from './fast-json-patch.js'"),
        "resolves next to it"
    );
    http_request(gw.addr, "POST", "/v1/client.js", &[], b"")
        .await
        .assert_error(405, "method_not_allowed");
    http_get(gw.addr, "/dashboard/nope.js")
        .await
        .assert_error(404, "not_found");
    gw.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn topics_are_listed_by_name_a_page_at_a_time() {
    let gw = TestGateway::start_default().await;
    for i in 0..7 {
        publish_ok(gw.addr, &format!("list:{i}"), b"{}").await;
    }
    let put = http_request(
        gw.addr,
        "PUT",
        "/v1/topics/list:state/state",
        &[],
        b"{\"a\":1}",
    )
    .await;
    assert_eq!(put.status, 200);
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let path = format!("/v1/topics?prefix=list:&limit=3{after}");
        let page = http_get(gw.addr, &path).await.json();
        let topics = page["topics"].as_array().unwrap();
        assert!(topics.len() <= 3);
        for t in topics {
            seen.push(t["topic"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => break,
        }
    }
    let mut expected: Vec<String> = (0..7).map(|i| format!("list:{i}")).collect();
    expected.push("list:state".to_owned());
    assert_eq!(seen, expected);
    let one = http_get(gw.addr, "/v1/topics?prefix=list:state")
        .await
        .json();
    assert_eq!(one["topics"][0]["kind"], "state");
    assert_eq!(one["topics"][0]["history"], 1);
    assert_eq!(one["next"], serde_json::Value::Null);
    for (query, code) in [
        ("limit=0", "invalid_limit"),
        ("limit=1001", "invalid_limit"),
        ("after=", "invalid_cursor"),
        ("prefix=a%20b", "invalid_prefix"),
    ] {
        http_get(gw.addr, &format!("/v1/topics?{query}"))
            .await
            .assert_error(400, code);
    }
    gw.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn the_stats_topic_is_published_while_watched_and_never_through_a_pattern() {
    let gw = TestGateway::start_default().await;
    // Unwatched: the gateway publishes nothing and creates no topic.
    assert_eq!(get_stats(gw.addr).await["topics"], 0);
    let mut everything = WsClient::connect(gw.addr).await;
    everything.subscribe(&[], &["**"], 1).await;
    let mut watcher = WsClient::connect(gw.addr).await;
    let ack = watcher.subscribe(&["_tidings:stats"], &[], 2).await;
    assert!(ack["versions"]["_tidings:stats"].is_string(), "{ack}");
    let (topic, _, data) = watcher.next_event().await;
    assert_eq!(topic, "_tidings:stats");
    assert_eq!(data["connections"], 2);
    assert_eq!(data["websockets"], 2);
    assert_eq!(data["sse_streams"], 0);
    assert!(data["ts"].as_u64().unwrap() > 0);
    assert_eq!(data["interval_ms"], 1000);
    // The pattern `**` got nothing of it: its next message is this publication.
    publish_ok(gw.addr, "other:topic", b"{\"x\":1}").await;
    let (topic, _, _) = everything.next_event().await;
    assert_eq!(topic, "other:topic");
    // Nobody writes there.
    publish(gw.addr, "_tidings:stats", b"{}")
        .await
        .assert_error(403, "reserved_topic");
    http_request(
        gw.addr,
        "PUT",
        "/v1/topics/_tidings:stats/state",
        &[],
        b"{}",
    )
    .await
    .assert_error(403, "reserved_topic");
    http_request(gw.addr, "POST", "/v1/topics/_tidings:stats/close", &[], b"")
        .await
        .assert_error(403, "reserved_topic");
    gw.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn acks_carry_versions_and_stats_count_sse_streams_and_bytes_out() {
    let gw = TestGateway::start_default().await;
    publish_ok(gw.addr, "v:1", b"{}").await;
    publish_ok(gw.addr, "v:1", b"{}").await;
    let mut ws = WsClient::connect(gw.addr).await;
    let ack = ws.subscribe(&["v:1", "v:2"], &[], 1).await;
    let v1 = ack["versions"]["v:1"].as_str().unwrap();
    assert!(v1.ends_with(":2"), "{ack}");
    assert!(ack["versions"]["v:2"].as_str().unwrap().ends_with(":0"));
    // Resuming from the acknowledged version misses nothing published since.
    publish_ok(gw.addr, "v:1", b"{\"n\":3}").await;
    ws.close().await;
    let mut again = WsClient::connect(gw.addr).await;
    again
        .send_json(&json!({"type":"subscribe","topics":["v:1"],"since":{"v:1":v1},"id":2}))
        .await;
    assert_eq!(again.next_json().await["type"], "subscribed");
    let (_, offset, data) = again.next_event().await;
    assert_eq!((offset, data["n"].as_u64()), (3, Some(3)));

    let before = get_stats(gw.addr).await["bytes_out"].as_u64().unwrap();
    let mut sse = SseClient::open(gw.addr, "/v1/sse?topics=v:1", &[]).await;
    gw.stats_until("one SSE stream", |s| {
        s.sse_streams == 1 && s.connections == 2
    })
    .await;
    publish_ok(gw.addr, "v:1", b"{\"n\":4}").await;
    sse.next_events(1).await;
    gw.stats_until("bytes out counted", |s| s.bytes_out > before)
        .await;
    drop(sse);
    gw.stats_until("the SSE stream gone", |s| s.sse_streams == 0)
        .await;
    let metrics = String::from_utf8(http_get(gw.addr, "/metrics").await.body).unwrap();
    assert!(metrics.contains("tidings_sse_streams 0"), "{metrics}");
    assert!(metrics.contains("tidings_bytes_out_total "));
    gw.shutdown().await.expect("shutdown");
}
