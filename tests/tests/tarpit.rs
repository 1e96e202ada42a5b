//! The tarpit through the real Envoy: a client sending refused requests faster than the VM's quick
//! budget gets its later refusals a second late (answered from the root context's tick, the
//! whole OCI error intact), while a client with a good token is served at once meanwhile.
//! Its own stack: the flood would slow the refusals other test files time.

use std::time::{Duration, Instant};

use connector_devkit::http::{self, Request};
use connector_e2e::{Shared, manifest_path};
use connector_filter::tarpit::{HOLD_MS, QUICK_REFUSALS_PER_SECOND};

static STACK: Shared = Shared::new("e2e-tarpit", true);

#[test]
fn a_flood_of_refusals_is_slowed_and_good_clients_are_not() {
    STACK.run(|s| {
        let port = s.envoy.port;
        let token = s
            .minter
            .valid(connector_devkit::stack::CONNECTOR_NAMESPACE, "default")
            .unwrap();
        let good = || {
            let started = Instant::now();
            let r = Request::get(&manifest_path())
                .header("Accept", "application/vnd.oci.image.manifest.v1+json")
                .bearer(&token)
                .send(port)
                .unwrap();
            assert_eq!(r.status, 200, "good client: {}", r.summary());
            started.elapsed()
        };
        good(); // warms the token cache and the connector's challenge

        // One kept-alive connection sending requests without a credential, as fast as answered.
        let mut conn = http::open(port, Duration::from_secs(10)).unwrap();
        let started = Instant::now();
        let mut quick = 0u32;
        let mut slow = None;
        for i in 0..(QUICK_REFUSALS_PER_SECOND * 4) {
            let sent = Instant::now();
            let r = Request::get(&manifest_path()).send_on(&mut conn, port).unwrap();
            let took = sent.elapsed();
            assert_eq!(r.status, 401, "request {i}: {}", r.summary());
            assert!(
                r.body_text().contains("\"UNAUTHORIZED\""),
                "request {i}: the OCI error: {}",
                r.body_text()
            );
            if took >= Duration::from_millis(HOLD_MS * 8 / 10) {
                slow = Some((i, took, r));
                break;
            }
            quick += 1;
        }
        let flood_time = started.elapsed();
        let (i, took, held) =
            slow.unwrap_or_else(|| panic!("no refusal was held: {quick} answered at once in {flood_time:?}"));
        eprintln!("{quick} refusals answered at once, then request {i} after {took:?}");
        // At least the quick budget went through at once (more if a second boundary passed).
        assert!(quick >= QUICK_REFUSALS_PER_SECOND, "held after only {quick}");
        assert!(took < Duration::from_millis(HOLD_MS + 1_500), "held too long: {took:?}");
        assert!(
            held.header("www-authenticate").is_some(),
            "the held refusal keeps its challenge: {}",
            held.summary()
        );

        // While the flood holds its connection, a good client is answered at once.
        let mut flood = http::open(port, Duration::from_secs(10)).unwrap();
        let flooding = std::thread::spawn(move || {
            let mut answered = 0u32;
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                match Request::get(&manifest_path()).send_on(&mut flood, port) {
                    Ok(r) if r.status == 401 => answered += 1,
                    other => panic!("flood: {:?}", other.map(|r| r.summary())),
                }
            }
            answered
        });
        std::thread::sleep(Duration::from_millis(200));
        let took = good();
        let flood_answers = flooding.join().unwrap();
        assert!(
            took < Duration::from_millis(HOLD_MS / 2),
            "a good client waited {took:?} beside the flood"
        );
        // Two seconds of one connection: each second's quick budget and a held answer or two,
        // not the thousands a second it gets unheld.
        assert!(
            flood_answers <= 3 * QUICK_REFUSALS_PER_SECOND,
            "the held flood got {flood_answers} answers in 2 s"
        );
        eprintln!("good client beside the flood: {took:?}; flood answers in 2 s: {flood_answers}");
    });
}
