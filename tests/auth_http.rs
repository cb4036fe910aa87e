//! Authentication and authorization through the HTTP endpoints: API keys and JWTs of
//! every algorithm family (keys made in the test), the refusals a token can earn, grants
//! for topics and user templates, admin endpoints, the origin policy in the default
//! mode, CORS, and the refusal to start open beyond loopback.

mod common;

use serde_json::{Value, json};
use tidings::{ApiKeyConfig, AuthConfig, Config, IssuerConfig, Secret};

use common::*;
use jsonwebtoken::Algorithm;

/// The hex SHA-256 of an API key, as `[[auth.api_keys]]` stores it.
fn sha256_hex(key: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn api_key(key: &str, publish: &[&str], admin: bool) -> ApiKeyConfig {
    ApiKeyConfig {
        name: format!("key-{key}"),
        sha256: sha256_hex(key),
        publish: publish.iter().map(|s| s.to_string()).collect(),
        admin,
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

async fn start(auth: AuthConfig) -> TestGateway {
    TestGateway::start(Config::default().auth(auth)).await
}

fn hmac_auth() -> AuthConfig {
    AuthConfig {
        hmac_secret: Secret::new(HMAC_SECRET),
        ..AuthConfig::default()
    }
}

/// Claims valid for an hour, with `extra` merged in.
fn claims(extra: Value) -> Value {
    let mut c = json!({"sub": "u1", "exp": unix_now() + 3600});
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

async fn publish_with(gw: &TestGateway, topic: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    http_request(
        gw.addr,
        "POST",
        &format!("/v1/topics/{topic}/events"),
        &all,
        b"{\"n\":1}",
    )
    .await
}

async fn poll_with(gw: &TestGateway, topic: &str, headers: &[(&str, &str)]) -> HttpResponse {
    http_request(
        gw.addr,
        "GET",
        &format!("/v1/topics/{topic}/events"),
        headers,
        b"",
    )
    .await
}

async fn publish_bearer(gw: &TestGateway, topic: &str, token: &str) -> HttpResponse {
    publish_with(gw, topic, &[("Authorization", &format!("Bearer {token}"))]).await
}

/// Asserts a 401 with `code` and an RFC 6750 challenge.
fn assert_unauthorized(response: &HttpResponse, code: &str) {
    response.assert_error(401, code);
    let challenge = response.header("www-authenticate").unwrap_or("");
    assert!(
        challenge.starts_with("Bearer realm=\"tidings\""),
        "challenge: {response:?}"
    );
}

#[tokio::test]
async fn the_default_refuses_cross_site_writes_and_nothing_else() {
    let gw = TestGateway::start_default().await;
    let addr = gw.addr.to_string();
    let cross = [("Sec-Fetch-Site", "cross-site")];
    let foreign = [("Origin", "https://evil.example")];
    for headers in [&cross[..], &foreign[..], &[("Origin", "null")][..]] {
        publish_with(&gw, "open:t", headers)
            .await
            .assert_error(403, "origin_forbidden");
        let put = http_request(
            gw.addr,
            "PUT",
            "/v1/topics/open:s/state",
            &[&[("Content-Type", "application/json")], headers].concat(),
            b"{}",
        )
        .await;
        put.assert_error(403, "origin_forbidden");
        let close = http_request(gw.addr, "POST", "/v1/topics/open:t/close", headers, b"").await;
        close.assert_error(403, "origin_forbidden");
    }
    // Same origin, a user-initiated request, and servers (no header) still publish.
    let own = format!("http://{addr}");
    for headers in [
        vec![("Origin", own.as_str()), ("Sec-Fetch-Site", "same-origin")],
        vec![("Sec-Fetch-Site", "none")],
        vec![],
    ] {
        assert_eq!(publish_with(&gw, "open:t", &headers).await.status, 202);
    }
    // Reads stay open in the default mode, from any origin.
    assert_eq!(poll_with(&gw, "open:t", &foreign).await.status, 200);
    assert_eq!(http_get(gw.addr, "/stats").await.status, 200);
}

#[tokio::test]
async fn publishing_needs_a_key_with_the_grant() {
    let gw = start(AuthConfig {
        api_keys: vec![api_key("pub-key", &["orders:*"], false)],
        ..AuthConfig::default()
    })
    .await;
    let none = publish_with(&gw, "orders:1", &[]).await;
    assert_unauthorized(&none, "unauthorized");
    assert_eq!(
        none.header("www-authenticate"),
        Some("Bearer realm=\"tidings\"")
    );
    assert_unauthorized(
        &publish_bearer(&gw, "orders:1", "wrong-key").await,
        "invalid_token",
    );
    publish_bearer(&gw, "billing:1", "pub-key")
        .await
        .assert_error(403, "forbidden");
    assert_eq!(publish_bearer(&gw, "orders:1", "pub-key").await.status, 202);
    let header = publish_with(&gw, "orders:2", &[("X-API-Key", "pub-key")]).await;
    assert_eq!(header.status, 202, "{header:?}");
    // Two credentials at once are refused (RFC 6750 §2).
    let both = publish_with(
        &gw,
        "orders:2",
        &[
            ("X-API-Key", "pub-key"),
            ("Authorization", "Bearer pub-key"),
        ],
    )
    .await;
    both.assert_error(400, "invalid_request");
    // An API key is never taken from the URL.
    let query = http_request(
        gw.addr,
        "POST",
        "/v1/topics/orders:3/events?token=pub-key",
        &[("Content-Type", "application/json")],
        b"1",
    )
    .await;
    assert_unauthorized(&query, "invalid_token");
    // State writes need the same grant.
    let put = http_request(
        gw.addr,
        "PUT",
        "/v1/topics/orders:s/state",
        &[
            ("Content-Type", "application/json"),
            ("X-API-Key", "pub-key"),
        ],
        b"{\"a\":1}",
    )
    .await;
    assert_eq!(put.status, 200, "{put:?}");
    let patch = http_request(
        gw.addr,
        "PATCH",
        "/v1/topics/other:s/state",
        &[
            ("Content-Type", "application/json-patch+json"),
            ("X-API-Key", "pub-key"),
        ],
        b"[]",
    )
    .await;
    patch.assert_error(403, "forbidden");
}

#[tokio::test]
async fn admin_endpoints_need_an_admin_key() {
    let gw = start(AuthConfig {
        api_keys: vec![
            api_key("pub-key", &["t:**"], false),
            api_key("admin-key", &[], true),
        ],
        ..AuthConfig::default()
    })
    .await;
    for path in ["/stats", "/metrics"] {
        assert_unauthorized(&http_get(gw.addr, path).await, "unauthorized");
        let publisher = http_request(gw.addr, "GET", path, &[("X-API-Key", "pub-key")], b"").await;
        publisher.assert_error(403, "forbidden");
        let admin = http_request(gw.addr, "GET", path, &[("X-API-Key", "admin-key")], b"").await;
        assert_eq!(admin.status, 200, "{path}: {admin:?}");
    }
    assert_eq!(http_get(gw.addr, "/healthz").await.status, 200);
    let close = |key: &'static str| {
        let addr = gw.addr;
        async move {
            http_request(
                addr,
                "POST",
                "/v1/topics/t:1/close",
                &[("X-API-Key", key)],
                b"",
            )
            .await
        }
    };
    close("pub-key").await.assert_error(403, "forbidden");
    assert_eq!(close("admin-key").await.status, 200);

    let open = start(AuthConfig {
        api_keys: vec![api_key("k", &[], false)],
        protect_admin: false,
        ..AuthConfig::default()
    })
    .await;
    assert_eq!(http_get(open.addr, "/stats").await.status, 200);
}

/// Publishes with a token signed by `key`, with the gateway trusting `auth`.
async fn accepts(auth: AuthConfig, token: &str) -> HttpResponse {
    let gw = start(auth).await;
    publish_bearer(&gw, "jobs:1", token).await
}

fn pem_auth(pem: &str, name: &str) -> AuthConfig {
    let file = temp_file(name, pem);
    AuthConfig {
        public_key_file: file.display().to_string(),
        ..AuthConfig::default()
    }
}

#[tokio::test]
async fn every_algorithm_family_verifies() {
    let publish = claims(json!({"publish": ["jobs:*"]}));
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let token = sign_with(
            &jsonwebtoken::EncodingKey::from_secret(HMAC_SECRET.as_bytes()).expect("key"),
            alg,
            &publish,
            None,
        );
        let response = accepts(hmac_auth(), &token).await;
        assert_eq!(response.status, 202, "{alg:?}: {response:?}");
    }
    let mut keys: Vec<TestKey> = [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
    ]
    .into_iter()
    .map(rsa_key)
    .collect();
    keys.extend([p256_key(), p384_key(), ed25519_key()]);
    for key in keys {
        let auth = pem_auth(&key.public_pem, &format!("{:?}.pem", key.alg));
        let response = accepts(auth, &key.sign(&publish, None)).await;
        assert_eq!(response.status, 202, "{:?}: {response:?}", key.alg);
    }
    // `algorithms` narrows what a key accepts.
    let rsa = rsa_key(Algorithm::PS256);
    let mut auth = pem_auth(&rsa.public_pem, "narrow.pem");
    auth.algorithms = strings(&["RS256"]);
    assert_unauthorized(
        &accepts(auth, &rsa.sign(&publish, None)).await,
        "invalid_token",
    );
}

#[tokio::test]
async fn bad_tokens_are_refused_with_their_code() {
    let rsa = rsa_key(Algorithm::RS256);
    let file = temp_file("refusals.pem", &rsa.public_pem);
    let gw = start(AuthConfig {
        hmac_secret: Secret::new(HMAC_SECRET),
        public_key_file: file.display().to_string(),
        issuer: "https://idp.example".into(),
        audience: "tidings".into(),
        leeway: 5,
        ..AuthConfig::default()
    })
    .await;
    let good = claims(json!({"iss": "https://idp.example", "aud": "tidings", "publish": ["j:*"]}));
    assert_eq!(publish_bearer(&gw, "j:1", &hs256(&good)).await.status, 202);
    assert_eq!(
        publish_bearer(&gw, "j:1", &rsa.sign(&good, None))
            .await
            .status,
        202
    );

    // A signature over other claims.
    let token = hs256(&good);
    let mut parts: Vec<&str> = token.split('.').collect();
    let other = hs256(&claims(
        json!({"iss": "https://idp.example", "aud": "tidings", "publish": ["**"]}),
    ));
    let forged_payload = other.split('.').nth(1).unwrap().to_string();
    parts[1] = &forged_payload;
    assert_unauthorized(
        &publish_bearer(&gw, "j:1", &parts.join(".")).await,
        "invalid_token",
    );

    // `alg: none` with no signature.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(serde_json::to_vec(&good).unwrap())
    );
    assert_unauthorized(&publish_bearer(&gw, "j:1", &none).await, "invalid_token");

    // HS256 "signed" with the RSA public key as the secret.
    let confused = sign_with(
        &jsonwebtoken::EncodingKey::from_secret(rsa.public_pem.as_bytes()).expect("key"),
        Algorithm::HS256,
        &good,
        None,
    );
    assert_unauthorized(
        &publish_bearer(&gw, "j:1", &confused).await,
        "invalid_token",
    );

    let now = unix_now();
    let expired = claims(json!({"iss": "https://idp.example", "aud": "tidings", "exp": now - 10}));
    assert_unauthorized(
        &publish_bearer(&gw, "j:1", &hs256(&expired)).await,
        "token_expired",
    );
    let early = claims(json!({"iss": "https://idp.example", "aud": "tidings", "nbf": now + 60}));
    assert_unauthorized(
        &publish_bearer(&gw, "j:1", &hs256(&early)).await,
        "token_not_yet_valid",
    );
    let no_exp = json!({"iss": "https://idp.example", "aud": "tidings", "sub": "u"});
    assert_unauthorized(
        &publish_bearer(&gw, "j:1", &hs256(&no_exp)).await,
        "invalid_token",
    );
    let wrong_iss = claims(json!({"iss": "https://other.example", "aud": "tidings"}));
    assert_unauthorized(
        &publish_bearer(&gw, "j:1", &hs256(&wrong_iss)).await,
        "invalid_token",
    );
    let wrong_aud = claims(json!({"iss": "https://idp.example", "aud": "someone-else"}));
    assert_unauthorized(
        &publish_bearer(&gw, "j:1", &hs256(&wrong_aud)).await,
        "invalid_token",
    );
    for malformed in [
        "a.b.c",
        "eyJhbGciOiJIUzI1NiJ9.e30.",
        "x.y.z.w",
        "....",
        "not-a-token",
    ] {
        let response = publish_bearer(&gw, "j:1", malformed).await;
        assert_eq!(response.status, 401, "{malformed}: {response:?}");
    }
    // A valid token without the grant.
    let readonly = claims(json!({"iss": "https://idp.example", "aud": "tidings"}));
    publish_bearer(&gw, "j:1", &hs256(&readonly))
        .await
        .assert_error(403, "forbidden");
    // Nothing was said about any token in a body.
    let body =
        String::from_utf8_lossy(&publish_bearer(&gw, "j:1", &confused).await.body).into_owned();
    assert!(!body.contains(&confused[..20]), "{body}");
}

#[tokio::test]
async fn keys_are_looked_up_by_issuer_and_kid() {
    let a = ed25519_key();
    let b = ed25519_key();
    let jwks_a = temp_file("issuer-a.json", &jwks(&[a.jwk("k1")]));
    let jwks_b = temp_file("issuer-b.json", &jwks(&[b.jwk("k1")]));
    let gw = start(AuthConfig {
        jwks: jwks_a.display().to_string(),
        issuer: "https://a.example".into(),
        issuers: vec![IssuerConfig {
            issuer: "https://b.example".into(),
            jwks: jwks_b.display().to_string(),
            ..IssuerConfig::default()
        }],
        ..AuthConfig::default()
    })
    .await;
    let from = |iss: &str| claims(json!({"iss": iss, "publish": ["x"]}));
    assert_eq!(
        publish_bearer(&gw, "x", &a.sign(&from("https://a.example"), Some("k1")))
            .await
            .status,
        202
    );
    assert_eq!(
        publish_bearer(&gw, "x", &b.sign(&from("https://b.example"), Some("k1")))
            .await
            .status,
        202
    );
    // Issuer A's key does not verify a token claiming issuer B, though the kid matches.
    let crossed = a.sign(&from("https://b.example"), Some("k1"));
    assert_unauthorized(&publish_bearer(&gw, "x", &crossed).await, "invalid_token");
    let unknown_iss = a.sign(&from("https://c.example"), Some("k1"));
    assert_unauthorized(
        &publish_bearer(&gw, "x", &unknown_iss).await,
        "invalid_token",
    );
    let unknown_kid = a.sign(&from("https://a.example"), Some("k2"));
    assert_unauthorized(&publish_bearer(&gw, "x", &unknown_kid).await, "unknown_key");
}

#[tokio::test]
async fn subscribe_grants_cover_reads_with_tokens_from_header_or_query() {
    let gw = start(AuthConfig {
        public: strings(&["news", "status:*"]),
        user_topics: strings(&["user:{sub}:**"]),
        allow_anonymous: true,
        ..hmac_auth()
    })
    .await;
    // Anonymous: public only.
    assert_eq!(poll_with(&gw, "news", &[]).await.status, 200);
    assert_eq!(poll_with(&gw, "status:eu", &[]).await.status, 200);
    assert_unauthorized(&poll_with(&gw, "private", &[]).await, "unauthorized");
    let token = hs256(&claims(
        json!({"sub": "u1", "topics": ["runs:*", "team:a"]}),
    ));
    let bearer = format!("Bearer {token}");
    for topic in ["news", "runs:7", "team:a", "user:u1:inbox", "user:u1:a:b"] {
        let response = poll_with(&gw, topic, &[("Authorization", &bearer)]).await;
        assert_eq!(response.status, 200, "{topic}: {response:?}");
        let query = http_get(gw.addr, &format!("/v1/topics/{topic}/events?token={token}")).await;
        assert_eq!(query.status, 200, "{topic} via ?token: {query:?}");
    }
    for topic in ["runs:7:log", "team:b", "user:u2:inbox", "private"] {
        poll_with(&gw, topic, &[("Authorization", &bearer)])
            .await
            .assert_error(403, "forbidden");
    }
    // A hostile subject gets no user topics at all.
    for sub in ["*", "**", "u1:inbox", "a b"] {
        let hostile = hs256(&claims(json!({"sub": sub})));
        let bearer = format!("Bearer {hostile}");
        for topic in ["user:u1:inbox", "user:x:y"] {
            let response = poll_with(&gw, topic, &[("Authorization", &bearer)]).await;
            response.assert_error(403, "forbidden");
        }
    }
    // State reads take the same check.
    let state = http_request(gw.addr, "GET", "/v1/topics/private/state", &[], b"").await;
    assert_unauthorized(&state, "unauthorized");
    // A claim that is not a list of topics and patterns spoils the token.
    let bad = hs256(&claims(json!({"topics": [42]})));
    let response = poll_with(&gw, "news", &[("Authorization", &format!("Bearer {bad}"))]).await;
    assert_unauthorized(&response, "invalid_token");
}

#[tokio::test]
async fn without_allow_anonymous_every_read_needs_a_token() {
    let gw = start(AuthConfig {
        public: strings(&["news"]),
        ..hmac_auth()
    })
    .await;
    assert_unauthorized(&poll_with(&gw, "news", &[]).await, "unauthorized");
    let token = hs256(&claims(json!({})));
    let ok = poll_with(
        &gw,
        "news",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
}

#[tokio::test]
async fn cors_answers_listed_origins_only() {
    let app = "https://app.example";
    let gw = TestGateway::start(
        Config::default()
            .allowed_origins(vec![app.to_string()])
            .auth(AuthConfig {
                api_keys: vec![api_key("k", &["t:*"], false)],
                ..AuthConfig::default()
            }),
    )
    .await;
    let preflight = http_request(
        gw.addr,
        "OPTIONS",
        "/v1/topics/t:1/events",
        &[
            ("Origin", app),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization, content-type",
            ),
        ],
        b"",
    )
    .await;
    assert_eq!(preflight.status, 204, "{preflight:?}");
    assert_eq!(preflight.header("access-control-allow-origin"), Some(app));
    let allowed = preflight
        .header("access-control-allow-headers")
        .unwrap_or("");
    assert!(
        allowed.contains("Authorization") && allowed.contains("Last-Event-ID"),
        "{allowed}"
    );
    let evil = http_request(
        gw.addr,
        "OPTIONS",
        "/v1/topics/t:1/events",
        &[
            ("Origin", "https://evil.example"),
            ("Access-Control-Request-Method", "POST"),
        ],
        b"",
    )
    .await;
    evil.assert_error(403, "origin_forbidden");
    // The listed origin's page may publish with its key, cross-site, and read the answer.
    let published = publish_with(
        &gw,
        "t:1",
        &[
            ("Origin", app),
            ("Sec-Fetch-Site", "cross-site"),
            ("X-API-Key", "k"),
        ],
    )
    .await;
    assert_eq!(published.status, 202, "{published:?}");
    assert_eq!(published.header("access-control-allow-origin"), Some(app));
    assert_eq!(published.header("vary"), Some("Origin"));
    let foreign = poll_with(
        &gw,
        "t:1",
        &[("Origin", "https://evil.example"), ("X-API-Key", "k")],
    )
    .await;
    foreign.assert_error(403, "origin_forbidden");
    assert_eq!(foreign.header("access-control-allow-origin"), None);
}

#[tokio::test]
async fn an_open_gateway_does_not_start_beyond_loopback() {
    let open = Config::load(
        None,
        vec![("TIDINGS_LISTEN".into(), "0.0.0.0:0".into())],
        &[],
    );
    let text = open.unwrap_err().to_string();
    assert!(
        text.contains("not a loopback address") && text.contains("allow_anonymous"),
        "{text}"
    );
    let explicit = vec![
        ("TIDINGS_LISTEN".to_string(), "0.0.0.0:0".to_string()),
        (
            "TIDINGS_AUTH_ALLOW_ANONYMOUS".to_string(),
            "true".to_string(),
        ),
    ];
    assert!(Config::load(None, explicit, &[]).is_ok());
    let secret = vec![
        ("TIDINGS_LISTEN".to_string(), "0.0.0.0:0".to_string()),
        (
            "TIDINGS_AUTH_HMAC_SECRET".to_string(),
            HMAC_SECRET.to_string(),
        ),
    ];
    let config = Config::load(None, secret, &[]).expect("authenticated beyond loopback");
    assert_eq!(config.auth.hmac_secret.expose(), HMAC_SECRET);
    assert!(!format!("{config:?}").contains(HMAC_SECRET));
    // A short secret is refused, and the error does not show it.
    let short = vec![(
        "TIDINGS_AUTH_HMAC_SECRET".to_string(),
        "tooshort".to_string(),
    )];
    let text = Config::load(None, short, &[]).unwrap_err().to_string();
    assert!(
        text.contains("at least 32 bytes") && !text.contains("tooshort"),
        "{text}"
    );
    assert!(
        Config::load(None, Vec::new(), &[]).is_ok(),
        "loopback stays open by default"
    );

    // Embedders binding their own listener get the same refusal from `serve`.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let served = tidings::Gateway::new(Config::default())
        .serve(listener, async {})
        .await;
    let e = served.expect_err("serve refuses");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
}
