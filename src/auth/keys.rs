//! API keys: stored as SHA-256 digests, matched in constant time.
//!
//! A presented key is hashed once and compared with every configured digest with
//! `subtle`'s constant-time equality, all of them every time, so neither the timing of a
//! comparison nor the position of a match tells an attacker anything about a key.

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::config::ApiKeyConfig;
use super::grants::{Grants, InvalidGrant};

/// One configured key.
#[derive(Debug)]
pub(crate) struct ApiKey {
    /// For logs.
    pub(crate) name: Box<str>,
    digest: [u8; 32],
}

/// Why an `[[auth.api_keys]]` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeyConfigError {
    /// `sha256` is not 64 hex digits.
    #[error("api_keys[{0}]: sha256 must be 64 hex digits (the SHA-256 of the key)")]
    Digest(usize),
    /// An entry of `publish` is neither a topic nor a pattern.
    #[error("api_keys[{index}]: publish: {entry:?} is neither a topic nor a pattern")]
    Grant {
        /// Which key.
        index: usize,
        /// The entry.
        entry: String,
    },
    /// Two entries with the same digest.
    #[error("api_keys[{0}]: the same key is configured twice")]
    Duplicate(usize),
}

/// The configured keys.
#[derive(Debug, Default)]
pub(crate) struct ApiKeys {
    keys: Vec<ApiKey>,
}

impl ApiKeys {
    /// Checks and loads `[[auth.api_keys]]`.
    pub(crate) fn from_config(config: &[ApiKeyConfig]) -> Result<ApiKeys, KeyConfigError> {
        let mut keys: Vec<ApiKey> = Vec::with_capacity(config.len());
        for (index, key) in config.iter().enumerate() {
            let digest = parse_hex_digest(&key.sha256).ok_or(KeyConfigError::Digest(index))?;
            if keys.iter().any(|k| k.digest == digest) {
                return Err(KeyConfigError::Duplicate(index));
            }
            Grants::parse(&key.publish)
                .map_err(|InvalidGrant(entry)| KeyConfigError::Grant { index, entry })?;
            let name = if key.name.is_empty() {
                format!("api_keys[{index}]")
            } else {
                key.name.clone()
            };
            keys.push(ApiKey {
                name: name.into(),
                digest,
            });
        }
        Ok(ApiKeys { keys })
    }

    /// The name of key `index`, for logs.
    pub(crate) fn name(&self, index: usize) -> &str {
        self.keys.get(index).map_or("", |k| &k.name)
    }

    /// The key at `index`.
    #[cfg(test)]
    fn get(&self, index: usize) -> Option<&ApiKey> {
        self.keys.get(index)
    }

    /// The index of the key whose digest is the SHA-256 of `presented`.
    pub(crate) fn find(&self, presented: &str) -> Option<usize> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Look at every key and pick without branching on secrets.
        let mut found = subtle::CtOption::new(0u32, 0u8.into());
        for (i, key) in self.keys.iter().enumerate() {
            let hit = key.digest.ct_eq(&digest);
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            let chosen = u32::conditional_select(&found.unwrap_or(0), &index, hit);
            found = subtle::CtOption::new(chosen, found.is_some() | hit);
        }
        Option::<u32>::from(found).map(|i| i as usize)
    }
}

/// 64 hex digits (either case) as 32 bytes.
fn parse_hex_digest(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.trim().as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// The hex SHA-256 of `key`, as `[[auth.api_keys]]` stores it.
#[cfg(test)]
pub(crate) fn digest_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(key: &str, publish: &[&str], admin: bool) -> ApiKeyConfig {
        ApiKeyConfig {
            name: String::new(),
            sha256: digest_hex(key),
            publish: publish.iter().map(|s| s.to_string()).collect(),
            admin,
        }
    }

    #[test]
    fn finds_by_digest() {
        let keys = ApiKeys::from_config(&[
            config("first", &["a:*"], false),
            config("second", &["b"], true),
        ])
        .unwrap();
        let second = keys.get(keys.find("second").unwrap()).unwrap();
        assert_eq!(&*second.name, "api_keys[1]");
        assert_eq!(keys.find("first"), Some(0));
        assert!(keys.find("third").is_none() && keys.find("").is_none());
    }

    #[test]
    fn config_refusals() {
        let mut bad = config("k", &[], false);
        bad.sha256 = "abc".into();
        assert_eq!(
            ApiKeys::from_config(&[bad]).unwrap_err(),
            KeyConfigError::Digest(0)
        );
        let mut upper = config("k", &[], false);
        upper.sha256 = upper.sha256.to_uppercase();
        assert!(ApiKeys::from_config(&[upper]).unwrap().find("k").is_some());
        let twice = [config("k", &[], false), config("k", &[], true)];
        assert_eq!(
            ApiKeys::from_config(&twice).unwrap_err(),
            KeyConfigError::Duplicate(1)
        );
        assert!(matches!(
            ApiKeys::from_config(&[config("k", &["a::b"], false)]),
            Err(KeyConfigError::Grant { index: 0, .. })
        ));
    }
}
