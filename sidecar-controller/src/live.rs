//! Owns the live rendering as standing state that each change updates in place (issue 17: a
//! change costs what it changes). [`LiveRender::update`] takes the latest [`Inputs`] and
//! gives what the xDS server and the credential channel need, with the same result as
//! rendering everything from scratch (`pipeline::render_live`, which is this run on an empty
//! state).
//!
//! Per change:
//! - every connector is looked at once, to notice which ones changed: two map lookups by
//!   borrowed names and a pointer comparison each (file mode shares unchanged objects between
//!   sets; otherwise the content digests decide). Nothing is copied, hashed or rendered for an
//!   unchanged connector;
//! - a changed connector's part is rendered again (`pipeline::render_part`);
//! - conflicts (two connectors claiming one host name, or one cluster name for two origins)
//!   are settled again only among the connectors that share a contested name with a changed
//!   one, oldest first, exactly as a full render settles them;
//! - the outputs are kept up to date by what changed: the served entries (each serialized
//!   once, when rendered), the clusters in use (counted), and the per-namespace maps of what
//!   is served, left out and its credentials ([`ByNamespace`]: a published copy shares them).
//!
//! What stays linear in N: copying the served entries' JSON into the one ECDS resource
//! sent to Envoy (module `runs`: a change joins again only the runs it touched,
//! and the document is the runs' texts, shared; an update that changes nothing in the
//! document gives the last one).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use connector_core::config::{AccessMode, ChannelConfig, FilterConfig};

use crate::crd::Connector;
use crate::document::Document;
use crate::hub::{Authorization, ConnectorKey, Inputs};
use crate::manifests::{Location, Problem};
use crate::pipeline::{ChannelSettings, Part, PartKey, Revisions, Tenancy, render_part};
use crate::render::{UpstreamCluster, add_cluster, locate};
use crate::runs::Runs;
use crate::secrets::Credential;
use crate::sharded::{ByNamespace, address};

/// The order conflicts are settled in: oldest first (creation time, then namespace and name);
/// without a creation time (file mode), where the connector was defined (file, then document).
/// Shared: the state holds it in several indexes (one copy of the names per connector).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Order(Arc<OrderKey>);

#[derive(Debug, PartialEq, Eq)]
struct OrderKey {
    created: Option<(Time, String, String)>,
    file: PathBuf,
    index: usize,
    key: ConnectorKey,
}

/// Field by field, the file by its bytes: a cold start at 20,000 connectors spent a quarter of
/// its serial render comparing paths component by component in the ordered sets. The same
/// order here: file mode's files are the entries of one directory (one prefix, then a name
/// with no `/`), and in API mode every Connector has a creation time (the API server sets it),
/// so the file decides only between equal creation times, namespaces and names: never.
impl Ord for OrderKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.created
            .cmp(&other.created)
            .then_with(|| {
                let (a, b) = (self.file.as_os_str(), other.file.as_os_str());
                a.as_encoded_bytes().cmp(b.as_encoded_bytes())
            })
            .then_with(|| self.index.cmp(&other.index))
            .then_with(|| self.key.cmp(&other.key))
    }
}

impl PartialOrd for OrderKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::ops::Deref for Order {
    type Target = OrderKey;
    fn deref(&self) -> &OrderKey {
        &self.0
    }
}

impl Order {
    fn of(at: &Location, c: &Connector, key: &ConnectorKey) -> Self {
        Self(Arc::new(OrderKey {
            created: c
                .metadata
                .creation_timestamp
                .clone()
                .map(|t| (t, key.0.clone(), key.1.clone())),
            file: at.file.clone(),
            index: at.index,
            key: key.clone(),
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Not settled yet (a new or changed connector).
    Pending,
    Served,
    LeftOut,
}

/// One connector as the state knows it.
struct Slot {
    order: Order,
    at: Location,
    /// What the part was rendered from: the objects themselves (compared by address) and their
    /// content digests when the source gave them.
    connector: Arc<Connector>,
    secret: Option<Arc<Secret>>,
    digests: Option<PartKey>,
    part: Arc<Part>,
    outcome: Outcome,
    seen: u64,
}

/// A cluster name's claims, by the origin each claimant wants it for. More than one origin
/// means the claimants contend for the name.
type ClusterClaims = Vec<(UpstreamCluster, BTreeSet<Order>)>;

/// How a connector came out of settling: served with its part, or left out with why.
type Settled = Result<Arc<Part>, Vec<Problem>>;

/// What one [`LiveRender::update`] gives.
pub struct LiveOutput {
    /// The filter configuration document (JSON), connectors in settling order; the last
    /// update's own `Arc` when nothing in it changed (the pipeline compares by address).
    pub config_json: Arc<Document>,
    /// With `--config-parts`: the parts `config_json` lists, by id, each with its text (what the
    /// channel serves); empty otherwise.
    pub parts: Arc<Vec<(Arc<str>, Arc<str>)>>,
    /// The clusters the served connectors use, by name; the same `Arc` while they do not change.
    pub clusters: Arc<Vec<UpstreamCluster>>,
    /// Each served connector's credential and its revision.
    pub credentials: ByNamespace<(Credential, String)>,
    pub connectors: ByNamespace<()>,
    pub left_out: ByNamespace<Vec<Problem>>,
    /// Connectors left out by this update, or left out for other reasons than before.
    pub newly_left_out: Vec<(ConnectorKey, Vec<Problem>)>,
    /// Connectors whose part was rendered (not reused) by this update.
    pub rendered: usize,
    /// Connectors whose conflicts were settled again by this update.
    pub settled: usize,
}

/// The standing state (see the module docs). Valid for one [`Revisions`] key and one
/// [`Tenancy`]: the pipeline keeps one for its lifetime.
#[derive(Default)]
pub struct LiveRender {
    slots: HashMap<String, HashMap<String, Slot>>,
    generation: u64,
    host_claims: HashMap<String, BTreeSet<Order>>,
    cluster_claims: HashMap<String, ClusterClaims>,
    /// Served parts in settling order, in runs whose joined JSON is kept (module `runs`).
    served: Runs<Order, Arc<Part>>,
    /// Clusters of served connectors: name → (cluster, how many served connectors use it).
    used_clusters: BTreeMap<String, (UpstreamCluster, usize)>,
    clusters: Arc<Vec<UpstreamCluster>>,
    credentials: ByNamespace<(Credential, String)>,
    connectors: ByNamespace<()>,
    left_out: ByNamespace<Vec<Problem>>,
    /// The document's settings at the last update that was fine (`connectors` empty); `None`
    /// before the first.
    settings: Option<FilterConfig>,
    /// The last document, and its settings' JSON: given again while neither changes.
    document: Arc<Document>,
    head: String,
    /// The parts the last document lists (empty when it was inline).
    parts: Arc<Vec<(Arc<str>, Arc<str>)>>,
    /// Whether the last document listed parts ([`crate::pipeline::Delivery`]).
    in_parts: bool,
    /// The objects the last update saw (shared with its inputs, not copied).
    last_set: Option<crate::manifests::ManifestSet>,
    /// A cold start's parts, rendered on every core, by the Connector's address.
    prerendered: HashMap<usize, Arc<Part>>,
}

/// Every connector's part, rendered on as many threads as there are cores: a cold start at
/// 20,000 connectors spent a second rendering them one by one.
fn render_all(inputs: &Inputs, revisions: &Revisions, tenancy: &Tenancy) -> HashMap<usize, Arc<Part>> {
    let all: Vec<(&Location, &Arc<Connector>)> = inputs.set.connectors().collect();
    let threads = std::thread::available_parallelism().map_or(1, usize::from).min(8);
    if threads < 2 || all.len() < 256 {
        return HashMap::new();
    }
    let render = |part: &[(&Location, &Arc<Connector>)]| -> Vec<(usize, Arc<Part>)> {
        part.iter()
            .map(|(at, c)| {
                let key = (
                    c.metadata.namespace.clone().unwrap_or_default(),
                    c.metadata.name.clone().unwrap_or_default(),
                );
                (
                    address(c),
                    Arc::new(render_part(at, c, &key, inputs, revisions, tenancy)),
                )
            })
            .collect()
    };
    std::thread::scope(|scope| {
        let workers: Vec<_> = all
            .chunks(all.len().div_ceil(threads))
            .map(|part| scope.spawn(move || render(part)))
            .collect();
        // A worker that panicked rendered nothing: those parts are rendered one by one later.
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
    })
}

fn served_parts(part: &Part) -> Option<(&[UpstreamCluster], &[String])> {
    match part {
        Part::Served { clusters, hosts, .. } => Some((clusters, hosts)),
        Part::LeftOut(_) => None,
    }
}

impl LiveRender {
    fn slot(&self, key: &ConnectorKey) -> Option<&Slot> {
        self.slots.get(&key.0)?.get(&key.1)
    }

    fn slot_mut(&mut self, key: &ConnectorKey) -> Option<&mut Slot> {
        self.slots.get_mut(&key.0)?.get_mut(&key.1)
    }

    /// Brings the state to `inputs` and gives the outputs. `Err` only for problems of the
    /// whole (the identity settings): the state still follows `inputs`, and the next update
    /// that is fine gives the outputs for its inputs.
    pub fn update(
        &mut self,
        inputs: &Inputs,
        channel: &ChannelSettings,
        revisions: &Revisions,
        tenancy: &Tenancy,
    ) -> Result<LiveOutput, Vec<Problem>> {
        self.generation += 1;
        let generation = self.generation;
        // 1. Which connectors changed, appeared or went: in the namespaces whose objects are
        // not the ones the last update saw (file mode shares unchanged namespaces' objects from
        // one set to the next); all of them on the first update, or from a source that builds
        // a new set every time.
        let namespaces: Option<BTreeSet<String>> =
            self.last_set.as_ref().map(|last| inputs.set.changed_namespaces(last));
        let mut changed: Vec<(ConnectorKey, Option<Slot>)> = vec![];
        let mut rendered = 0;
        match &namespaces {
            Some(namespaces) => {
                for ns in namespaces {
                    for (at, c) in inputs.set.connectors_in(ns) {
                        self.notice(at, c, inputs, revisions, tenancy, &mut changed, &mut rendered);
                    }
                }
            }
            None => {
                if self.slots.is_empty() {
                    self.prerendered = render_all(inputs, revisions, tenancy);
                }
                for (at, c) in inputs.set.connectors() {
                    self.notice(at, c, inputs, revisions, tenancy, &mut changed, &mut rendered);
                }
            }
        }
        for (ns, names) in &mut self.slots {
            if namespaces.as_ref().is_some_and(|n| !n.contains(ns)) {
                continue;
            }
            let gone: Vec<String> = names
                .iter()
                .filter(|(_, s)| s.seen != generation)
                .map(|(n, _)| n.clone())
                .collect();
            for name in gone {
                let old = names.remove(&name);
                changed.push(((ns.clone(), name), old));
            }
        }
        self.slots.retain(|_, names| !names.is_empty());
        self.prerendered.clear();
        self.last_set = Some(inputs.set.clone());

        // 2. Claims: the changed connectors' old claims go, their new ones come; whoever shares
        // a contested name with them is settled again.
        let mut newly_left_out = vec![];
        let mut affected: BTreeSet<Order> = BTreeSet::new();
        let mut touched_hosts: BTreeSet<String> = BTreeSet::new();
        let mut touched_clusters: BTreeMap<String, bool> = BTreeMap::new();
        for (key, old) in &changed {
            if let Some(old) = old {
                self.withdraw(old.outcome, &old.order, &old.part);
                if let Some((clusters, hosts)) = served_parts(&old.part) {
                    for h in hosts {
                        unclaim(&mut self.host_claims, h, &old.order);
                        touched_hosts.insert(h.clone());
                    }
                    for cl in clusters {
                        let contested = self.cluster_claims.get(&cl.name).is_some_and(|c| c.len() > 1);
                        *touched_clusters.entry(cl.name.clone()).or_default() |= contested;
                        unclaim_cluster(&mut self.cluster_claims, cl, &old.order);
                    }
                }
            }
            let Some(slot) = self.slot(key) else {
                continue;
            };
            let (order, part) = (slot.order.clone(), Arc::clone(&slot.part));
            if let Some((clusters, hosts)) = served_parts(&part) {
                for h in hosts {
                    self.host_claims.entry(h.clone()).or_default().insert(order.clone());
                    touched_hosts.insert(h.clone());
                }
                for cl in clusters {
                    let claims = self.cluster_claims.entry(cl.name.clone()).or_default();
                    match claims.iter_mut().find(|(c, _)| c == cl) {
                        Some((_, who)) => {
                            who.insert(order.clone());
                        }
                        None => claims.push((cl.clone(), BTreeSet::from([order.clone()]))),
                    }
                    touched_clusters.entry(cl.name.clone()).or_default();
                }
            }
            affected.insert(order);
        }
        for h in &touched_hosts {
            if let Some(who) = self.host_claims.get(h) {
                affected.extend(who.iter().cloned());
            }
        }
        for (name, contested_before) in &touched_clusters {
            if let Some(claims) = self.cluster_claims.get(name)
                && (*contested_before || claims.len() > 1)
            {
                affected.extend(claims.iter().flat_map(|(_, who)| who.iter().cloned()));
            }
        }
        self.close_over_contests(&mut affected);

        // 3. Settle the affected connectors among themselves, oldest first, as a full render
        // does: cluster names first, then host names among those still in.
        let settled = affected.len();
        let mut taken_clusters: BTreeMap<String, (UpstreamCluster, String)> = BTreeMap::new();
        let mut in_after_clusters: Vec<(Order, Arc<Part>)> = vec![];
        let mut outcomes: Vec<(Order, Settled)> = vec![];
        for order in &affected {
            let Some(slot) = self.slot(&order.key) else {
                continue;
            };
            let part = Arc::clone(&slot.part);
            let Some((own, _)) = served_parts(&part) else {
                if let Part::LeftOut(problems) = &*part {
                    outcomes.push((order.clone(), Err(problems.clone())));
                }
                continue;
            };
            let mut problems = vec![];
            let mut added = vec![];
            for cl in own {
                let new = !taken_clusters.contains_key(&cl.name);
                add_cluster(&mut taken_clusters, cl.clone(), &slot.at, "spec", &mut problems);
                if new && taken_clusters.contains_key(&cl.name) {
                    added.push(cl.name.clone());
                }
            }
            if problems.is_empty() {
                in_after_clusters.push((order.clone(), part));
            } else {
                for name in added {
                    taken_clusters.remove(&name);
                }
                outcomes.push((order.clone(), Err(problems)));
            }
        }
        let mut taken_hosts: BTreeSet<&str> = BTreeSet::new();
        for (order, part) in &in_after_clusters {
            let hosts = served_parts(part).map(|(_, h)| h).unwrap_or_default();
            let taken: Vec<&String> = hosts.iter().filter(|h| taken_hosts.contains(h.as_str())).collect();
            if taken.is_empty() {
                taken_hosts.extend(hosts.iter().map(String::as_str));
                outcomes.push((order.clone(), Ok(Arc::clone(part))));
            } else {
                let at = self.slot(&order.key).map(|s| s.at.clone());
                let at = at.as_ref().map(ToString::to_string).unwrap_or_default();
                let problems = taken
                    .into_iter()
                    .map(|h| {
                        Problem::new(
                            &at,
                            "spec.hosts",
                            format!("host {h:?} is already used by another connector"),
                        )
                    })
                    .collect();
                outcomes.push((order.clone(), Err(problems)));
            }
        }

        // 4. The outputs follow the new outcomes.
        for (order, outcome) in outcomes {
            let Some(slot) = self.slot(&order.key) else {
                continue;
            };
            let (was, part) = (slot.outcome, Arc::clone(&slot.part));
            let previous = self.withdraw(was, &order, &part);
            let now = match outcome {
                Ok(part) => {
                    self.serve(&order, part);
                    Outcome::Served
                }
                Err(problems) => {
                    if previous.as_ref() != Some(&problems) {
                        newly_left_out.push((order.key.clone(), problems.clone()));
                    }
                    self.left_out.insert(&order.key.0, &order.key.1, problems);
                    Outcome::LeftOut
                }
            };
            if let Some(slot) = self.slot_mut(&order.key) {
                slot.outcome = now;
            }
        }

        // 5. The document: the settings as the filter checks them, then the served entries.
        let (identity, mut errors) = connector_core::config::read_identity(&inputs.identity);
        let settings = FilterConfig {
            identity,
            controller: Some(ChannelConfig {
                cluster: channel.cluster.clone(),
                authority: None,
                key_env: channel.key_env.clone(),
            }),
            authorization: match inputs.authorization {
                Authorization::Rules => AccessMode::Rules,
                Authorization::Controller => AccessMode::Controller,
            },
            ..FilterConfig::default()
        };
        // The checks depend on the settings alone, and the last update that was fine passed
        // them: building its RSA keys again was 5 % of a change's controller CPU at 20,000.
        if !(errors.is_empty() && self.settings.as_ref() == Some(&settings)) {
            connector_core::config::merge(&mut errors, connector_core::config::check_settings(&settings));
            connector_core::config::merge(&mut errors, connector_core::keys::check_keys(&settings.identity));
        }
        if !errors.is_empty() {
            return Err(errors.into_iter().map(|e| locate(e, &[], "identity")).collect());
        }
        let in_parts = channel.delivery.in_parts(self.in_parts, self.connectors.len());
        if in_parts != self.in_parts && !self.document.is_empty() {
            tracing::info!(
                served = self.connectors.len(),
                delivery = if in_parts { "parts" } else { "inline" },
                "the filter configuration's delivery changes"
            );
        }
        let config_json = self.document(&settings, in_parts);
        self.settings = Some(settings);
        Ok(LiveOutput {
            config_json,
            parts: Arc::clone(&self.parts),
            clusters: Arc::clone(&self.clusters),
            credentials: self.credentials.clone(),
            connectors: self.connectors.clone(),
            left_out: self.left_out.clone(),
            newly_left_out,
            rendered,
            settled,
        })
    }

    /// Looks at one connector of `inputs`: marks its slot seen if its part still holds, or
    /// renders it (or reuses a served part that only moved) and records the change.
    #[allow(clippy::too_many_arguments)]
    fn notice(
        &mut self,
        at: &Location,
        c: &Arc<Connector>,
        inputs: &Inputs,
        revisions: &Revisions,
        tenancy: &Tenancy,
        changed: &mut Vec<(ConnectorKey, Option<Slot>)>,
        rendered: &mut usize,
    ) {
        let generation = self.generation;
        let ns = c.metadata.namespace.as_deref().unwrap_or_default();
        let name = c.metadata.name.as_deref().unwrap_or_default();
        let secret_name = &c.spec.auth.secret_ref.name;
        let secret = inputs.set.shared_secret(ns, secret_name);
        let digests = inputs
            .set
            .connector_content(ns, name)
            .map(|d| (d, inputs.set.secret_content(ns, secret_name)));
        // A part rendered from the same objects (or the same content) is kept. A served part
        // does not depend on where its Connector was defined, only its order does: moved
        // within its file, it is settled again but not rendered again.
        let mut reusable = None;
        if let Some(slot) = self.slots.get_mut(ns).and_then(|m| m.get_mut(name)) {
            let same_objects = Arc::ptr_eq(&slot.connector, c)
                && match (&slot.secret, secret) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                };
            let same_content = digests.is_some() && slot.digests == digests;
            if same_objects || same_content {
                if slot.at == *at {
                    slot.seen = generation;
                    if !same_objects {
                        // Same content in new objects (API mode): compare by address next time.
                        slot.connector = Arc::clone(c);
                        slot.secret = secret.cloned();
                    }
                    return;
                }
                if matches!(*slot.part, Part::Served { .. }) {
                    reusable = Some(Arc::clone(&slot.part));
                }
            }
        }
        let key: ConnectorKey = (ns.to_string(), name.to_string());
        let prerendered = self.prerendered.remove(&address(c));
        let part = reusable.unwrap_or_else(|| {
            *rendered += 1;
            prerendered.unwrap_or_else(|| Arc::new(render_part(at, c, &key, inputs, revisions, tenancy)))
        });
        let slot = Slot {
            order: Order::of(at, c, &key),
            at: at.clone(),
            connector: Arc::clone(c),
            secret: secret.cloned(),
            digests,
            part,
            outcome: Outcome::Pending,
            seen: generation,
        };
        let old = self.slots.entry(key.0.clone()).or_default().insert(key.1.clone(), slot);
        changed.push((key, old));
    }

    /// The whole configuration document as a typed value, served entries copied in (for
    /// `pipeline::render_live` and Istio mode's renaming, which work on the whole).
    pub fn filter_config(&self) -> FilterConfig {
        let mut doc = self.settings.clone().unwrap_or_default();
        doc.connectors = self
            .served
            .values()
            .filter_map(|p| match &**p {
                Part::Served { entry, .. } => Some((**entry).clone()),
                Part::LeftOut(_) => None,
            })
            .collect();
        doc
    }

    /// Adds whoever contends for a name with a connector in `affected`, until nobody new comes.
    fn close_over_contests(&self, affected: &mut BTreeSet<Order>) {
        let mut queue: Vec<Order> = affected.iter().cloned().collect();
        while let Some(order) = queue.pop() {
            let Some(part) = self.slot(&order.key).map(|s| Arc::clone(&s.part)) else {
                continue;
            };
            let Some((clusters, hosts)) = served_parts(&part) else {
                continue;
            };
            let add = |who: &BTreeSet<Order>, affected: &mut BTreeSet<Order>, queue: &mut Vec<Order>| {
                for o in who {
                    if affected.insert(o.clone()) {
                        queue.push(o.clone());
                    }
                }
            };
            for h in hosts {
                if let Some(who) = self.host_claims.get(h).filter(|w| w.len() > 1) {
                    add(who, affected, &mut queue);
                }
            }
            for cl in clusters {
                if let Some(claims) = self.cluster_claims.get(&cl.name).filter(|c| c.len() > 1) {
                    for (_, who) in claims {
                        add(who, affected, &mut queue);
                    }
                }
            }
        }
    }

    /// Takes back what a connector's outcome put into the outputs; gives its left-out problems.
    fn withdraw(&mut self, outcome: Outcome, order: &Order, part: &Part) -> Option<Vec<Problem>> {
        let (ns, name) = (&order.key.0, &order.key.1);
        match outcome {
            Outcome::Pending => None,
            Outcome::LeftOut => self.left_out.remove(ns, name),
            Outcome::Served => {
                self.served.remove(order);
                self.credentials.remove(ns, name);
                self.connectors.remove(ns, name);
                if let Some((clusters, _)) = served_parts(part) {
                    for cl in clusters {
                        if let Some((_, n)) = self.used_clusters.get_mut(&cl.name) {
                            *n -= 1;
                            if *n == 0 {
                                self.used_clusters.remove(&cl.name);
                                self.clusters_changed();
                            }
                        }
                    }
                }
                None
            }
        }
    }

    fn serve(&mut self, order: &Order, part: Arc<Part>) {
        let (ns, name) = (&order.key.0, &order.key.1);
        if let Part::Served {
            clusters,
            credential,
            revision,
            ..
        } = &*part
        {
            for cl in clusters {
                match self.used_clusters.get_mut(&cl.name) {
                    Some((_, n)) => *n += 1,
                    None => {
                        self.used_clusters.insert(cl.name.clone(), (cl.clone(), 1));
                        self.clusters_changed();
                    }
                }
            }
            self.credentials
                .insert(ns, name, (credential.clone(), revision.clone()));
            self.connectors.insert(ns, name, ());
        }
        self.served.insert(order.clone(), part);
    }

    fn clusters_changed(&mut self) {
        self.clusters = Arc::new(self.used_clusters.values().map(|(c, _)| c.clone()).collect());
    }
}

fn unclaim(claims: &mut HashMap<String, BTreeSet<Order>>, name: &str, order: &Order) {
    if let Some(who) = claims.get_mut(name) {
        who.remove(order);
        if who.is_empty() {
            claims.remove(name);
        }
    }
}

fn unclaim_cluster(claims: &mut HashMap<String, ClusterClaims>, cl: &UpstreamCluster, order: &Order) {
    if let Some(by_origin) = claims.get_mut(&cl.name) {
        for (_, who) in by_origin.iter_mut() {
            who.remove(order);
        }
        by_origin.retain(|(_, who)| !who.is_empty());
        if by_origin.is_empty() {
            claims.remove(&cl.name);
        }
    }
}

impl LiveRender {
    /// The configuration document: `settings` (whose `connectors` is empty) with the served
    /// entries' JSON, each serialized once when its part was rendered, joined in. Byte for byte
    /// what serializing the whole [`FilterConfig`] gives, in pieces: the runs a change touched
    /// are joined again, the others shared; the same `Arc` as last time when nothing in it
    /// changed.
    fn document(&mut self, settings: &FilterConfig, in_parts: bool) -> Arc<Document> {
        // `connectors` is the document's last field: `...,"connectors":[]}`.
        let head = serde_json::to_string(settings).unwrap_or_default();
        let changed = self.served.refresh(|part| match &**part {
            Part::Served { json, .. } => Some(&**json),
            Part::LeftOut(_) => None,
        });
        if !changed && head == self.head && in_parts == self.in_parts && !self.document.is_empty() {
            return Arc::clone(&self.document);
        }
        let Some(open) = head.strip_suffix("]}") else {
            return Arc::new(Document::from_text(head));
        };
        self.in_parts = in_parts;
        self.document = if in_parts {
            self.parts = Arc::new(self.served.parts());
            Arc::new(parts_document(open, &self.parts))
        } else {
            self.parts = Arc::default();
            let mut pieces = vec![Arc::from(open)];
            self.served.pieces(&mut pieces);
            pieces.push(Arc::from("]}"));
            Arc::new(Document::from_pieces(pieces))
        };
        self.head = head;
        Arc::clone(&self.document)
    }
}

/// The document that lists `parts` in place of the entries (`--config-parts`): `open` (the
/// settings up to `"connectors":[`) with `"parts":[<ids>]` before an empty `connectors`. The
/// filter puts the parts' texts back where the ids stand (`connector_core::config::assemble`)
/// and gets the inline document, byte for byte. A change pushes one new id and the filter
/// fetches that part alone: what the controller sends and Envoy reads no longer grows with
/// every connector's text, only with the number of parts (one per 64–128 connectors).
fn parts_document(open: &str, parts: &[(Arc<str>, Arc<str>)]) -> Document {
    const CONNECTORS: &str = "\"connectors\":[";
    if parts.is_empty() {
        return Document::from_text(format!("{open}]}}"));
    }
    let settings = open.strip_suffix(CONNECTORS).unwrap_or(open);
    let mut text = String::with_capacity(settings.len() + 32 + parts.len() * 75);
    text.push_str(settings);
    text.push_str("\"parts\":[");
    for (i, (id, _)) in parts.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push('"');
        text.push_str(id);
        text.push('"');
    }
    text.push_str("],");
    text.push_str(CONNECTORS);
    text.push_str("]}");
    Document::from_text(text)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::path::Path;

    use super::*;
    use crate::manifests::{ManifestSet, parse_file};
    use crate::pipeline::{Delivery, Rendering, render_live};
    use crate::test_rng::Rng;

    /// A connector the test can change field by field; everything is drawn from small pools,
    /// so host names, cluster names (token realms name theirs in file mode) and creation times
    /// collide often.
    #[derive(Clone, Debug)]
    struct Spec {
        ns: usize,
        address: usize,
        hosts: Vec<usize>,
        realm: Option<(usize, usize)>,
        created: Option<usize>,
        secret: usize,
    }

    const ADDRESSES: [&str; 3] = ["http://127.0.0.1:5000", "http://127.0.0.1:5001", "https://reg.example"];
    const REALM_URLS: [&str; 2] = ["http://127.0.0.1:6000/token", "https://auth.example/token"];

    fn connector_yaml(name: &str, s: &Spec) -> String {
        let created = s
            .created
            .map(|t| format!(", creationTimestamp: '2026-01-01T00:00:0{t}Z'"))
            .unwrap_or_default();
        let hosts: Vec<String> = s.hosts.iter().map(|h| format!("h{h}.example")).collect();
        let realm = s
            .realm
            .map(|(u, c)| format!("  tokenRealms: [{{url: '{}', cluster: realm-{c}}}]\n", REALM_URLS[u]))
            .unwrap_or_default();
        format!(
            "apiVersion: connectors.alauda.io/v1alpha1\nkind: Connector\nmetadata: {{name: {name}, namespace: ns{}{created}}}\nspec:\n  address: '{}'\n  auth: {{name: basicAuth, secretRef: {{name: robot-{}}}}}\n  connectorClassName: oci\n  hosts: [{}]\n{realm}---\n",
            s.ns,
            ADDRESSES[s.address],
            s.secret,
            hosts.join(", ")
        )
    }

    fn secret_yaml(ns: usize, secret: usize, password: usize) -> String {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: robot-{secret}, namespace: ns{ns}, annotations: {{connectors.alauda.io/allowed-connectors: '*'}}}}\ntype: kubernetes.io/basic-auth\nstringData: {{username: robot, password: pw{password}}}\n---\n"
        )
    }

    fn spec(rng: &mut Rng) -> Spec {
        Spec {
            ns: rng.below(3),
            address: rng.below(ADDRESSES.len()),
            hosts: (0..rng.below(3)).map(|_| rng.below(4)).collect(),
            realm: (rng.below(3) == 0).then(|| (rng.below(REALM_URLS.len()), rng.below(2))),
            created: (rng.below(4) != 0).then(|| rng.below(3)),
            secret: rng.below(2),
        }
    }

    fn channel() -> ChannelSettings {
        ChannelSettings {
            cluster: "connector_controller".into(),
            key_env: None,
            delivery: Delivery::Inline,
        }
    }

    fn in_parts() -> ChannelSettings {
        ChannelSettings {
            delivery: Delivery::Parts,
            ..channel()
        }
    }

    /// What a filter makes of a document that lists parts, given the parts `out` serves.
    fn assembled(out: &LiveOutput) -> String {
        let doc = out.config_json.text();
        let listed = connector_core::config::parse(doc.as_bytes()).config.parts;
        if listed.is_empty() {
            return doc;
        }
        let served: HashMap<&str, &str> = out.parts.iter().map(|(id, t)| (&**id, &**t)).collect();
        let head = connector_core::config::parts_head(doc.as_bytes()).unwrap();
        connector_core::config::assemble(&head, listed.iter().map(|id| served[id.as_str()]))
    }

    fn tenancy() -> Tenancy {
        Tenancy {
            allow_local_upstreams: true,
            ..Default::default()
        }
    }

    fn identity() -> serde_json::Value {
        serde_json::json!({"issuers": ["https://k8s"], "audiences": ["oci-connector"],
            "jwks": {"keys": [{"kty": "EC", "kid": "k1", "alg": "ES256", "crv": "P-256",
                "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}})
    }

    /// What both renders are compared by (the problems' text included).
    fn summary(r: &Rendering) -> String {
        let mut credentials: Vec<_> = r
            .credentials
            .iter()
            .map(|(k, c)| format!("{k:?}={}:{}@{}", c.username, c.password, r.revisions[k]))
            .collect();
        credentials.sort();
        format!(
            "{}\n{:?}\n{:?}\n{:?}\n{credentials:?}",
            serde_json::to_string(&r.filter_config).unwrap_or_default(),
            r.clusters,
            r.connectors,
            r.left_out
        )
    }

    /// The settling order compares files by their bytes; for the files of one directory (file
    /// mode) that is the order of their locations, which the one-shot `render` sorts by.
    #[test]
    fn the_settling_order_is_the_order_of_locations_in_one_directory() {
        let names = [
            "a.yaml", "a-b.yaml", "a.b.yaml", "a0.yaml", "A.yaml", "ä.yaml", "a.yml", "b.yaml", "a..yaml", "z",
        ];
        let dir = Path::new("/etc/connectors/manifests");
        let mut pairs: Vec<(Location, Order)> = vec![];
        for (k, name) in names.iter().enumerate() {
            for index in [0, 1, 10] {
                let at = Location {
                    file: dir.join(name),
                    index,
                };
                let key: ConnectorKey = (format!("ns{}", k % 3), format!("c{k}"));
                let c: Connector = serde_json::from_value(serde_json::json!({
                    "apiVersion": "connectors.alauda.io/v1alpha1", "kind": "Connector",
                    "metadata": {"name": key.1, "namespace": key.0},
                    "spec": {"address": "https://r.example", "auth": {"name": "basicAuth", "secretRef": {"name": "s"}}, "connectorClassName": "oci"},
                }))
                .unwrap();
                pairs.push((at.clone(), Order::of(&at, &c, &key)));
            }
        }
        for (a, oa) in &pairs {
            for (b, ob) in &pairs {
                assert_eq!(oa.cmp(ob), a.cmp(b), "{a} vs {b}");
            }
        }
    }

    /// Issue 17: a long run of random changes (connectors added, removed, moved between files,
    /// their hosts, addresses, realms and creation times changed, Secrets rotated, removed and
    /// restored), with conflicts on host and cluster names all along. After every change the
    /// standing state gives exactly what a render from scratch gives.
    #[test]
    fn every_change_gives_what_a_render_from_scratch_gives() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let revisions = Revisions::with_key([7; 32]);
        let mut specs: BTreeMap<String, Spec> = (0..24).map(|i| (format!("c{i:02}"), spec(&mut rng))).collect();
        // (namespace, secret) → password; absent: no Secret.
        let mut secrets: BTreeMap<(usize, usize), usize> =
            (0..3).flat_map(|ns| (0..2).map(move |s| ((ns, s), 0))).collect();
        // File of each connector: some share files, so a change moves documents within one.
        let mut file_of: BTreeMap<String, usize> = specs.keys().map(|k| (k.clone(), rng.below(10))).collect();
        // File mode's per-file cache: an unchanged file keeps its objects (compared by address).
        let mut parsed: BTreeMap<String, (String, ManifestSet)> = BTreeMap::new();
        let mut merged = ManifestSet::default();
        let mut live = LiveRender::default();
        // The same changes rendered as parts (`--config-parts`).
        let mut parted = LiveRender::default();
        let (mut parted_last, mut inline_last) = (Arc::new(Document::default()), Arc::new(Document::default()));
        // And by their number (the default, `Delivery::Auto`), from the first count served: the
        // count wanders across both thresholds, and each switch must give the same connectors.
        let mut auto = LiveRender::default();
        let (mut auto_from, mut auto_was, mut switches) = (None, false, [0; 2]);
        let (mut rendered_total, mut settled_total) = (0, 0);
        let mut seen_conflicts = [false; 2];
        let steps = 300;
        for step in 0..steps {
            if step > 0 {
                let names: Vec<String> = specs.keys().cloned().collect();
                let pick = names[rng.below(names.len())].clone();
                match rng.below(8) {
                    0 => {
                        specs.insert(format!("n{step}"), spec(&mut rng));
                        file_of.insert(format!("n{step}"), rng.below(10));
                    }
                    1 => {
                        specs.remove(&pick);
                    }
                    2 => {
                        specs.get_mut(&pick).unwrap().hosts = (0..rng.below(3)).map(|_| rng.below(4)).collect();
                    }
                    3 => specs.get_mut(&pick).unwrap().address = rng.below(ADDRESSES.len()),
                    4 => {
                        let s = specs.get_mut(&pick).unwrap();
                        s.realm = (rng.below(2) == 0).then(|| (rng.below(REALM_URLS.len()), rng.below(2)));
                        s.created = (rng.below(4) != 0).then(|| rng.below(3));
                    }
                    5 => {
                        file_of.insert(pick, rng.below(10));
                    }
                    6 => {
                        let k = (rng.below(3), rng.below(2));
                        match secrets.get(&k) {
                            Some(_) if rng.below(3) == 0 => {
                                secrets.remove(&k);
                            }
                            _ => {
                                secrets.insert(k, step);
                            }
                        }
                    }
                    _ => specs.get_mut(&pick).unwrap().secret = rng.below(2),
                }
            }
            // The directory: connectors in their files, Secrets in one file.
            let mut files: BTreeMap<String, String> = BTreeMap::new();
            for (name, s) in &specs {
                files
                    .entry(format!("f{}.yaml", file_of[name]))
                    .or_default()
                    .push_str(&connector_yaml(name, s));
            }
            let secret_docs: String = secrets.iter().map(|((ns, s), pw)| secret_yaml(*ns, *s, *pw)).collect();
            files.insert("secrets.yaml".into(), secret_docs);
            // Changed in place, as file mode does: a changed or removed file's objects go, a
            // changed or new file's come; the rest (and their namespaces) stay shared.
            let mut problems = vec![];
            let gone: Vec<String> = parsed.keys().filter(|f| !files.contains_key(*f)).cloned().collect();
            for f in gone {
                if let Some((_, old)) = parsed.remove(&f) {
                    merged.unmerge(&old);
                }
            }
            let changed: Vec<&String> = files
                .iter()
                .filter(|(f, text)| parsed.get(*f).is_none_or(|(t, _)| t != *text))
                .map(|(f, _)| f)
                .collect();
            // Every changed file's old objects first: a connector may move between files.
            for file in &changed {
                if let Some((_, old)) = parsed.remove(*file) {
                    merged.unmerge(&old);
                }
            }
            for file in changed {
                let text = &files[file];
                let mut one = ManifestSet::default();
                parse_file(Path::new(file), text, &mut one, &mut problems);
                merged.merge(&one, &mut problems);
                parsed.insert(file.clone(), (text.clone(), one));
            }
            let set = merged.clone();
            assert!(problems.is_empty(), "{problems:?}");
            let inputs = Inputs {
                set,
                identity: identity(),
                authorization: Authorization::Rules,
            };
            let out = live.update(&inputs, &channel(), &revisions, &tenancy()).unwrap();
            let json = out.config_json.text();
            let parts_out = parted.update(&inputs, &in_parts(), &revisions, &tenancy()).unwrap();
            let parts_doc = parts_out.config_json.text();
            assert_eq!(
                connector_core::config::parse(parts_doc.as_bytes()).errors,
                vec![],
                "step {step}"
            );
            assert_eq!(assembled(&parts_out), json, "step {step}");
            // Unchanged (the same `Arc`, no push) whenever the inline document is.
            if Arc::ptr_eq(&out.config_json, &inline_last) {
                assert!(Arc::ptr_eq(&parts_out.config_json, &parted_last), "step {step}");
            }
            inline_last = Arc::clone(&out.config_json);
            parted_last = Arc::clone(&parts_out.config_json);
            let served = out.connectors.len();
            let from = *auto_from.get_or_insert(served);
            let by_count = ChannelSettings {
                delivery: Delivery::Auto { from },
                ..channel()
            };
            let auto_out = auto.update(&inputs, &by_count, &revisions, &tenancy()).unwrap();
            let expected = if auto_was {
                served >= from - from / 10
            } else {
                served >= from
            };
            assert_eq!(
                !auto_out.parts.is_empty(),
                expected,
                "step {step}: {served} served, from {from}"
            );
            assert_eq!(assembled(&auto_out), json, "step {step}");
            if expected != auto_was {
                switches[usize::from(expected)] += 1;
            }
            auto_was = expected;
            if step > 0 {
                rendered_total += out.rendered;
                settled_total += out.settled;
            }
            let incremental = Rendering::from_live(&live, out);
            let fresh = render_live(&inputs, &channel(), &revisions, &tenancy()).unwrap();
            assert_eq!(summary(&incremental), summary(&fresh), "step {step}");
            for (i, text) in ["already used by another connector", "already names it"]
                .iter()
                .enumerate()
            {
                seen_conflicts[i] |= fresh.left_out.values().flatten().any(|p| p.message.contains(text));
            }
            assert_eq!(
                json,
                serde_json::to_string(&fresh.filter_config).unwrap(),
                "step {step}"
            );
        }
        // Both kinds of conflict happened along the way, so they were compared too.
        assert!(
            seen_conflicts.iter().all(|c| *c),
            "host / cluster conflicts seen: {seen_conflicts:?}"
        );
        assert!(rendered_total > 0 && settled_total > 0);
        assert!(
            switches[0] >= 2 && switches[1] >= 2,
            "switches to inline / to parts: {switches:?}"
        );
    }

    /// Issue 17: at 2,000 connectors sharing one registry, a change renders and settles only the
    /// connectors it concerns: a rotation one, a new connector one, a deletion none, a
    /// newcomer claiming a taken host name the two claimants; the older keeps the name.
    #[test]
    fn a_change_renders_and_settles_only_what_it_concerns() {
        let revisions = Revisions::with_key([7; 32]);
        let plain = |ns: usize| Spec {
            ns,
            address: 0,
            hosts: vec![],
            realm: None,
            created: None,
            secret: 0,
        };
        let mut files: BTreeMap<String, (String, ManifestSet)> = BTreeMap::new();
        let put = |files: &mut BTreeMap<String, (String, ManifestSet)>, file: &str, text: String| {
            let mut one = ManifestSet::default();
            let mut problems = vec![];
            parse_file(Path::new(file), &text, &mut one, &mut problems);
            assert!(problems.is_empty(), "{problems:?}");
            files.insert(file.to_string(), (text, one));
        };
        for i in 0..2000 {
            put(
                &mut files,
                &format!("c{i:04}.yaml"),
                connector_yaml(&format!("c{i}"), &plain(i % 20)),
            );
        }
        for ns in 0..20 {
            put(&mut files, &format!("s{ns:02}.yaml"), secret_yaml(ns, 0, 0));
        }
        let mut live = LiveRender::default();
        // Rendered as parts: also counts the parts a change adds to the document.
        let mut listed: HashSet<Arc<str>> = HashSet::new();
        let mut run = |files: &BTreeMap<String, (String, ManifestSet)>| {
            let mut set = ManifestSet::default();
            let mut problems = vec![];
            for (_, one) in files.values() {
                set.merge(one, &mut problems);
            }
            let inputs = Inputs {
                set,
                identity: identity(),
                authorization: Authorization::Rules,
            };
            let out = live.update(&inputs, &in_parts(), &revisions, &tenancy()).unwrap();
            let now: HashSet<Arc<str>> = out.parts.iter().map(|(id, _)| Arc::clone(id)).collect();
            let new_parts = now.difference(&listed).count();
            listed = now;
            (out.rendered, out.settled, out.connectors.len(), out.left_out, new_parts)
        };
        let (rendered, .., parts) = run(&files);
        assert_eq!(rendered, 2000);
        assert!((16..=32).contains(&parts), "{parts} parts of 64 to 128 connectors");
        let (rendered, settled, .., parts) = run(&files);
        assert_eq!((rendered, settled, parts), (0, 0, 0), "nothing changed");
        // A Secret rotated in ns3: its 100 connectors, and only they.
        put(&mut files, "s03.yaml", secret_yaml(3, 0, 1));
        let (rendered, settled, served, ..) = run(&files);
        assert_eq!((rendered, settled, served), (100, 100, 2000));
        // One connector changed, one added, one deleted: one new part each.
        let mut holder = plain(5);
        holder.hosts = vec![1];
        put(&mut files, "c0005.yaml", connector_yaml("c5", &holder));
        let (rendered, settled, .., parts) = run(&files);
        assert_eq!((rendered, settled, parts), (1, 1, 1));
        put(&mut files, "c0006.yaml", connector_yaml("c6", &holder));
        let (rendered, settled, _, left_out, parts) = run(&files);
        assert_eq!(
            (rendered, settled),
            (1, 2),
            "the newcomer and the holder of its host name"
        );
        assert!(left_out.contains("ns5", "c6") && !left_out.contains("ns5", "c5"));
        assert!(parts <= 1, "{parts}: a connector left out is not in the document");
        put(&mut files, "c9999.yaml", connector_yaml("late", &plain(7)));
        let (rendered, settled, served, _, parts) = run(&files);
        assert_eq!((rendered, settled, served, parts), (1, 1, 2000, 1));
        files.remove("c0100.yaml");
        let (rendered, settled, served, _, parts) = run(&files);
        assert_eq!((rendered, settled, served, parts), (0, 0, 1999, 1));
    }
}
