//! Signing keys made in the test (no files shipped, no `openssl`): one per algorithm
//! family, with their public halves as PEM and JWK, and tokens signed with them.

use std::sync::OnceLock;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;

/// An HMAC secret of the length the gateway requires (32 bytes at least).
pub const HMAC_SECRET: &str = "test-secret-0123456789abcdef-0123456789";

/// A private key with its public PEM.
pub struct TestKey {
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub public_pem: String,
    /// The raw public key, for Ed25519 (whose JWK `jsonwebtoken` cannot derive).
    pub ed_public: Option<[u8; 32]>,
}

impl TestKey {
    /// The public key as a JWK with `kid`.
    pub fn jwk(&self, kid: &str) -> Jwk {
        if let Some(x) = self.ed_public {
            use base64::Engine as _;
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(x);
            let jwk = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid});
            return serde_json::from_value(jwk).expect("ed25519 jwk");
        }
        let mut jwk = Jwk::from_encoding_key(&self.encoding, self.alg).expect("jwk");
        jwk.common.key_id = Some(kid.to_string());
        jwk
    }

    /// Signs `claims` with `kid` in the header (if any).
    pub fn sign(&self, claims: &Value, kid: Option<&str>) -> String {
        sign_with(&self.encoding, self.alg, claims, kid)
    }
}

/// Signs `claims` with `key` as `alg`.
pub fn sign_with(key: &EncodingKey, alg: Algorithm, claims: &Value, kid: Option<&str>) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

/// An HS256 token over `claims`, signed with [`HMAC_SECRET`].
pub fn hs256(claims: &Value) -> String {
    sign_with(
        &EncodingKey::from_secret(HMAC_SECRET.as_bytes()).expect("hmac key"),
        Algorithm::HS256,
        claims,
        None,
    )
}

/// A JWKS document of `keys`.
pub fn jwks(keys: &[Jwk]) -> String {
    serde_json::to_string(&JwkSet {
        keys: keys.to_vec(),
    })
    .expect("jwks")
}

/// One RSA key per test binary (generating one takes a moment).
pub fn rsa_key(alg: Algorithm) -> TestKey {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    static KEY: OnceLock<(String, String)> = OnceLock::new();
    let (private, public) = KEY.get_or_init(|| {
        let key = rsa::PrivateKey::new(&mut rand::rng(), 2048).expect("rsa key");
        let private = key.to_pkcs8_pem(LineEnding::LF).expect("pem").to_string();
        let public = key
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem");
        (private, public)
    });
    TestKey {
        alg,
        encoding: EncodingKey::from_rsa_pem(private.as_bytes()).expect("rsa encoding key"),
        public_pem: public.clone(),
        ed_public: None,
    }
}

/// A fresh P-256 key (ES256).
pub fn p256_key() -> TestKey {
    use p256::elliptic_curve::Generate;
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let key = p256::SecretKey::generate_from_rng(&mut rand::rng());
    let private = key.to_pkcs8_pem(LineEnding::LF).expect("pem");
    let public = key
        .public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("pem");
    TestKey {
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_pem(private.as_bytes()).expect("ec encoding key"),
        public_pem: public,
        ed_public: None,
    }
}

/// A fresh P-384 key (ES384).
pub fn p384_key() -> TestKey {
    use p384::elliptic_curve::Generate;
    use p384::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let key = p384::SecretKey::generate_from_rng(&mut rand::rng());
    let private = key.to_pkcs8_pem(LineEnding::LF).expect("pem");
    let public = key
        .public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("pem");
    TestKey {
        alg: Algorithm::ES384,
        encoding: EncodingKey::from_ec_pem(private.as_bytes()).expect("ec encoding key"),
        public_pem: public,
        ed_public: None,
    }
}

/// A fresh Ed25519 key (EdDSA).
pub fn ed25519_key() -> TestKey {
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding};
    let key = ed25519_dalek::SigningKey::generate(&mut rand::rng());
    let private = key.to_pkcs8_pem(LineEnding::LF).expect("pem");
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("pem");
    TestKey {
        alg: Algorithm::EdDSA,
        encoding: EncodingKey::from_ed_pem(private.as_bytes()).expect("ed encoding key"),
        public_pem: public,
        ed_public: Some(key.verifying_key().to_bytes()),
    }
}

/// Now, in Unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A file in a fresh temporary directory of this test process.
pub fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tidings-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write temp file");
    path
}
