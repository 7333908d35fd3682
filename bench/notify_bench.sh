#!/usr/bin/env bash
# notify_bench.sh: sustained e-mails per second into a local SMTP server,
# measured three ways in one run against the SAME server (bench/smtp_sink.c,
# a fast C sink that accepts and discards; aiosmtpd would be the bottleneck):
#
#   baseline:  bench/smtp_blast.c, a raw libcurl multi client sending MAILS
#              messages with WORKERS x CONCURRENCY transfers in flight
#              (run before and after the extension; the mean is the baseline)
#   senders:   MAILS notifications inserted in one transaction -> accepted by
#              the SMTP server (the sender pool alone: claim, send, record,
#              notification.sent events)
#   pipeline:  MAILS user.registered events written to the outbox in one
#              transaction -> relay -> Kafka (dev broker) -> dispatcher ->
#              notifications -> senders -> accepted by the SMTP server
#              (event to SMTP acceptance)
#
# Times run from the start of the inserting transaction to the SMTP
# server's acceptance of the last message. Every notification must end
# 'sent' with exactly one attempt and the sink must have accepted exactly
# MAILS messages per phase; otherwise the run fails. Targets: pipeline
# >= 1,000 mails/s and >= 0.7x the baseline.
#
#   bash bench/notify_bench.sh
#   MAILS=20000 WORKERS=2 CONCURRENCY=32 BATCH=500 bash bench/notify_bench.sh
#
# Needs eventshop installed (make install, which also installs the dev broker),
# a C compiler and libcurl's headers. As root, the cluster runs as postgres.
set -euo pipefail

MAILS=${MAILS:-20000}
WORKERS=${WORKERS:-2}
CONCURRENCY=${CONCURRENCY:-32}
BATCH=${BATCH:-500}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

tools=$(mktemp -d /tmp/eventshop-notify-bench.XXXXXX)
cc -O2 -Wall -Wextra -Werror -o "$tools/smtp_sink" "$here/smtp_sink.c"
cc -O2 -Wall -Wextra -Werror -o "$tools/smtp_blast" "$here/smtp_blast.c" $(pkg-config --cflags --libs libcurl)
sink_port=$(es_free_port)
"$tools/smtp_sink" "$sink_port" "$tools/sink.status" &
sink_pid=$!
# the dev broker keeps the last 5 MB of each partition: enough partitions that
# no event of the pipeline phase (~600 bytes each) is dropped before it is read
"$BENCH_BIN/eventshop-devbroker" --partitions $((MAILS / 4000 + 3)) --bootstrap-file "$tools/bootstrap" \
	>"$tools/devbroker.log" 2>&1 &
broker_pid=$!
cleanup() {
	bench_stop_cluster
	kill "$sink_pid" "$broker_pid" 2>/dev/null || true
	rm -rf "$tools"
}
for _ in $(seq 100); do [ -s "$tools/bootstrap" ] && break; sleep 0.1; done
[ -s "$tools/bootstrap" ] || { echo "the dev broker did not start" >&2; cleanup; exit 1; }

# The sink's count of accepted messages and the time of the last one.
sink_status() {
	local before
	before=$(stat -c %Y.%s "$tools/sink.status" 2>/dev/null || echo none)
	kill -USR1 "$sink_pid"
	for _ in $(seq 50); do
		sleep 0.05
		[ "$(stat -c %Y.%s "$tools/sink.status" 2>/dev/null || echo none)" != "$before" ] && break
	done
	cat "$tools/sink.status"
}
# Waits until the sink has accepted $1 messages in all; prints the time of the last.
wait_for_sink() {
	local target=$1 deadline=$((SECONDS + 600)) status
	while :; do
		status=$(sink_status)
		[ "${status%% *}" -ge "$target" ] && { echo "${status#* }"; return 0; }
		[ $SECONDS -lt $deadline ] || { echo "timed out at $status of $target" >&2; return 1; }
		sleep 0.2
	done
}
now() { date +%s.%N; }
# CPU ticks (1/100 s) used so far by each kind of process: sender workers,
# relay, dispatcher, other Postgres processes, the SMTP sink, the dev broker.
cpu_ticks() {
	local pid cmd kind stat postmaster
	declare -A sum=([senders]=0 [relay]=0 [dispatcher]=0 [postgres]=0 [sink]=0 [broker]=0)
	postmaster=$(head -1 "$BENCH_WORK/data/postmaster.pid")
	for pid in /proc/[0-9]*; do
		pid=${pid#/proc/}
		stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
		stat=${stat##*) }	# fields from the 3rd on; the command name may hold spaces
		set -- $stat
		if [ "$pid" = "$sink_pid" ]; then kind=sink
		elif [ "$pid" = "$broker_pid" ]; then kind=broker
		elif [ "$pid" = "$postmaster" ] || [ "$2" = "$postmaster" ]; then
			cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || continue
			case "$cmd" in
				*"eventshop sender"*) kind=senders ;;
				*"eventshop relay"*) kind=relay ;;
				*"eventshop dispatcher"*) kind=dispatcher ;;
				*) kind=postgres ;;
			esac
		else
			continue
		fi
		sum[$kind]=$((sum[$kind] + ${12} + ${13}))
	done
	echo "${sum[senders]} ${sum[relay]} ${sum[dispatcher]} ${sum[postgres]} ${sum[sink]} ${sum[broker]}"
}
# Prints CPU microseconds per mail by kind between two cpu_ticks snapshots.
cpu_per_mail() {
	awk -v a="$1" -v b="$2" -v n="$MAILS" 'BEGIN {
		split(a, x, " "); split(b, y, " ");
		split("senders relay dispatcher other-postgres smtp-sink dev-broker", k, " ");
		line = "    CPU us/mail:";
		for (i = 1; i <= 6; i++) line = line sprintf(" %s %.0f", k[i], (y[i] - x[i]) * 10000 / n);
		print line }'
}
rate() { awk -v n="$1" -v t0="$2" -v t1="$3" 'BEGIN { printf "%.0f", n / (t1 - t0) }'; }

bench_start_cluster "shared_buffers = 256MB
max_wal_size = 4GB
eventshop.relay_enabled = on
eventshop.dispatcher_enabled = on
eventshop.database = 'postgres'
eventshop.kafka_brokers = '$(cat "$tools/bootstrap")'
eventshop.smtp_url = 'smtp://127.0.0.1:$sink_port'
eventshop.smtp_tls = off
eventshop.smtp_from = 'eventshop@example.com'
eventshop.sender_workers = $WORKERS
eventshop.sender_concurrency = $CONCURRENCY
eventshop.sender_batch_size = $BATCH
eventshop.dispatcher_batch_size = 1000
eventshop.relay_batch_size = 5000"
trap cleanup EXIT
echo "==> $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); $MAILS mails per phase," \
	"$WORKERS sender workers x $CONCURRENCY transfers, batches of $BATCH"

echo "==> baseline (raw libcurl multi, $((WORKERS * CONCURRENCY)) in flight)"
base1=$("$tools/smtp_blast" "smtp://127.0.0.1:$sink_port" "$MAILS" $((WORKERS * CONCURRENCY)))
echo "    ${base1##* } mails/s"
accepted=$(sink_status); accepted=${accepted%% *}

echo "==> senders: $MAILS notifications queued in one transaction -> SMTP acceptance"
cpu0=$(cpu_ticks)
t0=$(now)
bench_psql -c "INSERT INTO eventshop.notifications (event_id, template, channel, recipient, subject, body_text)
	SELECT gen_random_uuid(), 'welcome', 'email', 'sender' || i || '@example.com', 'Welcome to eventshop, Sender ' || i,
	       E'Hello Sender ' || i || E',\n\nyour eventshop account for sender' || i || E'@example.com is ready.\n\nThe eventshop team\n'
	FROM generate_series(1, $MAILS) i"
t1=$(wait_for_sink $((accepted + MAILS)))
senders=$(rate "$MAILS" "$t0" "$t1")
echo "    $senders mails/s"
cpu_per_mail "$cpu0" "$(cpu_ticks)"
accepted=$((accepted + MAILS))

echo "==> pipeline: $MAILS user.registered events -> relay -> Kafka -> dispatcher -> senders -> SMTP acceptance"
bench_psql -c "INSERT INTO eventshop.users (id, email, display_name, password_hash)
	SELECT gen_random_uuid(), 'user' || i || '@example.com', 'User ' || i, 'not-a-hash' FROM generate_series(1, $MAILS) i"
cpu0=$(cpu_ticks)
t0=$(now)
bench_psql -c "SELECT count(eventshop._emit_event('auth.events', u.id::text, 'user.registered',
	jsonb_build_object('user_id', u.id))) FROM eventshop.users u" >/dev/null
t1=$(wait_for_sink $((accepted + MAILS)))
pipeline=$(rate "$MAILS" "$t0" "$t1")
echo "    $pipeline mails/s"
cpu_per_mail "$cpu0" "$(cpu_ticks)"
accepted=$((accepted + MAILS))

echo "==> baseline again"
base2=$("$tools/smtp_blast" "smtp://127.0.0.1:$sink_port" "$MAILS" $((WORKERS * CONCURRENCY)))
echo "    ${base2##* } mails/s"

# Correctness: every notification sent once, one attempt each, nothing more accepted.
sleep 1
check=$(bench_psql -c "SELECT count(*) FILTER (WHERE status = 'sent') || ' ' || count(*) || ' ' ||
	(SELECT count(*) FROM eventshop.notification_attempts) || ' ' || coalesce(sum(attempts), 0)
	FROM eventshop.notifications")
final=$(sink_status)
expected="$((2 * MAILS)) $((2 * MAILS)) $((2 * MAILS)) $((2 * MAILS))"
if [ "$check" != "$expected" ] || [ "${final%% *}" != "$((accepted + MAILS))" ]; then
	echo "correctness check failed: sent/total/attempt rows/attempts = $check (want $expected)," \
		"sink accepted ${final%% *} (want $((accepted + MAILS)))" >&2
	exit 1
fi
echo "==> checked: $((2 * MAILS)) notifications sent, one attempt each, each accepted once"

baseline=$(awk -v a="${base1##* }" -v b="${base2##* }" 'BEGIN { printf "%.0f", (a + b) / 2 }')
echo
printf '%-44s %8s mails/s\n' "baseline (raw libcurl multi, same server)" "$baseline"
printf '%-44s %8s mails/s  %.2fx baseline\n' "senders (notification -> SMTP acceptance)" "$senders" \
	"$(awk -v a="$senders" -v b="$baseline" 'BEGIN { print a / b }')"
printf '%-44s %8s mails/s  %.2fx baseline  (target >= 1000/s and >= 0.70x)\n' \
	"pipeline (event -> SMTP acceptance)" "$pipeline" "$(awk -v a="$pipeline" -v b="$baseline" 'BEGIN { print a / b }')"
