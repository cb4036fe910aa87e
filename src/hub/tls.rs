//! A TLS peer's record layer, driven by its shard: the userspace `rustls::ServerConnection`
//! the handshake (run by tokio-rustls) handed over, between the peer's socket and its
//! outbox and parser.
//!
//! Reads go socket → `read_tls` → `process_new_packets` → plaintext into the shard's
//! scratch buffer, as a plain peer's `read` does. Writes take the outbox's shared frames as
//! plaintext and encrypt them per connection (a TLS record's keys and sequence numbers are
//! the connection's own), then flush the records with `write_tls`. rustls holds at most
//! [`SEND_LIMIT`] bytes of ciphertext: plaintext is handed to it only once what it holds
//! is on the wire, so the outbox stays the one queue, with its bounds and overflow policy,
//! and the ciphertext held counts against the same `max_queued_bytes`
//! ([`held_ciphertext`]).

use std::io::{self, IoSlice, Read, Write};

use rustls::ServerConnection;

use super::peer::Received;

/// Most ciphertext rustls holds for one connection (its `set_buffer_limit`), and so the
/// most plaintext encrypted ahead of the socket: one full TLS record (16 KiB of plaintext),
/// which one `write_tls` hands to the kernel in one go when the socket has room.
pub(crate) const SEND_LIMIT: usize = 16 * 1024;

/// Prepares a connection the handshake handed over for its shard.
pub(crate) fn adopt(conn: &mut ServerConnection) {
    conn.set_buffer_limit(Some(SEND_LIMIT));
}

/// Bytes counted against `max_queued_bytes` for what rustls holds: the bound
/// ([`SEND_LIMIT`]) while it holds any ciphertext, since rustls does not say how much.
pub(crate) fn held_ciphertext(conn: &ServerConnection) -> usize {
    if conn.wants_write() { SEND_LIMIT } else { 0 }
}

/// The socket as the outbox sees it on a TLS peer: plaintext in, records out.
pub(crate) struct Sealed<'a, W: Write> {
    conn: &'a mut ServerConnection,
    socket: W,
}

impl<'a, W: Write> Sealed<'a, W> {
    /// Encrypts onto `socket` with `conn`.
    pub fn new(conn: &'a mut ServerConnection, socket: W) -> Sealed<'a, W> {
        Sealed { conn, socket }
    }

    /// Writes the ciphertext rustls holds; `WouldBlock` if the socket fills first.
    pub fn drain(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.socket) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Encrypts what rustls takes of `bufs` (up to [`SEND_LIMIT`]) once what it held
    /// before is written, and starts writing it. Returns the plaintext bytes taken: the
    /// outbox lets go of them, their ciphertext being in rustls' hands.
    fn seal(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.drain()?;
        let taken = self.conn.writer().write_vectored(bufs)?;
        if taken == 0 && bufs.iter().any(|b| !b.is_empty()) {
            // rustls refused plaintext with nothing held: not a state a drained connection
            // reaches, but never report it as progress.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.drain() {
            Ok(()) => Ok(taken),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(taken),
            Err(e) => Err(e),
        }
    }
}

impl<W: Write> Write for Sealed<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.seal(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.seal(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads plaintext into `buf`: what rustls already decrypted, or else what one read of
/// `socket` completes. `Bytes(0)` means the socket gave records with no application data
/// (yet): the caller reads again, within its budget. One call reads the socket at most once.
pub(crate) fn read(conn: &mut ServerConnection, mut socket: impl Read, buf: &mut [u8]) -> Received {
    if let Some(received) = plaintext(conn, buf) {
        return received;
    }
    loop {
        match conn.read_tls(&mut socket) {
            Ok(0) => return Received::Gone,
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Received::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A read error, or rustls' buffers full (a record over the maximum size).
            Err(_) => return Received::Gone,
        }
    }
    if let Err(e) = conn.process_new_packets() {
        // rustls queued an alert; `close` sends it with the close_notify.
        tracing::debug!(error = %e, "TLS error from a peer");
        return Received::Gone;
    }
    plaintext(conn, buf).unwrap_or(Received::Bytes(0))
}

/// The plaintext rustls holds, if any; `None` if it holds none and the peer has not ended.
fn plaintext(conn: &mut ServerConnection, buf: &mut [u8]) -> Option<Received> {
    match conn.reader().read(buf) {
        // close_notify: the peer ended the stream cleanly.
        Ok(0) => Some(Received::Gone),
        Ok(n) => Some(Received::Bytes(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        // The TCP stream ended without close_notify.
        Err(_) => Some(Received::Gone),
    }
}

/// Sends close_notify (and any alert rustls queued) as far as the socket takes it, before
/// the FIN.
pub(crate) fn close(conn: &mut ServerConnection, socket: impl Write) {
    conn.send_close_notify();
    let _ = Sealed::new(conn, socket).drain();
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConnection, ServerConnection};

    use super::*;
    use crate::hub::outbox::{Flush, Outbox, Push};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A server and a client connection with the handshake done, in memory.
    fn pair() -> (ServerConnection, ClientConnection) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = CertificateDer::from(made.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut server = ServerConnection::new(Arc::new(server)).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = ClientConnection::new(Arc::new(client), name).unwrap();
        while server.is_handshaking() || client.is_handshaking() || server.wants_write() {
            shuttle(&mut client, &mut server);
        }
        (server, client)
    }

    /// Moves what each side has to send to the other.
    fn shuttle(client: &mut ClientConnection, server: &mut ServerConnection) {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let mut slice = &wire[..];
        while !slice.is_empty() {
            server.read_tls(&mut slice).unwrap();
        }
        server.process_new_packets().unwrap();
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        let mut slice = &wire[..];
        while !slice.is_empty() {
            client.read_tls(&mut slice).unwrap();
        }
        client.process_new_packets().unwrap();
    }

    /// A socket that takes `room` bytes, then would block.
    struct Socket {
        taken: Vec<u8>,
        room: usize,
    }

    impl Write for &mut Socket {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn decrypt(client: &mut ClientConnection, wire: &[u8]) -> Vec<u8> {
        let mut slice = wire;
        let mut plain = Vec::new();
        while !slice.is_empty() {
            client.read_tls(&mut slice).unwrap();
            client.process_new_packets().unwrap();
            let _ = client.reader().read_to_end(&mut plain);
        }
        plain
    }

    /// docs/ARCHITECTURE.md §1c states it: what a TLS peer's box holds besides rustls'
    /// heap (keys, the receive buffer).
    #[test]
    fn a_server_connection_is_about_1_1_kib() {
        assert_eq!(std::mem::size_of::<ServerConnection>(), 1168);
    }

    #[test]
    fn a_full_socket_leaves_at_most_one_record_in_rustls_and_the_rest_in_the_outbox() {
        let (mut server, mut client) = pair();
        adopt(&mut server);
        let frames: Vec<Bytes> = (0..200u8).map(|i| Bytes::from(vec![i; 1000])).collect();
        let mut outbox = Outbox::default();
        let mut socket = Socket {
            taken: Vec::new(),
            room: 3000,
        };
        for frame in &frames {
            let pushed = outbox.push(frame.clone(), Sealed::new(&mut server, &mut socket));
            assert_ne!(pushed, Push::Broken);
        }
        assert!(held_ciphertext(&server) <= SEND_LIMIT);
        assert!(
            outbox.queued() >= 200 * 1000 - 3000 - SEND_LIMIT,
            "what the socket and one record do not take stays in the outbox"
        );
        // The socket drains bit by bit; every flush makes progress or reports blocked.
        let mut rounds = 0;
        loop {
            socket.room = 7000;
            let mut sealed = Sealed::new(&mut server, &mut socket);
            let done = match sealed.drain() {
                Ok(()) => outbox.flush(sealed) == Flush::Drained && !server.wants_write(),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                    false
                }
            };
            if done {
                break;
            }
            rounds += 1;
            assert!(rounds < 1000, "no progress");
        }
        let plain = decrypt(&mut client, &socket.taken);
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        assert_eq!(plain, expected, "every frame, in order, once");
    }

    #[test]
    fn reads_hand_over_plaintext_and_records_without_data_read_as_nothing() {
        let (mut server, mut client) = pair();
        client.writer().write_all(b"hello").unwrap();
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let mut buf = [0u8; 64];
        // Half a record: nothing yet, but not an end.
        let (first, rest) = wire.split_at(wire.len() / 2);
        assert_eq!(read(&mut server, first, &mut buf), Received::Bytes(0));
        assert_eq!(read(&mut server, rest, &mut buf), Received::Bytes(5));
        assert_eq!(&buf[..5], b"hello");
        assert_eq!(
            read(&mut server, io::empty().take(0), &mut buf),
            Received::Gone,
            "EOF without close_notify"
        );
        // Garbage instead of a record ends the peer.
        let (mut server, _client) = pair();
        assert_eq!(
            read(
                &mut server,
                &[0x17u8, 0x03, 0x03, 0x00, 0x02, 1, 2][..],
                &mut buf
            ),
            Received::Gone
        );
    }
}
