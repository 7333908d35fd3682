#!/bin/bash
# bench/relay_bench.sh: how fast the relay drains a backlog, against
# librdkafka's raw producer rate to the same broker, and its commit-to-ack
# latency at a steady rate.
#
#	bash bench/relay_bench.sh [EVENTS] [RATE] [SECONDS]
#
# 1. Baseline: bench/raw_producer (built here) sends EVENTS messages shaped
#    like outbox events to the dev broker with the relay's producer settings.
# 2. Drain: EVENTS realistic CloudEvents rows (10,000 keys, five event
#    types, ~450-byte values) are written to the outbox in one transaction;
#    the clock runs from its commit until the relay has had every one
#    acknowledged by the broker.
# 3. Latency: pgbench writes RATE events/s for SECONDS seconds, one per
#    transaction; the relay's histogram gives commit-to-acknowledgement p50/p99.
# Everything runs on this machine: broker, Postgres, relay and clients share the cores.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

events=${1:-1000000}
rate=${2:-1000}
seconds=${3:-20}

work=$(mktemp -d /tmp/eventshop-relay-bench.XXXXXX)
cc -O2 -Wall -Wextra -Werror -o "$work/raw_producer" "$here/raw_producer.c" $(pkg-config --cflags --libs rdkafka)

bench_start_devbroker
bench_start_cluster "eventshop.relay_enabled = on
eventshop.database = 'postgres'
eventshop.kafka_brokers = '$BENCH_BOOTSTRAP'
shared_buffers = '1GB'
max_wal_size = '4GB'"
trap 'bench_stop_cluster; rm -rf "$work"' EXIT

acknowledged() { bench_psql -c "SELECT acknowledged FROM eventshop._relay_stats()"; }
now() { date +%s.%N; }

echo "== baseline: librdkafka raw producer, $events messages"
raw=$("$work/raw_producer" "$BENCH_BOOTSTRAP" bench.raw "$events" 450)
echo "raw producer: $raw msg/s"

echo "== drain: $events events written in one transaction, relay running"
before=$(acknowledged)
committed_at=$(bench_psql <<SQL
BEGIN;
INSERT INTO eventshop.outbox (topic, message_key, event_id, event_type, payload)
SELECT 'orders.events', k.key, e.id, t.type,
	   json_build_object('specversion', '1.0', 'id', e.id, 'source', '/eventshop/orders', 'type', t.type,
						 'time', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
						 'subject', k.key, 'datacontenttype', 'application/json',
						 'data', json_build_object('order_id', k.key, 'user_id', md5(i::text)::uuid,
												   'total_minor', i % 100000, 'currency', 'EUR',
												   'items', json_build_array(json_build_object('sku', 'SKU-' || i % 977,
																							   'quantity', 1 + i % 3,
																							   'unit_price_minor', 100 + i % 5000))))
FROM (SELECT i, gen_random_uuid() AS id FROM generate_series(1, $events) AS i) e,
	 LATERAL (SELECT md5((i % 10000)::text)::uuid::text AS key) k,
	 LATERAL (SELECT (ARRAY['order.created', 'order.reserved', 'order.completed',
							'order.cancelled', 'order.expired'])[1 + i % 5] AS type) t;
COMMIT;
SELECT extract(epoch FROM clock_timestamp());
SQL
)
value_bytes=$(bench_psql -c "SELECT avg(octet_length(payload::text))::int FROM eventshop.outbox")
while [ "$(acknowledged)" -lt $((before + events)) ]; do sleep 0.02; done
done_at=$(date +%s.%N)
drain=$(echo "$events / ($done_at - $committed_at)" | bc -l)
printf 'relay drain: %.0f events/s (average value %s bytes)\n' "$drain" "$value_bytes"
printf 'ratio relay/raw producer: %.2f\n' "$(echo "$drain / $raw" | bc -l)"

echo "== latency: $rate events/s for $seconds s, one event per transaction"
cat >"$work/emit.sql" <<'SQL'
\set k random(1, 10000)
SELECT eventshop._emit_event('orders.events', 'order-' || :k, 'order.created', '{"total_minor": 4200, "currency": "EUR"}');
SQL
chmod 644 "$work/emit.sql"; chmod 755 "$work"
bench_psql -c "SELECT eventshop.reset_relay_latency()" >/dev/null
bench_pgbench -n -f "$work/emit.sql" -c 4 -j 2 -R "$rate" -T "$seconds" >/dev/null
sleep 1
bench_psql -F ' ' -c "SELECT 'relay commit->ack latency: p50 ' || ack_latency_p50_ms || ' ms, p99 ' || ack_latency_p99_ms || ' ms' FROM eventshop.outbox_status"
read -r raw_p50 raw_p99 < <("$work/raw_producer" "$BENCH_BOOTSTRAP" bench.raw $((rate * seconds)) 450 "$rate")
echo "raw producer produce->ack latency at the same rate: p50 $raw_p50 ms, p99 $raw_p99 ms (the broker's share)"
bench_psql -F ' ' -c "SELECT 'backlog after the run: ' || backlog || ', parked: ' || parked || ', delivery errors: ' || delivery_errors FROM eventshop.outbox_status"
