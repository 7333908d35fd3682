#!/usr/bin/env bash
# orders_bench.sh: order placement per second through SQL beside pgbench's
# built-in TPC-B, measured on the same throwaway cluster in the same run, with
# the same clients, threads, duration and protocol (-M prepared), and the
# ratio of the two (target: orders >= 1.0x TPC-B).
#
#   TPC-B:  pgbench -i -s $SCALE, then pgbench -c C -j J -T T -M prepared
#   orders: bench/place_order.sql (pgbench -n -c C -j J -T T -M prepared): one
#           call of eventshop.place_order(access token, items) of 3 distinct
#           random products, quantity 1-3 each, as an application places an
#           order: the token verified exactly as eventshop.authenticate does,
#           the order placed, one round trip, one transaction; each pgbench
#           client holds the access token of its own user (logged in before
#           the run, token lifetime raised to a day so that no token expires
#           during it). SCRIPT=place_order_two_calls.sql measures the other
#           pattern instead: BEGIN, authenticate, place_order(items), END.
#
# Data of comparable size and shape: scale S gives TPC-B 100,000*S accounts
# and the shop 1,000*S products (10,000 at the default S = 10) with stock
# high enough that no run sells out, so orders rarely meet on one row,
# while TPC-B's S branches are its hot rows. Both data sets fit in
# shared_buffers (512MB). For each client count, after a VACUUM ANALYZE and
# a CHECKPOINT, TPC-B and the orders alternate in ROUNDS rounds (default 3)
# of DURATION/ROUNDS seconds, so that load elsewhere on a shared machine,
# which drifts, weighs on both alike (no checkpoint between rounds: each
# workload pays its full-page writes once, as in one run of DURATION); the
# figures printed are over all rounds (mean tps, latency and CPU per
# transaction weighted by transactions). Every order must have
# its order.created event in the outbox (the relay is off, so they stay
# there), one per pgbench transaction. The cluster is started
# once, with the same settings for both (synchronous_commit as default: on),
# and stopped at the end (bench/lib.sh; as root, the cluster and pgbench run
# as user postgres).
#
#   bash bench/orders_bench.sh                  # C = 2 and 8, J = 2, 30 s each (3 rounds), S = 10
#   SCRIPT=place_order_two_calls.sql bash bench/orders_bench.sh
#   CLIENTS="1 2 4 8" DURATION=60 ROUNDS=6 SCALE=10 JOBS=2 bash bench/orders_bench.sh
#   PROFILE=1 bash bench/orders_bench.sh        # then profile the order transaction
#
# Besides throughput it prints CPU microseconds per transaction of the whole
# cluster and of pgbench (the machine may be shared: other load lowers both
# rates, not the CPU a transaction costs). PROFILE=1 preloads
# pg_stat_statements (tracking off during the timed runs), then runs the
# order workload once more with pg_stat_statements.track = all and prints the
# cost of every statement per order transaction (nested ones included), and
# the statement durations of one transaction under auto_explain (ANALYZE).
#
# Needs eventshop installed (make install), pgbench, openssl; PROFILE=1 also
# pg_stat_statements (postgresql-contrib). Exits non-zero if any transaction
# failed or a run aborted.
set -euo pipefail

CLIENTS=${CLIENTS:-2 8}
DURATION=${DURATION:-30}
SCALE=${SCALE:-10}
JOBS=${JOBS:-2}
PRODUCTS=${PRODUCTS:-$((SCALE * 1000))}
PROFILE=${PROFILE:-0}
SCRIPT=${SCRIPT:-place_order.sql}
ROUNDS=${ROUNDS:-3}
max_clients=$(echo $CLIENTS | tr ' ' '\n' | sort -n | tail -1)
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

preload=eventshop
[ "$PROFILE" = 1 ] && preload=eventshop,pg_stat_statements
# Both workloads run on this one cluster with these settings; synchronous_commit
# stays at its default (on). Pre-issued access tokens must outlive the run.
bench_start_cluster "max_connections = $((max_clients + 20))
shared_buffers = 512MB
max_wal_size = 8GB
checkpoint_timeout = 30min
shared_preload_libraries = '$preload'
eventshop.access_token_ttl = 86400
pg_stat_statements.track = none"    # PROFILE=1 only: off during the timed runs
work=$BENCH_WORK
echo "==> cluster in $work (port $PGPORT), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
psql_() { bench_psql "$@"; }
pgbench_() { es_as_run_user env PGHOST="$PGHOST" PGPORT="$PGPORT" "$BENCH_BIN/pgbench" "$@"; }

echo "==> TPC-B data: pgbench -i -s $SCALE"
pgbench_ -i -q -s "$SCALE" postgres >"$work/init.log" 2>&1 || { cat "$work/init.log" >&2; exit 1; }

echo "==> shop data: $PRODUCTS products, $max_clients customers with one access token each"
psql_ -c 'SELECT eventshop.rotate_signing_keys()' >/dev/null
if [ "$(psql_ -c "SELECT to_regprocedure('eventshop.place_order(text, jsonb)') IS NULL")" = t ]; then
	echo "the installed eventshop has no eventshop.place_order(access_token, items): make install first" >&2
	exit 1
fi
psql_ -f - <<'SQL' >/dev/null
SELECT eventshop.register('bench-admin@example.com', 'bench admin passphrase');
UPDATE eventshop.users SET roles = '{customer,admin}' WHERE email = 'bench-admin@example.com';
SQL
admin_token=$(psql_ -c "SELECT access_token FROM eventshop.login('bench-admin@example.com', 'bench admin passphrase')")
psql_ -v products="$PRODUCTS" -v token="$admin_token" -f - <<'SQL' >/dev/null
BEGIN;
SELECT FROM eventshop.authenticate(:'token');
-- B0 .. B<N-1>: 20 categories, prices 1.00-9.99 EUR, a billion units each
SELECT count(*) FROM generate_series(0, :products - 1) g,
	LATERAL eventshop.create_product('B' || g, 'Bench product ' || g, 100 + g % 900, 'EUR',
		1000000000, 'category ' || g % 20, 'A product of the order benchmark') p;
COMMIT;
SQL
# The pgbench clients connect as an application role, as a gateway would.
psql_ -f - <<'SQL' >/dev/null
CREATE ROLE bench_app LOGIN IN ROLE eventshop_app;
CREATE TABLE bench_tokens (client_id integer PRIMARY KEY, access_token text NOT NULL);
GRANT SELECT ON bench_tokens TO bench_app;
SQL
for ((i = 0; i < max_clients; i++)); do
	psql_ -v i="$i" -f - <<'SQL' >/dev/null
SELECT eventshop.register('bench-' || :'i' || '@example.com', 'bench customer passphrase');
INSERT INTO bench_tokens
SELECT :'i', access_token FROM eventshop.login('bench-' || :'i' || '@example.com', 'bench customer passphrase');
SQL
done

# CPU seconds (in clock ticks) used so far by the cluster: the postmaster,
# every live child, and every child that exited (counted in the postmaster's
# cutime/cstime once reaped). The machine may be shared and busy, so besides
# throughput the runner reports CPU per transaction, which load elsewhere
# hardly changes.
cluster_cpu_ticks() {
	local pm total c
	pm=$(head -1 "$work/data/postmaster.pid")
	total=$(awk '{ print $14 + $15 + $16 + $17 }' "/proc/$pm/stat")
	for c in $(pgrep -P "$pm"); do
		total=$((total + $(awk '{ print $14 + $15 }' "/proc/$c/stat" 2>/dev/null || echo 0)))
	done
	echo "$total"
}

# Waits (at most 30 s) until the postmaster has no more children than before the run.
wait_for_backends_gone() {
	local pm=$1 want=$2 i
	for ((i = 0; i < 300; i++)); do
		[ "$(pgrep -c -P "$pm")" -le "$want" ] && return 0
		sleep 0.1
	done
}

# Runs pgbench with the given arguments; prints "tps latency_ms processed
# failed server_cpu_us_per_tx pgbench_cpu_us_per_tx".
run_pgbench() {
	local log=$work/pgbench.$RANDOM.log tps lat processed failed pm children cpu0 cpu1 hz
	pm=$(head -1 "$work/data/postmaster.pid")
	children=$(pgrep -c -P "$pm")
	hz=$(getconf CLK_TCK)
	cpu0=$(cluster_cpu_ticks)
	/usr/bin/time -f '%U %S' -o "$log.time" \
		"${ES_RUN_AS[@]}" env PGHOST="$PGHOST" PGPORT="$PGPORT" "$BENCH_BIN/pgbench" -M prepared "$@" postgres >"$log" 2>&1 || true
	wait_for_backends_gone "$pm" "$children"
	cpu1=$(cluster_cpu_ticks)
	tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$log")
	lat=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$log")
	processed=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$log")
	failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$log")
	if [ -z "$tps" ] || grep -q 'aborted' "$log" || [ "${failed:-0}" != 0 ]; then
		echo "pgbench failed:" >&2
		grep -v '^pgbench: client' "$log" | head -40 >&2
		return 1
	fi
	echo "$tps $lat $processed ${failed:-0}" \
		"$(awk -v t=$((cpu1 - cpu0)) -v hz="$hz" -v n="$processed" 'BEGIN { printf "%.0f", t / hz * 1e6 / n }')" \
		"$(awk -v n="$processed" '{ printf "%.0f", ($1 + $2) * 1e6 / n }' "$log.time")"
}

settle() {
	psql_ -c 'VACUUM ANALYZE' -c 'CHECKPOINT' >/dev/null
}

# Combines the result lines of several rounds (one per line) into one: mean
# tps (equal durations), and latency and CPU per transaction weighted by the
# transactions of each round.
combine() {
	awk '{ tps += $1; lat += $2 * $3; n += $3; f += $4; srv += $5 * $3; cli += $6 * $3; r++ }
		END { printf "%.1f %.3f %d %d %.0f %.0f\n", tps / r, lat / n, n, f, srv / n, cli / n }'
}

# TPC-B and orders alternate in ROUNDS rounds of DURATION/ROUNDS seconds
# each, so that load elsewhere on the machine, which drifts, weighs on both alike.
round_s=$((DURATION / ROUNDS))
declare -A tpcb orders
for c in $CLIENTS; do
	j=$((JOBS < c ? JOBS : c))
	t_rounds=""
	o_rounds=""
	settle
	for ((r = 1; r <= ROUNDS; r++)); do
		echo "==> round $r/$ROUNDS, TPC-B: pgbench -c $c -j $j -T $round_s -M prepared (scale $SCALE)"
		res=$(run_pgbench -c "$c" -j "$j" -T "$round_s")
		t_rounds+="$res"$'\n'
		echo "    ${res%% *} tps"
		echo "==> round $r/$ROUNDS, orders: pgbench -n -c $c -j $j -T $round_s -M prepared -f $SCRIPT ($PRODUCTS products)"
		before=$(psql_ -c "SELECT count(*) FROM eventshop.outbox WHERE event_type = 'order.created'")
		res=$(run_pgbench -n -U bench_app -c "$c" -j "$j" -T "$round_s" \
			-D nproducts="$PRODUCTS" -D tok_ready=0 -f "$here/$SCRIPT")
		after=$(psql_ -c "SELECT count(*) FROM eventshop.outbox WHERE event_type = 'order.created'")
		read -r _ _ processed _ <<<"$res"
		if [ $((after - before)) != "$processed" ]; then
			echo "$((after - before)) order.created events for $processed pgbench transactions" >&2
			exit 1
		fi
		o_rounds+="$res"$'\n'
		echo "    ${res%% *} tps ($((after - before)) orders placed)"
	done
	tpcb[$c]=$(printf '%s' "$t_rounds" | combine)
	orders[$c]=$(printf '%s' "$o_rounds" | combine)
done

echo
echo "Order placement vs TPC-B: same cluster, $(nproc) CPUs, scale $SCALE ($PRODUCTS products), -M prepared, ${DURATION}s each ($ROUNDS alternating rounds), synchronous_commit on"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine lowers both rates; CPU per transaction hardly changes)"
printf '%7s %7s | %9s %7s %8s %8s | %9s %7s %8s %8s | %6s %9s\n' clients threads \
	'TPC-B tps' 'lat ms' 'srv us' 'cli us' 'order tps' 'lat ms' 'srv us' 'cli us' ratio 'CPU ratio'
for c in $CLIENTS; do
	read -r t_tps t_lat _ _ t_srv t_cli <<<"${tpcb[$c]}"
	read -r o_tps o_lat _ _ o_srv o_cli <<<"${orders[$c]}"
	printf '%7s %7s | %9.0f %7.2f %8s %8s | %9.0f %7.2f %8s %8s | %6.2f %9.2f\n' "$c" $((JOBS < c ? JOBS : c)) \
		"$t_tps" "$t_lat" "$t_srv" "$t_cli" "$o_tps" "$o_lat" "$o_srv" "$o_cli" \
		"$(awk -v a="$o_tps" -v b="$t_tps" 'BEGIN { print (b > 0 ? a / b : 0) }')" \
		"$(awk -v a="$o_srv" -v b="$o_cli" -v c="$t_srv" -v d="$t_cli" 'BEGIN { print (a + b > 0 ? (c + d) / (a + b) : 0) }')"
done
echo "ratio = order tps / TPC-B tps (target >= 1.0). An order transaction ($SCRIPT): access token verified (RS256) + place_order of 3 items."
echo "srv us / cli us = CPU microseconds per transaction of the whole cluster (backends, background processes, autovacuum)"
echo "and of pgbench; CPU ratio = TPC-B CPU per transaction / order CPU per transaction (the ratio an idle, CPU-bound machine would approach)."

[ "$PROFILE" = 1 ] || exit 0

# Profile: where an order transaction's time goes, statement by statement
# (nested statements inside the functions included), then one transaction's
# plans with auto_explain (EXPLAIN ANALYZE of every nested statement).
c=$(echo $CLIENTS | cut -d' ' -f1)
echo
echo "==> profile: order workload again (-c $c, ${DURATION}s) with pg_stat_statements.track = all"
psql_ -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" -c "ALTER SYSTEM SET pg_stat_statements.track = 'all'" \
	-c "SELECT pg_reload_conf()" >/dev/null
sleep 1
psql_ -c 'SELECT pg_stat_statements_reset()' >/dev/null
profile=$(run_pgbench -n -U bench_app -c "$c" -j $((JOBS < c ? JOBS : c)) -T "$DURATION" \
	-D nproducts="$PRODUCTS" -D tok_ready=0 -f "$here/$SCRIPT")
read -r p_tps _ p_n _ <<<"$profile"
echo "    $p_tps tps with tracking on; per order transaction:"
es_as_run_user env PGHOST="$PGHOST" PGPORT="$PGPORT" "$BENCH_BIN/psql" -d postgres -X -q -v ON_ERROR_STOP=1 -v n="$p_n" -P pager=off -f - <<'SQL'
SELECT round(calls::numeric / :n, 2) AS per_tx,
       round((total_exec_time / :n * 1000)::numeric) AS us_per_tx,
       round((mean_exec_time * 1000)::numeric) AS mean_us,
       round((min_exec_time * 1000)::numeric) AS min_us,
       round(wal_bytes / :n) AS wal_bytes_per_tx,
       left(regexp_replace(query, '\s+', ' ', 'g'), 90) AS statement
FROM pg_stat_statements
WHERE calls >= :n / 2
ORDER BY total_exec_time DESC
LIMIT 25;
SQL
psql_ -c "ALTER SYSTEM SET pg_stat_statements.track = 'none'" -c "SELECT pg_reload_conf()" >/dev/null

echo "==> one order transaction under auto_explain (ANALYZE, BUFFERS, nested statements, triggers): durations"
log_offset=$(stat -c %s "$work/server.log")
token=$(psql_ -c 'SELECT access_token FROM bench_tokens WHERE client_id = 0')
{
	cat <<'SQL'
LOAD 'auto_explain';
SET auto_explain.log_min_duration = 0;
SET auto_explain.log_analyze = on;
SET auto_explain.log_buffers = on;
SET auto_explain.log_triggers = on;
SET auto_explain.log_nested_statements = on;
SET client_min_messages = warning;
SQL
	# ten transactions in one session; the last is reported (caches warm, generic plans chosen)
	for i in $(seq 1 10); do
		cat <<SQL
BEGIN;
SELECT 'profile-$i' AS marker;
SELECT user_id FROM eventshop.authenticate(:'token');
SELECT order_id FROM eventshop.place_order(jsonb_build_array(
	jsonb_build_object('sku', 'B$((i * 7))', 'quantity', 1),
	jsonb_build_object('sku', 'B$((i * 7 + 1))', 'quantity', 2),
	jsonb_build_object('sku', 'B$((i * 7 + 2))', 'quantity', 3)));
COMMIT;
SQL
	done
} | psql_ -v token="$token" -f - >/dev/null
tail -c +"$((log_offset + 1))" "$work/server.log" | awk '
	/profile-10/ { on = 1 }
	on && /LOG:  duration:/ { d = $0; sub(/.*duration: /, "", d); sub(/ ms.*/, "", d); getline q; sub(/^[ \t]*Query Text: /, "", q); printf "  %8s ms  %s\n", d, substr(q, 1, 110) }
	on && /Trigger for constraint|Trigger .*: time=/ { t = $0; sub(/^[ \t]*/, "", t); printf "  %8s     %s\n", "", t }'
