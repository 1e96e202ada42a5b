//! The proxy-wasm ABI's byte formats: header maps and property paths, as the host lends and
//! takes them. Plain functions so native tests cover them; [`crate::host`] uses them.
//!
//! A map is `count`, then a `(key length, value length)` pair per entry, then every key and
//! value each followed by a NUL. A map the host hands over that does not parse is treated as
//! empty, never trusted for its lengths: the lengths are checked against the buffer.

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

/// Reads a header map the host serialised; `None` when a length points outside the buffer.
/// Header names are ASCII in HTTP; a name that is not UTF-8 is kept lossily (it can match no
/// name the filter looks for).
pub fn deserialize_map(bytes: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let n = u32_at(bytes, 0)?;
    // Each entry takes at least 8 bytes of lengths and 2 NULs: a larger count is a lie.
    if n.checked_mul(10)? > bytes.len() {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    let mut at = 4usize.checked_add(n.checked_mul(8)?)?;
    for i in 0..n {
        let kl = u32_at(bytes, 4 + i * 8)?;
        let vl = u32_at(bytes, 8 + i * 8)?;
        let k = bytes.get(at..at.checked_add(kl)?)?;
        at = at.checked_add(kl)?.checked_add(1)?;
        let v = bytes.get(at..at.checked_add(vl)?)?;
        at = at.checked_add(vl)?.checked_add(1)?;
        out.push((text(k), v.to_vec()));
    }
    Some(out)
}

/// `bytes` as text, invalid UTF-8 replaced by U+FFFD. Header values are almost always valid
/// (ASCII): `str::from_utf8` checks those a word at a time, where `String::from_utf8_lossy`
/// walks them byte by byte: in a `perf` profile of `warm-cost`, 2.7 % of the run (a tenth of
/// the module's own time on a warm request, most of it the ~1 KB token) against 0.8 % for
/// `from_utf8`.
pub fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// The first value of header `name` (names as the host gives them: lowercase) in a map
/// [`deserialize_map`] read, as [`text`].
pub fn header(headers: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| text(v))
}

/// A property path (`["filter_state", "x"]`) as the host expects it: parts separated by NUL.
pub fn serialize_path(path: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, part) in path.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(part.as_bytes());
    }
    out
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

    #[test]
    fn a_map_round_trips() {
        let pairs: Vec<(&str, &[u8])> = vec![(":status", b"200"), ("x-empty", b""), ("bin", &[0xff, 0, 1])];
        let back = deserialize_map(&serialize_map(&pairs)).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[0], (":status".to_string(), b"200".to_vec()));
        assert_eq!(back[1], ("x-empty".to_string(), Vec::new()));
        assert_eq!(back[2], ("bin".to_string(), vec![0xff, 0, 1]));
        assert_eq!(header(&back, ":status").as_deref(), Some("200"));
        assert_eq!(header(&back, "x-empty").as_deref(), Some(""));
        assert_eq!(header(&back, "bin").as_deref(), Some("\u{FFFD}\0\u{1}"));
        assert_eq!(header(&back, "absent"), None);
    }

    #[test]
    fn an_empty_buffer_is_an_empty_map() {
        assert_eq!(deserialize_map(&[]).unwrap(), Vec::new());
        assert_eq!(deserialize_map(&serialize_map(&[])).unwrap(), Vec::new());
    }

    #[test]
    fn lengths_outside_the_buffer_are_refused_not_trusted() {
        let good = serialize_map(&[("a", b"b")]);
        // Every truncation of a good map fails instead of reading past the end.
        for cut in 1..good.len() - 1 {
            assert_eq!(deserialize_map(&good[..cut]), None, "cut at {cut}");
        }
        // A count far larger than the buffer.
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(deserialize_map(&huge), None);
        // A key length that runs past the end.
        let mut long_key = good.clone();
        long_key[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(deserialize_map(&long_key), None);
        // Three bytes cannot even hold the count.
        assert_eq!(deserialize_map(&[1, 0, 0]), None);
    }

    #[test]
    fn a_non_utf8_name_is_kept_lossily() {
        let raw = {
            let mut v = Vec::new();
            v.extend_from_slice(&1u32.to_le_bytes());
            v.extend_from_slice(&1u32.to_le_bytes());
            v.extend_from_slice(&1u32.to_le_bytes());
            v.extend_from_slice(&[0xfe, 0, b'v', 0]);
            v
        };
        let m = deserialize_map(&raw).unwrap();
        assert_eq!(m[0].0, "\u{fffd}");
        assert_eq!(m[0].1, b"v");
    }

    #[test]
    fn a_path_is_nul_separated() {
        assert_eq!(serialize_path(&["filter_state", "oci"]), b"filter_state\0oci");
        assert_eq!(serialize_path(&["x"]), b"x");
        assert_eq!(serialize_path(&[]), b"");
    }
}
