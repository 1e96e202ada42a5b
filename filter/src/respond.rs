//! The one place where a refusal becomes an HTTP answer: status, OCI error JSON body
//! (`{"errors":[{"code":..,"message":..}]}`), the proxy's own Basic challenge where the client
//! should (re)authenticate, and `Docker-Distribution-Api-Version`.
//!
//! Every refusal carries a short `reason` label so that logs and (later) metrics can count
//! refusals by kind without ever including request data.

use serde::Serialize;

/// A response the filter produces itself instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Why a request is not forwarded, in terms a registry client and a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    /// OCI distribution error code (`UNAUTHORIZED`, `DENIED`, `NAME_INVALID`, ...).
    pub code: &'static str,
    pub message: String,
    /// Stable label for logs and metrics (never contains request data).
    pub reason: &'static str,
    /// Whether to send the proxy's `WWW-Authenticate: Basic` challenge.
    pub challenge: bool,
    /// One more header of the answer: `Allow` with a 405, `Retry-After` with a 429.
    pub header: Option<(&'static str, &'static str)>,
}

impl Refusal {
    /// 401: the client's own credential is missing or failed a check.
    pub fn unauthorized(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: 401,
            code: "UNAUTHORIZED",
            message: message.into(),
            reason,
            challenge: true,
            header: None,
        }
    }

    /// 401 answered in place of an upstream 401: the *connector's* credential was refused.
    /// The client gets the proxy's challenge, never the upstream's.
    pub fn upstream_refused(connector: &str) -> Self {
        Self::unauthorized(
            "upstream_refused_credential",
            format!(
                "the upstream registry refused the credential of connector {connector}; \
                 the connector's Secret is wrong, expired or lacks access to this repository: \
                 ask the connector's owner to fix it"
            ),
        )
    }

    /// 403: authenticated, but not allowed. Unknown and forbidden connectors share this answer
    /// so that a caller cannot probe which connectors exist.
    pub fn denied(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: 403,
            code: "DENIED",
            message: message.into(),
            reason,
            challenge: false,
            header: None,
        }
    }

    /// 400: the repository name or another path component breaks the OCI grammar.
    pub fn name_invalid(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            code: "NAME_INVALID",
            message: message.into(),
            reason: "bad_name",
            challenge: false,
            header: None,
        }
    }

    /// 404: the path is not a distribution endpoint the proxy serves.
    pub fn not_found(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: 404,
            code: "NAME_UNKNOWN",
            message: message.into(),
            reason,
            challenge: false,
            header: None,
        }
    }

    /// 403: an endpoint the proxy deliberately does not offer (e.g. `/v2/_catalog`).
    pub fn unsupported(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: 403,
            code: "UNSUPPORTED",
            message: message.into(),
            reason,
            challenge: false,
            header: None,
        }
    }

    /// 503: the filter cannot serve (no valid configuration). Fails closed.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: 503,
            code: "UNAVAILABLE",
            message: message.into(),
            reason: "not_configured",
            challenge: false,
            header: None,
        }
    }

    /// 503: the upstream or its token service cannot be used right now. The request was not
    /// forwarded (never without credentials), and a write is never retried by the proxy.
    pub fn unavailable_upstream(message: impl Into<String>) -> Self {
        Self {
            status: 503,
            code: "UNAVAILABLE",
            message: message.into(),
            reason: "upstream_unavailable",
            challenge: false,
            header: None,
        }
    }

    /// 405: the endpoint exists but the distribution API defines no such method on it. Nothing
    /// reaches the upstream: a method like TRACE would have it echo the connector's credential.
    pub fn method_not_allowed(method: &str, endpoint: &str, allow: &'static str) -> Self {
        Self {
            status: 405,
            code: "UNSUPPORTED",
            message: format!(
                "method {} is not allowed on {endpoint}: the distribution API defines {allow} there",
                quote(method)
            ),
            reason: "method_not_allowed",
            challenge: false,
            header: Some(("allow", allow)),
        }
    }

    /// 502: the upstream answered something the proxy will not pass on (it would leak a
    /// credential or send the client elsewhere with its token).
    pub fn bad_gateway(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: 502,
            code: "UNAVAILABLE",
            message: message.into(),
            reason,
            challenge: false,
            header: None,
        }
    }

    /// 429: too many tokens failed verification on this worker this second; a token that is
    /// already verified is not affected. Bounds what unauthenticated garbage can cost.
    pub fn throttled() -> Self {
        Self {
            status: 429,
            code: "TOOMANYREQUESTS",
            message: "too many requests with tokens that fail verification reach this proxy right now: retry in a \
                      second"
                .into(),
            reason: "verification_throttled",
            challenge: false,
            header: Some(("retry-after", "1")),
        }
    }

    pub fn with_reason(mut self, reason: &'static str) -> Self {
        self.reason = reason;
        self
    }

    pub fn into_response(self, realm: &str) -> LocalResponse {
        let mut headers = vec![
            ("content-type".to_string(), "application/json".to_string()),
            (
                "docker-distribution-api-version".to_string(),
                "registry/2.0".to_string(),
            ),
        ];
        if self.challenge {
            headers.push(("www-authenticate".to_string(), challenge(realm)));
        }
        if let Some((name, value)) = self.header {
            headers.push((name.to_string(), value.to_string()));
        }
        LocalResponse {
            status: u32::from(self.status),
            headers,
            body: error_body(self.code, &self.message),
        }
    }
}

/// The proxy's own challenge. Clients only send credentials after one (see REFERENCE.md).
pub fn challenge(realm: &str) -> String {
    format!("Basic realm=\"{}\"", realm.replace(['"', '\\'], ""))
}

/// `200 {}` for an authenticated `GET /v2/`.
pub fn api_base_ok() -> LocalResponse {
    LocalResponse {
        status: 200,
        headers: vec![
            ("content-type".to_string(), "application/json".to_string()),
            (
                "docker-distribution-api-version".to_string(),
                "registry/2.0".to_string(),
            ),
        ],
        body: b"{}".to_vec(),
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    errors: [ErrorEntry<'a>; 1],
}

#[derive(Serialize)]
struct ErrorEntry<'a> {
    code: &'a str,
    message: &'a str,
}

/// OCI error JSON. serde_json escapes whatever the message quotes from the request.
pub fn error_body(code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&ErrorBody {
        errors: [ErrorEntry { code, message }],
    })
    .unwrap_or_else(|_| b"{\"errors\":[{\"code\":\"UNKNOWN\",\"message\":\"error\"}]}".to_vec())
}

/// Quote request-supplied text for an error message: bounded and printable, so a hostile
/// value can neither flood a log line nor forge one.
pub fn quote(text: &str) -> String {
    const MAX: usize = 80;
    let mut out = String::with_capacity(text.len().min(MAX) + 2);
    out.push('"');
    for (i, c) in text.chars().enumerate() {
        if i == MAX {
            out.push_str("...");
            break;
        }
        if c.is_control() { out.push('?') } else { out.push(c) }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthorized_has_challenge_and_oci_body() {
        let r = Refusal::unauthorized("no_credential", "no \"credential\"").into_response("proxy");
        assert_eq!(r.status, 401);
        assert!(
            r.headers
                .contains(&("www-authenticate".into(), "Basic realm=\"proxy\"".into()))
        );
        assert!(
            r.headers
                .contains(&("docker-distribution-api-version".into(), "registry/2.0".into()))
        );
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNAUTHORIZED");
        assert_eq!(v["errors"][0]["message"], "no \"credential\"");
    }

    #[test]
    fn denied_has_no_challenge() {
        let r = Refusal::denied("forbidden", "x").into_response("proxy");
        assert_eq!(r.status, 403);
        assert!(!r.headers.iter().any(|(k, _)| k == "www-authenticate"));
    }

    #[test]
    fn realm_cannot_break_the_challenge() {
        assert_eq!(challenge("a\"b\\c"), "Basic realm=\"abc\"");
    }

    #[test]
    fn quote_bounds_and_neutralises() {
        assert_eq!(quote("a\nb"), "\"a?b\"");
        let long = "x".repeat(500);
        assert_eq!(quote(&long).len(), 80 + 2 + 3);
    }
}
