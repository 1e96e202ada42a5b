//! Owns where an upstream's host *name* may lead. The controller resolves the names of the
//! upstreams it hands Envoy (`spec.address`, `spec.tokenRealms`) itself, screens every address
//! by the rule an IP literal meets ([`Tenancy::refuse_upstream`]: loopback, unspecified and the
//! pod's own addresses unless `--allow-local-upstreams`; link-local and the pod's own ports
//! always), and gives Envoy only the addresses admitted, as a `STATIC` cluster (module `xds`).
//! Envoy never resolves an upstream name itself, so a name that resolves to a local or
//! metadata address, at once or later (DNS rebinding), never receives a connector's credential.
//! The controller's probes screen the same way (module `probe`).
//!
//! [`run`] resolves the names of the current snapshot whenever it changes and every
//! [`REFRESH`]. A name that stops resolving keeps its last admitted addresses (a DNS outage must
//! not take every registry away); one never resolved, or resolving only to refused addresses,
//! gets none: its cluster has no endpoint and Envoy answers 503, never connecting anywhere.
//! Lookups run side by side and publish as they answer; [`PinWait`] bounds how long a push
//! waits for a new name's first answer, so a slow name holds up only its own connector.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::watch;

use hickory_resolver::config::{ResolverConfig, ResolverOpts};

use crate::pipeline::Tenancy;
use crate::render::UpstreamCluster;
use crate::xds::Snapshot;

/// How often names are resolved again (registries behind CDNs move).
pub const REFRESH: Duration = Duration::from_secs(30);
/// Per name; the probes and the filter give an upstream 5 s too.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Lookups in flight at once: each holds up to six UDP sockets until it answers or is given
/// up ([`raise_open_file_limit`]; no thread, see [`resolve`]), and a name server the cluster
/// shares should not get thousands of queries in one burst.
const LOOKUPS: usize = 128;
/// Of those, at most this many for a refresh: the rest stay free for a new snapshot's names.
const REFRESH_LOOKUPS: usize = 24;
/// A name no snapshot names any more keeps its pin this long: the clusters of a filter
/// configuration Envoy still runs stay until it accepts a newer one (make before break).
const RETAIN: Duration = Duration::from_secs(600);

/// What Envoy may connect to for an upstream named by host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// Admitted addresses (IPv4 only when there is one, as Envoy's `V4_PREFERRED`); empty:
    /// nothing may be reached.
    pub addresses: Vec<IpAddr>,
    /// Why nothing, or not everything, resolved was admitted (for the log); never a secret.
    pub problem: Option<String>,
}

/// Per `(host name, port)` of the upstream clusters.
pub type PinMap = BTreeMap<(String, u16), Pin>;

/// True for a cluster Envoy reaches by a host name, which needs a [`Pin`].
pub fn is_named(c: &UpstreamCluster) -> bool {
    c.host.parse::<IpAddr>().is_err()
}

/// The pin of named cluster `c` in `pins`, if its name was looked up.
pub fn pin_of<'a>(pins: &'a PinMap, c: &UpstreamCluster) -> Option<&'a Pin> {
    pins.get(&(c.host.clone(), c.port))
}

/// The addresses of `resolved` the proxy may send `host`'s credential to on `port`, by
/// [`Tenancy::refuse_upstream`]'s rule for each as if it were written as a literal; `Err` says
/// why none was admitted.
pub fn screen(tenancy: &Tenancy, host: &str, port: u16, resolved: &[IpAddr]) -> Result<Vec<IpAddr>, String> {
    screen_all(tenancy, host, port, resolved).0
}

/// [`screen`], and why the addresses left out of an admitted set were (for the log: a name
/// resolving to a registry *and* to loopback is worth an operator's look).
fn screen_all(
    tenancy: &Tenancy,
    host: &str,
    port: u16,
    resolved: &[IpAddr],
) -> (Result<Vec<IpAddr>, String>, Option<String>) {
    let mut admitted: Vec<IpAddr> = Vec::new();
    let mut refused: Vec<String> = Vec::new();
    for ip in resolved {
        let literal = UpstreamCluster {
            name: String::new(),
            host: ip.to_string(),
            port,
            tls: false,
            sni: None,
        };
        match tenancy.refuse_upstream(&literal) {
            Some(why) if !refused.contains(&why) => refused.push(why),
            None if !admitted.contains(ip) => admitted.push(*ip),
            _ => {}
        }
    }
    if admitted.iter().any(IpAddr::is_ipv4) {
        admitted.retain(IpAddr::is_ipv4);
    }
    match (admitted.is_empty(), refused.is_empty()) {
        (false, true) => (Ok(admitted), None),
        (false, false) => (
            Ok(admitted),
            Some(format!(
                "{host} resolves to refused addresses too, left out: {}",
                refused.join("; ")
            )),
        ),
        (true, true) => (Err(format!("{host} resolves to no address")), None),
        (true, false) => (
            Err(format!(
                "{host} resolves only to refused addresses: {}",
                refused.join("; ")
            )),
            None,
        ),
    }
}

/// A push's wait for the pins of new host names (the xDS session's, the Istio writer's): a
/// snapshot naming a name not looked up yet waits for it at most `wait` from its first push,
/// then goes without the name's addresses, and that snapshot does not wait again (its later
/// pushes, the filter configuration after the clusters say, go at once). So one tenant's slow
/// name holds no other change up for longer than `wait`.
#[derive(Debug, Default)]
pub struct PinWait {
    deadline: Option<tokio::time::Instant>,
    /// The snapshot version whose wait is over.
    over_for: Option<u64>,
}

impl PinWait {
    /// How much longer a push of snapshot `version`, `unpinned` if it names a name not
    /// looked up yet, waits; `None`: it goes now.
    pub fn hold(
        &mut self,
        version: u64,
        unpinned: bool,
        now: tokio::time::Instant,
        wait: Duration,
    ) -> Option<Duration> {
        if !unpinned || self.over_for == Some(version) {
            self.deadline = None;
            return None;
        }
        let left = self
            .deadline
            .get_or_insert(now + wait)
            .checked_duration_since(now)
            .filter(|d| !d.is_zero());
        if left.is_none() {
            self.deadline = None;
            self.over_for = Some(version);
        }
        left
    }

    /// When the push waiting now goes, if one waits.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline
    }
}

/// `host`'s addresses by the system's configuration (`/etc/hosts`, then the name servers,
/// search list and options of `/etc/resolv.conf`, read again for every lookup as glibc does
/// when they change), within [`RESOLVE_TIMEOUT`].
///
/// An in-process asynchronous resolver (hickory) rather than the system's getaddrinfo: a lookup
/// given up is dropped with its sockets at once, where getaddrinfo held one of tokio's blocking
/// threads until it gave up itself (glibc: `timeout` times `attempts`, as long as a tenant's
/// `resolv.conf` options or name server make it), so never-answering names could take the pool
/// every other lookup, and the probes' file reads, need.
pub async fn resolve(host: &str) -> Result<Vec<IpAddr>, String> {
    let hosts = hickory_resolver::Hosts::from_system().unwrap_or_default();
    lookup(&hosts, host, RESOLVE_TIMEOUT, system_resolver).await
}

/// Raises the soft limit on open files to the hard one, as Go's runtime does for its programs,
/// and returns it: a lookup whose name server never answers holds up to six UDP sockets until
/// it is given up (hickory sends each of its two queries up to three times, each from a socket
/// of its own), so [`LOOKUPS`] of them take 768, and a container's soft limit is often 1,024.
pub fn raise_open_file_limit() -> Result<u64, String> {
    rlimit::increase_nofile_limit(u64::MAX).map_err(|e| format!("cannot raise the open-file limit: {e}"))
}

/// A resolver on the system's configuration, its own cache off (every lookup builds one).
fn system_resolver() -> Result<hickory_resolver::TokioResolver, String> {
    let (config, options) = system_config();
    let mut builder = hickory_resolver::TokioResolver::builder_with_config(
        config,
        hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
    );
    *builder.options_mut() = options;
    configure(builder.options_mut());
    builder
        .build()
        .map_err(|e| format!("cannot set a DNS resolver up: {e}"))
}

/// `/etc/resolv.conf` as last parsed: parsed again only when its bytes change, so what it holds
/// that hickory does not know (it warns of each such option) is logged once, not per lookup.
static RESOLV_CONF: std::sync::Mutex<Option<(Vec<u8>, ResolverConfig, ResolverOpts)>> = std::sync::Mutex::new(None);

/// The name servers, search list and options of `/etc/resolv.conf`, read for every lookup.
fn system_config() -> (ResolverConfig, ResolverOpts) {
    let data = std::fs::read("/etc/resolv.conf").unwrap_or_default();
    let mut last = RESOLV_CONF.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((bytes, config, options)) = last.as_ref()
        && *bytes == data
    {
        return (config.clone(), options.clone());
    }
    let (config, options) = resolv_conf(&data);
    *last = Some((data, config.clone(), options.clone()));
    (config, options)
}

/// A `resolv.conf`'s configuration; without a name server (no file, none listed), glibc's
/// default: the one on 127.0.0.1, with the file's search list and options still in force (as
/// glibc keeps them; hickory refuses such a file whole).
fn resolv_conf(data: &[u8]) -> (ResolverConfig, ResolverOpts) {
    use hickory_resolver::system_conf::parse_resolv_conf;
    parse_resolv_conf(data).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no name server in /etc/resolv.conf: asking 127.0.0.1, as glibc does");
        let local = [data, b"\nnameserver 127.0.0.1\n"].concat();
        parse_resolv_conf(local).unwrap_or_else(|_| {
            let local = hickory_resolver::config::NameServerConfig::udp_and_tcp(std::net::Ipv4Addr::LOCALHOST.into());
            (ResolverConfig::from_name_servers(vec![local]), ResolverOpts::default())
        })
    })
}

/// What every resolver here is asked for: DNS only (`/etc/hosts` is [`lookup`]'s to read), no
/// cache.
fn configure(opts: &mut ResolverOpts) {
    opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
    opts.cache_size = 0;
}

/// `host`'s addresses: those `hosts` gives the name as written, else those of the resolver
/// `resolver` builds (only then: a name the file answers costs no `resolv.conf` read), its A
/// and AAAA records asked side by side, each given up after `within`, and the addresses of
/// whichever answered (a name server that never answers one family, as some drop AAAA queries,
/// costs the wait, not the name).
///
/// `/etc/hosts` is read here, first, as glibc's `files` source is: hickory reads it only for
/// the first name of its search list, so under a pod's `ndots:5` a name with fewer dots (a
/// `hostAliases` entry, `registry.internal`) would have gone to DNS.
async fn lookup(
    hosts: &hickory_resolver::Hosts,
    host: &str,
    within: Duration,
    resolver: impl FnOnce() -> Result<hickory_resolver::TokioResolver, String>,
) -> Result<Vec<IpAddr>, String> {
    use hickory_resolver::lookup_ip::LookupIp;
    use hickory_resolver::proto::op::Query;
    use hickory_resolver::proto::rr::{Name, RecordType};
    if let Ok(name) = Name::from_str_relaxed(host.to_ascii_lowercase()) {
        let listed: Vec<IpAddr> = [RecordType::A, RecordType::AAAA]
            .into_iter()
            .filter_map(|kind| hosts.lookup_static_host(&Query::query(name.clone(), kind)))
            .flat_map(|l| LookupIp::from(l).iter().collect::<Vec<_>>())
            .collect();
        if !listed.is_empty() {
            return Ok(listed);
        }
    }
    let resolver = resolver().map_err(|e| format!("{host} not looked up: {e}"))?;
    let deadline = tokio::time::Instant::now() + within;
    let family = |kind| tokio::time::timeout_at(deadline, resolver.lookup(host, kind));
    let (v4, v6) = tokio::join!(family(RecordType::A), family(RecordType::AAAA));
    let mut found: Vec<IpAddr> = Vec::new();
    let mut failed = Vec::new();
    for answer in [v4, v6] {
        match answer {
            Ok(Ok(records)) => found.extend(LookupIp::from(records).iter()),
            Ok(Err(e)) if e.is_no_records_found() => {}
            Ok(Err(e)) => failed.push(e.to_string()),
            Err(_) => failed.push(String::new()),
        }
    }
    match (found.is_empty(), failed.first()) {
        (false, _) => Ok(found),
        (true, None) => Err(format!("{host} does not resolve: no such name or no address")),
        (true, Some(e)) if e.is_empty() => Err(format!("{host} did not resolve within {} s", within.as_secs())),
        (true, Some(e)) => Err(format!("{host} does not resolve: {e}")),
    }
}

/// One name's next pin from its resolution, given its last one.
fn next_pin(
    tenancy: &Tenancy,
    host: &str,
    port: u16,
    resolved: Result<Vec<IpAddr>, String>,
    last: Option<&Pin>,
) -> Pin {
    match resolved {
        Ok(ips) => match screen_all(tenancy, host, port, &ips) {
            (Ok(addresses), left_out) => Pin {
                addresses,
                problem: left_out,
            },
            (Err(why), _) => Pin {
                addresses: vec![],
                problem: Some(why),
            },
        },
        // A lookup that fails keeps what was admitted before.
        Err(why) => Pin {
            addresses: last.map(|p| p.addresses.clone()).unwrap_or_default(),
            problem: Some(why),
        },
    }
}

/// Keeps `pins` up to date with the names of the snapshots `snapshots` brings: a new snapshot's
/// names not pinned yet at once, every name again every `refresh`. Ends when either channel
/// closes.
pub async fn run(
    tenancy: Tenancy,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    pins: watch::Sender<Arc<PinMap>>,
    refresh: Duration,
    metrics: Arc<crate::ops::Metrics>,
) {
    let system = |host: String, _port: u16| async move { resolve(&host).await };
    run_with(tenancy, snapshots, pins, refresh, metrics, system).await;
}

/// A name and port of an upstream cluster.
type Name = (String, u16);

/// [`run`] with the lookup `lookup` (tests: answers that change, or never come).
///
/// Lookups run side by side, at most [`LOOKUPS`] at a time, and each answer is published as
/// it comes: names that take their whole [`RESOLVE_TIMEOUT`] (one tenant's, say) hold up
/// neither another name of theirs nor its answer. A later change's unpinned names go ahead of
/// an earlier one's, and all of them ahead of a refresh, which takes at most
/// [`REFRESH_LOOKUPS`] of the lookups.
async fn run_with<F, Fut>(
    tenancy: Tenancy,
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    pins: watch::Sender<Arc<PinMap>>,
    refresh: Duration,
    metrics: Arc<crate::ops::Metrics>,
    lookup: F,
) where
    F: Fn(String, u16) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<IpAddr>, String>>,
{
    let mut last_named: BTreeMap<Name, Instant> = BTreeMap::new();
    let mut names: BTreeSet<Name> = BTreeSet::new();
    let mut new_names: VecDeque<Name> = VecDeque::new();
    let mut refreshing: VecDeque<Name> = VecDeque::new();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut flying: BTreeSet<Name> = BTreeSet::new();
    // Changes do not put the refresh off: it comes every `refresh` however often they come.
    let mut next_refresh = tokio::time::Instant::now() + refresh;
    let mut snapshot_changed = true;
    loop {
        if std::mem::take(&mut snapshot_changed) {
            names = snapshots
                .borrow_and_update()
                .as_ref()
                .map(|s| {
                    s.clusters
                        .iter()
                        .filter(|c| is_named(c))
                        .map(|c| (c.host.clone(), c.port))
                        .collect()
                })
                .unwrap_or_default();
            let now = Instant::now();
            for n in &names {
                last_named.insert(n.clone(), now);
            }
            last_named.retain(|_, seen| now.duration_since(*seen) < RETAIN);
            let current = pins.borrow().clone();
            // The latest change's names go first: a tenant's earlier batch of slow names keeps
            // another's new connector waiting for at most one lookup's time.
            // (A set to look the queue up in: thousands of names are queued at once.)
            let queued: BTreeSet<&Name> = new_names.iter().collect();
            let fresh: Vec<Name> = names
                .iter()
                .filter(|n| !current.contains_key(*n) && !flying.contains(*n) && !queued.contains(n))
                .cloned()
                .collect();
            drop(queued);
            for n in fresh.into_iter().rev() {
                new_names.push_front(n);
            }
            // Names no configuration has used for `RETAIN` lose their pins.
            if current.keys().any(|k| !last_named.contains_key(k)) {
                let mut next = (*current).clone();
                next.retain(|k, _| last_named.contains_key(k));
                if !publish(&pins, &metrics, next) {
                    return;
                }
            }
        }
        loop {
            let name = if flying.len() < LOOKUPS && !new_names.is_empty() {
                new_names.pop_front()
            } else if flying.len() < REFRESH_LOOKUPS {
                refreshing.pop_front()
            } else {
                None
            };
            let Some(name) = name else {
                break;
            };
            if !names.contains(&name) || !flying.insert(name.clone()) {
                continue;
            }
            let answer = lookup(name.0.clone(), name.1);
            in_flight.push(async move { (name, answer.await) });
        }
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                snapshot_changed = true;
            }
            () = tokio::time::sleep_until(next_refresh) => {
                next_refresh = tokio::time::Instant::now() + refresh;
                refreshing = names.iter().filter(|n| !flying.contains(*n)).cloned().collect();
            }
            Some(first) = in_flight.next(), if !in_flight.is_empty() => {
                // The answers in by now go out together.
                let mut answers = vec![first];
                while let Some(Some(more)) = in_flight.next().now_or_never() {
                    answers.push(more);
                }
                let before = pins.borrow().clone();
                let mut next = (*before).clone();
                for (name, resolved) in answers {
                    flying.remove(&name);
                    // Gone from every configuration while it was looked up.
                    if !last_named.contains_key(&name) {
                        continue;
                    }
                    let (host, port) = (&name.0, name.1);
                    let pin = next_pin(&tenancy, host, port, resolved, before.get(&name));
                    if pin.problem.is_some() && before.get(&name).map(|p| &p.problem) != Some(&pin.problem) {
                        tracing::warn!(
                            host = %host,
                            port,
                            addresses = ?pin.addresses,
                            problem = pin.problem.as_deref().unwrap_or_default(),
                            "an upstream name is not pinned to every address it resolves to"
                        );
                    }
                    next.insert(name, pin);
                }
                if !publish(&pins, &metrics, next) {
                    return;
                }
            }
            () = pins.closed() => return,
        }
    }
}

/// Sends `next` if it differs from what `pins` holds, and counts it in the metrics; false when
/// no one listens any more.
fn publish(pins: &watch::Sender<Arc<PinMap>>, metrics: &crate::ops::Metrics, next: PinMap) -> bool {
    let pinned = next.values().filter(|p| !p.addresses.is_empty()).count();
    for (result, n) in [("pinned", pinned), ("none", next.len() - pinned)] {
        metrics
            .upstream_names
            .get_or_create(&crate::ops::ResultLabel { result: result.into() })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    if **pins.borrow() == next {
        return true;
    }
    tracing::info!(names = next.len(), pinned, "upstream names pinned");
    pins.send(Arc::new(next)).is_ok()
}

/// A resolver for the probes' HTTP client: the system's, screened by `policy`'s rules that do
/// not depend on the port (the probe checks the port's before it sends). Unset policy
/// (in-process tests of the reconciler): unscreened.
#[derive(Debug, Clone, Copy)]
pub struct ScreenedResolver {
    pub policy: &'static std::sync::OnceLock<Tenancy>,
}

/// A name that resolved only to refused addresses: the probe reports it as not allowed.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl reqwest::dns::Resolve for ScreenedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let ips = resolve(&host).await?;
            let ips = match policy.get() {
                Some(t) => screen(t, &host, 0, &ips).map_err(Refused)?,
                None => ips,
            };
            let addrs: reqwest::dns::Addrs = Box::new(ips.into_iter().map(|ip| std::net::SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn strict() -> Tenancy {
        Tenancy {
            own_ports: vec![18001],
            own_addresses: ips(&["10.1.2.3"]),
            ..Tenancy::default()
        }
    }

    /// An upstream cluster reached by `host` on `port` (plain HTTP: the pins do not look at it).
    fn named(host: &str, port: u16) -> UpstreamCluster {
        UpstreamCluster {
            name: format!("c_{host}_{port}"),
            host: host.into(),
            port,
            tls: false,
            sni: None,
        }
    }

    type Snapshots = watch::Sender<Option<Arc<Snapshot>>>;

    /// [`run_with`] under the strict policy, from snapshot `first`: the snapshots' sender, the
    /// pins' receiver and the task.
    fn started<F, Fut>(
        first: Option<Arc<Snapshot>>,
        refresh: Duration,
        lookup: F,
    ) -> (Snapshots, watch::Receiver<Arc<PinMap>>, tokio::task::JoinHandle<()>)
    where
        F: Fn(String, u16) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Vec<IpAddr>, String>> + Send + 'static,
    {
        let (snap_tx, snap_rx) = watch::channel(first);
        let (pins_tx, pins_rx) = watch::channel(Arc::new(PinMap::new()));
        let metrics = Arc::new(crate::ops::Metrics::default());
        let task = tokio::spawn(run_with(strict(), snap_rx, pins_tx, refresh, metrics, lookup));
        (snap_tx, pins_rx, task)
    }

    fn snap(clusters: Vec<UpstreamCluster>, version: u64) -> Option<Arc<Snapshot>> {
        Some(Arc::new(Snapshot {
            version,
            clusters: Arc::new(clusters),
            filter_config: Arc::new(crate::document::Document::from_text("{}")),
        }))
    }

    #[test]
    fn a_name_is_pinned_to_the_addresses_a_literal_would_be_allowed() {
        let t = strict();
        assert_eq!(
            screen(&t, "registry.example", 443, &ips(&["203.0.113.7", "203.0.113.8"])),
            Ok(ips(&["203.0.113.7", "203.0.113.8"]))
        );
        // Envoy's V4_PREFERRED: IPv6 only without IPv4.
        assert_eq!(
            screen(&t, "registry.example", 443, &ips(&["2001:db8::7", "203.0.113.7"])),
            Ok(ips(&["203.0.113.7"]))
        );
        assert_eq!(
            screen(&t, "registry.example", 443, &ips(&["2001:db8::7", "2001:db8::7"])),
            Ok(ips(&["2001:db8::7"]))
        );
        // A refused address among good ones is dropped, the rest pinned, and said (the log).
        assert_eq!(
            screen(&t, "registry.example", 443, &ips(&["127.0.0.1", "203.0.113.7"])),
            Ok(ips(&["203.0.113.7"]))
        );
        let mixed = next_pin(
            &t,
            "registry.example",
            443,
            Ok(ips(&["127.0.0.1", "203.0.113.7"])),
            None,
        );
        assert_eq!(mixed.addresses, ips(&["203.0.113.7"]));
        assert_eq!(
            mixed.problem.as_deref(),
            Some(
                "registry.example resolves to refused addresses too, left out: 127.0.0.1:443 is a loopback address, which the proxy does not send credentials to unless an operator starts the controller with --allow-local-upstreams"
            )
        );
        let clean = next_pin(&t, "registry.example", 443, Ok(ips(&["203.0.113.7"])), None);
        assert_eq!(clean.problem, None);
    }

    #[test]
    fn a_name_resolving_only_to_refused_addresses_gets_none_and_says_why() {
        let t = strict();
        for (resolved, says) in [
            (&["127.0.0.1"][..], "127.0.0.1:5000 is a loopback address"),
            (&["::1"][..], "::1:5000 is a loopback address"),
            (&["::ffff:127.0.0.1"][..], "is a loopback address"),
            (&["0.0.0.0"][..], "is a unspecified address"),
            (&["169.254.169.254"][..], "169.254.169.254:5000 is a link-local address"),
            (&["fe80::1"][..], "is a link-local address"),
            (&["10.1.2.3"][..], "the proxy pod's own address"),
        ] {
            let e = screen(&t, "evil.example", 5000, &ips(resolved)).unwrap_err();
            assert!(
                e.starts_with("evil.example resolves only to refused addresses: "),
                "{e}"
            );
            assert!(e.contains(says), "{resolved:?}: {e}");
        }
        assert_eq!(
            screen(&t, "empty.example", 80, &[]),
            Err("empty.example resolves to no address".into())
        );
    }

    #[test]
    fn local_addresses_need_the_opt_in_and_own_ports_and_metadata_are_refused_with_it() {
        let t = Tenancy {
            allow_local_upstreams: true,
            ..strict()
        };
        assert_eq!(screen(&t, "vm", 5000, &ips(&["127.0.0.1"])), Ok(ips(&["127.0.0.1"])));
        let own_port = screen(&t, "vm", 18001, &ips(&["127.0.0.1"])).unwrap_err();
        assert!(own_port.contains("one of the proxy pod's own ports"), "{own_port}");
        let metadata = screen(&t, "vm", 80, &ips(&["169.254.169.254"])).unwrap_err();
        assert!(metadata.contains("link-local"), "{metadata}");
    }

    #[test]
    fn a_failed_lookup_keeps_the_last_addresses_and_a_refusal_drops_them() {
        let t = strict();
        let last = Pin {
            addresses: ips(&["203.0.113.7"]),
            problem: None,
        };
        let kept = next_pin(&t, "registry.example", 443, Err("timed out".into()), Some(&last));
        assert_eq!(kept.addresses, last.addresses);
        assert_eq!(kept.problem.as_deref(), Some("timed out"));
        let never = next_pin(&t, "registry.example", 443, Err("NXDOMAIN".into()), None);
        assert!(never.addresses.is_empty());
        // Rebound to loopback: the old address is not kept.
        let rebound = next_pin(&t, "registry.example", 443, Ok(ips(&["127.0.0.1"])), Some(&last));
        assert!(rebound.addresses.is_empty());
        assert!(rebound.problem.unwrap().contains("loopback"));
    }

    #[tokio::test]
    async fn the_probes_resolver_screens_by_its_policy() {
        use reqwest::dns::Resolve as _;
        static STRICT: std::sync::OnceLock<Tenancy> = std::sync::OnceLock::new();
        static LOCAL_OK: std::sync::OnceLock<Tenancy> = std::sync::OnceLock::new();
        static UNSET: std::sync::OnceLock<Tenancy> = std::sync::OnceLock::new();
        let _ = STRICT.set(strict());
        let _ = LOCAL_OK.set(Tenancy {
            allow_local_upstreams: true,
            ..strict()
        });
        let name = || "localhost".parse::<reqwest::dns::Name>().unwrap();
        let refused = ScreenedResolver { policy: &STRICT }
            .resolve(name())
            .await
            .err()
            .unwrap();
        assert!(refused.downcast_ref::<Refused>().is_some(), "{refused}");
        assert!(refused.to_string().contains("is a loopback address"), "{refused}");
        for policy in [&LOCAL_OK, &UNSET] {
            let addrs: Vec<_> = ScreenedResolver { policy }.resolve(name()).await.unwrap().collect();
            assert!(
                !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()),
                "{addrs:?}"
            );
        }
    }

    /// A name already pinned is not looked up again for a new snapshot, only at the refresh,
    /// which comes however often snapshots do; a name rebound to loopback by then loses its
    /// address.
    #[tokio::test(start_paused = true)]
    async fn new_snapshots_look_up_new_names_and_the_refresh_every_name() {
        use std::collections::HashMap;
        use std::sync::Mutex;
        let answers: Arc<Mutex<HashMap<String, Vec<IpAddr>>>> = Arc::new(Mutex::new(HashMap::new()));
        let asked: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(vec![]));
        answers
            .lock()
            .unwrap()
            .insert("a.example".into(), ips(&["203.0.113.7"]));
        answers
            .lock()
            .unwrap()
            .insert("b.example".into(), ips(&["203.0.113.8"]));
        let (ans, ask) = (answers.clone(), asked.clone());
        let lookup = move |host: String, _port: u16| {
            ask.lock().unwrap().push(host.clone());
            let found = ans.lock().unwrap().get(&host).cloned();
            async move { found.ok_or_else(|| format!("{host} does not resolve")) }
        };
        let refresh = Duration::from_secs(30);
        let start = tokio::time::Instant::now();
        let (snap_tx, mut pins_rx, task) = started(snap(vec![named("a.example", 443)], 1), refresh, lookup);
        let key = |h: &str| (h.to_string(), 443);
        pins_rx.changed().await.unwrap();
        assert_eq!(
            pins_rx.borrow_and_update()[&key("a.example")].addresses,
            ips(&["203.0.113.7"])
        );

        // a.example is rebound to loopback; a snapshot adds b.example 20 s later: only b is
        // looked up, a keeps its address until the refresh.
        answers.lock().unwrap().insert("a.example".into(), ips(&["127.0.0.1"]));
        tokio::time::sleep(Duration::from_secs(20)).await;
        snap_tx
            .send(snap(vec![named("a.example", 443), named("b.example", 443)], 2))
            .unwrap();
        pins_rx.changed().await.unwrap();
        {
            let pins = pins_rx.borrow_and_update();
            assert_eq!(pins[&key("a.example")].addresses, ips(&["203.0.113.7"]));
            assert_eq!(pins[&key("b.example")].addresses, ips(&["203.0.113.8"]));
        }
        assert_eq!(*asked.lock().unwrap(), ["a.example", "b.example"]);

        // The refresh 30 s after the start (10 s after the snapshot): every name again.
        pins_rx.changed().await.unwrap();
        let took = start.elapsed();
        assert!(took >= refresh && took < refresh + Duration::from_secs(1), "{took:?}");
        let pins = pins_rx.borrow_and_update().clone();
        assert!(pins[&key("a.example")].addresses.is_empty(), "{pins:?}");
        assert!(pins[&key("a.example")].problem.as_deref().unwrap().contains("loopback"));
        assert_eq!(pins[&key("b.example")].addresses, ips(&["203.0.113.8"]));
        assert_eq!(
            *asked.lock().unwrap(),
            ["a.example", "b.example", "a.example", "b.example"]
        );
        task.abort();
    }

    /// Names whose lookups take the whole timeout (one tenant's, say) hold up neither a name
    /// of the same snapshot nor a later snapshot's new name, even when there are more of them
    /// than lookups in flight (the later name waits for one lookup's time, not for the queue),
    /// nor a name that comes during a refresh of them all: answers go out as they come.
    #[tokio::test(start_paused = true)]
    async fn slow_names_hold_up_no_other_name() {
        let lookup = |host: String, _port: u16| async move {
            if host.starts_with("slow") {
                tokio::time::sleep(RESOLVE_TIMEOUT).await;
            }
            Ok(ips(&["203.0.113.7"]))
        };
        let slow_names =
            |n: usize| -> Vec<UpstreamCluster> { (0..n).map(|i| named(&format!("slow{i:03}.example"), 443)).collect() };
        let with = |slow: usize, extra: &[&str], version: u64| {
            let mut clusters = slow_names(slow);
            clusters.extend(extra.iter().map(|h| named(h, 443)));
            snap(clusters, version)
        };
        let refresh = Duration::from_secs(30);
        let start = tokio::time::Instant::now();
        let (snap_tx, mut pins_rx, task) = started(with(40, &["a.example"], 1), refresh, lookup);
        let key = |h: &str| (h.to_string(), 443);
        // Waits until `host` is pinned; how many slow names were by then, and when.
        let mut pinned_at = async |host: &str| -> (usize, u64) {
            loop {
                {
                    let pins = pins_rx.borrow_and_update();
                    if pins.contains_key(&key(host)) {
                        let slow = pins.keys().filter(|(h, _)| h.starts_with("slow")).count();
                        return (slow, start.elapsed().as_secs());
                    }
                }
                pins_rx.changed().await.unwrap();
            }
        };
        assert_eq!(pinned_at("a.example").await, (0, 0), "a.example beside 40 slow names");
        tokio::time::sleep(Duration::from_secs(1)).await;
        snap_tx.send(with(40, &["a.example", "b.example"], 2)).unwrap();
        assert_eq!(
            pinned_at("b.example").await,
            (0, 1),
            "a later snapshot's name while they are looked up"
        );
        assert_eq!(pinned_at("slow039.example").await, (40, 5));

        // 200 slow names, more than the lookups in flight: a name that comes a second later
        // starts with the first lookup that ends, not after the 72 queued before it.
        snap_tx.send(with(200, &["a.example", "b.example"], 3)).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        snap_tx
            .send(with(200, &["a.example", "b.example", "c.example"], 4))
            .unwrap();
        assert_eq!(pinned_at("c.example").await, (168, 10));
        assert_eq!(pinned_at("slow199.example").await, (200, 15));

        // The refresh at 30 s looks every name up again, at most 24 at a time; a name that
        // comes a second later is looked up at once all the same.
        tokio::time::sleep_until(start + refresh + Duration::from_secs(1)).await;
        snap_tx
            .send(with(200, &["a.example", "b.example", "d.example"], 5))
            .unwrap();
        assert_eq!(pinned_at("d.example").await, (200, 31), "a new name during the refresh");
        task.abort();
    }

    #[test]
    fn a_push_waits_for_a_pin_from_its_first_wait_on_once_per_snapshot() {
        let wait = Duration::from_secs(1);
        let t0 = tokio::time::Instant::now();
        let mut w = PinWait::default();
        assert_eq!(w.hold(1, false, t0, wait), None, "every name pinned: at once");
        assert_eq!(w.deadline(), None);
        assert_eq!(w.hold(1, true, t0, wait), Some(wait));
        assert_eq!(w.deadline(), Some(t0 + wait));
        // A later change does not put the deadline off.
        let t1 = t0 + Duration::from_millis(600);
        assert_eq!(w.hold(2, true, t1, wait), Some(Duration::from_millis(400)));
        assert_eq!(w.hold(2, true, t0 + wait, wait), None, "the wait is over");
        assert_eq!(w.deadline(), None);
        // That snapshot's later pushes (the filter configuration after its clusters) go at once.
        assert_eq!(w.hold(2, true, t0 + wait * 2, wait), None);
        // The next change waits afresh, until its pin comes.
        assert_eq!(w.hold(3, true, t0 + wait * 2, wait), Some(wait));
        assert_eq!(w.hold(3, false, t0 + wait * 2, wait), None, "the pin came");
        assert_eq!(w.deadline(), None);
    }

    #[tokio::test]
    async fn run_pins_the_snapshots_names_and_follows_a_new_snapshot() {
        let (snap_tx, snap_rx) = watch::channel(snap(vec![named("localhost", 5000), named("127.0.0.1", 5001)], 1));
        let (pins_tx, mut pins_rx) = watch::channel(Arc::new(PinMap::new()));
        let metrics = Arc::new(crate::ops::Metrics::default());
        let task = tokio::spawn(run(
            strict(),
            snap_rx,
            pins_tx,
            Duration::from_secs(3600),
            metrics.clone(),
        ));
        pins_rx.changed().await.unwrap();
        let pins = pins_rx.borrow_and_update().clone();
        // Literals need no pin; `localhost` (loopback, no opt-in) gets no address.
        assert_eq!(pins.len(), 1, "{pins:?}");
        let pin = &pins[&("localhost".to_string(), 5000)];
        assert!(pin.addresses.is_empty(), "{pin:?}");
        assert!(pin.problem.as_deref().unwrap().contains("loopback"), "{pin:?}");
        assert!(
            metrics
                .render_text()
                .contains("connector_controller_upstream_names{result=\"none\"} 1"),
            "{}",
            metrics.render_text()
        );

        snap_tx
            .send(snap(vec![named("localhost", 5000), named("localhost", 5002)], 2))
            .unwrap();
        pins_rx.changed().await.unwrap();
        assert!(pins_rx.borrow().contains_key(&("localhost".to_string(), 5002)));
        task.abort();
    }

    /// A resolver on the system's options asking only the name server on `socket`, each query
    /// given 30 s (as a `resolv.conf` may say) and one attempt.
    fn resolver_at(socket: &std::net::UdpSocket) -> hickory_resolver::TokioResolver {
        resolver_searching(socket, &[], 1).build().unwrap()
    }

    /// [`resolver_at`]'s builder with a search list and `ndots`, as a pod's `resolv.conf` has.
    fn resolver_searching(
        socket: &std::net::UdpSocket,
        search: &[&str],
        ndots: usize,
    ) -> hickory_resolver::ResolverBuilder<hickory_resolver::net::runtime::TokioRuntimeProvider> {
        use hickory_resolver::config::{ConnectionConfig, NameServerConfig};
        let mut udp = ConnectionConfig::udp();
        udp.port = socket.local_addr().unwrap().port();
        let server = NameServerConfig::new("127.0.0.1".parse().unwrap(), true, vec![udp]);
        let search = search
            .iter()
            .map(|d| hickory_resolver::proto::rr::Name::from_str_relaxed(d).unwrap())
            .collect();
        let mut builder = hickory_resolver::TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, search, vec![server]),
            hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
        );
        configure(builder.options_mut());
        builder.options_mut().timeout = Duration::from_secs(30);
        builder.options_mut().attempts = 1;
        builder.options_mut().ndots = ndots;
        builder
    }

    /// A name `/etc/hosts` lists (a pod's `hostAliases`) is found there under a pod's `ndots:5`
    /// and search list, its name server (silent here) not asked; left to hickory's own reading
    /// of the file, which covers only the first name of the search list, it went to DNS and was
    /// not found within the wait.
    #[tokio::test]
    async fn a_name_in_hosts_is_found_there_under_a_pods_search_list() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let pod = ["demo.svc.cluster.local", "svc.cluster.local", "cluster.local"];
        let resolver = resolver_searching(&silent, &pod, 5).build().unwrap();
        let mut hosts = hickory_resolver::Hosts::default();
        hosts.read_hosts_conf(&b"203.0.113.5 registry.internal\n"[..]).unwrap();
        let within = Duration::from_millis(800);
        let start = Instant::now();
        // Found in the file, no resolver is built (no `resolv.conf` read) for it.
        let found = lookup(&hosts, "Registry.Internal", within, || Err("built".into())).await;
        assert_eq!(found, Ok(ips(&["203.0.113.5"])));
        assert!(start.elapsed() < Duration::from_millis(300), "{:?}", start.elapsed());
        let unlisted = lookup(&hosts, "other.internal", within, || Ok(resolver.clone())).await;
        assert!(unlisted.unwrap_err().contains("did not resolve within"), "asked DNS");

        // hickory's own: the file read, the name still sent to the name server first.
        let mut builder = resolver_searching(&silent, &pod, 5);
        builder.options_mut().use_hosts_file = hickory_resolver::config::ResolveHosts::Always;
        let mut theirs = builder.build().unwrap();
        theirs.set_hosts(Arc::new(hosts));
        let answer = tokio::time::timeout(within, theirs.lookup_ip("registry.internal")).await;
        assert!(answer.is_err(), "hickory found it in the file itself now: {answer:?}");
    }

    /// A name server that answers A queries (203.0.113.9) and never AAAA ones, as some drop
    /// them: the name resolves to its IPv4 address once the AAAA query is given up, where a
    /// lookup of both families as one (hickory's `lookup_ip`) waited for the AAAA query's 30 s.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_family_never_answered_costs_the_wait_not_the_name() {
        use hickory_resolver::proto::op::Message;
        use hickory_resolver::proto::rr::{RData, Record, RecordType, rdata::A};
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let answering = server.try_clone().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = asked.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, from)) = answering.recv_from(&mut buf) else {
                    continue;
                };
                let query = Message::from_vec(&buf[..n]).unwrap();
                let q = query.queries[0].clone();
                seen.lock().unwrap().push(q.query_type());
                if q.query_type() == RecordType::A {
                    let mut answer = query.into_response();
                    answer.metadata.recursion_available = true;
                    answer.add_answer(Record::from_rdata(
                        q.name().clone(),
                        60,
                        RData::A(A("203.0.113.9".parse().unwrap())),
                    ));
                    answering.send_to(&answer.to_vec().unwrap(), from).unwrap();
                }
            }
        });
        let resolver = resolver_at(&server);
        let start = Instant::now();
        let found = lookup(
            &hickory_resolver::Hosts::default(),
            "registry.one-family.example",
            Duration::from_secs(1),
            || Ok(resolver),
        )
        .await;
        let took = start.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        thread.join().unwrap();
        assert_eq!(found, Ok(ips(&["203.0.113.9"])), "after {took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        let asked = asked.lock().unwrap();
        assert!(asked.contains(&RecordType::AAAA), "both families asked: {asked:?}");
    }

    /// A pod's `resolv.conf` (options hickory does not know among them) gives its name server,
    /// search list and `ndots`; none (no file, no name server) gives glibc's 127.0.0.1, the
    /// file's search list and options kept.
    #[test]
    fn resolv_conf_as_a_pod_has_it_and_as_glibc_reads_none() {
        let pod = b"search demo.svc.cluster.local svc.cluster.local cluster.local\n\
                    nameserver 10.96.0.10\n\
                    options ndots:5 trust-ad no-such-option timeout:2 attempts:3\n";
        let (config, options) = resolv_conf(pod);
        let servers: Vec<IpAddr> = config.name_servers().iter().map(|n| n.ip).collect();
        assert_eq!(servers, ips(&["10.96.0.10"]));
        assert_eq!(config.search().len(), 3, "{config:?}");
        assert_eq!(
            (options.ndots, options.timeout, options.attempts),
            (5, Duration::from_secs(2), 3)
        );
        for none in [&b""[..], b"search example.com\n"] {
            let (config, _) = resolv_conf(none);
            let servers: Vec<IpAddr> = config.name_servers().iter().map(|n| n.ip).collect();
            assert_eq!(servers, ips(&["127.0.0.1"]));
        }
        // Without a name server the rest still holds, as for glibc: the search list and options.
        let (config, options) = resolv_conf(b"search corp.example lab.example\noptions ndots:3\n");
        let search: Vec<String> = config.search().iter().map(|n| n.to_string()).collect();
        assert_eq!(search, ["corp.example", "lab.example"]);
        assert_eq!(options.ndots, 3);
    }

    /// The soft limit is raised to the hard one (a container's is often 1,024 of 524,288).
    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_one() {
        let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap();
        let lowered = hard.min(4096);
        rlimit::Resource::NOFILE.set(lowered, hard).unwrap();
        assert_eq!(raise_open_file_limit(), Ok(hard));
        assert_eq!(rlimit::Resource::NOFILE.get().unwrap(), (hard, hard));
        rlimit::Resource::NOFILE.set(soft.max(lowered), hard).unwrap();
    }

    /// Open file descriptors and threads of this process.
    fn fds_and_threads() -> (usize, usize) {
        let count = |dir: &str| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        (count("/proc/self/fd"), count("/proc/self/task"))
    }

    /// Hundreds of lookups whose name server never answers take no thread each, leave a name
    /// `/etc/hosts` holds answering at once, and free their sockets when given up (the system
    /// resolver held a blocking thread per lookup until it gave up itself: 30 s here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_that_never_answer_hold_no_thread_and_free_their_sockets_when_given_up() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let resolver = resolver_at(&silent);

        let (fds_before, threads_before) = fds_and_threads();
        let slow: Vec<_> = (0..300)
            .map(|i| {
                let r = resolver.clone();
                tokio::spawn(async move {
                    let none = hickory_resolver::Hosts::default();
                    lookup(&none, &format!("n{i}.slow.example"), Duration::from_secs(2), || Ok(r)).await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (fds_during, threads_during) = fds_and_threads();
        assert!(
            fds_during >= fds_before + 300,
            "the lookups are in flight, a socket each at least: {fds_before} -> {fds_during} descriptors"
        );
        assert!(
            threads_during < threads_before + 32,
            "300 lookups in flight took threads: {threads_before} -> {threads_during}"
        );
        let start = Instant::now();
        let hosts = hickory_resolver::Hosts::from_system().unwrap();
        let local = lookup(&hosts, "localhost", Duration::from_secs(2), || Ok(resolver.clone()))
            .await
            .unwrap();
        assert!(local.iter().all(IpAddr::is_loopback) && !local.is_empty(), "{local:?}");
        assert!(start.elapsed() < Duration::from_millis(500), "{:?}", start.elapsed());

        for task in slow {
            let e = task.await.unwrap().unwrap_err();
            assert!(e.contains("did not resolve within 2 s"), "{e}");
        }
        let (fds_after, _) = fds_and_threads();
        eprintln!(
            "descriptors {fds_before} -> {fds_during} -> {fds_after}, threads {threads_before} -> {threads_during}"
        );
        assert!(
            fds_after < fds_before + 50,
            "given-up lookups keep no socket: {fds_before} before, {fds_during} during, {fds_after} after"
        );
    }
}
