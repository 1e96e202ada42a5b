//! Unit-test fixtures: signing keys and a token builder. The PEM files in `core/src/keys/testdata/` were
//! generated for these tests only (`openssl genpkey`) and are trusted by nothing else.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;

use crate::identity::TokenPolicy;

pub const NOW: u64 = 1_800_000_000;

/// A small xorshift generator for the randomised tests: reproducible, without a dependency.
pub struct Xorshift(pub u64);

impl Xorshift {
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const AUDIENCE: &str = "oci-connector";
pub const RSA_KID: &str = "rsa-1";
pub const EC_KID: &str = "ec-1";
pub const EC384_KID: &str = "ec384-1";

const RSA_PEM: &[u8] = include_bytes!("../../core/src/keys/testdata/rsa.pem");
const EC_PEM: &[u8] = include_bytes!("../../core/src/keys/testdata/ec.pem");
const EC384_PEM: &[u8] = include_bytes!("../../core/src/keys/testdata/ec384.pem");

fn encoding_key(kid: &str) -> (EncodingKey, Algorithm) {
    if kid == EC_KID {
        (EncodingKey::from_ec_pem(EC_PEM).unwrap(), Algorithm::ES256)
    } else if kid == EC384_KID {
        (EncodingKey::from_ec_pem(EC384_PEM).unwrap(), Algorithm::ES384)
    } else {
        (EncodingKey::from_rsa_pem(RSA_PEM).unwrap(), Algorithm::RS256)
    }
}

/// The JWKS document a cluster would publish for the three test keys.
pub fn jwks() -> Value {
    let keys: Vec<Value> = [RSA_KID, EC_KID, EC384_KID]
        .iter()
        .map(|kid| {
            let (key, alg) = encoding_key(kid);
            let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
            jwk.common.key_id = Some((*kid).to_string());
            serde_json::to_value(jwk).unwrap()
        })
        .collect();
    serde_json::json!({ "keys": keys })
}

pub fn policy() -> TokenPolicy {
    policy_with(jwks())
}

/// The policy for another key set (e.g. the test keys with other `alg`s).
pub fn policy_with(jwks: Value) -> TokenPolicy {
    let doc = serde_json::json!({
        "identity": {"issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": jwks},
        "connectors": [{"namespace": "n", "name": "c", "address": "http://h", "cluster": "c",
                        "credential": {"username": "u", "passwordEnv": "P"}}]
    });
    crate::config::compile(doc.to_string().as_bytes(), &|_| Some("p".into()))
        .map_err(|e| format!("{e:?}"))
        .unwrap()
        .policy
}

/// Signs `claims` with the key `kid` names (RSA unless it is the EC kid).
pub fn sign(kid: &str, alg: Algorithm, claims: &Value) -> String {
    sign_with_kid_of(kid, kid, alg, claims)
}

/// Signs with `signing_kid`'s key but puts `header_kid` in the header.
pub fn sign_with_kid_of(signing_kid: &str, header_kid: &str, alg: Algorithm, claims: &Value) -> String {
    let (key, _) = encoding_key(signing_kid);
    let mut header = Header::new(alg);
    header.kid = Some(header_kid.to_string());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

pub fn unsigned(claims: &Value) -> String {
    let h = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","typ":"JWT","kid":"{RSA_KID}"}}"#));
    let c = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{h}.{c}.")
}

/// Flips one character of the signature.
pub fn tamper(token: &str) -> String {
    let mut t = token.to_string();
    let last = t.pop().unwrap();
    t.push(if last == 'A' { 'B' } else { 'A' });
    t
}

/// The classic confusion attack: HS256 keyed with the RSA public key material.
pub fn hs256_token(kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(RSA_PEM)).unwrap()
}
