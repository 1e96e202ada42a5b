//! Owns file mode's output: from a checked [`ManifestSet`] and the identity settings, the
//! filter configuration document (README "Filter configuration"), the environment variables
//! holding the upstream credentials, and the Envoy clusters the configuration names.
//!
//! `connector-controller render` is for operators who run Envoy from static files instead of
//! from the controller's xDS (`serve`, the normal way, whose pipeline reuses this module's
//! per-connector entries): a change means rendering again and restarting Envoy. The
//! configuration is built as `connector_core::config`'s typed document and checked with the
//! checks the filter runs when it loads it, so a set this accepts is one the filter loads.
//!
//! Credentials go only to the env file (mode 0600): the configuration names the variables, so it
//! and Envoy's config dump stay free of passwords, exactly as the filter expects.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use connector_core::address::Upstream;
use connector_core::config::{ConfigError, ConnectorEntry, CredentialRef, FilterConfig, RealmEntry, Username};
use serde::Serialize;
use serde_json::{Value, json};

use crate::manifests::{ManifestSet, Problem};
use crate::secrets::{Credential, credential_from_secret};

pub const FILTER_CONFIG_FILE: &str = "filter-config.json";
pub const ENV_FILE: &str = "connectors.env";
pub const CLUSTERS_FILE: &str = "clusters.json";
/// The same clusters as Envoy configuration (`static_resources.clusters`), TLS and name checks included.
pub const ENVOY_CLUSTERS_FILE: &str = "envoy-clusters.json";

/// An Envoy cluster the filter configuration refers to: one per upstream origin (registry or
/// token realm).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamCluster {
    pub name: String,
    /// Host name or IP address (IPv6 without brackets), as Envoy's socket address takes it.
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// SNI for TLS to a host name; none for IP literals (SNI carries names only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
}

/// The name an https upstream's certificate must carry, as a subject alternative name. Envoy's
/// cluster (CDS and [`ENVOY_CLUSTERS_FILE`]) and the controller's own probes check the same
/// name: a certificate from a trusted CA for another host is refused, so whoever steers DNS or
/// sits on the path cannot collect the connector's credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifiedName {
    /// A host name: a DNS SAN equal to it (RFC 6125 wildcards in the certificate apply).
    Dns(String),
    /// An IP literal (IPv6 without brackets): an IP SAN equal to it.
    Ip(String),
}

impl UpstreamCluster {
    /// What the upstream's certificate must name; none for plain HTTP.
    pub fn verified_name(&self) -> Option<VerifiedName> {
        if !self.tls {
            return None;
        }
        Some(if self.host.parse::<std::net::IpAddr>().is_ok() {
            VerifiedName::Ip(self.host.clone())
        } else {
            VerifiedName::Dns(self.host.clone())
        })
    }

    /// The cluster as Envoy's static configuration takes it (`static_resources.clusters[]`, v3
    /// JSON): what the controller sends over CDS (`xds::cluster_resource`), for `render` mode.
    pub fn envoy_json(&self, ca_bundle: &str) -> Value {
        let discovery = if self.host.parse::<std::net::IpAddr>().is_ok() {
            "STATIC"
        } else {
            "LOGICAL_DNS"
        };
        let mut c = json!({
            "name": self.name,
            "type": discovery,
            "connect_timeout": "5s",
            "dns_lookup_family": "V4_PREFERRED",
            "load_assignment": {
                "cluster_name": self.name,
                "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "socket_address": {
                    "address": self.host, "port_value": self.port,
                } } } }] }],
            },
        });
        if let Some(name) = self.verified_name() {
            let (san_type, value) = match name {
                VerifiedName::Dns(v) => ("DNS", v),
                VerifiedName::Ip(v) => ("IP_ADDRESS", v),
            };
            let mut tls = json!({
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": { "validation_context": {
                    "trusted_ca": { "filename": ca_bundle },
                    "match_typed_subject_alt_names": [{ "san_type": san_type, "matcher": { "exact": value } }],
                } },
            });
            if let Some(sni) = &self.sni {
                tls["sni"] = json!(sni);
            }
            c["transport_socket"] = json!({ "name": "envoy.transport_sockets.tls", "typed_config": tls });
        }
        c
    }
}

/// What `render` produces. `Debug` shows variable names, never their values.
#[derive(Clone)]
pub struct Rendered {
    pub filter_config: FilterConfig,
    /// `(variable, value)`, sorted by variable.
    pub env: Vec<(String, String)>,
    pub clusters: Vec<UpstreamCluster>,
}

impl std::fmt::Debug for Rendered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Rendered")
            .field("filter_config", &self.filter_config)
            .field("env", &names)
            .field("clusters", &self.clusters)
            .finish()
    }
}

/// Reads the manifests in `manifests` and the identity file, then renders. Problems of either
/// come back together; any problem refuses the whole set. The documents that parsed are
/// rendered even when others did not, so every problem is listed at once (one whose Secret is
/// in a malformed document is also told that Secret is missing).
pub fn render_files(manifests: &Path, identity_file: &Path) -> Result<Rendered, Vec<Problem>> {
    let (set, mut problems) = crate::manifests::load_dir_all(manifests);
    let identity = match read_identity(identity_file) {
        Ok(identity) => identity,
        Err(p) => {
            problems.push(p);
            return Err(problems);
        }
    };
    match render(&set, &identity, &identity_file.display().to_string()) {
        Ok(rendered) if problems.is_empty() => Ok(rendered),
        Ok(_) => Err(problems),
        Err(more) => {
            problems.extend(more);
            Err(problems)
        }
    }
}

/// The identity file: the filter's `identity` object (`issuers`, `audiences`, `jwks`,
/// optionally `clockSkewSeconds`, `tokenCacheSize`), validated with the rest by the filter.
pub(crate) fn read_identity(path: &Path) -> Result<Value, Problem> {
    let at = path.display();
    let text = std::fs::read(path).map_err(|e| Problem::new(&at, "", format!("cannot read: {e}")))?;
    let v: Value = serde_json::from_slice(&text).map_err(|e| Problem::new(&at, "", format!("not JSON: {e}")))?;
    if v.is_object() {
        Ok(v)
    } else {
        Err(Problem::new(
            &at,
            "",
            "expected a JSON object: {\"issuers\": [...], \"audiences\": [...], \"jwks\": {...}}",
        ))
    }
}

/// Renders `set`. `identity_at` names where the identity settings came from, for problems.
pub fn render(set: &ManifestSet, identity: &Value, identity_at: &str) -> Result<Rendered, Vec<Problem>> {
    let mut problems = vec![];
    let mut clusters: BTreeMap<String, (UpstreamCluster, String)> = BTreeMap::new();
    let mut env: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut entries = vec![];
    // Which document each filter entry came from, to locate the filter validator's findings.
    let mut origins = vec![];
    // In the order they were defined (file, then document): the older of two claimants wins.
    let mut connectors: Vec<_> = set.connectors().collect();
    connectors.sort_by(|a, b| a.0.cmp(b.0));
    for (at, c) in connectors {
        let ns = c.metadata.namespace.as_deref().unwrap_or_default();
        let name = c.metadata.name.as_deref().unwrap_or_default();
        let mut ok = true;
        let upstream = match Upstream::parse(&c.spec.address) {
            Ok(u) => Some(u),
            Err(e) => {
                problems.push(Problem::new(at, "spec.address", e));
                None
            }
        };
        let cluster = upstream.as_ref().map(|u| {
            let cluster = cluster_for(u);
            add_cluster(&mut clusters, cluster.clone(), at, "spec.address", &mut problems);
            cluster.name
        });
        let secret_name = &c.spec.auth.secret_ref.name;
        let authority = upstream.as_ref().map(|u| u.authority.as_str()).unwrap_or_default();
        let outcome = credential_from_secret(ns, secret_name, name, set.secret(ns, secret_name), authority);
        if !outcome.condition.status {
            problems.push(Problem::new(
                at,
                "spec.auth.secretRef.name",
                format!("{}: {}", outcome.condition.reason.as_str(), outcome.condition.message),
            ));
            ok = false;
        }
        let mut realms = vec![];
        for (i, realm) in c.spec.token_realms.iter().enumerate() {
            let path = format!("spec.tokenRealms[{i}]");
            match realm_origin(&realm.url) {
                Ok(u) => {
                    let mut cl = cluster_for(&u);
                    if let Some(named) = &realm.cluster {
                        cl.name.clone_from(named);
                    }
                    realms.push(RealmEntry {
                        url: realm.url.clone(),
                        cluster: cl.name.clone(),
                    });
                    add_cluster(&mut clusters, cl, at, &path, &mut problems);
                }
                Err(e) => {
                    problems.push(Problem::new(at, format!("{path}.url"), e));
                    ok = false;
                }
            }
        }
        let (user_var, password_var) = env_names(ns, name);
        // Both names share one stem: one check covers the pair.
        if let Some((other, _)) = env.get(&user_var) {
            problems.push(Problem::new(
                at,
                "metadata.name",
                format!("its variables {user_var} and {password_var} are also those of the connector at {other}: rename one of them"),
            ));
            ok = false;
        }
        let (Some(cluster), Some(Credential { username, password }), true) = (cluster, outcome.credential, ok) else {
            continue;
        };
        env.insert(user_var.clone(), (at.to_string(), username));
        env.insert(password_var.clone(), (at.to_string(), password));
        let credential = CredentialRef::Env {
            username: Username::Env(user_var),
            password_env: password_var,
        };
        entries.push(filter_entry(c, &cluster, credential, realms));
        origins.push(at.to_string());
    }
    // The filter's checks (connector-core's, and its key building) run even when the set
    // already has problems, on the connectors that got this far, so one run reports everything.
    // The variables the entries name are this rendering's own, so the filter's environment
    // look-ups cannot fail.
    let (identity, mut errors) = connector_core::config::read_identity(identity);
    let config = FilterConfig {
        identity,
        connectors: entries,
        ..FilterConfig::default()
    };
    connector_core::config::merge(&mut errors, connector_core::config::check(&config));
    connector_core::config::merge(&mut errors, connector_core::keys::check_keys(&config.identity));
    // "no connectors" is only news when the manifests have none, not when every one of them
    // was left out for a problem already reported.
    let dropped = origins.len() < set.connector_count();
    problems.extend(
        errors
            .into_iter()
            .filter(|e| !(dropped && e.path == "connectors"))
            .map(|e| locate(e, &origins, identity_at)),
    );
    let env: Vec<(String, String)> = env.into_iter().map(|(k, (_, v))| (k, v)).collect();
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Rendered {
        filter_config: config,
        env,
        clusters: clusters.into_values().map(|(c, _)| c).collect(),
    })
}

/// A connector's entry in the filter configuration (README "Filter configuration"): shared by
/// file mode's one-shot output and the live controller, which differ only in `credential`.
pub(crate) fn filter_entry(
    c: &crate::crd::Connector,
    cluster: &str,
    credential: CredentialRef,
    token_realms: Vec<RealmEntry>,
) -> ConnectorEntry {
    ConnectorEntry {
        namespace: c.metadata.namespace.clone().unwrap_or_default(),
        name: c.metadata.name.clone().unwrap_or_default(),
        address: c.spec.address.clone(),
        cluster: cluster.to_string(),
        credential,
        allowed_namespaces: c.spec.allowed_namespaces.clone(),
        allowed_service_accounts: c.spec.allowed_service_accounts.clone(),
        hosts: c.spec.hosts.clone(),
        token_realms,
        read_only: c.spec.read_only,
    }
}

/// Maps a finding of the filter's checks back to the document it is about.
pub(crate) fn locate(e: ConfigError, origins: &[String], identity_at: &str) -> Problem {
    let index = e
        .path
        .strip_prefix("connectors[")
        .and_then(|r| r.split_once(']'))
        .and_then(|(i, _)| i.parse::<usize>().ok());
    match index.and_then(|i| origins.get(i)) {
        Some(at) => Problem::new(at, format!("filter configuration {}", e.path), e.message),
        None if e.path.starts_with("identity") => Problem::new(identity_at, e.path, e.message),
        None => Problem::new("filter configuration", e.path, e.message),
    }
}

pub(crate) fn add_cluster(
    clusters: &mut BTreeMap<String, (UpstreamCluster, String)>,
    cluster: UpstreamCluster,
    at: &crate::manifests::Location,
    path: &str,
    problems: &mut Vec<Problem>,
) {
    match clusters.get(&cluster.name) {
        Some((existing, _)) if *existing == cluster => {}
        Some((_, first)) => problems.push(Problem::new(
            at,
            path,
            format!(
                "cluster {} would reach {}:{} but {first} already names it for another origin",
                cluster.name, cluster.host, cluster.port
            ),
        )),
        None => {
            clusters.insert(cluster.name.clone(), (cluster, format!("{at} {path}")));
        }
    }
}

/// The origin of a token realm URL (its path and query are the realm's business).
pub(crate) fn realm_origin(url: &str) -> Result<Upstream, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "expected an http(s) URL".to_string())?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    Upstream::parse(&format!("{scheme}://{authority}"))
}

/// One cluster per origin, named after it so two connectors on one registry share it. The name
/// is readable (`upstream_<scheme>_<host with . - : as _>_<port>`) and ends with a 64-bit hash
/// of the exact origin, so two origins never share a name (`a-b` and `a.b` did).
pub fn cluster_for(u: &Upstream) -> UpstreamCluster {
    let tls = u.scheme == "https";
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = match u.authority.strip_prefix('[').and_then(|r| r.split_once(']')) {
        Some((addr, rest)) => (addr.to_string(), rest.strip_prefix(':').and_then(|p| p.parse().ok())),
        None => match u.authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()),
            None => (u.authority.clone(), None),
        },
    };
    let port = port.unwrap_or(default_port);
    let is_ip = host.parse::<std::net::IpAddr>().is_ok();
    let host = host.to_ascii_lowercase();
    let origin = format!("{}://{host}:{port}", u.scheme);
    let digest: String = <sha2::Sha256 as sha2::Digest>::digest(origin.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    UpstreamCluster {
        name: format!("upstream_{}_{}_{port}_{digest}", u.scheme, sanitize(&host)),
        sni: (tls && !is_ip).then(|| host.clone()),
        host,
        port,
        tls,
    }
}

/// `CONNECTOR_<NS>_<NAME>_USERNAME` and `..._PASSWORD`.
pub fn env_names(namespace: &str, name: &str) -> (String, String) {
    let base = format!("CONNECTOR_{}_{}", sanitize(namespace), sanitize(name)).to_ascii_uppercase();
    (format!("{base}_USERNAME"), format!("{base}_PASSWORD"))
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The files [`Rendered::write`] wrote.
#[derive(Debug)]
pub struct Written {
    pub filter_config: PathBuf,
    pub env: PathBuf,
    pub clusters: PathBuf,
    pub envoy_clusters: PathBuf,
}

impl Rendered {
    /// Writes the three files into `out` (created if missing). Each file is written beside its
    /// final name and renamed into place, so a reader never sees half a file; the env file is
    /// created with mode 0600 so the credentials are never readable by others, not even briefly.
    /// https upstreams are validated against Debian's CA bundle.
    pub fn write(&self, out: &Path) -> std::io::Result<Written> {
        self.write_with_ca(out, crate::xds::SYSTEM_CA_BUNDLE)
    }

    /// As [`Rendered::write`], with https upstreams validated against `ca_bundle` (a PEM file
    /// as Envoy's filesystem sees it) in [`ENVOY_CLUSTERS_FILE`].
    pub fn write_with_ca(&self, out: &Path, ca_bundle: &str) -> std::io::Result<Written> {
        std::fs::create_dir_all(out)?;
        let config = serde_json::to_vec_pretty(&self.filter_config).map_err(std::io::Error::other)?;
        let clusters = serde_json::to_vec_pretty(&self.clusters).map_err(std::io::Error::other)?;
        let envoy_clusters: Vec<Value> = self.clusters.iter().map(|c| c.envoy_json(ca_bundle)).collect();
        let envoy_clusters = serde_json::to_vec_pretty(&envoy_clusters).map_err(std::io::Error::other)?;
        let env: String = self.env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        let written = Written {
            filter_config: out.join(FILTER_CONFIG_FILE),
            env: out.join(ENV_FILE),
            clusters: out.join(CLUSTERS_FILE),
            envoy_clusters: out.join(ENVOY_CLUSTERS_FILE),
        };
        write_atomically(&written.filter_config, &config, 0o644)?;
        write_atomically(&written.env, env.as_bytes(), 0o600)?;
        write_atomically(&written.clusters, &clusters, 0o644)?;
        write_atomically(&written.envoy_clusters, &envoy_clusters, 0o644)?;
        Ok(written)
    }
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads an env file as [`Rendered::write`] writes it: `NAME=value` lines, the value verbatim
/// (docker `--env-file` style: no quoting; values never hold newlines, the Secret check refuses them).
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse_file;

    const PASSWORD: &str = "hunter2-secret";

    /// The example configuration's identity: a real RSA key the filter's validator accepts.
    fn identity() -> Value {
        let example: Value = serde_json::from_str(include_str!("../../envoy/connectors.example.json")).unwrap();
        example["identity"].clone()
    }

    fn connector(name: &str, address: &str, extra: &str) -> String {
        format!(
            "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  address: '{address}'\n  auth: {{name: tokenAuth, secretRef: {{name: creds}}}}\n  connectorClassName: oci\n{extra}---\n"
        )
    }

    const SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata: {name: creds, namespace: demo, annotations: {connectors.alauda.io/allowed-connectors: '*'}}\ntype: cpaas.io/distribution-registry-token\nstringData: {username: robot, password: hunter2-secret}\n---\n";

    fn run(text: &str) -> Result<Rendered, Vec<String>> {
        let mut set = ManifestSet::default();
        let mut problems = vec![];
        parse_file(Path::new("m.yaml"), text, &mut set, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        render(&set, &identity(), "identity.json").map_err(|p| p.iter().map(ToString::to_string).collect())
    }

    /// File mode (issue 12.6): a Secret that names only `harbor` gives `local` nothing, and
    /// the refusal says which annotation to add.
    #[test]
    fn a_secret_goes_only_to_the_connectors_it_names() {
        let only_harbor = SECRET.replace("allowed-connectors: '*'", "allowed-connectors: harbor");
        let text = format!(
            "{}{}{only_harbor}",
            connector("harbor", "https://harbor.example.com", ""),
            connector("local", "http://127.0.0.1:5000", ""),
        );
        let problems = run(&text).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("SecretNotAllowed")
                && problems[0].contains("--overwrite connectors.alauda.io/allowed-connectors=harbor,local"),
            "{problems:?}"
        );
        assert!(!problems[0].contains(PASSWORD));
    }

    #[test]
    fn renders_connectors_credentials_and_clusters() {
        let text = format!(
            "{}{}{SECRET}",
            connector(
                "harbor",
                "https://Harbor.example.com",
                "  allowedNamespaces: [ci]\n  allowedServiceAccounts: [build/kaniko]\n  hosts: [harbor-proxy.example.com]\n  tokenRealms: [{url: 'https://auth.example.com/service/token'}]\n"
            ),
            connector("local", "http://127.0.0.1:5000", ""),
        );
        let r = run(&text).unwrap();
        let json = serde_json::to_value(&r.filter_config).unwrap();
        let c = &json["connectors"];
        let named = |v: &Value, prefix: &str| {
            v.as_str()
                .is_some_and(|n| n.starts_with(&format!("{prefix}_")) && n.len() == prefix.len() + 17)
        };
        assert!(
            named(&c[0]["cluster"], "upstream_https_harbor_example_com_443"),
            "{}",
            c[0]["cluster"]
        );
        assert_eq!(
            c[0]["credential"],
            json!({"usernameEnv": "CONNECTOR_DEMO_HARBOR_USERNAME", "passwordEnv": "CONNECTOR_DEMO_HARBOR_PASSWORD"})
        );
        assert!(named(
            &c[0]["tokenRealms"][0]["cluster"],
            "upstream_https_auth_example_com_443"
        ));
        assert_eq!(c[0]["allowedServiceAccounts"], json!(["build/kaniko"]));
        assert!(named(&c[1]["cluster"], "upstream_http_127_0_0_1_5000"));
        assert!(c[1].get("hosts").is_none());
        // The identity as given, less the JWK fields the filter does not read (the typed
        // document carries only its schema's fields).
        let mut want = identity();
        for key in want["jwks"]["keys"].as_array_mut().unwrap() {
            key.as_object_mut().unwrap().remove("key_ops");
        }
        assert_eq!(json["identity"], want);
        let names: Vec<Value> = r.clusters.iter().map(|c| json!(c.name)).collect();
        for (n, prefix) in names.iter().zip([
            "upstream_http_127_0_0_1_5000",
            "upstream_https_auth_example_com_443",
            "upstream_https_harbor_example_com_443",
        ]) {
            assert!(named(n, prefix), "{n} is not {prefix}_<hash>");
        }
        assert_eq!(r.clusters[2].sni.as_deref(), Some("harbor.example.com"));
        assert!(!r.clusters[0].tls && r.clusters[0].sni.is_none());
        assert_eq!(r.env.len(), 4);
        assert!(
            r.env
                .contains(&("CONNECTOR_DEMO_LOCAL_PASSWORD".into(), PASSWORD.into()))
        );
        let text = serde_json::to_string(&r.filter_config).unwrap();
        assert!(!text.contains(PASSWORD), "a password in the filter configuration");
        assert!(!format!("{r:?}").contains(PASSWORD), "a password in Debug");
    }

    #[test]
    fn bad_sets_are_refused_with_every_problem_located() {
        let r_cluster = cluster_for(&Upstream::parse("http://r").unwrap()).name;
        let cases: Vec<(&str, String, Vec<&str>)> = vec![
            (
                "secret missing",
                connector("a", "http://r:5000", ""),
                vec!["m.yaml document 0: spec.auth.secretRef.name: SecretNotFound: Secret demo/creds not found"],
            ),
            (
                "two problems in two documents",
                format!(
                    "{}{}{SECRET}",
                    connector("a", "http://r:5000/v2", ""),
                    connector("b", "http://r", "  allowedServiceAccounts: [nobody]\n")
                ),
                vec![
                    "m.yaml document 0: spec.address: expected scheme://host[:port] with no path",
                    "m.yaml document 1: filter configuration connectors[0].allowedServiceAccounts[0]",
                ],
            ),
            (
                "realm cluster name reused for another origin",
                format!(
                    "{}{SECRET}",
                    connector(
                        "a",
                        "http://r",
                        &format!("  tokenRealms: [{{url: 'https://auth.example.com/t', cluster: {r_cluster}}}]\n")
                    )
                ),
                vec![Box::leak(
                    format!(
                        "m.yaml document 0: spec.tokenRealms[0]: cluster {r_cluster} would reach auth.example.com:443"
                    )
                    .into_boxed_str(),
                )],
            ),
            (
                "env variable names collide",
                format!(
                    "{}{}{SECRET}",
                    connector("a-b", "http://r", ""),
                    connector("a.b", "http://r", "")
                ),
                vec![
                    "m.yaml document 1: metadata.name: its variables CONNECTOR_DEMO_A_B_USERNAME and CONNECTOR_DEMO_A_B_PASSWORD are also",
                ],
            ),
        ];
        for (case, text, expected) in cases {
            let problems = run(&text).unwrap_err();
            assert_eq!(problems.len(), expected.len(), "{case}: {problems:#?}");
            for (p, e) in problems.iter().zip(&expected) {
                assert!(p.starts_with(e), "{case}: {p:?} should start with {e:?}");
                assert!(!p.contains(PASSWORD), "{case}: a password in {p:?}");
            }
        }
    }

    #[test]
    fn identity_problems_point_at_the_identity_file() {
        let mut set = ManifestSet::default();
        let mut problems = vec![];
        parse_file(
            Path::new("m.yaml"),
            &format!("{}{SECRET}", connector("a", "http://r", "")),
            &mut set,
            &mut problems,
        );
        let mut identity = identity();
        identity["audiences"] = json!([]);
        let problems = render(&set, &identity, "identity.json").unwrap_err();
        assert!(problems.iter().all(|p| p.at == "identity.json"), "{problems:?}");
        assert!(problems.iter().any(|p| p.path == "identity.audiences"), "{problems:?}");
    }

    #[test]
    fn envoy_clusters_verify_the_upstream_name() {
        let named = cluster_for(&Upstream::parse("https://harbor.example.com").unwrap());
        let v = named.envoy_json("/ca.pem");
        let tls = &v["transport_socket"]["typed_config"];
        assert_eq!(tls["sni"], "harbor.example.com");
        let validation = &tls["common_tls_context"]["validation_context"];
        assert_eq!(validation["trusted_ca"]["filename"], "/ca.pem");
        assert_eq!(
            validation["match_typed_subject_alt_names"],
            json!([{ "san_type": "DNS", "matcher": { "exact": "harbor.example.com" } }])
        );
        assert_eq!(v["type"], "LOGICAL_DNS");
        let ip = cluster_for(&Upstream::parse("https://10.0.0.1:8443").unwrap());
        let v = ip.envoy_json("/ca.pem");
        let tls = &v["transport_socket"]["typed_config"];
        assert!(tls.get("sni").is_none(), "SNI carries names only");
        assert_eq!(
            tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"],
            json!([{ "san_type": "IP_ADDRESS", "matcher": { "exact": "10.0.0.1" } }])
        );
        assert_eq!(v["type"], "STATIC");
        assert_eq!(
            named.verified_name(),
            Some(VerifiedName::Dns("harbor.example.com".into()))
        );
        assert_eq!(cluster_for(&Upstream::parse("http://r").unwrap()).verified_name(), None);
    }

    #[test]
    fn cluster_names_are_injective() {
        let names: Vec<String> = [
            "http://a-b.example",
            "http://a.b.example",
            "https://a-b.example",
            "http://a-b.example:8080",
            "http://[::1]:5000",
            "http://[::1]:5000",
            "http://127.0.0.1:5000",
        ]
        .iter()
        .map(|a| cluster_for(&Upstream::parse(a).unwrap()).name)
        .collect();
        let distinct: std::collections::BTreeSet<&String> = names.iter().collect();
        // The two [::1]:5000 are one origin, one cluster; everything else differs.
        assert_eq!(names[4], names[5]);
        assert_eq!(distinct.len(), names.len() - 1, "{names:#?}");
        assert!(names[0].starts_with("upstream_http_a_b_example_80_"), "{}", names[0]);

        // Two connectors whose hosts sanitize alike are both served, each on its own cluster.
        let text = format!(
            "{}{}{SECRET}",
            connector("one", "http://a-b.example", ""),
            connector("two", "http://a.b.example", "")
        );
        let r = run(&text).unwrap();
        let json = serde_json::to_value(&r.filter_config).unwrap();
        let c = &json["connectors"];
        assert_eq!(c.as_array().unwrap().len(), 2);
        assert_ne!(c[0]["cluster"], c[1]["cluster"]);
        assert_eq!(r.clusters.len(), 2);
    }

    #[test]
    fn clusters_per_origin() {
        for (address, name, host, port, sni) in [
            (
                "https://ghcr.io",
                "upstream_https_ghcr_io_443",
                "ghcr.io",
                443,
                Some("ghcr.io"),
            ),
            (
                "https://10.0.0.1:8443",
                "upstream_https_10_0_0_1_8443",
                "10.0.0.1",
                8443,
                None,
            ),
            ("http://[::1]:5000", "upstream_http___1_5000", "::1", 5000, None),
            (
                "http://registry.local",
                "upstream_http_registry_local_80",
                "registry.local",
                80,
                None,
            ),
        ] {
            let c = cluster_for(&Upstream::parse(address).unwrap());
            assert_eq!(
                (
                    c.name.get(..c.name.len() - 17).unwrap_or_default(),
                    c.host.as_str(),
                    c.port,
                    c.sni.as_deref()
                ),
                (name, host, port, sni),
                "{address}"
            );
        }
    }

    #[test]
    fn files_are_written_with_the_env_file_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let r = run(&format!("{}{SECRET}", connector("a", "http://r", ""))).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let w = r.write(dir.path()).unwrap();
        let mode = std::fs::metadata(&w.env).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let env = parse_env_file(&std::fs::read_to_string(&w.env).unwrap());
        assert_eq!(env, r.env);
        let config = std::fs::read(&w.filter_config).unwrap();
        assert!(
            connector_filter::config::compile(&config, &|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
                .is_ok()
        );
        let clusters: Value = serde_json::from_slice(&std::fs::read(&w.clusters).unwrap()).unwrap();
        assert_eq!(
            clusters[0]["name"],
            json!(cluster_for(&Upstream::parse("http://r").unwrap()).name)
        );
        let envoy: Value = serde_json::from_slice(&std::fs::read(&w.envoy_clusters).unwrap()).unwrap();
        assert_eq!(envoy[0]["name"], clusters[0]["name"]);
        assert!(envoy[0].get("transport_socket").is_none(), "plain HTTP");
    }
}
