/*
 * config.c
 *		Defines every eventshop.* setting. The README's settings table is
 *		written from this file; keep the two in step.
 */
#include "postgres.h"

#include <limits.h>

#include "utils/guc.h"

#include "config.h"

char	   *es_database = NULL;
bool		es_relay_enabled = true;
bool		es_dispatcher_enabled = true;

char	   *es_kafka_brokers = NULL;
char	   *es_kafka_properties = NULL;
char	   *es_topic_prefix = NULL;

int			es_relay_batch_size = 5000;
int			es_relay_max_in_flight = 100000;
int			es_relay_checkpoint_interval_ms = 50;

char	   *es_dispatcher_group = NULL;
char	   *es_dispatcher_topics = NULL;
int			es_dispatcher_batch_size = 100;
char	   *es_app_url = NULL;

char	   *es_smtp_url = NULL;
char	   *es_smtp_from = NULL;
char	   *es_smtp_username = NULL;
char	   *es_smtp_password_file = NULL;
int			es_smtp_timeout_ms = 10000;
int			es_notification_max_attempts = 8;

/* Sender pool and channels. */
int			es_sender_workers = 2;
int			es_sender_concurrency = 32;
int			es_sender_batch_size = 500;
int			es_notification_max_backoff_s = 3600;
int			es_smtp_tls = ES_SMTP_TLS_OPPORTUNISTIC;
bool		es_tls_verify = true;
char	   *es_tls_ca_file = NULL;
int			es_http_timeout_ms = 10000;
char	   *es_webhook_url = NULL;
char	   *es_webhook_secret_file = NULL;
char	   *es_sms_url = NULL;
char	   *es_sms_token_file = NULL;
char	   *es_push_url = NULL;
char	   *es_push_token_file = NULL;

static const struct config_enum_entry es_smtp_tls_options[] = {
	{"off", ES_SMTP_TLS_OFF, false},
	{"opportunistic", ES_SMTP_TLS_OPPORTUNISTIC, false},
	{"required", ES_SMTP_TLS_REQUIRED, false},
	{NULL, 0, false}
};

/* Accounts: password hashing, login throttling, one-time tokens. */
int			es_password_hash_memory_kib = 19456;
int			es_password_hash_iterations = 2;
int			es_max_concurrent_password_hashes = 4;
int			es_login_max_failures = 5;
int			es_login_max_failures_per_source = 50;
int			es_login_failure_window_s = 900;
int			es_login_lockout_s = 60;
int			es_login_lockout_max_s = 3600;
int			es_login_throttle_entries = 10000;
int			es_login_failure_min_duration_ms = 250;
int			es_password_reset_ttl_s = 1800;
int			es_magic_link_ttl_s = 900;
int			es_email_verification_ttl_s = 86400;

/* Orders: how long a placed order holds its stock. */
int			es_reservation_ttl_s = 900;

char	   *es_key_file = NULL;
char	   *es_seal_public_key = NULL;
char	   *es_seal_private_key_file = NULL;
char	   *es_jwt_issuer = NULL;
char	   *es_jwt_audience = NULL;
int			es_access_token_ttl_s = 900;
int			es_refresh_token_ttl_s = 30 * 86400;
int			es_jwt_default_alg = ES_JWT_RS256;
int			es_refresh_reuse_grace_ms = 10000;

/* Names as they appear in JWT headers, JWKs and signing_keys.alg. */
static const struct config_enum_entry es_jwt_alg_options[] = {
	{"RS256", ES_JWT_RS256, false},
	{"ES256", ES_JWT_ES256, false},
	{"EdDSA", ES_JWT_EDDSA, false},
	{NULL, 0, false}
};

static bool check_smtp_url(char **newval, void **extra, GucSource source);
static bool check_http_url(char **newval, void **extra, GucSource source);
static void es_define_sender_settings(void);
static bool check_kafka_properties(char **newval, void **extra, GucSource source);
static void es_define_account_settings(void);
static bool check_seal_public_key(char **newval, void **extra, GucSource source);
static void es_define_auth_settings(void);
static void es_define_order_settings(void);

/* Registers all settings, then reserves the eventshop. prefix. */
void
es_define_settings(void)
{
	DefineCustomStringVariable("eventshop.database",
							   "Database in which the eventshop workers run.",
							   "The eventshop extension must be created in this database.",
							   &es_database, "postgres",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("eventshop.relay_enabled",
							 "Starts the outbox relay worker that publishes events to Kafka.",
							 NULL, &es_relay_enabled, true,
							 PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("eventshop.dispatcher_enabled",
							 "Starts the dispatcher worker that consumes events and sends notifications.",
							 NULL, &es_dispatcher_enabled, true,
							 PGC_POSTMASTER, 0, NULL, NULL, NULL);

	DefineCustomStringVariable("eventshop.kafka_brokers",
							   "Comma-separated Kafka bootstrap servers (host:port).",
							   NULL, &es_kafka_brokers, "localhost:9092",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("eventshop.kafka_properties",
							   "Extra librdkafka settings as key=value pairs separated by semicolons.",
							   "Used for TLS, SASL, acks, compression and similar, for example "
							   "'security.protocol=SASL_SSL;sasl.mechanism=SCRAM-SHA-512'.",
							   &es_kafka_properties, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   check_kafka_properties, NULL, NULL);
	DefineCustomStringVariable("eventshop.topic_prefix",
							   "Prefix added to every Kafka topic name, for example 'prod.'.",
							   NULL, &es_topic_prefix, "",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("eventshop.relay_batch_size",
							"Outbox rows the relay reads per query.",
							NULL, &es_relay_batch_size, 5000, 1, 100000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.relay_max_in_flight",
							"Messages the relay keeps produced but not yet acknowledged by Kafka.",
							"Bounds the relay's memory during a broker outage and the duplicates a crash can cause.",
							&es_relay_max_in_flight, 100000, 1, 1000000,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.relay_checkpoint_interval",
							"How often the relay records its progress while events are acknowledged.",
							"A crash re-sends at most what was acknowledged within this interval, plus what was in flight.",
							&es_relay_checkpoint_interval_ms, 50, 1, 10000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomStringVariable("eventshop.dispatcher_group",
							   "Kafka consumer group of the dispatcher.",
							   NULL, &es_dispatcher_group, "eventshop-dispatcher",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("eventshop.dispatcher_topics",
							   "Comma-separated topics the dispatcher consumes (before the prefix).",
							   "A reload that changes the list makes the dispatcher subscribe again.",
							   &es_dispatcher_topics,
							   "auth.events,orders.events,payments.events,registrations.events,invites.events",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("eventshop.app_url",
							   "Base URL of the application, for the links in notifications ({{app_url}}).",
							   NULL, &es_app_url, "http://localhost:8080",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.dispatcher_batch_size",
							"Maximum number of events or notifications the dispatcher handles per transaction.",
							NULL, &es_dispatcher_batch_size, 100, 1, 10000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomStringVariable("eventshop.smtp_url",
							   "SMTP server notifications are sent through (smtp:// or smtps:// URL).",
							   NULL, &es_smtp_url, "smtp://127.0.0.1:25",
							   PGC_SIGHUP, 0, check_smtp_url, NULL, NULL);
	DefineCustomStringVariable("eventshop.smtp_from",
							   "Sender address of notification e-mails.",
							   NULL, &es_smtp_from, "eventshop@localhost",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("eventshop.smtp_username",
							   "User name for SMTP authentication; empty for none.",
							   NULL, &es_smtp_username, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("eventshop.smtp_password_file",
							   "File holding the password for SMTP authentication.",
							   "Read at each delivery; a file keeps the secret out of the configuration and the server log.",
							   &es_smtp_password_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.smtp_timeout",
							"Time limit for one SMTP delivery attempt.",
							NULL, &es_smtp_timeout_ms, 10000, 100, 300000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.notification_max_attempts",
							"Delivery attempts before a notification is dead-lettered.",
							NULL, &es_notification_max_attempts, 8, 1, 100,
							PGC_SIGHUP, 0, NULL, NULL, NULL);

	es_define_sender_settings();

	es_define_auth_settings();

	es_define_account_settings();

	es_define_order_settings();

	MarkGUCPrefixReserved("eventshop");
}

/* Settings of the accounts module (password hashing, login throttling, one-time tokens). */
static void
es_define_account_settings(void)
{
	DefineCustomIntVariable("eventshop.password_hash_memory",
							"Memory cost of new argon2id password hashes.",
							"Stored hashes with less memory are rehashed at the next successful login. "
							"OWASP's minimum is 19 MiB; every concurrent hash uses this much memory.",
							&es_password_hash_memory_kib, 19456, 19456, 1048576,
							PGC_SUSET, GUC_UNIT_KB, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.password_hash_iterations",
							"Time cost (passes over memory) of new argon2id password hashes.",
							"Stored hashes with fewer passes are rehashed at the next successful login.",
							&es_password_hash_iterations, 2, 2, 64,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.max_concurrent_password_hashes",
							"Maximum number of password hashes computed at the same time in the whole server.",
							"Further logins wait (interruptibly) for a free slot, so that a login flood "
							"cannot exhaust memory or starve other work of CPU.",
							&es_max_concurrent_password_hashes, 4, 1, 1024,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.login_max_failures",
							"Failed logins for one e-mail address after which it is locked out.",
							NULL, &es_login_max_failures, 5, 1, 1000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.login_max_failures_per_source",
							"Failed logins from one source (client address) after which it is locked out.",
							NULL, &es_login_max_failures_per_source, 50, 1, 100000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.login_failure_window",
							"Time after which failed logins are forgotten when no new one occurred.",
							NULL, &es_login_failure_window_s, 900, 1, 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.login_lockout",
							"Duration of the first lockout; each further lockout doubles it.",
							NULL, &es_login_lockout_s, 60, 1, 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.login_lockout_max",
							"Upper limit of the doubling lockout duration.",
							NULL, &es_login_lockout_max_s, 3600, 1, 604800,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.login_throttle_entries",
							"Number of e-mail addresses, and separately of sources, whose failed logins are tracked in shared memory.",
							"Entries that are locked or whose failures are inside eventshop.login_failure_window are never "
							"forgotten to make room: when none can go, logins for addresses or from sources not tracked yet "
							"are refused as locked out.",
							&es_login_throttle_entries, 10000, 100, 10000000,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.login_failure_min_duration",
							"Minimum duration of a login that fails after checking a password.",
							"Failed logins sleep until this much time has passed since they started, so that timing "
							"does not tell unknown addresses from accounts whose stored hash is slower to verify "
							"(imported bcrypt, older argon2id parameters). Set it above the slowest verification.",
							&es_login_failure_min_duration_ms, 250, 0, 10000,
							PGC_SUSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.password_reset_ttl",
							"Lifetime of a password-reset token.",
							NULL, &es_password_reset_ttl_s, 1800, 60, 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.magic_link_ttl",
							"Lifetime of a magic sign-in link token.",
							NULL, &es_magic_link_ttl_s, 900, 60, 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.email_verification_ttl",
							"Lifetime of an e-mail verification token.",
							NULL, &es_email_verification_ttl_s, 86400, 300, 2592000,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
}


/* Settings of the orders module. */
static void
es_define_order_settings(void)
{
	DefineCustomIntVariable("eventshop.reservation_ttl",
							"How long a placed order holds its stock before it expires unpaid.",
							"eventshop.expire_reservations() releases the stock of orders older than this.",
							&es_reservation_ttl_s, 900, 1, 7 * 86400,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
}

/* Registers the key-file, sealing and JWT settings of the auth module. */
static void
es_define_auth_settings(void)
{
	DefineCustomStringVariable("eventshop.key_file",
							   "File holding the 32-byte master secret as 64 hexadecimal characters.",
							   "The key that encrypts signing keys at rest and the PII hashing key are derived "
							   "from it with HKDF-SHA256. Create it with \"openssl rand -hex 32 > file\", mode 0600.",
							   &es_key_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("eventshop.seal_public_key",
							   "X25519 public key (32 bytes, base64url) that secrets for the notifier are sealed to.",
							   NULL, &es_seal_public_key, "",
							   PGC_SIGHUP, 0, check_seal_public_key, NULL, NULL);
	DefineCustomStringVariable("eventshop.seal_private_key_file",
							   "File holding the X25519 private key (32 bytes as 64 hexadecimal characters) that opens sealed secrets.",
							   "Only the dispatcher needs it.",
							   &es_seal_private_key_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("eventshop.jwt_issuer",
							   "Issuer (iss claim) of the access tokens.",
							   NULL, &es_jwt_issuer, "eventshop",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("eventshop.jwt_audience",
							   "Audience (aud claim) of the access tokens.",
							   NULL, &es_jwt_audience, "eventshop",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.access_token_ttl",
							"Lifetime of an access token; retired signing keys stay published this long.",
							NULL, &es_access_token_ttl_s, 900, 1, 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.refresh_token_ttl",
							"Lifetime of a refresh token.",
							NULL, &es_refresh_token_ttl_s, 30 * 86400, 60, 365 * 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomEnumVariable("eventshop.jwt_default_alg",
							 "Signing algorithm used when none is named (RS256, ES256 or EdDSA).",
							 NULL, &es_jwt_default_alg, ES_JWT_RS256, es_jwt_alg_options,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.refresh_reuse_grace",
							"How long the immediately previous refresh token may be presented again without revoking the session.",
							NULL, &es_refresh_reuse_grace_ms, 10000, 0, 60000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
}

/* Settings of the sender pool and its channels (SMTP security, HTTP providers, retries). */
static void
es_define_sender_settings(void)
{
	DefineCustomIntVariable("eventshop.sender_workers",
							"Number of sender workers that deliver notifications.",
							"Each claims its own due notifications (SKIP LOCKED) and sends them concurrently; 0 sends nothing.",
							&es_sender_workers, 2, 0, 64,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.sender_concurrency",
							"Deliveries each sender worker keeps in flight at once (libcurl multi transfers and connections).",
							NULL, &es_sender_concurrency, 32, 1, 1000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.sender_batch_size",
							"Maximum number of notifications a sender worker claims and records per round.",
							NULL, &es_sender_batch_size, 500, 1, 10000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.notification_max_backoff",
							"Longest wait between two delivery attempts of a notification.",
							"The wait starts at 1 s and doubles per attempt up to this limit, times a random factor between 0.5 and 1.",
							&es_notification_max_backoff_s, 3600, 1, 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomEnumVariable("eventshop.smtp_tls",
							 "STARTTLS use on smtp:// URLs: off, opportunistic (when offered) or required.",
							 "smtps:// URLs always use implicit TLS. With eventshop.smtp_username set, STARTTLS is required whatever this says.",
							 &es_smtp_tls, ES_SMTP_TLS_OPPORTUNISTIC, es_smtp_tls_options,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("eventshop.tls_verify",
							 "Verifies the certificate and host name of SMTP and HTTP provider servers.",
							 NULL, &es_tls_verify, true,
							 PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("eventshop.tls_ca_file",
							   "File of CA certificates trusted for SMTP and HTTP provider servers; empty for the system's.",
							   NULL, &es_tls_ca_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomIntVariable("eventshop.http_timeout",
							"Time limit for one webhook, SMS or push delivery attempt.",
							NULL, &es_http_timeout_ms, 10000, 100, 300000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomStringVariable("eventshop.webhook_url",
							   "URL that webhook notifications are POSTed to (http:// or https://); empty disables the channel.",
							   NULL, &es_webhook_url, "",
							   PGC_SIGHUP, 0, check_http_url, NULL, NULL);
	DefineCustomStringVariable("eventshop.webhook_secret_file",
							   "File holding the secret that webhook requests are signed with (HMAC-SHA256).",
							   "Read at start and at every reload; required for the webhook channel.",
							   &es_webhook_secret_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("eventshop.sms_url",
							   "SMS provider endpoint that SMS notifications are POSTed to as JSON; empty disables the channel.",
							   NULL, &es_sms_url, "",
							   PGC_SIGHUP, 0, check_http_url, NULL, NULL);
	DefineCustomStringVariable("eventshop.sms_token_file",
							   "File holding the bearer token for the SMS provider; empty sends no Authorization header.",
							   NULL, &es_sms_token_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("eventshop.push_url",
							   "Push provider endpoint that push notifications are POSTed to as JSON; empty disables the channel.",
							   NULL, &es_push_url, "",
							   PGC_SIGHUP, 0, check_http_url, NULL, NULL);
	DefineCustomStringVariable("eventshop.push_token_file",
							   "File holding the bearer token for the push provider; empty sends no Authorization header.",
							   NULL, &es_push_token_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
}

/* Accepts an empty value or an http(s) URL, so a typo fails at reload instead of at send time. */
static bool
check_http_url(char **newval, void **extra, GucSource source)
{
	(void) extra;
	(void) source;
	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	if (strncmp(*newval, "http://", 7) != 0 && strncmp(*newval, "https://", 8) != 0)
	{
		GUC_check_errdetail("The URL must start with http:// or https://.");
		return false;
	}
	return true;
}

/* Returns the JOSE name of an EsJwtAlg value. */
const char *
es_jwt_alg_name(int alg)
{
	const struct config_enum_entry *e;

	for (e = es_jwt_alg_options; e->name; e++)
		if (e->val == alg)
			return e->name;
	return "RS256";
}

/* Accepts only SMTP URLs, so a typo fails at reload instead of at send time. */
static bool
check_smtp_url(char **newval, void **extra, GucSource source)
{
	(void) extra;
	(void) source;
	if (*newval == NULL)
		return true;
	if (strncmp(*newval, "smtp://", 7) != 0 && strncmp(*newval, "smtps://", 8) != 0)
	{
		GUC_check_errdetail("eventshop.smtp_url must start with smtp:// or smtps://.");
		return false;
	}
	return true;
}

/* Checks the key=value;key=value shape; librdkafka validates the keys themselves. */
static bool
check_kafka_properties(char **newval, void **extra, GucSource source)
{
	const char *p = *newval;

	(void) extra;
	(void) source;
	if (p == NULL)
		return true;
	while (*p)
	{
		const char *end = strchr(p, ';');
		const char *eq = strchr(p, '=');
		size_t		len = end ? (size_t) (end - p) : strlen(p);

		if (len > 0 && (eq == NULL || eq >= p + len || eq == p))
		{
			GUC_check_errdetail("eventshop.kafka_properties must be a list of key=value pairs separated by semicolons.");
			return false;
		}
		p += len;
		if (*p == ';')
			p++;
	}
	return true;
}

/* Accepts an empty value or the base64url form of exactly 32 bytes, so a bad key fails at reload. */
static bool
check_seal_public_key(char **newval, void **extra, GucSource source)
{
	const char *p = *newval;
	size_t		len;
	size_t		i;

	(void) extra;
	(void) source;
	if (p == NULL || *p == '\0')
		return true;
	len = strlen(p);
	for (i = 0; i < len; i++)
		if (!((p[i] >= 'A' && p[i] <= 'Z') || (p[i] >= 'a' && p[i] <= 'z') ||
			  (p[i] >= '0' && p[i] <= '9') || p[i] == '-' || p[i] == '_'))
			break;
	if (len != 43 || i != len)
	{
		GUC_check_errdetail("eventshop.seal_public_key must be a raw 32-byte X25519 public key in base64url without padding (43 characters).");
		return false;
	}
	return true;
}
