//! Random bytes from a peer, after a good handshake: the gateway ends the connection with a
//! valid close code or waits for more, never panics, and keeps serving everyone else.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use tokio::io::AsyncWriteExt;

/// Close codes the gateway may answer garbage with.
const EXPECTED: [u16; 4] = [1002, 1003, 1007, 1009];

/// Byte soup biased toward frame headers, so that many cases get past the first byte.
fn garbage() -> impl Strategy<Value = Vec<u8>> {
    let header_byte = prop_oneof![
        Just(0x81u8),
        Just(0x01),
        Just(0x80),
        Just(0x88),
        Just(0x89),
        Just(0x8A),
        any::<u8>()
    ];
    prop::collection::vec(prop_oneof![header_byte, any::<u8>()], 1..512)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frames_never_hurt_the_gateway() {
    let gw = TestGateway::start(tidings::Config::default().max_message_bytes(1024)).await;
    let mut watcher = WsClient::connect(gw.addr).await;
    watcher.subscribe(&["calm:topic"], &[], 1).await;
    let mut runner = TestRunner::deterministic();
    let strategy = garbage();
    for case in 0..64u64 {
        let bytes = strategy.new_tree(&mut runner).expect("a case").current();
        let mut peer = RawWs::connect(gw.addr).await;
        let _ = peer.try_send_raw(&bytes).await;
        // End our side: whatever frame was incomplete stays incomplete.
        let _ = peer.stream.shutdown().await;
        let (ending, _) = peer.read_to_end().await;
        if let Ending::Close(Some(code)) = ending {
            // Or the echo of a valid close frame that the soup happened to contain.
            let echoed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            assert!(
                EXPECTED.contains(&code) || echoed,
                "case {case}: close {code} for {bytes:02x?}"
            );
        }
        // Everyone else is still served.
        let offset = publish_ok(gw.addr, "calm:topic", b"{\"case\":true}").await;
        let (_, got, _) = watcher.next_event().await;
        assert_eq!(got, offset, "case {case}");
    }
    gw.assert_alive().await;
}
