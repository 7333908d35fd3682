/*
 * worker_runtime.c
 *		The worker_spi-style skeleton shared by the relay and the dispatcher:
 *		signal handling, database connection, latch waits that stay
 *		responsive to SIGTERM and SIGHUP, and one transaction per batch.
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/pmsignal.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/snapmgr.h"

#include "config.h"
#include "worker_runtime.h"

static bool missing_extension_logged = false;

/* Installs signal handlers, connects to eventshop.database and publishes the latch. */
void
es_worker_start(EsWorkerKind kind)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(es_database, NULL, 0);
	/* workers of a kind with several members get their slot as main_arg */
	es_register_worker_latch(kind, DatumGetInt32(MyBgworkerEntry->bgw_main_arg));
	ereport(LOG,
			(errmsg("%s started in database \"%s\"", MyBgworkerEntry->bgw_type, es_database)));
}

/* Whether the extension exists here; logs once while it does not. */
bool
es_worker_extension_ready(void)
{
	bool		ready;

	StartTransactionCommand();
	ready = OidIsValid(get_extension_oid("eventshop", true));
	CommitTransactionCommand();

	if (!ready && !missing_extension_logged)
		ereport(LOG,
				(errmsg("%s is waiting for CREATE EXTENSION eventshop in database \"%s\"",
						MyBgworkerEntry->bgw_type, es_database)));
	missing_extension_logged = !ready;
	return ready;
}

/* Sleeps on the latch (and optionally a socket), then serves interrupts and reloads. */
bool
es_worker_wait(long timeout_ms, pgsocket socket)
{
	int			events = WL_LATCH_SET | WL_EXIT_ON_PM_DEATH;

	if (timeout_ms >= 0)
		events |= WL_TIMEOUT;
	if (socket != PGINVALID_SOCKET)
		events |= WL_SOCKET_READABLE;

	(void) WaitLatchOrSocket(MyLatch, events, socket, timeout_ms, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	return es_worker_check_interrupts();
}

/*
 * Handles SIGTERM (via CHECK_FOR_INTERRUPTS) and SIGHUP; true if settings
 * were reloaded. Also exits when the postmaster died: a busy worker that
 * never sleeps would not notice otherwise, and would keep working (and
 * holding shared memory, which blocks the restart) after a crash.
 */
bool
es_worker_check_interrupts(void)
{
	if (!PostmasterIsAlive())
		proc_exit(1);
	CHECK_FOR_INTERRUPTS();
	if (ConfigReloadPending)
	{
		ConfigReloadPending = false;
		ProcessConfigFile(PGC_SIGHUP);
		return true;
	}
	return false;
}

/* Starts a transaction with a snapshot and SPI. */
void
es_worker_begin(const char *activity)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

/* Finishes SPI and commits. */
void
es_worker_commit(void)
{
	if (SPI_finish() != SPI_OK_FINISH)
		elog(ERROR, "SPI_finish failed");
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(true);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/* Prepares the query once (kept across transactions), then executes it. */
void
es_worker_run(EsWorkerQuery *query, Datum *values, const char *nulls)
{
	int			rc;

	if (query->plan == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(query->sql, query->nargs, query->argtypes);

		if (plan == NULL)
			elog(ERROR, "%s: could not prepare \"%s\": %s", MyBgworkerEntry->bgw_type,
				 query->sql, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "%s: could not keep the plan of \"%s\"", MyBgworkerEntry->bgw_type, query->sql);
		query->plan = plan;
	}
	rc = SPI_execute_plan(query->plan, values, nulls, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "%s: \"%s\" failed: %s", MyBgworkerEntry->bgw_type, query->sql,
			 SPI_result_code_string(rc));
}
