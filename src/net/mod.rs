//! Sockets: the accept loop, TLS handshakes, hyper connections, reclaiming upgraded
//! sockets for the hub's shards, and SSE requests read before hyper.

mod accept;
mod framing;
pub(crate) mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::context::{Limits, Reclaimed, RequestContext, closing, request_timeout_response};
use crate::http::limits::{IpSlot, PerIp, Proxies};
use crate::http::{Refusal, error_response, route, sse};
use crate::hub::{Hub, Open};
use crate::proto::CloseCode;
use accept::{
    ACCEPT_ERROR_LOG_INTERVAL, ACCEPT_ERROR_PAUSE, ErrorLog, Reserve, TLS_REQUIRED,
    TOO_MANY_HANDSHAKES, is_out_of_descriptors, refuse,
};
use framing::{RequestHeads, Sniffed};
use tls::{CertStore, Replay};

/// A TLS connection as the gateway serves it: the first bytes read to look at the request
/// line are replayed to whoever reads next (hyper, or the SSE head reader).
type TlsConn = Replay<tokio_rustls::server::TlsStream<TcpStream>>;

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

/// Accepts connections on `listener` until `shutdown` resolves, then drains.
///
/// Draining stops accepting, sends close 1001 to every WebSocket (after what is already
/// queued for it), drops HTTP connections with no request in progress, cuts body reads
/// short, lets the other requests finish, and waits up to `shutdown_timeout` for all of
/// it.
///
/// With `tls`, every connection is TLS, its certificate taken from the store at each
/// handshake.
///
/// Fails at once with `InvalidInput` if `trusted_proxies` or `forwarded_header` is not
/// valid.
pub(crate) async fn serve(
    hub: Arc<Hub>,
    listener: TcpListener,
    tls: Option<Arc<CertStore>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let config = hub.config();
    let acceptor = match &tls {
        Some(store) => {
            // The kernel could take over record encryption (see docs/ARCHITECTURE.md,
            // "TLS"); the gateway does not use it yet, but says whether it could.
            tracing::info!(
                kernel_tls = tls::kernel_tls_available(),
                "serving TLS with rustls (userspace records)"
            );
            Some(store.acceptor()?)
        }
        None => None,
    };
    let limits = Arc::new(Limits {
        proxies: Proxies::from_config(config)?,
        handshakes: PerIp::new(config.max_handshakes_per_ip),
        connections: PerIp::new(config.max_connections_per_ip),
    });
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    tokio::spawn(sweep_topics(hub.clone(), stop.clone()));
    tokio::spawn(crate::http::dashboard::publish_stats(
        hub.clone(),
        stop.clone(),
    ));
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
                        reclaim: if acceptor.is_some() { reclaim_tls } else { reclaim },
                    };
                    let held = (permit, slot);
                    let (hub, tasks) = (hub.clone(), tracker.clone());
                    match &acceptor {
                        None => tracker.spawn(serve_http(hub, stream, tasks, ctx, held)),
                        Some(tls) => {
                            let tls = tls.clone();
                            tracker.spawn(serve_tls(hub, tls, stream, tasks, ctx, held))
                        }
                    };
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
    let first = tokio::select! {
        first = first_request_is_sse(&stream, hub.config().handshake_timeout) => first,
        () = ctx.stop.cancelled() => return,
    };
    let stream = match first {
        Some(true) => return serve_sse(&hub, stream, &ctx).await,
        Some(false) => stream,
        // Nothing arrived within `handshake_timeout`: hyper would time out the same way.
        None => return,
    };
    serve_hyper(hub, stream, tracker, ctx).await;
}

/// Serves one TLS connection: its handshake and first bytes within `handshake_timeout`
/// (a handshake that stalls holds its places no longer than a plain connection that sends
/// nothing), then SSE or hyper as [`serve_http`] does. A client speaking plain HTTP to the
/// TLS port is answered `400 tls_required` and closed.
async fn serve_tls(
    hub: Arc<Hub>,
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    tracker: TaskTracker,
    ctx: RequestContext,
    _held: (OwnedSemaphorePermit, IpSlot),
) {
    let timeout = hub.config().handshake_timeout;
    let opened = async {
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await? == 0 {
            return Ok(None);
        }
        // A TLS connection starts with a handshake record (content type 22); an HTTP
        // request starts with a method's letters.
        if first[0].is_ascii_alphabetic() {
            return Ok(Some(Err(stream)));
        }
        let mut tls = acceptor.accept(stream).await?;
        let mut head = vec![0u8; PEEK_BYTES];
        let n = tokio::io::AsyncReadExt::read(&mut tls, &mut head).await?;
        head.truncate(n);
        Ok::<_, io::Error>(Some(Ok((tls, head))))
    };
    let opened = tokio::select! {
        opened = tokio::time::timeout(timeout, opened) => opened,
        () = ctx.stop.cancelled() => return,
    };
    let (tls, head) = match opened {
        Ok(Ok(Some(Ok(opened)))) => opened,
        Ok(Ok(Some(Err(plain)))) => return refuse(plain, TLS_REQUIRED),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            return;
        }
    };
    if head.is_empty() {
        return;
    }
    let is_sse = names_sse_route(&head);
    let stream = Replay::new(head, tls);
    if is_sse {
        return serve_sse(&hub, stream, &ctx).await;
    }
    serve_hyper(hub, stream, tracker, ctx).await;
}

/// Serves HTTP/1.1 on a connection with hyper, until it ends, upgrades or shutdown.
async fn serve_hyper<S>(hub: Arc<Hub>, stream: S, tracker: TaskTracker, ctx: RequestContext)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
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

/// Takes an upgraded connection's socket back from hyper: the bytes hyper had read past the
/// request are copied out (so hyper's buffer is freed), and the socket leaves tokio's
/// reactor, still non-blocking, for a shard's.
fn reclaim(upgraded: hyper::upgrade::Upgraded) -> io::Result<Reclaimed> {
    let parts = upgraded
        .downcast::<TokioIo<Sniffed<TcpStream>>>()
        .map_err(|_| io::Error::other("the upgraded connection is not a TcpStream"))?;
    let leftover = parts.read_buf.to_vec();
    drop(parts.read_buf);
    let stream = parts.io.into_inner().into_inner().into_std()?;
    Ok(Reclaimed {
        stream,
        tls: None,
        leftover,
    })
}

/// [`reclaim`] for a TLS connection: the socket and the userspace `ServerConnection`, with
/// the plaintext hyper (or the replay) had read past the request.
fn reclaim_tls(upgraded: hyper::upgrade::Upgraded) -> io::Result<Reclaimed> {
    let parts = upgraded
        .downcast::<TokioIo<Sniffed<TlsConn>>>()
        .map_err(|_| io::Error::other("the upgraded connection is not a TLS stream"))?;
    let mut leftover = parts.read_buf.to_vec();
    drop(parts.read_buf);
    let mut reclaimed = parts.io.into_inner().into_inner().into_shard()?;
    // hyper read from the replay first, so what it did not replay comes after.
    leftover.append(&mut reclaimed.leftover);
    reclaimed.leftover = leftover;
    Ok(reclaimed)
}

/// A connection a shard can take over: its socket, out of tokio's reactor, and on TLS its
/// record layer and the plaintext read ahead and not yet replayed.
trait IntoShard {
    fn into_shard(self) -> io::Result<Reclaimed>;
}

impl IntoShard for TcpStream {
    fn into_shard(self) -> io::Result<Reclaimed> {
        Ok(Reclaimed {
            stream: self.into_std()?,
            tls: None,
            leftover: Vec::new(),
        })
    }
}

impl IntoShard for TlsConn {
    fn into_shard(self) -> io::Result<Reclaimed> {
        let (leftover, tls) = self.into_parts();
        let (stream, conn) = tls.into_inner();
        Ok(Reclaimed {
            stream: stream.into_std()?,
            tls: Some(Box::new(conn)),
            leftover,
        })
    }
}

/// Room to see a first request line in: enough for the longest SSE route's path.
const PEEK_BYTES: usize = 2048;

/// Whether the connection's first request line names an SSE route, looking at its first
/// bytes without taking them; `None` if nothing arrived within `timeout`. A request line
/// split across packets reads as "no", and hyper serves it (see `sse::reconnect_elsewhere`).
async fn first_request_is_sse(stream: &TcpStream, timeout: Duration) -> Option<bool> {
    let mut buf = [0u8; PEEK_BYTES];
    let n = match tokio::time::timeout(timeout, stream.peek(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => n,
        Ok(_) => return Some(false),
        Err(_) => return None,
    };
    Some(names_sse_route(&buf[..n]))
}

/// Whether `head`, a connection's first bytes, starts with a request line naming an SSE
/// route.
fn names_sse_route(head: &[u8]) -> bool {
    let Some(rest) = head.strip_prefix(b"GET ") else {
        return false;
    };
    let Some(end) = rest.iter().position(|&b| b == b' ') else {
        return false;
    };
    std::str::from_utf8(&rest[..end]).is_ok_and(sse::is_sse_path)
}

/// Serves a connection whose first request is an SSE stream, without hyper: reads its head
/// (within `handshake_timeout` and `MAX_SSE_HEAD`), checks it, writes the `200` head and
/// hands the socket to a shard; or writes the refusal and closes.
async fn serve_sse<S>(hub: &Arc<Hub>, mut stream: S, ctx: &RequestContext)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + IntoShard,
{
    let timeout = hub.config().handshake_timeout;
    let read = tokio::select! {
        read = tokio::time::timeout(timeout, read_head(&mut stream)) => read,
        // Shutdown does not wait for a head that may never come.
        () = ctx.stop.cancelled() => return,
    };
    let head = match read {
        Ok(Ok(head)) => head,
        Ok(Err(response)) => return write_refusal(stream, *response).await,
        Err(_) => return write_refusal(stream, request_timeout_response()).await,
    };
    let (method, uri, headers) = head;
    let mut open = match sse::prepare(hub, &method, &uri, &headers) {
        Ok(open) => open,
        Err(response) => return write_refusal(stream, *response).await,
    };
    let mut req = http::Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    let request = &open.request;
    let identity =
        match crate::http::guard::stream(hub, &req, &request.topics, &request.patterns).await {
            Ok(identity) => identity,
            Err(response) => return write_refusal(stream, response).await,
        };
    open.identity = hub.auth().is_enabled().then_some(identity);
    let slot = match crate::http::upgrade::reserve_place(hub, Some(ctx), req.headers()) {
        Ok(slot) => slot,
        Err(response) => return write_refusal(stream, *response).await,
    };
    let head = sse::response_head(&crate::http::guard::cors(hub, req.headers()));
    if stream.write_all(&head).await.is_err() {
        hub.release_unused();
        return;
    }
    match stream.into_shard() {
        // Bytes after the head are no request: as on plain TCP, the shard ends a stream
        // whose client sends anything more, so they are not handed on.
        Ok(taken) => hub.register(taken.stream, taken.tls, Vec::new(), Open::Sse(open), slot),
        Err(e) => {
            tracing::debug!(error = %e, "cannot take the socket back");
            hub.release_unused();
        }
    }
}

/// Reads and parses one request head; a refusal says why it could not be.
async fn read_head(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<(http::Method, http::Uri, http::HeaderMap), Refusal> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let bad =
                    || error_response(StatusCode::BAD_REQUEST, "bad_request", "malformed request");
                let method = request
                    .method
                    .and_then(|m| http::Method::from_bytes(m.as_bytes()).ok())
                    .ok_or_else(bad)?;
                let uri: http::Uri = request.path.and_then(|p| p.parse().ok()).ok_or_else(bad)?;
                let mut map = http::HeaderMap::new();
                for h in request.headers.iter() {
                    let name =
                        http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad())?;
                    let value = http::HeaderValue::from_bytes(h.value).map_err(|_| bad())?;
                    map.append(name, value);
                }
                return Ok((method, uri, map));
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => {
                return Err(Box::new(error_response(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("malformed request head: {e}"),
                )));
            }
        }
        if buf.len() >= sse::MAX_SSE_HEAD {
            return Err(Box::new(error_response(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "head_too_large",
                "the request head is larger than 16 KiB",
            )));
        }
        let mut chunk = [0u8; 4096];
        let room = (sse::MAX_SSE_HEAD - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => {
                return Err(Box::new(error_response(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "the connection ended inside the request head",
                )));
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Writes a refusal made before hyper and closes the connection.
async fn write_refusal(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    response: Response<Full<Bytes>>,
) {
    use http_body_util::BodyExt;
    let (parts, body) = closing(response).into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let bytes = sse::serialize(Response::from_parts(parts, Full::new(Bytes::new())), &body);
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
    // Closing with unread bytes makes the kernel send a reset, which can destroy the
    // refusal before the client reads it: read (and drop) what it still sends, bounded.
    let _ = tokio::time::timeout(REFUSAL_DRAIN_TIME, async {
        let mut chunk = [0u8; 4096];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN_BYTES {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// Most bytes read from a client after an SSE refusal, and for how long: a request head
/// that was too large (16 KiB) and what followed it fit.
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;
const REFUSAL_DRAIN_TIME: Duration = Duration::from_secs(1);
