//! Owns the test host's `verify_signature` foreign function: Envoy's
//! (`source/extensions/common/wasm/ext/verify_signature.proto`, BoringSSL's
//! `EVP_DigestVerify`), made here with the rsa, p256 and p384 crates: the arguments' protobuf
//! read, the key parsed as DER SubjectPublicKeyInfo, for RSA PKCS#1 v1.5 over the named hash,
//! for P-256 ECDSA over SHA-256 and P-384 ECDSA over SHA-384 with the signature in DER, the
//! answer's protobuf written (`result = 1` when it holds, `error = 2` otherwise, as Envoy
//! answers).

use rsa::pkcs8::DecodePublicKey as _;
use rsa::{Pkcs1v15Sign, RsaPublicKey};

/// The answer's bytes; `None` when the arguments are not a `VerifySignatureArguments` with a
/// key Envoy could parse (Envoy then returns BadArgument).
pub fn verify_signature(args: &[u8]) -> Option<Vec<u8>> {
    let (mut hash, mut key, mut signature, mut text) = (None, None, None, None);
    let mut at = 0;
    while at < args.len() {
        let tag = *args.get(at)?;
        at += 1;
        let (len, used) = varint(args.get(at..)?)?;
        at += used;
        let value = args.get(at..at.checked_add(len)?)?;
        at += len;
        match tag {
            0x0a => hash = Some(value),
            0x12 => key = Some(value),
            0x1a => signature = Some(value),
            0x22 => text = Some(value),
            _ => return None,
        }
    }
    let (key, signature, text) = (key?, signature.unwrap_or_default(), text.unwrap_or_default());
    let outcome = if let Ok(key) = RsaPublicKey::from_public_key_der(key) {
        match hash? {
            b"sha256" => pkcs1_holds::<sha2::Sha256>(&key, signature, text),
            b"sha384" => pkcs1_holds::<sha2::Sha384>(&key, signature, text),
            b"sha512" => pkcs1_holds::<sha2::Sha512>(&key, signature, text),
            _ => return None,
        }
    } else if let Ok(key) = p256::ecdsa::VerifyingKey::from_public_key_der(key) {
        use p256::ecdsa::signature::Verifier as _;
        if hash? != b"sha256" {
            return None;
        }
        p256::ecdsa::Signature::from_der(signature).is_ok_and(|sig| key.verify(text, &sig).is_ok())
    } else {
        use p384::ecdsa::signature::Verifier as _;
        let key = p384::ecdsa::VerifyingKey::from_public_key_der(key).ok()?;
        if hash? != b"sha384" {
            return None;
        }
        p384::ecdsa::Signature::from_der(signature).is_ok_and(|sig| key.verify(text, &sig).is_ok())
    };
    let error = b"Failed to verify digest.";
    Some(if outcome {
        vec![0x08, 0x01]
    } else {
        [&[0x12, error.len() as u8][..], error].concat()
    })
}

/// RSA PKCS#1 v1.5 over the hash `D` of `text`.
fn pkcs1_holds<D: sha2::Digest + rsa::pkcs8::AssociatedOid>(key: &RsaPublicKey, signature: &[u8], text: &[u8]) -> bool {
    key.verify(Pkcs1v15Sign::new::<D>(), &D::digest(text), signature)
        .is_ok()
}

/// A protobuf varint as a length; the bytes it took.
fn varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, b) in bytes.iter().enumerate().take(4) {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}
