/*
 * place_order.c
 *		eventshop.place_order(items) and eventshop.place_order(access_token,
 *		items): the inventory's "reserve", in C with statements prepared once
 *		per backend, because it runs for every order.
 *
 * An order is one statement and a function call, both in the caller's
 * transaction:
 *
 *   1. every product of the order is locked FOR NO KEY UPDATE in product-id
 *      order (a materialized CTE, so concurrent orders queue up on their
 *      first common product instead of deadlocking, and nothing can change
 *      the stock, price or state read under the lock); the same statement
 *      checks the locked rows (every SKU found, all for sale, one currency,
 *      enough available for every line) and only if all of that holds
 *      reserves the units and inserts the order and its lines (title,
 *      category and price snapshotted); it returns the locked rows;
 *   2. order.created through eventshop._emit_event (called directly, its
 *      data built in C).
 *
 * The C code runs the same checks over the returned rows to say what is
 * wrong, each refusal naming the first offending item in the client's
 * order: unknown SKU (P0002), not for sale (55000), mixed currencies
 * (22023), insufficient stock (23514, with requested and available units).
 * A refused order was not written by the statement, and the ERROR would
 * undo it anyway: an order is written whole or not at all. The products'
 * CHECK (reserved <= stock_on_hand) is the last line of defence against
 * overselling.
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
#include "nodes/value.h"
#include "parser/parse_func.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "authenticate.h"
#include "orders.h"
#include "spi_util.h"

PG_FUNCTION_INFO_V1(eventshop_place_order);
PG_FUNCTION_INFO_V1(eventshop_place_order_with_token);

/* One locked product, in product-id order. */
typedef struct EsOrderLine
{
	int64		product_id;
	char	   *sku;
	char	   *title;
	char	   *category;		/* NULL when the product has none */
	int64		price_minor;
	char	   *currency;
	bool		active;
	int32		available;
	int32		quantity;		/* what the client asked for */
} EsOrderLine;

static SPIPlanPtr es_plan_order = NULL;

static Datum es_place_order(FunctionCallInfo fcinfo, pg_uuid_t *user_id, Jsonb *items);
static void es_emit_order_created(pg_uuid_t *order_id, pg_uuid_t *user_id, const char *currency,
								  int64 total, int32 item_count, int64 unit_count, Datum reserved_until);
static void es_push_pair(JsonbParseState **state, const char *key, JsonbValue *value);
static char *es_text_column(HeapTuple tuple, TupleDesc desc, int col);
static Datum es_array(Datum *elems, bool *nulls, int n, Oid type);

/* place_order(items jsonb) -> order_summary, for the caller authenticate established. */
Datum
eventshop_place_order(PG_FUNCTION_ARGS)
{
	pg_uuid_t	user_id;

	es_require_user(&user_id);
	return es_place_order(fcinfo, &user_id, PG_ARGISNULL(0) ? NULL : PG_GETARG_JSONB_P(0));
}

/* place_order(access_token text, items jsonb) -> order_summary: authenticate, then place. */
Datum
eventshop_place_order_with_token(PG_FUNCTION_ARGS)
{
	pg_uuid_t	user_id;
	pg_uuid_t	session_id;

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
	int64		total = 0;
	int64		units = 0;
	pg_uuid_t  *order_id;
	Datum		reserved_until;
	char	   *currency;
	TupleDesc	tupdesc;
	Datum		values[6];
	bool		nulls[6] = {false, false, false, false, false, false};
	Oid			order_types[5] = {TEXTARRAYOID, INT4ARRAYOID, UUIDOID, UUIDOID, TIMESTAMPTZOID};
	Datum		args[5];
	bool		written = false;

	/* Only sku and quantity are accepted: a price or stock sent by the client is refused. */
	n = es_parse_order_items(items, &skus, &quantities);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	order_id = MemoryContextAlloc(caller_cxt, sizeof(pg_uuid_t));
	es_uuid_v7(order_id);
	/* now() + current_setting('eventshop.reservation_ttl')::interval */
	reserved_until = DirectFunctionCall2(timestamptz_pl_interval,
										 TimestampTzGetDatum(GetCurrentTransactionStartTimestamp()),
										 DirectFunctionCall3(interval_in,
															 CStringGetDatum(GetConfigOptionByName("eventshop.reservation_ttl", NULL, false)),
															 ObjectIdGetDatum(InvalidOid),
															 Int32GetDatum(-1)));

	/* 1. lock, check, and if every check passes reserve and write the order */
	args[0] = es_array(skus, NULL, n, TEXTOID);
	args[1] = es_array(quantities, NULL, n, INT4OID);
	args[2] = UUIDPGetDatum(order_id);
	args[3] = UUIDPGetDatum(user_id);
	args[4] = reserved_until;
	if (SPI_execute_plan(es_keep_plan(&es_plan_order,
									  "WITH l AS MATERIALIZED ("
									  " SELECT p.id, p.sku::text AS sku, p.title, p.category, p.price_minor::bigint AS price,"
									  " p.currency::text AS currency, p.active, p.stock_on_hand - p.reserved AS available,"
									  " ($2)[pg_catalog.array_position($1, p.sku::text)] AS quantity"
									  " FROM eventshop.products p WHERE p.sku = ANY ($1)"
									  " ORDER BY p.id FOR NO KEY UPDATE"
									  "), ok AS MATERIALIZED ("
									  " SELECT count(*) = pg_catalog.cardinality($1)"
									  " AND bool_and(l.active AND l.available >= l.quantity)"
									  " AND min(l.currency) = max(l.currency) AS ok,"
									  " min(l.currency) AS currency, sum(l.price * l.quantity)::bigint AS total,"
									  " sum(l.quantity)::integer AS units"
									  " FROM l"
									  "), reserve AS ("
									  " UPDATE eventshop.products p SET reserved = p.reserved + l.quantity"
									  " FROM l, ok WHERE ok.ok AND p.id = l.id"
									  "), ord AS ("
									  " INSERT INTO eventshop.orders (id, user_id, status, currency, total_minor,"
									  " item_count, unit_count, created_at, reserved_until, updated_at)"
									  " SELECT $3, $4, 'reserved', ok.currency, ok.total, pg_catalog.cardinality($1), ok.units,"
									  " pg_catalog.now(), $5, pg_catalog.now() FROM ok WHERE ok.ok"
									  "), items AS ("
									  " INSERT INTO eventshop.order_items (order_id, product_id, sku, title, category,"
									  " unit_price_minor, quantity)"
									  " SELECT $3, l.id, l.sku, l.title, l.category, l.price, l.quantity FROM l, ok WHERE ok.ok"
									  ") "
									  "SELECT l.id, l.sku, l.title, l.category, l.price, l.currency, l.active, l.available, ok.ok"
									  " FROM l, ok",
									  5, order_types),
						 args, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "placing an order failed");
	nlines = (int) SPI_processed;
	lines = palloc(sizeof(EsOrderLine) * (nlines > 0 ? nlines : 1));
	line_of = palloc(sizeof(int) * n);
	for (int i = 0; i < n; i++)
		line_of[i] = -1;
	for (int r = 0; r < nlines; r++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		EsOrderLine *l = &lines[r];
		bool		isnull;

		l->product_id = DatumGetInt64(SPI_getbinval(tuple, desc, 1, &isnull));
		l->sku = es_text_column(tuple, desc, 2);
		l->title = es_text_column(tuple, desc, 3);
		l->category = es_text_column(tuple, desc, 4);
		l->price_minor = DatumGetInt64(SPI_getbinval(tuple, desc, 5, &isnull));
		l->currency = es_text_column(tuple, desc, 6);
		l->active = DatumGetBool(SPI_getbinval(tuple, desc, 7, &isnull));
		l->available = DatumGetInt32(SPI_getbinval(tuple, desc, 8, &isnull));
		written = DatumGetBool(SPI_getbinval(tuple, desc, 9, &isnull));
		l->quantity = 0;
		for (int i = 0; i < n; i++)
		{
			if (strcmp(TextDatumGetCString(skus[i]), l->sku) == 0)
			{
				line_of[i] = r;
				l->quantity = DatumGetInt32(quantities[i]);
				break;
			}
		}
	}

	/* What is wrong, reported for the first item in the client's order. */
	for (int i = 0; i < n; i++)
		if (line_of[i] < 0)
			ereport(ERROR,
					(errcode(ERRCODE_NO_DATA_FOUND),
					 errmsg("unknown SKU \"%s\"", TextDatumGetCString(skus[i]))));
	for (int i = 0; i < n; i++)
		if (!lines[line_of[i]].active)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("product \"%s\" is not for sale", lines[line_of[i]].sku)));
	for (int r = 1; r < nlines; r++)
		if (strcmp(lines[r].currency, lines[0].currency) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("an order cannot mix currencies"),
					 errhint("Place one order per currency.")));
	for (int i = 0; i < n; i++)
	{
		EsOrderLine *l = &lines[line_of[i]];

		if (l->available < l->quantity)
			ereport(ERROR,
					(errcode(ERRCODE_CHECK_VIOLATION),
					 errmsg("insufficient stock for SKU \"%s\"", l->sku),
					 errdetail("Requested %d, available %d.", l->quantity, l->available)));
	}

	/* the statement applied the same checks: it wrote the order exactly when they all pass */
	if (!written)
		elog(ERROR, "an order that passed every check was not written");
	for (int r = 0; r < nlines; r++)
	{
		/* at most 100 lines of 1000 units at 10^12 each: far inside int64 */
		total += lines[r].price_minor * lines[r].quantity;
		units += lines[r].quantity;
	}

	/* 2. the event, in the same transaction */
	es_emit_order_created(order_id, user_id, lines[0].currency, total, nlines, units, reserved_until);

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
 * Emits order.created through eventshop._emit_event, called directly rather
 * than through a statement: the data is what jsonb_build_object would make
 * of order_id, user_id, status, currency, total_minor, item_count,
 * unit_count and reserved_until.
 */
static void
es_emit_order_created(pg_uuid_t *order_id, pg_uuid_t *user_id, const char *currency,
					  int64 total, int32 item_count, int64 unit_count, Datum reserved_until)
{
	Oid			argtypes[4] = {TEXTOID, TEXTOID, TEXTOID, JSONBOID};
	Oid			emit;
	char	   *order_str = DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(order_id)));
	JsonbParseState *state = NULL;
	JsonbValue	v;
	JsonbValue *data;

	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	v.type = jbvString;
	v.val.string.val = order_str;
	v.val.string.len = strlen(order_str);
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

	/* looked up per call (a syscache hit), so a re-created extension is found */
	emit = LookupFuncName(list_make2(makeString("eventshop"), makeString("_emit_event")), 4, argtypes, false);
	if (pg_proc_aclcheck(emit, GetUserId(), ACL_EXECUTE) != ACLCHECK_OK)
		aclcheck_error(ACLCHECK_NO_PRIV, OBJECT_FUNCTION, "eventshop._emit_event");
	(void) OidFunctionCall4(emit, CStringGetTextDatum("orders.events"), CStringGetTextDatum(order_str),
							CStringGetTextDatum("order.created"), JsonbPGetDatum(JsonbValueToJsonb(data)));
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
