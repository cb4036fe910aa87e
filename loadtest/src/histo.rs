//! Latency histograms: creation with fixed bounds, transport between processes
//! (hdrhistogram V2 serialization, base64) and the percentiles the reports print.

use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use serde::Serialize;

use crate::Result;

/// Highest latency tracked, in µs (10 min); larger values saturate to it. A saturated box
/// (`cluster` at full size on two cores) builds backlogs of over a minute, and a
/// percentile that saturates hides how far past it they went; ten minutes is the longest
/// drain anyone waits for, and costs each histogram some 30 KB more than one minute did.
const MAX_US: u64 = 600_000_000;

/// Three significant digits: 0.1% resolution at every magnitude.
const SIGFIG: u8 = 3;

/// An empty latency histogram in microseconds.
pub fn new() -> Histogram<u64> {
    // Constant, valid bounds: creation cannot fail.
    Histogram::new_with_bounds(1, MAX_US, SIGFIG).unwrap_or_else(|_| unreachable!())
}

/// Serializes a histogram for a worker's result line.
pub fn encode(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    if V2Serializer::new().serialize(h, &mut buf).is_err() {
        return String::new();
    }
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// Parses what [`encode`] produced.
pub fn decode(s: &str) -> Result<Histogram<u64>> {
    if s.is_empty() {
        return Ok(new());
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(s)?;
    let h: Histogram<u64> = Deserializer::new().deserialize(&mut &bytes[..])?;
    Ok(h)
}

/// The percentiles a report shows, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

impl Latency {
    /// Summarises a µs histogram.
    pub fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_through_base64() {
        let mut h = new();
        for v in 1..=1000 {
            h.saturating_record(v);
        }
        h.saturating_record(u64::MAX);
        let back = decode(&encode(&h)).unwrap();
        assert_eq!(back.len(), 1001);
        let l = Latency::of(&back);
        assert!((l.p50_ms - 0.5).abs() < 0.01, "{l:?}");
        assert!(l.max_ms >= 599_000.0);
        assert_eq!(decode("").unwrap().len(), 0);
    }
}
