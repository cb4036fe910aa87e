//! Several nodes on one real `redis-server` (started by each test on a free port): they
//! must behave like one node with more room. Cross-node delivery, one offset sequence
//! under concurrent publishers, resume on another node, racing state writes, a node
//! killed mid-stream, Redis paused and Redis restarted empty.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tidings::{BusConfig, BusKind, Config};

fn node_config(redis: &RedisServer) -> Config {
    Config::default().bus(BusConfig {
        kind: BusKind::Redis,
        url: redis.url(),
        timeout: Duration::from_millis(500),
        ..BusConfig::default()
    })
}

async fn node(redis: &RedisServer) -> TestGateway {
    TestGateway::start(node_config(redis)).await
}

/// Reads events of `topic` until `count` have arrived: (offset, version, data).
async fn events(client: &mut WsClient, topic: &str, count: usize) -> Vec<(u64, String, Value)> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let m = client.next_json().await;
        assert_eq!(m["type"], "event", "expected an event, got {m}");
        assert_eq!(m["topic"], topic, "{m}");
        out.push((
            m["offset"].as_u64().expect("offset"),
            str_field(&m, "version").to_string(),
            m["data"].clone(),
        ));
    }
    out
}

#[tokio::test]
async fn a_publication_on_one_node_reaches_subscribers_on_every_node() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut on_a = WsClient::connect(a.addr).await;
    let mut on_b = WsClient::connect(b.addr).await;
    on_a.subscribe(&["runs:1"], &[], 1).await;
    on_b.subscribe(&["runs:1"], &[], 1).await;
    let mut pattern_on_b = WsClient::connect(b.addr).await;
    pattern_on_b.subscribe(&[], &["runs:*"], 2).await;
    for n in 1..=3u64 {
        let body = json!({"n": n}).to_string();
        assert_eq!(publish_ok(a.addr, "runs:1", body.as_bytes()).await, n);
    }
    let seen_a = events(&mut on_a, "runs:1", 3).await;
    let seen_b = events(&mut on_b, "runs:1", 3).await;
    assert_eq!(seen_a, seen_b, "both nodes see the same versions and data");
    assert_eq!(seen_a.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(seen_a[0].2, json!({"n": 1}));
    let by_pattern = events(&mut pattern_on_b, "runs:1", 3).await;
    assert_eq!(
        by_pattern, seen_a,
        "a pattern subscriber on another node too"
    );
    // An embedder's blocking publish goes through Redis too.
    let gw = a.gw.clone();
    let published = tokio::task::spawn_blocking(move || gw.publish("runs:1", b"{\"n\":4}"))
        .await
        .expect("publish thread")
        .expect("publish");
    assert_eq!(published.offset, 4);
    assert_eq!(events(&mut on_b, "runs:1", 1).await[0].0, 4);
    assert_eq!(events(&mut pattern_on_b, "runs:1", 1).await[0].0, 4);
    // A topic the pattern's Redis glob covers but tidings' `*` (one segment) does not.
    publish_ok(a.addr, "runs:1:sub", b"{}").await;
    publish_ok(a.addr, "runs:2", b"{\"last\":true}").await;
    let next = pattern_on_b.next_json().await;
    assert_eq!(
        next["topic"], "runs:2",
        "runs:1:sub does not match runs:*: {next}"
    );
    // Polls and state reads on a node that never saw the topic.
    let c = node(&redis).await;
    let page = poll(c.addr, "runs:1", "since=1").await;
    let offsets: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [2, 3, 4], "{page}");
    assert_eq!(
        version_of(str_field(&page, "epoch"), 3),
        seen_a[2].1,
        "the same epoch on every node"
    );
}

#[tokio::test]
async fn concurrent_publishers_on_three_nodes_give_every_subscriber_one_sequence() {
    let redis = RedisServer::start();
    let nodes = [node(&redis).await, node(&redis).await, node(&redis).await];
    let mut subscribers = Vec::new();
    for n in &nodes {
        for _ in 0..2 {
            let mut c = WsClient::connect(n.addr).await;
            c.subscribe(&["jobs:race"], &[], 1).await;
            subscribers.push(c);
        }
    }
    const EACH: u64 = 100;
    let publishers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let addr = n.addr;
            tokio::spawn(async move {
                for k in 0..EACH {
                    let body = json!({"node": i, "k": k}).to_string();
                    publish_ok(addr, "jobs:race", body.as_bytes()).await;
                }
            })
        })
        .collect();
    for p in publishers {
        within("publishers", p).await.expect("publisher");
    }
    let total = 3 * EACH as usize;
    let mut first: Option<Vec<(u64, String, Value)>> = None;
    for c in &mut subscribers {
        let seen = events(c, "jobs:race", total).await;
        let offsets: Vec<u64> = seen.iter().map(|e| e.0).collect();
        assert_eq!(
            offsets,
            (1..=total as u64).collect::<Vec<_>>(),
            "gap-free, in order"
        );
        match &first {
            None => first = Some(seen),
            Some(f) => assert_eq!(&seen, f, "every subscriber on every node: one sequence"),
        }
    }
    // Each publisher's own events keep its order within the sequence.
    let seen = first.expect("subscribers");
    for i in 0..3 {
        let ks: Vec<u64> = seen
            .iter()
            .filter(|e| e.2["node"] == i)
            .map(|e| e.2["k"].as_u64().unwrap())
            .collect();
        assert_eq!(ks, (0..EACH).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn a_client_resumes_on_another_node_after_fifty_missed_publications() {
    let redis = RedisServer::start();
    let (a, b, c) = (node(&redis).await, node(&redis).await, node(&redis).await);
    let mut client = WsClient::connect(a.addr).await;
    client.subscribe(&["cfg:resume"], &[], 1).await;
    for n in 1..=10u64 {
        publish_ok(b.addr, "cfg:resume", json!({"n": n}).to_string().as_bytes()).await;
    }
    let seen = events(&mut client, "cfg:resume", 10).await;
    let last = seen[9].1.clone();
    client.close().await;
    for n in 11..=60u64 {
        publish_ok(b.addr, "cfg:resume", json!({"n": n}).to_string().as_bytes()).await;
    }
    // Node c never followed the topic: it loads it from Redis for the resume.
    let mut resumed = WsClient::connect(c.addr).await;
    subscribe_since(&mut resumed, "cfg:resume", &last, 2).await;
    expect_numbered_events(&mut resumed, "cfg:resume", 11..=60).await;
    publish_ok(a.addr, "cfg:resume", b"{\"n\":61}").await;
    expect_numbered_events(&mut resumed, "cfg:resume", 61..=61).await;
    // The same over SSE, with Last-Event-ID, on the third node.
    let mut sse = SseClient::open(
        c.addr,
        "/v1/topics/cfg:resume/sse",
        &[("Last-Event-ID", seen[4].1.as_str())],
    )
    .await;
    for n in 6..=61u64 {
        let message = sse.next_message().await;
        assert_eq!(message["data"], json!({"n": n}), "{message}");
    }
}

#[tokio::test]
async fn racing_state_writes_from_two_nodes_give_one_gap_free_version_sequence() {
    let redis = RedisServer::start();
    let nodes = [node(&redis).await, node(&redis).await, node(&redis).await];
    put_state_ok(nodes[0].addr, "cfg:race", &json!({"start": true})).await;
    let mut mirrors = Vec::new();
    for n in &nodes {
        let mut c = WsClient::connect(n.addr).await;
        c.subscribe(&["cfg:race"], &[], 1).await;
        let snapshot = c.next_json().await;
        mirrors.push((Mirror::from_snapshot(&snapshot), c));
    }
    const EACH: u64 = 60;
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let addr = nodes[w].addr;
            tokio::spawn(async move {
                let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ w as u64;
                for k in 0..EACH {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let key = format!("k{}", (seed >> 33) % 8);
                    let response = match (seed >> 20) % 3 {
                        0 => put_state(addr, "cfg:race", &json!({"writer": w, "k": k})).await,
                        1 => {
                            let patch =
                                json!([{"op": "add", "path": format!("/{key}"), "value": k}]);
                            patch_state(addr, "cfg:race", &patch).await
                        }
                        _ => {
                            let patch = json!([{"op": "remove", "path": format!("/{key}")}]);
                            patch_state(addr, "cfg:race", &patch).await
                        }
                    };
                    // A remove of a key that is not there is refused cleanly; nothing else is.
                    assert!(
                        response.status == 200 || response.status == 422,
                        "{response:?}"
                    );
                    if response.status == 422 {
                        response.assert_error(422, "patch_unprocessable");
                    }
                }
            })
        })
        .collect();
    for w in writers {
        within("writers", w).await.expect("writer");
    }
    for n in &nodes {
        let (version, doc) = get_state(n.addr, "cfg:race").await;
        for (mirror, client) in &mut mirrors {
            mirror.follow_to(client, &version).await;
            assert_eq!(mirror.doc, doc, "a subscriber's document equals GET's");
        }
    }
    let (_, offset) = split_version(&mirrors[0].0.version);
    assert!(
        offset > 2 * EACH / 3,
        "most writes changed the document: {offset}"
    );
    // If-Match keeps its meaning across nodes: a stale version is refused.
    let stale = mirrors[0].0.seen[1].clone();
    let refused = put_state_raw(
        nodes[2].addr,
        "cfg:race",
        br#"{"late":true}"#,
        &[("If-Match", &format!("\"{stale}\""))],
    )
    .await;
    refused.assert_error(412, "precondition_failed");
}

/// A `tidings` node as its own process, so a test can kill it.
async fn node_process(redis: &RedisServer) -> (tokio::process::Child, std::net::SocketAddr) {
    let mut command = tidings_command();
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("TIDINGS_BUS_KIND", "redis")
        .env("TIDINGS_BUS_URL", redis.url());
    tidings_serving(command).await
}

#[tokio::test]
async fn clients_of_a_killed_node_resume_on_another_with_nothing_lost() {
    let redis = RedisServer::start();
    let (mut doomed, doomed_addr) = node_process(&redis).await;
    let (b, c) = (node(&redis).await, node(&redis).await);
    let mut client = WsClient::connect(doomed_addr).await;
    client.subscribe(&["runs:kill"], &[], 1).await;
    const TOTAL: u64 = 200;
    let publisher_addr = b.addr;
    let publisher = tokio::spawn(async move {
        for n in 1..=TOTAL {
            let body = json!({"n": n}).to_string();
            assert_eq!(
                publish_ok(publisher_addr, "runs:kill", body.as_bytes()).await,
                n
            );
        }
    });
    let mut last = String::new();
    for n in 1..=50u64 {
        let (offset, version, data) = events(&mut client, "runs:kill", 1).await.remove(0);
        assert_eq!((offset, data), (n, json!({"n": n})));
        last = version;
    }
    doomed.start_kill().expect("kill the node");
    within("the node to die", doomed.wait())
        .await
        .expect("wait");
    // The client notices: its connection ends, whatever it was reading.
    loop {
        use futures_util::StreamExt;
        match within("the dead node's connection to end", client.ws.next()).await {
            None | Some(Err(_)) => break,
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                // Written before the kill: delivered, so the resume starts after it.
                let value: Value = serde_json::from_str(&text).expect("JSON");
                last = str_field(&value, "version").to_string();
            }
            Some(Ok(_)) => {}
        }
    }
    let (_, resumed_from) = split_version(&last);
    let mut resumed = WsClient::connect(c.addr).await;
    subscribe_since(&mut resumed, "runs:kill", &last, 2).await;
    within("the publisher", publisher).await.expect("publisher");
    expect_numbered_events(&mut resumed, "runs:kill", resumed_from + 1..=TOTAL).await;
}

/// Waits until `path` on `addr` answers `status`.
async fn until_status(addr: std::net::SocketAddr, path: &str, status: u16) -> HttpResponse {
    within(&format!("{path} to answer {status}"), async {
        loop {
            let response = http_get(addr, path).await;
            if response.status == status {
                return response;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

#[tokio::test]
async fn redis_paused_means_503_and_degraded_then_recovery_with_every_offset() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut client = WsClient::connect(b.addr).await;
    client.subscribe(&["jobs:pause"], &[], 1).await;
    for n in 1..=5u64 {
        publish_ok(a.addr, "jobs:pause", json!({"n": n}).to_string().as_bytes()).await;
    }
    expect_numbered_events(&mut client, "jobs:pause", 1..=5).await;
    assert_eq!(http_get(a.addr, "/readyz").await.status, 200);

    redis.pause();
    let refused = within("a refusal while redis is paused", async {
        loop {
            let response = publish(a.addr, "jobs:pause", b"{\"during\":true}").await;
            if response.status != 202 {
                return response;
            }
        }
    })
    .await;
    refused.assert_error(503, "bus_unavailable");
    assert_eq!(refused.header("retry-after"), Some("1"), "{refused:?}");
    let not_ready = until_status(a.addr, "/readyz", 503).await;
    assert_eq!(not_ready.json()["status"], "degraded", "{not_ready:?}");
    assert!(a.gw.stats().bus_degraded, "/stats says degraded");
    let health = http_get(a.addr, "/healthz").await;
    assert_eq!(health.status, 200, "liveness holds: {health:?}");
    assert_eq!(health.json()["status"], "degraded");
    let state = http_request(
        a.addr,
        "PUT",
        "/v1/topics/cfg:pause/state",
        &[("Content-Type", "application/json")],
        b"{}",
    )
    .await;
    state.assert_error(503, "bus_unavailable");
    // Connected clients stay connected.
    client.ping(7).await;

    redis.resume();
    until_status(a.addr, "/readyz", 200).await;
    until_status(b.addr, "/readyz", 200).await;
    assert!(!a.gw.stats().bus_degraded);
    let last = publish_ok(a.addr, "jobs:pause", b"{\"after\":true}").await;
    // Every offset Redis assigned reaches the subscriber once, in order: those refused
    // while paused may still have been applied when Redis resumed (their outcome was
    // unknown), and they are delivered like any other.
    let seen = events(&mut client, "jobs:pause", (last - 5) as usize).await;
    let offsets: Vec<u64> = seen.iter().map(|e| e.0).collect();
    assert_eq!(offsets, (6..=last).collect::<Vec<_>>());
    assert_eq!(seen.last().unwrap().2, json!({"after": true}));
}

#[tokio::test]
async fn a_node_that_loses_its_subscription_connection_fills_the_gap() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut client = WsClient::connect(b.addr).await;
    client.subscribe(&["jobs:gap"], &[], 1).await;
    publish_numbered(&a, "jobs:gap", 1..=5).await;
    expect_numbered_events(&mut client, "jobs:gap", 1..=5).await;
    // Redis drops every pub/sub connection; publications go on meanwhile.
    let killed = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(killed.starts_with(":"), "{killed}");
    let reloads = b.gw.stats().bus_reloads;
    publish_numbered(&a, "jobs:gap", 6..=40).await;
    expect_numbered_events(&mut client, "jobs:gap", 6..=40).await;
    assert!(
        b.gw.stats().bus_reloads > reloads,
        "b reloaded after reconnecting"
    );
    assert_eq!(b.gw.stats().bus_followed_topics, 1);
}

#[tokio::test]
async fn redis_restarted_empty_means_new_epochs_told_to_every_subscriber() {
    let mut redis = RedisServer::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    put_state_ok(a.addr, "cfg:lost", &json!({"v": 1})).await;
    let mut client = WsClient::connect(b.addr).await;
    client.subscribe(&["jobs:lost", "cfg:lost"], &[], 1).await;
    let snapshot = client.next_json().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    let (old_epoch, _) = split_version(str_field(&snapshot, "version"));
    publish_numbered(&a, "jobs:lost", 1..=3).await;
    let seen = events(&mut client, "jobs:lost", 3).await;
    let (events_epoch, _) = split_version(&seen[2].1);

    redis.restart_empty();
    let mut truncated = None;
    let mut fresh = None;
    while truncated.is_none() || fresh.is_none() {
        let m = client.next_json().await;
        match (m["type"].as_str(), m["topic"].as_str()) {
            (Some("history_truncated"), Some("jobs:lost")) => truncated = Some(m),
            (Some("snapshot"), Some("cfg:lost")) => fresh = Some(m),
            other => panic!("unexpected {other:?}: {m}"),
        }
    }
    let truncated = truncated.unwrap();
    assert_eq!(str_field(&truncated, "last_version"), seen[2].1);
    let (new_epoch, _) = split_version(str_field(&truncated, "version"));
    assert_ne!(new_epoch, events_epoch, "a new epoch: {truncated}");
    let fresh = fresh.unwrap();
    let (doc_epoch, _) = split_version(str_field(&fresh, "version"));
    assert_ne!(doc_epoch, old_epoch, "{fresh}");
    assert_eq!(
        fresh["state"],
        Value::Null,
        "the document was lost: {fresh}"
    );
    // Publishing goes on in the new epoch, on every node.
    until_status(a.addr, "/readyz", 200).await;
    assert_eq!(publish_ok(a.addr, "jobs:lost", b"{\"n\":1}").await, 1);
    let (offset, version, _) = events(&mut client, "jobs:lost", 1).await.remove(0);
    assert_eq!(offset, 1);
    assert_eq!(split_version(&version).0, new_epoch);
}

#[tokio::test]
async fn a_resume_beyond_a_nodes_history_is_served_from_redis() {
    let redis = RedisServer::start();
    let small = |redis: &RedisServer| {
        let mut config = node_config(redis);
        config.history_max_len = 10;
        config.bus.history_len = 60;
        config
    };
    let a = TestGateway::start(small(&redis)).await;
    let b = TestGateway::start(small(&redis)).await;
    publish_numbered(&a, "jobs:deep", 1..=100).await;
    let epoch = epoch_of(a.addr, "jobs:deep").await;
    // A node that did not follow the topic loads 10 entries; Redis has 41..=100.
    let mut cold = WsClient::connect(b.addr).await;
    subscribe_since(&mut cold, "jobs:deep", &version_of(&epoch, 45), 1).await;
    expect_numbered_events(&mut cold, "jobs:deep", 46..=100).await;
    // Now b follows it; a second resume from further back than Redis keeps.
    let mut far = WsClient::connect(b.addr).await;
    subscribe_since(&mut far, "jobs:deep", &version_of(&epoch, 5), 1).await;
    let truncated = far.next_json().await;
    assert_eq!(truncated["type"], "history_truncated", "{truncated}");
    assert_eq!(
        str_field(&truncated, "first_available"),
        version_of(&epoch, 41),
        "what Redis still has: {truncated}"
    );
    expect_numbered_events(&mut far, "jobs:deep", 41..=100).await;
    // Both go on live, in order.
    publish_ok(a.addr, "jobs:deep", b"{\"n\":101}").await;
    expect_numbered_events(&mut cold, "jobs:deep", 101..=101).await;
    expect_numbered_events(&mut far, "jobs:deep", 101..=101).await;
}

#[tokio::test]
async fn a_topic_closed_on_one_node_is_closed_everywhere() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut client = WsClient::connect(b.addr).await;
    client.subscribe(&["runs:end"], &[], 1).await;
    publish_numbered(&a, "runs:end", 1..=2).await;
    expect_numbered_events(&mut client, "runs:end", 1..=2).await;
    let closed = close_topic(a.addr, "runs:end").await;
    assert_eq!(closed.status, 200, "{closed:?}");
    let message = next_of(&mut client, "closed", "runs:end").await;
    assert_eq!(
        split_version(str_field(&message, "version")).1,
        2,
        "{message}"
    );
    publish(b.addr, "runs:end", b"{}")
        .await
        .assert_error(409, "topic_closed");
    assert_eq!(
        poll(b.addr, "runs:end", "since=0").await["status"],
        "closed"
    );
    // A subscriber that comes later, on a third node, is told at once.
    let c = node(&redis).await;
    let mut late = WsClient::connect(c.addr).await;
    late.subscribe(&["runs:end"], &[], 2).await;
    next_of(&mut late, "closed", "runs:end").await;
    // State and events do not mix across nodes either.
    put_state_ok(a.addr, "cfg:kind", &json!({"a": 1})).await;
    publish(b.addr, "cfg:kind", b"{}")
        .await
        .assert_error(409, "wrong_topic_kind");
    publish_ok(b.addr, "jobs:kind", b"{}").await;
    put_state(a.addr, "jobs:kind", &json!({}))
        .await
        .assert_error(409, "wrong_topic_kind");
}

#[tokio::test]
async fn a_nodes_own_topics_stay_its_own_and_acks_carry_versions() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis).await, node(&redis).await);
    publish_numbered(&a, "runs:ack", 1..=3).await;
    // b loads the topic before it answers: the ack names the version it starts from.
    let mut client = WsClient::connect(b.addr).await;
    let ack = client.subscribe(&["runs:ack"], &[], 9).await;
    let epoch = epoch_of(a.addr, "runs:ack").await;
    assert_eq!(ack["versions"]["runs:ack"], version_of(&epoch, 3), "{ack}");
    // The stats topic is each node's own: published on b, it never goes through Redis.
    let mut stats = WsClient::connect(b.addr).await;
    stats.subscribe(&["_tidings:stats"], &[], 1).await;
    let event = next_of(&mut stats, "event", "_tidings:stats").await;
    assert!(event["data"]["connections"].is_u64(), "{event}");
    let keys = redis.command(&["KEYS", "*_tidings*"]);
    assert!(keys.starts_with("*0"), "no reserved topic in Redis: {keys}");
}
