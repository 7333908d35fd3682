/*
 * eventshop--1.0.sql
 *		Schema, roles and SQL API of eventshop 1.0: accounts, the transactional
 *		outbox read by the relay worker, and the inbox/notification queue run
 *		by the dispatcher worker.
 */
\echo Use "CREATE EXTENSION eventshop" to load this file. \quit

-- ---------------------------------------------------------------------------
-- Roles. Applications get eventshop_app (EXECUTE on the API only); operators
-- get eventshop_admin. Roles are cluster-wide, so create them only once.
-- ---------------------------------------------------------------------------
DO $roles$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'eventshop_app') THEN
		CREATE ROLE eventshop_app NOLOGIN;
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'eventshop_admin') THEN
		CREATE ROLE eventshop_admin NOLOGIN;
	END IF;
END
$roles$;

REVOKE ALL ON SCHEMA eventshop FROM PUBLIC;
GRANT USAGE ON SCHEMA eventshop TO eventshop_app, eventshop_admin;

-- ---------------------------------------------------------------------------
-- Accounts
-- ---------------------------------------------------------------------------
CREATE TABLE eventshop.users (
	id				uuid PRIMARY KEY,
	email			text NOT NULL,
	display_name	text NOT NULL,
	password_hash	text NOT NULL,
	status			text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'blocked')),
	created_at		timestamptz NOT NULL DEFAULT now(),
	roles			text[] NOT NULL DEFAULT '{customer}'
					CHECK (cardinality(roles) > 0 AND roles <@ ARRAY['customer', 'admin']),
	email_verified_at timestamptz,
	valid_after		timestamptz NOT NULL DEFAULT '-infinity',
	blocked_at		timestamptz,
	blocked_reason	text,
	CONSTRAINT users_email_key UNIQUE (email),
	CONSTRAINT users_blocked_check CHECK ((status = 'blocked') = (blocked_at IS NOT NULL))
);
COMMENT ON TABLE eventshop.users IS 'Accounts. email is stored normalised (trimmed, lower case); password_hash is an argon2id PHC string (or a bcrypt hash imported from another system, replaced at the next login); roles are customer and/or admin; access tokens issued (iat) before valid_after are refused; blocked_at is set while the account is blocked.';
-- pg_dump leaves out the rows of extension tables unless they are marked.
SELECT pg_catalog.pg_extension_config_dump('eventshop.users', '');

-- Passwords too common to accept whatever their length: a list of breached
-- and common passwords shipped as a data file beside this script
-- (extension/eventshop_common_passwords.txt, generated from Debian's john-data
-- and python3-zxcvbn by scripts/make_common_passwords.sh) and loaded here.
CREATE TABLE eventshop.common_passwords (
	password text PRIMARY KEY
);
COMMENT ON TABLE eventshop.common_passwords IS 'Passwords refused by the password policy because they appear in breached/common password lists (stored and compared in lower case; only entries of 8 characters or more).';

CREATE FUNCTION eventshop._read_common_passwords()
RETURNS SETOF text
AS 'MODULE_PATHNAME', 'eventshop_read_common_passwords'
LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION eventshop._read_common_passwords() IS 'Internal: the lines of $sharedir/extension/eventshop_common_passwords.txt, the common-password list installed with the extension.';

-- (Re)loads the list; CREATE EXTENSION calls it, an operator may call it
-- again after installing a newer list.
CREATE FUNCTION eventshop._load_common_passwords()
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_count bigint;
BEGIN
	DELETE FROM eventshop.common_passwords;
	INSERT INTO eventshop.common_passwords (password)
	SELECT DISTINCT lower(p COLLATE "C") FROM eventshop._read_common_passwords() AS p
	WHERE char_length(p) >= 8;
	GET DIAGNOSTICS v_count = ROW_COUNT;
	RETURN v_count;
END
$$;
COMMENT ON FUNCTION eventshop._load_common_passwords() IS 'Internal: replaces eventshop.common_passwords with the list file installed with the extension; returns the number of passwords loaded.';
SELECT eventshop._load_common_passwords();

-- ---------------------------------------------------------------------------
-- Transactional outbox. One row per event, written in the same transaction
-- as the change it describes; the relay worker publishes rows to Kafka and
-- deletes each one only after the broker acknowledged it.
-- ---------------------------------------------------------------------------
CREATE TABLE eventshop.outbox (
	id				bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	topic			text NOT NULL CHECK (topic IN ('auth.events', 'orders.events', 'payments.events',
												   'registrations.events', 'invites.events',
												   'notifications.events')),
	message_key		text NOT NULL CHECK (octet_length(message_key) BETWEEN 1 AND 512),
	event_id		uuid NOT NULL,
	event_type		text NOT NULL,
	payload			json NOT NULL,
	created_at		timestamptz NOT NULL DEFAULT clock_timestamp(),
	attempts		integer NOT NULL DEFAULT 0,
	last_error		text
);
COMMENT ON TABLE eventshop.outbox IS 'Events waiting to be published to Kafka; payload is the complete CloudEvents 1.0 JSON document.';
SELECT pg_catalog.pg_extension_config_dump('eventshop.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('eventshop.outbox_id_seq', '');

CREATE FUNCTION eventshop._wake_worker_on_commit()
RETURNS trigger
AS 'MODULE_PATHNAME', 'eventshop_wake_worker_on_commit'
LANGUAGE C;
COMMENT ON FUNCTION eventshop._wake_worker_on_commit() IS 'Statement trigger: wakes the worker named by the trigger argument (relay or dispatcher) when the transaction commits.';

CREATE TRIGGER outbox_wake_relay
	AFTER INSERT ON eventshop.outbox
	FOR EACH STATEMENT EXECUTE FUNCTION eventshop._wake_worker_on_commit('relay');

-- Writes one CloudEvent to the outbox; internal: callers are the definer
-- functions of each module, never applications (they could forge events).
CREATE FUNCTION eventshop._emit_event(topic text, message_key text, event_type text, data jsonb)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_id uuid := gen_random_uuid();
BEGIN
	INSERT INTO eventshop.outbox (topic, message_key, event_id, event_type, payload)
	VALUES (topic, message_key, v_id, event_type,
			json_build_object(
				'specversion', '1.0',
				'id', v_id,
				'source', '/eventshop/' || split_part(topic, '.', 1),
				'type', event_type,
				'time', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
				'subject', message_key,
				'datacontenttype', 'application/json',
				'data', data));
	RETURN v_id;
END
$$;
COMMENT ON FUNCTION eventshop._emit_event(text, text, text, jsonb) IS 'Internal: adds one CloudEvent to the outbox in the current transaction and returns its id.';

CREATE VIEW eventshop.outbox_status AS
SELECT
	count(*) AS backlog,
	count(*) FILTER (WHERE attempts > 0) AS retried,
	max(clock_timestamp() - created_at) AS oldest_age,
	(SELECT o.last_error FROM eventshop.outbox o WHERE o.last_error IS NOT NULL ORDER BY o.id DESC LIMIT 1) AS last_error
FROM eventshop.outbox;
COMMENT ON VIEW eventshop.outbox_status IS 'Events not yet acknowledged by Kafka: how many, how old the oldest is, and the latest delivery error.';

-- ---------------------------------------------------------------------------
-- Password hashing (C, libargon2). Internal: only definer functions call them.
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop._hash_password(password text)
RETURNS text
AS 'MODULE_PATHNAME', 'eventshop_hash_password'
LANGUAGE C STRICT VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION eventshop._hash_password(text) IS 'Internal: argon2id hash (PHC string) of a password with a fresh random salt.';

CREATE FUNCTION eventshop._verify_password(password text, password_hash text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'eventshop_verify_password'
LANGUAGE C STRICT VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION eventshop._verify_password(text, text) IS 'Internal: whether a password matches an argon2id PHC string.';

-- ---------------------------------------------------------------------------
-- Input checks shared by the account functions.
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop._normalize_email(email text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	-- COLLATE "C": lower-case ASCII only. Under a libc or ICU locale lower()
	-- also maps look-alikes such as U+0130 (dotted I) or U+212A (Kelvin sign)
	-- to ASCII letters, so the check below would accept them as another
	-- address, and the result would depend on the database's locale.
	v text := lower(btrim(email) COLLATE "C");
BEGIN
	IF v IS NULL OR v = '' THEN
		RAISE EXCEPTION 'e-mail address is required' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF octet_length(v) > 254
	   OR v !~ '^[a-z0-9.!#$%&''*+/=?^_`{|}~-]{1,64}@[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$'
	   OR v ~ '^\.|\.\.|\.@' THEN
		RAISE EXCEPTION 'invalid e-mail address'
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Use an address of the form name@example.com (at most 254 characters).';
	END IF;
	RETURN v;
END
$$;
COMMENT ON FUNCTION eventshop._normalize_email(text) IS 'Internal: trims and lower-cases an e-mail address, raising 22023 when it is not a plausible address.';

CREATE FUNCTION eventshop._check_password_policy(password text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF password IS NULL OR password = '' THEN
		RAISE EXCEPTION 'password is required' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF char_length(password) < 8 THEN
		RAISE EXCEPTION 'password is too short'
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Use at least 8 characters; a passphrase of several words is easiest to remember.';
	END IF;
	IF octet_length(password) > 1024 THEN
		RAISE EXCEPTION 'password is too long'
			USING ERRCODE = 'invalid_parameter_value', HINT = 'Use at most 1024 bytes.';
	END IF;
	IF EXISTS (SELECT 1 FROM eventshop.common_passwords c WHERE c.password = lower(_check_password_policy.password)) THEN
		RAISE EXCEPTION 'password is too common'
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Choose a password that is not on lists of commonly used passwords.';
	END IF;
END
$$;
COMMENT ON FUNCTION eventshop._check_password_policy(text) IS 'Internal: raises 22023 for a password that is too short, too long or too common.';

CREATE FUNCTION eventshop._mask_email(email text)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT left(split_part(email, '@', 1), 1) || '***@' || split_part(email, '@', 2)
$$;
COMMENT ON FUNCTION eventshop._mask_email(text) IS 'Internal: first letter and domain of an address (a***@example.com), for events and logs.';

-- ---------------------------------------------------------------------------
-- register: the first business function.
-- log_min_error_statement is raised so that a rejected call never writes its
-- statement text (which holds the password) to the server log.
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop.register(email text, password text, display_name text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic
AS $$
DECLARE
	v_email	text := eventshop._normalize_email(register.email);
	v_name	text := btrim(coalesce(register.display_name, split_part(v_email, '@', 1)));
	v_id	uuid := gen_random_uuid();
BEGIN
	PERFORM eventshop._check_password_policy(register.password);
	IF v_name = '' OR char_length(v_name) > 100 OR v_name ~ '[[:cntrl:]]' THEN
		RAISE EXCEPTION 'invalid display name'
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Use 1 to 100 printable characters.';
	END IF;
	IF EXISTS (SELECT 1 FROM eventshop.users u WHERE u.email = v_email) THEN
		RAISE EXCEPTION 'an account with this e-mail address already exists'
			USING ERRCODE = 'unique_violation';
	END IF;

	BEGIN
		INSERT INTO eventshop.users (id, email, display_name, password_hash)
		VALUES (v_id, v_email, v_name, eventshop._hash_password(register.password));
	EXCEPTION WHEN unique_violation THEN
		-- a concurrent registration of the same address won the race
		RAISE EXCEPTION 'an account with this e-mail address already exists'
			USING ERRCODE = 'unique_violation';
	END;

	PERFORM eventshop._emit_event('auth.events', v_id::text, 'user.registered',
		jsonb_build_object('user_id', v_id,
						   'email_hash', eventshop._pii_hash(v_email)));
	RETURN v_id;
END
$$;
COMMENT ON FUNCTION eventshop.register(text, text, text) IS 'Creates an account and emits user.registered on auth.events in the same transaction; returns the new user id. Errors: 22023 invalid input, 22004 missing input, 23505 address already registered.';

-- ---------------------------------------------------------------------------
-- Auth: accounts, sessions and tokens.
--
-- login verifies the password (argon2id; bcrypt hashes imported from other
-- systems are verified with libxcrypt and replaced) and opens a session with
-- a short-lived access JWT (signed by eventshop._jwt_sign) and an opaque
-- refresh token (256 random bits, stored only as its SHA-256). refresh
-- rotates the refresh token on every use. authenticate verifies an access
-- token and establishes the caller for the rest of the transaction (C:
-- src/auth_context.c); other modules call eventshop._require_user() or
-- eventshop._require_admin(). Failed logins are counted in shared memory
-- (src/login_throttle.c) so a ROLLBACK cannot erase them, and their events
-- are queued there until eventshop.flush_security_events() writes them.
-- Every function that receives a password or token sets
-- log_min_error_statement = panic, so a failed call never writes its
-- statement text (which may hold the secret) to the server log.
-- ---------------------------------------------------------------------------

CREATE TABLE eventshop.sessions (
	id				uuid PRIMARY KEY,
	user_id			uuid NOT NULL REFERENCES eventshop.users (id) ON DELETE CASCADE,
	created_at		timestamptz NOT NULL,
	last_used_at	timestamptz NOT NULL,
	expires_at		timestamptz NOT NULL,
	generation		integer NOT NULL,
	source			text,
	user_agent		text,
	revoked_at		timestamptz,
	revoked_reason	text CHECK (revoked_reason IN ('logout', 'revoked_by_user', 'password_changed',
												   'password_reset', 'blocked', 'refresh_token_reuse')),
	CHECK ((revoked_at IS NULL) = (revoked_reason IS NULL))
);
CREATE INDEX sessions_user_idx ON eventshop.sessions (user_id);
COMMENT ON TABLE eventshop.sessions IS 'Login sessions. generation is the generation of the session''s live refresh token; a session ends when revoked or when its refresh token expires (expires_at slides with every refresh). source and user_agent are what the gateway passed to login.';
SELECT pg_catalog.pg_extension_config_dump('eventshop.sessions', '');

CREATE TABLE eventshop.refresh_tokens (
	token_hash		bytea PRIMARY KEY,
	session_id		uuid NOT NULL REFERENCES eventshop.sessions (id) ON DELETE CASCADE,
	generation		integer NOT NULL,
	issued_at		timestamptz NOT NULL,
	expires_at		timestamptz NOT NULL,
	rotated_at		timestamptz,
	UNIQUE (session_id, generation)
);
COMMENT ON TABLE eventshop.refresh_tokens IS 'Every refresh token of every live session, as SHA-256 of the token (never the token). rotated_at is set when it was exchanged; presenting a rotated token again revokes the session.';
SELECT pg_catalog.pg_extension_config_dump('eventshop.refresh_tokens', '');

CREATE TABLE eventshop.account_tokens (
	token_hash		bytea PRIMARY KEY,
	user_id			uuid REFERENCES eventshop.users (id) ON DELETE CASCADE,
	purpose			text NOT NULL CHECK (purpose IN ('password_reset', 'email_verification')),
	email			text,
	created_at		timestamptz NOT NULL,
	expires_at		timestamptz NOT NULL,
	used_at			timestamptz,
	CHECK ((user_id IS NULL) = (email IS NULL))
);
CREATE INDEX account_tokens_user_idx ON eventshop.account_tokens (user_id, purpose);
CREATE INDEX account_tokens_expires_idx ON eventshop.account_tokens (expires_at);
COMMENT ON TABLE eventshop.account_tokens IS 'Single-use password-reset and e-mail verification tokens, as SHA-256 of the token. Rows without a user are decoys written for unknown addresses, so that a reset request costs the same whether or not the account exists; they can never be redeemed.';
SELECT pg_catalog.pg_extension_config_dump('eventshop.account_tokens', '');

CREATE TYPE eventshop.token_pair AS (
	access_token	text,
	refresh_token	text,
	token_type		text,
	expires_in		integer,
	session_id		uuid
);
COMMENT ON TYPE eventshop.token_pair IS 'What login and refresh return: an access JWT, the session''s new refresh token, ''Bearer'', the access token''s lifetime in seconds, and the session id.';

CREATE TYPE eventshop.caller AS (
	user_id			uuid,
	roles			text[],
	session_id		uuid
);
COMMENT ON TYPE eventshop.caller IS 'What authenticate returns: the authenticated user, its roles (read from the account, not the token) and the session.';

-- Password hashing beyond _hash_password/_verify_password (C, src/password_hash.c).
CREATE FUNCTION eventshop._dummy_verify_password(password text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'eventshop_dummy_verify_password'
LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION eventshop._dummy_verify_password(text) IS 'Internal: costs what verifying a current argon2id hash costs and returns false, so a login for an unknown address takes as long as one for a known address.';

CREATE FUNCTION eventshop._password_needs_rehash(password_hash text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'eventshop_password_needs_rehash'
LANGUAGE C STRICT STABLE;
COMMENT ON FUNCTION eventshop._password_needs_rehash(text) IS 'Internal: whether a stored hash is bcrypt or argon2id below eventshop.password_hash_memory / password_hash_iterations, and so is replaced at the next successful login.';

CREATE FUNCTION eventshop.password_hash_status(OUT active integer, OUT max_concurrent integer)
RETURNS record
AS 'MODULE_PATHNAME', 'eventshop_password_hash_status'
LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION eventshop.password_hash_status() IS 'Password hashes being computed in the server right now, and the limit eventshop.max_concurrent_password_hashes.';

-- Brute-force counters and deferred events (C, src/login_throttle.c).
CREATE FUNCTION eventshop._login_throttle_check(account text, source text)
RETURNS integer
AS 'MODULE_PATHNAME', 'eventshop_login_throttle_check'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION eventshop._login_throttle_check(text, text) IS 'Internal: seconds until a login for this account (normalised e-mail) from this source may be tried; 0 when it may be tried now.';

CREATE FUNCTION eventshop._login_throttle_failure(account text, source text)
RETURNS integer
AS 'MODULE_PATHNAME', 'eventshop_login_throttle_failure'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION eventshop._login_throttle_failure(text, text) IS 'Internal: counts a failed login in shared memory (it survives ROLLBACK); returns the length in seconds of the account lockout it started, else 0.';

CREATE FUNCTION eventshop._login_throttle_success(account text)
RETURNS void
AS 'MODULE_PATHNAME', 'eventshop_login_throttle_success'
LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION eventshop._login_throttle_success(text) IS 'Internal: forgets an account''s failed logins and lockouts.';

CREATE FUNCTION eventshop._login_throttle_clear()
RETURNS bigint
AS 'MODULE_PATHNAME', 'eventshop_login_throttle_clear'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION eventshop._login_throttle_clear() IS 'Internal: forgets every failed-login counter and lockout; returns how many entries were dropped.';

CREATE FUNCTION eventshop.login_throttle_status(OUT tracked bigint, OUT locked bigint, OUT capacity integer,
												OUT evicted bigint, OUT deferred_events integer,
												OUT dropped_events bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'eventshop_login_throttle_status'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION eventshop.login_throttle_status() IS 'Failed-login tracking: accounts and sources tracked and locked now, table capacity, entries evicted because it was full, security events waiting for eventshop.flush_security_events() and events dropped because that queue was full.';

CREATE FUNCTION eventshop._defer_event(message_key text, event_type text, data jsonb)
RETURNS boolean
AS 'MODULE_PATHNAME', 'eventshop_defer_event'
LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION eventshop._defer_event(text, text, jsonb) IS 'Internal: queues an auth.events event in shared memory, for a transaction that is about to fail (a failed login); false if the queue was full.';

CREATE FUNCTION eventshop._claim_deferred_events()
RETURNS TABLE (message_key text, event_type text, data jsonb)
AS 'MODULE_PATHNAME', 'eventshop_claim_deferred_events'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION eventshop._claim_deferred_events() IS 'Internal: takes the queued security events; they return to the queue if the caller''s transaction aborts.';

CREATE FUNCTION eventshop.flush_security_events()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_event	record;
	v_count	integer := 0;
BEGIN
	FOR v_event IN SELECT * FROM eventshop._claim_deferred_events() LOOP
		PERFORM eventshop._emit_event('auth.events', v_event.message_key, v_event.event_type, v_event.data);
		v_count := v_count + 1;
	END LOOP;
	RETURN v_count;
END
$$;
COMMENT ON FUNCTION eventshop.flush_security_events() IS 'Writes the security events of failed logins (user.login_failed, user.locked), queued in shared memory because their own transaction failed, to the outbox; returns how many. login and refresh call it; schedule it with pg_cron (every minute) so events also leave during an attack when no login succeeds.';

-- The authenticated caller (C, src/auth_context.c).
CREATE FUNCTION eventshop._set_auth_context(user_id uuid, roles text[], session_id uuid)
RETURNS void
AS 'MODULE_PATHNAME', 'eventshop_set_auth_context'
LANGUAGE C STRICT VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION eventshop._set_auth_context(uuid, text[], uuid) IS 'Internal (authenticate only): establishes the caller for the rest of the transaction.';

CREATE FUNCTION eventshop._clear_auth_context()
RETURNS void
AS 'MODULE_PATHNAME', 'eventshop_clear_auth_context'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION eventshop._clear_auth_context() IS 'Internal: forgets the caller for the rest of the transaction (after logging out).';

CREATE FUNCTION eventshop.current_user_id()
RETURNS uuid
AS 'MODULE_PATHNAME', 'eventshop_current_user_id'
LANGUAGE C STABLE PARALLEL RESTRICTED;
COMMENT ON FUNCTION eventshop.current_user_id() IS 'The user that eventshop.authenticate established in this transaction, or NULL.';

CREATE FUNCTION eventshop.current_roles()
RETURNS text[]
AS 'MODULE_PATHNAME', 'eventshop_current_roles'
LANGUAGE C STABLE PARALLEL RESTRICTED;
COMMENT ON FUNCTION eventshop.current_roles() IS 'The roles of the authenticated user as read by eventshop.authenticate in this transaction, or NULL.';

CREATE FUNCTION eventshop.current_session_id()
RETURNS uuid
AS 'MODULE_PATHNAME', 'eventshop_current_session_id'
LANGUAGE C STABLE PARALLEL RESTRICTED;
COMMENT ON FUNCTION eventshop.current_session_id() IS 'The session of the user that eventshop.authenticate established in this transaction, or NULL.';

-- Raises 28000 unless authenticate established a caller in this transaction
-- whose session is still live and whose account is not blocked (checked
-- again on every call: a revocation committed elsewhere applies to the next
-- statement). Returns the user id. For every module's definer functions.
CREATE FUNCTION eventshop._require_user()
RETURNS uuid
LANGUAGE plpgsql VOLATILE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_user		uuid := eventshop.current_user_id();
	v_session	uuid := eventshop.current_session_id();
BEGIN
	IF v_user IS NULL THEN
		RAISE EXCEPTION 'authentication required'
			USING ERRCODE = 'invalid_authorization_specification',
				  HINT = 'Call eventshop.authenticate(access_token) first in the same transaction.';
	END IF;
	PERFORM FROM eventshop.sessions s JOIN eventshop.users u ON u.id = s.user_id
	WHERE s.id = v_session AND s.user_id = v_user AND s.revoked_at IS NULL
	  AND s.expires_at > clock_timestamp() AND u.blocked_at IS NULL;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'session has ended'
			USING ERRCODE = 'invalid_authorization_specification',
				  HINT = 'Log in again.';
	END IF;
	RETURN v_user;
END
$$;
COMMENT ON FUNCTION eventshop._require_user() IS 'Internal: the authenticated user id; raises 28000 when there is none or its session ended since.';

CREATE FUNCTION eventshop._require_admin()
RETURNS uuid
LANGUAGE plpgsql VOLATILE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_user uuid := eventshop._require_user();
BEGIN
	-- the account's roles now, not those in the token or at authenticate time
	PERFORM FROM eventshop.users u WHERE u.id = v_user AND 'admin' = ANY (u.roles);
	IF NOT FOUND THEN
		RAISE EXCEPTION 'administrator role required' USING ERRCODE = 'insufficient_privilege';
	END IF;
	RETURN v_user;
END
$$;
COMMENT ON FUNCTION eventshop._require_admin() IS 'Internal: the authenticated user id if that user has the admin role; raises 28000 without a caller, 42501 without the role.';

CREATE FUNCTION eventshop._invalid_token(detail text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	RAISE EXCEPTION 'invalid token' USING ERRCODE = 'invalid_authorization_specification', DETAIL = detail;
END
$$;
COMMENT ON FUNCTION eventshop._invalid_token(text) IS 'Internal: raises 28000 "invalid token" with a non-secret detail.';

-- Whether a string has the shape of our opaque tokens (base64url, 22 to 128
-- characters); checked before hashing so junk is refused cheaply.
CREATE FUNCTION eventshop._is_opaque_token(token text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT token IS NOT NULL AND octet_length(token) BETWEEN 22 AND 128
		   AND token ~ '^[A-Za-z0-9_-]+$'
$$;
COMMENT ON FUNCTION eventshop._is_opaque_token(text) IS 'Internal: whether a string looks like a refresh, reset or verification token (base64url, 22 to 128 characters).';

-- Issues an access token and a new refresh token (generation) for a session
-- whose row the caller has locked or just created.
CREATE FUNCTION eventshop._issue_tokens(user_id uuid, roles text[], session_id uuid, generation integer)
RETURNS eventshop.token_pair
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_now		timestamptz := clock_timestamp();
	v_iat		bigint := floor(extract(epoch FROM v_now))::bigint;
	v_ttl		integer := extract(epoch FROM current_setting('eventshop.access_token_ttl')::interval)::integer;
	v_expires	timestamptz := v_now + current_setting('eventshop.refresh_token_ttl')::interval;
	v_refresh	text := eventshop._random_token(32);
	v_result	eventshop.token_pair;
BEGIN
	INSERT INTO eventshop.refresh_tokens (token_hash, session_id, generation, issued_at, expires_at)
	VALUES (eventshop._token_hash(v_refresh), _issue_tokens.session_id, _issue_tokens.generation, v_now, v_expires);
	UPDATE eventshop.sessions s
	SET generation = _issue_tokens.generation, last_used_at = v_now, expires_at = v_expires
	WHERE s.id = _issue_tokens.session_id;

	v_result.access_token := eventshop._jwt_sign(jsonb_build_object(
		'iss', current_setting('eventshop.jwt_issuer'),
		'aud', current_setting('eventshop.jwt_audience'),
		'sub', _issue_tokens.user_id::text,
		'iat', v_iat,
		'nbf', v_iat,
		'exp', v_iat + v_ttl,
		'jti', gen_random_uuid()::text,
		'sid', _issue_tokens.session_id::text,
		'typ', 'access',
		'roles', to_jsonb(_issue_tokens.roles)));
	v_result.refresh_token := v_refresh;
	v_result.token_type := 'Bearer';
	v_result.expires_in := v_ttl;
	v_result.session_id := _issue_tokens.session_id;
	RETURN v_result;
END
$$;
COMMENT ON FUNCTION eventshop._issue_tokens(uuid, text[], uuid, integer) IS 'Internal: signs an access token (iss, aud, sub, iat, nbf, exp, jti, sid, typ=access, roles) and stores a new refresh token for the session.';

-- Revokes sessions of a user (all, or all but one); returns how many.
CREATE FUNCTION eventshop._revoke_sessions(user_id uuid, reason text, except_session uuid DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_count integer;
BEGIN
	UPDATE eventshop.sessions s SET revoked_at = clock_timestamp(), revoked_reason = reason
	WHERE s.user_id = _revoke_sessions.user_id AND s.revoked_at IS NULL
	  AND s.id IS DISTINCT FROM except_session;
	GET DIAGNOSTICS v_count = ROW_COUNT;
	RETURN v_count;
END
$$;
COMMENT ON FUNCTION eventshop._revoke_sessions(uuid, text, uuid) IS 'Internal: ends a user''s live sessions (optionally all but one) and returns how many.';

-- ---------------------------------------------------------------------------
-- login. The same error (28P01 'invalid e-mail or password') for an unknown
-- address, a wrong password and malformed input, and an unknown address
-- costs a dummy argon2id hash, so neither message nor timing reveals whether
-- an account exists. A blocked account says so (28000) only after the right
-- password. Failures count per address and per source in shared memory;
-- while either is locked out, login refuses (28000) without checking the
-- password.
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop.login(email text, password text, source text DEFAULT NULL, user_agent text DEFAULT NULL)
RETURNS SETOF eventshop.token_pair
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic
AS $$
DECLARE
	v_source		text := nullif(btrim(login.source), '');
	v_agent			text := left(regexp_replace(login.user_agent, '[[:cntrl:]]', '', 'g'), 512);
	v_email			text;
	v_email_hash	text;
	v_user			eventshop.users%ROWTYPE;
	v_ok			boolean;
	v_wait			integer;
	v_locked		integer;
	v_session		uuid := gen_random_uuid();
	v_now			timestamptz := clock_timestamp();
	v_rehashed		boolean := false;
BEGIN
	PERFORM eventshop.flush_security_events();
	IF v_source IS NOT NULL AND (octet_length(v_source) > 255 OR v_source ~ '[[:cntrl:]]') THEN
		RAISE EXCEPTION 'invalid source'
			USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass the client address, at most 255 printable bytes.';
	END IF;

	IF login.email IS NOT NULL AND octet_length(login.email) <= 1024 THEN
		BEGIN
			v_email := eventshop._normalize_email(login.email);
		EXCEPTION WHEN null_value_not_allowed OR invalid_parameter_value THEN
			v_email := NULL;
		END;
	END IF;
	IF v_email IS NULL OR login.password IS NULL OR login.password = ''
	   OR octet_length(login.password) > 4096 THEN
		-- no account can match: count it against the source only
		PERFORM eventshop._login_throttle_failure(NULL, v_source);
		RAISE EXCEPTION 'invalid e-mail or password' USING ERRCODE = 'invalid_password';
	END IF;

	v_wait := eventshop._login_throttle_check(v_email, v_source);
	IF v_wait > 0 THEN
		RAISE EXCEPTION 'too many failed login attempts'
			USING ERRCODE = 'invalid_authorization_specification',
				  HINT = format('Try again in %s seconds.', v_wait);
	END IF;

	v_email_hash := eventshop._pii_hash(v_email);
	SELECT u.* INTO v_user FROM eventshop.users u WHERE u.email = v_email;
	IF FOUND THEN
		v_ok := eventshop._verify_password(login.password, v_user.password_hash);
	ELSE
		v_ok := eventshop._dummy_verify_password(login.password);
	END IF;

	IF NOT v_ok THEN
		v_locked := eventshop._login_throttle_failure(v_email, v_source);
		IF v_user.id IS NOT NULL THEN
			PERFORM eventshop._defer_event(v_user.id::text, 'user.login_failed',
				jsonb_build_object('user_id', v_user.id, 'email_hash', v_email_hash,
								   'source_hash', eventshop._pii_hash(v_source),
								   'reason', 'wrong_password', 'occurred_at', clock_timestamp()));
			IF v_locked > 0 THEN
				PERFORM eventshop._defer_event(v_user.id::text, 'user.locked',
					jsonb_build_object('user_id', v_user.id, 'email_hash', v_email_hash,
									   'locked_seconds', v_locked,
									   'locked_until', clock_timestamp() + make_interval(secs => v_locked),
									   'occurred_at', clock_timestamp()));
			END IF;
		END IF;
		RAISE EXCEPTION 'invalid e-mail or password' USING ERRCODE = 'invalid_password';
	END IF;

	IF v_user.blocked_at IS NOT NULL THEN
		PERFORM eventshop._defer_event(v_user.id::text, 'user.login_failed',
			jsonb_build_object('user_id', v_user.id, 'email_hash', v_email_hash,
							   'source_hash', eventshop._pii_hash(v_source),
							   'reason', 'blocked', 'occurred_at', clock_timestamp()));
		RAISE EXCEPTION 'account is blocked'
			USING ERRCODE = 'invalid_authorization_specification',
				  HINT = 'Contact support to have the account unblocked.';
	END IF;

	PERFORM eventshop._login_throttle_success(v_email);
	IF eventshop._password_needs_rehash(v_user.password_hash) THEN
		UPDATE eventshop.users u SET password_hash = eventshop._hash_password(login.password)
		WHERE u.id = v_user.id;
		v_rehashed := true;
	END IF;

	INSERT INTO eventshop.sessions (id, user_id, created_at, last_used_at, expires_at, generation, source, user_agent)
	VALUES (v_session, v_user.id, v_now, v_now, v_now, 0, v_source, nullif(v_agent, ''));
	PERFORM eventshop._emit_event('auth.events', v_user.id::text, 'user.logged_in',
		jsonb_build_object('user_id', v_user.id, 'email_hash', v_email_hash, 'session_id', v_session,
						   'source_hash', eventshop._pii_hash(v_source), 'password_rehashed', v_rehashed));
	RETURN NEXT eventshop._issue_tokens(v_user.id, v_user.roles, v_session, 1);
END
$$;
COMMENT ON FUNCTION eventshop.login(text, text, text, text) IS 'Verifies e-mail and password and opens a session: returns an access JWT, a refresh token, ''Bearer'', the access token lifetime and the session id; emits user.logged_in. Errors: 28P01 invalid e-mail or password (the same for unknown accounts), 28000 account blocked or too many failed attempts (source: the client address, counted for lockout).';

-- ---------------------------------------------------------------------------
-- refresh. Rotates the refresh token: the presented token is marked used and
-- a new one (and a new access token) is returned. All refreshes of a session
-- are serialised on the session row, so concurrent refreshes of one token
-- never both succeed. Presenting a token that was already rotated:
--   - the immediately previous token, within eventshop.refresh_reuse_grace
--     of its rotation: refused (28000 'refresh token already used'); the
--     session lives on. This is the loser of a race between two tabs or a
--     retried request: it must pick up the token the winner received. No new
--     pair is handed out, because that would leave two live tokens (or kill
--     the winner's), and a thief replaying a token quickly would get one.
--   - any other rotated token: treated as theft. The whole session (every
--     token of the chain, and its access tokens) is revoked, user.session_revoked
--     is emitted, and refresh returns NO ROW rather than raising, so that the
--     revocation commits with the caller's transaction.
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop.refresh(refresh_token text)
RETURNS SETOF eventshop.token_pair
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic
AS $$
DECLARE
	v_hash		bytea;
	v_session_id uuid;
	v_session	eventshop.sessions%ROWTYPE;
	v_token		eventshop.refresh_tokens%ROWTYPE;
	v_user		eventshop.users%ROWTYPE;
	v_now		timestamptz;
BEGIN
	PERFORM eventshop.flush_security_events();
	IF NOT eventshop._is_opaque_token(refresh.refresh_token) THEN
		RAISE EXCEPTION 'invalid refresh token' USING ERRCODE = 'invalid_authorization_specification';
	END IF;
	v_hash := eventshop._token_hash(refresh.refresh_token);
	SELECT t.session_id INTO v_session_id FROM eventshop.refresh_tokens t WHERE t.token_hash = v_hash;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'invalid refresh token' USING ERRCODE = 'invalid_authorization_specification';
	END IF;

	-- wait for concurrent refreshes of this session, then look again
	SELECT s.* INTO v_session FROM eventshop.sessions s WHERE s.id = v_session_id FOR UPDATE;
	SELECT t.* INTO v_token FROM eventshop.refresh_tokens t WHERE t.token_hash = v_hash;
	SELECT u.* INTO v_user FROM eventshop.users u WHERE u.id = v_session.user_id;
	v_now := clock_timestamp();

	IF v_session.revoked_at IS NOT NULL OR v_session.expires_at <= v_now THEN
		RAISE EXCEPTION 'invalid refresh token'
			USING ERRCODE = 'invalid_authorization_specification', DETAIL = 'The session has ended.';
	END IF;
	IF v_user.blocked_at IS NOT NULL THEN
		RAISE EXCEPTION 'invalid refresh token'
			USING ERRCODE = 'invalid_authorization_specification', DETAIL = 'The account is blocked.';
	END IF;

	IF v_token.rotated_at IS NOT NULL THEN
		IF v_token.generation = v_session.generation - 1
		   AND v_now - v_token.rotated_at <= current_setting('eventshop.refresh_reuse_grace')::interval THEN
			RAISE EXCEPTION 'refresh token already used'
				USING ERRCODE = 'invalid_authorization_specification',
					  DETAIL = 'A concurrent refresh rotated this token moments ago.',
					  HINT = 'Use the refresh token that the other refresh returned.';
		END IF;
		UPDATE eventshop.sessions s SET revoked_at = v_now, revoked_reason = 'refresh_token_reuse'
		WHERE s.id = v_session.id;
		PERFORM eventshop._emit_event('auth.events', v_user.id::text, 'user.session_revoked',
			jsonb_build_object('user_id', v_user.id, 'email_hash', eventshop._pii_hash(v_user.email),
							   'session_id', v_session.id, 'reason', 'refresh_token_reuse'));
		RETURN;
	END IF;
	IF v_token.expires_at <= v_now THEN
		RAISE EXCEPTION 'invalid refresh token'
			USING ERRCODE = 'invalid_authorization_specification', DETAIL = 'The refresh token has expired.';
	END IF;

	UPDATE eventshop.refresh_tokens t SET rotated_at = v_now WHERE t.token_hash = v_hash;
	RETURN NEXT eventshop._issue_tokens(v_user.id, v_user.roles, v_session.id, v_session.generation + 1);
END
$$;
COMMENT ON FUNCTION eventshop.refresh(text) IS 'Exchanges a refresh token for a new access token and a new refresh token (rotation). Errors: 28000 invalid, expired or ended. A replayed older token revokes the session and returns no row; the previous token replayed within eventshop.refresh_reuse_grace is refused without revoking.';

-- ---------------------------------------------------------------------------
-- authenticate. Verifies the access token (signature with the key named by
-- kid and that key's algorithm only: eventshop._jwt_verify), then every
-- claim, then the session and the account in the current snapshot, and
-- establishes the caller for the rest of the transaction.
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop.authenticate(token text)
RETURNS eventshop.caller
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic
AS $$
DECLARE
	v_claims	jsonb;
	v_now		numeric;
	v_aud		jsonb;
	v_sub		uuid;
	v_sid		uuid;
	v_iat		numeric;
	v_session	record;
	v_uuid_re	constant text := '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$';
	v_result	eventshop.caller;
BEGIN
	IF authenticate.token IS NULL THEN
		PERFORM eventshop._invalid_token('No token was given.');
	END IF;
	v_claims := eventshop._jwt_verify(authenticate.token);
	v_now := extract(epoch FROM clock_timestamp());

	IF jsonb_typeof(v_claims->'iss') IS DISTINCT FROM 'string'
	   OR v_claims->>'iss' <> current_setting('eventshop.jwt_issuer') THEN
		PERFORM eventshop._invalid_token('The issuer (iss) is missing or wrong.');
	END IF;
	v_aud := v_claims->'aud';
	IF NOT (jsonb_typeof(v_aud) = 'string' AND v_aud #>> '{}' = current_setting('eventshop.jwt_audience')
			OR jsonb_typeof(v_aud) = 'array' AND v_aud @> jsonb_build_array(current_setting('eventshop.jwt_audience')))
	   OR v_aud IS NULL THEN
		PERFORM eventshop._invalid_token('The audience (aud) is missing or wrong.');
	END IF;
	IF jsonb_typeof(v_claims->'typ') IS DISTINCT FROM 'string' OR v_claims->>'typ' <> 'access' THEN
		PERFORM eventshop._invalid_token('The token is not an access token (typ).');
	END IF;
	IF jsonb_typeof(v_claims->'exp') IS DISTINCT FROM 'number'
	   OR jsonb_typeof(v_claims->'nbf') IS DISTINCT FROM 'number'
	   OR jsonb_typeof(v_claims->'iat') IS DISTINCT FROM 'number' THEN
		PERFORM eventshop._invalid_token('The time claims (exp, nbf, iat) must be numbers.');
	END IF;
	IF (v_claims->>'exp')::numeric <= v_now THEN
		PERFORM eventshop._invalid_token('The token has expired.');
	END IF;
	IF (v_claims->>'nbf')::numeric > v_now THEN
		PERFORM eventshop._invalid_token('The token is not valid yet (nbf).');
	END IF;
	v_iat := (v_claims->>'iat')::numeric;
	IF v_iat > v_now THEN
		PERFORM eventshop._invalid_token('The token was issued in the future (iat).');
	END IF;
	IF jsonb_typeof(v_claims->'jti') IS DISTINCT FROM 'string'
	   OR octet_length(v_claims->>'jti') NOT BETWEEN 1 AND 128 THEN
		PERFORM eventshop._invalid_token('The token id (jti) is missing.');
	END IF;
	IF jsonb_typeof(v_claims->'sub') IS DISTINCT FROM 'string' OR v_claims->>'sub' !~ v_uuid_re THEN
		PERFORM eventshop._invalid_token('The subject (sub) is missing or not a user id.');
	END IF;
	IF jsonb_typeof(v_claims->'sid') IS DISTINCT FROM 'string' OR v_claims->>'sid' !~ v_uuid_re THEN
		PERFORM eventshop._invalid_token('The session (sid) is missing or not a session id.');
	END IF;
	v_sub := (v_claims->>'sub')::uuid;
	v_sid := (v_claims->>'sid')::uuid;

	SELECT s.user_id, s.revoked_at, s.expires_at, u.roles, u.blocked_at, u.valid_after INTO v_session
	FROM eventshop.sessions s JOIN eventshop.users u ON u.id = s.user_id
	WHERE s.id = v_sid;
	IF NOT FOUND OR v_session.user_id <> v_sub THEN
		PERFORM eventshop._invalid_token('The session is unknown.');
	END IF;
	IF v_session.revoked_at IS NOT NULL OR v_session.expires_at <= clock_timestamp() THEN
		PERFORM eventshop._invalid_token('The session has ended.');
	END IF;
	IF v_session.blocked_at IS NOT NULL THEN
		PERFORM eventshop._invalid_token('The account is blocked.');
	END IF;
	-- second granularity, as iat: tokens issued in an earlier second are refused
	IF v_iat < extract(epoch FROM date_trunc('second', v_session.valid_after)) THEN
		PERFORM eventshop._invalid_token('The token was issued before the account''s credentials changed.');
	END IF;

	PERFORM eventshop._set_auth_context(v_sub, v_session.roles, v_sid);
	v_result.user_id := v_sub;
	v_result.roles := v_session.roles;
	v_result.session_id := v_sid;
	RETURN v_result;
END
$$;
COMMENT ON FUNCTION eventshop.authenticate(text) IS 'Verifies an access token (signature, iss, aud, typ, exp, nbf, iat, jti, sub, sid; session live; account not blocked; iat not before the account''s valid_after) and establishes the caller for the rest of the transaction. Errors: 28000 invalid token (with a detail saying why).';

-- ---------------------------------------------------------------------------
-- Sessions of the authenticated user.
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop.logout(scope text DEFAULT 'session')
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_user		uuid := eventshop._require_user();
	v_session	uuid := eventshop.current_session_id();
	v_count		integer;
BEGIN
	IF scope IS NULL OR scope NOT IN ('session', 'all', 'others') THEN
		RAISE EXCEPTION 'invalid logout scope'
			USING ERRCODE = 'invalid_parameter_value', HINT = 'Use ''session'', ''all'' or ''others''.';
	END IF;
	IF scope = 'session' THEN
		UPDATE eventshop.sessions s SET revoked_at = clock_timestamp(), revoked_reason = 'logout'
		WHERE s.id = v_session AND s.revoked_at IS NULL;
		GET DIAGNOSTICS v_count = ROW_COUNT;
	ELSE
		v_count := eventshop._revoke_sessions(v_user, 'logout',
											   CASE WHEN scope = 'others' THEN v_session END);
	END IF;
	PERFORM eventshop._emit_event('auth.events', v_user::text, 'user.logged_out',
		jsonb_build_object('user_id', v_user,
						   'email_hash', (SELECT eventshop._pii_hash(u.email) FROM eventshop.users u WHERE u.id = v_user),
						   'session_id', v_session, 'scope', scope, 'sessions_revoked', v_count));
	IF scope <> 'others' THEN
		PERFORM eventshop._clear_auth_context();
	END IF;
	RETURN v_count;
END
$$;
COMMENT ON FUNCTION eventshop.logout(text) IS 'Ends the caller''s current session (''session''), all its sessions (''all'') or all but the current one (''others''); returns how many sessions ended and emits user.logged_out. Requires authenticate.';

CREATE FUNCTION eventshop.list_sessions()
RETURNS TABLE (session_id uuid, created_at timestamptz, last_used_at timestamptz, expires_at timestamptz,
			   source text, user_agent text, current boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_user		uuid := eventshop._require_user();
	v_session	uuid := eventshop.current_session_id();
BEGIN
	RETURN QUERY
	SELECT s.id, s.created_at, s.last_used_at, s.expires_at, s.source, s.user_agent, s.id = v_session
	FROM eventshop.sessions s
	WHERE s.user_id = v_user AND s.revoked_at IS NULL AND s.expires_at > clock_timestamp()
	ORDER BY s.created_at DESC, s.id;
END
$$;
COMMENT ON FUNCTION eventshop.list_sessions() IS 'The caller''s live sessions, newest first, marking the current one. Requires authenticate.';

CREATE FUNCTION eventshop.revoke_session(session_id uuid)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_user uuid := eventshop._require_user();
BEGIN
	UPDATE eventshop.sessions s SET revoked_at = clock_timestamp(), revoked_reason = 'revoked_by_user'
	WHERE s.id = revoke_session.session_id AND s.user_id = v_user AND s.revoked_at IS NULL;
	IF NOT FOUND THEN
		-- the same for someone else's session as for none at all
		RAISE EXCEPTION 'no such session' USING ERRCODE = 'no_data_found';
	END IF;
	PERFORM eventshop._emit_event('auth.events', v_user::text, 'user.session_revoked',
		jsonb_build_object('user_id', v_user,
						   'email_hash', (SELECT eventshop._pii_hash(u.email) FROM eventshop.users u WHERE u.id = v_user),
						   'session_id', revoke_session.session_id, 'reason', 'revoked_by_user'));
	IF revoke_session.session_id = eventshop.current_session_id() THEN
		PERFORM eventshop._clear_auth_context();
	END IF;
END
$$;
COMMENT ON FUNCTION eventshop.revoke_session(uuid) IS 'Ends one of the caller''s live sessions; emits user.session_revoked. Errors: P0002 when the caller has no such live session. Requires authenticate.';

-- ---------------------------------------------------------------------------
-- Passwords.
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop.change_password(current_password text, new_password text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic
AS $$
DECLARE
	v_user_id	uuid := eventshop._require_user();
	v_user		eventshop.users%ROWTYPE;
	v_locked	integer;
	v_count		integer;
BEGIN
	SELECT u.* INTO v_user FROM eventshop.users u WHERE u.id = v_user_id FOR UPDATE;
	IF eventshop._login_throttle_check(v_user.email, NULL) > 0 THEN
		RAISE EXCEPTION 'too many failed login attempts' USING ERRCODE = 'invalid_authorization_specification';
	END IF;
	-- a stolen access token must not become a way to guess the password
	IF current_password IS NULL OR octet_length(current_password) > 4096
	   OR NOT eventshop._verify_password(current_password, v_user.password_hash) THEN
		v_locked := eventshop._login_throttle_failure(v_user.email, NULL);
		PERFORM eventshop._defer_event(v_user.id::text, 'user.login_failed',
			jsonb_build_object('user_id', v_user.id, 'email_hash', eventshop._pii_hash(v_user.email),
							   'reason', 'wrong_current_password', 'occurred_at', clock_timestamp()));
		IF v_locked > 0 THEN
			PERFORM eventshop._defer_event(v_user.id::text, 'user.locked',
				jsonb_build_object('user_id', v_user.id, 'email_hash', eventshop._pii_hash(v_user.email),
								   'locked_seconds', v_locked,
								   'locked_until', clock_timestamp() + make_interval(secs => v_locked),
								   'occurred_at', clock_timestamp()));
		END IF;
		RAISE EXCEPTION 'invalid password' USING ERRCODE = 'invalid_password';
	END IF;
	PERFORM eventshop._check_password_policy(new_password);
	IF new_password = current_password THEN
		RAISE EXCEPTION 'the new password must differ from the current one' USING ERRCODE = 'invalid_parameter_value';
	END IF;

	UPDATE eventshop.users u SET password_hash = eventshop._hash_password(new_password) WHERE u.id = v_user.id;
	-- the other sessions end (their access tokens with them); this one stays
	v_count := eventshop._revoke_sessions(v_user.id, 'password_changed', eventshop.current_session_id());
	DELETE FROM eventshop.account_tokens t
	WHERE t.user_id = v_user.id AND t.purpose = 'password_reset' AND t.used_at IS NULL;
	PERFORM eventshop._login_throttle_success(v_user.email);
	PERFORM eventshop._emit_event('auth.events', v_user.id::text, 'password.changed',
		jsonb_build_object('user_id', v_user.id, 'email_hash', eventshop._pii_hash(v_user.email),
						   'method', 'change', 'sessions_revoked', v_count));
END
$$;
COMMENT ON FUNCTION eventshop.change_password(text, text) IS 'Changes the caller''s password after checking the current one; ends the caller''s other sessions and outstanding reset links; emits password.changed. Errors: 28P01 wrong current password (counted like a failed login), 22023/22004 new password refused by the policy. Requires authenticate.';

-- Sleeps until `seconds` have passed since `started`, so that a function's
-- duration does not depend on which branch it took (as long as both take
-- less); the sleep is interruptible.
CREATE FUNCTION eventshop._pad_duration(started timestamptz, seconds double precision)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT pg_sleep(greatest(0, seconds - extract(epoch FROM clock_timestamp() - started)::double precision))
$$;
COMMENT ON FUNCTION eventshop._pad_duration(timestamptz, double precision) IS 'Internal: sleeps until the given number of seconds has passed since started, to equalise the duration of branches.';

-- Request a password-reset link. The response, the work done (token, hash,
-- seal, keyed hash of the address, one row written, and so the commit) and
-- the duration (padded to 20 ms) are the same whether or not the address has
-- an account: for an unknown (or blocked) address a decoy row is written
-- that can never be redeemed, and no event.
CREATE FUNCTION eventshop.request_password_reset(email text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic
AS $$
DECLARE
	v_email		text := eventshop._normalize_email(request_password_reset.email);
	v_token		text := eventshop._random_token(32);
	v_hash		bytea := eventshop._token_hash(v_token);
	v_sealed	text := eventshop._seal(v_token);
	v_now		timestamptz := clock_timestamp();
	v_expires	timestamptz := v_now + current_setting('eventshop.password_reset_ttl')::interval;
	v_email_hash text := eventshop._pii_hash(v_email);
	v_user		eventshop.users%ROWTYPE;
BEGIN
	SELECT u.* INTO v_user FROM eventshop.users u WHERE u.email = v_email FOR UPDATE;
	IF NOT FOUND OR v_user.blocked_at IS NOT NULL
	   -- at most one link a minute, so nobody can flood an inbox
	   OR EXISTS (SELECT FROM eventshop.account_tokens t
				  WHERE t.user_id = v_user.id AND t.purpose = 'password_reset' AND t.used_at IS NULL
					AND t.created_at > v_now - interval '1 minute') THEN
		INSERT INTO eventshop.account_tokens (token_hash, user_id, purpose, email, created_at, expires_at)
		VALUES (v_hash, NULL, 'password_reset', NULL, v_now, v_expires);
		PERFORM eventshop._pad_duration(v_now, 0.020);
		RETURN;
	END IF;

	-- only the newest link works
	DELETE FROM eventshop.account_tokens t
	WHERE t.user_id = v_user.id AND t.purpose = 'password_reset' AND t.used_at IS NULL;
	INSERT INTO eventshop.account_tokens (token_hash, user_id, purpose, email, created_at, expires_at)
	VALUES (v_hash, v_user.id, 'password_reset', v_user.email, v_now, v_expires);
	PERFORM eventshop._emit_event('auth.events', v_user.id::text, 'password.reset_requested',
		jsonb_build_object('user_id', v_user.id, 'email_hash', v_email_hash,
						   'sealed_token', v_sealed, 'expires_at', v_expires));
	PERFORM eventshop._pad_duration(v_now, 0.020);
END
$$;
COMMENT ON FUNCTION eventshop.request_password_reset(text) IS 'Sends a password-reset link: emits password.reset_requested with the single-use token sealed for the notifier (eventshop._seal), valid eventshop.password_reset_ttl. Returns nothing and takes the same time whether or not the address has an account. Errors: 22023/22004 malformed address.';

CREATE FUNCTION eventshop.reset_password(token text, new_password text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic
AS $$
DECLARE
	v_token		eventshop.account_tokens%ROWTYPE;
	v_user		eventshop.users%ROWTYPE;
	v_now		timestamptz := clock_timestamp();
	v_count		integer;
BEGIN
	IF NOT eventshop._is_opaque_token(reset_password.token) THEN
		RAISE EXCEPTION 'invalid or expired token' USING ERRCODE = 'invalid_authorization_specification';
	END IF;
	SELECT t.* INTO v_token FROM eventshop.account_tokens t
	WHERE t.token_hash = eventshop._token_hash(reset_password.token) AND t.purpose = 'password_reset'
	FOR UPDATE;
	IF NOT FOUND OR v_token.user_id IS NULL OR v_token.used_at IS NOT NULL OR v_token.expires_at <= v_now THEN
		RAISE EXCEPTION 'invalid or expired token' USING ERRCODE = 'invalid_authorization_specification';
	END IF;
	SELECT u.* INTO v_user FROM eventshop.users u WHERE u.id = v_token.user_id FOR UPDATE;
	IF v_user.email <> v_token.email OR v_user.blocked_at IS NOT NULL THEN
		RAISE EXCEPTION 'invalid or expired token' USING ERRCODE = 'invalid_authorization_specification';
	END IF;
	PERFORM eventshop._check_password_policy(new_password);

	UPDATE eventshop.users u
	SET password_hash = eventshop._hash_password(new_password),
		valid_after = v_now,
		-- the link reached the address, so the address works
		email_verified_at = coalesce(u.email_verified_at, v_now)
	WHERE u.id = v_user.id;
	UPDATE eventshop.account_tokens t SET used_at = v_now WHERE t.token_hash = v_token.token_hash;
	DELETE FROM eventshop.account_tokens t
	WHERE t.user_id = v_user.id AND t.purpose = 'password_reset' AND t.used_at IS NULL;
	v_count := eventshop._revoke_sessions(v_user.id, 'password_reset');
	PERFORM eventshop._login_throttle_success(v_user.email);
	PERFORM eventshop._emit_event('auth.events', v_user.id::text, 'password.changed',
		jsonb_build_object('user_id', v_user.id, 'email_hash', eventshop._pii_hash(v_user.email),
						   'method', 'reset', 'sessions_revoked', v_count));
END
$$;
COMMENT ON FUNCTION eventshop.reset_password(text, text) IS 'Sets a new password with a reset token (single use, within eventshop.password_reset_ttl); ends every session, refuses access tokens issued before, clears the login lockout; emits password.changed. Errors: 28000 invalid or expired token, 22023/22004 password refused by the policy.';

-- ---------------------------------------------------------------------------
-- E-mail verification.
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop.request_email_verification()
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_user		eventshop.users%ROWTYPE;
	v_token		text;
	v_now		timestamptz := clock_timestamp();
	v_expires	timestamptz := v_now + current_setting('eventshop.email_verification_ttl')::interval;
BEGIN
	SELECT u.* INTO v_user FROM eventshop.users u WHERE u.id = eventshop._require_user() FOR UPDATE;
	IF v_user.email_verified_at IS NOT NULL THEN
		RETURN false;
	END IF;
	v_token := eventshop._random_token(32);
	DELETE FROM eventshop.account_tokens t
	WHERE t.user_id = v_user.id AND t.purpose = 'email_verification' AND t.used_at IS NULL;
	INSERT INTO eventshop.account_tokens (token_hash, user_id, purpose, email, created_at, expires_at)
	VALUES (eventshop._token_hash(v_token), v_user.id, 'email_verification', v_user.email, v_now, v_expires);
	PERFORM eventshop._emit_event('auth.events', v_user.id::text, 'email.verification_requested',
		jsonb_build_object('user_id', v_user.id, 'email_hash', eventshop._pii_hash(v_user.email),
						   'sealed_token', eventshop._seal(v_token), 'expires_at', v_expires));
	RETURN true;
END
$$;
COMMENT ON FUNCTION eventshop.request_email_verification() IS 'Sends the caller a verification link: emits email.verification_requested with the single-use token sealed for the notifier, valid eventshop.email_verification_ttl. Returns false (and sends nothing) when the address is already verified. Requires authenticate.';

CREATE FUNCTION eventshop.verify_email(token text)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic
AS $$
DECLARE
	v_token	eventshop.account_tokens%ROWTYPE;
	v_user	eventshop.users%ROWTYPE;
	v_now	timestamptz := clock_timestamp();
BEGIN
	IF NOT eventshop._is_opaque_token(verify_email.token) THEN
		RAISE EXCEPTION 'invalid or expired token' USING ERRCODE = 'invalid_authorization_specification';
	END IF;
	SELECT t.* INTO v_token FROM eventshop.account_tokens t
	WHERE t.token_hash = eventshop._token_hash(verify_email.token) AND t.purpose = 'email_verification'
	FOR UPDATE;
	IF NOT FOUND OR v_token.used_at IS NOT NULL OR v_token.expires_at <= v_now THEN
		RAISE EXCEPTION 'invalid or expired token' USING ERRCODE = 'invalid_authorization_specification';
	END IF;
	SELECT u.* INTO v_user FROM eventshop.users u WHERE u.id = v_token.user_id FOR UPDATE;
	IF v_user.email <> v_token.email THEN
		RAISE EXCEPTION 'invalid or expired token' USING ERRCODE = 'invalid_authorization_specification';
	END IF;
	UPDATE eventshop.account_tokens t SET used_at = v_now WHERE t.token_hash = v_token.token_hash;
	UPDATE eventshop.users u SET email_verified_at = coalesce(u.email_verified_at, v_now) WHERE u.id = v_user.id;
	PERFORM eventshop._emit_event('auth.events', v_user.id::text, 'email.verified',
		jsonb_build_object('user_id', v_user.id, 'email_hash', eventshop._pii_hash(v_user.email)));
	RETURN v_user.id;
END
$$;
COMMENT ON FUNCTION eventshop.verify_email(text) IS 'Marks an address verified with a verification token (single use, within eventshop.email_verification_ttl); returns the user id and emits email.verified. Errors: 28000 invalid or expired token.';

-- ---------------------------------------------------------------------------
-- Administration: requires an authenticated user with the admin role (the
-- first administrator is made by a superuser:
-- UPDATE eventshop.users SET roles = '{customer,admin}' WHERE email = ...).
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop.block_user(user_id uuid, reason text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_admin	uuid := eventshop._require_admin();
	v_email	text;
	v_count	integer;
BEGIN
	IF block_user.user_id IS NULL THEN
		RAISE EXCEPTION 'user id is required' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF block_user.user_id = v_admin THEN
		RAISE EXCEPTION 'administrators cannot block their own account' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF reason IS NOT NULL AND (btrim(reason) = '' OR char_length(reason) > 500 OR reason ~ '[[:cntrl:]]') THEN
		RAISE EXCEPTION 'invalid reason'
			USING ERRCODE = 'invalid_parameter_value', HINT = 'Use 1 to 500 printable characters.';
	END IF;
	SELECT u.email INTO v_email FROM eventshop.users u WHERE u.id = block_user.user_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'no such user' USING ERRCODE = 'no_data_found';
	END IF;
	UPDATE eventshop.users u
	SET status = 'blocked', blocked_at = clock_timestamp(), blocked_reason = btrim(reason),
		valid_after = clock_timestamp()
	WHERE u.id = block_user.user_id AND u.blocked_at IS NULL;
	IF NOT FOUND THEN
		RETURN;					-- already blocked
	END IF;
	v_count := eventshop._revoke_sessions(block_user.user_id, 'blocked');
	-- the reason is free text and may name people: it stays out of the event
	PERFORM eventshop._emit_event('auth.events', block_user.user_id::text, 'user.blocked',
		jsonb_build_object('user_id', block_user.user_id, 'email_hash', eventshop._pii_hash(v_email),
						   'blocked_by', v_admin, 'sessions_revoked', v_count));
END
$$;
COMMENT ON FUNCTION eventshop.block_user(uuid, text) IS 'Blocks an account: ends its sessions, refuses its tokens and logins; emits user.blocked. Errors: P0002 no such user, 22023 own account or bad reason, 28000/42501 not an authenticated administrator.';

CREATE FUNCTION eventshop.unblock_user(user_id uuid)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_admin	uuid := eventshop._require_admin();
	v_email	text;
BEGIN
	SELECT u.email INTO v_email FROM eventshop.users u WHERE u.id = unblock_user.user_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'no such user' USING ERRCODE = 'no_data_found';
	END IF;
	UPDATE eventshop.users u SET status = 'active', blocked_at = NULL, blocked_reason = NULL
	WHERE u.id = unblock_user.user_id AND u.blocked_at IS NOT NULL;
	IF NOT FOUND THEN
		RETURN;					-- not blocked
	END IF;
	PERFORM eventshop._login_throttle_success(v_email);
	PERFORM eventshop._emit_event('auth.events', unblock_user.user_id::text, 'user.unblocked',
		jsonb_build_object('user_id', unblock_user.user_id, 'email_hash', eventshop._pii_hash(v_email),
						   'unblocked_by', v_admin));
END
$$;
COMMENT ON FUNCTION eventshop.unblock_user(uuid) IS 'Unblocks an account and clears its login lockout; emits user.unblocked. Errors: P0002 no such user, 28000/42501 not an authenticated administrator.';

CREATE FUNCTION eventshop.set_user_roles(user_id uuid, roles text[])
RETURNS text[]
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_admin	uuid := eventshop._require_admin();
	v_roles	text[];
	v_email	text;
BEGIN
	IF set_user_roles.roles IS NULL OR cardinality(set_user_roles.roles) = 0
	   OR array_position(set_user_roles.roles, NULL) IS NOT NULL
	   OR NOT set_user_roles.roles <@ ARRAY['customer', 'admin'] THEN
		RAISE EXCEPTION 'invalid roles'
			USING ERRCODE = 'invalid_parameter_value', HINT = 'Use a non-empty subset of {customer,admin}.';
	END IF;
	SELECT array_agg(DISTINCT r ORDER BY r) INTO v_roles FROM unnest(set_user_roles.roles) AS r;
	IF set_user_roles.user_id = v_admin AND NOT 'admin' = ANY (v_roles) THEN
		RAISE EXCEPTION 'administrators cannot remove their own admin role' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	UPDATE eventshop.users u SET roles = v_roles WHERE u.id = set_user_roles.user_id
	RETURNING u.email INTO v_email;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'no such user' USING ERRCODE = 'no_data_found';
	END IF;
	PERFORM eventshop._emit_event('auth.events', set_user_roles.user_id::text, 'user.roles_changed',
		jsonb_build_object('user_id', set_user_roles.user_id, 'email_hash', eventshop._pii_hash(v_email),
						   'roles', to_jsonb(v_roles), 'changed_by', v_admin));
	RETURN v_roles;
END
$$;
COMMENT ON FUNCTION eventshop.set_user_roles(uuid, text[]) IS 'Replaces an account''s roles (customer, admin) and returns them sorted; takes effect at the user''s next statement (roles are read from the account, not the token); emits user.roles_changed. Errors: P0002 no such user, 22023 invalid roles or own admin role, 28000/42501 not an authenticated administrator.';

-- Housekeeping for pg_cron: sessions that ended a day ago (with their refresh
-- tokens) and one-time tokens that expired a day ago.
CREATE FUNCTION eventshop.purge_expired_auth_data()
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_sessions	bigint;
	v_tokens	bigint;
BEGIN
	DELETE FROM eventshop.sessions s
	WHERE coalesce(s.revoked_at, s.expires_at) < clock_timestamp() - interval '1 day';
	GET DIAGNOSTICS v_sessions = ROW_COUNT;
	DELETE FROM eventshop.account_tokens t WHERE t.expires_at < clock_timestamp() - interval '1 day';
	GET DIAGNOSTICS v_tokens = ROW_COUNT;
	RETURN v_sessions + v_tokens;
END
$$;
COMMENT ON FUNCTION eventshop.purge_expired_auth_data() IS 'Deletes sessions (and their refresh tokens) that ended more than a day ago and one-time tokens that expired more than a day ago; returns how many rows. Schedule with pg_cron.';

-- ---------------------------------------------------------------------------
-- Dispatcher: consumer progress, inbox, templates and the notification queue.
-- ---------------------------------------------------------------------------
CREATE TABLE eventshop.consumer_offsets (
	group_id	text NOT NULL,
	topic		text NOT NULL,
	partition	integer NOT NULL,
	next_offset	bigint NOT NULL,
	updated_at	timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (group_id, topic, partition)
);
COMMENT ON TABLE eventshop.consumer_offsets IS 'Next Kafka offset to consume per partition, written in the same transaction as what the consumed events produced.';

CREATE TABLE eventshop.inbox (
	event_id	uuid PRIMARY KEY,
	event_type	text NOT NULL,
	topic		text NOT NULL,
	partition	integer NOT NULL,
	"offset"	bigint NOT NULL,
	received_at	timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE eventshop.inbox IS 'Every event the dispatcher consumed, by CloudEvents id: a redelivered event finds its id here and is skipped.';

CREATE TABLE eventshop.rejected_events (
	id			bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	topic		text NOT NULL,
	partition	integer NOT NULL,
	"offset"	bigint NOT NULL,
	reason		text NOT NULL,
	received_at	timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE eventshop.rejected_events IS 'Consumed messages that were not valid CloudEvents; recorded and skipped.';

CREATE TABLE eventshop.notification_templates (
	name		text PRIMARY KEY,
	channel		text NOT NULL CHECK (channel IN ('email')),
	subject		text NOT NULL,
	body_text	text NOT NULL
);
COMMENT ON TABLE eventshop.notification_templates IS 'Message templates; {{display_name}} and {{email}} are replaced with the recipient''s data.';

CREATE TABLE eventshop.notification_rules (
	event_type	text NOT NULL,
	template	text NOT NULL REFERENCES eventshop.notification_templates (name),
	PRIMARY KEY (event_type, template)
);
COMMENT ON TABLE eventshop.notification_rules IS 'Which templates an event type produces.';

INSERT INTO eventshop.notification_templates (name, channel, subject, body_text) VALUES
	('welcome', 'email', 'Welcome to eventshop, {{display_name}}',
	 E'Hello {{display_name}},\n\nyour eventshop account for {{email}} is ready.\n\nThe eventshop team\n');
INSERT INTO eventshop.notification_rules (event_type, template) VALUES ('user.registered', 'welcome');

CREATE TABLE eventshop.notifications (
	id				uuid PRIMARY KEY DEFAULT gen_random_uuid(),
	event_id		uuid NOT NULL,
	template		text NOT NULL,
	channel			text NOT NULL,
	user_id			uuid,
	recipient		text NOT NULL,
	subject			text NOT NULL,
	body_text		text NOT NULL,
	status			text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dead')),
	attempts		integer NOT NULL DEFAULT 0,
	next_attempt_at	timestamptz NOT NULL DEFAULT now(),
	last_error		text,
	created_at		timestamptz NOT NULL DEFAULT now(),
	sent_at			timestamptz,
	UNIQUE (event_id, template)
);
CREATE INDEX notifications_due_idx ON eventshop.notifications (next_attempt_at) WHERE status = 'pending';
COMMENT ON TABLE eventshop.notifications IS 'Notification queue: one row per (event, template), sent by the dispatcher with retries; dead rows exhausted their attempts or failed permanently.';

CREATE TABLE eventshop.notification_attempts (
	id				bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	notification_id	uuid NOT NULL REFERENCES eventshop.notifications (id) ON DELETE CASCADE,
	attempted_at	timestamptz NOT NULL DEFAULT clock_timestamp(),
	succeeded		boolean NOT NULL,
	response		text
);
CREATE INDEX notification_attempts_notification_idx ON eventshop.notification_attempts (notification_id);
COMMENT ON TABLE eventshop.notification_attempts IS 'Every delivery attempt with the server''s response.';

-- pg_dump keeps the dispatcher's progress and queue: losing the inbox or the
-- offsets on restore would send every e-mail again.
SELECT pg_catalog.pg_extension_config_dump('eventshop.consumer_offsets', '');
SELECT pg_catalog.pg_extension_config_dump('eventshop.inbox', '');
SELECT pg_catalog.pg_extension_config_dump('eventshop.rejected_events', '');
SELECT pg_catalog.pg_extension_config_dump('eventshop.rejected_events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('eventshop.notifications', '');
SELECT pg_catalog.pg_extension_config_dump('eventshop.notification_attempts', '');
SELECT pg_catalog.pg_extension_config_dump('eventshop.notification_attempts_id_seq', '');

CREATE TRIGGER notifications_wake_dispatcher
	AFTER INSERT OR UPDATE ON eventshop.notifications
	FOR EACH STATEMENT EXECUTE FUNCTION eventshop._wake_worker_on_commit('dispatcher');

-- Records one consumed message: advances the stored offset, skips it when
-- its event id was seen before, and queues the notifications its rules ask
-- for. Returns 'queued', 'duplicate', 'ignored' or 'rejected'. Called by the
-- dispatcher in the transaction that also stores its progress.
CREATE FUNCTION eventshop._ingest_event(group_id text, topic text, partition integer, "offset" bigint,
										event_id text, event_type text, payload text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_event	jsonb;
	v_id	uuid;
	v_user	eventshop.users%ROWTYPE;
	v_rule	record;
	v_count	integer := 0;
BEGIN
	INSERT INTO eventshop.consumer_offsets AS co (group_id, topic, partition, next_offset)
	VALUES (_ingest_event.group_id, _ingest_event.topic, _ingest_event.partition, _ingest_event."offset" + 1)
	ON CONFLICT ON CONSTRAINT consumer_offsets_pkey DO UPDATE
		SET next_offset = GREATEST(co.next_offset, EXCLUDED.next_offset), updated_at = now();

	BEGIN
		v_event := payload::jsonb;
		v_id := coalesce(event_id, v_event->>'id')::uuid;
	EXCEPTION WHEN data_exception OR program_limit_exceeded THEN
		v_event := NULL;
	END;
	IF v_event IS NULL OR v_id IS NULL OR jsonb_typeof(v_event) <> 'object'
	   OR coalesce(event_type, v_event->>'type') IS NULL THEN
		INSERT INTO eventshop.rejected_events (topic, partition, "offset", reason)
		VALUES (_ingest_event.topic, _ingest_event.partition, _ingest_event."offset",
				'not a CloudEvents JSON document with an id and a type');
		RETURN 'rejected';
	END IF;

	INSERT INTO eventshop.inbox (event_id, event_type, topic, partition, "offset")
	VALUES (v_id, coalesce(event_type, v_event->>'type'), _ingest_event.topic,
			_ingest_event.partition, _ingest_event."offset")
	ON CONFLICT DO NOTHING;
	IF NOT FOUND THEN
		RETURN 'duplicate';
	END IF;

	FOR v_rule IN
		SELECT t.* FROM eventshop.notification_rules r
		JOIN eventshop.notification_templates t ON t.name = r.template
		WHERE r.event_type = coalesce(_ingest_event.event_type, v_event->>'type')
	LOOP
		-- recipients come from the account, never from the event's masked data
		IF v_user.id IS NULL THEN
			SELECT u.* INTO v_user FROM eventshop.users u
			WHERE u.id::text = v_event->>'subject';
			IF NOT FOUND THEN
				EXIT;
			END IF;
		END IF;
		INSERT INTO eventshop.notifications (event_id, template, channel, user_id, recipient, subject, body_text)
		VALUES (v_id, v_rule.name, v_rule.channel, v_user.id, v_user.email,
				replace(replace(v_rule.subject, '{{display_name}}', v_user.display_name), '{{email}}', v_user.email),
				replace(replace(v_rule.body_text, '{{display_name}}', v_user.display_name), '{{email}}', v_user.email))
		ON CONFLICT DO NOTHING;
		v_count := v_count + 1;
	END LOOP;
	RETURN CASE WHEN v_count > 0 THEN 'queued' ELSE 'ignored' END;
END
$$;
COMMENT ON FUNCTION eventshop._ingest_event(text, text, integer, bigint, text, text, text) IS 'Internal (dispatcher): stores one consumed message idempotently and queues its notifications.';

-- Leases up to batch_size due notifications to the caller for lease_seconds:
-- if the sender dies mid-send, the rows become due again when the lease ends.
CREATE FUNCTION eventshop._claim_notifications(batch_size integer, lease_seconds integer DEFAULT 60)
RETURNS TABLE (id uuid, channel text, recipient text, subject text, body_text text, attempts integer)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
	UPDATE eventshop.notifications n
	SET attempts = n.attempts + 1,
		next_attempt_at = clock_timestamp() + make_interval(secs => lease_seconds)
	WHERE n.id IN (SELECT d.id FROM eventshop.notifications d
				   WHERE d.status = 'pending' AND d.next_attempt_at <= clock_timestamp()
				   ORDER BY d.next_attempt_at
				   LIMIT batch_size
				   FOR UPDATE SKIP LOCKED)
	RETURNING n.id, n.channel, n.recipient, n.subject, n.body_text, n.attempts
$$;
COMMENT ON FUNCTION eventshop._claim_notifications(integer, integer) IS 'Internal (dispatcher): claims due notifications for one sending round.';

-- Records the outcome of one attempt: sent, retry later with exponential
-- backoff and jitter, or dead-letter (permanent failure or attempts used up).
CREATE FUNCTION eventshop._record_delivery(notification_id uuid, succeeded boolean, permanent boolean,
										   response text, max_attempts integer)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_attempts	integer;
	v_status	text;
BEGIN
	INSERT INTO eventshop.notification_attempts (notification_id, succeeded, response)
	VALUES (notification_id, succeeded, left(response, 2000));

	SELECT n.attempts, n.status INTO v_attempts, v_status FROM eventshop.notifications n
	WHERE n.id = _record_delivery.notification_id FOR UPDATE;
	IF v_status IS DISTINCT FROM 'pending' THEN
		RETURN v_status;		-- a late report never reopens a sent or dead notification
	END IF;

	v_status := CASE WHEN succeeded THEN 'sent'
					 WHEN permanent OR v_attempts >= max_attempts THEN 'dead'
					 ELSE 'pending' END;
	UPDATE eventshop.notifications n
	SET status = v_status,
		sent_at = CASE WHEN succeeded THEN clock_timestamp() END,
		last_error = CASE WHEN succeeded THEN NULL ELSE left(response, 2000) END,
		next_attempt_at = CASE WHEN v_status = 'pending'
							   THEN clock_timestamp() + make_interval(secs =>
									least(3600, 2 ^ least(v_attempts, 12)) * (0.5 + random() / 2))
							   ELSE n.next_attempt_at END
	WHERE n.id = _record_delivery.notification_id;
	RETURN v_status;
END
$$;
COMMENT ON FUNCTION eventshop._record_delivery(uuid, boolean, boolean, text, integer) IS 'Internal (dispatcher): records a delivery attempt and schedules a retry or dead-letters.';

-- Seconds until the next pending notification is due (NULL when none), so
-- the dispatcher sleeps exactly until then.
CREATE FUNCTION eventshop._seconds_until_next_notification()
RETURNS double precision
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
	-- greatest() ignores NULLs, so the no-pending case needs its own branch
	SELECT CASE WHEN min(n.next_attempt_at) IS NOT NULL
				THEN greatest(0, extract(epoch FROM min(n.next_attempt_at) - clock_timestamp()))::double precision
		   END
	FROM eventshop.notifications n WHERE n.status = 'pending'
$$;
COMMENT ON FUNCTION eventshop._seconds_until_next_notification() IS 'Internal (dispatcher): how long until the next pending notification is due.';

CREATE VIEW eventshop.notification_status AS
SELECT status, channel, count(*) AS notifications,
	   max(clock_timestamp() - created_at) FILTER (WHERE status = 'pending') AS oldest_pending_age
FROM eventshop.notifications
GROUP BY status, channel;
COMMENT ON VIEW eventshop.notification_status IS 'Notification queue depth by state and channel.';

-- ---------------------------------------------------------------------------
-- Signing keys, JWT and secrets (C: src/crypto_util.c, src/key_store.c,
-- src/jwt.c, src/sealed_box.c). Keys move standby -> active -> retired ->
-- revoked, one active key per algorithm. kid is the RFC 7638 thumbprint of
-- the public key; private keys are stored only sealed (AES-256-GCM under a
-- key derived from eventshop.key_file, kid as additional data) and are
-- erased when a key is retired or revoked.
-- ---------------------------------------------------------------------------
CREATE TABLE eventshop.signing_keys (
	kid					text PRIMARY KEY CHECK (kid ~ '^[A-Za-z0-9_-]{43}$'),
	alg					text NOT NULL CHECK (alg IN ('RS256', 'ES256', 'EdDSA')),
	state				text NOT NULL DEFAULT 'standby'
						CHECK (state IN ('standby', 'active', 'retired', 'revoked')),
	public_jwk			jsonb NOT NULL CHECK (jsonb_typeof(public_jwk) = 'object'),
	private_key_sealed	bytea,
	created_at			timestamptz NOT NULL DEFAULT clock_timestamp(),
	activated_at		timestamptz,
	retired_at			timestamptz,
	revoked_at			timestamptz,
	CONSTRAINT signing_keys_private_key_check
		CHECK ((private_key_sealed IS NOT NULL) = (state IN ('standby', 'active'))),
	CONSTRAINT signing_keys_state_times_check
		CHECK ((state <> 'active' OR activated_at IS NOT NULL)
			   AND (state <> 'retired' OR retired_at IS NOT NULL)
			   AND (state <> 'revoked' OR revoked_at IS NOT NULL))
);
CREATE UNIQUE INDEX signing_keys_one_active_per_alg ON eventshop.signing_keys (alg) WHERE state = 'active';
COMMENT ON TABLE eventshop.signing_keys IS 'JWT signing keys. kid is the RFC 7638 thumbprint of public_jwk; private_key_sealed is 0x01 || nonce || AES-256-GCM(PKCS#8 DER) || tag under the key derived from eventshop.key_file, kept only while the key is standby or active.';
SELECT pg_catalog.pg_extension_config_dump('eventshop.signing_keys', '');

CREATE FUNCTION eventshop._generate_signing_key(alg text, OUT kid text, OUT public_jwk jsonb, OUT private_key_sealed bytea)
RETURNS record
AS 'MODULE_PATHNAME', 'eventshop_generate_signing_key'
LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION eventshop._generate_signing_key(text) IS 'Internal: a new RS256 (RSA-2048), ES256 (P-256) or EdDSA (Ed25519) key pair: its thumbprint kid, public JWK and sealed private key. Stores nothing.';

CREATE FUNCTION eventshop._jwt_sign(claims jsonb, alg text DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'eventshop_jwt_sign'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION eventshop._jwt_sign(jsonb, text) IS 'Internal: a compact JWS of the claims signed by the active key of alg (eventshop.jwt_default_alg when NULL); 55000 when that algorithm has no active key.';

CREATE FUNCTION eventshop._jwt_verify(token text)
RETURNS jsonb
AS 'MODULE_PATHNAME', 'eventshop_jwt_verify'
LANGUAGE C STABLE;
COMMENT ON FUNCTION eventshop._jwt_verify(text) IS 'Internal: the claims of a token after strict checks of size, encoding, header, key state, algorithm and signature; any failure, NULL included, raises 28000 "invalid token". Claims themselves are checked by the caller.';

CREATE FUNCTION eventshop._pii_hash(value text)
RETURNS text
AS 'MODULE_PATHNAME', 'eventshop_pii_hash'
LANGUAGE C STRICT STABLE;
COMMENT ON FUNCTION eventshop._pii_hash(text) IS 'Internal: keyed pseudonym of a PII value for events (HMAC-SHA256 under a key derived from eventshop.key_file, base64url, 22 characters).';

CREATE FUNCTION eventshop._random_token(nbytes integer DEFAULT 32)
RETURNS text
AS 'MODULE_PATHNAME', 'eventshop_random_token'
LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION eventshop._random_token(integer) IS 'Internal: base64url of nbytes (16 to 64) random bytes from the CSPRNG.';

CREATE FUNCTION eventshop._token_hash(token text)
RETURNS bytea
AS 'MODULE_PATHNAME', 'eventshop_token_hash'
LANGUAGE C STRICT IMMUTABLE;
COMMENT ON FUNCTION eventshop._token_hash(text) IS 'Internal: SHA-256 of a token; tokens are stored only in this form.';

CREATE FUNCTION eventshop._seal(plaintext text)
RETURNS text
AS 'MODULE_PATHNAME', 'eventshop_seal'
LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION eventshop._seal(text) IS 'Internal: X25519 + HKDF-SHA256 + AES-256-GCM sealed box of a secret for the holder of eventshop.seal_private_key_file (base64url).';

CREATE FUNCTION eventshop._open_sealed(sealed text)
RETURNS text
AS 'MODULE_PATHNAME', 'eventshop_open_sealed'
LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION eventshop._open_sealed(text) IS 'Internal (dispatcher): opens a value made by _seal with the private key in eventshop.seal_private_key_file.';

-- The algorithm an admin function works on: the argument, or the default setting.
CREATE FUNCTION eventshop._signing_alg(alg text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v text := coalesce(alg, current_setting('eventshop.jwt_default_alg'));
BEGIN
	IF v NOT IN ('RS256', 'ES256', 'EdDSA') THEN
		RAISE EXCEPTION 'unsupported signing algorithm'
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Use RS256, ES256 or EdDSA (case-sensitive).';
	END IF;
	RETURN v;
END
$$;
COMMENT ON FUNCTION eventshop._signing_alg(text) IS 'Internal: validates a signing algorithm name, defaulting to eventshop.jwt_default_alg.';

CREATE FUNCTION eventshop.create_signing_key(alg text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_key record;
BEGIN
	SELECT g.kid, g.public_jwk, g.private_key_sealed INTO v_key
	FROM eventshop._generate_signing_key(eventshop._signing_alg(create_signing_key.alg)) g;
	INSERT INTO eventshop.signing_keys (kid, alg, state, public_jwk, private_key_sealed)
	VALUES (v_key.kid, v_key.public_jwk->>'alg', 'standby', v_key.public_jwk, v_key.private_key_sealed);
	RETURN v_key.kid;
END
$$;
COMMENT ON FUNCTION eventshop.create_signing_key(text) IS 'Creates a standby signing key (published in jwks(), not yet signing) for alg (default eventshop.jwt_default_alg) and returns its kid. Needs eventshop.key_file.';

CREATE FUNCTION eventshop.rotate_signing_keys(alg text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_alg	text := eventshop._signing_alg(rotate_signing_keys.alg);
	v_kid	text;
BEGIN
	-- one rotation at a time; readers (signing, verification) are not blocked
	LOCK TABLE eventshop.signing_keys IN SHARE ROW EXCLUSIVE MODE;
	SELECT k.kid INTO v_kid FROM eventshop.signing_keys k
	WHERE k.alg = v_alg AND k.state = 'standby'
	ORDER BY k.created_at DESC, k.kid LIMIT 1;
	IF v_kid IS NULL THEN
		v_kid := eventshop.create_signing_key(v_alg);
	END IF;
	UPDATE eventshop.signing_keys k
	SET state = 'retired', retired_at = clock_timestamp(), private_key_sealed = NULL
	WHERE k.alg = v_alg AND k.state = 'active';
	UPDATE eventshop.signing_keys k
	SET state = 'active', activated_at = clock_timestamp()
	WHERE k.kid = v_kid;
	PERFORM eventshop.create_signing_key(v_alg);
	RETURN v_kid;
END
$$;
COMMENT ON FUNCTION eventshop.rotate_signing_keys(text) IS 'One-call rotation for alg (default eventshop.jwt_default_alg): the newest standby key (created if none) becomes active, the active key is retired (still verifying and published for access_token_ttl), a fresh standby key is created; returns the new active kid. Schedulable with pg_cron.';

CREATE FUNCTION eventshop.revoke_signing_key(kid text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	UPDATE eventshop.signing_keys k
	SET state = 'revoked', revoked_at = clock_timestamp(), private_key_sealed = NULL
	WHERE k.kid = revoke_signing_key.kid AND k.state <> 'revoked';
	IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM eventshop.signing_keys k WHERE k.kid = revoke_signing_key.kid) THEN
		RAISE EXCEPTION 'no signing key with this kid'
			USING ERRCODE = 'no_data_found';
	END IF;
END
$$;
COMMENT ON FUNCTION eventshop.revoke_signing_key(text) IS 'Revokes a signing key: tokens it signed fail verification from the next statement on, it leaves jwks() and its private key is erased. Revoking the active key stops signing for its algorithm until the next rotation.';

CREATE FUNCTION eventshop.jwks()
RETURNS jsonb
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT jsonb_build_object('keys', coalesce(jsonb_agg(k.public_jwk ORDER BY
			CASE k.state WHEN 'active' THEN 0 WHEN 'standby' THEN 1 ELSE 2 END, k.alg, k.created_at DESC, k.kid), '[]'::jsonb))
	FROM eventshop.signing_keys k
	WHERE k.state IN ('active', 'standby')
	   OR (k.state = 'retired'
		   AND k.retired_at > clock_timestamp() - current_setting('eventshop.access_token_ttl')::interval)
$$;
COMMENT ON FUNCTION eventshop.jwks() IS 'The JSON Web Key Set (RFC 7517) of the public signing keys: active, standby, and retired less than eventshop.access_token_ttl ago. Serve it at /.well-known/jwks.json.';

-- ---------------------------------------------------------------------------
-- Privileges: nothing for PUBLIC; apps may only call the API; admins and
-- monitoring may read the operational views.
-- ---------------------------------------------------------------------------
REVOKE ALL ON ALL TABLES IN SCHEMA eventshop FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA eventshop FROM PUBLIC;
GRANT EXECUTE ON FUNCTION eventshop.register(text, text, text) TO eventshop_app, eventshop_admin;
-- Auth: the API for applications (administrative functions check the
-- authenticated user's admin role themselves); operations for operators.
GRANT EXECUTE ON FUNCTION
	eventshop.login(text, text, text, text), eventshop.refresh(text), eventshop.authenticate(text),
	eventshop.logout(text), eventshop.list_sessions(), eventshop.revoke_session(uuid),
	eventshop.change_password(text, text), eventshop.request_password_reset(text),
	eventshop.reset_password(text, text), eventshop.request_email_verification(),
	eventshop.verify_email(text), eventshop.block_user(uuid, text), eventshop.unblock_user(uuid),
	eventshop.set_user_roles(uuid, text[]), eventshop.current_user_id(), eventshop.current_roles(),
	eventshop.current_session_id()
	TO eventshop_app, eventshop_admin;
GRANT EXECUTE ON FUNCTION eventshop.flush_security_events(), eventshop.purge_expired_auth_data()
	TO eventshop_admin;
GRANT EXECUTE ON FUNCTION eventshop.login_throttle_status(), eventshop.password_hash_status()
	TO eventshop_admin, pg_monitor;
GRANT EXECUTE ON FUNCTION eventshop.jwks() TO eventshop_app, eventshop_admin;
GRANT EXECUTE ON FUNCTION eventshop.create_signing_key(text), eventshop.rotate_signing_keys(text),
	eventshop.revoke_signing_key(text) TO eventshop_admin;
GRANT SELECT ON eventshop.outbox_status, eventshop.notification_status TO eventshop_admin, pg_monitor;
