//! Times a warm forwarded request (see `connector_wasm_host::warm`) under wasmtime with
//! Cranelift's optimisations, beside the do-nothing module through the same harness, in
//! interleaved rounds. The difference is the filter's own work per request plus its host calls
//! as this harness serves them (Envoy's V8 and its host calls cost differently: `make bench`
//! measures that); it tells how much of the request is the module's code.
//!
//! `--new-tokens 1` times instead a request whose token the filter has not seen (a new RS256
//! signature to check, claims to decode, a cache entry to add) beside the warm one, with the
//! signature checked by the host's `verify_signature` and by the module itself.
//!
//! `--thrash-kib N` writes N KiB of other memory between requests (not timed), as Envoy's own
//! work between two calls into the module does to the caches: what the module's code and data
//! cost when they are not in the caches already.
//!
//! `warm-cost [--requests 20000] [--rounds 5] [--noop target/wasm32-wasip1/release/noop_filter.wasm] [--new-tokens 0] [--thrash-kib 0]`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use connector_wasm_host::arg;
use connector_wasm_host::warm::Warm;

fn run() -> anyhow::Result<()> {
    let requests: u32 = arg("--requests", "20000").parse()?;
    let rounds: u32 = arg("--rounds", "5").parse()?;
    let noop = PathBuf::from(arg("--noop", "target/wasm32-wasip1/release/noop_filter.wasm"));
    if arg("--new-tokens", "0") == "1" {
        return new_tokens(requests.min(2000), rounds);
    }
    let thrash_kib: usize = arg("--thrash-kib", "0").parse()?;
    let mut other = vec![0u8; thrash_kib * 1024];
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
            if other.is_empty() {
                let t = Instant::now();
                for _ in 0..requests {
                    w.request()?;
                }
                out.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(requests));
                continue;
            }
            let mut spent = 0.0;
            for i in 0..requests {
                // One write per cache line, a different value each time.
                for line in other.chunks_mut(64) {
                    line[0] = line[0].wrapping_add(i as u8 | 1);
                }
                std::hint::black_box(&other);
                let t = Instant::now();
                w.request()?;
                spent += t.elapsed().as_secs_f64();
            }
            out.push(spent * 1e6 / f64::from(requests));
        }
    }
    let (f, n) = (median(&mut ours), median(&mut noops));
    println!(
        "warm forwarded request under wasmtime (median of {rounds} x {requests}, {thrash_kib} KiB written \
         between requests): filter {f:.2} us, do-nothing module {n:.2} us, difference {:.2} us",
        f - n
    );
    Ok(())
}

/// Warm requests against requests each with a token not seen before, interleaved rounds: the
/// new token's signature checked by the host's `verify_signature` (this host: the rsa crate,
/// natively, as Envoy does with BoringSSL), and by the module itself (the host's function made
/// NotFound, as a host without it answers).
fn new_tokens(requests: u32, rounds: u32) -> anyhow::Result<()> {
    let mut warm = Warm::new(None, true)?;
    let mut by_host = Warm::new(None, true)?;
    let mut by_module = Warm::new(None, true)?;
    by_module.record().inject("proxy_call_foreign_function", 1, 1);
    by_host.request()?;
    by_module.request()?;
    // Signed before timing: signing is the harness's cost, not the filter's.
    let tokens = (0..2 * requests * rounds)
        .map(|i| warm.new_token(&format!("u-new-{i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut tokens = tokens.iter();
    for _ in 0..100 {
        warm.request()?;
    }
    let (mut warms, mut hosts, mut modules) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..requests {
            warm.request()?;
        }
        warms.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(requests));
        for (w, out) in [(&mut by_host, &mut hosts), (&mut by_module, &mut modules)] {
            let mut spent = 0.0;
            for _ in 0..requests {
                let Some(token) = tokens.next() else { break };
                w.use_token(token);
                let t = Instant::now();
                w.request()?;
                spent += t.elapsed().as_secs_f64();
            }
            out.push(spent * 1e6 / f64::from(requests));
        }
    }
    let (w, h, m) = (median(&mut warms), median(&mut hosts), median(&mut modules));
    println!(
        "under wasmtime (median of {rounds} x {requests}): warm request {w:.2} us; request with a new \
         token {h:.2} us checked by the host's verify_signature (+{:.2}), {m:.2} us checked by the \
         module (+{:.2})",
        h - w,
        m - w
    );
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
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
