//! Where credentials come from: `Authorization: Bearer`, `X-API-Key`, the `token` query
//! parameter, and the WebSocket subprotocol list (`tidings.v1, tidings.token.<jwt>`).
//!
//! Browsers cannot set headers on a WebSocket or an `EventSource`, hence the query
//! parameter and the subprotocol form. The subprotocol that carries the token is never
//! selected: the handshake answers `tidings.v1`, so the token is not echoed back.

use std::fmt;

use http::{HeaderMap, Uri, header};

use super::AuthError;
use crate::proto::handshake::SUBPROTOCOL_V1;

/// The prefix of the subprotocol entry that carries a token.
pub(crate) const TOKEN_SUBPROTOCOL_PREFIX: &str = "tidings.token.";

/// The header publishers may send their API key in (instead of `Authorization: Bearer`).
pub(crate) const API_KEY_HEADER: &str = "x-api-key";

/// Longest credential accepted, in bytes. Identity-provider tokens with a few dozen
/// grants stay under 4 KiB; hyper bounds the whole head anyway, this bounds the parsing.
pub(crate) const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// A credential as presented: a JWT or an API key. Its `Debug` never shows it, so it
/// cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Credential(Box<str>);

impl Credential {
    /// Wraps a credential (tests, and the WebSocket `refresh` message).
    pub(crate) fn new(value: &str) -> Credential {
        Credential(value.into())
    }

    /// The credential itself, for verification only.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// Whether it has the shape of a JWT (three base64url parts), as opposed to an API key.
    pub(crate) fn looks_like_jwt(&self) -> bool {
        self.0.bytes().filter(|&b| b == b'.').count() == 2
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential(<{} bytes redacted>)", self.0.len())
    }
}

/// Where a credential was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// `Authorization: Bearer <credential>`.
    Bearer,
    /// `X-API-Key: <key>`.
    ApiKeyHeader,
    /// `?token=<credential>`.
    Query,
    /// `Sec-WebSocket-Protocol: ..., tidings.token.<credential>`.
    Subprotocol,
}

/// A credential and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Presented {
    /// The credential.
    pub(crate) credential: Credential,
    /// Where it was found.
    pub(crate) source: Source,
}

/// The credential of an HTTP request (SSE, polling, publishing): `Authorization: Bearer`,
/// `X-API-Key` or the `token` query parameter. `Ok(None)` when there is none; more than
/// one is [`AuthError::Ambiguous`].
pub(crate) fn from_request(headers: &HeaderMap, uri: &Uri) -> Result<Option<Presented>, AuthError> {
    let mut found = None;
    let mut take = |credential: Credential, source: Source| {
        if found.is_some() {
            return Err(AuthError::Ambiguous);
        }
        found = Some(Presented { credential, source });
        Ok(())
    };
    for value in headers.get_all(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| AuthError::Malformed)?;
        take(bearer(value)?, Source::Bearer)?;
    }
    for value in headers.get_all(API_KEY_HEADER) {
        let value = value.to_str().map_err(|_| AuthError::Malformed)?;
        take(checked(value.trim())?, Source::ApiKeyHeader)?;
    }
    for value in query_tokens(uri) {
        take(checked(&value?)?, Source::Query)?;
    }
    Ok(found)
}

/// The credential of a WebSocket upgrade, and the subprotocol to select.
///
/// Sources are those of [`from_request`] plus the subprotocol list, where the token is
/// the entry `tidings.token.<jwt>`. The subprotocol returned is `tidings.v1` when the
/// client offered it, never the entry that carries the token. A browser fails a
/// handshake whose answer selects none of the subprotocols it offered, so clients that
/// send the token this way must offer `tidings.v1` too.
pub(crate) fn from_upgrade(
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<(Option<Presented>, Option<&'static str>), AuthError> {
    let mut found = from_request(headers, uri)?;
    let mut v1 = false;
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let Ok(value) = value.to_str() else {
            continue;
        };
        for entry in value.split(',').map(str::trim) {
            if entry == SUBPROTOCOL_V1 {
                v1 = true;
            } else if let Some(token) = entry.strip_prefix(TOKEN_SUBPROTOCOL_PREFIX) {
                if found.is_some() {
                    return Err(AuthError::Ambiguous);
                }
                found = Some(Presented {
                    credential: checked(token)?,
                    source: Source::Subprotocol,
                });
            }
        }
    }
    Ok((found, v1.then_some(SUBPROTOCOL_V1)))
}

/// The credential of an `Authorization` value; only the `Bearer` scheme (RFC 6750 §2.1,
/// the scheme name case-insensitive as in RFC 9110 §11.1).
fn bearer(value: &str) -> Result<Credential, AuthError> {
    let (scheme, rest) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    checked(rest.trim())
}

/// A credential within [`MAX_TOKEN_BYTES`], non-empty and without spaces or controls.
fn checked(value: &str) -> Result<Credential, AuthError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_TOKEN_BYTES
        && value.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(Credential::new(value))
    } else {
        Err(AuthError::Malformed)
    }
}

/// Every `token=` value of the query, percent-decoded.
fn query_tokens(uri: &Uri) -> impl Iterator<Item = Result<String, AuthError>> + '_ {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.strip_prefix("token="))
        .map(|value| percent_decode(value).ok_or(AuthError::Malformed))
}

/// Decodes `%XX` escapes (and `+` as a space, as forms encode it); `None` for a bad escape
/// or a result that is not UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn each_source() {
        let h = headers(&[("authorization", "Bearer a.b.c")]);
        let p = from_request(&h, &uri("/x")).unwrap().unwrap();
        assert_eq!((p.credential.expose(), p.source), ("a.b.c", Source::Bearer));
        let h = headers(&[("authorization", "bearer   k1  ")]);
        let p = from_request(&h, &uri("/x")).unwrap().unwrap();
        assert_eq!(p.credential.expose(), "k1");
        let h = headers(&[("x-api-key", "secret-key")]);
        let p = from_request(&h, &uri("/x")).unwrap().unwrap();
        assert_eq!(p.source, Source::ApiKeyHeader);
        let p = from_request(&HeaderMap::new(), &uri("/x?since=1&token=a%2Eb.c"))
            .unwrap()
            .unwrap();
        assert_eq!((p.credential.expose(), p.source), ("a.b.c", Source::Query));
        assert_eq!(
            from_request(&HeaderMap::new(), &uri("/x?tokens=1")),
            Ok(None)
        );
    }

    #[test]
    fn refusals() {
        let both = headers(&[("authorization", "Bearer a"), ("x-api-key", "b")]);
        assert_eq!(from_request(&both, &uri("/")), Err(AuthError::Ambiguous));
        let two = uri("/?token=a&token=b");
        assert_eq!(
            from_request(&HeaderMap::new(), &two),
            Err(AuthError::Ambiguous)
        );
        for bad in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Bearer a b"] {
            let h = headers(&[("authorization", bad)]);
            assert_eq!(
                from_request(&h, &uri("/")),
                Err(AuthError::Malformed),
                "{bad}"
            );
        }
        let long = format!("/?token={}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert_eq!(
            from_request(&HeaderMap::new(), &uri(&long)),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            from_request(&HeaderMap::new(), &uri("/?token=%zz")),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn the_subprotocol_carries_the_token_and_is_never_selected() {
        let h = headers(&[("sec-websocket-protocol", "tidings.v1, tidings.token.h.p.s")]);
        let (p, selected) = from_upgrade(&h, &uri("/ws")).unwrap();
        let p = p.unwrap();
        assert_eq!(
            (p.credential.expose(), p.source),
            ("h.p.s", Source::Subprotocol)
        );
        assert_eq!(selected, Some("tidings.v1"));
        let h = headers(&[("sec-websocket-protocol", "tidings.token.h.p.s")]);
        assert_eq!(from_upgrade(&h, &uri("/ws")).unwrap().1, None);
        let h = headers(&[
            ("sec-websocket-protocol", "tidings.v1, tidings.token.x.y.z"),
            ("authorization", "Bearer a.b.c"),
        ]);
        assert_eq!(from_upgrade(&h, &uri("/ws")), Err(AuthError::Ambiguous));
        let (none, selected) = from_upgrade(&HeaderMap::new(), &uri("/ws")).unwrap();
        assert_eq!((none, selected), (None, None));
    }

    #[test]
    fn debug_never_shows_the_credential() {
        let c = Credential::new("eyJhbGciOi.secret.sig");
        let shown = format!(
            "{:?}",
            Presented {
                credential: c,
                source: Source::Query
            }
        );
        assert!(!shown.contains("secret"), "{shown}");
    }
}
