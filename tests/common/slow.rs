//! Subscribers that stop reading, for the tests of what a full queue does.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::net::TcpSocket;

use super::{OP_CLOSE, OP_TEXT, RawWs, within};

/// A raw client with a tiny receive buffer that sends `request` (a `subscribe`) and then
/// reads nothing until the test says so.
pub async fn stalled(addr: SocketAddr, request: Value) -> RawWs {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket.connect(addr).await.expect("connect");
    let mut client = RawWs::handshake(stream, addr).await;
    client.send_text(&request.to_string()).await;
    let ack = client.next_json().await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    client
}

/// How many publications of `payload` bytes fill the kernel's buffers on the way (the
/// gateway's send buffer autotunes up to `tcp_wmem`'s maximum) and then `queued` bytes
/// more.
pub fn rounds(payload: usize, queued: usize) -> u64 {
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|text| text.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 * 1024 * 1024);
    ((wmem_max + 64 * 1024 + queued) / payload + 8) as u64
}

/// Reads an event subscriber's backlog to its close: events must run from offset 1 with no
/// gap, and the close must be 1013. Returns the last offset read and the close reason.
pub async fn read_backlog_to_1013(client: &mut RawWs) -> (u64, String) {
    let mut last = 0;
    loop {
        let frame = within("the backlog", client.read_frame())
            .await
            .expect("read")
            .expect("a close frame before EOF");
        match frame.opcode {
            OP_TEXT => {
                let event: Value = serde_json::from_slice(&frame.payload).expect("JSON");
                assert_eq!(event["offset"], last + 1, "a gap in the backlog");
                last += 1;
            }
            OP_CLOSE => {
                assert_eq!(frame.close_code(), Some(1013), "{frame:?}");
                let reason = String::from_utf8(frame.payload[2..].to_vec()).expect("UTF-8");
                return (last, reason);
            }
            _ => {}
        }
    }
}
