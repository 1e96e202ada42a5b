//! Owns the step from desired state ([`Inputs`]) to what Envoy and the filter get: the filter
//! configuration (ECDS), the upstream clusters (CDS), and the credential table the loopback
//! channel serves. Pure, so it is tested without Envoy.
//!
//! Unlike `render` (file mode's one-shot output, refused as a whole), a live controller keeps
//! serving the connectors that are fine: a connector whose Secret is missing is *left out*,
//! with its problems, and reported in its status; the others go on. Problems of the input as a
//! whole (identity) refuse the whole configuration and the previous one stays in Envoy.
//!
//! No secret enters the configuration: each connector carries `{"fromController": <revision>}`,
//! where the revision is an HMAC-SHA256 of the credential under a key drawn at start-up and
//! never written anywhere. It changes whenever the credential does (so Envoy gets a new
//! configuration and the filter drops its caches), reveals nothing about the password, and
//! differs after a controller restart (so a credential changed while the controller was down is
//! never hidden behind an unchanged configuration).
//!
//! A change costs what it changes: [`crate::live::LiveRender`] keeps each connector's part
//! (entry, clusters, credential, the filter's verdict on the entry, rendered here by
//! [`render_part`]) and renders it again only when its Connector or Secret changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sha2::{Digest, Sha256};

use connector_core::address::Upstream;
use connector_core::config::{ConnectorEntry, CredentialRef, FilterConfig, RealmEntry};

use crate::hub::{ConnectorKey, Inputs};
use crate::manifests::{Content, Problem};
use crate::render::{UpstreamCluster, cluster_for, filter_entry, locate, realm_origin};
use crate::secrets::{Credential, credential_from_secret};

/// How the configuration reaches the controller's channel from inside Envoy.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    /// The Envoy cluster (in Envoy's bootstrap) that reaches the channel on loopback.
    pub cluster: String,
    /// Name of the environment variable holding the channel key in Envoy's process, when the
    /// channel requires one.
    pub key_env: Option<String>,
    /// Whether the filter configuration carries its entries or lists them as parts the filter
    /// fetches over the channel (issue 17).
    pub delivery: Delivery,
}

/// How the pushed filter configuration carries the connectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Every entry in the pushed document (`--config-inline`; always with `--istio-wasmplugin`).
    Inline,
    /// Runs of 64–128 entries listed by content id, fetched by the filter (`--config-parts`).
    Parts,
    /// Parts from `from` served connectors on, inline again below nine tenths of `from` (the
    /// default, `--config-parts-from`). Why both: in the 2026-12-03 `bench_scale` run Envoy
    /// spent less CPU per change inline below about 5,000 connectors (each worker's call for
    /// the new part over the channel is a fixed cost) and far less in parts above (27 against
    /// 136 ms at 20,000). The margin keeps a count that hovers at `from` from switching on
    /// every change (a switch costs a VM one read of every part, or one inline compile).
    Auto { from: usize },
}

/// `--config-parts-from`'s default: where the two deliveries cost Envoy about the same.
pub const DEFAULT_PARTS_FROM: usize = 5_000;

impl Delivery {
    /// Whether a document for `served` connectors lists parts, when the last one did or did
    /// not (`was`).
    pub fn in_parts(self, was: bool, served: usize) -> bool {
        match self {
            Delivery::Inline => false,
            Delivery::Parts => true,
            Delivery::Auto { from } if was => served >= from - from / 10,
            Delivery::Auto { from } => served >= from,
        }
    }
}

/// What Connector authors may claim, as the operator sets it (README "Trust model"). File mode:
/// the operator wrote every manifest, nobody is a tenant. API mode: whoever may create a
/// Connector in a namespace is a tenant of that namespace.
#[derive(Debug, Clone, Default)]
pub struct Tenancy {
    /// Connector authors are tenants: `spec.hosts` must lie in the namespace's own Service
    /// domain (`*.<namespace>.svc[.<suffix>]`) or be granted in `host_grants`, and
    /// `spec.tokenRealms[].cluster` is refused (the controller names every cluster).
    pub tenants: bool,
    /// Extra `spec.hosts` names an operator grants a namespace: `(namespace, host)`, the host
    /// exact or `*.<suffix>` (any name under the suffix).
    pub host_grants: Vec<(String, String)>,
    /// Upstreams (`spec.address`, `spec.tokenRealms`) on loopback, unspecified or the pod's
    /// own addresses are allowed (`--allow-local-upstreams`: a registry beside the proxy in a
    /// test or a single-host set-up). Off, they are refused: a Connector author must not point
    /// the proxy's credentials at the pod itself. Link-local addresses (cloud metadata
    /// services, no registry) are refused either way.
    pub allow_local_upstreams: bool,
    /// The pod's own ports (the controller's xDS, channel and ops listeners, Envoy's): refused
    /// on any local address or `own_addresses`, flag or not.
    pub own_ports: Vec<u16>,
    /// The pod's own addresses besides loopback (its IP, `POD_IP`; the listeners' addresses).
    pub own_addresses: Vec<std::net::IpAddr>,
}

/// Loopback (127/8, ::1, `localhost`), link-local (169.254/16 with the metadata services,
/// fe80::/10) and unspecified addresses, and IPv4 mapped into IPv6 the same.
pub fn local_address(host: &str) -> Option<&'static str> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return Some("loopback");
    }
    let ip: std::net::IpAddr = host.parse().ok()?;
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    match ip {
        _ if ip.is_loopback() => Some("loopback"),
        _ if ip.is_unspecified() => Some("unspecified"),
        std::net::IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        std::net::IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("link-local"),
        _ => None,
    }
}

impl Tenancy {
    /// Why the proxy must not send a Connector's credential to `cluster`, if it must not.
    pub fn refuse_upstream(&self, cluster: &UpstreamCluster) -> Option<String> {
        let local = local_address(&cluster.host);
        let own_address = cluster
            .host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| self.own_addresses.contains(&ip));
        let target = format!("{}:{}", cluster.host, cluster.port);
        if (local.is_some() || own_address) && self.own_ports.contains(&cluster.port) {
            return Some(format!(
                "{target} is one of the proxy pod's own ports (its controller or Envoy): an upstream must be a registry"
            ));
        }
        if own_address && !self.allow_local_upstreams {
            return Some(format!(
                "{target} is the proxy pod's own address: an upstream must be a registry elsewhere"
            ));
        }
        match local {
            Some("link-local") => Some(format!(
                "{target} is a link-local address (cloud metadata services live there, registries do not): the proxy never sends credentials to it"
            )),
            Some(kind) if !self.allow_local_upstreams => Some(format!(
                "{target} is a {kind} address, which the proxy does not send credentials to unless an operator starts the controller with --allow-local-upstreams"
            )),
            _ => None,
        }
    }

    /// Why namespace `ns` may not list `host` in `spec.hosts`, if it may not.
    pub fn refuse_host(&self, ns: &str, host: &str) -> Option<String> {
        if !self.tenants {
            return None;
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let own = format!(".{ns}.svc");
        let in_own_domain = host.ends_with(&own) || host.contains(&format!("{own}."));
        let granted = self.host_grants.iter().any(|(granted_ns, pattern)| {
            granted_ns == ns
                && match pattern.strip_prefix("*.") {
                    Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
                    None => host == pattern.to_ascii_lowercase(),
                }
        });
        (!in_own_domain && !granted).then(|| {
            format!(
                "host {host:?} is outside namespace {ns}'s own names (*.{ns}.svc...) and not granted to it: ask an operator to add --host-grants {ns}={host}, or remove it"
            )
        })
    }
}

/// The result of one render: what goes to Envoy, and what stays in the controller.
#[derive(Clone)]
pub struct Rendering {
    pub filter_config: FilterConfig,
    pub clusters: Vec<UpstreamCluster>,
    /// The credential of each configured connector, served over the channel only.
    pub credentials: HashMap<ConnectorKey, Credential>,
    /// The revision of each of those credentials (what the filter configuration names).
    pub revisions: HashMap<ConnectorKey, String>,
    pub connectors: BTreeSet<ConnectorKey>,
    pub left_out: BTreeMap<ConnectorKey, Vec<Problem>>,
}

impl std::fmt::Debug for Rendering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendering")
            .field("filter_config", &self.filter_config)
            .field("clusters", &self.clusters)
            .field("connectors", &self.connectors)
            .field("left_out", &self.left_out)
            .finish_non_exhaustive()
    }
}

/// HMACs of credentials (see the module docs).
pub struct Revisions {
    key: [u8; 32],
}

impl Revisions {
    /// A fresh key from the OS random source, falling back to time and pid mixed: the
    /// revision's secrecy rests on the key only against offline guessing of weak passwords.
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        if getrandom::fill(&mut key).is_err() {
            let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
            key.copy_from_slice(&Sha256::digest(seed.as_bytes()));
        }
        Self { key }
    }

    pub fn with_key(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// HMAC-SHA256 of the credential under the key, first 8 bytes in hex.
    pub fn of(&self, c: &Credential) -> String {
        use hmac::Mac as _;
        // Any key length is valid for HMAC: this cannot fail.
        let Ok(mut mac) = hmac::Hmac::<Sha256>::new_from_slice(&self.key) else {
            return String::new();
        };
        mac.update(c.username.as_bytes());
        mac.update(&[0u8]);
        mac.update(c.password.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl Default for Revisions {
    fn default() -> Self {
        Self::new()
    }
}

/// One connector's part of a rendering: its filter entry, the clusters it names (its
/// registry's first), its credential and the credential's revision; or why it is left out.
#[derive(Clone)]
pub(crate) enum Part {
    Served {
        entry: Box<ConnectorEntry>,
        /// `entry` as the configuration document carries it, serialized once.
        json: Box<str>,
        clusters: Vec<UpstreamCluster>,
        credential: Credential,
        revision: String,
        /// The host names the filter will route to it (its default one and `spec.hosts`).
        hosts: Vec<String>,
    },
    LeftOut(Vec<Problem>),
}

/// What a cached [`Part`] was rendered from: the Connector's and its Secret's content digests.
/// A left-out part's problems also name where the Connector was defined: it is reused only at
/// the same place (a served part does not depend on it).
pub(crate) type PartKey = (Content, Option<Content>);

/// Renders `inputs` from scratch: [`crate::live::LiveRender`] on an empty state, the whole
/// result as one value (tests, and Istio mode's renaming, work on the whole). `Err` only for
/// problems of the whole (the identity settings).
///
/// Connectors are taken oldest first (creation time, then namespace and name): when two claim
/// one host name or cluster name, the newer claimant is left out with the conflict as its
/// problem, and the older one keeps serving.
pub fn render_live(
    inputs: &Inputs,
    channel: &ChannelSettings,
    revisions: &Revisions,
    tenancy: &Tenancy,
) -> Result<Rendering, Vec<Problem>> {
    let mut live = crate::live::LiveRender::default();
    let out = live.update(inputs, channel, revisions, tenancy)?;
    Ok(Rendering::from_live(&live, out))
}

impl Rendering {
    /// The whole rendering from a [`crate::live::LiveRender`] and its last output.
    pub fn from_live(live: &crate::live::LiveRender, out: crate::live::LiveOutput) -> Self {
        let key = |ns: &str, name: &str| (ns.to_string(), name.to_string());
        Self {
            filter_config: live.filter_config(),
            clusters: out.clusters.to_vec(),
            credentials: out
                .credentials
                .iter()
                .map(|(ns, n, (c, _))| (key(ns, n), c.clone()))
                .collect(),
            revisions: out
                .credentials
                .iter()
                .map(|(ns, n, (_, r))| (key(ns, n), r.clone()))
                .collect(),
            connectors: out.connectors.iter().map(|(ns, n, ())| key(ns, n)).collect(),
            left_out: out.left_out.iter().map(|(ns, n, p)| (key(ns, n), p.clone())).collect(),
        }
    }
}

/// One connector's [`Part`], from scratch.
pub(crate) fn render_part(
    at: &crate::manifests::Location,
    c: &crate::crd::Connector,
    key: &ConnectorKey,
    inputs: &Inputs,
    revisions: &Revisions,
    tenancy: &Tenancy,
) -> Part {
    let mut problems = vec![];
    let upstream = Upstream::parse(&c.spec.address)
        .map_err(|e| problems.push(Problem::new(at, "spec.address", e)))
        .ok();
    if let Some(why) = upstream.as_ref().and_then(|u| tenancy.refuse_upstream(&cluster_for(u))) {
        problems.push(Problem::new(at, "spec.address", why));
    }
    let secret_name = &c.spec.auth.secret_ref.name;
    let authority = upstream.as_ref().map(|u| u.authority.as_str()).unwrap_or_default();
    let outcome = credential_from_secret(
        &key.0,
        secret_name,
        &key.1,
        inputs.set.secret(&key.0, secret_name),
        authority,
    );
    if !outcome.condition.status {
        problems.push(Problem::new(
            at,
            "spec.auth.secretRef.name",
            format!("{}: {}", outcome.condition.reason.as_str(), outcome.condition.message),
        ));
    }
    for (i, host) in c.spec.hosts.iter().enumerate() {
        if let Some(why) = tenancy.refuse_host(&key.0, host) {
            problems.push(Problem::new(at, format!("spec.hosts[{i}]"), why));
        }
    }
    let mut own_clusters = vec![];
    let mut realms = vec![];
    for (i, realm) in c.spec.token_realms.iter().enumerate() {
        match realm_origin(&realm.url) {
            Ok(u) => {
                let mut cl = cluster_for(&u);
                match &realm.cluster {
                    Some(_) if tenancy.tenants => problems.push(Problem::new(
                        at,
                        format!("spec.tokenRealms[{i}].cluster"),
                        "the controller names the clusters of a Connector's token realms: remove this field",
                    )),
                    Some(named) => cl.name.clone_from(named),
                    None => {}
                }
                if let Some(why) = tenancy.refuse_upstream(&cl) {
                    problems.push(Problem::new(at, format!("spec.tokenRealms[{i}].url"), why));
                }
                realms.push(RealmEntry {
                    url: realm.url.clone(),
                    cluster: cl.name.clone(),
                });
                own_clusters.push(cl);
            }
            Err(e) => problems.push(Problem::new(at, format!("spec.tokenRealms[{i}].url"), e)),
        }
    }
    let (Some(upstream), Some(credential), true) = (upstream, outcome.credential, problems.is_empty()) else {
        return Part::LeftOut(problems);
    };
    let cluster = cluster_for(&upstream);
    let revision = revisions.of(&credential);
    let credential_ref = CredentialRef::FromController {
        revision: revision.clone(),
    };
    let entry = filter_entry(c, &cluster.name, credential_ref, realms);
    // The filter's checks on this entry alone (what spans connectors is checked later).
    let errors = connector_core::config::check_entry(&entry, "connectors[0]", true);
    if !errors.is_empty() {
        let origins = [at.to_string()];
        return Part::LeftOut(errors.into_iter().map(|e| locate(e, &origins, "identity")).collect());
    }
    let hosts = connector_core::config::entry_hosts(&entry, connector_core::host::DEFAULT_HOST_PATTERN);
    own_clusters.insert(0, cluster);
    // It cannot fail: every map key is a string.
    let json = serde_json::to_string(&entry).unwrap_or_default().into_boxed_str();
    Part::Served {
        json,
        entry: Box::new(entry),
        clusters: own_clusters,
        credential,
        revision,
        hosts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Authorization;
    use crate::manifests::{ManifestSet, parse_file};
    use serde_json::json;

    const IDENTITY_KEY_N: &str = "7G7S06o6LC9D90t0mSQpgH47Q_bOGioa68ApIuEEAX7ZO_D-wur2Yu_Fg8LIUjHuJDhMcJdQ5zLD-ATufSaLkg3dImGjTHBEKJJIxEJWG7eDznV3PoQZpOUNSfmU5Wj8qV8nkAvxOUDxUXt8Y_HSr1MiuSJQqOx5ZsuzOJiwBFxKzf6cLa-Y4Ov_mB9stvhxlYFHd3m-MOtr9EuMgwWSf47vuu3zL3uL5WHCIZEHbYAp37-_Yfl5ZgvahV2cr6iHcWF7aoKSt6CO5lbjaRwmwkPgd1BVR11rr45cpXt5THYaAv6mXWBVKgjBDPXX6h_4KibHqHU07iTuNvExpugxOw";

    fn inputs(yaml: &str, authorization: Authorization) -> Inputs {
        let mut set = ManifestSet::default();
        let mut problems = vec![];
        parse_file(std::path::Path::new("m.yaml"), yaml, &mut set, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        Inputs {
            set,
            identity: json!({"issuers": ["https://k8s"], "audiences": ["oci-connector"],
                "jwks": {"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "n": IDENTITY_KEY_N, "e": "AQAB"}]}}),
            authorization,
        }
    }

    fn connector(name: &str, address: &str, secret: &str) -> String {
        format!(
            "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  address: {address}\n  auth: {{name: basicAuth, secretRef: {{name: {secret}}}}}\n  connectorClassName: oci\n---\n"
        )
    }

    fn secret(name: &str, password: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: demo, annotations: {{connectors.alauda.io/allowed-connectors: '*'}}}}\ntype: kubernetes.io/basic-auth\nstringData: {{username: robot, password: {password}}}\n---\n"
        )
    }

    /// File mode with the test registries' loopback addresses allowed.
    fn local() -> Tenancy {
        Tenancy {
            allow_local_upstreams: true,
            ..Default::default()
        }
    }

    fn connector_in(ns: &str, name: &str, address: &str, created: &str, extra: &str) -> String {
        format!(
            "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: '{created}'}}\nspec:\n  address: '{address}'\n  auth: {{name: basicAuth, secretRef: {{name: robot}}}}\n  connectorClassName: oci\n{extra}---\n"
        )
    }

    fn secret_in(ns: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: robot, namespace: {ns}, annotations: {{connectors.alauda.io/allowed-connectors: '*'}}}}\ntype: kubernetes.io/basic-auth\nstringData: {{username: robot, password: pw}}\n---\n"
        )
    }

    fn why(r: &Rendering, ns: &str, name: &str) -> String {
        r.left_out
            .get(&(ns.to_string(), name.to_string()))
            .map(|p| p.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
            .unwrap_or_default()
    }

    /// Issue 12 item 5: host names are scoped to the Connector's namespace or granted by an
    /// operator; token realm clusters are the controller's; a conflict leaves out the newer
    /// claimant, never the older connector.
    #[test]
    fn tenants_claim_only_their_own_names_and_the_older_connector_keeps_a_name() {
        let api = Tenancy {
            tenants: true,
            host_grants: vec![("team-b".into(), "*.registry.example".into())],
            allow_local_upstreams: false,
            ..Default::default()
        };
        let yaml = [
            // The victim, older, with its own name.
            connector_in(
                "team-a",
                "victim",
                "https://harbor.example",
                "2026-01-01T00:00:00Z",
                "  hosts: [registry.team-a.svc.cluster.local]\n",
            ),
            // A newer Connector of team-a claims the same name: left out, the victim stays.
            connector_in(
                "team-a",
                "late",
                "https://other.example",
                "2026-02-01T00:00:00Z",
                "  hosts: [registry.team-a.svc.cluster.local]\n",
            ),
            // team-b lists team-a's names (its default host name and a listed one): refused.
            connector_in(
                "team-b",
                "thief",
                "https://harbor.example",
                "2025-01-01T00:00:00Z",
                "  hosts: [c-victim-connector.team-a.svc.cluster.local]\n",
            ),
            connector_in(
                "team-b",
                "thief2",
                "https://harbor.example",
                "2025-01-01T00:00:00Z",
                "  hosts: [registry.team-a.svc.cluster.local]\n",
            ),
            // Granted to team-b by the operator.
            connector_in(
                "team-b",
                "granted",
                "https://harbor.example",
                "2026-03-01T00:00:00Z",
                "  hosts: [pull.registry.example]\n",
            ),
            // A tenant names a token realm's cluster: refused.
            connector_in(
                "team-b",
                "realm",
                "https://harbor.example",
                "2026-03-01T00:00:00Z",
                "  tokenRealms: [{url: 'https://auth.example/token', cluster: connector_controller}]\n",
            ),
            secret_in("team-a"),
            secret_in("team-b"),
        ]
        .concat();
        let r = render_live(
            &inputs(&yaml, Authorization::Controller),
            &channel(),
            &Revisions::new(),
            &api,
        )
        .unwrap();
        let served: Vec<&str> = r.connectors.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(served, ["victim", "granted"], "{:#?}", r.left_out);
        assert!(
            why(&r, "team-a", "late").contains("registry.team-a.svc.cluster.local"),
            "{}",
            why(&r, "team-a", "late")
        );
        for thief in ["thief", "thief2"] {
            let w = why(&r, "team-b", thief);
            assert!(w.contains("spec.hosts[0]") && w.contains("--host-grant"), "{w}");
        }
        let w = why(&r, "team-b", "realm");
        assert!(w.contains("spec.tokenRealms[0].cluster"), "{w}");
        // The conflict is reported on the claimant's ProxyReady condition, not on the victim's.
        let published = crate::hub::Published {
            version: 1,
            connectors: r.connectors.iter().map(|k| (k.clone(), ())).collect(),
            left_out: r.left_out.clone().into_iter().collect(),
            refused: vec![],
        };
        let state = crate::hub::ProxyState {
            connected: true,
            accepted: Some(1),
            rejected: None,
            ..Default::default()
        };
        let key = |ns: &str, n: &str| (ns.to_string(), n.to_string());
        let (ok, reason, message) = crate::hub::proxy_ready(&key("team-a", "late"), Some(&published), &state);
        assert!(!ok && reason == "NotConfigured", "{reason}: {message}");
        assert!(message.contains("already used by another connector"), "{message}");
        let (ok, reason, _) = crate::hub::proxy_ready(&key("team-a", "victim"), Some(&published), &state);
        assert!(ok && reason == "Accepted", "the older connector keeps serving");

        // The same order whichever way the documents come: the older one wins.
        let reversed = [
            connector_in(
                "team-a",
                "late",
                "https://other.example",
                "2026-02-01T00:00:00Z",
                "  hosts: [registry.team-a.svc.cluster.local]\n",
            ),
            connector_in(
                "team-a",
                "victim",
                "https://harbor.example",
                "2026-01-01T00:00:00Z",
                "  hosts: [registry.team-a.svc.cluster.local]\n",
            ),
            secret_in("team-a"),
        ]
        .concat();
        let r = render_live(
            &inputs(&reversed, Authorization::Controller),
            &channel(),
            &Revisions::new(),
            &api,
        )
        .unwrap();
        let served: Vec<&str> = r.connectors.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(served, ["victim"], "{:#?}", r.left_out);

        // File mode has no tenants: the operator's realm cluster and hosts are taken as written.
        let file = [connector("a", "https://harbor.example", "robot"), secret("robot", "pw")]
            .concat()
            .replace(
                "connectorClassName: oci\n",
                "connectorClassName: oci\n  hosts: [registry.internal]\n",
            );
        let r = render_live(
            &inputs(&file, Authorization::Rules),
            &channel(),
            &Revisions::new(),
            &Tenancy::default(),
        )
        .unwrap();
        assert_eq!(r.connectors.len(), 1, "{:#?}", r.left_out);
    }

    /// Issue 12 item 7: no credential to loopback, link-local (metadata services) or the pod's
    /// own ports unless an operator allows local upstreams; the controller's ports never.
    #[test]
    fn local_and_own_upstreams_are_refused_unless_allowed() {
        let strict = Tenancy {
            own_ports: vec![18001],
            own_addresses: vec!["10.1.2.3".parse().unwrap()],
            ..Default::default()
        };
        let allowed = Tenancy {
            allow_local_upstreams: true,
            ..strict.clone()
        };
        let cases = [
            ("http://127.0.0.1:5000", "", Some("loopback"), None),
            ("http://localhost:5000", "", Some("loopback"), None),
            ("http://[::1]:5000", "", Some("loopback"), None),
            ("http://[::ffff:127.0.0.1]:5000", "", Some("loopback"), None),
            ("http://169.254.169.254", "", Some("link-local"), Some("link-local")),
            ("http://[fe80::1]:80", "", Some("link-local"), Some("link-local")),
            ("http://0.0.0.0:5000", "", Some("unspecified"), None),
            ("http://10.1.2.3:5000", "", Some("own address"), None),
            ("http://127.0.0.1:18001", "", Some("own ports"), Some("own ports")),
            ("http://10.1.2.3:18001", "", Some("own ports"), Some("own ports")),
            (
                "https://harbor.example",
                "  tokenRealms: [{url: 'http://127.0.0.1:18001/v1/credentials/demo/a'}]\n",
                Some("own ports"),
                Some("own ports"),
            ),
            (
                "https://harbor.example",
                "  tokenRealms: [{url: 'http://169.254.169.254/latest'}]\n",
                Some("link-local"),
                Some("link-local"),
            ),
            ("https://harbor.example:18001", "", None, None),
            ("http://10.0.0.7:5000", "", None, None),
        ];
        for (address, extra, refused_strict, refused_allowed) in cases {
            let yaml = [
                connector("a", address, "robot").replace(
                    "connectorClassName: oci\n",
                    &format!("connectorClassName: oci\n{extra}"),
                ),
                secret("robot", "pw"),
            ]
            .concat();
            for (tenancy, want) in [(&strict, refused_strict), (&allowed, refused_allowed)] {
                let r = render_live(
                    &inputs(&yaml, Authorization::Rules),
                    &channel(),
                    &Revisions::new(),
                    tenancy,
                )
                .unwrap();
                let w = why(&r, "demo", "a");
                match want {
                    None => assert_eq!(r.connectors.len(), 1, "{address} {extra}: {w}"),
                    Some(kind) => {
                        assert!(r.connectors.is_empty(), "{address} {extra} must be refused ({kind})");
                        assert!(w.contains(kind), "{address} {extra}: {w}");
                    }
                }
            }
        }
    }

    fn channel() -> ChannelSettings {
        ChannelSettings {
            cluster: "connector_controller".into(),
            key_env: Some("CONNECTOR_CHANNEL_KEY".into()),
            delivery: Delivery::Inline,
        }
    }

    #[test]
    fn good_connectors_are_served_and_bad_ones_left_out_with_their_problems() {
        let yaml = [
            connector("good", "http://127.0.0.1:5000", "robot"),
            connector("nosecret", "http://127.0.0.1:5001", "missing"),
            connector("badaddr", "ftp://x", "robot"),
            // A Secret that does not opt in (issue 12.6): its credential goes nowhere.
            connector("borrower", "http://127.0.0.1:5002", "private"),
            secret("robot", "pa55-word"),
            secret("private", "pr1vate-word").replace(
                ", annotations: {connectors.alauda.io/allowed-connectors: '*'}",
                ", annotations: {connectors.alauda.io/allowed-connectors: good}",
            ),
        ]
        .concat();
        let r = render_live(
            &inputs(&yaml, Authorization::Rules),
            &channel(),
            &Revisions::with_key([7; 32]),
            &local(),
        )
        .unwrap();
        let good = ("demo".to_string(), "good".to_string());
        assert_eq!(r.connectors, [good.clone()].into());
        assert_eq!(r.left_out.len(), 3);
        let why = |n: &str| r.left_out[&("demo".to_string(), n.to_string())][0].to_string();
        assert!(why("borrower").contains("SecretNotAllowed"), "{}", why("borrower"));
        assert!(why("nosecret").contains("SecretNotFound"), "{}", why("nosecret"));
        assert!(why("badaddr").contains("spec.address"), "{}", why("badaddr"));
        assert_eq!(
            r.clusters.len(),
            1,
            "only the served connector's cluster: {:?}",
            r.clusters
        );
        assert_eq!(r.credentials[&good].password, "pa55-word");
        let text = serde_json::to_string(&r.filter_config).unwrap();
        assert!(!text.contains("pa55-word"), "no secret in the configuration: {text}");
        let json = serde_json::to_value(&r.filter_config).unwrap();
        assert_eq!(json["controller"]["keyEnv"], "CONNECTOR_CHANNEL_KEY");
        assert_eq!(json["authorization"], "rules");
        assert!(!format!("{r:?}").contains("pa55-word"));
        assert!(!format!("{r:?}").contains("pr1vate-word"));
    }

    /// Issue 17: a rendering re-renders only what changed, and gives what a fresh one gives.
    #[test]
    fn the_live_render_rerenders_only_changed_connectors_and_agrees_with_a_fresh_render() {
        let yaml = |pw: &str| {
            let mut docs: Vec<String> = (0..50)
                .map(|i| connector(&format!("c{i}"), "http://127.0.0.1:5000", "robot"))
                .collect();
            docs.push(connector("other", "http://127.0.0.1:5001", "other"));
            docs.push(secret("robot", "pw"));
            docs.push(secret("other", pw));
            docs.concat()
        };
        let revisions = Revisions::with_key([3; 32]);
        let mut live = crate::live::LiveRender::default();
        let mut run = |y: &str| {
            let out = live
                .update(&inputs(y, Authorization::Rules), &channel(), &revisions, &local())
                .unwrap();
            let counts = (out.rendered, out.settled);
            (Rendering::from_live(&live, out), counts)
        };
        let (first, counts) = run(&yaml("one"));
        assert_eq!((first.connectors.len(), counts), (51, (51, 51)));
        let (again, counts) = run(&yaml("one"));
        assert_eq!(counts, (0, 0), "nothing changed, nothing rendered or settled");
        assert_eq!(again.filter_config, first.filter_config);
        // One Secret rotated: exactly its connector is rendered again, and settled alone.
        let (rotated, counts) = run(&yaml("two"));
        assert_eq!(counts, (1, 1));
        let fresh = render_live(
            &inputs(&yaml("two"), Authorization::Rules),
            &channel(),
            &revisions,
            &local(),
        )
        .unwrap();
        assert_eq!(rotated.filter_config, fresh.filter_config);
        assert_eq!(rotated.revisions, fresh.revisions);
        assert_ne!(rotated.filter_config, first.filter_config);
        // A connector removed: nothing rendered, and it is gone.
        let fewer = yaml("two").replacen(&connector("c7", "http://127.0.0.1:5000", "robot"), "", 1);
        let (r, (rendered, _)) = run(&fewer);
        assert_eq!((r.connectors.len(), rendered), (50, 0));
    }

    /// The filter's validator, run per connector: a connector it refuses is left out with the
    /// filter's field path, the others are served.
    #[test]
    fn a_connector_the_filter_refuses_is_left_out_with_the_filters_path() {
        let yaml = [
            connector("good", "http://127.0.0.1:5000", "robot"),
            connector("bad", "http://127.0.0.1:5000", "robot").replace(
                "connectorClassName: oci\n",
                "connectorClassName: oci\n  allowedServiceAccounts: [nobody]\n",
            ),
            secret("robot", "pw"),
        ]
        .concat();
        let r = render_live(
            &inputs(&yaml, Authorization::Rules),
            &channel(),
            &Revisions::new(),
            &local(),
        )
        .unwrap();
        assert_eq!(r.connectors.len(), 1, "{:#?}", r.left_out);
        let w = why(&r, "demo", "bad");
        assert!(
            w.contains("m.yaml document 1: filter configuration connectors[0].allowedServiceAccounts[0]"),
            "{w}"
        );
    }

    #[test]
    fn the_revision_follows_the_credential_and_the_key() {
        let run = |pw: &str, key: u8| {
            let yaml = [connector("good", "http://127.0.0.1:5000", "robot"), secret("robot", pw)].concat();
            let r = render_live(
                &inputs(&yaml, Authorization::Controller),
                &channel(),
                &Revisions::with_key([key; 32]),
                &local(),
            )
            .unwrap();
            match &r.filter_config.connectors[0].credential {
                CredentialRef::FromController { revision } => revision.clone(),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(run("one", 1), run("one", 1), "stable for the same credential");
        assert_ne!(
            run("one", 1),
            run("two", 1),
            "a rotated Secret changes the configuration"
        );
        assert_ne!(run("one", 1), run("one", 2), "a restarted controller changes it too");
    }

    #[test]
    fn no_connectors_is_a_valid_configuration_and_a_bad_identity_refuses_the_whole() {
        let r = render_live(
            &inputs("", Authorization::Rules),
            &channel(),
            &Revisions::new(),
            &local(),
        )
        .unwrap();
        assert!(r.connectors.is_empty());
        assert_eq!(r.filter_config.connectors, vec![]);
        let mut i = inputs(
            &[
                connector("good", "http://127.0.0.1:5000", "robot"),
                secret("robot", "x"),
            ]
            .concat(),
            Authorization::Rules,
        );
        i.identity = json!({"issuers": []});
        let problems = render_live(&i, &channel(), &Revisions::new(), &local()).unwrap_err();
        assert!(problems.iter().any(|p| p.path.contains("identity")), "{problems:?}");
    }
}
