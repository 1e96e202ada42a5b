//! Shared by the suites that run the controller in file mode against a real Envoy
//! (`controller_xds`, `faults`): a real htpasswd registry seeded with the sample image, the
//! recorder in front of it, a token minter, skopeo, an empty manifest directory and the identity
//! file; and the manifests a user would write.

use std::path::{Path, PathBuf};

use connector_devkit::WorkDir;
use connector_devkit::controller::Controller;
use connector_devkit::envoy::Envoy;
use connector_devkit::image::SampleImage;
use connector_devkit::recorder::Recorder;
use connector_devkit::registry::{Credentials, Registry};
use connector_devkit::skopeo::Skopeo;
use connector_devkit::stack::seed_upstream;
use connector_devkit::tokens::{AUDIENCE, ISSUER, Minter};

/// The namespace of the connectors these suites write.
pub const NS: &str = "demo";

pub struct Setup {
    pub work: WorkDir,
    pub registry: Registry,
    pub recorder: Recorder,
    pub skopeo: Skopeo,
    pub minter: Minter,
    pub sample: SampleImage,
    pub manifests: PathBuf,
    pub identity: PathBuf,
}

pub fn setup(label: &str) -> Setup {
    connector_devkit::require_wasm().unwrap_or_else(|e| panic!("{e}"));
    let work = WorkDir::new(label).unwrap();
    let skopeo = Skopeo::new(&work).unwrap();
    let registry = Registry::start_with_auth(&work, "robot").unwrap();
    let creds = registry.credentials.clone().unwrap();
    let (sample, recorder, minter) =
        seed_upstream(&work, &skopeo, &registry, &creds.username, &creds.password).unwrap();
    let manifests = work.sub("manifests").unwrap();
    let identity = work.path().join("identity.json");
    std::fs::write(
        &identity,
        serde_json::json!({ "issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": minter.jwks() }).to_string(),
    )
    .unwrap();
    Setup {
        work,
        registry,
        recorder,
        skopeo,
        minter,
        sample,
        manifests,
        identity,
    }
}

/// Writes a manifest file the way an editor or `kubectl`-style tool would replace it: whole,
/// by rename, so the controller never reads half a file.
pub fn put(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

pub fn connector_yaml(name: &str, address: &str, secret: &str) -> String {
    format!(
        "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  address: {address}\n  auth:\n    name: basicAuth\n    secretRef:\n      name: {secret}\n  connectorClassName: oci\n"
    )
}

/// The values are quoted as JSON strings (YAML reads those as they are), so a password with
/// YAML's own characters in it (`&`, `#`, `: `, a leading `*`) arrives unchanged.
pub fn secret_yaml(name: &str, c: &Credentials) -> String {
    let q = |v: &str| serde_json::to_string(v).unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {NS}\n  annotations:\n    connectors.alauda.io/allowed-connectors: \"*\"\ntype: cpaas.io/distribution-registry-token\nstringData:\n  username: {}\n  password: {}\n",
        q(&c.username),
        q(&c.password)
    )
}

/// Pulls `<repo>:<tag>` through `connector` at the proxy `authority` with skopeo and checks the
/// layers are the sample's.
pub fn pull(s: &Setup, authority: &str, connector: &str, token: &str, into: &str) {
    let (repo, tag) = ("library/app", "v1");
    let reference = format!("docker://{authority}/namespaces/{NS}/connectors/{connector}/{repo}:{tag}");
    let dest = s.work.sub(into).unwrap();
    s.skopeo
        .copy(
            &reference,
            connector_devkit::skopeo::Creds::Basic("sa", token),
            &format!("oci:{}:{tag}", dest.display()),
            connector_devkit::skopeo::Creds::None,
        )
        .and_then(|o| o.ok())
        .unwrap_or_else(|e| panic!("skopeo copy {reference}: {e}"));
    assert_eq!(
        connector_devkit::image::oci_layers(&dest, tag).unwrap(),
        s.sample.layers,
        "pulled layers"
    );
}

/// The controller in API mode (`serve --kube` against the API server `kubeconfig` names,
/// reporting `proxy_url`, with `args`) and an Envoy fed by it: the API-mode suites' stack.
pub fn start_kube_stack(work: &WorkDir, kubeconfig: &Path, proxy_url: &str, args: &[&str]) -> (Controller, Envoy) {
    let controller = Controller::start_kube(work, kubeconfig, proxy_url, args).unwrap_or_else(|e| panic!("{e}"));
    let envoy = Envoy::start_xds(
        work,
        controller.ports.xds,
        controller.ports.channel,
        &controller.envoy_env(),
    )
    .unwrap();
    (controller, envoy)
}

/// The controller (file mode, on `s`'s manifests and identity, with `args`) and an Envoy fed by it.
pub fn start_stack(s: &Setup, args: &[&str]) -> (Controller, Envoy) {
    let controller = Controller::start_with_args(&s.work, &s.manifests, &s.identity, args).unwrap();
    let envoy = envoy_fed_by(s, &controller);
    (controller, envoy)
}

/// Envoy fed over ADS by `controller`, with its channel key.
pub fn envoy_fed_by(s: &Setup, controller: &Controller) -> Envoy {
    Envoy::start_xds(
        &s.work,
        controller.ports.xds,
        controller.ports.channel,
        &controller.envoy_env(),
    )
    .unwrap()
}
