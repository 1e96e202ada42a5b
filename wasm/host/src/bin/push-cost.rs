//! Measures what a configuration push costs one filter VM (issue 17): the shipped module under
//! wasmtime with Cranelift's optimisations, configured with N connectors (the controller's
//! form: `fromController` credentials), then pushed configurations that each change one
//! connector's credential revision, as a Secret rotation does. Each push is a new root context
//! in the running VM, as Envoy delivers ECDS. Prints the median and worst time per push.
//!
//! In parts (`--deliveries parts`, the controller's `--config-parts`) the document lists parts
//! of 100 connectors, and a push is timed from its configure through the fetch of its one new
//! part (answered at once, as the controller's channel would) to the assembled configuration.
//!
//! `push-cost [--sizes 1000,5000,20000] [--pushes 20] [--deliveries inline,parts] [module.wasm]`

use std::process::ExitCode;
use std::time::{Duration, Instant};

use connector_wasm_host::{Host, Options, arg};
use serde_json::{Value, json};

/// Connectors per part, about the controller's runs (64–128).
const PART: usize = 100;

/// A controller-rendered document: connectors over 50 namespaces, connector `i` carrying
/// revision `revs[i]`. In parts: the document listing them, and each part's (id, text).
fn document(revs: &[usize], parts: bool) -> Result<(String, Vec<(String, String)>), String> {
    let jwk = connector_wasm_host::warm::test_jwk().map_err(|e| format!("{e:#}"))?;
    let entries: Vec<Value> = (revs.iter().enumerate())
        .map(|(i, rev)| {
            let revision = format!("r{rev}-{i}");
            json!({
                "namespace": format!("team-{}", i % 50), "name": format!("c{i}"),
                "address": "https://registry.internal:5000",
                "cluster": "upstream_https_registry_internal_5000_0123abcd",
                "credential": {"fromController": revision},
            })
        })
        .collect();
    let mut doc = json!({
        "identity": {"issuers": [connector_wasm_host::warm::ISSUER], "audiences": [connector_wasm_host::warm::AUDIENCE],
            "jwks": {"keys": [jwk]}},
        "controller": {"cluster": CHANNEL, "authority": "controller.local"},
        "connectors": entries,
    });
    let mut texts = vec![];
    if parts {
        let runs = connector_wasm_host::parts::runs_of(PART, revs.len());
        texts = connector_wasm_host::parts::cut(&mut doc, &runs).map_err(|e| format!("{e:#}"))?;
    }
    Ok((doc.to_string(), texts))
}

const CHANNEL: &str = "connector_controller";

/// Ticks `root` and answers its part calls until the VM logs an assembled configuration.
fn assemble(h: &mut Host, root: u32, texts: &[(String, String)]) -> Result<(), String> {
    let done = |h: &Host| h.rec().logs_containing("configuration assembled from its parts").len();
    let before = done(h);
    for _ in 0..10_000 {
        h.tick_root(root).map_err(|e| format!("{e:#}"))?;
        connector_wasm_host::parts::answer(h, CHANNEL, texts).map_err(|e| format!("{e:#}"))?;
        if done(h) > before {
            return Ok(());
        }
        if !h.rec().logs_containing("refused").is_empty() {
            return Err(format!("refused: {:?}", h.rec().logs_containing("refused")));
        }
    }
    Err("the parts were never assembled".into())
}

fn measure(
    n: usize,
    pushes: usize,
    parts: bool,
    module: Option<std::path::PathBuf>,
) -> Result<(Duration, Duration, Duration), String> {
    let mut h = Host::with(Options {
        module,
        optimized: true,
        ..Options::default()
    })
    .map_err(|e| format!("{e:#}"))?;
    let mut revs = vec![0; n];
    let (doc, texts) = document(&revs, parts)?;
    let t = Instant::now();
    if !h.configure(doc.as_bytes()).map_err(|e| format!("{e:#}"))? {
        return Err(format!("the first configuration of {n} connectors was refused"));
    }
    if parts {
        assemble(&mut h, connector_wasm_host::ROOT_ID, &texts)?;
    }
    let first = t.elapsed();
    let mut times = vec![];
    for k in 1..=pushes {
        // One connector's Secret rotated since the last push, somewhere else each time.
        if let Some(rev) = revs.get_mut((k * 7919) % n) {
            *rev = k;
        }
        let (doc, texts) = document(&revs, parts)?;
        let t = Instant::now();
        let (root, ok) = h.new_root(doc.as_bytes()).map_err(|e| format!("{e:#}"))?;
        if !ok {
            return Err(format!("push {k} was refused"));
        }
        if parts {
            assemble(&mut h, root, &texts)?;
        }
        times.push(t.elapsed());
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
    let deliveries = arg("--deliveries", "inline,parts");
    let module = std::env::args()
        .skip(1)
        .find(|a| a.ends_with(".wasm"))
        .map(std::path::PathBuf::from);
    println!("| connectors | delivery | first configuration | a push changing one connector (median / worst) |");
    println!("|---:|---|---:|---:|");
    for (n, delivery) in sizes
        .iter()
        .flat_map(|n| deliveries.split(',').map(move |d| (*n, d.trim())))
    {
        match measure(n, pushes, delivery == "parts", module.clone()) {
            Ok((first, median, worst)) => println!(
                "| {n} | {delivery} | {:.1} ms | {:.1} / {:.1} ms |",
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
