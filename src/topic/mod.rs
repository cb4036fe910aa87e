//! Topics: names, patterns, and the per-topic publication sequence.

mod name;

pub use name::{MAX_SEGMENTS, MAX_TOPIC_LEN, NameError, Pattern, Segment, validate_topic};
