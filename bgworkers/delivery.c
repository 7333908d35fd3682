/*
 * delivery.c
 *		What the channel modules share about a delivery attempt: channel
 *		names, recording the outcome as one printable line, the class of a
 *		libcurl error, and the TLS options every channel applies.
 */
#include "postgres.h"

#include "config.h"
#include "delivery.h"

/* Maps the channel column to its enum; unknown names are refused by the sender. */
EsChannel
es_channel_from_name(const char *name)
{
	if (strcmp(name, "email") == 0)
		return ES_CHANNEL_EMAIL;
	if (strcmp(name, "sms") == 0)
		return ES_CHANNEL_SMS;
	if (strcmp(name, "push") == 0)
		return ES_CHANNEL_PUSH;
	if (strcmp(name, "webhook") == 0)
		return ES_CHANNEL_WEBHOOK;
	if (strcmp(name, "log") == 0)
		return ES_CHANNEL_LOG;
	return ES_CHANNEL_UNKNOWN;
}

/* Sets outcome, class and response; the response becomes one line of printable ASCII. */
void
es_delivery_set(EsDelivery *delivery, EsOutcome outcome, const char *error_class, const char *fmt,...)
{
	va_list		args;

	delivery->outcome = outcome;
	delivery->error_class = outcome == ES_OUTCOME_SENT ? NULL : error_class;
	va_start(args, fmt);
	vsnprintf(delivery->response, sizeof(delivery->response), fmt, args);
	va_end(args);
	for (char *p = delivery->response; *p; p++)
		if ((unsigned char) *p < 0x20 || (unsigned char) *p >= 0x7f)
			*p = ' ';
}

/*
 * A libcurl failure without a usable reply: timeouts, refused or broken
 * connections, TLS and DNS problems are all temporary; the class says which.
 */
void
es_delivery_set_curl_error(EsDelivery *delivery, CURLcode rc)
{
	const char *message = delivery->errbuf[0] != '\0' ? delivery->errbuf : curl_easy_strerror(rc);
	const char *error_class;

	switch (rc)
	{
		case CURLE_OPERATION_TIMEDOUT:
			error_class = "timeout";
			break;
		case CURLE_SSL_CONNECT_ERROR:
		case CURLE_PEER_FAILED_VERIFICATION:
		case CURLE_SSL_CACERT_BADFILE:
		case CURLE_USE_SSL_FAILED:
			error_class = "tls";
			break;
		case CURLE_LOGIN_DENIED:
			error_class = "auth";
			break;
		default:
			error_class = "connection";
			break;
	}
	es_delivery_set(delivery, ES_OUTCOME_TEMPORARY, error_class, "curl: %s", message);
}

/* Certificate and host checks (eventshop.tls_verify) and the CA bundle (eventshop.tls_ca_file). */
void
es_delivery_set_tls(CURL *easy)
{
	curl_easy_setopt(easy, CURLOPT_SSL_VERIFYPEER, es_tls_verify ? 1L : 0L);
	curl_easy_setopt(easy, CURLOPT_SSL_VERIFYHOST, es_tls_verify ? 2L : 0L);
	if (es_tls_ca_file != NULL && es_tls_ca_file[0] != '\0')
		curl_easy_setopt(easy, CURLOPT_CAINFO, es_tls_ca_file);
}

/* Frees the libcurl list and the payload of a finished (or never started) transfer. */
void
es_delivery_release(EsDelivery *delivery)
{
	if (delivery->list != NULL)
		curl_slist_free_all(delivery->list);
	delivery->list = NULL;
	if (delivery->payload != NULL)
		pfree(delivery->payload);
	delivery->payload = NULL;
}

/* libcurl read callback (CURLOPT_READDATA = the delivery): the next piece of the payload. */
size_t
es_delivery_read_payload(char *buffer, size_t size, size_t nitems, void *userdata)
{
	EsDelivery *delivery = (EsDelivery *) userdata;
	size_t		room = size * nitems;
	size_t		left = delivery->payload_length - delivery->payload_sent;
	size_t		n = left < room ? left : room;

	memcpy(buffer, delivery->payload + delivery->payload_sent, n);
	delivery->payload_sent += n;
	return n;
}
