/*
 * worker_runtime.h
 *		What every eventshop background worker does the same way: signals,
 *		connecting to eventshop.database, waiting for the extension, the
 *		latch wait with reload handling, and the transaction bracket.
 */
#ifndef EVENTSHOP_WORKER_RUNTIME_H
#define EVENTSHOP_WORKER_RUNTIME_H

#include "executor/spi.h"

#include "shared_state.h"

/* Installs signal handlers, connects to eventshop.database and publishes the latch. */
extern void es_worker_start(EsWorkerKind kind);

/*
 * Whether CREATE EXTENSION eventshop has run in this database. Logs once
 * while it has not, so the caller can just sleep and ask again.
 */
extern bool es_worker_extension_ready(void);

/*
 * Sleeps until the latch is set, socket (if not PGINVALID_SOCKET) is
 * readable, or timeout_ms passes (-1: no timeout); then handles SIGTERM and
 * SIGHUP. Returns true if the configuration was reloaded.
 */
extern bool es_worker_wait(long timeout_ms, pgsocket socket);

/* Handles pending interrupts and configuration reloads without sleeping. */
extern bool es_worker_check_interrupts(void);

/* Starts a transaction with a snapshot and SPI, showing activity in pg_stat_activity. */
extern void es_worker_begin(const char *activity);

/* Finishes SPI and commits the transaction begun by es_worker_begin. */
extern void es_worker_commit(void);

/* A SELECT planned on first use and kept for the life of the worker. */
typedef struct EsWorkerQuery
{
	const char *sql;
	int			nargs;
	Oid			argtypes[10];
	SPIPlanPtr	plan;
} EsWorkerQuery;

/* Runs a kept query inside es_worker_begin/es_worker_commit; ERROR unless it returned rows as a SELECT. */
extern void es_worker_run(EsWorkerQuery *query, Datum *values, const char *nulls);

#endif							/* EVENTSHOP_WORKER_RUNTIME_H */
