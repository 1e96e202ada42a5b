//! Answers that break off after their head (issue 10): an upstream, a token service or the
//! controller's channel sends a response head and a few body bytes, then closes, resets or
//! stalls. Each costs only the request that met it, answered at once with an OCI 503; the next
//! request to a healthy connector, on the same Envoy worker, gets 200; no `[critical]` line
//! appears in Envoy's log (a trap of the filter's VM would log one and fail every connector).
//!
//! Real controller (file mode, xDS), real Envoy (`--concurrency 1`: one VM, so a trap could not
//! hide on another worker), real Distribution for the healthy connector; the misbehaving peers
//! are `connector_e2e::breaker`.

use std::time::{Duration, Instant};

use connector_devkit::controller::Controller;
use connector_devkit::envoy::Envoy;
use connector_devkit::http::{Request, Response};
use connector_e2e::breaker::{Answer, Breaker, Then, basic_challenge_head, bearer_challenge, json_ok_head};
use connector_e2e::oci_error;
use connector_e2e::xds::{NS, connector_yaml, put, secret_yaml, setup};

const MANIFEST_TYPES: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

fn get_manifest(port: u16, connector: &str, token: &str) -> (Response, Duration) {
    let path = format!("/v2/namespaces/{NS}/connectors/{connector}/library/app/manifests/v1");
    let started = Instant::now();
    let mut req = Request::get(&path).header("Accept", MANIFEST_TYPES).bearer(token);
    req.timeout = Duration::from_secs(40);
    let r = req
        .send(port)
        .unwrap_or_else(|e| panic!("GET manifest via {connector}: no answer: {e}"));
    (r, started.elapsed())
}

/// An upstream whose `/v2/` answer breaks off.
fn broken_probe(then: Then) -> Breaker {
    Breaker::start(move |_, _, _| Answer::Broken(basic_challenge_head(), then))
}

/// An upstream that asks for a bearer token from its own `/token`, whose answer breaks off.
/// Plain HTTP like every [`Breaker`]: the raw socket breaking off is what is tested.
fn broken_realm(then: Then) -> Breaker {
    let realm_port = std::sync::Arc::new(std::sync::OnceLock::<u16>::new());
    let rp = realm_port.clone();
    let b = Breaker::start(move |_, path, _| {
        if path.starts_with("/token") {
            Answer::Broken(json_ok_head(), then)
        } else {
            let port = rp.get().copied().unwrap_or(0);
            Answer::Full(bearer_challenge(&format!("http://127.0.0.1:{port}/token")))
        }
    });
    let _ = realm_port.set(b.port);
    b
}

#[test]
fn answers_that_break_off_cost_only_their_request() {
    let s = setup("broken-answers");
    let creds = s.registry.credentials.clone().unwrap();
    put(&s.manifests, "secret.yaml", &secret_yaml("robot", &creds));

    let mut upstreams: Vec<(&str, Breaker, &str, Duration)> = vec![];
    for (name, then, limit) in [
        ("probe-close", Then::Close, 3),
        ("probe-reset", Then::Reset, 3),
        ("probe-stall", Then::Stall, 8),
    ] {
        upstreams.push((
            name,
            broken_probe(then),
            "the upstream registry",
            Duration::from_secs(limit),
        ));
    }
    for (name, then, limit) in [
        ("realm-close", Then::Close, 3),
        ("realm-reset", Then::Reset, 3),
        ("realm-stall", Then::Stall, 8),
    ] {
        upstreams.push((name, broken_realm(then), "token service", Duration::from_secs(limit)));
    }
    put(
        &s.manifests,
        "healthy.yaml",
        &connector_yaml("healthy", &s.registry.url(), "robot"),
    );
    // The channel's answer for these connectors' credential breaks off (see the relay below).
    for name in ["channel-close", "channel-reset", "channel-stall"] {
        put(
            &s.manifests,
            &format!("{name}.yaml"),
            &connector_yaml(name, &s.registry.url(), "robot"),
        );
    }
    for (name, b, _, _) in &upstreams {
        put(
            &s.manifests,
            &format!("{name}.yaml"),
            &connector_yaml(name, &b.url(), "robot"),
        );
    }

    let controller = Controller::start_with_args(&s.work, &s.manifests, &s.identity, &[]).unwrap();
    // Envoy reaches the controller's channel through a relay that breaks the answer for one
    // connector's credential and passes every other call through unchanged.
    let channel_port = controller.ports.channel;
    let channel = Breaker::start(move |_, path, _| {
        let rest = path.strip_prefix(&format!("/v1/credentials/{NS}/")).unwrap_or("");
        let rest = rest.split('?').next().unwrap_or_default();
        match rest {
            "channel-close" => Answer::Broken(json_ok_head(), Then::Close),
            "channel-reset" => Answer::Broken(json_ok_head(), Then::Reset),
            "channel-stall" => Answer::Broken(json_ok_head(), Then::Stall),
            _ => Answer::Relay(channel_port),
        }
    });
    let envoy = Envoy::start_xds(&s.work, controller.ports.xds, channel.port, &controller.envoy_env()).unwrap();
    let token = s.minter.valid(NS, "default").unwrap();

    let (r, _) = get_manifest(envoy.port, "healthy", &token);
    assert_eq!(r.status, 200, "healthy before any fault: {}", r.summary());

    let mut cases: Vec<(&str, &str, Duration)> = upstreams.iter().map(|(n, _, w, l)| (*n, *w, *l)).collect();
    cases.push(("channel-close", "controller", Duration::from_secs(3)));
    cases.push(("channel-reset", "controller", Duration::from_secs(3)));
    cases.push(("channel-stall", "controller", Duration::from_secs(8)));
    for (name, what, limit) in &cases {
        let (r, took) = get_manifest(envoy.port, name, &token);
        eprintln!("{name}: {} after {took:?}: {}", r.status, r.body_text());
        assert_eq!(r.status, 503, "{name}: {}", r.summary());
        assert_eq!(r.header("content-type"), Some("application/json"), "{name}");
        let (code, message) = oci_error(&r);
        assert_eq!(code, "UNAVAILABLE", "{name}: {message}");
        assert!(message.contains(what), "{name}: the error must name {what}: {message}");
        assert!(
            message.contains(&format!("{NS}/{name}")) || *what != "the upstream registry",
            "{name}: {message}"
        );
        assert!(took < *limit, "{name}: answered after {took:?}, limit {limit:?}");
        // The same worker still serves every other connector.
        let (ok, _) = get_manifest(envoy.port, "healthy", &token);
        assert_eq!(ok.status, 200, "after {name}, the healthy connector: {}", ok.summary());
    }
    // Every broken peer was really reached (the faults were delivered, not avoided).
    for (name, b, _, _) in &upstreams {
        assert!(!b.heads().is_empty(), "{name}: the broken peer saw no request");
    }
    assert!(
        channel
            .heads()
            .iter()
            .any(|h| h.contains("/v1/credentials/demo/channel-close")),
        "the channel relay saw the credential call"
    );
    for (name, b, _, _) in &upstreams {
        for h in b.heads() {
            assert!(!h.contains(&token), "{name}: the client's token reached a broken peer");
        }
    }

    let stats = Request::get("/stats?filter=oci_connector.calls.failed")
        .send(envoy.admin_port)
        .unwrap()
        .body_text();
    eprintln!("{stats}");
    let failed: u64 = stats
        .lines()
        .find_map(|l| {
            l.split_once("oci_connector.calls.failed: ")
                .map(|(_, v)| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    assert!(
        failed >= cases.len() as u64,
        "calls.failed = {failed}, expected >= {}",
        cases.len()
    );
    let critical = envoy.critical_wasm_lines();
    assert!(critical.is_empty(), "a trap of the filter's VM: {critical:?}");
    let log = envoy.log();
    assert!(!log.contains("panicked"), "Envoy's log shows a panic");
}
