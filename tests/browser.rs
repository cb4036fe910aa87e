//! The browser client and the dashboard, tested in headless Chromium and in Node against
//! the real `tidings` binary: this runs `node --test clients/js/test/`, so
//! `cargo test --workspace` stays the one command that runs every test.
//!
//! Needs Node 20.10+, Debian's `chromium` at `/usr/bin/chromium` (or `CHROMIUM`) and
//! `npm ci` in `clients/js` (`.ci/run` installs all three). Without them this test fails
//! and says what is missing; `SKIP_BROWSER_TESTS=1` skips it on purpose.

use std::path::{Path, PathBuf};
use std::process::Command;

fn clients_js() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js")
}

/// What is missing to run the browser tests, if anything.
fn missing() -> Vec<String> {
    let mut missing = Vec::new();
    let node = Command::new("node").arg("--version").output();
    match node {
        Ok(out) if out.status.success() => {}
        _ => missing.push("node (Node.js 20.10 or later)".to_owned()),
    }
    if !clients_js().join("node_modules/playwright-core").exists() {
        missing.push("clients/js/node_modules (run `npm ci` in clients/js)".to_owned());
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    if !Path::new(&chromium).exists() {
        missing.push(format!("{chromium} (apt-get install chromium)"));
    }
    missing
}

/// Whether this Node has a global `WebSocket` without a flag (Node 22 and later).
fn websocket_is_global() -> bool {
    Command::new("node")
        .args([
            "-e",
            "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
        ])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn client_and_dashboard_in_a_real_browser() {
    if std::env::var("SKIP_BROWSER_TESTS").as_deref() == Ok("1") {
        eprintln!("SKIP_BROWSER_TESTS=1: the browser tests were NOT run");
        return;
    }
    let missing = missing();
    assert!(
        missing.is_empty(),
        "the browser tests need: {}; or set SKIP_BROWSER_TESTS=1 to skip them",
        missing.join(", ")
    );
    let mut node = Command::new("node");
    if !websocket_is_global() {
        node.arg("--experimental-websocket");
    }
    // The test files by name (Node 20 takes no globs; helpers.js is not a test).
    let mut files: Vec<String> = std::fs::read_dir(clients_js().join("test"))
        .expect("clients/js/test")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".test.js"))
        .map(|name| format!("test/{name}"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "the client's test files: {files:?}");
    let status = node
        .args(["--test", "--test-reporter=spec"])
        .args(&files)
        .current_dir(clients_js())
        .env("GATEWAY_BIN", env!("CARGO_BIN_EXE_tidings"))
        .status()
        .expect("running node --test");
    assert!(status.success(), "node --test failed: {status}");
}
