//! `tidings-floor`: the physical floor of fan-out on this machine, for comparison.
//!
//! It accepts the WebSocket upgrade with a hand parse, answers a client's first
//! `subscribe` with `subscribed`, and then never reads that socket again. A publication
//! (`POST /v1/topics/{topic}/events`) is encoded into ONE event frame, and one std thread
//! per core writes that frame to its share of that topic's sockets (kept by topic) with
//! non-blocking writes: no queues, no tasks, no per-subscriber protocol work. A socket that cannot take the
//! whole frame at once is closed (there is no queue to hold the rest).
//!
//! It also serves `GET /v1/topics/{topic}/sse` the same way, as the floor of Server-Sent
//! Events: the gateway's response head and `retry:` hint, then ONE pre-encoded SSE event
//! per publication (`id:`, `event: event`, `data:` with the same JSON as the frame),
//! written to every stream of the topic by the same threads.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tidings_loadtest::Result;
use tidings_loadtest::wire::{self, RequestHead, opcode};
use tidings_loadtest::{server, sse};

/// Threads blocked in `accept` doing upgrades; a handful keeps connection storms moving
/// while one waits for a slow client.
const ACCEPT_THREADS: usize = 4;

/// How long a client may take to send its upgrade request or subscribe.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head or publish body accepted.
const MAX_REQUEST: usize = 1 << 20;

/// One publication, encoded once per transport, shared by every writer thread.
struct Publication {
    topic: u32,
    frame: Vec<u8>,
    sse: Vec<u8>,
}

/// A subscribed socket: its topic, whether it is an SSE stream, the socket.
type Sub = (u32, bool, TcpStream);

/// A writer thread's inbox and the sockets handed to it since its last publication.
struct Shard {
    tx: Mutex<Sender<Arc<Publication>>>,
    incoming: Mutex<Vec<Sub>>,
}

/// Topic name → (id, last offset).
type Topics = Mutex<HashMap<String, (u32, u64)>>;

struct Floor {
    topics: Topics,
    shards: Vec<Shard>,
    next: AtomicUsize,
    closed_slow: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Floor {
    fn topic_id(&self, topic: &str) -> u32 {
        let mut topics = lock(&self.topics);
        let n = topics.len() as u32;
        topics.entry(topic.to_string()).or_insert((n, 0)).0
    }

    fn publish(&self, topic: &str, body: &[u8]) -> u64 {
        let (id, offset) = {
            let mut topics = lock(&self.topics);
            let n = topics.len() as u32;
            let e = topics.entry(topic.to_string()).or_insert((n, 0));
            e.1 += 1;
            *e
        };
        let mut json = Vec::with_capacity(body.len() + 96);
        server::event_json(&mut json, topic, offset, body, wire::now_ms());
        let mut frame = Vec::with_capacity(json.len() + 10);
        wire::encode_server_frame(&mut frame, opcode::TEXT, &json);
        let mut sse = Vec::with_capacity(json.len() + 48);
        sse::encode_event(&mut sse, Some(&format!("0:{offset}")), "event", &json);
        let p = Arc::new(Publication {
            topic: id,
            frame,
            sse,
        });
        for shard in &self.shards {
            let _ = lock(&shard.tx).send(p.clone());
        }
        offset
    }
}

fn main() {
    tidings_loadtest::raise_nofile_limit();
    if let Err(e) = run() {
        eprintln!("tidings-floor: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let listener = server::bind(server::listen_addr("tidings-floor")?)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut receivers = Vec::new();
    let shards = (0..cores)
        .map(|_| {
            let (tx, rx) = channel();
            receivers.push(rx);
            Shard {
                tx: Mutex::new(tx),
                incoming: Mutex::new(Vec::new()),
            }
        })
        .collect();
    let floor = Arc::new(Floor {
        topics: Mutex::new(HashMap::new()),
        shards,
        next: AtomicUsize::new(0),
        closed_slow: AtomicU64::new(0),
    });
    for (i, rx) in receivers.into_iter().enumerate() {
        let floor = floor.clone();
        std::thread::spawn(move || writer(&floor, i, rx));
    }
    server::announce(&listener)?;
    let mut accepters = Vec::new();
    for _ in 0..ACCEPT_THREADS {
        let listener = listener.try_clone()?;
        let floor = floor.clone();
        accepters.push(std::thread::spawn(move || accept_loop(&listener, &floor)));
    }
    for a in accepters {
        let _ = a.join();
    }
    Ok(())
}

/// One writer thread: every publication goes to each of its sockets on that topic. The
/// sockets are kept by topic, so a publication costs only its own topic's subscribers
/// (many topics with a few subscribers each cost as little as one big topic).
fn writer(floor: &Floor, shard: usize, rx: Receiver<Arc<Publication>>) {
    let mut by_topic: HashMap<u32, Vec<(bool, TcpStream)>> = HashMap::new();
    for p in rx {
        for (topic, is_sse, sock) in lock(&floor.shards[shard].incoming).drain(..) {
            by_topic.entry(topic).or_default().push((is_sse, sock));
        }
        let Some(socks) = by_topic.get_mut(&p.topic) else {
            continue;
        };
        let mut i = 0;
        while i < socks.len() {
            let (is_sse, sock) = &mut socks[i];
            let bytes = if *is_sse { &p.sse } else { &p.frame };
            match sock.write(bytes) {
                Ok(n) if n == bytes.len() => i += 1,
                Ok(_) | Err(_) => {
                    // Partial write or would block: no queue to keep the rest in.
                    drop(socks.swap_remove(i));
                    floor.closed_slow.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if socks.is_empty() {
            by_topic.remove(&p.topic);
        }
    }
}

fn accept_loop(listener: &TcpListener, floor: &Arc<Floor>) {
    loop {
        match listener.accept() {
            // A peer that misbehaves only loses its own connection.
            Ok((stream, _)) => drop(handle(stream, floor)),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Reads until `buf` holds a full request head; returns its length.
fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize> {
    loop {
        if let Some(end) = wire::head_end(buf) {
            return Ok(end);
        }
        if buf.len() > MAX_REQUEST {
            return Err("request head too large".into());
        }
        read_more(stream, buf)?;
    }
}

fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk)?;
    if n == 0 {
        return Err("peer closed".into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn handle(mut stream: TcpStream, floor: &Arc<Floor>) -> Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let head_len = read_head(&mut stream, &mut buf)?;
    let (is_ws, sse_topic) = {
        let req = RequestHead::parse(&buf[..head_len]).ok_or("bad request head")?;
        let get = req.method == "GET";
        let sse_topic = sse::topic_of_path(req.path).filter(|_| get);
        (get && req.path == "/ws", sse_topic.map(str::to_string))
    };
    if is_ws {
        upgrade(stream, buf, head_len, floor)
    } else if let Some(topic) = sse_topic {
        stream.write_all(sse::RESPONSE_HEAD)?;
        stream.write_all(b"retry: 3000\n\n")?;
        subscribed(stream, &topic, true, floor)
    } else {
        // Publishers keep their connection alive: give them their own thread.
        let floor = floor.clone();
        std::thread::spawn(move || http_conn(stream, buf, &floor));
        Ok(())
    }
}

fn upgrade(mut stream: TcpStream, mut buf: Vec<u8>, head_len: usize, floor: &Floor) -> Result<()> {
    let (accept, proto) = {
        let req = RequestHead::parse(&buf[..head_len]).ok_or("bad request head")?;
        let key = req.header("sec-websocket-key").ok_or("no key")?;
        let proto = req
            .header("sec-websocket-protocol")
            .is_some_and(|p| p.split(',').any(|p| p.trim() == "tidings.v1"));
        (wire::accept_key(key.as_bytes()), proto)
    };
    let proto = if proto {
        "Sec-WebSocket-Protocol: tidings.v1\r\n"
    } else {
        ""
    };
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n{proto}\r\n"
    );
    stream.write_all(resp.as_bytes())?;
    buf.drain(..head_len);
    // Wait for the subscribe; anything else before it is ignored.
    let mut payload = Vec::new();
    let topic = loop {
        match wire::parse_client_frame(&buf, &mut payload) {
            Some((op, used)) => {
                buf.drain(..used);
                if op == opcode::CLOSE {
                    return Ok(());
                }
                if let (opcode::TEXT, Some(t)) = (op, wire::first_topic(&payload)) {
                    break String::from_utf8_lossy(t).into_owned();
                }
            }
            None => read_more(&mut stream, &mut buf)?,
        }
    };
    let mut ack = Vec::new();
    let text = format!(
        r#"{{"type":"subscribed","topics":["{topic}"],"ts":{}}}"#,
        wire::now_ms()
    );
    wire::encode_server_frame(&mut ack, opcode::TEXT, text.as_bytes());
    stream.write_all(&ack)?;
    subscribed(stream, &topic, false, floor)
}

/// Hands a subscribed socket to the next writer thread.
fn subscribed(stream: TcpStream, topic: &str, is_sse: bool, floor: &Floor) -> Result<()> {
    let id = floor.topic_id(topic);
    stream.set_nonblocking(true)?;
    let shard = floor.next.fetch_add(1, Ordering::Relaxed) % floor.shards.len();
    lock(&floor.shards[shard].incoming).push((id, is_sse, stream));
    Ok(())
}

/// A keep-alive HTTP connection: publishes, `/healthz`, `/stats`, 404 otherwise.
fn http_conn(mut stream: TcpStream, mut buf: Vec<u8>, floor: &Floor) {
    let _ = stream.set_read_timeout(None);
    loop {
        let Ok(head_len) = read_head(&mut stream, &mut buf) else {
            return;
        };
        let Some(req) = RequestHead::parse(&buf[..head_len]) else {
            return;
        };
        let Some(len) = req.content_length().filter(|n| *n <= MAX_REQUEST) else {
            return;
        };
        let topic = server::publish_topic(req.path).map(str::to_string);
        let (method, path) = (req.method.to_string(), req.path.to_string());
        while buf.len() < head_len + len {
            if read_more(&mut stream, &mut buf).is_err() {
                return;
            }
        }
        let body = &buf[head_len..head_len + len];
        let (status, json) = match (method.as_str(), path.as_str(), topic) {
            ("POST", _, Some(topic)) => {
                let offset = floor.publish(&topic, body);
                (
                    "202 Accepted",
                    format!(r#"{{"topic":"{topic}","offset":{offset}}}"#),
                )
            }
            ("GET", "/healthz", _) => ("200 OK", r#"{"status":"ok"}"#.to_string()),
            ("GET", "/stats", _) => {
                let slow = floor.closed_slow.load(Ordering::Relaxed);
                ("200 OK", format!(r#"{{"closed_slow":{slow}}}"#))
            }
            _ => (
                "404 Not Found",
                r#"{"code":"not_found","message":"no such route"}"#.to_string(),
            ),
        };
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
            json.len()
        );
        if stream.write_all(resp.as_bytes()).is_err() {
            return;
        }
        buf.drain(..head_len + len);
    }
}
