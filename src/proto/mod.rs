//! The wire protocol, free of I/O: handshake validation, frames, close codes and messages.

pub mod close;
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod json;
pub mod message;
pub mod session;
pub mod sse;
pub mod versioned;

pub use close::{CloseCode, ProtocolViolation};
pub use handshake::HandshakeError;
