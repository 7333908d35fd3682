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
	CONSTRAINT users_email_key UNIQUE (email)
);
COMMENT ON TABLE eventshop.users IS 'Accounts. email is stored normalised (trimmed, lower case); password_hash is an argon2id PHC string.';
-- pg_dump leaves out the rows of extension tables unless they are marked.
SELECT pg_catalog.pg_extension_config_dump('eventshop.users', '');

-- Passwords too common to accept whatever their length; the auth module ships
-- a larger list.
CREATE TABLE eventshop.common_passwords (
	password text PRIMARY KEY
);
COMMENT ON TABLE eventshop.common_passwords IS 'Passwords refused at registration because they are among the most common ones (compared in lower case).';
INSERT INTO eventshop.common_passwords (password) VALUES
	('password'), ('password1'), ('password12'), ('password123'), ('passw0rd'),
	('12345678'), ('123456789'), ('1234567890'), ('0123456789'), ('87654321'),
	('11111111'), ('00000000'), ('88888888'), ('12341234'), ('123123123'),
	('qwertyui'), ('qwertyuiop'), ('qwerty123'), ('qwerty12'), ('1q2w3e4r'),
	('1q2w3e4r5t'), ('1qaz2wsx'), ('zaq12wsx'), ('asdfghjk'), ('asdfghjkl'),
	('iloveyou'), ('iloveyou1'), ('sunshine'), ('princess'), ('football'),
	('baseball'), ('superman'), ('trustno1'), ('letmein1'), ('welcome1'),
	('abc12345'), ('abcd1234'), ('starwars'), ('whatever'), ('michelle'),
	('computer'), ('corvette'), ('mercedes'), ('internet'), ('changeme'),
	('administrator'), ('admin123'), ('welcome123'), ('monkey123'), ('dragon123');

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
						   'email_masked', eventshop._mask_email(v_email),
						   'registered_at', now()));
	RETURN v_id;
END
$$;
COMMENT ON FUNCTION eventshop.register(text, text, text) IS 'Creates an account and emits user.registered on auth.events in the same transaction; returns the new user id. Errors: 22023 invalid input, 22004 missing input, 23505 address already registered.';

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
-- Privileges: nothing for PUBLIC; apps may only call the API; admins and
-- monitoring may read the operational views.
-- ---------------------------------------------------------------------------
REVOKE ALL ON ALL TABLES IN SCHEMA eventshop FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA eventshop FROM PUBLIC;
GRANT EXECUTE ON FUNCTION eventshop.register(text, text, text) TO eventshop_app, eventshop_admin;
GRANT SELECT ON eventshop.outbox_status, eventshop.notification_status TO eventshop_admin, pg_monitor;
