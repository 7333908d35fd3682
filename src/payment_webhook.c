/*
 * payment_webhook.c
 *		verify_webhook_signature: checks a payment provider's webhook
 *		signature the way Stripe signs its callbacks, so that a gateway can
 *		accept a payment result only from the provider.
 *
 * Scheme (Stripe's "Stripe-Signature" header):
 *
 *   header  = "t=<unix seconds>,v1=<hex>[,v1=<hex>...][,v0=...]"
 *   v1      = hex(HMAC-SHA256(secret, "<t>.<payload>"))
 *
 * The signature is valid when one of the v1 values equals the HMAC computed
 * here (several v1 values appear while the provider rolls its secret) and t
 * is within tolerance seconds of the current time, in either direction, so
 * a captured callback cannot be replayed later. Other schemes (v0 and
 * unknown keys) are ignored. Every v1 value is compared, in constant time,
 * so the time taken does not depend on where a forged signature differs.
 * Anything malformed is simply "not valid": the function answers false
 * rather than raising, and says nothing about which part failed.
 */
#include "postgres.h"

#include <time.h>

#include "fmgr.h"

#include "crypto_util.h"

/* Upper bound on v1 entries considered, so a huge header costs little. */
#define ES_WEBHOOK_MAX_SIGNATURES	8
/* Longest accepted tolerance: a day. */
#define ES_WEBHOOK_MAX_TOLERANCE	86400

PG_FUNCTION_INFO_V1(eventshop_verify_webhook_signature);

static bool es_parse_timestamp(const char *s, size_t len, int64 *out);

/* Parses a non-negative decimal Unix time of at most 12 digits, because anything longer is not a time. */
static bool
es_parse_timestamp(const char *s, size_t len, int64 *out)
{
	int64		v = 0;
	size_t		i;

	if (len == 0 || len > 12)
		return false;
	for (i = 0; i < len; i++)
	{
		if (s[i] < '0' || s[i] > '9')
			return false;
		v = v * 10 + (s[i] - '0');
	}
	*out = v;
	return true;
}

/*
 * verify_webhook_signature(payload text, signature_header text, secret text,
 *                          tolerance_seconds integer, now_epoch bigint) -> boolean
 * Returns whether the header carries a valid, fresh v1 signature of payload.
 */
Datum
eventshop_verify_webhook_signature(PG_FUNCTION_ARGS)
{
	text	   *payload;
	text	   *header;
	text	   *secret;
	int32		tolerance = 300;
	int64		now;
	const char *h;
	size_t		hlen;
	size_t		pos = 0;
	int64		ts = 0;
	const char *ts_str = NULL;
	size_t		ts_len = 0;
	int			n_ts = 0;
	uint8		candidates[ES_WEBHOOK_MAX_SIGNATURES][ES_SHA256_LEN];
	int			n_sig = 0;
	size_t		plen;
	size_t		mlen;
	char	   *message;
	uint8		mac[ES_SHA256_LEN];
	bool		match = false;
	int			i;

	if (!PG_ARGISNULL(3))
	{
		tolerance = PG_GETARG_INT32(3);
		if (tolerance < 0 || tolerance > ES_WEBHOOK_MAX_TOLERANCE)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("tolerance_seconds must be between 0 and %d", ES_WEBHOOK_MAX_TOLERANCE)));
	}
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		PG_RETURN_BOOL(false);
	payload = PG_GETARG_TEXT_PP(0);
	header = PG_GETARG_TEXT_PP(1);
	secret = PG_GETARG_TEXT_PP(2);
	now = PG_ARGISNULL(4) ? (int64) time(NULL) : PG_GETARG_INT64(4);

	if (VARSIZE_ANY_EXHDR(secret) == 0)
		PG_RETURN_BOOL(false);

	/* Split the header into comma-separated key=value items. */
	h = VARDATA_ANY(header);
	hlen = VARSIZE_ANY_EXHDR(header);
	while (pos <= hlen)
	{
		size_t		start = pos;
		size_t		end;
		size_t		eq;

		while (pos < hlen && h[pos] != ',')
			pos++;
		end = pos;
		pos++;					/* past the comma (or the end) */

		/* trim blanks around the item */
		while (start < end && (h[start] == ' ' || h[start] == '\t'))
			start++;
		while (end > start && (h[end - 1] == ' ' || h[end - 1] == '\t'))
			end--;
		for (eq = start; eq < end && h[eq] != '='; eq++)
			;
		if (eq == end)
			continue;			/* not key=value: ignore, as Stripe does */

		if (eq - start == 1 && h[start] == 't')
		{
			n_ts++;
			ts_str = h + eq + 1;
			ts_len = end - eq - 1;
		}
		else if (eq - start == 2 && h[start] == 'v' && h[start + 1] == '1')
		{
			if (end - eq - 1 == 2 * ES_SHA256_LEN && n_sig < ES_WEBHOOK_MAX_SIGNATURES &&
				es_hex_decode(h + eq + 1, 2 * ES_SHA256_LEN, candidates[n_sig]))
				n_sig++;
		}
	}

	/* Exactly one timestamp, at least one well-formed v1, and fresh. */
	if (n_ts != 1 || n_sig == 0 || !es_parse_timestamp(ts_str, ts_len, &ts))
		PG_RETURN_BOOL(false);
	if (ts < now - tolerance || ts > now + tolerance)
		PG_RETURN_BOOL(false);

	/* HMAC-SHA256 over "<t>.<payload>", t exactly as the header spelled it. */
	plen = VARSIZE_ANY_EXHDR(payload);
	mlen = ts_len + 1 + plen;
	message = palloc(mlen);
	memcpy(message, ts_str, ts_len);
	message[ts_len] = '.';
	memcpy(message + ts_len + 1, VARDATA_ANY(payload), plen);
	es_hmac_sha256((const uint8 *) VARDATA_ANY(secret), VARSIZE_ANY_EXHDR(secret),
				   message, mlen, mac);
	pfree(message);

	for (i = 0; i < n_sig; i++)
		match |= es_ct_equal(mac, candidates[i], ES_SHA256_LEN);
	explicit_bzero(mac, sizeof(mac));

	PG_RETURN_BOOL(match);
}
