/*
 * smtp_blast.c: the baseline of bench/notify_bench.sh: a plain libcurl
 * client sending COUNT e-mails to an SMTP server as fast as it can, with
 * CONCURRENCY transfers in flight on one libcurl multi handle (connections
 * reused, as the sender workers do). Each message is built like a
 * notification (Date, From, To, Subject, Message-ID, MIME headers, a text
 * body of about the same size). Prints "<count> <seconds> <messages/s>".
 *
 *   smtp_blast URL COUNT CONCURRENCY
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include <curl/curl.h>

typedef struct Transfer
{
	char		message[2048];
	size_t		length;
	size_t		sent;
	struct curl_slist *rcpt;
} Transfer;

static double
now(void)
{
	struct timeval tv;

	gettimeofday(&tv, NULL);
	return tv.tv_sec + tv.tv_usec / 1e6;
}

static size_t
read_cb(char *buffer, size_t size, size_t nitems, void *userdata)
{
	Transfer   *t = userdata;
	size_t		n = t->length - t->sent;

	if (n > size * nitems)
		n = size * nitems;
	memcpy(buffer, t->message + t->sent, n);
	t->sent += n;
	return n;
}

static void
start(CURLM *multi, CURL *easy, Transfer *t, const char *url, long i)
{
	char		rcpt[128];

	snprintf(rcpt, sizeof(rcpt), "<baseline%ld@example.com>", i);
	t->length = (size_t) snprintf(t->message, sizeof(t->message),
								  "Date: Sat, 21 Nov 2026 12:00:00 +0000\r\n"
								  "From: eventshop@example.com\r\n"
								  "To: baseline%ld@example.com\r\n"
								  "Subject: Welcome to eventshop, Baseline %ld\r\n"
								  "Message-ID: <baseline-%ld@example.com>\r\n"
								  "MIME-Version: 1.0\r\n"
								  "Content-Type: text/plain; charset=UTF-8\r\n"
								  "Content-Transfer-Encoding: 7bit\r\n"
								  "Auto-Submitted: auto-generated\r\n\r\n"
								  "Hello Baseline %ld,\r\n\r\nyour eventshop account for baseline%ld@example.com is ready.\r\n\r\n"
								  "The eventshop team\r\n", i, i, i, i, i);
	t->sent = 0;
	t->rcpt = curl_slist_append(NULL, rcpt);
	curl_easy_reset(easy);
	curl_easy_setopt(easy, CURLOPT_URL, url);
	curl_easy_setopt(easy, CURLOPT_MAIL_FROM, "<eventshop@example.com>");
	curl_easy_setopt(easy, CURLOPT_MAIL_RCPT, t->rcpt);
	curl_easy_setopt(easy, CURLOPT_UPLOAD, 1L);
	curl_easy_setopt(easy, CURLOPT_INFILESIZE_LARGE, (curl_off_t) t->length);
	curl_easy_setopt(easy, CURLOPT_READFUNCTION, read_cb);
	curl_easy_setopt(easy, CURLOPT_READDATA, t);
	curl_easy_setopt(easy, CURLOPT_PRIVATE, t);
	curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, 10000L);
	curl_multi_add_handle(multi, easy);
}

int
main(int argc, char **argv)
{
	const char *url;
	long		count;
	int			concurrency;
	long		next = 0;
	long		done = 0;
	long		failed = 0;
	int			running;
	CURLM	   *multi;
	CURL	  **easy;
	Transfer   *transfers;
	double		t0;
	double		elapsed;

	if (argc != 4)
	{
		fprintf(stderr, "usage: %s URL COUNT CONCURRENCY\n", argv[0]);
		return 2;
	}
	url = argv[1];
	count = atol(argv[2]);
	concurrency = atoi(argv[3]);
	curl_global_init(CURL_GLOBAL_DEFAULT);
	multi = curl_multi_init();
	curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long) concurrency);
	curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, (long) concurrency);
	easy = calloc(concurrency, sizeof(CURL *));
	transfers = calloc(concurrency, sizeof(Transfer));

	t0 = now();
	for (int i = 0; i < concurrency && next < count; i++)
	{
		easy[i] = curl_easy_init();
		start(multi, easy[i], &transfers[i], url, next++);
	}
	while (done < count)
	{
		CURLMsg    *msg;
		int			queued;

		curl_multi_perform(multi, &running);
		while ((msg = curl_multi_info_read(multi, &queued)) != NULL)
		{
			Transfer   *t;
			CURL	   *e = msg->easy_handle;

			if (msg->msg != CURLMSG_DONE)
				continue;
			curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **) &t);
			if (msg->data.result != CURLE_OK)
				failed++;
			done++;
			curl_multi_remove_handle(multi, e);
			curl_slist_free_all(t->rcpt);
			if (next < count)
				start(multi, e, t, url, next++);
		}
		if (done < count)
			curl_multi_poll(multi, NULL, 0, 100, NULL);
	}
	elapsed = now() - t0;
	printf("%ld %.3f %.1f\n", count - failed, elapsed, (count - failed) / elapsed);
	for (int i = 0; i < concurrency; i++)
		if (easy[i])
			curl_easy_cleanup(easy[i]);
	curl_multi_cleanup(multi);
	curl_global_cleanup();
	return failed > 0 ? 1 : 0;
}
