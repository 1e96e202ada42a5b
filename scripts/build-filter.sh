#!/usr/bin/env bash
# The filter module Envoy loads, target/wasm32-wasip1/release/connector_filter.wasm (`make wasm`):
# cargo's release build, then Binaryen's `wasm-opt -Os -ocimfs 0` on it in place (Debian's `binaryen`,
# installed by scripts/setup.sh). wasm-opt shrinks what LLVM leaves for wasm by about 13 %, and
# the warm request costs Envoy no more CPU for it (docs/benchmark-log.md, 2026-12-04). Cargo puts
# its own output back at that path on every build, so this runs every time (about 2 s): a plain
# `cargo build` of the filter leaves the larger, equivalent module in place.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
cargo build -p connector-filter --target wasm32-wasip1 --release
out=target/wasm32-wasip1/release/connector_filter.wasm
# The features rustc's wasm32-wasip1 output uses; wasm-opt refuses a module that needs another,
# so a toolchain that starts emitting one fails here, loudly.
# -ocimfs 0: no function is inlined into its one caller whatever its size (-Os does that by
# default). The larger functions it makes cost V8 memory to compile that Envoy keeps: Envoy sat
# 31 MiB over the do-nothing module with them, 13 MiB without, for 2.5 KB more module and no
# CPU difference measurable on the warm request (docs/benchmark-log.md, 2026-12-05; the e2e
# test module_memory holds the line).
wasm-opt -Os -ocimfs 0 --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
  --enable-nontrapping-float-to-int "$out" -o "$out.tmp"
# A new file, not a rewrite: cargo's own output is a hard link it keeps in deps/.
mv "$out.tmp" "$out"
echo "build-filter: $out, wasm-opt -Os -ocimfs 0: $(stat -c %s "$out") bytes" >&2
