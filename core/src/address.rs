//! Upstream addresses and realm URLs: `http(s)://host[:port]` parsed, the authority normalised
//! (lowercase, default port dropped) the way clients and credential files write it.
//!
//! Hand-parsed rather than through `url`: the filter links this into its Wasm module, whose size
//! is budgeted (issue 14), and `url` brings IDNA tables a registry address never needs (a
//! non-ASCII host is refused here instead).

/// The upstream registry's origin, as the connector's `address` gives it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]`, lowercase, default port omitted.
    pub authority: String,
}

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

/// Splits an absolute `http(s)` URL into scheme, normalised authority and path (with query);
/// `None` for anything else (user info, fragments, other schemes).
pub fn split_url(url: &str) -> Option<(String, String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at_checked(end)?;
    if authority.contains('@') || path.contains('#') {
        return None;
    }
    let authority = normalise_authority(&scheme, authority)?;
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Some((scheme, authority, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_normalised() {
        assert_eq!(
            Upstream::parse("HTTPS://Harbor.Example.com:443/").unwrap().authority,
            "harbor.example.com"
        );
        assert_eq!(Upstream::parse("http://h:8080/").unwrap().authority, "h:8080");
        assert_eq!(Upstream::parse("http://[::1]:5000").unwrap().authority, "[::1]:5000");
        for bad in [
            "http://h/v2",
            "http://u:p@h",
            "h:5000",
            "http://h:0",
            "ftp://h",
            "http://h:x",
            "http://hä",
        ] {
            assert!(Upstream::parse(bad).is_err(), "{bad}");
        }
        let u = Upstream::parse("http://h:8080").unwrap();
        assert!(u.is_origin("HTTP", "H:8080"));
        assert!(!u.is_origin("http", "h:8081"));
        assert!(Upstream::parse("https://h").unwrap().is_origin("https", "h:443"));
    }

    #[test]
    fn urls_split_into_origin_and_path() {
        assert_eq!(
            split_url("https://Auth.Example.com:443/token?service=x"),
            Some(("https".into(), "auth.example.com".into(), "/token?service=x".into()))
        );
        assert_eq!(split_url("http://h?x=1").map(|s| s.2), Some("/?x=1".into()));
        assert_eq!(split_url("https://u@h/"), None);
        assert_eq!(split_url("https://h/#f"), None);
        assert_eq!(split_url("ftp://h/"), None);
    }
}
