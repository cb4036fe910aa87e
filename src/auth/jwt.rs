//! JWT verification: keys bound to their algorithm family, and the claims checked against
//! a clock passed in.
//!
//! Signatures are verified by `jsonwebtoken`. The algorithms a key accepts are fixed when
//! the key is loaded: those of its own family (HMAC, RSA, EC, Ed25519), narrowed by the
//! configured `algorithms` and by a JWK's own `alg`. The token's header only picks among
//! them, so `alg: none` (which `jsonwebtoken` does not even parse) and an HS256 token
//! "signed" with an RSA public key as secret are both refused. Time claims are checked
//! here, not by the library, so that `now` is an argument and tests run on any clock.

use std::str::FromStr;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::AuthError;

/// The accepted algorithms: the configured list, or every algorithm when it is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Algorithms(Vec<Algorithm>);

impl Algorithms {
    /// Parses `algorithms` (`"HS256"`, `"EdDSA"`, ...); the error names the bad entry.
    pub(crate) fn parse(names: &[String]) -> Result<Algorithms, String> {
        names
            .iter()
            .map(|name| {
                Algorithm::from_str(name).map_err(|_| {
                    format!(
                        "algorithms: unknown algorithm {name:?} (HS256, HS384, HS512, RS256, \
                         RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Algorithms)
    }

    /// Whether `alg` is accepted at all.
    pub(crate) fn accepts(&self, alg: Algorithm) -> bool {
        self.0.is_empty() || self.0.contains(&alg)
    }

    /// The accepted algorithms of `family`.
    fn of_family(&self, family: AlgorithmFamily) -> Vec<Algorithm> {
        family
            .algorithms()
            .iter()
            .copied()
            .filter(|a| self.accepts(*a))
            .collect()
    }
}

/// A key that verifies signatures of its own algorithms only.
pub(crate) struct VerifyingKey {
    /// Its `kid`, for keys from a JWKS.
    pub(crate) kid: Option<Box<str>>,
    key: DecodingKey,
    /// Signature only: the algorithms this key accepts; no claim is checked by the library.
    validation: Validation,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key may be an HMAC secret: show only what identifies it.
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl VerifyingKey {
    fn new(
        kid: Option<Box<str>>,
        key: DecodingKey,
        algorithms: Vec<Algorithm>,
    ) -> Option<VerifyingKey> {
        if algorithms.is_empty() {
            return None;
        }
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;
        Some(VerifyingKey {
            kid,
            key,
            validation,
        })
    }

    /// An HS* key from a shared secret.
    pub(crate) fn from_secret(
        secret: &[u8],
        accepted: &Algorithms,
    ) -> Result<VerifyingKey, String> {
        let key = DecodingKey::from_secret(secret).map_err(|e| e.to_string())?;
        VerifyingKey::new(None, key, accepted.of_family(AlgorithmFamily::Hmac))
            .ok_or_else(|| "hmac_secret is set but algorithms lists no HS256/384/512".to_string())
    }

    /// A key from a PEM public key: RSA (PKCS#1 or SPKI), EC or Ed25519 (SPKI).
    pub(crate) fn from_pem(pem: &[u8], accepted: &Algorithms) -> Result<VerifyingKey, String> {
        let (key, family) = if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            (key, AlgorithmFamily::Rsa)
        } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            (key, AlgorithmFamily::Ec)
        } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            (key, AlgorithmFamily::Ed)
        } else {
            return Err("not a PEM RSA, EC or Ed25519 public key".to_string());
        };
        VerifyingKey::new(None, key, accepted.of_family(family))
            .ok_or_else(|| format!("a {family:?} key, but algorithms lists none of its family"))
    }

    /// A key from a JWK, or `None` for one that cannot verify signatures here: symmetric
    /// (`oct`: a published secret is no secret), for encryption, of an unknown type, or
    /// with no accepted algorithm.
    pub(crate) fn from_jwk(jwk: &Jwk, accepted: &Algorithms) -> Option<VerifyingKey> {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            return None;
        }
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
            AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
            AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
            // Symmetric, unknown and future key types.
            _ => return None,
        };
        let mut algorithms = accepted.of_family(family);
        // The curve fixes the one ECDSA algorithm (RFC 7518 §3.4).
        if let AlgorithmParameters::EllipticCurve(ec) = &jwk.algorithm {
            let alg = match ec.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                _ => return None,
            };
            algorithms.retain(|a| *a == alg);
        }
        // A JWK's own `alg` narrows it to that one (RFC 7517 §4.4).
        if let Some(alg) = &jwk.common.key_algorithm {
            let alg = Algorithm::from_str(&alg.to_string()).ok()?;
            algorithms.retain(|a| *a == alg);
        }
        let key = DecodingKey::from_jwk(jwk).ok()?;
        VerifyingKey::new(
            jwk.common.key_id.as_deref().map(Into::into),
            key,
            algorithms,
        )
    }

    /// Whether this key verifies `alg` signatures.
    pub(crate) fn accepts(&self, alg: Algorithm) -> bool {
        self.validation.algorithms.contains(&alg)
    }

    /// Verifies the signature of `token` and returns its claims, unchecked.
    pub(crate) fn verify(&self, token: &str) -> Result<Map<String, Value>, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        match jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => Err(match e.kind() {
                ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
                    AuthError::AlgorithmRefused
                }
                ErrorKind::InvalidToken
                | ErrorKind::Base64(_)
                | ErrorKind::Json(_)
                | ErrorKind::Utf8(_)
                | ErrorKind::InvalidClaimFormat(_) => AuthError::Malformed,
                // Signature failures, and key errors (a curve that does not match).
                _ => AuthError::BadSignature,
            }),
        }
    }
}

/// The keys of one source, looked up by `kid` and algorithm.
#[derive(Debug, Default)]
pub(crate) struct KeySet {
    keys: Vec<VerifyingKey>,
}

impl KeySet {
    /// A set of `keys`.
    pub(crate) fn new(keys: Vec<VerifyingKey>) -> KeySet {
        KeySet { keys }
    }

    /// How many keys it holds.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// The key for a token with `kid` and `alg`. A key without a `kid` (from a PEM file or
    /// a secret, or a JWK without one) serves any token of its algorithms; with a `kid`,
    /// only the key with that `kid` does. A token without `kid` may use the only key of a
    /// set whose keys all have one.
    pub(crate) fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&VerifyingKey> {
        let usable = |k: &&VerifyingKey| k.accepts(alg);
        if let Some(kid) = kid
            && let Some(key) = self
                .keys
                .iter()
                .filter(usable)
                .find(|k| k.kid.as_deref() == Some(kid))
        {
            return Some(key);
        }
        if let Some(key) = self.keys.iter().filter(usable).find(|k| k.kid.is_none()) {
            return Some(key);
        }
        match (kid, self.keys.as_slice()) {
            (None, [only]) if only.accepts(alg) => Some(only),
            _ => None,
        }
    }
}

/// The claims checks that do not depend on the key.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClaimRules {
    /// Seconds of skew allowed on `exp` and `nbf`.
    pub(crate) leeway: u64,
    /// The `aud` required, if any.
    pub(crate) audience: Option<Box<str>>,
}

/// What the checked time claims say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lifetime {
    /// When the token stops being accepted: `exp` plus leeway, in Unix seconds.
    pub(crate) expires: u64,
}

/// Checks `exp` (required), `nbf` and `aud` at `now` (Unix seconds).
pub(crate) fn check_claims(
    claims: &Map<String, Value>,
    now: u64,
    rules: &ClaimRules,
) -> Result<Lifetime, AuthError> {
    let exp = numeric_date(claims.get("exp")).ok_or(AuthError::BadClaim("exp"))?;
    let expires = exp.saturating_add(rules.leeway);
    // RFC 7519 §4.1.4: "the current date/time MUST be before the expiration date/time".
    if now >= expires {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = numeric_date(Some(nbf)).ok_or(AuthError::BadClaim("nbf"))?;
        // §4.1.5: "MUST be after or equal to the not-before date/time".
        if now.saturating_add(rules.leeway) < nbf {
            return Err(AuthError::NotYetValid);
        }
    }
    if let Some(audience) = &rules.audience {
        let ok = match claims.get("aud") {
            Some(Value::String(aud)) => aud == &**audience,
            Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(audience)),
            _ => false,
        };
        if !ok {
            return Err(AuthError::WrongAudience);
        }
    }
    Ok(Lifetime { expires })
}

/// A NumericDate (RFC 7519 §2): seconds since the epoch, possibly fractional (floored);
/// `None` for anything else, negative or absurd values included.
fn numeric_date(value: Option<&Value>) -> Option<u64> {
    let value = value?;
    if let Some(n) = value.as_u64() {
        return Some(n);
    }
    let f = value.as_f64()?;
    // Beyond 2^53 a float no longer counts seconds exactly.
    (f.is_finite() && (0.0..9.0e15).contains(&f)).then_some(f as u64)
}

/// The string claim `name`, if present and a string; `Err` if present and not a string.
pub(crate) fn string_claim<'a>(
    claims: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, AuthError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(AuthError::BadClaim(name)),
    }
}

/// A list claim of topics and patterns: an array of strings or one string. At most
/// `max` entries.
pub(crate) fn list_claim<'a>(
    claims: &'a Map<String, Value>,
    name: &str,
    max: usize,
) -> Result<Vec<&'a str>, ()> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.as_str()]),
        Some(Value::Array(items)) if items.len() <= max => {
            items.iter().map(|v| v.as_str().ok_or(())).collect()
        }
        Some(_) => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn time_claims() {
        let rules = ClaimRules {
            leeway: 30,
            audience: None,
        };
        let ok = check_claims(&claims(json!({"exp": 1000})), 1029, &rules).unwrap();
        assert_eq!(ok.expires, 1030);
        assert_eq!(
            check_claims(&claims(json!({"exp": 1000})), 1030, &rules),
            Err(AuthError::Expired)
        );
        assert_eq!(
            check_claims(&claims(json!({})), 0, &rules),
            Err(AuthError::BadClaim("exp"))
        );
        for bad in [json!("1000"), json!(-1), json!(1e300), json!(null)] {
            assert_eq!(
                check_claims(&claims(json!({"exp": bad})), 0, &rules),
                Err(AuthError::BadClaim("exp"))
            );
        }
        assert!(check_claims(&claims(json!({"exp": 1000.7})), 1029, &rules).is_ok());
        let nbf = claims(json!({"exp": 5000, "nbf": 2000}));
        assert_eq!(
            check_claims(&nbf, 1969, &rules),
            Err(AuthError::NotYetValid)
        );
        assert!(check_claims(&nbf, 1970, &rules).is_ok());
    }

    #[test]
    fn audience() {
        let rules = ClaimRules {
            leeway: 0,
            audience: Some("gw".into()),
        };
        for ok in [json!("gw"), json!(["x", "gw"])] {
            assert!(check_claims(&claims(json!({"exp": 10, "aud": ok})), 1, &rules).is_ok());
        }
        for bad in [json!("other"), json!(["x"]), json!(null), json!(5)] {
            assert_eq!(
                check_claims(&claims(json!({"exp": 10, "aud": bad})), 1, &rules),
                Err(AuthError::WrongAudience)
            );
        }
        assert_eq!(
            check_claims(&claims(json!({"exp": 10})), 1, &rules),
            Err(AuthError::WrongAudience)
        );
    }

    #[test]
    fn list_claims() {
        let c = claims(json!({"a": ["x", "y:*"], "b": "z", "c": [1], "d": {}}));
        assert_eq!(list_claim(&c, "a", 10), Ok(vec!["x", "y:*"]));
        assert_eq!(list_claim(&c, "b", 10), Ok(vec!["z"]));
        assert_eq!(list_claim(&c, "none", 10), Ok(vec![]));
        assert!(list_claim(&c, "c", 10).is_err() && list_claim(&c, "d", 10).is_err());
        assert!(list_claim(&c, "a", 1).is_err());
    }

    #[test]
    fn a_secret_key_only_serves_hmac() {
        let all = Algorithms::default();
        let key = VerifyingKey::from_secret(b"0123456789abcdef0123456789abcdef", &all).unwrap();
        assert!(key.accepts(Algorithm::HS256) && !key.accepts(Algorithm::RS256));
        let rs_only = Algorithms::parse(&["RS256".to_string()]).unwrap();
        assert!(VerifyingKey::from_secret(b"x", &rs_only).is_err());
        assert!(Algorithms::parse(&["none".to_string()]).is_err());
        let shown = format!("{key:?}");
        assert!(!shown.contains("0123456789"), "{shown}");
    }
}
