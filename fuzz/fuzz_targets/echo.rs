//! The echo check (an upstream answer repeating the credential the filter sent): whatever the
//! answer holds, a credential in it is found as sent and under each encoding an echo puts on
//! it, and nothing panics. Input: the credential, a newline, then the answer's text.
#![no_main]
use connector_filter::leak::{contains_any, entry_holds_any, secrets_of};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(at) = data.iter().position(|&b| b == b'\n') else {
        return;
    };
    let (Ok(token), text) = (std::str::from_utf8(&data[..at]), &data[at + 1..]) else {
        return;
    };
    // A bearer token's forms are the value and the token; shorter ones are not checked, and a
    // token with a space or control byte is no token.
    if token.len() < 4 || token.bytes().any(|b| b <= b' ') {
        let _ = contains_any(text, &secrets_of(&format!("Bearer {token}")));
        return;
    }
    let secrets = secrets_of(&format!("Bearer {token}"));
    let _ = entry_holds_any(text, text, &secrets);
    // The answer with the token after it, as sent and encoded: found each time. (A space
    // apart, so the answer's last bytes cannot join the encoding's first into another escape.)
    let percent: String = token.bytes().map(|b| format!("%{b:02x}")).collect();
    let json = serde_json::to_string(token).unwrap_or_default();
    let go_json = json.replace('<', "\\u003c").replace('>', "\\u003e").replace('&', "\\u0026");
    let html: String = token.chars().map(|c| format!("&#{};", c as u32)).collect();
    for encoded in [token.to_string(), percent, json, go_json, html] {
        let mut answer = text.to_vec();
        answer.push(b' ');
        answer.extend_from_slice(encoded.as_bytes());
        assert!(contains_any(&answer, &secrets), "{token:?} not found in {encoded:?}");
    }
});
