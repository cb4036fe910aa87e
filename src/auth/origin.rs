//! The origin policy, as pure decisions on request headers.
//!
//! - **Reads** (WebSocket, SSE, polling, state `GET`): with `allowed_origins` empty any
//!   `Origin` is accepted; otherwise a request that carries one must carry a listed one.
//!   (The WebSocket handshake, in `proto::handshake`, also refuses a missing `Origin` when
//!   the list is set.)
//! - **Writes** (publish, state `PUT`/`PATCH`, close), in every mode, authenticated or
//!   not: a browser request from another site is refused, so a page a user visits cannot
//!   make their browser publish to a gateway it can reach (a `no-cors` POST needs no
//!   preflight). A listed origin may write; otherwise `Sec-Fetch-Site: cross-site` or
//!   `same-site` (a sibling subdomain may be someone else's), `Origin: null`, or an
//!   `Origin` that is not the gateway's own (`Host`) is refused. Requests with neither
//!   header (servers, curl) are not browsers' and pass.
//! - **CORS**: responses carry `Access-Control-Allow-Origin` only for listed origins. With
//!   the list empty, no CORS headers are sent, so browsers keep cross-origin pages from
//!   reading HTTP responses; service clients never look at them.

use http::{HeaderMap, HeaderName, HeaderValue, header};

use super::AuthError;

/// Methods a preflight may ask for.
pub(crate) const CORS_METHODS: &str = "GET, POST, PUT, PATCH, OPTIONS";

/// Request headers a cross-origin page may send.
pub(crate) const CORS_HEADERS: &str =
    "Authorization, Content-Type, If-Match, If-None-Match, Last-Event-ID, X-API-Key";

/// Response headers a cross-origin page may read.
pub(crate) const CORS_EXPOSE: &str = "ETag, Retry-After, WWW-Authenticate";

/// How long a browser may cache a preflight answer, in seconds.
pub(crate) const CORS_MAX_AGE: &str = "600";

/// The request's one `Origin`, `Ok(None)` without one; two are refused (RFC 6454 §7.3).
fn origin(headers: &HeaderMap) -> Result<Option<&[u8]>, AuthError> {
    let mut all = headers.get_all(header::ORIGIN).iter();
    let first = all.next().map(HeaderValue::as_bytes);
    if all.next().is_some() {
        return Err(AuthError::OriginForbidden);
    }
    Ok(first)
}

fn listed(origin: &[u8], allowed: &[String]) -> bool {
    allowed
        .iter()
        .any(|a| a.as_bytes().eq_ignore_ascii_case(origin))
}

/// Whether a read (SSE, polling, state `GET`) from this request's `Origin` is allowed.
pub(crate) fn check_read(headers: &HeaderMap, allowed: &[String]) -> Result<(), AuthError> {
    match origin(headers)? {
        Some(o) if !allowed.is_empty() && !listed(o, allowed) => Err(AuthError::OriginForbidden),
        _ => Ok(()),
    }
}

/// Whether a write (publish, state `PUT`/`PATCH`, close) is allowed from where the
/// request says it comes from; see the module docs for the rule.
pub(crate) fn check_write(headers: &HeaderMap, allowed: &[String]) -> Result<(), AuthError> {
    let origin = origin(headers)?;
    if origin.is_some_and(|o| listed(o, allowed)) {
        return Ok(());
    }
    let fetch_site = headers
        .get("sec-fetch-site")
        .map(|v| v.as_bytes().to_ascii_lowercase());
    if matches!(fetch_site.as_deref(), Some(b"cross-site" | b"same-site")) {
        return Err(AuthError::OriginForbidden);
    }
    match origin {
        None => Ok(()),
        Some(o) if same_origin(o, headers.get(header::HOST)) => Ok(()),
        Some(_) => Err(AuthError::OriginForbidden),
    }
}

/// Whether `origin` (`scheme://host[:port]`) names the authority the request was sent
/// to. The scheme is not compared: behind a TLS-terminating proxy the gateway sees
/// `http` for an `https` page.
fn same_origin(origin: &[u8], host: Option<&HeaderValue>) -> bool {
    let Some(host) = host else {
        return false;
    };
    let Ok(origin) = std::str::from_utf8(origin) else {
        return false;
    };
    let Some((_, authority)) = origin.split_once("://") else {
        // `null` and anything else that is not a serialized origin.
        return false;
    };
    let host = host.as_bytes();
    let authority = authority.as_bytes();
    let strip_default = |a: &'static [u8], b: &[u8]| -> bool {
        // `Host: gw:443` for `Origin: https://gw` (or 80 for http).
        b.strip_suffix(a)
            .is_some_and(|b| b.eq_ignore_ascii_case(authority))
    };
    host.eq_ignore_ascii_case(authority)
        || strip_default(b":443", host)
        || strip_default(b":80", host)
}

/// The CORS headers for a response to this request: `Access-Control-Allow-Origin` with
/// the request's `Origin` when it is listed, and `Vary: Origin` whenever the answer
/// depends on it (the list is set). Call it for every HTTP route a browser may read
/// cross-origin (polling, state, SSE).
pub(crate) fn cors_headers(
    request: &HeaderMap,
    allowed: &[String],
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    if allowed.is_empty() {
        return out;
    }
    out.push((header::VARY, HeaderValue::from_static("Origin")));
    if let Ok(Some(o)) = origin(request)
        && listed(o, allowed)
        && let Ok(value) = HeaderValue::from_bytes(o)
    {
        out.push((header::ACCESS_CONTROL_ALLOW_ORIGIN, value));
        out.push((
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(CORS_EXPOSE),
        ));
    }
    out
}

/// The answer to a CORS preflight (`OPTIONS` with `Access-Control-Request-Method`): the
/// headers to send with `204`, or [`AuthError::OriginForbidden`] for an origin not
/// listed. No credentials are involved: tokens travel in `Authorization` or the query,
/// never in cookies, so `Access-Control-Allow-Credentials` is not sent.
pub(crate) fn preflight_headers(
    request: &HeaderMap,
    allowed: &[String],
) -> Result<Vec<(HeaderName, HeaderValue)>, AuthError> {
    let listed_origin = matches!(origin(request)?, Some(o) if listed(o, allowed));
    if !listed_origin {
        return Err(AuthError::OriginForbidden);
    }
    let mut out = cors_headers(request, allowed);
    out.push((
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(CORS_METHODS),
    ));
    out.push((
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(CORS_HEADERS),
    ));
    out.push((
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(CORS_MAX_AGE),
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reads() {
        let none = list(&[]);
        let app = list(&["https://app.example"]);
        assert!(check_read(&headers(&[("origin", "https://evil.example")]), &none).is_ok());
        assert!(check_read(&headers(&[("origin", "https://evil.example")]), &app).is_err());
        assert!(check_read(&headers(&[("origin", "https://APP.example")]), &app).is_ok());
        assert!(check_read(&headers(&[]), &app).is_ok());
        let two = headers(&[("origin", "https://app.example"), ("origin", "https://x")]);
        assert!(check_read(&two, &none).is_err());
    }

    #[test]
    fn writes() {
        let none = list(&[]);
        let app = list(&["https://app.example"]);
        let gw = ("host", "gw.example:8080");
        // Servers and curl send neither header.
        assert!(check_write(&headers(&[gw]), &none).is_ok());
        for refused in [
            headers(&[gw, ("sec-fetch-site", "cross-site")]),
            headers(&[gw, ("sec-fetch-site", "same-site")]),
            headers(&[gw, ("origin", "https://evil.example")]),
            headers(&[gw, ("origin", "null")]),
            headers(&[("origin", "http://gw.example:8080")]),
        ] {
            assert_eq!(
                check_write(&refused, &none),
                Err(AuthError::OriginForbidden),
                "{refused:?}"
            );
        }
        for allowed in [
            headers(&[
                gw,
                ("sec-fetch-site", "same-origin"),
                ("origin", "http://gw.example:8080"),
            ]),
            headers(&[gw, ("sec-fetch-site", "none")]),
            headers(&[("host", "gw.example:443"), ("origin", "https://gw.example")]),
        ] {
            assert!(check_write(&allowed, &none).is_ok(), "{allowed:?}");
        }
        // A listed origin may write cross-site (its page sends the token itself).
        let listed = headers(&[
            gw,
            ("origin", "https://app.example"),
            ("sec-fetch-site", "cross-site"),
        ]);
        assert!(check_write(&listed, &app).is_ok());
        assert!(check_write(&listed, &none).is_err());
    }

    #[test]
    fn cors() {
        let app = list(&["https://app.example"]);
        let req = headers(&[("origin", "https://app.example")]);
        let got = cors_headers(&req, &app);
        assert!(got.contains(&(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("https://app.example")
        )));
        assert!(got.contains(&(header::VARY, HeaderValue::from_static("Origin"))));
        let other = headers(&[("origin", "https://evil.example")]);
        assert_eq!(cors_headers(&other, &app).len(), 1, "only Vary");
        assert!(cors_headers(&req, &[]).is_empty());
        let pre = preflight_headers(&req, &app).unwrap();
        let allow = pre
            .iter()
            .find(|(k, _)| k == header::ACCESS_CONTROL_ALLOW_HEADERS)
            .unwrap();
        let allow = allow.1.to_str().unwrap();
        assert!(allow.contains("Authorization") && allow.contains("Last-Event-ID"));
        assert!(preflight_headers(&other, &app).is_err());
        assert!(preflight_headers(&req, &[]).is_err());
    }
}
