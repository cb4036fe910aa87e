//! Sockets: the accept loop, hyper connections, and the hand-off of upgraded sockets to the
//! hub's shards.

use std::future::Future;
use std::io;
use std::sync::Arc;

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

/// Pending connections the kernel may queue before `accept`. tokio's `bind` asks for 128,
/// which a connection storm overflows: the dropped SYNs are retried after a second, so
/// 10,000 clients took over a second to connect even when the gateway was idle. 4096 is the
/// usual `net.core.somaxconn` cap; the kernel lowers it to that sysctl if smaller.
pub const LISTEN_BACKLOG: u32 = 4096;

/// How long to pause accepting after an accept error (such as EMFILE).
const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

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

/// Accepts connections on `listener` until `shutdown` resolves, then drains.
///
/// Draining stops accepting, sends close 1001 to every WebSocket (after what is already
/// queued for it), lets HTTP requests in progress finish, and waits up to
/// `shutdown_timeout` for all of it.
pub async fn serve(
    hub: Arc<Hub>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    tokio::spawn(sweep_topics(hub.clone(), stop.clone()));
    let handshakes = Arc::new(Semaphore::new(hub.config().max_handshakes.max(1)));
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
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    tracker.spawn(serve_http(hub.clone(), stream, tracker.clone(), stop.clone(), permit));
                }
                // Out of file descriptors and the like: keep serving what is open.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // Usually out of file descriptors: retrying at once would spin a core
                    // while nothing can change; a pause lets connections end meanwhile.
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
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

/// Serves one HTTP connection; `_permit` holds its place among the handshakes in progress
/// until the connection upgrades or ends.
async fn serve_http(
    hub: Arc<Hub>,
    stream: TcpStream,
    tracker: TaskTracker,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let service = {
        let hub = hub.clone();
        let tracker = tracker.clone();
        hyper::service::service_fn(move |req| {
            let hub = hub.clone();
            let tracker = tracker.clone();
            async move { Ok::<_, std::convert::Infallible>(route(&hub, &tracker, req).await) }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(hub.config().handshake_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
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
        let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
            tracing::error!("upgraded connection is not a TcpStream");
            hub.release_unused();
            return;
        };
        // Copy out what the client sent after its request, so hyper's buffer is freed.
        let leftover = parts.read_buf.to_vec();
        drop(parts.read_buf);
        // Out of tokio's reactor and into a shard's: the socket stays non-blocking.
        match parts.io.into_inner().into_std() {
            Ok(stream) => hub.register(stream, leftover, mode, subscribe),
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
