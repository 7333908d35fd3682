/*
 * login_throttle.c
 *		Brute-force protection for eventshop.login: failed-login counters per
 *		account (the normalised e-mail address, whether or not an account has
 *		it) and per source (the client address the gateway passes), with
 *		lockout and exponential backoff; and a queue of the security events
 *		that a failed login produces.
 *
 * Both live in shared memory rather than in tables, because a failed login
 * ends in an ERROR: everything the failing transaction wrote is rolled back,
 * and a caller could roll back on purpose to erase its failures. Counters
 * and queued events therefore survive ROLLBACK (not a server restart).
 *
 * Counters: a fixed-size hash table (ShmemInitHash) keyed by the first 16
 * bytes of SHA-256(kind || value), so no address is kept in shared memory,
 * protected by one LWLock. max failures within eventshop.login_failure_window
 * lock the key for eventshop.login_lockout, doubling with every further
 * lockout up to eventshop.login_lockout_max; the doubling is forgotten after
 * a day without failures. When the table is full the entry idle longest is
 * evicted, unlocked entries before locked ones, so flooding it with new keys
 * costs memory nobody else needs and frees locks last.
 *
 * Events: a ring of ES_DEFERRED_CAPACITY events (user.login_failed,
 * user.locked). eventshop.flush_security_events() moves them into the outbox
 * in the caller's transaction; events claimed by a transaction (or
 * subtransaction) that aborts go back to the front of the ring. When the ring
 * is full, new events are dropped and counted.
 */
#include "postgres.h"

#include <openssl/sha.h>

#include "access/xact.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "config.h"
#include "login_throttle.h"
#include "shared_state.h"

#define ES_THROTTLE_TRANCHE			"eventshop_login_throttle"
#define ES_THROTTLE_KEY_LEN			16
#define ES_LOCKOUT_MEMORY_US		(USECS_PER_DAY)
#define ES_DEFERRED_CAPACITY		1024
#define ES_DEFERRED_KEY_LEN			64
#define ES_DEFERRED_TYPE_LEN		64
#define ES_DEFERRED_DATA_LEN		896

typedef struct EsThrottleKey
{
	uint8		bytes[ES_THROTTLE_KEY_LEN];
} EsThrottleKey;

typedef struct EsThrottleEntry
{
	EsThrottleKey key;			/* hash key: must be first */
	int32		failures;		/* failures since the last lockout or reset */
	int32		lockouts;		/* lockouts so far, for the doubling */
	TimestampTz last_failure;
	TimestampTz locked_until;	/* 0 when never locked */
} EsThrottleEntry;

typedef struct EsDeferredEvent
{
	char		message_key[ES_DEFERRED_KEY_LEN];
	char		event_type[ES_DEFERRED_TYPE_LEN];
	char		data[ES_DEFERRED_DATA_LEN];
} EsDeferredEvent;

typedef struct EsThrottleShared
{
	LWLock	   *table_lock;		/* protects the hash table and evicted */
	LWLock	   *queue_lock;		/* protects the event ring */
	int64		evicted;
	int			queue_head;		/* index of the oldest queued event */
	int			queue_count;
	int64		queue_dropped;
	EsDeferredEvent queue[ES_DEFERRED_CAPACITY];
} EsThrottleShared;

/* Events this backend moved to the outbox, kept until its (sub)transaction ends. */
typedef struct EsClaimedBatch
{
	struct EsClaimedBatch *next;
	int			nest_level;
	int			count;
	EsDeferredEvent *events;
} EsClaimedBatch;

typedef enum EsThrottleKind
{
	ES_THROTTLE_ACCOUNT = 'a',
	ES_THROTTLE_SOURCE = 's'
} EsThrottleKind;

static EsThrottleShared *es_throttle = NULL;
static HTAB *es_throttle_table = NULL;
static EsClaimedBatch *es_claimed = NULL;
static bool es_claim_callbacks_registered = false;

PG_FUNCTION_INFO_V1(eventshop_login_throttle_check);
PG_FUNCTION_INFO_V1(eventshop_login_throttle_failure);
PG_FUNCTION_INFO_V1(eventshop_login_throttle_success);
PG_FUNCTION_INFO_V1(eventshop_login_throttle_clear);
PG_FUNCTION_INFO_V1(eventshop_login_throttle_status);
PG_FUNCTION_INFO_V1(eventshop_defer_event);
PG_FUNCTION_INFO_V1(eventshop_claim_deferred_events);

static void es_throttle_require(void);
static void es_throttle_key(EsThrottleKind kind, text *value, EsThrottleKey *key);
static int	es_throttle_remaining(const EsThrottleKey *key, TimestampTz now);
static int	es_throttle_fail(const EsThrottleKey *key, int max_failures, TimestampTz now);
static EsThrottleEntry *es_throttle_enter(const EsThrottleKey *key, TimestampTz now);
static void es_copy_field(char *dest, size_t size, const char *src, const char *what);
static void es_requeue_front(EsClaimedBatch *batch);
static void es_claim_xact_callback(XactEvent event, void *arg);
static void es_claim_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
									  SubTransactionId parentSubid, void *arg);

/* Reserves shared memory and the two LWLocks; called from the shmem request hook. */
void
es_login_throttle_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(EsThrottleShared)));
	RequestAddinShmemSpace(hash_estimate_size(es_login_throttle_entries, sizeof(EsThrottleEntry)));
	RequestNamedLWLockTranche(ES_THROTTLE_TRANCHE, 2);
}

/* Creates or attaches to the counters and the queue; called under AddinShmemInitLock. */
void
es_login_throttle_shmem_startup(void)
{
	bool		found;
	HASHCTL		info;

	es_throttle = ShmemInitStruct("eventshop login throttle", sizeof(EsThrottleShared), &found);
	if (!found)
	{
		LWLockPadded *locks = GetNamedLWLockTranche(ES_THROTTLE_TRANCHE);

		es_throttle->table_lock = &locks[0].lock;
		es_throttle->queue_lock = &locks[1].lock;
		es_throttle->evicted = 0;
		es_throttle->queue_head = 0;
		es_throttle->queue_count = 0;
		es_throttle->queue_dropped = 0;
	}
	memset(&info, 0, sizeof(info));
	info.keysize = sizeof(EsThrottleKey);
	info.entrysize = sizeof(EsThrottleEntry);
	es_throttle_table = ShmemInitHash("eventshop login throttle table",
									  es_login_throttle_entries, es_login_throttle_entries,
									  &info, HASH_ELEM | HASH_BLOBS);
}

/*
 * Seconds until a login for this account from this source may be tried
 * (0: now). Either argument may be NULL.
 */
Datum
eventshop_login_throttle_check(PG_FUNCTION_ARGS)
{
	TimestampTz now = GetCurrentTimestamp();
	EsThrottleKey key;
	int			wait = 0;

	es_throttle_require();
	LWLockAcquire(es_throttle->table_lock, LW_SHARED);
	if (!PG_ARGISNULL(0))
	{
		es_throttle_key(ES_THROTTLE_ACCOUNT, PG_GETARG_TEXT_PP(0), &key);
		wait = Max(wait, es_throttle_remaining(&key, now));
	}
	if (!PG_ARGISNULL(1))
	{
		es_throttle_key(ES_THROTTLE_SOURCE, PG_GETARG_TEXT_PP(1), &key);
		wait = Max(wait, es_throttle_remaining(&key, now));
	}
	LWLockRelease(es_throttle->table_lock);
	PG_RETURN_INT32(wait);
}

/*
 * Counts one failed login for the account and the source (either may be
 * NULL). Returns the length in seconds of the account lockout this failure
 * started, 0 if it started none (the caller emits user.locked then).
 */
Datum
eventshop_login_throttle_failure(PG_FUNCTION_ARGS)
{
	TimestampTz now = GetCurrentTimestamp();
	EsThrottleKey account_key;
	EsThrottleKey source_key;
	int			locked = 0;

	es_throttle_require();
	if (!PG_ARGISNULL(0))
		es_throttle_key(ES_THROTTLE_ACCOUNT, PG_GETARG_TEXT_PP(0), &account_key);
	if (!PG_ARGISNULL(1))
		es_throttle_key(ES_THROTTLE_SOURCE, PG_GETARG_TEXT_PP(1), &source_key);

	LWLockAcquire(es_throttle->table_lock, LW_EXCLUSIVE);
	if (!PG_ARGISNULL(0))
		locked = es_throttle_fail(&account_key, es_login_max_failures, now);
	if (!PG_ARGISNULL(1))
		(void) es_throttle_fail(&source_key, es_login_max_failures_per_source, now);
	LWLockRelease(es_throttle->table_lock);
	PG_RETURN_INT32(locked);
}

/* Forgets the account's failures and lockouts after a successful login or password reset. */
Datum
eventshop_login_throttle_success(PG_FUNCTION_ARGS)
{
	EsThrottleKey key;

	es_throttle_require();
	es_throttle_key(ES_THROTTLE_ACCOUNT, PG_GETARG_TEXT_PP(0), &key);
	LWLockAcquire(es_throttle->table_lock, LW_EXCLUSIVE);
	(void) hash_search(es_throttle_table, &key, HASH_REMOVE, NULL);
	LWLockRelease(es_throttle->table_lock);
	PG_RETURN_VOID();
}

/* Forgets every counter and lockout (operators, tests). Returns how many entries were dropped. */
Datum
eventshop_login_throttle_clear(PG_FUNCTION_ARGS)
{
	HASH_SEQ_STATUS status;
	EsThrottleEntry *entry;
	int64		removed = 0;

	(void) fcinfo;
	es_throttle_require();
	LWLockAcquire(es_throttle->table_lock, LW_EXCLUSIVE);
	hash_seq_init(&status, es_throttle_table);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		(void) hash_search(es_throttle_table, &entry->key, HASH_REMOVE, NULL);
		removed++;
	}
	LWLockRelease(es_throttle->table_lock);
	PG_RETURN_INT64(removed);
}

/* Reports table use and queue state, for monitoring and tests. */
Datum
eventshop_login_throttle_status(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[6];
	bool		nulls[6] = {false, false, false, false, false, false};
	HASH_SEQ_STATUS status;
	EsThrottleEntry *entry;
	TimestampTz now = GetCurrentTimestamp();
	int64		tracked = 0;
	int64		locked = 0;
	int64		evicted;
	int			queued;
	int64		dropped;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	es_throttle_require();

	LWLockAcquire(es_throttle->table_lock, LW_SHARED);
	hash_seq_init(&status, es_throttle_table);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		tracked++;
		if (entry->locked_until > now)
			locked++;
	}
	evicted = es_throttle->evicted;
	LWLockRelease(es_throttle->table_lock);

	LWLockAcquire(es_throttle->queue_lock, LW_SHARED);
	queued = es_throttle->queue_count;
	dropped = es_throttle->queue_dropped;
	LWLockRelease(es_throttle->queue_lock);

	values[0] = Int64GetDatum(tracked);
	values[1] = Int64GetDatum(locked);
	values[2] = Int32GetDatum(es_login_throttle_entries);
	values[3] = Int64GetDatum(evicted);
	values[4] = Int32GetDatum(queued);
	values[5] = Int64GetDatum(dropped);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * Queues a security event that must be written even though the caller's
 * transaction is about to fail. Returns false if the queue was full and the
 * event was dropped (counted in login_throttle_status().dropped_events).
 */
Datum
eventshop_defer_event(PG_FUNCTION_ARGS)
{
	EsDeferredEvent ev;
	char	   *data;
	bool		queued = false;

	es_throttle_require();
	memset(&ev, 0, sizeof(ev));
	es_copy_field(ev.message_key, sizeof(ev.message_key), text_to_cstring(PG_GETARG_TEXT_PP(0)), "message key");
	es_copy_field(ev.event_type, sizeof(ev.event_type), text_to_cstring(PG_GETARG_TEXT_PP(1)), "event type");
	data = JsonbToCString(NULL, &PG_GETARG_JSONB_P(2)->root, VARSIZE(PG_GETARG_JSONB_P(2)));
	es_copy_field(ev.data, sizeof(ev.data), data, "event data");

	LWLockAcquire(es_throttle->queue_lock, LW_EXCLUSIVE);
	if (es_throttle->queue_count < ES_DEFERRED_CAPACITY)
	{
		int			slot = (es_throttle->queue_head + es_throttle->queue_count) % ES_DEFERRED_CAPACITY;

		es_throttle->queue[slot] = ev;
		es_throttle->queue_count++;
		queued = true;
	}
	else
		es_throttle->queue_dropped++;
	LWLockRelease(es_throttle->queue_lock);

	/* the caller's transaction fails: wake the relay now, not at commit */
	if (queued)
		es_wake_worker(ES_WORKER_RELAY);
	PG_RETURN_BOOL(queued);
}

/* Whether any deferred event waits; the relay then flushes them to the outbox. */
bool
es_deferred_events_pending(void)
{
	return es_throttle != NULL && es_throttle->queue_count > 0;
}

/*
 * Takes every queued event out of the ring and returns them, oldest first,
 * for the caller to write to the outbox. If the caller's (sub)transaction
 * aborts, the events go back to the front of the ring.
 */
Datum
eventshop_claim_deferred_events(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	EsClaimedBatch *batch;
	int			count;

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	es_throttle_require();
	if (!es_claim_callbacks_registered)
	{
		RegisterXactCallback(es_claim_xact_callback, NULL);
		RegisterSubXactCallback(es_claim_subxact_callback, NULL);
		es_claim_callbacks_registered = true;
	}

	/* cheap when there is nothing to do: no lock, no allocation */
	if (es_throttle->queue_count == 0)
		return (Datum) 0;

	batch = MemoryContextAllocZero(TopMemoryContext, sizeof(EsClaimedBatch));
	batch->events = MemoryContextAlloc(TopMemoryContext, sizeof(EsDeferredEvent) * ES_DEFERRED_CAPACITY);
	LWLockAcquire(es_throttle->queue_lock, LW_EXCLUSIVE);
	count = es_throttle->queue_count;
	for (int i = 0; i < count; i++)
		batch->events[i] = es_throttle->queue[(es_throttle->queue_head + i) % ES_DEFERRED_CAPACITY];
	es_throttle->queue_head = (es_throttle->queue_head + count) % ES_DEFERRED_CAPACITY;
	es_throttle->queue_count = 0;
	LWLockRelease(es_throttle->queue_lock);

	batch->count = count;
	batch->nest_level = GetCurrentTransactionNestLevel();
	batch->next = es_claimed;
	es_claimed = batch;

	for (int i = 0; i < count; i++)
	{
		Datum		values[3];
		bool		nulls[3] = {false, false, false};

		values[0] = CStringGetTextDatum(batch->events[i].message_key);
		values[1] = CStringGetTextDatum(batch->events[i].event_type);
		values[2] = DirectFunctionCall1(jsonb_in, CStringGetDatum(batch->events[i].data));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* Refuses to run when the library was not preloaded (no shared memory). */
static void
es_throttle_require(void)
{
	if (es_throttle == NULL || es_throttle_table == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("eventshop shared memory is not initialized"),
				 errhint("Add eventshop to shared_preload_libraries and restart the server.")));
}

/* Derives the table key of an account or source: SHA-256(kind ':' value), first 16 bytes. */
static void
es_throttle_key(EsThrottleKind kind, text *value, EsThrottleKey *key)
{
	size_t		len = VARSIZE_ANY_EXHDR(value);
	unsigned char *buf = palloc(len + 2);
	unsigned char digest[SHA256_DIGEST_LENGTH];

	buf[0] = (unsigned char) kind;
	buf[1] = ':';
	memcpy(buf + 2, VARDATA_ANY(value), len);
	SHA256(buf, len + 2, digest);
	memcpy(key->bytes, digest, ES_THROTTLE_KEY_LEN);
	pfree(buf);
}

/* Seconds (rounded up) this key stays locked; caller holds the table lock. */
static int
es_throttle_remaining(const EsThrottleKey *key, TimestampTz now)
{
	EsThrottleEntry *entry = hash_search(es_throttle_table, key, HASH_FIND, NULL);

	if (entry == NULL || entry->locked_until <= now)
		return 0;
	return (int) ((entry->locked_until - now + USECS_PER_SEC - 1) / USECS_PER_SEC);
}

/*
 * Counts one failure for a key; returns the lockout in seconds if this
 * failure started one, else 0. Caller holds the table lock exclusively.
 */
static int
es_throttle_fail(const EsThrottleKey *key, int max_failures, TimestampTz now)
{
	EsThrottleEntry *entry = es_throttle_enter(key, now);
	int64		lockout_s;

	if (entry->locked_until > now)
		return 0;				/* already locked: the caller did not even try */
	if (entry->last_failure != 0 && now - entry->last_failure > ES_LOCKOUT_MEMORY_US)
		entry->lockouts = 0;
	if (entry->last_failure != 0 &&
		now - entry->last_failure > (int64) es_login_failure_window_s * USECS_PER_SEC)
		entry->failures = 0;
	entry->failures++;
	entry->last_failure = now;
	if (entry->failures < max_failures)
		return 0;

	lockout_s = es_login_lockout_s;
	for (int i = 0; i < entry->lockouts && lockout_s < es_login_lockout_max_s; i++)
		lockout_s *= 2;
	lockout_s = Min(lockout_s, (int64) es_login_lockout_max_s);
	entry->lockouts++;
	entry->failures = 0;
	entry->locked_until = now + lockout_s * USECS_PER_SEC;
	return (int) lockout_s;
}

/*
 * Finds or creates a key's entry, evicting one when the table is full:
 * the unlocked entry idle longest, or failing that the locked entry whose
 * lock ends first. Caller holds the table lock exclusively.
 */
static EsThrottleEntry *
es_throttle_enter(const EsThrottleKey *key, TimestampTz now)
{
	EsThrottleEntry *entry;
	bool		found;

	entry = hash_search(es_throttle_table, key, HASH_FIND, NULL);
	if (entry != NULL)
		return entry;

	if (hash_get_num_entries(es_throttle_table) >= es_login_throttle_entries)
	{
		HASH_SEQ_STATUS status;
		EsThrottleEntry *candidate;
		EsThrottleEntry *victim = NULL;
		bool		victim_locked = true;

		hash_seq_init(&status, es_throttle_table);
		while ((candidate = hash_seq_search(&status)) != NULL)
		{
			bool		locked = candidate->locked_until > now;

			if (victim == NULL ||
				(victim_locked && !locked) ||
				(victim_locked == locked &&
				 (locked ? candidate->locked_until < victim->locked_until
				  : candidate->last_failure < victim->last_failure)))
			{
				victim = candidate;
				victim_locked = locked;
			}
		}
		if (victim != NULL)
		{
			EsThrottleKey victim_key = victim->key;

			(void) hash_search(es_throttle_table, &victim_key, HASH_REMOVE, NULL);
			es_throttle->evicted++;
		}
	}

	entry = hash_search(es_throttle_table, key, HASH_ENTER_NULL, &found);
	if (entry == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of shared memory for login throttling"),
				 errhint("Raise eventshop.login_throttle_entries.")));
	if (!found)
	{
		entry->failures = 0;
		entry->lockouts = 0;
		entry->last_failure = 0;
		entry->locked_until = 0;
	}
	return entry;
}

/* Copies a NUL-terminated string into a fixed field, refusing what does not fit. */
static void
es_copy_field(char *dest, size_t size, const char *src, const char *what)
{
	size_t		len = strlen(src);

	if (len == 0 || len >= size)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("deferred %s must be 1 to %d bytes long", what, (int) size - 1)));
	memcpy(dest, src, len + 1);
}

/* Puts a batch back at the front of the ring, in its original order, dropping what no longer fits. */
static void
es_requeue_front(EsClaimedBatch *batch)
{
	LWLockAcquire(es_throttle->queue_lock, LW_EXCLUSIVE);
	for (int i = batch->count - 1; i >= 0; i--)
	{
		if (es_throttle->queue_count >= ES_DEFERRED_CAPACITY)
		{
			es_throttle->queue_dropped += i + 1;
			break;
		}
		es_throttle->queue_head = (es_throttle->queue_head + ES_DEFERRED_CAPACITY - 1) % ES_DEFERRED_CAPACITY;
		es_throttle->queue[es_throttle->queue_head] = batch->events[i];
		es_throttle->queue_count++;
	}
	LWLockRelease(es_throttle->queue_lock);
}

/* At commit the claimed events are in the outbox: forget them; at abort: queue them again. */
static void
es_claim_xact_callback(XactEvent event, void *arg)
{
	bool		requeue;

	(void) arg;
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_PREPARE:
			requeue = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			requeue = true;
			break;
		default:
			return;
	}
	while (es_claimed != NULL)
	{
		EsClaimedBatch *batch = es_claimed;

		es_claimed = batch->next;
		if (requeue)
			es_requeue_front(batch);
		pfree(batch->events);
		pfree(batch);
	}
}

/* A subtransaction that aborts gives its events back; one that commits hands them to its parent. */
static void
es_claim_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						  SubTransactionId parentSubid, void *arg)
{
	int			level = GetCurrentTransactionNestLevel();
	EsClaimedBatch **link = &es_claimed;

	(void) mySubid;
	(void) parentSubid;
	(void) arg;
	if (event != SUBXACT_EVENT_ABORT_SUB && event != SUBXACT_EVENT_COMMIT_SUB)
		return;
	while (*link != NULL)
	{
		EsClaimedBatch *batch = *link;

		if (batch->nest_level < level)
		{
			link = &batch->next;
			continue;
		}
		if (event == SUBXACT_EVENT_COMMIT_SUB)
		{
			batch->nest_level = level - 1;
			link = &batch->next;
			continue;
		}
		*link = batch->next;
		es_requeue_front(batch);
		pfree(batch->events);
		pfree(batch);
	}
}
