//! Handshake validation on arbitrary header names and values: never panics.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, Method, Version};
use libfuzzer_sys::fuzz_target;
use tidings::proto::handshake;

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    // Lines of `name:value`, as a peer could send them.
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(&line[colon + 1..]),
        ) {
            headers.append(name, value);
        }
    }
    let origins = vec!["https://app.example".to_string()];
    let _ = handshake::validate(&Method::GET, Version::HTTP_11, &headers, &[]);
    let _ = handshake::validate(&Method::GET, Version::HTTP_11, &headers, &origins);
});
