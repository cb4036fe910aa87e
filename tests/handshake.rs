//! The WebSocket opening handshake (RFC 6455 §4.2): every refusal the contract names,
//! with its status and JSON `code`, and the details of a good 101.

mod common;

use common::*;
use tidings::Config;

/// Sends `request` and asserts the refusal.
async fn refused(
    gw: &TestGateway,
    request: UpgradeRequest,
    status: u16,
    code: &str,
) -> HttpResponse {
    let (response, _stream, _) = request.send(gw.addr).await;
    response.assert_error(status, code);
    assert!(
        response.header("sec-websocket-accept").is_none(),
        "a refusal must not carry Sec-WebSocket-Accept"
    );
    response
}

#[tokio::test]
async fn good_handshake_computes_the_rfc_accept_key() {
    // Our independent computation agrees with the RFC's worked example...
    assert_eq!(accept_key(RFC_KEY), RFC_ACCEPT);
    let gw = TestGateway::start_default().await;
    let (response, _stream, _) = UpgradeRequest::new(gw.addr).send(gw.addr).await;
    assert_eq!(response.status, 101, "{response:?}");
    // ...and so does the gateway.
    assert_eq!(response.header("sec-websocket-accept"), Some(RFC_ACCEPT));
    let upgrade = response.header("upgrade").unwrap_or_default();
    assert!(
        upgrade.eq_ignore_ascii_case("websocket"),
        "Upgrade: {upgrade:?}"
    );
    let connection = response.header("connection").unwrap_or_default();
    assert!(
        connection.to_ascii_lowercase().contains("upgrade"),
        "Connection: {connection:?}"
    );
    assert!(
        response.header("sec-websocket-protocol").is_none(),
        "no subprotocol was offered, so none may be selected (RFC 6455 §4.2.2)"
    );
}

#[tokio::test]
async fn accept_key_is_computed_per_request() {
    let gw = TestGateway::start_default().await;
    // A different valid key (16 bytes: "0123456789abcdef") must give a different accept.
    let key = "MDEyMzQ1Njc4OWFiY2RlZg==";
    let request = UpgradeRequest::new(gw.addr).set("Sec-WebSocket-Key", key);
    let (response, _stream, _) = request.send(gw.addr).await;
    assert_eq!(response.status, 101, "{response:?}");
    assert_eq!(
        response.header("sec-websocket-accept"),
        Some(accept_key(key).as_str())
    );
}

#[tokio::test]
async fn subprotocol_tidings_v1_is_selected_when_offered() {
    let gw = TestGateway::start_default().await;
    for offer in ["tidings.v1", "chat, tidings.v1", "chat,tidings.v1 , other"] {
        let request = UpgradeRequest::new(gw.addr).set("Sec-WebSocket-Protocol", offer);
        let (response, _stream, _) = request.send(gw.addr).await;
        assert_eq!(response.status, 101, "offer {offer:?}: {response:?}");
        assert_eq!(
            response.header("sec-websocket-protocol"),
            Some("tidings.v1"),
            "offer {offer:?}"
        );
    }
}

#[tokio::test]
async fn unknown_subprotocols_are_not_selected() {
    let gw = TestGateway::start_default().await;
    let request = UpgradeRequest::new(gw.addr).set("Sec-WebSocket-Protocol", "chat, superchat");
    let (response, _stream, _) = request.send(gw.addr).await;
    // The protocol defaults to v1, so the upgrade succeeds, but the server must not
    // name a subprotocol the client did not offer.
    assert_eq!(response.status, 101, "{response:?}");
    assert!(
        response.header("sec-websocket-protocol").is_none(),
        "{response:?}"
    );
}

#[tokio::test]
async fn upgrade_and_connection_are_case_insensitive_token_lists() {
    let gw = TestGateway::start_default().await;
    let variants = [
        ("WebSocket", "Upgrade"),
        ("websocket", "keep-alive, Upgrade"),
        ("WEBSOCKET", "upgrade"),
        ("websocket", "Upgrade, keep-alive"),
        ("websocket", "keep-alive,UPGRADE"),
        ("h2c, websocket", "Upgrade"),
    ];
    for (upgrade, connection) in variants {
        let request = UpgradeRequest::new(gw.addr)
            .set("Upgrade", upgrade)
            .set("Connection", connection);
        let (response, stream, leftover) = request.send(gw.addr).await;
        assert_eq!(
            response.status, 101,
            "Upgrade: {upgrade} / Connection: {connection}: {response:?}"
        );
        assert_eq!(response.header("sec-websocket-accept"), Some(RFC_ACCEPT));
        drop((stream, leftover));
    }
}

#[tokio::test]
async fn a_good_handshake_leads_to_a_working_connection() {
    let gw = TestGateway::start_default().await;
    let mut raw = RawWs::connect(gw.addr).await;
    raw.send_text(r#"{"type":"ping","id":1}"#).await;
    let pong = raw.next_json().await;
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong["id"], 1);
}

#[tokio::test]
async fn non_get_is_405_method_not_allowed() {
    let gw = TestGateway::start_default().await;
    for method in ["POST", "PUT", "DELETE"] {
        let request = UpgradeRequest::new(gw.addr)
            .method(method)
            .set("Content-Length", "0");
        refused(&gw, request, 405, "method_not_allowed").await;
    }
}

#[tokio::test]
async fn missing_host_is_400_missing_host() {
    let gw = TestGateway::start_default().await;
    // Raw bytes: an HTTP/1.1 request without Host, which hyper's client won't build.
    let request = UpgradeRequest::new(gw.addr).without("Host");
    assert!(!String::from_utf8_lossy(&request.to_bytes()).contains("Host"));
    refused(&gw, request, 400, "missing_host").await;
}

#[tokio::test]
async fn upgrade_without_websocket_token_is_400_invalid_upgrade() {
    let gw = TestGateway::start_default().await;
    refused(
        &gw,
        UpgradeRequest::new(gw.addr).without("Upgrade"),
        400,
        "invalid_upgrade",
    )
    .await;
    for value in ["h2c", "websockets", "web socket", ""] {
        let request = UpgradeRequest::new(gw.addr).set("Upgrade", value);
        refused(&gw, request, 400, "invalid_upgrade").await;
    }
}

#[tokio::test]
async fn connection_without_upgrade_token_is_400_invalid_connection() {
    let gw = TestGateway::start_default().await;
    refused(
        &gw,
        UpgradeRequest::new(gw.addr).without("Connection"),
        400,
        "invalid_connection",
    )
    .await;
    for value in ["keep-alive", "upgraded", "close"] {
        let request = UpgradeRequest::new(gw.addr).set("Connection", value);
        refused(&gw, request, 400, "invalid_connection").await;
    }
}

#[tokio::test]
async fn missing_key_is_400_invalid_key() {
    let gw = TestGateway::start_default().await;
    let request = UpgradeRequest::new(gw.addr).without("Sec-WebSocket-Key");
    refused(&gw, request, 400, "invalid_key").await;
}

#[tokio::test]
async fn key_that_is_not_base64_is_400_invalid_key() {
    let gw = TestGateway::start_default().await;
    for key in [
        "not base64 at all!!!!!!=",
        "dGhlIHNhbXBsZSBub25jZQ=!",
        "????????????????????????",
    ] {
        let request = UpgradeRequest::new(gw.addr).set("Sec-WebSocket-Key", key);
        refused(&gw, request, 400, "invalid_key").await;
    }
}

#[tokio::test]
async fn key_of_the_wrong_length_is_400_invalid_key() {
    let gw = TestGateway::start_default().await;
    // Valid base64 of 15 bytes, 17 bytes, 0 bytes and 32 bytes.
    for key in [
        "MDEyMzQ1Njc4OWFiY2Rl",
        "MDEyMzQ1Njc4OWFiY2RlZmc=",
        "",
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    ] {
        let request = UpgradeRequest::new(gw.addr).set("Sec-WebSocket-Key", key);
        refused(&gw, request, 400, "invalid_key").await;
    }
}

#[tokio::test]
async fn version_other_than_13_is_426_with_supported_version() {
    let gw = TestGateway::start_default().await;
    for version in ["8", "12", "14", "abc"] {
        let request = UpgradeRequest::new(gw.addr).set("Sec-WebSocket-Version", version);
        let response = refused(&gw, request, 426, "unsupported_version").await;
        assert_eq!(
            response.header("sec-websocket-version"),
            Some("13"),
            "RFC 6455 §4.4: a 426 names the supported version ({version})"
        );
    }
}

#[tokio::test]
async fn missing_version_is_426_unsupported_version() {
    let gw = TestGateway::start_default().await;
    let request = UpgradeRequest::new(gw.addr).without("Sec-WebSocket-Version");
    let response = refused(&gw, request, 426, "unsupported_version").await;
    assert_eq!(response.header("sec-websocket-version"), Some("13"));
}

#[tokio::test]
async fn foreign_origin_is_403_origin_forbidden() {
    let config = Config::default().allowed_origins(vec!["https://good.example".to_string()]);
    let gw = TestGateway::start(config).await;
    for origin in [
        "https://evil.example",
        "https://good.example.evil",
        "http://good.example",
    ] {
        let request = UpgradeRequest::new(gw.addr).set("Origin", origin);
        refused(&gw, request, 403, "origin_forbidden").await;
    }
    let request = UpgradeRequest::new(gw.addr).set("Origin", "https://good.example");
    let (response, _stream, _) = request.send(gw.addr).await;
    assert_eq!(response.status, 101, "allowed origin: {response:?}");
}

#[tokio::test]
async fn any_origin_is_accepted_when_none_are_configured() {
    let gw = TestGateway::start_default().await;
    let request = UpgradeRequest::new(gw.addr).set("Origin", "https://anything.example");
    let (response, _stream, _) = request.send(gw.addr).await;
    assert_eq!(response.status, 101, "{response:?}");
}

#[tokio::test]
async fn at_max_connections_upgrade_is_503_over_capacity_until_one_leaves() {
    let gw = TestGateway::start(Config::default().max_connections(2)).await;
    let mut first = WsClient::connect(gw.addr).await;
    let mut second = WsClient::connect(gw.addr).await;
    // Round trips prove both are registered, not just accepted.
    first.ping(1).await;
    second.ping(2).await;

    let response = refused(&gw, UpgradeRequest::new(gw.addr), 503, "over_capacity").await;
    let retry_after = response
        .header("retry-after")
        .unwrap_or_else(|| panic!("503 without Retry-After: {response:?}"));
    assert!(
        retry_after.parse::<u64>().is_ok(),
        "Retry-After should be delay-seconds, got {retry_after:?}"
    );
    // The refused attempt must not have cost the two open connections anything.
    first.ping(3).await;
    second.ping(4).await;

    // Once one leaves, its slot is released. The release happens after the close
    // handshake, so retry a bounded number of times; each attempt is a real request.
    first.close().await;
    let mut attempts = 0;
    let accepted = within("a free slot after a client left", async {
        loop {
            attempts += 1;
            let (response, stream, _) = UpgradeRequest::new(gw.addr).send(gw.addr).await;
            match response.status {
                101 => break stream,
                503 => {
                    assert!(attempts < 10_000, "slot never released");
                    tokio::task::yield_now().await;
                }
                other => panic!("unexpected status {other}: {response:?}"),
            }
        }
    })
    .await;
    drop(accepted);
    second.ping(5).await;
}

#[tokio::test]
async fn unknown_route_is_404_not_found_and_healthz_is_ok() {
    let gw = TestGateway::start_default().await;
    http_get(gw.addr, "/nope")
        .await
        .assert_error(404, "not_found");
    let health = http_get(gw.addr, "/healthz").await;
    assert_eq!(health.status, 200);
    assert_eq!(
        health.json(),
        serde_json::json!({"status": "ok", "bus": "local"})
    );
    let ready = http_get(gw.addr, "/readyz").await;
    assert_eq!(ready.status, 200);
    assert_eq!(
        ready.json(),
        serde_json::json!({"status": "ok", "bus": "local"})
    );
}

#[tokio::test]
async fn frames_sent_with_the_handshake_are_not_lost() {
    let gw = TestGateway::start_default().await;
    // The request and the first frame in one write: the bytes after the request that
    // the HTTP layer already read must reach the WebSocket layer.
    let mut bytes = UpgradeRequest::new(gw.addr).to_bytes();
    bytes.extend(masked(true, OP_TEXT, br#"{"type":"ping","id":77}"#));
    bytes.extend(masked(true, OP_PING, b"early"));
    let mut stream = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut stream, &bytes)
        .await
        .expect("write");
    let mut buf = Vec::new();
    let response = read_response(&mut stream, &mut buf).await;
    assert_eq!(response.status, 101, "{response:?}");
    let mut raw = RawWs::from_parts(stream, buf, response);
    let pong = raw.next_json().await;
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(pong["id"], 77, "{pong}");
    let frame = raw.next_frame().await;
    assert_eq!(
        (frame.opcode, frame.payload.as_slice()),
        (OP_PONG, &b"early"[..])
    );
}

#[tokio::test]
async fn http_1_0_upgrade_is_refused() {
    let gw = TestGateway::start_default().await;
    let mut request = UpgradeRequest::new(gw.addr);
    request.version = "HTTP/1.0".into();
    let (response, _stream, _) = request.send(gw.addr).await;
    // RFC 6455 §4.1: the handshake is HTTP/1.1 or later. No code is fixed for this, but
    // it must be a JSON client error, not a 101.
    assert!(
        (400..500).contains(&response.status),
        "HTTP/1.0 upgrade got {response:?}"
    );
    assert!(response.json()["code"].is_string(), "{response:?}");
}
