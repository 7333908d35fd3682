/*
 * relay.c
 *		The outbox relay worker: publishes eventshop.outbox rows to Kafka with
 *		librdkafka's idempotent producer and deletes each row only after the
 *		broker acknowledged it (delivery report, not local enqueue).
 *
 * Delivery guarantees:
 *	- At-least-once. A row is read in one transaction, produced, and deleted
 *	  in a later transaction only once its delivery report says the broker
 *	  has it. A crash between the two re-sends the row (a duplicate with the
 *	  same ce_id), it never loses it.
 *	- No skipped rows. Rows are deleted, not tracked by a watermark, so a
 *	  row whose transaction commits after rows with higher ids is simply
 *	  picked up by the next batch.
 *	- Per-key order. Rows are produced in id order through one idempotent
 *	  producer, which keeps per-partition order across retries; keys map to
 *	  partitions with murmur2 as Java clients do.
 *	- No transaction is held open while waiting for the broker, so a broker
 *	  outage blocks nothing but the relay itself.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "config.h"
#include "kafka_client.h"
#include "login_throttle.h"
#include "worker_runtime.h"

PGDLLEXPORT void eventshop_relay_main(Datum main_arg);

/* Longest pause between batches after delivery failures. */
#define RELAY_MAX_BACKOFF_MS	30000
/* Safety net: re-check the outbox this often even without a wake-up. */
#define RELAY_IDLE_TIMEOUT_MS	10000

/* One outbox row in flight. */
typedef struct RelayMessage
{
	int64		id;
	char	   *topic;
	char	   *key;
	char	   *event_id;
	char	   *event_type;
	char	   *payload;
	bool		done;			/* delivery report received (or produce failed) */
	rd_kafka_resp_err_t err;	/* RD_KAFKA_RESP_ERR_NO_ERROR once acknowledged */
} RelayMessage;

typedef struct RelayBatch
{
	RelayMessage *messages;
	int			count;
	int			outstanding;	/* produced, no delivery report yet */
} RelayBatch;

static EsKafka *relay_kafka = NULL;
static RelayBatch *current_batch = NULL;	/* target of delivery reports */
static MemoryContext batch_context = NULL;

static void relay_open_producer(void);
static void relay_close_producer(int code, Datum arg);
static void relay_flush_deferred_events(void);
static int	relay_read_batch(RelayBatch *batch);
static void relay_produce_batch(RelayBatch *batch);
static bool relay_await_acknowledgements(RelayBatch *batch);
static int	relay_settle_batch(RelayBatch *batch);
static void relay_delivery_report(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque);
static long relay_next_backoff(long backoff_ms);

/* Worker entry point: publish batches until SIGTERM, sleeping on latch + Kafka when idle. */
void
eventshop_relay_main(Datum main_arg)
{
	long		backoff_ms = 0;

	(void) main_arg;
	es_worker_start(ES_WORKER_RELAY);
	on_proc_exit(relay_close_producer, (Datum) 0);
	batch_context = AllocSetContextCreate(TopMemoryContext, "eventshop relay batch",
										  ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		RelayBatch	batch = {0};
		int			failed;
		bool		reloaded;

		if (!es_worker_extension_ready())
		{
			es_worker_wait(RELAY_IDLE_TIMEOUT_MS, PGINVALID_SOCKET);
			continue;
		}
		if (relay_kafka != NULL && (relay_kafka->fatal || es_kafka_settings_changed(relay_kafka)))
		{
			es_kafka_close(relay_kafka);
			relay_kafka = NULL;
		}
		if (relay_kafka == NULL)
			relay_open_producer();

		MemoryContextReset(batch_context);
		relay_flush_deferred_events();
		if (relay_read_batch(&batch) > 0)
		{
			relay_produce_batch(&batch);
			if (!relay_await_acknowledgements(&batch))
				continue;		/* producer became unusable; rebuild and resend */
			failed = relay_settle_batch(&batch);
			backoff_ms = failed > 0 ? relay_next_backoff(backoff_ms) : 0;
			if (backoff_ms == 0 && batch.count == es_relay_batch_size)
			{
				es_worker_check_interrupts();
				continue;		/* more rows are likely waiting */
			}
		}

		/* Idle (or backing off): sleep until a commit wakes us or Kafka has news. */
		reloaded = es_worker_wait(backoff_ms > 0 ? backoff_ms : RELAY_IDLE_TIMEOUT_MS,
								  relay_kafka->wake_pipe[0]);
		es_kafka_drain_wakeups(relay_kafka);
		rd_kafka_poll(relay_kafka->rk, 0);
		if (reloaded)
			backoff_ms = 0;
	}
}

/* Builds the idempotent producer from the current settings. */
static void
relay_open_producer(void)
{
	rd_kafka_conf_t *conf = es_kafka_conf_new("relay");

	es_kafka_conf_set(conf, "enable.idempotence", "true");
	es_kafka_conf_set(conf, "partitioner", "murmur2_random");
	es_kafka_conf_set(conf, "linger.ms", "1");
	es_kafka_conf_set(conf, "message.timeout.ms", "30000");
	rd_kafka_conf_set_dr_msg_cb(conf, relay_delivery_report);
	relay_kafka = es_kafka_open(RD_KAFKA_PRODUCER, conf, "relay");
}

/* on_proc_exit: drops the producer; unacknowledged rows stay in the outbox. */
static void
relay_close_producer(int code, Datum arg)
{
	(void) code;
	(void) arg;
	es_kafka_close(relay_kafka);
	relay_kafka = NULL;
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

/* Reads up to eventshop.relay_batch_size rows, oldest first, into batch_context. */
static int
relay_read_batch(RelayBatch *batch)
{
	Oid			argtypes[1] = {INT4OID};
	Datum		args[1] = {Int32GetDatum(es_relay_batch_size)};
	MemoryContext oldcontext;
	int			rc;

	es_worker_begin("eventshop relay: reading outbox");
	rc = SPI_execute_with_args(
							   "SELECT id, topic, message_key, event_id::text, event_type, payload::text "
							   "FROM eventshop.outbox ORDER BY id LIMIT $1",
							   1, argtypes, args, NULL, true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "eventshop relay: reading the outbox failed: %s", SPI_result_code_string(rc));

	oldcontext = MemoryContextSwitchTo(batch_context);
	batch->count = (int) SPI_processed;
	batch->messages = palloc0(sizeof(RelayMessage) * Max(batch->count, 1));
	for (int i = 0; i < batch->count; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		RelayMessage *m = &batch->messages[i];
		bool		isnull;

		m->id = DatumGetInt64(SPI_getbinval(tuple, desc, 1, &isnull));
		m->topic = es_kafka_topic_name(SPI_getvalue(tuple, desc, 2));
		m->key = SPI_getvalue(tuple, desc, 3);
		m->event_id = SPI_getvalue(tuple, desc, 4);
		m->event_type = SPI_getvalue(tuple, desc, 5);
		m->payload = SPI_getvalue(tuple, desc, 6);
	}
	MemoryContextSwitchTo(oldcontext);
	es_worker_commit();
	return batch->count;
}

/* Hands every message of the batch to librdkafka, in id order. */
static void
relay_produce_batch(RelayBatch *batch)
{
	current_batch = batch;
	for (int i = 0; i < batch->count; i++)
	{
		RelayMessage *m = &batch->messages[i];
		rd_kafka_resp_err_t err;

		for (;;)
		{
			err = rd_kafka_producev(relay_kafka->rk,
									RD_KAFKA_V_TOPIC(m->topic),
									RD_KAFKA_V_KEY(m->key, strlen(m->key)),
									RD_KAFKA_V_VALUE(m->payload, strlen(m->payload)),
									RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
									RD_KAFKA_V_HEADER("ce_id", m->event_id, -1),
									RD_KAFKA_V_HEADER("ce_type", m->event_type, -1),
									RD_KAFKA_V_OPAQUE((void *) (intptr_t) i),
									RD_KAFKA_V_END);
			if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
				break;
			/* local queue full: serve delivery reports to make room */
			rd_kafka_poll(relay_kafka->rk, 100);
			es_worker_check_interrupts();
		}
		if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
			batch->outstanding++;
		else
		{
			m->done = true;
			m->err = err;
		}
	}
}

/*
 * Waits until every produced message has a delivery report. Returns false
 * if the producer hit a fatal error: its reports will never come, so the
 * caller rebuilds it and the rows, still in the outbox, are sent again.
 */
static bool
relay_await_acknowledgements(RelayBatch *batch)
{
	for (;;)
	{
		es_kafka_drain_wakeups(relay_kafka);
		rd_kafka_poll(relay_kafka->rk, 0);
		if (batch->outstanding == 0)
			break;
		if (relay_kafka->fatal)
		{
			current_batch = NULL;
			return false;
		}
		es_worker_wait(1000, relay_kafka->wake_pipe[0]);
	}
	current_batch = NULL;
	return true;
}

/*
 * Deletes the acknowledged rows and records the error on the others, in one
 * transaction. Returns the number of failed rows.
 */
static int
relay_settle_batch(RelayBatch *batch)
{
	Datum	   *acked = palloc(sizeof(Datum) * batch->count);
	Datum	   *failed_ids = palloc(sizeof(Datum) * batch->count);
	Datum	   *failed_errors = palloc(sizeof(Datum) * batch->count);
	int			nacked = 0;
	int			nfailed = 0;
	rd_kafka_resp_err_t first_error = RD_KAFKA_RESP_ERR_NO_ERROR;

	for (int i = 0; i < batch->count; i++)
	{
		RelayMessage *m = &batch->messages[i];

		if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR)
			acked[nacked++] = Int64GetDatum(m->id);
		else
		{
			failed_ids[nfailed] = Int64GetDatum(m->id);
			failed_errors[nfailed] = CStringGetTextDatum(rd_kafka_err2str(m->err));
			if (nfailed++ == 0)
				first_error = m->err;
		}
	}

	es_worker_begin("eventshop relay: settling batch");
	if (nacked > 0)
	{
		Oid			argtypes[1] = {INT8ARRAYOID};
		Datum		args[1];

		args[0] = PointerGetDatum(construct_array(acked, nacked, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
		if (SPI_execute_with_args("DELETE FROM eventshop.outbox WHERE id = ANY ($1)",
								  1, argtypes, args, NULL, false, 0) != SPI_OK_DELETE)
			elog(ERROR, "eventshop relay: deleting published rows failed");
	}
	if (nfailed > 0)
	{
		Oid			argtypes[2] = {INT8ARRAYOID, TEXTARRAYOID};
		Datum		args[2];

		args[0] = PointerGetDatum(construct_array(failed_ids, nfailed, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
		args[1] = PointerGetDatum(construct_array(failed_errors, nfailed, TEXTOID, -1, false, TYPALIGN_INT));
		if (SPI_execute_with_args("UPDATE eventshop.outbox o SET attempts = o.attempts + 1, last_error = f.error "
								  "FROM unnest($1, $2) AS f(id, error) WHERE o.id = f.id",
								  2, argtypes, args, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "eventshop relay: recording delivery errors failed");
		ereport(LOG,
				(errmsg("eventshop relay: %d of %d events were not acknowledged by Kafka and will be retried",
						nfailed, batch->count),
				 errdetail("First error: %s.", rd_kafka_err2str(first_error))));
	}
	es_worker_commit();
	return nfailed;
}

/* Delivery report (served by rd_kafka_poll on this thread): marks the message acknowledged or failed. */
static void
relay_delivery_report(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque)
{
	intptr_t	index = (intptr_t) msg->_private;
	RelayMessage *m;

	(void) rk;
	(void) opaque;
	if (current_batch == NULL || index < 0 || index >= current_batch->count)
		return;					/* a report for a batch we gave up on */
	m = &current_batch->messages[index];
	if (m->done)
		return;
	m->done = true;
	m->err = msg->err;
	current_batch->outstanding--;
}

/* Doubles the pause after a failed batch, from 1 s up to RELAY_MAX_BACKOFF_MS. */
static long
relay_next_backoff(long backoff_ms)
{
	return backoff_ms == 0 ? 1000 : Min(backoff_ms * 2, RELAY_MAX_BACKOFF_MS);
}
