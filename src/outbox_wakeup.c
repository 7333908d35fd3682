/*
 * outbox_wakeup.c
 *		Wake-on-commit: a statement trigger remembers which worker has new
 *		work, and a transaction callback sets that worker's latch once the
 *		transaction commits. Workers therefore never poll on a timer, and
 *		never wake for work that was rolled back.
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/trigger.h"
#include "fmgr.h"

#include "shared_state.h"

PG_FUNCTION_INFO_V1(eventshop_wake_worker_on_commit);

static bool pending_wake[ES_WORKER_COUNT];
static bool callback_registered = false;

static void es_wake_at_commit(XactEvent event, void *arg);

/* Trigger: marks the named worker ('relay', 'dispatcher' or 'sender': all senders) to be woken at commit. */
Datum
eventshop_wake_worker_on_commit(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	const char *name;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("eventshop._wake_worker_on_commit() must be called as a trigger")));
	if (trigdata->tg_trigger->tgnargs != 1)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("eventshop._wake_worker_on_commit() needs one argument: relay, dispatcher or sender")));

	name = trigdata->tg_trigger->tgargs[0];
	if (strcmp(name, "relay") == 0)
		pending_wake[ES_WORKER_RELAY] = true;
	else if (strcmp(name, "dispatcher") == 0)
		pending_wake[ES_WORKER_DISPATCHER] = true;
	else if (strcmp(name, "sender") == 0)
		pending_wake[ES_WORKER_SENDER] = true;
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown eventshop worker \"%s\"", name),
				 errhint("Use relay, dispatcher or sender.")));

	if (!callback_registered)
	{
		RegisterXactCallback(es_wake_at_commit, NULL);
		callback_registered = true;
	}
	return PointerGetDatum(NULL);
}

/* At commit, sets the latches of the workers marked during the transaction; forgets them on abort. */
static void
es_wake_at_commit(XactEvent event, void *arg)
{
	(void) arg;
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			for (int i = 0; i < ES_WORKER_COUNT; i++)
				if (pending_wake[i])
					es_wake_worker((EsWorkerKind) i);
			/* FALLTHROUGH */
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			memset(pending_wake, 0, sizeof(pending_wake));
			break;
		default:
			break;
	}
}
