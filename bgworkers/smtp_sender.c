/*
 * smtp_sender.c
 *		Sends one plain-text e-mail over SMTP with libcurl's easy interface,
 *		for the dispatcher worker.
 *
 * The RFC 5322 message is built here (Date, From, To, Subject encoded per
 * RFC 2047 when it is not plain ASCII, Message-ID from the notification id,
 * a UTF-8 text/plain body in 7bit or quoted-printable, CRLF line ends);
 * libcurl speaks SMTP, upgrades smtp:// connections with STARTTLS when the
 * server offers it, and dot-stuffs the body.
 *
 * libcurl runs synchronously on the worker's thread. Its callbacks only copy
 * bytes and read a signal flag; they never call into Postgres. The one easy
 * handle is created in the worker (never in the postmaster) and freed at
 * process exit; it keeps the SMTP connection open between messages. Header
 * injection is refused before anything is sent, and no result text ever
 * holds the SMTP password.
 */
#include "postgres.h"

#include <time.h>

#include <curl/curl.h>

#include "common/base64.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/ipc.h"

#include "config.h"
#include "smtp_sender.h"

/* RFC 5322 caps lines at 998 octets; keep plain headers well below that. */
#define SMTP_MAX_LINE			998
#define SMTP_MAX_PLAIN_SUBJECT	900
/* RFC 5321 caps a path at 256 octets. */
#define SMTP_MAX_ADDRESS		254
/*
 * Bytes of UTF-8 per RFC 2047 encoded-word: 39 bytes make 52 base64 chars,
 * so "Subject: =?UTF-8?B?...?=" stays within the 76 characters allowed.
 */
#define SMTP_ENCODED_WORD_BYTES	39
/* Quoted-printable lines may hold 76 characters, the soft break's '=' included. */
#define SMTP_QP_LINE			76

/* Room for one server reply line in a result. */
#define SMTP_REPLY_SIZE			160

/* The message being uploaded, and what the server replied. */
typedef struct SmtpTransfer
{
	const char *data;
	size_t		length;
	size_t		sent;
	char		last_reply[SMTP_REPLY_SIZE];	/* last line the server sent */
	char		error_reply[SMTP_REPLY_SIZE];	/* its first 4xx/5xx line */
} SmtpTransfer;

static CURL *smtp_curl = NULL;

static void smtp_cleanup(int code, Datum arg);
static bool smtp_valid_address(const char *address);
static char *smtp_build_message(const EsSmtpMessage *msg);
static void smtp_append_date(StringInfo buf);
static void smtp_append_subject(StringInfo buf, const char *subject);
static bool smtp_body_is_7bit(const char *body);
static void smtp_append_body(StringInfo buf, const char *body, bool quoted_printable);
static void smtp_append_qp_line(StringInfo buf, const char *line, size_t length);
static void smtp_transfer(const char *message, const char *recipient, EsSmtpResult *result);
static bool smtp_read_password(char *password, size_t size);
static void smtp_set_result(EsSmtpResult *result, CURLcode rc, long code,
							const char *reply, const char *errbuf);
static void smtp_fail(EsSmtpResult *result, bool permanent, const char *reason);
static size_t smtp_read(char *buffer, size_t size, size_t nitems, void *userdata);
static int	smtp_debug(CURL *handle, curl_infotype type, char *data, size_t size, void *userdata);
static int	smtp_progress(void *userdata, curl_off_t dltotal, curl_off_t dlnow,
						  curl_off_t ultotal, curl_off_t ulnow);

/* Sets up libcurl in this worker, because handles must not cross a fork. */
void
es_smtp_init(void)
{
	CURLcode	rc;

	if (smtp_curl != NULL)
		return;
	rc = curl_global_init(CURL_GLOBAL_DEFAULT);
	if (rc != CURLE_OK)
		ereport(ERROR,
				(errmsg("could not initialize libcurl: %s", curl_easy_strerror(rc))));
	smtp_curl = curl_easy_init();
	if (smtp_curl == NULL)
	{
		curl_global_cleanup();
		ereport(ERROR,
				(errmsg("could not create a libcurl handle for SMTP")));
	}
	on_proc_exit(smtp_cleanup, (Datum) 0);
}

/* on_proc_exit: closes the SMTP connection and frees libcurl. */
static void
smtp_cleanup(int code, Datum arg)
{
	(void) code;
	(void) arg;
	if (smtp_curl == NULL)
		return;
	curl_easy_cleanup(smtp_curl);
	smtp_curl = NULL;
	curl_global_cleanup();
}

/* Validates the input, builds the message and hands it to the server. */
void
es_smtp_send(const EsSmtpMessage *msg, EsSmtpResult *result)
{
	char	   *message;

	memset(result, 0, sizeof(*result));
	if (smtp_curl == NULL)
		elog(ERROR, "es_smtp_send called before es_smtp_init");

	/* a bad sender is a configuration problem: retry once it is fixed */
	if (!smtp_valid_address(es_smtp_from))
	{
		smtp_fail(result, false, "eventshop.smtp_from is not a valid e-mail address");
		return;
	}
	if (!smtp_valid_address(msg->recipient))
	{
		smtp_fail(result, true, "invalid recipient address");
		return;
	}
	if (strpbrk(msg->subject, "\r\n") != NULL)
	{
		smtp_fail(result, true, "subject contains a line break");
		return;
	}

	message = smtp_build_message(msg);
	smtp_transfer(message, msg->recipient, result);
	pfree(message);
}

/*
 * Accepts a bare addr-spec (local@domain) without controls, spaces or angle
 * brackets, so it can go into MAIL FROM/RCPT TO and a header unchanged.
 */
static bool
smtp_valid_address(const char *address)
{
	const char *at;

	if (address == NULL || address[0] == '\0' || strlen(address) > SMTP_MAX_ADDRESS)
		return false;
	for (const unsigned char *p = (const unsigned char *) address; *p; p++)
		if (*p <= ' ' || *p == 0x7f || *p == '<' || *p == '>' || *p == ',')
			return false;
	at = strrchr(address, '@');
	return at != NULL && at != address && at[1] != '\0';
}

/* Builds the complete RFC 5322 message, headers and body, with CRLF line ends. */
static char *
smtp_build_message(const EsSmtpMessage *msg)
{
	StringInfoData buf;
	bool		quoted_printable = !smtp_body_is_7bit(msg->body);

	initStringInfo(&buf);
	smtp_append_date(&buf);
	appendStringInfo(&buf, "From: %s\r\n", es_smtp_from);
	appendStringInfo(&buf, "To: %s\r\n", msg->recipient);
	smtp_append_subject(&buf, msg->subject);
	appendStringInfo(&buf, "Message-ID: <%s@%s>\r\n", msg->id, strrchr(es_smtp_from, '@') + 1);
	appendStringInfoString(&buf,
						   "MIME-Version: 1.0\r\n"
						   "Content-Type: text/plain; charset=UTF-8\r\n");
	appendStringInfo(&buf, "Content-Transfer-Encoding: %s\r\n",
					 quoted_printable ? "quoted-printable" : "7bit");
	appendStringInfoString(&buf, "Auto-Submitted: auto-generated\r\n\r\n");
	smtp_append_body(&buf, msg->body, quoted_printable);
	return buf.data;
}

/* Appends the Date header in RFC 5322 form, in UTC and locale-independent. */
static void
smtp_append_date(StringInfo buf)
{
	static const char *const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
	static const char *const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
	"Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
	time_t		now = time(NULL);
	struct tm	tm;

	gmtime_r(&now, &tm);
	appendStringInfo(buf, "Date: %s, %02d %s %04d %02d:%02d:%02d +0000\r\n",
					 days[tm.tm_wday], tm.tm_mday, months[tm.tm_mon], tm.tm_year + 1900,
					 tm.tm_hour, tm.tm_min, tm.tm_sec);
}

/*
 * Appends the Subject header: as is when it is short printable ASCII,
 * otherwise as RFC 2047 base64 encoded-words, each cut on a UTF-8 character
 * boundary and folded onto its own line.
 */
static void
smtp_append_subject(StringInfo buf, const char *subject)
{
	const char *p = subject;
	bool		plain = strlen(subject) <= SMTP_MAX_PLAIN_SUBJECT && strstr(subject, "=?") == NULL;

	for (const unsigned char *c = (const unsigned char *) subject; plain && *c; c++)
		plain = *c >= 0x20 && *c < 0x7f;
	if (plain)
	{
		appendStringInfo(buf, "Subject: %s\r\n", subject);
		return;
	}

	appendStringInfoString(buf, "Subject:");
	while (*p)
	{
		int			chunk = 0;
		char		encoded[SMTP_ENCODED_WORD_BYTES * 2];
		int			encoded_len;

		while (p[chunk])
		{
			int			len = pg_utf_mblen((const unsigned char *) p + chunk);

			if (chunk > 0 && chunk + len > SMTP_ENCODED_WORD_BYTES)
				break;
			/* never step over the terminator on a truncated sequence */
			chunk += strnlen(p + chunk, len);
		}
		encoded_len = pg_b64_encode(p, chunk, encoded, sizeof(encoded));
		if (encoded_len < 0)
			elog(ERROR, "could not base64-encode the e-mail subject");
		appendStringInfo(buf, "%s=?UTF-8?B?%.*s?=", p == subject ? " " : "\r\n ",
						 encoded_len, encoded);
		p += chunk;
	}
	appendStringInfoString(buf, "\r\n");
}

/* Whether the body can go as 7bit: ASCII text with no line over 998 octets. */
static bool
smtp_body_is_7bit(const char *body)
{
	size_t		line_length = 0;

	for (const unsigned char *p = (const unsigned char *) body; *p; p++)
	{
		if (*p == '\r' || *p == '\n')
			line_length = 0;
		else if (*p >= 0x7f || (*p < 0x20 && *p != '\t') || ++line_length > SMTP_MAX_LINE)
			return false;
	}
	return true;
}

/* Appends the body line by line, turning LF, CR and CRLF line ends into CRLF. */
static void
smtp_append_body(StringInfo buf, const char *body, bool quoted_printable)
{
	const char *line = body;

	while (*line)
	{
		size_t		length = strcspn(line, "\r\n");

		if (quoted_printable)
			smtp_append_qp_line(buf, line, length);
		else
			appendBinaryStringInfo(buf, line, length);
		appendStringInfoString(buf, "\r\n");
		line += length;
		if (line[0] == '\r' && line[1] == '\n')
			line += 2;
		else if (*line)
			line++;
	}
}

/*
 * Appends one line in quoted-printable (RFC 2045 section 6.7): printable
 * ASCII as is, whitespace as is unless it ends the line, everything else as
 * =XX, with soft line breaks to keep each line within 76 characters.
 */
static void
smtp_append_qp_line(StringInfo buf, const char *line, size_t length)
{
	int			column = 0;

	for (size_t i = 0; i < length; i++)
	{
		unsigned char c = (unsigned char) line[i];
		bool		literal = (c >= 33 && c <= 126 && c != '=') ||
			((c == ' ' || c == '\t') && i + 1 < length);
		int			width = literal ? 1 : 3;

		if (column + width > SMTP_QP_LINE - 1)
		{
			appendStringInfoString(buf, "=\r\n");
			column = 0;
		}
		if (literal)
			appendStringInfoChar(buf, (char) c);
		else
			appendStringInfo(buf, "=%02X", c);
		column += width;
	}
}

/*
 * Reads the SMTP password from eventshop.smtp_password_file (first line);
 * an empty setting means no password. False if the file cannot be read.
 */
static bool
smtp_read_password(char *password, size_t size)
{
	FILE	   *file;
	bool		ok;

	password[0] = '\0';
	if (es_smtp_password_file == NULL || es_smtp_password_file[0] == '\0')
		return true;
	file = fopen(es_smtp_password_file, "r");
	if (file == NULL)
		return false;
	ok = fgets(password, (int) size, file) != NULL || feof(file);
	fclose(file);
	password[strcspn(password, "\r\n")] = '\0';
	return ok;
}

/*
 * Runs one SMTP transaction for the message on the worker's handle. The
 * recipient list is the only libcurl allocation, and it is freed before
 * anything here could raise an ERROR.
 */
static void
smtp_transfer(const char *message, const char *recipient, EsSmtpResult *result)
{
	SmtpTransfer transfer = {.data = message, .length = strlen(message)};
	char		errbuf[CURL_ERROR_SIZE] = "";
	char	   *mail_from = psprintf("<%s>", es_smtp_from);
	char	   *rcpt_to = psprintf("<%s>", recipient);
	struct curl_slist *recipients;
	CURLcode	rc;
	long		code = 0;
	char		password[256] = "";

	if (!smtp_read_password(password, sizeof(password)))
	{
		smtp_fail(result, false, "could not read eventshop.smtp_password_file");
		pfree(mail_from);
		pfree(rcpt_to);
		return;
	}
	curl_easy_reset(smtp_curl);
	recipients = curl_slist_append(NULL, rcpt_to);
	if (recipients == NULL)
	{
		smtp_fail(result, false, "out of memory in libcurl");
		pfree(mail_from);
		pfree(rcpt_to);
		return;
	}
	curl_easy_setopt(smtp_curl, CURLOPT_URL, es_smtp_url);
	curl_easy_setopt(smtp_curl, CURLOPT_PROTOCOLS_STR, "smtp,smtps");
	curl_easy_setopt(smtp_curl, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(smtp_curl, CURLOPT_TIMEOUT_MS, (long) es_smtp_timeout_ms);
	curl_easy_setopt(smtp_curl, CURLOPT_CONNECTTIMEOUT_MS, (long) es_smtp_timeout_ms);
	if (es_smtp_username != NULL && es_smtp_username[0] != '\0')
	{
		/* credentials never travel in clear: STARTTLS becomes mandatory */
		curl_easy_setopt(smtp_curl, CURLOPT_USE_SSL, (long) CURLUSESSL_ALL);
		curl_easy_setopt(smtp_curl, CURLOPT_USERNAME, es_smtp_username);
		curl_easy_setopt(smtp_curl, CURLOPT_PASSWORD, password);
	}
	else if (strncmp(es_smtp_url, "smtp://", 7) == 0)
		curl_easy_setopt(smtp_curl, CURLOPT_USE_SSL, (long) CURLUSESSL_TRY);
	curl_easy_setopt(smtp_curl, CURLOPT_MAIL_FROM, mail_from);
	curl_easy_setopt(smtp_curl, CURLOPT_MAIL_RCPT, recipients);
	curl_easy_setopt(smtp_curl, CURLOPT_UPLOAD, 1L);
	curl_easy_setopt(smtp_curl, CURLOPT_READFUNCTION, smtp_read);
	curl_easy_setopt(smtp_curl, CURLOPT_READDATA, &transfer);
	curl_easy_setopt(smtp_curl, CURLOPT_ERRORBUFFER, errbuf);
	/* the debug callback only sees server replies: to keep the last one */
	curl_easy_setopt(smtp_curl, CURLOPT_VERBOSE, 1L);
	curl_easy_setopt(smtp_curl, CURLOPT_DEBUGFUNCTION, smtp_debug);
	curl_easy_setopt(smtp_curl, CURLOPT_DEBUGDATA, &transfer);
	curl_easy_setopt(smtp_curl, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(smtp_curl, CURLOPT_XFERINFOFUNCTION, smtp_progress);

	rc = curl_easy_perform(smtp_curl);
	curl_easy_getinfo(smtp_curl, CURLINFO_RESPONSE_CODE, &code);
	explicit_bzero(password, sizeof(password));

	/*
	 * No pointer into this frame may outlive it: the QUIT sent when the
	 * kept-alive connection closes at exit would call the debug callback.
	 * Resetting drops every option but keeps the connection.
	 */
	curl_easy_reset(smtp_curl);
	curl_slist_free_all(recipients);

	/* a failure quotes the refusal, not the QUIT reply or a 334 challenge */
	smtp_set_result(result, rc, code,
					rc == CURLE_OK ? transfer.last_reply : transfer.error_reply, errbuf);
	pfree(mail_from);
	pfree(rcpt_to);
}

/*
 * Classifies the outcome: a 5xx reply is permanent, except authentication
 * failures (a configuration problem that an administrator can fix);
 * connection errors, timeouts and 4xx replies are temporary.
 */
static void
smtp_set_result(EsSmtpResult *result, CURLcode rc, long code, const char *reply, const char *errbuf)
{
	bool		auth_problem = rc == CURLE_LOGIN_DENIED ||
		code == 530 || code == 534 || code == 535 || code == 538;
	const char *curl_error = errbuf[0] != '\0' ? errbuf : curl_easy_strerror(rc);

	result->ok = rc == CURLE_OK;
	result->permanent = !result->ok && code >= 500 && code <= 599 && !auth_problem;
	if (result->ok)
		snprintf(result->response, sizeof(result->response), "%s",
				 reply[0] ? reply : "250 accepted");
	else if (reply[0])
		snprintf(result->response, sizeof(result->response), "%s (curl: %s)", reply, curl_error);
	else
		snprintf(result->response, sizeof(result->response), "curl: %s", curl_error);

	/* one line of printable text for the attempts table and the log */
	for (char *p = result->response; *p; p++)
		if ((unsigned char) *p < 0x20 || (unsigned char) *p >= 0x7f)
			*p = ' ';
}

/* Reports a failure decided before (or without) talking to the server. */
static void
smtp_fail(EsSmtpResult *result, bool permanent, const char *reason)
{
	result->ok = false;
	result->permanent = permanent;
	snprintf(result->response, sizeof(result->response), "%s", reason);
}

/* libcurl read callback: hands out the next piece of the message. */
static size_t
smtp_read(char *buffer, size_t size, size_t nitems, void *userdata)
{
	SmtpTransfer *transfer = (SmtpTransfer *) userdata;
	size_t		room = size * nitems;
	size_t		left = transfer->length - transfer->sent;
	size_t		n = left < room ? left : room;

	memcpy(buffer, transfer->data + transfer->sent, n);
	transfer->sent += n;
	return n;
}

/*
 * libcurl debug callback: remembers the last line the server sent and its
 * first error reply (replies arrive as CURLINFO_HEADER_IN); ignores
 * everything we send, which is where credentials would appear.
 */
static int
smtp_debug(CURL *handle, curl_infotype type, char *data, size_t size, void *userdata)
{
	SmtpTransfer *transfer = (SmtpTransfer *) userdata;
	size_t		end = size;
	size_t		start;
	size_t		n;

	(void) handle;
	if (type != CURLINFO_HEADER_IN)
		return 0;
	while (end > 0 && (data[end - 1] == '\r' || data[end - 1] == '\n'))
		end--;
	if (end == 0)
		return 0;
	start = end;
	while (start > 0 && data[start - 1] != '\n')
		start--;
	n = Min(end - start, SMTP_REPLY_SIZE - 1);
	memcpy(transfer->last_reply, data + start, n);
	transfer->last_reply[n] = '\0';
	if (transfer->error_reply[0] == '\0' && (data[start] == '4' || data[start] == '5'))
		memcpy(transfer->error_reply, transfer->last_reply, n + 1);
	return 0;
}

/* libcurl progress callback: aborts the transfer when the worker must exit. */
static int
smtp_progress(void *userdata, curl_off_t dltotal, curl_off_t dlnow,
			  curl_off_t ultotal, curl_off_t ulnow)
{
	(void) userdata;
	(void) dltotal;
	(void) dlnow;
	(void) ultotal;
	(void) ulnow;
	return ProcDiePending ? 1 : 0;
}
