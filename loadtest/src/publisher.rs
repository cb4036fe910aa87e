//! A minimal blocking HTTP/1.1 keep-alive client for `POST /v1/topics/{topic}/events`,
//! or any peer's publish request ([`Route`]).
//!
//! One TCP connection, one request in flight; hand-written because the publisher runs on
//! the coordinator's thread between progress updates and must cost next to nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::Result;
use crate::peer::Publish;
use crate::wire;

/// Where and how a publication is sent.
#[derive(Debug, Clone, Copy)]
pub enum Route<'a> {
    /// tidings' own `POST /v1/topics/{topic}/events` with the payload as body.
    Gateway,
    /// The request a peer file describes.
    Peer(&'a Publish),
    /// tidings' batch `POST /v1/publish`: the payload is the JSON array of items (the
    /// topic argument is unused); [`Publisher::batch_accepted`] counts the answers.
    Batch,
}

impl Published {
    /// Whether the server took the publication: tidings answers 202; peers any 2xx
    /// (nchan answers 201 or 202, others 200 or 204).
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// How long one publish may take before the run is declared broken.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest response head or body the publisher accepts (bytes).
const MAX_RESPONSE: usize = 64 * 1024;

/// The outcome of one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// HTTP status.
    pub status: u16,
    /// The offset from a 202 body, if any.
    pub offset: Option<u64>,
    /// Whether the response had a `Retry-After` header.
    pub retry_after: bool,
}

/// A keep-alive publisher connection that reconnects once when the server closed it.
#[derive(Debug)]
pub struct Publisher {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    req: Vec<u8>,
    buf: Vec<u8>,
    path: Vec<u8>,
    body: Vec<u8>,
    /// Where the last response's body is in `buf`.
    response: std::ops::Range<usize>,
    timeout: Duration,
}

impl Publisher {
    /// A publisher for the server at `addr` (connects lazily).
    pub fn new(addr: SocketAddr) -> Publisher {
        Publisher::with_timeout(addr, PUBLISH_TIMEOUT)
    }

    /// A publisher whose connect, write and read each give up after `timeout`.
    pub fn with_timeout(addr: SocketAddr, timeout: Duration) -> Publisher {
        Publisher {
            addr,
            stream: None,
            req: Vec::with_capacity(4096),
            buf: Vec::with_capacity(4096),
            path: Vec::with_capacity(256),
            body: Vec::with_capacity(4096),
            response: 0..0,
            timeout,
        }
    }

    /// Publishes `body` on `topic` and waits for the response.
    pub fn publish(&mut self, topic: &str, body: &[u8]) -> Result<Published> {
        self.publish_via(Route::Gateway, topic, body)
    }

    /// Publishes `payload` on `topic` the way `route` says and waits for the response.
    pub fn publish_via(
        &mut self,
        route: Route<'_>,
        topic: &str,
        payload: &[u8],
    ) -> Result<Published> {
        self.req.clear();
        // Writing into a Vec cannot fail.
        match route {
            Route::Gateway => {
                let _ = write!(
                    self.req,
                    "POST /v1/topics/{topic}/events HTTP/1.1\r\nHost: {}\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    self.addr,
                    payload.len()
                );
                self.req.extend_from_slice(payload);
            }
            Route::Peer(p) => {
                p.request(topic, payload, &mut self.path, &mut self.body);
                let _ = write!(self.req, "{} ", p.method);
                self.req.extend_from_slice(&self.path);
                let _ = write!(
                    self.req,
                    " HTTP/1.1\r\nHost: {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
                    self.addr,
                    p.content_type,
                    self.body.len()
                );
                self.req.extend_from_slice(&self.body);
            }
            Route::Batch => {
                let _ = write!(
                    self.req,
                    "POST /v1/publish HTTP/1.1\r\nHost: {}\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    self.addr,
                    payload.len()
                );
                self.req.extend_from_slice(payload);
            }
        }
        match self.round_trip() {
            Ok(p) => Ok(p),
            Err(_) => {
                // A keep-alive connection may have been closed by the server between
                // requests: retry once on a fresh connection.
                self.stream = None;
                self.round_trip()
            }
        }
    }

    fn round_trip(&mut self) -> Result<Published> {
        if self.stream.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, self.timeout)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))?;
            self.stream = Some(s);
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err("no publisher connection".into());
        };
        stream.write_all(&self.req)?;
        self.buf.clear();
        let head_len = loop {
            if let Some(end) = wire::head_end(&self.buf) {
                break end;
            }
            if self.buf.len() > MAX_RESPONSE {
                return Err("publish response head too large".into());
            }
            read_more(stream, &mut self.buf)?;
        };
        let head = &self.buf[..head_len];
        let status = wire::response_status(head).ok_or("malformed publish response")?;
        let text = std::str::from_utf8(head).map_err(|_| "non-UTF-8 response head")?;
        let mut content_length = 0usize;
        let mut close = false;
        let mut retry_after = false;
        for line in text.split("\r\n").skip(1) {
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.trim().parse().map_err(|_| "bad Content-Length")?;
                } else if k.eq_ignore_ascii_case("retry-after") {
                    retry_after = true;
                } else if k.eq_ignore_ascii_case("connection")
                    && v.trim().eq_ignore_ascii_case("close")
                {
                    close = true;
                }
            }
        }
        if content_length > MAX_RESPONSE {
            return Err("publish response body too large".into());
        }
        while self.buf.len() < head_len + content_length {
            read_more(stream, &mut self.buf)?;
        }
        self.response = head_len..head_len + content_length;
        let body = &self.buf[head_len..head_len + content_length];
        let offset = wire::number_after(body, b"\"offset\":");
        if close {
            self.stream = None;
        }
        Ok(Published {
            status,
            offset,
            retry_after,
        })
    }
}

impl Publisher {
    /// The body of the last response.
    pub fn response_body(&self) -> &[u8] {
        self.buf.get(self.response.clone()).unwrap_or_default()
    }

    /// For every item of the last batch response, in order, whether it was published
    /// (answered with an offset); `None` if the body is not a batch answer.
    pub fn batch_accepted(&self) -> Option<Vec<bool>> {
        batch_accepted(self.response_body())
    }
}

/// For each item of a batch answer `{"results":[{"topic":T,"offset":N} |
/// {"topic":T,"error":{..}}, ..]}`, whether it was published.
fn batch_accepted(body: &[u8]) -> Option<Vec<bool>> {
    #[derive(serde::Deserialize)]
    struct Answer {
        results: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(default)]
        offset: Option<u64>,
    }
    let answer: Answer = serde_json::from_slice(body).ok()?;
    Some(answer.results.iter().map(|i| i.offset.is_some()).collect())
}

fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk)?;
    if n == 0 {
        return Err("publisher connection closed".into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_answers_count_published_items_only() {
        let body = br#"{"results":[{"topic":"a:1","offset":7},
            {"topic":"a:2","error":{"status":503,"code":"overloaded","message":"m"}},
            {"topic":"a:3","offset":1}]}"#;
        assert_eq!(batch_accepted(body), Some(vec![true, false, true]));
        assert_eq!(batch_accepted(b"{}"), None);
        assert_eq!(batch_accepted(b"not json"), None);
    }
}
