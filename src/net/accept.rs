//! What the accept loop does when it cannot serve a connection normally: canned refusals
//! written without waiting, a reserved descriptor to refuse with when descriptors run out,
//! and a rate limit on the log lines accept errors cause.

use std::fs::File;
use std::io;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

/// How long to pause accepting after an accept error the reserve could not absorb: retrying
/// at once would spin a core while nothing can change; a pause lets connections end.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The least time between two log lines about accept errors. A descriptor shortage makes
/// every accept fail; one line a second with a count says as much as thousands would.
pub const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Most bytes of a refused client's request drained before closing. Closing a socket with
/// unread bytes makes the kernel send a reset, which can destroy the refusal before the
/// client reads it; the head of a request is well under this.
const DRAIN_BYTES: usize = 16 * 1024;

/// The answer to a connection from an address already holding `max_handshakes_per_ip`
/// handshakes.
pub const TOO_MANY_HANDSHAKES: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 94\r\n\
\r\n\
{\"code\":\"too_many_handshakes\",\"message\":\"too many connections from this address; retry later\"}";

/// The answer to a plain HTTP request on a TLS listener (as nginx's 497, but a 400 any
/// client understands).
pub const TLS_REQUIRED: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
content-type: application/json\r\n\
connection: close\r\n\
content-length: 76\r\n\
\r\n\
{\"code\":\"tls_required\",\"message\":\"this port speaks TLS: connect with https\"}";

/// The answer to a connection accepted with the reserved descriptor when the process is
/// out of descriptors.
pub const OUT_OF_DESCRIPTORS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 75\r\n\
\r\n\
{\"code\":\"over_capacity\",\"message\":\"the gateway is out of file descriptors\"}";

/// Writes `response` without waiting (what the socket buffer takes; a new socket's buffer
/// takes all of it), drains what the client already sent, and closes.
pub fn refuse(stream: TcpStream, response: &[u8]) {
    let _ = stream.try_write(response);
    let mut drain = [0u8; 1024];
    let mut drained = 0;
    while drained < DRAIN_BYTES {
        match stream.try_read(&mut drain) {
            Ok(n) if n > 0 => drained += n,
            _ => break,
        }
    }
    // Dropping sends FIN after the response.
    drop(stream);
}

/// Whether an accept error means the process or system is out of descriptors.
pub fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// One descriptor kept open so that, out of descriptors, the gateway can still accept a
/// pending connection and refuse it, instead of leaving it to hang in the backlog while
/// every accept fails (and the listener stays readable, spinning the loop).
#[derive(Debug)]
pub struct Reserve {
    file: Option<File>,
}

impl Reserve {
    /// Opens the reserve (`/dev/null`).
    pub fn open() -> Reserve {
        Reserve {
            file: File::open("/dev/null").ok(),
        }
    }

    /// Frees the reserve, accepts one pending connection (if one is ready) and refuses it,
    /// then takes the reserve back. Returns whether a connection was refused.
    pub async fn shed_one(&mut self, listener: &TcpListener) -> bool {
        if self.file.take().is_none() {
            return false;
        }
        let accepted = std::future::poll_fn(|cx| match listener.poll_accept(cx) {
            Poll::Ready(result) => Poll::Ready(result.ok()),
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        let shed = match accepted {
            Some((stream, _)) => {
                refuse(stream, OUT_OF_DESCRIPTORS);
                true
            }
            None => false,
        };
        self.file = File::open("/dev/null").ok();
        shed
    }
}

/// Turns a stream of errors into at most one log line per `interval`, each with the number
/// of errors since the previous line.
#[derive(Debug)]
pub struct ErrorLog {
    interval: Duration,
    last: Option<Instant>,
    unlogged: u64,
}

impl ErrorLog {
    /// A limiter allowing one line per `interval`.
    pub fn new(interval: Duration) -> ErrorLog {
        ErrorLog {
            interval,
            last: None,
            unlogged: 0,
        }
    }

    /// Records one error at `now`; returns `Some(count)` when a line should be logged now,
    /// `count` being the errors (this one included) since the last line.
    pub fn record(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if !due {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canned_responses_announce_their_length() {
        for response in [TOO_MANY_HANDSHAKES, OUT_OF_DESCRIPTORS, TLS_REQUIRED] {
            let text = std::str::from_utf8(response).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(length, body.len(), "{head}");
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert!(json["code"].is_string() && json["message"].is_string());
        }
    }

    #[test]
    fn error_log_is_rate_limited_with_counts() {
        let start = Instant::now();
        let mut log = ErrorLog::new(Duration::from_secs(1));
        assert_eq!(log.record(start), Some(1), "the first error is logged");
        for i in 1..20 {
            assert_eq!(log.record(start + Duration::from_millis(i * 10)), None);
        }
        // 19 suppressed plus this one.
        assert_eq!(log.record(start + Duration::from_secs(1)), Some(20));
        assert_eq!(log.record(start + Duration::from_millis(1500)), None);
        assert_eq!(log.record(start + Duration::from_secs(3)), Some(2));
    }

    #[tokio::test]
    async fn reserve_sheds_a_pending_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut reserve = Reserve::open();
        assert!(!reserve.shed_one(&listener).await, "nothing pending");
        let mut client = TcpStream::connect(addr).await.unwrap();
        // The handshake completes in the kernel; look again until accept sees it.
        tokio::time::timeout(Duration::from_secs(10), async {
            while !reserve.shed_one(&listener).await {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut got)
            .await
            .unwrap();
        assert_eq!(got, OUT_OF_DESCRIPTORS);
        assert!(reserve.file.is_some(), "the reserve is taken back");
    }
}
