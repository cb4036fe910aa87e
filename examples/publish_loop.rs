//! Publishes small events round robin over 10,000 topics with no subscribers, as an
//! embedder does: a fixed amount of work, for instruction counts under
//! `valgrind --tool=callgrind` (repeatable on a noisy machine, unlike wall time).
//!
//! Run: `cargo run --release --example publish_loop -- 200000`.

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let gateway = tidings::Gateway::new(tidings::Config::default().fanout_threads(1));
    let names: Vec<String> = (0..10_000).map(|i| format!("runs:{i}")).collect();
    let event = br#"{"status":"running","step":3,"of":10}"#;
    let started = std::time::Instant::now();
    for i in 0..n {
        if let Err(e) = gateway.publish(&names[i % names.len()], event) {
            eprintln!("publish: {e}");
            std::process::exit(1);
        }
    }
    let elapsed = started.elapsed();
    println!(
        "{n} publications in {elapsed:?}: {:.0}/s",
        n as f64 / elapsed.as_secs_f64()
    );
}
