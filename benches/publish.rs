//! The publish path from an embedder, no HTTP: `Gateway::publish` of small events round
//! robin over many topics, with no subscribers, and with one WebSocket subscriber per
//! topic in the same process.
//!
//! Run: `cargo bench --bench publish`. Figures are in docs/BENCHMARKS.md.

use std::hint::black_box;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tidings::{Config, Gateway};

const TOPICS: usize = 10_000;

/// Topics with one subscriber each: 2 × 5,000 sockets in this process, well under the
/// machine's 20,000 open files.
const SUBSCRIBED_TOPICS: usize = 5_000;

const EVENT: &[u8] = br#"{"status":"running","step":3,"of":10}"#;

fn publish(c: &mut Criterion) {
    let gateway = Gateway::new(Config::default().fanout_threads(1));
    let names: Vec<String> = (0..TOPICS).map(|i| format!("runs:{i}")).collect();
    let mut group = c.benchmark_group("publish");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("no_subscribers_10k_topics", |b| {
        b.iter(|| {
            i = (i + 1) % TOPICS;
            black_box(gateway.publish(&names[i], EVENT).expect("published"));
        })
    });
    group.finish();
}

/// One subscriber per topic: each iteration is a publication *delivered*, the time running
/// from the first publish until the fan-out thread has written the last one (the
/// `deliveries` counter), so the figure is a sustained rate, not the publisher running
/// ahead of the shard.
fn publish_subscribed(c: &mut Criterion) {
    let bench = Subscribed::start(SUBSCRIBED_TOPICS).expect("subscribers connected");
    let mut group = c.benchmark_group("publish");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("one_subscriber_per_topic_5k_topics", |b| {
        b.iter_custom(|iters| {
            let before = bench.gateway.stats().deliveries;
            let started = Instant::now();
            for _ in 0..iters {
                i = (i + 1) % bench.names.len();
                black_box(
                    bench
                        .gateway
                        .publish(&bench.names[i], EVENT)
                        .expect("published"),
                );
            }
            bench.delivered(before + iters);
            started.elapsed()
        })
    });
    group.finish();
}

/// The floor under [`publish_subscribed`]: one pre-encoded 90-byte frame written straight
/// to each of 5,000 loopback sockets in turn from one thread, read by the same drain
/// thread: what one `write` per delivery costs on this machine, with no gateway at all.
fn write_floor(c: &mut Criterion) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bound");
    let addr = listener.local_addr().expect("address");
    let mut writers = Vec::with_capacity(SUBSCRIBED_TOPICS);
    let mut readers = Vec::with_capacity(SUBSCRIBED_TOPICS);
    for _ in 0..SUBSCRIBED_TOPICS {
        let reader = TcpStream::connect(addr).expect("connected");
        let (writer, _) = listener.accept().expect("accepted");
        writer.set_nodelay(true).expect("nodelay");
        reader.set_nonblocking(true).expect("non-blocking");
        writers.push(writer);
        readers.push(mio::net::TcpStream::from_std(reader));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let draining = stop.clone();
    std::thread::spawn(move || drain(readers, &draining));
    let frame = [b'x'; 90];
    let mut group = c.benchmark_group("floor");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("one_write_per_delivery_5k_sockets", |b| {
        b.iter(|| {
            i = (i + 1) % writers.len();
            black_box((&writers[i]).write(&frame).expect("written"));
        })
    });
    group.finish();
    stop.store(true, Ordering::Relaxed);
}

/// A gateway serving on a loopback port in this process, `n` WebSocket connections each
/// subscribed to its own topic, and a thread reading (and dropping) what they receive.
struct Subscribed {
    gateway: Gateway,
    names: Vec<String>,
    stop: Arc<AtomicBool>,
    _runtime: tokio::runtime::Runtime,
}

impl Subscribed {
    fn start(n: usize) -> io::Result<Subscribed> {
        let gateway = Gateway::new(Config::default().fanout_threads(1));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        runtime.spawn(gateway.clone().serve(listener, std::future::pending()));
        let names: Vec<String> = (0..n).map(|i| format!("runs:{i}")).collect();
        let mut sockets = Vec::with_capacity(n);
        for name in &names {
            sockets.push(subscribe(addr, name)?);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let draining = stop.clone();
        std::thread::spawn(move || drain(sockets, &draining));
        Ok(Subscribed {
            gateway,
            names,
            stop,
            _runtime: runtime,
        })
    }

    /// Waits until the gateway has delivered `count` publications in all.
    fn delivered(&self, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.gateway.stats().deliveries < count {
            assert!(
                Instant::now() < deadline,
                "deliveries stopped short of {count}"
            );
            std::thread::yield_now();
        }
    }
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Opens `/ws`, subscribes to `topic` and reads up to the `subscribed` acknowledgement.
fn subscribe(addr: SocketAddr, topic: &str) -> io::Result<mio::net::TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    write!(
        stream,
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )?;
    let message = format!(r#"{{"type":"subscribe","topics":["{topic}"]}}"#);
    // A masked text frame (mask all zero: the payload goes as it is).
    let mut frame = vec![0x81, 0x80 | message.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(message.as_bytes());
    stream.write_all(&frame)?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("subscribed") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::other("closed before subscribing"));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    stream.set_nonblocking(true)?;
    Ok(mio::net::TcpStream::from_std(stream))
}

/// Reads every socket as data arrives and drops it, so no subscriber ever falls behind.
fn drain(mut sockets: Vec<mio::net::TcpStream>, stop: &AtomicBool) {
    let Ok(mut poll) = mio::Poll::new() else {
        return;
    };
    for (i, socket) in sockets.iter_mut().enumerate() {
        if poll
            .registry()
            .register(socket, mio::Token(i), mio::Interest::READABLE)
            .is_err()
        {
            return;
        }
    }
    let mut events = mio::Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if poll
            .poll(&mut events, Some(Duration::from_millis(100)))
            .is_err()
        {
            return;
        }
        for event in &events {
            let socket = &mut sockets[event.token().0];
            while let Ok(n) = socket.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        }
    }
}

criterion_group!(benches, publish, publish_subscribed, write_floor);
criterion_main!(benches);
