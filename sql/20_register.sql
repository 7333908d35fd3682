-- 20_register: eventshop.register as an application calls it. A good call
-- stores a normalised account with an argon2id hash and emits exactly one
-- CloudEvent without PII; every bad call fails with the documented SQLSTATE
-- and writes nothing; a hostile search_path changes nothing.
\set VERBOSITY terse
\set ON_ERROR_STOP 0
\pset format unaligned
\pset tuples_only on

SELECT plan(127);

-- ---------------------------------------------------------------------------
-- A successful registration
-- ---------------------------------------------------------------------------
SET ROLE regress_app;
SELECT eventshop.register('  Alice.Example@EXAMPLE.Com ', 'correct horse battery staple', 'Alice Example') AS alice_id \gset
RESET ROLE;

SELECT ok(:'alice_id' ~ '^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$',
          'register returns a version 4 uuid');
SELECT is((SELECT count(*) FROM eventshop.users WHERE id = :'alice_id'), 1::bigint,
          'the returned id is the new account''s id');
SELECT is((SELECT email FROM eventshop.users WHERE id = :'alice_id'), 'alice.example@example.com',
          'the e-mail address is stored trimmed and in lower case');
SELECT is((SELECT display_name FROM eventshop.users WHERE id = :'alice_id'), 'Alice Example',
          'the display name is stored as given');
SELECT is((SELECT status FROM eventshop.users WHERE id = :'alice_id'), 'active',
          'a new account is active');
SELECT ok((SELECT password_hash LIKE '$argon2id$v=19$m=19456,t=2,p=1$%' FROM eventshop.users WHERE id = :'alice_id'),
          'the password is hashed with argon2id, m=19456, t=2, p=1');
SELECT ok((SELECT password_hash ~ '^\$argon2id\$v=19\$m=19456,t=2,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}$'
           FROM eventshop.users WHERE id = :'alice_id'),
          'the hash is a PHC string with a 16-byte salt and a 32-byte hash');
SELECT is((SELECT eventshop._verify_password('correct horse battery staple', password_hash)
           FROM eventshop.users WHERE id = :'alice_id'), true,
          '_verify_password accepts the right password');
SELECT is((SELECT eventshop._verify_password('correct horse battery stapler', password_hash)
           FROM eventshop.users WHERE id = :'alice_id'), false,
          '_verify_password refuses a wrong password');
SELECT is((SELECT eventshop._verify_password('Correct horse battery staple', password_hash)
           FROM eventshop.users WHERE id = :'alice_id'), false,
          '_verify_password is case-sensitive');
SELECT is((SELECT eventshop._verify_password('correct horse battery staple ', password_hash)
           FROM eventshop.users WHERE id = :'alice_id'), false,
          'passwords are not trimmed');
SELECT throws_ok($$SELECT eventshop._verify_password('x', 'plaintext')$$, '22023',
                 'stored password hash is not an argon2id or bcrypt hash', '_verify_password rejects a hash that is neither argon2id nor bcrypt');
SELECT throws_ok($$SELECT eventshop._verify_password('x', '$argon2id$garbage')$$, '22023', NULL,
                 '_verify_password rejects a malformed argon2id hash with an error, not a crash');
SELECT throws_ok($$SELECT eventshop._hash_password(repeat('x', 5000))$$, '22023',
                 'password is too long', '_hash_password refuses more than 4096 bytes');
SELECT throws_ok($$SELECT eventshop._verify_password(repeat('x', 5000), '$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g')$$,
                 '22023', 'password is too long', '_verify_password refuses more than 4096 bytes');

-- The event, read as the superuser.
CREATE TEMP VIEW alice_event AS SELECT * FROM eventshop.outbox WHERE message_key = :'alice_id';

SELECT is((SELECT count(*) FROM alice_event), 1::bigint, 'exactly one outbox row for the new account');
SELECT is((SELECT topic FROM alice_event), 'auth.events', 'the event goes to auth.events');
SELECT is((SELECT event_type FROM alice_event), 'user.registered', 'event_type is user.registered');
SELECT is((SELECT backlog FROM eventshop.outbox_status), (SELECT count(*) FROM eventshop.outbox),
          'the event has not been published yet');
SELECT is((SELECT json_typeof(payload) FROM alice_event), 'object', 'the payload is a JSON object');
SELECT is((SELECT array_agg(k ORDER BY k COLLATE "C") FROM alice_event, json_object_keys(payload) AS k),
          ARRAY['data', 'datacontenttype', 'id', 'source', 'specversion', 'subject', 'time', 'type'],
          'the payload has exactly the CloudEvents attributes');
SELECT is((SELECT payload->>'specversion' FROM alice_event), '1.0', 'specversion is 1.0');
SELECT is((SELECT json_typeof(payload->'specversion') FROM alice_event), 'string', 'specversion is a string');
SELECT ok((SELECT (payload->>'id')::uuid = event_id FROM alice_event), 'id is the event_id column');
SELECT is((SELECT payload->>'source' FROM alice_event), '/eventshop/auth', 'source names the auth module');
SELECT is((SELECT payload->>'type' FROM alice_event), 'user.registered', 'type is user.registered');
SELECT ok((SELECT payload->>'time' ~ '^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$' FROM alice_event),
          'time is an RFC 3339 timestamp in UTC');
SELECT ok((SELECT abs(extract(epoch FROM (payload->>'time')::timestamptz - created_at)) < 60 FROM alice_event),
          'time is when the event was written');
SELECT is((SELECT payload->>'subject' FROM alice_event), :'alice_id', 'subject is the user id');
SELECT is((SELECT payload->>'datacontenttype' FROM alice_event), 'application/json', 'datacontenttype is application/json');
SELECT is((SELECT payload->'data'->>'user_id' FROM alice_event), :'alice_id', 'data.user_id is the user id');
SELECT is((SELECT payload->'data' FROM alice_event)::jsonb,
          jsonb_build_object('user_id', :'alice_id', 'email_hash', eventshop._pii_hash('alice.example@example.com')),
          'data carries only the user id and the keyed hash of the address');
SELECT is((SELECT position('alice.example@example.com' IN lower(payload::text)) FROM alice_event), 0,
          'the payload does not contain the e-mail address');
SELECT is((SELECT position('alice.example' IN lower(payload::text)) FROM alice_event), 0,
          'the payload does not contain the local part of the address');
SELECT is((SELECT position('correct horse battery staple' IN payload::text) FROM alice_event), 0,
          'the payload does not contain the password');
SELECT is((SELECT count(*) FROM alice_event a, eventshop.users u
           WHERE u.id = :'alice_id'
             AND (position(u.password_hash IN a.payload::text) > 0
                  OR position(split_part(u.password_hash, '$', 6) IN a.payload::text) > 0
                  OR a.payload::text LIKE '%argon2%')), 0::bigint,
          'the payload does not contain the password hash');

-- ---------------------------------------------------------------------------
-- Other good input
-- ---------------------------------------------------------------------------
SET ROLE regress_app;
SELECT eventshop.register('Bob.Builder@Example.com', 'correct horse battery staple', NULL) AS bob_id \gset
SELECT eventshop.register('carol@example.com', 'correct horse battery staple') AS carol_id \gset
SELECT eventshop.register('dave@example.com', 'another good passphrase', '  Dave  ') AS dave_id \gset
SELECT lives_ok($$SELECT eventshop.register('o''brien+shop@mail.example.co.uk', 'correct horse battery staple')$$,
                'an address with an apostrophe and a plus tag is accepted');
SELECT lives_ok(format($$SELECT eventshop.register(%L, 'correct horse battery staple')$$,
                       repeat('l', 64) || '@example.com'),
                'a 64-character local part is accepted');
SELECT lives_ok(format($$SELECT eventshop.register(%L, 'correct horse battery staple')$$,
                       repeat('m', 64) || '@' || repeat('a', 63) || '.' || repeat('b', 63) || '.' || repeat('c', 57) || '.com'),
                'a 254-character address is accepted');
SELECT lives_ok($$SELECT eventshop.register('eight@example.com', 'abcdefgh')$$,
                'an 8-character password is accepted');
SELECT lives_ok($$SELECT eventshop.register('kilobyte@example.com', repeat('y', 1024))$$,
                'a 1024-byte password is accepted');
SELECT lives_ok(format($$SELECT eventshop.register('longname@example.com', 'correct horse battery staple', %L)$$,
                       repeat('n', 100)),
                'a 100-character display name is accepted');
SELECT lives_ok($$SELECT eventshop.register('zoe@example.com', 'correct horse battery staple', 'Zoë Ünïcødé 🚀')$$,
                'a non-ASCII display name is accepted');
RESET ROLE;

SELECT is((SELECT display_name FROM eventshop.users WHERE id = :'bob_id'), 'bob.builder',
          'a NULL display name defaults to the local part of the normalised address');
SELECT is((SELECT display_name FROM eventshop.users WHERE id = :'carol_id'), 'carol',
          'an omitted display name defaults to the local part');
SELECT is((SELECT display_name FROM eventshop.users WHERE id = :'dave_id'), 'Dave',
          'the display name is trimmed');
SELECT is((SELECT display_name FROM eventshop.users WHERE email = 'zoe@example.com'), 'Zoë Ünïcødé 🚀',
          'a non-ASCII display name is stored unchanged');
SELECT is((SELECT email FROM eventshop.users WHERE email LIKE 'o''brien%'), 'o''brien+shop@mail.example.co.uk',
          'an apostrophe in the address is stored as data, not SQL');
SELECT is((SELECT eventshop._verify_password(repeat('y', 1024), password_hash)
           FROM eventshop.users WHERE email = 'kilobyte@example.com'), true,
          'a 1024-byte password verifies');
SELECT is((SELECT count(DISTINCT password_hash) FROM eventshop.users
           WHERE password_hash IS NOT NULL AND id IN (:'alice_id', :'bob_id', :'carol_id')), 3::bigint,
          'the same password hashes differently for each account (random salt)');
SELECT is((SELECT count(*) FROM eventshop.outbox o JOIN eventshop.users u ON o.message_key = u.id::text
           WHERE o.event_type = 'user.registered'),
          (SELECT count(*) FROM eventshop.users),
          'every account has its user.registered event');
SELECT is((SELECT count(*) FROM eventshop.outbox), (SELECT count(*) FROM eventshop.users),
          'and no account has more than one');

-- ---------------------------------------------------------------------------
-- Bad input. Each call fails with its SQLSTATE and message and writes
-- nothing; the counts are compared once at the end.
-- ---------------------------------------------------------------------------
SELECT count(*) AS users_before FROM eventshop.users \gset
SELECT count(*) AS outbox_before FROM eventshop.outbox \gset

SET ROLE regress_app;

-- Missing e-mail address
SELECT throws_ok($$SELECT eventshop.register(NULL, 'correct horse battery staple')$$, '22004',
                 'e-mail address is required', 'a NULL e-mail address is refused');
SELECT throws_ok($$SELECT eventshop.register('', 'correct horse battery staple')$$, '22004',
                 'e-mail address is required', 'an empty e-mail address is refused');
SELECT throws_ok($$SELECT eventshop.register('   ', 'correct horse battery staple')$$, '22004',
                 'e-mail address is required', 'a blank e-mail address is refused');

-- Malformed e-mail addresses; the non-ASCII ones are built from UTF-8 bytes
-- so that the file itself stays plain ASCII there.
SELECT throws_ok(format('SELECT eventshop.register(%L, %L)', v.email, 'correct horse battery staple'),
                 '22023', 'invalid e-mail address', 'malformed e-mail address refused: ' || v.why)
FROM (VALUES
	('no-at-sign.example.com', 'no @'),
	('two@@example.com', 'two @ in a row'),
	('a@b@example.com', 'two @'),
	('john smith@example.com', 'space in the local part'),
	('john@exam ple.com', 'space in the domain'),
	('.leading@example.com', 'leading dot'),
	('trailing.@example.com', 'dot before the @'),
	('consecutive..dots@example.com', 'consecutive dots in the local part'),
	('user@example..com', 'consecutive dots in the domain'),
	('user@.example.com', 'domain starting with a dot'),
	('user@example.com.', 'trailing dot'),
	('user@example', 'domain without a dot'),
	('user@-example.com', 'label starting with a hyphen'),
	('user@example-.com', 'label ending with a hyphen'),
	('user@exa_mple.com', 'underscore in the domain'),
	('@example.com', 'empty local part'),
	('user@', 'empty domain'),
	('user@[127.0.0.1]', 'address literal'),
	('<user@example.com>', 'angle brackets'),
	('User Name <user@example.com>', 'display-name form'),
	(repeat('a', 65) || '@example.com', '65-character local part'),
	(repeat('m', 64) || '@' || repeat('a', 63) || '.' || repeat('b', 63) || '.' || repeat('c', 58) || '.com',
	 '255-character address'),
	(repeat('a', 64) || '@' || repeat('b.', 5000) || 'com', '10 kB address'),
	('user@' || repeat('a', 64) || '.com', '64-character domain label'),
	(E'victim@example.com\nBcc: attacker@example.net', 'newline (header injection)'),
	(E'user@example.com\r\n', 'trailing CR LF'),
	(E'\tuser@example.com', 'leading tab'),
	('user@example.com; DROP TABLE eventshop.users', 'trailing SQL'),
	('x''); DROP TABLE eventshop.users; --@a.com', 'SQL injection in the local part'),
	('user@example.com''--', 'quote and comment in the domain'),
	('" or 1=1 --"@example.com', 'quoted local part'),
	(convert_from('\xd0b0646d696e406578616d706c652e636f6d'::bytea, 'UTF8'), 'Cyrillic a in the local part'),
	(convert_from('\x61646d696e40d0b578616d706c652e636f6d'::bytea, 'UTF8'), 'Cyrillic e in the domain'),
	(convert_from('\x61646d696eefbca06578616d706c652e636f6d'::bytea, 'UTF8'), 'fullwidth @'),
	(convert_from('\x6164e2808b6d696e406578616d706c652e636f6d'::bytea, 'UTF8'), 'zero-width space'),
	(convert_from('\xe280ae6d6f632e656c706d617865406e696d6461'::bytea, 'UTF8'), 'right-to-left override'),
	(convert_from('\xc2a061646d696e406578616d706c652e636f6d'::bytea, 'UTF8'), 'leading no-break space'),
	(convert_from('\x61646d696e406578616cc3a96d706c652e636f6d'::bytea, 'UTF8'), 'accented letter in the domain'),
	(convert_from('\x61646d696e40657861cc816d706c652e636f6d'::bytea, 'UTF8'), 'combining accent in the domain'),
	(convert_from('\xc4b06e666f406578616d706c652e636f6d'::bytea, 'UTF8'), 'dotted capital I (lower() would map it to i)'),
	(convert_from('\x61646d696e40e284aa6578616d706c652e636f6d'::bytea, 'UTF8'), 'Kelvin sign (lower() would map it to k)')
) AS v(email, why);

-- Missing, short, long and common passwords
SELECT throws_ok($$SELECT eventshop.register('pw.test@example.com', NULL)$$, '22004',
                 'password is required', 'a NULL password is refused');
SELECT throws_ok($$SELECT eventshop.register('pw.test@example.com', '')$$, '22004',
                 'password is required', 'an empty password is refused');
SELECT throws_ok($$SELECT eventshop.register('pw.test@example.com', 'abcdefg')$$, '22023',
                 'password is too short', 'a 7-character password is refused');
SELECT throws_ok($$SELECT eventshop.register('pw.test@example.com', '       ')$$, '22023',
                 'password is too short', 'a password of 7 spaces is refused');
SELECT throws_ok($$SELECT eventshop.register('pw.test@example.com', 'Password1')$$, '22023',
                 'password is too common', 'Password1 is too common');
SELECT throws_ok($$SELECT eventshop.register('pw.test@example.com', 'PASSWORD1')$$, '22023',
                 'password is too common', 'the common-password check ignores case');
SELECT throws_ok($$SELECT eventshop.register('pw.test@example.com', 'qwertyuiop')$$, '22023',
                 'password is too common', 'qwertyuiop is too common');
SELECT throws_ok($$SELECT eventshop.register('pw.test@example.com', repeat('x', 1025))$$, '22023',
                 'password is too long', 'a 1025-byte password is refused');
SELECT throws_ok($$SELECT eventshop.register('pw.test@example.com', repeat(convert_from('\xc3a9'::bytea, 'UTF8'), 513))$$,
                 '22023', 'password is too long', 'the password limit counts bytes, not characters');
SELECT throws_ok($$SELECT eventshop.register('pw.test@example.com', repeat('x', 10 * 1024 * 1024))$$, '22023',
                 'password is too long', 'a 10 MB password is refused with a clear error');

-- Bad display names
SELECT throws_ok(format('SELECT eventshop.register(%L, %L, %L)', 'dn.test@example.com',
                        'correct horse battery staple', v.name),
                 '22023', 'invalid display name', 'display name refused: ' || v.why)
FROM (VALUES
	('', 'empty'),
	('   ', 'blank'),
	(repeat('n', 101), '101 characters'),
	(repeat('n', 100000), '100000 characters'),
	(E'Bob\nSmith', 'newline'),
	(E'Bob\tSmith', 'tab'),
	(E'Bob\rSmith', 'carriage return'),
	(E'Bob\x07', 'bell'),
	(E'\x1b[31mBob', 'ANSI escape sequence'),
	(E'Bob\x7f', 'DEL')
) AS v(name, why);

-- Duplicates, however they are spelled
SELECT throws_ok($$SELECT eventshop.register('alice.example@example.com', 'another good passphrase')$$, '23505',
                 'an account with this e-mail address already exists', 'the same address cannot register twice');
SELECT throws_ok($$SELECT eventshop.register('ALICE.EXAMPLE@EXAMPLE.COM', 'another good passphrase')$$, '23505',
                 'an account with this e-mail address already exists', 'nor in upper case');
SELECT throws_ok($$SELECT eventshop.register('  alice.example@example.com  ', 'another good passphrase')$$, '23505',
                 'an account with this e-mail address already exists', 'nor with surrounding spaces');
SELECT throws_ok($$SELECT eventshop.register('Bob.Builder@EXAMPLE.com', 'correct horse battery staple', 'Bob')$$, '23505',
                 'an account with this e-mail address already exists', 'nor in mixed case with a display name');
-- The same outside a subtransaction: the failed statement leaves nothing.
SELECT eventshop.register('ALICE.example@example.com', 'another good passphrase');
SELECT eventshop.register('no-at-sign.example.com', 'another good passphrase');

RESET ROLE;

SELECT is((SELECT count(*) FROM eventshop.users), :users_before::bigint, 'no rejected call wrote an account');
SELECT is((SELECT count(*) FROM eventshop.outbox), :outbox_before::bigint, 'no rejected call wrote an event');
SELECT is((SELECT count(*) FROM eventshop.users WHERE email LIKE '%test@example.com'), 0::bigint,
          'none of the test addresses was stored');
SELECT has_table('eventshop', 'users', 'eventshop.users survived the injection attempts');

-- ---------------------------------------------------------------------------
-- A hostile search_path: functions and operators that shadow pg_catalog's
-- raise an error when called. The trap works on unqualified code; register
-- does not fall into it because it pins its search_path.
-- ---------------------------------------------------------------------------
CREATE SCHEMA regress_evil;
GRANT USAGE ON SCHEMA regress_evil TO PUBLIC;
CREATE FUNCTION regress_evil.lower(text) RETURNS text LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.lower() called'; END$$;
CREATE FUNCTION regress_evil.btrim(text) RETURNS text LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.btrim() called'; END$$;
CREATE FUNCTION regress_evil.split_part(text, text, integer) RETURNS text LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.split_part() called'; END$$;
CREATE FUNCTION regress_evil.char_length(text) RETURNS integer LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.char_length() called'; END$$;
CREATE FUNCTION regress_evil.octet_length(text) RETURNS integer LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.octet_length() called'; END$$;
CREATE FUNCTION regress_evil.gen_random_uuid() RETURNS uuid LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.gen_random_uuid() called'; END$$;
CREATE FUNCTION regress_evil.now() RETURNS timestamptz LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.now() called'; END$$;
CREATE FUNCTION regress_evil.clock_timestamp() RETURNS timestamptz LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.clock_timestamp() called'; END$$;
CREATE FUNCTION regress_evil.texteq(text, text) RETURNS boolean LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.= called'; END$$;
CREATE OPERATOR regress_evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = regress_evil.texteq);
CREATE FUNCTION regress_evil.textregexeq(text, text) RETURNS boolean LANGUAGE plpgsql
	AS $$BEGIN RAISE EXCEPTION 'regress_evil.~ called'; END$$;
CREATE OPERATOR regress_evil.~ (LEFTARG = text, RIGHTARG = text, FUNCTION = regress_evil.textregexeq);

SET ROLE regress_app;
SET search_path = regress_evil, pg_catalog, public;
-- the trap is armed: unqualified code would call the shadowing objects
SELECT lower('Armed');
SELECT gen_random_uuid();
SELECT 'a'::text = 'a'::text;
-- register is not fooled
SELECT eventshop.register('  Evil.Path@Example.COM', 'correct horse battery staple', 'Evil Path') IS NOT NULL
	AS registered_under_hostile_search_path;
RESET search_path;
RESET ROLE;

SELECT is((SELECT display_name FROM eventshop.users WHERE email = 'evil.path@example.com'), 'Evil Path',
          'register works under a hostile search_path and normalises with the real lower()');
SELECT is((SELECT count(*) FROM eventshop.outbox o JOIN eventshop.users u ON o.message_key = u.id::text
           WHERE u.email = 'evil.path@example.com'), 1::bigint,
          'and emits its event');
SELECT is((SELECT eventshop._verify_password('correct horse battery staple', password_hash)
           FROM eventshop.users WHERE email = 'evil.path@example.com'), true,
          'and stores a valid hash');

DROP SCHEMA regress_evil CASCADE;

SELECT * FROM finish();
