//! Owns the request flow after the engine decided to forward: the controller's access decision
//! (RBAC mode), the connector's credential from the controller, the probe for the upstream's
//! challenge, and the upstream's bearer token, fetched once per key while the other requests for
//! it wait (single flight), with their waiters resumed or failed.
//!
//! A plain state machine: its inputs are the request's [`Target`], the VM's configuration and
//! caches ([`Vm`]) and the host's answers ([`CallAnswer`], or "could not be dispatched", or "the
//! request went away"); its outputs are [`Act`]s. It makes no proxy-wasm call: the shim performs
//! the acts with host calls and reports back, so native tests walk every path, failed calls
//! included.

use std::rc::Rc;

use crate::channel::{self, AccessCache, CredentialCache};
use crate::config::{Config, Connector, UpstreamCredential};
use crate::engine::{Forward, ResponsePlan};
use crate::leak::SecretsMemo;
use crate::respond::Refusal;
use crate::upstream::{Challenge, Step, TokenKey, UpstreamAuth, learn_challenge, parse_token_response, token_key};

/// Where a forwarded request goes and with which credential, taken from the engine's decision
/// so the request path never looks the connector up a second time.
pub struct Target {
    /// The connector addressed, shared with the configuration it was decided under.
    pub connector: Rc<Connector>,
    /// The caller's identity, shared with the token cache; `bound` names the objects its token
    /// is bound to, which the controller checks with the access.
    pub caller: Rc<crate::identity::Identity>,
    /// The controller must still confirm the caller may use the connector.
    pub check_access: bool,
    /// What the request does (pull, push, delete): RBAC mode asks about exactly that.
    pub verb: channel::Verb,
    /// The connector's Basic credential: sent to Basic upstreams and to token realms. Empty
    /// until the controller supplied it, for a controller-sourced credential.
    pub basic: String,
}

impl Target {
    /// The target of the engine's `forward` for a request of `method`, with the token scopes it
    /// needs and what the response phase keeps.
    pub fn of(forward: Forward, method: &str) -> (Target, Vec<String>, ResponsePlan) {
        let f = forward;
        let basic = match &f.connector().credential {
            UpstreamCredential::Static(v) => v.clone(),
            UpstreamCredential::Controller { .. } => String::new(),
        };
        let target = Target {
            connector: Rc::clone(f.connector()),
            caller: f.caller,
            check_access: f.check_access,
            verb: channel::Verb::of_method(method),
            basic,
        };
        (target, f.scopes, f.response)
    }

    /// `<namespace>/<name>` of the connector.
    fn label(&self) -> &str {
        self.connector.label()
    }

    /// The caller, `system:serviceaccount:<ns>:<sa>`: what the controller's access check asks
    /// about.
    fn subject(&self) -> &str {
        self.caller.subject()
    }

    /// The credential revision the request's configuration names (empty for a static
    /// credential, which is never asked for).
    fn revision_of(&self) -> &str {
        match &self.connector.credential {
            UpstreamCredential::Controller { revision } => revision,
            UpstreamCredential::Static(_) => "",
        }
    }
}

/// What the flow reads and updates of the VM's state: the configuration and the caches shared
/// by every request of the VM.
pub struct Vm<'a> {
    pub config: &'a Config,
    pub access: &'a mut AccessCache,
    pub credentials: &'a mut CredentialCache,
    pub upstream: &'a mut UpstreamAuth,
    pub secrets: &'a mut SecretsMemo,
}

/// What an HTTP call brought back. The default (status 0) is "no answer": the call broke off,
/// timed out, or its answer could not be read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CallAnswer {
    pub status: u32,
    pub www_authenticate: Option<String>,
    pub body: Vec<u8>,
}

/// One HTTP call to send while the request waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    /// The stat to count once the host took the call (a token fetch), if any.
    pub sent_stat: Option<String>,
}

impl Call {
    pub fn header_refs(&self) -> Vec<(&str, &str)> {
        self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }
}

/// What the shim does next for this request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Act {
    /// Put this `Authorization` value on the request (replacing the client's) and let it go on.
    Forward { authorization: String },
    /// Remove the client's credential, send the call and keep the request paused. A call the
    /// host will not take is reported with [`Flow::not_dispatched`].
    CallCluster(Call),
    /// Remove the client's credential and keep the request paused: another request fetches the
    /// token it needs and resumes it.
    Pause,
    /// Answer the request with this refusal; `warn`: log it first.
    Respond { refusal: Refusal, warn: bool },
    /// The token this request fetched: forward it with `authorization`, then every waiter.
    ResumeWaiters { authorization: String, waiters: Vec<u32> },
    /// The token fetch failed: answer every waiter with the refusal, then this request;
    /// `warn`: log it first.
    FailWaiters {
        waiters: Vec<u32>,
        refusal: Refusal,
        warn: bool,
    },
}

impl Act {
    fn refuse(refusal: Refusal) -> Act {
        Act::Respond { refusal, warn: false }
    }

    fn warn(refusal: Refusal) -> Act {
        Act::Respond { refusal, warn: true }
    }
}

/// What a paused request is waiting for.
enum Waiting {
    /// The controller's access decision for this caller and connector (RBAC mode).
    Access { target: Target, scopes: Vec<String> },
    /// The connector's upstream credential from the controller.
    Credential { target: Target, scopes: Vec<String> },
    /// This request asked the upstream for its challenge (`GET /v2/`).
    Challenge { target: Target, scopes: Vec<String> },
    /// This request fetches the token for `key`; others may wait on it.
    Token { key: TokenKey, realm: String },
    /// Another request fetches the token for `key`; it resumes this one.
    OtherFetch { key: TokenKey },
}

/// Expiry cannot be checked without the time: a request is refused, never taken as valid
/// (read as 0, every cached token and decision would look fresh).
pub fn no_clock() -> Refusal {
    Refusal::unavailable("the connector proxy could not read the clock to check expiry: retry")
        .with_reason("host_call_failed")
}

/// One request's place in the flow; `id` is its context, the one waiters are resumed by.
#[derive(Default)]
pub struct Flow {
    waiting: Option<Waiting>,
    /// The cached upstream token this request carries: dropped if the upstream refuses it.
    used_token: Option<TokenKey>,
    /// What the connector's Basic credential this request was forwarded with (also what a
    /// token service got) looks like in an answer: an upstream answer must never repeat it.
    sent_secrets: Option<Rc<[Vec<u8>]>>,
}

impl Flow {
    /// The upstream token this request was forwarded with, if any.
    pub fn used_token(&self) -> Option<&str> {
        self.used_token.as_deref()
    }

    /// Takes the upstream token this request was forwarded with, to drop it from the cache.
    pub fn take_used_token(&mut self) -> Option<TokenKey> {
        self.used_token.take()
    }

    /// What the credential this request was forwarded with looks like in an answer.
    pub fn sent_secrets(&self) -> Option<&Rc<[Vec<u8>]>> {
        self.sent_secrets.as_ref()
    }

    /// Whether an HTTP call's answer is awaited (a late answer for anything else is ignored).
    pub fn awaits_call(&self) -> bool {
        matches!(
            self.waiting,
            Some(
                Waiting::Access { .. } | Waiting::Credential { .. } | Waiting::Challenge { .. } | Waiting::Token { .. }
            )
        )
    }

    /// A request the engine forwards: its checks and its upstream credential, each from the
    /// VM's caches or, on a miss, asked for while the request waits.
    pub fn start(&mut self, vm: &mut Vm<'_>, target: Target, scopes: Vec<String>, id: u32, now: u64) -> Act {
        self.proceed(vm, target, scopes, id, now)
    }

    /// The host would not edit the request's headers for the last act: the request is refused,
    /// and nothing of it waits any more.
    pub fn not_sent(&mut self) {
        self.waiting = None;
        self.used_token = None;
    }

    /// The host would not take the client's credential off this request before the call of the
    /// last [`Act::CallCluster`]: the call is not made and the request is refused with `refusal`.
    /// A token fetch it was to make is given up, so the requests waiting on that token are
    /// answered now ([`Act::FailWaiters`]) and the next request fetches, instead of all of them
    /// waiting for Envoy's timeout.
    pub fn call_not_made(&mut self, vm: &mut Vm<'_>, refusal: Refusal) -> Act {
        self.used_token = None;
        match self.waiting.take() {
            Some(Waiting::Token { key, .. }) => {
                let waiters = vm.upstream.complete(&key, &Err(refusal.clone()), 0);
                Act::FailWaiters {
                    waiters,
                    refusal,
                    warn: false,
                }
            }
            _ => Act::refuse(refusal),
        }
    }

    /// The host would not send the call of the last [`Act::CallCluster`] (to `cluster`).
    pub fn not_dispatched(&mut self, vm: &mut Vm<'_>, cluster: &str) -> Act {
        match self.waiting.take() {
            Some(Waiting::Access { .. } | Waiting::Credential { .. }) => Act::refuse(
                Refusal::unavailable(format!(
                    "the proxy cannot reach the connector controller (Envoy cluster {cluster}): retry"
                ))
                .with_reason("controller_unavailable"),
            ),
            Some(Waiting::Challenge { target, .. }) => Act::refuse(Refusal::unavailable_upstream(format!(
                "the proxy cannot reach the upstream of connector {} (Envoy cluster {})",
                target.label(),
                target.connector.cluster
            ))),
            Some(Waiting::Token { key, realm }) => {
                let refusal = Refusal::unavailable_upstream(format!(
                    "the proxy cannot reach the token service {realm} (Envoy cluster {cluster})"
                ));
                let waiters = vm.upstream.complete(&key, &Err(refusal.clone()), 0);
                Act::FailWaiters {
                    waiters,
                    refusal,
                    warn: false,
                }
            }
            // Nothing was being sent: cannot happen after a `CallCluster`.
            Some(w @ Waiting::OtherFetch { .. }) => {
                self.waiting = Some(w);
                Act::refuse(Refusal::unavailable(
                    "the connector proxy lost track of this request: retry",
                ))
            }
            None => Act::refuse(Refusal::unavailable(
                "the connector proxy lost track of this request: retry",
            )),
        }
    }

    /// The answer to this request's call. `now` reads the clock (only where the answer needs
    /// it; `None` when it cannot be read: a request that goes on to cached decisions is then
    /// refused, since every cached entry would look fresh). `None`: the request waits for no
    /// call, and the answer changes nothing.
    pub fn answer(
        &mut self,
        vm: &mut Vm<'_>,
        answer: &CallAnswer,
        id: u32,
        now: &dyn Fn() -> Option<u64>,
    ) -> Option<Act> {
        let CallAnswer {
            status,
            www_authenticate,
            body,
        } = answer;
        let status = *status;
        Some(match self.waiting.take() {
            Some(Waiting::Access { mut target, scopes }) => {
                let Some(now) = now() else {
                    return Some(Act::refuse(no_clock()));
                };
                match channel::parse_access(status, body, target.label()) {
                    Ok((allowed, ttl)) => {
                        let key = channel::access_key(target.subject(), &target.caller.bound);
                        vm.access.insert(&key, target.label(), target.verb, allowed, ttl, now);
                        if allowed {
                            target.check_access = false;
                            self.proceed(vm, target, scopes, id, now)
                        } else {
                            Act::refuse(crate::engine::not_permitted_rbac(
                                target.label(),
                                target.subject(),
                                target.verb,
                            ))
                        }
                    }
                    Err(r) => Act::warn(r),
                }
            }
            Some(Waiting::Credential { mut target, scopes }) => {
                match channel::parse_credential(status, body, target.label(), target.revision_of()) {
                    Ok(authorization) => {
                        // Cached only for the configuration now in force: a request that began
                        // on the previous one (a rotation meanwhile) uses its answer but does
                        // not leave the old revision's credential behind for the new one.
                        if vm.config.connector_by_label(target.label()).map(|c| c.revision)
                            == Some(target.connector.revision)
                        {
                            vm.credentials.insert(target.label(), authorization.clone());
                        }
                        target.basic = authorization;
                        match now() {
                            Some(now) => self.proceed(vm, target, scopes, id, now),
                            None => Act::refuse(no_clock()),
                        }
                    }
                    Err(r) => Act::warn(r),
                }
            }
            Some(Waiting::Challenge { target, scopes }) => {
                // Realm checks need the connector's tokenRealms: the one lookup, once per upstream.
                let learned = vm
                    .config
                    .connector_by_label(target.label())
                    // Removed while this request waited: answered as the configuration now in
                    // force answers it, like a connector that does not exist (issue 17).
                    .ok_or_else(|| crate::engine::removed_meanwhile(target.label(), target.subject()))
                    .and_then(|c| {
                        learn_challenge(c, status, www_authenticate.as_deref())
                            .map_err(|r| crate::upstream::with_envoy_detail(r, status, body))
                    });
                match learned {
                    Ok(challenge) => {
                        vm.upstream.learn(target.label(), challenge);
                        match now() {
                            Some(now) => self.authorize_upstream(vm, target, scopes, id, now),
                            None => Act::refuse(no_clock()),
                        }
                    }
                    Err(r) => Act::refuse(r),
                }
            }
            Some(Waiting::Token { key, realm }) => {
                let result = parse_token_response(status, body, &realm)
                    .map_err(|r| crate::upstream::with_envoy_detail(r, status, body));
                // Stored at 0 when the clock fails, the token is expired when next looked at:
                // fetched again, never kept too long. The waiters take it as fetched.
                let waiters = vm.upstream.complete(&key, &result, now().unwrap_or(0));
                match result {
                    Ok((authorization, _)) => {
                        self.used_token = Some(key);
                        Act::ResumeWaiters { authorization, waiters }
                    }
                    Err(refusal) => Act::FailWaiters {
                        waiters,
                        refusal,
                        warn: true,
                    },
                }
            }
            // A late answer for a request that no longer waits for one: nothing to do.
            other => {
                self.waiting = other;
                return None;
            }
        })
    }

    /// The request went away (client disconnected). A fetcher must not leave its waiters
    /// hanging: the waiters to answer with the refusal, if it was one.
    pub fn done(&mut self, vm: &mut Vm<'_>, id: u32) -> Option<(Vec<u32>, Refusal)> {
        match self.waiting.take() {
            Some(Waiting::Token { key, realm }) => {
                let waiters = vm.upstream.abandon(&key);
                let r = Refusal::unavailable_upstream(format!(
                    "the token fetch from {realm} was abandoned by the request that started it: retry"
                ));
                Some((waiters, r))
            }
            Some(Waiting::OtherFetch { key }) => {
                vm.upstream.leave(&key, id);
                None
            }
            _ => None,
        }
    }

    /// The steps before the upstream credential goes on: the controller's access decision
    /// (RBAC mode) and the connector's credential from the controller.
    fn proceed(&mut self, vm: &mut Vm<'_>, mut target: Target, scopes: Vec<String>, id: u32, now: u64) -> Act {
        if target.check_access {
            let key = channel::access_key(target.subject(), &target.caller.bound);
            match vm.access.get(&key, target.label(), target.verb, now) {
                Some(true) => target.check_access = false,
                Some(false) => {
                    return Act::refuse(crate::engine::not_permitted_rbac(
                        target.label(),
                        target.subject(),
                        target.verb,
                    ));
                }
                None => {
                    let call = vm.config.controller.as_ref().map(|ch| {
                        (
                            ch.cluster.clone(),
                            channel::access_call(
                                ch,
                                &target.connector.namespace,
                                &target.connector.name,
                                target.subject(),
                                &target.caller.bound,
                                target.verb,
                            ),
                        )
                    });
                    return self.call_controller(call, Waiting::Access { target, scopes });
                }
            }
        }
        if matches!(target.connector.credential, UpstreamCredential::Controller { .. }) && target.basic.is_empty() {
            match vm.credentials.get(target.label()) {
                Some(v) => target.basic = v.to_string(),
                None => {
                    let call = vm.config.controller.as_ref().map(|ch| {
                        (
                            ch.cluster.clone(),
                            channel::credential_call(
                                ch,
                                &target.connector.namespace,
                                &target.connector.name,
                                target.revision_of(),
                            ),
                        )
                    });
                    return self.call_controller(call, Waiting::Credential { target, scopes });
                }
            }
        }
        self.authorize_upstream(vm, target, scopes, id, now)
    }

    /// One request to the controller, the request parked until it answers. Without a channel
    /// (it cannot happen with a validated configuration) the request is refused: never
    /// forwarded without its checks.
    fn call_controller(&mut self, call: Option<(String, channel::ChannelCall)>, waiting: Waiting) -> Act {
        let Some((cluster, call)) = call else {
            return Act::refuse(Refusal::unavailable(
                "the configuration names no controller channel: the connector proxy cannot check this request",
            ));
        };
        self.waiting = Some(waiting);
        Act::CallCluster(Call {
            cluster,
            headers: call.headers,
            sent_stat: None,
        })
    }

    /// Puts the connector's upstream credential on the request: Basic right away, or a bearer
    /// token (cached, fetched by this request, or fetched by another one this request waits
    /// for). The first request to a connector asks the upstream which it wants.
    fn authorize_upstream(&mut self, vm: &mut Vm<'_>, target: Target, scopes: Vec<String>, id: u32, now: u64) -> Act {
        self.sent_secrets = Some(vm.secrets.of(&target.basic));
        let realm = match vm.upstream.challenge(target.label()) {
            None => {
                let call = Call {
                    cluster: target.connector.cluster.clone(),
                    headers: vec![
                        (":method".into(), "GET".into()),
                        (":path".into(), "/v2/".into()),
                        (":authority".into(), target.connector.upstream.authority.clone()),
                        (":scheme".into(), target.connector.upstream.scheme.clone()),
                    ],
                    sent_stat: None,
                };
                self.waiting = Some(Waiting::Challenge { target, scopes });
                return Act::CallCluster(call);
            }
            Some(Challenge::Open | Challenge::Basic) => {
                return Act::Forward {
                    authorization: target.basic,
                };
            }
            Some(Challenge::Bearer(realm)) => realm.clone(),
        };
        let key = token_key(target.label(), target.connector.revision, &realm, &scopes);
        match vm.upstream.step(&key, id, now) {
            Step::Send(authorization) => {
                self.used_token = Some(key);
                Act::Forward { authorization }
            }
            Step::Wait(key) => {
                self.waiting = Some(Waiting::OtherFetch { key: key.clone() });
                self.used_token = Some(key);
                Act::Pause
            }
            Step::Fetch(key) => {
                let sent_stat = Some(crate::stats::token_fetch(target.label()));
                let call = Call {
                    headers: vec![
                        (":method".into(), "GET".into()),
                        (":path".into(), crate::upstream::token_request_path(&realm, &scopes)),
                        (":authority".into(), realm.authority.clone()),
                        ("authorization".into(), target.basic),
                        ("accept".into(), "application/json".into()),
                    ],
                    cluster: realm.cluster.clone(),
                    sent_stat,
                };
                self.waiting = Some(Waiting::Token {
                    key,
                    realm: format!("{}://{}{}", realm.scheme, realm.authority, realm.path),
                });
                Act::CallCluster(call)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Walks the flow through every path with the acts the shim would perform, the host's
    //! answers fed back as the shim would feed them.

    use super::*;
    use crate::config::compile;
    use crate::engine::{Decision, Request, decide_request};
    use crate::identity::TokenCache;
    use crate::testkeys::*;
    use jsonwebtoken::Algorithm;
    use serde_json::json;

    const MANIFEST: &str = "/v2/namespaces/demo/connectors/reg/lib/app/manifests/v1";
    const STATIC: &str = "Basic cm9ib3Q6cHc=";
    const BEARER: &str = r#"Bearer realm="https://auth.example.com/token",service="s""#;
    const TOKEN_PATH: &str = "/token?service=s&scope=repository%3Alib%2Fapp%3Apull";

    /// The VM's state as the shim holds it.
    struct World {
        config: Config,
        access: AccessCache,
        credentials: CredentialCache,
        upstream: UpstreamAuth,
        secrets: SecretsMemo,
        /// What the clock reads when an answer asks for it (`None`: it cannot be read).
        clock: Option<u64>,
    }

    impl World {
        /// One connector, `demo/reg`, behind a controller channel. `rbac`: the controller
        /// decides access; `from_controller`: it also holds the connector's credential.
        fn new(rbac: bool, from_controller: bool) -> World {
            let config = Self::compile(&Self::doc(rbac, from_controller));
            World {
                config,
                access: AccessCache::default(),
                credentials: CredentialCache::default(),
                upstream: UpstreamAuth::default(),
                secrets: SecretsMemo::default(),
                clock: Some(NOW),
            }
        }

        fn compile(doc: &serde_json::Value) -> Config {
            compile(doc.to_string().as_bytes(), &|k| (k == "P").then(|| "pw".to_string())).unwrap()
        }

        fn doc(rbac: bool, from_controller: bool) -> serde_json::Value {
            let mut doc = json!({
                "identity": {"issuers": [ISSUER], "audiences": [AUDIENCE], "jwks": jwks()},
                "controller": {"cluster": "connector_controller", "authority": "connector-controller"},
                "connectors": [
                    {"namespace": "demo", "name": "reg", "address": "http://registry.example:5000", "cluster": "up_demo",
                     "credential": {"username": "robot", "passwordEnv": "P"},
                     "tokenRealms": [{"url": "https://auth.example.com/token", "cluster": "auth"}]},
                ]
            });
            if rbac {
                doc["authorization"] = json!("controller");
            }
            if from_controller {
                doc["connectors"][0]["credential"] = json!({"fromController": "rev-1"});
            }
            doc
        }

        fn vm(&mut self) -> Vm<'_> {
            Vm {
                config: &self.config,
                access: &mut self.access,
                credentials: &mut self.credentials,
                upstream: &mut self.upstream,
                secrets: &mut self.secrets,
            }
        }

        /// A pull of `demo/reg`'s `lib/app` by `demo/default`, decided by the engine, started
        /// as context `id`.
        fn start(&mut self, flow: &mut Flow, id: u32) -> Act {
            self.start_at(flow, id, NOW)
        }

        fn start_at(&mut self, flow: &mut Flow, id: u32, now: u64) -> Act {
            let token = format!(
                "Bearer {}",
                sign(
                    RSA_KID,
                    Algorithm::RS256,
                    &json!({
                        "iss": ISSUER, "aud": AUDIENCE, "exp": NOW + 600, "nbf": NOW,
                        "sub": "system:serviceaccount:demo:default",
                        "kubernetes.io": {"namespace": "demo", "serviceaccount": {"name": "default", "uid": "sa-uid"}}
                    }),
                )
            );
            let req = Request {
                method: "GET",
                path: MANIFEST,
                authority: "proxy:8443",
                scheme: "https",
                authorization: &[token.as_str()],
            };
            let Decision::Forward(f) = decide_request(&self.config, &mut TokenCache::new(4), &req, now) else {
                panic!("the engine should forward")
            };
            let (target, scopes, plan) = Target::of(*f, "GET");
            assert_eq!(plan.connector.label(), "demo/reg");
            assert_eq!(scopes, vec!["repository:lib/app:pull".to_string()]);
            flow.start(&mut self.vm(), target, scopes, id, now)
        }

        fn answer(&mut self, flow: &mut Flow, id: u32, status: u32, www: Option<&str>, body: &str) -> Option<Act> {
            let answer = CallAnswer {
                status,
                www_authenticate: www.map(str::to_string),
                body: body.as_bytes().to_vec(),
            };
            let clock = self.clock;
            flow.answer(&mut self.vm(), &answer, id, &|| clock)
        }

        /// Answers a request's challenge probe with `status` and `www`.
        fn probe_answer(&mut self, flow: &mut Flow, id: u32, status: u32, www: Option<&str>) -> Act {
            self.answer(flow, id, status, www, "").unwrap()
        }
    }

    fn call(act: &Act) -> &Call {
        match act {
            Act::CallCluster(call) => call,
            other => panic!("expected a call, got {other:?}"),
        }
    }

    fn header<'a>(call: &'a Call, name: &str) -> Option<&'a str> {
        call.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The refusal of a `Respond`: status, reason, message and whether it is logged.
    fn refusal(act: &Act) -> (u16, &'static str, &str, bool) {
        match act {
            Act::Respond { refusal, warn } => (refusal.status, refusal.reason, refusal.message.as_str(), *warn),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn forward(authorization: &str) -> Act {
        Act::Forward {
            authorization: authorization.to_string(),
        }
    }

    /// The probe this flow's request sends to the connector's upstream.
    fn assert_probe(act: &Act) {
        let c = call(act);
        assert_eq!(c.cluster, "up_demo");
        assert_eq!(header(c, ":path"), Some("/v2/"));
        assert_eq!(header(c, ":authority"), Some("registry.example:5000"));
        assert_eq!(header(c, ":scheme"), Some("http"));
        assert_eq!(header(c, "authorization"), None, "the probe carries no credential");
        assert_eq!(c.sent_stat, None);
    }

    /// The token fetch this flow's request sends to the realm's cluster.
    fn assert_fetch(act: &Act) {
        let c = call(act);
        assert_eq!(c.cluster, "auth");
        assert_eq!(header(c, ":path"), Some(TOKEN_PATH));
        assert_eq!(header(c, ":authority"), Some("auth.example.com"));
        assert_eq!(header(c, "authorization"), Some(STATIC));
        assert_eq!(
            c.sent_stat.as_deref(),
            Some("oci_connector.connector.demo.reg.upstream_token_fetches")
        );
    }

    /// A world whose upstream wants bearer tokens, learned by one request's probe.
    fn bearer_world() -> World {
        let mut w = World::new(false, false);
        let mut f = Flow::default();
        assert_probe(&w.start(&mut f, 9));
        assert_fetch(&w.probe_answer(&mut f, 9, 401, Some(BEARER)));
        // That fetch failed: the challenge stays learned, no token is cached.
        let act = w.answer(&mut f, 9, 0, None, "").unwrap();
        assert!(
            matches!(act, Act::FailWaiters { ref waiters, .. } if waiters.is_empty()),
            "{act:?}"
        );
        w
    }

    #[test]
    fn rbac_access_allowed_goes_on_and_is_cached() {
        let mut w = World::new(true, false);
        let mut f = Flow::default();
        let act = w.start(&mut f, 1);
        let c = call(&act);
        assert_eq!(c.cluster, "connector_controller");
        assert_eq!(
            header(c, ":path"),
            Some("/v1/access/demo/reg?user=system%3Aserviceaccount%3Ademo%3Adefault&verb=pull&saUid=sa-uid")
        );
        assert!(f.awaits_call());
        // Allowed: the flow goes on to the upstream's challenge, then forwards.
        let act = w
            .answer(&mut f, 1, 200, None, r#"{"allowed":true,"ttlSeconds":60}"#)
            .unwrap();
        assert_probe(&act);
        assert_eq!(w.probe_answer(&mut f, 1, 200, None), forward(STATIC));
        let act = w.answer(&mut f, 1, 200, None, r#"{"allowed":true,"ttlSeconds":60}"#);
        assert!(act.is_none(), "a second answer is ignored: {act:?}");
        // The next request is not asked about again (cached), and the upstream is known.
        let mut f2 = Flow::default();
        assert_eq!(w.start(&mut f2, 2), forward(STATIC));
    }

    #[test]
    fn rbac_access_answer_allowed_then_probe() {
        let mut w = World::new(true, false);
        let mut f = Flow::default();
        call(&w.start(&mut f, 1));
        let act = w
            .answer(&mut f, 1, 200, None, r#"{"allowed":true,"ttlSeconds":60}"#)
            .unwrap();
        assert_probe(&act);
        assert_eq!(w.access.len(), 1);
        assert_eq!(
            w.probe_answer(&mut f, 1, 401, Some(r#"Basic realm="r""#)),
            forward(STATIC)
        );
        assert_eq!(
            f.sent_secrets().map(|s| s.to_vec()),
            Some(crate::leak::secrets_of(STATIC))
        );
    }

    #[test]
    fn answers_that_lead_to_cached_decisions_are_refused_without_a_clock() {
        // RBAC allowed, but the clock cannot be read: the next steps (cached credentials and
        // tokens) cannot be checked for expiry, so the request is refused, not forwarded.
        let mut w = World::new(true, false);
        let mut f = Flow::default();
        call(&w.start(&mut f, 1));
        w.clock = None;
        let act = w
            .answer(&mut f, 1, 200, None, r#"{"allowed":true,"ttlSeconds":60}"#)
            .unwrap();
        let (status, reason, message, _) = refusal(&act);
        assert_eq!((status, reason), (503, "host_call_failed"));
        assert!(message.contains("clock"), "{message}");
        assert_eq!(w.access.len(), 0, "nothing is cached without a time to expire it by");
        // The upstream's challenge answered while the clock fails: refused the same way.
        w.clock = Some(NOW);
        let mut f2 = Flow::default();
        call(&w.start(&mut f2, 2));
        assert_probe(
            &w.answer(&mut f2, 2, 200, None, r#"{"allowed":true,"ttlSeconds":60}"#)
                .unwrap(),
        );
        w.clock = None;
        let act = w.answer(&mut f2, 2, 401, Some(r#"Basic realm="r""#), "").unwrap();
        assert_eq!(refusal(&act).1, "host_call_failed");
        // With the clock back the same steps forward.
        w.clock = Some(NOW);
        let mut f3 = Flow::default();
        assert_eq!(w.start(&mut f3, 3), forward(STATIC));
    }

    #[test]
    fn rbac_access_denied_refuses_and_is_cached() {
        let mut w = World::new(true, false);
        let mut f = Flow::default();
        call(&w.start(&mut f, 1));
        let act = w.answer(&mut f, 1, 200, None, r#"{"allowed":false}"#).unwrap();
        let (status, reason, message, warn) = refusal(&act);
        assert_eq!((status, reason, warn), (403, "connector_denied", false));
        assert!(message.contains("may not pull"), "{message}");
        // The decision is cached: the next request is refused without asking.
        let mut f2 = Flow::default();
        let act = w.start(&mut f2, 2);
        assert_eq!(refusal(&act).1, "connector_denied");
        assert!(!f2.awaits_call());
    }

    #[test]
    fn an_unreadable_access_answer_refuses_with_a_warning_and_caches_nothing() {
        for (status, body) in [(0, ""), (500, "{}"), (200, "not json"), (200, r#"{"ttlSeconds":5}"#)] {
            let mut w = World::new(true, false);
            let mut f = Flow::default();
            call(&w.start(&mut f, 1));
            let act = w.answer(&mut f, 1, status, None, body).unwrap();
            let (code, reason, _, warn) = refusal(&act);
            assert_eq!(
                (code, reason, warn),
                (503, "controller_unavailable", true),
                "{status} {body}"
            );
            assert!(w.access.is_empty());
            // The next request asks again.
            let mut f2 = Flow::default();
            assert_eq!(call(&w.start(&mut f2, 2)).cluster, "connector_controller");
        }
    }

    #[test]
    fn the_controller_credential_is_fetched_cached_and_known_to_the_echo_check() {
        let mut w = World::new(false, true);
        let mut f = Flow::default();
        let act = w.start(&mut f, 1);
        let c = call(&act);
        assert_eq!(c.cluster, "connector_controller");
        assert_eq!(header(c, ":path"), Some("/v1/credentials/demo/reg?revision=rev-1"));
        assert_eq!(header(c, ":authority"), Some("connector-controller"));
        let act = w
            .answer(
                &mut f,
                1,
                200,
                None,
                r#"{"revision":"rev-1","authorization":"Basic c2VjcmV0"}"#,
            )
            .unwrap();
        assert_probe(&act);
        assert_eq!(
            w.probe_answer(&mut f, 1, 401, Some(r#"Basic realm="r""#)),
            forward("Basic c2VjcmV0")
        );
        // The upstream's answer is checked against the credential the controller supplied.
        assert_eq!(
            f.sent_secrets().map(|s| s.to_vec()),
            Some(crate::leak::secrets_of("Basic c2VjcmV0"))
        );
        // Cached: the next request asks nobody.
        let mut f2 = Flow::default();
        assert_eq!(w.start(&mut f2, 2), forward("Basic c2VjcmV0"));
    }

    #[test]
    fn an_unreadable_credential_answer_or_one_for_another_revision_refuses_and_caches_nothing() {
        for (status, body, needle) in [
            (0, "", "controller"),
            (500, r#"{"error":"boom"}"#, "boom"),
            (200, "not json", "not JSON"),
            (
                200,
                r#"{"revision":"rev-2","authorization":"Basic c2VjcmV0"}"#,
                "\"rev-1\"",
            ),
            (
                200,
                r#"{"revision":"rev-1","authorization":"Digest x"}"#,
                "no usable authorization",
            ),
        ] {
            let mut w = World::new(false, true);
            let mut f = Flow::default();
            call(&w.start(&mut f, 1));
            let act = w.answer(&mut f, 1, status, None, body).unwrap();
            let (code, reason, message, warn) = refusal(&act);
            assert_eq!((code, reason, warn), (503, "controller_unavailable", true), "{body}");
            assert!(message.contains(needle), "{message} should mention {needle}");
            assert!(w.credentials.get("demo/reg").is_none());
            let mut f2 = Flow::default();
            assert_eq!(call(&w.start(&mut f2, 2)).cluster, "connector_controller");
        }
    }

    #[test]
    fn rbac_and_controller_credential_are_asked_in_turn() {
        let mut w = World::new(true, true);
        let mut f = Flow::default();
        let act = w.start(&mut f, 1);
        assert!(header(call(&act), ":path").unwrap().starts_with("/v1/access/"));
        let act = w.answer(&mut f, 1, 200, None, r#"{"allowed":true}"#).unwrap();
        assert!(header(call(&act), ":path").unwrap().starts_with("/v1/credentials/"));
        let act = w
            .answer(
                &mut f,
                1,
                200,
                None,
                r#"{"revision":"rev-1","authorization":"Basic c2VjcmV0"}"#,
            )
            .unwrap();
        assert_probe(&act);
    }

    #[test]
    fn the_challenge_probe_learns_open_basic_and_bearer_upstreams() {
        // Open and Basic: the connector's credential goes on right away, and is remembered.
        for (status, www) in [(200, None), (401, Some(r#"Basic realm="r""#))] {
            let mut w = World::new(false, false);
            let mut f = Flow::default();
            assert_probe(&w.start(&mut f, 1));
            assert_eq!(w.probe_answer(&mut f, 1, status, www), forward(STATIC));
            assert!(!f.awaits_call());
            assert_eq!(f.used_token(), None);
            let mut f2 = Flow::default();
            assert_eq!(w.start(&mut f2, 2), forward(STATIC));
        }
        // Bearer with a listed realm: this request fetches the token with the credential.
        let mut w = World::new(false, false);
        let mut f = Flow::default();
        assert_probe(&w.start(&mut f, 1));
        assert_fetch(&w.probe_answer(&mut f, 1, 401, Some(BEARER)));
        assert!(f.awaits_call());
    }

    #[test]
    fn a_probe_that_is_unanswered_or_names_a_foreign_realm_refuses_and_learns_nothing() {
        for (status, www, reason, needle) in [
            (0, None, "upstream_unavailable", "did not answer"),
            (503, None, "upstream_unavailable", "could not be reached"),
            (
                401,
                Some(r#"Bearer realm="https://evil.example/token",service="s""#),
                "realm_refused",
                "https://evil.example/token",
            ),
            (401, Some("Negotiate x"), "", ""),
        ] {
            let mut w = World::new(false, false);
            let mut f = Flow::default();
            assert_probe(&w.start(&mut f, 1));
            let act = w.probe_answer(&mut f, 1, status, www);
            let (code, got, message, warn) = refusal(&act);
            assert_eq!((code, warn), (503, false), "{status} {www:?}");
            if !reason.is_empty() {
                assert_eq!(got, reason, "{message}");
                assert!(message.contains(needle), "{message}");
            }
            assert!(w.upstream.challenge("demo/reg").is_none());
            let mut f2 = Flow::default();
            assert_probe(&w.start(&mut f2, 2));
        }
    }

    #[test]
    fn a_probe_answered_after_its_connector_was_removed_refuses() {
        let mut w = World::new(false, false);
        let mut f = Flow::default();
        assert_probe(&w.start(&mut f, 1));
        // The next configuration has another connector instead.
        let mut next = World::doc(false, false);
        next["connectors"][0]["name"] = json!("other");
        w.config = World::compile(&next);
        let act = w.probe_answer(&mut f, 1, 200, None);
        let (status, _, message, _) = refusal(&act);
        assert_eq!(status, 403, "{message}");
        assert!(message.contains("does not exist"), "{message}");
    }

    #[test]
    fn one_token_fetch_resumes_every_waiter_and_is_cached() {
        let mut w = bearer_world();
        let (mut fetcher, mut a, mut b) = (Flow::default(), Flow::default(), Flow::default());
        assert_fetch(&w.start(&mut fetcher, 1));
        // Two more requests for the same token wait for that fetch instead of fetching.
        assert_eq!(w.start(&mut a, 2), Act::Pause);
        assert_eq!(w.start(&mut b, 3), Act::Pause);
        assert!(!a.awaits_call(), "a waiter awaits no call of its own");
        let key = a.used_token().map(str::to_string);
        assert!(key.is_some());
        let act = w.answer(&mut fetcher, 1, 200, None, r#"{"token":"t","expires_in":300}"#);
        assert_eq!(
            act,
            Some(Act::ResumeWaiters {
                authorization: "Bearer t".into(),
                waiters: vec![2, 3]
            })
        );
        assert_eq!(fetcher.used_token().map(str::to_string), key);
        // Cached: the next request is forwarded with it at once.
        let mut next = Flow::default();
        assert_eq!(w.start(&mut next, 4), forward("Bearer t"));
        assert_eq!(next.take_used_token(), key);
        assert_eq!(next.used_token(), None);
        // Once the token expired, the next request fetches again.
        let mut later = Flow::default();
        assert_fetch(&w.start_at(&mut later, 5, NOW + 400));
    }

    #[test]
    fn a_failed_token_fetch_fails_its_waiters_with_a_warning_and_caches_nothing() {
        for (status, body, needle) in [
            (0, "", "did not answer in time"),
            (401, "", "refused"),
            (200, "not json", ""),
            (
                503,
                "upstream connect error or disconnect/reset before headers",
                "(Envoy: upstream connect error",
            ),
        ] {
            let mut w = bearer_world();
            let (mut fetcher, mut a) = (Flow::default(), Flow::default());
            assert_fetch(&w.start(&mut fetcher, 1));
            assert_eq!(w.start(&mut a, 2), Act::Pause);
            let act = w.answer(&mut fetcher, 1, status, None, body).unwrap();
            let Act::FailWaiters { waiters, refusal, warn } = act else {
                panic!("{status}: {act:?}")
            };
            assert_eq!(
                (waiters, refusal.status, refusal.reason, warn),
                (vec![2], 503, "token_fetch_failed", true)
            );
            assert!(
                refusal.message.contains("https://auth.example.com/token"),
                "{}",
                refusal.message
            );
            assert!(refusal.message.contains(needle), "{}", refusal.message);
            assert_eq!(w.upstream.cached_tokens(), 0);
            // Nothing is in flight any more: the next request fetches again.
            let mut next = Flow::default();
            assert_fetch(&w.start(&mut next, 3));
        }
    }

    #[test]
    fn a_fetcher_that_went_away_fails_its_waiters_and_a_waiter_that_went_away_is_dropped() {
        let mut w = bearer_world();
        let (mut fetcher, mut a, mut b) = (Flow::default(), Flow::default(), Flow::default());
        assert_fetch(&w.start(&mut fetcher, 1));
        assert_eq!(w.start(&mut a, 2), Act::Pause);
        assert_eq!(w.start(&mut b, 3), Act::Pause);
        // Waiter 3 goes away: it is no longer resumed, and nothing is answered for it.
        assert!(b.done(&mut w.vm(), 3).is_none());
        // The fetcher goes away: its remaining waiter is answered.
        let (waiters, r) = fetcher.done(&mut w.vm(), 1).unwrap();
        assert_eq!((waiters, r.status, r.reason), (vec![2], 503, "upstream_unavailable"));
        assert!(
            r.message.contains("abandoned by the request that started it"),
            "{}",
            r.message
        );
        // Its answer arriving later changes nothing, and the next request fetches again.
        assert!(w.answer(&mut fetcher, 1, 200, None, r#"{"token":"t"}"#).is_none());
        let mut next = Flow::default();
        assert_fetch(&w.start(&mut next, 4));
        // A request that ends while waiting for nothing has no one to answer.
        let mut idle = Flow::default();
        assert!(idle.done(&mut w.vm(), 5).is_none());
    }

    #[test]
    fn failed_dispatches_refuse_and_free_the_token_key() {
        // The controller's channel.
        let mut w = World::new(true, false);
        let mut f = Flow::default();
        let act = w.start(&mut f, 1);
        let act = f.not_dispatched(&mut w.vm(), &call(&act).cluster.clone());
        let (code, reason, message, _) = refusal(&act);
        assert_eq!((code, reason), (503, "controller_unavailable"));
        assert!(message.contains("connector_controller"), "{message}");
        assert!(!f.awaits_call());
        // The upstream's challenge probe.
        let mut w = World::new(false, false);
        let mut f = Flow::default();
        let act = w.start(&mut f, 1);
        let act = f.not_dispatched(&mut w.vm(), &call(&act).cluster.clone());
        let (code, reason, message, _) = refusal(&act);
        assert_eq!((code, reason), (503, "upstream_unavailable"));
        assert!(message.contains("cannot reach the upstream of connector demo/reg (Envoy cluster up_demo)"));
        // The token fetch: the key is freed, so its waiters are answered and the next fetches.
        let mut w = bearer_world();
        let (mut fetcher, mut a) = (Flow::default(), Flow::default());
        let act = w.start(&mut fetcher, 1);
        assert_eq!(w.start(&mut a, 2), Act::Pause);
        let act = fetcher.not_dispatched(&mut w.vm(), &call(&act).cluster.clone());
        let Act::FailWaiters { waiters, refusal, warn } = act else {
            panic!("{act:?}")
        };
        assert_eq!((waiters, refusal.status, warn), (vec![2], 503, false));
        assert!(
            refusal
                .message
                .contains("cannot reach the token service https://auth.example.com/token (Envoy cluster auth)")
        );
        let mut next = Flow::default();
        assert_fetch(&w.start(&mut next, 3));
    }

    #[test]
    fn a_request_whose_headers_cannot_be_edited_waits_for_nothing() {
        let mut w = bearer_world();
        let (mut fetcher, mut a) = (Flow::default(), Flow::default());
        assert_fetch(&w.start(&mut fetcher, 1));
        assert_eq!(w.start(&mut a, 2), Act::Pause);
        a.not_sent();
        assert_eq!(a.used_token(), None);
        assert!(a.done(&mut w.vm(), 2).is_none());
        fetcher.not_sent();
        assert!(!fetcher.awaits_call());
        assert!(w.answer(&mut fetcher, 1, 200, None, r#"{"token":"t"}"#).is_none());
    }

    #[test]
    fn a_token_fetch_whose_request_cannot_be_edited_frees_the_key_and_answers_its_waiters() {
        let mut w = bearer_world();
        let (mut fetcher, mut a) = (Flow::default(), Flow::default());
        assert_fetch(&w.start(&mut fetcher, 1));
        assert_eq!(w.start(&mut a, 2), Act::Pause);
        let act = fetcher.call_not_made(&mut w.vm(), Refusal::unavailable("cannot edit"));
        let Act::FailWaiters {
            waiters, refusal: r, ..
        } = act
        else {
            panic!("{act:?}")
        };
        assert_eq!((waiters, r.status), (vec![2], 503));
        assert!(!fetcher.awaits_call());
        let mut next = Flow::default();
        assert_fetch(&w.start(&mut next, 3));
        // Any other call: just the refusal.
        let mut w = World::new(false, false);
        let mut f = Flow::default();
        assert_probe(&w.start(&mut f, 1));
        let act = f.call_not_made(&mut w.vm(), Refusal::unavailable("cannot edit"));
        assert_eq!(refusal(&act).0, 503);
        assert!(!f.awaits_call());
    }

    #[test]
    fn without_a_controller_channel_nothing_is_forwarded() {
        for (rbac, from_controller) in [(true, false), (false, true)] {
            let mut w = World::new(rbac, from_controller);
            w.config.controller = None;
            let mut f = Flow::default();
            let act = w.start(&mut f, 1);
            let (code, _, message, _) = refusal(&act);
            assert_eq!(code, 503);
            assert!(message.contains("names no controller channel"), "{message}");
            assert!(!f.awaits_call());
        }
    }

    #[test]
    fn a_late_answer_changes_nothing() {
        let mut w = World::new(false, false);
        let mut f = Flow::default();
        assert!(w.answer(&mut f, 1, 200, None, "").is_none());
        // A waiter is resumed by its fetcher, never by an answer of its own.
        let mut w = bearer_world();
        let (mut fetcher, mut a) = (Flow::default(), Flow::default());
        assert_fetch(&w.start(&mut fetcher, 1));
        assert_eq!(w.start(&mut a, 2), Act::Pause);
        assert!(w.answer(&mut a, 2, 200, None, r#"{"token":"t"}"#).is_none());
        // It still waits: going away leaves the fetch, whose answer then resumes nobody.
        assert!(a.done(&mut w.vm(), 2).is_none());
        let act = w.answer(&mut fetcher, 1, 200, None, r#"{"token":"t"}"#);
        assert_eq!(
            act,
            Some(Act::ResumeWaiters {
                authorization: "Bearer t".into(),
                waiters: vec![]
            })
        );
    }
}
