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
use crate::config::{Config, UpstreamCredential};
use crate::engine::{Forward, ResponsePlan};
use crate::leak::SecretsMemo;
use crate::respond::Refusal;
use crate::upstream::{Challenge, Step, TokenKey, UpstreamAuth, learn_challenge, parse_token_response, token_key};

/// Where a forwarded request goes and with which credential, taken from the engine's decision
/// so the request path never looks the connector up a second time.
pub struct Target {
    pub connector: String,
    pub namespace: String,
    pub name: String,
    /// The caller, `system:serviceaccount:<ns>:<sa>`: what the controller's access check asks about.
    pub subject: String,
    /// The objects the caller's token is bound to, checked by the controller with the access.
    pub bound: crate::identity::Bound,
    /// The controller must still confirm the caller may use the connector.
    pub check_access: bool,
    /// What the request does (pull, push, delete): RBAC mode asks about exactly that.
    pub verb: channel::Verb,
    pub credential: UpstreamCredential,
    pub cluster: String,
    pub scheme: String,
    pub authority: String,
    /// The connector's Basic credential: sent to Basic upstreams and to token realms. Empty
    /// until the controller supplied it, for a controller-sourced credential.
    pub basic: String,
    /// The connector's revision: its upstream tokens are cached under it.
    pub revision: u64,
}

impl Target {
    /// The target of the engine's `forward` for a request of `method` by `subject` (the
    /// caller's name, already built for the access log), with the token scopes it needs and
    /// what the response phase keeps.
    pub fn of(forward: Forward, method: &str, subject: String) -> (Target, Vec<String>, ResponsePlan) {
        let f = forward;
        let basic = match &f.credential {
            UpstreamCredential::Static(v) => v.clone(),
            UpstreamCredential::Controller { .. } => String::new(),
        };
        let target = Target {
            connector: f.response.connector.clone(),
            namespace: f.namespace,
            name: f.name,
            subject,
            bound: f.caller.bound,
            check_access: f.check_access,
            verb: channel::Verb::of_method(method),
            credential: f.credential,
            cluster: f.cluster,
            scheme: f.response.upstream.scheme.clone(),
            authority: f.authority,
            basic,
            revision: f.revision,
        };
        (target, f.scopes, f.response)
    }

    /// The credential revision the request's configuration names (empty for a static
    /// credential, which is never asked for).
    fn revision_of(&self) -> &str {
        match &self.credential {
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
                target.connector, target.cluster
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
    /// it). `None`: the request waits for no call, and the answer changes nothing.
    pub fn answer(&mut self, vm: &mut Vm<'_>, answer: &CallAnswer, id: u32, now: &dyn Fn() -> u64) -> Option<Act> {
        let CallAnswer {
            status,
            www_authenticate,
            body,
        } = answer;
        let status = *status;
        Some(match self.waiting.take() {
            Some(Waiting::Access { mut target, scopes }) => {
                let now = now();
                match channel::parse_access(status, body, &target.connector) {
                    Ok((allowed, ttl)) => {
                        let key = channel::access_key(&target.subject, &target.bound);
                        vm.access
                            .insert(&key, &target.connector, target.verb, allowed, ttl, now);
                        if allowed {
                            target.check_access = false;
                            self.proceed(vm, target, scopes, id, now)
                        } else {
                            Act::refuse(crate::engine::not_permitted_rbac(
                                &target.connector,
                                &target.subject,
                                target.verb,
                            ))
                        }
                    }
                    Err(r) => Act::warn(r),
                }
            }
            Some(Waiting::Credential { mut target, scopes }) => {
                match channel::parse_credential(status, body, &target.connector, target.revision_of()) {
                    Ok(authorization) => {
                        vm.credentials.insert(&target.connector, authorization.clone());
                        target.basic = authorization;
                        self.proceed(vm, target, scopes, id, now())
                    }
                    Err(r) => Act::warn(r),
                }
            }
            Some(Waiting::Challenge { target, scopes }) => {
                // Realm checks need the connector's tokenRealms: the one lookup, once per upstream.
                let learned = vm
                    .config
                    .connector_by_label(&target.connector)
                    .ok_or_else(|| Refusal::unavailable("the connector was removed: retry"))
                    .and_then(|c| {
                        learn_challenge(c, status, www_authenticate.as_deref())
                            .map_err(|r| crate::upstream::with_envoy_detail(r, status, body))
                    });
                match learned {
                    Ok(challenge) => {
                        vm.upstream.learn(&target.connector, challenge);
                        self.authorize_upstream(vm, target, scopes, id, now())
                    }
                    Err(r) => Act::refuse(r),
                }
            }
            Some(Waiting::Token { key, realm }) => {
                let result = parse_token_response(status, body, &realm)
                    .map_err(|r| crate::upstream::with_envoy_detail(r, status, body));
                let waiters = vm.upstream.complete(&key, &result, now());
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
            let key = channel::access_key(&target.subject, &target.bound);
            match vm.access.get(&key, &target.connector, target.verb, now) {
                Some(true) => target.check_access = false,
                Some(false) => {
                    return Act::refuse(crate::engine::not_permitted_rbac(
                        &target.connector,
                        &target.subject,
                        target.verb,
                    ));
                }
                None => {
                    let call = vm.config.controller.as_ref().map(|ch| {
                        (
                            ch.cluster.clone(),
                            channel::access_call(
                                ch,
                                &target.namespace,
                                &target.name,
                                &target.subject,
                                &target.bound,
                                target.verb,
                            ),
                        )
                    });
                    return self.call_controller(call, Waiting::Access { target, scopes });
                }
            }
        }
        if matches!(target.credential, UpstreamCredential::Controller { .. }) && target.basic.is_empty() {
            match vm.credentials.get(&target.connector) {
                Some(v) => target.basic = v.to_string(),
                None => {
                    let call = vm.config.controller.as_ref().map(|ch| {
                        (
                            ch.cluster.clone(),
                            channel::credential_call(ch, &target.namespace, &target.name, target.revision_of()),
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
        let realm = match vm.upstream.challenge(&target.connector) {
            None => {
                let call = Call {
                    cluster: target.cluster.clone(),
                    headers: vec![
                        (":method".into(), "GET".into()),
                        (":path".into(), "/v2/".into()),
                        (":authority".into(), target.authority.clone()),
                        (":scheme".into(), target.scheme.clone()),
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
        let key = token_key(&target.connector, target.revision, &realm, &scopes);
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
                let call = Call {
                    headers: vec![
                        (":method".into(), "GET".into()),
                        (":path".into(), crate::upstream::token_request_path(&realm, &scopes)),
                        (":authority".into(), realm.authority.clone()),
                        ("authorization".into(), target.basic),
                        ("accept".into(), "application/json".into()),
                    ],
                    cluster: realm.cluster,
                    sent_stat: Some(crate::stats::token_fetch(&target.connector)),
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
