-- 75_dead_letters: the sender workers' bookkeeping (one call records a whole
-- round: attempts, retries, dead letters, released claims, outcome events
-- without personal data) and the administrators' dead-letter functions.
\set VERBOSITY terse
\set ON_ERROR_STOP 0
\pset format unaligned
\pset tuples_only on

CREATE ROLE regress_dl_app NOLOGIN IN ROLE eventshop_app;
CREATE ROLE regress_dl_admin NOLOGIN IN ROLE eventshop_admin;

SELECT plan(42);

DELETE FROM eventshop.outbox;
-- Five queued notifications on three channels (inserted as the dispatcher would).
INSERT INTO eventshop.notifications (id, event_id, template, channel, recipient, subject, body_text, body_html)
VALUES ('00000000-0000-4000-8000-000000000001', gen_random_uuid(), 'welcome', 'email', 'one@example.com', 'Hi', 'text', '<p>html</p>'),
       ('00000000-0000-4000-8000-000000000002', gen_random_uuid(), 'welcome', 'email', 'two@example.com', 'Hi', 'text', NULL),
       ('00000000-0000-4000-8000-000000000003', gen_random_uuid(), 'hook', 'webhook', 'webhook', 'Hook', '{"a":1}', NULL),
       ('00000000-0000-4000-8000-000000000004', gen_random_uuid(), 'sms', 'sms', '+15550100', 'S', 'code', NULL),
       ('00000000-0000-4000-8000-000000000005', gen_random_uuid(), 'dev', 'log', 'dev@example.com', 'D', 'log me', NULL);
SELECT throws_ok($$INSERT INTO eventshop.notifications (event_id, template, channel, recipient, subject, body_text)
                   VALUES (gen_random_uuid(), 'x', 'fax', 'r', 's', 'b')$$, '23514', NULL,
                 'an unknown channel is refused by the table');

SELECT results_eq($$SELECT id::text, channel, body_html FROM eventshop._claim_notifications(10) ORDER BY id$$,
                  $$VALUES ('00000000-0000-4000-8000-000000000001', 'email', '<p>html</p>'),
                           ('00000000-0000-4000-8000-000000000002', 'email', NULL),
                           ('00000000-0000-4000-8000-000000000003', 'webhook', NULL),
                           ('00000000-0000-4000-8000-000000000004', 'sms', NULL),
                           ('00000000-0000-4000-8000-000000000005', 'log', NULL)$$,
                  'a claim returns every channel with the HTML part when there is one');

-- One round: sent, permanent, temporary, released, sent (log).
SELECT results_eq($$SELECT id::text, status FROM eventshop._record_deliveries(
                      ARRAY['00000000-0000-4000-8000-000000000001', '00000000-0000-4000-8000-000000000002',
                            '00000000-0000-4000-8000-000000000003', '00000000-0000-4000-8000-000000000004',
                            '00000000-0000-4000-8000-000000000005']::uuid[],
                      ARRAY['sent', 'permanent', 'temporary', 'released', 'sent'],
                      ARRAY['250 OK queued', '550 5.1.1 <two@example.com> unknown', 'HTTP 503: busy',
                            'not tried in this round', 'logged'],
                      ARRAY[NULL, 'smtp_5xx', 'http_5xx', NULL, NULL],
                      ARRAY[clock_timestamp(), clock_timestamp(), clock_timestamp(), clock_timestamp(), clock_timestamp()],
                      ARRAY[12, 30, 1000, 0, 0], 8, 600) ORDER BY id$$,
                  $$VALUES ('00000000-0000-4000-8000-000000000001', 'sent'),
                           ('00000000-0000-4000-8000-000000000002', 'dead'),
                           ('00000000-0000-4000-8000-000000000003', 'pending'),
                           ('00000000-0000-4000-8000-000000000004', 'pending'),
                           ('00000000-0000-4000-8000-000000000005', 'sent')$$,
                  'one call records a whole round and returns each new status');
SELECT results_eq($$SELECT notification_id::text, succeeded, outcome, error_class, duration_ms
                    FROM eventshop.notification_attempts ORDER BY notification_id$$,
                  $$VALUES ('00000000-0000-4000-8000-000000000001', true, 'sent', NULL, 12),
                           ('00000000-0000-4000-8000-000000000002', false, 'permanent', 'smtp_5xx', 30),
                           ('00000000-0000-4000-8000-000000000003', false, 'temporary', 'http_5xx', 1000),
                           ('00000000-0000-4000-8000-000000000005', true, 'sent', NULL, 0)$$,
                  'every tried delivery is an attempt row with outcome, class and duration; a released claim is none');
SELECT is((SELECT attempts FROM eventshop.notifications WHERE id = '00000000-0000-4000-8000-000000000004'), 0,
          'a released claim gives its attempt back');
SELECT ok((SELECT next_attempt_at <= clock_timestamp() FROM eventshop.notifications
           WHERE id = '00000000-0000-4000-8000-000000000004'), 'and is due again at once');
SELECT ok((SELECT next_attempt_at BETWEEN clock_timestamp() + interval '0.9 second' AND clock_timestamp() + interval '2.1 seconds'
           FROM eventshop.notifications WHERE id = '00000000-0000-4000-8000-000000000003'),
          'a temporary failure waits 2^attempts seconds with jitter (1 to 2 s after the first)');
SELECT is((SELECT last_error FROM eventshop.notifications WHERE id = '00000000-0000-4000-8000-000000000002'),
          '550 5.1.1 <two@example.com> unknown', 'a dead letter keeps its last error');

-- Outcome events: one per final status, none for pending rows, no personal data.
SELECT results_eq($$SELECT topic, message_key, event_type FROM eventshop.outbox ORDER BY message_key$$,
                  $$VALUES ('notifications.events', '00000000-0000-4000-8000-000000000001', 'notification.sent'),
                           ('notifications.events', '00000000-0000-4000-8000-000000000002', 'notification.failed'),
                           ('notifications.events', '00000000-0000-4000-8000-000000000005', 'notification.sent')$$,
                  'final outcomes emit notification.sent / notification.failed keyed by notification id');
SELECT is((SELECT payload->'data'->>'error_class' FROM eventshop.outbox
           WHERE message_key = '00000000-0000-4000-8000-000000000002'), 'smtp_5xx',
          'notification.failed names the error class');
SELECT is((SELECT array_agg(k ORDER BY k) FROM eventshop.outbox o, json_object_keys(o.payload->'data') k
           WHERE o.message_key = '00000000-0000-4000-8000-000000000002'),
          ARRAY['attempts', 'channel', 'error_class', 'event_id', 'notification_id', 'template'],
          'and carries ids, channel, template, attempts and class only');
SELECT is((SELECT count(*) FROM eventshop.outbox WHERE payload::text ~ '@|550|two|text|html'), 0::bigint,
          'no recipient, message text or provider reply in any outcome event');

-- A late report never reopens a final status, and emits nothing more.
SELECT is((SELECT status FROM eventshop._record_deliveries(ARRAY['00000000-0000-4000-8000-000000000001']::uuid[],
           ARRAY['temporary'], ARRAY['late'], ARRAY['timeout'], ARRAY[clock_timestamp()], ARRAY[1], 8, 600)), NULL,
          'a late report on a sent notification changes nothing');
SELECT is((SELECT status FROM eventshop.notifications WHERE id = '00000000-0000-4000-8000-000000000001'), 'sent',
          'it stays sent');
SELECT is((SELECT count(*) FROM eventshop.outbox), 3::bigint, 'and no event is emitted for it');
SELECT throws_ok($$SELECT * FROM eventshop._record_deliveries(ARRAY['00000000-0000-4000-8000-000000000001']::uuid[],
                   ARRAY['sent', 'sent'], ARRAY['x'], ARRAY[NULL::text], ARRAY[clock_timestamp()], ARRAY[1], 8, 600)$$,
                 '2202E', NULL, 'arrays of different lengths are refused');

-- Retries exhausted: the temporary failure of the last allowed attempt is dead.
UPDATE eventshop.notifications SET next_attempt_at = clock_timestamp() - interval '1 second'
WHERE id = '00000000-0000-4000-8000-000000000003';
SELECT is((SELECT attempts FROM eventshop._claim_notifications(10) WHERE id = '00000000-0000-4000-8000-000000000003'), 2,
          'the retry is claimed as attempt 2');
SELECT is((SELECT status FROM eventshop._record_deliveries(ARRAY['00000000-0000-4000-8000-000000000003']::uuid[],
           ARRAY['temporary'], ARRAY['HTTP 502'], ARRAY['http_5xx'], ARRAY[clock_timestamp()], ARRAY[3], 2, 600)), 'dead',
          'with max_attempts = 2 the second temporary failure dead-letters');
SELECT is((SELECT payload->'data'->>'attempts' FROM eventshop.outbox
           WHERE message_key = '00000000-0000-4000-8000-000000000003'), '2',
          'notification.failed tells how many attempts were made');
UPDATE eventshop.notifications SET next_attempt_at = clock_timestamp() + interval '1 hour'
WHERE id = '00000000-0000-4000-8000-000000000004';
SELECT ok((SELECT least(600, 2 ^ 30) = 600), 'max_backoff caps the wait');

-- Dead letters: administrators only.
SET ROLE regress_dl_app;
SELECT throws_ok($$SELECT * FROM eventshop.dead_letters()$$, '42501', NULL, 'applications cannot list dead letters');
SELECT throws_ok($$SELECT eventshop.retry_dead_letter('00000000-0000-4000-8000-000000000002')$$, '42501', NULL,
                 'applications cannot retry dead letters');
SELECT throws_ok($$SELECT eventshop.retry_dead_letters()$$, '42501', NULL, 'or all of them');
SELECT throws_ok($$SELECT eventshop.discard_dead_letter('00000000-0000-4000-8000-000000000002')$$, '42501', NULL,
                 'or discard one');
RESET ROLE;
SET ROLE regress_dl_admin;
SELECT results_eq($$SELECT id::text, channel, attempts, last_error FROM eventshop.dead_letters() ORDER BY id$$,
                  $$VALUES ('00000000-0000-4000-8000-000000000002', 'email', 1, '550 5.1.1 <two@example.com> unknown'),
                           ('00000000-0000-4000-8000-000000000003', 'webhook', 2, 'HTTP 502')$$,
                  'an administrator lists the dead letters with their last error');
SELECT ok((SELECT failed_at IS NOT NULL FROM eventshop.dead_letters() LIMIT 1), 'and when they failed');
SELECT is((SELECT count(*) FROM eventshop.dead_letters(1)), 1::bigint, 'max_rows limits the listing');
SELECT throws_ok($$SELECT * FROM eventshop.dead_letters(0)$$, '22023', NULL, 'max_rows must be positive');
SELECT lives_ok($$SELECT eventshop.retry_dead_letter('00000000-0000-4000-8000-000000000002')$$,
                'an administrator retries one dead letter');
RESET ROLE;
SELECT results_eq($$SELECT status, attempts, last_error, next_attempt_at <= clock_timestamp()
                    FROM eventshop.notifications WHERE id = '00000000-0000-4000-8000-000000000002'$$,
                  $$VALUES ('pending', 0, NULL::text, true)$$,
                  'it is pending again, due now, with its attempts reset');
SET ROLE regress_dl_admin;
SELECT throws_ok($$SELECT eventshop.retry_dead_letter('00000000-0000-4000-8000-000000000002')$$, '55000', NULL,
                 'a notification that is not dead cannot be retried');
SELECT throws_ok($$SELECT eventshop.retry_dead_letter('00000000-0000-4000-8000-0000000000ff')$$, 'P0002', NULL,
                 'an unknown id is reported');
SELECT throws_ok($$SELECT eventshop.discard_dead_letter('00000000-0000-4000-8000-000000000001')$$, '55000', NULL,
                 'a sent notification cannot be discarded');
SELECT throws_ok($$SELECT eventshop.discard_dead_letter('00000000-0000-4000-8000-0000000000ff')$$, 'P0002', NULL,
                 'an unknown id cannot be discarded');
SELECT lives_ok($$SELECT eventshop.discard_dead_letter('00000000-0000-4000-8000-000000000003')$$,
                'an administrator discards a dead letter');
RESET ROLE;
SELECT is((SELECT count(*) FROM eventshop.notifications WHERE id = '00000000-0000-4000-8000-000000000003'), 0::bigint,
          'a discarded dead letter is gone');
SELECT is((SELECT count(*) FROM eventshop.notification_attempts
           WHERE notification_id = '00000000-0000-4000-8000-000000000003'), 0::bigint, 'with its attempts');

-- retry_dead_letters puts every dead letter back.
UPDATE eventshop.notifications SET status = 'dead' WHERE id IN ('00000000-0000-4000-8000-000000000002',
                                                                '00000000-0000-4000-8000-000000000004');
SET ROLE regress_dl_admin;
SELECT is(eventshop.retry_dead_letters(), 2::bigint, 'retry_dead_letters returns how many it requeued');
RESET ROLE;
SELECT is((SELECT count(*) FROM eventshop.notifications WHERE status = 'dead'), 0::bigint, 'none is dead any more');

-- Wake-ups: queued and requeued notifications wake the senders; their own bookkeeping does not.
SELECT has_trigger('eventshop', 'notifications', 'notifications_requeued_wake_senders',
                   'a notification put back to pending wakes the senders');
SELECT ok((SELECT tgtype & 1 = 1 FROM pg_trigger WHERE tgname = 'notifications_requeued_wake_senders'),
          'per row, only when the status goes back to pending');
SELECT is((SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
           WHERE c.relname = 'notifications' AND t.tgname LIKE '%wake_dispatcher%'), 0::bigint,
          'the dispatcher is not woken by notifications (it no longer sends)');

SELECT * FROM finish();

DELETE FROM eventshop.notifications;
DELETE FROM eventshop.outbox;
DROP ROLE regress_dl_app;
DROP ROLE regress_dl_admin;
