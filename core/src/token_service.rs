//! The distribution token specification, as both the filter and the controller's probe speak
//! it: the `WWW-Authenticate` challenge an upstream answers `GET /v2/` with, and the token
//! service's answer.

use std::collections::HashMap;

use serde_json::Value;

/// Token lifetimes outside these bounds are clamped: a zero or negative `expires_in` would
/// mean a fetch per request, a huge one a token kept after the upstream stopped honouring it.
pub const DEFAULT_EXPIRES_IN: u64 = 60;
pub const MIN_EXPIRES_IN: u64 = 10;
pub const MAX_EXPIRES_IN: u64 = 24 * 3600;
/// The token service's answer is small; anything larger is refused unparsed.
pub const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// A parsed `WWW-Authenticate` value: scheme (lowercase) and its parameters.
pub fn parse_challenge(value: &str) -> Option<(String, HashMap<String, String>)> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(char::is_whitespace).unwrap_or((value, ""));
    if scheme.is_empty() || !scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return None;
    }
    let mut params = HashMap::new();
    let mut chars = rest.trim().chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut name = String::new();
        while let Some(c) = chars.peek().copied() {
            if c == '=' || c == ',' || c.is_whitespace() {
                break;
            }
            name.push(c);
            chars.next();
        }
        if name.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            return None;
        }
        chars.next();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            val.push(n);
                        }
                    }
                    '"' => {
                        closed = true;
                        break;
                    }
                    _ => val.push(c),
                }
            }
            if !closed {
                return None;
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                val.push(c);
                chars.next();
            }
        }
        params.insert(name.to_ascii_lowercase(), val);
    }
    Some((scheme.to_ascii_lowercase(), params))
}

/// A usable token from a token service's answer: `(Authorization value, seconds to keep it)`;
/// `Err` finishes the sentence "the token service at <realm> ..." (never with the body's text).
pub fn token_from_answer(status: u32, body: &[u8]) -> Result<(String, u64), String> {
    match status {
        200 => {}
        0 => return Err("did not answer in time: retry later".into()),
        401 | 403 => {
            return Err(format!(
                "refused the connector's credential ({status}): the connector's Secret is wrong or lacks access"
            ));
        }
        502..=504 => {
            return Err(format!(
                "could not be reached or is unavailable ({status}): retry later"
            ));
        }
        other => return Err(format!("answered {other}: retry later")),
    }
    if body.len() > MAX_TOKEN_RESPONSE {
        return Err("answered with an oversized body".into());
    }
    let v: Value = serde_json::from_slice(body).map_err(|_| "answered with something that is not JSON".to_string())?;
    let token = ["token", "access_token"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str).filter(|t| !t.is_empty()))
        .ok_or_else(|| "answered without a token".to_string())?;
    if token.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err("answered with a malformed token".into());
    }
    let expires_in = v
        .get("expires_in")
        .and_then(Value::as_f64)
        .map(|s| {
            if s.is_finite() && s > 0.0 {
                s as u64
            } else {
                DEFAULT_EXPIRES_IN
            }
        })
        .unwrap_or(DEFAULT_EXPIRES_IN)
        .clamp(MIN_EXPIRES_IN, MAX_EXPIRES_IN);
    // Refresh shortly before the upstream would refuse it.
    let keep = expires_in - (expires_in / 10).clamp(1, 30);
    Ok((format!("Bearer {token}"), keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let (s, p) =
            parse_challenge(r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push""#)
                .unwrap();
        assert_eq!(s, "bearer");
        assert_eq!(p["realm"], "https://auth.example.com/token");
        assert_eq!(p["service"], "registry.example.com");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let (s, p) = parse_challenge("Basic realm=\"Registry Realm\"").unwrap();
        assert_eq!((s.as_str(), p["realm"].as_str()), ("basic", "Registry Realm"));
        let (_, p) = parse_challenge(r#"Bearer realm = "a\"b" , service=plain"#).unwrap();
        assert_eq!((p["realm"].as_str(), p["service"].as_str()), ("a\"b", "plain"));
        assert!(parse_challenge("Bearer realm=\"unterminated").is_none());
        assert!(parse_challenge("Bearer realm").is_none());
        assert!(parse_challenge("").is_none());
    }

    #[test]
    fn urls_split_for_realms() {
        assert_eq!(
            crate::address::split_url("https://Auth.Example.com:443/token?x=1").unwrap(),
            ("https".into(), "auth.example.com".into(), "/token?x=1".into())
        );
        assert_eq!(crate::address::split_url("http://h:5000").unwrap().2, "/");
        assert!(crate::address::split_url("ftp://h/x").is_none());
        assert!(crate::address::split_url("http://u:p@h/x").is_none());
    }

    #[test]
    fn token_answers() {
        assert_eq!(
            token_from_answer(200, br#"{"access_token":"t","expires_in":300}"#),
            Ok(("Bearer t".into(), 270))
        );
        assert!(
            token_from_answer(200, br#"{"token":"a b"}"#)
                .unwrap_err()
                .contains("malformed")
        );
        assert!(
            token_from_answer(401, b"{}")
                .unwrap_err()
                .contains("refused the connector's credential")
        );
        assert!(token_from_answer(200, b"<html>").unwrap_err().contains("not JSON"));
        assert!(token_from_answer(0, b"").unwrap_err().contains("in time"));
    }
}
