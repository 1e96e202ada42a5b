//! The harness itself, without the filter: Envoy proxies plainly to the recorder and the
//! registry behind it. Proves that images, pushes, pulls, the recorder and the hygiene scan work,
//! so a failure in the filter tests is the filter's.

use connector_devkit::http::{Request, basic_value};
use connector_devkit::image;
use connector_devkit::skopeo::Creds;
use connector_devkit::stack::UPSTREAM_USER;
use connector_e2e::{REPO, Shared, TAG};

static STACK: Shared = Shared::new("selftest", false);

#[test]
fn skopeo_pulls_through_plain_envoy_and_the_recorder_sees_the_upstream_credential() {
    STACK.run(|s| {
        let reference = format!("docker://{}/{REPO}:{TAG}", s.envoy.authority());
        let creds = Creds::Basic(UPSTREAM_USER, s.password());

        let out = s.skopeo.inspect(&reference, creds, false).and_then(|o| o.ok()).unwrap();
        let inspected: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let layers: Vec<String> = serde_json::from_value(inspected["Layers"].clone()).unwrap_or_default();
        assert_eq!(layers, s.image.layers, "skopeo inspect through Envoy: layers");

        let dest = s.work.sub("pulled-plain").unwrap();
        let dest_ref = format!("oci:{}:{TAG}", dest.display());
        s.skopeo
            .copy(&reference, creds, &dest_ref, Creds::None)
            .and_then(|o| o.ok())
            .unwrap();
        assert_eq!(image::oci_layers(&dest, TAG).unwrap(), s.image.layers, "copied layers");

        let seen = s.recorder.take();
        let expected = format!("Basic {}", basic_value(UPSTREAM_USER, s.password()));
        assert!(
            seen.authorizations().contains(&expected.as_str()),
            "the recorder should see the client's Basic credential pass through plain Envoy; saw {:?}",
            seen.request_lines()
        );
        assert!(
            seen.request_lines()
                .iter()
                .any(|l| l.starts_with(&format!("GET /v2/{REPO}/manifests/{TAG} "))),
            "manifest GET not recorded: {:?}",
            seen.request_lines()
        );
        assert!(seen.connections >= 1);
    });
}

#[test]
fn registry_challenges_without_credentials_and_recorder_relays_it() {
    STACK.run(|s| {
        let resp = Request::get("/v2/").send(s.envoy.port).unwrap();
        assert_eq!(resp.status, 401, "{}", resp.summary());
        assert_eq!(resp.header("docker-distribution-api-version"), Some("registry/2.0"));
        let seen = s.recorder.take();
        assert_eq!(
            seen.requests,
            1,
            "exactly one request upstream: {:?}",
            seen.request_lines()
        );
        assert!(seen.authorizations().is_empty());

        let resp = Request::get("/v2/")
            .basic(UPSTREAM_USER, s.password())
            .send(s.envoy.port)
            .unwrap();
        assert_eq!(resp.status, 200, "{}", resp.summary());
    });
}

#[test]
fn registry_rejects_a_wrong_password() {
    STACK.run(|s| {
        let resp = Request::get(&format!("/v2/{REPO}/manifests/{TAG}"))
            .basic(UPSTREAM_USER, "not-the-password")
            .send(s.envoy.port)
            .unwrap();
        assert_eq!(resp.status, 401, "{}", resp.summary());
    });
}

/// Envoy's codec folds a repeated `Authorization` into one comma-joined value before any filter
/// runs; the filter's duplicate-header defence is built on what this shows reaching the upstream.
#[test]
fn envoy_folds_repeated_authorization_headers() {
    STACK.run(|s| {
        let resp = Request::get("/v2/")
            .header("Authorization", "Bearer first")
            .header("Authorization", "Bearer second")
            .send(s.envoy.port)
            .unwrap();
        assert_eq!(resp.status, 401, "{}", resp.summary());
        let seen = s.recorder.take();
        assert_eq!(seen.authorizations(), vec!["Bearer first,Bearer second"]);
    });
}
