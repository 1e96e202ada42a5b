//! The registry protocol beneath the clients, sent raw through the proxy against the Basic
//! upstream, in both address forms: chunked uploads (POST, PATCH with Content-Range in several
//! chunks, PUT ?digest=), monolithic uploads (POST ?digest= with the body; POST then one PUT),
//! each following the Location the proxy hands back; ranged blob reads; manifest
//! GET/HEAD/PUT/DELETE by tag and by digest; and cross-repository mounts, which the proxy must
//! map to the upstream name inside one connector and drop when `from` names another connector.

use connector_devkit::http::{Request, Response};
use connector_devkit::random_hex;
use connector_devkit::stack::{Stack, check_host_form_resolves, host_name};
use connector_e2e::{CONNECTOR_NAME, CONNECTOR_NAMESPACE, Shared, with_token};

static STACK: Shared = Shared::new("e2e-upload", true);

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// An address form as raw requests see it: the Host header and the path prefix of a repository.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Form {
    Path,
    Host,
}

struct Client<'a> {
    s: &'a Stack,
    form: Form,
    jwt: String,
}

impl<'a> Client<'a> {
    fn new(s: &'a Stack, form: Form) -> Self {
        if form == Form::Host {
            check_host_form_resolves(CONNECTOR_NAMESPACE, CONNECTOR_NAME).unwrap();
        }
        Self {
            s,
            form,
            jwt: s.minter.valid(CONNECTOR_NAMESPACE, "default").unwrap(),
        }
    }

    /// `/v2/<client name of repo>/<rest>`.
    fn path(&self, repo: &str, rest: &str) -> String {
        format!("/v2/{}/{rest}", self.name(repo))
    }

    /// The repository name as the client spells it in this form.
    fn name(&self, repo: &str) -> String {
        match self.form {
            Form::Path => format!("namespaces/{CONNECTOR_NAMESPACE}/connectors/{CONNECTOR_NAME}/{repo}"),
            Form::Host => repo.to_string(),
        }
    }

    fn host(&self) -> String {
        match self.form {
            Form::Path => self.s.envoy.authority(),
            Form::Host => format!(
                "{}:{}",
                host_name(CONNECTOR_NAMESPACE, CONNECTOR_NAME),
                self.s.envoy.port
            ),
        }
    }

    fn send(&self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let mut req = with_token(Request::new(method, target), &self.jwt).host(&self.host());
        for (n, v) in headers {
            req = req.header(n, v);
        }
        req.body = body.to_vec();
        req.send(self.s.envoy.port)
            .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
    }

    /// The request target of an upload `Location`: it must point back at the proxy (same host
    /// and port) under the client's own name for `repo`, with its query kept.
    fn follow(&self, resp: &Response, repo: &str) -> String {
        let loc = resp
            .header("location")
            .unwrap_or_else(|| panic!("no Location: {}", resp.summary()))
            .to_string();
        let target = match loc.strip_prefix("https://") {
            Some(rest) => {
                let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                assert_eq!(
                    authority,
                    self.host(),
                    "Location must keep the proxy's host and port: {loc}"
                );
                path.to_string()
            }
            None => loc.clone(),
        };
        let prefix = self.path(repo, "blobs/");
        assert!(
            target.starts_with(&prefix),
            "Location must be under the client's name {prefix}, got {loc}"
        );
        target
    }
}

/// `sha256:<hex>` of bytes, by coreutils' sha256sum.
fn sha256(bytes: &[u8]) -> String {
    let out = connector_devkit::procs::run(std::process::Command::new("sha256sum"), Some(bytes))
        .and_then(|o| o.ok())
        .unwrap();
    format!("sha256:{}", out.stdout.split_whitespace().next().unwrap_or(""))
}

/// Appends `k=v` to a target that may already carry a query.
fn with_query(target: &str, kv: &str) -> String {
    format!("{target}{}{kv}", if target.contains('?') { '&' } else { '?' })
}

/// Random content of `n` bytes (so digests are fresh and no earlier upload satisfies them).
fn content(n: usize) -> Vec<u8> {
    connector_devkit::random_bytes(n).unwrap()
}

/// Chunked upload of `data` in `chunks` pieces; returns the digest.
fn chunked_upload(c: &Client<'_>, repo: &str, data: &[u8], chunks: usize) -> String {
    let digest = sha256(data);
    let start = c.send("POST", &c.path(repo, "blobs/uploads/"), &[], b"");
    assert_eq!(start.status, 202, "POST starts an upload: {}", start.summary());
    let mut target = c.follow(&start, repo);
    let size = data.len().div_ceil(chunks);
    let mut offset = 0;
    while offset < data.len() {
        let end = (offset + size).min(data.len());
        let range = format!("{offset}-{}", end - 1);
        let r = c.send(
            "PATCH",
            &target,
            &[("Content-Range", &range), ("Content-Type", "application/octet-stream")],
            &data[offset..end],
        );
        assert_eq!(r.status, 202, "PATCH {range}: {}", r.summary());
        assert_eq!(
            r.header("range"),
            Some(format!("0-{}", end - 1).as_str()),
            "Range after PATCH {range}: {}",
            r.summary()
        );
        target = c.follow(&r, repo);
        offset = end;
    }
    let done = c.send("PUT", &with_query(&target, &format!("digest={digest}")), &[], b"");
    assert_eq!(done.status, 201, "PUT ?digest= completes: {}", done.summary());
    assert_eq!(done.header("docker-content-digest"), Some(digest.as_str()));
    digest
}

fn get_blob(c: &Client<'_>, repo: &str, digest: &str) -> Vec<u8> {
    let r = c.send("GET", &c.path(repo, &format!("blobs/{digest}")), &[], b"");
    assert_eq!(r.status, 200, "GET blob {digest}: status {}", r.status);
    r.body
}

fn chunked_upload_in_three_chunks(form: Form) {
    STACK.run(|s| {
        let c = Client::new(s, form);
        let repo = format!("proto/chunked-{}", random_hex(3).unwrap());
        let data = content(3000);
        let digest = chunked_upload(&c, &repo, &data, 3);
        assert_eq!(get_blob(&c, &repo, &digest), data, "blob read back through the proxy");
        // Counted in the raw bytes: on a reused connection a request line follows a binary body
        // without a line break, which the recorder's line view cannot split.
        let seen = s.recorder.take();
        let patches = seen.text.matches(&format!("PATCH /v2/{repo}/blobs/uploads/")).count();
        assert_eq!(patches, 3, "three PATCHes under the upstream name");
        assert_eq!(seen.text.matches(&format!("PUT /v2/{repo}/blobs/uploads/")).count(), 1);
        assert!(!seen.text.contains(&c.jwt), "the client's JWT reached the upstream");
    });
}

#[test]
fn chunked_upload_path_form() {
    chunked_upload_in_three_chunks(Form::Path);
}

#[test]
fn chunked_upload_host_form() {
    chunked_upload_in_three_chunks(Form::Host);
}

/// A chunk that does not start where the upload stands: newer registries answer 416,
/// Distribution 2.8 accepts it (202). Either way the client must get exactly the registry's
/// answer, so the same PATCH is sent directly and through the proxy and the answers compared.
#[test]
fn out_of_order_chunk_gets_the_registrys_own_answer() {
    STACK.run(|s| {
        let c = Client::new(s, Form::Path);
        let repo = "proto/out-of-order";
        let patch = |via_proxy: bool| -> Response {
            let body = content(100);
            let headers = [
                ("Content-Range", "100-199"),
                ("Content-Type", "application/octet-stream"),
            ];
            if via_proxy {
                let start = c.send("POST", &c.path(repo, "blobs/uploads/"), &[], b"");
                assert_eq!(start.status, 202, "{}", start.summary());
                let target = c.follow(&start, repo);
                c.send("PATCH", &target, &headers, &body)
            } else {
                let direct =
                    |m: &str, t: &str| Request::new(m, t).basic(connector_devkit::stack::UPSTREAM_USER, s.password());
                let start = direct("POST", &format!("/v2/{repo}/blobs/uploads/"))
                    .send(s.registry.port)
                    .unwrap();
                assert_eq!(start.status, 202, "{}", start.summary());
                let loc = start.header("location").unwrap_or("");
                let target = &loc[loc.find("/v2/").unwrap_or(0)..];
                let mut req = direct("PATCH", target);
                for (n, v) in headers {
                    req = req.header(n, v);
                }
                req.body = body;
                req.send(s.registry.port).unwrap()
            }
        };
        let direct = patch(false);
        let proxied = patch(true);
        assert_eq!(
            proxied.status,
            direct.status,
            "proxied {} vs direct {}",
            proxied.summary(),
            direct.summary()
        );
        assert_eq!(proxied.header("range"), direct.header("range"), "Range header");
    });
}

fn monolithic_uploads(form: Form) {
    STACK.run(|s| {
        let c = Client::new(s, form);
        let repo = format!("proto/mono-{}", random_hex(3).unwrap());

        // POST ?digest= with the whole body. Registries MAY finish it at once (201); Distribution
        // 2.8 does not and opens an upload (202) that the client completes with a PUT. Either
        // answer is the registry's, and the proxy's Location must work for the completion.
        let one = content(1500);
        let d1 = sha256(&one);
        let r = c.send(
            "POST",
            &c.path(&repo, &format!("blobs/uploads/?digest={d1}")),
            &[("Content-Type", "application/octet-stream")],
            &one,
        );
        match r.status {
            201 => {
                assert_eq!(r.header("docker-content-digest"), Some(d1.as_str()));
                let loc = c.follow(&r, &repo);
                assert!(loc.ends_with(&format!("blobs/{d1}")), "Location of the blob: {loc}");
            }
            202 => {
                let target = c.follow(&r, &repo);
                let done = c.send("PUT", &with_query(&target, &format!("digest={d1}")), &[], &one);
                assert_eq!(done.status, 201, "completing the single POST: {}", done.summary());
            }
            _ => panic!("single-POST upload: {}", r.summary()),
        }
        assert_eq!(get_blob(&c, &repo, &d1), one);

        // POST, then one PUT ?digest= with the whole body.
        let two = content(2500);
        let d2 = sha256(&two);
        let start = c.send("POST", &c.path(&repo, "blobs/uploads/"), &[], b"");
        assert_eq!(start.status, 202, "{}", start.summary());
        let target = c.follow(&start, &repo);
        let done = c.send(
            "PUT",
            &with_query(&target, &format!("digest={d2}")),
            &[("Content-Type", "application/octet-stream")],
            &two,
        );
        assert_eq!(done.status, 201, "POST then PUT: {}", done.summary());
        assert_eq!(get_blob(&c, &repo, &d2), two);
    });
}

#[test]
fn monolithic_uploads_path_form() {
    monolithic_uploads(Form::Path);
}

#[test]
fn monolithic_uploads_host_form() {
    monolithic_uploads(Form::Host);
}

#[test]
fn ranged_blob_read_is_206_with_the_right_bytes() {
    STACK.run(|s| {
        let c = Client::new(s, Form::Path);
        let repo = "proto/ranged";
        let data = content(1000);
        let digest = chunked_upload(&c, repo, &data, 2);
        let r = c.send(
            "GET",
            &c.path(repo, &format!("blobs/{digest}")),
            &[("Range", "bytes=0-9")],
            b"",
        );
        assert_eq!(r.status, 206, "ranged GET: status {} {:?}", r.status, r.headers);
        assert_eq!(r.body, &data[..10], "the first ten bytes");
        assert_eq!(r.header("content-range"), Some("bytes 0-9/1000"));
    });
}

/// Uploads a config and a layer, then PUTs a manifest referencing them; returns its bytes.
fn manifest_for(c: &Client<'_>, repo: &str) -> Vec<u8> {
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"config":{{}},"nonce":"{}"}}"#,
        random_hex(8).unwrap()
    )
    .into_bytes();
    let dc = sha256(&config);
    let start = c.send("POST", &c.path(repo, "blobs/uploads/"), &[], b"");
    assert_eq!(start.status, 202, "config upload: {}", start.summary());
    let target = c.follow(&start, repo);
    let r = c.send("PUT", &with_query(&target, &format!("digest={dc}")), &[], &config);
    assert_eq!(r.status, 201, "config upload: {}", r.summary());
    let layer = content(700);
    let dl = chunked_upload(c, repo, &layer, 2);
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{dc}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{dl}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    )
    .into_bytes()
}

fn manifest_lifecycle(form: Form) {
    STACK.run(|s| {
        let c = Client::new(s, form);
        let repo = format!("proto/manifests-{}", random_hex(3).unwrap());
        let body = manifest_for(&c, &repo);
        let digest = sha256(&body);
        let ct = [("Content-Type", OCI_MANIFEST)];
        let accept = [("Accept", OCI_MANIFEST)];

        let put = c.send("PUT", &c.path(&repo, "manifests/v1"), &ct, &body);
        assert_eq!(put.status, 201, "PUT by tag: {}", put.summary());
        assert_eq!(put.header("docker-content-digest"), Some(digest.as_str()));
        let put2 = c.send("PUT", &c.path(&repo, &format!("manifests/{digest}")), &ct, &body);
        assert_eq!(put2.status, 201, "PUT by digest: {}", put2.summary());

        for reference in ["v1", digest.as_str()] {
            let target = c.path(&repo, &format!("manifests/{reference}"));
            let get = c.send("GET", &target, &accept, b"");
            assert_eq!(get.status, 200, "GET {reference}: {}", get.summary());
            assert_eq!(get.body, body, "GET {reference}: the exact bytes that were PUT");
            assert_eq!(get.header("docker-content-digest"), Some(digest.as_str()));
            let head = c.send("HEAD", &target, &accept, b"");
            assert_eq!(head.status, 200, "HEAD {reference}: {}", head.summary());
            assert_eq!(head.header("docker-content-digest"), Some(digest.as_str()));
            assert_eq!(head.header("content-length"), Some(body.len().to_string().as_str()));
        }

        // Distribution 2.8 deletes manifests by digest only; by tag it answers an error, which
        // must reach the client as the registry sent it (and delete nothing).
        let by_tag = c.send("DELETE", &c.path(&repo, "manifests/v1"), &[], b"");
        assert!(
            matches!(by_tag.status, 400 | 405),
            "DELETE by tag: the registry's refusal, got {}",
            by_tag.summary()
        );
        assert_eq!(c.send("HEAD", &c.path(&repo, "manifests/v1"), &accept, b"").status, 200);

        let del = c.send("DELETE", &c.path(&repo, &format!("manifests/{digest}")), &[], b"");
        assert_eq!(del.status, 202, "DELETE by digest: {}", del.summary());
        for reference in ["v1", digest.as_str()] {
            let gone = c.send("GET", &c.path(&repo, &format!("manifests/{reference}")), &accept, b"");
            assert_eq!(gone.status, 404, "GET {reference} after DELETE: {}", gone.summary());
        }
        let seen = s.recorder.take();
        assert!(
            seen.request_lines()
                .iter()
                .any(|l| *l == format!("DELETE /v2/{repo}/manifests/{digest} HTTP/1.1")),
            "the DELETE reaches the upstream under the upstream name: {:?}",
            seen.request_lines()
        );
    });
}

#[test]
fn manifest_put_get_head_delete_path_form() {
    manifest_lifecycle(Form::Path);
}

#[test]
fn manifest_put_get_head_delete_host_form() {
    manifest_lifecycle(Form::Host);
}

/// The POST line the upstream received for `repo`'s upload start.
fn upstream_post_line(s: &Stack, repo: &str) -> String {
    let seen = s.recorder.take();
    seen.request_lines()
        .iter()
        .find(|l| l.starts_with(&format!("POST /v2/{repo}/blobs/uploads/")))
        .map(|l| l.to_string())
        .unwrap_or_else(|| panic!("no upload POST for {repo} upstream: {:?}", seen.request_lines()))
}

#[test]
fn cross_repo_mount_inside_the_connector_is_mapped_to_the_upstream_name() {
    STACK.run(|s| {
        let c = Client::new(s, Form::Path);
        let tag = random_hex(3).unwrap();
        let (repo_a, repo_b) = (format!("mount/a-{tag}"), format!("mount/b-{tag}"));
        let data = content(1200);
        let digest = chunked_upload(&c, &repo_a, &data, 2);
        s.recorder.take();
        let target = c.path(
            &repo_b,
            &format!("blobs/uploads/?mount={digest}&from={}", c.name(&repo_a)),
        );
        let r = c.send("POST", &target, &[], b"");
        let line = upstream_post_line(s, &repo_b);
        assert_eq!(
            r.status,
            201,
            "mount inside the connector: {} (upstream saw {line})",
            r.summary()
        );
        assert!(
            line.contains(&format!("mount={digest}")) && line.contains(&format!("from={repo_a}")),
            "the upstream must see the mount from the upstream name {repo_a}: {line}"
        );
        assert!(
            !line.contains("namespaces/"),
            "the client's prefix leaked upstream: {line}"
        );
        assert_eq!(c.follow(&r, &repo_b), c.path(&repo_b, &format!("blobs/{digest}")));
        assert_eq!(get_blob(&c, &repo_b, &digest), data, "the mounted blob");
    });
}

#[test]
fn cross_repo_mount_from_another_connector_starts_a_plain_upload() {
    STACK.run(|s| {
        let c = Client::new(s, Form::Path);
        let tag = random_hex(3).unwrap();
        let (repo_a, repo_b) = (format!("mount/src-{tag}"), format!("mount/dst-{tag}"));
        let digest = chunked_upload(&c, &repo_a, &content(800), 2);
        s.recorder.take();
        // The blob does exist upstream under repo_a, so a mount that leaked through (mapped or
        // not) would answer 201: only a dropped mount gives 202.
        for from in [
            format!("namespaces/other/connectors/x/{repo_a}"),
            format!("namespaces/{CONNECTOR_NAMESPACE}/connectors/stale-secret/{repo_a}"),
        ] {
            let target = c.path(&repo_b, &format!("blobs/uploads/?mount={digest}&from={from}"));
            let r = c.send("POST", &target, &[], b"");
            let line = upstream_post_line(s, &repo_b);
            assert_eq!(
                r.status,
                202,
                "mount from {from}: {} (upstream saw {line})",
                r.summary()
            );
            assert!(
                !line.contains("mount=") && !line.contains("from="),
                "the registry must see no mount for from={from}: {line}"
            );
            let upload = c.follow(&r, &repo_b);
            assert!(upload.contains("/blobs/uploads/"), "a plain upload started: {upload}");
        }
    });
}
