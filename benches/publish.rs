//! The publish path from an embedder, no HTTP: `Gateway::publish` of small events round
//! robin over 10,000 topics, with no subscribers.
//!
//! Run: `cargo bench --bench publish`. Figures are in docs/BENCHMARKS.md.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tidings::{Config, Gateway};

const TOPICS: usize = 10_000;

fn publish(c: &mut Criterion) {
    let gateway = Gateway::new(Config::default().fanout_threads(1));
    let names: Vec<String> = (0..TOPICS).map(|i| format!("runs:{i}")).collect();
    let event = br#"{"status":"running","step":3,"of":10}"#;
    let mut group = c.benchmark_group("publish");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("no_subscribers_10k_topics", |b| {
        b.iter(|| {
            i = (i + 1) % TOPICS;
            black_box(gateway.publish(&names[i], event).expect("published"));
        })
    });
    group.finish();
}

criterion_group!(benches, publish);
criterion_main!(benches);
