/*
 * delivery.h
 *		One delivery attempt of a notification as the sender workers see it:
 *		the notification's fields, the transfer state its channel module
 *		keeps while libcurl runs it, and the outcome that is recorded.
 */
#ifndef EVENTSHOP_DELIVERY_H
#define EVENTSHOP_DELIVERY_H

#include <curl/curl.h>

#include "datatype/timestamp.h"

/* Room for the outcome line stored in eventshop.notification_attempts. */
#define ES_RESPONSE_SIZE	256
/* Room for one reply line (SMTP) or the start of a response body (HTTP). */
#define ES_REPLY_SIZE		160

typedef enum EsChannel
{
	ES_CHANNEL_EMAIL,
	ES_CHANNEL_SMS,
	ES_CHANNEL_PUSH,
	ES_CHANNEL_WEBHOOK,
	ES_CHANNEL_LOG,
	ES_CHANNEL_UNKNOWN
} EsChannel;

typedef enum EsOutcome
{
	ES_OUTCOME_SENT,			/* the provider accepted it */
	ES_OUTCOME_TEMPORARY,		/* retry later (4xx SMTP, 5xx/408/429 HTTP, network) */
	ES_OUTCOME_PERMANENT,		/* retrying cannot help: dead-letter now */
	ES_OUTCOME_RELEASED			/* not tried this round: give the claim back */
} EsOutcome;

typedef struct EsDelivery
{
	/* the claimed notification, every string UTF-8 and NUL-terminated */
	char	   *id;
	char	   *channel_name;
	char	   *template_name;
	char	   *recipient;
	char	   *subject;
	char	   *body_text;
	char	   *body_html;		/* NULL when the template has no HTML part */
	EsChannel	channel;

	/* the transfer, set up by the channel module's prepare function */
	char	   *payload;		/* what is uploaded or POSTed */
	size_t		payload_length;
	size_t		payload_sent;
	struct curl_slist *list;	/* SMTP recipients or HTTP headers */
	char		last_reply[ES_REPLY_SIZE];	/* last SMTP reply line, HTTP body start */
	char		error_reply[ES_REPLY_SIZE]; /* first SMTP 4xx/5xx reply line */
	char		errbuf[CURL_ERROR_SIZE];

	/* the outcome */
	TimestampTz started_at;
	int			duration_ms;
	EsOutcome	outcome;
	const char *error_class;	/* static string: NULL when sent */
	char		response[ES_RESPONSE_SIZE]; /* reply or error; never credentials */
} EsDelivery;

/* The channel named by eventshop.notifications.channel. */
extern EsChannel es_channel_from_name(const char *name);

/* Sets the outcome with a formatted, single-line, printable response. */
extern void es_delivery_set(EsDelivery *delivery, EsOutcome outcome, const char *error_class,
							const char *fmt,...) pg_attribute_printf(4, 5);

/* Outcome of a transfer that failed in libcurl before any reply could judge it. */
extern void es_delivery_set_curl_error(EsDelivery *delivery, CURLcode rc);

/* TLS options shared by every channel: certificate checks and CA file. */
extern void es_delivery_set_tls(CURL *easy);

/* libcurl read callback (CURLOPT_READDATA = the delivery): the next piece of the payload. */
extern size_t es_delivery_read_payload(char *buffer, size_t size, size_t nitems, void *userdata);

/* Frees what a prepare function attached to the delivery (list, payload). */
extern void es_delivery_release(EsDelivery *delivery);

#endif							/* EVENTSHOP_DELIVERY_H */
