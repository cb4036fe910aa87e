//! The JSON messages of protocol `tidings.v1`: client requests in, server messages out.
//!
//! Server messages are encoded straight into a WebSocket frame. An event is encoded once per
//! publication and the resulting `Bytes` is shared by every subscriber.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde_json::Value;

use super::frame::{self, Kind};

/// A parsed client request.
#[derive(Debug, PartialEq)]
pub enum ClientMessage {
    /// Subscribe to topics and patterns.
    Subscribe(SubscriptionRequest),
    /// Unsubscribe from topics and patterns.
    Unsubscribe(SubscriptionRequest),
    /// Ask again for what was missed on a subscribed topic since `last_version`.
    Resync {
        /// The topic.
        topic: String,
        /// The last version the client has (`epoch:offset`).
        last_version: String,
        /// Request id echoed in the reply.
        id: Option<Value>,
    },
    /// Application-level ping (for clients that cannot see WebSocket pings).
    Ping {
        /// Request id echoed in the `pong`.
        id: Option<Value>,
    },
    /// Application-level pong; counts as liveness only.
    Pong,
    /// A new token for a connection whose token is about to expire (same subject).
    Refresh {
        /// The new token (never logged).
        token: String,
        /// Request id echoed in the reply.
        id: Option<Value>,
    },
}

/// The body of `subscribe` and `unsubscribe`.
#[derive(Debug, Default, PartialEq)]
pub struct SubscriptionRequest {
    /// Exact topic names.
    pub topics: Vec<String>,
    /// Topic patterns.
    pub patterns: Vec<String>,
    /// Per-topic resume points: topic name to the last version the client has.
    pub since: Vec<(String, String)>,
    /// A filter on event data for every topic and pattern of the request.
    pub filter: Option<Value>,
    /// Request id echoed in the acknowledgement.
    pub id: Option<Value>,
}

/// Why a client message could not be understood. The connection stays open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Not JSON, or not an object with the expected fields.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// A `type` this protocol version does not know.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// Arrays and objects nested deeper than `max_json_depth`.
    #[error("JSON nested deeper than {0} levels")]
    TooDeep(usize),
}

impl MessageError {
    /// The stable error code sent to the client.
    pub fn code(&self) -> &'static str {
        match self {
            MessageError::InvalidJson(_) => "invalid_json",
            MessageError::UnknownType(_) => "unknown_type",
            MessageError::TooDeep(_) => "json_too_deep",
        }
    }
}

/// Parses one client text message whose JSON nests at most `max_depth` levels deep.
pub fn parse_client(text: &str, max_depth: usize) -> Result<ClientMessage, MessageError> {
    if super::json::depth(text.as_bytes(), max_depth) > max_depth {
        return Err(MessageError::TooDeep(max_depth));
    }
    let value: Value =
        serde_json::from_str(text).map_err(|e| MessageError::InvalidJson(e.to_string()))?;
    let Value::Object(mut obj) = value else {
        return Err(MessageError::InvalidJson("expected a JSON object".into()));
    };
    let id = obj.remove("id");
    let kind = match obj.remove("type") {
        Some(Value::String(kind)) => kind,
        _ => {
            return Err(MessageError::InvalidJson(
                "missing string field \"type\"".into(),
            ));
        }
    };
    match kind.as_str() {
        "subscribe" | "unsubscribe" => {
            let since = match obj.remove("since") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Object(map)) => map
                    .into_iter()
                    .map(|(topic, v)| match v {
                        Value::String(v) => Ok((topic, v)),
                        _ => Err(MessageError::InvalidJson(
                            "\"since\" maps topics to version strings".into(),
                        )),
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => {
                    return Err(MessageError::InvalidJson(
                        "\"since\" maps topics to version strings".into(),
                    ));
                }
            };
            let req = SubscriptionRequest {
                topics: string_list(&mut obj, "topics")?,
                patterns: string_list(&mut obj, "patterns")?,
                since,
                filter: obj.remove("filter").filter(|f| !f.is_null()),
                id,
            };
            Ok(if kind == "subscribe" {
                ClientMessage::Subscribe(req)
            } else {
                ClientMessage::Unsubscribe(req)
            })
        }
        "resync" => {
            let field =
                |obj: &mut serde_json::Map<String, Value>, name: &str| match obj.remove(name) {
                    Some(Value::String(s)) => Ok(s),
                    _ => Err(MessageError::InvalidJson(format!(
                        "missing string field \"{name}\""
                    ))),
                };
            Ok(ClientMessage::Resync {
                topic: field(&mut obj, "topic")?,
                last_version: field(&mut obj, "last_version")?,
                id,
            })
        }
        "ping" => Ok(ClientMessage::Ping { id }),
        "pong" => Ok(ClientMessage::Pong),
        "refresh" => match obj.remove("token") {
            Some(Value::String(token)) => Ok(ClientMessage::Refresh { token, id }),
            _ => Err(MessageError::InvalidJson(
                "missing string field \"token\"".to_string(),
            )),
        },
        _ => Err(MessageError::UnknownType(kind)),
    }
}

fn string_list(
    obj: &mut serde_json::Map<String, Value>,
    field: &str,
) -> Result<Vec<String>, MessageError> {
    match obj.remove(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                _ => Err(MessageError::InvalidJson(format!(
                    "\"{field}\" must be an array of strings"
                ))),
            })
            .collect(),
        Some(_) => Err(MessageError::InvalidJson(format!(
            "\"{field}\" must be an array of strings"
        ))),
    }
}

/// Milliseconds since the Unix epoch, the `ts` of every server message.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Encodes an `event` frame: `{"type":"event","topic":T,"offset":N,"data":D,"ts":MS}`.
///
/// `topic` must be a validated topic name (its characters need no JSON escaping) and `data`
/// valid JSON; both are copied once into the frame, which is then shared by reference count.
pub fn encode_event(topic: &str, offset: u64, data: &[u8], ts: u64) -> Bytes {
    let mut offset_buf = itoa::Buffer::new();
    let offset = offset_buf.format(offset).as_bytes();
    let mut ts_buf = itoa::Buffer::new();
    let ts = ts_buf.format(ts).as_bytes();
    let parts: [&[u8]; 9] = [
        br#"{"type":"event","topic":""#,
        topic.as_bytes(),
        br#"","offset":"#,
        offset,
        br#","data":"#,
        data,
        br#","ts":"#,
        ts,
        b"}",
    ];
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = BytesMut::with_capacity(frame::MAX_HEADER_LEN + len);
    frame::write_header(&mut out, Kind::Text, len);
    for part in parts {
        out.put_slice(part);
    }
    out.freeze()
}

/// Topics and the versions they stood at, serialized as a JSON object
/// (`{"runs:42":"6a2f04586e6e7d74:3"}`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TopicVersions(Vec<(std::sync::Arc<str>, String)>);

impl TopicVersions {
    /// The versions of `marks`, in order.
    pub fn of<V: std::fmt::Display>(marks: &[(std::sync::Arc<str>, V)]) -> TopicVersions {
        TopicVersions(
            marks
                .iter()
                .map(|(t, v)| (t.clone(), v.to_string()))
                .collect(),
        )
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for TopicVersions {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (topic, version) in &self.0 {
            map.serialize_entry(&**topic, version)?;
        }
        map.end()
    }
}

/// A server message other than `event`; these are rare and go through serde.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    /// Acknowledges a `subscribe`.
    Subscribed {
        /// The request id, when one was given.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Value>,
        /// The topics now subscribed by this request.
        topics: &'a [String],
        /// The patterns now subscribed by this request.
        patterns: &'a [String],
        /// The version each topic newly subscribed by this request stood at when it was
        /// attached (what the connection has, snapshot or replay included), so a client that
        /// has seen nothing yet can still resume with `since`. Left out when empty.
        #[serde(skip_serializing_if = "TopicVersions::is_empty")]
        versions: &'a TopicVersions,
        /// Server time, ms since the Unix epoch.
        ts: u64,
    },
    /// Acknowledges an `unsubscribe`.
    Unsubscribed {
        /// The request id, when one was given.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Value>,
        /// The topics named by the request.
        topics: &'a [String],
        /// The patterns named by the request.
        patterns: &'a [String],
        /// Server time, ms since the Unix epoch.
        ts: u64,
    },
    /// Answers a JSON `ping`.
    Pong {
        /// The request id, when one was given.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Value>,
        /// Server time, ms since the Unix epoch.
        ts: u64,
    },
    /// The connection's token expires at `expires` (Unix seconds): send `refresh` before
    /// then, or the connection is closed with 4001.
    TokenExpiring {
        /// When the connection will be closed, Unix seconds.
        expires: u64,
        /// Server time, ms since the Unix epoch.
        ts: u64,
    },
    /// Acknowledges a `refresh`: the connection now runs on the new token.
    Refreshed {
        /// The request id, when one was given.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Value>,
        /// When the new token expires (Unix seconds), if it does.
        #[serde(skip_serializing_if = "Option::is_none")]
        expires: Option<u64>,
        /// Server time, ms since the Unix epoch.
        ts: u64,
    },
    /// A heartbeat for clients that cannot see WebSocket pings; answer with `pong`.
    Ping {
        /// Server time, ms since the Unix epoch.
        ts: u64,
    },
    /// A request could not be served; the connection stays open.
    Error {
        /// Stable error code.
        code: &'a str,
        /// Human-readable explanation.
        message: &'a str,
        /// The request id, when one was given.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Value>,
        /// Server time, ms since the Unix epoch.
        ts: u64,
    },
}

impl ServerMessage<'_> {
    /// Encodes this message as one text frame.
    pub fn to_frame(&self) -> Bytes {
        // Serializing plain structs of strings and numbers cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        frame::encode(Kind::Text, &json)
    }
}

/// Why a body is not a publishable JSON value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Not exactly one JSON value.
    #[error("{0}")]
    Invalid(String),
    /// Nested deeper than allowed.
    #[error(transparent)]
    Limit(#[from] super::json::JsonLimitError),
}

/// Validates that `body` is one JSON value nested at most `max_depth` deep and returns the
/// range of the value itself, without surrounding whitespace, so it can be embedded
/// verbatim in event frames.
pub fn validate_json(body: &[u8], max_depth: usize) -> Result<std::ops::Range<usize>, JsonError> {
    super::json::validate(body, max_depth).map_err(|e| match e {
        super::json::Invalid::Limit(limit) => JsonError::Limit(limit),
        syntax @ super::json::Invalid::Syntax { .. } => JsonError::Invalid(syntax.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        let m = parse_client(
            r#"{"type":"subscribe","topics":["a:b"],"patterns":["a:*"],"id":7}"#,
            64,
        );
        assert_eq!(
            m,
            Ok(ClientMessage::Subscribe(SubscriptionRequest {
                topics: vec!["a:b".into()],
                patterns: vec!["a:*".into()],
                since: Vec::new(),
                filter: None,
                id: Some(Value::from(7)),
            }))
        );
        assert_eq!(
            parse_client(r#"{"type":"pong"}"#, 64),
            Ok(ClientMessage::Pong)
        );
        assert_eq!(
            parse_client(r#"{"type":"nope"}"#, 64).unwrap_err().code(),
            "unknown_type"
        );
        for bad in [
            "",
            "[]",
            "{",
            r#"{"topics":[]}"#,
            r#"{"type":"subscribe","topics":"a"}"#,
        ] {
            assert_eq!(
                parse_client(bad, 64).unwrap_err().code(),
                "invalid_json",
                "{bad}"
            );
        }
    }

    #[test]
    fn event_frame_is_the_documented_json() {
        let frame = encode_event("runs:1", 42, br#"{"a": [1, "x"]}"#, 1700);
        let payload = &frame[2..];
        assert_eq!(frame[0], 0x81);
        assert_eq!(frame[1] as usize, payload.len());
        assert_eq!(
            std::str::from_utf8(payload).unwrap(),
            r#"{"type":"event","topic":"runs:1","offset":42,"data":{"a": [1, "x"]},"ts":1700}"#
        );
    }

    proptest::proptest! {
        /// Any text is either a request or a typed error, never a panic.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,64}") {
            let _ = parse_client(&text, 64);
            let _ = validate_json(text.as_bytes(), 64);
        }
    }

    #[test]
    fn validate_json_trims_whitespace() {
        let body = b"  {\"k\": 1}\n";
        let r = validate_json(body, 64).unwrap();
        assert_eq!(&body[r], b"{\"k\": 1}");
        assert!(validate_json(b"{", 64).is_err());
        assert!(validate_json(b"1 2", 64).is_err());
        assert!(validate_json(b"", 64).is_err());
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            validate_json(deep.as_bytes(), 64),
            Err(JsonError::Limit(_))
        ));
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(validate_json(ok.as_bytes(), 64).is_ok());
        assert_eq!(parse_client(&deep, 64).unwrap_err().code(), "json_too_deep");
    }
}
