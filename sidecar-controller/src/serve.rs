//! Owns the running controller: the render pipeline between the hub's inputs and the xDS
//! snapshot, and the three listeners: xDS (gRPC, for Envoy's bootstrap), the loopback channel
//! (for the filter), and the ops endpoints (`/healthz`, `/readyz`, `/metrics`). Shuts down
//! gracefully on SIGTERM / Ctrl-C: listeners stop accepting, open streams end, and Envoy keeps
//! serving with the configuration it has.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::channel::{AccessCheck, Channel, CredentialTable, Credentials, PartTable, Parts};
use crate::hub::{Hub, Published, acked_floor};
use crate::live::LiveRender;
use crate::ops::Metrics;
use crate::pipeline::{ChannelSettings, Revisions, Tenancy};
use crate::xds::{Ads, Snapshot, WasmSettings};

#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub xds: SocketAddr,
    /// Must be a loopback address: credentials cross it.
    pub channel: SocketAddr,
    pub ops: SocketAddr,
    pub channel_settings: ChannelSettings,
    /// The channel key, read from the controller's environment (`channel_settings.key_env`).
    pub channel_key: Option<String>,
    pub wasm: WasmSettings,
    /// CA bundle (PEM file, as Envoy's filesystem sees it) for https upstreams.
    pub upstream_ca: String,
    /// What Connector authors may claim (hosts, token realm clusters, upstream addresses).
    pub tenancy: Tenancy,
    /// API mode in an Istio gateway: the rendered filter configuration also goes into this
    /// WasmPlugin (`--istio-wasmplugin`), with revisions every replica shares.
    pub istio_wasmplugin: Option<crate::wasmplugin::Target>,
}

impl ServeSettings {
    /// The operator's tenancy plus the controller's own listeners, which are never an upstream.
    pub fn effective_tenancy(&self) -> Tenancy {
        let mut tenancy = self.tenancy.clone();
        for a in [self.xds, self.channel, self.ops] {
            tenancy.own_ports.push(a.port());
            if !a.ip().is_loopback() && !a.ip().is_unspecified() {
                tenancy.own_addresses.push(a.ip());
            }
        }
        tenancy
    }
}

/// Renders every new [`crate::hub::Inputs`] and hands the result on: credentials to the
/// channel first, then the snapshot to xDS (so a filter that sees the new configuration finds
/// the new credential), then what was configured to the hub for status reporting. Credentials
/// a rendering drops stay served until every Envoy acknowledged a configuration without them
/// (make before break, [`CredentialTable`]). `istio`: clusters named as Istio names them
/// (`--istio-wasmplugin`).
#[allow(clippy::too_many_arguments)]
pub async fn pipeline(
    hub: Hub,
    istio: bool,
    channel: ChannelSettings,
    tenancy: Tenancy,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    credentials: watch::Sender<Credentials>,
    parts: watch::Sender<Parts>,
    revisions: Revisions,
) {
    let mut inputs = hub.inputs();
    let mut acked = hub.filter_acked();
    let mut table = CredentialTable::default();
    let mut part_table = PartTable::default();
    let mut live = LiveRender::default();
    let mut version = 0u64;
    // The last snapshot sent, compared with each rendering (held, not copied: the document is
    // megabytes at 20,000 connectors).
    let mut last: Option<Arc<Snapshot>> = None;
    let mut fresh_inputs = true;
    loop {
        let current = if fresh_inputs {
            inputs.borrow_and_update().clone()
        } else {
            None
        };
        if let Some(i) = current {
            let started = Instant::now();
            // In an Istio gateway the clusters are istiod's, named its way (module `istio`).
            let rendered = live.update(&i, &channel, &revisions, &tenancy).map(|out| {
                if istio {
                    crate::istio::renamed_output(&live, out)
                } else {
                    out
                }
            });
            match rendered {
                Ok(r) => {
                    Metrics::result(&hub.metrics.renders, "ok");
                    // The live renderer gives the same document (`Arc`) when nothing in it
                    // changed: no comparison of megabytes. Istio mode's is made anew each time.
                    let same = last.as_ref().is_some_and(|s| {
                        let document = Arc::ptr_eq(&s.filter_config, &r.config_json)
                            || (istio && s.filter_config == r.config_json);
                        document && *s.clusters == *r.clusters
                    });
                    if !same {
                        version += 1;
                    }
                    table.install(r.credentials, version);
                    credentials.send_replace(table.served());
                    // Parts too are served before a configuration lists them.
                    part_table.install(&r.parts, version);
                    parts.send_replace(part_table.served());
                    if !same {
                        let snapshot = Arc::new(Snapshot {
                            version,
                            clusters: r.clusters,
                            filter_config: r.config_json,
                        });
                        snapshots.send_replace(Some(Arc::clone(&snapshot)));
                        last = Some(snapshot);
                    }
                    // Logged when it happens, not again on every later change.
                    for (key, problems) in &r.newly_left_out {
                        for p in problems {
                            tracing::warn!(connector = %format!("{}/{}", key.0, key.1), problem = %p, "connector left out of the proxy configuration");
                        }
                    }
                    tracing::info!(
                        version,
                        connectors = r.connectors.len(),
                        left_out = r.left_out.len(),
                        rerendered = r.rendered,
                        settled = r.settled,
                        render_ms = started.elapsed().as_millis() as u64,
                        "configuration rendered"
                    );
                    hub.metrics.connectors_configured.set(r.connectors.len() as i64);
                    if let Some(s) = &last {
                        hub.metrics.filter_config_bytes.set(s.filter_config.len() as i64);
                    }
                    hub.publish_rendered(Published {
                        version,
                        connectors: r.connectors,
                        left_out: r.left_out,
                        refused: vec![],
                    });
                    hub.metrics.set_ready(true);
                }
                Err(problems) => {
                    Metrics::result(&hub.metrics.renders, "refused");
                    tracing::error!(
                        problems = problems.len(),
                        "configuration refused as a whole; Envoy keeps the previous one"
                    );
                    for p in &problems {
                        tracing::error!(problem = %p, "configuration problem");
                    }
                }
            }
        }
        let floor = acked_floor(&acked.borrow_and_update());
        if table.advance(floor, Instant::now()) {
            tracing::debug!(
                kept = table.retired_len(),
                "credentials no Envoy configuration names any more were dropped"
            );
            credentials.send_replace(table.served());
        }
        if part_table.advance(floor, Instant::now()) {
            parts.send_replace(part_table.served());
        }
        let deadline = match (table.next_deadline(), part_table.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            changed = inputs.changed() => {
                if changed.is_err() { return; }
                fresh_inputs = true;
            }
            changed = acked.changed() => {
                if changed.is_err() { return; }
                fresh_inputs = false;
            }
            () = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => fresh_inputs = false,
        }
    }
}

/// SIGTERM (a pod being deleted) or Ctrl-C. Every caller is woken: the servers stop, and the
/// Lease holder hands its Lease back (`kube_mode::lead`).
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn ops_router(metrics: Arc<Metrics>) -> axum::Router {
    let ready = metrics.clone();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let (is_ready, awaiting_cert) = (ready.is_ready(), ready.is_awaiting_proxy_cert());
                async move {
                    if is_ready {
                        (StatusCode::OK, "ready\n").into_response()
                    } else if awaiting_cert {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: no valid proxy TLS certificate loaded yet (the Secret or files named by --proxy-tls-*; the log says why)\n",
                        )
                            .into_response()
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: the source has not synced or nothing was rendered yet\n",
                        )
                            .into_response()
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.render_text();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
}

/// Runs the pipeline and the listeners until a shutdown signal. The source (file mode or the
/// Kubernetes API) runs beside it and publishes into `hub`.
pub async fn serve(settings: ServeSettings, hub: Hub, access: Option<Arc<dyn AccessCheck>>) -> anyhow::Result<()> {
    if !settings.channel.ip().is_loopback() {
        anyhow::bail!(
            "--channel {} is not a loopback address: the channel hands out registry credentials and must only be reachable inside the pod",
            settings.channel
        );
    }
    let (snap_tx, snap_rx) = watch::channel(None);
    let (cred_tx, cred_rx) = watch::channel(Credentials::default());
    let (parts_tx, parts_rx) = watch::channel(Parts::default());
    let tenancy = settings.effective_tenancy();
    // One WasmPlugin configures every replica's filter: revisions keyed by the shared channel key.
    let revisions = match (&settings.istio_wasmplugin, &settings.channel_key) {
        (Some(_), Some(key)) => Revisions::with_key(crate::wasmplugin::revision_key(key)),
        (Some(_), None) => anyhow::bail!(
            "--istio-wasmplugin needs the channel key ({:?})",
            settings.channel_settings.key_env
        ),
        (None, _) => Revisions::new(),
    };
    // Envoy resolves no upstream name (nor, in Istio mode, the gateway's): the controller
    // does, and pins what the tenancy admits.
    let (pins_tx, pins_rx) = watch::channel(Arc::new(crate::pin::PinMap::new()));
    tokio::spawn(crate::pin::run(
        settings.effective_tenancy(),
        snap_rx.clone(),
        pins_tx,
        crate::pin::REFRESH,
        hub.metrics.clone(),
    ));
    if let Some(target) = settings.istio_wasmplugin.clone() {
        let progress = crate::istio::Progress::new(hub.clone());
        let upstreams = crate::istio::Upstreams {
            client: target.client.clone(),
            namespace: target.namespace.clone(),
            plugin: target.name.clone(),
            ca_bundle: settings.upstream_ca.clone(),
        };
        // The clusters of the configuration the WasmPlugin holds, whose upstreams stay while
        // a newer one is not written (refused as too large).
        let (held_tx, held_rx) = watch::channel(None);
        tokio::spawn(crate::istio::run(
            upstreams,
            snap_rx.clone(),
            held_rx,
            pins_rx.clone(),
            progress.clone(),
        ));
        tokio::spawn(crate::wasmplugin::run(target, snap_rx.clone(), held_tx, progress));
    }
    tokio::spawn(pipeline(
        hub.clone(),
        settings.istio_wasmplugin.is_some(),
        settings.channel_settings.clone(),
        tenancy,
        snap_tx,
        cred_tx,
        parts_tx,
        revisions,
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let channel = Channel::new(cred_rx, settings.channel_key.as_deref(), access, hub.clone())
        .with_parts(parts_rx)
        .router();
    let channel_listener = tokio::net::TcpListener::bind(settings.channel).await?;
    let ops_listener = tokio::net::TcpListener::bind(settings.ops).await?;
    let xds_listener = tokio::net::TcpListener::bind(settings.xds).await?;
    tracing::info!(
        xds = %xds_listener.local_addr()?,
        channel = %channel_listener.local_addr()?,
        ops = %ops_listener.local_addr()?,
        "listening"
    );
    let channel_task = tokio::spawn(
        axum::serve(channel_listener, channel)
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
    );
    let ops_task = tokio::spawn(
        axum::serve(ops_listener, ops_router(hub.metrics.clone()))
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
    );
    let ads = Ads::new(
        snap_rx,
        pins_rx,
        settings.wasm.clone(),
        settings.upstream_ca.clone(),
        hub.clone(),
    );
    let xds_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ads.into_service())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(xds_listener),
                stopped(stop_rx.clone()),
            ),
    );

    shutdown_signal().await;
    tracing::info!("shutting down: Envoy keeps serving with the configuration it has");
    let _ = stop_tx.send(true);
    // Streams that do not end within a few seconds are dropped with the process.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let _ = xds_task.await;
        let _ = channel_task.await;
        let _ = ops_task.await;
    })
    .await;
    Ok(())
}
