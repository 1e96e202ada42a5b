//! The connector in front of a token-auth upstream (Distribution 2.8 with `auth: token`, realm on
//! the harness's token server, another port than the registry): pulls and pushes in both address
//! forms, one token fetch for many concurrent requests, a new fetch once `expires_in` has passed,
//! a fresh token after the upstream revoked the old ones, outages of the token service, and a
//! realm the connector does not list. Throughout: the client's JWT reaches neither the registry
//! nor the token server, and no upstream token reaches the client.

use connector_devkit::http::{Request, Response, basic_value};
use connector_devkit::image;
use connector_devkit::random_hex;
use connector_devkit::skopeo::Creds;
use connector_devkit::stack::{UPSTREAM_USER, check_host_form_resolves};
use connector_devkit::token_server::{Mode, TokenRequest};
use connector_devkit::token_stack::{TokenStack, UNLISTED_REALM_CONNECTOR};
use connector_e2e::{CONNECTOR_NAME, CONNECTOR_NAMESPACE, REPO, SharedTokenStack, TAG, oci_error, path_form};
use std::time::{Duration, Instant};

static STACK: SharedTokenStack = SharedTokenStack::new("e2e-token", true);

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json";

/// The token server saw only the robot's credential, never anything of the client's JWT.
fn assert_token_server_clean(s: &TokenStack, seen: &[TokenRequest], jwt: &str) {
    let robot = format!("Basic {}", basic_value(UPSTREAM_USER, s.password()));
    for r in seen {
        assert_eq!(
            r.authorization.as_deref(),
            Some(robot.as_str()),
            "the token server must get exactly the robot's Basic credential (request {})",
            r.target
        );
        assert!(!r.target.contains(jwt), "the client's JWT reached the token server");
    }
}

/// The registry saw only Bearer tokens the token server issued, under upstream names, and none
/// of the client's JWT.
fn assert_registry_clean(s: &TokenStack, jwt: &str) {
    let seen = s.recorder.take();
    assert!(seen.requests > 0, "requests should have reached the registry");
    assert!(!seen.text.contains(jwt), "the client's JWT reached the registry");
    assert!(
        !seen.text.contains(&basic_value("sa", jwt)),
        "the client's sa:<jwt> reached the registry"
    );
    let issued = s.token_server.issued();
    for a in seen.authorizations() {
        let token = a.strip_prefix("Bearer ").unwrap_or_else(|| {
            panic!(
                "only Bearer tokens may reach a token registry, saw a {:?} credential",
                a.split(' ').next()
            )
        });
        assert!(
            issued.iter().any(|t| t == token),
            "a Bearer token the token server never issued reached the registry"
        );
    }
    assert!(
        !seen.text.contains("namespaces/"),
        "the client's path prefix reached the registry"
    );
}

/// No issued upstream token appears anywhere in what the client received.
fn assert_no_upstream_token(s: &TokenStack, what: &str, resp: &Response) {
    let shown = format!("{:?}\n{}", resp.headers, resp.body_text());
    for t in s.token_server.issued() {
        let sig = t.rsplit('.').next().unwrap_or(&t);
        assert!(!shown.contains(sig), "{what}: an upstream token reached the client");
    }
}

fn get(s: &TokenStack, path: &str, jwt: &str) -> Response {
    let r = Request::get(path)
        .basic("sa", jwt)
        .header("Accept", ACCEPT)
        .send(s.envoy.port)
        .unwrap();
    assert_no_upstream_token(s, path, &r);
    r
}

fn manifest_path(name: &str, repo: &str) -> String {
    path_form(CONNECTOR_NAMESPACE, name, &format!("{repo}/manifests/{TAG}"))
}

/// Pushes a fresh image straight to the registry under `repo` (skopeo does the token dance with
/// the robot account), so a test has a repository no earlier request fetched a token for.
fn seed(s: &TokenStack, repo: &str) -> image::SampleImage {
    let img = image::build_sample(&s.work, &format!("seed-{}", random_hex(4).unwrap()), TAG, 1).unwrap();
    image::push(
        &s.skopeo,
        &img,
        &s.registry_authority(),
        repo,
        Creds::Basic(UPSTREAM_USER, s.password()),
    )
    .unwrap();
    s.token_server.take();
    s.recorder.take();
    img
}

fn pull(form_host: bool) {
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let reference = if form_host {
            check_host_form_resolves(CONNECTOR_NAMESPACE, CONNECTOR_NAME).unwrap();
            s.host_ref(CONNECTOR_NAME, REPO, TAG)
        } else {
            s.path_ref(CONNECTOR_NAME, REPO, TAG)
        };
        let out = s.work.sub(&format!("pulled-{}", random_hex(4).unwrap())).unwrap();
        s.skopeo
            .copy(
                &reference,
                Creds::Basic("sa", &jwt),
                &format!("oci:{}:{TAG}", out.display()),
                Creds::None,
            )
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| panic!("pull through the proxy from a token upstream: {e}"));
        assert_eq!(image::oci_layers(&out, TAG).unwrap(), s.image.layers, "pulled layers");
        let fetched = s.token_server.take();
        assert_token_server_clean(s, &fetched, &jwt);
        assert!(
            fetched
                .iter()
                .all(|r| r.scopes.iter().all(|sc| sc.starts_with(&format!("repository:{REPO}:")))),
            "scopes must name the upstream repository: {:?}",
            fetched.iter().map(|r| &r.scopes).collect::<Vec<_>>()
        );
        assert_registry_clean(s, &jwt);
    });
}

#[test]
fn pull_path_form() {
    pull(false);
}

#[test]
fn pull_host_form() {
    pull(true);
}

fn push(form_host: bool) {
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let repo = format!("team/pushed-{}", random_hex(3).unwrap());
        let fresh = image::build_sample(&s.work, &format!("push-{}", random_hex(4).unwrap()), TAG, 2).unwrap();
        let dest = if form_host {
            check_host_form_resolves(CONNECTOR_NAMESPACE, CONNECTOR_NAME).unwrap();
            s.host_ref(CONNECTOR_NAME, &repo, TAG)
        } else {
            s.path_ref(CONNECTOR_NAME, &repo, TAG)
        };
        s.skopeo
            .copy(&fresh.oci_ref(), Creds::None, &dest, Creds::Basic("sa", &jwt))
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| panic!("push through the proxy to a token upstream: {e}"));
        let fetched = s.token_server.take();
        assert_token_server_clean(s, &fetched, &jwt);
        assert!(
            fetched.iter().any(|r| r
                .scopes
                .iter()
                .any(|sc| sc.starts_with(&format!("repository:{repo}:")) && sc.contains("push"))),
            "a push token for the upstream name {repo}: {:?}",
            fetched.iter().map(|r| &r.scopes).collect::<Vec<_>>()
        );
        assert_registry_clean(s, &jwt);
        // Read back straight from the registry with the robot account.
        let direct = format!("docker://{}/{repo}:{TAG}", s.registry_authority());
        let out = s
            .skopeo
            .inspect(&direct, Creds::Basic(UPSTREAM_USER, s.password()), false)
            .and_then(|o| o.ok())
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let layers: Vec<String> = serde_json::from_value(v["Layers"].clone()).unwrap_or_default();
        assert_eq!(
            layers, fresh.layers,
            "layers in the registry after a push through the proxy"
        );
    });
}

#[test]
fn push_path_form() {
    push(false);
}

#[test]
fn push_host_form() {
    push(true);
}

/// Eight clients at once on a repository no token was fetched for: Envoy runs one worker, so the
/// filter must fetch one token and hold the others until it arrives.
#[test]
fn concurrent_requests_share_one_token_fetch() {
    STACK.run(|s| {
        let repo = format!("conc/app-{}", random_hex(3).unwrap());
        let img = seed(s, &repo);
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let path = manifest_path(CONNECTOR_NAME, &repo);
        let answers = connector_e2e::concurrent_gets(s.envoy.port, &path, ACCEPT, &jwt, 8);
        for (i, r) in answers.iter().enumerate() {
            assert_eq!(r.status, 200, "client {i}: {}", r.summary());
            assert_eq!(image::manifest_layers(&r.json().unwrap()).unwrap(), img.layers);
            assert_no_upstream_token(s, "concurrent GET", r);
        }
        let fetched = s.token_server.take();
        let for_repo: Vec<_> = fetched
            .iter()
            .filter(|r| r.scopes.iter().any(|sc| sc.contains(&repo)))
            .collect();
        assert_eq!(
            for_repo.len(),
            1,
            "one token fetch for 8 concurrent requests, saw {}: {:?}",
            for_repo.len(),
            for_repo.iter().map(|r| &r.target).collect::<Vec<_>>()
        );
        assert_token_server_clean(s, &fetched, &jwt);
        assert_registry_clean(s, &jwt);
    });
}

/// A token is reused while valid and fetched again once its `expires_in` has passed. 12 s: the
/// filter clamps lifetimes below 10 s up to 10 s (a 2 s token would mean a fetch every couple of
/// requests), so a shorter one would test the clamp rather than the expiry.
#[test]
fn expired_upstream_token_is_fetched_again() {
    STACK.run(|s| {
        let repo = format!("expiry/app-{}", random_hex(3).unwrap());
        seed(s, &repo);
        s.token_server.set_expires_in(12);
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let path = manifest_path(CONNECTOR_NAME, &repo);
        let count = |seen: &[TokenRequest]| {
            seen.iter()
                .filter(|r| r.scopes.iter().any(|sc| sc.contains(&repo)))
                .count()
        };

        assert_eq!(get(s, &path, &jwt).status, 200);
        assert_eq!(
            get(s, &path, &jwt).status,
            200,
            "second request within the token's life"
        );
        assert_eq!(count(&s.token_server.requests()), 1, "the token is reused while valid");
        std::thread::sleep(Duration::from_millis(12_500));
        let after = get(s, &path, &jwt);
        assert_eq!(after.status, 200, "after expiry: {}", after.summary());
        let fetched = s.token_server.take();
        assert_eq!(count(&fetched), 2, "a new fetch once expires_in (12 s) has passed");
        assert_token_server_clean(s, &fetched, &jwt);
        assert_registry_clean(s, &jwt);
    });
}

/// The registry stops trusting every token issued so far (new signing key, registry restarted).
/// The filter may lose the request that meets the rejection (it cannot replay it), but it must
/// drop its cached token then, so the next request fetches a new one and succeeds; any 401 the
/// client sees is the proxy's own Basic challenge, never the upstream's Bearer one.
#[test]
fn revoked_upstream_token_is_replaced() {
    STACK.run(|s| {
        let repo = format!("revoke/app-{}", random_hex(3).unwrap());
        seed(s, &repo);
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let path = manifest_path(CONNECTOR_NAME, &repo);
        assert_eq!(get(s, &path, &jwt).status, 200, "before the revocation");
        s.revoke_issued_tokens().unwrap();
        s.token_server.take();
        let mut statuses = Vec::new();
        for _ in 0..2 {
            let r = get(s, &path, &jwt);
            if r.status == 401 {
                let challenge = r.header("www-authenticate").unwrap_or("");
                assert!(
                    challenge.starts_with("Basic "),
                    "the upstream's challenge reached the client: {challenge:?}"
                );
            }
            statuses.push(r.status);
            if r.status == 200 {
                break;
            }
        }
        assert_eq!(
            statuses.last(),
            Some(&200),
            "a request after the revocation must succeed by the second try: {statuses:?}"
        );
        let fetched = s.token_server.take();
        assert!(
            fetched
                .iter()
                .any(|r| r.status == 200 && r.scopes.iter().any(|sc| sc.contains(&repo))),
            "a new token must have been fetched after the revocation"
        );
        assert_token_server_clean(s, &fetched, &jwt);
    });
}

/// The token service fails: the client gets a server error with an OCI body, not a hang, not a
/// 200 with nothing, and never an upstream challenge.
#[test]
fn token_service_failure_is_a_server_error() {
    STACK.run(|s| {
        let repo = format!("outage/app-{}", random_hex(3).unwrap());
        seed(s, &repo);
        s.token_server.set_mode(Mode::Fail);
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let r = get(s, &manifest_path(CONNECTOR_NAME, &repo), &jwt);
        assert!((500..600).contains(&r.status), "token service down: {}", r.summary());
        oci_error(&r);
        assert!(r.header("www-authenticate").is_none_or(|c| !c.starts_with("Bearer")));
        let fetched = s.token_server.take();
        assert!(!fetched.is_empty(), "the filter should have asked the token server");
        assert_token_server_clean(s, &fetched, &jwt);
    });
}

/// The token service hangs longer than any sane timeout: the proxy must give up and answer.
#[test]
fn hanging_token_service_times_out() {
    STACK.run(|s| {
        let repo = format!("hang/app-{}", random_hex(3).unwrap());
        seed(s, &repo);
        s.token_server.set_mode(Mode::Hang(Duration::from_secs(90)));
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let started = Instant::now();
        let mut req = Request::get(&manifest_path(CONNECTOR_NAME, &repo))
            .basic("sa", &jwt)
            .header("Accept", ACCEPT);
        req.timeout = Duration::from_secs(60);
        let r = req
            .send(s.envoy.port)
            .unwrap_or_else(|e| panic!("no answer within 60 s while the token server hangs: {e}"));
        assert!((500..600).contains(&r.status), "hanging token service: {}", r.summary());
        assert!(started.elapsed() < Duration::from_secs(60));
        oci_error(&r);
        s.token_server.set_mode(Mode::Normal);
    });
}

/// A realm on another host:port that the connector does not list: the robot's credential must not
/// go there. 503 with an OCI error naming the refused realm; the token server gets nothing.
#[test]
fn unlisted_realm_is_refused_and_gets_nothing() {
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let r = get(s, &manifest_path(UNLISTED_REALM_CONNECTOR, REPO), &jwt);
        assert_eq!(r.status, 503, "unlisted realm: {}", r.summary());
        let (_code, message) = oci_error(&r);
        let realm = s.token_server.realm();
        let authority = realm
            .trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        assert!(
            message.contains(&realm) || message.contains(&authority),
            "the error must name the refused realm {realm}: {message:?}"
        );
        assert!(
            r.header("www-authenticate").is_none_or(|c| !c.starts_with("Bearer")),
            "the upstream's challenge must not reach the client"
        );
        let fetched = s.token_server.take();
        assert!(
            fetched.is_empty(),
            "the token server must receive nothing: {:?}",
            fetched.iter().map(|r| &r.target).collect::<Vec<_>>()
        );
    });
}
