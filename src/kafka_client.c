/*
 * kafka_client.c
 *		librdkafka handles for the workers. librdkafka runs its own threads;
 *		nothing here lets them call into Postgres: logs go to a queue
 *		(log.queue) and, like errors and delivery reports, are served by
 *		rd_kafka_poll()/rd_kafka_consumer_poll() on the worker's main thread.
 *		librdkafka writes a byte to a pipe when its queue becomes non-empty,
 *		so the worker can sleep in WaitLatchOrSocket on its latch and on
 *		Kafka together.
 */
#include "postgres.h"

#include <fcntl.h>
#include <unistd.h>

#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "config.h"
#include "kafka_client.h"

/* Repeat the same client error in the log at most this often. */
#define ES_KAFKA_ERROR_LOG_INTERVAL_MS	60000
#define ES_KAFKA_LOG_LINES_PER_MINUTE	10

static void es_kafka_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf);
static void es_kafka_error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque);
static void es_kafka_apply_properties(rd_kafka_conf_t *conf, const char *properties);

/* A configuration with the common settings and eventshop.kafka_properties applied. */
rd_kafka_conf_t *
es_kafka_conf_new(const char *role)
{
	return es_kafka_conf_new_with_defaults(role, NULL);
}

/* The same, with role-specific defaults (name, value, ..., NULL) that the properties may override. */
rd_kafka_conf_t *
es_kafka_conf_new_with_defaults(const char *role, const char *const *defaults)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	char		client_id[64];

	snprintf(client_id, sizeof(client_id), "eventshop-%s", role);
	es_kafka_conf_set(conf, "bootstrap.servers", es_kafka_brokers);
	es_kafka_conf_set(conf, "client.id", client_id);
	es_kafka_conf_set(conf, "log.queue", "true");
	es_kafka_conf_set(conf, "reconnect.backoff.max.ms", "5000");
	rd_kafka_conf_set_log_cb(conf, es_kafka_log_cb);
	rd_kafka_conf_set_error_cb(conf, es_kafka_error_cb);
	for (int i = 0; defaults != NULL && defaults[i] != NULL; i += 2)
		es_kafka_conf_set(conf, defaults[i], defaults[i + 1]);
	es_kafka_apply_properties(conf, es_kafka_properties);
	return conf;
}

/* Sets one property, turning librdkafka's refusal into a Postgres error. */
void
es_kafka_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value)
{
	char		errstr[512];

	if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
	{
		rd_kafka_conf_destroy(conf);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid Kafka client setting \"%s\": %s", name, errstr),
				 errhint("Check eventshop.kafka_brokers and eventshop.kafka_properties.")));
	}
}

/* Applies key=value;key=value pairs (already shape-checked by the GUC check hook). */
static void
es_kafka_apply_properties(rd_kafka_conf_t *conf, const char *properties)
{
	char	   *copy = pstrdup(properties ? properties : "");
	char	   *saveptr = NULL;

	for (char *pair = strtok_r(copy, ";", &saveptr); pair != NULL; pair = strtok_r(NULL, ";", &saveptr))
	{
		char	   *eq = strchr(pair, '=');

		if (eq == NULL)
			continue;
		*eq = '\0';
		es_kafka_conf_set(conf, pair, eq + 1);
	}
	pfree(copy);
}

/* Creates the client and its wake-up pipe; conf is consumed either way. */
EsKafka *
es_kafka_open(rd_kafka_type_t type, rd_kafka_conf_t *conf, const char *role)
{
	EsKafka    *kafka;
	char		errstr[512];
	rd_kafka_t *rk;

	kafka = MemoryContextAllocZero(TopMemoryContext, sizeof(EsKafka));
	kafka->role = role;
	kafka->brokers = MemoryContextStrdup(TopMemoryContext, es_kafka_brokers);
	kafka->properties = MemoryContextStrdup(TopMemoryContext, es_kafka_properties);
	kafka->wake_pipe[0] = kafka->wake_pipe[1] = -1;

	rd_kafka_conf_set_opaque(conf, kafka);
	rk = rd_kafka_new(type, conf, errstr, sizeof(errstr));
	if (rk == NULL)
	{
		/* rd_kafka_new destroys conf only on success */
		rd_kafka_conf_destroy(conf);
		es_kafka_close(kafka);
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not create Kafka %s client: %s",
						type == RD_KAFKA_PRODUCER ? "producer" : "consumer", errstr)));
	}
	kafka->rk = rk;
	rd_kafka_set_log_queue(rk, NULL);	/* logs to the main queue */

	if (type == RD_KAFKA_CONSUMER)
	{
		rd_kafka_poll_set_consumer(rk);
		kafka->wake_queue = rd_kafka_queue_get_consumer(rk);
	}
	else
		kafka->wake_queue = rd_kafka_queue_get_main(rk);

	if (pipe(kafka->wake_pipe) != 0 ||
		fcntl(kafka->wake_pipe[0], F_SETFL, O_NONBLOCK) != 0 ||
		fcntl(kafka->wake_pipe[1], F_SETFL, O_NONBLOCK) != 0)
	{
		int			save_errno = errno;

		es_kafka_close(kafka);
		errno = save_errno;
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not create wake-up pipe for Kafka client: %m")));
	}
	rd_kafka_queue_io_event_enable(kafka->wake_queue, kafka->wake_pipe[1], "k", 1);
	return kafka;
}

/* Destroys the client and everything open() made; tolerates partial construction. */
void
es_kafka_close(EsKafka *kafka)
{
	if (kafka == NULL)
		return;
	if (kafka->wake_queue)
	{
		rd_kafka_queue_io_event_enable(kafka->wake_queue, -1, NULL, 0);
		rd_kafka_queue_destroy(kafka->wake_queue);
	}
	if (kafka->rk)
	{
		if (rd_kafka_type(kafka->rk) == RD_KAFKA_PRODUCER)
			rd_kafka_purge(kafka->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
		rd_kafka_destroy_flags(kafka->rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
	}
	for (int i = 0; i < 2; i++)
		if (kafka->wake_pipe[i] >= 0)
			close(kafka->wake_pipe[i]);
	if (kafka->brokers)
		pfree(kafka->brokers);
	if (kafka->properties)
		pfree(kafka->properties);
	pfree(kafka);
}

/* Whether brokers or properties differ from what the client was built with. */
bool
es_kafka_settings_changed(const EsKafka *kafka)
{
	return strcmp(kafka->brokers, es_kafka_brokers) != 0 ||
		strcmp(kafka->properties, es_kafka_properties) != 0;
}

/* Reads every pending wake-up byte so the next arrival writes again. */
void
es_kafka_drain_wakeups(EsKafka *kafka)
{
	char		buf[64];

	while (read(kafka->wake_pipe[0], buf, sizeof(buf)) > 0)
		;
}

/* Prefixes a logical topic name with eventshop.topic_prefix. */
char *
es_kafka_topic_name(const char *topic)
{
	return psprintf("%s%s", es_topic_prefix ? es_topic_prefix : "", topic);
}

/* Forwards librdkafka's log lines (served on our thread through the log queue). */
static void
es_kafka_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
	EsKafka    *kafka = rd_kafka_opaque(rk);
	TimestampTz now;

	/* syslog levels: 0-4 emergency..warning are worth the server log */
	if (level > 4 || kafka == NULL)
	{
		ereport(DEBUG1, (errmsg("eventshop %s: librdkafka %s: %s", kafka ? kafka->role : "?", fac, buf)));
		return;
	}
	/* at most ES_KAFKA_LOG_LINES_PER_MINUTE lines a minute: an outage must not flood the log */
	now = GetCurrentTimestamp();
	if (TimestampDifferenceExceeds(kafka->log_window_start, now, ES_KAFKA_ERROR_LOG_INTERVAL_MS))
	{
		if (kafka->log_suppressed > 0)
			ereport(LOG,
					(errmsg("eventshop %s: %d more librdkafka warnings in the last minute were not logged",
							kafka->role, kafka->log_suppressed)));
		kafka->log_window_start = now;
		kafka->log_lines = 0;
		kafka->log_suppressed = 0;
	}
	if (kafka->log_lines++ < ES_KAFKA_LOG_LINES_PER_MINUTE)
		ereport(LOG, (errmsg("eventshop %s: librdkafka %s: %s", kafka->role, fac, buf)));
	else
		kafka->log_suppressed++;
}

/*
 * Logs client errors, each distinct error at most once a minute, so a broker
 * outage writes a few lines rather than a storm; flags fatal errors.
 */
static void
es_kafka_error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
	EsKafka    *kafka = (EsKafka *) opaque;
	char		fatal_reason[512];

	if (err == RD_KAFKA_RESP_ERR__FATAL)
	{
		kafka->fatal = true;
		err = rd_kafka_fatal_error(rk, fatal_reason, sizeof(fatal_reason));
		reason = fatal_reason;
	}
	if (kafka->on_error != NULL)
		kafka->on_error((rd_kafka_resp_err_t) err, reason);
	es_kafka_log_error(kafka, err, reason);
}

/* Logs one client error unless the same error was logged less than a minute ago. */
void
es_kafka_log_error(EsKafka *kafka, rd_kafka_resp_err_t err, const char *reason)
{
	TimestampTz now = GetCurrentTimestamp();

	if (err == kafka->last_error &&
		!TimestampDifferenceExceeds(kafka->last_error_logged_at, now, ES_KAFKA_ERROR_LOG_INTERVAL_MS))
		return;
	kafka->last_error = err;
	kafka->last_error_logged_at = now;
	ereport(LOG,
			(errmsg("eventshop %s: Kafka client %serror: %s: %s", kafka->role,
					kafka->fatal ? "fatal " : "", rd_kafka_err2name(err), reason)));
}
