/*
 * smtp_sender.h
 *		The e-mail channel: one notification as an SMTP transfer on a libcurl
 *		easy handle, sent through eventshop.smtp_url.
 */
#ifndef EVENTSHOP_SMTP_SENDER_H
#define EVENTSHOP_SMTP_SENDER_H

#include "delivery.h"

/*
 * Sets up easy (freshly reset) to send the notification; returns false, with
 * the outcome set, when it cannot be sent as it is. What it allocates hangs
 * off the delivery (es_delivery_release frees it).
 */
extern bool es_smtp_prepare(EsDelivery *delivery, CURL *easy);

/* Sets the outcome of a finished transfer from libcurl's result and the server's replies. */
extern void es_smtp_complete(EsDelivery *delivery, CURL *easy, CURLcode rc);

#endif							/* EVENTSHOP_SMTP_SENDER_H */
