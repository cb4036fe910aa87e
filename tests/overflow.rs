//! What a subscriber whose queue overflows is told: never silent loss.
//!
//! A subscriber of event topics gets everything already queued, then close 1013 naming the
//! last version queued, and resuming with that `since` gives exactly the rest. A subscriber
//! that only follows state documents is not closed: its backlog is replaced by a fresh
//! snapshot, and it ends with exactly the document the topic holds.

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::{Value, json};
use tidings::Config;
use tokio::net::TcpSocket;

const MAX_QUEUED: usize = 64 * 1024;
const PAYLOAD: usize = 16 * 1024;

/// Enough 16 KiB publications to fill the kernel's buffers on the way (the gateway's send
/// buffer autotunes up to `tcp_wmem`'s maximum) and then the queue.
fn rounds() -> u64 {
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|text| text.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 * 1024 * 1024);
    ((wmem_max + 64 * 1024 + MAX_QUEUED) / PAYLOAD + 8) as u64
}

/// A raw client with a tiny receive buffer that sends `request` and then reads nothing
/// until the test says so.
async fn stalled(addr: SocketAddr, request: Value) -> RawWs {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket.connect(addr).await.expect("connect");
    let mut client = RawWs::handshake(stream, addr).await;
    client.send_text(&request.to_string()).await;
    let ack = client.next_json().await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_subscriber_gets_its_backlog_then_1013_naming_where_to_resume() {
    const TOPIC: &str = "over:events";
    let config = Config::default()
        .max_queued_bytes(MAX_QUEUED)
        .history_max_len(4096);
    let gw = TestGateway::start(config).await;
    let mut slow = stalled(gw.addr, json!({"type": "subscribe", "topics": [TOPIC]})).await;
    let total = rounds();
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
    let mut last = 0;
    let reason = loop {
        let frame = within("the backlog", slow.read_frame())
            .await
            .expect("read")
            .expect("a close frame before EOF");
        match frame.opcode {
            OP_TEXT => {
                let event: Value = serde_json::from_slice(&frame.payload).expect("JSON");
                assert_eq!(event["offset"], last + 1, "a gap in the backlog");
                last += 1;
            }
            OP_CLOSE => {
                assert_eq!(frame.close_code(), Some(1013), "{frame:?}");
                break String::from_utf8(frame.payload[2..].to_vec()).expect("UTF-8 reason");
            }
            _ => {}
        }
    };
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
    let total = rounds();
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
