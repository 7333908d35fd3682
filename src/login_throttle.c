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
 * Counters: two fixed-size hash tables (ShmemInitHash), one for accounts and
 * one for sources, each of eventshop.login_throttle_entries keys, so that a
 * flood of sources cannot push accounts out (nor the reverse). Keys are the
 * first 16 bytes of SHA-256(kind || value), so no address is kept in shared
 * memory. One LWLock protects both tables.
 *
 * An attempt is counted when it begins, not when it has failed:
 * eventshop_login_throttle_begin, under the lock held exclusively, refuses
 * the attempt while its account or its source is locked, and otherwise
 * counts it against both at once (max counted attempts within
 * eventshop.login_failure_window lock the key for eventshop.login_lockout,
 * doubling with every further lockout up to eventshop.login_lockout_max; the
 * doubling is forgotten after a day without failures). So however many
 * attempts run concurrently, at most max of them for one account get as far
 * as checking a password. A successful attempt then clears its account's
 * entry and takes its own count back from the source (not more: an attacker
 * could otherwise clear a source with an account of its own).
 *
 * When a table is full, only entries that carry no protection are dropped:
 * never one that is locked or whose failures are still inside the window.
 * Entries with nothing left to remember go first (all at once), then the one
 * idle longest of those that only remember past lockouts for the doubling.
 * When no entry may go, the new key is refused: its attempt is answered as
 * if it were locked out, until an entry may go. Flooding the table therefore
 * never unlocks or resets anyone; it can only refuse keys that are not
 * tracked yet (login_throttle_status() counts them as refused).
 *
 * Events: a ring of ES_DEFERRED_CAPACITY events (user.login_failed,
 * user.locked). eventshop.flush_security_events() moves them into the outbox
 * in the caller's transaction (the relay worker calls it as soon as one is
 * queued); events claimed by a transaction (or subtransaction) that aborts
 * go back to the front of the ring. When the ring is full, new events are
 * dropped and counted.
 */
#include "postgres.h"

#include <openssl/sha.h>

#include "access/htup_details.h"
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
/* a full table with nothing to drop is scanned again at most this often */
#define ES_THROTTLE_RESCAN_US		(USECS_PER_SEC)
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
	int32		failures;		/* attempts counted since the last lockout or reset */
	int32		lockouts;		/* lockouts so far, for the doubling */
	TimestampTz last_failure;	/* when the last attempt was counted */
	TimestampTz locked_until;	/* 0 when never locked */
} EsThrottleEntry;

typedef struct EsDeferredEvent
{
	char		message_key[ES_DEFERRED_KEY_LEN];
	char		event_type[ES_DEFERRED_TYPE_LEN];
	char		data[ES_DEFERRED_DATA_LEN];
} EsDeferredEvent;

/* Per-table state kept under the table lock. */
typedef struct EsThrottleTableState
{
	TimestampTz next_scan;		/* full and nothing to drop: do not scan before this */
	TimestampTz next_free;		/* when the first entry may be dropped (for the hint) */
} EsThrottleTableState;

typedef struct EsThrottleShared
{
	LWLock	   *table_lock;		/* protects both hash tables, tables[] and the counters below */
	LWLock	   *queue_lock;		/* protects the event ring */
	int64		evicted;		/* entries dropped to make room */
	int64		refused;		/* new keys refused because their table was full */
	EsThrottleTableState tables[2];
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

/* Index of each kind's table in es_throttle_tables[] and EsThrottleShared.tables[]. */
#define ES_TABLE_ACCOUNTS	0
#define ES_TABLE_SOURCES	1

static EsThrottleShared *es_throttle = NULL;
static HTAB *es_throttle_tables[2] = {NULL, NULL};
static EsClaimedBatch *es_claimed = NULL;
static bool es_claim_callbacks_registered = false;

PG_FUNCTION_INFO_V1(eventshop_login_throttle_begin);
PG_FUNCTION_INFO_V1(eventshop_login_throttle_success);
PG_FUNCTION_INFO_V1(eventshop_login_throttle_clear);
PG_FUNCTION_INFO_V1(eventshop_login_throttle_status);
PG_FUNCTION_INFO_V1(eventshop_defer_event);
PG_FUNCTION_INFO_V1(eventshop_claim_deferred_events);

static void es_throttle_require(void);
static void es_throttle_key(EsThrottleKind kind, text *value, EsThrottleKey *key);
static int	es_throttle_remaining(const EsThrottleEntry *entry, TimestampTz now);
static int	es_throttle_count(EsThrottleEntry *entry, int max_failures, TimestampTz now);
static EsThrottleEntry *es_throttle_enter(int table, const EsThrottleKey *key, TimestampTz now,
										  int *wait);
static bool es_throttle_make_room(int table, TimestampTz now);
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
	/* one table for accounts, one for sources */
	RequestAddinShmemSpace(mul_size(2, hash_estimate_size(es_login_throttle_entries, sizeof(EsThrottleEntry))));
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
		es_throttle->refused = 0;
		memset(es_throttle->tables, 0, sizeof(es_throttle->tables));
		es_throttle->queue_head = 0;
		es_throttle->queue_count = 0;
		es_throttle->queue_dropped = 0;
	}
	memset(&info, 0, sizeof(info));
	info.keysize = sizeof(EsThrottleKey);
	info.entrysize = sizeof(EsThrottleEntry);
	es_throttle_tables[ES_TABLE_ACCOUNTS] =
		ShmemInitHash("eventshop login throttle accounts",
					  es_login_throttle_entries, es_login_throttle_entries,
					  &info, HASH_ELEM | HASH_BLOBS);
	es_throttle_tables[ES_TABLE_SOURCES] =
		ShmemInitHash("eventshop login throttle sources",
					  es_login_throttle_entries, es_login_throttle_entries,
					  &info, HASH_ELEM | HASH_BLOBS);
}

/*
 * _login_throttle_begin(account, source) -> (wait_seconds, locked_seconds,
 * source_lock): the one atomic step that admits a login attempt. Either
 * argument may be NULL (not counted). Under the table lock held exclusively:
 * while the account or the source is locked, or a key that is not tracked
 * yet cannot be (its table is full of entries that may not go), the attempt
 * is refused (wait_seconds > 0: how long to wait) and counts nothing.
 * Otherwise it is counted against both now, before any password is checked
 * (wait_seconds = 0); locked_seconds is the length of the account lockout
 * this attempt started (0 if none; the caller emits user.locked if the
 * attempt then fails), and source_lock identifies the source lockout it
 * started (NULL if none), for eventshop_login_throttle_success to undo if
 * the attempt succeeds.
 */
Datum
eventshop_login_throttle_begin(PG_FUNCTION_ARGS)
{
	TimestampTz now = GetCurrentTimestamp();
	bool		has_account = !PG_ARGISNULL(0);
	bool		has_source = !PG_ARGISNULL(1);
	EsThrottleKey account_key;
	EsThrottleKey source_key;
	EsThrottleEntry *account = NULL;
	EsThrottleEntry *source = NULL;
	TupleDesc	tupdesc;
	Datum		values[3];
	bool		nulls[3] = {false, false, true};
	int			wait = 0;
	int			locked = 0;
	TimestampTz source_lock = 0;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	es_throttle_require();
	if (has_account)
		es_throttle_key(ES_THROTTLE_ACCOUNT, PG_GETARG_TEXT_PP(0), &account_key);
	if (has_source)
		es_throttle_key(ES_THROTTLE_SOURCE, PG_GETARG_TEXT_PP(1), &source_key);

	LWLockAcquire(es_throttle->table_lock, LW_EXCLUSIVE);
	if (has_account)
	{
		account = hash_search(es_throttle_tables[ES_TABLE_ACCOUNTS], &account_key, HASH_FIND, NULL);
		wait = Max(wait, es_throttle_remaining(account, now));
	}
	if (has_source)
	{
		source = hash_search(es_throttle_tables[ES_TABLE_SOURCES], &source_key, HASH_FIND, NULL);
		wait = Max(wait, es_throttle_remaining(source, now));
	}
	/* new keys: a full table that may not drop anything refuses them */
	if (wait == 0 && has_account && account == NULL)
		account = es_throttle_enter(ES_TABLE_ACCOUNTS, &account_key, now, &wait);
	if (wait == 0 && has_source && source == NULL)
		source = es_throttle_enter(ES_TABLE_SOURCES, &source_key, now, &wait);
	if (wait == 0)
	{
		if (account != NULL)
			locked = es_throttle_count(account, es_login_max_failures, now);
		if (source != NULL && es_throttle_count(source, es_login_max_failures_per_source, now) > 0)
			source_lock = source->locked_until;
	}
	LWLockRelease(es_throttle->table_lock);

	values[0] = Int32GetDatum(wait);
	values[1] = Int32GetDatum(locked);
	if (source_lock != 0)
	{
		values[2] = TimestampTzGetDatum(source_lock);
		nulls[2] = false;
	}
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * _login_throttle_success(account, source, source_lock): after a successful
 * login (or password reset, change or unblock), forgets the account's
 * failures and lockouts; and takes back from the source the one attempt the
 * successful login counted (undoing the source lockout that attempt started,
 * if source_lock names it). Every argument may be NULL.
 */
Datum
eventshop_login_throttle_success(PG_FUNCTION_ARGS)
{
	EsThrottleKey key;
	TimestampTz now = GetCurrentTimestamp();

	es_throttle_require();
	if (!PG_ARGISNULL(0))
	{
		es_throttle_key(ES_THROTTLE_ACCOUNT, PG_GETARG_TEXT_PP(0), &key);
		LWLockAcquire(es_throttle->table_lock, LW_EXCLUSIVE);
		(void) hash_search(es_throttle_tables[ES_TABLE_ACCOUNTS], &key, HASH_REMOVE, NULL);
		LWLockRelease(es_throttle->table_lock);
	}
	if (!PG_ARGISNULL(1))
	{
		EsThrottleEntry *entry;
		TimestampTz source_lock = PG_ARGISNULL(2) ? 0 : PG_GETARG_TIMESTAMPTZ(2);

		es_throttle_key(ES_THROTTLE_SOURCE, PG_GETARG_TEXT_PP(1), &key);
		LWLockAcquire(es_throttle->table_lock, LW_EXCLUSIVE);
		entry = hash_search(es_throttle_tables[ES_TABLE_SOURCES], &key, HASH_FIND, NULL);
		if (entry != NULL)
		{
			if (source_lock != 0 && entry->locked_until == source_lock)
			{
				/* the lockout our attempt started: as if the attempt had not been counted */
				entry->locked_until = 0;
				entry->lockouts = Max(entry->lockouts - 1, 0);
				entry->failures = Max(es_login_max_failures_per_source - 1, 0);
			}
			else if (entry->locked_until <= now && entry->failures > 0)
				entry->failures--;
		}
		LWLockRelease(es_throttle->table_lock);
	}
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
	for (int t = 0; t < 2; t++)
	{
		hash_seq_init(&status, es_throttle_tables[t]);
		while ((entry = hash_seq_search(&status)) != NULL)
		{
			(void) hash_search(es_throttle_tables[t], &entry->key, HASH_REMOVE, NULL);
			removed++;
		}
		es_throttle->tables[t].next_scan = 0;
		es_throttle->tables[t].next_free = 0;
	}
	LWLockRelease(es_throttle->table_lock);
	PG_RETURN_INT64(removed);
}

/* Reports table use and queue state, for monitoring and tests. */
Datum
eventshop_login_throttle_status(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[8];
	bool		nulls[8] = {false, false, false, false, false, false, false, false};
	HASH_SEQ_STATUS status;
	EsThrottleEntry *entry;
	TimestampTz now = GetCurrentTimestamp();
	int64		tracked = 0;
	int64		locked = 0;
	int64		sources = 0;
	int64		evicted;
	int64		refused;
	int			queued;
	int64		dropped;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	es_throttle_require();

	LWLockAcquire(es_throttle->table_lock, LW_SHARED);
	for (int t = 0; t < 2; t++)
	{
		hash_seq_init(&status, es_throttle_tables[t]);
		while ((entry = hash_seq_search(&status)) != NULL)
		{
			tracked++;
			if (t == ES_TABLE_SOURCES)
				sources++;
			if (entry->locked_until > now)
				locked++;
		}
	}
	evicted = es_throttle->evicted;
	refused = es_throttle->refused;
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
	values[6] = Int64GetDatum(sources);
	values[7] = Int64GetDatum(refused);
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
	if (es_throttle == NULL || es_throttle_tables[ES_TABLE_ACCOUNTS] == NULL ||
		es_throttle_tables[ES_TABLE_SOURCES] == NULL)
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

/* Seconds (rounded up) an entry stays locked, 0 for none; caller holds the table lock. */
static int
es_throttle_remaining(const EsThrottleEntry *entry, TimestampTz now)
{
	if (entry == NULL || entry->locked_until <= now)
		return 0;
	return (int) ((entry->locked_until - now + USECS_PER_SEC - 1) / USECS_PER_SEC);
}

/*
 * Counts one attempt against an entry that is not locked; returns the
 * lockout in seconds if this attempt started one, else 0. Caller holds the
 * table lock exclusively.
 */
static int
es_throttle_count(EsThrottleEntry *entry, int max_failures, TimestampTz now)
{
	int64		lockout_s;

	Assert(entry->locked_until <= now);
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
 * Creates the entry of a key that is not in its table yet. When the table is
 * full and no entry may be dropped (es_throttle_make_room), refuses: returns
 * NULL and sets *wait to the seconds until one may. Caller holds the table
 * lock exclusively.
 */
static EsThrottleEntry *
es_throttle_enter(int table, const EsThrottleKey *key, TimestampTz now, int *wait)
{
	HTAB	   *htab = es_throttle_tables[table];
	EsThrottleEntry *entry;
	bool		found;

	if (hash_get_num_entries(htab) >= es_login_throttle_entries && !es_throttle_make_room(table, now))
	{
		TimestampTz next_free = es_throttle->tables[table].next_free;

		es_throttle->refused++;
		*wait = next_free > now ? (int) Min((next_free - now + USECS_PER_SEC - 1) / USECS_PER_SEC, (int64) INT_MAX) : 1;
		return NULL;
	}

	entry = hash_search(htab, key, HASH_ENTER_NULL, &found);
	if (entry == NULL)
	{
		/* the table's share of shared memory is used up: refuse like a full table */
		es_throttle->refused++;
		*wait = 1;
		return NULL;
	}
	if (!found)
	{
		entry->failures = 0;
		entry->lockouts = 0;
		entry->last_failure = 0;
		entry->locked_until = 0;
	}
	return entry;
}

/*
 * Makes room in a full table by dropping entries that protect nothing any
 * more; returns false when there is none. An entry that is locked, or whose
 * failures are still inside eventshop.login_failure_window, is never dropped.
 * Entries that remember nothing else are all dropped in one scan; if there
 * is none, the entry idle longest of those that only remember earlier
 * lockouts (for the doubling, within a day) is dropped. A scan that finds
 * nothing records when the first entry may go and is not repeated before
 * then (nor more than once a second), so a flood of new keys against a full
 * table costs a hash lookup each, not a scan. Caller holds the table lock
 * exclusively.
 */
static bool
es_throttle_make_room(int table, TimestampTz now)
{
	HTAB	   *htab = es_throttle_tables[table];
	EsThrottleTableState *state = &es_throttle->tables[table];
	int64		window_us = (int64) es_login_failure_window_s * USECS_PER_SEC;
	HASH_SEQ_STATUS status;
	EsThrottleEntry *entry;
	EsThrottleKey oldest_key;
	TimestampTz oldest = 0;
	TimestampTz next_free = 0;
	bool		have_oldest = false;
	int64		dropped = 0;

	if (now < state->next_scan)
		return false;

	hash_seq_init(&status, htab);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		bool		locked = entry->locked_until > now;
		bool		in_window = entry->failures > 0 && now - entry->last_failure <= window_us;

		if (locked || in_window)
		{
			TimestampTz free_at = 0;

			if (locked)
				free_at = entry->locked_until;
			if (entry->failures > 0)
				free_at = Max(free_at, entry->last_failure + window_us);
			if (next_free == 0 || free_at < next_free)
				next_free = free_at;
			continue;
		}
		if (entry->lockouts == 0 || now - entry->last_failure > ES_LOCKOUT_MEMORY_US)
		{
			/* remembers nothing: dropping it loses nothing (removing the current entry is allowed) */
			(void) hash_search(htab, &entry->key, HASH_REMOVE, NULL);
			dropped++;
		}
		else if (!have_oldest || entry->last_failure < oldest)
		{
			oldest_key = entry->key;
			oldest = entry->last_failure;
			have_oldest = true;
		}
	}
	if (dropped == 0 && have_oldest)
	{
		(void) hash_search(htab, &oldest_key, HASH_REMOVE, NULL);
		dropped = 1;
	}
	es_throttle->evicted += dropped;
	if (dropped > 0)
	{
		state->next_scan = 0;
		return true;
	}
	state->next_free = next_free;
	state->next_scan = Min(next_free, now + ES_THROTTLE_RESCAN_US);
	return false;
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
