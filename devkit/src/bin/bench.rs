//! The benchmark: manifest GETs per second and p50/p99 latency, side by side in one run, for
//! - the upstream registry directly,
//! - Envoy without the filter,
//! - Envoy with the filter, warm token cache (one token, verified once),
//! - Envoy with the filter when every request carries a token it has not seen (signature work
//!   on every request).
//!
//! The upstream is Distribution *without* htpasswd: its bcrypt check caps an authenticated
//! registry near 700 req/s and would hide the proxy's cost. Scenarios are interleaved over
//! several rounds and the median taken, because this machine is shared and noisy. The load
//! comes from `wrk` (one thread, keep-alive connections); its Lua script fails the run if any
//! response is not 200, so a refused token can never pass for a fast one.
//!
//! Usage: `cargo run --release -p connector-devkit --bin bench -- [--seconds N] [--rounds N]`

use std::path::Path;
use std::process::Command;

use connector_devkit::envoy::{Cluster, ConnectorSpec, Envoy, EnvoySpec, WasmFilter, filter_config};
use connector_devkit::http::Request;
use connector_devkit::image;
use connector_devkit::registry::Registry;
use connector_devkit::skopeo::{Creds, Skopeo};
use connector_devkit::tokens::Minter;
use connector_devkit::{Result, WorkDir, procs, require_wasm};

const NS: &str = "bench";
const CONNECTOR: &str = "registry";
const REPO: &str = "bench/app";
/// The filter keeps this many verified tokens; the fresh-token pool is larger, so cycling
/// through it in order misses the cache on every request.
const CACHE_SIZE: usize = 1000;
const FRESH_TOKENS: usize = 2500;
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json";

struct Scenario {
    name: &'static str,
    port: u16,
    path: String,
    tokens: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Default)]
struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

/// wrk script: fixed or rotating Bearer token, and a machine-readable summary line with every
/// error wrk counts (answers >= 400 included). `done` runs in wrk's main Lua state, so per-thread
/// counters would not reach it; a pre-flight request per scenario checks for a 200 instead.
const LUA: &str = r#"
local tokens = {}
local n, i = 0, 0
local token_file = os.getenv("BENCH_TOKENS")
if token_file ~= nil and token_file ~= "" then
  for line in io.lines(token_file) do n = n + 1; tokens[n] = line end
end
wrk.headers["Accept"] = os.getenv("BENCH_ACCEPT")
request = function()
  if n == 0 then return wrk.format() end
  i = i + 1
  if i > n then i = 1 end
  return wrk.format(nil, nil, { ["Accept"] = wrk.headers["Accept"], ["Authorization"] = "Bearer " .. tokens[i] })
end
done = function(summary, latency, requests)
  local s = summary.duration / 1e6
  io.write(string.format("BENCH %f %f %f %d\n", summary.requests / s,
    latency:percentile(50), latency:percentile(99), summary.errors.status + summary.errors.connect
    + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"#;

fn run_wrk(s: &Scenario, script: &Path, seconds: u32) -> Result<Sample> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "-c16", &format!("-d{seconds}s"), "--latency", "-s"])
        .arg(script)
        .arg(format!("http://127.0.0.1:{}{}", s.port, s.path))
        .env("BENCH_ACCEPT", MANIFEST_ACCEPT)
        .env(
            "BENCH_TOKENS",
            s.tokens
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    let out = procs::run(cmd, None)?.ok()?;
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("BENCH "))
        .ok_or_else(|| format!("wrk printed no summary: {}", out.stdout))?;
    let f: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let [rps, p50, p99, errors] = f[..] else {
        return Err(format!("bad wrk summary {line:?}"));
    };
    if errors > 0.0 {
        return Err(format!(
            "{}: {errors} errors (4xx/5xx answers or transport errors): the run is invalid\n{}",
            s.name, out.stdout
        ));
    }
    Ok(Sample {
        rps,
        p50_us: p50,
        p99_us: p99,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn arg(name: &str, default: u32) -> u32 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let seconds = arg("--seconds", 10);
    let rounds = arg("--rounds", 3);
    let wasm = require_wasm()?;
    let work = WorkDir::new("bench")?;

    let registry = Registry::start_open(&work)?;
    let skopeo = Skopeo::new(&work)?;
    let sample = image::build_sample(&work, "bench", "v1", 2)?;
    image::push(&skopeo, &sample, &registry.authority(), REPO, Creds::None)?;

    let minter = Minter::new(&work.sub("keys")?)?;
    let warm = minter.valid(NS, "default")?;
    eprintln!("minting {FRESH_TOKENS} distinct tokens ...");
    let mut fresh = Vec::with_capacity(FRESH_TOKENS);
    for i in 0..FRESH_TOKENS {
        fresh.push(
            minter
                .token(NS, "default")
                .claim("jti", serde_json::json!(format!("bench-{i}")))
                .mint()?,
        );
    }
    let fresh_file = work.path().join("fresh-tokens.txt");
    std::fs::write(&fresh_file, fresh.join("\n") + "\n").map_err(|e| format!("write tokens: {e}"))?;
    let warm_file = work.path().join("warm-token.txt");
    std::fs::write(&warm_file, format!("{warm}\n")).map_err(|e| format!("write token: {e}"))?;

    let plain_work = WorkDir::new("bench-plain")?;
    let plain = Envoy::start(
        &plain_work,
        &EnvoySpec {
            clusters: vec![Cluster {
                name: "upstream".into(),
                port: registry.port,
            }],
            filter: None,
        },
    )?;
    let connector = ConnectorSpec {
        namespace: NS.into(),
        name: CONNECTOR.into(),
        address: registry.url(),
        cluster: "upstream_bench".into(),
        username: "robot".into(),
        password_env: "BENCH_REGISTRY_PASSWORD".into(),
        allowed_namespaces: vec![],
        allowed_service_accounts: vec![],
    };
    let mut config = filter_config(&minter.jwks(), std::slice::from_ref(&connector));
    config["identity"]["tokenCacheSize"] = serde_json::json!(CACHE_SIZE);
    let filtered_work = WorkDir::new("bench-filter")?;
    let filtered = Envoy::start(
        &filtered_work,
        &EnvoySpec {
            clusters: vec![Cluster {
                name: connector.cluster.clone(),
                port: registry.port,
            }],
            filter: Some(WasmFilter {
                wasm: wasm.clone(),
                config,
                secret_env: vec![("BENCH_REGISTRY_PASSWORD".into(), "unused-by-an-open-registry".into())],
            }),
        },
    )?;

    let direct_path = format!("/v2/{REPO}/manifests/v1");
    let proxy_path = format!("/v2/namespaces/{NS}/connectors/{CONNECTOR}/{REPO}/manifests/v1");
    let scenarios = [
        Scenario {
            name: "upstream directly",
            port: registry.port,
            path: direct_path.clone(),
            tokens: None,
        },
        Scenario {
            name: "Envoy, no filter",
            port: plain.port,
            path: direct_path,
            tokens: None,
        },
        Scenario {
            name: "Envoy + filter, warm token cache",
            port: filtered.port,
            path: proxy_path.clone(),
            tokens: Some(warm_file),
        },
        Scenario {
            name: "Envoy + filter, new token every request",
            port: filtered.port,
            path: proxy_path,
            tokens: Some(fresh_file),
        },
    ];
    let script = work.path().join("bench.lua");
    std::fs::write(&script, LUA).map_err(|e| format!("write script: {e}"))?;

    // Pre-flight: each scenario answers 200 with the manifest, or the numbers would mean nothing.
    for s in &scenarios {
        let mut req = Request::get(&s.path).header("Accept", MANIFEST_ACCEPT);
        if let Some(file) = &s.tokens {
            let text = std::fs::read_to_string(file).map_err(|e| format!("read tokens: {e}"))?;
            req = req.bearer(text.lines().next().unwrap_or_default());
        }
        let r = req.send(s.port)?;
        if r.status != 200 {
            return Err(format!("{}: pre-flight answered {}", s.name, r.summary()));
        }
    }
    // Warm-up: JIT, connection pools, the warm token's one verification.
    for s in &scenarios {
        run_wrk(s, &script, 2)?;
    }
    let mut samples: Vec<Vec<Sample>> = vec![vec![]; scenarios.len()];
    for round in 1..=rounds {
        eprintln!("round {round}/{rounds}");
        for (i, s) in scenarios.iter().enumerate() {
            let sample = run_wrk(s, &script, seconds)?;
            eprintln!("  {:<42} {:>9.0} req/s", s.name, sample.rps);
            if let Some(v) = samples.get_mut(i) {
                v.push(sample);
            }
        }
    }

    let med: Vec<Sample> = samples
        .iter()
        .map(|v| Sample {
            rps: median(v.iter().map(|s| s.rps).collect()),
            p50_us: median(v.iter().map(|s| s.p50_us).collect()),
            p99_us: median(v.iter().map(|s| s.p99_us).collect()),
        })
        .collect();
    let baseline = med.get(1).map(|s| s.rps).unwrap_or(1.0);
    let size = std::fs::metadata(&wasm).map(|m| m.len()).unwrap_or(0);
    println!(
        "manifest GET, wrk -t1 -c16, {seconds} s x {rounds} rounds (median), Envoy --concurrency 1, {} ({} cores)",
        std::env::consts::ARCH,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!();
    println!("| scenario | req/s | p50 ms | p99 ms | req/s vs Envoy without filter |");
    println!("|---|---:|---:|---:|---:|");
    for (s, m) in scenarios.iter().zip(&med) {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2}x |",
            s.name,
            m.rps,
            m.p50_us / 1000.0,
            m.p99_us / 1000.0,
            m.rps / baseline
        );
    }
    println!();
    println!("filter module: {} bytes ({:.0} KiB)", size, size as f64 / 1024.0);
    drop(filtered);
    drop(plain);
    drop(registry);
    Ok(())
}
