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

/// Why [`validate`] refused a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Not one JSON value (RFC 8259): what was wrong, and where.
    #[error("invalid JSON at byte {at}: {what}")]
    Syntax {
        /// Offset of the first byte that does not fit.
        at: usize,
        /// What was expected there.
        what: &'static str,
    },
    /// Valid or not, nested deeper than the limit.
    #[error(transparent)]
    Limit(#[from] JsonLimitError),
}

/// Containers open at one time, tracked in a bit per level on the stack (1 = object).
struct Nesting {
    bits: [u64; 4],
    overflow: Vec<bool>,
    depth: usize,
}

impl Nesting {
    fn push(&mut self, object: bool) {
        let d = self.depth;
        if d < 256 {
            let (word, bit) = (d / 64, d % 64);
            if object {
                self.bits[word] |= 1 << bit;
            } else {
                self.bits[word] &= !(1 << bit);
            }
        } else {
            self.overflow.push(object);
        }
        self.depth += 1;
    }

    fn pop(&mut self) {
        self.depth -= 1;
        if self.depth >= 256 {
            self.overflow.pop();
        }
    }

    /// Whether the innermost open container is an object.
    fn in_object(&self) -> bool {
        let d = self.depth - 1;
        if d < 256 {
            self.bits[d / 64] & (1 << (d % 64)) != 0
        } else {
            self.overflow.last().copied().unwrap_or(false)
        }
    }
}

/// Checks that `json` is exactly one JSON value (RFC 8259: UTF-8, with whitespace around it
/// allowed) nested at most `max_depth` deep, in one pass with no recursion and no
/// allocation below 256 levels; returns the range of the value without the whitespace.
/// This is the check every publication takes, so it is written for that: a loop over the
/// bytes, strings skipped in runs.
pub fn validate(json: &[u8], max_depth: usize) -> Result<std::ops::Range<usize>, Invalid> {
    validate_syntax(json, max_depth).map_err(|e| match e {
        // Depth first, as for any text: a deep text that is also broken is refused as deep.
        Invalid::Syntax { .. } => match check_depth(json, max_depth) {
            Err(limit) => Invalid::Limit(limit),
            Ok(()) => e,
        },
        limit @ Invalid::Limit(_) => limit,
    })
}

fn validate_syntax(b: &[u8], max_depth: usize) -> Result<std::ops::Range<usize>, Invalid> {
    let err = |at: usize, what: &'static str| Err(Invalid::Syntax { at, what });
    let mut nest = Nesting {
        bits: [0; 4],
        overflow: Vec::new(),
        depth: 0,
    };
    let mut i = skip_ws(b, 0);
    let start = i;
    'value: loop {
        // A value is expected at `i`.
        match b.get(i) {
            Some(b'{') => {
                if nest.depth >= max_depth {
                    return Err(JsonLimitError::TooDeep { limit: max_depth }.into());
                }
                nest.push(true);
                i = skip_ws(b, i + 1);
                if b.get(i) == Some(&b'}') {
                    nest.pop();
                    i += 1;
                } else {
                    i = member_key(b, i)?;
                    continue 'value;
                }
            }
            Some(b'[') => {
                if nest.depth >= max_depth {
                    return Err(JsonLimitError::TooDeep { limit: max_depth }.into());
                }
                nest.push(false);
                i = skip_ws(b, i + 1);
                if b.get(i) == Some(&b']') {
                    nest.pop();
                    i += 1;
                } else {
                    continue 'value;
                }
            }
            Some(b'"') => i = string(b, i)?,
            Some(b't') => i = literal(b, i, b"true")?,
            Some(b'f') => i = literal(b, i, b"false")?,
            Some(b'n') => i = literal(b, i, b"null")?,
            Some(b'-' | b'0'..=b'9') => i = number(b, i)?,
            _ => return err(i, "expected a value"),
        }
        // After a value: close what ends here, until the next value or the end.
        loop {
            if nest.depth == 0 {
                let end = i;
                if skip_ws(b, i) != b.len() {
                    return err(skip_ws(b, i), "expected the end after one value");
                }
                return Ok(start..end);
            }
            i = skip_ws(b, i);
            let object = nest.in_object();
            match b.get(i) {
                Some(b',') => {
                    i = skip_ws(b, i + 1);
                    if object {
                        i = member_key(b, i)?;
                    }
                    continue 'value;
                }
                Some(b'}') if object => {
                    nest.pop();
                    i += 1;
                }
                Some(b']') if !object => {
                    nest.pop();
                    i += 1;
                }
                _ if object => return err(i, "expected ',' or '}'"),
                _ => return err(i, "expected ',' or ']'"),
            }
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// A member's key and its `:` at `i`; returns where its value starts.
fn member_key(b: &[u8], i: usize) -> Result<usize, Invalid> {
    if b.get(i) != Some(&b'"') {
        return Err(Invalid::Syntax {
            at: i,
            what: "expected a string key",
        });
    }
    let i = skip_ws(b, string(b, i)?);
    if b.get(i) != Some(&b':') {
        return Err(Invalid::Syntax {
            at: i,
            what: "expected ':'",
        });
    }
    Ok(skip_ws(b, i + 1))
}

/// The string starting with the quote at `i`; returns the offset after its closing quote.
/// Checks escapes, control characters and UTF-8 (JSON text outside strings is ASCII, so
/// this is where the text's UTF-8 is checked).
fn string(b: &[u8], mut i: usize) -> Result<usize, Invalid> {
    i += 1;
    loop {
        // Most bytes of most strings need no look beyond this.
        while let Some(&c) = b.get(i) {
            if c == b'"' || c == b'\\' || !(0x20..0x80).contains(&c) {
                break;
            }
            i += 1;
        }
        match b.get(i) {
            Some(b'"') => return Ok(i + 1),
            Some(&c) if c >= 0x80 => i += utf8_char(b, i)?,
            Some(b'\\') => match b.get(i + 1) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                // Any four hex digits, as the grammar says: a lone surrogate passes, as
                // it does in serde_json and in browsers' `JSON.parse`.
                Some(b'u') => {
                    hex4(b, i + 2)?;
                    i += 6;
                }
                _ => {
                    return Err(Invalid::Syntax {
                        at: i,
                        what: "an invalid escape",
                    });
                }
            },
            Some(_) => {
                return Err(Invalid::Syntax {
                    at: i,
                    what: "a control character in a string",
                });
            }
            None => {
                return Err(Invalid::Syntax {
                    at: i,
                    what: "an unterminated string",
                });
            }
        }
    }
}

/// The length of the UTF-8 character starting at `i` (a byte of 0x80 or above), if it is
/// one: the standard library's check, on just that character.
fn utf8_char(b: &[u8], i: usize) -> Result<usize, Invalid> {
    let len = match b[i] {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 0,
    };
    match b.get(i..i + len) {
        Some(char) if len > 0 && std::str::from_utf8(char).is_ok() => Ok(len),
        _ => Err(Invalid::Syntax {
            at: i,
            what: "not UTF-8",
        }),
    }
}

fn hex4(b: &[u8], i: usize) -> Result<(), Invalid> {
    for k in 0..4 {
        if !b.get(i + k).is_some_and(u8::is_ascii_hexdigit) {
            return Err(Invalid::Syntax {
                at: i + k,
                what: "expected 4 hex digits in a \\u escape",
            });
        }
    }
    Ok(())
}

fn literal(b: &[u8], i: usize, word: &'static [u8]) -> Result<usize, Invalid> {
    if b.get(i..i + word.len()) == Some(word) {
        Ok(i + word.len())
    } else {
        Err(Invalid::Syntax {
            at: i,
            what: "expected a value",
        })
    }
}

/// `-? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?` at `i`; returns where it ends.
fn number(b: &[u8], mut i: usize) -> Result<usize, Invalid> {
    let digits = |b: &[u8], mut i: usize| -> Result<usize, Invalid> {
        let from = i;
        while let Some(b'0'..=b'9') = b.get(i) {
            i += 1;
        }
        if i == from {
            return Err(Invalid::Syntax {
                at: i,
                what: "expected a digit",
            });
        }
        Ok(i)
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits(b, i)?,
        _ => {
            return Err(Invalid::Syntax {
                at: i,
                what: "expected a digit",
            });
        }
    }
    if b.get(i) == Some(&b'.') {
        i = digits(b, i + 1)?;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        i = digits(b, i)?;
    }
    Ok(i)
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

    /// serde_json's own answer: one value (as `RawValue`), and where it is.
    fn oracle(text: &[u8], limit: usize) -> Option<std::ops::Range<usize>> {
        check_depth(text, limit).ok()?;
        let raw: &serde_json::value::RawValue = serde_json::from_slice(text).ok()?;
        let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
        Some(start..start + raw.get().len())
    }

    #[test]
    fn validation_follows_rfc_8259() {
        for ok in [
            &b"1"[..],
            b" \t\r\n{\"a\" : [1, -0.5e+10, true, false, null, \"\\u00e9\\ud83d\\ude00\\n\"]} \n",
            b"\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"",
            b"[]",
            b"{}",
            b"[[],{}]",
            b"-0",
            b"0.0e0",
            b"1E-2",
            b"\"\\ud800\"",
            b"\"\\udc00x\"",
        ] {
            assert_eq!(
                validate(ok, 64).ok(),
                oracle(ok, 64),
                "{}",
                String::from_utf8_lossy(ok)
            );
            assert!(validate(ok, 64).is_ok(), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b""[..],
            b" ",
            b"01",
            b"1.",
            b".1",
            b"1e",
            b"+1",
            b"-",
            b"[1,]",
            b"{\"a\":1,}",
            b"{\"a\"}",
            b"{1:2}",
            b"[1 2]",
            b"1 2",
            b"\"\\x\"",
            b"\"\\u12\"",
            b"\"a\nb\"",
            b"\"unterminated",
            b"tru",
            b"nul",
            b"[",
            b"{\"a\":",
            b"\"\xff\"",
            b"\xef\xbb\xbf1",
            b"\"\xc3\"",
            b"\"\xc0\xaf\"",
            b"\"\xed\xa0\x80\"",
            b"\"\xf4\x90\x80\x80\"",
        ] {
            assert!(
                validate(bad, 64).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
            assert_eq!(
                oracle(bad, 64),
                None,
                "serde agrees: {}",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert_eq!(
            validate(deep.as_bytes(), 64),
            Err(Invalid::Limit(JsonLimitError::TooDeep { limit: 64 }))
        );
        assert!(validate(deep.as_bytes(), 100).is_ok());
        let broken_and_deep = "[1,,".to_string() + &"[".repeat(100);
        assert_eq!(
            validate(broken_and_deep.as_bytes(), 64),
            Err(Invalid::Limit(JsonLimitError::TooDeep { limit: 64 })),
            "depth is reported first, as before"
        );
        let very_deep = "[".repeat(300) + &"]".repeat(300);
        assert!(
            validate(very_deep.as_bytes(), 1000).is_ok(),
            "past the bit stack"
        );
    }

    /// JSON-like text: values, and values with one byte changed, dropped or added.
    fn json_text() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let pieces = prop::sample::select(vec![
            "{", "}", "[", "]", ",", ":", " ", "\"", "\\", "\\u", "d83d", "\\ude00", "e", "E", "-",
            "+", ".", "0", "1", "9", "true", "false", "null", "tru", "\"a\"", "\n", "\u{e9}",
        ]);
        prop_oneof![
            json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            prop::collection::vec(pieces, 0..24).prop_map(|p| p.concat().into_bytes()),
            (json_value(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(v, at, byte)| {
                let mut text = serde_json::to_vec(&v).unwrap();
                let i = at.index(text.len());
                text[i] = byte;
                text
            }),
            (json_value(), any::<prop::sample::Index>()).prop_map(|(v, at)| {
                let mut text = serde_json::to_vec(&v).unwrap();
                let i = at.index(text.len());
                text.remove(i);
                text
            }),
        ]
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

        /// The hand-written validator answers as serde_json does, range included.
        #[test]
        fn validation_agrees_with_serde_json(text in json_text(), limit in 0usize..14) {
            proptest::prop_assert_eq!(
                validate(&text, limit).ok(),
                oracle(&text, limit),
                "{}",
                String::from_utf8_lossy(&text)
            );
        }
    }
}
