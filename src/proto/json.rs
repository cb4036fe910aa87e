//! Bounds on JSON a peer sends, checked without recursion.
//!
//! serde_json stops at 128 levels when it builds a `Value`, but not when it only validates
//! (`RawValue`), so a publication nested hundreds of thousands deep would be accepted and
//! forwarded to every subscriber, whose own parsers may then fail or overflow. And a state
//! document can grow deeper one PATCH at a time, each well under any parser's limit, until
//! cloning, diffing, serializing or dropping it overflows the stack. These functions measure
//! depth and size with loops over an explicit stack, so they hold at any input.

use serde_json::Value;

/// Why a JSON value was refused by a bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JsonLimitError {
    /// Arrays and objects are nested deeper than the limit.
    #[error("JSON nested deeper than {limit} levels")]
    TooDeep {
        /// The configured limit (`max_json_depth`).
        limit: usize,
    },
    /// The value is larger than the limit.
    #[error("JSON larger than {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
}

/// The deepest nesting of arrays and objects in `json` (0 for a scalar), counting brackets
/// outside strings. Stops counting once past `limit` and returns `limit + 1`. The text need
/// not be valid JSON: this only measures; parsing validates.
pub fn depth(json: &[u8], limit: usize) -> usize {
    let mut depth = 0usize;
    let mut deepest = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > deepest {
                    deepest = depth;
                    if deepest > limit {
                        return limit + 1;
                    }
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Checks that `json` nests at most `limit` levels deep.
pub fn check_depth(json: &[u8], limit: usize) -> Result<(), JsonLimitError> {
    if depth(json, limit) > limit {
        return Err(JsonLimitError::TooDeep { limit });
    }
    Ok(())
}

/// What [`measure`] found of a parsed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shape {
    /// Deepest nesting of arrays and objects (0 for a scalar).
    pub depth: usize,
    /// Estimated bytes the value takes in memory: one `Value` per node, plus string and key
    /// bytes, plus a map entry's overhead per object member.
    pub footprint: usize,
}

/// Bytes a `serde_json::Value` node takes, wherever it is stored.
const VALUE_BYTES: usize = std::mem::size_of::<Value>();

/// Estimated overhead of one object member beyond its value: the key's `String` header and
/// the map's share of node and pointer space (a B-tree node holds up to 11 entries).
const MEMBER_OVERHEAD: usize = std::mem::size_of::<String>() + 24;

/// Measures `value`'s depth and footprint, giving up as soon as the depth passes
/// `max_depth` or the footprint passes `max_footprint` (the caller refuses the value then).
/// Runs on an explicit stack: it never recurses.
pub fn measure(
    value: &Value,
    max_depth: usize,
    max_footprint: usize,
) -> Result<Shape, JsonLimitError> {
    let mut shape = Shape::default();
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((value, level)) = stack.pop() {
        shape.footprint += VALUE_BYTES;
        match value {
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
            Value::String(s) => shape.footprint += s.len(),
            Value::Array(items) => {
                let level = level + 1;
                shape.depth = shape.depth.max(level);
                for item in items {
                    stack.push((item, level));
                }
            }
            Value::Object(members) => {
                let level = level + 1;
                shape.depth = shape.depth.max(level);
                for (key, item) in members {
                    shape.footprint += key.len() + MEMBER_OVERHEAD;
                    stack.push((item, level));
                }
            }
        }
        if shape.depth > max_depth {
            return Err(JsonLimitError::TooDeep { limit: max_depth });
        }
        if shape.footprint > max_footprint {
            return Err(JsonLimitError::TooLarge {
                limit: max_footprint,
            });
        }
    }
    Ok(shape)
}

/// Drops `value` without recursing: its children are moved onto a heap stack first. A
/// value parsed or built within the bounds never needs this, but stored documents are
/// dropped this way so that no depth can overflow the stack.
pub fn drop_iteratively(value: Value) {
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            Value::Array(items) => stack.extend(items),
            Value::Object(members) => stack.extend(members.into_iter().map(|(_, v)| v)),
            Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depth_counts_brackets_outside_strings() {
        assert_eq!(depth(b"1", 10), 0);
        assert_eq!(depth(b"[]", 10), 1);
        assert_eq!(depth(br#"{"a":[1,{"b":[]}]}"#, 10), 4);
        assert_eq!(depth(br#"["[[[[", "\"[[["]"#, 10), 1);
        assert_eq!(depth(br#"[["\\"],[[]]]"#, 10), 3);
        let deep = "[".repeat(500_000);
        assert_eq!(depth(deep.as_bytes(), 64), 65);
        assert_eq!(
            check_depth(deep.as_bytes(), 64),
            Err(JsonLimitError::TooDeep { limit: 64 })
        );
        assert_eq!(check_depth(b"[[1]]", 2), Ok(()));
    }

    #[test]
    fn measure_bounds_depth_and_footprint() {
        let v = json!({"a": [1, 2, {"b": "xyz"}]});
        let shape = measure(&v, 10, usize::MAX).unwrap();
        assert_eq!(shape.depth, 3);
        assert!(shape.footprint > 5 * VALUE_BYTES, "{shape:?}");
        assert_eq!(
            measure(&v, 2, usize::MAX),
            Err(JsonLimitError::TooDeep { limit: 2 })
        );
        assert_eq!(
            measure(&v, 10, 64),
            Err(JsonLimitError::TooLarge { limit: 64 })
        );
        assert_eq!(measure(&json!(null), 0, usize::MAX).unwrap().depth, 0);
    }

    #[test]
    fn deep_values_are_measured_and_dropped_without_recursion() {
        // Built by hand: serde_json's parser would stop at 128 levels.
        let mut v = Value::Null;
        for _ in 0..1_000_000 {
            v = Value::Array(vec![v]);
        }
        assert_eq!(
            measure(&v, 64, usize::MAX),
            Err(JsonLimitError::TooDeep { limit: 64 })
        );
        drop_iteratively(v);
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (-5i64..5).prop_map(Value::from),
            // Brackets and escapes inside strings must not count as nesting.
            prop::sample::select(vec!["", "[", "]{", "\\\"[", "x"]).prop_map(Value::from),
        ];
        leaf.prop_recursive(12, 64, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-c{]{0,2}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// The text scanner and the tree walk agree on every value's depth, and a limit
        /// below it is reported by both.
        #[test]
        fn text_and_tree_depths_agree(v in json_value(), limit in 0usize..14) {
            let text = serde_json::to_vec(&v).unwrap();
            let tree = measure(&v, usize::MAX, usize::MAX).unwrap().depth;
            proptest::prop_assert_eq!(depth(&text, usize::MAX), tree);
            proptest::prop_assert_eq!(check_depth(&text, limit).is_ok(), tree <= limit);
            proptest::prop_assert_eq!(measure(&v, limit, usize::MAX).is_ok(), tree <= limit);
        }
    }
}
