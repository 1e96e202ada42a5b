//! The checks on typed values: what [`parse`](super::parse) runs after the walk, and what the
//! controller runs on the values it builds. Each returns every problem, with its path.

use std::collections::{HashMap, HashSet};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::*;
use crate::address::{Upstream, split_url};
use crate::names::{is_dns_label, is_dns_subdomain};

pub(super) const CLOCK_SKEW: (u64, u64) = (0, MAX_CLOCK_SKEW);
pub(super) const TOKEN_CACHE_SIZE: (u64, u64) = (1, 1_000_000);
pub(super) const TOKEN_LIFETIME: (u64, u64) = (60, 366 * 86_400);

pub(super) fn range_message((lo, hi): (u64, u64)) -> String {
    format!("expected an integer from {lo} to {hi}")
}

/// Whether `path` is, or lies under, a path `reported` already names: a value already found
/// wrong is not reported again by a later check that reads it as empty.
pub fn covered(reported: &[ConfigError], path: &str) -> bool {
    reported.iter().any(|r| {
        path.strip_prefix(r.path.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
    })
}

/// Whether `value` is there; if not, "is required" at `base.field` (the path is built only
/// then: these checks run on every entry of every configuration push).
fn required(errors: &mut Vec<ConfigError>, base: &str, field: &str, value: &str) -> bool {
    if value.is_empty() {
        errors.push(ConfigError::new(format!("{base}.{field}"), "is required"));
        return false;
    }
    true
}

/// The whole document: [`check_settings`], [`check_entry`] on each connector, and what spans
/// connectors.
pub fn check(config: &FilterConfig) -> Vec<ConfigError> {
    let mut found = check_settings(config);
    for (i, entry) in config.connectors.iter().enumerate() {
        found.extend(check_entry(
            entry,
            &format!("connectors[{i}]"),
            config.controller.is_some(),
        ));
    }
    found.extend(check_connectors(&config.connectors, config.proxy.host_pattern()));
    found
}

/// Everything but the connectors: `proxy`, `identity`, `controller`, `authorization`, and the
/// rules that tie them to whether there are connectors.
pub fn check_settings(config: &FilterConfig) -> Vec<ConfigError> {
    let mut errors = vec![];
    let realm = config.proxy.realm();
    if realm.contains(['"', '\\']) || realm.chars().any(char::is_control) {
        errors.push(ConfigError::new(
            "proxy.realm",
            "must not contain quotes, backslashes or control characters",
        ));
    }
    for problem in crate::host::pattern_problems(config.proxy.host_pattern()) {
        errors.push(ConfigError::new("proxy.hostPattern", problem));
    }
    let has_controller = config.controller.is_some();
    // An empty key set verifies no token. That is the state of a proxy waiting for its
    // controller (the Istio WasmPlugin as shipped, before `--istio-wasmplugin` writes it):
    // valid only with the controller channel and no connectors, so it refuses everything with
    // an OCI error. With connectors it is a mistake: nobody could ever use them.
    errors.extend(check_identity(
        &config.identity,
        has_controller && config.connectors.is_empty() && config.parts.is_empty(),
    ));
    if let Some(c) = &config.controller {
        required(&mut errors, "controller", "cluster", &c.cluster);
        if c.authority.as_deref() == Some("") {
            errors.push(ConfigError::new("controller.authority", "must not be empty"));
        }
        if c.key_env.as_deref() == Some("") {
            errors.push(ConfigError::new("controller.keyEnv", "must not be empty"));
        }
    }
    if config.authorization == AccessMode::Controller && !has_controller {
        errors.push(ConfigError::new(
            "authorization",
            "\"controller\" needs the controller channel: set controller.cluster",
        ));
    }
    // A controller-managed configuration may be empty (the last Connector was deleted: every
    // request is then refused); a hand-written one without connectors is a mistake.
    if config.connectors.is_empty() && !has_controller {
        errors.push(ConfigError::new("connectors", "must list at least one connector"));
    }
    errors.extend(check_parts(config));
    errors
}

/// `parts`: content ids, each once, fetched over the controller channel in place of the
/// `connectors` list.
fn check_parts(config: &FilterConfig) -> Vec<ConfigError> {
    let mut errors = vec![];
    if config.parts.is_empty() {
        return errors;
    }
    if config.controller.is_none() {
        errors.push(ConfigError::new(
            "parts",
            "parts are fetched over the controller channel: set controller.cluster",
        ));
    }
    if !config.connectors.is_empty() {
        errors.push(ConfigError::new(
            "connectors",
            "must be empty when parts lists where the entries are",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, id) in config.parts.iter().enumerate() {
        if !crate::channel::is_part_id(id) {
            errors.push(ConfigError::new(
                format!("parts[{i}]"),
                "expected a part id: sha256: and 64 lowercase hex digits",
            ));
        } else if !seen.insert(id.as_str()) {
            errors.push(ConfigError::new(format!("parts[{i}]"), "is listed twice"));
        }
    }
    errors
}

/// The `identity` section; `keys_may_be_empty` for a controller-managed configuration that
/// has no connectors yet.
pub(super) fn check_identity(identity: &IdentityConfig, keys_may_be_empty: bool) -> Vec<ConfigError> {
    let mut errors = vec![];
    for (key, list) in [("issuers", &identity.issuers), ("audiences", &identity.audiences)] {
        if list.is_empty() {
            errors.push(ConfigError::new(format!("identity.{key}"), "must not be empty"));
        }
        for (i, item) in list.iter().enumerate() {
            if item.is_empty() {
                errors.push(ConfigError::new(
                    format!("identity.{key}[{i}]"),
                    "expected a non-empty string",
                ));
            }
        }
    }
    for (key, value, range) in [
        ("clockSkewSeconds", identity.clock_skew_seconds, CLOCK_SKEW),
        ("tokenCacheSize", identity.token_cache_size, TOKEN_CACHE_SIZE),
        (
            "maxTokenLifetimeSeconds",
            identity.max_token_lifetime_seconds,
            TOKEN_LIFETIME,
        ),
    ] {
        if let Some(n) = value
            && !(range.0..=range.1).contains(&n)
        {
            errors.push(ConfigError::new(format!("identity.{key}"), range_message(range)));
        }
    }
    let keys = &identity.jwks.keys;
    if keys.is_empty() && !keys_may_be_empty {
        errors.push(ConfigError::new(
            "identity.jwks.keys",
            "is required: expected a non-empty list of JWK public keys (the cluster's /openid/v1/jwks); \
             an empty list is accepted only while a controller-managed configuration has no connectors",
        ));
    }
    let mut seen = HashSet::new();
    for (i, key) in keys.iter().enumerate() {
        let path = format!("identity.jwks.keys[{i}]");
        if let Err(e) = check_jwk_shape(key, &path) {
            errors.extend(e);
        }
        if !key.kid.is_empty() && !seen.insert(key.kid.as_str()) {
            errors.push(ConfigError::new(
                format!("{path}.kid"),
                format!("key id {:?} appears twice", key.kid),
            ));
        }
    }
    errors
}

fn b64url(s: Option<&str>) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s?).ok()
}

/// A JWK's algorithm and decoded material, checked for what the filter can verify with: RSA
/// of at least 2048 bits (RS/PS 256, 384, 512), EC on P-256 or P-384 (ES256, ES384), signing
/// keys only. Whether the numbers make a key (a point on the curve, an exponent in range) is
/// decided where the key is built.
pub fn check_jwk_shape(jwk: &Jwk, path: &str) -> Result<KeyMaterial, Vec<ConfigError>> {
    let mut errors = vec![];
    let mut err = |field: &str, message: String| {
        let at = if field.is_empty() {
            path.to_string()
        } else {
            format!("{path}.{field}")
        };
        errors.push(ConfigError::new(at, message));
    };
    if jwk.kid.is_empty() {
        err("kid", "is required".into());
    }
    if let Some(u) = &jwk.use_
        && u != "sig"
    {
        err("use", "expected \"sig\": only signing keys verify tokens".into());
    }
    let material = match jwk.kty.as_str() {
        "" => {
            err("kty", "is required".into());
            None
        }
        "RSA" => {
            let algorithm = match jwk.alg.as_deref().unwrap_or("RS256") {
                "RS256" => Some(Algorithm::RS256),
                "RS384" => Some(Algorithm::RS384),
                "RS512" => Some(Algorithm::RS512),
                "PS256" => Some(Algorithm::PS256),
                "PS384" => Some(Algorithm::PS384),
                "PS512" => Some(Algorithm::PS512),
                other => {
                    err(
                        "alg",
                        format!(
                            "{other:?} is not an RSA signature algorithm: expected RS256, RS384, RS512, PS256, PS384 or PS512"
                        ),
                    );
                    None
                }
            };
            let n = match &jwk.n {
                None => {
                    err("n", "is required".into());
                    None
                }
                Some(n) => {
                    let n = b64url(Some(n)).filter(|n| n.len() >= 256);
                    if n.is_none() {
                        err(
                            "n",
                            "expected the base64url modulus of an RSA key of at least 2048 bits".into(),
                        );
                    }
                    n
                }
            };
            let e = match &jwk.e {
                None => {
                    err("e", "is required".into());
                    None
                }
                Some(e) => {
                    let e = b64url(Some(e)).filter(|e| !e.is_empty() && e.len() <= 8);
                    if e.is_none() {
                        err("e", "expected the base64url RSA public exponent".into());
                    }
                    e
                }
            };
            match (algorithm, n, e) {
                (Some(algorithm), Some(n), Some(e)) => Some(KeyMaterial::Rsa { algorithm, n, e }),
                _ => None,
            }
        }
        "EC" => {
            let curve = match jwk.crv.as_deref() {
                None => {
                    err("crv", "is required".into());
                    None
                }
                Some("P-256") => Some((Algorithm::ES256, 32)),
                Some("P-384") => Some((Algorithm::ES384, 48)),
                Some(other) => {
                    err("crv", format!("{other:?} is not supported: expected P-256 or P-384"));
                    None
                }
            };
            if let (Some(a), Some((algorithm, _))) = (&jwk.alg, curve)
                && a != algorithm.name()
            {
                err(
                    "alg",
                    format!(
                        "{a:?} does not fit curve {}: expected {}",
                        jwk.crv.as_deref().unwrap_or(""),
                        algorithm.name()
                    ),
                );
            }
            let mut coords = vec![];
            for (name, coord) in [("x", &jwk.x), ("y", &jwk.y)] {
                match (coord, curve) {
                    (None, _) => err(name, "is required".into()),
                    (Some(c), Some((_, size))) => match b64url(Some(c)).filter(|c| c.len() == size) {
                        Some(c) => coords.push(c),
                        None => err(name, format!("expected a base64url {size}-byte coordinate")),
                    },
                    (Some(_), None) => {}
                }
            }
            match (curve, coords.pop(), coords.pop()) {
                (Some((algorithm, _)), Some(y), Some(x)) => Some(KeyMaterial::Ec { algorithm, x, y }),
                _ => None,
            }
        }
        other => {
            err(
                "kty",
                format!("{other:?} is not supported: expected RSA or EC (symmetric keys are never accepted)"),
            );
            None
        }
    };
    match material {
        Some(m) if errors.is_empty() => Ok(m),
        _ if errors.is_empty() => Err(vec![ConfigError::new(path, "not a usable key")]),
        _ => Err(errors),
    }
}

/// One connector entry at `path`, alone: names, address, cluster, credential, token realms,
/// allow lists, host names. What spans connectors is [`check_connectors`].
pub fn check_entry(entry: &ConnectorEntry, path: &str, has_controller: bool) -> Vec<ConfigError> {
    let mut errors = vec![];
    if required(&mut errors, path, "namespace", &entry.namespace) && !is_dns_label(&entry.namespace) {
        errors.push(ConfigError::new(
            format!("{path}.namespace"),
            "expected a Kubernetes namespace name (RFC 1123 label)",
        ));
    }
    if required(&mut errors, path, "name", &entry.name) && !is_dns_subdomain(&entry.name) {
        errors.push(ConfigError::new(
            format!("{path}.name"),
            "expected a Kubernetes object name (RFC 1123 subdomain)",
        ));
    }
    if required(&mut errors, path, "address", &entry.address)
        && let Err(e) = Upstream::parse(&entry.address)
    {
        errors.push(ConfigError::new(format!("{path}.address"), e));
    }
    // '|' is in the names Istio gives clusters (`outbound|443||registry.example.com`), which a
    // controller in an Istio gateway names (`--istio-wasmplugin`); none of these characters can
    // end or split the `x-oci-connector-cluster` header value.
    if required(&mut errors, path, "cluster", &entry.cluster) && !is_cluster_name(&entry.cluster) {
        errors.push(ConfigError::new(
            format!("{path}.cluster"),
            "expected an Envoy cluster name (letters, digits, '_', '-', '.', ':', '|')",
        ));
    }
    let at = format!("{path}.credential");
    match &entry.credential {
        CredentialRef::FromController { revision } => {
            let present = required(&mut errors, &at, "fromController", revision);
            let p = || format!("{at}.fromController");
            if present
                && !revision
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            {
                errors.push(ConfigError::new(
                    p(),
                    "expected a revision label (letters, digits, '-', '.', '_')",
                ));
            } else if present && !has_controller {
                errors.push(ConfigError::new(
                    p(),
                    "needs the controller channel: set controller.cluster",
                ));
            }
        }
        CredentialRef::DockerConfig { var } => {
            required(&mut errors, &at, "dockerConfigJsonEnv", var);
        }
        CredentialRef::Env { username, password_env } => {
            match username {
                Username::Literal(u) if u.contains(':') => errors.push(ConfigError::new(
                    &at,
                    "the username must not contain ':' (Basic credentials cannot carry it)",
                )),
                Username::Literal(u) => {
                    required(&mut errors, &at, "username", u);
                }
                Username::Env(var) => {
                    required(&mut errors, &at, "usernameEnv", var);
                }
            }
            required(&mut errors, &at, "passwordEnv", password_env);
        }
    }
    for (i, realm) in entry.token_realms.iter().enumerate() {
        let p = format!("{path}.tokenRealms[{i}]");
        if required(&mut errors, &p, "url", &realm.url) && split_url(&realm.url).is_none() {
            errors.push(ConfigError::new(
                format!("{p}.url"),
                "expected the realm URL as the upstream's challenge names it: http(s)://host[:port]/path",
            ));
        }
        required(&mut errors, &p, "cluster", &realm.cluster);
    }
    for (i, ns) in entry.allowed_namespaces.iter().enumerate() {
        if !is_dns_label(ns) {
            errors.push(ConfigError::new(
                format!("{path}.allowedNamespaces[{i}]"),
                "expected a Kubernetes namespace name",
            ));
        }
    }
    for (i, sa) in entry.allowed_service_accounts.iter().enumerate() {
        if parse_service_account(sa).is_none() {
            errors.push(ConfigError::new(
                format!("{path}.allowedServiceAccounts[{i}]"),
                "expected <namespace>/<serviceaccount>",
            ));
        }
    }
    for (i, h) in entry.hosts.iter().enumerate() {
        if !is_dns_subdomain(&h.to_ascii_lowercase()) {
            errors.push(ConfigError::new(
                format!("{path}.hosts[{i}]"),
                "expected a host name without port",
            ));
        }
    }
    errors
}

/// `<namespace>/<serviceaccount>` of `allowedServiceAccounts`.
pub fn parse_service_account(sa: &str) -> Option<(&str, &str)> {
    sa.split_once('/')
        .filter(|(ns, name)| is_dns_label(ns) && is_dns_subdomain(name))
}

fn is_cluster_name(c: &str) -> bool {
    c.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'|'))
}

/// The host names a connector is reached by: the pattern's, then its own (lowercase).
pub fn entry_hosts(entry: &ConnectorEntry, host_pattern: &str) -> Vec<String> {
    let mut hosts = vec![crate::host::render_host(host_pattern, &entry.namespace, &entry.name)];
    hosts.extend(entry.hosts.iter().map(|h| h.to_ascii_lowercase()));
    hosts
}

/// What spans connectors: a connector defined twice, a host name claimed twice (the later
/// claimant is reported).
pub(super) fn check_connectors(entries: &[ConnectorEntry], host_pattern: &str) -> Vec<ConfigError> {
    let mut errors = vec![];
    let mut names = HashSet::new();
    let mut by_host: HashMap<String, usize> = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        if entry.namespace.is_empty() || entry.name.is_empty() {
            continue;
        }
        // Paths are formatted only for a problem: this runs over every entry on every push.
        if !names.insert((entry.namespace.as_str(), entry.name.as_str())) {
            errors.push(ConfigError::new(
                format!("connectors[{i}]"),
                format!("connector {} is defined twice", entry.label()),
            ));
        }
        for h in entry_hosts(entry, host_pattern) {
            match by_host.entry(h) {
                std::collections::hash_map::Entry::Occupied(mut claimed) => {
                    if std::mem::replace(claimed.get_mut(), i) != i {
                        errors.push(ConfigError::new(
                            format!("connectors[{i}].hosts"),
                            format!("host {:?} is already used by another connector", claimed.key()),
                        ));
                    }
                }
                std::collections::hash_map::Entry::Vacant(free) => {
                    free.insert(i);
                }
            }
        }
    }
    errors
}
