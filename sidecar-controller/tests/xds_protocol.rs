//! The ADS server's protocol bookkeeping, driven over real gRPC by tonic's generated ADS client
//! (the same protocol messages Envoy sends): nothing before a snapshot, clusters before the
//! filter configuration, ACKs move `ProxyState::accepted`, a NACK is recorded with its message
//! and counted and nothing is resent, stale nonces are ignored. Envoy itself is exercised end to
//! end in `tests/tests/controller_xds.rs`; a NACK is hard to provoke from a real Envoy on
//! purpose, which is why this path is tested here.

use std::sync::Arc;
use std::time::Duration;

use connector_controller::hub::Hub;
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
    let service = Ads::new(snap_rx, wasm, "/ca.pem".into(), hub.clone()).into_service();
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
        clusters: vec![cluster(5000)],
        filter_config: config.into(),
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
        clusters: vec![cluster(5000)],
        filter_config: r#"{"marker":"v2"}"#.into(),
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
        clusters: vec![cluster(5000), cluster(5001)],
        filter_config: r#"{"marker":"v3"}"#.into(),
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
