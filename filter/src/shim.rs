//! The thin proxy-wasm layer: the filter's callbacks. It gathers what the plain modules need
//! from the host (request headers, the clock, an HTTP call's answer), hands it to them
//! ([`crate::engine`] decides the request and the response, [`crate::flow`] walks a forwarded
//! request through its checks and its upstream credential), and performs what they return:
//! header edits, local answers, the HTTP calls the flow asks for, resuming or answering paused
//! requests, stats and log lines. The VM's state (configuration and caches) lives here.
//!
//! Every host call goes through [`crate::host`], which handles every status: the SDK's own
//! accessors panic on an unexpected one, and a panic traps the VM for every connector. A host
//! call that fails is a refusal (fail closed) or, for a request that has gone away, nothing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use crate::channel::{self, AccessCache, CredentialCache};
use crate::config::{self, Config};
use crate::engine::{
    CLUSTER_HEADER, Decision, FORWARDED_PROTO_HEADER, Request, ResponsePlan, decide_request, plan_response,
    stripped_names,
};
use crate::flow::{Act, CallAnswer, Flow, Target, Vm};
use crate::host::{self, Buffer, Map};
use crate::identity::TokenCache;
use crate::parts::{Answer, Assembly, Held};
use crate::respond::{LocalResponse, Refusal};
use crate::tarpit::{TICK_MS, Tarpit};
use crate::upstream::UpstreamAuth;

/// How long the filter waits for an upstream's challenge or a token service. After that the
/// request fails with 503; it is never forwarded without the connector's credential.
const UPSTREAM_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The compiled configuration and the caches of this VM (one per Envoy worker). The caches
/// outlive a configuration: a new one keeps what it did not change (see [`State::next`]).
struct State {
    config: Config,
    cache: TokenCache,
    upstream: UpstreamAuth,
    /// Credentials and access decisions from the controller's loopback channel.
    credentials: CredentialCache,
    access: AccessCache,
    /// What each credential sent upstream must never be echoed as, derived once per credential.
    secrets: crate::leak::SecretsMemo,
    hot: HotMetrics,
    /// Refusals held back during a flood; answered from the root context's tick.
    tarpit: Tarpit,
    last_kid_notice: Option<u64>,
    root_id: u32,
}

impl State {
    /// The state for `config`, carrying over from `old` every cache entry `config` still
    /// supports: verified tokens whose key is unchanged, and per connector whose revision is
    /// unchanged its learned challenge, upstream tokens and controller credential; access
    /// decisions of connectors still configured. A push that changes one connector or one key
    /// costs exactly that connector's or key's entries.
    fn next(old: Option<State>, config: Config, root_id: u32) -> State {
        let Some(old) = old else {
            return State {
                hot: HotMetrics::carry(None),
                cache: TokenCache::new(config.token_cache_size),
                config,
                upstream: UpstreamAuth::default(),
                credentials: CredentialCache::default(),
                access: AccessCache::default(),
                secrets: crate::leak::SecretsMemo::default(),
                tarpit: Tarpit::default(),
                last_kid_notice: None,
                root_id,
            };
        };
        let State {
            config: old_config,
            cache,
            mut upstream,
            mut credentials,
            mut access,
            secrets,
            last_kid_notice,
            hot,
            tarpit,
            ..
        } = old;
        let hot = HotMetrics::carry(Some(hot));
        let old_revision = |label: &str| old_config.connector_by_label(label).map(|c| c.revision);
        let revision = |label: &str| config.connector_by_label(label).map(|c| c.revision);
        upstream.carry_over(old_revision, revision);
        credentials.retain_connectors(|label| revision(label).is_some() && revision(label) == old_revision(label));
        access.retain_connectors(|label| revision(label).is_some());
        let cache = cache.carry_over(&old_config.policy, &config.policy, config.token_cache_size);
        State {
            cache,
            upstream,
            credentials,
            access,
            secrets,
            hot,
            tarpit,
            last_kid_notice,
            root_id,
            config,
        }
    }

    /// What the request flow reads and updates.
    fn vm(&mut self) -> Vm<'_> {
        Vm {
            config: &self.config,
            access: &mut self.access,
            credentials: &mut self.credentials,
            upstream: &mut self.upstream,
            secrets: &mut self.secrets,
        }
    }
}

/// Stat ids the forwarded path increments: the request path builds no stat name once a
/// connector has forwarded in this VM. A connector's id is defined on its first forwarded
/// request, not with the configuration: defining one per connector on every push cost each VM
/// (and Envoy's configuration canary, which never serves) a host call per connector.
/// `None`: the host refused the definition, and the name is tried again on use (see [`count`]).
#[derive(Default)]
struct HotMetrics {
    /// By connector label; kept across configurations (a removed connector's id is a few
    /// bytes, and comes back with it).
    forwarded: HashMap<String, u32>,
    hits: Option<u32>,
    misses: Option<u32>,
}

impl HotMetrics {
    fn carry(old: Option<HotMetrics>) -> HotMetrics {
        HotMetrics {
            forwarded: old.map(|o| o.forwarded).unwrap_or_default(),
            hits: metric_id(crate::stats::token_cache(true)),
            misses: metric_id(crate::stats::token_cache(false)),
        }
    }

    /// The forwarded counter of `connector`, defined on first use.
    fn forwarded(&mut self, connector: &str) -> Option<u32> {
        if let Some(id) = self.forwarded.get(connector) {
            return Some(*id);
        }
        let id = metric_id(&crate::stats::forwarded(connector))?;
        self.forwarded.insert(connector.to_string(), id);
        Some(id)
    }
}

type Shared = Rc<RefCell<Option<State>>>;

/// How soon a VM compiles a configuration the memo accepted.
const PENDING_TICK_MS: u32 = 1;

thread_local! {
    /// A configuration accepted by the memo of the last accepted document and not compiled
    /// yet, with its root context's id (see [`Root::on_configure`] and [`with_state`]).
    static PENDING: RefCell<Option<(Vec<u8>, u32)>> = const { RefCell::new(None) };
}

/// How often a VM waiting for configuration parts looks for calls to make (retries).
const ASSEMBLY_TICK_MS: u32 = 50;

thread_local! {
    /// A configuration waiting for its parts ([`crate::parts`]); the running configuration
    /// stays until it is complete and compiled.
    static ASSEMBLY: RefCell<Option<Assembly>> = const { RefCell::new(None) };
    /// The parts of the configuration this VM runs (and of a replaced assembly): a push
    /// fetches only the parts it does not find here.
    static HELD: RefCell<Held> = const { RefCell::new(Vec::new()) };
}

thread_local! {
    /// The VM's one state (a VM serves one Envoy worker). Envoy gives every new filter
    /// configuration a new root context in the same VM; a state per root would start every
    /// configuration with empty caches. Each accepted configuration replaces the config here
    /// and carries the caches over ([`State::next`]); requests still running under the
    /// previous root use the new configuration for what they look up later. One filter per
    /// `vm_id` (as every bootstrap here has it): two plugins sharing a VM would share this.
    static VM_STATE: Shared = Shared::default();
}

// The SDK's entry-point macro expands to an `unsafe` block and `#[no_mangle]` export.
#[allow(unsafe_code)]
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
        proxy_wasm::set_root_context(|id| Box::new(super::Root { state: Default::default(), id }));
        crate::identity::set_host_check(Some(super::host_signature_check));
    }}
}

/// The identity module's host check ([`crate::identity::HostCheck`]): Envoy's
/// `verify_signature` foreign function. A host without it (NotFound) is asked once per VM;
/// any other failure leaves that token's check to the module.
fn host_signature_check(hash: &str, spki: &[u8], signature: &[u8], message: &[u8]) -> Option<bool> {
    let args = crate::wire::verify_signature_args(hash, spki, signature, message);
    match host::call_foreign("verify_signature", &args) {
        Ok(answer) => {
            let holds = crate::wire::verify_signature_result(&answer);
            if holds == Some(true) {
                count(crate::stats::HOST_CONFIRMED);
            }
            holds
        }
        Err(host::Status(1)) => {
            crate::identity::set_host_check(None);
            log(
                LogLevel::Info,
                "this host has no verify_signature foreign function: every signature is checked by the module",
            );
            None
        }
        Err(_) => None,
    }
}

fn log(level: LogLevel, message: &str) {
    host::log(level, message);
}

thread_local! {
    /// Whether Envoy logs wasm debug lines, read once per configuration: asking the host on
    /// every request is a host call, and building the line a `format!`.
    static DEBUG: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

thread_local! {
    /// Stat ids by name, defined on first use (one VM per worker thread).
    static METRICS: RefCell<std::collections::HashMap<String, u32>> = RefCell::new(std::collections::HashMap::new());
}

/// The id of counter `name`, defined on first use (and again by a later call if the host
/// refused it).
fn metric_id(name: &str) -> Option<u32> {
    METRICS.with(|m| {
        if let Some(id) = m.borrow().get(name) {
            return Some(*id);
        }
        let id = host::define_counter(name).ok()?;
        m.borrow_mut().insert(name.to_string(), id);
        Some(id)
    })
}

/// Adds one to the counter `name` (see [`crate::stats`] for the names).
fn count(name: &str) {
    if let Some(id) = metric_id(name) {
        let _ = host::increment(id, 1);
    }
}

fn debug_enabled() -> bool {
    DEBUG.with(std::cell::Cell::get)
}

fn now_secs() -> Option<u64> {
    host::now_millis().ok().map(|ms| ms / 1_000)
}

struct Root {
    state: Shared,
    /// The root context's id: fire-and-forget calls are made on it, because a call made on a
    /// request's context is cancelled when that request ends.
    id: u32,
}

impl Context for Root {
    /// The answers to calls made on the root context: configuration parts (fire-and-forget
    /// notices are answered here too, and ignored).
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        let answer = read_call_answer(num_headers, body_size).unwrap_or_default();
        let now = host::now_millis_or_zero();
        let outcome = ASSEMBLY.with(|a| {
            let mut a = a.try_borrow_mut().ok()?;
            let a = a.as_mut()?;
            Some((a.answer(token_id, answer.status, &answer.body, now), a.missing()))
        });
        match outcome {
            Some((Answer::Refused(why), _)) => {
                count(crate::stats::CALL_FAILED);
                log(LogLevel::Warn, &why);
            }
            Some((Answer::Kept, 0)) => finish_assembly(),
            _ => {}
        }
        drive_assembly(self.id);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let started = host::now_millis_or_zero();
        // No configuration readable is an empty one: refused by `compile`, so fail closed.
        let bytes = host::buffer(Buffer::PluginConfiguration, usize::MAX).unwrap_or_default();
        let env = |name: &str| std::env::var(name).ok();
        DEBUG.with(|d| {
            // 0: trace, 1: debug.
            d.set(matches!(host::log_level(), Some(0 | 1)))
        });
        let running = VM_STATE.with(|shared| shared.try_borrow().map(|s| s.is_some()).unwrap_or(true));
        // A VM with no configuration (Envoy's canary, which is configured once and killed, or a
        // worker at start-up) decides by the memo of the last accepted document, and compiles
        // on its first tick or request (`compile_pending`): the canary never does.
        if !running
            && let Some(memo) = host::shared_data(config::memo::KEY)
            && let Some(next) = config::memo::check_change(&bytes, &memo, &env)
        {
            let _ = host::set_shared_data(config::memo::KEY, &next);
            let size = bytes.len();
            // (`try_borrow_mut`: nothing holds it now, and `borrow_mut` is a panicking path.)
            PENDING.with(|p| {
                if let Ok(mut pending) = p.try_borrow_mut() {
                    *pending = Some((bytes, self.id));
                }
            });
            // Compiled on the next tick: the workers then compile side by side, not when their
            // first requests come, one after the other. Envoy's canary is killed before it
            // ticks. (The main thread's VM compiles too: once; later pushes are changes.)
            let _ = host::set_tick_period(PENDING_TICK_MS);
            log(
                LogLevel::Info,
                &format!(
                    "configuration accepted: {size} bytes, checked as a change of the last accepted document in {} ms; compiled on the next tick or request",
                    host::now_millis_or_zero().saturating_sub(started)
                ),
            );
            self.state = VM_STATE.with(Rc::clone);
            return true;
        }
        // The configuration this VM runs lends the new one every connector it repeats.
        let compiled = VM_STATE.with(|shared| {
            let running = shared.try_borrow().ok();
            let previous = running.as_ref().and_then(|s| s.as_ref()).map(|s| &s.config);
            config::compile_after(&bytes, &env, previous)
        });
        match compiled {
            // Its connectors come as parts: fetched, then compiled (make before break).
            Ok(config) if !config.parts.is_empty() => {
                forget_pending();
                self.state = VM_STATE.with(Rc::clone);
                start_assembly(&bytes, config, self.id, started)
            }
            Ok(config) => {
                if !running && let Some(memo) = config::memo::memo_of(&bytes, &config) {
                    let _ = host::set_shared_data(config::memo::KEY, &memo);
                }
                log_accepted(&config, started, false);
                forget_pending();
                // An inline configuration ends any assembly, and the parts held for one.
                ASSEMBLY.with(|a| a.replace(None));
                HELD.with(|h| h.take());
                self.state = VM_STATE.with(Rc::clone);
                install(config, self.id)
            }
            Err(errors) => {
                // Fail closed: this root's requests get no state and are refused. The VM's state
                // stays for the root of the configuration Envoy keeps running.
                self.state = Shared::default();
                log_refused(&errors);
                false
            }
        }
    }

    /// Compiles a configuration the memo accepted; answers the held refusals that are due;
    /// stops ticking when none is left.
    fn on_tick(&mut self) {
        // A clock that cannot be read answers every held refusal now: holding only slows a
        // refusal down, and a hold that is never over would leave it to Envoy's idle timeout.
        let now_ms = host::now_millis().unwrap_or(u64::MAX);
        let (due, left) = VM_STATE.with(|shared| match shared.try_borrow_mut() {
            Ok(mut slot) => {
                compile_pending(&mut slot);
                match slot.as_mut() {
                    Some(st) => (st.tarpit.due(now_ms), st.tarpit.holding()),
                    None => (Vec::new(), 0),
                }
            }
            Err(_) => (Vec::new(), 1),
        });
        for held in due {
            if host::set_effective_context(held.context).is_ok() {
                send_to_current(&held.response);
            }
        }
        let _ = host::set_effective_context(self.id);
        // Only the root of the configuration being assembled makes its calls: an older root
        // may go away with its answers.
        let assembling = drive_assembly(self.id);
        if left == 0 {
            let _ = host::set_tick_period(if assembling { ASSEMBLY_TICK_MS } else { 0 });
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            id: context_id,
            state: self.state.clone(),
            plan: None,
            realm: String::new(),
            flow: Flow::default(),
            check_body: false,
            encoded: None,
            status: 0,
            held: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    id: u32,
    state: Shared,
    /// Set when the request was forwarded; the response phase must not read request headers.
    plan: Option<ResponsePlan>,
    realm: String,
    /// Where the request is in the flow (checks, credential, upstream token), and what it was
    /// forwarded with.
    flow: Flow,
    /// An error answer's body is held and read before anything of the answer leaves: it must not
    /// repeat the credential, and a `400` may be ECR Public's `DENIED` for an expired token.
    check_body: bool,
    /// The `Content-Encoding` of an error answer whose body cannot be checked as sent: its body
    /// is replaced, never passed on unread.
    encoded: Option<String>,
    /// The upstream's status, kept for the body phase.
    status: u32,
    /// The refusal of this request waits in the tarpit.
    held: bool,
}

impl Context for Http {
    fn on_http_call_response(&mut self, _token_id: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        // A call that failed after it started (the answer broke off: close or reset after the
        // head, or the call's timeout) arrives with no headers. That, or any answer that cannot
        // be read, is "no answer" (status 0): the flow turns it into the 503 an unreachable
        // upstream gets, and the request is answered now, not at the idle timeout.
        let answer = read_call_answer(num_headers, body_size).unwrap_or_default();
        if answer.status == 0 {
            count(crate::stats::CALL_FAILED);
        }
        let (id, flow) = (self.id, &mut self.flow);
        let act = match with_state(&self.state, |st| flow.answer(&mut st.vm(), &answer, id, &now_secs)) {
            Ok(act) => act,
            // Without the VM's state a waiting request is refused; a late answer changes nothing.
            Err(r) => flow.awaits_call().then(|| {
                flow.not_sent();
                Act::Respond {
                    refusal: r,
                    warn: false,
                }
            }),
        };
        let Some(act) = act else {
            return;
        };
        // Waiters were made current one by one: this request's context is made current again.
        let token_answer = matches!(act, Act::ResumeWaiters { .. } | Act::FailWaiters { .. });
        if let Action::Continue = self.perform(act) {
            resume_current();
        }
        if token_answer {
            let _ = host::set_effective_context(self.id);
        }
    }

    fn on_done(&mut self) -> bool {
        if self.held {
            let id = self.id;
            let _ = with_state(&self.state, |st| st.tarpit.forget(id));
        }
        // A fetcher that goes away (client disconnected) must not leave its waiters hanging.
        let (id, flow) = (self.id, &mut self.flow);
        if let Ok(Some((waiters, r))) = with_state(&self.state, |st| flow.done(&mut st.vm(), id)) {
            self.fail_waiters(waiters, &r);
        }
        true
    }
}

/// Reads the answer of the call being delivered; `None` when the call failed (no headers) or
/// any part of the answer cannot be read.
fn read_call_answer(num_headers: usize, body_size: usize) -> Option<CallAnswer> {
    if num_headers == 0 {
        return None;
    }
    let headers = host::headers(Map::CallResponse).ok()?;
    let value = |name: &str| headers.text(name).map(std::borrow::Cow::into_owned);
    let status = value(":status")?
        .parse::<u32>()
        .ok()
        .filter(|s| (100..600).contains(s))?;
    let body = if body_size == 0 {
        Vec::new()
    } else {
        host::buffer(Buffer::CallResponseBody, body_size).ok()?
    };
    Some(CallAnswer {
        status,
        www_authenticate: value("www-authenticate"),
        body,
    })
}

/// Resumes the effective context's paused request. A request that has gone away (the client
/// left) cannot be resumed; there is nobody left to answer.
fn resume_current() {
    if host::resume_request().is_err() {
        log(
            LogLevel::Debug,
            "a paused request had gone away when its answer arrived",
        );
    }
}

/// Puts the upstream credential on the effective context's paused request and resumes it. If
/// the header cannot be set the request is answered 503 instead: resumed without it, the
/// upstream would refuse, and the client would see the upstream's challenge.
fn forward_current_with(authorization: &str) {
    match host::set_header(Map::Request, "authorization", Some(authorization)) {
        Ok(()) => resume_current(),
        Err(_) => send_to_current(&cannot_edit().into_response(config::DEFAULT_REALM)),
    }
}

/// The answer that replaces an upstream response the host would not let the filter read or
/// change: passing it on unedited could hand the client the upstream's challenge.
fn unreadable_answer() -> Refusal {
    Refusal::unavailable_upstream("the connector proxy could not read or rewrite the upstream's answer: retry")
        .with_reason("host_call_failed")
}

/// The answer that replaces an upstream answer repeating the connector's credential.
fn credential_echoed(connector: &str, where_: &str) -> Refusal {
    Refusal::bad_gateway(
        "credential_echoed",
        format!(
            "the upstream registry of connector {} repeated the connector's credential in {where_}; the answer \
             was withheld",
            crate::respond::quote(connector)
        ),
    )
}

/// The refusal for a request whose headers the host would not let the filter change.
fn cannot_edit() -> Refusal {
    Refusal::unavailable("the connector proxy could not rewrite this request: retry").with_reason("host_call_failed")
}

/// `first_use`: compiled on the first tick or request after the memo accepted it.
fn log_accepted(config: &Config, started: u64, first_use: bool) {
    let (n, keys, ms) = (
        config.connectors().len(),
        config.policy.keys.len(),
        host::now_millis_or_zero().saturating_sub(started),
    );
    let line = if first_use {
        format!("configuration compiled after the memo's check: {n} connector(s), {keys} key(s), in {ms} ms")
    } else {
        let kept = config.kept;
        format!(
            "configuration accepted: {n} connector(s), {keys} key(s); {kept} kept from the running configuration, compiled in {ms} ms"
        )
    };
    log(LogLevel::Info, &line);
}

fn log_refused(errors: &[config::ConfigError]) {
    log(
        LogLevel::Error,
        &format!("configuration refused, {} problem(s):", errors.len()),
    );
    for e in errors {
        log(LogLevel::Error, &format!("config {e}"));
    }
}

/// Drops a configuration the memo accepted and no tick compiled: a newer one replaced it.
fn forget_pending() {
    PENDING.with(|p| {
        if let Ok(mut pending) = p.try_borrow_mut() {
            *pending = None;
        }
    });
}

/// Makes `config` the VM's configuration, its caches carried over from the one it replaces
/// ([`State::next`]). `root`: the root context whose tick answers held refusals.
fn install(config: Config, root: u32) -> bool {
    VM_STATE.with(|shared| {
        let Ok(mut slot) = shared.try_borrow_mut() else {
            return false;
        };
        let state = State::next(slot.take(), config, root);
        // Refusals held under the previous root are answered by this root's tick.
        if state.tarpit.holding() > 0 {
            let _ = host::set_tick_period(TICK_MS);
        }
        *slot = Some(state);
        true
    })
}

/// Starts assembling `config`, a document that lists its connectors as parts: the parts the
/// VM holds are taken, the others fetched from the next tick on ([`drive_assembly`]). The
/// running configuration stays until the assembly is compiled ([`finish_assembly`]).
fn start_assembly(bytes: &[u8], config: Config, root: u32, started: u64) -> bool {
    // The parse refuses parts without the channel; a configuration without it cannot fetch.
    let Some(channel) = config.controller.clone() else {
        return false;
    };
    let mut held = HELD.with(|h| h.take());
    if let Some(replaced) = ASSEMBLY.with(|a| a.replace(None)) {
        // What it fetched, and what the running configuration holds besides.
        let mut merged = replaced.into_held();
        held.retain(|(id, _)| !merged.iter().any(|(m, _)| m == id));
        merged.append(&mut held);
        held = merged;
    }
    let assembly = Assembly::new(bytes, &config.parts, channel, root, &held, started);
    HELD.with(|h| h.replace(held));
    let Some(assembly) = assembly else {
        log(
            LogLevel::Error,
            "configuration refused: it lists parts but cannot be cut at its members (a member name written with escapes?)",
        );
        return false;
    };
    let (listed, missing) = (config.parts.len(), assembly.missing());
    log(
        LogLevel::Info,
        &format!("configuration accepted: {listed} part(s) listed, {missing} to fetch from the controller"),
    );
    ASSEMBLY.with(|a| a.replace(Some(assembly)));
    if missing == 0 {
        finish_assembly();
    } else {
        // The calls are made on the next tick: Envoy's canary, configured once and killed,
        // never makes them.
        let _ = host::set_tick_period(PENDING_TICK_MS);
    }
    true
}

/// Makes the calls the assembly asks for now, if `root` (the effective context) is the root of
/// its configuration; gives whether that root has an assembly to tick for.
fn drive_assembly(root: u32) -> bool {
    let now = host::now_millis_or_zero();
    ASSEMBLY.with(|a| {
        let Ok(mut a) = a.try_borrow_mut() else {
            return false;
        };
        let Some(a) = a.as_mut().filter(|a| a.root == root) else {
            return false;
        };
        for (part, call) in a.calls(now) {
            match host::dispatch_http_call(a.cluster(), call.header_refs(), UPSTREAM_CALL_TIMEOUT) {
                Ok(token) => a.sent(token, part, now),
                Err(_) => {
                    count(crate::stats::CALL_FAILED);
                    a.not_sent(now);
                    break;
                }
            }
        }
        true
    })
}

/// Compiles the assembled configuration and runs it; on a problem the running configuration
/// stays, and the problems are logged as a pushed document's would be.
fn finish_assembly() {
    let Some(assembly) = ASSEMBLY.with(|a| a.replace(None)) else {
        return;
    };
    let env = |name: &str| std::env::var(name).ok();
    let compiled = VM_STATE.with(|shared| {
        let running = shared.try_borrow().ok();
        let previous = running.as_ref().and_then(|s| s.as_ref()).map(|s| &s.config);
        assembly.compile(&env, previous)
    });
    let Some(compiled) = compiled else {
        ASSEMBLY.with(|a| a.replace(Some(assembly)));
        return;
    };
    match compiled {
        Ok(config) => {
            log(
                LogLevel::Info,
                &format!(
                    "configuration assembled from its parts: {} bytes",
                    assembly.document_len()
                ),
            );
            log_accepted(&config, assembly.started, false);
            if install(config, assembly.root) {
                HELD.with(|h| h.replace(assembly.into_held()));
            }
        }
        Err(errors) => {
            log(
                LogLevel::Error,
                "the configuration assembled from its parts was refused; the running one stays",
            );
            log_refused(&errors);
        }
    }
}

/// Compiles the configuration the memo accepted ([`Root::on_configure`]) into `slot`, if this
/// VM has none yet: on its first tick, or its first request if that comes first.
fn compile_pending(slot: &mut Option<State>) {
    if slot.is_some() {
        return;
    }
    let Some((bytes, root)) = PENDING.with(|p| p.try_borrow_mut().ok()?.take()) else {
        return;
    };
    let started = host::now_millis_or_zero();
    match config::compile(&bytes, &|name| std::env::var(name).ok()) {
        Ok(config) => {
            log_accepted(&config, started, true);
            *slot = Some(State::next(None, config, root));
        }
        // The memo said valid, the compile says not: both cannot be right, and nothing is
        // served (fail closed) with the problems in the log.
        Err(errors) => log_refused(&errors),
    }
}

/// Runs `f` on this VM's state; refuses (fails closed) when there is no valid configuration.
/// A configuration the memo accepted ([`Root::on_configure`]) and no tick compiled yet is
/// compiled here.
fn with_state<T>(state: &Shared, f: impl FnOnce(&mut State) -> T) -> Result<T, Refusal> {
    let Ok(mut guard) = state.try_borrow_mut() else {
        return Err(Refusal::unavailable("the connector proxy is busy: retry"));
    };
    compile_pending(&mut guard);
    match guard.as_mut() {
        Some(st) => Ok(f(st)),
        None if ASSEMBLY.with(|a| a.try_borrow().map(|a| a.is_some()).unwrap_or(false)) => Err(Refusal::unavailable(
            "the connector proxy is still fetching its configuration from the controller: retry",
        )),
        None => Err(Refusal::unavailable(
            "the connector proxy has no valid configuration; its log lists the problems",
        )),
    }
}

/// A local response on the current effective context (this request, or a waiter made current).
fn send_to_current(r: &LocalResponse) {
    let headers: Vec<(&str, &str)> = r.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    if host::send_response(r.status, &headers, &r.body).is_err() {
        // The request has gone away (or already has an answer): nobody to tell.
        log(
            LogLevel::Debug,
            "a local answer could not be sent: the request had gone away",
        );
    }
}

impl Http {
    fn send(&self, r: LocalResponse) -> Action {
        send_to_current(&r);
        Action::Pause
    }

    /// A refusal answered now, or held in the tarpit when this VM refuses too many this second
    /// (the root context's tick answers it; see [`crate::tarpit`]).
    fn refuse_or_hold(&mut self, response: LocalResponse, now_ms: u64) -> Action {
        let id = self.id;
        let mut unheld = Some(response);
        let held = with_state(&self.state, |st| {
            let first = st.tarpit.holding() == 0;
            let response = unheld.take()?;
            unheld = st.tarpit.refuse(id, response, now_ms);
            unheld.is_none().then_some((first, st.root_id))
        });
        if let Some(response) = unheld {
            return self.send(response);
        }
        let Ok(Some((first, root))) = held else {
            return Action::Pause;
        };
        self.held = true;
        count(crate::stats::REFUSAL_HELD);
        if first && host::set_effective_context(root).is_ok() {
            // The tick belongs to the root context: set it there.
            let _ = host::set_tick_period(TICK_MS);
            let _ = host::set_effective_context(self.id);
        }
        Action::Pause
    }

    /// Answers the requests that waited for a token this request could not get, then makes
    /// this request's context current again. A waiter that has gone away is skipped.
    fn fail_waiters(&self, waiters: Vec<u32>, r: &Refusal) {
        let response = r.clone().into_response(&self.realm);
        for w in waiters {
            if host::set_effective_context(w).is_ok() {
                send_to_current(&response);
            }
        }
        let _ = host::set_effective_context(self.id);
    }

    /// Replaces a held error body with the refusal's OCI error JSON; the upstream's status is
    /// kept (its head has gone on). `None`: the body was already replaced, this later chunk is
    /// dropped.
    fn withhold_body(&mut self, body_size: usize, end_of_stream: bool, r: Option<Refusal>) -> Action {
        let body = match r {
            Some(r) => {
                if let Some(plan) = &self.plan {
                    count(&crate::stats::connector_refused(plan.connector.label(), r.reason));
                    log(
                        LogLevel::Warn,
                        &format!(
                            "connector {}: upstream answer withheld: {}",
                            plan.connector.label(),
                            r.reason
                        ),
                    );
                }
                r.into_response(&self.realm).body
            }
            None => Vec::new(),
        };
        // Status 0 marks "already replaced"; later chunks (of an oversized body) are emptied.
        self.status = 0;
        self.check_body = !end_of_stream;
        if host::replace_buffer(Buffer::ResponseBody, body_size, &body).is_err() {
            // The body cannot be edited: cut the answer rather than pass it.
            let _ = host::send_response(502, &[], b"");
        }
        Action::Continue
    }

    /// Answers this request locally; the response phase then has nothing to rewrite.
    fn refuse(&mut self, r: Refusal) -> Action {
        if let Some(plan) = &self.plan {
            count(&crate::stats::connector_refused(plan.connector.label(), r.reason));
        }
        self.plan = None;
        let response = r.into_response(&self.realm);
        self.send(response)
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T, Refusal> {
        with_state(&self.state, f)
    }

    /// What this request's upstream answer must never contain: the connector's credential and
    /// the upstream token it carried (each derived once per credential, see `SecretsMemo`).
    fn secrets(&self) -> Vec<Rc<[Vec<u8>]>> {
        let mut out: Vec<Rc<[Vec<u8>]>> = self.flow.sent_secrets().into_iter().cloned().collect();
        if let Some(k) = self.flow.used_token()
            && let Ok(Some(t)) = self.with_state(|st| {
                let token = st.upstream.token_value(k)?;
                Some(st.secrets.of(token))
            })
        {
            out.push(t);
        }
        out
    }

    fn decide(&mut self, req: &Request<'_>, now: u64) -> Decision {
        let realm = &mut self.realm;
        let decided = with_state(&self.state, |state| {
            realm.clone_from(&state.config.realm);
            decide_request(&state.config, &mut state.cache, req, now)
        });
        decided.unwrap_or_else(|r| {
            let reason = r.reason;
            Decision::Respond {
                response: r.into_response(config::DEFAULT_REALM),
                reason,
                authenticated: false,
            }
        })
    }

    /// Performs the flow's next act for this request. `Continue`: the request goes on now (a
    /// paused one must be resumed by the caller); `Pause`: it waits or was answered.
    fn perform(&mut self, act: Act) -> Action {
        match act {
            Act::Forward { authorization } => {
                if host::set_header(Map::Request, "authorization", Some(&authorization)).is_err() {
                    self.flow.not_sent();
                    return self.refuse(cannot_edit());
                }
                Action::Continue
            }
            Act::Pause => {
                // The request waits: the client's credential must not stay on it meanwhile.
                if host::set_header(Map::Request, "authorization", None).is_err() {
                    self.flow.not_sent();
                    return self.refuse(cannot_edit());
                }
                Action::Pause
            }
            Act::CallCluster(call) => {
                // The request waits: the client's credential must not stay on it meanwhile.
                if host::set_header(Map::Request, "authorization", None).is_err() {
                    let flow = &mut self.flow;
                    let next = with_state(&self.state, |st| flow.call_not_made(&mut st.vm(), cannot_edit()))
                        .unwrap_or_else(|r| {
                            flow.not_sent();
                            Act::Respond {
                                refusal: r,
                                warn: false,
                            }
                        });
                    return self.perform(next);
                }
                match host::dispatch_http_call(&call.cluster, call.header_refs(), UPSTREAM_CALL_TIMEOUT) {
                    Ok(_) => {
                        if let Some(stat) = &call.sent_stat {
                            count(stat);
                        }
                        Action::Pause
                    }
                    Err(_) => {
                        let flow = &mut self.flow;
                        let next = with_state(&self.state, |st| flow.not_dispatched(&mut st.vm(), &call.cluster))
                            .unwrap_or_else(|r| Act::Respond {
                                refusal: r,
                                warn: false,
                            });
                        self.perform(next)
                    }
                }
            }
            Act::Respond { refusal, warn } => {
                if warn {
                    log(LogLevel::Warn, &format!("{}: {}", refusal.reason, refusal.message));
                }
                self.refuse(refusal)
            }
            Act::ResumeWaiters { authorization, waiters } => {
                forward_current_with(&authorization);
                for w in waiters {
                    // A waiter that has gone away is skipped.
                    if host::set_effective_context(w).is_ok() {
                        forward_current_with(&authorization);
                    }
                }
                Action::Pause
            }
            Act::FailWaiters { waiters, refusal, warn } => {
                if warn {
                    log(LogLevel::Warn, &format!("{}: {}", refusal.reason, refusal.message));
                }
                self.fail_waiters(waiters, &refusal);
                self.refuse(refusal)
            }
        }
    }

    /// Tells the controller a token named a key it does not know, so it re-reads the
    /// cluster's keys (key rotation). Rate limited here and there; the answer is not awaited.
    fn notify_unknown_kid(&self, now: u64) {
        let call = self.with_state(|st| {
            let ch = st.config.controller.as_ref()?;
            channel::may_notify(&mut st.last_kid_notice, now)
                .then(|| (ch.cluster.clone(), channel::unknown_kid_call(ch), st.root_id))
        });
        if let Ok(Some((cluster, call, root))) = call {
            // On the root context: this request is answered (401) at once and ends, which
            // would cancel a call made on its own context before it left Envoy.
            if host::set_effective_context(root).is_ok() {
                let _ = host::dispatch_http_call(&cluster, call.header_refs(), UPSTREAM_CALL_TIMEOUT);
            }
            let _ = host::set_effective_context(self.id);
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Ok(headers) = host::headers(Map::Request) else {
            // Without the request's headers nothing can be decided: refuse, never pass.
            return self.refuse(cannot_edit());
        };
        let get = |name: &str| headers.text(name).unwrap_or_default();
        let (method, path, authority, scheme) = (get(":method"), get(":path"), get(":authority"), get(":scheme"));
        let mut values = headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(b"authorization"))
            .map(|(_, v)| crate::wire::text(v));
        // Two are enough: more than one is refused, however many (no list built per request).
        let (first, second) = (values.next(), values.next());
        let pair = [
            first.as_deref().unwrap_or_default(),
            second.as_deref().unwrap_or_default(),
        ];
        let authorization = pair
            .get(..usize::from(first.is_some()) + usize::from(second.is_some()))
            .unwrap_or_default();
        let request = Request {
            method: &method,
            path: &path,
            authority: &authority,
            scheme: &scheme,
            authorization,
        };
        let Ok(now_ms) = host::now_millis() else {
            return self.refuse(crate::flow::no_clock());
        };
        let now = now_ms / 1_000;

        match self.decide(&request, now) {
            Decision::Respond {
                response,
                reason,
                authenticated,
            } => {
                count(&crate::stats::answered(reason));
                if reason == "unknown_kid" {
                    self.notify_unknown_kid(now);
                }
                if debug_enabled() {
                    log(
                        LogLevel::Debug,
                        &format!("{method} answered locally: {} {reason}", response.status),
                    );
                }
                // The tarpit slows refusals of callers it cannot hold to account; a ServiceAccount
                // refused a connector is answered at once (a client retrying a deleted
                // connector must not stall).
                if response.status < 400 || authenticated {
                    return self.send(response);
                }
                self.refuse_or_hold(response, now_ms)
            }
            Decision::Forward(f) => {
                // Host calls are the filter's main per-request cost: remove only what is there.
                let real_scheme = if scheme.is_empty() { "http" } else { &scheme };
                // One pass over the request's headers, each stripped name once however often sent.
                let mut edits: Vec<(&str, Option<&str>)> = stripped_names(headers.iter().map(|(name, _)| name), false)
                    .into_iter()
                    .map(|n| (n, None))
                    .collect();
                if get(FORWARDED_PROTO_HEADER) != real_scheme {
                    edits.push((FORWARDED_PROTO_HEADER, Some(real_scheme)));
                }
                // A host-form request keeps its path (the upstream's is the same): one host call
                // fewer, and the same for a client that already names the upstream's authority.
                if f.path != path {
                    edits.push((":path", Some(&f.path)));
                }
                if f.connector().upstream.authority != authority {
                    edits.push((":authority", Some(&f.connector().upstream.authority)));
                }
                edits.push((CLUSTER_HEADER, Some(&f.connector().cluster)));
                // A request whose client credential could not be removed, or whose route could
                // not be set, must not go anywhere.
                if edits
                    .iter()
                    .any(|(name, value)| host::set_header(Map::Request, name, *value).is_err())
                {
                    return self.refuse(cannot_edit());
                }
                // Ids kept per VM: no stat name is built here once the connector has forwarded.
                let ids = self
                    .with_state(|st| {
                        let cache = if f.cache_hit { st.hot.hits } else { st.hot.misses };
                        (st.hot.forwarded(f.connector().label()), cache)
                    })
                    .unwrap_or_default();
                match ids.0 {
                    Some(id) => drop(host::increment(id, 1)),
                    None => count(&crate::stats::forwarded(f.connector().label())),
                }
                match ids.1 {
                    Some(id) => drop(host::increment(id, 1)),
                    None => count(crate::stats::token_cache(f.cache_hit)),
                }
                // Access-log fields: who used which connector (never a credential).
                let subject = f.caller.subject();
                let _ = host::set_property(crate::stats::CONNECTOR_PROPERTY, f.connector().label().as_bytes());
                let _ = host::set_property(crate::stats::SUBJECT_PROPERTY, subject.as_bytes());
                if debug_enabled() {
                    log(
                        LogLevel::Debug,
                        &format!(
                            "{method} forwarded: connector={} subject={} token_cache_hit={}",
                            f.connector().label(),
                            subject,
                            f.cache_hit
                        ),
                    );
                }
                let (target, scopes, plan) = Target::of(*f, &method);
                self.plan = Some(plan);
                let (id, flow) = (self.id, &mut self.flow);
                let act = with_state(&self.state, |st| flow.start(&mut st.vm(), target, scopes, id, now))
                    .unwrap_or_else(|refusal| Act::Respond { refusal, warn: false });
                self.perform(act)
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(plan) = self.plan.as_ref() else {
            return Action::Continue;
        };
        // One host call for the whole map instead of one per header.
        let Ok(headers) = host::headers(Map::Response) else {
            // Unread, the answer could carry the upstream's challenge or Location unmapped.
            return self.refuse(unreadable_answer());
        };
        let header = |name: &str| headers.text(name);
        let status = header(":status").and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
        let all = |name: &str| -> Vec<_> {
            headers
                .iter()
                .filter(|(k, _)| *k == name.as_bytes())
                .map(|(_, v)| crate::wire::text(v))
                .collect()
        };
        let (locations, links) = (all("location"), all("link"));
        let has_challenge = headers.has("www-authenticate");
        // An upstream that repeats the credential it was sent, in any header's value or name, is
        // not answered.
        let secrets = self.secrets();
        if headers
            .iter()
            .any(|(n, v)| secrets.iter().any(|s| crate::leak::entry_holds_any(n, v, s)))
        {
            return self.refuse(credential_echoed(plan.connector.label(), "a response header"));
        }
        // Cookies of one upstream would be stored for the proxy's origin, shared by every
        // connector and tenant behind it; and an upstream's `Alt-Svc` would name another place
        // for clients that honour it to send the proxy's requests, tokens included.
        for name in ["set-cookie", "alt-svc"] {
            if headers.has(name) && host::set_header(Map::Response, name, None).is_err() {
                return self.refuse(unreadable_answer());
            }
        }
        let edits = plan_response(
            plan,
            &self.realm,
            status,
            &locations.iter().map(|v| &**v).collect::<Vec<_>>(),
            &links.iter().map(|v| &**v).collect::<Vec<_>>(),
        );
        // The upstream's challenge would send the client's token to the upstream's realm.
        if has_challenge && host::set_header(Map::Response, "www-authenticate", None).is_err() {
            return self.refuse(unreadable_answer());
        }
        if status == 401 {
            // The upstream refused what it was given: drop that token so the client's retry
            // fetches a fresh one, and re-learn the upstream's scheme if it changed.
            let scheme = header("www-authenticate")
                .and_then(|v| crate::upstream::parse_challenge(&v))
                .map(|(s, _)| s);
            let (connector, used) = (plan.connector.clone(), self.flow.take_used_token());
            let _ = self.with_state(|st| {
                st.upstream
                    .refused(connector.label(), used.as_deref(), scheme.as_deref())
            });
        }
        if let Some((response, reason)) = edits.replace {
            log(
                LogLevel::Info,
                &format!(
                    "upstream answered {status} for connector {}: {reason}",
                    plan.connector.label()
                ),
            );
            self.plan = None;
            return self.send(response);
        }
        let rewrites = [("location", edits.location), ("link", edits.link)];
        for (name, value) in rewrites {
            if let Some(v) = value
                && host::set_header(Map::Response, name, Some(&v)).is_err()
            {
                return self.refuse(unreadable_answer());
            }
        }
        // Error answers are small: their body is held until it is read (see check_body). It may
        // be replaced, so its length is left to Envoy. (The head goes on: holding it too, with
        // StopIteration, left the answer stuck in Envoy 1.40, found by attacks_upstream.)
        self.status = status;
        self.check_body = status >= 400 && !end_of_stream;
        if self.check_body && host::set_header(Map::Response, "content-length", None).is_err() {
            return self.refuse(unreadable_answer());
        }
        // A compressed error body (a front proxy's gzip, asked for by the Go clients' automatic
        // `Accept-Encoding`) would hide an echo from the check: it is replaced by the proxy's
        // own JSON, so it must not be labelled as encoded or as the upstream's type.
        let encoded = self
            .check_body
            .then(|| header("content-encoding"))
            .flatten()
            .filter(|e| crate::leak::is_encoded(Some(e)));
        if let Some(encoding) = encoded {
            self.encoded = Some(encoding.into_owned());
            if host::set_header(Map::Response, "content-encoding", None).is_err()
                || host::set_header(Map::Response, "content-type", Some("application/json")).is_err()
            {
                return self.refuse(unreadable_answer());
            }
        }
        Action::Continue
    }

    /// Only a request that has trailers comes here (a warm pull has none). Envoy drops trailers
    /// on an HTTP/1 upstream unless told otherwise; an HTTP/2 upstream (Istio's, say) gets them.
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.plan.is_none() {
            // Answered here: nothing goes upstream.
            return Action::Continue;
        }
        let Ok(trailers) = host::headers(Map::RequestTrailers) else {
            return self.refuse(cannot_edit());
        };
        // What is stripped from the head is stripped after the body too, the client's token
        // first: the upstream never sees it, wherever the client put it.
        for name in stripped_names(trailers.iter().map(|(name, _)| name), true) {
            if host::set_header(Map::RequestTrailers, name, None).is_err() {
                return self.refuse(cannot_edit());
            }
        }
        Action::Continue
    }

    /// Trailers come after the answer's head and body, so an echo of the credential in them
    /// cannot withhold the answer: the trailers that hold one are removed, and the answer is cut
    /// if they cannot be read or removed.
    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        let Some(plan) = self.plan.as_ref() else {
            return Action::Continue;
        };
        let connector = Rc::clone(&plan.connector);
        let Ok(trailers) = host::headers(Map::ResponseTrailers) else {
            return self.refuse(unreadable_answer());
        };
        let secrets = self.secrets();
        let echoed = crate::leak::echoing_names(trailers.iter(), &secrets);
        if echoed.is_empty() {
            return Action::Continue;
        }
        for name in &echoed {
            if host::set_header(Map::ResponseTrailers, &crate::wire::text(name), None).is_err() {
                return self.refuse(unreadable_answer());
            }
        }
        let r = credential_echoed(connector.label(), "a response trailer");
        count(&crate::stats::connector_refused(connector.label(), r.reason));
        log(
            LogLevel::Warn,
            &format!(
                "connector {}: {} response trailer(s) removed: {}",
                connector.label(),
                echoed.len(),
                r.reason
            ),
        );
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.check_body {
            return Action::Continue;
        }
        if self.status == 0 {
            // Already replaced (an oversized body): the rest is dropped as it comes.
            return self.withhold_body(body_size, end_of_stream, None);
        }
        // The plan's connector, shared (not its label copied per chunk): named only in refusals.
        let plan_connector = self.plan.as_ref().map(|p| Rc::clone(&p.connector));
        let connector = plan_connector
            .as_deref()
            .map(config::Connector::label)
            .unwrap_or_default();
        if let Some(encoding) = &self.encoded {
            // Unread, a 400 may be ECR Public's DENIED for an expired token (below): the token
            // goes, and is fetched again next time.
            if self.status == 400
                && let Some(k) = self.flow.take_used_token()
            {
                let _ = self.with_state(|st| st.upstream.drop_token(&k));
            }
            let r = Refusal::bad_gateway(
                "error_body_encoded",
                format!(
                    "the upstream registry of connector {} answered {} with an error body encoded as {}, which \
                     the proxy does not pass on unread",
                    crate::respond::quote(connector),
                    self.status,
                    crate::respond::quote(encoding)
                ),
            );
            return self.withhold_body(body_size, end_of_stream, Some(r));
        }
        if body_size > crate::leak::MAX_CHECKED_ERROR_BODY {
            // Not read, so not passed on.
            let r = Refusal::bad_gateway(
                "error_body_too_large",
                format!(
                    "the upstream registry of connector {} answered {} with an error body over {} bytes, which \
                     the proxy does not pass on unread",
                    crate::respond::quote(connector),
                    self.status,
                    crate::leak::MAX_CHECKED_ERROR_BODY
                ),
            );
            return self.withhold_body(body_size, end_of_stream, Some(r));
        }
        if !end_of_stream {
            // Buffer the (small) error body until it is complete.
            return Action::Pause;
        }
        self.check_body = false;
        let Ok(body) = host::buffer(Buffer::ResponseBody, body_size) else {
            return self.withhold_body(body_size, true, Some(unreadable_answer()));
        };
        if self.secrets().iter().any(|s| crate::leak::contains_any(&body, s)) {
            return self.withhold_body(body_size, true, Some(credential_echoed(connector, "its error body")));
        }
        // ECR Public answers an expired token with 400 DENIED rather than 401.
        if self.status == 400
            && crate::upstream::is_denied(&body)
            && let Some(k) = self.flow.take_used_token()
        {
            let _ = self.with_state(|st| st.upstream.drop_token(&k));
        }
        Action::Continue
    }
}
