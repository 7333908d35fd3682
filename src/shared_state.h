/*
 * shared_state.h
 *		The little shared memory eventshop needs: where each worker's latch
 *		is, so that committing backends can wake them.
 */
#ifndef EVENTSHOP_SHARED_STATE_H
#define EVENTSHOP_SHARED_STATE_H

#include "storage/latch.h"

typedef enum EsWorkerKind
{
	ES_WORKER_RELAY = 0,
	ES_WORKER_DISPATCHER,
	ES_WORKER_COUNT
} EsWorkerKind;

extern void es_shared_state_init(void);

/* A worker announces its latch when it starts, and withdraws it on exit. */
extern void es_register_worker_latch(EsWorkerKind kind);

/* Wake a worker if it runs; a no-op otherwise. */
extern void es_wake_worker(EsWorkerKind kind);

#endif							/* EVENTSHOP_SHARED_STATE_H */
