//! Bodies stream through the filter: a 1 GiB layer is pushed (monolithic PUT) and pulled back
//! through Envoy with the filter, arrives byte-identical (same digest), and Envoy's resident memory
//! stays flat, which it could not if the filter buffered bodies.

use connector_devkit::procs;
use connector_devkit::stack::{CONNECTOR_NAME, CONNECTOR_NAMESPACE};
use connector_e2e::{Shared, path_form};
use std::process::Command;

static STACK: Shared = Shared::new("e2e-large-blob", true);

const MIB: u64 = 1024;

fn rss_mib(pid: u32) -> u64 {
    connector_devkit::procs::rss_kib(Some(pid)) / 1024
}

fn sh(script: &str) -> String {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    procs::run(cmd, None).unwrap().ok().unwrap().stdout.trim().to_string()
}

#[test]
fn a_one_gib_layer_streams_both_ways_with_flat_memory() {
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let file = s.work.path().join("big-layer.bin");
        let f = file.display();
        let digest = format!(
            "sha256:{}",
            sh(&format!("head -c {MIB}M /dev/urandom > '{f}' && sha256sum '{f}' | cut -d' ' -f1"))
        );
        let pid = s.envoy.pid().unwrap();
        let before = rss_mib(pid);
        let base = s.envoy.base_url();
        let creds = format!("sa:{jwt}");
        // Verified TLS to the proxy: curl trusts its CA.
        let ca = s.envoy.curl_ca_arg();

        // Push: POST through the proxy, then PUT the whole file to the Location it returned.
        let start = path_form(CONNECTOR_NAMESPACE, CONNECTOR_NAME, "big/layer/blobs/uploads/");
        let location = sh(&format!(
            "curl -sS {ca} -u '{creds}' -X POST -D - -o /dev/null '{base}{start}' | tr -d '\\r' | sed -n 's/^[Ll]ocation: //p'"
        ));
        assert!(location.starts_with(&format!("{base}/v2/namespaces/")), "Location {location:?}");
        let code = sh(&format!(
            "curl -sS {ca} -u '{creds}' -X PUT -H 'Content-Type: application/octet-stream' -T '{f}' -o /dev/null -w '%{{http_code}}' '{location}&digest={digest}'"
        ));
        assert_eq!(code, "201", "monolithic PUT of {MIB} MiB through the proxy");

        // Pull: the bytes that come back hash to the same digest.
        let blob = path_form(CONNECTOR_NAMESPACE, CONNECTOR_NAME, &format!("big/layer/blobs/{digest}"));
        let pulled = sh(&format!("curl -sS {ca} -u '{creds}' '{base}{blob}' | sha256sum | cut -d' ' -f1"));
        assert_eq!(format!("sha256:{pulled}"), digest);
        std::fs::remove_file(&file).ok();

        let after = rss_mib(pid);
        assert!(
            after < before + 64,
            "Envoy's RSS grew from {before} MiB to {after} MiB while {MIB} MiB went through each way: bodies are being buffered"
        );
        // Nothing of the client's token reached the registry (the recorder saw 2 GiB go by).
        let seen = s.recorder.take();
        assert!(!seen.text.contains(&jwt), "the client's token reached the upstream");
    });
}
