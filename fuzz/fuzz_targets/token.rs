//! The credential and JWT pre-parser: arbitrary Authorization values (one per line), then
//! verification against a real key. Nothing unsigned by that key may ever verify.
#![no_main]
use connector_filter::config::compile;
use connector_filter::identity::{extract_token, verify};
use libfuzzer_sys::fuzz_target;

const N: &str = "7G7S06o6LC9D90t0mSQpgH47Q_bOGioa68ApIuEEAX7ZO_D-wur2Yu_Fg8LIUjHuJDhMcJdQ5zLD-ATufSaLkg3dImGjTHBEKJJIxEJWG7eDznV3PoQZpOUNSfmU5Wj8qV8nkAvxOUDxUXt8Y_HSr1MiuSJQqOx5ZsuzOJiwBFxKzf6cLa-Y4Ov_mB9stvhxlYFHd3m-MOtr9EuMgwWSf47vuu3zL3uL5WHCIZEHbYAp37-_Yfl5ZgvahV2cr6iHcWF7aoKSt6CO5lbjaRwmwkPgd1BVR11rr45cpXt5THYaAv6mXWBVKgjBDPXX6h_4KibHqHU07iTuNvExpugxOw";

/// Built once per fuzzing thread (the compiled configuration shares its connectors with `Rc`,
/// as one filter VM does, so it is not `Sync`).
fn config() -> &'static connector_filter::config::Config {
    thread_local! {
        static C: &'static connector_filter::config::Config = Box::leak(Box::new(build()));
    }
    C.with(|c| *c)
}

fn build() -> connector_filter::config::Config {
    {
        let doc = serde_json::json!({
            "identity": {"issuers": ["https://kubernetes.default.svc.cluster.local"], "audiences": ["oci-connector"],
                "jwks": {"keys": [{"kty": "RSA", "kid": "rsa-1", "alg": "RS256", "e": "AQAB", "n": N}]}},
            "connectors": [{"namespace": "demo", "name": "registry", "address": "http://127.0.0.1:5000",
                "cluster": "c", "credential": {"username": "u", "passwordEnv": "P"}}]
        });
        match compile(doc.to_string().as_bytes(), &|_| Some("p".into())) {
            Ok(c) => c,
            Err(e) => panic!("fuzz fixture config: {e:?}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let values: Vec<&str> = text.split('\n').collect();
    if let Ok(token) = extract_token(&values) {
        // The fuzzer cannot hold the private key: no input may verify.
        assert!(
            verify(&token, &config().policy, 1_700_000_000).is_err(),
            "forged token verified"
        );
    }
});
