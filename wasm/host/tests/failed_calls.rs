//! Failures the host delivers, through the shipped module: HTTP calls that break off (Envoy
//! then calls `proxy_on_http_call_response` with no headers, and reading one fails), and host
//! calls that return an error status. None may trap the VM: a trap would fail every later
//! request on the worker, for every connector. Each failure costs only the request it hit,
//! which is answered at once with an OCI 503.

mod common;

use common::*;
use connector_wasm_host::{Action, Host, headers};
use serde_json::json;

const TOKENED: &str = "/v2/namespaces/demo/connectors/tokened/lib/app/manifests/v1";
const MANIFEST: &str = "/v2/namespaces/demo/connectors/registry/lib/app/manifests/v1";

/// The proxy-wasm statuses a host returns for failures: NotFound, BadArgument, InternalFailure.
const NOT_FOUND: i32 = 1;
const BAD_ARGUMENT: i32 = 2;
const INTERNAL_FAILURE: i32 = 10;

fn assert_unavailable(h: &Host, id: u32, needle: &str) {
    let msg = assert_refused(h, id, 503, "UNAVAILABLE");
    assert!(msg.contains(needle), "message {msg:?} should mention {needle:?}");
}

/// A request for the registry connector is forwarded with the connector's Basic credential.
fn assert_forwarded_with_credential(h: &Host, id: u32) {
    let s = h.stream(id);
    assert!(s.local().is_none(), "forwarded, not answered: {:?}", s.local());
    assert_eq!(s.request_header_all("authorization"), vec![basic_credential()]);
}

#[test]
fn a_challenge_probe_that_breaks_off_answers_503_at_once_and_the_next_request_probes_again() {
    let mut h = host();
    let (id, action) = request(&mut h, "GET", MANIFEST, Some(&bearer(&token("demo", "default"))));
    assert_eq!(action, Action::Pause);
    let probe = h.pending_calls().remove(0);
    h.fail_call(probe.token).unwrap();
    assert_unavailable(&h, id, "did not answer");
    assert_eq!(h.rec().metric("oci_connector.calls.failed").map(|m| m.value), Some(1));
    h.finish(id).unwrap();

    // Nothing was learned from the failure: the next request asks again, and is served.
    let (id2, _) = request(&mut h, "GET", MANIFEST, Some(&bearer(&token("demo", "default"))));
    answer_basic_probe(&mut h, "upstream_demo");
    assert_eq!(h.stream(id2).resumed_requests, 1);
    assert_forwarded_with_credential(&h, id2);
}

#[test]
fn a_token_fetch_that_breaks_off_fails_the_fetcher_and_its_waiters_then_recovers() {
    let mut h = host();
    let t = bearer(&token("demo", "default"));
    let (first, _) = request(&mut h, "GET", TOKENED, Some(&t));
    let probe = h.pending_calls().remove(0);
    answer_bearer_probe(&mut h, probe.token);
    let fetch = h.pending_calls().remove(0);
    assert_eq!(fetch.cluster, "auth_cluster");
    // A second request for the same token waits on the first one's fetch.
    let (waiter, action) = request(&mut h, "GET", TOKENED, Some(&t));
    assert_eq!(action, Action::Pause);
    assert_eq!(h.pending_calls().len(), 1, "one fetch for both");

    h.fail_call(fetch.token).unwrap();
    assert_unavailable(&h, first, "token service");
    assert_unavailable(&h, waiter, "token service");

    // The failure is not cached: the next request fetches again and is served.
    let (third, _) = request(&mut h, "GET", TOKENED, Some(&t));
    let fetch = h.pending_calls().remove(0);
    assert_eq!(fetch.cluster, "auth_cluster");
    h.answer_call(fetch.token, 200, &[], br#"{"token":"fresh","expires_in":300}"#)
        .unwrap();
    let s = h.stream(third);
    assert_eq!(s.resumed_requests, 1);
    assert_eq!(s.request_header_all("authorization"), vec!["Bearer fresh".to_string()]);
}

/// The test configuration with the registry connector's credential held by the controller, and
/// (with `rbac`) access decided by the controller too.
fn controller_host(rbac: bool) -> Host {
    let mut c = config();
    c["controller"] = json!({"cluster": "connector_controller", "authority": "connector-controller"});
    c["connectors"][0]["credential"] = json!({"fromController": "rev-1"});
    if rbac {
        c["authorization"] = json!("controller");
    }
    let mut h = Host::with(options()).unwrap();
    assert!(h.configure(c.to_string().as_bytes()).unwrap(), "{:?}", h.rec().logs);
    h
}

#[test]
fn a_controller_channel_that_breaks_off_answers_503_and_the_next_request_asks_again() {
    let mut h = controller_host(false);
    let t = bearer(&token("demo", "default"));
    let (id, action) = request(&mut h, "GET", MANIFEST, Some(&t));
    assert_eq!(action, Action::Pause);
    let call = h.pending_calls().remove(0);
    assert_eq!(call.cluster, "connector_controller");
    assert_eq!(
        call.header(":path").as_deref(),
        Some("/v1/credentials/demo/registry?revision=rev-1")
    );
    h.fail_call(call.token).unwrap();
    assert_unavailable(&h, id, "controller");

    let (id2, _) = request(&mut h, "GET", MANIFEST, Some(&t));
    let call = h.pending_calls().remove(0);
    assert_eq!(call.cluster, "connector_controller");
    let answer = json!({"authorization": basic_credential(), "revision": "rev-1"}).to_string();
    h.answer_call(call.token, 200, &[], answer.as_bytes()).unwrap();
    answer_basic_probe(&mut h, "upstream_demo");
    assert_forwarded_with_credential(&h, id2);
}

/// Issue 12.7: a credential answer for another revision than the configuration names (the
/// controller already on a newer Secret) is no credential: 503 for that request, nothing
/// cached, the next request asks again and is served by an answer for its own revision.
#[test]
fn a_credential_answer_for_another_revision_answers_503_and_the_next_request_asks_again() {
    let mut h = controller_host(false);
    let t = bearer(&token("demo", "default"));
    for answer in [
        json!({"authorization": basic_credential(), "revision": "rev-2"}),
        json!({"authorization": basic_credential()}),
    ] {
        let (id, _) = request(&mut h, "GET", MANIFEST, Some(&t));
        let call = h.pending_calls().remove(0);
        h.answer_call(call.token, 200, &[], answer.to_string().as_bytes())
            .unwrap();
        assert_unavailable(&h, id, "not for the credential revision \"rev-1\"");
        h.finish(id).unwrap();
    }
    let (id, _) = request(&mut h, "GET", MANIFEST, Some(&t));
    let call = h.pending_calls().remove(0);
    assert!(call.header(":path").unwrap_or_default().ends_with("?revision=rev-1"));
    let answer = json!({"authorization": basic_credential(), "revision": "rev-1"}).to_string();
    h.answer_call(call.token, 200, &[], answer.as_bytes()).unwrap();
    answer_basic_probe(&mut h, "upstream_demo");
    assert_forwarded_with_credential(&h, id);
}

#[test]
fn an_rbac_access_call_that_breaks_off_answers_503_and_is_not_taken_for_a_decision() {
    let mut h = controller_host(true);
    let t = bearer(&token("demo", "default"));
    let (id, _) = request(&mut h, "GET", MANIFEST, Some(&t));
    let call = h.pending_calls().remove(0);
    assert!(
        call.header(":path")
            .unwrap_or_default()
            .starts_with("/v1/access/demo/registry"),
        "{call:?}"
    );
    h.fail_call(call.token).unwrap();
    assert_unavailable(&h, id, "controller");
    // Not cached as a denial (nor as a grant): the next request asks again.
    let (_, action) = request(&mut h, "GET", MANIFEST, Some(&t));
    assert_eq!(action, Action::Pause);
    let again = h.pending_calls();
    assert_eq!(again.len(), 1);
    assert!(again[0].header(":path").unwrap_or_default().starts_with("/v1/access/"));
}

#[test]
fn a_failure_that_arrives_after_its_request_went_away_is_ignored() {
    let mut h = host();
    let (id, _) = request(&mut h, "GET", MANIFEST, Some(&bearer(&token("demo", "default"))));
    let probe = h.pending_calls().remove(0);
    h.finish(id).unwrap();
    h.fail_call(probe.token).unwrap();
    let id2 = forwarded(&mut h, "GET", MANIFEST);
    assert_forwarded_with_credential(&h, id2);
}

#[test]
fn a_configuration_the_host_will_not_hand_over_fails_closed() {
    let mut h = Host::with(options()).unwrap();
    h.rec_mut().inject("proxy_get_buffer_bytes", BAD_ARGUMENT, 1);
    assert!(!h.configure(config().to_string().as_bytes()).unwrap());
    let (id, _) = request(&mut h, "GET", MANIFEST, Some(&bearer(&token("demo", "default"))));
    assert_unavailable(&h, id, "no valid configuration");
}

#[test]
fn a_client_credential_that_cannot_be_removed_is_never_forwarded() {
    for fail in ["proxy_remove_header_map_value", "proxy_replace_header_map_value"] {
        let mut h = host();
        // The connector's challenge is known: the request would be forwarded at once.
        let warm = forwarded(&mut h, "GET", MANIFEST);
        h.finish(warm).unwrap();
        h.rec_mut().inject(fail, BAD_ARGUMENT, 1);
        // A cookie is removed (proxy_remove_header_map_value), the client's Authorization
        // replaced (proxy_replace_header_map_value): whichever fails, nothing is forwarded.
        let t = bearer(&token("demo", "default"));
        let id = h.new_stream().unwrap();
        let hs = [
            (":method", "GET"),
            (":path", MANIFEST),
            (":authority", "proxy.local:8080"),
            (":scheme", "http"),
            ("authorization", t.as_str()),
            ("cookie", "session=client-secret"),
        ];
        h.request_headers(id, headers(&hs), true).unwrap();
        assert_unavailable(&h, id, "could not rewrite");
        assert_eq!(h.stream(id).resumed_requests, 0, "{fail}");
    }
}

#[test]
fn a_clock_that_cannot_be_read_refuses_rather_than_trusting_an_expired_token() {
    let mut h = host();
    h.rec_mut().now_nanos = Some(NOW * 1_000_000_000);
    // The token is checked and cached while it is valid ...
    let warm = forwarded(&mut h, "GET", MANIFEST);
    h.finish(warm).unwrap();
    // ... then it expires (600 s, past the 60 s skew), and the clock cannot be read. Taken as
    // 0, the cached token would still look valid: the request must be refused instead.
    h.rec_mut().now_nanos = Some((NOW + 900) * 1_000_000_000);
    h.rec_mut()
        .inject("proxy_get_current_time_nanoseconds", INTERNAL_FAILURE, 1);
    let t = bearer(&token("demo", "default"));
    let (id, _) = request(&mut h, "GET", MANIFEST, Some(&t));
    assert_unavailable(&h, id, "clock");
    assert_eq!(h.stream(id).resumed_requests, 0);
    assert!(h.stream(id).request_header_all("authorization") != vec![basic_credential()]);
    h.finish(id).unwrap();
    // With the clock back, the same token is refused as expired (it never was valid again).
    let (id, _) = request(&mut h, "GET", MANIFEST, Some(&t));
    let msg = assert_refused(&h, id, 401, "UNAUTHORIZED");
    assert!(msg.contains("expired"), "{msg}");
}

#[test]
fn an_upstream_answer_that_cannot_be_read_or_edited_is_replaced() {
    for fail in ["proxy_get_header_map_pairs", "proxy_remove_header_map_value"] {
        let mut h = host();
        let id = forwarded(&mut h, "GET", MANIFEST);
        h.rec_mut().inject(fail, BAD_ARGUMENT, 1);
        let challenge = [
            (":status", "401"),
            ("www-authenticate", r#"Bearer realm="https://evil.example/t""#),
        ];
        h.response_headers(id, headers(&challenge), true).unwrap();
        // The upstream's challenge never reaches the client: a local 503 replaces the answer.
        let local = h.stream(id).local().cloned();
        let local = local.unwrap_or_else(|| panic!("{fail}: the answer must be replaced"));
        assert_eq!(local.status, 503, "{fail}");
        assert!(local.header("www-authenticate").is_none());
    }
}

#[test]
fn trailers_that_cannot_be_read_or_edited_cut_the_answer_or_request() {
    let cred = basic_credential();
    for fail in ["proxy_get_header_map_pairs", "proxy_remove_header_map_value"] {
        let mut h = host();
        let id = forwarded(&mut h, "GET", MANIFEST);
        h.response_headers(id, headers(&[(":status", "200")]), false).unwrap();
        h.rec_mut().inject(fail, BAD_ARGUMENT, 1);
        h.response_trailers(id, headers(&[("x-debug", cred.as_str())])).unwrap();
        // Unchecked or still holding the echo: the answer is cut (Envoy resets a stream whose
        // head has gone when a local answer is asked for), never finished with the trailers.
        let local = h.stream(id).local().cloned();
        let local = local.unwrap_or_else(|| panic!("{fail}: the answer must be cut"));
        assert_eq!(local.status, 503, "{fail}");
        assert!(!local.body_text().contains(PASSWORD), "{fail}");

        let id = forwarded(&mut h, "PUT", MANIFEST);
        h.rec_mut().inject(fail, BAD_ARGUMENT, 1);
        let t = bearer(&token("demo", "default"));
        h.request_trailers(id, headers(&[("authorization", t.as_str())]))
            .unwrap();
        let local = h.stream(id).local().cloned();
        assert!(
            local.is_some(),
            "{fail}: a request whose trailers keep the token must not go on"
        );
    }
}

/// Drives a whole mix of requests (refusal, probe, forward with response rewriting, token fetch
/// with a waiter) while `name` keeps answering `status`. Must never trap.
fn drive_everything(h: &mut Host) {
    let t = bearer(&token("demo", "default"));
    let (refused, _) = request(h, "GET", MANIFEST, None);
    let (id, _) = request(h, "GET", MANIFEST, Some(&t));
    for call in h.pending_calls() {
        h.answer_call(call.token, 401, &[("www-authenticate", r#"Basic realm="x""#)], b"")
            .unwrap();
    }
    if h.stream(id).local().is_none() {
        h.response_headers(
            id,
            headers(&[(":status", "202"), ("location", "/v2/lib/app/blobs/uploads/u?_state=s")]),
            false,
        )
        .unwrap();
        h.response_body(id, b"{}", true).unwrap();
    }
    let (first, _) = request(h, "GET", TOKENED, Some(&t));
    let (second, _) = request(h, "GET", TOKENED, Some(&t));
    for call in h.pending_calls() {
        if call.cluster == "upstream_tokened" {
            h.answer_call(
                call.token,
                401,
                &[(
                    "www-authenticate",
                    r#"Bearer realm="http://auth.example/token",service="s""#,
                )],
                b"",
            )
            .unwrap();
        }
    }
    for call in h.pending_calls() {
        if call.cluster == "auth_cluster" {
            h.answer_call(call.token, 200, &[], br#"{"token":"t","expires_in":300}"#)
                .unwrap();
        }
    }
    for call in h.pending_calls() {
        h.fail_call(call.token).unwrap();
    }
    for s in [refused, id, first, second] {
        h.finish(s).unwrap();
    }
}

#[test]
fn error_statuses_from_any_host_call_never_trap_the_module() {
    // Every host function the filter calls on a request's path. proxy_http_call is tested with
    // the statuses Envoy's httpCall can return (see filter/src/host.rs): any other status is a
    // panic inside the SDK's own bookkeeping, which the filter cannot intercept. So is a failed
    // proxy_set_effective_context when the SDK's dispatcher makes a live context current; the
    // filter's own use of it (a waiter that went away) has its own test below.
    let functions = [
        "proxy_get_header_map_pairs",
        "proxy_replace_header_map_value",
        "proxy_remove_header_map_value",
        "proxy_get_buffer_bytes",
        "proxy_send_local_response",
        "proxy_continue_stream",
        "proxy_set_property",
        "proxy_define_metric",
        "proxy_increment_metric",
        "proxy_log",
        "proxy_get_log_level",
        "proxy_get_current_time_nanoseconds",
        // Envoy's verify_signature for a new RS256 token: the module then checks it itself.
        "proxy_call_foreign_function",
    ];
    let mut tried = 0;
    for name in functions {
        for status in [NOT_FOUND, BAD_ARGUMENT, INTERNAL_FAILURE] {
            check_survives(name, status);
            tried += 1;
        }
    }
    for status in [BAD_ARGUMENT, INTERNAL_FAILURE] {
        check_survives("proxy_http_call", status);
        tried += 1;
    }
    assert_eq!(tried, functions.len() * 3 + 2);
}

fn check_survives(name: &'static str, status: i32) {
    let mut h = host();
    h.rec_mut().inject(name, status, u32::MAX);
    drive_everything(&mut h);
    assert!(
        h.rec().call_count(name) > 0,
        "{name} was never called: the scenario does not cover it"
    );
    // The host recovers: the same VM serves a normal request afterwards.
    h.rec_mut().faults.clear();
    let id = forwarded(&mut h, "GET", MANIFEST);
    assert_forwarded_with_credential(&h, id);
    let critical: Vec<&(i32, String)> = h.rec().logs.iter().filter(|(l, _)| *l >= 5).collect();
    assert!(critical.is_empty(), "{name}={status}: {critical:?}");
}

#[test]
fn a_failed_http_call_dispatch_is_a_503_not_a_forward() {
    let mut h = host();
    h.rec_mut().inject("proxy_http_call", BAD_ARGUMENT, 1);
    let (id, _) = request(&mut h, "GET", MANIFEST, Some(&bearer(&token("demo", "default"))));
    assert_unavailable(&h, id, "cannot reach");
}

#[test]
fn a_token_waiter_that_went_away_is_skipped_and_the_fetcher_is_served() {
    let mut h = host();
    let t = bearer(&token("demo", "default"));
    let (first, _) = request(&mut h, "GET", TOKENED, Some(&t));
    let probe = h.pending_calls().remove(0);
    answer_bearer_probe(&mut h, probe.token);
    let fetch = h.pending_calls().remove(0);
    let (waiter, _) = request(&mut h, "GET", TOKENED, Some(&t));
    h.finish(waiter).unwrap();
    h.answer_call(fetch.token, 200, &[], br#"{"token":"t","expires_in":300}"#)
        .unwrap();
    assert_eq!(h.stream(first).resumed_requests, 1);
    assert_eq!(h.stream(waiter).resumed_requests, 0);
}
