//! State documents end to end: snapshot then changes with no gap and no duplicate while
//! writers race, gap-free versions, bad input, `GET /ws/{app}/{profile}` and `resync`.
//!
//! "Nothing arrived" is never proven by waiting: a test makes something happen that the
//! client *should* see after the thing it should not, and checks which arrives first (or
//! ends with a `ping`, whose `pong` comes after everything sent before it).

mod common;

use common::*;
use serde_json::{Value, json};
use tidings::Config;
use tokio::sync::watch;

#[tokio::test]
async fn an_old_or_foreign_since_on_a_state_topic_gets_a_fresh_snapshot() {
    let gw = TestGateway::start(Config::default().history_max_len(3)).await;
    let topic = "cfg:short";
    let mut versions = Vec::new();
    for n in 1..=8 {
        versions.push(put_state_ok(gw.addr, topic, &json!({"n": n})).await.version);
    }
    let (epoch, last) = split_version(&versions[7]);
    assert_eq!(last, 8);
    let v = |offset| version_of(&epoch, offset);

    for (since, what) in [
        (v(2), "evicted from history"),
        (version_of(FOREIGN_EPOCH, 6), "another epoch"),
    ] {
        let mut client = WsClient::connect(gw.addr).await;
        subscribe_since(&mut client, topic, &since, 1).await;
        let snapshot = next_of(&mut client, "snapshot", topic).await;
        assert_eq!(snapshot["version"], v(8), "since {what}: {snapshot}");
        assert_eq!(snapshot["state"], json!({"n": 8}), "since {what}");
        client.ping(2).await;
    }

    // A since of this epoch past the document's version did not come from it: refused.
    let mut ahead = WsClient::connect(gw.addr).await;
    ahead
        .send_json(
            &json!({"type": "subscribe", "topics": [topic], "since": {topic: v(99)}, "id": 1}),
        )
        .await;
    ahead.expect_error("version_ahead").await;

    // A since history still covers gets exactly the changes, no snapshot.
    let mut exact = WsClient::connect(gw.addr).await;
    subscribe_since(&mut exact, topic, &v(6), 1).await;
    let mut mirror = Mirror::at(topic, &v(6), json!({"n": 6}));
    mirror.follow_to(&mut exact, &v(8)).await;
    assert_eq!(mirror.doc, json!({"n": 8}));
    exact.ping(2).await;

    // And everyone continues live.
    let written = patch_state_ok(
        gw.addr,
        topic,
        &json!([{"op": "add", "path": "/m", "value": 1}]),
    )
    .await;
    assert_eq!(written.version, v(9));
    mirror.follow_to(&mut exact, &v(9)).await;
    assert_eq!(mirror.doc, json!({"n": 8, "m": 1}));
}

// 3. Snapshot then changes while writers race subscribers.

/// A small deterministic generator, seeded per run and printed, so a failure can be rerun.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writer `w`'s `n`th write: a PUT now and then, otherwise a patch mixing add, append,
/// remove-from-front (shifting an array) and replace.
fn write_for(w: u64, n: u64) -> (bool, Value) {
    if n % 5 == 4 {
        let doc = json!({
            "owner": w, "n": n, "list": [w, n],
            "nested": {"k": [n, {"x": w}], "s": format!("put {w}/{n}")},
        });
        (true, doc)
    } else {
        let mut ops = vec![
            json!({"op": "add", "path": format!("/w{w}"), "value": {"n": n, "tags": ["a", n]}}),
            json!({"op": "add", "path": "/list/-", "value": n * 100 + w}),
            json!({"op": "remove", "path": "/list/0"}),
        ];
        if n.is_multiple_of(3) {
            ops.push(json!({"op": "replace", "path": "/owner", "value": w}));
        }
        (false, Value::Array(ops))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_then_changes_have_no_gap_or_duplicate_while_writers_race_subscribers() {
    const WRITERS: u64 = 4;
    const WRITES: u64 = 30;
    const CLIENTS: usize = 12;
    let seed = now_ms() | 1;
    eprintln!("subscribe moments seeded with {seed}");
    let mut rng = XorShift(seed);
    let gw = TestGateway::start_default().await;
    let addr = gw.addr;
    let topic = "cfg:race";
    let initial = put_state_ok(addr, topic, &json!({"owner": 0, "list": [0], "nested": {}})).await;

    let (progress, watch_progress) = watch::channel(0u64);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let at = rng.next() % (WRITERS * WRITES);
            let mut progress = watch_progress.clone();
            tokio::spawn(async move {
                within(
                    "writers to make progress",
                    progress.wait_for(|done| *done >= at),
                )
                .await
                .expect("progress channel");
                let mut client = WsClient::connect(addr).await;
                client.subscribe(&[topic], &[], 1).await;
                let snapshot = next_of(&mut client, "snapshot", topic).await;
                (at, client, Mirror::from_snapshot(&snapshot))
            })
        })
        .collect();
    let progress = std::sync::Arc::new(progress);
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut changed = 0;
                for n in 0..WRITES {
                    let (put, body) = write_for(w, n);
                    let response = if put {
                        put_state(addr, topic, &body).await
                    } else {
                        patch_state(addr, topic, &body).await
                    };
                    if written(&response, topic).changed {
                        changed += 1;
                    }
                    progress.send_modify(|done| *done += 1);
                }
                changed
            })
        })
        .collect();
    let mut changes = 0;
    for writer in writers {
        changes += within("a writer", writer).await.expect("writer");
    }
    let (final_version, final_doc) = get_state(addr, topic).await;
    let (epoch, offset) = split_version(&final_version);
    assert_eq!(
        epoch,
        split_version(&initial.version).0,
        "the epoch changed"
    );
    assert_eq!(offset, 1 + changes, "versions are not one per change");

    for client in clients {
        let (at, mut client, mut mirror) = within("a client", client).await.expect("client");
        mirror.follow_to(&mut client, &final_version).await;
        assert_eq!(
            mirror.doc, final_doc,
            "client subscribed after {at} writes (seed {seed}) ends with another document; \
             versions {:?}",
            mirror.seen
        );
        // Nothing after the final change: no duplicate trailing behind.
        client.ping(2).await;
    }
}

// 4. Gap-free versions.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_puts_give_a_gap_free_version_sequence() {
    const PUTS: u64 = 64;
    let gw = TestGateway::start_default().await;
    let addr = gw.addr;
    let topic = "cfg:puts";
    // Subscribed before the document exists: sees every change from the very first.
    let mut client = WsClient::connect(addr).await;
    client.subscribe(&[topic], &[], 1).await;

    let puts: Vec<_> = (0..PUTS)
        .map(|n| {
            tokio::spawn(async move {
                let doc = json!({"writer": n, "payload": [n, n * 2]});
                (put_state_ok(addr, topic, &doc).await, doc)
            })
        })
        .collect();
    let mut offsets = Vec::new();
    let mut epochs = std::collections::BTreeSet::new();
    let mut by_offset = std::collections::BTreeMap::new();
    for put in puts {
        let (written, doc) = within("a PUT", put).await.expect("PUT task");
        assert!(
            written.changed,
            "a distinct document changed nothing: {written:?}"
        );
        let (epoch, offset) = split_version(&written.version);
        epochs.insert(epoch);
        offsets.push(offset);
        by_offset.insert(offset, doc);
    }
    assert_eq!(
        epochs.len(),
        1,
        "PUTs answered from several epochs: {epochs:?}"
    );
    offsets.sort_unstable();
    assert_eq!(
        offsets,
        (1..=PUTS).collect::<Vec<_>>(),
        "versions with gaps or repeats"
    );

    let (version, state) = get_state(addr, topic).await;
    assert_eq!(split_version(&version).1, PUTS);
    assert_eq!(
        state, by_offset[&PUTS],
        "the document is not the last PUT's"
    );

    let mut mirror = first_state(&mut client, topic).await;
    mirror.follow_to(&mut client, &version).await;
    assert_eq!(mirror.doc, state);
    client.ping(2).await;
}

// 8. Bad input.

#[tokio::test]
async fn a_refused_patch_leaves_the_document_unchanged_and_publishes_nothing() {
    let gw = TestGateway::start_default().await;
    let topic = "cfg:strict";
    let doc = json!({"a": 1, "list": [1, 2], "obj": {"k": "v"}});
    let v1 = put_state_ok(gw.addr, topic, &doc).await.version;
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&[topic], &[], 1).await;
    let mut mirror = Mirror::from_snapshot(&next_of(&mut client, "snapshot", topic).await);
    assert_eq!((mirror.version.as_str(), &mirror.doc), (v1.as_str(), &doc));

    let refused = [
        // A path that does not exist.
        (
            json!([{"op": "replace", "path": "/missing/x", "value": 1}]),
            422,
            "patch_unprocessable",
        ),
        (
            json!([{"op": "remove", "path": "/list/7"}]),
            422,
            "patch_unprocessable",
        ),
        // Atomic: the first operation would apply, the second cannot.
        (
            json!([{"op": "add", "path": "/b", "value": 2}, {"op": "remove", "path": "/nope"}]),
            422,
            "patch_unprocessable",
        ),
        // A failed test refuses the whole patch.
        (
            json!([{"op": "test", "path": "/a", "value": 2}, {"op": "replace", "path": "/a", "value": 3}]),
            409,
            "patch_test_failed",
        ),
        (
            json!([{"op": "replace", "path": "/a", "value": 5}, {"op": "test", "path": "/obj/k", "value": "w"}]),
            409,
            "patch_test_failed",
        ),
    ];
    for (patch, status, code) in &refused {
        let response = patch_state(gw.addr, topic, patch).await;
        response.assert_error(*status, code);
        assert_eq!(
            get_state(gw.addr, topic).await,
            (v1.clone(), doc.clone()),
            "after the refused patch {patch}"
        );
    }
    // Not a patch at all.
    patch_state_raw(gw.addr, topic, b"[{\"op\":", &[])
        .await
        .assert_error(400, "invalid_json");
    let response = patch_state(
        gw.addr,
        topic,
        &json!({"op": "add", "path": "/a", "value": 1}),
    )
    .await;
    assert!(
        response.status == 400 || response.status == 422,
        "a JSON body that is no patch: {response:?}"
    );
    patch_state_raw(
        gw.addr,
        topic,
        br#"[{"op":"add","path":"/z","value":1}]"#,
        &[("Content-Type", "application/json")],
    )
    .await
    .assert_error(415, "unsupported_media_type");
    assert_eq!(get_state(gw.addr, topic).await, (v1.clone(), doc.clone()));

    // The subscriber's next frame is the next legitimate change, from v1.
    let v2 = patch_state_ok(
        gw.addr,
        topic,
        &json!([{"op": "add", "path": "/list/-", "value": 3}]),
    )
    .await;
    assert!(v2.changed);
    let change = next_of(&mut client, "change", topic).await;
    mirror.apply(&change);
    assert_eq!(mirror.version, v2.version);
    assert_eq!(
        mirror.doc,
        json!({"a": 1, "list": [1, 2, 3], "obj": {"k": "v"}})
    );
    client.ping(2).await;
}

#[tokio::test]
async fn bad_puts_are_refused_and_an_identical_put_changes_nothing() {
    let gw = TestGateway::start(Config::default().max_publish_bytes(4096)).await;
    let topic = "cfg:puts-bad";
    let doc = json!({"a": 1});
    let v1 = put_state_ok(gw.addr, topic, &doc).await;
    assert!(v1.changed);
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&[topic], &[], 1).await;
    let mut mirror = Mirror::from_snapshot(&next_of(&mut client, "snapshot", topic).await);

    put_state_raw(gw.addr, topic, b"{not json", &[])
        .await
        .assert_error(400, "invalid_json");
    put_state_raw(gw.addr, topic, b"", &[])
        .await
        .assert_error(400, "invalid_json");
    let big = json!({"blob": "x".repeat(5000)});
    put_state(gw.addr, topic, &big)
        .await
        .assert_error(413, "payload_too_large");
    let big_patch = json!([{"op": "add", "path": "/blob", "value": "x".repeat(5000)}]);
    patch_state(gw.addr, topic, &big_patch)
        .await
        .assert_error(413, "payload_too_large");

    // Optimistic concurrency.
    let stale = format!("\"{}\"", version_of(FOREIGN_EPOCH, 1));
    put_state_raw(gw.addr, topic, br#"{"a":2}"#, &[("If-Match", &stale)])
        .await
        .assert_error(412, "precondition_failed");
    let weak = format!("W/\"{}\"", v1.version);
    put_state_raw(gw.addr, topic, br#"{"a":2}"#, &[("If-Match", &weak)])
        .await
        .assert_error(412, "precondition_failed");
    patch_state_raw(
        gw.addr,
        topic,
        br#"[{"op":"replace","path":"/a","value":2}]"#,
        &[("If-Match", &stale)],
    )
    .await
    .assert_error(412, "precondition_failed");

    // The same document again: 200, unchanged, same version, nothing published.
    let same = put_state_ok(gw.addr, topic, &doc).await;
    assert_eq!(
        same,
        Written {
            version: v1.version.clone(),
            changed: false
        }
    );
    let noop = patch_state_ok(
        gw.addr,
        topic,
        &json!([{"op": "replace", "path": "/a", "value": 1}]),
    )
    .await;
    assert_eq!(
        noop,
        Written {
            version: v1.version.clone(),
            changed: false
        }
    );
    assert_eq!(
        get_state(gw.addr, topic).await,
        (v1.version.clone(), doc.clone())
    );

    // A matching If-Match succeeds; the subscriber's next frame is that change.
    let etag = format!("\"{}\"", v1.version);
    let response = put_state_raw(gw.addr, topic, br#"{"a":2}"#, &[("If-Match", &etag)]).await;
    let v2 = written(&response, topic);
    assert!(v2.changed);
    mirror.apply(&next_of(&mut client, "change", topic).await);
    assert_eq!(
        (mirror.version.as_str(), &mirror.doc),
        (v2.version.as_str(), &json!({"a": 2}))
    );
    client.ping(2).await;
}

#[tokio::test]
async fn a_malformed_since_is_an_error_and_the_connection_stays_up() {
    let gw = TestGateway::start_default().await;
    let topic = "cfg:since";
    let v1 = put_state_ok(gw.addr, topic, &json!({"k": 1})).await.version;
    let mut client = WsClient::connect(gw.addr).await;
    for (id, bad) in [
        "nope",
        "",
        "0123456789abcdef",
        "0123456789abcdef:",
        "0123456789abcdef:-1",
        "0123456789abcdef:1.5",
        "0123456789ABCDEG:1",
        "123:1",
        "0123456789abcdef0:1",
        "0123456789abcdef:99999999999999999999999",
    ]
    .into_iter()
    .enumerate()
    {
        client
            .send_json(
                &json!({"type": "subscribe", "topics": [topic], "since": {topic: bad}, "id": id}),
            )
            .await;
        let error = client.expect_error("invalid_version").await;
        assert_eq!(error["id"], id, "{error}");
        client.ping(100 + id as u64).await;
    }
    // A since that is not a string at all.
    client
        .send_json(&json!({"type": "subscribe", "topics": [topic], "since": {topic: 3}, "id": 50}))
        .await;
    client.expect_error("invalid_json").await;
    // A filter that is not one.
    client
        .send_json(&json!({"type": "subscribe", "topics": [topic], "filter": ["status"], "id": 51}))
        .await;
    client.expect_error("invalid_filter").await;
    client.ping(52).await;

    // None of those subscribed: a proper subscribe now gets the snapshot (a second
    // subscribe to a topic already held would get no snapshot).
    client.subscribe(&[topic], &[], 53).await;
    let snapshot = next_of(&mut client, "snapshot", topic).await;
    assert_eq!(snapshot["version"], v1.as_str());
    client.ping(54).await;
}

#[tokio::test]
async fn state_and_event_topics_do_not_mix() {
    let gw = TestGateway::start_default().await;
    put_state_ok(gw.addr, "mix:state", &json!({"a": 1})).await;
    publish(gw.addr, "mix:state", b"{\"e\":1}")
        .await
        .assert_error(409, "wrong_topic_kind");
    publish_ok(gw.addr, "mix:events", b"{\"e\":1}").await;
    put_state(gw.addr, "mix:events", &json!({"a": 1}))
        .await
        .assert_error(409, "wrong_topic_kind");
    patch_state(
        gw.addr,
        "mix:events",
        &json!([{"op": "add", "path": "/a", "value": 1}]),
    )
    .await
    .assert_error(409, "wrong_topic_kind");
    http_get(gw.addr, "/v1/topics/mix:events/state")
        .await
        .assert_error(404, "no_state");
    http_get(gw.addr, "/v1/topics/mix:nothing/state")
        .await
        .assert_error(404, "no_state");
}

/// A patch refused on a topic with no document must not create one: the topic stays free
/// to become an event stream, and `GET` still says there is no state.
#[tokio::test]
async fn a_refused_patch_on_a_new_topic_creates_no_document() {
    let gw = TestGateway::start_default().await;
    let topic = "fresh:t";
    patch_state(
        gw.addr,
        topic,
        &json!([{"op": "replace", "path": "/a", "value": 1}]),
    )
    .await
    .assert_error(422, "patch_unprocessable");
    http_get(gw.addr, &format!("/v1/topics/{topic}/state"))
        .await
        .assert_error(404, "no_state");
    assert_eq!(publish_ok(gw.addr, topic, b"{\"e\":1}").await, 1);
}

// 9. The config endpoint.

#[tokio::test]
async fn ws_app_profile_opens_subscribed_with_the_snapshot_first() {
    let gw = TestGateway::start_default().await;
    let topic = "billing:prod";
    let doc = json!({"feature_x": true, "limits": {"rps": 100}});
    let v1 = put_state_ok(gw.addr, topic, &doc).await.version;

    let mut client = connect_path(gw.addr, "/ws/billing/prod").await;
    let ack = client.next_json().await;
    assert_eq!(ack["type"], "subscribed", "first message: {ack}");
    assert_eq!(ack["topics"], json!([topic]), "{ack}");
    let snapshot = next_of(&mut client, "snapshot", topic).await;
    assert_eq!(snapshot["version"], v1.as_str(), "{snapshot}");
    assert_eq!(snapshot["state"], doc, "{snapshot}");
    let mut mirror = Mirror::from_snapshot(&snapshot);

    let v2 = patch_state_ok(
        gw.addr,
        topic,
        &json!([{"op": "replace", "path": "/limits/rps", "value": 250}]),
    )
    .await;
    let v3 = put_state_ok(gw.addr, topic, &json!({"feature_x": false})).await;
    mirror.follow_to(&mut client, &v3.version).await;
    assert_eq!(mirror.seen, vec![v1, v2.version, v3.version.clone()]);
    assert_eq!(mirror.doc, json!({"feature_x": false}));
    assert_eq!(
        get_state(gw.addr, topic).await,
        (v3.version, mirror.doc.clone())
    );

    // It is an ordinary connection otherwise.
    client.subscribe(&["billing:other"], &[], 7).await;
    client.ping(8).await;
}

// 10. resync.

#[tokio::test]
async fn resync_replays_exactly_the_missed_changes() {
    let gw = TestGateway::start(Config::default().history_max_len(16)).await;
    let topic = "cfg:resync";
    put_state_ok(gw.addr, topic, &json!({"n": 0})).await;
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&[topic], &[], 1).await;
    let mut mirror = Mirror::from_snapshot(&next_of(&mut client, "snapshot", topic).await);
    let mut versions = vec![mirror.version.clone()];
    for n in 1..=5 {
        let written = patch_state_ok(
            gw.addr,
            topic,
            &json!([{"op": "replace", "path": "/n", "value": n}]),
        )
        .await;
        versions.push(written.version);
    }
    // The client takes two changes, then drops three on the floor (say, a bug of its own).
    for _ in 0..2 {
        mirror.apply(&client.next_json().await);
    }
    for _ in 0..3 {
        assert_eq!(client.next_json().await["type"], "change");
    }
    assert_eq!(mirror.version, versions[2]);
    client
        .send_json(&json!({"type": "resync", "topic": topic, "last_version": versions[2], "id": 9}))
        .await;
    mirror.follow_to(&mut client, &versions[5]).await;
    assert_eq!(mirror.doc, json!({"n": 5}));
    // Then live, with nothing replayed twice.
    let v6 = patch_state_ok(
        gw.addr,
        topic,
        &json!([{"op": "add", "path": "/m", "value": true}]),
    )
    .await;
    mirror.follow_to(&mut client, &v6.version).await;
    assert_eq!(mirror.doc, get_state(gw.addr, topic).await.1);
    client.ping(10).await;

    // A resync from the current version replays nothing.
    client
        .send_json(&json!({"type": "resync", "topic": topic, "last_version": v6.version}))
        .await;
    client.ping(11).await;

    // A resync from another epoch gets a fresh snapshot.
    client
        .send_json(&json!({"type": "resync", "topic": topic, "last_version": version_of(FOREIGN_EPOCH, 3)}))
        .await;
    let snapshot = next_of(&mut client, "snapshot", topic).await;
    assert_eq!(snapshot["version"], v6.version.as_str());
    assert_eq!(snapshot["state"], mirror.doc);

    // Errors keep the connection.
    client
        .send_json(&json!({"type": "resync", "topic": topic, "last_version": "junk", "id": 12}))
        .await;
    assert_eq!(client.expect_error("invalid_version").await["id"], 12);
    client
        .send_json(
            &json!({"type": "resync", "topic": "cfg:other", "last_version": v6.version, "id": 13}),
        )
        .await;
    assert_eq!(client.expect_error("not_subscribed").await["id"], 13);
    client.ping(14).await;
}

#[tokio::test]
async fn resync_on_an_event_topic_replays_exactly_the_missed_events() {
    let gw = TestGateway::start(Config::default().history_max_len(8)).await;
    let topic = "resync:events";
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&[topic], &[], 1).await;
    publish_numbered(&gw, topic, 1..=6).await;
    expect_numbered_events(&mut client, topic, 1..=6).await;
    let epoch = epoch_of(gw.addr, topic).await;
    client
        .send_json(
            &json!({"type": "resync", "topic": topic, "last_version": version_of(&epoch, 2)}),
        )
        .await;
    expect_numbered_events(&mut client, topic, 3..=6).await;
    publish_numbered(&gw, topic, 7..=7).await;
    expect_numbered_events(&mut client, topic, 7..=7).await;
    client.ping(2).await;

    // Past what history holds: told what was lost, then what is left.
    publish_numbered(&gw, topic, 8..=12).await;
    expect_numbered_events(&mut client, topic, 8..=12).await;
    client
        .send_json(
            &json!({"type": "resync", "topic": topic, "last_version": version_of(&epoch, 1)}),
        )
        .await;
    expect_truncated(
        &mut client,
        topic,
        &version_of(&epoch, 1),
        &version_of(&epoch, 5),
        &version_of(&epoch, 12),
    )
    .await;
    expect_numbered_events(&mut client, topic, 5..=12).await;
    client.ping(3).await;
}
