//! Server-Sent Events encoding, free of I/O (WHATWG HTML §9.2 "Server-sent events").
//!
//! An SSE event is the same message JSON as the WebSocket text frame, re-framed as
//! `event: <type>` and `data:` lines. The JSON is taken from the frame already encoded (so
//! a publication is serialized once, and its SSE bytes are built from those bytes at most
//! once more). Published JSON is kept byte for byte and may contain line breaks in its
//! whitespace; each line becomes its own `data:` line, which the client joins back with
//! `\n` (a bare `\r` becomes `\n`, still JSON whitespace).

use bytes::{BufMut, Bytes, BytesMut};

/// A heartbeat: a comment line, which clients ignore, and a blank line.
pub const HEARTBEAT: &[u8] = b":\n\n";

/// One message as an SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The whole event, with an `id:` line when the message carries a version.
    pub with_id: Bytes,
    /// The `event:` and `data:` lines only, without `id:` and the closing blank line, for a
    /// stream that writes its own `id:` (a multi-topic cursor) after them.
    pub body: Bytes,
    /// The topic and version the message carries (`version`, or `new_version` of a
    /// `change`), the version as the wire string `epoch:offset`.
    pub position: Option<(Box<str>, Box<str>)>,
    /// Whether it is a publication a stream delivers once (`event` or `change`), as
    /// opposed to a message that may repeat a version (`snapshot`, `closed`).
    pub once: bool,
}

/// The JSON payload of an unmasked server text frame.
fn payload(frame: &[u8]) -> Option<&[u8]> {
    let len = *frame.get(1)? & 0x7f;
    let header = match len {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    frame.get(header..)
}

/// The string value that follows `key` (e.g. `","version":"`), if `key` is at `at`.
fn string_after<'a>(json: &'a [u8], at: usize, key: &[u8]) -> Option<&'a str> {
    if !json.get(at..)?.starts_with(key) {
        return None;
    }
    let start = at + key.len();
    let end = start + json.get(start..)?.iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&json[start..end]).ok()
}

/// Re-encodes a tidings server message frame (as `proto::versioned` and
/// `proto::message` write them: `{"type":"...",...}`) as an SSE event; `None` if the frame
/// is not one.
pub fn encode(frame: &[u8]) -> Option<Event> {
    let json = payload(frame)?;
    const TYPE: &[u8] = br#"{"type":""#;
    if !json.starts_with(TYPE) {
        return None;
    }
    let kind = string_after(json, 0, TYPE)?;
    // Topic names and versions hold no quotes, so these keys cannot occur in them. Before user data (`data`, `state`) the first occurrence is the envelope's;
    // a change's `new_version` follows its diff, so the last occurrence is.
    let version = match kind {
        "event" | "snapshot" | "closed" => {
            const KEY: &[u8] = br#""version":""#;
            find(json, KEY).and_then(|at| string_after(json, at, KEY))
        }
        "change" => {
            const KEY: &[u8] = br#""new_version":""#;
            rfind(json, KEY).and_then(|at| string_after(json, at, KEY))
        }
        _ => None,
    };
    const TOPIC: &[u8] = br#"","topic":""#;
    let topic = string_after(json, TYPE.len() + kind.len(), TOPIC);
    let position = topic.zip(version);
    let version = position.map(|(_, v)| v);
    let id_len = version.map_or(0, |v| 4 + v.len() + 1);
    let mut out = BytesMut::with_capacity(id_len + 8 + kind.len() + json.len() + 16);
    if let Some(v) = version {
        out.put_slice(b"id: ");
        out.put_slice(v.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"event: ");
    out.put_slice(kind.as_bytes());
    out.put_u8(b'\n');
    put_data(&mut out, json);
    out.put_u8(b'\n');
    let with_id = out.freeze();
    let body = with_id.slice(id_len..with_id.len() - 1);
    Some(Event {
        with_id,
        body,
        position: position.map(|(t, v)| (Box::from(t), Box::from(v))),
        once: matches!(kind, "event" | "change"),
    })
}

/// Writes `data` as `data:` lines, one per line of it.
fn put_data(out: &mut BytesMut, data: &[u8]) {
    let mut rest = data;
    loop {
        let end = rest
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
            .unwrap_or(rest.len());
        out.put_slice(b"data: ");
        out.put_slice(&rest[..end]);
        out.put_u8(b'\n');
        if end == rest.len() {
            return;
        }
        // `\r\n` is one line break.
        let skip = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// `id: <cursor>` and the blank line that ends an event written as [`Event::body`].
pub fn id_line(cursor: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(cursor.len() + 6);
    out.put_slice(b"id: ");
    out.put_slice(cursor.as_bytes());
    out.put_slice(b"\n\n");
    out.freeze()
}

/// `retry: <ms>`: how long a client waits before reconnecting.
pub fn retry(ms: u64) -> Bytes {
    Bytes::from(format!("retry: {ms}\n\n"))
}

/// The stream's last event: `{"type":"close","code":C,"reason":R}`, the WebSocket close
/// frame's content, so a client knows why the stream ended (and whether to come back).
pub fn close_event(code: u16, reason: &str) -> Bytes {
    let json = serde_json::json!({"type": "close", "code": code, "reason": reason});
    let mut out = BytesMut::new();
    out.put_slice(b"event: close\n");
    put_data(&mut out, json.to_string().as_bytes());
    out.put_u8(b'\n');
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::versioned::{
        encode_change, encode_history_truncated, encode_versioned_event,
    };

    const V: &str = "00000000000000ab:7";

    #[test]
    fn an_event_gets_its_version_as_id() {
        let frame = encode_versioned_event("runs:1", 7, V, br#"{"n":1}"#, 5);
        let event = encode(&frame).expect("a message");
        let text = std::str::from_utf8(&event.with_id).expect("utf-8");
        assert_eq!(
            text,
            format!(
                "id: {V}\nevent: event\ndata: {{\"type\":\"event\",\"topic\":\"runs:1\",\"offset\":7,\"version\":\"{V}\",\"data\":{{\"n\":1}},\"ts\":5}}\n\n"
            )
        );
        let (topic, version) = event.position.expect("a position");
        assert_eq!((&*topic, &*version), ("runs:1", V));
        assert!(event.body.starts_with(b"event: event\n"));
        assert!(event.body.ends_with(b"}\n"));
    }

    #[test]
    fn newlines_in_published_json_become_data_lines() {
        let frame = encode_versioned_event("t", 1, V, b"{\n\"a\":\r\n1\r}", 5);
        let event = encode(&frame).expect("a message");
        let text = std::str::from_utf8(&event.with_id).expect("utf-8");
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        let joined = data.join("\n");
        let value: serde_json::Value = serde_json::from_str(&joined).expect("JSON again");
        assert_eq!(value["data"]["a"], 1);
        assert_eq!(data.len(), 4);
        assert!(!text.contains('\r'));
    }

    #[test]
    fn a_change_takes_the_last_new_version_whatever_its_diff_holds() {
        let diff = br#"[{"op":"add","path":"/x","value":{"a":"b","new_version":"evil"}}]"#;
        let frame = encode_change("cfg", diff, "00000000000000ab:6", V, 5);
        let version = |frame: &[u8]| encode(frame).and_then(|e| e.position).map(|p| p.1);
        assert_eq!(version(&frame).as_deref(), Some(V));
        // An event whose data holds `version` keys keeps the envelope's.
        let data = br#"{"k":"x","version":"evil"}"#;
        let frame = encode_versioned_event("t", 7, V, data, 5);
        assert_eq!(version(&frame).as_deref(), Some(V));
    }

    #[test]
    fn a_message_without_version_has_no_id() {
        let frame = encode_history_truncated("t", None, V, V, 5);
        let event = encode(&frame).expect("a message");
        assert!(event.with_id.starts_with(b"event: history_truncated\n"));
        assert_eq!(event.position, None);
        assert_eq!(&event.with_id[..event.body.len()], &event.body[..]);
    }

    #[test]
    fn long_frames_are_read_past_their_extended_header() {
        let big = format!("\"{}\"", "x".repeat(70_000));
        let frame = encode_versioned_event("t", 1, V, big.as_bytes(), 5);
        assert!(encode(&frame).expect("a message").with_id.len() > 70_000);
        assert_eq!(encode(b"\x81"), None);
        assert_eq!(encode(b"\x81\x02{}"), None, "not a tidings message");
    }
}
