//! Authentication on the WebSocket and SSE: the token from the query or the subprotocol,
//! checked before the upgrade; grants checked per subscription; `token_expiring`,
//! `refresh`, and the 4001 close at expiry; SSE streams with grants and expiry.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tidings::{AuthConfig, Config, Secret};

fn auth() -> AuthConfig {
    AuthConfig {
        hmac_secret: Secret::new(HMAC_SECRET),
        leeway: 0,
        user_topics: vec!["user:{sub}:**".to_string()],
        token_expiring: Duration::from_secs(1),
        ..AuthConfig::default()
    }
}

fn token(sub: &str, topics: &[&str], ttl: u64) -> String {
    hs256(&json!({"sub": sub, "exp": unix_now() + ttl, "topics": topics}))
}

async fn start(config: Config) -> TestGateway {
    TestGateway::start(config.auth(auth())).await
}

#[tokio::test]
async fn an_upgrade_needs_a_valid_token_before_the_101() {
    let gw = start(Config::default()).await;
    let (missing, _, _) = UpgradeRequest::new(gw.addr).send(gw.addr).await;
    missing.assert_error(401, "unauthorized");
    assert!(
        missing
            .header("www-authenticate")
            .is_some_and(|h| h.starts_with("Bearer"))
    );
    let mut bad = UpgradeRequest::new(gw.addr);
    bad.path = "/ws?token=not.a.jwt".into();
    let (refused, _, _) = bad.send(gw.addr).await;
    assert_eq!(refused.status, 401, "{refused:?}");
    let expired = hs256(&json!({"sub": "u1", "exp": unix_now() - 10}));
    let mut late = UpgradeRequest::new(gw.addr);
    late.path = format!("/ws?token={expired}");
    let (refused, _, _) = late.send(gw.addr).await;
    refused.assert_error(401, "token_expired");
    // Each bad token is refused before the upgrade, with its code.
    let now = unix_now();
    let good = json!({"sub": "u1", "exp": now + 3600, "topics": ["t"]});
    let valid = hs256(&good);
    let mut tampered: Vec<&str> = valid.split('.').collect();
    let other = hs256(&json!({"sub": "root", "exp": now + 3600, "topics": ["**"]}));
    let forged = other.split('.').nth(1).expect("payload").to_string();
    tampered[1] = &forged;
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(good.to_string())
    );
    let early = hs256(&json!({"sub": "u1", "exp": now + 3600, "nbf": now + 600}));
    for (token, code) in [
        (tampered.join("."), "invalid_token"),
        (none, "invalid_token"),
        (early, "token_not_yet_valid"),
    ] {
        let mut request = UpgradeRequest::new(gw.addr);
        request.path = format!("/ws?token={token}");
        let (refused, _, _) = request.send(gw.addr).await;
        refused.assert_error(401, code);
    }
    // The `Authorization` header works as well (for clients that can set it).
    let (accepted, _, _) = UpgradeRequest::new(gw.addr)
        .set("Authorization", &format!("Bearer {valid}"))
        .send(gw.addr)
        .await;
    assert_eq!(accepted.status, 101, "{accepted:?}");
    gw.stats_until("the one accepted connection", |s| s.connections_opened == 1)
        .await;
}

#[tokio::test]
async fn the_token_may_come_in_the_subprotocol_and_is_never_echoed() {
    let gw = start(Config::default()).await;
    let jwt = token("u1", &["runs:1"], 3600);
    let offer = format!("tidings.v1, tidings.token.{jwt}");
    let (response, _, _) = UpgradeRequest::new(gw.addr)
        .set("Sec-WebSocket-Protocol", &offer)
        .send(gw.addr)
        .await;
    assert_eq!(response.status, 101, "{response:?}");
    assert_eq!(
        response.header("sec-websocket-protocol"),
        Some("tidings.v1")
    );
}

#[tokio::test]
async fn subscriptions_are_checked_against_the_grants() {
    let gw = start(Config::default()).await;
    let jwt = token("alice", &["runs:1", "jobs:*"], 3600);
    let mut ws = connect_path(gw.addr, &format!("/ws?token={jwt}")).await;
    ws.subscribe(&["runs:1"], &[], 1).await;
    ws.subscribe(&[], &["jobs:*"], 2).await;
    ws.subscribe(&["user:alice:inbox"], &[], 3).await;
    for (topics, patterns) in [
        (vec!["runs:2"], vec![]),
        (vec![], vec!["jobs:**"]),
        (vec!["user:bob:inbox"], vec![]),
    ] {
        ws.send_json(
            &json!({"type": "subscribe", "topics": topics, "patterns": patterns, "id": 9}),
        )
        .await;
        let error = ws.expect_error("forbidden").await;
        assert_eq!(error["id"], 9, "{error}");
    }
    // Refused subscriptions leave the connection up and the granted ones working.
    publish_ok_as_admin(&gw, "runs:1").await;
    let (topic, offset, _) = ws.next_event().await;
    assert_eq!((topic.as_str(), offset), ("runs:1", 1));
}

/// Reads until the server's close frame: its code and reason.
async fn close_of(ws: &mut WsClient) -> (u16, String) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match within("the close", ws.ws.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (frame.code.into(), frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => panic!("no close code"),
            Some(Ok(_)) => {}
        }
    }
}

/// Reads messages until one of `kind`, skipping pings.
async fn until_type(ws: &mut WsClient, kind: &str) -> Value {
    loop {
        let message = ws.next_json().await;
        if message["type"] == kind {
            return message;
        }
        assert_eq!(message["type"], "ping", "unexpected {message}");
    }
}

#[tokio::test]
async fn an_unrefreshed_token_is_warned_then_closed_with_4001() {
    let gw = start(Config::default()).await;
    let jwt = token("u1", &["t"], 2);
    let mut ws = connect_path(gw.addr, &format!("/ws?token={jwt}")).await;
    let warning = until_type(&mut ws, "token_expiring").await;
    assert!(warning["expires"].as_u64().is_some(), "{warning}");
    let (code, reason) = close_of(&mut ws).await;
    assert_eq!(code, 4001);
    assert_eq!(reason, "token_expired");
    gw.stats_until("the close to count", |s| {
        s.connections_closed.token_expired == 1
    })
    .await;
}

#[tokio::test]
async fn a_refresh_keeps_the_connection_past_the_old_expiry() {
    let config = Config::default()
        .ping_interval(Duration::from_millis(200))
        .json_ping(true);
    let gw = start(config).await;
    let jwt = token("u1", &["t"], 2);
    let mut ws = connect_path(gw.addr, &format!("/ws?token={jwt}")).await;
    let warning = until_type(&mut ws, "token_expiring").await;
    let old_expiry = warning["expires"].as_u64().expect("expires");
    // Another subject's token is refused; the connection stays.
    let other = token("mallory", &["t"], 3600);
    ws.send_json(&json!({"type": "refresh", "token": other, "id": 1}))
        .await;
    let refused = until_type(&mut ws, "error").await;
    assert_eq!(
        (&refused["code"], &refused["id"]),
        (&json!("invalid_token"), &json!(1))
    );
    let renewed = token("u1", &["t"], 3600);
    ws.send_json(&json!({"type": "refresh", "token": renewed, "id": 2}))
        .await;
    let refreshed = until_type(&mut ws, "refreshed").await;
    assert_eq!(refreshed["id"], 2);
    assert!(refreshed["expires"].as_u64() > Some(old_expiry));
    // The gateway's own pings are the clock: wait for one stamped well past the old expiry.
    loop {
        let ping = until_type(&mut ws, "ping").await;
        if ping["ts"].as_u64().expect("ts") > (old_expiry + 1) * 1000 {
            break;
        }
    }
    ws.ping(7).await;
}

#[tokio::test]
async fn sse_streams_are_authenticated_and_end_at_expiry() {
    let gw = start(Config::default()).await;
    SseClient::open_any(gw.addr, "/v1/topics/t/sse", &[])
        .await
        .head
        .assert_error(401, "unauthorized");
    let narrow = token("u1", &["other"], 3600);
    SseClient::open_any(gw.addr, &format!("/v1/topics/t/sse?token={narrow}"), &[])
        .await
        .head
        .assert_error(403, "forbidden");
    let patterns = token("u1", &["p:*"], 3600);
    SseClient::open_any(
        gw.addr,
        &format!("/v1/sse?patterns=p:**&token={patterns}"),
        &[],
    )
    .await
    .head
    .assert_error(403, "forbidden");
    let bearer = format!("Bearer {}", token("u1", &["t"], 2));
    let mut sse = SseClient::open(gw.addr, "/v1/topics/t/sse", &[("Authorization", &bearer)]).await;
    publish_ok_as_admin(&gw, "t").await;
    assert_eq!(sse.next_events(1).await.len(), 1);
    let close = sse.until_close().await;
    assert_eq!(close["code"], 4001, "{close}");
    assert_eq!(close["reason"], "token_expired");
}

/// With auth on, publishing needs a grant: a JWT with a `publish` claim.
async fn publish_ok_as_admin(gw: &TestGateway, topic: &str) {
    let publisher = hs256(&json!({"sub": "svc", "exp": unix_now() + 3600, "publish": [topic]}));
    let response = http_request(
        gw.addr,
        "POST",
        &format!("/v1/topics/{topic}/events"),
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &format!("Bearer {publisher}")),
        ],
        b"{}",
    )
    .await;
    assert_eq!(response.status, 202, "{response:?}");
}
