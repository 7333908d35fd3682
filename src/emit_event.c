/*
 * emit_event.c
 *		eventshop._emit_event(topic, message_key, event_type, data): writes
 *		one CloudEvent to the outbox in the caller's transaction and returns
 *		its id. Every state change of every module goes through here, so it
 *		is C: the envelope is built as text in one pass and inserted through
 *		a kept plan (the PL/pgSQL version spent ~55 us per event on
 *		json_build_object, to_char and statement overhead).
 *
 * C modules call es_emit_event() directly, or es_event_envelope() to write
 * the row in a statement of their own; SQL modules call the function.
 * Both validate the same way, with the SQLSTATEs the outbox's own
 * constraints would use (23514 check, 23502 not null).
 */
#include "postgres.h"

#include "catalog/pg_type_d.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "port.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "emit_event.h"
#include "spi_util.h"

#define MAX_MESSAGE_KEY_BYTES 512

/* The topics of ../shared/DESIGN.md; events go to nothing else. */
static const char *const known_topics[] = {
	"auth.events", "orders.events", "payments.events", "registrations.events",
	"invites.events", "notifications.events", NULL
};

static SPIPlanPtr insert_plan = NULL;
static SPIPlanPtr insert_many_plan = NULL;

static bool es_known_topic(const char *topic, size_t len);
static void es_check_event(const char *topic, const char *message_key, const char *event_type);
static void es_append_utc_time(StringInfo buf, TimestampTz now);

PG_FUNCTION_INFO_V1(eventshop_emit_event);
PG_FUNCTION_INFO_V1(eventshop_emit_events);
PG_FUNCTION_INFO_V1(eventshop_is_event_topic);
PG_FUNCTION_INFO_V1(eventshop_is_message_key);

Datum
eventshop_emit_event(PG_FUNCTION_ARGS)
{
	const char *topic = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	const char *message_key = PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1));
	const char *event_type = PG_ARGISNULL(2) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(2));
	Jsonb	   *data = PG_ARGISNULL(3) ? NULL : PG_GETARG_JSONB_P(3);

	PG_RETURN_UUID_P(es_emit_event(topic, message_key, event_type, data));
}

/*
 * _emit_events(topic, message_keys[], event_types[], data[]): the events of
 * a batch, in array order, with one statement instead of one per event.
 * Each is checked as _emit_event checks it; any refusal writes none of
 * them. Returns how many were written.
 */
Datum
eventshop_emit_events(PG_FUNCTION_ARGS)
{
	const char *topic = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	Datum	   *keys;
	Datum	   *types;
	Datum	   *data;
	bool	   *key_nulls;
	bool	   *type_nulls;
	bool	   *data_nulls;
	int			nkeys;
	int			ntypes;
	int			ndata;
	Datum	   *ids;
	Datum	   *payloads;
	Oid			argtypes[5] = {TEXTOID, TEXTARRAYOID, UUIDARRAYOID, TEXTARRAYOID, JSONARRAYOID};
	Datum		values[5];

	if (PG_ARGISNULL(1) || PG_ARGISNULL(2) || PG_ARGISNULL(3))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the message keys, event types and data of a batch of events must not be NULL")));
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(1), TEXTOID, -1, false, TYPALIGN_INT, &keys, &key_nulls, &nkeys);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(2), TEXTOID, -1, false, TYPALIGN_INT, &types, &type_nulls, &ntypes);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(3), JSONBOID, -1, false, TYPALIGN_INT, &data, &data_nulls, &ndata);
	if (nkeys != ntypes || nkeys != ndata)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("the message keys, event types and data of a batch of events must have the same length")));
	if (nkeys == 0)
		PG_RETURN_INT32(0);

	ids = palloc(sizeof(Datum) * nkeys);
	payloads = palloc(sizeof(Datum) * nkeys);
	for (int i = 0; i < nkeys; i++)
	{
		pg_uuid_t  *id = palloc(sizeof(pg_uuid_t));

		payloads[i] = PointerGetDatum(es_event_envelope(topic,
														key_nulls[i] ? NULL : TextDatumGetCString(keys[i]),
														type_nulls[i] ? NULL : TextDatumGetCString(types[i]),
														data_nulls[i] ? NULL : DatumGetJsonbP(data[i]),
														id));
		ids[i] = UUIDPGetDatum(id);
	}
	values[0] = CStringGetTextDatum(topic);
	values[1] = PointerGetDatum(construct_md_array(keys, key_nulls, 1, &nkeys, (int[]) {1}, TEXTOID, -1, false, TYPALIGN_INT));
	values[2] = PointerGetDatum(construct_array(ids, nkeys, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR));
	values[3] = PointerGetDatum(construct_md_array(types, type_nulls, 1, &nkeys, (int[]) {1}, TEXTOID, -1, false, TYPALIGN_INT));
	values[4] = PointerGetDatum(construct_array(payloads, nkeys, JSONOID, -1, false, TYPALIGN_INT));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute_plan(es_keep_plan(&insert_many_plan,
									  "INSERT INTO eventshop.outbox "
									  "(topic, message_key, event_id, event_type, payload) "
									  "SELECT $1, e.message_key, e.event_id, e.event_type, e.payload "
									  "FROM ROWS FROM (pg_catalog.unnest($2), pg_catalog.unnest($3), "
									  "pg_catalog.unnest($4), pg_catalog.unnest($5)) "
									  "AS e(message_key, event_id, event_type, payload)",
									  5, argtypes),
						 values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "eventshop: writing events to the outbox failed");
	SPI_finish();
	PG_RETURN_INT32(nkeys);
}

/*
 * Writes one event; data NULL is written as JSON null. Returns the event id
 * (palloc'd in the caller's context).
 */
pg_uuid_t *
es_emit_event(const char *topic, const char *message_key, const char *event_type, Jsonb *data)
{
	pg_uuid_t  *id = palloc(sizeof(pg_uuid_t));
	Oid			argtypes[5] = {TEXTOID, TEXTOID, UUIDOID, TEXTOID, JSONOID};
	Datum		values[5];

	values[4] = PointerGetDatum(es_event_envelope(topic, message_key, event_type, data, id));
	values[0] = CStringGetTextDatum(topic);
	values[1] = CStringGetTextDatum(message_key);
	values[2] = UUIDPGetDatum(id);
	values[3] = CStringGetTextDatum(event_type);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute_plan(es_keep_plan(&insert_plan,
									  "INSERT INTO eventshop.outbox "
									  "(topic, message_key, event_id, event_type, payload) "
									  "VALUES ($1, $2, $3, $4, $5)",
									  5, argtypes),
						 values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "eventshop: writing an event to the outbox failed");
	SPI_finish();
	return id;
}

/*
 * Checks an event and builds its CloudEvent envelope: the payload column's
 * value (json, as text: valid by construction), with a new random event id
 * stored in *id. For a caller that writes the outbox row in a statement of
 * its own, with the same columns es_emit_event writes.
 */
text *
es_event_envelope(const char *topic, const char *message_key, const char *event_type, Jsonb *data,
				  pg_uuid_t *id)
{
	StringInfoData payload;
	const char *dot;

	es_check_event(topic, message_key, event_type);

	/* a version 4 (random) UUID, as gen_random_uuid() makes */
	if (!pg_strong_random(id->data, UUID_LEN))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate a random event id")));
	id->data[6] = (id->data[6] & 0x0f) | 0x40;
	id->data[8] = (id->data[8] & 0x3f) | 0x80;

	dot = strchr(topic, '.');
	initStringInfo(&payload);
	appendStringInfoString(&payload, "{\"specversion\" : \"1.0\", \"id\" : \"");
	appendStringInfoString(&payload, DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(id))));
	appendStringInfoString(&payload, "\", \"source\" : \"/eventshop/");
	appendBinaryStringInfo(&payload, topic, (int) (dot - topic));
	appendStringInfoString(&payload, "\", \"type\" : ");
	escape_json(&payload, event_type);
	appendStringInfoString(&payload, ", \"time\" : \"");
	es_append_utc_time(&payload, GetCurrentTimestamp());
	appendStringInfoString(&payload, "\", \"subject\" : ");
	escape_json(&payload, message_key);
	appendStringInfoString(&payload, ", \"datacontenttype\" : \"application/json\", \"data\" : ");
	if (data == NULL)
		appendStringInfoString(&payload, "null");
	else
		(void) JsonbToCString(&payload, &data->root, VARSIZE(data));
	appendStringInfoChar(&payload, '}');
	return cstring_to_text_with_len(payload.data, payload.len);
}

/*
 * _is_event_topic(topic) -> boolean: the outbox's CHECK on topic. The
 * outbox's CHECKs are C functions rather than expressions: a table's CHECK
 * is read back from its catalog text and planned again by every INSERT
 * statement, and a call with a column argument is the cheapest to read.
 */
Datum
eventshop_is_event_topic(PG_FUNCTION_ARGS)
{
	text	   *topic = PG_GETARG_TEXT_PP(0);

	PG_RETURN_BOOL(es_known_topic(VARDATA_ANY(topic), VARSIZE_ANY_EXHDR(topic)));
}

/* _is_message_key(message_key) -> boolean: the outbox's CHECK on message_key, 1 to 512 bytes. */
Datum
eventshop_is_message_key(PG_FUNCTION_ARGS)
{
	Size		len = VARSIZE_ANY_EXHDR(PG_GETARG_TEXT_PP(0));

	PG_RETURN_BOOL(len >= 1 && len <= MAX_MESSAGE_KEY_BYTES);
}

/* Whether the len bytes at topic name one of known_topics. */
static bool
es_known_topic(const char *topic, size_t len)
{
	for (int i = 0; known_topics[i] != NULL; i++)
		if (strlen(known_topics[i]) == len && memcmp(topic, known_topics[i], len) == 0)
			return true;
	return false;
}

/* Refuses what the outbox would refuse, with a message naming the field. */
static void
es_check_event(const char *topic, const char *message_key, const char *event_type)
{
	size_t		key_len;

	if (topic == NULL || !es_known_topic(topic, strlen(topic)))
		ereport(ERROR,
				(errcode(ERRCODE_CHECK_VIOLATION),
				 errmsg("unknown event topic \"%s\"", topic ? topic : "(null)")));
	if (message_key == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NOT_NULL_VIOLATION),
				 errmsg("an event needs a message key")));
	key_len = strlen(message_key);
	if (key_len < 1 || key_len > MAX_MESSAGE_KEY_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_CHECK_VIOLATION),
				 errmsg("an event message key must be 1 to %d bytes long", MAX_MESSAGE_KEY_BYTES)));
	if (event_type == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NOT_NULL_VIOLATION),
				 errmsg("an event needs a type")));
}

/* RFC 3339 in UTC with microseconds: 2026-11-21T19:13:05.123456Z */
static void
es_append_utc_time(StringInfo buf, TimestampTz now)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (timestamp2tm(now, NULL, &tm, &fsec, NULL, NULL) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	appendStringInfo(buf, "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ",
					 tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int) fsec);
}
