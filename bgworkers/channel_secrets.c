/*
 * channel_secrets.c
 *		Reads the channel secrets from their files. Each file holds one
 *		secret on its first line (a trailing line end is dropped). They are
 *		read when a sender worker starts and when it reloads its settings
 *		(SIGHUP), so rotating a secret is: write the file, pg_reload_conf().
 *		Old values are wiped; contents never reach a log or an error text.
 */
#include "postgres.h"

#include "storage/fd.h"

#include "config.h"
#include "channel_secrets.h"

static EsChannelSecrets secrets;

static void secrets_read(EsSecret *secret, const char *path, const char *setting);

/* Rereads all four files. */
void
es_secrets_load(void)
{
	secrets_read(&secrets.smtp_password, es_smtp_password_file, "eventshop.smtp_password_file");
	secrets_read(&secrets.webhook_secret, es_webhook_secret_file, "eventshop.webhook_secret_file");
	secrets_read(&secrets.sms_token, es_sms_token_file, "eventshop.sms_token_file");
	secrets_read(&secrets.push_token, es_push_token_file, "eventshop.push_token_file");
}

/* The secrets as last loaded. */
const EsChannelSecrets *
es_secrets(void)
{
	return &secrets;
}

/*
 * Reads the first line of path into secret; an empty setting means no
 * secret. A missing, unreadable or over-long file leaves the secret unusable
 * (ok = false): deliveries needing it fail temporarily until it is fixed.
 */
static void
secrets_read(EsSecret *secret, const char *path, const char *setting)
{
	FILE	   *file;
	char		buffer[ES_SECRET_SIZE + 2];
	size_t		length;

	explicit_bzero(secret, sizeof(*secret));
	secret->ok = true;
	if (path == NULL || path[0] == '\0')
		return;

	file = AllocateFile(path, "r");
	if (file == NULL)
	{
		secret->ok = false;
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("could not open the file named by %s: %m", setting)));
		return;
	}
	length = fread(buffer, 1, sizeof(buffer) - 1, file);
	FreeFile(file);
	buffer[length] = '\0';
	length = strcspn(buffer, "\r\n");
	if (length >= ES_SECRET_SIZE)
	{
		secret->ok = false;
		ereport(WARNING,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the file named by %s must hold one line of at most %d bytes",
						setting, ES_SECRET_SIZE - 1)));
	}
	else
	{
		memcpy(secret->value, buffer, length);
		secret->length = length;
	}
	explicit_bzero(buffer, sizeof(buffer));
}
