-- 40_signing_keys_jwt: signing keys (life cycle, sealing at rest, JWKS),
-- _jwt_sign/_jwt_verify (round trips for RS256, ES256 and EdDSA, and attack
-- inputs, each of which must fail with 28000 "invalid token" without
-- harming the backend), key-file errors, and the secret helpers (_pii_hash,
-- _random_token, _token_hash, _seal/_open_sealed). Nothing random reaches
-- the output: kids and tokens stay in psql variables.
-- t/002_jwt_independent.pl checks the same tokens with PyJWT.
\set VERBOSITY terse
\set ON_ERROR_STOP 0
\pset format unaligned
\pset tuples_only on

CREATE ROLE regress_jwt_app NOLOGIN IN ROLE eventshop_app;
CREATE ROLE regress_jwt_admin NOLOGIN IN ROLE eventshop_admin;

-- Helpers: base64url, a JWS segment from JSON text, HMAC-SHA256 over
-- sha256(), the RSA public key PEM of a JWK, JOSE -> DER for ECDSA, and the
-- error a verification raises as 'SQLSTATE message: detail'.
CREATE FUNCTION pg_temp.b64u(b bytea) RETURNS text LANGUAGE sql IMMUTABLE
	AS $$SELECT translate(encode(b, 'base64'), E'+/=\n', '-_')$$;
CREATE FUNCTION pg_temp.b64u_decode(t text) RETURNS bytea LANGUAGE sql IMMUTABLE
	AS $$SELECT decode(rpad(translate(t, '-_', '+/'), (length(t) + 3) / 4 * 4, '='), 'base64')$$;
CREATE FUNCTION pg_temp.seg(json text) RETURNS text LANGUAGE sql IMMUTABLE
	AS $$SELECT pg_temp.b64u(convert_to(json, 'UTF8'))$$;
CREATE FUNCTION pg_temp.hmac256(k bytea, m bytea) RETURNS bytea LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
	ipad bytea;
	opad bytea;
BEGIN
	IF length(k) > 64 THEN
		k := sha256(k);
	END IF;
	k := k || decode(repeat('00', 64 - length(k)), 'hex');
	ipad := k;
	opad := k;
	FOR i IN 0..63 LOOP
		ipad := set_byte(ipad, i, get_byte(k, i) # 54);
		opad := set_byte(opad, i, get_byte(k, i) # 92);
	END LOOP;
	RETURN sha256(opad || sha256(ipad || m));
END
$$;
CREATE FUNCTION pg_temp.rsa_pem(jwk jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
	SELECT '-----BEGIN PUBLIC KEY-----' || E'\n'
		|| regexp_replace(translate(encode(
			   decode('30820122300d06092a864886f70d01010105000382010f003082010a0282010100', 'hex')
			   || pg_temp.b64u_decode(jwk->>'n') || decode('0203010001', 'hex'), 'base64'), E'\n', ''),
			   '(.{64})', E'\\1\n', 'g')
		|| E'\n-----END PUBLIC KEY-----\n'
$$;
CREATE FUNCTION pg_temp.der_int(b bytea) RETURNS bytea LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
	WHILE length(b) > 1 AND get_byte(b, 0) = 0 AND get_byte(b, 1) < 128 LOOP
		b := substring(b FROM 2);
	END LOOP;
	IF get_byte(b, 0) >= 128 THEN
		b := '\x00'::bytea || b;
	END IF;
	RETURN '\x02'::bytea || set_byte('\x00'::bytea, 0, length(b)) || b;
END
$$;
CREATE FUNCTION pg_temp.jose_to_der(sig bytea) RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
	SELECT '\x30'::bytea || set_byte('\x00'::bytea, 0, length(body)) || body
	FROM (SELECT pg_temp.der_int(substring(sig FROM 1 FOR 32)) || pg_temp.der_int(substring(sig FROM 33 FOR 32)) AS body) s
$$;
CREATE FUNCTION pg_temp.verify_error(token text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	st text;
	msg text;
	det text;
BEGIN
	PERFORM eventshop._jwt_verify(token);
	RETURN 'accepted';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL;
	RETURN st || ' ' || msg || ': ' || det;
END
$$;
CREATE FUNCTION pg_temp.error_of(sql text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	st text;
	msg text;
BEGIN
	EXECUTE sql;
	RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
	RETURN st || ' ' || msg;
END
$$;

SELECT pg_postmaster_start_time() AS started \gset

SELECT plan(205);

-- ---------------------------------------------------------------------------
-- Objects, settings and privileges
-- ---------------------------------------------------------------------------
SELECT has_table('eventshop', 'signing_keys', 'table eventshop.signing_keys exists');
SELECT col_is_pk('eventshop', 'signing_keys', 'kid', 'kid is the primary key of signing_keys');
SELECT has_index('eventshop', 'signing_keys', 'signing_keys_one_active_per_alg',
                 'a partial unique index allows one active key per algorithm');
SELECT ok((SELECT 'eventshop.signing_keys'::regclass = ANY (extconfig) FROM pg_extension WHERE extname = 'eventshop'),
          'pg_dump keeps the rows of eventshop.signing_keys');
SELECT is_definer('eventshop', f, ARRAY['text'], format('eventshop.%s is SECURITY DEFINER', f))
FROM unnest(ARRAY['create_signing_key', 'rotate_signing_keys', 'revoke_signing_key']) AS f;
SELECT is_definer('eventshop', 'jwks', ARRAY[]::name[], 'eventshop.jwks is SECURITY DEFINER');
SELECT is((SELECT pg_get_function_result('eventshop.jwks()'::regprocedure)), 'jsonb', 'jwks returns jsonb');
SELECT is(pg_get_function_identity_arguments('eventshop._jwt_sign(jsonb, text)'::regprocedure),
          'claims jsonb, alg text', '_jwt_sign(claims jsonb, alg text)');
SELECT is((SELECT provolatile::text FROM pg_proc WHERE oid = 'eventshop._pii_hash(text)'::regprocedure), 's',
          '_pii_hash is STABLE, not IMMUTABLE: the key can change');

SELECT results_eq($$SELECT current_setting(n) FROM unnest(ARRAY['eventshop.jwt_issuer', 'eventshop.jwt_audience',
                      'eventshop.access_token_ttl', 'eventshop.refresh_token_ttl', 'eventshop.jwt_default_alg',
                      'eventshop.refresh_reuse_grace']) WITH ORDINALITY AS s(n, i) ORDER BY i$$,
                  ARRAY['eventshop', 'eventshop', '15min', '30d', 'RS256', '10s'],
                  'JWT settings have the documented defaults');
SELECT results_eq($$SELECT name::text, context::text FROM pg_settings
                    WHERE name IN ('eventshop.key_file', 'eventshop.seal_public_key', 'eventshop.seal_private_key_file',
                                   'eventshop.jwt_default_alg', 'eventshop.access_token_ttl')
                    ORDER BY name COLLATE "C"$$,
                  $$VALUES ('eventshop.access_token_ttl', 'sighup'), ('eventshop.jwt_default_alg', 'sighup'),
                           ('eventshop.key_file', 'sighup'), ('eventshop.seal_private_key_file', 'sighup'),
                           ('eventshop.seal_public_key', 'sighup')$$,
                  'key and JWT settings are reloadable');

SET ROLE regress_jwt_app;
SELECT lives_ok('SELECT eventshop.jwks()', 'eventshop_app can read the JWKS');
SELECT throws_ok(format('SELECT %s', f), '42501', NULL, format('eventshop_app cannot call %s', f))
FROM unnest(ARRAY['eventshop.create_signing_key()', 'eventshop.rotate_signing_keys()',
                  $$eventshop.revoke_signing_key('x')$$, $$eventshop._jwt_sign('{}')$$,
                  $$eventshop._jwt_verify('x')$$, $$eventshop._generate_signing_key('EdDSA')$$,
                  $$eventshop._pii_hash('x')$$, 'eventshop._random_token()', $$eventshop._token_hash('x')$$,
                  $$eventshop._seal('x')$$, $$eventshop._open_sealed('x')$$]) AS f;
SELECT throws_ok('SELECT * FROM eventshop.signing_keys', '42501', 'permission denied for table signing_keys',
                 'eventshop_app cannot read signing_keys');
SELECT throws_ok('SHOW eventshop.key_file', '42501', NULL, 'eventshop_app cannot see eventshop.key_file');
SELECT throws_ok('SHOW eventshop.seal_private_key_file', '42501', NULL,
                 'eventshop_app cannot see eventshop.seal_private_key_file');
RESET ROLE;
SET ROLE regress_jwt_admin;
SELECT throws_ok('SELECT private_key_sealed FROM eventshop.signing_keys', '42501',
                 'permission denied for table signing_keys', 'eventshop_admin cannot read sealed private keys');
SELECT throws_ok($$SELECT eventshop._jwt_sign('{}')$$, '42501', NULL, 'eventshop_admin cannot sign tokens directly');
RESET ROLE;

-- ---------------------------------------------------------------------------
-- Life cycle: standby -> active -> retired -> revoked
-- ---------------------------------------------------------------------------
SELECT throws_ok($$SELECT eventshop._jwt_sign('{"sub":"x"}')$$, '55000', 'there is no active RS256 signing key',
                 'signing without an active key fails with 55000');
SELECT throws_ok(format('SELECT eventshop.create_signing_key(%L)', a), '22023', 'unsupported signing algorithm',
                 format('create_signing_key refuses %s', a))
FROM unnest(ARRAY['rs256', 'HS256', 'none', 'EDDSA', '']) AS a;

SET ROLE regress_jwt_admin;
SELECT eventshop.create_signing_key('RS256') AS rs_standby \gset
RESET ROLE;
SELECT ok(:'rs_standby' ~ '^[A-Za-z0-9_-]{43}$', 'an admin can create a key; kid is 43 base64url characters');
SELECT is((SELECT state FROM eventshop.signing_keys WHERE kid = :'rs_standby'), 'standby', 'a new key is standby');
SELECT throws_ok($$SELECT eventshop._jwt_sign('{"sub":"x"}', 'RS256')$$, '55000', NULL,
                 'a standby key does not sign');

SET ROLE regress_jwt_admin;
SELECT eventshop.rotate_signing_keys('RS256') AS rs1 \gset
RESET ROLE;
SELECT is(:'rs1'::text, :'rs_standby', 'rotation promotes the standby key');
SELECT results_eq($$SELECT state, count(*) FROM eventshop.signing_keys WHERE alg = 'RS256' GROUP BY state ORDER BY state$$,
                  $$VALUES ('active'::text, 1::bigint), ('standby', 1)$$,
                  'and creates a fresh standby key in the same call');
SELECT ok((SELECT activated_at IS NOT NULL FROM eventshop.signing_keys WHERE kid = :'rs1'), 'activated_at is set');

SELECT eventshop._jwt_sign('{"sub":"rs1-token"}') AS tok_rs1 \gset
SELECT eventshop.rotate_signing_keys() AS rs2 \gset
SELECT results_eq($$SELECT state, count(*) FROM eventshop.signing_keys WHERE alg = 'RS256' GROUP BY state ORDER BY state$$,
                  $$VALUES ('active'::text, 1::bigint), ('retired', 1), ('standby', 1)$$,
                  'rotate_signing_keys() works on the default algorithm: active -> retired, standby -> active');
SELECT is((SELECT state FROM eventshop.signing_keys WHERE kid = :'rs1'), 'retired', 'the previous active key is retired');
SELECT ok((SELECT retired_at IS NOT NULL AND private_key_sealed IS NULL FROM eventshop.signing_keys WHERE kid = :'rs1'),
          'a retired key has retired_at and no private key any more');
SELECT throws_ok($$UPDATE eventshop.signing_keys SET state = 'active', activated_at = now()
                   WHERE alg = 'RS256' AND state = 'standby'$$, '23505', NULL,
                 'a second active key for one algorithm is impossible');
SELECT throws_ok($$UPDATE eventshop.signing_keys SET private_key_sealed = NULL WHERE kid = '$$ || :'rs2' || $$'$$,
                 '23514', NULL, 'an active key must keep its sealed private key');

SELECT eventshop.rotate_signing_keys('ES256') AS es1 \gset
SELECT eventshop.rotate_signing_keys('EdDSA') AS ed1 \gset
SELECT results_eq($$SELECT alg, count(*) FILTER (WHERE state = 'active'), count(*) FILTER (WHERE state = 'standby')
                    FROM eventshop.signing_keys GROUP BY alg ORDER BY alg$$,
                  $$VALUES ('ES256'::text, 1::bigint, 1::bigint), ('EdDSA', 1, 1), ('RS256', 1, 1)$$,
                  'each algorithm has exactly one active and one standby key');

-- private keys at rest
SELECT is_empty($$SELECT kid FROM eventshop.signing_keys
                  WHERE private_key_sealed IS NOT NULL
                    AND (get_byte(private_key_sealed, 0) <> 1
                         OR position('\x2d2d2d2d2d424547494e'::bytea IN private_key_sealed) > 0
                         OR position('\x020100300d06092a864886f70d010101'::bytea IN private_key_sealed) > 0
                         OR position('\x0201003013'::bytea IN private_key_sealed) > 0
                         OR position('\x020100300506032b6570'::bytea IN private_key_sealed) > 0)$$,
                'private keys are stored sealed: version byte, no PEM, no PKCS#8 structure in the clear');
SELECT is((SELECT count(DISTINCT substring(private_key_sealed FROM 2 FOR 12)) FROM eventshop.signing_keys
           WHERE private_key_sealed IS NOT NULL),
          (SELECT count(*) FROM eventshop.signing_keys WHERE private_key_sealed IS NOT NULL),
          'every sealed key has its own nonce');
SELECT results_eq($$SELECT alg, min(length(private_key_sealed)) BETWEEN lo AND hi
                    FROM eventshop.signing_keys
                    JOIN (VALUES ('RS256', 1180, 1260), ('ES256', 160, 170), ('EdDSA', 70, 80)) v(a, lo, hi) ON a = alg
                    WHERE private_key_sealed IS NOT NULL GROUP BY alg, lo, hi ORDER BY alg$$,
                  $$VALUES ('ES256'::text, true), ('EdDSA', true), ('RS256', true)$$,
                  'sealed keys have the size of PKCS#8 DER plus 29 bytes of nonce, tag and version');

-- ---------------------------------------------------------------------------
-- JWKS
-- ---------------------------------------------------------------------------
SELECT eventshop.jwks() AS jwks \gset
SELECT is(jsonb_typeof(:'jwks'::jsonb -> 'keys'), 'array', 'jwks() is {"keys": [...]}');
SELECT is((SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(:'jwks'::jsonb) k), ARRAY['keys'],
          'and has no other member');
SELECT set_eq(format($$SELECT j->>'kid' FROM jsonb_array_elements(%L::jsonb -> 'keys') j$$, :'jwks'),
              $$SELECT kid FROM eventshop.signing_keys WHERE state IN ('active', 'standby', 'retired')$$,
              'it lists the active, standby and recently retired keys');
SELECT is_empty(format($$SELECT j FROM jsonb_array_elements(%L::jsonb -> 'keys') j
                         WHERE j->>'use' IS DISTINCT FROM 'sig' OR j->>'kid' IS NULL
                            OR NOT (j->>'alg' = 'RS256' AND j->>'kty' = 'RSA' AND j ? 'n' AND j ? 'e'
                                    AND (SELECT count(*) FROM jsonb_object_keys(j)) = 6
                                 OR j->>'alg' = 'ES256' AND j->>'kty' = 'EC' AND j->>'crv' = 'P-256' AND j ? 'x' AND j ? 'y'
                                    AND (SELECT count(*) FROM jsonb_object_keys(j)) = 7
                                 OR j->>'alg' = 'EdDSA' AND j->>'kty' = 'OKP' AND j->>'crv' = 'Ed25519' AND j ? 'x'
                                    AND (SELECT count(*) FROM jsonb_object_keys(j)) = 6)$$, :'jwks'),
                'every JWK has kid, kty, alg, use "sig" and exactly the public members of its type');
SELECT is_empty(format($$SELECT k FROM jsonb_array_elements(%L::jsonb -> 'keys') j, jsonb_object_keys(j) k
                         WHERE k IN ('d', 'p', 'q', 'dp', 'dq', 'qi', 'oth', 'k')$$, :'jwks'),
                'no JWK has a private member (d, p, q, dp, dq, qi, oth, k)');
SELECT is_empty(format($$SELECT j FROM jsonb_array_elements(%L::jsonb -> 'keys') j
                         WHERE j->>'kid' <> pg_temp.b64u(sha256(convert_to(CASE j->>'kty'
                           WHEN 'RSA' THEN format('{"e":"%%s","kty":"RSA","n":"%%s"}', j->>'e', j->>'n')
                           WHEN 'EC' THEN format('{"crv":"%%s","kty":"EC","x":"%%s","y":"%%s"}', j->>'crv', j->>'x', j->>'y')
                           ELSE format('{"crv":"%%s","kty":"OKP","x":"%%s"}', j->>'crv', j->>'x') END, 'UTF8')))$$, :'jwks'),
                'every kid is the RFC 7638 thumbprint of its key');
SELECT is((SELECT count(*) FROM jsonb_array_elements(:'jwks'::jsonb -> 'keys') j
           WHERE j->>'kty' = 'RSA' AND length(pg_temp.b64u_decode(j->>'n')) = 256 AND j->>'e' = 'AQAB'), 3::bigint,
          'RSA keys are 2048-bit with e = 65537');
SELECT is((SELECT count(*) FROM jsonb_array_elements(:'jwks'::jsonb -> 'keys') j
           WHERE j->>'kty' <> 'RSA' AND length(pg_temp.b64u_decode(j->>'x')) = 32
             AND coalesce(length(pg_temp.b64u_decode(j->>'y')), 32) = 32), 4::bigint,
          'EC and OKP coordinates are 32 bytes');
SELECT is((eventshop.jwks()->'keys'->0->>'kid'), :'es1', 'active keys come first, by algorithm');

-- ---------------------------------------------------------------------------
-- Sign -> verify round trips
-- ---------------------------------------------------------------------------
SELECT $${"sub":"00000000-0000-4000-8000-000000000001","iss":"eventshop","aud":"eventshop","iat":1700000000,"exp":4102444800,"roles":["customer","admin"],"n":{"pi":3.14159,"neg":-1,"big":12345678901234567890,"t":true,"f":false,"z":null},"s":"quote \" backslash \\ tab \t nl \n é ☃"}$$ AS claims \gset
SELECT eventshop._jwt_sign(:'claims', 'RS256') AS tok_rs \gset
SELECT eventshop._jwt_sign(:'claims', 'ES256') AS tok_es \gset
SELECT eventshop._jwt_sign(:'claims', 'EdDSA') AS tok_ed \gset
SELECT is(eventshop._jwt_verify(:'tok_rs'), :'claims'::jsonb, 'RS256: sign -> verify returns the claims');
SELECT is(eventshop._jwt_verify(:'tok_es'), :'claims'::jsonb, 'ES256: sign -> verify returns the claims');
SELECT is(eventshop._jwt_verify(:'tok_ed'), :'claims'::jsonb, 'EdDSA: sign -> verify returns the claims');
SELECT is(eventshop._jwt_verify(eventshop._jwt_sign('{}', 'EdDSA')), '{}'::jsonb, 'an empty claim set round-trips');
SELECT is(convert_from(pg_temp.b64u_decode(split_part(:'tok_rs', '.', 1)), 'UTF8'),
          format('{"alg":"RS256","typ":"JWT","kid":"%s"}', :'rs2'), 'the RS256 header is {"alg","typ":"JWT","kid"} with the active kid');
SELECT is(convert_from(pg_temp.b64u_decode(split_part(:'tok_es', '.', 1)), 'UTF8'),
          format('{"alg":"ES256","typ":"JWT","kid":"%s"}', :'es1'), 'the ES256 header too');
SELECT is(convert_from(pg_temp.b64u_decode(split_part(:'tok_ed', '.', 1)), 'UTF8'),
          format('{"alg":"EdDSA","typ":"JWT","kid":"%s"}', :'ed1'), 'the EdDSA header too');
SELECT is(convert_from(pg_temp.b64u_decode(split_part(:'tok_ed', '.', 2)), 'UTF8')::jsonb, :'claims'::jsonb,
          'the payload segment is the claims as JSON');
SELECT ok(convert_from(pg_temp.b64u_decode(split_part(:'tok_ed', '.', 2)), 'UTF8') NOT LIKE '%": %',
              'the payload is compact JSON (no space after colons)');
SELECT results_eq(format($$SELECT length(pg_temp.b64u_decode(split_part(t, '.', 3)))
                           FROM unnest(ARRAY[%L, %L, %L]) WITH ORDINALITY u(t, i) ORDER BY i$$, :'tok_rs', :'tok_es', :'tok_ed'),
                  ARRAY[256, 64, 64],
                  'signatures are 256 bytes (RS256) and 64 bytes (ES256 as JOSE r||s, EdDSA)');
SELECT ok(:'tok_rs' ~ '^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$', 'tokens are three base64url segments without padding');
SELECT isnt(eventshop._jwt_sign('{"a":1}', 'ES256'), eventshop._jwt_sign('{"a":1}', 'ES256'),
            'ECDSA signatures are randomised');
SELECT is(eventshop._jwt_sign('{"a":1}', 'EdDSA'), eventshop._jwt_sign('{"a":1}', 'EdDSA'),
          'EdDSA signatures are deterministic');
SELECT throws_ok($$SELECT eventshop._jwt_sign('[1, 2]')$$, '22023', 'claims must be a JSON object', 'array claims are refused');
SELECT throws_ok($$SELECT eventshop._jwt_sign('"x"')$$, '22023', 'claims must be a JSON object', 'scalar claims are refused');
SELECT throws_ok($$SELECT eventshop._jwt_sign(NULL)$$, '22004', 'claims are required', 'NULL claims are refused');
SELECT throws_ok($$SELECT eventshop._jwt_sign('{}', 'HS256')$$, '22023', 'unsupported signing algorithm',
                 '_jwt_sign refuses HS256');
SELECT throws_ok($$SELECT eventshop._jwt_sign('{}', 'none')$$, '22023', 'unsupported signing algorithm',
                 '_jwt_sign refuses none');
SELECT throws_ok(format($$SELECT eventshop._jwt_sign('{"x":"%s"}', 'EdDSA')$$, repeat('x', 6000)), '22023',
                 'claims are too large for a token', 'claims that would make a token over 8192 bytes are refused');
SELECT is(eventshop._jwt_verify(:'tok_rs1'), '{"sub": "rs1-token"}'::jsonb,
          'a token of a key retired less than access_token_ttl ago still verifies');

-- ---------------------------------------------------------------------------
-- Attacks: every one fails with 28000 "invalid token" and a precise detail
-- ---------------------------------------------------------------------------
SELECT split_part(:'tok_rs', '.', 2) AS p_rs, split_part(:'tok_rs', '.', 3) AS s_rs,
       split_part(:'tok_es', '.', 2) AS p_es, split_part(:'tok_es', '.', 3) AS s_es,
       split_part(:'tok_ed', '.', 3) AS s_ed,
       (SELECT kid FROM eventshop.signing_keys WHERE alg = 'RS256' AND state = 'standby') AS rs_standby2,
       pg_temp.rsa_pem((SELECT public_jwk FROM eventshop.signing_keys WHERE kid = :'rs2')) AS rs_pem \gset
SELECT ok(:'rs_pem' LIKE E'-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA%-----END PUBLIC KEY-----\n',
          'the forger has our RSA public key as PEM');
SELECT is(encode(pg_temp.hmac256(convert_to('Jefe', 'UTF8'), convert_to('what do ya want for nothing?', 'UTF8')), 'hex'),
          '5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843',
          'the forger''s HMAC-SHA256 is right (RFC 4231 test case 2)');

SELECT is(pg_temp.verify_error(t), '28000 invalid token: ' || d, m)
FROM (VALUES
	(pg_temp.seg(format('{"alg":"none","kid":"%s"}', :'rs2')) || '.' || :'p_rs' || '.',
	 'A token segment is empty.', 'alg none with an empty signature'),
	(pg_temp.seg(format('{"alg":"none","kid":"%s"}', :'rs2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The algorithm is not one of RS256, ES256 and EdDSA.', 'alg none'),
	(pg_temp.seg(format('{"alg":"None","kid":"%s"}', :'rs2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The algorithm is not one of RS256, ES256 and EdDSA.', 'alg None'),
	(pg_temp.seg(format('{"alg":"NONE","kid":"%s"}', :'rs2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The algorithm is not one of RS256, ES256 and EdDSA.', 'alg NONE'),
	(pg_temp.seg(format('{"alg":"nOnE","kid":"%s"}', :'rs2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The algorithm is not one of RS256, ES256 and EdDSA.', 'alg nOnE'),
	(pg_temp.seg('{"alg":"none"}') || '.' || :'p_rs' || '.' || :'s_rs',
	 'The algorithm is not one of RS256, ES256 and EdDSA.', 'alg none without kid'),
	(pg_temp.seg(format('{"alg":"rs256","typ":"JWT","kid":"%s"}', :'rs2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The algorithm is not one of RS256, ES256 and EdDSA.', 'alg rs256 (case variant)'),
	(pg_temp.seg(format('{"alg":"eddsa","typ":"JWT","kid":"%s"}', :'ed1')) || '.' || :'p_rs' || '.' || :'s_ed',
	 'The algorithm is not one of RS256, ES256 and EdDSA.', 'alg eddsa (case variant)'),
	(pg_temp.seg(format('{"alg":"HS256","typ":"JWT","kid":"%s"}', :'rs2')) || '.' || :'p_rs' || '.' ||
	 pg_temp.b64u(pg_temp.hmac256(convert_to(:'rs_pem', 'UTF8'),
	   convert_to(pg_temp.seg(format('{"alg":"HS256","typ":"JWT","kid":"%s"}', :'rs2')) || '.' || :'p_rs', 'UTF8'))),
	 'The algorithm is not one of RS256, ES256 and EdDSA.', 'HS256 signed with our RSA public key PEM as HMAC key'),
	(pg_temp.seg('{"alg":"HS256","typ":"JWT"}') || '.' || :'p_rs' || '.' ||
	 pg_temp.b64u(pg_temp.hmac256(convert_to(:'rs_pem', 'UTF8'),
	   convert_to(pg_temp.seg('{"alg":"HS256","typ":"JWT"}') || '.' || :'p_rs', 'UTF8'))),
	 'The algorithm is not one of RS256, ES256 and EdDSA.', 'HS256 with the public key PEM and no kid'),
	(pg_temp.seg(format('{"alg":"ES256","typ":"JWT","kid":"%s"}', :'rs2')) || '.' || :'p_es' || '.' || :'s_es',
	 'The algorithm does not match the signing key''s.', 'ES256 header on an RSA kid'),
	(pg_temp.seg(format('{"alg":"EdDSA","typ":"JWT","kid":"%s"}', :'rs2')) || '.' || :'p_rs' || '.' || :'s_ed',
	 'The algorithm does not match the signing key''s.', 'EdDSA header on an RSA kid'),
	(pg_temp.seg(format('{"alg":"RS256","typ":"JWT","kid":"%s"}', :'es1')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The algorithm does not match the signing key''s.', 'RS256 header on an EC kid'),
	(pg_temp.seg('{"alg":"RS256","typ":"JWT","kid":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}') || '.' || :'p_rs' || '.' || :'s_rs',
	 'The signing key is unknown.', 'unknown kid'),
	(pg_temp.seg('{"alg":"RS256","typ":"JWT","kid":"1"}') || '.' || :'p_rs' || '.' || :'s_rs',
	 'The kid is malformed.', 'malformed kid'),
	(pg_temp.seg('{"alg":"RS256","typ":"JWT","kid":"../../etc/passwd\u0000AAAAAAAAAAAAAAAAAAAAAAAAAA"}') || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header is not valid JSON.', 'a kid with \u0000'),
	(pg_temp.seg(format('{"alg":"RS256","typ":"JWT","kid":"%s"}', :'rs_standby2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The signing key is not active yet.', 'standby kid'),
	(pg_temp.seg('{"alg":"RS256","typ":"JWT"}') || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header has no kid.', 'missing kid'),
	(pg_temp.seg(format('{"alg":"RS256","typ":"JWT","kid":%s}', '1')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header may hold only the string members alg, kid and typ.', 'a numeric kid'),
	(pg_temp.seg(format('{"alg":"none","alg":"RS256","typ":"JWT","kid":"%s"}', :'rs2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header has a duplicate key.', 'duplicate alg, none first'),
	(pg_temp.seg(format('{"alg":"RS256","alg":"none","typ":"JWT","kid":"%s"}', :'rs2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header has a duplicate key.', 'duplicate alg, none last'),
	(pg_temp.seg(format('{"alg":"RS256","typ":"JWT","kid":"%s","kid":"%s"}', :'rs_standby2', :'rs2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header has a duplicate key.', 'duplicate kid'),
	(pg_temp.seg(format('{"alg":"RS256","typ":"JWT","kid":"%s"}', :'rs2')) || '.' || pg_temp.seg('{"sub":"a","sub":"admin"}') || '.' || :'s_rs',
	 'The signature is not valid.', 'duplicate claim keys (with a valid signature: t/002)'),
	(split_part(:'tok_rs', '.', 1) || '.' || :'p_rs',
	 'A token has exactly three segments.', 'two segments'),
	(:'tok_rs' || '.' || :'s_rs',
	 'A token has exactly three segments.', 'four segments'),
	(:'tok_rs' || '==',
	 'The token has characters outside the base64url alphabet and ''.''.', 'padding ='),
	(overlay(:'tok_rs' PLACING '+' FROM 5 FOR 1),
	 'The token has characters outside the base64url alphabet and ''.''.', 'base64 + and / instead of base64url'),
	(' ' || :'tok_rs',
	 'The token has characters outside the base64url alphabet and ''.''.', 'leading space'),
	(:'tok_rs' || E'\n',
	 'The token has characters outside the base64url alphabet and ''.''.', 'trailing newline'),
	('Bearer ' || :'tok_rs',
	 'The token has characters outside the base64url alphabet and ''.''.', 'a Bearer prefix'),
	(split_part(:'tok_rs', '.', 1) || 'é.' || :'p_rs' || '.' || :'s_rs',
	 'The token has characters outside the base64url alphabet and ''.''.', 'non-ASCII characters'),
	('.' || :'p_rs' || '.' || :'s_rs', 'A token segment is empty.', 'empty header'),
	(split_part(:'tok_rs', '.', 1) || '..' || :'s_rs', 'A token segment is empty.', 'empty payload'),
	('..', 'A token segment is empty.', 'only dots'),
	('', 'A token has exactly three segments.', 'empty string'),
	(NULL, 'The token is missing.', 'NULL'),
	(repeat('A', 16 * 1024 * 1024), 'The token is longer than 8192 bytes.', 'a 16 MB token'),
	(repeat('A', 16 * 1024 * 1024) || '.' || repeat('A', 16) || '.' || repeat('A', 16),
	 'The token is longer than 8192 bytes.', 'a 16 MB header segment'),
	(split_part(:'tok_rs', '.', 1) || '.' || pg_temp.seg(format('{"x":"%s"}', repeat('x', 6420))) || '.' || :'s_rs',
	 'The token is longer than 8192 bytes.', 'a 9000-byte token'),
	(pg_temp.seg('[]') || '.' || :'p_rs' || '.' || :'s_rs', 'The header is not a JSON object.', 'header is an array'),
	(pg_temp.seg('"RS256"') || '.' || :'p_rs' || '.' || :'s_rs', 'The header is not a JSON object.', 'header is a string'),
	(pg_temp.seg('42') || '.' || :'p_rs' || '.' || :'s_rs', 'The header is not a JSON object.', 'header is a number'),
	(pg_temp.seg('null') || '.' || :'p_rs' || '.' || :'s_rs', 'The header is not a JSON object.', 'header is null'),
	(pg_temp.seg(format('{"alg":"RS256","kid":"%s"} x', :'rs2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header is not valid JSON.', 'trailing garbage after the header object'),
	(pg_temp.seg(format('{''alg'':''RS256'',''kid'':''%s''}', :'rs2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header is not valid JSON.', 'single-quoted JSON'),
	(pg_temp.b64u('\xfffe7b7d'::bytea) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header is not valid UTF-8.', 'non-UTF-8 bytes in the header'),
	(pg_temp.b64u('\xefbbbf7b7d'::bytea) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header is not valid JSON.', 'a byte order mark before the header'),
	(pg_temp.seg(format('{"alg":"RS256","kid":"%s","x":%s}', :'rs2', repeat('[', 40) || repeat(']', 40))) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header nests deeper than 32 levels.', 'deeply nested header'),
	(pg_temp.seg(format('{"alg":"RS256","kid":"%s","x":1e999999}', :'rs2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header has a number out of range.', 'a number numeric cannot hold'),
	(pg_temp.seg(format('{"alg":"RS256","typ":"JWT","kid":"%s","jwk":{"kty":"oct","k":"AAAA"}}', :'rs2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header may hold only the string members alg, kid and typ.', 'an embedded jwk header'),
	(pg_temp.seg(format('{"alg":"RS256","typ":"JWT","kid":"%s","jku":"https://evil.example/jwks"}', :'rs2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header may hold only the string members alg, kid and typ.', 'a jku header'),
	(pg_temp.seg(format('{"alg":"RS256","typ":"JWT","kid":"%s","crit":["b64"],"b64":false}', :'rs2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header may hold only the string members alg, kid and typ.', 'crit / b64:false headers'),
	(pg_temp.seg(format('{"alg":"RS256","typ":"at+jwt","kid":"%s"}', :'rs2')) || '.' || :'p_rs' || '.' || :'s_rs',
	 'The header''s typ is not JWT.', 'another typ'),
	(split_part(:'tok_rs', '.', 1) || '.' || :'p_rs' || '.' || pg_temp.b64u(substring(pg_temp.b64u_decode(:'s_rs') FROM 1 FOR 252)),
	 'The RS256 signature does not have the key''s length.', 'truncated RS256 signature'),
	(split_part(:'tok_es', '.', 1) || '.' || :'p_es' || '.' || pg_temp.b64u(substring(pg_temp.b64u_decode(:'s_es') FROM 1 FOR 63)),
	 'An ES256 signature is 64 bytes (r||s), not DER.', 'truncated ES256 signature'),
	(split_part(:'tok_es', '.', 1) || '.' || :'p_es' || '.' || pg_temp.b64u(pg_temp.jose_to_der(pg_temp.b64u_decode(:'s_es'))),
	 'An ES256 signature is 64 bytes (r||s), not DER.', 'ECDSA signature in DER form'),
	(split_part(:'tok_es', '.', 1) || '.' || :'p_es' || '.' || pg_temp.b64u(decode(repeat('00', 64), 'hex')),
	 'The signature is not valid.', 'ECDSA r = s = 0'),
	(split_part(:'tok_es', '.', 1) || '.' || :'p_es' || '.' ||
	 pg_temp.b64u(decode('ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551', 'hex') || substring(pg_temp.b64u_decode(:'s_es') FROM 33)),
	 'The signature is not valid.', 'ECDSA r = n (out of range)'),
	(split_part(:'tok_ed', '.', 1) || '.' || split_part(:'tok_ed', '.', 2) || '.' || left(:'s_ed', -1) || 'B',
	 'A token segment is not canonical unpadded base64url.', 'non-canonical base64url (trailing bits set)'),
	(split_part(:'tok_rs', '.', 1) || '.A.' || :'s_rs',
	 'A token segment is not canonical unpadded base64url.', 'a segment of length 1 mod 4'),
	(split_part(:'tok_rs', '.', 1) || '.' || pg_temp.seg('{"sub":"admin"}') || '.' || :'s_rs',
	 'The signature is not valid.', 'payload swapped'),
	(split_part(:'tok_rs', '.', 1) || '.' || :'p_rs' || '.' || overlay(:'s_rs' PLACING CASE substr(:'s_rs', 100, 1) WHEN 'A' THEN 'B' ELSE 'A' END FROM 100 FOR 1),
	 'The signature is not valid.', 'one signature character changed'),
	(split_part(:'tok_rs', '.', 1) || '.' || :'p_rs' || '.' || split_part(:'tok_rs1', '.', 3),
	 'The signature is not valid.', 'signature from another RS256 key'),
	(split_part(:'tok_rs', '.', 1) || '.' || :'p_rs' || '.' || pg_temp.b64u(decode(repeat('00', 256), 'hex')),
	 'The signature is not valid.', 'an all-zero RS256 signature')
) AS attacks(t, d, m);

SELECT is(pg_postmaster_start_time(), :'started'::timestamptz, 'no attack crashed a backend (the server never restarted)');
SELECT is(eventshop._jwt_verify(:'tok_rs'), :'claims'::jsonb, 'and the real token still verifies afterwards');
-- this backend now remembers tok_rs's signature as verified; any other bytes are checked again
SELECT is(eventshop._jwt_verify(:'tok_rs'), :'claims'::jsonb, 'a token verified before verifies again (remembered signature)');
SELECT is(pg_temp.verify_error(split_part(:'tok_rs', '.', 1) || '.' || :'p_rs' || '.' || overlay(:'s_rs' PLACING CASE substr(:'s_rs', 7, 1) WHEN 'A' THEN 'B' ELSE 'A' END FROM 7 FOR 1)),
          '28000 invalid token: The signature is not valid.',
          'a remembered token with one signature character changed is verified, and refused');

-- revocation applies to the very next statement
SELECT is(eventshop._jwt_verify(:'tok_rs1'), '{"sub": "rs1-token"}'::jsonb, 'the retired key''s token verifies ...');
SELECT lives_ok(format('SELECT eventshop.revoke_signing_key(%L)', :'rs1'), 'an admin revokes the retired key');
SELECT is(pg_temp.verify_error(:'tok_rs1'), '28000 invalid token: The signing key was revoked.',
          '... and fails in the next statement');
SELECT ok((SELECT state = 'revoked' AND revoked_at IS NOT NULL AND private_key_sealed IS NULL
           FROM eventshop.signing_keys WHERE kid = :'rs1'), 'a revoked key has revoked_at and no private key');
SELECT ok(NOT (eventshop.jwks() @? format('$.keys[*] ? (@.kid == "%s")', :'rs1')::jsonpath),
          'a revoked key leaves the JWKS');
SELECT lives_ok(format('SELECT eventshop.revoke_signing_key(%L)', :'rs1'), 'revoking twice is harmless');
SELECT throws_ok($$SELECT eventshop.revoke_signing_key('AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA')$$, 'P0002',
                 'no signing key with this kid', 'revoking an unknown kid fails');
BEGIN;
SELECT eventshop.revoke_signing_key(:'es1') \gset
SELECT is(pg_temp.verify_error(:'tok_es'), '28000 invalid token: The signing key was revoked.',
          'revoking the active key stops its tokens in the same transaction');
SELECT throws_ok($$SELECT eventshop._jwt_sign('{}', 'ES256')$$, '55000', NULL, 'and signing for its algorithm');
ROLLBACK;

-- a retired key leaves the JWKS and stops verifying after access_token_ttl
SELECT eventshop.rotate_signing_keys('EdDSA') AS ed2 \gset
SELECT is(eventshop._jwt_verify(:'tok_ed'), :'claims'::jsonb, 'a just-retired EdDSA key still verifies');
UPDATE eventshop.signing_keys SET retired_at = clock_timestamp() - interval '16 minutes' WHERE kid = :'ed1';
SELECT is(pg_temp.verify_error(:'tok_ed'), '28000 invalid token: The signing key was retired too long ago.',
          'a key retired longer than access_token_ttl ago no longer verifies');
SELECT ok(NOT (eventshop.jwks() @? format('$.keys[*] ? (@.kid == "%s")', :'ed1')::jsonpath),
          'and is no longer in the JWKS');

-- the kid is the additional data of the sealed key: a sealed key moved to another row does not open
SELECT eventshop.create_signing_key('EdDSA') AS ed_moved \gset
UPDATE eventshop.signing_keys SET private_key_sealed = (SELECT private_key_sealed FROM eventshop.signing_keys WHERE kid = :'ed2')
WHERE kid = :'ed_moved';
SELECT is(eventshop.rotate_signing_keys('EdDSA'), :'ed_moved', 'the key with the moved private key becomes active');
SELECT throws_ok($$SELECT eventshop._jwt_sign('{}', 'EdDSA')$$, '28000', NULL,
                 'a private key sealed for another kid cannot be unsealed');
SELECT lives_ok(format('SELECT eventshop.revoke_signing_key(%L)', :'ed_moved'), 'revoke it');
SELECT eventshop.rotate_signing_keys('EdDSA') AS ed3 \gset
SELECT is(eventshop._jwt_verify(eventshop._jwt_sign('{"ok":true}', 'EdDSA')), '{"ok": true}'::jsonb,
          'and after the next rotation EdDSA signs again');

-- a tampered public JWK is detected (its thumbprint no longer matches the kid)
SELECT eventshop.create_signing_key('ES256') AS es_tampered \gset
UPDATE eventshop.signing_keys SET public_jwk = (SELECT public_jwk FROM eventshop.signing_keys WHERE kid = :'es1')
                                                || jsonb_build_object('kid', :'es_tampered')
WHERE kid = :'es_tampered';
SELECT eventshop.rotate_signing_keys('ES256') AS es2 \gset
SELECT throws_ok($$SELECT eventshop._jwt_verify(eventshop._jwt_sign('{}', 'ES256'))$$, 'XX001', NULL,
                 'a JWK that does not match its kid is refused');
SELECT lives_ok(format('SELECT eventshop.revoke_signing_key(%L)', :'es_tampered'), 'revoke it');
SELECT eventshop.rotate_signing_keys('ES256') AS es3 \gset

-- ---------------------------------------------------------------------------
-- Key file errors. eventshop.key_file is a reload setting: point it at a
-- path in the data directory, write bad contents there with COPY, and wait
-- until this backend has applied the reload.
-- ---------------------------------------------------------------------------
SELECT current_setting('eventshop.key_file') AS good_key_file, current_setting('data_directory') || '/regress_bad_' || md5(random()::text) || '.key' AS bad_key_file \gset
SELECT is(pg_read_file(:'good_key_file') ~ '^[0-9a-f]{64}\n$', true, 'the test key file holds 64 hex characters');
ALTER SYSTEM SET eventshop.key_file = :'bad_key_file';
SELECT pg_reload_conf() AS reloaded \gset
\set ECHO none
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'bad_key_file') AS w \gset
\set ECHO all
SELECT is(current_setting('eventshop.key_file'), :'bad_key_file', 'the reload pointed eventshop.key_file at the bad path');

SELECT is(pg_temp.error_of($$SELECT eventshop.create_signing_key('EdDSA')$$),
          '58P01 could not open the key file named by eventshop.key_file: No such file or directory',
          'a missing key file: 58P01, naming the setting, not the path');
SELECT is(pg_temp.error_of($$SELECT eventshop._pii_hash('a@example.com')$$),
          '58P01 could not open the key file named by eventshop.key_file: No such file or directory',
          '_pii_hash needs the key file too');
SELECT is(eventshop._jwt_verify(eventshop._jwt_sign('{"cached":true}', 'RS256')), '{"cached": true}'::jsonb,
          'keys already unsealed in this backend keep signing');
COPY (SELECT 'not a key') TO :'bad_key_file';
SELECT is(pg_temp.error_of($$SELECT eventshop.create_signing_key('EdDSA')$$),
          '22023 the key file named by eventshop.key_file is malformed', 'a key file with text: 22023');
COPY (SELECT repeat('ab', 31)) TO :'bad_key_file';
SELECT is(pg_temp.error_of($$SELECT eventshop._pii_hash('a@example.com')$$),
          '22023 the key file named by eventshop.key_file is malformed', 'a key file with 62 hex characters: 22023');
COPY (SELECT repeat('ab', 33)) TO :'bad_key_file';
SELECT is(pg_temp.error_of($$SELECT eventshop._pii_hash('a@example.com')$$),
          '22023 the key file named by eventshop.key_file is malformed', 'a key file with 66 hex characters: 22023');
COPY (SELECT repeat('ab', 31) || 'zz') TO :'bad_key_file';
SELECT is(pg_temp.error_of($$SELECT eventshop._pii_hash('a@example.com')$$),
          '22023 the key file named by eventshop.key_file is malformed', 'a key file with a non-hex character: 22023');
COPY (SELECT repeat('ab', 32)) TO :'bad_key_file';
SELECT is(pg_temp.error_of($$SELECT eventshop._pii_hash('a@example.com')$$), 'no error',
          'a well-formed key file is read on the next call, without a reload');
SELECT eventshop.create_signing_key('EdDSA') AS ed_other_master \gset
SELECT ok(:'ed_other_master' IS NOT NULL, 'a key can be created under another master key ...');
ALTER SYSTEM RESET eventshop.key_file;
SELECT pg_reload_conf() AS reloaded \gset
\set ECHO none
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
SELECT (SELECT 1 FROM pg_sleep(0.1) WHERE current_setting('eventshop.key_file') <> :'good_key_file') AS w \gset
\set ECHO all
SELECT is(current_setting('eventshop.key_file'), :'good_key_file', 'eventshop.key_file is back to the real key');
SELECT is(eventshop.rotate_signing_keys('EdDSA'), :'ed_other_master', '... and rotated in (it is the newest standby key)');
SELECT throws_ok($$SELECT eventshop._jwt_sign('{}', 'EdDSA')$$, '28000', NULL,
                 '... but not unsealed under the real master key');
SELECT is(pg_temp.error_of($$SELECT eventshop.rotate_signing_keys('EdDSA')$$), 'no error',
          'rotation moves on to a key sealed under the real master key');
SELECT is(eventshop._jwt_verify(eventshop._jwt_sign('{"again":1}', 'EdDSA')), '{"again": 1}'::jsonb, 'EdDSA signs again');
SELECT is((SELECT private_key_sealed FROM eventshop.signing_keys WHERE kid = :'ed_other_master'), NULL,
          'and the unusable key, now retired, has no private key any more');

-- ---------------------------------------------------------------------------
-- Secret helpers
-- ---------------------------------------------------------------------------
SELECT ok(eventshop._pii_hash('alice@example.com') ~ '^[A-Za-z0-9_-]{22}$', '_pii_hash is 22 base64url characters');
SELECT is(eventshop._pii_hash('alice@example.com'), eventshop._pii_hash('alice@example.com'), '_pii_hash is stable');
SELECT isnt(eventshop._pii_hash('alice@example.com'), eventshop._pii_hash('bob@example.com'), 'and distinguishes values');
SELECT isnt(eventshop._pii_hash('alice@example.com'), left(pg_temp.b64u(sha256('alice@example.com')), 22),
            'and is keyed, not a plain SHA-256');
SELECT throws_ok(format('SELECT eventshop._pii_hash(%L)', repeat('x', 5000)), '22023', 'value to hash is too long',
                 '_pii_hash refuses huge input');
SELECT results_eq($$SELECT length(eventshop._random_token(n)) FROM unnest(ARRAY[16, 32, 64]) WITH ORDINALITY u(n, i) ORDER BY i$$,
                  ARRAY[22, 43, 86], '_random_token returns base64url of 16, 32 (default length 43) and 64 bytes');
SELECT ok(eventshop._random_token() ~ '^[A-Za-z0-9_-]{43}$', '_random_token() is 256 bits in base64url');
SELECT is((SELECT count(DISTINCT eventshop._random_token()) FROM generate_series(1, 100)), 100::bigint,
          '_random_token does not repeat');
SELECT throws_ok('SELECT eventshop._random_token(15)', '22023', 'token length must be between 16 and 64 bytes',
                 '_random_token refuses fewer than 16 bytes');
SELECT throws_ok('SELECT eventshop._random_token(65)', '22023', 'token length must be between 16 and 64 bytes',
                 '_random_token refuses more than 64 bytes');
SELECT is(eventshop._token_hash('abc'), sha256('abc'::bytea), '_token_hash is SHA-256');

SELECT eventshop._seal('reset-token-1234 é') AS sealed \gset
SELECT is(eventshop._open_sealed(:'sealed'), 'reset-token-1234 é', '_open_sealed opens what _seal sealed');
SELECT ok(:'sealed' ~ '^[A-Za-z0-9_-]+$' AND length(pg_temp.b64u_decode(:'sealed')) = 49 + octet_length('reset-token-1234 é'),
          'a sealed box is base64url of version, ephemeral key, ciphertext and tag');
SELECT is(position(convert_to('reset-token', 'UTF8') IN pg_temp.b64u_decode(:'sealed')), 0, 'the box does not contain the secret');
SELECT isnt(eventshop._seal('same'), eventshop._seal('same'), 'sealing is randomised');
SELECT is(eventshop._open_sealed(eventshop._seal('')), '', 'an empty secret round-trips');
SELECT throws_ok(format('SELECT eventshop._open_sealed(%L)',
                        left(:'sealed', 60) || CASE substr(:'sealed', 61, 1) WHEN 'A' THEN 'B' ELSE 'A' END || substr(:'sealed', 62)),
                 '22023', 'sealed value could not be opened', 'a tampered box does not open');
SELECT throws_ok($$SELECT eventshop._open_sealed('AAAA')$$, '22023', 'sealed value is malformed', 'a short box is refused');
SELECT throws_ok($$SELECT eventshop._open_sealed('not base64!')$$, '22023', 'sealed value is malformed', 'garbage is refused');
SELECT throws_ok(format('SELECT eventshop._seal(%L)', repeat('x', 70000)), '22023', 'value to seal is too long',
                 '_seal refuses huge input');

SELECT * FROM finish();

DROP ROLE regress_jwt_app;
DROP ROLE regress_jwt_admin;
