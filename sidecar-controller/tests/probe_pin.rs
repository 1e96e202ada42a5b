//! The controller's probes screen the addresses a host name resolves to by the rule an IP
//! literal meets (module `pin`), so a Connector whose address is a name resolving to loopback
//! (without `--allow-local-upstreams`) is reported `UpstreamNotAllowed` and never contacted.
//! The name is one `scripts/setup.sh` maps to 127.0.0.1 in /etc/hosts, as a tenant's own DNS
//! could; a listener there counts the connections it gets. One test: the probes' policy is set
//! once per process.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use connector_controller::pipeline::Tenancy;
use connector_controller::probe::{self, UPSTREAM_NOT_ALLOWED};

const NAME: &str = "c-registry-connector.demo.svc.cluster.local";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_resolving_to_loopback_is_not_probed_nor_connected_to() {
    let resolved: Vec<_> = tokio::net::lookup_host((NAME, 80))
        .await
        .unwrap_or_else(|e| {
            panic!("{NAME} does not resolve ({e}): run `bash scripts/setup.sh` as root (it adds it to /etc/hosts)")
        })
        .map(|a| a.ip())
        .collect();
    assert!(
        resolved.iter().all(|ip| ip.is_loopback()),
        "{NAME} must resolve to loopback: {resolved:?}"
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((_conn, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    let address = format!("http://{NAME}:{port}");

    probe::use_tenancy(Tenancy::default());
    let client = probe::client_with_ca(connector_controller::xds::SYSTEM_CA_BUNDLE).unwrap();
    let e = probe::liveness_with(&client, &address).await.unwrap_err();
    assert_eq!(e.reason, UPSTREAM_NOT_ALLOWED, "{e}");
    assert!(
        e.message.contains(&format!(
            "{NAME} resolves only to refused addresses: 127.0.0.1:{port} is a loopback address"
        )),
        "{e}"
    );

    // The client's own resolver screens too (a name rebound after the check): the request
    // fails before any connection, naming why.
    let err = client.get(format!("{address}/v2/")).send().await.unwrap_err();
    let mut chain = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(&err);
    let mut refused = false;
    while let Some(s) = source {
        chain.push_str(&format!("{s}; "));
        refused |= s.downcast_ref::<connector_controller::pin::Refused>().is_some();
        source = s.source();
    }
    assert!(refused && chain.contains("loopback"), "{chain}");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "nothing connected to the refused address"
    );
}
