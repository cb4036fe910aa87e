//! The hot path's pieces, in memory: frame encoding, client message parsing (serde_json
//! against simd-json), pattern matching against 10,000 patterns, fan-out of one publication
//! to 10,000 subscribers' queues, and the state-document diff.
//!
//! Run: `cargo bench --bench gateway`. Figures are in docs/BENCHMARKS.md.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};
use tidings::proto::frame::{self, Kind};
use tidings::proto::message::{encode_event, parse_client};
use tidings::proto::versioned::{encode_change, encode_versioned_event};
use tidings::topic::index::{Index, Sub};
use tidings::topic::{Epoch, Pattern, StateDoc, StateLimits};

fn payload(size: usize) -> Vec<u8> {
    let pad = "x".repeat(size.saturating_sub(32));
    format!(r#"{{"t":1700000000000000000,"pad":"{pad}"}}"#).into_bytes()
}

fn frame_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_encode");
    for size in [256usize, 16 * 1024] {
        let data = payload(size);
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.bench_with_input(BenchmarkId::new("event", size), &data, |b, data| {
            b.iter(|| encode_event(black_box("bench:0"), 42, data, 1_700_000_000_000))
        });
        group.bench_with_input(
            BenchmarkId::new("versioned_event", size),
            &data,
            |b, data| {
                b.iter(|| {
                    encode_versioned_event(
                        black_box("bench:0"),
                        42,
                        "0123456789abcdef:42",
                        data,
                        1_700_000_000_000,
                    )
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("raw_frame", size), &data, |b, data| {
            b.iter(|| frame::encode(Kind::Text, black_box(data)))
        });
    }
    group.finish();
}

fn subscribe_message(topics: usize) -> String {
    let topics: Vec<String> = (0..topics)
        .map(|i| format!("tenant-{i}:jobs:live"))
        .collect();
    json!({"type": "subscribe", "topics": topics, "patterns": ["app:*"], "id": 7}).to_string()
}

fn client_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("client_parse");
    // ~80 bytes: what clients send; ~64 KiB: a subscribe to ~2,000 topics.
    for (name, text) in [
        ("small", subscribe_message(1)),
        ("large", subscribe_message(2000)),
    ] {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(BenchmarkId::new("tidings_parse_client", name), |b| {
            b.iter(|| parse_client(black_box(&text), 64).expect("valid"))
        });
        group.bench_function(BenchmarkId::new("serde_json_value", name), |b| {
            b.iter(|| serde_json::from_str::<Value>(black_box(&text)).expect("valid"))
        });
        group.bench_function(BenchmarkId::new("simd_json_owned", name), |b| {
            b.iter_batched(
                || text.as_bytes().to_vec(),
                |mut bytes| simd_json::to_owned_value(&mut bytes).expect("valid"),
                criterion::BatchSize::SmallInput,
            )
        });
        group.bench_function(BenchmarkId::new("simd_json_borrowed", name), |b| {
            b.iter_batched(
                || text.as_bytes().to_vec(),
                |mut bytes| {
                    let value = simd_json::to_borrowed_value(&mut bytes).expect("valid");
                    black_box(&value);
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn patterns(n: usize) -> Vec<Pattern> {
    (0..n)
        .map(|i| {
            let text = match i % 3 {
                0 => format!("app-{i}:*:x"),
                1 => format!("tenant-{i}:**"),
                _ => format!("svc-{i}:jobs:{i}:state"),
            };
            Pattern::parse(&text).expect("valid pattern")
        })
        .collect()
}

fn pattern_match(c: &mut Criterion) {
    let patterns = patterns(10_000);
    let mut index = Index::default();
    for (i, p) in patterns.iter().enumerate() {
        index.add_pattern(p, Sub::live(i as u32));
    }
    // Matches exactly one pattern (tenant-4:**).
    let topic = "tenant-4:jobs:run-7";
    let mut group = c.benchmark_group("pattern_match_10k");
    group.bench_function("segment_trie", |b| {
        b.iter(|| {
            let mut n = 0;
            index.for_each_match(black_box(topic), |_| n += 1);
            n
        })
    });
    group.bench_function("linear_scan", |b| {
        b.iter(|| {
            patterns
                .iter()
                .filter(|p| p.matches(black_box(topic)))
                .count()
        })
    });
    group.finish();
}

fn fanout(c: &mut Criterion) {
    const SUBSCRIBERS: usize = 10_000;
    let topic: Arc<str> = Arc::from("bench:0");
    let mut index = Index::default();
    for slot in 0..SUBSCRIBERS as u32 {
        index.add_topic(&topic, Sub::live(slot));
    }
    let data = payload(256);
    let mut queues: Vec<VecDeque<Bytes>> = vec![VecDeque::new(); SUBSCRIBERS];
    let mut group = c.benchmark_group("fanout_10k");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    group.bench_function("encode_once_share_bytes", |b| {
        b.iter(|| {
            let frame = encode_event(&topic, 1, &data, 1_700_000_000_000);
            index.for_each_match(&topic, |sub| {
                let queue = &mut queues[sub.slot as usize];
                queue.push_back(frame.clone());
                // Keep memory flat: a subscriber's socket takes the frame at once.
                queue.pop_front();
            });
        })
    });
    group.bench_function("naive_serialize_per_subscriber", |b| {
        let data: Value = serde_json::from_slice(&data).expect("valid");
        b.iter(|| {
            index.for_each_match(&topic, |sub| {
                let message =
                    json!({"type": "event", "topic": &*topic, "offset": 1, "data": &data, "ts": 1});
                let text = serde_json::to_vec(&message).expect("serializable");
                let queue = &mut queues[sub.slot as usize];
                queue.push_back(frame::encode(Kind::Text, &text));
                queue.pop_front();
            });
        })
    });
    group.finish();
}

/// A ~5 KB configuration document and a copy with a few settings changed.
fn config_documents() -> (Value, Value) {
    let services: Vec<Value> = (0..46)
        .map(|i| {
            json!({
                "name": format!("service-{i}"),
                "replicas": 3,
                "limits": {"cpu": "500m", "memory": "256Mi"},
                "flags": ["a", "b"],
                "enabled": true
            })
        })
        .collect();
    let old = json!({"version": 1, "region": "eu-west-1", "services": services});
    let mut new = old.clone();
    new["version"] = json!(2);
    new["services"][7]["replicas"] = json!(5);
    new["services"][21]["enabled"] = json!(false);
    new["services"][33]["flags"] = json!(["a", "b", "c"]);
    (old, new)
}

fn state_diff(c: &mut Criterion) {
    let (old, new) = config_documents();
    let size = serde_json::to_vec(&old).expect("serializable").len();
    let mut group = c.benchmark_group("state_diff");
    group.throughput(Throughput::Bytes(size as u64));
    group.bench_function(BenchmarkId::new("replace_and_diff", size), |b| {
        b.iter_batched(
            || {
                let mut doc = StateDoc::new(Epoch::from_u64(1));
                doc.replace(old.clone(), &StateLimits::default())
                    .expect("within the limits");
                (doc, new.clone())
            },
            |(mut doc, new)| {
                doc.replace(new, &StateLimits::default())
                    .expect("within the limits")
                    .expect("a change")
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// One state change fanned out to 10,000 subscribers: the diff is computed once, the change
/// frame encoded once, and each subscriber's queue gets a reference to it.
fn state_change_fanout(c: &mut Criterion) {
    const SUBSCRIBERS: usize = 10_000;
    let topic: Arc<str> = Arc::from("config:prod");
    let mut index = Index::default();
    for slot in 0..SUBSCRIBERS as u32 {
        index.add_topic(&topic, Sub::live(slot));
    }
    let (old, new) = config_documents();
    let mut queues: Vec<VecDeque<Bytes>> = vec![VecDeque::new(); SUBSCRIBERS];
    let encodes = AtomicUsize::new(0);
    let changes = AtomicUsize::new(0);
    let mut group = c.benchmark_group("fanout_10k");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    group.bench_function("state_change_encoded_once", |b| {
        b.iter_batched(
            || {
                let mut doc = StateDoc::new(Epoch::from_u64(1));
                doc.replace(old.clone(), &StateLimits::default())
                    .expect("within the limits");
                (doc, new.clone())
            },
            |(mut doc, new)| {
                let change = doc
                    .replace(new, &StateLimits::default())
                    .expect("within the limits")
                    .expect("a change");
                changes.fetch_add(1, Ordering::Relaxed);
                let (from, to) = (change.old.to_buf(), change.new.to_buf());
                let frame = encode_change(&topic, &change.diff, from.as_str(), to.as_str(), 1);
                encodes.fetch_add(1, Ordering::Relaxed);
                index.for_each_match(&topic, |sub| {
                    let queue = &mut queues[sub.slot as usize];
                    queue.push_back(frame.clone());
                    queue.pop_front();
                });
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
    // Exactly one encode per change, whatever the number of subscribers.
    assert_eq!(
        encodes.load(Ordering::Relaxed),
        changes.load(Ordering::Relaxed)
    );
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = frame_encode, client_parse, pattern_match, fanout, state_diff, state_change_fanout
}
criterion_main!(benches);
