//! Percent-encoding and -decoding of query values (decoding as `application/x-www-form-urlencoded`:
//! `+` is a space).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Everything but RFC 3986's unreserved characters is escaped.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters pass).
pub fn encode_query_value(v: &str) -> String {
    utf8_percent_encode(v, QUERY_VALUE).to_string()
}

/// The decoded value, or `None` when it is not UTF-8 or has a bad escape (a `%` not followed by
/// two hex digits): a request the proxy cannot read exactly is refused, never guessed at.
pub fn decode_query_value(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let bad_escape = b
        .iter()
        .enumerate()
        .any(|(i, c)| *c == b'%' && !b.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)));
    if bad_escape {
        return None;
    }
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::decode_query_value as d;
    use super::*;

    #[test]
    fn encodes_all_but_unreserved() {
        assert_eq!(
            encode_query_value("repository:team/app:pull,push"),
            "repository%3Ateam%2Fapp%3Apull%2Cpush"
        );
        assert_eq!(encode_query_value("a-b.c_d~e f+é"), "a-b.c_d~e%20f%2B%C3%A9");
        assert_eq!(
            decode_query_value(&encode_query_value("x y/é")).as_deref(),
            Some("x y/é")
        );
    }

    #[test]
    fn decodes_or_refuses() {
        assert_eq!(d("namespaces%2Fdemo%2Fx").as_deref(), Some("namespaces/demo/x"));
        assert_eq!(d("a+b%2B").as_deref(), Some("a b+"));
        assert_eq!(d("plain").as_deref(), Some("plain"));
        assert_eq!(d("%2"), None);
        assert_eq!(d("%zz"), None);
        assert_eq!(d("%ff"), None);
    }
}
