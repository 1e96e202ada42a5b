//! A configuration that lists its connectors as parts (the controller's `--config-parts`,
//! issue 17), under wasmtime as Envoy runs it: the module fetches the parts over the
//! controller channel on its tick, takes a part only if its SHA-256 is its id, serves once all
//! are in, and keeps serving the running configuration while a later push's parts arrive; a
//! push fetches only the parts it does not hold, and one whose parts do not compile changes
//! nothing.

mod common;

use common::*;
use connector_wasm_host::{Host, HttpCall};
use serde_json::{Value, json};

const MANIFEST: &str = "/v2/namespaces/demo/connectors/registry/lib/app/manifests/v1";
const CHANNEL: &str = "connector_controller";

/// The test configuration with its connectors cut into `groups` parts: the document and each
/// part's (id, text).
fn in_parts(connectors: &[Value], groups: &[usize]) -> (Value, Vec<(String, String)>) {
    let mut doc = config();
    doc["controller"] = json!({"cluster": CHANNEL});
    doc["connectors"] = json!(connectors);
    let parts = connector_wasm_host::parts::cut(&mut doc, groups).unwrap();
    (doc, parts)
}

fn connectors() -> Vec<Value> {
    config()["connectors"].as_array().unwrap().clone()
}

fn part_calls(h: &Host) -> Vec<HttpCall> {
    h.pending_calls().into_iter().filter(|c| c.cluster == CHANNEL).collect()
}

/// Answers each pending part call with the text its path names.
fn answer_parts(h: &mut Host, parts: &[(String, String)]) -> usize {
    connector_wasm_host::parts::answer(h, CHANNEL, parts).unwrap()
}

fn advance_ms(h: &mut Host, ms: u64) {
    let now = h.rec().now_nanos();
    h.rec_mut().now_nanos = Some(now + ms * 1_000_000);
}

fn logged(h: &Host, needle: &str) -> usize {
    h.rec().logs_containing(needle).len()
}

#[test]
fn the_parts_are_fetched_checked_and_served_and_a_push_fetches_only_its_new_part() {
    let mut h = Host::with(options()).unwrap();
    let (doc, parts) = in_parts(&connectors(), &[1, 1]);
    assert!(h.configure(doc.to_string().as_bytes()).unwrap(), "{:?}", h.rec().logs);
    // Nothing is fetched in `on_configure` (Envoy's canary never ticks), nothing served yet.
    assert!(part_calls(&h).is_empty());
    let (id, _) = request(&mut h, "GET", MANIFEST, Some(&bearer(&token("demo", "default"))));
    let message = assert_refused(&h, id, 503, "UNAVAILABLE");
    assert!(message.contains("still fetching its configuration"), "{message}");

    h.tick().unwrap();
    let calls = part_calls(&h);
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|c| c.header(":method").as_deref() == Some("GET")));
    // The wrong text for a part is refused (and asked again later); the right one kept.
    let first = calls
        .iter()
        .find(|c| c.header(":path").unwrap().ends_with(&parts[0].0))
        .unwrap();
    let second = calls
        .iter()
        .find(|c| c.header(":path").unwrap().ends_with(&parts[1].0))
        .unwrap();
    h.answer_call(first.token, 200, &[], parts[1].1.as_bytes()).unwrap();
    h.answer_call(second.token, 200, &[], parts[1].1.as_bytes()).unwrap();
    assert_eq!(logged(&h, "not the part asked for"), 1, "{:?}", h.rec().logs);
    let (id, _) = request(&mut h, "GET", MANIFEST, Some(&bearer(&token("demo", "default"))));
    assert_refused(&h, id, 503, "UNAVAILABLE");
    h.tick().unwrap();
    assert!(part_calls(&h).is_empty(), "not before the retry time");
    advance_ms(&mut h, 300);
    h.tick().unwrap();
    assert_eq!(answer_parts(&mut h, &parts), 1, "only the part still missing");
    assert_eq!(
        logged(&h, "configuration assembled from its parts"),
        1,
        "{:?}",
        h.rec().logs
    );
    forwarded(&mut h, "GET", MANIFEST);

    // A push that changes one connector: one part fetched; until it is in, the running
    // configuration serves.
    let mut changed = connectors();
    changed[1]["readOnly"] = json!(true);
    let (doc2, parts2) = in_parts(&changed, &[1, 1]);
    assert_eq!(parts2[0], parts[0]);
    let (root2, ok) = h.new_root(doc2.to_string().as_bytes()).unwrap();
    assert!(ok);
    // Only the new configuration's root makes its calls (an older root may go away).
    h.tick().unwrap();
    assert!(part_calls(&h).is_empty());
    h.tick_root(root2).unwrap();
    let calls = part_calls(&h);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].header(":path").unwrap(), format!("/v1/parts/{}", parts2[1].0));
    let served_meanwhile = forwarded(&mut h, "GET", MANIFEST);
    h.finish(served_meanwhile).unwrap();
    assert_eq!(answer_parts(&mut h, &parts2), 1);
    assert_eq!(logged(&h, "configuration assembled from its parts"), 2);
    assert_eq!(
        logged(&h, "1 kept from the running configuration"),
        1,
        "{:?}",
        h.rec().logs
    );
    let _ = root2;

    // A push whose new part does not compile: refused with its problem, the running one stays.
    let mut bad = changed.clone();
    bad[1]["address"] = json!("ftp://nowhere");
    let (doc3, parts3) = in_parts(&bad, &[1, 1]);
    let (root3, ok) = h.new_root(doc3.to_string().as_bytes()).unwrap();
    assert!(ok, "the pushed document itself is valid");
    h.tick_root(root3).unwrap();
    assert_eq!(answer_parts(&mut h, &parts3), 1);
    assert_eq!(
        logged(&h, "assembled from its parts was refused"),
        1,
        "{:?}",
        h.rec().logs
    );
    assert!(logged(&h, "connectors[1].address") >= 1, "{:?}", h.rec().logs);
    forwarded(&mut h, "GET", MANIFEST);
}

#[test]
fn a_document_listing_parts_is_checked_as_a_whole_before_anything_is_fetched() {
    let mut h = Host::with(options()).unwrap();
    let (mut doc, _) = in_parts(&connectors(), &[2]);
    doc.as_object_mut().unwrap().remove("controller");
    doc["parts"].as_array_mut().unwrap().push(json!("sha256:nothex"));
    assert!(!h.configure(doc.to_string().as_bytes()).unwrap());
    assert!(
        logged(&h, "parts: parts are fetched over the controller channel") == 1,
        "{:?}",
        h.rec().logs
    );
    assert!(logged(&h, "parts[1]: expected a part id") == 1, "{:?}", h.rec().logs);
    h.tick().unwrap();
    assert!(h.pending_calls().is_empty());
}
