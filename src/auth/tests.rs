//! `Auth` on a virtual clock: verification, grants and their sharing, API keys, refresh,
//! the WebSocket token sources, and a proptest that no input makes verification panic.

use super::*;
use crate::auth::keys::digest_hex;
use jsonwebtoken::{EncodingKey, Header};
use proptest::prelude::*;
use serde_json::json;

const SECRET: &str = "unit-test-secret-0123456789abcdef-0123";
const NOW: u64 = 1_700_000_000;

fn auth(config: AuthConfig) -> Auth {
    Auth::from_config(&config).expect("valid auth config")
}

fn hmac(extra: impl FnOnce(&mut AuthConfig)) -> Auth {
    let mut config = AuthConfig {
        hmac_secret: Secret::new(SECRET),
        ..AuthConfig::default()
    };
    extra(&mut config);
    auth(config)
}

fn sign(claims: &Value) -> String {
    let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("key");
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).expect("sign")
}

fn presented(token: &str, source: Source) -> Presented {
    Presented {
        credential: Credential::new(token),
        source,
    }
}

#[test]
fn identities_are_small_and_share_their_grants() {
    assert_eq!(std::mem::size_of::<Identity>(), 56);
    let auth = hmac(|c| c.public = vec!["news".into()]);
    let token = sign(&json!({"sub": "a", "exp": NOW + 60, "topics": ["x:*", "y"]}));
    let first = auth.verify(&token, NOW).unwrap();
    let ids: Vec<Identity> = (0..10_000)
        .map(|_| auth.verify(&token, NOW).unwrap())
        .collect();
    assert!(
        ids.iter()
            .all(|id| Arc::ptr_eq(&id.subscribe, &first.subscribe))
    );
    // The same grants in another order, from another subject, share too.
    let other = sign(&json!({"sub": "b", "exp": NOW + 60, "topics": ["y", "x:*", "news"]}));
    let other = auth.verify(&other, NOW).unwrap();
    assert!(Arc::ptr_eq(&other.subscribe, &first.subscribe));
    assert!(first.subscribe.allows_topic("news") && first.subscribe.allows_topic("x:1"));
    assert_eq!(first.subject.as_deref(), Some("a"));
    assert_eq!(
        first.expires,
        Some(NOW + 60 + 30),
        "exp plus the default leeway"
    );
}

#[test]
fn the_clock_is_an_argument() {
    let auth = hmac(|c| c.leeway = 0);
    let token = sign(&json!({"exp": NOW + 10, "nbf": NOW - 10}));
    assert!(auth.verify(&token, NOW).is_ok());
    assert_eq!(
        auth.verify(&token, NOW + 10).unwrap_err(),
        AuthError::Expired
    );
    assert_eq!(
        auth.verify(&token, NOW - 11).unwrap_err(),
        AuthError::NotYetValid
    );
}

#[test]
fn user_templates_expand_the_subject_only_when_it_is_a_segment() {
    let auth = hmac(|c| c.user_topics = vec!["user:{sub}:**".into(), "inbox-{sub}".into()]);
    let id = auth
        .verify(&sign(&json!({"sub": "u7", "exp": NOW + 60})), NOW)
        .unwrap();
    assert!(id.subscribe.allows_topic("user:u7:a") && id.subscribe.allows_topic("inbox-u7"));
    assert!(
        id.subscribe
            .allows_pattern(&crate::topic::Pattern::parse("user:u7:*").unwrap())
    );
    assert!(!id.subscribe.allows_topic("user:u8:a"));
    for hostile in ["*", "u7:x", "**", "a b", ""] {
        let id = auth
            .verify(&sign(&json!({"sub": hostile, "exp": NOW + 60})), NOW)
            .unwrap();
        assert!(
            id.subscribe.is_empty(),
            "{hostile:?} got {:?}",
            id.subscribe
        );
    }
    assert_eq!(
        auth.verify(&sign(&json!({"sub": 5, "exp": NOW + 60})), NOW)
            .unwrap_err(),
        AuthError::BadClaim("sub")
    );
}

#[test]
fn claim_names_are_configurable() {
    let auth = hmac(|c| {
        c.topics_claim = "tidings/sub".into();
        c.publish_claim = "tidings/pub".into();
    });
    let token =
        sign(&json!({"exp": NOW + 60, "tidings/sub": ["a"], "tidings/pub": "b", "topics": ["c"]}));
    let id = auth.verify(&token, NOW).unwrap();
    assert!(id.subscribe.allows_topic("a") && !id.subscribe.allows_topic("c"));
    assert!(id.publish.allows_topic("b") && !id.publish.allows_topic("a"));
    let many: Vec<String> = (0..=MAX_CLAIM_ENTRIES).map(|i| format!("t{i}")).collect();
    let token = sign(&json!({"exp": NOW + 60, "tidings/sub": many}));
    assert_eq!(
        auth.verify(&token, NOW).unwrap_err(),
        AuthError::BadClaim("topics")
    );
}

#[test]
fn credentials_by_source() {
    let auth = hmac(|c| {
        c.api_keys = vec![ApiKeyConfig {
            name: "backend".into(),
            sha256: digest_hex("k-1"),
            publish: vec!["orders:*".into()],
            admin: true,
        }];
        c.public = vec!["news".into()];
        c.allow_anonymous = true;
    });
    let key = auth
        .authenticate(Some(&presented("k-1", Source::ApiKeyHeader)), NOW)
        .unwrap();
    assert!(key.admin && key.publish.allows_topic("orders:1") && key.expires.is_none());
    assert!(key.subscribe.allows_topic("orders:1") && key.subscribe.allows_topic("news"));
    assert_eq!(
        auth.authenticate(Some(&presented("k-1", Source::Query)), NOW)
            .unwrap_err(),
        AuthError::Malformed,
        "an API key never comes from the URL"
    );
    let anonymous = auth.authenticate(None, NOW).unwrap();
    assert!(anonymous.subscribe.allows_topic("news") && anonymous.publish.is_empty());
    assert!(auth.allows_anonymous());
    let token = sign(&json!({"exp": NOW + 60}));
    assert!(
        auth.authenticate(Some(&presented(&token, Source::Subprotocol)), NOW)
            .is_ok()
    );
    // Off: everything is open and credentials are not looked at.
    let open = auth_default();
    let id = open
        .authenticate(Some(&presented("junk", Source::Bearer)), NOW)
        .unwrap();
    assert!(id.admin && id.publish.allows_topic("any") && !open.protects_admin());
}

fn auth_default() -> Auth {
    auth(AuthConfig::default())
}

#[test]
fn the_websocket_head_gives_the_token_and_the_subprotocol() {
    let auth = hmac(|_| {});
    let token = sign(&json!({"sub": "s", "exp": NOW + 60}));
    let mut headers = http::HeaderMap::new();
    let offer = format!("tidings.v1, {}{token}", token::TOKEN_SUBPROTOCOL_PREFIX);
    headers.insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        http::HeaderValue::from_str(&offer).unwrap(),
    );
    let uri: http::Uri = "/ws".parse().unwrap();
    let (presented, protocol) = token::from_upgrade(&headers, &uri).unwrap();
    assert_eq!(protocol, Some("tidings.v1"));
    let id = auth.authenticate(presented.as_ref(), NOW).unwrap();
    assert_eq!(id.subject.as_deref(), Some("s"));
    assert_eq!(auth.token_expiring(), Duration::from_secs(60));
    assert_eq!(TOKEN_EXPIRED_CLOSE_CODE, 4001);
    assert_eq!(TOKEN_EXPIRED_REASON, AuthError::Expired.code());
}

#[test]
fn refresh_keeps_the_subject() {
    let auth = hmac(|_| {});
    let first = auth
        .verify(&sign(&json!({"sub": "s", "exp": NOW + 60})), NOW)
        .unwrap();
    let later = sign(&json!({"sub": "s", "exp": NOW + 3600}));
    let renewed = auth.refresh(&first, &later, NOW + 50).unwrap();
    assert_eq!(renewed.expires, Some(NOW + 3600 + 30));
    let other = sign(&json!({"sub": "t", "exp": NOW + 3600}));
    assert_eq!(
        auth.refresh(&first, &other, NOW).unwrap_err(),
        AuthError::SubjectChanged
    );
    let expired = sign(&json!({"sub": "s", "exp": NOW - 100}));
    assert_eq!(
        auth.refresh(&first, &expired, NOW).unwrap_err(),
        AuthError::Expired
    );
}

#[test]
fn configuration_refusals_name_the_key() {
    let refused = |config: AuthConfig| Auth::from_config(&config).unwrap_err().to_string();
    let short = refused(AuthConfig {
        hmac_secret: Secret::new("short"),
        ..AuthConfig::default()
    });
    assert!(
        short.contains("hmac_secret") && !short.contains("short\""),
        "{short}"
    );
    let missing = refused(AuthConfig {
        public_key_file: "/nonexistent/key.pem".into(),
        ..AuthConfig::default()
    });
    assert!(missing.contains("public_key_file"), "{missing}");
    let template = refused(AuthConfig {
        user_topics: vec!["user:*".into()],
        ..AuthConfig::default()
    });
    assert!(template.contains("user_topics"), "{template}");
    let public = refused(AuthConfig {
        public: vec!["a::b".into()],
        ..AuthConfig::default()
    });
    assert!(public.contains("public"), "{public}");
    let alg = refused(AuthConfig {
        algorithms: vec!["none".into()],
        ..AuthConfig::default()
    });
    assert!(alg.contains("algorithms"), "{alg}");
    let jwks = refused(AuthConfig {
        jwks: "http://idp.example/jwks".into(),
        ..AuthConfig::default()
    });
    assert!(jwks.contains("https"), "{jwks}");
}

proptest! {
    /// Whatever arrives as a token, verification answers without panicking, and never
    /// accepts something it did not sign.
    #[test]
    fn arbitrary_tokens_are_refused(token in "\\PC{0,200}") {
        let auth = hmac(|_| {});
        prop_assert!(auth.verify(&token, NOW).is_err());
    }

    /// Three base64url parts of arbitrary bytes: still refused, no panic.
    #[test]
    fn arbitrary_jwt_shapes_are_refused(
        header in prop::collection::vec(any::<u8>(), 0..64),
        payload in prop::collection::vec(any::<u8>(), 0..128),
        signature in prop::collection::vec(any::<u8>(), 0..48),
    ) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let token = format!("{}.{}.{}", b64.encode(header), b64.encode(payload), b64.encode(signature));
        let auth = hmac(|_| {});
        prop_assert!(auth.verify(&token, NOW).is_err());
    }

    /// Signed claims of arbitrary shape: accepted only with a valid `exp` in the future,
    /// and the grants are never wider than what the claim lists.
    #[test]
    fn arbitrary_signed_claims(
        exp in prop_oneof![Just(json!(NOW + 60)), Just(json!(NOW - 60)), Just(json!("soon")), Just(json!(null))],
        topics in prop::collection::vec("[a-c*:]{0,8}", 0..4),
        sub in "[a-z*:]{0,6}",
    ) {
        let auth = hmac(|c| c.user_topics = vec!["user:{sub}".into()]);
        let claims = json!({"exp": exp, "topics": topics, "sub": sub});
        match auth.verify(&sign(&claims), NOW) {
            Ok(id) => {
                prop_assert_eq!(&exp, &json!(NOW + 60));
                for t in ["zzz", "a:b", "user:x", "c:c:c", "user:ab"] {
                    let listed = topics.iter().any(|e| {
                        e == t || crate::topic::Pattern::parse(e).is_ok_and(|p| p.matches(t))
                    });
                    let own = t.strip_prefix("user:") == Some(sub.as_str());
                    prop_assert_eq!(id.subscribe.allows_topic(t), listed || own, "{}", t);
                }
            }
            Err(e) => prop_assert!(e.status().is_client_error()),
        }
    }
}
