//! The sans-IO WebSocket session on arbitrary bytes, split at arbitrary points, with timers
//! firing in between: never panics, never holds more than a message's worth of input, and
//! once it stops reading it produces nothing more from input. Half the inputs run with
//! permessage-deflate agreed, so compressed frames, RSV1 rules and bounded inflation are
//! covered too: no message out is longer than the limit, whatever inflates.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings::proto::deflate::{self, Codec};
use tidings::proto::session::{Mode, Output, Session, Timing};

const MAX: usize = 1 << 16;
const TIMING: Timing = Timing {
    interval: 3,
    timeout: 2,
    close: 2,
};

fuzz_target!(|data: &[u8]| {
    let Some((&control, bytes)) = data.split_first() else {
        return;
    };
    let mode = if control & 1 == 0 { Mode::Gateway } else { Mode::Echo };
    let agreed = (control & 2 != 0)
        .then(|| deflate::negotiate([&b"permessage-deflate"[..]]))
        .flatten();
    let mut session = Session::new(mode, 0).with_deflate(agreed);
    let mut codec = Codec::new(64);
    let mut out = Vec::new();
    let mut now = 0;
    // The control byte's other bits choose the chunk size, so splits land everywhere.
    let chunk = usize::from(control >> 2).max(1);
    for piece in bytes.chunks(chunk) {
        let reading = session.phase().reads();
        let before = out.len();
        let mut piece = piece.to_vec();
        session.handle_bytes(&mut piece, now, MAX, &mut codec, &mut out);
        if !reading {
            assert_eq!(out.len(), before, "output after reading stopped");
        }
        assert!(session.inbound_bytes() <= 2 * MAX + 16, "held too much");
        now += 1;
        let _ = session.handle_timeout(now, &TIMING, &mut out);
        let _ = session.arm_close_deadline(now, &TIMING);
    }
    for output in &out {
        if let Output::Message(text) = output {
            assert!(text.len() <= MAX);
        }
    }
});
