//! What a subscriber whose queue overflows is told: never silent loss.
//!
//! A subscriber of event topics gets everything already queued, then close 1013 naming the
//! last version queued, and resuming with that `since` gives exactly the rest. A subscriber
//! that only follows state documents is not closed: its backlog is replaced by a fresh
//! snapshot, and it ends with exactly the document the topic holds.

mod common;

use common::*;
use serde_json::{Value, json};
use tidings::Config;

const MAX_QUEUED: usize = 64 * 1024;
const PAYLOAD: usize = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_subscriber_gets_its_backlog_then_1013_naming_where_to_resume() {
    const TOPIC: &str = "over:events";
    let config = Config::default()
        .max_queued_bytes(MAX_QUEUED)
        .history_max_len(4096);
    let gw = TestGateway::start(config).await;
    let mut slow = stalled(gw.addr, json!({"type": "subscribe", "topics": [TOPIC]})).await;
    let total = rounds(PAYLOAD, MAX_QUEUED);
    let pad = "x".repeat(PAYLOAD);
    for n in 1..=total {
        let body = format!(r#"{{"n":{n},"pad":"{pad}"}}"#);
        assert_eq!(
            gw.gw
                .publish(TOPIC, body.as_bytes())
                .expect("publish")
                .offset,
            n
        );
    }
    // Read the backlog: a gap-free run from 1, then the close.
    let (last, reason) = read_backlog_to_1013(&mut slow).await;
    assert!(
        last < total,
        "the subscriber was never cut off ({last} of {total})"
    );
    // The reason names the last version queued, which is the last one received.
    let epoch = epoch_of(gw.addr, TOPIC).await;
    let version = version_of(&epoch, last);
    assert!(
        reason.contains(&format!("{TOPIC} {version}")),
        "reason {reason:?}, last {version}"
    );

    // Resuming from there gives exactly the rest.
    let mut client = WsClient::connect(gw.addr).await;
    subscribe_since(&mut client, TOPIC, &version, 2).await;
    for offset in last + 1..=total {
        let (topic, got, data) = client.next_event().await;
        assert_eq!((topic.as_str(), got), (TOPIC, offset));
        assert_eq!(data["n"], offset);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_subscriber_that_overflows_gets_a_fresh_snapshot_not_a_close() {
    const TOPIC: &str = "over:doc";
    let config = Config::default().max_queued_bytes(MAX_QUEUED);
    let gw = TestGateway::start(config).await;
    put_state_ok(gw.addr, TOPIC, &json!({"n": 0, "pad": ""})).await;
    let mut slow = stalled(gw.addr, json!({"type": "subscribe", "topics": [TOPIC]})).await;
    // Each write changes a 16 KiB field, so each change frame is 16 KiB.
    let total = rounds(PAYLOAD, MAX_QUEUED);
    for n in 1..=total {
        let pad = format!("{n}").repeat(PAYLOAD / format!("{n}").len());
        put_state_ok(gw.addr, TOPIC, &json!({"n": n, "pad": pad})).await;
    }
    let (final_version, final_doc) = get_state(gw.addr, TOPIC).await;

    // Apply what arrives: snapshots replace, changes must follow on exactly.
    let mut doc = Value::Null;
    let mut version = String::new();
    let mut snapshots = 0;
    while version != final_version {
        let frame = within("the document to catch up", slow.read_frame())
            .await
            .expect("read")
            .expect("no EOF");
        if frame.opcode == OP_CLOSE {
            panic!("a state subscriber was closed: {:?}", frame.close_code());
        }
        if frame.opcode != OP_TEXT {
            continue;
        }
        let message: Value = serde_json::from_slice(&frame.payload).expect("JSON");
        match message["type"].as_str() {
            Some("snapshot") => {
                doc = message["state"].clone();
                version = str_field(&message, "version").to_owned();
                snapshots += 1;
            }
            Some("change") => {
                if version.is_empty() {
                    continue;
                }
                assert_eq!(
                    str_field(&message, "old_version"),
                    version,
                    "gap or duplicate"
                );
                let patch: json_patch::Patch =
                    serde_json::from_value(message["diff"].clone()).expect("RFC 6902 diff");
                json_patch::patch(&mut doc, &patch).expect("the diff applies");
                version = str_field(&message, "new_version").to_owned();
            }
            other => panic!("unexpected {other:?}: {message}"),
        }
    }
    assert_eq!(doc, final_doc);
    assert!(
        snapshots >= 2,
        "the backlog was replaced by a fresh snapshot ({snapshots} snapshots)"
    );
    let stats = gw.gw.stats();
    assert_eq!(stats.connections_closed.slow_consumer, 0);
}
