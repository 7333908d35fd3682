/*
 * shared_state.c
 *		Shared memory holding each worker's latch, so that a backend that
 *		commits an outbox row (or any other work for a worker) can wake that
 *		worker at once instead of the worker polling on a timer.
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "storage/spin.h"

#include "login_throttle.h"
#include "password_hash.h"
#include "relay_stats.h"
#include "shared_state.h"

typedef struct EsSharedState
{
	slock_t		mutex;			/* protects worker_latch[][] */
	Latch	   *worker_latch[ES_WORKER_COUNT][ES_MAX_WORKER_SLOTS];
} EsSharedState;

static EsSharedState *es_state = NULL;
static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void es_shmem_request(void);
static void es_shmem_startup(void);
static void es_unregister_worker_latch(int code, Datum arg);

/* Installs the hooks that size and create the shared state; called from _PG_init. */
void
es_shared_state_init(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = es_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = es_shmem_startup;
}

/* Reserves our slice of shared memory. */
static void
es_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(EsSharedState)));
	RequestAddinShmemSpace(es_password_hash_shmem_size());
	es_login_throttle_shmem_request();
	RequestAddinShmemSpace(es_relay_stats_shmem_size());
}

/* Creates or attaches to the shared state. */
static void
es_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	es_state = ShmemInitStruct("eventshop", sizeof(EsSharedState), &found);
	if (!found)
	{
		SpinLockInit(&es_state->mutex);
		memset(es_state->worker_latch, 0, sizeof(es_state->worker_latch));
	}
	es_password_hash_shmem_startup();
	es_login_throttle_shmem_startup();
	es_relay_stats_shmem_startup();
	LWLockRelease(AddinShmemInitLock);
}

/* Publishes this process's latch as the one to set for work of this kind and slot. */
void
es_register_worker_latch(EsWorkerKind kind, int slot)
{
	Assert(kind >= 0 && kind < ES_WORKER_COUNT);
	if (es_state == NULL)
		elog(ERROR, "eventshop shared state is not initialized");
	if (slot < 0 || slot >= ES_MAX_WORKER_SLOTS)
		elog(ERROR, "eventshop worker slot %d is out of range", slot);

	SpinLockAcquire(&es_state->mutex);
	es_state->worker_latch[kind][slot] = MyLatch;
	SpinLockRelease(&es_state->mutex);
	on_shmem_exit(es_unregister_worker_latch, Int32GetDatum(kind * ES_MAX_WORKER_SLOTS + slot));
}

/* Withdraws the latch on exit, so nobody sets a latch of a dead process. */
static void
es_unregister_worker_latch(int code, Datum arg)
{
	int			kind = DatumGetInt32(arg) / ES_MAX_WORKER_SLOTS;
	int			slot = DatumGetInt32(arg) % ES_MAX_WORKER_SLOTS;

	(void) code;
	SpinLockAcquire(&es_state->mutex);
	if (es_state->worker_latch[kind][slot] == MyLatch)
		es_state->worker_latch[kind][slot] = NULL;
	SpinLockRelease(&es_state->mutex);
}

/*
 * Sets the latches of the running workers of a kind. Latches are set after
 * the spinlock is released (SetLatch may make a system call); a latch of a
 * worker that exits meanwhile stays valid memory in its PGPROC.
 */
void
es_wake_worker(EsWorkerKind kind)
{
	Latch	   *latches[ES_MAX_WORKER_SLOTS];
	int			count = 0;

	if (es_state == NULL)
		return;
	SpinLockAcquire(&es_state->mutex);
	for (int slot = 0; slot < ES_MAX_WORKER_SLOTS; slot++)
		if (es_state->worker_latch[kind][slot] != NULL)
			latches[count++] = es_state->worker_latch[kind][slot];
	SpinLockRelease(&es_state->mutex);
	for (int i = 0; i < count; i++)
		SetLatch(latches[i]);
}
