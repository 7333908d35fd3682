/*
 * sender.c
 *		A sender worker: claims due notifications, delivers them on their
 *		channels (e-mail, SMS, push, webhook, log) with many transfers in
 *		flight, and records the whole round's outcomes in one transaction.
 *
 * eventshop.sender_workers of these run side by side. Each round:
 *	1. claim: one short transaction leases up to eventshop.sender_batch_size
 *	   due notifications (FOR UPDATE SKIP LOCKED, so two senders never claim
 *	   the same row; the lease makes the row due again if this worker dies);
 *	2. send, with no transaction open, at most eventshop.sender_concurrency
 *	   at a time (transfers.c); none starts late enough to outlive the lease;
 *	3. record: one transaction stores every attempt, schedules retries,
 *	   dead-letters, and emits notification.sent / notification.failed
 *	   through the outbox (eventshop._record_deliveries). Interrupts are held
 *	   while it runs, so SIGTERM cannot lose a round that was sent.
 * Delivery is at-least-once: a worker killed between sending and recording
 * sends that round again once the lease ends.
 *
 * The worker sleeps on its latch until a commit queues a notification (the
 * wake-up triggers on eventshop.notifications set every sender's latch),
 * the next retry is due, or a signal arrives. SIGHUP rereads the settings
 * and the secret files, effective from the next round.
 */
#include "postgres.h"

#include <math.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/latch.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "channel_secrets.h"
#include "config.h"
#include "delivery.h"
#include "transfers.h"
#include "worker_runtime.h"

PGDLLEXPORT void eventshop_sender_main(Datum main_arg);

/* Longest sleep without a wake-up; also the pause while the extension is missing. */
#define SENDER_IDLE_TIMEOUT_MS	10000
/* Shortest sleep: a due notification can be locked by another sender and not claimable. */
#define SENDER_MIN_TIMEOUT_MS	100
/* Shortest lease of a claimed notification. */
#define SENDER_MIN_LEASE_S		60

static EsWorkerQuery claim_query = {
	.sql = "SELECT id::text, channel, template, recipient, subject, body_text, body_html "
	"FROM eventshop._claim_notifications($1, $2)",
	.nargs = 2,
	.argtypes = {INT4OID, INT4OID}
};
static EsWorkerQuery record_query = {
	.sql = "SELECT id::text, status FROM eventshop._record_deliveries($1::uuid[], $2, $3, $4, $5, $6, $7, $8)",
	.nargs = 8,
	.argtypes = {TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID,
	INT4ARRAYOID, INT4OID, INT4OID}
};
static EsWorkerQuery next_due_query = {
	.sql = "SELECT eventshop._seconds_until_next_notification()",
	.nargs = 0
};

static MemoryContext round_context = NULL;	/* reset once per round */

static bool sender_round(void);
static int	sender_lease_seconds(void);
static int	sender_claim(int limit, int lease_seconds, EsDelivery **batch);
static char *sender_copy_utf8(HeapTuple tuple, TupleDesc desc, int attnum, bool null_ok);
static void sender_log_channel(EsDelivery *delivery);
static void sender_record(EsDelivery *batch, int count);
static Datum sender_text_array(EsDelivery *batch, int count, int field);
static long sender_idle_timeout(void);
static void sender_reload(void);

/* Worker entry point: rounds of claim, send, record; sleeps when nothing is due. */
void
eventshop_sender_main(Datum main_arg)
{
	(void) main_arg;
	es_worker_start(ES_WORKER_SENDER);
	es_transfers_init();
	es_secrets_load();
	round_context = AllocSetContextCreate(TopMemoryContext, "eventshop sender",
										  ALLOCSET_DEFAULT_SIZES);

	while (!es_worker_extension_ready())
		if (es_worker_wait(SENDER_IDLE_TIMEOUT_MS, PGINVALID_SOCKET))
			sender_reload();

	for (;;)
	{
		bool		full;

		MemoryContextReset(round_context);
		MemoryContextSwitchTo(round_context);
		full = sender_round();

		/*
		 * Forget wake-ups that came during the round, then look at the
		 * queue: whatever committed before this point is seen by the claim
		 * or by sender_idle_timeout(), anything later sets the latch again.
		 */
		ResetLatch(MyLatch);
		if (es_worker_check_interrupts())
			sender_reload();
		if (!full && es_worker_wait(sender_idle_timeout(), PGINVALID_SOCKET))
			sender_reload();
	}
}

/* After SIGHUP: settings are already reloaded; reread the secret files. */
static void
sender_reload(void)
{
	es_secrets_load();
	ereport(DEBUG1, (errmsg("eventshop sender: channel settings reloaded")));
}

/*
 * One round: claim, send, record. Returns true when the claim was full, so
 * more may be due at once.
 */
static bool
sender_round(void)
{
	int			limit = es_sender_batch_size;
	int			lease = sender_lease_seconds();
	int			timeout_ms = Max(es_smtp_timeout_ms, es_http_timeout_ms);
	EsDelivery *batch;
	EsDelivery **network;
	int			network_count = 0;
	int			count = sender_claim(limit, lease, &batch);
	TimestampTz start_deadline;

	if (count == 0)
		return false;

	/* a transfer started before the deadline ends (times out) well within the lease */
	start_deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
												 lease * 1000L - 2L * timeout_ms);
	network = palloc(sizeof(EsDelivery *) * count);
	for (int i = 0; i < count; i++)
	{
		EsDelivery *delivery = &batch[i];

		if (delivery->channel == ES_CHANNEL_LOG)
			sender_log_channel(delivery);
		else if (delivery->channel == ES_CHANNEL_UNKNOWN)
			es_delivery_set(delivery, ES_OUTCOME_PERMANENT, "unsupported_channel",
							"unsupported channel");
		else
			network[network_count++] = delivery;
	}
	pgstat_report_activity(STATE_RUNNING, "eventshop sender: sending notifications");
	es_transfers_run(network, network_count, start_deadline);
	pgstat_report_activity(STATE_IDLE, NULL);

	sender_record(batch, count);
	return count == limit;
}

/*
 * How long a claim lasts: at least SENDER_MIN_LEASE_S, and four times the
 * longest transfer timeout, so a transfer started in the first half of the
 * lease always ends inside it.
 */
static int
sender_lease_seconds(void)
{
	int			timeout_ms = Max(es_smtp_timeout_ms, es_http_timeout_ms);

	return Max(SENDER_MIN_LEASE_S, 4 * ((timeout_ms + 999) / 1000));
}

/* Leases up to limit due notifications, copied into round_context as UTF-8; returns how many. */
static int
sender_claim(int limit, int lease_seconds, EsDelivery **batch)
{
	Datum		values[2] = {Int32GetDatum(limit), Int32GetDatum(lease_seconds)};
	int			count;

	es_worker_begin("eventshop sender: claiming notifications");
	es_worker_run(&claim_query, values, NULL);
	count = (int) SPI_processed;
	*batch = MemoryContextAllocZero(round_context, sizeof(EsDelivery) * Max(count, 1));
	for (int i = 0; i < count; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		EsDelivery *delivery = &(*batch)[i];

		delivery->id = sender_copy_utf8(tuple, desc, 1, false);
		delivery->channel_name = sender_copy_utf8(tuple, desc, 2, false);
		delivery->template_name = sender_copy_utf8(tuple, desc, 3, false);
		delivery->recipient = sender_copy_utf8(tuple, desc, 4, false);
		delivery->subject = sender_copy_utf8(tuple, desc, 5, false);
		delivery->body_text = sender_copy_utf8(tuple, desc, 6, false);
		delivery->body_html = sender_copy_utf8(tuple, desc, 7, true);
		delivery->channel = es_channel_from_name(delivery->channel_name);
		delivery->duration_ms = 0;
	}
	es_worker_commit();
	MemoryContextSwitchTo(round_context);
	return count;
}

/* Copies a column into round_context as UTF-8 (conversion needs the open transaction). */
static char *
sender_copy_utf8(HeapTuple tuple, TupleDesc desc, int attnum, bool null_ok)
{
	char	   *value = SPI_getvalue(tuple, desc, attnum);

	if (value == NULL)
		return null_ok ? NULL : MemoryContextStrdup(round_context, "");
	return MemoryContextStrdup(round_context, pg_server_to_any(value, strlen(value), PG_UTF8));
}

/*
 * The development channel: a LOG line naming the notification, never its
 * recipient or text (which may hold a sign-in link); counts as sent.
 */
static void
sender_log_channel(EsDelivery *delivery)
{
	delivery->started_at = GetCurrentTimestamp();
	ereport(LOG,
			(errmsg("eventshop sender: notification %s (template \"%s\") delivered to the log channel",
					delivery->id, delivery->template_name),
			 errdetail("Subject of %zu bytes, text of %zu bytes%s.", strlen(delivery->subject),
					   strlen(delivery->body_text), delivery->body_html ? ", with an HTML part" : "")));
	es_delivery_set(delivery, ES_OUTCOME_SENT, NULL, "logged");
}

/*
 * Records the round in one transaction, with interrupts held so that a
 * SIGTERM arriving now is served only after the commit. Logs dead letters
 * and a summary of temporary failures.
 */
static void
sender_record(EsDelivery *batch, int count)
{
	Datum	   *started = palloc(sizeof(Datum) * count);
	Datum	   *durations = palloc(sizeof(Datum) * count);
	Datum		values[8];
	int			temporary = 0;
	const char *last_error = NULL;

	for (int i = 0; i < count; i++)
	{
		started[i] = TimestampTzGetDatum(batch[i].started_at != 0 ? batch[i].started_at
										 : GetCurrentTimestamp());
		durations[i] = Int32GetDatum(batch[i].duration_ms);
		if (batch[i].outcome == ES_OUTCOME_TEMPORARY)
		{
			temporary++;
			last_error = batch[i].response;
		}
	}

	HOLD_INTERRUPTS();
	es_worker_begin("eventshop sender: recording delivery attempts");
	values[0] = sender_text_array(batch, count, 0);
	values[1] = sender_text_array(batch, count, 1);
	values[2] = sender_text_array(batch, count, 2);
	values[3] = sender_text_array(batch, count, 3);
	values[4] = PointerGetDatum(construct_array(started, count, TIMESTAMPTZOID, sizeof(TimestampTz),
												FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	values[5] = PointerGetDatum(construct_array(durations, count, INT4OID, sizeof(int32),
												true, TYPALIGN_INT));
	values[6] = Int32GetDatum(es_notification_max_attempts);
	values[7] = Int32GetDatum(es_notification_max_backoff_s);
	es_worker_run(&record_query, values, NULL);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		char	   *id = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		char	   *status = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2);

		if (strcmp(status, "dead") != 0)
			continue;
		for (int j = 0; j < count; j++)
			if (strcmp(batch[j].id, id) == 0)
				ereport(WARNING,
						(errmsg("eventshop sender: notification %s (%s) failed for good and was dead-lettered",
								id, batch[j].channel_name),
						 errdetail("%s: %s", batch[j].error_class ? batch[j].error_class : "failed",
								   batch[j].response)));
	}
	es_worker_commit();
	RESUME_INTERRUPTS();
	MemoryContextSwitchTo(round_context);

	if (temporary > 0)
		ereport(LOG,
				(errmsg("eventshop sender: %d of %d notifications could not be sent and will be retried",
						temporary, count),
				 errdetail("Last error: %s", last_error)));
}

/* One text[] argument of _record_deliveries: 0 ids, 1 outcomes, 2 responses, 3 error classes. */
static Datum
sender_text_array(EsDelivery *batch, int count, int field)
{
	static const char *const outcome_names[] = {"sent", "temporary", "permanent", "released"};
	Datum	   *elems = palloc(sizeof(Datum) * count);
	bool	   *nulls = palloc0(sizeof(bool) * count);
	int			dims[1] = {count};
	int			lbs[1] = {1};

	for (int i = 0; i < count; i++)
	{
		const char *value;

		switch (field)
		{
			case 0:
				value = batch[i].id;
				break;
			case 1:
				value = outcome_names[batch[i].outcome];
				break;
			case 2:
				value = batch[i].response;
				break;
			default:
				value = batch[i].error_class;
				break;
		}
		nulls[i] = value == NULL;
		elems[i] = value == NULL ? (Datum) 0 : CStringGetTextDatum(value);
	}
	return PointerGetDatum(construct_md_array(elems, nulls, 1, dims, lbs, TEXTOID, -1, false,
											  TYPALIGN_INT));
}

/*
 * Milliseconds until the next notification is due, between
 * SENDER_MIN_TIMEOUT_MS and SENDER_IDLE_TIMEOUT_MS. Only called when the
 * last claim was not full, so "due now" means due but locked by another
 * sender, and the floor keeps that from becoming a busy loop.
 */
static long
sender_idle_timeout(void)
{
	double		timeout_ms = SENDER_IDLE_TIMEOUT_MS;
	Datum		seconds = (Datum) 0;
	bool		isnull = true;

	es_worker_begin("eventshop sender: scheduling");
	es_worker_run(&next_due_query, NULL, NULL);
	if (SPI_processed == 1)
		seconds = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (!isnull)
		timeout_ms = Min(timeout_ms, ceil(DatumGetFloat8(seconds) * 1000.0));
	es_worker_commit();
	MemoryContextSwitchTo(round_context);
	return (long) Max(timeout_ms, SENDER_MIN_TIMEOUT_MS);
}
