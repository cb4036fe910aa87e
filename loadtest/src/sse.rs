//! Sans-IO Server-Sent Events for the harness: the request, and an incremental parser of
//! the event stream (WHATWG HTML §9.2.6 "Interpreting an event stream").
//!
//! [`next_event`] takes the bytes received so far and returns the first complete event
//! block (the lines up to a blank line) and how many bytes it used, or `None` for "need
//! more bytes" without consuming anything, like [`crate::wire::parse_server_frame`]. A
//! connection keeps only the bytes of a partial block between reads.
//!
//! Lines end with LF, CRLF or a lone CR. A CR as the last byte received may be the first
//! half of a CRLF, so the line it ends is only taken once the next byte is known.

use std::borrow::Cow;

/// The fields of one event block. A block without `data:` lines dispatches no message
/// (a heartbeat comment, a `retry:` hint, an id-only cursor); see [`Block::data`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Block<'a> {
    /// The `event:` field (the message type), if present; the spec's default is `message`.
    pub event: Option<&'a [u8]>,
    /// The last `id:` field, if present.
    pub id: Option<&'a [u8]>,
    /// The `retry:` field, if it was all ASCII digits.
    pub retry: Option<u64>,
    /// The `data:` lines joined with `\n` (borrowed when there is one line, the usual
    /// case, so a delivery costs no allocation); `None` when there was no `data:` line.
    pub data: Option<Cow<'a, [u8]>>,
    /// Comment lines (starting with `:`), e.g. heartbeats.
    pub comments: u32,
}

/// The request of a single-topic stream, written in one piece as the first request on a
/// fresh connection (the gateway only serves an SSE request that opens its connection).
pub fn topic_request(host: &str, topic: &str) -> Vec<u8> {
    format!("GET /v1/topics/{topic}/sse HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}

/// The head of a stream response as the gateway writes it: no length, the body ends
/// with the connection (RFC 9112 §6.3).
pub const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
    cache-control: no-cache\r\nx-accel-buffering: no\r\nconnection: close\r\n\r\n";

/// Appends one event: `id:` (if any), `event:`, one `data:` line per line of `data`
/// (LF, CRLF or CR each end a line, which the client joins back with `\n`), blank line.
pub fn encode_event(out: &mut Vec<u8>, id: Option<&str>, event: &str, data: &[u8]) {
    if let Some(id) = id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.push(b'\n');
    let mut rest = data;
    loop {
        let Some(end) = memchr::memchr2(b'\n', b'\r', rest) else {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(rest);
            out.push(b'\n');
            break;
        };
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&rest[..end]);
        out.push(b'\n');
        let crlf = rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n');
        rest = &rest[end + 1 + usize::from(crlf)..];
    }
    out.push(b'\n');
}

/// The topic of a single-topic stream path `/v1/topics/{topic}/sse`.
pub fn topic_of_path(path: &str) -> Option<&str> {
    let topic = path.strip_prefix("/v1/topics/")?.strip_suffix("/sse")?;
    (!topic.is_empty() && !topic.contains('/')).then_some(topic)
}

/// The next line of `buf`: its content and the bytes it used with its terminator, or
/// `None` if its end is not known yet.
fn next_line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = memchr::memchr2(b'\n', b'\r', buf)?;
    if buf[end] == b'\n' {
        return Some((&buf[..end], end + 1));
    }
    match buf.get(end + 1) {
        None => None,
        Some(b'\n') => Some((&buf[..end], end + 2)),
        Some(_) => Some((&buf[..end], end + 1)),
    }
}

/// Parses the first complete event block of `buf`: the block's fields and the bytes it
/// used, or `None` if no blank line ended it yet (nothing is consumed).
pub fn next_event(buf: &[u8]) -> Option<(Block<'_>, usize)> {
    let mut block = Block::default();
    let mut pos = 0;
    // The first `data:` line's span; the joined value is only built for a second one.
    let mut first_data: Option<&[u8]> = None;
    let mut joined: Option<Vec<u8>> = None;
    loop {
        let (line, used) = next_line(&buf[pos..])?;
        pos += used;
        if line.is_empty() {
            block.data = match (joined, first_data) {
                (Some(all), _) => Some(Cow::Owned(all)),
                (None, Some(one)) => Some(Cow::Borrowed(one)),
                (None, None) => None,
            };
            return Some((block, pos));
        }
        if line[0] == b':' {
            block.comments += 1;
            continue;
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &line[line.len()..]),
        };
        match name {
            b"event" => block.event = Some(value),
            b"id" if !value.contains(&0) => block.id = Some(value),
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                block.retry = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            }
            b"data" => match (&mut joined, first_data) {
                (Some(all), _) => {
                    all.push(b'\n');
                    all.extend_from_slice(value);
                }
                (None, Some(one)) => {
                    let mut all = Vec::with_capacity(one.len() + value.len() + 1);
                    all.extend_from_slice(one);
                    all.push(b'\n');
                    all.extend_from_slice(value);
                    joined = Some(all);
                }
                (None, None) => first_data = Some(value),
            },
            // Unknown fields are ignored (§9.2.6).
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &[u8] = b"id: 7:3\nevent: event\ndata: {\"type\":\"event\",\"offset\":3}\n\n";

    #[test]
    fn one_event() {
        let (b, used) = next_event(EVENT).expect("complete");
        assert_eq!(used, EVENT.len());
        assert_eq!(b.id, Some(&b"7:3"[..]));
        assert_eq!(b.event, Some(&b"event"[..]));
        assert_eq!(
            b.data.as_deref(),
            Some(&br#"{"type":"event","offset":3}"#[..])
        );
        assert!(matches!(b.data, Some(Cow::Borrowed(_))));
    }

    #[test]
    fn every_split_point_needs_more_then_completes() {
        let mut stream = b"retry: 3000\n\n:\n\n".to_vec();
        stream.extend_from_slice(EVENT);
        for cut in 0..stream.len() {
            // Feed the first `cut` bytes, then the rest, as two reads would.
            let mut held = stream[..cut].to_vec();
            let mut blocks = Vec::new();
            for chunk in [&stream[cut..], &[][..]] {
                while let Some((b, used)) = next_event(&held) {
                    blocks.push((b.retry, b.comments, b.data.map(|d| d.into_owned())));
                    held.drain(..used);
                }
                held.extend_from_slice(chunk);
            }
            while let Some((b, used)) = next_event(&held) {
                blocks.push((b.retry, b.comments, b.data.map(|d| d.into_owned())));
                held.drain(..used);
            }
            assert!(held.is_empty(), "cut {cut}");
            assert_eq!(blocks.len(), 3, "cut {cut}");
            assert_eq!(blocks[0].0, Some(3000));
            assert_eq!(blocks[1].1, 1);
            assert!(blocks[2].2.is_some());
        }
    }

    #[test]
    fn partial_block_consumes_nothing() {
        assert_eq!(next_event(&EVENT[..EVENT.len() - 1]), None);
        assert_eq!(next_event(b""), None);
        assert_eq!(next_event(b"data: x"), None);
    }

    #[test]
    fn data_lines_join_with_newline() {
        let (b, _) = next_event(b"event: event\ndata: {\"a\":\ndata: 1}\ndata:\n\n").unwrap();
        assert_eq!(b.data.as_deref(), Some(&b"{\"a\":\n1}\n"[..]));
    }

    #[test]
    fn crlf_and_lone_cr_end_lines() {
        let (b, used) = next_event(b"event: close\r\ndata: x\r\n\r\nrest").unwrap();
        assert_eq!(used, 25);
        assert_eq!(b.event, Some(&b"close"[..]));
        assert_eq!(b.data.as_deref(), Some(&b"x"[..]));
        let (b, used) = next_event(b"data: y\r\rz").unwrap();
        assert_eq!((b.data.as_deref(), used), (Some(&b"y"[..]), 9));
        // A CR at the end may be half of a CRLF: not yet a blank line.
        assert_eq!(next_event(b"data: y\n\r"), None);
    }

    #[test]
    fn fields_without_space_or_value() {
        let (b, _) = next_event(b"data:x\nid\nretry: 1s\nevent\n\n").unwrap();
        assert_eq!(b.data.as_deref(), Some(&b"x"[..]));
        assert_eq!(b.id, Some(&b""[..]));
        assert_eq!(b.retry, None);
        assert_eq!(b.event, Some(&b""[..]));
    }

    #[test]
    fn heartbeat_and_cursor_blocks_carry_no_data() {
        let (b, used) = next_event(b":\n\nid: c1;x\n\n").unwrap();
        assert_eq!((b.comments, b.data, used), (1, None, 3));
        let (b, _) = next_event(b"id: c1;x\n\n").unwrap();
        assert_eq!((b.id, b.data), (Some(&b"c1;x"[..]), None));
    }

    #[test]
    fn encoded_events_parse_back() {
        for data in [
            &b"{\"a\":1}"[..],
            b"{\n\"a\":\r\n1}",
            b"{\"a\":1}\n",
            b"",
            b"\r",
        ] {
            let mut out = Vec::new();
            encode_event(&mut out, Some("0:5"), "event", data);
            let (b, used) = next_event(&out).unwrap_or_else(|| panic!("{out:?}"));
            assert_eq!(used, out.len());
            assert_eq!(b.id, Some(&b"0:5"[..]));
            assert_eq!(b.event, Some(&b"event"[..]));
            let want: Vec<u8> = String::from_utf8_lossy(data)
                .replace("\r\n", "\n")
                .replace('\r', "\n")
                .into_bytes();
            assert_eq!(b.data.as_deref(), Some(&want[..]), "{data:?}");
        }
    }

    #[test]
    fn paths() {
        assert_eq!(topic_of_path("/v1/topics/bench:0/sse"), Some("bench:0"));
        assert_eq!(topic_of_path("/v1/topics//sse"), None);
        assert_eq!(topic_of_path("/ws"), None);
        let req = topic_request("127.0.0.1:80", "bench:1");
        assert_eq!(
            req,
            b"GET /v1/topics/bench:1/sse HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n"
        );
    }
}
