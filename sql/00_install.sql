-- 00_install: CREATE EXTENSION, and what it must leave behind: schema,
-- tables, views, roles, definer functions with a pinned search_path, a
-- comment on every object, and membership of every object in the extension.
-- Later files run in the same database and rely on the extensions created here.
\set VERBOSITY terse
\set ON_ERROR_STOP 0
\pset format unaligned
\pset tuples_only on

CREATE EXTENSION pgtap;
CREATE EXTENSION eventshop;

SELECT plan(58);

-- The extension itself
SELECT has_extension('eventshop', 'eventshop extension is installed');
SELECT has_schema('eventshop', 'schema eventshop exists');
SELECT is((SELECT n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
           WHERE e.extname = 'eventshop'),
          'eventshop', 'extension lives in schema eventshop');
SELECT is((SELECT extrelocatable FROM pg_extension WHERE extname = 'eventshop'),
          false, 'extension is not relocatable');
SELECT is((SELECT extversion FROM pg_extension WHERE extname = 'eventshop'),
          '1.0', 'extension version is 1.0');
SELECT is((SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries'),
          'eventshop', 'the library is preloaded');
SELECT is(getdatabaseencoding(), 'UTF8',
          'the database is UTF8 (events are UTF-8 JSON; the expected output assumes it)');

-- Tables and views
SELECT has_table('eventshop', 'users', 'table eventshop.users exists');
SELECT has_table('eventshop', 'common_passwords', 'table eventshop.common_passwords exists');
SELECT has_table('eventshop', 'outbox', 'table eventshop.outbox exists');
SELECT has_table('eventshop', 'consumer_offsets', 'table eventshop.consumer_offsets exists');
SELECT has_table('eventshop', 'inbox', 'table eventshop.inbox exists');
SELECT has_table('eventshop', 'rejected_events', 'table eventshop.rejected_events exists');
SELECT has_table('eventshop', 'notification_templates', 'table eventshop.notification_templates exists');
SELECT has_table('eventshop', 'notification_rules', 'table eventshop.notification_rules exists');
SELECT has_table('eventshop', 'notifications', 'table eventshop.notifications exists');
SELECT has_table('eventshop', 'notification_attempts', 'table eventshop.notification_attempts exists');
SELECT has_table('eventshop', 'relay_progress', 'table eventshop.relay_progress exists');
SELECT has_table('eventshop', 'outbox_parked', 'table eventshop.outbox_parked exists');
SELECT has_view('eventshop', 'outbox_status', 'view eventshop.outbox_status exists');
SELECT has_view('eventshop', 'parked_events', 'view eventshop.parked_events exists');
SELECT is((SELECT count(*)::integer FROM pg_inherits WHERE inhparent = 'eventshop.outbox'::regclass), 8,
          'the outbox is a ring of eight partitions');
SELECT is((SELECT seqcache FROM pg_sequence WHERE seqrelid = 'eventshop.outbox_id_seq'::regclass), 1::bigint,
          'the outbox id sequence hands out ids one at a time (CACHE 1), as the relay assumes');
SELECT has_view('eventshop', 'notification_status', 'view eventshop.notification_status exists');
SELECT col_is_unique('eventshop', 'users', ARRAY['email'], 'users.email is unique');
SELECT col_is_unique('eventshop', 'notifications', ARRAY['event_id', 'template'],
                     'one notification per (event, template)');

-- Roles
SELECT has_role('eventshop_app', 'role eventshop_app exists');
SELECT has_role('eventshop_admin', 'role eventshop_admin exists');
SELECT is((SELECT rolcanlogin FROM pg_roles WHERE rolname = 'eventshop_app'),
          false, 'eventshop_app is NOLOGIN');
SELECT is((SELECT rolcanlogin FROM pg_roles WHERE rolname = 'eventshop_admin'),
          false, 'eventshop_admin is NOLOGIN');

-- API functions: SECURITY DEFINER, pinned search_path
SELECT has_function('eventshop', 'register', ARRAY['text', 'text', 'text'],
                    'function eventshop.register(text, text, text) exists');
SELECT is_definer('eventshop', 'register', ARRAY['text', 'text', 'text'],
                  'eventshop.register is SECURITY DEFINER');
SELECT ok((SELECT 'search_path=pg_catalog, pg_temp' = ANY (proconfig)
           FROM pg_proc WHERE oid = 'eventshop.register(text, text, text)'::regprocedure),
          'eventshop.register pins search_path = pg_catalog, pg_temp');
SELECT is((SELECT pg_get_function_result(oid)
           FROM pg_proc WHERE oid = 'eventshop.register(text, text, text)'::regprocedure),
          'uuid', 'eventshop.register returns uuid');
SELECT set_eq($$SELECT p.oid::regprocedure::text FROM pg_proc p
                WHERE p.pronamespace = 'eventshop'::regnamespace AND p.prosecdef$$,
              ARRAY['eventshop.register(text,text,text)',
                    'eventshop.create_signing_key(text)', 'eventshop.rotate_signing_keys(text)',
                    'eventshop.revoke_signing_key(text)', 'eventshop.jwks()',
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
                    'eventshop.flush_security_events()',
                    'eventshop.purge_expired_auth_data()',
                    'eventshop._unpublished_events()',
                    'eventshop.retry_parked_event(bigint)', 'eventshop.retry_parked_events()',
                    'eventshop.discard_parked_event(bigint)', 'eventshop.purge_published_events(interval)',
                    'eventshop.create_product(text,text,bigint,text,integer,text,text)',
                    'eventshop.update_product(bigint,integer,jsonb)',
                    'eventshop.get_product(text)',
                    'eventshop.search_products(text,text,integer,text)',
                    'eventshop.expire_reservations(integer)',
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
                    'eventshop.record_payment(uuid,text,text,text,bigint,text)',
                    'eventshop.record_refund(uuid,text,text,bigint,text)',
                    'eventshop.verify_webhook_signature(text,text,text,integer,bigint)',
                    'eventshop.sales_by_day(date,date)',
                    'eventshop.sales_by_category(date,date)',
                    'eventshop.set_notification_template(text,text,text,text,text)',
                    'eventshop.set_notification_rule(text,text,boolean)',
                    'eventshop.preview_notification(text,jsonb)',
                    'eventshop.audit_events(text,text,timestamp with time zone,timestamp with time zone,bigint,integer)',
                    'eventshop.purge_event_audit(interval,integer)',
                    'eventshop.dead_letters(integer)', 'eventshop.retry_dead_letter(uuid)',
                    'eventshop.retry_dead_letters()', 'eventshop.discard_dead_letter(uuid)'],
              'the API functions, and only they, are SECURITY DEFINER');
SELECT is_empty($$SELECT p.oid::regprocedure::text FROM pg_proc p
                  WHERE p.pronamespace = 'eventshop'::regnamespace
                    AND p.prolang <> (SELECT oid FROM pg_language WHERE lanname = 'c')
                    AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c
                                    WHERE c ~ '^search_path=pg_catalog(, [a-z_]+)*, pg_temp$')$$,
                'every SQL and PL/pgSQL function pins search_path to pg_catalog first and pg_temp last');

-- Internal functions exist (privileges are checked in 10_privileges)
SELECT has_function('eventshop', '_emit_event', ARRAY['text', 'text', 'text', 'jsonb'],
                    'function eventshop._emit_event exists');
SELECT has_function('eventshop', '_hash_password', ARRAY['text'],
                    'function eventshop._hash_password exists');
SELECT has_function('eventshop', '_verify_password', ARRAY['text', 'text'],
                    'function eventshop._verify_password exists');
SELECT has_function('eventshop', '_normalize_email', ARRAY['text'],
                    'function eventshop._normalize_email exists');
SELECT has_function('eventshop', '_check_password_policy', ARRAY['text'],
                    'function eventshop._check_password_policy exists');
SELECT has_function('eventshop', '_mask_email', ARRAY['text'],
                    'function eventshop._mask_email exists');
SELECT has_function('eventshop', '_ingest_event',
                    ARRAY['text', 'integer', 'bigint', 'text', 'text', 'text'],
                    'function eventshop._ingest_event exists');
SELECT has_function('eventshop', '_claim_notifications', ARRAY['integer', 'integer'],
                    'function eventshop._claim_notifications exists');
SELECT has_function('eventshop', '_record_deliveries',
                    ARRAY['uuid[]', 'text[]', 'text[]', 'text[]', 'timestamp with time zone[]', 'integer[]', 'integer', 'integer'],
                    'function eventshop._record_deliveries exists');
SELECT has_function('eventshop', '_wake_worker_on_commit', ARRAY[]::name[],
                    'function eventshop._wake_worker_on_commit exists');
SELECT has_trigger('eventshop', 'outbox', 'outbox_wake_relay',
                   'outbox inserts wake the relay at commit');
SELECT has_trigger('eventshop', 'notifications', 'notifications_wake_senders',
                   'queued notifications wake the sender workers at commit');

-- Documentation and ownership
SELECT is_empty($$SELECT c.oid::regclass::text FROM pg_class c
                  WHERE c.relnamespace = 'eventshop'::regnamespace
                    AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
                    AND obj_description(c.oid, 'pg_class') IS NULL$$,
                'every table and view in schema eventshop has a comment');
SELECT is_empty($$SELECT p.oid::regprocedure::text FROM pg_proc p
                  WHERE p.pronamespace = 'eventshop'::regnamespace
                    AND obj_description(p.oid, 'pg_proc') IS NULL$$,
                'every function in schema eventshop has a comment');
SELECT is_empty($$SELECT c.oid::regclass::text FROM pg_class c
                  WHERE c.relnamespace = 'eventshop'::regnamespace
                    AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
                    AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                      AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e')
                    AND NOT EXISTS (SELECT 1 FROM pg_depend d   -- identity sequences belong to their table
                                    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                      AND d.deptype = 'i')
                  UNION ALL
                  SELECT p.oid::regprocedure::text FROM pg_proc p
                  WHERE p.pronamespace = 'eventshop'::regnamespace
                    AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                    WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                                      AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e')$$,
                'every table, view, sequence and function in schema eventshop belongs to the extension');

-- pg_dump skips the rows of extension tables unless pg_extension_config_dump
-- marked them; a dump must keep accounts and unpublished events.
SELECT ok((SELECT 'eventshop.users'::regclass = ANY (extconfig) FROM pg_extension WHERE extname = 'eventshop'),
          'pg_dump keeps the rows of eventshop.users');
SELECT ok((SELECT bool_and(i.inhrelid = ANY (e.extconfig)) FROM pg_inherits i, pg_extension e
           WHERE i.inhparent = 'eventshop.outbox'::regclass AND e.extname = 'eventshop'),
          'pg_dump keeps the rows of every partition of eventshop.outbox');
SELECT ok((SELECT 'eventshop.relay_progress'::regclass = ANY (extconfig) FROM pg_extension WHERE extname = 'eventshop'),
          'pg_dump keeps the relay''s progress with the outbox, so a restore does not publish everything again');
SELECT ok((SELECT 'eventshop.outbox_id_seq'::regclass = ANY (extconfig) FROM pg_extension WHERE extname = 'eventshop'),
          'pg_dump keeps the position of the outbox id sequence');
SELECT is_empty($$SELECT c.oid::regclass::text FROM pg_class c
                  WHERE c.relnamespace = 'eventshop'::regnamespace AND c.relkind IN ('r', 'S')
                    AND c.relname NOT IN ('common_passwords', 'notification_templates', 'notification_rules',
                                          'consumer_watermarks')
                    AND c.oid <> ALL (SELECT unnest(e.extconfig) FROM pg_extension e
                                      WHERE e.extname = 'eventshop')
                  ORDER BY c.relname COLLATE "C"$$,
                'pg_dump keeps every table and sequence that holds runtime data');

SELECT ok((SELECT count(*) >= 50 FROM eventshop.common_passwords),
          'the common-password list is populated');
SELECT results_eq($$SELECT r.event_type, r.template, t.channel
                    FROM eventshop.notification_rules r
                    JOIN eventshop.notification_templates t ON t.name = r.template
                    WHERE r.event_type = 'user.registered'
                    ORDER BY 1, 2$$,
                  $$VALUES ('user.registered'::text, 'welcome'::text, 'email'::text)$$,
                  'user.registered sends the welcome e-mail');

SELECT * FROM finish();
