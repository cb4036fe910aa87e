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
