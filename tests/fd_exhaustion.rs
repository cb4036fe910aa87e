//! Out of file descriptors, a new client is refused at once (a canned 503 accepted with
//! the gateway's reserved descriptor) instead of hanging in the backlog.
//!
//! Its own test binary, with one test, because it uses up the descriptors of the whole
//! process.

mod common;

use std::fs::File;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;

/// Descriptors this test may use on top of those open when it starts; bounds the loop that
/// uses them all up.
const HEADROOM: u64 = 256;

fn open_descriptors() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

#[tokio::test]
async fn out_of_descriptors_a_client_gets_503_not_a_hang() {
    let gw = TestGateway::start_default().await;
    // Serving has started (and opened its reserve) once a request is answered.
    let health = http_get(gw.addr, "/healthz").await;
    assert_eq!(health.status, 200);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    let original = limit;
    limit.rlim_cur = (open_descriptors() + HEADROOM).min(limit.rlim_max);
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);

    // The client's socket exists before the descriptors run out; connecting needs none.
    let socket = TcpSocket::new_v4().expect("socket");
    let mut filler = Vec::new();
    while let Ok(file) = File::open("/dev/null") {
        filler.push(file);
        assert!(filler.len() as u64 <= HEADROOM, "the limit did not apply");
    }
    let mut stream = within("connect", socket.connect(gw.addr))
        .await
        .expect("connect");
    let mut got = Vec::new();
    within("the refusal", stream.read_to_end(&mut got))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 503"), "{text:?}");
    assert!(text.contains("\"code\":\"over_capacity\""), "{text:?}");

    // With descriptors back the gateway serves as before.
    drop(filler);
    drop(stream);
    assert_eq!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &original) },
        0
    );
    gw.assert_alive().await;
}
