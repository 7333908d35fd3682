/*
 * relay_stats.c
 *		Shared-memory counters of the relay worker and the SQL functions that
 *		read them (eventshop._relay_stats) and reset the latency histogram
 *		(eventshop.reset_relay_latency).
 *
 * The relay is the only writer (a reset may come from any backend); readers may see counters a few messages
 * apart from each other, which is fine for monitoring. Latency is measured
 * from the row's created_at (the moment it was written, just before its
 * transaction commits) to the broker's acknowledgement, in buckets of
 * 0.25 ms up to 100 ms and of 10 ms up to about 10 s.
 */
#include "postgres.h"

#include <math.h>

#include "access/htup_details.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/builtins.h"
#include "utils/float.h"
#include "utils/timestamp.h"

#include "relay_stats.h"

#define FINE_BUCKETS		400		/* 0.25 ms each: 0 .. 100 ms */
#define FINE_BUCKET_US		250
#define COARSE_BUCKETS		1000	/* 10 ms each: 100 ms .. 10.1 s */
#define COARSE_BUCKET_US	10000
#define LATENCY_BUCKETS		(FINE_BUCKETS + COARSE_BUCKETS + 1)	/* + overflow */

typedef struct EsRelayStats
{
	pg_atomic_uint64 produced;
	pg_atomic_uint64 acknowledged;
	pg_atomic_uint64 parked;
	pg_atomic_uint64 delivery_errors;
	pg_atomic_uint32 broker_state;
	pg_atomic_uint64 latency[LATENCY_BUCKETS];
	slock_t		mutex;			/* protects the fields below */
	TimestampTz started_at;
	TimestampTz last_error_at;
	char		last_error[256];
} EsRelayStats;

static EsRelayStats *relay_stats = NULL;

PG_FUNCTION_INFO_V1(eventshop_relay_stats);
PG_FUNCTION_INFO_V1(eventshop_reset_relay_latency);

Size
es_relay_stats_shmem_size(void)
{
	return MAXALIGN(sizeof(EsRelayStats));
}

/* Creates or attaches to the counters; the caller holds AddinShmemInitLock. */
void
es_relay_stats_shmem_startup(void)
{
	bool		found;

	relay_stats = ShmemInitStruct("eventshop relay stats", sizeof(EsRelayStats), &found);
	if (found)
		return;
	pg_atomic_init_u64(&relay_stats->produced, 0);
	pg_atomic_init_u64(&relay_stats->acknowledged, 0);
	pg_atomic_init_u64(&relay_stats->parked, 0);
	pg_atomic_init_u64(&relay_stats->delivery_errors, 0);
	pg_atomic_init_u32(&relay_stats->broker_state, ES_BROKER_UNKNOWN);
	for (int i = 0; i < LATENCY_BUCKETS; i++)
		pg_atomic_init_u64(&relay_stats->latency[i], 0);
	SpinLockInit(&relay_stats->mutex);
	relay_stats->started_at = 0;
	relay_stats->last_error_at = 0;
	relay_stats->last_error[0] = '\0';
}

static void
add(pg_atomic_uint64 *counter, uint64 count)
{
	pg_atomic_fetch_add_u64(counter, (int64) count);
}

void
es_relay_stats_worker_started(void)
{
	SpinLockAcquire(&relay_stats->mutex);
	relay_stats->started_at = GetCurrentTimestamp();
	SpinLockRelease(&relay_stats->mutex);
	pg_atomic_write_u32(&relay_stats->broker_state, ES_BROKER_UNKNOWN);
}

void
es_relay_stats_produced(uint64 count)
{
	add(&relay_stats->produced, count);
}

/* One acknowledged message: counts it and files its latency. */
void
es_relay_stats_acknowledged(TimestampTz created_at, TimestampTz acked_at)
{
	int64		us = Max(acked_at - created_at, 0);
	int			bucket;

	if (us < FINE_BUCKETS * FINE_BUCKET_US)
		bucket = (int) (us / FINE_BUCKET_US);
	else if (us < FINE_BUCKETS * FINE_BUCKET_US + (int64) COARSE_BUCKETS * COARSE_BUCKET_US)
		bucket = FINE_BUCKETS + (int) ((us - FINE_BUCKETS * FINE_BUCKET_US) / COARSE_BUCKET_US);
	else
		bucket = LATENCY_BUCKETS - 1;
	add(&relay_stats->latency[bucket], 1);
	add(&relay_stats->acknowledged, 1);
	pg_atomic_write_u32(&relay_stats->broker_state, ES_BROKER_UP);
}

void
es_relay_stats_parked(uint64 count)
{
	add(&relay_stats->parked, count);
}

/* A delivery or client error: counted, and kept as the last error (truncated). */
void
es_relay_stats_error(const char *error)
{
	add(&relay_stats->delivery_errors, 1);
	SpinLockAcquire(&relay_stats->mutex);
	strlcpy(relay_stats->last_error, error ? error : "", sizeof(relay_stats->last_error));
	relay_stats->last_error_at = GetCurrentTimestamp();
	SpinLockRelease(&relay_stats->mutex);
}

void
es_relay_stats_broker_state(EsBrokerState state)
{
	pg_atomic_write_u32(&relay_stats->broker_state, state);
}

/* Upper edge, in milliseconds, of the bucket holding the given fraction of samples; NULL-able. */
static bool
latency_percentile(const uint64 *buckets, uint64 total, double fraction, double *ms)
{
	uint64		wanted,
				seen = 0;

	if (total == 0)
		return false;
	wanted = (uint64) ceil(fraction * (double) total);
	for (int i = 0; i < LATENCY_BUCKETS; i++)
	{
		seen += buckets[i];
		if (seen >= wanted && buckets[i] > 0)
		{
			if (i < FINE_BUCKETS)
				*ms = (i + 1) * FINE_BUCKET_US / 1000.0;
			else if (i < LATENCY_BUCKETS - 1)
				*ms = (FINE_BUCKETS * FINE_BUCKET_US + (i - FINE_BUCKETS + 1) * (double) COARSE_BUCKET_US) / 1000.0;
			else
				*ms = get_float8_infinity();
			return true;
		}
	}
	return false;
}

/*
 * eventshop._relay_stats(): one row of counters since the relay started
 * (the postmaster's start for the counters, the worker's for started_at).
 */
Datum
eventshop_relay_stats(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[11];
	bool		nulls[11] = {0};
	uint64	   *buckets = palloc(sizeof(uint64) * LATENCY_BUCKETS);
	uint64		samples = 0;
	static const char *const states[] = {"unknown", "up", "down"};
	uint32		state;
	TimestampTz started_at,
				last_error_at;
	char		last_error[256];
	double		ms;

	(void) fcinfo;
	if (relay_stats == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("eventshop is not loaded through shared_preload_libraries")));
	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "eventshop._relay_stats must return a record");

	for (int i = 0; i < LATENCY_BUCKETS; i++)
	{
		buckets[i] = pg_atomic_read_u64(&relay_stats->latency[i]);
		samples += buckets[i];
	}
	SpinLockAcquire(&relay_stats->mutex);
	started_at = relay_stats->started_at;
	last_error_at = relay_stats->last_error_at;
	memcpy(last_error, relay_stats->last_error, sizeof(last_error));
	SpinLockRelease(&relay_stats->mutex);
	state = pg_atomic_read_u32(&relay_stats->broker_state);

	values[0] = Int64GetDatum((int64) pg_atomic_read_u64(&relay_stats->produced));
	values[1] = Int64GetDatum((int64) pg_atomic_read_u64(&relay_stats->acknowledged));
	values[2] = Int64GetDatum((int64) pg_atomic_read_u64(&relay_stats->parked));
	values[3] = Int64GetDatum((int64) pg_atomic_read_u64(&relay_stats->delivery_errors));
	values[4] = CStringGetTextDatum(last_error);
	nulls[4] = last_error[0] == '\0';
	values[5] = TimestampTzGetDatum(last_error_at);
	nulls[5] = last_error_at == 0;
	values[6] = CStringGetTextDatum(states[state < lengthof(states) ? state : 0]);
	values[7] = TimestampTzGetDatum(started_at);
	nulls[7] = started_at == 0;
	values[8] = Int64GetDatum((int64) samples);
	nulls[9] = !latency_percentile(buckets, samples, 0.50, &ms);
	values[9] = Float8GetDatum(nulls[9] ? 0 : ms);
	nulls[10] = !latency_percentile(buckets, samples, 0.99, &ms);
	values[10] = Float8GetDatum(nulls[10] ? 0 : ms);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}

/* eventshop.reset_relay_latency(): empties the latency histogram (e.g. before a measurement). */
Datum
eventshop_reset_relay_latency(PG_FUNCTION_ARGS)
{
	(void) fcinfo;
	if (relay_stats == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("eventshop is not loaded through shared_preload_libraries")));
	for (int i = 0; i < LATENCY_BUCKETS; i++)
		pg_atomic_write_u64(&relay_stats->latency[i], 0);
	PG_RETURN_VOID();
}
