//! HTTP details found by hostile testing: `/metrics` in both Prometheus formats (parsed
//! here by an independent reader of the classic format), the metric names OPERATIONS.md
//! documents, `If-None-Match` on state documents and polls, and the `tidings` binary's
//! `--help`, `--listen` and configuration errors.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use serde_json::json;

/// What Prometheus 3 sends by default.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0;q=0.5,\
    application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;q=0.3,\
    text/plain;version=0.0.4;q=0.2,*/*;q=0.1";

/// One sample of the classic text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// A family as `# TYPE` declares it.
#[derive(Debug)]
struct Family {
    kind: String,
    has_samples: bool,
}

fn is_name(name: &str, colon: bool) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

/// Parses `{a="x",b="y"}` (the part after the metric name); returns the labels and the
/// rest of the line.
fn parse_labels(s: &str, line: &str) -> (Vec<(String, String)>, String) {
    let mut labels = Vec::new();
    let mut rest = s.strip_prefix('{').expect("labels start with {");
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return (labels, after.to_string());
        }
        let (name, after) = rest
            .split_once('=')
            .unwrap_or_else(|| panic!("label without = in {line:?}"));
        let name = name.trim();
        assert!(is_name(name, false), "bad label name {name:?} in {line:?}");
        let mut chars = after
            .strip_prefix('"')
            .unwrap_or_else(|| panic!("unquoted label value in {line:?}"))
            .char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => panic!("bad escape {other:?} in {line:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        };
        labels.push((name.to_string(), value));
        rest = &after[1 + end + 1..];
        rest = rest.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Reads a classic text-format (0.0.4) exposition line by line, as the Prometheus
/// exposition format specification describes it, failing on anything it does not allow.
fn parse_classic(text: &str) -> (HashMap<String, Family>, Vec<Sample>) {
    let mut families: HashMap<String, Family> = HashMap::new();
    let mut helped = HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match words.next() {
                Some("TYPE") => {
                    let name = words.next().expect("TYPE names a metric");
                    let kind = words.next().expect("TYPE has a type").trim();
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "type {kind:?} is not a classic type: {line:?}"
                    );
                    assert!(is_name(name, true), "bad metric name in {line:?}");
                    assert!(
                        !samples.iter().any(|s: &Sample| s.name == name),
                        "TYPE after samples of {name}"
                    );
                    let old = families.insert(
                        name.to_string(),
                        Family {
                            kind: kind.to_string(),
                            has_samples: false,
                        },
                    );
                    assert!(old.is_none(), "second TYPE for {name}");
                }
                Some("HELP") => {
                    let name = words.next().expect("HELP names a metric");
                    assert!(helped.insert(name.to_string()), "second HELP for {name}");
                }
                // Any other comment is ignored by the format; an OpenMetrics `# EOF` here
                // would mean the body was not converted.
                _ => assert_ne!(line, "# EOF", "classic body ends with # EOF"),
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("sample without value: {line:?}"));
        let name = &line[..name_end];
        assert!(is_name(name, true), "bad metric name in {line:?}");
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..], line)
        } else {
            (Vec::new(), line[name_end..].to_string())
        };
        let mut fields = rest.split_whitespace();
        let value = fields
            .next()
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value {v:?} in {line:?}")),
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .unwrap_or_else(|_| panic!("bad timestamp in {line:?}"));
        }
        assert!(fields.next().is_none(), "trailing text in {line:?}");
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    (families, samples)
}

/// The family a classic sample belongs to, by the rules the classic parser applies.
fn family_of<'a>(families: &'a mut HashMap<String, Family>, name: &str) -> Option<&'a mut Family> {
    if families.contains_key(name) {
        return families.get_mut(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && families
                .get(base)
                .is_some_and(|f| f.kind == "histogram" || f.kind == "summary")
        {
            return families.get_mut(base);
        }
    }
    None
}

async fn get_metrics(gw: &TestGateway, accept: Option<&str>) -> HttpResponse {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
    let response = http_request(gw.addr, "GET", "/metrics", &headers, b"").await;
    assert_eq!(response.status, 200, "{response:?}");
    response
}

fn body_text(response: &HttpResponse) -> String {
    String::from_utf8(response.body.clone()).expect("metrics body is UTF-8")
}

#[tokio::test]
async fn metrics_without_accept_is_the_classic_format_with_a_type_for_every_sample() {
    let gw = TestGateway::start_default().await;
    publish_ok(gw.addr, "m:a", b"1").await;
    publish_ok(gw.addr, "m:a", b"2").await;
    for accept in [None, Some("text/plain"), Some("*/*")] {
        let response = get_metrics(&gw, accept).await;
        assert_eq!(
            response.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8"),
            "Accept {accept:?}"
        );
        let text = body_text(&response);
        let (mut families, samples) = parse_classic(&text);
        assert!(!samples.is_empty(), "no samples in {text}");
        for sample in &samples {
            let family = family_of(&mut families, &sample.name)
                .unwrap_or_else(|| panic!("sample {} has no # TYPE in\n{text}", sample.name));
            family.has_samples = true;
        }
        for (name, family) in &families {
            assert!(
                family.has_samples,
                "# TYPE {name} has no samples in\n{text}"
            );
        }
        let typed = |name: &str| families.get(name).map(|f| f.kind.as_str());
        assert_eq!(typed("tidings_publications_total"), Some("counter"));
        assert_eq!(typed("tidings_connections_closed_total"), Some("counter"));
        assert_eq!(typed("tidings_connections"), Some("gauge"));
        let publications = samples
            .iter()
            .find(|s| s.name == "tidings_publications_total")
            .expect("publications sample");
        assert_eq!(publications.value, 2.0);
        let reasons: HashSet<&str> = samples
            .iter()
            .filter(|s| s.name == "tidings_connections_closed_total")
            .flat_map(|s| s.labels.iter())
            .filter(|(k, _)| k == "reason")
            .map(|(_, v)| v.as_str())
            .collect();
        assert!(reasons.contains("slow_consumer"), "reasons {reasons:?}");
    }
}

#[tokio::test]
async fn metrics_is_openmetrics_when_the_scraper_prefers_it() {
    let gw = TestGateway::start_default().await;
    publish_ok(gw.addr, "m:b", b"1").await;
    for accept in [
        PROMETHEUS_ACCEPT,
        "application/openmetrics-text; version=1.0.0",
        "application/openmetrics-text",
    ] {
        let response = get_metrics(&gw, Some(accept)).await;
        assert_eq!(
            response.header("content-type"),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            "Accept {accept:?}"
        );
        let text = body_text(&response);
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("# TYPE tidings_publications counter\n"),
            "{text}"
        );
        assert!(text.contains("\ntidings_publications_total 1\n"), "{text}");
    }
}

/// The section of OPERATIONS.md about `/stats` and `/metrics`.
fn operations_metrics_section() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/OPERATIONS.md");
    let doc = std::fs::read_to_string(path).expect("read docs/OPERATIONS.md");
    let start = doc
        .find("## `/stats` and `/metrics`")
        .expect("OPERATIONS.md has a /metrics section");
    let section = &doc[start + 3..];
    let end = section.find("\n## ").unwrap_or(section.len());
    section[..end].to_string()
}

/// Every `tidings_*` word in `text`.
fn metric_names(text: &str) -> HashSet<String> {
    let mut names = HashSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("tidings_") {
        let word: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + word.len()..];
        names.insert(word);
    }
    names
}

#[tokio::test]
async fn operations_md_uses_the_names_and_labels_metrics_emits() {
    let gw = TestGateway::start_default().await;
    let text = body_text(&get_metrics(&gw, None).await);
    let (_, samples) = parse_classic(&text);
    let emitted: HashSet<String> = samples.iter().map(|s| s.name.clone()).collect();
    let labels: HashSet<(String, String)> = samples
        .iter()
        .flat_map(|s| s.labels.iter().cloned())
        .collect();

    let section = operations_metrics_section();
    let documented = metric_names(&section);
    assert!(!documented.is_empty(), "no metric names in the section");
    for name in &documented {
        assert!(
            emitted.contains(name),
            "OPERATIONS.md names {name}, /metrics has only {emitted:?}"
        );
    }
    for name in &emitted {
        assert!(
            documented.contains(name),
            "OPERATIONS.md does not document {name}"
        );
    }
    // Every `label="value"` in the section (PromQL selectors, tables) is one /metrics has.
    let mut rest = section.as_str();
    let mut checked = 0;
    while let Some(at) = rest.find("=\"") {
        let key: String = rest[..at]
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let value: String = rest[at + 2..].chars().take_while(|c| *c != '"').collect();
        rest = &rest[at + 2..];
        if value == "..." {
            continue;
        }
        assert!(
            labels.contains(&(key.clone(), value.clone())),
            "OPERATIONS.md uses {key}=\"{value}\", which /metrics never emits"
        );
        checked += 1;
    }
    assert!(checked > 0, "no label selectors in the section");
}

#[tokio::test]
async fn if_none_match_on_state_answers_304_with_the_etag() {
    let gw = TestGateway::start_default().await;
    let topic = "cfg:inm";
    let written = put_state_ok(gw.addr, topic, &json!({"a": 1})).await;
    let etag = format!("\"{}\"", written.version);
    let path = format!("/v1/topics/{topic}/state");
    for condition in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"nope\", {etag}"),
        format!("\"a,b\",W/{etag} , \"c\""),
        "*".to_string(),
    ] {
        let response =
            http_request(gw.addr, "GET", &path, &[("If-None-Match", &condition)], b"").await;
        assert_eq!(
            response.status, 304,
            "If-None-Match {condition}: {response:?}"
        );
        assert_eq!(response.header("etag"), Some(etag.as_str()));
        assert!(
            response
                .header("content-length")
                .is_none_or(|len| len == "0"),
            "{response:?}"
        );
    }
    for condition in ["\"nope\"", "W/\"nope\", \"other\"", &written.version] {
        let response =
            http_request(gw.addr, "GET", &path, &[("If-None-Match", condition)], b"").await;
        assert_eq!(
            response.status, 200,
            "If-None-Match {condition}: {response:?}"
        );
        assert_eq!(response.json()["state"], json!({"a": 1}));
    }
    // After a write, the old tag no longer matches and the answer carries the new one.
    let next = put_state_ok(gw.addr, topic, &json!({"a": 2})).await;
    let response = http_request(gw.addr, "GET", &path, &[("If-None-Match", &etag)], b"").await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        response.header("etag"),
        Some(format!("\"{}\"", next.version).as_str())
    );
    assert_eq!(response.json()["state"], json!({"a": 2}));
    // No document: `*` does not match, the 404 stands.
    let response = http_request(
        gw.addr,
        "GET",
        "/v1/topics/cfg:none/state",
        &[("If-None-Match", "*")],
        b"",
    )
    .await;
    response.assert_error(404, "no_state");
}

/// GETs a poll page with an optional `If-None-Match`.
async fn poll_page(gw: &TestGateway, query: &str, condition: Option<&str>) -> HttpResponse {
    let headers: Vec<(&str, &str)> = condition
        .map(|c| ("If-None-Match", c))
        .into_iter()
        .collect();
    http_request(
        gw.addr,
        "GET",
        &format!("/v1/topics/jobs:inm/events?{query}"),
        &headers,
        b"",
    )
    .await
}

#[tokio::test]
async fn if_none_match_on_a_poll_answers_304_until_the_page_changes() {
    let gw = TestGateway::start_default().await;
    publish_ok(gw.addr, "jobs:inm", b"{\"n\":1}").await;
    publish_ok(gw.addr, "jobs:inm", b"{\"n\":2}").await;

    let first = poll_page(&gw, "since=0", None).await;
    assert_eq!(first.status, 200, "{first:?}");
    let etag = first
        .header("etag")
        .expect("a poll page has an ETag")
        .to_string();
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "strong tag {etag}"
    );
    let again = poll_page(&gw, "since=0", Some(&etag)).await;
    assert_eq!(again.status, 304, "{again:?}");
    assert_eq!(again.header("etag"), Some(etag.as_str()));
    let weak = poll_page(&gw, "since=0", Some(&format!("W/{etag}"))).await;
    assert_eq!(weak.status, 304, "{weak:?}");

    // Another page of the same topic at the same version is another representation.
    let limited = poll_page(&gw, "since=0&limit=1", Some(&etag)).await;
    assert_eq!(limited.status, 200, "{limited:?}");
    assert_ne!(limited.header("etag"), Some(etag.as_str()));
    assert_eq!(limited.json()["events"].as_array().map(Vec::len), Some(1));

    // A new event changes the page: the old tag gets the full new page.
    publish_ok(gw.addr, "jobs:inm", b"{\"n\":3}").await;
    let changed = poll_page(&gw, "since=0", Some(&etag)).await;
    assert_eq!(changed.status, 200, "{changed:?}");
    assert_ne!(changed.header("etag"), Some(etag.as_str()));
    assert_eq!(changed.json()["events"].as_array().map(Vec::len), Some(3));

    // The tail page a poller repeats is 304 until something is published.
    let tail = poll_page(&gw, "since=3", None).await;
    let tail_tag = tail.header("etag").expect("ETag").to_string();
    assert_eq!(poll_page(&gw, "since=3", Some(&tail_tag)).await.status, 304);
    publish_ok(gw.addr, "jobs:inm", b"{\"n\":4}").await;
    let news = poll_page(&gw, "since=3", Some(&tail_tag)).await;
    assert_eq!(news.status, 200, "{news:?}");
    assert_eq!(news.json()["events"][0]["data"], json!({"n": 4}));
}

#[tokio::test]
async fn serve_help_lists_every_key_and_where_they_are_documented() {
    let output = within(
        "tidings serve --help",
        tidings_command().args(["serve", "--help"]).output(),
    )
    .await
    .expect("run tidings");
    assert!(output.status.success(), "{output:?}");
    let help = String::from_utf8(output.stdout).expect("UTF-8 help");
    let defaults = toml::Table::try_from(tidings::Config::default()).expect("defaults as TOML");
    assert!(defaults.len() > 30, "{defaults:?}");
    for key in defaults.keys() {
        assert!(
            help.contains(&format!("  {key} = ")),
            "--help does not list {key}:\n{help}"
        );
    }
    assert!(help.contains("TIDINGS_<KEY>"), "{help}");
    assert!(help.contains("docs/OPERATIONS.md"), "{help}");
    for args in [&["--help"][..], &["serve", "--help"]] {
        let output = within("tidings --help", tidings_command().args(args).output())
            .await
            .expect("run tidings");
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(!help.contains("SSE"), "{args:?} promises SSE:\n{help}");
    }
}

#[tokio::test]
async fn serve_listens_on_a_host_name() {
    let mut command = tidings_command();
    command.args(["serve", "--listen", "localhost:0"]);
    let (mut child, addr) = tidings_serving(command).await;
    assert_eq!(addr.ip(), std::net::Ipv4Addr::LOCALHOST);
    let health = http_get(addr, "/healthz").await;
    assert_eq!(health.status, 200, "{health:?}");
    child.start_kill().expect("stop tidings");
    within("tidings to exit", child.wait()).await.expect("wait");
}

#[tokio::test]
async fn a_config_error_names_its_variable_and_exits_2() {
    for (name, value, expected) in [
        (
            "TIDINGS_PING_INTERVAL",
            "abc",
            r#"TIDINGS_PING_INTERVAL=abc: invalid duration"#,
        ),
        (
            "TIDINGS_LISTEN",
            "nowhere.invalid:1",
            "TIDINGS_LISTEN=nowhere.invalid:1: cannot resolve",
        ),
    ] {
        let output = within(
            "tidings with a bad variable",
            tidings_command().arg("serve").env(name, value).output(),
        )
        .await
        .expect("run tidings");
        assert_eq!(output.status.code(), Some(2), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.starts_with(&format!("tidings: {expected}")),
            "{stderr}"
        );
    }
    let output = within(
        "tidings with a bad flag",
        tidings_command()
            .args(["serve", "--listen", "localhost"])
            .output(),
    )
    .await
    .expect("run tidings");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("tidings: --listen localhost: "),
        "{stderr}"
    );
}
