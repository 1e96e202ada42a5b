//! Owns a Connector's `status`: the condition list (`SecretReady`, `LivenessReady`,
//! `AuthReady`, `ProxyReady`, `Ready`), the transitions between two lists (each one becomes an
//! Event), and `status.proxy.httpAddress.url`. Pure functions: the reconciler gathers what it
//! observed (Secret, probes, what Envoy did) and these turn it into status.
//!
//! Messages say what is wrong and what to change; none ever holds a value from the Secret
//! (conditions and events are readable by far more people than the Secret is).

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::Connector;
use crate::hub::{ConnectorKey, ProxyState, Published};
use crate::probe::ProbeError;
use crate::secrets::{Credential, credential_from_secret};

pub const SECRET_READY: &str = "SecretReady";
pub const LIVENESS_READY: &str = "LivenessReady";
pub const AUTH_READY: &str = "AuthReady";
pub const PROXY_READY: &str = "ProxyReady";
pub const READY: &str = "Ready";

/// Condition types in the order they are written (and in which `Ready` looks for the first
/// failing one).
pub const PARTS: [&str; 4] = [SECRET_READY, LIVENESS_READY, AUTH_READY, PROXY_READY];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// One condition's content before times and generations are added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub status: Status,
    pub reason: String,
    pub message: String,
}

impl Check {
    pub fn new(status: Status, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// What the reconciler observed for one connector: one check per part of `Ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub secret: Check,
    pub liveness: Check,
    pub auth: Check,
    pub proxy: Check,
}

/// `SecretReady` from the connector's Secret (`None`: it does not exist), and the credential
/// when it is ready.
pub fn secret_check(connector: &Connector, secret: Option<&Secret>) -> (Check, Option<Credential>) {
    let namespace = connector.metadata.namespace.as_deref().unwrap_or_default();
    // The authority only matters for a docker config Secret (its `auths` key); a bad address
    // shows in LivenessReady.
    let authority = connector_core::address::Upstream::parse(&connector.spec.address)
        .map(|u| u.authority)
        .unwrap_or_default();
    let outcome = credential_from_secret(
        namespace,
        &connector.spec.auth.secret_ref.name,
        connector.metadata.name.as_deref().unwrap_or_default(),
        secret,
        &authority,
    );
    let c = outcome.condition;
    let status = if c.status { Status::True } else { Status::False };
    (Check::new(status, c.reason.as_str(), c.message), outcome.credential)
}

/// `LivenessReady` from the liveness probe.
pub fn liveness_check(address: &str, probe: &Result<(), ProbeError>) -> Check {
    match probe {
        Ok(()) => Check::new(
            Status::True,
            "UpstreamReachable",
            format!("{address} answers /v2/ like an OCI registry"),
        ),
        Err(e) => Check::new(Status::False, e.reason, e.message.clone()),
    }
}

/// `AuthReady` from the login probe; `None` when it could not run because the Secret or the
/// upstream is not ready (then the status is Unknown and says which).
pub fn auth_check(secret: &Check, liveness: &Check, probe: Option<&Result<(), ProbeError>>) -> Check {
    match probe {
        Some(Ok(())) => Check::new(
            Status::True,
            "CredentialAccepted",
            "the registry accepts the Secret's credential (login as docker login does it)",
        ),
        Some(Err(e)) => Check::new(Status::False, e.reason, e.message.clone()),
        None if secret.status != Status::True => Check::new(
            Status::Unknown,
            "SecretNotReady",
            "the login is not tried until SecretReady is True",
        ),
        None if liveness.status != Status::True => Check::new(
            Status::Unknown,
            "UpstreamNotLive",
            "the login is not tried until LivenessReady is True",
        ),
        None => Check::new(Status::Unknown, "NotProbed", "the login has not been tried yet"),
    }
}

/// `ProxyReady`: is the connector in the configuration Envoy accepted?
pub fn proxy_check(key: &ConnectorKey, published: Option<&Published>, proxy: &ProxyState) -> Check {
    let (ok, reason, message) = crate::hub::proxy_ready(key, published, proxy);
    Check::new(if ok { Status::True } else { Status::False }, reason, message)
}

/// `Ready`: True when all four parts are; otherwise the first failing part's reason and
/// message (its status False, or Unknown when that part is Unknown).
pub fn ready_check(observed: &Observed) -> Check {
    let parts = [
        (SECRET_READY, &observed.secret),
        (LIVENESS_READY, &observed.liveness),
        (AUTH_READY, &observed.auth),
        (PROXY_READY, &observed.proxy),
    ];
    match parts.iter().find(|(_, c)| c.status != Status::True) {
        None => Check::new(
            Status::True,
            "Ready",
            "the connector serves pulls and pushes through the proxy",
        ),
        Some((type_, c)) => Check::new(
            if c.status == Status::False {
                Status::False
            } else {
                Status::Unknown
            },
            c.reason.clone(),
            format!("{type_}: {}", c.message),
        ),
    }
}

/// The condition list for `observed`. `lastTransitionTime` is kept from `old` when a type's
/// status did not change, and is `now` otherwise.
pub fn build(old: &[Condition], observed: &Observed, generation: Option<i64>, now: Timestamp) -> Vec<Condition> {
    let ready = ready_check(observed);
    let checks = [
        (SECRET_READY, &observed.secret),
        (LIVENESS_READY, &observed.liveness),
        (AUTH_READY, &observed.auth),
        (PROXY_READY, &observed.proxy),
        (READY, &ready),
    ];
    checks
        .iter()
        .map(|(type_, check)| {
            let status = check.status.as_str();
            let last_transition_time = old
                .iter()
                .find(|c| c.type_ == *type_ && c.status == status)
                .map_or(Time(now), |c| c.last_transition_time.clone());
            Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: check.reason.clone(),
                message: check.message.clone(),
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect()
}

/// A condition that changed status or reason between two lists: one Event each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

impl Transition {
    /// Events of a condition that became True are `Normal`, the others `Warning`.
    pub fn is_normal(&self) -> bool {
        self.status == "True"
    }
}

/// The conditions of `new` that are not in `old` with the same status and reason.
pub fn transitions(old: &[Condition], new: &[Condition]) -> Vec<Transition> {
    new.iter()
        .filter(|n| {
            !old.iter()
                .any(|o| o.type_ == n.type_ && o.status == n.status && o.reason == n.reason)
        })
        .map(|n| Transition {
            type_: n.type_.clone(),
            status: n.status.clone(),
            reason: n.reason.clone(),
            message: n.message.clone(),
        })
        .collect()
}

/// Whether a condition list says `Ready=True`.
pub fn is_ready(conditions: &[Condition]) -> bool {
    conditions.iter().any(|c| c.type_ == READY && c.status == "True")
}

/// `status.proxy.httpAddress.url`: the proxy's base URL (e.g. `http://192.168.1.10:31567`)
/// followed by the path-form prefix of the connector.
pub fn proxy_url(base: &str, namespace: &str, name: &str) -> String {
    format!(
        "{}/namespaces/{namespace}/connectors/{name}",
        base.trim_end_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{AuthName, ConnectorAuth, ConnectorClass, ConnectorSpec, SecretRef};
    use crate::probe;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    const PASSWORD: &str = "pa55-w0rd-never-shown";

    fn connector() -> Connector {
        let mut c = Connector::new(
            "registry",
            ConnectorSpec {
                address: "http://127.0.0.1:5000".into(),
                auth: ConnectorAuth {
                    name: AuthName::BasicAuth,
                    secret_ref: SecretRef { name: "creds".into() },
                },
                connector_class_name: ConnectorClass::Oci,
                allowed_namespaces: vec![],
                allowed_service_accounts: vec![],
                token_realms: vec![],
                hosts: vec![],
                read_only: false,
            },
        );
        c.metadata.namespace = Some("demo".into());
        c
    }

    fn secret(type_: &str, keys: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                annotations: Some(
                    [(
                        crate::secrets::ALLOWED_CONNECTORS_ANNOTATION.to_string(),
                        "*".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            type_: Some(type_.into()),
            data: Some(
                keys.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Secret::default()
        }
    }

    fn t() -> Check {
        Check::new(Status::True, "Ok", "fine")
    }

    fn err(reason: &'static str) -> ProbeError {
        ProbeError {
            reason,
            message: format!("{reason} happened"),
        }
    }

    #[test]
    fn secret_checks() {
        let good = secret(
            crate::secrets::TYPE_REGISTRY_TOKEN,
            &[("username", "robot"), ("password", PASSWORD)],
        );
        let opaque = secret("Opaque", &[("username", "robot"), ("password", PASSWORD)]);
        let no_password = secret(crate::secrets::TYPE_BASIC_AUTH, &[("username", "robot")]);
        // (case, secret, status, reason, credential present)
        let cases: Vec<(&str, Option<&Secret>, Status, &str, bool)> = vec![
            ("good", Some(&good), Status::True, "SecretReady", true),
            ("missing", None, Status::False, "SecretNotFound", false),
            (
                "wrong type",
                Some(&opaque),
                Status::False,
                "SecretTypeUnsupported",
                false,
            ),
            (
                "missing key",
                Some(&no_password),
                Status::False,
                "SecretKeyMissing",
                false,
            ),
        ];
        for (case, s, status, reason, has_credential) in cases {
            let (check, credential) = secret_check(&connector(), s);
            assert_eq!(check.status, status, "{case}: {check:?}");
            assert_eq!(check.reason, reason, "{case}");
            assert_eq!(credential.is_some(), has_credential, "{case}");
            assert!(check.message.contains("demo/creds"), "{case}: {}", check.message);
            assert!(!check.message.contains(PASSWORD), "{case}: the password is shown");
        }
    }

    #[test]
    fn liveness_and_auth_checks() {
        let live = liveness_check("http://r", &Ok(()));
        assert_eq!((live.status, live.reason.as_str()), (Status::True, "UpstreamReachable"));
        let dead = liveness_check("http://r", &Err(err(probe::UPSTREAM_UNREACHABLE)));
        assert_eq!(
            (dead.status, dead.reason.as_str()),
            (Status::False, "UpstreamUnreachable")
        );
        let bad_secret = Check::new(Status::False, "SecretNotFound", "x");
        // (case, secret, liveness, probe, status, reason)
        let rejected = Err(err(probe::CREDENTIAL_REJECTED));
        let realm = Err(err(probe::REALM_NOT_ALLOWED));
        type Case<'a> = (
            &'a str,
            &'a Check,
            &'a Check,
            Option<&'a Result<(), ProbeError>>,
            Status,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (
                "accepted",
                &live,
                &live,
                Some(&Ok(())),
                Status::True,
                "CredentialAccepted",
            ),
            (
                "rejected",
                &live,
                &live,
                Some(&rejected),
                Status::False,
                "CredentialRejected",
            ),
            (
                "realm refused",
                &live,
                &live,
                Some(&realm),
                Status::False,
                "RealmNotAllowed",
            ),
            (
                "secret not ready",
                &bad_secret,
                &live,
                None,
                Status::Unknown,
                "SecretNotReady",
            ),
            ("upstream down", &live, &dead, None, Status::Unknown, "UpstreamNotLive"),
        ];
        for (case, s, l, p, status, reason) in cases {
            let c = auth_check(s, l, p);
            assert_eq!((c.status, c.reason.as_str()), (status, reason), "{case}: {c:?}");
        }
    }

    #[test]
    fn proxy_checks_follow_envoy() {
        let key = ("demo".to_string(), "registry".to_string());
        let published = Published {
            version: 3,
            connectors: [(key.clone(), ())].into_iter().collect(),
            ..Published::default()
        };
        let acked = ProxyState {
            connected: true,
            accepted: Some(3),
            rejected: None,
            ..Default::default()
        };
        let nacked = ProxyState {
            connected: true,
            accepted: Some(2),
            rejected: Some((3, "bad filter".into())),
            ..Default::default()
        };
        for (case, p, s, status, reason) in [
            ("accepted", Some(&published), &acked, Status::True, "Accepted"),
            ("rejected", Some(&published), &nacked, Status::False, "Rejected"),
            ("nothing rendered", None, &acked, Status::False, "NotRendered"),
        ] {
            let c = proxy_check(&key, p, s);
            assert_eq!((c.status, c.reason.as_str()), (status, reason), "{case}: {c:?}");
        }
    }

    #[test]
    fn istio_mode_says_when_the_wasmplugin_refused_the_configuration_as_too_large() {
        let key = ("demo".to_string(), "registry".to_string());
        let published = |version| Published {
            version,
            connectors: [(key.clone(), ())].into_iter().collect(),
            ..Published::default()
        };
        let istio = |written: Option<u64>, refused: Option<u64>| ProxyState {
            plugin_config: Some(written),
            plugin_refused: refused.map(|v| (v, format!("version {v} is too large"))),
            ..Default::default()
        };
        for (case, version, s, status, reason) in [
            ("written", 3, istio(Some(3), None), Status::True, "PluginConfigWritten"),
            (
                "refused",
                4,
                istio(Some(3), Some(4)),
                Status::False,
                "PluginConfigTooLarge",
            ),
            (
                "refused, nothing written before",
                4,
                istio(None, Some(4)),
                Status::False,
                "PluginConfigTooLarge",
            ),
            // A later version is not the refused one: pending until written.
            (
                "refused an older one",
                5,
                istio(Some(3), Some(4)),
                Status::False,
                "PluginConfigPending",
            ),
            (
                "a later one written",
                5,
                istio(Some(5), Some(4)),
                Status::True,
                "PluginConfigWritten",
            ),
        ] {
            let c = proxy_check(&key, Some(&published(version)), &s);
            assert_eq!((c.status, c.reason.as_str()), (status, reason), "{case}: {c:?}");
            if reason == "PluginConfigTooLarge" {
                assert_eq!(c.message, "version 4 is too large", "{case}");
            }
        }
    }

    #[test]
    fn ready_is_the_first_failing_part() {
        let f = |r: &str| Check::new(Status::False, r, format!("{r} message"));
        let u = |r: &str| Check::new(Status::Unknown, r, format!("{r} message"));
        let all = |s, l, a, p| Observed {
            secret: s,
            liveness: l,
            auth: a,
            proxy: p,
        };
        // (case, observed, status, reason, message part)
        let cases = vec![
            ("all true", all(t(), t(), t(), t()), Status::True, "Ready", "serves"),
            (
                "secret first",
                all(
                    f("SecretNotFound"),
                    f("UpstreamUnreachable"),
                    u("SecretNotReady"),
                    f("NotConfigured"),
                ),
                Status::False,
                "SecretNotFound",
                "SecretReady: SecretNotFound message",
            ),
            (
                "liveness",
                all(t(), f("UpstreamUnreachable"), u("UpstreamNotLive"), t()),
                Status::False,
                "UpstreamUnreachable",
                "LivenessReady:",
            ),
            (
                "auth unknown",
                all(t(), t(), u("NotProbed"), t()),
                Status::Unknown,
                "NotProbed",
                "AuthReady:",
            ),
            (
                "proxy rejected",
                all(t(), t(), t(), f("Rejected")),
                Status::False,
                "Rejected",
                "ProxyReady: Rejected message",
            ),
        ];
        for (case, observed, status, reason, part) in cases {
            let r = ready_check(&observed);
            assert_eq!((r.status, r.reason.as_str()), (status, reason), "{case}");
            assert!(r.message.contains(part), "{case}: {}", r.message);
        }
    }

    #[test]
    fn transition_times_and_transitions() {
        let t0 = Timestamp::from_second(1_000_000).unwrap();
        let t1 = Timestamp::from_second(2_000_000).unwrap();
        let f = |r: &str| Check::new(Status::False, r, "m");
        let first = build(
            &[],
            &Observed {
                secret: t(),
                liveness: t(),
                auth: t(),
                proxy: f("Pending"),
            },
            Some(1),
            t0,
        );
        let types: Vec<&str> = first.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, [SECRET_READY, LIVENESS_READY, AUTH_READY, PROXY_READY, READY]);
        assert!(
            first
                .iter()
                .all(|c| c.last_transition_time.0 == t0 && c.observed_generation == Some(1))
        );
        assert!(!is_ready(&first));
        // Every condition is new: one transition each.
        assert_eq!(transitions(&[], &first).len(), 5);

        // Proxy becomes ready: ProxyReady and Ready change (time t1); the rest keep t0.
        let second = build(
            &first,
            &Observed {
                secret: t(),
                liveness: t(),
                auth: t(),
                proxy: t(),
            },
            Some(2),
            t1,
        );
        assert!(is_ready(&second));
        for c in &second {
            let changed = c.type_ == PROXY_READY || c.type_ == READY;
            assert_eq!(c.last_transition_time.0, if changed { t1 } else { t0 }, "{}", c.type_);
            assert_eq!(c.observed_generation, Some(2));
        }
        let tr = transitions(&first, &second);
        let names: Vec<(&str, bool)> = tr.iter().map(|t| (t.type_.as_str(), t.is_normal())).collect();
        assert_eq!(names, [(PROXY_READY, true), (READY, true)]);

        // Same status, new reason (Pending → Rejected): a transition, but the time is kept.
        let third = build(
            &first,
            &Observed {
                secret: t(),
                liveness: t(),
                auth: t(),
                proxy: f("Rejected"),
            },
            Some(1),
            t1,
        );
        let proxy = third.iter().find(|c| c.type_ == PROXY_READY).unwrap();
        assert_eq!(proxy.last_transition_time.0, t0);
        let tr = transitions(&first, &third);
        assert_eq!(tr.len(), 2, "{tr:?}");
        assert!(tr.iter().all(|t| !t.is_normal()));

        // Nothing changed: no transitions.
        assert!(transitions(&second, &second).is_empty());
    }

    #[test]
    fn proxy_urls() {
        for (base, want) in [
            (
                "http://192.168.1.10:31567",
                "http://192.168.1.10:31567/namespaces/demo/connectors/harbor",
            ),
            (
                "http://192.168.1.10:31567/",
                "http://192.168.1.10:31567/namespaces/demo/connectors/harbor",
            ),
            (
                "https://proxy.example.com",
                "https://proxy.example.com/namespaces/demo/connectors/harbor",
            ),
        ] {
            assert_eq!(proxy_url(base, "demo", "harbor"), want);
        }
    }
}
