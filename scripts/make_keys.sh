#!/usr/bin/env bash
# make_keys.sh DIR: creates the secrets eventshop's auth module needs, as an
# operator would with openssl, and prints the postgresql.conf lines naming
# them: a 32-byte master key (HKDF-derives the key that seals JWT private
# keys and the PII hashing key) and the dispatcher's X25519 sealing pair.
# Used by `make demo`, `make installcheck` and the TAP tests.
set -euo pipefail
dir=$1
umask 077
mkdir -p "$dir"
openssl rand -hex 32 > "$dir/master.key"
openssl genpkey -algorithm X25519 -out "$dir/seal.pem" 2>/dev/null
openssl pkey -in "$dir/seal.pem" -outform DER | tail -c 32 | od -An -v -tx1 | tr -d ' \n' > "$dir/seal_private.key"
public=$(openssl pkey -in "$dir/seal.pem" -pubout -outform DER | tail -c 32 | openssl base64 -A | tr '+/' '-_' | tr -d '=')
rm -f "$dir/seal.pem"
echo "eventshop.key_file = '$dir/master.key'"
echo "eventshop.seal_private_key_file = '$dir/seal_private.key'"
echo "eventshop.seal_public_key = '$public'"
