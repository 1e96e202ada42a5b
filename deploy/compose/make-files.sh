#!/usr/bin/env bash
# Writes what docker-compose.yml mounts from deploy/compose/local (gitignored), for a Docker user:
# the proxy listener's TLS certificate for localhost and the registry's for `registry` (both from
# a demo CA of its own: clients trust local/tls/ca.crt, and so do Envoy and the controller for
# the upstream, `--upstream-ca`) and identity.json (deploy/compose/identity.json: the test key's JWKS; replace
# it with your cluster's). `make compose-demo` writes the same files elsewhere on its own.
set -euo pipefail
d="$(cd "$(dirname "$0")" && pwd)/local"
mkdir -p "$d/tls"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=oci-connector demo CA" \
  -keyout "$d/tls/ca.key" -out "$d/tls/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout "$d/tls/tls.key" -out "$d/tls/tls.csr" 2>/dev/null
openssl x509 -req -in "$d/tls/tls.csr" -CA "$d/tls/ca.crt" -CAkey "$d/tls/ca.key" -CAcreateserial -days 30 \
  -extfile <(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n') \
  -out "$d/tls/tls.crt" 2>/dev/null
# The registry's certificate: `registry` inside the compose network, localhost from the host.
openssl req -newkey rsa:2048 -nodes -subj /CN=registry -keyout "$d/tls/registry.key" -out "$d/tls/registry.csr" 2>/dev/null
openssl x509 -req -in "$d/tls/registry.csr" -CA "$d/tls/ca.crt" -CAkey "$d/tls/ca.key" -CAcreateserial -days 30 \
  -extfile <(printf 'subjectAltName=DNS:registry,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n') \
  -out "$d/tls/registry.crt" 2>/dev/null
rm -f "$d/tls/ca.key" "$d/tls/tls.csr" "$d/tls/registry.csr" "$d/tls/ca.srl"
# The controller's and the registry's images run as non-root users: demo keys they must read.
chmod 0644 "$d/tls/tls.key" "$d/tls/registry.key"
cp "$(dirname "$0")/identity.json" "$d/identity.json"
echo "wrote $d (trust $d/tls/ca.crt)"
