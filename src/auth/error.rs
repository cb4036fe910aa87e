//! Why a request or connection was refused, with one mapping to the wire.

use http::{HeaderValue, StatusCode};

/// The WebSocket close code for a connection whose token expired without a `refresh`.
/// 4000-4999 is the range RFC 6455 §7.4.2 leaves to applications; 4001 mirrors HTTP 401.
pub(crate) const TOKEN_EXPIRED_CLOSE_CODE: u16 = 4001;

/// The close reason sent with [`TOKEN_EXPIRED_CLOSE_CODE`].
pub(crate) const TOKEN_EXPIRED_REASON: &str = "token_expired";

/// Why authentication or authorization failed. Every message is fixed text: nothing a
/// client sent (least of all its token) is echoed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    /// No credentials, where they are required.
    #[error("authentication required: send a token or API key")]
    Missing,
    /// Credentials sent more than one way (RFC 6750 §2: "MUST NOT use more than one").
    #[error("send credentials one way only (header, query parameter or subprotocol)")]
    Ambiguous,
    /// Not a JWT (shape, base64, JSON, size), or a claim of the wrong type.
    #[error("the token is malformed")]
    Malformed,
    /// A claim the gateway needs is missing or invalid.
    #[error("the token's {0} claim is missing or invalid")]
    BadClaim(&'static str),
    /// The signature does not verify.
    #[error("the token's signature does not verify")]
    BadSignature,
    /// The header's `alg` is not one the configuration accepts for this key.
    #[error("the token's algorithm is not accepted")]
    AlgorithmRefused,
    /// No configured key matches the token's issuer and `kid`.
    #[error("no key is known for the token's issuer and kid")]
    UnknownKey,
    /// `iss` is not a configured issuer.
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    /// `aud` does not include the configured audience.
    #[error("the token is not meant for this audience")]
    WrongAudience,
    /// `exp` (plus leeway) has passed.
    #[error("the token has expired")]
    Expired,
    /// `nbf` (less leeway) is still ahead.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// An API key that matches no configured key.
    #[error("the API key is not valid")]
    UnknownApiKey,
    /// A refreshed token names another subject than the connection's.
    #[error("a refreshed token must have the same subject")]
    SubjectChanged,
    /// A valid identity without the grant it needs.
    #[error("not allowed for this identity")]
    Forbidden,
    /// The request's `Origin` or `Sec-Fetch-Site` is refused by the origin policy.
    #[error("requests from this origin are not allowed")]
    OriginForbidden,
}

impl AuthError {
    /// The stable code in a JSON error body or a WebSocket `error` message.
    pub(crate) fn code(self) -> &'static str {
        match self {
            AuthError::Missing => "unauthorized",
            AuthError::Ambiguous => "invalid_request",
            AuthError::Malformed
            | AuthError::BadClaim(_)
            | AuthError::BadSignature
            | AuthError::AlgorithmRefused
            | AuthError::WrongIssuer
            | AuthError::WrongAudience
            | AuthError::UnknownApiKey
            | AuthError::SubjectChanged => "invalid_token",
            AuthError::UnknownKey => "unknown_key",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::Forbidden => "forbidden",
            AuthError::OriginForbidden => "origin_forbidden",
        }
    }

    /// The HTTP status of the refusal (also for a refused WebSocket upgrade).
    pub(crate) fn status(self) -> StatusCode {
        match self {
            AuthError::Ambiguous => StatusCode::BAD_REQUEST,
            AuthError::Missing
            | AuthError::Malformed
            | AuthError::BadClaim(_)
            | AuthError::BadSignature
            | AuthError::AlgorithmRefused
            | AuthError::UnknownKey
            | AuthError::WrongIssuer
            | AuthError::WrongAudience
            | AuthError::Expired
            | AuthError::NotYetValid
            | AuthError::UnknownApiKey
            | AuthError::SubjectChanged => StatusCode::UNAUTHORIZED,
            AuthError::Forbidden | AuthError::OriginForbidden => StatusCode::FORBIDDEN,
        }
    }

    /// The `WWW-Authenticate` challenge of RFC 6750 §3 for this refusal, if it has one:
    /// without an error code when no credentials came (§3.1: "SHOULD NOT include an error
    /// code"), `invalid_token` for bad ones, `insufficient_scope` for a missing grant.
    pub(crate) fn www_authenticate(self) -> Option<HeaderValue> {
        let value = match self {
            AuthError::Missing => r#"Bearer realm="tidings""#,
            AuthError::Ambiguous => r#"Bearer realm="tidings", error="invalid_request""#,
            AuthError::Malformed
            | AuthError::BadClaim(_)
            | AuthError::BadSignature
            | AuthError::AlgorithmRefused
            | AuthError::UnknownKey
            | AuthError::WrongIssuer
            | AuthError::WrongAudience
            | AuthError::Expired
            | AuthError::NotYetValid
            | AuthError::UnknownApiKey
            | AuthError::SubjectChanged => r#"Bearer realm="tidings", error="invalid_token""#,
            AuthError::Forbidden => r#"Bearer realm="tidings", error="insufficient_scope""#,
            AuthError::OriginForbidden => return None,
        };
        Some(HeaderValue::from_static(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_challenges_agree() {
        for e in [
            AuthError::Missing,
            AuthError::Ambiguous,
            AuthError::Malformed,
            AuthError::BadClaim("exp"),
            AuthError::BadSignature,
            AuthError::AlgorithmRefused,
            AuthError::UnknownKey,
            AuthError::WrongIssuer,
            AuthError::WrongAudience,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::UnknownApiKey,
            AuthError::SubjectChanged,
            AuthError::Forbidden,
            AuthError::OriginForbidden,
        ] {
            // RFC 7235 §3.1: a 401 "MUST send a WWW-Authenticate header field".
            if e.status() == StatusCode::UNAUTHORIZED {
                assert!(e.www_authenticate().is_some(), "{e:?}");
            }
            assert!(!e.code().is_empty());
        }
        assert_eq!(AuthError::Expired.code(), TOKEN_EXPIRED_REASON);
    }
}
