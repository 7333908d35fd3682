/*
 * jwt.c
 *		_jwt_sign and _jwt_verify: compact JWS (RFC 7515/7519) with RS256,
 *		ES256 and EdDSA, signed and verified with cached OpenSSL keys.
 *
 * libjwt 1.10 is deliberately not used here: it accepts alg "none" with a
 * NULL key, matches alg case-insensitively, lets an HS256 token verify
 * under an RSA public key PEM, takes the last of duplicate header keys,
 * overflows the stack on a 16 MB segment and parses PEM on every call.
 * Verification here is a fixed sequence of checks, each failure raising
 * SQLSTATE 28000 "invalid token" with a non-secret detail:
 *
 *   1. at most ES_JWT_MAX_LEN bytes, only [A-Za-z0-9_-] and exactly two
 *      '.', no empty segment;
 *   2. every segment strict unpadded canonical base64url;
 *   3. header: UTF-8, a JSON object without duplicate keys, members only
 *      alg, kid and typ; alg exactly RS256, ES256 or EdDSA (case-sensitive,
 *      so "none", "HS256", "rs256" all fail); kid present and well-formed;
 *      typ, if present, exactly "JWT";
 *   4. the kid's row: active, or retired less than access_token_ttl ago
 *      (standby, revoked, unknown all fail), read on every call;
 *   5. header alg == the key's alg (one algorithm per key);
 *   6. signature of the exact length for the algorithm (ECDSA: JOSE r||s,
 *      64 bytes; DER is refused) and valid under that key (a token whose
 *      signature this backend verified before is remembered:
 *      signature_cache.c, with the header and claims of those bytes;
 *      es_jwt_verify_deferred then leaves 4 and 5 to its caller, which reads
 *      the key's row in a statement it runs anyway);
 *   7. payload: UTF-8, a JSON object without duplicate keys at any level,
 *      nesting at most ES_JWT_MAX_DEPTH, numbers within jsonb's range.
 *
 * Claims (exp, aud, ...) are checked by the caller, eventshop.authenticate.
 */
#include "postgres.h"

#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#include "common/jsonapi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "config.h"
#include "crypto_util.h"
#include "jwt.h"
#include "key_store.h"
#include "signature_cache.h"

#define ES_MAX_SIG_LEN		512		/* RSA-4096 */
#define ES_MAX_NUMBER_LEN	64
#define ES_MAX_EXPONENT		300

PG_FUNCTION_INFO_V1(eventshop_jwt_sign);
PG_FUNCTION_INFO_V1(eventshop_jwt_verify);

/* Parser state while a header or payload is turned into a JsonbValue. */
typedef struct EsJsonState
{
	JsonbParseState *parse;
	JsonbValue *res;
	int			depth;
	const char *part;			/* "header" or "payload", for details */
} EsJsonState;

static JsonbValue *es_parse_object(char *json, int len, const char *part);
static void es_json_object_start(void *state);
static void es_json_object_end(void *state);
static void es_json_array_start(void *state);
static void es_json_array_end(void *state);
static void es_json_field_start(void *state, char *fname, bool isnull);
static void es_json_scalar(void *state, char *token, JsonTokenType tokentype);
static int	es_key_cmp(const void *a, const void *b);
static void es_check_number(const char *token, const char *part);
static void es_json_compact(StringInfo out, Jsonb *jb);
static void es_json_string(StringInfo out, const char *s, int len);
static bool es_verify_signature(EsKey *key, const char *input, size_t inputlen,
								const uint8 *sig, size_t siglen);
static Jsonb *es_jwt_verify_internal(const char *tok, size_t len, EsJwtKeyCheck *check);

/* Raises the one error every verification failure produces: 28000 "invalid token". */
void
es_invalid_token(const char *fmt,...)
{
	char		detail[256];
	va_list		args;

	va_start(args, fmt);
	vsnprintf(detail, sizeof(detail), fmt, args);
	va_end(args);
	ERR_clear_error();
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
			 errmsg("invalid token"),
			 errdetail_internal("%s", detail)));
}

/* Opens an object; rejects nesting past ES_JWT_MAX_DEPTH before recursing further. */
static void
es_json_object_start(void *state)
{
	EsJsonState *st = (EsJsonState *) state;

	if (++st->depth > ES_JWT_MAX_DEPTH)
		es_invalid_token("The %s nests deeper than %d levels.", st->part, ES_JWT_MAX_DEPTH);
	st->res = pushJsonbValue(&st->parse, WJB_BEGIN_OBJECT, NULL);
}

/* Closes an object after checking it has no duplicate keys (jsonb would silently keep the last). */
static void
es_json_object_end(void *state)
{
	EsJsonState *st = (EsJsonState *) state;
	JsonbValue *obj = &st->parse->contVal;
	int			n = obj->val.object.nPairs;

	if (n > 1)
	{
		JsonbValue **keys = palloc(n * sizeof(JsonbValue *));
		int			i;

		for (i = 0; i < n; i++)
			keys[i] = &obj->val.object.pairs[i].key;
		qsort(keys, n, sizeof(JsonbValue *), es_key_cmp);
		for (i = 1; i < n; i++)
			if (es_key_cmp(&keys[i - 1], &keys[i]) == 0)
				es_invalid_token("The %s has a duplicate key.", st->part);
		pfree(keys);
	}
	st->depth--;
	st->res = pushJsonbValue(&st->parse, WJB_END_OBJECT, NULL);
}

/* Opens an array; a top-level array is not a header or payload. */
static void
es_json_array_start(void *state)
{
	EsJsonState *st = (EsJsonState *) state;

	if (st->parse == NULL)
		es_invalid_token("The %s is not a JSON object.", st->part);
	if (++st->depth > ES_JWT_MAX_DEPTH)
		es_invalid_token("The %s nests deeper than %d levels.", st->part, ES_JWT_MAX_DEPTH);
	st->res = pushJsonbValue(&st->parse, WJB_BEGIN_ARRAY, NULL);
}

/* Closes an array. */
static void
es_json_array_end(void *state)
{
	EsJsonState *st = (EsJsonState *) state;

	st->depth--;
	st->res = pushJsonbValue(&st->parse, WJB_END_ARRAY, NULL);
}

/* Adds an object key. */
static void
es_json_field_start(void *state, char *fname, bool isnull)
{
	EsJsonState *st = (EsJsonState *) state;
	JsonbValue	v;

	(void) isnull;
	v.type = jbvString;
	v.val.string.len = strlen(fname);
	v.val.string.val = fname;
	st->res = pushJsonbValue(&st->parse, WJB_KEY, &v);
}

/* Adds a scalar; a top-level scalar is not a header or payload. */
static void
es_json_scalar(void *state, char *token, JsonTokenType tokentype)
{
	EsJsonState *st = (EsJsonState *) state;
	JsonbValue	v;

	if (st->parse == NULL)
		es_invalid_token("The %s is not a JSON object.", st->part);
	switch (tokentype)
	{
		case JSON_TOKEN_STRING:
			v.type = jbvString;
			v.val.string.len = strlen(token);
			v.val.string.val = token;
			break;
		case JSON_TOKEN_NUMBER:
			es_check_number(token, st->part);
			v.type = jbvNumeric;
			v.val.numeric = DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(token),
																ObjectIdGetDatum(InvalidOid),
																Int32GetDatum(-1)));
			break;
		case JSON_TOKEN_TRUE:
		case JSON_TOKEN_FALSE:
			v.type = jbvBool;
			v.val.boolean = tokentype == JSON_TOKEN_TRUE;
			break;
		case JSON_TOKEN_NULL:
			v.type = jbvNull;
			break;
		default:
			es_invalid_token("The %s is not valid JSON.", st->part);
	}
	st->res = pushJsonbValue(&st->parse,
							 st->parse->contVal.type == jbvArray ? WJB_ELEM : WJB_VALUE, &v);
}

/*
 * Bounds a JSON number so that numeric_in cannot fail on it (its exponent
 * limit is 1000): a token that could only raise a non-28000 error is
 * refused here as an invalid token instead.
 */
static void
es_check_number(const char *token, const char *part)
{
	const char *e = strpbrk(token, "eE");

	if (strlen(token) > ES_MAX_NUMBER_LEN)
		es_invalid_token("The %s has a number longer than %d characters.", part, ES_MAX_NUMBER_LEN);
	if (e != NULL)
	{
		const char *p = e + 1;
		long		exponent = 0;

		if (*p == '+' || *p == '-')
			p++;
		for (; *p >= '0' && *p <= '9'; p++)
			if ((exponent = exponent * 10 + (*p - '0')) > ES_MAX_EXPONENT)
				es_invalid_token("The %s has a number out of range.", part);
	}
}

/* Orders jsonb keys by length, then bytes, for duplicate detection. */
static int
es_key_cmp(const void *a, const void *b)
{
	const JsonbValue *ka = *(const JsonbValue *const *) a;
	const JsonbValue *kb = *(const JsonbValue *const *) b;

	if (ka->val.string.len != kb->val.string.len)
		return ka->val.string.len < kb->val.string.len ? -1 : 1;
	return memcmp(ka->val.string.val, kb->val.string.val, ka->val.string.len);
}

/*
 * Parses decoded header or payload bytes into a JsonbValue object in one
 * pass, enforcing UTF-8, an object at the top, no duplicate keys and the
 * nesting and number bounds. json must be NUL-terminated at len.
 */
static JsonbValue *
es_parse_object(char *json, int len, const char *part)
{
	EsJsonState st;
	JsonSemAction sem;
	JsonLexContext *lex;
	int			i;

	for (i = 0; i < len; i++)
		if ((unsigned char) json[i] >= 0x80)
			break;
	if (i < len)
	{
		if (!pg_verify_mbstr(PG_UTF8, json, len, true))
			es_invalid_token("The %s is not valid UTF-8.", part);
		if (GetDatabaseEncoding() != PG_UTF8)
			es_invalid_token("The %s has non-ASCII characters, which need a UTF8 database.", part);
	}
	memset(&st, 0, sizeof(st));
	st.part = part;
	memset(&sem, 0, sizeof(sem));
	sem.semstate = &st;
	sem.object_start = es_json_object_start;
	sem.object_end = es_json_object_end;
	sem.array_start = es_json_array_start;
	sem.array_end = es_json_array_end;
	sem.object_field_start = es_json_field_start;
	sem.scalar = es_json_scalar;
	lex = makeJsonLexContextCstringLen(json, len, GetDatabaseEncoding(), true);
	if (pg_parse_json(lex, &sem) != JSON_SUCCESS)
		es_invalid_token("The %s is not valid JSON.", part);
	if (st.res == NULL || st.res->type != jbvObject)
		es_invalid_token("The %s is not a JSON object.", part);
	return st.res;
}

/* Checks a signature with the key's reusable context; OpenSSL errors count as invalid. */
static bool
es_verify_signature(EsKey *key, const char *input, size_t inputlen,
					const uint8 *sig, size_t siglen)
{
	uint8		digest[ES_SHA256_LEN];
	int			rc;

	if (key->alg == ES_JWT_EDDSA)
	{
		if (siglen != 64)
			es_invalid_token("An EdDSA signature is 64 bytes.");
		rc = EVP_DigestVerify(key->verify_mdctx, sig, siglen, (const uint8 *) input, inputlen);
	}
	else if (key->alg == ES_JWT_RS256)
	{
		if (siglen != (size_t) EVP_PKEY_get_size(key->pub))
			es_invalid_token("The RS256 signature does not have the key's length.");
		es_sha256(input, inputlen, digest);
		rc = EVP_PKEY_verify(key->verify_ctx, sig, siglen, digest, sizeof(digest));
	}
	else
	{
		/* JOSE r||s (RFC 7518 3.4) to the DER form OpenSSL verifies */
		ECDSA_SIG  *esig;
		BIGNUM	   *r;
		BIGNUM	   *s;
		uint8		der[80];
		uint8	   *p = der;
		int			derlen = -1;

		if (siglen != 64)
			es_invalid_token("An ES256 signature is 64 bytes (r||s), not DER.");
		esig = ECDSA_SIG_new();
		r = BN_bin2bn(sig, 32, NULL);
		s = BN_bin2bn(sig + 32, 32, NULL);
		if (esig != NULL && r != NULL && s != NULL && ECDSA_SIG_set0(esig, r, s) == 1)
		{
			r = s = NULL;		/* owned by esig now */
			derlen = i2d_ECDSA_SIG(esig, NULL);
			if (derlen > 0 && derlen <= (int) sizeof(der))
				derlen = i2d_ECDSA_SIG(esig, &p);
			else
				derlen = -1;
		}
		BN_free(r);
		BN_free(s);
		ECDSA_SIG_free(esig);
		if (derlen <= 0)
			es_openssl_error("converting an ECDSA signature");
		es_sha256(input, inputlen, digest);
		rc = EVP_PKEY_verify(key->verify_ctx, der, derlen, digest, sizeof(digest));
	}
	if (rc != 1)
		ERR_clear_error();
	return rc == 1;
}

/* _jwt_verify(token) -> claims: see the file header for every check, in order. */
Datum
eventshop_jwt_verify(PG_FUNCTION_ARGS)
{
	text	   *token;

	/* 1. presence (not STRICT: a NULL token must not become a NULL "success") */
	if (PG_ARGISNULL(0))
		es_invalid_token("The token is missing.");
	token = PG_GETARG_TEXT_PP(0);
	PG_RETURN_JSONB_P(es_jwt_verify(VARDATA_ANY(token), VARSIZE_ANY_EXHDR(token)));
}

/* Verifies a compact JWS (checks 1-7 of the file header) and returns its claims object. */
Jsonb *
es_jwt_verify(const char *tok, size_t len)
{
	return es_jwt_verify_internal(tok, len, NULL);
}

/*
 * es_jwt_verify, except that when this backend verified the token's
 * signature before, checks 4 and 5 are left pending in *check (see jwt.h):
 * the caller reads the key's row together with what else it needs.
 */
Jsonb *
es_jwt_verify_deferred(const char *tok, size_t len, EsJwtKeyCheck *check)
{
	return es_jwt_verify_internal(tok, len, check);
}

/* Checks 4 (the key's state) and 5 (its algorithm) for a token whose kid and header alg are in check. */
void
es_jwt_check_key(EsJwtKeyCheck *check, EsKeyStatus status, int key_alg)
{
	switch (status)
	{
		case ES_KEY_ACTIVE:
		case ES_KEY_RETIRED:
			break;
		case ES_KEY_UNKNOWN:
			es_invalid_token("The signing key is unknown.");
		case ES_KEY_STANDBY:
			es_invalid_token("The signing key is not active yet.");
		case ES_KEY_REVOKED:
			es_invalid_token("The signing key was revoked.");
		case ES_KEY_EXPIRED:
			es_invalid_token("The signing key was retired too long ago.");
	}
	if (check->alg != key_alg)
		es_invalid_token("The algorithm does not match the signing key's.");
	check->pending = false;
}

/* Reads the state of a pending key (es_key_for_verify) and checks it. */
void
es_jwt_check_key_now(EsJwtKeyCheck *check)
{
	EsKeyStatus status;
	int			key_alg;

	if (!check->pending)
		return;
	(void) es_key_for_verify(check->kid, &status, &key_alg);
	es_jwt_check_key(check, status, key_alg);
}

/* Checks 1-7; with check != NULL, 4 and 5 may be left pending (es_jwt_verify_deferred). */
static Jsonb *
es_jwt_verify_internal(const char *tok, size_t len, EsJwtKeyCheck *check)
{
	const char *dot[2] = {NULL, NULL};
	int			ndots = 0;
	size_t		i;
	char		hbuf[ES_JWT_MAX_LEN];
	char		pbuf[ES_JWT_MAX_LEN];
	uint8		sbuf[ES_JWT_MAX_LEN];
	size_t		hlen;
	size_t		plen;
	size_t		slen;
	const char *seg[3];
	size_t		seglen[3];
	JsonbValue *header;
	Jsonb	   *claims;
	const char *alg_name = NULL;
	int			alg_name_len = 0;
	int			alg;
	int			key_alg;
	char		kid[ES_KID_LEN + 1];
	bool		have_kid = false;
	EsKeyStatus status;
	EsKey	   *key;
	uint8		token_digest[ES_SHA256_LEN];
	bool		remembered;
	EsJwtKeyCheck own_check;

	if (check == NULL)
		check = &own_check;

	/* 1. size, charset, shape */
	if (len > ES_JWT_MAX_LEN)
		es_invalid_token("The token is longer than %d bytes.", ES_JWT_MAX_LEN);

	/*
	 * A token this backend verified before: its bytes fix checks 1-3, 6 and
	 * 7, and the outcome is remembered (signature_cache.c). The key's state
	 * (4, 5) is read again, now or by the caller of es_jwt_verify_deferred.
	 */
	es_sha256(tok, len, token_digest);
	remembered = es_signature_cache_lookup(token_digest, check->kid, &check->alg, &claims);
	if (remembered)
	{
		check->pending = true;
		if (check == &own_check)
			es_jwt_check_key_now(check);
		if (claims != NULL)
			return claims;
	}
	for (i = 0; i < len; i++)
	{
		char		c = tok[i];

		if (c == '.')
		{
			if (ndots == 2)
				es_invalid_token("A token has exactly three segments.");
			dot[ndots++] = tok + i;
		}
		else if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
				   (c >= '0' && c <= '9') || c == '-' || c == '_'))
			es_invalid_token("The token has characters outside the base64url alphabet and '.'.");
	}
	if (ndots != 2)
		es_invalid_token("A token has exactly three segments.");
	seg[0] = tok;
	seglen[0] = dot[0] - tok;
	seg[1] = dot[0] + 1;
	seglen[1] = dot[1] - seg[1];
	seg[2] = dot[1] + 1;
	seglen[2] = tok + len - seg[2];
	if (seglen[0] == 0 || seglen[1] == 0 || seglen[2] == 0)
		es_invalid_token("A token segment is empty.");

	/* 2. base64url */
	if (!es_b64url_decode(seg[0], seglen[0], (uint8 *) hbuf, &hlen) ||
		!es_b64url_decode(seg[1], seglen[1], (uint8 *) pbuf, &plen) ||
		!es_b64url_decode(seg[2], seglen[2], sbuf, &slen))
		es_invalid_token("A token segment is not canonical unpadded base64url.");
	hbuf[hlen] = '\0';
	pbuf[plen] = '\0';

	/* 3. header */
	header = es_parse_object(hbuf, (int) hlen, "header");
	for (i = 0; i < (size_t) header->val.object.nPairs; i++)
	{
		JsonbPair  *pair = &header->val.object.pairs[i];
		const char *name = pair->key.val.string.val;
		int			namelen = pair->key.val.string.len;
		JsonbValue *v = &pair->value;

		if (namelen == 3 && memcmp(name, "alg", 3) == 0 && v->type == jbvString)
		{
			alg_name = v->val.string.val;
			alg_name_len = v->val.string.len;
		}
		else if (namelen == 3 && memcmp(name, "kid", 3) == 0 && v->type == jbvString)
		{
			int			j;

			if (v->val.string.len != ES_KID_LEN)
				es_invalid_token("The kid is malformed.");
			for (j = 0; j < ES_KID_LEN; j++)
			{
				char		c = v->val.string.val[j];

				if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
					  (c >= '0' && c <= '9') || c == '-' || c == '_'))
					es_invalid_token("The kid is malformed.");
				kid[j] = c;
			}
			kid[ES_KID_LEN] = '\0';
			have_kid = true;
		}
		else if (namelen == 3 && memcmp(name, "typ", 3) == 0 && v->type == jbvString)
		{
			if (v->val.string.len != 3 || memcmp(v->val.string.val, "JWT", 3) != 0)
				es_invalid_token("The header's typ is not JWT.");
		}
		else
			es_invalid_token("The header may hold only the string members alg, kid and typ.");
	}
	if (alg_name == NULL)
		es_invalid_token("The header has no alg.");
	alg = es_jwt_alg_from_name(alg_name, alg_name_len);
	if (alg < 0)
		es_invalid_token("The algorithm is not one of RS256, ES256 and EdDSA.");
	if (!have_kid)
		es_invalid_token("The header has no kid.");

	/*
	 * 4. the key's current state and 5. its algorithm (es_jwt_check_key),
	 * then 6. the signature over "header.payload" as sent
	 */
	if (!remembered)
	{
		memcpy(check->kid, kid, sizeof(check->kid));
		check->alg = alg;
		check->pending = true;
		key = es_key_for_verify(kid, &status, &key_alg);
		es_jwt_check_key(check, status, key_alg);
		Assert(key != NULL);
		if (!es_verify_signature(key, tok, dot[1] - tok, sbuf, slen))
			es_invalid_token("The signature is not valid.");
	}

	/* 7. payload */
	claims = JsonbValueToJsonb(es_parse_object(pbuf, (int) plen, "payload"));
	if (!remembered)
		es_signature_cache_add(token_digest, kid, alg, claims);
	return claims;
}

/* Appends a JSON string literal, escaping as RFC 8259 requires. */
static void
es_json_string(StringInfo out, const char *s, int len)
{
	static const char hex[] = "0123456789abcdef";
	int			i;

	appendStringInfoCharMacro(out, '"');
	for (i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];

		switch (c)
		{
			case '"':
				appendBinaryStringInfo(out, "\\\"", 2);
				break;
			case '\\':
				appendBinaryStringInfo(out, "\\\\", 2);
				break;
			case '\b':
				appendBinaryStringInfo(out, "\\b", 2);
				break;
			case '\f':
				appendBinaryStringInfo(out, "\\f", 2);
				break;
			case '\n':
				appendBinaryStringInfo(out, "\\n", 2);
				break;
			case '\r':
				appendBinaryStringInfo(out, "\\r", 2);
				break;
			case '\t':
				appendBinaryStringInfo(out, "\\t", 2);
				break;
			default:
				if (c < 0x20)
				{
					char		esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};

					appendBinaryStringInfo(out, esc, 6);
				}
				else
					appendStringInfoCharMacro(out, (char) c);
		}
	}
	appendStringInfoCharMacro(out, '"');
}

/* Serialises jsonb without whitespace, because jsonb's own output adds spaces to every token. */
static void
es_json_compact(StringInfo out, Jsonb *jb)
{
	JsonbIterator *it = JsonbIteratorInit(&jb->root);
	JsonbValue	v;
	JsonbIteratorToken tok;
	bool		first = true;

	while ((tok = JsonbIteratorNext(&it, &v, false)) != WJB_DONE)
	{
		switch (tok)
		{
			case WJB_BEGIN_OBJECT:
			case WJB_BEGIN_ARRAY:
				if (!first)
					appendStringInfoCharMacro(out, ',');
				appendStringInfoCharMacro(out, tok == WJB_BEGIN_OBJECT ? '{' : '[');
				first = true;
				break;
			case WJB_END_OBJECT:
			case WJB_END_ARRAY:
				appendStringInfoCharMacro(out, tok == WJB_END_OBJECT ? '}' : ']');
				first = false;
				break;
			case WJB_KEY:
				if (!first)
					appendStringInfoCharMacro(out, ',');
				es_json_string(out, v.val.string.val, v.val.string.len);
				appendStringInfoCharMacro(out, ':');
				first = true;
				break;
			case WJB_VALUE:
			case WJB_ELEM:
				if (!first)
					appendStringInfoCharMacro(out, ',');
				switch (v.type)
				{
					case jbvNull:
						appendBinaryStringInfo(out, "null", 4);
						break;
					case jbvBool:
						if (v.val.boolean)
							appendBinaryStringInfo(out, "true", 4);
						else
							appendBinaryStringInfo(out, "false", 5);
						break;
					case jbvString:
						es_json_string(out, v.val.string.val, v.val.string.len);
						break;
					case jbvNumeric:
						appendStringInfoString(out,
											   DatumGetCString(DirectFunctionCall1(numeric_out,
																				   NumericGetDatum(v.val.numeric))));
						break;
					default:
						elog(ERROR, "unexpected jsonb value type %d", (int) v.type);
				}
				first = false;
				break;
			case WJB_DONE:
				break;
		}
	}
}

/*
 * _jwt_sign(claims, alg) -> compact JWS signed by the active key of alg
 * (eventshop.jwt_default_alg when NULL), header {"alg","typ":"JWT","kid"}.
 */
Datum
eventshop_jwt_sign(PG_FUNCTION_ARGS)
{
	Jsonb	   *claims;
	int			alg;
	EsKey	   *key;
	StringInfoData payload;
	size_t		inputlen;
	size_t		total;
	text	   *result;
	char	   *p;
	uint8		sig[ES_MAX_SIG_LEN];
	size_t		siglen = sizeof(sig);
	bool		ok;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("claims are required")));
	claims = PG_GETARG_JSONB_P(0);
	if (PG_ARGISNULL(1))
		alg = es_jwt_default_alg;
	else
	{
		text	   *a = PG_GETARG_TEXT_PP(1);

		alg = es_jwt_alg_from_name(VARDATA_ANY(a), VARSIZE_ANY_EXHDR(a));
		if (alg < 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unsupported signing algorithm"),
					 errhint("Use RS256, ES256 or EdDSA (case-sensitive).")));
	}
	if (!JB_ROOT_IS_OBJECT(claims) || JB_ROOT_IS_SCALAR(claims))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("claims must be a JSON object")));

	initStringInfo(&payload);
	es_json_compact(&payload, claims);

	key = es_active_signing_key(alg);
	if (key == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("there is no active %s signing key", es_jwt_alg_name(alg)),
				 errhint("Create and activate one with SELECT eventshop.rotate_signing_keys('%s').",
						 es_jwt_alg_name(alg))));

	inputlen = key->header_b64_len + 1 + ES_B64URL_LEN(payload.len);
	total = inputlen + 1 + ES_B64URL_LEN(key->alg == ES_JWT_RS256 ?
										 (size_t) EVP_PKEY_get_size(key->priv) : 64);
	if (total > ES_JWT_MAX_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("claims are too large for a token"),
				 errdetail("The token would be %zu bytes; at most %d are accepted.", total, ES_JWT_MAX_LEN)));

	result = palloc(VARHDRSZ + total);
	p = VARDATA(result);
	memcpy(p, key->header_b64, key->header_b64_len);
	p += key->header_b64_len;
	*p++ = '.';
	p += es_b64url_encode((const uint8 *) payload.data, payload.len, p);

	if (key->alg == ES_JWT_EDDSA)
		ok = EVP_DigestSign(key->sign_mdctx, sig, &siglen, (const uint8 *) VARDATA(result), inputlen) == 1 &&
			siglen == 64;
	else
	{
		uint8		digest[ES_SHA256_LEN];

		es_sha256(VARDATA(result), inputlen, digest);
		ok = EVP_PKEY_sign(key->sign_ctx, sig, &siglen, digest, sizeof(digest)) == 1;
		if (ok && key->alg == ES_JWT_ES256)
		{
			/* DER to JOSE r||s, each left-padded to 32 bytes */
			const uint8 *q = sig;
			ECDSA_SIG  *esig = d2i_ECDSA_SIG(NULL, &q, (long) siglen);

			ok = esig != NULL &&
				BN_bn2binpad(ECDSA_SIG_get0_r(esig), sig, 32) == 32 &&
				BN_bn2binpad(ECDSA_SIG_get0_s(esig), sig + 32, 32) == 32;
			siglen = 64;
			ECDSA_SIG_free(esig);
		}
	}
	if (!ok)
		es_openssl_error("signing a token");

	*p++ = '.';
	p += es_b64url_encode(sig, siglen, p);
	Assert((size_t) (p - VARDATA(result)) <= total);
	SET_VARSIZE(result, VARHDRSZ + (p - VARDATA(result)));
	PG_RETURN_TEXT_P(result);
}
