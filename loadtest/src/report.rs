//! Scenario results as named metrics, printed as a table (one column per target) or as
//! JSON (`--json`).

use serde_json::{Map, Value, json};

/// One reported figure.
#[derive(Debug, Clone)]
pub struct Metric {
    /// JSON key.
    pub key: &'static str,
    /// Table label.
    pub label: &'static str,
    /// The value (`null` when it could not be measured, e.g. no `--pid`).
    pub value: Value,
}

/// A target's metrics for one scenario, in display order.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// The target's label.
    pub target: String,
    /// Its metrics.
    pub metrics: Vec<Metric>,
}

impl Row {
    /// An empty row for `target`.
    pub fn new(target: &str) -> Row {
        Row {
            target: target.to_string(),
            metrics: Vec::new(),
        }
    }

    /// Appends a metric.
    pub fn add(&mut self, key: &'static str, label: &'static str, value: impl Into<Value>) {
        self.metrics.push(Metric {
            key,
            label,
            value: value.into(),
        });
    }

    /// Appends a metric that may be unknown.
    pub fn opt<T: Into<Value>>(
        &mut self,
        key: &'static str,
        label: &'static str,
        value: Option<T>,
    ) {
        self.add(key, label, value.map_or(Value::Null, Into::into));
    }
}

/// Rounds to `digits` decimals for display and JSON alike.
pub fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// `key: count, ...` for a table cell, leaving out the keys in `skip`; `none` if nothing
/// is left.
pub fn listing(map: &std::collections::BTreeMap<String, u64>, skip: &[&str]) -> String {
    let items: Vec<String> = map
        .iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// Bytes to MiB, two decimals.
pub fn mib(bytes: u64) -> f64 {
    round(bytes as f64 / (1024.0 * 1024.0), 2)
}

/// The scenario's JSON document.
pub fn to_json(scenario: &str, params: Value, rows: &[Row]) -> Value {
    let results: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut m = Map::new();
            m.insert("target".into(), json!(r.target));
            for metric in &r.metrics {
                m.insert(metric.key.into(), metric.value.clone());
            }
            Value::Object(m)
        })
        .collect();
    json!({ "scenario": scenario, "params": params, "results": results })
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => u.to_string(),
            (_, Some(i), _) => i.to_string(),
            (_, _, Some(f)) if f.abs() >= 100.0 => format!("{f:.0}"),
            (_, _, Some(f)) => format!("{f:.2}"),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        // One value per node (or per part): `a / b / c`.
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(" / "),
        other => other.to_string(),
    }
}

/// A plain-text table: metrics down, targets across.
pub fn to_table(title: &str, rows: &[Row]) -> String {
    let Some(first) = rows.first() else {
        return format!("{title}: no results\n");
    };
    let mut grid: Vec<Vec<String>> = vec![
        std::iter::once(String::new())
            .chain(rows.iter().map(|r| r.target.clone()))
            .collect(),
    ];
    for (i, m) in first.metrics.iter().enumerate() {
        let mut line = vec![m.label.to_string()];
        for r in rows {
            line.push(
                r.metrics
                    .get(i)
                    .map_or_else(|| "-".into(), |m| cell(&m.value)),
            );
        }
        grid.push(line);
    }
    let cols = grid[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| grid.iter().map(|l| l[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = format!("{title}\n");
    for (n, line) in grid.iter().enumerate() {
        for (c, text) in line.iter().enumerate() {
            if c == 0 {
                out.push_str(&format!("{text:<w$}", w = widths[c]));
            } else {
                out.push_str(&format!("  {text:>w$}", w = widths[c]));
            }
        }
        out.push('\n');
        if n == 0 {
            out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (cols - 1)));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_targets() {
        let mut a = Row::new("floor");
        a.add("p99_ms", "p99 ms", 12.345);
        a.opt::<u64>("rss", "rss MiB", None);
        let mut b = Row::new("tidings");
        b.add("p99_ms", "p99 ms", 13.0);
        b.add("rss", "rss MiB", 7u64);
        let t = to_table("fanout", &[a.clone(), b]);
        assert!(t.contains("p99 ms   12.35    13.00"), "{t}");
        assert!(t.contains("rss MiB      -        7"), "{t}");
        let mut c = Row::new("3 nodes");
        c.add("p99_ms", "p99 ms", json!([1.5, 2, null]));
        assert!(to_table("cluster", &[c]).contains("1.50 / 2 / -"));
        let j = to_json("fanout", json!({}), &[a]);
        assert_eq!(j["results"][0]["target"], "floor");
        assert!(j["results"][0]["rss"].is_null());
    }
}
