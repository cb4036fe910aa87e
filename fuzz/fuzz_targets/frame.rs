//! Frame parsing and message reassembly on arbitrary bytes: never panics, never reads past
//! the buffer, and consumes exactly what it reports.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings::proto::frame::{self, Fragments, Kind};

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    let mut pos = 0;
    let mut fragments: Option<Box<Fragments>> = None;
    while pos < buf.len() {
        let Ok(Some(f)) = frame::parse(&mut buf[pos..], 1 << 16) else {
            break;
        };
        assert!(f.len > 0 && pos + f.len <= buf.len());
        let payload = &buf[pos + f.payload.start..pos + f.payload.end];
        match f.kind {
            Kind::Text | Kind::Binary if f.fin => {
                let _ = frame::whole_message(f.kind == Kind::Text, payload);
            }
            Kind::Text | Kind::Binary => {
                fragments = Fragments::start(f.kind == Kind::Text, payload).ok();
            }
            Kind::Continuation => {
                if let Some(fr) = fragments.as_mut() {
                    if fr.push(payload, 1 << 16).is_err() {
                        fragments = None;
                    } else if f.fin {
                        let _ = fr.finish();
                        fragments = None;
                    }
                }
            }
            Kind::Close => {
                let _ = frame::parse_close(payload);
            }
            Kind::Ping | Kind::Pong => {}
        }
        pos += f.len;
    }
});
