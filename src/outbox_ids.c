/*
 * outbox_ids.c
 *		eventshop._next_outbox_id(): the default of eventshop.outbox.id.
 *
 * The relay publishes in commit order by comparing transaction ids with
 * its snapshots, and bounds the ids a snapshot can still miss by reading
 * the sequence just before taking the snapshot. That reasoning needs every
 * row's transaction to have its id *before* the row's id is drawn, so that
 * a transaction the snapshot does not know about can only hold ids drawn
 * after the snapshot. Column defaults are not promised to run in a given
 * order, so this function makes the order explicit.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "commands/sequence.h"
#include "fmgr.h"
#include "utils/lsyscache.h"

PG_FUNCTION_INFO_V1(eventshop_next_outbox_id);

Datum
eventshop_next_outbox_id(PG_FUNCTION_ARGS)
{
	Oid			namespace_id = get_namespace_oid("eventshop", false);
	Oid			sequence_id = get_relname_relid("outbox_id_seq", namespace_id);

	(void) fcinfo;
	if (!OidIsValid(sequence_id))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("sequence eventshop.outbox_id_seq does not exist"),
				 errhint("Reinstall the eventshop extension.")));
	(void) GetTopTransactionId();
	PG_RETURN_INT64(nextval_internal(sequence_id, true));
}
