//! `connector-controller`: `serve` runs the controller (xDS server for Envoy, the filter's
//! loopback channel, ops endpoints) fed by a manifest directory (file mode) or the Kubernetes
//! API; `crd` prints the CRD; `render` writes file mode's output once, for a static Envoy.

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage:
  connector-controller serve --manifests <dir> --identity <file.json> --wasm <module path as Envoy sees it>
        [--xds 127.0.0.1:18000] [--channel 127.0.0.1:18001] [--ops 127.0.0.1:18002]
        [--channel-cluster connector_controller] [--poll-ms 500]
        [--upstream-ca /etc/ssl/certs/ca-certificates.crt]
      The channel key is read from the environment variable CONNECTOR_CHANNEL_KEY when set
      (Envoy must have the same variable); logs go to stderr as JSON (RUST_LOG filters).
  connector-controller crd
  connector-controller render --manifests <dir> --identity <file.json> --out <dir>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
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

fn render(args: &[String]) -> ExitCode {
    let (mut manifests, mut identity, mut out) = (None, None, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--manifests" => &mut manifests,
            "--identity" => &mut identity,
            "--out" => &mut out,
            _ => {
                eprintln!("connector-controller render: unknown argument {flag:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        };
        *slot = it.next().map(PathBuf::from);
    }
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
    match rendered.write(&out) {
        Ok(w) => {
            // Counts and paths only: the env file's values stay in the env file.
            println!(
                "rendered {} connector(s), {} cluster(s): {}, {} (mode 0600), {}",
                rendered.filter_config["connectors"].as_array().map_or(0, Vec::len),
                rendered.clusters.len(),
                w.filter_config.display(),
                w.env.display(),
                w.clusters.display()
            );
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

fn serve(args: &[String]) -> ExitCode {
    use connector_controller::{filemode, hub::Hub, pipeline::ChannelSettings, serve, xds::WasmSettings};
    let mut flags = std::collections::HashMap::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let known = [
            "--manifests",
            "--identity",
            "--wasm",
            "--xds",
            "--channel",
            "--ops",
            "--channel-cluster",
            "--poll-ms",
            "--upstream-ca",
        ];
        if !known.contains(&flag.as_str()) {
            eprintln!("connector-controller serve: unknown argument {flag:?}\n{USAGE}");
            return ExitCode::from(2);
        }
        let Some(v) = it.next() else {
            eprintln!("connector-controller serve: {flag} needs a value\n{USAGE}");
            return ExitCode::from(2);
        };
        flags.insert(flag.clone(), v.clone());
    }
    let get = |f: &str, default: &str| flags.get(f).cloned().unwrap_or_else(|| default.to_string());
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
    for required in ["--manifests", "--identity", "--wasm"] {
        if !flags.contains_key(required) {
            problems.push(format!("{required} is required"));
        }
    }
    let poll = get("--poll-ms", "500")
        .parse::<u64>()
        .map_err(|e| problems.push(format!("--poll-ms: {e}")))
        .ok();
    let (Some(xds), Some(channel), Some(ops), Some(poll), true) = (xds, channel, ops, poll, problems.is_empty()) else {
        for p in problems {
            eprintln!("connector-controller serve: {p}");
        }
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    init_logging();
    let channel_key = std::env::var(CHANNEL_KEY_ENV).ok().filter(|k| !k.is_empty());
    let settings = serve::ServeSettings {
        xds,
        channel,
        ops,
        channel_settings: ChannelSettings {
            cluster: get("--channel-cluster", "connector_controller"),
            key_env: channel_key.as_ref().map(|_| CHANNEL_KEY_ENV.to_string()),
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
    };
    let files = filemode::FileSettings {
        manifests: PathBuf::from(get("--manifests", "")),
        identity: PathBuf::from(get("--identity", "")),
        poll: std::time::Duration::from_millis(poll.max(50)),
    };
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
    let result = runtime.block_on(async move {
        let hub = Hub::new();
        tokio::spawn(filemode::run(files, hub.clone()));
        serve::serve(settings, hub, None).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "controller stopped");
            eprintln!("connector-controller serve: {e:#}");
            ExitCode::FAILURE
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
