//! State documents: a topic that holds one JSON document, replaced (PUT) or patched (RFC 6902
//! JSON Patch), whose subscribers receive a snapshot and then the diffs.
//!
//! Every change is diffed **once**, here, into the RFC 6902 operations that turn the old
//! document into the new one; the hub encodes that diff into one `change` frame for every
//! subscriber. A replace or patch that leaves the document equal publishes nothing.

use bytes::Bytes;
use json_patch::{PatchErrorKind, PatchOperation};
use serde_json::Value;

use super::version::{Epoch, Version};
use crate::proto::json::{self, JsonLimitError};
use crate::proto::message::now_ms;
use crate::proto::versioned::encode_snapshot;

/// One change of a state document, ready to encode and fan out.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The version the diff applies to.
    pub old: Version,
    /// The version the diff produces: the next offset of the same epoch.
    pub new: Version,
    /// The RFC 6902 operations turning the old document into the new one, serialized as a
    /// JSON array once per change.
    pub diff: Bytes,
}

/// Why a JSON Patch was refused; the document is unchanged and nothing is published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// A `test` operation found a different value: the client's precondition does not hold
    /// (HTTP 409 Conflict).
    #[error("JSON Patch operation {index} failed: the test at {path:?} did not match")]
    TestFailed {
        /// Index of the failing operation in the patch.
        index: usize,
        /// Its JSON Pointer.
        path: String,
    },
    /// An operation names a location that does not exist or cannot hold a value, or a
    /// `move` into its own child (HTTP 422 Unprocessable Content).
    #[error("JSON Patch operation {index} cannot be applied at {path:?}: {reason}")]
    Unprocessable {
        /// Index of the failing operation in the patch.
        index: usize,
        /// Its JSON Pointer.
        path: String,
        /// What was wrong, as the patch library reports it.
        reason: String,
    },
    /// The body is not a JSON array of RFC 6902 operations (HTTP 400 for non-JSON, 422 for
    /// JSON that is not a patch; the HTTP layer tells them apart before parsing).
    #[error("invalid JSON Patch: {0}")]
    Invalid(String),
}

impl PatchError {
    /// The stable error code sent to the client.
    pub fn code(&self) -> &'static str {
        match self {
            PatchError::TestFailed { .. } => "patch_test_failed",
            PatchError::Unprocessable { .. } => "patch_unprocessable",
            PatchError::Invalid(_) => "invalid_patch",
        }
    }

    /// The HTTP status the publish endpoints answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            PatchError::TestFailed { .. } => 409,
            PatchError::Unprocessable { .. } | PatchError::Invalid(_) => 422,
        }
    }
}

/// Parses a JSON Patch request body (`application/json-patch+json`).
pub fn parse_patch(body: &[u8]) -> Result<Vec<PatchOperation>, PatchError> {
    serde_json::from_slice::<json_patch::Patch>(body)
        .map(|p| p.0)
        .map_err(|e| PatchError::Invalid(e.to_string()))
}

/// An `If-Match` precondition that did not hold (HTTP 412).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("precondition failed: the document is at version {current}")]
pub struct PreconditionFailed {
    /// The document's version, for the error body and the `ETag` of the 412.
    pub current: Version,
}

/// The bounds every state write is checked against; reaching one refuses the write and
/// leaves the document as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateLimits {
    /// Deepest nesting of arrays and objects (`max_json_depth`).
    pub max_depth: usize,
    /// Largest document, in bytes of its JSON (`max_state_bytes`).
    pub max_bytes: usize,
    /// Most operations in one patch (`max_patch_ops`).
    pub max_ops: usize,
}

impl StateLimits {
    /// Most estimated in-memory bytes a document may reach while a patch is applied: a JSON
    /// array of small numbers takes about 16 times its text in memory, so this is generous
    /// for real documents and still stops a patch that copies the root into itself over
    /// and over long before it doubles its way to gigabytes.
    pub fn max_footprint(&self) -> usize {
        self.max_bytes.saturating_mul(FOOTPRINT_PER_JSON_BYTE)
    }
}

impl Default for StateLimits {
    fn default() -> StateLimits {
        StateLimits {
            max_depth: 64,
            max_bytes: 1024 * 1024,
            max_ops: 1000,
        }
    }
}

/// See [`StateLimits::max_footprint`].
const FOOTPRINT_PER_JSON_BYTE: usize = 24;

/// Why a state write was refused; the document is unchanged and nothing is published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The patch does not apply.
    #[error(transparent)]
    Patch(#[from] PatchError),
    /// The result (or a step of the patch) would pass a bound.
    #[error("the state document would be {0}")]
    Limit(#[from] JsonLimitError),
    /// The patch has more operations than `max_patch_ops`.
    #[error("the patch has more than {limit} operations")]
    TooManyOps {
        /// The configured limit.
        limit: usize,
    },
}

impl StateError {
    /// The stable error code sent to the client.
    pub fn code(&self) -> &'static str {
        match self {
            StateError::Patch(p) => p.code(),
            StateError::Limit(JsonLimitError::TooDeep { .. }) => "json_too_deep",
            StateError::Limit(JsonLimitError::TooLarge { .. }) => "state_too_large",
            StateError::TooManyOps { .. } => "too_many_patch_ops",
        }
    }

    /// The HTTP status the state endpoints answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            StateError::Patch(p) => p.http_status(),
            StateError::Limit(JsonLimitError::TooDeep { .. }) => 422,
            StateError::Limit(JsonLimitError::TooLarge { .. }) | StateError::TooManyOps { .. } => {
                413
            }
        }
    }
}

/// A topic's JSON document and the version it is at.
#[derive(Debug)]
pub struct StateDoc {
    doc: Value,
    version: Version,
    /// The document serialized, made on first demand after each change and shared by every
    /// snapshot and `GET` until the next change.
    json: Option<Bytes>,
    /// The `snapshot` frame of this version, encoded once and shared by every subscriber
    /// that needs one (a new subscriber, or one whose backlog was dropped).
    snapshot: Option<Bytes>,
    /// Nesting depth of `doc`.
    depth: usize,
    /// Estimated memory of `doc` and its serialized copies (see [`StateDoc::footprint`]).
    footprint: usize,
}

impl StateDoc {
    /// A new document topic of `epoch` at offset 0, holding `null` until the first PUT.
    pub fn new(epoch: Epoch) -> StateDoc {
        StateDoc::restore(Version::new(epoch, 0), Value::Null)
    }

    /// A document known to be at `version` (restored from shared storage).
    pub fn restore(version: Version, doc: Value) -> StateDoc {
        let shape = json::measure(&doc, usize::MAX, usize::MAX).unwrap_or_default();
        let json_len = serde_json::to_vec(&doc).map_or(0, |j| j.len());
        StateDoc {
            doc,
            version,
            json: None,
            snapshot: None,
            depth: shape.depth,
            footprint: footprint(shape.footprint, json_len),
        }
    }

    /// The current document.
    pub fn doc(&self) -> &Value {
        &self.doc
    }

    /// The current version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Estimated bytes this document holds: its parsed tree, its serialized JSON and its
    /// snapshot frame (counted whether or not they are made yet, since any reader makes
    /// them). State budgets are counted in this.
    pub fn footprint(&self) -> usize {
        self.footprint
    }

    /// The current document as JSON, serialized at most once per version.
    pub fn json(&mut self) -> Bytes {
        self.json
            .get_or_insert_with(|| {
                // A `Value` always serializes.
                Bytes::from(serde_json::to_vec(&self.doc).unwrap_or_default())
            })
            .clone()
    }

    /// The `snapshot` frame of the current version for topic `name`, encoded at most once
    /// per version: every subscriber that needs it shares one copy.
    pub fn snapshot(&mut self, name: &str) -> Bytes {
        if let Some(frame) = &self.snapshot {
            return frame.clone();
        }
        let json = self.json();
        let frame = encode_snapshot(name, self.version.to_buf().as_str(), &json, now_ms());
        self.snapshot = Some(frame.clone());
        frame
    }

    /// Checks an `If-Match` header (when the request has one) against the current version.
    pub fn check_if_match(&self, if_match: Option<&str>) -> Result<(), PreconditionFailed> {
        match if_match {
            Some(header) if !self.version.matches_if_match(header) => Err(PreconditionFailed {
                current: self.version,
            }),
            _ => Ok(()),
        }
    }

    /// Replaces the document, if `new` is within `limits`. `Ok(None)` when `new` equals the
    /// current document: nothing changes, the version stays, nothing is to be published.
    pub fn replace(
        &mut self,
        new: Value,
        limits: &StateLimits,
    ) -> Result<Option<Change>, StateError> {
        Ok(self.prepare_replace(new, limits)?.map(|p| self.commit(p)))
    }

    /// Checks `new` against `limits` and prepares it to replace the document, changing
    /// nothing yet: the caller can take room for [`Prepared::footprint`] in a shared budget
    /// before it [commits](StateDoc::commit). `Ok(None)` when `new` equals the document.
    pub fn prepare_replace(
        &self,
        new: Value,
        limits: &StateLimits,
    ) -> Result<Option<Prepared>, StateError> {
        let shape = json::measure(&new, limits.max_depth, limits.max_footprint())?;
        if new == self.doc {
            return Ok(None);
        }
        // Measured first, so serializing (which recurses) only sees bounded depth.
        let json = Bytes::from(serde_json::to_vec(&new).unwrap_or_default());
        if json.len() > limits.max_bytes {
            return Err(JsonLimitError::TooLarge {
                limit: limits.max_bytes,
            }
            .into());
        }
        Ok(Some(Prepared { new, json, shape }))
    }

    /// Applies RFC 6902 `ops` atomically: all of them, or none (the document is unchanged on
    /// error). `Ok(None)` when the patch leaves the document equal (a lone `test`, or a
    /// `replace` with the same value).
    ///
    /// Every step is bounded, not just the result: before an operation that adds a value
    /// (`add`, `replace`, `copy`, `move`), the value is measured, and the patch is refused
    /// once the document could pass `max_depth` or its estimated memory could pass
    /// [`StateLimits::max_footprint`]. A patch of 1,000 `copy` operations of the root into
    /// itself therefore stops after a few doublings instead of building gigabytes.
    pub fn patch(
        &mut self,
        ops: &[PatchOperation],
        limits: &StateLimits,
    ) -> Result<Option<Change>, StateError> {
        Ok(self.prepare_patch(ops, limits)?.map(|p| self.commit(p)))
    }

    /// As [`StateDoc::patch`], changing nothing yet (see [`StateDoc::prepare_replace`]).
    pub fn prepare_patch(
        &self,
        ops: &[PatchOperation],
        limits: &StateLimits,
    ) -> Result<Option<Prepared>, StateError> {
        if ops.len() > limits.max_ops {
            return Err(StateError::TooManyOps {
                limit: limits.max_ops,
            });
        }
        // The old document is needed for the diff anyway, so the patch runs on a copy: an
        // error simply drops the copy, with no undo log to trust.
        let mut new = self.doc.clone();
        let mut footprint = self.footprint;
        for (index, op) in ops.iter().enumerate() {
            let (path, added) = match op {
                PatchOperation::Add(op) => (&op.path, Some(Added::Value(&op.value))),
                PatchOperation::Replace(op) => (&op.path, Some(Added::Value(&op.value))),
                PatchOperation::Copy(op) => (&op.path, Some(Added::From(&op.from))),
                PatchOperation::Move(op) => (&op.path, Some(Added::From(&op.from))),
                PatchOperation::Remove(op) => (&op.path, None),
                PatchOperation::Test(op) => (&op.path, None),
            };
            if let Some(added) = added {
                let value = match added {
                    Added::Value(v) => Some(v),
                    Added::From(from) => new.pointer(from.as_str()),
                };
                // A missing source is reported by the patch library below.
                if let Some(value) = value {
                    let room = limits.max_footprint().saturating_sub(footprint);
                    let levels = path.count();
                    let shape = json::measure(value, limits.max_depth.saturating_sub(levels), room)
                        .map_err(|e| match e {
                            JsonLimitError::TooDeep { .. } => JsonLimitError::TooDeep {
                                limit: limits.max_depth,
                            },
                            JsonLimitError::TooLarge { .. } => JsonLimitError::TooLarge {
                                limit: limits.max_bytes,
                            },
                        })?;
                    footprint += shape.footprint;
                }
            }
            json_patch::patch_unsafe(&mut new, std::slice::from_ref(op)).map_err(|e| {
                let path = e.path.to_string();
                match e.kind {
                    PatchErrorKind::TestFailed => PatchError::TestFailed { index, path },
                    kind => PatchError::Unprocessable {
                        index,
                        path,
                        reason: kind.to_string(),
                    },
                }
            })?;
        }
        self.prepare_replace(new, limits)
    }

    /// Makes a prepared document the current one: the next version, its diff computed once.
    pub fn commit(&mut self, prepared: Prepared) -> Change {
        let Prepared { new, json, shape } = prepared;
        let diff = json_patch::diff(&self.doc, &new);
        // Serializing a patch of plain JSON values cannot fail.
        let diff = Bytes::from(serde_json::to_vec(&diff).unwrap_or_default());
        let old = self.version;
        self.version = Version::new(old.epoch, old.offset + 1);
        self.footprint = footprint(shape.footprint, json.len());
        self.depth = shape.depth;
        self.doc = new;
        self.json = Some(json);
        self.snapshot = None;
        Change {
            old,
            new: self.version,
            diff,
        }
    }
}

impl StateDoc {
    /// Applies a change committed by another node: `diff` (RFC 6902, as [`StateDoc::commit`]
    /// made it there) takes the document to `version`. The writer checked the bounds; an
    /// error leaves the document unchanged, and the caller loads it afresh.
    pub fn apply_remote(&mut self, diff: &[u8], version: Version) -> Result<(), PatchError> {
        let ops = parse_patch(diff)?;
        let mut new = self.doc.clone();
        json_patch::patch(&mut new, &ops).map_err(|e| PatchError::Unprocessable {
            index: e.operation,
            path: e.path.to_string(),
            reason: e.kind.to_string(),
        })?;
        let shape = json::measure(&new, usize::MAX, usize::MAX).unwrap_or_default();
        let json = Bytes::from(serde_json::to_vec(&new).unwrap_or_default());
        self.footprint = footprint(shape.footprint, json.len());
        self.depth = shape.depth;
        self.doc = new;
        self.version = version;
        self.json = Some(json);
        self.snapshot = None;
        Ok(())
    }
}

/// A checked replacement document, not applied yet (see [`StateDoc::prepare_replace`]).
#[derive(Debug)]
pub struct Prepared {
    new: Value,
    json: Bytes,
    shape: json::Shape,
}

impl Prepared {
    /// The [`StateDoc::footprint`] the document will have once this is committed.
    pub fn footprint(&self) -> usize {
        footprint(self.shape.footprint, self.json.len())
    }
}

/// What an operation adds to the document.
enum Added<'a> {
    /// A value given in the patch.
    Value(&'a Value),
    /// A copy of (or the moved) value at this pointer in the document.
    From(&'a json_patch::jsonptr::PointerBuf),
}

/// A document's footprint: its tree plus the serialized JSON and the snapshot frame made
/// from it (each about `json_len` bytes).
fn footprint(tree: usize, json_len: usize) -> usize {
    tree + 2 * json_len
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const L: StateLimits = StateLimits {
        max_depth: 64,
        max_bytes: 1 << 20,
        max_ops: 100,
    };

    fn doc(v: Value) -> StateDoc {
        let mut d = StateDoc::new(Epoch::from_u64(5));
        d.replace(v, &L).unwrap();
        d
    }

    fn ops(v: Value) -> Vec<PatchOperation> {
        parse_patch(&serde_json::to_vec(&v).unwrap()).unwrap()
    }

    fn apply(old: &Value, diff: &[u8]) -> Value {
        let mut v = old.clone();
        json_patch::patch(&mut v, &parse_patch(diff).unwrap()).unwrap();
        v
    }

    #[test]
    fn replace_diffs_once_and_bumps_the_version() {
        let mut d = StateDoc::new(Epoch::from_u64(5));
        assert_eq!(d.doc(), &Value::Null);
        let c = d
            .replace(json!({"a": 1, "b": [1, 2]}), &L)
            .unwrap()
            .unwrap();
        assert_eq!(c.old, Version::new(Epoch::from_u64(5), 0));
        assert_eq!(c.new, Version::new(Epoch::from_u64(5), 1));
        let c = d
            .replace(json!({"a": 2, "b": [1, 2]}), &L)
            .unwrap()
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&c.diff).unwrap(),
            r#"[{"op":"replace","path":"/a","value":2}]"#
        );
        assert_eq!((c.old.offset, c.new.offset), (1, 2));
        assert_eq!(d.version().offset, 2);
    }

    #[test]
    fn a_replace_that_changes_nothing_publishes_nothing() {
        let mut d = doc(json!({"a": 1}));
        let v = d.version();
        assert_eq!(d.replace(json!({"a": 1}), &L), Ok(None));
        assert_eq!(d.version(), v);
    }

    #[test]
    fn patch_applies_atomically() {
        let mut d = doc(json!({"a": 1, "list": [1, 2, 3]}));
        let c = d
            .patch(
                &ops(json!([
                    {"op": "test", "path": "/a", "value": 1},
                    {"op": "add", "path": "/list/-", "value": 4},
                    {"op": "remove", "path": "/a"},
                ])),
                &L,
            )
            .unwrap()
            .unwrap();
        assert_eq!(d.doc(), &json!({"list": [1, 2, 3, 4]}));
        assert_eq!(
            apply(&json!({"a": 1, "list": [1, 2, 3]}), &c.diff),
            *d.doc()
        );

        let before = d.doc().clone();
        let v = d.version();
        // The first operation applies, the second fails: neither may remain.
        let err = d
            .patch(
                &ops(json!([
                    {"op": "add", "path": "/x", "value": 1},
                    {"op": "test", "path": "/list/0", "value": 9},
                ])),
                &L,
            )
            .unwrap_err();
        assert_eq!(
            err,
            StateError::Patch(PatchError::TestFailed {
                index: 1,
                path: "/list/0".into()
            })
        );
        assert_eq!((err.code(), err.http_status()), ("patch_test_failed", 409));
        assert_eq!((d.doc(), d.version()), (&before, v));

        for bad in [
            json!([{"op": "add", "path": "/x", "value": 1}, {"op": "remove", "path": "/nope"}]),
            json!([{"op": "replace", "path": "/list/9", "value": 1}]),
            json!([{"op": "move", "from": "/list", "path": "/list/0"}]),
            json!([{"op": "test", "path": "/missing", "value": 1}]),
        ] {
            let err = d.patch(&ops(bad.clone()), &L).unwrap_err();
            assert!(
                matches!(err, StateError::Patch(PatchError::Unprocessable { .. })),
                "{bad}: {err:?}"
            );
            assert_eq!(err.http_status(), 422);
            assert_eq!((d.doc(), d.version()), (&before, v));
        }
    }

    #[test]
    fn a_patch_that_changes_nothing_publishes_nothing() {
        let mut d = doc(json!({"a": 1}));
        let v = d.version();
        let same = ops(json!([
            {"op": "test", "path": "/a", "value": 1},
            {"op": "replace", "path": "/a", "value": 1},
        ]));
        assert_eq!(d.patch(&same, &L), Ok(None));
        assert_eq!(d.patch(&[], &L), Ok(None));
        assert_eq!(d.version(), v);
    }

    #[test]
    fn every_step_of_a_patch_is_bounded() {
        let limits = StateLimits {
            max_depth: 8,
            max_bytes: 4096,
            max_ops: 50,
        };
        let mut d = StateDoc::new(Epoch::from_u64(3));
        d.replace(json!({"a": {"b": 1}}), &limits).unwrap();
        // Deeper one small patch at a time: refused at the limit, however it is reached.
        let mut refused = None;
        for i in 0..20 {
            let path = format!("/a{}", "/n".repeat(i));
            let r = d.patch(
                &ops(json!([{"op": "add", "path": format!("{path}/n"), "value": {}}])),
                &limits,
            );
            if let Err(e) = r {
                refused = Some((i, e));
                break;
            }
        }
        let (at, err) = refused.expect("the depth limit is reached");
        assert!(at <= 8, "refused only at step {at}");
        assert_eq!(err, StateError::Limit(JsonLimitError::TooDeep { limit: 8 }));
        assert_eq!((err.code(), err.http_status()), ("json_too_deep", 422));
        assert!(json::measure(d.doc(), 8, usize::MAX).is_ok());

        // Copying the root into itself doubles the document each time: stopped early.
        let mut d = StateDoc::new(Epoch::from_u64(3));
        d.replace(json!({"x": "0123456789"}), &limits).unwrap();
        let doubling: Vec<_> = (0..50)
            .map(|i| json!({"op": "copy", "from": "", "path": format!("/c{i}")}))
            .collect();
        let err = d.patch(&ops(Value::Array(doubling)), &limits).unwrap_err();
        assert!(matches!(err, StateError::Limit(_)), "{err:?}");
        assert_eq!(d.doc(), &json!({"x": "0123456789"}));

        // Too many operations, and a result over max_bytes.
        let many: Vec<_> = (0..51)
            .map(|_| json!({"op": "test", "path": "", "value": null}))
            .collect();
        assert_eq!(
            d.patch(&ops(Value::Array(many)), &limits),
            Err(StateError::TooManyOps { limit: 50 })
        );
        let big = "x".repeat(5000);
        let err = d.replace(json!({ "big": big }), &limits).unwrap_err();
        assert_eq!((err.code(), err.http_status()), ("state_too_large", 413));
    }

    #[test]
    fn snapshot_is_encoded_once_per_version() {
        let mut d = doc(json!({"a": 1}));
        let s1 = d.snapshot("t:1");
        assert_eq!(d.snapshot("t:1").as_ptr(), s1.as_ptr());
        d.replace(json!({"a": 2}), &L).unwrap();
        assert_ne!(d.snapshot("t:1"), s1);
    }

    #[test]
    fn invalid_patch_bodies() {
        for body in [
            &b"{}"[..],
            b"[{\"op\":\"frob\",\"path\":\"\"}]",
            b"[{\"op\":\"add\"}]",
            b"nope",
        ] {
            let err = parse_patch(body).unwrap_err();
            assert_eq!(err.code(), "invalid_patch");
        }
    }

    #[test]
    fn floats_survive_the_wire_diff() {
        // Without serde_json's `float_roundtrip` feature this parses back as ...548: the
        // diff a client applies would not give the document the publisher sent.
        let new = json!({"x": 918.7421825381547});
        let mut d = StateDoc::new(Epoch::from_u64(1));
        let c = d.replace(new.clone(), &L).unwrap().unwrap();
        assert_eq!(apply(&Value::Null, &c.diff), new);
    }

    #[test]
    fn json_is_cached_per_version() {
        let mut d = doc(json!({"a": 1}));
        let first = d.json();
        assert_eq!(&first[..], br#"{"a":1}"#);
        assert_eq!(d.json().as_ptr(), first.as_ptr());
        d.replace(json!({"a": 2}), &L).unwrap();
        assert_eq!(&d.json()[..], br#"{"a":2}"#);
    }

    #[test]
    fn if_match() {
        let d = doc(json!({}));
        assert_eq!(d.check_if_match(None), Ok(()));
        assert_eq!(d.check_if_match(Some(&d.version().etag())), Ok(()));
        let stale = Version::new(d.version().epoch, 0).etag();
        assert_eq!(
            d.check_if_match(Some(&stale)),
            Err(PreconditionFailed {
                current: d.version()
            })
        );
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (-5i64..5).prop_map(Value::from),
            (-1.0e3f64..1.0e3).prop_map(Value::from),
            // Few distinct keys and strings, so documents share structure and diffs are
            // interesting; "" and "~/" exercise JSON Pointer escaping.
            prop::sample::select(vec!["", "a", "b", "~/", "x"]).prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec!["", "a", "b", "c", "~/", "0"]),
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(
                    m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
            ]
        })
    }

    proptest::proptest! {
        /// Applying the computed (and serialized) diff to the old document gives the new one.
        #[test]
        fn diff_applied_to_old_gives_new(old in json_value(), new in json_value()) {
            let mut d = StateDoc::restore(Version::new(Epoch::from_u64(1), 9), old.clone());
            match d.replace(new.clone(), &L).unwrap() {
                None => proptest::prop_assert_eq!(&old, &new),
                Some(c) => {
                    proptest::prop_assert_ne!(&old, &new);
                    proptest::prop_assert_eq!(apply(&old, &c.diff), new);
                    proptest::prop_assert_eq!(c.new.offset, c.old.offset + 1);
                }
            }
        }

        /// Whatever a patch does, a stored document stays within the limits, and a refused
        /// patch leaves it as it was: random patches of adds, copies and moves on random
        /// documents, with limits small enough to be hit often.
        #[test]
        fn patch_results_stay_within_the_limits(
            old in json_value(),
            steps in proptest::collection::vec(
                (0usize..4, json_value(), proptest::sample::select(vec!["", "/a", "/b", "/a/b", "/0", "/-"])),
                1..6,
            ),
        ) {
            let limits = StateLimits { max_depth: 4, max_bytes: 300, max_ops: 4 };
            let mut d = StateDoc::restore(Version::new(Epoch::from_u64(1), 1), old.clone());
            let ops: Vec<Value> = steps
                .iter()
                .map(|(kind, value, path)| match kind {
                    0 => serde_json::json!({"op": "add", "path": path, "value": value}),
                    1 => serde_json::json!({"op": "copy", "from": "", "path": path}),
                    2 => serde_json::json!({"op": "move", "from": "/a", "path": path}),
                    _ => serde_json::json!({"op": "replace", "path": path, "value": value}),
                })
                .collect();
            let ops = parse_patch(&serde_json::to_vec(&ops).unwrap()).unwrap();
            let before = (d.doc().clone(), d.version());
            match d.patch(&ops, &limits) {
                Ok(None) => proptest::prop_assert_eq!((d.doc().clone(), d.version()), before),
                Ok(Some(_)) => {
                    let shape = json::measure(d.doc(), usize::MAX, usize::MAX).unwrap();
                    proptest::prop_assert!(shape.depth <= limits.max_depth);
                    proptest::prop_assert!(serde_json::to_vec(d.doc()).unwrap().len() <= limits.max_bytes);
                }
                Err(_) => proptest::prop_assert_eq!((d.doc().clone(), d.version()), before),
            }
        }

        /// A patch either applies whole or leaves the document and version untouched.
        #[test]
        fn patches_are_atomic(old in json_value(), new in json_value(), junk in json_value()) {
            let mut d = StateDoc::restore(Version::new(Epoch::from_u64(1), 9), old.clone());
            let mut ops = json_patch::diff(&old, &new).0;
            // A trailing operation that may or may not apply.
            ops.push(PatchOperation::Test(json_patch::TestOperation {
                path: "/a".parse().unwrap(),
                value: junk,
            }));
            let mut expected = old.clone();
            match (json_patch::patch(&mut expected, &ops), d.patch(&ops, &L)) {
                (Ok(()), Ok(_)) => proptest::prop_assert_eq!(d.doc(), &expected),
                (Err(_), Err(_)) => {
                    proptest::prop_assert_eq!(d.doc(), &old);
                    proptest::prop_assert_eq!(d.version().offset, 9);
                }
                (a, b) => proptest::prop_assert!(false, "{a:?} vs {b:?}"),
            }
        }
    }
}
