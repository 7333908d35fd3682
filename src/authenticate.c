/*
 * authenticate.c
 *		eventshop.authenticate(token) and eventshop._require_user(): who the
 *		caller is, verified from an access token, and re-checked against the
 *		session and the account on every statement that needs it.
 *
 * authenticate checks, in this order, each failure raising 28000 "invalid
 * token" with a detail naming the first problem:
 *
 *   1. the token itself (es_jwt_verify: shape, header, key state, algorithm,
 *      signature, payload JSON);
 *   2. the claims: iss and aud equal eventshop.jwt_issuer / jwt_audience (aud
 *      a string or an array holding it), typ "access", exp/nbf/iat numbers
 *      with exp > now >= nbf and iat <= now (now = clock_timestamp(), exact
 *      to the microsecond), jti a string of 1-128 bytes, sub and sid
 *      lower-case UUIDs;
 *   3. in the current snapshot: the session sid exists and belongs to sub,
 *      is not revoked and not expired; the account is not blocked, and the
 *      token was not issued (iat, to the second) before the account's
 *      valid_after.
 *
 * The key state of check 1 is read on every call. For a token whose
 * signature this backend verified before, it is read by the statement of
 * check 3 (es_jwt_verify_deferred), which saves a statement per call;
 * problems are still reported in the order above.
 *
 * Then the caller is established for the rest of the transaction
 * (auth_context.c). _require_user re-reads the session and the account on
 * every call, so a revocation committed elsewhere applies to the caller's
 * next statement. Both read through statements prepared once per backend.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "datatype/timestamp.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "auth_context.h"
#include "authenticate.h"
#include "config.h"
#include "jwt.h"
#include "key_store.h"
#include "spi_util.h"

PG_FUNCTION_INFO_V1(eventshop_authenticate);
PG_FUNCTION_INFO_V1(eventshop_require_user);

/* An access token whose signature and claims are checked (es_verify_access_token). */
typedef struct EsAccessClaims
{
	pg_uuid_t	user_id;		/* sub */
	pg_uuid_t	session_id;		/* sid */
	Numeric		iat;
	EsJwtKeyCheck key;			/* its signing key, possibly still to be checked */
} EsAccessClaims;

static SPIPlanPtr es_plan_caller = NULL;
static SPIPlanPtr es_plan_live = NULL;

static void es_verify_access_token(text *token, EsAccessClaims *claims);
static ArrayType *es_check_caller(EsAccessClaims *claims);
static void es_claim_invalid(EsAccessClaims *claims, const char *detail) pg_attribute_noreturn();
static JsonbValue *es_claim(Jsonb *claims, const char *name);
static bool es_claim_is_string(JsonbValue *v, const char *s);
static bool es_parse_lower_uuid(JsonbValue *v, pg_uuid_t *out);
static int	es_numeric_cmp(Numeric a, Numeric b);

/* authenticate(token) -> eventshop.caller: see the file header. */
Datum
eventshop_authenticate(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *user_id = palloc(sizeof(pg_uuid_t));
	pg_uuid_t  *session_id = palloc(sizeof(pg_uuid_t));
	ArrayType  *roles;
	TupleDesc	tupdesc;
	Datum		values[3];
	bool		nulls[3] = {false, false, false};

	roles = es_authenticate(PG_ARGISNULL(0) ? NULL : PG_GETARG_TEXT_PP(0), user_id, session_id);
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "authenticate must return a composite");
	values[0] = UUIDPGetDatum(user_id);
	values[1] = PointerGetDatum(roles);
	values[2] = UUIDPGetDatum(session_id);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}

/*
 * Verifies token (NULL: none given) as the file header says, establishes
 * the caller and returns its roles (read from the account); user_id and
 * session_id are filled in.
 */
ArrayType *
es_authenticate(text *token, pg_uuid_t *user_id, pg_uuid_t *session_id)
{
	EsAccessClaims claims;
	ArrayType  *roles;

	es_verify_access_token(token, &claims);
	roles = es_check_caller(&claims);
	*user_id = claims.user_id;
	*session_id = claims.session_id;
	return roles;
}

/*
 * Checks 1 and 2 of the file header (NULL token: none given) and fills in
 * claims. The signing key's state may still be pending (jwt.h):
 * es_check_caller completes it. A wrong claim is reported after a bad key.
 */
static void
es_verify_access_token(text *token, EsAccessClaims *claims)
{
	Jsonb	   *jb;
	JsonbValue *v;
	JsonbValue *exp;
	JsonbValue *nbf;
	JsonbValue *iat;
	Numeric		now;
	const char *audience = es_jwt_audience ? es_jwt_audience : "";
	bool		aud_ok = false;

	if (token == NULL)
		es_invalid_token("No token was given.");
	jb = es_jwt_verify_deferred(VARDATA_ANY(token), VARSIZE_ANY_EXHDR(token), &claims->key);
	/* extract(epoch FROM clock_timestamp()), to the microsecond */
	now = int64_div_fast_to_numeric(GetCurrentTimestamp() +
									(POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY, 6);

	if (!es_claim_is_string(es_claim(jb, "iss"), es_jwt_issuer ? es_jwt_issuer : ""))
		es_claim_invalid(claims, "The issuer (iss) is missing or wrong.");
	v = es_claim(jb, "aud");
	if (v != NULL && v->type == jbvString)
		aud_ok = es_claim_is_string(v, audience);
	else if (v != NULL && v->type == jbvBinary && JsonContainerIsArray(v->val.binary.data))
	{
		uint32		n = JsonContainerSize(v->val.binary.data);

		for (uint32 i = 0; i < n && !aud_ok; i++)
			aud_ok = es_claim_is_string(getIthJsonbValueFromContainer(v->val.binary.data, i), audience);
	}
	if (!aud_ok)
		es_claim_invalid(claims, "The audience (aud) is missing or wrong.");
	if (!es_claim_is_string(es_claim(jb, "typ"), "access"))
		es_claim_invalid(claims, "The token is not an access token (typ).");
	exp = es_claim(jb, "exp");
	nbf = es_claim(jb, "nbf");
	iat = es_claim(jb, "iat");
	if (exp == NULL || exp->type != jbvNumeric || nbf == NULL || nbf->type != jbvNumeric ||
		iat == NULL || iat->type != jbvNumeric)
		es_claim_invalid(claims, "The time claims (exp, nbf, iat) must be numbers.");
	if (es_numeric_cmp(exp->val.numeric, now) <= 0)
		es_claim_invalid(claims, "The token has expired.");
	if (es_numeric_cmp(nbf->val.numeric, now) > 0)
		es_claim_invalid(claims, "The token is not valid yet (nbf).");
	if (es_numeric_cmp(iat->val.numeric, now) > 0)
		es_claim_invalid(claims, "The token was issued in the future (iat).");
	v = es_claim(jb, "jti");
	if (v == NULL || v->type != jbvString || v->val.string.len < 1 || v->val.string.len > 128)
		es_claim_invalid(claims, "The token id (jti) is missing.");
	if (!es_parse_lower_uuid(es_claim(jb, "sub"), &claims->user_id))
		es_claim_invalid(claims, "The subject (sub) is missing or not a user id.");
	if (!es_parse_lower_uuid(es_claim(jb, "sid"), &claims->session_id))
		es_claim_invalid(claims, "The session (sid) is missing or not a session id.");
	claims->iat = iat->val.numeric;
}

/* A claim is wrong. The key's state is check 1 and comes first, if not read yet. */
static void
es_claim_invalid(EsAccessClaims *claims, const char *detail)
{
	es_jwt_check_key_now(&claims->key);
	es_invalid_token("%s", detail);
}

/*
 * Check 3: the session, the account and, when es_jwt_verify_deferred left
 * it pending, the signing key's state, all read by one statement (the
 * account through a LATERAL subquery that is not flattened: a nested loop
 * over the session's one row, never a hash join, however small the tables
 * were when the backend planned it); then
 * establishes the caller for the rest of the transaction and returns its
 * roles (copied out of SPI).
 */
static ArrayType *
es_check_caller(EsAccessClaims *claims)
{
	MemoryContext caller_cxt = CurrentMemoryContext;
	MemoryContext spi_cxt;
	Oid			argtypes[3] = {UUIDOID, TEXTOID, INT4OID};
	Datum		args[3];
	char		nulls[3] = {' ', ' ', ' '};
	HeapTuple	row;
	TupleDesc	desc;
	bool		isnull;
	Datum		valid_after;
	bool		valid_after_null;
	ArrayType  *roles;
	pg_uuid_t	owner;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	args[0] = UUIDPGetDatum(&claims->session_id);
	if (claims->key.pending)
		args[1] = CStringGetTextDatum(claims->key.kid);
	else
		nulls[1] = 'n';
	args[2] = Int32GetDatum(es_access_token_ttl_s);
	if (SPI_execute_plan(es_keep_plan(&es_plan_caller,
									  "SELECT s.user_id, "
									  "s.revoked_at IS NOT NULL OR s.expires_at <= pg_catalog.clock_timestamp(), "
									  "u.blocked, u.valid_after, u.roles, "
									  "(SELECT " ES_KEY_STATE_SQL("$3") " FROM eventshop.signing_keys k WHERE k.kid = $2) "
									  "FROM eventshop.sessions s, LATERAL ("
									  "SELECT u.blocked_at IS NOT NULL AS blocked, "
									  "pg_catalog.date_part('epoch'::text, pg_catalog.date_trunc('second'::text, u.valid_after))::pg_catalog.numeric AS valid_after, "
									  "u.roles FROM eventshop.users u WHERE u.id = s.user_id OFFSET 0) u "
									  "WHERE s.id = $1",
									  3, argtypes),
						 args, nulls, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "session lookup failed");
	if (SPI_processed != 1)
	{
		es_jwt_check_key_now(&claims->key);
		es_invalid_token("The session is unknown.");
	}
	row = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	if (claims->key.pending)
	{
		int			key_alg;
		Datum		state = SPI_getbinval(row, desc, 6, &isnull);

		EsKeyStatus status = es_key_state_decode(state, isnull, &key_alg);

		es_jwt_check_key(&claims->key, status, key_alg);
	}
	owner = *DatumGetUUIDP(SPI_getbinval(row, desc, 1, &isnull));
	if (memcmp(owner.data, claims->user_id.data, UUID_LEN) != 0)
		es_invalid_token("The session is unknown.");
	if (DatumGetBool(SPI_getbinval(row, desc, 2, &isnull)))
		es_invalid_token("The session has ended.");
	if (DatumGetBool(SPI_getbinval(row, desc, 3, &isnull)))
		es_invalid_token("The account is blocked.");
	/* second granularity, as iat: tokens issued in an earlier second are refused */
	valid_after = SPI_getbinval(row, desc, 4, &valid_after_null);
	if (!valid_after_null && es_numeric_cmp(claims->iat, DatumGetNumeric(valid_after)) < 0)
		es_invalid_token("The token was issued before the account's credentials changed.");
	/* detoasted (a short header is expanded) and copied in the caller's context, which outlives SPI's */
	spi_cxt = MemoryContextSwitchTo(caller_cxt);
	roles = DatumGetArrayTypePCopy(SPI_getbinval(row, desc, 5, &isnull));
	MemoryContextSwitchTo(spi_cxt);
	SPI_finish();

	es_auth_set(&claims->user_id, roles, &claims->session_id);
	return roles;
}

/* _require_user() -> uuid: the caller of this transaction, its session and account checked again now. */
Datum
eventshop_require_user(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *user_id = palloc(sizeof(pg_uuid_t));

	(void) fcinfo;
	es_require_user(user_id);
	PG_RETURN_UUID_P(user_id);
}

/*
 * Raises 28000 unless authenticate established a caller in this
 * transaction whose session is still live and whose account is not blocked,
 * as read now; fills in the caller's user id.
 */
void
es_require_user(pg_uuid_t *user_id)
{
	pg_uuid_t	session_id;
	Oid			argtypes[2] = {UUIDOID, UUIDOID};
	Datum		args[2];

	if (!es_auth_current(user_id, &session_id))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("authentication required"),
				 errhint("Call eventshop.authenticate(access_token) first in the same transaction.")));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	args[0] = UUIDPGetDatum(&session_id);
	args[1] = UUIDPGetDatum(user_id);
	if (SPI_execute_plan(es_keep_plan(&es_plan_live,
									  "SELECT FROM eventshop.sessions s JOIN eventshop.users u ON u.id = s.user_id "
									  "WHERE s.id = $1 AND s.user_id = $2 AND s.revoked_at IS NULL "
									  "AND s.expires_at > pg_catalog.clock_timestamp() AND u.blocked_at IS NULL",
									  2, argtypes),
						 args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "session lookup failed");
	if (SPI_processed != 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("session has ended"),
				 errhint("Log in again.")));
	SPI_finish();
}

/* A top-level member of the claims, or NULL. */
static JsonbValue *
es_claim(Jsonb *claims, const char *name)
{
	return getKeyJsonValueFromContainer(&claims->root, name, strlen(name), NULL);
}

/* Whether v is a JSON string equal to s (byte for byte). */
static bool
es_claim_is_string(JsonbValue *v, const char *s)
{
	size_t		len = strlen(s);

	return v != NULL && v->type == jbvString && (size_t) v->val.string.len == len &&
		memcmp(v->val.string.val, s, len) == 0;
}

/* Parses a JSON string in the canonical lower-case 8-4-4-4-12 form; false for anything else. */
static bool
es_parse_lower_uuid(JsonbValue *v, pg_uuid_t *out)
{
	const char *s;
	int			byte = 0;

	if (v == NULL || v->type != jbvString || v->val.string.len != 36)
		return false;
	s = v->val.string.val;
	for (int i = 0; i < 36; i++)
	{
		char		c = s[i];
		int			nibble;

		if (i == 8 || i == 13 || i == 18 || i == 23)
		{
			if (c != '-')
				return false;
			continue;
		}
		if (c >= '0' && c <= '9')
			nibble = c - '0';
		else if (c >= 'a' && c <= 'f')
			nibble = c - 'a' + 10;
		else
			return false;
		if (byte % 2 == 0)
			out->data[byte / 2] = (unsigned char) (nibble << 4);
		else
			out->data[byte / 2] |= (unsigned char) nibble;
		byte++;
	}
	return true;
}

/* numeric_cmp for two Numerics. */
static int
es_numeric_cmp(Numeric a, Numeric b)
{
	return DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(a), NumericGetDatum(b)));
}
