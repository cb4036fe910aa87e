//! Server messages about versioned topics (`snapshot`, `change`, `history_truncated`,
//! `closed`, a versioned `event`) and the polling response body.
//!
//! Like [`super::message::encode_event`], each encoder writes the JSON straight into one
//! WebSocket text frame from pre-serialized parts: a change is encoded once per publication
//! and its `Bytes` shared by every subscriber. Versions are passed as their wire strings
//! (`topic::Version::to_buf().as_str()`), keeping `proto` free of `topic`.
//!
//! Preconditions of every encoder: `topic` is a validated topic name and versions are
//! `Version` strings (neither needs JSON escaping); `state`, `diff` and `data` are valid JSON.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{self, Kind};

/// Concatenates `parts` into the payload of one text frame.
fn text_frame(parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = BytesMut::with_capacity(frame::MAX_HEADER_LEN + len);
    frame::write_header(&mut out, Kind::Text, len);
    for part in parts {
        out.put_slice(part);
    }
    out.freeze()
}

/// `{"type":"snapshot","topic":T,"version":V,"state":S,"ts":MS}`: the whole document, sent
/// first to a new subscriber of a state topic and after a lost history.
pub fn encode_snapshot(topic: &str, version: &str, state: &[u8], ts: u64) -> Bytes {
    let mut ts_buf = itoa::Buffer::new();
    text_frame(&[
        br#"{"type":"snapshot","topic":""#,
        topic.as_bytes(),
        br#"","version":""#,
        version.as_bytes(),
        br#"","state":"#,
        state,
        br#","ts":"#,
        ts_buf.format(ts).as_bytes(),
        b"}",
    ])
}

/// `{"type":"change","topic":T,"diff":[..],"old_version":V0,"new_version":V1,"ts":MS}`: the
/// RFC 6902 operations turning the document at `old_version` into the one at `new_version`.
pub fn encode_change(
    topic: &str,
    diff: &[u8],
    old_version: &str,
    new_version: &str,
    ts: u64,
) -> Bytes {
    let mut ts_buf = itoa::Buffer::new();
    text_frame(&[
        br#"{"type":"change","topic":""#,
        topic.as_bytes(),
        br#"","diff":"#,
        diff,
        br#","old_version":""#,
        old_version.as_bytes(),
        br#"","new_version":""#,
        new_version.as_bytes(),
        br#"","ts":"#,
        ts_buf.format(ts).as_bytes(),
        b"}",
    ])
}

/// `{"type":"event","topic":T,"offset":N,"version":V,"data":D,"ts":MS}`: an event as
/// `encode_event` writes it, plus its full version for clients that resume with `since`.
pub fn encode_versioned_event(
    topic: &str,
    offset: u64,
    version: &str,
    data: &[u8],
    ts: u64,
) -> Bytes {
    let mut offset_buf = itoa::Buffer::new();
    let mut ts_buf = itoa::Buffer::new();
    text_frame(&[
        br#"{"type":"event","topic":""#,
        topic.as_bytes(),
        br#"","offset":"#,
        offset_buf.format(offset).as_bytes(),
        br#","version":""#,
        version.as_bytes(),
        br#"","data":"#,
        data,
        br#","ts":"#,
        ts_buf.format(ts).as_bytes(),
        b"}",
    ])
}

/// `{"type":"history_truncated","topic":T,"last_version":V|null,"first_available":V,
/// "version":V,"ts":MS}`: the publications after `last_version` (the client's, or the last
/// one delivered before its queue overflowed; `null` if unknown) up to but excluding
/// `first_available` are lost to this client. What history still has follows, from
/// `first_available`, then live publications; `version` is the topic's current version.
pub fn encode_history_truncated(
    topic: &str,
    last_version: Option<&str>,
    first_available: &str,
    version: &str,
    ts: u64,
) -> Bytes {
    let mut ts_buf = itoa::Buffer::new();
    let (open, last, close): (&[u8], &[u8], &[u8]) = match last_version {
        Some(v) => (
            br#"","last_version":""#,
            v.as_bytes(),
            br#"","first_available":""#,
        ),
        None => (br#"","last_version":"#, b"null", br#","first_available":""#),
    };
    text_frame(&[
        br#"{"type":"history_truncated","topic":""#,
        topic.as_bytes(),
        open,
        last,
        close,
        first_available.as_bytes(),
        br#"","version":""#,
        version.as_bytes(),
        br#"","ts":"#,
        ts_buf.format(ts).as_bytes(),
        b"}",
    ])
}

/// `{"type":"closed","topic":T,"version":V,"ts":MS}`: the topic is terminal at `version`;
/// nothing more will be published on it.
pub fn encode_closed(topic: &str, version: &str, ts: u64) -> Bytes {
    let mut ts_buf = itoa::Buffer::new();
    text_frame(&[
        br#"{"type":"closed","topic":""#,
        topic.as_bytes(),
        br#"","version":""#,
        version.as_bytes(),
        br#"","ts":"#,
        ts_buf.format(ts).as_bytes(),
        b"}",
    ])
}

/// Whether a polled topic may still publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicStatus {
    /// Publications may follow: poll again.
    Open,
    /// The topic is terminal: stop polling.
    Closed,
}

impl TopicStatus {
    /// Whether pollers should stop.
    pub fn is_closed(self) -> bool {
        self == TopicStatus::Closed
    }

    fn as_str(self) -> &'static str {
        match self {
            TopicStatus::Open => "open",
            TopicStatus::Closed => "closed",
        }
    }
}

/// The head of a polling response (see [`encode_poll_body`]).
#[derive(Debug, Clone, Copy)]
pub struct PollPage<'a> {
    /// The topic polled (validated).
    pub topic: &'a str,
    /// The epoch's 16 hex digits.
    pub epoch: &'a str,
    /// The `since` to poll with next.
    pub next_offset: u64,
    /// `Some(first_available)` when history no longer reached back to `since + 1`.
    pub truncated: Option<u64>,
    /// Open or closed.
    pub status: TopicStatus,
    /// Whether more events were available than the page holds (by count or by bytes):
    /// poll again at once with `next_offset`.
    pub more: bool,
}

/// The body of `GET /v1/topics/{topic}/events?since=&limit=`:
/// `{"topic":T,"epoch":E,"events":[{"offset":N,"data":D},..],"next_offset":N,
/// "truncated":null|{"first_available":N},"more":bool,"status":"open"|"closed"}`, built from the raw
/// data kept in history, so pollers see the same events and offsets as WebSocket clients.
pub fn encode_poll_body<'d>(
    page: &PollPage<'_>,
    events: impl IntoIterator<Item = (u64, &'d [u8])>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let mut num = itoa::Buffer::new();
    out.extend_from_slice(br#"{"topic":""#);
    out.extend_from_slice(page.topic.as_bytes());
    out.extend_from_slice(br#"","epoch":""#);
    out.extend_from_slice(page.epoch.as_bytes());
    out.extend_from_slice(br#"","events":["#);
    for (i, (offset, data)) in events.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(br#"{"offset":"#);
        out.extend_from_slice(num.format(offset).as_bytes());
        out.extend_from_slice(br#","data":"#);
        out.extend_from_slice(data);
        out.push(b'}');
    }
    out.extend_from_slice(br#"],"next_offset":"#);
    out.extend_from_slice(num.format(page.next_offset).as_bytes());
    match page.truncated {
        Some(first) => {
            out.extend_from_slice(br#","truncated":{"first_available":"#);
            out.extend_from_slice(num.format(first).as_bytes());
            out.push(b'}');
        }
        None => out.extend_from_slice(br#","truncated":null"#),
    }
    out.extend_from_slice(if page.more {
        br#","more":true"#
    } else {
        br#","more":false"#
    });
    out.extend_from_slice(br#","status":""#);
    out.extend_from_slice(page.status.as_str().as_bytes());
    out.extend_from_slice(br#""}"#);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// The payload of a short unmasked text frame, parsed as JSON.
    fn payload(frame: &Bytes) -> Value {
        assert_eq!(frame[0], 0x81, "a final text frame");
        let (len, start) = match frame[1] {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            n => (n as usize, 2),
        };
        assert_eq!(frame.len(), start + len);
        serde_json::from_slice(&frame[start..]).unwrap()
    }

    const V0: &str = "00000000000000ab:6";
    const V1: &str = "00000000000000ab:7";

    #[test]
    fn snapshot() {
        let f = encode_snapshot("cfg:prod", V1, br#"{"a":[1,2]}"#, 1700);
        assert_eq!(
            std::str::from_utf8(&f[2..]).unwrap(),
            r#"{"type":"snapshot","topic":"cfg:prod","version":"00000000000000ab:7","state":{"a":[1,2]},"ts":1700}"#
        );
    }

    #[test]
    fn change() {
        let diff = br#"[{"op":"replace","path":"/a","value":2}]"#;
        let f = encode_change("cfg:prod", diff, V0, V1, 5);
        assert_eq!(
            payload(&f),
            json!({"type": "change", "topic": "cfg:prod",
                   "diff": [{"op": "replace", "path": "/a", "value": 2}],
                   "old_version": V0, "new_version": V1, "ts": 5})
        );
        // Long diffs take the 16-bit length form.
        let big = format!(
            r#"[{{"op":"add","path":"/x","value":"{}"}}]"#,
            "y".repeat(300)
        );
        assert_eq!(
            payload(&encode_change("t", big.as_bytes(), V0, V1, 5))["diff"][0]["op"],
            "add"
        );
    }

    #[test]
    fn versioned_event() {
        let f = encode_versioned_event("runs:1", 7, V1, br#"{"s":"ok"}"#, 9);
        assert_eq!(
            payload(&f),
            json!({"type": "event", "topic": "runs:1", "offset": 7, "version": V1,
                   "data": {"s": "ok"}, "ts": 9})
        );
    }

    #[test]
    fn history_truncated() {
        let f = encode_history_truncated("runs:1", Some(V0), "00000000000000ab:40", V1, 3);
        assert_eq!(
            payload(&f),
            json!({"type": "history_truncated", "topic": "runs:1", "last_version": V0,
                   "first_available": "00000000000000ab:40", "version": V1, "ts": 3})
        );
        let f = encode_history_truncated("runs:1", None, V1, V1, 3);
        assert_eq!(payload(&f)["last_version"], Value::Null);
        assert_eq!(payload(&f)["first_available"], V1);
    }

    #[test]
    fn closed() {
        assert_eq!(
            payload(&encode_closed("runs:1", V1, 4)),
            json!({"type": "closed", "topic": "runs:1", "version": V1, "ts": 4})
        );
    }

    #[test]
    fn poll_body() {
        let page = PollPage {
            topic: "runs:1",
            epoch: "00000000000000ab",
            next_offset: 8,
            truncated: None,
            status: TopicStatus::Open,
            more: false,
        };
        let body = encode_poll_body(&page, [(7, &br#"{"s":1}"#[..]), (8, b"[2]")]);
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"topic": "runs:1", "epoch": "00000000000000ab",
                   "events": [{"offset": 7, "data": {"s": 1}}, {"offset": 8, "data": [2]}],
                   "next_offset": 8, "truncated": null, "more": false, "status": "open"})
        );
        let closed = PollPage {
            truncated: Some(3),
            status: TopicStatus::Closed,
            ..page
        };
        let body = encode_poll_body(&closed, []);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["events"], json!([]));
        assert_eq!(v["truncated"], json!({"first_available": 3}));
        assert_eq!(v["status"], "closed");
        assert!(closed.status.is_closed());
    }
}
