//! Changes under load (issue 17), in file mode against a real Envoy with two workers: a
//! connector added, its Secret rotated and the connector deleted, again and again, while
//! clients pull through it. Each Envoy worker switches to a new filter configuration on its
//! own, after the ECDS ACK; the controller must keep serving a credential until every Envoy
//! has acknowledged a configuration that no longer names it (make before break). Expected
//! answers: 200, or 403 while the connector is not (yet, or any more) configured; nothing else.
//!
//! Needs `cargo build -p connector-controller` and the release filter module (`make test` does both).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connector_devkit::controller::Controller;
use connector_devkit::envoy::Envoy;
use connector_devkit::http::Request;
use connector_devkit::random_secret;
use connector_devkit::registry::Credentials;
use connector_e2e::xds::{NS, Setup, connector_yaml, put, secret_yaml, setup};

const MANIFEST_TYPES: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

fn manifest_path(connector: &str) -> String {
    format!("/v2/namespaces/{NS}/connectors/{connector}/library/app/manifests/v1")
}

#[test]
fn adds_rotations_and_deletes_under_load_with_two_workers_answer_only_200_or_403() {
    churn("controller-scale-churn", &[], |_| {});
}

/// The same with the configuration delivered in parts (`--config-parts`): each worker fetches
/// a push's new parts over the channel after the ECDS ACK, so a part, like a credential, must
/// stay served until Envoy has moved on. The pushed configuration names no connector.
#[test]
fn in_parts_adds_rotations_and_deletes_under_load_answer_only_200_or_403() {
    churn("controller-scale-churn-parts", &["--config-parts"], |envoy| {
        let log = envoy.log();
        let assembled = log.matches("configuration assembled from its parts").count();
        // Three VMs (two workers and the main thread's) and 17 pushes.
        assert!(assembled >= 3 * 12, "each VM assembled the pushes: {assembled} times");
        let fetched_one = log.matches("part(s) listed, 1 to fetch").count();
        assert!(
            fetched_one >= 3 * 10,
            "a push fetches its one new part: {fetched_one} times"
        );
        let dump = envoy.config_dump().unwrap();
        assert!(
            dump.contains("\\\"parts\\\":[\\\"sha256:"),
            "the pushed document lists parts"
        );
        assert!(!dump.contains("filler-1"), "and no connector");
    });
}

/// By default the controller lists the connectors as parts once there are enough of them
/// (`--config-parts-from`, here 200: parts from 200 served connectors, inline again below 180).
/// Under load, 60 connectors added take the configuration into parts, 20 removed leave it in
/// parts, the other 40 removed take it back inline; the connector no change touches answers
/// 200 throughout, and each added connector is served while it exists.
#[test]
fn by_their_number_the_connectors_switch_to_parts_and_back_under_load() {
    let s = setup("controller-scale-delivery");
    let upstream = s.recorder.url();
    put(
        &s.manifests,
        "steady.yaml",
        &connector_yaml("steady", &upstream, "robot"),
    );
    put(
        &s.manifests,
        "secret.yaml",
        &secret_yaml("robot", s.registry.credentials.as_ref().unwrap()),
    );
    let many = |file: &str, from: usize, to: usize| {
        let text: String = (from..to)
            .map(|i| format!("{}---\n", connector_yaml(&format!("filler-{i}"), &upstream, "robot")))
            .collect();
        put(&s.manifests, file, &text);
    };
    many("fillers.yaml", 0, 150);
    let (controller, envoy) = start(&s, &["--config-parts-from", "200"]);
    let token = s.minter.valid(NS, "default").unwrap();
    let served = |connector: &str| wait_for(|| get(envoy.port, connector, &token) == Ok(200), connector);
    served("steady");
    let lists_parts = || envoy.config_dump().unwrap().contains("\\\"parts\\\":[\\\"sha256:");
    assert!(!lists_parts(), "151 connectors: inline");
    let steady = Steady::start(envoy.port, &token);

    // The load runs through each phase: more answers after it than before it.
    let mut answered = steady.ok();
    let mut went_on = |phase: &str| {
        wait_for(|| steady.ok() > answered, phase);
        answered = steady.ok();
    };
    many("more.yaml", 150, 190);
    many("last.yaml", 190, 210);
    served("filler-209");
    served("filler-150");
    assert!(lists_parts(), "211 connectors: in parts");
    went_on("the steady load, after the switch to parts");
    let renders = rendered(&controller);
    std::fs::remove_file(s.manifests.join("last.yaml")).unwrap();
    after_render(&controller, renders);
    wait_for(
        || get(envoy.port, "filler-209", &token) == Ok(403),
        "filler-209 removed",
    );
    served("filler-189");
    assert!(lists_parts(), "191 connectors: still in parts (inline again below 180)");
    went_on("the steady load, after 20 removed");
    std::fs::remove_file(s.manifests.join("more.yaml")).unwrap();
    wait_for(
        || get(envoy.port, "filler-150", &token) == Ok(403),
        "filler-150 removed",
    );
    wait_for(|| !lists_parts(), "151 connectors: inline again");
    served("filler-149");
    went_on("the steady load, after the switch back inline");
    let (steady_ok, failures) = steady.stop();
    eprintln!("steady {steady_ok} x 200, {} failed", failures.len());
    assert!(failures.is_empty(), "steady connector: {failures:?}");
    let log = envoy.log();
    // Three VMs (two workers and the main thread's): each assembled the parts.
    let assembled = log.matches("configuration assembled from its parts").count();
    assert!(assembled >= 3, "{assembled} assemblies");
    assert!(
        envoy.critical_wasm_lines().is_empty(),
        "{:?}",
        envoy.critical_wasm_lines()
    );
    let switches = controller
        .log()
        .matches("the filter configuration's delivery changes")
        .count();
    assert_eq!(switches, 2, "to parts and back: {switches}");
}

/// The controller with `args` on `s`'s manifests, and an Envoy with two workers it feeds.
fn start(s: &Setup, args: &[&str]) -> (Controller, Envoy) {
    let controller = Controller::start_with_args(&s.work, &s.manifests, &s.identity, args).unwrap();
    let envoy = Envoy::for_controller(&s.work, &controller, 2).unwrap();
    (controller, envoy)
}

/// Waits up to 10 s for `ok`.
fn wait_for(ok: impl Fn() -> bool, what: &str) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two clients pulling a connector no change touches, over and over: it must answer 200
/// throughout.
struct Steady {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Steady {
    fn start(port: u16, token: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::<String>::new()));
        let threads = (0..2)
            .map(|_| {
                let (stop, ok, failures, token) = (stop.clone(), ok.clone(), failures.clone(), token.to_string());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match get(port, "steady", &token) {
                            Ok(200) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => failures.lock().unwrap().push(format!("steady: {other:?}")),
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failures,
            threads,
        }
    }

    /// The 200s so far.
    fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// The 200s counted, and every other outcome.
    fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

/// Adds, rotates and deletes connectors while clients pull, with controller flags `args`;
/// `check` looks at the Envoy afterwards.
fn churn(name: &str, args: &[&str], check: impl FnOnce(&Envoy)) {
    let mut s = setup(name);
    let old = s.registry.credentials.clone().unwrap();
    let new = Credentials {
        username: "robot2".into(),
        password: random_secret().unwrap(),
    };
    // Both robot accounts are valid, as during a real rotation window.
    s.registry.add_user(&new).unwrap();
    let upstream = s.recorder.url();
    put(
        &s.manifests,
        "steady.yaml",
        &connector_yaml("steady", &upstream, "robot"),
    );
    put(&s.manifests, "secret.yaml", &secret_yaml("robot", &old));
    let fillers: String = (0..FILLERS)
        .map(|i| format!("{}---\n", connector_yaml(&format!("filler-{i}"), &upstream, "robot")))
        .collect();
    put(&s.manifests, "fillers.yaml", &fillers);
    let (controller, envoy) = start(&s, args);
    let token = s.minter.valid(NS, "default").unwrap();
    let start = Instant::now();
    while get(envoy.port, "steady", &token) != Ok(200) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "steady connector never served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let steady = Steady::start(envoy.port, &token);

    // Each cycle: connectors `rot-i` and `del-i` with their own Secret are added, and left
    // alone until Envoy runs them, so no worker has their credential yet. Then the Secret is
    // rotated, and as soon as the controller has rendered, a burst of requests (new connections,
    // spread over both workers) asks for `rot-i`: a worker still on the previous configuration
    // needs the previous revision's credential. Then `del-i` is deleted, with the same burst:
    // a worker still on the previous configuration needs its credential.
    let cycles = 4;
    let mut statuses: Vec<(String, u16)> = vec![];
    for i in 0..cycles {
        let (rot, del) = (format!("rot-{i}"), format!("del-{i}"));
        let file = format!("churn-{i}.yaml");
        let doc = |names: &[&str], c: &Credentials| {
            let connectors: String = names
                .iter()
                .map(|n| format!("{}---\n", connector_yaml(n, &upstream, &rot)))
                .collect();
            format!("{connectors}{}", secret_yaml(&rot, c))
        };
        let mut renders = rendered(&controller);
        put(&s.manifests, &file, &doc(&[&rot, &del], &old));
        renders = after_render(&controller, renders);
        std::thread::sleep(Duration::from_millis(400));
        put(&s.manifests, &file, &doc(&[&rot, &del], &new));
        renders = after_render(&controller, renders);
        statuses.extend(burst(envoy.port, &rot, &token));
        std::thread::sleep(Duration::from_millis(300));
        put(&s.manifests, &file, &doc(&[&rot], &new));
        renders = after_render(&controller, renders);
        statuses.extend(burst(envoy.port, &del, &token));
        std::thread::sleep(Duration::from_millis(300));
        std::fs::remove_file(s.manifests.join(&file)).unwrap();
        after_render(&controller, renders);
    }
    let (steady_ok, failures) = steady.stop();
    let count = |f: &dyn Fn(&(String, u16)) -> bool| statuses.iter().filter(|s| f(s)).count();
    let rot_ok = count(&|(n, st)| n.starts_with("rot") && *st == 200);
    let del_ok = count(&|(n, st)| n.starts_with("del") && *st == 200);
    let del_gone = count(&|(n, st)| n.starts_with("del") && *st == 403);
    let wrong: Vec<&(String, u16)> = statuses
        .iter()
        .filter(|(n, st)| !(*st == 200 || (n.starts_with("del") && *st == 403)))
        .collect();
    eprintln!(
        "{cycles} cycles with {FILLERS} other connectors: rotated {rot_ok} x 200; deleted {del_ok} x 200, {del_gone} x 403; {} wrong; steady {} x 200, {} failed",
        wrong.len(),
        steady_ok,
        failures.len()
    );
    assert!(wrong.is_empty(), "{} wrong answers: {wrong:?}", wrong.len());
    assert!(failures.is_empty(), "steady connector: {failures:?}");
    assert!(rot_ok > 0 && del_ok + del_gone > 0, "the bursts ran");
    assert!(steady_ok > 20, "the steady load ran");
    // The rotated credential really reached the upstream.
    let seen = s.recorder.take();
    let new_value = format!(
        "Basic {}",
        connector_devkit::http::basic_value(&new.username, &new.password)
    );
    assert!(
        seen.authorizations().contains(&new_value.as_str()),
        "the rotated credential was used"
    );
    assert!(
        envoy.critical_wasm_lines().is_empty(),
        "{:?}",
        envoy.critical_wasm_lines()
    );
    check(&envoy);
}

/// Connectors besides the churned ones: a filter configuration of this size takes each Envoy
/// worker long enough to compile that the window between the controller's render and a
/// worker's switch is tens of milliseconds, as at scale.
const FILLERS: usize = 1000;

fn get(port: u16, connector: &str, token: &str) -> Result<u16, String> {
    Request::get(&manifest_path(connector))
        .header("Accept", MANIFEST_TYPES)
        .bearer(token)
        .send(port)
        .map(|r| r.status)
}

fn rendered(c: &Controller) -> f64 {
    c.metric("connector_controller_renders_total{result=\"ok\"}")
        .unwrap()
        .unwrap_or(0.0)
}

/// Waits until the controller rendered past `before`; returns the new count.
fn after_render(c: &Controller, before: f64) -> f64 {
    let start = Instant::now();
    loop {
        let now = rendered(c);
        if now > before {
            return now;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the controller did not render the change"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// 8 clients at once, 3 requests each, each on a new connection (the kernel spreads them over
/// Envoy's workers).
fn burst(port: u16, connector: &str, token: &str) -> Vec<(String, u16)> {
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (connector, token) = (connector.to_string(), token.to_string());
            std::thread::spawn(move || {
                (0..3)
                    .map(|_| {
                        let r = Request::get(&manifest_path(&connector))
                            .header("Accept", MANIFEST_TYPES)
                            .bearer(&token)
                            .send(port);
                        if let Ok(r) = &r
                            && r.status != 200
                            && r.status != 403
                        {
                            eprintln!("{connector}: {} {}", r.status, r.body_text());
                        }
                        (connector.clone(), r.map(|r| r.status).unwrap_or(0))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
}
