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

/// A topic's JSON document and the version it is at.
#[derive(Debug)]
pub struct StateDoc {
    doc: Value,
    version: Version,
    /// The document serialized, made on first demand after each change and shared by every
    /// snapshot and `GET` until the next change.
    json: Option<Bytes>,
}

impl StateDoc {
    /// A new document topic of `epoch` at offset 0, holding `null` until the first PUT.
    pub fn new(epoch: Epoch) -> StateDoc {
        StateDoc::restore(Version::new(epoch, 0), Value::Null)
    }

    /// A document known to be at `version` (restored from shared storage).
    pub fn restore(version: Version, doc: Value) -> StateDoc {
        StateDoc {
            doc,
            version,
            json: None,
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

    /// The current document as JSON, serialized at most once per version.
    pub fn json(&mut self) -> Bytes {
        self.json
            .get_or_insert_with(|| {
                // A `Value` always serializes.
                Bytes::from(serde_json::to_vec(&self.doc).unwrap_or_default())
            })
            .clone()
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

    /// Replaces the document. `None` when `new` equals the current document: nothing
    /// changes, the version stays, and nothing is to be published.
    pub fn replace(&mut self, new: Value) -> Option<Change> {
        if new == self.doc {
            return None;
        }
        Some(self.commit(new))
    }

    /// Applies RFC 6902 `ops` atomically: all of them, or none (the document is unchanged on
    /// error). `Ok(None)` when the patch leaves the document equal (a lone `test`, or a
    /// `replace` with the same value).
    pub fn patch(&mut self, ops: &[PatchOperation]) -> Result<Option<Change>, PatchError> {
        // The old document is needed for the diff anyway, so the patch runs on a copy: an
        // error simply drops the copy, with no undo log to trust.
        let mut new = self.doc.clone();
        json_patch::patch_unsafe(&mut new, ops).map_err(|e| {
            let path = e.path.to_string();
            match e.kind {
                PatchErrorKind::TestFailed => PatchError::TestFailed {
                    index: e.operation,
                    path,
                },
                kind => PatchError::Unprocessable {
                    index: e.operation,
                    path,
                    reason: kind.to_string(),
                },
            }
        })?;
        Ok(self.replace(new))
    }

    fn commit(&mut self, new: Value) -> Change {
        let diff = json_patch::diff(&self.doc, &new);
        // Serializing a patch of plain JSON values cannot fail.
        let diff = Bytes::from(serde_json::to_vec(&diff).unwrap_or_default());
        let old = self.version;
        self.version = Version::new(old.epoch, old.offset + 1);
        self.doc = new;
        self.json = None;
        Change {
            old,
            new: self.version,
            diff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(v: Value) -> StateDoc {
        let mut d = StateDoc::new(Epoch::from_u64(5));
        d.replace(v);
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
        let c = d.replace(json!({"a": 1, "b": [1, 2]})).unwrap();
        assert_eq!(c.old, Version::new(Epoch::from_u64(5), 0));
        assert_eq!(c.new, Version::new(Epoch::from_u64(5), 1));
        let c = d.replace(json!({"a": 2, "b": [1, 2]})).unwrap();
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
        assert_eq!(d.replace(json!({"a": 1})), None);
        assert_eq!(d.version(), v);
    }

    #[test]
    fn patch_applies_atomically() {
        let mut d = doc(json!({"a": 1, "list": [1, 2, 3]}));
        let c = d
            .patch(&ops(json!([
                {"op": "test", "path": "/a", "value": 1},
                {"op": "add", "path": "/list/-", "value": 4},
                {"op": "remove", "path": "/a"},
            ])))
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
            .patch(&ops(json!([
                {"op": "add", "path": "/x", "value": 1},
                {"op": "test", "path": "/list/0", "value": 9},
            ])))
            .unwrap_err();
        assert_eq!(
            err,
            PatchError::TestFailed {
                index: 1,
                path: "/list/0".into()
            }
        );
        assert_eq!((err.code(), err.http_status()), ("patch_test_failed", 409));
        assert_eq!((d.doc(), d.version()), (&before, v));

        for bad in [
            json!([{"op": "add", "path": "/x", "value": 1}, {"op": "remove", "path": "/nope"}]),
            json!([{"op": "replace", "path": "/list/9", "value": 1}]),
            json!([{"op": "move", "from": "/list", "path": "/list/0"}]),
            json!([{"op": "test", "path": "/missing", "value": 1}]),
        ] {
            let err = d.patch(&ops(bad.clone())).unwrap_err();
            assert!(
                matches!(err, PatchError::Unprocessable { .. }),
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
        assert_eq!(d.patch(&same), Ok(None));
        assert_eq!(d.patch(&[]), Ok(None));
        assert_eq!(d.version(), v);
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
        let c = d.replace(new.clone()).unwrap();
        assert_eq!(apply(&Value::Null, &c.diff), new);
    }

    #[test]
    fn json_is_cached_per_version() {
        let mut d = doc(json!({"a": 1}));
        let first = d.json();
        assert_eq!(&first[..], br#"{"a":1}"#);
        assert_eq!(d.json().as_ptr(), first.as_ptr());
        d.replace(json!({"a": 2}));
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
            match d.replace(new.clone()) {
                None => proptest::prop_assert_eq!(&old, &new),
                Some(c) => {
                    proptest::prop_assert_ne!(&old, &new);
                    proptest::prop_assert_eq!(apply(&old, &c.diff), new);
                    proptest::prop_assert_eq!(c.new.offset, c.old.offset + 1);
                }
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
            match (json_patch::patch(&mut expected, &ops), d.patch(&ops)) {
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
