-- 30_outbox_and_inbox: the internal functions the workers call, driven by
-- hand because both workers are disabled in regress.conf. The outbox side:
-- _emit_event and outbox_status. The dispatcher side: _ingest_event (inbox,
-- offsets, rejected messages), _claim_notifications and _record_delivery
-- (lease, retry with backoff, dead letters, attempt log). Everything runs as
-- the superuser, as the workers do. Drops the regress_ roles at the end.
\set VERBOSITY terse
\set ON_ERROR_STOP 0
\pset format unaligned
\pset tuples_only on

SELECT plan(168);

-- ---------------------------------------------------------------------------
-- _emit_event
-- ---------------------------------------------------------------------------
SELECT eventshop._emit_event('orders.events', 'order-42', 'order.created',
                             '{"order_id": "order-42", "total": 12.50, "items": [1, 2]}') AS ev_id \gset
CREATE TEMP VIEW ev AS SELECT * FROM eventshop.outbox WHERE event_id = :'ev_id';

SELECT is((SELECT count(*) FROM ev), 1::bigint, '_emit_event writes one outbox row and returns its event id');
SELECT is((SELECT topic FROM ev), 'orders.events', 'topic as given');
SELECT is((SELECT message_key FROM ev), 'order-42', 'message key as given');
SELECT is((SELECT event_type FROM ev), 'order.created', 'event type as given');
SELECT is((SELECT array_agg(k ORDER BY k COLLATE "C") FROM ev, json_object_keys(payload) AS k),
          ARRAY['data', 'datacontenttype', 'id', 'source', 'specversion', 'subject', 'time', 'type'],
          'the payload has exactly the CloudEvents attributes');
SELECT is((SELECT payload->>'specversion' FROM ev), '1.0', 'specversion is 1.0');
SELECT is((SELECT payload->>'id' FROM ev), :'ev_id', 'id is the returned event id');
SELECT is((SELECT payload->>'source' FROM ev), '/eventshop/orders', 'source is derived from the topic');
SELECT is((SELECT payload->>'type' FROM ev), 'order.created', 'type is the event type');
SELECT is((SELECT payload->>'subject' FROM ev), 'order-42', 'subject is the message key');
SELECT is((SELECT payload->>'datacontenttype' FROM ev), 'application/json', 'datacontenttype is application/json');
SELECT ok((SELECT payload->>'time' ~ '^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$' FROM ev),
          'time is an RFC 3339 UTC timestamp with microseconds');
SELECT ok((SELECT abs(extract(epoch FROM (payload->>'time')::timestamptz - created_at)) < 60 FROM ev),
          'time is the moment the event was written, whatever the session time zone');
SELECT is((SELECT (payload->'data')::jsonb FROM ev),
          '{"order_id": "order-42", "total": 12.50, "items": [1, 2]}'::jsonb,
          'data is the document passed in');
SELECT is((SELECT count(DISTINCT event_id) FROM eventshop.outbox), (SELECT count(*) FROM eventshop.outbox),
          'every event in the outbox has its own id');
SELECT ok((SELECT bool_and(payload->>'id' = event_id::text) FROM eventshop.outbox),
          'every payload id matches its event_id column');

SELECT throws_ok($$SELECT eventshop._emit_event('unknown.events', 'k', 'x.y', '{}')$$, '23514',
                 'unknown event topic "unknown.events"',
                 'an unknown topic is refused');
SELECT throws_ok($$SELECT eventshop._emit_event('Auth.Events', 'k', 'x.y', '{}')$$, '23514',
                 'unknown event topic "Auth.Events"',
                 'topics are case-sensitive');
SELECT throws_ok($$SELECT eventshop._emit_event('auth.events', '', 'x.y', '{}')$$, '23514',
                 'an event message key must be 1 to 512 bytes long',
                 'an empty message key is refused');
SELECT throws_ok($$SELECT eventshop._emit_event('auth.events', repeat('k', 513), 'x.y', '{}')$$, '23514',
                 'an event message key must be 1 to 512 bytes long',
                 'a message key over 512 bytes is refused');
SELECT throws_ok($$SELECT eventshop._emit_event('auth.events', NULL, 'x.y', '{}')$$, '23502',
                 'an event needs a message key',
                 'a NULL message key is refused');
SELECT throws_ok($$SELECT eventshop._emit_event('auth.events', 'k', NULL, '{}')$$, '23502',
                 'an event needs a type',
                 'a NULL event type is refused');
-- the table keeps the same rules for a row written without _emit_event
SELECT throws_ok($$INSERT INTO eventshop.outbox (topic, message_key, event_id, event_type, payload)
                   VALUES ('nope.events', 'k', gen_random_uuid(), 'x.y', '{}')$$, '23514',
                 'new row for relation "outbox_0" violates check constraint "outbox_topic_check"',
                 'the outbox itself refuses an unknown topic');
SELECT throws_ok($$INSERT INTO eventshop.outbox (topic, message_key, event_id, event_type, payload)
                   VALUES ('auth.events', '', gen_random_uuid(), 'x.y', '{}')$$, '23514',
                 'new row for relation "outbox_0" violates check constraint "outbox_message_key_check"',
                 'the outbox itself refuses an empty message key');
SELECT throws_ok($$INSERT INTO eventshop.outbox (topic, message_key, event_id, event_type, payload)
                   VALUES ('auth.events', repeat('k', 513), gen_random_uuid(), 'x.y', '{}')$$, '23514',
                 'new row for relation "outbox_0" violates check constraint "outbox_message_key_check"',
                 'the outbox itself refuses a message key over 512 bytes');

-- _emit_events: a batch of one topic, in array order, checked as one by one
SELECT is(eventshop._emit_events('notifications.events', ARRAY['batch-1', 'batch-2'],
                                 ARRAY['notification.sent', 'notification.failed'],
                                 ARRAY['{"n": 1}', '{"n": 2}']::jsonb[]), 2, '_emit_events writes a batch');
SELECT results_eq($$SELECT message_key, event_type, payload->>'subject', payload->>'source', (payload->'data')::jsonb,
                           payload->>'id' = event_id::text
                    FROM eventshop.outbox WHERE message_key LIKE 'batch-%' ORDER BY id$$,
                  $$VALUES ('batch-1', 'notification.sent', 'batch-1', '/eventshop/notifications', '{"n": 1}'::jsonb, true),
                           ('batch-2', 'notification.failed', 'batch-2', '/eventshop/notifications', '{"n": 2}'::jsonb, true)$$,
                  'in array order, each a CloudEvent as _emit_event writes it');
SELECT is(eventshop._emit_events('auth.events', '{}', '{}', '{}'), 0, 'an empty batch writes nothing');
SELECT throws_ok($$SELECT eventshop._emit_events('auth.events', ARRAY['ok', NULL], ARRAY['x.y', 'x.y'],
                   ARRAY['{}', '{}']::jsonb[])$$, '23502', 'an event needs a message key',
                 'a batch with a NULL key is refused');
SELECT throws_ok($$SELECT eventshop._emit_events('auth.events', ARRAY['a', 'b'], ARRAY['x.y'], ARRAY['{}', '{}']::jsonb[])$$,
                 '2202E', NULL, 'arrays of different lengths are refused');
SELECT throws_ok($$SELECT eventshop._emit_events('nope.events', ARRAY['a'], ARRAY['x.y'], ARRAY['{}']::jsonb[])$$,
                 '23514', 'unknown event topic "nope.events"', 'an unknown topic is refused');
SELECT is((SELECT count(*) FROM eventshop.outbox WHERE message_key IN ('ok', 'a', 'b')), 0::bigint,
          'a refused batch writes none of its events');

-- ---------------------------------------------------------------------------
-- outbox_status, and the outbox following its transaction
-- ---------------------------------------------------------------------------
SELECT is((SELECT backlog FROM eventshop.outbox_status), (SELECT count(*) FROM eventshop.outbox),
          'outbox_status.backlog counts the events not yet published');
SELECT ok((SELECT oldest_unpublished_age >= interval '0' FROM eventshop.outbox_status),
          'oldest_unpublished_age is the age of the oldest unpublished event');
SELECT is((SELECT parked FROM eventshop.outbox_status), 0::bigint, 'nothing is parked');
SELECT is((SELECT broker_state FROM eventshop.outbox_status), 'unknown',
          'the broker state is unknown while the relay is off');
SELECT is((SELECT ack_latency_p99_ms FROM eventshop.outbox_status), NULL,
          'no latency without acknowledgements');
BEGIN;
SELECT eventshop._emit_event('orders.events', 'order-42', 'order.updated', '{}') AS ev_tx \gset
SELECT is((SELECT txid FROM eventshop.outbox WHERE event_id = :'ev_tx'), pg_current_xact_id(),
          'an outbox row records the id of the transaction that wrote it');
COMMIT;
SELECT ok((SELECT bool_and(tableoid = format('eventshop.outbox_%s', (id / 1048576) % 8)::regclass)
           FROM eventshop.outbox),
          'rows land in the ring slot of their id');

-- The relay's checkpoint decides what counts as published: play the relay
-- and declare everything written so far published.
SELECT max(id) AS published_id FROM eventshop.outbox \gset
UPDATE eventshop.relay_progress
SET prev_snapshot = pg_current_snapshot(), prev_id_bound = :published_id,
    prev_next_xid = pg_snapshot_xmax(pg_current_snapshot()), published_below = :published_id;
SELECT is((SELECT backlog FROM eventshop.outbox_status), 0::bigint,
          'rows visible in the relay''s snapshot are published');
SELECT eventshop._emit_event('orders.events', 'order-43', 'order.created', '{}') AS ev2_id \gset
SELECT is((SELECT backlog FROM eventshop.outbox_status), 1::bigint,
          'a row written later is not (and the view sees this transaction''s own rows)');

-- purge_published_events
SELECT throws_ok($$SELECT eventshop.purge_published_events(interval '-1 second')$$, '22023',
                 'retention must be a non-negative interval', 'a negative retention is refused');
SELECT throws_ok($$SELECT eventshop.purge_published_events(NULL)$$, '22023',
                 'retention must be a non-negative interval', 'a NULL retention is refused');
SELECT is(eventshop.purge_published_events(interval '1 hour'), 0::bigint,
          'a retention keeps published rows younger than it');
SELECT count(*) AS purgeable FROM eventshop.outbox WHERE id <= :published_id \gset
SELECT is(eventshop.purge_published_events(), :purgeable::bigint,
          'without retention every published row is removed');
SELECT is((SELECT array_agg(event_id) FROM eventshop.outbox), ARRAY[:'ev2_id'::uuid],
          'and only the unpublished event is left');

-- Parked (poison) events: what the relay does when Kafka refuses one for good
INSERT INTO eventshop.outbox_parked (id, topic, message_key, event_id, event_type, payload, created_at, error)
SELECT id, topic, message_key, event_id, event_type, payload, created_at, 'Broker: Message size too large'
FROM eventshop.outbox WHERE event_id = :'ev2_id';
SELECT is((SELECT array_agg(event_id::text || ' ' || topic || ': ' || error) FROM eventshop.parked_events),
          ARRAY[:'ev2_id' || ' orders.events: Broker: Message size too large'],
          'parked_events shows the parked event with its error');
SELECT is((SELECT parked FROM eventshop.outbox_status), 1::bigint, 'outbox_status counts it');
SELECT throws_ok($$SELECT eventshop.retry_parked_event(NULL)$$, '22004',
                 'the parked event id must not be NULL', 'retry needs an id');
SELECT throws_ok($$SELECT eventshop.retry_parked_event(-1)$$, 'P0002',
                 'there is no parked event -1', 'retrying an unknown parked event is an error');
SELECT throws_ok($$SELECT eventshop.discard_parked_event(-1)$$, 'P0002',
                 'there is no parked event -1', 'discarding an unknown parked event is an error');
SELECT throws_ok($$SELECT eventshop.discard_parked_event(NULL)$$, '22004',
                 'the parked event id must not be NULL', 'discard needs an id');
SELECT id AS parked_id FROM eventshop.outbox_parked \gset
SELECT is(eventshop.retry_parked_event(:parked_id), :'ev2_id'::uuid, 'retry returns the event id');
SELECT is((SELECT count(*) FROM eventshop.outbox WHERE event_id = :'ev2_id' AND id > :parked_id), 1::bigint,
          'the event is queued again under a new row id, with the same CloudEvents id');
SELECT is((SELECT count(*) FROM eventshop.outbox_parked), 0::bigint, 'and is no longer parked');
INSERT INTO eventshop.outbox_parked (id, topic, message_key, event_id, event_type, payload, created_at, error)
VALUES (-5, 'auth.events', 'k', gen_random_uuid(), 'x.y', '{}', now(), 'Broker: Topic authorization failed');
SELECT lives_ok($$SELECT eventshop.discard_parked_event(-5)$$, 'an administrator can discard a parked event');
SELECT is((SELECT count(*) FROM eventshop.outbox_parked), 0::bigint, 'which is then gone');
SELECT is(eventshop.retry_parked_events(), 0, 'retrying all with nothing parked does nothing');

SELECT count(*) AS outbox_before FROM eventshop.outbox \gset
SELECT count(*) AS users_before FROM eventshop.users \gset
BEGIN;
SELECT eventshop._emit_event('auth.events', 'rolled-back', 'x.y', '{}') IS NOT NULL AS emitted;
SELECT eventshop.register('rolled.back@example.com', 'correct horse battery staple') IS NOT NULL AS registered;
ROLLBACK;
SELECT is((SELECT backlog FROM eventshop.outbox_status), :outbox_before::bigint,
          'events of a rolled-back transaction never reach the outbox');
SELECT is((SELECT count(*) FROM eventshop.users), :users_before::bigint,
          'and neither do their accounts');

-- ---------------------------------------------------------------------------
-- _ingest_event: a user.registered event queues the welcome e-mail, once
-- ---------------------------------------------------------------------------
-- The dispatcher ingests a batch message by message, then stores the batch's
-- offsets once per partition in the same transaction; a batch of one here.
CREATE FUNCTION pg_temp.ingest(group_id text, topic text, part integer, off bigint,
							   event_id text, event_type text, payload text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	v_status text := eventshop._ingest_event(topic, part, off, event_id, event_type, payload);
BEGIN
	PERFORM eventshop._store_consumer_offsets(group_id, ARRAY[topic], ARRAY[part], ARRAY[off + 1]);
	RETURN v_status;
END
$$;
SELECT eventshop.register('Ingest.One@Example.com', 'correct horse battery staple', 'Ingrid One') AS u1 \gset
SELECT event_id AS u1_event, payload AS u1_payload FROM eventshop.outbox WHERE message_key = :'u1' \gset

SELECT is(pg_temp.ingest('regress-group', 'auth.events', 0, 10, NULL, NULL, :'u1_payload'), 'queued',
          'a user.registered event is queued');
CREATE TEMP VIEW n1 AS SELECT * FROM eventshop.notifications WHERE event_id = :'u1_event';
SELECT is((SELECT count(*) FROM n1), 1::bigint, 'it produced one notification');
SELECT is((SELECT recipient FROM n1), 'ingest.one@example.com',
          'the recipient is the account''s real address, not the masked one from the event');
SELECT is((SELECT user_id::text FROM n1), :'u1', 'the notification belongs to the account');
SELECT is((SELECT template FROM n1), 'welcome', 'from the welcome template');
SELECT is((SELECT channel FROM n1), 'email', 'by e-mail');
SELECT is((SELECT subject FROM n1), 'Welcome to eventshop, Ingrid One', 'the subject names the user');
SELECT is((SELECT body_text FROM n1),
          E'Hello Ingrid One,\n\nyour eventshop account for ingest.one@example.com is ready.\n\nThe eventshop team\n',
          'the body is rendered with display name and address');
SELECT is((SELECT status FROM n1), 'pending', 'the notification is pending');
SELECT is((SELECT attempts FROM n1), 0, 'with no attempt yet');
SELECT ok((SELECT next_attempt_at <= clock_timestamp() FROM n1), 'and is due now');
SELECT results_eq($$SELECT event_type, topic, partition, "offset" FROM eventshop.inbox
                    WHERE event_id = '$$ || :'u1_event' || $$'$$,
                  $$VALUES ('user.registered'::text, 'auth.events'::text, 0, 10::bigint)$$,
                  'the event id is recorded in the inbox with where it came from');
SELECT is((SELECT next_offset FROM eventshop.consumer_offsets
           WHERE group_id = 'regress-group' AND topic = 'auth.events' AND partition = 0), 11::bigint,
          'the stored offset is the next one to read');

SELECT is(pg_temp.ingest('regress-group', 'auth.events', 0, 11, NULL, NULL, :'u1_payload'), 'duplicate',
          'the same event delivered again is a duplicate');
SELECT is(pg_temp.ingest('regress-group', 'auth.events', 0, 12, :'u1_event', 'user.registered', :'u1_payload'),
          'duplicate', 'also when its id and type come from the message headers');
SELECT is((SELECT count(*) FROM eventshop.notifications WHERE event_id = :'u1_event'), 1::bigint,
          'still exactly one notification');
SELECT is((SELECT count(*) FROM eventshop.inbox WHERE event_id = :'u1_event'), 1::bigint,
          'and one inbox row');
SELECT is((SELECT next_offset FROM eventshop.consumer_offsets
           WHERE group_id = 'regress-group' AND topic = 'auth.events' AND partition = 0), 13::bigint,
          'duplicates advance the offset too');
SELECT is(pg_temp.ingest('regress-group', 'auth.events', 0, 5, NULL, NULL, :'u1_payload'), 'duplicate',
          'a redelivery from an older offset is a duplicate');
SELECT is((SELECT next_offset FROM eventshop.consumer_offsets
           WHERE group_id = 'regress-group' AND topic = 'auth.events' AND partition = 0), 13::bigint,
          'and the stored offset never goes backwards');
SELECT is(pg_temp.ingest('other-group', 'auth.events', 0, 3, NULL, NULL, :'u1_payload'), 'duplicate',
          'the inbox is keyed by event id alone: a new consumer group does not resend old events');
SELECT is((SELECT next_offset FROM eventshop.consumer_offsets
           WHERE group_id = 'other-group' AND topic = 'auth.events' AND partition = 0), 4::bigint,
          'offsets are kept per consumer group');

-- ---------------------------------------------------------------------------
-- Events that produce nothing
-- ---------------------------------------------------------------------------
SELECT is(pg_temp.ingest('regress-group', 'auth.events', 1, 100, NULL, NULL,
          format('{"specversion": "1.0", "id": "00000000-0000-4000-8000-000000000001", "source": "/eventshop/auth",
                   "type": "user.profile_viewed", "subject": %s, "datacontenttype": "application/json", "data": {}}',
                 to_json(:'u1'::text))),
          'ignored', 'an event type without notification rules is ignored');
SELECT is(pg_temp.ingest('regress-group', 'auth.events', 1, 101, NULL, NULL,
          '{"specversion": "1.0", "id": "00000000-0000-4000-8000-000000000002", "source": "/eventshop/auth",
            "type": "user.registered", "subject": "00000000-0000-4000-8000-0000000000ff",
            "datacontenttype": "application/json", "data": {}}'),
          'ignored', 'a user.registered event for an unknown account is ignored');
SELECT is((SELECT count(*) FROM eventshop.notifications
           WHERE event_id IN ('00000000-0000-4000-8000-000000000001', '00000000-0000-4000-8000-000000000002')),
          0::bigint, 'ignored events queue no notification');
SELECT is((SELECT count(*) FROM eventshop.inbox
           WHERE event_id IN ('00000000-0000-4000-8000-000000000001', '00000000-0000-4000-8000-000000000002')),
          2::bigint, 'but are recorded in the inbox');
SELECT is(pg_temp.ingest('regress-group', 'auth.events', 1, 102, NULL, NULL,
          '{"specversion": "1.0", "id": "00000000-0000-4000-8000-000000000001", "type": "user.profile_viewed"}'),
          'duplicate', 'an ignored event delivered again is a duplicate');
SELECT is((SELECT next_offset FROM eventshop.consumer_offsets
           WHERE group_id = 'regress-group' AND topic = 'auth.events' AND partition = 1), 103::bigint,
          'each partition has its own offset');

-- ---------------------------------------------------------------------------
-- Messages that are not CloudEvents are recorded in rejected_events and
-- skipped, so that one bad message cannot block its partition.
-- ---------------------------------------------------------------------------
SELECT count(*) AS inbox_before FROM eventshop.inbox \gset
SELECT is(pg_temp.ingest('regress-group', 'auth.events', 2, 200 + v.i, v.event_id, NULL, v.payload),
          'rejected', 'rejected: ' || v.why)
FROM (VALUES
	(0, NULL, 'not json', 'not JSON'),
	(1, NULL, '', 'an empty message'),
	(2, NULL, '[]', 'a JSON array'),
	(3, NULL, '"user.registered"', 'a JSON string'),
	(4, NULL, 'null', 'JSON null'),
	(5, NULL, '{}', 'an empty object'),
	(6, NULL, '{"type": "user.registered"}', 'an object without id'),
	(7, NULL, '{"id": "not-a-uuid", "type": "user.registered"}', 'an id that is not a uuid'),
	(8, NULL, '{"id": 42, "type": "user.registered"}', 'a numeric id'),
	(9, NULL, '{"id": "00000000-0000-4000-8000-000000000003"}', 'an object without type'),
	(10, 'not-a-uuid', '{"id": "00000000-0000-4000-8000-000000000004", "type": "user.registered"}',
	 'a ce_id header that is not a uuid'),
	(11, NULL, NULL, 'a NULL payload (tombstone)'),
	(12, NULL, '{"id": "00000000-0000-4000-8000-000000000005", "type": "user.registered"', 'truncated JSON')
) AS v(i, event_id, payload, why);
SELECT is((SELECT count(*) FROM eventshop.rejected_events WHERE topic = 'auth.events' AND partition = 2), 13::bigint,
          'each rejected message has a row in rejected_events');
SELECT is((SELECT array_agg("offset" ORDER BY "offset") FROM eventshop.rejected_events
           WHERE topic = 'auth.events' AND partition = 2),
          ARRAY[200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212]::bigint[],
          'recording the offset of each');
SELECT ok((SELECT bool_and(reason <> '') FROM eventshop.rejected_events), 'and a reason');
SELECT is((SELECT next_offset FROM eventshop.consumer_offsets
           WHERE group_id = 'regress-group' AND topic = 'auth.events' AND partition = 2), 213::bigint,
          'rejected messages advance the offset');
SELECT is((SELECT count(*) FROM eventshop.inbox), :inbox_before::bigint, 'rejected messages do not enter the inbox');

-- Hostile payloads that make the jsonb cast raise something other than
-- 22P02. _ingest_event lets these errors escape; the dispatcher treats an
-- error of class 22, 23 or 54 as the message's fault, replays the batch and
-- records the culprit as rejected (dispatcher_is_data_error), while any other
-- error stops the worker. So either outcome below counts as rejected.
CREATE FUNCTION pg_temp.try_ingest(p_offset bigint, p_payload text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
	RETURN pg_temp.ingest('regress-group', 'auth.events', 3, p_offset, NULL, NULL, p_payload);
EXCEPTION
	WHEN data_exception OR integrity_constraint_violation OR program_limit_exceeded THEN
		RETURN 'rejected';
	WHEN OTHERS THEN
		RETURN 'error ' || SQLSTATE;
END
$$;
SELECT is(pg_temp.try_ingest(300,
          '{"id": "00000000-0000-4000-8000-000000000006", "type": "user.registered", "data": "\u0000"}'),
          'rejected', 'rejected: a \u0000 escape');
SELECT is(pg_temp.try_ingest(301,
          '{"id": "00000000-0000-4000-8000-000000000007", "type": "user.registered", "data": 1e1000000}'),
          'rejected', 'rejected: a number beyond numeric range');
SELECT is(pg_temp.try_ingest(302, repeat('[', 1000000)),
          'rejected', 'rejected: a deeply nested document');
SELECT is(pg_temp.try_ingest(303, '{"id": "00000000-0000-4000-8000-000000000008", "type": "user.registered", '
                                  || '"subject": "' || repeat('x', 100000) || '"}'),
          'ignored', 'a huge subject is looked up, found nobody, and is ignored');

-- ---------------------------------------------------------------------------
-- _claim_notifications and _record_deliveries
-- ---------------------------------------------------------------------------
-- One outcome through the sender workers' batch recorder; returns the new status.
CREATE FUNCTION pg_temp.record_outcome(id uuid, outcome text, response text, max_attempts integer)
RETURNS text LANGUAGE sql AS $$
	SELECT r.status FROM eventshop._record_deliveries(ARRAY[id], ARRAY[outcome], ARRAY[response],
		ARRAY[CASE WHEN outcome <> 'sent' THEN 'smtp_reply' END], ARRAY[clock_timestamp()], ARRAY[5],
		max_attempts, 3600) r
$$;

-- N1: claimed, leased, sent.
SELECT results_eq($$SELECT recipient, subject, channel, attempts FROM eventshop._claim_notifications(10)$$,
                  $$VALUES ('ingest.one@example.com'::text, 'Welcome to eventshop, Ingrid One'::text, 'email'::text, 1)$$,
                  'a claim returns the due notification with its attempt number');
SELECT is((SELECT attempts FROM n1), 1, 'the claim counted the attempt');
SELECT ok((SELECT next_attempt_at > clock_timestamp() + interval '30 seconds' FROM n1),
          'and leased the row for lease_seconds');
SELECT is((SELECT status FROM n1), 'pending', 'a leased row stays pending');
SELECT is_empty($$SELECT * FROM eventshop._claim_notifications(10)$$,
                'a second claim returns nothing while the lease lasts');
SELECT is(pg_temp.record_outcome((SELECT id FROM n1), 'sent', '250 2.0.0 Ok: queued as 4711', 8), 'sent',
          'a successful delivery returns sent');
SELECT is((SELECT status FROM n1), 'sent', 'the notification is sent');
SELECT ok((SELECT sent_at IS NOT NULL FROM n1), 'with sent_at set');
SELECT is((SELECT last_error FROM n1), NULL, 'and no error');
SELECT results_eq($$SELECT succeeded, response FROM eventshop.notification_attempts a
                    JOIN eventshop.notifications n ON n.id = a.notification_id
                    WHERE n.event_id = '$$ || :'u1_event' || $$'$$,
                  $$VALUES (true, '250 2.0.0 Ok: queued as 4711'::text)$$,
                  'the attempt is recorded with the server''s response');
SELECT is_empty($$SELECT * FROM eventshop._claim_notifications(10)$$, 'a sent notification is not claimed again');

-- N2: temporary failures with backoff, then dead after max_attempts.
SELECT eventshop.register('ingest.two@example.com', 'correct horse battery staple', 'Ingo Two') AS u2 \gset
SELECT event_id AS u2_event, payload AS u2_payload FROM eventshop.outbox WHERE message_key = :'u2' \gset
SELECT is(pg_temp.ingest('regress-group', 'auth.events', 0, 13, NULL, NULL, :'u2_payload'), 'queued',
          'a second registration is queued');
CREATE TEMP VIEW n2 AS SELECT * FROM eventshop.notifications WHERE event_id = :'u2_event';
SELECT results_eq($$SELECT recipient, attempts FROM eventshop._claim_notifications(10)$$,
                  $$VALUES ('ingest.two@example.com'::text, 1)$$,
                  'only the new notification is claimed');
SELECT is(pg_temp.record_outcome((SELECT id FROM n2), 'temporary', '451 4.3.0 Try again later', 3), 'pending',
          'a temporary failure returns pending');
SELECT is((SELECT status FROM n2), 'pending', 'the notification stays pending');
SELECT is((SELECT last_error FROM n2), '451 4.3.0 Try again later', 'with the error recorded');
SELECT ok((SELECT n.next_attempt_at >= max(a.attempted_at) + interval '1 second'
                  AND n.next_attempt_at < max(a.attempted_at) + interval '10 seconds'
           FROM n2 n JOIN eventshop.notification_attempts a ON a.notification_id = n.id GROUP BY n.next_attempt_at),
          'the first retry waits 2^1 seconds with jitter (1 to 2 s), instead of the 60 s lease');
UPDATE eventshop.notifications SET next_attempt_at = clock_timestamp() + interval '1 hour'
WHERE event_id = :'u2_event';    -- keep the retry in the future, however slow this machine is
SELECT is_empty($$SELECT * FROM eventshop._claim_notifications(10)$$, 'a row waiting for its retry is not claimed');
SELECT ok(eventshop._seconds_until_next_notification() BETWEEN 3000 AND 3600,
          '_seconds_until_next_notification says when it is due');

UPDATE eventshop.notifications SET next_attempt_at = clock_timestamp() - interval '1 second'
WHERE event_id = :'u2_event';    -- the backoff has passed
SELECT is(eventshop._seconds_until_next_notification(), 0::double precision,
          '_seconds_until_next_notification is 0 when a row is due');
SELECT results_eq($$SELECT recipient, attempts FROM eventshop._claim_notifications(10)$$,
                  $$VALUES ('ingest.two@example.com'::text, 2)$$, 'the due retry is claimed as attempt 2');
SELECT is(pg_temp.record_outcome((SELECT id FROM n2), 'temporary', '421 4.7.0 Too many connections', 3), 'pending',
          'a second temporary failure returns pending');
SELECT ok((SELECT n.next_attempt_at >= max(a.attempted_at) + interval '2 seconds'
           FROM n2 n JOIN eventshop.notification_attempts a ON a.notification_id = n.id GROUP BY n.next_attempt_at),
          'the backoff grows: at least 2 seconds after the second failure');

UPDATE eventshop.notifications SET next_attempt_at = clock_timestamp() - interval '1 second'
WHERE event_id = :'u2_event';
SELECT results_eq($$SELECT recipient, attempts FROM eventshop._claim_notifications(10)$$,
                  $$VALUES ('ingest.two@example.com'::text, 3)$$, 'the due retry is claimed as attempt 3');
SELECT is(pg_temp.record_outcome((SELECT id FROM n2), 'temporary', '451 4.3.0 Try again later', 3), 'dead',
          'a failure of the last allowed attempt returns dead');
SELECT is((SELECT status FROM n2), 'dead', 'the notification is dead-lettered');
SELECT is((SELECT attempts FROM n2), 3, 'after 3 attempts');
SELECT is((SELECT count(*) FROM eventshop.notification_attempts a JOIN n2 ON n2.id = a.notification_id
           WHERE NOT a.succeeded), 3::bigint, 'each failed attempt is recorded');
SELECT is_empty($$SELECT * FROM eventshop._claim_notifications(10)$$, 'a dead notification is not claimed');

-- N3: a permanent failure is dead at once.
SELECT eventshop.register('ingest.three@example.com', 'correct horse battery staple', 'Ines Three') AS u3 \gset
SELECT event_id AS u3_event, payload AS u3_payload FROM eventshop.outbox WHERE message_key = :'u3' \gset
SELECT is(pg_temp.ingest('regress-group', 'auth.events', 0, 14, NULL, NULL, :'u3_payload'), 'queued',
          'a third registration is queued');
CREATE TEMP VIEW n3 AS SELECT * FROM eventshop.notifications WHERE event_id = :'u3_event';
SELECT results_eq($$SELECT recipient, attempts FROM eventshop._claim_notifications(10)$$,
                  $$VALUES ('ingest.three@example.com'::text, 1)$$, 'it is claimed');
SELECT is(pg_temp.record_outcome((SELECT id FROM n3), 'permanent', '550 5.1.1 Mailbox unavailable', 8), 'dead',
          'a permanent failure returns dead on the first attempt');
SELECT is((SELECT status FROM n3), 'dead', 'the notification is dead-lettered at once');
SELECT is((SELECT last_error FROM n3), '550 5.1.1 Mailbox unavailable', 'with the error recorded');

-- N4: a sender that died holding the lease; the row comes back when the lease ends.
SELECT eventshop.register('ingest.four@example.com', 'correct horse battery staple', 'Iris Four') AS u4 \gset
SELECT event_id AS u4_event, payload AS u4_payload FROM eventshop.outbox WHERE message_key = :'u4' \gset
SELECT is(pg_temp.ingest('regress-group', 'auth.events', 0, 15, NULL, NULL, :'u4_payload'), 'queued',
          'a fourth registration is queued');
CREATE TEMP VIEW n4 AS SELECT * FROM eventshop.notifications WHERE event_id = :'u4_event';
SELECT results_eq($$SELECT recipient, attempts FROM eventshop._claim_notifications(10, 30)$$,
                  $$VALUES ('ingest.four@example.com'::text, 1)$$, 'it is claimed for 30 seconds');
SELECT ok((SELECT next_attempt_at BETWEEN clock_timestamp() + interval '10 seconds'
                                      AND clock_timestamp() + interval '31 seconds' FROM n4),
          'the lease lasts lease_seconds');
UPDATE eventshop.notifications SET next_attempt_at = clock_timestamp() - interval '1 second'
WHERE event_id = :'u4_event';    -- the lease ran out without a report
SELECT results_eq($$SELECT recipient, attempts FROM eventshop._claim_notifications(10)$$,
                  $$VALUES ('ingest.four@example.com'::text, 2)$$,
                  'an expired lease makes the row claimable again');
SELECT is(pg_temp.record_outcome((SELECT id FROM n4), 'sent', '250 OK', 8), 'sent',
          'and the retry can succeed');

-- N5, N6: batch_size limits a claim; a long response is truncated.
SELECT eventshop.register('ingest.five@example.com', 'correct horse battery staple') AS u5 \gset
SELECT eventshop.register('ingest.six@example.com', 'correct horse battery staple') AS u6 \gset
SELECT is(pg_temp.ingest('regress-group', 'auth.events', 0, 16 + i, NULL, NULL, o.payload::text), 'queued',
          'registration ' || i || ' of a batch is queued')
FROM eventshop.outbox o, LATERAL (SELECT CASE o.message_key WHEN :'u5' THEN 0 ELSE 1 END AS i) AS x
WHERE o.message_key IN (:'u5', :'u6')
ORDER BY i;
SELECT is((SELECT count(*) FROM eventshop._claim_notifications(1)), 1::bigint, 'a claim returns at most batch_size rows');
SELECT is((SELECT count(*) FROM eventshop._claim_notifications(1)), 1::bigint, 'the next claim returns the other row');
SELECT is((SELECT count(*) FROM eventshop._claim_notifications(1)), 0::bigint, 'and then there is nothing left');
SELECT is((SELECT array_agg(pg_temp.record_outcome(n.id, 'sent', repeat('x', 5000), 8) ORDER BY n.recipient)
           FROM eventshop.notifications n WHERE n.user_id IN (:'u5', :'u6')),
          ARRAY['sent', 'sent'], 'both are sent');
SELECT is((SELECT max(length(response)) FROM eventshop.notification_attempts), 2000,
          'stored responses are cut to 2000 characters');

SELECT is(pg_temp.record_outcome('00000000-0000-4000-8000-0000000000ff', 'sent', '250 OK', 8), NULL,
          'a report for an unknown notification changes nothing');

-- Totals
SELECT is((SELECT count(*) FROM eventshop.notification_attempts), 8::bigint,
          'every reported attempt of a known notification wrote one attempt row (1 + 3 + 1 + 1 + 2)');
SELECT results_eq($$SELECT status, channel, notifications FROM eventshop.notification_status ORDER BY status$$,
                  $$VALUES ('dead'::text, 'email'::text, 2::bigint), ('sent', 'email', 4)$$,
                  'notification_status counts notifications by state');
SELECT is(eventshop._seconds_until_next_notification(), NULL,
          '_seconds_until_next_notification is NULL when nothing is pending (0 would make the dispatcher spin)');
SELECT is((SELECT count(*) FROM eventshop.notifications), 6::bigint, 'six registrations, six welcome e-mails');
SELECT is((SELECT count(*) FROM eventshop.notifications n JOIN eventshop.users u ON u.id = n.user_id
           WHERE n.recipient = u.email), 6::bigint, 'each addressed to its own account');

-- ---------------------------------------------------------------------------
-- Uninstall and reinstall: the roles survive DROP EXTENSION (they are
-- cluster-wide) and CREATE EXTENSION copes with their existence.
-- ---------------------------------------------------------------------------
DROP VIEW ev, n1, n2, n3, n4;
SELECT lives_ok('DROP EXTENSION eventshop', 'the extension can be dropped');
SELECT hasnt_table('eventshop', 'users', 'its tables are gone');
SELECT has_role('eventshop_app', 'eventshop_app is still there');
SELECT lives_ok('CREATE EXTENSION eventshop', 'the extension can be created again with its roles in place');
SELECT is((SELECT count(*) FROM eventshop.users), 0::bigint, 'starting empty');
SELECT ok(has_function_privilege('eventshop_app', 'eventshop.register(text, text, text)', 'EXECUTE')
          AND NOT has_function_privilege('eventshop_app', 'eventshop._emit_event(text, text, text, jsonb)', 'EXECUTE')
          AND NOT has_function_privilege('eventshop_app', 'eventshop._emit_events(text, text[], text[], jsonb[])', 'EXECUTE'),
          'and with the same privileges');

SELECT * FROM finish();

DROP ROLE regress_app;
DROP ROLE regress_admin;
DROP ROLE regress_nobody;
