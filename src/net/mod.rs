//! Sockets: the accept loop, hyper connections, and the hand-off of upgraded sockets to the
//! hub's shards.

mod accept;
mod framing;
mod limits;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::{error_response, route};
use crate::hub::Hub;
pub use crate::hub::Mode;
use crate::proto::{CloseCode, handshake};
use accept::{
    ACCEPT_ERROR_LOG_INTERVAL, ACCEPT_ERROR_PAUSE, ErrorLog, Reserve, TOO_MANY_HANDSHAKES,
    is_out_of_descriptors, refuse,
};
use framing::{RequestHeads, Sniffed};
pub use limits::IpSlot;
use limits::{PerIp, Proxies};

/// Pending connections the kernel may queue before `accept`. tokio's `bind` asks for 128,
/// which a connection storm overflows: the dropped SYNs are retried after a second, so
/// 10,000 clients took over a second to connect even when the gateway was idle. 4096 is the
/// usual `net.core.somaxconn` cap; the kernel lowers it to that sysctl if smaller.
pub const LISTEN_BACKLOG: u32 = 4096;

/// How long a connection with no request in progress (waiting for a head, or between
/// requests) may go on after shutdown starts, so a response hyper already took from the
/// handler is flushed rather than cut. Writing into a local socket buffer takes
/// microseconds; 100 ms is ample for that and keeps shutdown prompt however many
/// connections are stalled, since they all wait at once.
const SHUTDOWN_FLUSH_GRACE: Duration = Duration::from_millis(100);

/// Binds a listener for [`serve`] with address reuse and a deep accept backlog.
pub fn listen(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The per-address tables and the proxy rule, shared by every connection.
#[derive(Debug)]
struct Limits {
    proxies: Proxies,
    /// HTTP connections not yet upgraded, per TCP peer (`max_handshakes_per_ip`).
    handshakes: Arc<PerIp>,
    /// WebSocket connections, per client (`max_connections_per_ip`).
    connections: Arc<PerIp>,
}

/// What every request carries to its handler (as a request extension): who sent it, the
/// shared limits, and the bounds on reading its body.
#[derive(Debug, Clone)]
pub struct RequestContext {
    peer: IpAddr,
    limits: Arc<Limits>,
    body_timeout: Duration,
    stop: CancellationToken,
}

/// How an HTTP handler may read a request body: within a deadline, and no longer than
/// until shutdown starts.
#[derive(Debug, Clone)]
pub struct BodyDeadline {
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
pub fn request_timeout_response() -> Response<Full<Bytes>> {
    closing(error_response(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        "the request did not arrive in time",
    ))
}

/// `503 shutting_down`, closing the connection: the gateway stopped reading bodies.
pub fn shutting_down_response() -> Response<Full<Bytes>> {
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
fn closing(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Accepts connections on `listener` until `shutdown` resolves, then drains.
///
/// Draining stops accepting, sends close 1001 to every WebSocket (after what is already
/// queued for it), drops HTTP connections with no request in progress, cuts body reads
/// short, lets the other requests finish, and waits up to `shutdown_timeout` for all of
/// it.
///
/// Fails at once with `InvalidInput` if `trusted_proxies` or `forwarded_header` is not
/// valid.
pub async fn serve(
    hub: Arc<Hub>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let config = hub.config();
    let limits = Arc::new(Limits {
        proxies: Proxies::from_config(config)?,
        handshakes: PerIp::new(config.max_handshakes_per_ip),
        connections: PerIp::new(config.max_connections_per_ip),
    });
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    tokio::spawn(sweep_topics(hub.clone(), stop.clone()));
    let handshakes = Arc::new(Semaphore::new(config.max_handshakes.max(1)));
    let mut reserve = Reserve::open();
    let mut errors = ErrorLog::new(ACCEPT_ERROR_LOG_INTERVAL);
    tokio::pin!(shutdown);
    loop {
        // Wait for room before accepting: excess handshakes wait in the kernel's backlog.
        let permit = tokio::select! {
            permit = handshakes.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let peer = peer.ip().to_canonical();
                    // A trusted proxy carries many clients' handshakes on its own address.
                    let slot = if limits.proxies.is_trusted(peer) {
                        Some(IpSlot::unlimited())
                    } else {
                        limits.handshakes.try_acquire(peer)
                    };
                    let Some(slot) = slot else {
                        tracing::debug!(%peer, "too many handshakes from one address");
                        refuse(stream, TOO_MANY_HANDSHAKES);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let ctx = RequestContext {
                        peer,
                        limits: limits.clone(),
                        body_timeout: config.body_timeout,
                        stop: stop.clone(),
                    };
                    let held = (permit, slot);
                    tracker.spawn(serve_http(hub.clone(), stream, tracker.clone(), ctx, held));
                }
                Err(e) => {
                    drop(permit);
                    // Out of descriptors: refuse one waiting client with the reserve rather
                    // than leave it hanging (and the listener readable) until one frees.
                    let shed =
                        is_out_of_descriptors(&e) && reserve.shed_one(&listener).await;
                    if let Some(count) = errors.record(std::time::Instant::now()) {
                        tracing::warn!(error = %e, count, "accept failed (count: since last line)");
                    }
                    if !shed {
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: closing connections");
    stop.cancel();
    hub.close_all(CloseCode::GoingAway, "server shutting down");
    tracker.close();
    let deadline = hub.config().shutdown_timeout;
    let drained = tokio::time::timeout(deadline, async {
        tracker.wait().await;
        hub.drained().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = hub.open_connections(),
            "shutdown deadline passed; dropping the connections left"
        );
        hub.drop_all();
    }
    Ok(())
}

/// Forgets idle topics every so often, until `stop`.
async fn sweep_topics(hub: Arc<Hub>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(hub.sweep_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => hub.sweep_topics(),
            () = stop.cancelled() => return,
        }
    }
}

/// Whether a connection has a request in progress: from its head until its response body
/// is handed over. Shutdown drops a connection that has none at once.
#[derive(Debug, Default)]
struct InProgress(AtomicUsize);

/// One request in progress; ends when dropped.
#[derive(Debug)]
struct Busy(Arc<InProgress>);

impl Busy {
    fn enter(state: &Arc<InProgress>) -> Busy {
        state.0.fetch_add(1, Ordering::SeqCst);
        Busy(state.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in progress until hyper has taken
/// all of it.
struct TrackedBody {
    body: Full<Bytes>,
    _busy: Busy,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves one HTTP connection; `_held` holds its place among the handshakes in progress
/// (overall and for its address) until the connection upgrades or ends.
async fn serve_http(
    hub: Arc<Hub>,
    stream: TcpStream,
    tracker: TaskTracker,
    ctx: RequestContext,
    _held: (OwnedSemaphorePermit, IpSlot),
) {
    let in_progress = Arc::new(InProgress::default());
    let heads = Arc::new(parking_lot::Mutex::new(RequestHeads::default()));
    let request_timeout = hub.config().request_timeout;
    let stop = ctx.stop.clone();
    let service = {
        let hub = hub.clone();
        let tracker = tracker.clone();
        let in_progress = in_progress.clone();
        let heads = heads.clone();
        hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            let busy = Busy::enter(&in_progress);
            let conflicting_lengths = heads.lock().next_conflict();
            let hub = hub.clone();
            let tracker = tracker.clone();
            req.extensions_mut().insert(ctx.clone());
            async move {
                let response = if conflicting_lengths {
                    closing(error_response(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "a request may not carry both Content-Length and Transfer-Encoding",
                    ))
                } else {
                    tokio::time::timeout(request_timeout, route(&hub, &tracker, req))
                        .await
                        .unwrap_or_else(|_| request_timeout_response())
                };
                let (parts, body) = response.into_parts();
                Ok::<_, Infallible>(Response::from_parts(
                    parts,
                    TrackedBody { body, _busy: busy },
                ))
            }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(hub.config().handshake_timeout)
        .serve_connection(
            TokioIo::new(Sniffed::new(stream, heads, request_timeout)),
            service,
        )
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            if in_progress.0.load(Ordering::SeqCst) > 0 {
                // A request is being served; its body read, if any, was just cut short.
                conn.await
            } else {
                // Waiting for (the rest of) a head: hyper would wait for it, so don't.
                tokio::time::timeout(SHUTDOWN_FLUSH_GRACE, conn.as_mut())
                    .await
                    .unwrap_or(Ok(()))
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

/// Answers a WebSocket upgrade request: validates it, replies 101 and, once hyper hands the
/// socket back, hands it to a shard. Refusals are JSON errors.
pub fn upgrade(
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
    let slot = match req.extensions().get::<RequestContext>() {
        Some(ctx) => {
            let client = ctx.limits.proxies.client(ctx.peer, req.headers());
            match ctx.limits.connections.try_acquire(client) {
                Some(slot) => slot,
                None => {
                    tracing::debug!(%client, "too many connections from one address");
                    let mut response = error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too_many_connections",
                        "too many WebSocket connections from this address; retry later",
                    );
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return response;
                }
            }
        }
        None => IpSlot::unlimited(),
    };
    if !hub.reserve_connection() {
        let mut response = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "over_capacity",
            "the gateway is at its connection limit; retry later",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
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
        let Ok(parts) = upgraded.downcast::<TokioIo<Sniffed<TcpStream>>>() else {
            tracing::error!("upgraded connection is not a TcpStream");
            hub.release_unused();
            return;
        };
        // Copy out what the client sent after its request, so hyper's buffer is freed.
        let leftover = parts.read_buf.to_vec();
        drop(parts.read_buf);
        // Out of tokio's reactor and into a shard's: the socket stays non-blocking.
        match parts.io.into_inner().into_inner().into_std() {
            Ok(stream) => hub.register(stream, leftover, mode, subscribe, slot),
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
    if let Some(protocol) = accept.protocol {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol),
        );
    }
    response
}
