//! Times a warm forwarded request (see `connector_wasm_host::warm`) under wasmtime with
//! Cranelift's optimisations, beside the do-nothing module through the same harness, in
//! interleaved rounds. The difference is the filter's own work per request plus its host calls
//! as this harness serves them (Envoy's V8 and its host calls cost differently: `make bench`
//! measures that); it tells how much of the request is the module's code.
//!
//! `warm-cost [--requests 20000] [--rounds 5] [--noop target/wasm32-wasip1/release/noop_filter.wasm]`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use connector_wasm_host::arg;
use connector_wasm_host::warm::Warm;

fn run() -> anyhow::Result<()> {
    let requests: u32 = arg("--requests", "20000").parse()?;
    let rounds: u32 = arg("--rounds", "5").parse()?;
    let noop = PathBuf::from(arg("--noop", "target/wasm32-wasip1/release/noop_filter.wasm"));
    let mut filter = Warm::new(None, true)?;
    let mut baseline = Warm::new(Some(noop), true)?;
    for w in [&mut filter, &mut baseline] {
        for _ in 0..100 {
            w.request()?;
        }
    }
    let (mut ours, mut noops) = (vec![], vec![]);
    for _ in 0..rounds {
        for (w, out) in [(&mut filter, &mut ours), (&mut baseline, &mut noops)] {
            let t = Instant::now();
            for _ in 0..requests {
                w.request()?;
            }
            out.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(requests));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    let (f, n) = (median(&mut ours), median(&mut noops));
    println!(
        "warm forwarded request under wasmtime (median of {rounds} x {requests}): filter {f:.2} us, \
         do-nothing module {n:.2} us, difference {:.2} us",
        f - n
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warm-cost: {e:#}");
            ExitCode::FAILURE
        }
    }
}
