//! Native TLS: the `[tls]` section, the certificate and key read from PEM files, the store
//! new handshakes take their certificate from (replaced whole on reload, so a connection
//! already open is never touched), the acceptor, and a replaying wrapper for the bytes
//! read from a TLS stream to tell an SSE request from the rest.
//!
//! The handshake and every HTTP request run over `tokio_rustls`; a connection that
//! upgrades to WebSocket or opens an SSE stream leaves tokio with its
//! `rustls::ServerConnection`, which the shard then drives itself (see `hub::tls`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::RwLock;
use prometheus_client::metrics::counter::Counter;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The `[tls]` section (`TIDINGS_TLS_<KEY>` in the environment). Both files empty (the
/// default): the gateway speaks plain HTTP, as behind a terminating proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the certificate chain, the server's certificate first. Read at startup
    /// and again on every reload (SIGHUP).
    pub cert_file: String,
    /// PEM file of the certificate's private key (PKCS#8, PKCS#1 RSA or SEC1 EC). Read with
    /// the certificate.
    pub key_file: String,
}

impl TlsConfig {
    /// Whether TLS is configured (either file named; [`load`] wants both).
    pub fn is_enabled(&self) -> bool {
        !self.cert_file.is_empty() || !self.key_file.is_empty()
    }
}

/// Why a certificate or key could not be used; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// One of the two files is named and the other is not.
    #[error("tls.{0} is not set: tls.cert_file and tls.key_file go together")]
    Incomplete(&'static str),
    /// A file cannot be read or holds nothing usable.
    #[error("tls.{key} = {path:?}: {reason}")]
    File {
        /// `cert_file` or `key_file`.
        key: &'static str,
        /// The path as configured.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error("tls.key_file = {key:?} is not the key of tls.cert_file = {cert:?}: {reason}")]
    Mismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// What rustls said.
        reason: String,
    },
}

/// The crypto provider: rustls' `ring` backend (aws-lc-rs would add minutes of C and
/// assembly to every clean build; ring's AES-GCM and ChaCha20 are as fast here).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the certificate chain and key `config` names, and checks they belong together.
pub fn load(config: &TlsConfig) -> Result<Arc<CertifiedKey>, TlsError> {
    if config.cert_file.is_empty() {
        return Err(TlsError::Incomplete("cert_file"));
    }
    if config.key_file.is_empty() {
        return Err(TlsError::Incomplete("key_file"));
    }
    let cert_error = |reason: String| TlsError::File {
        key: "cert_file",
        path: config.cert_file.clone(),
        reason,
    };
    let key_error = |reason: String| TlsError::File {
        key: "key_file",
        path: config.key_file.clone(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert_file)
        .map_err(|e| cert_error(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_error("no CERTIFICATE block in it".into()));
    }
    let key =
        PrivateKeyDer::from_pem_file(&config.key_file).map_err(|e| key_error(e.to_string()))?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_error(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| TlsError::Mismatch {
        cert: config.cert_file.clone(),
        key: config.key_file.clone(),
        reason: e.to_string(),
    })?;
    Ok(Arc::new(certified))
}

/// The outcomes of reloads, counted (`tidings_tls_reloads_total{result}`).
#[derive(Debug, Clone, Default)]
pub(crate) struct ReloadCounters {
    /// Reloads that put a new certificate in force.
    pub ok: Counter,
    /// Reloads that failed; the certificate in force stayed.
    pub error: Counter,
}

/// The certificate new handshakes get. A reload swaps the `Arc`; a handshake that already
/// took the old one, and every connection open, keeps what it has.
#[derive(Debug)]
pub struct CertStore {
    config: TlsConfig,
    current: RwLock<Arc<CertifiedKey>>,
    counters: ReloadCounters,
}

impl CertStore {
    /// Loads the files `config` names.
    pub(crate) fn open(
        config: &TlsConfig,
        counters: ReloadCounters,
    ) -> Result<CertStore, TlsError> {
        Ok(CertStore {
            config: config.clone(),
            current: RwLock::new(load(config)?),
            counters,
        })
    }

    /// Reads the files again and, if they hold a usable certificate and key, uses them for
    /// every handshake from now on. On an error the certificate in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        match load(&self.config) {
            Ok(certified) => {
                *self.current.write() = certified;
                self.counters.ok.inc();
                tracing::info!(cert_file = %self.config.cert_file, "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                self.counters.error.inc();
                tracing::error!(error = %e, "TLS reload failed; the certificate in force stays");
                Err(e)
            }
        }
    }

    /// The acceptor for new connections: TLS 1.2 and 1.3 with rustls' safe defaults,
    /// HTTP/1.1 only (ALPN), the certificate from this store at each handshake.
    pub(crate) fn acceptor(self: &Arc<Self>) -> io::Result<tokio_rustls::TlsAcceptor> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// Whether this kernel offers kernel TLS (the `tls` upper-layer protocol): attaching it to
/// a connected TCP socket succeeds. Logged once at startup; the gateway does not use it
/// yet (docs/ARCHITECTURE.md, "TLS").
pub(crate) fn kernel_tls_available() -> bool {
    let Ok(listener) = std::net::TcpListener::bind("127.0.0.1:0") else {
        return false;
    };
    let Ok(addr) = listener.local_addr() else {
        return false;
    };
    let Ok(client) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    use std::os::fd::AsRawFd;
    let ulp = b"tls";
    // SAFETY: a valid socket descriptor and a buffer of the given length; TCP_ULP only
    // reads the name.
    let rc = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            ulp.as_ptr().cast(),
            ulp.len() as libc::socklen_t,
        )
    };
    rc == 0
}

/// A stream whose first bytes were already read (to look at the request line): they are
/// read again before the stream's own.
#[derive(Debug)]
pub(crate) struct Replay<S> {
    /// The bytes read ahead and not yet replayed.
    pub head: Vec<u8>,
    /// How much of `head` was replayed.
    pub at: usize,
    /// The stream.
    pub inner: S,
}

impl<S> Replay<S> {
    /// `inner`, with `head` to be read first.
    pub fn new(head: Vec<u8>, inner: S) -> Replay<S> {
        Replay { head, at: 0, inner }
    }

    /// The bytes not replayed yet, and the stream.
    pub fn into_parts(mut self) -> (Vec<u8>, S) {
        let rest = self.head.split_off(self.at);
        (rest, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.at);
            buf.put_slice(&this.head[this.at..this.at + n]);
            this.at += n;
            if this.at == this.head.len() {
                // Replayed: the buffer is not kept for the connection's lifetime.
                this.head = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_both_files_wanted() {
        assert!(!TlsConfig::default().is_enabled());
        let half = TlsConfig {
            cert_file: "cert.pem".into(),
            key_file: String::new(),
        };
        assert!(half.is_enabled());
        assert!(matches!(load(&half), Err(TlsError::Incomplete("key_file"))));
    }

    #[test]
    fn a_missing_file_is_named() {
        let config = TlsConfig {
            cert_file: "/nonexistent/cert.pem".into(),
            key_file: "/nonexistent/key.pem".into(),
        };
        let text = load(&config).unwrap_err().to_string();
        assert!(
            text.starts_with("tls.cert_file = \"/nonexistent/cert.pem\""),
            "{text}"
        );
    }

    #[tokio::test]
    async fn replay_reads_the_head_first() {
        use tokio::io::AsyncReadExt;
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b" world")
            .await
            .unwrap();
        drop(a);
        let mut replay = Replay::new(b"hello".to_vec(), b);
        let mut got = String::new();
        replay.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello world");
    }
}
