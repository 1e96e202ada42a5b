//! The ADS server's protocol bookkeeping, driven over real gRPC by tonic's generated ADS client
//! (the same protocol messages Envoy sends): nothing before a snapshot, clusters before the
//! filter configuration, ACKs move `ProxyState::accepted`, a NACK is recorded with its message
//! and counted and nothing is resent, stale nonces are ignored; a NACK freezes nothing, and
//! clusters go only after the filter stops naming them. Envoy itself is exercised end to
//! end in `tests/tests/controller_xds.rs`; a NACK is hard to provoke from a real Envoy on
//! purpose, which is why this path is tested here.

use std::sync::Arc;
use std::time::Duration;

use connector_controller::document::Document;
use connector_controller::hub::Hub;
use connector_controller::pin::{Pin, PinMap};
use connector_controller::render::UpstreamCluster;
use connector_controller::xds::{Ads, CLUSTER_TYPE, ECDS_TYPE, FILTER_CONFIG_NAME, Snapshot, WasmSettings};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

fn cluster(port: u16) -> UpstreamCluster {
    UpstreamCluster {
        name: format!("upstream_http_127_0_0_1_{port}"),
        host: "127.0.0.1".into(),
        port,
        tls: false,
        sni: None,
    }
}

/// Pins for snapshots whose clusters are all IP literals (they need none); the sender goes.
fn no_pins() -> watch::Receiver<Arc<PinMap>> {
    watch::channel(Arc::new(PinMap::new())).1
}

fn request(type_url: &str, nonce: &str, version: &str, error: Option<&str>) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        response_nonce: nonce.into(),
        version_info: version.into(),
        resource_names: if type_url == ECDS_TYPE {
            vec![FILTER_CONFIG_NAME.into()]
        } else {
            vec![]
        },
        error_detail: error.map(|m| RpcStatus {
            code: 3,
            message: m.into(),
            details: vec![],
        }),
        ..Default::default()
    }
}

async fn next(stream: &mut tonic::Streaming<DiscoveryResponse>) -> Option<DiscoveryResponse> {
    match tokio::time::timeout(Duration::from_millis(700), stream.next()).await {
        Ok(Some(Ok(r))) => Some(r),
        _ => None,
    }
}

#[tokio::test]
async fn acks_nacks_and_ordering() {
    let hub = Hub::new();
    let (snap_tx, snap_rx) = watch::channel(None);
    let wasm = WasmSettings {
        module_path: "/filter.wasm".into(),
        host_env_keys: vec!["CONNECTOR_CHANNEL_KEY".into()],
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = Ads::new(snap_rx, no_pins(), wasm, "/ca.pem".into(), hub.clone()).into_service();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(request(CLUSTER_TYPE, "", "", None)).await.unwrap();
    tx.send(request(ECDS_TYPE, "", "", None)).await.unwrap();
    assert!(
        next(&mut responses).await.is_none(),
        "nothing is sent before the first snapshot"
    );

    let config = r#"{"connectors":[],"marker":"v1"}"#;
    snap_tx.send_replace(Some(Arc::new(Snapshot {
        version: 1,
        clusters: std::sync::Arc::new(vec![cluster(5000)]),
        filter_config: Arc::new(Document::from_text(config)),
    })));
    let cds = next(&mut responses).await.expect("clusters first");
    assert_eq!(
        (cds.type_url.as_str(), cds.version_info.as_str(), cds.resources.len()),
        (CLUSTER_TYPE, "1", 1)
    );
    assert!(
        next(&mut responses).await.is_none(),
        "the filter configuration waits for the clusters' ACK"
    );
    tx.send(request(CLUSTER_TYPE, &cds.nonce, "1", None)).await.unwrap();
    let ecds = next(&mut responses)
        .await
        .expect("filter configuration after the clusters' ACK");
    assert_eq!((ecds.type_url.as_str(), ecds.version_info.as_str()), (ECDS_TYPE, "1"));
    let packed = String::from_utf8_lossy(&ecds.resources[0].value).into_owned();
    assert!(packed.contains("marker") && packed.contains("/filter.wasm") && packed.contains(FILTER_CONFIG_NAME));
    assert!(
        packed.contains("CONNECTOR_CHANNEL_KEY"),
        "the VM may read the channel key variable"
    );
    tx.send(request(ECDS_TYPE, &ecds.nonce, "1", None)).await.unwrap();
    let mut proxy = hub.proxy();
    tokio::time::timeout(Duration::from_secs(2), proxy.wait_for(|p| p.accepted == Some(1)))
        .await
        .expect("ACK recorded")
        .unwrap();

    // Version 2 with the same clusters: only the filter configuration is sent. Envoy rejects it.
    snap_tx.send_replace(Some(Arc::new(Snapshot {
        version: 2,
        clusters: std::sync::Arc::new(vec![cluster(5000)]),
        filter_config: Arc::new(Document::from_text(r#"{"marker":"v2"}"#)),
    })));
    let ecds2 = next(&mut responses).await.expect("version 2");
    assert_eq!((ecds2.type_url.as_str(), ecds2.version_info.as_str()), (ECDS_TYPE, "2"));
    // A stale nonce (the version-1 response's) is not mistaken for an answer to version 2.
    tx.send(request(ECDS_TYPE, &ecds.nonce, "1", Some("stale")))
        .await
        .unwrap();
    tx.send(request(
        ECDS_TYPE,
        &ecds2.nonce,
        "1",
        Some("Unable to create Wasm HTTP filter"),
    ))
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(2), proxy.wait_for(|p| p.rejected.is_some()))
        .await
        .expect("NACK recorded")
        .unwrap();
    let state = proxy.borrow().clone();
    assert_eq!(state.accepted, Some(1), "Envoy stays on version 1");
    assert_eq!(
        state.rejected,
        Some((2, "Unable to create Wasm HTTP filter".to_string()))
    );
    assert!(
        next(&mut responses).await.is_none(),
        "a rejected configuration is not resent"
    );
    let metrics = hub.metrics.render_text();
    assert!(
        metrics.contains("connector_controller_xds_nacks_total{resource=\"filter\"} 1"),
        "{metrics}"
    );

    // Version 3 is accepted: the rejection clears.
    snap_tx.send_replace(Some(Arc::new(Snapshot {
        version: 3,
        clusters: std::sync::Arc::new(vec![cluster(5000), cluster(5001)]),
        filter_config: Arc::new(Document::from_text(r#"{"marker":"v3"}"#)),
    })));
    let cds3 = next(&mut responses).await.expect("new cluster set first");
    assert_eq!((cds3.type_url.as_str(), cds3.resources.len()), (CLUSTER_TYPE, 2));
    tx.send(request(CLUSTER_TYPE, &cds3.nonce, "3", None)).await.unwrap();
    let ecds3 = next(&mut responses).await.expect("version 3");
    tx.send(request(ECDS_TYPE, &ecds3.nonce, "3", None)).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(2),
        proxy.wait_for(|p| p.accepted == Some(3) && p.rejected.is_none()),
    )
    .await
    .expect("ACK of version 3 clears the rejection")
    .unwrap();
    assert!(proxy.borrow().connected);
}

/// An ADS server on a free port and a client stream subscribed to clusters and the filter
/// configuration, as Envoy subscribes.
async fn start() -> (
    Hub,
    watch::Sender<Option<Arc<Snapshot>>>,
    mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<DiscoveryResponse>,
) {
    start_with_pins(no_pins(), connector_controller::xds::PIN_WAIT).await
}

/// [`start`] with the host names' pins `pins` brings, a push waiting `pin_wait` for a new one.
async fn start_with_pins(
    pins: watch::Receiver<Arc<PinMap>>,
    pin_wait: Duration,
) -> (
    Hub,
    watch::Sender<Option<Arc<Snapshot>>>,
    mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<DiscoveryResponse>,
) {
    let hub = Hub::new();
    let (snap_tx, snap_rx) = watch::channel(None);
    let wasm = WasmSettings {
        module_path: "/filter.wasm".into(),
        host_env_keys: vec![],
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = Ads::new(snap_rx, pins, wasm, "/ca.pem".into(), hub.clone())
        .with_pin_wait(pin_wait)
        .into_service();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(request(CLUSTER_TYPE, "", "", None)).await.unwrap();
    tx.send(request(ECDS_TYPE, "", "", None)).await.unwrap();
    (hub, snap_tx, tx, responses)
}

fn snapshot(version: u64, ports: &[u16]) -> Option<Arc<Snapshot>> {
    Some(Arc::new(Snapshot {
        version,
        clusters: std::sync::Arc::new(ports.iter().map(|p| cluster(*p)).collect()),
        filter_config: Arc::new(Document::from_text(format!(r#"{{"marker":"v{version}"}}"#))),
    }))
}

/// The ports of the clusters in a CDS response.
fn cluster_ports(r: &DiscoveryResponse) -> Vec<u16> {
    use prost::Message as _;
    assert_eq!(r.type_url, CLUSTER_TYPE, "expected clusters, got {}", r.type_url);
    r.resources
        .iter()
        .map(|a| {
            let c = envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(a.value.as_slice()).unwrap();
            c.name.rsplit('_').next().unwrap().parse().unwrap()
        })
        .collect()
}

fn marker(r: &DiscoveryResponse) -> String {
    assert_eq!(
        r.type_url, ECDS_TYPE,
        "expected the filter configuration, got {}",
        r.type_url
    );
    let packed = String::from_utf8_lossy(&r.resources[0].value).into_owned();
    let at = packed.find("marker").expect("a marker");
    packed[at..]
        .chars()
        .skip(9)
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect()
}

/// Issue 12 item 11: a CDS NACK does not freeze configuration; clusters are removed only after
/// Envoy accepted a filter configuration that stops naming them (make before break); after a
/// filter NACK the clusters of the configuration Envoy still runs stay.
#[tokio::test]
async fn cds_nack_does_not_freeze_and_clusters_go_only_after_the_filter_stops_naming_them() {
    let (hub, snap_tx, tx, mut responses) = start().await;
    let ack = |r: &DiscoveryResponse| request(&r.type_url, &r.nonce, &r.version_info, None);
    let nack = |r: &DiscoveryResponse, m: &str| request(&r.type_url, &r.nonce, &r.version_info, Some(m));

    // v1: cluster A (5000).
    snap_tx.send_replace(snapshot(1, &[5000]));
    let cds = next(&mut responses).await.expect("clusters of v1");
    assert_eq!(cluster_ports(&cds), [5000]);
    tx.send(ack(&cds)).await.unwrap();
    let ecds = next(&mut responses).await.expect("filter v1");
    assert_eq!(marker(&ecds), "v1");
    tx.send(ack(&ecds)).await.unwrap();

    // v2 adds B (5001); Envoy refuses the cluster set. The filter configuration naming B is not sent.
    snap_tx.send_replace(snapshot(2, &[5000, 5001]));
    let cds = next(&mut responses).await.expect("clusters of v2");
    assert_eq!(cluster_ports(&cds), [5000, 5001]);
    tx.send(nack(&cds, "cluster refused")).await.unwrap();
    assert!(
        next(&mut responses).await.is_none(),
        "no filter configuration naming a refused cluster"
    );
    let mut proxy = hub.proxy();
    tokio::time::timeout(Duration::from_secs(2), proxy.wait_for(|p| p.rejected.is_some()))
        .await
        .expect("CDS NACK recorded")
        .unwrap();

    // v3 (B fixed into C, 5002) goes out in full after the NACK.
    snap_tx.send_replace(snapshot(3, &[5000, 5002]));
    let cds = next(&mut responses).await.expect("clusters of v3 after a CDS NACK");
    assert_eq!(cluster_ports(&cds), [5000, 5002]);
    tx.send(ack(&cds)).await.unwrap();
    let ecds = next(&mut responses).await.expect("filter v3 after a CDS NACK");
    assert_eq!(marker(&ecds), "v3");
    tx.send(ack(&ecds)).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(2),
        proxy.wait_for(|p| p.accepted == Some(3) && p.rejected.is_none()),
    )
    .await
    .expect("v3 accepted")
    .unwrap();

    // v4 drops A: the filter configuration goes first, A is removed only after Envoy accepted it.
    snap_tx.send_replace(snapshot(4, &[5002]));
    let ecds = next(&mut responses).await.expect("filter v4 first");
    assert_eq!(marker(&ecds), "v4");
    assert!(next(&mut responses).await.is_none(), "A stays while v4 is unanswered");
    tx.send(ack(&ecds)).await.unwrap();
    let cds = next(&mut responses).await.expect("A removed after v4 was accepted");
    assert_eq!(cluster_ports(&cds), [5002]);
    tx.send(ack(&cds)).await.unwrap();

    // v5 swaps C for D (5003): D is added beside C, then C goes once v5 runs.
    snap_tx.send_replace(snapshot(5, &[5003]));
    let cds = next(&mut responses).await.expect("D added");
    assert_eq!(cluster_ports(&cds), [5002, 5003], "make before break");
    tx.send(ack(&cds)).await.unwrap();
    let ecds = next(&mut responses).await.expect("filter v5");
    assert_eq!(marker(&ecds), "v5");
    tx.send(ack(&ecds)).await.unwrap();
    let cds = next(&mut responses).await.expect("C removed");
    assert_eq!(cluster_ports(&cds), [5003]);
    tx.send(ack(&cds)).await.unwrap();

    // v6 swaps D for E (5004) and Envoy refuses the filter configuration: it keeps running v5,
    // so D stays.
    snap_tx.send_replace(snapshot(6, &[5004]));
    let cds = next(&mut responses).await.expect("E added");
    assert_eq!(cluster_ports(&cds), [5003, 5004]);
    tx.send(ack(&cds)).await.unwrap();
    let ecds = next(&mut responses).await.expect("filter v6");
    tx.send(nack(&ecds, "Unable to create Wasm HTTP filter")).await.unwrap();
    assert!(next(&mut responses).await.is_none(), "D stays: Envoy still runs v5");

    // v7 (back on D only) is pushed after the filter NACK. E, named by no configuration Envoy
    // runs or will run, goes at once.
    snap_tx.send_replace(snapshot(7, &[5003]));
    let cds = next(&mut responses).await.expect("E removed");
    assert_eq!(cluster_ports(&cds), [5003]);
    tx.send(ack(&cds)).await.unwrap();
    let ecds = next(&mut responses).await.expect("filter v7 after a filter NACK");
    assert_eq!(marker(&ecds), "v7");
    tx.send(ack(&ecds)).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(2),
        proxy.wait_for(|p| p.accepted == Some(7) && p.rejected.is_none()),
    )
    .await
    .expect("v7 accepted")
    .unwrap();
    let metrics = hub.metrics.render_text();
    for resource in ["clusters", "filter"] {
        assert!(
            metrics.contains(&format!(
                "connector_controller_xds_nacks_total{{resource=\"{resource}\"}} 1"
            )),
            "{metrics}"
        );
    }
}

/// The proxy listener's certificate (SDS, issue 13): nothing before a certificate exists (the
/// listener keeps warming), the certificate once published even before any connector
/// configuration, a rotation as a new version on the same stream, a NACK counted and nothing
/// resent, an unchanged certificate not sent again.
#[tokio::test]
async fn the_listener_certificate_over_sds() {
    use connector_controller::proxy_tls::{SDS_SECRET_NAME, SECRET_TYPE, ServingCert};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
    let hub = Hub::new();
    let (_snap_tx, snap_rx) = watch::channel(None);
    let wasm = WasmSettings {
        module_path: "/filter.wasm".into(),
        host_env_keys: vec![],
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = Ads::new(snap_rx, no_pins(), wasm, "/ca.pem".into(), hub.clone()).into_service();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut subscribe = request(SECRET_TYPE, "", "", None);
    subscribe.resource_names = vec![SDS_SECRET_NAME.into()];
    tx.send(subscribe).await.unwrap();
    assert!(next(&mut responses).await.is_none(), "no certificate yet, nothing sent");

    let dir = tempfile::tempdir().unwrap();
    let ca = connector_devkit::tls::TestCa::new(dir.path()).unwrap();
    let load = |host: &str| {
        let c = ca.issue(host).unwrap();
        ServingCert::parse(&std::fs::read(c.cert).unwrap(), &std::fs::read(c.key).unwrap()).unwrap()
    };
    let first = load("one.example");
    assert!(hub.publish_proxy_cert(first.clone()));
    assert!(
        !hub.publish_proxy_cert(first),
        "the same certificate is no new generation"
    );
    let sds = next(&mut responses)
        .await
        .expect("the certificate, before any snapshot");
    assert_eq!((sds.type_url.as_str(), sds.version_info.as_str()), (SECRET_TYPE, "1"));
    let decoded = <Secret as prost::Message>::decode(sds.resources[0].value.as_slice()).unwrap();
    assert_eq!(decoded.name, SDS_SECRET_NAME);
    assert!(matches!(decoded.r#type, Some(secret::Type::TlsCertificate(_))));
    tx.send(request(SECRET_TYPE, &sds.nonce, "1", None)).await.unwrap();
    assert!(next(&mut responses).await.is_none(), "an ACK needs no answer");

    assert!(hub.publish_proxy_cert(load("two.example")));
    let rotated = next(&mut responses).await.expect("the rotated certificate");
    assert_eq!(rotated.version_info, "2");
    assert_ne!(rotated.resources[0].value, sds.resources[0].value);
    tx.send(request(SECRET_TYPE, &rotated.nonce, "1", Some("bad key")))
        .await
        .unwrap();
    assert!(
        next(&mut responses).await.is_none(),
        "a NACK is not answered with a resend"
    );
    let nacks = hub
        .metrics
        .xds_nacks
        .get_or_create(&connector_controller::ops::TypeLabel {
            resource: "proxy-tls".into(),
        })
        .get();
    assert_eq!(nacks, 1);
}

/// An upstream reached over HTTPS by host name `host`, on 443.
fn named_cluster(host: &str) -> UpstreamCluster {
    UpstreamCluster {
        name: format!("upstream_https_{}_443", host.replace('.', "_")),
        host: host.into(),
        port: 443,
        tls: true,
        sni: Some(host.into()),
    }
}

/// `host` on 443 pinned to `ips`.
fn pinned(host: &str, ips: &[&str]) -> Arc<PinMap> {
    let mut m = PinMap::new();
    m.insert(
        (host.to_string(), 443),
        Pin {
            addresses: ips.iter().map(|i| i.parse().unwrap()).collect(),
            problem: None,
        },
    );
    Arc::new(m)
}

/// The cluster `name` of a CDS response.
fn cluster_named(r: &DiscoveryResponse, name: &str) -> envoy_types::pb::envoy::config::cluster::v3::Cluster {
    use prost::Message as _;
    r.resources
        .iter()
        .map(|a| envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(a.value.as_slice()).unwrap())
        .find(|c| c.name == name)
        .expect("the named cluster")
}

/// A cluster reached by host name goes to Envoy only with the addresses the controller pinned
/// (module `pin`): a snapshot naming one not pinned yet sends nothing, and the pins' arrival
/// sends it as a `STATIC` cluster of those addresses; a later pin change resends it.
#[tokio::test]
async fn a_named_cluster_waits_for_its_pin_and_goes_static() {
    let (pins_tx, pins_rx) = watch::channel(Arc::new(PinMap::new()));
    // Longer than `next` waits: the pin, not the wait's end, sends the clusters here.
    let (_hub, snap_tx, tx, mut responses) = start_with_pins(pins_rx, Duration::from_secs(5)).await;
    let named = named_cluster("registry.example");
    snap_tx.send_replace(Some(Arc::new(Snapshot {
        version: 1,
        clusters: Arc::new(vec![named.clone(), cluster(5000)]),
        filter_config: Arc::new(Document::from_text("{}")),
    })));
    assert!(
        next(&mut responses).await.is_none(),
        "nothing goes before the name is pinned"
    );

    let pin = |ips: &[&str]| pinned("registry.example", ips);
    // The endpoints' addresses of the named cluster in a CDS response, and its discovery type.
    let endpoints = |r: &DiscoveryResponse| -> (i32, Vec<String>) {
        let c = cluster_named(r, &named.name);
        let json = format!("{:?}", c.load_assignment);
        let found = ["203.0.113.7", "203.0.113.9"]
            .iter()
            .filter(|ip| json.contains(*ip))
            .map(|ip| ip.to_string())
            .collect();
        let Some(envoy_types::pb::envoy::config::cluster::v3::cluster::ClusterDiscoveryType::Type(t)) =
            c.cluster_discovery_type
        else {
            panic!("a discovery type")
        };
        (t, found)
    };
    let static_type = envoy_types::pb::envoy::config::cluster::v3::cluster::DiscoveryType::Static as i32;
    pins_tx.send_replace(pin(&["203.0.113.7"]));
    let cds = next(&mut responses).await.expect("clusters once pinned");
    assert_eq!(cds.type_url, CLUSTER_TYPE);
    assert_eq!(endpoints(&cds), (static_type, vec!["203.0.113.7".to_string()]));
    tx.send(request(CLUSTER_TYPE, &cds.nonce, &cds.version_info, None))
        .await
        .unwrap();
    let ecds = next(&mut responses)
        .await
        .expect("the filter configuration once its clusters are in");
    assert_eq!(ecds.type_url, ECDS_TYPE);
    tx.send(request(ECDS_TYPE, &ecds.nonce, &ecds.version_info, None))
        .await
        .unwrap();

    // The name moved: the same snapshot's clusters go again with the new address.
    pins_tx.send_replace(pin(&["203.0.113.9"]));
    let moved = next(&mut responses).await.expect("clusters again on a new pin");
    assert_eq!(endpoints(&moved), (static_type, vec!["203.0.113.9".to_string()]));
    // An unchanged pin map sends nothing.
    pins_tx.send_replace(pin(&["203.0.113.9"]));
    assert!(next(&mut responses).await.is_none(), "an unchanged pin resends nothing");
}

/// A name whose lookup does not come holds a push up for the pin wait only: the clusters go
/// with its cluster empty (no address to connect to), the filter configuration after them, and
/// a later change (a connector removed) waits no longer; the pin, when it comes, fills it.
#[tokio::test]
async fn a_name_never_looked_up_holds_pushes_up_for_the_pin_wait_only() {
    let wait = Duration::from_millis(1200);
    let (pins_tx, pins_rx) = watch::channel(Arc::new(PinMap::new()));
    let (_hub, snap_tx, tx, mut responses) = start_with_pins(pins_rx, wait).await;
    let named = named_cluster("slow.example");
    let with = |version: u64, ports: &[u16]| {
        let mut clusters: Vec<UpstreamCluster> = ports.iter().map(|p| cluster(*p)).collect();
        clusters.push(named.clone());
        Some(Arc::new(Snapshot {
            version,
            clusters: Arc::new(clusters),
            filter_config: Arc::new(Document::from_text(format!(r#"{{"marker":"v{version}"}}"#))),
        }))
    };
    // The named cluster's endpoint count in a CDS response.
    let named_endpoints = |r: &DiscoveryResponse| -> usize {
        cluster_named(r, &named.name)
            .load_assignment
            .map(|l| l.endpoints.iter().map(|e| e.lb_endpoints.len()).sum())
            .unwrap_or(0)
    };
    // The next response, however long it takes (at most 5 s), and how long that was.
    async fn timed(stream: &mut tonic::Streaming<DiscoveryResponse>) -> (DiscoveryResponse, Duration) {
        let started = tokio::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a response within 5 s")
            .unwrap()
            .unwrap();
        (r, started.elapsed())
    }

    snap_tx.send_replace(with(1, &[5000, 5001]));
    let (cds, took) = timed(&mut responses).await;
    assert!(took >= wait - Duration::from_millis(50) && took < wait * 2, "{took:?}");
    assert_eq!(cluster_ports(&cds).len(), 3);
    assert_eq!(named_endpoints(&cds), 0, "no address before the name is looked up");
    tx.send(request(CLUSTER_TYPE, &cds.nonce, &cds.version_info, None))
        .await
        .unwrap();
    // The snapshot's wait is over: its filter configuration does not wait again.
    let (ecds, took) = timed(&mut responses).await;
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(marker(&ecds), "v1");
    tx.send(request(ECDS_TYPE, &ecds.nonce, &ecds.version_info, None))
        .await
        .unwrap();

    // A connector removed while the name is still not looked up: its filter configuration
    // goes within the wait too.
    snap_tx.send_replace(with(2, &[5000]));
    let (ecds, took) = timed(&mut responses).await;
    assert!(
        took >= wait - Duration::from_millis(50) && took < wait + Duration::from_millis(500),
        "{took:?}"
    );
    assert_eq!(marker(&ecds), "v2");
    tx.send(request(ECDS_TYPE, &ecds.nonce, &ecds.version_info, None))
        .await
        .unwrap();
    let (cds, took) = timed(&mut responses).await;
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(cds.type_url, CLUSTER_TYPE, "the removed connector's cluster goes after");
    assert_eq!(cluster_ports(&cds).len(), 2);
    tx.send(request(CLUSTER_TYPE, &cds.nonce, &cds.version_info, None))
        .await
        .unwrap();

    // The pin comes: the clusters go again, the name with its address, at once.
    pins_tx.send_replace(pinned("slow.example", &["203.0.113.7"]));
    let (cds, took) = timed(&mut responses).await;
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(named_endpoints(&cds), 1);
}
