//! Owns sample images: a small multi-layer OCI image built offline with `umoci` (each layer adds
//! random files, so every build has its own digests), pushing it into a registry with skopeo,
//! and reading layer digests back out of an OCI layout to compare what a pull produced.

use crate::procs;
use crate::skopeo::{Creds, Skopeo};
use crate::{Result, WorkDir};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An image in a local OCI layout.
#[derive(Debug, Clone)]
pub struct SampleImage {
    pub layout: PathBuf,
    pub tag: String,
    /// Layer digests in manifest order.
    pub layers: Vec<String>,
}

impl SampleImage {
    /// `oci:<layout>:<tag>` for skopeo.
    pub fn oci_ref(&self) -> String {
        format!("oci:{}:{}", self.layout.display(), self.tag)
    }
}

fn umoci(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("umoci");
    cmd.args(args);
    procs::run(cmd, None)?.ok().map(|_| ())
}

/// Builds an image with `layer_count` layers under `<work>/images/<name>`.
pub fn build_sample(work: &WorkDir, name: &str, tag: &str, layer_count: usize) -> Result<SampleImage> {
    build_sized(work, name, tag, layer_count, 0)
}

/// As [`build_sample`], each layer also carrying `bytes_per_layer` random bytes (which do not
/// compress): an image whose pull time is dominated by moving layers, for the benchmark.
pub fn build_sized(
    work: &WorkDir,
    name: &str,
    tag: &str,
    layer_count: usize,
    bytes_per_layer: usize,
) -> Result<SampleImage> {
    let base = work.sub(&format!("images/{name}"))?;
    let layout = base.join("layout");
    let layout_s = layout.to_string_lossy().into_owned();
    let image = format!("{layout_s}:{tag}");
    umoci(&["init", "--layout", &layout_s])?;
    umoci(&["new", "--image", &image])?;
    umoci(&[
        "config",
        "--image",
        &image,
        "--config.cmd",
        "/bin/hello",
        "--author",
        "connector-devkit",
    ])?;
    for i in 1..=layer_count {
        let bundle = base.join(format!("bundle-{i}"));
        let bundle_s = bundle.to_string_lossy().into_owned();
        // --rootless: no chown to image uids needed, works the same as root.
        umoci(&["unpack", "--rootless", "--image", &image, &bundle_s])?;
        let dir = bundle.join(format!("rootfs/layer-{i}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let content = format!("layer {i} of {name}:{tag}\nnonce {}\n", crate::random_hex(16)?);
        std::fs::write(dir.join("data.txt"), content).map_err(|e| format!("write layer file: {e}"))?;
        if bytes_per_layer > 0 {
            std::fs::write(dir.join("payload.bin"), crate::random_bytes(bytes_per_layer)?)
                .map_err(|e| format!("write layer payload: {e}"))?;
        }
        umoci(&["repack", "--image", &image, &bundle_s])?;
        std::fs::remove_dir_all(&bundle).map_err(|e| format!("remove {}: {e}", bundle.display()))?;
    }
    let layers = oci_layers(&layout, tag)?;
    if layers.len() != layer_count {
        return Err(format!("umoci built {} layers, wanted {layer_count}", layers.len()));
    }
    Ok(SampleImage {
        layout,
        tag: tag.into(),
        layers,
    })
}

/// Pushes the image to `docker://<authority>/<repo>:<tag>` with Basic credentials.
pub fn push(skopeo: &Skopeo, image: &SampleImage, authority: &str, repo: &str, creds: Creds<'_>) -> Result<()> {
    let dest = format!("docker://{authority}/{repo}:{}", image.tag);
    skopeo
        .copy(&image.oci_ref(), Creds::None, &dest, creds)?
        .ok()
        .map(|_| ())
}

/// Layer digests of `tag` in an OCI layout (as written by umoci or `skopeo copy ... oci:`).
pub fn oci_layers(layout: &Path, tag: &str) -> Result<Vec<String>> {
    let index = read_json(&layout.join("index.json"))?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let entry = manifests
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .or_else(|| (manifests.len() == 1).then(|| &manifests[0]))
        .ok_or_else(|| format!("no manifest tagged {tag} in {}", layout.display()))?;
    let manifest = read_json(&blob_path(layout, entry["digest"].as_str().unwrap_or(""))?)?;
    manifest_layers(&manifest)
}

/// Layer digests listed in a manifest document.
pub fn manifest_layers(manifest: &Value) -> Result<Vec<String>> {
    manifest["layers"]
        .as_array()
        .ok_or_else(|| format!("manifest has no layers: {manifest}"))?
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("layer without digest: {l}"))
        })
        .collect()
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let (alg, hex) = digest.split_once(':').ok_or_else(|| format!("bad digest {digest:?}"))?;
    Ok(layout.join("blobs").join(alg).join(hex))
}

fn read_json(p: &Path) -> Result<Value> {
    let bytes = std::fs::read(p).map_err(|e| format!("read {}: {e}", p.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("parse {}: {e}", p.display()))
}
