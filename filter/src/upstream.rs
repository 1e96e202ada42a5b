//! How the filter authenticates to an upstream registry: the upstream's challenge (learned by
//! probing `/v2/`), Basic credentials, or bearer tokens from the upstream's token service
//! (distribution token specification), with the token cache and the single-flight bookkeeping
//! that makes concurrent requests for one scope wait for one fetch.
//!
//! Everything here is plain data and functions; the shim performs the HTTP calls it describes.
//! The connector's credential is only ever sent to the upstream itself or to a token realm on
//! the upstream's own host, or one the connector's configuration lists explicitly.

use std::collections::HashMap;

use serde_json::Value;

use crate::config::Connector;
use crate::respond::{Refusal, quote};

/// What the upstream answered on an unauthenticated `GET /v2/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `200`: the upstream wants no credential (the connector's Basic one is sent anyway).
    Open,
    /// `401` with `Basic realm=...` (Distribution htpasswd, ECR-style).
    Basic,
    /// `401` with `Bearer realm=...,service=...`: tokens come from the realm. Shared: every
    /// request to the connector reads it (no copy of its five strings per request).
    Bearer(std::rc::Rc<BearerRealm>),
}

/// A token realm the connector's credential may be sent to, and how Envoy reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerRealm {
    pub service: String,
    /// Envoy cluster that reaches the realm's host.
    pub cluster: String,
    pub scheme: String,
    pub authority: String,
    /// Realm path with any query it carries (parameters are appended to it).
    pub path: String,
}

pub use connector_core::address::split_url;
pub use connector_core::token_service::parse_challenge;

/// Interprets the upstream's answer to `GET /v2/` for `connector`.
pub fn learn_challenge(
    connector: &Connector,
    status: u32,
    www_authenticate: Option<&str>,
) -> Result<Challenge, Refusal> {
    let label = quote(connector.label());
    match status {
        200 => return Ok(Challenge::Open),
        401 => {}
        0 => {
            return Err(Refusal::unavailable_upstream(format!(
                "the upstream registry of connector {label} did not answer: retry later, or ask the connector's owner to check its address"
            )));
        }
        // Envoy answers a call it could not complete (connection refused, reset, its own
        // timeout) with these itself: they say "unreachable", not "not a registry" (found by the
        // fault suite).
        502..=504 => {
            return Err(Refusal::unavailable_upstream(format!(
                "the upstream registry of connector {label} could not be reached or is unavailable ({status} on /v2/): retry later, or ask the connector's owner to check its address"
            )));
        }
        other => {
            return Err(Refusal::unavailable_upstream(format!(
                "the upstream registry of connector {label} answered {other} on /v2/ (expected 200 or 401): it may not be an OCI registry"
            )));
        }
    }
    let Some((scheme, params)) = www_authenticate.and_then(parse_challenge) else {
        return Err(Refusal::unavailable_upstream(format!(
            "the upstream registry of connector {label} answered 401 without a usable WWW-Authenticate challenge"
        )));
    };
    match scheme.as_str() {
        "basic" => Ok(Challenge::Basic),
        "bearer" => {
            let realm = params.get("realm").map(String::as_str).unwrap_or("");
            let service = params.get("service").cloned().unwrap_or_default();
            resolve_realm(connector, realm).map(|(cluster, scheme, authority, path)| {
                Challenge::Bearer(std::rc::Rc::new(BearerRealm {
                    service,
                    cluster,
                    scheme,
                    authority,
                    path,
                }))
            })
        }
        other => Err(Refusal::unavailable_upstream(format!(
            "the upstream registry of connector {label} asks for {} authentication, which the proxy does not speak (Basic or Bearer token service)",
            quote(other)
        ))),
    }
}

/// Where the connector's credential may go for a token: the upstream's own host (through the
/// connector's cluster) or a realm the connector lists with its own cluster. Anything else is
/// refused before a single byte of the credential leaves the proxy.
fn resolve_realm(connector: &Connector, realm: &str) -> Result<(String, String, String, String), Refusal> {
    let refused = || {
        Refusal::unavailable_upstream(format!(
            "the upstream registry of connector {} sends clients to the token realm {}, which is neither on the registry's host nor listed in the connector's tokenRealms; the connector's credential was not sent",
            quote(connector.label()),
            quote(realm)
        ))
        .with_reason("realm_refused")
    };
    let (scheme, authority, path) = split_url(realm).ok_or_else(refused)?;
    if authority == connector.upstream.authority {
        return Ok((connector.cluster.clone(), scheme, authority, path));
    }
    connector
        .token_realms
        .iter()
        .find(|r| r.scheme == scheme && r.authority == authority && r.path == path)
        .map(|r| (r.cluster.clone(), scheme.clone(), authority.clone(), path.clone()))
        .ok_or_else(refused)
}

/// The token scopes a request needs: `pull` to read, `pull,push` to write, `delete` to delete,
/// and `pull` on the source repository of a cross-repository mount.
pub fn scopes(repository: &str, method: &str, mount_from: Option<&str>) -> Vec<String> {
    let actions = match method {
        "GET" | "HEAD" => "pull",
        "DELETE" => "delete",
        _ => "pull,push",
    };
    let mut out = vec![["repository:", repository, ":", actions].concat()];
    if let Some(from) = mount_from
        && from != repository
    {
        out.push(format!("repository:{from}:pull"));
    }
    out
}

pub use connector_core::percent::encode_query_value;

/// The `:path` of a token request: the realm's path plus `service` and one `scope` per scope.
pub fn token_request_path(realm: &BearerRealm, scopes: &[String]) -> String {
    let mut path = realm.path.clone();
    let mut sep = if path.contains('?') { '&' } else { '?' };
    if !realm.service.is_empty() {
        path.push(sep);
        path.push_str("service=");
        path.push_str(&encode_query_value(&realm.service));
        sep = '&';
    }
    for s in scopes {
        path.push(sep);
        path.push_str("scope=");
        path.push_str(&encode_query_value(s));
        sep = '&';
    }
    path
}

/// A usable token from a token service's answer: `(Authorization value, seconds to keep it)`.
/// For a call Envoy could not complete (502-504, Envoy's own answer): the refusal's message gets
/// the reason Envoy gave, e.g. `transport failure reason: TLS_error:...CERTIFICATE_VERIFY_FAILED`,
/// so a misnamed or untrusted upstream certificate is named as such. Only Envoy's own wording is
/// taken (its body starts `upstream connect error` or `no healthy upstream`); a registry's body is
/// never repeated. Printable ASCII only, at most 300 characters; the probe and the token request
/// carry no secret Envoy could echo in it.
pub fn with_envoy_detail(mut r: Refusal, status: u32, body: &[u8]) -> Refusal {
    if !(502..=504).contains(&status) {
        return r;
    }
    let text: String = body
        .iter()
        .take(300)
        .map(|&b| if (0x20..0x7f).contains(&b) { b as char } else { ' ' })
        .collect();
    let text = text.trim();
    if text.starts_with("upstream connect error") || text.starts_with("no healthy upstream") {
        r.message.push_str(&format!(" (Envoy: {text})"));
    }
    r
}

pub fn parse_token_response(status: u32, body: &[u8], realm: &str) -> Result<(String, u64), Refusal> {
    connector_core::token_service::token_from_answer(status, body).map_err(|why| {
        Refusal::unavailable_upstream(format!("the token service at {} {why}", quote(realm)))
            .with_reason("token_fetch_failed")
    })
}

/// Whether an upstream error body carries the OCI error code `DENIED` (ECR Public answers an
/// expired token with `400 DENIED` instead of `401`).
pub fn is_denied(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("errors").and_then(Value::as_array).cloned())
        .is_some_and(|errors| {
            errors
                .iter()
                .any(|e| e.get("code").and_then(Value::as_str) == Some("DENIED"))
        })
}

/// Token cache key: connector, its revision (see `Connector::revision`), service and scopes.
pub type TokenKey = String;

pub fn token_key(connector: &str, revision: u64, realm: &BearerRealm, scopes: &[String]) -> TokenKey {
    format!("{connector}|{revision}|{}|{}", realm.service, scopes.join(" "))
}

struct CachedToken {
    authorization: String,
    expires_at: u64,
}

/// What a request should do about its upstream credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send with this `Authorization` value now.
    Send(String),
    /// This request fetches the token for `key` (and others wait for it).
    Fetch(TokenKey),
    /// Another request is fetching `key`: wait to be resumed.
    Wait(TokenKey),
}

/// Per-VM upstream authentication state: learned challenges, tokens, fetches in flight.
#[derive(Default)]
pub struct UpstreamAuth {
    challenges: HashMap<String, Challenge>,
    tokens: HashMap<TokenKey, CachedToken>,
    /// Fetches in flight: the key and the contexts waiting for it (not the fetcher itself).
    pending: HashMap<TokenKey, Vec<u32>>,
}

/// Bound on cached tokens per VM; a fresh fetch is cheap compared to unbounded growth.
const MAX_TOKENS: usize = 4096;

impl UpstreamAuth {
    pub fn challenge(&self, connector: &str) -> Option<&Challenge> {
        self.challenges.get(connector)
    }

    pub fn learn(&mut self, connector: &str, challenge: Challenge) {
        self.challenges.insert(connector.to_string(), challenge);
    }

    /// The upstream answered `401` to a request sent with `used` (a cached token, if any) and
    /// challenged with `scheme`: drop that token so the client's retry fetches a fresh one, and
    /// forget the learned challenge when the upstream now asks for another scheme.
    pub fn refused(&mut self, connector: &str, used: Option<&str>, scheme: Option<&str>) {
        if let Some(k) = used {
            self.tokens.remove(k);
        }
        let changed = match (self.challenges.get(connector), scheme) {
            (Some(Challenge::Bearer(_)), Some(s)) => s != "bearer",
            (Some(Challenge::Basic | Challenge::Open), Some(s)) => s != "basic",
            _ => false,
        };
        if changed {
            self.challenges.remove(connector);
        }
    }

    /// The step for a request of context `ctx` that needs the token `key`.
    pub fn step(&mut self, key: &str, ctx: u32, now: u64) -> Step {
        if let Some(t) = self.tokens.get(key) {
            if now < t.expires_at {
                return Step::Send(t.authorization.clone());
            }
            self.tokens.remove(key);
        }
        if let Some(waiters) = self.pending.get_mut(key) {
            waiters.push(ctx);
            return Step::Wait(key.to_string());
        }
        self.pending.insert(key.to_string(), Vec::new());
        Step::Fetch(key.to_string())
    }

    /// A fetch finished: cache a good token and hand back the contexts that waited for it.
    pub fn complete(&mut self, key: &str, result: &Result<(String, u64), Refusal>, now: u64) -> Vec<u32> {
        if let Ok((authorization, keep)) = result {
            if self.tokens.len() >= MAX_TOKENS {
                self.tokens.retain(|_, t| now < t.expires_at);
                if self.tokens.len() >= MAX_TOKENS {
                    self.tokens.clear();
                }
            }
            self.tokens.insert(
                key.to_string(),
                CachedToken {
                    authorization: authorization.clone(),
                    expires_at: now + keep,
                },
            );
        }
        self.pending.remove(key).unwrap_or_default()
    }

    /// The fetcher went away before its answer: its waiters must not hang.
    pub fn abandon(&mut self, key: &str) -> Vec<u32> {
        self.pending.remove(key).unwrap_or_default()
    }

    /// A waiter went away: stop tracking it.
    pub fn leave(&mut self, key: &str, ctx: u32) {
        if let Some(w) = self.pending.get_mut(key) {
            w.retain(|c| *c != ctx);
        }
    }

    /// The upstream refused a token (401, or ECR Public's `400 DENIED`): drop it so the
    /// client's retry fetches a fresh one.
    pub fn drop_token(&mut self, key: &str) {
        self.tokens.remove(key);
    }

    /// The `Authorization` value cached under `key`, if still there.
    pub fn token_value(&self, key: &str) -> Option<&str> {
        self.tokens.get(key).map(|t| t.authorization.as_str())
    }

    pub fn cached_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Keeps what a new configuration can still use: `revision(label)` is the connector's
    /// revision in it (`None`: removed). A connector whose revision is unchanged keeps its
    /// learned challenge and tokens; a changed one (address, realms, credential) learns and
    /// fetches again. Fetches in flight stay: their waiters are resumed either way, and a token
    /// they bring under an old revision is never looked up again.
    pub fn carry_over(&mut self, old_revision: impl Fn(&str) -> Option<u64>, revision: impl Fn(&str) -> Option<u64>) {
        self.challenges
            .retain(|label, _| revision(label).is_some() && revision(label) == old_revision(label));
        self.tokens.retain(|key, _| {
            let mut parts = key.splitn(3, '|');
            match (parts.next(), parts.next().and_then(|r| r.parse::<u64>().ok())) {
                (Some(label), Some(r)) => revision(label) == Some(r),
                _ => false,
            }
        });
    }
}

#[cfg(test)]
mod envoy_detail_tests {
    use super::*;

    #[test]
    fn envoys_reason_is_named_and_nothing_else_is_repeated() {
        let base = || Refusal::unavailable_upstream("the upstream registry of connector \"d/r\" could not be reached");
        let tls = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:verify cert failed: SAN matcher";
        let r = with_envoy_detail(base(), 503, tls);
        assert!(
            r.message.contains("CERTIFICATE_VERIFY_FAILED") && r.message.contains("SAN matcher"),
            "{}",
            r.message
        );
        // A registry's own 503 body is not repeated, nor is anything outside 502-504.
        assert_eq!(
            with_envoy_detail(base(), 503, b"{\"errors\":[]}").message,
            base().message
        );
        assert_eq!(with_envoy_detail(base(), 401, tls).message, base().message);
        // Control characters never make it into a message (a header Envoy would send).
        let r = with_envoy_detail(base(), 502, b"upstream connect error\r\nx: y");
        assert!(!r.message.contains('\r') && !r.message.contains('\n'));
        assert!(with_envoy_detail(base(), 503, &[b'u'; 5000]).message.len() < 400);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_per_method() {
        assert_eq!(scopes("a/b", "GET", None), vec!["repository:a/b:pull"]);
        assert_eq!(scopes("a/b", "HEAD", None), vec!["repository:a/b:pull"]);
        assert_eq!(scopes("a/b", "PUT", None), vec!["repository:a/b:pull,push"]);
        assert_eq!(scopes("a/b", "DELETE", None), vec!["repository:a/b:delete"]);
        assert_eq!(
            scopes("a/b", "POST", Some("c")),
            vec!["repository:a/b:pull,push", "repository:c:pull"]
        );
    }

    #[test]
    fn token_request() {
        let realm = BearerRealm {
            service: "registry.example.com".into(),
            cluster: "c".into(),
            scheme: "https".into(),
            authority: "auth.example.com".into(),
            path: "/token".into(),
        };
        assert_eq!(
            token_request_path(&realm, &scopes("a/b", "POST", Some("c/d"))),
            "/token?service=registry.example.com&scope=repository%3Aa%2Fb%3Apull%2Cpush&scope=repository%3Ac%2Fd%3Apull"
        );
        let with_query = BearerRealm {
            path: "/service/token?account=x".into(),
            service: String::new(),
            ..realm
        };
        assert_eq!(
            token_request_path(&with_query, &["s".into()]),
            "/service/token?account=x&scope=s"
        );
    }

    #[test]
    fn token_responses() {
        let ok = |b: &str| parse_token_response(200, b.as_bytes(), "r");
        assert_eq!(
            ok(r#"{"token":"t1","expires_in":300}"#).unwrap(),
            ("Bearer t1".into(), 270)
        );
        assert_eq!(ok(r#"{"access_token":"t2"}"#).unwrap(), ("Bearer t2".into(), 54));
        assert_eq!(ok(r#"{"token":"t","expires_in":-5}"#).unwrap().1, 54);
        assert_eq!(
            ok(r#"{"token":"t","expires_in":1e12}"#).unwrap().1,
            connector_core::token_service::MAX_EXPIRES_IN - 30
        );
        assert_eq!(
            ok(r#"{"token":"t","expires_in":1}"#).unwrap().1,
            connector_core::token_service::MIN_EXPIRES_IN - 1
        );
        for bad in ["{}", "[]", "nope", r#"{"token":""}"#, r#"{"token":"a b"}"#] {
            assert_eq!(ok(bad).unwrap_err().reason, "token_fetch_failed", "{bad}");
        }
        let e = parse_token_response(401, b"", "https://auth/token").unwrap_err();
        assert!(
            e.message.contains("refused the connector's credential"),
            "{}",
            e.message
        );
        assert_eq!(e.status, 503);
        assert!(
            parse_token_response(0, b"", "r")
                .unwrap_err()
                .message
                .contains("did not answer in time")
        );
    }

    fn connector(realms: serde_json::Value) -> crate::config::Config {
        let doc = serde_json::json!({
            "identity": {"issuers": ["i"], "audiences": ["a"], "jwks": crate::testkeys::jwks()},
            "connectors": [{"namespace": "n", "name": "c", "address": "https://registry.example.com", "cluster": "reg",
                            "credential": {"username": "u", "passwordEnv": "P"}, "tokenRealms": realms}]
        });
        crate::config::compile(doc.to_string().as_bytes(), &|_| Some("p".into()))
            .map_err(|e| format!("{e:?}"))
            .unwrap()
    }

    #[test]
    fn challenges_are_learned_and_realms_checked() {
        let cfg = connector(serde_json::json!([{"url": "https://auth.example.com/token", "cluster": "auth"}]));
        let c = cfg.connector("n", "c").unwrap();
        assert_eq!(learn_challenge(c, 200, None).unwrap(), Challenge::Open);
        assert_eq!(
            learn_challenge(c, 401, Some("Basic realm=\"r\"")).unwrap(),
            Challenge::Basic
        );
        // Realm on the registry's own host: through the connector's cluster.
        let Challenge::Bearer(r) = learn_challenge(
            c,
            401,
            Some(r#"Bearer realm="https://registry.example.com/service/token",service="harbor-registry""#),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (r.cluster.as_str(), r.path.as_str(), r.service.as_str()),
            ("reg", "/service/token", "harbor-registry")
        );
        // Listed realm on another host: through its own cluster.
        let Challenge::Bearer(r) = learn_challenge(
            c,
            401,
            Some(r#"Bearer realm="https://auth.example.com/token",service="s""#),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!((r.cluster.as_str(), r.authority.as_str()), ("auth", "auth.example.com"));
        // Anything else is refused, naming the realm; the credential is never sent.
        for realm in [
            "https://evil.example/token",
            "https://auth.example.com/other",
            "http://auth.example.com/token",
            "not a url",
        ] {
            let e = learn_challenge(c, 401, Some(&format!("Bearer realm=\"{realm}\",service=\"s\""))).unwrap_err();
            assert_eq!((e.status, e.reason), (503, "realm_refused"), "{realm}");
            assert!(e.message.contains(realm), "{}", e.message);
        }
        for (status, www) in [(401, None), (401, Some("Negotiate x")), (500, None), (0, None)] {
            assert_eq!(
                learn_challenge(c, status, www).unwrap_err().status,
                503,
                "{status} {www:?}"
            );
        }
    }

    #[test]
    fn denied_bodies() {
        assert!(is_denied(
            br#"{"errors":[{"code":"DENIED","message":"Your authorization token has expired."}]}"#
        ));
        assert!(!is_denied(
            br#"{"errors":[{"code":"NAME_INVALID","message":"DENIED in text"}]}"#
        ));
        assert!(!is_denied(b"DENIED"));
        assert!(!is_denied(b""));
    }

    #[test]
    fn single_flight() {
        let mut a = UpstreamAuth::default();
        assert_eq!(a.step("k", 1, 100), Step::Fetch("k".into()));
        assert_eq!(a.step("k", 2, 100), Step::Wait("k".into()));
        assert_eq!(a.step("k", 3, 100), Step::Wait("k".into()));
        a.leave("k", 3);
        assert_eq!(a.step("other", 4, 100), Step::Fetch("other".into()));
        let waiters = a.complete("k", &Ok(("Bearer t".into(), 50)), 100);
        assert_eq!(waiters, vec![2]);
        assert_eq!(a.step("k", 5, 149), Step::Send("Bearer t".into()));
        // Expired: the next request fetches again.
        assert_eq!(a.step("k", 6, 150), Step::Fetch("k".into()));
        // A failed fetch caches nothing and still releases its waiters.
        assert_eq!(a.step("k", 7, 150), Step::Wait("k".into()));
        let waiters = a.complete("k", &Err(Refusal::unavailable("x")), 150);
        assert_eq!(waiters, vec![7]);
        assert_eq!(a.step("k", 8, 151), Step::Fetch("k".into()));
        // An abandoned fetch releases its waiters too.
        assert_eq!(a.step("k", 9, 151), Step::Wait("k".into()));
        assert_eq!(a.abandon("k"), vec![9]);
        // A refused token is dropped.
        a.complete("k2", &Ok(("Bearer u".into(), 50)), 100);
        a.drop_token("k2");
        assert_eq!(a.step("k2", 10, 101), Step::Fetch("k2".into()));
    }

    #[test]
    fn an_upstream_401_drops_the_token_and_relearns_a_changed_scheme() {
        let realm = BearerRealm {
            service: "s".into(),
            cluster: "c".into(),
            scheme: "https".into(),
            authority: "a".into(),
            path: "/t".into(),
        };
        let mut a = UpstreamAuth::default();
        a.learn("n/c", Challenge::Bearer(realm.into()));
        a.complete("k", &Ok(("Bearer t".into(), 50)), 100);
        // Same scheme: the token goes, the challenge stays.
        a.refused("n/c", Some("k"), Some("bearer"));
        assert_eq!(a.cached_tokens(), 0);
        assert!(a.challenge("n/c").is_some());
        // Another scheme: the challenge is learned again on the next request.
        a.refused("n/c", None, Some("basic"));
        assert!(a.challenge("n/c").is_none());
        a.learn("n/c", Challenge::Basic);
        a.refused("n/c", None, Some("basic"));
        assert_eq!(a.challenge("n/c"), Some(&Challenge::Basic));
        a.refused("n/c", None, None);
        assert_eq!(a.challenge("n/c"), Some(&Challenge::Basic));
        a.refused("n/c", None, Some("bearer"));
        assert!(a.challenge("n/c").is_none());
    }
}
