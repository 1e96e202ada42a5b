//! The thin proxy-wasm layer: gathers what the engine needs from the host, calls the plain
//! decision functions, and applies their results. No decision is made here.
//!
//! Every host read uses the `_bytes` accessors: the `String` ones in proxy-wasm 0.2.5 unwrap
//! UTF-8 and would panic (killing the VM) on a hostile header value.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use crate::config::{self, Config};
use crate::engine::{
    CLUSTER_HEADER, Decision, Request, ResponsePlan, STRIPPED_REQUEST_HEADERS, decide_request, plan_response,
};
use crate::identity::TokenCache;
use crate::respond::{LocalResponse, Refusal};

/// The compiled configuration and the verified-token cache of this VM (one per Envoy worker).
struct State {
    config: Config,
    cache: TokenCache,
}

type Shared = Rc<RefCell<Option<State>>>;

// The SDK's entry-point macro expands to an `unsafe` block and `#[no_mangle]` export.
#[allow(unsafe_code)]
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
        proxy_wasm::set_root_context(|_| Box::new(super::Root::default()));
    }}
}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

thread_local! {
    /// Whether Envoy logs wasm debug lines, read once per configuration: asking the host on
    /// every request is a host call, and building the line a `format!`.
    static DEBUG: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn debug_enabled() -> bool {
    DEBUG.with(std::cell::Cell::get)
}

#[derive(Default)]
struct Root {
    state: Shared,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let compiled = config::compile(&bytes, &|name| std::env::var(name).ok());
        DEBUG.with(|d| {
            d.set(matches!(
                hostcalls::get_log_level(),
                Ok(LogLevel::Trace | LogLevel::Debug)
            ))
        });
        let Ok(mut slot) = self.state.try_borrow_mut() else {
            return false;
        };
        match compiled {
            Ok(config) => {
                log(
                    LogLevel::Info,
                    &format!(
                        "configuration accepted: {} connector(s), {} key(s)",
                        config.connectors.len(),
                        config.policy.keys.len()
                    ),
                );
                *slot = Some(State {
                    cache: TokenCache::new(config.token_cache_size),
                    config,
                });
                true
            }
            Err(errors) => {
                // Fail closed: no state means every request is refused.
                *slot = None;
                log(
                    LogLevel::Error,
                    &format!("configuration refused, {} problem(s):", errors.len()),
                );
                for e in &errors {
                    log(LogLevel::Error, &format!("config {e}"));
                }
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            state: self.state.clone(),
            plan: None,
            realm: String::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    state: Shared,
    /// Set when the request was forwarded; the response phase must not read request headers.
    plan: Option<ResponsePlan>,
    realm: String,
}

impl Context for Http {}

fn lossy(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

impl Http {
    fn send(&self, r: LocalResponse) -> Action {
        let headers: Vec<(&str, &str)> = r.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.send_http_response(r.status, headers, Some(&r.body));
        Action::Pause
    }

    fn decide(&mut self, req: &Request<'_>, now: u64) -> Decision {
        let unavailable = |why: &str| {
            let r = Refusal::unavailable(why);
            let reason = r.reason;
            Decision::Respond {
                response: r.into_response(config::DEFAULT_REALM),
                reason,
            }
        };
        let Ok(mut guard) = self.state.try_borrow_mut() else {
            return unavailable("the connector proxy is busy: retry");
        };
        match guard.as_mut() {
            None => unavailable("the connector proxy has no valid configuration; its log lists the problems"),
            Some(state) => {
                self.realm.clone_from(&state.config.realm);
                decide_request(&state.config, &mut state.cache, req, now)
            }
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let headers = self.get_http_request_headers_bytes();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| lossy(v))
                .unwrap_or_default()
        };
        let (method, path, authority, scheme) = (get(":method"), get(":path"), get(":authority"), get(":scheme"));
        let authorization: Vec<String> = headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| lossy(v))
            .collect();
        let authorization: Vec<&str> = authorization.iter().map(String::as_str).collect();
        let request = Request {
            method: &method,
            path: &path,
            authority: &authority,
            scheme: &scheme,
            authorization: &authorization,
        };
        let now = self
            .get_current_time()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);

        match self.decide(&request, now) {
            Decision::Respond { response, reason } => {
                if debug_enabled() {
                    log(
                        LogLevel::Debug,
                        &format!("{method} answered locally: {} {reason}", response.status),
                    );
                }
                self.send(response)
            }
            Decision::Forward(f) => {
                // Host calls are the filter's main per-request cost: remove only what is there.
                for name in STRIPPED_REQUEST_HEADERS {
                    if headers.iter().any(|(k, _)| k == name) {
                        self.set_http_request_header(name, None);
                    }
                }
                self.set_http_request_header("authorization", Some(&f.authorization));
                self.set_http_request_header(":path", Some(&f.path));
                self.set_http_request_header(":authority", Some(&f.authority));
                self.set_http_request_header(CLUSTER_HEADER, Some(&f.cluster));
                if debug_enabled() {
                    log(
                        LogLevel::Debug,
                        &format!(
                            "{method} forwarded: connector={} subject={} token_cache_hit={}",
                            f.response.connector,
                            f.caller.subject(),
                            f.cache_hit
                        ),
                    );
                }
                self.plan = Some(f.response);
                Action::Continue
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(plan) = self.plan.as_ref() else {
            return Action::Continue;
        };
        // One host call for the whole map instead of one per header.
        let headers = self.get_http_response_headers_bytes();
        let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| lossy(v));
        let status = header(":status").and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
        let location = header("location");
        let link = header("link");
        let has_challenge = headers.iter().any(|(k, _)| k == "www-authenticate");
        let edits = plan_response(plan, &self.realm, status, location.as_deref(), link.as_deref());
        // The upstream's challenge would send the client's token to the upstream's realm.
        if has_challenge {
            self.set_http_response_header("www-authenticate", None);
        }
        if let Some((response, reason)) = edits.replace {
            log(
                LogLevel::Info,
                &format!("upstream answered {status} for connector {}: {reason}", plan.connector),
            );
            self.plan = None;
            return self.send(response);
        }
        if let Some(l) = edits.location {
            self.set_http_response_header("location", Some(&l));
        }
        if let Some(l) = edits.link {
            self.set_http_response_header("link", Some(&l));
        }
        Action::Continue
    }
}
