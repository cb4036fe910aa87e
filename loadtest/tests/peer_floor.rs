//! The harness drives a server through a peer file: `tidings-floor`, described as any
//! other server would be, measured by `fanout --peer` end to end (processes, sockets,
//! HTTP publishing, the peer's message extraction).

use std::process::Command;

/// Subscribers and publications: small enough for a test, enough to count.
const SUBSCRIBERS: u64 = 20;
const RATE: u64 = 20;
const SECONDS: u64 = 1;

#[test]
fn fanout_drives_the_floor_through_a_peer_file() {
    let dir = std::env::temp_dir().join(format!("peer-floor-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let peer = dir.join("floor.toml");
    let floor = env!("CARGO_BIN_EXE_tidings-floor");
    std::fs::write(
        &peer,
        format!(
            r#"
name = "floor-peer"
[start]
command = "{floor}"
args = ["serve", "--listen", "127.0.0.1:{{port}}"]
[subscribe]
url = "ws://{{host}}/ws"
frame = '{{"type":"subscribe","topics":{{topics}}}}'
ack = '"type":"subscribed"'
[publish]
path = "/v1/topics/{{topic}}/events"
[message]
payload = "/data"
offset = "/offset"
"#
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tidings-loadtest"))
        .args(["fanout", "--json", "--quiet", "--settle-ms", "100"])
        .arg("--peer")
        .arg(&peer)
        .args(["-n", &SUBSCRIBERS.to_string(), "--rate", &RATE.to_string()])
        .args(["--duration", &SECONDS.to_string(), "--source-addrs", "1"])
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &doc["results"][0];
    assert_eq!(row["target"], "floor-peer");
    assert_eq!(row["subscribed"], SUBSCRIBERS);
    assert_eq!(row["published"], RATE * SECONDS);
    assert_eq!(row["expected"], SUBSCRIBERS * RATE * SECONDS);
    assert_eq!(row["deliveries"], row["expected"]);
    assert_eq!(row["lost"], 0);
    assert_eq!(row["duplicates"], 0);
    assert!(row["p50_ms"].as_f64().unwrap() > 0.0, "{row}");
}
