//! Verification keys: a JWK's checked material ([`KeyMaterial`]) built once per configuration
//! into what verifies a token's signature. Shared by the filter, which verifies with them, and
//! the controller, which builds each key of the cluster's JWKS the same way to leave out the
//! keys the filter could not use (instead of having the filter refuse the whole configuration).
//! Behind the `keys` feature: the webhook and the credential provider link no crypto.
//! RSA (v1.5 and PSS) is [`pkcs1`]'s, ES256 [`es256`]'s, ES384 RustCrypto's `p384`.

use crate::config::{Algorithm, ConfigError, IdentityConfig, KeyMaterial, check_jwk_shape};

pub mod es256;
pub mod pkcs1;

/// The few DER encodings a host's own check needs (a key's SubjectPublicKeyInfo, an ECDSA
/// signature): nested TLVs of unsigned integers, bit strings and fixed OIDs, built once per key
/// (or per ECDSA check); a DER crate would add more to the module than this does.
mod der {
    /// Tag, definite length, content (lengths up to 65,535 bytes: a 4096-bit key is 526).
    pub fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let len = content.len();
        let mut out = vec![tag];
        match len {
            0..=0x7f => out.push(len as u8),
            0x80..=0xff => out.extend_from_slice(&[0x81, len as u8]),
            _ => out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]),
        }
        out.extend_from_slice(content);
        out
    }

    /// A non-negative INTEGER from big-endian bytes: no leading zero bytes, one zero byte in
    /// front when the top bit is set (or for zero itself).
    pub fn uint(be: &[u8]) -> Vec<u8> {
        let digits: Vec<u8> = be.iter().copied().skip_while(|b| *b == 0).collect();
        let mut content = Vec::with_capacity(digits.len() + 1);
        if digits.first().is_none_or(|b| b & 0x80 != 0) {
            content.push(0);
        }
        content.extend_from_slice(&digits);
        tlv(0x02, &content)
    }

    /// The named curves' OBJECT IDENTIFIERs (RFC 5480), their content bytes.
    pub const PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    pub const SECP384R1: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

    /// DER SubjectPublicKeyInfo of the point `(x, y)` of `curve` (RFC 5480): `id-ecPublicKey`
    /// with the named curve, the uncompressed point as the bit string.
    pub fn ec_spki(curve: &[u8], x: &[u8], y: &[u8]) -> Vec<u8> {
        const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
        let algorithm = tlv(0x30, &[tlv(0x06, EC_PUBLIC_KEY), tlv(0x06, curve)].concat());
        let bits = tlv(0x03, &[&[0x00, 0x04][..], x, y].concat());
        tlv(0x30, &[algorithm, bits].concat())
    }

    /// A JWS ECDSA signature (`r || s`, `scalar` bytes each) as DER `SEQUENCE { INTEGER r,
    /// INTEGER s }`, what BoringSSL's ECDSA check reads; `None` unless it is `2 * scalar` bytes.
    pub fn ecdsa_signature(raw: &[u8], scalar: usize) -> Option<Vec<u8>> {
        if raw.len() != 2 * scalar {
            return None;
        }
        let (r, s) = raw.split_at(scalar);
        Some(tlv(0x30, &[uint(r), uint(s)].concat()))
    }
}

/// What a host needs to make a key's check itself ([`VerifyKey::host_check`]): the hash's name
/// (as Envoy's crypto utility names it), the key as DER SubjectPublicKeyInfo, and the signature
/// as the host reads it (ECDSA: DER `SEQUENCE { r, s }`, where a JWS has `r || s`).
pub struct HostArgs<'a> {
    pub hash: &'static str,
    pub key: &'a [u8],
    pub signature: std::borrow::Cow<'a, [u8]>,
}

/// A public key, parsed once when the configuration is compiled: the request path never
/// decodes key material (a new token costs its signature check, not a key parse).
#[derive(Clone)]
pub enum PublicKey {
    /// RS256, RS384, RS512, PS256, PS384, PS512: prepared for the checks of [`pkcs1`].
    Rsa(pkcs1::RsaKey),
    /// ES256: with its precomputed multiples (see [`es256`]); shared, they are 173 KB.
    P256(std::rc::Rc<es256::Es256Key>),
    /// ES384: RustCrypto's verifier, and the key as DER SubjectPublicKeyInfo for a host that
    /// checks ES384 itself.
    P384 {
        key: p384::ecdsa::VerifyingKey,
        spki: Vec<u8>,
    },
}

/// A verification key from the configured JWKS, with the one algorithm it may be used with.
#[derive(Clone)]
pub struct VerifyKey {
    pub algorithm: Algorithm,
    pub key: PublicKey,
    /// The key's public material as configured (RSA `n` and `e`, EC `x` and `y`, decoded): a
    /// new configuration keeps the tokens a key verified only if the same `kid` names the same key.
    pub material: Vec<u8>,
}

impl VerifyKey {
    /// An RSA key from its JWK components (big-endian bytes); `Err` says why it is unusable.
    pub fn rsa(algorithm: Algorithm, n: &[u8], e: &[u8]) -> Result<Self, String> {
        use pkcs1::{Hash, RsaKey};
        let key = match algorithm {
            Algorithm::RS256 => RsaKey::new(n, e, Hash::Sha256),
            Algorithm::RS384 => RsaKey::new(n, e, Hash::Sha384),
            Algorithm::RS512 => RsaKey::new(n, e, Hash::Sha512),
            Algorithm::PS256 => RsaKey::new_pss(n, e, Hash::Sha256),
            Algorithm::PS384 => RsaKey::new_pss(n, e, Hash::Sha384),
            Algorithm::PS512 => RsaKey::new_pss(n, e, Hash::Sha512),
            other => return Err(format!("{} is not an RSA algorithm", other.name())),
        }?;
        Ok(Self {
            algorithm,
            key: PublicKey::Rsa(key),
            material: [n, e].concat(),
        })
    }

    /// An EC key from its JWK coordinates; the curve follows the algorithm (ES256: P-256,
    /// ES384: P-384). A point not on the curve is refused here, not at the first token.
    pub fn ec(algorithm: Algorithm, x: &[u8], y: &[u8]) -> Result<Self, String> {
        let sec1 = [&[0x04u8][..], x, y].concat();
        let key = match algorithm {
            Algorithm::ES256 => PublicKey::P256(std::rc::Rc::new(es256::Es256Key::new(x, y)?)),
            Algorithm::ES384 => p384::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                .map(|key| PublicKey::P384 {
                    key,
                    spki: der::ec_spki(der::SECP384R1, x, y),
                })
                .map_err(|_| "EC key rejected: the point is not on the curve")?,
            other => return Err(format!("{} is not an EC algorithm", other.name())),
        };
        Ok(Self {
            algorithm,
            key,
            material: sec1,
        })
    }

    /// What a host needs to make this key's check of `signature` itself, where the host's
    /// check is the same one: RS256/384/512 (PKCS#1 v1.5, what BoringSSL's `EVP_DigestVerify`
    /// applies to an RSA key), ES256 (ECDSA over SHA-256 on P-256) and ES384 (over SHA-384 on
    /// P-384). `None` for PSS (the host would apply v1.5 padding) and an ECDSA signature of
    /// another length than its curve's.
    pub fn host_check<'a>(&'a self, signature: &'a [u8]) -> Option<HostArgs<'a>> {
        match (&self.key, self.algorithm) {
            (PublicKey::Rsa(k), Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512) => {
                k.host_check().map(|(hash, key)| HostArgs {
                    hash,
                    key,
                    signature: std::borrow::Cow::Borrowed(signature),
                })
            }
            (PublicKey::P256(k), Algorithm::ES256) => Some(HostArgs {
                hash: "sha256",
                key: k.spki(),
                signature: std::borrow::Cow::Owned(es256::der_signature(signature)?),
            }),
            (PublicKey::P384 { spki, .. }, Algorithm::ES384) => Some(HostArgs {
                hash: "sha384",
                key: spki,
                signature: std::borrow::Cow::Owned(der::ecdsa_signature(signature, 48)?),
            }),
            _ => None,
        }
    }

    /// Whether `signature` (raw bytes) signs `message` under this key and its algorithm.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        use p384::ecdsa::signature::Verifier as _;
        match (&self.key, self.algorithm) {
            // The key was prepared for its algorithm's scheme and hash (see `rsa`).
            (
                PublicKey::Rsa(k),
                Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512,
            ) => k.verifies(message, signature),
            (PublicKey::P256(k), Algorithm::ES256) => k.verifies(message, signature),
            (PublicKey::P384 { key, .. }, Algorithm::ES384) => {
                p384::ecdsa::Signature::from_slice(signature).is_ok_and(|sig| key.verify(message, &sig).is_ok())
            }
            // A key never carries an algorithm of another family (built only by `rsa`/`ec`).
            _ => false,
        }
    }
}

/// Builds a key from checked material; `Err` says why the numbers make no usable key.
pub fn build_key(material: &KeyMaterial) -> Result<VerifyKey, String> {
    build_key_reusing(material, None)
}

/// [`build_key`], or a copy of `earlier` (the key the same `kid` named in the running
/// configuration) when that is the same key: an ES256 key's table costs milliseconds to build,
/// and a configuration push that changes a connector does not change the keys.
pub fn build_key_reusing(material: &KeyMaterial, earlier: Option<&VerifyKey>) -> Result<VerifyKey, String> {
    let (algorithm, bytes) = match material {
        KeyMaterial::Rsa { algorithm, n, e } => (*algorithm, [n.as_slice(), e].concat()),
        KeyMaterial::Ec { algorithm, x, y } => (*algorithm, [&[0x04u8][..], x, y].concat()),
    };
    if let Some(k) = earlier.filter(|k| k.algorithm == algorithm && k.material == bytes) {
        return Ok(k.clone());
    }
    match material {
        KeyMaterial::Rsa { algorithm, n, e } => VerifyKey::rsa(*algorithm, n, e),
        KeyMaterial::Ec { algorithm, x, y } => VerifyKey::ec(*algorithm, x, y),
    }
}

/// Every key of `identity` built, as the filter builds them: the findings for the keys whose
/// shape is fine but whose numbers make no key (a badly shaped key is `check_jwk_shape`'s).
pub fn check_keys(identity: &IdentityConfig) -> Vec<ConfigError> {
    let mut found = vec![];
    for (i, jwk) in identity.jwks.keys.iter().enumerate() {
        let path = format!("identity.jwks.keys[{i}]");
        if let Ok(material) = check_jwk_shape(jwk, &path)
            && let Err(e) = build_key(&material)
        {
            found.push(ConfigError::new(path, e));
        }
    }
    found
}

/// One JWK of a cluster's JWKS checked exactly as the filter checks each of
/// `identity.jwks.keys`: `Err` lists why the filter could not verify tokens with it (paths
/// start at `path`). The controller skips such keys (ES512, Ed25519, short RSA, a point off
/// its curve) instead of refusing them all.
pub fn check_jwk(v: &serde_json::Value, path: &str) -> Result<(), Vec<ConfigError>> {
    let (_, material) = crate::config::parse_jwk(v, path)?;
    build_key(&material)
        .map(drop)
        .map_err(|e| vec![ConfigError::new(path, e)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use p384::ecdsa::signature::Signer as _;
    use p384::pkcs8::EncodePublicKey as _;

    #[test]
    fn an_es384_key_gives_the_host_its_der_and_each_signature_in_der_as_the_p384_crate_encodes_them() {
        for seed in 1..4u8 {
            let signing = p384::ecdsa::SigningKey::from_slice(&[seed; 48]).unwrap();
            let point = signing.verifying_key().to_encoded_point(false);
            let (x, y) = (point.x().unwrap(), point.y().unwrap());
            let key = VerifyKey::ec(Algorithm::ES384, x, y).unwrap();
            let want = p384::PublicKey::from(signing.verifying_key())
                .to_public_key_der()
                .unwrap();
            for m in 0..24u8 {
                let sig: p384::ecdsa::Signature = signing.sign(&[m, seed]);
                let raw = sig.to_bytes();
                let args = key.host_check(&raw).unwrap();
                assert_eq!(args.hash, "sha384");
                assert_eq!(args.key, want.as_bytes(), "seed {seed}");
                assert_eq!(&*args.signature, sig.to_der().as_bytes(), "seed {seed} message {m}");
                assert!(key.verifies(&[m, seed], &raw));
                assert!(!key.verifies(&[m, seed, 0], &raw));
            }
            // Not a P-384 signature's length: the module checks it (and refuses it).
            assert!(key.host_check(&[1; 95]).is_none());
            assert!(key.host_check(&[1; 64]).is_none());
        }
    }
}
