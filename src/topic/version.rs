//! Versions: a topic's epoch (which history) and offset (which publication within it).
//!
//! On the wire a version is the string `"<epoch>:<offset>"`, the epoch as 16 lowercase hex
//! digits and the offset in decimal: `"9f86d081884c7d65:42"`. Clients treat it as opaque and
//! send it back in `since`, `resync`, `Last-Event-ID` and `If-Match`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Hex digits of an epoch on the wire.
pub const EPOCH_HEX_LEN: usize = 16;

/// Longest version string: 16 hex digits, `:`, and the 20 digits of `u64::MAX`.
pub const MAX_VERSION_LEN: usize = EPOCH_HEX_LEN + 1 + 20;

/// The identity of one topic history. A new epoch is drawn whenever history is lost (a
/// restart, a topic created afresh), so a client's version from an older history is never
/// mistaken for a position in the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(u64);

impl Epoch {
    /// A fresh random epoch; 64 random bits make a collision between two histories of the
    /// same topic practically impossible.
    pub fn random() -> Epoch {
        Epoch(rand::random())
    }

    /// An epoch with a known value (tests, or one restored from shared storage).
    pub const fn from_u64(value: u64) -> Epoch {
        Epoch(value)
    }

    /// The raw value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Writes the 16 lowercase hex digits into `out`.
    fn write_hex(self, out: &mut [u8; EPOCH_HEX_LEN]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in out.iter_mut().enumerate() {
            let shift = 60 - 4 * i;
            *b = HEX[((self.0 >> shift) & 0xf) as usize];
        }
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for Epoch {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Epoch, VersionError> {
        // Exactly 16 digits: `from_str_radix` alone would accept "+1" or short forms, and a
        // version must compare equal to the one we sent as a string.
        if s.len() != EPOCH_HEX_LEN || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(VersionError::BadEpoch);
        }
        u64::from_str_radix(s, 16)
            .map(Epoch)
            .map_err(|_| VersionError::BadEpoch)
    }
}

/// A position in a topic's history: publication `offset` of history `epoch`.
///
/// Offsets start at 1; offset 0 means "before the first publication".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version {
    /// The history this offset belongs to.
    pub epoch: Epoch,
    /// The publication's offset within the epoch.
    pub offset: u64,
}

impl Version {
    /// The version at `offset` of `epoch`.
    pub const fn new(epoch: Epoch, offset: u64) -> Version {
        Version { epoch, offset }
    }

    /// The wire form in a stack buffer, for encoders that must not allocate.
    pub fn to_buf(self) -> VersionBuf {
        let mut buf = VersionBuf {
            bytes: [0; MAX_VERSION_LEN],
            len: 0,
        };
        let mut hex = [0u8; EPOCH_HEX_LEN];
        self.epoch.write_hex(&mut hex);
        buf.bytes[..EPOCH_HEX_LEN].copy_from_slice(&hex);
        buf.bytes[EPOCH_HEX_LEN] = b':';
        let mut itoa = itoa::Buffer::new();
        let digits = itoa.format(self.offset).as_bytes();
        let end = EPOCH_HEX_LEN + 1 + digits.len();
        buf.bytes[EPOCH_HEX_LEN + 1..end].copy_from_slice(digits);
        buf.len = end;
        buf
    }

    /// The strong HTTP entity tag of this version: the version string in double quotes.
    pub fn etag(self) -> String {
        format!("\"{self}\"")
    }

    /// Whether an `If-Match` header value admits this (current) version.
    ///
    /// RFC 9110 §13.1.1: `*` matches any current representation; otherwise the header is a
    /// comma-separated list of entity tags compared with the *strong* comparison, so a weak
    /// tag (`W/"..."`) never matches. A bare, unquoted version is accepted too, for clients
    /// that send the version they read from a message body.
    pub fn matches_if_match(self, header: &str) -> bool {
        let header = header.trim();
        if header == "*" {
            return true;
        }
        header.split(',').map(str::trim).any(|tag| {
            let bare = tag
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .unwrap_or(tag);
            !tag.starts_with("W/") && bare.parse::<Version>() == Ok(self)
        })
    }
}

/// A version's wire form held on the stack (see [`Version::to_buf`]).
#[derive(Clone, Copy)]
pub struct VersionBuf {
    bytes: [u8; MAX_VERSION_LEN],
    len: usize,
}

impl VersionBuf {
    /// The version string's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The version string.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits, ':' and decimal digits are ever written.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl fmt::Debug for VersionBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.to_buf().as_str())
    }
}

/// Why a version string was refused; sent to the client as an `error` message (the
/// connection stays up) or as an HTTP 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// No `:` between epoch and offset.
    #[error("invalid version: expected \"<16 hex digits>:<offset>\"")]
    MissingSeparator,
    /// The part before `:` is not 16 hex digits.
    #[error("invalid version: the epoch must be 16 hex digits")]
    BadEpoch,
    /// The part after `:` is not a decimal u64.
    #[error("invalid version: the offset must be a decimal integer")]
    BadOffset,
}

impl VersionError {
    /// The stable error code sent to the client.
    pub fn code(&self) -> &'static str {
        match self {
            VersionError::MissingSeparator | VersionError::BadEpoch | VersionError::BadOffset => {
                "invalid_version"
            }
        }
    }
}

impl FromStr for Version {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Version, VersionError> {
        let (epoch, offset) = s.split_once(':').ok_or(VersionError::MissingSeparator)?;
        let epoch = epoch.parse()?;
        // `u64::from_str` accepts a leading '+'; a version has one spelling only.
        if offset.is_empty() || offset.len() > 20 || !offset.bytes().all(|b| b.is_ascii_digit()) {
            return Err(VersionError::BadOffset);
        }
        let offset = offset.parse().map_err(|_| VersionError::BadOffset)?;
        Ok(Version { epoch, offset })
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.to_buf().as_str())
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Version, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Version;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a version string \"<16 hex digits>:<offset>\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Version, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let v = Version::new(Epoch::from_u64(0x9f86_d081_884c_7d65), 42);
        assert_eq!(v.to_string(), "9f86d081884c7d65:42");
        assert_eq!("9f86d081884c7d65:42".parse(), Ok(v));
        assert_eq!("9F86D081884C7D65:42".parse(), Ok(v));
        let zero = Version::new(Epoch::from_u64(1), 0);
        assert_eq!(zero.to_string(), "0000000000000001:0");
        let max = Version::new(Epoch::from_u64(u64::MAX), u64::MAX);
        assert_eq!(max.to_string().len(), MAX_VERSION_LEN);
        assert_eq!(max.to_string().parse(), Ok(max));
    }

    #[test]
    fn parse_errors_are_typed() {
        let cases = [
            ("", VersionError::MissingSeparator),
            ("9f86d081884c7d65", VersionError::MissingSeparator),
            ("9f86:1", VersionError::BadEpoch),
            ("9f86d081884c7d6g:1", VersionError::BadEpoch),
            ("+f86d081884c7d65:1", VersionError::BadEpoch),
            ("9f86d081884c7d650:1", VersionError::BadEpoch),
            ("9f86d081884c7d65:", VersionError::BadOffset),
            ("9f86d081884c7d65:+1", VersionError::BadOffset),
            ("9f86d081884c7d65:-1", VersionError::BadOffset),
            ("9f86d081884c7d65:1:2", VersionError::BadOffset),
            (
                "9f86d081884c7d65:18446744073709551616",
                VersionError::BadOffset,
            ),
            ("9f86d081884c7d65: 1", VersionError::BadOffset),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<Version>(), Err(want), "{text:?}");
            assert_eq!(want.code(), "invalid_version");
        }
    }

    #[test]
    fn serde_uses_the_string_form() {
        let v = Version::new(Epoch::from_u64(0xab), 7);
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, r#""00000000000000ab:7""#);
        assert_eq!(serde_json::from_str::<Version>(&json).unwrap(), v);
        assert!(serde_json::from_str::<Version>("7").is_err());
        assert!(serde_json::from_str::<Version>(r#""ab:7""#).is_err());
    }

    #[test]
    fn random_epochs_differ() {
        assert_ne!(Epoch::random(), Epoch::random());
        let e = Epoch::random();
        assert_eq!(e.to_string().parse(), Ok(e));
    }

    #[test]
    fn if_match() {
        let v = Version::new(Epoch::from_u64(0xab), 7);
        assert_eq!(v.etag(), r#""00000000000000ab:7""#);
        assert!(v.matches_if_match(&v.etag()));
        assert!(v.matches_if_match("*"));
        assert!(v.matches_if_match("00000000000000ab:7"));
        assert!(v.matches_if_match(r#""00000000000000ab:6", "00000000000000ab:7""#));
        assert!(!v.matches_if_match(r#""00000000000000ab:6""#));
        assert!(!v.matches_if_match(r#"W/"00000000000000ab:7""#));
        assert!(!v.matches_if_match(r#""00000000000000ac:7""#));
        assert!(!v.matches_if_match(""));
        assert!(!v.matches_if_match("garbage"));
    }

    proptest::proptest! {
        #[test]
        fn any_version_round_trips(epoch in proptest::prelude::any::<u64>(), offset in proptest::prelude::any::<u64>()) {
            let v = Version::new(Epoch::from_u64(epoch), offset);
            proptest::prop_assert_eq!(v.to_string().parse::<Version>(), Ok(v));
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,48}") {
            if let Ok(v) = text.parse::<Version>() {
                // Anything accepted is the canonical spelling up to hex case.
                proptest::prop_assert_eq!(v.to_string(), text.to_ascii_lowercase());
            }
        }
    }
}
