//! Owns the seam between where the desired state comes from (file mode's directory, or the
//! Kubernetes API) and what consumes it (the xDS server, the loopback credential channel, and
//! status reporting). Sources publish [`Inputs`]; the pipeline publishes what it rendered
//! ([`Published`]); the xDS server publishes what Envoy made of it ([`ProxyState`]).
//!
//! Everything travels through `tokio::sync::watch` channels: a consumer only ever needs the
//! latest value, and a slow consumer must not hold up a source.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::{Notify, watch};

use crate::manifests::{ManifestSet, Problem};
use crate::ops::Metrics;
use crate::proxy_tls::ServingCert;
use crate::sharded::ByNamespace;

/// `(namespace, name)` of a connector.
pub type ConnectorKey = (String, String);

/// How the filter decides who may use a connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Authorization {
    /// The Connector's own lists (`allowedNamespaces`, `allowedServiceAccounts`, its namespace),
    /// evaluated inside the filter. File mode: there is no RBAC to ask.
    #[default]
    Rules,
    /// Kubernetes RBAC: the filter asks the controller, which asks the API server with a
    /// SubjectAccessReview (`get` on the connector, or `connectors/proxy` when strict).
    Controller,
}

/// Desired state, complete: a source publishes only after its caches have synced, so a
/// restarting controller never pushes an empty or partial configuration.
#[derive(Debug)]
pub struct Inputs {
    pub set: ManifestSet,
    /// The filter's `identity` object: `issuers`, `audiences`, `jwks`.
    pub identity: Value,
    pub authorization: Authorization,
}

/// What the pipeline rendered from the latest [`Inputs`] and handed to the xDS server.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// The xDS version of the filter configuration carrying exactly `connectors`.
    pub version: u64,
    /// Connectors in that configuration.
    pub connectors: ByNamespace<()>,
    /// Connectors left out, with why (missing Secret, bad address ...).
    pub left_out: ByNamespace<Vec<Problem>>,
    /// Problems of the input as a whole (an unreadable manifest file, a bad identity): while
    /// there are any, the previous configuration stays in place.
    pub refused: Vec<Problem>,
}

/// What Envoy did with the configurations it was sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyState {
    /// An Envoy has an open ADS stream.
    pub connected: bool,
    /// Highest filter-configuration version Envoy acknowledged.
    pub accepted: Option<u64>,
    /// The latest rejection: the version Envoy refused and its message. Cleared by a later ACK.
    pub rejected: Option<(u64, String)>,
    /// Istio mode (`--istio-wasmplugin`, module `istio`): istiod configures Envoy, so what the
    /// controller can observe is the configuration version its WasmPlugin and upstream
    /// ServiceEntries/DestinationRules carry on the API server: `Some(None)` before any.
    pub plugin_config: Option<Option<u64>>,
    /// Istio mode: the latest configuration version the API server refused to store in the
    /// WasmPlugin as too large, and why. Cleared when a later version is written.
    pub plugin_refused: Option<(u64, String)>,
}

#[derive(Clone)]
pub struct Hub {
    inputs: watch::Sender<Option<Arc<Inputs>>>,
    published: watch::Sender<Option<Arc<Published>>>,
    proxy: watch::Sender<ProxyState>,
    /// Per open ADS stream (by stream id): the highest filter-configuration version that Envoy
    /// acknowledged on it, `None` until its first ACK. What the credential table retires by.
    filter_acked: watch::Sender<BTreeMap<u64, Option<u64>>>,
    /// The proxy listener's serving certificate and its generation (SDS version); `None`
    /// until a source delivered one, and always `None` for a plain-HTTP (legacy) proxy.
    proxy_cert: watch::Sender<Option<(u64, Arc<ServingCert>)>>,
    /// Poked by the credential channel when the filter saw a token with an unknown `kid`.
    pub unknown_kid: Arc<Notify>,
    pub metrics: Arc<Metrics>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        Self {
            inputs: watch::channel(None).0,
            published: watch::channel(None).0,
            proxy: watch::channel(ProxyState::default()).0,
            filter_acked: watch::channel(BTreeMap::new()).0,
            proxy_cert: watch::channel(None).0,
            unknown_kid: Arc::new(Notify::new()),
            metrics: Arc::new(Metrics::default()),
        }
    }

    pub fn publish_inputs(&self, inputs: Inputs) {
        self.inputs.send_replace(Some(Arc::new(inputs)));
    }

    pub fn inputs(&self) -> watch::Receiver<Option<Arc<Inputs>>> {
        self.inputs.subscribe()
    }

    pub fn publish_rendered(&self, published: Published) {
        self.published.send_replace(Some(Arc::new(published)));
    }

    pub fn published(&self) -> watch::Receiver<Option<Arc<Published>>> {
        self.published.subscribe()
    }

    pub fn set_proxy(&self, f: impl FnOnce(&mut ProxyState)) {
        self.proxy.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            *s != before
        });
    }

    pub fn proxy(&self) -> watch::Receiver<ProxyState> {
        self.proxy.subscribe()
    }

    /// Records a stream's filter-configuration ACK (`Some`), its opening (`None` acknowledged
    /// yet), or with `closed` its end.
    pub fn set_filter_acked(&self, stream: u64, acked: Option<u64>, closed: bool) {
        self.filter_acked.send_modify(|m| {
            if closed {
                m.remove(&stream);
            } else {
                m.insert(stream, acked);
            }
        });
    }

    pub fn filter_acked(&self) -> watch::Receiver<BTreeMap<u64, Option<u64>>> {
        self.filter_acked.subscribe()
    }

    /// Publishes a serving certificate; `false` (nothing sent) when it is the one in force.
    pub fn publish_proxy_cert(&self, cert: ServingCert) -> bool {
        self.proxy_cert.send_if_modified(|c| {
            if c.as_ref().is_some_and(|(_, old)| **old == cert) {
                return false;
            }
            let generation = c.as_ref().map_or(1, |(g, _)| g + 1);
            *c = Some((generation, Arc::new(cert)));
            true
        })
    }

    pub fn proxy_cert(&self) -> watch::Receiver<Option<(u64, Arc<ServingCert>)>> {
        self.proxy_cert.subscribe()
    }
}

/// The lowest filter-configuration version every connected Envoy acknowledged: `None` when no
/// Envoy is connected or one has acknowledged nothing yet (it may run any older one).
pub fn acked_floor(acked: &BTreeMap<u64, Option<u64>>) -> Option<u64> {
    if acked.is_empty() {
        return None;
    }
    acked.values().try_fold(u64::MAX, |floor, v| v.map(|v| floor.min(v)))
}

/// The `ProxyReady` condition of one connector: `(status, reason, message)`.
pub fn proxy_ready(
    key: &ConnectorKey,
    published: Option<&Published>,
    proxy: &ProxyState,
) -> (bool, &'static str, String) {
    let Some(p) = published else {
        return (
            false,
            "NotRendered",
            "the controller has not rendered a configuration yet".into(),
        );
    };
    if let Some(problems) = p.left_out.get(&key.0, &key.1) {
        let why: Vec<String> = problems.iter().map(ToString::to_string).collect();
        return (
            false,
            "NotConfigured",
            format!("left out of the proxy configuration: {}", why.join("; ")),
        );
    }
    if !p.connectors.contains(&key.0, &key.1) {
        return (false, "NotConfigured", "not in the proxy configuration yet".into());
    }
    if let Some(written) = proxy.plugin_config {
        return crate::istio::proxy_ready(p, written, proxy.plugin_refused.as_ref());
    }
    if let Some((version, message)) = &proxy.rejected
        && *version >= p.version
    {
        return (
            false,
            "Rejected",
            format!("Envoy rejected configuration version {version}: {message}"),
        );
    }
    match proxy.accepted {
        Some(v) if v >= p.version => (true, "Accepted", format!("Envoy accepted configuration version {v}")),
        _ if !proxy.connected => (
            false,
            "ProxyDisconnected",
            "no Envoy is connected to the controller's xDS server".into(),
        ),
        _ => (
            false,
            "Pending",
            format!(
                "configuration version {} sent, Envoy has not acknowledged it yet",
                p.version
            ),
        ),
    }
}
