//! Owns packaging the filter module as an OCI artifact in the layout Istio's `WasmPlugin`
//! pulls (`url: oci://...`): the Wasm OCI artifact format — an OCI image manifest whose config
//! has media type `application/vnd.module.wasm.config.v1+json` and whose single layer, media
//! type `application/vnd.module.wasm.content.layer.v1+wasm`, is the module's bytes unchanged.
//! Written as an OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/...`),
//! which `skopeo copy oci:<dir>:<tag> docker://<registry>/<repo>:<tag>` pushes as is.
//!
//! Pure Rust over the bytes, so the digests are reproducible: the same module always gives the
//! same manifest digest (no timestamps anywhere).

use std::path::Path;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.module.wasm.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
/// Istio (and the compat image variant) look for the module under this name.
pub const MODULE_TITLE: &str = "plugin.wasm";

pub fn sha256_digest(bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The artifact's three blobs and their digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub config: Vec<u8>,
    pub layer_digest: String,
    pub layer_size: usize,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
}

/// Builds the artifact for `module` (must start with the wasm magic number).
pub fn artifact(module: &[u8]) -> Result<Artifact, String> {
    if !module.starts_with(b"\0asm") {
        return Err("not a WebAssembly module (no \\0asm magic number): expected the filter's .wasm file".into());
    }
    // The config records what the module is built for; no time, so digests are reproducible.
    let config = serde_json::to_vec(&json!({
        "created": "1970-01-01T00:00:00Z",
        "author": "oci-connector",
        "platform": { "architecture": "wasm32", "os": "wasip1" },
    }))
    .map_err(|e| e.to_string())?;
    let layer_digest = sha256_digest(module);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": sha256_digest(&config), "size": config.len() },
        "layers": [{
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": layer_digest,
            "size": module.len(),
            "annotations": { "org.opencontainers.image.title": MODULE_TITLE },
        }],
    }))
    .map_err(|e| e.to_string())?;
    Ok(Artifact {
        manifest_digest: sha256_digest(&manifest),
        layer_size: module.len(),
        config,
        layer_digest,
        manifest,
    })
}

/// Writes `module` as an OCI image layout in `dir` under `tag`; returns the artifact.
pub fn write_layout(module: &[u8], dir: &Path, tag: &str) -> Result<Artifact, String> {
    let a = artifact(module)?;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| format!("create {}: {e}", blobs.display()))?;
    let put = |digest: &str, bytes: &[u8]| {
        let p = blobs.join(digest.trim_start_matches("sha256:"));
        std::fs::write(&p, bytes).map_err(|e| format!("write {}: {e}", p.display()))
    };
    put(&sha256_digest(&a.config), &a.config)?;
    put(&a.layer_digest, module)?;
    put(&a.manifest_digest, &a.manifest)?;
    let index: Value = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": a.manifest_digest,
            "size": a.manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    let write = |name: &str, v: &Value| {
        let p = dir.join(name);
        std::fs::write(&p, v.to_string()).map_err(|e| format!("write {}: {e}", p.display()))
    };
    write("oci-layout", &json!({ "imageLayoutVersion": "1.0.0" }))?;
    write("index.json", &index)?;
    Ok(a)
}

/// Reads the module back out of a layout (what a puller such as Istio's agent does): the
/// manifest `tag` names, its single wasm layer, checked against its digest.
pub fn read_layout(dir: &Path, tag: &str) -> Result<Vec<u8>, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("read {}: {e}", p.display()));
    let index: Value = serde_json::from_slice(&read(&dir.join("index.json"))?).map_err(|e| e.to_string())?;
    let entry = index["manifests"]
        .as_array()
        .and_then(|m| {
            m.iter()
                .find(|e| e["annotations"]["org.opencontainers.image.ref.name"] == tag)
        })
        .ok_or_else(|| format!("no manifest tagged {tag:?} in {}", dir.display()))?;
    let blob = |digest: &str| -> Result<Vec<u8>, String> {
        let bytes = read(&dir.join("blobs/sha256").join(digest.trim_start_matches("sha256:")))?;
        if sha256_digest(&bytes) != digest {
            return Err(format!("blob {digest} does not match its digest"));
        }
        Ok(bytes)
    };
    let manifest: Value =
        serde_json::from_slice(&blob(entry["digest"].as_str().unwrap_or_default())?).map_err(|e| e.to_string())?;
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    match layers.as_slice() {
        [layer] if layer["mediaType"] == LAYER_MEDIA_TYPE => blob(layer["digest"].as_str().unwrap_or_default()),
        _ => Err(format!(
            "expected one layer of type {LAYER_MEDIA_TYPE}, found {}",
            layers.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_artifact_is_reproducible_and_well_typed() {
        let module = b"\0asm\x01\0\0\0rest";
        let a = artifact(module).unwrap();
        assert_eq!(a, artifact(module).unwrap(), "same module, same digests");
        let m: Value = serde_json::from_slice(&a.manifest).unwrap();
        assert_eq!(m["config"]["mediaType"], CONFIG_MEDIA_TYPE);
        assert_eq!(m["layers"][0]["mediaType"], LAYER_MEDIA_TYPE);
        assert_eq!(m["layers"][0]["digest"], sha256_digest(module));
        assert_ne!(
            a.manifest_digest,
            artifact(b"\0asm\x01\0\0\0other").unwrap().manifest_digest
        );
        assert!(
            artifact(b"MZ not wasm")
                .unwrap_err()
                .contains("not a WebAssembly module")
        );
    }
}
