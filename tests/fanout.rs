//! Fan-out under load: a subscriber that stops reading is cut off without slowing
//! anyone else, and a thousand subscribers each get every publication exactly once.

mod common;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tidings::Config;
use tokio::net::TcpSocket;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

/// Waits for a reader's acknowledgement; if none comes in time, reports a reader that
/// died (its panic is the real failure) rather than just the timeout.
async fn next_ack(
    acks: &mut mpsc::UnboundedReceiver<u64>,
    readers: &mut [JoinHandle<u64>],
    deadline: Duration,
    what: &str,
) -> u64 {
    match tokio::time::timeout(deadline, acks.recv()).await {
        Ok(Some(offset)) => offset,
        Ok(None) | Err(_) => {
            for reader in readers.iter_mut() {
                if reader.is_finished()
                    && let Err(e) = reader.await
                {
                    panic!("a healthy reader failed: {e}");
                }
            }
            panic!("no acknowledgement within {deadline:?} for {what}");
        }
    }
}

/// A subscriber with a tiny receive buffer (set before connecting, so the window is
/// small from the start) that subscribes to `topic` and then reads nothing until the
/// test says so.
async fn slow_subscriber(addr: SocketAddr, topic: &str) -> RawWs {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket.connect(addr).await.expect("connect");
    let mut slow = RawWs::handshake(stream, addr).await;
    slow.send_text(&json!({"type": "subscribe", "topics": [topic], "id": 1}).to_string())
        .await;
    let ack = slow.next_json().await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    slow
}

/// Reads a slow subscriber's backlog: it must be a gap-free run of offsets from 1 (no
/// silent drops), and then the connection ends. Returns how many events it held and how
/// it ended.
async fn read_backlog(slow: &mut RawWs, topic: &str) -> (u64, Ending) {
    let mut events = 0;
    let ending = loop {
        let Ok(frame) = tokio::time::timeout(TIMEOUT, slow.read_frame()).await else {
            panic!(
                "the slow consumer read {events} events and then nothing for {TIMEOUT:?}: \
                 it was neither closed nor sent anything more"
            );
        };
        match frame {
            Ok(Some(frame)) if frame.opcode == OP_TEXT => {
                let offset = event_offset(&frame.text(), topic);
                assert_eq!(offset, events + 1, "the slow consumer saw a gap");
                events += 1;
            }
            Ok(Some(frame)) if frame.opcode == OP_PING => {}
            Ok(Some(frame)) if frame.opcode == OP_CLOSE => {
                break Ending::Close(frame.close_code());
            }
            Ok(Some(frame)) => panic!("unexpected frame {frame:?}"),
            Ok(None) => break Ending::Eof,
            // A connection dropped in the middle of a frame the gateway could not finish
            // writing to a full socket is an abnormal closure (1006), i.e. an EOF.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ending::Eof,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break Ending::Eof,
            Err(e) => panic!("reading the slow consumer: {e}"),
        }
    };
    (events, ending)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_reading_subscriber_is_closed_with_1013_while_100_others_keep_up() {
    const TOPIC: &str = "slow:t";
    const READERS: usize = 100;
    /// Big enough that the slow consumer's buffers fill in a few hundred rounds, small
    /// enough that the 64 KiB queue holds several.
    const PAYLOAD: usize = 16 * 1024;
    /// The slow consumer's kernel buffers hold at most a few MiB (tcp_wmem max on the
    /// gateway's side, a tiny SO_RCVBUF on ours); 2,000 rounds is 32 MiB.
    const MAX_ROUNDS: u64 = 2_000;
    /// "Promptly": every healthy reader has each publication within this time.
    const PROMPT: Duration = Duration::from_secs(5);

    // A short close timeout so that the slow consumer, which never answers the close,
    // is let go (and counted) soon after it overflows.
    let config = Config::default()
        .max_queued_bytes(64 * 1024)
        .close_timeout(Duration::from_millis(500));
    let gw = TestGateway::start(config).await;
    let addr = gw.addr;
    let mut slow = slow_subscriber(addr, TOPIC).await;

    // The healthy ones read concurrently and acknowledge every offset.
    let (ack_tx, mut acks) = mpsc::unbounded_channel::<u64>();
    let mut readers = Vec::with_capacity(READERS);
    for i in 0..READERS {
        let mut client = WsClient::connect(addr).await;
        client.subscribe(&[TOPIC], &[], i as u64).await;
        let ack_tx = ack_tx.clone();
        readers.push(tokio::spawn(async move {
            let mut expected = 1;
            loop {
                let text = client.next_text().await;
                let offset = event_offset(&text, TOPIC);
                assert_eq!(offset, expected, "reader {i}: offsets must be consecutive");
                let last = text.contains(r#""final":true"#);
                let _ = ack_tx.send(offset);
                if last {
                    return offset;
                }
                expected += 1;
            }
        }));
    }
    drop(ack_tx);

    // Publish in lock step with the healthy readers until the gateway reports the slow
    // consumer closed. The slow consumer's backlog grows every round; the healthy
    // readers must not notice.
    let pad = "x".repeat(PAYLOAD);
    let mut offset = 0;
    let mut slowest_round = Duration::ZERO;
    loop {
        offset += 1;
        assert!(
            offset <= MAX_ROUNDS,
            "the non-reading subscriber was never closed after {MAX_ROUNDS} publications of \
             {PAYLOAD} bytes; stats: {}",
            serde_json::to_string(&gw.gw.stats()).unwrap_or_default()
        );
        let body = format!(r#"{{"n":{offset},"pad":"{pad}"}}"#);
        let started = Instant::now();
        let published = gw.gw.publish(TOPIC, body.as_bytes()).expect("publish");
        assert_eq!(published.offset, offset);
        for _ in 0..READERS {
            let got = next_ack(&mut acks, &mut readers, PROMPT, "a publication").await;
            assert_eq!(got, offset, "lock step");
        }
        slowest_round = slowest_round.max(started.elapsed());
        if gw.gw.stats().connections_closed.slow_consumer > 0 {
            break;
        }
    }
    let rounds = offset;

    // One more publication after the close: everyone healthy still gets it.
    offset += 1;
    let body = format!(r#"{{"n":{offset},"final":true}}"#);
    let published = gw.gw.publish(TOPIC, body.as_bytes()).expect("publish");
    assert_eq!(published.offset, offset);
    for _ in 0..READERS {
        let got = next_ack(&mut acks, &mut readers, PROMPT, "the final publication").await;
        assert_eq!(got, offset);
    }
    for reader in readers {
        let last = within("a reader to finish", reader).await.expect("reader");
        assert_eq!(last, offset);
    }

    // The slow consumer, read at last: a gap-free prefix, then close 1013, or EOF if
    // the gateway gave up on writing the close frame to its full socket.
    let (events, ending) = read_backlog(&mut slow, TOPIC).await;
    eprintln!(
        "slow consumer counted closed after {rounds} publications of {PAYLOAD} bytes, having \
         taken {events} of them, then {ending:?}; slowest round to {READERS} readers: \
         {slowest_round:?}"
    );
    assert!(
        matches!(ending, Ending::Close(Some(1013)) | Ending::Eof),
        "slow consumer ended with {ending:?}, expected close 1013 or EOF"
    );
    assert!(events < rounds, "the slow consumer was not cut off");

    let stats = gw.gw.stats();
    assert_eq!(
        stats.connections_closed.slow_consumer, 1,
        "only the slow one"
    );
    assert_eq!(stats.publications, offset);
}

/// The most payload bytes the kernel can hold between the gateway and a subscriber
/// whose receive buffer is `rcvbuf`: the gateway's send buffer autotunes up to
/// `tcp_wmem`'s maximum, and the receiver holds about its buffer.
fn kernel_capacity(rcvbuf: usize) -> usize {
    let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|text| text.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 * 1024 * 1024);
    wmem_max + 2 * rcvbuf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_that_reads_again_gets_its_backlog_then_close_1013() {
    const TOPIC: &str = "slow:t";
    const PAYLOAD: usize = 16 * 1024;
    const MAX_QUEUED: usize = 64 * 1024;
    // A long close timeout: the gateway must still be waiting for the close handshake
    // when the consumer comes back.
    let config = Config::default()
        .max_queued_bytes(MAX_QUEUED)
        .close_timeout(Duration::from_secs(60));
    let gw = TestGateway::start(config).await;
    let mut slow = slow_subscriber(gw.addr, TOPIC).await;

    // Enough to fill every kernel buffer on the way and then the queue, whatever the
    // gateway managed to write.
    let rcvbuf = 8 * 1024;
    let rounds = ((kernel_capacity(rcvbuf) + MAX_QUEUED) / PAYLOAD + 4) as u64;
    let pad = "x".repeat(PAYLOAD);
    for n in 1..=rounds {
        let body = format!(r#"{{"n":{n},"pad":"{pad}"}}"#);
        let published = gw.gw.publish(TOPIC, body.as_bytes()).expect("publish");
        assert_eq!(published.offset, n);
    }

    let (events, ending) = read_backlog(&mut slow, TOPIC).await;
    eprintln!("after {rounds} publications the slow consumer held {events}, then {ending:?}");
    assert_eq!(
        ending,
        Ending::Close(Some(1013)),
        "a consumer that overflowed its queue and then read is told why (1013)"
    );
    assert!(events < rounds, "the slow consumer was not cut off");
    let _ = slow.try_send_raw(&close_frame(1013, b"")).await;
    slow.expect_eof().await;

    // Counted once the connection is gone; the bookkeeping may trail the socket's
    // close by a moment, so look a bounded number of times.
    let stats = gw
        .stats_until("the slow consumer to be counted", |s| {
            s.connections_closed.slow_consumer > 0
        })
        .await;
    assert_eq!(stats.connections_closed.slow_consumer, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_each_receive_every_one_of_100_publications_exactly_once() {
    const CLIENTS: usize = 1_000;
    const PUBLICATIONS: u64 = 100;
    const TOPIC: &str = "fan:t";

    let gw = TestGateway::start_default().await;
    let addr = gw.addr;

    // Connect in bounded parallel batches; half subscribe to the topic, half through a
    // pattern, so both fan-out paths carry the full load.
    let connecting = Arc::new(Semaphore::new(64));
    let (ready_tx, mut ready) = mpsc::channel::<()>(CLIENTS);
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let connecting = Arc::clone(&connecting);
        let ready_tx = ready_tx.clone();
        clients.push(tokio::spawn(async move {
            let permit = connecting.acquire_owned().await.expect("semaphore");
            let mut client = WsClient::connect(addr).await;
            if i % 2 == 0 {
                client.subscribe(&[TOPIC], &[], i as u64).await;
            } else {
                client.subscribe(&[], &["fan:*"], i as u64).await;
            }
            drop(permit);
            ready_tx.send(()).await.expect("ready");
            let mut offsets = Vec::with_capacity(PUBLICATIONS as usize + 1);
            loop {
                let (topic, offset, data) = client.next_event().await;
                assert_eq!(topic, TOPIC, "client {i}");
                assert_eq!(data["n"], offset, "client {i}: data belongs to its offset");
                offsets.push(offset);
                if offset > PUBLICATIONS {
                    break;
                }
            }
            // Anything duplicated late would arrive before this pong.
            client.ping(u64::MAX - 1).await;
            // Handed back so the connection stays open until the stats are checked.
            (offsets, client)
        }));
    }
    drop(ready_tx);
    for _ in 0..CLIENTS {
        within("every client to subscribe", ready.recv())
            .await
            .expect("a client failed before subscribing");
    }

    let started = Instant::now();
    for n in 1..=PUBLICATIONS + 1 {
        let body = json!({"n": n});
        assert_eq!(
            publish_ok(addr, TOPIC, body.to_string().as_bytes()).await,
            n
        );
    }

    let expected: Vec<u64> = (1..=PUBLICATIONS + 1).collect();
    let mut open = Vec::with_capacity(CLIENTS);
    for (i, client) in clients.into_iter().enumerate() {
        let (offsets, client) = within("a client to receive everything", client)
            .await
            .unwrap_or_else(|e| panic!("client {i} failed: {e}"));
        assert_eq!(offsets, expected, "client {i}: every offset once, in order");
        open.push(client);
    }
    eprintln!(
        "{CLIENTS} clients × {} publications delivered in {:?}",
        PUBLICATIONS + 1,
        started.elapsed()
    );

    let total = (PUBLICATIONS + 1) * CLIENTS as u64;
    let stats = gw
        .stats_until("every delivery counted", |s| s.deliveries >= total)
        .await;
    assert_eq!(stats.publications, PUBLICATIONS + 1);
    assert_eq!(stats.deliveries, total);
    assert_eq!(stats.connections, CLIENTS as u64);
    assert_eq!(stats.connections_closed.slow_consumer, 0);
}
