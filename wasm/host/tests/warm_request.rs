//! Pins the proxy-wasm host calls of a warm forwarded request (see `connector_wasm_host::warm`):
//! a change that adds one per request (a stat defined or named again, a header read or written
//! twice, a property lookup) fails here, with the list that changed. Also: what a verified
//! token costs the filter's heap.

use base64::Engine as _;
use connector_wasm_host::warm::{Warm, warm_forwarded_request};

#[test]
fn a_warm_forwarded_request_makes_exactly_these_host_calls() {
    let w = warm_forwarded_request(None).unwrap();
    assert_eq!(
        w.request,
        vec![
            // One read of the whole request map, the clock for token expiry.
            "proxy_get_header_map_pairs",
            "proxy_get_current_time_nanoseconds",
            // :path, :authority and the route's cluster header.
            "proxy_replace_header_map_value",
            "proxy_replace_header_map_value",
            "proxy_replace_header_map_value",
            // forwarded and token_cache.hits, by ids defined with the configuration.
            "proxy_increment_metric",
            "proxy_increment_metric",
            // The access log's connector and subject.
            "proxy_set_property",
            "proxy_set_property",
            // The connector's credential replaces the client's.
            "proxy_replace_header_map_value",
        ],
        "request phase"
    );
    assert_eq!(w.response, vec!["proxy_get_header_map_pairs"], "response phase");
    assert_eq!(w.total(), 11);
}

// The host form's path is the upstream's already: it is not written again.
#[test]
fn a_host_form_request_keeps_its_path_and_makes_one_host_call_fewer() {
    let mut w = Warm::new(None, false).unwrap();
    w.use_host_form();
    w.request().unwrap();
    let (calls, seen) = w
        .request_seen(&[":path", ":authority", "x-oci-connector-cluster", "authorization"])
        .unwrap();
    let replaces = calls
        .request
        .iter()
        .filter(|n| **n == "proxy_replace_header_map_value")
        .count();
    assert_eq!(replaces, 3, "{:?}", calls.request);
    assert_eq!(calls.total(), 10, "{calls:?}");
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("robot:s3cret-pw")
    );
    assert_eq!(
        seen,
        [
            Some("/v2/lib/app/manifests/v1".to_string()),
            Some("registry.internal:5000".to_string()),
            Some("upstream_demo".to_string()),
            Some(basic),
        ]
    );
}

/// The host's confirmations so far (`oci_connector.signatures.host_confirmed`).
fn confirmed(w: &mut Warm) -> u64 {
    w.record()
        .metric("oci_connector.signatures.host_confirmed")
        .map_or(0, |m| m.value)
}

/// Sends `token` through the warm host twice: the first time its signature goes to the host's
/// `verify_signature` in one foreign call and is confirmed, the second time (cached) not at all.
fn checked_once_by_the_host(w: &mut Warm, token: &str) {
    let foreign = |calls: &[&str]| calls.iter().filter(|c| **c == "proxy_call_foreign_function").count();
    let before = confirmed(w);
    w.use_token(token);
    let calls = w.request().unwrap();
    assert_eq!(foreign(&calls.request), 1, "{:?}", calls.request);
    assert_eq!(confirmed(w), before + 1);
    let calls = w.request().unwrap();
    assert_eq!(foreign(&calls.request), 0, "warm: no check at all: {:?}", calls.request);
}

/// Sends the forged `token`: refused (401), and the host confirmed nothing more.
fn refused_unconfirmed(w: &mut Warm, token: &str) {
    let before = confirmed(w);
    w.use_token(token);
    let refused = w.request().unwrap_err().to_string();
    assert!(refused.contains("status: 401"), "{refused}");
    assert_eq!(confirmed(w), before);
}

// A new RS256 token's signature goes to the host's `verify_signature` (Envoy: BoringSSL), one
// foreign call; a forged one is refused by the host and then by the module's own check; a host
// without the function is asked once, and the module checks every token itself from then on.
#[test]
fn a_new_rs256_token_is_checked_by_the_hosts_verify_signature() {
    let mut w = Warm::new(None, false).unwrap();
    w.request().unwrap();
    let token = w.new_token("u-foreign-1").unwrap();
    checked_once_by_the_host(&mut w, &token);
    let confirmed_once = confirmed(&mut w);

    // Forged: one character of the signature changed.
    let mut forged = w.new_token("u-foreign-2").unwrap();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    refused_unconfirmed(&mut w, &forged);

    // A host without the function: NotFound once, then the module alone.
    w.record().faults.push(("proxy_call_foreign_function", 1, 1));
    for uid in ["u-foreign-3", "u-foreign-4"] {
        let token = w.new_token(uid).unwrap();
        w.use_token(&token);
        w.record().calls.clear();
        w.request().unwrap();
    }
    let logs = &w.record().logs;
    assert!(
        logs.iter()
            .any(|(_, l)| l.contains("no verify_signature foreign function")),
        "{logs:?}"
    );
    assert_eq!(confirmed(&mut w), confirmed_once);
    let token = w.new_token("u-foreign-5").unwrap();
    w.use_token(&token);
    let calls = w.request().unwrap();
    assert!(
        !calls.request.contains(&"proxy_call_foreign_function"),
        "{:?}",
        calls.request
    );
}

// ES384 goes to the host too (SHA-384, the P-384 key's DER, the signature in DER): the test
// host's check is made with the p384 crate, so a confirmation means the arguments parse as
// BoringSSL's would; a forged signature is refused by the host and then by the module.
#[test]
fn a_new_es384_token_is_checked_by_the_hosts_verify_signature() {
    let mut w = Warm::new(None, false).unwrap();
    w.request().unwrap();
    let token = w.new_es384_token("u-es384-1").unwrap();
    checked_once_by_the_host(&mut w, &token);

    let (head, sig) = w
        .new_es384_token("u-es384-2")
        .unwrap()
        .rsplit_once('.')
        .map(|(h, s)| (h.to_string(), s.to_string()))
        .unwrap();
    let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig).unwrap();
    raw[7] ^= 1;
    let forged = format!(
        "{head}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw)
    );
    refused_unconfirmed(&mut w, &forged);
}

// The benchmark's host-call floor (devkit/floor-filter) stands for "these edits, no decisions":
// its row means something only while it makes exactly the filter's calls. A call added to (or
// dropped from) either side fails here.
#[test]
fn the_benchmarks_host_call_floor_makes_exactly_the_filters_calls() {
    let floor = connector_wasm_host::default_module_path().with_file_name("floor_filter.wasm");
    assert!(
        floor.is_file(),
        "{} is missing: cargo build -p floor-filter --target wasm32-wasip1 --release",
        floor.display()
    );
    let filter = warm_forwarded_request(None).unwrap();
    let floor = warm_forwarded_request(Some(floor)).unwrap();
    assert_eq!(floor.request, filter.request, "request phase");
    assert_eq!(floor.response, filter.response, "response phase");
}

// The verified-token cache holds a 16-byte keyed hash of each token, not the token (about 1 KB
// for a real ServiceAccount token): at the default 10,000 entries per VM that was most of the
// filter's memory in Envoy. Measured as the module's linear memory (which only grows) over a
// stream of new tokens, none of them evicted yet. (Here, not in a file of its own: each test
// binary compiles the module once, about 35 s in a debug build.)
#[test]
fn a_cached_token_costs_its_identity_not_its_text() {
    let mut w = Warm::new(None, false).unwrap();
    for _ in 0..50 {
        w.request().unwrap();
    }
    let tokens: Vec<String> = (0..600).map(|i| w.new_token(&format!("uid-{i:08}")).unwrap()).collect();
    let token_len = tokens.first().map(String::len).unwrap_or_default();
    assert!(
        token_len > 700,
        "the test's tokens are about as long as real ones: {token_len}"
    );
    let before = w.memory_bytes().unwrap();
    for t in &tokens {
        w.use_token(t);
        w.request().unwrap();
    }
    let grown = w.memory_bytes().unwrap() - before;
    let per_token = grown / tokens.len();
    // Holding the token text cost ~1,100 bytes per entry (the text, its map slot and order
    // queue copy); the identity alone (names, uid, the kid) is a few hundred.
    assert!(
        per_token < 400,
        "the heap grew {grown} bytes over {} new tokens ({per_token} per token)",
        tokens.len()
    );
}
