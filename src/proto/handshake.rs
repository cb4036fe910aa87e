//! Server side of the RFC 6455 opening handshake, as a pure function of the request head.
//!
//! hyper parses the HTTP request; this module decides whether it is an acceptable WebSocket
//! upgrade and computes `Sec-WebSocket-Accept`. Nothing here touches a socket.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::{HeaderMap, Method, StatusCode, Version, header};
use sha1::{Digest, Sha1};

/// The only protocol version RFC 6455 defines (§4.2.1 item 6).
pub const WEBSOCKET_VERSION: &str = "13";

/// The subprotocol of the tidings JSON protocol, version 1.
pub const SUBPROTOCOL_V1: &str = "tidings.v1";

/// The GUID RFC 6455 §1.3 appends to the client's key before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Why an upgrade request is refused: one variant per rule of RFC 6455 §4.2.1 (plus policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// "An HTTP/1.1 or higher GET request" (§4.2.1 item 1): the method is not GET.
    #[error("a WebSocket upgrade must be a GET request")]
    MethodNotAllowed,
    /// §4.2.1 item 1: the request is older than HTTP/1.1.
    #[error("a WebSocket upgrade needs HTTP/1.1 or higher")]
    HttpVersion,
    /// §4.2.1 item 2: "A |Host| header field containing the server's authority."
    #[error("the Host header is missing")]
    MissingHost,
    /// §4.2.1 item 3: "An |Upgrade| header field containing the value "websocket"".
    #[error("the Upgrade header must contain the token \"websocket\"")]
    InvalidUpgrade,
    /// §4.2.1 item 4: "A |Connection| header field that includes the token "Upgrade"".
    #[error("the Connection header must contain the token \"upgrade\"")]
    InvalidConnection,
    /// §4.2.1 item 5: the key "when decoded, is 16 bytes in length".
    #[error("Sec-WebSocket-Key must be 16 bytes encoded in base64")]
    InvalidKey,
    /// §4.2.1 item 6: "A |Sec-WebSocket-Version| header field, with a value of 13."
    #[error("Sec-WebSocket-Version must be 13")]
    UnsupportedVersion,
    /// §4.2.2 item 1: the server may refuse an Origin it does not serve.
    #[error("this Origin is not allowed")]
    OriginForbidden,
    /// RFC 6454 §7.3: "The user agent MUST NOT include more than one Origin header field in
    /// any HTTP request." A second one could carry a value the policy never looked at.
    #[error("a request may carry only one Origin header")]
    DuplicateOrigin,
}

impl HandshakeError {
    /// The HTTP status the refusal is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            HandshakeError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            HandshakeError::HttpVersion
            | HandshakeError::MissingHost
            | HandshakeError::InvalidUpgrade
            | HandshakeError::InvalidConnection
            | HandshakeError::InvalidKey => StatusCode::BAD_REQUEST,
            // §4.4: "the server MUST [...] send a |Sec-WebSocket-Version| header field
            // containing the version(s) the server is capable of understanding."
            HandshakeError::UnsupportedVersion => StatusCode::UPGRADE_REQUIRED,
            HandshakeError::OriginForbidden | HandshakeError::DuplicateOrigin => {
                StatusCode::FORBIDDEN
            }
        }
    }

    /// The stable machine-readable code in the JSON error body.
    pub fn code(self) -> &'static str {
        match self {
            HandshakeError::MethodNotAllowed => "method_not_allowed",
            HandshakeError::HttpVersion => "http_version",
            HandshakeError::MissingHost => "missing_host",
            HandshakeError::InvalidUpgrade => "invalid_upgrade",
            HandshakeError::InvalidConnection => "invalid_connection",
            HandshakeError::InvalidKey => "invalid_key",
            HandshakeError::UnsupportedVersion => "unsupported_version",
            HandshakeError::OriginForbidden | HandshakeError::DuplicateOrigin => "origin_forbidden",
        }
    }
}

/// What an accepted handshake answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    /// The `Sec-WebSocket-Accept` value.
    pub accept_key: String,
    /// The selected subprotocol, when the client offered one we speak.
    pub protocol: Option<&'static str>,
}

/// Validates an upgrade request head against RFC 6455 §4.2.1 and the Origin policy.
///
/// `allowed_origins` empty means any Origin (or none) is accepted; otherwise the request's
/// `Origin` must equal one of them exactly (ASCII case-insensitively, as origins are
/// serialized lower-case by browsers). More than one `Origin` is refused whatever the policy.
pub fn validate(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    allowed_origins: &[String],
) -> Result<Accept, HandshakeError> {
    if method != Method::GET {
        return Err(HandshakeError::MethodNotAllowed);
    }
    if version < Version::HTTP_11 {
        return Err(HandshakeError::HttpVersion);
    }
    if headers.get(header::HOST).is_none_or(|h| h.is_empty()) {
        return Err(HandshakeError::MissingHost);
    }
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err(HandshakeError::InvalidUpgrade);
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err(HandshakeError::InvalidConnection);
    }
    let key = single_value(headers, header::SEC_WEBSOCKET_KEY).ok_or(HandshakeError::InvalidKey)?;
    if !is_valid_key(key) {
        return Err(HandshakeError::InvalidKey);
    }
    if single_value(headers, header::SEC_WEBSOCKET_VERSION) != Some(WEBSOCKET_VERSION.as_bytes()) {
        return Err(HandshakeError::UnsupportedVersion);
    }
    if headers.get_all(header::ORIGIN).iter().nth(1).is_some() {
        return Err(HandshakeError::DuplicateOrigin);
    }
    if !allowed_origins.is_empty() {
        let origin = headers.get(header::ORIGIN).map(|o| o.as_bytes());
        let allowed = origin.is_some_and(|o| {
            allowed_origins
                .iter()
                .any(|a| a.as_bytes().eq_ignore_ascii_case(o))
        });
        if !allowed {
            return Err(HandshakeError::OriginForbidden);
        }
    }
    let protocol = has_token(headers, header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL_V1)
        .then_some(SUBPROTOCOL_V1);
    Ok(Accept {
        accept_key: accept_key(key),
        protocol,
    })
}

/// Computes `Sec-WebSocket-Accept`: base64(SHA-1(key ++ GUID)) (RFC 6455 §4.2.2 item 5.4).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    BASE64.encode(sha.finalize())
}

/// §4.2.1 item 5: "a base64-encoded value that, when decoded, is 16 bytes in length".
fn is_valid_key(key: &[u8]) -> bool {
    // 16 bytes encode to exactly 24 characters with "==" padding.
    key.len() == 24 && BASE64.decode(key).is_ok_and(|k| k.len() == 16)
}

/// The value of a header that must appear exactly once.
fn single_value(headers: &HeaderMap, name: header::HeaderName) -> Option<&[u8]> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    values
        .next()
        .is_none()
        .then(|| first.as_bytes().trim_ascii())
}

/// Whether a comma-separated header (possibly repeated) holds `token`, ignoring ASCII case.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn good() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h
    }

    fn check(h: &HeaderMap) -> Result<Accept, HandshakeError> {
        validate(&Method::GET, Version::HTTP_11, h, &[])
    }

    #[test]
    fn rfc_example_accept_key() {
        // RFC 6455 §1.3's worked example.
        let a = check(&good()).unwrap();
        assert_eq!(a.accept_key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(a.protocol, None);
    }

    #[test]
    fn tokens_are_case_insensitive_lists() {
        let mut h = good();
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, UPGRADE"),
        );
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("other, tidings.v1"),
        );
        assert_eq!(check(&h).unwrap().protocol, Some(SUBPROTOCOL_V1));
    }

    #[test]
    fn each_rule_refuses() {
        assert_eq!(
            validate(&Method::POST, Version::HTTP_11, &good(), &[]),
            Err(HandshakeError::MethodNotAllowed)
        );
        assert_eq!(
            validate(&Method::GET, Version::HTTP_10, &good(), &[]),
            Err(HandshakeError::HttpVersion)
        );
        let cases: [(header::HeaderName, Option<&'static str>, HandshakeError); 7] = [
            (header::HOST, None, HandshakeError::MissingHost),
            (header::UPGRADE, Some("h2c"), HandshakeError::InvalidUpgrade),
            (
                header::CONNECTION,
                Some("keep-alive"),
                HandshakeError::InvalidConnection,
            ),
            (header::SEC_WEBSOCKET_KEY, None, HandshakeError::InvalidKey),
            (
                header::SEC_WEBSOCKET_KEY,
                Some("c2hvcnQ="),
                HandshakeError::InvalidKey,
            ),
            (
                header::SEC_WEBSOCKET_KEY,
                Some("!!!!!!!!!!!!!!!!!!!!!!=="),
                HandshakeError::InvalidKey,
            ),
            (
                header::SEC_WEBSOCKET_VERSION,
                Some("8"),
                HandshakeError::UnsupportedVersion,
            ),
        ];
        for (name, value, want) in cases {
            let mut h = good();
            match value {
                Some(v) => h.insert(name, HeaderValue::from_static(v)),
                None => h.remove(name),
            };
            assert_eq!(check(&h), Err(want), "{want:?}");
        }
    }

    proptest::proptest! {
        /// Arbitrary header values are refused or accepted, never a panic.
        #[test]
        fn arbitrary_headers_never_panic(values in proptest::collection::vec(proptest::collection::vec(32u8..127, 0..40), 6)) {
            let names = [
                header::HOST,
                header::UPGRADE,
                header::CONNECTION,
                header::SEC_WEBSOCKET_KEY,
                header::SEC_WEBSOCKET_VERSION,
                header::SEC_WEBSOCKET_PROTOCOL,
            ];
            let mut h = HeaderMap::new();
            for (name, value) in names.into_iter().zip(&values) {
                if let Ok(v) = HeaderValue::from_bytes(value) {
                    h.insert(name, v);
                }
            }
            let _ = check(&h);
        }
    }

    #[test]
    fn origin_policy() {
        let allowed = vec!["https://app.example".to_string()];
        let mut h = good();
        assert_eq!(
            validate(&Method::GET, Version::HTTP_11, &h, &allowed),
            Err(HandshakeError::OriginForbidden)
        );
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://app.example"),
        );
        assert!(validate(&Method::GET, Version::HTTP_11, &h, &allowed).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert_eq!(
            validate(&Method::GET, Version::HTTP_11, &h, &allowed),
            Err(HandshakeError::OriginForbidden)
        );
    }

    #[test]
    fn a_second_origin_is_refused() {
        let allowed = ["https://app.example".to_string()];
        let mut h = good();
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://app.example"),
        );
        h.append(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        for policy in [&allowed[..], &[]] {
            let e = validate(&Method::GET, Version::HTTP_11, &h, policy).unwrap_err();
            assert_eq!(e, HandshakeError::DuplicateOrigin);
            assert_eq!(
                (e.status(), e.code()),
                (StatusCode::FORBIDDEN, "origin_forbidden")
            );
        }
    }
}
