//! The `identity` section's keys: each JWK whose shape `connector_core` accepted is built into
//! a verification key here (the modulus and exponent checks, an EC point on its curve, an
//! ES256 key's table): what only the filter, which links the crypto, can decide. A key the
//! running configuration already built under the same `kid` is reused.

use std::collections::HashMap;

use connector_core::config::{IdentityConfig, check_jwk_shape};
use connector_core::keys::build_key_reusing;

use super::*;

/// `earlier`: the running configuration's keys; a `kid` naming the same key again is not rebuilt.
pub(super) fn compile_policy(
    identity: &IdentityConfig,
    earlier: Option<&TokenPolicy>,
    found: &mut Vec<ConfigError>,
) -> TokenPolicy {
    let mut keys = HashMap::new();
    for (i, jwk) in identity.jwks.keys.iter().enumerate() {
        let path = format!("identity.jwks.keys[{i}]");
        // A badly shaped key is already reported by the parser.
        let Ok(material) = check_jwk_shape(jwk, &path) else {
            continue;
        };
        let running = earlier.and_then(|p| p.keys.get(&jwk.kid));
        match build_key_reusing(&material, running) {
            Ok(key) => {
                keys.insert(jwk.kid.clone(), key);
            }
            Err(e) => found.push(ConfigError::new(path, e)),
        }
    }
    TokenPolicy {
        keys,
        issuers: identity.issuers.iter().cloned().collect(),
        audiences: identity.audiences.iter().cloned().collect(),
        clock_skew: identity.clock_skew(),
        max_lifetime: identity.max_token_lifetime(),
    }
}
