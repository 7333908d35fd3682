#!/usr/bin/env bash
# login_bench.sh: logins per second through SQL beside the bare argon2id hash
# rate, measured in the same run on the same machine.
#
#   SQL:      pgbench -M prepared -c 2 -j 2 -T 10 calling eventshop.login with
#             the right password (one argon2id verification, an RS256 access
#             token, a session, a refresh token and a user.logged_in event)
#   baseline: a tiny C program on libargon2 (the library the extension
#             uses) hashing with the same parameters (eventshop.password_hash_memory,
#             eventshop.password_hash_iterations, p=1) in 2 processes, half
#             of the time before the SQL run and half after, so that load
#             from elsewhere on the machine hits both measurements alike
#
# Prints both rates and their ratio (target >= 0.9). Starts a throwaway
# cluster with eventshop preloaded (as user postgres when run as root) and
# stops it again. Needs eventshop installed (make install), pgbench, cc and
# libargon2-dev. Usage: bash bench/login_bench.sh [seconds] [clients]
# (SYNC_COMMIT=off in the environment measures without waiting for WAL flushes)
set -euo pipefail
SECONDS_RUN=${1:-10}
CLIENTS=${2:-2}
PGBIN=$(pg_config --bindir)

work=$(mktemp -d /tmp/eventshop-login-bench.XXXXXX)
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$work"
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() {
	as_owner "$PGBIN/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
	rm -rf "$work"
}
trap cleanup EXIT

# Keys and cluster.
as_owner bash -c "umask 077 && mkdir $work/keys && openssl rand -hex 32 > $work/keys/master.key \
	&& openssl genpkey -algorithm X25519 -out $work/keys/seal.pem \
	&& openssl pkey -in $work/keys/seal.pem -outform DER | tail -c 32 | od -An -v -tx1 | tr -d ' \n' > $work/keys/seal_private.key"
seal_public=$(as_owner bash -c "openssl pkey -in $work/keys/seal.pem -pubout -outform DER | tail -c 32 | openssl base64 -A | tr '+/' '-_' | tr -d '='")
as_owner "$PGBIN/initdb" -D "$work/data" -A trust -E UTF8 --locale=C.UTF-8 >/dev/null
cat >> "$work/data/postgresql.conf" <<CONF
port = $port
listen_addresses = ''
unix_socket_directories = '$work'
shared_preload_libraries = 'eventshop'
eventshop.relay_enabled = off
eventshop.dispatcher_enabled = off
eventshop.key_file = '$work/keys/master.key'
eventshop.seal_private_key_file = '$work/keys/seal_private.key'
eventshop.seal_public_key = '$seal_public'
synchronous_commit = ${SYNC_COMMIT:-on}
CONF
as_owner "$PGBIN/pg_ctl" -D "$work/data" -l "$work/log" -w start >/dev/null
psql_() { as_owner "$PGBIN/psql" -h "$work" -p "$port" -d postgres -XAtq -v ON_ERROR_STOP=1 "$@"; }
psql_ -c "CREATE EXTENSION eventshop" -c "SELECT eventshop.rotate_signing_keys()" >/dev/null
psql_ -c "SELECT eventshop.register('bench@example.com', 'bench passphrase one')" >/dev/null
mem_kib=$(psql_ -c "SELECT setting FROM pg_settings WHERE name = 'eventshop.password_hash_memory'")
iters=$(psql_ -c "SELECT setting FROM pg_settings WHERE name = 'eventshop.password_hash_iterations'")
cap=$(psql_ -c "SELECT setting FROM pg_settings WHERE name = 'eventshop.max_concurrent_password_hashes'")

# Bare argon2id, same parameters, same number of processes.
cat > "$work/argon2_rate.c" <<'C'
#include <argon2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv)
{
	unsigned m = atoi(argv[1]), t = atoi(argv[2]); int procs = atoi(argv[3]); double secs = atof(argv[4]);
	int fds[64][2];
	(void) argc;
	for (int i = 0; i < procs; i++)
	{
		if (pipe(fds[i]) != 0) return 1;
		if (fork() == 0)
		{
			const char *pw = "bench passphrase one"; unsigned char salt[16] = "0123456789abcdef", out[32];
			long n = 0; double end = now() + secs;
			while (now() < end)
			{
				if (argon2id_hash_raw(t, m, 1, pw, strlen(pw), salt, 16, out, 32) != ARGON2_OK) return 1;
				n++;
			}
			if (write(fds[i][1], &n, sizeof n) != sizeof n) return 1;
			_exit(0);
		}
	}
	long total = 0;
	for (int i = 0; i < procs; i++) { long n; if (read(fds[i][0], &n, sizeof n) != sizeof n) return 1; total += n; wait(NULL); }
	printf("%.2f\n", total / secs);
	return 0;
}
C
cc -O2 -o "$work/argon2_rate" "$work/argon2_rate.c" -largon2
half=$(awk -v s="$SECONDS_RUN" 'BEGIN { print s / 2 }')
hash_before=$("$work/argon2_rate" "$mem_kib" "$iters" "$CLIENTS" "$half")

# Logins through SQL.
echo "SELECT * FROM eventshop.login('bench@example.com', 'bench passphrase one');" > "$work/login.sql"
[ "$(id -u)" = 0 ] && chown postgres "$work/login.sql"
pgbench_out=$(as_owner "$PGBIN/pgbench" -h "$work" -p "$port" -n -M prepared -c "$CLIENTS" -j "$CLIENTS" \
	-T "$SECONDS_RUN" -f "$work/login.sql" postgres 2>&1)
login_rate=$(echo "$pgbench_out" | sed -n 's/^tps = \([0-9.]*\) .*/\1/p')
failed=$(echo "$pgbench_out" | sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p')
if [ -z "$login_rate" ] || echo "$pgbench_out" | grep -q 'aborted'; then
	echo "pgbench failed:" >&2; echo "$pgbench_out" >&2; exit 1
fi

hash_after=$("$work/argon2_rate" "$mem_kib" "$iters" "$CLIENTS" "$half")
hash_rate=$(awk -v a="$hash_before" -v b="$hash_after" 'BEGIN { printf "%.2f", (a + b) / 2 }')

echo "eventshop login benchmark ($(nproc) cores, $CLIENTS clients, ${SECONDS_RUN}s, argon2id m=${mem_kib} KiB t=${iters} p=1, hash cap ${cap}, synchronous_commit ${SYNC_COMMIT:-on})"
printf '  login through SQL (pgbench -M prepared):  %8.2f logins/s  (failed: %s)\n' "$login_rate" "${failed:-0}"
printf '  bare argon2id hashes (libargon2, %s procs): %8.2f hashes/s  (%.2f before, %.2f after)\n' "$CLIENTS" "$hash_rate" "$hash_before" "$hash_after"
ratio=$(awk -v a="$login_rate" -v b="$hash_rate" 'BEGIN { printf "%.3f", a / b }')
verdict=$(awk -v r="$ratio" 'BEGIN { print (r >= 0.9) ? "meets" : "BELOW" }')
echo "  ratio login/hash: $ratio  ($verdict the 0.9 target)"
