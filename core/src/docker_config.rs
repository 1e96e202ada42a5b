//! Reading a registry credential out of a docker `config.json` (a
//! `kubernetes.io/dockerconfigjson` Secret's `.dockerconfigjson`): the filter reads one handed
//! over in an environment variable, the controller one from a Secret.
//!
//! Which entry: the `auths` key naming the registry, written as `host`, `host:port` or
//! `https://host/v1/`, with the scheme's default port optional and Docker Hub's names
//! interchangeable. Which credential: a non-empty `auth` (base64 of `user:password`) wins over
//! `username`/`password`, as in the docker CLI and the kubelet.
//!
//! Problems name the entry's key and what was expected; none quotes a value.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::registry::is_docker_hub;

/// The credential found, and the `auths` key it was filed under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub key: String,
    pub username: String,
    pub password: String,
}

/// Why no credential came out; each caller words it for its own input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// serde_json's message (positions only, never input).
    NotJson(String),
    NoAuths,
    /// No key names the registry; the keys there are, sorted.
    NoEntry(Vec<String>),
    /// `auth` is not base64 of UTF-8 text.
    AuthNotBase64 {
        key: String,
    },
    /// `auth` decodes to text without `:`.
    AuthNotPair {
        key: String,
    },
    /// Neither a non-empty `auth` nor a non-empty username and password.
    NoCredential {
        key: String,
    },
}

/// The `host[:port]` an `auths` key names, lowercase, without `:<default_port>`.
pub fn key_authority(key: &str, default_port: u16) -> String {
    let rest = key.split_once("://").map_or(key, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or(rest).to_ascii_lowercase();
    let suffix = format!(":{default_port}");
    host.strip_suffix(&suffix).unwrap_or(&host).to_string()
}

/// Whether the `auths` key names the registry at `authority` (lowercase `host[:port]`, without
/// its scheme's default port).
pub fn key_matches(key: &str, authority: &str, default_port: u16) -> bool {
    let k = key_authority(key, default_port);
    k == authority || (is_docker_hub(authority) && is_docker_hub(&k))
}

/// The credential for the registry at `authority` in `json`.
pub fn credential_for(json: &[u8], authority: &str, default_port: u16) -> Result<Found, Problem> {
    let doc: serde_json::Value = serde_json::from_slice(json).map_err(|e| Problem::NotJson(e.to_string()))?;
    let auths = doc.get("auths").and_then(|a| a.as_object()).ok_or(Problem::NoAuths)?;
    let Some((key, entry)) = auths.iter().find(|(k, _)| key_matches(k, authority, default_port)) else {
        let mut keys: Vec<String> = auths.keys().cloned().collect();
        keys.sort_unstable();
        return Err(Problem::NoEntry(keys));
    };
    let key = key.clone();
    let text = |name: &str| entry.get(name).and_then(|v| v.as_str()).filter(|s| !s.is_empty());
    if let Some(auth) = text("auth") {
        let decoded = STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| Problem::AuthNotBase64 { key: key.clone() })?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| Problem::AuthNotPair { key: key.clone() })?;
        return Ok(Found {
            username: username.to_string(),
            password: password.to_string(),
            key,
        });
    }
    match (text("username"), text("password")) {
        (Some(u), Some(p)) => Ok(Found {
            username: u.to_string(),
            password: p.to_string(),
            key,
        }),
        _ => Err(Problem::NoCredential { key }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(json: &str, authority: &str) -> Result<(String, String), Problem> {
        credential_for(json.as_bytes(), authority, 443).map(|f| (f.username, f.password))
    }

    #[test]
    fn finds_the_entry_and_reads_it_as_docker_does() {
        let pair = |u: &str, p: &str| Ok((u.to_string(), p.to_string()));
        let b64 = STANDARD.encode("robot:s3cret");
        assert_eq!(
            find(
                &format!(r#"{{"auths":{{"https://Harbor.example.com/v1/":{{"auth":"{b64}"}}}}}}"#),
                "harbor.example.com"
            ),
            pair("robot", "s3cret")
        );
        assert_eq!(
            find(
                &format!(
                    r#"{{"auths":{{"harbor.example.com:443":{{"auth":"{b64}","username":"u","password":"p"}}}}}}"#
                ),
                "harbor.example.com"
            ),
            pair("robot", "s3cret")
        );
        assert_eq!(
            find(
                r#"{"auths":{"r:5000":{"auth":"","username":"u","password":"p"}}}"#,
                "r:5000"
            ),
            pair("u", "p")
        );
        assert_eq!(
            find(
                &format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{b64}"}}}}}}"#),
                "registry-1.docker.io"
            ),
            pair("robot", "s3cret")
        );
        assert_eq!(
            find(r#"{"auths":{"b":{},"a":{}}}"#, "c"),
            Err(Problem::NoEntry(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            find(r#"{"auths":{"c":{"auth":"!!"}}}"#, "c"),
            Err(Problem::AuthNotBase64 { key: "c".into() })
        );
        assert_eq!(
            find(r#"{"auths":{"c":{"auth":"eHk="}}}"#, "c"),
            Err(Problem::AuthNotPair { key: "c".into() })
        );
        assert_eq!(
            find(r#"{"auths":{"c":{"username":"u"}}}"#, "c"),
            Err(Problem::NoCredential { key: "c".into() })
        );
        assert_eq!(find(r#"{"other":{}}"#, "c"), Err(Problem::NoAuths));
        assert!(matches!(find("{", "c"), Err(Problem::NotJson(m)) if !m.contains('{')));
        // http registries: port 80 is the default one.
        assert!(key_matches("http://r.example.com:80", "r.example.com", 80));
        assert!(!key_matches("r.example.com:80", "r.example.com", 443));
    }
}
