//! Owns "who may use a connector" in API mode, decided by Kubernetes RBAC: a
//! SubjectAccessReview on the connector (`connectors.alauda.io`, resource `connectors`, its
//! name and namespace) for the verb of what the request does: `get` to pull (in strict mode
//! `get` on its `proxy` subresource), `push` to push, `delete-artifacts` to delete. So a Role
//! like `{apiGroups: [connectors.alauda.io], resources: [connectors], verbs: [get]}` bound to a
//! ServiceAccount lets its pods pull, and only pull, through the connector (deploy/base ships
//! the ClusterRoles oci-connector-user, -pusher and -maintainer).
//!
//! Answers are cached per (user, groups, connector): allows for `allow_ttl` (30 s by
//! default), denials for `deny_ttl` (5 s), so a new RoleBinding takes effect quickly and a
//! burst of pulls costs one review. The filter caches on its side for the `ttl` handed back.
//!
//! Revocation (issue 12.10): the filter also names the objects the caller's token is bound to
//! (its `kubernetes.io` claims: the ServiceAccount's uid, and the Pod's name and uid for a token
//! bound to a Pod). Each access call checks them against the live objects (a GET, remembered for
//! [`LIVE_TTL`]), and an allowed answer is handed back for at most `revocation` (5 s), so a
//! deleted ServiceAccount or Pod, or one deleted and re-created under the same name, gets its
//! tokens refused within seconds instead of at their `exp`. The SubjectAccessReview cache is
//! unaffected: re-asking costs a loopback call and a cached GET.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Api;
use kube::api::PostParams;

use connector_core::verb::Verb;

pub const GROUP: &str = "connectors.alauda.io";
pub const RESOURCE: &str = "connectors";
pub const STRICT_SUBRESOURCE: &str = "proxy";
/// Bound on cached decisions; expired ones are dropped first, then all.
const MAX_CACHED: usize = 10_000;

/// Told the outcome of each access check (`allowed`, `denied`, `allowed_cached`,
/// `denied_cached`, `revoked`, `error`): the controller counts them in its metrics.
pub type ReviewObserver = Arc<dyn Fn(&'static str) + Send + Sync>;

/// An observer for callers that count nothing.
pub fn ignore_reviews() -> ReviewObserver {
    Arc::new(|_| {})
}

/// How long a ServiceAccount's or Pod's uid, as read from the API server, is relied on.
pub const LIVE_TTL: Duration = Duration::from_secs(1);

/// An access decision for the filter: the controller channel's `/v1/access` answer as is.
pub use connector_core::channel::AccessAnswer;

/// The objects a caller's token is bound to, as the filter read them from its claims.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BoundTo {
    pub service_account_uid: Option<String>,
    /// `(name, uid)` of the Pod a token is bound to.
    pub pod: Option<(String, String)>,
}

/// Who may use a connector, asked per (user, connector): RBAC in API mode.
pub trait AccessCheck: Send + Sync {
    fn check<'a>(
        &'a self,
        user: &'a str,
        namespace: &'a str,
        name: &'a str,
        verb: Verb,
    ) -> BoxFuture<'a, Result<AccessAnswer, String>>;

    /// [`Self::check`] for a caller whose token is bound to `bound`; a check that cannot tell
    /// whether those still exist ignores them.
    fn check_bound<'a>(
        &'a self,
        user: &'a str,
        bound: &'a BoundTo,
        namespace: &'a str,
        name: &'a str,
        verb: Verb,
    ) -> BoxFuture<'a, Result<AccessAnswer, String>> {
        let _ = bound;
        self.check(user, namespace, name, verb)
    }
}

#[derive(Debug, Clone)]
pub struct AuthzSettings {
    /// Check `get` on `connectors/proxy` instead of `get` on `connectors`.
    pub strict: bool,
    pub allow_ttl: Duration,
    pub deny_ttl: Duration,
    /// The longest the filter may keep an allowed answer for a token bound to objects: the
    /// time within which deleting them refuses the token (plus [`LIVE_TTL`]).
    pub revocation: Duration,
}

impl Default for AuthzSettings {
    fn default() -> Self {
        Self {
            strict: false,
            allow_ttl: Duration::from_secs(30),
            deny_ttl: Duration::from_secs(5),
            revocation: Duration::from_secs(5),
        }
    }
}

/// A live object's uid as last read (`None`: it does not exist), and until when it is relied on.
type LiveKey = (&'static str, String, String);
type Live = (Option<String>, Instant);

/// An access decision and how long it may be relied on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The authorizer's reason (RBAC names the binding that allowed), or ours.
    pub reason: String,
    /// How long the caller may keep it (what is left of the cached entry).
    pub ttl: Duration,
    /// Answered from the cache, without a SubjectAccessReview.
    pub cached: bool,
}

type Key = (String, Vec<String>, String, String, Verb);
/// A cached decision: allowed, reason, valid until.
type Cached = (bool, String, Instant);

#[derive(Clone)]
pub struct Authorizer {
    api: Api<SubjectAccessReview>,
    settings: AuthzSettings,
    observe: ReviewObserver,
    cache: Arc<Mutex<HashMap<Key, Cached>>>,
    client: kube::Client,
    live: Arc<Mutex<HashMap<LiveKey, Live>>>,
}

impl Authorizer {
    pub fn new(client: kube::Client, settings: AuthzSettings, observe: ReviewObserver) -> Self {
        Self {
            api: Api::all(client.clone()),
            settings,
            observe,
            cache: Arc::default(),
            client,
            live: Arc::default(),
        }
    }

    /// The uid of the ServiceAccount or Pod `namespace/name` now (`None`: it does not exist),
    /// from a read at most [`LIVE_TTL`] old.
    async fn live_uid(&self, kind: &'static str, namespace: &str, name: &str) -> Result<Option<String>, kube::Error> {
        let key: LiveKey = (kind, namespace.to_string(), name.to_string());
        let now = Instant::now();
        if let Some((uid, until)) = self.live_lock().get(&key).cloned()
            && until > now
        {
            return Ok(uid);
        }
        let uid = if kind == "Pod" {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            pods.get_metadata_opt(name).await?.and_then(|p| p.metadata.uid)
        } else {
            let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
            sas.get_metadata_opt(name).await?.and_then(|s| s.metadata.uid)
        };
        let mut live = self.live_lock();
        if live.len() >= MAX_CACHED {
            live.retain(|_, (_, until)| *until > now);
            if live.len() >= MAX_CACHED {
                live.clear();
            }
        }
        live.insert(key, (uid.clone(), now + LIVE_TTL));
        Ok(uid)
    }

    /// Why the token bound to `bound` of ServiceAccount `user` is no longer good, or `None`
    /// when the objects it names still exist with the uids it names.
    pub async fn revoked(&self, user: &str, bound: &BoundTo) -> Result<Option<String>, kube::Error> {
        let Some((namespace, name)) = user
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
        else {
            return Ok(None);
        };
        let live = self.live_uid("ServiceAccount", namespace, name).await?;
        match (&live, &bound.service_account_uid) {
            (None, _) => {
                return Ok(Some(format!(
                    "ServiceAccount {namespace}/{name} no longer exists: its tokens are refused"
                )));
            }
            (Some(now), Some(claimed)) if now != claimed => {
                return Ok(Some(format!(
                    "ServiceAccount {namespace}/{name} was deleted and re-created since the token was issued: request a new token"
                )));
            }
            _ => {}
        }
        if let Some((pod, claimed)) = &bound.pod {
            match self.live_uid("Pod", namespace, pod).await? {
                None => {
                    return Ok(Some(format!(
                        "Pod {namespace}/{pod}, which the token is bound to, no longer exists: its tokens are refused"
                    )));
                }
                Some(now) if &now != claimed => {
                    return Ok(Some(format!(
                        "Pod {namespace}/{pod}, which the token is bound to, was deleted and re-created: request a new token"
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(None)
    }

    fn live_lock(&self) -> std::sync::MutexGuard<'_, HashMap<LiveKey, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May `user` (with `groups`) use connector `namespace/connector`? Errors are the API
    /// server's (unreachable, forbidden to create reviews); they are not cached.
    pub async fn allowed(
        &self,
        user: &str,
        groups: &[String],
        namespace: &str,
        connector: &str,
        verb: Verb,
    ) -> Result<Decision, kube::Error> {
        let mut sorted = groups.to_vec();
        sorted.sort();
        sorted.dedup();
        let key: Key = (user.into(), sorted, namespace.into(), connector.into(), verb);
        let now = Instant::now();
        if let Some((allowed, reason, until)) = self.lock().get(&key).cloned()
            && until > now
        {
            (self.observe)(if allowed { "allowed_cached" } else { "denied_cached" });
            return Ok(Decision {
                allowed,
                reason,
                ttl: until - now,
                cached: true,
            });
        }
        let review = self.review(&key);
        let answer = match self.api.create(&PostParams::default(), &review).await {
            Ok(a) => a,
            Err(e) => {
                (self.observe)("error");
                return Err(e);
            }
        };
        let status = answer.status.unwrap_or_default();
        let allowed = status.allowed && status.denied != Some(true);
        let reason = match (&status.reason, allowed) {
            (Some(r), _) if !r.is_empty() => r.clone(),
            (_, true) => "allowed by RBAC".to_string(),
            (_, false) => format!(
                "no RBAC rule grants {} on {}{} {namespace}/{connector}",
                verb.rbac_verb(),
                RESOURCE,
                if self.strict_for(verb) { "/proxy" } else { "" }
            ),
        };
        let ttl = if allowed {
            self.settings.allow_ttl
        } else {
            self.settings.deny_ttl
        };
        (self.observe)(if allowed { "allowed" } else { "denied" });
        tracing::debug!(user, connector = %format!("{namespace}/{connector}"), allowed, "access review");
        {
            let mut cache = self.lock();
            if cache.len() >= MAX_CACHED {
                cache.retain(|_, (_, _, until)| *until > now);
                if cache.len() >= MAX_CACHED {
                    cache.clear();
                }
            }
            cache.insert(key, (allowed, reason.clone(), now + ttl));
        }
        Ok(Decision {
            allowed,
            reason,
            ttl,
            cached: false,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Cached>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Strict mode moves pull to the `proxy` subresource; push and delete have verbs of their
    /// own, which no broad `get` grant carries, so they stay on the resource.
    fn strict_for(&self, verb: Verb) -> bool {
        self.settings.strict && verb == Verb::Pull
    }

    fn review(&self, (user, groups, namespace, name, verb): &Key) -> SubjectAccessReview {
        SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.clone()),
                groups: (!groups.is_empty()).then(|| groups.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GROUP.into()),
                    resource: Some(RESOURCE.into()),
                    subresource: self.strict_for(*verb).then(|| STRICT_SUBRESOURCE.into()),
                    verb: Some(verb.rbac_verb().into()),
                    namespace: Some(namespace.clone()),
                    name: Some(name.clone()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        }
    }
}

/// The groups Kubernetes puts a ServiceAccount in (`system:serviceaccount:<ns>:<name>`):
/// `system:serviceaccounts`, `system:serviceaccounts:<ns>`, `system:authenticated`. RBAC rules
/// bound to those groups must count, and the filter only passes the username.
pub fn service_account_groups(user: &str) -> Vec<String> {
    let mut groups = vec![];
    if let Some(rest) = user.strip_prefix("system:serviceaccount:")
        && let Some((namespace, name)) = rest.split_once(':')
        && !namespace.is_empty()
        && !name.is_empty()
    {
        groups.push("system:serviceaccounts".to_string());
        groups.push(format!("system:serviceaccounts:{namespace}"));
    }
    groups.push("system:authenticated".to_string());
    groups
}

/// The loopback channel's `/v1/access`: the filter names the subject only.
impl AccessCheck for Authorizer {
    fn check<'a>(
        &'a self,
        user: &'a str,
        namespace: &'a str,
        name: &'a str,
        verb: Verb,
    ) -> BoxFuture<'a, Result<AccessAnswer, String>> {
        Box::pin(async move {
            let groups = service_account_groups(user);
            let d = self
                .allowed(user, &groups, namespace, name, verb)
                .await
                .map_err(|e| format!("SubjectAccessReview failed: {e}"))?;
            Ok(AccessAnswer {
                allowed: d.allowed,
                ttl_seconds: d.ttl.as_secs().max(1),
                reason: d.reason,
            })
        })
    }

    /// The objects the token is bound to first (a revoked token is refused whatever RBAC
    /// says), then RBAC; an allowed answer is kept by the filter for at most `revocation`.
    fn check_bound<'a>(
        &'a self,
        user: &'a str,
        bound: &'a BoundTo,
        namespace: &'a str,
        name: &'a str,
        verb: Verb,
    ) -> BoxFuture<'a, Result<AccessAnswer, String>> {
        Box::pin(async move {
            let revoked = self
                .revoked(user, bound)
                .await
                .map_err(|e| format!("reading the token's ServiceAccount or Pod failed: {e}"))?;
            if let Some(reason) = revoked {
                (self.observe)("revoked");
                // Short: the filter keys answers by the token's uids, but a ServiceAccount
                // re-created just now may still read as gone for LIVE_TTL.
                return Ok(AccessAnswer {
                    allowed: false,
                    ttl_seconds: LIVE_TTL.as_secs().max(1),
                    reason,
                });
            }
            let mut answer = self.check(user, namespace, name, verb).await?;
            if answer.allowed {
                answer.ttl_seconds = answer.ttl_seconds.min(self.settings.revocation.as_secs().max(1));
            }
            Ok(answer)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_groups_follow_kubernetes() {
        assert_eq!(
            service_account_groups("system:serviceaccount:ci:builder"),
            [
                "system:serviceaccounts",
                "system:serviceaccounts:ci",
                "system:authenticated"
            ]
        );
        assert_eq!(service_account_groups("alice"), ["system:authenticated"]);
        assert_eq!(
            service_account_groups("system:serviceaccount:ci"),
            ["system:authenticated"]
        );
    }
}
