//! Owns the xDS server Envoy's bootstrap points at: one aggregated (ADS) gRPC stream per Envoy,
//! state of the world, carrying the upstream clusters (CDS) and the connector filter's
//! configuration (ECDS, a `TypedExtensionConfig` named [`FILTER_CONFIG_NAME`]), and the proxy
//! listener's serving certificate (SDS, see [`crate::proxy_tls`]) when the listener speaks TLS.
//!
//! Every cluster is `STATIC`: an upstream named by host name gets the addresses module `pin`
//! resolved and admitted (the pins' changes push too). A push waits for a new name's first
//! lookup at most [`PIN_WAIT`], then goes with that cluster empty (Envoy answers 503 for it
//! until its pin comes): one tenant's slow names hold no other change up longer than that, a
//! revocation included.
//!
//! Versions and nonces are tracked per stream and resource type. An ACK moves
//! `ProxyState::accepted`; a NACK (a request echoing our nonce with `error_detail`) records the
//! rejection in `ProxyState::rejected` and the `xds_nacks` metric, and nothing is resent: Envoy
//! stays on the last configuration it accepted. Nothing is sent before the first snapshot, so
//! a restarting controller never pushes an empty or partial configuration.
//!
//! Make before break: the filter configuration goes only once Envoy has acknowledged every
//! cluster it names, so a new connector's entry never names a cluster Envoy lacks; and a cluster
//! goes away only after Envoy accepted a filter configuration that no longer names it, so the
//! configuration Envoy runs never loses its clusters. The cluster set sent is the snapshot's plus
//! those of the filter configuration Envoy runs (and of one in flight). A NACK of either stops
//! nothing: the next snapshot is pushed as usual.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AsyncDataSource, BackoffStrategy, DataSource, SocketAddress, TransportSocket, TypedExtensionConfig,
    address, async_data_source, data_source, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, UpstreamTlsContext, common_tls_context,
    subject_alt_name_matcher,
};
use envoy_types::pb::envoy::extensions::wasm::v3::{
    EnvironmentVariables, FailurePolicy, PluginConfig, ReloadConfig, VmConfig, plugin_config,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, StringValue};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::document::Document;
use crate::hub::Hub;
use crate::ops::TypeLabel;
use crate::pin::PinMap;
use crate::proxy_tls::SECRET_TYPE;
use crate::render::{UpstreamCluster, VerifiedName};

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ECDS_TYPE: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
/// The metric label and log name of the listener's certificate (SDS).
const SECRET_LABEL: &str = "proxy-tls";
/// The name Envoy's bootstrap subscribes to in the HTTP filter's `config_discovery`.
pub const FILTER_CONFIG_NAME: &str = "oci-connector";
/// Debian's CA bundle: what https upstreams are validated against unless `--upstream-ca` says otherwise.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What the xDS server serves; replaced as a whole on every render.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub version: u64,
    /// Shared with the renderer while the clusters do not change.
    pub clusters: std::sync::Arc<Vec<UpstreamCluster>>,
    /// The filter configuration JSON (no secrets in it: see `pipeline`).
    pub filter_config: std::sync::Arc<Document>,
}

/// How the Wasm VM is set up (the same for every configuration, so Envoy reuses the VM).
#[derive(Debug, Clone)]
pub struct WasmSettings {
    /// The filter module as Envoy's filesystem sees it.
    pub module_path: String,
    /// Variables of Envoy's process the VM may read (the channel key's name).
    pub host_env_keys: Vec<String>,
}

fn duration(secs: i64) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration {
        seconds: secs,
        nanos: 0,
    }
}

/// Packs a message as the `Any` Envoy's API carries.
fn any<M: prost::Message + prost::Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// The CDS resource for one upstream origin: always `STATIC`, Envoy resolves nothing. An IP
/// literal is its own endpoint; a host name's endpoints are the addresses the controller
/// resolved and admitted (`pinned`, module `pin`: none, and the cluster has no endpoint). For
/// https, TLS with SNI (host names) validated against `ca_bundle` for the name, whatever
/// address it was reached at.
pub fn cluster_resource(c: &UpstreamCluster, ca_bundle: &str, pinned: &[std::net::IpAddr]) -> Cluster {
    let is_ip = !crate::pin::is_named(c);
    let endpoint = |address: String| LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address,
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(c.port))),
                    ..Default::default()
                })),
            }),
            // The name the endpoint stands for (admin pages, access logs).
            hostname: if is_ip { String::new() } else { c.host.clone() },
            ..Default::default()
        })),
        ..Default::default()
    };
    let endpoints: Vec<LbEndpoint> = if is_ip {
        vec![endpoint(c.host.clone())]
    } else {
        pinned.iter().map(|ip| endpoint(ip.to_string())).collect()
    };
    let transport_socket = c.tls.then(|| {
        let tls = UpstreamTlsContext {
            sni: c.sni.clone().unwrap_or_default(),
            common_tls_context: Some(CommonTlsContext {
                validation_context_type: Some(common_tls_context::ValidationContextType::ValidationContext(
                    CertificateValidationContext {
                        trusted_ca: Some(DataSource {
                            specifier: Some(data_source::Specifier::Filename(ca_bundle.into())),
                            ..Default::default()
                        }),
                        // Envoy checks the certificate's name only when told to: without this
                        // any certificate of a trusted CA would do, for any host.
                        match_typed_subject_alt_names: san_matcher(c).into_iter().collect(),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }),
            ..Default::default()
        };
        TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(any(&tls))),
        }
    });
    Cluster {
        name: c.name.clone(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        connect_timeout: Some(duration(5)),
        dns_lookup_family: cluster::DnsLookupFamily::V4Preferred as i32,
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: c.name.clone(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: endpoints,
                ..Default::default()
            }],
            ..Default::default()
        }),
        transport_socket,
        ..Default::default()
    }
}

/// The exact SAN the upstream's certificate must carry (DNS names: RFC 6125 wildcards in the
/// certificate apply), the one [`UpstreamCluster::verified_name`] says.
fn san_matcher(c: &UpstreamCluster) -> Option<SubjectAltNameMatcher> {
    let (san_type, value) = match c.verified_name()? {
        VerifiedName::Dns(v) => (subject_alt_name_matcher::SanType::Dns, v),
        VerifiedName::Ip(v) => (subject_alt_name_matcher::SanType::IpAddress, v),
    };
    Some(SubjectAltNameMatcher {
        san_type: san_type as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact(value)),
            ..Default::default()
        }),
        ..Default::default()
    })
}

pub fn filter_resource(filter_config: &str, wasm: &WasmSettings) -> TypedExtensionConfig {
    let plugin = PluginConfig {
        name: FILTER_CONFIG_NAME.into(),
        root_id: FILTER_CONFIG_NAME.into(),
        vm: Some(plugin_config::Vm::VmConfig(VmConfig {
            vm_id: FILTER_CONFIG_NAME.into(),
            runtime: "envoy.wasm.runtime.v8".into(),
            code: Some(AsyncDataSource {
                specifier: Some(async_data_source::Specifier::Local(DataSource {
                    specifier: Some(data_source::Specifier::Filename(wasm.module_path.clone())),
                    ..Default::default()
                })),
            }),
            environment_variables: Some(EnvironmentVariables {
                host_env_keys: wasm.host_env_keys.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })),
        configuration: Some(any(&StringValue {
            value: filter_config.to_string(),
        })),
        // An auth filter must never fail open. FAIL_RELOAD fails closed too (Envoy's 503, as
        // OCI JSON through the bootstrap's local reply mapper) but only while the VM is down: a
        // trapped VM is replaced after the backoff instead of failing every request until
        // Envoy restarts (tests/tests/vm_containment.rs).
        failure_policy: FailurePolicy::FailReload as i32,
        reload_config: Some(ReloadConfig {
            backoff: Some(BackoffStrategy {
                base_interval: Some(duration(1)),
                max_interval: Some(duration(10)),
            }),
        }),
        ..Default::default()
    };
    let wasm = Wasm { config: Some(plugin) };
    TypedExtensionConfig {
        name: FILTER_CONFIG_NAME.into(),
        typed_config: Some(any(&wasm)),
    }
}

/// [`filter_resource`] packed as the `Any` a discovery response carries, encoded with the
/// configuration document copied once. Packing the message as built copies the document at
/// every level: into the `StringValue`, then with each enclosing encoding (`StringValue`,
/// `Any`, `Wasm`, `TypedExtensionConfig`): 4 MB each time at 20,000 connectors, on every change.
/// Here the enclosing messages' headers are sized first and the document goes in last: each
/// message is its other fields, encoded as usual, followed by the field that leads to the
/// document (protobuf fields may come in any order; the decoded message is the same, which the
/// unit test checks level by level).
pub fn filter_resource_any(filter_config: &Document, wasm: &WasmSettings) -> Any {
    use prost::Message as _;
    use prost::encoding::{encode_varint, encoded_len_varint};
    // The key of the one length-delimited field a probe message sets to `payload` (the
    // encoding is key, length, payload): read off prost's own encoding, not restated here.
    fn key_of(probe: &[u8], payload: &[u8]) -> Vec<u8> {
        let tail = encoded_len_varint(payload.len() as u64) + payload.len();
        probe
            .get(..probe.len().saturating_sub(tail))
            .unwrap_or_default()
            .to_vec()
    }
    // The key of a field holding a message, from a probe that sets it to the empty message.
    fn message_key(probe: impl prost::Message) -> Vec<u8> {
        key_of(&probe.encode_to_vec(), &[])
    }
    let mut extension = filter_resource("", wasm);
    let mut plugin = extension
        .typed_config
        .take()
        .and_then(|a| Wasm::decode(a.value.as_slice()).ok())
        .and_then(|w| w.config)
        .unwrap_or_default();
    plugin.configuration = None;
    let any_value = |type_url: String| {
        Any {
            type_url,
            value: vec![],
        }
        .encode_to_vec()
    };
    let any_value_key = key_of(
        &Any {
            type_url: String::new(),
            value: b"x".to_vec(),
        }
        .encode_to_vec(),
        b"x",
    );
    // Outermost first: each level's other fields, and the key of the field that leads inward.
    let levels: [(Vec<u8>, Vec<u8>); 5] = [
        (
            extension.encode_to_vec(),
            message_key(TypedExtensionConfig {
                typed_config: Some(Any::default()),
                ..Default::default()
            }),
        ),
        (any_value(<Wasm as prost::Name>::type_url()), any_value_key.clone()),
        (
            vec![],
            message_key(Wasm {
                config: Some(PluginConfig::default()),
            }),
        ),
        (
            plugin.encode_to_vec(),
            message_key(PluginConfig {
                configuration: Some(Any::default()),
                ..Default::default()
            }),
        ),
        (any_value(<StringValue as prost::Name>::type_url()), any_value_key),
    ];
    let document_field = key_of(&StringValue { value: "x".into() }.encode_to_vec(), b"x");
    // Lengths inside out: each level's body is its fields, the inward field's key and length,
    // and the body inside.
    let mut inner = document_field.len() + encoded_len_varint(filter_config.len() as u64) + filter_config.len();
    let mut lengths = vec![inner];
    for (fields, key) in levels.iter().skip(1).rev() {
        inner += fields.len() + key.len() + encoded_len_varint(inner as u64);
        lengths.push(inner);
    }
    let total = levels[0].0.len() + levels[0].1.len() + encoded_len_varint(inner as u64) + inner;
    let mut out = Vec::with_capacity(total);
    for ((fields, key), len) in levels.iter().zip(lengths.iter().rev()) {
        out.extend_from_slice(fields);
        out.extend_from_slice(key);
        encode_varint(*len as u64, &mut out);
    }
    out.extend_from_slice(&document_field);
    encode_varint(filter_config.len() as u64, &mut out);
    for piece in filter_config.pieces() {
        out.extend_from_slice(piece.as_bytes());
    }
    Any {
        type_url: <TypedExtensionConfig as prost::Name>::type_url(),
        value: out,
    }
}

/// How long a push waits for a new host name's first lookup before it goes without its
/// addresses. Lookups answer in milliseconds (`/etc/hosts`, the cluster's DNS); a name that
/// takes its whole 5 s (`pin::RESOLVE_TIMEOUT`) must not hold every other change up as long.
pub const PIN_WAIT: Duration = Duration::from_secs(1);

/// The ADS service. Cheap to clone.
#[derive(Clone)]
pub struct Ads {
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    /// The admitted addresses of the clusters' host names (module `pin`).
    pins: watch::Receiver<Arc<PinMap>>,
    wasm: WasmSettings,
    ca_bundle: String,
    hub: Hub,
    /// [`PIN_WAIT`], or a test's.
    pin_wait: Duration,
    /// Becomes `true` on shutdown: open streams end at once instead of holding the server up.
    shutdown: watch::Receiver<bool>,
    /// The sender of the default, never-firing `shutdown`, kept so the channel stays open.
    _no_shutdown: Arc<watch::Sender<bool>>,
}

impl Ads {
    /// `pins`: what [`crate::pin::run`] keeps for the same snapshots. A snapshot naming a host
    /// name not looked up yet is sent once it is, or after [`PIN_WAIT`] without its addresses.
    pub fn new(
        snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
        pins: watch::Receiver<Arc<PinMap>>,
        wasm: WasmSettings,
        ca_bundle: String,
        hub: Hub,
    ) -> Self {
        let no_shutdown = watch::channel(false).0;
        Self {
            snapshots,
            pins,
            wasm,
            ca_bundle,
            hub,
            pin_wait: PIN_WAIT,
            shutdown: no_shutdown.subscribe(),
            _no_shutdown: Arc::new(no_shutdown),
        }
    }

    /// Ends every open stream when `shutdown` turns `true`.
    pub fn with_shutdown(mut self, shutdown: watch::Receiver<bool>) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Waits `wait` instead of [`PIN_WAIT`] for a new name's addresses.
    pub fn with_pin_wait(mut self, wait: Duration) -> Self {
        self.pin_wait = wait;
        self
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        static STREAMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let session = Session {
            id: STREAMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            filter_acked: None,
            ads: self.clone(),
            tx,
            sent: HashMap::new(),
            subscribed: Default::default(),
            nonce: 0,
            clusters_sent: None,
            clusters_acked: vec![],
            filter_live: Default::default(),
            filter_pending: None,
            pin_wait: Default::default(),
        };
        tokio::spawn(session.run(incoming));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "this control plane serves state-of-the-world ADS only: set api_type: GRPC in ads_config",
        ))
    }
}

/// One Envoy's ADS stream.
struct Session {
    /// Names the stream in the hub's per-stream ACK record.
    id: u64,
    /// The highest filter-configuration version acknowledged on this stream.
    filter_acked: Option<u64>,
    ads: Ads,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    /// Per type URL: (snapshot version, nonce) of the last response sent.
    sent: HashMap<String, (u64, String)>,
    subscribed: std::collections::BTreeSet<String>,
    nonce: u64,
    /// The cluster set last sent (sorted by name) with each one's pinned addresses, to skip
    /// sending an unchanged one.
    clusters_sent: Option<Vec<(UpstreamCluster, Vec<IpAddr>)>>,
    /// The cluster set Envoy last acknowledged: what it has.
    clusters_acked: Vec<(UpstreamCluster, Vec<IpAddr>)>,
    /// Clusters named by the filter configuration Envoy last accepted: kept until a newer one
    /// that does not name them is accepted.
    filter_live: std::sync::Arc<Vec<UpstreamCluster>>,
    /// Clusters named by the filter configuration sent and not answered yet (its version).
    filter_pending: Option<(u64, std::sync::Arc<Vec<UpstreamCluster>>)>,
    /// A push's wait for new names' pins.
    pin_wait: crate::pin::PinWait,
}

impl Session {
    async fn run(mut self, mut incoming: Streaming<DiscoveryRequest>) {
        let metrics = self.ads.hub.metrics.clone();
        metrics.xds_streams.inc();
        self.ads.hub.set_proxy(|p| p.connected = true);
        // An Envoy that reconnects may run any configuration it had: until it acknowledges one
        // on this stream, no credential is retired.
        self.ads.hub.set_filter_acked(self.id, None, false);
        let mut snapshots = self.ads.snapshots.clone();
        let mut pins = self.ads.pins.clone();
        let mut pins_open = true;
        let mut shutdown = self.ads.shutdown.clone();
        let mut certs = self.ads.hub.proxy_cert();
        loop {
            let pin_deadline = self.pin_wait.deadline();
            tokio::select! {
                changed = shutdown.changed() => {
                    let stop = changed.is_err() || *shutdown.borrow();
                    if stop { break; }
                }
                req = incoming.next() => match req {
                    Some(Ok(req)) => {
                        if self.on_request(req).await.is_err() { break; }
                    }
                    Some(Err(e)) => {
                        tracing::info!(error = %e, "ADS stream ended with an error");
                        break;
                    }
                    None => break,
                },
                changed = snapshots.changed() => {
                    if changed.is_err() { break; }
                    if self.push().await.is_err() { break; }
                }
                // Pins that stop coming (their task ended) leave the ones there are.
                changed = pins.changed(), if pins_open => {
                    pins_open = changed.is_ok();
                    if pins_open && self.push().await.is_err() { break; }
                }
                changed = certs.changed() => {
                    if changed.is_err() { break; }
                    if self.push_cert().await.is_err() { break; }
                }
                // A name still not looked up: the push goes without its addresses.
                () = tokio::time::sleep_until(pin_deadline.unwrap_or_else(tokio::time::Instant::now)),
                    if pin_deadline.is_some() => {
                    if self.push().await.is_err() { break; }
                }
            }
        }
        self.ads.hub.set_filter_acked(self.id, None, true);
        let open = metrics.xds_streams.dec() - 1;
        if open <= 0 {
            self.ads.hub.set_proxy(|p| p.connected = false);
        }
    }

    fn current(&self) -> Option<Arc<Snapshot>> {
        self.ads.snapshots.borrow().clone()
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), ()> {
        let type_url = req.type_url.clone();
        if type_url == SECRET_TYPE {
            return self.on_secret_request(req).await;
        }
        if type_url != CLUSTER_TYPE && type_url != ECDS_TYPE {
            // Listeners, routes and endpoints are static in the bootstrap; answer nothing.
            tracing::debug!(type_url, "ignoring a subscription this control plane does not serve");
            return Ok(());
        }
        let label = if type_url == CLUSTER_TYPE { "clusters" } else { "filter" };
        if req.response_nonce.is_empty() {
            // A new subscription (or Envoy reconnecting with what it has): answer with ours.
            self.subscribed.insert(type_url.clone());
            return self.push().await;
        }
        let Some((version, nonce)) = self.sent.get(&type_url).cloned() else {
            return Ok(());
        };
        if req.response_nonce != nonce {
            // An answer to an older response: a newer one is in flight.
            return Ok(());
        }
        if let Some(err) = req.error_detail {
            if type_url == ECDS_TYPE {
                // Envoy keeps running the configuration it had: its clusters stay.
                self.filter_pending = None;
            }
            let message = err.message;
            tracing::warn!(resource = label, version, %message, "Envoy rejected the configuration (NACK); it keeps the last one it accepted");
            self.ads
                .hub
                .metrics
                .xds_nacks
                .get_or_create(&TypeLabel { resource: label.into() })
                .inc();
            self.ads
                .hub
                .set_proxy(|p| p.rejected = Some((version, message.clone())));
            return Ok(());
        }
        tracing::debug!(resource = label, version, "Envoy acknowledged");
        if type_url == CLUSTER_TYPE {
            self.clusters_acked = self.clusters_sent.clone().unwrap_or_default();
            // The filter configuration waited for these clusters.
            return self.push().await;
        }
        if let Some((_, clusters)) = self.filter_pending.take() {
            self.filter_live = clusters;
        }
        let acked = self.filter_acked.map_or(version, |a| a.max(version));
        self.filter_acked = Some(acked);
        self.ads.hub.set_filter_acked(self.id, Some(acked), false);
        self.ads.hub.set_proxy(|p| {
            p.accepted = Some(p.accepted.map_or(version, |a| a.max(version)));
            if p.rejected.as_ref().is_some_and(|(v, _)| *v <= version) {
                p.rejected = None;
            }
        });
        // Clusters only the previous configuration named can go now.
        self.push().await
    }

    /// The listener's certificate (SDS): sent on subscription and on every new generation;
    /// an ACK needs nothing more, a NACK is logged and counted (Envoy keeps the one it has).
    async fn on_secret_request(&mut self, req: DiscoveryRequest) -> Result<(), ()> {
        if req.response_nonce.is_empty() {
            self.subscribed.insert(SECRET_TYPE.to_string());
            return self.push_cert().await;
        }
        let Some((generation, nonce)) = self.sent.get(SECRET_TYPE).cloned() else {
            return Ok(());
        };
        if req.response_nonce != nonce {
            return Ok(());
        }
        match req.error_detail {
            Some(err) => {
                let message = err.message;
                tracing::warn!(resource = SECRET_LABEL, generation, %message, "Envoy rejected the proxy certificate (NACK); it keeps serving the last one it accepted");
                self.ads
                    .hub
                    .metrics
                    .xds_nacks
                    .get_or_create(&TypeLabel {
                        resource: SECRET_LABEL.into(),
                    })
                    .inc();
            }
            None => tracing::info!(
                resource = SECRET_LABEL,
                generation,
                "Envoy acknowledged the proxy certificate"
            ),
        }
        Ok(())
    }

    /// Sends the current certificate when Envoy subscribed and has not been sent this generation.
    async fn push_cert(&mut self) -> Result<(), ()> {
        if !self.subscribed.contains(SECRET_TYPE) {
            return Ok(());
        }
        let Some((generation, cert)) = self.ads.hub.proxy_cert().borrow().clone() else {
            return Ok(());
        };
        if self.sent.get(SECRET_TYPE).map(|(g, _)| *g) == Some(generation) {
            return Ok(());
        }
        self.send(SECRET_TYPE, generation, vec![any(&cert.sds_resource())])
            .await
    }

    /// The clusters Envoy must have: the snapshot's, plus those of the filter configuration it
    /// runs and of one in flight (make before break). Sorted by name; the snapshot's definition
    /// wins for a name both have.
    fn wanted_clusters(&self, snap: &Snapshot) -> Vec<UpstreamCluster> {
        let mut wanted: std::collections::BTreeMap<&str, &UpstreamCluster> =
            snap.clusters.iter().map(|c| (c.name.as_str(), c)).collect();
        let pending = self.filter_pending.iter().flat_map(|(_, c)| c.iter());
        for c in self.filter_live.iter().chain(pending) {
            wanted.entry(c.name.as_str()).or_insert(c);
        }
        wanted.into_values().cloned().collect()
    }

    /// Sends what the current snapshot changes: clusters first, the filter configuration once
    /// Envoy has every cluster it names.
    async fn push(&mut self) -> Result<(), ()> {
        let Some(snap) = self.current() else {
            return Ok(());
        };
        let cds = self.subscribed.contains(CLUSTER_TYPE);
        if cds {
            let pins = self.ads.pins.borrow().clone();
            // A name not looked up yet: the push waits for it (the pins' change pushes), at
            // most `pin_wait`; then it goes with that cluster empty.
            let unpinned = snap
                .clusters
                .iter()
                .any(|c| crate::pin::is_named(c) && crate::pin::pin_of(&pins, c).is_none());
            let now = tokio::time::Instant::now();
            if self
                .pin_wait
                .hold(snap.version, unpinned, now, self.ads.pin_wait)
                .is_some()
            {
                return Ok(());
            }
            let mut wanted = Vec::new();
            for c in self.wanted_clusters(&snap) {
                let pinned = if crate::pin::is_named(&c) {
                    match crate::pin::pin_of(&pins, &c) {
                        Some(pin) => pin.addresses.clone(),
                        // Not looked up yet and the wait is over; or named only by an older
                        // configuration Envoy still runs, its pin expired: it reaches nothing
                        // rather than hold every push up.
                        None => vec![],
                    }
                } else {
                    vec![]
                };
                wanted.push((c, pinned));
            }
            if self.clusters_sent.as_ref() != Some(&wanted) {
                let resources = wanted
                    .iter()
                    .map(|(c, pinned)| any(&cluster_resource(c, &self.ads.ca_bundle, pinned)))
                    .collect();
                self.send(CLUSTER_TYPE, snap.version, resources).await?;
                self.clusters_sent = Some(wanted);
                return Ok(());
            }
        }
        let sent_filter = self.sent.get(ECDS_TYPE).map(|(v, _)| *v);
        // Clusters Envoy refused (NACK) or has not acknowledged yet: the filter configuration
        // that names them waits for a snapshot whose clusters Envoy takes.
        let clusters_ready = !cds
            || snap
                .clusters
                .iter()
                .all(|c| self.clusters_acked.iter().any(|(a, _)| a == c));
        if self.subscribed.contains(ECDS_TYPE) && sent_filter != Some(snap.version) && clusters_ready {
            let resource = filter_resource_any(&snap.filter_config, &self.ads.wasm);
            self.send(ECDS_TYPE, snap.version, vec![resource]).await?;
            self.filter_pending = Some((snap.version, snap.clusters.clone()));
        }
        Ok(())
    }

    async fn send(&mut self, type_url: &str, version: u64, resources: Vec<Any>) -> Result<(), ()> {
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let label = match type_url {
            CLUSTER_TYPE => "clusters",
            SECRET_TYPE => SECRET_LABEL,
            _ => "filter",
        };
        // A snapshot may need two cluster sets (make, then break): each gets its own version.
        let version_info = match self.sent.get(type_url) {
            Some((v, _)) if *v == version => format!("{version}.{nonce}"),
            _ => version.to_string(),
        };
        let response = DiscoveryResponse {
            version_info,
            resources,
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        self.sent.insert(type_url.to_string(), (version, nonce));
        self.ads
            .hub
            .metrics
            .xds_pushes
            .get_or_create(&TypeLabel { resource: label.into() })
            .inc();
        tracing::info!(resource = label, version, "pushing configuration to Envoy");
        // A closed receiver means Envoy went away.
        tokio::time::timeout(Duration::from_secs(30), self.tx.send(Ok(response)))
            .await
            .map_err(|_| ())?
            .map_err(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-copy encoding decodes, level by level, to the message `filter_resource` builds:
    /// documents whose length takes one to four varint bytes, with and without host variables.
    #[test]
    fn the_ecds_resource_encoded_around_the_document_decodes_to_the_built_one() {
        use prost::Message as _;
        let big = format!("{{\"connectors\":[\"{}\"]}}", "x".repeat(3 << 20));
        for keys in [vec![], vec!["CONNECTOR_CHANNEL_KEY".to_string()]] {
            let wasm = WasmSettings {
                module_path: "/etc/envoy/connector_filter.wasm".into(),
                host_env_keys: keys,
            };
            for doc in ["", "{}", &"y".repeat(200), &"z".repeat(20_000), &big] {
                // Cut in three, as the live renderer's runs cut it.
                let (a, rest) = doc.split_at(doc.len() / 3);
                let (b, c) = rest.split_at(rest.len() / 2);
                let got = filter_resource_any(&Document::from_pieces(vec![a.into(), b.into(), c.into()]), &wasm);
                let want = any(&filter_resource(doc, &wasm));
                assert_eq!(got.type_url, want.type_url);
                let got = TypedExtensionConfig::decode(got.value.as_slice()).unwrap();
                let want = TypedExtensionConfig::decode(want.value.as_slice()).unwrap();
                assert_eq!(got.name, want.name);
                let (got, want) = (got.typed_config.unwrap(), want.typed_config.unwrap());
                assert_eq!(got.type_url, want.type_url);
                let mut got = Wasm::decode(got.value.as_slice()).unwrap().config.unwrap();
                let mut want = Wasm::decode(want.value.as_slice()).unwrap().config.unwrap();
                // The document, decoded (an empty one may be encoded as an empty field or none).
                let (got_doc, want_doc) = (got.configuration.take().unwrap(), want.configuration.take().unwrap());
                assert_eq!(got_doc.type_url, want_doc.type_url);
                assert_eq!(StringValue::decode(got_doc.value.as_slice()).unwrap().value, doc);
                assert_eq!(StringValue::decode(want_doc.value.as_slice()).unwrap().value, doc);
                assert_eq!(got, want, "document of {} bytes", doc.len());
            }
        }
    }

    /// `address:port (hostname)` of each of the cluster's endpoints.
    fn endpoints(c: &Cluster) -> Vec<String> {
        let la = c.load_assignment.as_ref().unwrap();
        la.endpoints
            .iter()
            .flat_map(|l| l.lb_endpoints.iter())
            .map(|e| {
                let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    panic!("an endpoint")
                };
                let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref().unwrap().address.as_ref() else {
                    panic!("a socket address")
                };
                let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                    panic!("a port")
                };
                format!("{}:{port} ({})", sa.address, ep.hostname)
            })
            .collect()
    }

    #[test]
    fn https_upstreams_get_tls_with_sni_and_names_their_pinned_addresses() {
        let named = UpstreamCluster {
            name: "upstream_https_harbor_example_com_443".into(),
            host: "harbor.example.com".into(),
            port: 443,
            tls: true,
            sni: Some("harbor.example.com".into()),
        };
        let pinned: Vec<IpAddr> = vec!["203.0.113.7".parse().unwrap(), "203.0.113.8".parse().unwrap()];
        let c = cluster_resource(&named, "/ca.pem", &pinned);
        assert_eq!(
            c.cluster_discovery_type,
            Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Static as i32
            )),
            "Envoy never resolves an upstream name itself"
        );
        assert_eq!(
            endpoints(&c),
            [
                "203.0.113.7:443 (harbor.example.com)",
                "203.0.113.8:443 (harbor.example.com)"
            ]
        );
        // Nothing admitted: a cluster with no endpoint (Envoy answers 503), not the name.
        assert!(endpoints(&cluster_resource(&named, "/ca.pem", &[])).is_empty());
        let ts = c.transport_socket.expect("TLS for https");
        let Some(transport_socket::ConfigType::TypedConfig(any)) = ts.config_type else {
            panic!("typed TLS config")
        };
        assert!(any.type_url.ends_with("UpstreamTlsContext"));
        let tls = <UpstreamTlsContext as prost::Message>::decode(any.value.as_slice()).unwrap();
        assert_eq!(tls.sni, "harbor.example.com");
        let Some(common_tls_context::ValidationContextType::ValidationContext(v)) =
            tls.common_tls_context.unwrap().validation_context_type
        else {
            panic!("a validation context")
        };
        assert_eq!(
            v.trusted_ca.unwrap().specifier,
            Some(data_source::Specifier::Filename("/ca.pem".into())),
            "upstream certificates are validated"
        );
        assert_eq!(
            v.match_typed_subject_alt_names.len(),
            1,
            "the certificate's name is checked"
        );
        let san = &v.match_typed_subject_alt_names[0];
        assert_eq!(san.san_type, subject_alt_name_matcher::SanType::Dns as i32);
        assert_eq!(
            san.matcher.as_ref().unwrap().match_pattern,
            Some(string_matcher::MatchPattern::Exact("harbor.example.com".into()))
        );

        // An https IP literal: no SNI (names only), but the certificate must name the address.
        let https_ip = UpstreamCluster {
            name: "upstream_https_10_0_0_1_8443".into(),
            host: "10.0.0.1".into(),
            port: 8443,
            tls: true,
            sni: None,
        };
        let c = cluster_resource(&https_ip, "/ca.pem", &pinned);
        assert_eq!(
            endpoints(&c),
            ["10.0.0.1:8443 ()"],
            "a literal is its own endpoint, pins or not"
        );
        let Some(transport_socket::ConfigType::TypedConfig(any)) = c.transport_socket.unwrap().config_type else {
            panic!("typed TLS config")
        };
        let tls = <UpstreamTlsContext as prost::Message>::decode(any.value.as_slice()).unwrap();
        assert_eq!(tls.sni, "");
        let Some(common_tls_context::ValidationContextType::ValidationContext(v)) =
            tls.common_tls_context.unwrap().validation_context_type
        else {
            panic!("a validation context")
        };
        assert_eq!(
            v.match_typed_subject_alt_names[0].san_type,
            subject_alt_name_matcher::SanType::IpAddress as i32
        );
        assert_eq!(
            v.match_typed_subject_alt_names[0]
                .matcher
                .as_ref()
                .unwrap()
                .match_pattern,
            Some(string_matcher::MatchPattern::Exact("10.0.0.1".into()))
        );

        let ip = UpstreamCluster {
            name: "upstream_http_127_0_0_1_5000".into(),
            host: "127.0.0.1".into(),
            port: 5000,
            tls: false,
            sni: None,
        };
        let c = cluster_resource(&ip, SYSTEM_CA_BUNDLE, &[]);
        assert_eq!(endpoints(&c), ["127.0.0.1:5000 ()"]);
        assert!(c.transport_socket.is_none());
        assert_eq!(
            c.cluster_discovery_type,
            Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Static as i32
            ))
        );
    }
}
