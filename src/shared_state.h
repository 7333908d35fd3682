/*
 * shared_state.h
 *		The little shared memory eventshop needs: where each worker's latch
 *		is (one per slot, for kinds with several workers), so that
 *		committing backends can wake them.
 */
#ifndef EVENTSHOP_SHARED_STATE_H
#define EVENTSHOP_SHARED_STATE_H

#include "storage/latch.h"

typedef enum EsWorkerKind
{
	ES_WORKER_RELAY = 0,
	ES_WORKER_DISPATCHER,
	ES_WORKER_SENDER,
	ES_WORKER_COUNT
} EsWorkerKind;

/* Most workers of one kind (eventshop.sender_workers is capped at this). */
#define ES_MAX_WORKER_SLOTS	64

extern void es_shared_state_init(void);

/*
 * A worker announces its latch when it starts, and withdraws it on exit;
 * slot tells workers of one kind apart (0 for the single relay/dispatcher).
 */
extern void es_register_worker_latch(EsWorkerKind kind, int slot);

/* Wake every running worker of a kind; a no-op when none runs. */
extern void es_wake_worker(EsWorkerKind kind);

#endif							/* EVENTSHOP_SHARED_STATE_H */
