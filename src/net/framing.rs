//! Follows HTTP/1.1 request framing over the bytes a connection reads, to see what hyper
//! hides from handlers: whether a request head carried both `Content-Length` and
//! `Transfer-Encoding`. hyper lets Transfer-Encoding win and drops `Content-Length` from
//! the parsed headers; RFC 9112 §6.1 lets a server reject such a request outright, which the
//! gateway does, since that pair is how request smuggling through a front proxy that reads
//! the other length begins.
//!
//! Sans-IO: [`RequestHeads::feed`] takes bytes as they are read and records one verdict per
//! request head, in order; the service takes them with [`RequestHeads::next_conflict`] as
//! hyper hands it each request. Bytes that cannot be framed stop the tracking (every later
//! verdict is "no conflict"): hyper refuses such input itself.
//!
//! The same socket wrapper, [`Sniffed`], bounds how long a write may stall.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The largest request head followed: hyper's default read buffer limit
/// (`8192 + 4096 * 100`), so any head hyper can parse is seen whole.
const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;

/// Most headers parsed in one head: hyper's default `max_headers`, past which hyper
/// refuses the request itself.
const MAX_HEADERS: usize = 100;

/// The longest chunk-size line followed (size, extensions): extensions are not used by
/// anyone in practice, and hyper itself bounds them far below this.
const MAX_CHUNK_LINE: usize = 4096;

/// Where in the request stream the next byte falls.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Inside a request head (collected in `head`).
    Head,
    /// Inside a `Content-Length` body, with this many bytes left.
    Body(u64),
    /// Inside a chunk-size line (collected in `head`).
    ChunkSize,
    /// Inside a chunk's data, with this many bytes left.
    ChunkData(u64),
    /// In the CRLF after a chunk's data, with this many bytes of it left.
    ChunkEnd(u8),
    /// In the trailer section; `line` is the length of the current line so far.
    Trailers {
        /// Bytes on the current trailer line, CR not counted.
        line: usize,
    },
    /// The stream could not be framed (or left HTTP); nothing more is followed.
    Lost,
}

/// The per-connection framing follower and the verdicts it has not handed out yet.
#[derive(Debug)]
pub struct RequestHeads {
    state: State,
    head: Vec<u8>,
    verdicts: VecDeque<bool>,
}

impl Default for RequestHeads {
    fn default() -> Self {
        RequestHeads {
            state: State::Head,
            head: Vec::new(),
            verdicts: VecDeque::new(),
        }
    }
}

impl RequestHeads {
    /// Follows `bytes`, the next bytes read from the connection.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                State::Lost => return,
                State::Head => {
                    // RFC 9112 §2.2: empty lines before a request line are ignored.
                    if self.head.is_empty() {
                        let skip = bytes.iter().take_while(|&&b| b == b'\r' || b == b'\n');
                        bytes = &bytes[skip.count()..];
                        if bytes.is_empty() {
                            return;
                        }
                    }
                    let searched_from = self.head.len().saturating_sub(3);
                    let room = MAX_HEAD_BYTES.saturating_sub(self.head.len());
                    let take = bytes.len().min(room);
                    self.head.extend_from_slice(&bytes[..take]);
                    match find(&self.head[searched_from..], b"\r\n\r\n") {
                        Some(at) => {
                            let end = searched_from + at + 4;
                            // What followed the head in this read goes back to the input.
                            let extra = self.head.len() - end;
                            bytes = &bytes[take - extra..];
                            self.head.truncate(end);
                            self.end_head();
                        }
                        None if take < bytes.len() => self.lose(),
                        None => return,
                    }
                }
                State::Body(left) | State::ChunkData(left) => {
                    let n = (bytes.len() as u64).min(left);
                    bytes = &bytes[n as usize..];
                    let left = left - n;
                    self.state = match (&self.state, left) {
                        (State::Body(_), 0) => State::Head,
                        (State::Body(_), _) => State::Body(left),
                        (_, 0) => State::ChunkEnd(2),
                        _ => State::ChunkData(left),
                    };
                }
                State::ChunkEnd(left) => {
                    let n = bytes.len().min(left as usize);
                    bytes = &bytes[n..];
                    self.state = match left as usize - n {
                        0 => State::ChunkSize,
                        left => State::ChunkEnd(left as u8),
                    };
                }
                State::ChunkSize => {
                    let Some(at) = bytes.iter().position(|&b| b == b'\n') else {
                        self.head.extend_from_slice(bytes);
                        if self.head.len() > MAX_CHUNK_LINE {
                            self.lose();
                        }
                        return;
                    };
                    self.head.extend_from_slice(&bytes[..at]);
                    bytes = &bytes[at + 1..];
                    if self.head.len() > MAX_CHUNK_LINE {
                        self.lose();
                        return;
                    }
                    let size = chunk_size(&self.head);
                    self.head.clear();
                    self.state = match size {
                        Some(0) => State::Trailers { line: 0 },
                        Some(size) => State::ChunkData(size),
                        None => State::Lost,
                    };
                }
                State::Trailers { mut line } => {
                    let mut used = 0;
                    let mut done = false;
                    for &b in bytes {
                        used += 1;
                        match b {
                            b'\n' if line == 0 => {
                                done = true;
                                break;
                            }
                            b'\n' => line = 0,
                            b'\r' => {}
                            _ => line += 1,
                        }
                    }
                    bytes = &bytes[used..];
                    self.state = if done {
                        State::Head
                    } else {
                        State::Trailers { line }
                    };
                }
            }
        }
    }

    /// Whether the next request hyper hands over carried both lengths.
    pub fn next_conflict(&mut self) -> bool {
        self.verdicts.pop_front().unwrap_or(false)
    }

    fn end_head(&mut self) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let parsed = request.parse(&self.head);
        if !matches!(parsed, Ok(httparse::Status::Complete(_))) {
            self.lose();
            return;
        }
        let named = |name: &'static str| {
            request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
        };
        let chunked = named("transfer-encoding").is_some();
        let length = named("content-length");
        self.verdicts.push_back(chunked && length.is_some());
        // RFC 9112 §6.3: Transfer-Encoding wins over Content-Length, as hyper has it.
        self.state = if chunked {
            State::ChunkSize
        } else {
            match length.map(|h| {
                std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
            }) {
                None | Some(Some(0)) => State::Head,
                Some(Some(n)) => State::Body(n),
                Some(None) => State::Lost,
            }
        };
        self.head.clear();
        if self.head.capacity() > 16 * 1024 {
            // One large head must not pin its buffer for the connection's life.
            self.head.shrink_to(1024);
        }
    }

    fn lose(&mut self) {
        self.state = State::Lost;
        self.head = Vec::new();
    }
}

/// The size of a chunk-size line (`1a;ext=1\r`), hex before any extension.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let size = line.split(|&b| b == b';').next()?.trim_ascii();
    u64::from_str_radix(std::str::from_utf8(size).ok()?, 16).ok()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// An HTTP connection's socket: its inbound bytes are followed by a shared
/// [`RequestHeads`], and a write that makes no progress for `write_stall` fails, so a
/// client that stops reading its responses cannot hold the connection (and its
/// handshake place) forever; hyper has no write deadline of its own.
#[derive(Debug)]
pub struct Sniffed<S> {
    inner: S,
    heads: Arc<Mutex<RequestHeads>>,
    write_stall: Duration,
    stalled_since: Option<Pin<Box<Sleep>>>,
}

impl<S> Sniffed<S> {
    /// Wraps `inner`, feeding what is read from it to `heads`.
    pub fn new(inner: S, heads: Arc<Mutex<RequestHeads>>, write_stall: Duration) -> Sniffed<S> {
        Sniffed {
            inner,
            heads,
            write_stall,
            stalled_since: None,
        }
    }

    /// Passes a write-side poll result through, failing it once writes have been
    /// pending for `write_stall`.
    fn watch<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled_since = None;
            return polled;
        }
        let write_stall = self.write_stall;
        let timer = self
            .stalled_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(write_stall)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stalled_since = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading its responses",
            )));
        }
        Poll::Pending
    }

    /// The socket back, for the WebSocket hand-off.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniffed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.heads.lock().feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniffed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(polled, cx)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(input: &[u8], step: usize) -> (Vec<bool>, State) {
        let mut heads = RequestHeads::default();
        for piece in input.chunks(step) {
            heads.feed(piece);
        }
        let mut out = Vec::new();
        while !heads.verdicts.is_empty() {
            out.push(heads.next_conflict());
        }
        (out, heads.state)
    }

    const PIPELINE: &[u8] =
        b"\r\nPOST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n\r\n\r\n\r\n\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
4;ext=1\r\n\r\n\r\n\r\n0\r\nTrailer: y\r\n\r\n\
POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
3\r\nabc\r\n0\r\n\r\n\
GET /e HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn follows_pipelined_requests_in_any_split() {
        // Bodies full of CRLFs must not be mistaken for heads, however the bytes arrive.
        for step in [1, 2, 3, 7, 64, PIPELINE.len()] {
            let (got, state) = verdicts(PIPELINE, step);
            assert_eq!(got, [false, false, false, true, false], "step {step}");
            assert_eq!(state, State::Head, "step {step}");
        }
    }

    #[test]
    fn a_half_sent_body_is_not_a_head() {
        let (got, state) = verdicts(
            b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n[1,\r\n\r\n",
            4,
        );
        assert_eq!(got, [false]);
        assert_eq!(state, State::Body(3));
    }

    #[test]
    fn garbage_stops_the_tracking() {
        let (got, state) = verdicts(b"\x00\x01 nonsense\r\n\r\nPOST", 5);
        assert!(got.is_empty());
        assert_eq!(state, State::Lost);
        let (_, state) = verdicts(
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            3,
        );
        assert_eq!(state, State::Lost);
    }

    proptest::proptest! {
        /// Arbitrary input never panics, and splitting it never changes the verdicts.
        #[test]
        fn splits_do_not_matter(
            input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            step in 1usize..40,
        ) {
            let mut framed = PIPELINE.to_vec();
            framed.extend_from_slice(&input);
            proptest::prop_assert_eq!(verdicts(&framed, step), verdicts(&framed, framed.len()));
        }
    }
}
