-- 50_auth_accounts: login, refresh, authenticate, sessions, passwords,
-- e-mail verification and administration, as an application calls them, and
-- the attacks on them: forged and stale claims, refresh-token replay, brute
-- force (and erasing its traces with ROLLBACK), account enumeration, SQL
-- injection, a hostile search_path, secrets leaking into events.
-- Runs after 00..40 in the same database; creates and drops its own roles.
-- Tokens with hand-made claims are signed as the superuser with
-- eventshop._jwt_sign; sealed tokens are opened with eventshop._open_sealed,
-- as the dispatcher would.
\set VERBOSITY terse
\set ON_ERROR_STOP 0
\pset format unaligned
\pset tuples_only on

SELECT plan(360);

CREATE ROLE regress_auth_app NOLOGIN IN ROLE eventshop_app;
CREATE ROLE regress_auth_ops NOLOGIN IN ROLE eventshop_admin;
CREATE SCHEMA regress_auth;
GRANT USAGE ON SCHEMA regress_auth TO PUBLIC;

-- The error a statement raises, as 'SQLSTATE: message / detail'.
CREATE FUNCTION regress_auth.error_of(sql text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_state text; v_message text; v_detail text;
BEGIN
	EXECUTE sql;
	RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
	RETURN v_state || ': ' || v_message || coalesce(' / ' || nullif(v_detail, ''), '');
END
$$;
-- Calls login and swallows its error, for failures inside transactions that roll back.
CREATE FUNCTION regress_auth.try_login(email text, password text, source text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM eventshop.login(email, password, source);
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE;
END
$$;
-- Runs _login_throttle_begin n times; one 'refused/locked_seconds/source_lock' triple per attempt.
CREATE FUNCTION regress_auth.admit(account text, source text, n integer) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	r record;
	v text[] := '{}';
BEGIN
	FOR i IN 1..n LOOP
		SELECT * INTO r FROM eventshop._login_throttle_begin(account, source);
		v := v || format('%s/%s/%s', r.wait_seconds > 0, r.locked_seconds, r.source_lock IS NOT NULL);
	END LOOP;
	RETURN array_to_string(v, ' ');
END
$$;
-- Every password and token used below; none may appear in any event.
CREATE TABLE regress_auth.secrets (kind text NOT NULL, secret text NOT NULL);
GRANT INSERT, SELECT ON regress_auth.secrets TO PUBLIC;

-- A clean slate in shared memory (earlier files and runs), and a signing key.
SELECT eventshop._login_throttle_clear() >= 0 AS throttle_cleared \gset
SELECT eventshop.flush_security_events() >= 0 AS flushed \gset
SELECT ok(eventshop.rotate_signing_keys() IS NOT NULL, 'an RS256 signing key is active');
SELECT count(*) AS outbox_start FROM eventshop.outbox \gset
-- Failed logins that checked a password last at least
-- eventshop.login_failure_min_duration (t/003_auth.pl reports the timings);
-- here the padding would only slow the suite down.
SELECT is(current_setting('eventshop.login_failure_min_duration'), '250ms', 'failed logins are padded to 250 ms by default');
SET ROLE regress_auth_app;
SELECT throws_ok($$SET eventshop.login_failure_min_duration = 0$$, '42501', NULL, 'an application cannot shorten the padding');
RESET ROLE;
SET eventshop.login_failure_min_duration = 0;

-- ---------------------------------------------------------------------------
-- Schema: columns, tables, functions
-- ---------------------------------------------------------------------------
SELECT has_column('eventshop', 'users', 'roles', 'users.roles exists');
SELECT col_default_is('eventshop', 'users', 'roles', '{customer}'::text[], 'new accounts are customers');
SELECT has_column('eventshop', 'users', 'email_verified_at', 'users.email_verified_at exists');
SELECT col_default_is('eventshop', 'users', 'valid_after', '-infinity'::timestamptz, 'valid_after starts at -infinity');
SELECT has_column('eventshop', 'users', 'blocked_at', 'users.blocked_at exists');
SELECT has_column('eventshop', 'users', 'blocked_reason', 'users.blocked_reason exists');
SELECT has_table('eventshop', 'sessions', 'table eventshop.sessions exists');
SELECT has_table('eventshop', 'refresh_tokens', 'table eventshop.refresh_tokens exists');
SELECT has_table('eventshop', 'account_tokens', 'table eventshop.account_tokens exists');
SELECT col_type_is('eventshop', 'refresh_tokens', 'token_hash', 'bytea', 'refresh tokens are stored as hashes');
SELECT col_type_is('eventshop', 'account_tokens', 'token_hash', 'bytea', 'one-time tokens are stored as hashes');
SELECT ok((SELECT count(*) > 10000 FROM eventshop.common_passwords), 'the shipped common-password list is loaded');
SELECT is((SELECT count(*) FROM eventshop.common_passwords WHERE char_length(password) < 8 OR password <> lower(password)),
          0::bigint, 'the list holds lower-case passwords of 8 characters or more only');
SELECT is(eventshop._load_common_passwords(), (SELECT count(*) FROM eventshop.common_passwords),
          '_load_common_passwords reloads the list from the installed file');
SELECT is((SELECT max_concurrent FROM eventshop.password_hash_status()), 4, 'at most 4 concurrent password hashes by default');
SELECT is((SELECT active FROM eventshop.password_hash_status()), 0, 'no hash is running between statements');
SELECT is((SELECT capacity FROM eventshop.login_throttle_status()), 10000, 'the throttle table tracks 10000 keys by default');

-- ---------------------------------------------------------------------------
-- Password policy: the shipped list
-- ---------------------------------------------------------------------------
SET ROLE regress_auth_app;
SELECT throws_ok(format('SELECT eventshop.register(%L, %L)', 'policy@example.com', p), '22023',
                 'password is too common', 'refused as common: ' || p)
FROM unnest(ARRAY['changeme', 'Trustno1', 'iloveyou1', 'sunshine1', '1qaz2wsx3edc', 'FOOTBALL1']) AS p;
SELECT lives_ok($$SELECT eventshop.register('policy@example.com', 'plum kettle orbit seven')$$,
                'a passphrase that is on no list is accepted');
RESET ROLE;

-- ---------------------------------------------------------------------------
-- login
-- ---------------------------------------------------------------------------
SET ROLE regress_auth_app;
SELECT eventshop.register('Alice.Auth@Example.com', 'alice first passphrase', 'Alice') AS alice_id \gset
SELECT eventshop.register('bob.auth@example.com', 'bob first passphrase', 'Bob') AS bob_id \gset
SELECT eventshop.register('admin.auth@example.com', 'admin first passphrase', 'Admin') AS admin_id \gset
SELECT * FROM eventshop.login('  ALICE.AUTH@example.com ', 'alice first passphrase', '192.0.2.10',
                              E'Mozilla/5.0\n(test)') \gset a1_
RESET ROLE;
INSERT INTO regress_auth.secrets VALUES
	('password', 'alice first passphrase'), ('password', 'bob first passphrase'),
	('password', 'admin first passphrase'), ('password', 'plum kettle orbit seven'),
	('token', :'a1_access_token'), ('token', :'a1_refresh_token');
UPDATE eventshop.users SET roles = '{customer,admin}' WHERE id = :'admin_id';

SELECT is(:'a1_token_type'::text, 'Bearer', 'login returns a Bearer token');
SELECT is(:'a1_expires_in'::integer, 900, 'expires_in is eventshop.access_token_ttl in seconds');
SELECT ok(:'a1_refresh_token' ~ '^[A-Za-z0-9_-]{43}$', 'the refresh token is 256 random bits in base64url');
SELECT ok(:'a1_access_token' ~ '^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$', 'the access token is a compact JWS');
SELECT is((SELECT user_id FROM eventshop.sessions WHERE id = :'a1_session_id'), :'alice_id'::uuid,
          'login opened a session for the normalised address');
SELECT is((SELECT source || '|' || user_agent FROM eventshop.sessions WHERE id = :'a1_session_id'),
          '192.0.2.10|Mozilla/5.0(test)', 'the session keeps source and user agent, control characters removed');
SELECT is((SELECT count(*) FROM eventshop.refresh_tokens
           WHERE session_id = :'a1_session_id' AND token_hash = eventshop._token_hash(:'a1_refresh_token')),
          1::bigint, 'the refresh token is stored as its SHA-256');
SELECT is((SELECT count(*) FROM eventshop.refresh_tokens WHERE position(convert_to(:'a1_refresh_token', 'UTF8') IN token_hash) > 0),
          0::bigint, 'the raw refresh token is stored nowhere');

CREATE TEMP TABLE a1_claims AS SELECT eventshop._jwt_verify(:'a1_access_token') AS c;
SELECT is((SELECT array_agg(k ORDER BY k) FROM a1_claims, jsonb_object_keys(c) AS k),
          ARRAY['aud', 'exp', 'iat', 'iss', 'jti', 'nbf', 'roles', 'sid', 'sub', 'typ'],
          'the access token carries iss, aud, sub, exp, nbf, iat, jti, sid, typ and roles');
SELECT is((SELECT c->>'iss' || ' ' || (c->>'aud') || ' ' || (c->>'typ') FROM a1_claims), 'eventshop eventshop access',
          'iss and aud come from the settings; typ is access');
SELECT is((SELECT c->>'sub' FROM a1_claims), :'alice_id', 'sub is the user id');
SELECT is((SELECT c->>'sid' FROM a1_claims), :'a1_session_id', 'sid is the session id');
SELECT is((SELECT (c->>'exp')::bigint - (c->>'iat')::bigint FROM a1_claims), 900::bigint, 'exp is iat + 900 s');
SELECT is((SELECT (c->>'nbf')::bigint - (c->>'iat')::bigint FROM a1_claims), 0::bigint, 'nbf is iat');
SELECT ok((SELECT abs((c->>'iat')::numeric - extract(epoch FROM clock_timestamp())) < 60 FROM a1_claims), 'iat is now');
SELECT is((SELECT c->'roles' FROM a1_claims), '["customer"]'::jsonb, 'roles come from the account');
SELECT ok((SELECT jsonb_typeof(c->'exp') = 'number' AND jsonb_typeof(c->'iat') = 'number' FROM a1_claims),
          'time claims are JSON numbers');

-- Failures: one message and SQLSTATE whatever went wrong.
SET ROLE regress_auth_app;
SELECT throws_ok(format('SELECT * FROM eventshop.login(%L, %L)', v.email, v.password), '28P01',
                 'invalid e-mail or password', 'login refused: ' || v.why)
FROM (VALUES
	('alice.auth@example.com', 'alice wrong passphrase', 'wrong password'),
	('nobody.auth@example.com', 'alice first passphrase', 'unknown address'),
	('alice.auth@example.com', 'ALICE FIRST PASSPHRASE', 'password in the wrong case'),
	('alice.auth@example.com', 'alice first passphrase ', 'password with a trailing space'),
	('not an address', 'alice first passphrase', 'malformed address'),
	(NULL, 'alice first passphrase', 'NULL address'),
	('alice.auth@example.com', NULL, 'NULL password'),
	('alice.auth@example.com', '', 'empty password'),
	('alice.auth@example.com', repeat('p', 5000), '5000-byte password'),
	(repeat('a', 100000) || '@example.com', 'alice first passphrase', '100 kB address'),
	('alice.auth@example.com'' OR ''1''=''1', 'x'' OR ''1''=''1', 'SQL injection in address and password'),
	('alice.auth@example.com''; DROP TABLE eventshop.users; --', 'alice first passphrase', 'SQL injection ending the statement')
) AS v(email, password, why);
SELECT throws_ok($$SELECT * FROM eventshop.login('alice.auth@example.com', 'alice first passphrase', E'10.0.0.1\n')$$,
                 '22023', 'invalid source', 'a source with control characters is refused');
SELECT lives_ok($$SELECT * FROM eventshop.login('alice.auth@example.com', 'alice first passphrase',
                                                 '''); DROP TABLE eventshop.sessions; --', 'x''); DELETE FROM eventshop.users; --')$$,
                'SQL in source and user agent is stored as data');
RESET ROLE;
SELECT is((SELECT count(*) FROM eventshop.sessions WHERE source LIKE '%DROP TABLE%'), 1::bigint,
          'the injected source was stored verbatim');
-- After the password matched, login reads the account again with a row lock
-- held until commit, so a concurrent reset, change or block either wins
-- (the login fails) or waits and then ends the new session (t/003_auth.pl).
BEGIN;
SELECT session_id AS locked_session FROM eventshop.login('alice.auth@example.com', 'alice first passphrase') \gset
SELECT is((SELECT xmax::text FROM eventshop.users WHERE id = :'alice_id'), pg_current_xact_id()::xid::text,
          'a successful login keeps the account row locked until its transaction ends');
ROLLBACK;
SELECT is(regress_auth.error_of($$SELECT eventshop.login('nobody.auth@example.com', 'some passphrase')$$),
          regress_auth.error_of($$SELECT eventshop.login('bob.auth@example.com', 'some passphrase')$$),
          'unknown address and wrong password fail identically (SQLSTATE, message, detail)');

-- Imported bcrypt hashes: verified by libxcrypt, upgraded to argon2id on login.
SELECT is(eventshop._verify_password('legacy password one', '$2a$04$abcdefghijklmnopqrstuudYGqlufIHPaQi3SKGnqXvz2AXUDV2eq'), true, 'a $2a$ bcrypt hash verifies');
SELECT is(eventshop._verify_password('legacy password one', '$2b$04$abcdefghijklmnopqrstuudYGqlufIHPaQi3SKGnqXvz2AXUDV2eq'), true, 'a $2b$ bcrypt hash verifies');
SELECT is(eventshop._verify_password('legacy password one', '$2y$04$abcdefghijklmnopqrstuudYGqlufIHPaQi3SKGnqXvz2AXUDV2eq'), true, 'a $2y$ bcrypt hash verifies');
SELECT is(eventshop._verify_password('legacy password two', '$2b$04$abcdefghijklmnopqrstuudYGqlufIHPaQi3SKGnqXvz2AXUDV2eq'), false, 'a wrong password does not verify against bcrypt');
SELECT throws_ok($$SELECT eventshop._verify_password('x', '$2x$04$abcdefghijklmnopqrstuudYGqlufIHPaQi3SKGnqXvz2AXUDV2eq')$$, '22023',
                 'stored password hash is not an argon2id or bcrypt hash', 'the broken $2x$ variant is refused');
SELECT throws_ok($$SELECT eventshop._verify_password('x', '$2b$31$abcdefghijklmnopqrstuudYGqlufIHPaQi3SKGnqXvz2AXUDV2eq')$$, '22023',
                 'stored bcrypt hash has a cost above 16', 'an absurd bcrypt cost is refused, not computed');
SELECT throws_ok($$SELECT eventshop._verify_password('x', '$argon2id$v=19$m=4194304,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g')$$,
                 '22023', 'stored argon2id hash has parameters above the supported limits', 'a 4 GiB argon2id hash is refused, not computed');
-- Stored argon2id hashes are parsed strictly and bounded before anything is
-- computed: a missing v= no longer skips the bounds, lanes are bounded (and
-- computed in one thread), and the error names no part of the hash.
SELECT throws_ok(format('SELECT eventshop._verify_password(%L, %L)', 'x', h), '22023', e, 'a stored argon2id hash is refused: ' || why)
FROM (VALUES
	('$argon2id$m=2048,t=100,p=32$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash is malformed', 'without v= (t=100, p=32)'),
	('$argon2id$v=19$m=2048,t=2,p=32$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash has parameters above the supported limits', 'p=32'),
	('$argon2id$v=19$m=2048,t=100,p=1$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash has parameters above the supported limits', 't=100'),
	('$argon2id$v=19$m=2048,t=99999999999999999999999,p=1$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash has parameters above the supported limits', 't beyond 64 bits'),
	('$argon2id$v=19$m=2048,t=0,p=1$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash has parameters above the supported limits', 't=0'),
	('$argon2id$v=16$m=2048,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash has parameters above the supported limits', 'version 16'),
	('$argon2id$v=19$m=16,t=2,p=4$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash has parameters above the supported limits', 'less than 8 KiB per lane'),
	('$argon2id$v=19$m=2048,t=2,p=1$c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash has parameters above the supported limits', 'a 4-byte salt'),
	('$argon2id$v=19$m=2048,t=-1,p=1$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash is malformed', 'a negative t'),
	('$argon2id$v=19$m=+2048,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash is malformed', 'a signed m'),
	('$argon2id$v=19$m= 2048,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash is malformed', 'a space before m'),
	('$argon2id$v=19$m=02048,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash is malformed', 'a leading zero'),
	('$argon2id$v=19$t=2,m=2048,p=1$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash is malformed', 'parameters out of order'),
	('$argon2id$v=19$m=2048,t=2$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash is malformed', 'without p='),
	('$argon2id$v=19$m=2048,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA', 'stored argon2id hash is malformed', 'without a hash'),
	('$argon2id$v=19$m=2048,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA$x', 'stored argon2id hash is malformed', 'a trailing field'),
	('$argon2id$v=19$m=2048,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash is malformed', 'padded base64'),
	('$argon2id$v=19$m=2048,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA-', 'stored argon2id hash is malformed', 'a character outside base64'),
	('$argon2id$v=19$m=2048,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdB$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'stored argon2id hash is malformed', 'stray bits in the base64')
) AS v(h, e, why);
SELECT is(position('c2FsdHNh' IN regress_auth.error_of($$SELECT eventshop._verify_password('x', '$argon2id$v=19$m=2048,t=2,p=32$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA')$$)
                   || regress_auth.error_of($$SELECT eventshop._verify_password('x', '$argon2id$m=2048$c2FsdHNhbHRzYWx0c2FsdA$AAAA')$$)),
          0, 'the errors name no part of the stored hash');
-- hashes made by libargon2 itself with 2 and 4 lanes verify, computed in one thread
SELECT is(eventshop._verify_password('lanes passphrase', '$argon2id$v=19$m=256,t=2,p=2$Zml4ZWRzYWx0X2Zvcl90IQ$nhcl21kbR0AmDsUyzVZfpLei5SdNu7/z7yvStwecVtU'),
          true, 'an argon2id hash with p=2 verifies');
SELECT is(eventshop._verify_password('lanes passphrase', '$argon2id$v=19$m=256,t=2,p=4$Zml4ZWRzYWx0X2Zvcl90IQ$mJixxVwneGUVujbVVGOxLLHsgu6GUv390rc67/794Tw'),
          true, 'an argon2id hash with p=4 verifies');
SELECT is(eventshop._verify_password('lanes passphrase!', '$argon2id$v=19$m=256,t=2,p=4$Zml4ZWRzYWx0X2Zvcl90IQ$mJixxVwneGUVujbVVGOxLLHsgu6GUv390rc67/794Tw'),
          false, 'and refuses a wrong password');
SELECT is(eventshop._password_needs_rehash('$argon2id$v=19$m=256,t=2,p=2$Zml4ZWRzYWx0X2Zvcl90IQ$nhcl21kbR0AmDsUyzVZfpLei5SdNu7/z7yvStwecVtU'),
          true, 'and is replaced at the next login');
SELECT is(eventshop._password_needs_rehash('$2b$04$abcdefghijklmnopqrstuudYGqlufIHPaQi3SKGnqXvz2AXUDV2eq'), true, 'bcrypt hashes need rehashing');
SELECT is(eventshop._password_needs_rehash((SELECT password_hash FROM eventshop.users WHERE id = :'bob_id')), false,
          'a current argon2id hash does not');
SELECT is(eventshop._dummy_verify_password('anything at all'), false, 'the dummy verification never succeeds');

SET ROLE regress_auth_app;
SELECT eventshop.register('legacy.auth@example.com', 'placeholder passphrase') AS legacy_id \gset
RESET ROLE;
UPDATE eventshop.users SET password_hash = '$2y$04$abcdefghijklmnopqrstuudYGqlufIHPaQi3SKGnqXvz2AXUDV2eq' WHERE id = :'legacy_id';
INSERT INTO regress_auth.secrets VALUES ('password', 'legacy password one');
SET ROLE regress_auth_app;
SELECT throws_ok($$SELECT * FROM eventshop.login('legacy.auth@example.com', 'legacy password two')$$, '28P01',
                 'invalid e-mail or password', 'a wrong password fails against an imported bcrypt hash');
SELECT lives_ok($$SELECT * FROM eventshop.login('legacy.auth@example.com', 'legacy password one')$$,
                'the right password logs in against an imported bcrypt hash');
RESET ROLE;
SELECT ok((SELECT password_hash LIKE '$argon2id$v=19$m=19456,t=2,p=1$%' FROM eventshop.users WHERE id = :'legacy_id'),
          'and the bcrypt hash was replaced by argon2id');
SELECT is((SELECT eventshop._verify_password('legacy password one', password_hash) FROM eventshop.users WHERE id = :'legacy_id'),
          true, 'the new hash verifies the same password');
SELECT is((SELECT (payload->'data'->>'password_rehashed')::boolean FROM eventshop.outbox
           WHERE message_key = :'legacy_id' AND event_type = 'user.logged_in'), true,
          'user.logged_in says the hash was upgraded');

-- Rising parameters: a login rehashes a hash below the current ones.
SET eventshop.password_hash_iterations = 3;
SELECT is(eventshop._password_needs_rehash((SELECT password_hash FROM eventshop.users WHERE id = :'legacy_id')), true,
          'a t=2 hash needs rehashing once the setting says t=3');
SET ROLE regress_auth_app;
SELECT lives_ok($$SELECT * FROM eventshop.login('legacy.auth@example.com', 'legacy password one')$$, 'login with t=3 configured');
RESET ROLE;
SELECT ok((SELECT password_hash LIKE '$argon2id$v=19$m=19456,t=3,p=1$%' FROM eventshop.users WHERE id = :'legacy_id'),
          'the login rehashed with t=3');
RESET eventshop.password_hash_iterations;
SELECT is(eventshop._password_needs_rehash((SELECT password_hash FROM eventshop.users WHERE id = :'legacy_id')), false,
          'a hash above the current parameters is kept');
SELECT throws_ok($$SET eventshop.password_hash_memory = '8MB'$$, '22023', NULL,
                 'the memory cost cannot go below OWASP''s 19 MiB');
SET ROLE regress_auth_app;
SELECT throws_ok($$SET eventshop.password_hash_iterations = 2$$, '42501', NULL,
                 'an application cannot change the hashing parameters');
RESET ROLE;

-- ---------------------------------------------------------------------------
-- Brute force: lockout, backoff, and no escape through ROLLBACK
-- ---------------------------------------------------------------------------
SELECT eventshop._login_throttle_clear() >= 0 AS cleared \gset
SET ROLE regress_auth_app;
SELECT eventshop.register('carol.auth@example.com', 'carol first passphrase') AS carol_id \gset
-- four failures, a success, four failures: the success reset the count
SELECT string_agg(regress_auth.try_login('carol.auth@example.com', 'wrong ' || g), ',') AS carol_1 FROM generate_series(1, 4) g \gset
SELECT regress_auth.try_login('carol.auth@example.com', 'carol first passphrase') AS carol_ok \gset
SELECT string_agg(regress_auth.try_login('carol.auth@example.com', 'wrong ' || g), ',') AS carol_2 FROM generate_series(1, 4) g \gset
SELECT lives_ok($$SELECT * FROM eventshop.login('carol.auth@example.com', 'carol first passphrase')$$,
                'a successful login resets the account''s failure count');
-- five failures inside a transaction that is rolled back
BEGIN;
SELECT string_agg(regress_auth.try_login('carol.auth@example.com', 'guess ' || g), ',') AS carol_guesses
FROM generate_series(1, 5) g \gset
ROLLBACK;
SELECT is(:'carol_guesses'::text, '28P01,28P01,28P01,28P01,28P01', 'five wrong guesses inside a transaction');
SELECT throws_ok($$SELECT * FROM eventshop.login('carol.auth@example.com', 'carol first passphrase')$$, '28000',
                 'too many failed login attempts', 'after ROLLBACK the account is locked all the same');
SELECT throws_ok($$SELECT * FROM eventshop.login('CAROL.AUTH@example.com ', 'carol first passphrase')$$, '28000',
                 'too many failed login attempts', 'however the address is spelled');
-- unknown addresses lock exactly like known ones (no enumeration by lockout)
SELECT string_agg(regress_auth.try_login('ghost.auth@example.com', 'guess ' || g), ',') AS ghost_guesses
FROM generate_series(1, 5) g \gset
SELECT is(:'ghost_guesses'::text, '28P01,28P01,28P01,28P01,28P01', 'five guesses for an unknown address');
SELECT is(regress_auth.error_of($$SELECT eventshop.login('ghost.auth@example.com', 'x')$$),
          regress_auth.error_of($$SELECT eventshop.login('carol.auth@example.com', 'x')$$),
          'a locked unknown address answers exactly like a locked account');
RESET ROLE;
SELECT is((SELECT locked FROM eventshop.login_throttle_status()), 2::bigint, 'two addresses are locked');
SELECT eventshop.flush_security_events() AS flushed_events \gset
SELECT is((SELECT count(*) FROM eventshop.outbox WHERE message_key = :'carol_id' AND event_type = 'user.login_failed'),
          13::bigint, 'every failed login of the account became a user.login_failed event, rolled back or not');
SELECT is((SELECT count(*) FROM eventshop.outbox WHERE message_key = :'carol_id' AND event_type = 'user.locked'),
          1::bigint, 'the lockout emitted user.locked once');
SELECT is((SELECT (payload->'data'->>'locked_seconds')::int FROM eventshop.outbox
           WHERE message_key = :'carol_id' AND event_type = 'user.locked'), 60, 'the first lockout lasts a minute');
SELECT is((SELECT deferred_events FROM eventshop.login_throttle_status()), 0, 'flushing emptied the queue');
-- a flush that rolls back gives the events back
SET ROLE regress_auth_app;
SELECT regress_auth.try_login('bob.auth@example.com', 'bob wrong passphrase') AS bob_fail \gset
RESET ROLE;
BEGIN;
SELECT eventshop.flush_security_events() AS flushed_in_rollback \gset
ROLLBACK;
SELECT is(:'flushed_in_rollback'::int, 1, 'a flush took the queued event');
SELECT is((SELECT deferred_events FROM eventshop.login_throttle_status()), 1, 'and got it back when its transaction rolled back');
SELECT is(eventshop.flush_security_events(), 1, 'the next flush writes it');
-- login and refresh leave queued events to the relay worker: a bogus call
-- no longer flushes (and rolls back) the whole queue
SET ROLE regress_auth_app;
SELECT regress_auth.try_login('bob.auth@example.com', 'bob wrong passphrase') AS bob_fail \gset
RESET ROLE;
SELECT deferred_events AS queued FROM eventshop.login_throttle_status() \gset
BEGIN;
SELECT n_tup_ins AS outbox_ins FROM pg_stat_xact_user_tables WHERE relid = 'eventshop.outbox'::regclass \gset
SET LOCAL ROLE regress_auth_app;
SELECT regress_auth.try_login('not-an-address', 'x') AS malformed \gset
SELECT regress_auth.error_of($$SELECT * FROM eventshop.refresh('bogus')$$) AS bogus_refresh \gset
RESET ROLE;
SELECT is((SELECT n_tup_ins FROM pg_stat_xact_user_tables WHERE relid = 'eventshop.outbox'::regclass), :'outbox_ins'::bigint,
          'a malformed login and a bogus refresh write nothing to the outbox, not even rolled back');
COMMIT;
SET ROLE regress_auth_app;
SELECT lives_ok($$SELECT * FROM eventshop.login('bob.auth@example.com', 'bob first passphrase')$$, 'bob logs in');
RESET ROLE;
SELECT is((SELECT deferred_events FROM eventshop.login_throttle_status()), :'queued'::integer,
          'and the queued events are still queued, for the relay worker');
SELECT is(eventshop.flush_security_events(), :'queued'::integer, 'flush_security_events() still writes them');
-- per source: 50 failures from one address lock that source for every account
SET ROLE regress_auth_app;
SELECT string_agg(DISTINCT regress_auth.try_login('not-an-address-' || g, 'x', '198.51.100.7'), ',') AS src_guesses
FROM generate_series(1, 50) g \gset
SELECT is(:'src_guesses'::text, '28P01', 'fifty failures from one source');
SELECT throws_ok($$SELECT * FROM eventshop.login('bob.auth@example.com', 'bob first passphrase', '198.51.100.7')$$, '28000',
                 'too many failed login attempts', 'lock the source out, even with a right password');
SELECT lives_ok($$SELECT * FROM eventshop.login('bob.auth@example.com', 'bob first passphrase', '198.51.100.8')$$,
                'while other sources may still log in');
SELECT throws_ok($$SELECT * FROM eventshop.login('not-an-address', 'x', '198.51.100.7')$$, '28000',
                 'too many failed login attempts', 'and malformed input from the locked source gets the lockout error too');
RESET ROLE;
SELECT is((SELECT tracked_sources FROM eventshop.login_throttle_status()), 2::bigint,
          'sources are tracked in a table of their own (addresses cannot be pushed out by them)');
-- One atomic step admits an attempt: refused while locked, otherwise counted
-- before the password is checked, so that concurrent guesses cannot overtake
-- the lockout (t/003_auth.pl runs 20 at once).
SELECT eventshop._login_throttle_clear() >= 0 AS cleared \gset
SELECT is(regress_auth.admit('admit.auth@example.com', NULL, 7), 'f/0/f f/0/f f/0/f f/0/f f/60/f t/0/f t/0/f',
          'the fifth attempt is admitted and starts the lockout; later ones are refused and not counted');
SELECT eventshop._login_throttle_success('admit.auth@example.com') IS NULL AS cleared \gset
SELECT is(regress_auth.admit('admit.auth@example.com', NULL, 1), 'f/0/f', 'a success clears the address');
SELECT is(regress_auth.admit(NULL, '203.0.113.99', 49), array_to_string(array_fill('f/0/f'::text, ARRAY[49]), ' '),
          '49 attempts from a source');
SELECT * FROM eventshop._login_throttle_begin(NULL, '203.0.113.99') \gset src50_
SELECT ok(:'src50_wait_seconds' = '0' AND :'src50_source_lock' <> '', 'the 50th is admitted and starts the source''s lockout');
SELECT eventshop._login_throttle_success(NULL, '203.0.113.99', :'src50_source_lock') IS NULL AS ok \gset
SELECT is(regress_auth.admit(NULL, '203.0.113.99', 2), 'f/0/t t/0/f',
          'a successful login takes back its own attempt from the source, lockout included, and no more');
SELECT eventshop._login_throttle_clear() >= 0 AS cleared \gset

-- ---------------------------------------------------------------------------
-- authenticate: the happy path and the caller's lifetime
-- ---------------------------------------------------------------------------
SET ROLE regress_auth_app;
SELECT is(eventshop.current_user_id(), NULL, 'no caller before authenticate');
SELECT throws_ok($$SELECT eventshop.list_sessions()$$, '28000', 'authentication required',
                 'functions for users refuse without authenticate');
BEGIN;
SELECT results_eq(format('SELECT user_id, roles, session_id FROM eventshop.authenticate(%L)', :'a1_access_token'),
                  format('VALUES (%L::uuid, ''{customer}''::text[], %L::uuid)', :'alice_id', :'a1_session_id'),
                  'authenticate returns user, roles and session');
SELECT is(eventshop.current_user_id(), :'alice_id'::uuid, 'current_user_id() is the caller for the rest of the transaction');
SELECT is(eventshop.current_roles(), '{customer}'::text[], 'current_roles() are the caller''s roles');
SELECT is(eventshop.current_session_id(), :'a1_session_id'::uuid, 'current_session_id() is the caller''s session');
COMMIT;
SELECT is(eventshop.current_user_id(), NULL, 'COMMIT forgets the caller');
BEGIN;
SELECT (eventshop.authenticate(:'a1_access_token')).user_id AS ignored \gset
ROLLBACK;
SELECT is(eventshop.current_user_id(), NULL, 'ROLLBACK forgets the caller');
BEGIN;
SAVEPOINT s1;
SELECT (eventshop.authenticate(:'a1_access_token')).user_id AS ignored \gset
ROLLBACK TO SAVEPOINT s1;
SELECT eventshop.current_user_id() IS NULL AS ctx_undone \gset
SAVEPOINT s2;
SELECT (eventshop.authenticate(:'a1_access_token')).user_id AS ignored \gset
RELEASE SAVEPOINT s2;
SELECT eventshop.current_user_id() = :'alice_id' AS ctx_kept \gset
COMMIT;
SELECT ok(:'ctx_undone', 'a caller established in a savepoint that is rolled back is forgotten');
SELECT ok(:'ctx_kept', 'a caller established in a released savepoint stays');
SELECT * FROM eventshop.login('bob.auth@example.com', 'bob first passphrase') \gset b1_
BEGIN;
SELECT (eventshop.authenticate(:'a1_access_token')).user_id AS ignored \gset
SAVEPOINT s3;
SELECT (eventshop.authenticate(:'b1_access_token')).user_id AS ignored \gset
SELECT eventshop.current_user_id() = :'bob_id' AS inner_is_bob \gset
ROLLBACK TO SAVEPOINT s3;
SELECT eventshop.current_user_id() = :'alice_id' AS back_to_alice \gset
COMMIT;
SELECT ok(:'inner_is_bob' AND :'back_to_alice', 'rolling back to a savepoint restores the caller established before it');
BEGIN;
SELECT (eventshop.authenticate(:'a1_access_token')).user_id AS ignored \gset
SELECT regress_auth.error_of(format('SELECT eventshop.authenticate(%L)', 'garbage')) AS failed_auth \gset
SELECT eventshop.current_user_id() = :'alice_id' AS still_alice \gset
COMMIT;
SELECT ok(:'still_alice', 'a failed authenticate caught in a savepoint leaves the previous caller');
SELECT throws_ok(format($$SELECT eventshop._set_auth_context(%L, '{admin}', %L)$$, :'alice_id', :'a1_session_id'), '42501',
                 'permission denied for function _set_auth_context', 'an application cannot set the caller itself');
SELECT throws_ok($$SELECT eventshop._require_user()$$, '42501', 'permission denied for function _require_user',
                 'nor call the internal checks');
RESET ROLE;
INSERT INTO regress_auth.secrets VALUES ('token', :'b1_access_token'), ('token', :'b1_refresh_token');
SELECT throws_ok($$SELECT eventshop._require_user()$$, '28000', 'authentication required',
                 '_require_user raises 28000 without a caller');

-- ---------------------------------------------------------------------------
-- authenticate: forged, stale and malformed tokens (signed with our key)
-- ---------------------------------------------------------------------------
CREATE FUNCTION regress_auth.token(changes jsonb, remove text[] DEFAULT '{}') RETURNS text LANGUAGE sql AS $$
	SELECT eventshop._jwt_sign((jsonb_build_object(
		'iss', 'eventshop', 'aud', 'eventshop', 'sub', u.id::text, 'sid', s.id::text, 'typ', 'access',
		'jti', 'regress', 'iat', floor(extract(epoch FROM now())) - 5, 'nbf', floor(extract(epoch FROM now())) - 5,
		'exp', floor(extract(epoch FROM now())) + 600, 'roles', '["customer"]'::jsonb) || changes) - remove)
	FROM eventshop.sessions s JOIN eventshop.users u ON u.id = s.user_id
	WHERE s.id = (SELECT id FROM eventshop.sessions WHERE user_id = (SELECT id FROM eventshop.users WHERE email = 'bob.auth@example.com')
				  AND revoked_at IS NULL ORDER BY created_at DESC LIMIT 1)
$$;
CREATE TABLE regress_auth.forged (n serial, why text, token text, detail text);
GRANT SELECT ON regress_auth.forged TO PUBLIC;
INSERT INTO regress_auth.forged (why, token, detail) VALUES
	('expired', regress_auth.token(jsonb_build_object('exp', floor(extract(epoch FROM now())) - 1)), 'The token has expired.'),
	('exp in 1970', regress_auth.token('{"exp": 1}'), 'The token has expired.'),
	('not yet valid', regress_auth.token(jsonb_build_object('nbf', floor(extract(epoch FROM now())) + 3600)), 'The token is not valid yet (nbf).'),
	('issued in the future', regress_auth.token(jsonb_build_object('iat', floor(extract(epoch FROM now())) + 3600)), 'The token was issued in the future (iat).'),
	('wrong audience', regress_auth.token('{"aud": "another-service"}'), 'The audience (aud) is missing or wrong.'),
	('audience list without ours', regress_auth.token('{"aud": ["a", "b"]}'), 'The audience (aud) is missing or wrong.'),
	('audience as a number', regress_auth.token('{"aud": 1}'), 'The audience (aud) is missing or wrong.'),
	('audience in another case', regress_auth.token('{"aud": "EVENTSHOP"}'), 'The audience (aud) is missing or wrong.'),
	('no audience', regress_auth.token('{}', '{aud}'), 'The audience (aud) is missing or wrong.'),
	('wrong issuer', regress_auth.token('{"iss": "https://evil.example"}'), 'The issuer (iss) is missing or wrong.'),
	('issuer as a number', regress_auth.token('{"iss": 7}'), 'The issuer (iss) is missing or wrong.'),
	('no issuer', regress_auth.token('{}', '{iss}'), 'The issuer (iss) is missing or wrong.'),
	('refresh token as access token', regress_auth.token('{"typ": "refresh"}'), 'The token is not an access token (typ).'),
	('typ in another case', regress_auth.token('{"typ": "Access"}'), 'The token is not an access token (typ).'),
	('no typ', regress_auth.token('{}', '{typ}'), 'The token is not an access token (typ).'),
	('exp as a string', regress_auth.token('{"exp": "99999999999"}'), 'The time claims (exp, nbf, iat) must be numbers.'),
	('exp null', regress_auth.token('{"exp": null}'), 'The time claims (exp, nbf, iat) must be numbers.'),
	('exp true', regress_auth.token('{"exp": true}'), 'The time claims (exp, nbf, iat) must be numbers.'),
	('no exp', regress_auth.token('{}', '{exp}'), 'The time claims (exp, nbf, iat) must be numbers.'),
	('no nbf', regress_auth.token('{}', '{nbf}'), 'The time claims (exp, nbf, iat) must be numbers.'),
	('nbf as an object', regress_auth.token('{"nbf": {"n": 1}}'), 'The time claims (exp, nbf, iat) must be numbers.'),
	('no iat', regress_auth.token('{}', '{iat}'), 'The time claims (exp, nbf, iat) must be numbers.'),
	('iat as a string', regress_auth.token('{"iat": "1"}'), 'The time claims (exp, nbf, iat) must be numbers.'),
	('no jti', regress_auth.token('{}', '{jti}'), 'The token id (jti) is missing.'),
	('empty jti', regress_auth.token('{"jti": ""}'), 'The token id (jti) is missing.'),
	('jti as a number', regress_auth.token('{"jti": 5}'), 'The token id (jti) is missing.'),
	('no sub', regress_auth.token('{}', '{sub}'), 'The subject (sub) is missing or not a user id.'),
	('sub not a uuid', regress_auth.token('{"sub": "admin"}'), 'The subject (sub) is missing or not a user id.'),
	('sub with SQL', regress_auth.token($${"sub": "'; DROP TABLE eventshop.users; --"}$$), 'The subject (sub) is missing or not a user id.'),
	('sub as an array', regress_auth.token(jsonb_build_object('sub', jsonb_build_array(:'bob_id'))), 'The subject (sub) is missing or not a user id.'),
	('another user''s id with this session', regress_auth.token(jsonb_build_object('sub', :'alice_id')), 'The session is unknown.'),
	('no sid', regress_auth.token('{}', '{sid}'), 'The session (sid) is missing or not a session id.'),
	('unknown session', regress_auth.token('{"sid": "00000000-0000-4000-8000-000000000000"}'), 'The session is unknown.');
SET ROLE regress_auth_app;
SELECT is(regress_auth.error_of(format('SELECT eventshop.authenticate(%L)', f.token)), '28000: invalid token / ' || f.detail,
          'authenticate refuses: ' || f.why)
FROM regress_auth.forged f ORDER BY f.n;
RESET ROLE;
SELECT regress_auth.token('{}') AS good_forged \gset
SELECT regress_auth.token('{"aud": ["other", "eventshop"]}') AS aud_list \gset
SELECT regress_auth.token('{"exp": 1e12, "iat": 1.5, "nbf": 0}') AS odd_numbers \gset
SET ROLE regress_auth_app;
SELECT lives_ok(format('SELECT eventshop.authenticate(%L)', :'good_forged'), 'the same claims, unaltered, are accepted');
SELECT lives_ok(format('SELECT eventshop.authenticate(%L)', :'aud_list'), 'an audience list that contains ours is accepted');
SELECT lives_ok(format('SELECT eventshop.authenticate(%L)', :'odd_numbers'), 'any JSON numbers are accepted for the time claims');
SELECT throws_ok(format('SELECT eventshop.authenticate(%L)', t), '28000', 'invalid token', 'authenticate refuses ' || why)
FROM (VALUES
	(NULL, 'NULL'),
	('', 'an empty string'),
	('garbage', 'garbage'),
	(:'b1_refresh_token', 'a refresh token'),
	(:'b1_access_token' || 'x', 'a token with a changed signature'),
	(split_part(:'b1_access_token', '.', 1) || '.' ||
	 translate(rtrim(encode(convert_to(jsonb_build_object('sub', :'alice_id', 'sid', :'a1_session_id')::text, 'UTF8'), 'base64'), '='), '+/', '-_')
	 || '.' || split_part(:'b1_access_token', '.', 3), 'a token with a payload swapped for another user'),
	('eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.' || split_part(:'b1_access_token', '.', 2) || '.', 'alg none'),
	(repeat('A', 20000), 'a 20 kB token'),
	(:'b1_access_token' || ''' OR ''1''=''1', 'a token with SQL appended')
) AS v(t, why);
RESET ROLE;

-- Revocation applies to the very next statement.
SELECT * FROM eventshop.login('bob.auth@example.com', 'bob first passphrase') \gset b2_
INSERT INTO regress_auth.secrets VALUES ('token', :'b2_access_token'), ('token', :'b2_refresh_token');
SET ROLE regress_auth_app;
SELECT lives_ok(format('SELECT eventshop.authenticate(%L)', :'b2_access_token'), 'bob''s second session authenticates');
RESET ROLE;
UPDATE eventshop.sessions SET revoked_at = clock_timestamp(), revoked_reason = 'revoked_by_user' WHERE id = :'b2_session_id';
SET ROLE regress_auth_app;
SELECT is(regress_auth.error_of(format('SELECT eventshop.authenticate(%L)', :'b2_access_token')),
          '28000: invalid token / The session has ended.', 'the next statement after a revocation refuses its token');
RESET ROLE;
-- revoked while a transaction already authenticated: the next check fails
SELECT * FROM eventshop.login('bob.auth@example.com', 'bob first passphrase') \gset b3_
INSERT INTO regress_auth.secrets VALUES ('token', :'b3_access_token'), ('token', :'b3_refresh_token');
BEGIN;
SET LOCAL ROLE regress_auth_app;
SELECT (eventshop.authenticate(:'b3_access_token')).user_id AS ignored \gset
RESET ROLE;
UPDATE eventshop.sessions SET revoked_at = clock_timestamp(), revoked_reason = 'revoked_by_user' WHERE id = :'b3_session_id';
SET LOCAL ROLE regress_auth_app;
SELECT regress_auth.error_of('SELECT eventshop.list_sessions()') AS after_revoke \gset
COMMIT;
SELECT is(:'after_revoke'::text, '28000: session has ended', '_require_user checks the session again at every call');
-- valid_after: tokens issued before it are refused (second granularity)
SELECT * FROM eventshop.login('bob.auth@example.com', 'bob first passphrase') \gset b4_
INSERT INTO regress_auth.secrets VALUES ('token', :'b4_access_token'), ('token', :'b4_refresh_token');
SELECT regress_auth.token(jsonb_build_object('iat', floor(extract(epoch FROM now())) - 120)) AS old_iat \gset
UPDATE eventshop.users SET valid_after = clock_timestamp() - interval '60 seconds' WHERE id = :'bob_id';
SET ROLE regress_auth_app;
SELECT is(regress_auth.error_of(format('SELECT eventshop.authenticate(%L)', :'old_iat')),
          '28000: invalid token / The token was issued before the account''s credentials changed.',
          'a token issued before valid_after is refused');
SELECT lives_ok(format('SELECT eventshop.authenticate(%L)', :'b4_access_token'), 'a token issued after valid_after is accepted');
RESET ROLE;
UPDATE eventshop.users SET valid_after = '-infinity' WHERE id = :'bob_id';

-- ---------------------------------------------------------------------------
-- refresh: rotation, replay, grace window
-- ---------------------------------------------------------------------------
SET ROLE regress_auth_app;
SELECT * FROM eventshop.refresh(:'b4_refresh_token') \gset b5_
RESET ROLE;
INSERT INTO regress_auth.secrets VALUES ('token', :'b5_access_token'), ('token', :'b5_refresh_token');
SELECT is(:'b5_session_id'::text, :'b4_session_id'::text, 'refresh keeps the session');
SELECT isnt(:'b5_refresh_token'::text, :'b4_refresh_token'::text, 'refresh returns a new refresh token');
SELECT is(:'b5_token_type' || ' ' || :'b5_expires_in', 'Bearer 900', 'and a new Bearer access token');
SELECT ok((SELECT rotated_at IS NOT NULL FROM eventshop.refresh_tokens WHERE token_hash = eventshop._token_hash(:'b4_refresh_token')),
          'the used refresh token is marked rotated');
SELECT is((SELECT generation FROM eventshop.sessions WHERE id = :'b4_session_id'), 2, 'the session is at generation 2');
SET ROLE regress_auth_app;
SELECT lives_ok(format('SELECT eventshop.authenticate(%L)', :'b5_access_token'), 'the refreshed access token authenticates');
SELECT is(regress_auth.error_of(format('SELECT * FROM eventshop.refresh(%L)', :'b4_refresh_token')),
          '28000: refresh token already used / A concurrent refresh rotated this token moments ago.',
          'the previous token within the grace window is refused');
SELECT lives_ok(format('SELECT eventshop.authenticate(%L)', :'b5_access_token'), 'without ending the session');
SELECT * FROM eventshop.refresh(:'b5_refresh_token') \gset b6_
RESET ROLE;
INSERT INTO regress_auth.secrets VALUES ('token', :'b6_access_token'), ('token', :'b6_refresh_token');
SET ROLE regress_auth_app;
SELECT is_empty(format('SELECT * FROM eventshop.refresh(%L)', :'b4_refresh_token'),
                'replaying an older token returns no row');
SELECT is(regress_auth.error_of(format('SELECT * FROM eventshop.refresh(%L)', :'b6_refresh_token')),
          '28000: invalid refresh token / The session has ended.', 'and revoked the whole chain, newest token included');
SELECT is(regress_auth.error_of(format('SELECT eventshop.authenticate(%L)', :'b6_access_token')),
          '28000: invalid token / The session has ended.', 'and its access tokens');
RESET ROLE;
SELECT is((SELECT revoked_reason FROM eventshop.sessions WHERE id = :'b4_session_id'), 'refresh_token_reuse',
          'the session records why it ended');
SELECT is((SELECT count(*) FROM eventshop.outbox WHERE event_type = 'user.session_revoked'
           AND payload->'data'->>'session_id' = :'b4_session_id' AND payload->'data'->>'reason' = 'refresh_token_reuse'),
          1::bigint, 'user.session_revoked was emitted');
-- outside the grace window the previous token is a replay too
SELECT * FROM eventshop.login('bob.auth@example.com', 'bob first passphrase') \gset b7_
SET ROLE regress_auth_app;
SELECT * FROM eventshop.refresh(:'b7_refresh_token') \gset b8_
RESET ROLE;
INSERT INTO regress_auth.secrets VALUES ('token', :'b7_access_token'), ('token', :'b7_refresh_token'),
	('token', :'b8_access_token'), ('token', :'b8_refresh_token');
UPDATE eventshop.refresh_tokens SET rotated_at = rotated_at - interval '11 seconds'
WHERE token_hash = eventshop._token_hash(:'b7_refresh_token');
SET ROLE regress_auth_app;
SELECT is_empty(format('SELECT * FROM eventshop.refresh(%L)', :'b7_refresh_token'),
                'the previous token 11 s after rotation (grace 10 s) returns no row');
RESET ROLE;
SELECT is((SELECT revoked_reason FROM eventshop.sessions WHERE id = :'b7_session_id'), 'refresh_token_reuse',
          'and revokes the session');
-- bad refresh tokens
SELECT eventshop._random_token(32) AS unknown_token \gset
SELECT * FROM eventshop.login('bob.auth@example.com', 'bob first passphrase') \gset b9_
INSERT INTO regress_auth.secrets VALUES ('token', :'b9_access_token'), ('token', :'b9_refresh_token');
UPDATE eventshop.refresh_tokens SET expires_at = clock_timestamp() - interval '1 second'
WHERE token_hash = eventshop._token_hash(:'b9_refresh_token');
SET ROLE regress_auth_app;
SELECT is(regress_auth.error_of(format('SELECT * FROM eventshop.refresh(%L)', :'b9_refresh_token')),
          '28000: invalid refresh token / The refresh token has expired.', 'an expired refresh token is refused');
SELECT throws_ok(format('SELECT * FROM eventshop.refresh(%L)', t), '28000', 'invalid refresh token', 'refresh refuses ' || why)
FROM (VALUES
	(NULL, 'NULL'), ('', 'an empty string'), ('short', 'a short string'),
	(:'unknown_token', 'an unknown token'),
	(:'b9_access_token', 'an access token'),
	(repeat('A', 10 * 1024 * 1024), 'a 10 MB string'),
	(left(:'b9_refresh_token', 42) || '''', 'a token with a quote'),
	('x'' OR ''1''=''1', 'SQL injection')
) AS v(t, why);
RESET ROLE;

-- ---------------------------------------------------------------------------
-- Sessions: list, revoke, logout
-- ---------------------------------------------------------------------------
SET ROLE regress_auth_app;
SELECT eventshop.register('dave.auth@example.com', 'dave first passphrase') AS dave_id \gset
SELECT * FROM eventshop.login('dave.auth@example.com', 'dave first passphrase', '203.0.113.1', 'phone') \gset d1_
SELECT * FROM eventshop.login('dave.auth@example.com', 'dave first passphrase', '203.0.113.2', 'laptop') \gset d2_
SELECT * FROM eventshop.login('dave.auth@example.com', 'dave first passphrase', '203.0.113.3', 'tablet') \gset d3_
BEGIN;
SELECT (eventshop.authenticate(:'d1_access_token')).user_id AS ignored \gset
SELECT results_eq($$SELECT user_agent, current FROM eventshop.list_sessions()$$,
                  $$VALUES ('tablet'::text, false), ('laptop', false), ('phone', true)$$,
                  'list_sessions shows the caller''s live sessions, newest first, marking the current one');
SELECT throws_ok(format('SELECT eventshop.revoke_session(%L)', :'a1_session_id'), 'P0002', 'no such session',
                 'another user''s session cannot be revoked');
SELECT throws_ok($$SELECT eventshop.revoke_session('00000000-0000-4000-8000-000000000000')$$, 'P0002', 'no such session',
                 'an unknown session cannot be revoked, with the same error');
SELECT lives_ok(format('SELECT eventshop.revoke_session(%L)', :'d3_session_id'), 'the caller revokes its tablet session');
SELECT throws_ok(format('SELECT eventshop.revoke_session(%L)', :'d3_session_id'), 'P0002', 'no such session',
                 'a revoked session cannot be revoked again');
SELECT is((SELECT count(*) FROM eventshop.list_sessions()), 2::bigint, 'two sessions remain');
SELECT throws_ok($$SELECT eventshop.logout('everything')$$, '22023', 'invalid logout scope', 'an unknown logout scope is refused');
SELECT throws_ok($$SELECT eventshop.logout(NULL)$$, '22023', 'invalid logout scope', 'a NULL logout scope is refused');
SELECT throws_ok($$SELECT eventshop.logout('session''; DROP TABLE eventshop.sessions; --')$$, '22023', 'invalid logout scope',
                 'SQL in the logout scope is refused');
SELECT is(eventshop.logout('others'), 1, 'logout(''others'') ends the other live session');
SELECT is((SELECT count(*) FROM eventshop.list_sessions()), 1::bigint, 'only the current session remains');
SELECT is(eventshop.logout(), 1, 'logout() ends the current session');
SELECT is(eventshop.current_user_id(), NULL, 'and forgets the caller');
COMMIT;
SELECT is(regress_auth.error_of(format('SELECT eventshop.authenticate(%L)', :'d1_access_token')),
          '28000: invalid token / The session has ended.', 'the logged-out session''s token is refused');
SELECT is(regress_auth.error_of(format('SELECT eventshop.authenticate(%L)', :'d2_access_token')),
          '28000: invalid token / The session has ended.', 'so is the token of the session ended by logout(''others'')');
SELECT * FROM eventshop.login('dave.auth@example.com', 'dave first passphrase') \gset d4_
SELECT * FROM eventshop.login('dave.auth@example.com', 'dave first passphrase') \gset d5_
BEGIN;
SELECT (eventshop.authenticate(:'d4_access_token')).user_id AS ignored \gset
SELECT is(eventshop.logout('all'), 2, 'logout(''all'') ends every session');
COMMIT;
SELECT throws_ok(format('SELECT * FROM eventshop.refresh(%L)', :'d5_refresh_token'), '28000', 'invalid refresh token',
                 'including the refresh tokens of the other sessions');
SELECT throws_ok($$SELECT eventshop.logout()$$, '28000', 'authentication required', 'logout requires authenticate');
RESET ROLE;
INSERT INTO regress_auth.secrets VALUES ('password', 'dave first passphrase'),
	('token', :'d1_access_token'), ('token', :'d1_refresh_token'), ('token', :'d2_access_token'), ('token', :'d2_refresh_token'),
	('token', :'d3_access_token'), ('token', :'d3_refresh_token'), ('token', :'d4_access_token'), ('token', :'d4_refresh_token'),
	('token', :'d5_access_token'), ('token', :'d5_refresh_token');
SELECT is((SELECT count(*) FROM eventshop.outbox WHERE message_key = :'dave_id' AND event_type = 'user.logged_out'), 3::bigint,
          'each logout emitted user.logged_out');

-- ---------------------------------------------------------------------------
-- change_password
-- ---------------------------------------------------------------------------
SET ROLE regress_auth_app;
SELECT * FROM eventshop.login('dave.auth@example.com', 'dave first passphrase') \gset d6_
SELECT * FROM eventshop.login('dave.auth@example.com', 'dave first passphrase') \gset d7_
BEGIN;
SELECT (eventshop.authenticate(:'d6_access_token')).user_id AS ignored \gset
SELECT throws_ok($$SELECT eventshop.change_password('not my passphrase', 'dave second passphrase')$$, '28P01',
                 'invalid password', 'change_password refuses a wrong current password');
SELECT throws_ok($$SELECT eventshop.change_password(NULL, 'dave second passphrase')$$, '28P01',
                 'invalid password', 'and a NULL one');
SELECT throws_ok($$SELECT eventshop.change_password('dave first passphrase', 'password1')$$, '22023',
                 'password is too common', 'a common new password is refused');
SELECT throws_ok($$SELECT eventshop.change_password('dave first passphrase', 'short')$$, '22023',
                 'password is too short', 'a short new password is refused');
SELECT throws_ok($$SELECT eventshop.change_password('dave first passphrase', 'dave first passphrase')$$, '22023',
                 'the new password must differ from the current one', 'the same password is refused');
SELECT lives_ok($$SELECT eventshop.change_password('dave first passphrase', 'dave second ''); DROP TABLE eventshop.users; --')$$,
                'change_password with the right current password (the new one holds SQL, as data)');
SELECT is((SELECT count(*) FROM eventshop.list_sessions()), 1::bigint, 'the other session ended; this one stays');
COMMIT;
SELECT throws_ok(format('SELECT * FROM eventshop.refresh(%L)', :'d7_refresh_token'), '28000', 'invalid refresh token',
                 'the other session cannot refresh any more');
SELECT throws_ok($$SELECT * FROM eventshop.login('dave.auth@example.com', 'dave first passphrase')$$, '28P01',
                 'invalid e-mail or password', 'the old password no longer logs in');
SELECT lives_ok($$SELECT * FROM eventshop.login('dave.auth@example.com', 'dave second ''); DROP TABLE eventshop.users; --')$$,
                'the new password does');
RESET ROLE;
INSERT INTO regress_auth.secrets VALUES ('password', 'dave second ''); DROP TABLE eventshop.users; --'),
	('password', 'not my passphrase'), ('token', :'d6_access_token'), ('token', :'d6_refresh_token'),
	('token', :'d7_access_token'), ('token', :'d7_refresh_token');
SELECT is((SELECT payload->'data'->>'method' || ' ' || (payload->'data'->>'sessions_revoked') FROM eventshop.outbox
           WHERE message_key = :'dave_id' AND event_type = 'password.changed'), 'change 1',
          'password.changed says how and how many sessions ended');
SELECT eventshop.flush_security_events() AS flushed \gset
SELECT is((SELECT count(*) FROM eventshop.outbox WHERE message_key = :'dave_id' AND event_type = 'user.login_failed'
           AND payload->'data'->>'reason' = 'wrong_current_password'), 2::bigint,
          'wrong current passwords are recorded as failed logins');

-- ---------------------------------------------------------------------------
-- Password reset
-- ---------------------------------------------------------------------------
SELECT count(*) AS outbox_before_reset FROM eventshop.outbox \gset
SET ROLE regress_auth_app;
SELECT is(regress_auth.error_of($$SELECT eventshop.request_password_reset('alice.auth@example.com')$$), 'no error',
          'a reset request for an existing account succeeds');
SELECT is(regress_auth.error_of($$SELECT eventshop.request_password_reset('nobody.at.all@example.com')$$), 'no error',
          'and so does one for an unknown address');
SELECT is(eventshop.request_password_reset('nobody.else@example.com')::text, eventshop.request_password_reset('Bob.Auth@Example.com')::text,
          'both return the same (nothing)');
SELECT throws_ok($$SELECT eventshop.request_password_reset('not an address')$$, '22023', 'invalid e-mail address',
                 'a malformed address is refused (that reveals nothing about accounts)');
SELECT throws_ok($$SELECT eventshop.request_password_reset('x''); DELETE FROM eventshop.users; --@example.com')$$, '22023',
                 'invalid e-mail address', 'SQL in the address is refused');
RESET ROLE;
SELECT is((SELECT count(*) FROM eventshop.outbox WHERE id > 0 AND event_type = 'password.reset_requested'
           AND message_key IN (:'alice_id', :'bob_id')), 2::bigint, 'existing accounts got password.reset_requested');
SELECT is((SELECT count(*) FROM eventshop.outbox) - :outbox_before_reset, 2::bigint, 'unknown addresses got no event');
SELECT is((SELECT count(*) FROM eventshop.account_tokens WHERE purpose = 'password_reset' AND user_id IS NULL), 0::bigint,
          'and left no decoy row behind');
BEGIN;
SELECT n_tup_ins AS tok_ins, n_tup_del AS tok_del FROM pg_stat_xact_user_tables WHERE relid = 'eventshop.account_tokens'::regclass \gset
SET LOCAL ROLE regress_auth_app;
SELECT eventshop.request_password_reset('nobody.third@example.com') AS nothing \gset
RESET ROLE;
SELECT is((SELECT (n_tup_ins - :tok_ins) || ' inserted, ' || (n_tup_del - :tok_del) || ' deleted'
           FROM pg_stat_xact_user_tables WHERE relid = 'eventshop.account_tokens'::regclass), '1 inserted, 1 deleted',
          'but did the same work: a decoy row inserted and deleted again');
SELECT ok(pg_current_xact_id_if_assigned() IS NOT NULL, 'so the request''s commit writes, as for an existing account');
COMMIT;
SELECT is((SELECT expires_at - created_at FROM eventshop.account_tokens WHERE user_id = :'alice_id' AND purpose = 'password_reset'),
          interval '30 minutes', 'reset tokens expire after eventshop.password_reset_ttl (30 min)');
SELECT eventshop._open_sealed(payload->'data'->>'sealed_token') AS alice_reset FROM eventshop.outbox
WHERE message_key = :'alice_id' AND event_type = 'password.reset_requested' \gset
INSERT INTO regress_auth.secrets VALUES ('token', :'alice_reset');
SELECT ok(:'alice_reset' ~ '^[A-Za-z0-9_-]{43}$', 'the sealed token opens to 256 random bits in base64url');
SELECT is((SELECT count(*) FROM eventshop.account_tokens WHERE token_hash = eventshop._token_hash(:'alice_reset')), 1::bigint,
          'the token is stored only as its hash');
SET ROLE regress_auth_app;
SELECT eventshop.request_password_reset('alice.auth@example.com') AS again \gset
RESET ROLE;
SELECT is((SELECT count(*) FROM eventshop.outbox WHERE message_key = :'alice_id' AND event_type = 'password.reset_requested'),
          1::bigint, 'a second request within a minute sends nothing');
SELECT * FROM eventshop.login('alice.auth@example.com', 'alice first passphrase') \gset a2_
INSERT INTO regress_auth.secrets VALUES ('token', :'a2_access_token'), ('token', :'a2_refresh_token');
SET ROLE regress_auth_app;
SELECT throws_ok(format('SELECT eventshop.reset_password(%L, %L)', t, 'alice second passphrase'), '28000',
                 'invalid or expired token', 'reset_password refuses ' || why)
FROM (VALUES (NULL, 'NULL'), ('', 'an empty token'), (:'unknown_token', 'an unknown token'),
			 (:'a2_refresh_token', 'a refresh token'), ('x'' OR ''1''=''1', 'SQL injection'),
			 (repeat('B', 100000), 'a 100 kB token')) AS v(t, why);
SELECT throws_ok(format('SELECT eventshop.reset_password(%L, %L)', :'alice_reset', 'qwertyuiop'), '22023',
                 'password is too common', 'a reset to a common password is refused');
SELECT lives_ok(format('SELECT eventshop.reset_password(%L, %L)', :'alice_reset', 'alice second passphrase'),
                'the token resets the password (it was not used up by the refused attempt)');
SELECT throws_ok(format('SELECT eventshop.reset_password(%L, %L)', :'alice_reset', 'alice third passphrase'), '28000',
                 'invalid or expired token', 'the token works once');
SELECT throws_ok($$SELECT * FROM eventshop.login('alice.auth@example.com', 'alice first passphrase')$$, '28P01',
                 'invalid e-mail or password', 'the old password is gone');
SELECT lives_ok($$SELECT * FROM eventshop.login('alice.auth@example.com', 'alice second passphrase')$$, 'the new one works');
SELECT is(regress_auth.error_of(format('SELECT eventshop.authenticate(%L)', :'a2_access_token')),
          '28000: invalid token / The session has ended.', 'every session from before the reset ended');
RESET ROLE;
INSERT INTO regress_auth.secrets VALUES ('password', 'alice second passphrase'), ('password', 'alice third passphrase');
SELECT ok((SELECT valid_after > '-infinity' AND email_verified_at IS NOT NULL FROM eventshop.users WHERE id = :'alice_id'),
          'the reset moved valid_after and verified the address');
SELECT is((SELECT payload->'data'->>'method' FROM eventshop.outbox WHERE message_key = :'alice_id' AND event_type = 'password.changed'),
          'reset', 'password.changed (reset) was emitted');
-- an expired token
UPDATE eventshop.account_tokens SET created_at = created_at - interval '2 minutes' WHERE user_id = :'bob_id';
SET ROLE regress_auth_app;
SELECT eventshop.request_password_reset('bob.auth@example.com') AS again \gset
RESET ROLE;
SELECT eventshop._open_sealed(payload->'data'->>'sealed_token') AS bob_reset FROM eventshop.outbox
WHERE message_key = :'bob_id' AND event_type = 'password.reset_requested' ORDER BY id DESC LIMIT 1 \gset
SELECT eventshop._open_sealed(payload->'data'->>'sealed_token') AS bob_reset_old FROM eventshop.outbox
WHERE message_key = :'bob_id' AND event_type = 'password.reset_requested' ORDER BY id LIMIT 1 \gset
INSERT INTO regress_auth.secrets VALUES ('token', :'bob_reset'), ('token', :'bob_reset_old');
UPDATE eventshop.account_tokens SET expires_at = clock_timestamp() - interval '1 second'
WHERE token_hash = eventshop._token_hash(:'bob_reset');
SET ROLE regress_auth_app;
SELECT throws_ok(format('SELECT eventshop.reset_password(%L, %L)', :'bob_reset', 'bob second passphrase'), '28000',
                 'invalid or expired token', 'an expired reset token is refused');
SELECT throws_ok(format('SELECT eventshop.reset_password(%L, %L)', :'bob_reset_old', 'bob second passphrase'), '28000',
                 'invalid or expired token', 'a newer request invalidated the older token');
RESET ROLE;

-- ---------------------------------------------------------------------------
-- E-mail verification
-- ---------------------------------------------------------------------------
SET ROLE regress_auth_app;
SELECT * FROM eventshop.login('bob.auth@example.com', 'bob first passphrase') \gset b10_
SELECT throws_ok($$SELECT eventshop.request_email_verification()$$, '28000', 'authentication required',
                 'request_email_verification requires authenticate');
BEGIN;
SELECT (eventshop.authenticate(:'b10_access_token')).user_id AS ignored \gset
SELECT is(eventshop.request_email_verification(), true, 'an unverified address gets a verification link');
COMMIT;
RESET ROLE;
INSERT INTO regress_auth.secrets VALUES ('token', :'b10_access_token'), ('token', :'b10_refresh_token');
SELECT eventshop._open_sealed(payload->'data'->>'sealed_token') AS bob_verify FROM eventshop.outbox
WHERE message_key = :'bob_id' AND event_type = 'email.verification_requested' \gset
INSERT INTO regress_auth.secrets VALUES ('token', :'bob_verify');
SET ROLE regress_auth_app;
SELECT throws_ok(format('SELECT eventshop.reset_password(%L, %L)', :'bob_verify', 'bob second passphrase'), '28000',
                 'invalid or expired token', 'a verification token cannot reset a password');
SELECT throws_ok(format('SELECT eventshop.verify_email(%L)', t), '28000', 'invalid or expired token', 'verify_email refuses ' || why)
FROM (VALUES (NULL, 'NULL'), ('junk', 'junk'), (:'unknown_token', 'an unknown token'),
			 ('x''; UPDATE eventshop.users SET roles = ''{admin}''; --', 'SQL injection')) AS v(t, why);
SELECT is(eventshop.verify_email(:'bob_verify'), :'bob_id'::uuid, 'verify_email returns the user id');
SELECT throws_ok(format('SELECT eventshop.verify_email(%L)', :'bob_verify'), '28000', 'invalid or expired token',
                 'the verification token works once');
BEGIN;
SELECT (eventshop.authenticate(:'b10_access_token')).user_id AS ignored \gset
SELECT is(eventshop.request_email_verification(), false, 'a verified address gets no new link');
COMMIT;
RESET ROLE;
SELECT ok((SELECT email_verified_at IS NOT NULL FROM eventshop.users WHERE id = :'bob_id'), 'the address is verified');
SELECT is((SELECT count(*) FROM eventshop.outbox WHERE message_key = :'bob_id' AND event_type = 'email.verified'), 1::bigint,
          'email.verified was emitted');
-- The caller is looked up once, by primary key: a volatile call in the WHERE
-- clause ran per row, in a sequential scan (with enable_seqscan off, only a
-- query that cannot use the index still scans the table).
BEGIN;
SET LOCAL enable_seqscan = off;
SET LOCAL ROLE regress_auth_app;
SELECT (eventshop.authenticate(:'b10_access_token')).user_id AS ignored \gset
RESET ROLE;
SELECT seq_scan AS users_seq FROM pg_stat_xact_user_tables WHERE relid = 'eventshop.users'::regclass \gset
SET LOCAL ROLE regress_auth_app;
SELECT eventshop.request_email_verification() AS again \gset
RESET ROLE;
SELECT is((SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relid = 'eventshop.users'::regclass), :'users_seq'::bigint,
          'request_email_verification finds the caller through the primary key');
ROLLBACK;

-- ---------------------------------------------------------------------------
-- Administration
-- ---------------------------------------------------------------------------
SET ROLE regress_auth_app;
SELECT * FROM eventshop.login('admin.auth@example.com', 'admin first passphrase') \gset ad_
SELECT * FROM eventshop.login('bob.auth@example.com', 'bob first passphrase') \gset b11_
SELECT throws_ok(format('SELECT eventshop.block_user(%L)', :'bob_id'), '28000', 'authentication required',
                 'block_user requires authenticate');
BEGIN;
SELECT (eventshop.authenticate(:'b11_access_token')).user_id AS ignored \gset
SELECT throws_ok(format('SELECT eventshop.block_user(%L)', :'alice_id'), '42501', 'administrator role required',
                 'a customer cannot block');
SELECT throws_ok(format('SELECT eventshop.unblock_user(%L)', :'alice_id'), '42501', 'administrator role required',
                 'nor unblock');
SELECT throws_ok(format($$SELECT eventshop.set_user_roles(%L, '{customer,admin}')$$, :'bob_id'), '42501',
                 'administrator role required', 'nor make itself an administrator');
COMMIT;
BEGIN;
SELECT (eventshop.authenticate(:'ad_access_token')).roles AS admin_roles \gset
SELECT throws_ok(format('SELECT eventshop.block_user(%L)', :'admin_id'), '22023', 'administrators cannot block their own account',
                 'an administrator cannot block itself');
SELECT throws_ok($$SELECT eventshop.block_user('00000000-0000-4000-8000-000000000000')$$, 'P0002', 'no such user',
                 'blocking an unknown user fails');
SELECT throws_ok(format('SELECT eventshop.block_user(%L, %L)', :'bob_id', E'bad\nreason'), '22023', 'invalid reason',
                 'a reason with control characters is refused');
SELECT lives_ok(format('SELECT eventshop.block_user(%L, %L)', :'bob_id', 'chargebacks''); DROP TABLE eventshop.users; --'),
                'an administrator blocks bob (the reason holds SQL, as data)');
SELECT lives_ok(format('SELECT eventshop.block_user(%L)', :'bob_id'), 'blocking again is a no-op');
COMMIT;
SELECT is(:'admin_roles'::text, '{customer,admin}', 'the administrator authenticated with its roles');
SELECT is(regress_auth.error_of(format('SELECT eventshop.authenticate(%L)', :'b11_access_token')),
          '28000: invalid token / The session has ended.', 'the blocked user''s token is refused at once');
SELECT throws_ok(format('SELECT * FROM eventshop.refresh(%L)', :'b11_refresh_token'), '28000', 'invalid refresh token',
                 'and its refresh token');
SELECT throws_ok($$SELECT * FROM eventshop.login('bob.auth@example.com', 'bob first passphrase')$$, '28000',
                 'account is blocked', 'a blocked account says so after the right password');
SELECT throws_ok($$SELECT * FROM eventshop.login('bob.auth@example.com', 'bob wrong passphrase')$$, '28P01',
                 'invalid e-mail or password', 'but not after a wrong one');
BEGIN;
SELECT (eventshop.authenticate(:'ad_access_token')).user_id AS ignored \gset
SELECT lives_ok(format('SELECT eventshop.unblock_user(%L)', :'bob_id'), 'the administrator unblocks bob');
SELECT throws_ok($$SELECT eventshop.unblock_user('00000000-0000-4000-8000-000000000000')$$, 'P0002', 'no such user',
                 'unblocking an unknown user fails');
SELECT is(eventshop.set_user_roles(:'bob_id', '{customer,admin,admin}'), '{admin,customer}'::text[],
          'set_user_roles returns the roles sorted and without duplicates');
SELECT throws_ok(format('SELECT eventshop.set_user_roles(%L, %L)', :'bob_id', r), '22023', 'invalid roles',
                 'set_user_roles refuses ' || coalesce(r, 'NULL'))
FROM unnest(ARRAY['{}', '{root}', '{customer,NULL}', '{"admin''); DROP TABLE eventshop.users; --"}', NULL]) AS r;
SELECT throws_ok(format($$SELECT eventshop.set_user_roles(%L, '{customer}')$$, :'admin_id'), '22023',
                 'administrators cannot remove their own admin role', 'an administrator cannot demote itself');
SELECT throws_ok($$SELECT eventshop.set_user_roles('00000000-0000-4000-8000-000000000000', '{customer}')$$, 'P0002',
                 'no such user', 'setting roles of an unknown user fails');
COMMIT;
SELECT lives_ok($$SELECT * FROM eventshop.login('bob.auth@example.com', 'bob first passphrase')$$, 'an unblocked account logs in');
SELECT * FROM eventshop.login('bob.auth@example.com', 'bob first passphrase') \gset b12_
RESET ROLE;
UPDATE eventshop.users SET roles = '{customer}' WHERE id = :'bob_id';
SET ROLE regress_auth_app;
BEGIN;
SELECT (eventshop.authenticate(:'b12_access_token')).user_id AS ignored \gset
SELECT throws_ok(format('SELECT eventshop.block_user(%L)', :'alice_id'), '42501', 'administrator role required',
                 'a demoted administrator''s token, issued with the admin role, is no longer enough');
COMMIT;
RESET ROLE;
INSERT INTO regress_auth.secrets VALUES ('token', :'ad_access_token'), ('token', :'ad_refresh_token'),
	('token', :'b11_access_token'), ('token', :'b11_refresh_token'), ('token', :'b12_access_token'), ('token', :'b12_refresh_token');
SELECT is((SELECT blocked_reason FROM eventshop.users WHERE id = :'bob_id'), NULL, 'unblocking cleared the reason');
SELECT results_eq(format($$SELECT event_type FROM eventshop.outbox WHERE message_key = %L
                           AND event_type IN ('user.blocked', 'user.unblocked', 'user.roles_changed') ORDER BY id$$, :'bob_id'),
                  $$VALUES ('user.blocked'::text), ('user.unblocked'), ('user.roles_changed')$$,
                  'block, unblock and role change each emitted one event');
SELECT is((SELECT count(*) FROM eventshop.outbox WHERE position('chargebacks' IN payload::text) > 0), 0::bigint,
          'the free-text block reason stays out of events');

-- ---------------------------------------------------------------------------
-- A hostile search_path changes nothing
-- ---------------------------------------------------------------------------
CREATE SCHEMA regress_evil;
GRANT USAGE ON SCHEMA regress_evil TO PUBLIC;
CREATE FUNCTION regress_evil.clock_timestamp() RETURNS timestamptz LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.clock_timestamp() called'; END$$;
CREATE FUNCTION regress_evil.now() RETURNS timestamptz LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.now() called'; END$$;
CREATE FUNCTION regress_evil.gen_random_uuid() RETURNS uuid LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.gen_random_uuid() called'; END$$;
CREATE FUNCTION regress_evil.jsonb_typeof(jsonb) RETURNS text LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.jsonb_typeof() called'; END$$;
CREATE FUNCTION regress_evil.current_setting(text) RETURNS text LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.current_setting() called'; END$$;
CREATE FUNCTION regress_evil.texteq(text, text) RETURNS boolean LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.= called'; END$$;
CREATE OPERATOR regress_evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = regress_evil.texteq);
CREATE FUNCTION regress_evil.uuideq(uuid, uuid) RETURNS boolean LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.= (uuid) called'; END$$;
CREATE OPERATOR regress_evil.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = regress_evil.uuideq);
SET ROLE regress_auth_app;
SET search_path = regress_evil, pg_catalog, public;
SELECT * FROM eventshop.login('carol.auth@example.com', 'carol first passphrase') \gset e_
SELECT * FROM eventshop.refresh(:'e_refresh_token') \gset e2_
BEGIN;
SELECT (eventshop.authenticate(:'e2_access_token')).user_id AS evil_user \gset
SELECT count(*) AS evil_sessions FROM eventshop.list_sessions() \gset
SELECT eventshop.logout() AS evil_logout \gset
COMMIT;
RESET search_path;
RESET ROLE;
INSERT INTO regress_auth.secrets VALUES ('password', 'carol first passphrase'), ('token', :'e_access_token'),
	('token', :'e_refresh_token'), ('token', :'e2_access_token'), ('token', :'e2_refresh_token');
SELECT ok(:'evil_user' = :'carol_id' AND :evil_sessions >= 1 AND :evil_logout = 1,
          'login, refresh, authenticate, list_sessions and logout work under a hostile search_path');
DROP SCHEMA regress_evil CASCADE;

-- ---------------------------------------------------------------------------
-- Housekeeping and operator functions
-- ---------------------------------------------------------------------------
SET ROLE regress_auth_app;
SELECT throws_ok($$SELECT eventshop.flush_security_events()$$, '42501', NULL, 'applications cannot flush events');
SELECT throws_ok($$SELECT eventshop.purge_expired_auth_data()$$, '42501', NULL, 'nor purge');
SELECT throws_ok($$SELECT * FROM eventshop.login_throttle_status()$$, '42501', NULL, 'nor read the throttle status');
SELECT throws_ok(format('SELECT * FROM eventshop.%I', t), '42501', format('permission denied for table %s', t),
                 'applications cannot read ' || t)
FROM unnest(ARRAY['sessions', 'refresh_tokens', 'account_tokens']) AS t;
SELECT throws_ok(format('SELECT eventshop.%s', f), '42501', NULL, 'applications cannot call ' || f)
FROM unnest(ARRAY['_login_throttle_clear()', '_login_throttle_begin(''a'', ''b'')', '_login_throttle_success(''a'')',
				  '_defer_event(''k'', ''t'', ''{}'')', '_signing_key_cache()',
				  '_claim_deferred_events()', '_dummy_verify_password(''x'')', '_clear_auth_context()',
				  '_issue_tokens(NULL, NULL, NULL, 1)']) AS f;
RESET ROLE;
SET ROLE regress_auth_ops;
SELECT lives_ok($$SELECT eventshop.flush_security_events()$$, 'operators can flush events');
SELECT lives_ok($$SELECT * FROM eventshop.login_throttle_status()$$, 'and read the throttle status');
RESET ROLE;
UPDATE eventshop.sessions SET revoked_at = clock_timestamp() - interval '2 days' WHERE revoked_at IS NOT NULL;
SELECT count(*) AS ended_sessions FROM eventshop.sessions WHERE revoked_at IS NOT NULL \gset
-- decoy rows that older versions left behind go at once, whatever their age
INSERT INTO eventshop.account_tokens (token_hash, user_id, purpose, email, created_at, expires_at)
VALUES (eventshop._token_hash(eventshop._random_token(32)), NULL, 'password_reset', NULL, clock_timestamp(), clock_timestamp() + interval '30 minutes');
BEGIN;
SET LOCAL enable_seqscan = off;
SELECT seq_scan AS tok_seq FROM pg_stat_xact_user_tables WHERE relid = 'eventshop.account_tokens'::regclass \gset
SELECT eventshop.purge_expired_auth_data() AS purged \gset
SELECT is((SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relid = 'eventshop.account_tokens'::regclass), :'tok_seq'::bigint,
          'purge_expired_auth_data finds expired tokens and decoys through indexes');
ROLLBACK;
SET ROLE regress_auth_ops;
SELECT ok(eventshop.purge_expired_auth_data() >= :ended_sessions + 1, 'purge_expired_auth_data deletes sessions that ended long ago');
RESET ROLE;
SELECT is((SELECT count(*) FROM eventshop.account_tokens WHERE user_id IS NULL), 0::bigint, 'and every decoy row');
SELECT is((SELECT count(*) FROM eventshop.sessions WHERE revoked_at IS NOT NULL), 0::bigint, 'none is left');
SELECT is((SELECT count(*) FROM eventshop.refresh_tokens t WHERE NOT EXISTS (SELECT FROM eventshop.sessions s WHERE s.id = t.session_id)),
          0::bigint, 'and their refresh tokens went with them');

-- ---------------------------------------------------------------------------
-- Private signing keys leave the backend's cache once their key is no longer
-- active (rotated or revoked, also when no key is active any more)
-- ---------------------------------------------------------------------------
BEGIN;
SELECT eventshop.rotate_signing_keys('ES256') AS es_kid1 \gset
SELECT eventshop._jwt_sign('{"regress": 1}', 'ES256') IS NOT NULL AS signed \gset
SELECT is((SELECT has_private_key FROM eventshop._signing_key_cache() WHERE kid = :'es_kid1'), true,
          'signing caches the active key''s private half');
SELECT eventshop.rotate_signing_keys('ES256') AS es_kid2 \gset
SELECT eventshop._jwt_sign('{"regress": 2}', 'ES256') IS NOT NULL AS signed \gset
SELECT results_eq(format($$SELECT kid = %L, has_private_key FROM eventshop._signing_key_cache() WHERE kid IN (%L, %L) ORDER BY 1$$,
                         :'es_kid2', :'es_kid1', :'es_kid2'),
                  $$VALUES (false, false), (true, true)$$,
                  'after a rotation only the new active key keeps its private half');
SELECT eventshop.revoke_signing_key(:'es_kid2') IS NULL AS revoked \gset
SELECT throws_ok($$SELECT eventshop._jwt_sign('{"regress": 3}', 'ES256')$$, '55000', NULL,
                 'with its active key revoked, ES256 cannot sign');
SELECT is((SELECT count(*) FROM eventshop._signing_key_cache() WHERE alg = 'ES256' AND has_private_key), 0::bigint,
          'and no ES256 private key stays cached');
SELECT is((SELECT count(*) FROM eventshop._signing_key_cache() WHERE alg = 'RS256' AND has_private_key), 1::bigint,
          'while the active RS256 key keeps its own');
ROLLBACK;

-- ---------------------------------------------------------------------------
-- No secret and no address in any event
-- ---------------------------------------------------------------------------
SELECT eventshop.flush_security_events() AS flushed \gset
INSERT INTO regress_auth.secrets SELECT 'password hash', password_hash FROM eventshop.users;
INSERT INTO regress_auth.secrets SELECT 'password hash part', split_part(password_hash, '$', 6) FROM eventshop.users
	WHERE password_hash LIKE '$argon2id$%';
INSERT INTO regress_auth.secrets SELECT 'token hash', encode(token_hash, 'hex') FROM eventshop.refresh_tokens
	UNION ALL SELECT 'token hash', encode(token_hash, 'base64') FROM eventshop.refresh_tokens
	UNION ALL SELECT 'token hash', encode(token_hash, 'hex') FROM eventshop.account_tokens;
INSERT INTO regress_auth.secrets SELECT 'e-mail address', email FROM eventshop.users;
INSERT INTO regress_auth.secrets SELECT 'local part', split_part(email, '@', 1) FROM eventshop.users
	WHERE char_length(split_part(email, '@', 1)) >= 5;
SELECT ok((SELECT count(*) > 100 FROM regress_auth.secrets), 'over a hundred secrets were collected');
SELECT is_empty($$SELECT s.kind, o.event_type FROM eventshop.outbox o JOIN regress_auth.secrets s
                  ON position(lower(s.secret) IN lower(o.payload::text)) > 0$$,
                'no outbox payload contains a password, token, hash, address or local part');
SELECT is_empty($$SELECT o.event_type FROM eventshop.outbox o
                  WHERE o.topic = 'auth.events' AND (o.payload::text LIKE '%@%' OR o.payload::text LIKE '%eyJ%'
                                                     OR o.payload::text LIKE '%argon2%' OR o.payload::text LIKE '%$2_$%')$$,
                'no auth event contains an @, a JWT, or a password hash');
SELECT is_empty($$SELECT o.event_type FROM eventshop.outbox o WHERE o.topic = 'auth.events'
                  AND o.payload::jsonb->'data' ? 'email_hash' AND (o.payload->'data'->>'email_hash') !~ '^[A-Za-z0-9_-]{22}$'$$,
                'every email_hash is a 22-character keyed hash');
SELECT set_eq($$SELECT DISTINCT event_type FROM eventshop.outbox WHERE id > 0 AND topic = 'auth.events'$$,
              ARRAY['user.registered', 'user.logged_in', 'user.login_failed', 'user.locked', 'user.logged_out',
                    'user.session_revoked', 'password.changed', 'password.reset_requested',
                    'email.verification_requested', 'email.verified', 'user.blocked', 'user.unblocked',
                    'user.roles_changed'],
              'these are the auth events, and all of them occurred');
SELECT is_empty($$SELECT event_type FROM eventshop.outbox WHERE topic = 'auth.events' AND message_key !~
                  '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'$$,
                'every auth event is keyed by a user id');

SELECT * FROM finish();

DROP SCHEMA regress_auth CASCADE;
DROP ROLE regress_auth_app;
DROP ROLE regress_auth_ops;
