//! Owns the running webhook: command-line settings, the HTTPS listener (rustls with ring, the
//! certificate and key read from files as mounted from a Secret), the routes (`POST /mutate`,
//! `GET /healthz`) and the connector lookup through the Kubernetes API.
//!
//! Failure mode, written once: when the Connector cannot be read the pod is denied (fail
//! closed), matching the webhook configuration's `failurePolicy: Fail`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use connector_api::authz::{Authorizer, AuthzSettings, ignore_reviews, service_account_groups};
use connector_api::crd::Connector;
use connector_core::verb::Verb;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::mutate::{self, AddressForm, Config, ConnectorInfo, ConnectorRef, Decision, Lookup};

pub const USAGE: &str = "usage:
  connector-webhook --tls-cert <pem> --tls-key <pem> --proxy-host <host[:port] of the proxy as images name it>
        [--listen 0.0.0.0:8443] [--host-form] [--host-pattern c-{name}-connector.{namespace}.svc.cluster.local]
        [--disabled] [--kube-url <API server URL; default: in-cluster or KUBECONFIG>]
        [--rbac [--strict-proxy-subresource]]
      Serves POST /mutate (AdmissionReview v1) and GET /healthz over HTTPS. Pods labelled
      connectors.cpaas.io/proxy-inject=true with annotation connectors.cpaas.io/connector=<ns>/<name>
      get the images of the connector's registry rewritten to the proxy (path form by default);
      with --disabled such pods are denied. Who may use a connector: its allowedNamespaces and
      allowedServiceAccounts, as the filter's rules mode; with --rbac (for a proxy whose
      controller runs --kube) the SubjectAccessReview the proxy asks for a pull, for the pod's
      ServiceAccount. Logs go to stderr as JSON (RUST_LOG filters).";

/// How long one Connector read may take; the API server's webhook timeout is 10 s by default.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The command line, parsed.
#[derive(Debug, Clone)]
pub struct Settings {
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub listen: SocketAddr,
    pub kube_url: Option<String>,
    pub config: Config,
    /// `Some(strict)`: RBAC mode, as the controller's `--kube` (`--strict-proxy-subresource`).
    pub rbac: Option<bool>,
}

/// The flags (clap); [`Settings::from_args`] checks the values with messages that say what was
/// expected.
#[derive(clap::Parser, Debug)]
#[command(name = "connector-webhook", disable_version_flag = true, disable_help_flag = true)]
struct Flags {
    #[arg(long)]
    tls_cert: PathBuf,
    #[arg(long)]
    tls_key: PathBuf,
    #[arg(long)]
    proxy_host: String,
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: String,
    #[arg(long)]
    host_pattern: Option<String>,
    #[arg(long)]
    kube_url: Option<String>,
    #[arg(long)]
    host_form: bool,
    #[arg(long)]
    disabled: bool,
    #[arg(long)]
    rbac: bool,
    #[arg(long)]
    strict_proxy_subresource: bool,
}

impl Settings {
    /// From the command line (without the program name); `--help` is the caller's.
    pub fn from_args(args: &[String]) -> Result<Self, String> {
        use clap::Parser as _;
        let f = Flags::try_parse_from(std::iter::once("connector-webhook").chain(args.iter().map(String::as_str)))
            .map_err(|e| clap_message(&e))?;
        let listen = f
            .listen
            .parse()
            .map_err(|e| format!("--listen {:?}: {e} (expected ip:port)", f.listen))?;
        let form = if f.host_form {
            AddressForm::Host
        } else {
            AddressForm::Path
        };
        let config = Config::new(&f.proxy_host, form, f.host_pattern.as_deref(), !f.disabled)?;
        if f.strict_proxy_subresource && !f.rbac {
            return Err("--strict-proxy-subresource is a setting of --rbac".into());
        }
        Ok(Self {
            tls_cert: f.tls_cert,
            tls_key: f.tls_key,
            listen,
            kube_url: f.kube_url,
            config,
            rbac: f.rbac.then_some(f.strict_proxy_subresource),
        })
    }
}

fn clap_message(e: &clap::Error) -> String {
    connector_core::cli::one_line(&e.to_string())
}

/// Reads the certificate chain and key; errors name the file, never its content.
pub fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<rustls::ServerConfig> {
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
    let certs = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse certificates in {}", cert.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", cert.display());
    }
    let key = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .with_context(|| format!("parse the private key in {}", key.display()))?
        .ok_or_else(|| anyhow!("{} holds no PEM private key", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Where connectors come from. The server uses [`KubeConnectors`]; the trait keeps the handler
/// testable without an API server.
pub trait Connectors: Send + Sync + 'static {
    /// The connector `c`, for a pod running as `user` (`system:serviceaccount:<ns>:<name>`).
    fn lookup(&self, c: &ConnectorRef, user: &str) -> impl Future<Output = Lookup> + Send;
}

/// Connectors read from the Kubernetes API, one GET per admission (no cache: a new Connector
/// is usable at once, and admissions are rare next to pulls). In RBAC mode (`authorizer`),
/// whether the pod's ServiceAccount may pull is the controller's own [`Authorizer`]'s answer:
/// the SubjectAccessReview the proxy asks, with the same verb and resource.
#[derive(Clone)]
pub struct KubeConnectors {
    client: kube::Client,
    authorizer: Option<Authorizer>,
}

impl KubeConnectors {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            authorizer: None,
        }
    }

    /// RBAC mode, as the controller's `--kube` (with `strict`: `--strict-proxy-subresource`).
    pub fn with_rbac(client: kube::Client, strict: bool) -> Self {
        let settings = AuthzSettings {
            strict,
            ..AuthzSettings::default()
        };
        Self {
            authorizer: Some(Authorizer::new(client.clone(), settings, ignore_reviews())),
            client,
        }
    }
}

impl Connectors for KubeConnectors {
    async fn lookup(&self, c: &ConnectorRef, user: &str) -> Lookup {
        let api: kube::Api<Connector> = kube::Api::namespaced(self.client.clone(), &c.namespace);
        let mut info = match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_opt(&c.name)).await {
            Err(_) => {
                return Lookup::Failed(format!(
                    "no answer from the Kubernetes API within {}s (errors are retried until then)",
                    LOOKUP_TIMEOUT.as_secs()
                ));
            }
            Ok(Err(e)) => return Lookup::Failed(format!("the Kubernetes API answered with an error: {e}")),
            Ok(Ok(None)) => return Lookup::NotFound,
            Ok(Ok(Some(connector))) => match ConnectorInfo::from_connector(&connector) {
                Ok(info) => info,
                Err(e) => return Lookup::Failed(format!("its spec.address is unusable ({e}); fix the Connector")),
            },
        };
        if let Some(authz) = &self.authorizer {
            let groups = service_account_groups(user);
            let review = authz.allowed(user, &groups, &c.namespace, &c.name, Verb::Pull);
            match tokio::time::timeout(LOOKUP_TIMEOUT, review).await {
                Ok(Ok(d)) => info.rbac_allowed = Some(d.allowed),
                Ok(Err(e)) => return Lookup::Failed(format!("the SubjectAccessReview failed: {e}")),
                Err(_) => return Lookup::Failed("the SubjectAccessReview got no answer in time".into()),
            }
        }
        Lookup::Found(info)
    }
}

struct AppState<C> {
    config: Config,
    connectors: C,
}

/// The routes: `POST /mutate`, `GET /healthz`.
pub fn router<C: Connectors>(config: Config, connectors: C) -> Router {
    Router::new()
        .route("/mutate", post(mutate_handler::<C>))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Arc::new(AppState { config, connectors }))
}

async fn mutate_handler<C: Connectors>(State(state): State<Arc<AppState<C>>>, body: Bytes) -> Response {
    let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return invalid(format!("the body is not an AdmissionReview of a Pod: {e}")),
    };
    let req: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(_) => return invalid("the AdmissionReview has no request".into()),
    };
    let found = match mutate::wanted_connector(&req, &state.config) {
        Some(c) => {
            let ns = req.namespace.as_deref().unwrap_or_default();
            let sa = req.object.as_ref().map_or("default", mutate::pod_service_account);
            let user = format!("system:serviceaccount:{ns}:{sa}");
            Some(state.connectors.lookup(&c, &user).await)
        }
        None => None,
    };
    let decision = mutate::review(&req, &state.config, |_| found.unwrap_or(Lookup::NotFound));
    log_decision(&req, &decision);
    Json(mutate::review_response(&req.uid, &decision)).into_response()
}

/// A body the webhook cannot read: HTTP 400 with an AdmissionReview denial (no uid to copy).
fn invalid(message: String) -> Response {
    tracing::warn!(reason = "invalid_request", %message, "admission request refused");
    let body = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": "",
            "allowed": false,
            "status": { "status": "Failure", "code": 400, "reason": "BadRequest", "message": message },
        },
    });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// One line per admission: who, what was decided and why; image names, never credentials.
fn log_decision(req: &AdmissionRequest<Pod>, decision: &Decision) {
    let ns = req.namespace.as_deref().unwrap_or_default();
    let pod = req
        .object
        .as_ref()
        .and_then(|p| p.metadata.name.as_deref().or(p.metadata.generate_name.as_deref()))
        .unwrap_or(&req.name);
    match decision {
        Decision::Allow { why } => tracing::debug!(uid = %req.uid, namespace = ns, pod, why, "admitted untouched"),
        Decision::Patch { rewrites, .. } => {
            let images: Vec<String> = rewrites
                .iter()
                .map(|r| format!("{}[{}]: {} -> {}", r.kind, r.container, r.from, r.to))
                .collect();
            tracing::info!(uid = %req.uid, namespace = ns, pod, rewritten = images.len(), images = ?images, "images rewritten");
        }
        Decision::Deny { code, reason, message } => {
            tracing::info!(uid = %req.uid, namespace = ns, pod, code, reason = reason.as_str(), %message, "pod denied");
        }
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves.
pub async fn serve_tls(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = TowerToHyperService::new(router);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// The whole program after argument parsing: kube client, TLS, listener, SIGTERM.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    // kube uses rustls with ring; install it as the process default once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = tls_config(&settings.tls_cert, &settings.tls_key)?;
    let kube_config = match &settings.kube_url {
        Some(u) => kube::Config::new(u.parse().map_err(|e| anyhow!("--kube-url {u:?}: {e}"))?),
        None => kube::Config::infer()
            .await
            .map_err(|e| anyhow!("no Kubernetes configuration (in-cluster or KUBECONFIG): {e}"))?,
    };
    let client = kube::Client::try_from(kube_config)?;
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listen on {}", settings.listen))?;
    tracing::info!(
        listen = %settings.listen,
        config = ?settings.config,
        "connector-webhook serving POST /mutate and GET /healthz over HTTPS"
    );
    let connectors = match settings.rbac {
        Some(strict) => KubeConnectors::with_rbac(client, strict),
        None => KubeConnectors::new(client),
    };
    let router = router(settings.config.clone(), connectors);
    serve_tls(listener, tls, router, shutdown_signal()).await?;
    tracing::info!("shut down");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn command_line() {
        let s = Settings::from_args(&args("--tls-cert c.pem --tls-key k.pem --proxy-host proxy:31567")).unwrap();
        assert_eq!(s.listen, "0.0.0.0:8443".parse::<SocketAddr>().unwrap());
        assert_eq!(
            (s.tls_cert.to_str(), s.tls_key.to_str()),
            (Some("c.pem"), Some("k.pem"))
        );
        assert_eq!(s.kube_url, None);
        let c = ConnectorRef::parse("demo/hub").unwrap();
        assert_eq!(s.config.host_of(&c), "c-hub-connector.demo.svc.cluster.local");
        let s = Settings::from_args(&args(
            "--tls-cert c --tls-key k --proxy-host p --listen 127.0.0.1:9443 --host-form \
             --host-pattern {name}.{namespace}.reg --disabled --kube-url http://127.0.0.1:1",
        ))
        .unwrap();
        assert_eq!(s.listen.port(), 9443);
        assert_eq!(s.kube_url.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(s.config.host_of(&c), "hub.demo.reg");
        assert_eq!(s.rbac, None);
        let s = Settings::from_args(&args("--tls-cert c --tls-key k --proxy-host p --rbac")).unwrap();
        assert_eq!(s.rbac, Some(false));
        let s = Settings::from_args(&args(
            "--tls-cert c --tls-key k --proxy-host p --rbac --strict-proxy-subresource",
        ))
        .unwrap();
        assert_eq!(s.rbac, Some(true));
        for (bad, needle) in [
            (
                "--tls-cert c --tls-key k",
                "required arguments were not provided: --proxy-host <PROXY_HOST>",
            ),
            ("--tls-cert c --tls-key k --proxy-host p --listen nowhere", "--listen"),
            ("--tls-cert c --tls-key k --proxy-host http://p", "--proxy-host"),
            (
                "--tls-cert c --tls-key k --proxy-host p --host-pattern {name}.svc",
                "--host-pattern",
            ),
            (
                "--tls-cert c --tls-key k --proxy-host p --verbose",
                "unexpected argument '--verbose'",
            ),
            ("--tls-cert", "a value is required for '--tls-cert <TLS_CERT>'"),
            (
                "--tls-cert c --tls-key k --proxy-host p --strict-proxy-subresource",
                "a setting of --rbac",
            ),
        ] {
            let e = Settings::from_args(&args(bad)).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    /// Connectors from a fixed answer, counting lookups.
    struct Fixed(Lookup, Arc<std::sync::atomic::AtomicUsize>);

    impl Connectors for Fixed {
        async fn lookup(&self, _: &ConnectorRef, _: &str) -> Lookup {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.clone()
        }
    }

    async fn post(router: Router, body: String) -> (StatusCode, serde_json::Value) {
        let resp = router
            .oneshot(
                Request::post("/mutate")
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    fn review_of(annotation: &str) -> String {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-9",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "namespace": "demo",
                "operation": "CREATE",
                "userInfo": {},
                "object": {
                    "metadata": {
                        "name": "p",
                        "labels": { mutate::INJECT_LABEL: "true" },
                        "annotations": { mutate::CONNECTOR_ANNOTATION: annotation },
                    },
                    "spec": { "containers": [{ "name": "a", "image": "nginx" }] },
                },
            }
        })
        .to_string()
    }

    #[tokio::test]
    async fn the_handler_looks_up_once_and_answers_a_review() {
        let config = Config::new("proxy:1", AddressForm::Path, None, true).unwrap();
        let info = ConnectorInfo {
            registry: "docker.io".into(),
            allowed_namespaces: vec![],
            allowed_service_accounts: vec![],
            rbac_allowed: None,
        };
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r = router(config.clone(), Fixed(Lookup::Found(info), count.clone()));
        let (status, v) = post(r.clone(), review_of("demo/hub")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["response"]["uid"], "u-9");
        assert_eq!(v["response"]["patchType"], "JSONPatch");
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A malformed annotation is refused without a lookup.
        let (_, v) = post(r.clone(), review_of("hub")).await;
        assert_eq!(v["response"]["allowed"], false);
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Not JSON, or no request: HTTP 400 with a denial.
        let (status, v) = post(r.clone(), "[]".into()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(v["response"]["allowed"], false);
        let (status, _) = post(
            r,
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        let failing = router(config, Fixed(Lookup::Failed("boom".into()), count.clone()));
        let (_, v) = post(failing, review_of("demo/hub")).await;
        assert_eq!(v["response"]["allowed"], false);
        assert_eq!(v["response"]["status"]["code"], 500);
    }

    #[test]
    fn tls_material_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("webhook-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = tls_config(&empty, &empty).unwrap_err().to_string();
        assert!(e.contains("holds no PEM certificate") && e.contains("empty.pem"), "{e}");
        let e = tls_config(&dir.join("missing.pem"), &empty).unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
