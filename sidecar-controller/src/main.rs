//! `connector-controller`: `serve` runs the controller (xDS server for Envoy, the filter's
//! loopback channel, ops endpoints) fed by a manifest directory (file mode) or the Kubernetes
//! API; `crd` prints the CRD; `render` writes file mode's output once, for a static Envoy.

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage:
  connector-controller serve --kube --proxy-url <http(s)://proxy address> --wasm <module path as Envoy sees it>
        [--kube-url <API server URL; default: in-cluster or KUBECONFIG>] [--audience oci-connector[,...]]
        [--namespace <ns; default all>] [--strict-proxy-subresource] [--reprobe-seconds 60]
        [--identity-refresh-seconds 300] [--identity-min-interval-seconds 30]
        [--access-allow-ttl-seconds 30] [--access-deny-ttl-seconds 5] [--revocation-seconds 5]
        [--leader-lease <namespace>/<name>] [--leader-lease-seconds 15]
        [--istio-wasmplugin <namespace>/<name>]
        (--proxy-tls-secret <namespace>/<name> | --proxy-tls-cert <file> --proxy-tls-key <file>
         | --proxy-tls-external | --proxy-plain-http)
      API mode: Connectors and Secrets from the cluster, status and Events written back
      (with --leader-lease, only by the replica holding that Lease; identity: $POD_NAME),
      ServiceAccount keys from the API server, access by RBAC (SubjectAccessReview).
      --istio-wasmplugin: in an Istio gateway, the rendered filter configuration is also written
      into that WasmPlugin's spec.pluginConfig (server-side apply, only when it changes).
  connector-controller serve --manifests <dir> --identity <file.json> --wasm <module path as Envoy sees it>
        [--xds 127.0.0.1:18000] [--channel 127.0.0.1:18001] [--ops 127.0.0.1:18002]
        [--channel-cluster connector_controller] [--poll-ms 30000]
        [--upstream-ca /etc/ssl/certs/ca-certificates.crt] [--allow-local-upstreams]
        [--host-grants <namespace>=<host or *.suffix>[,...]]
        [--config-parts-from 5000 | --config-parts | --config-inline]
        (--proxy-tls-cert <file> --proxy-tls-key <file> | --proxy-plain-http)
      File mode: a directory of Connector and Secret manifests, watched with inotify (and
      re-scanned every --poll-ms as a safety net). Both modes:
      The proxy listener speaks TLS (h2, http/1.1) with the certificate the controller hands Envoy
      over SDS: a kubernetes.io/tls Secret (cert-manager's tls.crt/tls.key), watched, or PEM files,
      re-read on change. --proxy-tls-external serves none: TLS is terminated by the gateway the
      filter runs in (Istio's Gateway, credentialName). --proxy-plain-http (legacy) serves none:
      only for Envoy's plain listener.
      --config-parts: the filter configuration Envoy gets lists its connectors as parts (runs of
      64-128 connectors, by content id) that the filter fetches over the channel, so a change
      sends one part and a short list, not every connector. --config-inline: every connector
      in the configuration. By default (--config-parts-from N, 5000) parts once N connectors
      are served, inline again below nine tenths of N: inline costs Envoy less per change
      below about 5,000. Always inline with --istio-wasmplugin.
      The channel key is read from the environment variable CONNECTOR_CHANNEL_KEY (required
      in API mode; Envoy must have the same variable); logs go to stderr as JSON (RUST_LOG filters).
      Upstreams on loopback or the pod's own address are refused unless --allow-local-upstreams;
      link-local addresses (cloud metadata) and the controller's own ports always, for an IP
      literal and for each address a host name resolves to: the controller resolves upstream
      names (again every 30 s) and gives Envoy only the admitted addresses. In API mode spec.hosts must
      be in the Connector's namespace (*.<ns>.svc...) or granted with --host-grants.
  (client configuration for a connector: the connector-client-config binary)
  connector-controller crd
  connector-controller render --manifests <dir> --identity <file.json> --out <dir>
        [--upstream-ca /etc/ssl/certs/ca-certificates.crt]";

/// mimalloc rather than glibc's allocator: a change's transient copies (the serialised
/// configuration, 4 MB at 20,000 connectors) were kept by glibc after they were freed, and the
/// controller's memory grew with every change (issue 17; `make bench-scale` shows both).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(args.first().map(String::as_str), Some("-h" | "--help" | "help")) {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match args.first().map(String::as_str) {
        Some("crd") if args.len() == 1 => match connector_controller::crd::crd_yaml() {
            Ok(y) => {
                print!("{y}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("connector-controller crd: {e}");
                ExitCode::FAILURE
            }
        },
        Some("render") => render(&args[1..]),
        Some("serve") => serve(&args[1..]),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// Parses `args` with clap: `valued` flags take one value (`--flag v` or `--flag=v`),
/// `switches` none. Returns the values given and the switches set, or clap's message (one line).
fn parse_flags(
    command: &'static str,
    args: &[String],
    valued: &[&'static str],
    switches: &[&'static str],
) -> Result<(std::collections::HashMap<String, String>, Vec<&'static str>), String> {
    use clap::{Arg, ArgAction, Command};
    let long = |f: &'static str| f.trim_start_matches("--");
    // A repeated flag: the last one counts, as before clap.
    let mut cmd = Command::new(command)
        .no_binary_name(true)
        .disable_help_flag(true)
        .args_override_self(true);
    for f in valued {
        let arg = Arg::new(*f).long(long(f)).value_name("VALUE");
        cmd = cmd.arg(arg.num_args(1).action(ArgAction::Set));
    }
    for f in switches {
        cmd = cmd.arg(Arg::new(*f).long(long(f)).action(ArgAction::SetTrue));
    }
    let m = cmd
        .try_get_matches_from(args)
        .map_err(|e| connector_core::cli::one_line(&e.to_string()))?;
    let values = valued
        .iter()
        .filter_map(|f| m.get_one::<String>(f).map(|v| (f.to_string(), v.clone())))
        .collect();
    let set = switches.iter().copied().filter(|f| m.get_flag(f)).collect();
    Ok((values, set))
}

fn render(args: &[String]) -> ExitCode {
    let flags = match parse_flags(
        "render",
        args,
        &["--manifests", "--identity", "--out", "--upstream-ca"],
        &[],
    ) {
        Ok((flags, _)) => flags,
        Err(e) => {
            eprintln!("connector-controller render: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let path = |f: &str| flags.get(f).map(PathBuf::from);
    let (manifests, identity, out, ca) = (
        path("--manifests"),
        path("--identity"),
        path("--out"),
        path("--upstream-ca"),
    );
    let (Some(manifests), Some(identity), Some(out)) = (manifests, identity, out) else {
        eprintln!("connector-controller render: --manifests, --identity and --out are all required\n{USAGE}");
        return ExitCode::from(2);
    };
    let rendered = match connector_controller::render::render_files(&manifests, &identity) {
        Ok(r) => r,
        Err(problems) => {
            eprintln!(
                "connector-controller render: {} problem(s); nothing written:",
                problems.len()
            );
            for p in problems {
                eprintln!("  {p}");
            }
            return ExitCode::FAILURE;
        }
    };
    let ca = ca.map_or_else(
        || connector_controller::xds::SYSTEM_CA_BUNDLE.to_string(),
        |p| p.display().to_string(),
    );
    match rendered.write_with_ca(&out, &ca) {
        Ok(w) => {
            // Counts and paths only: the env file's values stay in the env file.
            println!(
                "rendered {} connector(s), {} cluster(s): {}, {} (mode 0600), {}, {}",
                rendered.filter_config.connectors.len(),
                rendered.clusters.len(),
                w.filter_config.display(),
                w.env.display(),
                w.clusters.display(),
                w.envoy_clusters.display()
            );
            // `serve` pins host names to screened addresses; a static Envoy cannot.
            let named: Vec<String> = rendered
                .clusters
                .iter()
                .filter(|c| connector_controller::pin::is_named(c))
                .map(|c| format!("{}:{}", c.host, c.port))
                .collect();
            if !named.is_empty() {
                eprintln!(
                    "connector-controller render: note: {} upstream(s) named by host name ({}): a static Envoy \
                     resolves them itself (LOGICAL_DNS) and connects wherever they resolve to, loopback and the \
                     link-local metadata address included; `serve` resolves, screens and pins them",
                    named.len(),
                    named.join(", ")
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("connector-controller render: writing into {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}

/// The channel key's variable, in the controller's environment and in Envoy's.
const CHANNEL_KEY_ENV: &str = "CONNECTOR_CHANNEL_KEY";

/// Flags of `serve` that take no value.
const SWITCHES: &[&str] = &[
    "--kube",
    "--strict-proxy-subresource",
    "--allow-local-upstreams",
    "--proxy-plain-http",
    "--proxy-tls-external",
    "--config-parts",
    "--config-inline",
];

/// Flags of `serve` that take a value: those of both modes, of file mode, of API mode.
const COMMON_FLAGS: &[&str] = &[
    "--wasm",
    "--xds",
    "--channel",
    "--ops",
    "--channel-cluster",
    "--upstream-ca",
    "--proxy-tls-cert",
    "--proxy-tls-key",
    "--config-parts-from",
];
const FILE_FLAGS: &[&str] = &["--manifests", "--identity", "--poll-ms"];
const KUBE_FLAGS: &[&str] = &[
    "--kube-url",
    "--proxy-url",
    "--audience",
    "--namespace",
    "--reprobe-seconds",
    "--identity-refresh-seconds",
    "--identity-min-interval-seconds",
    "--access-allow-ttl-seconds",
    "--access-deny-ttl-seconds",
    "--revocation-seconds",
    "--host-grants",
    "--leader-lease",
    "--leader-lease-seconds",
    "--proxy-tls-secret",
    "--istio-wasmplugin",
];

/// How the pushed configuration carries the connectors: `--config-inline`, `--config-parts`,
/// or by their number (`--config-parts-from`, the default); inline with `--istio-wasmplugin`.
fn config_delivery(
    flags: &std::collections::HashMap<String, String>,
    switch: &dyn Fn(&str) -> bool,
    problems: &mut Vec<String>,
) -> connector_controller::pipeline::Delivery {
    use connector_controller::pipeline::{DEFAULT_PARTS_FROM, Delivery};
    let from = flags.get("--config-parts-from");
    let chosen: Vec<&str> = ["--config-inline", "--config-parts"]
        .into_iter()
        .filter(|f| switch(f))
        .chain(from.map(|_| "--config-parts-from"))
        .collect();
    if chosen.len() > 1 {
        problems.push(format!(
            "{} choose the configuration's delivery: give one",
            chosen.join(" and ")
        ));
    }
    if flags.contains_key("--istio-wasmplugin") || switch("--config-inline") {
        return Delivery::Inline;
    }
    if switch("--config-parts") {
        return Delivery::Parts;
    }
    let from = match from.map(|v| v.parse::<usize>()) {
        None => DEFAULT_PARTS_FROM,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            problems.push(format!(
                "--config-parts-from {:?}: expected a number of connectors, 1 or more (--config-parts: always)",
                from.map(String::as_str).unwrap_or_default()
            ));
            DEFAULT_PARTS_FROM
        }
    };
    Delivery::Auto { from }
}

/// Where desired state comes from.
enum Source {
    Files(connector_controller::filemode::FileSettings),
    Kube {
        url: Option<String>,
        settings: Box<connector_controller::kube_mode::KubeSettings>,
        /// `--istio-wasmplugin`: `(namespace, name)`.
        wasmplugin: Option<(String, String)>,
    },
}

fn serve(args: &[String]) -> ExitCode {
    use connector_controller::{pipeline::ChannelSettings, serve, xds::WasmSettings};
    let valued: Vec<&'static str> = [COMMON_FLAGS, FILE_FLAGS, KUBE_FLAGS].concat();
    let (flags, switches) = match parse_flags("serve", args, &valued, SWITCHES) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("connector-controller serve: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let switch = |f: &str| switches.contains(&f);
    let (kube, strict, allow_local, plain_http, tls_external) = (
        switch("--kube"),
        switch("--strict-proxy-subresource"),
        switch("--allow-local-upstreams"),
        switch("--proxy-plain-http"),
        switch("--proxy-tls-external"),
    );
    let get = |f: &str, default: &str| flags.get(f).cloned().unwrap_or_else(|| default.to_string());
    // Every problem of the command line at once.
    let mut problems = vec![];
    let mut addr = |f: &str, default: &str| match get(f, default).parse::<std::net::SocketAddr>() {
        Ok(a) => Some(a),
        Err(e) => {
            problems.push(format!("{f}: {e}: expected ip:port"));
            None
        }
    };
    let (xds, channel, ops) = (
        addr("--xds", "127.0.0.1:18000"),
        addr("--channel", "127.0.0.1:18001"),
        addr("--ops", "127.0.0.1:18002"),
    );
    let number = |f: &str, default: &str, problems: &mut Vec<String>| {
        get(f, default)
            .parse::<u64>()
            .map_err(|e| problems.push(format!("{f}: {e}: expected a whole number")))
            .ok()
    };
    if !flags.contains_key("--wasm") {
        problems.push("--wasm is required: the filter module's path as Envoy sees it".into());
    }
    let delivery = config_delivery(&flags, &switch, &mut problems);
    let source = if kube {
        for f in FILE_FLAGS.iter().filter(|f| flags.contains_key(**f)) {
            problems.push(format!(
                "{f} is for file mode; API mode (--kube) reads Connectors and Secrets from the cluster"
            ));
        }
        if !flags.contains_key("--proxy-url") {
            problems.push("--proxy-url is required with --kube: the proxy's address as clients reach it (NodePort or Ingress), e.g. http://192.168.1.10:31567".into());
        }
        let secs = |f: &str, default: &str, problems: &mut Vec<String>| {
            std::time::Duration::from_secs(number(f, default, problems).unwrap_or(1).max(1))
        };
        let reprobe = secs("--reprobe-seconds", "60", &mut problems);
        let identity_refresh = secs("--identity-refresh-seconds", "300", &mut problems);
        let identity_min = secs("--identity-min-interval-seconds", "30", &mut problems);
        let allow_ttl = secs("--access-allow-ttl-seconds", "30", &mut problems);
        let deny_ttl = secs("--access-deny-ttl-seconds", "5", &mut problems);
        let revocation = secs("--revocation-seconds", "5", &mut problems);
        let mut settings = connector_controller::kube_mode::KubeSettings::new(get("--proxy-url", ""));
        settings.audiences = get("--audience", "oci-connector")
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect();
        settings.namespace = flags.get("--namespace").cloned();
        settings.strict_proxy_subresource = strict;
        settings.reprobe_period = reprobe;
        settings.identity_refresh = identity_refresh;
        settings.identity_min_interval = identity_min;
        settings.access_allow_ttl = allow_ttl;
        settings.access_deny_ttl = deny_ttl;
        settings.revocation = revocation;
        let lease_duration = secs("--leader-lease-seconds", "15", &mut problems);
        if let Some(lease) = flags.get("--leader-lease") {
            match lease.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
                    let identity = std::env::var("POD_NAME")
                        .ok()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| {
                            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                            format!("{}-{}", host.trim(), std::process::id())
                        });
                    settings.leader_lease = Some(connector_controller::kube_mode::LeaseSettings {
                        namespace: ns.to_string(),
                        name: name.to_string(),
                        identity,
                        duration: lease_duration,
                    });
                }
                _ => problems.push(format!("--leader-lease {lease:?}: expected <namespace>/<name>")),
            }
        }
        if flags.contains_key("--istio-wasmplugin") {
            // The WasmPlugin's configuration is renamed for istiod's clusters as a whole
            // document (istio.rs), and istiod, not this controller, pushes it to Envoy.
            for f in ["--config-parts", "--config-parts-from"] {
                if switch(f) || flags.contains_key(f) {
                    problems.push(format!(
                        "{f} is not supported with --istio-wasmplugin: the WasmPlugin carries the whole configuration"
                    ));
                }
            }
        }
        let wasmplugin = flags.get("--istio-wasmplugin").and_then(|t| {
            connector_controller::wasmplugin::parse_target(t)
                .map_err(|e| problems.push(e))
                .ok()
        });
        Source::Kube {
            url: flags.get("--kube-url").cloned(),
            settings: Box::new(settings),
            wasmplugin,
        }
    } else {
        for f in KUBE_FLAGS.iter().filter(|f| flags.contains_key(**f)) {
            problems.push(format!("{f} needs --kube (API mode)"));
        }
        if strict {
            problems.push("--strict-proxy-subresource needs --kube (API mode)".into());
        }
        for required in ["--manifests", "--identity"] {
            if !flags.contains_key(required) {
                problems.push(format!("{required} is required in file mode (or use --kube)"));
            }
        }
        // Changes arrive through inotify; this is only the safety re-scan (filemode.rs).
        let poll = number("--poll-ms", "30000", &mut problems);
        Source::Files(connector_controller::filemode::FileSettings {
            manifests: PathBuf::from(get("--manifests", "")),
            identity: PathBuf::from(get("--identity", "")),
            poll: std::time::Duration::from_millis(poll.unwrap_or(30000).max(50)),
        })
    };
    let proxy_tls = proxy_tls_source(&flags, plain_http, tls_external, &mut problems);
    let (Some(xds), Some(channel), Some(ops), true) = (xds, channel, ops, problems.is_empty()) else {
        for p in problems {
            eprintln!("connector-controller serve: {p}");
        }
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    init_logging();
    let channel_key = std::env::var(CHANNEL_KEY_ENV).ok().filter(|k| !k.is_empty());
    if kube && channel_key.is_none() {
        eprintln!(
            "connector-controller serve: {CHANNEL_KEY_ENV} must be set in API mode (and in Envoy's environment): without a key, any process in the pod could read every registry credential from the channel"
        );
        return ExitCode::from(2);
    }
    let mut grants = vec![];
    for g in get("--host-grants", "")
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
    {
        match g.split_once('=') {
            Some((ns, host)) if !ns.is_empty() && !host.is_empty() => {
                grants.push((ns.to_string(), host.to_ascii_lowercase()))
            }
            _ => {
                eprintln!("connector-controller serve: --host-grants {g:?}: expected <namespace>=<host or *.suffix>");
                return ExitCode::from(2);
            }
        }
    }
    let tenancy = connector_controller::pipeline::Tenancy {
        tenants: kube,
        host_grants: grants,
        allow_local_upstreams: allow_local,
        own_ports: vec![],
        // The pod's IP, when the Deployment passes it (downward API `status.podIP`).
        own_addresses: std::env::var("POD_IP")
            .ok()
            .and_then(|ip| ip.parse().ok())
            .into_iter()
            .collect(),
    };
    let settings = serve::ServeSettings {
        xds,
        channel,
        ops,
        channel_settings: ChannelSettings {
            cluster: get("--channel-cluster", "connector_controller"),
            key_env: channel_key.as_ref().map(|_| CHANNEL_KEY_ENV.to_string()),
            delivery,
        },
        wasm: WasmSettings {
            module_path: get("--wasm", ""),
            host_env_keys: channel_key
                .as_ref()
                .map(|_| vec![CHANNEL_KEY_ENV.to_string()])
                .unwrap_or_default(),
        },
        channel_key,
        upstream_ca: get("--upstream-ca", connector_controller::xds::SYSTEM_CA_BUNDLE),
        tenancy,
        istio_wasmplugin: None,
    };
    match connector_controller::pin::raise_open_file_limit() {
        Ok(limit) => tracing::debug!(limit, "open files"),
        Err(e) => tracing::warn!(error = %e, "the open-file limit stays as it was"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("connector-controller serve: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run_source(source, settings, proxy_tls));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "controller stopped");
            eprintln!("connector-controller serve: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the source beside the controller's listeners. API mode also gives the channel its
/// RBAC access check (SubjectAccessReview).
async fn run_source(
    source: Source,
    mut settings: connector_controller::serve::ServeSettings,
    proxy_tls: Option<connector_controller::proxy_tls::CertSource>,
) -> anyhow::Result<()> {
    use connector_controller::{authz, channel::AccessCheck, filemode, hub::Hub, kube_mode, proxy_tls, serve};
    let hub = Hub::new();
    match source {
        Source::Files(files) => {
            if let Some(tls) = proxy_tls {
                // Not ready before the first certificate (set before anything can render).
                hub.metrics.set_awaiting_proxy_cert(true);
                tokio::spawn(proxy_tls::run(tls, None, hub.clone()));
            }
            tokio::spawn(filemode::run(files, hub.clone()));
            serve::serve(settings, hub, None).await
        }
        Source::Kube {
            url,
            settings: kube,
            wasmplugin,
        } => {
            // kube and reqwest use rustls with ring; install it as the process default once.
            let _ = rustls::crypto::ring::default_provider().install_default();
            // The probes trust what Envoy's clusters trust, and go only where the proxy may.
            connector_controller::probe::use_upstream_ca(&settings.upstream_ca)
                .map_err(|e| anyhow::anyhow!("--upstream-ca: {e}"))?;
            connector_controller::probe::use_tenancy(settings.effective_tenancy());
            let config = match url {
                Some(u) => kube::Config::new(u.parse().map_err(|e| anyhow::anyhow!("--kube-url {u:?}: {e}"))?),
                None => kube::Config::infer()
                    .await
                    .map_err(|e| anyhow::anyhow!("no Kubernetes configuration (in-cluster or KUBECONFIG): {e}"))?,
            };
            let client = kube::Client::try_from(config)?;
            settings.istio_wasmplugin = wasmplugin.map(|(namespace, name)| connector_controller::wasmplugin::Target {
                client: client.clone(),
                namespace,
                name,
            });
            let access: std::sync::Arc<dyn AccessCheck> = std::sync::Arc::new(authz::Authorizer::new(
                client.clone(),
                kube.authz(),
                hub.metrics.review_observer(),
            ));
            if let Some(tls) = proxy_tls {
                hub.metrics.set_awaiting_proxy_cert(true);
                tokio::spawn(proxy_tls::run(tls, Some(client.clone()), hub.clone()));
            }
            let mut source = tokio::spawn(kube_mode::run(client, *kube, hub.clone()));
            let served = serve::serve(settings, hub, Some(access));
            tokio::pin!(served);
            tokio::select! {
                // The same signal reaches the source: give the Lease holder a moment to hand it back.
                served = &mut served => {
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), &mut source).await;
                    served
                }
                ended = &mut source => match ended {
                    // Only a shutdown signal ends the source cleanly: let the servers finish too.
                    Ok(Ok(())) => served.await,
                    Ok(Err(e)) => Err(e.context("the Kubernetes source failed")),
                    Err(e) => anyhow::bail!("the Kubernetes source panicked: {e}"),
                },
            }
        }
    }
}

/// The proxy listener's certificate source: exactly one of a Secret (API mode), a certificate
/// and key file pair, TLS terminated by someone else (an Istio Gateway: `None`), or the
/// explicit plain-HTTP opt-in (`None`).
fn proxy_tls_source(
    flags: &std::collections::HashMap<String, String>,
    plain_http: bool,
    tls_external: bool,
    problems: &mut Vec<String>,
) -> Option<connector_controller::proxy_tls::CertSource> {
    use connector_controller::proxy_tls::CertSource;
    let secret = flags.get("--proxy-tls-secret");
    let (cert, key) = (flags.get("--proxy-tls-cert"), flags.get("--proxy-tls-key"));
    let files = cert.is_some() || key.is_some();
    let chosen =
        usize::from(secret.is_some()) + usize::from(files) + usize::from(plain_http) + usize::from(tls_external);
    if chosen != 1 {
        problems.push(
            "the proxy listener speaks TLS: give exactly one of --proxy-tls-secret <ns>/<name> (API mode), --proxy-tls-cert <file> --proxy-tls-key <file>, --proxy-tls-external (TLS terminated in front of this Envoy's filter by another proxy, e.g. an Istio Gateway) or --proxy-plain-http (legacy: clients must then treat the proxy as an insecure registry and ServiceAccount tokens cross the network in clear text)".into(),
        );
        return None;
    }
    if let Some(s) = secret {
        return match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Some(CertSource::Secret {
                namespace: ns.to_string(),
                name: name.to_string(),
            }),
            _ => {
                problems.push(format!("--proxy-tls-secret {s:?}: expected <namespace>/<name>"));
                None
            }
        };
    }
    match (cert, key) {
        (Some(cert), Some(key)) => Some(CertSource::Files {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
            poll: std::time::Duration::from_millis(500),
        }),
        (None, None) => None,
        _ => {
            problems.push("--proxy-tls-cert and --proxy-tls-key go together".into());
            None
        }
    }
}

/// JSON lines on stderr; `RUST_LOG` filters (default `info`). No line carries a credential:
/// the types that hold one redact it in `Debug`, and the channel logs connector names only.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
