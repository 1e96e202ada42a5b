//! Owns the names of the filter's Envoy stats (exported by the host as `wasmcustom.<name>`)
//! and of the request properties its access-log fields read. Names are built only from
//! refusal reasons (static identifiers) and connector names (already validated DNS names), so
//! they are always valid stat names; none carries a token or a credential.

/// Filter state keys the shim sets per forwarded request; Envoy's access log reads them as
/// `%FILTER_STATE(wasm.<key>:PLAIN)%`.
pub const CONNECTOR_PROPERTY: &str = "oci_connector.connector";
pub const SUBJECT_PROPERTY: &str = "oci_connector.subject";

/// A request the filter answered itself, by refusal reason (`api_base` for `GET /v2/`).
pub fn answered(reason: &str) -> String {
    format!("oci_connector.answered.{}", clean(reason))
}

/// A request forwarded to `connector`'s upstream (`namespace/name`).
pub fn forwarded(connector: &str) -> String {
    format!("{}.forwarded", per_connector(connector))
}

/// A request for `connector` refused after routing (RBAC denial, controller or upstream
/// unavailable, token service failure), by reason.
pub fn connector_refused(connector: &str, reason: &str) -> String {
    format!("{}.refused.{}", per_connector(connector), clean(reason))
}

/// A token fetched from `connector`'s upstream token service.
pub fn token_fetch(connector: &str) -> String {
    format!("{}.upstream_token_fetches", per_connector(connector))
}

/// An HTTP call (challenge probe, token service, controller channel) that brought back no
/// usable answer: it broke off after its head, timed out, or could not be read.
pub const CALL_FAILED: &str = "oci_connector.calls.failed";

/// A refusal answered after the tarpit's hold ([`crate::tarpit`]), not at once.
pub const REFUSAL_HELD: &str = "oci_connector.refusals.held";

/// A new token's signature confirmed by the host's own check (Envoy's `verify_signature`
/// foreign function) instead of the module's arithmetic.
pub const HOST_CONFIRMED: &str = "oci_connector.signatures.host_confirmed";

/// The verified-token cache: a hit skips signature verification.
pub fn token_cache(hit: bool) -> &'static str {
    if hit {
        "oci_connector.token_cache.hits"
    } else {
        "oci_connector.token_cache.misses"
    }
}

fn per_connector(connector: &str) -> String {
    format!("oci_connector.connector.{}", clean(&connector.replace('/', ".")))
}

/// Keeps `[a-z0-9_.-]`; anything else becomes `_` (defence in depth: inputs are validated).
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' | '.' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_clean() {
        assert_eq!(
            forwarded("demo/registry"),
            "oci_connector.connector.demo.registry.forwarded"
        );
        assert_eq!(
            connector_refused("team-a/harbor.x", "connector_denied"),
            "oci_connector.connector.team-a.harbor.x.refused.connector_denied"
        );
        assert_eq!(answered("api_base"), "oci_connector.answered.api_base");
        assert_eq!(token_fetch("d/r"), "oci_connector.connector.d.r.upstream_token_fetches");
        assert_eq!(answered("a b/Ü\"{"), "oci_connector.answered.a_b____");
        assert_ne!(token_cache(true), token_cache(false));
    }
}
