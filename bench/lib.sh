# bench/lib.sh: what the benchmarks share: a throwaway cluster with eventshop
# preloaded (workers off unless asked), its keys from scripts/make_keys.sh,
# run as user postgres when we are root, stopped and removed on exit; and
# pgbench/psql against it. Source it, then call bench_start_cluster.

bench_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$bench_root/scripts/common.sh"
BENCH_BIN=$(pg_config --bindir)

# Starts the cluster; extra postgresql.conf lines come as the argument.
# Sets BENCH_WORK and exports PGHOST, PGPORT and PGDATABASE.
bench_start_cluster() {
	local extra_conf=${1:-}
	BENCH_WORK=$(mktemp -d /tmp/eventshop-bench.XXXXXX)
	chmod 755 "$BENCH_WORK"
	trap bench_stop_cluster EXIT
	trap "exit 130" INT TERM
	export PGHOST=$BENCH_WORK PGPORT PGDATABASE=postgres
	PGPORT=$(es_free_port)
	bash "$bench_root/scripts/make_keys.sh" "$BENCH_WORK/keys" >"$BENCH_WORK/keys.conf"
	[ "$(id -u)" = 0 ] && chown -R "$(es_run_user)" "$BENCH_WORK"
	es_as_run_user "$BENCH_BIN/initdb" -D "$BENCH_WORK/data" -A trust -E UTF8 --locale=C.UTF-8 >/dev/null
	{
		cat "$BENCH_WORK/keys.conf"
		echo "listen_addresses = ''"
		echo "unix_socket_directories = '$BENCH_WORK'"
		echo "port = $PGPORT"
		echo "shared_preload_libraries = 'eventshop'"
		echo "eventshop.relay_enabled = off"
		echo "eventshop.dispatcher_enabled = off"
		echo "eventshop.sender_workers = 0"
		printf '%s\n' "$extra_conf"
	} >>"$BENCH_WORK/data/postgresql.conf"
	es_as_run_user "$BENCH_BIN/pg_ctl" -D "$BENCH_WORK/data" -l "$BENCH_WORK/server.log" -w start >/dev/null
	bench_psql -c "CREATE EXTENSION eventshop" >/dev/null
}

# Starts the dev Kafka broker (librdkafka's mock cluster on 127.0.0.1) and
# sets BENCH_BOOTSTRAP; bench_stop_cluster stops it. Call before
# bench_start_cluster so the cluster can name it in its settings.
bench_start_devbroker() {
	BENCH_BROKER_DIR=$(mktemp -d /tmp/eventshop-broker.XXXXXX)
	"$BENCH_BIN/eventshop-devbroker" --bootstrap-file "$BENCH_BROKER_DIR/bootstrap" \
		>"$BENCH_BROKER_DIR/broker.log" 2>&1 &
	BENCH_BROKER_PID=$!
	for _ in $(seq 100); do
		[ -s "$BENCH_BROKER_DIR/bootstrap" ] && break
		sleep 0.1
	done
	BENCH_BOOTSTRAP=$(cat "$BENCH_BROKER_DIR/bootstrap")
	trap bench_stop_cluster EXIT
}

# Stops the cluster (and the dev broker, if started) and removes their directories.
bench_stop_cluster() {
	if [ -n "${BENCH_BROKER_PID:-}" ]; then
		kill "$BENCH_BROKER_PID" 2>/dev/null || true
		wait "$BENCH_BROKER_PID" 2>/dev/null || true
		rm -rf "$BENCH_BROKER_DIR"
		BENCH_BROKER_PID=
	fi
	[ -n "${BENCH_WORK:-}" ] || return 0
	es_as_run_user "$BENCH_BIN/pg_ctl" -D "$BENCH_WORK/data" -m immediate stop >/dev/null 2>&1 || true
	rm -rf "$BENCH_WORK"
}

# psql against the cluster: unaligned, tuples only, stop on error.
bench_psql() {
	es_as_run_user env PGHOST="$PGHOST" PGPORT="$PGPORT" "$BENCH_BIN/psql" -d postgres -XAtq -v ON_ERROR_STOP=1 "$@"
}

# Runs pgbench with the given arguments; prints its tps, or the log and fails.
bench_pgbench() {
	local out tps
	out=$(es_as_run_user env PGHOST="$PGHOST" PGPORT="$PGPORT" "$BENCH_BIN/pgbench" "$@" postgres 2>&1) || true
	tps=$(printf '%s\n' "$out" | sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p')
	if [ -z "$tps" ] || printf '%s\n' "$out" | grep -q 'aborted'; then
		printf 'pgbench failed:\n%s\n' "$out" >&2
		return 1
	fi
	echo "$tps"
}
