//! Framing rules of RFC 6455 §5 and the close handshake of §7, through a raw socket
//! that writes exactly the bytes each case needs. Every abuse is followed by a check
//! that the gateway still serves a fresh client.

mod common;

use common::*;
use tidings::Config;

/// Sends `bytes` on a fresh connection and expects the gateway to fail it with `code`.
async fn expect_failure(gw: &TestGateway, bytes: &[u8], code: u16) {
    let mut raw = RawWs::connect(gw.addr).await;
    raw.send_raw(bytes).await;
    raw.expect_close(code).await;
    gw.assert_alive().await;
}

fn ping_json(id: u64) -> Vec<u8> {
    format!(r#"{{"type":"ping","id":{id}}}"#).into_bytes()
}

/// `{"type":"ping","id":id}` padded with spaces to exactly `len` bytes.
fn padded_ping(id: u64, len: usize) -> Vec<u8> {
    let mut text = ping_json(id);
    assert!(text.len() <= len);
    text.resize(len, b' ');
    text
}

async fn expect_json_pong(raw: &mut RawWs, id: u64) {
    let pong = raw.next_json().await;
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(pong["id"], id, "{pong}");
}

#[tokio::test]
async fn unmasked_client_frame_is_1002() {
    let gw = TestGateway::start_default().await;
    let frame = encode_frame(true, 0, OP_TEXT, &ping_json(1), None);
    expect_failure(&gw, &frame, 1002).await;
    // Unmasked control frames too.
    let frame = encode_frame(true, 0, OP_PING, b"hi", None);
    expect_failure(&gw, &frame, 1002).await;
}

#[tokio::test]
async fn invalid_utf8_text_is_1007() {
    let gw = TestGateway::start_default().await;
    let cases: [&[u8]; 4] = [
        b"{\"a\":\"\xff\xfe\"}",
        b"\xc0\xaf",         // overlong encoding of '/'
        b"\xed\xa0\x80",     // a UTF-16 surrogate
        b"\xf4\x90\x80\x80", // above U+10FFFF
    ];
    for payload in cases {
        expect_failure(&gw, &masked(true, OP_TEXT, payload), 1007).await;
    }
}

#[tokio::test]
async fn invalid_utf8_split_across_fragments_is_1007() {
    let gw = TestGateway::start_default().await;
    // A three-byte sequence started in one fragment and broken in the next.
    let mut bytes = masked(false, OP_TEXT, b"\"ab\xe2\x82");
    bytes.extend(masked(true, OP_CONT, b"\x28\""));
    expect_failure(&gw, &bytes, 1007).await;
    // A sequence left unfinished at the end of the message.
    let mut bytes = masked(false, OP_TEXT, b"\"ab\"");
    bytes.extend(masked(true, OP_CONT, b"\xe2\x82"));
    expect_failure(&gw, &bytes, 1007).await;
}

#[tokio::test]
async fn valid_utf8_split_across_fragments_is_accepted() {
    let gw = TestGateway::start_default().await;
    let mut raw = RawWs::connect(gw.addr).await;
    // "€" is e2 82 ac; split it between the first and second fragment, and "ü"
    // (c3 bc) between the second and third.
    let message = "{\"type\":\"subscribe\",\"topics\":[\"€ü\"],\"id\":5}".as_bytes();
    let euro = message
        .windows(3)
        .position(|w| w == "€".as_bytes())
        .expect("euro");
    let (first, rest) = message.split_at(euro + 1);
    let (second, third) = rest.split_at(3);
    assert_eq!(second[2], 0xc3, "the second cut is inside ü");
    let mut bytes = masked(false, OP_TEXT, first);
    bytes.extend(masked(false, OP_CONT, second));
    bytes.extend(masked(true, OP_CONT, third));
    raw.send_raw(&bytes).await;
    // Decoded intact: the topic is refused for its characters, not the message for
    // its encoding or JSON.
    let error = raw.next_json().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "invalid_topic", "{error}");
    assert_eq!(error["id"], 5, "{error}");

    // A valid ping in three fragments, split at arbitrary points.
    let ping = ping_json(6);
    let mut bytes = masked(false, OP_TEXT, &ping[..3]);
    bytes.extend(masked(false, OP_CONT, &ping[3..10]));
    bytes.extend(masked(true, OP_CONT, &ping[10..]));
    raw.send_raw(&bytes).await;
    expect_json_pong(&mut raw, 6).await;
}

#[tokio::test]
async fn control_frame_over_125_bytes_is_1002() {
    let gw = TestGateway::start_default().await;
    for opcode in [OP_PING, OP_PONG] {
        expect_failure(&gw, &masked(true, opcode, &[b'x'; 126]), 1002).await;
    }
    // A close frame over 125 bytes: valid code, long reason.
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend([b'r'; 124]);
    expect_failure(&gw, &masked(true, OP_CLOSE, &payload), 1002).await;
}

#[tokio::test]
async fn control_frame_of_125_bytes_is_fine() {
    let gw = TestGateway::start_default().await;
    let mut raw = RawWs::connect(gw.addr).await;
    let payload: Vec<u8> = (0..125u8).collect();
    raw.send_raw(&masked(true, OP_PING, &payload)).await;
    let pong = raw.next_frame().await;
    assert_eq!((pong.opcode, pong.fin), (OP_PONG, true), "{pong:?}");
    assert_eq!(pong.payload, payload);
}

#[tokio::test]
async fn fragmented_control_frame_is_1002() {
    let gw = TestGateway::start_default().await;
    let mut bytes = masked(false, OP_PING, b"part");
    bytes.extend(masked(true, OP_CONT, b"rest"));
    expect_failure(&gw, &bytes, 1002).await;
    // The same with only the first frame sent: it is already a violation.
    expect_failure(&gw, &masked(false, OP_PING, b"part"), 1002).await;
}

#[tokio::test]
async fn rsv_bits_are_1002() {
    let gw = TestGateway::start_default().await;
    for rsv in [0b100, 0b010, 0b001, 0b111] {
        let frame = encode_frame(true, rsv, OP_TEXT, &ping_json(1), Some(MASK));
        expect_failure(&gw, &frame, 1002).await;
    }
    let frame = encode_frame(true, 0b001, OP_PING, b"x", Some(MASK));
    expect_failure(&gw, &frame, 1002).await;
}

#[tokio::test]
async fn reserved_opcodes_are_1002() {
    let gw = TestGateway::start_default().await;
    for opcode in (0x3..=0x7).chain(0xB..=0xF) {
        let frame = masked(true, opcode, b"x");
        let mut raw = RawWs::connect(gw.addr).await;
        raw.send_raw(&frame).await;
        raw.expect_close(1002).await;
    }
    gw.assert_alive().await;
}

#[tokio::test]
async fn continuation_without_a_message_in_progress_is_1002() {
    let gw = TestGateway::start_default().await;
    expect_failure(&gw, &masked(true, OP_CONT, b"{}"), 1002).await;
    expect_failure(&gw, &masked(false, OP_CONT, b"{"), 1002).await;
    // After a complete message, a continuation is unexpected again.
    let mut bytes = masked(true, OP_TEXT, &ping_json(1));
    bytes.extend(masked(true, OP_CONT, b"{}"));
    let mut raw = RawWs::connect(gw.addr).await;
    raw.send_raw(&bytes).await;
    expect_json_pong(&mut raw, 1).await;
    raw.expect_close(1002).await;
    gw.assert_alive().await;
}

#[tokio::test]
async fn new_data_frame_while_a_message_is_in_progress_is_1002() {
    let gw = TestGateway::start_default().await;
    for second in [OP_TEXT, OP_BINARY] {
        let mut bytes = masked(false, OP_TEXT, b"{\"type\":");
        bytes.extend(masked(true, second, &ping_json(1)));
        expect_failure(&gw, &bytes, 1002).await;
    }
}

#[tokio::test]
async fn message_over_max_message_bytes_in_one_frame_is_1009() {
    let gw = TestGateway::start(Config::default().max_message_bytes(1024)).await;
    // Exactly at the limit is fine...
    let mut raw = RawWs::connect(gw.addr).await;
    raw.send_raw(&masked(true, OP_TEXT, &padded_ping(1, 1024)))
        .await;
    expect_json_pong(&mut raw, 1).await;
    // ...one byte over is not.
    raw.send_raw(&masked(true, OP_TEXT, &padded_ping(2, 1025)))
        .await;
    raw.expect_close(1009).await;
    gw.assert_alive().await;
}

#[tokio::test]
async fn message_over_max_message_bytes_in_fragments_is_1009() {
    let gw = TestGateway::start(Config::default().max_message_bytes(1024)).await;
    // 3 × 400 bytes: every fragment fits, the reassembled message does not.
    let payload = padded_ping(1, 1200);
    let mut bytes = masked(false, OP_TEXT, &payload[..400]);
    bytes.extend(masked(false, OP_CONT, &payload[400..800]));
    bytes.extend(masked(true, OP_CONT, &payload[800..]));
    expect_failure(&gw, &bytes, 1009).await;

    // Fragments adding up to exactly the limit are fine.
    let payload = padded_ping(2, 1024);
    let mut bytes = masked(false, OP_TEXT, &payload[..500]);
    bytes.extend(masked(true, OP_CONT, &payload[500..]));
    let mut raw = RawWs::connect(gw.addr).await;
    raw.send_raw(&bytes).await;
    expect_json_pong(&mut raw, 2).await;
}

#[tokio::test]
async fn binary_message_is_1003() {
    let gw = TestGateway::start_default().await;
    expect_failure(&gw, &masked(true, OP_BINARY, &ping_json(1)), 1003).await;
    // A fragmented binary message too.
    let mut bytes = masked(false, OP_BINARY, b"ab");
    bytes.extend(masked(true, OP_CONT, b"cd"));
    expect_failure(&gw, &bytes, 1003).await;
}

#[tokio::test]
async fn ping_gets_a_pong_with_the_same_payload() {
    let gw = TestGateway::start_default().await;
    let mut raw = RawWs::connect(gw.addr).await;
    let binary: Vec<u8> = (0..=255u8).rev().take(100).collect();
    for payload in [&b"hello"[..], b"", &binary] {
        raw.send_raw(&masked(true, OP_PING, payload)).await;
        let pong = raw.next_frame().await;
        assert_eq!(pong.opcode, OP_PONG, "{pong:?}");
        assert!(pong.fin);
        assert_eq!(pong.rsv, 0);
        assert_eq!(pong.payload, payload);
    }
}

#[tokio::test]
async fn ping_between_fragments_is_answered_and_the_message_completes() {
    let gw = TestGateway::start_default().await;
    let mut raw = RawWs::connect(gw.addr).await;
    let ping = ping_json(9);
    let mut bytes = masked(false, OP_TEXT, &ping[..8]);
    bytes.extend(masked(true, OP_PING, b"mid"));
    bytes.extend(masked(false, OP_CONT, &ping[8..12]));
    bytes.extend(masked(true, OP_PONG, b"unsolicited"));
    bytes.extend(masked(true, OP_CONT, &ping[12..]));
    raw.send_raw(&bytes).await;
    let pong = raw.next_frame().await;
    assert_eq!(
        (pong.opcode, pong.payload.as_slice()),
        (OP_PONG, &b"mid"[..])
    );
    expect_json_pong(&mut raw, 9).await;
}

#[tokio::test]
async fn unsolicited_pong_is_ignored() {
    let gw = TestGateway::start_default().await;
    let mut raw = RawWs::connect(gw.addr).await;
    let mut bytes = masked(true, OP_PONG, b"whatever");
    bytes.extend(masked(true, OP_TEXT, &ping_json(3)));
    raw.send_raw(&bytes).await;
    expect_json_pong(&mut raw, 3).await;
}

#[tokio::test]
async fn frames_split_into_single_bytes_and_coalesced_are_parsed() {
    let gw = TestGateway::start_default().await;
    let mut raw = RawWs::connect(gw.addr).await;
    // One byte per write: the parser must wait for the rest of a partial frame.
    let frame = masked(true, OP_TEXT, &padded_ping(1, 300)); // 16-bit length form
    for byte in &frame {
        raw.send_raw(std::slice::from_ref(byte)).await;
    }
    expect_json_pong(&mut raw, 1).await;
    // Three frames in one write: all are processed, in order.
    let mut bytes = masked(true, OP_TEXT, &ping_json(2));
    bytes.extend(masked(true, OP_TEXT, &ping_json(3)));
    bytes.extend(masked(true, OP_TEXT, &ping_json(4)));
    raw.send_raw(&bytes).await;
    for id in 2..=4 {
        expect_json_pong(&mut raw, id).await;
    }
}

#[tokio::test]
async fn client_close_is_echoed_with_its_code_then_tcp_closes() {
    let gw = TestGateway::start_default().await;
    for (code, reason) in [
        (1000u16, &b"bye"[..]),
        (1001, b""),
        (3000, b"app"),
        (4999, b"x"),
    ] {
        let mut raw = RawWs::connect(gw.addr).await;
        raw.send_raw(&close_frame(code, reason)).await;
        let reply = raw.next_frame().await;
        assert_eq!(reply.opcode, OP_CLOSE, "{reply:?}");
        assert_eq!(reply.close_code(), Some(code), "echo of close {code}");
        // The server closes TCP after the close handshake (RFC 6455 §7.1.1).
        match within("EOF after the close handshake", raw.read_frame()).await {
            Ok(None) => {}
            other => panic!("expected EOF after close {code}, got {other:?}"),
        }
    }
    gw.assert_alive().await;
}

#[tokio::test]
async fn empty_client_close_is_answered() {
    let gw = TestGateway::start_default().await;
    let mut raw = RawWs::connect(gw.addr).await;
    raw.send_raw(&masked(true, OP_CLOSE, b"")).await;
    let reply = raw.next_frame().await;
    assert_eq!(reply.opcode, OP_CLOSE, "{reply:?}");
    // No code was given; the echo may be empty or 1000.
    assert!(matches!(reply.close_code(), None | Some(1000)), "{reply:?}");
    match within("EOF after the close handshake", raw.read_frame()).await {
        Ok(None) => {}
        other => panic!("expected EOF, got {other:?}"),
    }
}

#[tokio::test]
async fn close_with_a_one_byte_payload_is_1002() {
    let gw = TestGateway::start_default().await;
    expect_failure(&gw, &masked(true, OP_CLOSE, &[0x03]), 1002).await;
}

#[tokio::test]
async fn close_with_an_invalid_code_is_1002() {
    let gw = TestGateway::start_default().await;
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        let mut raw = RawWs::connect(gw.addr).await;
        raw.send_raw(&close_frame(code, b"")).await;
        let frame = raw.next_frame().await;
        assert_eq!(frame.opcode, OP_CLOSE, "close {code}: {frame:?}");
        assert_eq!(
            frame.close_code(),
            Some(1002),
            "close with invalid code {code}"
        );
        raw.expect_eof().await;
    }
    gw.assert_alive().await;
}

#[tokio::test]
async fn close_with_an_invalid_utf8_reason_is_1007() {
    let gw = TestGateway::start_default().await;
    let mut raw = RawWs::connect(gw.addr).await;
    raw.send_raw(&close_frame(1000, b"bad \xff\xfe reason"))
        .await;
    let frame = raw.next_frame().await;
    assert_eq!(frame.opcode, OP_CLOSE, "{frame:?}");
    assert_eq!(frame.close_code(), Some(1007));
    raw.expect_eof().await;
    gw.assert_alive().await;
}

#[tokio::test]
async fn data_after_close_is_ignored() {
    let gw = TestGateway::start_default().await;
    let mut raw = RawWs::connect(gw.addr).await;
    // RFC 6455 §5.5.1: after sending a close, the endpoint sends no more data; a
    // server must not answer the ping that follows the close.
    let mut bytes = close_frame(1000, b"");
    bytes.extend(masked(true, OP_TEXT, &ping_json(1)));
    let _ = raw.try_send_raw(&bytes).await;
    let frame = raw.next_frame().await;
    assert_eq!(frame.opcode, OP_CLOSE, "{frame:?}");
    assert_eq!(frame.close_code(), Some(1000));
    raw.expect_eof().await;
    gw.assert_alive().await;
}

#[tokio::test]
async fn shutdown_closes_connections_with_1001_and_serve_returns() {
    let gw = TestGateway::start_default().await;
    let addr = gw.addr;
    let mut raw = RawWs::connect(addr).await;
    raw.send_text(r#"{"type":"subscribe","topics":["s:t"],"id":1}"#)
        .await;
    let ack = raw.next_json().await;
    assert_eq!(ack["type"], "subscribed");

    let shutdown = tokio::spawn(gw.shutdown());
    let frame = raw.next_frame().await;
    assert_eq!(frame.opcode, OP_CLOSE, "{frame:?}");
    assert_eq!(
        frame.close_code(),
        Some(1001),
        "shutdown closes with going away"
    );
    let _ = raw.try_send_raw(&close_frame(1001, b"")).await;
    raw.expect_eof().await;
    within("serve() to return", shutdown)
        .await
        .expect("shutdown task")
        .expect("serve() result");
    // The listener is gone.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn the_default_limit_of_64_kib_uses_the_64_bit_length_form() {
    let gw = TestGateway::start_default().await;
    // 65,536 bytes needs the 8-byte length; it is exactly the default limit.
    let mut raw = RawWs::connect(gw.addr).await;
    let frame = masked(true, OP_TEXT, &padded_ping(1, 64 * 1024));
    assert_eq!(frame[1] & 0x7f, 127);
    raw.send_raw(&frame).await;
    expect_json_pong(&mut raw, 1).await;
    // One more byte is over the limit. The gateway may stop reading as soon as it has
    // the header, so the rest of our write may fail.
    let _ = raw
        .try_send_raw(&masked(true, OP_TEXT, &padded_ping(2, 64 * 1024 + 1)))
        .await;
    raw.expect_close(1009).await;
    gw.assert_alive().await;
}

#[tokio::test]
async fn a_64_bit_length_with_the_top_bit_set_is_refused() {
    let gw = TestGateway::start_default().await;
    let mut raw = RawWs::connect(gw.addr).await;
    // §5.2: "the most significant bit MUST be 0".
    let mut bytes = vec![0x81, 0x80 | 127];
    bytes.extend((1u64 << 63 | 5).to_be_bytes());
    bytes.extend(MASK);
    bytes.extend(b"hello");
    raw.send_raw(&bytes).await;
    let close = raw.next_frame().await;
    assert_eq!(close.opcode, OP_CLOSE, "{close:?}");
    assert!(
        matches!(close.close_code(), Some(1002 | 1009)),
        "top-bit length closed with {:?}",
        close.close_code()
    );
    raw.expect_eof().await;
    gw.assert_alive().await;
}
