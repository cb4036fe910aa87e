//! Topics: names, patterns, and the per-topic publication sequence.

pub mod filter;
pub mod history;
pub mod index;
mod name;
pub mod state;
pub mod version;

pub use filter::{EventFields, Filter, FilterError};
pub use history::{Entry, History, HistoryLimits, Page, Since};
pub use name::{
    MAX_SEGMENTS, MAX_TOPIC_LEN, NameError, Pattern, RESERVED_SEGMENT, Segment, is_reserved,
    validate_topic,
};
pub use state::{Change, PatchError, StateDoc, StateError, StateLimits};
pub use version::{Epoch, Version, VersionError};
