/*
 * smtp_sender.h
 *		Sends one plain-text e-mail through eventshop.smtp_url with libcurl,
 *		for the dispatcher worker.
 */
#ifndef EVENTSHOP_SMTP_SENDER_H
#define EVENTSHOP_SMTP_SENDER_H

/* Room for the outcome line stored in eventshop.notification_attempts. */
#define ES_SMTP_RESPONSE_SIZE	256

/* One message; every string is UTF-8 and NUL-terminated. */
typedef struct EsSmtpMessage
{
	const char *id;				/* notification id, used for the Message-ID */
	const char *recipient;		/* bare address: user@example.com */
	const char *subject;
	const char *body;
} EsSmtpMessage;

/* Outcome of one delivery attempt. */
typedef struct EsSmtpResult
{
	bool		ok;				/* the server accepted the message */
	bool		permanent;		/* retrying cannot help (5xx reply, bad input) */
	char		response[ES_SMTP_RESPONSE_SIZE];	/* reply code and text, curl error;
													 * never credentials */
} EsSmtpResult;

/*
 * Initialises libcurl and the worker's one easy handle, and registers its
 * cleanup at process exit. Call once, in the worker, before any send.
 */
extern void es_smtp_init(void);

/*
 * Sends msg with the current eventshop.smtp_* settings. Never raises an
 * ERROR for delivery problems: they are reported in *result.
 */
extern void es_smtp_send(const EsSmtpMessage *msg, EsSmtpResult *result);

#endif							/* EVENTSHOP_SMTP_SENDER_H */
