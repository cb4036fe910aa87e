//! Subscription filters on the top-level fields of event data.
//!
//! `{"status": ["running", "failed"], "workflow_id": ["w1"]}` matches an event whose data is
//! an object with `status` equal to one of the listed values *and* `workflow_id` equal to
//! `"w1"`. Values are JSON scalars compared as JSON (so `1` equals `1.0` and `"1"` does not).
//! A filter decides only whether a subscriber gets the shared frame; it never re-encodes.

use serde_json::Value;
use serde_json::value::RawValue;

/// Most fields one filter may name: bounds the work per event per filtered subscriber.
pub const MAX_FILTER_FIELDS: usize = 16;

/// Most values one field may list, for the same reason.
pub const MAX_FILTER_VALUES: usize = 64;

/// Most memory one filter may take (its names and values as stored, estimated like a state
/// document): a connection holds a filter per `subscribe` request, so this bounds what its
/// filters can hold, whatever its messages carry. `{"status": ["running", "failed"]}` takes
/// about 300 bytes.
pub const MAX_FILTER_FOOTPRINT: usize = 1024;

/// Why a filter was refused; sent as an `error` message or an HTTP 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// Not a JSON object of field names to arrays.
    #[error("invalid filter: expected an object like {{\"field\": [\"value\", ...]}}")]
    NotAnObject,
    /// A field's value is not a non-empty array of JSON scalars.
    #[error(
        "invalid filter: field {0:?} must be a non-empty array of strings, numbers, booleans or null"
    )]
    BadValues(String),
    /// More than [`MAX_FILTER_FIELDS`] fields, more than [`MAX_FILTER_VALUES`] values in a
    /// field, or more than [`MAX_FILTER_FOOTPRINT`] bytes in all.
    #[error(
        "invalid filter: at most {MAX_FILTER_FIELDS} fields of at most {MAX_FILTER_VALUES} values, {MAX_FILTER_FOOTPRINT} bytes in all"
    )]
    TooLarge,
}

impl FilterError {
    /// The stable error code sent to the client.
    pub fn code(&self) -> &'static str {
        match self {
            FilterError::NotAnObject | FilterError::BadValues(_) | FilterError::TooLarge => {
                "invalid_filter"
            }
        }
    }
}

/// A conjunction of "field is one of these values" clauses.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Filter {
    /// Field name and its accepted values (all scalars), sorted by name.
    clauses: Vec<(Box<str>, Vec<Value>)>,
}

impl Filter {
    /// Parses a filter from the JSON value a `subscribe` request carries.
    pub fn from_value(value: &Value) -> Result<Filter, FilterError> {
        let Value::Object(fields) = value else {
            return Err(FilterError::NotAnObject);
        };
        if fields.len() > MAX_FILTER_FIELDS {
            return Err(FilterError::TooLarge);
        }
        if crate::proto::json::measure(value, usize::MAX, MAX_FILTER_FOOTPRINT).is_err() {
            return Err(FilterError::TooLarge);
        }
        let mut clauses: Vec<(Box<str>, Vec<Value>)> = Vec::with_capacity(fields.len());
        for (name, values) in fields {
            let Value::Array(values) = values else {
                return Err(FilterError::BadValues(name.clone()));
            };
            if values.is_empty() || !values.iter().all(is_scalar) {
                return Err(FilterError::BadValues(name.clone()));
            }
            if values.len() > MAX_FILTER_VALUES {
                return Err(FilterError::TooLarge);
            }
            clauses.push((name.as_str().into(), values.clone()));
        }
        clauses.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Filter { clauses })
    }

    /// Parses a filter from JSON text (a query parameter or a request body).
    pub fn parse(json: &[u8]) -> Result<Filter, FilterError> {
        let value: Value = serde_json::from_slice(json).map_err(|_| FilterError::NotAnObject)?;
        Filter::from_value(&value)
    }

    /// Whether the filter has no clauses (matches everything).
    pub fn is_empty(&self) -> bool {
        self.clauses.is_empty()
    }

    /// Whether event `data` matches: every clause's field is present at the top level of an
    /// object and equals one of its values.
    pub fn matches(&self, data: &Value) -> bool {
        if self.is_empty() {
            return true;
        }
        let Value::Object(obj) = data else {
            return false;
        };
        self.clauses.iter().all(|(name, accepted)| {
            obj.get(&**name)
                .is_some_and(|v| accepted.iter().any(|a| scalar_eq(a, v)))
        })
    }

    /// As [`Filter::matches`] on fields extracted once per publication.
    pub fn matches_fields(&self, fields: &EventFields) -> bool {
        self.clauses.iter().all(|(name, accepted)| {
            fields
                .get(name)
                .is_some_and(|v| accepted.iter().any(|a| scalar_eq(a, v)))
        })
    }

    /// As [`Filter::matches`] on raw JSON; parses only the top level of `data`. Prefer
    /// [`EventFields`] (or `history::Entry::fields`) when several filters see one event.
    pub fn matches_raw(&self, data: &[u8]) -> bool {
        self.is_empty() || self.matches_fields(&EventFields::parse(data))
    }
}

/// The top-level scalar fields of one event's data, extracted once and tested by every
/// filtered subscriber. Nested objects and arrays are skipped unparsed (a filter never
/// matches them), so extraction costs one pass over the top level.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFields {
    /// Sorted by name; a repeated key keeps its last value, as `serde_json` does.
    fields: Vec<(Box<str>, Value)>,
}

impl EventFields {
    /// Extracts the top-level scalar fields of `data`; anything but a JSON object has none.
    pub fn parse(data: &[u8]) -> EventFields {
        let Ok(top) = serde_json::from_slice::<std::collections::BTreeMap<String, &RawValue>>(data)
        else {
            return EventFields::default();
        };
        let fields = top
            .into_iter()
            .filter(|(_, raw)| !raw.get().starts_with(['{', '[']))
            .filter_map(|(name, raw)| {
                serde_json::from_str::<Value>(raw.get())
                    .ok()
                    .map(|v| (name.into_boxed_str(), v))
            })
            .collect();
        EventFields { fields }
    }

    /// The scalar value of top-level field `name`, if the data had one.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|i| &self.fields[i].1)
    }
}

fn is_scalar(v: &Value) -> bool {
    !matches!(v, Value::Array(_) | Value::Object(_))
}

/// JSON equality of scalars: numbers by value (`1 == 1.0`), everything else as serde_json.
fn scalar_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
                x == y
            } else if let (Some(x), Some(y)) = (x.as_u64(), y.as_u64()) {
                x == y
            } else {
                x.as_f64() == y.as_f64()
            }
        }
        (Value::Array(_) | Value::Object(_), _) | (_, Value::Array(_) | Value::Object(_)) => false,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(v: Value) -> Filter {
        Filter::from_value(&v).unwrap()
    }

    #[test]
    fn seed_004_example() {
        let f = filter(json!({"status": ["running", "failed"], "workflow_id": ["w1"]}));
        let yes = json!({"status": "failed", "workflow_id": "w1", "node": {"x": 1}});
        let wrong_status = json!({"status": "done", "workflow_id": "w1"});
        let missing = json!({"status": "running"});
        for (data, want) in [(yes, true), (wrong_status, false), (missing, false)] {
            let raw = serde_json::to_vec(&data).unwrap();
            assert_eq!(f.matches(&data), want, "{data}");
            assert_eq!(f.matches_raw(&raw), want, "{data}");
            assert_eq!(f.matches_fields(&EventFields::parse(&raw)), want, "{data}");
        }
    }

    #[test]
    fn scalars_compare_as_json() {
        let f = filter(json!({"n": [1], "b": [true], "z": [null]}));
        assert!(f.matches_raw(br#"{"n": 1.0, "b": true, "z": null}"#));
        assert!(!f.matches_raw(br#"{"n": "1", "b": true, "z": null}"#));
        assert!(!f.matches_raw(br#"{"n": 1, "b": 1, "z": null}"#));
        assert!(!f.matches_raw(br#"{"n": [1], "b": true, "z": null}"#));
        let big = filter(json!({"id": [u64::MAX]}));
        assert!(big.matches_raw(format!(r#"{{"id": {}}}"#, u64::MAX).as_bytes()));
        assert!(!big.matches_raw(format!(r#"{{"id": {}}}"#, u64::MAX - 1).as_bytes()));
        let neg = filter(json!({"d": [-3]}));
        assert!(neg.matches_raw(br#"{"d": -3.0}"#));
    }

    #[test]
    fn non_objects_and_empty_filters() {
        let f = filter(json!({"status": ["x"]}));
        for data in [&b"[1]"[..], b"\"x\"", b"null", b"not json", b""] {
            assert!(!f.matches_raw(data));
        }
        let empty = filter(json!({}));
        assert!(empty.is_empty());
        assert!(empty.matches_raw(b"[1]") && empty.matches(&json!(3)));
    }

    #[test]
    fn escaped_keys_are_decoded() {
        let f = filter(json!({"a\"b": ["é"]}));
        assert!(f.matches_raw(br#"{"a\"b": "\u00e9"}"#));
    }

    #[test]
    fn refused_filters() {
        let cases = [
            (json!([]), FilterError::NotAnObject),
            (json!({"s": "x"}), FilterError::BadValues("s".into())),
            (json!({"s": []}), FilterError::BadValues("s".into())),
            (json!({"s": [{"a": 1}]}), FilterError::BadValues("s".into())),
            (json!({"s": [[1]]}), FilterError::BadValues("s".into())),
            (json!({"s": vec![1; 65]}), FilterError::TooLarge),
            (json!({"s": ["x".repeat(3000)]}), FilterError::TooLarge),
        ];
        for (v, want) in cases {
            assert_eq!(Filter::from_value(&v), Err(want.clone()), "{v}");
            assert_eq!(want.code(), "invalid_filter");
        }
        let many: serde_json::Map<String, Value> =
            (0..17).map(|i| (format!("f{i}"), json!([1]))).collect();
        assert_eq!(
            Filter::from_value(&Value::Object(many)),
            Err(FilterError::TooLarge)
        );
        assert_eq!(Filter::parse(b"{"), Err(FilterError::NotAnObject));
        assert!(Filter::parse(br#"{"a":[1]}"#).is_ok());
    }

    proptest::proptest! {
        /// Matching on extracted fields agrees with matching on the parsed value.
        #[test]
        fn extraction_agrees_with_values(
            status in proptest::prop_oneof![
                proptest::strategy::Just(json!("a")),
                proptest::strategy::Just(json!(1)),
                proptest::strategy::Just(json!(1.5)),
                proptest::strategy::Just(json!(null)),
                proptest::strategy::Just(json!({"a": 1})),
            ],
            present in proptest::prelude::any::<bool>(),
        ) {
            let f = filter(json!({"status": ["a", 1, null]}));
            let data = if present { json!({"status": status, "x": [1]}) } else { json!({"x": 1}) };
            let raw = serde_json::to_vec(&data).unwrap();
            proptest::prop_assert_eq!(f.matches(&data), f.matches_raw(&raw));
        }
    }
}
