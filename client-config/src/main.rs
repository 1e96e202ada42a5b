//! `connector-client-config`: writes the client files for one connector (see the library).
//! I/O only: flags into [`ClientSettings`], every problem with the input listed at once, the
//! written paths on stdout (never the token).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser as _;
use connector_client_config::{ClientSettings, Format, read_token_file, write_all};

/// Client configuration for a connector: docker config.json, containerd hosts.toml,
/// buildkitd.toml, registries.conf (CRI-O, podman, skopeo, buildah), daemon.json; with
/// --proxy-ca, the CA where each client reads it (hosts.toml's ca, certs.d/<proxy>/ca.crt).
#[derive(clap::Parser)]
#[command(name = "connector-client-config", disable_version_flag = true)]
struct Flags {
    /// The connector, <namespace>/<name>.
    #[arg(long)]
    connector: Option<String>,
    /// The upstream registry as images name it ([https://]host[:port]).
    #[arg(long)]
    address: Option<String>,
    /// The proxy's origin, https://host[:port] (http:// only for the legacy plain listener).
    #[arg(long)]
    proxy: Option<String>,
    /// The connector's host-form name, e.g. c-<name>-connector.<ns>.svc.cluster.local.
    #[arg(long)]
    host_name: Option<String>,
    /// A file holding the ServiceAccount token for docker config.json (written 0600).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The CA (PEM) the proxy's certificate chains to.
    #[arg(long, conflicts_with = "skip_verify")]
    proxy_ca: Option<PathBuf>,
    /// Do not verify the proxy's certificate (no CA to give the clients).
    #[arg(long)]
    skip_verify: bool,
    /// Comma-separated formats (default: all): docker,containerd,buildkit,registries,daemon.
    #[arg(long)]
    format: Option<String>,
    /// The directory to write into.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let flags = match Flags::try_parse() {
        Ok(f) => f,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match settings(&flags) {
        Ok((settings, formats, out)) => match write_all(&settings, &formats, &out) {
            Ok(paths) => {
                // Paths only: config.json may hold the token.
                for p in paths {
                    println!("{}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("connector-client-config: {e}");
                ExitCode::FAILURE
            }
        },
        Err(problems) => {
            for p in problems {
                eprintln!("connector-client-config: {p}");
            }
            eprintln!("see connector-client-config --help");
            ExitCode::from(2)
        }
    }
}

/// The settings, or every problem with the flags.
fn settings(f: &Flags) -> Result<(ClientSettings, Vec<Format>, PathBuf), Vec<String>> {
    let mut problems = vec![];
    for (flag, given) in [
        ("--connector", f.connector.is_some()),
        ("--address", f.address.is_some()),
        ("--proxy", f.proxy.is_some()),
        ("--out", f.out.is_some()),
    ] {
        if !given {
            problems.push(format!("{flag} is required"));
        }
    }
    let (namespace, name) = match f.connector.as_deref().map(|c| c.split_once('/')) {
        Some(Some((ns, n))) if !ns.is_empty() && !n.is_empty() => (ns.to_string(), n.to_string()),
        Some(_) => {
            problems.push("--connector: expected <namespace>/<name>".into());
            (String::new(), String::new())
        }
        None => (String::new(), String::new()),
    };
    let formats: Vec<Format> = match &f.format {
        None => Format::ALL.to_vec(),
        Some(list) => list
            .split(',')
            .filter_map(|one| {
                Format::parse(one.trim())
                    .map_err(|e| problems.push(format!("--format: {e}")))
                    .ok()
            })
            .collect(),
    };
    let token = f.token_file.as_deref().and_then(|file| {
        read_token_file(file)
            .map_err(|e| problems.push(format!("--token-file {}: {e}", file.display())))
            .ok()
    });
    let proxy_ca = f.proxy_ca.as_deref().and_then(|file| match read_ca(file) {
        Ok(pem) => Some(pem),
        Err(e) => {
            problems.push(e);
            None
        }
    });
    if !problems.is_empty() {
        return Err(problems);
    }
    let settings = ClientSettings {
        namespace,
        name,
        upstream: f.address.clone().unwrap_or_default(),
        proxy: f.proxy.clone().unwrap_or_default(),
        host_name: f.host_name.clone(),
        token,
        skip_verify: f.skip_verify,
        proxy_ca,
    };
    Ok((settings, formats, f.out.clone().unwrap_or_default()))
}

fn read_ca(file: &Path) -> Result<String, String> {
    match std::fs::read_to_string(file) {
        Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => Ok(pem),
        Ok(_) => Err(format!("--proxy-ca {}: no PEM certificate in it", file.display())),
        Err(e) => Err(format!("--proxy-ca {}: {e}", file.display())),
    }
}
