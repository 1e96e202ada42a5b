//! `connector-controller serve` refuses, before touching anything, settings that would weaken
//! the trust model (issue 12 item 7): API mode without the channel key, malformed host grants.

use std::process::Command;

fn serve(args: &[&str], key: Option<&str>) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_connector-controller"));
    cmd.arg("serve").args(args).env_clear();
    if let Some(k) = key {
        cmd.env("CONNECTOR_CHANNEL_KEY", k);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `serve` with `base` then `extra` stops with a usage error (exit 2) whose text says each of
/// `wants`.
fn refused(base: &[&str], extra: &[&str], key: Option<&str>, wants: &[&str]) {
    let (code, err) = serve(&[base, extra].concat(), key);
    assert_eq!(code, 2, "{extra:?}: {err}");
    for want in wants {
        assert!(err.contains(want), "{extra:?} should say {want:?}: {err}");
    }
}

#[test]
fn api_mode_needs_the_channel_key_and_well_formed_host_grants() {
    let kube = [
        "--kube",
        "--proxy-url",
        "http://proxy.example:8080",
        "--wasm",
        "/filter.wasm",
        "--kube-url",
        "http://127.0.0.1:1",
        "--xds",
        "127.0.0.1:0",
        "--channel",
        "127.0.0.1:0",
        "--ops",
        "127.0.0.1:0",
        "--proxy-tls-secret",
        "oci-connector-system/proxy-tls",
    ];
    let (code, err) = serve(&kube, None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("CONNECTOR_CHANNEL_KEY must be set in API mode"), "{err}");
    let (code, err) = serve(&kube, Some(""));
    assert_eq!(code, 2, "an empty key is no key: {err}");

    let mut bad_grant = kube.to_vec();
    bad_grant.extend(["--host-grants", "team-a"]);
    let (code, err) = serve(&bad_grant, Some("k3y"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--host-grants \"team-a\""), "{err}");

    // With a key and good grants the checks pass: it starts (and goes on trying the absent
    // API server) instead of stopping with a usage error.
    let mut good = kube.to_vec();
    good.extend([
        "--host-grants",
        "team-a=registry.example.com,team-b=*.team-b.example.com",
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_connector-controller"))
        .arg("serve")
        .args(&good)
        .env_clear()
        .env("CONNECTOR_CHANNEL_KEY", "k3y")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let status = child.try_wait().unwrap();
    if status.is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
    assert!(
        status.is_none_or(|s| s.code() != Some(2)),
        "refused good settings: {status:?}"
    );
}

#[test]
fn the_proxy_listener_needs_a_certificate_source_or_the_plain_http_opt_in() {
    let base = ["--manifests", "/m", "--identity", "/i.json", "--wasm", "/f.wasm"];
    let cases: &[(&[&str], &str)] = &[
        (&[], "--proxy-plain-http (legacy"),
        (
            &["--proxy-tls-cert", "/c.pem"],
            "--proxy-tls-cert and --proxy-tls-key go together",
        ),
        (
            &[
                "--proxy-tls-cert",
                "/c.pem",
                "--proxy-tls-key",
                "/k.pem",
                "--proxy-plain-http",
            ],
            "exactly one of",
        ),
        (&["--proxy-tls-secret", "ns/name"], "--proxy-tls-secret needs --kube"),
        (&["--proxy-tls-external", "--proxy-plain-http"], "exactly one of"),
    ];
    for (extra, want) in cases {
        refused(&base, extra, None, &[want]);
    }
}

/// The configuration's delivery is chosen once: inline, parts, or parts from a number of
/// connectors on (a positive number); every problem listed at once.
#[test]
fn the_configuration_delivery_is_one_choice_and_a_positive_number() {
    let base = [
        "--manifests",
        "/m",
        "--identity",
        "/i.json",
        "--wasm",
        "/f.wasm",
        "--proxy-plain-http",
    ];
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--config-parts", "--config-inline"],
            &["--config-inline and --config-parts choose the configuration's delivery: give one"],
        ),
        (
            &["--config-parts", "--config-parts-from", "100"],
            &["--config-parts and --config-parts-from choose"],
        ),
        (
            &["--config-parts-from", "0"],
            &["--config-parts-from \"0\": expected a number of connectors, 1 or more"],
        ),
        (
            &["--config-parts-from", "many", "--poll-ms", "soon"],
            &["--config-parts-from \"many\": expected a number", "--poll-ms: "],
        ),
    ];
    for (extra, wants) in cases {
        refused(&base, extra, None, wants);
    }
}

/// `--istio-wasmplugin` names one WasmPlugin as `<namespace>/<name>`, and only in API mode.
#[test]
fn the_istio_wasmplugin_is_named_by_namespace_and_name_in_api_mode_only() {
    let common = [
        "--wasm",
        "/filter.wasm",
        "--xds",
        "127.0.0.1:0",
        "--channel",
        "127.0.0.1:0",
        "--ops",
        "127.0.0.1:0",
        "--proxy-tls-external",
    ];
    let mut kube = common.to_vec();
    kube.extend([
        "--kube",
        "--proxy-url",
        "https://proxy.example:8443",
        "--kube-url",
        "http://127.0.0.1:1",
        "--istio-wasmplugin",
    ]);
    let key = Some("k3y");
    refused(
        &kube,
        &["oci-connector"],
        key,
        &["--istio-wasmplugin \"oci-connector\": expected <namespace>/<name>"],
    );
    // The WasmPlugin carries the whole document: no parts.
    let plugin = "oci-connector-system/oci-connector";
    refused(
        &kube,
        &[plugin, "--config-parts"],
        key,
        &["--config-parts is not supported with --istio-wasmplugin"],
    );
    refused(
        &kube,
        &[plugin, "--config-parts-from", "10"],
        key,
        &["--config-parts-from is not supported with --istio-wasmplugin"],
    );
    refused(
        &common,
        &[
            "--manifests",
            "/nonexistent",
            "--identity",
            "/nonexistent.json",
            "--istio-wasmplugin",
            plugin,
        ],
        key,
        &["--istio-wasmplugin needs --kube (API mode)"],
    );
}
