//! The browser side of the gateway: the JavaScript client at `GET /v1/client.js`, the
//! operator's page at `GET /dashboard` (its assets embedded in the binary), the topic
//! listing `GET /v1/topics`, and the task that publishes the gateway's counters to its
//! reserved stats topic every second.
//!
//! The dashboard's HTML and scripts hold no data: every number it shows comes from the
//! stats topic and the topic endpoints, which need the admin credential when
//! authentication is on, as `/stats` does.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{error_response, guard, json_response, method_not_allowed, percent_decode};
use crate::hub::Hub;
use crate::topic::{is_reserved, validate_topic};

/// The reserved topic the gateway publishes its counters to, once a second, while a
/// connection subscribes to it by name. Node-local: each node publishes its own.
pub const STATS_TOPIC: &str = "_tidings:stats";

/// How often the stats topic gets a publication. A second is what the dashboard's
/// per-second rates need, and costs one small publication a second while it is watched.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// Topics one `GET /v1/topics` page lists unless `limit` says otherwise.
pub const DEFAULT_TOPICS_LIMIT: usize = 100;

/// Most topics one page lists: a page holds `limit + 1` names while it is built and
/// locks each listed topic once, so this bounds what one request can cost.
pub const MAX_TOPICS_LIMIT: usize = 1000;

/// One embedded file.
struct Asset {
    content_type: &'static str,
    cache_control: &'static str,
    body: &'static [u8],
    etag: OnceLock<HeaderValue>,
}

impl Asset {
    const fn new(
        content_type: &'static str,
        cache_control: &'static str,
        body: &'static str,
    ) -> Asset {
        Asset {
            content_type,
            cache_control,
            body: body.as_bytes(),
            etag: OnceLock::new(),
        }
    }

    /// A strong tag: a digest of the body, computed once.
    fn etag(&self) -> &HeaderValue {
        self.etag.get_or_init(|| {
            use sha2::Digest as _;
            let digest = sha2::Sha256::digest(self.body);
            let mut tag = String::from("\"");
            for byte in &digest[..12] {
                tag.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
                tag.push(char::from(b"0123456789abcdef"[usize::from(byte & 0xf)]));
            }
            tag.push('"');
            HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
        })
    }
}

/// Scripts a page loads by a stable URL: cached for five minutes, then revalidated with
/// their `ETag` (a new gateway version serves new bytes under the same URL).
const SCRIPT_CACHE: &str = "public, max-age=300";
/// The dashboard page: always revalidated, so a new version shows at the next load.
const PAGE_CACHE: &str = "no-cache";
const JS: &str = "text/javascript; charset=utf-8";

static CLIENT_JS: Asset = Asset::new(
    JS,
    SCRIPT_CACHE,
    include_str!("../../clients/js/tidings.js"),
);
static JSON_PATCH_JS: Asset = Asset::new(
    JS,
    SCRIPT_CACHE,
    include_str!("../../clients/js/fast-json-patch.js"),
);
static DASHBOARD_HTML: Asset = Asset::new(
    "text/html; charset=utf-8",
    PAGE_CACHE,
    include_str!("assets/dashboard.html"),
);
static DASHBOARD_JS: Asset = Asset::new(JS, PAGE_CACHE, include_str!("assets/dashboard.js"));
static DASHBOARD_CSS: Asset = Asset::new(
    "text/css; charset=utf-8",
    PAGE_CACHE,
    include_str!("assets/dashboard.css"),
);
static UPLOT_JS: Asset = Asset::new(JS, SCRIPT_CACHE, include_str!("assets/uPlot.iife.min.js"));
static UPLOT_CSS: Asset = Asset::new(
    "text/css; charset=utf-8",
    SCRIPT_CACHE,
    include_str!("assets/uPlot.min.css"),
);
static UPLOT_LICENSE: Asset = Asset::new(
    "text/plain; charset=utf-8",
    SCRIPT_CACHE,
    include_str!("assets/LICENSE-uPlot"),
);

/// The file a path names, if it is one of the embedded ones.
fn asset(segments: &[&str]) -> Option<&'static Asset> {
    Some(match segments {
        ["v1", "client.js"] => &CLIENT_JS,
        ["v1", "fast-json-patch.js"] => &JSON_PATCH_JS,
        ["dashboard"] | ["dashboard", ""] => &DASHBOARD_HTML,
        ["dashboard", "dashboard.js"] => &DASHBOARD_JS,
        ["dashboard", "dashboard.css"] => &DASHBOARD_CSS,
        ["dashboard", "uPlot.iife.min.js"] => &UPLOT_JS,
        ["dashboard", "uPlot.min.css"] => &UPLOT_CSS,
        ["dashboard", "LICENSE-uPlot"] => &UPLOT_LICENSE,
        _ => return None,
    })
}

/// Whether `segments` name an embedded file (the router sends them to [`serve_asset`]).
pub(crate) fn is_asset(segments: &[&str]) -> bool {
    asset(segments).is_some()
}

/// `GET` or `HEAD` of an embedded file, `304` when `If-None-Match` names its tag.
pub(crate) fn serve_asset<B>(req: &Request<B>, segments: &[&str]) -> Response<Full<Bytes>> {
    let Some(asset) = asset(segments) else {
        return error_response(StatusCode::NOT_FOUND, "not_found", "no such file");
    };
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => return method_not_allowed("GET"),
    };
    let etag = asset.etag().clone();
    let not_modified = etag.to_str().is_ok_and(|tag| {
        req.headers()
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| super::conditional::if_none_match(v, tag))
    });
    let body = if head || not_modified {
        Bytes::new()
    } else {
        Bytes::from_static(asset.body)
    };
    let mut response = Response::new(Full::new(body));
    if not_modified {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
    }
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(asset.cache_control),
    );
    headers.insert(header::ETAG, etag);
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if segments.first() == Some(&"dashboard") {
        // The page loads only its own embedded files and talks only to this gateway.
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'",
            ),
        );
    }
    response
}

/// The refusal for a write (publish, state, close) to a reserved topic: only the gateway
/// publishes there.
pub(crate) fn refuse_reserved_write(topic: &str) -> Option<Response<Full<Bytes>>> {
    is_reserved(topic).then(|| {
        error_response(
            StatusCode::FORBIDDEN,
            "reserved_topic",
            &format!(
                "topics under {}: are the gateway's own; nothing else publishes there",
                crate::topic::RESERVED_SEGMENT
            ),
        )
    })
}

/// The body of `GET /v1/topics`.
#[derive(Serialize)]
struct TopicsPage {
    topics: Vec<crate::hub::TopicSummary>,
    /// The cursor of the next page (`after=`), or `null` on the last page.
    next: Option<String>,
}

/// `GET /v1/topics?limit=N&after=CURSOR&prefix=P`: the topics this node knows, in byte
/// order of their names, with their kind, version and counts; an admin endpoint.
pub(crate) async fn list_topics<B>(hub: &Hub, req: &Request<B>) -> Response<Full<Bytes>> {
    if *req.method() != Method::GET {
        return method_not_allowed("GET");
    }
    if let Err(refused) = guard::admin(hub, req).await {
        return refused;
    }
    let mut limit = DEFAULT_TOPICS_LIMIT;
    let mut after = None;
    let mut prefix = String::new();
    for (key, value) in super::query_pairs(req.uri()) {
        match key {
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_TOPICS_LIMIT).contains(&n) => limit = n,
                _ => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "invalid_limit",
                        &format!("limit must be a whole number from 1 to {MAX_TOPICS_LIMIT}"),
                    );
                }
            },
            "after" => {
                let cursor = percent_decode(value);
                if validate_topic(&cursor).is_err() {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "invalid_cursor",
                        "after must be the next cursor of a previous page (a topic name)",
                    );
                }
                after = Some(cursor);
            }
            "prefix" => {
                prefix = percent_decode(value);
                let valid = prefix.len() <= crate::topic::MAX_TOPIC_LEN
                    && prefix
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.-:".contains(&b));
                if !valid {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "invalid_prefix",
                        "prefix must be the start of a topic name: [A-Za-z0-9_.-] and ':'",
                    );
                }
            }
            _ => {}
        }
    }
    let (topics, more) = hub.topics_page(after.as_deref(), &prefix, limit);
    let next = if more {
        topics.last().map(|t| t.topic.clone())
    } else {
        None
    };
    let mut response = json_response(StatusCode::OK, &TopicsPage { topics, next });
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// What the stats topic carries each second: `GET /stats`'s counters, the time, and the
/// WebSocket count (connections that are not SSE streams).
#[derive(Serialize)]
struct StatsMessage {
    ts: u64,
    interval_ms: u64,
    websockets: u64,
    #[serde(flatten)]
    stats: crate::Stats,
}

/// Publishes the counters to [`STATS_TOPIC`] every [`STATS_INTERVAL`] until `stop`; a tick
/// with no subscriber publishes nothing (see [`Hub::publish_local`]).
pub(crate) async fn publish_stats(hub: Arc<Hub>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(STATS_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        let stats = hub.metrics().stats();
        let message = StatsMessage {
            ts: crate::proto::message::now_ms(),
            interval_ms: STATS_INTERVAL.as_millis() as u64,
            websockets: stats.connections.saturating_sub(stats.sse_streams),
            stats,
        };
        let Ok(json) = serde_json::to_vec(&message) else {
            continue;
        };
        if let Err(e) = hub.publish_local(STATS_TOPIC, &json) {
            tracing::debug!(error = %e, "stats publication refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_has_a_quoted_tag_and_a_body() {
        for path in [
            &["v1", "client.js"][..],
            &["v1", "fast-json-patch.js"],
            &["dashboard"],
            &["dashboard", "dashboard.js"],
            &["dashboard", "dashboard.css"],
            &["dashboard", "uPlot.iife.min.js"],
            &["dashboard", "uPlot.min.css"],
        ] {
            let asset = asset(path).expect("an asset");
            assert!(!asset.body.is_empty(), "{path:?}");
            let tag = asset.etag().to_str().unwrap().to_owned();
            assert!(
                tag.len() == 26 && tag.starts_with('"') && tag.ends_with('"'),
                "{tag}"
            );
        }
        assert!(asset(&["dashboard", "../Cargo.toml"]).is_none());
    }

    #[test]
    fn reserved_writes_are_refused() {
        assert!(refuse_reserved_write("_tidings:stats").is_some());
        assert!(refuse_reserved_write("runs:_tidings").is_none());
    }
}
