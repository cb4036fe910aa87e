//! A peer description: how to start any WebSocket pub/sub server, subscribe to one of its
//! topics, publish to it over HTTP, and find the harness's send time and sequence number
//! in what it delivers. One TOML file per server (`loadtest/peers/*.toml`); `--peer FILE`
//! adds it as a target beside `--spawn`.
//!
//! Everything here is sans-IO: parsing, validation, template expansion and extraction
//! from a received message are plain functions, tested without sockets; starting the
//! server is [`crate::target::Target::start_peer`], the subscriber side is in the worker.
//!
//! Templates are strings in which `{name}` (lower-case letters and `_`) is a placeholder
//! and every other character, braces included, is literal, so JSON templates need no
//! escaping: `{"type":"subscribe","topics":{topics}}` has one placeholder. A placeholder
//! a template may not use is refused when the file is read.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::Result;
use crate::wire;

/// Placeholders of the start command, its arguments, environment and config file: a
/// free loopback port the harness picked, a fresh temporary directory (removed when the
/// server stops), the directory of the peer file, and the directory of the harness's own
/// executable (where `tidings`, `tidings-floor` and `tidings-naive` are built).
pub const START_VARS: &[&str] = &["port", "dir", "peer_dir", "bin"];

/// Placeholders of the subscriber's URL and subscribe frame: the topic name as it is,
/// the connection's topics as a JSON array of strings, and (in the URL) the server's
/// `host:port`.
const SUBSCRIBE_VARS: &[&str] = &["topic", "topics", "host"];

/// Placeholders of the publish path (`topic`) and body (`topic`, and `payload`, the
/// harness's JSON object carrying the send time and sequence number).
const PUBLISH_VARS: &[&str] = &["topic", "payload"];

/// A string with `{name}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Template(String);

impl Template {
    /// A template of `text` (not yet validated; see [`Template::check`]).
    pub fn new(text: &str) -> Template {
        Template(text.to_string())
    }

    /// The placeholders the template uses, in order, repeats included.
    pub fn placeholders(&self) -> Vec<&str> {
        Pieces(&self.0).filter_map(Piece::name).collect()
    }

    /// Fails unless every placeholder is one of `allowed`.
    pub fn check(&self, what: &str, allowed: &[&str]) -> Result<()> {
        match self
            .placeholders()
            .into_iter()
            .find(|p| !allowed.contains(p))
        {
            Some(bad) => Err(format!(
                "{what}: unknown placeholder {{{bad}}} (allowed: {})",
                allowed
                    .iter()
                    .map(|a| format!("{{{a}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
            .into()),
            None => Ok(()),
        }
    }

    /// Appends the template to `out` with each placeholder replaced by its value in
    /// `vars`; a placeholder without a value is kept as written.
    pub fn expand_into(&self, out: &mut Vec<u8>, vars: &[(&str, &[u8])]) {
        for piece in Pieces(&self.0) {
            match piece {
                Piece::Text(t) => out.extend_from_slice(t.as_bytes()),
                Piece::Var(name) => match vars.iter().find(|(k, _)| *k == name) {
                    Some((_, v)) => out.extend_from_slice(v),
                    None => {
                        out.push(b'{');
                        out.extend_from_slice(name.as_bytes());
                        out.push(b'}');
                    }
                },
            }
        }
    }

    /// [`Template::expand_into`] of string values, as a string.
    pub fn expand(&self, vars: &[(&str, &str)]) -> String {
        let vars: Vec<(&str, &[u8])> = vars.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        let mut out = Vec::with_capacity(self.0.len() + 32);
        self.expand_into(&mut out, &vars);
        // Every piece is a &str of the template or a &str value: valid UTF-8.
        String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into())
    }
}

/// A piece of a template.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
}

impl<'a> Piece<'a> {
    fn name(self) -> Option<&'a str> {
        match self {
            Piece::Var(n) => Some(n),
            Piece::Text(_) => None,
        }
    }
}

/// The pieces of a template: `{` + one or more of `[a-z_]` + `}` is a placeholder,
/// anything else is text.
struct Pieces<'a>(&'a str);

impl<'a> Iterator for Pieces<'a> {
    type Item = Piece<'a>;

    fn next(&mut self) -> Option<Piece<'a>> {
        let s = self.0;
        if s.is_empty() {
            return None;
        }
        let var_len = |at: usize| -> Option<usize> {
            let rest = &s[at + 1..];
            let n = rest
                .bytes()
                .take_while(|b| b.is_ascii_lowercase() || *b == b'_')
                .count();
            (n > 0 && rest.as_bytes().get(n) == Some(&b'}')).then_some(n)
        };
        let mut from = 0;
        while let Some(i) = s[from..].find('{').map(|i| i + from) {
            if let Some(n) = var_len(i) {
                if i > 0 {
                    self.0 = &s[i..];
                    return Some(Piece::Text(&s[..i]));
                }
                self.0 = &s[n + 2..];
                return Some(Piece::Var(&s[1..=n]));
            }
            from = i + 1;
        }
        self.0 = "";
        Some(Piece::Text(s))
    }
}

/// Where a value sits in a received message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Locate {
    /// The whole message.
    Raw,
    /// An RFC 6901 JSON pointer into the message (`/data`), its tokens unescaped.
    Pointer(Vec<String>),
}

impl TryFrom<String> for Locate {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Locate, String> {
        if s == "raw" {
            return Ok(Locate::Raw);
        }
        let Some(rest) = s.strip_prefix('/') else {
            return Err(format!(
                "{s:?}: expected \"raw\" or a JSON pointer like \"/data\""
            ));
        };
        // RFC 6901 §4: "~1" is "/" and "~0" is "~", in that order.
        Ok(Locate::Pointer(
            rest.split('/')
                .map(|t| t.replace("~1", "/").replace("~0", "~"))
                .collect(),
        ))
    }
}

impl From<Locate> for String {
    fn from(l: Locate) -> String {
        match l {
            Locate::Raw => "raw".into(),
            Locate::Pointer(tokens) => tokens
                .iter()
                .map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1")))
                .collect(),
        }
    }
}

/// The value at `tokens` in the JSON document `doc`: its raw bytes, or a string's
/// unescaped contents. `None` if the document is not JSON or has nothing there.
fn at_pointer<'a>(doc: &'a [u8], tokens: &[String]) -> Option<Cow<'a, [u8]>> {
    let mut raw: &RawValue = serde_json::from_slice(doc).ok()?;
    for token in tokens {
        raw = match raw.get().as_bytes().first()? {
            b'{' => {
                let map: HashMap<&str, &RawValue> = serde_json::from_str(raw.get()).ok()?;
                map.get(token.as_str()).copied()?
            }
            b'[' => {
                let items: Vec<&RawValue> = serde_json::from_str(raw.get()).ok()?;
                *items.get(token.parse::<usize>().ok()?)?
            }
            _ => return None,
        };
    }
    let text = raw.get();
    if text.starts_with('"') {
        let s: String = serde_json::from_str(text).ok()?;
        return Some(Cow::Owned(s.into_bytes()));
    }
    // `raw` borrows from `doc` (serde_json borrows raw values from its input).
    let start = (text.as_ptr() as usize).checked_sub(doc.as_ptr() as usize)?;
    doc.get(start..start + text.len()).map(Cow::Borrowed)
}

/// What the harness needs from a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo {
    /// The send time the harness put in the payload (`"t"`, ns since the epoch).
    pub t_ns: u64,
    /// The harness's sequence number of the publication (`"seq"`).
    pub seq: u64,
    /// The server's offset of the message in its topic, if the peer reports one.
    pub offset: Option<u64>,
}

impl Echo {
    /// The key duplicates and loss are counted by on one connection: the server's offset
    /// when it has one, otherwise the harness's sequence number (plus one, so that every
    /// key is above the "nothing seen yet" zero). Both rise with each publication of a
    /// topic.
    pub fn order_key(&self) -> u64 {
        self.offset.unwrap_or(self.seq.saturating_add(1))
    }
}

/// How a peer delivers what the harness published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageSpec {
    /// Where the published payload is: `"raw"` (the message is the payload) or a JSON
    /// pointer (`"/data"`); a JSON string there is unescaped first.
    pub payload: Locate,
    /// A JSON pointer to the server's offset (an integer rising per topic), if it has
    /// one; without it loss and duplicates are counted by the payload's sequence number.
    #[serde(default)]
    pub offset: Option<Locate>,
}

impl MessageSpec {
    /// The send time, sequence number and offset in `msg`; `None` if it is not a
    /// publication of the harness (an acknowledgement, a notice, malformed bytes).
    pub fn read(&self, msg: &[u8]) -> Option<Echo> {
        let payload = match &self.payload {
            Locate::Raw => Cow::Borrowed(msg),
            Locate::Pointer(tokens) => at_pointer(msg, tokens)?,
        };
        let t_ns = wire::number_after(&payload, b"\"t\":")?;
        let seq = wire::number_after(&payload, b"\"seq\":")?;
        let offset = match &self.offset {
            None => None,
            Some(Locate::Raw) => Some(std::str::from_utf8(msg).ok()?.trim().parse().ok()?),
            Some(Locate::Pointer(tokens)) => {
                let v = at_pointer(msg, tokens)?;
                Some(std::str::from_utf8(&v).ok()?.trim().parse().ok()?)
            }
        };
        Some(Echo { t_ns, seq, offset })
    }
}

/// How subscribers connect (the part of a peer the worker processes need).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    /// The WebSocket URL, `ws://{host}/path` (a template of `{host}`, `{topic}`,
    /// `{topics}`): only the path is used; the host is always the server's address.
    pub url: Template,
    /// A text frame sent once upgraded (a template of `{topic}`, `{topics}`).
    #[serde(default)]
    pub frame: Option<Template>,
    /// A substring of the message that confirms the subscription; without it a
    /// subscriber counts as subscribed once upgraded (and its frame sent).
    #[serde(default)]
    pub ack: Option<String>,
    /// A substring of a message that refuses it (the subscriber then fails).
    #[serde(default)]
    pub error: Option<String>,
}

impl Subscribe {
    /// The variables of one connection subscribing to `topic`.
    fn vars(topic: &str) -> [(&'static str, String); 2] {
        let topics = serde_json::to_string(&[topic]).unwrap_or_else(|_| "[]".into());
        [("topic", topic.to_string()), ("topics", topics)]
    }

    /// The upgrade request path for `topic`.
    pub fn path(&self, topic: &str) -> String {
        let vars = Subscribe::vars(topic);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let url = self.url.expand(&vars);
        url_path(&url).to_string()
    }

    /// The subscribe frame for `topic`, if the peer has one.
    pub fn frame(&self, topic: &str) -> Option<String> {
        let vars = Subscribe::vars(topic);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.frame.as_ref().map(|f| f.expand(&vars))
    }
}

/// The path of `ws://host/path` (or `/path` given alone); `/` when it has none.
fn url_path(url: &str) -> &str {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(r) => r.find('/').map_or("/", |i| &r[i..]),
        None => url,
    }
}

/// What the subscribers of a worker need to know about the peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerClient {
    /// How to subscribe.
    pub subscribe: Subscribe,
    /// How to read a delivery.
    pub message: MessageSpec,
}

/// How a publication is sent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// The HTTP method.
    #[serde(default = "default_method")]
    pub method: String,
    /// The request path, a template of `{topic}` (for example `/pub/{topic}`).
    pub path: Template,
    /// The request body, a template of `{topic}` and `{payload}`.
    #[serde(default = "default_body")]
    pub body: Template,
    /// The body's `Content-Type`.
    #[serde(default = "default_content_type")]
    pub content_type: String,
}

fn default_method() -> String {
    "POST".into()
}

fn default_body() -> Template {
    Template::new("{payload}")
}

fn default_content_type() -> String {
    "application/json".into()
}

impl Publish {
    /// The path and body of one publication of `payload` on `topic`, into `path` and
    /// `body` (cleared first).
    pub fn request(&self, topic: &str, payload: &[u8], path: &mut Vec<u8>, body: &mut Vec<u8>) {
        path.clear();
        body.clear();
        self.path.expand_into(path, &[("topic", topic.as_bytes())]);
        let vars: [(&str, &[u8]); 2] = [("topic", topic.as_bytes()), ("payload", payload)];
        self.body.expand_into(body, &vars);
    }
}

/// How the harness gets the server running.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    /// The program to run (templates of [`START_VARS`]); exclusive with `url`.
    #[serde(default)]
    pub command: Option<Template>,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<Template>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, Template>,
    /// A config file written into `{dir}` before the command runs.
    #[serde(default)]
    pub config: Option<ConfigFile>,
    /// An already-running server, `http://127.0.0.1:PORT`; exclusive with `command`.
    #[serde(default)]
    pub url: Option<String>,
    /// The running server's pid, for memory and CPU figures (with `url`).
    #[serde(default)]
    pub pid: Option<u32>,
}

/// A config file the harness writes for the server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The template file, relative to the peer file (its placeholders are
    /// [`START_VARS`]).
    pub template: PathBuf,
    /// The name it is written as inside `{dir}`.
    pub name: String,
}

/// One peer file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// The table label.
    pub name: String,
    /// How to start it (or where it runs).
    pub start: Start,
    /// How subscribers connect.
    pub subscribe: Subscribe,
    /// How publications are sent.
    pub publish: Publish,
    /// How deliveries are read.
    pub message: MessageSpec,
    /// The directory of the peer file (`{peer_dir}`; relative config templates).
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Peer {
    /// Reads and validates the peer file at `path`.
    pub fn load(path: &Path) -> Result<Peer> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading peer file {}: {e}", path.display()))?;
        let mut peer = Peer::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        // Absolute: the server runs in its own directory, not the harness's.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        peer.dir = std::fs::canonicalize(dir.unwrap_or(Path::new(".")))?;
        Ok(peer)
    }

    /// Parses and validates a peer description.
    pub fn parse(text: &str) -> Result<Peer> {
        let peer: Peer = toml::from_str(text)?;
        peer.validate()?;
        Ok(peer)
    }

    fn validate(&self) -> Result<()> {
        let s = &self.start;
        match (&s.command, &s.url) {
            (Some(cmd), None) => {
                cmd.check("start.command", START_VARS)?;
                for a in &s.args {
                    a.check("start.args", START_VARS)?;
                }
                for v in s.env.values() {
                    v.check("start.env", START_VARS)?;
                }
                if s.pid.is_some() {
                    return Err("start.pid goes with start.url only".into());
                }
            }
            (None, Some(url)) => {
                if !url.starts_with("http://") {
                    return Err("start.url must be http://host:port".into());
                }
                if s.config.is_some() || !s.args.is_empty() || !s.env.is_empty() {
                    return Err("start.url takes no args, env or config".into());
                }
            }
            _ => return Err("[start] needs exactly one of command and url".into()),
        }
        self.subscribe.url.check("subscribe.url", SUBSCRIBE_VARS)?;
        if let Some(f) = &self.subscribe.frame {
            f.check("subscribe.frame", SUBSCRIBE_VARS)?;
        }
        self.publish.path.check("publish.path", &["topic"])?;
        self.publish.body.check("publish.body", PUBLISH_VARS)?;
        if !self.publish.body.placeholders().contains(&"payload") {
            return Err("publish.body must carry {payload} (the send time is in it)".into());
        }
        Ok(())
    }

    /// The subscriber side, for the worker processes.
    pub fn client(&self) -> PeerClient {
        PeerClient {
            subscribe: self.subscribe.clone(),
            message: self.message.clone(),
        }
    }

    /// The start template `t` expanded for a server on `port` in `dir`.
    pub fn start_value(&self, t: &Template, port: u16, dir: &Path) -> String {
        let bin = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        let port = port.to_string();
        let vars = [
            ("port", port.as_str()),
            ("dir", &dir.to_string_lossy()),
            ("peer_dir", &self.dir.to_string_lossy()),
            ("bin", &bin.to_string_lossy()),
        ];
        t.expand(&vars)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_braced_lowercase_names_only() {
        let t = Template::new(r#"{"type":"subscribe","topics":{topics},"x":"{topic}"}"#);
        assert_eq!(t.placeholders(), ["topics", "topic"]);
        assert_eq!(
            t.expand(&[("topic", "a:1"), ("topics", r#"["a:1"]"#)]),
            r#"{"type":"subscribe","topics":["a:1"],"x":"a:1"}"#
        );
        // Braces that do not enclose a name stay literal.
        let t = Template::new("{} {A} {a-b} {{topic}} {");
        assert_eq!(t.expand(&[("topic", "x")]), "{} {A} {a-b} {x} {");
        // A placeholder without a value is kept as written.
        assert_eq!(Template::new("/p/{topic}").expand(&[]), "/p/{topic}");
        assert_eq!(Template::new("").expand(&[]), "");
    }

    #[test]
    fn unknown_placeholders_are_refused() {
        let t = Template::new("/sub/{topik}");
        let e = t.check("subscribe.url", SUBSCRIBE_VARS).unwrap_err();
        assert!(e.to_string().contains("{topik}"), "{e}");
        assert!(
            Template::new("/sub/{topic}")
                .check("x", SUBSCRIBE_VARS)
                .is_ok()
        );
    }

    #[test]
    fn publish_request_expands_path_and_body() {
        let p = Publish {
            method: "POST".into(),
            path: Template::new("/pub/{topic}"),
            body: Template::new(r#"{"channel":"{topic}","data":{payload}}"#),
            content_type: "application/json".into(),
        };
        let (mut path, mut body) = (Vec::new(), Vec::new());
        p.request("t:3", br#"{"t":5,"seq":1}"#, &mut path, &mut body);
        assert_eq!(path, b"/pub/t:3");
        assert_eq!(body, br#"{"channel":"t:3","data":{"t":5,"seq":1}}"#);
    }

    #[test]
    fn subscribe_path_and_frame() {
        let s = Subscribe {
            url: Template::new("ws://{host}/sub/{topic}"),
            frame: Some(Template::new(r#"{"type":"subscribe","topics":{topics}}"#)),
            ack: None,
            error: None,
        };
        assert_eq!(s.path("bench:7"), "/sub/bench:7");
        assert_eq!(
            s.frame("bench:7").as_deref(),
            Some(r#"{"type":"subscribe","topics":["bench:7"]}"#)
        );
        assert_eq!(url_path("ws://h:1"), "/");
        assert_eq!(url_path("/ws"), "/ws");
    }

    fn spec(payload: &str, offset: Option<&str>) -> MessageSpec {
        MessageSpec {
            payload: Locate::try_from(payload.to_string()).unwrap(),
            offset: offset.map(|o| Locate::try_from(o.to_string()).unwrap()),
        }
    }

    #[test]
    fn echo_from_a_raw_message() {
        let mut payload = Vec::new();
        wire::build_payload(&mut payload, 1_700_000_000_123, 42, 256);
        let e = spec("raw", None).read(&payload).unwrap();
        assert_eq!(
            e,
            Echo {
                t_ns: 1_700_000_000_123,
                seq: 42,
                offset: None
            }
        );
        assert_eq!(e.order_key(), 43);
    }

    #[test]
    fn echo_through_a_pointer_with_an_offset() {
        let msg = br#"{"type":"event","topic":"b:0","offset":9,"data":{"t":77,"seq":3,"pad":"x"},"ts":1}"#;
        let e = spec("/data", Some("/offset")).read(msg).unwrap();
        assert_eq!(
            e,
            Echo {
                t_ns: 77,
                seq: 3,
                offset: Some(9)
            }
        );
        assert_eq!(e.order_key(), 9);
    }

    #[test]
    fn echo_of_a_payload_embedded_as_a_string() {
        let msg = br#"{"msg":{"body":"{\"t\":12,\"seq\":4}"},"list":[0,{"id":5}]}"#;
        let e = spec("/msg/body", Some("/list/1/id")).read(msg).unwrap();
        assert_eq!((e.t_ns, e.seq, e.offset), (12, 4, Some(5)));
    }

    #[test]
    fn messages_without_an_echo_are_none() {
        let s = spec("/data", Some("/offset"));
        assert_eq!(s.read(br#"{"type":"subscribed","topics":["a"]}"#), None);
        assert_eq!(s.read(b"not json {"), None);
        assert_eq!(s.read(br#"{"data":{"t":1,"seq":2},"offset":"x"}"#), None);
        assert_eq!(s.read(br#"{"data":[1,2],"offset":1}"#), None);
        assert_eq!(spec("raw", None).read(br#"{"t":1}"#), None);
        assert_eq!(spec("raw", None).read(b""), None);
    }

    #[test]
    fn pointers_follow_rfc_6901() {
        let l = Locate::try_from("/a~1b/c~0d/0".to_string()).unwrap();
        assert_eq!(
            l,
            Locate::Pointer(vec!["a/b".into(), "c~d".into(), "0".into()])
        );
        assert_eq!(String::from(l), "/a~1b/c~0d/0");
        assert!(Locate::try_from("data".to_string()).is_err());
        let doc = br#"{"a/b":{"c~d":[true]}}"#;
        let v = at_pointer(doc, &["a/b".into(), "c~d".into(), "0".into()]).unwrap();
        assert_eq!(&*v, b"true");
    }

    const MINIMAL: &str = r#"
        name = "x"
        [start]
        command = "{bin}/x"
        args = ["--port", "{port}"]
        [subscribe]
        url = "ws://{host}/sub/{topic}"
        [publish]
        path = "/pub/{topic}"
        [message]
        payload = "raw"
    "#;

    #[test]
    fn a_minimal_peer_takes_defaults() {
        let p = Peer::parse(MINIMAL).unwrap();
        assert_eq!(p.publish.method, "POST");
        assert_eq!(p.publish.body, Template::new("{payload}"));
        assert_eq!(p.message.offset, None);
        let v = p.start_value(&p.start.args[1], 4321, Path::new("/tmp/d"));
        assert_eq!(v, "4321");
    }

    #[test]
    fn invalid_peers_are_refused() {
        let bad = MINIMAL.replace("{port}", "{prot}");
        assert!(Peer::parse(&bad).is_err());
        let bad = MINIMAL.replace("command = \"{bin}/x\"", "url = \"http://127.0.0.1:1\"");
        assert!(Peer::parse(&bad).is_err(), "url with args");
        let bad = MINIMAL.replace("[message]", "body = \"{topic}\"\n[message]");
        assert!(Peer::parse(&bad).is_err(), "body without payload");
        let bad = MINIMAL.replace("payload = \"raw\"", "payload = \"data\"");
        assert!(Peer::parse(&bad).is_err());
        assert!(Peer::parse(&MINIMAL.replace("name", "nmae")).is_err());
    }

    #[test]
    fn the_shipped_peer_files_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let p = Peer::load(&path).unwrap();
                if let Some(c) = &p.start.config {
                    assert!(p.dir.join(&c.template).is_file(), "{}", path.display());
                }
                n += 1;
            }
        }
        assert!(n >= 5, "{n} peer files");
    }
}
