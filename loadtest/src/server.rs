//! What the comparison servers (`tidings-floor`, `tidings-naive`) share: the command
//! line the harness spawns them with, the listener, and the event message bytes.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

use crate::Result;

/// Listen backlog: a connection storm of thousands must not overflow the accept queue
/// (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Parses `serve [--listen ADDR] [ignored args..]`, the gateway's command line, so that
/// the harness spawns all three servers the same way. Unknown arguments (meant for the
/// gateway via `--server-arg`) are ignored with a note on stderr.
pub fn listen_addr(name: &str) -> Result<SocketAddr> {
    let mut addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "serve" => {}
            "--listen" => {
                let v = args.next().ok_or("--listen needs an address")?;
                addr = v.parse().map_err(|e| format!("--listen {v}: {e}"))?;
            }
            "-h" | "--help" => {
                println!("usage: {name} serve [--listen ADDR]");
                std::process::exit(0);
            }
            other => eprintln!("{name}: ignoring argument {other:?}"),
        }
    }
    Ok(addr)
}

/// Binds with a large backlog and `SO_REUSEADDR`.
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Prints the line the harness waits for, with the real bound address.
pub fn announce(listener: &TcpListener) -> Result<()> {
    let addr = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "tidings listening on http://{addr}")?;
    out.flush()?;
    Ok(())
}

/// The gateway's event message, field order type, topic, offset, data, ts.
pub fn event_json(out: &mut Vec<u8>, topic: &str, offset: u64, data: &[u8], ts_ms: u64) {
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        r#"{{"type":"event","topic":"{topic}","offset":{offset},"data":"#
    );
    out.extend_from_slice(data);
    let _ = write!(out, r#","ts":{ts_ms}}}"#);
}

/// The topic of a publish path `/v1/topics/{topic}/events`, if it is one and the topic
/// is made of the characters the contract allows (so it can be embedded in JSON as is).
pub fn publish_topic(path: &str) -> Option<&str> {
    let topic = path.strip_prefix("/v1/topics/")?.strip_suffix("/events")?;
    let ok = !topic.is_empty()
        && topic.len() <= 256
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-:".contains(&b));
    ok.then_some(topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_json_is_valid_and_ordered() {
        let mut out = Vec::new();
        event_json(&mut out, "a:b", 3, br#"{"t":1}"#, 9);
        assert_eq!(
            out,
            br#"{"type":"event","topic":"a:b","offset":3,"data":{"t":1},"ts":9}"#
        );
    }

    #[test]
    fn publish_paths() {
        assert_eq!(publish_topic("/v1/topics/bench:0/events"), Some("bench:0"));
        assert_eq!(publish_topic("/v1/topics/a\"b/events"), None);
        assert_eq!(publish_topic("/v1/topics//events"), None);
        assert_eq!(publish_topic("/ws"), None);
    }
}
