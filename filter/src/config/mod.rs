//! The filter's configuration: one JSON document, validated as a whole and compiled into
//! indexed structures before any request is served.
//!
//! Validation walks the document itself (rather than stopping at serde's first error) so that
//! *every* problem is reported at once, each with its field path. Secrets never appear in the
//! document: a credential names the environment variables (handed to the VM by Envoy through
//! `vm_config.environment_variables.host_env_keys`) that hold it, so the plugin configuration
//! and Envoy's config dump stay free of passwords.
//!
//! Here: the compiled types and the top-level [`compile`]. The parts: `walk` (the validating
//! walk), `keys` (the `identity` section and its JWKS), `connector` (one `connectors[i]`
//! entry), `credential` (controller, environment and docker-config credentials), `address`
//! (upstream addresses).

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde_json::{Map, Value};

use crate::identity::{Algorithm, Identity, MAX_CLOCK_SKEW, TokenPolicy, VerifyKey};
use crate::route::{is_dns_label, is_dns_subdomain};

mod address;
mod connector;
mod credential;
mod keys;
mod walk;

pub use address::normalise_authority;
use connector::{check_host_pattern, compile_connector};
use credential::{compile_controller, compile_credential};
pub use keys::check_jwk;
use keys::compile_identity;
use walk::Walk;

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

/// Validates one connector entry exactly as [`compile`] does at `connectors[index]` (the same
/// checks, the same error paths), without the rest of the configuration: the controller
/// validates each changed connector alone and checks what spans connectors (host names)
/// itself, so a change does not re-validate every connector (issue 17).
pub fn compile_connector_entry(
    v: &Value,
    index: usize,
    env: &dyn Fn(&str) -> Option<String>,
    has_controller: bool,
) -> Result<Connector, Vec<ConfigError>> {
    let mut errors = vec![];
    let mut w = Walk { errors: &mut errors };
    let c = compile_connector(&mut w, v, &format!("connectors[{index}]"), env, has_controller);
    match c {
        Some(c) if errors.is_empty() => Ok(c),
        _ => Err(errors),
    }
}

#[cfg(test)]
mod tests;
