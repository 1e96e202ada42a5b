//! Owns the controller's operational surface: Prometheus metrics, `/healthz`, `/readyz` and
//! `/metrics`. Labels carry connector names and reasons, never a credential.

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// `clusters`, `filter` (ECDS) or `proxy-tls` (SDS).
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// Every metric the controller exports. Cheap to clone handles; register once.
#[derive(Default)]
pub struct Metrics {
    pub reconciles: Counter,
    pub reconcile_errors: Family<ReasonLabel, Counter>,
    pub connectors_ready: Gauge,
    pub connectors_configured: Gauge,
    /// Size of the latest filter configuration rendered: what each change sends (ECDS), or
    /// what the WasmPlugin must hold (Istio mode, where etcd's request limit caps it).
    pub filter_config_bytes: Gauge,
    /// Istio mode: writes of the WasmPlugin's pluginConfig by result (`written`, `too_large`,
    /// `failed`).
    pub wasmplugin_writes: Family<ResultLabel, Counter>,
    pub renders: Family<ResultLabel, Counter>,
    pub xds_pushes: Family<TypeLabel, Counter>,
    pub xds_nacks: Family<TypeLabel, Counter>,
    pub xds_streams: Gauge,
    pub credential_fetches: Family<ResultLabel, Counter>,
    pub access_reviews: Family<ResultLabel, Counter>,
    pub identity_refreshes: Family<ResultLabel, Counter>,
    /// Loads of the proxy listener's serving certificate, by result (`ok`, `refused`).
    pub proxy_cert_loads: Family<ResultLabel, Counter>,
    /// Upstream host names the controller resolved for Envoy (module `pin`), by `result`:
    /// `pinned` (at least one address admitted) or `none` (refused or never resolved: their
    /// clusters have no endpoint).
    pub upstream_names: Family<ResultLabel, Gauge>,
    /// Set once the source has synced and a configuration was rendered: `/readyz`.
    pub ready: AtomicBool,
    /// The proxy listener speaks TLS and no certificate was loaded yet: not ready, since Envoy
    /// cannot complete a handshake (`/readyz`).
    pub awaiting_proxy_cert: AtomicBool,
}

impl Metrics {
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("connector_controller");
        r.register("reconciles", "Connector reconciliations", self.reconciles.clone());
        r.register(
            "reconcile_errors",
            "Failed reconciliations by reason",
            self.reconcile_errors.clone(),
        );
        r.register(
            "connectors_ready",
            "Connectors whose Ready condition is True",
            self.connectors_ready.clone(),
        );
        r.register(
            "connectors_configured",
            "Connectors in the configuration pushed to Envoy",
            self.connectors_configured.clone(),
        );
        r.register(
            "filter_config_bytes",
            "Bytes of the latest filter configuration rendered (the ECDS resource's, or the WasmPlugin's pluginConfig)",
            self.filter_config_bytes.clone(),
        );
        r.register(
            "wasmplugin_writes",
            "Writes of the WasmPlugin's pluginConfig (Istio mode) by result: written, too_large, failed",
            self.wasmplugin_writes.clone(),
        );
        r.register(
            "renders",
            "Renders of the desired state by result",
            self.renders.clone(),
        );
        r.register(
            "xds_pushes",
            "xDS responses sent to Envoy by resource",
            self.xds_pushes.clone(),
        );
        r.register(
            "xds_nacks",
            "xDS responses Envoy rejected by resource",
            self.xds_nacks.clone(),
        );
        r.register("xds_streams", "Open ADS streams", self.xds_streams.clone());
        r.register(
            "credential_fetches",
            "Upstream credentials handed to the filter over the loopback channel, by result",
            self.credential_fetches.clone(),
        );
        r.register(
            "access_reviews",
            "Authorization decisions for the filter by result (SubjectAccessReview, cached)",
            self.access_reviews.clone(),
        );
        r.register(
            "identity_refreshes",
            "Reads of the cluster's ServiceAccount issuer and keys, by result",
            self.identity_refreshes.clone(),
        );
        r.register(
            "proxy_cert_loads",
            "Loads of the proxy listener's TLS certificate (Secret or files), by result",
            self.proxy_cert_loads.clone(),
        );
        r.register(
            "upstream_names",
            "Upstream host names resolved by the controller, by result (pinned: an address admitted; none: refused or unresolved, no endpoint)",
            self.upstream_names.clone(),
        );
        r
    }

    pub fn render_text(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail for these metric types.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.awaiting_proxy_cert.load(Ordering::Relaxed)
    }

    /// Whether `/readyz` waits for the proxy listener's certificate.
    pub fn set_awaiting_proxy_cert(&self, awaiting: bool) {
        self.awaiting_proxy_cert.store(awaiting, Ordering::Relaxed);
    }

    pub fn is_awaiting_proxy_cert(&self) -> bool {
        self.awaiting_proxy_cert.load(Ordering::Relaxed)
    }

    pub fn reason(&self, family: &Family<ReasonLabel, Counter>, reason: &str) {
        family.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
    }

    pub fn result(family: &Family<ResultLabel, Counter>, result: &str) {
        family.get_or_create(&ResultLabel { result: result.into() }).inc();
    }

    /// Counts the RBAC authorizer's outcomes in `access_reviews`.
    pub fn review_observer(self: &std::sync::Arc<Self>) -> connector_api::authz::ReviewObserver {
        let metrics = self.clone();
        std::sync::Arc::new(move |outcome| Metrics::result(&metrics.access_reviews, outcome))
    }
}
