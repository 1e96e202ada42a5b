//! Owns the token-auth scenario: a registry with `auth: token` (Distribution 2.8) trusting the
//! harness's [`TokenServer`] on its own port, the recorder in front of the registry, and Envoy
//! with the connector filter in front of the recorder. Envoy also has a cluster for the token
//! server, and the connector lists that realm in `tokenRealms` (a realm on another host:port than
//! the registry must be allowed by name); a second connector on the same upstream does not list
//! it, so the filter must refuse to send the robot's credential there.

use crate::envoy::{Cluster, ConnectorSpec, Envoy, EnvoySpec, WasmFilter, filter_config};
use crate::image::SampleImage;
use crate::recorder::Recorder;
use crate::registry::{Credentials, Registry};
use crate::skopeo::Skopeo;
use crate::stack::{CONNECTOR_NAME, CONNECTOR_NAMESPACE, PASSWORD_ENV, UPSTREAM_USER};
use crate::token_server::TokenServer;
use crate::tokens::Minter;
use crate::{Result, WorkDir};
use serde_json::json;
use std::sync::{Mutex, MutexGuard};

/// Envoy's cluster for the token server.
pub const TOKEN_CLUSTER: &str = "token_realm_test_server";
/// The upstream cluster (to the recorder in front of the token-auth registry).
pub const UPSTREAM_CLUSTER: &str = "upstream_token_registry";
/// A connector on the same upstream whose configuration does not list the token realm.
pub const UNLISTED_REALM_CONNECTOR: &str = "unlisted-realm";

/// Fields drop in declaration order: Envoy stops before what it proxies to.
pub struct TokenStack {
    pub envoy: Envoy,
    pub recorder: Recorder,
    /// Behind a lock because revoking tokens restarts it; its port never changes.
    registry: Mutex<Registry>,
    pub registry_port: u16,
    pub token_server: TokenServer,
    pub image: SampleImage,
    pub minter: Minter,
    pub skopeo: Skopeo,
    password: String,
    pub work: WorkDir,
}

impl TokenStack {
    /// Starts everything with the release filter module (errors with the build command when it
    /// is missing), or a plain Envoy to the recorder when `with_filter` is false.
    pub fn start(label: &str, with_filter: bool) -> Result<Self> {
        let wasm = if with_filter {
            Some(crate::require_wasm()?)
        } else {
            None
        };
        let work = WorkDir::new(label)?;
        let skopeo = Skopeo::new(&work)?;
        let password = crate::random_secret()?;
        let token_server = TokenServer::start(&work, UPSTREAM_USER, &password)?;
        let registry = Registry::start_token_auth(
            &work,
            &token_server,
            Credentials {
                username: UPSTREAM_USER.into(),
                password: password.clone(),
            },
        )?;
        // skopeo does the token dance itself with the robot account.
        let (image, recorder, minter) =
            crate::stack::seed_upstream(&work, &skopeo, &registry, UPSTREAM_USER, &password)?;
        let address = recorder.url();
        let connector = |name: &str| ConnectorSpec {
            namespace: CONNECTOR_NAMESPACE.into(),
            name: name.into(),
            address: address.clone(),
            cluster: UPSTREAM_CLUSTER.into(),
            username: UPSTREAM_USER.into(),
            password_env: PASSWORD_ENV.into(),
            allowed_namespaces: vec![],
            allowed_service_accounts: vec![],
        };
        let mut listed = connector(CONNECTOR_NAME).to_json();
        listed["tokenRealms"] = json!([{ "url": token_server.realm(), "cluster": TOKEN_CLUSTER }]);
        let unlisted = connector(UNLISTED_REALM_CONNECTOR).to_json();
        let filter = wasm.map(|wasm| {
            let mut config = filter_config(&minter.jwks(), &[]);
            config["connectors"] = json!([listed, unlisted]);
            WasmFilter {
                wasm,
                config,
                plain_route: false,
                secret_env: vec![(PASSWORD_ENV.into(), password.clone())],
            }
        });
        let clusters = vec![
            Cluster {
                name: UPSTREAM_CLUSTER.into(),
                port: recorder.port,
            },
            Cluster {
                name: TOKEN_CLUSTER.into(),
                port: token_server.port,
            },
        ];
        // The proxy listener speaks TLS with a certificate of a CA made for this work dir;
        // the harness's clients trust it (crate::http::tls_ca).
        let proxy_cert = crate::controller::ProxyCert::for_work(&work)?;
        let envoy = Envoy::start_tls(&work, &EnvoySpec { clusters, filter }, &proxy_cert)?;
        // The set-up push fetched tokens; tests count only their own.
        token_server.take();
        Ok(Self {
            envoy,
            recorder,
            registry_port: registry.port,
            registry: Mutex::new(registry),
            token_server,
            image,
            minter,
            skopeo,
            password,
            work,
        })
    }

    /// The robot password (the token server's account; generated at start, never printed).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// `127.0.0.1:<registry>` (direct, bypassing Envoy and the recorder).
    pub fn registry_authority(&self) -> String {
        format!("127.0.0.1:{}", self.registry_port)
    }

    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Revokes every upstream token issued so far (the token server signs with a new key, the
    /// registry restarts trusting only that key).
    pub fn revoke_issued_tokens(&self) -> Result<()> {
        self.registry().trust_only_new_tokens(&self.token_server)
    }

    /// Path form: `docker://127.0.0.1:<envoy>/namespaces/<ns>/connectors/<name>/<repo>:<tag>`.
    pub fn path_ref(&self, name: &str, repo: &str, tag: &str) -> String {
        format!(
            "docker://{}/namespaces/{CONNECTOR_NAMESPACE}/connectors/{name}/{repo}:{tag}",
            self.envoy.authority()
        )
    }

    /// Host form: `docker://c-<name>-connector.demo.svc.cluster.local:<envoy>/<repo>:<tag>`.
    pub fn host_ref(&self, name: &str, repo: &str, tag: &str) -> String {
        format!(
            "docker://{}:{}/{repo}:{tag}",
            crate::stack::host_name(CONNECTOR_NAMESPACE, name),
            self.envoy.port
        )
    }

    /// Every secret that must never show in Envoy's log or config dump: the robot password and
    /// Basic credential, every upstream token the token server issued, every client JWT minted.
    pub fn secrets(&self) -> Vec<(String, String)> {
        let mut s = vec![
            ("upstream password".to_string(), self.password.clone()),
            (
                "upstream Basic credential".to_string(),
                crate::http::basic_value(UPSTREAM_USER, &self.password),
            ),
        ];
        for (i, t) in self.token_server.issued().into_iter().enumerate() {
            s.push((format!("upstream token #{i}"), t));
        }
        for (i, t) in self.minter.issued().into_iter().enumerate() {
            s.push((format!("minted JWT #{i}"), t));
        }
        s
    }

    /// Problems found in Envoy's log and `/config_dump` (see [`crate::stack::envoy_problems`]).
    pub fn envoy_hygiene_problems(&self) -> Result<Vec<String>> {
        crate::stack::envoy_problems(&self.envoy, &self.secrets())
    }
}
