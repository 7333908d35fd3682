/*
 * order_owners.c
 *		Every order belongs to an existing user, without a foreign key on
 *		orders.user_id.
 *
 * A foreign key would check each new order with a query and a row lock on
 * its user: about 4% of placing an order, on the hottest path of the shop.
 * The same guarantee is kept from the other side, where it costs nothing
 * until a user is deleted (which no API function does):
 *
 *   - eventshop._users_keep_orders, a trigger on users (BEFORE DELETE, BEFORE
 *     UPDATE OF id, BEFORE TRUNCATE), takes SHARE ROW EXCLUSIVE on orders,
 *     which waits for every transaction that is writing orders and keeps new
 *     ones out until it ends, then looks for the user's orders in the latest
 *     snapshot and refuses (23503) if there is one;
 *   - place_order takes its ROW EXCLUSIVE lock on orders before it reads the
 *     caller's session and account (es_order_owner_before_auth). So either
 *     the deletion waits for the order's transaction and then sees the
 *     order, or the order waits for the deletion and then, reading the
 *     session with a later snapshot, finds it gone.
 *   - Under REPEATABLE READ or SERIALIZABLE the order's snapshot may predate
 *     the deletion: there place_order locks the user's row FOR KEY SHARE
 *     after reading it, and only then the orders table
 *     (es_order_owner_after_auth), which fails with a serialization error
 *     (40001) if the row was deleted meanwhile, as a foreign key check would.
 *
 * A deletion and an order of the same user wait for each other only when
 * the order's transaction already wrote an order before under REPEATABLE
 * READ; the deadlock detector then cancels one of them.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/snapmgr.h"
#include "utils/uuid.h"

#include "order_owners.h"
#include "spi_util.h"

PG_FUNCTION_INFO_V1(eventshop_users_keep_orders);

static SPIPlanPtr es_plan_user_orders = NULL;
static SPIPlanPtr es_plan_any_order = NULL;
static SPIPlanPtr es_plan_key_share_user = NULL;

static bool es_orders_exist(Datum *user_id);
static Oid	es_orders_relid(void);

/* The trigger on users: see the file header. */
Datum
eventshop_users_keep_orders(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	TupleDesc	desc;
	int			id_col;
	bool		isnull;
	Datum		old_id;
	HeapTuple	result;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_BEFORE(trigdata->tg_event))
		elog(ERROR, "_users_keep_orders must be called as a BEFORE trigger");
	if (TRIGGER_FIRED_BY_TRUNCATE(trigdata->tg_event))
	{
		if (es_orders_exist(NULL))
			ereport(ERROR,
					(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
					 errmsg("cannot truncate eventshop.users while orders exist"),
					 errdetail("Every order keeps the user who placed it.")));
		return PointerGetDatum(NULL);
	}
	if (!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event))
		elog(ERROR, "_users_keep_orders must be a row trigger for DELETE and UPDATE");

	desc = trigdata->tg_relation->rd_att;
	id_col = SPI_fnumber(desc, "id");
	if (id_col <= 0)
		elog(ERROR, "eventshop.users has no column id");
	old_id = heap_getattr(trigdata->tg_trigtuple, id_col, desc, &isnull);
	result = trigdata->tg_trigtuple;
	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		bool		new_isnull;
		Datum		new_id = heap_getattr(trigdata->tg_newtuple, id_col, desc, &new_isnull);

		result = trigdata->tg_newtuple;
		if (!isnull && !new_isnull &&
			memcmp(DatumGetUUIDP(old_id)->data, DatumGetUUIDP(new_id)->data, UUID_LEN) == 0)
			return PointerGetDatum(result); /* the id stays: nothing to keep */
	}
	if (!isnull && es_orders_exist(&old_id))
		ereport(ERROR,
				(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
				 errmsg("a user who has orders cannot be %s",
						TRIGGER_FIRED_BY_DELETE(trigdata->tg_event) ? "deleted" : "given another id"),
				 errdetail("User %s has orders, and every order keeps the user who placed it.",
						   DatumGetCString(DirectFunctionCall1(uuid_out, old_id))),
				 errhint("Block the account instead (eventshop.block_user).")));
	return PointerGetDatum(result);
}

/*
 * Takes SHARE ROW EXCLUSIVE on orders (waiting for every transaction that is
 * writing orders, and keeping new ones out until this one ends), then tells
 * whether any order of *user_id (NULL: of anyone) exists in the latest
 * snapshot, which sees what those transactions committed.
 */
static bool
es_orders_exist(Datum *user_id)
{
	Oid			argtypes[1] = {UUIDOID};
	SPIPlanPtr	plan;
	bool		found;

	LockRelationOid(es_orders_relid(), ShareRowExclusiveLock);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (user_id != NULL)
		plan = es_keep_plan(&es_plan_user_orders, "SELECT FROM eventshop.orders o WHERE o.user_id = $1 LIMIT 1",
							1, argtypes);
	else
		plan = es_keep_plan(&es_plan_any_order, "SELECT FROM eventshop.orders LIMIT 1", 0, NULL);
	if (SPI_execute_snapshot(plan, user_id, NULL, GetLatestSnapshot(), InvalidSnapshot, true, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "looking for orders failed");
	found = SPI_processed > 0;
	SPI_finish();
	return found;
}

/*
 * Called by place_order before it reads the caller's session and account:
 * under READ COMMITTED, takes the ROW EXCLUSIVE lock on orders that its
 * INSERT needs anyway (file header).
 */
void
es_order_owner_before_auth(void)
{
	if (!IsolationUsesXactSnapshot())
		LockRelationOid(es_orders_relid(), RowExclusiveLock);
}

/*
 * Called by place_order, inside SPI, once the caller is known: under
 * REPEATABLE READ or SERIALIZABLE, locks the user FOR KEY SHARE (40001 if a
 * concurrent transaction deleted it after this transaction's snapshot), then
 * takes the ROW EXCLUSIVE lock on orders.
 */
void
es_order_owner_after_auth(pg_uuid_t *user_id)
{
	Oid			argtypes[1] = {UUIDOID};
	Datum		args[1];

	if (!IsolationUsesXactSnapshot())
		return;
	args[0] = UUIDPGetDatum(user_id);
	if (SPI_execute_plan(es_keep_plan(&es_plan_key_share_user,
									  "SELECT FROM eventshop.users u WHERE u.id = $1 FOR KEY SHARE",
									  1, argtypes),
						 args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "locking the order's user failed");
	if (SPI_processed != 1)
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("could not serialize access due to concurrent delete of the user")));
	LockRelationOid(es_orders_relid(), RowExclusiveLock);
}

/* The OID of eventshop.orders (ERROR if it does not exist). */
static Oid
es_orders_relid(void)
{
	Oid			relid = get_relname_relid("orders", get_namespace_oid("eventshop", false));

	if (!OidIsValid(relid))
		elog(ERROR, "eventshop.orders does not exist");
	return relid;
}
