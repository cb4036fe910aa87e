//! `POST /v1/publish`: many writes in one request, each answered on its own, in order.

mod common;

use common::*;
use serde_json::{Value, json};

async fn batch(addr: std::net::SocketAddr, body: &Value) -> HttpResponse {
    http_request(
        addr,
        "POST",
        "/v1/publish",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await
}

#[tokio::test]
async fn a_batch_answers_each_item_in_order_and_subscribers_see_them_in_order() {
    let gw = TestGateway::start_default().await;
    let mut client = WsClient::connect(gw.addr).await;
    client.subscribe(&["jobs:a", "cfg:b"], &[], 1).await;
    close_topic(gw.addr, "jobs:closed").await;
    let response = batch(
        gw.addr,
        &json!([
            {"topic": "jobs:a", "data": {"n": 1}},
            {"topic": "cfg:b", "state": {"mode": "on"}},
            {"topic": "jobs:a", "data": {"n": 2}},
            {"topic": "cfg:b", "patch": [{"op": "add", "path": "/level", "value": 3}]},
            {"topic": "jobs:closed", "data": {}},
            {"topic": "bad topic", "data": {}},
            {"topic": "cfg:b", "data": {}},
            {"topic": "jobs:a", "data": {}, "state": {}},
            {"topic": "cfg:b", "state": {"x": 1}, "if_match": "\"0000000000000000:9\""},
            {"topic": "_tidings:stats", "data": {}},
            {"topic": "jobs:a", "data": [3]},
        ]),
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    let results = response.json()["results"].clone();
    let results = results.as_array().expect("results");
    assert_eq!(results.len(), 11);
    assert_eq!(results[0], json!({"topic": "jobs:a", "offset": 1}));
    assert_eq!(results[1]["changed"], true);
    assert_eq!(split_version(str_field(&results[1], "version")).1, 1);
    assert_eq!(results[2], json!({"topic": "jobs:a", "offset": 2}));
    assert_eq!(split_version(str_field(&results[3], "version")).1, 2);
    let codes: Vec<&str> = results[4..10]
        .iter()
        .map(|r| r["error"]["code"].as_str().unwrap_or("none"))
        .collect();
    assert_eq!(
        codes,
        [
            "topic_closed",
            "invalid_topic",
            "wrong_topic_kind",
            "invalid_item",
            "precondition_failed",
            "reserved_topic"
        ]
    );
    assert_eq!(results[4]["error"]["status"], 409);
    assert_eq!(
        results[10],
        json!({"topic": "jobs:a", "offset": 3}),
        "a refusal stops nothing"
    );
    // The subscriber gets each topic's items in the batch's order.
    let mut events = Vec::new();
    let mut mirror = None;
    while events.len() < 3
        || mirror
            .as_ref()
            .is_none_or(|m: &Mirror| m.version.ends_with(":1"))
    {
        let m = client.next_json().await;
        match m["type"].as_str() {
            Some("event") => events.push(m["data"].clone()),
            Some("snapshot") => mirror = Some(Mirror::from_snapshot(&m)),
            Some("change") => mirror
                .get_or_insert_with(|| {
                    Mirror::at("cfg:b", str_field(&m, "old_version"), Value::Null)
                })
                .apply(&m),
            other => panic!("unexpected {other:?}: {m}"),
        }
    }
    assert_eq!(events, [json!({"n": 1}), json!({"n": 2}), json!([3])]);
    let (version, doc) = get_state(gw.addr, "cfg:b").await;
    let mirror = mirror.expect("changes of cfg:b");
    assert_eq!((mirror.version, mirror.doc), (version, doc.clone()));
    assert_eq!(doc, json!({"mode": "on", "level": 3}));
}

#[tokio::test]
async fn a_malformed_or_oversized_batch_is_refused_whole() {
    let gw = TestGateway::start(tidings::Config::default().max_batch_items(2)).await;
    batch(gw.addr, &json!({"topic": "a", "data": 1}))
        .await
        .assert_error(400, "invalid_batch");
    batch(gw.addr, &json!([{"topic": "a", "data": 1, "extra": true}]))
        .await
        .assert_error(400, "invalid_batch");
    let three =
        json!([{"topic": "a", "data": 1}, {"topic": "a", "data": 2}, {"topic": "a", "data": 3}]);
    batch(gw.addr, &three)
        .await
        .assert_error(400, "too_many_items");
    let deep = format!(
        r#"[{{"topic":"a","data":{}1{}}}]"#,
        "[".repeat(70),
        "]".repeat(70)
    );
    http_request(gw.addr, "POST", "/v1/publish", &[], deep.as_bytes())
        .await
        .assert_error(422, "json_too_deep");
    let big = format!(r#"[{{"topic":"a","data":"{}"}}]"#, "x".repeat(1_100_000));
    http_request(gw.addr, "POST", "/v1/publish", &[], big.as_bytes())
        .await
        .assert_error(413, "payload_too_large");
    http_get(gw.addr, "/v1/publish")
        .await
        .assert_error(405, "method_not_allowed");
    // Nothing of the refused batches was published.
    assert_eq!(poll(gw.addr, "a", "since=0").await["events"], json!([]));
    gw.assert_alive().await;
}
