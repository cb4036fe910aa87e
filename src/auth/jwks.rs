//! JWKS documents from a file or a URL, reloaded in the background.
//!
//! The keys in force are an `Arc<KeySet>` swapped whole, so a verification never waits
//! for a reload and a reload never leaves a half-built set in place. A reload that fails
//! (unreadable, not JSON, no usable key, a non-200 answer, a timeout) keeps the set in
//! force. Reloads happen every `jwks_refresh`, and when a token names a `kid` the set does
//! not hold, at most once per `jwks_cooldown`, so a flood of made-up `kid`s costs the
//! identity provider one request per cooldown.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::jwk::Jwk;
use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use super::jwt::{Algorithms, KeySet, VerifyingKey};

/// Largest JWKS document read. Identity providers publish a handful of keys (a few KiB);
/// this bounds what a misbehaving endpoint can make the gateway buffer.
pub(crate) const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Most keys taken from one document; the rest are ignored. Lookups scan the set, so
/// this bounds their cost too.
pub(crate) const MAX_JWKS_KEYS: usize = 64;

/// How long one fetch of a JWKS URL may take, connecting included.
pub(crate) const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a JWKS document lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    /// A file, read at startup and at every reload.
    File(PathBuf),
    /// An `https://` URL, or `http://` on a loopback host.
    Url(http::Uri),
}

impl Location {
    /// Parses `jwks`: a URL when it starts with `http://` or `https://`, else a path.
    /// Plain `http` is refused unless the host is loopback: anyone on the path could
    /// otherwise hand the gateway keys of their own.
    pub(crate) fn parse(text: &str) -> Result<Location, String> {
        let lower = text.to_ascii_lowercase();
        if !(lower.starts_with("http://") || lower.starts_with("https://")) {
            return Ok(Location::File(PathBuf::from(text)));
        }
        let uri: http::Uri = text
            .parse()
            .map_err(|e| format!("jwks: {text:?} is not a URL: {e}"))?;
        let host = uri.host().unwrap_or("");
        if uri.scheme_str() == Some("http") && !is_loopback_host(host) {
            return Err(format!(
                "jwks: {text:?}: plain http is accepted only on loopback; use https"
            ));
        }
        Ok(Location::Url(uri))
    }
}

fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// One JWKS source: its location, the keys in force and the reload machinery.
#[derive(Debug)]
pub(crate) struct JwksSource {
    location: Location,
    accepted: Algorithms,
    keys: RwLock<Arc<KeySet>>,
    loaded: AtomicBool,
    /// Asks the refresher for a reload now.
    wake: tokio::sync::Notify,
    /// Counts finished reload attempts, so a verification can wait for the next one.
    attempts: tokio::sync::watch::Sender<u64>,
    /// When the last reload for an unknown `kid` was asked for.
    last_requested: Mutex<Option<Instant>>,
    interval: Duration,
    cooldown: Duration,
}

impl JwksSource {
    /// A source for `location`. A file is loaded now, so a bad one stops startup; a URL
    /// is first fetched when the refresher starts.
    pub(crate) fn new(
        location: Location,
        accepted: Algorithms,
        interval: Duration,
        cooldown: Duration,
    ) -> Result<JwksSource, String> {
        let source = JwksSource {
            location,
            accepted,
            keys: RwLock::new(Arc::new(KeySet::default())),
            loaded: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            attempts: tokio::sync::watch::Sender::new(0),
            last_requested: Mutex::new(None),
            interval,
            cooldown,
        };
        if let Location::File(path) = &source.location {
            let text = std::fs::read(path)
                .map_err(|e| format!("jwks: cannot read {}: {e}", path.display()))?;
            source
                .install(&text)
                .map_err(|e| format!("jwks: {}: {e}", path.display()))?;
        }
        Ok(source)
    }

    /// The keys in force.
    pub(crate) fn keys(&self) -> Arc<KeySet> {
        self.keys.read().clone()
    }

    /// Whether a set has ever loaded.
    pub(crate) fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Parses `document` and, if it holds at least one usable key, puts it in force.
    /// Returns how many keys it holds.
    pub(crate) fn install(&self, document: &[u8]) -> Result<usize, String> {
        let set = parse_jwks(document, &self.accepted)?;
        let count = set.len();
        *self.keys.write() = Arc::new(set);
        self.loaded.store(true, Ordering::Release);
        Ok(count)
    }

    /// Asks for a reload because a token named a `kid` the set does not hold; `false` when
    /// one was asked for less than `jwks_cooldown` ago.
    pub(crate) fn request_reload(&self, now: Instant) -> bool {
        let mut last = self.last_requested.lock();
        if last.is_some_and(|at| now.saturating_duration_since(at) < self.cooldown) {
            return false;
        }
        *last = Some(now);
        self.wake.notify_one();
        true
    }

    /// Follows finished reload attempts.
    pub(crate) fn attempts(&self) -> tokio::sync::watch::Receiver<u64> {
        self.attempts.subscribe()
    }

    /// Reads or fetches the document and installs it.
    async fn reload(&self, fetcher: &Fetcher) -> Result<usize, String> {
        let document = match &self.location {
            Location::File(path) => tokio::fs::read(path)
                .await
                .map(Bytes::from)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            Location::Url(uri) => fetcher.get(uri).await?,
        };
        self.install(&document)
    }

    /// Reloads on schedule and on request until `stop`. A URL is fetched at once.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let fetcher = Fetcher::default();
        let mut due = matches!(self.location, Location::Url(_));
        loop {
            if due {
                match self.reload(&fetcher).await {
                    Ok(count) => tracing::debug!(location = ?self.location, count, "JWKS loaded"),
                    Err(e) => tracing::warn!(
                        location = ?self.location,
                        error = %e,
                        "JWKS reload failed; keeping the keys in force"
                    ),
                }
                self.attempts.send_modify(|n| *n += 1);
            }
            due = true;
            tokio::select! {
                () = tokio::time::sleep(self.interval.max(Duration::from_secs(1))) => {}
                () = self.wake.notified() => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

/// Parses a JWKS document (RFC 7517 §5) into the keys usable here; keys that cannot
/// verify (encryption keys, symmetric keys, unknown types) are skipped.
pub(crate) fn parse_jwks(document: &[u8], accepted: &Algorithms) -> Result<KeySet, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    if document.len() > MAX_JWKS_BYTES {
        return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
    }
    let doc: Document =
        serde_json::from_slice(document).map_err(|e| format!("not a JWKS document: {e}"))?;
    let keys: Vec<VerifyingKey> = doc
        .keys
        .into_iter()
        .filter_map(|value| serde_json::from_value::<Jwk>(value).ok())
        .filter_map(|jwk| VerifyingKey::from_jwk(&jwk, accepted))
        .take(MAX_JWKS_KEYS)
        .collect();
    if keys.is_empty() {
        return Err("no usable signing key in the document".to_string());
    }
    Ok(KeySet::new(keys))
}

/// Fetches JWKS URLs: hyper's client over rustls (ring), trusting the system's roots.
#[derive(Default)]
struct Fetcher {
    https: std::sync::OnceLock<Result<HttpsClient, String>>,
}

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
>;

impl Fetcher {
    fn client(&self) -> Result<&HttpsClient, String> {
        self.https
            .get_or_init(|| {
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
                    .map_err(|e| format!("no TLS roots: {e}"))?
                    .https_or_http()
                    .enable_http1()
                    .build();
                Ok(
                    hyper_util::client::legacy::Client::builder(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .build(connector),
                )
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    async fn get(&self, uri: &http::Uri) -> Result<Bytes, String> {
        let request = http::Request::get(uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let fetch = async {
            let response = if uri.scheme_str() == Some("http") {
                // Loopback only (checked at startup): no TLS roots needed.
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<Empty<Bytes>>()
                    .request(request)
                    .await
            } else {
                self.client()?.request(request).await
            }
            .map_err(|e| format!("fetching {uri}: {e}"))?;
            if response.status() != http::StatusCode::OK {
                return Err(format!("fetching {uri}: status {}", response.status()));
            }
            Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map(|body| body.to_bytes())
                .map_err(|e| format!("reading {uri}: {e}"))
        };
        tokio::time::timeout(JWKS_FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| format!("fetching {uri}: no answer within {JWKS_FETCH_TIMEOUT:?}"))?
    }
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fetcher")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert!(matches!(
            Location::parse("/etc/jwks.json"),
            Ok(Location::File(_))
        ));
        assert!(matches!(
            Location::parse("https://idp.example/jwks"),
            Ok(Location::Url(_))
        ));
        assert!(matches!(
            Location::parse("http://127.0.0.1:9/jwks"),
            Ok(Location::Url(_))
        ));
        assert!(matches!(
            Location::parse("http://[::1]:9/jwks"),
            Ok(Location::Url(_))
        ));
        assert!(matches!(
            Location::parse("http://localhost/jwks"),
            Ok(Location::Url(_))
        ));
        let e = Location::parse("http://idp.example/jwks").unwrap_err();
        assert!(e.contains("use https"), "{e}");
    }

    #[test]
    fn documents() {
        let all = Algorithms::default();
        assert!(parse_jwks(b"{}", &all).is_err());
        assert!(parse_jwks(b"not json", &all).is_err());
        // A symmetric key in a public document is no secret: never used.
        let oct = br#"{"keys":[{"kty":"oct","kid":"s","k":"c2VjcmV0"}]}"#;
        assert!(parse_jwks(oct, &all).is_err());
        let ed = br#"{"keys":[
            {"kty":"OKP","crv":"Ed25519","kid":"e1","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"weird","kid":"w"}
        ]}"#;
        let set = parse_jwks(ed, &all).unwrap();
        assert_eq!(set.len(), 1);
        assert!(
            set.find(Some("e1"), jsonwebtoken::Algorithm::EdDSA)
                .is_some()
        );
        assert!(
            set.find(Some("e1"), jsonwebtoken::Algorithm::HS256)
                .is_none()
        );
        assert!(
            set.find(Some("e2"), jsonwebtoken::Algorithm::EdDSA)
                .is_none()
        );
    }

    #[test]
    fn reloads_for_unknown_kids_are_rate_limited() {
        let source = JwksSource::new(
            Location::Url("https://idp.example/jwks".parse().unwrap()),
            Algorithms::default(),
            Duration::from_secs(300),
            Duration::from_secs(10),
        )
        .unwrap();
        let t0 = Instant::now();
        assert!(source.request_reload(t0));
        assert!(!source.request_reload(t0 + Duration::from_secs(9)));
        assert!(source.request_reload(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn a_failed_install_keeps_the_keys_in_force() {
        let source = JwksSource::new(
            Location::Url("https://idp.example/jwks".parse().unwrap()),
            Algorithms::default(),
            Duration::from_secs(300),
            Duration::from_secs(10),
        )
        .unwrap();
        let ed = br#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"e1","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
        assert!(!source.is_loaded());
        source.install(ed).unwrap();
        assert!(source.install(b"{\"keys\":[]}").is_err());
        assert_eq!(source.keys().len(), 1);
        assert!(source.is_loaded());
    }
}
