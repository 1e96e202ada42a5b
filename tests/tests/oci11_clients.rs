//! The OCI 1.1 ecosystem through the proxy: a distribution-spec 1.1 upstream (olareg, built by
//! setup from the Go module proxy) and the Go clients people use for artifacts and signatures
//! (crane, oras, regctl, cosign), logging in with a ServiceAccount token, in both address forms.
//! - referrers: `GET .../referrers/<digest>` with `artifactType` filtering (`OCI-Filters-Applied`),
//!   `OCI-Subject` on a manifest PUT reaching the client, `oras attach` / `oras discover`,
//!   `regctl artifact list`;
//! - tag pagination: `n`/`last` with the `Link` header mapped to the client's address form,
//!   followed to the end;
//! - sha512 blobs and manifests (`regctl image mod --digest-algo sha512`);
//! - the referrers tag-schema fallback against an upstream with the referrers API off;
//! - cosign: sign with a local key pair, verify, attest an SBOM and verify the attestation,
//!   all through the proxy (no transparency log: nothing public is reachable here).

use connector_devkit::http::Request;
use connector_devkit::oci_tools::{Clients, Olareg};
use connector_devkit::procs::Output;
use connector_devkit::stack::host_name;
use connector_e2e::xds::{NS, connector_yaml, put, secret_yaml, setup, start_stack};
use serde_json::Value;

const SBOM: &str = "application/vnd.example.sbom.v1+json";
const NOTE: &str = "application/vnd.example.note.v1+json";

fn stdout(o: Output) -> String {
    o.stdout.trim().to_string()
}

/// What the filter did with a raw request, for assertions on headers the clients hide.
fn send(port: u16, req: Request, token: &str) -> connector_devkit::http::Response {
    req.bearer(token).send(port).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn oci_1_1_clients_and_upstream_through_the_proxy_in_both_address_forms() {
    let s = setup("oci11");
    let with_referrers = Olareg::start(&s.work, "olareg-1-1", true).unwrap_or_else(|e| panic!("{e}"));
    let without = Olareg::start(&s.work, "olareg-no-referrers", false).unwrap_or_else(|e| panic!("{e}"));
    // olareg has no authentication: the connector's Secret is still required, and unused upstream.
    let creds = s.registry.credentials.clone().unwrap();
    put(&s.manifests, "secret.yaml", &secret_yaml("robot", &creds));
    put(
        &s.manifests,
        "registry.yaml",
        &connector_yaml("registry", &with_referrers.url(), "robot"),
    );
    put(
        &s.manifests,
        "other.yaml",
        &connector_yaml("other", &without.url(), "robot"),
    );
    let (_controller, envoy) = start_stack(&s, &[]);
    let token = s.minter.valid(NS, "default").unwrap();
    let port = envoy.port;
    let proxy = format!("127.0.0.1:{port}");
    let path_form = format!("{proxy}/namespaces/{NS}/connectors/registry");
    let host_form = format!("{}:{port}", host_name(NS, "registry"));
    let other_host = format!("{}:{port}", host_name(NS, "other"));
    // The proxy speaks TLS: the clients trust its CA and nothing else, with no insecure flag.
    let ca = connector_devkit::controller::ProxyCert::of(&s.work)
        .expect("the harness made the proxy's certificate")
        .ca;
    let c = Clients::new(&s.work, &[&proxy, &host_form, &other_host], &token, &ca).unwrap();
    let layout = s.sample.layout.display().to_string();

    // crane: push (from the sample OCI layout), digest, ls, copy across address forms, mutate.
    let app = format!("{path_form}/library/app");
    c.ok("crane", &["push", &layout, &format!("{app}:v1")], &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let digest = stdout(c.ok("crane", &["digest", &format!("{app}:v1")], &[]).unwrap());
    assert!(digest.starts_with("sha256:"), "{digest}");
    let host_app = format!("{host_form}/library/app");
    c.ok(
        "crane",
        &["copy", &format!("{app}:v1"), &format!("{host_app}:copied")],
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        stdout(c.ok("crane", &["digest", &format!("{host_app}:copied")], &[]).unwrap()),
        digest,
        "the copy through the host form has the same digest"
    );
    c.ok(
        "crane",
        &[
            "mutate",
            &format!("{app}:v1"),
            "--label",
            "team=platform",
            "-t",
            &format!("{app}:mutated"),
        ],
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let config: Value = serde_json::from_str(&stdout(
        c.ok("crane", &["config", &format!("{host_app}:mutated")], &[]).unwrap(),
    ))
    .unwrap();
    assert_eq!(config["config"]["Labels"]["team"], "platform");

    // Tag pagination: five more tags, listed two at a time with raw requests in both forms;
    // each `Link` must point back into the address form the client used, and lead to the end.
    for t in ["p1", "p2", "p3", "p4", "p5"] {
        c.ok("crane", &["tag", &format!("{app}:v1"), t], &[])
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let all = stdout(c.ok("crane", &["ls", &app], &[]).unwrap());
    let mut expected: Vec<&str> = all.lines().collect();
    expected.sort_unstable();
    assert_eq!(expected, ["copied", "mutated", "p1", "p2", "p3", "p4", "p5", "v1"]);
    for (host, prefix) in [
        (None, format!("/v2/namespaces/{NS}/connectors/registry/library/app")),
        (Some(host_name(NS, "registry")), "/v2/library/app".to_string()),
    ] {
        let mut next = Some(format!("{prefix}/tags/list?n=2"));
        let (mut seen, mut pages) = (vec![], 0);
        while let Some(url) = next.take() {
            let mut req = Request::get(&url);
            if let Some(h) = &host {
                req = req.host(h);
            }
            let r = send(port, req, &token);
            assert_eq!(r.status, 200, "{url}: {}", r.summary());
            let page = r.json().unwrap();
            assert!(page["tags"].as_array().unwrap().len() <= 2, "{page}");
            seen.extend(
                page["tags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_str().unwrap().to_string()),
            );
            pages += 1;
            if let Some(link) = r.header("Link") {
                let target = link.split(['<', '>']).nth(1).unwrap_or_default();
                assert!(
                    target.starts_with(&format!("{prefix}/tags/list?")),
                    "Link {link:?} is not in the client's address form {prefix}"
                );
                next = Some(target.to_string());
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, expected, "pagination ({pages} pages) returned every tag once");
        assert_eq!(pages, 4);
    }

    // oras: an artifact with its own artifactType, pushed and pulled; two referrers attached to
    // the image (an SBOM and a note), discovered through the referrers API.
    let files = s.work.sub("oras-files").unwrap();
    std::fs::write(files.join("readme.txt"), "hello from the artifact\n").unwrap();
    std::fs::write(files.join("sbom.json"), r#"{"spdxVersion":"SPDX-2.3"}"#).unwrap();
    std::fs::write(files.join("note.txt"), "reviewed\n").unwrap();
    // oras runs in the directory of the files it pushes (it records their relative names).
    let in_files = |args: &[&str]| -> Output {
        let mut cmd = std::process::Command::new(connector_devkit::oci_tools::binary("oras").unwrap());
        cmd.current_dir(&files)
            .env("HOME", c.home())
            .env("DOCKER_CONFIG", c.home().join(".docker"))
            .args(args)
            .arg("--ca-file")
            .arg(&ca);
        connector_devkit::procs::run(cmd, None)
            .and_then(|o| o.ok())
            .unwrap_or_else(|e| panic!("{e}"))
    };
    in_files(&[
        "push",
        &format!("{path_form}/docs/readme:v1"),
        "--artifact-type",
        "application/vnd.example.readme.v1",
        "readme.txt:text/plain",
    ]);
    let pulled = s.work.sub("oras-pulled").unwrap();
    in_files(&[
        "pull",
        &format!("{host_form}/docs/readme:v1"),
        "-o",
        &pulled.display().to_string(),
    ]);
    assert_eq!(
        std::fs::read_to_string(pulled.join("readme.txt")).unwrap(),
        "hello from the artifact\n"
    );
    let subject = format!("{app}@{digest}");
    in_files(&[
        "attach",
        &subject,
        "--artifact-type",
        SBOM,
        "sbom.json:application/json",
    ]);
    in_files(&[
        "attach",
        &format!("{host_app}@{digest}"),
        "--artifact-type",
        NOTE,
        "note.txt:text/plain",
    ]);
    let discovered: Value = serde_json::from_str(&stdout(in_files(&[
        "discover",
        &subject,
        "--format",
        "json",
        "--artifact-type",
        SBOM,
    ])))
    .unwrap();
    let found = discovered["referrers"]
        .as_array()
        .or(discovered["manifests"].as_array())
        .cloned()
        .unwrap_or_default();
    assert_eq!(found.len(), 1, "oras discover --artifact-type: {discovered:#}");
    assert_eq!(found[0]["artifactType"], SBOM);

    // The referrers API itself, filtered, in both forms. Each form asks for a filter not asked
    // before: olareg v0.1.2 leaves `OCI-Filters-Applied` off an answer it serves from its
    // referrers cache (referrer.go, the cached-page branch), e.g. after `oras discover` above.
    for (host, prefix, wanted) in [
        (
            None,
            format!("/v2/namespaces/{NS}/connectors/registry/library/app"),
            NOTE,
        ),
        (Some(host_name(NS, "registry")), "/v2/library/app".to_string(), SBOM),
    ] {
        let all = {
            let mut req = Request::get(&format!("{prefix}/referrers/{digest}"));
            if let Some(h) = &host {
                req = req.host(h);
            }
            send(port, req, &token)
        };
        assert_eq!(all.status, 200, "{}", all.summary());
        assert_eq!(all.json().unwrap()["manifests"].as_array().unwrap().len(), 2);
        // Query-encoded: a bare '+' would decode as a space.
        let mut req = Request::get(&format!(
            "{prefix}/referrers/{digest}?artifactType={}",
            wanted.replace('+', "%2B")
        ));
        if let Some(h) = &host {
            req = req.host(h);
        }
        let filtered = send(port, req, &token);
        assert_eq!(filtered.status, 200, "{}", filtered.summary());
        if wanted == NOTE {
            assert_eq!(
                filtered.header("OCI-Filters-Applied"),
                Some("artifactType"),
                "{}",
                filtered.summary()
            );
        }
        let manifests = filtered.json().unwrap()["manifests"].as_array().unwrap().clone();
        assert_eq!(manifests.len(), 1, "{}", filtered.body_text());
        assert_eq!(manifests[0]["artifactType"], wanted);
    }

    // OCI-Subject: a manifest PUT with a subject, raw, so the header the registry answers with
    // is seen as the client sees it.
    let empty = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
    let put_blob = Request::new(
        "POST",
        &format!("/v2/namespaces/{NS}/connectors/registry/library/app/blobs/uploads/?digest={empty}"),
    )
    .header("Content-Type", "application/octet-stream");
    let mut put_blob = put_blob;
    put_blob.body = b"{}".to_vec();
    let r = send(port, put_blob, &token);
    assert!(matches!(r.status, 201 | 202), "{}", r.summary());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.raw.v1",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": manifest_size(port, &token, &digest)},
    })
    .to_string();
    let mut req = Request::new(
        "PUT",
        &format!("/v2/namespaces/{NS}/connectors/registry/library/app/manifests/raw-referrer"),
    )
    .header("Content-Type", "application/vnd.oci.image.manifest.v1+json");
    req.body = manifest.into_bytes();
    let r = send(port, req, &token);
    assert_eq!(r.status, 201, "{}", r.summary());
    assert_eq!(r.header("OCI-Subject"), Some(digest.as_str()), "{}", r.summary());

    // regctl: tags, the referrers list, and an image rewritten with sha512 digests.
    let ca_pem = std::fs::read_to_string(&ca).unwrap();
    for h in [&proxy, &host_form] {
        c.ok("regctl", &["registry", "set", h, "--cacert", &ca_pem], &[])
            .unwrap();
    }
    let tags = stdout(c.ok("regctl", &["tag", "ls", &host_app], &[]).unwrap());
    assert!(tags.lines().any(|t| t == "p5"), "{tags}");
    let listed = stdout(
        c.ok(
            "regctl",
            &[
                "artifact",
                "list",
                &format!("{app}:v1"),
                "--filter-artifact-type",
                NOTE,
                "--format",
                "{{jsonPretty .}}",
            ],
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    assert!(listed.contains(NOTE) && !listed.contains(SBOM), "{listed}");
    c.ok(
        "regctl",
        &[
            "image",
            "mod",
            &format!("{app}:v1"),
            "--digest-algo",
            "sha512",
            "--create",
            "sha512",
        ],
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let d512 = stdout(
        c.ok("regctl", &["image", "digest", &format!("{host_app}:sha512")], &[])
            .unwrap(),
    );
    assert!(d512.starts_with("sha512:") && d512.len() == 7 + 128, "{d512}");
    let m = send(
        port,
        Request::get(&format!(
            "/v2/namespaces/{NS}/connectors/registry/library/app/manifests/{d512}"
        ))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json"),
        &token,
    );
    assert_eq!(m.status, 200, "{}", m.summary());
    assert_eq!(m.header("Docker-Content-Digest"), Some(d512.as_str()));
    let layer = m.json().unwrap()["layers"][0]["digest"].as_str().unwrap().to_string();
    assert!(layer.starts_with("sha512:"), "{layer}");
    let b = send(
        port,
        Request::get(&format!("/v2/{}/blobs/{layer}", "library/app")).host(&host_name(NS, "registry")),
        &token,
    );
    assert_eq!(b.status, 200, "{}", b.summary());

    // The referrers tag-schema fallback: `other` fronts an upstream without the referrers API.
    let other_app = format!("{other_host}/library/app");
    c.ok("crane", &["push", &layout, &format!("{other_app}:v1")], &[])
        .unwrap_or_else(|e| panic!("{e}"));
    in_files(&[
        "attach",
        &format!("{other_app}@{digest}"),
        "--artifact-type",
        SBOM,
        "sbom.json:application/json",
    ]);
    let fallback_tag = digest.replace(':', "-");
    let tags = stdout(c.ok("crane", &["ls", &other_app], &[]).unwrap());
    assert!(
        tags.lines().any(|t| t == fallback_tag),
        "no fallback tag {fallback_tag} in {tags}"
    );
    let discovered = stdout(in_files(&[
        "discover",
        &format!("{other_app}@{digest}"),
        "--format",
        "json",
    ]));
    assert!(discovered.contains(SBOM), "{discovered}");

    // cosign: a local key pair; sign, verify, attest an SBOM, verify the attestation.
    let home = c.home().display().to_string();
    let pw = [("COSIGN_PASSWORD", "")];
    let keys = c.ok(
        "cosign",
        &["generate-key-pair", "--output-key-prefix", &format!("{home}/cosign")],
        &pw,
    );
    keys.unwrap_or_else(|e| panic!("{e}"));
    let (key, pubkey) = (format!("{home}/cosign.key"), format!("{home}/cosign.pub"));
    let signed = format!("{app}@{digest}");
    let mut sign = vec![
        "sign",
        "--key",
        &key,
        "--use-signing-config=false",
        "--tlog-upload=false",
        "--yes",
    ];
    sign.push(&signed);
    c.ok("cosign", &sign, &pw).unwrap_or_else(|e| panic!("{e}"));
    let verified_ref = format!("{host_app}@{digest}");
    let mut verify = vec!["verify", "--key", &pubkey, "--insecure-ignore-tlog"];
    verify.push(&verified_ref);
    let out = c.ok("cosign", &verify, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.stdout.contains(&digest), "{}", out.stdout);
    let predicate = files.join("sbom.json").display().to_string();
    let mut attest = vec![
        "attest",
        "--key",
        &key,
        "--use-signing-config=false",
        "--tlog-upload=false",
        "--yes",
        "--type",
        "spdxjson",
        "--predicate",
        &predicate,
    ];
    attest.push(&signed);
    c.ok("cosign", &attest, &pw).unwrap_or_else(|e| panic!("{e}"));
    let mut verify_att = vec![
        "verify-attestation",
        "--key",
        &pubkey,
        "--insecure-ignore-tlog",
        "--type",
        "spdxjson",
    ];
    verify_att.push(&verified_ref);
    c.ok("cosign", &verify_att, &[]).unwrap_or_else(|e| panic!("{e}"));
    // A wrong key does not verify: the check above could fail.
    let other_keys = format!("{home}/other");
    c.ok(
        "cosign",
        &["generate-key-pair", "--output-key-prefix", &other_keys],
        &pw,
    )
    .unwrap();
    let wrong = format!("{other_keys}.pub");
    let mut verify_wrong = vec!["verify", "--key", &wrong, "--insecure-ignore-tlog"];
    verify_wrong.push(&verified_ref);
    assert!(
        !c.run("cosign", &verify_wrong, &[]).unwrap().success,
        "verified with the wrong key"
    );
}

/// The size of the manifest `digest` names, as the proxy serves it.
fn manifest_size(port: u16, token: &str, digest: &str) -> usize {
    let r = send(
        port,
        Request::get(&format!(
            "/v2/namespaces/{NS}/connectors/registry/library/app/manifests/{digest}"
        ))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json"),
        token,
    );
    assert_eq!(r.status, 200, "{}", r.summary());
    r.body.len()
}
