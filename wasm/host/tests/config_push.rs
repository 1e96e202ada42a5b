//! A new filter configuration, delivered as Envoy delivers it (a new root context in the running
//! VM), keeps the caches it did not change: the verified token, the tokened connector's learned
//! challenge and upstream token. Changing that connector's entry, or removing the key that
//! verified the token, costs exactly those entries.

mod common;

use common::*;
use connector_wasm_host::{Action, Host, headers};
use serde_json::json;

const TOKENED: &str = "/v2/namespaces/demo/connectors/tokened/lib/app/manifests/v1";

/// A request on a new stream under `root`; its action and stream id.
fn get(h: &mut Host, root: u32, auth: &str) -> (u32, Action) {
    let id = h.new_stream_under(root).unwrap();
    let hs = headers(&[
        (":method", "GET"),
        (":path", TOKENED),
        (":authority", "proxy.local:8080"),
        (":scheme", "http"),
        ("authorization", auth),
    ]);
    (id, h.request_headers(id, hs, true).unwrap())
}

/// Probe and token fetch of the first request to the tokened connector.
fn warm_up(h: &mut Host, root: u32, auth: &str) {
    let (id, action) = get(h, root, auth);
    assert_eq!(action, Action::Pause);
    let probe = h.pending_calls().remove(0);
    answer_bearer_probe(h, probe.token);
    let fetch = h.pending_calls().remove(0);
    h.answer_call(fetch.token, 200, &[], br#"{"token":"t","expires_in":300}"#)
        .unwrap();
    assert_eq!(h.stream(id).request_header_all("authorization"), vec!["Bearer t"]);
    h.finish(id).unwrap();
}

fn hits(h: &Host) -> u64 {
    h.rec().metric("oci_connector.token_cache.hits").map_or(0, |m| m.value)
}

#[test]
fn a_new_configuration_keeps_what_it_did_not_change() {
    let mut h = host();
    let auth = bearer(&token("demo", "default"));
    warm_up(&mut h, connector_wasm_host::ROOT_ID, &auth);
    let calls = h.rec().http_calls.len();

    // Another connector added: a new root, the same caches.
    let mut pushed = config();
    pushed["connectors"].as_array_mut().unwrap().push(json!({
        "namespace": "demo", "name": "third", "address": "http://third.internal:5000",
        "cluster": "upstream_third", "credential": {"username": "robot", "passwordEnv": "REG_PASSWORD"}}));
    let (root2, ok) = h.new_root(pushed.to_string().as_bytes()).unwrap();
    assert!(ok);
    let before = hits(&h);
    let (id, action) = get(&mut h, root2, &auth);
    assert_eq!(
        action,
        Action::Continue,
        "no probe, no token fetch: {:?}",
        h.stream(id).local()
    );
    assert_eq!(h.rec().http_calls.len(), calls, "no call at all");
    assert_eq!(h.stream(id).request_header_all("authorization"), vec!["Bearer t"]);
    assert_eq!(hits(&h), before + 1, "the token stayed verified");

    // The tokened connector itself changed (its address): it learns and fetches again.
    let mut changed = pushed.clone();
    changed["connectors"][1]["address"] = json!("https://reg2.example");
    let (root3, ok) = h.new_root(changed.to_string().as_bytes()).unwrap();
    assert!(ok);
    let (_, action) = get(&mut h, root3, &auth);
    assert_eq!(action, Action::Pause, "a changed connector asks its upstream again");
    let probe = h.pending_calls().remove(0);
    assert_eq!(probe.header(":authority").as_deref(), Some("reg2.example"));

    // The key that verified the token removed: the token is checked again, and refused.
    let mut keyless = changed.clone();
    keyless["identity"]["jwks"] = json!({"keys": []});
    let (root4, ok) = h.new_root(keyless.to_string().as_bytes()).unwrap();
    assert!(!ok, "no key at all is a refused configuration");
    let (id, _) = get(&mut h, root4, &auth);
    assert_eq!(
        h.stream(id).local().map(|r| r.status),
        Some(503),
        "a refused root fails closed"
    );
    let mut other_key = changed;
    other_key["identity"]["jwks"]["keys"][0]["kid"] = json!("rsa-2");
    let (root5, ok) = h.new_root(other_key.to_string().as_bytes()).unwrap();
    assert!(ok);
    let (id, _) = get(&mut h, root5, &auth);
    let r = h.stream(id).local().expect("refused");
    assert_eq!(r.status, 401, "{}", r.body_text());
    assert!(r.body_text().contains("rsa-1"), "{}", r.body_text());
}

/// A fresh VM in the same process (what Envoy's configuration canary is, and a worker before
/// its first request) with the memo the first VM left in shared data.
fn fresh_vm_beside(h: &Host) -> Host {
    let mut fresh = Host::with(options()).unwrap();
    fresh.rec_mut().shared_data = h.rec().shared_data.clone();
    fresh
}

#[test]
fn a_fresh_vm_accepts_a_change_by_the_memo_and_compiles_it_on_its_next_tick_or_request() {
    let h = host();
    assert_eq!(h.rec().shared_data.len(), 1, "the accepting VM left its memo");
    let mut pushed = config();
    pushed["connectors"][0]["allowedNamespaces"] = json!(["ci", "build"]);
    let compiled = |h: &Host| {
        h.rec()
            .logs_containing("configuration compiled after the memo's check: 2 connector(s)")
            .len()
    };

    // Accepted without a compile, which waits for the next tick or request.
    let mut fresh = fresh_vm_beside(&h);
    assert!(fresh.configure(pushed.to_string().as_bytes()).unwrap());
    assert_eq!(
        fresh.rec().logs_containing("checked as a change").len(),
        1,
        "{:?}",
        fresh.rec().logs
    );
    assert_eq!(compiled(&fresh), 0);
    // The first request compiles it, and it is what was pushed: `build` may use `registry`.
    let t = token("build", "default");
    let (id, action) = request(
        &mut fresh,
        "GET",
        "/v2/namespaces/demo/connectors/registry/lib/app/manifests/v1",
        Some(&bearer(&t)),
    );
    assert_eq!(action, Action::Pause, "{:?}", fresh.stream(id).local());
    answer_basic_probe(&mut fresh, "upstream_demo");
    assert!(fresh.stream(id).local().is_none());
    assert_eq!(compiled(&fresh), 1, "{:?}", fresh.rec().logs);

    // Or the tick asked for at configure time, whichever comes first; once.
    let mut fresh = fresh_vm_beside(&h);
    assert!(fresh.configure(pushed.to_string().as_bytes()).unwrap());
    fresh.tick().unwrap();
    assert_eq!(compiled(&fresh), 1, "{:?}", fresh.rec().logs);
    let (id, _) = request(
        &mut fresh,
        "GET",
        "/v2/namespaces/demo/connectors/registry/lib/app/manifests/v1",
        Some(&bearer(&t)),
    );
    answer_basic_probe(&mut fresh, "upstream_demo");
    assert!(fresh.stream(id).local().is_none());
    fresh.tick().unwrap();
    assert_eq!(compiled(&fresh), 1);

    // A push with a problem is not decided by the memo: the full compile refuses it, listing it.
    let mut bad = config();
    bad["connectors"][1]["name"] = json!("registry");
    let mut fresh = fresh_vm_beside(&h);
    assert!(!fresh.configure(bad.to_string().as_bytes()).unwrap());
    assert_eq!(
        fresh
            .rec()
            .logs_containing("connector demo/registry is defined twice")
            .len(),
        1,
        "{:?}",
        fresh.rec().logs
    );
    // Nor one whose settings changed: compiled whole, and accepted.
    let mut other = config();
    other["proxy"]["realm"] = json!("elsewhere");
    let mut fresh = fresh_vm_beside(&h);
    assert!(fresh.configure(other.to_string().as_bytes()).unwrap());
    assert!(fresh.rec().logs_containing("checked as a change").is_empty());
    assert_eq!(
        fresh
            .rec()
            .logs_containing("configuration accepted: 2 connector(s)")
            .len(),
        1
    );
}
