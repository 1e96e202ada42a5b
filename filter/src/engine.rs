//! The request and response decisions, as plain functions over plain values. The proxy-wasm
//! layer (`shim`) only gathers headers, calls these, and applies the result.
//!
//! Order of checks on a request: path shape (so a malformed name is a 400 whoever asks),
//! then the caller's credential (401), then whether the caller may use the connector (403, the
//! same answer whether the connector exists or not). Only then is anything forwarded.

use std::rc::Rc;

use crate::config::{AccessMode, Config, Connector};
use crate::identity::{Identity, TokenCache, authenticate};
use crate::respond::{LocalResponse, Refusal, api_base_ok, quote};
use crate::rewrite::{ClientView, rewrite_link, rewrite_url};
use crate::route::{
    BASE_METHODS, Endpoint, PATH_FORM, RepoRequest, V2Path, classify, parse_path_form, parse_repo_request,
};

/// Request header the Envoy route reads (`cluster_header`) to pick the connector's upstream.
pub const CLUSTER_HEADER: &str = "x-oci-connector-cluster";

/// Client headers that never reach an upstream. `authorization` is replaced by the
/// connector's credential; the forwarding headers would let a client steer the upstream's
/// idea of its own address (Distribution builds `Location` from them).
pub const STRIPPED_REQUEST_HEADERS: &[&str] = &[
    "proxy-authorization",
    "cookie",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "forwarded",
    "x-original-url",
    "x-rewrite-url",
    // Envoy's own bookkeeping header: a client must not be able to set what the upstream sees.
    "x-envoy-original-path",
    // Client-claimed addresses: the upstream sees the proxy, and who asked is in the proxy's
    // access log (connector and ServiceAccount); a client must not write the registry's audit
    // trail or steer address-based rules there.
    "x-forwarded-for",
    "x-real-ip",
];

/// The names among `names` (a request's headers or trailers) that never reach an upstream,
/// each once, in the order first met; `authorization` among them when `with_authorization`
/// (in trailers: the client's token must not ride after the body either; in headers it is
/// replaced instead).
pub fn stripped_names<'a>(names: impl Iterator<Item = &'a [u8]>, with_authorization: bool) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for name in names {
        let found = STRIPPED_REQUEST_HEADERS
            .iter()
            .chain(with_authorization.then_some(&"authorization"))
            .find(|n| n.as_bytes() == name);
        if let Some(n) = found
            && !out.contains(n)
        {
            out.push(n);
        }
    }
    out
}

/// Set to the scheme the client really used (`:scheme`) on every forwarded request: Distribution
/// takes the scheme of its absolute `Location` from it, so a client-sent value would steer it
/// (found by the attack suite). Not removed: Envoy's route matching wants it present.
pub const FORWARDED_PROTO_HEADER: &str = "x-forwarded-proto";

/// What the filter needs from a request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// `:path`, including any query.
    pub path: &'a str,
    /// `:authority` (the Host the client used).
    pub authority: &'a str,
    /// `:scheme`.
    pub scheme: &'a str,
    /// Every `Authorization` value (Envoy hands repeated headers to the VM separately).
    pub authorization: &'a [&'a str],
}

/// Everything needed to forward one request and to fix up its response.
#[derive(Clone, PartialEq, Eq)]
pub struct Forward {
    pub path: String,
    /// The controller must confirm the caller may use the connector (RBAC mode): the rules
    /// were not evaluated here.
    pub check_access: bool,
    pub response: ResponsePlan,
    pub caller: Rc<Identity>,
    pub cache_hit: bool,
    /// Token scopes the upstream request needs (used when the upstream wants bearer tokens).
    pub scopes: Vec<String>,
}

impl Forward {
    /// The connector addressed (the response plan's), shared with the configuration: a warm
    /// request copies none of its names, cluster or credential.
    pub fn connector(&self) -> &Rc<Connector> {
        &self.response.connector
    }
}

impl std::fmt::Debug for Forward {
    // The connector's Debug (in the plan's) redacts its credential.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward")
            .field("path", &self.path)
            .field("check_access", &self.check_access)
            .field("response", &self.response)
            .field("caller", &self.caller)
            .field("cache_hit", &self.cache_hit)
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// Kept in the HTTP context for the response phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponsePlan {
    /// The connector the request went through: its label names it in refusals and stats, its
    /// upstream is what `Location` and `Link` are mapped from.
    pub connector: Rc<Connector>,
    pub client: ClientView,
    /// What the client asked for: an upload session's `Location` must stay on the proxy.
    pub endpoint: Endpoint,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer locally; `reason` is the refusal label (or `api_base`). `authenticated`: the
    /// caller's token was verified (a refusal after that, such as a connector it may not use, is
    /// accountable to a ServiceAccount and never held by the tarpit).
    Respond {
        response: LocalResponse,
        reason: &'static str,
        authenticated: bool,
    },
    Forward(Box<Forward>),
}

fn refuse(config_realm: &str, r: Refusal) -> Decision {
    respond(config_realm, r, false)
}

/// A refusal of a caller whose token was verified.
fn refuse_authenticated(config_realm: &str, r: Refusal) -> Decision {
    respond(config_realm, r, true)
}

fn respond(config_realm: &str, r: Refusal, authenticated: bool) -> Decision {
    let reason = r.reason;
    Decision::Respond {
        response: r.into_response(config_realm),
        reason,
        authenticated,
    }
}

/// Host without port, lowercase.
fn host_of(authority: &str) -> String {
    let host = if authority.starts_with('[') {
        authority
            .find(']')
            .and_then(|end| authority.get(..=end))
            .unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    host.to_ascii_lowercase()
}

/// Which connector is addressed, before anyone is authenticated.
enum Addressed<'c, 'r> {
    Known(&'c Rc<Connector>, RepoRequest<'r>, String),
    /// A well-formed address of a connector that is not configured: the caller gets the
    /// same answer as for a connector they may not use. The endpoint is parsed all the same, so
    /// a wrong method gets the same 405 whether or not the connector exists.
    Unknown(String, Endpoint),
}

fn address<'c, 'r>(config: &'c Config, rest: &'r str, host: &str) -> Result<Addressed<'c, 'r>, Refusal> {
    if let Some(connector) = config.connector_by_host(host) {
        let request = parse_repo_request(rest)?;
        return Ok(Addressed::Known(connector, request, "/v2".to_string()));
    }
    if config.looks_like_connector_host(host) {
        let request = parse_repo_request(rest)?;
        return Ok(Addressed::Unknown(format!("at host {}", quote(host)), request.endpoint));
    }
    let (namespace, name, request) = parse_path_form(rest)?;
    let prefix = ["/v2/namespaces/", namespace, "/connectors/", name].concat();
    match config.connector(namespace, name) {
        Some(c) => Ok(Addressed::Known(c, request, prefix)),
        None => Ok(Addressed::Unknown(
            quote(&format!("{namespace}/{name}")),
            request.endpoint,
        )),
    }
}

/// A connector removed while one of its requests waited (for the upstream's challenge): the
/// request gets what the configuration now in force answers, the denial a connector that does
/// not exist gets, not a 503 (issue 17: deletes under load answer 200 or 403, nothing else).
pub fn removed_meanwhile(connector: &str, subject: &str) -> Refusal {
    Refusal::denied(
        "connector_denied",
        format!(
            "connector {} does not exist or {} may not use it",
            quote(connector),
            quote(subject)
        ),
    )
}

/// The RBAC-mode denial (the controller's SubjectAccessReview said no). Same status and code
/// as [`not_permitted`], and, like it, the same words whether or not the connector exists.
pub fn not_permitted_rbac(connector: &str, subject: &str, verb: crate::channel::Verb) -> Refusal {
    Refusal::denied(
        "connector_denied",
        format!(
            "connector {} does not exist or {} may not {} through it: grant it `{}` on connectors.alauda.io \
             {} in that namespace (a Role and RoleBinding; the ClusterRoles oci-connector-user, -pusher and \
             -maintainer hold these verbs)",
            quote(connector),
            quote(subject),
            verb.as_str(),
            verb.rbac_verb(),
            quote(connector.rsplit('/').next().unwrap_or(connector))
        ),
    )
}

fn not_permitted(connector: &str, who: &Identity) -> Refusal {
    Refusal::denied(
        "connector_denied",
        format!(
            "connector {connector} does not exist or ServiceAccount {} may not use it: a ServiceAccount may use \
             the connectors of its own namespace and those that list its namespace or itself",
            quote(&format!("{}/{}", who.namespace, who.service_account))
        ),
    )
}

/// Decides what to do with a request.
pub fn decide_request(config: &Config, cache: &mut TokenCache, req: &Request<'_>, now: u64) -> Decision {
    let realm = config.realm.as_str();
    let (path, query) = match req.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (req.path, None),
    };
    let host = host_of(req.authority);
    let rest = match classify(path) {
        V2Path::Base => {
            if !matches!(req.method, "GET" | "HEAD") {
                return refuse(realm, Refusal::method_not_allowed(req.method, "/v2/", BASE_METHODS));
            }
            return match authenticate(req.authorization, &config.policy, cache, now) {
                Ok(_) => Decision::Respond {
                    response: api_base_ok(),
                    reason: "api_base",
                    authenticated: true,
                },
                Err(r) => refuse(realm, r),
            };
        }
        V2Path::Catalog => {
            return refuse(
                realm,
                Refusal::unsupported(
                    "catalog",
                    "/v2/_catalog is not offered through a connector: it would list other tenants' repositories; \
                     ask for a repository by name",
                ),
            );
        }
        V2Path::Other => {
            return refuse(
                realm,
                Refusal::not_found(
                    "not_registry_api",
                    format!("not a registry API path: expected {PATH_FORM}"),
                ),
            );
        }
        V2Path::Below(rest) => rest,
    };
    let addressed = match address(config, rest, &host) {
        Ok(a) => a,
        Err(r) => return refuse(realm, r),
    };
    // Before anything else: a method the endpoint does not define (TRACE, OPTIONS, PROPFIND...)
    // never reaches the upstream with the connector's credential on it.
    let endpoint = match &addressed {
        Addressed::Known(_, request, _) => request.endpoint,
        Addressed::Unknown(_, endpoint) => *endpoint,
    };
    if !endpoint.allows(req.method) {
        let r = Refusal::method_not_allowed(req.method, endpoint.describe(), endpoint.allowed_methods());
        return refuse(realm, r);
    }
    let (caller, cache_hit) = match authenticate(req.authorization, &config.policy, cache, now) {
        Ok(ok) => ok,
        Err(r) => return refuse(realm, r),
    };
    let (connector, request, prefix) = match addressed {
        Addressed::Known(c, request, prefix) if config.access == AccessMode::Controller || c.admits(&caller) => {
            (c, request, prefix)
        }
        Addressed::Known(c, _, prefix) => {
            let label = if prefix == "/v2" {
                format!("at host {}", quote(&host))
            } else {
                quote(c.label())
            };
            return refuse_authenticated(realm, not_permitted(&label, &caller));
        }
        Addressed::Unknown(label, _) => return refuse_authenticated(realm, not_permitted(&label, &caller)),
    };
    if connector.read_only && !matches!(req.method, "GET" | "HEAD") {
        return refuse_authenticated(
            realm,
            Refusal::denied(
                "read_only",
                format!(
                    "connector {} serves pulls only (spec.readOnly): {} is not allowed through it, whoever asks",
                    quote(connector.label()),
                    quote(req.method)
                ),
            ),
        );
    }
    let mut upstream_path = request.upstream_path();
    let mut mount_from = None;
    let query = match query {
        Some(q) if request.endpoint == Endpoint::UploadStart && q.contains("mount=") => {
            let (q, from) = map_mount_query(q, &prefix);
            mount_from = from;
            Some(q)
        }
        Some(q) => Some(q.to_string()),
        None => None,
    };
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        upstream_path.push('?');
        upstream_path.push_str(&q);
    }
    let scopes = crate::upstream::scopes(request.repository, req.method, mount_from.as_deref());
    let scheme = if req.scheme.is_empty() { "http" } else { req.scheme };
    Decision::Forward(Box::new(Forward {
        path: upstream_path,
        check_access: config.access == AccessMode::Controller,
        response: ResponsePlan {
            endpoint: request.endpoint,
            connector: Rc::clone(connector),
            client: ClientView {
                origin: [scheme, "://", req.authority].concat(),
                prefix,
            },
        },
        caller,
        cache_hit,
        scopes,
    }))
}

/// Cross-repository mount (`?mount=<digest>&from=<repository>`): `from` carries the client's
/// name for the source. Inside the same connector it becomes the upstream name; anything else
/// (another connector, another tenant, a malformed name) loses `mount` and `from`, so the
/// registry starts a plain upload instead of reaching into a repository the caller may not use.
/// Other parameters are kept byte for byte. Returns the new query and the upstream source name.
pub fn map_mount_query(query: &str, client_prefix: &str) -> (String, Option<String>) {
    let params: Vec<&str> = query.split('&').collect();
    let from_raw = params.iter().find_map(|p| p.strip_prefix("from="));
    // The client's name for a repository of this connector starts with the prefix after /v2/.
    let own = client_prefix.strip_prefix("/v2").unwrap_or("").trim_start_matches('/');
    let mapped = from_raw
        .and_then(connector_core::percent::decode_query_value)
        .and_then(|from| {
            let name = if own.is_empty() {
                Some(from.as_str())
            } else {
                from.strip_prefix(own)?.strip_prefix('/')
            };
            name.filter(|n| crate::route::is_repository_name(n)).map(str::to_string)
        });
    let kept = params.iter().filter_map(|p| {
        if p.starts_with("from=") {
            mapped.as_ref().map(|m| format!("from={m}")) // a grammar-checked name needs no escaping
        } else if p.starts_with("mount=") && mapped.is_none() {
            None
        } else {
            Some((*p).to_string())
        }
    });
    (kept.collect::<Vec<_>>().join("&"), mapped)
}

/// Changes to apply to an upstream response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResponseEdits {
    pub location: Option<String>,
    pub link: Option<String>,
    /// Replace the whole response (an upstream 401 becomes the proxy's own challenge).
    pub replace: Option<(LocalResponse, &'static str)>,
}

/// Decides the edits for an upstream response, from its status and every `Location` and
/// `Link` value it has, in order. The upstream's `WWW-Authenticate` is always removed by the
/// caller: it would send the client's token to the upstream's realm.
pub fn plan_response(
    plan: &ResponsePlan,
    realm: &str,
    status: u32,
    locations: &[&str],
    links: &[&str],
) -> ResponseEdits {
    let refuse = |r: Refusal| {
        let reason = r.reason;
        ResponseEdits {
            replace: Some((r.into_response(realm), reason)),
            ..Default::default()
        }
    };
    if status == 401 {
        // Replaced whole: its Location is not worth mapping.
        return refuse(Refusal::upstream_refused(&quote(plan.connector.label())));
    }
    // Mapped once: whether it maps decides the refusal, and the mapping is the edit.
    let location = locations
        .first()
        .and_then(|l| rewrite_url(l, &plan.connector.upstream, &plan.client));
    if let Some(r) = location_refusal(plan, locations, location.is_some(), links) {
        return refuse(r);
    }
    // Several `Link` values are one list (RFC 8288): mapped together, they are written back as
    // one, so none is lost when the header is replaced.
    let link = (!links.is_empty()).then(|| links.join(", "));
    ResponseEdits {
        location,
        link: link.and_then(|l| rewrite_link(&l, &plan.connector.upstream, &plan.client)),
        replace: None,
    }
}

/// Why an answer's `Location` or `Link` must not reach the client, if it must not; `mapped`:
/// whether the first `Location` maps back to the proxy.
fn location_refusal(plan: &ResponsePlan, locations: &[&str], mapped: bool, links: &[&str]) -> Option<Refusal> {
    let (upstream, client) = (&plan.connector.upstream, &plan.client);
    let refuse = |reason: &'static str, what: String| {
        Some(Refusal::bad_gateway(
            reason,
            format!(
                "the upstream registry of connector {} sent {what}",
                quote(plan.connector.label())
            ),
        ))
    };
    let taken = ", where the client would take its credentials";
    // A redirect names one place (RFC 9110 10.2.2), and clients disagree on which of several
    // they follow (Go's and curl take the first, Java's `HttpURLConnection` the last): checking
    // one would let another through.
    // Envoy joins repeated headers with commas before the filter sees them, so the targets
    // are counted inside each value too.
    let count: usize = locations.iter().map(|l| crate::rewrite::location_count(l)).sum();
    if count > 1 {
        return refuse(
            "location_repeated",
            format!(
                "{count} Location headers ({}); a redirect names one place, and clients differ on which they follow",
                quote(&locations.join(", "))
            ),
        );
    }
    // An upload session's Location is where the client sends its next PATCH/PUT, with its
    // ServiceAccount token: on another host, that token could be replayed at the proxy against
    // every connector its ServiceAccount may use. Blob GET redirects (object storage, CDNs) are
    // different: clients follow those without credentials, so they pass untouched, unless they
    // lead to the proxy's host name at another port or scheme, or to a name below it, where
    // Go's client would take the client's token along. So would a client following a `Link`
    // (a tag list's next page) there.
    if let Some(l) = locations.first().filter(|_| !mapped) {
        if matches!(plan.endpoint, Endpoint::UploadStart | Endpoint::Upload) {
            return refuse(
                "upload_location_elsewhere",
                format!(
                    "an upload Location outside its own API ({}){taken}; the registry's configuration (e.g. its public URL) must point uploads at itself",
                    quote(l)
                ),
            );
        }
        if crate::rewrite::leads_off_proxy_with_credentials(l, client) {
            return refuse(
                "location_on_proxy_host",
                format!(
                    "a Location on the proxy's host name but not the proxy ({}){taken}",
                    quote(l)
                ),
            );
        }
    }
    let link = links
        .iter()
        .find(|l| crate::rewrite::link_leads_off(l, upstream, client))?;
    refuse(
        "location_on_proxy_host",
        format!(
            "a Link on the proxy's host name but not the proxy ({}){taken}",
            quote(link)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripped_names_are_found_once_and_authorization_only_when_asked() {
        let names: [&[u8]; 7] = [
            b"cookie",
            b"authorization",
            b"x-checksum",
            b"cookie",
            b"x-forwarded-for",
            b"authorization",
            b"Cookie-Not",
        ];
        assert_eq!(
            stripped_names(names.iter().copied(), true),
            ["cookie", "authorization", "x-forwarded-for"]
        );
        assert_eq!(
            stripped_names(names.iter().copied(), false),
            ["cookie", "x-forwarded-for"]
        );
        assert!(stripped_names([&b"x-checksum"[..]].into_iter(), true).is_empty());
    }

    #[test]
    fn the_host_is_the_authority_without_its_port_in_lowercase() {
        for (authority, host) in [
            ("Proxy.Example:5000", "proxy.example"),
            ("proxy.example", "proxy.example"),
            ("[::1]:5000", "[::1]"),
            ("[::1]", "[::1]"),
            ("[::1", ""),
            ("", ""),
            (":5000", ""),
        ] {
            assert_eq!(host_of(authority), host, "{authority}");
        }
    }

    #[test]
    fn a_connector_removed_while_its_request_waited_is_denied_like_an_unknown_one() {
        let r = removed_meanwhile("demo/gone", "system:serviceaccount:demo:default");
        assert_eq!((r.status, r.code, r.reason), (403, "DENIED", "connector_denied"));
        assert!(r.message.contains("\"demo/gone\" does not exist"), "{}", r.message);
    }
    use crate::config::compile;
    use crate::testkeys::*;
    use base64::Engine as _;
    use jsonwebtoken::Algorithm;

    fn config() -> Config {
        let doc = serde_json::json!({
            "proxy": {"realm": "test-proxy"},
            "identity": {"issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": jwks()},
            "connectors": [
                {"namespace": "demo", "name": "reg", "address": "http://127.0.0.1:5000", "cluster": "up_demo",
                 "credential": {"username": "robot", "passwordEnv": "P"}},
                {"namespace": "team", "name": "reg", "address": "https://team.example", "cluster": "up_team",
                 "credential": {"username": "robot", "passwordEnv": "P"},
                 "allowedNamespaces": ["ci"], "allowedServiceAccounts": ["build/kaniko"]},
            ]
        });
        compile(doc.to_string().as_bytes(), &|k| (k == "P").then(|| "pw".to_string())).unwrap()
    }

    fn token(ns: &str, sa: &str) -> String {
        sign(
            RSA_KID,
            Algorithm::RS256,
            &serde_json::json!({
                "iss": ISSUER, "aud": AUDIENCE, "exp": NOW + 600, "nbf": NOW,
                "sub": format!("system:serviceaccount:{ns}:{sa}"),
                "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa}}
            }),
        )
    }

    fn run(path: &str, host: &str, auth: &[&str]) -> Decision {
        let c = config();
        let mut cache = TokenCache::new(16);
        let req = Request {
            method: "GET",
            path,
            authority: host,
            scheme: "http",
            authorization: auth,
        };
        decide_request(&c, &mut cache, &req, NOW)
    }

    #[test]
    fn only_refusals_of_a_verified_caller_are_marked_authenticated() {
        let authenticated = |d: &Decision| match d {
            Decision::Respond { authenticated, .. } => *authenticated,
            Decision::Forward(_) => panic!("forwarded"),
        };
        let good = format!("Bearer {}", token("demo", "default"));
        let other = format!("Bearer {}", token("other", "default"));
        // Before or at the token check: not accountable, may be held.
        assert!(!authenticated(&run(
            "/v2/namespaces/demo/connectors/reg/lib/app/manifests/v1",
            "p",
            &[]
        )));
        assert!(!authenticated(&run(
            "/v2/namespaces/demo/connectors/reg/lib/app/manifests/v1",
            "p",
            &["Bearer x.y.z"]
        )));
        assert!(!authenticated(&run("/v2/_catalog", "p", &[&good])));
        // After it: a connector the caller may not use, or that does not exist.
        let d = run(
            "/v2/namespaces/team/connectors/reg/lib/app/manifests/v1",
            "p",
            &[&other],
        );
        assert_eq!(refused(&d).0, 403);
        assert!(authenticated(&d));
        let d = run(
            "/v2/namespaces/demo/connectors/gone/lib/app/manifests/v1",
            "p",
            &[&good],
        );
        assert_eq!(refused(&d).0, 403);
        assert!(authenticated(&d));
    }

    fn refused(d: &Decision) -> (u32, String, &'static str) {
        match d {
            Decision::Respond { response, reason, .. } => {
                let v: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
                (
                    response.status,
                    v["errors"][0]["message"].as_str().unwrap().to_string(),
                    reason,
                )
            }
            Decision::Forward(f) => panic!("forwarded: {f:?}"),
        }
    }

    /// A proxy waiting for its controller (no keys, no connectors) refuses every request with
    /// an OCI error: the base with 401, a connector with 401 before anything else.
    #[test]
    fn a_proxy_waiting_for_its_controller_refuses_everything() {
        let doc = serde_json::json!({
            "controller": {"cluster": "channel"},
            "authorization": "controller",
            "identity": {"issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": {"keys": []}},
            "connectors": []
        });
        let c = compile(doc.to_string().as_bytes(), &|_| None).unwrap();
        let b = format!("Bearer {}", token("demo", "default"));
        for path in ["/v2/", "/v2/namespaces/demo/connectors/reg/lib/app/manifests/v1"] {
            for auth in [&[][..], &[b.as_str()][..]] {
                let mut cache = TokenCache::new(16);
                let req = Request {
                    method: "GET",
                    path,
                    authority: "proxy:8443",
                    scheme: "https",
                    authorization: auth,
                };
                let (status, message, _) = refused(&decide_request(&c, &mut cache, &req, NOW));
                assert_eq!(status, 401, "{path} {auth:?}: {message}");
                if !auth.is_empty() {
                    assert!(message.contains("no ServiceAccount keys yet"), "{message}");
                }
            }
        }
    }

    #[test]
    fn path_form_forward() {
        let b = format!("Bearer {}", token("demo", "default"));
        let Decision::Forward(f) = run(
            "/v2/namespaces/demo/connectors/reg/lib/app/manifests/v1?x=%2F",
            "proxy:8080",
            &[&b],
        ) else {
            panic!()
        };
        assert_eq!(f.connector().cluster, "up_demo");
        assert_eq!(f.path, "/v2/lib/app/manifests/v1?x=%2F");
        assert_eq!(f.connector().upstream.authority, "127.0.0.1:5000");
        let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("robot:pw"));
        assert_eq!(
            f.connector().credential,
            crate::config::UpstreamCredential::Static(basic.clone())
        );
        assert!(!f.check_access, "rules mode decides in the filter");
        assert_eq!(f.response.client.prefix, "/v2/namespaces/demo/connectors/reg");
        assert_eq!(f.response.client.origin, "http://proxy:8080");
        assert_eq!(f.caller.namespace, "demo");
        assert!(
            !format!("{f:?}").contains(&basic),
            "Debug must redact the upstream credential"
        );
    }

    #[test]
    fn host_form_forward_and_admission_rules() {
        for (ns, sa) in [("team", "x"), ("ci", "runner"), ("build", "kaniko")] {
            let b = format!("Bearer {}", token(ns, sa));
            let Decision::Forward(f) = run(
                "/v2/lib/app/blobs/sha256:ab",
                "C-Reg-Connector.team.svc.cluster.local:80",
                &[&b],
            ) else {
                panic!("{ns}/{sa}")
            };
            assert_eq!(f.path, "/v2/lib/app/blobs/sha256:ab");
            assert_eq!(f.connector().upstream.authority, "team.example");
            assert_eq!(f.response.client.prefix, "/v2");
        }
    }

    #[test]
    fn unknown_and_forbidden_connectors_look_the_same() {
        let b = format!("Bearer {}", token("other", "default"));
        let (s1, m1, r1) = refused(&run("/v2/namespaces/demo/connectors/reg/a/manifests/v1", "p", &[&b]));
        let (s2, m2, r2) = refused(&run("/v2/namespaces/demo/connectors/nope/a/manifests/v1", "p", &[&b]));
        assert_eq!((s1, r1), (403, "connector_denied"));
        assert_eq!((s1, r1), (s2, r2));
        assert_eq!(m1.replace("reg", "X"), m2.replace("nope", "X"));
        // Host form too.
        let (s3, m3, _) = refused(&run(
            "/v2/a/manifests/v1",
            "c-reg-connector.demo.svc.cluster.local",
            &[&b],
        ));
        let (s4, m4, _) = refused(&run(
            "/v2/a/manifests/v1",
            "c-nope-connector.demo.svc.cluster.local",
            &[&b],
        ));
        assert_eq!(s3, s4);
        assert_eq!(m3.replace("reg", "X"), m4.replace("nope", "X"));
        // ServiceAccount in an allowed namespace but a different SA list entry does not leak.
        let b = format!("Bearer {}", token("build", "other"));
        assert_eq!(
            refused(&run("/v2/namespaces/team/connectors/reg/a/manifests/v1", "p", &[&b])).0,
            403
        );
    }

    #[test]
    fn rbac_mode_leaves_access_to_the_controller_but_still_hides_unknown_connectors() {
        let mut doc: serde_json::Value = serde_json::json!({
            "identity": {"issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": jwks()},
            "controller": {"cluster": "connector_controller"},
            "authorization": "controller",
            "connectors": [
                {"namespace": "demo", "name": "reg", "address": "http://127.0.0.1:5000", "cluster": "up_demo",
                 "credential": {"fromController": "4"}},
            ]
        });
        let c = compile(doc.to_string().as_bytes(), &|_| None).unwrap();
        let mut cache = TokenCache::new(4);
        // A ServiceAccount of another namespace: the rules would refuse, RBAC may allow.
        let b = format!("Bearer {}", token("other", "builder"));
        let auth = [b.as_str()];
        let req = |path| Request {
            method: "GET",
            path,
            authority: "p",
            scheme: "http",
            authorization: &auth,
        };
        let Decision::Forward(f) = decide_request(
            &c,
            &mut cache,
            &req("/v2/namespaces/demo/connectors/reg/a/manifests/v1"),
            NOW,
        ) else {
            panic!("expected a forward that asks the controller")
        };
        assert!(f.check_access);
        assert_eq!(
            f.connector().credential,
            crate::config::UpstreamCredential::Controller { revision: "4".into() }
        );
        assert_eq!(f.caller.subject(), "system:serviceaccount:other:builder");
        // Unknown connectors are still refused here, with the same answer as a denial.
        let d = decide_request(
            &c,
            &mut cache,
            &req("/v2/namespaces/demo/connectors/nope/a/manifests/v1"),
            NOW,
        );
        assert_eq!(refused(&d).0, 403);
        doc["authorization"] = serde_json::json!("rules");
        let c = compile(doc.to_string().as_bytes(), &|_| None).unwrap();
        let d = decide_request(
            &c,
            &mut cache,
            &req("/v2/namespaces/demo/connectors/reg/a/manifests/v1"),
            NOW,
        );
        assert_eq!(refused(&d).0, 403, "rules mode refuses another namespace");
    }

    #[test]
    fn order_of_checks() {
        // Bad name: 400 even without a credential.
        assert_eq!(
            refused(&run("/v2/namespaces/demo/connectors/reg/A/manifests/v1", "p", &[])).0,
            400
        );
        // No credential on a good path: 401 with challenge, for known and unknown connectors alike.
        for path in [
            "/v2/namespaces/demo/connectors/reg/a/manifests/v1",
            "/v2/namespaces/demo/connectors/zz/a/manifests/v1",
        ] {
            let d = run(path, "p", &[]);
            let Decision::Respond { response, .. } = &d else {
                panic!()
            };
            assert_eq!(response.status, 401);
            assert!(
                response
                    .headers
                    .contains(&("www-authenticate".into(), "Basic realm=\"test-proxy\"".into()))
            );
        }
        // Catalog refused, API base answered.
        assert_eq!(refused(&run("/v2/_catalog?n=10", "p", &[])).0, 403);
        assert_eq!(refused(&run("/v2/", "p", &[])).0, 401);
        let b = format!("Bearer {}", token("anyone", "default"));
        let Decision::Respond { response, .. } = run("/v2/", "p", &[&b]) else {
            panic!()
        };
        assert_eq!((response.status, response.body.as_slice()), (200, b"{}".as_slice()));
        let Decision::Respond { response, .. } = run("/v2", "p", &[&b]) else {
            panic!()
        };
        assert_eq!(response.status, 200);
        // Plain /v2/<repo> on a non-connector host names the expected form.
        let (s, m, _) = refused(&run("/v2/lib/app/manifests/v1", "p", &[&b]));
        assert_eq!(s, 404);
        assert!(m.contains("/v2/namespaces/<namespace>/connectors/<connector>/"), "{m}");
        assert_eq!(refused(&run("/", "p", &[&b])).0, 404);
    }

    #[test]
    fn mounts_are_mapped_inside_the_connector_and_dropped_otherwise() {
        let p = "/v2/namespaces/demo/connectors/reg";
        let table = [
            (
                "mount=sha256%3Aab&from=namespaces%2Fdemo%2Fconnectors%2Freg%2Flib%2Fsrc",
                "mount=sha256%3Aab&from=lib/src",
                Some("lib/src"),
            ),
            (
                "mount=sha256:ab&from=namespaces/demo/connectors/reg/src",
                "mount=sha256:ab&from=src",
                Some("src"),
            ),
            // Another connector, another tenant, a prefix trick, garbage: plain upload.
            ("mount=sha256:ab&from=namespaces/other/connectors/x/src", "", None),
            ("mount=sha256:ab&from=namespaces/demo/connectors/reg-b/src", "", None),
            ("mount=sha256:ab&from=namespaces/demo/connectors/reg/../x", "", None),
            (
                "digest=sha256:cd&mount=sha256:ab&from=namespaces/demo/connectors/regx/y",
                "digest=sha256:cd",
                None,
            ),
            ("mount=sha256:ab", "", None),
            ("mount=sha256:ab&from=%zz", "", None),
        ];
        for (q, want_q, want_from) in table {
            let (got_q, got_from) = map_mount_query(q, p);
            assert_eq!((got_q.as_str(), got_from.as_deref()), (want_q, want_from), "{q}");
        }
        // Host form: names are plain.
        assert_eq!(
            map_mount_query("mount=sha256:ab&from=lib/src", "/v2"),
            ("mount=sha256:ab&from=lib/src".into(), Some("lib/src".into()))
        );
        // Through the whole decision: path and scopes.
        let b = format!("Bearer {}", token("demo", "default"));
        let c = config();
        let mut cache = TokenCache::new(4);
        let req = Request {
            method: "POST",
            path: "/v2/namespaces/demo/connectors/reg/lib/dst/blobs/uploads/?mount=sha256:ab&from=namespaces/demo/connectors/reg/lib/src",
            authority: "p",
            scheme: "http",
            authorization: &[&b],
        };
        let Decision::Forward(f) = decide_request(&c, &mut cache, &req, NOW) else {
            panic!()
        };
        assert_eq!(f.path, "/v2/lib/dst/blobs/uploads/?mount=sha256:ab&from=lib/src");
        assert_eq!(
            f.scopes,
            vec!["repository:lib/dst:pull,push", "repository:lib/src:pull"]
        );
    }

    #[test]
    fn upstream_401_becomes_the_proxys_challenge() {
        let plan = ResponsePlan {
            endpoint: Endpoint::UploadStart,
            connector: Rc::clone(config().connector("demo", "reg").unwrap()),
            client: ClientView {
                origin: "http://p".into(),
                prefix: "/v2/namespaces/demo/connectors/reg".into(),
            },
        };
        let e = plan_response(&plan, "realm", 401, &[], &[]);
        let (resp, reason) = e.replace.unwrap();
        assert_eq!((resp.status, reason), (401, "upstream_refused_credential"));
        assert!(
            String::from_utf8(resp.body)
                .unwrap()
                .contains("refused the credential of connector")
        );
        assert!(
            resp.headers
                .contains(&("www-authenticate".into(), "Basic realm=\"realm\"".into()))
        );
        let e = plan_response(&plan, "realm", 202, &["/v2/a/blobs/uploads/u?_state=1"], &[]);
        assert_eq!(
            e.location.as_deref(),
            Some("/v2/namespaces/demo/connectors/reg/a/blobs/uploads/u?_state=1")
        );
        assert!(e.replace.is_none());
    }

    #[test]
    fn a_read_only_connector_serves_pulls_only() {
        let doc = serde_json::json!({
            "proxy": {"realm": "test-proxy"},
            "identity": {"issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": jwks()},
            "connectors": [
                {"namespace": "demo", "name": "reg", "address": "http://127.0.0.1:5000", "cluster": "up_demo",
                 "credential": {"username": "robot", "passwordEnv": "P"}, "readOnly": true},
            ]
        });
        let c = compile(doc.to_string().as_bytes(), &|k| (k == "P").then(|| "pw".to_string())).unwrap();
        let t = format!("Bearer {}", token("demo", "default"));
        for (method, path, forwarded) in [
            ("GET", "/v2/namespaces/demo/connectors/reg/lib/app/manifests/v1", true),
            (
                "HEAD",
                "/v2/namespaces/demo/connectors/reg/lib/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
                true,
            ),
            ("PUT", "/v2/namespaces/demo/connectors/reg/lib/app/manifests/v1", false),
            (
                "POST",
                "/v2/namespaces/demo/connectors/reg/lib/app/blobs/uploads/",
                false,
            ),
            (
                "DELETE",
                "/v2/namespaces/demo/connectors/reg/lib/app/manifests/v1",
                false,
            ),
        ] {
            let mut cache = TokenCache::new(4);
            let req = Request {
                method,
                path,
                authority: "proxy:8080",
                scheme: "http",
                authorization: &[&t],
            };
            match decide_request(&c, &mut cache, &req, NOW) {
                Decision::Forward(_) => assert!(forwarded, "{method} was forwarded"),
                Decision::Respond { response, reason, .. } => {
                    assert!(!forwarded, "{method} refused: {reason}");
                    assert_eq!((response.status, reason), (403, "read_only"), "{method}");
                    assert!(String::from_utf8(response.body).unwrap().contains("spec.readOnly"));
                }
            }
        }
        let bad = serde_json::json!({
            "proxy": {"realm": "r"},
            "identity": {"issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": jwks()},
            "connectors": [{"namespace": "demo", "name": "reg", "address": "http://127.0.0.1:5000", "cluster": "c",
                 "credential": {"username": "robot", "passwordEnv": "P"}, "readOnly": "yes"}]
        });
        let Err(errs) = compile(bad.to_string().as_bytes(), &|_| Some("pw".into())) else {
            panic!("a non-boolean readOnly was accepted");
        };
        assert!(
            errs.iter().any(|e| e.to_string().contains("connectors[0].readOnly")),
            "{errs:?}"
        );
    }

    #[test]
    fn an_upload_location_off_the_proxy_is_refused_but_a_blob_redirect_passes() {
        let mut plan = ResponsePlan {
            endpoint: Endpoint::Upload,
            connector: Rc::clone(config().connector("demo", "reg").unwrap()),
            client: ClientView {
                origin: "http://p".into(),
                prefix: "/v2/namespaces/demo/connectors/reg".into(),
            },
        };
        for off in [
            "https://evil.example/v2/a/blobs/uploads/u?_state=1",
            "//evil.example/v2/a/blobs/uploads/u",
            "http://127.0.0.1:5001/v2/a/blobs/uploads/u",
            "/not-v2/upload",
        ] {
            let e = plan_response(&plan, "realm", 202, &[off], &[]);
            let (resp, reason) = e.replace.expect(off);
            assert_eq!((resp.status, reason), (502, "upload_location_elsewhere"), "{off}");
            assert!(
                String::from_utf8(resp.body)
                    .unwrap()
                    .contains("upload Location outside")
            );
        }
        let e = plan_response(
            &plan,
            "realm",
            202,
            &["http://127.0.0.1:5000/v2/a/blobs/uploads/u?_state=1"],
            &[],
        );
        assert_eq!(
            e.location.as_deref(),
            Some("http://p/v2/namespaces/demo/connectors/reg/a/blobs/uploads/u?_state=1")
        );
        plan.endpoint = Endpoint::Blob;
        let s3 = "https://bucket.s3.example/blob?X-Amz-Signature=abc";
        let e = plan_response(&plan, "realm", 307, &[s3], &[]);
        assert!(
            e.replace.is_none() && e.location.is_none(),
            "a blob redirect passes untouched"
        );
        // The proxy's own host name at another port: a Go client would take its token there.
        let e = plan_response(&plan, "realm", 307, &["http://p:31000/blob"], &[]);
        let (resp, reason) = e.replace.expect("a redirect to the proxy's host at another port");
        assert_eq!((resp.status, reason), (502, "location_on_proxy_host"));
        assert!(
            String::from_utf8(resp.body)
                .unwrap()
                .contains("on the proxy's host name but not the proxy")
        );
    }

    /// Two `Location` values are refused whatever they are (a client might follow either), and
    /// a `Link` target on the proxy's host name at another port is refused like a `Location`
    /// there, while several harmless `Link` values are mapped together and none is lost.
    #[test]
    fn repeated_locations_and_links_off_the_proxy_are_refused() {
        let plan = ResponsePlan {
            endpoint: Endpoint::TagsList,
            connector: Rc::clone(config().connector("demo", "reg").unwrap()),
            client: ClientView {
                origin: "http://p".into(),
                prefix: "/v2/namespaces/demo/connectors/reg".into(),
            },
        };
        let storage = "https://bucket.s3.example/blob";
        let joined = format!("{storage},http://p:31000/blob");
        for locations in [
            vec![storage, "http://p:31000/blob"],
            vec![storage, storage],
            // As Envoy hands two Location headers to the filter.
            vec![joined.as_str()],
        ] {
            let e = plan_response(&plan, "realm", 307, &locations, &[]);
            let (resp, reason) = e.replace.expect("two Locations");
            assert_eq!((resp.status, reason), (502, "location_repeated"));
            let body = String::from_utf8(resp.body).unwrap();
            assert!(
                body.contains("2 Location headers")
                    && body.contains(locations.iter().flat_map(|l| l.rsplit(',')).next().unwrap()),
                "{body}"
            );
        }
        for link in [
            r#"<http://p:31000/v2/a/tags/list?n=1&last=b>; rel="next""#,
            r#"<https://p/v2/a/tags/list?last=b>; rel="next""#,
            r#"<http://mirror.p/x>; rel="alternate", </v2/a/tags/list?last=b>; rel="next""#,
        ] {
            let e = plan_response(&plan, "realm", 200, &[], &[link]);
            let (resp, reason) = e.replace.expect(link);
            assert_eq!((resp.status, reason), (502, "location_on_proxy_host"), "{link}");
            let body = String::from_utf8(resp.body).unwrap();
            assert!(body.contains("a Link on the proxy's host name"), "{body}");
        }
        // The upstream's own next page, then a harmless elsewhere, in two values: one value,
        // the first mapped, the second kept.
        let e = plan_response(
            &plan,
            "realm",
            200,
            &[],
            &[
                r#"<http://127.0.0.1:5000/v2/a/tags/list?last=b>; rel="next""#,
                r#"<https://docs.example/tags>; rel="help""#,
            ],
        );
        assert!(e.replace.is_none());
        assert_eq!(
            e.link.as_deref(),
            Some(
                r#"<http://p/v2/namespaces/demo/connectors/reg/a/tags/list?last=b>; rel="next", <https://docs.example/tags>; rel="help""#
            )
        );
        // One unmapped value is left as it is (nothing to write).
        let e = plan_response(
            &plan,
            "realm",
            200,
            &[],
            &[r#"<https://docs.example/tags>; rel="help""#],
        );
        assert!(e.replace.is_none() && e.link.is_none());
    }
}

#[cfg(test)]
mod perf_probe {
    use super::*;
    use crate::config::compile;
    use crate::testkeys::*;
    use jsonwebtoken::Algorithm;

    #[test]
    #[ignore]
    /// A probe, not a test: prints what one warm decision costs natively (run with
    /// `--release -- --ignored --nocapture`). Timing is never asserted.
    fn warm_decision_cost() {
        let doc = serde_json::json!({
            "identity": {"issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": jwks()},
            "connectors": [{"namespace": "demo", "name": "reg", "address": "http://127.0.0.1:5000", "cluster": "up",
                 "credential": {"username": "robot", "passwordEnv": "P"}}]
        });
        let c = compile(doc.to_string().as_bytes(), &|_| Some("pw".to_string())).unwrap();
        let t = format!(
            "Bearer {}",
            sign(
                RSA_KID,
                Algorithm::RS256,
                &serde_json::json!({
                    "iss": ISSUER, "aud": AUDIENCE, "exp": NOW + 600, "nbf": NOW,
                    "sub": "system:serviceaccount:demo:default",
                    "kubernetes.io": {"namespace": "demo", "serviceaccount": {"name": "default"}}
                })
            )
        );
        let mut cache = TokenCache::new(16);
        let auth = [t.as_str()];
        let req = Request {
            method: "GET",
            path: "/v2/namespaces/demo/connectors/reg/lib/app/manifests/v1",
            authority: "127.0.0.1:8080",
            scheme: "http",
            authorization: &auth,
        };
        let n = 200_000;
        let s = std::time::Instant::now();
        for _ in 0..n {
            assert!(matches!(
                decide_request(&c, &mut cache, &req, NOW),
                Decision::Forward(_)
            ));
        }
        eprintln!("warm decision: {:.2} us", s.elapsed().as_secs_f64() * 1e6 / n as f64);
        let s = std::time::Instant::now();
        let m = 2000;
        for _ in 0..m {
            crate::identity::verify(&t[7..], &c.policy, NOW).unwrap();
        }
        eprintln!("RS256 verify: {:.1} us", s.elapsed().as_secs_f64() * 1e6 / m as f64);
        // A new token on every request, the cache at capacity: the whole miss path per kind of key.
        for (kid, alg) in [(RSA_KID, Algorithm::RS256), (crate::testkeys::EC_KID, Algorithm::ES256)] {
            let fresh: Vec<String> = (0..64)
                .map(|i| {
                    let claims = serde_json::json!({
                        "iss": ISSUER, "aud": AUDIENCE, "exp": NOW + 600, "nbf": NOW, "jti": format!("t-{i}"),
                        "sub": "system:serviceaccount:demo:default",
                        "kubernetes.io": {"namespace": "demo", "serviceaccount": {"name": "default"}}
                    });
                    format!("Bearer {}", sign(kid, alg, &claims))
                })
                .collect();
            let mut cache = TokenCache::new(16);
            let s = std::time::Instant::now();
            let rounds = 8;
            for _ in 0..rounds {
                for t in &fresh {
                    let auth = [t.as_str()];
                    let req = Request {
                        authorization: &auth,
                        ..req
                    };
                    assert!(matches!(
                        decide_request(&c, &mut cache, &req, NOW),
                        Decision::Forward(_)
                    ));
                }
            }
            let per = s.elapsed().as_secs_f64() * 1e6 / (rounds * fresh.len()) as f64;
            eprintln!("{alg:?} new-token decision (cache at capacity): {per:.1} us");
        }
    }

    #[test]
    #[ignore]
    /// A probe, not a test: what compiling a controller-rendered document of 5,000 connectors
    /// costs natively, from nothing and after the running one (a worker), what the memo's check
    /// costs (Envoy's configuration canary), and one scan of the document; run under `perf` to
    /// see where it goes. Timing is never asserted.
    fn compile_cost() {
        let doc = |changed: usize| {
            let entries: Vec<serde_json::Value> = (0..5000)
                .map(|i| {
                    let rev = if i == changed {
                        "r1".to_string()
                    } else {
                        format!("r0-{i}")
                    };
                    serde_json::json!({
                        "namespace": format!("team-{}", i % 50), "name": format!("c{i}"),
                        "address": "https://registry.internal:5000",
                        "cluster": "upstream_https_registry_internal_5000_0123abcd",
                        "credential": {"fromController": rev},
                    })
                })
                .collect();
            serde_json::json!({
                "identity": {"issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": jwks()},
                "controller": {"cluster": "connector_controller", "authority": "controller.local"},
                "connectors": entries,
            })
            .to_string()
        };
        let env = |_: &str| None;
        let (first, second) = (doc(usize::MAX), doc(7));
        let rounds = 20;
        let s = std::time::Instant::now();
        for _ in 0..rounds {
            compile(first.as_bytes(), &env).unwrap();
        }
        let full = s.elapsed().as_secs_f64() * 1e3 / f64::from(rounds);
        let running = compile(first.as_bytes(), &env).unwrap();
        let s = std::time::Instant::now();
        for _ in 0..rounds {
            crate::config::compile_after(second.as_bytes(), &env, Some(&running)).unwrap();
        }
        let after = s.elapsed().as_secs_f64() * 1e3 / f64::from(rounds);
        // What Envoy's canary does instead of compiling (the memo of the running document), and
        // the scan that cuts a document at its entries, which both do.
        let memo = crate::config::memo::memo_of(first.as_bytes(), &running).unwrap();
        let s = std::time::Instant::now();
        for _ in 0..rounds {
            crate::config::memo::check_change(second.as_bytes(), &memo, &env).unwrap();
        }
        let memo_check = s.elapsed().as_secs_f64() * 1e3 / f64::from(rounds);
        let s = std::time::Instant::now();
        for _ in 0..rounds {
            connector_core::config::split(second.as_bytes()).unwrap();
        }
        let split = s.elapsed().as_secs_f64() * 1e3 / f64::from(rounds);
        eprintln!(
            "5,000 connectors ({} bytes): full compile {full:.1} ms, after the running one {after:.1} ms, \
             the memo's check {memo_check:.1} ms, one split {split:.1} ms",
            first.len()
        );
    }
}
