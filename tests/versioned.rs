//! Versioned event topics end to end: exact resume with `since`, `history_truncated`,
//! polling that agrees with the WebSocket, closing, and filters.
//!
//! "Nothing arrived" is never proven by waiting: a test makes something happen that the
//! client *should* see after the thing it should not, and checks which arrives first (or
//! ends with a `ping`, whose `pong` comes after everything sent before it).

mod common;

use common::*;
use serde_json::{Value, json};
use tidings::Config;

// 1. Exact resume.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_since_replays_exactly_the_50_missed_then_live_ones() {
    let gw = TestGateway::start_default().await;
    let topic = "resume:jobs";
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&[topic], &[], 1).await;
    publish_numbered(&gw, topic, 1..=5).await;
    expect_numbered_events(&mut client, topic, 1..=5).await;
    let epoch = epoch_of(gw.addr, topic).await;
    let last = version_of(&epoch, 5);
    client.close().await;

    // Missed while away.
    publish_numbered(&gw, topic, 6..=55).await;

    // Publications keep coming while the client resubscribes: the seam between replay and
    // live delivery must have no gap and no duplicate.
    let addr = gw.addr;
    let live = tokio::spawn(async move {
        for n in 56..=105u64 {
            let body = json!({"n": n}).to_string();
            assert_eq!(publish_ok(addr, topic, body.as_bytes()).await, n);
        }
    });
    let mut again = WsClient::connect(gw.addr).await;
    subscribe_since(&mut again, topic, &last, 2).await;
    expect_numbered_events(&mut again, topic, 6..=105).await;
    within("the live publisher", live).await.expect("publisher");
    publish_numbered(&gw, topic, 106..=106).await;
    expect_numbered_events(&mut again, topic, 106..=106).await;
    again.ping(3).await;
}

#[tokio::test]
async fn since_at_the_current_version_replays_nothing_and_continues_live() {
    let gw = TestGateway::start_default().await;
    let topic = "resume:idle";
    publish_numbered(&gw, topic, 1..=3).await;
    let epoch = epoch_of(gw.addr, topic).await;
    let mut client = WsClient::connect(gw.addr).await;
    subscribe_since(&mut client, topic, &version_of(&epoch, 3), 1).await;
    publish_numbered(&gw, topic, 4..=4).await;
    expect_numbered_events(&mut client, topic, 4..=4).await;
    client.ping(2).await;
}

#[tokio::test]
async fn an_old_since_on_short_history_gets_history_truncated_then_what_history_has() {
    let gw = TestGateway::start(Config::default().history_max_len(5)).await;
    let topic = "trunc:jobs";
    publish_numbered(&gw, topic, 1..=21).await;
    let epoch = epoch_of(gw.addr, topic).await;
    let v = |offset| version_of(&epoch, offset);

    // History holds 17..=21: a client at 1 lost 2..=16.
    let mut client = WsClient::connect(gw.addr).await;
    subscribe_since(&mut client, topic, &v(1), 1).await;
    expect_truncated(&mut client, topic, &v(1), &v(17), &v(21)).await;
    expect_numbered_events(&mut client, topic, 17..=21).await;
    publish_numbered(&gw, topic, 22..=22).await;
    expect_numbered_events(&mut client, topic, 22..=22).await;
    client.ping(2).await;

    // The boundary: history now holds 18..=22, so a client at 17 lost nothing (exact)
    // and one at 16 lost 17.
    let mut exact = WsClient::connect(gw.addr).await;
    subscribe_since(&mut exact, topic, &v(17), 1).await;
    expect_numbered_events(&mut exact, topic, 18..=22).await;
    exact.ping(2).await;
    let mut lost_one = WsClient::connect(gw.addr).await;
    subscribe_since(&mut lost_one, topic, &v(16), 1).await;
    expect_truncated(&mut lost_one, topic, &v(16), &v(18), &v(22)).await;
    expect_numbered_events(&mut lost_one, topic, 18..=22).await;
    lost_one.ping(2).await;

    // A version from another epoch (a restart) says nothing about this history.
    let foreign = version_of(FOREIGN_EPOCH, 20);
    let mut stranger = WsClient::connect(gw.addr).await;
    subscribe_since(&mut stranger, topic, &foreign, 1).await;
    expect_truncated(&mut stranger, topic, &foreign, &v(18), &v(22)).await;
    expect_numbered_events(&mut stranger, topic, 18..=22).await;
    publish_numbered(&gw, topic, 23..=23).await;
    expect_numbered_events(&mut stranger, topic, 23..=23).await;
    stranger.ping(2).await;
}

/// A `since` ahead of the topic (same epoch, offset never published) did not come from this
/// topic: resuming from it would make the client drop the next publications as already
/// seen. It is refused with `version_ahead`, on subscribe, on resync and on a poll, and the
/// connection keeps working.
#[tokio::test]
async fn a_since_ahead_of_the_topic_is_refused_everywhere() {
    let gw = TestGateway::start(Config::default().history_max_len(5)).await;
    let topic = "trunc:ahead";
    publish_numbered(&gw, topic, 1..=21).await;
    let epoch = epoch_of(gw.addr, topic).await;
    let ahead = version_of(&epoch, 99);
    let mut client = WsClient::connect(gw.addr).await;
    client
        .send_json(
            &json!({"type": "subscribe", "topics": [topic], "since": {topic: ahead}, "id": 1}),
        )
        .await;
    let error = client.expect_error("version_ahead").await;
    assert_eq!(error["id"], 1, "{error}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&version_of(&epoch, 21)),
        "names the current version: {error}"
    );
    // Nothing was subscribed: the next publication does not arrive, a pong does.
    publish_numbered(&gw, topic, 22..=22).await;
    client.ping(2).await;
    // Subscribed from the current version, a resync ahead is refused the same way.
    subscribe_since(&mut client, topic, &version_of(&epoch, 22), 3).await;
    client
        .send_json(&json!({"type": "resync", "topic": topic, "last_version": ahead, "id": 4}))
        .await;
    client.expect_error("version_ahead").await;
    publish_numbered(&gw, topic, 23..=23).await;
    expect_numbered_events(&mut client, topic, 23..=23).await;
    // The poll says so too, for a version and for a bare offset.
    for since in [ahead.clone(), "99".to_string()] {
        let response = http_get(gw.addr, &format!("/v1/topics/{topic}/events?since={since}")).await;
        response.assert_error(409, "version_ahead");
    }
}

// 5. Polling and WebSocket agree.

#[tokio::test]
async fn polling_and_websocket_agree_on_events_offsets_and_data() {
    let gw = TestGateway::start_default().await;
    let topic = "agree:jobs";
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&[topic], &[], 1).await;
    let mut published = Vec::new();
    for i in 0..25u64 {
        let data = match i % 5 {
            0 => json!({"i": i, "status": "running"}),
            1 => json!([i, "two", {"three": 3.5}]),
            2 => json!(format!("text é \u{1F600} \"quoted\" {i}")),
            3 => json!(i * 1_000_003),
            _ => json!({"nested": {"deep": [null, true, false]}, "i": i}),
        };
        let offset = publish_ok(gw.addr, topic, data.to_string().as_bytes()).await;
        published.push((offset, data));
    }
    let mut over_ws = Vec::new();
    for _ in 0..published.len() {
        let (_, offset, data) = client.next_event().await;
        over_ws.push((offset, data));
    }
    assert_eq!(
        over_ws, published,
        "WebSocket events differ from what was published"
    );

    // Page through with limit=10, following next_offset.
    let epoch = epoch_of(gw.addr, topic).await;
    let mut polled = Vec::new();
    let mut since = 0;
    let mut pages = Vec::new();
    loop {
        let body = poll(gw.addr, topic, &format!("since={since}&limit=10")).await;
        assert_eq!(body["epoch"], epoch.as_str(), "{body}");
        assert_eq!(body["status"], "open", "{body}");
        assert_eq!(body["truncated"], Value::Null, "{body}");
        let events = body["events"].as_array().expect("events").clone();
        pages.push(events.len());
        for event in &events {
            let offset = event["offset"]
                .as_u64()
                .unwrap_or_else(|| panic!("{event}"));
            polled.push((offset, event["data"].clone()));
        }
        let next = body["next_offset"].as_u64().expect("next_offset");
        if events.is_empty() {
            assert_eq!(next, since, "an empty page moves next_offset: {body}");
            break;
        }
        assert_eq!(
            next,
            polled.last().map(|e| e.0).unwrap_or_default(),
            "{body}"
        );
        since = next;
    }
    assert_eq!(pages, vec![10, 10, 5, 0]);
    assert_eq!(polled, over_ws, "polling and WebSocket disagree");

    // `since` as a full version of this epoch is the same as the bare offset.
    let by_version = poll(
        gw.addr,
        topic,
        &format!("since={}&limit=10", version_of(&epoch, 10)),
    )
    .await;
    let by_offset = poll(gw.addr, topic, "since=10&limit=10").await;
    assert_eq!(by_version["events"], by_offset["events"]);
    assert_eq!(by_version["next_offset"], 20);

    // Closing tells pollers to stop, and WebSocket clients the same version.
    close_topic(gw.addr, topic).await;
    let closed = next_of(&mut client, "closed", topic).await;
    assert_eq!(closed["version"], version_of(&epoch, 25), "{closed}");
    let body = poll(gw.addr, topic, "since=25").await;
    assert_eq!(body["status"], "closed", "{body}");
    assert_eq!(body["events"], json!([]), "{body}");
    assert_eq!(body["next_offset"], 25, "{body}");
    // A poller that was behind still gets the rest, with the status.
    let body = poll(gw.addr, topic, "since=20").await;
    assert_eq!(body["status"], "closed", "{body}");
    assert_eq!(body["events"].as_array().map(Vec::len), Some(5), "{body}");
}

// 6. Closing.

#[tokio::test]
async fn closing_a_topic_tells_subscribers_and_refuses_later_publishes() {
    let gw = TestGateway::start_default().await;
    let topic = "wf:run-1";
    let mut a = WsClient::connect(gw.addr).await;
    let mut b = WsClient::connect(gw.addr).await;
    a.subscribe(&[topic], &[], 1).await;
    b.subscribe(&[topic], &[], 1).await;
    publish_numbered(&gw, topic, 1..=3).await;
    let epoch = epoch_of(gw.addr, topic).await;

    let response = close_topic(gw.addr, topic).await;
    assert_eq!(response.status, 200, "{response:?}");
    let body = response.json();
    assert_eq!(body["status"], "closed", "{body}");
    assert_eq!(body["version"], version_of(&epoch, 3), "{body}");
    for client in [&mut a, &mut b] {
        expect_numbered_events(client, topic, 1..=3).await;
        let closed = next_of(client, "closed", topic).await;
        assert_eq!(closed["version"], version_of(&epoch, 3), "{closed}");
    }

    publish(gw.addr, topic, b"{\"n\":4}")
        .await
        .assert_error(409, "topic_closed");
    // Closing again is harmless and tells nobody twice.
    assert_eq!(close_topic(gw.addr, topic).await.status, 200);
    a.ping(2).await;
    b.ping(2).await;

    // A late subscriber learns at once that the topic is over.
    let mut late = WsClient::connect(gw.addr).await;
    late.subscribe(&[topic], &[], 1).await;
    let closed = next_of(&mut late, "closed", topic).await;
    assert_eq!(closed["version"], version_of(&epoch, 3), "{closed}");
    late.ping(2).await;

    // A state topic closes the same way.
    let state_topic = "cfg:final";
    let v1 = put_state_ok(gw.addr, state_topic, &json!({"done": false})).await;
    a.subscribe(&[state_topic], &[], 3).await;
    next_of(&mut a, "snapshot", state_topic).await;
    assert_eq!(close_topic(gw.addr, state_topic).await.status, 200);
    let closed = next_of(&mut a, "closed", state_topic).await;
    assert_eq!(closed["version"], v1.version.as_str(), "{closed}");
    put_state(gw.addr, state_topic, &json!({"done": true}))
        .await
        .assert_error(409, "topic_closed");
    patch_state(
        gw.addr,
        state_topic,
        &json!([{"op": "add", "path": "/x", "value": 1}]),
    )
    .await
    .assert_error(409, "topic_closed");
    assert_eq!(
        get_state(gw.addr, state_topic).await,
        (v1.version, json!({"done": false}))
    );
    a.ping(4).await;
}

/// Subscribers racing the close each learn of it exactly once, whether their subscribe
/// lands before the close (live `closed`) or after it (`closed` right after the ack).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribers_racing_a_close_get_exactly_one_closed() {
    const CLIENTS: u64 = 48;
    let gw = TestGateway::start_default().await;
    let addr = gw.addr;
    let topic = "wf:racing-close";
    publish_numbered(&gw, topic, 1..=1).await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(WsClient::connect(addr).await);
    }
    let (go, _) = tokio::sync::broadcast::channel::<()>(1);
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let mut go = go.subscribe();
            tokio::spawn(async move {
                go.recv().await.expect("start signal");
                client.subscribe(&[topic], &[], 1).await;
                client.send_json(&json!({"type": "ping", "id": 2})).await;
                let mut closed = 0;
                loop {
                    let message = client.next_json().await;
                    match message["type"].as_str() {
                        Some("closed") => closed += 1,
                        Some("pong") => break,
                        _ => panic!("unexpected {message}"),
                    }
                }
                (client, closed)
            })
        })
        .collect();
    let closer = tokio::spawn(async move { close_topic(addr, topic).await.status });
    go.send(()).expect("start");
    assert_eq!(within("close", closer).await.expect("closer"), 200);
    for task in tasks {
        let (mut client, mut closed) = within("a racing client", task).await.expect("client");
        // A subscriber that got its pong before the close fan-out reached it gets the
        // live `closed` next.
        if closed == 0 {
            next_of(&mut client, "closed", topic).await;
            closed = 1;
            client.ping(3).await;
        }
        assert_eq!(
            closed, 1,
            "a subscriber racing the close was told {closed} times"
        );
    }
}

// 7. Filters.

#[tokio::test]
async fn a_filter_delivers_only_matching_events_live_on_replay_and_on_resync() {
    let gw = TestGateway::start_default().await;
    let topic = "wf:events";
    let filter = json!({"status": ["running", "failed"]});
    let mut filtered = WsClient::connect(gw.addr).await;
    subscribe_with(
        &mut filtered,
        json!({"type": "subscribe", "topics": [topic], "filter": filter, "id": 1}),
    )
    .await;
    let mut everything = WsClient::connect(gw.addr).await;
    everything.subscribe(&[topic], &[], 1).await;

    let events = [
        json!({"status": "queued"}),
        json!({"status": "running", "step": 1}),
        json!({"status": "done"}),
        json!("running"),
        json!({"state": "running"}),
        json!({"status": "failed"}),
        json!({"status": ["running"]}),
        json!({"status": "RUNNING"}),
        json!({"status": "running", "step": 2}),
    ];
    for (i, data) in events.iter().enumerate() {
        let offset = publish_ok(gw.addr, topic, data.to_string().as_bytes()).await;
        assert_eq!(offset, i as u64 + 1);
    }
    let matching = [2u64, 6, 9];
    for expected in 1..=events.len() as u64 {
        assert_eq!(everything.next_event().await.1, expected);
    }
    for expected in matching {
        let (_, offset, data) = filtered.next_event().await;
        assert_eq!(offset, expected, "filtered client got {data}");
    }
    // Skipped ones stay skipped: the next matching event is the next thing to arrive.
    publish_ok(gw.addr, topic, br#"{"status":"queued"}"#).await;
    publish_ok(gw.addr, topic, br#"{"status":"failed","n":11}"#).await;
    assert_eq!(filtered.next_event().await.1, 11);

    // Replay with `since` honours the filter too.
    let epoch = epoch_of(gw.addr, topic).await;
    let mut resumed = WsClient::connect(gw.addr).await;
    subscribe_with(
        &mut resumed,
        json!({"type": "subscribe", "topics": [topic], "filter": filter,
               "since": {topic: version_of(&epoch, 0)}, "id": 1}),
    )
    .await;
    for expected in [2u64, 6, 9, 11] {
        assert_eq!(resumed.next_event().await.1, expected);
    }
    resumed.ping(2).await;

    // So does resync: the subscription keeps its filter.
    filtered
        .send_json(
            &json!({"type": "resync", "topic": topic, "last_version": version_of(&epoch, 5)}),
        )
        .await;
    for expected in [6u64, 9, 11] {
        assert_eq!(filtered.next_event().await.1, expected);
    }
    publish_ok(gw.addr, topic, br#"{"status":"done"}"#).await;
    publish_ok(gw.addr, topic, br#"{"status":"running","n":13}"#).await;
    assert_eq!(filtered.next_event().await.1, 13);
    filtered.ping(2).await;

    // Two fields are a conjunction.
    let mut both = WsClient::connect(gw.addr).await;
    subscribe_with(
        &mut both,
        json!({"type": "subscribe", "topics": [topic], "id": 1,
               "filter": {"status": ["running"], "workflow_id": ["w1"]}}),
    )
    .await;
    publish_ok(
        gw.addr,
        topic,
        br#"{"status":"running","workflow_id":"w2"}"#,
    )
    .await;
    publish_ok(gw.addr, topic, br#"{"status":"failed","workflow_id":"w1"}"#).await;
    publish_ok(
        gw.addr,
        topic,
        br#"{"status":"running","workflow_id":"w1"}"#,
    )
    .await;
    assert_eq!(both.next_event().await.1, 16);
    both.ping(2).await;
}
