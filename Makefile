# Task runner. Newcomers: `make demo` shows the connector working end to end; `make test` runs
# every test, unit and end-to-end, against real Envoy, CNCF Distribution and skopeo.

# The release build, then wasm-opt (scripts/build-filter.sh says why).
WASM_BUILD := bash scripts/build-filter.sh

.PHONY: setup wasm demo demo-kube test unit e2e wasm-host bench bench-scale soak lint fuzz fuzz-smoke images compose-demo

# Idempotent: installs only what is missing (Debian packages, .venv with Envoy, wasm target, /etc/hosts
# names, kube-apiserver + kubectl + etcd built once per version from the Go module proxy).
setup:
	bash scripts/setup.sh

# The filter module Envoy loads: target/wasm32-wasip1/release/connector_filter.wasm
wasm:
	$(WASM_BUILD)

# File mode on embedded defaults: the controller serves generated manifests to Envoy over xDS.
demo: setup wasm
	cargo build -p connector-controller
	cargo run -p connector-devkit --bin demo

# The same story in API mode on a real kube-apiserver + etcd (built by setup): CRD, Secret and
# Connector applied with kubectl, Ready and the proxy URL from the status, `kubectl create token`,
# pulls in both address forms, a labelled Pod rewritten by the webhook, a refused pull.
demo-kube: setup wasm
	cargo build -p connector-controller -p connector-webhook
	cargo run -p connector-devkit --bin demo_kube

# The container images, FROM scratch with static binaries, built with buildah (deploy/images/).
# make images IMAGE_REGISTRY=<registry> PUSH=1 also pushes them and pins their digests in
# deploy/images/kustomization.yaml, the component every deploy/ variant takes image names from.
images: setup
	bash scripts/images.sh

# docker-compose.yml run for real with podman-compose on those images: a pull through the TLS proxy.
compose-demo: images
	cargo run -p connector-devkit --bin compose_demo

# The release module first (some crates' tests load it), then the default members' tests, then
# the end-to-end tests.
test: setup wasm unit e2e wasm-host fuzz-smoke

unit:
	cargo test

# The e2e tests run the controller binary (xDS to a real Envoy) next to the release module, and
# the credential provider binary (controller_kube).
e2e:
	rm -rf .work
	cargo build -p connector-controller -p connector-credential-provider
	# The deliberately trapping module of vm_containment and the do-nothing module module_memory
	# measures the filter beside (neither shipped).
	cargo build -p trap-filter -p noop-filter --target wasm32-wasip1 --release
	cargo test -p connector-e2e

# Side-by-side benchmark (README "Benchmark"): direct vs Envoy vs Envoy + filter, two upstreams.
bench: setup wasm
	cargo build -p noop-filter -p floor-filter --target wasm32-wasip1 --release
	cargo build -p connector-wasm-host --bin host-calls
	cargo run --release -p connector-devkit --bin bench -- $(BENCH_ARGS)

# Scale benchmark (README "Scale"): 100 to 20,000 connectors in file mode, side by side.
# Then what one push costs a single filter VM (the shipped module under optimised wasmtime).
bench-scale: setup wasm
	cargo build -p connector-controller
	cargo run --release -p connector-devkit --bin bench_scale -- $(BENCH_SCALE_ARGS)
	cargo run --release -p connector-wasm-host --bin push-cost

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p connector-filter -p noop-filter -p floor-filter --target wasm32-wasip1 --release -- -D warnings
	# Licences, duplicate versions (each remaining one explained in deny.toml), crate sources.
	# Not advisories: their database is on github.com, which this machine cannot reach.
	cargo deny check licenses bans sources

# Fuzzing the filter's parsers (cargo-fuzz, nightly; fuzz/ is its own workspace).
# CI runs every target briefly; a longer run: make fuzz FUZZ_SECONDS=600.
FUZZ_TARGETS := route token challenge rewrite config decide echo
FUZZ_SECONDS ?= 300
fuzz-smoke:
	cd fuzz && for t in $(FUZZ_TARGETS); do cargo +nightly fuzz run $$t -- -max_total_time=10 || exit 1; done

fuzz:
	cd fuzz && for t in $(FUZZ_TARGETS); do cargo +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; done

# Bounded mixed load (pulls and pushes over 20 connectors, tokens rotating, one Secret rotated):
# zero unexpected errors and flat memory, or it fails. make soak SOAK_MINUTES=10
SOAK_MINUTES ?= 10
soak: setup wasm
	cargo build -p connector-controller
	cargo run --release -p connector-devkit --bin soak -- --minutes $(SOAK_MINUTES)

# The shipped module under wasmtime (the proxy-wasm ABI host in wasm/host), and the filter's unit
# tests compiled to wasm32-wasip1 and run on the same wasmtime.
wasm-host:
	# The benchmark's host-call floor, which a test holds to the filter's calls.
	cargo build -p floor-filter --target wasm32-wasip1 --release
	cargo test -p connector-wasm-host
	bash wasm/host/run-unit-tests-in-wasm.sh
