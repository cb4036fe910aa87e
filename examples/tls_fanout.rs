//! What native TLS costs on the fan-out path: starts a `tidings` binary (plain, or with a
//! certificate made here), opens `--subscribers` WebSockets (`ws://` or `wss://`) on one
//! topic, measures the server's RSS growth per idle connection, then publishes `--size`
//! byte events at `--rate` per second for `--secs` and reports publish-to-receive p50/p99,
//! loss and the server's CPU time per delivery (from /proc).
//!
//! A dedicated client rather than `tidings-loadtest`: the harness's client codec speaks
//! plain TCP only, and this keeps the TLS comparison out of a crate being reworked.
//!
//! ```sh
//! cargo build --release --bin tidings --example tls_fanout
//! target/release/examples/tls_fanout --bin target/release/tidings --tls
//! target/release/examples/tls_fanout --bin target/release/tidings
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Args {
    bin: String,
    tls: bool,
    subscribers: usize,
    rate: u64,
    secs: u64,
    size: usize,
}

fn args() -> Args {
    let mut args = Args {
        bin: "target/release/tidings".into(),
        tls: false,
        subscribers: 1000,
        rate: 10,
        secs: 20,
        size: 256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().expect("a value");
        match arg.as_str() {
            "--bin" => args.bin = value(),
            "--tls" => args.tls = true,
            "--subscribers" => args.subscribers = value().parse().expect("a number"),
            "--rate" => args.rate = value().parse().expect("a number"),
            "--secs" => args.secs = value().parse().expect("a number"),
            "--size" => args.size = value().parse().expect("a number"),
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

struct Client {
    connector: Option<tokio_rustls::TlsConnector>,
    addr: std::net::SocketAddr,
}

impl Client {
    async fn connect(&self) -> Box<dyn Io> {
        let tcp = TcpStream::connect(self.addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        match &self.connector {
            None => Box::new(tcp),
            Some(connector) => {
                let name = ServerName::try_from("localhost").expect("name");
                Box::new(connector.connect(name, tcp).await.expect("TLS handshake"))
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let args = args();
    let dir = std::env::temp_dir().join(format!("tidings-tls-fanout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut command = tokio::process::Command::new(&args.bin);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--log", "warn"])
        .env("TIDINGS_MAX_QUEUED_BYTES", "4194304")
        // Every subscriber connects from 127.0.0.1, its WebSocket handshakes overlapping.
        .env("TIDINGS_MAX_HANDSHAKES_PER_IP", "0")
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped());
    let connector = if args.tls {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        std::fs::write(dir.join("cert.pem"), made.cert.pem()).expect("write");
        std::fs::write(dir.join("key.pem"), made.signing_key.serialize_pem()).expect("write");
        command
            .env("TIDINGS_TLS_CERT_FILE", dir.join("cert.pem"))
            .env("TIDINGS_TLS_KEY_FILE", dir.join("key.pem"));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(made.cert.der().clone()).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
    } else {
        None
    };
    let mut child = command.spawn().expect("spawn tidings");
    let pid = child.id().expect("pid");
    let stdout = child.stdout.take().expect("stdout");
    let line = tokio::io::BufReader::new(stdout)
        .lines()
        .next_line()
        .await
        .expect("stdout")
        .expect("a listening line");
    let addr: std::net::SocketAddr = line
        .rsplit("://")
        .next()
        .and_then(|a| a.parse().ok())
        .expect("an address");
    let client = Arc::new(Client { connector, addr });

    // One connection first, so the baseline has the runtime and shards warmed.
    let mut publisher = client.connect().await;
    let topic = "bench:fanout";
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_bytes(pid);

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u64>>();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let stop = tokio_util::sync::CancellationToken::new();
    for _ in 0..args.subscribers {
        let client = client.clone();
        let tx = tx.clone();
        let ready = ready_tx.clone();
        let stop = stop.clone();
        let scheme = if args.tls { "wss" } else { "ws" };
        let stream = client.connect().await;
        tokio::spawn(async move {
            let request = format!("{scheme}://localhost/ws")
                .into_client_request()
                .expect("request");
            let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
                .await
                .expect("WebSocket handshake");
            let subscribe = format!(r#"{{"type":"subscribe","topics":["{topic}"],"id":1}}"#);
            ws.send(Message::text(subscribe)).await.expect("subscribe");
            let mut latencies = Vec::new();
            loop {
                tokio::select! {
                    message = ws.next() => match message {
                        Some(Ok(Message::Text(text))) => {
                            if text.contains("\"subscribed\"") {
                                let _ = ready.send(());
                            } else if let Some(at) = text.find("\"sent\":") {
                                let digits: String = text[at + 7..]
                                    .chars()
                                    .take_while(char::is_ascii_digit)
                                    .collect();
                                if let Ok(sent) = digits.parse::<u64>() {
                                    latencies.push(now_us().saturating_sub(sent));
                                }
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                    () = stop.cancelled() => break,
                }
            }
            let _ = tx.send(latencies);
        });
    }
    drop(tx);
    for _ in 0..args.subscribers {
        ready_rx.recv().await.expect("a subscription");
    }
    // Let the allocator return what the handshakes freed (the binary purges on idle).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_idle = rss_bytes(pid);
    let per_conn = (rss_idle.saturating_sub(rss_before)) as f64 / args.subscribers as f64;

    let pad = "x".repeat(args.size.saturating_sub(40));
    let cpu_start = cpu_seconds(pid);
    let started = Instant::now();
    let total = args.rate * args.secs;
    let mut interval = tokio::time::interval(Duration::from_micros(1_000_000 / args.rate));
    let mut response = vec![0u8; 4096];
    for _ in 0..total {
        interval.tick().await;
        let body = format!(r#"{{"sent":{},"pad":"{pad}"}}"#, now_us());
        let request = format!(
            "POST /v1/topics/{topic}/events HTTP/1.1\r\nhost: localhost\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        publisher
            .write_all(request.as_bytes())
            .await
            .expect("publish");
        // The answer is small and arrives whole; read until its body's closing brace.
        let mut got = Vec::new();
        while !got.ends_with(b"}") {
            let n = publisher.read(&mut response).await.expect("response");
            assert!(n > 0, "the publisher's connection closed");
            got.extend_from_slice(&response[..n]);
        }
    }
    // Let the last deliveries land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = cpu_seconds(pid) - cpu_start;
    let elapsed = started.elapsed();
    stop.cancel();
    let mut all = Vec::new();
    while let Some(latencies) = rx.recv().await {
        all.extend(latencies);
    }
    all.sort_unstable();
    let expected = total as usize * args.subscribers;
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "mode={} subscribers={} published={} delivered={} lost={} p50_ms={:.2} p99_ms={:.2} \
         server_cpu_s={:.3} cpu_us_per_delivery={:.2} idle_rss_bytes_per_conn={:.0} secs={:.1}",
        if args.tls { "tls" } else { "plain" },
        args.subscribers,
        total,
        all.len(),
        expected.saturating_sub(all.len()),
        pct(0.50),
        pct(0.99),
        cpu,
        cpu * 1e6 / all.len().max(1) as f64,
        per_conn,
        elapsed.as_secs_f64(),
    );
    let _ = std::fs::remove_dir_all(&dir);
}
