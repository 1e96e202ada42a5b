//! The benchmark: manifest GETs per second, p50/p99 latency and Envoy CPU per request, side by
//! side in one run, against two upstreams:
//! - **Distribution** (Debian's `docker-registry`, open, in-memory storage: htpasswd's bcrypt
//!   would cap it near 700 req/s), the realistic case: the registry directly, Envoy without the
//!   filter, Envoy with the filter and a warm token cache, and with a new token on every request
//!   (signature work on every request);
//! - **a static upstream** (nginx serving the same manifest bytes), where Envoy itself is the
//!   limit: the same rows plus a no-op proxy-wasm filter, the floor any wasm filter pays, and
//!   Envoy's native `jwt_authn` checking the same RS256, ES256 and ES384 tokens (what a user
//!   would pick for token checking alone).
//!
//! On both upstreams a **host-call floor** row (`devkit/floor-filter`) makes the filter's host
//! calls of a warm request with no decision behind them: the filter's cost splits into what
//! Envoy charges any filter that edits a request this way, and the filter's own work.
//!
//! Scenarios are interleaved over several rounds; ratios are taken within a round and the median
//! reported, because this machine is shared and noisy. The load comes from `wrk` (one thread,
//! keep-alive connections); any 4xx/5xx answer or transport error invalidates the run, and a
//! pre-flight request per scenario must return the manifest.
//!
//! Usage: `cargo run --release -p connector-devkit --bin bench -- [--seconds N] [--rounds N]`
//! (`--baseline-module PATH` adds rows for another build of the filter, in the same rounds;
//! `--perf-dir DIR --perf-match TEXT` profiles Envoy with `perf` during the matching rows;
//! `--warm-only 1 [--baseline-module PATH [--baseline-plain-route 1]]` runs only the warm rows on the static upstream
//! (`--distribution 1`: on Distribution), many short rounds in turn, for an A/B of a change to
//! the warm path, the filter's request also in the connector's host form;
//! `--memory-only 1 [--workers 1,2,4]` measures Envoy's resident memory against its number of
//! workers instead, to separate the filter's share per worker from its one-off share).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use connector_devkit::controller::ProxyCert;
use connector_devkit::envoy::{Cluster, ConnectorSpec, Envoy, EnvoySpec, WasmFilter, bootstrap, filter_config};
use connector_devkit::http::Request;
use connector_devkit::image;
use connector_devkit::registry::{Credentials, Registry};
use connector_devkit::skopeo::{Creds, Skopeo};
use connector_devkit::static_upstream::StaticUpstream;
use connector_devkit::token_server::TokenServer;
use connector_devkit::tokens::{AUDIENCE, ISSUER, KeyChoice, Minter};
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
    group: &'static str,
    name: &'static str,
    /// The scenario every ratio of its group is taken against.
    baseline: bool,
    upstream_pid: Option<u32>,
    port: u16,
    path: String,
    tokens: Option<std::path::PathBuf>,
    /// The Envoy serving this scenario, whose CPU time per request is reported.
    envoy_pid: Option<u32>,
    /// The `Host` the requests name (the connector's host form); `None`: the listener's address.
    host: Option<String>,
}

#[derive(Clone, Copy, Default)]
struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Envoy's CPU time (user + system) per request; steadier than req/s on a shared machine.
    envoy_cpu_us: f64,
    /// The registry's CPU time per request.
    upstream_cpu_us: f64,
}

/// The one connector every benchmark Envoy serves, `bench/registry`, open to its own namespace.
fn bench_connector(address: String, cluster: String, username: String, password_env: &str) -> ConnectorSpec {
    ConnectorSpec {
        namespace: NS.into(),
        name: CONNECTOR.into(),
        address,
        cluster,
        username,
        password_env: password_env.into(),
        allowed_namespaces: vec![],
        allowed_service_accounts: vec![],
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th overall.
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    // After the name: state is the 3rd field overall, utime the 14th, stime the 15th.
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    let ticks = field(14 - 3) + field(15 - 3);
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
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
local host = os.getenv("BENCH_HOST")
if host ~= nil and host ~= "" then wrk.headers["Host"] = host end
request = function()
  if n == 0 then return wrk.format() end
  i = i + 1
  if i > n then i = 1 end
  return wrk.format(nil, nil, { ["Host"] = wrk.headers["Host"], ["Accept"] = wrk.headers["Accept"],
    ["Authorization"] = "Bearer " .. tokens[i] })
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
        .arg(format!("{}{}", origin(s.port), s.path))
        .env("BENCH_ACCEPT", MANIFEST_ACCEPT)
        .env("BENCH_HOST", s.host.as_deref().unwrap_or_default())
        .env(
            "BENCH_TOKENS",
            s.tokens
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    let (cpu_before, up_before) = (cpu_seconds(s.envoy_pid), cpu_seconds(s.upstream_pid));
    let out = procs::run(cmd, None)?.ok()?;
    let cpu = cpu_seconds(s.envoy_pid) - cpu_before;
    let up = cpu_seconds(s.upstream_pid) - up_before;
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
    let requests = rps * f64::from(seconds);
    Ok(Sample {
        rps,
        p50_us: p50,
        p99_us: p99,
        envoy_cpu_us: if requests > 0.0 { cpu * 1e6 / requests } else { 0.0 },
        upstream_cpu_us: if requests > 0.0 { up * 1e6 / requests } else { 0.0 },
    })
}

/// The measured cells of a table row: medians, and the ratio to `base` taken within each round
/// (same minute, same load) before the median.
fn cells(s: &Scenario, v: &[Sample], base: &[f64]) -> String {
    let ratios: Vec<f64> = v.iter().zip(base).map(|(a, b)| a.rps / b).collect();
    let cpu = if s.envoy_pid.is_some() {
        format!("{:.0}", median(v.iter().map(|x| x.envoy_cpu_us).collect()))
    } else {
        "-".to_string()
    };
    format!(
        "{:.0} | {:.2} | {:.2} | {:.2}x | {cpu} | {:.0} |",
        median(v.iter().map(|x| x.rps).collect()),
        median(v.iter().map(|x| x.p50_us).collect()) / 1000.0,
        median(v.iter().map(|x| x.p99_us).collect()) / 1000.0,
        median(ratios),
        median(v.iter().map(|x| x.upstream_cpu_us).collect()),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn arg(name: &str, default: u32) -> u32 {
    connector_devkit::arg(name, default)
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
    let noop = wasm.with_file_name("noop_filter.wasm");
    if !noop.is_file() {
        return Err(format!(
            "{} is missing: build it with `cargo build -p noop-filter --target wasm32-wasip1 --release`",
            noop.display()
        ));
    }
    // The filter's host calls without its decisions (devkit/floor-filter): the cost any filter
    // that edits a request as this one does pays in Envoy.
    let floor = wasm.with_file_name("floor_filter.wasm");
    if !floor.is_file() {
        return Err(format!(
            "{} is missing: build it with `cargo build -p floor-filter --target wasm32-wasip1 --release`",
            floor.display()
        ));
    }
    let work = WorkDir::new("bench")?;
    if arg("--flood-only", 0) == 1 {
        let minter = Minter::new(&work.sub("keys")?)?;
        return flood_table(&work, &minter, &wasm, seconds, rounds);
    }
    if arg("--blob-only", 0) == 1 {
        let minter = Minter::new(&work.sub("keys")?)?;
        let token = minter.valid(NS, "default")?;
        return blob_table(&work, &minter, &wasm, &token, arg("--blob-mib", 1024), rounds);
    }
    if arg("--push-only", 0) == 1 {
        let minter = Minter::new(&work.sub("keys")?)?;
        return push_table(&work, &minter, seconds, rounds);
    }
    if arg("--warm-only", 0) == 1 {
        let minter = Minter::new(&work.sub("keys")?)?;
        return warm_table(&work, &minter, &wasm, &noop, &floor, seconds, rounds);
    }
    if arg("--memory-only", 0) == 1 {
        let minter = Minter::new(&work.sub("keys")?)?;
        return memory_table(&work, &minter, &wasm, &noop, seconds, rounds);
    }
    if arg("--pulls-only", 0) == 1 {
        let minter = Minter::new(&work.sub("keys")?)?;
        return pull_table(&work, &minter, &wasm, &Skopeo::new(&work)?, rounds);
    }

    let skopeo = Skopeo::new(&work)?;
    let (registry, sample, manifest) = sample_registry(&work, &skopeo)?;
    let direct_path = format!("/v2/{REPO}/manifests/v1");
    let digest = manifest.header("docker-content-digest").unwrap_or_default().to_string();
    let static_up = StaticUpstream::start(&work, &direct_path, &manifest.body, MANIFEST_ACCEPT, &digest)?;

    let minter = Minter::new(&work.sub("keys")?)?;
    let warm = minter.valid(NS, "default")?;
    eprintln!("minting {FRESH_TOKENS} distinct tokens ...");
    let fresh_file = fresh_tokens_file(work.path(), &minter, "fresh-tokens", KeyChoice::Rsa)?;
    let fresh_ec_file = fresh_tokens_file(work.path(), &minter, "fresh-ec-tokens", KeyChoice::Ec)?;
    let fresh_ec384_file = fresh_tokens_file(work.path(), &minter, "fresh-ec384-tokens", KeyChoice::Ec384)?;
    let warm_file = token_file(work.path(), "warm-token", &warm)?;

    // One Envoy per (upstream, filter) pair; all run for the whole benchmark, idle when not measured.
    let mut keep = vec![];
    let mut start_envoy = |label: &str, port: u16, filter: Option<(&Path, bool)>| -> Result<Envoy> {
        let w = WorkDir::new(label)?;
        let envoy = bench_envoy(&w, &minter, port, filter, 1)?;
        keep.push(w);
        Ok(envoy)
    };
    // The neighbour: Distribution's own pull-through proxy in front of the same registry.
    let pt_work = WorkDir::new("bench-pull-through")?;
    let pull_through = Registry::start_pull_through(&pt_work, "registry", &registry.url(), None)?;
    let reg_plain = start_envoy("bench-reg-plain", registry.port, None)?;
    let reg_filter = start_envoy("bench-reg-filter", registry.port, Some((&wasm, false)))?;
    let st_plain = start_envoy("bench-static-plain", static_up.port, None)?;
    let st_noop = start_envoy("bench-static-noop", static_up.port, Some((&noop, true)))?;
    let st_filter = start_envoy("bench-static-filter", static_up.port, Some((&wasm, false)))?;
    let reg_floor = start_envoy("bench-reg-floor", registry.port, Some((&floor, false)))?;
    let st_floor = start_envoy("bench-static-floor", static_up.port, Some((&floor, false)))?;
    // Envoy's native JWT filter with the same keys, issuer and audience, in front of a plain route.
    let jwt_work = WorkDir::new("bench-static-jwt-authn")?;
    let st_jwt = Envoy::start_custom(&jwt_work, "envoy", |port, admin| {
        let spec = EnvoySpec {
            clusters: vec![Cluster {
                name: "upstream_bench".into(),
                port: static_up.port,
            }],
            filter: None,
        };
        let mut b = bootstrap(&spec, port, admin);
        let jwt_authn = serde_json::json!({
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": { "k8s": {
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "local_jwks": { "inline_string": minter.jwks().to_string() },
                    "from_headers": [{ "name": "Authorization", "value_prefix": "Bearer " }],
                }},
                "rules": [{ "match": { "prefix": "/" }, "requires": { "provider_name": "k8s" } }],
            },
        });
        let filters = &mut b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"];
        if let Some(list) = filters.as_array_mut() {
            list.insert(0, jwt_authn);
        }
        b
    })?;

    let proxy_path = format!("/v2/namespaces/{NS}/connectors/{CONNECTOR}/{REPO}/manifests/v1");
    let sc =
        |group, name, baseline, port, path: &str, tokens: Option<&std::path::PathBuf>, envoy: Option<&Envoy>, up| {
            Scenario {
                group,
                name,
                baseline,
                upstream_pid: up,
                port,
                path: path.to_string(),
                tokens: tokens.cloned(),
                envoy_pid: envoy.and_then(Envoy::pid),
                host: None,
            }
        };
    let (reg, st) = ("Distribution upstream", "static upstream (Envoy-bound)");
    let (rp, sp) = (registry.pid(), static_up.pid());
    let mut scenarios = vec![
        sc(
            reg,
            "upstream directly",
            false,
            registry.port,
            &direct_path,
            None,
            None,
            rp,
        ),
        sc(
            reg,
            "Envoy, no filter",
            true,
            reg_plain.port,
            &direct_path,
            None,
            Some(&reg_plain),
            rp,
        ),
        sc(
            reg,
            "Envoy + filter, warm token cache",
            false,
            reg_filter.port,
            &proxy_path,
            Some(&warm_file),
            Some(&reg_filter),
            rp,
        ),
        sc(
            reg,
            FLOOR_ROW,
            false,
            reg_floor.port,
            &proxy_path,
            Some(&warm_file),
            Some(&reg_floor),
            rp,
        ),
        sc(
            reg,
            "Distribution pull-through proxy (proxy mode)",
            false,
            pull_through.port,
            &direct_path,
            None,
            None,
            pull_through.pid(),
        ),
        sc(
            reg,
            "Envoy + filter, new token every request",
            false,
            reg_filter.port,
            &proxy_path,
            Some(&fresh_file),
            Some(&reg_filter),
            rp,
        ),
        sc(
            st,
            "upstream directly",
            false,
            static_up.port,
            &direct_path,
            None,
            None,
            sp,
        ),
        sc(
            st,
            "Envoy, no filter",
            true,
            st_plain.port,
            &direct_path,
            None,
            Some(&st_plain),
            sp,
        ),
        sc(
            st,
            "Envoy + no-op wasm filter",
            false,
            st_noop.port,
            &direct_path,
            None,
            Some(&st_noop),
            sp,
        ),
        sc(
            st,
            "Envoy + filter, warm token cache",
            false,
            st_filter.port,
            &proxy_path,
            Some(&warm_file),
            Some(&st_filter),
            sp,
        ),
        sc(
            st,
            FLOOR_ROW,
            false,
            st_floor.port,
            &proxy_path,
            Some(&warm_file),
            Some(&st_floor),
            sp,
        ),
        sc(
            st,
            "Envoy + filter, new RS256 token every request",
            false,
            st_filter.port,
            &proxy_path,
            Some(&fresh_file),
            Some(&st_filter),
            sp,
        ),
        sc(
            st,
            "Envoy + jwt_authn (native), new RS256 token every request",
            false,
            st_jwt.port,
            &direct_path,
            Some(&fresh_file),
            Some(&st_jwt),
            sp,
        ),
        sc(
            st,
            "Envoy + filter, new ES256 token every request",
            false,
            st_filter.port,
            &proxy_path,
            Some(&fresh_ec_file),
            Some(&st_filter),
            sp,
        ),
        sc(
            st,
            "Envoy + jwt_authn (native), new ES256 token every request",
            false,
            st_jwt.port,
            &direct_path,
            Some(&fresh_ec_file),
            Some(&st_jwt),
            sp,
        ),
        sc(
            st,
            "Envoy + filter, new ES384 token every request",
            false,
            st_filter.port,
            &proxy_path,
            Some(&fresh_ec384_file),
            Some(&st_filter),
            sp,
        ),
        sc(
            st,
            "Envoy + jwt_authn (native), new ES384 token every request",
            false,
            st_jwt.port,
            &direct_path,
            Some(&fresh_ec384_file),
            Some(&st_jwt),
            sp,
        ),
    ];
    // `--baseline-module PATH`: another build of the filter (e.g. the commit before a change)
    // beside this one in the same rounds, on the static upstream, for an A/B that the
    // machine's swings between runs cannot blur.
    let baseline_module: String = connector_devkit::arg("--baseline-module", String::new());
    let st_baseline = if baseline_module.is_empty() {
        None
    } else {
        let module = PathBuf::from(&baseline_module);
        if !module.is_file() {
            return Err(format!("--baseline-module {baseline_module}: no such file"));
        }
        Some(start_envoy(
            "bench-static-baseline",
            static_up.port,
            Some((&module, false)),
        )?)
    };
    if let Some(base) = &st_baseline {
        for (name, tokens) in [
            ("Envoy + baseline module, warm token cache", &warm_file),
            ("Envoy + baseline module, new RS256 token every request", &fresh_file),
            ("Envoy + baseline module, new ES256 token every request", &fresh_ec_file),
            (
                "Envoy + baseline module, new ES384 token every request",
                &fresh_ec384_file,
            ),
        ] {
            scenarios.push(sc(
                st,
                name,
                false,
                base.port,
                &proxy_path,
                Some(tokens),
                Some(base),
                sp,
            ));
        }
    }
    let script = work.path().join("bench.lua");
    std::fs::write(&script, LUA).map_err(|e| format!("write script: {e}"))?;

    for s in &scenarios {
        preflight(s, &manifest.body)?;
    }
    // Warm-up: JIT, connection pools, the warm token's one verification.
    for s in &scenarios {
        run_wrk(s, &script, 2)?;
    }
    // `--perf-dir DIR --perf-match TEXT[,TEXT]`: Envoy's CPU profile (`perf record -g`) during
    // each measured run of the scenarios whose "group / name" contains a TEXT, one file per run.
    let perf_dir: String = connector_devkit::arg("--perf-dir", String::new());
    let perf_match: String = connector_devkit::arg("--perf-match", String::new());
    let mut samples: Vec<Vec<Sample>> = vec![vec![]; scenarios.len()];
    for round in 1..=rounds {
        eprintln!("round {round}/{rounds}");
        for (i, s) in scenarios.iter().enumerate() {
            let label = format!("{} / {}", s.group, s.name);
            let profile = match s.envoy_pid {
                Some(pid)
                    if !perf_dir.is_empty()
                        && !perf_match.is_empty()
                        && perf_match.split(',').any(|m| label.contains(m)) =>
                {
                    let slug: String = label
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                        .collect();
                    let out = Path::new(&perf_dir).join(format!("{slug}-round{round}.data"));
                    let child = Command::new("perf")
                        .args(["record", "-q", "-g", "-F", "1999", "-p", &pid.to_string(), "-o"])
                        .arg(&out)
                        .args(["--", "sleep", &seconds.to_string()])
                        .spawn()
                        .map_err(|e| format!("start perf: {e}"))?;
                    Some((child, out))
                }
                _ => None,
            };
            let sample = run_wrk(s, &script, seconds)?;
            if let Some((mut child, out)) = profile {
                let _ = child.wait();
                eprintln!("  profile: {}", out.display());
            }
            eprintln!("  {:<30} {:<42} {:>9.0} req/s", s.group, s.name, sample.rps);
            if let Some(v) = samples.get_mut(i) {
                v.push(sample);
            }
        }
    }

    println!(
        "manifest GET, wrk -t1 -c16, {seconds} s x {rounds} rounds interleaved (medians), Envoy --concurrency 1, {} ({} cores)",
        std::env::consts::ARCH,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!();
    println!(
        "| upstream | scenario | req/s | p50 ms | p99 ms | req/s vs Envoy without filter | Envoy CPU µs/req | upstream CPU µs/req |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (s, v) in scenarios.iter().zip(&samples) {
        // Ratios within each round (same minute, same load), then the median.
        let base = scenarios
            .iter()
            .zip(&samples)
            .find(|(b, _)| b.group == s.group && b.baseline)
            .map(|(_, bv)| bv.iter().map(|x| x.rps).collect::<Vec<_>>())
            .unwrap_or_default();
        println!("| {} | {} | {}", s.group, s.name, cells(s, v, &base));
    }
    let size = std::fs::metadata(&wasm).map(|m| m.len()).unwrap_or(0);
    println!();
    println!("filter module: {} bytes ({:.0} KiB)", size, size as f64 / 1024.0);
    println!(
        "Envoy resident memory after the manifest rounds: {} MiB without the filter, {} MiB with it (Distribution upstream pair); \
         static upstream: {} MiB without a filter, {} MiB with the no-op wasm filter, {} MiB with the filter",
        procs::rss_kib(reg_plain.pid()) / 1024,
        procs::rss_kib(reg_filter.pid()) / 1024,
        procs::rss_kib(st_plain.pid()) / 1024,
        procs::rss_kib(st_noop.pid()) / 1024,
        procs::rss_kib(st_filter.pid()) / 1024
    );
    if let Some(base) = &st_baseline {
        println!(
            "baseline module {baseline_module}: {} bytes; Envoy resident memory with it {} MiB",
            std::fs::metadata(&baseline_module).map(|m| m.len()).unwrap_or(0),
            procs::rss_kib(base.pid()) / 1024
        );
    }
    println!("{}", host_calls(&wasm));
    if arg("--manifest-only", 0) == 1 {
        return Ok(());
    }

    pull_table(&work, &minter, &wasm, &skopeo, rounds)?;

    token_table(&work, &minter, &wasm, &sample, &skopeo, &script, seconds, rounds)?;

    let blob_mib = arg("--blob-mib", 1024);
    if blob_mib > 0 {
        blob_table(&work, &minter, &wasm, &warm, blob_mib, rounds)?;
    }
    Ok(())
}

/// Manifest GETs through an upstream with `auth: token` (Distribution verifying the token
/// service's JWT on every request): the registry directly with a bearer token fetched by hand,
/// and Envoy + filter with a warm upstream-token cache (one token fetch for the whole run).
#[allow(clippy::too_many_arguments)]
fn token_table(
    work: &WorkDir,
    minter: &Minter,
    wasm: &Path,
    sample: &image::SampleImage,
    skopeo: &Skopeo,
    script: &Path,
    seconds: u32,
    rounds: u32,
) -> Result<()> {
    let robot = Credentials {
        username: "robot".into(),
        password: connector_devkit::random_secret()?,
    };
    let tokens = TokenServer::start(work, &robot.username, &robot.password)?;
    tokens.set_expires_in(3600);
    let tw = WorkDir::new("bench-token-registry")?;
    let registry = Registry::start_token_auth(&tw, &tokens, robot.clone())?;
    image::push(
        skopeo,
        sample,
        &registry.authority(),
        REPO,
        Creds::Basic(&robot.username, &robot.password),
    )?;
    let direct_token = tokens.fetch(&[&format!("repository:{REPO}:pull")])?;
    let direct_file = work.path().join("registry-token.txt");
    std::fs::write(&direct_file, format!("{direct_token}\n")).map_err(|e| format!("write token: {e}"))?;
    let warm = minter.valid(NS, "default")?;
    let warm_file = work.path().join("warm-token-2.txt");
    std::fs::write(&warm_file, format!("{warm}\n")).map_err(|e| format!("write token: {e}"))?;

    let ew = WorkDir::new("bench-token-envoy")?;
    let connector = bench_connector(
        registry.url(),
        "upstream_token_registry".into(),
        robot.username.clone(),
        "BENCH_ROBOT_PASSWORD",
    );
    let mut c = connector.to_json();
    c["tokenRealms"] = serde_json::json!([{ "url": tokens.realm(), "cluster": "token_service" }]);
    let mut config = filter_config(&minter.jwks(), &[]);
    config["connectors"] = serde_json::json!([c]);
    let envoy = Envoy::start(
        &ew,
        &EnvoySpec {
            clusters: vec![
                Cluster {
                    name: connector.cluster.clone(),
                    port: registry.port,
                },
                Cluster {
                    name: "token_service".into(),
                    port: tokens.port,
                },
            ],
            filter: Some(WasmFilter {
                wasm: wasm.to_path_buf(),
                config,
                secret_env: vec![("BENCH_ROBOT_PASSWORD".into(), robot.password.clone())],
                plain_route: false,
            }),
        },
    )?;
    let group = "token-auth upstream";
    let scenarios = [
        Scenario {
            group,
            name: "upstream directly (bearer token fetched by hand)",
            baseline: true,
            upstream_pid: registry.pid(),
            port: registry.port,
            path: format!("/v2/{REPO}/manifests/v1"),
            tokens: Some(direct_file),
            envoy_pid: None,
            host: None,
        },
        Scenario {
            group,
            name: "Envoy + filter, warm token caches",
            baseline: false,
            upstream_pid: registry.pid(),
            port: envoy.port,
            path: format!("/v2/namespaces/{NS}/connectors/{CONNECTOR}/{REPO}/manifests/v1"),
            tokens: Some(warm_file),
            envoy_pid: envoy.pid(),
            host: None,
        },
    ];
    for s in &scenarios {
        let text = std::fs::read_to_string(s.tokens.as_ref().ok_or("no token")?).map_err(|e| e.to_string())?;
        let r = Request::get(&s.path)
            .header("Accept", MANIFEST_ACCEPT)
            .bearer(text.trim())
            .send(s.port)?;
        if r.status != 200 {
            return Err(format!("{}: pre-flight answered {}", s.name, r.summary()));
        }
        run_wrk(s, script, 2)?;
    }
    let fetches_before = tokens.requests().len();
    let mut samples: Vec<Vec<Sample>> = vec![vec![]; scenarios.len()];
    for _ in 0..rounds {
        for (i, s) in scenarios.iter().enumerate() {
            let sample = run_wrk(s, script, seconds)?;
            if let Some(v) = samples.get_mut(i) {
                v.push(sample);
            }
        }
    }
    let fetches = tokens.requests().len() - fetches_before;
    println!();
    println!(
        "manifest GET through a token-auth upstream (Distribution `auth: token`), wrk -t1 -c16, {seconds} s x {rounds} rounds"
    );
    println!();
    println!("| scenario | req/s | p50 ms | p99 ms | vs upstream directly | Envoy CPU µs/req | registry CPU µs/req |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let base: Vec<f64> = samples
        .first()
        .map(|v| v.iter().map(|x| x.rps).collect())
        .unwrap_or_default();
    for (s, v) in scenarios.iter().zip(&samples) {
        println!("| {} | {}", s.name, cells(s, v, &base));
    }
    println!();
    println!(
        "token service requests during the measured rounds: {fetches} (the filter's upstream token stayed cached)"
    );
    Ok(())
}

/// Warm manifest GETs while the controller pushes a new filter configuration every second (a
/// Secret of *another* connector rotated), against the same load without pushes: the caches
/// of the measured connector (verified token, learned challenge, upstream token) must survive
/// every push. A token-auth upstream, so an upstream token flushed by a push would show as a
/// token-service request.
fn push_table(work: &WorkDir, minter: &Minter, seconds: u32, rounds: u32) -> Result<()> {
    use connector_devkit::controller::Controller;
    let robot = Credentials {
        username: "robot".into(),
        password: connector_devkit::random_secret()?,
    };
    let tokens = TokenServer::start(work, &robot.username, &robot.password)?;
    tokens.set_expires_in(3600);
    let tw = WorkDir::new("bench-push-registry")?;
    let registry = Registry::start_token_auth(&tw, &tokens, robot.clone())?;
    let skopeo = Skopeo::new(work)?;
    let sample = image::build_sample(work, "bench", "v1", 2)?;
    image::push(
        &skopeo,
        &sample,
        &registry.authority(),
        REPO,
        Creds::Basic(&robot.username, &robot.password),
    )?;
    let manifests = work.sub("push-manifests")?;
    let identity = work.path().join("identity.json");
    std::fs::write(
        &identity,
        serde_json::json!({ "issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": minter.jwks() }).to_string(),
    )
    .map_err(|e| format!("write identity: {e}"))?;
    let put = |file: &str, text: String| -> Result<()> {
        let tmp = manifests.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).map_err(|e| format!("write {file}: {e}"))?;
        std::fs::rename(&tmp, manifests.join(file)).map_err(|e| format!("rename {file}: {e}"))
    };
    let secret = |name: &str, password: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {NS}\n  annotations:\n    connectors.alauda.io/allowed-connectors: \"*\"\ntype: cpaas.io/distribution-registry-token\nstringData:\n  username: robot\n  password: {password}\n"
        )
    };
    let connector = |name: &str, secret: &str| {
        format!(
            "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  address: {}\n  tokenRealms:\n  - url: {}\n  auth:\n    name: basicAuth\n    secretRef:\n      name: {secret}\n  connectorClassName: oci\n",
            registry.url(),
            tokens.realm()
        )
    };
    put("robot.yaml", secret("robot", &robot.password))?;
    put(&format!("{CONNECTOR}.yaml"), connector(CONNECTOR, "robot"))?;
    put("other-secret.yaml", secret("other-secret", "rotated-0"))?;
    put("other.yaml", connector("other", "other-secret"))?;
    let cw = WorkDir::new("bench-push-controller")?;
    let controller = Controller::start(&cw, &manifests, &identity)?;
    let envoy = Envoy::start_xds(
        &cw,
        controller.ports.xds,
        controller.ports.channel,
        &controller.envoy_env(),
    )?;
    let warm = minter.valid(NS, "default")?;
    let warm_file = work.path().join("push-warm-token.txt");
    std::fs::write(&warm_file, format!("{warm}\n")).map_err(|e| format!("write token: {e}"))?;
    let path = format!("/v2/namespaces/{NS}/connectors/{CONNECTOR}/{REPO}/manifests/v1");
    let started = Instant::now();
    loop {
        let r = Request::get(&path)
            .header("Accept", MANIFEST_ACCEPT)
            .bearer(&warm)
            .send(envoy.port)?;
        if r.status == 200 {
            break;
        }
        if started.elapsed().as_secs() > 20 {
            return Err(format!(
                "pre-flight through the controller's Envoy answered {}",
                r.summary()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let pushes = || -> f64 {
        controller
            .metrics()
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("xds_pushes_total{"))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    let script = work.path().join("push.lua");
    std::fs::write(&script, LUA).map_err(|e| format!("write script: {e}"))?;
    let scenario = |name| Scenario {
        group: "push",
        name,
        baseline: false,
        upstream_pid: registry.pid(),
        port: envoy.port,
        path: path.clone(),
        tokens: Some(warm_file.clone()),
        envoy_pid: envoy.pid(),
        host: None,
    };
    let (quiet, pushed) = (
        scenario("no configuration pushes"),
        scenario("a configuration push every second"),
    );
    run_wrk(&quiet, &script, 2)?;
    let mut samples: [Vec<Sample>; 2] = [vec![], vec![]];
    let (mut fetches_quiet, mut fetches_pushed, mut pushes_seen, mut rotations) = (0, 0, 0.0, 0u32);
    for round in 1..=rounds {
        eprintln!("round {round}/{rounds}");
        let before = tokens.requests().len();
        samples[0].push(run_wrk(&quiet, &script, seconds)?);
        fetches_quiet += tokens.requests().len() - before;
        let (before, pushes_before) = (tokens.requests().len(), pushes());
        let stop = std::sync::atomic::AtomicBool::new(false);
        let sample = std::thread::scope(|scope| {
            let rotator = scope.spawn(|| {
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    n += 1;
                    if put(
                        "other-secret.yaml",
                        secret("other-secret", &format!("rotated-{round}-{n}")),
                    )
                    .is_err()
                    {
                        break;
                    }
                }
                n
            });
            let sample = run_wrk(&pushed, &script, seconds);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            rotations += rotator.join().unwrap_or(0);
            sample
        })?;
        // The last rotation's configuration reaches Envoy within a poll interval.
        std::thread::sleep(std::time::Duration::from_millis(600));
        pushes_seen += pushes() - pushes_before;
        fetches_pushed += tokens.requests().len() - before;
        samples[1].push(sample);
    }
    println!();
    println!(
        "warm manifest GETs through the controller's Envoy (file mode, token-auth upstream), wrk -t1 -c16, {seconds} s x {rounds} rounds; \
         pushes: the Secret of another connector rotated every second"
    );
    println!();
    println!("| scenario | req/s | p50 ms | p99 ms | req/s vs no pushes | Envoy CPU µs/req | registry CPU µs/req |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let base: Vec<f64> = samples[0].iter().map(|x| x.rps).collect();
    for (s, v) in [&quiet, &pushed].into_iter().zip(&samples) {
        println!("| {} | {}", s.name, cells(s, v, &base));
    }
    println!();
    println!(
        "Secret rotations: {rotations}; xDS resources the controller pushed meanwhile: {pushes_seen:.0}; token service requests: \
         {fetches_quiet} in the rounds without pushes, {fetches_pushed} in the rounds with pushes"
    );
    Ok(())
}

/// The proxy-wasm host calls of one warm forwarded request, counted by the wasmtime test host
/// (`host-calls`, built by `make bench`; Envoy's V8 host cannot count them).
fn host_calls(wasm: &Path) -> String {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/host-calls");
    let mut cmd = Command::new(&bin);
    cmd.arg(wasm);
    match procs::run(cmd, None).and_then(|o| o.ok()) {
        Ok(o) => format!(
            "proxy-wasm host calls per warm forwarded request (wasmtime host): {}",
            o.stdout.trim()
        ),
        Err(e) => format!(
            "proxy-wasm host calls per warm forwarded request: not counted ({e}; build it with `cargo build -p \
             connector-wasm-host --bin host-calls`)"
        ),
    }
}

/// `https://127.0.0.1:<port>` for a harness TLS port (every upstream: the registry and nginx
/// serve the harness's upstream certificate), `http://` for the benchmark's Envoy listeners.
fn origin(port: u16) -> String {
    let scheme = if connector_devkit::http::tls_ca(port).is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://127.0.0.1:{port}")
}

/// curl, trusting the harness's upstream CA (the direct requests to the registry are verified).
fn curl(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "600", "--cacert"])
        .arg(&connector_devkit::tls::upstream()?.ca)
        .args(args);
    Ok(procs::run(cmd, None)?.ok()?.stdout)
}

/// One large layer blob, pulled whole with curl: MB/s direct, through Envoy, through Envoy + filter,
/// and Envoy's resident memory before and after (bodies must stream, not buffer).
fn blob_table(work: &WorkDir, minter: &Minter, wasm: &Path, token: &str, mib: u32, rounds: u32) -> Result<()> {
    // Filesystem storage: Distribution's in-memory driver slows to a crawl on a 1 GiB blob.
    let rw = WorkDir::new("bench-blob-registry")?;
    let registry = Registry::start_open(&rw)?;
    let (pw, fw) = (WorkDir::new("bench-blob-plain")?, WorkDir::new("bench-blob-filter")?);
    let cluster = Cluster {
        name: "upstream_blob".into(),
        port: registry.port,
    };
    let plain = Envoy::start(
        &pw,
        &EnvoySpec {
            clusters: vec![cluster.clone()],
            filter: None,
        },
    )?;
    let connector = bench_connector(
        registry.url(),
        cluster.name.clone(),
        "robot".into(),
        "BENCH_REGISTRY_PASSWORD",
    );
    let filtered = Envoy::start(
        &fw,
        &EnvoySpec {
            clusters: vec![cluster],
            filter: Some(WasmFilter {
                wasm: wasm.to_path_buf(),
                config: filter_config(&minter.jwks(), std::slice::from_ref(&connector)),
                secret_env: vec![("BENCH_REGISTRY_PASSWORD".into(), "unused-by-an-open-upstream".into())],
                plain_route: false,
            }),
        },
    )?;
    let (plain, filtered) = (&plain, &filtered);
    let file = work.path().join("layer.bin");
    eprintln!("writing a {mib} MiB random layer ...");
    let mut sh = Command::new("sh");
    sh.args([
        "-c",
        &format!(
            "head -c {mib}M /dev/urandom > '{}' && sha256sum '{}'",
            file.display(),
            file.display()
        ),
    ]);
    let digest = format!(
        "sha256:{}",
        procs::run(sh, None)?
            .ok()?
            .stdout
            .split_whitespace()
            .next()
            .unwrap_or_default()
    );
    // Monolithic upload straight to the registry: POST, then PUT ?digest= with the file.
    let started = curl(&[
        "-i",
        "-X",
        "POST",
        &format!("{}/v2/bench/blob/blobs/uploads/", registry.url()),
    ])?;
    let location = started
        .lines()
        .find_map(|l| l.strip_prefix("Location: ").or_else(|| l.strip_prefix("location: ")))
        .map(|l| l.trim().to_string())
        .ok_or_else(|| format!("no upload Location in {started:?}"))?;
    let location = if location.starts_with('/') {
        format!("{}{location}", registry.url())
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let code = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/octet-stream",
        "-T",
        &file.to_string_lossy(),
        &format!("{location}{sep}digest={digest}"),
    ])?;
    if code.trim() != "201" {
        return Err(format!("blob upload answered {code}"));
    }
    std::fs::remove_file(&file).ok();

    let direct = format!("{}/v2/bench/blob/blobs/{digest}", registry.url());
    let via_plain = format!("http://127.0.0.1:{}/v2/bench/blob/blobs/{digest}", plain.port);
    let via_filter = format!(
        "http://127.0.0.1:{}/v2/namespaces/{NS}/connectors/{CONNECTOR}/bench/blob/blobs/{digest}",
        filtered.port
    );
    let auth = format!("Authorization: Bearer {token}");
    let cases: [(&str, &str, Option<&Envoy>); 3] = [
        ("upstream directly", &direct, None),
        ("Envoy, no filter", &via_plain, Some(plain)),
        ("Envoy + filter", &via_filter, Some(filtered)),
    ];
    let mut speeds: Vec<Vec<f64>> = vec![vec![]; cases.len()];
    let mut rss: Vec<(u64, u64)> = cases
        .iter()
        .map(|(_, _, e)| (procs::rss_kib(e.and_then(|e| e.pid())), 0))
        .collect();
    // Rotated order: a path that always ran right after another (its page cache, the machine's
    // other load) would carry that in every round.
    for round in 0..rounds.max(1) as usize {
        for i in (0..cases.len()).map(|k| (k + round) % cases.len()) {
            let Some((name, url, _)) = cases.get(i) else { continue };
            let out = curl(&[
                "-o",
                "/dev/null",
                "-H",
                &auth,
                "-w",
                "%{http_code} %{speed_download} %{size_download}",
                url,
            ])?;
            let f: Vec<&str> = out.split_whitespace().collect();
            let expected = u64::from(mib) * 1024 * 1024;
            if f.first() != Some(&"200") || f.get(2).and_then(|s| s.parse::<f64>().ok()) != Some(expected as f64) {
                return Err(format!("{name}: blob GET answered {out:?}"));
            }
            if let Some(v) = speeds.get_mut(i) {
                v.push(f.get(1).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0) / 1e6);
            }
        }
    }
    for (r, (_, _, e)) in rss.iter_mut().zip(&cases) {
        r.1 = procs::rss_kib(e.and_then(|e| e.pid()));
    }
    println!();
    println!("blob GET of one {mib} MiB layer with curl, {rounds} rounds (median), Distribution upstream (filesystem)");
    println!();
    println!("| path | MB/s | vs Envoy without filter | Envoy RSS before → after |");
    println!("|---|---:|---:|---:|");
    let base = speeds.get(1).cloned().unwrap_or_default();
    for (((name, _, envoy), v), (before, after)) in cases.iter().zip(&speeds).zip(&rss) {
        let ratios: Vec<f64> = v.iter().zip(&base).map(|(a, b)| a / b).collect();
        let mem = if envoy.is_some() {
            format!("{} → {} MiB", before / 1024, after / 1024)
        } else {
            "-".into()
        };
        println!("| {name} | {:.0} | {:.2}x | {mem} |", median(v.clone()), median(ratios));
    }
    // Each round's ratio, so that a median can be read against its spread.
    if let Some(filter) = speeds.get(2) {
        let each: Vec<String> = filter.iter().zip(&base).map(|(f, b)| format!("{:.2}", f / b)).collect();
        let at_goal = filter.iter().zip(&base).filter(|(f, b)| *f / *b >= 0.95).count();
        println!(
            "\nEnvoy + filter against Envoy without filter, round by round: {} ({at_goal} of {} rounds at 0.95x or better)",
            each.join(" "),
            filter.len()
        );
    }
    Ok(())
}

/// Whole-image pulls with skopeo of a multi-layer image, cold (first pull through a freshly
/// started proxy: empty caches) and warm (the next pulls), median over rounds: the upstream
/// directly, Envoy without the filter, Envoy + filter, and Distribution's pull-through proxy
/// holding the same upstream credential. The upstream is Distribution with token auth: the
/// pull-through proxy of Distribution 2.8 cannot use a Basic (htpasswd) upstream (it files
/// credentials under the challenge's realm, which for Basic is not a URL).
fn pull_table(work: &WorkDir, minter: &Minter, wasm: &Path, skopeo: &Skopeo, rounds: u32) -> Result<()> {
    const LAYERS: usize = 6;
    let robot = Credentials {
        username: "robot".into(),
        password: connector_devkit::random_secret()?,
    };
    let tokens = TokenServer::start(work, &robot.username, &robot.password)?;
    tokens.set_expires_in(3600);
    let uw = WorkDir::new("bench-pull-upstream")?;
    let upstream = Registry::start_token_auth(&uw, &tokens, robot.clone())?;
    let image = image::build_sized(work, "pull", "v1", LAYERS, 16 << 20)?;
    image::push(
        skopeo,
        &image,
        &upstream.authority(),
        REPO,
        Creds::Basic(&robot.username, &robot.password),
    )?;
    let token = minter.valid(NS, "default")?;
    let layer_bytes: u64 = std::fs::read_dir(image.layout.join("blobs/sha256"))
        .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0);
    let pull = |reference: &str, creds: Creds<'_>, label: &str| -> Result<f64> {
        let dest = work.sub(&format!("pulled-{label}-{}", crate_random()))?;
        let started = Instant::now();
        skopeo
            .copy(reference, creds, &format!("oci:{}:v1", dest.display()), Creds::None)?
            .ok()?;
        let took = started.elapsed().as_secs_f64();
        let got = image::oci_layers(&dest, "v1")?;
        std::fs::remove_dir_all(&dest).ok();
        if got != image.layers {
            return Err(format!("{label}: pulled layers differ from the pushed image"));
        }
        Ok(took)
    };
    let names = [
        "upstream directly",
        "Envoy, no filter",
        "Envoy + filter",
        "Distribution pull-through proxy",
    ];
    let mut cold: Vec<Vec<f64>> = vec![vec![]; names.len()];
    let mut warm: Vec<Vec<f64>> = vec![vec![]; names.len()];
    for round in 1..=rounds {
        eprintln!("pull round {round}/{rounds}");
        let rw = WorkDir::new(&format!("bench-pull-round-{round}"))?;
        let registry_cluster = Cluster {
            name: "upstream_pull".into(),
            port: upstream.port,
        };
        // skopeo verifies every hop: these Envoys' listeners speak TLS (a proxy certificate
        // per work dir), as the pull-through registry's does; Envoy verifies the upstream.
        let plain_work = WorkDir::new(&format!("bench-pull-plain-{round}"))?;
        let plain = Envoy::start_tls(
            &plain_work,
            &EnvoySpec {
                clusters: vec![registry_cluster.clone()],
                filter: None,
            },
            &ProxyCert::for_work(&plain_work)?,
        )?;
        // Through a plain Envoy the client meets the upstream's Bearer challenge and fetches its
        // token from the realm itself: it trusts the proxy's CA and the upstream's.
        let bundle = plain_work.path().join("proxy-and-upstream-ca.pem");
        let pem = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("read {}: {e}", p.display()));
        std::fs::write(
            &bundle,
            pem(&ProxyCert::for_work(&plain_work)?.ca)? + &pem(&connector_devkit::tls::upstream()?.ca)?,
        )
        .map_err(|e| format!("write {}: {e}", bundle.display()))?;
        skopeo.trust(&plain.authority(), &bundle)?;
        let connector = bench_connector(
            upstream.url(),
            registry_cluster.name.clone(),
            robot.username.clone(),
            "BENCH_PULL_PASSWORD",
        );
        let mut c = connector.to_json();
        c["tokenRealms"] = serde_json::json!([{ "url": tokens.realm(), "cluster": "token_service" }]);
        let mut config = filter_config(&minter.jwks(), &[]);
        config["connectors"] = serde_json::json!([c]);
        let filter_work = WorkDir::new(&format!("bench-pull-filter-{round}"))?;
        let filtered = Envoy::start_tls(
            &filter_work,
            &EnvoySpec {
                clusters: vec![
                    registry_cluster,
                    Cluster {
                        name: "token_service".into(),
                        port: tokens.port,
                    },
                ],
                filter: Some(WasmFilter {
                    wasm: wasm.to_path_buf(),
                    config,
                    secret_env: vec![("BENCH_PULL_PASSWORD".into(), robot.password.clone())],
                    plain_route: false,
                }),
            },
            &ProxyCert::for_work(&filter_work)?,
        )?;
        let proxy = Registry::start_pull_through(&rw, "pull-through", &upstream.url(), Some(&robot))?;
        let refs = [
            (
                format!("docker://{}/{REPO}:v1", upstream.authority()),
                Creds::Basic(&robot.username, &robot.password),
            ),
            (
                format!("docker://{}/{REPO}:v1", plain.authority()),
                Creds::Basic(&robot.username, &robot.password),
            ),
            (
                format!(
                    "docker://{}/namespaces/{NS}/connectors/{CONNECTOR}/{REPO}:v1",
                    filtered.authority()
                ),
                Creds::Basic("sa", &token),
            ),
            (format!("docker://{}/{REPO}:v1", proxy.authority()), Creds::None),
        ];
        for (i, (reference, c)) in refs.iter().enumerate() {
            let first = pull(reference, *c, "cold")?;
            let mut next = vec![];
            for _ in 0..3 {
                next.push(pull(reference, *c, "warm")?);
            }
            cold[i].push(first);
            warm[i].push(median(next));
        }
    }
    println!();
    println!(
        "whole-image pull with skopeo ({LAYERS} layers, {:.1} MiB in the layout) from Distribution with token auth; cold = first pull through a freshly started proxy, warm = next pulls; {rounds} rounds (medians)",
        layer_bytes as f64 / 1048576.0
    );
    println!();
    println!("| path | cold s | warm s | cold speed vs Envoy without filter | warm speed vs Envoy without filter |");
    println!("|---|---:|---:|---:|---:|");
    let (base_cold, base_warm) = (median(cold[1].clone()), median(warm[1].clone()));
    for (i, name) in names.iter().enumerate() {
        let (c, w) = (median(cold[i].clone()), median(warm[i].clone()));
        println!(
            "| {name} | {c:.2} | {w:.2} | {:.2}x | {:.2}x |",
            base_cold / c,
            base_warm / w
        );
    }
    Ok(())
}

fn crate_random() -> String {
    connector_devkit::random_hex(4).unwrap_or_default()
}

/// A flood of requests whose tokens carry garbage signatures (a valid header and claims, so each
/// one reaches the signature check), sent by a second wrk beside the measured good clients.
/// Each request gets a fresh random signature, as an attacker would send.
const FLOOD_LUA: &str = r#"
local base = os.getenv("BENCH_BAD_BASE")
local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
math.randomseed(os.time())
request = function()
  if base == nil or base == "" then return wrk.format() end
  local t = {}
  for i = 1, 342 do local r = math.random(1, 64); t[i] = chars:sub(r, r) end
  return wrk.format(nil, nil, { ["Authorization"] = "Bearer " .. base .. "." .. table.concat(t) })
end
"#;

/// Good clients with a verified (cached) token, alone and beside a flood: of garbage-signature
/// tokens (each one a signature check, bounded by the filter's negative cache and its budget of
/// failed checks per second), and of requests with no credential at all (refused without any
/// crypto: what the flooding client alone costs this 2-core machine). Static upstream, so Envoy
/// is the bottleneck; ratios within each round.
fn flood_table(work: &WorkDir, minter: &Minter, wasm: &Path, seconds: u32, rounds: u32) -> Result<()> {
    let direct_path = format!("/v2/{REPO}/manifests/v1");
    let static_up = small_static_upstream(work, &direct_path)?;
    let w = WorkDir::new("bench-flood-filter")?;
    let envoy = bench_envoy(&w, minter, static_up.port, Some((wasm, false)), 1)?;
    let warm = minter.valid(NS, "default")?;
    let warm_file = token_file(work.path(), "flood-warm-token", &warm)?;
    let bad_base = warm.rsplit_once('.').map(|(b, _)| b.to_string()).unwrap_or_default();
    let script = work.path().join("bench.lua");
    std::fs::write(&script, LUA).map_err(|e| format!("write script: {e}"))?;
    let flood_script = work.path().join("flood.lua");
    std::fs::write(&flood_script, FLOOD_LUA).map_err(|e| format!("write script: {e}"))?;
    let proxy_path = format!("/v2/namespaces/{NS}/connectors/{CONNECTOR}/{REPO}/manifests/v1");
    let good = Scenario {
        group: "static upstream (Envoy-bound)",
        name: "good clients",
        baseline: true,
        upstream_pid: static_up.pid(),
        port: envoy.port,
        path: proxy_path.clone(),
        tokens: Some(warm_file),
        envoy_pid: envoy.pid(),
        host: None,
    };
    let r = Request::get(&proxy_path)
        .header("Accept", MANIFEST_ACCEPT)
        .bearer(&warm)
        .send(envoy.port)?;
    if r.status != 200 {
        return Err(format!("flood pre-flight answered {}", r.summary()));
    }
    // (label, the flood's BENCH_BAD_BASE: None = no flood, "" = no credential, else garbage signatures)
    let floods: [(&str, Option<&str>); 3] = [
        ("alone", None),
        (
            "+ flood of garbage-signature tokens (wrk -t1 -c4)",
            Some(bad_base.as_str()),
        ),
        ("+ flood of requests without a credential (wrk -t1 -c4)", Some("")),
    ];
    let stat = |name: &str| -> u64 {
        Request::get(&format!("/stats?filter={name}"))
            .send(envoy.admin_port)
            .map(|r| r.body_text())
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.rsplit_once(": ").and_then(|(_, v)| v.trim().parse().ok()))
            .unwrap_or(0)
    };
    run_wrk(&good, &script, 2)?;
    let mut samples: Vec<Vec<Sample>> = vec![vec![]; floods.len()];
    let mut flood_rps: Vec<Vec<f64>> = vec![vec![]; floods.len()];
    for round in 1..=rounds {
        eprintln!("flood round {round}/{rounds}");
        for (i, (label, base)) in floods.iter().enumerate() {
            let flood = match base {
                None => None,
                Some(b) => {
                    let mut cmd = Command::new("wrk");
                    cmd.args(["-t1", "-c4", &format!("-d{}s", seconds + 2), "-s"])
                        .arg(&flood_script)
                        .arg(format!("http://127.0.0.1:{}{}", envoy.port, proxy_path))
                        .env("BENCH_BAD_BASE", b)
                        .stdout(std::process::Stdio::piped())
                        .stderr(std::process::Stdio::null());
                    let child = cmd.spawn().map_err(|e| format!("start the flood: {e}"))?;
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    Some(child)
                }
            };
            let sample = run_wrk(&good, &script, seconds)?;
            if let Some(child) = flood {
                let out = child.wait_with_output().map_err(|e| format!("flood: {e}"))?;
                let text = String::from_utf8_lossy(&out.stdout);
                let rps = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("Requests/sec:")
                            .and_then(|v| v.trim().parse::<f64>().ok())
                    })
                    .unwrap_or(0.0);
                if let Some(v) = flood_rps.get_mut(i) {
                    v.push(rps);
                }
            }
            eprintln!("  {label:<58} {:>9.0} req/s", sample.rps);
            if let Some(v) = samples.get_mut(i) {
                v.push(sample);
            }
        }
    }
    let base: Vec<f64> = samples
        .first()
        .map(|v| v.iter().map(|x| x.rps).collect())
        .unwrap_or_default();
    println!(
        "good clients (warm token, wrk -t1 -c16) beside a flood, {seconds} s x {rounds} rounds interleaved (medians), Envoy --concurrency 1"
    );
    println!();
    println!(
        "| good clients | req/s | p50 ms | p99 ms | req/s vs alone | Envoy CPU µs/req | upstream CPU µs/req | flood req/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (i, (label, _)) in floods.iter().enumerate() {
        let v = samples.get(i).cloned().unwrap_or_default();
        let f = flood_rps.get(i).cloned().unwrap_or_default();
        let flood = if f.is_empty() {
            "-".to_string()
        } else {
            format!("{:.0}", median(f))
        };
        println!("| {label} | {} {flood} |", cells(&good, &v, &base));
    }
    println!();
    println!(
        "filter counters over the whole run: bad_signature {} (signature checks that failed), verification_throttled {} (429 without a check), no_credential {}",
        stat("oci_connector.answered.bad_signature"),
        stat("oci_connector.answered.verification_throttled"),
        stat("oci_connector.answered.no_credential"),
    );
    Ok(())
}

/// Envoy's resident memory against its number of workers, without a filter, with the no-op wasm
/// filter and with the filter (`--memory-only 1 [--workers 1,2,4]`). Each worker runs its own
/// Wasm VM beside the main thread's, so one Envoy's RSS mixes a one-off share (the main thread's
/// VM, the compiled module) with a per-worker share (the worker's VM, its linear memory and
/// caches): the slope of RSS over workers is the per-worker share. Every Envoy serves the same
/// load first (new RS256 tokens, new ES256 tokens, then the warm token: caches full, both
/// verifiers' key tables built), and every worker must have taken connections, or its VM's
/// share would be missing from the slope.
fn memory_table(work: &WorkDir, minter: &Minter, wasm: &Path, noop: &Path, seconds: u32, rounds: u32) -> Result<()> {
    let workers_arg: String = connector_devkit::arg("--workers", "1,2,4".to_string());
    let workers: Vec<u32> = workers_arg
        .split(',')
        .map(|w| w.trim().parse::<u32>().ok().filter(|w| *w > 0))
        .collect::<Option<Vec<_>>>()
        .filter(|w| w.len() >= 2)
        .ok_or_else(|| format!("--workers {workers_arg}: expected two or more positive counts, e.g. 1,2,4"))?;
    let direct_path = format!("/v2/{REPO}/manifests/v1");
    let proxy_path = format!("/v2/namespaces/{NS}/connectors/{CONNECTOR}/{REPO}/manifests/v1");
    let static_up = small_static_upstream(work, &direct_path)?;

    eprintln!("minting {FRESH_TOKENS} RS256 and {FRESH_TOKENS} ES256 tokens ...");
    let loads = [
        fresh_tokens_file(work.path(), minter, "memory-rs256", KeyChoice::Rsa)?,
        fresh_tokens_file(work.path(), minter, "memory-es256", KeyChoice::Ec)?,
        token_file(work.path(), "memory-warm", &minter.valid(NS, "default")?)?,
    ];
    let script = work.path().join("bench.lua");
    std::fs::write(&script, LUA).map_err(|e| format!("write script: {e}"))?;

    let variants: [(&str, Option<(&Path, bool)>); 3] = [
        ("Envoy, no filter", None),
        ("Envoy + no-op wasm filter", Some((noop, true))),
        ("Envoy + filter", Some((wasm, false))),
    ];
    // rss[variant][workers index]: one reading per round, in MiB.
    let mut rss = vec![vec![Vec::<f64>::new(); workers.len()]; variants.len()];
    for round in 1..=rounds {
        eprintln!("round {round}/{rounds}");
        for (wi, &w) in workers.iter().enumerate() {
            for (vi, (name, filter)) in variants.iter().enumerate() {
                let dir = WorkDir::new("bench-memory")?;
                let path = if filter.is_some_and(|(_, plain_route)| !plain_route) {
                    &proxy_path
                } else {
                    &direct_path
                };
                let envoy = bench_envoy(&dir, minter, static_up.port, *filter, w)?;
                for tokens in &loads {
                    let s = Scenario {
                        group: "memory",
                        name,
                        baseline: false,
                        upstream_pid: static_up.pid(),
                        port: envoy.port,
                        path: path.clone(),
                        tokens: Some(tokens.clone()),
                        envoy_pid: envoy.pid(),
                        host: None,
                    };
                    run_wrk(&s, &script, seconds)?;
                }
                let idle = idle_workers(&envoy, w)?;
                if !idle.is_empty() {
                    return Err(format!(
                        "{name}, {w} workers: workers {idle:?} took no connection, so their VMs held nothing"
                    ));
                }
                let mib = procs::rss_kib(envoy.pid()) as f64 / 1024.0;
                eprintln!("  {name:<28} {w} workers {mib:>7.1} MiB");
                if let Some(v) = rss.get_mut(vi).and_then(|v| v.get_mut(wi)) {
                    v.push(mib);
                }
            }
        }
    }

    let header: Vec<String> = workers
        .iter()
        .map(|w| format!("{w} worker{}", if *w == 1 { "" } else { "s" }))
        .collect();
    println!(
        "\nEnvoy resident memory (MiB, medians of {rounds} rounds) after {seconds} s each of new RS256 tokens, new ES256 tokens and the warm token (wrk -t1 -c16; token cache {CACHE_SIZE}), against --concurrency\n"
    );
    println!(
        "| scenario | {} | per worker (slope) | one-off (intercept) |",
        header.join(" | ")
    );
    println!("|---|{}---:|---:|", "---:|".repeat(workers.len()));
    let xs: Vec<f64> = workers.iter().map(|w| f64::from(*w)).collect();
    let mut fits = vec![];
    for ((name, _), per_w) in variants.iter().zip(&rss) {
        let ys: Vec<f64> = per_w.iter().map(|v| median(v.clone())).collect();
        let (slope, intercept) = least_squares(&xs, &ys);
        fits.push((slope, intercept));
        let cells: Vec<String> = ys.iter().map(|y| format!("{y:.1}")).collect();
        println!("| {name} | {} | {slope:.2} | {intercept:.1} |", cells.join(" | "));
    }
    if let [(plain_s, plain_i), (noop_s, noop_i), (filter_s, filter_i)] = fits[..] {
        println!(
            "\nthe filter's own share per worker: {:.2} MiB beside the no-op filter, {:.2} MiB beside Envoy without a filter; one-off: {:.1} MiB beside the no-op filter, {:.1} MiB beside Envoy without a filter",
            filter_s - noop_s,
            filter_s - plain_s,
            filter_i - noop_i,
            filter_i - plain_i
        );
    }
    Ok(())
}

/// Least-squares line through `(xs, ys)`: (slope, intercept).
fn least_squares(xs: &[f64], ys: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    let sxy: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (slope, my - slope * mx)
}

/// The workers (`worker_<i>`, 0-based) whose listener stats count no downstream connection.
fn idle_workers(envoy: &Envoy, workers: u32) -> Result<Vec<u32>> {
    let r = Request::get("/stats?filter=worker_[0-9]+\\.downstream_cx_total").send(envoy.admin_port)?;
    let text = String::from_utf8_lossy(&r.body);
    let busy = |i: u32| {
        let key = format!(".worker_{i}.downstream_cx_total: ");
        text.lines().any(|l| {
            l.split_once(&key)
                .and_then(|(_, n)| n.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
    };
    Ok((0..workers).filter(|i| !busy(*i)).collect())
}

/// The warm request alone on the static upstream (`--warm-only 1`): Envoy without a filter,
/// with the no-op filter, with the filter and, with `--baseline-module PATH`, with another
/// build of it, in turn, each round in a rotated order. A change to the warm path moves Envoy's
/// CPU per request by a few µs, less than this machine's swings between minutes: so the rows
/// are compared within each round (the filter's cost over the no-op filter's, the baseline's
/// over the filter's) and the medians of those differences reported.
fn warm_table(
    work: &WorkDir,
    minter: &Minter,
    wasm: &Path,
    noop: &Path,
    floor: &Path,
    seconds: u32,
    rounds: u32,
) -> Result<()> {
    let baseline_module: String = connector_devkit::arg("--baseline-module", String::new());
    let direct_path = format!("/v2/{REPO}/manifests/v1");
    let proxy_path = format!("/v2/namespaces/{NS}/connectors/{CONNECTOR}/{REPO}/manifests/v1");
    // `--distribution 1`: the same rows in front of Distribution (the registry-bound case of
    // the 0.95x goal) instead of the static upstream.
    let distribution = arg("--distribution", 0) == 1;
    // The upstream runs until the table is printed (dropping it stops it).
    let (mut keep_registry, mut keep_static) = (None, None);
    let (upstream_port, upstream_pid, manifest, group) = if distribution {
        let (registry, _, manifest) = sample_registry(work, &Skopeo::new(work)?)?;
        let manifest = manifest.body;
        let (port, pid) = (registry.port, registry.pid());
        keep_registry = Some(registry);
        (port, pid, manifest, "Distribution upstream")
    } else {
        let up = small_static_upstream(work, &direct_path)?;
        let (port, pid) = (up.port, up.pid());
        keep_static = Some(up);
        (port, pid, SMALL_MANIFEST.to_vec(), "static upstream (Envoy-bound)")
    };
    let warm_file = token_file(work.path(), "warm-token", &minter.valid(NS, "default")?)?;
    let script = work.path().join("bench.lua");
    std::fs::write(&script, LUA).map_err(|e| format!("write script: {e}"))?;

    let mut modules: Vec<(String, Option<(PathBuf, bool)>)> = vec![
        ("Envoy, no filter".into(), None),
        ("Envoy + no-op wasm filter".into(), Some((noop.to_path_buf(), true))),
        (
            "Envoy + filter, warm token cache".into(),
            Some((wasm.to_path_buf(), false)),
        ),
        (FLOOR_ROW.into(), Some((floor.to_path_buf(), false))),
    ];
    if !baseline_module.is_empty() {
        let module = PathBuf::from(&baseline_module);
        if !module.is_file() {
            return Err(format!("--baseline-module {baseline_module}: no such file"));
        }
        // `--baseline-plain-route 1`: the baseline module is sent the upstream's own path on
        // Envoy's plain route, as the no-op filter is: for a module that measures what edits
        // cost when Envoy routes and rewrites the path itself (it then sets no route header).
        let plain_route = arg("--baseline-plain-route", 0) == 1;
        modules.push((
            "Envoy + baseline module, warm token cache".into(),
            Some((module, plain_route)),
        ));
    }
    let mut keep = vec![];
    let mut scenarios = vec![];
    for (name, filter) in &modules {
        let dir = WorkDir::new("bench-warm")?;
        let filter = filter
            .as_ref()
            .map(|(module, plain_route)| (module.as_path(), *plain_route));
        let routed = filter.is_some_and(|(_, plain_route)| !plain_route);
        let envoy = bench_envoy(&dir, minter, upstream_port, filter, 1)?;
        let s = Scenario {
            group,
            name: "",
            baseline: false,
            upstream_pid,
            port: envoy.port,
            path: if routed {
                proxy_path.clone()
            } else {
                direct_path.clone()
            },
            tokens: Some(warm_file.clone()),
            envoy_pid: envoy.pid(),
            host: None,
        };
        preflight(&s, &manifest).map_err(|e| format!("{name}: {e}"))?;
        run_wrk(&s, &script, 2)?;
        scenarios.push((name.clone(), s));
        keep.push((dir, envoy));
    }
    // The same request in the connector's host form, on the filter's Envoy: its path is the
    // upstream's already, so the filter writes it no more (one host call fewer, 10).
    if let Some((_, filter_row)) = scenarios.get(2) {
        let s = Scenario {
            name: "",
            path: direct_path.clone(),
            host: Some(format!("c-{CONNECTOR}-connector.{NS}.svc.cluster.local")),
            tokens: filter_row.tokens.clone(),
            ..*filter_row
        };
        preflight(&s, &manifest).map_err(|e| format!("{HOST_FORM_ROW}: {e}"))?;
        run_wrk(&s, &script, 2)?;
        scenarios.push((HOST_FORM_ROW.into(), s));
    }
    // cpu[scenario]: Envoy CPU µs per request, one per round.
    let mut cpu = vec![Vec::<f64>::new(); scenarios.len()];
    let mut rps = vec![Vec::<f64>::new(); scenarios.len()];
    for round in 0..rounds as usize {
        let n = scenarios.len();
        let line: Vec<String> = (0..n)
            .map(|k| (k + round) % n)
            .map(|i| -> Result<String> {
                let (name, s) = &scenarios[i];
                let sample = run_wrk(s, &script, seconds)?;
                cpu[i].push(sample.envoy_cpu_us);
                rps[i].push(sample.rps);
                Ok(format!("{name}: {:.0} µs", sample.envoy_cpu_us))
            })
            .collect::<Result<_>>()?;
        eprintln!("round {}/{rounds}: {}", round + 1, line.join(", "));
    }
    println!(
        "\nwarm manifest GET, {group}, wrk -t1 -c16, {seconds} s x {rounds} rounds in rotated order (medians), Envoy --concurrency 1\n"
    );
    println!(
        "| scenario | req/s | req/s vs Envoy without filter, same round (median) | Envoy CPU µs/req | over the no-op filter, same round (median) |"
    );
    println!("|---|---:|---:|---:|---:|");
    let plain_rps = rps.first().cloned().unwrap_or_default();
    let noop_cpu = cpu.get(1).cloned().unwrap_or_default();
    for (i, (name, _)) in scenarios.iter().enumerate() {
        let over: Vec<f64> = cpu[i].iter().zip(&noop_cpu).map(|(a, b)| a - b).collect();
        let ratio: Vec<f64> = rps[i].iter().zip(&plain_rps).map(|(a, b)| a / b).collect();
        println!(
            "| {name} | {:.0} | {:.2}x | {:.0} | {:+.0} µs |",
            median(rps[i].clone()),
            median(ratio.clone()),
            median(cpu[i].clone()),
            median(over)
        );
        if i > 0 {
            let at_goal = ratio.iter().filter(|r| **r >= 0.95).count();
            eprintln!(
                "{name}: {at_goal} of {} rounds at 0.95x Envoy's req/s or better",
                ratio.len()
            );
        }
    }
    if let (Some(filter), Some(floor)) = (cpu.get(2), cpu.get(3)) {
        let own: Vec<f64> = filter.iter().zip(floor).map(|(f, b)| f - b).collect();
        println!(
            "\nthe filter costs {} than the host-call floor (median of the rounds' differences): its own work; the floor's cost over the no-op filter is Envoy's and the wasm runtime's for these edits",
            more_or_less(median(own))
        );
    }
    if let (Some(filter), Some(base), false) = (cpu.get(2), cpu.get(4), baseline_module.is_empty()) {
        let diff: Vec<f64> = base.iter().zip(filter).map(|(b, f)| b - f).collect();
        let faster = diff.iter().filter(|d| **d > 0.0).count();
        println!(
            "\nthe baseline module costs {} than the filter (median of the rounds' differences); the filter was the cheaper in {faster} of {} rounds",
            more_or_less(median(diff.clone())),
            diff.len()
        );
        // A floor variant as the baseline (devkit/floor-filter's features): what its missing
        // calls cost, side by side with the floor in the same rounds.
        if let Some(floor) = cpu.get(3) {
            let diff: Vec<f64> = floor.iter().zip(base).map(|(f, b)| f - b).collect();
            let dearer = diff.iter().filter(|d| **d > 0.0).count();
            println!(
                "\nthe host-call floor costs {} than the baseline module (median of the rounds' differences); the floor was the dearer in {dearer} of {} rounds",
                more_or_less(median(diff.clone())),
                diff.len()
            );
        }
    }
    if let (Some(filter), Some(host_form)) = (cpu.get(2), cpu.last()) {
        let diff: Vec<f64> = filter.iter().zip(host_form).map(|(f, h)| f - h).collect();
        println!(
            "\nthe host form costs {} than the path form (median of the rounds' differences; one header write fewer)",
            more_or_less(-median(diff))
        );
    }
    drop((keep, keep_registry.take(), keep_static.take()));
    Ok(())
}

/// `d` µs as "N µs per request more" or "N µs per request less" (never "-N more").
fn more_or_less(d: f64) -> String {
    let word = if d < 0.0 { "less" } else { "more" };
    format!("{:.1} µs per request {word}", d.abs())
}

/// The manifest rows' Distribution (lean: open, in-memory) holding a two-layer sample image at
/// `REPO:v1`; the image, and its manifest as the registry serves it.
fn sample_registry(
    work: &WorkDir,
    skopeo: &Skopeo,
) -> Result<(Registry, image::SampleImage, connector_devkit::http::Response)> {
    let registry = Registry::start_lean(work)?;
    let sample = image::build_sample(work, "bench", "v1", 2)?;
    image::push(skopeo, &sample, &registry.authority(), REPO, Creds::None)?;
    let manifest = Request::get(&format!("/v2/{REPO}/manifests/v1"))
        .header("Accept", MANIFEST_ACCEPT)
        .send(registry.port)?;
    Ok((registry, sample, manifest))
}

/// The row of the host-call floor module (`devkit/floor-filter`): the connector filter's host
/// calls for a warm request, without its decisions.
const FLOOR_ROW: &str = "Envoy + host-call floor (the filter's 11 host calls, no logic)";

/// The warm-only table's row of the filter's request in the connector's host form.
const HOST_FORM_ROW: &str = "Envoy + filter, warm token cache, host form (10 host calls)";

/// The manifest the single-purpose modes' static upstream serves (flood, warm, memory): their
/// numbers need no registry behind it.
const SMALL_MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

/// The static upstream of the single-purpose modes, serving [`SMALL_MANIFEST`] at `path`.
fn small_static_upstream(work: &WorkDir, path: &str) -> Result<StaticUpstream> {
    let digest = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    StaticUpstream::start(work, path, SMALL_MANIFEST, MANIFEST_ACCEPT, digest)
}

/// A static Envoy with `workers` workers in front of the upstream on `port` (cluster
/// `upstream_bench`): without a filter, or with `module` configured for the one connector
/// `bench/registry` and a token cache of [`CACHE_SIZE`] (`plain_route` for a module that does
/// not route, the no-op filter).
fn bench_envoy(
    work: &WorkDir,
    minter: &Minter,
    port: u16,
    filter: Option<(&Path, bool)>,
    workers: u32,
) -> Result<Envoy> {
    let cluster = "upstream_bench".to_string();
    let connector = bench_connector(origin(port), cluster.clone(), "robot".into(), "BENCH_REGISTRY_PASSWORD");
    let mut config = filter_config(&minter.jwks(), std::slice::from_ref(&connector));
    config["identity"]["tokenCacheSize"] = serde_json::json!(CACHE_SIZE);
    let filter = filter.map(|(module, plain_route)| WasmFilter {
        wasm: module.to_path_buf(),
        config,
        // The upstreams here ignore credentials; the filter still adds one.
        secret_env: vec![("BENCH_REGISTRY_PASSWORD".into(), "unused-by-an-open-upstream".into())],
        plain_route,
    });
    Envoy::start_static_workers(
        work,
        &EnvoySpec {
            clusters: vec![Cluster { name: cluster, port }],
            filter,
        },
        workers,
    )
}

/// `FRESH_TOKENS` distinct tokens for `bench/default` signed with `key`, one per line, in
/// `<dir>/<name>.txt`: cycled in order, each misses the filter's cache of [`CACHE_SIZE`].
fn fresh_tokens_file(dir: &Path, minter: &Minter, name: &str, key: KeyChoice) -> Result<PathBuf> {
    let mut tokens = Vec::with_capacity(FRESH_TOKENS);
    for i in 0..FRESH_TOKENS {
        tokens.push(
            minter
                .token(NS, "default")
                .key(key)
                .claim("jti", serde_json::json!(format!("{name}-{i}")))
                .mint()?,
        );
    }
    let file = dir.join(format!("{name}.txt"));
    std::fs::write(&file, tokens.join("\n") + "\n").map_err(|e| format!("write tokens: {e}"))?;
    Ok(file)
}

/// One token in `<dir>/<name>.txt`, the file the wrk script reads.
fn token_file(dir: &Path, name: &str, token: &str) -> Result<PathBuf> {
    let file = dir.join(format!("{name}.txt"));
    std::fs::write(&file, format!("{token}\n")).map_err(|e| format!("write token: {e}"))?;
    Ok(file)
}

/// Pre-flight: scenario `s` answers 200 with `manifest` (with the first token of its file),
/// or the numbers would mean nothing.
fn preflight(s: &Scenario, manifest: &[u8]) -> Result<()> {
    let mut req = Request::get(&s.path).header("Accept", MANIFEST_ACCEPT);
    if let Some(host) = &s.host {
        req = req.host(host);
    }
    if let Some(file) = &s.tokens {
        let text = std::fs::read_to_string(file).map_err(|e| format!("read tokens: {e}"))?;
        req = req.bearer(text.lines().next().unwrap_or_default());
    }
    let r = req.send(s.port)?;
    if r.status != 200 || r.body != manifest {
        return Err(format!("{} / {}: pre-flight answered {}", s.group, s.name, r.summary()));
    }
    Ok(())
}
