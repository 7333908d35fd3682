/*
 * event_mask.c
 *		_mask_event_data: an event's data with personal data and secrets
 *		replaced by "[masked]", for the audit log and webhooks.
 *
 * Masked: the value (whole, even an object or array) of every member whose
 * name contains mail, token, seal, hash, passw, secret, phone, signature,
 * address or credential, or ends with key (case-insensitive); and every
 * string that contains an @ (an address), looks like a crypt hash ($id$...),
 * or is a run of 32 or more base64/base64url characters that is not a uuid
 * (tokens, sealed boxes, digests). Everything else is kept, ids included.
 * A result over ES_MASK_MAX_BYTES becomes {"truncated": true}. Written in C
 * because the dispatcher calls it for every consumed event.
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"

#define ES_MASK_MAX_BYTES	16384
#define ES_MASKED			"[masked]"

PG_FUNCTION_INFO_V1(eventshop_mask_event_data);

static const char *const es_secret_key_parts[] = {
	"mail", "token", "seal", "hash", "passw", "secret", "phone", "signature", "address", "credential"
};

static bool es_contains_ci(const char *s, int len, const char *needle);
static bool es_secret_key(const char *key, int len);
static bool es_secret_string(const char *s, int len);
static bool es_is_uuid(const char *s, int len);
static void es_push_masked(JsonbParseState **state, JsonbIteratorToken token);

/* Whether s (len bytes) contains needle (lower-case ASCII), ignoring case. */
static bool
es_contains_ci(const char *s, int len, const char *needle)
{
	int			n = strlen(needle);

	for (int i = 0; i + n <= len; i++)
		if (pg_strncasecmp(s + i, needle, n) == 0)
			return true;
	return false;
}

/* Whether a member name suggests personal data or a secret. */
static bool
es_secret_key(const char *key, int len)
{
	for (int i = 0; i < (int) lengthof(es_secret_key_parts); i++)
		if (es_contains_ci(key, len, es_secret_key_parts[i]))
			return true;
	return len >= 3 && pg_strncasecmp(key + len - 3, "key", 3) == 0;
}

/* Whether s is a canonical uuid (8-4-4-4-12 hexadecimal digits). */
static bool
es_is_uuid(const char *s, int len)
{
	if (len != 36)
		return false;
	for (int i = 0; i < len; i++)
	{
		bool		dash = i == 8 || i == 13 || i == 18 || i == 23;

		if (dash ? s[i] != '-' : !isxdigit((unsigned char) s[i]))
			return false;
	}
	return true;
}

/* Whether a string value looks like an address, a crypt hash, a token or a sealed box. */
static bool
es_secret_string(const char *s, int len)
{
	bool		tokenish = len >= 32;

	if (memchr(s, '@', len) != NULL)
		return true;
	if (len >= 3 && s[0] == '$')
	{
		int			i = 1;

		while (i < len && ((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'z')))
			i++;
		if (i > 1 && i < len && s[i] == '$')
			return true;
	}
	for (int i = 0; tokenish && i < len; i++)
		tokenish = isalnum((unsigned char) s[i]) || s[i] == '_' || s[i] == '-' ||
			s[i] == '+' || s[i] == '/' || s[i] == '=';
	return tokenish && !es_is_uuid(s, len);
}

/* Pushes the string "[masked]" as a member value or array element. */
static void
es_push_masked(JsonbParseState **state, JsonbIteratorToken token)
{
	JsonbValue	masked;

	masked.type = jbvString;
	masked.val.string.val = ES_MASKED;
	masked.val.string.len = strlen(ES_MASKED);
	(void) pushJsonbValue(state, token, &masked);
}

/* _mask_event_data(data jsonb) -> the same document with secrets masked. */
Datum
eventshop_mask_event_data(PG_FUNCTION_ARGS)
{
	Jsonb	   *in = PG_GETARG_JSONB_P(0);
	JsonbIterator *it = JsonbIteratorInit(&in->root);
	JsonbParseState *state = NULL;
	JsonbValue	v;
	JsonbValue *result = NULL;
	JsonbIteratorToken token;
	bool		mask_value = false;
	Jsonb	   *out;

	while ((token = JsonbIteratorNext(&it, &v, false)) != WJB_DONE)
	{
		switch (token)
		{
			case WJB_KEY:
				mask_value = es_secret_key(v.val.string.val, v.val.string.len);
				result = pushJsonbValue(&state, token, &v);
				break;
			case WJB_BEGIN_OBJECT:
			case WJB_BEGIN_ARRAY:
				if (mask_value)
				{
					/* a secret-named member holding a container: skip it whole */
					int			depth = 1;

					while (depth > 0)
					{
						token = JsonbIteratorNext(&it, &v, false);
						if (token == WJB_BEGIN_OBJECT || token == WJB_BEGIN_ARRAY)
							depth++;
						else if (token == WJB_END_OBJECT || token == WJB_END_ARRAY)
							depth--;
					}
					es_push_masked(&state, WJB_VALUE);
					mask_value = false;
				}
				else
					result = pushJsonbValue(&state, token, token == WJB_BEGIN_ARRAY ? &v : NULL);
				break;
			case WJB_END_OBJECT:
			case WJB_END_ARRAY:
				result = pushJsonbValue(&state, token, NULL);
				break;
			case WJB_VALUE:
			case WJB_ELEM:
				if (mask_value || (v.type == jbvString &&
								   es_secret_string(v.val.string.val, v.val.string.len)))
					es_push_masked(&state, token);
				else
					result = pushJsonbValue(&state, token, &v);
				mask_value = false;
				break;
			default:
				break;
		}
	}
	out = JsonbValueToJsonb(result);
	if (VARSIZE(out) > ES_MASK_MAX_BYTES)
		PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in, CStringGetDatum("{\"truncated\": true}")));
	PG_RETURN_JSONB_P(out);
}
