//! `tidings-naive`: the design users write by default, for comparison.
//!
//! hyper serves HTTP; a WebSocket upgrade becomes a tokio-tungstenite `WebSocketStream`
//! with the default config (128 KiB read and write buffers), split into a reader task and
//! a writer task. Every publication goes into one `tokio::sync::broadcast` channel; each
//! connection's writer receives it, checks its subscriptions, and serializes the event
//! message with serde_json for itself. A lagging receiver skips what it missed, as such
//! code usually does (`Lagged(_) => continue`).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use tidings_loadtest::Result;
use tidings_loadtest::{server, wire};

/// Broadcast capacity: publications a subscriber may fall behind before it skips some.
const BROADCAST_CAPACITY: usize = 1024;

/// Largest publish body accepted.
const MAX_PUBLISH: usize = 1 << 20;

/// A publication as the broadcast channel carries it.
struct Event {
    topic: String,
    offset: u64,
    data: Box<RawValue>,
}

struct AppState {
    tx: broadcast::Sender<Arc<Event>>,
    offsets: Mutex<HashMap<String, u64>>,
}

/// The event message; serde keeps field order type, topic, offset, data, ts.
#[derive(Serialize)]
struct EventMsg<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    topic: &'a str,
    offset: u64,
    data: &'a RawValue,
    ts: u64,
}

#[derive(Deserialize)]
struct ClientMsg {
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    topics: Vec<String>,
    id: Option<u64>,
}

#[derive(Serialize)]
struct Reply<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topics: Option<&'a [String]>,
    ts: u64,
}

type Body = Full<Bytes>;

fn main() {
    tidings_loadtest::raise_nofile_limit();
    let res = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Into::into)
        .and_then(|rt| rt.block_on(run()));
    if let Err(e) = res {
        eprintln!("tidings-naive: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<()> {
    let listener = server::bind(server::listen_addr("tidings-naive")?)?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
    let state = Arc::new(AppState {
        tx,
        offsets: Mutex::new(HashMap::new()),
    });
    let std_listener_addr = listener.local_addr()?;
    println!("tidings listening on http://{std_listener_addr}");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => continue,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, state.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn json_response(status: StatusCode, json: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(json)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, code: &str) -> Response<Body> {
    json_response(status, format!(r#"{{"code":"{code}","message":"{code}"}}"#))
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<AppState>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let resp = match (req.method().clone(), path.as_str()) {
        (Method::GET, "/ws") => upgrade(req, state),
        (Method::POST, p) if server::publish_topic(p).is_some() => {
            let topic = server::publish_topic(p).unwrap_or_default().to_string();
            publish(req, &state, topic).await
        }
        (Method::GET, "/healthz") => json_response(StatusCode::OK, r#"{"status":"ok"}"#.into()),
        _ => error(StatusCode::NOT_FOUND, "not_found"),
    };
    Ok(resp)
}

async fn publish(req: Request<Incoming>, state: &AppState, topic: String) -> Response<Body> {
    let body = match http_body_util::Limited::new(req.into_body(), MAX_PUBLISH)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
    };
    let data: Box<RawValue> = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(_) => return error(StatusCode::BAD_REQUEST, "invalid_json"),
    };
    let offset = {
        let mut offsets = state.offsets.lock().unwrap_or_else(PoisonError::into_inner);
        let o = offsets.entry(topic.clone()).or_insert(0);
        *o += 1;
        *o
    };
    let reply = format!(r#"{{"topic":"{topic}","offset":{offset}}}"#);
    // No receivers is not an error: nobody is subscribed yet.
    let _ = state.tx.send(Arc::new(Event {
        topic,
        offset,
        data,
    }));
    json_response(StatusCode::ACCEPTED, reply)
}

fn upgrade(req: Request<Incoming>, state: Arc<AppState>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return error(StatusCode::BAD_REQUEST, "invalid_key");
    };
    let accept = derive_accept_key(key.as_bytes());
    let proto = req
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == "tidings.v1"));
    tokio::spawn(async move {
        if let Ok(upgraded) = hyper::upgrade::on(req).await {
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            connection(ws, state).await;
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if proto {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            header::HeaderValue::from_static("tidings.v1"),
        );
    }
    resp
}

/// The usual split: a writer task owns the sink, a reader task owns the stream.
async fn connection(ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>, state: Arc<AppState>) {
    let (mut sink, mut stream) = ws.split();
    let mut rx = state.tx.subscribe();
    let subs: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Message>();
    let writer_subs = subs.clone();
    let mut writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                m = ctl_rx.recv() => match m {
                    Some(m) => if sink.send(m).await.is_err() { break },
                    None => break,
                },
                ev = rx.recv() => match ev {
                    Ok(ev) => {
                        let wanted = writer_subs
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .contains(&ev.topic);
                        if !wanted {
                            continue;
                        }
                        let msg = EventMsg {
                            ty: "event",
                            topic: &ev.topic,
                            offset: ev.offset,
                            data: &ev.data,
                            ts: wire::now_ms(),
                        };
                        let Ok(text) = serde_json::to_string(&msg) else { continue };
                        if sink.send(Message::text(text)).await.is_err() {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            }
        }
    });
    let mut reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            let Message::Text(text) = msg else {
                if msg.is_close() {
                    break;
                }
                continue;
            };
            let Ok(m) = serde_json::from_str::<ClientMsg>(text.as_str()) else {
                continue;
            };
            let ty = match m.ty.as_str() {
                "subscribe" => {
                    subs.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .extend(m.topics.iter().cloned());
                    "subscribed"
                }
                "ping" => "pong",
                _ => continue,
            };
            let reply = Reply {
                ty,
                id: m.id,
                topics: (ty == "subscribed").then_some(&m.topics[..]),
                ts: wire::now_ms(),
            };
            let Ok(text) = serde_json::to_string(&reply) else {
                continue;
            };
            if ctl_tx.send(Message::text(text)).is_err() {
                break;
            }
        }
    });
    tokio::select! {
        _ = &mut writer => reader.abort(),
        _ = &mut reader => writer.abort(),
    }
}
