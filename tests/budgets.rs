//! The gateway-wide buffer budgets, above each connection's own limits: everything queued
//! for slow sockets (`max_queued_total_bytes`) and everything half received
//! (`max_inbound_buffered_bytes`).

mod common;

use common::*;
use serde_json::json;
use tidings::Config;

const PAYLOAD: usize = 16 * 1024;

/// A slow reader far inside its own `max_queued_bytes` is still treated as a slow consumer
/// once the gateway-wide total is reached: its backlog, then 1013 naming where to resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_queue_budget_bounds_slow_readers_within_their_own_limit() {
    const TOPIC: &str = "budget:events";
    const TOTAL: usize = 128 * 1024;
    let config = Config::default()
        .fanout_threads(1)
        .max_queued_bytes(64 * 1024 * 1024)
        .max_queued_total_bytes(TOTAL)
        .history_max_len(4096);
    let gw = TestGateway::start(config).await;
    let mut slow = stalled(gw.addr, json!({"type": "subscribe", "topics": [TOPIC]})).await;
    let pad = "x".repeat(PAYLOAD);
    for n in 1..=rounds(PAYLOAD, TOTAL) {
        let body = format!(r#"{{"n":{n},"pad":"{pad}"}}"#);
        gw.gw.publish(TOPIC, body.as_bytes()).expect("publish");
    }
    let (last, reason) = read_backlog_to_1013(&mut slow).await;
    assert!(
        reason.starts_with(&format!("slow consumer; last queued {TOPIC} ")),
        "{reason}"
    );
    assert!(
        reason.ends_with(&format!(":{last}; resume with since")),
        "{reason}"
    );
    // Far less than the connection's own 64 MiB got queued: the shared budget decided.
    let queued_after_kernel = last as usize * PAYLOAD;
    assert!(queued_after_kernel < 16 * 1024 * 1024, "{last} events");
}

/// A peer holding half a frame when the shards' inbound budget is full is closed with 1013
/// and counted as `overloaded`; a well-behaved client goes on.
#[tokio::test]
async fn the_shared_inbound_budget_closes_a_peer_holding_half_a_frame() {
    let config = Config::default()
        .fanout_threads(1)
        .max_inbound_buffered_bytes(2000);
    let gw = TestGateway::start(config).await;
    let mut calm = WsClient::connect(gw.addr).await;
    calm.subscribe(&["budget:calm"], &[], 1).await;

    let mut greedy = RawWs::connect(gw.addr).await;
    let frame = masked(true, OP_TEXT, &vec![b' '; 10_000]);
    // The header and 4,000 bytes of a 10,000-byte message: well under `max_message_bytes`,
    // but over what the gateway may hold for all its half-received frames.
    greedy.send_raw(&frame[..4014]).await;
    greedy.expect_close(1013).await;

    let offset = publish_ok(gw.addr, "budget:calm", b"1").await;
    let (_, got, _) = calm.next_event().await;
    assert_eq!(got, offset);
    let stats = gw
        .stats_until("the overloaded close", |s| {
            s.connections_closed.overloaded == 1
        })
        .await;
    assert_eq!(stats.connections_closed.protocol_error, 0, "{stats:?}");
}
