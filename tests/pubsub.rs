//! Subscriptions, patterns and publishing, end to end over real sockets.
//!
//! "Nothing arrived" is never proven by waiting: a test publishes something the client
//! *should* receive after the thing it should not, and checks which arrives.

mod common;

use common::*;
use serde_json::{Value, json};
use tidings::Config;

#[tokio::test]
async fn subscribe_and_unsubscribe_are_acknowledged_with_their_id() {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    let ack = client.subscribe(&["a:b"], &["a:*"], 7).await;
    assert_eq!(ack["topics"], json!(["a:b"]), "{ack}");
    assert_eq!(ack["patterns"], json!(["a:*"]), "{ack}");

    let ack = client.unsubscribe(&["a:b"], &["a:*"], 8).await;
    assert_eq!(ack["topics"], json!(["a:b"]), "{ack}");
    assert_eq!(ack["patterns"], json!(["a:*"]), "{ack}");
}

#[tokio::test]
async fn acks_omit_the_id_when_none_was_given() {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    client
        .send_json(&json!({"type": "subscribe", "topics": ["x:y"]}))
        .await;
    let ack = client.next_json().await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    assert!(
        ack.get("id").is_none(),
        "no id was sent, so none is echoed: {ack}"
    );

    client
        .send_json(&json!({"type": "unsubscribe", "topics": ["x:y"]}))
        .await;
    let ack = client.next_json().await;
    assert_eq!(ack["type"], "unsubscribed", "{ack}");
    assert!(ack.get("id").is_none(), "{ack}");

    client.send_json(&json!({"type": "ping"})).await;
    let pong = client.next_json().await;
    assert_eq!(pong["type"], "pong", "{pong}");
    assert!(pong.get("id").is_none(), "{pong}");
}

#[tokio::test]
async fn publish_delivers_offsets_1_2_3_with_the_exact_payload() {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&["runs:abc-123"], &[], 1).await;
    let bodies = [
        json!({"event": "node_started", "node": 1}),
        json!([1, 2, 3]),
        json!("just a string"),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let offset = publish_ok(gw.addr, "runs:abc-123", body.to_string().as_bytes()).await;
        assert_eq!(
            offset,
            i as u64 + 1,
            "HTTP offsets start at 1 and go up by one"
        );
    }
    for (i, body) in bodies.iter().enumerate() {
        let (topic, offset, data) = client.next_event().await;
        assert_eq!(topic, "runs:abc-123");
        assert_eq!(offset, i as u64 + 1);
        assert_eq!(&data, body);
    }
}

/// A payload whose text a re-serialisation would change: odd spacing, a raw non-ASCII
/// character, escapes (including a needless `\/` and a `\u` escape), and numbers that
/// round-trip through f64 differently from how they are written.
const ODD_PAYLOAD: &str = "{ \"b\" :[1,  2.50,1e3 ,\"ü\\u00e9\\n\\\"x\\\"\\/\" ] ,\n\t\"a\":null,\"big\":12345678901234567890123}";

#[tokio::test]
async fn event_data_is_the_published_body_byte_for_byte() {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&["exact:t"], &[], 1).await;
    let offset = publish_ok(gw.addr, "exact:t", ODD_PAYLOAD.as_bytes()).await;
    assert_eq!(offset, 1);

    let text = client.next_text().await;
    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow)]
        data: &'a serde_json::value::RawValue,
    }
    let envelope: Envelope =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("event is not JSON ({e}): {text}"));
    assert_eq!(
        envelope.data.get(),
        ODD_PAYLOAD,
        "data must be the body as published"
    );

    // And parsed, it is the same value.
    let parsed: Value = serde_json::from_str(&text).expect("event JSON");
    let expected: Value = serde_json::from_str(ODD_PAYLOAD).expect("payload JSON");
    assert_eq!(parsed["data"], expected);
}

#[tokio::test]
async fn event_frame_layout_is_exactly_type_topic_offset_version_data_ts() {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&["exact:t"], &[], 1).await;
    publish_ok(gw.addr, "exact:t", ODD_PAYLOAD.as_bytes()).await;
    let text = client.next_text().await;
    let head = r#"{"type":"event","topic":"exact:t","offset":1,"version":""#;
    assert!(
        text.starts_with(head),
        "event layout\n  got: {text}\n want: {head}..."
    );
    // The version is the topic's epoch (16 hex digits) and the offset.
    let version = &text[head.len()..head.len() + 18];
    assert!(
        version.len() == 18
            && version[..16].bytes().all(|b| b.is_ascii_hexdigit())
            && &version[16..] == ":1",
        "version {version:?} in {text}"
    );
    let prefix = format!(r#"{head}{version}","data":{ODD_PAYLOAD},"ts":"#);
    assert!(
        text.starts_with(&prefix),
        "event layout\n  got: {text}\n want: {prefix}<ts>}}"
    );
    let ts = &text[prefix.len()..text.len() - 1];
    assert!(text.ends_with('}'), "{text}");
    assert!(
        !ts.is_empty() && ts.bytes().all(|b| b.is_ascii_digit()),
        "ts is not an integer: {ts:?}"
    );
}

#[tokio::test]
async fn library_publish_delivers_too() {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&["lib:t"], &["lib:**"], 1).await;
    let published = gw
        .gw
        .publish("lib:t", ODD_PAYLOAD.as_bytes())
        .expect("library publish");
    assert_eq!(published.topic, "lib:t");
    assert_eq!(published.offset, 1);
    let published = gw
        .gw
        .publish("lib:t", b"{\"n\":2}")
        .expect("library publish");
    assert_eq!(published.offset, 2);
    // The same topic's offsets are shared by HTTP and library publishers.
    assert_eq!(publish_ok(gw.addr, "lib:t", b"3").await, 3);

    let text = client.next_text().await;
    let parsed: Value = serde_json::from_str(&text).expect("event JSON");
    assert_eq!(parsed["offset"], 1);
    assert_eq!(
        parsed["data"],
        serde_json::from_str::<Value>(ODD_PAYLOAD).unwrap()
    );
    assert!(
        text.contains(ODD_PAYLOAD),
        "library-published data kept verbatim: {text}"
    );
    assert_eq!(
        client.next_event().await,
        ("lib:t".into(), 2, json!({"n": 2}))
    );
    assert_eq!(client.next_event().await, ("lib:t".into(), 3, json!(3)));

    // The library refuses what HTTP refuses.
    assert!(
        gw.gw.publish("bad topic", b"1").is_err(),
        "invalid topic accepted"
    );
    assert!(
        gw.gw.publish("lib:t", b"{not json").is_err(),
        "invalid JSON accepted"
    );
    assert!(
        gw.gw.publish("lib:*", b"1").is_err(),
        "a pattern is not a topic"
    );
}

#[tokio::test]
async fn topics_are_isolated() {
    let gw = TestGateway::start_default().await;
    let mut a = WsClient::connect(gw.addr).await;
    let mut b = WsClient::connect(gw.addr).await;
    a.subscribe(&["iso:a"], &[], 1).await;
    b.subscribe(&["iso:b"], &[], 1).await;

    publish_ok(gw.addr, "iso:a", b"\"a1\"").await;
    publish_ok(gw.addr, "iso:b", b"\"b1\"").await;
    publish_ok(gw.addr, "iso:a", b"\"a2\"").await;
    publish_ok(gw.addr, "iso:b", b"\"b2\"").await;
    // Offsets are per topic.
    assert_eq!(publish_ok(gw.addr, "iso:c", b"\"c1\"").await, 1);
    publish_ok(gw.addr, "iso:a", b"\"a3\"").await;
    publish_ok(gw.addr, "iso:b", b"\"b3\"").await;

    for (client, topic, prefix) in [(&mut a, "iso:a", "a"), (&mut b, "iso:b", "b")] {
        for n in 1..=3u64 {
            let (got_topic, offset, data) = client.next_event().await;
            assert_eq!((got_topic.as_str(), offset), (topic, n));
            assert_eq!(data, json!(format!("{prefix}{n}")));
        }
        // Nothing else is pending: the pong comes next.
        client.ping(99).await;
    }
}

/// Subscribes one client to `patterns` plus a sentinel topic, publishes each of
/// `topics` in order, then the sentinel, and returns the topics delivered before the
/// sentinel.
async fn delivered_through(patterns: &[&str], topics: &[&str]) -> Vec<String> {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&["sentinel:end"], patterns, 1).await;
    for topic in topics {
        publish_ok(gw.addr, topic, b"{}").await;
    }
    publish_ok(gw.addr, "sentinel:end", b"{}").await;
    let mut seen = Vec::new();
    loop {
        let (topic, _, _) = client.next_event().await;
        if topic == "sentinel:end" {
            return seen;
        }
        seen.push(topic);
    }
}

#[tokio::test]
async fn star_matches_exactly_one_segment() {
    let seen = delivered_through(
        &["pat:*"],
        &["pat:x", "pat", "pat:x:y", "other:x", "pat:y", "patx:y"],
    )
    .await;
    assert_eq!(seen, ["pat:x", "pat:y"]);

    let seen = delivered_through(
        &["*:prod"],
        &["a:prod", "prod", "a:b:prod", "a:dev", "b:prod"],
    )
    .await;
    assert_eq!(seen, ["a:prod", "b:prod"]);

    let seen =
        delivered_through(&["a:*:c"], &["a:b:c", "a:c", "a:b:b:c", "a:x:c", "a:b:c:d"]).await;
    assert_eq!(seen, ["a:b:c", "a:x:c"]);
}

#[tokio::test]
async fn trailing_double_star_matches_one_or_more_segments() {
    let seen = delivered_through(
        &["shared:**"],
        &[
            "shared:a",
            "shared",
            "shared:a:b:c",
            "sharedx:a",
            "other:shared:a",
            "shared:z",
        ],
    )
    .await;
    assert_eq!(seen, ["shared:a", "shared:a:b:c", "shared:z"]);

    let seen = delivered_through(&["*:x:**"], &["a:x", "a:x:b", "a:y:b", "a:x:b:c"]).await;
    assert_eq!(seen, ["a:x:b", "a:x:b:c"]);
}

#[tokio::test]
async fn direct_and_pattern_subscriptions_deliver_once() {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    client
        .subscribe(&["dup:a"], &["dup:*", "dup:**", "*:a", "**"], 1)
        .await;
    publish_ok(gw.addr, "dup:a", b"1").await;
    publish_ok(gw.addr, "dup:a", b"2").await;
    publish_ok(gw.addr, "dup:b", b"3").await;
    // Every publication matches several subscriptions; each arrives exactly once.
    let mut events = client.next_events(3).await;
    // Each topic in offset order; topics are not ordered with each other (PROTOCOL.md).
    let a: Vec<u64> = events
        .iter()
        .filter(|(t, _)| t == "dup:a")
        .map(|e| e.1)
        .collect();
    assert_eq!(a, [1, 2], "{events:?}");
    events.sort();
    assert_eq!(
        events,
        [
            ("dup:a".into(), 1),
            ("dup:a".into(), 2),
            ("dup:b".into(), 1)
        ]
    );
    client.ping(2).await;
}

#[tokio::test]
async fn two_connections_on_the_same_topic_each_get_every_event() {
    let gw = TestGateway::start_default().await;
    let mut direct = WsClient::connect(gw.addr).await;
    let mut pattern = WsClient::connect(gw.addr).await;
    direct.subscribe(&["both:t"], &[], 1).await;
    pattern.subscribe(&[], &["both:*"], 1).await;
    for n in 1..=3 {
        publish_ok(gw.addr, "both:t", format!("{n}").as_bytes()).await;
    }
    for client in [&mut direct, &mut pattern] {
        let events = client.next_events(3).await;
        assert_eq!(
            events,
            [
                ("both:t".into(), 1),
                ("both:t".into(), 2),
                ("both:t".into(), 3)
            ]
        );
    }
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&["u:a", "u:b"], &["up:*"], 1).await;
    publish_ok(gw.addr, "u:a", b"1").await;
    publish_ok(gw.addr, "up:x", b"1").await;
    assert_eq!(
        client.next_events(2).await,
        [("u:a".into(), 1), ("up:x".into(), 1)]
    );

    client.unsubscribe(&["u:a"], &["up:*"], 2).await;
    publish_ok(gw.addr, "u:a", b"2").await;
    publish_ok(gw.addr, "up:x", b"2").await;
    publish_ok(gw.addr, "u:b", b"1").await;
    // The first thing to arrive is the later publication on the topic still subscribed.
    assert_eq!(client.next_event().await.0, "u:b");
    client.ping(3).await;

    // Re-subscribing resumes delivery at the topic's next offset.
    client.subscribe(&["u:a"], &[], 4).await;
    publish_ok(gw.addr, "u:a", b"3").await;
    assert_eq!(client.next_event().await, ("u:a".into(), 3, json!(3)));
}

#[tokio::test]
async fn closing_a_subscriber_does_not_disturb_others() {
    let gw = TestGateway::start_default().await;
    let mut leaver = WsClient::connect(gw.addr).await;
    let mut stayer = WsClient::connect(gw.addr).await;
    leaver.subscribe(&["leave:t"], &["leave:*"], 1).await;
    stayer.subscribe(&["leave:t"], &[], 1).await;
    leaver.close().await;
    for n in 1..=3u64 {
        assert_eq!(publish_ok(gw.addr, "leave:t", b"{}").await, n);
    }
    assert_eq!(
        stayer.next_events(3).await,
        [
            ("leave:t".into(), 1),
            ("leave:t".into(), 2),
            ("leave:t".into(), 3)
        ]
    );
}

#[tokio::test]
async fn bad_messages_get_errors_and_the_connection_stays_up() {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;

    for text in [
        "not json",
        "{\"type\":",
        "",
        "{\"type\":\"subscribe\"} trailing",
    ] {
        client.send_text(text).await;
        client.expect_error("invalid_json").await;
        client.ping(1).await;
    }

    client
        .send_json(&json!({"type": "frobnicate", "id": 3}))
        .await;
    client.expect_error("unknown_type").await;
    client.ping(2).await;

    // The connection still subscribes and receives after all that.
    client.subscribe(&["ok:t"], &[], 4).await;
    publish_ok(gw.addr, "ok:t", b"true").await;
    assert_eq!(client.next_event().await, ("ok:t".into(), 1, json!(true)));
}

#[tokio::test]
async fn invalid_topics_are_rejected_with_invalid_topic() {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    let long_segment = "s".repeat(65);
    let seventeen = vec!["a"; 17].join(":");
    let too_long = vec!["x".repeat(60); 5].join(":"); // 304 bytes, segments fine
    let bad = [
        "",
        "a::b",
        ":a",
        "a:",
        "bad topic",
        "a/b",
        "ünï:code",
        "a:*",
        "a:**",
        long_segment.as_str(),
        seventeen.as_str(),
        too_long.as_str(),
    ];
    for (i, topic) in bad.iter().enumerate() {
        let id = 100 + i as u64;
        client
            .send_json(&json!({"type": "subscribe", "topics": [topic], "id": id}))
            .await;
        let error = client.expect_error("invalid_topic").await;
        assert_eq!(
            error["id"], id,
            "the error answers request {id} ({topic:?}): {error}"
        );
        client.ping(id).await;
    }
}

#[tokio::test]
async fn topic_limits_are_inclusive() {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    let segment_64 = format!("a:{}", "s".repeat(64));
    let sixteen = vec!["a"; 16].join(":");
    // Segments of 64, 64, 64 and 61 bytes plus 3 separators: exactly 256 bytes.
    let exactly_256 = format!("{0}:{0}:{0}:{1}", "x".repeat(64), "y".repeat(61));
    assert_eq!(exactly_256.len(), 256);
    let topics = [
        "a",
        "A-z_0.9",
        segment_64.as_str(),
        sixteen.as_str(),
        exactly_256.as_str(),
    ];
    client.subscribe(&topics, &[], 1).await;
    for topic in topics {
        publish_ok(gw.addr, topic, b"{}").await;
        assert_eq!(client.next_event().await.0, topic);
    }
}

#[tokio::test]
async fn invalid_patterns_are_rejected_with_invalid_pattern() {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    let bad = [
        "",
        "a:**:b",
        "**:a",
        "a:b*",
        "a:*b",
        "***",
        "a::*",
        "a:*:",
        "bad pattern:*",
    ];
    for (i, pattern) in bad.iter().enumerate() {
        let id = 200 + i as u64;
        client
            .send_json(&json!({"type": "subscribe", "patterns": [pattern], "id": id}))
            .await;
        let error = client.expect_error("invalid_pattern").await;
        assert_eq!(
            error["id"], id,
            "the error answers request {id} ({pattern:?}): {error}"
        );
        client.ping(id).await;
    }
    // And the edge cases that are valid.
    client
        .subscribe(&[], &["*", "**", "a:**", "*:*:**"], 1)
        .await;
}

#[tokio::test]
async fn too_many_subscriptions_is_an_error_and_the_connection_stays_up() {
    let gw = TestGateway::start(Config::default().max_subscriptions(4)).await;
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&["m:1", "m:2", "m:3"], &["p:*"], 1).await;

    client
        .send_json(&json!({"type": "subscribe", "topics": ["m:5"], "id": 2}))
        .await;
    let error = client.expect_error("too_many_subscriptions").await;
    assert_eq!(error["id"], 2, "{error}");
    client.ping(3).await;

    client
        .send_json(&json!({"type": "subscribe", "patterns": ["q:*"], "id": 4}))
        .await;
    client.expect_error("too_many_subscriptions").await;
    client.ping(5).await;

    // The refused subscriptions did not take effect; the first four did.
    publish_ok(gw.addr, "m:5", b"0").await;
    publish_ok(gw.addr, "q:x", b"0").await;
    publish_ok(gw.addr, "p:x", b"0").await;
    assert_eq!(client.next_event().await.0, "p:x");

    // Freeing a slot makes room again.
    client.unsubscribe(&["m:1"], &[], 6).await;
    client.subscribe(&["m:5"], &[], 7).await;
    publish_ok(gw.addr, "m:5", b"1").await;
    assert_eq!(client.next_event().await, ("m:5".into(), 2, json!(1)));
}

#[tokio::test]
async fn http_publish_rejects_invalid_json() {
    let gw = TestGateway::start_default().await;
    for body in [
        &b"{not json"[..],
        b"",
        b"{\"a\":1} {\"b\":2}",
        b"\xff\xfe",
        b"[1,2",
    ] {
        publish(gw.addr, "pub:t", body)
            .await
            .assert_error(400, "invalid_json");
    }
    // Nothing was published: the next good publication gets offset 1.
    assert_eq!(publish_ok(gw.addr, "pub:t", b"{}").await, 1);
}

#[tokio::test]
async fn http_publish_rejects_invalid_topics() {
    let gw = TestGateway::start_default().await;
    let long_segment = "s".repeat(65);
    let seventeen = vec!["a"; 17].join(":");
    for topic in [
        "a::b",
        "bad%20topic",
        "a:*",
        "a:**",
        ":a",
        long_segment.as_str(),
        seventeen.as_str(),
    ] {
        publish(gw.addr, topic, b"{}")
            .await
            .assert_error(400, "invalid_topic");
    }
}

#[tokio::test]
async fn http_publish_over_the_limit_is_413() {
    let gw = TestGateway::start(Config::default().max_publish_bytes(1024)).await;
    let at_limit = format!("\"{}\"", "x".repeat(1022));
    assert_eq!(at_limit.len(), 1024);
    assert_eq!(publish_ok(gw.addr, "big:t", at_limit.as_bytes()).await, 1);
    let over = format!("\"{}\"", "x".repeat(1023));
    publish(gw.addr, "big:t", over.as_bytes())
        .await
        .assert_error(413, "payload_too_large");
    let way_over = format!("\"{}\"", "x".repeat(4000));
    publish(gw.addr, "big:t", way_over.as_bytes())
        .await
        .assert_error(413, "payload_too_large");
    assert_eq!(publish_ok(gw.addr, "big:t", b"1").await, 2);
}

#[tokio::test]
async fn stats_count_connections_publications_and_deliveries() {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&["st:a"], &["st:*"], 1).await;
    publish_ok(gw.addr, "st:a", b"1").await;
    publish_ok(gw.addr, "st:a", b"2").await;
    publish_ok(gw.addr, "st:b", b"3").await;
    client.next_events(3).await;
    // Everything sent before the pong has been written.
    client.ping(2).await;
    gw.stats_until("3 deliveries counted", |s| s.deliveries >= 3)
        .await;

    let stats = get_stats(gw.addr).await;
    assert_eq!(stats["connections"], 1, "{stats}");
    assert_eq!(stats["connections_opened"], 1, "{stats}");
    assert_eq!(stats["publications"], 3, "{stats}");
    assert_eq!(stats["deliveries"], 3, "{stats}");
    assert_eq!(stats["topics"], 2, "{stats}");
    for field in [
        "normal",
        "protocol_error",
        "slow_consumer",
        "timeout",
        "shutdown",
        "io_error",
    ] {
        assert_eq!(stats["connections_closed"][field], 0, "{field}: {stats}");
    }

    // The library's stats are the same document.
    let lib = serde_json::to_value(gw.gw.stats()).expect("Stats serializes");
    assert_eq!(lib, stats);
    assert_eq!(gw.gw.stats().publications, 3);
}

#[tokio::test]
async fn unsubscribing_the_topic_keeps_a_matching_pattern() {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&["keep:a"], &["keep:*"], 1).await;
    // Subscribing to the same topic again changes nothing.
    client.subscribe(&["keep:a"], &[], 2).await;
    publish_ok(gw.addr, "keep:a", b"1").await;
    assert_eq!(client.next_event().await.1, 1);
    client.ping(3).await;

    client.unsubscribe(&["keep:a"], &[], 4).await;
    publish_ok(gw.addr, "keep:a", b"2").await;
    assert_eq!(client.next_event().await, ("keep:a".into(), 2, json!(2)));
    client.ping(5).await;

    client.unsubscribe(&[], &["keep:*"], 6).await;
    publish_ok(gw.addr, "keep:a", b"3").await;
    client.subscribe(&["keep:b"], &[], 7).await;
    publish_ok(gw.addr, "keep:b", b"1").await;
    assert_eq!(client.next_event().await.0, "keep:b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_get_distinct_offsets_delivered_in_order() {
    const PUBLISHERS: u64 = 50;
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&["conc:t"], &[], 1).await;
    let addr = gw.addr;
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|n| {
            tokio::spawn(async move { publish_ok(addr, "conc:t", format!("{n}").as_bytes()).await })
        })
        .collect();
    let mut offsets = Vec::new();
    for publisher in publishers {
        offsets.push(within("a publisher", publisher).await.expect("publisher"));
    }
    offsets.sort_unstable();
    assert_eq!(
        offsets,
        (1..=PUBLISHERS).collect::<Vec<_>>(),
        "each offset once"
    );
    // The subscriber sees the topic's history in offset order, none missing.
    let received: Vec<u64> = client
        .next_events(PUBLISHERS as usize)
        .await
        .into_iter()
        .map(|(_, offset)| offset)
        .collect();
    assert_eq!(received, (1..=PUBLISHERS).collect::<Vec<_>>());
    client.ping(2).await;
}

#[tokio::test]
async fn http_publish_accepts_chunked_bodies_and_keep_alive() {
    let gw = TestGateway::start(Config::default().max_publish_bytes(1024)).await;
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&["chunk:t"], &[], 1).await;
    let host = gw.addr;
    // Two requests on one keep-alive connection, the first with a chunked body split
    // in the middle of a JSON string.
    let request = format!(
        "POST /v1/topics/chunk:t/events HTTP/1.1\r\nHost: {host}\r\n\
         Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n\
         6\r\n{{\"a\":\"\r\n4\r\nbc\"}}\r\n0\r\n\r\n\
         POST /v1/topics/chunk:t/events HTTP/1.1\r\nHost: {host}\r\n\
         Content-Length: 4\r\nConnection: close\r\n\r\ntrue"
    );
    let mut stream = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    for offset in 1..=2 {
        let response = read_response(&mut stream, &mut buf).await;
        assert_eq!(response.status, 202, "{response:?}");
        assert_eq!(
            response.json(),
            json!({"topic": "chunk:t", "offset": offset})
        );
    }
    assert_eq!(
        client.next_event().await,
        ("chunk:t".into(), 1, json!({"a": "bc"}))
    );
    assert_eq!(
        client.next_event().await,
        ("chunk:t".into(), 2, json!(true))
    );

    // A chunked body over the limit is refused like any other.
    let big = format!("\"{}\"", "x".repeat(2000));
    let request = format!(
        "POST /v1/topics/chunk:t/events HTTP/1.1\r\nHost: {host}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    raw_http(gw.addr, request.as_bytes())
        .await
        .assert_error(413, "payload_too_large");
}
