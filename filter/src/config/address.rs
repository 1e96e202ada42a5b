//! Upstream addresses: `http(s)://host[:port]` parsed, the authority normalised (lowercase,
//! default port dropped) the way clients and credential files write it.

use super::*;

impl Upstream {
    /// Parses `http(s)://host[:port][/]`. Distribution serves `/v2/` at the root, so no path.
    pub fn parse(address: &str) -> Result<Self, String> {
        let (scheme, rest) = address
            .split_once("://")
            .ok_or_else(|| "expected http://host[:port] or https://host[:port]".to_string())?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!("scheme {scheme:?} is not supported: expected http or https"));
        }
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) {
            return Err(
                "expected scheme://host[:port] with no path, query or user info: the registry API lives at /v2/".into(),
            );
        }
        let authority = normalise_authority(&scheme, authority)
            .ok_or_else(|| "host or port is invalid: expected scheme://host[:port]".to_string())?;
        Ok(Self { scheme, authority })
    }

    /// Whether an absolute URL's `scheme` and `authority` name this upstream.
    pub fn is_origin(&self, scheme: &str, authority: &str) -> bool {
        normalise_authority(&scheme.to_ascii_lowercase(), authority).is_some_and(|a| a == self.authority)
    }
}

/// Lowercases the host and drops the scheme's default port; `None` when malformed.
pub fn normalise_authority(scheme: &str, authority: &str) -> Option<String> {
    let authority = authority.to_ascii_lowercase();
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        // IPv6 literal: [addr] or [addr]:port.
        let (addr, after) = rest.split_once(']')?;
        if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return None;
        }
        let port = if after.is_empty() {
            None
        } else {
            Some(after.strip_prefix(':')?)
        };
        (format!("[{addr}]"), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority.as_str(), None),
        };
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return None;
        }
        (host.to_string(), port)
    };
    match port {
        None => Some(host),
        Some(p) => {
            let n: u16 = p.parse().ok().filter(|n| *n > 0)?;
            let default = if scheme == "https" { 443 } else { 80 };
            Some(if n == default { host } else { format!("{host}:{n}") })
        }
    }
}
