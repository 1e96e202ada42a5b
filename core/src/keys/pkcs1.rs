//! Owns RSA signature verification, both PKCS #1 (RFC 8017) schemes JWS uses: v1.5 (RS256,
//! RS384, RS512) and PSS (PS256, PS384, PS512), on keys prepared once per configuration: the
//! modulus as 32-bit limbs with its Montgomery constants, and for v1.5 the expected encoding's
//! fixed part. Why not the `rsa` crate: its verification re-derives the Montgomery form on every
//! call and multiplies through a generic big-integer type (a new token cost about a millisecond
//! of Envoy CPU that way), and its big-integer code was about 35 KB of the filter module.
//! 32-bit limbs keep every product a native 64-bit multiply in wasm32. Only public data is
//! involved, so nothing here needs to be constant-time.
//!
//! The v1.5 check builds the whole expected encoded message `00 01 FF..FF 00 DigestInfo H` and
//! compares it with `s^e mod n` byte for byte: no parsing of the decrypted block, so none of
//! the classic lenient-parser forgeries apply. The PSS check is EMSA-PSS-VERIFY (RFC 8017
//! section 9.1.2) with MGF1 over the same hash and a salt as long as the hash (RFC 7518
//! section 3.5).

/// A hash a PKCS#1 v1.5 signature may be over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    /// The DER `DigestInfo` prefix of RFC 8017 section 9.2, note 1.
    fn digest_info(self) -> &'static [u8] {
        match self {
            Hash::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00,
                0x04, 0x20,
            ],
            Hash::Sha384 => &[
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00,
                0x04, 0x30,
            ],
            Hash::Sha512 => &[
                0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00,
                0x04, 0x40,
            ],
        }
    }

    fn digest(self, message: &[u8]) -> Vec<u8> {
        self.digest_parts(&[message])
    }

    /// The hash of the concatenation of `parts`.
    fn digest_parts(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: sha2::Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            Hash::Sha256 => run::<sha2::Sha256>(parts),
            Hash::Sha384 => run::<sha2::Sha384>(parts),
            Hash::Sha512 => run::<sha2::Sha512>(parts),
        }
    }

    /// The name Envoy's crypto utility (`getHashFunction`) knows it by.
    fn name(self) -> &'static str {
        match self {
            Hash::Sha256 => "sha256",
            Hash::Sha384 => "sha384",
            Hash::Sha512 => "sha512",
        }
    }

    fn len(self) -> usize {
        match self {
            Hash::Sha256 => 32,
            Hash::Sha384 => 48,
            Hash::Sha512 => 64,
        }
    }
}

/// An RSA public key ready for verification.
#[derive(Clone)]
pub struct RsaKey {
    /// The modulus, little-endian 32-bit limbs, no leading zero limb.
    n: Vec<u32>,
    /// `-n^-1 mod 2^32`.
    n0inv: u32,
    /// `R^2 mod n`, `R = 2^(32 * limbs)`: brings a number into Montgomery form.
    rr: Vec<u32>,
    e: u64,
    /// The modulus length in bytes: a signature has exactly this length.
    k: usize,
    /// The modulus length in bits.
    bits: usize,
    scheme: Scheme,
    hash: Hash,
}

#[derive(Clone)]
enum Scheme {
    /// v1.5: `00 01 FF..FF 00 DigestInfo`, everything of the encoded message but the hash.
    Pkcs1 {
        prefix: Vec<u8>,
        /// The key as DER SubjectPublicKeyInfo, for a host that checks v1.5 itself
        /// ([`RsaKey::host_check`]).
        spki: Vec<u8>,
    },
    Pss,
}

/// The largest modulus accepted, in bits (as the `rsa` crate and most verifiers bound it).
const MAX_BITS: usize = 4096;
/// The largest public exponent accepted (the `rsa` crate's bound; keys use 65537).
const MAX_EXPONENT: u64 = (1 << 33) - 1;

impl RsaKey {
    /// Prepares `n` and `e` (big-endian bytes) for PKCS#1 v1.5 signatures over `hash`. `Err`
    /// says what makes the numbers unusable (see [`RsaKey::prepare`]).
    pub fn new(n: &[u8], e: &[u8], hash: Hash) -> Result<RsaKey, &'static str> {
        let mut key = Self::prepare(n, e, hash)?;
        let t_len = key.k.checked_sub(hash.len()).ok_or(TOO_SHORT)?;
        let info = hash.digest_info();
        // 00 01, at least 8 bytes FF, 00, DigestInfo.
        let ff = t_len.checked_sub(3 + info.len()).filter(|n| *n >= 8).ok_or(TOO_SHORT)?;
        let mut prefix = Vec::with_capacity(t_len);
        prefix.extend_from_slice(&[0x00, 0x01]);
        prefix.resize(2 + ff, 0xff);
        prefix.push(0x00);
        prefix.extend_from_slice(info);
        key.scheme = Scheme::Pkcs1 {
            prefix,
            spki: spki(n, e),
        };
        Ok(key)
    }

    /// Prepares `n` and `e` for PSS signatures over `hash` (salt as long as the hash).
    pub fn new_pss(n: &[u8], e: &[u8], hash: Hash) -> Result<RsaKey, &'static str> {
        let key = Self::prepare(n, e, hash)?;
        // emLen >= hLen + sLen + 2.
        if key.k < 2 * hash.len() + 3 {
            return Err(TOO_SHORT);
        }
        Ok(key)
    }

    /// The Montgomery constants of `n`. Refused: an even modulus or one outside 512 to 4096
    /// bits; an exponent that is not odd, at least 3 and at most 2^33 - 1.
    fn prepare(n: &[u8], e: &[u8], hash: Hash) -> Result<RsaKey, &'static str> {
        let n_be: Vec<u8> = n.iter().copied().skip_while(|b| *b == 0).collect();
        let k = n_be.len();
        let bits = match n_be.first() {
            Some(top) => 8 * k - top.leading_zeros() as usize,
            None => 0,
        };
        if !(512..=MAX_BITS).contains(&bits) {
            return Err(TOO_SHORT);
        }
        let e = e
            .iter()
            .try_fold(0u64, |acc, b| acc.checked_mul(256).map(|a| a | u64::from(*b)))
            .filter(|e| (3..=MAX_EXPONENT).contains(e) && e % 2 == 1)
            .ok_or("RSA key rejected: the exponent must be odd, at least 3 and at most 2^33 - 1")?;
        let limbs = limbs_of(&n_be);
        let n0 = limbs.first().copied().filter(|n0| n0 % 2 == 1).ok_or(EVEN)?;
        // Newton's iteration: each step doubles the correct low bits of n0^-1 (1, 2, 4, .. 32).
        let mut inv: u32 = 1;
        for _ in 0..5 {
            inv = inv.wrapping_mul(2u32.wrapping_sub(n0.wrapping_mul(inv)));
        }
        // R^2 mod n by doubling 1 (mod n) 2 * 32 * limbs times: once per key, at configuration.
        let mut rr = vec![0u32; limbs.len()];
        if let Some(low) = rr.first_mut() {
            *low = 1;
        }
        for _ in 0..64 * limbs.len() {
            let carry = shl1(&mut rr);
            if carry || !less(&rr, &limbs) {
                sub_in_place(&mut rr, &limbs);
            }
        }
        Ok(RsaKey {
            n0inv: inv.wrapping_neg(),
            n: limbs,
            rr,
            e,
            k,
            bits,
            scheme: Scheme::Pss,
            hash,
        })
    }

    /// What a host needs to make this key's check itself, when its check is the same one:
    /// PKCS#1 v1.5 (what BoringSSL's `EVP_DigestVerify` applies to an RSA key unless told
    /// otherwise), as the hash's name and the key as DER SubjectPublicKeyInfo. `None` for PSS.
    pub fn host_check(&self) -> Option<(&'static str, &[u8])> {
        match &self.scheme {
            Scheme::Pkcs1 { spki, .. } => Some((self.hash.name(), spki)),
            Scheme::Pss => None,
        }
    }

    /// Whether `signature` is this key's signature of `message` (v1.5 or PSS, as prepared).
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        if signature.len() != self.k {
            return false;
        }
        let s = limbs_of(signature);
        if s.len() > self.n.len() || (s.len() == self.n.len() && !less(&s, &self.n)) {
            return false;
        }
        let em = self.public_op(&s);
        match &self.scheme {
            Scheme::Pkcs1 { prefix, .. } => {
                let Some((head, digest)) = em.split_at_checked(prefix.len()) else {
                    return false;
                };
                head == prefix.as_slice() && digest == self.hash.digest(message).as_slice()
            }
            Scheme::Pss => self.pss_verifies(message, &em),
        }
    }

    /// EMSA-PSS-VERIFY (RFC 8017 section 9.1.2), `em` being `s^e mod n` in `k` bytes.
    fn pss_verifies(&self, message: &[u8], em: &[u8]) -> bool {
        let h_len = self.hash.len();
        let em_bits = self.bits - 1;
        let em_len = em_bits.div_ceil(8);
        // I2OSP(m, emLen): when emLen is k - 1 the top byte must be zero.
        let Some((top, em)) = em.split_at_checked(self.k - em_len) else {
            return false;
        };
        if top.iter().any(|b| *b != 0) || em.last() != Some(&0xbc) {
            return false;
        }
        let db_len = em_len - h_len - 1;
        let Some((masked_db, rest)) = em.split_at_checked(db_len) else {
            return false;
        };
        let Some(h) = rest.get(..h_len) else {
            return false;
        };
        // The bits above emBits in the top byte must be zero.
        let unused = 8 * em_len - em_bits;
        let top_mask = 0xffu8 >> unused;
        if masked_db.first().is_some_and(|b| b & !top_mask != 0) {
            return false;
        }
        // DB = maskedDB xor MGF1(H, dbLen).
        let mut db = masked_db.to_vec();
        let mut counter = 0u32;
        let mut at = 0;
        while at < db_len {
            let block = self.hash.digest_parts(&[h, &counter.to_be_bytes()]);
            for (d, m) in db.iter_mut().skip(at).zip(&block) {
                *d ^= m;
            }
            at += block.len();
            counter += 1;
        }
        if let Some(first) = db.first_mut() {
            *first &= top_mask;
        }
        // DB = PS (zeros) || 01 || salt, the salt as long as the hash.
        let Some(ps_len) = db_len.checked_sub(h_len + 1) else {
            return false;
        };
        let (ps, tail) = db.split_at(ps_len);
        if ps.iter().any(|b| *b != 0) || tail.first() != Some(&0x01) {
            return false;
        }
        let salt = tail.get(1..).unwrap_or_default();
        let m_hash = self.hash.digest(message);
        self.hash.digest_parts(&[&[0u8; 8], &m_hash, salt]) == h
    }

    /// `s^e mod n`, big-endian, `k` bytes.
    fn public_op(&self, s: &[u32]) -> Vec<u8> {
        let mut base = vec![0u32; self.n.len()];
        for (b, v) in base.iter_mut().zip(s) {
            *b = *v;
        }
        let base = self.mont_mul(&base, &self.rr);
        let mut acc = base.clone();
        let top = 63 - self.e.leading_zeros();
        for bit in (0..top).rev() {
            acc = self.mont_sqr(&acc);
            if (self.e >> bit) & 1 == 1 {
                acc = self.mont_mul(&acc, &base);
            }
        }
        let mut one = vec![0u32; self.n.len()];
        if let Some(low) = one.first_mut() {
            *low = 1;
        }
        let out = self.mont_mul(&acc, &one);
        let mut be: Vec<u8> = out.iter().rev().flat_map(|l| l.to_be_bytes()).collect();
        let extra = be.len().saturating_sub(self.k);
        be.drain(..extra);
        be
    }

    /// Montgomery square `a * a / R mod n`, input and output below `n`: 16 of the 17 products of
    /// a check with `e = 65537` are squares, and a square needs about half the limb products
    /// (each cross product once, doubled), then one Montgomery reduction of the double-length
    /// result. Both halves go two rows a pass ([`mul_add2`]). Measured under wasmtime beside
    /// the `rsa` crate (`cost_beside_the_rsa_crate`, interleaved): 0.16 of its time against
    /// 0.20-0.22 with one row a pass and no unrolling.
    fn mont_sqr(&self, a: &[u32]) -> Vec<u32> {
        let s = self.n.len();
        let mut t = vec![0u32; 2 * s + 1];
        // Cross products a_i * a_j, i < j, row i adding at i + j; rows i and i + 1 in one pass
        // (as the reduction below): a_i * a_(i+1) alone, then a_i * a_(i+2+j) and
        // a_(i+1) * a_(i+1+j) at 2i + 2 + j, the second row one limb behind the first.
        let mut i = 0;
        while i + 1 < s {
            let (Some(&x), Some(&y)) = (a.get(i), a.get(i + 1)) else {
                break;
            };
            if let Some(tk) = t.get_mut(2 * i + 1) {
                let first = u64::from(*tk) + u64::from(x) * u64::from(y);
                *tk = first as u32;
                add_carry(&mut t, 2 * i + 2, first >> 32);
            }
            let (Some(row), Some(rest)) = (t.get_mut(2 * i + 2..), a.get(i + 2..)) else {
                break;
            };
            let (c0, c1) = mul_add2(row, rest, x, y);
            add_carry(&mut t, i + s, c0);
            add_carry(&mut t, i + s + 1, c1);
            i += 2;
        }
        // An odd limb count leaves the last row, which has no cross products.
        shl1(&mut t);
        // The squares a_i^2 at 2i, 2i+1.
        let mut c = 0u64;
        for (pair, ai) in t.chunks_exact_mut(2).zip(a) {
            if let [lo, hi] = pair {
                let sq = u64::from(*ai) * u64::from(*ai);
                let x = u64::from(*lo) + (sq & 0xffff_ffff) + c;
                *lo = x as u32;
                let y = u64::from(*hi) + (sq >> 32) + (x >> 32);
                *hi = y as u32;
                c = y >> 32;
            }
        }
        add_carry(&mut t, 2 * s, c);
        // Montgomery reduction, two limbs a pass: `m0` clears limb i; `m1`, which clears limb
        // i + 1, is read off that limb as row i will leave it (two limb products), so both rows
        // go through `t` together, as two independent carry chains.
        let mut i = 0;
        while i + 1 < s {
            let (Some(&t0), Some(&t1), Some(&n0), Some(&n1)) = (t.get(i), t.get(i + 1), self.n.first(), self.n.get(1))
            else {
                break;
            };
            let m0 = t0.wrapping_mul(self.n0inv);
            let low = u64::from(t0) + u64::from(m0) * u64::from(n0);
            let next = u64::from(t1) + u64::from(m0) * u64::from(n1) + (low >> 32);
            let m1 = (next as u32).wrapping_mul(self.n0inv);
            let Some(row) = t.get_mut(i..) else { break };
            let (c0, c1) = mul_add2(row, &self.n, m0, m1);
            add_carry(&mut t, i + s, c0);
            add_carry(&mut t, i + s + 1, c1);
            i += 2;
        }
        if i < s {
            let m = t.get(i).copied().unwrap_or(0).wrapping_mul(self.n0inv);
            if let Some(row) = t.get_mut(i..) {
                let c = mul_add(row, &self.n, m);
                add_carry(&mut t, i + s, c);
            }
        }
        // (a^2 + m n) / R < 2n: one subtraction at most.
        t.drain(..s);
        let high = t.pop().unwrap_or(0);
        if high != 0 || !less(&t, &self.n) {
            sub_in_place(&mut t, &self.n);
        }
        t
    }

    /// Montgomery product `a * b / R mod n` (CIOS), inputs and output below `n`.
    fn mont_mul(&self, a: &[u32], b: &[u32]) -> Vec<u32> {
        let s = self.n.len();
        let mut t = vec![0u32; s + 2];
        for ai in a {
            let c = mul_add(&mut t, b, *ai);
            add_carry(&mut t, s, c);
            let m = t.first().copied().unwrap_or(0).wrapping_mul(self.n0inv);
            let c = mul_add(&mut t, &self.n, m);
            add_carry(&mut t, s, c);
            // The low limb is now zero: divide by 2^32.
            t.copy_within(1.., 0);
            if let Some(last) = t.last_mut() {
                *last = 0;
            }
        }
        // t < 2n: one subtraction at most.
        let high = t.get(s).copied().unwrap_or(0);
        t.truncate(s);
        if high != 0 || !less(&t, &self.n) {
            sub_in_place(&mut t, &self.n);
        }
        t
    }
}

const TOO_SHORT: &str = "RSA key rejected: the modulus must be 512 to 4096 bits long";
const EVEN: &str = "RSA key rejected: the modulus is even";

/// `t += x * a` over the shorter of the two; the carry out of the last limb written. A row of
/// a Montgomery product (and the odd row over of a square), unrolled by hand four limbs at a
/// time: the module is built at opt-level "s", which does not unroll, and the loop's own
/// bookkeeping cost as much as its arithmetic. A macro, not a closure: at opt-level "s" a
/// closure called four times is not inlined. Slices and `chunks_exact`, not `skip` or
/// indexing: no bounds checks in the loop.
#[inline]
fn mul_add(t: &mut [u32], a: &[u32], x: u32) -> u64 {
    let x = u64::from(x);
    let len = t.len().min(a.len());
    let (Some(t), Some(a)) = (t.get_mut(..len), a.get(..len)) else {
        return 0;
    };
    macro_rules! step {
        ($tk:expr, $ak:expr, $c:ident) => {
            let v = u64::from(*$tk) + x * u64::from(*$ak) + $c;
            *$tk = v as u32;
            $c = v >> 32;
        };
    }
    let mut c = 0u64;
    let mut t4 = t.chunks_exact_mut(4);
    let mut a4 = a.chunks_exact(4);
    for (tc, ac) in (&mut t4).zip(&mut a4) {
        if let ([t0, t1, t2, t3], [a0, a1, a2, a3]) = (tc, ac) {
            step!(t0, a0, c);
            step!(t1, a1, c);
            step!(t2, a2, c);
            step!(t3, a3, c);
        }
    }
    for (tk, ak) in t4.into_remainder().iter_mut().zip(a4.remainder()) {
        step!(tk, ak, c);
    }
    c
}

/// `t += x * n + y * n * 2^32` (`n` one limb up for `y`), over `n` and one limb past it, which
/// `t` must have; the two carries out, to add at limbs `n.len()` and `n.len() + 1`. Two
/// Montgomery reduction rows in one pass: each limb is loaded and stored once for two products,
/// and the two carry chains do not wait on each other. Unrolled as [`mul_add`] is.
#[inline]
fn mul_add2(t: &mut [u32], n: &[u32], x: u32, y: u32) -> (u64, u64) {
    let (x, y) = (u64::from(x), u64::from(y));
    let Some((top, t)) = t.get_mut(..n.len() + 1).and_then(|t| t.split_last_mut()) else {
        return (0, 0);
    };
    macro_rules! step {
        ($tk:expr, $nk:expr, $prev:ident, $c0:ident, $c1:ident) => {
            let v = u64::from(*$tk) + x * u64::from(*$nk) + $c0;
            $c0 = v >> 32;
            let w = (v & 0xffff_ffff) + y * $prev + $c1;
            $c1 = w >> 32;
            *$tk = w as u32;
            $prev = u64::from(*$nk);
        };
    }
    let (mut c0, mut c1, mut prev) = (0u64, 0u64, 0u64);
    let mut t4 = t.chunks_exact_mut(4);
    let mut n4 = n.chunks_exact(4);
    for (tc, nc) in (&mut t4).zip(&mut n4) {
        if let ([t0, t1, t2, t3], [n0, n1, n2, n3]) = (tc, nc) {
            step!(t0, n0, prev, c0, c1);
            step!(t1, n1, prev, c0, c1);
            step!(t2, n2, prev, c0, c1);
            step!(t3, n3, prev, c0, c1);
        }
    }
    for (tk, nk) in t4.into_remainder().iter_mut().zip(n4.remainder()) {
        step!(tk, nk, prev, c0, c1);
    }
    // The limb past `n`: only `y`'s row reaches it (its top product), and `x`'s carry.
    let w = u64::from(*top) + y * prev + c1;
    *top = w as u32;
    (c0, w >> 32)
}

/// Adds `c` at limb `at` of `t` and carries on.
fn add_carry(t: &mut [u32], at: usize, mut c: u64) {
    for limb in t.get_mut(at..).unwrap_or_default() {
        if c == 0 {
            break;
        }
        let x = u64::from(*limb) + c;
        *limb = x as u32;
        c = x >> 32;
    }
}

/// DER SubjectPublicKeyInfo of an RSA key (RFC 5280 4.1, RFC 8017 A.1.1): `rsaEncryption`
/// with NULL parameters, the key as SEQUENCE { INTEGER n, INTEGER e }.
fn spki(n: &[u8], e: &[u8]) -> Vec<u8> {
    use super::der::{tlv, uint};
    const RSA_ENCRYPTION: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let key = tlv(0x30, &[uint(n), uint(e)].concat());
    let bits = tlv(0x03, &[&[0u8][..], &key].concat());
    tlv(0x30, &[&RSA_ENCRYPTION[..], &bits].concat())
}

/// Little-endian 32-bit limbs of big-endian bytes (no leading zero limbs kept).
fn limbs_of(be: &[u8]) -> Vec<u32> {
    let mut limbs: Vec<u32> = be
        .rchunks(4)
        .map(|c| c.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
        .collect();
    while limbs.last() == Some(&0) {
        limbs.pop();
    }
    limbs
}

/// `a < b` for equal-length little-endian numbers.
fn less(a: &[u32], b: &[u32]) -> bool {
    for (x, y) in a.iter().rev().zip(b.iter().rev()) {
        if x != y {
            return x < y;
        }
    }
    false
}

/// `a -= b` (mod 2^(32 * len)), equal lengths.
fn sub_in_place(a: &mut [u32], b: &[u32]) {
    let mut borrow = 0i64;
    for (x, y) in a.iter_mut().zip(b) {
        let d = i64::from(*x) - i64::from(*y) - borrow;
        *x = d as u32;
        borrow = i64::from(d < 0);
    }
}

/// `a <<= 1`; the bit shifted out.
fn shl1(a: &mut [u32]) -> bool {
    let mut carry = 0u32;
    for x in a.iter_mut() {
        let next = *x >> 31;
        *x = (*x << 1) | carry;
        carry = next;
    }
    carry == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::BigUint;
    use rsa::traits::PublicKeyParts as _;

    fn test_key() -> rsa::RsaPublicKey {
        use rsa::pkcs8::DecodePrivateKey as _;
        let pem = std::str::from_utf8(include_bytes!("testdata/rsa.pem")).unwrap();
        rsa::RsaPrivateKey::from_pkcs8_pem(pem).unwrap().to_public_key()
    }

    #[test]
    fn the_public_operation_equals_big_integer_modpow() {
        let key = test_key();
        let (n, e) = (key.n().to_bytes_be(), key.e().to_bytes_be());
        let prepared = RsaKey::new(&n, &e, Hash::Sha256).unwrap();
        // xorshift: reproducible bases across the whole range below n.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..40 {
            let mut bytes = vec![0u8; n.len()];
            for b in &mut bytes {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if round == 0 {
                bytes = vec![0; n.len()];
                bytes[n.len() - 1] = 2;
            }
            let base = BigUint::from_bytes_be(&bytes) % key.n();
            let want = base.modpow(key.e(), key.n()).to_bytes_be();
            let mut want_padded = vec![0u8; n.len() - want.len()];
            want_padded.extend_from_slice(&want);
            let got = prepared.public_op(&limbs_of(&base.to_bytes_be()));
            assert_eq!(got, want_padded, "round {round}");
        }
    }

    /// Every modulus size accepted, with an odd and an even limb count (the paired rows of
    /// the square and its reduction leave one row over when the count is odd), every limb at its
    /// maximum (the longest carries) and random. Montgomery arithmetic needs only an odd
    /// modulus, so these need not be RSA moduli: all-ones and random ones of each size, bases at
    /// `n - 1`, random and 2, the largest exponent accepted and 65537, against big-integer
    /// `modpow`.
    #[test]
    fn the_public_operation_holds_at_every_size_with_limbs_at_their_maximum() {
        let mut x = 0x6a09_e667_f3bc_c908u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        for bits in [512usize, 1025, 1056, 2048, 3072, 4095, 4096] {
            let k = bits.div_ceil(8);
            let top = 0xffu8 >> (8 * k - bits);
            let all_ones: Vec<u8> = (0..k).map(|i| if i == 0 { top } else { 0xff }).collect();
            let mut random: Vec<u8> = (0..k).map(|_| next()).collect();
            random[0] = top;
            *random.last_mut().unwrap() |= 1;
            for n in [all_ones, random] {
                let big_n = BigUint::from_bytes_be(&n);
                for e in [&[0x01u8, 0x00, 0x01][..], &[0x01, 0xff, 0xff, 0xff, 0xff]] {
                    let key = RsaKey::prepare(&n, e, Hash::Sha256).unwrap();
                    let big_e = BigUint::from_bytes_be(e);
                    let n_minus_1 = &big_n - 1u32;
                    let random = BigUint::from_bytes_be(&(0..k).map(|_| next()).collect::<Vec<_>>()) % &big_n;
                    for base in [n_minus_1, random, BigUint::from(2u32)] {
                        let want = base.modpow(&big_e, &big_n).to_bytes_be();
                        let mut want_padded = vec![0u8; k - want.len()];
                        want_padded.extend_from_slice(&want);
                        let got = key.public_op(&limbs_of(&base.to_bytes_be()));
                        assert_eq!(got, want_padded, "{bits} bits, e {e:?}, base {base:x}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_montgomery_square_equals_the_montgomery_product_of_a_number_with_itself() {
        let key = test_key();
        let prepared = RsaKey::new(&key.n().to_bytes_be(), &key.e().to_bytes_be(), Hash::Sha256).unwrap();
        let limbs_n = prepared.n.len();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut cases: Vec<Vec<u32>> = vec![vec![0; limbs_n], {
            let mut one = vec![0; limbs_n];
            one[0] = 1;
            one
        }];
        // n - 1: every limb near its top.
        let mut n_minus_1 = prepared.n.clone();
        n_minus_1[0] -= 1;
        cases.push(n_minus_1);
        for _ in 0..50 {
            let mut v: Vec<u32> = (0..limbs_n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u32
                })
                .collect();
            *v.last_mut().unwrap() %= prepared.n.last().unwrap();
            cases.push(v);
        }
        for (i, v) in cases.iter().enumerate() {
            assert_eq!(prepared.mont_sqr(v), prepared.mont_mul(v, v), "case {i}");
        }
    }

    #[test]
    fn a_signature_verifies_and_any_change_to_it_or_the_message_does_not() {
        use rsa::pkcs1v15::SigningKey;
        use rsa::pkcs8::DecodePrivateKey as _;
        use rsa::signature::{SignatureEncoding as _, Signer as _};
        let pem = std::str::from_utf8(include_bytes!("testdata/rsa.pem")).unwrap();
        let private = rsa::RsaPrivateKey::from_pkcs8_pem(pem).unwrap();
        let public = private.to_public_key();
        let (n, e) = (public.n().to_bytes_be(), public.e().to_bytes_be());
        let message = b"header.claims";
        let sigs = [
            (
                Hash::Sha256,
                SigningKey::<sha2::Sha256>::new(private.clone()).sign(message).to_vec(),
            ),
            (
                Hash::Sha384,
                SigningKey::<sha2::Sha384>::new(private.clone()).sign(message).to_vec(),
            ),
            (
                Hash::Sha512,
                SigningKey::<sha2::Sha512>::new(private).sign(message).to_vec(),
            ),
        ];
        for (hash, sig) in &sigs {
            let key = RsaKey::new(&n, &e, *hash).unwrap();
            assert!(key.verifies(message, sig), "{hash:?}");
            assert!(!key.verifies(b"header.claimz", sig), "{hash:?}: another message");
            for i in [0, 1, sig.len() / 2, sig.len() - 1] {
                let mut bad = sig.clone();
                bad[i] ^= 0x01;
                assert!(!key.verifies(message, &bad), "{hash:?}: byte {i} flipped");
            }
            assert!(!key.verifies(message, &sig[1..]), "{hash:?}: short");
            assert!(
                !key.verifies(message, &[sig.as_slice(), &[0]].concat()),
                "{hash:?}: long"
            );
            assert!(!key.verifies(message, &n), "{hash:?}: s = n is out of range");
        }
        // A signature over another hash never passes as this one's.
        let rs384 = RsaKey::new(&n, &e, Hash::Sha384).unwrap();
        assert!(!rs384.verifies(message, &sigs[0].1));
    }

    #[test]
    #[ignore]
    /// A probe, not a test: this check against the `rsa` crate's, interleaved (run with
    /// `--release -- --ignored --nocapture`). Timing is never asserted.
    fn cost_beside_the_rsa_crate() {
        use rsa::pkcs1v15::SigningKey;
        use rsa::pkcs8::DecodePrivateKey as _;
        use rsa::signature::{SignatureEncoding as _, Signer as _};
        use sha2::Digest as _;
        let pem = std::str::from_utf8(include_bytes!("testdata/rsa.pem")).unwrap();
        let private = rsa::RsaPrivateKey::from_pkcs8_pem(pem).unwrap();
        let public = private.to_public_key();
        let sig = SigningKey::<sha2::Sha256>::new(private).sign(b"m").to_vec();
        let key = RsaKey::new(&public.n().to_bytes_be(), &public.e().to_bytes_be(), Hash::Sha256).unwrap();
        let (mut ours, mut theirs) = (0f64, 0f64);
        for _ in 0..20 {
            let t = std::time::Instant::now();
            for _ in 0..50 {
                assert!(key.verifies(b"m", &sig));
            }
            ours += t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            for _ in 0..50 {
                let d = sha2::Sha256::digest(b"m");
                assert!(
                    public
                        .verify(rsa::Pkcs1v15Sign::new::<sha2::Sha256>(), &d, &sig)
                        .is_ok()
                );
            }
            theirs += t.elapsed().as_secs_f64();
        }
        eprintln!(
            "pkcs1: {:.1} us, rsa crate: {:.1} us",
            ours * 1e6 / 1000.0,
            theirs * 1e6 / 1000.0
        );
    }

    #[test]
    fn a_v15_key_offers_the_host_its_der_subject_public_key_info_and_pss_does_not() {
        use rsa::pkcs8::EncodePublicKey as _;
        let key = test_key();
        let (n, e) = (key.n().to_bytes_be(), key.e().to_bytes_be());
        let want = key.to_public_key_der().unwrap();
        for (hash, name) in [
            (Hash::Sha256, "sha256"),
            (Hash::Sha384, "sha384"),
            (Hash::Sha512, "sha512"),
        ] {
            let prepared = RsaKey::new(&n, &e, hash).unwrap();
            assert_eq!(prepared.host_check(), Some((name, want.as_bytes())));
            assert!(RsaKey::new_pss(&n, &e, hash).unwrap().host_check().is_none());
        }
        // A modulus whose top bit is clear, past 255 bytes of content, and leading zero bytes.
        for bits in [1024usize, 2047, 4096] {
            let k = bits.div_ceil(8);
            let mut n: Vec<u8> = (0..k).map(|i| (i as u8).wrapping_mul(37) | 1).collect();
            n[0] = 0xffu8 >> (8 * k - bits);
            let public = rsa::RsaPublicKey::new_unchecked(BigUint::from_bytes_be(&n), BigUint::from(65537u32));
            let padded = [&[0u8, 0][..], &n].concat();
            let prepared = RsaKey::new(&padded, &[1, 0, 1], Hash::Sha256).unwrap();
            assert_eq!(
                prepared.host_check().unwrap().1,
                public.to_public_key_der().unwrap().as_bytes(),
                "{bits} bits"
            );
        }
    }

    #[test]
    fn unusable_keys_are_refused_with_the_reason() {
        let key = test_key();
        let (n, e) = (key.n().to_bytes_be(), key.e().to_bytes_be());
        let mut even = n.clone();
        *even.last_mut().unwrap() &= 0xfe;
        let refused = |n: &[u8], e: &[u8]| RsaKey::new(n, e, Hash::Sha256).err().unwrap_or("accepted");
        assert!(refused(&even, &e).contains("even"));
        for bad_e in [&[2u8][..], &[1], &[0], &[0x04, 0, 0, 0, 1]] {
            assert!(refused(&n, bad_e).contains("exponent"), "{bad_e:?}");
        }
        assert!(refused(&n[..32], &e).contains("512 to 4096 bits"));
        let mut huge = vec![0xffu8; 513];
        *huge.last_mut().unwrap() = 0xfb;
        assert!(refused(&huge, &e).contains("512 to 4096 bits"), "4104 bits");
        assert!(RsaKey::new_pss(&n[..32], &e, Hash::Sha512).is_err());
    }

    /// Signs `message` with PSS (salt as long as the hash), as a JWS signer does.
    fn pss_sign(private: &rsa::RsaPrivateKey, hash: Hash, message: &[u8]) -> Vec<u8> {
        use rsa::pss::SigningKey;
        use rsa::signature::{RandomizedSigner as _, SignatureEncoding as _};
        let rng = &mut rsa::rand_core::OsRng;
        match hash {
            Hash::Sha256 => SigningKey::<sha2::Sha256>::new(private.clone())
                .sign_with_rng(rng, message)
                .to_vec(),
            Hash::Sha384 => SigningKey::<sha2::Sha384>::new(private.clone())
                .sign_with_rng(rng, message)
                .to_vec(),
            Hash::Sha512 => SigningKey::<sha2::Sha512>::new(private.clone())
                .sign_with_rng(rng, message)
                .to_vec(),
        }
    }

    #[test]
    fn a_pss_signature_verifies_and_any_change_to_it_or_the_message_does_not() {
        use rsa::pkcs8::DecodePrivateKey as _;
        let pem = std::str::from_utf8(include_bytes!("testdata/rsa.pem")).unwrap();
        let private = rsa::RsaPrivateKey::from_pkcs8_pem(pem).unwrap();
        let public = private.to_public_key();
        let (n, e) = (public.n().to_bytes_be(), public.e().to_bytes_be());
        let message = b"header.claims";
        for hash in [Hash::Sha256, Hash::Sha384, Hash::Sha512] {
            let sig = pss_sign(&private, hash, message);
            let key = RsaKey::new_pss(&n, &e, hash).unwrap();
            assert!(key.verifies(message, &sig), "{hash:?}");
            assert!(!key.verifies(b"header.claimz", &sig), "{hash:?}: another message");
            for i in [0, 1, sig.len() / 2, sig.len() - 1] {
                let mut bad = sig.clone();
                bad[i] ^= 0x01;
                assert!(!key.verifies(message, &bad), "{hash:?}: byte {i} flipped");
            }
            assert!(!key.verifies(message, &n), "{hash:?}: s = n is out of range");
            // The schemes do not stand in for each other.
            assert!(
                !RsaKey::new(&n, &e, hash).unwrap().verifies(message, &sig),
                "{hash:?} as v1.5"
            );
        }
        let v15 = {
            use rsa::pkcs1v15::SigningKey;
            use rsa::signature::{SignatureEncoding as _, Signer as _};
            SigningKey::<sha2::Sha256>::new(private.clone()).sign(message).to_vec()
        };
        assert!(!RsaKey::new_pss(&n, &e, Hash::Sha256).unwrap().verifies(message, &v15));
        let sha384 = pss_sign(&private, Hash::Sha384, message);
        assert!(
            !RsaKey::new_pss(&n, &e, Hash::Sha256)
                .unwrap()
                .verifies(message, &sha384)
        );
    }

    #[test]
    fn pss_with_a_modulus_one_bit_past_whole_bytes() {
        // 1025 bits: the encoded message is one byte shorter than the signature (emLen = k - 1),
        // the one case where the decrypted block's top byte is not part of it.
        let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1025).unwrap();
        let public = private.to_public_key();
        let (n, e) = (public.n().to_bytes_be(), public.e().to_bytes_be());
        assert_eq!(n.len(), 129);
        for hash in [Hash::Sha256, Hash::Sha384] {
            let sig = pss_sign(&private, hash, b"m");
            let key = RsaKey::new_pss(&n, &e, hash).unwrap();
            assert!(key.verifies(b"m", &sig), "{hash:?}");
            assert!(!key.verifies(b"n", &sig), "{hash:?}");
        }
        // SHA-512 with its 64-byte salt does not fit in 128 bytes: no such signature exists.
        assert!(RsaKey::new_pss(&n, &e, Hash::Sha512).is_err());
    }
}
