-- 70_magic_link: magic sign-in links (seed 004): the request behaves the same
-- whether or not the address has an account, the token reaches the notifier
-- only sealed, and a link signs in once, before it expires, for an active
-- account only. Runs last; tokens and ids are compared, never printed.
\set VERBOSITY terse
\set ON_ERROR_STOP 0
\pset format unaligned
\pset tuples_only on

SELECT plan(22);

SELECT eventshop.register('magic.link@example.com', 'magic link passphrase', 'Magic') AS magic_id \gset
SELECT count(*) AS outbox_before FROM eventshop.outbox \gset
SELECT count(*) AS sessions_before FROM eventshop.sessions WHERE user_id = :'magic_id' \gset

-- request: one event with the sealed token, nothing readable in it
SELECT lives_ok($$SELECT eventshop.request_magic_link('  Magic.Link@Example.COM ')$$, 'a magic link is requested');
SELECT is((SELECT count(*) FROM eventshop.outbox WHERE id > 0 AND event_type = 'auth.magic_link_requested'
           AND message_key = :'magic_id'), 1::bigint, 'auth.magic_link_requested is emitted for the account');
SELECT eventshop._open_sealed(payload->'data'->>'sealed_token') AS magic_token FROM eventshop.outbox
WHERE event_type = 'auth.magic_link_requested' AND message_key = :'magic_id' \gset
SELECT ok(length(:'magic_token') = 43, 'the sealed token opens to a 256-bit token');
SELECT ok((SELECT payload::text NOT LIKE '%magic.link@%' AND payload::text NOT LIKE '%' || :'magic_token' || '%'
           FROM eventshop.outbox WHERE event_type = 'auth.magic_link_requested' AND message_key = :'magic_id'),
          'the event holds neither the address nor the raw token');
SELECT is((SELECT count(*) FROM eventshop.account_tokens WHERE user_id = :'magic_id' AND purpose = 'magic_link'
           AND token_hash = eventshop._token_hash(:'magic_token')), 1::bigint, 'only the token''s hash is stored');

-- at most one link a minute; unknown addresses: same answer, no event, no row
SELECT lives_ok($$SELECT eventshop.request_magic_link('magic.link@example.com')$$, 'a second request within a minute is accepted');
SELECT lives_ok($$SELECT eventshop.request_magic_link('nobody.here@example.com')$$, 'a request for an unknown address is accepted alike');
SELECT is((SELECT count(*) FROM eventshop.outbox WHERE event_type = 'auth.magic_link_requested'), 1::bigint,
          'but neither emits an event');
SELECT is((SELECT count(*) FROM eventshop.account_tokens WHERE user_id IS NULL), 0::bigint, 'and no decoy row stays');
SELECT throws_ok($$SELECT eventshop.request_magic_link('not an address')$$, '22023', 'invalid e-mail address',
                 'a malformed address is refused');

-- sign in with it, once
SELECT is((SELECT count(*) FROM eventshop.login_with_magic_link(:'magic_token', '198.51.100.7', 'Browser')
           WHERE access_token IS NOT NULL AND refresh_token IS NOT NULL), 1::bigint, 'the link signs in');
SELECT is((SELECT count(*) FROM eventshop.sessions WHERE user_id = :'magic_id'), (:sessions_before + 1)::bigint,
          'and opens a session');
SELECT is((SELECT payload->'data'->>'method' FROM eventshop.outbox WHERE event_type = 'user.logged_in'
           AND message_key = :'magic_id' ORDER BY id DESC LIMIT 1), 'magic_link', 'user.logged_in says how');
SELECT ok((SELECT email_verified_at IS NOT NULL FROM eventshop.users WHERE id = :'magic_id'),
          'the address counts as verified');
SELECT throws_ok(format('SELECT * FROM eventshop.login_with_magic_link(%L)', :'magic_token'), '28000',
                 'invalid or expired token', 'a used link is refused');

-- bad and expired tokens
SELECT throws_ok($$SELECT * FROM eventshop.login_with_magic_link('garbage')$$, '28000', 'invalid or expired token',
                 'a malformed token is refused');
SELECT throws_ok($$SELECT * FROM eventshop.login_with_magic_link(NULL)$$, '28000', 'invalid or expired token',
                 'a NULL token is refused');
SELECT throws_ok(format('SELECT * FROM eventshop.login_with_magic_link(%L)', repeat('A', 43)), '28000',
                 'invalid or expired token', 'an unknown token is refused');
UPDATE eventshop.account_tokens SET created_at = created_at - interval '2 minutes' WHERE user_id = :'magic_id';
SELECT eventshop.request_magic_link('magic.link@example.com');
SELECT eventshop._open_sealed(payload->'data'->>'sealed_token') AS magic_token2 FROM eventshop.outbox
WHERE event_type = 'auth.magic_link_requested' AND message_key = :'magic_id' ORDER BY id DESC LIMIT 1 \gset
UPDATE eventshop.account_tokens SET expires_at = clock_timestamp() - interval '1 second'
WHERE token_hash = eventshop._token_hash(:'magic_token2');
SELECT throws_ok(format('SELECT * FROM eventshop.login_with_magic_link(%L)', :'magic_token2'), '28000',
                 'invalid or expired token', 'an expired link is refused');

-- privileges
SELECT ok(has_function_privilege('eventshop_app', 'eventshop.login_with_magic_link(text, text, text)', 'EXECUTE')
          AND has_function_privilege('eventshop_app', 'eventshop.request_magic_link(text)', 'EXECUTE'),
          'applications may request and use magic links');
SELECT ok(NOT has_function_privilege('eventshop_app', 'eventshop._request_account_link(text, text, interval, text)', 'EXECUTE')
          AND NOT has_function_privilege('eventshop_app', 'eventshop._open_session(uuid, text[], text, text, text, jsonb)', 'EXECUTE'),
          'but not the internal functions behind them');
SELECT ok((SELECT 'panic' = ANY (SELECT split_part(c, '=', 2) FROM unnest(proconfig) c WHERE c LIKE 'log_min_error_statement=%')
           FROM pg_proc WHERE oid = 'eventshop.login_with_magic_link(text, text, text)'::regprocedure),
          'a failed call never logs its token');

SELECT * FROM finish();
