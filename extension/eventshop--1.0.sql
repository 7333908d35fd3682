/*
 * eventshop--1.0.sql
 *		Schema, roles and SQL API of eventshop 1.0: accounts, the transactional
 *		outbox read by the relay worker, and the inbox/notification queue run
 *		by the dispatcher worker.
 */
\echo Use "CREATE EXTENSION eventshop" to load this file. \quit

-- ---------------------------------------------------------------------------
-- Roles. Applications get eventshop_app (EXECUTE on the API only); operators
-- get eventshop_admin; the payment gateway, which records the provider's
-- payment results, gets eventshop_gateway. Roles are cluster-wide, so create
-- them only once.
-- ---------------------------------------------------------------------------
DO $roles$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'eventshop_app') THEN
		CREATE ROLE eventshop_app NOLOGIN;
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'eventshop_admin') THEN
		CREATE ROLE eventshop_admin NOLOGIN;
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'eventshop_gateway') THEN
		CREATE ROLE eventshop_gateway NOLOGIN;
	END IF;
END
$roles$;

REVOKE ALL ON SCHEMA eventshop FROM PUBLIC;
GRANT USAGE ON SCHEMA eventshop TO eventshop_app, eventshop_admin, eventshop_gateway;

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
-- as the change it describes. The relay worker publishes rows in commit
-- order without writing to them: its progress is a pair of transaction
-- snapshots (eventshop.relay_progress), so a published row costs no UPDATE
-- or DELETE. Published rows are removed in bulk by purge_published_events():
-- the table is a ring of eight list partitions of 2^20 ids each, and a
-- partition whose rows are all published is truncated, not deleted from.
--
-- How commit order is kept (bgworkers/relay_window.c has the details): each
-- row records its top-level transaction id, taken before its row id (see
-- _next_outbox_id), so the relay can tell which rows became visible between
-- two snapshots and find late committers by transaction id.
-- ---------------------------------------------------------------------------
CREATE SEQUENCE eventshop.outbox_id_seq AS bigint CACHE 1;
COMMENT ON SEQUENCE eventshop.outbox_id_seq IS 'Outbox row ids. CACHE must stay 1: the relay reads its position to bound the ids a snapshot can still miss.';

CREATE FUNCTION eventshop._next_outbox_id()
RETURNS bigint
AS 'MODULE_PATHNAME', 'eventshop_next_outbox_id'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION eventshop._next_outbox_id() IS 'Internal: the next outbox row id, drawn only after the transaction has its id (the relay''s commit-order reasoning depends on it).';

CREATE FUNCTION eventshop._is_event_topic(topic text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'eventshop_is_event_topic'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION eventshop._is_event_topic(text) IS 'Internal: whether topic is one of the topics of ../shared/DESIGN.md (the outbox''s CHECK; the list lives in src/emit_event.c).';

CREATE FUNCTION eventshop._is_message_key(message_key text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'eventshop_is_message_key'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION eventshop._is_message_key(text) IS 'Internal: whether message_key is a Kafka message key of 1 to 512 bytes (the outbox''s CHECK).';

CREATE TABLE eventshop.outbox (
	id				bigint NOT NULL DEFAULT eventshop._next_outbox_id(),
	txid			xid8 NOT NULL DEFAULT pg_current_xact_id(),
	topic			text NOT NULL CONSTRAINT outbox_topic_check CHECK (eventshop._is_event_topic(topic)),
	message_key		text NOT NULL CONSTRAINT outbox_message_key_check CHECK (eventshop._is_message_key(message_key)),
	event_id		uuid NOT NULL,
	event_type		text NOT NULL,
	payload			json NOT NULL,
	created_at		timestamptz NOT NULL DEFAULT clock_timestamp()
) PARTITION BY LIST (((id / 1048576) % 8));
ALTER SEQUENCE eventshop.outbox_id_seq OWNED BY eventshop.outbox.id;
COMMENT ON TABLE eventshop.outbox IS 'Events in commit order for the relay; payload is the complete CloudEvents 1.0 JSON document. Rows stay after publication until purge_published_events() removes them.';
COMMENT ON COLUMN eventshop.outbox.txid IS 'Top-level id of the writing transaction: the relay publishes a row once this transaction is visible in its snapshot.';

DO $$
BEGIN
	FOR slot IN 0..7 LOOP
		EXECUTE format('CREATE TABLE eventshop.outbox_%s PARTITION OF eventshop.outbox FOR VALUES IN (%s)', slot, slot);
		EXECUTE format('ALTER TABLE eventshop.outbox_%s ADD PRIMARY KEY (id)', slot);
		EXECUTE format('CREATE INDEX ON eventshop.outbox_%s (txid, id)', slot);
		EXECUTE format('COMMENT ON TABLE eventshop.outbox_%s IS %L', slot,
					   'Ring slot ' || slot || ' of eventshop.outbox (ids whose 2^20 block number is ' || slot || ' modulo 8).');
		PERFORM pg_catalog.pg_extension_config_dump(format('eventshop.outbox_%s', slot)::regclass, '');
	END LOOP;
END
$$;
SELECT pg_catalog.pg_extension_config_dump('eventshop.outbox_id_seq', '');

-- The relay's position. prev_* describe the snapshot below which everything
-- is published; cur_* the snapshot being published (NULL between windows),
-- of which every row with id <= acked_id is published. For each snapshot:
-- id_bound is the sequence position read just before it, id_limit the one
-- read just after it, next_xid the next transaction id read just after it
-- (rows with id <= id_bound that the snapshot could not see belong to its
-- running transactions: xip and [xmax, next_xid)).
CREATE TABLE eventshop.relay_progress (
	singleton		boolean PRIMARY KEY DEFAULT true CHECK (singleton),
	prev_snapshot	pg_snapshot NOT NULL,
	prev_id_bound	bigint NOT NULL,
	prev_next_xid	xid8 NOT NULL,
	cur_snapshot	pg_snapshot,
	cur_id_bound	bigint,
	cur_next_xid	xid8,
	cur_id_limit	bigint,
	acked_id		bigint NOT NULL DEFAULT 0,
	published_below	bigint NOT NULL DEFAULT 0,
	published_total	bigint NOT NULL DEFAULT 0,
	updated_at		timestamptz NOT NULL DEFAULT now(),
	CHECK ((cur_snapshot IS NULL) = (cur_id_bound IS NULL) AND (cur_snapshot IS NULL) = (cur_next_xid IS NULL)
		   AND (cur_snapshot IS NULL) = (cur_id_limit IS NULL))
);
COMMENT ON TABLE eventshop.relay_progress IS 'The relay''s checkpoint (one row): which committed outbox rows are published. Written only by the relay worker.';
COMMENT ON COLUMN eventshop.relay_progress.published_below IS 'Every outbox row with an id up to this one is published (or its transaction aborted): purge_published_events() may remove them.';
-- Starting point: nothing committed before CREATE EXTENSION is in the outbox.
INSERT INTO eventshop.relay_progress (prev_snapshot, prev_id_bound, prev_next_xid)
VALUES (pg_current_snapshot(), 0, pg_snapshot_xmax(pg_current_snapshot()));
SELECT pg_catalog.pg_extension_config_dump('eventshop.relay_progress', '');

-- Events the broker refused permanently (too large, topic refused...):
-- moved aside so they never block the events behind them.
CREATE TABLE eventshop.outbox_parked (
	id				bigint PRIMARY KEY,
	topic			text NOT NULL,
	message_key		text NOT NULL,
	event_id		uuid NOT NULL,
	event_type		text NOT NULL,
	payload			json NOT NULL,
	created_at		timestamptz NOT NULL,
	error			text NOT NULL,
	parked_at		timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE eventshop.outbox_parked IS 'Poison events: refused permanently by Kafka, kept with the error until an administrator retries or discards them.';
SELECT pg_catalog.pg_extension_config_dump('eventshop.outbox_parked', '');

CREATE FUNCTION eventshop._wake_worker_on_commit()
RETURNS trigger
AS 'MODULE_PATHNAME', 'eventshop_wake_worker_on_commit'
LANGUAGE C;
COMMENT ON FUNCTION eventshop._wake_worker_on_commit() IS 'Trigger: wakes the worker named by the trigger argument (relay, dispatcher or sender: every sender worker) when the transaction commits.';

CREATE TRIGGER outbox_wake_relay
	AFTER INSERT ON eventshop.outbox
	FOR EACH STATEMENT EXECUTE FUNCTION eventshop._wake_worker_on_commit('relay');

-- Writes one CloudEvent to the outbox; internal: callers are the definer
-- functions of each module, never applications (they could forge events).
CREATE FUNCTION eventshop._emit_event(topic text, message_key text, event_type text, data jsonb)
RETURNS uuid
AS 'MODULE_PATHNAME', 'eventshop_emit_event'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION eventshop._emit_event(text, text, text, jsonb) IS 'Internal: adds one CloudEvent to the outbox in the current transaction and returns its id.';

-- Writes a batch of CloudEvents of one topic, in array order, with one
-- statement; internal, like _emit_event.
CREATE FUNCTION eventshop._emit_events(topic text, message_keys text[], event_types text[], data jsonb[])
RETURNS integer
AS 'MODULE_PATHNAME', 'eventshop_emit_events'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION eventshop._emit_events(text, text[], text[], jsonb[]) IS 'Internal: adds CloudEvents of one topic to the outbox in the current transaction, in array order (each checked as _emit_event checks it); returns how many.';

CREATE FUNCTION eventshop._relay_stats(
	OUT produced bigint, OUT acknowledged bigint, OUT parked bigint, OUT delivery_errors bigint,
	OUT last_error text, OUT last_error_at timestamptz, OUT broker_state text, OUT worker_started_at timestamptz,
	OUT latency_samples bigint, OUT ack_latency_p50_ms double precision, OUT ack_latency_p99_ms double precision)
AS 'MODULE_PATHNAME', 'eventshop_relay_stats'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION eventshop._relay_stats() IS 'Internal: the relay worker''s shared-memory counters since the server started (see outbox_status).';

CREATE FUNCTION eventshop.reset_relay_latency()
RETURNS void
AS 'MODULE_PATHNAME', 'eventshop_reset_relay_latency'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION eventshop.reset_relay_latency() IS 'Empties the relay''s commit-to-acknowledgement latency histogram (outbox_status.ack_latency_p50_ms/p99_ms), e.g. before a measurement.';

-- Rows the relay has not published yet, as of its last checkpoint.
CREATE FUNCTION eventshop._unpublished_events(OUT backlog bigint, OUT oldest_created_at timestamptz)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT count(*), min(o.created_at)
	FROM eventshop.relay_progress p
	JOIN eventshop.outbox o
	  ON o.txid >= pg_snapshot_xmin(p.prev_snapshot)
	 AND NOT pg_visible_in_snapshot(o.txid, p.prev_snapshot)
	 AND NOT (p.cur_snapshot IS NOT NULL AND pg_visible_in_snapshot(o.txid, p.cur_snapshot)
			  AND o.id <= p.acked_id)
$$;
COMMENT ON FUNCTION eventshop._unpublished_events() IS 'Internal: outbox rows committed but not yet acknowledged by Kafka according to the relay''s checkpoint.';

CREATE VIEW eventshop.outbox_status AS
SELECT
	u.backlog,
	clock_timestamp() - u.oldest_created_at AS oldest_unpublished_age,
	s.produced,
	s.acknowledged,
	p.published_total,
	(SELECT count(*) FROM eventshop.outbox_parked) AS parked,
	s.delivery_errors,
	s.last_error,
	s.last_error_at,
	s.broker_state,
	s.ack_latency_p50_ms,
	s.ack_latency_p99_ms,
	s.worker_started_at,
	p.updated_at AS checkpoint_at
FROM eventshop._unpublished_events() u,
	 eventshop.relay_progress p,
	 eventshop._relay_stats() s;
COMMENT ON VIEW eventshop.outbox_status IS 'The relay at a glance: events not yet acknowledged by Kafka (as of its last checkpoint) and the age of the oldest, messages produced and acknowledged since the server started, events published in total, parked poison events, the last error and the broker state, commit-to-acknowledgement latency.';

CREATE VIEW eventshop.parked_events AS
SELECT id, topic, message_key, event_id, event_type, octet_length(payload::text) AS payload_bytes,
	   error, created_at, parked_at
FROM eventshop.outbox_parked;
COMMENT ON VIEW eventshop.parked_events IS 'Events Kafka refused permanently (too large, topic refused...), with the error; retry_parked_event() or discard_parked_event() them.';

-- Puts a parked event back in the outbox (with the same CloudEvents id, so
-- consumers can still tell it apart from a new event). Returns its event id.
CREATE FUNCTION eventshop.retry_parked_event(id bigint)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_event eventshop.outbox_parked%ROWTYPE;
BEGIN
	IF retry_parked_event.id IS NULL THEN
		RAISE EXCEPTION 'the parked event id must not be NULL' USING ERRCODE = '22004';
	END IF;
	DELETE FROM eventshop.outbox_parked p WHERE p.id = retry_parked_event.id RETURNING * INTO v_event;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'there is no parked event %', retry_parked_event.id USING ERRCODE = 'P0002',
			HINT = 'eventshop.parked_events lists the parked events.';
	END IF;
	INSERT INTO eventshop.outbox (topic, message_key, event_id, event_type, payload, created_at)
	VALUES (v_event.topic, v_event.message_key, v_event.event_id, v_event.event_type, v_event.payload,
			clock_timestamp());
	RETURN v_event.event_id;
END
$$;
COMMENT ON FUNCTION eventshop.retry_parked_event(bigint) IS 'Queues a parked event for publication again (after the cause was fixed, e.g. the broker''s message size limit raised); returns its CloudEvents id. Errors: 22004 NULL id, P0002 no such parked event.';

CREATE FUNCTION eventshop.retry_parked_events()
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT count(eventshop.retry_parked_event(p.id))::integer
	FROM (SELECT id FROM eventshop.outbox_parked ORDER BY id) p
$$;
COMMENT ON FUNCTION eventshop.retry_parked_events() IS 'Queues every parked event for publication again, oldest first; returns how many.';

CREATE FUNCTION eventshop.discard_parked_event(id bigint)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF discard_parked_event.id IS NULL THEN
		RAISE EXCEPTION 'the parked event id must not be NULL' USING ERRCODE = '22004';
	END IF;
	DELETE FROM eventshop.outbox_parked p WHERE p.id = discard_parked_event.id;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'there is no parked event %', discard_parked_event.id USING ERRCODE = 'P0002',
			HINT = 'eventshop.parked_events lists the parked events.';
	END IF;
END
$$;
COMMENT ON FUNCTION eventshop.discard_parked_event(bigint) IS 'Drops a parked event for good. Errors: 22004 NULL id, P0002 no such parked event.';

-- Removes published rows: whole ring slots by TRUNCATE when every row in
-- them is published and older than the retention, else row by row. A slot
-- that is busy (inserts or the relay reading it) is left for the next run.
CREATE FUNCTION eventshop.purge_published_events(retention interval DEFAULT interval '0')
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_below		bigint;
	v_cutoff	timestamptz;
	v_removed	bigint := 0;
	v_newest	record;
	v_count		bigint;
BEGIN
	IF retention IS NULL OR retention < interval '0' THEN
		RAISE EXCEPTION 'retention must be a non-negative interval' USING ERRCODE = '22023';
	END IF;
	SELECT p.published_below INTO v_below FROM eventshop.relay_progress p;
	v_cutoff := clock_timestamp() - retention;
	IF v_below IS NULL OR v_below <= 0 THEN
		RETURN 0;
	END IF;
	FOR slot IN 0..7 LOOP
		EXECUTE format('SELECT o.id, o.created_at FROM eventshop.outbox_%s o ORDER BY o.id DESC LIMIT 1', slot)
			INTO v_newest;
		CONTINUE WHEN v_newest.id IS NULL;
		IF v_newest.id <= v_below AND v_newest.created_at < v_cutoff THEN
			BEGIN
				EXECUTE format('LOCK TABLE eventshop.outbox_%s IN ACCESS EXCLUSIVE MODE NOWAIT', slot);
				-- under the lock no row can arrive: check again, then empty the slot
				EXECUTE format('SELECT max(o.id), count(*) FROM eventshop.outbox_%s o', slot) INTO v_newest.id, v_count;
				IF v_newest.id <= v_below THEN
					EXECUTE format('TRUNCATE eventshop.outbox_%s', slot);
					v_removed := v_removed + v_count;
					CONTINUE;
				END IF;
			EXCEPTION WHEN lock_not_available THEN
				NULL;			-- busy: delete row by row below
			END;
		END IF;
		EXECUTE format('DELETE FROM eventshop.outbox_%s o WHERE o.id <= $1 AND o.created_at < $2', slot)
			USING v_below, v_cutoff;
		GET DIAGNOSTICS v_count = ROW_COUNT;
		v_removed := v_removed + v_count;
	END LOOP;
	RETURN v_removed;
END
$$;
COMMENT ON FUNCTION eventshop.purge_published_events(interval) IS 'Removes outbox rows the relay has published and that are older than retention (default: none kept); returns how many. Schedule it with pg_cron. Error: 22023 negative or NULL retention.';

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
-- are queued there until eventshop.flush_security_events() writes them (the
-- relay worker calls it as soon as one is queued).
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
	purpose			text NOT NULL CHECK (purpose IN ('password_reset', 'magic_link', 'email_verification')),
	email			text,
	created_at		timestamptz NOT NULL,
	expires_at		timestamptz NOT NULL,
	used_at			timestamptz,
	CHECK ((user_id IS NULL) = (email IS NULL))
);
CREATE INDEX account_tokens_user_idx ON eventshop.account_tokens (user_id, purpose);
CREATE INDEX account_tokens_expires_idx ON eventshop.account_tokens (expires_at);
COMMENT ON TABLE eventshop.account_tokens IS 'Single-use password-reset, magic sign-in and e-mail verification tokens, as SHA-256 of the token. Rows without a user are decoys: request_password_reset inserts and deletes one in the same transaction for an unknown address, so that a request costs the same whether or not the account exists; none stays, and none could ever be redeemed.';
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
CREATE FUNCTION eventshop._login_throttle_begin(account text, source text,
												OUT wait_seconds integer, OUT locked_seconds integer,
												OUT source_lock timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'eventshop_login_throttle_begin'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION eventshop._login_throttle_begin(text, text) IS 'Internal: admits one login attempt for this account (normalised e-mail) from this source, atomically in shared memory (it survives ROLLBACK). wait_seconds > 0: refused, the account or source is locked (or cannot be tracked: its table is full), nothing counted. Otherwise the attempt is counted against both now; locked_seconds is the account lockout it started (0: none), source_lock identifies the source lockout it started (NULL: none). Either argument may be NULL.';

CREATE FUNCTION eventshop._login_throttle_success(account text, source text DEFAULT NULL,
												  source_lock timestamptz DEFAULT NULL)
RETURNS void
AS 'MODULE_PATHNAME', 'eventshop_login_throttle_success'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION eventshop._login_throttle_success(text, text, timestamptz) IS 'Internal: forgets an account''s failed logins and lockouts, and takes back from the source the one attempt a successful login counted (with the lockout it started, named by source_lock).';

CREATE FUNCTION eventshop._login_throttle_clear()
RETURNS bigint
AS 'MODULE_PATHNAME', 'eventshop_login_throttle_clear'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION eventshop._login_throttle_clear() IS 'Internal: forgets every failed-login counter and lockout; returns how many entries were dropped.';

CREATE FUNCTION eventshop.login_throttle_status(OUT tracked bigint, OUT locked bigint, OUT capacity integer,
												OUT evicted bigint, OUT deferred_events integer,
												OUT dropped_events bigint, OUT tracked_sources bigint,
												OUT refused bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'eventshop_login_throttle_status'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION eventshop.login_throttle_status() IS 'Failed-login tracking: addresses and sources tracked and locked now (tracked_sources of them sources), the capacity of each of the two tables (addresses, sources), entries dropped to make room (only ones outside their failure window and lockout), security events waiting for eventshop.flush_security_events(), events dropped because that queue was full, and attempts refused because their table was full of entries that could not go.';

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
COMMENT ON FUNCTION eventshop.flush_security_events() IS 'Writes the security events of failed logins (user.login_failed, user.locked), queued in shared memory because their own transaction failed, to the outbox; returns how many. The relay worker calls it as soon as an event is queued; where the relay is disabled, schedule it with pg_cron (every minute).';

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
-- statement). Returns the user id. For every module's definer functions
-- (C, src/authenticate.c).
CREATE FUNCTION eventshop._require_user()
RETURNS uuid
AS 'MODULE_PATHNAME', 'eventshop_require_user'
LANGUAGE C VOLATILE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp;
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
-- an account exists; every failure that checked a password lasts at least
-- eventshop.login_failure_min_duration, so neither does a stored hash that
-- is slower to verify (imported bcrypt, older argon2id parameters). A blocked
-- account says so (28000) only after the right password.
-- Brute force: one atomic step in shared memory (_login_throttle_begin)
-- refuses the attempt (28000) while the address or the source is locked,
-- without checking the password, and otherwise counts it before the password
-- is checked, so concurrent guesses cannot overtake the lockout; a success
-- takes the count back.
-- The password is checked against the row as read without a lock; after a
-- match the row is read again FOR NO KEY UPDATE, held until commit: if the
-- hash changed meanwhile (reset_password, change_password) the login fails
-- like a wrong password, and a reset, change or block that comes later waits
-- for this transaction and then ends the session it opened.
-- ---------------------------------------------------------------------------
-- Opens a session for a user who just proved who they are (password or
-- magic link): the session row, user.logged_in, and the first token pair.
CREATE FUNCTION eventshop._open_session(user_id uuid, roles text[], email_hash text, source text,
										user_agent text, details jsonb)
RETURNS eventshop.token_pair
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_session	uuid := gen_random_uuid();
	v_now		timestamptz := clock_timestamp();
BEGIN
	INSERT INTO eventshop.sessions (id, user_id, created_at, last_used_at, expires_at, generation, source, user_agent)
	VALUES (v_session, _open_session.user_id, v_now, v_now, v_now, 0, _open_session.source,
			nullif(_open_session.user_agent, ''));
	PERFORM eventshop._emit_event('auth.events', _open_session.user_id::text, 'user.logged_in',
		jsonb_build_object('user_id', _open_session.user_id, 'email_hash', _open_session.email_hash,
						   'session_id', v_session, 'source_hash', eventshop._pii_hash(_open_session.source))
		|| coalesce(_open_session.details, '{}'));
	RETURN eventshop._issue_tokens(_open_session.user_id, _open_session.roles, v_session, 1);
END
$$;
COMMENT ON FUNCTION eventshop._open_session(uuid, text[], text, text, text, jsonb) IS 'Internal: opens a session, emits user.logged_in (with extra event data) and returns the first access and refresh tokens.';

CREATE FUNCTION eventshop.login(email text, password text, source text DEFAULT NULL, user_agent text DEFAULT NULL)
RETURNS SETOF eventshop.token_pair
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic
AS $$
DECLARE
	v_started		timestamptz := clock_timestamp();
	v_source		text := nullif(btrim(login.source), '');
	v_agent			text := left(regexp_replace(login.user_agent, '[[:cntrl:]]', '', 'g'), 512);
	v_email			text;
	v_email_hash	text;
	v_user			eventshop.users%ROWTYPE;
	v_current		eventshop.users%ROWTYPE;
	v_attempt		record;
	v_ok			boolean;
	v_reason		text := 'wrong_password';
	v_new_hash		text;
	v_rehashed		boolean := false;
BEGIN
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
		-- no account can match: count it against the source only (nothing to
		-- learn from its timing, so it is not padded)
		SELECT * INTO v_attempt FROM eventshop._login_throttle_begin(NULL, v_source);
		IF v_attempt.wait_seconds > 0 THEN
			RAISE EXCEPTION 'too many failed login attempts'
				USING ERRCODE = 'invalid_authorization_specification',
					  HINT = format('Try again in %s seconds.', v_attempt.wait_seconds);
		END IF;
		RAISE EXCEPTION 'invalid e-mail or password' USING ERRCODE = 'invalid_password';
	END IF;

	-- refused while locked; otherwise counted now, before the password is checked
	SELECT * INTO v_attempt FROM eventshop._login_throttle_begin(v_email, v_source);
	IF v_attempt.wait_seconds > 0 THEN
		RAISE EXCEPTION 'too many failed login attempts'
			USING ERRCODE = 'invalid_authorization_specification',
				  HINT = format('Try again in %s seconds.', v_attempt.wait_seconds);
	END IF;

	v_email_hash := eventshop._pii_hash(v_email);
	SELECT u.* INTO v_user FROM eventshop.users u WHERE u.email = v_email;
	IF FOUND THEN
		BEGIN
			v_ok := eventshop._verify_password(login.password, v_user.password_hash);
		EXCEPTION WHEN invalid_parameter_value THEN
			-- a stored hash that cannot be used (malformed, or beyond the bounds):
			-- a failure like any other to the caller; the operator finds it in the log
			RAISE LOG 'eventshop: the stored password hash of user % cannot be verified: %', v_user.id, SQLERRM;
			v_ok := false;
			v_reason := 'unusable_password_hash';
		END;
	ELSE
		v_ok := eventshop._dummy_verify_password(login.password);
	END IF;

	IF v_ok THEN
		IF eventshop._password_needs_rehash(v_user.password_hash) THEN
			-- computed before taking the row lock, to hold it briefly
			v_new_hash := eventshop._hash_password(login.password);
		END IF;
		-- the password matched the row as read before; read it again, locked
		-- until commit, and refuse if a new password was set meanwhile
		SELECT u.* INTO v_current FROM eventshop.users u WHERE u.id = v_user.id FOR NO KEY UPDATE;
		IF NOT FOUND OR v_current.password_hash IS DISTINCT FROM v_user.password_hash
		   OR v_current.email IS DISTINCT FROM v_email THEN
			v_ok := false;
			v_reason := 'password_changed';
		END IF;
	END IF;

	IF NOT v_ok OR v_current.blocked_at IS NOT NULL THEN
		IF v_user.id IS NOT NULL THEN
			PERFORM eventshop._defer_event(v_user.id::text, 'user.login_failed',
				jsonb_build_object('user_id', v_user.id, 'email_hash', v_email_hash,
								   'source_hash', eventshop._pii_hash(v_source),
								   'reason', CASE WHEN v_ok THEN 'blocked' ELSE v_reason END,
								   'occurred_at', clock_timestamp()));
			IF v_attempt.locked_seconds > 0 THEN
				PERFORM eventshop._defer_event(v_user.id::text, 'user.locked',
					jsonb_build_object('user_id', v_user.id, 'email_hash', v_email_hash,
									   'locked_seconds', v_attempt.locked_seconds,
									   'locked_until', clock_timestamp() + make_interval(secs => v_attempt.locked_seconds),
									   'occurred_at', clock_timestamp()));
			END IF;
		END IF;
		PERFORM eventshop._pad_duration(v_started,
			extract(epoch FROM current_setting('eventshop.login_failure_min_duration')::interval)::double precision);
		IF v_ok THEN
			RAISE EXCEPTION 'account is blocked'
				USING ERRCODE = 'invalid_authorization_specification',
					  HINT = 'Contact support to have the account unblocked.';
		END IF;
		RAISE EXCEPTION 'invalid e-mail or password' USING ERRCODE = 'invalid_password';
	END IF;

	PERFORM eventshop._login_throttle_success(v_email, v_source, v_attempt.source_lock);
	IF v_new_hash IS NOT NULL THEN
		-- only over the hash that was verified (the row is locked: it is)
		UPDATE eventshop.users u SET password_hash = v_new_hash
		WHERE u.id = v_current.id AND u.password_hash = v_user.password_hash;
		v_rehashed := FOUND;
	END IF;

	RETURN NEXT eventshop._open_session(v_current.id, v_current.roles, v_email_hash, v_source, v_agent,
										jsonb_build_object('password_rehashed', v_rehashed));
END
$$;
COMMENT ON FUNCTION eventshop.login(text, text, text, text) IS 'Verifies e-mail and password and opens a session: returns an access JWT, a refresh token, ''Bearer'', the access token lifetime and the session id; emits user.logged_in. Errors: 28P01 invalid e-mail or password (the same for unknown accounts, lasting at least eventshop.login_failure_min_duration), 28000 account blocked or too many failed attempts (source: the client address, counted for lockout).';

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
	IF NOT eventshop._is_opaque_token(refresh.refresh_token) THEN
		RAISE EXCEPTION 'invalid refresh token' USING ERRCODE = 'invalid_authorization_specification';
	END IF;
	v_hash := eventshop._token_hash(refresh.refresh_token);
	SELECT t.session_id INTO v_session_id FROM eventshop.refresh_tokens t WHERE t.token_hash = v_hash;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'invalid refresh token' USING ERRCODE = 'invalid_authorization_specification';
	END IF;

	-- wait for concurrent refreshes of this session, then look again: the
	-- session (and with it the token) may have been deleted meanwhile
	SELECT s.* INTO v_session FROM eventshop.sessions s WHERE s.id = v_session_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'invalid refresh token'
			USING ERRCODE = 'invalid_authorization_specification', DETAIL = 'The session has ended.';
	END IF;
	SELECT t.* INTO v_token FROM eventshop.refresh_tokens t WHERE t.token_hash = v_hash;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'invalid refresh token'
			USING ERRCODE = 'invalid_authorization_specification', DETAIL = 'The session has ended.';
	END IF;
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
-- establishes the caller for the rest of the transaction (C,
-- src/authenticate.c: it runs before nearly every API call).
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop.authenticate(token text)
RETURNS eventshop.caller
AS 'MODULE_PATHNAME', 'eventshop_authenticate'
LANGUAGE C VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic;
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
	v_now		timestamptz := clock_timestamp();
BEGIN
	RETURN QUERY
	SELECT s.id, s.created_at, s.last_used_at, s.expires_at, s.source, s.user_agent, s.id = v_session
	FROM eventshop.sessions s
	WHERE s.user_id = v_user AND s.revoked_at IS NULL AND s.expires_at > v_now
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
	v_attempt	record;
	v_count		integer;
BEGIN
	-- the row stays locked until commit: a login that checked the old password
	-- meanwhile sees the new hash and fails (see login)
	SELECT u.* INTO v_user FROM eventshop.users u WHERE u.id = v_user_id FOR UPDATE;
	-- a stolen access token must not become a way to guess the password: the
	-- check counts as a login attempt, admitted and counted before it runs
	SELECT * INTO v_attempt FROM eventshop._login_throttle_begin(v_user.email, NULL);
	IF v_attempt.wait_seconds > 0 THEN
		RAISE EXCEPTION 'too many failed login attempts'
			USING ERRCODE = 'invalid_authorization_specification',
				  HINT = format('Try again in %s seconds.', v_attempt.wait_seconds);
	END IF;
	IF current_password IS NULL OR octet_length(current_password) > 4096
	   OR NOT eventshop._verify_password(current_password, v_user.password_hash) THEN
		PERFORM eventshop._defer_event(v_user.id::text, 'user.login_failed',
			jsonb_build_object('user_id', v_user.id, 'email_hash', eventshop._pii_hash(v_user.email),
							   'reason', 'wrong_current_password', 'occurred_at', clock_timestamp()));
		IF v_attempt.locked_seconds > 0 THEN
			PERFORM eventshop._defer_event(v_user.id::text, 'user.locked',
				jsonb_build_object('user_id', v_user.id, 'email_hash', eventshop._pii_hash(v_user.email),
								   'locked_seconds', v_attempt.locked_seconds,
								   'locked_until', clock_timestamp() + make_interval(secs => v_attempt.locked_seconds),
								   'occurred_at', clock_timestamp()));
		END IF;
		RAISE EXCEPTION 'invalid password' USING ERRCODE = 'invalid_password';
	END IF;
	-- the right current password: like a successful login, it clears the count
	PERFORM eventshop._login_throttle_success(v_user.email);
	PERFORM eventshop._check_password_policy(new_password);
	IF new_password = current_password THEN
		RAISE EXCEPTION 'the new password must differ from the current one' USING ERRCODE = 'invalid_parameter_value';
	END IF;

	UPDATE eventshop.users u SET password_hash = eventshop._hash_password(new_password) WHERE u.id = v_user.id;
	-- the other sessions end (their access tokens with them); this one stays
	v_count := eventshop._revoke_sessions(v_user.id, 'password_changed', eventshop.current_session_id());
	DELETE FROM eventshop.account_tokens t
	WHERE t.user_id = v_user.id AND t.purpose = 'password_reset' AND t.used_at IS NULL;
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
-- seal, keyed hash of the address, rows written and deleted, and so a commit
-- that flushes WAL) and the duration (padded to 20 ms) are the same whether
-- or not the address has an account: for an unknown (or blocked, or
-- rate-limited) address a decoy row is inserted and deleted again in the
-- same transaction, as the real branch inserts the new link and deletes the
-- older ones, so nothing is left behind (no row an anonymous caller could
-- pile up), and no event is emitted.
CREATE FUNCTION eventshop._request_account_link(email text, purpose text, lifetime interval, event_type text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_email		text := eventshop._normalize_email(_request_account_link.email);
	v_token		text := eventshop._random_token(32);
	v_hash		bytea := eventshop._token_hash(v_token);
	v_sealed	text := eventshop._seal(v_token);
	v_now		timestamptz := clock_timestamp();
	v_expires	timestamptz := v_now + _request_account_link.lifetime;
	v_email_hash text := eventshop._pii_hash(v_email);
	v_user		eventshop.users%ROWTYPE;
BEGIN
	SELECT u.* INTO v_user FROM eventshop.users u WHERE u.email = v_email FOR UPDATE;
	IF NOT FOUND OR v_user.blocked_at IS NOT NULL
	   -- at most one link a minute, so nobody can flood an inbox
	   OR EXISTS (SELECT FROM eventshop.account_tokens t
				  WHERE t.user_id = v_user.id AND t.purpose = _request_account_link.purpose AND t.used_at IS NULL
					AND t.created_at > v_now - interval '1 minute') THEN
		INSERT INTO eventshop.account_tokens (token_hash, user_id, purpose, email, created_at, expires_at)
		VALUES (v_hash, NULL, _request_account_link.purpose, NULL, v_now, v_expires);
		-- as the real branch deletes the account's older links
		DELETE FROM eventshop.account_tokens t WHERE t.token_hash = v_hash;
		PERFORM eventshop._pad_duration(v_now, 0.020);
		RETURN;
	END IF;

	-- only the newest link works
	DELETE FROM eventshop.account_tokens t
	WHERE t.user_id = v_user.id AND t.purpose = _request_account_link.purpose AND t.used_at IS NULL;
	INSERT INTO eventshop.account_tokens (token_hash, user_id, purpose, email, created_at, expires_at)
	VALUES (v_hash, v_user.id, _request_account_link.purpose, v_user.email, v_now, v_expires);
	PERFORM eventshop._emit_event('auth.events', v_user.id::text, _request_account_link.event_type,
		jsonb_build_object('user_id', v_user.id, 'email_hash', v_email_hash,
						   'sealed_token', v_sealed, 'expires_at', v_expires));
	PERFORM eventshop._pad_duration(v_now, 0.020);
END
$$;
COMMENT ON FUNCTION eventshop._request_account_link(text, text, interval, text) IS 'Internal: issues a single-use link token of the given purpose for an address and emits the event carrying it sealed; does the same work and takes the same time whether or not the address has an account.';

CREATE FUNCTION eventshop.request_password_reset(email text)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic
AS $$
	SELECT eventshop._request_account_link(request_password_reset.email, 'password_reset',
		current_setting('eventshop.password_reset_ttl')::interval, 'password.reset_requested')
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
-- Magic sign-in links (seed 004): a single-use link mailed to the address
-- signs the user in without a password.
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop.request_magic_link(email text)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic
AS $$
	SELECT eventshop._request_account_link(request_magic_link.email, 'magic_link',
		current_setting('eventshop.magic_link_ttl')::interval, 'auth.magic_link_requested')
$$;
COMMENT ON FUNCTION eventshop.request_magic_link(text) IS 'Sends a magic sign-in link: emits auth.magic_link_requested with the single-use token sealed for the notifier, valid eventshop.magic_link_ttl; at most one link a minute per account. Returns nothing and takes the same time whether or not the address has an account. Errors: 22023/22004 malformed address.';

CREATE FUNCTION eventshop.login_with_magic_link(token text, source text DEFAULT NULL, user_agent text DEFAULT NULL)
RETURNS SETOF eventshop.token_pair
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic
AS $$
DECLARE
	v_token		eventshop.account_tokens%ROWTYPE;
	v_user		eventshop.users%ROWTYPE;
	v_now		timestamptz := clock_timestamp();
	v_source	text := nullif(btrim(login_with_magic_link.source), '');
BEGIN
	IF v_source IS NOT NULL AND (octet_length(v_source) > 255 OR v_source ~ '[[:cntrl:]]') THEN
		RAISE EXCEPTION 'invalid source'
			USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass the client address, at most 255 printable bytes.';
	END IF;
	IF NOT eventshop._is_opaque_token(login_with_magic_link.token) THEN
		RAISE EXCEPTION 'invalid or expired token' USING ERRCODE = 'invalid_authorization_specification';
	END IF;
	SELECT t.* INTO v_token FROM eventshop.account_tokens t
	WHERE t.token_hash = eventshop._token_hash(login_with_magic_link.token) AND t.purpose = 'magic_link'
	FOR UPDATE;
	IF NOT FOUND OR v_token.user_id IS NULL OR v_token.used_at IS NOT NULL OR v_token.expires_at <= v_now THEN
		RAISE EXCEPTION 'invalid or expired token' USING ERRCODE = 'invalid_authorization_specification';
	END IF;
	SELECT u.* INTO v_user FROM eventshop.users u WHERE u.id = v_token.user_id FOR NO KEY UPDATE;
	IF v_user.email <> v_token.email OR v_user.blocked_at IS NOT NULL THEN
		RAISE EXCEPTION 'invalid or expired token' USING ERRCODE = 'invalid_authorization_specification';
	END IF;

	UPDATE eventshop.account_tokens t SET used_at = v_now WHERE t.token_hash = v_token.token_hash;
	-- the link reached the address, so the address works
	UPDATE eventshop.users u SET email_verified_at = coalesce(u.email_verified_at, v_now) WHERE u.id = v_user.id;
	RETURN NEXT eventshop._open_session(v_user.id, v_user.roles, eventshop._pii_hash(v_user.email), v_source,
		left(regexp_replace(login_with_magic_link.user_agent, '[[:cntrl:]]', '', 'g'), 512),
		jsonb_build_object('method', 'magic_link'));
END
$$;
COMMENT ON FUNCTION eventshop.login_with_magic_link(text, text, text) IS 'Signs in with a magic link token (single use, within eventshop.magic_link_ttl): opens a session like login and returns its tokens; marks the address verified; emits user.logged_in with method magic_link. Errors: 28000 invalid or expired token.';

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
	-- called once: a volatile call in the WHERE clause would run per row (a sequential scan)
	v_user_id	uuid := eventshop._require_user();
	v_user		eventshop.users%ROWTYPE;
	v_token		text;
	v_now		timestamptz := clock_timestamp();
	v_expires	timestamptz := v_now + current_setting('eventshop.email_verification_ttl')::interval;
BEGIN
	SELECT u.* INTO v_user FROM eventshop.users u WHERE u.id = v_user_id FOR UPDATE;
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
-- tokens), one-time tokens that expired a day ago, and at once any decoy row
-- (none is written any more; older versions left one per anonymous reset
-- request, and no decoy can ever be redeemed).
CREATE FUNCTION eventshop.purge_expired_auth_data()
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	-- computed once, so the deletes can use the indexes
	v_cutoff	timestamptz := clock_timestamp() - interval '1 day';
	v_sessions	bigint;
	v_tokens	bigint;
	v_decoys	bigint;
BEGIN
	DELETE FROM eventshop.sessions s
	WHERE coalesce(s.revoked_at, s.expires_at) < v_cutoff;
	GET DIAGNOSTICS v_sessions = ROW_COUNT;
	DELETE FROM eventshop.account_tokens t WHERE t.expires_at < v_cutoff;
	GET DIAGNOSTICS v_tokens = ROW_COUNT;
	DELETE FROM eventshop.account_tokens t WHERE t.user_id IS NULL;
	GET DIAGNOSTICS v_decoys = ROW_COUNT;
	RETURN v_sessions + v_tokens + v_decoys;
END
$$;
COMMENT ON FUNCTION eventshop.purge_expired_auth_data() IS 'Deletes sessions (and their refresh tokens) that ended more than a day ago, one-time tokens that expired more than a day ago, and any decoy row left by older versions; returns how many rows. Schedule with pg_cron.';

-- ---------------------------------------------------------------------------
-- Orders: catalog, inventory, cart, orders, payments.
--
-- Money is bigint minor units plus an ISO 4217 currency code, never floating
-- point. Inventory: a product's available stock is stock_on_hand - reserved,
-- where reserved counts the units of orders in status 'reserved' (the
-- reservation of an order is its items while it is reserved; it expires at
-- reserved_until). The CHECK reserved <= stock_on_hand makes an oversell
-- impossible whatever a function does.
--
-- Locking (why nothing deadlocks): a function that changes stock locks every
-- product row it touches in ONE statement, in SKU order (ORDER BY sku, or,
-- for place_order, an UPDATE that can reach the rows only through the unique
-- index on sku), before changing any of them; a function that changes an
-- order locks the order row first (and only that one, except
-- expire_reservations, which skips locked orders), then its products in SKU
-- order. place_order locks no order (its order is new). So all lock waits go
-- order -> products in ascending SKU, and no cycle forms.
--
-- Lifecycle (enforced by a trigger as well as by each function):
--   reserved -> paid -> completed -> refunded
--   reserved -> cancelled | expired
-- Events: orders.events and payments.events, key = order id, user ids and
-- amounts only (no PII).
-- ---------------------------------------------------------------------------
-- Value rules are domains rather than table CHECKs: a domain is checked when
-- a value is assigned, with its expression cached per session, while a table
-- CHECK is parsed again by every statement that writes the table and
-- evaluated on every UPDATE of a row. Every order writes these tables.
-- SKUs are codes: they compare and sort byte by byte (collation "C"), which
-- is also what makes the SKU index cheap to search on every order.
CREATE DOMAIN eventshop.sku AS text COLLATE "C"
	CHECK (VALUE ~ '^[A-Za-z0-9._-]+$' AND octet_length(VALUE) <= 64);
COMMENT ON DOMAIN eventshop.sku IS 'A stock-keeping unit: 1 to 64 characters from A-Z, a-z, 0-9, ".", "_" and "-", compared and sorted byte by byte.';
CREATE DOMAIN eventshop.currency_code AS text CHECK (VALUE ~ '^[A-Z]{3}$');
COMMENT ON DOMAIN eventshop.currency_code IS 'An ISO 4217 currency code (three upper-case letters).';
CREATE DOMAIN eventshop.price_minor AS bigint CHECK (VALUE BETWEEN 0 AND 1000000000000);
COMMENT ON DOMAIN eventshop.price_minor IS 'A unit price in integer minor units (cents), 0 to 10^12: with at most 1000 units a line and 100 lines an order total stays far inside bigint.';
CREATE DOMAIN eventshop.amount_minor AS bigint CHECK (VALUE >= 0);
COMMENT ON DOMAIN eventshop.amount_minor IS 'An amount of money in integer minor units (cents), never negative.';
CREATE DOMAIN eventshop.order_status AS text
	CHECK (VALUE IN ('reserved', 'paid', 'completed', 'cancelled', 'expired', 'refunded'));
COMMENT ON DOMAIN eventshop.order_status IS 'The status of an order: reserved -> paid -> completed -> refunded, or reserved -> cancelled / expired (transitions are checked by the trigger orders_status_transition).';
CREATE DOMAIN eventshop.line_quantity AS integer CHECK (VALUE BETWEEN 1 AND 1000);
COMMENT ON DOMAIN eventshop.line_quantity IS 'Units of one product in an order or cart line: 1 to 1000.';

-- The products' CHECK as a C function (see src/orders.c: a CHECK expression
-- is read back from text and planned by every statement that writes the
-- table, and every order writes it).
CREATE FUNCTION eventshop._stock_within(reserved integer, stock_on_hand integer)
RETURNS boolean
AS 'MODULE_PATHNAME', 'eventshop_stock_within'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION eventshop._stock_within(integer, integer) IS 'Internal: 0 <= reserved <= stock_on_hand, the products'' no-oversell CHECK.';

CREATE TABLE eventshop.products (
	id				bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	sku				eventshop.sku NOT NULL,
	title			text NOT NULL,
	description		text NOT NULL DEFAULT '',
	category		text,
	price_minor		eventshop.price_minor NOT NULL,
	currency		eventshop.currency_code NOT NULL,
	stock_on_hand	integer NOT NULL,
	reserved		integer NOT NULL DEFAULT 0,
	active			boolean NOT NULL DEFAULT true,
	version			integer NOT NULL DEFAULT 1,
	created_at		timestamptz NOT NULL DEFAULT now(),
	updated_at		timestamptz NOT NULL DEFAULT now(),
	CONSTRAINT products_sku_key UNIQUE (sku),
	-- the no-oversell invariant (and stock_on_hand >= 0), whatever a function does
	CONSTRAINT products_stock_check CHECK (eventshop._stock_within(reserved, stock_on_hand))
) WITH (fillfactor = 80);		-- room for HOT updates of the stock counters
COMMENT ON TABLE eventshop.products IS 'The catalog. Prices in integer minor units of currency (ISO 4217). reserved = units held by orders in status reserved; available = stock_on_hand - reserved, and reserved <= stock_on_hand always holds (no oversell). version increases with every change of the admin-editable fields and of stock_on_hand (optimistic concurrency for update_product).';
SELECT pg_catalog.pg_extension_config_dump('eventshop.products', '');
SELECT pg_catalog.pg_extension_config_dump('eventshop.products_id_seq', '');

-- The text a product is found by. A function, so that the index and the
-- search use the same expression.
CREATE FUNCTION eventshop._product_document(sku text, title text, category text, description text)
RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT setweight(to_tsvector('pg_catalog.english', title || ' ' || coalesce(category, '') || ' ' || sku), 'A')
		   || setweight(to_tsvector('pg_catalog.english', description), 'B')
$$;
COMMENT ON FUNCTION eventshop._product_document(text, text, text, text) IS 'Internal: the full-text document of a product (title, category and SKU weighted A, description B), English configuration.';

CREATE INDEX products_search_idx ON eventshop.products
	USING gin (eventshop._product_document(sku, title, category, description)) WHERE active;
CREATE INDEX products_title_idx ON eventshop.products ((title COLLATE "C"), id) WHERE active;
CREATE INDEX products_category_idx ON eventshop.products (category, (title COLLATE "C"), id) WHERE active;

-- Order ids are UUIDv7 (eventshop._uuid_v7): they sort by creation, so the
-- primary key serves "newest first" and inserts append to the index.
-- orders.user_id has no FOREIGN KEY: its check of every new order (a query
-- and a row lock on the user) cost about 4% of placing an order. The same
-- guarantee comes from the other side (src/order_owners.c): the trigger
-- users_keep_orders refuses (23503) to delete a user who has orders, to
-- change its id or to truncate users while orders exist, after waiting for
-- every transaction that is writing orders; place_order locks orders before
-- it reads the caller, so it either is waited for or sees the deletion.
CREATE TABLE eventshop.orders (
	id				uuid PRIMARY KEY,
	user_id			uuid NOT NULL,		-- eventshop.users (id), kept by users_keep_orders
	status			eventshop.order_status NOT NULL,
	currency		text NOT NULL,		-- the products' (eventshop.currency_code)
	total_minor		eventshop.amount_minor NOT NULL,
	item_count		integer NOT NULL,
	unit_count		integer NOT NULL,
	created_at		timestamptz NOT NULL,
	reserved_until	timestamptz NOT NULL,
	updated_at		timestamptz NOT NULL,
	paid_at			timestamptz,		-- set on reserved -> paid
	completed_at	timestamptz			-- set on paid -> completed
);
CREATE INDEX orders_user_idx ON eventshop.orders (user_id, id);

CREATE FUNCTION eventshop._users_keep_orders()
RETURNS trigger
AS 'MODULE_PATHNAME', 'eventshop_users_keep_orders'
LANGUAGE C;
COMMENT ON FUNCTION eventshop._users_keep_orders() IS 'Internal: the trigger that keeps the user of every order (what a foreign key on orders.user_id would do; see src/order_owners.c).';
CREATE TRIGGER users_keep_orders
	BEFORE DELETE OR UPDATE OF id ON eventshop.users
	FOR EACH ROW EXECUTE FUNCTION eventshop._users_keep_orders();
CREATE TRIGGER users_keep_orders_on_truncate
	BEFORE TRUNCATE ON eventshop.users
	FOR EACH STATEMENT EXECUTE FUNCTION eventshop._users_keep_orders();
CREATE INDEX orders_reserved_until_idx ON eventshop.orders (reserved_until) WHERE status = 'reserved';
CREATE INDEX orders_completed_idx ON eventshop.orders (completed_at) WHERE status = 'completed';
COMMENT ON TABLE eventshop.orders IS 'Orders; id is a UUIDv7, so ids sort by creation. status: reserved (holds its stock until reserved_until) -> paid -> completed -> refunded, or reserved -> cancelled / expired. total_minor is computed from the items when the order is placed; item_count is the number of lines, unit_count the number of units.';
SELECT pg_catalog.pg_extension_config_dump('eventshop.orders', '');

-- No foreign keys here on purpose: lines are written only by place_order, in
-- the statement that inserts their order, for products it holds locked; the
-- six key checks of a 3-line order would cost about a tenth of placing it.
CREATE TABLE eventshop.order_items (
	order_id		uuid NOT NULL,		-- eventshop.orders (id)
	product_id		bigint NOT NULL,	-- eventshop.products (id)
	sku				text NOT NULL,
	title			text NOT NULL,
	category		text,
	unit_price_minor bigint NOT NULL,
	quantity		eventshop.line_quantity NOT NULL,
	PRIMARY KEY (order_id, product_id)
);
COMMENT ON TABLE eventshop.order_items IS 'Lines of an order: SKU, title, category and unit price as they were when the order was placed (later catalog changes do not alter an order).';
SELECT pg_catalog.pg_extension_config_dump('eventshop.order_items', '');

CREATE TABLE eventshop.payments (
	id				uuid PRIMARY KEY,
	order_id		uuid NOT NULL REFERENCES eventshop.orders (id),
	kind			text NOT NULL CHECK (kind IN ('payment', 'refund')),
	provider		text NOT NULL CHECK (provider ~ '^[a-z0-9_-]{1,32}$'),
	provider_ref	text NOT NULL CHECK (char_length(provider_ref) BETWEEN 1 AND 255),
	status			text NOT NULL CHECK (status IN ('succeeded', 'failed')),
	amount_minor	bigint NOT NULL CHECK (amount_minor >= 0),
	currency		text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
	order_status	text NOT NULL,
	created_at		timestamptz NOT NULL DEFAULT clock_timestamp(),
	CONSTRAINT payments_provider_ref_key UNIQUE (provider, provider_ref)
);
CREATE INDEX payments_order_idx ON eventshop.payments (order_id);
COMMENT ON TABLE eventshop.payments IS 'Payment and refund results reported by a payment provider, one per provider reference (recording the same reference again is a no-op that returns the stored result). order_status is the order''s status right after the result was applied.';
SELECT pg_catalog.pg_extension_config_dump('eventshop.payments', '');

CREATE TABLE eventshop.cart_items (
	user_id			uuid NOT NULL REFERENCES eventshop.users (id) ON DELETE CASCADE,
	product_id		bigint NOT NULL REFERENCES eventshop.products (id),
	quantity		eventshop.line_quantity NOT NULL,
	added_at		timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (user_id, product_id)
);
COMMENT ON TABLE eventshop.cart_items IS 'Per-user shopping carts: product and quantity; prices and stock are read from the catalog when the cart is viewed or checked out.';
SELECT pg_catalog.pg_extension_config_dump('eventshop.cart_items', '');

CREATE TYPE eventshop.product AS (
	product_id		bigint,
	sku				text,
	title			text,
	description		text,
	category		text,
	price_minor		bigint,
	currency		text,
	stock_on_hand	integer,
	reserved		integer,
	available		integer,
	active			boolean,
	version			integer
);
COMMENT ON TYPE eventshop.product IS 'A product as the catalog functions return it; available = stock_on_hand - reserved.';

CREATE TYPE eventshop.product_listing AS (
	product_id		bigint,
	sku				text,
	title			text,
	description		text,
	category		text,
	price_minor		bigint,
	currency		text,
	available		integer,
	version			integer,
	cursor			text
);
COMMENT ON TYPE eventshop.product_listing IS 'A search_products row; cursor is the opaque position after this row (pass the last row''s cursor for the next page).';

CREATE TYPE eventshop.order_summary AS (
	order_id		uuid,
	status			text,
	currency		text,
	total_minor		bigint,
	item_count		integer,
	reserved_until	timestamptz
);
CREATE TYPE eventshop.order_line AS (
	product_id		bigint,
	sku				text,
	title			text,
	category		text,
	unit_price_minor bigint,
	quantity		integer
);
COMMENT ON TYPE eventshop.order_line IS 'Internal: one line of an order being placed, as read from the locked product row.';

COMMENT ON TYPE eventshop.order_summary IS 'What place_order, checkout and cancel_order return; item_count is the number of lines.';

CREATE TYPE eventshop.order_listing AS (
	order_id		uuid,
	user_id			uuid,
	status			text,
	currency		text,
	total_minor		bigint,
	item_count		integer,
	created_at		timestamptz,
	cursor			text
);
COMMENT ON TYPE eventshop.order_listing IS 'A list_orders row; cursor is the opaque position after this row.';

CREATE TYPE eventshop.payment_result AS (
	payment_id		uuid,
	order_id		uuid,
	kind			text,
	status			text,
	amount_minor	bigint,
	currency		text,
	order_status	text
);
COMMENT ON TYPE eventshop.payment_result IS 'What record_payment and record_refund return (the same again when the provider reference is replayed): kind payment or refund, status succeeded or failed, and the order''s status right after.';

-- Every status change of an order goes through this trigger, whichever
-- function makes it: the lifecycle cannot be skipped or reversed.
CREATE FUNCTION eventshop._orders_check_transition()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF (OLD.status, NEW.status) NOT IN (('reserved', 'paid'), ('paid', 'completed'), ('completed', 'refunded'),
										('reserved', 'cancelled'), ('reserved', 'expired')) THEN
		RAISE EXCEPTION 'invalid order status transition from % to %', OLD.status, NEW.status
			USING ERRCODE = 'object_not_in_prerequisite_state';
	END IF;
	RETURN NEW;
END
$$;
COMMENT ON FUNCTION eventshop._orders_check_transition() IS 'Internal trigger: refuses (55000) any order status change outside reserved -> paid -> completed -> refunded and reserved -> cancelled / expired.';

CREATE TRIGGER orders_status_transition
	BEFORE UPDATE OF status ON eventshop.orders
	FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
	EXECUTE FUNCTION eventshop._orders_check_transition();

CREATE FUNCTION eventshop._is_admin(user_id uuid)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT EXISTS (SELECT 1 FROM eventshop.users u WHERE u.id = _is_admin.user_id AND 'admin' = ANY (u.roles))
$$;
COMMENT ON FUNCTION eventshop._is_admin(uuid) IS 'Internal: whether the account has the admin role now.';

CREATE FUNCTION eventshop._check_sku(sku text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF sku IS NULL THEN
		RAISE EXCEPTION 'SKU is required' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF sku !~ '^[A-Za-z0-9._-]{1,64}$' THEN
		RAISE EXCEPTION 'invalid SKU' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'A SKU is 1 to 64 characters from A-Z, a-z, 0-9, ".", "_" and "-".';
	END IF;
END
$$;
COMMENT ON FUNCTION eventshop._check_sku(text) IS 'Internal: raises 22004 for a NULL SKU and 22023 for a malformed one.';

-- Checks every field of a product (create_product, update_product).
CREATE FUNCTION eventshop._check_product(title text, description text, category text, price_minor bigint,
										 currency text, stock_on_hand bigint)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF title IS NULL OR price_minor IS NULL OR currency IS NULL OR stock_on_hand IS NULL THEN
		RAISE EXCEPTION 'title, price_minor, currency and stock_on_hand are required' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF btrim(title) = '' OR char_length(title) > 200 OR title ~ '[[:cntrl:]]' THEN
		RAISE EXCEPTION 'invalid title' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Use 1 to 200 printable characters.';
	END IF;
	IF description IS NULL OR char_length(description) > 5000 THEN
		RAISE EXCEPTION 'invalid description' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Use at most 5000 characters.';
	END IF;
	IF category IS NOT NULL AND (btrim(category) = '' OR char_length(category) > 64 OR category ~ '[[:cntrl:]]') THEN
		RAISE EXCEPTION 'invalid category' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Use 1 to 64 printable characters, or NULL.';
	END IF;
	IF price_minor NOT BETWEEN 0 AND 1000000000000 THEN
		RAISE EXCEPTION 'invalid price' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'price_minor is an integer number of minor units (cents) between 0 and 1000000000000.';
	END IF;
	IF currency !~ '^[A-Z]{3}$' THEN
		RAISE EXCEPTION 'invalid currency' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Use an ISO 4217 code such as EUR or USD.';
	END IF;
	IF stock_on_hand NOT BETWEEN 0 AND 1000000000 THEN
		RAISE EXCEPTION 'invalid stock_on_hand' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'stock_on_hand is an integer between 0 and 1000000000.';
	END IF;
END
$$;
COMMENT ON FUNCTION eventshop._check_product(text, text, text, bigint, text, bigint) IS 'Internal: validates the fields of a product; 22004 for a missing required field, 22023 for an invalid one.';

CREATE FUNCTION eventshop._product_out(p eventshop.products)
RETURNS eventshop.product
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT ROW(p.id, p.sku, p.title, p.description, p.category, p.price_minor, p.currency,
			   p.stock_on_hand, p.reserved, p.stock_on_hand - p.reserved, p.active, p.version)::eventshop.product
$$;
COMMENT ON FUNCTION eventshop._product_out(eventshop.products) IS 'Internal: a products row as the API''s eventshop.product.';

-- Opaque keyset cursors: base64url of a small JSON object carrying the sort
-- key of the last row and a fingerprint of the search it belongs to. Not a
-- secret (it only holds values the caller was shown), so it is not signed;
-- a tampered cursor is refused or, at worst, starts the page elsewhere.
CREATE FUNCTION eventshop._encode_cursor(data jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT rtrim(translate(encode(convert_to(data::text, 'UTF8'), 'base64'), E'+/\n', '-_'), '=')
$$;
COMMENT ON FUNCTION eventshop._encode_cursor(jsonb) IS 'Internal: encodes a keyset position as an opaque base64url string.';

CREATE FUNCTION eventshop._decode_cursor(cursor text, fingerprint text)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_data jsonb;
BEGIN
	IF char_length(cursor) NOT BETWEEN 4 AND 2000 OR cursor !~ '^[A-Za-z0-9_-]+$' THEN
		RAISE EXCEPTION 'invalid cursor' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	BEGIN
		v_data := convert_from(decode(translate(cursor, '-_', '+/') || repeat('=', (4 - char_length(cursor) % 4) % 4),
									  'base64'), 'UTF8')::jsonb;
	EXCEPTION WHEN OTHERS THEN
		v_data := NULL;
	END;
	IF jsonb_typeof(v_data) IS DISTINCT FROM 'object' THEN
		RAISE EXCEPTION 'invalid cursor' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF v_data->>'f' IS DISTINCT FROM fingerprint THEN
		RAISE EXCEPTION 'cursor does not belong to this query' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Pass the same filters as for the previous page.';
	END IF;
	RETURN v_data;
END
$$;
COMMENT ON FUNCTION eventshop._decode_cursor(text, text) IS 'Internal: decodes a cursor made by _encode_cursor for the search with this fingerprint; 22023 if it is malformed or belongs to another search.';

-- ---------------------------------------------------------------------------
-- Catalog
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop.create_product(sku text, title text, price_minor bigint, currency text,
										 stock_on_hand integer DEFAULT 0, category text DEFAULT NULL,
										 description text DEFAULT '')
RETURNS eventshop.product
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_row eventshop.products;
BEGIN
	PERFORM eventshop._require_admin();
	PERFORM eventshop._check_sku(create_product.sku);
	PERFORM eventshop._check_product(create_product.title, create_product.description, create_product.category,
									 create_product.price_minor, create_product.currency, create_product.stock_on_hand);
	INSERT INTO eventshop.products AS p (sku, title, description, category, price_minor, currency, stock_on_hand)
	VALUES (create_product.sku, btrim(create_product.title), create_product.description, btrim(create_product.category),
			create_product.price_minor, create_product.currency, create_product.stock_on_hand)
	ON CONFLICT ON CONSTRAINT products_sku_key DO NOTHING
	RETURNING p.* INTO v_row;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'a product with SKU "%" already exists', create_product.sku USING ERRCODE = 'unique_violation';
	END IF;
	RETURN eventshop._product_out(v_row);
END
$$;
COMMENT ON FUNCTION eventshop.create_product(text, text, bigint, text, integer, text, text) IS 'Adds a product (version 1) for an authenticated administrator. Errors: 22004 missing field, 22023 invalid field, 23505 SKU exists, 28000/42501 not an authenticated administrator.';

-- Reads an integer from a JSON value, or raises 22023 naming the field.
CREATE FUNCTION eventshop._json_integer(value jsonb, field text, min_value bigint, max_value bigint)
RETURNS bigint
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_num numeric;
BEGIN
	IF jsonb_typeof(value) IS DISTINCT FROM 'number' THEN
		RAISE EXCEPTION '% must be an integer', field USING ERRCODE = 'invalid_parameter_value';
	END IF;
	v_num := value::numeric;
	IF v_num <> trunc(v_num) THEN
		RAISE EXCEPTION '% must be an integer', field USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF v_num < min_value OR v_num > max_value THEN
		RAISE EXCEPTION '% must be between % and %', field, min_value, max_value USING ERRCODE = 'invalid_parameter_value';
	END IF;
	RETURN v_num::bigint;
END
$$;
COMMENT ON FUNCTION eventshop._json_integer(jsonb, text, bigint, bigint) IS 'Internal: a JSON number that is an integer in [min_value, max_value], else 22023 naming the field.';

CREATE FUNCTION eventshop._json_string(value jsonb, field text, nullable boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF nullable AND jsonb_typeof(value) = 'null' THEN
		RETURN NULL;
	END IF;
	IF jsonb_typeof(value) IS DISTINCT FROM 'string' THEN
		RAISE EXCEPTION '% must be a string%', field, CASE WHEN nullable THEN ' or null' ELSE '' END
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	RETURN value #>> '{}';
END
$$;
COMMENT ON FUNCTION eventshop._json_string(jsonb, text, boolean) IS 'Internal: a JSON string (or null when nullable), else 22023 naming the field.';

-- Optimistic concurrency: the caller passes the version it read; if the
-- product changed since, nothing is written and 40001 tells it to reload.
CREATE FUNCTION eventshop.update_product(product_id bigint, expected_version integer, changes jsonb)
RETURNS eventshop.product
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_row		eventshop.products;
	v_key		text;
	v_title		text;
	v_desc		text;
	v_category	text;
	v_price		bigint;
	v_currency	text;
	v_stock		bigint;
	v_active	boolean;
BEGIN
	PERFORM eventshop._require_admin();
	IF update_product.product_id IS NULL OR expected_version IS NULL OR changes IS NULL THEN
		RAISE EXCEPTION 'product_id, expected_version and changes are required' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF jsonb_typeof(changes) <> 'object' OR changes = '{}'::jsonb THEN
		RAISE EXCEPTION 'changes must be a non-empty JSON object' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	SELECT k INTO v_key FROM jsonb_object_keys(changes) AS k
	WHERE k NOT IN ('title', 'description', 'category', 'price_minor', 'currency', 'stock_on_hand', 'active')
	ORDER BY k LIMIT 1;
	IF v_key IS NOT NULL THEN
		RAISE EXCEPTION 'unknown field "%" in changes', v_key USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Allowed: title, description, category, price_minor, currency, stock_on_hand, active.';
	END IF;

	SELECT p.* INTO v_row FROM eventshop.products p WHERE p.id = update_product.product_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'no such product' USING ERRCODE = 'no_data_found';
	END IF;
	IF v_row.version <> expected_version THEN
		RAISE EXCEPTION 'product % was changed by someone else', v_row.sku
			USING ERRCODE = 'serialization_failure',
				  DETAIL = format('Expected version %s, the product is at version %s.', expected_version, v_row.version),
				  HINT = 'Read the product again and reapply the change.';
	END IF;

	v_title := CASE WHEN changes ? 'title' THEN eventshop._json_string(changes->'title', 'title') ELSE v_row.title END;
	v_desc := CASE WHEN changes ? 'description' THEN eventshop._json_string(changes->'description', 'description') ELSE v_row.description END;
	v_category := CASE WHEN changes ? 'category' THEN eventshop._json_string(changes->'category', 'category', true) ELSE v_row.category END;
	v_price := CASE WHEN changes ? 'price_minor' THEN eventshop._json_integer(changes->'price_minor', 'price_minor', 0, 1000000000000) ELSE v_row.price_minor END;
	v_currency := CASE WHEN changes ? 'currency' THEN eventshop._json_string(changes->'currency', 'currency') ELSE v_row.currency END;
	v_stock := CASE WHEN changes ? 'stock_on_hand' THEN eventshop._json_integer(changes->'stock_on_hand', 'stock_on_hand', 0, 1000000000) ELSE v_row.stock_on_hand END;
	IF changes ? 'active' THEN
		IF jsonb_typeof(changes->'active') IS DISTINCT FROM 'boolean' THEN
			RAISE EXCEPTION 'active must be true or false' USING ERRCODE = 'invalid_parameter_value';
		END IF;
		v_active := (changes->>'active')::boolean;
	ELSE
		v_active := v_row.active;
	END IF;
	PERFORM eventshop._check_product(v_title, v_desc, v_category, v_price, v_currency, v_stock);
	IF v_stock < v_row.reserved THEN
		RAISE EXCEPTION 'stock_on_hand cannot be set below the units reserved by open orders'
			USING ERRCODE = 'check_violation',
				  DETAIL = format('%s units of %s are reserved.', v_row.reserved, v_row.sku);
	END IF;

	UPDATE eventshop.products p
	SET title = btrim(v_title), description = v_desc, category = btrim(v_category), price_minor = v_price,
		currency = v_currency, stock_on_hand = v_stock, active = v_active,
		version = p.version + 1, updated_at = clock_timestamp()
	WHERE p.id = v_row.id
	RETURNING p.* INTO v_row;
	RETURN eventshop._product_out(v_row);
END
$$;
COMMENT ON FUNCTION eventshop.update_product(bigint, integer, jsonb) IS 'Changes a product for an authenticated administrator if it is still at expected_version; changes is a JSON object with any of title, description, category, price_minor, currency, stock_on_hand (absolute), active. Returns the product at its new version. Errors: 40001 stale version (reload and retry), 22023 unknown key or invalid value, 23514 stock below the reserved units, P0002 no such product, 28000/42501 not an authenticated administrator.';

CREATE FUNCTION eventshop.get_product(sku text)
RETURNS eventshop.product
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_row eventshop.products;
BEGIN
	PERFORM eventshop._check_sku(get_product.sku);
	SELECT p.* INTO v_row FROM eventshop.products p WHERE p.sku = get_product.sku;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown SKU "%"', get_product.sku USING ERRCODE = 'no_data_found';
	END IF;
	RETURN eventshop._product_out(v_row);
END
$$;
COMMENT ON FUNCTION eventshop.get_product(text) IS 'A product by SKU, with its available stock (no authentication needed). Errors: P0002 unknown SKU, 22023 malformed SKU.';

-- Keyset pagination: rows come in a total order (rank, id) or (title, id),
-- and a page starts strictly after the position the cursor carries, so
-- paging never skips or repeats a row that did not change meanwhile.
CREATE FUNCTION eventshop.search_products(query text DEFAULT NULL, category text DEFAULT NULL,
										  page_size integer DEFAULT 20, cursor text DEFAULT NULL)
RETURNS SETOF eventshop.product_listing
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_query		text := nullif(btrim(search_products.query), '');
	v_tsq		tsquery;
	v_fp		text;
	v_after		jsonb;
	v_rank		real;
	v_title		text;
	v_id		bigint;
BEGIN
	IF page_size IS NULL OR page_size NOT BETWEEN 1 AND 100 THEN
		RAISE EXCEPTION 'page_size must be between 1 and 100' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF char_length(v_query) > 200 THEN
		RAISE EXCEPTION 'query is too long' USING ERRCODE = 'invalid_parameter_value', HINT = 'Use at most 200 characters.';
	END IF;
	IF char_length(search_products.category) > 64 THEN
		RAISE EXCEPTION 'invalid category' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	v_fp := left(md5(concat_ws(E'\x1f', 'products', v_query, search_products.category)), 16);
	IF search_products.cursor IS NOT NULL THEN
		v_after := eventshop._decode_cursor(search_products.cursor, v_fp);
		BEGIN
			v_id := (v_after->>'i')::bigint;
			v_title := v_after->>'t';
			v_rank := (v_after->>'r')::real;
		EXCEPTION WHEN OTHERS THEN
			v_id := NULL;
		END;
		IF v_id IS NULL OR (v_query IS NULL AND v_title IS NULL) OR (v_query IS NOT NULL AND v_rank IS NULL) THEN
			RAISE EXCEPTION 'invalid cursor' USING ERRCODE = 'invalid_parameter_value';
		END IF;
	END IF;

	IF v_query IS NULL THEN
		RETURN QUERY
		SELECT p.id, p.sku::text, p.title, p.description, p.category, p.price_minor::bigint, p.currency::text,
			   p.stock_on_hand - p.reserved, p.version,
			   eventshop._encode_cursor(jsonb_build_object('f', v_fp, 't', p.title, 'i', p.id))
		FROM eventshop.products p
		WHERE p.active
		  AND (search_products.category IS NULL OR p.category = search_products.category)
		  AND (v_id IS NULL OR (p.title COLLATE "C", p.id) > (v_title COLLATE "C", v_id))
		ORDER BY p.title COLLATE "C", p.id
		LIMIT page_size;
		RETURN;
	END IF;

	v_tsq := websearch_to_tsquery('pg_catalog.english', v_query);
	RETURN QUERY
	SELECT s.id, s.sku::text, s.title, s.description, s.category, s.price_minor::bigint, s.currency::text,
		   s.stock_on_hand - s.reserved, s.version,
		   eventshop._encode_cursor(jsonb_build_object('f', v_fp, 'r', s.rank, 'i', s.id))
	FROM (SELECT p.*, ts_rank(eventshop._product_document(p.sku, p.title, p.category, p.description), v_tsq) AS rank
		  FROM eventshop.products p
		  WHERE p.active
			AND eventshop._product_document(p.sku, p.title, p.category, p.description) @@ v_tsq
			AND (search_products.category IS NULL OR p.category = search_products.category)) s
	WHERE v_id IS NULL OR s.rank < v_rank OR (s.rank = v_rank AND s.id > v_id)
	ORDER BY s.rank DESC, s.id
	LIMIT page_size;
END
$$;
COMMENT ON FUNCTION eventshop.search_products(text, text, integer, text) IS 'Active products matching a full-text query (web search syntax, English; ranked) or all of them by title, optionally in one category, page_size (1-100) at a time. Each row carries the cursor for the page after it. No authentication needed. Errors: 22023 bad page size, query, category or cursor.';

-- ---------------------------------------------------------------------------
-- Inventory: reserve (inside place_order), release, consume, restock.
-- ---------------------------------------------------------------------------

-- Locks the products of the given orders in SKU order and gives their
-- reserved units back. The caller holds the order rows.
CREATE FUNCTION eventshop._release_stock(order_ids uuid[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM 1 FROM eventshop.products p
	WHERE p.id IN (SELECT i.product_id FROM eventshop.order_items i WHERE i.order_id = ANY (order_ids))
	ORDER BY p.sku
	FOR NO KEY UPDATE;
	UPDATE eventshop.products p SET reserved = p.reserved - q.quantity
	FROM (SELECT i.product_id, sum(i.quantity)::integer AS quantity
		  FROM eventshop.order_items i WHERE i.order_id = ANY (order_ids)
		  GROUP BY i.product_id) q
	WHERE p.id = q.product_id;
END
$$;
COMMENT ON FUNCTION eventshop._release_stock(uuid[]) IS 'Internal: releases the reservations of the given orders (locks their products in SKU order, then lowers reserved).';

CREATE FUNCTION eventshop.expire_reservations(max_orders integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_ids	uuid[];
	v_order	record;
	v_count	integer := 0;
BEGIN
	IF max_orders IS NULL OR max_orders NOT BETWEEN 1 AND 100000 THEN
		RAISE EXCEPTION 'max_orders must be between 1 and 100000' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	-- Orders being paid or cancelled right now are skipped, not waited for:
	-- they are no longer reserved when their transaction ends, or the next
	-- run takes them.
	SELECT array_agg(o.id) INTO v_ids
	FROM (SELECT o.id FROM eventshop.orders o
		  WHERE o.status = 'reserved' AND o.reserved_until <= (SELECT clock_timestamp())
		  ORDER BY o.reserved_until
		  LIMIT max_orders
		  FOR UPDATE SKIP LOCKED) o;
	IF v_ids IS NULL THEN
		RETURN 0;
	END IF;
	PERFORM eventshop._release_stock(v_ids);
	FOR v_order IN
		UPDATE eventshop.orders o SET status = 'expired', updated_at = clock_timestamp()
		WHERE o.id = ANY (v_ids)
		RETURNING o.id, o.user_id
	LOOP
		PERFORM eventshop._emit_event('orders.events', v_order.id::text, 'order.expired',
			jsonb_build_object('order_id', v_order.id, 'user_id', v_order.user_id));
		v_count := v_count + 1;
	END LOOP;
	RETURN v_count;
END
$$;
COMMENT ON FUNCTION eventshop.expire_reservations(integer) IS 'Expires up to max_orders reserved orders whose reserved_until has passed (skipping orders locked by others): releases their stock, sets status expired and emits order.expired for each; returns how many. Schedule with pg_cron every minute: SELECT cron.schedule(''eventshop-expire-reservations'', ''* * * * *'', ''SELECT eventshop.expire_reservations()'').';

-- ---------------------------------------------------------------------------
-- Orders
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop._uuid_v7()
RETURNS uuid
AS 'MODULE_PATHNAME', 'eventshop_uuid_v7'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION eventshop._uuid_v7() IS 'Internal: a new UUIDv7 (RFC 9562: Unix time in milliseconds, then 74 random bits), used as order id so that ids sort by creation.';

CREATE FUNCTION eventshop._parse_order_items(items jsonb, OUT skus text[], OUT quantities integer[])
RETURNS record
AS 'MODULE_PATHNAME', 'eventshop_parse_order_items'
LANGUAGE C IMMUTABLE;
COMMENT ON FUNCTION eventshop._parse_order_items(jsonb) IS 'Internal: validates the items of an order, [{"sku": ..., "quantity": 1..1000}] with no other key, 1 to 100 distinct SKUs, and returns them as aligned arrays. Errors: 22004 NULL, 22023 naming the first bad item.';

-- Places an order for the authenticated user: the inventory's "reserve" (C,
-- src/place_order.c: one UPDATE reserves every line that can be served,
-- locking its product in SKU order, and returns what the checks and the
-- snapshot need; one statement writes the order with its lines and its
-- event. Statements prepared once per backend). The two-argument form authenticates with an access token
-- first (as eventshop.authenticate, establishing the caller for the rest of
-- the transaction), so that an order takes one round trip.
CREATE FUNCTION eventshop.place_order(items jsonb)
RETURNS eventshop.order_summary
AS 'MODULE_PATHNAME', 'eventshop_place_order'
LANGUAGE C VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventshop.place_order(jsonb) IS 'Places an order for the authenticated user from [{"sku": ..., "quantity": ...}] (only these keys; quantity 1-1000, 1-100 distinct SKUs, one currency): reserves the stock of every line or of none (products locked in SKU order in one statement: no oversell, no deadlock), snapshots titles and prices, computes the total; status reserved until now + eventshop.reservation_ttl; emits order.created. Errors: 22023 malformed items, unknown key, bad quantity, empty, over 100 lines, duplicate SKU, mixed currencies; P0002 unknown SKU; 55000 product not for sale; 23514 insufficient stock; 28000 not authenticated.';

CREATE FUNCTION eventshop.place_order(access_token text, items jsonb)
RETURNS eventshop.order_summary
AS 'MODULE_PATHNAME', 'eventshop_place_order_with_token'
LANGUAGE C VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic;
COMMENT ON FUNCTION eventshop.place_order(text, jsonb) IS 'eventshop.authenticate(access_token) and eventshop.place_order(items) in one call (one round trip): verifies the token exactly as authenticate does, establishes the caller for the rest of the transaction, then places the order. Errors: those of authenticate (28000 invalid token), then those of place_order(jsonb).';

CREATE FUNCTION eventshop.cancel_order(order_id uuid)
RETURNS eventshop.order_summary
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_user		uuid := eventshop._require_user();
	v_admin		boolean := eventshop._is_admin(v_user);
	v_order		eventshop.orders;
	v_result	eventshop.order_summary;
BEGIN
	IF cancel_order.order_id IS NULL THEN
		RAISE EXCEPTION 'order id is required' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	SELECT o.* INTO v_order FROM eventshop.orders o
	WHERE o.id = cancel_order.order_id AND (o.user_id = v_user OR v_admin)
	FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'no such order' USING ERRCODE = 'no_data_found';
	END IF;
	IF v_order.status <> 'reserved' THEN
		RAISE EXCEPTION 'order is % and cannot be cancelled', v_order.status
			USING ERRCODE = 'object_not_in_prerequisite_state',
				  HINT = 'Only a reserved order can be cancelled; a paid order is refunded through the payment provider.';
	END IF;
	PERFORM eventshop._release_stock(ARRAY[v_order.id]);
	UPDATE eventshop.orders o SET status = 'cancelled', updated_at = clock_timestamp() WHERE o.id = v_order.id;
	PERFORM eventshop._emit_event('orders.events', v_order.id::text, 'order.cancelled',
		jsonb_build_object('order_id', v_order.id, 'user_id', v_order.user_id,
						   'by', CASE WHEN v_order.user_id = v_user THEN 'user' ELSE 'admin' END));
	v_result := (v_order.id, 'cancelled', v_order.currency, v_order.total_minor, v_order.item_count,
				 v_order.reserved_until)::eventshop.order_summary;
	RETURN v_result;
END
$$;
COMMENT ON FUNCTION eventshop.cancel_order(uuid) IS 'Cancels a reserved order of the authenticated user (administrators: any order) and releases its stock; emits order.cancelled. Errors: P0002 no such order (or not the caller''s), 55000 order not reserved, 28000 not authenticated.';

CREATE FUNCTION eventshop.get_order(order_id uuid)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_user		uuid := eventshop._require_user();
	v_result	jsonb;
BEGIN
	SELECT jsonb_build_object(
			'order_id', o.id, 'user_id', o.user_id, 'status', o.status, 'currency', o.currency,
			'total_minor', o.total_minor, 'created_at', o.created_at, 'reserved_until', o.reserved_until,
			'paid_at', o.paid_at, 'completed_at', o.completed_at,
			'items', (SELECT jsonb_agg(jsonb_build_object('sku', i.sku, 'title', i.title,
														  'unit_price_minor', i.unit_price_minor,
														  'quantity', i.quantity,
														  'line_total_minor', i.unit_price_minor * i.quantity)
									   ORDER BY i.sku)
					  FROM eventshop.order_items i WHERE i.order_id = o.id),
			'payments', (SELECT coalesce(jsonb_agg(jsonb_build_object('payment_id', p.id, 'kind', p.kind,
																	  'status', p.status, 'provider', p.provider,
																	  'provider_ref', p.provider_ref,
																	  'amount_minor', p.amount_minor,
																	  'currency', p.currency, 'created_at', p.created_at)
												   ORDER BY p.created_at, p.id), '[]'::jsonb)
						 FROM eventshop.payments p WHERE p.order_id = o.id))
	INTO v_result
	FROM eventshop.orders o
	WHERE o.id = get_order.order_id AND (o.user_id = v_user OR eventshop._is_admin(v_user));
	IF v_result IS NULL THEN
		RAISE EXCEPTION 'no such order' USING ERRCODE = 'no_data_found';
	END IF;
	RETURN v_result;
END
$$;
COMMENT ON FUNCTION eventshop.get_order(uuid) IS 'One order of the authenticated user (administrators: any order) as JSON, with its items (snapshotted titles and prices) and payments. Errors: P0002 no such order (or not the caller''s), 28000 not authenticated.';

CREATE FUNCTION eventshop.list_orders(status text DEFAULT NULL, all_users boolean DEFAULT false,
									  page_size integer DEFAULT 50, cursor text DEFAULT NULL)
RETURNS SETOF eventshop.order_listing
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_user		uuid := eventshop._require_user();
	v_all		boolean := coalesce(list_orders.all_users, false);
	v_fp		text;
	v_after		jsonb;
	v_id		uuid;
BEGIN
	IF v_all THEN
		PERFORM eventshop._require_admin();
	END IF;
	IF list_orders.status IS NOT NULL
	   AND list_orders.status NOT IN ('reserved', 'paid', 'completed', 'cancelled', 'expired', 'refunded') THEN
		RAISE EXCEPTION 'unknown order status "%"', list_orders.status USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Use reserved, paid, completed, cancelled, expired or refunded.';
	END IF;
	IF page_size IS NULL OR page_size NOT BETWEEN 1 AND 100 THEN
		RAISE EXCEPTION 'page_size must be between 1 and 100' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	v_fp := left(md5(concat_ws(E'\x1f', 'orders', list_orders.status, v_all::text)), 16);
	IF list_orders.cursor IS NOT NULL THEN
		v_after := eventshop._decode_cursor(list_orders.cursor, v_fp);
		BEGIN
			v_id := (v_after->>'i')::uuid;
		EXCEPTION WHEN OTHERS THEN
			v_id := NULL;
		END;
		IF v_id IS NULL THEN
			RAISE EXCEPTION 'invalid cursor' USING ERRCODE = 'invalid_parameter_value';
		END IF;
	END IF;
	RETURN QUERY
	SELECT o.id, o.user_id, o.status::text, o.currency, o.total_minor::bigint, o.item_count, o.created_at,
		   eventshop._encode_cursor(jsonb_build_object('f', v_fp, 'i', o.id))
	FROM eventshop.orders o
	WHERE (v_all OR o.user_id = v_user)
	  AND (list_orders.status IS NULL OR o.status = list_orders.status)
	  AND (v_id IS NULL OR o.id < v_id)
	ORDER BY o.id DESC
	LIMIT page_size;
END
$$;
COMMENT ON FUNCTION eventshop.list_orders(text, boolean, integer, text) IS 'The authenticated user''s orders, newest first, optionally with one status, page_size (1-100) at a time; all_users => true lists every user''s orders (administrators only). Each row carries the cursor for the page after it. Errors: 22023 unknown status, bad page size or cursor; 42501 all_users without the admin role; 28000 not authenticated.';

-- ---------------------------------------------------------------------------
-- Cart
-- ---------------------------------------------------------------------------

-- The product a cart function is about, with its available stock.
CREATE FUNCTION eventshop._cart_product(sku text, OUT product_id bigint, OUT available integer)
RETURNS record
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_active boolean;
BEGIN
	PERFORM eventshop._check_sku(_cart_product.sku);
	SELECT p.id, p.stock_on_hand - p.reserved, p.active INTO product_id, available, v_active
	FROM eventshop.products p WHERE p.sku = _cart_product.sku;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown SKU "%"', _cart_product.sku USING ERRCODE = 'no_data_found';
	END IF;
	IF NOT v_active THEN
		RAISE EXCEPTION 'product "%" is not for sale', _cart_product.sku USING ERRCODE = 'object_not_in_prerequisite_state';
	END IF;
END
$$;
COMMENT ON FUNCTION eventshop._cart_product(text) IS 'Internal: id and available stock of an active product by SKU; P0002 unknown SKU, 55000 not for sale, 22004/22023 bad SKU.';

CREATE FUNCTION eventshop._check_cart_quantity(sku text, quantity bigint, available integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF quantity IS NULL THEN
		RAISE EXCEPTION 'quantity is required' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF quantity NOT BETWEEN 1 AND 1000 THEN
		RAISE EXCEPTION 'quantity must be between 1 and 1000' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF quantity > available THEN
		RAISE EXCEPTION 'insufficient stock for SKU "%"', sku USING ERRCODE = 'check_violation',
			DETAIL = format('Requested %s, available %s.', quantity, available);
	END IF;
END
$$;
COMMENT ON FUNCTION eventshop._check_cart_quantity(text, bigint, integer) IS 'Internal: a cart line quantity must be 1-1000 (22023) and not above the available stock (23514).';

CREATE FUNCTION eventshop.cart_add(sku text, quantity integer DEFAULT 1)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_user		uuid := eventshop._require_user();
	v_product	record;
	v_current	integer;
BEGIN
	IF quantity IS NULL THEN
		RAISE EXCEPTION 'quantity is required' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF quantity NOT BETWEEN 1 AND 1000 THEN
		RAISE EXCEPTION 'quantity must be between 1 and 1000' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	v_product := eventshop._cart_product(cart_add.sku);
	SELECT c.quantity INTO v_current FROM eventshop.cart_items c
	WHERE c.user_id = v_user AND c.product_id = v_product.product_id
	FOR UPDATE;
	IF NOT FOUND THEN
		v_current := 0;
		IF (SELECT count(*) FROM eventshop.cart_items c WHERE c.user_id = v_user) >= 100 THEN
			RAISE EXCEPTION 'a cart holds at most 100 lines' USING ERRCODE = 'invalid_parameter_value';
		END IF;
	END IF;
	PERFORM eventshop._check_cart_quantity(cart_add.sku, v_current::bigint + quantity, v_product.available);
	INSERT INTO eventshop.cart_items AS c (user_id, product_id, quantity)
	VALUES (v_user, v_product.product_id, v_current + quantity)
	ON CONFLICT ON CONSTRAINT cart_items_pkey DO UPDATE SET quantity = excluded.quantity;
	RETURN v_current + quantity;
END
$$;
COMMENT ON FUNCTION eventshop.cart_add(text, integer) IS 'Adds quantity (default 1) of a product to the authenticated user''s cart and returns the line''s new quantity. Errors: 22023 quantity outside 1-1000 (also for the line) or more than 100 lines, P0002 unknown SKU, 55000 not for sale, 23514 more than the available stock, 28000 not authenticated.';

CREATE FUNCTION eventshop.cart_set_quantity(sku text, quantity integer)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_user		uuid := eventshop._require_user();
	v_product	record;
BEGIN
	IF quantity IS NOT NULL AND quantity = 0 THEN
		RAISE EXCEPTION 'quantity must be between 1 and 1000' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Use eventshop.cart_remove to remove a line.';
	END IF;
	v_product := eventshop._cart_product(cart_set_quantity.sku);
	PERFORM eventshop._check_cart_quantity(cart_set_quantity.sku, quantity, v_product.available);
	UPDATE eventshop.cart_items c SET quantity = cart_set_quantity.quantity
	WHERE c.user_id = v_user AND c.product_id = v_product.product_id;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'SKU "%" is not in the cart', cart_set_quantity.sku USING ERRCODE = 'no_data_found';
	END IF;
	RETURN quantity;
END
$$;
COMMENT ON FUNCTION eventshop.cart_set_quantity(text, integer) IS 'Sets the quantity of a line of the authenticated user''s cart. Errors: 22023 quantity outside 1-1000 (use cart_remove for 0), P0002 unknown SKU or not in the cart, 55000 not for sale, 23514 more than the available stock, 28000 not authenticated.';

CREATE FUNCTION eventshop.cart_remove(sku text)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_user uuid := eventshop._require_user();
BEGIN
	PERFORM eventshop._check_sku(cart_remove.sku);
	DELETE FROM eventshop.cart_items c USING eventshop.products p
	WHERE c.user_id = v_user AND c.product_id = p.id AND p.sku = cart_remove.sku;
	RETURN FOUND;
END
$$;
COMMENT ON FUNCTION eventshop.cart_remove(text) IS 'Removes a line from the authenticated user''s cart; false if it was not there. Errors: 22004/22023 bad SKU, 28000 not authenticated.';

CREATE FUNCTION eventshop.cart_clear()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_user	uuid := eventshop._require_user();
	v_count	integer;
BEGIN
	DELETE FROM eventshop.cart_items c WHERE c.user_id = v_user;
	GET DIAGNOSTICS v_count = ROW_COUNT;
	RETURN v_count;
END
$$;
COMMENT ON FUNCTION eventshop.cart_clear() IS 'Empties the authenticated user''s cart; returns the number of lines removed. Errors: 28000 not authenticated.';

CREATE FUNCTION eventshop.cart_view()
RETURNS TABLE (sku text, title text, unit_price_minor bigint, currency text, quantity integer,
			   line_total_minor bigint, available integer, in_stock boolean)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_user uuid := eventshop._require_user();
BEGIN
	RETURN QUERY
	SELECT p.sku::text, p.title, p.price_minor::bigint, p.currency::text, c.quantity::integer, p.price_minor * c.quantity,
		   p.stock_on_hand - p.reserved, p.active AND c.quantity <= p.stock_on_hand - p.reserved
	FROM eventshop.cart_items c JOIN eventshop.products p ON p.id = c.product_id
	WHERE c.user_id = v_user
	ORDER BY p.sku COLLATE "C";
END
$$;
COMMENT ON FUNCTION eventshop.cart_view() IS 'The authenticated user''s cart with current prices and stock: in_stock is false when the product is no longer for sale or fewer units are available than the line asks for. Errors: 28000 not authenticated.';

CREATE FUNCTION eventshop.checkout()
RETURNS eventshop.order_summary
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_user	uuid := eventshop._require_user();
	v_items	jsonb;
BEGIN
	-- Take the cart (it comes back if the order fails: everything rolls back).
	WITH taken AS (
		DELETE FROM eventshop.cart_items c WHERE c.user_id = v_user RETURNING c.product_id, c.quantity
	)
	SELECT jsonb_agg(jsonb_build_object('sku', p.sku, 'quantity', t.quantity) ORDER BY p.id) INTO v_items
	FROM taken t JOIN eventshop.products p ON p.id = t.product_id;
	IF v_items IS NULL THEN
		RAISE EXCEPTION 'the cart is empty' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	RETURN eventshop.place_order(v_items);
END
$$;
COMMENT ON FUNCTION eventshop.checkout() IS 'Places an order from the authenticated user''s whole cart and empties it, all or nothing (as place_order); emits order.created. Errors: 22023 empty cart or mixed currencies, 55000 product no longer for sale, 23514 insufficient stock, 28000 not authenticated.';

-- ---------------------------------------------------------------------------
-- Payments: results reported by the payment provider, recorded by the
-- gateway (role eventshop_gateway) after verify_webhook_signature accepted
-- the provider's callback. Idempotent by (provider, provider_ref).
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop.verify_webhook_signature(payload text, signature_header text, secret text,
												   tolerance_seconds integer DEFAULT 300,
												   now_epoch bigint DEFAULT NULL)
RETURNS boolean
AS 'MODULE_PATHNAME', 'eventshop_verify_webhook_signature'
LANGUAGE C VOLATILE
SECURITY DEFINER				-- only so that the SET below applies: it reads no table
SET search_path = pg_catalog, pg_temp
SET log_min_error_statement = panic;	-- a failed call never logs the secret
COMMENT ON FUNCTION eventshop.verify_webhook_signature(text, text, text, integer, bigint) IS 'Whether signature_header (Stripe format: t=<unix time>,v1=<hex>[,v1=...]) holds a v1 HMAC-SHA256 under secret of "<t>.<payload>" (compared in constant time) and t is within tolerance_seconds (default 300, at most 86400) of now_epoch (default: the current time). Anything malformed is false. Errors: 22023 tolerance out of range.';

-- The stored result for a provider reference, if the same result is being
-- recorded again; 22023 if the reference was used for something else.
CREATE FUNCTION eventshop._payment_replay(kind text, order_id uuid, provider text, provider_ref text,
										  status text, amount_minor bigint, currency text)
RETURNS eventshop.payment_result
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_pay eventshop.payments;
BEGIN
	SELECT p.* INTO v_pay FROM eventshop.payments p
	WHERE p.provider = _payment_replay.provider AND p.provider_ref = _payment_replay.provider_ref;
	IF NOT FOUND THEN
		RETURN NULL;
	END IF;
	IF (v_pay.kind, v_pay.order_id, v_pay.status, v_pay.amount_minor, v_pay.currency)
	   IS DISTINCT FROM (kind, order_id, status, amount_minor, currency) THEN
		RAISE EXCEPTION 'provider reference "%" was already recorded with different details', provider_ref
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'A provider reference identifies one result; use the provider''s id of this event.';
	END IF;
	RETURN (v_pay.id, v_pay.order_id, v_pay.kind, v_pay.status, v_pay.amount_minor, v_pay.currency,
			v_pay.order_status)::eventshop.payment_result;
END
$$;
COMMENT ON FUNCTION eventshop._payment_replay(text, uuid, text, text, text, bigint, text) IS 'Internal: the stored result of an identical payment or refund recorded before under this provider reference, NULL if none; 22023 if the reference was recorded with different details.';

-- Records a payment (kind payment: succeeded or failed) or a refund (kind
-- refund, succeeded) reported by the provider, and applies it to the order.
CREATE FUNCTION eventshop._record_provider_result(kind text, order_id uuid, provider text, provider_ref text,
												  status text, amount_minor bigint, currency text)
RETURNS eventshop.payment_result
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_result	eventshop.payment_result;
	v_order		eventshop.orders;
	v_status	text;
	v_event		text;
BEGIN
	IF order_id IS NULL OR provider IS NULL OR provider_ref IS NULL OR status IS NULL
	   OR amount_minor IS NULL OR currency IS NULL THEN
		RAISE EXCEPTION 'order_id, provider, provider_ref, status, amount_minor and currency are required'
			USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF provider !~ '^[a-z0-9_-]{1,32}$' THEN
		RAISE EXCEPTION 'invalid provider' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Use 1 to 32 characters from a-z, 0-9, "_" and "-".';
	END IF;
	IF char_length(provider_ref) NOT BETWEEN 1 AND 255 OR provider_ref !~ '^[[:graph:]]+$' THEN
		RAISE EXCEPTION 'invalid provider reference' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Use 1 to 255 printable characters without spaces.';
	END IF;
	IF status NOT IN ('succeeded', 'failed') THEN
		RAISE EXCEPTION 'invalid payment status "%"', status USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Use succeeded or failed.';
	END IF;
	IF amount_minor < 0 OR currency !~ '^[A-Z]{3}$' THEN
		RAISE EXCEPTION 'invalid amount or currency' USING ERRCODE = 'invalid_parameter_value';
	END IF;

	v_result := eventshop._payment_replay(kind, order_id, provider, provider_ref, status, amount_minor, currency);
	IF v_result.payment_id IS NOT NULL THEN
		RETURN v_result;
	END IF;

	SELECT o.* INTO v_order FROM eventshop.orders o WHERE o.id = _record_provider_result.order_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'no such order' USING ERRCODE = 'no_data_found';
	END IF;
	-- A concurrent call with the same reference may have committed while we
	-- waited for the order: look again now that we hold it.
	v_result := eventshop._payment_replay(kind, order_id, provider, provider_ref, status, amount_minor, currency);
	IF v_result.payment_id IS NOT NULL THEN
		RETURN v_result;
	END IF;

	IF amount_minor <> v_order.total_minor OR currency <> v_order.currency THEN
		RAISE EXCEPTION 'the % does not match the order', CASE kind WHEN 'refund' THEN 'refund' ELSE 'payment' END
			USING ERRCODE = 'invalid_parameter_value',
				  DETAIL = format('Got %s %s; the order total is %s %s.', amount_minor, currency,
								  v_order.total_minor, v_order.currency),
				  HINT = CASE kind WHEN 'refund' THEN 'Only full refunds are supported.'
						 ELSE 'The provider must charge exactly the order total.' END;
	END IF;

	IF kind = 'payment' THEN
		IF v_order.status <> 'reserved' THEN
			RAISE EXCEPTION '%', CASE WHEN v_order.status IN ('paid', 'completed', 'refunded')
									  THEN 'order is already paid'
									  ELSE format('order is %s and cannot be paid', v_order.status) END
				USING ERRCODE = 'object_not_in_prerequisite_state',
					  DETAIL = format('The order is %s.', v_order.status),
					  HINT = 'Refund the payment through the provider.';
		END IF;
		IF v_order.reserved_until <= clock_timestamp() THEN
			RAISE EXCEPTION 'order reservation has expired and the order cannot be paid'
				USING ERRCODE = 'object_not_in_prerequisite_state',
					  HINT = 'Refund the payment through the provider.';
		END IF;
		IF status = 'succeeded' THEN
			-- Consume the reservation: the units leave the stock for good.
			PERFORM 1 FROM eventshop.products p
			WHERE p.id IN (SELECT i.product_id FROM eventshop.order_items i WHERE i.order_id = v_order.id)
			ORDER BY p.sku
			FOR NO KEY UPDATE;
			UPDATE eventshop.products p
			SET stock_on_hand = p.stock_on_hand - i.quantity, reserved = p.reserved - i.quantity,
				version = p.version + 1, updated_at = clock_timestamp()
			FROM eventshop.order_items i
			WHERE i.order_id = v_order.id AND p.id = i.product_id;
			UPDATE eventshop.orders o SET status = 'paid', paid_at = clock_timestamp(), updated_at = clock_timestamp()
			WHERE o.id = v_order.id;
			UPDATE eventshop.orders o SET status = 'completed', completed_at = clock_timestamp(), updated_at = clock_timestamp()
			WHERE o.id = v_order.id;
			v_status := 'completed';
			v_event := 'payment.succeeded';
		ELSE
			v_status := 'reserved';
			v_event := 'payment.failed';
		END IF;
	ELSE
		IF v_order.status <> 'completed' THEN
			RAISE EXCEPTION '%', CASE WHEN v_order.status = 'refunded' THEN 'order is already refunded'
									  ELSE format('order is %s and cannot be refunded', v_order.status) END
				USING ERRCODE = 'object_not_in_prerequisite_state';
		END IF;
		-- Restock: the units come back to the shelf.
		PERFORM 1 FROM eventshop.products p
		WHERE p.id IN (SELECT i.product_id FROM eventshop.order_items i WHERE i.order_id = v_order.id)
		ORDER BY p.sku
		FOR NO KEY UPDATE;
		UPDATE eventshop.products p
		SET stock_on_hand = p.stock_on_hand + i.quantity, version = p.version + 1, updated_at = clock_timestamp()
		FROM eventshop.order_items i
		WHERE i.order_id = v_order.id AND p.id = i.product_id;
		UPDATE eventshop.orders o SET status = 'refunded', updated_at = clock_timestamp() WHERE o.id = v_order.id;
		v_status := 'refunded';
		v_event := 'payment.refunded';
	END IF;

	v_result := (gen_random_uuid(), v_order.id, kind, status, amount_minor, currency, v_status)::eventshop.payment_result;
	INSERT INTO eventshop.payments AS p (id, order_id, kind, provider, provider_ref, status, amount_minor, currency,
										 order_status)
	VALUES (v_result.payment_id, v_order.id, kind, provider, provider_ref, status, amount_minor, currency, v_status)
	ON CONFLICT ON CONSTRAINT payments_provider_ref_key DO NOTHING;
	IF NOT FOUND THEN
		-- recorded concurrently for another order: the details differ
		RAISE EXCEPTION 'provider reference "%" was already recorded with different details', provider_ref
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	PERFORM eventshop._emit_event('payments.events', v_order.id::text, v_event,
		jsonb_build_object('order_id', v_order.id, 'user_id', v_order.user_id, 'payment_id', v_result.payment_id,
						   'provider', provider, 'provider_ref', provider_ref,
						   'amount_minor', amount_minor, 'currency', currency));
	IF v_status = 'completed' THEN
		PERFORM eventshop._emit_event('orders.events', v_order.id::text, 'order.completed',
			jsonb_build_object('order_id', v_order.id, 'user_id', v_order.user_id,
							   'currency', v_order.currency, 'total_minor', v_order.total_minor));
	END IF;
	RETURN v_result;
END
$$;
COMMENT ON FUNCTION eventshop._record_provider_result(text, uuid, text, text, text, bigint, text) IS 'Internal: records a payment or refund result once per provider reference and applies it to the order (consume or restock stock, status change, events).';

CREATE FUNCTION eventshop.record_payment(order_id uuid, provider text, provider_ref text, status text,
										 amount_minor bigint, currency text)
RETURNS eventshop.payment_result
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT eventshop._record_provider_result('payment', order_id, provider, provider_ref, status, amount_minor, currency)
$$;
COMMENT ON FUNCTION eventshop.record_payment(uuid, text, text, text, bigint, text) IS 'For the payment gateway (eventshop_gateway) and operators: records the provider''s payment result for an order, once per (provider, provider_ref) - the same call again returns the same result and changes nothing. succeeded: consumes the reservation (stock leaves), order reserved -> paid -> completed, emits payment.succeeded and order.completed; failed: the order stays reserved, emits payment.failed. Errors: 22023 amount or currency differs from the order, reference reused with other details, invalid input; 55000 order not reserved (cancelled, expired, already paid) or past reserved_until; P0002 no such order.';

CREATE FUNCTION eventshop.record_refund(order_id uuid, provider text, provider_ref text, amount_minor bigint,
										currency text)
RETURNS eventshop.payment_result
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT eventshop._record_provider_result('refund', order_id, provider, provider_ref, 'succeeded', amount_minor, currency)
$$;
COMMENT ON FUNCTION eventshop.record_refund(uuid, text, text, bigint, text) IS 'For the payment gateway (eventshop_gateway) and operators: records the provider''s full refund of a completed order, once per (provider, provider_ref); restocks its units, order completed -> refunded, emits payment.refunded. Errors: 22023 partial amount or other currency, reference reused with other details; 55000 order not completed (or already refunded); P0002 no such order.';

-- ---------------------------------------------------------------------------
-- Admin reports (seed 003's dashboard). Days are UTC days; sales are orders
-- completed (paid) in the range and not refunded since.
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop._check_date_range(from_date date, to_date date)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF from_date IS NULL OR to_date IS NULL THEN
		RAISE EXCEPTION 'from_date and to_date are required' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF from_date > to_date OR to_date - from_date > 366 OR from_date = '-infinity' OR to_date = 'infinity' THEN
		RAISE EXCEPTION 'invalid date range' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'from_date <= to_date, at most 367 days.';
	END IF;
END
$$;
COMMENT ON FUNCTION eventshop._check_date_range(date, date) IS 'Internal: a report''s date range must be given, ordered and at most 367 days long (22004, 22023).';

CREATE FUNCTION eventshop.sales_by_day(from_date date, to_date date)
RETURNS TABLE (day date, currency text, orders bigint, units bigint, revenue_minor bigint)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM eventshop._require_admin();
	PERFORM eventshop._check_date_range(from_date, to_date);
	RETURN QUERY
	SELECT (o.completed_at AT TIME ZONE 'UTC')::date AS d, o.currency AS c, count(*), sum(o.unit_count)::bigint,
		   sum(o.total_minor)::bigint
	FROM eventshop.orders o
	WHERE o.status = 'completed'
	  AND o.completed_at >= (from_date::timestamp AT TIME ZONE 'UTC')
	  AND o.completed_at < ((to_date + 1)::timestamp AT TIME ZONE 'UTC')
	GROUP BY 1, 2
	ORDER BY 1, 2;
END
$$;
COMMENT ON FUNCTION eventshop.sales_by_day(date, date) IS 'For an authenticated administrator: per UTC day and currency, the number of completed (not refunded) orders, units sold and revenue in minor units, from_date to to_date inclusive (days without sales are absent). Errors: 22004/22023 bad range, 28000/42501 not an authenticated administrator.';

CREATE FUNCTION eventshop.sales_by_category(from_date date, to_date date)
RETURNS TABLE (category text, currency text, orders bigint, units bigint, revenue_minor bigint)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM eventshop._require_admin();
	PERFORM eventshop._check_date_range(from_date, to_date);
	RETURN QUERY
	SELECT coalesce(i.category, '(none)') AS c, o.currency AS cur, count(DISTINCT o.id), sum(i.quantity)::bigint,
		   sum(i.unit_price_minor * i.quantity)::bigint
	FROM eventshop.orders o JOIN eventshop.order_items i ON i.order_id = o.id
	WHERE o.status = 'completed'
	  AND o.completed_at >= (from_date::timestamp AT TIME ZONE 'UTC')
	  AND o.completed_at < ((to_date + 1)::timestamp AT TIME ZONE 'UTC')
	GROUP BY 1, 2
	ORDER BY coalesce(i.category, '(none)') COLLATE "C", o.currency;
END
$$;
COMMENT ON FUNCTION eventshop.sales_by_category(date, date) IS 'For an authenticated administrator: per product category (as snapshotted in the order; ''(none)'' without one) and currency, the number of completed (not refunded) orders, units sold and revenue in minor units, completed from_date to to_date inclusive (UTC). Errors: 22004/22023 bad range, 28000/42501 not an authenticated administrator.';

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
	channel		text NOT NULL CHECK (channel IN ('email', 'sms', 'push', 'webhook', 'log')),
	subject		text NOT NULL,
	body_text	text NOT NULL,
	body_html	text,
	updated_at	timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE eventshop.notification_templates IS 'Message templates: {{name}} placeholders are filled from the event''s data and the recipient''s account (see eventshop._notification_vars); values are HTML-escaped in body_html. Edited with eventshop.set_notification_template.';

CREATE TABLE eventshop.notification_rules (
	event_type	text NOT NULL,
	template	text NOT NULL REFERENCES eventshop.notification_templates (name),
	enabled		boolean NOT NULL DEFAULT true,
	PRIMARY KEY (event_type, template)
);
COMMENT ON TABLE eventshop.notification_rules IS 'Which templates (and so channels) an event type produces. Edited with eventshop.set_notification_rule.';

CREATE TABLE eventshop.notifications (
	id				uuid PRIMARY KEY DEFAULT gen_random_uuid(),
	event_id		uuid NOT NULL,
	template		text NOT NULL,
	channel			text NOT NULL CHECK (channel IN ('email', 'sms', 'push', 'webhook', 'log')),
	user_id			uuid,
	recipient		text NOT NULL,
	subject			text NOT NULL,
	body_text		text NOT NULL,
	body_html		text,
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
	-- eventshop.notifications (id). Not a foreign key: its check would lock the
	-- notification once more per attempt on the senders' hot path. Attempts are
	-- written only by _record_deliveries, for notifications that exist, and
	-- deleted with their notification by discard_dead_letter.
	notification_id	uuid NOT NULL,
	attempted_at	timestamptz NOT NULL DEFAULT clock_timestamp(),
	succeeded		boolean NOT NULL,
	response		text,
	outcome			text CHECK (outcome IN ('sent', 'temporary', 'permanent')),
	error_class		text,
	duration_ms		integer
);
CREATE INDEX notification_attempts_notification_idx ON eventshop.notification_attempts (notification_id);
COMMENT ON TABLE eventshop.notification_attempts IS 'Every delivery attempt: when it started, its outcome (sent, temporary or permanent failure), the class of error, the provider''s response and how long it took.';

-- pg_dump keeps the dispatcher's progress and queue: losing the inbox or the
-- offsets on restore would send every e-mail again.
SELECT pg_catalog.pg_extension_config_dump('eventshop.consumer_offsets', '');
SELECT pg_catalog.pg_extension_config_dump('eventshop.inbox', '');
SELECT pg_catalog.pg_extension_config_dump('eventshop.rejected_events', '');
SELECT pg_catalog.pg_extension_config_dump('eventshop.rejected_events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('eventshop.notifications', '');
SELECT pg_catalog.pg_extension_config_dump('eventshop.notification_attempts', '');
SELECT pg_catalog.pg_extension_config_dump('eventshop.notification_attempts_id_seq', '');

-- The sender workers wake when notifications are queued, and when one is put
-- back to pending (an administrator retrying a dead letter); their own
-- claims and retry scheduling do not wake them.
CREATE TRIGGER notifications_wake_senders
	AFTER INSERT ON eventshop.notifications
	FOR EACH STATEMENT EXECUTE FUNCTION eventshop._wake_worker_on_commit('sender');
CREATE TRIGGER notifications_requeued_wake_senders
	AFTER UPDATE OF status ON eventshop.notifications
	FOR EACH ROW WHEN (OLD.status <> 'pending' AND NEW.status = 'pending')
	EXECUTE FUNCTION eventshop._wake_worker_on_commit('sender');


-- Leases up to batch_size due notifications to the calling sender worker
-- for lease_seconds: if the sender dies mid-send, the rows become due again
-- when the lease ends. Several senders claim concurrently: SKIP LOCKED hands
-- each row to one of them.
CREATE FUNCTION eventshop._claim_notifications(batch_size integer, lease_seconds integer DEFAULT 60)
RETURNS TABLE (id uuid, channel text, template text, recipient text, subject text, body_text text,
			   body_html text, attempts integer)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
	UPDATE eventshop.notifications n
	SET attempts = n.attempts + 1,
		next_attempt_at = clock_timestamp() + make_interval(secs => lease_seconds)
	WHERE n.id IN (SELECT d.id FROM eventshop.notifications d
				   -- (SELECT ...): evaluated once, so notifications_due_idx can be used
				   WHERE d.status = 'pending' AND d.next_attempt_at <= (SELECT clock_timestamp())
				   ORDER BY d.next_attempt_at
				   LIMIT batch_size
				   FOR UPDATE SKIP LOCKED)
	RETURNING n.id, n.channel, n.template, n.recipient, n.subject, n.body_text, n.body_html, n.attempts
$$;
COMMENT ON FUNCTION eventshop._claim_notifications(integer, integer) IS 'Internal (sender workers): claims due notifications for one sending round.';

-- Records the outcomes of one sending round in one transaction. Per
-- notification, outcome is 'sent', 'temporary' (retried with exponential
-- backoff and jitter: 2^attempts seconds, capped at max_backoff seconds,
-- times a random factor in [0.5, 1); dead once max_attempts are
-- used), 'permanent' (dead at once) or 'released' (claimed but never tried
-- in this round: due again now, the claim's attempt is given back). A final
-- status emits notification.sent or notification.failed in the same
-- transaction; the event names ids and classes only, never the recipient,
-- the message or the provider's reply. A late report never reopens a sent
-- or dead notification. Returns each notification's new status.
CREATE FUNCTION eventshop._record_deliveries(ids uuid[], outcomes text[], responses text[],
											 error_classes text[], started_at timestamptz[],
											 durations_ms integer[], max_attempts integer,
											 max_backoff integer)
RETURNS TABLE (id uuid, status text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_row		record;
	v_keys		text[] := '{}';
	v_types		text[] := '{}';
	v_data		jsonb[] := '{}';
BEGIN
	IF cardinality(ids) IS DISTINCT FROM cardinality(outcomes)
	   OR cardinality(ids) IS DISTINCT FROM cardinality(responses)
	   OR cardinality(ids) IS DISTINCT FROM cardinality(error_classes)
	   OR cardinality(ids) IS DISTINCT FROM cardinality(started_at)
	   OR cardinality(ids) IS DISTINCT FROM cardinality(durations_ms) THEN
		RAISE EXCEPTION 'the arrays passed to _record_deliveries must have the same length'
			USING ERRCODE = 'array_subscript_error';
	END IF;

	INSERT INTO eventshop.notification_attempts (notification_id, attempted_at, succeeded, outcome,
												 error_class, response, duration_ms)
	SELECT a.id, a.started, a.outcome = 'sent', a.outcome, a.error_class, left(a.response, 2000), a.duration
	FROM unnest(ids, outcomes, responses, error_classes, started_at, durations_ms)
		 AS a(id, outcome, response, error_class, started, duration)
	WHERE a.outcome <> 'released'
	  AND EXISTS (SELECT 1 FROM eventshop.notifications n WHERE n.id = a.id);

	FOR v_row IN
		UPDATE eventshop.notifications n
		SET status = CASE WHEN o.outcome = 'sent' THEN 'sent'
						  WHEN o.outcome = 'permanent'
							   OR (o.outcome = 'temporary' AND n.attempts >= max_attempts) THEN 'dead'
						  ELSE 'pending' END,
			attempts = CASE WHEN o.outcome = 'released' THEN greatest(n.attempts - 1, 0) ELSE n.attempts END,
			sent_at = CASE WHEN o.outcome = 'sent' THEN clock_timestamp() ELSE n.sent_at END,
			last_error = CASE WHEN o.outcome = 'sent' THEN NULL
							  WHEN o.outcome = 'released' THEN n.last_error
							  ELSE left(o.response, 2000) END,
			next_attempt_at = CASE WHEN o.outcome = 'released' THEN clock_timestamp()
								   WHEN o.outcome = 'temporary'
								   THEN clock_timestamp() + make_interval(secs =>
										least(max_backoff, 2 ^ least(n.attempts, 30))
										* (0.5 + random() / 2))
								   ELSE n.next_attempt_at END
		FROM unnest(ids, outcomes, responses, error_classes) AS o(id, outcome, response, error_class)
		WHERE n.id = o.id AND n.status = 'pending'
		RETURNING n.id, n.event_id, n.status, n.channel, n.template, n.attempts, o.error_class
	LOOP
		IF v_row.status = 'sent' THEN
			v_keys := v_keys || v_row.id::text;
			v_types := v_types || 'notification.sent'::text;
			v_data := v_data || jsonb_build_object('notification_id', v_row.id, 'event_id', v_row.event_id,
												   'channel', v_row.channel, 'template', v_row.template,
												   'attempts', v_row.attempts);
		ELSIF v_row.status = 'dead' THEN
			v_keys := v_keys || v_row.id::text;
			v_types := v_types || 'notification.failed'::text;
			v_data := v_data || jsonb_build_object('notification_id', v_row.id, 'event_id', v_row.event_id,
												   'channel', v_row.channel, 'template', v_row.template,
												   'attempts', v_row.attempts, 'error_class', v_row.error_class);
		END IF;
		id := v_row.id;
		status := v_row.status;
		RETURN NEXT;
	END LOOP;
	-- the round's final outcomes, in the order above, with one statement
	PERFORM eventshop._emit_events('notifications.events', v_keys, v_types, v_data);
END
$$;
COMMENT ON FUNCTION eventshop._record_deliveries(uuid[], text[], text[], text[], timestamptz[], integer[], integer, integer) IS 'Internal (sender workers): records a round of delivery attempts, schedules retries, dead-letters, and emits notification.sent/notification.failed for final outcomes.';

-- Seconds until the next pending notification is due (NULL when none), so
-- the sender workers sleep exactly until then.
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
COMMENT ON FUNCTION eventshop._seconds_until_next_notification() IS 'Internal (sender workers): how long until the next pending notification is due.';

CREATE VIEW eventshop.notification_status AS
SELECT status, channel, count(*) AS notifications,
	   max(clock_timestamp() - created_at) FILTER (WHERE status = 'pending') AS oldest_pending_age
FROM eventshop.notifications
GROUP BY status, channel;
COMMENT ON VIEW eventshop.notification_status IS 'Notification queue depth by state and channel.';

-- Dead letters: notifications that failed permanently or used up their
-- attempts. Administrators list them, put them back in the queue (attempts
-- reset) or discard them. The listing shows no recipient or message text.
CREATE FUNCTION eventshop.dead_letters(max_rows integer DEFAULT 100)
RETURNS TABLE (id uuid, event_id uuid, template text, channel text, user_id uuid, attempts integer,
			   last_error text, created_at timestamptz, failed_at timestamptz)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF max_rows IS NULL OR max_rows < 1 THEN
		RAISE EXCEPTION 'max_rows must be a positive number'
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	RETURN QUERY
	SELECT n.id, n.event_id, n.template, n.channel, n.user_id, n.attempts, n.last_error, n.created_at,
		   (SELECT max(a.attempted_at) FROM eventshop.notification_attempts a WHERE a.notification_id = n.id)
	FROM eventshop.notifications n
	WHERE n.status = 'dead'
	ORDER BY n.created_at, n.id
	LIMIT max_rows;
END
$$;
COMMENT ON FUNCTION eventshop.dead_letters(integer) IS 'For administrators: the oldest max_rows dead-lettered notifications with their last error (no recipient or message text). Errors: 22023 max_rows not positive.';

CREATE FUNCTION eventshop.retry_dead_letter(notification_id uuid)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	UPDATE eventshop.notifications n
	SET status = 'pending', attempts = 0, next_attempt_at = clock_timestamp(), last_error = NULL
	WHERE n.id = retry_dead_letter.notification_id AND n.status = 'dead';
	IF NOT FOUND THEN
		IF EXISTS (SELECT 1 FROM eventshop.notifications n WHERE n.id = retry_dead_letter.notification_id) THEN
			RAISE EXCEPTION 'notification % is not dead-lettered', notification_id
				USING ERRCODE = 'object_not_in_prerequisite_state';
		END IF;
		RAISE EXCEPTION 'no notification with this id'
			USING ERRCODE = 'no_data_found';
	END IF;
END
$$;
COMMENT ON FUNCTION eventshop.retry_dead_letter(uuid) IS 'For administrators: puts a dead-lettered notification back in the queue with its attempts reset; the sender workers send it at once. Errors: P0002 no such notification, 55000 not dead-lettered.';

CREATE FUNCTION eventshop.retry_dead_letters()
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_count bigint;
BEGIN
	UPDATE eventshop.notifications n
	SET status = 'pending', attempts = 0, next_attempt_at = clock_timestamp(), last_error = NULL
	WHERE n.status = 'dead';
	GET DIAGNOSTICS v_count = ROW_COUNT;
	RETURN v_count;
END
$$;
COMMENT ON FUNCTION eventshop.retry_dead_letters() IS 'For administrators: puts every dead-lettered notification back in the queue with its attempts reset; returns how many.';

CREATE FUNCTION eventshop.discard_dead_letter(notification_id uuid)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	DELETE FROM eventshop.notifications n
	WHERE n.id = discard_dead_letter.notification_id AND n.status = 'dead';
	IF FOUND THEN
		DELETE FROM eventshop.notification_attempts a WHERE a.notification_id = discard_dead_letter.notification_id;
	ELSE
		IF EXISTS (SELECT 1 FROM eventshop.notifications n WHERE n.id = discard_dead_letter.notification_id) THEN
			RAISE EXCEPTION 'notification % is not dead-lettered', notification_id
				USING ERRCODE = 'object_not_in_prerequisite_state';
		END IF;
		RAISE EXCEPTION 'no notification with this id'
			USING ERRCODE = 'no_data_found';
	END IF;
END
$$;
COMMENT ON FUNCTION eventshop.discard_dead_letter(uuid) IS 'For administrators: deletes a dead-lettered notification and its attempts (its notification.failed event stays in the event stream). Errors: P0002 no such notification, 55000 not dead-lettered.';

-- ---------------------------------------------------------------------------
-- Dispatcher, consumer side: what consumed events produce. The worker calls
-- _ingest_event once per message and _store_consumer_offsets once per batch,
-- in one transaction with everything the batch produced (inbox rows, audit
-- rows, notifications), so the stored offsets and the effects never disagree.
-- ---------------------------------------------------------------------------

-- Audit log (seed 001's auditlog-service): every consumed message, with its
-- data masked by eventshop._mask_event_data. Append-only; purged by age.
CREATE TABLE eventshop.event_audit (
	id			bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	event_id	uuid,
	event_type	text,
	topic		text NOT NULL,
	partition	integer NOT NULL,
	"offset"	bigint NOT NULL,
	subject		text,
	source		text,
	event_time	timestamptz,
	received_at	timestamptz NOT NULL DEFAULT now(),
	outcome		text NOT NULL CHECK (outcome IN ('queued', 'ignored', 'rejected')),
	notifications integer NOT NULL DEFAULT 0,
	data		jsonb
);
CREATE INDEX event_audit_type_idx ON eventshop.event_audit (event_type, id);
CREATE INDEX event_audit_subject_idx ON eventshop.event_audit (subject, id);
CREATE INDEX event_audit_received_idx ON eventshop.event_audit (received_at);
COMMENT ON TABLE eventshop.event_audit IS 'Audit log of every consumed event (outcome queued, ignored or rejected) with masked data: no e-mail addresses, tokens, sealed values or hashes. Read with eventshop.audit_events, purged with eventshop.purge_event_audit.';
SELECT pg_catalog.pg_extension_config_dump('eventshop.event_audit', '');
SELECT pg_catalog.pg_extension_config_dump('eventshop.event_audit_id_seq', '');

-- High watermark of each partition the dispatcher holds, as the worker last
-- saw it (every few seconds): lag = high_watermark - stored next offset.
CREATE TABLE eventshop.consumer_watermarks (
	group_id		text NOT NULL,
	topic			text NOT NULL,
	partition		integer NOT NULL,
	low_watermark	bigint NOT NULL,
	high_watermark	bigint NOT NULL,
	recorded_at		timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (group_id, topic, partition)
);
COMMENT ON TABLE eventshop.consumer_watermarks IS 'Kafka watermarks of the partitions assigned to this server''s dispatcher, recorded by the worker every few seconds; rows of revoked partitions are removed.';

-- Values a template may use, as one JSON object: the event's data without
-- its secret members, the recipient's account (display_name, email,
-- user_id), the event's own fields (event_id, event_type, event_time,
-- subject), app_url (eventshop.app_url), secrets opened here and only here
-- (token from data.sealed_token; the invitee's address from
-- data.sealed_email), formatted amounts (total, amount) and inviter_name
-- (_render_notifications adds event_json, the whole event with masked data,
-- for the templates that use it, such as webhooks). The account
-- is data.user_id, or the event subject when that is a uuid; members whose
-- names start with an underscore are for the caller (_user_id, _email).
-- Raises 22023 when a sealed value cannot be opened or is not an address.
CREATE FUNCTION eventshop._notification_vars(event jsonb)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_data	jsonb := CASE WHEN jsonb_typeof(event->'data') = 'object' THEN event->'data' ELSE '{}' END;
	v_uuid	text := '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$';
	v_uid	text := CASE WHEN v_data->>'user_id' ~ v_uuid THEN v_data->>'user_id'
						 -- auth.events are keyed by user id
						 WHEN event->>'source' = '/eventshop/auth' AND event->>'subject' ~ v_uuid
							  AND NOT v_data ? 'user_id' THEN event->>'subject' END;
	v_user	eventshop.users%ROWTYPE;
	v_vars	jsonb;
	v_email	text;
BEGIN
	-- members the event must not be able to set are dropped from its data
	v_vars := (v_data - ARRAY['sealed_token', 'sealed_email', 'email_hash', 'source_hash', 'token', 'email',
							  'display_name', 'user_id', '_email', '_user_id', 'event_json', 'inviter_name'])
		|| jsonb_build_object('event_id', event->>'id', 'event_type', event->>'type',
							  'event_time', event->>'time', 'subject', event->>'subject',
							  'app_url', rtrim(current_setting('eventshop.app_url'), '/'));
	IF v_uid IS NOT NULL THEN
		SELECT u.* INTO v_user FROM eventshop.users u WHERE u.id = v_uid::uuid;
		IF FOUND THEN
			v_vars := v_vars || jsonb_build_object('display_name', v_user.display_name, 'email', v_user.email,
												   'user_id', v_user.id, '_user_id', v_user.id,
												   '_email', v_user.email);
		END IF;
	END IF;
	IF v_data->>'inviter_id' ~ v_uuid THEN
		v_vars := v_vars || jsonb_build_object('inviter_name',
			(SELECT u.display_name FROM eventshop.users u WHERE u.id = (v_data->>'inviter_id')::uuid));
	END IF;
	IF jsonb_typeof(v_data->'sealed_token') = 'string' THEN
		v_vars := v_vars || jsonb_build_object('token', eventshop._open_sealed(v_data->>'sealed_token'));
	END IF;
	IF v_user.id IS NULL AND jsonb_typeof(v_data->'sealed_email') = 'string' THEN
		-- an invitee without an account: the address travels sealed
		v_email := eventshop._normalize_email(eventshop._open_sealed(v_data->>'sealed_email'));
		v_vars := v_vars || jsonb_build_object('email', v_email, '_email', v_email);
	END IF;
	IF jsonb_typeof(v_data->'total_minor') = 'number' AND v_data->>'currency' ~ '^[A-Z]{3}$' THEN
		v_vars := v_vars || jsonb_build_object('total',
			eventshop._format_money((v_data->>'total_minor')::numeric, v_data->>'currency'));
	END IF;
	IF jsonb_typeof(v_data->'amount_minor') = 'number' AND v_data->>'currency' ~ '^[A-Z]{3}$' THEN
		v_vars := v_vars || jsonb_build_object('amount',
			eventshop._format_money((v_data->>'amount_minor')::numeric, v_data->>'currency'));
	END IF;
	RETURN v_vars;
END
$$;
COMMENT ON FUNCTION eventshop._notification_vars(jsonb) IS 'Internal (dispatcher): the placeholder values for the notifications of one event; opens its sealed token or address.';

-- Minor units as a decimal amount with the currency code (two decimals,
-- none for the ISO 4217 currencies without minor units).
CREATE FUNCTION eventshop._format_money(amount_minor numeric, currency text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE WHEN currency IN ('JPY', 'KRW', 'ISK', 'CLP', 'VND', 'XAF', 'XOF', 'UGX', 'PYG', 'RWF')
				THEN amount_minor::text
				ELSE to_char(amount_minor / 100, 'FM999999999999999990.00') END || ' ' || currency
$$;
COMMENT ON FUNCTION eventshop._format_money(numeric, text) IS 'Internal: formats an amount in minor units for a message, e.g. 1250 EUR -> 12.50 EUR.';

-- Masks an event's data for the audit log and webhooks (C:
-- src/event_mask.c): members whose names suggest personal data or secrets,
-- strings that contain an @ or look like tokens, sealed values or hashes
-- become "[masked]"; ids are kept; at most 16 kB.
CREATE FUNCTION eventshop._mask_event_data(data jsonb)
RETURNS jsonb
AS 'MODULE_PATHNAME', 'eventshop_mask_event_data'
LANGUAGE C STRICT IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION eventshop._mask_event_data(jsonb) IS 'Internal: event data with personal data and secrets replaced by "[masked]", for the audit log and webhooks.';

-- Template rendering (C: src/template_render.c).
CREATE FUNCTION eventshop._render_template(template text, vars jsonb, mode text)
RETURNS text
AS 'MODULE_PATHNAME', 'eventshop_render_template'
LANGUAGE C STRICT IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION eventshop._render_template(text, jsonb, text) IS 'Internal: fills {{name}} placeholders from vars, escaping values for mode (text, html: HTML-escaped, header: control characters become spaces); 22023 for a malformed placeholder, 54000 over 256 kB.';

CREATE FUNCTION eventshop._template_placeholders(template text)
RETURNS text[]
AS 'MODULE_PATHNAME', 'eventshop_template_placeholders'
LANGUAGE C STRICT IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION eventshop._template_placeholders(text) IS 'Internal: the distinct placeholder names of a template; 22023 for a malformed placeholder.';

CREATE TYPE eventshop.rendered_notification AS (
	template	text,
	channel		text,
	user_id		uuid,
	recipient	text,
	subject		text,
	body_text	text,
	body_html	text
);
COMMENT ON TYPE eventshop.rendered_notification IS 'Internal: one notification an event asks for, rendered.';

-- Renders the notifications the enabled rules ask for. Recipients: e-mail
-- goes to the account's address (or the unsealed invitee address), sms,
-- push and log to the user id (the provider resolves numbers and devices),
-- webhook to 'webhook' (the sender resolves the configured endpoint). A rule
-- whose recipient is unknown (no account) produces nothing. Writes nothing,
-- so the caller can catch its errors without a subtransaction that holds a
-- transaction id.
CREATE FUNCTION eventshop._render_notifications(event_type text, event jsonb)
RETURNS SETOF eventshop.rendered_notification
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_rule		record;
	v_vars		jsonb;
	v_recipient	text;
BEGIN
	FOR v_rule IN
		SELECT t.* FROM eventshop.notification_rules r
		JOIN eventshop.notification_templates t ON t.name = r.template
		WHERE r.event_type = _render_notifications.event_type AND r.enabled
		ORDER BY t.name
	LOOP
		v_vars := coalesce(v_vars, eventshop._notification_vars(event));
		-- the whole event as JSON (masked) is made only for templates that use it
		IF NOT v_vars ? 'event_json'
		   AND strpos(v_rule.subject || v_rule.body_text || coalesce(v_rule.body_html, ''), 'event_json') > 0 THEN
			v_vars := v_vars || jsonb_build_object('event_json',
				(event || jsonb_build_object('data', eventshop._mask_event_data(event->'data')))::text);
		END IF;
		v_recipient := CASE v_rule.channel
						   WHEN 'email' THEN v_vars->>'_email'
						   WHEN 'webhook' THEN 'webhook'
						   ELSE v_vars->>'_user_id' END;
		CONTINUE WHEN v_recipient IS NULL;
		RETURN NEXT (v_rule.name, v_rule.channel, (v_vars->>'_user_id')::uuid, v_recipient,
					 left(eventshop._render_template(v_rule.subject, v_vars, 'header'), 998),
					 eventshop._render_template(v_rule.body_text, v_vars, 'text'),
					 eventshop._render_template(v_rule.body_html, v_vars, 'html'))::eventshop.rendered_notification;
	END LOOP;
END
$$;
COMMENT ON FUNCTION eventshop._render_notifications(text, jsonb) IS 'Internal (dispatcher): renders the notifications the rules of an event type ask for, with their recipients.';

-- Records one consumed message: skips it when its event id was seen before;
-- otherwise queues the notifications its rules ask for and writes its audit
-- row. A message that is no CloudEvent, or whose notifications cannot be
-- made (a sealed token that does not open, a value too long), is recorded
-- in rejected_events (and the audit log) and skipped for good. Returns
-- 'queued', 'duplicate', 'ignored' or 'rejected'. The caller stores the
-- batch's offsets with _store_consumer_offsets in the same transaction.
CREATE FUNCTION eventshop._ingest_event(topic text, partition integer, "offset" bigint,
										event_id text, event_type text, payload text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_event		jsonb;
	v_id		uuid;
	v_type		text;
	v_time		timestamptz;
	v_rows		eventshop.rendered_notification[];
	v_reason	text;
	v_outcome	text;
BEGIN
	BEGIN
		v_event := payload::jsonb;
		v_id := coalesce(event_id, v_event->>'id')::uuid;
		v_type := coalesce(event_type, v_event->>'type');
	EXCEPTION WHEN data_exception OR program_limit_exceeded THEN
		v_event := NULL;
	END;
	IF v_event IS NULL OR v_id IS NULL OR jsonb_typeof(v_event) <> 'object' OR v_type IS NULL
	   OR v_type !~ '^[A-Za-z0-9_.-]+$' OR length(v_type) > 200 THEN	-- not {1,200}: a bounded repeat is a slow regex
		INSERT INTO eventshop.rejected_events (topic, partition, "offset", reason)
		VALUES (_ingest_event.topic, _ingest_event.partition, _ingest_event."offset",
				'not a CloudEvents JSON document with an id and a type');
		INSERT INTO eventshop.event_audit (topic, partition, "offset", outcome)
		VALUES (_ingest_event.topic, _ingest_event.partition, _ingest_event."offset", 'rejected');
		RETURN 'rejected';
	END IF;

	INSERT INTO eventshop.inbox (event_id, event_type, topic, partition, "offset")
	VALUES (v_id, v_type, _ingest_event.topic, _ingest_event.partition, _ingest_event."offset")
	ON CONFLICT DO NOTHING;
	IF NOT FOUND THEN
		RETURN 'duplicate';
	END IF;

	-- Writes nothing, so this block needs no transaction id of its own.
	-- Variables keep their values when the block fails: a bad time alone
	-- leaves the rendered rows (and only the time) in place.
	BEGIN
		v_rows := ARRAY(SELECT r FROM eventshop._render_notifications(v_type, v_event) AS r);
		v_time := (v_event->>'time')::timestamptz;
	EXCEPTION WHEN data_exception OR program_limit_exceeded THEN
		IF v_rows IS NULL THEN
			v_reason := left(v_type || ': ' || SQLERRM, 500);
		END IF;
	END;
	IF v_reason IS NOT NULL THEN
		INSERT INTO eventshop.rejected_events (topic, partition, "offset", reason)
		VALUES (_ingest_event.topic, _ingest_event.partition, _ingest_event."offset", v_reason);
		v_rows := '{}';
	END IF;

	INSERT INTO eventshop.notifications (event_id, template, channel, user_id, recipient, subject,
										 body_text, body_html)
	SELECT v_id, r.template, r.channel, r.user_id, r.recipient, r.subject, r.body_text, r.body_html
	FROM unnest(v_rows) AS r
	ON CONFLICT DO NOTHING;
	v_outcome := CASE WHEN v_reason IS NOT NULL THEN 'rejected'
					  WHEN cardinality(v_rows) > 0 THEN 'queued' ELSE 'ignored' END;
	INSERT INTO eventshop.event_audit (event_id, event_type, topic, partition, "offset", subject, source,
									   event_time, outcome, notifications, data)
	VALUES (v_id, v_type, _ingest_event.topic, _ingest_event.partition, _ingest_event."offset",
			left(v_event->>'subject', 200), left(v_event->>'source', 200), v_time, v_outcome,
			cardinality(v_rows), eventshop._mask_event_data(v_event->'data'));
	RETURN v_outcome;
END
$$;
COMMENT ON FUNCTION eventshop._ingest_event(text, integer, bigint, text, text, text) IS 'Internal (dispatcher): stores one consumed message idempotently (inbox), queues its notifications and writes its audit row.';

-- A batch of consumed messages, as _ingest_event would record them one by
-- one, in a few set-based statements (the dispatcher's fast path: the
-- per-message function costs a call, two subtransactions and five
-- statements per event). A batch holding a message that is no CloudEvent
-- goes through _ingest_event message by message, so rejections are recorded
-- exactly as there. Any other error (bad JSON, a time that is no timestamp,
-- a sealed token that does not open) fails the whole statement: the
-- dispatcher then replays the batch one message at a time through
-- _ingest_event, which records the culprit as rejected. A message whose
-- event id appears twice, here or in the inbox, counts once. Returns the
-- number of messages rejected.
CREATE FUNCTION eventshop._ingest_events(topics text[], partitions integer[], offsets bigint[],
										 event_ids text[], event_types text[], payloads text[])
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_docs		jsonb[];
	v_rejected	integer;
BEGIN
	v_docs := ARRAY(SELECT pl::jsonb FROM unnest(payloads) WITH ORDINALITY AS u(pl, i) ORDER BY i);
	IF EXISTS (SELECT FROM unnest(event_ids, event_types, v_docs) AS u(e, ty, j)
			   WHERE j IS NULL OR jsonb_typeof(j) <> 'object' OR coalesce(e, j->>'id') IS NULL
				  OR coalesce(ty, j->>'type') IS NULL
				  OR coalesce(ty, j->>'type') !~ '^[A-Za-z0-9_.-]+$'
				  OR length(coalesce(ty, j->>'type')) > 200) THEN
		SELECT count(*) FILTER (WHERE eventshop._ingest_event(t, p, o, e, ty, pl) = 'rejected')
		INTO v_rejected
		FROM unnest(topics, partitions, offsets, event_ids, event_types, payloads) AS u(t, p, o, e, ty, pl);
		RETURN v_rejected;
	END IF;

	WITH parsed AS (
		SELECT i, t, p, o, j, coalesce(e, j->>'id')::uuid AS id, coalesce(ty, j->>'type') AS ty
		FROM unnest(topics, partitions, offsets, event_ids, event_types, v_docs)
			 WITH ORDINALITY AS u(t, p, o, e, ty, j, i)
	), first_seen AS (
		SELECT DISTINCT ON (id) * FROM parsed ORDER BY id, i
	), stored AS (
		INSERT INTO eventshop.inbox (event_id, event_type, topic, partition, "offset")
		SELECT id, ty, t, p, o FROM first_seen ORDER BY i
		ON CONFLICT DO NOTHING
		RETURNING event_id
	), fresh AS (
		SELECT f.* FROM first_seen f JOIN stored s ON s.event_id = f.id
	), rendered AS (
		SELECT f.i, f.id, r.* FROM fresh f, LATERAL eventshop._render_notifications(f.ty, f.j) AS r
	), queued AS (
		INSERT INTO eventshop.notifications (event_id, template, channel, user_id, recipient, subject,
											 body_text, body_html)
		SELECT id, template, channel, user_id, recipient, subject, body_text, body_html
		FROM rendered ORDER BY i, template
		ON CONFLICT DO NOTHING
	), counted AS (
		SELECT i, count(*)::integer AS n FROM rendered GROUP BY i
	)
	INSERT INTO eventshop.event_audit (event_id, event_type, topic, partition, "offset", subject, source,
									   event_time, outcome, notifications, data)
	SELECT f.id, f.ty, f.t, f.p, f.o, left(f.j->>'subject', 200), left(f.j->>'source', 200),
		   (f.j->>'time')::timestamptz, CASE WHEN c.n > 0 THEN 'queued' ELSE 'ignored' END,
		   coalesce(c.n, 0), eventshop._mask_event_data(f.j->'data')
	FROM fresh f LEFT JOIN counted c ON c.i = f.i
	ORDER BY f.i;
	RETURN 0;
END
$$;
COMMENT ON FUNCTION eventshop._ingest_events(text[], integer[], bigint[], text[], text[], text[]) IS 'Internal (dispatcher): _ingest_event for a batch of consumed messages, set-based; returns how many were rejected.';

-- Stores the next offset of every partition a batch read from, once per
-- partition, in the batch's transaction. Offsets never move backwards.
CREATE FUNCTION eventshop._store_consumer_offsets(group_id text, topics text[], partitions integer[],
												  next_offsets bigint[])
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
	INSERT INTO eventshop.consumer_offsets AS co (group_id, topic, partition, next_offset)
	SELECT _store_consumer_offsets.group_id, o.topic, o.partition, o.next_offset
	FROM unnest(topics, partitions, next_offsets) AS o(topic, partition, next_offset)
	ON CONFLICT ON CONSTRAINT consumer_offsets_pkey DO UPDATE
		SET next_offset = GREATEST(co.next_offset, EXCLUDED.next_offset), updated_at = now()
$$;
COMMENT ON FUNCTION eventshop._store_consumer_offsets(text, text[], integer[], bigint[]) IS 'Internal (dispatcher): stores the next offsets of a consumed batch, one row per partition.';

-- Replaces this group's watermark rows with the partitions it holds now.
CREATE FUNCTION eventshop._record_watermarks(group_id text, topics text[], partitions integer[],
											 low_watermarks bigint[], high_watermarks bigint[])
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
	DELETE FROM eventshop.consumer_watermarks w
	WHERE w.group_id = _record_watermarks.group_id
	  AND (w.topic, w.partition) NOT IN (SELECT t, p FROM unnest(topics, partitions) AS a(t, p));
	INSERT INTO eventshop.consumer_watermarks AS w (group_id, topic, partition, low_watermark, high_watermark)
	SELECT _record_watermarks.group_id, a.t, a.p, a.lo, a.hi
	FROM unnest(topics, partitions, low_watermarks, high_watermarks) AS a(t, p, lo, hi)
	ON CONFLICT ON CONSTRAINT consumer_watermarks_pkey DO UPDATE
		SET low_watermark = EXCLUDED.low_watermark, high_watermark = EXCLUDED.high_watermark,
			recorded_at = now();
$$;
COMMENT ON FUNCTION eventshop._record_watermarks(text, text[], integer[], bigint[], bigint[]) IS 'Internal (dispatcher): records the watermarks of the partitions assigned to the dispatcher.';

-- ---------------------------------------------------------------------------
-- Templates and rules shipped with the extension. Data contracts of the
-- events they render (data members; user_id names the recipient's account):
--   user.registered, user.logged_in: user_id
--   password.reset_requested, auth.magic_link_requested,
--   email.verification_requested: user_id, sealed_token, expires_at
--   order.created: order_id, user_id, currency, total_minor, item_count, reserved_until
--   order.cancelled: order_id, user_id, by
--   payment.succeeded: order_id, user_id, amount_minor, currency, provider_ref
--   registration.created (registrations.events, key = event id):
--     registration_id, event_id, event_title, starts_at, user_id
--   invite.created (invites.events, key = invite id): invite_id, inviter_id,
--     event_title, expires_at, sealed_token, and either user_id (an account)
--     or sealed_email (the invitee's address, sealed with eventshop._seal)
-- ---------------------------------------------------------------------------
INSERT INTO eventshop.notification_templates (name, channel, subject, body_text, body_html) VALUES
	('welcome', 'email', 'Welcome to eventshop, {{display_name}}',
	 E'Hello {{display_name}},\n\nyour eventshop account for {{email}} is ready.\n\nThe eventshop team\n',
	 '<p>Hello {{display_name}},</p><p>your eventshop account for {{email}} is ready.</p><p>The eventshop team</p>'),
	('login_alert', 'email', 'New sign-in to your eventshop account',
	 E'Hello {{display_name}},\n\nyour account {{email}} was signed in at {{event_time}}.\nIf this was not you, reset your password at {{app_url}}/forgot-password.\n\nThe eventshop team\n',
	 '<p>Hello {{display_name}},</p><p>your account {{email}} was signed in at {{event_time}}.</p><p>If this was not you, <a href="{{app_url}}/forgot-password">reset your password</a>.</p>'),
	('password_reset', 'email', 'Reset your eventshop password',
	 E'Hello {{display_name}},\n\nto choose a new password, open this link before {{expires_at}}:\n{{app_url}}/reset-password?token={{token}}\n\nIf you did not ask for it, ignore this e-mail.\n',
	 '<p>Hello {{display_name}},</p><p><a href="{{app_url}}/reset-password?token={{token}}">Choose a new password</a> before {{expires_at}}.</p><p>If you did not ask for it, ignore this e-mail.</p>'),
	('magic_link', 'email', 'Your eventshop sign-in link',
	 E'Hello {{display_name}},\n\nsign in with this link before {{expires_at}}:\n{{app_url}}/magic-link?token={{token}}\n\nIf you did not ask for it, ignore this e-mail.\n',
	 '<p>Hello {{display_name}},</p><p><a href="{{app_url}}/magic-link?token={{token}}">Sign in</a> before {{expires_at}}.</p><p>If you did not ask for it, ignore this e-mail.</p>'),
	('email_verification', 'email', 'Confirm your e-mail address',
	 E'Hello {{display_name}},\n\nconfirm {{email}} with this link before {{expires_at}}:\n{{app_url}}/verify-email?token={{token}}\n',
	 '<p>Hello {{display_name}},</p><p><a href="{{app_url}}/verify-email?token={{token}}">Confirm {{email}}</a> before {{expires_at}}.</p>'),
	('order_confirmation', 'email', 'Your eventshop order {{order_id}}',
	 E'Hello {{display_name}},\n\nthank you for your order {{order_id}}: {{item_count}} item(s), {{total}}.\nPlease pay before {{reserved_until}}; your items are reserved until then.\n',
	 '<p>Hello {{display_name}},</p><p>thank you for your order {{order_id}}: {{item_count}} item(s), <b>{{total}}</b>.</p><p>Please pay before {{reserved_until}}; your items are reserved until then.</p>'),
	('payment_receipt', 'email', 'Payment received for order {{order_id}}',
	 E'Hello {{display_name}},\n\nwe received your payment of {{amount}} for order {{order_id}} (reference {{provider_ref}}).\n',
	 '<p>Hello {{display_name}},</p><p>we received your payment of <b>{{amount}}</b> for order {{order_id}} (reference {{provider_ref}}).</p>'),
	('order_cancelled', 'email', 'Your eventshop order {{order_id}} was cancelled',
	 E'Hello {{display_name}},\n\nyour order {{order_id}} was cancelled and its items were released.\n',
	 '<p>Hello {{display_name}},</p><p>your order {{order_id}} was cancelled and its items were released.</p>'),
	('registration_confirmation', 'email', 'You are registered for {{event_title}}',
	 E'Hello {{display_name}},\n\nyour registration {{registration_id}} for {{event_title}} ({{starts_at}}) is confirmed.\n',
	 '<p>Hello {{display_name}},</p><p>your registration {{registration_id}} for <b>{{event_title}}</b> ({{starts_at}}) is confirmed.</p>'),
	('invite', 'email', '{{inviter_name}} invited you to {{event_title}}',
	 E'Hello,\n\n{{inviter_name}} invited you to {{event_title}}. Accept before {{expires_at}}:\n{{app_url}}/invites/accept?token={{token}}\n',
	 '<p>Hello,</p><p>{{inviter_name}} invited you to <b>{{event_title}}</b>.</p><p><a href="{{app_url}}/invites/accept?token={{token}}">Accept the invitation</a> before {{expires_at}}.</p>'),
	('event_webhook', 'webhook', '{{event_type}}', '{{event_json}}', NULL);
INSERT INTO eventshop.notification_rules (event_type, template) VALUES
	('user.registered', 'welcome'),
	('user.logged_in', 'login_alert'),
	('password.reset_requested', 'password_reset'),
	('auth.magic_link_requested', 'magic_link'),
	('email.verification_requested', 'email_verification'),
	('order.created', 'order_confirmation'),
	('payment.succeeded', 'payment_receipt'),
	('order.cancelled', 'order_cancelled'),
	('registration.created', 'registration_confirmation'),
	('invite.created', 'invite');

CREATE VIEW eventshop.notification_rule_templates AS
SELECT r.event_type, r.enabled, t.name AS template, t.channel, t.subject, t.body_text, t.body_html, t.updated_at
FROM eventshop.notification_rules r
RIGHT JOIN eventshop.notification_templates t ON t.name = r.template;
COMMENT ON VIEW eventshop.notification_rule_templates IS 'Every template with the event types whose rules use it (none: event_type is NULL), for administrators.';

-- ---------------------------------------------------------------------------
-- Administration of templates and rules (role eventshop_admin).
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop._check_template_text(what text, value text, max_length integer, single_line boolean)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF value IS NULL THEN
		RAISE EXCEPTION '% is required', what USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF char_length(value) NOT BETWEEN 1 AND max_length THEN
		RAISE EXCEPTION '% must be 1 to % characters long', what, max_length
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF (single_line AND value ~ '[[:cntrl:]]') OR value ~ '[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]' THEN
		RAISE EXCEPTION '% contains control characters', what
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = CASE WHEN single_line THEN 'A subject is a single line.' END;
	END IF;
	BEGIN
		PERFORM eventshop._template_placeholders(value);
	EXCEPTION WHEN invalid_parameter_value THEN
		RAISE EXCEPTION '%: %', what, SQLERRM USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Placeholders look like {{name}}: a letter or underscore, then up to 62 letters, digits or underscores.';
	END;
END
$$;
COMMENT ON FUNCTION eventshop._check_template_text(text, text, integer, boolean) IS 'Internal: validates one part of a template (presence, length, control characters, placeholder syntax).';

CREATE FUNCTION eventshop.set_notification_template(name text, channel text, subject text, body_text text,
													body_html text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF name IS NULL OR name !~ '^[a-z][a-z0-9_]{0,62}$' THEN
		RAISE EXCEPTION 'invalid template name' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Use a lower-case letter, then up to 62 lower-case letters, digits or underscores.';
	END IF;
	IF channel IS NULL OR channel NOT IN ('email', 'sms', 'push', 'webhook', 'log') THEN
		RAISE EXCEPTION 'invalid channel "%"', channel USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Use email, sms, push, webhook or log.';
	END IF;
	PERFORM eventshop._check_template_text('subject', subject, 200, true);
	PERFORM eventshop._check_template_text('body_text', body_text, 20000, false);
	IF body_html IS NOT NULL THEN
		PERFORM eventshop._check_template_text('body_html', body_html, 100000, false);
	END IF;
	INSERT INTO eventshop.notification_templates AS t (name, channel, subject, body_text, body_html, updated_at)
	VALUES (set_notification_template.name, set_notification_template.channel, set_notification_template.subject,
			set_notification_template.body_text, set_notification_template.body_html, now())
	ON CONFLICT ON CONSTRAINT notification_templates_pkey DO UPDATE
		SET channel = EXCLUDED.channel, subject = EXCLUDED.subject, body_text = EXCLUDED.body_text,
			body_html = EXCLUDED.body_html, updated_at = now();
END
$$;
COMMENT ON FUNCTION eventshop.set_notification_template(text, text, text, text, text) IS 'For administrators: creates or replaces a notification template after checking it (name, channel email/sms/push/webhook/log, one-line subject up to 200 characters, body_text up to 20000, optional body_html up to 100000, {{name}} placeholders well-formed). Applies to events consumed from then on. Errors: 22023 invalid input, 22004 missing input.';

CREATE FUNCTION eventshop.set_notification_rule(event_type text, template text, enabled boolean DEFAULT true)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF event_type IS NULL OR event_type !~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$' OR char_length(event_type) > 200 THEN
		RAISE EXCEPTION 'invalid event type' USING ERRCODE = 'invalid_parameter_value',
			HINT = 'Event types look like order.created.';
	END IF;
	IF enabled IS NULL THEN
		RAISE EXCEPTION 'enabled is required' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF NOT EXISTS (SELECT FROM eventshop.notification_templates t WHERE t.name = set_notification_rule.template) THEN
		RAISE EXCEPTION 'no template named "%"', template USING ERRCODE = 'no_data_found',
			HINT = 'Create it with eventshop.set_notification_template first.';
	END IF;
	INSERT INTO eventshop.notification_rules AS r (event_type, template, enabled)
	VALUES (set_notification_rule.event_type, set_notification_rule.template, set_notification_rule.enabled)
	ON CONFLICT ON CONSTRAINT notification_rules_pkey DO UPDATE SET enabled = EXCLUDED.enabled;
END
$$;
COMMENT ON FUNCTION eventshop.set_notification_rule(text, text, boolean) IS 'For administrators: makes an event type produce a template''s notification (enabled) or stop producing it. Errors: 22023 invalid event type, P0002 no such template.';

CREATE FUNCTION eventshop.preview_notification(template text, event jsonb,
											   OUT subject text, OUT body_text text, OUT body_html text)
RETURNS record
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_t		eventshop.notification_templates%ROWTYPE;
	v_vars	jsonb;
BEGIN
	SELECT t.* INTO v_t FROM eventshop.notification_templates t WHERE t.name = preview_notification.template;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'no template named "%"', template USING ERRCODE = 'no_data_found';
	END IF;
	IF jsonb_typeof(event) IS DISTINCT FROM 'object' OR jsonb_typeof(event->'data') IS DISTINCT FROM 'object' THEN
		RAISE EXCEPTION 'event must be a JSON object with a data object' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	-- no sealed values are opened for a preview, and no account is looked up
	v_vars := (eventshop._notification_vars(event - 'subject' || jsonb_build_object('data',
				 (event->'data') - ARRAY['user_id', 'sealed_token', 'sealed_email', 'inviter_id'])))
			  || (event->'data') - ARRAY['user_id', 'sealed_token', 'sealed_email', 'inviter_id'];
	subject := eventshop._render_template(v_t.subject, v_vars, 'header');
	body_text := eventshop._render_template(v_t.body_text, v_vars, 'text');
	body_html := eventshop._render_template(v_t.body_html, v_vars, 'html');
END
$$;
COMMENT ON FUNCTION eventshop.preview_notification(text, jsonb) IS 'For administrators: renders a template with an example event {"type": ..., "data": {...}} whose data members stand in for every placeholder (display_name, email, token, ...); opens no sealed value and reads no account. Errors: P0002 no such template, 22023 bad event.';

-- ---------------------------------------------------------------------------
-- Audit log queries and retention (role eventshop_admin; pg_cron).
-- ---------------------------------------------------------------------------
CREATE FUNCTION eventshop.audit_events(event_type text DEFAULT NULL, subject text DEFAULT NULL,
									   from_time timestamptz DEFAULT NULL, to_time timestamptz DEFAULT NULL,
									   before_id bigint DEFAULT NULL, page_size integer DEFAULT 100)
RETURNS SETOF eventshop.event_audit
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF page_size IS NULL OR page_size NOT BETWEEN 1 AND 1000 THEN
		RAISE EXCEPTION 'page_size must be between 1 and 1000' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF from_time > to_time THEN
		RAISE EXCEPTION 'from_time is after to_time' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	RETURN QUERY
		SELECT a.* FROM eventshop.event_audit a
		WHERE (audit_events.event_type IS NULL OR a.event_type = audit_events.event_type)
		  AND (audit_events.subject IS NULL OR a.subject = audit_events.subject)
		  AND (from_time IS NULL OR a.received_at >= from_time)
		  AND (to_time IS NULL OR a.received_at < to_time)
		  AND (before_id IS NULL OR a.id < before_id)
		ORDER BY a.id DESC
		LIMIT page_size;
END
$$;
COMMENT ON FUNCTION eventshop.audit_events(text, text, timestamptz, timestamptz, bigint, integer) IS 'For administrators: consumed events newest first, filtered by type, subject (the Kafka key: user, order, event or invite id) and receipt time [from_time, to_time); page with before_id = the last id of the previous page. Errors: 22023 page_size outside 1-1000, from_time after to_time.';

CREATE FUNCTION eventshop.purge_event_audit(older_than interval DEFAULT '90 days', max_rows integer DEFAULT 100000)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_count bigint;
BEGIN
	IF older_than IS NULL OR older_than < interval '0' OR max_rows IS NULL OR max_rows < 1 THEN
		RAISE EXCEPTION 'older_than must be a non-negative interval and max_rows positive'
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	DELETE FROM eventshop.event_audit a
	WHERE a.id IN (SELECT b.id FROM eventshop.event_audit b
				   WHERE b.received_at < now() - older_than ORDER BY b.received_at LIMIT max_rows);
	GET DIAGNOSTICS v_count = ROW_COUNT;
	RETURN v_count;
END
$$;
COMMENT ON FUNCTION eventshop.purge_event_audit(interval, integer) IS 'Retention for pg_cron: deletes up to max_rows audit rows received more than older_than ago; returns how many. Errors: 22023 invalid arguments.';

-- ---------------------------------------------------------------------------
-- Operations: consumer lag per partition and the dispatcher at a glance.
-- ---------------------------------------------------------------------------
CREATE VIEW eventshop.consumer_lag AS
SELECT w.group_id, w.topic, w.partition, o.next_offset AS stored_offset, w.high_watermark,
	   greatest(w.high_watermark - coalesce(o.next_offset, w.low_watermark), 0) AS lag,
	   w.recorded_at
FROM eventshop.consumer_watermarks w
LEFT JOIN eventshop.consumer_offsets o
	ON o.group_id = w.group_id AND o.topic = w.topic AND o.partition = w.partition;
COMMENT ON VIEW eventshop.consumer_lag IS 'Per assigned partition: the stored next offset, the high watermark the dispatcher last saw, and the difference (events not yet consumed).';

CREATE VIEW eventshop.dispatcher_status AS
SELECT (SELECT coalesce(sum(l.lag), 0) FROM eventshop.consumer_lag l) AS consumer_lag,
	   (SELECT count(*) FROM eventshop.consumer_watermarks) AS partitions_assigned,
	   (SELECT max(w.recorded_at) FROM eventshop.consumer_watermarks w) AS lag_recorded_at,
	   (SELECT coalesce(jsonb_object_agg(s.status, s.n), '{}')
		FROM (SELECT n.status, count(*) AS n FROM eventshop.notifications n GROUP BY n.status) s) AS queue_depth,
	   (SELECT count(*) FROM eventshop.notifications n WHERE n.status = 'pending') AS pending,
	   (SELECT max(clock_timestamp() - n.created_at) FROM eventshop.notifications n
		WHERE n.status = 'pending') AS oldest_pending_age,
	   (SELECT count(*) FROM eventshop.notifications n WHERE n.status = 'dead') AS dead_letters,
	   (SELECT count(*) FROM eventshop.rejected_events) AS rejected_events,
	   (SELECT max(i.received_at) FROM eventshop.inbox i) AS last_event_at;
COMMENT ON VIEW eventshop.dispatcher_status IS 'The dispatcher at a glance: total consumer lag, assigned partitions, notifications by state, oldest pending age, dead letters, rejected messages, last consumed event.';

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

CREATE FUNCTION eventshop._signing_key_cache(OUT kid text, OUT alg text, OUT has_public_key boolean,
											 OUT has_private_key boolean)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'eventshop_signing_key_cache'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION eventshop._signing_key_cache() IS 'Internal: the signing keys this backend holds parsed, and whether it holds their public and private halves (only the active key of an algorithm keeps its private half).';

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
		   AND k.retired_at > (SELECT clock_timestamp()) - current_setting('eventshop.access_token_ttl')::interval)
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
	eventshop.request_magic_link(text), eventshop.login_with_magic_link(text, text, text),
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
-- Orders: catalog, cart and orders for applications (administrative functions
-- check the authenticated user's admin role themselves). Payment results come
-- only from the gateway (after verify_webhook_signature) or operators, never
-- from applications; expiry is for operators and pg_cron.
GRANT EXECUTE ON FUNCTION
	eventshop.create_product(text, text, bigint, text, integer, text, text),
	eventshop.update_product(bigint, integer, jsonb), eventshop.get_product(text),
	eventshop.search_products(text, text, integer, text),
	eventshop.cart_add(text, integer), eventshop.cart_set_quantity(text, integer), eventshop.cart_remove(text),
	eventshop.cart_clear(), eventshop.cart_view(), eventshop.checkout(),
	eventshop.place_order(jsonb), eventshop.place_order(text, jsonb), eventshop.cancel_order(uuid), eventshop.get_order(uuid),
	eventshop.list_orders(text, boolean, integer, text),
	eventshop.sales_by_day(date, date), eventshop.sales_by_category(date, date)
	TO eventshop_app, eventshop_admin;
GRANT EXECUTE ON FUNCTION
	eventshop.record_payment(uuid, text, text, text, bigint, text),
	eventshop.record_refund(uuid, text, text, bigint, text),
	eventshop.verify_webhook_signature(text, text, text, integer, bigint)
	TO eventshop_gateway, eventshop_admin;
GRANT EXECUTE ON FUNCTION eventshop.expire_reservations(integer) TO eventshop_admin;
-- Notifications: dead letters are for operators only.
GRANT EXECUTE ON FUNCTION eventshop.dead_letters(integer), eventshop.retry_dead_letter(uuid),
	eventshop.retry_dead_letters(), eventshop.discard_dead_letter(uuid) TO eventshop_admin;
GRANT SELECT ON eventshop.outbox_status, eventshop.notification_status TO eventshop_admin, pg_monitor;
-- outbox_status calls these with the reader's rights; they return counters only
GRANT EXECUTE ON FUNCTION eventshop._unpublished_events(), eventshop._relay_stats() TO eventshop_admin, pg_monitor;
GRANT SELECT ON eventshop.parked_events TO eventshop_admin;
GRANT EXECUTE ON FUNCTION eventshop.retry_parked_event(bigint), eventshop.retry_parked_events(),
	eventshop.discard_parked_event(bigint), eventshop.purge_published_events(interval),
	eventshop.reset_relay_latency()
	TO eventshop_admin;
-- Notifications, consumer side: templates, rules and the audit log for
-- operators; the consumer's lag and status for monitoring.
GRANT EXECUTE ON FUNCTION
	eventshop.set_notification_template(text, text, text, text, text),
	eventshop.set_notification_rule(text, text, boolean), eventshop.preview_notification(text, jsonb),
	eventshop.audit_events(text, text, timestamptz, timestamptz, bigint, integer),
	eventshop.purge_event_audit(interval, integer)
	TO eventshop_admin;
GRANT SELECT ON eventshop.notification_rule_templates TO eventshop_admin;
GRANT SELECT ON eventshop.consumer_lag, eventshop.dispatcher_status TO eventshop_admin, pg_monitor;
