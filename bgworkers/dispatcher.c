/*
 * dispatcher.c
 *		The dispatcher worker: consumes events from Kafka into the inbox and
 *		queues the notifications they ask for (the sender workers, sender.c,
 *		send them).
 *
 * Each notification is created exactly once:
 *	- The consumer's progress lives in eventshop.consumer_offsets, written
 *	  once per partition per batch (eventshop._store_consumer_offsets) in the
 *	  transaction that holds the inbox rows, audit rows and notifications the
 *	  batch's events produced. When partitions are assigned, the consumer
 *	  starts from those offsets, so a crash, restart or rebalance re-reads at
 *	  most the events of a batch that did not commit, and the inbox (keyed by
 *	  event id) turns a redelivered event into a no-op.
 *	- Offsets are also committed to Kafka, strictly after the database
 *	  commit. On assignment the consumer starts at the later of the two: the
 *	  database's offset, or Kafka's when another server of the same group
 *	  consumed the partition further meanwhile (its own database holds those
 *	  events), so several servers in one group split the partitions without
 *	  handling an event twice.
 *	- Every DISPATCHER_WATERMARK_INTERVAL_MS the high watermarks of the
 *	  assigned partitions are recorded in eventshop.consumer_watermarks, for
 *	  the eventshop.consumer_lag view.
 *	- A message that is no valid event (payload not UTF-8, NUL bytes, over
 *	  1 MB, not JSON, no id) is recorded in eventshop.rejected_events and
 *	  skipped. If a batch fails on some message's data all the same, it is
 *	  replayed one message per transaction and only the culprit is recorded
 *	  as rejected, so bad input can neither crash nor wedge the worker.
 *
 * librdkafka's callbacks (logs, errors, rebalances, commit results) are
 * served by rd_kafka_consumer_poll() on this thread, which is only called
 * outside transactions: the rebalance callback runs its own.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "config.h"
#include "kafka_client.h"
#include "worker_runtime.h"

PGDLLEXPORT void eventshop_dispatcher_main(Datum main_arg);

/* Longest sleep without a wake-up; also the pause while the extension is missing. */
#define DISPATCHER_IDLE_TIMEOUT_MS	10000
/* Larger payloads are rejected without being parsed. */
#define DISPATCHER_MAX_PAYLOAD		(1024 * 1024)
/* Longer ce_id or ce_type headers get the message rejected. */
#define DISPATCHER_MAX_HEADER		1024
/* Longest wait for the broker when leaving the consumer group. */
#define DISPATCHER_LEAVE_TIMEOUT_MS	2000
/* How often the assigned partitions' watermarks are recorded, for the lag view. */
#define DISPATCHER_WATERMARK_INTERVAL_MS	5000
/* Unchanged watermarks are written again only this often, so an idle server writes little WAL. */
#define DISPATCHER_WATERMARK_REFRESH_MS	60000
/* Longest wait for Kafka's committed offsets when partitions are assigned. */
#define DISPATCHER_COMMITTED_TIMEOUT_MS	5000

/* A statement planned on first use and kept for the life of the worker. */
typedef struct DispatcherQuery
{
	const char *sql;
	int			nargs;
	Oid			argtypes[7];
	SPIPlanPtr	plan;
} DispatcherQuery;

static DispatcherQuery ingest_query = {
	.sql = "SELECT eventshop._ingest_event($1, $2, $3, $4, $5, $6)",
	.nargs = 6,
	.argtypes = {TEXTOID, INT4OID, INT8OID, TEXTOID, TEXTOID, TEXTOID}
};
static DispatcherQuery ingest_batch_query = {
	.sql = "SELECT eventshop._ingest_events($1, $2, $3, $4, $5, $6)",
	.nargs = 6,
	.argtypes = {TEXTARRAYOID, INT4ARRAYOID, INT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID}
};
static DispatcherQuery store_offsets_query = {
	.sql = "SELECT eventshop._store_consumer_offsets($1, $2, $3, $4)",
	.nargs = 4,
	.argtypes = {TEXTOID, TEXTARRAYOID, INT4ARRAYOID, INT8ARRAYOID}
};
static DispatcherQuery watermarks_query = {
	.sql = "SELECT eventshop._record_watermarks($1, $2, $3, $4, $5)",
	.nargs = 5,
	.argtypes = {TEXTOID, TEXTARRAYOID, INT4ARRAYOID, INT8ARRAYOID, INT8ARRAYOID}
};
static DispatcherQuery offset_query = {
	.sql = "SELECT next_offset FROM eventshop.consumer_offsets "
	"WHERE group_id = $1 AND topic = $2 AND partition = $3",
	.nargs = 3,
	.argtypes = {TEXTOID, TEXTOID, INT4OID}
};
static EsKafka *dispatcher_kafka = NULL;
static MemoryContext loop_context = NULL;	/* reset once per main-loop round */

/* Messages polled but not yet ingested; destroyed before the consumer is. */
static rd_kafka_message_t **held_messages = NULL;
static int	held_count = 0;

/* Set by the rebalance callback, to end the current poll round. */
static bool rebalanced = false;
/* True while the rebalance callback runs (inside librdkafka). */
static bool in_rebalance = false;
/* An ERROR caught in the rebalance callback, raised again once the poll returned. */
static ErrorData *rebalance_error = NULL;
/* eventshop.dispatcher_topics as subscribed, to resubscribe when a reload changes it. */
static char *subscribed_topics = NULL;
/* When the watermarks were last looked at, last written, and a digest of what was written. */
static TimestampTz watermarks_recorded_at = 0;
static TimestampTz watermarks_written_at = 0;
static uint64 watermarks_digest = 0;

static void dispatcher_open_consumer(void);
static void dispatcher_close_consumer(void);
static void dispatcher_leave_group(void);
static void dispatcher_cleanup(int code, Datum arg);
static rd_kafka_topic_partition_list_t *dispatcher_topic_list(void);
static const char *dispatcher_logical_topic(const char *topic);
static void dispatcher_run(DispatcherQuery *query, Datum *values, const char *nulls);
static bool dispatcher_consume(void);
static int	dispatcher_poll_batch(int batch_size);
static void dispatcher_release_messages(void);
static void dispatcher_log_message_error(const rd_kafka_message_t *msg);
static void dispatcher_ingest(rd_kafka_message_t **msgs, int count, bool as_rejected);
static void dispatcher_retry_ingest(rd_kafka_message_t **msgs, int count, const ErrorData *edata);
static bool dispatcher_is_data_error(int sqlerrcode);
static bool dispatcher_ingest_message(const rd_kafka_message_t *msg, bool as_rejected);
static int	dispatcher_ingest_batch(rd_kafka_message_t **msgs, int count);
static void dispatcher_message_values(const rd_kafka_message_t *msg, bool as_rejected,
									  Datum *values, char *nulls);
static bool dispatcher_read_header(const rd_kafka_message_t *msg, const char *name,
								   Datum *value, char *isnull);
static bool dispatcher_valid_text(const void *data, size_t length, size_t max_length);
static Datum dispatcher_text_datum(const void *data, size_t length);
static void dispatcher_commit_offsets(rd_kafka_message_t **msgs, int count);
static void dispatcher_commit_result(rd_kafka_t *rk, rd_kafka_resp_err_t err,
									 rd_kafka_topic_partition_list_t *offsets, void *opaque);
static void dispatcher_rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
								 rd_kafka_topic_partition_list_t *partitions, void *opaque);
static bool dispatcher_load_offsets(rd_kafka_topic_partition_list_t *partitions);
static void dispatcher_log_assignment(const char *what, const rd_kafka_topic_partition_list_t *partitions);
static void dispatcher_store_offsets(rd_kafka_message_t **msgs, int count);
static void dispatcher_apply_committed(rd_kafka_t *rk, rd_kafka_topic_partition_list_t *partitions);
static bool dispatcher_topics_changed(void);
static void dispatcher_record_watermarks(void);
static Datum dispatcher_array(Datum *elems, int count, Oid elemtype, const bool *elem_nulls);

/*
 * Worker entry point: ingest a batch from Kafka,
 * then sleep until Kafka has news or a signal arrives.
 */
void
eventshop_dispatcher_main(Datum main_arg)
{
	(void) main_arg;
	es_worker_start(ES_WORKER_DISPATCHER);
	on_proc_exit(dispatcher_cleanup, (Datum) 0);
	loop_context = AllocSetContextCreate(TopMemoryContext, "eventshop dispatcher",
										 ALLOCSET_DEFAULT_SIZES);

	while (!es_worker_extension_ready())
		es_worker_wait(DISPATCHER_IDLE_TIMEOUT_MS, PGINVALID_SOCKET);
	dispatcher_open_consumer();

	for (;;)
	{
		bool		more;

		MemoryContextReset(loop_context);
		MemoryContextSwitchTo(loop_context);
		more = dispatcher_consume();

		/* forget wake-ups that came during the round, then serve interrupts */
		ResetLatch(MyLatch);
		es_worker_check_interrupts();
		if (!more)
			es_worker_wait(DISPATCHER_IDLE_TIMEOUT_MS, dispatcher_kafka->wake_pipe[0]);

		if (dispatcher_kafka->fatal || es_kafka_settings_changed(dispatcher_kafka) ||
			dispatcher_topics_changed())
		{
			ereport(LOG,
					(errmsg("eventshop dispatcher: recreating the Kafka consumer")));
			dispatcher_close_consumer();
			dispatcher_open_consumer();
		}
	}
}

/* Creates the consumer and subscribes it; offsets come from the rebalance callback. */
static void
dispatcher_open_consumer(void)
{
	rd_kafka_conf_t *conf = es_kafka_conf_new("dispatcher");
	rd_kafka_topic_partition_list_t *topics;
	rd_kafka_resp_err_t err;

	es_kafka_conf_set(conf, "group.id", es_dispatcher_group);
	es_kafka_conf_set(conf, "enable.auto.commit", "false");
	es_kafka_conf_set(conf, "enable.auto.offset.store", "false");
	es_kafka_conf_set(conf, "auto.offset.reset", "earliest");
	rd_kafka_conf_set_rebalance_cb(conf, dispatcher_rebalance);
	rd_kafka_conf_set_offset_commit_cb(conf, dispatcher_commit_result);
	dispatcher_kafka = es_kafka_open(RD_KAFKA_CONSUMER, conf, "dispatcher");

	topics = dispatcher_topic_list();
	if (subscribed_topics != NULL)
		pfree(subscribed_topics);
	subscribed_topics = MemoryContextStrdup(TopMemoryContext, es_dispatcher_topics);
	watermarks_recorded_at = 0;
	watermarks_digest = 0;
	err = rd_kafka_subscribe(dispatcher_kafka->rk, topics);
	rd_kafka_topic_partition_list_destroy(topics);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("eventshop dispatcher: could not subscribe to \"%s\": %s",
						es_dispatcher_topics, rd_kafka_err2str(err))));
	ereport(LOG,
			(errmsg("eventshop dispatcher: consuming \"%s\" as group \"%s\"",
					es_dispatcher_topics, es_dispatcher_group)));
}

/*
 * Leaves the group and destroys the consumer. If the worker is exiting from
 * inside the rebalance callback (SIGTERM while it ran SQL), the handle is
 * left alone: librdkafka must not be re-entered from its own callback.
 */
static void
dispatcher_close_consumer(void)
{
	if (dispatcher_kafka == NULL || in_rebalance)
		return;
	dispatcher_release_messages();
	dispatcher_leave_group();
	es_kafka_close(dispatcher_kafka);
	dispatcher_kafka = NULL;
}

/*
 * Leaves the consumer group, waiting at most DISPATCHER_LEAVE_TIMEOUT_MS for
 * the broker, so that a restarted worker gets its partitions back at once
 * instead of after the session timeout of the member it replaces. The
 * revocation is served by dispatcher_rebalance, which runs no SQL for it.
 */
static void
dispatcher_leave_group(void)
{
	rd_kafka_t *rk = dispatcher_kafka->rk;
	rd_kafka_queue_t *queue;
	rd_kafka_error_t *error;
	TimestampTz deadline;

	if (dispatcher_kafka->fatal)
		return;
	queue = rd_kafka_queue_new(rk);
	error = rd_kafka_consumer_close_queue(rk, queue);
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), DISPATCHER_LEAVE_TIMEOUT_MS);
	if (error != NULL)
		rd_kafka_error_destroy(error);
	else
		while (!rd_kafka_consumer_closed(rk) && GetCurrentTimestamp() < deadline)
			rd_kafka_queue_poll_callback(queue, 100);
	rd_kafka_queue_destroy(queue);
}

/* on_proc_exit: frees the consumer, also after an ERROR ended the worker. */
static void
dispatcher_cleanup(int code, Datum arg)
{
	(void) code;
	(void) arg;
	dispatcher_close_consumer();
}

/* The subscription: eventshop.dispatcher_topics split at commas, each with the topic prefix. */
static rd_kafka_topic_partition_list_t *
dispatcher_topic_list(void)
{
	rd_kafka_topic_partition_list_t *topics = rd_kafka_topic_partition_list_new(8);
	char	   *copy = pstrdup(es_dispatcher_topics);
	char	   *saveptr = NULL;

	for (char *topic = strtok_r(copy, ", \t", &saveptr); topic != NULL;
		 topic = strtok_r(NULL, ", \t", &saveptr))
	{
		char	   *name = es_kafka_topic_name(topic);

		rd_kafka_topic_partition_list_add(topics, name, RD_KAFKA_PARTITION_UA);
		pfree(name);
	}
	pfree(copy);
	if (topics->cnt == 0)
	{
		rd_kafka_topic_partition_list_destroy(topics);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("eventshop.dispatcher_topics names no topic")));
	}
	return topics;
}

/* The topic name without eventshop.topic_prefix, as the tables store it. */
static const char *
dispatcher_logical_topic(const char *topic)
{
	size_t		prefix_length = es_topic_prefix ? strlen(es_topic_prefix) : 0;

	if (prefix_length > 0 && strncmp(topic, es_topic_prefix, prefix_length) == 0)
		return topic + prefix_length;
	return topic;
}

/*
 * Executes a SELECT through its kept plan (prepared on first use). After
 * DROP EXTENSION the plan fails with an ERROR, which ends the worker; the
 * restarted worker waits for the extension again.
 */
static void
dispatcher_run(DispatcherQuery *query, Datum *values, const char *nulls)
{
	int			rc;

	if (query->plan == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(query->sql, query->nargs, query->argtypes);

		if (plan == NULL)
			elog(ERROR, "eventshop dispatcher: could not prepare \"%s\": %s",
				 query->sql, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "eventshop dispatcher: could not keep the plan of \"%s\"", query->sql);
		query->plan = plan;
	}
	rc = SPI_execute_plan(query->plan, values, nulls, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "eventshop dispatcher: \"%s\" failed: %s", query->sql, SPI_result_code_string(rc));
}

/*
 * Ingests one batch of messages and mirrors its offsets to Kafka. Returns
 * true when the round ended early (full batch, rebalance), so the caller
 * goes on without sleeping: messages already queued would not write to the
 * wake-up pipe again.
 */
static bool
dispatcher_consume(void)
{
	int			batch_size = es_dispatcher_batch_size;
	int			count = dispatcher_poll_batch(batch_size);

	if (count > 0)
	{
		dispatcher_ingest(held_messages, count, false);
		dispatcher_commit_offsets(held_messages, count);
	}
	dispatcher_release_messages();
	if (TimestampDifferenceExceeds(watermarks_recorded_at, GetCurrentTimestamp(),
								   DISPATCHER_WATERMARK_INTERVAL_MS))
		dispatcher_record_watermarks();
	return count == batch_size || rebalanced;
}

/*
 * Polls, without blocking, up to batch_size messages into held_messages.
 * Serves librdkafka's callbacks on the way, so it must run outside any
 * transaction; message errors are logged and skipped.
 */
static int
dispatcher_poll_batch(int batch_size)
{
	Assert(!IsTransactionState());
	held_messages = MemoryContextAlloc(loop_context, sizeof(rd_kafka_message_t *) * batch_size);
	held_count = 0;
	rebalanced = false;
	es_kafka_drain_wakeups(dispatcher_kafka);

	while (held_count < batch_size && !rebalanced)
	{
		rd_kafka_message_t *msg = rd_kafka_consumer_poll(dispatcher_kafka->rk, 0);

		if (rebalance_error != NULL)
		{
			ErrorData  *edata = rebalance_error;

			rebalance_error = NULL;
			if (msg != NULL)
				rd_kafka_message_destroy(msg);
			ReThrowError(edata);
		}
		if (msg == NULL)
			break;
		if (msg->err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			dispatcher_log_message_error(msg);
			rd_kafka_message_destroy(msg);
			continue;
		}
		held_messages[held_count++] = msg;
	}
	return held_count;
}

/* Hands the polled messages back to librdkafka. */
static void
dispatcher_release_messages(void)
{
	for (int i = 0; i < held_count; i++)
		rd_kafka_message_destroy(held_messages[i]);
	held_count = 0;
	held_messages = NULL;
}

/* Logs a consumer error (unknown topic, broker trouble), rate-limited; partition EOF is no error. */
static void
dispatcher_log_message_error(const rd_kafka_message_t *msg)
{
	char		reason[512];

	if (msg->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
		return;
	snprintf(reason, sizeof(reason), "%s [%d]: %s",
			 msg->rkt ? rd_kafka_topic_name(msg->rkt) : "-", (int) msg->partition,
			 rd_kafka_message_errstr(msg));
	es_kafka_log_error(dispatcher_kafka, msg->err, reason);
}

/*
 * Ingests messages in one transaction. When the batch fails on a message's
 * data, it is replayed message by message, and a single failing message is
 * recorded as rejected (as_rejected: only its offset, no content). Other
 * errors (database trouble, extension dropped) end the worker as usual.
 */
static void
dispatcher_ingest(rd_kafka_message_t **msgs, int count, bool as_rejected)
{
	PG_TRY();
	{
		int			rejected = 0;

		es_worker_begin("eventshop dispatcher: ingesting events");
		if (count > 1 && !as_rejected)
			rejected = dispatcher_ingest_batch(msgs, count);
		else
			for (int i = 0; i < count; i++)
				rejected += dispatcher_ingest_message(msgs[i], as_rejected) ? 1 : 0;
		dispatcher_store_offsets(msgs, count);
		es_worker_commit();
		if (rejected > 0 && !as_rejected)
			ereport(LOG,
					(errmsg("eventshop dispatcher: %d of %d consumed messages were not valid events",
							rejected, count),
					 errhint("See eventshop.rejected_events.")));
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(loop_context);
		edata = CopyErrorData();
		if (as_rejected || !dispatcher_is_data_error(edata->sqlerrcode))
			PG_RE_THROW();
		FlushErrorState();
		AbortCurrentTransaction();
		dispatcher_retry_ingest(msgs, count, edata);
	}
	PG_END_TRY();
}

/* After a failed batch: replays it one message at a time, or rejects the lone culprit. */
static void
dispatcher_retry_ingest(rd_kafka_message_t **msgs, int count, const ErrorData *edata)
{
	if (count > 1)
	{
		ereport(LOG,
				(errmsg("eventshop dispatcher: a batch of %d events failed; ingesting them one at a time",
						count),
				 errdetail("%s", edata->message)));
		for (int i = 0; i < count; i++)
			dispatcher_ingest(&msgs[i], 1, false);
		return;
	}
	ereport(WARNING,
			(errmsg("eventshop dispatcher: rejecting the message at %s [%d] offset " INT64_FORMAT,
					rd_kafka_topic_name(msgs[0]->rkt), (int) msgs[0]->partition,
					(int64) msgs[0]->offset),
			 errdetail("%s", edata->message)));
	dispatcher_ingest(msgs, 1, true);
}

/*
 * Whether an error is the message's fault: bad data (class 22), a violated
 * constraint (23) or a program limit such as nesting depth (54). Anything
 * else may be transient and must not get an event rejected.
 */
static bool
dispatcher_is_data_error(int sqlerrcode)
{
	int			category = ERRCODE_TO_CATEGORY(sqlerrcode);

	return category == ERRCODE_DATA_EXCEPTION ||
		category == ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION ||
		category == ERRCODE_PROGRAM_LIMIT_EXCEEDED;
}

/*
 * The arguments of eventshop._ingest_event for one message (topic,
 * partition, offset, ce_id, ce_type, payload). Headers and payload must be
 * UTF-8 without NUL bytes and not too large to be passed as text; a message
 * failing that (or any message, as_rejected) goes in with only its offset,
 * so SQL records it as rejected.
 */
static void
dispatcher_message_values(const rd_kafka_message_t *msg, bool as_rejected, Datum *values, char *nulls)
{
	bool		valid = !as_rejected;

	memset(nulls, 'n', 6);
	values[0] = CStringGetTextDatum(dispatcher_logical_topic(rd_kafka_topic_name(msg->rkt)));
	values[1] = Int32GetDatum(msg->partition);
	values[2] = Int64GetDatum(msg->offset);
	nulls[0] = nulls[1] = nulls[2] = ' ';

	valid = valid &&
		dispatcher_read_header(msg, "ce_id", &values[3], &nulls[3]) &&
		dispatcher_read_header(msg, "ce_type", &values[4], &nulls[4]) &&
		dispatcher_valid_text(msg->payload, msg->len, DISPATCHER_MAX_PAYLOAD);
	if (valid)
	{
		values[5] = dispatcher_text_datum(msg->payload, msg->len);
		nulls[5] = ' ';
	}
	else
		nulls[3] = nulls[4] = nulls[5] = 'n';
}

/* Calls eventshop._ingest_event for one message. Returns whether it was rejected. */
static bool
dispatcher_ingest_message(const rd_kafka_message_t *msg, bool as_rejected)
{
	Datum		values[6];
	char		nulls[6];
	bool		isnull;
	Datum		status;

	dispatcher_message_values(msg, as_rejected, values, nulls);
	dispatcher_run(&ingest_query, values, nulls);
	status = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return !isnull && strcmp(TextDatumGetCString(status), "rejected") == 0;
}

/*
 * Calls eventshop._ingest_events once for a batch (the same arguments as
 * _ingest_event, as arrays). Returns how many messages were rejected.
 */
static int
dispatcher_ingest_batch(rd_kafka_message_t **msgs, int count)
{
	static const Oid types[6] = {TEXTOID, INT4OID, INT8OID, TEXTOID, TEXTOID, TEXTOID};
	Datum	   *columns[6];
	bool	   *column_nulls[6];
	Datum		values[6];
	bool		isnull;
	Datum		rejected;

	for (int c = 0; c < 6; c++)
	{
		columns[c] = palloc(sizeof(Datum) * count);
		column_nulls[c] = palloc(sizeof(bool) * count);
	}
	for (int i = 0; i < count; i++)
	{
		Datum		row[6];
		char		row_nulls[6];

		dispatcher_message_values(msgs[i], false, row, row_nulls);
		for (int c = 0; c < 6; c++)
		{
			column_nulls[c][i] = row_nulls[c] == 'n';
			columns[c][i] = column_nulls[c][i] ? (Datum) 0 : row[c];
		}
	}
	for (int c = 0; c < 6; c++)
		values[c] = dispatcher_array(columns[c], count, types[c], column_nulls[c]);
	dispatcher_run(&ingest_batch_query, values, NULL);
	rejected = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetInt32(rejected);
}

/*
 * Reads the last header called name: true, with *isnull = 'n', when it is
 * absent or null; false when its value is not acceptable text.
 */
static bool
dispatcher_read_header(const rd_kafka_message_t *msg, const char *name, Datum *value, char *isnull)
{
	rd_kafka_headers_t *headers;
	const void *data;
	size_t		size;

	*isnull = 'n';
	if (rd_kafka_message_headers(msg, &headers) != RD_KAFKA_RESP_ERR_NO_ERROR ||
		rd_kafka_header_get_last(headers, name, &data, &size) != RD_KAFKA_RESP_ERR_NO_ERROR ||
		data == NULL)
		return true;
	if (!dispatcher_valid_text(data, size, DISPATCHER_MAX_HEADER))
		return false;
	*value = dispatcher_text_datum(data, size);
	*isnull = ' ';
	return true;
}

/* Whether bytes are present, at most max_length long, and valid UTF-8 without NULs. */
static bool
dispatcher_valid_text(const void *data, size_t length, size_t max_length)
{
	return data != NULL && length <= max_length &&
		pg_verify_mbstr(PG_UTF8, data, (int) length, true);
}

/* A text Datum from validated UTF-8, converted to the database encoding. */
static Datum
dispatcher_text_datum(const void *data, size_t length)
{
	char	   *converted = pg_any_to_server(data, (int) length, PG_UTF8);

	if (converted == data)
		return PointerGetDatum(cstring_to_text_with_len(converted, (int) length));
	return CStringGetTextDatum(converted);
}

/*
 * Mirrors the next offsets of an ingested batch to Kafka (asynchronously),
 * after the database commit, only so that Kafka tooling sees the lag.
 */
static void
dispatcher_commit_offsets(rd_kafka_message_t **msgs, int count)
{
	rd_kafka_topic_partition_list_t *offsets = rd_kafka_topic_partition_list_new(count);
	rd_kafka_resp_err_t err;

	for (int i = 0; i < count; i++)
	{
		const char *topic = rd_kafka_topic_name(msgs[i]->rkt);
		rd_kafka_topic_partition_t *partition =
			rd_kafka_topic_partition_list_find(offsets, topic, msgs[i]->partition);

		if (partition == NULL)
			partition = rd_kafka_topic_partition_list_add(offsets, topic, msgs[i]->partition);
		partition->offset = Max(partition->offset, msgs[i]->offset + 1);
	}
	err = rd_kafka_commit(dispatcher_kafka->rk, offsets, 1);
	rd_kafka_topic_partition_list_destroy(offsets);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		es_kafka_log_error(dispatcher_kafka, err,
						   "could not commit offsets to Kafka; the offsets stored in the database are unaffected");
}

/* Offset commit result (served by the poll): logs failures, rate-limited. */
static void
dispatcher_commit_result(rd_kafka_t *rk, rd_kafka_resp_err_t err,
						 rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
	(void) rk;
	for (int i = 0; err == RD_KAFKA_RESP_ERR_NO_ERROR && offsets != NULL && i < offsets->cnt; i++)
		err = offsets->elems[i].err;
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR && err != RD_KAFKA_RESP_ERR__NO_OFFSET)
		es_kafka_log_error((EsKafka *) opaque, err,
						   "could not commit offsets to Kafka; the offsets stored in the database are unaffected");
}

/*
 * Stores, in the open batch transaction, the next offset of every partition
 * the batch read from: one row per partition, not per message.
 */
static void
dispatcher_store_offsets(rd_kafka_message_t **msgs, int count)
{
	Datum	   *topics = palloc(sizeof(Datum) * count);
	Datum	   *partitions = palloc(sizeof(Datum) * count);
	int64	   *next_offsets = palloc(sizeof(int64) * count);
	rd_kafka_topic_t **rkts = palloc(sizeof(rd_kafka_topic_t *) * count);
	Datum	   *offsets;
	int			n = 0;
	Datum		values[4];

	for (int i = 0; i < count; i++)
	{
		int			j;

		/* a batch spans few partitions: a linear search is cheapest */
		for (j = 0; j < n; j++)
			if (rkts[j] == msgs[i]->rkt && DatumGetInt32(partitions[j]) == msgs[i]->partition)
				break;
		if (j == n)
		{
			rkts[n] = msgs[i]->rkt;
			topics[n] = CStringGetTextDatum(dispatcher_logical_topic(rd_kafka_topic_name(msgs[i]->rkt)));
			partitions[n] = Int32GetDatum(msgs[i]->partition);
			next_offsets[n] = msgs[i]->offset + 1;
			n++;
		}
		else
			next_offsets[j] = Max(next_offsets[j], msgs[i]->offset + 1);
	}
	offsets = palloc(sizeof(Datum) * n);
	for (int j = 0; j < n; j++)
		offsets[j] = Int64GetDatum(next_offsets[j]);
	values[0] = CStringGetTextDatum(es_dispatcher_group);
	values[1] = dispatcher_array(topics, n, TEXTOID, NULL);
	values[2] = dispatcher_array(partitions, n, INT4OID, NULL);
	values[3] = dispatcher_array(offsets, n, INT8OID, NULL);
	dispatcher_run(&store_offsets_query, values, NULL);
}

/* A one-dimensional array Datum of count elements of a built-in type. */
static Datum
dispatcher_array(Datum *elems, int count, Oid elemtype, const bool *elem_nulls)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;
	int			dims[1] = {count};
	int			lbs[1] = {1};

	get_typlenbyvalalign(elemtype, &typlen, &typbyval, &typalign);
	return PointerGetDatum(construct_md_array(elems, (bool *) elem_nulls, 1, dims, lbs, elemtype,
											  typlen, typbyval, typalign));
}

/*
 * Moves each newly assigned partition's start offset forward to Kafka's
 * committed offset when that is further: another server of the group
 * consumed the partition meanwhile (and committed in its own database, then
 * in Kafka). Kafka's offset never runs ahead of a database commit, so this
 * skips nothing unconsumed. If Kafka cannot answer in time, the database's
 * offsets stand (at worst an event is handled by two servers).
 */
static void
dispatcher_apply_committed(rd_kafka_t *rk, rd_kafka_topic_partition_list_t *partitions)
{
	rd_kafka_topic_partition_list_t *committed = rd_kafka_topic_partition_list_copy(partitions);
	rd_kafka_resp_err_t err = rd_kafka_committed(rk, committed, DISPATCHER_COMMITTED_TIMEOUT_MS);

	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		ereport(LOG,
				(errmsg("eventshop dispatcher: could not read the group's committed offsets; starting from the database's: %s",
						rd_kafka_err2str(err))));
	else
		for (int i = 0; i < partitions->cnt; i++)
		{
			rd_kafka_topic_partition_t *partition = &partitions->elems[i];
			rd_kafka_topic_partition_t *c = &committed->elems[i];

			/* an INVALID (negative) database offset means: use Kafka's anyway */
			if (c->err == RD_KAFKA_RESP_ERR_NO_ERROR && c->offset >= 0 &&
				partition->offset >= 0 && c->offset > partition->offset)
			{
				ereport(LOG,
						(errmsg("eventshop dispatcher: %s [%d] was consumed up to offset " INT64_FORMAT " elsewhere in the group; starting there instead of at " INT64_FORMAT,
								partition->topic, (int) partition->partition,
								(int64) c->offset, (int64) partition->offset)));
				partition->offset = c->offset;
			}
		}
	rd_kafka_topic_partition_list_destroy(committed);
}

/* Whether a reload changed eventshop.dispatcher_topics since the subscription. */
static bool
dispatcher_topics_changed(void)
{
	return subscribed_topics != NULL && strcmp(subscribed_topics, es_dispatcher_topics) != 0;
}

/*
 * Records the low and high watermarks librdkafka last saw (from fetch
 * responses, so without a broker round trip) for every assigned partition,
 * in a short transaction of its own. Partitions not fetched yet are left
 * out until they are. Nothing is written when nothing changed, unless the
 * last write is DISPATCHER_WATERMARK_REFRESH_MS old (recorded_at then shows
 * that the worker is alive).
 */
static void
dispatcher_record_watermarks(void)
{
	rd_kafka_topic_partition_list_t *assignment = NULL;
	rd_kafka_resp_err_t err;
	Datum	   *topics;
	Datum	   *partitions;
	Datum	   *lows;
	Datum	   *highs;
	int			n = 0;
	Datum		values[5];
	uint64		digest = 14695981039346656037ULL;	/* FNV-1a */
	TimestampTz now;

	/* a commit before this left us in TopMemoryContext */
	MemoryContextSwitchTo(loop_context);
	now = GetCurrentTimestamp();
	watermarks_recorded_at = now;
	err = rd_kafka_assignment(dispatcher_kafka->rk, &assignment);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		return;
	topics = palloc(sizeof(Datum) * Max(assignment->cnt, 1));
	partitions = palloc(sizeof(Datum) * Max(assignment->cnt, 1));
	lows = palloc(sizeof(Datum) * Max(assignment->cnt, 1));
	highs = palloc(sizeof(Datum) * Max(assignment->cnt, 1));
	for (int i = 0; i < assignment->cnt; i++)
	{
		rd_kafka_topic_partition_t *p = &assignment->elems[i];
		int64_t		low = -1;
		int64_t		high = -1;

		if (rd_kafka_get_watermark_offsets(dispatcher_kafka->rk, p->topic, p->partition,
										   &low, &high) != RD_KAFKA_RESP_ERR_NO_ERROR || high < 0)
			continue;
		topics[n] = CStringGetTextDatum(dispatcher_logical_topic(p->topic));
		partitions[n] = Int32GetDatum(p->partition);
		lows[n] = Int64GetDatum(Max(low, 0));
		highs[n] = Int64GetDatum(high);
		n++;
		for (const char *c = p->topic; *c; c++)
			digest = (digest ^ (unsigned char) *c) * 1099511628211ULL;
		digest = (digest ^ (uint64) p->partition) * 1099511628211ULL;
		digest = (digest ^ (uint64) low) * 1099511628211ULL;
		digest = (digest ^ (uint64) high) * 1099511628211ULL;
	}
	rd_kafka_topic_partition_list_destroy(assignment);
	if (digest == watermarks_digest &&
		!TimestampDifferenceExceeds(watermarks_written_at, now, DISPATCHER_WATERMARK_REFRESH_MS))
		return;
	watermarks_digest = digest;
	watermarks_written_at = now;

	es_worker_begin("eventshop dispatcher: recording watermarks");
	values[0] = CStringGetTextDatum(es_dispatcher_group);
	values[1] = dispatcher_array(topics, n, TEXTOID, NULL);
	values[2] = dispatcher_array(partitions, n, INT4OID, NULL);
	values[3] = dispatcher_array(lows, n, INT8OID, NULL);
	values[4] = dispatcher_array(highs, n, INT8OID, NULL);
	dispatcher_run(&watermarks_query, values, NULL);
	es_worker_commit();
	MemoryContextSwitchTo(loop_context);
}

/*
 * Rebalance callback, run inside rd_kafka_consumer_poll() on this thread:
 * on assignment, starts each partition at the offset stored in the database;
 * on revocation (or error), drops the partitions. Handles both the eager
 * and the cooperative protocol.
 */
static void
dispatcher_rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
					 rd_kafka_topic_partition_list_t *partitions, void *opaque)
{
	bool		cooperative = strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE") == 0;
	bool		assign = err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
	rd_kafka_error_t *error = NULL;
	rd_kafka_resp_err_t assign_err = RD_KAFKA_RESP_ERR_NO_ERROR;

	(void) opaque;
	rebalanced = true;
	in_rebalance = true;
	if (assign && !dispatcher_load_offsets(partitions))
	{
		in_rebalance = false;
		return;					/* the poll's caller raises the error */
	}
	if (assign)
		dispatcher_apply_committed(rk, partitions);

	if (cooperative)
		error = assign ? rd_kafka_incremental_assign(rk, partitions)
			: rd_kafka_incremental_unassign(rk, partitions);
	else
		assign_err = rd_kafka_assign(rk, assign ? partitions : NULL);

	in_rebalance = false;
	if (error != NULL)
	{
		assign_err = rd_kafka_error_code(error);
		rd_kafka_error_destroy(error);
	}
	if (assign_err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		/* a consumer that cannot take its assignment is rebuilt */
		ereport(LOG,
				(errmsg("eventshop dispatcher: could not %s partitions: %s",
						assign ? "assign" : "revoke", rd_kafka_err2str(assign_err))));
		dispatcher_kafka->fatal = true;
		return;
	}
	dispatcher_log_assignment(assign ? "assigned" : err == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS ?
							  "revoked" : rd_kafka_err2str(err), partitions);
}

/*
 * Sets each partition's start offset from eventshop.consumer_offsets, or to
 * RD_KAFKA_OFFSET_INVALID (Kafka's committed offset, else the earliest)
 * when the database has none. Runs its own transaction. An ERROR must not
 * unwind through librdkafka: it is kept in rebalance_error for the poll's
 * caller to raise, and false is returned.
 */
static bool
dispatcher_load_offsets(rd_kafka_topic_partition_list_t *partitions)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	volatile bool ok = true;

	Assert(!IsTransactionState());
	PG_TRY();
	{
		es_worker_begin("eventshop dispatcher: loading consumer offsets");
		for (int i = 0; i < partitions->cnt; i++)
		{
			rd_kafka_topic_partition_t *partition = &partitions->elems[i];
			Datum		values[3];
			bool		isnull = true;
			Datum		next_offset = (Datum) 0;

			values[0] = CStringGetTextDatum(es_dispatcher_group);
			values[1] = CStringGetTextDatum(dispatcher_logical_topic(partition->topic));
			values[2] = Int32GetDatum(partition->partition);
			dispatcher_run(&offset_query, values, NULL);
			if (SPI_processed == 1)
				next_offset = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
			partition->offset = isnull ? RD_KAFKA_OFFSET_INVALID : DatumGetInt64(next_offset);
		}
		es_worker_commit();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(TopMemoryContext);
		rebalance_error = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(oldcontext);
	return ok;
}

/* Logs an assignment change with each partition's start offset. */
static void
dispatcher_log_assignment(const char *what, const rd_kafka_topic_partition_list_t *partitions)
{
	StringInfoData detail;

	initStringInfo(&detail);
	for (int i = 0; i < partitions->cnt; i++)
	{
		const rd_kafka_topic_partition_t *partition = &partitions->elems[i];

		appendStringInfo(&detail, "%s%s [%d]", i > 0 ? ", " : "",
						 partition->topic, (int) partition->partition);
		if (partition->offset >= 0)
			appendStringInfo(&detail, " at offset " INT64_FORMAT, (int64) partition->offset);
	}
	ereport(LOG,
			(errmsg("eventshop dispatcher: %s %d partition(s)", what, partitions->cnt),
			 partitions->cnt > 0 ? errdetail("%s.", detail.data) : 0));
	pfree(detail.data);
}
