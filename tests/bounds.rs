//! Every resource a peer can grow has a bound, and reaching it is a clear error that
//! changes nothing else: JSON depth, state documents (size, depth, patch steps, the shared
//! budget), the number of topics, history (per topic and shared), poll pages, and the
//! publish queues.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tidings::Config;

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn json_depth_is_bounded_for_publications_state_and_client_messages() {
    let gw = TestGateway::start(Config::default().max_json_depth(16)).await;
    publish(gw.addr, "deep:events", nested(17).as_bytes())
        .await
        .assert_error(422, "json_too_deep");
    assert_eq!(
        publish_ok(gw.addr, "deep:events", nested(16).as_bytes()).await,
        1
    );
    // Far deeper than any parser's recursion limit: refused just as fast, nothing stored.
    let abyss = format!("{}{}", "[".repeat(300_000), "]".repeat(300_000));
    let big = Config::default().max_publish_bytes;
    assert!(abyss.len() < big);
    publish(gw.addr, "deep:events", abyss.as_bytes())
        .await
        .assert_error(422, "json_too_deep");
    put_state_raw(gw.addr, "deep:doc", nested(17).as_bytes(), &[])
        .await
        .assert_error(422, "json_too_deep");
    patch_state(gw.addr, "deep:doc", &json!([{"op": "add", "path": "", "value": serde_json::from_str::<Value>(&nested(17)).unwrap()}]))
        .await
        .assert_error(422, "json_too_deep");

    let mut client = WsClient::connect(gw.addr).await;
    let filter: Value = serde_json::from_str(&nested(20)).unwrap();
    client
        .send_json(
            &json!({"type": "subscribe", "topics": ["deep:events"], "filter": filter, "id": 1}),
        )
        .await;
    client.expect_error("json_too_deep").await;
    // The connection stays, and the events topic kept exactly its one event.
    client.ping(2).await;
    let page = poll(gw.addr, "deep:events", "").await;
    assert_eq!(page["events"].as_array().map(Vec::len), Some(1), "{page}");
    gw.assert_alive().await;
}

/// The deepest document the bounds allow, built one small PATCH at a time (each far under
/// any request limit), works on every path: GET, a subscriber's diffs, a new subscriber's
/// snapshot; one step further is refused and changes nothing.
#[tokio::test]
async fn the_deepest_allowed_document_works_everywhere_and_one_more_level_is_refused() {
    let depth = 64;
    let gw = TestGateway::start(Config::default()).await;
    assert_eq!(gw_config_depth(), depth);
    let topic = "deep:cfg";
    put_state_ok(gw.addr, topic, &json!({})).await;
    let mut follower = WsClient::connect(gw.addr).await;
    follower.subscribe(&[topic], &[], 1).await;
    let mut mirror = first_state(&mut follower, topic).await;
    // {} is depth 1; each step adds {"n": {}} one level further down.
    let mut path = String::new();
    let mut last = None;
    for _ in 1..depth {
        path.push_str("/n");
        last = Some(
            patch_state_ok(
                gw.addr,
                topic,
                &json!([{"op": "add", "path": path, "value": {}}]),
            )
            .await,
        );
    }
    let last = last.expect("patched").version;
    mirror.follow_to(&mut follower, &last).await;
    let (version, doc) = get_state(gw.addr, topic).await;
    assert_eq!(version, last);
    assert_eq!(mirror.doc, doc, "the diffs rebuild the document");

    // One more level, by add and by copy, is refused; nothing changes.
    path.push_str("/n");
    patch_state(
        gw.addr,
        topic,
        &json!([{"op": "add", "path": path, "value": {}}]),
    )
    .await
    .assert_error(422, "json_too_deep");
    patch_state(
        gw.addr,
        topic,
        &json!([{"op": "copy", "from": "", "path": "/m"}]),
    )
    .await
    .assert_error(422, "json_too_deep");
    assert_eq!(get_state(gw.addr, topic).await, (last.clone(), doc.clone()));

    // A new subscriber's snapshot of the deepest document.
    let mut late = WsClient::connect(gw.addr).await;
    late.subscribe(&[topic], &[], 1).await;
    let snapshot = next_of(&mut late, "snapshot", topic).await;
    assert_eq!(snapshot["state"], doc);

    // The deepest event takes the event paths: live delivery, replay, and a poll.
    let deep_event = nested(depth);
    let events = "deep:events";
    let mut watcher = WsClient::connect(gw.addr).await;
    watcher.subscribe(&[events], &[], 1).await;
    publish_ok(gw.addr, events, deep_event.as_bytes()).await;
    let (_, offset, data) = watcher.next_event().await;
    assert_eq!(offset, 1);
    assert_eq!(data, serde_json::from_str::<Value>(&deep_event).unwrap());
    let page = poll(gw.addr, events, "since=0").await;
    assert_eq!(page["events"][0]["data"], data);
    let epoch = epoch_of(gw.addr, events).await;
    let mut resumed = WsClient::connect(gw.addr).await;
    subscribe_since(&mut resumed, events, &version_of(&epoch, 0), 1).await;
    let (_, replayed, _) = resumed.next_event().await;
    assert_eq!(replayed, 1);
    // A state topic is not polled: it says so, deep or not.
    http_get(gw.addr, &format!("/v1/topics/{topic}/events"))
        .await
        .assert_error(409, "wrong_topic_kind");
    follower.ping(2).await;
    gw.assert_alive().await;
}

fn gw_config_depth() -> usize {
    Config::default().max_json_depth
}

#[tokio::test]
async fn state_documents_are_bounded_on_the_result_of_every_write() {
    let config = Config::default().max_state_bytes(1000).max_patch_ops(8);
    let gw = TestGateway::start(config).await;
    let topic = "size:doc";
    let base = put_state_ok(gw.addr, topic, &json!({"x": "0123456789"})).await;
    put_state(gw.addr, topic, &json!({"x": "y".repeat(1200)}))
        .await
        .assert_error(413, "state_too_large");
    // Each copy of the root doubles the document: a handful of tiny operations would build
    // gigabytes without the per-step bound.
    let doubling: Vec<Value> = (0..8)
        .map(|i| json!({"op": "copy", "from": "", "path": format!("/c{i}")}))
        .collect();
    patch_state(gw.addr, topic, &Value::Array(doubling))
        .await
        .assert_error(413, "state_too_large");
    let too_many: Vec<Value> = (0..9)
        .map(|_| json!({"op": "test", "path": "/x", "value": "0123456789"}))
        .collect();
    patch_state(gw.addr, topic, &Value::Array(too_many))
        .await
        .assert_error(413, "too_many_patch_ops");
    let (version, doc) = get_state(gw.addr, topic).await;
    assert_eq!((version, doc), (base.version, json!({"x": "0123456789"})));
}

#[tokio::test]
async fn topics_and_the_state_budget_refuse_cleanly_when_full() {
    let config = Config::default()
        .max_topics(3)
        .state_memory_budget(16 * 1024);
    let gw = TestGateway::start(config).await;
    publish_ok(gw.addr, "full:1", b"1").await;
    put_state_ok(gw.addr, "full:2", &json!({"k": "v"})).await;
    let kept = put_state_ok(gw.addr, "full:3", &json!({"k": "v"})).await;
    let refused = publish(gw.addr, "full:4", b"1").await;
    refused.assert_error(503, "too_many_topics");
    assert!(refused.header("retry-after").is_some(), "{refused:?}");
    let mut client = WsClient::connect(gw.addr).await;
    client
        .send_json(&json!({"type": "subscribe", "topics": ["full:1", "full:5"], "id": 1}))
        .await;
    client.expect_error("too_many_topics").await;
    // Known topics still work, for publishers and subscribers.
    assert_eq!(publish_ok(gw.addr, "full:1", b"2").await, 2);
    client.subscribe(&["full:1"], &[], 2).await;

    // A document that does not fit what the budget has left is refused; the rest stays.
    put_state(gw.addr, "full:3", &json!({"k": "v".repeat(20_000)}))
        .await
        .assert_error(507, "state_budget_exhausted");
    assert_eq!(get_state(gw.addr, "full:3").await.0, kept.version);
    let stats = get_stats(gw.addr).await;
    assert!(
        stats["state_bytes"].as_u64().unwrap_or(0) <= 16 * 1024,
        "{stats}"
    );
}

#[tokio::test]
async fn history_is_bounded_by_bytes_per_topic_and_by_a_shared_budget() {
    let config = Config::default()
        .history_max_bytes(20_000)
        .history_memory_budget(40_000);
    let gw = TestGateway::start(config).await;
    let event = format!("\"{}\"", "x".repeat(5000));
    for _ in 0..10 {
        publish_ok(gw.addr, "hist:a", event.as_bytes()).await;
    }
    // About four 5 KB events fit in 20,000 bytes: the oldest went, and a poll says so.
    let page = poll(gw.addr, "hist:a", "since=0").await;
    let held = page["events"].as_array().map_or(0, Vec::len);
    assert!((2..=4).contains(&held), "{held} events held");
    let first = page["truncated"]["first_available"].as_u64();
    assert_eq!(
        first,
        Some(11 - held as u64),
        "truncated: {}",
        page["truncated"]
    );

    // Other topics fill the shared budget: hist:a's entries, the oldest, go first.
    for topic in ["hist:b", "hist:c", "hist:d"] {
        for _ in 0..3 {
            publish_ok(gw.addr, topic, event.as_bytes()).await;
        }
    }
    let stats = get_stats(gw.addr).await;
    let total = stats["history_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(total <= 40_000, "history_bytes {total}");
    let a = poll(gw.addr, "hist:a", "since=0").await;
    let a_held = a["events"].as_array().map_or(0, Vec::len);
    assert!(a_held < held, "hist:a still holds {a_held} events");
    let d = poll(gw.addr, "hist:d", "since=0").await;
    assert_eq!(
        d["truncated"],
        Value::Null,
        "the newest topic keeps all of it"
    );
    assert_eq!(d["events"].as_array().map(Vec::len), Some(3));

    // Resume from history that the budget evicted: told, never silent.
    let epoch = epoch_of(gw.addr, "hist:a").await;
    let mut client = WsClient::connect(gw.addr).await;
    subscribe_since(&mut client, "hist:a", &version_of(&epoch, 1), 1).await;
    next_of(&mut client, "history_truncated", "hist:a").await;
}

#[tokio::test]
async fn poll_pages_are_bounded_by_bytes_and_say_where_to_continue() {
    let gw = TestGateway::start(Config::default().max_poll_bytes(10_000)).await;
    let topic = "page:big";
    let event = format!("\"{}\"", "p".repeat(3000));
    for _ in 0..10 {
        publish_ok(gw.addr, topic, event.as_bytes()).await;
    }
    let mut since = 0;
    let mut seen = Vec::new();
    loop {
        let page = poll(gw.addr, topic, &format!("since={since}&limit=100")).await;
        let events = page["events"].as_array().cloned().unwrap_or_default();
        assert!(!events.is_empty(), "{page}");
        assert!(
            events.len() <= 3,
            "over 10,000 bytes in one page: {}",
            events.len()
        );
        seen.extend(events.iter().filter_map(|e| e["offset"].as_u64()));
        since = page["next_offset"].as_u64().expect("next_offset");
        if page["more"] == false {
            break;
        }
        assert_eq!(page["more"], true, "{page}");
    }
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    // A single event larger than the page bound still comes, alone.
    let huge = format!("\"{}\"", "h".repeat(20_000));
    publish_ok(gw.addr, topic, huge.as_bytes()).await;
    let page = poll(gw.addr, topic, &format!("since={since}")).await;
    assert_eq!(page["events"].as_array().map(Vec::len), Some(1), "{page}");
}

/// Publishers faster than the queues allow are refused with `503 overloaded` and
/// `Retry-After`; what was accepted is numbered without gaps and delivered, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_gateway_refuses_publications_clearly_and_loses_nothing() {
    let config = Config::default()
        .publish_queue_bytes(1)
        .topic_queue_len(1)
        .publish_wait(Duration::ZERO);
    let gw = TestGateway::start(config).await;
    let topic = "flood:one";
    let mut subscribers = Vec::new();
    for _ in 0..20 {
        let mut client = WsClient::connect(gw.addr).await;
        client.subscribe(&[topic], &[], 1).await;
        subscribers.push(client);
    }
    let body = format!("\"{}\"", "f".repeat(4000));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (addr, body) = (gw.addr, body.clone());
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..25 {
                results.push(publish(addr, topic, body.as_bytes()).await);
            }
            results
        }));
    }
    let mut accepted = Vec::new();
    let mut refused = 0u64;
    for task in tasks {
        for response in task.await.expect("publisher") {
            match response.status {
                202 => accepted.push(response.json()["offset"].as_u64().expect("offset")),
                503 => {
                    response.assert_error(503, "overloaded");
                    let after = response
                        .header("retry-after")
                        .and_then(|v| v.parse::<u64>().ok());
                    assert!(after.is_some_and(|s| s >= 1), "{response:?}");
                    refused += 1;
                }
                _ => panic!("neither accepted nor overloaded: {response:?}"),
            }
        }
    }
    accepted.sort_unstable();
    let n = accepted.len() as u64;
    assert!(n > 0);
    assert_eq!(
        accepted,
        (1..=n).collect::<Vec<_>>(),
        "offsets only for what was accepted"
    );
    for client in &mut subscribers {
        let got: Vec<u64> = client
            .next_events(n as usize)
            .await
            .into_iter()
            .map(|e| e.1)
            .collect();
        assert_eq!(got, (1..=n).collect::<Vec<_>>());
        client.ping(9).await;
    }
    let stats = get_stats(gw.addr).await;
    assert_eq!(stats["publications_refused"], refused, "{stats}");
    assert_eq!(stats["publications"], n, "{stats}");
}
