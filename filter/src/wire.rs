//! The proxy-wasm ABI's byte formats: header maps as the host lends and takes them, and the
//! foreign `verify_signature` call's protobuf messages. Plain functions so native tests cover them; [`crate::host`] uses them.
//!
//! A map is `count`, then a `(key length, value length)` pair per entry, then every key and
//! value each followed by a NUL. A map the host hands over that does not parse is treated as
//! empty, never trusted for its lengths: the lengths are checked against the buffer.

use std::borrow::Cow;

/// Serialises `pairs` as the host expects a header map.
pub fn serialize_map(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let size = 4 + pairs.iter().map(|(k, v)| k.len() + v.len() + 10).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&len32(pairs.len()).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&len32(k.len()).to_le_bytes());
        out.extend_from_slice(&len32(v.len()).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// A header map as the host lent it, read in place: the host's buffer and where each entry's
/// name and value lie in it. Reading a map costs one allocation (the spans), where a copy of
/// every name and value cost two per header: with the text conversions, a quarter of the
/// module's own time on a warm request in a `perf` profile of `warm-cost`.
#[derive(Debug)]
pub struct HeaderMap {
    bytes: Vec<u8>,
    /// Per entry: where its name starts, where its value starts and ends (the name ends one
    /// byte, its NUL, before the value starts).
    spans: Vec<(usize, usize, usize)>,
}

impl HeaderMap {
    /// Reads a map the host serialised; `None` when a length points outside the buffer.
    pub fn parse(bytes: Vec<u8>) -> Option<HeaderMap> {
        if bytes.is_empty() {
            return Some(HeaderMap {
                bytes,
                spans: Vec::new(),
            });
        }
        let n = u32_at(&bytes, 0)?;
        // Each entry takes at least 8 bytes of lengths and 2 NULs: a larger count is a lie.
        if n.checked_mul(10)? > bytes.len() {
            return None;
        }
        let mut spans = Vec::with_capacity(n);
        let mut at = 4usize.checked_add(n.checked_mul(8)?)?;
        for i in 0..n {
            let kl = u32_at(&bytes, 4 + i * 8)?;
            let vl = u32_at(&bytes, 8 + i * 8)?;
            let value = at.checked_add(kl)?.checked_add(1)?;
            let end = value.checked_add(vl)?;
            if end > bytes.len() {
                return None;
            }
            spans.push((at, value, end));
            at = end + 1;
        }
        Some(HeaderMap { bytes, spans })
    }

    /// Every entry, name and value, in the host's order. Names are as the host gives them
    /// (lowercase in HTTP/2 and Envoy's maps); a name that is not UTF-8 matches no name the
    /// filter looks for.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans.iter().map(|&(k, v, e)| {
            let b = &self.bytes;
            (b.get(k..v - 1).unwrap_or_default(), b.get(v..e).unwrap_or_default())
        })
    }

    /// Whether some entry is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The first value of header `name`, raw.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter().find(|(k, _)| *k == name.as_bytes()).map(|(_, v)| v)
    }

    /// The first value of header `name`, as [`text`].
    pub fn text(&self, name: &str) -> Option<Cow<'_, str>> {
        self.get(name).map(text)
    }
}

/// `bytes` as text, invalid UTF-8 replaced by U+FFFD, borrowed when it is valid. Header values
/// are almost always valid (ASCII): `str::from_utf8` checks those a word at a time, where
/// `String::from_utf8_lossy` walks them byte by byte: in a `perf` profile of `warm-cost`, 2.7 %
/// of the run (a tenth of the module's own time on a warm request, most of it the ~1 KB token)
/// against 0.8 % for `from_utf8`.
pub fn text(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Option<usize> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    let arr: [u8; 4] = b.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(arr)).ok()
}

/// Lengths in the ABI are u32; nothing the filter sends comes near 4 GiB, and a length that
/// did would be cut to an empty value by the host rather than wrap.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The arguments of Envoy's `verify_signature` foreign function, its protobuf
/// `VerifySignatureArguments` (Envoy's `source/extensions/common/wasm/ext/verify_signature.proto`):
/// `hash_function = 1` (`"sha256"`, ...), `public_key = 2` (DER SubjectPublicKeyInfo),
/// `signature = 3`, `text = 4` (the signed bytes), all length-delimited. Encoded by hand:
/// four fields out and one back do not need prost's code in the module.
pub fn verify_signature_args(hash: &str, spki: &[u8], signature: &[u8], text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hash.len() + spki.len() + signature.len() + text.len() + 16);
    for (field, bytes) in [(1u8, hash.as_bytes()), (2, spki), (3, signature), (4, text)] {
        out.push((field << 3) | 2);
        let mut len = bytes.len();
        while len >= 0x80 {
            out.push((len as u8) | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
        out.extend_from_slice(bytes);
    }
    out
}

/// Whether Envoy's `verify_signature` answer (`VerifySignatureResult`: `bool result = 1`,
/// `string error = 2`) says the signature holds. proto3 leaves a false `result` out, so an
/// answer without it is `Some(false)`; `None`: not a message of that shape.
pub fn verify_signature_result(bytes: &[u8]) -> Option<bool> {
    fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *bytes.get(*at)?;
            *at += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    let (mut at, mut result) = (0, false);
    while at < bytes.len() {
        let key = varint(bytes, &mut at)?;
        match (key >> 3, key & 7) {
            (1, 0) => result = varint(bytes, &mut at)? != 0,
            (_, 0) => {
                varint(bytes, &mut at)?;
            }
            (_, 2) => {
                let len = usize::try_from(varint(bytes, &mut at)?).ok()?;
                at = at.checked_add(len).filter(|end| *end <= bytes.len())?;
            }
            _ => return None,
        }
    }
    Some(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_what_a_lossy_conversion_gives() {
        let samples: [&[u8]; 7] = [
            b"",
            b"Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
            "caf\u{e9} \u{1F600}".as_bytes(),
            &[0xff, b'a', 0xfe],
            &[b'a', 0xe2, 0x82],
            &[0xc0, 0x80, b'x'],
            &[0xed, 0xa0, 0x80],
        ];
        for s in samples {
            assert_eq!(text(s), String::from_utf8_lossy(s), "{s:?}");
        }
        assert_eq!(text(&[b'a', 0xff, b'b']), "a\u{FFFD}b");
        // Every byte value at every position of a short window, valid or not.
        for a in 0..=255u8 {
            for b in [0x00, 0x41, 0x80, 0xbf, 0xc2, 0xe0, 0xf0, 0xff] {
                let s = [b'x', a, b, 0x80, b'y'];
                assert_eq!(text(&s), String::from_utf8_lossy(&s), "{s:?}");
            }
        }
    }

    fn entries(m: &HeaderMap) -> Vec<(Vec<u8>, Vec<u8>)> {
        m.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    }

    #[test]
    fn a_map_round_trips() {
        let pairs: Vec<(&str, &[u8])> = vec![(":status", b"200"), ("x-empty", b""), ("bin", &[0xff, 0, 1])];
        let back = HeaderMap::parse(serialize_map(&pairs)).unwrap();
        let want: Vec<(Vec<u8>, Vec<u8>)> = pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec())).collect();
        assert_eq!(entries(&back), want);
        assert_eq!(back.text(":status").as_deref(), Some("200"));
        assert_eq!(back.text("x-empty").as_deref(), Some(""));
        assert_eq!(back.text("bin").as_deref(), Some("\u{FFFD}\0\u{1}"));
        assert_eq!(back.text("absent"), None);
        assert!(back.has("x-empty") && !back.has("absent") && !back.has(":STATUS"));
    }

    #[test]
    fn the_first_of_repeated_headers_is_the_value() {
        let m = HeaderMap::parse(serialize_map(&[("a", b"1"), ("b", b"2"), ("a", b"3")])).unwrap();
        assert_eq!(m.get("a"), Some(&b"1"[..]));
        assert_eq!(m.iter().filter(|(k, _)| *k == b"a").count(), 2);
    }

    #[test]
    fn an_empty_buffer_is_an_empty_map() {
        assert_eq!(HeaderMap::parse(Vec::new()).unwrap().iter().count(), 0);
        assert_eq!(HeaderMap::parse(serialize_map(&[])).unwrap().iter().count(), 0);
    }

    #[test]
    fn lengths_outside_the_buffer_are_refused_not_trusted() {
        let good = serialize_map(&[("a", b"b")]);
        // Every truncation of a good map fails instead of reading past the end.
        for cut in 1..good.len() - 1 {
            assert!(HeaderMap::parse(good[..cut].to_vec()).is_none(), "cut at {cut}");
        }
        // A count far larger than the buffer.
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(HeaderMap::parse(huge).is_none());
        // A key length that runs past the end.
        let mut long_key = good.clone();
        long_key[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(HeaderMap::parse(long_key).is_none());
        // A value length that runs past the end.
        let mut long_value = good.clone();
        long_value[8..12].copy_from_slice(&100u32.to_le_bytes());
        assert!(HeaderMap::parse(long_value).is_none());
        // Three bytes cannot even hold the count.
        assert!(HeaderMap::parse(vec![1, 0, 0]).is_none());
    }

    #[test]
    fn random_maps_read_back_as_written_and_truncations_never_panic() {
        // A small xorshift: reproducible without a dependency.
        let mut rng = crate::testkeys::Xorshift(0x9e37_79b9_7f4a_7c15);
        let mut next = move |n: u64| rng.below(n);
        for _ in 0..2_000 {
            let owned: Vec<(String, Vec<u8>)> = (0..next(6))
                .map(|_| {
                    let name = (0..next(5)).map(|_| char::from(b'a' + next(3) as u8)).collect();
                    (name, (0..next(9)).map(|_| next(256) as u8).collect())
                })
                .collect();
            let pairs: Vec<(&str, &[u8])> = owned.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
            let bytes = serialize_map(&pairs);
            let m = HeaderMap::parse(bytes.clone()).unwrap();
            let want: Vec<(Vec<u8>, Vec<u8>)> = owned.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.clone())).collect();
            assert_eq!(entries(&m), want);
            for (k, _) in &owned {
                let first = owned.iter().find(|(k2, _)| k2 == k).map(|(_, v)| v.as_slice());
                assert_eq!(m.get(k), first, "{k}");
                assert_eq!(
                    m.text(k).map(|t| t.into_owned()),
                    first.map(|f| String::from_utf8_lossy(f).into_owned())
                );
            }
            let cut = next(bytes.len() as u64 + 1) as usize;
            let _ = HeaderMap::parse(bytes[..cut].to_vec()).map(|m| entries(&m));
        }
    }

    #[test]
    fn a_non_utf8_name_matches_no_name() {
        let raw = {
            let mut v = Vec::new();
            v.extend_from_slice(&1u32.to_le_bytes());
            v.extend_from_slice(&1u32.to_le_bytes());
            v.extend_from_slice(&1u32.to_le_bytes());
            v.extend_from_slice(&[0xfe, 0, b'v', 0]);
            v
        };
        let m = HeaderMap::parse(raw).unwrap();
        assert_eq!(entries(&m), vec![(vec![0xfe], b"v".to_vec())]);
        assert_eq!(m.get("\u{fffd}"), None);
    }

    #[test]
    fn verify_signature_arguments_are_four_length_delimited_fields() {
        let args = verify_signature_args("sha256", &[1, 2], &[3; 200], &[4, 5]);
        let mut want = vec![0x0a, 6];
        want.extend_from_slice(b"sha256");
        want.extend_from_slice(&[0x12, 2, 1, 2, 0x1a, 0xc8, 0x01]);
        want.extend_from_slice(&[3; 200]);
        want.extend_from_slice(&[0x22, 2, 4, 5]);
        assert_eq!(args, want);
    }

    #[test]
    fn a_verify_signature_answer_holds_only_with_its_result_set() {
        assert_eq!(verify_signature_result(&[0x08, 0x01]), Some(true));
        // The error string beside it, before or after.
        assert_eq!(
            verify_signature_result(&[0x12, 0x02, b'n', b'o', 0x08, 0x01]),
            Some(true)
        );
        // proto3 leaves out a false result: an error alone, or nothing, is a refusal.
        let refused = [&[0x12u8, 0x05][..], b"wrong"].concat();
        assert_eq!(verify_signature_result(&refused), Some(false));
        assert_eq!(verify_signature_result(&[]), Some(false));
        assert_eq!(verify_signature_result(&[0x08, 0x00]), Some(false));
        // Not that message: a truncated length, a varint past its bytes, a fixed-width field.
        assert_eq!(verify_signature_result(&[0x12, 0x09, b'x']), None);
        assert_eq!(verify_signature_result(&[0x08, 0x81]), None);
        assert_eq!(verify_signature_result(&[0x0d, 1, 0, 0, 0]), None);
    }
}
