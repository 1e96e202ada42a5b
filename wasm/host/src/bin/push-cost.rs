//! Measures what a configuration push costs one filter VM (issue 17): the shipped module under
//! wasmtime with Cranelift's optimisations, configured with N connectors (the controller's
//! form: `fromController` credentials), then pushed configurations that each change one
//! connector's credential revision, as a Secret rotation does. Each push is a new root context
//! in the running VM, as Envoy delivers ECDS. Prints the median and worst time per push.
//!
//! `push-cost [--sizes 1000,5000,20000] [--pushes 20] [module.wasm]`

use std::process::ExitCode;
use std::time::{Duration, Instant};

use connector_wasm_host::{Host, Options, arg};
use serde_json::{Value, json};

/// A controller-rendered document: `n` connectors over 50 namespaces, connector `changed`
/// carrying revision `rev`.
fn document(n: usize, changed: usize, rev: usize) -> Result<String, String> {
    let jwk = connector_wasm_host::warm::test_jwk().map_err(|e| format!("{e:#}"))?;
    let entries: Vec<Value> = (0..n)
        .map(|i| {
            let revision = if i == changed {
                format!("r{rev}-{i}")
            } else {
                format!("r0-{i}")
            };
            json!({
                "namespace": format!("team-{}", i % 50), "name": format!("c{i}"),
                "address": "https://registry.internal:5000",
                "cluster": "upstream_https_registry_internal_5000_0123abcd",
                "credential": {"fromController": revision},
            })
        })
        .collect();
    Ok(json!({
        "identity": {"issuers": [connector_wasm_host::warm::ISSUER], "audiences": [connector_wasm_host::warm::AUDIENCE],
            "jwks": {"keys": [jwk]}},
        "controller": {"cluster": "connector_controller", "authority": "controller.local"},
        "connectors": entries,
    })
    .to_string())
}

fn measure(
    n: usize,
    pushes: usize,
    module: Option<std::path::PathBuf>,
) -> Result<(Duration, Duration, Duration), String> {
    let mut h = Host::with(Options {
        module,
        optimized: true,
        ..Options::default()
    })
    .map_err(|e| format!("{e:#}"))?;
    let t = Instant::now();
    if !h
        .configure(document(n, 0, 0)?.as_bytes())
        .map_err(|e| format!("{e:#}"))?
    {
        return Err(format!("the first configuration of {n} connectors was refused"));
    }
    let first = t.elapsed();
    let mut times = vec![];
    for k in 1..=pushes {
        let doc = document(n, (k * 7919) % n, k)?;
        let t = Instant::now();
        let (_, ok) = h.new_root(doc.as_bytes()).map_err(|e| format!("{e:#}"))?;
        times.push(t.elapsed());
        if !ok {
            return Err(format!("push {k} was refused"));
        }
    }
    times.sort();
    Ok((first, times[times.len() / 2], times[times.len() - 1]))
}

fn main() -> ExitCode {
    let sizes: Vec<usize> = arg("--sizes", "1000,5000,20000")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let pushes: usize = arg("--pushes", "20").parse().unwrap_or(20).max(1);
    let module = std::env::args()
        .skip(1)
        .find(|a| a.ends_with(".wasm"))
        .map(std::path::PathBuf::from);
    println!("| connectors | first configuration | a push changing one connector (median / worst) |");
    println!("|---:|---:|---:|");
    for n in sizes {
        match measure(n, pushes, module.clone()) {
            Ok((first, median, worst)) => println!(
                "| {n} | {:.1} ms | {:.1} / {:.1} ms |",
                first.as_secs_f64() * 1000.0,
                median.as_secs_f64() * 1000.0,
                worst.as_secs_f64() * 1000.0
            ),
            Err(e) => {
                eprintln!("push-cost: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
