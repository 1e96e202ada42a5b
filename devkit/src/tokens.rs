//! Owns the token minter: signing keys generated at run time with the `openssl` CLI, the JWKS
//! that the filter is configured with, and Kubernetes-ServiceAccount-shaped JWTs, including every
//! malformed variant the refusal tests need (expired, not yet valid, wrong audience or issuer,
//! unpublished key, unknown kid, tampered signature, `alg: none`).

use crate::{Result, procs};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// What a Kubernetes API server puts in `iss` for in-cluster tokens.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The audience clients request for the connector (`kubectl create token --audience oci-connector`).
pub const AUDIENCE: &str = "oci-connector";

/// Which signing key a token uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChoice {
    /// RS256, published in the JWKS as kid `rsa-1`.
    Rsa,
    /// ES256, published in the JWKS as kid `ec-1`.
    Ec,
    /// ES384 (P-384), published in the JWKS as kid `ec384-1`.
    Ec384,
    /// RS256 key that is NOT in the JWKS (a foreign signer); its own kid is `rogue-1`.
    Unpublished,
}

struct SigningKey {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Jwk,
}

pub struct Minter {
    rsa: SigningKey,
    ec: SigningKey,
    ec384: SigningKey,
    rogue: SigningKey,
    /// Every token handed out, so tests can scan logs and dumps for all of them.
    issued: Mutex<Vec<String>>,
}

impl Minter {
    /// Generates the keys as PKCS#8 PEM files in `dir`.
    pub fn new(dir: &Path) -> Result<Self> {
        Ok(Self {
            rsa: signing_key(dir, "rsa-1", Algorithm::RS256)?,
            ec: signing_key(dir, "ec-1", Algorithm::ES256)?,
            ec384: signing_key(dir, "ec384-1", Algorithm::ES384)?,
            rogue: signing_key(dir, "rogue-1", Algorithm::RS256)?,
            issued: Mutex::new(Vec::new()),
        })
    }

    /// The published keys (RSA, P-256 and P-384), as the `jwks` document of the filter
    /// configuration.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [
            serde_json::to_value(&self.rsa.jwk).unwrap_or(Value::Null),
            serde_json::to_value(&self.ec.jwk).unwrap_or(Value::Null),
            serde_json::to_value(&self.ec384.jwk).unwrap_or(Value::Null),
        ]})
    }

    /// Starts a token for `system:serviceaccount:<namespace>:<name>`, valid for one hour.
    pub fn token(&self, namespace: &str, service_account: &str) -> TokenBuilder<'_> {
        TokenBuilder::new(self, namespace, service_account)
    }

    /// A valid token for the service account, RS256.
    pub fn valid(&self, namespace: &str, service_account: &str) -> Result<String> {
        self.token(namespace, service_account).mint()
    }

    /// All tokens minted so far.
    pub fn issued(&self) -> Vec<String> {
        self.issued.lock().map(|v| v.clone()).unwrap_or_default()
    }

    fn key(&self, k: KeyChoice) -> &SigningKey {
        match k {
            KeyChoice::Rsa => &self.rsa,
            KeyChoice::Ec => &self.ec,
            KeyChoice::Ec384 => &self.ec384,
            KeyChoice::Unpublished => &self.rogue,
        }
    }

    fn remember(&self, token: &str) {
        if let Ok(mut v) = self.issued.lock() {
            v.push(token.to_string());
        }
    }
}

fn signing_key(dir: &Path, kid: &str, alg: Algorithm) -> Result<SigningKey> {
    let pem_path = dir.join(format!("{kid}.pem"));
    let mut cmd = Command::new("openssl");
    cmd.arg("genpkey");
    match alg {
        Algorithm::ES256 => cmd.args(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
        Algorithm::ES384 => cmd.args(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]),
        _ => cmd.args(["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
    };
    cmd.arg("-out").arg(&pem_path);
    procs::run(cmd, None)?.ok()?;
    let pem = std::fs::read(&pem_path).map_err(|e| format!("read {}: {e}", pem_path.display()))?;
    let key = match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    }
    .map_err(|e| format!("load {} as {alg:?}: {e}", pem_path.display()))?;
    let mut jwk = Jwk::from_encoding_key(&key, alg).map_err(|e| format!("JWK for {kid}: {e}"))?;
    jwk.common.key_id = Some(kid.to_string());
    Ok(SigningKey {
        kid: kid.into(),
        alg,
        key,
        jwk,
    })
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A token under construction; every claim and header field can be overridden.
pub struct TokenBuilder<'m> {
    minter: &'m Minter,
    claims: serde_json::Map<String, Value>,
    key: KeyChoice,
    kid: Option<Option<String>>,
    tamper: bool,
    alg_none: bool,
}

impl<'m> TokenBuilder<'m> {
    fn new(minter: &'m Minter, namespace: &str, sa: &str) -> Self {
        let t = now();
        let uid = crate::random_hex(16).unwrap_or_else(|_| "0".repeat(32));
        let uid = format!(
            "{}-{}-{}-{}-{}",
            &uid[0..8],
            &uid[8..12],
            &uid[12..16],
            &uid[16..20],
            &uid[20..32]
        );
        let claims = json!({
            "iss": ISSUER,
            "aud": [AUDIENCE],
            "exp": t + 3600,
            "nbf": t,
            "iat": t,
            "sub": format!("system:serviceaccount:{namespace}:{sa}"),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": { "name": sa, "uid": uid },
            },
        });
        let Value::Object(claims) = claims else {
            unreachable!("json! object")
        };
        Self {
            minter,
            claims,
            key: KeyChoice::Rsa,
            kid: None,
            tamper: false,
            alg_none: false,
        }
    }

    /// Sets or replaces any claim.
    pub fn claim(mut self, name: &str, value: Value) -> Self {
        self.claims.insert(name.into(), value);
        self
    }

    /// Removes a claim.
    pub fn without(mut self, name: &str) -> Self {
        self.claims.remove(name);
        self
    }

    /// Expired `secs` seconds ago (issued an hour before that).
    pub fn expired_since(self, secs: i64) -> Self {
        let t = now();
        self.claim("exp", json!(t - secs))
            .claim("iat", json!(t - secs - 3600))
            .claim("nbf", json!(t - secs - 3600))
    }

    /// Not valid before `secs` seconds from now.
    pub fn not_before_in(self, secs: i64) -> Self {
        let t = now();
        self.claim("nbf", json!(t + secs)).claim("iat", json!(t + secs))
    }

    pub fn audience(self, aud: &[&str]) -> Self {
        self.claim("aud", json!(aud))
    }

    pub fn issuer(self, iss: &str) -> Self {
        self.claim("iss", json!(iss))
    }

    pub fn key(mut self, k: KeyChoice) -> Self {
        self.key = k;
        self
    }

    /// Overrides the header's `kid` (None: no kid at all).
    pub fn kid(mut self, kid: Option<&str>) -> Self {
        self.kid = Some(kid.map(str::to_string));
        self
    }

    /// Flips one character in the middle of the signature (still valid base64url).
    pub fn tampered(mut self) -> Self {
        self.tamper = true;
        self
    }

    /// An unsigned token: header `{"alg":"none","typ":"JWT","kid":...}` and an empty signature.
    pub fn alg_none(mut self) -> Self {
        self.alg_none = true;
        self
    }

    pub fn mint(self) -> Result<String> {
        let sk = self.minter.key(self.key);
        let kid = self.kid.clone().unwrap_or_else(|| Some(sk.kid.clone()));
        let claims = Value::Object(self.claims.clone());
        let token = if self.alg_none {
            let mut header = json!({ "alg": "none", "typ": "JWT" });
            if let Some(k) = &kid {
                header["kid"] = json!(k);
            }
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            )
        } else {
            let mut header = Header::new(sk.alg);
            header.kid = kid;
            let t = jsonwebtoken::encode(&header, &claims, &sk.key).map_err(|e| format!("sign token: {e}"))?;
            if self.tamper { tamper_signature(&t) } else { t }
        };
        self.minter.remember(&token);
        Ok(token)
    }
}

/// Changes one base64url character in the middle of the signature to another, so the token stays
/// well-formed and only the signature check can catch it.
fn tamper_signature(token: &str) -> String {
    let Some(dot) = token.rfind('.') else {
        return token.to_string();
    };
    let mut bytes = token.as_bytes().to_vec();
    let i = dot + 1 + (bytes.len() - dot - 1) / 2;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap_or_else(|_| token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, decode, jwk::JwkSet};

    fn verify(m: &Minter, token: &str) -> std::result::Result<Value, String> {
        let set: JwkSet = serde_json::from_value(m.jwks()).map_err(|e| e.to_string())?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        let kid = header.kid.ok_or("no kid")?;
        let jwk = set.find(&kid).ok_or("unknown kid")?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        let mut v = Validation::new(header.alg);
        v.set_audience(&[AUDIENCE]);
        v.set_issuer(&[ISSUER]);
        // jsonwebtoken leaves nbf unchecked unless asked.
        v.validate_nbf = true;
        decode::<Value>(token, &key, &v)
            .map(|d| d.claims)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn minted_tokens_verify_against_the_jwks_and_variants_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let m = Minter::new(dir.path()).unwrap();
        let jwks = m.jwks();
        assert_eq!(jwks["keys"][0]["kid"], "rsa-1");
        assert_eq!(jwks["keys"][0]["alg"], "RS256");
        assert_eq!(jwks["keys"][1]["kid"], "ec-1");
        assert_eq!(jwks["keys"][1]["alg"], "ES256");
        assert_eq!(jwks["keys"][2]["kid"], "ec384-1");
        assert_eq!(jwks["keys"][2]["alg"], "ES384");
        assert_eq!(jwks["keys"][2]["crv"], "P-384");

        let claims = verify(&m, &m.valid("demo", "default").unwrap()).unwrap();
        assert_eq!(claims["sub"], "system:serviceaccount:demo:default");
        assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], "default");
        verify(&m, &m.token("demo", "default").key(KeyChoice::Ec).mint().unwrap()).unwrap();
        verify(&m, &m.token("demo", "default").key(KeyChoice::Ec384).mint().unwrap()).unwrap();

        let bad = [
            m.token("demo", "x").expired_since(600).mint().unwrap(),
            m.token("demo", "x").not_before_in(600).mint().unwrap(),
            m.token("demo", "x").audience(&["other"]).mint().unwrap(),
            m.token("demo", "x").issuer("https://evil").mint().unwrap(),
            m.token("demo", "x").tampered().mint().unwrap(),
            m.token("demo", "x")
                .key(KeyChoice::Unpublished)
                .kid(Some("rsa-1"))
                .mint()
                .unwrap(),
            m.token("demo", "x").kid(Some("nope")).mint().unwrap(),
        ];
        for t in &bad {
            assert!(verify(&m, t).is_err(), "should not verify: {t}");
        }
        let none = m.token("demo", "x").alg_none().mint().unwrap();
        assert!(none.ends_with('.'));
        let head: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(none.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(head["alg"], "none");
        assert_eq!(m.issued().len(), 3 + bad.len() + 1);
    }
}
