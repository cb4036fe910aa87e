//! Server-Sent Events requests: `GET /v1/topics/{topic}/sse` and
//! `GET /v1/sse?topics=a,b&patterns=p:*&filter=...`.
//!
//! A stream is checked here, before its `200`, like a subscribe message (names, counts,
//! filter, resume cursor); then its socket becomes a peer in a shard's slab, like a
//! WebSocket. hyper cannot give a socket back after a `200`, so `net` reads the head of a
//! connection's first request itself when its request line names an SSE route, and answers
//! it here without hyper. An SSE request that arrives later on a kept-alive connection is
//! answered with a `retry:` hint and the connection closed, so the client reconnects on a
//! fresh connection, which is served as a first request (docs/ARCHITECTURE.md, "SSE").

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri, header};
use http_body_util::Full;

use super::{Refusal, error_response, percent_decode};
use crate::hub::{Hub, SseOpen, parse_last_event_id};
use crate::proto::message::SubscriptionRequest;
use crate::topic::{Pattern, validate_topic};

/// Longest SSE request head read before hyper (request line and headers); a longer one is
/// refused with 431. A multi-topic `Last-Event-ID` is at most 8 KiB.
pub(crate) const MAX_SSE_HEAD: usize = 16 * 1024;

/// Whether `path` is an SSE route.
pub(crate) fn is_sse_path(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    if path == "/v1/sse" {
        return true;
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matches!(segments.as_slice(), ["v1", "topics", _, "sse"])
}

fn bad_request(code: &str, message: &str) -> Refusal {
    Box::new(error_response(StatusCode::BAD_REQUEST, code, message))
}

/// Checks an SSE request and builds the stream's subscription; a refusal is the response
/// to send instead.
pub(crate) fn prepare(
    hub: &Hub,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<SseOpen, Refusal> {
    if method != Method::GET {
        let mut response = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this endpoint accepts GET",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return Err(Box::new(response));
    }
    let config = hub.config();
    let segments: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    let single = match segments.as_slice() {
        ["v1", "topics", topic, "sse"] => Some(percent_decode(topic)),
        _ => None,
    };
    let mut request = SubscriptionRequest::default();
    let mut last_event_id = None;
    for (key, value) in super::query_pairs(uri) {
        let value = percent_decode(value);
        let list = || {
            value
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        match key {
            "topics" if single.is_none() => request.topics.extend(list()),
            "patterns" if single.is_none() => request.patterns.extend(list()),
            "filter" => {
                let depth = config.max_json_depth;
                if let Err(e) = crate::proto::json::check_depth(value.as_bytes(), depth) {
                    return Err(bad_request("invalid_filter", &format!("filter is {e}")));
                }
                match serde_json::from_str(&value) {
                    Ok(filter) => request.filter = Some(filter),
                    Err(e) => {
                        return Err(bad_request(
                            "invalid_filter",
                            &format!("filter is not JSON: {e}"),
                        ));
                    }
                }
            }
            "last_event_id" => last_event_id = Some(value),
            _ => {}
        }
    }
    if let Some(topic) = &single {
        request.topics.push(topic.clone());
    }
    if request.topics.is_empty() && request.patterns.is_empty() {
        return Err(bad_request(
            "invalid_request",
            "name at least one topic (topics=a,b) or pattern (patterns=p:*)",
        ));
    }
    request.topics.dedup();
    for t in &request.topics {
        if let Err(e) = validate_topic(t) {
            return Err(bad_request("invalid_topic", &e.to_string()));
        }
    }
    for p in &request.patterns {
        if let Err(e) = Pattern::parse(p) {
            return Err(bad_request("invalid_pattern", &e.to_string()));
        }
    }
    if request.topics.len() + request.patterns.len() > config.max_subscriptions {
        return Err(bad_request(
            "too_many_subscriptions",
            &format!(
                "more than {} topics and patterns on one stream",
                config.max_subscriptions
            ),
        ));
    }
    if request.patterns.len() > config.max_patterns {
        return Err(bad_request(
            "too_many_patterns",
            &format!("more than {} patterns on one stream", config.max_patterns),
        ));
    }
    if let Some(filter) = &request.filter
        && let Err(e) = crate::topic::Filter::from_value(filter)
    {
        return Err(bad_request("invalid_filter", &e.to_string()));
    }
    // The header is what a reconnecting EventSource sends; the parameter serves clients
    // that cannot set headers.
    let header_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut base_ms = None;
    if let Some(id) = header_id.or(last_event_id).filter(|id| !id.is_empty()) {
        match parse_last_event_id(&id, &request.topics, single.is_some()) {
            Ok(resume) => {
                base_ms = resume.base_ms;
                request.since = resume
                    .since
                    .into_iter()
                    .map(|(topic, version)| (topic, version.to_string()))
                    .collect();
            }
            Err(e) => return Err(bad_request("invalid_last_event_id", &e.to_string())),
        }
    }
    Ok(SseOpen {
        request,
        single: single.is_some(),
        base_ms,
        identity: None,
    })
}

/// The head of an SSE response. The body has no declared length (RFC 9112 §6.3: it ends
/// when the connection closes), so its bytes are exactly the events, shared as they are
/// by every subscriber; `X-Accel-Buffering: no` asks nginx not to buffer it.
pub(crate) fn response_head(extra: &[(http::HeaderName, HeaderValue)]) -> Vec<u8> {
    let mut head = String::from(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
         x-accel-buffering: no\r\nconnection: close\r\n",
    );
    for (name, value) in extra {
        if let Ok(value) = value.to_str() {
            head.push_str(name.as_str());
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// An SSE request on a kept-alive connection: a `retry:` hint and the end of the response
/// and connection, so the client comes back on a fresh connection (served without hyper).
pub(crate) fn reconnect_elsewhere() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"retry: 10\n\n")));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A whole response as bytes, for refusals written before hyper: status line, headers,
/// `content-length`, and the body.
pub(crate) fn serialize(response: Response<Full<Bytes>>, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        response.status().as_u16(),
        response.status().canonical_reason().unwrap_or("")
    );
    for (name, value) in response.headers() {
        if let Ok(value) = value.to_str() {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    out.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_paths() {
        assert!(is_sse_path("/v1/sse?topics=a"));
        assert!(is_sse_path("/v1/topics/runs:1/sse"));
        assert!(!is_sse_path("/v1/topics/runs:1/events"));
        assert!(!is_sse_path("/v1/topics/sse"));
        assert!(!is_sse_path("/ws"));
    }

    #[test]
    fn the_head_has_no_length() {
        let vary = (header::VARY, HeaderValue::from_static("origin"));
        let head = String::from_utf8(response_head(&[vary])).expect("ascii");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head.contains("vary: origin\r\n"));
        assert!(!head.to_ascii_lowercase().contains("content-length"));
        assert!(head.ends_with("\r\n\r\n"));
    }
}
