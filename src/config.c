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

int			es_relay_batch_size = 1000;

char	   *es_dispatcher_group = NULL;
char	   *es_dispatcher_topics = NULL;
int			es_dispatcher_batch_size = 100;

char	   *es_smtp_url = NULL;
char	   *es_smtp_from = NULL;
char	   *es_smtp_username = NULL;
char	   *es_smtp_password_file = NULL;
int			es_smtp_timeout_ms = 10000;
int			es_notification_max_attempts = 8;

static bool check_smtp_url(char **newval, void **extra, GucSource source);
static bool check_kafka_properties(char **newval, void **extra, GucSource source);

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
							"Maximum number of outbox rows the relay publishes per batch.",
							NULL, &es_relay_batch_size, 1000, 1, 100000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomStringVariable("eventshop.dispatcher_group",
							   "Kafka consumer group of the dispatcher.",
							   NULL, &es_dispatcher_group, "eventshop-dispatcher",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("eventshop.dispatcher_topics",
							   "Comma-separated topics the dispatcher consumes (before the prefix).",
							   NULL, &es_dispatcher_topics, "auth.events",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
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

	MarkGUCPrefixReserved("eventshop");
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
