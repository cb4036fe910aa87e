//! Close codes the gateway sends, and the protocol violations that lead to them.

/// A close code the gateway sends (RFC 6455 §7.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: the purpose of the connection is fulfilled.
    Normal,
    /// 1001: the server is going away (shutdown).
    GoingAway,
    /// 1002: the peer broke the protocol.
    Protocol,
    /// 1003: a data type we do not accept (binary messages).
    Unsupported,
    /// 1007: data inconsistent with its type (invalid UTF-8).
    InvalidPayload,
    /// 1008: a policy violation (rate limit, authentication).
    Policy,
    /// 1009: a message too big to process.
    TooBig,
    /// 1011: an unexpected condition in the server, or a peer that stopped answering.
    Internal,
    /// 1013: try again later; the connection could not keep up.
    TryAgainLater,
    /// Echo of a code the peer sent in its close frame.
    Other(u16),
}

impl CloseCode {
    /// The numeric code on the wire.
    pub fn as_u16(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::Protocol => 1002,
            CloseCode::Unsupported => 1003,
            CloseCode::InvalidPayload => 1007,
            CloseCode::Policy => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::Internal => 1011,
            CloseCode::TryAgainLater => 1013,
            CloseCode::Other(code) => code,
        }
    }
}

/// A rule of RFC 6455 the peer broke; each maps to exactly one close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolViolation {
    /// §5.1: client frames must be masked.
    #[error("client frames must be masked")]
    Unmasked,
    /// §5.2: reserved bits set without a negotiated extension.
    #[error("reserved bits set")]
    ReservedBits,
    /// §5.2: opcodes 0x3-0x7 and 0xB-0xF are reserved.
    #[error("reserved opcode")]
    ReservedOpcode,
    /// §5.2: the most significant bit of a 64-bit length must be 0.
    #[error("payload length has its top bit set")]
    LengthTopBit,
    /// §5.5: control frames must not be fragmented.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// §5.5: control frame payloads are at most 125 bytes.
    #[error("control frame longer than 125 bytes")]
    ControlTooLong,
    /// §5.4: a continuation frame with no message in progress.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// §5.4: a new data message started before the fragmented one ended.
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    /// §5.5.1: a close payload of exactly one byte.
    #[error("close frame with a one-byte payload")]
    CloseOneByte,
    /// §7.4: a close code that must not be sent or is unassigned.
    #[error("invalid close code")]
    InvalidCloseCode,
    /// §8.1: text that is not UTF-8.
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
    /// A frame or message over the configured limit.
    #[error("message too big")]
    TooBig,
    /// The JSON protocol carries text only.
    #[error("binary messages are not supported")]
    Binary,
    /// RFC 7692 §6.1: RSV1 on a control frame or a continuation frame.
    #[error("the compressed bit on a control or continuation frame")]
    MisplacedCompressedBit,
    /// RFC 7692 §7.2.2: a compressed message that does not inflate (corrupt DEFLATE data,
    /// or context taken over though `client_no_context_takeover` was agreed).
    #[error("compressed message does not inflate")]
    BadDeflate,
}

impl ProtocolViolation {
    /// The close code this violation is answered with.
    pub fn close_code(self) -> CloseCode {
        match self {
            ProtocolViolation::Unmasked
            | ProtocolViolation::ReservedBits
            | ProtocolViolation::ReservedOpcode
            | ProtocolViolation::LengthTopBit
            | ProtocolViolation::FragmentedControl
            | ProtocolViolation::ControlTooLong
            | ProtocolViolation::UnexpectedContinuation
            | ProtocolViolation::ExpectedContinuation
            | ProtocolViolation::CloseOneByte
            | ProtocolViolation::InvalidCloseCode
            | ProtocolViolation::MisplacedCompressedBit => CloseCode::Protocol,
            ProtocolViolation::InvalidUtf8 | ProtocolViolation::BadDeflate => {
                CloseCode::InvalidPayload
            }
            ProtocolViolation::TooBig => CloseCode::TooBig,
            ProtocolViolation::Binary => CloseCode::Unsupported,
        }
    }
}
