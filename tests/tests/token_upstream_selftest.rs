//! The token-auth upstream itself, without the filter: Distribution 2.8 with `auth: token`
//! challenges with Bearer, accepts a token from the harness's token server and rejects
//! everything else, and skopeo pushes and pulls directly with the robot account (doing the token
//! dance itself). Proves that a failure in the bearer-upstream filter tests is the filter's.

use connector_devkit::http::{Request, basic_value};
use connector_devkit::image;
use connector_devkit::skopeo::Creds;
use connector_devkit::stack::UPSTREAM_USER;
use connector_devkit::token_server::{self, SERVICE};
use connector_e2e::{REPO, SharedTokenStack, TAG};

static STACK: SharedTokenStack = SharedTokenStack::new("token-selftest", false);

#[test]
fn registry_challenges_with_bearer_and_accepts_only_tokens_of_the_token_server() {
    STACK.run(|s| {
        let manifest = format!("/v2/{REPO}/manifests/{TAG}");
        let accept = "application/vnd.oci.image.manifest.v1+json";

        let none = Request::get(&manifest)
            .header("Accept", accept)
            .send(s.registry_port)
            .unwrap();
        assert_eq!(none.status, 401, "no credential: {}", none.summary());
        let challenge = none.header("www-authenticate").unwrap_or("");
        assert!(
            challenge.starts_with("Bearer ")
                && challenge.contains(&format!("realm=\"{}\"", s.token_server.realm()))
                && challenge.contains(&format!("service=\"{SERVICE}\""))
                && challenge.contains(&format!("scope=\"repository:{REPO}:pull\"")),
            "Bearer challenge naming the token server, service and scope, got {challenge:?}"
        );

        // The robot's Basic credential is for the token server, not the registry.
        let basic = Request::get(&manifest)
            .header("Accept", accept)
            .basic(UPSTREAM_USER, s.password())
            .send(s.registry_port)
            .unwrap();
        assert_eq!(basic.status, 401, "Basic to a token registry: {}", basic.summary());

        let token = s.token_server.fetch(&[&format!("repository:{REPO}:pull")]).unwrap();
        let claims = token_server::claims(&token).unwrap();
        assert_eq!(claims["aud"], SERVICE);
        assert_eq!(claims["access"][0]["name"], REPO);
        let ok = Request::get(&manifest)
            .header("Accept", accept)
            .bearer(&token)
            .send(s.registry_port)
            .unwrap();
        assert_eq!(ok.status, 200, "with a token: {}", ok.summary());
        assert_eq!(image::manifest_layers(&ok.json().unwrap()).unwrap(), s.image.layers);

        // A token for another repository grants nothing here.
        let other = s.token_server.fetch(&["repository:someone/else:pull"]).unwrap();
        let denied = Request::get(&manifest)
            .header("Accept", accept)
            .bearer(&other)
            .send(s.registry_port)
            .unwrap();
        assert_eq!(denied.status, 401, "token for another repository: {}", denied.summary());

        // A tampered signature is rejected.
        // (A middle character: the last one of an RSA signature partly encodes padding bits.)
        let mid = token.rfind('.').unwrap() + 100;
        let flipped = if &token[mid..=mid] == "A" { "B" } else { "A" };
        let forged = format!("{}{flipped}{}", &token[..mid], &token[mid + 1..]);
        let forged = Request::get(&manifest)
            .header("Accept", accept)
            .bearer(&forged)
            .send(s.registry_port)
            .unwrap();
        assert_eq!(forged.status, 401, "tampered token: {}", forged.summary());
    });
}

#[test]
fn token_server_requires_the_robot_credential_and_records_requests() {
    STACK.run(|s| {
        let q = format!(
            "/token?service={SERVICE}&scope=repository%3A{}%3Apull",
            REPO.replace('/', "%2F")
        );
        let anon = Request::get(&q).send(s.token_server.port).unwrap();
        assert_eq!(anon.status, 401, "{}", anon.summary());
        let wrong = Request::get(&q)
            .basic(UPSTREAM_USER, "wrong")
            .send(s.token_server.port)
            .unwrap();
        assert_eq!(wrong.status, 401, "{}", wrong.summary());
        let ok = Request::get(&q)
            .basic(UPSTREAM_USER, s.password())
            .send(s.token_server.port)
            .unwrap();
        assert_eq!(ok.status, 200, "{}", ok.summary());
        let body = ok.json().unwrap();
        assert_eq!(body["token"], body["access_token"]);
        assert_eq!(body["expires_in"], 300);
        assert!(body["issued_at"].as_str().unwrap_or("").ends_with('Z'), "{body}");

        let seen = s.token_server.take();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(
            seen.iter().map(|r| r.credential_ok).collect::<Vec<_>>(),
            [false, false, true]
        );
        assert_eq!(seen[2].scopes, [format!("repository:{REPO}:pull")]);
        assert_eq!(
            seen[2].authorization.as_deref(),
            Some(format!("Basic {}", basic_value(UPSTREAM_USER, s.password())).as_str())
        );

        s.token_server.set_mode(token_server::Mode::Fail);
        let failing = Request::get(&q)
            .basic(UPSTREAM_USER, s.password())
            .send(s.token_server.port)
            .unwrap();
        assert_eq!(failing.status, 500, "{}", failing.summary());
        s.token_server.set_expires_in(2);
        s.token_server.set_mode(token_server::Mode::Normal);
        let short = s.token_server.fetch(&["repository:x:pull"]).unwrap();
        let c = token_server::claims(&short).unwrap();
        assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 2);
    });
}

#[test]
fn skopeo_pushes_and_pulls_directly_with_the_robot_account() {
    STACK.run(|s| {
        let fresh = image::build_sample(&s.work, "direct", TAG, 2).unwrap();
        let dest = format!("docker://{}/team/direct:{TAG}", s.registry_authority());
        let creds = Creds::Basic(UPSTREAM_USER, s.password());
        s.skopeo
            .copy(&fresh.oci_ref(), Creds::None, &dest, creds)
            .and_then(|o| o.ok())
            .unwrap();
        let out = s.work.sub("direct-pulled").unwrap();
        s.skopeo
            .copy(&dest, creds, &format!("oci:{}:{TAG}", out.display()), Creds::None)
            .and_then(|o| o.ok())
            .unwrap();
        assert_eq!(image::oci_layers(&out, TAG).unwrap(), fresh.layers);
        let seen = s.token_server.take();
        assert!(
            seen.iter().any(|r| r.credential_ok
                && r.scopes
                    .iter()
                    .any(|sc| sc.contains("team/direct") && sc.contains("push"))),
            "skopeo should have fetched a push token for team/direct: {seen:?}"
        );
        // Anonymous skopeo gets nothing.
        let anon = s.skopeo.inspect(&dest, Creds::None, false).unwrap();
        assert!(!anon.success, "anonymous inspect of a token registry must fail");
    });
}

#[test]
fn revoking_makes_the_registry_reject_earlier_tokens() {
    STACK.run(|s| {
        let manifest = format!("/v2/{REPO}/manifests/{TAG}");
        let accept = "application/vnd.oci.image.manifest.v1+json";
        let before = s.token_server.fetch(&[&format!("repository:{REPO}:pull")]).unwrap();
        s.revoke_issued_tokens().unwrap();
        let old = Request::get(&manifest)
            .header("Accept", accept)
            .bearer(&before)
            .send(s.registry_port)
            .unwrap();
        assert_eq!(
            old.status,
            401,
            "a token signed before the revocation: {}",
            old.summary()
        );
        let after = s.token_server.fetch(&[&format!("repository:{REPO}:pull")]).unwrap();
        let new = Request::get(&manifest)
            .header("Accept", accept)
            .bearer(&after)
            .send(s.registry_port)
            .unwrap();
        assert_eq!(
            new.status,
            200,
            "a token signed after the revocation: {}",
            new.summary()
        );
        // Storage survives the restart: the sample image is still there.
        assert_eq!(image::manifest_layers(&new.json().unwrap()).unwrap(), s.image.layers);
    });
}
