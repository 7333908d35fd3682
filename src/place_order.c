/*
 * place_order.c
 *		eventshop.place_order(items) and eventshop.place_order(access_token,
 *		items): the inventory's "reserve", in C with statements prepared once
 *		per backend, because it runs for every order.
 *
 * An order is two statements, both in the caller's transaction:
 *
 *   1. reserve: one UPDATE adds each line's quantity to the reserved units
 *      of its product, where the product is for sale and has them available
 *      (stock_on_hand - reserved >= quantity), and returns what the checks
 *      and the snapshot need. It finds the products through the unique index
 *      on sku, so it locks them in SKU order, the order every statement that
 *      locks several products keeps (see "Locking" in the extension script):
 *      concurrent orders queue up on their first common product instead of
 *      deadlocking. The planner is held to that index scan (seq and bitmap
 *      scans off while the statement is planned and run). Lines that cannot
 *      be served are left alone, unlocked;
 *   2. write: the order, its lines and its order.created event (the
 *      envelope built in C by es_event_envelope, as _emit_event builds it)
 *      in one statement, the lines' SKU, title, category and price as step
 *      1 returned them from the product rows this transaction holds locked.
 *
 * When a line was not served, the order is refused (es_refuse_order),
 * naming the first offending item in the client's order: unknown SKU
 * (P0002), not for sale (55000), mixed currencies (22023), insufficient
 * stock (23514, with requested and available units). The reason is read
 * from the very row version step 1 decided on, so a refusal never
 * contradicts itself, even when stock comes back in between:
 *   - a product step 1 had to wait for was decided on its latest version
 *     and is locked by step 1 since, so it is read as it is now;
 *   - a product whose version in step 1's snapshot already lacked the
 *     units (or was not for sale, or did not exist) was skipped without a
 *     lock; units freed after that snapshot (a cancel committing) were
 *     never offered to this order, so it is read in that snapshot.
 * Step 1 therefore runs in a snapshot this function takes and keeps. A
 * refusal is an ERROR, which undoes the reservations of step 1 with the
 * rest of the statement: an order is written whole or not at all. The
 * products' CHECK (reserved <= stock_on_hand) is the last line of defence
 * against overselling; step 1 never adds units that would break it.
 *
 * Both forms lock the orders table before they read the caller's session
 * (src/order_owners.c), so that a user deleted meanwhile cannot be given an
 * order: orders.user_id has no foreign key, whose check would cost a query
 * and a row lock per order.
 *
 * The two-argument form authenticates first (src/authenticate.c) and
 * establishes the caller for the rest of the transaction exactly as
 * eventshop.authenticate does, so an application places an order in one
 * round trip; the session check of that same call stands in for
 * _require_user's.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "authenticate.h"
#include "config.h"
#include "emit_event.h"
#include "order_owners.h"
#include "orders.h"
#include "spi_util.h"

PG_FUNCTION_INFO_V1(eventshop_place_order);
PG_FUNCTION_INFO_V1(eventshop_place_order_with_token);

/* One product of the order: reserved by step 1 (served), or read again to explain a refusal. */
typedef struct EsOrderLine
{
	int64		product_id;
	char	   *sku;
	char	   *title;
	char	   *category;
	int64		price_minor;
	char	   *currency;
	bool		served;
	bool		active;			/* unserved lines only */
	int32		available;		/* unserved lines only */
	int32		quantity;		/* what the client asked for */
} EsOrderLine;

/*
 * The columns step 1 returns and es_read_unserved reads, in this order: id,
 * sku, price, currency, title, category, active, available.
 */
#define ES_LINE_COLUMNS \
	"p.id, p.sku::text, p.price_minor::bigint, p.currency::text, p.title::text, p.category::text, " \
	"p.active, p.stock_on_hand - p.reserved"

static SPIPlanPtr es_plan_reserve = NULL;
static SPIPlanPtr es_plan_unserved = NULL;
static SPIPlanPtr es_plan_write = NULL;

static Datum es_place_order(FunctionCallInfo fcinfo, pg_uuid_t *user_id, Jsonb *items);
static text *es_order_created_envelope(const char *order_key, pg_uuid_t *user_id, const char *currency,
									   int64 total, int32 item_count, int64 unit_count,
									   Datum reserved_until, pg_uuid_t *event_id);
static int	es_reserve(Datum skus, Datum quantities, Snapshot snapshot);
static void es_refuse_order(EsOrderLine *lines, int nlines, Datum *skus, Datum *quantities, int n,
							int *line_of, Snapshot reserve_snapshot) pg_attribute_noreturn();
static int	es_read_unserved(Datum *skus, int n, const int *line_of, Snapshot snapshot);
static void es_read_lines(EsOrderLine *lines, int first, int count, bool served, Datum *skus,
						  Datum *quantities, int n, int *line_of);
static void es_check_one_currency(EsOrderLine *lines, const int *line_of, int n);
static void es_push_pair(JsonbParseState **state, const char *key, JsonbValue *value);
static char *es_text_column(HeapTuple tuple, TupleDesc desc, int col);
static Datum es_array(Datum *elems, bool *nulls, int n, Oid type);

/* place_order(items jsonb) -> order_summary, for the caller authenticate established. */
Datum
eventshop_place_order(PG_FUNCTION_ARGS)
{
	pg_uuid_t	user_id;

	es_order_owner_before_auth();
	es_require_user(&user_id);
	return es_place_order(fcinfo, &user_id, PG_ARGISNULL(0) ? NULL : PG_GETARG_JSONB_P(0));
}

/* place_order(access_token text, items jsonb) -> order_summary: authenticate, then place. */
Datum
eventshop_place_order_with_token(PG_FUNCTION_ARGS)
{
	pg_uuid_t	user_id;
	pg_uuid_t	session_id;

	es_order_owner_before_auth();
	(void) es_authenticate(PG_ARGISNULL(0) ? NULL : PG_GETARG_TEXT_PP(0), &user_id, &session_id);
	return es_place_order(fcinfo, &user_id, PG_ARGISNULL(1) ? NULL : PG_GETARG_JSONB_P(1));
}

/* Places the order (see the file header) and returns its summary. */
static Datum
es_place_order(FunctionCallInfo fcinfo, pg_uuid_t *user_id, Jsonb *items)
{
	MemoryContext caller_cxt = CurrentMemoryContext;
	Datum	   *skus;
	Datum	   *quantities;
	int			n;
	EsOrderLine *lines;
	int		   *line_of;		/* item (client's order) -> line, -1: unknown */
	int			nlines;
	Snapshot	reserve_snapshot;
	int64		total = 0;
	int64		units = 0;
	pg_uuid_t  *order_id;
	Datum		reserved_until;
	char	   *currency;
	TupleDesc	tupdesc;
	Datum		values[6];
	bool		nulls[6] = {false, false, false, false, false, false};
	Oid			write_types[16] = {UUIDOID, UUIDOID, TEXTOID, INT8OID, INT4OID, INT4OID, TIMESTAMPTZOID,
		INT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, INT8ARRAYOID, INT4ARRAYOID,
	TEXTOID, UUIDOID, JSONOID};
	Datum		args[16];
	Datum	   *ids;
	Datum	   *qtys;
	Datum	   *line_skus;
	Datum	   *titles;
	Datum	   *categories;
	bool	   *category_nulls;
	Datum	   *prices;
	char	   *order_key;
	pg_uuid_t	event_id;

	/* Only sku and quantity are accepted: a price or stock sent by the client is refused. */
	n = es_parse_order_items(items, &skus, &quantities);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	es_order_owner_after_auth(user_id);

	/* 1. reserve every line that can be served, locking its product */
	reserve_snapshot = RegisterSnapshot(GetTransactionSnapshot());
	nlines = es_reserve(es_array(skus, NULL, n, TEXTOID), es_array(quantities, NULL, n, INT4OID),
						reserve_snapshot);
	/* room for the served lines, then for up to two reads of each unserved one */
	lines = palloc(sizeof(EsOrderLine) * (2 * n - nlines));
	line_of = palloc(sizeof(int) * n);
	for (int i = 0; i < n; i++)
		line_of[i] = -1;
	es_read_lines(lines, 0, nlines, true, skus, quantities, n, line_of);
	if (nlines < n)
		es_refuse_order(lines, nlines, skus, quantities, n, line_of, reserve_snapshot);
	UnregisterSnapshot(reserve_snapshot);
	es_check_one_currency(lines, line_of, n);

	/* 2. the order, its lines and its order.created event, in one statement */
	ids = palloc(sizeof(Datum) * nlines);
	qtys = palloc(sizeof(Datum) * nlines);
	line_skus = palloc(sizeof(Datum) * nlines);
	titles = palloc(sizeof(Datum) * nlines);
	categories = palloc(sizeof(Datum) * nlines);
	category_nulls = palloc(sizeof(bool) * nlines);
	prices = palloc(sizeof(Datum) * nlines);
	for (int r = 0; r < nlines; r++)
	{
		EsOrderLine *l = &lines[r];

		/* at most 100 lines of 1000 units at 10^12 each: far inside int64 */
		total += l->price_minor * l->quantity;
		units += l->quantity;
		ids[r] = Int64GetDatum(l->product_id);
		qtys[r] = Int32GetDatum(l->quantity);
		line_skus[r] = CStringGetTextDatum(l->sku);
		titles[r] = CStringGetTextDatum(l->title);
		category_nulls[r] = l->category == NULL;
		categories[r] = l->category ? CStringGetTextDatum(l->category) : (Datum) 0;
		prices[r] = Int64GetDatum(l->price_minor);
	}
	order_id = MemoryContextAlloc(caller_cxt, sizeof(pg_uuid_t));
	es_uuid_v7(order_id);
	order_key = DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(order_id)));
	/* now() + eventshop.reservation_ttl (whole seconds) */
	reserved_until = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp() +
										 (TimestampTz) es_reservation_ttl_s * USECS_PER_SEC);
	args[0] = UUIDPGetDatum(order_id);
	args[1] = UUIDPGetDatum(user_id);
	args[2] = CStringGetTextDatum(lines[0].currency);
	args[3] = Int64GetDatum(total);
	args[4] = Int32GetDatum(nlines);
	args[5] = Int32GetDatum((int32) units);
	args[6] = reserved_until;
	args[7] = es_array(ids, NULL, nlines, INT8OID);
	args[8] = es_array(line_skus, NULL, nlines, TEXTOID);
	args[9] = es_array(titles, NULL, nlines, TEXTOID);
	args[10] = es_array(categories, category_nulls, nlines, TEXTOID);
	args[11] = es_array(prices, NULL, nlines, INT8OID);
	args[12] = es_array(qtys, NULL, nlines, INT4OID);
	args[13] = CStringGetTextDatum(order_key);
	args[14] = UUIDPGetDatum(&event_id);
	args[15] = PointerGetDatum(es_order_created_envelope(order_key, user_id, lines[0].currency, total,
														 nlines, units, reserved_until, &event_id));
	if (SPI_execute_plan(es_keep_plan(&es_plan_write,
									  "WITH ord AS ("
									  " INSERT INTO eventshop.orders (id, user_id, status, currency, total_minor,"
									  " item_count, unit_count, created_at, reserved_until, updated_at)"
									  " VALUES ($1, $2, 'reserved', $3, $4, $5, $6, pg_catalog.now(), $7, pg_catalog.now())"
									  "), event AS ("
									  " INSERT INTO eventshop.outbox (topic, message_key, event_id, event_type, payload)"
									  " VALUES ('orders.events', $14, $15, 'order.created', $16)"
									  ") "
									  "INSERT INTO eventshop.order_items (order_id, product_id, sku, title, category,"
									  " unit_price_minor, quantity) "
									  "SELECT $1, l.id, l.sku, l.title, l.category, l.price, l.quantity"
									  " FROM ROWS FROM (pg_catalog.unnest($8), pg_catalog.unnest($9),"
									  " pg_catalog.unnest($10), pg_catalog.unnest($11), pg_catalog.unnest($12),"
									  " pg_catalog.unnest($13))"
									  " AS l(id, sku, title, category, price, quantity)",
									  16, write_types),
						 args, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "writing an order failed");

	currency = MemoryContextStrdup(caller_cxt, lines[0].currency);
	SPI_finish();

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "place_order must return a composite");
	values[0] = UUIDPGetDatum(order_id);
	values[1] = CStringGetTextDatum("reserved");
	values[2] = CStringGetTextDatum(currency);
	values[3] = Int64GetDatum(total);
	values[4] = Int32GetDatum(nlines);
	values[5] = reserved_until;
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}

/*
 * Step 1 (see the file header), in the given snapshot: returns how many
 * lines it served, their ES_LINE_COLUMNS in SPI_tuptable.
 * es_execute_by_index leaves the planner no way to the rows but the ordered
 * scan of the SKU index.
 */
static int
es_reserve(Datum skus, Datum quantities, Snapshot snapshot)
{
	Oid			types[2] = {TEXTARRAYOID, INT4ARRAYOID};
	Datum		args[2] = {skus, quantities};

	if (es_execute_by_index(es_keep_plan(&es_plan_reserve,
										 "UPDATE eventshop.products p"
										 " SET reserved = p.reserved + ($2)[pg_catalog.array_position($1, p.sku::text)]"
										 " WHERE p.sku = ANY ($1) AND p.active"
										 " AND p.stock_on_hand - p.reserved >= ($2)[pg_catalog.array_position($1, p.sku::text)]"
										 " RETURNING " ES_LINE_COLUMNS,
										 2, types),
							args, NULL, snapshot, false, 0) != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "reserving the products of an order failed");
	return (int) SPI_processed;
}

/*
 * Refuses the order whose items step 1 did not all serve (lines[0 ..
 * nlines - 1] are the served ones): reads the products of the unserved
 * items as step 1 decided on them (see the file header) and raises the
 * error for the first offending item in the client's order.
 */
static void
es_refuse_order(EsOrderLine *lines, int nlines, Datum *skus, Datum *quantities, int n, int *line_of,
				Snapshot reserve_snapshot)
{
	int			nread = es_read_unserved(skus, n, line_of, InvalidSnapshot);
	int			stale = 0;

	es_read_lines(lines, nlines, nread, false, skus, quantities, n, line_of);
	/* servable now, so not the version step 1 refused: that one is in its snapshot */
	for (int i = 0; i < n; i++)
	{
		EsOrderLine *l = line_of[i] < 0 ? NULL : &lines[line_of[i]];

		if (l && !l->served && l->active && l->available >= l->quantity)
		{
			line_of[i] = -1;
			stale++;
		}
	}
	if (stale > 0)
	{
		int			nread_then = es_read_unserved(skus, n, line_of, reserve_snapshot);

		es_read_lines(lines, nlines + nread, nread_then, false, skus, quantities, n, line_of);
	}

	for (int i = 0; i < n; i++)
		if (line_of[i] < 0)
			ereport(ERROR,
					(errcode(ERRCODE_NO_DATA_FOUND),
					 errmsg("unknown SKU \"%s\"", TextDatumGetCString(skus[i]))));
	for (int i = 0; i < n; i++)
		if (!lines[line_of[i]].served && !lines[line_of[i]].active)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("product \"%s\" is not for sale", lines[line_of[i]].sku)));
	es_check_one_currency(lines, line_of, n);
	for (int i = 0; i < n; i++)
	{
		EsOrderLine *l = &lines[line_of[i]];

		if (!l->served && l->available < l->quantity)
			ereport(ERROR,
					(errcode(ERRCODE_CHECK_VIOLATION),
					 errmsg("insufficient stock for SKU \"%s\"", l->sku),
					 errdetail("Requested %d, available %d.", l->quantity, l->available)));
	}
	/* step 1 skipped a line that its own snapshot shows servable: a bug, not the caller's */
	elog(ERROR, "an order was refused, but its products show no reason");
}

/*
 * Reads the products of the items no line stands for yet (line_of[i] < 0):
 * as they are now (snapshot InvalidSnapshot) or in the given snapshot.
 * Their ES_LINE_COLUMNS are left in SPI_tuptable, and their number is
 * returned.
 */
static int
es_read_unserved(Datum *skus, int n, const int *line_of, Snapshot snapshot)
{
	Oid			types[1] = {TEXTARRAYOID};
	Datum		args[1];
	Datum	   *missing = palloc(sizeof(Datum) * n);
	int			nmissing = 0;
	SPIPlanPtr	plan;
	int			rc;

	for (int i = 0; i < n; i++)
		if (line_of[i] < 0)
			missing[nmissing++] = skus[i];
	args[0] = es_array(missing, NULL, nmissing, TEXTOID);
	plan = es_keep_plan(&es_plan_unserved,
						"SELECT " ES_LINE_COLUMNS " FROM eventshop.products p WHERE p.sku = ANY ($1)",
						1, types);
	if (snapshot == InvalidSnapshot)
		rc = SPI_execute_plan(plan, args, NULL, false, 0);	/* read-write: a new snapshot */
	else
		rc = SPI_execute_snapshot(plan, args, NULL, snapshot, InvalidSnapshot, true, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "reading the products of an order failed");
	return (int) SPI_processed;
}

/*
 * Fills lines[first .. first + count - 1] from the rows in SPI_tuptable
 * (ES_LINE_COLUMNS) and points the matching items of the client's order
 * (line_of) at them.
 */
static void
es_read_lines(EsOrderLine *lines, int first, int count, bool served, Datum *skus,
			  Datum *quantities, int n, int *line_of)
{
	for (int r = 0; r < count; r++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		EsOrderLine *l = &lines[first + r];
		bool		isnull;

		l->product_id = DatumGetInt64(SPI_getbinval(tuple, desc, 1, &isnull));
		l->sku = es_text_column(tuple, desc, 2);
		l->price_minor = DatumGetInt64(SPI_getbinval(tuple, desc, 3, &isnull));
		l->currency = es_text_column(tuple, desc, 4);
		l->title = es_text_column(tuple, desc, 5);
		l->category = es_text_column(tuple, desc, 6);
		l->served = served;
		l->active = DatumGetBool(SPI_getbinval(tuple, desc, 7, &isnull));
		l->available = DatumGetInt32(SPI_getbinval(tuple, desc, 8, &isnull));
		l->quantity = 0;
		for (int i = 0; i < n; i++)
		{
			text	   *sku = DatumGetTextPP(skus[i]);

			if (line_of[i] < 0 && VARSIZE_ANY_EXHDR(sku) == strlen(l->sku) &&
				memcmp(VARDATA_ANY(sku), l->sku, VARSIZE_ANY_EXHDR(sku)) == 0)
			{
				line_of[i] = first + r;
				l->quantity = DatumGetInt32(quantities[i]);
				break;
			}
		}
	}
}

/* Refuses an order whose items (line_of: item -> line) have more than one currency. */
static void
es_check_one_currency(EsOrderLine *lines, const int *line_of, int n)
{
	for (int i = 1; i < n; i++)
		if (strcmp(lines[line_of[i]].currency, lines[line_of[0]].currency) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("an order cannot mix currencies"),
					 errhint("Place one order per currency.")));
}

static text *
es_order_created_envelope(const char *order_key, pg_uuid_t *user_id, const char *currency,
						  int64 total, int32 item_count, int64 unit_count, Datum reserved_until,
						  pg_uuid_t *event_id)
{
	JsonbParseState *state = NULL;
	JsonbValue	v;
	JsonbValue *data;

	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	v.type = jbvString;
	v.val.string.val = (char *) order_key;
	v.val.string.len = strlen(order_key);
	es_push_pair(&state, "order_id", &v);
	v.val.string.val = DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(user_id)));
	v.val.string.len = strlen(v.val.string.val);
	es_push_pair(&state, "user_id", &v);
	v.val.string.val = "reserved";
	v.val.string.len = strlen(v.val.string.val);
	es_push_pair(&state, "status", &v);
	v.val.string.val = (char *) currency;
	v.val.string.len = strlen(currency);
	es_push_pair(&state, "currency", &v);
	v.val.string.val = JsonEncodeDateTime(NULL, reserved_until, TIMESTAMPTZOID, NULL);
	v.val.string.len = strlen(v.val.string.val);
	es_push_pair(&state, "reserved_until", &v);
	v.type = jbvNumeric;
	v.val.numeric = int64_to_numeric(total);
	es_push_pair(&state, "total_minor", &v);
	v.val.numeric = int64_to_numeric(item_count);
	es_push_pair(&state, "item_count", &v);
	v.val.numeric = int64_to_numeric(unit_count);
	es_push_pair(&state, "unit_count", &v);
	data = pushJsonbValue(&state, WJB_END_OBJECT, NULL);

	return es_event_envelope("orders.events", order_key, "order.created", JsonbValueToJsonb(data), event_id);
}

/* Adds "key": value to the object being built. */
static void
es_push_pair(JsonbParseState **state, const char *key, JsonbValue *value)
{
	JsonbValue	k;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	pushJsonbValue(state, WJB_KEY, &k);
	pushJsonbValue(state, WJB_VALUE, value);
}

/* A text column of an SPI result as a C string in the current context, NULL for SQL NULL. */
static char *
es_text_column(HeapTuple tuple, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tuple, desc, col, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/* A one-dimensional array of n elements of a built-in type (nulls may be NULL: none). */
static Datum
es_array(Datum *elems, bool *nulls, int n, Oid type)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;
	int			dims[1] = {n};
	int			lbs[1] = {1};

	get_typlenbyvalalign(type, &typlen, &typbyval, &typalign);
	return PointerGetDatum(construct_md_array(elems, nulls, 1, dims, lbs, type, typlen, typbyval, typalign));
}
