//! The WebSocket upgrade: validate the handshake, take the client's places, answer `101`,
//! and hand the socket hyper gives back to a shard.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;

use super::context::RequestContext;
use super::limits::IpSlot;
use super::{Refusal, error_response};
use crate::hub::{Hub, Open};
use crate::proto::session::Mode;
use crate::proto::{deflate, handshake};

/// `503` with `Retry-After: 1`.
fn unavailable(code: &str, message: &str) -> Response<Full<Bytes>> {
    let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, code, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Takes a new peer's places: one under `max_connections_per_ip` for its client (the TCP
/// peer, or for a trusted proxy the client it names), then one under `max_connections`.
/// WebSocket connections and SSE streams count alike.
pub(crate) fn reserve_place(
    hub: &Hub,
    ctx: Option<&RequestContext>,
    headers: &HeaderMap,
) -> Result<IpSlot, Refusal> {
    let slot = match ctx {
        Some(ctx) => {
            let client = ctx.limits.proxies.client(ctx.peer, headers);
            match ctx.limits.connections.try_acquire(client) {
                Some(slot) => slot,
                None => {
                    tracing::debug!(%client, "too many connections from one address");
                    return Err(Box::new(unavailable(
                        "too_many_connections",
                        "too many connections from this address; retry later",
                    )));
                }
            }
        }
        None => IpSlot::unlimited(),
    };
    if !hub.reserve_connection() {
        return Err(Box::new(unavailable(
            "over_capacity",
            "the gateway is at its connection limit; retry later",
        )));
    }
    Ok(slot)
}

/// Answers a WebSocket upgrade request: validates it, replies 101 and, once hyper hands the
/// socket back, hands it to a shard. Refusals are JSON errors.
pub(crate) async fn upgrade(
    hub: &Arc<Hub>,
    tracker: &TaskTracker,
    mut req: http::Request<Incoming>,
    mode: Mode,
    subscribe: Option<String>,
) -> Response<Full<Bytes>> {
    let config = hub.config();
    let accept = match handshake::validate(
        req.method(),
        req.version(),
        req.headers(),
        &config.allowed_origins,
    ) {
        Ok(accept) => accept,
        Err(e) => {
            let mut response = error_response(e.status(), e.code(), &e.to_string());
            if e == handshake::HandshakeError::MethodNotAllowed {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET"));
            }
            if e == handshake::HandshakeError::UnsupportedVersion {
                response.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static(handshake::WEBSOCKET_VERSION),
                );
            }
            return response;
        }
    };
    // RFC 7692: the client's first acceptable offer, unless compression is off.
    let deflate = if config.permessage_deflate {
        let offers = req.headers().get_all(header::SEC_WEBSOCKET_EXTENSIONS);
        deflate::negotiate(offers.iter().map(|v| v.as_bytes()))
    } else {
        None
    };
    // Before anything is reserved: a refused credential costs no connection place.
    let identity = if hub.auth().is_enabled() {
        match super::guard::upgrade(hub, &req).await {
            Ok(identity) => Some(identity),
            Err(refused) => return refused,
        }
    } else {
        None
    };
    let ctx = req.extensions().get::<RequestContext>().cloned();
    let slot = match reserve_place(hub, ctx.as_ref(), req.headers()) {
        Ok(slot) => slot,
        Err(response) => return *response,
    };
    let Some(reclaim) = ctx.map(|c| c.reclaim) else {
        // Only a connection served by `net` can be upgraded.
        hub.release_unused();
        return error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "this request cannot be upgraded",
        );
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let hub = hub.clone();
    tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                hub.release_unused();
                return;
            }
        };
        match reclaim(upgraded) {
            Ok(reclaimed) => {
                let open = Open::WebSocket {
                    mode,
                    subscribe,
                    identity,
                    deflate,
                };
                hub.register(
                    reclaimed.stream,
                    reclaimed.tls,
                    reclaimed.leftover,
                    open,
                    slot,
                )
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot take the socket back");
                hub.release_unused();
            }
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(value) = HeaderValue::from_str(&accept.accept_key) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    if let Some(agreed) = deflate
        && let Ok(value) = HeaderValue::from_str(&agreed.response())
    {
        headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, value);
    }
    if let Some(protocol) = accept.protocol {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol),
        );
    }
    response
}
