//! `POST /v1/publish`: many publications and state writes in one request.
//!
//! The body is a JSON array of items, each `{"topic": T, "data": V}` (an event),
//! `{"topic": T, "state": V}` (a `PUT`) or `{"topic": T, "patch": [..]}` (a `PATCH`), with an
//! optional `"if_match"` for the state writes. Items run in the order given, one at a time,
//! each exactly as its own request would (so a topic's items keep their order), and each is
//! answered on its own: an offset, a version, or the error its own request would have
//! had. A refused item changes nothing and stops nothing else.

use std::borrow::Cow;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{classify, error_response, guard, json_response, read_body};
use crate::PublishError;
use crate::hub::Hub;

/// One item of a batch, borrowed from the body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Item<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    state: Option<&'a RawValue>,
    #[serde(borrow, default)]
    patch: Option<&'a RawValue>,
    #[serde(default)]
    if_match: Option<String>,
}

/// One item's answer.
#[derive(Serialize)]
struct Outcome<'a> {
    topic: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    changed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ItemError>,
}

/// An item's refusal: the status, code and message its own request would have had.
#[derive(Serialize)]
struct ItemError {
    status: u16,
    code: &'static str,
    message: String,
}

impl<'a> Outcome<'a> {
    fn refused(topic: &'a str, status: StatusCode, code: &'static str, message: String) -> Self {
        Outcome {
            topic,
            offset: None,
            version: None,
            changed: None,
            error: Some(ItemError {
                status: status.as_u16(),
                code,
                message,
            }),
        }
    }

    fn failed(topic: &'a str, e: &PublishError) -> Self {
        let (status, code, _) = classify(e);
        Outcome::refused(topic, status, code, e.to_string())
    }
}

/// The body of the `200`: one outcome per item, in order.
#[derive(Serialize)]
struct Answer<'a> {
    results: Vec<Outcome<'a>>,
}

/// `POST /v1/publish`.
pub(super) async fn publish(hub: &Hub, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let identity = match guard::batch(hub, &req).await {
        Ok(identity) => identity,
        Err(refused) => return refused,
    };
    let config = hub.config();
    let body = match read_body(req, config.max_publish_bytes).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    // The array and an item's object wrap each value: two levels more than one value.
    if let Err(e) = crate::proto::json::check_depth(&body, config.max_json_depth + 2) {
        return super::publish_error(&PublishError::Limit(e));
    }
    let items: Vec<Item<'_>> = match serde_json::from_slice(&body) {
        Ok(items) => items,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_batch",
                &format!(
                    "the body must be a JSON array of {{\"topic\", and one of \"data\", \"state\" or \"patch\"}}: {e}"
                ),
            );
        }
    };
    if items.len() > config.max_batch_items {
        return error_response(
            StatusCode::BAD_REQUEST,
            "too_many_items",
            &format!(
                "a batch holds at most {} items (max_batch_items)",
                config.max_batch_items
            ),
        );
    }
    let mut results = Vec::with_capacity(items.len());
    for item in &items {
        let topic: &str = &item.topic;
        if crate::topic::is_reserved(topic) {
            results.push(Outcome::refused(
                topic,
                StatusCode::FORBIDDEN,
                "reserved_topic",
                "the gateway's own topics take no publications".to_string(),
            ));
            continue;
        }
        if crate::topic::validate_topic(topic).is_ok() && !identity.publish.allows_topic(topic) {
            results.push(Outcome::refused(
                topic,
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("not allowed to publish to {topic}"),
            ));
            continue;
        }
        let if_match = item.if_match.as_deref();
        let outcome = match (item.data, item.state, item.patch) {
            (Some(data), None, None) => {
                match hub.publish_value(topic, data.get().as_bytes()).await {
                    Ok(published) => Outcome {
                        topic,
                        offset: Some(published.offset),
                        version: None,
                        changed: None,
                        error: None,
                    },
                    Err(e) => Outcome::failed(topic, &e),
                }
            }
            (None, Some(state), None) => {
                let written = match serde_json::from_str(state.get()) {
                    Ok(document) => hub.put_state_value(topic, document, if_match).await,
                    Err(e) => Err(PublishError::InvalidJson(e.to_string())),
                };
                written_outcome(topic, written)
            }
            (None, None, Some(patch)) => written_outcome(
                topic,
                hub.patch_state_value(topic, patch.get().as_bytes(), if_match)
                    .await,
            ),
            _ => Outcome::refused(
                topic,
                StatusCode::BAD_REQUEST,
                "invalid_item",
                "an item has exactly one of \"data\", \"state\" or \"patch\"".to_string(),
            ),
        };
        results.push(outcome);
    }
    json_response(StatusCode::OK, &Answer { results })
}

fn written_outcome<'a>(
    topic: &'a str,
    written: Result<crate::StateWritten, PublishError>,
) -> Outcome<'a> {
    match written {
        Ok(written) => Outcome {
            topic,
            offset: None,
            version: Some(written.version.to_string()),
            changed: Some(written.changed),
            error: None,
        },
        Err(e) => Outcome::failed(topic, &e),
    }
}
