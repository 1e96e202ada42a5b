//! A test host for the shipped filter module: loads the release `.wasm` exactly as built,
//! provides WASI preview1 (wasmtime-wasi) and the proxy-wasm ABI 0.2.1 host calls the filter
//! makes, and drives the module's exports the way Envoy does.
//!
//! Everything a test may look at (logs, local responses, HTTP calls, metrics, properties,
//! header maps) is recorded in the [`Record`] of one [`Host`]: no globals, so tests run in
//! parallel. The only process-wide thing is the compiled-module cache (compiling the module
//! once per test binary).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail};
use wasmtime::{Caller, Engine, Extern, Instance, Linker, Memory, Module, Store};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;

mod abi;
mod foreign;
pub mod parts;
pub mod warm;

/// proxy-wasm status codes (ABI 0.2.1).
pub mod status {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const BAD_ARGUMENT: i32 = 2;
    pub const SERIALIZATION_FAILURE: i32 = 3;
    pub const EMPTY: i32 = 7;
    pub const CAS_MISMATCH: i32 = 8;
}

/// proxy-wasm map types.
pub mod map {
    pub const REQUEST_HEADERS: i32 = 0;
    pub const REQUEST_TRAILERS: i32 = 1;
    pub const RESPONSE_HEADERS: i32 = 2;
    pub const RESPONSE_TRAILERS: i32 = 3;
    pub const HTTP_CALL_RESPONSE_HEADERS: i32 = 6;
    pub const HTTP_CALL_RESPONSE_TRAILERS: i32 = 7;
}

/// proxy-wasm buffer types.
pub mod buffer {
    pub const REQUEST_BODY: i32 = 0;
    pub const RESPONSE_BODY: i32 = 1;
    pub const HTTP_CALL_RESPONSE_BODY: i32 = 4;
    pub const VM_CONFIGURATION: i32 = 6;
    pub const PLUGIN_CONFIGURATION: i32 = 7;
}

/// The value after `name` on the command line, or `default`: the probes' (`push-cost`,
/// `warm-cost`, `mem-cost`) one kind of option.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// The release module as `scripts/build-filter.sh` (cargo, then wasm-opt) leaves it,
/// or the file `CONNECTOR_FILTER_WASM` names.
pub fn default_module_path() -> PathBuf {
    if let Ok(p) = std::env::var("CONNECTOR_FILTER_WASM") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm32-wasip1/release/connector_filter.wasm")
}

/// A header map: names and values as bytes (values may be any bytes, as a hostile client sends).
pub type Headers = Vec<(Vec<u8>, Vec<u8>)>;

/// Builds a header map from string pairs.
pub fn headers(pairs: &[(&str, &str)]) -> Headers {
    pairs
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

/// What a filter callback told the host to do with the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
    Other(i32),
}

impl Action {
    fn from_raw(v: i32) -> Self {
        match v {
            0 => Action::Continue,
            1 => Action::Pause,
            v => Action::Other(v),
        }
    }
}

/// A response the filter answered itself (`proxy_send_local_response`).
#[derive(Debug, Clone)]
pub struct LocalResponse {
    pub status: u32,
    pub details: Vec<u8>,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub grpc_status: i32,
}

impl LocalResponse {
    /// The first value of header `name` (case-insensitive), lossily as text.
    pub fn header(&self, name: &str) -> Option<String> {
        first(&self.headers, name.as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Value::Null` if it is not JSON).
    pub fn body_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// An outgoing call the filter made (`proxy_http_call`).
#[derive(Debug, Clone)]
pub struct HttpCall {
    pub token: u32,
    /// The effective context when the call was made: its answer goes there.
    pub context: u32,
    pub cluster: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
    pub timeout_ms: u32,
    pub answered: bool,
}

impl HttpCall {
    pub fn header(&self, name: &str) -> Option<String> {
        first(&self.headers, name.as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// A metric the filter defined.
#[derive(Debug, Clone)]
pub struct Metric {
    /// 0 counter, 1 gauge, 2 histogram.
    pub kind: i32,
    pub name: String,
    pub value: u64,
}

/// One HTTP stream (an HTTP context) as the host sees it.
#[derive(Debug, Clone, Default)]
pub struct Stream {
    pub request_headers: Headers,
    pub request_trailers: Headers,
    pub request_body: Vec<u8>,
    pub response_headers: Headers,
    pub response_trailers: Headers,
    pub response_body: Vec<u8>,
    /// Response headers reached the filter: Envoy no longer lends the request headers.
    pub response_started: bool,
    pub local_responses: Vec<LocalResponse>,
    /// `proxy_continue_stream(HttpRequest)` calls.
    pub resumed_requests: u32,
    /// `proxy_continue_stream(HttpResponse)` calls.
    pub resumed_responses: u32,
    pub closed: u32,
    pub done: bool,
}

impl Stream {
    /// The first request header `name` (case-insensitive), lossily as text.
    pub fn request_header(&self, name: &str) -> Option<String> {
        first(&self.request_headers, name.as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// Every value of request header `name`.
    pub fn request_header_all(&self, name: &str) -> Vec<String> {
        self.request_headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    pub fn response_header(&self, name: &str) -> Option<String> {
        first(&self.response_headers, name.as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The only local response; `None` if there was none.
    pub fn local(&self) -> Option<&LocalResponse> {
        self.local_responses.last()
    }
}

fn first<'a>(h: &'a Headers, name: &[u8]) -> Option<&'a [u8]> {
    h.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// Everything recorded about one module instance.
#[derive(Debug, Default)]
pub struct Record {
    /// Every host call, in order: `(name, effective context)`.
    pub calls: Vec<(&'static str, u32)>,
    /// `(level, message)`; levels 0 trace … 5 critical.
    pub logs: Vec<(i32, String)>,
    pub log_level: i32,
    /// Host time in nanoseconds since the epoch; `None`: the real clock.
    pub now_nanos: Option<u64>,
    pub plugin_configuration: Vec<u8>,
    pub vm_configuration: Vec<u8>,
    pub effective: u32,
    pub root_id: u32,
    /// Root contexts made after the first ([`Host::new_root`]): Envoy keeps one per filter
    /// configuration.
    pub more_roots: Vec<u32>,
    pub streams: HashMap<u32, Stream>,
    pub http_calls: Vec<HttpCall>,
    /// The answer being delivered through `proxy_on_http_call_response`.
    pub call_response: Option<(Headers, Vec<u8>, Headers)>,
    pub metrics: Vec<Metric>,
    pub properties: HashMap<Vec<u8>, Vec<u8>>,
    pub tick_period_ms: u32,
    pub shared_data: HashMap<Vec<u8>, (Vec<u8>, u32)>,
    pub queues: Vec<(String, String, Vec<Vec<u8>>)>,
    /// Injected failures: host call name, the status it returns instead, how many more times.
    pub faults: Vec<(&'static str, i32, u32)>,
    next_token: u32,
}

impl Record {
    pub fn now_nanos(&self) -> u64 {
        self.now_nanos.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        })
    }

    pub fn metric(&self, name: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.name == name)
    }

    /// Log lines containing `needle`.
    pub fn logs_containing(&self, needle: &str) -> Vec<&str> {
        self.logs
            .iter()
            .filter(|(_, m)| m.contains(needle))
            .map(|(_, m)| m.as_str())
            .collect()
    }

    /// Makes the next `times` calls of host function `name` (e.g. `proxy_replace_header_map_value`)
    /// do nothing and return `status`, as a host in trouble would.
    pub fn inject(&mut self, name: &'static str, status: i32, times: u32) {
        self.faults.push((name, status, times));
    }

    fn take_fault(&mut self, name: &str) -> Option<i32> {
        let f = self.faults.iter_mut().find(|(n, _, left)| *n == name && *left > 0)?;
        f.2 -= 1;
        Some(f.1)
    }

    pub fn call_count(&self, name: &str) -> usize {
        self.calls.iter().filter(|(n, _)| *n == name).count()
    }
}

/// The store's data: WASI state plus the record.
pub struct State {
    wasi: WasiP1Ctx,
    pub rec: Record,
}

/// How to start a module instance.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Environment variables of the Wasm VM (Envoy's `host_env_keys`).
    pub env: Vec<(String, String)>,
    /// proxy-wasm log level the host reports (default 2, info).
    pub log_level: Option<i32>,
    /// Fixed host time; `None`: the real clock.
    pub now_nanos: Option<u64>,
    /// The module file; `None`: [`default_module_path`].
    pub module: Option<PathBuf>,
    /// Compile the module with Cranelift's optimisations, as a measurement wants (an engine
    /// like Envoy's); the tests leave it off, for a quick compile.
    pub optimized: bool,
}

fn compiled(path: &Path, optimized: bool) -> Result<(Engine, Module)> {
    type Compiled = HashMap<(PathBuf, bool), (Engine, Module)>;
    static CACHE: OnceLock<Mutex<Compiled>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut guard = cache.lock().map_err(|_| anyhow!("module cache poisoned"))?;
    let key = (path.to_path_buf(), optimized);
    if let Some(hit) = guard.get(&key) {
        return Ok(hit.clone());
    }
    // Cranelift built without optimisations (a debug test build) compiles the module slowly;
    // unoptimised machine code is plenty for tests.
    let mut config = wasmtime::Config::new();
    config.cranelift_opt_level(if optimized {
        wasmtime::OptLevel::Speed
    } else {
        wasmtime::OptLevel::None
    });
    // `perf record` can name the module's functions from /tmp/perf-PID.map (build the module
    // with `CARGO_PROFILE_RELEASE_STRIP=none` so it keeps their names).
    if std::env::var_os("WASM_HOST_PERF_MAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let engine = Engine::new(&config)?;
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "reading {} (build it: bash scripts/build-filter.sh, or cargo build -p connector-filter --target wasm32-wasip1 --release)",
            path.display()
        )
    })?;
    let module = Module::new(&engine, &bytes)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("compiling {}", path.display()))?;
    guard.insert(key, (engine.clone(), module.clone()));
    Ok((engine, module))
}

/// One instance of the filter module and what it did.
pub struct Host {
    module: Module,
    store: Store<State>,
    instance: Instance,
    next_id: u32,
}

/// Imports the module may have that this host does not implement: they trap when called.
pub const UNSUPPORTED: &[&str] = &[
    "proxy_get_status",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
];

/// The root context's id, as Envoy numbers them (the first context).
pub const ROOT_ID: u32 = 1;

impl Host {
    /// Loads the shipped module with default options and starts the VM (no configuration yet).
    pub fn start() -> Result<Host> {
        Host::with(Options::default())
    }

    /// Loads the module, checks every import is provided, instantiates it and runs
    /// `_initialize`/`_start`, `proxy_on_vm_start` and the root context's creation.
    pub fn with(opts: Options) -> Result<Host> {
        let path = opts.module.clone().unwrap_or_else(default_module_path);
        let (engine, module) = compiled(&path, opts.optimized)?;
        let mut wasi = WasiCtxBuilder::new();
        wasi.inherit_stderr();
        for (k, v) in &opts.env {
            wasi.env(k, v);
        }
        let state = State {
            wasi: wasi.build_p1(),
            rec: Record {
                log_level: opts.log_level.unwrap_or(2),
                now_nanos: opts.now_nanos,
                root_id: ROOT_ID,
                effective: ROOT_ID,
                ..Record::default()
            },
        };
        let mut store = Store::new(&engine, state);
        let mut linker: Linker<State> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut State| &mut s.wasi)?;
        abi::add_to_linker(&mut linker)?;
        // Imports Envoy provides but the filter never calls (the SDK's gRPC glue): present so the module instantiates, a trap naming the call if ever reached.
        for import in module.imports() {
            if import.module() == "env"
                && UNSUPPORTED.contains(&import.name())
                && let wasmtime::ExternType::Func(ty) = import.ty()
            {
                let name = import.name().to_string();
                linker.func_new("env", import.name(), ty, move |mut caller, _params, _results| {
                    let eff = caller.data().rec.effective;
                    caller.data_mut().rec.calls.push(("unsupported", eff));
                    wasmtime::bail!("the module called {name}, which this test host does not implement")
                })?;
            }
        }
        let missing: Vec<String> = module
            .imports()
            .filter(|i| linker.get_by_import(&mut store, i).is_none())
            .map(|i| format!("{}::{}", i.module(), i.name()))
            .collect();
        if !missing.is_empty() {
            bail!(
                "the module imports {} function(s) this test host does not implement: {}",
                missing.len(),
                missing.join(", ")
            );
        }
        let instance = linker.instantiate(&mut store, &module)?;
        let mut host = Host {
            module,
            store,
            instance,
            next_id: ROOT_ID + 1,
        };
        for start in ["_initialize", "_start"] {
            if let Some(f) = host.instance.get_func(&mut host.store, start) {
                f.typed::<(), ()>(&host.store)?.call(&mut host.store, ())?;
            }
        }
        // Envoy (proxy-wasm-cpp-host) creates the root context before starting the VM on it:
        // the SDK's `proxy_on_vm_start` panics ("invalid context_id") on an unknown root.
        host.call::<_, ()>("proxy_on_context_create", (ROOT_ID as i32, 0))?;
        let vm_config_len = host.store.data().rec.vm_configuration.len() as i32;
        let ok: i32 = host.call("proxy_on_vm_start", (ROOT_ID as i32, vm_config_len))?;
        if ok == 0 {
            bail!("proxy_on_vm_start returned false");
        }
        Ok(host)
    }

    /// The module's imports as `module::name`.
    pub fn imports(&self) -> Vec<String> {
        self.module
            .imports()
            .map(|i| format!("{}::{}", i.module(), i.name()))
            .collect()
    }

    /// The module's exports.
    pub fn exports(&self) -> Vec<String> {
        self.module.exports().map(|e| e.name().to_string()).collect()
    }

    fn call<P, R>(&mut self, name: &str, params: P) -> Result<R>
    where
        P: wasmtime::WasmParams,
        R: wasmtime::WasmResults,
    {
        let f = self
            .instance
            .get_typed_func::<P, R>(&mut self.store, name)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("the module's export {name}"))?;
        f.call(&mut self.store, params).map_err(|e| {
            // A panic inside the module reaches the host as a critical log line (the SDK's
            // panic hook), then `unreachable`: name it in the error.
            let panics: Vec<&str> = self
                .rec()
                .logs
                .iter()
                .filter(|(level, _)| *level >= 5)
                .map(|(_, m)| m.as_str())
                .collect();
            anyhow::Error::from(e).context(format!("calling {name}: the module trapped; critical logs: {panics:?}"))
        })
    }

    pub fn rec(&self) -> &Record {
        &self.store.data().rec
    }

    pub fn rec_mut(&mut self) -> &mut Record {
        &mut self.store.data_mut().rec
    }

    /// The size of the module's linear memory in bytes (it grows, never shrinks).
    pub fn memory_bytes(&mut self) -> Result<usize> {
        match self.instance.get_export(&mut self.store, "memory") {
            Some(wasmtime::Extern::Memory(m)) => Ok(m.data_size(&self.store)),
            _ => bail!("the module exports no memory"),
        }
    }

    /// Hands the plugin configuration to the root context: `proxy_on_configure`'s answer.
    pub fn configure(&mut self, config: &[u8]) -> Result<bool> {
        self.rec_mut().plugin_configuration = config.to_vec();
        self.rec_mut().effective = ROOT_ID;
        let ok: i32 = self.call("proxy_on_configure", (ROOT_ID as i32, config.len() as i32))?;
        Ok(ok != 0)
    }

    /// Creates an HTTP context under the root context; returns its id.
    pub fn new_stream(&mut self) -> Result<u32> {
        self.new_stream_under(ROOT_ID)
    }

    /// Creates an HTTP context under root context `root`; returns its id.
    pub fn new_stream_under(&mut self, root: u32) -> Result<u32> {
        let id = self.next_id;
        self.next_id += 1;
        self.rec_mut().streams.insert(id, Stream::default());
        self.call::<_, ()>("proxy_on_context_create", (id as i32, root as i32))?;
        Ok(id)
    }

    /// What Envoy does with a new filter configuration (ECDS) for a running VM: a new root
    /// context in the same VM, configured with `config`. Returns its id and
    /// `proxy_on_configure`'s answer.
    pub fn new_root(&mut self, config: &[u8]) -> Result<(u32, bool)> {
        let id = self.next_id;
        self.next_id += 1;
        self.call::<_, ()>("proxy_on_context_create", (id as i32, 0))?;
        self.rec_mut().more_roots.push(id);
        self.rec_mut().plugin_configuration = config.to_vec();
        self.rec_mut().effective = id;
        let ok: i32 = self.call("proxy_on_configure", (id as i32, config.len() as i32))?;
        Ok((id, ok != 0))
    }

    pub fn stream(&self, id: u32) -> &Stream {
        static EMPTY: OnceLock<Stream> = OnceLock::new();
        self.rec()
            .streams
            .get(&id)
            .unwrap_or_else(|| EMPTY.get_or_init(Stream::default))
    }

    fn enter(&mut self, id: u32) {
        self.rec_mut().effective = id;
    }

    /// Delivers the request headers: `proxy_on_request_headers(id, n, eos)`.
    pub fn request_headers(&mut self, id: u32, headers: Headers, end_of_stream: bool) -> Result<Action> {
        let n = headers.len() as i32;
        if let Some(s) = self.rec_mut().streams.get_mut(&id) {
            s.request_headers = headers;
        }
        self.enter(id);
        let a: i32 = self.call("proxy_on_request_headers", (id as i32, n, end_of_stream as i32))?;
        Ok(Action::from_raw(a))
    }

    /// Delivers the upstream's response headers: `proxy_on_response_headers(id, n, eos)`.
    pub fn response_headers(&mut self, id: u32, headers: Headers, end_of_stream: bool) -> Result<Action> {
        let n = headers.len() as i32;
        if let Some(s) = self.rec_mut().streams.get_mut(&id) {
            s.response_headers = headers;
            s.response_started = true;
        }
        self.enter(id);
        let a: i32 = self.call("proxy_on_response_headers", (id as i32, n, end_of_stream as i32))?;
        Ok(Action::from_raw(a))
    }

    /// Delivers the request's trailers (after its body): `proxy_on_request_trailers(id, n)`.
    pub fn request_trailers(&mut self, id: u32, trailers: Headers) -> Result<Action> {
        let n = trailers.len() as i32;
        if let Some(s) = self.rec_mut().streams.get_mut(&id) {
            s.request_trailers = trailers;
        }
        self.enter(id);
        let a: i32 = self.call("proxy_on_request_trailers", (id as i32, n))?;
        Ok(Action::from_raw(a))
    }

    /// Delivers the upstream's trailers (after its body): `proxy_on_response_trailers(id, n)`.
    pub fn response_trailers(&mut self, id: u32, trailers: Headers) -> Result<Action> {
        let n = trailers.len() as i32;
        if let Some(s) = self.rec_mut().streams.get_mut(&id) {
            s.response_trailers = trailers;
        }
        self.enter(id);
        let a: i32 = self.call("proxy_on_response_trailers", (id as i32, n))?;
        Ok(Action::from_raw(a))
    }

    /// Delivers (more of) the response body: `proxy_on_response_body(id, size, eos)`.
    /// Like Envoy after a Pause, the body buffered so far accumulates.
    pub fn response_body(&mut self, id: u32, chunk: &[u8], end_of_stream: bool) -> Result<Action> {
        let size = match self.rec_mut().streams.get_mut(&id) {
            Some(s) => {
                s.response_body.extend_from_slice(chunk);
                s.response_body.len() as i32
            }
            None => chunk.len() as i32,
        };
        self.enter(id);
        let a: i32 = self.call("proxy_on_response_body", (id as i32, size, end_of_stream as i32))?;
        Ok(Action::from_raw(a))
    }

    /// Calls not answered yet.
    pub fn pending_calls(&self) -> Vec<HttpCall> {
        self.rec().http_calls.iter().filter(|c| !c.answered).cloned().collect()
    }

    /// Answers call `token`: `proxy_on_http_call_response(context, token, n, body, 0)` with
    /// `:status` first among the headers.
    pub fn answer_call(&mut self, token: u32, status: u32, headers: &[(&str, &str)], body: &[u8]) -> Result<()> {
        let mut h = vec![(b":status".to_vec(), status.to_string().into_bytes())];
        h.extend(self::headers(headers));
        self.answer_call_raw(token, h, body.to_vec())
    }

    /// Marks call `token` answered (once) and returns the context it belongs to.
    fn take_call(&mut self, token: u32) -> Result<u32> {
        let Some(call) = self.rec_mut().http_calls.iter_mut().find(|c| c.token == token) else {
            bail!("no HTTP call with token {token}");
        };
        if call.answered {
            bail!("HTTP call {token} was already answered");
        }
        call.answered = true;
        Ok(call.context)
    }

    pub fn answer_call_raw(&mut self, token: u32, headers: Headers, body: Vec<u8>) -> Result<()> {
        let context = self.take_call(token)?;
        let rec = self.rec_mut();
        let (n, size) = (headers.len() as i32, body.len() as i32);
        rec.call_response = Some((headers, body, Vec::new()));
        rec.effective = context;
        let r = self.call::<_, ()>(
            "proxy_on_http_call_response",
            (context as i32, token as i32, n, size, 0),
        );
        self.rec_mut().call_response = None;
        r
    }

    /// Fails call `token` as Envoy does when the answer breaks off after its head (close or
    /// reset), or the call times out: `proxy_on_http_call_response(context, token, 0, 0, 0)`
    /// with no response map, so any read of it returns `BadArgument`.
    pub fn fail_call(&mut self, token: u32) -> Result<()> {
        let context = self.take_call(token)?;
        let rec = self.rec_mut();
        rec.call_response = None;
        rec.effective = context;
        self.call::<_, ()>("proxy_on_http_call_response", (context as i32, token as i32, 0, 0, 0))
    }

    /// The end of a stream as Envoy ends it: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`.
    pub fn finish(&mut self, id: u32) -> Result<()> {
        self.enter(id);
        let _done: i32 = self.call("proxy_on_done", (id as i32,))?;
        self.enter(id);
        self.call::<_, ()>("proxy_on_log", (id as i32,))?;
        self.enter(id);
        self.call::<_, ()>("proxy_on_delete", (id as i32,))?;
        if let Some(s) = self.rec_mut().streams.get_mut(&id) {
            s.done = true;
        }
        Ok(())
    }

    /// Fires the first root context's timer: `proxy_on_tick(root)`.
    pub fn tick(&mut self) -> Result<()> {
        self.tick_root(ROOT_ID)
    }

    /// Fires the timer of root context `root` (one [`Host::new_root`] made).
    pub fn tick_root(&mut self, root: u32) -> Result<()> {
        self.enter(root);
        self.call::<_, ()>("proxy_on_tick", (root as i32,))
    }
}

/// Serialises a map the proxy-wasm way: count, (key len, value len) pairs, then each key and
/// value followed by a NUL.
pub fn serialize_map(map: &Headers) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(map.len() as u32).to_le_bytes());
    for (k, v) in map {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in map {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Reads a map serialised by [`serialize_map`]; `None` if it is malformed.
pub fn deserialize_map(bytes: &[u8]) -> Option<Headers> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let u32_at = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let n = u32_at(0)?;
    let mut sizes = Vec::with_capacity(n.min(1024));
    for i in 0..n {
        sizes.push((u32_at(4 + i * 8)?, u32_at(8 + i * 8)?));
    }
    let mut at = 4 + n * 8;
    let mut out = Vec::with_capacity(sizes.len());
    for (kl, vl) in sizes {
        let k = bytes.get(at..at + kl)?.to_vec();
        at += kl + 1;
        let v = bytes.get(at..at + vl)?.to_vec();
        at += vl + 1;
        out.push((k, v));
    }
    Some(out)
}

pub(crate) fn memory(caller: &mut Caller<'_, State>) -> wasmtime::Result<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => wasmtime::bail!("the module exports no memory"),
    }
}
