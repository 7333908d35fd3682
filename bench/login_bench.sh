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

. "$(dirname "$0")/lib.sh"
bench_start_cluster "synchronous_commit = ${SYNC_COMMIT:-on}"
work=$BENCH_WORK
bench_psql -c "SELECT eventshop.rotate_signing_keys()" >/dev/null
bench_psql -c "SELECT eventshop.register('bench@example.com', 'bench passphrase one')" >/dev/null
mem_kib=$(bench_psql -c "SELECT setting FROM pg_settings WHERE name = 'eventshop.password_hash_memory'")
iters=$(bench_psql -c "SELECT setting FROM pg_settings WHERE name = 'eventshop.password_hash_iterations'")
cap=$(bench_psql -c "SELECT setting FROM pg_settings WHERE name = 'eventshop.max_concurrent_password_hashes'")

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
login_rate=$(bench_pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_RUN" -f "$work/login.sql")

hash_after=$("$work/argon2_rate" "$mem_kib" "$iters" "$CLIENTS" "$half")
hash_rate=$(awk -v a="$hash_before" -v b="$hash_after" 'BEGIN { printf "%.2f", (a + b) / 2 }')

echo "eventshop login benchmark ($(nproc) cores, $CLIENTS clients, ${SECONDS_RUN}s, argon2id m=${mem_kib} KiB t=${iters} p=1, hash cap ${cap}, synchronous_commit ${SYNC_COMMIT:-on})"
printf '  login through SQL (pgbench -M prepared):  %8.2f logins/s\n' "$login_rate"
printf '  bare argon2id hashes (libargon2, %s procs): %8.2f hashes/s  (%.2f before, %.2f after)\n' "$CLIENTS" "$hash_rate" "$hash_before" "$hash_after"
ratio=$(awk -v a="$login_rate" -v b="$hash_rate" 'BEGIN { printf "%.3f", a / b }')
verdict=$(awk -v r="$ratio" 'BEGIN { print (r >= 0.9) ? "meets" : "BELOW" }')
echo "  ratio login/hash: $ratio  ($verdict the 0.9 target)"
