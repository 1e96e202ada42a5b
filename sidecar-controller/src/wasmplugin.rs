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

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::render::UpstreamCluster;
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
/// snapshot's version (Istio mode's `ProxyReady`, see `istio`) and `held` its clusters (whose
/// upstream objects `istio::run` keeps until a newer configuration is held).
pub async fn run(
    target: Target,
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    held: watch::Sender<Option<Arc<Vec<UpstreamCluster>>>>,
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
    // The latest snapshot, and its version and configuration; its clusters are told to the
    // upstreams' task (`held`) once the WasmPlugin holds that configuration.
    let mut snapshot = snapshots.borrow_and_update().clone();
    let (mut version, mut desired) = parse(snapshot.as_ref()).unzip();
    // The version the WasmPlugin was last seen holding.
    let mut reported = None;
    let mut view = View::default();
    let mut last: Option<(Value, Value)> = None;
    // The configuration the API server refused as too large: not sent again until it changes.
    // Meanwhile the last one written is what the WasmPlugin is kept at (a re-applied
    // placeholder would otherwise leave the gateway with no connector at all).
    let mut refused: Option<Value> = None;
    let mut last_good: Option<Value> = None;
    let mut backoff = Duration::from_millis(500);
    loop {
        if let (Some(v), Some(want), Some((_, current))) = (version, &desired, &view.observed)
            && want == current
            && reported != Some(v)
        {
            progress.plugin_config(v);
            reported = Some(v);
            held.send_replace(snapshot.as_ref().map(|s| s.clusters.clone()));
        }
        let goal = if refused.is_some() && refused == desired {
            last_good.as_ref()
        } else {
            desired.as_ref()
        };
        let mut refusal = None;
        if let (Some(want), Some((rv, current))) = (goal, &view.observed)
            && should_write(want, current, last.as_ref())
        {
            match write(&api, &target, want, rv).await {
                Ok(after) => {
                    progress.plugin_write("written");
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
                    last_good = Some(want.clone());
                    view.wrote(after);
                    // Round again: the version just written is reported before a newer
                    // snapshot is taken in (otherwise it never is, and a refusal would name
                    // an older version as the one kept).
                    continue;
                }
                Err(e) => {
                    let too_large = too_large(&e);
                    progress.plugin_write(if too_large.is_some() { "too_large" } else { "failed" });
                    if let Some(why) = too_large {
                        // Sending the same bytes again cannot help: wait for the configuration
                        // to change, and keep the WasmPlugin at the last one written.
                        let bytes = serde_json::to_vec(want).map_or(0, |b| b.len());
                        let connectors = want["connectors"].as_array().map_or(0, Vec::len);
                        // The snapshot's configuration, or (the limit lowered since) the last
                        // one written, put back over someone else's edit: only the snapshot's
                        // refusal is what the Connectors' ProxyReady reports.
                        let latest = desired.as_ref() == Some(want);
                        let refused_version = if latest { version } else { reported }.unwrap_or(0);
                        let message = refused_message(refused_version, connectors, bytes, &why, reported);
                        tracing::error!(wasmplugin = %label, connectors, bytes, "{message}");
                        if latest {
                            progress.plugin_refused(refused_version, message);
                        }
                        refusal = Some((want.clone(), last_good.as_ref() == Some(want)));
                    } else {
                        tracing::warn!(wasmplugin = %label, error = %e, ?backoff, "writing the WasmPlugin's pluginConfig failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        // A stale resourceVersion is the usual cause. Read the object afresh
                        // rather than wait for the watch: a WasmPlugin of a megabyte takes the
                        // watch many polls to deliver, and this loop polls it only between writes.
                        match api.get_opt(&target.name).await {
                            Ok(o) => view.read(o.as_ref().and_then(seen)),
                            Err(e) => tracing::warn!(wasmplugin = %label, error = %e, "reading the WasmPlugin failed"),
                        }
                        continue;
                    }
                }
            }
        }
        if let Some((config, was_last_good)) = refusal {
            if was_last_good {
                last_good = None;
            }
            refused = Some(config);
            continue;
        }
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                snapshot = snapshots.borrow_and_update().clone();
                (version, desired) = parse(snapshot.as_ref()).unzip();
            }
            event = events.next() => match event {
                Some(event) => view.event(event, &label),
                None => return,
            },
        }
    }
}

/// Why the API server refused to store a write, when the reason is its size: kube-apiserver's
/// own request limit (413, 3 MiB) or etcd's (`--max-request-bytes`, 1.5 MiB by default, which
/// the API server passes on as a 500 "etcdserver: request is too large").
pub fn too_large(e: &kube::Error) -> Option<String> {
    match e {
        kube::Error::Api(s) if s.code == 413 || s.message.contains("request is too large") => Some(s.message.clone()),
        _ => None,
    }
}

/// The log line and `ProxyReady` message of a configuration refused as too large.
pub fn refused_message(version: u64, connectors: usize, bytes: usize, why: &str, kept: Option<u64>) -> String {
    let kept = match kept {
        Some(v) => format!("the WasmPlugin keeps configuration version {v}, which istiod goes on delivering"),
        None => "the WasmPlugin keeps what it held".to_string(),
    };
    format!(
        "configuration version {version} ({connectors} connectors, {bytes} bytes of pluginConfig) is too large for the WasmPlugin: the API server refused to store it ({why}); {kept}. A WasmPlugin is stored in etcd, which refuses requests over its --max-request-bytes (1.5 MiB by default): remove connectors, or split them over gateways, each with a controller of its own (--namespace)"
    )
}

/// What is known of the WasmPlugin: the object as last seen, from a write's answer, a read or
/// the watch. Watch events can trail a write's answer (the write was awaited while they
/// queued): until the event of the controller's own write arrives, the events before it are
/// older than what the write answered, and are skipped, so the view never goes back to a
/// resourceVersion the next conditional write would be refused for.
#[derive(Debug, Default)]
struct View {
    observed: Option<Seen>,
    /// The resourceVersion whose event ends the skipping.
    awaiting: Option<String>,
    /// The initial list (or a re-list) delivered the object.
    listed: bool,
}

impl View {
    fn wrote(&mut self, after: Seen) {
        self.awaiting = Some(after.0.clone());
        self.observed = Some(after);
    }

    /// A fresh read: the object as it is now, or gone. If the view was older, the events
    /// up to what was read are still to come, and are skipped.
    fn read(&mut self, now: Option<Seen>) {
        let older = match (&self.observed, &now) {
            (Some((seen_rv, _)), Some((rv, _))) => seen_rv != rv,
            _ => false,
        };
        self.awaiting = if older {
            now.as_ref().map(|(rv, _)| rv.clone())
        } else {
            None
        };
        self.observed = now;
    }

    /// Folds one watch event into the view.
    fn event(&mut self, event: Result<watcher::Event<DynamicObject>, watcher::Error>, label: &str) {
        match event {
            Ok(watcher::Event::Apply(o)) => {
                let now = seen(&o);
                if let Some(awaiting) = &self.awaiting {
                    if now.as_ref().is_none_or(|(rv, _)| rv != awaiting) {
                        return;
                    }
                    self.awaiting = None;
                }
                self.observed = now;
            }
            // Before the awaited event, a deletion is one the controller's write came after.
            Ok(watcher::Event::Delete(_)) if self.awaiting.is_some() => {}
            Ok(watcher::Event::Delete(_)) => {
                tracing::warn!(wasmplugin = %label, "the WasmPlugin was deleted; waiting for it to come back");
                self.observed = None;
            }
            Ok(watcher::Event::Init) => self.listed = false,
            // A list is as new as anything written before it.
            Ok(watcher::Event::InitApply(o)) => {
                self.listed = true;
                self.awaiting = None;
                self.observed = seen(&o);
            }
            Ok(watcher::Event::InitDone) => {
                if !self.listed {
                    tracing::warn!(wasmplugin = %label, "no such WasmPlugin (kubectl apply -k deploy/istio creates it); waiting for it");
                    self.awaiting = None;
                    self.observed = None;
                }
            }
            Err(e) => {
                tracing::warn!(wasmplugin = %label, error = %e, "watching the WasmPlugin failed; retrying with backoff")
            }
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

    fn object(rv: &str, connectors: u32) -> DynamicObject {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(GROUP, VERSION, KIND));
        let mut o = DynamicObject::new("oci-connector", &resource)
            .data(json!({"spec": {"pluginConfig": {"connectors": connectors}}}));
        o.metadata.resource_version = Some(rv.into());
        o
    }

    fn rv(view: &View) -> Option<&str> {
        view.observed.as_ref().map(|(rv, _)| rv.as_str())
    }

    #[test]
    fn events_older_than_the_controllers_own_write_do_not_take_the_view_back() {
        let mut v = View::default();
        v.event(Ok(watcher::Event::Init), "t");
        v.event(Ok(watcher::Event::InitApply(object("3", 0))), "t");
        v.event(Ok(watcher::Event::InitDone), "t");
        assert_eq!(rv(&v), Some("3"));
        // Two writes answered before the watch delivered either.
        v.wrote(seen(&object("4", 1)).unwrap());
        v.wrote(seen(&object("5", 2)).unwrap());
        // The first write's event, then a deletion older than the second write: skipped.
        v.event(Ok(watcher::Event::Apply(object("4", 1))), "t");
        assert_eq!(rv(&v), Some("5"));
        v.event(Ok(watcher::Event::Delete(object("4", 1))), "t");
        assert_eq!(rv(&v), Some("5"));
        // The own write's event ends the skipping: what follows is newer.
        v.event(Ok(watcher::Event::Apply(object("5", 2))), "t");
        v.event(Ok(watcher::Event::Apply(object("6", 9))), "t");
        assert_eq!(v.observed, seen(&object("6", 9)));
        v.event(Ok(watcher::Event::Delete(object("7", 9))), "t");
        assert_eq!(v.observed, None);
    }

    #[test]
    fn a_fresh_read_skips_the_events_it_is_ahead_of_and_a_relist_ends_any_skipping() {
        let mut v = View::default();
        v.event(Ok(watcher::Event::Apply(object("4", 1))), "t");
        // Read at the same version: nothing to skip.
        v.read(seen(&object("4", 1)));
        v.event(Ok(watcher::Event::Apply(object("5", 2))), "t");
        assert_eq!(rv(&v), Some("5"));
        // Read ahead of the watch: the events up to it are skipped.
        v.read(seen(&object("8", 3)));
        v.event(Ok(watcher::Event::Apply(object("6", 2))), "t");
        v.event(Ok(watcher::Event::Apply(object("7", 2))), "t");
        assert_eq!(rv(&v), Some("8"));
        // A re-list is current whatever was awaited.
        v.wrote(seen(&object("9", 4)).unwrap());
        v.event(Ok(watcher::Event::Init), "t");
        v.event(Ok(watcher::Event::InitApply(object("11", 5))), "t");
        v.event(Ok(watcher::Event::InitDone), "t");
        v.event(Ok(watcher::Event::Apply(object("12", 6))), "t");
        assert_eq!(rv(&v), Some("12"));
        // Read gone.
        v.read(None);
        assert_eq!(v.observed, None);
        v.event(Ok(watcher::Event::Apply(object("13", 6))), "t");
        assert_eq!(rv(&v), Some("13"));
    }

    #[test]
    fn refusals_for_size_are_told_apart_from_conflicts() {
        let status = |code: u16, message: &str| {
            kube::Error::Api(
                kube::core::Status {
                    code,
                    message: message.into(),
                    ..kube::core::Status::default()
                }
                .boxed(),
            )
        };
        assert_eq!(
            too_large(&status(500, "etcdserver: request is too large")).as_deref(),
            Some("etcdserver: request is too large")
        );
        assert!(too_large(&status(413, "Request entity too large: limit is 3145728")).is_some());
        assert_eq!(too_large(&status(409, "the object has been modified")), None);
        assert_eq!(too_large(&status(500, "etcdserver: leader changed")), None);
        let m = refused_message(7, 7, 1_900_000, "etcdserver: request is too large", Some(6));
        for part in [
            "version 7",
            "7 connectors",
            "1900000 bytes",
            "etcdserver: request is too large",
            "keeps configuration version 6",
            "--max-request-bytes",
        ] {
            assert!(m.contains(part), "{part}: {m}");
        }
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
