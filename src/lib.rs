//! tidings: a real-time update gateway.
//!
//! Backends publish JSON to topics; tidings fans each publication out to every subscriber
//! of the topic (or of a matching pattern), over WebSocket, Server-Sent Events or
//! (long-)polling, encoding it once per transport and sharing the encoded bytes among all
//! of them.
//!
//! Layout, with dependencies pointing one way
//! (`heartbeat` ← `proto` ← `topic` ← `hub` ← `http` ← `net`):
//! - [`proto`]: sans-IO RFC 6455 handshake validation, frames, the WebSocket session, SSE
//!   encoding, close codes, JSON messages;
//! - [`topic`]: topic names and patterns, versions, history, state documents, filters, the
//!   subscription index;
//! - `hub`: topics, publication, and the shards: one thread each with its own event loop,
//!   owning a slab of peers (WebSocket connections and SSE streams);
//! - [`heartbeat`]: the one timer wheel behind every peer's heartbeat and deadlines;
//! - `http`: the HTTP endpoints (publish, poll and long-poll, state, the WebSocket upgrade,
//!   SSE requests, health, stats, metrics);
//! - `net`: the accept loop, hyper connections, and handing sockets to the shards;
//! - `auth`: tokens, API keys, grants and the origin policy ([`AuthConfig`]);
//! - [`Config`], [`Gateway`]: what an embedder or the `tidings` binary uses.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! let gateway = tidings::Gateway::new(tidings::Config::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let server = tokio::spawn(gateway.clone().serve(listener, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! }));
//! gateway.publish("runs:42", br#"{"status":"running"}"#).expect("valid topic and JSON");
//! server.await??;
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod auth;
mod bus;
mod config;
pub mod heartbeat;
mod http;
mod hub;
mod metrics;
mod net;
pub mod proto;
pub mod topic;

use std::future::Future;
use std::sync::Arc;

pub use auth::{ApiKeyConfig, AuthConfig, IssuerConfig, Secret};
pub use bus::{BusConfig, BusError, BusKind};
pub use config::{Config, ConfigError, ConfigSource};
pub use hub::{PollError, PublishError, Published, StateWritten, SubscribeError, TopicError};
pub use metrics::{ClosedStats, Stats};
pub use net::tls::{TlsConfig, TlsError};
pub use net::{LISTEN_BACKLOG, listen};

/// A running gateway's handle: cheap to clone, shared by the server and embedders.
#[derive(Clone, Debug)]
pub struct Gateway {
    hub: Arc<hub::Hub>,
    /// The certificate store, with `[tls]` configured.
    tls: Option<Arc<net::tls::CertStore>>,
}

impl Gateway {
    /// Creates a gateway (and its shard threads) with `config`.
    ///
    /// # Panics
    /// If the operating system refuses an event queue or a thread, or `[tls]` names files
    /// that hold no usable certificate and key; see [`Gateway::try_new`].
    pub fn new(config: Config) -> Gateway {
        Gateway::try_new(config).expect("creating the gateway (shard threads, TLS files)")
    }

    /// Creates a gateway, or says why the operating system refused its event queues or
    /// threads.
    /// Fails with `InvalidInput` if `[tls]` names files that hold no usable certificate
    /// and key.
    pub fn try_new(config: Config) -> std::io::Result<Gateway> {
        let hub = hub::Hub::new(config)?;
        let tls = if hub.config().tls.is_enabled() {
            let store =
                net::tls::CertStore::open(&hub.config().tls, hub.metrics().tls_reloads().clone())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            Some(Arc::new(store))
        } else {
            None
        };
        Ok(Gateway { hub, tls })
    }

    /// Reads `[tls]`'s certificate and key again (the binary does this on SIGHUP): new
    /// handshakes use them, connections already open keep theirs. On an error the
    /// certificate in force stays; either way `tidings_tls_reloads_total{result}` counts it.
    /// Without `[tls]` there is nothing to reload and this returns `Ok`.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.tls {
            Some(store) => store.reload(),
            None => Ok(()),
        }
    }

    /// Whether connections are served over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        self.hub.config()
    }

    /// Publishes one JSON value to `topic`, as `POST /v1/topics/{topic}/events` does.
    ///
    /// Returns the publication's offset once the fan-out is handed to the fan-out threads;
    /// it never waits for subscribers. When the publish queues are full it waits up to
    /// `publish_wait`, **blocking the calling thread**, and then returns
    /// [`PublishError::Overloaded`]; from async code prefer [`Gateway::publish_async`].
    pub fn publish(&self, topic: &str, json: &[u8]) -> Result<Published, PublishError> {
        let range = self.hub.check_publication(json)?;
        self.hub.publish_value_blocking(topic, &json[range])
    }

    /// As [`Gateway::publish`], waiting for room in the publish queues without blocking the
    /// thread.
    pub async fn publish_async(&self, topic: &str, json: &[u8]) -> Result<Published, PublishError> {
        let range = self.hub.check_publication(json)?;
        self.hub.publish_value(topic, &json[range]).await
    }

    /// A snapshot of the gateway's counters (the body of `GET /stats`).
    pub fn stats(&self) -> Stats {
        self.hub.metrics().stats()
    }

    /// Serves HTTP and WebSocket on `listener` until `shutdown` resolves, then closes every
    /// connection with 1001 and drains for up to `shutdown_timeout`.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let auth = self.hub.auth();
        if let Ok(addr) = listener.local_addr()
            && !addr.ip().is_loopback()
            && !auth.is_enabled()
            && !self.hub.config().auth.allow_anonymous
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                config::open_beyond_loopback(addr),
            ));
        }
        // JWKS reloads run while serving and stop with it.
        let _refreshing = auth.start();
        net::serve(self.hub, listener, self.tls, shutdown).await
    }
}

/// The README's examples, compiled and run as doctests so they cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
