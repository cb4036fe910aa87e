//! What every request carries to its handler: who sent it, the shared per-address limits,
//! the bounds on reading its body, and how to take its socket back from hyper.
//!
//! `net` builds it for each connection and puts it in the request's extensions; handlers
//! read it from there, so `http` never depends on `net`.

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use tokio_util::sync::CancellationToken;

use super::error_response;
use super::limits::{PerIp, Proxies};

/// The per-address tables and the proxy rule, shared by every connection.
#[derive(Debug)]
pub(crate) struct Limits {
    /// Which peers may name the client in the forwarded header.
    pub proxies: Proxies,
    /// HTTP connections not yet upgraded, per TCP peer (`max_handshakes_per_ip`).
    pub handshakes: Arc<PerIp>,
    /// WebSocket connections and SSE streams, per client (`max_connections_per_ip`).
    pub connections: Arc<PerIp>,
}

/// An upgraded connection taken back from hyper, for a shard.
#[derive(Debug)]
pub(crate) struct Reclaimed {
    /// The TCP socket, non-blocking, out of tokio's reactor.
    pub stream: std::net::TcpStream,
    /// On a TLS connection, its record layer (with what it read and did not hand on yet).
    pub tls: Option<Box<rustls::ServerConnection>>,
    /// The bytes read past the request (plaintext).
    pub leftover: Vec<u8>,
}

/// Recovers the socket (and a TLS connection's record layer) and the bytes hyper read past
/// the request, from an upgraded connection.
pub(crate) type Reclaim = fn(hyper::upgrade::Upgraded) -> io::Result<Reclaimed>;

/// A request's context (a request extension).
#[derive(Debug, Clone)]
pub(crate) struct RequestContext {
    /// The TCP peer.
    pub peer: IpAddr,
    /// The shared limits.
    pub limits: Arc<Limits>,
    /// How long a body may take (`body_timeout`).
    pub body_timeout: Duration,
    /// Cancelled when the gateway starts shutting down.
    pub stop: CancellationToken,
    /// How an upgraded socket is taken back for a shard.
    pub reclaim: Reclaim,
}

/// How an HTTP handler may read a request body: within a deadline, and no longer than
/// until shutdown starts.
#[derive(Debug, Clone)]
pub(crate) struct BodyDeadline {
    /// How long the body may take (`body_timeout`).
    pub timeout: Duration,
    /// Cancelled when the gateway starts shutting down.
    pub stop: CancellationToken,
}

impl BodyDeadline {
    /// The deadline of `req`, set by the connection that read its head; a request built
    /// elsewhere gets the default `body_timeout` and is never cancelled.
    pub fn of<B>(req: &http::Request<B>) -> BodyDeadline {
        match req.extensions().get::<RequestContext>() {
            Some(ctx) => BodyDeadline {
                timeout: ctx.body_timeout,
                stop: ctx.stop.clone(),
            },
            None => BodyDeadline {
                timeout: crate::Config::default().body_timeout,
                stop: CancellationToken::new(),
            },
        }
    }
}

/// `408 request_timeout`, closing the connection: the body (or the whole request) did not
/// arrive in time, and what is left of it cannot be told from the next request.
pub(crate) fn request_timeout_response() -> Response<Full<Bytes>> {
    closing(error_response(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        "the request did not arrive in time",
    ))
}

/// `503 shutting_down`, closing the connection: the gateway stopped reading bodies.
pub(crate) fn shutting_down_response() -> Response<Full<Bytes>> {
    let mut response = closing(error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the gateway is shutting down",
    ));
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Marks `response` as the last on its connection; hyper closes after writing it.
pub(crate) fn closing(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
