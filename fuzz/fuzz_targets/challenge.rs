//! The upstream's `WWW-Authenticate` parser and the token-service answer reader.
#![no_main]
use connector_filter::upstream::{parse_challenge, parse_token_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = std::str::from_utf8(data)
        && let Some((scheme, params)) = parse_challenge(value)
    {
        assert!(!scheme.is_empty());
        assert!(params.keys().all(|k| !k.is_empty()));
    }
    if let Ok((authorization, keep)) = parse_token_response(200, data, "https://auth.example/token") {
        assert!(authorization.starts_with("Bearer "));
        assert!(
            !authorization.bytes().any(|b| b.is_ascii_control()),
            "no header injection"
        );
        assert!(keep > 0);
    }
});
