//! Pulls through Envoy with the connector filter, in both address forms, with real skopeo: the
//! image arrives intact, and the upstream received the robot's Basic credential and never the
//! client's ServiceAccount token.

use connector_devkit::http::{Request, basic_value};
use connector_devkit::image;
use connector_devkit::recorder::Recorded;
use connector_devkit::skopeo::Creds;
use connector_devkit::stack::{
    ALLOWED_NAMESPACE, CONNECTOR_NAME, CONNECTOR_NAMESPACE, Stack, UPSTREAM_USER, check_host_form_resolves,
};
use connector_devkit::tokens::KeyChoice;
use connector_e2e::{REPO, Shared, TAG, path_form, with_token};

static STACK: Shared = Shared::new("e2e-pull", true);

/// What every proxied pull must have sent upstream: only the robot's credential, the plain
/// repository path, and none of the client's token material or routing headers.
fn assert_upstream_clean(s: &Stack, seen: &Recorded, jwt: &str) {
    assert!(seen.requests > 0, "the pull should have reached the upstream");
    let robot = format!("Basic {}", basic_value(UPSTREAM_USER, s.password()));
    let auths = seen.authorizations();
    assert!(
        !auths.is_empty() && auths.iter().all(|a| *a == robot),
        "every upstream request must carry exactly the robot's Basic credential; saw {} Authorization value(s), {} of them the robot's",
        auths.len(),
        auths.iter().filter(|a| **a == robot).count()
    );
    assert!(!seen.text.contains(jwt), "the client's JWT reached the upstream");
    let sig = jwt.rsplit('.').next().unwrap_or(jwt);
    assert!(
        !seen.text.contains(sig),
        "the client's JWT signature reached the upstream"
    );
    assert!(
        !seen.text.contains(&basic_value("sa", jwt)),
        "the client's Basic form of the JWT (sa:<jwt>) reached the upstream"
    );
    let lower = seen.text.to_lowercase();
    assert!(
        !lower.contains("x-oci-connector-cluster"),
        "the routing header leaked upstream"
    );
    for line in seen.request_lines() {
        assert!(
            line.contains(&format!(" /v2/{REPO}/")) || line.contains(" /v2/ "),
            "upstream request not rewritten to the upstream repository name: {line}"
        );
    }
}

fn inspect_layers(s: &Stack, reference: &str, creds: Creds<'_>) -> Vec<String> {
    let out = s
        .skopeo
        .inspect(reference, creds, false)
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("skopeo inspect {reference}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("inspect output: {e}"));
    serde_json::from_value(v["Layers"].clone()).unwrap_or_default()
}

fn copy_layers(s: &Stack, reference: &str, creds: Creds<'_>, label: &str) -> Vec<String> {
    let dest = s.work.sub(label).unwrap();
    let dest_ref = format!("oci:{}:{TAG}", dest.display());
    s.skopeo
        .copy(reference, creds, &dest_ref, Creds::None)
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("skopeo copy {reference}: {e}"));
    image::oci_layers(&dest, TAG).unwrap()
}

#[test]
fn path_form_inspect_and_copy_with_basic_login() {
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let reference = s.path_ref(CONNECTOR_NAMESPACE, CONNECTOR_NAME, REPO, TAG);
        assert_eq!(
            inspect_layers(s, &reference, Creds::Basic("sa", &jwt)),
            s.image.layers,
            "inspect layers"
        );
        assert_eq!(
            copy_layers(s, &reference, Creds::Basic("sa", &jwt), "pull-path"),
            s.image.layers,
            "copied layers"
        );
        let seen = s.recorder.take();
        assert!(
            seen.request_lines()
                .iter()
                .any(|l| l.starts_with(&format!("GET /v2/{REPO}/manifests/{TAG} "))),
            "the manifest GET should reach the upstream as /v2/{REPO}/manifests/{TAG}: {:?}",
            seen.request_lines()
        );
        assert!(
            seen.request_lines().iter().any(|l| l.contains("/blobs/sha256:")),
            "blob GETs should reach the upstream: {:?}",
            seen.request_lines()
        );
        assert_upstream_clean(s, &seen, &jwt);
    });
}

#[test]
fn host_form_inspect_and_copy_with_basic_login() {
    check_host_form_resolves(CONNECTOR_NAMESPACE, CONNECTOR_NAME).unwrap();
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let reference = s.host_ref(CONNECTOR_NAMESPACE, CONNECTOR_NAME, REPO, TAG);
        assert_eq!(
            inspect_layers(s, &reference, Creds::Basic("sa", &jwt)),
            s.image.layers,
            "inspect layers"
        );
        assert_eq!(
            copy_layers(s, &reference, Creds::Basic("sa", &jwt), "pull-host"),
            s.image.layers,
            "copied layers"
        );
        let seen = s.recorder.take();
        assert!(
            seen.request_lines()
                .iter()
                .any(|l| l.starts_with(&format!("GET /v2/{REPO}/manifests/{TAG} "))),
            "manifest GET not seen upstream: {:?}",
            seen.request_lines()
        );
        assert_upstream_clean(s, &seen, &jwt);
    });
}

/// Bearer clients (containerd with a token, scripts). skopeo's `--registry-token` is no such
/// client: after a Basic challenge it sends `Basic Og==` instead, so this one is sent raw.
#[test]
fn path_form_manifest_and_blob_with_bearer_token() {
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let manifest = Request::get(&path_form(
            CONNECTOR_NAMESPACE,
            CONNECTOR_NAME,
            &format!("{REPO}/manifests/{TAG}"),
        ))
        .bearer(&jwt)
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send(s.envoy.port)
        .unwrap();
        assert_eq!(manifest.status, 200, "{}", manifest.summary());
        assert_eq!(
            image::manifest_layers(&manifest.json().unwrap()).unwrap(),
            s.image.layers
        );

        let digest = &s.image.layers[0];
        let blob = Request::get(&path_form(
            CONNECTOR_NAMESPACE,
            CONNECTOR_NAME,
            &format!("{REPO}/blobs/{digest}"),
        ))
        .bearer(&jwt)
        .send(s.envoy.port)
        .unwrap();
        assert_eq!(blob.status, 200, "blob GET: status {}", blob.status);
        assert_eq!(&sha256(&blob.body), digest, "blob bytes must hash to their digest");
        let seen = s.recorder.take();
        assert_upstream_clean(s, &seen, &jwt);
    });
}

/// `sha256:<hex>` of bytes, by coreutils' sha256sum.
fn sha256(bytes: &[u8]) -> String {
    let out = connector_devkit::procs::run(std::process::Command::new("sha256sum"), Some(bytes))
        .and_then(|o| o.ok())
        .unwrap();
    format!("sha256:{}", out.stdout.split_whitespace().next().unwrap_or(""))
}

#[test]
fn es256_tokens_are_accepted() {
    STACK.run(|s| {
        let jwt = s
            .minter
            .token(CONNECTOR_NAMESPACE, "default")
            .key(KeyChoice::Ec)
            .mint()
            .unwrap();
        let reference = s.path_ref(CONNECTOR_NAMESPACE, CONNECTOR_NAME, REPO, TAG);
        assert_eq!(inspect_layers(s, &reference, Creds::Basic("sa", &jwt)), s.image.layers);
        let seen = s.recorder.take();
        assert_upstream_clean(s, &seen, &jwt);
    });
}

#[test]
fn allowed_namespace_and_allowed_service_account_may_pull() {
    STACK.run(|s| {
        let reference = s.path_ref(CONNECTOR_NAMESPACE, CONNECTOR_NAME, REPO, TAG);
        let from_ci = s.minter.valid(ALLOWED_NAMESPACE, "deployer").unwrap();
        assert_eq!(
            inspect_layers(s, &reference, Creds::Basic("sa", &from_ci)),
            s.image.layers,
            "namespace ci"
        );
        let builder = s.minter.valid("other", "builder").unwrap();
        assert_eq!(
            inspect_layers(s, &reference, Creds::Basic("sa", &builder)),
            s.image.layers,
            "other/builder"
        );
        let seen = s.recorder.take();
        assert_upstream_clean(s, &seen, &from_ci);
        assert_upstream_clean(s, &seen, &builder);
    });
}

#[test]
fn raw_manifest_get_returns_the_pushed_manifest_bytes() {
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let path = path_form(CONNECTOR_NAMESPACE, CONNECTOR_NAME, &format!("{REPO}/manifests/{TAG}"));
        let resp = with_token(Request::get(&path), &jwt)
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .send(s.envoy.port)
            .unwrap();
        assert_eq!(resp.status, 200, "{}", resp.summary());
        let digest = resp.header("docker-content-digest").unwrap_or("").to_string();
        assert!(
            digest.starts_with("sha256:"),
            "Docker-Content-Digest kept: {}",
            resp.summary()
        );
        let manifest: serde_json::Value = resp.json().unwrap();
        assert_eq!(image::manifest_layers(&manifest).unwrap(), s.image.layers);

        // HEAD keeps Content-Length and the digest (clients decide on them whether to download).
        let head = with_token(Request::head(&path), &jwt)
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .send(s.envoy.port)
            .unwrap();
        assert_eq!(head.status, 200, "{}", head.summary());
        assert_eq!(head.header("docker-content-digest"), Some(digest.as_str()));
        assert_eq!(
            head.header("content-length"),
            Some(resp.body.len().to_string().as_str())
        );
        let seen = s.recorder.take();
        assert_upstream_clean(s, &seen, &jwt);
    });
}

#[test]
fn client_cookies_and_proxy_credentials_stay_at_the_proxy() {
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let path = path_form(CONNECTOR_NAMESPACE, CONNECTOR_NAME, &format!("{REPO}/manifests/{TAG}"));
        let resp = with_token(Request::get(&path), &jwt)
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .header("Cookie", "session=client-cookie-value")
            .header("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0")
            .send(s.envoy.port)
            .unwrap();
        assert_eq!(resp.status, 200, "{}", resp.summary());
        let seen = s.recorder.take();
        assert!(
            !seen.text.contains("client-cookie-value"),
            "the client's Cookie reached the upstream"
        );
        assert!(
            !seen.text.contains("cHJveHk6c2VjcmV0"),
            "the client's Proxy-Authorization reached the upstream"
        );
        assert_upstream_clean(s, &seen, &jwt);
    });
}

#[test]
fn push_through_the_proxy_lands_in_the_upstream() {
    // Uploads exercise the Location rewriting (registry 2.8 answers with absolute upload URLs
    // built from the request's Host) and blob mounts.
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let fresh = image::build_sample(
            &s.work,
            &format!("pushed-{}", connector_devkit::random_hex(4).unwrap()),
            TAG,
            2,
        )
        .unwrap();
        let dest = s.path_ref(CONNECTOR_NAMESPACE, CONNECTOR_NAME, "team/pushed", TAG);
        s.skopeo
            .copy(&fresh.oci_ref(), Creds::None, &dest, Creds::Basic("sa", &jwt))
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| panic!("push through the proxy: {e}"));
        let seen = s.recorder.take();
        assert!(
            seen.request_lines()
                .iter()
                .any(|l| l.starts_with("POST /v2/team/pushed/blobs/uploads/")),
            "uploads should reach the upstream under the upstream name: {:?}",
            seen.request_lines()
        );
        assert_upstream_clean_for_push(s, &seen, &jwt);

        // Read it back straight from the registry, with the robot's credential.
        let direct = format!("docker://{}/team/pushed:{TAG}", s.registry.authority());
        let layers = inspect_layers(s, &direct, Creds::Basic(UPSTREAM_USER, s.password()));
        assert_eq!(
            layers, fresh.layers,
            "layers in the upstream after a push through the proxy"
        );
    });
}

/// Like [`assert_upstream_clean`], for a push: request paths are the upstream's `team/pushed`.
fn assert_upstream_clean_for_push(s: &Stack, seen: &Recorded, jwt: &str) {
    let robot = format!("Basic {}", basic_value(UPSTREAM_USER, s.password()));
    let auths = seen.authorizations();
    assert!(
        !auths.is_empty() && auths.iter().all(|a| *a == robot),
        "only the robot's credential upstream"
    );
    assert!(!seen.text.contains(jwt), "the client's JWT reached the upstream");
    assert!(
        !seen.text.contains(&basic_value("sa", jwt)),
        "the client's sa:<jwt> reached the upstream"
    );
    for line in seen.request_lines() {
        assert!(
            line.contains(" /v2/team/pushed/") || line.contains(" /v2/ "),
            "upstream request not rewritten to the upstream name: {line}"
        );
    }
}
