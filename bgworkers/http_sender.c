/*
 * http_sender.c
 *		The HTTP channels of the sender workers: a libcurl easy handle that
 *		POSTs one notification as JSON, and the verdict on the reply.
 *
 *	- webhook: the notification's body_text is the JSON document to POST
 *	  (its recipient column holds the literal 'webhook'); the request is
 *	  signed: X-Eventshop-Timestamp is the Unix time in seconds and
 *	  X-Eventshop-Signature is "v1=" followed by the lower-case hex
 *	  HMAC-SHA256, keyed with the secret in eventshop.webhook_secret_file,
 *	  of the timestamp, a '.', and the exact body bytes. Receivers recompute
 *	  it, compare in constant time and refuse stale timestamps (replays).
 *	- sms: {"id", "to": recipient, "text": body_text} to eventshop.sms_url.
 *	- push: {"id", "to": recipient, "title": subject, "body": body_text} to
 *	  eventshop.push_url.
 * Every request carries Idempotency-Key: <notification id>, so a provider
 * can drop the duplicate of a retried request that did arrive; SMS and push
 * carry "Authorization: Bearer <token>" when a token file is set.
 *
 * 2xx is sent; 408, 429 and 5xx are temporary; other 4xx are permanent;
 * anything else (a redirect: the URL is probably wrong) is temporary, so
 * fixing the setting gets the notification out.
 */
#include "postgres.h"

#include <time.h>

#include "lib/stringinfo.h"
#include "utils/json.h"

#include "channel_secrets.h"
#include "config.h"
#include "crypto_util.h"
#include "http_sender.h"

static bool http_channel_settings(EsDelivery *delivery, const char **url, const EsSecret **token);
static char *http_build_body(const EsDelivery *delivery);
static bool http_add_header(EsDelivery *delivery, const char *fmt,...) pg_attribute_printf(2, 3);
static bool http_sign(EsDelivery *delivery, const EsSecret *secret);
static size_t http_write(char *data, size_t size, size_t nmemb, void *userdata);

/* Sets up the POST: URL, body, headers (signature, token), timeouts and TLS. */
bool
es_http_prepare(EsDelivery *delivery, CURL *easy)
{
	const char *url;
	const EsSecret *token;

	if (!http_channel_settings(delivery, &url, &token))
		return false;

	delivery->payload = http_build_body(delivery);
	delivery->payload_length = strlen(delivery->payload);
	if (!http_add_header(delivery, "Content-Type: application/json") ||
		!http_add_header(delivery, "Expect:") ||
		!http_add_header(delivery, "Idempotency-Key: %s", delivery->id) ||
		(token != NULL && token->length > 0 &&
		 !http_add_header(delivery, "Authorization: Bearer %s", token->value)) ||
		(delivery->channel == ES_CHANNEL_WEBHOOK &&
		 !http_sign(delivery, &es_secrets()->webhook_secret)))
	{
		es_delivery_set(delivery, ES_OUTCOME_TEMPORARY, "resources", "out of memory in libcurl");
		return false;
	}

	curl_easy_setopt(easy, CURLOPT_URL, url);
	curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, (long) es_http_timeout_ms);
	curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS, (long) es_http_timeout_ms);
	es_delivery_set_tls(easy);
	curl_easy_setopt(easy, CURLOPT_POST, 1L);
	curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) delivery->payload_length);
	curl_easy_setopt(easy, CURLOPT_READFUNCTION, es_delivery_read_payload);
	curl_easy_setopt(easy, CURLOPT_READDATA, delivery);
	curl_easy_setopt(easy, CURLOPT_HTTPHEADER, delivery->list);
	curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, http_write);
	curl_easy_setopt(easy, CURLOPT_WRITEDATA, delivery);
	curl_easy_setopt(easy, CURLOPT_USERAGENT, "eventshop");
	return true;
}

/* Judges the reply by its status code; the response quotes the start of its body. */
void
es_http_complete(EsDelivery *delivery, CURL *easy, CURLcode rc)
{
	long		status = 0;
	EsOutcome	outcome;
	const char *error_class;

	if (rc != CURLE_OK)
	{
		es_delivery_set_curl_error(delivery, rc);
		return;
	}
	curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
	if (status >= 200 && status <= 299)
	{
		outcome = ES_OUTCOME_SENT;
		error_class = NULL;
	}
	else if (status == 408 || status == 429 || (status >= 500 && status <= 599))
	{
		outcome = ES_OUTCOME_TEMPORARY;
		error_class = status >= 500 ? "http_5xx" : "http_throttled";
	}
	else if (status >= 400 && status <= 499)
	{
		outcome = ES_OUTCOME_PERMANENT;
		error_class = "http_4xx";
	}
	else
	{
		outcome = ES_OUTCOME_TEMPORARY;
		error_class = "http_unexpected";
	}
	es_delivery_set(delivery, outcome, error_class, "HTTP %ld%s%s", status,
					delivery->last_reply[0] ? ": " : "", delivery->last_reply);
}

/*
 * The channel's URL and token. A channel without a URL, or whose secret
 * file cannot be read, fails temporarily: it is a configuration problem.
 */
static bool
http_channel_settings(EsDelivery *delivery, const char **url, const EsSecret **token)
{
	const char *setting;
	const EsChannelSecrets *secrets = es_secrets();

	switch (delivery->channel)
	{
		case ES_CHANNEL_WEBHOOK:
			*url = es_webhook_url;
			*token = NULL;
			setting = "eventshop.webhook_url";
			if (secrets->webhook_secret.length == 0)
			{
				es_delivery_set(delivery, ES_OUTCOME_TEMPORARY, "configuration",
								secrets->webhook_secret.ok
								? "eventshop.webhook_secret_file is not set"
								: "could not read eventshop.webhook_secret_file");
				return false;
			}
			break;
		case ES_CHANNEL_SMS:
			*url = es_sms_url;
			*token = &secrets->sms_token;
			setting = "eventshop.sms_url";
			break;
		case ES_CHANNEL_PUSH:
			*url = es_push_url;
			*token = &secrets->push_token;
			setting = "eventshop.push_url";
			break;
		default:
			elog(ERROR, "es_http_prepare called for channel \"%s\"", delivery->channel_name);
	}
	if (*url == NULL || (*url)[0] == '\0')
	{
		es_delivery_set(delivery, ES_OUTCOME_TEMPORARY, "configuration", "%s is not set", setting);
		return false;
	}
	if (*token != NULL && !(*token)->ok)
	{
		es_delivery_set(delivery, ES_OUTCOME_TEMPORARY, "configuration",
						"could not read the token file of the %s channel", delivery->channel_name);
		return false;
	}
	return true;
}

/* The request body: the webhook's own JSON, or the provider JSON for SMS and push. */
static char *
http_build_body(const EsDelivery *delivery)
{
	StringInfoData buf;

	if (delivery->channel == ES_CHANNEL_WEBHOOK)
		return pstrdup(delivery->body_text);

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"id\":");
	escape_json(&buf, delivery->id);
	appendStringInfoString(&buf, ",\"to\":");
	escape_json(&buf, delivery->recipient);
	if (delivery->channel == ES_CHANNEL_PUSH)
	{
		appendStringInfoString(&buf, ",\"title\":");
		escape_json(&buf, delivery->subject);
		appendStringInfoString(&buf, ",\"body\":");
	}
	else
		appendStringInfoString(&buf, ",\"text\":");
	escape_json(&buf, delivery->body_text);
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

/* Appends one request header; false when libcurl is out of memory. */
static bool
http_add_header(EsDelivery *delivery, const char *fmt,...)
{
	char		header[ES_SECRET_SIZE + 64];
	va_list		args;
	struct curl_slist *list;

	va_start(args, fmt);
	vsnprintf(header, sizeof(header), fmt, args);
	va_end(args);
	list = curl_slist_append(delivery->list, header);
	explicit_bzero(header, sizeof(header));
	if (list == NULL)
		return false;
	delivery->list = list;
	return true;
}

/* Adds the timestamp and signature headers: v1=hex(HMAC-SHA256(secret, timestamp "." body)). */
static bool
http_sign(EsDelivery *delivery, const EsSecret *secret)
{
	char		timestamp[32];
	StringInfoData signed_text;
	uint8		mac[ES_SHA256_LEN];
	char		hex[ES_SHA256_LEN * 2 + 1];

	snprintf(timestamp, sizeof(timestamp), "%lld", (long long) time(NULL));
	initStringInfo(&signed_text);
	appendStringInfo(&signed_text, "%s.", timestamp);
	appendBinaryStringInfo(&signed_text, delivery->payload, (int) delivery->payload_length);
	es_hmac_sha256((const uint8 *) secret->value, secret->length,
				   signed_text.data, signed_text.len, mac);
	pfree(signed_text.data);
	for (int i = 0; i < ES_SHA256_LEN; i++)
		snprintf(hex + 2 * i, 3, "%02x", mac[i]);
	return http_add_header(delivery, ES_WEBHOOK_TIMESTAMP_HEADER ": %s", timestamp) &&
		http_add_header(delivery, ES_WEBHOOK_SIGNATURE_HEADER ": v1=%s", hex);
}

/* libcurl write callback: keeps the start of the response body for the attempts table. */
static size_t
http_write(char *data, size_t size, size_t nmemb, void *userdata)
{
	EsDelivery *delivery = (EsDelivery *) userdata;
	size_t		have = strlen(delivery->last_reply);
	size_t		n = Min(size * nmemb, ES_REPLY_SIZE - 1 - have);

	memcpy(delivery->last_reply + have, data, n);
	delivery->last_reply[have + n] = '\0';
	return size * nmemb;
}
