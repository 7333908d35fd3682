/*
 * relay.c
 *		The outbox relay worker: publishes eventshop.outbox rows to Kafka, in
 *		commit order, with librdkafka's idempotent producer.
 *
 * Delivery guarantees (README "Guarantees" has the user's view):
 *	- At-least-once. Rows are read window by window (relay_window.c) and
 *	  produced; the checkpoint advances only over rows whose delivery report
 *	  said the broker has them. A crash re-sends what was produced after
 *	  the last checkpoint (at most relay_max_in_flight messages plus what was
 *	  acknowledged within relay_checkpoint_interval), never loses a row.
 *	- Commit order per key. Windows follow commit order and one idempotent
 *	  producer keeps per-partition order across its own retries; messages
 *	  never time out locally (message.timeout.ms = 0), so a broker outage
 *	  only delays them. Keys map to partitions with murmur2 as Java clients.
 *	- Anything that could reorder (a transient delivery failure, a fatal
 *	  producer error, a settings change with messages in flight) throws the
 *	  producer away and re-sends from the first unacknowledged row.
 *	- Poison messages (refused permanently: too large, topic refused) are
 *	  parked in eventshop.outbox_parked with their error and skipped.
 *	- No row is written per published event: the checkpoint is one row.
 */
#include "postgres.h"

#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "config.h"
#include "kafka_client.h"
#include "login_throttle.h"
#include "relay_stats.h"
#include "relay_window.h"
#include "worker_runtime.h"

PGDLLEXPORT void eventshop_relay_main(Datum main_arg);

#define RELAY_IDLE_TIMEOUT_MS	10000	/* look at the outbox this often anyway */
#define RELAY_MAX_BACKOFF_MS	30000	/* longest pause after delivery failures */
#define RELAY_RELOAD_DRAIN_MS	5000	/* wait this long for acks before a rebuild */

typedef enum RelayMessageState
{
	MSG_PENDING = 0,			/* produced, no delivery report yet */
	MSG_ACKED,					/* the broker has it */
	MSG_PARK,					/* refused for good: park it */
	MSG_FAILED					/* failed for now: re-send from here */
} RelayMessageState;

/* One produced row, in the ring of messages in flight. */
typedef struct RelayMessage
{
	int64		id;
	TimestampTz created_at;
	RelayMessageState state;
	const char *error;			/* rd_kafka_err2str() text (static) */
} RelayMessage;

/* A cached topic handle for each logical topic seen. */
typedef struct RelayTopic
{
	char	   *logical;
	rd_kafka_topic_t *rkt;
} RelayTopic;

static EsKafka *relay_kafka = NULL;
static RelayWindow window;
static RelayMessage *ring = NULL;
static uint64 ring_head = 0;		/* oldest message not yet settled */
static uint64 ring_tail = 0;		/* next message to produce */
static uint32 ring_size = 0;
static uint32 generation = 0;		/* bumped when the producer is thrown away */
static bool resend_needed = false;
static RelayTopic topics[16];
static int	ntopics = 0;
static char *topic_prefix_used = NULL;	/* eventshop.topic_prefix of the handles */

/* rows to park at the next checkpoint */
static int	nparked = 0;
static int64 *parked_ids = NULL;
static char **parked_errors = NULL;

static void relay_open_producer(void);
static void relay_drop_producer(void);
static void relay_close_producer(int code, Datum arg);
static void relay_on_client_error(rd_kafka_resp_err_t err, const char *reason);
static void relay_flush_deferred_events(void);
static void relay_emit(const RelayRow *row, void *arg);
static rd_kafka_topic_t *relay_topic(const char *logical);
static void relay_delivery_report(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque);
static bool relay_permanent_error(rd_kafka_resp_err_t err);
static void relay_note_message_error(const RelayMessage *m);
static void relay_settle(void);
static void relay_park(int64 id, const char *error);
static void relay_checkpoint(void);
static uint32 relay_in_flight(void);

/* Worker entry point: publish until SIGTERM, sleeping on latch + Kafka when idle. */
void
eventshop_relay_main(Datum main_arg)
{
	bool		loaded = false;
	long		backoff_ms = 0;
	TimestampTz last_checkpoint = 0;
	TimestampTz reload_since = 0;

	(void) main_arg;
	es_worker_start(ES_WORKER_RELAY);
	on_proc_exit(relay_close_producer, (Datum) 0);
	es_relay_stats_worker_started();

	ring_size = (uint32) es_relay_max_in_flight;
	ring = MemoryContextAllocZero(TopMemoryContext, sizeof(RelayMessage) * ring_size);
	parked_ids = MemoryContextAlloc(TopMemoryContext, sizeof(int64) * ring_size);
	parked_errors = MemoryContextAlloc(TopMemoryContext, sizeof(char *) * ring_size);

	for (;;)
	{
		TimestampTz now;
		long		timeout_ms;
		bool		reloaded;

		if (!es_worker_extension_ready())
		{
			es_worker_wait(RELAY_IDLE_TIMEOUT_MS, PGINVALID_SOCKET);
			continue;
		}
		if (!loaded)
		{
			relay_window_load(&window);
			loaded = true;
		}

		/* Rebuild the producer after a fatal error, or after a reload once drained. */
		if (relay_kafka != NULL && relay_kafka->fatal)
			resend_needed = true;
		if (relay_kafka != NULL && reload_since == 0 &&
			(es_kafka_settings_changed(relay_kafka) ||
			 strcmp(topic_prefix_used, es_topic_prefix ? es_topic_prefix : "") != 0))
			reload_since = GetCurrentTimestamp();
		if (reload_since != 0 &&
			(relay_in_flight() == 0 ||
			 TimestampDifferenceExceeds(reload_since, GetCurrentTimestamp(), RELAY_RELOAD_DRAIN_MS)))
		{
			if (relay_in_flight() > 0)
				resend_needed = true;
			relay_drop_producer();
			reload_since = 0;
		}
		if (resend_needed)
		{
			relay_drop_producer();
			relay_window_rewind(&window);
			resend_needed = false;
			if (backoff_ms > 0)
			{
				es_worker_wait(backoff_ms, PGINVALID_SOCKET);
				continue;
			}
		}
		if (relay_kafka == NULL)
			relay_open_producer();

		relay_flush_deferred_events();

		/* Read and produce while there is room in flight. */
		while (!window.all_read && reload_since == 0 && !resend_needed &&
			   relay_in_flight() < ring_size)
		{
			int			room = (int) Min((uint32) es_relay_batch_size, ring_size - relay_in_flight());
			int			count = relay_window_read(&window, room, relay_emit, NULL);

			es_relay_stats_produced(count);
			rd_kafka_poll(relay_kafka->rk, 0);
			relay_settle();
			/* a long drain still records its progress every checkpoint interval */
			if (window.dirty && !resend_needed &&
				TimestampDifferenceExceeds(last_checkpoint, GetCurrentTimestamp(),
										   es_relay_checkpoint_interval_ms))
			{
				relay_checkpoint();
				last_checkpoint = GetCurrentTimestamp();
			}
			if (es_worker_check_interrupts())
				break;
		}
		rd_kafka_poll(relay_kafka->rk, 0);
		relay_settle();
		if (resend_needed)
		{
			backoff_ms = backoff_ms == 0 ? 1000 : Min(backoff_ms * 2, RELAY_MAX_BACKOFF_MS);
			continue;
		}

		/* A fully published window: move on, and look again at once if it had rows. */
		if (window.open && window.all_read && relay_in_flight() == 0)
		{
			bool		had_rows = window.rows_read > 0;

			relay_window_close(&window);
			backoff_ms = 0;
			if (had_rows)
			{
				now = GetCurrentTimestamp();
				if (TimestampDifferenceExceeds(last_checkpoint, now, es_relay_checkpoint_interval_ms))
				{
					relay_checkpoint();
					last_checkpoint = now;
				}
				continue;
			}
		}

		/* Checkpoint now if due, else sleep no longer than until it is due. */
		now = GetCurrentTimestamp();
		timeout_ms = relay_in_flight() > 0 ? 1000 : RELAY_IDLE_TIMEOUT_MS;
		if (window.dirty || nparked > 0)
		{
			long		since = (long) ((now - last_checkpoint) / 1000);

			if (since >= es_relay_checkpoint_interval_ms)
			{
				relay_checkpoint();
				last_checkpoint = now;
			}
			else
				timeout_ms = Min(timeout_ms, es_relay_checkpoint_interval_ms - since);
		}
		if (reload_since != 0)
			timeout_ms = Min(timeout_ms, 100);

		reloaded = es_worker_wait(timeout_ms, relay_kafka->wake_pipe[0]);
		es_kafka_drain_wakeups(relay_kafka);
		rd_kafka_poll(relay_kafka->rk, 0);
		relay_settle();
		if (reloaded)
			backoff_ms = 0;
	}
}

/*
 * Builds the idempotent producer. Defaults favour latency; everything but
 * idempotence, the partitioner and the endless local timeout can be
 * overridden through eventshop.kafka_properties (acks, compression, TLS,
 * SASL, batching...).
 */
static void
relay_open_producer(void)
{
	char		queue_limit[32];
	static const char *const defaults[] = {
		"linger.ms", "1",
		"socket.nagle.disable", "true",
		"batch.num.messages", "10000",
		"queue.buffering.max.kbytes", "1048576",
		NULL
	};
	rd_kafka_conf_t *conf = es_kafka_conf_new_with_defaults("relay", defaults);

	snprintf(queue_limit, sizeof(queue_limit), "%d", Max(es_relay_max_in_flight + 1000, 100000));
	es_kafka_conf_set(conf, "queue.buffering.max.messages", queue_limit);
	es_kafka_conf_set(conf, "enable.idempotence", "true");
	es_kafka_conf_set(conf, "partitioner", "murmur2_random");
	es_kafka_conf_set(conf, "message.timeout.ms", "0");
	rd_kafka_conf_set_dr_msg_cb(conf, relay_delivery_report);
	relay_kafka = es_kafka_open(RD_KAFKA_PRODUCER, conf, "relay");
	relay_kafka->on_error = relay_on_client_error;
	if (topic_prefix_used != NULL)
		pfree(topic_prefix_used);
	topic_prefix_used = MemoryContextStrdup(TopMemoryContext, es_topic_prefix ? es_topic_prefix : "");
}

/*
 * Throws the producer away (purging what it holds; late reports are
 * ignored by generation) and forgets the messages in flight: the window
 * re-reads them from the first unsettled one.
 */
static void
relay_drop_producer(void)
{
	for (int i = 0; i < ntopics; i++)
	{
		rd_kafka_topic_destroy(topics[i].rkt);
		pfree(topics[i].logical);
	}
	ntopics = 0;
	generation++;
	es_kafka_close(relay_kafka);
	relay_kafka = NULL;
	ring_head = ring_tail = 0;
}

/* on_proc_exit: drops the producer; unacknowledged rows are re-sent after a restart. */
static void
relay_close_producer(int code, Datum arg)
{
	(void) code;
	(void) arg;
	if (relay_kafka != NULL)
		relay_drop_producer();
}

/* Client errors (served on this thread): broker state and last error for outbox_status. */
static void
relay_on_client_error(rd_kafka_resp_err_t err, const char *reason)
{
	char		text[256];

	if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN)
		es_relay_stats_broker_state(ES_BROKER_DOWN);
	snprintf(text, sizeof(text), "%s: %s", rd_kafka_err2name(err), reason);
	es_relay_stats_error(text);
}

/*
 * Moves security events queued by failed logins (whose own transactions
 * rolled back) into the outbox, so they are published without waiting for
 * the next successful login.
 */
static void
relay_flush_deferred_events(void)
{
	if (!es_deferred_events_pending())
		return;
	es_worker_begin("eventshop relay: flushing security events");
	if (SPI_execute("SELECT eventshop.flush_security_events()", false, 0) != SPI_OK_SELECT)
		elog(ERROR, "eventshop relay: flushing security events failed");
	es_worker_commit();
}

/* Produces one row (the window reader's callback); the ring has room for it. */
static void
relay_emit(const RelayRow *row, void *arg)
{
	uint64		seq = ring_tail++;
	RelayMessage *m = &ring[seq % ring_size];
	rd_kafka_resp_err_t err;

	(void) arg;
	m->id = row->id;
	m->created_at = row->created_at;
	m->state = MSG_PENDING;
	m->error = NULL;

	for (;;)
	{
		err = rd_kafka_producev(relay_kafka->rk,
								RD_KAFKA_V_RKT(relay_topic(row->topic)),
								RD_KAFKA_V_KEY(row->key, (size_t) row->key_len),
								RD_KAFKA_V_VALUE((void *) row->payload, (size_t) row->payload_len),
								RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
								RD_KAFKA_V_HEADER("ce_id", row->event_id, -1),
								RD_KAFKA_V_HEADER("ce_type", row->event_type, -1),
								RD_KAFKA_V_OPAQUE((void *) (uintptr_t) (((uint64) generation << 32) | (seq % ring_size))),
								RD_KAFKA_V_END);
		if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
			break;
		rd_kafka_poll(relay_kafka->rk, 10);		/* make room (reports only mark the ring) */
	}
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		return;
	m->error = rd_kafka_err2str(err);
	m->state = relay_permanent_error(err) ? MSG_PARK : MSG_FAILED;
	relay_note_message_error(m);
}

/* The librdkafka topic handle for a logical topic (with eventshop.topic_prefix). */
static rd_kafka_topic_t *
relay_topic(const char *logical)
{
	for (int i = 0; i < ntopics; i++)
		if (strcmp(topics[i].logical, logical) == 0)
			return topics[i].rkt;
	if (ntopics == lengthof(topics))
		elog(ERROR, "eventshop relay: too many distinct topics");
	topics[ntopics].logical = MemoryContextStrdup(TopMemoryContext, logical);
	topics[ntopics].rkt = rd_kafka_topic_new(relay_kafka->rk, es_kafka_topic_name(logical), NULL);
	if (topics[ntopics].rkt == NULL)
		elog(ERROR, "eventshop relay: could not create topic handle for \"%s\": %s", logical,
			 rd_kafka_err2str(rd_kafka_last_error()));
	return topics[ntopics++].rkt;
}

/* Delivery report (served by rd_kafka_poll on this thread): marks its ring slot. */
static void
relay_delivery_report(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque)
{
	uint64		tag = (uint64) (uintptr_t) msg->_private;
	RelayMessage *m;

	(void) rk;
	(void) opaque;
	if ((uint32) (tag >> 32) != generation || (tag & 0xffffffff) >= ring_size)
		return;					/* from a producer we threw away */
	m = &ring[tag & 0xffffffff];
	if (m->state != MSG_PENDING)
		return;
	if (msg->err == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		m->state = MSG_ACKED;
		es_relay_stats_acknowledged(m->created_at, GetCurrentTimestamp());
		return;
	}
	m->error = rd_kafka_err2str(msg->err);
	m->state = relay_permanent_error(msg->err) ? MSG_PARK : MSG_FAILED;
	relay_note_message_error(m);
}

/* Counts a per-message error and keeps it as the last error (no allocation: may run in a report). */
static void
relay_note_message_error(const RelayMessage *m)
{
	char		text[256];

	snprintf(text, sizeof(text), "event %lld: %s", (long long) m->id, m->error);
	es_relay_stats_error(text);
}

/* Errors that re-sending cannot fix: the message itself or its topic is refused. */
static bool
relay_permanent_error(rd_kafka_resp_err_t err)
{
	switch (err)
	{
		case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE:
		case RD_KAFKA_RESP_ERR_INVALID_MSG:
		case RD_KAFKA_RESP_ERR_INVALID_MSG_SIZE:
		case RD_KAFKA_RESP_ERR_INVALID_RECORD:
		case RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE:
		case RD_KAFKA_RESP_ERR_TOPIC_EXCEPTION:
		case RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED:
		case RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART:
		case RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC:
		case RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION:
		case RD_KAFKA_RESP_ERR_POLICY_VIOLATION:
		case RD_KAFKA_RESP_ERR__INVALID_ARG:
			return true;
		default:
			return false;
	}
}

/*
 * Advances over settled messages at the head of the ring, in order: the
 * window's acked_id follows, refused rows are queued for parking, and a
 * failed message stops everything for a re-send.
 */
static void
relay_settle(void)
{
	while (ring_head < ring_tail)
	{
		RelayMessage *m = &ring[ring_head % ring_size];

		if (m->state == MSG_PENDING)
			break;
		if (m->state == MSG_FAILED)
		{
			resend_needed = true;
			return;
		}
		if (m->state == MSG_PARK)
			relay_park(m->id, m->error);
		else
			window.published_total++;
		window.acked_id = m->id;
		window.dirty = true;
		ring_head++;
	}
	if (ring_head == ring_tail && window.open && window.acked_id != window.read_id)
	{
		/* nothing in flight: every row read so far is settled */
		window.acked_id = window.read_id;
		window.dirty = true;
	}
}

static void
relay_park(int64 id, const char *error)
{
	ereport(LOG,
			(errmsg("eventshop relay: event %lld was refused by Kafka and is parked: %s", (long long) id, error),
			 errhint("See eventshop.parked_events; retry it with eventshop.retry_parked_event(%lld) or discard it with eventshop.discard_parked_event(%lld).",
					 (long long) id, (long long) id)));
	parked_ids[nparked] = id;
	parked_errors[nparked] = (char *) error;
	nparked++;
	es_relay_stats_parked(1);
	if (nparked == (int) ring_size)
		relay_checkpoint();
}

/* Stores the checkpoint (with the rows to park) in one transaction. */
static void
relay_checkpoint(void)
{
	relay_window_save(&window, nparked, parked_ids, parked_errors);
	nparked = 0;
}

static uint32
relay_in_flight(void)
{
	return (uint32) (ring_tail - ring_head);
}
