//! Basic credentials (RFC 7617) as registries take them.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// `user:password` in base64, the value docker `config.json` keeps under `auth`.
pub fn encode_pair(username: &str, password: &str) -> String {
    STANDARD.encode(format!("{username}:{password}"))
}

/// The `Authorization` header value for `username` and `password`.
pub fn authorization(username: &str, password: &str) -> String {
    format!("Basic {}", encode_pair(username, password))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc7617_example() {
        assert_eq!(
            super::authorization("Aladdin", "open sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }
}
