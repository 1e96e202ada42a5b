//! `connector-controller`: `crd` prints the CRD; `render` is file mode, turning a directory of
//! Connector and Secret manifests into the filter configuration, its env file and the Envoy
//! clusters it needs (the stop-gap until the controller serves xDS).

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage:
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
