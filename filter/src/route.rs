//! Request routing: which distribution endpoint a path names, and the grammars of every path
//! component (OCI repository names, tags, digests, upload ids, Kubernetes names).
//!
//! Parsing works from the *end* of the path, as CNCF Distribution's router does: a reference,
//! digest or upload id never contains `/`, so the endpoint is fixed by the last two or three
//! segments and everything before it is the repository name (which may itself contain
//! `manifests` or `connectors` components). Every component is checked against its grammar,
//! so dot segments, empty segments, `%`-escapes and control characters never reach an upstream.

use crate::respond::{Refusal, quote};

/// Longest repository name accepted (Docker's reference grammar caps whole names at 255).
pub const MAX_REPOSITORY_LEN: usize = 255;

pub const PATH_FORM: &str =
    "/v2/namespaces/<namespace>/connectors/<connector>/<repository>/{manifests,blobs,tags,referrers}/...";

const ENDPOINTS: &str = "<repository>/manifests/<tag|digest>, <repository>/blobs/<digest>, \
    <repository>/blobs/uploads/[<id>], <repository>/tags/list or <repository>/referrers/<digest>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Manifest,
    Blob,
    UploadStart,
    Upload,
    TagsList,
    Referrers,
}

impl Endpoint {
    /// The methods the distribution spec defines on this endpoint (`Allow` of a 405). Anything
    /// else is refused before it reaches the upstream with the connector's credential.
    pub fn allowed_methods(self) -> &'static str {
        match self {
            Endpoint::Manifest => "GET, HEAD, PUT, DELETE",
            Endpoint::Blob => "GET, HEAD, DELETE",
            Endpoint::UploadStart => "POST",
            Endpoint::Upload => "GET, PATCH, PUT, DELETE",
            Endpoint::TagsList | Endpoint::Referrers => "GET, HEAD",
        }
    }

    /// Whether `method` (as sent, case-sensitive like HTTP methods) is one of
    /// [`Endpoint::allowed_methods`].
    pub fn allows(self, method: &str) -> bool {
        !method.is_empty() && self.allowed_methods().split(", ").any(|m| m == method)
    }

    /// The endpoint's shape, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Endpoint::Manifest => "<repository>/manifests/<reference>",
            Endpoint::Blob => "<repository>/blobs/<digest>",
            Endpoint::UploadStart => "<repository>/blobs/uploads/",
            Endpoint::Upload => "<repository>/blobs/uploads/<id>",
            Endpoint::TagsList => "<repository>/tags/list",
            Endpoint::Referrers => "<repository>/referrers/<digest>",
        }
    }
}

/// The methods of `/v2/` (the API version check).
pub const BASE_METHODS: &str = "GET, HEAD";

/// A distribution request below `/v2/`, split into repository and endpoint: slices of the
/// request's path (nothing copied per request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRequest<'a> {
    pub repository: &'a str,
    pub endpoint: Endpoint,
    /// The path after the repository name, starting with `/` (e.g. `/manifests/v1`).
    pub tail: &'a str,
}

impl RepoRequest<'_> {
    /// The upstream path: the same endpoint on the plain `/v2/<repository>` name.
    pub fn upstream_path(&self) -> String {
        ["/v2/", self.repository, self.tail].concat()
    }
}

/// The top-level shape of a request path (query already removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum V2Path<'a> {
    /// `/v2` or `/v2/`: the API version check, answered by the filter.
    Base,
    /// `/v2/_catalog`: refused, it would enumerate other tenants' repositories.
    Catalog,
    /// Anything else below `/v2/`, without the `/v2/` prefix.
    Below(&'a str),
    /// Not a distribution API path at all.
    Other,
}

pub fn classify(path: &str) -> V2Path<'_> {
    match path {
        "/v2" | "/v2/" => V2Path::Base,
        _ => match path.strip_prefix("/v2/") {
            Some("_catalog") => V2Path::Catalog,
            Some(rest) => V2Path::Below(rest),
            None => V2Path::Other,
        },
    }
}

/// Path form: `namespaces/<ns>/connectors/<name>/<repository>/<endpoint>`.
/// Returns `(namespace, connector name, request)`.
pub fn parse_path_form(rest: &str) -> Result<(&str, &str, RepoRequest<'_>), Refusal> {
    let mut parts = rest.splitn(5, '/');
    let (Some("namespaces"), Some(ns), Some("connectors"), Some(name), Some(remainder)) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::not_found(
            "not_a_connector_path",
            format!(
                "no connector addressed: expected {PATH_FORM}, or a connector's host name with /v2/<repository>/..."
            ),
        ));
    };
    if !is_dns_label(ns) {
        return Err(Refusal::name_invalid(format!(
            "namespace {} is invalid: expected a Kubernetes namespace name (lowercase letters, digits and '-', at most 63); path form is {PATH_FORM}",
            quote(ns)
        )));
    }
    if !is_dns_subdomain(name) {
        return Err(Refusal::name_invalid(format!(
            "connector name {} is invalid: expected a Kubernetes object name (lowercase letters, digits, '-' and '.', at most 253); path form is {PATH_FORM}",
            quote(name)
        )));
    }
    let request = parse_repo_request(remainder)?;
    Ok((ns, name, request))
}

/// `<repository>/<endpoint>` as in a plain `/v2/` path.
pub fn parse_repo_request(rest: &str) -> Result<RepoRequest<'_>, Refusal> {
    let (repository, endpoint, tail) = split_endpoint(rest).ok_or_else(|| {
        Refusal::not_found(
            "unknown_endpoint",
            format!("{} is not a distribution endpoint: expected {ENDPOINTS}", quote(rest)),
        )
    })?;
    if repository.is_empty() {
        return Err(Refusal::name_invalid(format!(
            "repository name is missing: expected {ENDPOINTS}"
        )));
    }
    if !is_repository_name(repository) {
        return Err(Refusal::name_invalid(format!(
            "repository name {} is invalid: expected path components of lowercase letters and digits, \
             separated by '.', '_', '__' or '-', joined by single '/', at most {MAX_REPOSITORY_LEN} characters",
            quote(repository)
        )));
    }
    Ok(RepoRequest {
        repository,
        endpoint,
        tail,
    })
}

/// Finds the endpoint from the end of the path; returns (repository, endpoint, tail).
fn split_endpoint(rest: &str) -> Option<(&str, Endpoint, &str)> {
    if let Some(repo) = rest.strip_suffix("/blobs/uploads/") {
        return Some((repo, Endpoint::UploadStart, "/blobs/uploads/"));
    }
    let (head, last) = rest.rsplit_once('/')?;
    let (before, second) = head.rsplit_once('/').unwrap_or(("", head));
    if second == "uploads"
        && let Some(repo) = before
            .strip_suffix("/blobs")
            .or(if before == "blobs" { Some("") } else { None })
    {
        if !is_upload_id(last) {
            return None;
        }
        let tail_start = repo.len();
        return Some((repo, Endpoint::Upload, rest.get(tail_start..)?));
    }
    let endpoint = match (second, last) {
        ("manifests", r) if is_tag(r) || is_digest(r) => Endpoint::Manifest,
        ("blobs", d) if is_digest(d) => Endpoint::Blob,
        ("tags", "list") => Endpoint::TagsList,
        ("referrers", d) if is_digest(d) => Endpoint::Referrers,
        _ => return None,
    };
    let repo = if head.contains('/') { before } else { "" };
    Some((repo, endpoint, rest.get(repo.len()..)?))
}

/// OCI distribution-spec repository name:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn is_repository_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_REPOSITORY_LEN && name.split('/').all(is_path_component)
}

fn is_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let (Some(&first), Some(&last)) = (b.first(), b.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    // Separators: '.', '_', '__', or any run of '-'. Anything else is not allowed.
    let mut i = 0;
    while let Some(&x) = b.get(i) {
        if alnum(x) {
            i += 1;
            continue;
        }
        match x {
            b'.' => i += 1,
            b'_' => i += if b.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        // A separator must be followed by an alphanumeric character.
        if !b.get(i).is_some_and(|&n| alnum(n)) {
            return false;
        }
    }
    true
}

/// Tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn is_tag(t: &str) -> bool {
    let b = t.as_bytes();
    let word = |x: &u8| x.is_ascii_alphanumeric() || *x == b'_';
    matches!(b.first(), Some(f) if word(f)) && b.len() <= 128 && b.iter().all(|x| word(x) || *x == b'.' || *x == b'-')
}

/// Digest: `algorithm:encoded`, algorithm `[a-z0-9]+([+._-][a-z0-9]+)*`, encoded `[a-zA-Z0-9=_-]+`.
pub fn is_digest(d: &str) -> bool {
    let Some((alg, enc)) = d.split_once(':') else {
        return false;
    };
    let alg_ok = !alg.is_empty()
        && alg
            .split(['+', '.', '_', '-'])
            .all(|p| !p.is_empty() && p.bytes().all(|x| x.is_ascii_lowercase() || x.is_ascii_digit()));
    alg_ok
        && !enc.is_empty()
        && enc.len() <= 1024
        && enc
            .bytes()
            .all(|x| x.is_ascii_alphanumeric() || matches!(x, b'=' | b'_' | b'-'))
}

/// Upload session ids are opaque to clients; registries use UUIDs. Accept URL-safe tokens only.
pub fn is_upload_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id.bytes().any(|x| x.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|x| x.is_ascii_alphanumeric() || matches!(x, b'-' | b'_' | b'=' | b'.'))
}

pub use connector_core::names::{is_dns_label, is_dns_subdomain};

#[cfg(test)]
mod method_tests {
    use super::*;

    #[test]
    fn each_endpoint_allows_exactly_the_spec_methods() {
        let cases = [
            (Endpoint::Manifest, &["GET", "HEAD", "PUT", "DELETE"][..]),
            (Endpoint::Blob, &["GET", "HEAD", "DELETE"][..]),
            (Endpoint::UploadStart, &["POST"][..]),
            (Endpoint::Upload, &["GET", "PATCH", "PUT", "DELETE"][..]),
            (Endpoint::TagsList, &["GET", "HEAD"][..]),
            (Endpoint::Referrers, &["GET", "HEAD"][..]),
        ];
        let all = [
            "GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "TRACE", "OPTIONS", "PROPFIND", "CONNECT", "get", "",
            "GET ", "TRACK", "MKCOL",
        ];
        for (endpoint, allowed) in cases {
            for m in all {
                assert_eq!(endpoint.allows(m), allowed.contains(&m), "{endpoint:?} {m:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_grammar() {
        for ok in [
            "a",
            "library/nginx",
            "a.b_c__d-e--f/0",
            "x/y/z",
            "namespaces/x/connectors/y/manifests",
        ] {
            assert!(is_repository_name(ok), "{ok}");
        }
        let long = "a".repeat(256);
        for bad in [
            "",
            "A",
            "a//b",
            "/a",
            "a/",
            ".",
            "..",
            "a/../b",
            "a/./b",
            "-a",
            "a-",
            "a___b",
            "a..b",
            "a%2fb",
            "a b",
            "a\0b",
            "a_",
            "_a",
            "a.-b",
            long.as_str(),
        ] {
            assert!(!is_repository_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn references() {
        assert!(is_tag("v1.0_rc-1"));
        assert!(is_tag("_x"));
        assert!(!is_tag(".x"));
        assert!(!is_tag(&"a".repeat(129)));
        assert!(is_digest("sha256:0123abcd"));
        assert!(is_digest("sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564"));
        for bad in [
            "sha256",
            ":abc",
            "SHA256:abc",
            "sha256:",
            "sha256:a/b",
            "sha256::a",
            "a..b:c",
        ] {
            assert!(!is_digest(bad), "{bad}");
        }
    }

    #[test]
    fn classify_paths() {
        assert_eq!(classify("/v2"), V2Path::Base);
        assert_eq!(classify("/v2/"), V2Path::Base);
        assert_eq!(classify("/v2/_catalog"), V2Path::Catalog);
        assert_eq!(classify("/v2/a/tags/list"), V2Path::Below("a/tags/list"));
        assert_eq!(classify("/v3/"), V2Path::Other);
        assert_eq!(classify("/"), V2Path::Other);
    }

    fn rr<'a>(repository: &'a str, endpoint: Endpoint, tail: &'a str) -> RepoRequest<'a> {
        RepoRequest {
            repository,
            endpoint,
            tail,
        }
    }

    #[test]
    fn endpoints_are_found_from_the_end() {
        let table = [
            (
                "lib/app/manifests/v1",
                rr("lib/app", Endpoint::Manifest, "/manifests/v1"),
            ),
            (
                "app/manifests/sha256:ab",
                rr("app", Endpoint::Manifest, "/manifests/sha256:ab"),
            ),
            ("app/blobs/sha256:ab", rr("app", Endpoint::Blob, "/blobs/sha256:ab")),
            (
                "app/blobs/uploads/",
                rr("app", Endpoint::UploadStart, "/blobs/uploads/"),
            ),
            (
                "a/b/blobs/uploads/3f2a-9c",
                rr("a/b", Endpoint::Upload, "/blobs/uploads/3f2a-9c"),
            ),
            ("app/tags/list", rr("app", Endpoint::TagsList, "/tags/list")),
            (
                "app/referrers/sha256:ab",
                rr("app", Endpoint::Referrers, "/referrers/sha256:ab"),
            ),
            // Components named like endpoints or like the path form stay in the name.
            (
                "manifests/manifests/v1",
                rr("manifests", Endpoint::Manifest, "/manifests/v1"),
            ),
            (
                "namespaces/x/connectors/y/r/manifests/v1",
                rr("namespaces/x/connectors/y/r", Endpoint::Manifest, "/manifests/v1"),
            ),
            (
                "blobs/blobs/uploads/u1",
                rr("blobs", Endpoint::Upload, "/blobs/uploads/u1"),
            ),
        ];
        for (path, want) in table {
            assert_eq!(parse_repo_request(path), Ok(want), "{path}");
        }
    }

    #[test]
    fn bad_requests_are_refused_with_the_expected_form() {
        for (path, status) in [
            ("Lib/manifests/v1", 400),
            ("a//b/manifests/v1", 400),
            ("a/../b/manifests/v1", 400),
            ("./manifests/v1", 400),
            ("manifests/v1", 400),
            ("/manifests/v1", 400),
            ("a/manifests/.v1", 404),
            ("a/manifests/", 404),
            ("a/blobs/notadigest", 404),
            ("a/tags/lists", 404),
            ("a/blobs/uploads/../x", 404),
            ("a", 404),
            ("", 404),
        ] {
            let err = parse_repo_request(path).unwrap_err();
            assert_eq!(err.status, status, "{path}: {err:?}");
        }
        let long = format!("{}/manifests/v1", "a".repeat(300));
        let err = parse_repo_request(&long).unwrap_err();
        assert_eq!(err.code, "NAME_INVALID");
        assert!(err.message.contains("at most 255"), "{}", err.message);
    }

    #[test]
    fn path_form() {
        let (ns, name, req) = parse_path_form("namespaces/demo/connectors/harbor/lib/app/manifests/v1").unwrap();
        assert_eq!((ns, name), ("demo", "harbor"));
        assert_eq!(req.upstream_path(), "/v2/lib/app/manifests/v1");

        for (rest, status) in [
            ("lib/app/manifests/v1", 404),
            ("namespaces/demo/connectors/harbor", 404),
            ("namespaces/Demo/connectors/h/a/manifests/v1", 400),
            ("namespaces//connectors/h/a/manifests/v1", 400),
            ("namespaces/demo/connectors/-h/a/manifests/v1", 400),
            ("namespaces/demo/connector/h/a/manifests/v1", 404),
            ("namespaces/demo/connectors/h/A/manifests/v1", 400),
        ] {
            let err = parse_path_form(rest).unwrap_err();
            assert_eq!(err.status, status, "{rest}");
            assert!(err.message.contains("expected"), "{}", err.message);
        }
    }

    #[test]
    fn kubernetes_names() {
        assert!(is_dns_label("a-b0"));
        assert!(!is_dns_label("a.b"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_subdomain("a.b-c"));
        assert!(!is_dns_subdomain("a..b"));
    }
}
