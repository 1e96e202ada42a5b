//! The whole request decision over arbitrary method, path, host and Authorization values:
//! without a token signed by the configured key, nothing is ever forwarded.
#![no_main]
use connector_filter::config::compile;
use connector_filter::engine::{Decision, Request, decide_request};
use connector_filter::identity::TokenCache;
use libfuzzer_sys::fuzz_target;

const N: &str = "7G7S06o6LC9D90t0mSQpgH47Q_bOGioa68ApIuEEAX7ZO_D-wur2Yu_Fg8LIUjHuJDhMcJdQ5zLD-ATufSaLkg3dImGjTHBEKJJIxEJWG7eDznV3PoQZpOUNSfmU5Wj8qV8nkAvxOUDxUXt8Y_HSr1MiuSJQqOx5ZsuzOJiwBFxKzf6cLa-Y4Ov_mB9stvhxlYFHd3m-MOtr9EuMgwWSf47vuu3zL3uL5WHCIZEHbYAp37-_Yfl5ZgvahV2cr6iHcWF7aoKSt6CO5lbjaRwmwkPgd1BVR11rr45cpXt5THYaAv6mXWBVKgjBDPXX6h_4KibHqHU07iTuNvExpugxOw";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\n');
    let (method, path, host, auth) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let doc = serde_json::json!({
        "identity": {"issuers": ["https://kubernetes.default.svc.cluster.local"], "audiences": ["oci-connector"],
            "jwks": {"keys": [{"kty": "RSA", "kid": "rsa-1", "alg": "RS256", "e": "AQAB", "n": N}]}},
        "connectors": [{"namespace": "demo", "name": "registry", "address": "http://127.0.0.1:5000",
            "cluster": "c", "credential": {"username": "u", "passwordEnv": "P"}, "hosts": ["registry.internal"]}]
    });
    let Ok(config) = compile(doc.to_string().as_bytes(), &|_| Some("p".into())) else {
        return;
    };
    let values: Vec<&str> = auth.split('\x1f').collect();
    let req = Request {
        method,
        path,
        authority: host,
        scheme: "http",
        authorization: &values,
    };
    let mut cache = TokenCache::new(8);
    if let Decision::Forward(f) = decide_request(&config, &mut cache, &req, 1_700_000_000) {
        panic!("forwarded without a valid token: {f:?}");
    }
});
