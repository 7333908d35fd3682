-- 10_privileges: applications (eventshop_app) may call the API and nothing
-- else; PUBLIC may do nothing at all; administrators (eventshop_admin) may
-- read the operational views but no table. Roles created here are used by
-- the later files and dropped at the end of the last one.
\set VERBOSITY terse
\set ON_ERROR_STOP 0
\pset format unaligned
\pset tuples_only on

CREATE ROLE regress_app NOLOGIN IN ROLE eventshop_app;
CREATE ROLE regress_admin NOLOGIN IN ROLE eventshop_admin;
CREATE ROLE regress_nobody NOLOGIN;

SELECT plan(84);

SELECT is_member_of('eventshop_app', 'regress_app', 'regress_app is an eventshop_app');
SELECT is_member_of('eventshop_admin', 'regress_admin', 'regress_admin is an eventshop_admin');

-- ---------------------------------------------------------------------------
-- What the catalogs say
-- ---------------------------------------------------------------------------
SELECT set_eq($$SELECT p.oid::regprocedure::text FROM pg_proc p
                WHERE p.pronamespace = 'eventshop'::regnamespace
                  AND has_function_privilege('eventshop_app', p.oid, 'EXECUTE')$$,
              ARRAY['eventshop.register(text,text,text)', 'eventshop.jwks()',
                    'eventshop.login(text,text,text,text)',
                    'eventshop.refresh(text)',
                    'eventshop.authenticate(text)',
                    'eventshop.logout(text)',
                    'eventshop.list_sessions()',
                    'eventshop.revoke_session(uuid)',
                    'eventshop.change_password(text,text)',
                    'eventshop.request_password_reset(text)',
                    'eventshop.request_magic_link(text)', 'eventshop.login_with_magic_link(text,text,text)',
                    'eventshop.reset_password(text,text)',
                    'eventshop.request_email_verification()',
                    'eventshop.verify_email(text)',
                    'eventshop.block_user(uuid,text)',
                    'eventshop.unblock_user(uuid)',
                    'eventshop.set_user_roles(uuid,text[])',
                    'eventshop.current_user_id()',
                    'eventshop.current_roles()',
                    'eventshop.current_session_id()',
                    'eventshop.create_product(text,text,bigint,text,integer,text,text)',
                    'eventshop.update_product(bigint,integer,jsonb)',
                    'eventshop.get_product(text)',
                    'eventshop.search_products(text,text,integer,text)',
                    'eventshop.place_order(jsonb)',
                    'eventshop.place_order(text,jsonb)',
                    'eventshop.cancel_order(uuid)',
                    'eventshop.get_order(uuid)',
                    'eventshop.list_orders(text,boolean,integer,text)',
                    'eventshop.cart_add(text,integer)',
                    'eventshop.cart_set_quantity(text,integer)',
                    'eventshop.cart_remove(text)',
                    'eventshop.cart_clear()',
                    'eventshop.cart_view()',
                    'eventshop.checkout()',
                    'eventshop.sales_by_day(date,date)',
                    'eventshop.sales_by_category(date,date)'],
              'eventshop_app may execute the API functions and nothing else in the schema');
SELECT is_empty($$SELECT p.oid::regprocedure::text FROM pg_proc p
                  WHERE p.pronamespace = 'eventshop'::regnamespace
                    AND has_function_privilege('regress_nobody', p.oid, 'EXECUTE')$$,
                'PUBLIC may execute no function in the schema');
SELECT is_empty($$SELECT c.oid::regclass::text FROM pg_class c
                  WHERE c.relnamespace = 'eventshop'::regnamespace AND c.relkind <> 'S'
                    AND (has_table_privilege('eventshop_app', c.oid,
                                             'SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER')
                         OR has_any_column_privilege('eventshop_app', c.oid,
                                                     'SELECT,INSERT,UPDATE,REFERENCES'))
                  UNION ALL
                  SELECT c.oid::regclass::text FROM pg_class c
                  WHERE c.relnamespace = 'eventshop'::regnamespace
                    AND CASE WHEN c.relkind = 'S'
                             THEN has_sequence_privilege('eventshop_app', c.oid, 'USAGE,SELECT,UPDATE') END$$,
                'eventshop_app has no privilege on any table, view, column or sequence');
SELECT is_empty($$SELECT c.oid::regclass::text FROM pg_class c
                  WHERE c.relnamespace = 'eventshop'::regnamespace AND c.relkind <> 'S'
                    AND (has_table_privilege('regress_nobody', c.oid,
                                             'SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER')
                         OR has_any_column_privilege('regress_nobody', c.oid,
                                                     'SELECT,INSERT,UPDATE,REFERENCES'))$$,
                'PUBLIC has no privilege on any table or view');
SELECT set_eq($$SELECT c.oid::regclass::text FROM pg_class c
                WHERE c.relnamespace = 'eventshop'::regnamespace AND c.relkind <> 'S'
                  AND (has_table_privilege('eventshop_admin', c.oid,
                                           'SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER')
                       OR has_any_column_privilege('eventshop_admin', c.oid,
                                                   'SELECT,INSERT,UPDATE,REFERENCES'))$$,
              ARRAY['eventshop.outbox_status', 'eventshop.notification_status', 'eventshop.parked_events',
                    'eventshop.consumer_lag', 'eventshop.dispatcher_status', 'eventshop.notification_rule_templates'],
              'eventshop_admin may read the status views, the parked events and the templates view, and no table');
SELECT ok(has_table_privilege('pg_monitor', 'eventshop.outbox_status', 'SELECT')
          AND has_table_privilege('pg_monitor', 'eventshop.notification_status', 'SELECT'),
          'pg_monitor may read the status views');
SELECT ok(NOT has_schema_privilege('eventshop_app', 'eventshop', 'CREATE')
          AND NOT has_schema_privilege('eventshop_admin', 'eventshop', 'CREATE')
          AND NOT has_schema_privilege('regress_nobody', 'eventshop', 'USAGE'),
          'nobody but the owner may create in the schema; PUBLIC may not even use it');

-- ---------------------------------------------------------------------------
-- An application role
-- ---------------------------------------------------------------------------
SET ROLE regress_app;

SELECT lives_ok($$SELECT eventshop.register('priv.app@example.com', 'correct horse battery staple')$$,
                'eventshop_app can call eventshop.register');

SELECT throws_ok(format('SELECT * FROM eventshop.%I', t), '42501',
                 format('permission denied for table %s', t),
                 format('eventshop_app cannot SELECT from %s', t))
FROM unnest(ARRAY['users', 'common_passwords', 'outbox', 'consumer_offsets', 'inbox',
                  'rejected_events', 'notification_templates', 'notification_rules',
                  'notifications', 'notification_attempts']) AS t;

SELECT throws_ok(format('INSERT INTO eventshop.%I DEFAULT VALUES', t), '42501',
                 format('permission denied for table %s', t),
                 format('eventshop_app cannot INSERT into %s', t))
FROM unnest(ARRAY['users', 'common_passwords', 'outbox', 'consumer_offsets', 'inbox',
                  'rejected_events', 'notification_templates', 'notification_rules',
                  'notifications', 'notification_attempts']) AS t;

SELECT throws_ok(format('DELETE FROM eventshop.%I', t), '42501',
                 format('permission denied for table %s', t),
                 format('eventshop_app cannot DELETE from %s', t))
FROM unnest(ARRAY['users', 'common_passwords', 'outbox', 'consumer_offsets', 'inbox',
                  'rejected_events', 'notification_templates', 'notification_rules',
                  'notifications', 'notification_attempts']) AS t;

SELECT throws_ok(format('TRUNCATE eventshop.%I', t), '42501',
                 format('permission denied for table %s', t),
                 format('eventshop_app cannot TRUNCATE %s', t))
FROM unnest(ARRAY['users', 'common_passwords', 'outbox', 'consumer_offsets', 'inbox',
                  'rejected_events', 'notification_templates', 'notification_rules',
                  'notifications', 'notification_attempts']) AS t;

SELECT throws_ok($$UPDATE eventshop.users SET status = 'active'$$, '42501',
                 'permission denied for table users', 'eventshop_app cannot UPDATE users');
SELECT throws_ok($$SELECT password_hash FROM eventshop.users$$, '42501',
                 'permission denied for table users', 'eventshop_app cannot read password hashes');
SELECT throws_ok($$UPDATE eventshop.notifications SET status = 'sent'$$, '42501',
                 'permission denied for table notifications', 'eventshop_app cannot UPDATE notifications');
SELECT throws_ok($$SELECT * FROM eventshop.outbox_status$$, '42501',
                 'permission denied for view outbox_status', 'eventshop_app cannot read outbox_status');
SELECT throws_ok($$SELECT * FROM eventshop.notification_status$$, '42501',
                 'permission denied for view notification_status', 'eventshop_app cannot read notification_status');

SELECT throws_ok($$SELECT eventshop._hash_password('correct horse battery staple')$$, '42501',
                 'permission denied for function _hash_password', 'eventshop_app cannot call _hash_password');
SELECT throws_ok($$SELECT eventshop._verify_password('x', '$argon2id$v=19$m=19456,t=2,p=1$x$y')$$, '42501',
                 'permission denied for function _verify_password', 'eventshop_app cannot call _verify_password');
SELECT throws_ok($$SELECT eventshop._emit_event('auth.events', 'forged', 'user.registered', '{}')$$, '42501',
                 'permission denied for function _emit_event', 'eventshop_app cannot forge events with _emit_event');
SELECT throws_ok($$SELECT eventshop._ingest_event('auth.events', 0, 0, NULL, NULL, '{}')$$, '42501',
                 'permission denied for function _ingest_event', 'eventshop_app cannot call _ingest_event');
SELECT throws_ok($$SELECT * FROM eventshop._claim_notifications(10)$$, '42501',
                 'permission denied for function _claim_notifications', 'eventshop_app cannot call _claim_notifications');
SELECT throws_ok($$SELECT * FROM eventshop._record_deliveries('{}', '{}', '{}', '{}', '{}', '{}', 1, 1)$$, '42501',
                 'permission denied for function _record_deliveries', 'eventshop_app cannot call _record_deliveries');
SELECT throws_ok($$SELECT eventshop._normalize_email('a@example.com')$$, '42501',
                 'permission denied for function _normalize_email', 'eventshop_app cannot call _normalize_email');
SELECT throws_ok($$SELECT eventshop._check_password_policy('password')$$, '42501',
                 'permission denied for function _check_password_policy', 'eventshop_app cannot probe the password policy');
SELECT throws_ok($$SELECT eventshop._mask_email('a@example.com')$$, '42501',
                 'permission denied for function _mask_email', 'eventshop_app cannot call _mask_email');
SELECT throws_ok($$SELECT eventshop._seconds_until_next_notification()$$, '42501',
                 'permission denied for function _seconds_until_next_notification',
                 'eventshop_app cannot call _seconds_until_next_notification');
SELECT throws_ok($$SELECT eventshop._wake_worker_on_commit()$$, '42501',
                 'permission denied for function _wake_worker_on_commit', 'eventshop_app cannot call _wake_worker_on_commit');

SELECT throws_ok($$CREATE FUNCTION eventshop.regress_shadow() RETURNS int LANGUAGE sql AS 'SELECT 1'$$, '42501',
                 'permission denied for schema eventshop', 'eventshop_app cannot create objects in the schema');
SELECT throws_ok($$SHOW eventshop.smtp_password_file$$, '42501',
                 'must be superuser or have privileges of pg_read_all_settings to examine "eventshop.smtp_password_file"',
                 'eventshop_app cannot read the SMTP password setting');
SELECT throws_ok($$SHOW eventshop.kafka_properties$$, '42501',
                 'must be superuser or have privileges of pg_read_all_settings to examine "eventshop.kafka_properties"',
                 'eventshop_app cannot read the Kafka properties (SASL credentials)');

RESET ROLE;

-- ---------------------------------------------------------------------------
-- PUBLIC: a role with no grants
-- ---------------------------------------------------------------------------
SET ROLE regress_nobody;
SELECT throws_ok($$SELECT eventshop.register('priv.nobody@example.com', 'correct horse battery staple')$$, '42501',
                 'permission denied for schema eventshop', 'PUBLIC cannot call eventshop.register');
SELECT throws_ok($$SELECT * FROM eventshop.outbox_status$$, '42501',
                 'permission denied for schema eventshop', 'PUBLIC cannot read outbox_status');
RESET ROLE;

-- Even with USAGE on the schema, EXECUTE was revoked from PUBLIC function by function.
GRANT USAGE ON SCHEMA eventshop TO regress_nobody;
SET ROLE regress_nobody;
SELECT throws_ok($$SELECT eventshop.register('priv.nobody@example.com', 'correct horse battery staple')$$, '42501',
                 'permission denied for function register', 'PUBLIC has no EXECUTE on register even with schema USAGE');
SELECT throws_ok($$SELECT eventshop._emit_event('auth.events', 'forged', 'user.registered', '{}')$$, '42501',
                 'permission denied for function _emit_event', 'PUBLIC has no EXECUTE on _emit_event even with schema USAGE');
SELECT throws_ok($$SELECT count(*) FROM eventshop.users$$, '42501',
                 'permission denied for table users', 'PUBLIC cannot read users even with schema USAGE');
RESET ROLE;
REVOKE USAGE ON SCHEMA eventshop FROM regress_nobody;

-- ---------------------------------------------------------------------------
-- An administrator
-- ---------------------------------------------------------------------------
SET ROLE regress_admin;
SELECT lives_ok($$SELECT * FROM eventshop.outbox_status$$, 'eventshop_admin can read outbox_status');
SELECT lives_ok($$SELECT * FROM eventshop.notification_status$$, 'eventshop_admin can read notification_status');
SELECT is((SELECT backlog FROM eventshop.outbox_status), 1::bigint,
          'outbox_status shows the one event written so far');
SELECT throws_ok($$SELECT * FROM eventshop.users$$, '42501',
                 'permission denied for table users', 'eventshop_admin cannot read users');
SELECT throws_ok($$SELECT * FROM eventshop.outbox$$, '42501',
                 'permission denied for table outbox', 'eventshop_admin cannot read the outbox');
SELECT throws_ok($$SELECT * FROM eventshop.notifications$$, '42501',
                 'permission denied for table notifications', 'eventshop_admin cannot read notifications');
SELECT throws_ok($$SELECT eventshop._emit_event('auth.events', 'forged', 'user.registered', '{}')$$, '42501',
                 'permission denied for function _emit_event', 'eventshop_admin cannot forge events');
RESET ROLE;

-- The registration done by regress_app above went through the definer function.
SELECT is((SELECT count(*) FROM eventshop.users WHERE email = 'priv.app@example.com'), 1::bigint,
          'the application''s registration was stored');
SELECT is((SELECT count(*) FROM eventshop.outbox), 1::bigint,
          'and emitted exactly one event');

-- The payment gateway records what the provider reports, and nothing else.
SELECT set_eq($$SELECT p.oid::regprocedure::text FROM pg_proc p
                WHERE p.pronamespace = 'eventshop'::regnamespace
                  AND has_function_privilege('eventshop_gateway', p.oid, 'EXECUTE')$$,
              ARRAY['eventshop.record_payment(uuid,text,text,text,bigint,text)',
                    'eventshop.record_refund(uuid,text,text,bigint,text)',
                    'eventshop.verify_webhook_signature(text,text,text,integer,bigint)'],
              'eventshop_gateway may record payment results and check webhook signatures, nothing else');

SELECT * FROM finish();
