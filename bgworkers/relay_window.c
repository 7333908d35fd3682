/*
 * relay_window.c
 *		Reading the outbox in commit order without writing to it, and the
 *		relay's checkpoint (eventshop.relay_progress).
 *
 * A window is the set of rows visible in snapshot cur but not in snapshot
 * prev. Taking cur goes: read the id sequence (id_bound), take the snapshot
 * and read the sequence again (id_limit), read the next transaction id
 * (next_xid). Since every row's transaction has its id before the row's id
 * is drawn (eventshop._next_outbox_id), a row of the window is either
 *	- a row with id <= prev.id_bound: its id was drawn before prev, so its
 *	  transaction had an id then, which prev did not see as committed: it is
 *	  in prev's xip or in [prev.xmax, prev.next_xid) ("pending") and is found
 *	  through the txid index (phase 1), or
 *	- a row with prev.id_bound < id <= cur.id_limit (ids drawn after cur are
 *	  invisible to it), found by walking the id index (phase 2).
 * Phase 1 ids are all below phase 2 ids, so the window is read in id order
 * and one number (acked_id) says how far it is published.
 */
#include "postgres.h"

#include "access/transam.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "relay_window.h"
#include "worker_runtime.h"

#define ROW_COLUMNS "id, topic, message_key, event_id, event_type, payload, created_at"

static SPIPlanPtr pending_rows_plan = NULL;
static SPIPlanPtr new_rows_plan = NULL;

static void relay_take_snapshot(RelayWindow *window);
static void relay_set_snapshot(RelayWindow *window, RelaySnapshot *target, const char *snapshot,
							   int64 id_bound, int64 id_limit, uint64 next_xid);
static int	relay_read_phase(RelayWindow *window, bool pending_phase, int limit,
							 RelayRowCallback emit, void *arg);
static SPIPlanPtr relay_prepare(const char *query, int nargs, Oid *argtypes);
static void relay_planner_walks_indexes(bool in_id_order);
static void relay_locate_pending_rows(RelayWindow *window);
static int64 relay_int64_result(int row, int column, int64 if_null);
static char *relay_text_result(int row, int column);

/* Loads eventshop.relay_progress; a missing row restarts from the beginning of the outbox. */
void
relay_window_load(RelayWindow *window)
{
	if (window->context == NULL)
		window->context = AllocSetContextCreate(TopMemoryContext, "eventshop relay window",
												ALLOCSET_SMALL_SIZES);
	MemoryContextReset(window->context);
	memset(&window->prev, 0, sizeof(RelaySnapshot));
	memset(&window->cur, 0, sizeof(RelaySnapshot));

	es_worker_begin("eventshop relay: loading progress");
	if (SPI_execute("SELECT prev_snapshot::text, prev_id_bound, prev_next_xid::text, "
					"cur_snapshot::text, cur_id_bound, cur_id_limit, cur_next_xid::text, "
					"acked_id, published_below, published_total "
					"FROM eventshop.relay_progress", true, 0) != SPI_OK_SELECT)
		elog(ERROR, "eventshop relay: reading eventshop.relay_progress failed");
	if (SPI_processed == 0)
	{
		/* Nothing is known to be published: everything in the outbox goes (again). */
		ereport(WARNING,
				(errmsg("eventshop relay: eventshop.relay_progress is empty; publishing every event in the outbox")));
		relay_set_snapshot(window, &window->prev, "1:1:", 0, 0, 1);
		window->open = false;
		window->acked_id = 0;
		window->published_below = 0;
		window->published_total = 0;
		window->dirty = true;
		if (SPI_execute("INSERT INTO eventshop.relay_progress (prev_snapshot, prev_id_bound, prev_next_xid) "
						"VALUES ('1:1:', 0, '1')", false, 0) != SPI_OK_INSERT)
			elog(ERROR, "eventshop relay: recreating eventshop.relay_progress failed");
	}
	else
	{
		char	   *cur = relay_text_result(0, 4);

		relay_set_snapshot(window, &window->prev, relay_text_result(0, 1),
						   relay_int64_result(0, 2, 0), 0,
						   strtou64(relay_text_result(0, 3), NULL, 10));
		window->open = cur != NULL;
		if (window->open)
			relay_set_snapshot(window, &window->cur, cur, relay_int64_result(0, 5, 0),
							   relay_int64_result(0, 6, 0),
							   strtou64(relay_text_result(0, 7), NULL, 10));
		window->acked_id = relay_int64_result(0, 8, 0);
		window->published_below = relay_int64_result(0, 9, 0);
		window->published_total = relay_int64_result(0, 10, 0);
		window->dirty = false;
	}
	es_worker_commit();
	window->read_id = window->acked_id;
	window->phase1_located = false;
	window->all_read = false;
	window->rows_read = 0;
}

int
relay_window_read(RelayWindow *window, int limit, RelayRowCallback emit, void *arg)
{
	int			count = 0;

	es_worker_begin("eventshop relay: reading outbox");
	if (!window->open)
		relay_take_snapshot(window);
	if (window->prev.pending != NULL && window->read_id < window->prev.id_bound && !window->phase1_located)
		relay_locate_pending_rows(window);
	if (window->prev.pending != NULL && window->read_id < window->prev.id_bound)
	{
		count = relay_read_phase(window, true, limit, emit, arg);
		if (count < limit)
			window->read_id = window->prev.id_bound;	/* phase 1 done */
	}
	if (count < limit)
	{
		int			more;

		window->read_id = Max(window->read_id, window->prev.id_bound);
		more = relay_read_phase(window, false, limit - count, emit, arg);
		count += more;
		if (count < limit)
			window->all_read = true;
	}
	es_worker_commit();
	window->rows_read += count;
	return count;
}

/*
 * Takes the window's upper snapshot: sequence position, snapshot and the
 * position again, then the next transaction id, in that order.
 */
static void
relay_take_snapshot(RelayWindow *window)
{
	int64		id_bound;
	char	   *snapshot;
	int64		id_limit;
	uint64		next_xid;

	static SPIPlanPtr position_plan = NULL;
	static SPIPlanPtr snapshot_plan = NULL;

	if (position_plan == NULL)
		position_plan = relay_prepare("SELECT pg_sequence_last_value('eventshop.outbox_id_seq'::regclass)", 0, NULL);
	if (snapshot_plan == NULL)
		snapshot_plan = relay_prepare("SELECT s::text, pg_sequence_last_value('eventshop.outbox_id_seq'::regclass) "
									  "FROM pg_current_snapshot() AS s", 0, NULL);

	if (SPI_execute_plan(position_plan, NULL, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "eventshop relay: reading the outbox id sequence failed");
	id_bound = relay_int64_result(0, 1, 0);
	/* A new statement (not read-only): its snapshot is taken after the read above. */
	if (SPI_execute_plan(snapshot_plan, NULL, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "eventshop relay: taking a snapshot failed");
	snapshot = relay_text_result(0, 1);
	id_limit = relay_int64_result(0, 2, 0);
	next_xid = U64FromFullTransactionId(ReadNextFullTransactionId());

	relay_set_snapshot(window, &window->cur, snapshot, id_bound, id_limit, next_xid);
	window->open = true;
	window->phase1_located = false;
	window->read_id = 0;
	window->acked_id = 0;
	window->all_read = false;
	window->rows_read = 0;
}

/*
 * Fills one RelaySnapshot (strings copied into the window's context) and
 * works out its pending transactions: xip plus [xmax, next_xid).
 */
static void
relay_set_snapshot(RelayWindow *window, RelaySnapshot *target, const char *snapshot,
				   int64 id_bound, int64 id_limit, uint64 next_xid)
{
	MemoryContext old = MemoryContextSwitchTo(window->context);
	StringInfoData pending;
	const char *p = snapshot;
	char	   *end;
	uint64		xmax;
	int			count = 0;

	target->snapshot = pstrdup(snapshot);
	target->id_bound = id_bound;
	target->id_limit = id_limit;
	target->next_xid = next_xid;

	/* text form: xmin:xmax:xip1,xip2,... */
	target->xmin = strtou64(p, &end, 10);
	if (*end != ':')
		elog(ERROR, "eventshop relay: malformed snapshot \"%s\"", snapshot);
	xmax = strtou64(end + 1, &end, 10);
	if (*end != ':')
		elog(ERROR, "eventshop relay: malformed snapshot \"%s\"", snapshot);
	p = end + 1;

	initStringInfo(&pending);
	appendStringInfoChar(&pending, '{');
	while (*p != '\0')
	{
		uint64		xid = strtou64(p, &end, 10);

		appendStringInfo(&pending, "%s" UINT64_FORMAT, count++ > 0 ? "," : "", xid);
		p = *end == ',' ? end + 1 : end;
		if (end == p && *p != '\0')
			elog(ERROR, "eventshop relay: malformed snapshot \"%s\"", snapshot);
	}
	for (uint64 xid = xmax; xid < next_xid; xid++)
		appendStringInfo(&pending, "%s" UINT64_FORMAT, count++ > 0 ? "," : "", xid);
	appendStringInfoChar(&pending, '}');
	target->pending = count > 0 ? pending.data : NULL;
	MemoryContextSwitchTo(old);
}

/*
 * Phase 1 walks the id index from the first row of prev's pending
 * transactions, found through the (txid, id) index, not from the start.
 */
static void
relay_locate_pending_rows(RelayWindow *window)
{
	static SPIPlanPtr plan = NULL;
	Datum		values[4];

	if (plan == NULL)
	{
		Oid			types[4] = {TEXTOID, INT8OID, INT8OID, TEXTOID};

		/* only transactions that have committed since: a long one still running costs nothing */
		plan = relay_prepare("SELECT min(f.id) FROM unnest($1::xid8[]) AS p(txid), "
							 "LATERAL (SELECT o.id FROM eventshop.outbox o WHERE o.txid = p.txid "
							 "AND o.id > $2 AND o.id <= $3 ORDER BY o.id LIMIT 1) AS f "
							 "WHERE pg_visible_in_snapshot(p.txid, $4::pg_snapshot)",
							 4, types);
	}
	values[0] = CStringGetTextDatum(window->prev.pending);
	values[1] = Int64GetDatum(window->read_id);
	values[2] = Int64GetDatum(window->prev.id_bound);
	values[3] = CStringGetTextDatum(window->cur.snapshot);
	relay_planner_walks_indexes(false);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "eventshop relay: locating rows of late transactions failed");
	/* start just before the first one, or skip phase 1 if there is none */
	window->read_id = relay_int64_result(0, 1, window->prev.id_bound + 1) - 1;
	window->phase1_located = true;
}

/*
 * One query of phase 1 (rows of prev's pending transactions with ids up to
 * prev.id_bound, now visible) or phase 2 (rows with ids after prev.id_bound
 * up to cur.id_limit, visible in cur and not in prev), after read_id.
 */
static int
relay_read_phase(RelayWindow *window, bool pending_phase, int limit, RelayRowCallback emit, void *arg)
{
	Datum		values[5];
	SPIPlanPtr	plan;
	TupleDesc	desc;
	int			rc;

	if (pending_phase)
	{
		if (pending_rows_plan == NULL)
		{
			Oid			types[5] = {INT8OID, INT8OID, TEXTOID, TEXTOID, INT4OID};

			pending_rows_plan = relay_prepare(
											  "SELECT " ROW_COLUMNS " FROM eventshop.outbox "
											  "WHERE id > $1 AND id <= $2 AND txid = ANY ($3::xid8[]) "
											  "AND pg_visible_in_snapshot(txid, $4::pg_snapshot) "
											  "ORDER BY id LIMIT $5", 5, types);
		}
		plan = pending_rows_plan;
		values[0] = Int64GetDatum(window->read_id);
		values[1] = Int64GetDatum(window->prev.id_bound);
		values[2] = CStringGetTextDatum(window->prev.pending);
		values[3] = CStringGetTextDatum(window->cur.snapshot);
	}
	else
	{
		if (new_rows_plan == NULL)
		{
			Oid			types[5] = {INT8OID, INT8OID, TEXTOID, TEXTOID, INT4OID};

			new_rows_plan = relay_prepare(
										  "SELECT " ROW_COLUMNS " FROM eventshop.outbox "
										  "WHERE id > $1 AND id <= $2 "
										  "AND pg_visible_in_snapshot(txid, $3::pg_snapshot) "
										  "AND NOT pg_visible_in_snapshot(txid, $4::pg_snapshot) "
										  "ORDER BY id LIMIT $5", 5, types);
		}
		plan = new_rows_plan;
		values[0] = Int64GetDatum(window->read_id);
		values[1] = Int64GetDatum(window->cur.id_limit);
		values[2] = CStringGetTextDatum(window->cur.snapshot);
		values[3] = CStringGetTextDatum(window->prev.snapshot);
	}
	values[4] = Int32GetDatum(limit);

	/*
	 * A freshly filled outbox has no statistics yet, and a sort of the
	 * whole window per query would make draining quadratic: make the
	 * planner walk the id index (both phases start near their first row).
	 */
	relay_planner_walks_indexes(true);
	/* not read-only: the query needs a snapshot newer than cur, not the transaction's first */
	rc = SPI_execute_plan(plan, values, NULL, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "eventshop relay: reading the outbox failed: %s", SPI_result_code_string(rc));

	desc = SPI_tuptable->tupdesc;
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		bool		isnull;
		RelayRow	row;
		text	   *topic,
				   *key,
				   *event_type,
				   *payload;
		pg_uuid_t  *uuid;

		row.id = DatumGetInt64(SPI_getbinval(tuple, desc, 1, &isnull));
		topic = DatumGetTextPP(SPI_getbinval(tuple, desc, 2, &isnull));
		key = DatumGetTextPP(SPI_getbinval(tuple, desc, 3, &isnull));
		uuid = DatumGetUUIDP(SPI_getbinval(tuple, desc, 4, &isnull));
		event_type = DatumGetTextPP(SPI_getbinval(tuple, desc, 5, &isnull));
		payload = DatumGetTextPP(SPI_getbinval(tuple, desc, 6, &isnull));
		row.created_at = DatumGetTimestampTz(SPI_getbinval(tuple, desc, 7, &isnull));

		row.topic = text_to_cstring(topic);
		row.key = VARDATA_ANY(key);
		row.key_len = VARSIZE_ANY_EXHDR(key);
		row.event_type = text_to_cstring(event_type);
		row.payload = VARDATA_ANY(payload);
		row.payload_len = VARSIZE_ANY_EXHDR(payload);
		snprintf(row.event_id, sizeof(row.event_id),
				 "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
				 uuid->data[0], uuid->data[1], uuid->data[2], uuid->data[3], uuid->data[4],
				 uuid->data[5], uuid->data[6], uuid->data[7], uuid->data[8], uuid->data[9],
				 uuid->data[10], uuid->data[11], uuid->data[12], uuid->data[13], uuid->data[14],
				 uuid->data[15]);
		emit(&row, arg);
		window->read_id = row.id;
	}
	rc = (int) SPI_processed;
	SPI_freetuptable(SPI_tuptable);
	return rc;
}

/* The window is fully read and acknowledged: its upper snapshot becomes the lower one. */
void
relay_window_close(RelayWindow *window)
{
	MemoryContext old;
	RelaySnapshot prev = window->prev;
	int64		below = window->published_below;

	Assert(window->open);
	/* rows with id <= cur.id_bound are visible in cur unless cur had pending transactions */
	if (window->cur.pending == NULL)
		below = Max(below, window->cur.id_bound);
	else if (window->cur.xmin >= prev.next_xid)
		below = Max(below, prev.id_bound);
	/* an empty window changes nothing worth storing (unless the purge horizon moved) */
	window->dirty = window->dirty || window->rows_read > 0 || below != window->published_below;
	window->published_below = below;

	/* keep only cur's strings: copy them out, reset the context, copy back */
	old = MemoryContextSwitchTo(TopMemoryContext);
	{
		char	   *snapshot = pstrdup(window->cur.snapshot);
		RelaySnapshot cur = window->cur;

		MemoryContextReset(window->context);
		relay_set_snapshot(window, &window->prev, snapshot, cur.id_bound, 0, cur.next_xid);
		pfree(snapshot);
	}
	MemoryContextSwitchTo(old);
	memset(&window->cur, 0, sizeof(RelaySnapshot));
	window->open = false;
	window->phase1_located = false;
	window->read_id = 0;
	window->acked_id = 0;
	window->all_read = false;
}

void
relay_window_rewind(RelayWindow *window)
{
	window->read_id = window->acked_id;
	window->phase1_located = false;
	window->all_read = false;
}

void
relay_window_save(RelayWindow *window, int nparked, const int64 *parked_ids, char *const *parked_errors)
{
	Oid			types[10] = {TEXTOID, INT8OID, TEXTOID, TEXTOID, INT8OID, INT8OID, TEXTOID,
	INT8OID, INT8OID, INT8OID};
	Datum		values[10];
	char		nulls[10];

	es_worker_begin("eventshop relay: storing progress");
	if (nparked > 0)
	{
		Datum	   *ids = palloc(sizeof(Datum) * nparked);
		Datum	   *errors = palloc(sizeof(Datum) * nparked);
		Oid			park_types[2] = {INT8ARRAYOID, TEXTARRAYOID};
		Datum		park_values[2];

		for (int i = 0; i < nparked; i++)
		{
			ids[i] = Int64GetDatum(parked_ids[i]);
			errors[i] = CStringGetTextDatum(parked_errors[i]);
		}
		park_values[0] = PointerGetDatum(construct_array(ids, nparked, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
		park_values[1] = PointerGetDatum(construct_array(errors, nparked, TEXTOID, -1, false, TYPALIGN_INT));
		if (SPI_execute_with_args("INSERT INTO eventshop.outbox_parked "
								  "(id, topic, message_key, event_id, event_type, payload, created_at, error) "
								  "SELECT o.id, o.topic, o.message_key, o.event_id, o.event_type, o.payload, "
								  "o.created_at, f.error "
								  "FROM unnest($1, $2) AS f(id, error) JOIN eventshop.outbox o ON o.id = f.id "
								  "ON CONFLICT (id) DO UPDATE SET error = EXCLUDED.error, parked_at = now()",
								  2, park_types, park_values, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "eventshop relay: parking refused events failed");
	}

	memset(nulls, ' ', sizeof(nulls));
	values[0] = CStringGetTextDatum(window->prev.snapshot);
	values[1] = Int64GetDatum(window->prev.id_bound);
	values[2] = CStringGetTextDatum(psprintf(UINT64_FORMAT, window->prev.next_xid));
	if (window->open)
	{
		values[3] = CStringGetTextDatum(window->cur.snapshot);
		values[4] = Int64GetDatum(window->cur.id_bound);
		values[5] = Int64GetDatum(window->cur.id_limit);
		values[6] = CStringGetTextDatum(psprintf(UINT64_FORMAT, window->cur.next_xid));
	}
	else
		nulls[3] = nulls[4] = nulls[5] = nulls[6] = 'n';
	values[7] = Int64GetDatum(window->open ? window->acked_id : 0);
	values[8] = Int64GetDatum(window->published_below);
	values[9] = Int64GetDatum(window->published_total);
	if (SPI_execute_with_args("UPDATE eventshop.relay_progress SET "
							  "prev_snapshot = $1::pg_snapshot, prev_id_bound = $2, prev_next_xid = $3::xid8, "
							  "cur_snapshot = $4::pg_snapshot, cur_id_bound = $5, cur_id_limit = $6, "
							  "cur_next_xid = $7::xid8, acked_id = $8, published_below = $9, "
							  "published_total = $10, updated_at = now()",
							  10, types, values, nulls, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "eventshop relay: storing progress failed");
	es_worker_commit();
	window->dirty = false;
}

/*
 * Session settings of the relay's planner: never a sequential scan of the
 * outbox; for id-ordered reads, no bitmap scan and no sort either. The
 * disabled paths inflate plan costs past jit_above_cost, and compiling each
 * small read would cost milliseconds of latency: no JIT.
 */
static void
relay_planner_walks_indexes(bool in_id_order)
{
	(void) set_config_option("jit", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SET, true, 0, false);
	(void) set_config_option("enable_seqscan", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SET, true, 0, false);
	(void) set_config_option("enable_bitmapscan", in_id_order ? "off" : "on", PGC_USERSET,
							 PGC_S_SESSION, GUC_ACTION_SET, true, 0, false);
	(void) set_config_option("enable_sort", in_id_order ? "off" : "on", PGC_USERSET,
							 PGC_S_SESSION, GUC_ACTION_SET, true, 0, false);
}

/* Prepares and keeps a plan for the life of the worker. */
static SPIPlanPtr
relay_prepare(const char *query, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(query, nargs, argtypes);

	if (plan == NULL || SPI_keepplan(plan) != 0)
		elog(ERROR, "eventshop relay: preparing \"%s\" failed: %s", query,
			 SPI_result_code_string(SPI_result));
	return plan;
}

static int64
relay_int64_result(int row, int column, int64 if_null)
{
	bool		isnull;
	Datum		value = SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, column, &isnull);

	return isnull ? if_null : DatumGetInt64(value);
}

/* A text column of the current result, or NULL. */
static char *
relay_text_result(int row, int column)
{
	return SPI_getvalue(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, column);
}
