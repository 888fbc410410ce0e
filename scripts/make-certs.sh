#!/usr/bin/env bash
# Makes a throwaway CA and a serving certificate signed by it, for trying the proxy locally
# (never for production: the CA key sits next to the certificates, unencrypted).
#
#   bash scripts/make-certs.sh DIR [SAN...]
#
# SANs default to "127.0.0.1 localhost registry.d8-system.svc"; an IP becomes an IP SAN, anything
# else a DNS SAN. Writes DIR/ca.crt, DIR/ca.key, DIR/tls.crt (leaf, then nothing else),
# DIR/tls.key (EC P-256, PKCS#8) and DIR/trust/ca.crt (only the CA: a --cert-dir for skopeo and
# podman, which would read a tls.key there as half of a client certificate). Existing files are
# replaced. Needs openssl.
set -euo pipefail
DIR=${1:?usage: make-certs.sh DIR [SAN...]}
shift
(($#)) || set -- 127.0.0.1 localhost registry.d8-system.svc
command -v openssl >/dev/null || { echo "make-certs: openssl not found (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$DIR"
sans=()
for s in "$@"; do
    if [[ $s =~ ^[0-9.]+$ || $s == *:* ]]; then sans+=("IP:$s"); else sans+=("DNS:$s"); fi
done
san=$(IFS=,; echo "${sans[*]}")
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=registry-proxy local CA" -keyout "$DIR/ca.key" -out "$DIR/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
    -keyout "$DIR/tls.key" -out "$DIR/tls.csr" 2>/dev/null
openssl x509 -req -in "$DIR/tls.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" -CAcreateserial -days 30 \
    -out "$DIR/tls.crt" -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$san") 2>/dev/null
rm -f "$DIR/tls.csr" "$DIR/ca.srl"
mkdir -p "$DIR/trust"
cp "$DIR/ca.crt" "$DIR/trust/ca.crt"
chmod 0755 "$DIR" "$DIR/trust"
chmod 0644 "$DIR/ca.crt" "$DIR/tls.crt" "$DIR/trust/ca.crt"
openssl verify -CAfile "$DIR/ca.crt" "$DIR/tls.crt" >/dev/null
echo "make-certs: $DIR/{ca.crt,tls.crt,tls.key} for $san"
