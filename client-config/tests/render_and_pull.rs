//! The rendered client files, read by real consumers: skopeo with the rendered `config.json`
//! (`--authfile`) and `registries.conf` (`--registries-conf`), and containerd's `ctr`
//! with the rendered `certs.d` (`--hosts-dir`), each pulling the sample image by the *upstream's*
//! name through real Envoy + the connector filter + Distribution. The recorder in front of the
//! upstream proves the pulls went through the proxy: the robot's credential arrived there, the
//! client's token never did. A pull the connector refuses must not fall back to the upstream
//! with the token (containerd retries `server` when a `[host]` fails).
//!
//! `buildkitd.toml` and `daemon.json` have no consumer on the build machines (no Docker engine,
//! no buildkitd): they are only parsed and checked field by field, in the module's unit tests and
//! in `unconsumed_files_parse_field_by_field` below (with `serde_json` and `toml`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

use connector_client_config::{ClientSettings, Format, write_all};
use connector_devkit::containerd::{Containerd, NAMESPACE as CTR_NAMESPACE};
use connector_devkit::http::{Request, basic_value};
use connector_devkit::image;
use connector_devkit::procs;
use connector_devkit::recorder::Recorded;
use connector_devkit::stack::{CONNECTOR_NAME, CONNECTOR_NAMESPACE, REPO, Stack, TAG, UPSTREAM_USER};
use connector_devkit::{WorkDir, random_hex};

/// One stack for the file; tests take turns so the recorder's contents belong to one test.
fn stack() -> (MutexGuard<'static, ()>, &'static Stack) {
    static STACK: OnceLock<Stack> = OnceLock::new();
    static TURN: Mutex<()> = Mutex::new(());
    let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let s =
        STACK.get_or_init(|| Stack::start("client-config", true).unwrap_or_else(|e| panic!("start the stack: {e}")));
    s.recorder.take();
    (turn, s)
}

/// The upstream's name as the connector's `spec.address` gives it: the registry behind the
/// recorder (`http://127.0.0.1:<recorder>`), so every byte the upstream gets is recorded.
fn upstream_authority(s: &Stack) -> String {
    format!("127.0.0.1:{}", s.recorder.port)
}

fn settings(s: &Stack, token: Option<String>) -> ClientSettings {
    ClientSettings {
        namespace: CONNECTOR_NAMESPACE.into(),
        name: CONNECTOR_NAME.into(),
        upstream: format!("http://{}", upstream_authority(s)),
        // The proxy speaks TLS; clients get its CA, written where each reads it.
        proxy: s.envoy.base_url(),
        host_name: None,
        token,
        skip_verify: false,
        proxy_ca: connector_devkit::http::tls_ca(s.envoy.port).map(|ca| std::fs::read_to_string(ca).unwrap()),
    }
}

fn render_into(s: &Stack, token: Option<String>, formats: &[Format]) -> (WorkDir, Vec<PathBuf>) {
    let out = WorkDir::new(&format!("client-config-out-{}", random_hex(4).unwrap())).unwrap();
    let files = write_all(&settings(s, token), formats, out.path()).unwrap();
    (out, files)
}

/// The pull went through the proxy: requests reached the upstream, each carrying the robot's
/// credential, and the client's token crossed in no form.
fn assert_through_proxy(s: &Stack, jwt: &str) -> Recorded {
    let seen = s.recorder.take();
    assert!(seen.requests > 0, "no request reached the upstream");
    assert!(!seen.text.contains(jwt), "the client's JWT reached the upstream");
    let robot = format!("Basic {}", basic_value(UPSTREAM_USER, s.password()));
    let auths = seen.authorizations();
    assert!(
        !auths.is_empty() && auths.iter().all(|a| *a == robot),
        "only the robot's credential may reach the upstream, saw {auths:?} on {:?}",
        seen.request_lines()
    );
    let problems = s.envoy_hygiene_problems().unwrap();
    assert!(problems.is_empty(), "Envoy hygiene: {problems:#?}");
    seen
}

/// devkit's skopeo (trust policy, temp dir, no stray auth files, private blob-info cache), with
/// the rendered registries.conf as the only registries configuration.
fn skopeo(work: &WorkDir, registries_conf: &Path) -> Command {
    let mut cmd = connector_devkit::skopeo::Skopeo::new(work).unwrap().command();
    // skopeo 1.9 (Debian 12) ignores CONTAINERS_REGISTRIES_CONF; its hidden global flag
    // `--registries-conf` replaces /etc/containers/registries.conf with the rendered file.
    cmd.arg("--registries-conf").arg(registries_conf);
    cmd
}

fn find(files: &[PathBuf], suffix: &str) -> PathBuf {
    files
        .iter()
        .find(|p| p.to_string_lossy().ends_with(suffix))
        .unwrap_or_else(|| panic!("no rendered {suffix} in {files:?}"))
        .clone()
}

#[test]
fn skopeo_pulls_by_upstream_name_with_rendered_authfile_and_registries_conf() {
    let (_turn, s) = stack();
    let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    let (out, files) = render_into(s, Some(jwt.clone()), &[Format::Docker, Format::Registries]);
    let authfile = find(&files, "docker/config.json");
    let conf = find(&files, "registries.conf");
    let work = WorkDir::new("client-config-skopeo").unwrap();
    let dest = work.path().join("pulled");
    // The proxy's TLS verified with the rendered certs.d/<proxy>/ca.crt (what
    // /etc/containers/certs.d/<proxy>/ holds on a machine); registries.conf has no `insecure`.
    let certs = find(&files, &format!("containers/certs.d/{}/ca.crt", s.envoy.authority()));
    assert!(!std::fs::read_to_string(&conf).unwrap().contains("insecure"));
    let mut cmd = skopeo(&work, &conf);
    cmd.args(["copy", "--command-timeout", "120s", "--authfile"])
        .arg(&authfile)
        .arg("--src-cert-dir")
        .arg(certs.parent().unwrap())
        .arg(format!("docker://{}/{REPO}:{TAG}", upstream_authority(s)))
        .arg(format!("oci:{}:{TAG}", dest.display()));
    let o = procs::run(cmd, None).unwrap();
    assert!(
        o.success,
        "skopeo copy by the upstream name failed ({}):\n{}\nregistries.conf:\n{}",
        o.command,
        o.stderr,
        std::fs::read_to_string(&conf).unwrap()
    );
    assert_eq!(image::oci_layers(&dest, TAG).unwrap(), s.image.layers, "pulled layers");
    assert_through_proxy(s, &jwt);
    drop(out);
}

/// The manifest digest the upstream holds, asked directly (not through the recorder).
fn upstream_digest(s: &Stack) -> String {
    let r = Request::get(&format!("/v2/{REPO}/manifests/{TAG}"))
        .header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        )
        .basic(UPSTREAM_USER, s.password())
        .send(s.registry.port)
        .unwrap();
    assert_eq!(r.status, 200, "upstream manifest: {}", r.summary());
    r.header("docker-content-digest").unwrap_or("").to_string()
}

/// `ctr images pull --hosts-dir <rendered certs.d> --user serviceaccount:<jwt> <upstream>/...`:
/// no `--plain-http`, no proxy name on the command line; the rendered hosts.toml alone sends the
/// pull to the proxy's path form (`override_path = true`) over TLS verified with the rendered `ca`.
#[test]
fn ctr_pulls_by_upstream_name_through_rendered_hosts_dir() {
    let work = WorkDir::new("client-config-containerd").unwrap();
    let ctrd = Containerd::start(&work).unwrap_or_else(|e| panic!("containerd cannot run here: {e}"));
    let (_turn, s) = stack();
    let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    let (out, files) = render_into(s, None, &[Format::Containerd]);
    let hosts = find(&files, &format!("certs.d/{}/hosts.toml", upstream_authority(s)));
    let hosts_dir = out.path().join("certs.d");
    assert_eq!(hosts.parent().and_then(Path::parent), Some(hosts_dir.as_path()));
    // containerd verifies the proxy with the CA hosts.toml names, beside it.
    let hosts_text = std::fs::read_to_string(&hosts).unwrap();
    assert!(
        hosts_text.contains("ca = \"proxy-ca.crt\"") && !hosts_text.contains("skip_verify"),
        "{hosts_text}"
    );
    find(&files, &format!("certs.d/{}/proxy-ca.crt", upstream_authority(s)));
    let reference = format!("{}/{REPO}:{TAG}", upstream_authority(s));
    let ctr = |args: &[&str]| {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&ctrd.socket)
            .args(["--namespace", CTR_NAMESPACE]);
        c.args(args);
        c
    };
    // Without the `ca` line containerd refuses the proxy's certificate: it really verifies.
    let rendered = std::fs::read_to_string(&hosts).unwrap();
    std::fs::write(&hosts, rendered.replace("ca = \"proxy-ca.crt\"\n", "")).unwrap();
    let mut unverified = ctr(&["images", "pull", "--hosts-dir"]);
    unverified
        .arg(&hosts_dir)
        .arg("--user")
        .arg(format!("serviceaccount:{jwt}"))
        .arg(&reference);
    let o = procs::run(unverified, None).unwrap();
    assert!(!o.success, "ctr pulled without the proxy's CA");
    assert!(o.stderr.contains("x509"), "{}", o.stderr);
    std::fs::write(&hosts, &rendered).unwrap();
    s.recorder.take();
    let mut pull = ctr(&["images", "pull", "--hosts-dir"]);
    pull.arg(&hosts_dir)
        .arg("--user")
        .arg(format!("serviceaccount:{jwt}"))
        .arg(&reference);
    let o = procs::run(pull, None).unwrap();
    assert!(
        o.success,
        "ctr pull by the upstream name failed ({}):\n{}\nhosts.toml:\n{}\ncontainerd log {}",
        o.command,
        o.stderr,
        std::fs::read_to_string(&hosts).unwrap(),
        ctrd.log_path().display()
    );
    let seen = assert_through_proxy(s, &jwt);
    // containerd adds `?ns=<upstream name>` to requests it sends to a host other than `server`:
    // the query shows the request took the hosts.toml route, the robot's credential (checked
    // above) that it crossed the filter.
    let ns = format!("?ns={}", upstream_authority(s).replace(':', "%3A"));
    let lines = seen.request_lines();
    for layer in &s.image.layers {
        let get = format!("GET /v2/{REPO}/blobs/{layer}{ns} HTTP/1.1");
        assert!(
            lines.contains(&get.as_str()),
            "layer {layer} did not come through the proxy: {lines:?}"
        );
    }
    let ls = procs::run(ctr(&["images", "ls"]), None).unwrap().ok().unwrap();
    let digest = ls
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&reference.as_str()))
        .and_then(|cols| cols.iter().find(|c| c.starts_with("sha256:")).map(|d| d.to_string()))
        .unwrap_or_else(|| panic!("containerd has no image {reference}:\n{}", ls.stdout));
    assert_eq!(
        digest,
        upstream_digest(s),
        "containerd recorded the upstream's manifest digest"
    );
}

/// No Docker engine and no buildkitd run on the build machines, so `config.json`,
/// `daemon.json` and `buildkitd.toml` written by [`write_all`] for this stack are checked field
/// by field instead: the JSON ones parsed with `serde_json`, the TOML one compared as text (no
/// TOML parser is in the workspace's lock file). `config.json`'s `auth` is also what skopeo used
/// in the pull above.
#[test]
fn unconsumed_files_parse_field_by_field() {
    use base64::Engine as _;
    let (_turn, s) = stack();
    let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
    let (_out, files) = render_into(
        s,
        Some(jwt.clone()),
        &[Format::Docker, Format::Buildkit, Format::Daemon],
    );
    // Three files, and the proxy's CA where BuildKit and Docker read it.
    assert_eq!(files.len(), 5, "{files:?}");
    let proxy = s.envoy.authority();
    let ca = std::fs::read_to_string(connector_devkit::http::tls_ca(s.envoy.port).unwrap()).unwrap();
    for f in [
        format!("buildkit/certs/{proxy}/ca.crt"),
        format!("docker/certs.d/{proxy}/ca.crt"),
    ] {
        assert_eq!(std::fs::read_to_string(find(&files, &f)).unwrap(), ca, "{f}");
    }

    let config_path = find(&files, "docker/config.json");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let auths = config["auths"].as_object().expect("auths is an object");
    assert_eq!(auths.keys().collect::<Vec<_>>(), vec![&proxy]);
    let auth = auths[&proxy]["auth"].as_str().expect("auth is a string");
    let decoded = base64::engine::general_purpose::STANDARD.decode(auth).unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), format!("serviceaccount:{jwt}"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&config_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "config.json holds a token");
    }

    let daemon: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(find(&files, "docker/daemon.json")).unwrap()).unwrap();
    assert_eq!(
        daemon,
        serde_json::json!({}),
        "a verified https proxy is no insecure registry; not Docker Hub, so no mirror"
    );

    let buildkit: toml::Table =
        toml::from_str(&std::fs::read_to_string(find(&files, "buildkitd.toml")).unwrap()).unwrap();
    let up = upstream_authority(s);
    let mirror = format!("{proxy}/namespaces/demo/connectors/registry");
    let ca = format!("/etc/buildkit/certs/{proxy}/ca.crt");
    let section =
        |key: &str, value: String| toml::Table::from_iter([(key.to_string(), toml::Value::from(vec![value]))]);
    let want = toml::Table::from_iter([(
        "registry".to_string(),
        toml::Value::Table(toml::Table::from_iter([
            (up.clone(), toml::Value::Table(section("mirrors", mirror))),
            (proxy.clone(), toml::Value::Table(section("ca", ca))),
        ])),
    )]);
    assert_eq!(buildkit, want);
}

/// A ServiceAccount the connector refuses: the pull fails, and the token must not reach the
/// upstream through containerd's fallback to `server`.
#[test]
fn ctr_refused_by_the_proxy_never_hands_the_token_to_the_upstream() {
    let work = WorkDir::new("client-config-containerd-refused").unwrap();
    let ctrd = Containerd::start(&work).unwrap_or_else(|e| panic!("containerd cannot run here: {e}"));
    let (_turn, s) = stack();
    let jwt = s.minter.valid("outsider", "default").unwrap();
    let (out, _files) = render_into(s, None, &[Format::Containerd]);
    let reference = format!("{}/{REPO}:{TAG}", upstream_authority(s));
    let mut pull = Command::new("ctr");
    pull.arg("--address")
        .arg(&ctrd.socket)
        .args(["--namespace", CTR_NAMESPACE, "images", "pull", "--hosts-dir"])
        .arg(out.path().join("certs.d"))
        .arg("--user")
        .arg(format!("serviceaccount:{jwt}"))
        .arg(&reference);
    let o = procs::run(pull, None).unwrap();
    assert!(
        !o.success && o.stderr.contains("403 Forbidden"),
        "the connector must refuse namespace outsider: {}",
        o.stderr
    );
    let seen = s.recorder.take();
    assert!(
        seen.is_empty(),
        "a refused pull sends nothing upstream: {:?}",
        seen.request_lines()
    );
    assert!(
        !seen.text.contains(&jwt) && !seen.text.contains(&basic_value("serviceaccount", &jwt)),
        "the refused token reached the upstream: {:?}\nctr said: {}",
        seen.request_lines(),
        o.stderr
    );
}

/// The CLI (`connector-client-config`) writes every format, the token only into the
/// 0600 `config.json`, and refuses bad input listing each problem.
#[test]
fn the_client_config_command_writes_every_format() {
    use std::os::unix::fs::PermissionsExt as _;
    let work = connector_devkit::WorkDir::new("client-config-cli").unwrap();
    let token_file = work.path().join("token");
    std::fs::write(&token_file, "eyJ.test-token.sig\n").unwrap();
    let ca_file = work.path().join("proxy-ca.crt");
    std::fs::write(
        &ca_file,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let out = work.path().join("out");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_connector-client-config"))
            .args(args)
            .output()
            .unwrap()
    };
    let ok = run(&[
        "--connector",
        "demo/registry",
        "--address",
        "https://harbor.example.com",
        "--proxy",
        "https://192.168.1.10:31567",
        "--proxy-ca",
        ca_file.to_str().unwrap(),
        "--token-file",
        token_file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&ok.stdout).to_string();
    assert!(ok.status.success(), "{stdout}{}", String::from_utf8_lossy(&ok.stderr));
    assert!(!stdout.contains("test-token"), "the token is not printed");
    for f in [
        "docker/config.json",
        "certs.d/harbor.example.com/hosts.toml",
        "buildkitd.toml",
        "registries.conf",
        "docker/daemon.json",
        "certs.d/harbor.example.com/proxy-ca.crt",
        "containers/certs.d/192.168.1.10:31567/ca.crt",
        "buildkit/certs/192.168.1.10:31567/ca.crt",
        "docker/certs.d/192.168.1.10:31567/ca.crt",
    ] {
        assert!(out.join(f).is_file(), "{f} written: {stdout}");
    }
    let config = std::fs::read_to_string(out.join("docker/config.json")).unwrap();
    assert!(config.contains("192.168.1.10:31567"), "{config}");
    let mode = std::fs::metadata(out.join("docker/config.json"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the file with the token is private");
    for f in [
        "registries.conf",
        "buildkitd.toml",
        "docker/daemon.json",
        "certs.d/harbor.example.com/hosts.toml",
    ] {
        assert!(
            !std::fs::read_to_string(out.join(f)).unwrap().contains("test-token"),
            "{f} has no token"
        );
    }

    let bad = run(&["--connector", "demo", "--format", "docker,helm", "--out", "/tmp/x"]);
    let stderr = String::from_utf8_lossy(&bad.stderr).to_string();
    assert_eq!(bad.status.code(), Some(2), "{stderr}");
    for want in [
        "--address is required",
        "--proxy is required",
        "--connector: expected <namespace>/<name>",
        "--format",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in {stderr}");
    }
}
