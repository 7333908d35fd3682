/*
 * relay_stats.h
 *		Counters the relay worker keeps in shared memory for the
 *		eventshop.outbox_status view: messages produced and acknowledged,
 *		parked events, the last delivery error, the broker state and a
 *		histogram of commit-to-acknowledgement latency.
 */
#ifndef EVENTSHOP_RELAY_STATS_H
#define EVENTSHOP_RELAY_STATS_H

#include "datatype/timestamp.h"

typedef enum EsBrokerState
{
	ES_BROKER_UNKNOWN = 0,
	ES_BROKER_UP,
	ES_BROKER_DOWN
} EsBrokerState;

extern Size es_relay_stats_shmem_size(void);
extern void es_relay_stats_shmem_startup(void);

/* Called by the relay worker only (single writer). */
extern void es_relay_stats_worker_started(void);
extern void es_relay_stats_produced(uint64 count);
extern void es_relay_stats_acknowledged(TimestampTz created_at, TimestampTz acked_at);
extern void es_relay_stats_parked(uint64 count);
extern void es_relay_stats_error(const char *error);
extern void es_relay_stats_broker_state(EsBrokerState state);

#endif							/* EVENTSHOP_RELAY_STATS_H */
