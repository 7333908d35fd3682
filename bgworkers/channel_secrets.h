/*
 * channel_secrets.h
 *		The secrets of the delivery channels (SMTP password, webhook signing
 *		secret, SMS and push bearer tokens), read from the files their
 *		settings name when a sender worker starts and at every reload.
 */
#ifndef EVENTSHOP_CHANNEL_SECRETS_H
#define EVENTSHOP_CHANNEL_SECRETS_H

#define ES_SECRET_SIZE	1024

/* One secret: ok is false when its file is set but could not be read. */
typedef struct EsSecret
{
	bool		ok;
	size_t		length;			/* 0: no file configured (or an empty one) */
	char		value[ES_SECRET_SIZE];
} EsSecret;

typedef struct EsChannelSecrets
{
	EsSecret	smtp_password;
	EsSecret	webhook_secret;
	EsSecret	sms_token;
	EsSecret	push_token;
} EsChannelSecrets;

/* (Re)reads every secret file; logs (without contents) the files that cannot be read. */
extern void es_secrets_load(void);

/* The secrets as last loaded. */
extern const EsChannelSecrets *es_secrets(void);

#endif							/* EVENTSHOP_CHANNEL_SECRETS_H */
