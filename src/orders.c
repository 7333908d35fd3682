/*
 * orders.c
 *		C helpers of the orders module: time-ordered order ids and the
 *		validation of the items a client sends with an order (also used by
 *		place_order.c).
 *
 * Order ids are UUIDv7 (RFC 9562): 48 bits of Unix time in milliseconds,
 * then the version, then 74 random bits from OpenSSL's CSPRNG. New orders
 * therefore land at the right-hand edge of the primary key and of the
 * (user_id, id) index instead of on a random leaf page, so placing an order
 * touches few index pages, and ordering by id is ordering by creation
 * (keyset pagination needs no separate created_at index). The timestamp is
 * not a secret: an order's creation time is shown to its owner anyway; the
 * random part keeps ids unguessable.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "datatype/timestamp.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "crypto_util.h"
#include "orders.h"

/* The bad-input caps of the issue: lines per order, units per line. */
#define ES_ORDER_MAX_LINES		100
#define ES_ORDER_MAX_QUANTITY	1000

PG_FUNCTION_INFO_V1(eventshop_uuid_v7);
PG_FUNCTION_INFO_V1(eventshop_parse_order_items);
PG_FUNCTION_INFO_V1(eventshop_stock_within);

static void es_item_error(int i, const char *reason) pg_attribute_noreturn();
static bool es_valid_sku(const char *s, int len);
static int	es_quantity(Numeric num);

/* Returns a new UUIDv7 for the current time, because order ids should sort by creation. */
Datum
eventshop_uuid_v7(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *uuid = palloc(sizeof(pg_uuid_t));

	(void) fcinfo;
	es_uuid_v7(uuid);
	PG_RETURN_UUID_P(uuid);
}

/* Fills in a new UUIDv7 for the current time. */
void
es_uuid_v7(pg_uuid_t *uuid)
{
	TimestampTz now = GetCurrentTimestamp();
	uint64		unix_ms;
	int			i;

	unix_ms = (uint64) (now / 1000) +
		(uint64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * 1000;
	for (i = 0; i < 6; i++)
		uuid->data[i] = (unsigned char) (unix_ms >> (8 * (5 - i)));
	es_random_bytes(uuid->data + 6, UUID_LEN - 6);
	uuid->data[6] = (uuid->data[6] & 0x0F) | 0x70;	/* version 7 */
	uuid->data[8] = (uuid->data[8] & 0x3F) | 0x80;	/* RFC 9562 variant */
}

/*
 * _parse_order_items(items jsonb, OUT skus text[], OUT quantities integer[])
 *
 * Validates what a client sent as the lines of an order and returns them as
 * two aligned arrays, in the client's order. Only
 * [{"sku": "<1-64 of A-Za-z0-9._->", "quantity": <integer 1-1000>}, ...]
 * with 1 to ES_ORDER_MAX_LINES distinct SKUs passes; any other key (a
 * "price", a "stock") is refused, never ignored. Every refusal is 22023 (22004
 * for NULL) naming the first offending item, so the client can fix it. In C
 * because it runs for every order and walking the jsonb directly costs a
 * fraction of the equivalent SQL over jsonb_array_elements.
 */
Datum
eventshop_parse_order_items(PG_FUNCTION_ARGS)
{
	int			n;
	Datum	   *skus;
	Datum	   *quantities;
	TupleDesc	tupdesc;
	Datum		values[2];
	bool		nulls[2] = {false, false};

	n = es_parse_order_items(PG_ARGISNULL(0) ? NULL : PG_GETARG_JSONB_P(0), &skus, &quantities);
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "_parse_order_items must return a record");
	values[0] = PointerGetDatum(construct_array(skus, n, TEXTOID, -1, false, TYPALIGN_INT));
	values[1] = PointerGetDatum(construct_array(quantities, n, INT4OID, 4, true, TYPALIGN_INT));
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}

/*
 * The checks of _parse_order_items, for C callers: items (NULL when SQL
 * NULL) as *skus (text Datums) and *quantities (int4 Datums), in the
 * client's order; returns the number of lines.
 */
int
es_parse_order_items(Jsonb *items, Datum **skus_out, Datum **quantities_out)
{
	int			n;
	int			i;
	Datum	   *skus;
	Datum	   *quantities;

	if (items == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("items are required")));
	if (!JB_ROOT_IS_ARRAY(items) || JB_ROOT_IS_SCALAR(items))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("items must be a JSON array"),
				 errhint("Pass [{\"sku\": \"...\", \"quantity\": 1}, ...].")));
	n = (int) JB_ROOT_COUNT(items);
	if (n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("an order needs at least one item")));
	if (n > ES_ORDER_MAX_LINES)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("an order has at most %d lines", ES_ORDER_MAX_LINES)));

	skus = palloc(sizeof(Datum) * n);
	quantities = palloc(sizeof(Datum) * n);
	for (i = 0; i < n; i++)
	{
		JsonbValue *item = getIthJsonbValueFromContainer(&items->root, (uint32) i);
		JsonbContainer *obj;
		JsonbIterator *it;
		JsonbIteratorToken tok;
		JsonbValue	v;
		JsonbValue *sku;
		JsonbValue *qty;
		int			quantity;
		int			j;

		if (item == NULL || item->type != jbvBinary || !JsonContainerIsObject(item->val.binary.data))
			es_item_error(i, "is not a JSON object");
		obj = item->val.binary.data;

		/* no key but sku and quantity */
		it = JsonbIteratorInit(obj);
		while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
		{
			if (tok == WJB_KEY &&
				!(v.val.string.len == 3 && memcmp(v.val.string.val, "sku", 3) == 0) &&
				!(v.val.string.len == 8 && memcmp(v.val.string.val, "quantity", 8) == 0))
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("item %d has an unknown field \"%s\"", i + 1,
								pnstrdup(v.val.string.val, Min(v.val.string.len, 64))),
						 errhint("Each item is {\"sku\": \"...\", \"quantity\": 1..1000} and nothing else.")));
		}

		sku = getKeyJsonValueFromContainer(obj, "sku", 3, NULL);
		if (sku == NULL || sku->type != jbvString || !es_valid_sku(sku->val.string.val, sku->val.string.len))
			es_item_error(i, "has a missing or invalid sku");
		for (j = 0; j < i; j++)
		{
			text	   *prev = DatumGetTextPP(skus[j]);

			if (VARSIZE_ANY_EXHDR(prev) == (Size) sku->val.string.len &&
				memcmp(VARDATA_ANY(prev), sku->val.string.val, sku->val.string.len) == 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("each SKU may appear only once in an order"),
						 errdetail("Items %d and %d have SKU \"%s\".", j + 1, i + 1,
								   pnstrdup(sku->val.string.val, sku->val.string.len))));
		}

		qty = getKeyJsonValueFromContainer(obj, "quantity", 8, NULL);
		if (qty == NULL || qty->type != jbvNumeric)
			es_item_error(i, "has a missing quantity or one that is not a number");
		quantity = es_quantity(qty->val.numeric);
		if (quantity == -1)
			es_item_error(i, "has a quantity that is not an integer");
		if (quantity == 0)
			es_item_error(i, "has a quantity outside 1 to 1000");

		skus[i] = PointerGetDatum(cstring_to_text_with_len(sku->val.string.val, sku->val.string.len));
		quantities[i] = Int32GetDatum(quantity);
	}
	*skus_out = skus;
	*quantities_out = quantities;
	return n;
}

/* Raises 22023 for item i (0-based) with a reason, because every item error reads the same way. */
static void
es_item_error(int i, const char *reason)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("item %d %s", i + 1, reason),
			 errhint("Each item is {\"sku\": \"...\", \"quantity\": 1..1000} and nothing else.")));
}

/* Whether s is a SKU (1-64 of A-Z a-z 0-9 . _ -), the same rule as the domain eventshop.sku. */
static bool
es_valid_sku(const char *s, int len)
{
	int			i;

	if (len < 1 || len > 64)
		return false;
	for (i = 0; i < len; i++)
	{
		char		c = s[i];

		if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
			  c == '.' || c == '_' || c == '-'))
			return false;
	}
	return true;
}

/* A JSON quantity as 1..1000; 0 when out of range, -1 when not an integer (1.0 counts as 1). */
static int
es_quantity(Numeric num)
{
	char	   *s = numeric_normalize(num);
	int			value = 0;
	char	   *p;

	if (strchr(s, '.') != NULL || strchr(s, 'e') != NULL || strchr(s, 'E') != NULL)
		return -1;
	if (s[0] == '-' || strlen(s) > 4)
		return 0;
	for (p = s; *p; p++)
	{
		if (*p < '0' || *p > '9')
			return -1;
		value = value * 10 + (*p - '0');
	}
	return (value >= 1 && value <= ES_ORDER_MAX_QUANTITY) ? value : 0;
}

/*
 * _stock_within(reserved, stock_on_hand) -> boolean: the products' CHECK,
 * 0 <= reserved <= stock_on_hand (no oversell). A C function rather than the
 * expression because a table's CHECK is read back from its catalog text and
 * planned again by every statement that writes the table, and the reserve
 * of every order writes it.
 */
Datum
eventshop_stock_within(PG_FUNCTION_ARGS)
{
	int32		reserved = PG_GETARG_INT32(0);
	int32		stock_on_hand = PG_GETARG_INT32(1);

	PG_RETURN_BOOL(reserved >= 0 && reserved <= stock_on_hand);
}
