//! Client message parsing on arbitrary text: never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings::proto::message::parse_client;
use tidings::topic::{Pattern, validate_topic};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(tidings::proto::message::ClientMessage::Subscribe(req)) = parse_client(text, 64) {
            for t in &req.topics {
                let _ = validate_topic(t);
            }
            for p in &req.patterns {
                if let Ok(p) = Pattern::parse(p) {
                    let _ = p.matches("a:b:c");
                }
            }
        }
    }
});
