//! Owns the xDS server Envoy's bootstrap points at: one aggregated (ADS) gRPC stream per Envoy,
//! state of the world, carrying the upstream clusters (CDS) and the connector filter's
//! configuration (ECDS, a `TypedExtensionConfig` named [`FILTER_CONFIG_NAME`]).
//!
//! Versions and nonces are tracked per stream and resource type. An ACK moves
//! `ProxyState::accepted`; a NACK (a request echoing our nonce with `error_detail`) records the
//! rejection in `ProxyState::rejected` and the `xds_nacks` metric, and nothing is resent: Envoy
//! stays on the last configuration it accepted. Nothing is sent before the first snapshot, so
//! a restarting controller never pushes an empty or partial configuration.
//!
//! Clusters go first and the filter configuration only once Envoy has acknowledged them, so a
//! new connector's filter entry never names a cluster Envoy does not have yet.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AsyncDataSource, DataSource, SocketAddress, TransportSocket, TypedExtensionConfig, address,
    async_data_source, data_source, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, UpstreamTlsContext, common_tls_context,
};
use envoy_types::pb::envoy::extensions::wasm::v3::{
    EnvironmentVariables, FailurePolicy, PluginConfig, VmConfig, plugin_config,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Any, StringValue};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::hub::Hub;
use crate::ops::TypeLabel;
use crate::render::UpstreamCluster;

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ECDS_TYPE: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
/// The name Envoy's bootstrap subscribes to in the HTTP filter's `config_discovery`.
pub const FILTER_CONFIG_NAME: &str = "oci-connector";
/// Debian's CA bundle: what https upstreams are validated against unless `--upstream-ca` says otherwise.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What the xDS server serves; replaced as a whole on every render.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub version: u64,
    pub clusters: Vec<UpstreamCluster>,
    /// The filter configuration JSON (no secrets in it: see `pipeline`).
    pub filter_config: String,
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

/// The CDS resource for one upstream origin: a static address for IP literals, logical DNS
/// otherwise; for https, TLS with SNI (host names) validated against `ca_bundle`.
pub fn cluster_resource(c: &UpstreamCluster, ca_bundle: &str) -> Cluster {
    let is_ip = c.host.parse::<std::net::IpAddr>().is_ok();
    let discovery = if is_ip {
        cluster::DiscoveryType::Static
    } else {
        cluster::DiscoveryType::LogicalDns
    };
    let endpoint = LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: c.host.clone(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(c.port))),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        ..Default::default()
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
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(discovery as i32)),
        connect_timeout: Some(duration(5)),
        dns_lookup_family: cluster::DnsLookupFamily::V4Preferred as i32,
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: c.name.clone(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![endpoint],
                ..Default::default()
            }],
            ..Default::default()
        }),
        transport_socket,
        ..Default::default()
    }
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
        // An auth filter must never fail open: a broken VM answers 503.
        failure_policy: FailurePolicy::FailClosed as i32,
        ..Default::default()
    };
    let wasm = Wasm { config: Some(plugin) };
    TypedExtensionConfig {
        name: FILTER_CONFIG_NAME.into(),
        typed_config: Some(any(&wasm)),
    }
}

/// The ADS service. Cheap to clone.
#[derive(Clone)]
pub struct Ads {
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    wasm: WasmSettings,
    ca_bundle: String,
    hub: Hub,
    /// Becomes `true` on shutdown: open streams end at once instead of holding the server up.
    shutdown: watch::Receiver<bool>,
    /// The sender of the default, never-firing `shutdown`, kept so the channel stays open.
    _no_shutdown: Arc<watch::Sender<bool>>,
}

impl Ads {
    pub fn new(
        snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
        wasm: WasmSettings,
        ca_bundle: String,
        hub: Hub,
    ) -> Self {
        let no_shutdown = watch::channel(false).0;
        Self {
            snapshots,
            wasm,
            ca_bundle,
            hub,
            shutdown: no_shutdown.subscribe(),
            _no_shutdown: Arc::new(no_shutdown),
        }
    }

    /// Ends every open stream when `shutdown` turns `true`.
    pub fn with_shutdown(mut self, shutdown: watch::Receiver<bool>) -> Self {
        self.shutdown = shutdown;
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
        let session = Session {
            ads: self.clone(),
            tx,
            sent: HashMap::new(),
            subscribed: Default::default(),
            nonce: 0,
            clusters_version: None,
            acked_clusters: None,
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
    ads: Ads,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    /// Per type URL: (snapshot version, nonce) of the last response sent.
    sent: HashMap<String, (u64, String)>,
    subscribed: std::collections::BTreeSet<String>,
    nonce: u64,
    /// The cluster set last sent, to skip sending an unchanged one.
    clusters_version: Option<Vec<UpstreamCluster>>,
    /// Snapshot version whose clusters Envoy acknowledged.
    acked_clusters: Option<u64>,
}

impl Session {
    async fn run(mut self, mut incoming: Streaming<DiscoveryRequest>) {
        let metrics = self.ads.hub.metrics.clone();
        metrics.xds_streams.inc();
        self.ads.hub.set_proxy(|p| p.connected = true);
        let mut snapshots = self.ads.snapshots.clone();
        let mut shutdown = self.ads.shutdown.clone();
        loop {
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
            }
        }
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
            self.acked_clusters = Some(version);
            // The filter configuration waited for these clusters.
            return self.push().await;
        }
        self.ads.hub.set_proxy(|p| {
            p.accepted = Some(p.accepted.map_or(version, |a| a.max(version)));
            if p.rejected.as_ref().is_some_and(|(v, _)| *v <= version) {
                p.rejected = None;
            }
        });
        Ok(())
    }

    /// Sends what the current snapshot changes, clusters before the filter configuration.
    async fn push(&mut self) -> Result<(), ()> {
        let Some(snap) = self.current() else {
            return Ok(());
        };
        if self.subscribed.contains(CLUSTER_TYPE) && self.clusters_version.as_ref() != Some(&snap.clusters) {
            let resources = snap
                .clusters
                .iter()
                .map(|c| any(&cluster_resource(c, &self.ads.ca_bundle)))
                .collect();
            self.send(CLUSTER_TYPE, snap.version, resources).await?;
            self.clusters_version = Some(snap.clusters.clone());
            return Ok(());
        }
        if self.subscribed.contains(CLUSTER_TYPE)
            && self.acked_clusters.is_none()
            && self.sent.contains_key(CLUSTER_TYPE)
        {
            // Clusters sent, not yet acknowledged: the filter configuration waits.
            return Ok(());
        }
        if self.subscribed.contains(ECDS_TYPE) && self.sent.get(ECDS_TYPE).map(|(v, _)| *v) != Some(snap.version) {
            let resource = any(&filter_resource(&snap.filter_config, &self.ads.wasm));
            self.send(ECDS_TYPE, snap.version, vec![resource]).await?;
        }
        Ok(())
    }

    async fn send(&mut self, type_url: &str, version: u64, resources: Vec<Any>) -> Result<(), ()> {
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let label = if type_url == CLUSTER_TYPE { "clusters" } else { "filter" };
        let response = DiscoveryResponse {
            version_info: version.to_string(),
            resources,
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        self.sent.insert(type_url.to_string(), (version, nonce));
        if type_url == CLUSTER_TYPE {
            self.acked_clusters = None;
        }
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

    #[test]
    fn https_upstreams_get_tls_with_sni_and_ip_literals_a_static_address() {
        let named = UpstreamCluster {
            name: "upstream_https_harbor_example_com_443".into(),
            host: "harbor.example.com".into(),
            port: 443,
            tls: true,
            sni: Some("harbor.example.com".into()),
        };
        let c = cluster_resource(&named, "/ca.pem");
        assert_eq!(
            c.cluster_discovery_type,
            Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::LogicalDns as i32
            ))
        );
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

        let ip = UpstreamCluster {
            name: "upstream_http_127_0_0_1_5000".into(),
            host: "127.0.0.1".into(),
            port: 5000,
            tls: false,
            sni: None,
        };
        let c = cluster_resource(&ip, SYSTEM_CA_BUNDLE);
        assert!(c.transport_socket.is_none());
        assert_eq!(
            c.cluster_discovery_type,
            Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Static as i32
            ))
        );
    }
}
