/*
 * transfers.c
 *		Runs a round of deliveries concurrently with libcurl's multi
 *		interface, on the sender worker's own thread.
 *
 * One multi handle lives for the life of the worker; its connection cache
 * keeps SMTP sessions and HTTP keep-alive connections open from one
 * transfer (and one round) to the next. A pool of easy handles, one per
 * transfer in flight, is reused. libcurl waits are capped at
 * TRANSFERS_POLL_MS so SIGTERM stays noticed; on SIGTERM no new transfer
 * starts, those in flight are dropped and reported as released (they will
 * be tried again: delivery is at-least-once), and the caller records the
 * round before the worker exits.
 *
 * libcurl is created in the worker, never in the postmaster (handles and
 * threads do not survive a fork), and freed at process exit.
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "config.h"
#include "http_sender.h"
#include "smtp_sender.h"
#include "transfers.h"

/* Longest wait inside libcurl before SIGTERM is looked at again. */
#define TRANSFERS_POLL_MS	100
/* Upper limit of eventshop.sender_concurrency. */
#define TRANSFERS_MAX_HANDLES	1000

static CURLM *multi = NULL;
static CURL **easy_pool = NULL;		/* idle handles; grown to the concurrency */
static int	easy_idle = 0;

static void transfers_cleanup(int code, Datum arg);
static CURL *transfers_take_handle(void);
static void transfers_return_handle(CURL *easy);
static bool transfers_start(EsDelivery *delivery, CURL *easy);
static void transfers_finish(EsDelivery *delivery, CURL *easy, CURLcode rc);
static void transfers_drop(EsDelivery *delivery, CURL *easy);
static int	transfers_elapsed_ms(TimestampTz since);

/* Initialises libcurl and the multi handle; cleanup is registered for process exit. */
void
es_transfers_init(void)
{
	CURLcode	rc = curl_global_init(CURL_GLOBAL_DEFAULT);

	if (rc != CURLE_OK)
		ereport(ERROR,
				(errmsg("could not initialize libcurl: %s", curl_easy_strerror(rc))));
	multi = curl_multi_init();
	if (multi == NULL)
	{
		curl_global_cleanup();
		ereport(ERROR,
				(errmsg("could not create a libcurl multi handle")));
	}
	easy_pool = MemoryContextAllocZero(TopMemoryContext, sizeof(CURL *) * TRANSFERS_MAX_HANDLES);
	on_proc_exit(transfers_cleanup, (Datum) 0);
}

/* on_proc_exit: closes every connection and frees libcurl. */
static void
transfers_cleanup(int code, Datum arg)
{
	(void) code;
	(void) arg;
	if (multi == NULL)
		return;
	/* no handle is left in the multi: a round removes each one it added */
	curl_multi_cleanup(multi);
	multi = NULL;
	for (int i = 0; i < easy_idle; i++)
		curl_easy_cleanup(easy_pool[i]);
	easy_idle = 0;
	curl_global_cleanup();
}

/*
 * The round: keeps up to eventshop.sender_concurrency transfers in flight,
 * starting the next delivery whenever one finishes.
 */
void
es_transfers_run(EsDelivery **deliveries, int count, TimestampTz start_deadline)
{
	int			concurrency = Min(es_sender_concurrency, TRANSFERS_MAX_HANDLES);
	CURL	   *in_flight[TRANSFERS_MAX_HANDLES];
	int			next = 0;
	int			active = 0;

	curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long) concurrency);
	curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, (long) concurrency);

	while (next < count || active > 0)
	{
		CURLMsg    *msg;
		int			queued;
		int			running;

		while (next < count && active < concurrency)
		{
			EsDelivery *delivery = deliveries[next++];
			CURL	   *easy;

			if (ProcDiePending || GetCurrentTimestamp() >= start_deadline)
			{
				es_delivery_set(delivery, ES_OUTCOME_RELEASED, NULL, "not tried in this round");
				continue;
			}
			easy = transfers_take_handle();
			if (easy == NULL)
			{
				es_delivery_set(delivery, ES_OUTCOME_TEMPORARY, "resources",
								"could not create a libcurl handle");
				continue;
			}
			if (transfers_start(delivery, easy))
				in_flight[active++] = easy;
			else
				transfers_return_handle(easy);
		}

		curl_multi_perform(multi, &running);
		while ((msg = curl_multi_info_read(multi, &queued)) != NULL)
		{
			EsDelivery *delivery;

			if (msg->msg != CURLMSG_DONE)
				continue;
			curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &delivery);
			for (int i = 0; i < active; i++)
				if (in_flight[i] == msg->easy_handle)
				{
					in_flight[i] = in_flight[--active];
					break;
				}
			transfers_finish(delivery, msg->easy_handle, msg->data.result);
		}

		if (ProcDiePending)
		{
			/* leave at once: what is in flight is released and tried again later */
			while (active > 0)
			{
				CURL	   *easy = in_flight[--active];
				EsDelivery *delivery;

				curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **) &delivery);
				transfers_drop(delivery, easy);
			}
		}
		else if (active > 0)
			curl_multi_poll(multi, NULL, 0, TRANSFERS_POLL_MS, NULL);
	}
}

/* An idle easy handle from the pool, or a new one; NULL if libcurl is out of memory. */
static CURL *
transfers_take_handle(void)
{
	if (easy_idle > 0)
		return easy_pool[--easy_idle];
	return curl_easy_init();
}

/* Puts a handle back, with every option dropped (its connection stays in the multi's cache). */
static void
transfers_return_handle(CURL *easy)
{
	curl_easy_reset(easy);
	if (easy_idle < TRANSFERS_MAX_HANDLES)
		easy_pool[easy_idle++] = easy;
	else
		curl_easy_cleanup(easy);
}

/* Has the channel module set the handle up, then adds it to the multi handle. */
static bool
transfers_start(EsDelivery *delivery, CURL *easy)
{
	bool		ready;
	CURLMcode	mc;

	delivery->started_at = GetCurrentTimestamp();
	ready = delivery->channel == ES_CHANNEL_EMAIL
		? es_smtp_prepare(delivery, easy)
		: es_http_prepare(delivery, easy);
	if (!ready)
	{
		delivery->duration_ms = 0;
		es_delivery_release(delivery);
		return false;
	}
	curl_easy_setopt(easy, CURLOPT_PRIVATE, (char *) delivery);
	curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, delivery->errbuf);
	mc = curl_multi_add_handle(multi, easy);
	if (mc != CURLM_OK)
	{
		es_delivery_set(delivery, ES_OUTCOME_TEMPORARY, "resources",
						"could not start the transfer: %s", curl_multi_strerror(mc));
		delivery->duration_ms = 0;
		curl_easy_reset(easy);
		es_delivery_release(delivery);
		return false;
	}
	return true;
}

/*
 * Judges a finished transfer and frees what it used. The handle is reset
 * before it is reused, so no pointer into this round's memory outlives it.
 */
static void
transfers_finish(EsDelivery *delivery, CURL *easy, CURLcode rc)
{
	if (delivery->channel == ES_CHANNEL_EMAIL)
		es_smtp_complete(delivery, easy, rc);
	else
		es_http_complete(delivery, easy, rc);
	delivery->duration_ms = transfers_elapsed_ms(delivery->started_at);
	curl_multi_remove_handle(multi, easy);
	transfers_return_handle(easy);
	es_delivery_release(delivery);
}

/* Abandons a transfer in flight (SIGTERM): reported as released. */
static void
transfers_drop(EsDelivery *delivery, CURL *easy)
{
	curl_multi_remove_handle(multi, easy);
	transfers_return_handle(easy);
	es_delivery_release(delivery);
	es_delivery_set(delivery, ES_OUTCOME_RELEASED, NULL, "abandoned at shutdown");
}

/* Milliseconds since a timestamp. */
static int
transfers_elapsed_ms(TimestampTz since)
{
	return (int) ((GetCurrentTimestamp() - since) / 1000);
}
