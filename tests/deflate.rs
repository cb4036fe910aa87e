//! permessage-deflate (RFC 7692) through real sockets: the negotiation in the `101`, a
//! publication compressed once and received equal by compressed and plain subscribers,
//! small messages left plain, compressed client requests, and the failures (an inflate
//! bomb, RSV1 where it must not be).
//!
//! tokio-tungstenite does not speak permessage-deflate, so these use the raw client and an
//! independent DEFLATE implementation (miniz_oxide) for the client's side.

mod common;

use common::*;
use serde_json::{Value, json};

/// What every accepted offer is answered with.
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// RFC 7692 §7.2.2: the tail a receiver appends; then an empty final block so that miniz's
/// one-shot inflater sees the stream end.
const TAIL_AND_END: [u8; 6] = [0x00, 0x00, 0xff, 0xff, 0x03, 0x00];

/// A raw client that offered `offer` (none: no header), and the gateway's answer.
async fn connect_offering(addr: std::net::SocketAddr, offer: Option<&str>) -> RawWs {
    let mut request = UpgradeRequest::new(addr);
    if let Some(offer) = offer {
        request = request.set("Sec-WebSocket-Extensions", offer);
    }
    let (response, stream, buf) = request.send(addr).await;
    assert_eq!(response.status, 101, "{response:?}");
    stream.set_nodelay(true).expect("nodelay");
    RawWs::from_parts(stream, buf, response)
}

/// A server frame's payload inflated (miniz, not the gateway's zlib).
fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut stream = payload.to_vec();
    stream.extend_from_slice(&TAIL_AND_END);
    miniz_oxide::inflate::decompress_to_vec(&stream).expect("the frame inflates")
}

/// A compressed client frame: RSV1 on the first frame, masked.
fn compressed(fin: bool, opcode: u8, deflated: &[u8]) -> Vec<u8> {
    encode_frame(fin, 0b100, opcode, deflated, Some(MASK))
}

fn deflate(data: &[u8]) -> Vec<u8> {
    miniz_oxide::deflate::compress_to_vec(data, 6)
}

/// A configuration profile of about 5 KB, the kind of document the gateway fans out.
fn config_document() -> Value {
    let flags: Vec<Value> = (0..48)
        .map(|i| {
            let owner = ["payments", "growth", "platform"][i % 3];
            json!({
                "key": format!("checkout.feature_{i}"),
                "enabled": i % 3 != 0,
                "rollout_percent": (i * 17) % 100,
                "owner": owner,
                "updated_at": format!("2026-11-{:02}T10:{:02}:00Z", 1 + i % 28, i % 60),
            })
        })
        .collect();
    json!({"app": "checkout", "profile": "prod", "revision": 4242, "flags": flags})
}

async fn subscribe_raw(ws: &mut RawWs, topic: &str) {
    ws.send_text(&json!({"type": "subscribe", "topics": [topic], "id": 1}).to_string())
        .await;
    let ack = ws.next_json().await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
}

/// The next data frame, skipping pings.
async fn next_data(ws: &mut RawWs) -> Frame {
    loop {
        let frame = ws.next_frame().await;
        if frame.opcode != OP_PING {
            return frame;
        }
    }
}

#[tokio::test]
async fn the_handshake_answers_only_what_it_can_accept() {
    let gw = TestGateway::start_default().await;
    let cases: [(Option<&str>, Option<String>); 9] = [
        (None, None),
        (Some("permessage-deflate"), Some(ANSWER.into())),
        (
            Some("permessage-deflate; client_max_window_bits"),
            Some(ANSWER.into()),
        ),
        (
            Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
            Some(ANSWER.into()),
        ),
        (
            Some("permessage-deflate; server_max_window_bits=10"),
            Some(format!("{ANSWER}; server_max_window_bits=10")),
        ),
        // Declined: an unknown parameter, a window out of range; then the next offer.
        (Some("permessage-deflate; mux"), None),
        (
            Some("permessage-deflate; server_max_window_bits=7, permessage-deflate"),
            Some(ANSWER.into()),
        ),
        // Not the RFC 6455 grammar: nothing negotiated, the upgrade still succeeds.
        (
            Some("permessage-deflate; server_max_window_bits=\"10"),
            None,
        ),
        (Some("x-webkit-deflate-frame"), None),
    ];
    for (offer, answer) in cases {
        let ws = connect_offering(gw.addr, offer).await;
        assert_eq!(
            ws.response
                .header("sec-websocket-extensions")
                .map(str::to_owned),
            answer,
            "offer {offer:?}"
        );
    }
    // Turned off, nothing is negotiated.
    let off = TestGateway::start(tidings::Config::default().permessage_deflate(false)).await;
    let ws = connect_offering(off.addr, Some("permessage-deflate")).await;
    assert_eq!(ws.response.header("sec-websocket-extensions"), None);
}

/// One publication reaches a compressed subscriber (RSV1, inflating to the very bytes the
/// plain one gets: it was encoded once) and a plain one; two compressed subscribers get
/// the same compressed bytes.
#[tokio::test]
async fn compressed_and_plain_subscribers_get_the_same_publication() {
    let gw = TestGateway::start_default().await;
    let topic = "config:checkout:prod";
    let mut plain = connect_offering(gw.addr, None).await;
    let mut packed = connect_offering(gw.addr, Some("permessage-deflate")).await;
    let mut packed2 =
        connect_offering(gw.addr, Some("permessage-deflate; client_max_window_bits")).await;
    for ws in [&mut plain, &mut packed, &mut packed2] {
        subscribe_raw(ws, topic).await;
    }
    let document = config_document().to_string();
    assert!(
        (4500..6000).contains(&document.len()),
        "{} bytes",
        document.len()
    );
    publish_ok(gw.addr, topic, document.as_bytes()).await;

    let wire = next_data(&mut plain).await;
    assert_eq!((wire.rsv, wire.opcode), (0, OP_TEXT));
    let event: Value = serde_json::from_slice(&wire.payload).expect("JSON");
    assert_eq!(event["data"], config_document());

    let one = next_data(&mut packed).await;
    let two = next_data(&mut packed2).await;
    assert_eq!((one.rsv, one.opcode, one.fin), (0b100, OP_TEXT, true));
    assert_eq!(one, two, "one compressed frame for both");
    assert_eq!(
        inflate(&one.payload),
        wire.payload,
        "encoded once, compressed once"
    );
    assert!(
        one.payload.len() * 3 < wire.payload.len(),
        "{} compressed bytes for {}",
        one.payload.len(),
        wire.payload.len()
    );

    // Under `deflate_min_bytes` (1024), a publication goes plain to everyone.
    publish_ok(gw.addr, topic, br#"{"revision":4243}"#).await;
    for ws in [&mut plain, &mut packed] {
        let small = next_data(ws).await;
        assert_eq!((small.rsv, small.opcode), (0, OP_TEXT));
        let event: Value = serde_json::from_slice(&small.payload).expect("JSON");
        assert_eq!(event["data"]["revision"], 4243);
    }
}

/// A client that limited the server's window to 512 bytes gets a stream that reaches no
/// further back, even for a message longer than that.
#[tokio::test]
async fn a_narrow_window_is_honoured() {
    let gw = TestGateway::start_default().await;
    let topic = "config:narrow";
    let mut ws = connect_offering(
        gw.addr,
        Some("permessage-deflate; server_max_window_bits=9"),
    )
    .await;
    assert_eq!(
        ws.response.header("sec-websocket-extensions"),
        Some(format!("{ANSWER}; server_max_window_bits=9").as_str())
    );
    let mut plain = connect_offering(gw.addr, None).await;
    subscribe_raw(&mut ws, topic).await;
    subscribe_raw(&mut plain, topic).await;
    publish_ok(gw.addr, topic, config_document().to_string().as_bytes()).await;
    let frame = next_data(&mut ws).await;
    assert_eq!(frame.rsv, 0b100);
    let expected = next_data(&mut plain).await.payload;
    assert_eq!(inflate_through_window(&frame.payload, 512), Some(expected));
}

/// Inflates through a circular 2^k-byte window (miniz's wrapping output buffer): a match
/// reaching further back than the window would read overwritten bytes.
fn inflate_through_window(payload: &[u8], size: usize) -> Option<Vec<u8>> {
    use miniz_oxide::inflate::TINFLStatus;
    use miniz_oxide::inflate::core::{DecompressorOxide, decompress};
    let mut stream = payload.to_vec();
    stream.extend_from_slice(&TAIL_AND_END);
    let mut r = DecompressorOxide::new();
    let mut window = vec![0u8; size];
    let (mut out, mut at, mut pos) = (Vec::new(), 0, 0);
    loop {
        let (status, used, written) = decompress(&mut r, &stream[at..], &mut window, pos, 0);
        out.extend_from_slice(&window[pos..pos + written]);
        pos = (pos + written) % size;
        at += used;
        match status {
            TINFLStatus::Done => return Some(out),
            TINFLStatus::HasMoreOutput => {}
            _ => return None,
        }
    }
}

#[tokio::test]
async fn compressed_requests_are_served_whole_or_fragmented() {
    let gw = TestGateway::start_default().await;
    let mut ws = connect_offering(gw.addr, Some("permessage-deflate")).await;
    let request = json!({"type": "subscribe", "topics": ["jobs:1"], "id": 7}).to_string();
    ws.send_raw(&compressed(true, OP_TEXT, &deflate(request.as_bytes())))
        .await;
    let ack = ws.next_json().await;
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_u64()),
        (Some("subscribed"), Some(7))
    );
    // Fragmented: RSV1 on the first frame only.
    let ping = deflate(br#"{"type":"ping","id":8}"#);
    let (a, b) = ping.split_at(ping.len() / 2);
    let mut bytes = compressed(false, OP_TEXT, a);
    bytes.extend(masked(true, OP_CONT, b));
    ws.send_raw(&bytes).await;
    let pong = ws.next_json().await;
    assert_eq!(
        (pong["type"].as_str(), pong["id"].as_u64()),
        (Some("pong"), Some(8))
    );
}

/// 10 MiB that compress to a few KiB: inflating stops at `max_message_bytes` and the
/// connection closes with 1009; another connection is not disturbed.
#[tokio::test]
async fn an_inflate_bomb_is_1009() {
    let gw = TestGateway::start_default().await;
    let mut bystander = connect_offering(gw.addr, Some("permessage-deflate")).await;
    subscribe_raw(&mut bystander, "news").await;
    let mut bomb = vec![b' '; 10 << 20];
    bomb[0] = b'[';
    let packed = deflate(&bomb);
    assert!(packed.len() < 64 << 10, "{} bytes", packed.len());
    let mut ws = connect_offering(gw.addr, Some("permessage-deflate")).await;
    ws.send_raw(&compressed(true, OP_TEXT, &packed)).await;
    ws.expect_close(1009).await;
    publish_ok(gw.addr, "news", b"1").await;
    assert_eq!(bystander.next_json().await["data"], 1);
}

#[tokio::test]
async fn rsv1_where_it_must_not_be_is_1002() {
    let gw = TestGateway::start_default().await;
    let packed = deflate(br#"{"type":"ping","id":1}"#);
    // Without the extension negotiated.
    let mut ws = connect_offering(gw.addr, None).await;
    ws.send_raw(&compressed(true, OP_TEXT, &packed)).await;
    ws.expect_close(1002).await;
    // On a continuation frame.
    let mut ws = connect_offering(gw.addr, Some("permessage-deflate")).await;
    let mut bytes = masked(false, OP_TEXT, br#"{"type":"#);
    bytes.extend(compressed(true, OP_CONT, br#""ping"}"#));
    ws.send_raw(&bytes).await;
    ws.expect_close(1002).await;
    // On a control frame.
    let mut ws = connect_offering(gw.addr, Some("permessage-deflate")).await;
    ws.send_raw(&compressed(true, OP_PING, b"")).await;
    ws.expect_close(1002).await;
    // Not DEFLATE at all: 1007.
    let mut ws = connect_offering(gw.addr, Some("permessage-deflate")).await;
    ws.send_raw(&compressed(true, OP_TEXT, &[0xff, 0xff, 0xff]))
        .await;
    ws.expect_close(1007).await;
    gw.assert_alive().await;
}

/// A snapshot on subscribe (here `GET /ws/{app}/{profile}`) and a replay from history are
/// compressed too, and inflate to what a plain subscriber gets.
#[tokio::test]
async fn snapshots_and_replays_are_compressed() {
    let gw = TestGateway::start_default().await;
    let document = config_document().to_string();
    let put = http_request(
        gw.addr,
        "PUT",
        "/v1/topics/checkout:prod/state",
        &[("Content-Type", "application/json")],
        document.as_bytes(),
    )
    .await;
    assert_eq!(put.status, 200, "{put:?}");
    let open = |offer: Option<&'static str>| async move {
        let mut request = UpgradeRequest::new(gw.addr);
        request.path = "/ws/checkout/prod".into();
        if let Some(offer) = offer {
            request = request.set("Sec-WebSocket-Extensions", offer);
        }
        let (response, stream, buf) = request.send(gw.addr).await;
        assert_eq!(response.status, 101, "{response:?}");
        let mut ws = RawWs::from_parts(stream, buf, response);
        assert_eq!(ws.next_json().await["type"], "subscribed");
        ws
    };
    let mut plain = open(None).await;
    let mut packed = open(Some("permessage-deflate")).await;
    let snapshot = next_data(&mut plain).await;
    let compressed = next_data(&mut packed).await;
    assert_eq!((snapshot.rsv, compressed.rsv), (0, 0b100));
    assert_eq!(inflate(&compressed.payload), snapshot.payload);
    let value: Value = serde_json::from_slice(&snapshot.payload).expect("JSON");
    assert_eq!(value["type"], "snapshot");

    // A replay: events published before the subscription, asked for with `since`.
    publish_ok(gw.addr, "jobs:7", document.as_bytes()).await;
    let since = "jobs:7";
    let mut late = connect_offering(gw.addr, Some("permessage-deflate")).await;
    // Another epoch's version: `history_truncated` (small, plain), then what history has.
    let version = "0000000000000001:0";
    let request = json!({"type": "subscribe", "topics": [since], "since": {since: version}});
    late.send_text(&request.to_string()).await;
    assert_eq!(late.next_json().await["type"], "subscribed");
    let notice = next_data(&mut late).await;
    assert_eq!(notice.rsv, 0);
    let notice: Value = serde_json::from_slice(&notice.payload).expect("JSON");
    assert_eq!(notice["type"], "history_truncated", "{notice}");
    let replayed = next_data(&mut late).await;
    assert_eq!(replayed.rsv, 0b100);
    let event: Value = serde_json::from_slice(&inflate(&replayed.payload)).expect("JSON");
    assert_eq!(event["type"], "event");
    assert_eq!(event["data"], config_document());
}
