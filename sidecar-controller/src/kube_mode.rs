//! Owns API mode: the controller as a Kubernetes controller. Two jobs share one process:
//!
//! - **the source**: reflectors on Connectors and on Secrets of the types the product reads
//!   ([`SECRET_TYPES`], one field-selected watch per type: no other Secret reaches this
//!   process); once the caches have synced and
//!   the cluster identity has been read, every change (bursts coalesced, ~200 ms) becomes new
//!   [`Inputs`] for the hub, with RBAC authorization. A deleted Connector is simply absent from
//!   the next Inputs, which is what makes the proxy refuse it at once.
//! - **the reconciler**: a kube-runtime `Controller` for Connectors, woken by the source's
//!   Secret watches (a Secret change reconciles the connectors naming it; Secrets are watched
//!   once) and following what the pipeline rendered and what Envoy did with it. A reconcile probes the upstream (liveness, login),
//!   writes `status.conditions` and `status.proxy.httpAddress.url` (server-side apply on
//!   `/status`, field manager `connector-controller`), and records one Event per condition transition.
//!
//! No Secret value is ever logged, written to status or put into an Event.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, broadcast, watch};
use tokio::time::Instant;

use crate::authz::AuthzSettings;
use crate::cluster_identity::{self, IdentitySettings};
use crate::conditions::{self, Observed};
use crate::crd::Connector;
use crate::hub::{Authorization, ConnectorKey, Hub, Inputs};
use crate::manifests::{Location, ManifestSet};
use crate::ops::Metrics;
use crate::probe::{self, ProbeError};
use crate::secrets::{Credential, TYPE_BASIC_AUTH, TYPE_DOCKER_CONFIG_JSON, TYPE_REGISTRY_TOKEN};
use crate::sharded::address;

/// The Secret types the controller reads, each watched with a field selector on `type` so that
/// Secrets of other types (service-account tokens, TLS keys, Opaque application Secrets) never
/// reach this process (issue 12.9). A further type is one more entry here: [`SecretCache::get`]
/// looks in every type's cache.
pub const SECRET_TYPES: &[&str] = &[TYPE_REGISTRY_TOKEN, TYPE_BASIC_AUTH, TYPE_DOCKER_CONFIG_JSON];

/// The reflector caches of the [`SECRET_TYPES`], one per type, read as one.
#[derive(Clone)]
pub struct SecretCache {
    stores: Vec<Store<Secret>>,
}

impl SecretCache {
    /// The Secret `namespace/name`, whichever watched type it has.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<Secret>> {
        let key = ObjectRef::new(name).within(namespace);
        self.stores.iter().find_map(|s| s.get(&key))
    }

    /// Waits until every type's cache has synced; `false` when a writer was dropped.
    async fn wait_until_ready(&self) -> bool {
        for s in &self.stores {
            if s.wait_until_ready().await.is_err() {
                return false;
            }
        }
        true
    }
}

/// Field manager of status patches and reporting controller of Events.
pub const MANAGER: &str = "connector-controller";

#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// The proxy's base URL as clients reach it (`http://192.168.1.10:31567`):
    /// `status.proxy.httpAddress.url` is this plus `/namespaces/<ns>/connectors/<name>`.
    pub proxy_url: String,
    /// Accepted ServiceAccount token audiences.
    pub audiences: Vec<String>,
    /// Watch one namespace only; `None` watches all.
    pub namespace: Option<String>,
    /// RBAC checks `get` on `connectors/proxy` instead of `get` on `connectors`.
    pub strict_proxy_subresource: bool,
    /// How often a connector's upstream is probed again (the reconcile requeue).
    pub reprobe_period: Duration,
    /// How often the cluster's issuer and keys are read again.
    pub identity_refresh: Duration,
    /// Unknown-kid notices re-read the keys at most this often.
    pub identity_min_interval: Duration,
    /// Changes closer together than this become one [`Inputs`].
    pub coalesce: Duration,
    /// How long an access decision is cached: allowed, denied.
    pub access_allow_ttl: Duration,
    pub access_deny_ttl: Duration,
    /// The longest an allowed answer is kept for a token whose ServiceAccount or Pod may be
    /// deleted (`--revocation-seconds`).
    pub revocation: Duration,
    /// With several replicas: only the holder of this Lease writes status and Events (every
    /// replica keeps watching and serving its own Envoy). `None`: this replica always writes.
    pub leader_lease: Option<LeaseSettings>,
}

/// A `coordination.k8s.io` Lease that elects the one replica writing status and Events.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This replica's holder identity (the pod name in a Deployment).
    pub identity: String,
    /// How long a holder that stopped renewing keeps the Lease; a new leader within this.
    pub duration: Duration,
}

impl KubeSettings {
    /// Defaults for everything but the proxy URL.
    pub fn new(proxy_url: impl Into<String>) -> Self {
        Self {
            proxy_url: proxy_url.into(),
            audiences: vec!["oci-connector".into()],
            namespace: None,
            strict_proxy_subresource: false,
            reprobe_period: Duration::from_secs(60),
            identity_refresh: Duration::from_secs(300),
            identity_min_interval: Duration::from_secs(30),
            coalesce: Duration::from_millis(200),
            access_allow_ttl: Duration::from_secs(30),
            access_deny_ttl: Duration::from_secs(5),
            revocation: Duration::from_secs(5),
            leader_lease: None,
        }
    }

    /// Settings for [`crate::authz::Authorizer::new`].
    pub fn authz(&self) -> AuthzSettings {
        AuthzSettings {
            strict: self.strict_proxy_subresource,
            allow_ttl: self.access_allow_ttl,
            deny_ttl: self.access_deny_ttl,
            revocation: self.revocation,
        }
    }

    pub fn identity(&self) -> IdentitySettings {
        IdentitySettings {
            audiences: self.audiences.clone(),
            refresh: self.identity_refresh,
            min_interval: self.identity_min_interval,
            ..IdentitySettings::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading Secret {0}: {1}")]
    SecretRead(String, #[source] kube::Error),
    #[error("patching the status of Connector {0}: {1}")]
    StatusPatch(String, #[source] kube::Error),
    #[error("Connector {0} has no namespace")]
    NoNamespace(String),
}

impl Error {
    /// The `reason` label of `reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::SecretRead(..) => "secret_read",
            Error::StatusPatch(..) => "status_patch",
            Error::NoNamespace(_) => "no_namespace",
        }
    }
}

/// Runs API mode until a watch or the controller ends (they retry on their own, so in
/// practice until the process stops).
pub async fn run(client: kube::Client, settings: KubeSettings, hub: Hub) -> anyhow::Result<()> {
    let connectors_api: Api<Connector> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let secrets_api: Api<Secret> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let identity = cluster_identity::spawn(client.clone(), settings.identity(), hub.clone());

    let changed = Arc::new(Notify::new());
    let (connectors, connectors_writer) = reflector::store::<Connector>();
    let connectors_task = tokio::spawn(follow(
        watcher(connectors_api.clone(), watcher::Config::default())
            .default_backoff()
            .reflect(connectors_writer),
        "Connector",
        changed.clone(),
        |_: &watcher::Event<Connector>| {},
    ));
    // The reconciler learns of Secret changes from these same watches (a broadcast of the
    // Connectors naming the changed Secret), so Secrets are listed and watched once.
    let (secret_changes, _) = broadcast::channel::<ObjectRef<Connector>>(1024);
    let mut stores = vec![];
    let mut secret_tasks = vec![];
    for type_ in SECRET_TYPES {
        let (store, writer) = reflector::store::<Secret>();
        stores.push(store);
        let (by_secret, tx) = (connectors.clone(), secret_changes.clone());
        secret_tasks.push(tokio::spawn(follow(
            watcher(
                secrets_api.clone(),
                watcher::Config::default().fields(&format!("type={type_}")),
            )
            .default_backoff()
            .reflect(writer),
            "Secret",
            changed.clone(),
            move |event: &watcher::Event<Secret>| {
                let secret = match event {
                    watcher::Event::Apply(s) | watcher::Event::Delete(s) | watcher::Event::InitApply(s) => s,
                    watcher::Event::Init | watcher::Event::InitDone => return,
                };
                for c in connectors_naming(&by_secret, secret) {
                    // No receiver (no reconciler running, e.g. not the leader) is fine.
                    let _ = tx.send(c);
                }
            },
        )));
    }
    let secrets = SecretCache { stores };
    let secrets_task = futures::future::select_all(secret_tasks);

    let ctx = Arc::new(Ctx {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), Reporter::from(MANAGER)),
        settings: settings.clone(),
        hub: hub.clone(),
        state: Mutex::default(),
    });
    let publisher = tokio::spawn(publish_loop(
        connectors.clone(),
        secrets.clone(),
        identity,
        changed,
        hub.clone(),
        ctx.clone(),
        settings.coalesce,
    ));

    let reconciler_hub = hub.clone();
    let reconciler = move || {
        let (named, lagged) = secret_triggers(secret_changes.subscribe());
        Controller::new(connectors_api.clone(), watcher::Config::default())
            .reconcile_on(named)
            .reconcile_all_on(lagged)
            .reconcile_all_on(proxy_changes(&reconciler_hub))
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "controller");
                }
            })
    };
    let controller = async move {
        match settings.leader_lease.clone() {
            None => {
                reconciler().await;
                anyhow::bail!("the Connector controller stopped")
            }
            Some(lease) => lead(client, lease, reconciler).await,
        }
    };

    tokio::select! {
        r = controller => r,
        r = connectors_task => anyhow::bail!("the Connector watch stopped: {r:?}"),
        (r, _, _) = secrets_task => anyhow::bail!("a Secret watch stopped: {r:?}"),
        r = publisher => anyhow::bail!("the Inputs publisher stopped: {r:?}"),
    }
}

/// Runs the reconciler (status and Events) only while this replica holds the Lease; the
/// election itself is kube-lease-manager's (server-side apply on the Lease, renewed before it
/// expires). Losing the Lease stops the reconciler at once; winning it starts a fresh one, whose
/// first pass re-reads every Connector.
///
/// On SIGTERM (a rolling update, a drained node) the Lease is handed back before the process
/// exits, so the other replica takes over at once instead of waiting out the Lease; only a crash
/// leaves it to expire. Returns `Ok` only then.
async fn lead<F, Fut>(client: kube::Client, lease: LeaseSettings, reconciler: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let secs = lease.duration.as_secs().max(2);
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client, &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(secs)
        .with_grace((secs / 3).max(1))
        .with_field_manager(format!("{MANAGER}-lease"))
        .build()
        .await
        .map_err(|e| anyhow::anyhow!("Lease {}/{}: {e}", lease.namespace, lease.name))?;
    let (mut leading, task) = manager.watch().await;
    let shutdown = crate::serve::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        while !*leading.borrow_and_update() {
            tokio::select! {
                changed = leading.changed() => changed.map_err(|_| anyhow::anyhow!("the Lease manager stopped"))?,
                () = &mut shutdown => return Ok(()),
            }
        }
        tracing::info!(lease = %lease.name, identity = %lease.identity, "holding the Lease: this replica writes status and Events");
        let lost = async {
            while *leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            () = reconciler() => anyhow::bail!("the Connector controller stopped"),
            () = lost => tracing::warn!(lease = %lease.name, "lost the Lease: status and Events left to the new holder"),
            () = &mut shutdown => {
                // Dropping the receiver makes kube-lease-manager release the Lease and end its task.
                drop(leading);
                match tokio::time::timeout(std::time::Duration::from_secs(3), task).await {
                    Ok(Ok(Ok(_))) => tracing::info!(lease = %lease.name, "shutting down: Lease handed back"),
                    Ok(Ok(Err(e))) => tracing::warn!(lease = %lease.name, error = %e, "shutting down: the Lease could not be handed back; it expires"),
                    _ => tracing::warn!(lease = %lease.name, "shutting down: the Lease was not handed back in time; it expires"),
                }
                return Ok(());
            }
        }
    }
}

/// Drives a reflector stream, poking `changed` and calling `on_event` on every event.
async fn follow<K, S>(stream: S, kind: &'static str, changed: Arc<Notify>, on_event: impl Fn(&watcher::Event<K>))
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                on_event(&event);
                changed.notify_one();
            }
            // Logged without the object: a Secret's data must not reach a log line.
            Err(e) => tracing::warn!(kind, error = %e, "watch failed; retrying with backoff"),
        }
    }
}

/// The connectors whose `spec.auth.secretRef.name` names `secret` in its namespace.
fn connectors_naming(connectors: &Store<Connector>, secret: &Secret) -> Vec<ObjectRef<Connector>> {
    let (Some(ns), Some(name)) = (secret.metadata.namespace.as_deref(), secret.metadata.name.as_deref()) else {
        return vec![];
    };
    connectors
        .state()
        .iter()
        .filter(|c| c.metadata.namespace.as_deref() == Some(ns) && c.spec.auth.secret_ref.name == name)
        .map(|c| ObjectRef::from_obj(c.as_ref()))
        .collect()
}

/// The reconcile triggers from the Secret watches: the Connectors to reconcile, and `()` when
/// triggers were lost (the receiver lagged), which reconciles every Connector instead.
fn secret_triggers(
    rx: broadcast::Receiver<ObjectRef<Connector>>,
) -> (
    impl Stream<Item = ObjectRef<Connector>> + Send + 'static,
    impl Stream<Item = ()> + Send + 'static,
) {
    let (lost_tx, lost_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let named = futures::stream::unfold((rx, lost_tx), |(mut rx, lost)| async move {
        loop {
            match rx.recv().await {
                Ok(c) => return Some((c, (rx, lost))),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = lost.send(());
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let lagged = futures::stream::unfold(lost_rx, |mut rx| async move { rx.recv().await.map(|()| ((), rx)) });
    (named, lagged)
}

/// `()` whenever what the pipeline published or Envoy's state changes: ProxyReady follows them.
fn proxy_changes(hub: &Hub) -> impl Stream<Item = ()> + Send + 'static {
    let published = futures::stream::unfold(hub.published(), |mut rx| async move {
        rx.changed().await.ok().map(|()| ((), rx))
    });
    let proxy = futures::stream::unfold(hub.proxy(), |mut rx| async move {
        rx.changed().await.ok().map(|()| ((), rx))
    });
    futures::stream::select(published, proxy)
}

/// The desired state from the caches, kept between events: every Connector, and the Secrets
/// they name (no other Secret leaves the cache). An event costs what it changed (issue 17): each
/// cached object is looked at once (the reflector's store replaces an object's `Arc` when the
/// object changes, so an unchanged one is the same allocation) and only a changed one is copied,
/// digested and put into the set. The digest covers what the pipeline reads, so a status patch
/// (a new resourceVersion, same spec) publishes nothing.
#[derive(Default)]
struct ApiState {
    set: ManifestSet,
    /// namespace → name → what the set holds of the Connector: the store's object it was taken
    /// from (by address), its digest, the Secret it names, and the last event that saw it.
    connectors: HashMap<String, HashMap<String, Seen>>,
    /// namespace → Secret name → the store's object it was taken from (by address; none: named
    /// but not in the cache), its digest, and how many Connectors name it.
    secrets: HashMap<String, HashMap<String, Named>>,
    identity: Option<Value>,
    generation: u64,
}

/// A named Secret: the store's object (by address), its digest, how many Connectors name it.
type Named = (Option<usize>, Option<crate::manifests::Content>, usize);

struct Seen {
    object: usize,
    content: crate::manifests::Content,
    secret: String,
    generation: u64,
}

impl ApiState {
    /// Brings the set up to the caches; whether anything the pipeline reads changed.
    fn update(&mut self, connectors: &Store<Connector>, secrets: &SecretCache, identity: Value) -> bool {
        self.generation += 1;
        let generation = self.generation;
        let mut changed = self.identity.as_ref() != Some(&identity);
        self.identity = Some(identity);
        for c in connectors.state() {
            let ns = c.metadata.namespace.as_deref().unwrap_or_default();
            let name = c.metadata.name.as_deref().unwrap_or_default();
            if let Some(seen) = self.connectors.get_mut(ns).and_then(|m| m.get_mut(name)) {
                seen.generation = generation;
                if seen.object == address(&c) {
                    continue;
                }
                seen.object = address(&c);
            }
            // New or changed in the store: digest what the pipeline reads.
            let bytes = serde_json::to_vec(&(ns, name, &c.spec, &c.metadata.creation_timestamp)).unwrap_or_default();
            let content = crate::manifests::content_of(&bytes);
            let secret = c.spec.auth.secret_ref.name.clone();
            let before = self
                .connectors
                .get(ns)
                .and_then(|m| m.get(name))
                .map(|s| (s.content, s.secret.clone()));
            if before.as_ref().is_some_and(|(d, _)| *d == content) {
                continue;
            }
            changed = true;
            if let Some((_, old_secret)) = before {
                self.unname_secret(ns, &old_secret);
            }
            self.name_secret(ns, &secret);
            let mut stripped = (*c).clone();
            stripped.status = None;
            stripped.metadata.managed_fields = None;
            self.set
                .add_connector(location("Connector", ns, name), stripped, Some(content));
            self.connectors.entry(ns.to_string()).or_default().insert(
                name.to_string(),
                Seen {
                    object: address(&c),
                    content,
                    secret,
                    generation,
                },
            );
        }
        // Connectors gone from the cache.
        let mut gone = vec![];
        for (ns, names) in &mut self.connectors {
            names.retain(|name, seen| {
                let keep = seen.generation == generation;
                if !keep {
                    gone.push((ns.clone(), name.clone(), seen.secret.clone()));
                }
                keep
            });
        }
        self.connectors.retain(|_, names| !names.is_empty());
        for (ns, name, secret) in gone {
            changed = true;
            self.set.remove_connector(&ns, &name);
            self.unname_secret(&ns, &secret);
        }
        // The named Secrets, each looked up once.
        for (ns, names) in &mut self.secrets {
            for (name, (object, content, _)) in names.iter_mut() {
                let now = secrets.get(ns, name);
                if now.as_ref().map(address) == *object {
                    continue;
                }
                *object = now.as_ref().map(address);
                let Some(s) = now else {
                    if content.take().is_some() {
                        changed = true;
                        self.set.remove_secret(ns, name);
                    }
                    continue;
                };
                // The opt-in annotation decides whether the credential may be used at all.
                let allowed = s
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(crate::secrets::ALLOWED_CONNECTORS_ANNOTATION));
                let bytes =
                    serde_json::to_vec(&(&ns, &name, &s.type_, &s.data, &s.string_data, allowed)).unwrap_or_default();
                let digest = crate::manifests::content_of(&bytes);
                if *content == Some(digest) {
                    continue;
                }
                *content = Some(digest);
                changed = true;
                let mut stripped = (*s).clone();
                stripped.metadata.managed_fields = None;
                self.set
                    .add_secret(location("Secret", ns, name), stripped, Some(digest));
            }
        }
        changed
    }

    fn name_secret(&mut self, ns: &str, name: &str) {
        let names = self.secrets.entry(ns.to_string()).or_default();
        names.entry(name.to_string()).or_insert((None, None, 0)).2 += 1;
    }

    /// One Connector fewer names `ns/name`; the last one takes the Secret out of the set.
    fn unname_secret(&mut self, ns: &str, name: &str) {
        let Some(names) = self.secrets.get_mut(ns) else {
            return;
        };
        let last = names.get_mut(name).is_some_and(|(_, _, n)| {
            *n -= 1;
            *n == 0
        });
        if last {
            names.remove(name);
            if names.is_empty() {
                self.secrets.remove(ns);
            }
            self.set.remove_secret(ns, name);
        }
    }

    fn inputs(&self) -> Inputs {
        Inputs {
            set: self.set.clone(),
            identity: self.identity.clone().unwrap_or(Value::Null),
            authorization: Authorization::Controller,
        }
    }
}

/// Where an object came from, for problems the pipeline reports: `Connector demo/registry`.
fn location(kind: &str, namespace: &str, name: &str) -> Location {
    Location {
        file: PathBuf::from(format!("{kind} {namespace}/{name}")),
        index: 0,
    }
}

async fn publish_loop(
    connectors: Store<Connector>,
    secrets: SecretCache,
    mut identity: watch::Receiver<Option<Value>>,
    changed: Arc<Notify>,
    hub: Hub,
    ctx: Arc<Ctx>,
    coalesce: Duration,
) {
    // Nothing is published before both caches synced and the identity was read: a
    // restarting controller must never push an empty or partial set.
    if connectors.wait_until_ready().await.is_err() || !secrets.wait_until_ready().await {
        return;
    }
    if identity.wait_for(Option::is_some).await.is_err() {
        return;
    }
    tracing::info!("Connector and Secret caches synced and cluster identity read; publishing");
    let mut state = ApiState::default();
    loop {
        let current = identity.borrow_and_update().clone().unwrap_or(Value::Null);
        if state.update(&connectors, &secrets, current) {
            let inputs = state.inputs();
            tracing::info!(
                connectors = inputs.set.connector_count(),
                secrets = inputs.set.secret_count(),
                "desired state published"
            );
            hub.publish_inputs(inputs);
        }
        ctx.forget_deleted(&connectors);
        tokio::select! {
            () = changed.notified() => {}
            r = identity.changed() => if r.is_err() { return },
        }
        tokio::time::sleep(coalesce).await;
    }
}

/// What the last probe of a connector found, and for which address and credential.
struct ProbeMemo {
    fingerprint: [u8; 32],
    at: Instant,
    liveness: Result<(), ProbeError>,
    login: Option<Result<(), ProbeError>>,
}

#[derive(Default)]
struct State {
    probes: HashMap<ConnectorKey, ProbeMemo>,
    /// The conditions last written, newer than the cache until the watch catches up.
    written: HashMap<ConnectorKey, Vec<Condition>>,
    ready: HashMap<ConnectorKey, bool>,
    failures: HashMap<ConnectorKey, u32>,
}

struct Ctx {
    client: kube::Client,
    recorder: Recorder,
    settings: KubeSettings,
    hub: Hub,
    state: Mutex<State>,
}

impl Ctx {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn metrics(&self) -> &Metrics {
        &self.hub.metrics
    }

    /// Drops what is remembered about connectors that no longer exist.
    fn forget_deleted(&self, connectors: &Store<Connector>) {
        let present: BTreeSet<ConnectorKey> = connectors
            .state()
            .iter()
            .map(|c| (c.namespace().unwrap_or_default(), c.name_any()))
            .collect();
        let mut st = self.state();
        st.probes.retain(|k, _| present.contains(k));
        st.written.retain(|k, _| present.contains(k));
        st.ready.retain(|k, _| present.contains(k));
        st.failures.retain(|k, _| present.contains(k));
        let ready = st.ready.values().filter(|r| **r).count();
        self.metrics().connectors_ready.set(ready as i64);
    }

    fn set_ready(&self, key: &ConnectorKey, ready: bool) {
        let mut st = self.state();
        st.ready.insert(key.clone(), ready);
        let n = st.ready.values().filter(|r| **r).count();
        self.metrics().connectors_ready.set(n as i64);
    }
}

fn fingerprint(connector: &Connector, credential: Option<&Credential>) -> [u8; 32] {
    let mut d = Sha256::new();
    d.update(connector.spec.address.as_bytes());
    d.update([0]);
    for r in &connector.spec.token_realms {
        d.update(r.url.as_bytes());
        d.update([0]);
    }
    if let Some(c) = credential {
        d.update([1]);
        d.update(c.username.as_bytes());
        d.update([0]);
        d.update(c.password.as_bytes());
    }
    d.finalize().into()
}

/// Probes the upstream, or reuses a probe of the same address and credential younger than
/// half the reprobe period: reconciles triggered by the proxy's state must not hammer the
/// registry, while the periodic requeue always probes afresh.
async fn probes(
    ctx: &Ctx,
    key: &ConnectorKey,
    connector: &Connector,
    credential: Option<&Credential>,
) -> (Result<(), ProbeError>, Option<Result<(), ProbeError>>) {
    let fp = fingerprint(connector, credential);
    if let Some(m) = ctx.state().probes.get(key)
        && m.fingerprint == fp
        && m.at.elapsed() < ctx.settings.reprobe_period / 2
    {
        return (m.liveness.clone(), m.login.clone());
    }
    let address = &connector.spec.address;
    let liveness = probe::liveness(address).await;
    let login = match (&liveness, credential) {
        (Ok(()), Some(c)) => Some(probe::login(address, c, &connector.spec.token_realms).await),
        _ => None,
    };
    ctx.state().probes.insert(
        key.clone(),
        ProbeMemo {
            fingerprint: fp,
            at: Instant::now(),
            liveness: liveness.clone(),
            login: login.clone(),
        },
    );
    (liveness, login)
}

async fn reconcile(connector: Arc<Connector>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.metrics().reconciles.inc();
    let name = connector.name_any();
    let ns = connector.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let key: ConnectorKey = (ns.clone(), name.clone());
    let label = format!("{ns}/{name}");

    // The Secret is read from the API server, not a cache: a reconcile triggered by a Secret
    // change must see that change.
    let secret_name = &connector.spec.auth.secret_ref.name;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret = secrets
        .get_opt(secret_name)
        .await
        .map_err(|e| Error::SecretRead(format!("{ns}/{secret_name}"), e))?;
    let (secret_check, credential) = conditions::secret_check(&connector, secret.as_ref());
    let (liveness, login) = probes(&ctx, &key, &connector, credential.as_ref()).await;
    let liveness_check = conditions::liveness_check(&connector.spec.address, &liveness);
    let auth_check = conditions::auth_check(&secret_check, &liveness_check, login.as_ref());
    let proxy_check = {
        let published = ctx.hub.published().borrow().clone();
        let proxy = ctx.hub.proxy().borrow().clone();
        conditions::proxy_check(&key, published.as_deref(), &proxy)
    };
    let observed = Observed {
        secret: secret_check,
        liveness: liveness_check,
        auth: auth_check,
        proxy: proxy_check,
    };

    let old: Vec<Condition> = ctx.state().written.get(&key).cloned().unwrap_or_else(|| {
        connector
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default()
    });
    let new = conditions::build(
        &old,
        &observed,
        connector.metadata.generation,
        k8s_openapi::jiff::Timestamp::now(),
    );
    let url = conditions::proxy_url(&ctx.settings.proxy_url, &ns, &name);
    let current_url = connector
        .status
        .as_ref()
        .and_then(|s| s.proxy.as_ref())
        .and_then(|p| p.http_address.as_ref())
        .map(|a| a.url.as_str());
    if new != old || current_url != Some(url.as_str()) {
        // Server-side apply under our field manager: the status fields are ours, and a
        // conflicting writer is overridden (`force`) rather than merged with.
        let patch = json!({
            "apiVersion": "connectors.alauda.io/v1alpha1",
            "kind": "Connector",
            "status": {
                "conditions": new,
                "proxy": { "httpAddress": { "url": url } },
            }
        });
        let params = PatchParams::apply(MANAGER).force();
        let connectors: Api<Connector> = Api::namespaced(ctx.client.clone(), &ns);
        connectors
            .patch_status(&name, &params, &Patch::Apply(&patch))
            .await
            .map_err(|e| Error::StatusPatch(label.clone(), e))?;
        ctx.state().written.insert(key.clone(), new.clone());
    }

    let transitions = conditions::transitions(&old, &new);
    if !transitions.is_empty() {
        let reference = connector.object_ref(&());
        for t in &transitions {
            tracing::info!(connector = %label, condition = %t.type_, status = %t.status, reason = %t.reason, "condition changed");
            let event = Event {
                type_: if t.is_normal() {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                reason: t.reason.clone(),
                note: Some(format!("{} is {}: {}", t.type_, t.status, t.message)),
                action: t.type_.clone(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                // An Event is a courtesy; the status is written. Not worth a retry loop.
                tracing::warn!(connector = %label, error = %e, "recording an Event failed");
            }
        }
    }
    ctx.set_ready(&key, conditions::is_ready(&new));
    ctx.state().failures.remove(&key);
    Ok(Action::requeue(ctx.settings.reprobe_period))
}

fn error_policy(connector: Arc<Connector>, error: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics()
        .reason(&ctx.metrics().reconcile_errors, error.metric_label());
    let key = (connector.namespace().unwrap_or_default(), connector.name_any());
    let failures = {
        let mut st = ctx.state();
        let n = st.failures.entry(key).or_default();
        *n = n.saturating_add(1);
        *n
    };
    let backoff = Duration::from_millis(500u64 << failures.min(10)).min(ctx.settings.reprobe_period);
    tracing::warn!(connector = %connector.name_any(), error = %error, ?backoff, "reconcile failed");
    Action::requeue(backoff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector(ns: &str, name: &str, address: &str, secret: &str) -> Connector {
        serde_json::from_value(json!({
            "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": "1"},
            "spec": {"address": address, "auth": {"name": "basicAuth", "secretRef": {"name": secret}},
                "connectorClassName": "oci"},
        }))
        .unwrap()
    }

    fn secret(ns: &str, name: &str, password: &str) -> Secret {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns},
            "type": "kubernetes.io/basic-auth",
            "stringData": {"username": "robot", "password": password},
        }))
        .unwrap()
    }

    fn names(set: &ManifestSet) -> (Vec<String>, Vec<String>) {
        let key = |m: &kube::api::ObjectMeta| {
            format!(
                "{}/{}",
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default()
            )
        };
        (
            set.connectors().map(|(_, c)| key(&c.metadata)).collect(),
            set.secrets().map(|(_, s)| key(&s.metadata)).collect(),
        )
    }

    /// Issue 17, API mode: an event costs what it changed. The set follows the caches (only
    /// named Secrets in it), a status patch publishes nothing, a change copies only its
    /// namespace, and the kept set equals one built from scratch at every step.
    #[test]
    fn the_kept_set_follows_the_caches_and_a_change_touches_its_namespace_only() {
        let (connectors, mut cw) = reflector::store::<Connector>();
        let (secret_store, mut sw) = reflector::store::<Secret>();
        let secrets = SecretCache {
            stores: vec![secret_store],
        };
        let apply_c = |w: &mut reflector::store::Writer<Connector>, c: Connector| {
            w.apply_watcher_event(&watcher::Event::Apply(c));
        };
        let apply_s = |w: &mut reflector::store::Writer<Secret>, s: Secret| {
            w.apply_watcher_event(&watcher::Event::Apply(s));
        };
        apply_c(&mut cw, connector("a", "one", "https://r.example", "creds"));
        apply_c(&mut cw, connector("a", "two", "https://r.example", "creds"));
        apply_c(&mut cw, connector("b", "three", "https://r.example", "other"));
        apply_s(&mut sw, secret("a", "creds", "pw1"));
        apply_s(&mut sw, secret("b", "other", "pw1"));
        apply_s(&mut sw, secret("b", "unrelated", "pw1"));
        let identity = json!({"issuers": ["https://k8s"]});
        let mut state = ApiState::default();
        let fresh = |identity: &Value| {
            let mut s = ApiState::default();
            s.update(&connectors, &secrets, identity.clone());
            names(&s.set)
        };
        assert!(state.update(&connectors, &secrets, identity.clone()));
        assert_eq!(
            names(&state.set),
            (
                vec!["a/one".into(), "a/two".into(), "b/three".into()],
                vec!["a/creds".into(), "b/other".into()]
            )
        );
        assert!(
            !state.update(&connectors, &secrets, identity.clone()),
            "nothing changed"
        );
        // A status patch: a new object in the store, the same spec.
        let mut patched = connector("a", "one", "https://r.example", "creds");
        patched.metadata.resource_version = Some("2".into());
        apply_c(&mut cw, patched);
        assert!(
            !state.update(&connectors, &secrets, identity.clone()),
            "a status patch publishes nothing"
        );
        // A spec change in b: namespace a's objects stay shared.
        let before = state.set.clone();
        apply_c(&mut cw, connector("b", "three", "https://s.example", "other"));
        assert!(state.update(&connectors, &secrets, identity.clone()));
        assert_eq!(state.set.changed_namespaces(&before), BTreeSet::from(["b".to_string()]));
        // A rotation, a deletion that leaves a Secret unnamed, an identity change.
        apply_s(&mut sw, secret("a", "creds", "pw2"));
        assert!(state.update(&connectors, &secrets, identity.clone()));
        let rotated = state
            .set
            .secret("a", "creds")
            .and_then(|s| s.string_data.clone())
            .unwrap();
        assert_eq!(rotated["password"], "pw2");
        cw.apply_watcher_event(&watcher::Event::Delete(connector(
            "b",
            "three",
            "https://s.example",
            "other",
        )));
        assert!(state.update(&connectors, &secrets, identity.clone()));
        assert_eq!(
            names(&state.set),
            (vec!["a/one".into(), "a/two".into()], vec!["a/creds".into()])
        );
        assert_eq!(names(&state.set), fresh(&identity));
        let other = json!({"issuers": ["https://other"]});
        assert!(state.update(&connectors, &secrets, other.clone()));
        assert_eq!(state.inputs().identity, other);
        // The Secret of a connector whose Secret is missing comes when it is created.
        apply_c(&mut cw, connector("c", "four", "https://r.example", "later"));
        assert!(state.update(&connectors, &secrets, other.clone()));
        assert!(state.set.secret("c", "later").is_none());
        apply_s(&mut sw, secret("c", "later", "pw"));
        assert!(state.update(&connectors, &secrets, other.clone()));
        assert!(state.set.secret("c", "later").is_some());
        assert_eq!(names(&state.set), fresh(&other));
    }
}
