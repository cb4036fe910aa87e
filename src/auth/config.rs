//! The `[auth]` section of the configuration.
//!
//! With nothing set (the default) the gateway authenticates no one and everyone may do
//! everything, which [`crate::Config::load`] accepts only on a loopback address unless
//! `allow_anonymous = true`. Setting any key source (`hmac_secret`, `public_key_file`,
//! `jwks`, an `[[auth.issuers]]` entry) or an `[[auth.api_keys]]` entry turns
//! authentication on; docs/SECURITY.md describes each key.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Authentication and authorization settings (`[auth]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Shared secret for HS256/384/512 tokens, at least 32 bytes. Never shown in `Debug`
    /// output or errors.
    pub hmac_secret: Secret,
    /// A PEM public key (RSA, EC P-256/P-384 or Ed25519) that verifies RS*/PS*, ES* or
    /// EdDSA tokens. Read at startup.
    pub public_key_file: String,
    /// A JWKS document: a file path or an `https://` URL (`http://` only on loopback).
    /// Reloaded every `jwks_refresh`, and when a token names a `kid` it does not hold (at
    /// most once per `jwks_cooldown`); the keys in force stay until a new set has loaded.
    pub jwks: String,
    /// How often the JWKS is reloaded. Shorter picks up rotations sooner at one fetch per
    /// interval; an unknown `kid` triggers a reload anyway.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: Duration,
    /// Least time between two reloads triggered by an unknown `kid`, so a flood of tokens
    /// with random `kid`s costs the identity provider one fetch per cooldown.
    #[serde(with = "humantime_serde")]
    pub jwks_cooldown: Duration,
    /// The algorithms accepted (`"HS256"`, `"RS256"`, `"PS256"`, `"ES256"`, `"EdDSA"`, ...).
    /// Empty accepts every algorithm of each configured key's own family. A key is never
    /// used with another family's algorithm, whatever the token's header says.
    pub algorithms: Vec<String>,
    /// The `iss` the keys above belong to; tokens must carry it. Empty: `iss` is not
    /// checked for these keys.
    pub issuer: String,
    /// The `aud` tokens must include. Empty: `aud` is not checked.
    pub audience: String,
    /// Seconds of clock skew allowed on `exp` and `nbf`. A token is accepted until
    /// `exp + leeway`, and a connection ends then.
    pub leeway: u64,
    /// Topics and patterns anyone may subscribe to (anonymous connections too, when
    /// `allow_anonymous`).
    pub public: Vec<String>,
    /// Templates of topics and patterns each subject may subscribe to, `{sub}` standing
    /// for the token's `sub` (e.g. `"user:{sub}:**"`). A `sub` that is not a valid topic
    /// segment (`[A-Za-z0-9_.-]`, 1-64 bytes) gets none of them.
    pub user_topics: Vec<String>,
    /// With authentication configured: let clients without credentials subscribe to
    /// `public`. With none configured: accept listening beyond loopback, open to all.
    pub allow_anonymous: bool,
    /// The JWT claim listing the topics and patterns a token may subscribe to.
    pub topics_claim: String,
    /// The JWT claim listing the topics and patterns a token may publish to (events,
    /// state `PUT`/`PATCH`).
    pub publish_claim: String,
    /// With authentication configured, `/stats` and `/metrics` need an admin API key.
    pub protect_admin: bool,
    /// How long before a token expires a WebSocket is told (`token_expiring`), so it can
    /// send `refresh` in time.
    #[serde(with = "humantime_serde")]
    pub token_expiring: Duration,
    /// Further issuers, each with its own keys. Keys are looked up by issuer and `kid`,
    /// so one issuer's key never verifies another's token.
    pub issuers: Vec<IssuerConfig>,
    /// API keys for publishers and operators.
    pub api_keys: Vec<ApiKeyConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hmac_secret: Secret::default(),
            public_key_file: String::new(),
            jwks: String::new(),
            jwks_refresh: Duration::from_secs(300),
            jwks_cooldown: Duration::from_secs(10),
            algorithms: Vec::new(),
            issuer: String::new(),
            audience: String::new(),
            leeway: 30,
            public: Vec::new(),
            user_topics: Vec::new(),
            allow_anonymous: false,
            topics_claim: "topics".to_string(),
            publish_claim: "publish".to_string(),
            protect_admin: true,
            token_expiring: Duration::from_secs(60),
            issuers: Vec::new(),
            api_keys: Vec::new(),
        }
    }
}

impl AuthConfig {
    /// Whether any JWT key source is configured.
    pub fn has_token_keys(&self) -> bool {
        !self.hmac_secret.is_empty()
            || !self.public_key_file.is_empty()
            || !self.jwks.is_empty()
            || !self.issuers.is_empty()
    }

    /// Whether authentication is on: a JWT key source or an API key.
    pub fn is_enabled(&self) -> bool {
        self.has_token_keys() || !self.api_keys.is_empty()
    }
}

/// One more issuer of tokens (`[[auth.issuers]]`), with its own keys.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IssuerConfig {
    /// The `iss` its tokens carry (required).
    pub issuer: String,
    /// Its HS* secret, as `auth.hmac_secret`.
    pub hmac_secret: Secret,
    /// Its PEM public key, as `auth.public_key_file`.
    pub public_key_file: String,
    /// Its JWKS, as `auth.jwks`.
    pub jwks: String,
}

/// One API key (`[[auth.api_keys]]`), stored as the SHA-256 of the key.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// A name for logs (`"billing-backend"`); never the key.
    pub name: String,
    /// The SHA-256 of the key, 64 hex digits (`printf %s "$KEY" | sha256sum`).
    pub sha256: String,
    /// Topics and patterns the key may publish to (events, state `PUT`/`PATCH`); it may
    /// also read them over HTTP.
    pub publish: Vec<String>,
    /// Whether the key may close topics and read `/stats` and `/metrics`.
    pub admin: bool,
}

/// A secret string: `Debug` shows whether it is set, never its value.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether it is empty (not set).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "Secret(unset)"
        } else {
            "Secret(redacted)"
        })
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_show_in_debug() {
        let config = AuthConfig {
            hmac_secret: Secret::new("do-not-print-me-0123456789abcdef"),
            ..AuthConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("do-not-print-me"), "{shown}");
        assert!(shown.contains("Secret(redacted)"), "{shown}");
    }
}
