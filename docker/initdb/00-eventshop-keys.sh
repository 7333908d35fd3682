#!/usr/bin/env bash
# Runs once, before 01-eventshop.sql, when the postgres container initialises
# an empty data directory: makes the auth module's keys inside the data
# directory (so they live in the pgdata volume) and points the settings at
# them with ALTER SYSTEM (postgresql.auto.conf, also in the volume).
#   eventshop.key_file              32-byte master secret, 64 hex characters
#   eventshop.seal_private_key_file X25519 private key, 64 hex characters
#   eventshop.seal_public_key       the matching public key, base64url
# For production, keep the key files outside the data directory and its
# backups, and set the three settings yourself.
set -euo pipefail
keys="$PGDATA/eventshop-keys"
umask 077
mkdir -p "$keys"
[ -s "$keys/master.key" ] || openssl rand -hex 32 > "$keys/master.key"
if [ ! -s "$keys/seal_private.key" ]; then
	openssl genpkey -algorithm X25519 -out "$keys/seal.pem"
	openssl pkey -in "$keys/seal.pem" -outform DER | tail -c 32 | od -An -v -tx1 | tr -d ' \n' > "$keys/seal_private.key"
	openssl pkey -in "$keys/seal.pem" -pubout -outform DER | tail -c 32 | openssl base64 -A | tr '+/' '-_' | tr -d '=' > "$keys/seal_public.b64url"
	rm -f "$keys/seal.pem"
fi
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
ALTER SYSTEM SET eventshop.key_file = '$keys/master.key';
ALTER SYSTEM SET eventshop.seal_private_key_file = '$keys/seal_private.key';
ALTER SYSTEM SET eventshop.seal_public_key = '$(cat "$keys/seal_public.b64url")';
SELECT pg_reload_conf();
SQL
