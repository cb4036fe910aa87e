//! JWKS rotation: from a file and from a small HTTP server on port 0. A new `kid` is
//! accepted once the reload it triggers has loaded it; a reload that fails keeps the keys
//! in force; reloads for unknown `kid`s are rate-limited; the schedule picks up changes.
//!
//! Reloads are observed through the public behaviour (a publish with a token is accepted
//! or refused), never by sleeping for them.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tidings::{AuthConfig, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

fn publish_claims() -> serde_json::Value {
    json!({"sub": "svc", "exp": unix_now() + 3600, "publish": ["j:*"]})
}

async fn publish_token(gw: &TestGateway, token: &str) -> HttpResponse {
    http_request(
        gw.addr,
        "POST",
        "/v1/topics/j:1/events",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &format!("Bearer {token}")),
        ],
        b"1",
    )
    .await
}

/// Publishes with `token` until it is accepted; each refused try (with no cooldown)
/// triggers a reload, so this ends as soon as the gateway has loaded the key.
async fn accepted_after_reload(gw: &TestGateway, token: &str) {
    within("the new key to be accepted", async {
        loop {
            let response = publish_token(gw, token).await;
            if response.status == 202 {
                return;
            }
            response.assert_error(401, "unknown_key");
        }
    })
    .await;
}

fn jwks_config(location: String, cooldown: Duration, refresh: Duration) -> Config {
    Config::default().auth(AuthConfig {
        jwks: location,
        jwks_cooldown: cooldown,
        jwks_refresh: refresh,
        ..AuthConfig::default()
    })
}

/// Replaces `path` in one step, so a reload never reads half a document.
fn replace(path: &std::path::Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test]
async fn a_jwks_file_rotates_and_a_bad_one_keeps_the_keys() {
    let (a, b) = (ed25519_key(), p256_key());
    let file = temp_file("rotating.json", &jwks(&[a.jwk("a")]));
    let config = jwks_config(
        file.display().to_string(),
        Duration::ZERO,
        Duration::from_secs(3600),
    );
    let gw = TestGateway::start(config).await;
    let token_a = a.sign(&publish_claims(), Some("a"));
    let token_b = b.sign(&publish_claims(), Some("b"));
    assert_eq!(publish_token(&gw, &token_a).await.status, 202);
    publish_token(&gw, &token_b)
        .await
        .assert_error(401, "unknown_key");

    replace(&file, &jwks(&[b.jwk("b")]));
    accepted_after_reload(&gw, &token_b).await;
    // `a` left the set.
    publish_token(&gw, &token_a)
        .await
        .assert_error(401, "unknown_key");

    // A document that does not parse changes nothing.
    replace(&file, "{\"keys\": ");
    let token_c = b.sign(&publish_claims(), Some("c"));
    publish_token(&gw, &token_c)
        .await
        .assert_error(401, "unknown_key");
    assert_eq!(publish_token(&gw, &token_b).await.status, 202);
    // Another key of the same algorithm does not verify under `b`'s kid, and a key of
    // another family finds no key at all under it.
    let forged = p256_key().sign(&publish_claims(), Some("b"));
    publish_token(&gw, &forged)
        .await
        .assert_error(401, "invalid_token");
    let other_family = a.sign(&publish_claims(), Some("b"));
    publish_token(&gw, &other_family)
        .await
        .assert_error(401, "unknown_key");
}

#[tokio::test]
async fn the_schedule_reloads_without_an_unknown_kid() {
    let (a, b) = (ed25519_key(), ed25519_key());
    let file = temp_file("scheduled.json", &jwks(&[a.jwk("a")]));
    // A cooldown longer than the test: only the schedule can reload.
    let config = jwks_config(
        file.display().to_string(),
        Duration::from_secs(3600),
        Duration::from_secs(1),
    );
    let gw = TestGateway::start(config).await;
    let token_a = a.sign(&publish_claims(), Some("a"));
    assert_eq!(publish_token(&gw, &token_a).await.status, 202);
    // Same kid, new key: the old token keeps verifying until the scheduled reload.
    replace(&file, &jwks(&[b.jwk("a")]));
    let token_b = b.sign(&publish_claims(), Some("a"));
    within("the scheduled reload", async {
        loop {
            if publish_token(&gw, &token_b).await.status == 202 {
                return;
            }
            // Polling the public behaviour; the reload itself runs on its own timer.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    publish_token(&gw, &token_a)
        .await
        .assert_error(401, "invalid_token");
}

/// A JWKS endpoint on port 0: serves `document` (or fails with 500) and counts fetches.
struct JwksServer {
    url: String,
    document: Arc<parking_lot::Mutex<Option<String>>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(document: String) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/jwks.json", listener.local_addr().expect("addr"));
        let document = Arc::new(parking_lot::Mutex::new(Some(document)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (doc, count) = (document.clone(), fetches.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (doc, count) = (doc.clone(), count.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let current = doc.lock().clone();
                    let response = match current {
                        Some(body) => format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        ),
                        None => "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
                    };
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        JwksServer {
            url,
            document,
            fetches,
        }
    }

    fn serve(&self, document: Option<String>) {
        *self.document.lock() = document;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_jwks_url_rotates_and_an_outage_keeps_the_keys() {
    let (a, b) = (rsa_key(jsonwebtoken::Algorithm::RS256), ed25519_key());
    let server = JwksServer::start(jwks(&[a.jwk("a")])).await;
    let config = jwks_config(
        server.url.clone(),
        Duration::ZERO,
        Duration::from_secs(3600),
    );
    let gw = TestGateway::start(config).await;
    let token_a = a.sign(&publish_claims(), Some("a"));
    // The first request may arrive before the first fetch ends; it waits for it.
    accepted_after_reload(&gw, &token_a).await;
    assert!(server.fetches() >= 1);

    server.serve(Some(jwks(&[b.jwk("b")])));
    let token_b = b.sign(&publish_claims(), Some("b"));
    accepted_after_reload(&gw, &token_b).await;
    publish_token(&gw, &token_a)
        .await
        .assert_error(401, "unknown_key");

    // The identity provider fails: unknown kids stay unknown, known ones keep working.
    server.serve(None);
    let before = server.fetches();
    let token_c = b.sign(&publish_claims(), Some("c"));
    publish_token(&gw, &token_c)
        .await
        .assert_error(401, "unknown_key");
    assert!(
        server.fetches() > before,
        "an unknown kid asked for a reload"
    );
    assert_eq!(publish_token(&gw, &token_b).await.status, 202);
    gw.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_flood_of_unknown_kids_costs_one_fetch_per_cooldown() {
    let a = ed25519_key();
    let server = JwksServer::start(jwks(&[a.jwk("a")])).await;
    let config = jwks_config(
        server.url.clone(),
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    );
    let gw = TestGateway::start(config).await;
    accepted_after_reload(&gw, &a.sign(&publish_claims(), Some("a"))).await;
    let before = server.fetches();
    for i in 0..20 {
        let token = a.sign(&publish_claims(), Some(&format!("random-{i}")));
        publish_token(&gw, &token)
            .await
            .assert_error(401, "unknown_key");
    }
    // One reload for the first unknown kid (plus, at most, one asked for while the first
    // fetch was still on its way); none for the other nineteen.
    let fetched = server.fetches() - before;
    assert!(fetched <= 2, "{fetched} fetches for 20 unknown kids");
}
