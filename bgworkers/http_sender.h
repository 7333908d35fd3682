/*
 * http_sender.h
 *		The HTTP channels: webhook (signed JSON POST to eventshop.webhook_url),
 *		SMS and push (JSON POST to their provider endpoints).
 */
#ifndef EVENTSHOP_HTTP_SENDER_H
#define EVENTSHOP_HTTP_SENDER_H

#include "delivery.h"

/* Header names of the webhook signature scheme (see README, "Webhook signatures"). */
#define ES_WEBHOOK_TIMESTAMP_HEADER	"X-Eventshop-Timestamp"
#define ES_WEBHOOK_SIGNATURE_HEADER	"X-Eventshop-Signature"

/*
 * Sets up easy (freshly reset) to POST the notification; returns false, with
 * the outcome set, when the channel is not configured or the notification
 * cannot be sent as it is.
 */
extern bool es_http_prepare(EsDelivery *delivery, CURL *easy);

/* Sets the outcome from the HTTP status: 2xx sent, 408/429/5xx temporary, other 4xx permanent. */
extern void es_http_complete(EsDelivery *delivery, CURL *easy, CURLcode rc);

#endif							/* EVENTSHOP_HTTP_SENDER_H */
