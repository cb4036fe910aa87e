//! HTTP endpoints: routing, publishing, polling and long-polling, the WebSocket upgrade,
//! SSE requests, health, stats and metrics.

mod batch;
mod conditional;
pub(crate) mod context;
pub(crate) mod dashboard;
pub(crate) mod guard;
pub(crate) mod limits;
pub(crate) mod sse;
pub(crate) mod upgrade;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use tokio_util::task::TaskTracker;

use crate::hub::{Hub, PollError, PublishError, StateWritten, TopicError};
use crate::metrics::MetricsFormat;
use crate::proto::json::JsonLimitError;
use crate::proto::session::Mode;
use upgrade::upgrade;

/// A JSON error body: `{"code": "...", "message": "..."}`.
#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

/// A response that refuses a request, boxed: returned in `Err` where the `Ok` is small.
pub(crate) type Refusal = Box<Response<Full<Bytes>>>;

/// Builds an error response with a stable `code`.
pub(crate) fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
) -> Response<Full<Bytes>> {
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

/// Routes one request, answering CORS preflights and adding CORS headers for listed
/// origins.
pub async fn route(
    hub: &Arc<Hub>,
    tracker: &TaskTracker,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() == Method::OPTIONS {
        return guard::preflight(hub, req.headers());
    }
    let cors = guard::cors(hub, req.headers());
    guard::with_cors(routes(hub, tracker, req).await, cors)
}

/// The routes.
async fn routes(
    hub: &Arc<Hub>,
    tracker: &TaskTracker,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        // The upgrade validates the method itself, so a wrong one gets the handshake's error.
        ["ws"] => upgrade(hub, tracker, req, Mode::Gateway, None).await,
        ["ws", app, profile] => {
            // The config use case: a connection already subscribed to `app:profile`.
            let topic = format!("{}:{}", percent_decode(app), percent_decode(profile));
            match crate::topic::validate_topic(&topic) {
                Ok(()) => upgrade(hub, tracker, req, Mode::Gateway, Some(topic)).await,
                Err(e) => error_response(StatusCode::BAD_REQUEST, "invalid_topic", &e.to_string()),
            }
        }
        ["echo"] if hub.config().echo => upgrade(hub, tracker, req, Mode::Echo, None).await,
        // The client script and the dashboard's files, embedded in the binary.
        s if dashboard::is_asset(s) => dashboard::serve_asset(&req, s),
        ["v1", "topics"] => dashboard::list_topics(hub, &req).await,
        ["healthz"] => match *req.method() {
            // Liveness: the process serves. A node whose bus does not answer still serves
            // its connected clients, and says so.
            Method::GET | Method::HEAD => {
                let status = if hub.is_ready() { "ok" } else { "degraded" };
                json_response(StatusCode::OK, &health_body(hub, status))
            }
            _ => method_not_allowed("GET"),
        },
        ["readyz"] => match *req.method() {
            // Readiness: whether a load balancer should send new work here.
            Method::GET | Method::HEAD => {
                if hub.is_shutting_down() {
                    json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &health_body(hub, "shutting_down"),
                    )
                } else if hub.is_ready() {
                    json_response(StatusCode::OK, &health_body(hub, "ok"))
                } else {
                    json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &health_body(hub, "degraded"),
                    )
                }
            }
            _ => method_not_allowed("GET"),
        },
        ["stats"] => match *req.method() {
            Method::GET => match guard::admin(hub, &req).await {
                Ok(()) => json_response(StatusCode::OK, &hub.metrics().stats()),
                Err(refused) => refused,
            },
            _ => method_not_allowed("GET"),
        },
        ["metrics"] => match *req.method() {
            Method::GET => {
                if let Err(refused) = guard::admin(hub, &req).await {
                    return refused;
                }
                let accept = req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let format = MetricsFormat::negotiate(accept);
                let mut response =
                    Response::new(Full::new(Bytes::from(hub.metrics().encode(format))));
                let headers = response.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(format.content_type()),
                );
                headers.insert(header::VARY, HeaderValue::from_static("accept"));
                response
            }
            _ => method_not_allowed("GET"),
        },
        ["v1", "publish"] => match *req.method() {
            Method::POST => batch::publish(hub, req).await,
            _ => method_not_allowed("POST"),
        },
        ["v1", "topics", topic, "events"] => {
            let topic = percent_decode(topic);
            match *req.method() {
                Method::POST => publish(hub, &topic, req).await,
                Method::GET => match guard::read(hub, &req, &topic).await {
                    Ok(_) => poll(hub, &topic, &req).await,
                    Err(refused) => refused,
                },
                _ => method_not_allowed("GET, POST"),
            }
        }
        // An SSE request on a kept-alive connection; a first request never reaches hyper.
        ["v1", "sse"] | ["v1", "topics", _, "sse"] => match *req.method() {
            Method::GET => sse::reconnect_elsewhere(),
            _ => method_not_allowed("GET"),
        },
        ["v1", "topics", topic, "state"] => {
            let topic = percent_decode(topic);
            match *req.method() {
                Method::GET => match guard::read(hub, &req, &topic).await {
                    Ok(_) => get_state(hub, &topic, &req).await,
                    Err(refused) => refused,
                },
                Method::PUT => put_state(hub, &topic, req).await,
                Method::PATCH => patch_state(hub, &topic, req).await,
                _ => method_not_allowed("GET, PUT, PATCH"),
            }
        }
        ["v1", "topics", topic, "close"] => {
            let topic = percent_decode(topic);
            match *req.method() {
                Method::POST => match guard::close(hub, &req).await {
                    Err(refused) => refused,
                    Ok(()) if crate::topic::is_reserved(&topic) => {
                        dashboard::refuse_reserved_write(&topic).unwrap_or_default()
                    }
                    Ok(()) => match hub.close_topic_value(&topic).await {
                        Ok(version) => json_response(
                            StatusCode::OK,
                            &serde_json::json!({"topic": topic, "version": version, "status": "closed"}),
                        ),
                        Err(e) => publish_error(&e),
                    },
                },
                _ => method_not_allowed("POST"),
            }
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route for {path}"),
        ),
    }
}

/// `POST /v1/topics/{topic}/events`: the body is one JSON value, published as is.
async fn publish(hub: &Hub, topic: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(refused) = dashboard::refuse_reserved_write(topic) {
        return refused;
    }
    if let Err(refused) = guard::publish(hub, &req, topic).await {
        return refused;
    }
    let limit = hub.config().max_publish_bytes;
    let body = match read_body(req, limit).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let range = match hub.check_publication(&body) {
        Ok(range) => range,
        Err(e) => return publish_error(&e),
    };
    match hub.publish_value(topic, &body[range]).await {
        Ok(published) => json_response(
            StatusCode::ACCEPTED,
            &PublishedBody {
                topic: &published.topic,
                offset: published.offset,
            },
        ),
        Err(e) => publish_error(&e),
    }
}

/// The body of `202 Accepted`, fields in the documented order.
#[derive(Serialize)]
struct PublishedBody<'a> {
    topic: &'a str,
    offset: u64,
}

/// The HTTP answer to a refused publication or state write.
pub(crate) fn publish_error(e: &PublishError) -> Response<Full<Bytes>> {
    let (status, code, retry_after) = classify(e);
    let response = error_response(status, code, &e.to_string());
    match retry_after {
        Some(after) => with_retry_after(response, after),
        None => response,
    }
}

/// A refused write's status, stable code and, for a refusal that passes, when to retry:
/// the same for one request and for each item of a batch.
pub(crate) fn classify(
    e: &PublishError,
) -> (StatusCode, &'static str, Option<std::time::Duration>) {
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    let (status, code) = match e {
        PublishError::InvalidTopic(_) => (StatusCode::BAD_REQUEST, "invalid_topic"),
        PublishError::InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
        PublishError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        PublishError::Limit(JsonLimitError::TooDeep { .. }) => {
            (StatusCode::UNPROCESSABLE_ENTITY, "json_too_deep")
        }
        PublishError::Limit(JsonLimitError::TooLarge { .. }) => {
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
        }
        PublishError::Overloaded { retry_after } => {
            return (unavailable, "overloaded", Some(*retry_after));
        }
        PublishError::Bus(crate::BusError::Unavailable(_)) => {
            return (unavailable, "bus_unavailable", Some(BUS_RETRY_AFTER));
        }
        PublishError::Bus(crate::BusError::Contended) => {
            return (unavailable, "state_contended", Some(BUS_RETRY_AFTER));
        }
        PublishError::Topic(TopicError::TooManyTopics { .. }) => {
            return (
                unavailable,
                "too_many_topics",
                Some(TOO_MANY_TOPICS_RETRY_AFTER),
            );
        }
        PublishError::Topic(TopicError::StateBudget { .. }) => {
            (StatusCode::INSUFFICIENT_STORAGE, "state_budget_exhausted")
        }
        PublishError::Topic(TopicError::Closed(_)) => (StatusCode::CONFLICT, "topic_closed"),
        // `Hub` looks a retired topic up again; this is never returned to a client.
        PublishError::Topic(TopicError::Retired(_)) => (unavailable, "retry"),
        PublishError::Topic(TopicError::WrongKind { .. }) => {
            (StatusCode::CONFLICT, "wrong_topic_kind")
        }
        PublishError::Topic(TopicError::PreconditionFailed { .. }) => {
            (StatusCode::PRECONDITION_FAILED, "precondition_failed")
        }
        PublishError::Topic(TopicError::State(p)) => (
            StatusCode::from_u16(p.http_status()).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY),
            p.code(),
        ),
    };
    (status, code, None)
}

/// What a `503 too_many_topics` tells the publisher: idle topics are swept about this often
/// with the default `history_max_age`.
const TOO_MANY_TOPICS_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// Adds `Retry-After` in whole seconds (at least one).
fn with_retry_after(
    mut response: Response<Full<Bytes>>,
    after: std::time::Duration,
) -> Response<Full<Bytes>> {
    let seconds = after.as_secs().max(1);
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// Events one poll returns unless `limit` says otherwise.
const DEFAULT_POLL_LIMIT: usize = 100;
/// Most events one poll returns: bounds what a single request can cost.
const MAX_POLL_LIMIT: usize = 1000;

/// The `key=value` pairs of a URI's query, still percent-encoded; a pair without `=` has
/// an empty value.
pub(crate) fn query_pairs(uri: &http::Uri) -> impl Iterator<Item = (&str, &str)> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// `GET /v1/topics/{topic}/events?since=N&limit=M&wait=S`: the polling fallback; with
/// `wait`, a long-poll that answers as soon as something newer exists.
async fn poll(hub: &Hub, topic: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut since = String::new();
    let mut limit = DEFAULT_POLL_LIMIT;
    let mut wait = std::time::Duration::ZERO;
    for (key, value) in query_pairs(req.uri()) {
        match key {
            "since" => since = percent_decode(value),
            "limit" => match value.parse::<usize>() {
                Ok(n) if n > 0 => limit = n.min(MAX_POLL_LIMIT),
                _ => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "invalid_limit",
                        "limit must be a positive integer",
                    );
                }
            },
            "wait" => match value.parse::<u64>() {
                Ok(seconds) => {
                    wait = std::time::Duration::from_secs(seconds).min(hub.config().max_poll_wait)
                }
                Err(_) => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "invalid_wait",
                        "wait must be a whole number of seconds",
                    );
                }
            },
            _ => {}
        }
    }
    let polled = if wait.is_zero() && hub.bus().is_none() {
        hub.poll(topic, &since, limit).map(|body| (body, false))
    } else {
        // Shutdown answers a waiting poller at once with what there is.
        let stop = context::BodyDeadline::of(req).stop;
        tokio::select! {
            polled = hub.poll_wait(topic, &since, limit, wait) => polled,
            () = stop.cancelled() => hub.poll(topic, &since, limit).map(|body| (body, false)),
        }
    };
    match polled {
        // Too many polls wait already: this one answers now and closes its connection, so
        // it does not hold an HTTP place while its client comes back.
        Ok((body, true)) => {
            let etag = poll_etag(&body);
            context::closing(poll_page_response(body, etag))
        }
        Ok((body, false)) => {
            let etag = poll_etag(&body);
            if is_not_modified(req, &etag) {
                return not_modified(etag);
            }
            poll_page_response(body, etag)
        }
        Err(PollError::InvalidTopic(e)) => {
            error_response(StatusCode::BAD_REQUEST, "invalid_topic", &e.to_string())
        }
        Err(e @ PollError::InvalidSince(_)) => {
            error_response(StatusCode::BAD_REQUEST, "invalid_since", &e.to_string())
        }
        Err(e @ PollError::StateTopic(_)) => {
            error_response(StatusCode::CONFLICT, "wrong_topic_kind", &e.to_string())
        }
        Err(e @ PollError::Ahead { .. }) => {
            error_response(StatusCode::CONFLICT, "version_ahead", &e.to_string())
        }
        Err(e @ PollError::TooManyTopics(_)) => with_retry_after(
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_topics",
                &e.to_string(),
            ),
            TOO_MANY_TOPICS_RETRY_AFTER,
        ),
        Err(PollError::Bus(e)) => bus_error(&e),
    }
}

/// `{"status": ..., "bus": ...}` for `/healthz` and `/readyz`.
fn health_body(hub: &Hub, status: &str) -> serde_json::Value {
    let bus = match hub.bus() {
        None => "local",
        Some(bus) if bus.is_healthy() => "redis",
        Some(_) => "redis_unavailable",
    };
    serde_json::json!({"status": status, "bus": bus})
}

/// The answer while the shared bus does not take requests: `503` with `Retry-After`.
fn bus_error(e: &crate::BusError) -> Response<Full<Bytes>> {
    let code = match e {
        crate::BusError::Unavailable(_) => "bus_unavailable",
        crate::BusError::Contended => "state_contended",
    };
    with_retry_after(
        error_response(StatusCode::SERVICE_UNAVAILABLE, code, &e.to_string()),
        BUS_RETRY_AFTER,
    )
}

/// What a `bus_unavailable` refusal tells the client to wait before retrying.
const BUS_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// A poll page as a `200` with its `ETag`.
fn poll_page_response(body: Vec<u8>, etag: HeaderValue) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::ETAG, etag);
    response
}

/// The strong `ETag` of a poll page: a digest of its body.
///
/// A page is not a function of the topic's version and the request's `since` and `limit`
/// alone: history evicted by age or by the memory budget, or `max_poll_bytes`, changes it
/// while the version stays put. The body's digest changes exactly when the page does, so
/// a poller that sends it back in `If-None-Match` gets `304` only for a byte-identical page.
fn poll_etag(body: &[u8]) -> HeaderValue {
    use sha1::Digest as _;
    let digest = sha1::Sha1::digest(body);
    let mut tag = String::with_capacity(2 + 2 * digest.len() + 2);
    tag.push_str("\"p");
    for byte in digest.iter() {
        tag.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
        tag.push(char::from(b"0123456789abcdef"[usize::from(byte & 0xf)]));
    }
    tag.push('"');
    // Quotes, `p` and hex digits are all valid header bytes.
    HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"p\""))
}

/// Whether the request's `If-None-Match` matches `etag` (RFC 9110 §13.1.2), so a `GET` is
/// answered `304 Not Modified`.
fn is_not_modified(req: &Request<Incoming>, etag: &HeaderValue) -> bool {
    let Ok(etag) = etag.to_str() else {
        return false;
    };
    // Several `If-None-Match` fields form one list (RFC 9110 §5.3).
    req.headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| conditional::if_none_match(v, etag))
}

/// `304 Not Modified`: no body, the `ETag` the client already has (RFC 9110 §15.4.5).
fn not_modified(etag: HeaderValue) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    response.headers_mut().insert(header::ETAG, etag);
    response
}

/// `GET /v1/topics/{topic}/state`: the document, its version and an `ETag` (the version),
/// or `304` when `If-None-Match` names it.
async fn get_state(hub: &Hub, topic: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match hub.state_value(topic).await {
        Ok(Some((version, json))) => {
            let etag = HeaderValue::from_str(&version.etag()).ok();
            if let Some(etag) = etag.as_ref()
                && is_not_modified(req, etag)
            {
                return not_modified(etag.clone());
            }
            let v = version.to_buf();
            let mut body = Vec::with_capacity(json.len() + 96);
            body.extend_from_slice(br#"{"topic":""#);
            body.extend_from_slice(topic.as_bytes());
            body.extend_from_slice(br#"","version":""#);
            body.extend_from_slice(v.as_bytes());
            body.extend_from_slice(br#"","state":"#);
            body.extend_from_slice(&json);
            body.push(b'}');
            let mut response = Response::new(Full::new(Bytes::from(body)));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(etag) = etag {
                headers.insert(header::ETAG, etag);
            }
            response
        }
        Ok(None) => error_response(
            StatusCode::NOT_FOUND,
            "no_state",
            &format!("topic {topic} holds no state document"),
        ),
        Err(e) => publish_error(&e),
    }
}

/// `PUT /v1/topics/{topic}/state`: replaces the document.
async fn put_state(hub: &Hub, topic: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(refused) = dashboard::refuse_reserved_write(topic) {
        return refused;
    }
    if let Err(refused) = guard::publish(hub, &req, topic).await {
        return refused;
    }
    let if_match = if_match(&req);
    let body = match read_body(req, hub.config().max_publish_bytes).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    if let Err(e) = hub.check_publication(&body) {
        return publish_error(&e);
    }
    // Depth-checked above, so building the tree stays within its bound.
    let document: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(document) => document,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "invalid_json", &e.to_string()),
    };
    state_written(
        hub.put_state_value(topic, document, if_match.as_deref())
            .await,
    )
}

/// `PATCH /v1/topics/{topic}/state` with `application/json-patch+json`: RFC 6902, atomic.
async fn patch_state(hub: &Hub, topic: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(refused) = dashboard::refuse_reserved_write(topic) {
        return refused;
    }
    if let Err(refused) = guard::publish(hub, &req, topic).await {
        return refused;
    }
    let media = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media != "application/json-patch+json" {
        return error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "PATCH takes an RFC 6902 JSON Patch as application/json-patch+json",
        );
    }
    let if_match = if_match(&req);
    let body = match read_body(req, hub.config().max_publish_bytes).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    if let Err(e) = hub.check_publication(&body) {
        return publish_error(&e);
    }
    state_written(
        hub.patch_state_value(topic, &body, if_match.as_deref())
            .await,
    )
}

fn if_match(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn state_written(result: Result<StateWritten, PublishError>) -> Response<Full<Bytes>> {
    match result {
        Ok(written) => {
            let mut response = json_response(
                StatusCode::OK,
                &serde_json::json!({
                    "topic": written.topic,
                    "version": written.version,
                    "changed": written.changed,
                }),
            );
            if let Ok(etag) = HeaderValue::from_str(&written.version.etag()) {
                response.headers_mut().insert(header::ETAG, etag);
            }
            response
        }
        Err(e) => publish_error(&e),
    }
}

/// Reads a body of at most `limit` bytes; more is a 413 before reading it all when the
/// length is announced. A body that takes longer than `body_timeout` is a 408, and one
/// still arriving when shutdown starts a 503; both close the connection.
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Response<Full<Bytes>>> {
    let deadline = context::BodyDeadline::of(&req);
    let too_large = || publish_error(&PublishError::TooLarge { limit });
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = Limited::new(req.into_body(), limit);
    // A small body usually arrived with its head and is ready at once: read what is ready
    // without a timer or a shutdown registration (both cost more than the publish).
    let mut ready = bytes::BytesMut::new();
    match take_ready(&mut body, &mut ready) {
        Some(Ok(())) => return Ok(ready.freeze()),
        Some(Err(e)) => return Err(body_error(e, too_large)),
        None => {}
    }
    let read = tokio::time::timeout(deadline.timeout, body.collect());
    let read = tokio::select! {
        read = read => read,
        () = deadline.stop.cancelled() => return Err(context::shutting_down_response()),
    };
    let Ok(read) = read else {
        return Err(context::request_timeout_response());
    };
    match read {
        Ok(collected) if ready.is_empty() => Ok(collected.to_bytes()),
        Ok(collected) => {
            ready.extend_from_slice(&collected.to_bytes());
            Ok(ready.freeze())
        }
        Err(e) => Err(body_error(e, too_large)),
    }
}

/// Appends the frames of `body` that are ready now to `ready`, polling with a no-op waker:
/// `Some(Ok)` if that was the whole body, `None` if more is to come (the caller then waits
/// for it as usual, which registers the real waker).
#[allow(clippy::type_complexity)]
fn take_ready(
    body: &mut Limited<Incoming>,
    ready: &mut bytes::BytesMut,
) -> Option<Result<(), Box<dyn std::error::Error + Send + Sync>>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        match hyper::body::Body::poll_frame(std::pin::Pin::new(&mut *body), &mut cx) {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    ready.extend_from_slice(data);
                }
            }
            std::task::Poll::Ready(None) => return Some(Ok(())),
            std::task::Poll::Ready(Some(Err(e))) => return Some(Err(e)),
            std::task::Poll::Pending => return None,
        }
    }
}

/// The answer to a body that could not be read: too large, or broken off.
fn body_error(
    e: Box<dyn std::error::Error + Send + Sync>,
    too_large: impl FnOnce() -> Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    if e.is::<http_body_util::LengthLimitError>() {
        return too_large();
    }
    error_response(
        StatusCode::BAD_REQUEST,
        "bad_request",
        &format!("could not read the request body: {e}"),
    )
}

/// Decodes `%XX` escapes in a path segment (a client may escape the `:` of a topic).
pub(crate) fn percent_decode(segment: &str) -> String {
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
