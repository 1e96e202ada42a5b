//! Everything the connector filter must refuse, sent raw through the real Envoy: each refusal has
//! the right status, an OCI error body whose message names the failed check, a Basic challenge on
//! 401, and the upstream receives nothing at all.

use connector_devkit::http::Request;
use connector_devkit::skopeo::Creds;
use connector_devkit::stack::{CONNECTOR_NAME, CONNECTOR_NAMESPACE, Stack, host_name};
use connector_devkit::tokens::KeyChoice;
use connector_e2e::{
    REPO, Refusal, Shared, TAG, UNAUTHORIZED, assert_refused, manifest_path, oci_error, path_form, with_token,
};

static STACK: Shared = Shared::new("e2e-refusals", true);

const NAME_INVALID: &[&str] = &["NAME_INVALID"];
const ACCESS_CODES: &[&str] = &["DENIED"];
const NAME_WORDS: &[&str] = &["is invalid: expected path components"];

/// The sample manifest requested with `jwt` as the Basic password is refused with 401, naming the
/// failed check (`mention`), and nothing reaches the upstream.
fn token_refused(s: &Stack, what: &str, jwt: &str, mention: &str) {
    assert_refused(
        s,
        what,
        with_token(Request::get(&manifest_path()), jwt),
        unauthorized(&[mention]),
    );
}

fn unauthorized<'a>(mentions: &'a [&'a str]) -> Refusal<'a> {
    Refusal {
        statuses: &[401],
        codes: UNAUTHORIZED,
        mentions,
    }
}

#[test]
fn no_credential_is_challenged() {
    STACK.run(|s| {
        assert_refused(
            s,
            "no Authorization header",
            Request::get(&manifest_path()),
            unauthorized(&["no credential: log in with any username and a ServiceAccount token"]),
        );
    });
}

#[test]
fn empty_basic_credential_is_refused() {
    // `skopeo --no-creds` sends this after a Basic challenge: a header, not an identity.
    STACK.run(|s| {
        assert_refused(
            s,
            "Authorization: Basic Og==",
            Request::get(&manifest_path()).header("Authorization", "Basic Og=="),
            unauthorized(&["empty credential"]),
        );
    });
}

#[test]
fn expired_token_is_refused() {
    STACK.run(|s| {
        let jwt = s
            .minter
            .token(CONNECTOR_NAMESPACE, "default")
            .expired_since(600)
            .mint()
            .unwrap();
        token_refused(s, "expired", &jwt, "token expired");
        // The same token as Bearer.
        assert_refused(
            s,
            "expired (Bearer)",
            Request::get(&manifest_path()).bearer(&jwt),
            unauthorized(&["token expired"]),
        );
    });
}

#[test]
fn token_not_yet_valid_is_refused() {
    STACK.run(|s| {
        // Ten minutes ahead: well past the configured 60 s clock skew.
        let jwt = s
            .minter
            .token(CONNECTOR_NAMESPACE, "default")
            .not_before_in(600)
            .mint()
            .unwrap();
        token_refused(s, "nbf in the future", &jwt, "not valid for another");
    });
}

#[test]
fn wrong_audience_is_refused() {
    STACK.run(|s| {
        let jwt = s
            .minter
            .token(CONNECTOR_NAMESPACE, "default")
            .audience(&["https://kubernetes.default.svc"])
            .mint()
            .unwrap();
        token_refused(
            s,
            "wrong audience",
            &jwt,
            "token audience does not include oci-connector",
        );
    });
}

#[test]
fn wrong_issuer_is_refused() {
    STACK.run(|s| {
        let jwt = s
            .minter
            .token(CONNECTOR_NAMESPACE, "default")
            .issuer("https://evil.example")
            .mint()
            .unwrap();
        token_refused(s, "wrong issuer", &jwt, "is not an allowed issuer");
    });
}

#[test]
fn tampered_signature_is_refused() {
    STACK.run(|s| {
        let jwt = s
            .minter
            .token(CONNECTOR_NAMESPACE, "default")
            .tampered()
            .mint()
            .unwrap();
        token_refused(s, "tampered signature", &jwt, "signature does not verify");
        let ec = s
            .minter
            .token(CONNECTOR_NAMESPACE, "default")
            .key(KeyChoice::Ec)
            .tampered()
            .mint()
            .unwrap();
        token_refused(s, "tampered ES256 signature", &ec, "signature does not verify");
    });
}

#[test]
fn token_signed_by_an_unpublished_key_under_a_published_kid_is_refused() {
    STACK.run(|s| {
        let jwt = s
            .minter
            .token(CONNECTOR_NAMESPACE, "default")
            .key(KeyChoice::Unpublished)
            .kid(Some("rsa-1"))
            .mint()
            .unwrap();
        token_refused(s, "foreign key, published kid", &jwt, "signature does not verify");
    });
}

#[test]
fn alg_none_is_refused() {
    STACK.run(|s| {
        let jwt = s
            .minter
            .token(CONNECTOR_NAMESPACE, "default")
            .alg_none()
            .mint()
            .unwrap();
        token_refused(s, "alg none", &jwt, "unsigned token (alg none");
    });
}

#[test]
fn unknown_kid_is_refused() {
    STACK.run(|s| {
        let jwt = s
            .minter
            .token(CONNECTOR_NAMESPACE, "default")
            .kid(Some("no-such-key"))
            .mint()
            .unwrap();
        token_refused(s, "unknown kid", &jwt, "is not among the configured JWKS keys");
        let jwt = s
            .minter
            .token(CONNECTOR_NAMESPACE, "default")
            .key(KeyChoice::Unpublished)
            .mint()
            .unwrap();
        token_refused(
            s,
            "unpublished key's own kid",
            &jwt,
            "is not among the configured JWKS keys",
        );
    });
}

#[test]
fn two_authorization_headers_are_refused() {
    // Envoy folds a repeated Authorization into one comma-joined value (see the harness
    // self-test): a valid first credential must not carry a second one through, in any order.
    STACK.run(|s| {
        let good = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let other = s.minter.valid("other", "default").unwrap();
        let variants = [
            (
                "Basic then Bearer",
                with_token(Request::get(&manifest_path()), &good).bearer(&other),
            ),
            (
                "Bearer then Basic",
                Request::get(&manifest_path()).bearer(&good).basic("sa", &other),
            ),
            (
                "two valid Bearer",
                Request::get(&manifest_path()).bearer(&good).bearer(&good),
            ),
            (
                "two identical Basic",
                with_token(Request::get(&manifest_path()), &good).basic("sa", &good),
            ),
        ];
        for (what, req) in variants {
            assert_refused(
                s,
                &format!("two Authorization headers ({what})"),
                req,
                unauthorized(&["more than one Authorization header"]),
            );
        }
    });
}

#[test]
fn skopeo_with_an_expired_token_fails_with_the_message() {
    STACK.run(|s| {
        let jwt = s
            .minter
            .token(CONNECTOR_NAMESPACE, "default")
            .expired_since(600)
            .mint()
            .unwrap();
        let reference = s.path_ref(CONNECTOR_NAMESPACE, CONNECTOR_NAME, REPO, TAG);
        s.recorder.take();
        let out = s.skopeo.inspect(&reference, Creds::Basic("sa", &jwt), false).unwrap();
        assert!(
            !out.success,
            "skopeo inspect with an expired token must fail: {}",
            out.stdout
        );
        assert!(
            out.stderr.to_lowercase().contains("expired"),
            "skopeo should show the proxy's message: {}",
            out.stderr
        );
        let seen = s.recorder.take();
        assert!(seen.is_empty(), "upstream received {:?}", seen.request_lines());

        let out = s.skopeo.inspect(&reference, Creds::None, false).unwrap();
        assert!(!out.success, "skopeo --no-creds must fail: {}", out.stdout);
        let seen = s.recorder.take();
        assert!(seen.is_empty(), "upstream received {:?}", seen.request_lines());
    });
}

#[test]
fn another_namespaces_connector_and_an_unknown_connector_look_the_same() {
    STACK.run(|s| {
        let outsider = s.minter.valid("other", "default").unwrap();
        let access = Refusal {
            statuses: &[403],
            codes: ACCESS_CODES,
            mentions: &["does not exist or ServiceAccount"],
        };
        let a = assert_refused(
            s,
            "token of namespace other on demo/registry",
            with_token(Request::get(&manifest_path()), &outsider),
            access,
        );

        let unknown = path_form(CONNECTOR_NAMESPACE, "nope", &format!("{REPO}/manifests/{TAG}"));
        let access = Refusal {
            statuses: &[403],
            codes: ACCESS_CODES,
            mentions: &["does not exist or ServiceAccount"],
        };
        let b = assert_refused(
            s,
            "unknown connector demo/nope",
            with_token(Request::get(&unknown), &outsider),
            access,
        );

        let insider = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let access = Refusal {
            statuses: &[403],
            codes: ACCESS_CODES,
            mentions: &["does not exist or ServiceAccount"],
        };
        let own_ns_unknown = assert_refused(
            s,
            "own namespace, unknown connector demo/nope",
            with_token(Request::get(&unknown), &insider),
            access,
        );
        assert_eq!(
            own_ns_unknown.status, a.status,
            "unknown connector in the caller's own namespace: status"
        );

        // A caller must not be able to tell "exists but not yours" from "does not exist".
        assert_eq!(
            a.status, b.status,
            "other-namespace vs unknown connector: statuses differ"
        );
        let (code_a, msg_a) = oci_error(&a);
        let (code_b, msg_b) = oci_error(&b);
        assert_eq!(code_a, code_b, "other-namespace vs unknown connector: codes differ");
        assert_eq!(
            msg_a.replace(CONNECTOR_NAME, "<name>"),
            msg_b.replace("nope", "<name>"),
            "other-namespace vs unknown connector: messages differ in shape"
        );

        // Host form too.
        let c = assert_refused(
            s,
            "host form, token of namespace other",
            with_token(Request::get(&format!("/v2/{REPO}/manifests/{TAG}")), &outsider).host(&format!(
                "{}:{}",
                host_name(CONNECTOR_NAMESPACE, CONNECTOR_NAME),
                s.envoy.port
            )),
            Refusal {
                statuses: &[403],
                codes: ACCESS_CODES,
                mentions: &["does not exist or ServiceAccount"],
            },
        );
        assert_eq!(c.status, a.status, "host and path form refuse alike");
    });
}

#[test]
fn invalid_repository_names_are_rejected() {
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let long = "a".repeat(300);
        let cases: [(&str, String); 5] = [
            ("uppercase", "Library/App".into()),
            ("leading dash", "-app".into()),
            ("trailing slash", "library/app/".into()),
            ("empty segment", "library//app".into()),
            ("300 characters", long),
        ];
        for (what, name) in &cases {
            let path = path_form(CONNECTOR_NAMESPACE, CONNECTOR_NAME, &format!("{name}/manifests/{TAG}"));
            assert_refused(
                s,
                &format!("repository name ({what})"),
                with_token(Request::get(&path), &jwt),
                Refusal {
                    statuses: &[400],
                    codes: NAME_INVALID,
                    mentions: NAME_WORDS,
                },
            );
        }
        // Host form: the name is the whole path.
        let host = format!("{}:{}", host_name(CONNECTOR_NAMESPACE, CONNECTOR_NAME), s.envoy.port);
        assert_refused(
            s,
            "host form uppercase name",
            with_token(Request::get(&format!("/v2/Library/App/manifests/{TAG}")), &jwt).host(&host),
            Refusal {
                statuses: &[400],
                codes: NAME_INVALID,
                mentions: NAME_WORDS,
            },
        );
    });
}

#[test]
fn base_endpoint_challenges_then_answers_ok() {
    STACK.run(|s| {
        let resp = assert_refused(
            s,
            "/v2/ without credential",
            Request::get("/v2/"),
            unauthorized(&["no credential: log in with any username and a ServiceAccount token"]),
        );
        assert_eq!(
            resp.header("docker-distribution-api-version"),
            Some("registry/2.0"),
            "{}",
            resp.summary()
        );

        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        let ok = with_token(Request::get("/v2/"), &jwt).send(s.envoy.port).unwrap();
        assert_eq!(ok.status, 200, "{}", ok.summary());
        assert_eq!(ok.json().unwrap(), serde_json::json!({}), "{}", ok.summary());
        assert_eq!(
            ok.header("docker-distribution-api-version"),
            Some("registry/2.0"),
            "{}",
            ok.summary()
        );

        let host = format!("{}:{}", host_name(CONNECTOR_NAMESPACE, CONNECTOR_NAME), s.envoy.port);
        let resp = Request::get("/v2/").host(&host).send(s.envoy.port).unwrap();
        assert_eq!(
            resp.status,
            401,
            "host form /v2/ without credential: {}",
            resp.summary()
        );
    });
}

#[test]
fn catalog_is_refused() {
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        s.recorder.take();
        let resp = with_token(Request::get("/v2/_catalog"), &jwt)
            .send(s.envoy.port)
            .unwrap();
        let seen = s.recorder.take();
        assert!(
            resp.status >= 400 && resp.status < 500,
            "/v2/_catalog must be refused: {}",
            resp.summary()
        );
        oci_error(&resp);
        assert!(
            seen.is_empty(),
            "/v2/_catalog reached the upstream: {:?}",
            seen.request_lines()
        );

        let host = format!("{}:{}", host_name(CONNECTOR_NAMESPACE, CONNECTOR_NAME), s.envoy.port);
        let resp = with_token(Request::get("/v2/_catalog"), &jwt)
            .host(&host)
            .send(s.envoy.port)
            .unwrap();
        let seen = s.recorder.take();
        assert!(
            resp.status >= 400 && resp.status < 500,
            "host form /v2/_catalog must be refused: {}",
            resp.summary()
        );
        assert!(
            seen.is_empty(),
            "host form /v2/_catalog reached the upstream: {:?}",
            seen.request_lines()
        );
    });
}

#[test]
fn escaped_slashes_are_rejected_before_the_filter() {
    // `%2F` could make one name look like another to a filter and the upstream alike; Envoy's
    // `path_with_escaped_slashes_action: REJECT_REQUEST` turns it away first.
    STACK.run(|s| {
        let jwt = s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap();
        s.recorder.take();
        let path = path_form(
            CONNECTOR_NAMESPACE,
            CONNECTOR_NAME,
            &format!("library%2Fapp/manifests/{TAG}"),
        );
        let resp = with_token(Request::get(&path), &jwt).send(s.envoy.port).unwrap();
        let seen = s.recorder.take();
        assert_eq!(resp.status, 400, "{}", resp.summary());
        assert!(seen.is_empty(), "upstream received {:?}", seen.request_lines());
    });
}

#[test]
fn the_scanned_log_and_config_dump_are_the_real_ones() {
    // Positive control for the hygiene scan every test ends with: the texts it searches do hold
    // the filter's configuration and log lines, just not the secrets.
    STACK.run(|s| {
        let dump = s.envoy.config_dump().unwrap();
        assert!(dump.contains("oci-connector"), "config_dump lacks the wasm filter");
        assert!(
            dump.contains(connector_devkit::stack::PASSWORD_ENV),
            "config_dump lacks the passwordEnv name"
        );
        assert!(
            dump.contains("rsa-1") && dump.contains("ec-1"),
            "config_dump lacks the JWKS kids"
        );
        assert!(!dump.contains(s.password()), "config_dump holds the upstream password");
        let log = s.envoy.log();
        assert!(
            log.contains("wasm log oci-connector"),
            "Envoy's log has no line from the filter"
        );
    });
}
