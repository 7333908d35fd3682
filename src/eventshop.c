/*
 * eventshop.c
 *		Library entry point: defines the settings, reserves shared memory and
 *		registers the relay, dispatcher and sender background workers.
 *
 * eventshop must be listed in shared_preload_libraries: the workers and the
 * shared memory they use can only be set up by the postmaster.
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"

#include "config.h"
#include "shared_state.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

static void es_register_worker(const char *type, const char *entry_point, int slot);

/* Sets up settings, shared memory and workers when the postmaster loads us. */
void
_PG_init(void)
{
	if (IsBinaryUpgrade)
		return;

	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("eventshop must be loaded via shared_preload_libraries"),
				 errhint("Add eventshop to shared_preload_libraries in postgresql.conf and restart the server.")));

	es_define_settings();
	es_shared_state_init();

	if (es_relay_enabled)
		es_register_worker("eventshop relay", "eventshop_relay_main", -1);
	if (es_dispatcher_enabled)
		es_register_worker("eventshop dispatcher", "eventshop_dispatcher_main", -1);
	for (int slot = 0; slot < es_sender_workers; slot++)
		es_register_worker("eventshop sender", "eventshop_sender_main", slot);
}

/*
 * Registers one database-connected worker that the postmaster restarts on
 * failure. Workers of a type that runs several times get a slot (0, 1, ...)
 * as main_arg and in their name; -1 is for single workers (slot 0).
 */
static void
es_register_worker(const char *type, const char *entry_point, int slot)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "eventshop");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "%s", entry_point);
	if (slot >= 0)
		snprintf(worker.bgw_name, BGW_MAXLEN, "%s %d", type, slot);
	else
		snprintf(worker.bgw_name, BGW_MAXLEN, "%s", type);
	snprintf(worker.bgw_type, BGW_MAXLEN, "%s", type);
	worker.bgw_main_arg = Int32GetDatum(Max(slot, 0));
	RegisterBackgroundWorker(&worker);
}
