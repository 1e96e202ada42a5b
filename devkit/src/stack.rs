//! Owns the assembled scenario shared by the demo and the end-to-end tests: a private registry
//! with a robot account and a sample image, the recorder in front of it, signing keys, and Envoy
//! (with the connector filter, or plain) in front of the recorder. Also the address forms clients
//! use and the secret scan run after tests.

use crate::envoy::{Cluster, ConnectorSpec, Envoy, EnvoySpec, WasmFilter, filter_config};
use crate::image::{self, SampleImage};
use crate::recorder::Recorder;
use crate::registry::Registry;
use crate::skopeo::{Creds, Skopeo};
use crate::tokens::Minter;
use crate::{Result, WorkDir};
use std::net::ToSocketAddrs;

/// The connector every scenario configures.
pub const CONNECTOR_NAMESPACE: &str = "demo";
pub const CONNECTOR_NAME: &str = "registry";
pub const CLUSTER: &str = "upstream_demo_registry";
pub const UPSTREAM_USER: &str = "robot";
pub const PASSWORD_ENV: &str = "DEMO_REGISTRY_PASSWORD";
/// A second connector on the same upstream whose Secret holds a wrong password: the upstream
/// refuses it, which is how tests see the proxy answer an upstream 401.
pub const BROKEN_CONNECTOR_NAME: &str = "stale-secret";
pub const BROKEN_PASSWORD_ENV: &str = "STALE_REGISTRY_PASSWORD";
/// Who besides the connector's own namespace may use it.
pub const ALLOWED_NAMESPACE: &str = "ci";
pub const ALLOWED_SERVICE_ACCOUNT: &str = "other/builder";
/// The sample image in the upstream registry.
pub const REPO: &str = "library/app";
pub const TAG: &str = "v1";

/// Fields drop in declaration order: Envoy stops before the recorder and the registry behind it.
pub struct Stack {
    pub envoy: Envoy,
    /// The wrong password of [`BROKEN_CONNECTOR_NAME`] (still a secret: scanned for like the others).
    pub broken_password: String,
    pub recorder: Recorder,
    pub registry: Registry,
    pub image: SampleImage,
    pub minter: Minter,
    pub skopeo: Skopeo,
    pub work: WorkDir,
}

impl Stack {
    /// Starts everything. `with_filter`: load the release filter module (errors with the build
    /// command when it is missing); otherwise Envoy proxies plainly to the recorder.
    pub fn start(label: &str, with_filter: bool) -> Result<Self> {
        let wasm = if with_filter {
            Some(crate::require_wasm()?)
        } else {
            None
        };
        let work = WorkDir::new(label)?;
        let skopeo = Skopeo::new(&work)?;
        let registry = Registry::start_with_auth(&work, UPSTREAM_USER)?;
        let creds = registry.credentials.clone().ok_or("registry without credentials")?;
        let (image, recorder, minter) = seed_upstream(&work, &skopeo, &registry, &creds.username, &creds.password)?;
        let broken_password = crate::random_secret()?;
        let clusters = vec![Cluster {
            name: CLUSTER.into(),
            port: recorder.port,
        }];
        let filter = wasm.map(|wasm| WasmFilter {
            wasm,
            config: filter_config(
                &minter.jwks(),
                &[
                    ConnectorSpec {
                        namespace: CONNECTOR_NAMESPACE.into(),
                        name: CONNECTOR_NAME.into(),
                        address: recorder.url(),
                        cluster: CLUSTER.into(),
                        username: creds.username.clone(),
                        password_env: PASSWORD_ENV.into(),
                        allowed_namespaces: vec![ALLOWED_NAMESPACE.into()],
                        allowed_service_accounts: vec![ALLOWED_SERVICE_ACCOUNT.into()],
                    },
                    ConnectorSpec {
                        namespace: CONNECTOR_NAMESPACE.into(),
                        name: BROKEN_CONNECTOR_NAME.into(),
                        address: recorder.url(),
                        cluster: CLUSTER.into(),
                        username: creds.username.clone(),
                        password_env: BROKEN_PASSWORD_ENV.into(),
                        allowed_namespaces: vec![],
                        allowed_service_accounts: vec![],
                    },
                ],
            ),
            plain_route: false,
            secret_env: vec![
                (PASSWORD_ENV.into(), creds.password.clone()),
                (BROKEN_PASSWORD_ENV.into(), broken_password.clone()),
            ],
        });
        // The proxy listener speaks TLS with a certificate of a CA made for this work dir;
        // the harness's clients trust it (crate::http::tls_ca).
        let proxy_cert = crate::controller::ProxyCert::for_work(&work)?;
        let envoy = Envoy::start_tls(&work, &EnvoySpec { clusters, filter }, &proxy_cert)?;
        Ok(Self {
            envoy,
            broken_password,
            recorder,
            registry,
            image,
            minter,
            skopeo,
            work,
        })
    }

    /// The upstream robot password (generated at start, never printed).
    pub fn password(&self) -> &str {
        self.registry
            .credentials
            .as_ref()
            .map(|c| c.password.as_str())
            .unwrap_or("")
    }

    /// Path form: `docker://127.0.0.1:<envoy>/namespaces/<ns>/connectors/<name>/<repo>:<tag>`.
    pub fn path_ref(&self, ns: &str, name: &str, repo: &str, tag: &str) -> String {
        format!(
            "docker://{}/namespaces/{ns}/connectors/{name}/{repo}:{tag}",
            self.envoy.authority()
        )
    }

    /// Host form: `docker://c-<name>-connector.<ns>.svc.cluster.local:<envoy>/<repo>:<tag>`.
    pub fn host_ref(&self, ns: &str, name: &str, repo: &str, tag: &str) -> String {
        format!("docker://{}:{}/{repo}:{tag}", host_name(ns, name), self.envoy.port)
    }

    /// Every secret that must never show in Envoy's log or config dump: the upstream password
    /// and every JWT minted so far.
    pub fn secrets(&self) -> Vec<(String, String)> {
        let mut s = vec![
            ("upstream password".to_string(), self.password().to_string()),
            ("stale connector password".to_string(), self.broken_password.clone()),
        ];
        s.push((
            "upstream Basic credential".into(),
            crate::http::basic_value(UPSTREAM_USER, self.password()),
        ));
        for (i, t) in self.minter.issued().into_iter().enumerate() {
            // The signature part alone is enough to identify a leaked token.
            let sig = t.rsplit('.').next().unwrap_or("").to_string();
            if sig.len() > 16 {
                s.push((format!("signature of minted JWT #{i}"), sig));
            }
            s.push((format!("minted JWT #{i}"), t));
        }
        s
    }

    /// Problems found in Envoy's log and `/config_dump`: secrets that appear there and
    /// `[critical]` wasm lines. Empty means clean.
    pub fn envoy_hygiene_problems(&self) -> Result<Vec<String>> {
        envoy_problems(&self.envoy, &self.secrets())
    }
}

/// Secrets (`(what, value)`) that appear in Envoy's log or `/config_dump`, and `[critical]` wasm
/// lines. Empty means clean. Shared by every scenario.
pub fn envoy_problems(envoy: &Envoy, secrets: &[(String, String)]) -> Result<Vec<String>> {
    let log = envoy.log();
    let dump = envoy.config_dump()?;
    let mut problems = Vec::new();
    for (what, secret) in secrets {
        if secret.is_empty() {
            continue;
        }
        if log.contains(secret.as_str()) {
            problems.push(format!("{what} appears in Envoy's log {}", envoy.log_path().display()));
        }
        if dump.contains(secret.as_str()) {
            problems.push(format!("{what} appears in Envoy's /config_dump"));
        }
    }
    for l in envoy.critical_wasm_lines() {
        problems.push(format!("critical wasm line in Envoy's log: {l}"));
    }
    Ok(problems)
}

/// What every scenario puts around its registry: the sample image pushed straight to it with
/// the robot account (so the recorder only ever sees proxied traffic), the recorder in front of
/// it, and the ServiceAccount token minter.
pub fn seed_upstream(
    work: &WorkDir,
    skopeo: &Skopeo,
    registry: &Registry,
    username: &str,
    password: &str,
) -> Result<(SampleImage, Recorder, Minter)> {
    let image = image::build_sample(work, "app", TAG, 3)?;
    image::push(
        skopeo,
        &image,
        &registry.authority(),
        REPO,
        Creds::Basic(username, password),
    )?;
    let recorder = Recorder::start(registry.port)?;
    let minter = Minter::new(&work.sub("keys")?)?;
    Ok((image, recorder, minter))
}

/// `c-<name>-connector.<ns>.svc.cluster.local`.
pub fn host_name(ns: &str, name: &str) -> String {
    crate::envoy::HOST_PATTERN
        .replace("{name}", name)
        .replace("{namespace}", ns)
}

/// Host-form pulls need the connector host names to resolve to loopback (scripts/setup.sh adds
/// them to /etc/hosts, as a cluster's DNS would resolve them to the proxy).
pub fn check_host_form_resolves(ns: &str, name: &str) -> Result<()> {
    let host = host_name(ns, name);
    let ok = (host.as_str(), 80)
        .to_socket_addrs()
        .map(|mut a| a.any(|a| a.ip().is_loopback()))
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{host} does not resolve to 127.0.0.1: run `bash scripts/setup.sh` as root (it adds the connector host names to /etc/hosts)"
        ))
    }
}
