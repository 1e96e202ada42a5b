//! The scale benchmark (issue 17): the controller in file mode and Envoy (`--concurrency 2`)
//! at several connector counts side by side in one run. Each connector is a Connector plus its
//! Secret in a file of its own, spread over 50 namespaces, all pointing at one open
//! Distribution registry (behind the recorder, which shows which credential went upstream).
//!
//! Per size: cold start (controller spawned, Envoy started once the controller listens → every
//! connector served), the latency of an add,
//! a delete and a Secret rotation until effective through Envoy (median), the controller's CPU
//! per change, its RSS at start and after the changes, Envoy's RSS, the filter configuration's
//! size (ECDS), and the controller's idle CPU.
//!
//! "Served" is read through Envoy: a configured connector forwards a manifest GET of a missing
//! tag to the registry (404), an unconfigured one is refused (403). The configuration is one
//! ECDS resource, so once the last connector written is served, all are.
//!
//! Each size runs once per delivery of the filter configuration (`--deliveries inline,parts`):
//! `inline`, the connectors in the pushed document (`--config-inline`); `parts`, the controller's `--config-parts`
//! (the document lists parts the filter fetches over the channel).
//!
//! Usage: `cargo run --release -p connector-devkit --bin bench-scale -- [--sizes 100,1000,5000,20000]
//! [--changes 30] [--idle-seconds 10] [--deliveries inline,parts]`. The controller binary is the one the tests use
//! (`target/debug/connector-controller`, or `CONNECTOR_CONTROLLER_BIN`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use connector_devkit::controller::{Controller, ProxyCert};
use connector_devkit::envoy::Envoy;
use connector_devkit::http::{self, Request, basic_value};
use connector_devkit::image;
use connector_devkit::recorder::Recorder;
use connector_devkit::registry::Registry;
use connector_devkit::skopeo::{Creds, Skopeo};
use connector_devkit::tokens::{AUDIENCE, ISSUER, Minter};
use connector_devkit::{Result, WorkDir, arg, procs, require_wasm};

const NAMESPACES: usize = 50;
const WORKERS: u32 = 2;
/// Clients of the steady load, each on one keep-alive connection.
const LOAD_THREADS: usize = 2;
/// The repository every connector reaches (all point at one registry).
const REPO: &str = "bench/app";

/// A comma-separated list of connector counts after `name`.
fn counts(name: &str, default: &str) -> Vec<usize> {
    arg(name, default.to_string())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // After the name: utime and stime are the 14th and 15th fields overall.
    (field(14 - 3) + field(15 - 3)) / 100.0
}

/// CPU seconds of each thread of a process, by thread name (`/proc/<pid>/task/*`): Envoy's
/// main thread and its workers (`wrk:worker_N`) apart. Read from `schedstat` (nanoseconds on
/// the CPU) where the kernel has it: `stat` counts 10 ms clock ticks, too coarse for the few
/// milliseconds a change costs a worker. Only for processes whose threads live through the
/// measurement (a thread that exits takes its time with it).
fn thread_cpu(pid: Option<u32>) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Some(pid) = pid else { return out };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let schedstat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        let seconds = match schedstat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<f64>().ok())
        {
            Some(ns) => ns / 1e9,
            None => {
                let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
                let field = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
                (field(14 - 3) + field(15 - 3)) / 100.0
            }
        };
        *out.entry(name).or_insert(0.0) += seconds;
    }
    out
}

fn ns_of(i: usize) -> String {
    format!("team-{}", i % NAMESPACES)
}

fn doc(i: usize, upstream: &str, password: &str) -> String {
    let (ns, name) = (ns_of(i), format!("c{i}"));
    format!(
        "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  address: {upstream}\n  auth: {{name: basicAuth, secretRef: {{name: {name}}}}}\n  connectorClassName: oci\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations: {{connectors.alauda.io/allowed-connectors: \"{name}\"}}\ntype: kubernetes.io/basic-auth\nstringData: {{username: robot-{i}, password: {password}}}\n"
    )
}

/// Replaces a file whole, by rename, as an editor or a tool would.
fn put(dir: &Path, i: usize, text: &str) -> Result<()> {
    let (tmp, file) = (dir.join(format!(".c{i}.tmp")), dir.join(format!("c{i}.yaml")));
    std::fs::write(&tmp, text).map_err(|e| format!("write: {e}"))?;
    std::fs::rename(&tmp, &file).map_err(|e| format!("rename: {e}"))
}

/// What the load saw: every answer with when it came (ms since the load started), which
/// connector it was for, and whether a 403 was acceptable for it at that moment.
#[derive(Clone, Copy)]
struct Seen {
    at_ms: u32,
    target: usize,
    allow_403: bool,
    status: u16,
}

/// The connector the changes are touching right now, for the load to pull from too:
/// `index << 1 | allow_403`, or `u64::MAX` for none.
static CHANGING: AtomicU64 = AtomicU64::new(u64::MAX);

fn manifest_get(ns: &str, i: usize, token: &str) -> Request {
    Request::get(&format!("/v2/namespaces/{ns}/connectors/c{i}/{REPO}/manifests/v1"))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .bearer(token)
}

/// One load thread: keep-alive manifest GETs of the image every connector can reach, three of
/// four from steady connectors (whose answer must be 200), one of four from the connector being
/// changed (200, or 403 while it is being added or deleted). A broken connection is an answer
/// of 0 and is reopened.
fn load_thread(port: u16, steady: &[usize], tokens: &[String], start: Instant, stop: &AtomicBool) -> Vec<Seen> {
    let mut seen = Vec::with_capacity(1 << 18);
    let mut conn = None;
    let mut k = 0usize;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let changing = CHANGING.load(Ordering::Relaxed);
        let (target, allow_403) = if k.is_multiple_of(4) && changing != u64::MAX {
            ((changing >> 1) as usize, changing & 1 == 1)
        } else {
            (steady[k % steady.len()], false)
        };
        let c = match conn.take() {
            Some(c) => c,
            None => match http::open(port, Duration::from_secs(10)) {
                Ok(c) => c,
                Err(_) => {
                    seen.push(Seen {
                        at_ms: start.elapsed().as_millis() as u32,
                        target,
                        allow_403,
                        status: 0,
                    });
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        let mut c = c;
        let status = match manifest_get(&ns_of(target), target, &tokens[target % NAMESPACES]).send_on(&mut c, port) {
            Ok(r) => {
                if r.header("connection").is_none_or(|v| !v.eq_ignore_ascii_case("close")) {
                    conn = Some(c);
                }
                r.status
            }
            Err(_) => 0,
        };
        seen.push(Seen {
            at_ms: start.elapsed().as_millis() as u32,
            target,
            allow_403,
            status,
        });
    }
    seen
}

/// Answers per second in `[from, to)` ms.
fn rate(seen: &[Seen], from: u32, to: u32) -> f64 {
    seen.iter().filter(|s| s.at_ms >= from && s.at_ms < to).count() as f64 * 1000.0 / f64::from(to - from)
}

struct LoadRow {
    n: usize,
    parts: bool,
    changes: usize,
    answers: usize,
    quiet_rps: f64,
    first_second: Vec<f64>,
    second_second: Vec<f64>,
    /// The control: the first second after a mark where nothing was changed, interleaved with
    /// the changes (one after every add, rotation and delete): how much this machine's
    /// throughput moves by itself over as many seconds.
    control_second: Vec<f64>,
    worst_100ms: f64,
    unexpected: Vec<String>,
    add_s: f64,
    delete_s: f64,
    rss_after_kib: u64,
}

/// Changes under a steady pull load (issue 17): `changes` adds, Secret rotations and deletes,
/// one every `spacing`, with `LOAD_THREADS` clients pulling throughout, and after each a mark
/// where nothing changes (the control). Reports the load's throughput in the first and second
/// second after each change, and in the first second after each control mark, against the
/// quiet seconds before and after, and every answer other than 200 (and the 403 of a connector
/// being added or deleted).
#[allow(clippy::too_many_arguments)]
fn run_under_load(
    n: usize,
    changes: usize,
    spacing: Duration,
    manifests: &Path,
    upstream: &str,
    envoy: &Envoy,
    controller: &Controller,
    recorder: &Recorder,
    tokens: &[String],
) -> Result<LoadRow> {
    // Steady connectors spread over the namespaces, none of which the changes touch.
    let steady: Vec<usize> = (0..16).map(|j| j * (n / 16) + 1).filter(|&i| i < n).collect();
    for &i in &steady {
        let r = manifest_get(&ns_of(i), i, &tokens[i % NAMESPACES]).send(envoy.port)?;
        if r.status != 200 {
            return Err(format!("pre-flight of c{i}: {}", r.summary()));
        }
    }
    const QUIET_MS: u32 = 5000;
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let mut marks: Vec<(u32, &str, usize)> = vec![];
    let (seen, last_change_ms) = std::thread::scope(|scope| -> Result<(Vec<Seen>, u32)> {
        let threads: Vec<_> = (0..LOAD_THREADS)
            .map(|_| scope.spawn(|| load_thread(envoy.port, &steady, tokens, start, &stop)))
            .collect();
        let mut run = || -> Result<()> {
            std::thread::sleep(Duration::from_millis(u64::from(QUIET_MS)));
            let base = n + 1_000_000;
            let mut k = 0;
            while marks.iter().filter(|m| m.1 != "none").count() < changes {
                let i = base + k;
                let r = (k * 7919 + 3) % n;
                let steps: [(&str, usize, bool); 6] = [
                    ("add", i, true),
                    ("none", i, true),
                    ("rotate", r, false),
                    ("none", r, false),
                    ("delete", i, true),
                    // The deleted connector stays in the load, refused (as in the delete's own second).
                    ("none", i, true),
                ];
                for (what, target, allow_403) in steps {
                    CHANGING.store((target as u64) << 1 | u64::from(allow_403), Ordering::Relaxed);
                    let at = start.elapsed();
                    marks.push((at.as_millis() as u32, what, target));
                    match what {
                        "add" => put(manifests, i, &doc(i, upstream, "pw-0"))?,
                        "rotate" => put(manifests, r, &doc(r, upstream, &format!("pw-load-{k}")))?,
                        "none" => {}
                        _ => std::fs::remove_file(manifests.join(format!("c{i}.yaml")))
                            .map_err(|e| format!("remove: {e}"))?,
                    }
                    // The recorder keeps what it relays; drop it as we go.
                    recorder.take();
                    std::thread::sleep((at + spacing).saturating_sub(start.elapsed()));
                }
                k += 1;
            }
            Ok(())
        };
        let outcome = run();
        CHANGING.store(u64::MAX, Ordering::Relaxed);
        let last = start.elapsed().as_millis() as u32;
        std::thread::sleep(Duration::from_millis(u64::from(QUIET_MS)));
        stop.store(true, Ordering::Relaxed);
        let mut seen: Vec<Seen> = threads.into_iter().flat_map(|t| t.join().unwrap_or_default()).collect();
        seen.sort_by_key(|s| s.at_ms);
        outcome.map(|_| (seen, last))
    })?;
    recorder.take();
    let end = seen.last().map_or(0, |s| s.at_ms);
    // Quiet: the seconds before the first change and after the last one has settled (skipping
    // the first second of each, while connections open and after the last change).
    let quiet_rps = (rate(&seen, 1000, QUIET_MS) + rate(&seen, last_change_ms + 1000, end)) / 2.0;
    let (controls, marks): (Vec<_>, Vec<_>) = marks.into_iter().partition(|m| m.1 == "none");
    let first_second: Vec<f64> = marks
        .iter()
        .map(|(t, ..)| rate(&seen, *t, t + 1000) / quiet_rps)
        .collect();
    let second_second: Vec<f64> = marks
        .iter()
        .map(|(t, ..)| rate(&seen, t + 1000, t + 2000) / quiet_rps)
        .collect();
    let control_second: Vec<f64> = controls
        .iter()
        .map(|(t, ..)| rate(&seen, *t, t + 1000) / quiet_rps)
        .collect();
    let worst_100ms = (QUIET_MS / 100..last_change_ms / 100)
        .map(|b| rate(&seen, b * 100, b * 100 + 100) / quiet_rps)
        .fold(f64::INFINITY, f64::min);
    let unexpected: Vec<String> = seen
        .iter()
        .filter(|s| !(s.status == 200 || (s.status == 403 && s.allow_403)))
        .map(|s| format!("{} ms: c{} answered {}", s.at_ms, s.target, s.status))
        .collect();
    // How long an add and a delete took to show in the load's own answers.
    let effective = |what: &str, want: u16| -> f64 {
        median(
            marks
                .iter()
                .filter(|(_, w, _)| *w == what)
                .filter_map(|(t, _, target)| {
                    seen.iter()
                        .find(|s| s.at_ms >= *t && s.target == *target && s.status == want)
                        .map(|s| f64::from(s.at_ms - t) / 1000.0)
                })
                .collect(),
        )
    };
    Ok(LoadRow {
        n,
        parts: false,
        changes: marks.len(),
        answers: seen.len(),
        quiet_rps,
        add_s: effective("add", 200),
        delete_s: effective("delete", 403),
        first_second,
        second_second,
        control_second,
        worst_100ms,
        unexpected,
        rss_after_kib: procs::rss_kib(controller.pid()),
    })
}

fn status(envoy: &Envoy, i: usize, token: &str) -> u16 {
    Request::get(&format!(
        "/v2/namespaces/{}/connectors/c{i}/{REPO}/manifests/missing",
        ns_of(i)
    ))
    .header("Accept", "application/vnd.oci.image.manifest.v1+json")
    .bearer(token)
    .send(envoy.port)
    .map(|r| r.status)
    .unwrap_or(0)
}

/// Polls until connector `i` answers `want`; how long that took.
fn until(envoy: &Envoy, i: usize, token: &str, want: u16, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if status(envoy, i, token) == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(format!("connector c{i} did not answer {want} within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Row {
    n: usize,
    /// `--config-parts`.
    parts: bool,
    cold_s: f64,
    add_s: f64,
    delete_s: f64,
    rotate_s: f64,
    cpu_per_change_ms: f64,
    rss_start_kib: u64,
    rss_after_kib: u64,
    changes: usize,
    envoy_rss_kib: u64,
    ecds_bytes: usize,
    idle_cpu_pct: f64,
    quiet_ctl_ms: f64,
    quiet_envoy_ms: f64,
    load: Option<LoadRow>,
}

impl Row {
    fn delivery(&self) -> &'static str {
        if self.parts { "parts" } else { "inline" }
    }
}

/// The changes under load: how many, how far apart, at which sizes.
struct LoadPlan {
    changes: usize,
    spacing: Duration,
    sizes: Vec<usize>,
}

#[allow(clippy::too_many_arguments)]
fn run_size(
    n: usize,
    parts: bool,
    changes: usize,
    idle: Duration,
    minter: &Minter,
    upstream: &str,
    recorder: &Recorder,
    plan: &LoadPlan,
) -> Result<Row> {
    let work = WorkDir::new(&format!("bench-scale-{n}-{}", if parts { "parts" } else { "inline" }))?;
    let manifests = work.sub("manifests")?;
    let identity = work.path().join("identity.json");
    std::fs::write(
        &identity,
        serde_json::json!({ "issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": minter.jwks() }).to_string(),
    )
    .map_err(|e| format!("identity: {e}"))?;
    for i in 0..n {
        put(&manifests, i, &doc(i, upstream, "pw-0"))?;
    }
    // Every namespace's default ServiceAccount may use its own connectors; one token per namespace.
    let tokens: Vec<String> = (0..NAMESPACES)
        .map(|k| minter.valid(&format!("team-{k}"), "default"))
        .collect::<Result<_>>()?;
    let token_of = |i: usize| tokens[i % NAMESPACES].clone();

    // The proxy's serving certificate is made before the clock starts: in a pod it is a mounted
    // Secret, not part of the cold start (the harness makes it with openssl, ~0.5 s here).
    ProxyCert::for_work(&work)?;
    let started = Instant::now();
    // Envoy starts as soon as the controller listens, not after it is ready: in the pod both
    // containers start together and Envoy's xDS stream waits for the first configuration.
    let mut args = vec!["--poll-ms", "30000"];
    // Each delivery forced: the controller's default picks by the number of connectors.
    args.push(if parts { "--config-parts" } else { "--config-inline" });
    let controller = Controller::start_listening(&work, &manifests, &identity, &args)?;
    let envoy = Envoy::for_controller(&work, &controller, WORKERS)?;
    let limit = Duration::from_secs(600);
    for i in [n - 1, 0, n / 2] {
        until(&envoy, i, &token_of(i), 404, limit)?;
    }
    let cold_s = started.elapsed().as_secs_f64();
    let rss_start_kib = procs::rss_kib(controller.pid());
    let envoy_rss_kib = procs::rss_kib(envoy.pid());
    let ecds_bytes = Request::get("/config_dump?resource=ecds_filters")
        .send(envoy.admin_port)
        .map(|r| r.body.len())
        .unwrap_or(0);
    eprintln!("n={n}: cold start {cold_s:.2} s, controller {rss_start_kib} KiB, Envoy {envoy_rss_kib} KiB");

    // Changes, round robin: add a new connector, rotate an existing one's Secret, delete the
    // one just added. Each is timed until Envoy shows it.
    let (mut adds, mut deletes, mut rotates) = (vec![], vec![], vec![]);
    let cpu_before = cpu_seconds(controller.pid());
    let mut done = 0;
    let mut k = 0;
    while done < changes {
        let i = n + k;
        let ti = token_of(i);
        let t = Instant::now();
        put(&manifests, i, &doc(i, upstream, "pw-0"))?;
        until(&envoy, i, &ti, 404, limit)?;
        adds.push(t.elapsed().as_secs_f64());
        let r = (k * 7919) % n;
        let password = format!("pw-rot-{k}");
        recorder.take();
        let t = Instant::now();
        put(&manifests, r, &doc(r, upstream, &password))?;
        let want = format!("Basic {}", basic_value(&format!("robot-{r}"), &password));
        loop {
            status(&envoy, r, &token_of(r));
            if recorder.take().authorizations().contains(&want.as_str()) {
                break;
            }
            if t.elapsed() > limit {
                return Err(format!("rotation of c{r} not effective"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        rotates.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        std::fs::remove_file(manifests.join(format!("c{i}.yaml"))).map_err(|e| format!("remove: {e}"))?;
        until(&envoy, i, &ti, 403, limit)?;
        deletes.push(t.elapsed().as_secs_f64());
        done += 3;
        k += 1;
    }
    let cpu_changes = cpu_seconds(controller.pid()) - cpu_before;
    // Let the drain of retired credentials pass before reading memory.
    std::thread::sleep(Duration::from_secs(3));
    let rss_after_kib = procs::rss_kib(controller.pid());
    let idle_before = cpu_seconds(controller.pid());
    std::thread::sleep(idle);
    let idle_cpu_pct = (cpu_seconds(controller.pid()) - idle_before) / idle.as_secs_f64() * 100.0;
    // CPU per change on each side, with nothing else running: Secret rotations a second and a
    // half apart (long enough for one to settle at 20,000), no requests.
    const QUIET_CHANGES: usize = 8;
    let ctl_before = cpu_seconds(controller.pid());
    let threads_before = thread_cpu(envoy.pid());
    for k in 0..QUIET_CHANGES {
        let r = (k * 104_729 + 11) % n;
        put(&manifests, r, &doc(r, upstream, &format!("pw-quiet-{k}")))?;
        std::thread::sleep(Duration::from_millis(1500));
    }
    let quiet_ctl_ms = (cpu_seconds(controller.pid()) - ctl_before) / QUIET_CHANGES as f64 * 1000.0;
    let threads: Vec<(String, f64)> = thread_cpu(envoy.pid())
        .into_iter()
        .map(|(name, after)| (name.clone(), after - threads_before.get(&name).copied().unwrap_or(0.0)))
        .collect();
    // Envoy's threads live as long as it does: their sum is its CPU, read to the nanosecond.
    let quiet_envoy_ms = threads.iter().map(|(_, d)| d).sum::<f64>() / QUIET_CHANGES as f64 * 1000.0;
    let by_thread: Vec<String> = threads
        .into_iter()
        .filter(|(_, d)| *d > 0.0005)
        .map(|(name, d)| format!("{name} {:.1} ms", d / QUIET_CHANGES as f64 * 1000.0))
        .collect();
    eprintln!(
        "n={n}: CPU per change without requests: controller {quiet_ctl_ms:.1} ms, Envoy {quiet_envoy_ms:.1} ms ({})",
        by_thread.join(", ")
    );
    let load = if plan.changes > 0 && plan.sizes.contains(&n) {
        Some(
            run_under_load(
                n,
                plan.changes,
                plan.spacing,
                &manifests,
                upstream,
                &envoy,
                &controller,
                recorder,
                &tokens,
            )
            .map(|l| LoadRow { parts, ..l })?,
        )
    } else {
        None
    };
    Ok(Row {
        n,
        parts,
        cold_s,
        add_s: median(adds),
        delete_s: median(deletes),
        rotate_s: median(rotates),
        cpu_per_change_ms: cpu_changes / done as f64 * 1000.0,
        rss_start_kib,
        rss_after_kib,
        changes: done,
        envoy_rss_kib,
        ecds_bytes,
        idle_cpu_pct,
        quiet_ctl_ms,
        quiet_envoy_ms,
        load,
    })
}

fn main() -> Result<()> {
    require_wasm()?;
    let sizes = counts("--sizes", "100,1000,5000,20000");
    let changes: usize = arg("--changes", 30);
    let idle = Duration::from_secs(arg("--idle-seconds", 10));
    let plan = LoadPlan {
        changes: arg("--load-changes", 100),
        spacing: Duration::from_millis(arg("--spacing-ms", 2000)),
        sizes: counts("--load-sizes", "5000,20000"),
    };
    let work = WorkDir::new("bench-scale")?;
    let registry = Registry::start_open(&work)?;
    // The image the load pulls, through any connector.
    let skopeo = Skopeo::new(&work)?;
    let sample = image::build_sample(&work, "bench", "v1", 1)?;
    image::push(&skopeo, &sample, &registry.authority(), REPO, Creds::None)?;
    let recorder = Recorder::start(registry.port)?;
    let upstream = recorder.url();
    let minter = Minter::new(&work.sub("keys")?)?;
    let deliveries: Vec<bool> = arg::<String>("--deliveries", "inline,parts".into())
        .split(',')
        .map(|d| match d {
            "inline" => Ok(false),
            "parts" => Ok(true),
            other => Err(format!("--deliveries: {other:?}: expected inline or parts")),
        })
        .collect::<Result<_>>()?;
    let mut rows = vec![];
    for n in sizes {
        for parts in &deliveries {
            match run_size(n, *parts, changes, idle, &minter, &upstream, &recorder, &plan) {
                Ok(r) => rows.push(r),
                Err(e) => eprintln!("n={n}: {e}"),
            }
        }
    }
    println!(
        "\nfile mode, controller {} , Envoy --concurrency {WORKERS}; changes timed until Envoy shows them (medians)\n",
        connector_devkit::controller::controller_binary()?.display()
    );
    println!(
        "| connectors | delivery | cold start | add | delete | rotate | controller CPU per change | controller RSS start / after {} changes | KiB per connector (after) | Envoy RSS | ECDS config dump | controller idle CPU | CPU per change without requests: controller / Envoy |",
        rows.first().map_or(0, |r| r.changes)
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} s | {:.3} s | {:.3} s | {:.3} s | {:.1} ms | {} / {} MiB | {:.1} | {} MiB | {} KB | {:.2} % | {:.1} / {:.1} ms |",
            r.n,
            r.delivery(),
            r.cold_s,
            r.add_s,
            r.delete_s,
            r.rotate_s,
            r.cpu_per_change_ms,
            r.rss_start_kib / 1024,
            r.rss_after_kib / 1024,
            r.rss_after_kib as f64 / r.n as f64,
            r.envoy_rss_kib / 1024,
            r.ecds_bytes / 1000,
            r.idle_cpu_pct,
            r.quiet_ctl_ms,
            r.quiet_envoy_ms
        );
    }
    let loaded: Vec<&LoadRow> = rows.iter().filter_map(|r| r.load.as_ref()).collect();
    if !loaded.is_empty() {
        println!(
            "\nunder load: {LOAD_THREADS} keep-alive clients pulling a manifest through 16 steady connectors and the one being changed; \
             an add, a Secret rotation or a delete every {} ms, each followed by a mark where nothing changes (the control); \
             throughput against the quiet seconds before and after\n",
            plan.spacing.as_millis()
        );
        println!(
            "| connectors | delivery | changes | answers | quiet req/s | 1st second after a change (median / worst) | 2nd second (median / worst) | 1st second after no change: control (median / worst) | worst 100 ms | add / delete seen by the load | answers other than 200 and the expected 403 | controller RSS after all changes |"
        );
        println!("|---:|---|---:|---:|---:|---|---|---|---:|---|---:|---:|");
        for l in &loaded {
            let worst = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
            println!(
                "| {} | {} | {} | {} | {:.0} | {:.3} / {:.3} | {:.3} / {:.3} | {:.3} / {:.3} | {:.2} | {:.3} / {:.3} s | {} | {} MiB ({:.1} KiB per connector) |",
                l.n,
                if l.parts { "parts" } else { "inline" },
                l.changes,
                l.answers,
                l.quiet_rps,
                median(l.first_second.clone()),
                worst(&l.first_second),
                median(l.second_second.clone()),
                worst(&l.second_second),
                median(l.control_second.clone()),
                worst(&l.control_second),
                l.worst_100ms,
                l.add_s,
                l.delete_s,
                l.unexpected.len(),
                l.rss_after_kib / 1024,
                l.rss_after_kib as f64 / l.n as f64
            );
        }
        for l in &loaded {
            for u in l.unexpected.iter().take(20) {
                println!("n={}: {u}", l.n);
            }
        }
    }
    // Envoy's memory per connector per worker, from the difference between sizes.
    if let (Some(a), Some(b)) = (rows.first(), rows.last())
        && b.n > a.n
    {
        let per = (b.envoy_rss_kib as f64 - a.envoy_rss_kib as f64) / (b.n - a.n) as f64 / f64::from(WORKERS);
        let ctl = (b.rss_after_kib as f64 - a.rss_after_kib as f64) / (b.n - a.n) as f64;
        println!(
            "\nbetween {} and {} connectors: Envoy {per:.2} KiB per connector per worker; controller {ctl:.2} KiB per connector (after the changes)",
            a.n, b.n
        );
    }
    Ok(())
}
