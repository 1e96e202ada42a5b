//! The filter's configuration, compiled: the document is parsed and checked by
//! `connector_core::config` (the typed schema the controller also builds, every problem listed
//! with its path); here it is turned into the filter's indexed runtime tables. What only the
//! filter can check is added to the same list: the credentials held in the VM's environment
//! (Envoy's `vm_config.environment_variables.host_env_keys`, so the plugin configuration and
//! Envoy's config dump stay free of passwords) and whether each JWK makes a verification key.
//!
//! Here: the compiled types and [`compile`]. The parts: `keys` (the `identity` section's keys),
//! `credential` (controller, environment and docker-config credentials).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::rc::Rc;

use connector_core::config::{ConnectorEntry, FilterConfig};

use crate::identity::{Identity, TokenPolicy};

mod credential;
mod keys;

pub use connector_core::address::{Upstream, normalise_authority};
pub use connector_core::config::{
    AccessMode, ConfigError, DEFAULT_MAX_TOKEN_LIFETIME, DEFAULT_REALM, DEFAULT_TOKEN_CACHE_SIZE,
};
pub use connector_core::host::{DEFAULT_HOST_PATTERN, render_host};
pub use connector_core::keys::check_jwk;
use credential::{compile_channel, compile_credential};
use keys::compile_policy;

/// The validated, compiled configuration.
pub struct Config {
    pub realm: String,
    pub host_pattern: String,
    pub policy: TokenPolicy,
    pub token_cache_size: usize,
    /// Shared with the next configuration when its entry's text is unchanged ([`compile_after`]).
    pub connectors: Vec<Rc<Connector>>,
    /// How many of `connectors` were shared with the previous configuration (for the log).
    pub kept: usize,
    pub controller: Option<ControllerChannel>,
    pub access: AccessMode,
    by_name: HashMap<(String, String), usize>,
    by_host: HashMap<String, usize>,
    /// What the next configuration may reuse: the text of everything but the connectors, and
    /// each connector's entry, typed and as JSON text (index into `connectors`).
    settings: String,
    entries: Vec<ConnectorEntry>,
    by_text: HashMap<String, usize>,
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
        self.connectors.get(*i).map(Rc::as_ref)
    }

    /// The connector named `<namespace>/<name>`.
    pub fn connector_by_label(&self, label: &str) -> Option<&Connector> {
        let (namespace, name) = label.split_once('/')?;
        self.connector(namespace, name)
    }

    /// The connector whose host-form name is `host` (no port, any case).
    pub fn connector_by_host(&self, host: &str) -> Option<&Connector> {
        let i = self.by_host.get(&host.to_ascii_lowercase())?;
        self.connectors.get(*i).map(Rc::as_ref)
    }

    /// Whether `host` has the shape of a host-form name, known or not: such a host is answered
    /// like a forbidden connector rather than as "not a connector address".
    pub fn looks_like_connector_host(&self, host: &str) -> bool {
        connector_core::host::matches_pattern(&self.host_pattern, &host.to_ascii_lowercase())
    }
}

/// Validates and compiles the configuration. `env` reads the VM's environment.
pub fn compile(json: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, Vec<ConfigError>> {
    compile_after(json, env, None)
}

/// [`compile`], sharing with `previous` (the configuration this VM runs) every connector whose
/// entry has the same JSON text under the same settings: a push that changes one connector of
/// thousands checks and compiles that one (issue 17). The outcome is [`compile`]'s: reuse is
/// taken only when the document is accepted as a whole, and `env` is fixed for a VM's life.
pub fn compile_after(
    json: &[u8],
    env: &dyn Fn(&str) -> Option<String>,
    previous: Option<&Config>,
) -> Result<Config, Vec<ConfigError>> {
    let split = connector_core::config::split(json);
    // The earlier connector each entry repeats, by index (none when the settings differ).
    let earlier: Vec<Option<usize>> = match (&split, previous) {
        (Some(s), Some(p)) if p.settings == s.settings => {
            s.entries.iter().map(|text| p.by_text.get(*text).copied()).collect()
        }
        _ => vec![],
    };
    let (parsed, reusing) = match (&split, previous) {
        (Some(s), Some(p)) if earlier.iter().any(Option::is_some) => {
            let known = |i: usize, _: &str| -> Option<ConnectorEntry> {
                let j = (*earlier.get(i)?)?;
                p.entries.get(j).cloned()
            };
            let r = connector_core::config::parse_reusing(json, s, &known);
            (r.parsed, !r.full)
        }
        _ => (connector_core::config::parse(json), false),
    };
    let mut errors = parsed.errors;
    let config = parsed.config;
    // The filter's own findings, except under a path already reported (a value found wrong
    // there was read as empty, and is not reported twice).
    let mut found = vec![];
    let policy = compile_policy(&config.identity, previous.map(|p| &p.policy), &mut found);
    let controller = config
        .controller
        .as_ref()
        .and_then(|c| compile_channel(c, env, &mut found));
    let host_pattern = config.proxy.host_pattern().to_string();
    let mut connectors = Vec::with_capacity(config.connectors.len());
    let mut kept = 0;
    for (i, entry) in config.connectors.iter().enumerate() {
        let shared = earlier
            .get(i)
            .copied()
            .flatten()
            .filter(|_| reusing)
            .and_then(|j| previous?.connectors.get(j).cloned());
        if let Some(c) = shared {
            kept += 1;
            connectors.push(c);
        } else if let Some(c) = compile_connector(entry, &format!("connectors[{i}]"), env, &mut found) {
            connectors.push(Rc::new(c));
        }
    }
    connector_core::config::merge(&mut errors, found);
    if !errors.is_empty() {
        return Err(errors);
    }
    // Names and host names are unique: `parse` checked them, with the same `entry_hosts`.
    // Without errors every entry compiled, so an entry's index is its connector's.
    let mut by_name = HashMap::with_capacity(connectors.len());
    let mut by_host = HashMap::with_capacity(connectors.len());
    for (index, entry) in config.connectors.iter().enumerate() {
        by_name.insert((entry.namespace.clone(), entry.name.clone()), index);
        for h in connector_core::config::entry_hosts(entry, &host_pattern) {
            by_host.insert(h, index);
        }
    }
    let (settings, by_text) = match split {
        Some(s) if s.entries.len() == connectors.len() => {
            let by_text = s.entries.iter().enumerate().map(|(i, t)| (t.to_string(), i)).collect();
            (s.settings, by_text)
        }
        _ => (String::new(), HashMap::new()),
    };
    let FilterConfig {
        proxy,
        identity,
        authorization,
        connectors: entries,
        ..
    } = config;
    Ok(Config {
        realm: proxy.realm().to_string(),
        host_pattern,
        policy,
        token_cache_size: usize::try_from(identity.token_cache_size()).unwrap_or(usize::MAX),
        connectors,
        kept,
        controller,
        access: authorization,
        by_name,
        by_host,
        settings,
        entries,
        by_text,
    })
}

/// One checked entry at `path`, compiled: the credential resolved, the address, realms and
/// lists turned into what the request path looks up.
fn compile_connector(
    entry: &ConnectorEntry,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    found: &mut Vec<ConfigError>,
) -> Option<Connector> {
    let upstream = Upstream::parse(&entry.address).ok();
    let credential = compile_credential(
        &entry.credential,
        &format!("{path}.credential"),
        upstream.as_ref(),
        env,
        found,
    )?;
    let token_realms = entry
        .token_realms
        .iter()
        .filter_map(|r| {
            let (scheme, authority, path) = connector_core::address::split_url(&r.url)?;
            Some(TokenRealm {
                scheme,
                authority,
                path,
                cluster: r.cluster.clone(),
            })
        })
        .collect();
    let allowed_service_accounts = entry
        .allowed_service_accounts
        .iter()
        .filter_map(|sa| connector_core::config::parse_service_account(sa))
        .map(|(ns, name)| (ns.to_string(), name.to_string()))
        .collect();
    Some(Connector {
        namespace: entry.namespace.clone(),
        name: entry.name.clone(),
        upstream: upstream?,
        cluster: entry.cluster.clone(),
        credential,
        allowed_namespaces: entry.allowed_namespaces.iter().cloned().collect(),
        allowed_service_accounts,
        hosts: entry.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        token_realms,
        read_only: entry.read_only,
        revision: revision(entry),
    })
}

/// A stable hash of a whole entry: what the connector's caches are keyed by.
fn revision(entry: &ConnectorEntry) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    // SipHash with fixed keys: the same entry gets the same revision in every VM of a build.
    let mut h = std::hash::DefaultHasher::new();
    entry.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests;
