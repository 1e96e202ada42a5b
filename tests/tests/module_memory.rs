//! What loading the shipped filter module costs Envoy's memory, beside the do-nothing module in
//! the same Envoy set-up (issue 14: the filter's share of Envoy's memory). V8 compiles the module
//! once per Envoy, and the memory that compiling takes stays with the process: a build of the
//! same code with larger functions (Binaryen's `-Os` inlining every function called from one
//! place) left Envoy 31 MiB over the do-nothing module where LLVM's own functions left it 13
//! (docs/benchmark-log.md, 2026-12-05). This keeps the module's build from growing it unseen.
//!
//! Needs `cargo build -p noop-filter --target wasm32-wasip1 --release` (`make test` does it).

use connector_devkit::envoy::{Cluster, ConnectorSpec, Envoy, EnvoySpec, WasmFilter, filter_config};
use connector_devkit::http::Request;
use connector_devkit::tokens::Minter;
use connector_devkit::{WorkDir, procs};

/// The filter's share over the do-nothing module, measured 12.6-13.8 MiB with two workers; the
/// `-Os`-inlined build read 31.3-31.6 MiB.
const MAX_SHARE_MIB: f64 = 20.0;
/// Issue 14's bound on what each further worker (a VM of its own) may cost; measured about 1 MiB
/// with the caches full (the benchmark's memory table). What a cached token adds to a VM's heap
/// is pinned under wasmtime (`wasm/host`'s `warm_request`).
const MAX_PER_WORKER_MIB: f64 = 10.0;

const PATH: &str = "/v2/namespaces/demo/connectors/registry/app/manifests/v1";

/// The filter as the benchmark configures it (one connector, nothing listening behind it), the
/// do-nothing module, and a token the filter accepts.
fn modules(work: &WorkDir) -> (WasmFilter, WasmFilter, String) {
    let minter = Minter::new(work.path()).unwrap();
    let token = minter.valid("demo", "default").unwrap();
    let connector = ConnectorSpec {
        namespace: "demo".into(),
        name: "registry".into(),
        address: "https://registry.example".into(),
        cluster: "upstream".into(),
        username: "robot".into(),
        password_env: "MEMORY_TEST_PASSWORD".into(),
        allowed_namespaces: vec!["demo".into()],
        allowed_service_accounts: vec![],
    };
    let filter = WasmFilter {
        wasm: connector_devkit::require_wasm().unwrap(),
        config: filter_config(&minter.jwks(), &[connector]),
        secret_env: vec![("MEMORY_TEST_PASSWORD".into(), "not-sent-anywhere".into())],
        plain_route: false,
    };
    let noop = WasmFilter {
        wasm: connector_e2e::test_module("noop-filter"),
        config: serde_json::json!({}),
        secret_env: vec![],
        plain_route: true,
    };
    (filter, noop, token)
}

/// Envoy with `workers` workers and `filter`, after 20 requests through it (the filter's with
/// `token`, each refused or failed behind it), and its resident memory in MiB once that stopped
/// moving.
fn envoy_rss(label: &str, filter: &WasmFilter, workers: u32, token: &str) -> f64 {
    let work = WorkDir::new(label).unwrap();
    // Nothing listens on the cluster's port: the memory asked about is the VM's, not traffic's.
    let port = procs::free_port().unwrap();
    let spec = EnvoySpec {
        clusters: vec![Cluster {
            name: "upstream".into(),
            port,
        }],
        filter: Some(filter.clone()),
    };
    let path = if filter.plain_route {
        "/v2/app/manifests/v1"
    } else {
        PATH
    };
    let envoy = Envoy::start_static_workers(&work, &spec, workers).unwrap();
    for _ in 0..20 {
        let r = Request::get(path).basic("robot", token).send(envoy.port).unwrap();
        assert!(r.status >= 400, "{label}: nothing to reach upstream: {}", r.summary());
    }
    let pid = envoy.pid();
    let mut last = 0;
    // Settled: the same reading twice, 200 ms apart.
    for _ in 0..25 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = procs::rss_kib(pid);
        if now == last {
            break;
        }
        last = now;
    }
    last as f64 / 1024.0
}

#[test]
fn the_filter_costs_envoy_little_memory_beside_a_module_that_does_nothing() {
    let work = WorkDir::new("module-memory").unwrap();
    let (filter, noop, token) = modules(&work);
    let with_noop = envoy_rss("module-memory-noop", &noop, 2, &token);
    let with_filter = envoy_rss("module-memory-filter", &filter, 2, &token);
    let share = with_filter - with_noop;
    eprintln!(
        "Envoy (2 workers): {with_noop:.1} MiB with the no-op module, {with_filter:.1} MiB with the filter: {share:+.1} MiB"
    );
    assert!(
        share <= MAX_SHARE_MIB,
        "the filter module costs Envoy {share:.1} MiB over the no-op module ({with_filter:.1} against {with_noop:.1} MiB), more than {MAX_SHARE_MIB} MiB: did the module's build make its functions larger?"
    );
}

/// Each worker runs a VM of its own: Envoy with the filter at one worker and at four, the
/// difference per added worker within issue 14's bound.
#[test]
fn each_worker_adds_little_with_the_filter() {
    let work = WorkDir::new("module-memory-workers").unwrap();
    let (filter, _, token) = modules(&work);
    let one = envoy_rss("module-memory-1", &filter, 1, &token);
    let four = envoy_rss("module-memory-4", &filter, 4, &token);
    let per_worker = (four - one) / 3.0;
    eprintln!(
        "Envoy with the filter: {one:.1} MiB with 1 worker, {four:.1} MiB with 4: {per_worker:+.2} MiB per worker"
    );
    assert!(
        per_worker <= MAX_PER_WORKER_MIB,
        "each worker costs Envoy {per_worker:.2} MiB with the filter ({one:.1} MiB with 1 worker, {four:.1} with 4), more than {MAX_PER_WORKER_MIB} MiB"
    );
}
