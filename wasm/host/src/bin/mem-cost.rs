//! Measures the filter's heap (its linear memory, which a wasm module can grow but never give
//! back) beside the do-nothing module: after start and configuration, after warm requests, and
//! after a stream of new tokens that fills the verified-token cache past its capacity. This is
//! the module's own share of Envoy's resident memory per VM, apart from its compiled code.
//!
//! `mem-cost [--tokens 3000] [--module <filter.wasm>] [--noop target/wasm32-wasip1/release/noop_filter.wasm]`

use std::path::PathBuf;
use std::process::ExitCode;

use connector_wasm_host::arg;
use connector_wasm_host::warm::Warm;

fn kib(b: usize) -> String {
    format!("{:.0} KiB", b as f64 / 1024.0)
}

fn run() -> anyhow::Result<()> {
    let tokens: usize = arg("--tokens", "3000").parse()?;
    let noop = PathBuf::from(arg("--noop", "target/wasm32-wasip1/release/noop_filter.wasm"));
    let mut baseline = Warm::new(Some(noop), false)?;
    baseline.request()?;
    let module = std::env::args()
        .any(|a| a == "--module")
        .then(|| PathBuf::from(arg("--module", "")));
    let mut filter = Warm::new(module, false)?;
    let configured = filter.memory_bytes()?;
    for _ in 0..100 {
        filter.request()?;
    }
    let warm = filter.memory_bytes()?;
    let mut rows = vec![];
    for i in 0..tokens {
        let t = filter.new_token(&format!("uid-{i:08}"))?;
        if i == 0 {
            rows.push(format!("token length: {} bytes", t.len()));
        }
        filter.use_token(&t);
        filter.request()?;
        if (i + 1) % 500 == 0 {
            rows.push(format!(
                "after {:>5} new tokens: {}",
                i + 1,
                kib(filter.memory_bytes()?)
            ));
        }
    }
    println!("linear memory (wasmtime, one VM)");
    println!("do-nothing module after a request: {}", kib(baseline.memory_bytes()?));
    println!("filter configured: {}", kib(configured));
    println!("filter after 100 warm requests: {}", kib(warm));
    for r in rows {
        println!("filter {r}");
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mem-cost: {e:#}");
            ExitCode::FAILURE
        }
    }
}
