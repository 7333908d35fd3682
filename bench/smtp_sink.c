/*
 * smtp_sink.c: a fast local SMTP server for bench/notify_bench.sh only. It
 * speaks just enough SMTP (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT;
 * no TLS, no auth) to accept every message and throw it away, on one
 * thread with epoll, so the benchmark measures the clients, not the server
 * (aiosmtpd, the tests' server, is the bottleneck at a few hundred
 * messages per second). Both the extension and the libcurl baseline send
 * to this same server.
 *
 *   smtp_sink PORT STATUS_FILE
 *
 * After each accepted message the count and the time of acceptance are
 * kept; on SIGUSR1 (and every 1000 messages) "<count> <unix time with
 * microseconds>" of the last acceptance is written to STATUS_FILE.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define MAX_EVENTS	256
#define BUF_SIZE	65536

typedef struct Conn
{
	int			fd;
	int			in_data;		/* reading message content */
	int			data_start;		/* nothing of the content read yet */
	size_t		len;
	char		buf[BUF_SIZE];
} Conn;

static unsigned long accepted = 0;
static double last_accept = 0;
static const char *status_path;
static volatile sig_atomic_t report_pending = 0;

static double
now(void)
{
	struct timeval tv;

	gettimeofday(&tv, NULL);
	return tv.tv_sec + tv.tv_usec / 1e6;
}

static void
report(void)
{
	char		tmp[4096];
	FILE	   *f;

	snprintf(tmp, sizeof(tmp), "%s.tmp", status_path);
	f = fopen(tmp, "w");
	if (f == NULL)
		return;
	fprintf(f, "%lu %.6f\n", accepted, last_accept);
	fclose(f);
	rename(tmp, status_path);
}

static void
on_usr1(int sig)
{
	(void) sig;
	report_pending = 1;
}

static void
say(Conn *c, const char *reply)
{
	size_t		n = strlen(reply);

	/* replies are tiny: a blocking-free send of a few bytes either fits or the peer is gone */
	if (send(c->fd, reply, n, MSG_NOSIGNAL) != (ssize_t) n)
		shutdown(c->fd, SHUT_RDWR);
}

/* Counts a message whose content ended, and says so. */
static void
accept_message(Conn *c)
{
	c->in_data = 0;
	accepted++;
	last_accept = now();
	if (accepted % 1000 == 0)
		report();
	say(c, "250 2.0.0 Ok: queued\r\n");
}

/* Handles every complete line (or the end of DATA) in the buffer; returns -1 to close. */
static int
process(Conn *c)
{
	size_t		pos = 0;

	for (;;)
	{
		char	   *start = c->buf + pos;
		size_t		left = c->len - pos;

		if (c->in_data)
		{
			char	   *end;

			/* an empty message is just ".\r\n" right after the DATA line */
			if (c->data_start)
			{
				if (left < 3)
					break;
				c->data_start = 0;
				if (memcmp(start, ".\r\n", 3) == 0)
				{
					pos += 3;
					accept_message(c);
					continue;
				}
			}
			end = memmem(start, left, "\r\n.\r\n", 5);
			if (end == NULL)
			{
				/* keep the last 4 bytes, which may begin the terminator */
				if (left > 4)
					pos += left - 4;
				break;
			}
			pos = (end + 5) - c->buf;
			accept_message(c);
			continue;
		}
		{
			char	   *eol = memmem(start, left, "\r\n", 2);

			if (eol == NULL)
				break;
			pos = (eol + 2) - c->buf;
			if (strncasecmp(start, "EHLO", 4) == 0)
				say(c, "250-smtp-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10485760\r\n");
			else if (strncasecmp(start, "HELO", 4) == 0)
				say(c, "250 smtp-sink\r\n");
			else if (strncasecmp(start, "MAIL", 4) == 0 || strncasecmp(start, "RCPT", 4) == 0 ||
					 strncasecmp(start, "RSET", 4) == 0 || strncasecmp(start, "NOOP", 4) == 0)
				say(c, "250 2.0.0 Ok\r\n");
			else if (strncasecmp(start, "DATA", 4) == 0)
			{
				say(c, "354 End data with <CR><LF>.<CR><LF>\r\n");
				c->in_data = 1;
				c->data_start = 1;
			}
			else if (strncasecmp(start, "QUIT", 4) == 0)
			{
				say(c, "221 2.0.0 Bye\r\n");
				return -1;
			}
			else
				say(c, "502 5.5.2 Command not recognized\r\n");
		}
	}
	memmove(c->buf, c->buf + pos, c->len - pos);
	c->len -= pos;
	return 0;
}

int
main(int argc, char **argv)
{
	int			listener;
	int			ep;
	int			one = 1;
	struct sockaddr_in addr;
	struct epoll_event ev;
	struct epoll_event events[MAX_EVENTS];

	if (argc != 3)
	{
		fprintf(stderr, "usage: %s PORT STATUS_FILE\n", argv[0]);
		return 2;
	}
	status_path = argv[2];
	signal(SIGUSR1, on_usr1);
	signal(SIGPIPE, SIG_IGN);

	listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	memset(&addr, 0, sizeof(addr));
	addr.sin_family = AF_INET;
	addr.sin_port = htons((unsigned short) atoi(argv[1]));
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(listener, (struct sockaddr *) &addr, sizeof(addr)) != 0 || listen(listener, 1024) != 0)
	{
		perror("smtp_sink: bind/listen");
		return 1;
	}
	ep = epoll_create1(0);
	ev.events = EPOLLIN;
	ev.data.ptr = NULL;
	epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev);
	report();

	for (;;)
	{
		int			n = epoll_wait(ep, events, MAX_EVENTS, 1000);

		if (report_pending)
		{
			report_pending = 0;
			report();
		}
		for (int i = 0; i < n; i++)
		{
			Conn	   *c = events[i].data.ptr;

			if (c == NULL)
			{
				int			fd;

				while ((fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0)
				{
					Conn	   *nc = calloc(1, sizeof(Conn));

					setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
					nc->fd = fd;
					ev.events = EPOLLIN;
					ev.data.ptr = nc;
					epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
					say(nc, "220 smtp-sink ESMTP\r\n");
				}
				continue;
			}
			for (;;)
			{
				ssize_t		r = recv(c->fd, c->buf + c->len, BUF_SIZE - c->len, 0);

				if (r > 0)
				{
					c->len += r;
					if (process(c) < 0 || c->len == BUF_SIZE)
						r = 0;
					else
						continue;
				}
				if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
					break;
				epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
				close(c->fd);
				free(c);
				break;
			}
		}
	}
}
