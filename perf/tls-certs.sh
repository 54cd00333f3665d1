#!/usr/bin/env bash
# Throwaway certificates for the TLS measurements, made by openssl in DIR:
# a CA (ca.pem, ca.key), a "localhost" server certificate (server.pem,
# server.key) and a client certificate for mTLS (client.pem, client.key),
# all ECDSA P-256, valid for a day.
#
#   perf/tls-certs.sh DIR
set -euo pipefail
dir=$1
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=ca \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
# leaf NAME CN EXTENSION: a certificate signed by the CA. The extension also
# makes it X.509 v3, which webpki requires.
leaf() {
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$2" \
        -keyout "$dir/$1.key" -out "$dir/$1.csr" 2>/dev/null
    printf '%s\n' "$3" > "$dir/$1.ext"
    openssl x509 -req -in "$dir/$1.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial -days 1 \
        -extfile "$dir/$1.ext" -out "$dir/$1.pem" 2>/dev/null
}
leaf server localhost subjectAltName=DNS:localhost
leaf client bench extendedKeyUsage=clientAuth
