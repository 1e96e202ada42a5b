//! The filter's configuration: one JSON document, validated as a whole and compiled into
//! indexed structures before any request is served.
//!
//! Validation walks the document itself (rather than stopping at serde's first error) so that
//! *every* problem is reported at once, each with its field path. Secrets never appear in the
//! document: a credential names the environment variables (handed to the VM by Envoy through
//! `vm_config.environment_variables.host_env_keys`) that hold it, so the plugin configuration
//! and Envoy's config dump stay free of passwords.

use std::collections::{HashMap, HashSet};
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use crate::identity::{Algorithm, Identity, MAX_CLOCK_SKEW, TokenPolicy, VerifyKey};
use crate::route::{is_dns_label, is_dns_subdomain};

pub const DEFAULT_REALM: &str = "oci-connector";
pub use connector_core::host::{DEFAULT_HOST_PATTERN, render_host};
pub const DEFAULT_TOKEN_CACHE_SIZE: u64 = 10_000;
/// 24 h: ServiceAccount tokens for a custom audience are short-lived (1 h by default; the API
/// server's one-year extension applies only to its own audience).
pub const DEFAULT_MAX_TOKEN_LIFETIME: u64 = 86_400;

/// One validation problem, located by its JSON path (e.g. `connectors[1].credential.passwordEnv`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The validated, compiled configuration.
pub struct Config {
    pub realm: String,
    pub host_pattern: String,
    pub policy: TokenPolicy,
    pub token_cache_size: usize,
    pub connectors: Vec<Connector>,
    pub controller: Option<ControllerChannel>,
    pub access: AccessMode,
    by_name: HashMap<(String, String), usize>,
    by_host: HashMap<String, usize>,
}

/// The upstream registry's origin, as the connector's `address` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// A registry reachable through the proxy.
pub struct Connector {
    pub namespace: String,
    pub name: String,
    pub upstream: Upstream,
    /// The Envoy cluster that reaches the upstream.
    pub cluster: String,
    /// The upstream credential, or where to get it. Never logged (see the Debug impls).
    pub credential: UpstreamCredential,
    pub allowed_namespaces: HashSet<String>,
    /// `(namespace, service account)` pairs.
    pub allowed_service_accounts: HashSet<(String, String)>,
    pub hosts: Vec<String>,
    /// Token realms off the upstream's host that may receive the connector's credential.
    pub token_realms: Vec<TokenRealm>,
    /// Pulls only: pushes and deletes through this connector are refused, whoever asks.
    pub read_only: bool,
    /// A hash of the connector's whole configuration entry (which carries the controller's
    /// credential revision): what its caches depend on. A new configuration keeps a
    /// connector's learned challenge, upstream tokens and controller credential exactly when
    /// this is unchanged.
    pub revision: u64,
}

/// Where a connector's upstream credential comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum UpstreamCredential {
    /// A ready-made `Authorization` value, read from the VM's environment when the
    /// configuration was compiled (standalone Envoy without the controller).
    Static(String),
    /// Fetched from the sidecar controller over its loopback channel and cached per
    /// configuration. `revision` changes whenever the Secret does, and a configuration that
    /// carries a new revision is a new cache: rotation needs no restart.
    Controller { revision: String },
}

impl fmt::Debug for UpstreamCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Static(_) => f.write_str("Static(<redacted>)"),
            Self::Controller { revision } => write!(f, "Controller {{ revision: {revision:?} }}"),
        }
    }
}

/// The sidecar controller's loopback channel (credentials, access decisions, key refresh).
#[derive(Clone, PartialEq, Eq)]
pub struct ControllerChannel {
    /// The Envoy cluster that reaches the controller on loopback.
    pub cluster: String,
    /// `:authority` sent to it.
    pub authority: String,
    /// Shared key the controller requires (`Authorization: Bearer`), read from the VM's
    /// environment; `None` when the controller requires none.
    pub key: Option<String>,
}

impl fmt::Debug for ControllerChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControllerChannel")
            .field("cluster", &self.cluster)
            .field("authority", &self.authority)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Who decides whether a caller may use a connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    /// The connector's own lists ([`Connector::admits`]), in the filter.
    Rules,
    /// Kubernetes RBAC: the controller answers (SubjectAccessReview), the filter caches.
    Controller,
}

/// A token realm a connector explicitly allows, and the Envoy cluster that reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRealm {
    pub scheme: String,
    pub authority: String,
    pub path: String,
    pub cluster: String,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("upstream", &self.upstream)
            .field("cluster", &self.cluster)
            .field("credential", &self.credential)
            .finish_non_exhaustive()
    }
}

impl Connector {
    pub fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// First rule: a ServiceAccount may use the connectors of its own namespace; a connector
    /// may additionally admit other namespaces or individual service accounts.
    pub fn admits(&self, who: &Identity) -> bool {
        connector_core::access::admits(&self.namespace, self, &who.namespace, &who.service_account)
    }
}

impl connector_core::access::AllowLists for Connector {
    fn allows_namespace(&self, namespace: &str) -> bool {
        self.allowed_namespaces.contains(namespace)
    }

    fn allows_service_account(&self, namespace: &str, service_account: &str) -> bool {
        // Checked per request: no owned key is built for the set lookup unless the lists hold one.
        !self.allowed_service_accounts.is_empty()
            && self
                .allowed_service_accounts
                .contains(&(namespace.to_string(), service_account.to_string()))
    }
}

impl Config {
    pub fn connector(&self, namespace: &str, name: &str) -> Option<&Connector> {
        let i = self.by_name.get(&(namespace.to_string(), name.to_string()))?;
        self.connectors.get(*i)
    }

    /// The connector named `<namespace>/<name>`.
    pub fn connector_by_label(&self, label: &str) -> Option<&Connector> {
        let (namespace, name) = label.split_once('/')?;
        self.connector(namespace, name)
    }

    /// The connector whose host-form name is `host` (no port, any case).
    pub fn connector_by_host(&self, host: &str) -> Option<&Connector> {
        let i = self.by_host.get(&host.to_ascii_lowercase())?;
        self.connectors.get(*i)
    }

    /// Whether `host` has the shape of a host-form name, known or not: such a host is answered
    /// like a forbidden connector rather than as "not a connector address".
    pub fn looks_like_connector_host(&self, host: &str) -> bool {
        connector_core::host::matches_pattern(&self.host_pattern, &host.to_ascii_lowercase())
    }
}

/// Collects errors while walking the document.
struct Walk<'e> {
    errors: &'e mut Vec<ConfigError>,
}

impl Walk<'_> {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// An object with only `known` keys (all unknown keys are reported).
    fn object<'v>(
        &mut self,
        v: Option<&'v Value>,
        path: &str,
        known: &[&str],
        required: bool,
    ) -> Option<&'v Map<String, Value>> {
        match v {
            None if required => {
                self.err(path, "is required");
                None
            }
            None => None,
            Some(Value::Object(m)) => {
                for k in m.keys() {
                    if !known.contains(&k.as_str()) {
                        self.err(
                            format!("{path}.{k}"),
                            format!("unknown field: expected one of {}", known.join(", ")),
                        );
                    }
                }
                Some(m)
            }
            Some(_) => {
                self.err(path, "expected an object");
                None
            }
        }
    }

    fn string<'v>(&mut self, m: &'v Map<String, Value>, path: &str, key: &str, required: bool) -> Option<&'v str> {
        match m.get(key) {
            None if required => {
                self.err(format!("{path}.{key}"), "is required");
                None
            }
            None => None,
            Some(Value::String(s)) if s.is_empty() => {
                self.err(format!("{path}.{key}"), "must not be empty");
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                self.err(format!("{path}.{key}"), "expected a string");
                None
            }
        }
    }

    fn strings(&mut self, m: &Map<String, Value>, path: &str, key: &str, required: bool) -> Vec<String> {
        let p = format!("{path}.{key}");
        match m.get(key) {
            None if required => {
                self.err(p, "is required: expected a non-empty list of strings");
                vec![]
            }
            None => vec![],
            Some(Value::Array(items)) => {
                if required && items.is_empty() {
                    self.err(&p, "must not be empty");
                }
                let mut out = vec![];
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) if !s.is_empty() => out.push(s.clone()),
                        _ => self.err(format!("{p}[{i}]"), "expected a non-empty string"),
                    }
                }
                out
            }
            Some(_) => {
                self.err(p, "expected a list of strings");
                vec![]
            }
        }
    }

    fn number(&mut self, m: &Map<String, Value>, path: &str, key: &str, range: (u64, u64), default: u64) -> u64 {
        match m.get(key) {
            None => default,
            Some(v) => match v.as_u64() {
                Some(n) if n >= range.0 && n <= range.1 => n,
                _ => {
                    self.err(
                        format!("{path}.{key}"),
                        format!("expected an integer from {} to {}", range.0, range.1),
                    );
                    default
                }
            },
        }
    }
}

/// Validates and compiles the configuration. `env` reads the VM's environment.
pub fn compile(json: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, Vec<ConfigError>> {
    let mut errors = vec![];
    let doc: Value = match serde_json::from_slice(json) {
        Ok(v) => v,
        Err(e) => {
            return Err(vec![ConfigError {
                path: "$".into(),
                message: format!("not valid JSON: {e} (line {}, column {})", e.line(), e.column()),
            }]);
        }
    };
    let mut w = Walk { errors: &mut errors };
    let root = w.object(
        Some(&doc),
        "$",
        &["proxy", "identity", "connectors", "controller", "authorization"],
        true,
    );
    let empty = Map::new();
    let root = root.unwrap_or(&empty);

    let proxy = w
        .object(root.get("proxy"), "proxy", &["realm", "hostPattern"], false)
        .unwrap_or(&empty);
    let realm = w
        .string(proxy, "proxy", "realm", false)
        .unwrap_or(DEFAULT_REALM)
        .to_string();
    if realm.contains(['"', '\\']) || realm.chars().any(char::is_control) {
        w.err(
            "proxy.realm",
            "must not contain quotes, backslashes or control characters",
        );
    }
    let host_pattern = w
        .string(proxy, "proxy", "hostPattern", false)
        .unwrap_or(DEFAULT_HOST_PATTERN)
        .to_string();
    check_host_pattern(&mut w, &host_pattern);

    let (policy, token_cache_size) = compile_identity(&mut w, root.get("identity"));
    let controller = compile_controller(&mut w, root.get("controller"), env);
    let access = match root.get("authorization") {
        None => AccessMode::Rules,
        Some(Value::String(s)) if s == "rules" => AccessMode::Rules,
        Some(Value::String(s)) if s == "controller" => AccessMode::Controller,
        Some(_) => {
            w.err(
                "authorization",
                "expected \"rules\" (the connector's lists) or \"controller\" (Kubernetes RBAC through the controller)",
            );
            AccessMode::Rules
        }
    };
    if access == AccessMode::Controller && root.get("controller").is_none() {
        w.err(
            "authorization",
            "\"controller\" needs the controller channel: set controller.cluster",
        );
    }
    let has_controller = root.get("controller").is_some();

    let mut connectors = vec![];
    let mut by_name = HashMap::new();
    let mut by_host: HashMap<String, usize> = HashMap::new();
    match root.get("connectors") {
        Some(Value::Array(items)) => {
            // A controller-managed configuration may be empty (the last Connector was deleted:
            // every request is then refused); a hand-written one without connectors is a mistake.
            if items.is_empty() && !has_controller {
                w.err("connectors", "must list at least one connector");
            }
            for (i, item) in items.iter().enumerate() {
                let path = format!("connectors[{i}]");
                let Some(c) = compile_connector(&mut w, item, &path, env, has_controller) else {
                    continue;
                };
                let index = connectors.len();
                if by_name.insert((c.namespace.clone(), c.name.clone()), index).is_some() {
                    w.err(&path, format!("connector {} is defined twice", c.label()));
                }
                let mut hosts = vec![render_host(&host_pattern, &c.namespace, &c.name)];
                hosts.extend(c.hosts.iter().cloned());
                for h in hosts {
                    if by_host.insert(h.clone(), index).is_some_and(|other| other != index) {
                        w.err(
                            format!("{path}.hosts"),
                            format!("host {h:?} is already used by another connector"),
                        );
                    }
                }
                connectors.push(c);
            }
        }
        None => w.err("connectors", "is required: expected a list of connectors"),
        Some(_) => w.err("connectors", "expected a list of connectors"),
    }
    // An empty key set verifies no token. That is the state of a proxy waiting for its
    // controller (the Istio WasmPlugin as shipped, before `--istio-wasmplugin` writes it):
    // valid only with the controller channel and no connectors, so it refuses everything with
    // an OCI error. With connectors it is a mistake: nobody could ever use them.
    let no_keys = root
        .get("identity")
        .and_then(|i| i.get("jwks"))
        .and_then(|j| j.get("keys"))
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty);
    let no_connectors = root
        .get("connectors")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty);
    if no_keys && !(has_controller && no_connectors) {
        w.err(
            "identity.jwks.keys",
            "is required: expected a non-empty list of JWK public keys (the cluster's /openid/v1/jwks); \
             an empty list is accepted only while a controller-managed configuration has no connectors",
        );
    }

    match (errors.is_empty(), policy) {
        (true, Some(policy)) => Ok(Config {
            realm,
            host_pattern,
            policy,
            token_cache_size,
            connectors,
            controller,
            access,
            by_name,
            by_host,
        }),
        _ => Err(errors),
    }
}

fn check_host_pattern(w: &mut Walk<'_>, pattern: &str) {
    for problem in connector_core::host::pattern_problems(pattern) {
        w.err("proxy.hostPattern", problem);
    }
}

fn compile_identity(w: &mut Walk<'_>, v: Option<&Value>) -> (Option<TokenPolicy>, usize) {
    let known = [
        "issuers",
        "audiences",
        "jwks",
        "clockSkewSeconds",
        "tokenCacheSize",
        "maxTokenLifetimeSeconds",
    ];
    let Some(m) = w.object(v, "identity", &known, true) else {
        return (None, 0);
    };
    let issuers = w.strings(m, "identity", "issuers", true);
    let audiences = w.strings(m, "identity", "audiences", true);
    let clock_skew = w.number(m, "identity", "clockSkewSeconds", (0, MAX_CLOCK_SKEW), MAX_CLOCK_SKEW);
    let max_lifetime = w.number(
        m,
        "identity",
        "maxTokenLifetimeSeconds",
        (60, 366 * 86_400),
        DEFAULT_MAX_TOKEN_LIFETIME,
    );
    let cache = w.number(
        m,
        "identity",
        "tokenCacheSize",
        (1, 1_000_000),
        DEFAULT_TOKEN_CACHE_SIZE,
    );
    let mut keys = HashMap::new();
    if let Some(jwks) = w.object(m.get("jwks"), "identity.jwks", &["keys"], true) {
        match jwks.get("keys") {
            // Allowed only for a controller-managed configuration without connectors (checked
            // in `compile`, which knows both): a proxy whose controller has not written its
            // configuration yet refuses every token with an OCI error instead of failing to load.
            Some(Value::Array(items)) if items.is_empty() => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let path = format!("identity.jwks.keys[{i}]");
                    if let Some((kid, key)) = compile_jwk(w, item, &path)
                        && keys.insert(kid.clone(), key).is_some()
                    {
                        w.err(format!("{path}.kid"), format!("key id {kid:?} appears twice"));
                    }
                }
            }
            _ => w.err(
                "identity.jwks.keys",
                "is required: expected a non-empty list of JWK public keys (the cluster's /openid/v1/jwks)",
            ),
        }
    }
    let policy = TokenPolicy {
        keys,
        issuers: issuers.into_iter().collect(),
        audiences: audiences.into_iter().collect(),
        clock_skew,
        max_lifetime,
    };
    (Some(policy), usize::try_from(cache).unwrap_or(usize::MAX))
}

/// Checks one JWK exactly as [`compile`] checks each of `identity.jwks.keys`: `Err` lists why
/// the filter could not verify tokens with it (paths start at `path`). The controller uses it
/// to skip a cluster's unusable keys (ES512, Ed25519, short RSA) instead of refusing them all.
pub fn check_jwk(v: &Value, path: &str) -> Result<(), Vec<ConfigError>> {
    let mut errors = vec![];
    let mut w = Walk { errors: &mut errors };
    let compiled = compile_jwk(&mut w, v, path);
    match (compiled, errors.is_empty()) {
        (Some(_), true) => Ok(()),
        (_, false) => Err(errors),
        (None, true) => Err(vec![ConfigError {
            path: path.to_string(),
            message: "not a usable key".into(),
        }]),
    }
}

fn b64url(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

/// A JWK public key. The algorithm is fixed per key: the JWK's `alg`, or the one its type implies.
fn compile_jwk(w: &mut Walk<'_>, v: &Value, path: &str) -> Option<(String, VerifyKey)> {
    let Value::Object(m) = v else {
        w.err(path, "expected a JWK object");
        return None;
    };
    let kid = w.string(m, path, "kid", true);
    let kty = w.string(m, path, "kty", true);
    let alg = w.string(m, path, "alg", false);
    if let Some(u) = w.string(m, path, "use", false)
        && u != "sig"
    {
        w.err(
            format!("{path}.use"),
            "expected \"sig\": only signing keys verify tokens",
        );
    }
    let key = match kty? {
        "RSA" => {
            let n = w.string(m, path, "n", true);
            let e = w.string(m, path, "e", true);
            let algorithm = match alg.unwrap_or("RS256") {
                "RS256" => Algorithm::RS256,
                "RS384" => Algorithm::RS384,
                "RS512" => Algorithm::RS512,
                "PS256" => Algorithm::PS256,
                "PS384" => Algorithm::PS384,
                "PS512" => Algorithm::PS512,
                other => {
                    w.err(format!("{path}.alg"), format!("{other:?} is not an RSA signature algorithm: expected RS256, RS384, RS512, PS256, PS384 or PS512"));
                    return None;
                }
            };
            let (n, e) = (n?, e?);
            let Some(n) = b64url(n).filter(|n| n.len() >= 256) else {
                w.err(
                    format!("{path}.n"),
                    "expected the base64url modulus of an RSA key of at least 2048 bits",
                );
                return None;
            };
            let Some(e) = b64url(e).filter(|e| !e.is_empty() && e.len() <= 8) else {
                w.err(format!("{path}.e"), "expected the base64url RSA public exponent");
                return None;
            };
            match VerifyKey::rsa(algorithm, &n, &e) {
                Ok(key) => key,
                Err(err) => {
                    w.err(path, err);
                    return None;
                }
            }
        }
        "EC" => {
            let crv = w.string(m, path, "crv", true);
            let x = w.string(m, path, "x", true);
            let y = w.string(m, path, "y", true);
            let (algorithm, size) = match crv? {
                "P-256" => (Algorithm::ES256, 32),
                "P-384" => (Algorithm::ES384, 48),
                other => {
                    w.err(
                        format!("{path}.crv"),
                        format!("{other:?} is not supported: expected P-256 or P-384"),
                    );
                    return None;
                }
            };
            if let Some(a) = alg
                && a != crate::identity::algorithm_name(algorithm)
            {
                w.err(
                    format!("{path}.alg"),
                    format!(
                        "{a:?} does not fit curve {}: expected {}",
                        crv.unwrap_or(""),
                        crate::identity::algorithm_name(algorithm)
                    ),
                );
                return None;
            }
            let (x, y) = (x?, y?);
            let mut coords = vec![];
            for (name, coord) in [("x", x), ("y", y)] {
                match b64url(coord).filter(|c| c.len() == size) {
                    Some(c) => coords.push(c),
                    None => {
                        w.err(
                            format!("{path}.{name}"),
                            format!("expected a base64url {size}-byte coordinate"),
                        );
                        return None;
                    }
                }
            }
            let (Some(x), Some(y)) = (coords.first(), coords.get(1)) else {
                return None;
            };
            match VerifyKey::ec(algorithm, x, y) {
                Ok(key) => key,
                Err(err) => {
                    w.err(path, err);
                    return None;
                }
            }
        }
        other => {
            w.err(
                format!("{path}.kty"),
                format!("{other:?} is not supported: expected RSA or EC (symmetric keys are never accepted)"),
            );
            return None;
        }
    };
    Some((kid?.to_string(), key))
}

fn compile_connector(
    w: &mut Walk<'_>,
    v: &Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    has_controller: bool,
) -> Option<Connector> {
    let known = [
        "namespace",
        "name",
        "address",
        "cluster",
        "credential",
        "allowedNamespaces",
        "allowedServiceAccounts",
        "hosts",
        "tokenRealms",
        "readOnly",
    ];
    let m = w.object(Some(v), path, &known, true)?;
    let read_only = match m.get("readOnly") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            w.err(format!("{path}.readOnly"), "expected true or false");
            false
        }
    };
    let namespace = w.string(m, path, "namespace", true);
    if let Some(ns) = namespace
        && !is_dns_label(ns)
    {
        w.err(
            format!("{path}.namespace"),
            "expected a Kubernetes namespace name (RFC 1123 label)",
        );
    }
    let name = w.string(m, path, "name", true);
    if let Some(n) = name
        && !is_dns_subdomain(n)
    {
        w.err(
            format!("{path}.name"),
            "expected a Kubernetes object name (RFC 1123 subdomain)",
        );
    }
    let upstream = w
        .string(m, path, "address", true)
        .and_then(|a| match Upstream::parse(a) {
            Ok(u) => Some(u),
            Err(e) => {
                w.err(format!("{path}.address"), e);
                None
            }
        });
    let cluster = w.string(m, path, "cluster", true);
    // '|' is in the names Istio gives clusters (`outbound|443||registry.example.com`), which a
    // controller in an Istio gateway names (`--istio-wasmplugin`); none of these characters can
    // end or split the `x-oci-connector-cluster` header value.
    if let Some(c) = cluster
        && !c
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'|'))
    {
        w.err(
            format!("{path}.cluster"),
            "expected an Envoy cluster name (letters, digits, '_', '-', '.', ':', '|')",
        );
    }
    let authorization = compile_credential(
        w,
        m.get("credential"),
        &format!("{path}.credential"),
        upstream.as_ref(),
        env,
        has_controller,
    );
    let token_realms = compile_token_realms(w, m.get("tokenRealms"), &format!("{path}.tokenRealms"));

    let allowed_namespaces = w.strings(m, path, "allowedNamespaces", false);
    for (i, ns) in allowed_namespaces.iter().enumerate() {
        if !is_dns_label(ns) {
            w.err(
                format!("{path}.allowedNamespaces[{i}]"),
                "expected a Kubernetes namespace name",
            );
        }
    }
    let mut allowed_service_accounts = HashSet::new();
    for (i, sa) in w.strings(m, path, "allowedServiceAccounts", false).iter().enumerate() {
        match sa.split_once('/') {
            Some((ns, name)) if is_dns_label(ns) && is_dns_subdomain(name) => {
                allowed_service_accounts.insert((ns.to_string(), name.to_string()));
            }
            _ => w.err(
                format!("{path}.allowedServiceAccounts[{i}]"),
                "expected <namespace>/<serviceaccount>",
            ),
        }
    }
    let hosts: Vec<String> = w
        .strings(m, path, "hosts", false)
        .into_iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        if !is_dns_subdomain(h) {
            w.err(format!("{path}.hosts[{i}]"), "expected a host name without port");
        }
    }
    Some(Connector {
        namespace: namespace?.to_string(),
        name: name?.to_string(),
        upstream: upstream?,
        cluster: cluster?.to_string(),
        credential: authorization?,
        allowed_namespaces: allowed_namespaces.into_iter().collect(),
        allowed_service_accounts,
        hosts,
        token_realms,
        read_only,
        revision: content_hash(v),
    })
}

/// A stable hash of a JSON value (serde_json's maps are sorted, so equal documents hash equal).
fn content_hash(v: &Value) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    // SipHash with fixed keys: the same entry gets the same revision in every VM of a build.
    let mut h = std::hash::DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

/// `tokenRealms: [{"url": "https://auth.example.com/token", "cluster": "auth_example"}]`.
fn compile_token_realms(w: &mut Walk<'_>, v: Option<&Value>, path: &str) -> Vec<TokenRealm> {
    let items = match v {
        None => return vec![],
        Some(Value::Array(items)) => items,
        Some(_) => {
            w.err(path, "expected a list of {\"url\": ..., \"cluster\": ...}");
            return vec![];
        }
    };
    let mut out = vec![];
    for (i, item) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let Some(m) = w.object(Some(item), &p, &["url", "cluster"], true) else {
            continue;
        };
        let url = w.string(m, &p, "url", true);
        let cluster = w.string(m, &p, "cluster", true);
        let parsed = url.and_then(|u| {
            let parsed = crate::upstream::split_url(u);
            if parsed.is_none() {
                w.err(
                    format!("{p}.url"),
                    "expected the realm URL as the upstream's challenge names it: http(s)://host[:port]/path",
                );
            }
            parsed
        });
        if let (Some((scheme, authority, rpath)), Some(cluster)) = (parsed, cluster) {
            out.push(TokenRealm {
                scheme,
                authority,
                path: rpath,
                cluster: cluster.to_string(),
            });
        }
    }
    out
}

/// The `auths` entry of a docker `config.json` (kubernetes.io/dockerconfigjson) for `upstream`.
fn credential_from_docker_config(json: &str, upstream: &Upstream) -> Result<(String, String), String> {
    use connector_core::docker_config::{Problem, credential_for};
    let want = upstream.authority.as_str();
    let default_port = if upstream.scheme == "http" { 80 } else { 443 };
    match credential_for(json.as_bytes(), want, default_port) {
        Ok(found) => Ok((found.username, found.password)),
        Err(Problem::NotJson(_)) => Err("is not valid JSON: expected a docker config.json".to_string()),
        Err(Problem::NoAuths) => Err("has no \"auths\" object: expected a docker config.json".to_string()),
        Err(Problem::NoEntry(keys)) => Err(format!("has no entry for {want} (entries: {})", keys.join(", "))),
        Err(Problem::AuthNotBase64 { .. }) => Err(format!("entry for {want}: \"auth\" is not base64 of UTF-8 text")),
        Err(Problem::AuthNotPair { .. }) => Err(format!("entry for {want}: \"auth\" is not user:password")),
        Err(Problem::NoCredential { .. }) => Err(format!(
            "entry for {want} has neither \"auth\" nor username and password"
        )),
    }
}

/// Builds the upstream `Authorization` value from environment variables. The values are read
/// here once; the document only names the variables.
fn compile_credential(
    w: &mut Walk<'_>,
    v: Option<&Value>,
    path: &str,
    upstream: Option<&Upstream>,
    env: &dyn Fn(&str) -> Option<String>,
    has_controller: bool,
) -> Option<UpstreamCredential> {
    let Some(Value::Object(m)) = v else {
        w.err(
            path,
            "is required: expected {\"username\": ..., \"passwordEnv\": ...}, {\"dockerConfigJsonEnv\": ...} or {\"fromController\": \"<revision>\"}",
        );
        return None;
    };
    if m.contains_key("fromController") {
        w.object(v, path, &["fromController"], true)?;
        let revision = w.string(m, path, "fromController", true)?;
        if !revision
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            w.err(
                format!("{path}.fromController"),
                "expected a revision label (letters, digits, '-', '.', '_')",
            );
            return None;
        }
        if !has_controller {
            w.err(
                format!("{path}.fromController"),
                "needs the controller channel: set controller.cluster",
            );
            return None;
        }
        return Some(UpstreamCredential::Controller {
            revision: revision.to_string(),
        });
    }
    compile_static_credential(w, m, v, path, upstream, env).map(UpstreamCredential::Static)
}

/// `{"cluster": "connector_controller", "authority": "connector-controller", "keyEnv": "VAR"}`.
fn compile_controller(
    w: &mut Walk<'_>,
    v: Option<&Value>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<ControllerChannel> {
    let m = w.object(v, "controller", &["cluster", "authority", "keyEnv"], false)?;
    let cluster = w.string(m, "controller", "cluster", true);
    let authority = w
        .string(m, "controller", "authority", false)
        .unwrap_or("connector-controller")
        .to_string();
    let key = match w.string(m, "controller", "keyEnv", false) {
        None => None,
        Some(var) => match env(var) {
            Some(k) if !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic()) => Some(k),
            _ => {
                w.err("controller.keyEnv", format!("environment variable {var:?} is not set in the Wasm VM (or is not a printable token): list it in vm_config.environment_variables.host_env_keys and set it in Envoy's environment"));
                return None;
            }
        },
    };
    Some(ControllerChannel {
        cluster: cluster?.to_string(),
        authority,
        key,
    })
}

/// Reads a credential held in the VM's environment into a ready-made `Authorization` value.
fn compile_static_credential(
    w: &mut Walk<'_>,
    m: &Map<String, Value>,
    v: Option<&Value>,
    path: &str,
    upstream: Option<&Upstream>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<String> {
    if m.contains_key("dockerConfigJsonEnv") {
        // A kubernetes.io/dockerconfigjson Secret's .dockerconfigjson, handed over as one variable.
        w.object(v, path, &["dockerConfigJsonEnv"], true)?;
        let var = w.string(m, path, "dockerConfigJsonEnv", true)?;
        let Some(json) = env(var).filter(|j| !j.is_empty()) else {
            w.err(format!("{path}.dockerConfigJsonEnv"), format!("environment variable {var:?} is not set in the Wasm VM: list it in vm_config.environment_variables.host_env_keys and set it in Envoy's environment"));
            return None;
        };
        let upstream = upstream?;
        return match credential_from_docker_config(&json, upstream) {
            Ok((u, p)) => Some(connector_core::basic::authorization(&u, &p)),
            Err(e) => {
                w.err(
                    format!("{path}.dockerConfigJsonEnv"),
                    format!("the docker config in {var:?} {e}"),
                );
                None
            }
        };
    }
    if m.contains_key("password") {
        w.err(format!("{path}.password"), "inline passwords are refused (the plugin configuration shows in Envoy's config dump): put the password in an environment variable and name it in passwordEnv");
    }
    let known = ["username", "usernameEnv", "passwordEnv", "password"];
    w.object(v, path, &known, true)?;
    let from_env = |w: &mut Walk<'_>, key: &str| -> Option<String> {
        let var = w.string(m, path, key, false)?;
        match env(var) {
            Some(value) if !value.is_empty() => Some(value),
            _ => {
                w.err(format!("{path}.{key}"), format!("environment variable {var:?} is not set in the Wasm VM: list it in vm_config.environment_variables.host_env_keys and set it in Envoy's environment"));
                None
            }
        }
    };
    let username = match (m.get("username"), m.contains_key("usernameEnv")) {
        (Some(Value::String(u)), false) if !u.is_empty() => Some(u.clone()),
        (None, true) => from_env(w, "usernameEnv"),
        _ => {
            w.err(
                path,
                "expected exactly one of username or usernameEnv (a non-empty string)",
            );
            None
        }
    };
    if !m.contains_key("passwordEnv") {
        w.err(
            format!("{path}.passwordEnv"),
            "is required: the name of the environment variable that holds the password",
        );
    }
    let password = from_env(w, "passwordEnv");
    let username = username?;
    if username.contains(':') {
        w.err(
            path,
            "the username must not contain ':' (Basic credentials cannot carry it)",
        );
        return None;
    }
    Some(connector_core::basic::authorization(&username, &password?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkeys;
    use base64::engine::general_purpose::STANDARD;

    fn env(name: &str) -> Option<String> {
        match name {
            "REG_PASSWORD" => Some("s3cret-pass".into()),
            "REG_USER" => Some("robot$ci".into()),
            _ => None,
        }
    }

    pub fn doc() -> Value {
        serde_json::json!({
            "identity": {
                "issuers": [testkeys::ISSUER],
                "audiences": [testkeys::AUDIENCE],
                "jwks": testkeys::jwks()
            },
            "connectors": [{
                "namespace": "demo", "name": "registry",
                "address": "http://127.0.0.1:5000/",
                "cluster": "upstream_demo",
                "credential": {"username": "robot", "passwordEnv": "REG_PASSWORD"},
                "allowedNamespaces": ["ci"],
                "allowedServiceAccounts": ["build/kaniko"],
                "hosts": ["Registry.Internal"]
            }]
        })
    }

    fn compile_value(v: &Value) -> Result<Config, Vec<ConfigError>> {
        compile(v.to_string().as_bytes(), &env)
    }

    #[test]
    fn cluster_names_as_envoy_and_istio_write_them() {
        for (name, ok) in [
            ("upstream_https_harbor_example_com_443_0123abcd", true),
            ("outbound|443||registry.example.com", true),
            ("a b", false),
            ("a\r\nx-injected: 1", false),
            ("a,b", false),
        ] {
            let mut d = doc();
            d["connectors"][0]["cluster"] = serde_json::json!(name);
            let paths: Vec<String> = compile_value(&d)
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(|e| e.path)
                .collect();
            assert_eq!(
                !paths.contains(&"connectors[0].cluster".to_string()),
                ok,
                "{name:?}: {paths:?}"
            );
        }
    }

    /// The state of a proxy whose controller has not written its configuration yet (the Istio
    /// WasmPlugin as shipped): no keys and no connectors is valid only under a controller.
    #[test]
    fn an_empty_key_set_is_valid_only_for_a_controller_managed_configuration_without_connectors() {
        let waiting = serde_json::json!({
            "controller": {"cluster": "outbound|18001||connector-controller.local"},
            "authorization": "controller",
            "identity": {"issuers": ["https://k8s"], "audiences": ["oci-connector"], "jwks": {"keys": []}},
            "connectors": []
        });
        let c = compile_value(&waiting).unwrap();
        assert!(c.policy.keys.is_empty() && c.connectors.is_empty());

        let mut with_connector = doc();
        with_connector["controller"] = serde_json::json!({"cluster": "channel"});
        with_connector["identity"]["jwks"] = serde_json::json!({"keys": []});
        let mut without_controller = waiting.clone();
        without_controller.as_object_mut().unwrap().remove("controller");
        without_controller["authorization"] = serde_json::json!("rules");
        let mut bad_connector_only = waiting.clone();
        bad_connector_only["connectors"] = serde_json::json!([{"name": "x"}]);
        for (what, d) in [
            ("a connector nobody could use", with_connector),
            ("no controller", without_controller),
            ("a connector the validator refuses", bad_connector_only),
        ] {
            let Err(errors) = compile_value(&d) else {
                panic!("{what}: accepted")
            };
            assert!(
                errors.iter().any(|e| e.path == "identity.jwks.keys"),
                "{what}: {errors:?}"
            );
        }
    }

    #[test]
    fn a_valid_document_compiles_with_defaults() {
        let c = compile_value(&doc()).unwrap();
        assert_eq!(c.realm, DEFAULT_REALM);
        assert_eq!(c.policy.clock_skew, 60);
        assert_eq!(c.token_cache_size, 10_000);
        let k = c.connector("demo", "registry").unwrap();
        assert_eq!(
            k.upstream,
            Upstream {
                scheme: "http".into(),
                authority: "127.0.0.1:5000".into()
            }
        );
        let basic = format!("Basic {}", STANDARD.encode("robot:s3cret-pass"));
        assert_eq!(k.credential, UpstreamCredential::Static(basic.clone()));
        assert!(format!("{k:?}").contains("<redacted>"));
        assert!(!format!("{k:?}").contains(&basic));
        assert!(
            c.connector_by_host("c-registry-connector.demo.svc.cluster.local")
                .is_some()
        );
        assert!(c.connector_by_host("registry.internal").is_some());
        assert!(
            c.connector_by_host("c-other-connector.demo.svc.cluster.local")
                .is_none()
        );
        assert!(c.looks_like_connector_host("c-other-connector.demo.svc.cluster.local"));
        assert!(c.looks_like_connector_host("c-a.b-c-connector.x-y.svc.cluster.local"));
        assert!(!c.looks_like_connector_host("127.0.0.1"));
        assert!(!c.looks_like_connector_host("c--connector.demo.svc.cluster.local"));
    }

    #[test]
    fn username_from_env() {
        let mut d = doc();
        d["connectors"][0]["credential"] =
            serde_json::json!({"usernameEnv": "REG_USER", "passwordEnv": "REG_PASSWORD"});
        let c = compile_value(&d).unwrap();
        assert_eq!(
            c.connectors[0].credential,
            UpstreamCredential::Static(format!("Basic {}", STANDARD.encode("robot$ci:s3cret-pass")))
        );
    }

    #[test]
    fn every_error_is_listed_with_its_path() {
        let mut d = doc();
        d["identity"]["audiences"] = serde_json::json!([]);
        d["identity"]["clockSkewSeconds"] = serde_json::json!(300);
        d["identity"]["jwks"]["keys"][0]["kty"] = serde_json::json!("oct");
        d["identity"]["extra"] = serde_json::json!(1);
        d["proxy"] = serde_json::json!({"hostPattern": "{name}.example"});
        d["connectors"][0]["address"] = serde_json::json!("ftp://x");
        d["connectors"][0]["credential"] =
            serde_json::json!({"username": "u", "password": "hunter2-secret", "passwordEnv": "MISSING"});
        d["connectors"][0]["allowedServiceAccounts"] = serde_json::json!(["nobody"]);
        d["connectors"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"namespace": "Bad_NS"}));
        let errors = compile_value(&d).err().unwrap();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "identity.audiences",
            "identity.clockSkewSeconds",
            "identity.jwks.keys[0].kty",
            "identity.extra",
            "proxy.hostPattern",
            "connectors[0].address",
            "connectors[0].credential.password",
            "connectors[0].credential.passwordEnv",
            "connectors[0].allowedServiceAccounts[0]",
            "connectors[1].namespace",
            "connectors[1].name",
            "connectors[1].address",
            "connectors[1].cluster",
            "connectors[1].credential",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
        // No error message ever carries a secret value.
        for e in &errors {
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn docker_config_json_credentials() {
        let config = |json: &str, address: &str| {
            let mut d = doc();
            d["connectors"][0]["address"] = serde_json::json!(address);
            d["connectors"][0]["credential"] = serde_json::json!({"dockerConfigJsonEnv": "DOCKER_CONFIG_JSON"});
            let json = json.to_string();
            compile(d.to_string().as_bytes(), &move |k| {
                (k == "DOCKER_CONFIG_JSON").then(|| json.clone())
            })
        };
        let b64 = STANDARD.encode("robot$x:s3cret");
        let want = format!("Basic {b64}");
        for (json, address) in [
            (
                format!(r#"{{"auths":{{"harbor.example.com":{{"auth":"{b64}"}}}}}}"#),
                "https://harbor.example.com",
            ),
            (
                format!(r#"{{"auths":{{"https://harbor.example.com":{{"auth":"{b64}"}}}}}}"#),
                "https://harbor.example.com:443",
            ),
            (
                r#"{"auths":{"127.0.0.1:5000":{"username":"robot$x","password":"s3cret"}}}"#.to_string(),
                "http://127.0.0.1:5000",
            ),
            (
                format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{b64}"}}}}}}"#),
                "https://registry-1.docker.io",
            ),
        ] {
            let c = config(&json, address).map_err(|e| format!("{e:?}")).unwrap();
            assert_eq!(
                c.connectors[0].credential,
                UpstreamCredential::Static(want.clone()),
                "{json}"
            );
        }
        for (json, needle) in [
            (
                r#"{"auths":{"other.example.com":{"auth":"eDp5"}}}"#,
                "has no entry for harbor.example.com (entries: other.example.com)",
            ),
            ("not json", "is not valid JSON"),
            (r#"{"auths":{"harbor.example.com":{"auth":"!!"}}}"#, "is not base64"),
            (r#"{"auths":{"harbor.example.com":{}}}"#, "neither"),
        ] {
            let errors = config(json, "https://harbor.example.com").err().unwrap();
            assert!(
                errors
                    .iter()
                    .any(|e| e.path == "connectors[0].credential.dockerConfigJsonEnv" && e.message.contains(needle)),
                "{json}: {errors:?}"
            );
        }
    }

    #[test]
    fn token_realms_are_validated() {
        let mut d = doc();
        d["connectors"][0]["tokenRealms"] = serde_json::json!([{"url": "https://auth.example.com/token", "cluster": "auth"}, {"url": "ftp://x"}, "nope"]);
        let errors = compile_value(&d).err().unwrap();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "connectors[0].tokenRealms[1].url",
            "connectors[0].tokenRealms[1].cluster",
            "connectors[0].tokenRealms[2]",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
        d["connectors"][0]["tokenRealms"] =
            serde_json::json!([{"url": "https://Auth.Example.com:443/token", "cluster": "auth"}]);
        let c = compile_value(&d).unwrap();
        let r = &c.connectors[0].token_realms[0];
        assert_eq!(
            (r.scheme.as_str(), r.authority.as_str(), r.path.as_str()),
            ("https", "auth.example.com", "/token")
        );
    }

    #[test]
    fn duplicates_are_refused() {
        let mut d = doc();
        let copy = d["connectors"][0].clone();
        d["connectors"].as_array_mut().unwrap().push(copy);
        let errors = compile_value(&d).err().unwrap();
        assert!(
            errors
                .iter()
                .any(|e| e.path == "connectors[1]" && e.message.contains("twice")),
            "{errors:?}"
        );
        assert!(errors.iter().any(|e| e.path == "connectors[1].hosts"), "{errors:?}");
    }

    #[test]
    fn malformed_json_and_wrong_types() {
        let e = compile(b"{", &env).err().unwrap();
        assert_eq!(e[0].path, "$");
        let e = compile(b"[]", &env).err().unwrap();
        assert!(e.iter().any(|e| e.path == "$" && e.message.contains("object")));
        assert!(e.iter().any(|e| e.path == "identity"));
        assert!(e.iter().any(|e| e.path == "connectors"));
    }

    #[test]
    fn weak_or_mismatched_keys_are_refused() {
        let mut d = doc();
        d["identity"]["jwks"]["keys"][0]["n"] = serde_json::json!("AQAB");
        d["identity"]["jwks"]["keys"][1]["alg"] = serde_json::json!("ES384");
        let errors = compile_value(&d).err().unwrap();
        assert!(errors.iter().any(|e| e.path == "identity.jwks.keys[0].n"), "{errors:?}");
        assert!(
            errors.iter().any(|e| e.path == "identity.jwks.keys[1].alg"),
            "{errors:?}"
        );
    }

    #[test]
    fn check_jwk_accepts_what_compile_accepts_and_explains_the_rest() {
        let good = doc()["identity"]["jwks"]["keys"][0].clone();
        assert!(check_jwk(&good, "k").is_ok());
        for (key, path) in [
            (
                serde_json::json!({"kty": "EC", "crv": "P-521", "kid": "a", "x": "AA", "y": "AA"}),
                "k.crv",
            ),
            (
                serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": "b", "x": "AA"}),
                "k.kty",
            ),
            (
                serde_json::json!({"kty": "RSA", "kid": "c", "n": URL_SAFE_NO_PAD.encode([0xc5u8; 128]), "e": "AQAB"}),
                "k.n",
            ),
        ] {
            let errors = check_jwk(&key, "k").unwrap_err();
            assert!(errors.iter().any(|e| e.path == path), "{key}: {errors:?}");
        }
    }

    #[test]
    fn upstream_addresses() {
        assert_eq!(
            Upstream::parse("https://Harbor.Example:443").unwrap().authority,
            "harbor.example"
        );
        assert_eq!(Upstream::parse("http://h:8080/").unwrap().authority, "h:8080");
        assert!(Upstream::parse("http://h/v2").is_err());
        assert!(Upstream::parse("http://u:p@h").is_err());
        assert!(Upstream::parse("h:5000").is_err());
        assert!(Upstream::parse("http://h:0").is_err());
        let u = Upstream::parse("http://h:8080").unwrap();
        assert!(u.is_origin("HTTP", "H:8080"));
        assert!(!u.is_origin("http", "h:8081"));
        assert!(Upstream::parse("https://h").unwrap().is_origin("https", "h:443"));
    }

    #[test]
    fn credential_from_the_controller_channel() {
        let env = |k: &str| (k == "CHANNEL_KEY").then(|| "k3y".to_string());
        let mut d = doc();
        d["controller"] = serde_json::json!({"cluster": "connector_controller", "keyEnv": "CHANNEL_KEY"});
        d["authorization"] = serde_json::json!("controller");
        d["connectors"][0]["credential"] = serde_json::json!({"fromController": "r7"});
        let c = compile(d.to_string().as_bytes(), &env).unwrap();
        assert_eq!(
            c.connectors[0].credential,
            UpstreamCredential::Controller { revision: "r7".into() }
        );
        assert_eq!(c.access, AccessMode::Controller);
        let ch = c.controller.as_ref().unwrap();
        assert_eq!(
            (ch.cluster.as_str(), ch.authority.as_str(), ch.key.as_deref()),
            ("connector_controller", "connector-controller", Some("k3y"))
        );
        assert!(!format!("{ch:?}").contains("k3y"), "the channel key is redacted");

        // Every problem at once: no channel for fromController or RBAC, bad revision, key unset.
        let mut d = doc();
        d["authorization"] = serde_json::json!("controller");
        d["connectors"][0]["credential"] = serde_json::json!({"fromController": "r7"});
        let mut second = d["connectors"][0].clone();
        second["name"] = serde_json::json!("second");
        second["hosts"] = serde_json::json!([]);
        second["credential"] = serde_json::json!({"fromController": "r 7"});
        d["connectors"].as_array_mut().unwrap().push(second);
        let errs = compile(d.to_string().as_bytes(), &env).err().unwrap();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "authorization",
                "connectors[0].credential.fromController",
                "connectors[1].credential.fromController"
            ],
            "{errs:?}"
        );
        let mut d = doc();
        d["controller"] = serde_json::json!({"cluster": "c", "keyEnv": "UNSET"});
        d["authorization"] = serde_json::json!("rbac");
        let errs = compile(d.to_string().as_bytes(), &env).err().unwrap();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "controller.keyEnv",
                "authorization",
                "connectors[0].credential.passwordEnv"
            ],
            "{errs:?}"
        );
    }
}
