//! The `identity` section: issuers, audiences, clock skew, token cache, and the JWKS keys,
//! parsed once per configuration into verification keys.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use serde_json::Value;

use super::*;

pub(super) fn compile_identity(w: &mut Walk<'_>, v: Option<&Value>) -> (Option<TokenPolicy>, usize) {
    let known = [
        "issuers",
        "audiences",
        "jwks",
        "clockSkewSeconds",
        "tokenCacheSize",
        "maxTokenLifetimeSeconds",
    ];
    let Some(m) = w.object(v, "identity", &known, true) else {
        return (None, 0);
    };
    let issuers = w.strings(m, "identity", "issuers", true);
    let audiences = w.strings(m, "identity", "audiences", true);
    let clock_skew = w.number(m, "identity", "clockSkewSeconds", (0, MAX_CLOCK_SKEW), MAX_CLOCK_SKEW);
    let max_lifetime = w.number(
        m,
        "identity",
        "maxTokenLifetimeSeconds",
        (60, 366 * 86_400),
        DEFAULT_MAX_TOKEN_LIFETIME,
    );
    let cache = w.number(
        m,
        "identity",
        "tokenCacheSize",
        (1, 1_000_000),
        DEFAULT_TOKEN_CACHE_SIZE,
    );
    let mut keys = HashMap::new();
    if let Some(jwks) = w.object(m.get("jwks"), "identity.jwks", &["keys"], true) {
        match jwks.get("keys") {
            // Allowed only for a controller-managed configuration without connectors (checked
            // in `compile`, which knows both): a proxy whose controller has not written its
            // configuration yet refuses every token with an OCI error instead of failing to load.
            Some(Value::Array(items)) if items.is_empty() => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let path = format!("identity.jwks.keys[{i}]");
                    if let Some((kid, key)) = compile_jwk(w, item, &path)
                        && keys.insert(kid.clone(), key).is_some()
                    {
                        w.err(format!("{path}.kid"), format!("key id {kid:?} appears twice"));
                    }
                }
            }
            _ => w.err(
                "identity.jwks.keys",
                "is required: expected a non-empty list of JWK public keys (the cluster's /openid/v1/jwks)",
            ),
        }
    }
    let policy = TokenPolicy {
        keys,
        issuers: issuers.into_iter().collect(),
        audiences: audiences.into_iter().collect(),
        clock_skew,
        max_lifetime,
    };
    (Some(policy), usize::try_from(cache).unwrap_or(usize::MAX))
}

/// Checks one JWK exactly as [`compile`] checks each of `identity.jwks.keys`: `Err` lists why
/// the filter could not verify tokens with it (paths start at `path`). The controller uses it
/// to skip a cluster's unusable keys (ES512, Ed25519, short RSA) instead of refusing them all.
pub fn check_jwk(v: &Value, path: &str) -> Result<(), Vec<ConfigError>> {
    let mut errors = vec![];
    let mut w = Walk { errors: &mut errors };
    let compiled = compile_jwk(&mut w, v, path);
    match (compiled, errors.is_empty()) {
        (Some(_), true) => Ok(()),
        (_, false) => Err(errors),
        (None, true) => Err(vec![ConfigError {
            path: path.to_string(),
            message: "not a usable key".into(),
        }]),
    }
}

pub(super) fn b64url(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

/// A JWK public key. The algorithm is fixed per key: the JWK's `alg`, or the one its type implies.
pub(super) fn compile_jwk(w: &mut Walk<'_>, v: &Value, path: &str) -> Option<(String, VerifyKey)> {
    let Value::Object(m) = v else {
        w.err(path, "expected a JWK object");
        return None;
    };
    let kid = w.string(m, path, "kid", true);
    let kty = w.string(m, path, "kty", true);
    let alg = w.string(m, path, "alg", false);
    if let Some(u) = w.string(m, path, "use", false)
        && u != "sig"
    {
        w.err(
            format!("{path}.use"),
            "expected \"sig\": only signing keys verify tokens",
        );
    }
    let key = match kty? {
        "RSA" => {
            let n = w.string(m, path, "n", true);
            let e = w.string(m, path, "e", true);
            let algorithm = match alg.unwrap_or("RS256") {
                "RS256" => Algorithm::RS256,
                "RS384" => Algorithm::RS384,
                "RS512" => Algorithm::RS512,
                "PS256" => Algorithm::PS256,
                "PS384" => Algorithm::PS384,
                "PS512" => Algorithm::PS512,
                other => {
                    w.err(format!("{path}.alg"), format!("{other:?} is not an RSA signature algorithm: expected RS256, RS384, RS512, PS256, PS384 or PS512"));
                    return None;
                }
            };
            let (n, e) = (n?, e?);
            let Some(n) = b64url(n).filter(|n| n.len() >= 256) else {
                w.err(
                    format!("{path}.n"),
                    "expected the base64url modulus of an RSA key of at least 2048 bits",
                );
                return None;
            };
            let Some(e) = b64url(e).filter(|e| !e.is_empty() && e.len() <= 8) else {
                w.err(format!("{path}.e"), "expected the base64url RSA public exponent");
                return None;
            };
            match VerifyKey::rsa(algorithm, &n, &e) {
                Ok(key) => key,
                Err(err) => {
                    w.err(path, err);
                    return None;
                }
            }
        }
        "EC" => {
            let crv = w.string(m, path, "crv", true);
            let x = w.string(m, path, "x", true);
            let y = w.string(m, path, "y", true);
            let (algorithm, size) = match crv? {
                "P-256" => (Algorithm::ES256, 32),
                "P-384" => (Algorithm::ES384, 48),
                other => {
                    w.err(
                        format!("{path}.crv"),
                        format!("{other:?} is not supported: expected P-256 or P-384"),
                    );
                    return None;
                }
            };
            if let Some(a) = alg
                && a != crate::identity::algorithm_name(algorithm)
            {
                w.err(
                    format!("{path}.alg"),
                    format!(
                        "{a:?} does not fit curve {}: expected {}",
                        crv.unwrap_or(""),
                        crate::identity::algorithm_name(algorithm)
                    ),
                );
                return None;
            }
            let (x, y) = (x?, y?);
            let mut coords = vec![];
            for (name, coord) in [("x", x), ("y", y)] {
                match b64url(coord).filter(|c| c.len() == size) {
                    Some(c) => coords.push(c),
                    None => {
                        w.err(
                            format!("{path}.{name}"),
                            format!("expected a base64url {size}-byte coordinate"),
                        );
                        return None;
                    }
                }
            }
            let (Some(x), Some(y)) = (coords.first(), coords.get(1)) else {
                return None;
            };
            match VerifyKey::ec(algorithm, x, y) {
                Ok(key) => key,
                Err(err) => {
                    w.err(path, err);
                    return None;
                }
            }
        }
        other => {
            w.err(
                format!("{path}.kty"),
                format!("{other:?} is not supported: expected RSA or EC (symmetric keys are never accepted)"),
            );
            return None;
        }
    };
    Some((kid?.to_string(), key))
}
