//! Image references: parsing by the distribution reference grammar
//! (`[domain/]path[:tag][@digest]`), Docker Hub normalisation, and the registry-host
//! normalisation shared by image references and `Connector.spec.address`. The webhook rewrites
//! images by it and the credential provider matches the kubelet's images by it.
//!
//! A reference that does not parse is an error, never a guess: the webhook must not rewrite an
//! image to something the runtime would read differently.

use std::fmt;

/// The registry Docker Hub short names (`nginx`, `library/nginx`) resolve to.
pub const DOCKER_HUB: &str = "docker.io";
/// The whole name (domain and path) may not be longer than this (distribution's `NameTotalLengthMax`).
const NAME_MAX: usize = 255;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host as clients name it, lowercased, Docker Hub aliases folded into `docker.io`.
    pub registry: String,
    /// Repository path inside the registry (`library/nginx` for Docker Hub short names).
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

/// Why a reference or an address is not one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefError(String);

impl fmt::Display for RefError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RefError {}

impl ImageRef {
    /// Parses `image` as a container runtime would (containerd/docker `ParseNormalizedNamed`).
    pub fn parse(image: &str) -> Result<Self, RefError> {
        let err = |why: &str| Err(RefError(why.to_string()));
        if image.is_empty() {
            return err("the image reference is empty");
        }
        if image.trim() != image || image.contains(char::is_whitespace) {
            return err("the image reference contains whitespace");
        }
        let (rest, digest) = match image.split_once('@') {
            Some((rest, digest)) => {
                check_digest(digest)?;
                (rest, Some(digest.to_string()))
            }
            None => (image, None),
        };
        // A tag follows the last ':' that comes after the last '/' (a ':' before it is a port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let after_slash = rest.get(last_slash..).unwrap_or_default();
        let (name, tag) = match after_slash.rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                let (name, tag) = (
                    rest.get(..at).unwrap_or_default(),
                    rest.get(at + 1..).unwrap_or_default(),
                );
                check_tag(tag)?;
                (name, Some(tag.to_string()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return err("the image reference has no repository name");
        }
        if name.len() > NAME_MAX {
            return Err(RefError(format!(
                "the repository name is longer than {NAME_MAX} characters"
            )));
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, path)) if is_domain_like(first) => {
                check_domain(first)?;
                (normalize_registry(first), path)
            }
            _ => (DOCKER_HUB.to_string(), name),
        };
        check_path(path)?;
        let repository = if domain == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        Ok(Self {
            registry: domain,
            repository,
            tag,
            digest,
        })
    }

    /// `[:tag][@digest]` as written after the repository.
    pub fn suffix(&self) -> String {
        let mut s = String::new();
        if let Some(tag) = &self.tag {
            s.push(':');
            s.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            s.push('@');
            s.push_str(digest);
        }
        s
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}{}", self.registry, self.repository, self.suffix())
    }
}

/// The distribution grammar's rule: a first component names a registry when it contains `.` or
/// `:`, is `localhost`, or has an uppercase letter (a path component never may).
fn is_domain_like(first: &str) -> bool {
    first.contains(['.', ':']) || first == "localhost" || first.chars().any(|c| c.is_ascii_uppercase())
}

/// Lowercases a registry host and folds Docker Hub's names into `docker.io`.
pub fn normalize_registry(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    if crate::registry::is_docker_hub(&host) {
        DOCKER_HUB.to_string()
    } else {
        host
    }
}

/// The registry host of a `Connector.spec.address` (`http(s)://host[:port][/]`): scheme
/// stripped, the scheme's default port omitted, normalised like image registries.
pub fn registry_of_address(address: &str) -> Result<String, RefError> {
    // The address is not repeated: one written with user info would carry a password.
    let upstream =
        crate::address::Upstream::parse(address).map_err(|why| RefError(format!("the Connector's address: {why}")))?;
    check_domain(&upstream.authority)?;
    Ok(normalize_registry(&upstream.authority))
}

/// `host[:port]`: dot-separated DNS labels (letters, digits, inner `-`) or a bracketed IPv6
/// address, and an optional decimal port.
pub fn check_domain(domain: &str) -> Result<(), RefError> {
    let bad = || Err(RefError(format!("{domain:?} is not a valid registry host[:port]")));
    let (host, port) = if let Some(inner) = domain.strip_prefix('[') {
        let Some((v6, after)) = inner.split_once(']') else {
            return bad();
        };
        if v6.is_empty() || !v6.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return bad();
        }
        match after {
            "" => ("v6", None),
            p => match p.strip_prefix(':') {
                Some(port) => ("v6", Some(port)),
                None => return bad(),
            },
        }
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (domain, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.chars().all(|c| c.is_ascii_digit()))
    {
        return bad();
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || !host.split('.').all(label_ok) {
        return bad();
    }
    Ok(())
}

/// Path components: `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`, separated by `/`.
fn check_path(path: &str) -> Result<(), RefError> {
    for component in path.split('/') {
        if !component_ok(component) {
            return Err(RefError(format!(
                "repository path component {component:?} is invalid: only lowercase letters, digits \
                 and single separators (. _ __ -) are allowed"
            )));
        }
    }
    Ok(())
}

fn component_ok(c: &str) -> bool {
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let b = c.as_bytes();
    if !b.first().is_some_and(|x| alnum(*x)) || !b.last().is_some_and(|x| alnum(*x)) {
        return false;
    }
    // Between alphanumeric runs: exactly one separator, `.`, `_`, `__` or a run of `-`.
    c.split(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit())
        .filter(|sep| !sep.is_empty())
        .all(|sep| sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-'))
}

/// `[\w][\w.-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), RefError> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tag.chars();
    let first_ok = chars.next().is_some_and(word);
    if !first_ok || tag.len() > 128 || !chars.all(|c| word(c) || c == '.' || c == '-') {
        return Err(RefError(format!(
            "tag {tag:?} is invalid: 1 to 128 of letters, digits, _ . - (not starting with . or -)"
        )));
    }
    Ok(())
}

/// `algorithm:encoded`; sha256 and sha512 digests must have their exact lowercase-hex length.
fn check_digest(digest: &str) -> Result<(), RefError> {
    let bad = |why: &str| Err(RefError(format!("digest {digest:?} is invalid: {why}")));
    let Some((alg, enc)) = digest.split_once(':') else {
        return bad("expected algorithm:hex");
    };
    let alg_ok = !alg.is_empty()
        && alg
            .split(['+', '.', '_', '-'])
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
    if !alg_ok {
        return bad("bad algorithm");
    }
    let hex = |n: usize| enc.len() == n && enc.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    match alg {
        "sha256" if !hex(64) => bad("sha256 needs 64 lowercase hex digits"),
        "sha512" if !hex(128) => bad("sha512 needs 128 lowercase hex digits"),
        _ if enc.len() < 32 || !enc.chars().all(|c| c.is_ascii_alphanumeric() || "=_-".contains(c)) => {
            bad("the encoded part must be at least 32 of [a-zA-Z0-9=_-]")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// (registry, repository, tag, digest).
    type Parts<S> = (S, S, Option<String>, Option<String>);

    fn parsed(s: &str) -> Parts<String> {
        let r = ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        (r.registry, r.repository, r.tag, r.digest)
    }

    #[test]
    fn parses_and_normalises_like_a_runtime() {
        let o = |s: &str| Some(s.to_string());
        let digest = format!("nginx@{D}");
        let tag_digest = format!("harbor.example.com:8443/team/app:v1@{D}");
        let cases: Vec<(&str, Parts<&str>)> = vec![
            ("nginx", ("docker.io", "library/nginx", None, None)),
            ("nginx:1.27", ("docker.io", "library/nginx", o("1.27"), None)),
            ("library/nginx", ("docker.io", "library/nginx", None, None)),
            ("bitnami/redis:7", ("docker.io", "bitnami/redis", o("7"), None)),
            ("docker.io/nginx", ("docker.io", "library/nginx", None, None)),
            (
                "index.docker.io/library/nginx",
                ("docker.io", "library/nginx", None, None),
            ),
            (
                "registry-1.docker.io/nginx:x",
                ("docker.io", "library/nginx", o("x"), None),
            ),
            ("Docker.IO/nginx", ("docker.io", "library/nginx", None, None)),
            ("localhost/app", ("localhost", "app", None, None)),
            ("localhost:5000/a/b/c:t", ("localhost:5000", "a/b/c", o("t"), None)),
            ("127.0.0.1:5000/app", ("127.0.0.1:5000", "app", None, None)),
            (
                "Harbor.Example.com/lib/app",
                ("harbor.example.com", "lib/app", None, None),
            ),
            ("[::1]:5000/app:v", ("[::1]:5000", "app", o("v"), None)),
            (digest.as_str(), ("docker.io", "library/nginx", None, o(D))),
            (
                tag_digest.as_str(),
                ("harbor.example.com:8443", "team/app", o("v1"), o(D)),
            ),
            (
                "ghcr.io/a/b-c__d.e---f:V_1.0-x",
                ("ghcr.io", "a/b-c__d.e---f", o("V_1.0-x"), None),
            ),
        ];
        for (input, (reg, repo, tag, digest)) in cases {
            assert_eq!(
                parsed(input),
                (reg.to_string(), repo.to_string(), tag, digest),
                "{input}"
            );
        }
    }

    #[test]
    fn refuses_what_a_runtime_refuses() {
        for bad in [
            "",
            "Nginx",
            "nginx:",
            "nginx:-x",
            "nginx@sha256:abc",
            "nginx@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
            "nginx@",
            "host.example.com/",
            "host.example.com/App",
            "a//b",
            "a/b/",
            "a..b",
            "a_-b",
            "-a",
            " nginx",
            "nginx latest",
            "host:port/app",
            "bad_host.example.com/app",
            "-h.example.com/app",
            "[zz]:5/app",
            "h.example.com:/app",
            "h.example.com:123456/app",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} should not parse");
        }
        let long = format!("x.io/{}", "a".repeat(260));
        assert!(ImageRef::parse(&long).is_err());
    }

    #[test]
    fn displays_normalised() {
        let r = ImageRef::parse(&format!("nginx:1@{D}")).unwrap();
        assert_eq!(r.to_string(), format!("docker.io/library/nginx:1@{D}"));
        assert_eq!(r.suffix(), format!(":1@{D}"));
    }

    #[test]
    fn registry_of_address_strips_scheme_and_default_port() {
        for (address, want) in [
            ("https://harbor.example.com", Ok("harbor.example.com")),
            ("https://harbor.example.com/", Ok("harbor.example.com")),
            ("https://harbor.example.com:443", Ok("harbor.example.com")),
            ("http://harbor.example.com:80/", Ok("harbor.example.com")),
            ("http://harbor.example.com:443", Ok("harbor.example.com:443")),
            ("https://127.0.0.1:5000", Ok("127.0.0.1:5000")),
            ("https://Registry-1.Docker.io", Ok("docker.io")),
            ("https://index.docker.io", Ok("docker.io")),
            ("https://[::1]:443", Ok("[::1]")),
            ("harbor.example.com", Err(())),
            ("https://h/x", Err(())),
            ("https://", Err(())),
            ("https://u@h", Err(())),
        ] {
            let got = registry_of_address(address).map_err(|_| ());
            assert_eq!(got, want.map(str::to_string), "{address}");
        }
        // An address written with user info is refused without repeating it.
        let e = registry_of_address("https://robot:s3cret@harbor.example.com").unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }
}
