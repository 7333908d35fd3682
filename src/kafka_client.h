/*
 * kafka_client.h
 *		librdkafka plumbing shared by the relay (producer) and the dispatcher
 *		(consumer): configuration from the eventshop.* settings, a wake-up
 *		pipe so a worker can sleep on its latch and on Kafka at once, and
 *		logs/errors served on the worker's own thread.
 */
#ifndef EVENTSHOP_KAFKA_CLIENT_H
#define EVENTSHOP_KAFKA_CLIENT_H

#include <librdkafka/rdkafka.h>

typedef struct EsKafka
{
	rd_kafka_t *rk;
	rd_kafka_queue_t *wake_queue;	/* queue whose arrivals write to wake_pipe */
	int			wake_pipe[2];	/* [0]: read end to wait on; [1]: librdkafka writes */
	const char *role;			/* "relay" or "dispatcher", for log lines */
	char	   *brokers;		/* settings the handle was built with, to detect reloads */
	char	   *properties;
	bool		fatal;			/* the client hit a fatal error and must be rebuilt */
	rd_kafka_resp_err_t last_error; /* last error logged, to avoid log storms */
	int64		last_error_logged_at;	/* GetCurrentTimestamp() of that line */
	int64		log_window_start;	/* librdkafka warnings: current minute, */
	int			log_lines;		/* lines logged in it, */
	int			log_suppressed; /* and lines dropped */
	/* optional: told of every client error on the worker's thread */
	void		(*on_error) (rd_kafka_resp_err_t err, const char *reason);
} EsKafka;

/*
 * A configuration with bootstrap servers, log queue, client id and the
 * callbacks set, then eventshop.kafka_properties applied on top.  Raises an
 * ERROR naming the bad setting if librdkafka refuses one.
 */
extern rd_kafka_conf_t *es_kafka_conf_new(const char *role);

/* The same, with defaults for the role (name, value, ..., NULL) applied before the properties. */
extern rd_kafka_conf_t *es_kafka_conf_new_with_defaults(const char *role, const char *const *defaults);

/* Sets one property; on failure destroys conf and raises an ERROR. */
extern void es_kafka_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value);

/*
 * Creates the client from conf (which it takes over, also on error). For a
 * consumer, the main queue is redirected to the consumer queue, so that
 * rd_kafka_consumer_poll() also serves logs and errors. Allocated in
 * TopMemoryContext; never returns NULL.
 */
extern EsKafka *es_kafka_open(rd_kafka_type_t type, rd_kafka_conf_t *conf, const char *role);

/* Destroys the client without waiting for undelivered messages. NULL is fine. */
extern void es_kafka_close(EsKafka *kafka);

/* Whether the eventshop.kafka_* settings changed since the client was built. */
extern bool es_kafka_settings_changed(const EsKafka *kafka);

/*
 * Logs a client error at LOG, each distinct error at most once a minute, so
 * an outage writes a few lines rather than a storm. The error callback uses
 * it; so can callers for per-message errors.
 */
extern void es_kafka_log_error(EsKafka *kafka, rd_kafka_resp_err_t err, const char *reason);

/* Empties the wake-up pipe; call after waking and before polling. */
extern void es_kafka_drain_wakeups(EsKafka *kafka);

/* The full topic name for a logical topic, with eventshop.topic_prefix. */
extern char *es_kafka_topic_name(const char *topic);

#endif							/* EVENTSHOP_KAFKA_CLIENT_H */
