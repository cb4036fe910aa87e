//! CORS for the read endpoints a page on another origin uses (SSE, polling, state reads),
//! by `allowed_origins`: empty allows any origin (`*`, no credentials); otherwise only the
//! origins listed, exactly. A refused origin gets `403 origin_forbidden`.
//!
//! Write endpoints send no CORS headers, so a browser never lets another origin read their
//! answers.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;

use super::{Refusal, error_response};
use crate::Config;

/// Headers a cross-origin reader may send: `Last-Event-ID` (an `EventSource` that
/// reconnects), `Authorization`, `If-None-Match` (polling with an `ETag`).
const ALLOWED_HEADERS: &str = "authorization, last-event-id, if-none-match";

/// How long a browser may cache a preflight answer, in seconds.
const PREFLIGHT_MAX_AGE: &str = "600";

/// The CORS headers for a cross-origin read from the request's `Origin`, or the refusal.
/// A request without `Origin` (not from a browser page) needs none.
pub(crate) fn for_read(
    config: &Config,
    headers: &HeaderMap,
) -> Result<Vec<(&'static str, String)>, Refusal> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(Vec::new());
    };
    if config.allowed_origins.is_empty() {
        return Ok(vec![("access-control-allow-origin", "*".to_owned())]);
    }
    let origin = origin.to_str().unwrap_or("");
    if config.allowed_origins.iter().any(|o| o == origin) {
        Ok(vec![
            ("access-control-allow-origin", origin.to_owned()),
            ("vary", "origin".to_owned()),
        ])
    } else {
        Err(Box::new(error_response(
            StatusCode::FORBIDDEN,
            "origin_forbidden",
            "this origin is not in allowed_origins",
        )))
    }
}

/// Adds the CORS headers to a read's response, or replaces it with the refusal.
pub(crate) fn readable<B>(
    config: &Config,
    req: &Request<B>,
    mut response: Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    match for_read(config, req.headers()) {
        Ok(headers) => {
            for (name, value) in headers {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
        Err(refusal) => *refusal,
    }
}

/// Answers a CORS preflight (`OPTIONS` with `Access-Control-Request-Method`) for the read
/// endpoints; `None` for any other request.
pub(crate) fn preflight<B>(
    config: &Config,
    req: &Request<B>,
    segments: &[&str],
) -> Option<Response<Full<Bytes>>> {
    if req.method() != Method::OPTIONS
        || !req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return None;
    }
    let readable = matches!(
        segments,
        ["v1", "sse"] | ["v1", "topics", _, "sse" | "events" | "state"]
    );
    if !readable {
        return Some(error_response(
            StatusCode::FORBIDDEN,
            "origin_forbidden",
            "cross-origin requests are allowed only to the read endpoints",
        ));
    }
    let mut response = match for_read(config, req.headers()) {
        Ok(headers) => {
            let mut response = Response::new(Full::new(Bytes::new()));
            for (name, value) in headers {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
        Err(refusal) => return Some(*refusal),
    };
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOWED_HEADERS),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(PREFLIGHT_MAX_AGE),
    );
    Some(response)
}
