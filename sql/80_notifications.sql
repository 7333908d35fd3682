-- 80_notifications: the consumer side of the dispatcher. Template rendering
-- (placeholders, HTML escaping, header safety, limits), the shipped rule and
-- template of every event type, recipients from the account, sealed tokens
-- opened only here, the audit log (masked, filtered, paged, purged), admin
-- editing of templates and rules (privileges, bad input), batched offsets and
-- the lag and status views. Ids and tokens are compared, never printed.
\set VERBOSITY terse
\set ON_ERROR_STOP 0
\pset format unaligned
\pset tuples_only on

CREATE ROLE regress_notify_admin NOLOGIN IN ROLE eventshop_admin;
CREATE ROLE regress_notify_app NOLOGIN IN ROLE eventshop_app;

SELECT plan(113);

-- ---------------------------------------------------------------------------
-- _render_template and _template_placeholders
-- ---------------------------------------------------------------------------
SELECT is(eventshop._render_template('Hi {{name}}!', '{"name": "Ann"}', 'text'), 'Hi Ann!', 'a placeholder is filled');
SELECT is(eventshop._render_template('Hi {{ name }}!', '{"name": "Ann"}', 'text'), 'Hi Ann!',
          'spaces inside the braces are allowed');
SELECT is(eventshop._render_template('[{{missing}}]', '{"name": "Ann"}', 'text'), '[]', 'a missing value renders as nothing');
SELECT is(eventshop._render_template('[{{n}}]', '{"n": null}', 'text'), '[]', 'null renders as nothing');
SELECT is(eventshop._render_template('{{a}} {{b}} {{c}}', '{"a": 12.50, "b": true, "c": [1, "x"]}', 'text'),
          '12.50 true [1, "x"]', 'numbers, booleans and arrays render as JSON');
SELECT is(eventshop._render_template('<p>{{x}}</p>', '{"x": "<script>alert(\"1\")</script> & ''q''"}', 'html'),
          '<p>&lt;script&gt;alert(&quot;1&quot;)&lt;/script&gt; &amp; &#39;q&#39;</p>',
          'html mode escapes values, not the template');
SELECT is(eventshop._render_template('{{x}}', '{"x": "<b>&</b>"}', 'text'), '<b>&</b>', 'text mode copies values unchanged');
SELECT is(eventshop._render_template('Re: {{x}}', '{"x": "a\r\nBcc: evil@example.com"}', 'header'),
          'Re: a  Bcc: evil@example.com', 'header mode turns CR and LF into spaces, so no header can be added');
SELECT is(eventshop._render_template('{x} }} {', '{}', 'text'), '{x} }} {', 'single braces and lone closers are text');
SELECT is(eventshop._render_template('{{a}}{{a}}', '{"a": "{{a}}"}', 'text'), '{{a}}{{a}}',
          'values are not rendered again (no template injection)');
SELECT is(eventshop._render_template('{{x}}', '"not an object"', 'text'), '', 'vars that are no object give nothing');
SELECT throws_ok($$SELECT eventshop._render_template('Hi {{na-me}}', '{}', 'text')$$, '22023',
                 'malformed placeholder at byte 4 of the template', 'a malformed placeholder is refused');
SELECT throws_ok($$SELECT eventshop._render_template('Hi {{name', '{}', 'text')$$, '22023',
                 'malformed placeholder at byte 4 of the template', 'an unclosed placeholder is refused');
SELECT throws_ok($$SELECT eventshop._render_template('{{}}', '{}', 'text')$$, '22023',
                 'malformed placeholder at byte 1 of the template', 'an empty placeholder is refused');
SELECT throws_ok($$SELECT eventshop._render_template('{{x}}', '{}', 'markdown')$$, '22023',
                 'unknown rendering mode "markdown"', 'an unknown mode is refused');
SELECT throws_ok($$SELECT eventshop._render_template('{{x}}{{x}}{{x}}', jsonb_build_object('x', repeat('<', 30000)), 'html')$$,
                 '54000', 'rendered notification is longer than 262144 bytes', 'output is capped');
SELECT is(eventshop._template_placeholders('{{a}} {{ b }} {{a}} {{_c9}}'), ARRAY['a', 'b', '_c9'],
          '_template_placeholders lists the distinct names');
SELECT is(eventshop._template_placeholders('no placeholders'), '{}'::text[], 'and nothing for a plain text');

-- _mask_event_data (audit log, webhooks)
SELECT is(eventshop._mask_event_data('{"user_id": "0b7a8f2e-4c1d-4e5f-9a0b-1c2d3e4f5a6b", "email_hash": "x",
                                       "Contact_Email": "a", "api_key": {"nested": [1, 2]}, "note": "mail me at a@b.c",
                                       "pw": "$argon2id$v=19$m=19456", "blob": "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA",
                                       "list": ["ok", "x@y.z", {"sealed_token": "s"}], "n": 42, "t": true, "z": null}'),
          '{"n": 42, "t": true, "z": null, "pw": "[masked]", "blob": "[masked]", "list": ["ok", "[masked]",
            {"sealed_token": "[masked]"}], "note": "[masked]", "api_key": "[masked]", "user_id":
            "0b7a8f2e-4c1d-4e5f-9a0b-1c2d3e4f5a6b", "email_hash": "[masked]", "Contact_Email": "[masked]"}'::jsonb,
          'secret-named members (containers too), addresses, crypt hashes and tokens are masked; ids and numbers kept');
SELECT is(eventshop._mask_event_data('"someone@example.com"'), '"[masked]"'::jsonb, 'a scalar document is masked too');
SELECT is(eventshop._mask_event_data('[]'), '[]'::jsonb, 'an empty array stays empty');
SELECT is(eventshop._mask_event_data(jsonb_build_object('x', repeat('a b', 10000))), '{"truncated": true}'::jsonb,
          'a masked document over 16 kB is cut');

-- ---------------------------------------------------------------------------
-- Shipped rules
-- ---------------------------------------------------------------------------
SELECT results_eq($$SELECT event_type, template, channel FROM eventshop.notification_rule_templates
                    WHERE event_type IS NOT NULL ORDER BY 1$$,
                  $$VALUES ('auth.magic_link_requested', 'magic_link', 'email'),
                           ('email.verification_requested', 'email_verification', 'email'),
                           ('invite.created', 'invite', 'email'),
                           ('order.cancelled', 'order_cancelled', 'email'),
                           ('order.created', 'order_confirmation', 'email'),
                           ('password.reset_requested', 'password_reset', 'email'),
                           ('payment.succeeded', 'payment_receipt', 'email'),
                           ('registration.created', 'registration_confirmation', 'email'),
                           ('user.logged_in', 'login_alert', 'email'),
                           ('user.registered', 'welcome', 'email')$$,
                  'every event type that notifies has its rule and template');
SELECT is_empty($$SELECT name FROM eventshop.notification_templates
                  WHERE (SELECT count(*) FROM unnest(eventshop._template_placeholders(subject || body_text
                                                     || coalesce(body_html, '')))) = 0 AND channel = 'email'$$,
                'every shipped e-mail template uses placeholders that parse');

-- ---------------------------------------------------------------------------
-- Events -> notifications. A hostile display name checks escaping throughout.
-- ---------------------------------------------------------------------------
CREATE FUNCTION pg_temp.ingest_last(p_type text, p_offset bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	v_payload text := (SELECT payload::text FROM eventshop.outbox WHERE event_type = p_type ORDER BY id DESC LIMIT 1);
BEGIN
	RETURN eventshop._ingest_event(split_part(p_type, '.', 1) || '.events', 0, p_offset, NULL, NULL, v_payload);
END
$$;
CREATE FUNCTION pg_temp.last_event(p_type text) RETURNS uuid
LANGUAGE sql AS $$ SELECT event_id FROM eventshop.outbox WHERE event_type = p_type ORDER BY id DESC LIMIT 1 $$;

SELECT eventshop.register('mallory@example.com', 'correct horse battery staple',
                          'Mallory <script>alert("x")</script> & Co') AS uid \gset
SELECT set_config('t.uid', :'uid', false) IS NOT NULL AS t_ok \gset

SELECT is(pg_temp.ingest_last('user.registered', 1), 'queued', 'user.registered is queued');
CREATE TEMP VIEW welcome AS SELECT * FROM eventshop.notifications WHERE event_id = pg_temp.last_event('user.registered');
SELECT is((SELECT recipient FROM welcome), 'mallory@example.com', 'welcome goes to the account''s address');
SELECT is((SELECT subject FROM welcome), 'Welcome to eventshop, Mallory <script>alert("x")</script> & Co',
          'the subject has the plain name');
SELECT ok((SELECT body_text LIKE '%Hello Mallory <script>alert("x")</script> & Co,%' FROM welcome),
          'the text part has the plain name');
SELECT ok((SELECT body_html LIKE '%Hello Mallory &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; Co,%'
                  AND body_html NOT LIKE '%<script>%' FROM welcome),
          'the HTML part has the name escaped, and no script element');

SELECT lives_ok($$SELECT eventshop._emit_event('auth.events', current_setting('t.uid'), 'user.logged_in',
                  jsonb_build_object('user_id', current_setting('t.uid'), 'email_hash', 'abc', 'session_id', gen_random_uuid()))$$,
                'user.logged_in emitted');
SELECT is(pg_temp.ingest_last('user.logged_in', 2), 'queued', 'user.logged_in is queued');
SELECT is((SELECT subject FROM eventshop.notifications WHERE event_id = pg_temp.last_event('user.logged_in')),
          'New sign-in to your eventshop account', 'as a login alert');

-- password reset: the sealed token is opened here, and it works
SELECT lives_ok($$SELECT eventshop.request_password_reset('mallory@example.com')$$, 'a reset is requested');
SELECT is(pg_temp.ingest_last('password.reset_requested', 3), 'queued', 'password.reset_requested is queued');
SELECT substring(body_text FROM 'reset-password\?token=([A-Za-z0-9_-]+)') AS reset_token, body_html AS reset_html
FROM eventshop.notifications WHERE event_id = pg_temp.last_event('password.reset_requested') \gset
SELECT set_config('t.reset_token', :'reset_token', false) IS NOT NULL AS t_ok \gset
SELECT is(length(current_setting('t.reset_token')), 43, 'the reset mail carries the opened token in its link');
SELECT ok(:'reset_html' LIKE '%href="http://localhost:8080/reset-password?token=' || current_setting('t.reset_token') || '"%',
          'the HTML part links to eventshop.app_url with the token');
SELECT lives_ok($$SELECT eventshop.reset_password(current_setting('t.reset_token'), 'a brand new passphrase')$$,
                'the token in the mail resets the password');

SELECT lives_ok($$SELECT eventshop.request_magic_link('mallory@example.com')$$, 'a magic link is requested');
SELECT is(pg_temp.ingest_last('auth.magic_link_requested', 4), 'queued', 'auth.magic_link_requested is queued');
SELECT substring(body_text FROM 'magic-link\?token=([A-Za-z0-9_-]+)') AS magic_token
FROM eventshop.notifications WHERE event_id = pg_temp.last_event('auth.magic_link_requested') \gset
SELECT is((SELECT count(*) FROM eventshop.login_with_magic_link(:'magic_token')), 1::bigint,
          'the magic link in the mail signs in');

-- orders and payments: ids and amounts from the event, the user from the account
SELECT gen_random_uuid() AS order_id \gset
SELECT set_config('t.order_id', :'order_id', false) IS NOT NULL AS t_ok \gset
SELECT lives_ok($$SELECT eventshop._emit_event('orders.events', current_setting('t.order_id'), 'order.created',
                  jsonb_build_object('order_id', current_setting('t.order_id'), 'user_id', current_setting('t.uid'), 'status', 'reserved',
                                     'currency', 'EUR', 'total_minor', 123456, 'item_count', 2, 'unit_count', 3,
                                     'reserved_until', '2030-01-01T00:00:00Z'))$$, 'order.created emitted');
SELECT is(pg_temp.ingest_last('order.created', 5), 'queued', 'order.created is queued');
SELECT results_eq($$SELECT recipient, subject, body_text LIKE '%2 item(s), 1234.56 EUR%'
                    FROM eventshop.notifications WHERE event_id = pg_temp.last_event('order.created')$$,
                  $$VALUES ('mallory@example.com'::text, 'Your eventshop order ' || current_setting('t.order_id'), true)$$,
                  'the order confirmation names the order, its items and its total');
SELECT lives_ok($$SELECT eventshop._emit_event('payments.events', current_setting('t.order_id'), 'payment.succeeded',
                  jsonb_build_object('order_id', current_setting('t.order_id'), 'user_id', current_setting('t.uid'), 'payment_id', gen_random_uuid(),
                                     'provider', 'test', 'provider_ref', 'ref-<1>', 'amount_minor', 500,
                                     'currency', 'JPY'))$$, 'payment.succeeded emitted');
SELECT is(pg_temp.ingest_last('payment.succeeded', 6), 'queued', 'payment.succeeded is queued');
SELECT results_eq($$SELECT subject, body_text LIKE '%payment of 500 JPY%(reference ref-<1>)%',
                           body_html LIKE '%(reference ref-&lt;1&gt;)%'
                    FROM eventshop.notifications WHERE event_id = pg_temp.last_event('payment.succeeded')$$,
                  $$VALUES ('Payment received for order ' || current_setting('t.order_id'), true, true)$$,
                  'the receipt has the amount (no minor unit for JPY) and the escaped reference');
SELECT lives_ok($$SELECT eventshop._emit_event('orders.events', current_setting('t.order_id'), 'order.cancelled',
                  jsonb_build_object('order_id', current_setting('t.order_id'), 'user_id', current_setting('t.uid'), 'by', 'user'))$$,
                'order.cancelled emitted');
SELECT is(pg_temp.ingest_last('order.cancelled', 7), 'queued', 'order.cancelled is queued');
SELECT is((SELECT subject FROM eventshop.notifications WHERE event_id = pg_temp.last_event('order.cancelled')),
          'Your eventshop order ' || current_setting('t.order_id') || ' was cancelled', 'as a cancellation notice');

-- registrations and invites (modules to come): the documented data contracts
SELECT lives_ok($$SELECT eventshop._emit_event('registrations.events', gen_random_uuid()::text, 'registration.created',
                  jsonb_build_object('registration_id', 'R-1', 'event_id', gen_random_uuid(), 'user_id', current_setting('t.uid'),
                                     'event_title', 'PGConf <EU>', 'starts_at', '2030-10-01T09:00:00Z'))$$,
                'registration.created emitted');
SELECT is(pg_temp.ingest_last('registration.created', 8), 'queued', 'registration.created is queued');
SELECT results_eq($$SELECT subject, body_html LIKE '%<b>PGConf &lt;EU&gt;</b>%'
                    FROM eventshop.notifications WHERE event_id = pg_temp.last_event('registration.created')$$,
                  $$VALUES ('You are registered for PGConf <EU>'::text, true)$$,
                  'the registration confirmation names the event');
SELECT eventshop._random_token(32) AS invite_token \gset
SELECT set_config('t.invite_token', :'invite_token', false) IS NOT NULL AS t_ok \gset
SELECT lives_ok($$SELECT eventshop._emit_event('invites.events', gen_random_uuid()::text, 'invite.created',
                  jsonb_build_object('invite_id', gen_random_uuid(), 'inviter_id', current_setting('t.uid'),
                                     'sealed_email', eventshop._seal('New.Guest@Example.com'),
                                     'sealed_token', eventshop._seal(current_setting('t.invite_token')),
                                     'event_title', 'Launch party', 'expires_at', '2030-01-01T00:00:00Z'))$$,
                'invite.created for someone without an account emitted');
SELECT is(pg_temp.ingest_last('invite.created', 9), 'queued', 'invite.created is queued');
SELECT results_eq($$SELECT recipient, user_id IS NULL, body_text LIKE '%/invites/accept?token=' || current_setting('t.invite_token') || '%',
                           subject LIKE 'Mallory %invited you to Launch party'
                    FROM eventshop.notifications WHERE event_id = pg_temp.last_event('invite.created')$$,
                  $$VALUES ('new.guest@example.com'::text, true, true, true)$$,
                  'the invite goes to the unsealed address with the magic link and the inviter''s name');

-- unusable events: recorded, skipped, never retried
SELECT count(*) AS rejected_before FROM eventshop.rejected_events \gset
SELECT lives_ok($$SELECT eventshop._emit_event('auth.events', current_setting('t.uid'), 'password.reset_requested',
                  jsonb_build_object('user_id', current_setting('t.uid'), 'sealed_token', 'AAAAtampered'))$$,
                'a reset event with a broken seal emitted');
SELECT is(pg_temp.ingest_last('password.reset_requested', 10), 'rejected', 'a seal that does not open is rejected');
SELECT is((SELECT count(*) FROM eventshop.rejected_events), (:rejected_before + 1)::bigint, 'and recorded in rejected_events');
SELECT is((SELECT count(*) FROM eventshop.notifications WHERE event_id = pg_temp.last_event('password.reset_requested')),
          0::bigint, 'it queues nothing');
SELECT is(pg_temp.ingest_last('password.reset_requested', 11), 'duplicate', 'and its redelivery is a no-op');
SELECT lives_ok($$SELECT eventshop._emit_event('orders.events', 'x', 'order.created',
                  '{"user_id": "nobody", "_email": "attacker@example.com", "_user_id": "x", "email": "a@b.c"}')$$,
                'an order event without a known user emitted');
SELECT is(pg_temp.ingest_last('order.created', 12), 'ignored',
          'an event whose recipient is unknown is ignored (it cannot name one in its data)');

-- ---------------------------------------------------------------------------
-- Audit log
-- ---------------------------------------------------------------------------
SELECT is((SELECT count(*) FROM eventshop.event_audit WHERE event_type IN ('user.registered', 'user.logged_in',
             'password.reset_requested', 'auth.magic_link_requested', 'order.created', 'payment.succeeded',
             'order.cancelled', 'registration.created', 'invite.created')), 11::bigint,
          'every consumed event has one audit row (redeliveries none)');
SELECT is_empty($$SELECT id FROM eventshop.event_audit
                  WHERE data::text ~ '@' OR data::text LIKE '%' || current_setting('t.reset_token') || '%'
                     OR data::text LIKE '%' || current_setting('t.invite_token') || '%' OR data::text ~ '"[A-Za-z0-9_-]{40,}"'
                     OR data ? 'email_hash' AND data->>'email_hash' <> '[masked]'$$,
                'no address, token, sealed value or hash in the audit log');
SELECT results_eq($$SELECT data->>'sealed_token', data->>'user_id', outcome, notifications FROM eventshop.event_audit
                    WHERE event_type = 'password.reset_requested' AND outcome = 'queued'$$,
                  $$VALUES ('[masked]'::text, current_setting('t.uid')::text, 'queued'::text, 1)$$,
                  'sealed values are masked, ids kept, with the outcome');
SELECT is((SELECT outcome FROM eventshop.event_audit WHERE event_id = pg_temp.last_event('password.reset_requested')),
          'rejected', 'rejected events are audited as such');
SET ROLE regress_notify_admin;
SELECT is((SELECT count(*) FROM eventshop.audit_events(subject => current_setting('t.order_id'))), 3::bigint,
          'audit_events filters by subject (the order''s three events)');
SELECT is((SELECT array_agg(event_type ORDER BY id DESC) FROM eventshop.audit_events(subject => current_setting('t.order_id'), page_size => 2)),
          ARRAY['order.cancelled', 'payment.succeeded'], 'newest first, one page');
SELECT is((SELECT array_agg(a.event_type) FROM eventshop.audit_events(subject => current_setting('t.order_id'), page_size => 2,
             before_id => (SELECT min(id) FROM eventshop.audit_events(subject => current_setting('t.order_id'), page_size => 2))) a),
          ARRAY['order.created'], 'and the next page with before_id');
SELECT is((SELECT count(*) FROM eventshop.audit_events(event_type => 'user.logged_in')), 1::bigint, 'filters by type');
SELECT is((SELECT count(*) FROM eventshop.audit_events(from_time => now() + interval '1 hour')), 0::bigint,
          'filters by time');
SELECT throws_ok($$SELECT * FROM eventshop.audit_events(page_size => 0)$$, '22023',
                 'page_size must be between 1 and 1000', 'page size is checked');
SELECT throws_ok($$SELECT * FROM eventshop.audit_events(from_time => now(), to_time => now() - interval '1 day')$$,
                 '22023', 'from_time is after to_time', 'the time range is checked');
SELECT is(eventshop.purge_event_audit(interval '1 day'), 0::bigint, 'purge keeps recent rows');
RESET ROLE;
UPDATE eventshop.event_audit SET received_at = received_at - interval '100 days' WHERE event_type = 'user.logged_in';
SET ROLE regress_notify_admin;
SELECT is(eventshop.purge_event_audit(), 1::bigint, 'purge deletes rows past the retention (90 days by default)');
RESET ROLE;
SET ROLE regress_notify_app;
SELECT throws_ok($$SELECT * FROM eventshop.audit_events()$$, '42501', 'permission denied for function audit_events',
                 'applications cannot read the audit log');
RESET ROLE;

-- ---------------------------------------------------------------------------
-- Template and rule administration
-- ---------------------------------------------------------------------------
SET ROLE regress_notify_admin;
SELECT lives_ok($$SELECT eventshop.set_notification_template('welcome', 'email', 'Hello {{display_name}}',
                  'Text for {{display_name}}', '<i>{{display_name}}</i>')$$, 'an administrator edits a template');
SELECT lives_ok($$SELECT eventshop.set_notification_template('order_sms', 'sms', 'Order', 'Order {{order_id}}: {{total}}')$$,
                'and creates an SMS template');
SELECT lives_ok($$SELECT eventshop.set_notification_rule('order.created', 'order_sms')$$, 'and a rule for it');
SELECT lives_ok($$SELECT eventshop.set_notification_rule('order.created', 'event_webhook')$$, 'and a webhook rule');
SELECT throws_ok($$SELECT eventshop.set_notification_template('Bad Name', 'email', 's', 'b')$$, '22023',
                 'invalid template name', 'a bad name is refused');
SELECT throws_ok($$SELECT eventshop.set_notification_template('x', 'fax', 's', 'b')$$, '22023',
                 'invalid channel "fax"', 'an unknown channel is refused');
SELECT throws_ok($$SELECT eventshop.set_notification_template('x', 'email', E'two\nlines', 'b')$$, '22023',
                 'subject contains control characters', 'a multi-line subject is refused');
SELECT throws_ok($$SELECT eventshop.set_notification_template('x', 'email', 's', 'Hi {{oops')$$, '22023',
                 'body_text: malformed placeholder at byte 4 of the template', 'a malformed placeholder is refused');
SELECT throws_ok($$SELECT eventshop.set_notification_template('x', 'email', 's', NULL)$$, '22004',
                 'body_text is required', 'a missing body is refused');
SELECT throws_ok($$SELECT eventshop.set_notification_template('x', 'email', 's', repeat('b', 20001))$$, '22023',
                 'body_text must be 1 to 20000 characters long', 'an oversized body is refused');
SELECT throws_ok($$SELECT eventshop.set_notification_rule('order.created', 'no_such_template')$$, 'P0002',
                 'no template named "no_such_template"', 'a rule needs an existing template');
SELECT throws_ok($$SELECT eventshop.set_notification_rule('Order Created', 'welcome')$$, '22023',
                 'invalid event type', 'a rule needs a well-formed event type');
SELECT results_eq($$SELECT subject, body_html FROM eventshop.preview_notification('welcome',
                    '{"type": "user.registered", "data": {"display_name": "<Eve>"}}')$$,
                  $$VALUES ('Hello <Eve>'::text, '<i>&lt;Eve&gt;</i>'::text)$$,
                  'preview_notification renders a template with example data');
RESET ROLE;
SET ROLE regress_notify_app;
SELECT throws_ok($$SELECT eventshop.set_notification_template('welcome', 'email', 'pwned', 'pwned')$$, '42501',
                 'permission denied for function set_notification_template', 'applications cannot edit templates');
SELECT throws_ok($$SELECT eventshop.set_notification_rule('user.registered', 'welcome', false)$$, '42501',
                 'permission denied for function set_notification_rule', 'or rules');
RESET ROLE;
SELECT is((SELECT subject FROM eventshop.notification_templates WHERE name = 'welcome'), 'Hello {{display_name}}',
          'refused calls changed nothing');

-- edited templates and new rules apply to the next events
SELECT gen_random_uuid() AS order2 \gset
SELECT set_config('t.order2', :'order2', false) IS NOT NULL AS t_ok \gset
SELECT lives_ok($$SELECT eventshop._emit_event('orders.events', current_setting('t.order2'), 'order.created',
                  jsonb_build_object('order_id', current_setting('t.order2'), 'user_id', current_setting('t.uid'), 'currency', 'EUR', 'total_minor', 990,
                                     'item_count', 1))$$, 'another order.created emitted');
SELECT is(pg_temp.ingest_last('order.created', 13), 'queued', 'it is queued');
SELECT results_eq($$SELECT template, channel, recipient, body_text FROM eventshop.notifications
                    WHERE event_id = pg_temp.last_event('order.created') AND template <> 'event_webhook' ORDER BY template$$,
                  $$VALUES ('order_confirmation'::text, 'email'::text, 'mallory@example.com'::text,
                            (SELECT body_text FROM eventshop.notifications WHERE event_id = pg_temp.last_event('order.created')
                             AND template = 'order_confirmation')),
                           ('order_sms', 'sms', current_setting('t.uid'), 'Order ' || current_setting('t.order2') || ': 9.90 EUR')$$,
                  'one notification per rule: e-mail to the address, SMS to the user id');
SELECT results_eq($$SELECT recipient, subject, (body_text::jsonb)->>'type', (body_text::jsonb)->'data'->>'total_minor'
                    FROM eventshop.notifications
                    WHERE event_id = pg_temp.last_event('order.created') AND template = 'event_webhook'$$,
                  $$VALUES ('webhook'::text, 'order.created'::text, 'order.created'::text, '990'::text)$$,
                  'the webhook notification goes to ''webhook'' with the event as JSON');
SELECT lives_ok($$SELECT eventshop.set_notification_rule('order.created', 'order_sms', false)$$, 'a rule is disabled');
SELECT is(pg_temp.ingest_last('user.registered', 14), 'duplicate', 'an old event stays a duplicate after edits');

-- ---------------------------------------------------------------------------
-- _ingest_events: a batch at once, as _ingest_event one by one
-- ---------------------------------------------------------------------------
SELECT eventshop._emit_event('auth.events', current_setting('t.uid'), 'user.logged_in',
       jsonb_build_object('user_id', current_setting('t.uid'), 'session_id', gen_random_uuid())) AS b1,
       eventshop._emit_event('auth.events', current_setting('t.uid'), 'user.logged_in',
       jsonb_build_object('user_id', current_setting('t.uid'), 'session_id', gen_random_uuid())) AS b2 \gset
CREATE TEMP TABLE batch AS
SELECT o.event_id, o.payload::text AS payload, 100 + row_number() OVER (ORDER BY o.id) AS "offset"
FROM eventshop.outbox o WHERE o.event_id IN (:'b1', :'b2');
SELECT is(eventshop._ingest_events(ARRAY['auth.events', 'auth.events', 'auth.events'], ARRAY[5, 5, 5],
          ARRAY[101, 102, 103]::bigint[], ARRAY[NULL, NULL, NULL]::text[], ARRAY[NULL, 'user.logged_in', NULL],
          ARRAY(SELECT payload FROM batch ORDER BY "offset") || (SELECT payload FROM batch ORDER BY "offset" LIMIT 1)),
          0, 'a batch of two events, one of them twice, is ingested');
SELECT results_eq($$SELECT event_id, outcome, notifications FROM eventshop.event_audit
                    WHERE event_id IN (SELECT event_id FROM batch) ORDER BY "offset"$$,
                  $$SELECT event_id, 'queued'::text, 1 FROM batch ORDER BY "offset"$$,
                  'one audit row per event, in message order, with its notification');
SELECT is((SELECT count(*) FROM eventshop.notifications WHERE event_id IN (SELECT event_id FROM batch)
             AND template = 'login_alert' AND recipient = 'mallory@example.com'), 2::bigint,
          'one login alert per event, not per message');
SELECT is(eventshop._ingest_events(ARRAY['auth.events'], ARRAY[5], ARRAY[104]::bigint[], ARRAY[NULL]::text[],
          ARRAY[NULL]::text[], ARRAY(SELECT payload FROM batch ORDER BY "offset" LIMIT 1)), 0,
          'a redelivered event in a batch ...');
SELECT is((SELECT count(*) FROM eventshop.event_audit WHERE event_id IN (SELECT event_id FROM batch)), 2::bigint,
          '... changes nothing');
SELECT is(eventshop._ingest_events(ARRAY['auth.events', 'auth.events'], ARRAY[5, 5], ARRAY[105, 106]::bigint[],
          ARRAY[NULL, NULL]::text[], ARRAY[NULL, NULL]::text[], ARRAY['[1, 2]', '{"id": "not-used"}']), 2,
          'a batch with messages that are no CloudEvents goes one by one and counts the rejected');
SELECT is((SELECT count(*) FROM eventshop.rejected_events WHERE topic = 'auth.events' AND partition = 5
             AND "offset" IN (105, 106)), 2::bigint, 'and records them as _ingest_event does');
SELECT throws_ok($$SELECT eventshop._ingest_events(ARRAY['auth.events', 'auth.events'], ARRAY[5, 5],
                   ARRAY[107, 108]::bigint[], ARRAY[NULL, NULL]::text[], ARRAY[NULL, NULL]::text[],
                   ARRAY['{"id": "6c3c7f3e-2f68-4a3e-9d3f-0a9d2b1f7c11", "type": "x.y"}', '{not json'])$$,
                 '22P02', NULL, 'a batch with a message that is no JSON fails whole (the dispatcher replays it one by one)');

-- ---------------------------------------------------------------------------
-- Offsets per batch, watermarks, lag and status
-- ---------------------------------------------------------------------------
SELECT lives_ok($$SELECT eventshop._store_consumer_offsets('lag-group', ARRAY['orders.events', 'orders.events', 'auth.events'],
                  ARRAY[0, 1, 0], ARRAY[10, 20, 5]::bigint[])$$, 'a batch stores the offsets of its partitions at once');
SELECT lives_ok($$SELECT eventshop._record_watermarks('lag-group', ARRAY['orders.events', 'orders.events', 'auth.events',
                  'invites.events'], ARRAY[0, 1, 0, 0], ARRAY[0, 0, 0, 3]::bigint[], ARRAY[15, 20, 9, 7]::bigint[])$$,
                'the worker records watermarks');
SELECT results_eq($$SELECT topic, partition, lag FROM eventshop.consumer_lag WHERE group_id = 'lag-group' ORDER BY 1, 2$$,
                  $$VALUES ('auth.events'::text, 0, 4::bigint), ('invites.events', 0, 4), ('orders.events', 0, 5),
                           ('orders.events', 1, 0)$$,
                  'lag = high watermark - stored offset (or low watermark when nothing is stored)');
SELECT lives_ok($$SELECT eventshop._record_watermarks('lag-group', ARRAY['orders.events'], ARRAY[1], ARRAY[0]::bigint[],
                  ARRAY[22]::bigint[])$$, 'after a rebalance');
SELECT results_eq($$SELECT topic, partition, lag FROM eventshop.consumer_lag WHERE group_id = 'lag-group'$$,
                  $$VALUES ('orders.events'::text, 1, 2::bigint)$$, 'revoked partitions leave the view');
SET ROLE regress_notify_admin;
SELECT results_eq($$SELECT consumer_lag, partitions_assigned, (queue_depth->>'pending')::bigint = pending, dead_letters,
                           rejected_events > 0, oldest_pending_age > interval '0'
                    FROM eventshop.dispatcher_status$$,
                  $$VALUES (2::numeric, 1::bigint, true, 0::bigint, true, true)$$,
                  'dispatcher_status sums it up for operators');
RESET ROLE;
SELECT ok(has_table_privilege('pg_monitor', 'eventshop.consumer_lag', 'SELECT')
          AND has_table_privilege('pg_monitor', 'eventshop.dispatcher_status', 'SELECT'),
          'pg_monitor may read the lag and status views');

SELECT * FROM finish();
DROP ROLE regress_notify_admin;
DROP ROLE regress_notify_app;
