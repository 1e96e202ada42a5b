//! Owns the upstream side of Istio mode (`--istio-wasmplugin`): istiod, not the controller's xDS
//! server, builds the gateway Envoy's clusters, and it builds them only from Services and
//! ServiceEntries, named `outbound|<port>||<host>`. So in Istio mode:
//!
//! - [`with_outbound_names`] renames every upstream and token-realm cluster of a rendering to
//!   the name Istio gives it (the filter routes each request to the cluster its configuration
//!   names). Istio names a cluster by host and port only, so an `http` and an `https` origin
//!   on one host and port cannot both be served: the newer connector is left out, with why.
//! - [`run`] keeps one `ServiceEntry` (MESH_EXTERNAL, the host's ports, `STATIC`: a name's
//!   endpoints are the addresses module `pin` admitted, so no upstream name is resolved by the
//!   gateway's Envoy) and, for hosts reached
//!   over TLS, one `DestinationRule` (TLS origination: `SIMPLE`, SNI and subjectAltNames = the
//!   host, so the upstream's certificate must name it; `caCertificates` the bundle of
//!   `--upstream-ca`, which Envoy's clusters trust outside Istio) per upstream host, in the WasmPlugin's namespace, visible to that
//!   namespace only (`exportTo: ["."]`: other workloads' routing is not touched). Written by
//!   server-side apply under [`FIELD_MANAGER`] only when they differ, labelled as the
//!   controller's ([`MANAGED_BY`], [`PLUGIN_LABEL`]), and deleted when no connector needs them.
//!   The list is re-read every [`RESYNC`], so a hand edit or deletion is put right.
//!
//! What Istio mode's `ProxyReady` means is the WasmPlugin's business (`wasmplugin`): this
//! module reports which configuration version its objects carry ([`Progress`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::hub::{ConnectorKey, Hub};
use crate::manifests::Problem;
use crate::pin::PinMap;
use crate::pipeline::Rendering;
use crate::render::UpstreamCluster;
use crate::xds::Snapshot;

/// The field manager of the ServiceEntries and DestinationRules.
pub const FIELD_MANAGER: &str = "connector-controller-istio-upstreams";
/// `app.kubernetes.io/managed-by` on every object this module writes.
pub const MANAGED_BY: &str = "oci-connector-controller";
/// Names the WasmPlugin whose connectors need the object: two gateways' controllers in one
/// namespace each keep (and delete) only their own.
pub const PLUGIN_LABEL: &str = "connectors.alauda.io/wasmplugin";
/// How often the objects are re-read even when the configuration did not change.
pub const RESYNC: Duration = Duration::from_secs(30);
const GROUP: &str = "networking.istio.io";
const VERSION: &str = "v1";

/// The cluster Istio builds for `port` of the ServiceEntry for `host` (`model.BuildSubsetKey`).
pub fn outbound_name(host: &str, port: u16) -> String {
    format!("outbound|{port}||{}", service_host(host))
}

/// The ServiceEntry host for an upstream host. Istio refuses an IP address as a host (`domain
/// name "0.0.1" invalid (top level domain "1" cannot be all-numeric)`, istioctl validate), so
/// an address gets a name under `.invalid` (RFC 6761: never resolved), and its ServiceEntry
/// `STATIC` resolution with the address as its one endpoint: the name only keys the cluster.
pub fn service_host(host: &str) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => format!("{}.ipv4.oci-connector.invalid", v4.to_string().replace('.', "-")),
        Ok(std::net::IpAddr::V6(v6)) => {
            let segments: Vec<String> = v6.segments().iter().map(|s| format!("{s:x}")).collect();
            format!("{}.ipv6.oci-connector.invalid", segments.join("-"))
        }
        Err(_) => host.to_string(),
    }
}

/// [`with_outbound_names`] on the live renderer's output. It works on the whole rendering,
/// copied out: an Istio gateway's controller pays a full copy per change (the scale work of
/// issue 17 is on the xDS path).
pub fn renamed_output(live: &crate::live::LiveRender, out: crate::live::LiveOutput) -> crate::live::LiveOutput {
    let (newly_left_out, rendered, settled) = (out.newly_left_out.clone(), out.rendered, out.settled);
    let r = with_outbound_names(Rendering::from_live(live, out));
    crate::live::LiveOutput {
        // It cannot fail: every map key is a string.
        config_json: std::sync::Arc::new(crate::document::Document::from_text(
            serde_json::to_string(&r.filter_config).unwrap_or_default(),
        )),
        // Inline: `--config-parts` is refused with `--istio-wasmplugin` (main.rs).
        parts: Default::default(),
        credentials: r
            .credentials
            .iter()
            .filter_map(|(k, c)| Some((k.clone(), (c.clone(), r.revisions.get(k)?.clone()))))
            .collect(),
        clusters: std::sync::Arc::new(r.clusters),
        connectors: r.connectors.into_iter().map(|k| (k, ())).collect(),
        left_out: r.left_out.into_iter().collect(),
        newly_left_out,
        rendered,
        settled,
    }
}

/// `r` with every cluster named as Istio names it. Connectors in `filter_config` are in
/// render order (oldest first), so the older of two conflicting connectors keeps serving.
pub fn with_outbound_names(mut r: Rendering) -> Rendering {
    let by_name: BTreeMap<String, UpstreamCluster> = r.clusters.iter().map(|c| (c.name.clone(), c.clone())).collect();
    let mut taken: BTreeMap<String, UpstreamCluster> = BTreeMap::new();
    let mut kept = vec![];
    for mut entry in std::mem::take(&mut r.filter_config.connectors) {
        let key: ConnectorKey = (entry.namespace.clone(), entry.name.clone());
        let mut mine = vec![];
        let mut problems = vec![];
        let mut rename = |slot: &mut String, path: String| {
            let Some(c) = by_name.get(slot.as_str()) else {
                return;
            };
            let mut renamed = c.clone();
            renamed.name = outbound_name(&c.host, c.port);
            let other = taken
                .get(&renamed.name)
                .or_else(|| mine.iter().find(|m: &&UpstreamCluster| m.name == renamed.name));
            match other {
                Some(other) if other.tls != renamed.tls => problems.push(Problem::new(
                    format!("Connector {}/{}", key.0, key.1),
                    path,
                    format!(
                        "Istio names a cluster by host and port only ({}), and another connector already reaches {}:{} over {}: one host and port can be served over http or https, not both",
                        renamed.name,
                        c.host,
                        c.port,
                        if other.tls { "https" } else { "http" }
                    ),
                )),
                _ => {}
            }
            slot.clone_from(&renamed.name);
            mine.push(renamed);
        };
        rename(&mut entry.cluster, "spec.address".into());
        for (i, realm) in entry.token_realms.iter_mut().enumerate() {
            rename(&mut realm.cluster, format!("spec.tokenRealms[{i}].url"));
        }
        if problems.is_empty() {
            for c in mine {
                taken.insert(c.name.clone(), c);
            }
            kept.push(entry);
        } else {
            r.connectors.remove(&key);
            r.credentials.remove(&key);
            r.left_out.insert(key, problems);
        }
    }
    r.filter_config.connectors = kept;
    r.clusters = taken.into_values().collect();
    r
}

/// The objects for `clusters`: `(kind, name, object)`, one ServiceEntry per host and one
/// DestinationRule per host with a TLS port, sorted by name. Every ServiceEntry is `STATIC`:
/// a host name's endpoints are the addresses `pins` admits on each of its ports (module `pin`;
/// none, or a name not pinned: no endpoint), so the gateway's Envoy resolves no upstream name.
pub fn objects(
    clusters: &[UpstreamCluster],
    namespace: &str,
    plugin: &str,
    ca_bundle: &str,
    pins: &PinMap,
) -> Vec<(&'static str, String, Value)> {
    let mut hosts: BTreeMap<&str, Vec<&UpstreamCluster>> = BTreeMap::new();
    for c in clusters {
        hosts.entry(c.host.as_str()).or_default().push(c);
    }
    let mut out = vec![];
    for (address, mut ports) in hosts {
        ports.sort_by_key(|c| c.port);
        let host = service_host(address);
        let name = object_name(&host);
        let metadata = json!({
            "name": name,
            "namespace": namespace,
            "labels": { "app.kubernetes.io/managed-by": MANAGED_BY, PLUGIN_LABEL: plugin },
        });
        let is_ip = address.parse::<std::net::IpAddr>().is_ok();
        let mut se = json!({
            "hosts": [host],
            "location": "MESH_EXTERNAL",
            // An address is the endpoint itself; a name's are the controller's pins.
            "resolution": "STATIC",
            "exportTo": ["."],
            "ports": ports.iter().map(|c| {
                let proto = if c.tls { "HTTPS" } else { "HTTP" };
                json!({ "number": c.port, "name": format!("{}-{}", proto.to_ascii_lowercase(), c.port), "protocol": proto })
            }).collect::<Vec<_>>(),
        });
        if is_ip {
            se["endpoints"] = json!([{ "address": address }]);
        } else {
            // One ServiceEntry serves all the host's ports: an address admitted on each of them.
            let mut admitted: Option<Vec<std::net::IpAddr>> = None;
            for c in &ports {
                let on_port = crate::pin::pin_of(pins, c)
                    .map(|p| p.addresses.clone())
                    .unwrap_or_default();
                admitted = Some(match admitted {
                    None => on_port,
                    Some(a) => a.into_iter().filter(|ip| on_port.contains(ip)).collect(),
                });
            }
            let endpoints: Vec<Value> = admitted
                .unwrap_or_default()
                .iter()
                .map(|ip| json!({ "address": ip.to_string() }))
                .collect();
            if !endpoints.is_empty() {
                se["endpoints"] = json!(endpoints);
            }
        }
        out.push((
            "ServiceEntry",
            name.clone(),
            json!({ "apiVersion": format!("{GROUP}/{VERSION}"), "kind": "ServiceEntry", "metadata": metadata, "spec": se }),
        ));
        let tls: Vec<Value> = ports
            .iter()
            .filter(|c| c.tls)
            .map(|c| {
                // The certificate must name the upstream as the connector wrote it (its address,
                // for an IP upstream); SNI carries names only.
                let mut t = json!({ "mode": "SIMPLE", "subjectAltNames": [address], "caCertificates": ca_bundle });
                if let Some(sni) = &c.sni {
                    t["sni"] = json!(sni);
                }
                json!({ "port": { "number": c.port }, "tls": t })
            })
            .collect();
        if !tls.is_empty() {
            out.push((
                "DestinationRule",
                name.clone(),
                json!({ "apiVersion": format!("{GROUP}/{VERSION}"), "kind": "DestinationRule", "metadata": metadata,
                    "spec": { "host": host, "exportTo": ["."], "trafficPolicy": { "portLevelSettings": tls } } }),
            ));
        }
    }
    out
}

/// `connector-upstream-<host, readable part>-<digest of the host>`: a DNS label, unique per host.
fn object_name(host: &str) -> String {
    let digest: String = Sha256::digest(host.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let readable: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(32)
        .collect();
    format!("connector-upstream-{}-{digest}", readable.trim_matches('-'))
}

/// Which configuration version the WasmPlugin and the upstream objects carry, as observed on
/// the API server; the lower of the two goes to the hub (`ProxyState::plugin_config`), where
/// `ProxyReady` reads it.
pub struct Progress {
    hub: Hub,
    seen: Mutex<(Option<u64>, Option<u64>)>,
}

impl Progress {
    /// Also switches the hub's `ProxyReady` to Istio mode's meaning.
    pub fn new(hub: Hub) -> Arc<Self> {
        hub.set_proxy(|p| p.plugin_config = Some(None));
        Arc::new(Self {
            hub,
            seen: Mutex::new((None, None)),
        })
    }

    pub fn plugin_config(&self, version: u64) {
        self.set(|s| s.0 = Some(version));
    }

    /// The API server refused to store configuration `version` in the WasmPlugin (too large).
    pub fn plugin_refused(&self, version: u64, why: String) {
        self.hub.set_proxy(|p| p.plugin_refused = Some((version, why)));
    }

    /// Counts one write of the WasmPlugin by result (`written`, `too_large`, `failed`).
    pub fn plugin_write(&self, result: &str) {
        crate::ops::Metrics::result(&self.hub.metrics.wasmplugin_writes, result);
    }

    pub fn upstreams(&self, version: u64) {
        self.set(|s| s.1 = Some(version));
    }

    fn set(&self, f: impl FnOnce(&mut (Option<u64>, Option<u64>))) {
        let (plugin, both) = {
            let mut s = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut s);
            match *s {
                (Some(a), Some(b)) => (Some(a), Some(a.min(b))),
                (a, _) => (a, None),
            }
        };
        // One update: a refusal ends once the WasmPlugin holds that version or a later one.
        self.hub.set_proxy(|p| {
            p.plugin_config = Some(both);
            if p.plugin_refused
                .as_ref()
                .is_some_and(|(v, _)| plugin.is_some_and(|w| *v <= w))
            {
                p.plugin_refused = None;
            }
        });
    }
}

/// Istio mode's `ProxyReady` for a connector in configuration version `p.version`, given the
/// version the WasmPlugin and the upstream objects were last seen to carry. It says what the
/// controller observed on the API server, no more: whether istiod delivered it to the
/// gateway's Envoy (and Envoy loaded it) the controller cannot see, and the message says so.
/// A version the API server refused to store as too large (`refused`) is
/// `PluginConfigTooLarge`, with the writer's message, until a later one is written.
pub fn proxy_ready(
    p: &crate::hub::Published,
    written: Option<u64>,
    refused: Option<&(u64, String)>,
) -> (bool, &'static str, String) {
    if let Some((version, why)) = refused
        && *version >= p.version
        && written.is_none_or(|w| w < p.version)
    {
        return (false, "PluginConfigTooLarge", why.clone());
    }
    match written {
        Some(v) if v >= p.version => (
            true,
            "PluginConfigWritten",
            format!(
                "the WasmPlugin and the upstream ServiceEntries/DestinationRules carry configuration version {v} (seen on the API server); istiod delivers it to the gateway, which this controller does not observe"
            ),
        ),
        _ => (
            false,
            "PluginConfigPending",
            format!(
                "configuration version {} is not yet seen in the WasmPlugin and the upstream ServiceEntries/DestinationRules (the controller's log says why)",
                p.version
            ),
        ),
    }
}

/// Where the objects go, and what they trust.
#[derive(Clone)]
pub struct Upstreams {
    pub client: kube::Client,
    pub namespace: String,
    /// The WasmPlugin's name ([`PLUGIN_LABEL`]).
    pub plugin: String,
    /// `caCertificates` of the DestinationRules (`--upstream-ca`: a PEM file as the gateway's
    /// Envoy sees it). Always set: without it Istio trusts its own idea of system roots, and
    /// `istioctl analyze` warns (IST0129) that nothing validates the server.
    pub ca_bundle: String,
}

/// The clusters the upstream objects are written for: the latest snapshot's, and those of the
/// configuration the WasmPlugin holds (`held`, from `wasmplugin`) that the latest does not
/// name. While the latest configuration is not in the WasmPlugin (refused as too large, or not
/// yet written) the gateway still routes by the held one, so its upstreams stay reachable:
/// make-before-break, as for the credentials. A host and port in both is written as the latest
/// has it (Istio builds one cluster per host and port).
pub fn wanted_clusters(latest: &[UpstreamCluster], held: Option<&[UpstreamCluster]>) -> Vec<UpstreamCluster> {
    let mut out = latest.to_vec();
    let named: BTreeSet<(&str, u16)> = latest.iter().map(|c| (c.host.as_str(), c.port)).collect();
    for c in held.unwrap_or_default() {
        if !named.contains(&(c.host.as_str(), c.port)) {
            out.push(c.clone());
        }
    }
    out
}

/// Keeps the ServiceEntries and DestinationRules equal to what the latest snapshot's clusters
/// and the WasmPlugin's held ones need ([`wanted_clusters`]) until `snapshots` closes. Errors
/// are logged and retried with back-off.
pub async fn run(
    target: Upstreams,
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    mut held: watch::Receiver<Option<Arc<Vec<UpstreamCluster>>>>,
    mut pins: watch::Receiver<Arc<PinMap>>,
    progress: Arc<Progress>,
) {
    let api = |kind: &str| -> Api<DynamicObject> {
        let r = ApiResource::from_gvk(&GroupVersionKind::gvk(GROUP, VERSION, kind));
        Api::namespaced_with(target.client.clone(), &target.namespace, &r)
    };
    let (entries, rules) = (api("ServiceEntry"), api("DestinationRule"));
    let mut backoff = Duration::from_millis(500);
    // A write's wait for new names' pins (`xds::PIN_WAIT`, as outside Istio).
    let mut pin_wait = crate::pin::PinWait::default();
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let kept = held.borrow_and_update().clone();
        let pinned = pins.borrow_and_update().clone();
        // A host name of the latest snapshot not looked up yet: written once it is, or after
        // `PIN_WAIT` with no endpoint (one tenant's slow name holds no other change up longer).
        let unpinned = snapshot.as_ref().is_some_and(|s| {
            s.clusters
                .iter()
                .any(|c| crate::pin::is_named(c) && crate::pin::pin_of(&pinned, c).is_none())
        });
        let version = snapshot.as_ref().map_or(0, |s| s.version);
        let hold = pin_wait.hold(version, unpinned, tokio::time::Instant::now(), crate::xds::PIN_WAIT);
        let wait = match (&snapshot, hold) {
            (None, _) => RESYNC,
            (Some(_), Some(hold)) => hold,
            (Some(s), None) => {
                let clusters = wanted_clusters(&s.clusters, kept.as_deref().map(Vec::as_slice));
                let want = objects(&clusters, &target.namespace, &target.plugin, &target.ca_bundle, &pinned);
                match sync(&entries, &rules, &want, &target.plugin).await {
                    Ok(changed) => {
                        backoff = Duration::from_millis(500);
                        if changed > 0 {
                            tracing::info!(namespace = %target.namespace, objects = want.len(), changed, "Istio ServiceEntries/DestinationRules written");
                        }
                        progress.upstreams(s.version);
                        RESYNC
                    }
                    Err(e) => {
                        tracing::warn!(namespace = %target.namespace, error = %e, ?backoff, "writing the upstreams' ServiceEntries/DestinationRules failed; retrying");
                        let b = backoff;
                        backoff = (backoff * 2).min(RESYNC);
                        b
                    }
                }
            }
        };
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            // The WasmPlugin's task ended: so does the controller.
            changed = held.changed() => if changed.is_err() { return },
            changed = pins.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One pass: applies what differs, deletes what is no longer wanted. The number of writes.
async fn sync(
    entries: &Api<DynamicObject>,
    rules: &Api<DynamicObject>,
    want: &[(&'static str, String, Value)],
    plugin: &str,
) -> Result<usize, kube::Error> {
    let selector = format!("app.kubernetes.io/managed-by={MANAGED_BY},{PLUGIN_LABEL}={plugin}");
    let mut writes = 0;
    for (kind, api) in [("ServiceEntry", entries), ("DestinationRule", rules)] {
        let existing = api.list(&ListParams::default().labels(&selector)).await?;
        let have: BTreeMap<String, &DynamicObject> = existing
            .items
            .iter()
            .filter_map(|o| Some((o.metadata.name.clone()?, o)))
            .collect();
        let mut wanted = BTreeSet::new();
        for (_, name, object) in want.iter().filter(|(k, ..)| *k == kind) {
            wanted.insert(name.clone());
            if have.get(name).is_some_and(|o| o.data["spec"] == object["spec"]) {
                continue;
            }
            api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object))
                .await?;
            writes += 1;
        }
        for name in have.keys().filter(|n| !wanted.contains(*n)) {
            match api.delete(name, &DeleteParams::default()).await {
                Ok(_) => writes += 1,
                // Another replica was first.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(writes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::cluster_for;
    use connector_core::address::Upstream;
    use connector_core::config::{ConnectorEntry, FilterConfig, RealmEntry};
    use std::collections::{BTreeSet, HashMap};

    fn cl(address: &str) -> UpstreamCluster {
        cluster_for(&Upstream::parse(address).unwrap())
    }

    fn rendering(connectors: &[(&str, &str, &[&str])]) -> Rendering {
        let mut clusters = BTreeMap::new();
        let mut entries = vec![];
        for (name, address, realms) in connectors {
            let c = cl(address);
            clusters.insert(c.name.clone(), c.clone());
            let token_realms = realms
                .iter()
                .map(|r| {
                    let rc = cl(r);
                    clusters.insert(rc.name.clone(), rc.clone());
                    RealmEntry {
                        url: format!("{r}/token"),
                        cluster: rc.name,
                    }
                })
                .collect();
            entries.push(ConnectorEntry {
                namespace: "demo".into(),
                name: name.to_string(),
                cluster: c.name,
                token_realms,
                ..ConnectorEntry::default()
            });
        }
        Rendering {
            filter_config: FilterConfig {
                connectors: entries,
                ..FilterConfig::default()
            },
            clusters: clusters.into_values().collect(),
            credentials: HashMap::new(),
            revisions: HashMap::new(),
            connectors: connectors
                .iter()
                .map(|(n, ..)| ("demo".to_string(), n.to_string()))
                .collect::<BTreeSet<_>>(),
            left_out: BTreeMap::new(),
        }
    }

    #[test]
    fn clusters_are_named_as_istio_names_them() {
        let r = with_outbound_names(rendering(&[
            ("a", "https://Harbor.Example.com", &["https://auth.example.com"]),
            ("b", "https://harbor.example.com:443", &[]),
            ("c", "http://127.0.0.1:5000", &[]),
        ]));
        let c = &r.filter_config.connectors;
        assert_eq!(c[0].cluster, "outbound|443||harbor.example.com");
        assert_eq!(c[0].token_realms[0].cluster, "outbound|443||auth.example.com");
        assert_eq!(c[1].cluster, c[0].cluster);
        assert_eq!(c[2].cluster, "outbound|5000||127-0-0-1.ipv4.oci-connector.invalid");
        // No key appears that was not there (the filter refuses `"tokenRealms": null`).
        let json = serde_json::to_value(&c[1]).unwrap();
        assert!(json.get("tokenRealms").is_none(), "{json}");
        let names: Vec<&str> = r.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "outbound|443||auth.example.com",
                "outbound|443||harbor.example.com",
                "outbound|5000||127-0-0-1.ipv4.oci-connector.invalid"
            ]
        );
        assert!(r.left_out.is_empty());
    }

    #[test]
    fn http_and_https_on_one_host_and_port_leave_out_the_newer() {
        let r = with_outbound_names(rendering(&[
            ("old", "https://r.example:8443", &[]),
            ("new", "http://r.example:8443", &[]),
            ("realm", "https://s.example", &["http://r.example:8443"]),
        ]));
        let names: Vec<&str> = r.filter_config.connectors.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["old"]);
        for n in ["new", "realm"] {
            let why = &r.left_out[&("demo".to_string(), n.to_string())][0];
            assert!(why.message.contains("outbound|8443||r.example"), "{why}");
            assert!(!r.connectors.contains(&("demo".to_string(), n.to_string())));
        }
        // The left-out connectors' clusters are not built (s.example was only the realm one's).
        assert_eq!(r.clusters.len(), 1);
    }

    #[test]
    fn the_upstreams_of_the_configuration_the_wasmplugin_holds_stay_until_it_is_replaced() {
        let hosts = |cs: &[UpstreamCluster]| -> Vec<(String, u16, bool)> {
            let mut v: Vec<_> = cs.iter().map(|c| (c.host.clone(), c.port, c.tls)).collect();
            v.sort();
            v
        };
        // The held configuration reached old.example.com and an http port of shared.example.com;
        // the latest moved a connector to new.example.com and the port to https.
        let held = [cl("https://old.example.com"), cl("http://shared.example.com:5000")];
        let latest = [cl("https://new.example.com"), cl("https://shared.example.com:5000")];
        let want = wanted_clusters(&latest, Some(&held));
        assert_eq!(
            hosts(&want),
            vec![
                ("new.example.com".to_string(), 443, true),
                ("old.example.com".to_string(), 443, true),
                // One cluster per host and port: as the latest has it.
                ("shared.example.com".to_string(), 5000, true),
            ]
        );
        // One ServiceEntry per host, each port once: objects() takes the union as it is.
        let objs = objects(&want, "ns", "plugin", "ca", &PinMap::new());
        let shared = objs
            .iter()
            .find(|(k, _, o)| *k == "ServiceEntry" && o["spec"]["hosts"][0] == "shared.example.com")
            .unwrap();
        assert_eq!(shared.2["spec"]["ports"].as_array().map(Vec::len), Some(1));
        // Once the WasmPlugin holds the latest (or holds nothing known), only the latest's.
        assert_eq!(hosts(&wanted_clusters(&latest, Some(&latest))), hosts(&latest));
        assert_eq!(hosts(&wanted_clusters(&latest, None)), hosts(&latest));
    }

    #[test]
    fn objects_per_host_with_verified_tls() {
        let clusters: Vec<UpstreamCluster> = [
            "https://harbor.example.com",
            "http://harbor.example.com:5000",
            "https://10.0.0.1:8443",
            "http://127.0.0.1:5000",
        ]
        .iter()
        .map(|a| {
            let mut c = cl(a);
            c.name = outbound_name(&c.host, c.port);
            c
        })
        .collect();
        const CA: &str = "/etc/ssl/certs/ca-certificates.crt";
        let pin = |ips: &[&str]| crate::pin::Pin {
            addresses: ips.iter().map(|i| i.parse().unwrap()).collect(),
            problem: None,
        };
        let mut pins = PinMap::new();
        // Admitted on both of the host's ports, and one only on 443 (e.g. 5000 is an own port
        // there): the ServiceEntry serves both ports, so only the first is its endpoint.
        pins.insert(("harbor.example.com".into(), 443), pin(&["203.0.113.7", "203.0.113.8"]));
        pins.insert(("harbor.example.com".into(), 5000), pin(&["203.0.113.7"]));
        let objs = objects(&clusters, "oci-connector-system", "oci-connector", CA, &pins);
        let find = |kind: &str, host: &str| {
            objs.iter()
                .find(|(k, _, o)| *k == kind && (o["spec"]["hosts"][0] == host || o["spec"]["host"] == host))
                .map(|(_, _, o)| o.clone())
        };
        let se = find("ServiceEntry", "harbor.example.com").unwrap();
        assert_eq!(se["spec"]["location"], "MESH_EXTERNAL");
        // The gateway's Envoy resolves no name: the controller's pins are the endpoints.
        assert_eq!(se["spec"]["resolution"], "STATIC");
        assert_eq!(se["spec"]["endpoints"], json!([{"address": "203.0.113.7"}]));
        assert_eq!(se["spec"]["exportTo"], json!(["."]));
        // Nothing admitted (or not pinned): no endpoint, never the name.
        let unpinned = objects(&clusters, "ns", "p", CA, &PinMap::new());
        let se0 = unpinned
            .iter()
            .find(|(k, _, o)| *k == "ServiceEntry" && o["spec"]["hosts"][0] == "harbor.example.com")
            .unwrap();
        assert_eq!(se0.2["spec"]["resolution"], "STATIC");
        assert!(se0.2["spec"]["endpoints"].is_null(), "{}", se0.2);
        assert_eq!(
            se["spec"]["ports"],
            json!([{"number": 443, "name": "https-443", "protocol": "HTTPS"},
                {"number": 5000, "name": "http-5000", "protocol": "HTTP"}])
        );
        assert_eq!(se["metadata"]["labels"]["app.kubernetes.io/managed-by"], MANAGED_BY);
        let dr = find("DestinationRule", "harbor.example.com").unwrap();
        // TLS only on the https port, verified against the host name.
        assert_eq!(
            dr["spec"]["trafficPolicy"]["portLevelSettings"],
            json!([{"port": {"number": 443}, "tls": {"mode": "SIMPLE", "sni": "harbor.example.com",
                "subjectAltNames": ["harbor.example.com"], "caCertificates": CA}}])
        );
        // An address is no ServiceEntry host: a name that is never resolved, the address its endpoint.
        let ip = find("ServiceEntry", "10-0-0-1.ipv4.oci-connector.invalid").unwrap();
        assert_eq!(ip["spec"]["resolution"], "STATIC");
        assert_eq!(ip["spec"]["endpoints"], json!([{"address": "10.0.0.1"}]));
        // An address: no SNI (names only), the certificate must carry the IP.
        let dr = find("DestinationRule", "10-0-0-1.ipv4.oci-connector.invalid").unwrap();
        assert_eq!(
            dr["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"],
            json!({"mode": "SIMPLE", "subjectAltNames": ["10.0.0.1"], "caCertificates": CA})
        );
        assert_eq!(service_host("::1"), "0-0-0-0-0-0-0-1.ipv6.oci-connector.invalid");
        // Plain http only: a ServiceEntry, no DestinationRule.
        let local = "127-0-0-1.ipv4.oci-connector.invalid";
        assert!(find("ServiceEntry", local).is_some());
        assert!(find("DestinationRule", local).is_none());
        // A custom CA bundle goes into every TLS setting.
        let with_ca = objects(&clusters, "ns", "p", "/etc/upstream-ca/ca.crt", &pins);
        assert!(with_ca.iter().filter(|(k, ..)| *k == "DestinationRule").all(
            |(_, _, o)| o["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"]["caCertificates"]
                == "/etc/upstream-ca/ca.crt"
        ));
        // Names are DNS labels, one per host.
        let names: BTreeSet<&str> = objs.iter().map(|(_, n, _)| n.as_str()).collect();
        assert_eq!(names.len(), 3);
        for n in names {
            assert!(
                n.len() <= 63
                    && n.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{n}"
            );
        }
    }
}
