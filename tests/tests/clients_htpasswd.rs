//! Real clients through the proxy against the Basic (htpasswd) upstream, in both address forms:
//! skopeo copies both ways, buildah pushes and pulls, containerd's `ctr` pulls. Each client logs
//! in as `sa:<jwt>`; what arrives must be byte-identical (same manifest digest) to what was
//! pushed, and the upstream must never see the client's token.

use connector_devkit::buildah::Buildah;
use connector_devkit::containerd::Containerd;
use connector_devkit::http::{Request, basic_value};
use connector_devkit::image;
use connector_devkit::skopeo::Creds;
use connector_devkit::stack::{Stack, UPSTREAM_USER, check_host_form_resolves, host_name};
use connector_devkit::{WorkDir, random_hex};
use connector_e2e::{CONNECTOR_NAME, CONNECTOR_NAMESPACE, REPO, Shared, TAG};
use std::sync::OnceLock;

static STACK: Shared = Shared::new("e2e-clients", true);

/// One containerd daemon for the file (started on first use; the process watchdog stops it when
/// the test binary exits).
fn containerd() -> &'static Containerd {
    static C: OnceLock<(WorkDir, Containerd)> = OnceLock::new();
    &C.get_or_init(|| {
        let work = WorkDir::new("e2e-containerd").unwrap();
        let c = Containerd::start(&work).unwrap_or_else(|e| panic!("containerd cannot run here: {e}"));
        (work, c)
    })
    .1
}

#[derive(Clone, Copy, Debug)]
enum Form {
    Path,
    Host,
}

/// `<authority>/<name>` of a repository in the given form, without scheme or tag.
fn proxied(s: &Stack, form: Form, repo: &str) -> String {
    match form {
        Form::Path => format!(
            "{}/namespaces/{CONNECTOR_NAMESPACE}/connectors/{CONNECTOR_NAME}/{repo}",
            s.envoy.authority()
        ),
        Form::Host => format!(
            "{}:{}/{repo}",
            host_name(CONNECTOR_NAMESPACE, CONNECTOR_NAME),
            s.envoy.port
        ),
    }
}

/// The manifest digest the upstream holds for `repo:tag`, asked directly with the robot account.
fn upstream_digest(s: &Stack, repo: &str, tag: &str) -> String {
    let r = Request::get(&format!("/v2/{repo}/manifests/{tag}"))
        .header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        )
        .basic(UPSTREAM_USER, s.password())
        .send(s.registry.port)
        .unwrap();
    assert_eq!(r.status, 200, "upstream {repo}:{tag}: {}", r.summary());
    r.header("docker-content-digest").unwrap_or("").to_string()
}

/// The client's token must not have crossed to the upstream, in any encoding.
fn assert_no_client_token_upstream(s: &Stack, jwt: &str) {
    let seen = s.recorder.take();
    assert!(
        seen.requests > 0,
        "the client's requests should have reached the upstream"
    );
    assert!(!seen.text.contains(jwt), "the client's JWT reached the upstream");
    assert!(
        !seen.text.contains(&basic_value("sa", jwt)),
        "the client's sa:<jwt> reached the upstream"
    );
    let robot = format!("Basic {}", basic_value(UPSTREAM_USER, s.password()));
    assert!(
        seen.authorizations().iter().all(|a| *a == robot),
        "only the robot's credential may reach the upstream"
    );
}

fn skopeo_round_trip(form: Form) {
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let creds = Creds::Basic("sa", &jwt);
        let repo = format!("clients/skopeo-{form:?}").to_lowercase();
        let fresh = image::build_sample(&s.work, &format!("skopeo-{}", random_hex(4).unwrap()), TAG, 3).unwrap();
        let dest = format!("docker://{}:{TAG}", proxied(s, form, &repo));
        s.skopeo
            .copy(&fresh.oci_ref(), Creds::None, &dest, creds)
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| panic!("skopeo push through the proxy ({form:?}): {e}"));
        let out = s
            .work
            .sub(&format!("skopeo-pulled-{}", random_hex(4).unwrap()))
            .unwrap();
        s.skopeo
            .copy(&dest, creds, &format!("oci:{}:{TAG}", out.display()), Creds::None)
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| panic!("skopeo pull through the proxy ({form:?}): {e}"));
        assert_eq!(
            image::oci_layers(&out, TAG).unwrap(),
            fresh.layers,
            "layers pulled back"
        );
        // skopeo copies an OCI layout's manifest as is: the proxy, the upstream and the local
        // layout must agree on its digest.
        let inspected = s.skopeo.inspect(&dest, creds, false).and_then(|o| o.ok()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&inspected.stdout).unwrap();
        let via_proxy = v["Digest"].as_str().unwrap_or("").to_string();
        assert_eq!(
            via_proxy,
            upstream_digest(s, &repo, TAG),
            "manifest digest via the proxy vs upstream"
        );
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fresh.layout.join("index.json")).unwrap()).unwrap();
        assert_eq!(
            index["manifests"][0]["digest"].as_str(),
            Some(via_proxy.as_str()),
            "the pushed manifest must arrive byte for byte"
        );
        assert_no_client_token_upstream(s, &jwt);
    });
}

#[test]
fn skopeo_pushes_and_pulls_path_form() {
    skopeo_round_trip(Form::Path);
}

#[test]
fn skopeo_pushes_and_pulls_host_form() {
    check_host_form_resolves(CONNECTOR_NAMESPACE, CONNECTOR_NAME).unwrap();
    skopeo_round_trip(Form::Host);
}

fn buildah_round_trip(form: Form) {
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let creds = format!("sa:{jwt}");
        let label = random_hex(4).unwrap();
        let fresh = image::build_sample(&s.work, &format!("buildah-{label}"), TAG, 2).unwrap();
        let pusher = Buildah::new(&s.work, &format!("push-{label}")).unwrap();
        let local = "localhost/seed:v1";
        s.skopeo
            .copy(&fresh.oci_ref(), Creds::None, &pusher.storage_ref(local), Creds::None)
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| panic!("seed buildah's storage from the OCI layout: {e}"));
        let repo = format!("clients/buildah-{form:?}").to_lowercase();
        let target = proxied(s, form, &repo);
        let pushed = pusher
            .push(local, &format!("docker://{target}:{TAG}"), Some(&creds))
            .unwrap_or_else(|e| panic!("buildah push through the proxy ({form:?}): {e}"));
        assert!(pushed.starts_with("sha256:"), "buildah's digest file: {pushed:?}");
        assert_eq!(
            upstream_digest(s, &repo, TAG),
            pushed,
            "upstream holds what buildah pushed"
        );

        let puller = Buildah::new(&s.work, &format!("pull-{label}")).unwrap();
        puller
            .pull(&format!("docker://{target}:{TAG}"), Some(&creds))
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| panic!("buildah pull through the proxy ({form:?}): {e}"));
        assert_eq!(
            puller.image_digest(&format!("{target}:{TAG}")).unwrap(),
            pushed,
            "buildah pulled back the manifest it pushed"
        );
        assert_no_client_token_upstream(s, &jwt);
    });
}

#[test]
fn buildah_pushes_and_pulls_path_form() {
    buildah_round_trip(Form::Path);
}

#[test]
fn buildah_pushes_and_pulls_host_form() {
    check_host_form_resolves(CONNECTOR_NAMESPACE, CONNECTOR_NAME).unwrap();
    buildah_round_trip(Form::Host);
}

fn ctr_pull(form: Form) {
    let ctrd = containerd();
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let reference = format!("{}:{TAG}", proxied(s, form, REPO));
        ctrd.pull(&reference, Some(&format!("sa:{jwt}")))
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| {
                panic!(
                    "ctr pull through the proxy ({form:?}): {e}\ncontainerd log {}",
                    ctrd.log_path().display()
                )
            });
        assert_eq!(
            ctrd.image_digest(&reference).unwrap(),
            upstream_digest(s, REPO, TAG),
            "containerd recorded the upstream's manifest digest"
        );
        assert_no_client_token_upstream(s, &jwt);
    });
}

#[test]
fn ctr_pulls_path_form() {
    ctr_pull(Form::Path);
}

#[test]
fn ctr_pulls_host_form() {
    check_host_form_resolves(CONNECTOR_NAMESPACE, CONNECTOR_NAME).unwrap();
    ctr_pull(Form::Host);
}

/// Without a token containerd must be refused, and the upstream must see nothing.
#[test]
fn ctr_without_a_token_is_refused() {
    let ctrd = containerd();
    STACK.run(|s| {
        let reference = format!("{}:{TAG}", proxied(s, Form::Path, REPO));
        let out = ctrd.pull(&reference, None).unwrap();
        assert!(!out.success, "an anonymous ctr pull must fail: {}", out.stdout);
        assert!(
            out.stderr.contains("401") || out.stderr.to_lowercase().contains("unauthorized"),
            "ctr should report the proxy's 401: {}",
            out.stderr
        );
        let seen = s.recorder.take();
        assert!(
            seen.is_empty(),
            "the upstream must receive nothing: {:?}",
            seen.request_lines()
        );
    });
}
