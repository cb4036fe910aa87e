//! Shared helpers for the integration tests.
//!
//! Every test starts its own gateway on `127.0.0.1:0` and talks to it through real
//! sockets: a hand-written HTTP/1.1 client (so a test can send requests hyper's client
//! would refuse to build, such as one without `Host`), a tokio-tungstenite WebSocket
//! client for the message protocol, and a raw WebSocket client that performs the
//! handshake by hand and then writes arbitrary frame bytes.
//!
//! Timeouts here only turn a hang into a failure; nothing waits for time to pass as a
//! way of synchronising with the gateway.

#![allow(dead_code)]

mod http;
mod keys;
mod raw;
mod redis;
mod slow;
mod sse;
mod versioned;
mod ws;

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use http::*;
#[allow(unused_imports)]
pub use keys::*;
#[allow(unused_imports)]
pub use raw::*;
#[allow(unused_imports)]
pub use redis::*;
#[allow(unused_imports)]
pub use slow::*;
#[allow(unused_imports)]
pub use sse::*;
#[allow(unused_imports)]
pub use versioned::*;
#[allow(unused_imports)]
pub use ws::*;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpSocket;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any single expected thing may take before the test fails. Generous because
/// CI runs a debug build on two cores with many test processes at once.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The key from RFC 6455 §1.3 and the accept value it must produce.
pub const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// The mask every raw client frame uses unless a test says otherwise. Not all zeros, so
/// a gateway that forgets to unmask sees garbage.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Awaits `fut`, failing the test with `what` if it takes longer than [`TIMEOUT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {TIMEOUT:?} waiting for {what}"),
    }
}

/// A gateway serving on an ephemeral port; shut down when dropped.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub gw: tidings::Gateway,
    shutdown: Option<oneshot::Sender<()>>,
    serve: Option<JoinHandle<io::Result<()>>>,
}

impl TestGateway {
    /// Starts a gateway with `config` on `127.0.0.1:0`.
    pub async fn start(config: tidings::Config) -> TestGateway {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        // A deep backlog so that tests opening many connections at once are not
        // throttled by SYN retransmits.
        let listener = socket.listen(4096).expect("listen");
        let addr = listener.local_addr().expect("local addr");
        let gw = tidings::Gateway::new(config);
        let (tx, rx) = oneshot::channel::<()>();
        let serve = tokio::spawn(gw.clone().serve(listener, async move {
            let _ = rx.await;
        }));
        TestGateway {
            addr,
            gw,
            shutdown: Some(tx),
            serve: Some(serve),
        }
    }

    /// Starts a gateway on the default configuration.
    pub async fn start_default() -> TestGateway {
        TestGateway::start(tidings::Config::default()).await
    }

    /// Fires the shutdown future and waits for `serve` to return.
    pub async fn shutdown(mut self) -> io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let serve = self.serve.take().expect("serve handle");
        within("serve() to return after shutdown", serve)
            .await
            .expect("serve task panicked")
    }

    /// Waits until the gateway's stats satisfy `check`. Counters are bumped by the
    /// fan-out threads just after the socket write, so a client can see a frame a moment
    /// before it is counted; this looks again (without sleeping) until the deadline.
    pub async fn stats_until(
        &self,
        what: &str,
        check: impl Fn(&tidings::Stats) -> bool,
    ) -> tidings::Stats {
        within(what, async {
            loop {
                let stats = self.gw.stats();
                if check(&stats) {
                    return stats;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
    }

    /// Proves the gateway still works: a brand-new client can connect, and a
    /// ping/pong round trip succeeds. Used after every abuse to catch panics.
    pub async fn assert_alive(&self) {
        if let Some(serve) = &self.serve {
            assert!(
                !serve.is_finished(),
                "serve() returned (or panicked) before shutdown"
            );
        }
        let mut client = WsClient::connect(self.addr).await;
        client.ping(424242).await;
        let health = http_get(self.addr, "/healthz").await;
        assert_eq!(health.status, 200, "healthz after abuse: {health:?}");
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The `tidings` binary with no `TIDINGS_*` variable from the test's environment, killed
/// when dropped.
pub fn tidings_command() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tidings"));
    for (name, _) in std::env::vars() {
        if name.starts_with("TIDINGS_") {
            command.env_remove(name);
        }
    }
    command.kill_on_drop(true);
    command
}

/// Starts `command` (a `tidings serve`) and reads the address from its first line,
/// `tidings listening on http://ADDR` (or `https://` with TLS).
pub async fn tidings_serving(
    mut command: tokio::process::Command,
) -> (tokio::process::Child, SocketAddr) {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn tidings");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let line = within("the listening line", lines.next_line())
        .await
        .expect("read stdout")
        .expect("tidings exited before listening");
    let addr = line
        .strip_prefix("tidings listening on http://")
        .or_else(|| line.strip_prefix("tidings listening on https://"))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("a socket address");
    (child, addr)
}
