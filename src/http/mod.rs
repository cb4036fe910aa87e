//! HTTP endpoints: routing, publishing, health, stats and metrics.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use tokio_util::task::TaskTracker;

use crate::hub::{Hub, PublishError};
use crate::net::{Mode, upgrade};
use crate::proto::message::validate_json;

/// A JSON error body: `{"code": "...", "message": "..."}`.
#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

/// Builds an error response with a stable `code`.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(status, &ErrorBody { code, message })
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let json = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(json)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn method_not_allowed(allowed: &'static str) -> Response<Full<Bytes>> {
    let mut response = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("this endpoint accepts {allowed}"),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    response
}

/// Routes one request.
pub async fn route(
    hub: &Arc<Hub>,
    tracker: &TaskTracker,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        // The upgrade validates the method itself, so a wrong one gets the handshake's error.
        ["ws"] => upgrade(hub, tracker, req, Mode::Gateway),
        ["echo"] if hub.config().echo => upgrade(hub, tracker, req, Mode::Echo),
        ["healthz"] => match *req.method() {
            Method::GET | Method::HEAD => {
                json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))
            }
            _ => method_not_allowed("GET"),
        },
        ["stats"] => match *req.method() {
            Method::GET => json_response(StatusCode::OK, &hub.metrics().stats()),
            _ => method_not_allowed("GET"),
        },
        ["metrics"] => match *req.method() {
            Method::GET => {
                let mut response =
                    Response::new(Full::new(Bytes::from(hub.metrics().prometheus_text())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            _ => method_not_allowed("GET"),
        },
        ["v1", "topics", topic, "events"] => match *req.method() {
            Method::POST => {
                let topic = percent_decode(topic);
                publish(hub, &topic, req).await
            }
            _ => method_not_allowed("POST"),
        },
        _ => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route for {path}"),
        ),
    }
}

/// `POST /v1/topics/{topic}/events`: the body is one JSON value, published as is.
async fn publish(hub: &Hub, topic: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let limit = hub.config().max_publish_bytes;
    let body = match read_body(req, limit).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let range = match validate_json(&body) {
        Ok(range) => range,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "invalid_json", &e),
    };
    match hub.publish(topic, &body[range]) {
        Ok(published) => json_response(
            StatusCode::ACCEPTED,
            &serde_json::json!({
                "topic": published.topic,
                "offset": published.offset,
            }),
        ),
        Err(e) => publish_error(&e),
    }
}

/// The HTTP answer to a refused publication.
pub fn publish_error(e: &PublishError) -> Response<Full<Bytes>> {
    let (status, code) = match e {
        PublishError::InvalidTopic(_) => (StatusCode::BAD_REQUEST, "invalid_topic"),
        PublishError::InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
        PublishError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
    };
    error_response(status, code, &e.to_string())
}

/// Reads a body of at most `limit` bytes; more is a 413 before reading it all when the
/// length is announced.
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Response<Full<Bytes>>> {
    let too_large = || publish_error(&PublishError::TooLarge { limit });
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("could not read the request body: {e}"),
        )),
    }
}

/// Decodes `%XX` escapes in a path segment (a client may escape the `:` of a topic).
fn percent_decode(segment: &str) -> String {
    if !segment.contains('%') {
        return segment.to_owned();
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn decodes_escaped_colons() {
        assert_eq!(percent_decode("a%3Ab"), "a:b");
        assert_eq!(percent_decode("a:b"), "a:b");
        assert_eq!(percent_decode("a%3"), "a%3");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
