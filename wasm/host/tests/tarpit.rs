//! The tarpit in the real module: a flood of refusals is answered late, from the root context's
//! tick, while forwarded requests are not held (see `filter/src/tarpit.rs`).

mod common;

use common::*;
use connector_filter::tarpit::{HOLD_MS, QUICK_REFUSALS_PER_SECOND, TICK_MS};
use connector_wasm_host::Action;

const MS: u64 = 1_000_000;

fn set_ms(h: &mut connector_wasm_host::Host, ms: u64) {
    h.rec_mut().now_nanos = Some(NOW * 1_000_000_000 + ms * MS);
}

#[test]
fn a_flood_of_refusals_is_answered_after_the_hold_and_forwarded_requests_are_not_held() {
    let mut h = host();
    set_ms(&mut h, 0);
    // The quick budget: answered at once, no tick asked for.
    for _ in 0..QUICK_REFUSALS_PER_SECOND {
        let (id, action) = request(
            &mut h,
            "GET",
            "/v2/namespaces/demo/connectors/registry/lib/app/manifests/v1",
            None,
        );
        assert_eq!(action, Action::Pause);
        assert_refused(&h, id, 401, "UNAUTHORIZED");
    }
    assert_eq!(h.rec().tick_period_ms, 0, "no tick while nothing is held");

    // Past it: held, with the tick set on the root context.
    set_ms(&mut h, 100);
    let (late, action) = request(
        &mut h,
        "GET",
        "/v2/namespaces/demo/connectors/registry/lib/app/manifests/v1",
        None,
    );
    assert_eq!(action, Action::Pause);
    assert!(h.stream(late).local().is_none(), "held: no answer yet");
    assert_eq!(h.rec().tick_period_ms, TICK_MS);
    let garbage = format!("{}x", &token("demo", "default")[..40]);
    let (garbage_id, _) = request(
        &mut h,
        "GET",
        "/v2/namespaces/demo/connectors/registry/lib/app/manifests/v1",
        Some(&bearer(&garbage)),
    );
    assert!(h.stream(garbage_id).local().is_none(), "held: no answer yet");
    // A client that goes away while held is forgotten, and never answered.
    let (gone, _) = request(&mut h, "GET", "/v2/", None);
    h.finish(gone).unwrap();

    // A ServiceAccount refused a connector (403) is answered at once: it is accountable, and a
    // client retrying a deleted connector must not stall.
    let (denied, _) = request(
        &mut h,
        "GET",
        "/v2/namespaces/demo/connectors/nope/lib/app/manifests/v1",
        Some(&bearer(&token("demo", "default"))),
    );
    assert_refused(&h, denied, 403, "DENIED");

    // A good client is served meanwhile, not held.
    let _ok = forwarded(
        &mut h,
        "GET",
        "/v2/namespaces/demo/connectors/registry/lib/app/manifests/v1",
    );

    // Not due before the hold is over.
    set_ms(&mut h, 100 + HOLD_MS - 1);
    h.tick().unwrap();
    assert!(h.stream(late).local().is_none());
    assert_eq!(h.rec().tick_period_ms, TICK_MS, "still holding: still ticking");

    set_ms(&mut h, 100 + HOLD_MS + 5);
    h.tick().unwrap();
    assert_refused(&h, late, 401, "UNAUTHORIZED");
    let garbage_answer = h.stream(garbage_id).local().expect("the garbage token's refusal");
    assert_eq!(garbage_answer.status, 401, "body {}", garbage_answer.body_text());
    assert!(
        h.stream(gone).local().is_none(),
        "a request that went away is not answered"
    );
    assert_eq!(h.rec().tick_period_ms, 0, "nothing held: the tick stops");
    let held = h.rec().metric("oci_connector.refusals.held").map(|m| m.value);
    assert_eq!(held, Some(3), "held refusals are counted");

    // A new second: the quick budget is back.
    set_ms(&mut h, 5_000);
    let (again, _) = request(&mut h, "GET", "/v2/", None);
    assert_refused(&h, again, 401, "UNAUTHORIZED");
}

/// A host past its quick refusals at 0 ms, and the id of the refusal it now holds.
fn host_holding_a_refusal() -> (connector_wasm_host::Host, u32) {
    let mut h = host();
    set_ms(&mut h, 0);
    for _ in 0..=QUICK_REFUSALS_PER_SECOND {
        request(&mut h, "GET", "/v2/", None);
    }
    let (held, _) = request(&mut h, "GET", "/v2/", None);
    assert!(h.stream(held).local().is_none(), "held: no answer yet");
    (h, held)
}

#[test]
fn refusals_held_under_one_configuration_are_answered_under_the_next() {
    let (mut h, held) = host_holding_a_refusal();
    // Envoy gives a new configuration a new root context: the held refusals move with the VM's
    // state and the new root ticks.
    h.rec_mut().tick_period_ms = 0;
    let (_, ok) = h.new_root(config().to_string().as_bytes()).unwrap();
    assert!(ok);
    assert_eq!(
        h.rec().tick_period_ms,
        TICK_MS,
        "the new root ticks for the held refusals"
    );
    set_ms(&mut h, HOLD_MS + 1);
    h.tick().unwrap();
    assert_refused(&h, held, 401, "UNAUTHORIZED");
}

#[test]
fn a_tick_that_cannot_read_the_clock_answers_every_held_refusal() {
    let (mut h, held) = host_holding_a_refusal();
    // Long before the hold is over, the tick cannot read the clock. Holding is only a
    // slow-down: the refusal is answered now rather than left to Envoy's idle timeout.
    h.rec_mut().inject("proxy_get_current_time_nanoseconds", 10, 1);
    h.tick().unwrap();
    assert_refused(&h, held, 401, "UNAUTHORIZED");
    assert_eq!(h.rec().tick_period_ms, 0, "nothing left to hold: no more ticks");
}
