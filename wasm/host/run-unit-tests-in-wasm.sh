#!/usr/bin/env bash
# Runs the unit tests of what the module links, the filter and connector-core (with its `keys`:
# the PKCS#1 limb arithmetic is 32-bit there), compiled to wasm32-wasip1, under wasmtime (wasi-runner).
#
# cargo reads .cargo/config.toml from the current directory upwards, so a runner config inside
# filter/ would not apply to a workspace-level `cargo test`; the runner is set through the
# environment instead: CARGO_TARGET_WASM32_WASIP1_RUNNER=<wasi-runner>.
# Extra arguments go to the test harness, e.g. `run-unit-tests-in-wasm.sh identity::`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
cargo build -p connector-wasm-host --bin wasi-runner
export CARGO_TARGET_WASM32_WASIP1_RUNNER="$root/target/debug/wasi-runner"
cargo test -p connector-core --features keys --lib --target wasm32-wasip1 -- "$@"
exec cargo test -p connector-filter --lib --target wasm32-wasip1 -- "$@"
