#!/usr/bin/env bash
# Development PKI and broker credentials for markerless + mosquitto. NOT for production.
#
# Usage: mosquitto/make-dev-certs.sh [OUT_DIR] [EXTRA_SERVER_NAME ...]
#   OUT_DIR defaults to mosquitto/dev (git-ignored: the folder gets its own .gitignore).
# Writes:
#   ca.crt ca.key                 a throw-away CA
#   server.crt server.key         broker certificate for localhost, 127.0.0.1, mosquitto (+ extra names)
#   <user>.crt <user>.key         client certificates (for brokers that require them)
#   <user>.password               one random password per user (mount as a secret)
#   passwd                        mosquitto password file (hashed) for the users below
# Users (see mosquitto/acl): markerless (the service), camera (publishes frames only),
# scenescape (SceneScape UI / manager / operators).
set -euo pipefail

out="${1:-$(cd "$(dirname "$0")" && pwd)/dev}"
shift || true
users=(markerless camera scenescape)
mkdir -p "$out"
cd "$out"
printf '*\n' > .gitignore

openssl_quiet() { openssl "$@" 2>/dev/null; }

openssl_quiet req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
  -keyout ca.key -out ca.crt -subj "/CN=markerless development CA"

sign() {  # name, subject CN, extension text
  openssl_quiet req -newkey rsa:2048 -nodes -sha256 -keyout "$1.key" -out "$1.csr" -subj "/CN=$2"
  printf '%b' "$3" > "$1.ext"
  openssl_quiet x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 825 \
    -out "$1.crt" -extfile "$1.ext"
  rm -f "$1.csr" "$1.ext"
}

san="DNS:localhost,IP:127.0.0.1,DNS:mosquitto,DNS:broker"
for name in "$@"; do san="$san,DNS:$name"; done
sign server localhost "subjectAltName=$san\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
for user in "${users[@]}"; do
  sign "$user" "$user" "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"
done
rm -f ca.srl

passwd_tool() {
  if command -v mosquitto_passwd >/dev/null 2>&1; then
    mosquitto_passwd "$@"
  else  # no local mosquitto: use the broker image's tool on the same folder
    docker run --rm -u "$(id -u):$(id -g)" -v "$out:/work" -w /work eclipse-mosquitto:2 mosquitto_passwd "$@"
  fi
}

rm -f passwd
touch passwd
for user in "${users[@]}"; do
  openssl rand -hex 24 > "$user.password"
  passwd_tool -b passwd "$user" "$(cat "$user.password")"
done

# The broker container runs as uid 1883 and must read its key and the password file; this is a dev setup.
chmod 644 server.key passwd
chmod 600 ca.key ./*.password
echo "wrote development CA, certificates and passwords to $out" >&2
