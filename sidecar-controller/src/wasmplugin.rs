//! Owns `--istio-wasmplugin <namespace>/<name>` (API mode in an Istio gateway): the controller
//! keeps that one Istio `WasmPlugin`'s `spec.pluginConfig` equal to the filter configuration it
//! rendered, so istiod hands the gateway's Envoy exactly what the controller's own xDS server
//! would have sent over ECDS. Nobody edits the plugin configuration by hand.
//!
//! - **No secret in it**: the rendered configuration names credentials by revision only
//!   (`{"fromController": <revision>}`, see `pipeline`); the credentials themselves still cross
//!   only the loopback channel of each gateway pod.
//! - **One WasmPlugin, every replica**: it configures the filter in every gateway pod, and each
//!   pod's filter asks its own controller for credentials by revision. So the revisions must be
//!   the same in every replica: with this flag they are keyed by [`revision_key`] (derived from
//!   the channel key all replicas share) instead of a key drawn at start-up.
//! - **Written only when it differs**: server-side apply under [`FIELD_MANAGER`], forced (the
//!   field is the controller's), with the resourceVersion seen as a precondition, so a stale view
//!   or a deleted WasmPlugin is never written over or re-created. The WasmPlugin is watched (by
//!   name: RBAC grants this one object only), so a `kubectl apply` of the shipped placeholder is
//!   put right again at once.

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::xds::Snapshot;

/// The field manager of `spec.pluginConfig`.
pub const FIELD_MANAGER: &str = "connector-controller-wasmplugin";
const GROUP: &str = "extensions.istio.io";
const VERSION: &str = "v1alpha1";
const KIND: &str = "WasmPlugin";

/// The WasmPlugin to keep in step, and the client to do it with.
#[derive(Clone)]
pub struct Target {
    pub client: kube::Client,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WasmPlugin {}/{}", self.namespace, self.name)
    }
}

/// `<namespace>/<name>` of `--istio-wasmplugin`.
pub fn parse_target(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("--istio-wasmplugin {s:?}: expected <namespace>/<name>")),
    }
}

/// The key of the credential revisions when a WasmPlugin carries the configuration: the same in
/// every replica (they share the channel key) and as secret as the channel key, from which it
/// cannot be turned back. A credential change still changes its revision (the revision digests
/// the credential).
pub fn revision_key(channel_key: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"oci-connector credential revisions\0");
    h.update(channel_key.as_bytes());
    h.finalize().into()
}

/// Whether to write `desired` into a WasmPlugin whose `spec.pluginConfig` is `observed`, given
/// the last write: what it wrote and what the object held right after it. Not when it already
/// holds `desired`; not again for the same `desired` while the object is as the last write left
/// it (another manager's leftover fields would otherwise make every event a write).
pub fn should_write(desired: &Value, observed: &Value, last: Option<&(Value, Value)>) -> bool {
    if observed == desired {
        return false;
    }
    !matches!(last, Some((wrote, after)) if wrote == desired && after == observed)
}

/// The WasmPlugin as last seen: its resourceVersion and `spec.pluginConfig` (`Null` if unset).
type Seen = (String, Value);

fn seen(o: &DynamicObject) -> Option<Seen> {
    let rv = o.metadata.resource_version.clone()?;
    Some((rv, o.data["spec"]["pluginConfig"].clone()))
}

/// Keeps the WasmPlugin's `spec.pluginConfig` equal to the latest rendered configuration until
/// `snapshots` closes. Errors are logged and retried with back-off; the WasmPlugin missing is
/// waited for (the controller never creates it: url, selector and failStrategy are the
/// operator's).
///
/// Each time the object is seen holding the configuration of a snapshot, `progress` hears that
/// snapshot's version (Istio mode's `ProxyReady`, see `istio`).
pub async fn run(
    target: Target,
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    progress: Arc<crate::istio::Progress>,
) {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(GROUP, VERSION, KIND));
    let api: Api<DynamicObject> = Api::namespaced_with(target.client.clone(), &target.namespace, &resource);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", target.name));
    let mut events = std::pin::pin!(watcher(api.clone(), config).default_backoff());
    let label = format!("{}/{}", target.namespace, target.name);
    let parse = |s: Option<&Arc<Snapshot>>| {
        s.and_then(|s| Some((s.version, serde_json::from_str::<Value>(&s.filter_config.text()).ok()?)))
    };
    let (mut version, mut desired) = parse(snapshots.borrow_and_update().as_ref()).unzip();
    let mut reported = None;
    let mut observed: Option<Seen> = None;
    let mut listed = false;
    let mut last: Option<(Value, Value)> = None;
    let mut backoff = Duration::from_millis(500);
    loop {
        if let (Some(v), Some(want), Some((_, current))) = (version, &desired, &observed)
            && want == current
            && reported != Some(v)
        {
            progress.plugin_config(v);
            reported = Some(v);
        }
        if let (Some(want), Some((rv, current))) = (&desired, &observed)
            && should_write(want, current, last.as_ref())
        {
            match write(&api, &target, want, rv).await {
                Ok(after) => {
                    backoff = Duration::from_millis(500);
                    let connectors = want["connectors"].as_array().map_or(0, Vec::len);
                    if after.1 == *want {
                        tracing::info!(wasmplugin = %label, connectors, "WasmPlugin pluginConfig written");
                    } else {
                        // Keys written by another field manager survive a server-side apply; the
                        // filter refuses unknown keys, so say where to look.
                        tracing::warn!(wasmplugin = %label, connectors, "WasmPlugin pluginConfig written, but it also holds fields another manager owns: remove them (kubectl get wasmplugin -o yaml --show-managed-fields)");
                    }
                    last = Some((want.clone(), after.1.clone()));
                    observed = Some(after);
                }
                Err(e) => {
                    tracing::warn!(wasmplugin = %label, error = %e, ?backoff, "writing the WasmPlugin's pluginConfig failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    // A stale resourceVersion is the usual cause: the watch has the fresh one.
                    while let Some(Some(event)) = events.next().now_or_never() {
                        apply_event(event, &mut observed, &mut listed, &label);
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                (version, desired) = parse(snapshots.borrow_and_update().as_ref()).unzip();
            }
            event = events.next() => match event {
                Some(event) => apply_event(event, &mut observed, &mut listed, &label),
                None => return,
            },
        }
    }
}

/// Folds one watch event into what is known of the WasmPlugin.
fn apply_event(
    event: Result<watcher::Event<DynamicObject>, watcher::Error>,
    observed: &mut Option<Seen>,
    listed: &mut bool,
    label: &str,
) {
    match event {
        Ok(watcher::Event::Apply(o)) => *observed = seen(&o),
        Ok(watcher::Event::Delete(_)) => {
            tracing::warn!(wasmplugin = %label, "the WasmPlugin was deleted; waiting for it to come back");
            *observed = None;
        }
        Ok(watcher::Event::Init) => *listed = false,
        Ok(watcher::Event::InitApply(o)) => {
            *listed = true;
            *observed = seen(&o);
        }
        Ok(watcher::Event::InitDone) => {
            if !*listed {
                tracing::warn!(wasmplugin = %label, "no such WasmPlugin (kubectl apply -k deploy/istio creates it); waiting for it");
                *observed = None;
            }
        }
        Err(e) => {
            tracing::warn!(wasmplugin = %label, error = %e, "watching the WasmPlugin failed; retrying with backoff")
        }
    }
}

async fn write(api: &Api<DynamicObject>, target: &Target, desired: &Value, rv: &str) -> Result<Seen, kube::Error> {
    let patch = json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": KIND,
        // The resourceVersion makes the apply conditional: it fails on a stale view, and never
        // creates a WasmPlugin that was deleted meanwhile.
        "metadata": { "name": target.name, "namespace": target.namespace, "resourceVersion": rv },
        "spec": { "pluginConfig": desired },
    });
    let o = api
        .patch(
            &target.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(seen(&o).unwrap_or_else(|| (rv.to_string(), o.data["spec"]["pluginConfig"].clone())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("oci-connector-system/oci-connector"),
            Ok(("oci-connector-system".into(), "oci-connector".into()))
        );
        for bad in ["", "x", "/x", "x/", "a/b/c"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn revision_keys_follow_the_channel_key_only() {
        assert_eq!(revision_key("k1"), revision_key("k1"));
        assert_ne!(revision_key("k1"), revision_key("k2"));
        assert!(!revision_key("k1").windows(2).any(|w| w == b"k1"));
    }

    #[test]
    fn writes_only_what_differs_and_does_not_loop_on_foreign_fields() {
        let (a, b) = (json!({"connectors": [1]}), json!({"connectors": [2]}));
        let with_extra = json!({"connectors": [1], "extra": true});
        // Already there.
        assert!(!should_write(&a, &a, None));
        // Different, never written: write.
        assert!(should_write(&a, &b, None));
        assert!(should_write(&a, &Value::Null, None));
        // Written, and the object kept a foreign field: not again for the same desired value...
        let last = (a.clone(), with_extra.clone());
        assert!(!should_write(&a, &with_extra, Some(&last)));
        // ...but again when the desired value changes, or someone changes the object.
        assert!(should_write(&b, &with_extra, Some(&last)));
        assert!(should_write(&a, &b, Some(&last)));
    }
}
