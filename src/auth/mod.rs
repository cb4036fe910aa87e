//! Authentication and authorization: who a request or connection is, and what it may do.
//!
//! Pure decisions over request heads and tokens, with the clock passed in: [`token`] finds
//! the credential, [`Auth`] verifies it (JWTs in [`jwt`], JWKS in [`jwks`], API keys in
//! [`keys`]) into an [`Identity`], whose [`Grants`] say which topics and patterns it may
//! subscribe or publish to; [`origin`] decides cross-origin requests. The only I/O is the
//! JWKS refresher ([`Auth::start`]), a task per JWKS source that `Gateway::serve` runs
//! and stops.
//!
//! With nothing configured, [`Auth`] is *open*: everyone may do everything, as before
//! authentication existed, and only cross-site browser writes are refused.

pub(crate) mod config;
mod error;
pub(crate) mod grants;
mod jwks;
mod jwt;
mod keys;
pub(crate) mod origin;
pub(crate) mod token;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

pub use config::{ApiKeyConfig, AuthConfig, IssuerConfig, Secret};
pub(crate) use error::AuthError;
#[allow(unused_imports, reason = "for the WebSocket side")]
pub(crate) use error::{TOKEN_EXPIRED_CLOSE_CODE, TOKEN_EXPIRED_REASON};
pub(crate) use grants::Grants;
use grants::{GrantCache, MAX_CLAIM_ENTRIES, expand};
use jwks::{JwksSource, Location};
use jwt::{Algorithms, ClaimRules, KeySet, VerifyingKey, check_claims, list_claim, string_claim};
use keys::ApiKeys;
pub(crate) use token::{Credential, Presented, Source};

/// Shortest `hmac_secret` accepted: RFC 7518 §3.2 requires a key "of the same size as
/// the hash output (for instance, 256 bits for HS256) or larger".
pub(crate) const MIN_HMAC_SECRET_BYTES: usize = 32;

/// How long a verification waits for a JWKS reload it asked for (an unknown `kid`, or a
/// set not loaded yet) before it answers `unknown_key`.
pub(crate) const JWKS_WAIT: Duration = jwks::JWKS_FETCH_TIMEOUT;

/// Who a request or connection is and what it may do.
///
/// 56 bytes (pinned by a test). A connection that keeps it holds two pointers to grant
/// sets shared with every identity of the same claims (interned by [`Auth`]), its
/// expiry, and its subject on the heap (`sub`'s length plus an allocation), which a
/// connection needs only to check that a `refresh` keeps the subject.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    /// The token's `sub`, or an API key's name; `None` for anonymous.
    pub(crate) subject: Option<Box<str>>,
    /// When the token stops being accepted (`exp` plus `leeway`), in Unix seconds; `None`
    /// for API keys and anonymous access, which do not expire.
    pub(crate) expires: Option<u64>,
    /// Topics and patterns it may subscribe to.
    pub(crate) subscribe: Arc<Grants>,
    /// Topics it may publish to (events, state `PUT`/`PATCH`).
    pub(crate) publish: Arc<Grants>,
    /// Whether it may close topics and read `/stats` and `/metrics`.
    pub(crate) admin: bool,
}

/// The keys of one issuer.
#[derive(Debug)]
struct IssuerKeys {
    /// Keys from `hmac_secret` and `public_key_file`.
    fixed: KeySet,
    jwks: Option<Arc<JwksSource>>,
}

impl IssuerKeys {
    fn from_sources(
        what: &str,
        hmac_secret: &Secret,
        public_key_file: &str,
        jwks: &str,
        accepted: &Algorithms,
        config: &AuthConfig,
    ) -> Result<IssuerKeys, String> {
        let mut fixed = Vec::new();
        if !hmac_secret.is_empty() {
            if hmac_secret.expose().len() < MIN_HMAC_SECRET_BYTES {
                return Err(format!(
                    "{what}hmac_secret must be at least {MIN_HMAC_SECRET_BYTES} bytes"
                ));
            }
            let key = VerifyingKey::from_secret(hmac_secret.expose().as_bytes(), accepted)
                .map_err(|e| format!("{what}{e}"))?;
            fixed.push(key);
        }
        if !public_key_file.is_empty() {
            let pem = std::fs::read(public_key_file).map_err(|e| {
                format!("{what}public_key_file: cannot read {public_key_file}: {e}")
            })?;
            let key = VerifyingKey::from_pem(&pem, accepted)
                .map_err(|e| format!("{what}public_key_file: {public_key_file}: {e}"))?;
            fixed.push(key);
        }
        let jwks = if jwks.is_empty() {
            None
        } else {
            let location = Location::parse(jwks).map_err(|e| format!("{what}{e}"))?;
            let source = JwksSource::new(
                location,
                accepted.clone(),
                config.jwks_refresh,
                config.jwks_cooldown,
            )
            .map_err(|e| format!("{what}{e}"))?;
            Some(Arc::new(source))
        };
        Ok(IssuerKeys {
            fixed: KeySet::new(fixed),
            jwks,
        })
    }
}

/// A configuration `[auth]` refuses; the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("auth: {0}")]
pub(crate) struct AuthConfigError(pub(crate) String);

/// The verifier and policy built from `[auth]`; one per gateway, shared by every request
/// and connection.
#[derive(Debug)]
pub(crate) struct Auth {
    /// Authentication is configured; otherwise everything is open.
    enabled: bool,
    accepted: Algorithms,
    rules: ClaimRules,
    /// Keys for exact issuers, looked up by `iss` before `kid`.
    issuers: Vec<(Box<str>, IssuerKeys)>,
    /// The top-level keys when `issuer` is empty: `iss` is not checked for them.
    any_issuer: Option<IssuerKeys>,
    topics_claim: Box<str>,
    publish_claim: Box<str>,
    public: Vec<Box<str>>,
    user_topics: Vec<Box<str>>,
    protect_admin: bool,
    token_expiring: Duration,
    api_keys: ApiKeys,
    /// Identities of the API keys, in `api_keys` order.
    key_identities: Vec<Identity>,
    anonymous: Option<Identity>,
    cache: GrantCache,
    /// Stops the JWKS refreshers when the `Auth` is dropped.
    stop: CancellationToken,
}

impl Drop for Auth {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Stops the refreshers [`Auth::start`] spawned when dropped.
#[derive(Debug)]
pub(crate) struct Refreshing(CancellationToken);

impl Drop for Refreshing {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Auth {
    /// Checks `[auth]` and loads its keys (PEM files and JWKS files now; JWKS URLs once
    /// [`Auth::start`] runs).
    pub(crate) fn from_config(config: &AuthConfig) -> Result<Auth, AuthConfigError> {
        let err = AuthConfigError;
        let accepted = Algorithms::parse(&config.algorithms).map_err(err)?;
        let checked_list =
            |key: &str, entries: &[String]| -> Result<Vec<Box<str>>, AuthConfigError> {
                Grants::parse(entries).map_err(|e| {
                    AuthConfigError(format!("{key}: {:?} is neither a topic nor a pattern", e.0))
                })?;
                Ok(entries.iter().map(|s| s.as_str().into()).collect())
            };
        let public = checked_list("public", &config.public)?;
        for template in &config.user_topics {
            if !template.contains(grants::SUB_PLACEHOLDER) || expand(template, "sub").is_none() {
                return Err(err(format!(
                    "user_topics: {template:?} must contain {{sub}} and be a topic or pattern once it is replaced"
                )));
            }
        }
        let top_level = !config.hmac_secret.is_empty()
            || !config.public_key_file.is_empty()
            || !config.jwks.is_empty();
        let top = if top_level {
            Some(
                IssuerKeys::from_sources(
                    "",
                    &config.hmac_secret,
                    &config.public_key_file,
                    &config.jwks,
                    &accepted,
                    config,
                )
                .map_err(err)?,
            )
        } else {
            None
        };
        let mut issuers: Vec<(Box<str>, IssuerKeys)> = Vec::new();
        let mut any_issuer = None;
        match top {
            Some(keys) if config.issuer.is_empty() => any_issuer = Some(keys),
            Some(keys) => issuers.push((config.issuer.as_str().into(), keys)),
            None if !config.issuer.is_empty() => {
                return Err(err(
                    "issuer is set but no hmac_secret, public_key_file or jwks".into(),
                ));
            }
            None => {}
        }
        for (i, issuer) in config.issuers.iter().enumerate() {
            let what = format!("issuers[{i}]: ");
            if issuer.issuer.is_empty() {
                return Err(err(format!("{what}issuer must be set")));
            }
            if issuers.iter().any(|(name, _)| **name == *issuer.issuer) {
                return Err(err(format!(
                    "{what}issuer {:?} is configured twice",
                    issuer.issuer
                )));
            }
            let keys = IssuerKeys::from_sources(
                &what,
                &issuer.hmac_secret,
                &issuer.public_key_file,
                &issuer.jwks,
                &accepted,
                config,
            )
            .map_err(err)?;
            if keys.fixed.len() == 0 && keys.jwks.is_none() {
                return Err(err(format!(
                    "{what}needs hmac_secret, public_key_file or jwks"
                )));
            }
            issuers.push((issuer.issuer.as_str().into(), keys));
        }
        let api_keys = ApiKeys::from_config(&config.api_keys).map_err(|e| err(e.to_string()))?;
        let enabled = config.is_enabled();
        let cache = GrantCache::default();
        let nothing = Arc::new(Grants::default());
        let public_grants = cache
            .get(public.clone())
            .map_err(|e| err(format!("public: {:?}", e.0)))?;
        let mut key_identities = Vec::new();
        for key in &config.api_keys {
            let mut entries = public.clone();
            entries.extend(key.publish.iter().map(|s| s.as_str().into()));
            let subscribe =
                Grants::parse(&entries).map_err(|e| err(format!("api_keys: {:?}", e.0)))?;
            // An admin reads every topic, the gateway's own included: the dashboard's
            // stats stream and its topic browser.
            let subscribe = Arc::new(if key.admin {
                Grants::everything()
            } else {
                subscribe
            });
            let publish = Arc::new(
                Grants::parse(&key.publish).map_err(|e| err(format!("api_keys: {:?}", e.0)))?,
            );
            key_identities.push(Identity {
                subject: (!key.name.is_empty()).then(|| key.name.as_str().into()),
                expires: None,
                subscribe,
                publish,
                admin: key.admin,
            });
        }
        let anonymous = if !enabled {
            let everything = Arc::new(Grants::everything());
            Some(Identity {
                subject: None,
                expires: None,
                subscribe: everything.clone(),
                publish: everything,
                admin: true,
            })
        } else if config.allow_anonymous {
            Some(Identity {
                subject: None,
                expires: None,
                subscribe: public_grants,
                publish: nothing,
                admin: false,
            })
        } else {
            None
        };
        Ok(Auth {
            enabled,
            accepted,
            rules: ClaimRules {
                leeway: config.leeway,
                audience: (!config.audience.is_empty()).then(|| config.audience.as_str().into()),
            },
            issuers,
            any_issuer,
            topics_claim: config.topics_claim.as_str().into(),
            publish_claim: config.publish_claim.as_str().into(),
            public,
            user_topics: config
                .user_topics
                .iter()
                .map(|s| s.as_str().into())
                .collect(),
            protect_admin: config.protect_admin,
            token_expiring: config.token_expiring,
            api_keys,
            key_identities,
            anonymous,
            cache,
            stop: CancellationToken::new(),
        })
    }

    /// Whether authentication is configured (otherwise everyone may do everything).
    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Whether clients without credentials are let in (with the `public` grants, or with
    /// everything when authentication is off).
    #[cfg(test)]
    pub(crate) fn allows_anonymous(&self) -> bool {
        self.anonymous.is_some()
    }

    /// Whether `/stats` and `/metrics` need an admin identity.
    pub(crate) fn protects_admin(&self) -> bool {
        self.enabled && self.protect_admin
    }

    /// How long before [`Identity::expires`] a WebSocket is sent `token_expiring`.
    pub(crate) fn token_expiring(&self) -> Duration {
        self.token_expiring
    }

    /// Starts reloading every JWKS source in the background (needs a tokio runtime). The
    /// tasks end when the returned guard or this `Auth` is dropped.
    pub(crate) fn start(&self) -> Refreshing {
        let stop = self.stop.child_token();
        for source in self.jwks_sources() {
            tokio::spawn(source.clone().run(stop.clone()));
        }
        Refreshing(stop)
    }

    fn jwks_sources(&self) -> impl Iterator<Item = &Arc<JwksSource>> {
        self.issuers
            .iter()
            .map(|(_, keys)| keys)
            .chain(self.any_issuer.as_ref())
            .filter_map(|keys| keys.jwks.as_ref())
    }

    /// Who presents `credential` (or nothing), at `now` (Unix seconds).
    ///
    /// Without credentials: the anonymous identity, or [`AuthError::Missing`]. A JWT is
    /// verified ([`Auth::verify`]); anything else is an API key, accepted only from a
    /// header (`Authorization: Bearer` or `X-API-Key`), never from a URL or subprotocol,
    /// which proxies and browsers keep in logs and history. With authentication off,
    /// credentials are ignored and everyone gets everything.
    #[cfg(test)]
    pub(crate) fn authenticate(
        &self,
        presented: Option<&Presented>,
        now: u64,
    ) -> Result<Identity, AuthError> {
        match self.classify(presented)? {
            Classified::Anonymous(identity) => Ok(identity),
            Classified::ApiKey(identity) => Ok(identity),
            Classified::Jwt(token) => self.verify(token.expose(), now),
        }
    }

    /// As [`Auth::authenticate`], but a JWT whose `kid` its issuer's JWKS does not hold
    /// waits (up to [`JWKS_WAIT`]) for the reload that asks for, then is verified again.
    pub(crate) async fn authenticate_async(
        &self,
        presented: Option<&Presented>,
        now: u64,
    ) -> Result<Identity, AuthError> {
        match self.classify(presented)? {
            Classified::Anonymous(identity) => Ok(identity),
            Classified::ApiKey(identity) => Ok(identity),
            Classified::Jwt(token) => self.verify_async(token.expose(), now).await,
        }
    }

    fn classify<'a>(&self, presented: Option<&'a Presented>) -> Result<Classified<'a>, AuthError> {
        let Some(presented) = presented.filter(|_| self.enabled) else {
            return self
                .anonymous
                .clone()
                .map(Classified::Anonymous)
                .ok_or(AuthError::Missing);
        };
        let credential = &presented.credential;
        if presented.source != Source::ApiKeyHeader && credential.looks_like_jwt() {
            return Ok(Classified::Jwt(credential));
        }
        if !matches!(presented.source, Source::Bearer | Source::ApiKeyHeader) {
            return Err(AuthError::Malformed);
        }
        let index = self
            .api_keys
            .find(credential.expose())
            .ok_or(AuthError::UnknownApiKey)?;
        let identity = self
            .key_identities
            .get(index)
            .cloned()
            .ok_or(AuthError::UnknownApiKey)?;
        tracing::debug!(key = %self.api_keys.name(index), "API key accepted");
        Ok(Classified::ApiKey(identity))
    }

    /// Verifies a JWT at `now` (Unix seconds) into an identity. A `kid` unknown to its
    /// issuer's JWKS fails with [`AuthError::UnknownKey`] at once and asks the refresher
    /// for a reload (rate-limited), so the same token succeeds once the new set is in.
    pub(crate) fn verify(&self, token: &str, now: u64) -> Result<Identity, AuthError> {
        match self.verify_once(token, now) {
            Err(Unverified::UnknownKid(source)) => {
                source.request_reload(Instant::now());
                Err(AuthError::UnknownKey)
            }
            other => other.map_err(Unverified::into_error),
        }
    }

    /// As [`Auth::verify`], waiting for the reload an unknown `kid` asks for.
    pub(crate) async fn verify_async(&self, token: &str, now: u64) -> Result<Identity, AuthError> {
        let source = match self.verify_once(token, now) {
            Err(Unverified::UnknownKid(source)) => source,
            other => return other.map_err(Unverified::into_error),
        };
        let mut attempts = source.attempts();
        attempts.borrow_and_update();
        let asked = source.request_reload(Instant::now());
        if !asked && source.is_loaded() {
            return Err(AuthError::UnknownKey);
        }
        if tokio::time::timeout(JWKS_WAIT, attempts.changed())
            .await
            .is_err()
        {
            return Err(AuthError::UnknownKey);
        }
        self.verify_once(token, now).map_err(Unverified::into_error)
    }

    /// Checks a token sent to keep a connection open: verified like the first, and for the
    /// same subject.
    pub(crate) fn refresh(
        &self,
        current: &Identity,
        token: &str,
        now: u64,
    ) -> Result<Identity, AuthError> {
        let renewed = self.verify(token, now)?;
        if renewed.subject != current.subject {
            return Err(AuthError::SubjectChanged);
        }
        Ok(renewed)
    }

    fn verify_once(&self, token: &str, now: u64) -> Result<Identity, Unverified> {
        if !self.enabled {
            return Err(Unverified::Error(AuthError::Malformed));
        }
        if token.len() > token::MAX_TOKEN_BYTES {
            return Err(Unverified::Error(AuthError::Malformed));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if !self.accepted.accepts(header.alg) {
            return Err(AuthError::AlgorithmRefused.into());
        }
        // The issuer picks the keys; it is authenticated by the signature checked next.
        #[derive(serde::Deserialize)]
        struct Issuer {
            iss: Option<Value>,
        }
        let peek: Issuer = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|_| AuthError::Malformed)?;
        let iss = match &peek.iss {
            None => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(_) => return Err(AuthError::BadClaim("iss").into()),
        };
        let keys = iss
            .and_then(|iss| self.issuers.iter().find(|(name, _)| **name == *iss))
            .map(|(_, keys)| keys)
            .or(self.any_issuer.as_ref())
            .ok_or(AuthError::WrongIssuer)?;
        let kid = header.kid.as_deref();
        let claims = self.verify_with(keys, token, kid, header.alg)?;
        let lifetime = check_claims(&claims, now, &self.rules)?;
        self.identity(&claims, lifetime.expires)
            .map_err(Unverified::Error)
    }

    fn verify_with(
        &self,
        keys: &IssuerKeys,
        token: &str,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Map<String, Value>, Unverified> {
        if let Some(source) = &keys.jwks {
            let set = source.keys();
            if let Some(key) = set.find(kid, alg) {
                return Ok(key.verify(token)?);
            }
            if keys.fixed.find(None, alg).is_none() {
                return Err(Unverified::UnknownKid(source.clone()));
            }
        }
        match keys.fixed.find(None, alg) {
            Some(key) => Ok(key.verify(token)?),
            None => Err(AuthError::UnknownKey.into()),
        }
    }

    /// The identity of verified `claims`: grants from the claims, `public` and the
    /// subject's `user_topics`, interned.
    fn identity(&self, claims: &Map<String, Value>, expires: u64) -> Result<Identity, AuthError> {
        let sub = string_claim(claims, "sub")?;
        let mut subscribe: Vec<Box<str>> = self.public.clone();
        let listed = list_claim(claims, &self.topics_claim, MAX_CLAIM_ENTRIES)
            .map_err(|()| AuthError::BadClaim("topics"))?;
        subscribe.extend(listed.into_iter().map(Into::into));
        if let Some(sub) = sub {
            subscribe.extend(
                self.user_topics
                    .iter()
                    .filter_map(|t| expand(t, sub))
                    .map(Into::into),
            );
        }
        let publish: Vec<Box<str>> = list_claim(claims, &self.publish_claim, MAX_CLAIM_ENTRIES)
            .map_err(|()| AuthError::BadClaim("publish"))?
            .into_iter()
            .map(Into::into)
            .collect();
        let subscribe = self
            .cache
            .get(subscribe)
            .map_err(|_| AuthError::BadClaim("topics"))?;
        let publish = self
            .cache
            .get(publish)
            .map_err(|_| AuthError::BadClaim("publish"))?;
        Ok(Identity {
            subject: sub.map(Into::into),
            expires: Some(expires),
            subscribe,
            publish,
            admin: false,
        })
    }
}

/// What a credential turned out to be.
enum Classified<'a> {
    Anonymous(Identity),
    ApiKey(Identity),
    Jwt(&'a Credential),
}

/// A failed verification, or one that a JWKS reload may turn around.
enum Unverified {
    Error(AuthError),
    UnknownKid(Arc<JwksSource>),
}

impl Unverified {
    fn into_error(self) -> AuthError {
        match self {
            Unverified::Error(e) => e,
            Unverified::UnknownKid(_) => AuthError::UnknownKey,
        }
    }
}

impl From<AuthError> for Unverified {
    fn from(e: AuthError) -> Unverified {
        Unverified::Error(e)
    }
}

/// Now, in Unix seconds, as [`Auth::verify`] takes it.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
