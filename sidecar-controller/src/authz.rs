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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::Api;
use kube::api::PostParams;

use connector_filter::channel::Verb;

use crate::channel::{AccessAnswer, AccessCheck};
use crate::ops::Metrics;

pub const GROUP: &str = "connectors.alauda.io";
pub const RESOURCE: &str = "connectors";
pub const STRICT_SUBRESOURCE: &str = "proxy";
/// Bound on cached decisions; expired ones are dropped first, then all.
const MAX_CACHED: usize = 10_000;

#[derive(Debug, Clone)]
pub struct AuthzSettings {
    /// Check `get` on `connectors/proxy` instead of `get` on `connectors`.
    pub strict: bool,
    pub allow_ttl: Duration,
    pub deny_ttl: Duration,
}

impl Default for AuthzSettings {
    fn default() -> Self {
        Self {
            strict: false,
            allow_ttl: Duration::from_secs(30),
            deny_ttl: Duration::from_secs(5),
        }
    }
}

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
    metrics: Arc<Metrics>,
    cache: Arc<Mutex<HashMap<Key, Cached>>>,
}

impl Authorizer {
    pub fn new(client: kube::Client, settings: AuthzSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            api: Api::all(client),
            settings,
            metrics,
            cache: Arc::default(),
        }
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
            Metrics::result(
                &self.metrics.access_reviews,
                if allowed { "allowed_cached" } else { "denied_cached" },
            );
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
                Metrics::result(&self.metrics.access_reviews, "error");
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
        Metrics::result(&self.metrics.access_reviews, if allowed { "allowed" } else { "denied" });
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
                ttl_secs: d.ttl.as_secs().max(1),
                reason: d.reason,
            })
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
