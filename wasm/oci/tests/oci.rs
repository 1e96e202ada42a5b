//! The filter module as Istio's WasmPlugin would pull it: packaged by `wasm-oci` (the real
//! binary), pushed with skopeo to a real Distribution registry, pulled back into a fresh
//! layout, and the module's bytes and digests checked.

use std::process::Command;

use connector_devkit::registry::Registry;
use connector_devkit::skopeo::{Creds, Skopeo};
use connector_devkit::{WorkDir, require_wasm};
use connector_wasm_oci::{LAYER_MEDIA_TYPE, read_layout, sha256_digest};

#[test]
fn the_packaged_filter_round_trips_through_a_registry_with_its_digest() {
    let module_path = require_wasm().unwrap_or_else(|e| panic!("{e}"));
    let module = std::fs::read(&module_path).unwrap();
    let work = WorkDir::new("wasm-oci").unwrap();
    let layout = work.path().join("layout");
    let out = Command::new(env!("CARGO_BIN_EXE_wasm-oci"))
        .args(["package", "--module"])
        .arg(&module_path)
        .arg("--out")
        .arg(&layout)
        .args(["--tag", "0.1.0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let manifest_digest = stdout
        .lines()
        .find_map(|l| l.strip_prefix("manifest "))
        .unwrap()
        .trim()
        .to_string();
    assert!(stdout.contains(&sha256_digest(&module)), "{stdout}");

    let registry = Registry::start_open(&work).unwrap();
    let skopeo = Skopeo::new(&work).unwrap();
    let remote = format!("docker://{}/oci-connector/filter:0.1.0", registry.authority());
    skopeo
        .copy(
            &format!("oci:{}:0.1.0", layout.display()),
            Creds::None,
            &remote,
            Creds::None,
        )
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("push: {e}"));

    // The registry serves the manifest under the same digest: nothing was converted.
    let inspected = skopeo.inspect(&remote, Creds::None, true).and_then(|o| o.ok()).unwrap();
    let raw: serde_json::Value = serde_json::from_str(&inspected.stdout).unwrap();
    assert_eq!(raw["layers"][0]["mediaType"], LAYER_MEDIA_TYPE, "{}", inspected.stdout);
    assert_eq!(sha256_digest(inspected.stdout.trim_end().as_bytes()), manifest_digest);

    let pulled = work.path().join("pulled");
    skopeo
        .copy(
            &remote,
            Creds::None,
            &format!("oci:{}:0.1.0", pulled.display()),
            Creds::None,
        )
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("pull: {e}"));
    let back = read_layout(&pulled, "0.1.0").unwrap();
    assert_eq!(
        sha256_digest(&back),
        sha256_digest(&module),
        "the module's digest after the round trip"
    );
    assert!(back == module, "byte for byte");
}
