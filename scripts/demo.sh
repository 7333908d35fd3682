#!/usr/bin/env bash
# demo.sh: `make demo`. Installs what is missing, builds and installs
# eventshop, starts a throwaway PostgreSQL cluster with both workers, the dev
# Kafka broker and a local SMTP server, registers a user, and shows the
# CloudEvent as read back from Kafka and the welcome e-mail as received by
# the SMTP server. Everything it started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

es_install_dependencies
es_build_and_install

PGBIN=$(pg_config --bindir)
work=$(mktemp -d /tmp/eventshop-demo.XXXXXX)
chmod 755 "$work"
[ "$(id -u)" = 0 ] && chown "$(es_run_user)" "$work"
pids=()
cleanup() {
	set +e
	[ -f "$work/data/postmaster.pid" ] && es_as_run_user "$PGBIN/pg_ctl" -D "$work/data" -m fast -w stop >/dev/null
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
	rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT TERM

echo "==> starting the dev Kafka broker"
"${ES_RUN_AS[@]}" "$PGBIN/eventshop-devbroker" --bootstrap-file "$work/bootstrap" >/dev/null 2>"$work/devbroker.log" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/bootstrap" ] && break; sleep 0.1; done
[ -s "$work/bootstrap" ] || { echo "the dev broker did not start:"; cat "$work/devbroker.log"; exit 1; }
bootstrap=$(cat "$work/bootstrap")
echo "    bootstrap servers: $bootstrap"

smtp_port=$(es_free_port)
echo "==> starting a local SMTP server (aiosmtpd) on 127.0.0.1:$smtp_port"
"${ES_RUN_AS[@]}" /usr/bin/python3 -m aiosmtpd -n -l "127.0.0.1:$smtp_port" \
	-c aiosmtpd.handlers.Mailbox "$work/maildir" 2>"$work/smtp.log" &
pids+=($!)

pg_port=$(es_free_port)
echo "==> starting a throwaway PostgreSQL cluster on 127.0.0.1:$pg_port"
es_as_run_user "$PGBIN/initdb" -D "$work/data" -A trust -U postgres >/dev/null
cat >>"$work/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$work'
shared_preload_libraries = 'eventshop'
eventshop.database = 'postgres'
eventshop.kafka_brokers = '$bootstrap'
eventshop.smtp_url = 'smtp://127.0.0.1:$smtp_port'
eventshop.smtp_from = 'welcome@eventshop.test'
CONF
bash scripts/make_keys.sh "$work/keys" >>"$work/data/postgresql.conf"
[ "$(id -u)" = 0 ] && chown -R "$(es_run_user)" "$work/keys"
es_as_run_user "$PGBIN/pg_ctl" -D "$work/data" -l "$work/postgres.log" -w start >/dev/null
psql_do() { es_as_run_user "$PGBIN/psql" -h "$work" -p "$pg_port" -U postgres -d postgres -X -q -At "$@"; }

psql_do -c "CREATE EXTENSION eventshop"
echo "==> SELECT eventshop.register('alice@example.com', '<password>', 'Alice')"
user_id=$(psql_do -c "SELECT eventshop.register('alice@example.com', 'correct horse battery staple', 'Alice')")
echo "    user id: $user_id"

echo "==> waiting for the relay and the dispatcher"
status=""
for _ in $(seq 300); do
	status=$(psql_do -c "SELECT n.status FROM eventshop.notifications n JOIN eventshop.users u ON u.id = n.user_id WHERE u.id = '$user_id'")
	[ "$status" = sent ] || [ "$status" = dead ] && break
	sleep 0.1
done
psql_do -c "SELECT 'outbox backlog: ' || backlog FROM eventshop.outbox_status"
psql_do -c "SELECT 'notification: ' || template || ' to ' || recipient || ', ' || status || ' after ' || attempts || ' attempt(s)' FROM eventshop.notifications"

echo
echo "==> the CloudEvent, read back from Kafka topic auth.events with kcat"
kcat -b "$bootstrap" -t auth.events -C -e -o beginning -q \
	-f 'partition: %p  offset: %o\nkey: %k\nheaders: %h\nvalue: %s\n' |
	sed 's/^value: \(.*\)$/value:\n\1/' | {
	while IFS= read -r line; do
		case "$line" in
		'{'*) printf '%s\n' "$line" | /usr/bin/python3 -m json.tool ;;
		*) printf '%s\n' "$line" ;;
		esac
	done
}

echo
echo "==> the e-mail, as received by the SMTP server"
mail=$(ls "$work"/maildir/new/* 2>/dev/null | head -n 1 || true)
if [ -n "$mail" ]; then
	cat "$mail"
else
	echo "    no e-mail arrived (notification status: ${status:-none}); server log:"
	tail -n 20 "$work/postgres.log"
	exit 1
fi
echo
echo "==> done; stopping the cluster, the broker and the SMTP server"
