//! Runs a WASI preview1 command module (a `cargo test --target wasm32-wasip1` harness) under
//! wasmtime: `wasi-runner <module.wasm> [args...]`. The module gets the arguments (its own
//! path first, as cargo's runner convention gives it), the process's stdin/stdout/stderr, and
//! nothing else: no preopened directories (imports outside WASI, such as the proxy-wasm
//! host calls a filter's test harness still references, trap if called), no environment except `RUST_*` variables (test
//! harness options such as `RUST_TEST_THREADS`, `RUST_BACKTRACE`). Exits with the module's
//! exit code. Use it as `CARGO_TARGET_WASM32_WASIP1_RUNNER`.

use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use wasmtime::{Engine, Linker, Module, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{I32Exit, WasiCtxBuilder};

fn run() -> Result<i32> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        bail!("usage: wasi-runner <module.wasm> [args...]");
    };
    let engine = Engine::default();
    let module = Module::from_file(&engine, path)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("loading {path}"))?;
    let mut builder = WasiCtxBuilder::new();
    builder.inherit_stdio().args(&args);
    for (k, v) in std::env::vars() {
        if k.starts_with("RUST_") {
            builder.env(&k, &v);
        }
    }
    let mut store: Store<WasiP1Ctx> = Store::new(&engine, builder.build_p1());
    let mut linker: Linker<WasiP1Ctx> = Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s| s)?;
    // A test harness of a proxy-wasm crate still imports the host calls (`env::proxy_*`) its
    // shim references; unit tests never reach them. They become traps naming the import.
    let unknown: Vec<String> = module
        .imports()
        .filter(|i| i.module() != "wasi_snapshot_preview1")
        .map(|i| format!("{}::{}", i.module(), i.name()))
        .collect();
    if !unknown.is_empty() && std::env::var_os("WASI_RUNNER_QUIET").is_none() {
        eprintln!(
            "wasi-runner: {} non-WASI import(s) trap if called: {}",
            unknown.len(),
            unknown.join(", ")
        );
    }
    linker.define_unknown_imports_as_traps(&module)?;
    let instance = linker.instantiate(&mut store, &module)?;
    let start = instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .map_err(anyhow::Error::from)
        .context("the module has no _start: not a WASI command")?;
    match start.call(&mut store, ()) {
        Ok(()) => Ok(0),
        Err(e) => match e.downcast_ref::<I32Exit>() {
            Some(exit) => Ok(exit.0),
            None => Err(e.into()),
        },
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("wasi-runner: {e:?}");
            // A trap (e.g. a panic under panic=abort) is a failure, like a signal natively.
            ExitCode::from(134)
        }
    }
}
