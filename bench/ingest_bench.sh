#!/usr/bin/env bash
# ingest_bench.sh: the dispatcher's consumer side in events per second,
# beside a baseline measured on the same throwaway cluster in the same run.
#
#   consumer: what the dispatcher does for each batch of B consumed messages,
#             in one transaction: eventshop._ingest_event per message (inbox,
#             rules, recipient lookup, template rendering with escaping,
#             notification row, masked audit row), then
#             eventshop._store_consumer_offsets once for the batch
#   baseline: the bare minimum a consumer with an inbox does for the same
#             messages in the same batches: parse the JSON and insert the
#             inbox row (no rendering, no notification, no audit)
#
# The events are N order.created CloudEvents of one account (each makes one
# e-mail), made with eventshop._emit_event and read from the outbox (the
# relay is off). Kafka is not involved: this is the database work per event,
# which bounds how fast one dispatcher can consume. Each measurement runs
# twice on empty tables; the second run is printed.
#
#   bash bench/ingest_bench.sh                  # N = 20000, B = 100
#   EVENTS=50000 BATCH=200 bash bench/ingest_bench.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"

EVENTS=${EVENTS:-20000}
BATCH=${BATCH:-100}

bench_start_cluster
uid=$(bench_psql -c "SELECT eventshop.register('bench@example.com', 'correct horse battery staple', 'Bench <User>')")
bench_psql -c "TRUNCATE eventshop.outbox" >/dev/null
bench_psql -c "SELECT count(eventshop._emit_event('orders.events', o::text, 'order.created',
	jsonb_build_object('order_id', o, 'user_id', '$uid', 'status', 'reserved', 'currency', 'EUR',
					   'total_minor', 1234, 'item_count', 2, 'unit_count', 3, 'reserved_until', now())))
	FROM (SELECT gen_random_uuid() AS o FROM generate_series(1, $EVENTS)) s" >/dev/null

# Runs one batch loop (the body gets the batch's outbox rows as v_rows) and prints events/s.
run_batches() {
	local body=$1 start end
	bench_psql -c "TRUNCATE eventshop.inbox, eventshop.notifications, eventshop.event_audit,
		eventshop.consumer_offsets CASCADE" >/dev/null 2>&1
	start=$(date +%s.%N)
	bench_psql -c "DO \$\$
DECLARE
	v_first bigint := (SELECT min(id) FROM eventshop.outbox);
	v_last bigint := (SELECT max(id) FROM eventshop.outbox);
BEGIN
	FOR b IN 0 .. (v_last - v_first) / $BATCH LOOP
		$body
		COMMIT;
	END LOOP;
END
\$\$" >/dev/null
	end=$(date +%s.%N)
	awk -v n="$EVENTS" -v s="$start" -v e="$end" 'BEGIN { printf "%.0f\n", n / (e - s) }'
}

consumer_body="PERFORM eventshop._ingest_event(o.topic, (o.id % 3)::int, o.id, NULL, NULL, o.payload::text)
		FROM eventshop.outbox o WHERE o.id >= v_first + b * $BATCH AND o.id < v_first + (b + 1) * $BATCH ORDER BY o.id;
		PERFORM eventshop._store_consumer_offsets('bench', array_agg(o.topic), array_agg((o.id % 3)::int), array_agg(o.id + 1))
		FROM (SELECT DISTINCT ON (o.id % 3) o.topic, o.id FROM eventshop.outbox o
			  WHERE o.id >= v_first + b * $BATCH AND o.id < v_first + (b + 1) * $BATCH ORDER BY o.id % 3, o.id DESC) o;"
baseline_body="INSERT INTO eventshop.inbox (event_id, event_type, topic, partition, \"offset\")
		SELECT (p->>'id')::uuid, p->>'type', o.topic, (o.id % 3)::int, o.id
		FROM eventshop.outbox o, LATERAL (SELECT o.payload::text::jsonb AS p) j
		WHERE o.id >= v_first + b * $BATCH AND o.id < v_first + (b + 1) * $BATCH ON CONFLICT DO NOTHING;"

run_batches "$consumer_body" >/dev/null
consumer=$(run_batches "$consumer_body")
made=$(bench_psql -c "SELECT count(*) FROM eventshop.notifications")
[ "$made" = "$EVENTS" ] || { echo "expected $EVENTS notifications, found $made" >&2; exit 1; }
run_batches "$baseline_body" >/dev/null
baseline=$(run_batches "$baseline_body")

echo "events: $EVENTS, batch: $BATCH"
echo "consumer (ingest + render + audit + offsets): $consumer events/s"
echo "baseline (inbox row only):                    $baseline events/s"
awk -v c="$consumer" -v b="$baseline" 'BEGIN { printf "ratio: %.2fx the baseline\n", c / b }'
