//! Connection lifecycle: heartbeats, rate limits, slowloris, the handshake cap and graceful
//! shutdown, through real sockets.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn fast_heartbeats() -> tidings::Config {
    tidings::Config::default()
        .ping_interval(Duration::from_millis(200))
        .pong_timeout(Duration::from_millis(300))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_pinged_then_closed_with_1011() {
    let gw = TestGateway::start(fast_heartbeats()).await;
    // The raw client never answers pings.
    let mut silent = RawWs::connect(gw.addr).await;
    let first = within("a ping", silent.read_frame())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.opcode, OP_PING, "{first:?}");
    silent.expect_close(1011).await;
    let stats = get_stats(gw.addr).await;
    assert_eq!(stats["connections_closed"]["timeout"], 1, "{stats}");
    gw.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answering_peer_is_never_closed() {
    let gw = TestGateway::start(fast_heartbeats()).await;
    // tokio-tungstenite answers pings by itself while we read.
    let mut client = WsClient::connect(gw.addr).await;
    let mut pings = 0;
    // Five pings span well over one pong timeout after the first.
    while pings < 5 {
        match within("a ping", client.ws.next()).await {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected pings only, got {other:?}"),
        }
    }
    client.ping(7).await;
    let stats = get_stats(gw.addr).await;
    assert_eq!(stats["connections_closed"]["timeout"], 0, "{stats}");
    assert_eq!(stats["connections"], 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_pings_for_clients_that_cannot_see_websocket_pings() {
    let gw = TestGateway::start(fast_heartbeats().json_ping(true)).await;
    let mut client = RawWs::connect(gw.addr).await;
    // The WebSocket ping comes first, then the JSON one; answering in JSON keeps us alive.
    for round in 0..3 {
        let message = client.next_json().await;
        assert_eq!(message["type"], "ping", "round {round}: {message}");
        assert_server_message(&message);
        client.send_text(r#"{"type":"pong"}"#).await;
    }
    let stats = get_stats(gw.addr).await;
    assert_eq!(stats["connections_closed"]["timeout"], 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_gets_an_error_then_close_1008() {
    let gw = TestGateway::start(tidings::Config::default().rate_limit(5)).await;
    let mut client = RawWs::connect(gw.addr).await;
    // Far more than the bucket holds, in one write.
    let mut burst = Vec::new();
    for id in 0..40 {
        burst.extend(masked(
            true,
            OP_TEXT,
            json!({"type": "ping", "id": id}).to_string().as_bytes(),
        ));
    }
    client.send_raw(&burst).await;
    let mut pongs = 0;
    let mut errors = 0;
    loop {
        let frame = within("a reply", client.read_frame())
            .await
            .unwrap()
            .unwrap();
        if frame.opcode == OP_CLOSE {
            assert_eq!(frame.close_code(), Some(1008), "{frame:?}");
            // Complete the close handshake; the gateway then ends the connection.
            let _ = client.try_send_raw(&close_frame(1008, b"")).await;
            client.expect_eof().await;
            break;
        }
        let message: serde_json::Value = serde_json::from_slice(&frame.payload).unwrap();
        match message["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(message["code"], "rate_limited", "{message}");
                errors += 1;
            }
            _ => panic!("unexpected {message}"),
        }
    }
    assert_eq!(
        (pongs, errors),
        (5, 1),
        "the bucket admits its burst, then one error"
    );
    let stats = get_stats(gw.addr).await;
    assert_eq!(stats["connections_closed"]["rate_limited"], 1, "{stats}");
    gw.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_within_the_rate_is_served() {
    let gw = TestGateway::start(tidings::Config::default().rate_limit(50)).await;
    let mut client = WsClient::connect(gw.addr).await;
    for id in 0..40 {
        client.ping(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_half_requests_are_dropped() {
    let config = tidings::Config::default().handshake_timeout(Duration::from_millis(300));
    let gw = TestGateway::start(config).await;
    let mut half = TcpStream::connect(gw.addr).await.unwrap();
    half.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: webso")
        .await
        .unwrap();
    let mut nothing = TcpStream::connect(gw.addr).await.unwrap();
    for stream in [&mut half, &mut nothing] {
        let mut buf = Vec::new();
        // `within` fails the test unless the gateway ends the connection (EOF or reset).
        let _ = within("the gateway to drop a stalled handshake", async {
            tokio::io::AsyncReadExt::read_to_end(stream, &mut buf).await
        })
        .await;
        let text = String::from_utf8_lossy(&buf);
        assert!(
            !text.contains("101"),
            "no upgrade for a stalled request: {text}"
        );
    }
    gw.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_over_the_cap_wait_for_a_free_place() {
    let config = tidings::Config::default().max_handshakes(1);
    let gw = TestGateway::start(config).await;
    // An idle connection takes the only place.
    let idle = TcpStream::connect(gw.addr).await.unwrap();
    let addr = gw.addr;
    let mut waiting = tokio::spawn(async move { WsClient::connect(addr).await });
    let early = tokio::time::timeout(Duration::from_millis(300), &mut waiting).await;
    assert!(
        early.is_err(),
        "a second handshake must wait while the cap is taken"
    );
    drop(idle);
    let mut client = within("the waiting handshake", waiting).await.unwrap();
    client.ping(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delivers_what_was_accepted_then_closes_with_1001() {
    let gw = TestGateway::start_default().await;
    let mut clients = Vec::new();
    for i in 0..10 {
        let mut c = WsClient::connect(gw.addr).await;
        c.subscribe(&["jobs:1"], &[], i).await;
        clients.push(c);
    }
    for n in 0..50 {
        gw.gw
            .publish("jobs:1", json!({"n": n}).to_string().as_bytes())
            .unwrap();
    }
    let addr = gw.addr;
    let handle = gw.gw.clone();
    let result = gw.shutdown().await;
    assert!(result.is_ok(), "{result:?}");
    for mut c in clients {
        let offsets: Vec<u64> = c
            .next_events(50)
            .await
            .into_iter()
            .map(|(_, o)| o)
            .collect();
        assert_eq!(offsets, (1..=50).collect::<Vec<_>>());
        match within("the close", c.ws.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1001),
            other => panic!("expected close 1001, got {other:?}"),
        }
    }
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
    assert_eq!(handle.stats().connections_closed.shutdown, 10);
}
