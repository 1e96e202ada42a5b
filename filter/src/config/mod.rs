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

use connector_core::config::{ConnectorEntry, FilterConfig, Split};

use crate::identity::{Identity, TokenPolicy};

mod credential;
mod index;
mod keys;
pub mod memo;

pub use connector_core::address::{Upstream, normalise_authority};
pub use connector_core::config::{
    AccessMode, ConfigError, DEFAULT_MAX_TOKEN_LIFETIME, DEFAULT_REALM, DEFAULT_TOKEN_CACHE_SIZE,
};
pub use connector_core::host::{DEFAULT_HOST_PATTERN, render_host};
pub use connector_core::keys::check_jwk;
use credential::{compile_channel, compile_credential};
use index::{Index, Slot};
use keys::compile_policy;

/// The validated, compiled configuration.
pub struct Config {
    pub realm: String,
    pub host_pattern: String,
    pub policy: TokenPolicy,
    pub token_cache_size: usize,
    /// How many connectors were shared with the previous configuration (for the log).
    pub kept: usize,
    pub controller: Option<ControllerChannel>,
    pub access: AccessMode,
    /// The parts the document lists in place of its connectors (see [`crate::parts`]): this
    /// configuration then has no connectors of its own, and is not run but assembled.
    pub parts: Vec<String>,
    index: Index,
    /// What the next configuration may reuse: the document's text but its connectors (`None`
    /// when the document could not be cut at its entries), and the entries in document order,
    /// each with its compiled connector (shared with the next configuration when its entry's
    /// text is unchanged: [`compile_after`]).
    settings: Option<String>,
    slots: Vec<Rc<Slot>>,
    /// When the connectors came as parts and were compiled by [`compile_parts`]: each part's
    /// id and how many of `slots` (in order) it holds; empty otherwise.
    layout: Vec<(String, usize)>,
}

/// A registry reachable through the proxy.
#[derive(PartialEq, Eq)]
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
    /// `<namespace>/<name>`, built once: the key of the connector's caches, stats and
    /// messages, asked for on every request.
    label: String,
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
    pub fn label(&self) -> &str {
        &self.label
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
    /// Every connector, in document order.
    pub fn connectors(&self) -> impl ExactSizeIterator<Item = &Rc<Connector>> {
        self.slots.iter().map(|s| &s.connector)
    }

    pub fn connector(&self, namespace: &str, name: &str) -> Option<&Rc<Connector>> {
        self.connector_by_label(&index::name_key(namespace, name))
    }

    /// The connector named `<namespace>/<name>` (its [`Connector::label`], which is the
    /// index's key).
    pub fn connector_by_label(&self, label: &str) -> Option<&Rc<Connector>> {
        let slot = self.index.by_name.get(label)?;
        Some(&slot.connector)
    }

    /// The connector whose host-form name is `host` (no port, any case).
    pub fn connector_by_host(&self, host: &str) -> Option<&Rc<Connector>> {
        let slot = self.index.by_host.get(host.to_ascii_lowercase().as_str())?;
        Some(&slot.connector)
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
/// thousands reads, checks and compiles that one and copies the few index shards it touches
/// (issue 17). The outcome is [`compile`]'s: on any problem, or with other settings, the whole
/// document is compiled from nothing and every problem listed. `env` is fixed for a VM's life.
pub fn compile_after(
    json: &[u8],
    env: &dyn Fn(&str) -> Option<String>,
    previous: Option<&Config>,
) -> Result<Config, Vec<ConfigError>> {
    let split = connector_core::config::split(json);
    if let (Some(s), Some(p)) = (&split, previous)
        && let Some(config) = compile_change(s, p, env)
    {
        return Ok(config);
    }
    compile_whole(json, split, env, previous.map(|p| &p.policy))
}

/// `split` as a change of `running`: the entries it repeats (same text: the common head and
/// tail compared in place, the rest looked up by text) are kept; the others are read, checked
/// and compiled alone, and the names and host names they claim checked against everything
/// kept. `None` where that cannot stand for [`compile_whole`]: other settings, no entries on
/// either side (the settings' own rules depend on that), or any problem at all.
fn compile_change(split: &Split<'_>, running: &Config, env: &dyn Fn(&str) -> Option<String>) -> Option<Config> {
    let (new, old) = (&split.entries, &running.slots);
    if running.settings.as_deref() != Some(split.settings.as_str()) || new.is_empty() || old.is_empty() {
        return None;
    }
    let (head, tail) = common_ends(new, old, |o| &o.text);
    let middle = new.get(head..new.len().saturating_sub(tail))?;
    change(running, head, middle, tail, env, vec![])
}

/// A configuration whose connectors come as parts (ids with their texts, in order, under
/// `doc_head`, a [`connector_core::config::parts_head`]), compiled as a change of `running`
/// under the same settings: the parts it holds at the start and at the end of the list keep
/// their connectors whole, without reading their text; the entries of the parts between are
/// read and kept or compiled as in [`compile_change`]. A push that changes one connector of
/// 20,000 reads one part of about a hundred entries, not the 4 MB the parts make together
/// (the controller keeps its parts in place). When `running` did not come from parts, every
/// part is read once, and its connectors kept by text. `None` where the whole document must
/// be compiled, as for [`compile_change`].
pub fn compile_parts(
    doc_head: &str,
    parts: &[(&str, &str)],
    running: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<Config> {
    let old = &running.layout;
    let members = connector_core::config::head_members(doc_head)?;
    let running_members = running
        .settings
        .as_deref()
        .and_then(|s| s.strip_prefix('{')?.strip_suffix('}'));
    if running_members != Some(members) || running.slots.is_empty() {
        return None;
    }
    let ids: Vec<&str> = parts.iter().map(|(id, _)| *id).collect();
    let (head, tail) = common_ends(&ids, old, |(id, _)| id);
    let (old_head, old_tail) = (old.get(..head)?, old.get(old.len().saturating_sub(tail)..)?);
    let mut layout = old_head.to_vec();
    let mut middle = vec![];
    for (id, text) in parts.get(head..parts.len().saturating_sub(tail))? {
        let entries = connector_core::config::part_entries(text)?;
        layout.push((id.to_string(), entries.len()));
        middle.extend(entries);
    }
    layout.extend_from_slice(old_tail);
    let count = |held: &[(String, usize)]| held.iter().map(|(_, n)| n).sum::<usize>();
    change(running, count(old_head), &middle, count(old_tail), env, layout).filter(|c| !c.slots.is_empty())
}

/// `running`'s settings with its first `head` and last `tail` connectors kept as they are and
/// the entry texts `middle` between them (and `layout`): a text one of the running connectors
/// between has is kept once (a text written twice is read again, and then claims a name
/// already taken); any other is read, checked and compiled alone, and must claim no name or
/// host name already taken. The running connectors between that are not kept leave the
/// index. `None` on any problem.
fn change(
    running: &Config,
    head: usize,
    middle: &[&str],
    tail: usize,
    env: &dyn Fn(&str) -> Option<String>,
    layout: Vec<(String, usize)>,
) -> Option<Config> {
    let old = &running.slots;
    let old_middle = old.get(head..old.len().checked_sub(tail)?)?;
    // (Only the middle is hashed: a push that adds, changes or deletes one entry hashes next
    // to nothing.)
    let mut claimable: HashMap<&str, &Rc<Slot>> = old_middle.iter().map(|s| (&*s.text, s)).collect();
    let middle: Vec<Result<Rc<Slot>, &str>> = middle
        .iter()
        .map(|text| claimable.remove(*text).map(Rc::clone).ok_or(*text))
        .collect();
    let mut index = running.index.clone();
    for gone in claimable.values() {
        index.remove(gone);
    }
    let has_controller = running.controller.is_some();
    let mut slots = Vec::with_capacity(head + middle.len() + tail);
    slots.extend(old.get(..head)?.iter().cloned());
    let mut read = 0;
    for m in middle {
        let slot = match m {
            Ok(kept) => kept,
            Err(text) => {
                let entry = connector_core::config::parse_entry(text, has_controller)?;
                let mut found = vec![];
                let connector =
                    compile_connector(&entry, "connectors[]", env, &mut found).filter(|_| found.is_empty())?;
                let slot = Rc::new(Slot {
                    text: Rc::from(text),
                    connector: Rc::new(connector),
                    hosts: connector_core::config::entry_hosts(&entry, &running.host_pattern),
                });
                if index.conflicts(&slot) {
                    return None;
                }
                index.insert(&slot);
                read += 1;
                slot
            }
        };
        slots.push(slot);
    }
    slots.extend(old.get(old.len().saturating_sub(tail)..)?.iter().cloned());
    Some(Config {
        realm: running.realm.clone(),
        host_pattern: running.host_pattern.clone(),
        policy: running.policy.clone(),
        token_cache_size: running.token_cache_size,
        kept: slots.len().saturating_sub(read),
        controller: running.controller.clone(),
        access: running.access,
        parts: vec![],
        index,
        settings: running.settings.clone(),
        slots,
        layout,
    })
}

/// How many entries the entry texts `new` and `old` share at their start and, of the rest, at
/// their end (compared in place, no hashing): what a push keeps where it was.
fn common_ends<T>(new: &[&str], old: &[T], text: impl Fn(&T) -> &str) -> (usize, usize) {
    let same = |(n, o): &(&&str, &T)| **n == text(o);
    let head = new.iter().zip(old).take_while(same).count();
    let room = new.len().min(old.len()).saturating_sub(head);
    let tail = new
        .iter()
        .rev()
        .zip(old.iter().rev())
        .take(room)
        .take_while(same)
        .count();
    (head, tail)
}

/// The whole document read, checked and compiled from nothing, except the keys `earlier`
/// already built from the same material (an RSA key's preparation is the costly part).
fn compile_whole(
    json: &[u8],
    split: Option<Split<'_>>,
    env: &dyn Fn(&str) -> Option<String>,
    earlier: Option<&TokenPolicy>,
) -> Result<Config, Vec<ConfigError>> {
    let parsed = connector_core::config::parse(json);
    let mut errors = parsed.errors;
    let config = parsed.config;
    // The filter's own findings, except under a path already reported (a value found wrong
    // there was read as empty, and is not reported twice).
    let mut found = vec![];
    let policy = compile_policy(&config.identity, earlier, &mut found);
    let controller = config
        .controller
        .as_ref()
        .and_then(|c| compile_channel(c, env, &mut found));
    let host_pattern = config.proxy.host_pattern().to_string();
    let mut connectors = Vec::with_capacity(config.connectors.len());
    for (i, entry) in config.connectors.iter().enumerate() {
        if let Some(c) = compile_connector(entry, &format!("connectors[{i}]"), env, &mut found) {
            connectors.push(Rc::new(c));
        }
    }
    connector_core::config::merge(&mut errors, found);
    if !errors.is_empty() {
        return Err(errors);
    }
    // Names and host names are unique: `parse` checked them. Without errors every entry
    // compiled, so entries and connectors pair up. Their texts are kept for the next push when
    // the document could be cut at them.
    let texts = split
        .as_ref()
        .map(|s| &s.entries)
        .filter(|t| t.len() == connectors.len());
    let mut index = Index::with_capacity(connectors.len());
    let mut slots = Vec::with_capacity(connectors.len());
    for (i, (entry, connector)) in config.connectors.iter().zip(&connectors).enumerate() {
        let text = texts.and_then(|t| t.get(i)).copied();
        let slot = Rc::new(Slot {
            text: Rc::from(text.unwrap_or_default()),
            connector: Rc::clone(connector),
            hosts: connector_core::config::entry_hosts(entry, &host_pattern),
        });
        index.insert(&slot);
        slots.push(slot);
    }
    let settings = if texts.is_some() {
        split.map(|s| s.settings)
    } else {
        None
    };
    let FilterConfig {
        proxy,
        identity,
        authorization,
        parts,
        ..
    } = config;
    Ok(Config {
        realm: proxy.realm().to_string(),
        host_pattern,
        policy,
        token_cache_size: usize::try_from(identity.token_cache_size()).unwrap_or(usize::MAX),
        kept: 0,
        controller,
        access: authorization,
        parts,
        index,
        settings,
        slots,
        layout: vec![],
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
        label: index::name_key(&entry.namespace, &entry.name),
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
