/*
 * smtp_sender.c
 *		The e-mail channel: prepares a libcurl easy handle that sends one
 *		notification over SMTP, and judges the server's verdict.
 *
 * The RFC 5322 message is built here (Date, From, To, Subject encoded per
 * RFC 2047 when it is not plain ASCII, Message-ID from the notification id,
 * a UTF-8 text/plain body in 7bit or quoted-printable, or, when the
 * notification has an HTML part, multipart/alternative with both parts in
 * quoted-printable, CRLF line ends); libcurl speaks SMTP, does STARTTLS as
 * eventshop.smtp_tls says (smtps:// is implicit TLS), authenticates when
 * eventshop.smtp_username is set (then STARTTLS is mandatory), and
 * dot-stuffs the body. The sender's transfer engine runs many such handles
 * at once on one libcurl multi handle, whose connection cache keeps SMTP
 * sessions open between messages.
 *
 * The callbacks only copy bytes; they never call into Postgres. Header
 * injection is refused before anything is sent, and no response text ever
 * holds the SMTP password (the debug callback looks at server lines only).
 */
#include "postgres.h"

#include <time.h>

#include "common/base64.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"

#include "channel_secrets.h"
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

static bool smtp_valid_address(const char *address);
static char *smtp_build_message(const EsDelivery *delivery);
static void smtp_append_part(StringInfo buf, const char *content_type, const char *body, bool force_qp);
static void smtp_append_date(StringInfo buf);
static void smtp_append_subject(StringInfo buf, const char *subject);
static bool smtp_body_is_7bit(const char *body);
static void smtp_append_body(StringInfo buf, const char *body, bool quoted_printable);
static void smtp_append_qp_line(StringInfo buf, const char *line, size_t length);
static int	smtp_debug(CURL *handle, curl_infotype type, char *data, size_t size, void *userdata);

/*
 * Validates the notification, builds the message and sets up the handle
 * (freshly reset by the caller). Returns false, with the outcome set, when
 * the notification cannot be sent as it is.
 */
bool
es_smtp_prepare(EsDelivery *delivery, CURL *easy)
{
	const EsSecret *password = &es_secrets()->smtp_password;
	bool		authenticate = es_smtp_username != NULL && es_smtp_username[0] != '\0';
	char	   *rcpt_to;

	/* a bad sender or an unreadable password is a configuration problem: retry once fixed */
	if (!smtp_valid_address(es_smtp_from))
	{
		es_delivery_set(delivery, ES_OUTCOME_TEMPORARY, "configuration",
						"eventshop.smtp_from is not a valid e-mail address");
		return false;
	}
	if (authenticate && !password->ok)
	{
		es_delivery_set(delivery, ES_OUTCOME_TEMPORARY, "configuration",
						"could not read eventshop.smtp_password_file");
		return false;
	}
	if (!smtp_valid_address(delivery->recipient))
	{
		es_delivery_set(delivery, ES_OUTCOME_PERMANENT, "invalid_recipient", "invalid recipient address");
		return false;
	}
	if (strpbrk(delivery->subject, "\r\n") != NULL)
	{
		es_delivery_set(delivery, ES_OUTCOME_PERMANENT, "invalid_message", "subject contains a line break");
		return false;
	}

	delivery->payload = smtp_build_message(delivery);
	delivery->payload_length = strlen(delivery->payload);
	rcpt_to = psprintf("<%s>", delivery->recipient);
	delivery->list = curl_slist_append(NULL, rcpt_to);
	pfree(rcpt_to);
	if (delivery->list == NULL)
	{
		es_delivery_set(delivery, ES_OUTCOME_TEMPORARY, "resources", "out of memory in libcurl");
		return false;
	}

	curl_easy_setopt(easy, CURLOPT_URL, es_smtp_url);
	curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "smtp,smtps");
	curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, (long) es_smtp_timeout_ms);
	curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS, (long) es_smtp_timeout_ms);
	es_delivery_set_tls(easy);
	if (strncmp(es_smtp_url, "smtp://", 7) == 0)
	{
		/* credentials never travel in clear: STARTTLS becomes mandatory */
		long		use_ssl = CURLUSESSL_NONE;

		if (authenticate || es_smtp_tls == ES_SMTP_TLS_REQUIRED)
			use_ssl = CURLUSESSL_ALL;
		else if (es_smtp_tls == ES_SMTP_TLS_OPPORTUNISTIC)
			use_ssl = CURLUSESSL_TRY;
		curl_easy_setopt(easy, CURLOPT_USE_SSL, use_ssl);
	}
	if (authenticate)
	{
		curl_easy_setopt(easy, CURLOPT_USERNAME, es_smtp_username);
		/* libcurl copies the string */
		curl_easy_setopt(easy, CURLOPT_PASSWORD, password->value);
	}
	curl_easy_setopt(easy, CURLOPT_MAIL_FROM, psprintf("<%s>", es_smtp_from));
	curl_easy_setopt(easy, CURLOPT_MAIL_RCPT, delivery->list);
	curl_easy_setopt(easy, CURLOPT_UPLOAD, 1L);
	curl_easy_setopt(easy, CURLOPT_INFILESIZE_LARGE, (curl_off_t) delivery->payload_length);
	curl_easy_setopt(easy, CURLOPT_READFUNCTION, es_delivery_read_payload);
	curl_easy_setopt(easy, CURLOPT_READDATA, delivery);
	/* the debug callback only looks at server replies: to keep the last one */
	curl_easy_setopt(easy, CURLOPT_VERBOSE, 1L);
	curl_easy_setopt(easy, CURLOPT_DEBUGFUNCTION, smtp_debug);
	curl_easy_setopt(easy, CURLOPT_DEBUGDATA, delivery);
	return true;
}

/*
 * Judges a finished transfer: accepted is sent; a 5xx reply is permanent,
 * except authentication failures (an administrator can fix those); 4xx
 * replies, timeouts and connection errors are temporary. A failure quotes
 * the refusal, not the QUIT reply or a 334 challenge.
 */
void
es_smtp_complete(EsDelivery *delivery, CURL *easy, CURLcode rc)
{
	long		code = 0;
	bool		auth_problem;

	curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &code);
	if (rc == CURLE_OK)
	{
		es_delivery_set(delivery, ES_OUTCOME_SENT, NULL, "%s",
						delivery->last_reply[0] ? delivery->last_reply : "250 accepted");
		return;
	}
	auth_problem = rc == CURLE_LOGIN_DENIED || code == 530 || code == 534 || code == 535 || code == 538;
	if (code >= 400 && code <= 599 && delivery->error_reply[0] != '\0')
		es_delivery_set(delivery,
						code >= 500 && !auth_problem ? ES_OUTCOME_PERMANENT : ES_OUTCOME_TEMPORARY,
						auth_problem ? "auth" : code >= 500 ? "smtp_5xx" : "smtp_4xx",
						"%s (curl: %s)", delivery->error_reply,
						delivery->errbuf[0] ? delivery->errbuf : curl_easy_strerror(rc));
	else
		es_delivery_set_curl_error(delivery, rc);
}

/*
 * Builds the complete RFC 5322 message with CRLF line ends: a single
 * text/plain part, or multipart/alternative (text, then HTML) when the
 * notification has an HTML part. Parts of a multipart message are always
 * quoted-printable, so the boundary (which contains "=_") cannot occur in
 * them.
 */
static char *
smtp_build_message(const EsDelivery *delivery)
{
	StringInfoData buf;
	const char *domain = strrchr(es_smtp_from, '@') + 1;

	initStringInfo(&buf);
	smtp_append_date(&buf);
	appendStringInfo(&buf, "From: %s\r\n", es_smtp_from);
	appendStringInfo(&buf, "To: %s\r\n", delivery->recipient);
	smtp_append_subject(&buf, delivery->subject);
	appendStringInfo(&buf, "Message-ID: <%s@%s>\r\n", delivery->id, domain);
	appendStringInfoString(&buf, "MIME-Version: 1.0\r\nAuto-Submitted: auto-generated\r\n");
	if (delivery->body_html == NULL)
	{
		smtp_append_part(&buf, "text/plain", delivery->body_text, false);
		return buf.data;
	}
	appendStringInfo(&buf, "Content-Type: multipart/alternative; boundary=\"=_%s\"\r\n\r\n", delivery->id);
	appendStringInfo(&buf, "--=_%s\r\n", delivery->id);
	smtp_append_part(&buf, "text/plain", delivery->body_text, true);
	appendStringInfo(&buf, "--=_%s\r\n", delivery->id);
	smtp_append_part(&buf, "text/html", delivery->body_html, true);
	appendStringInfo(&buf, "--=_%s--\r\n", delivery->id);
	return buf.data;
}

/* Appends one part's headers, a blank line and its body in 7bit or quoted-printable. */
static void
smtp_append_part(StringInfo buf, const char *content_type, const char *body, bool force_qp)
{
	bool		quoted_printable = force_qp || !smtp_body_is_7bit(body);

	appendStringInfo(buf, "Content-Type: %s; charset=UTF-8\r\n", content_type);
	appendStringInfo(buf, "Content-Transfer-Encoding: %s\r\n\r\n",
					 quoted_printable ? "quoted-printable" : "7bit");
	smtp_append_body(buf, body, quoted_printable);
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
 * libcurl debug callback: remembers the last line the server sent and its
 * first error reply (replies arrive as CURLINFO_HEADER_IN); ignores
 * everything we send, which is where credentials would appear.
 */
static int
smtp_debug(CURL *handle, curl_infotype type, char *data, size_t size, void *userdata)
{
	EsDelivery *delivery = (EsDelivery *) userdata;
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
	n = Min(end - start, ES_REPLY_SIZE - 1);
	memcpy(delivery->last_reply, data + start, n);
	delivery->last_reply[n] = '\0';
	if (delivery->error_reply[0] == '\0' && (data[start] == '4' || data[start] == '5'))
		memcpy(delivery->error_reply, delivery->last_reply, n + 1);
	return 0;
}
