/*
 * eventshop-devbroker: a tiny Kafka broker for development, demos and tests.
 *
 * It runs librdkafka's in-process mock cluster, which listens on 127.0.0.1
 * (random ports) and speaks the Kafka protocol to any client (librdkafka,
 * kcat, Java).  The eventshop topics are created up front.  Once ready it
 * prints one line "bootstrap=<host:port,...>" on stdout (and optionally
 * writes the same address to a file), then runs until SIGTERM/SIGINT.
 *
 * Outage simulation for tests: SIGUSR1 takes every mock broker down (open
 * connections are dropped and new ones refused), SIGUSR2 brings them back.
 * The stderr lines "devbroker: brokers down" / "devbroker: brokers up" are
 * written only once every listener really refuses / accepts connections,
 * so tests can wait for them.
 * Slow-network simulation: SIGRTMIN delays every broker response by
 * --slow-rtt-ms (default 100), SIGRTMIN+1 removes the delay again.
 * Topic data lives in this process and survives a down/up cycle, but not a
 * restart.  The mock cluster keeps only the last 5 MB of each partition.
 *
 * Signals are blocked in every thread and served by sigwait() in the main
 * thread, so librdkafka is never called from a signal handler.
 *
 * Plain C11 + POSIX + librdkafka; no PostgreSQL headers.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#define DEFAULT_TOPICS \
	"auth.events,orders.events,payments.events,registrations.events," \
	"invites.events,notifications.events"

#define MAX_BROKERS 16
#define MAX_PARTITIONS 1000
#define MAX_TOPIC_LEN 249

/* How long to wait for listeners to reach the requested up/down state. */
#define STATE_WAIT_MS 5000

/* Parsed command-line options. */
struct options
{
	int			brokers;
	int			partitions;
	const char *bootstrap_file;
	const char *pid_file;
	const char *topics;
	int			slow_rtt_ms;
};

/* Print a "devbroker: ..." line on stderr. */
static void
logmsg(const char *fmt,...) __attribute__((format(printf, 1, 2)));

static void
logmsg(const char *fmt,...)
{
	va_list		ap;
	char		buf[1024];

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	/* one fprintf per line so lines from librdkafka threads do not interleave */
	fprintf(stderr, "devbroker: %s\n", buf);
	fflush(stderr);
}

/* Print usage text to the given stream. */
static void
usage(FILE *out, const char *prog)
{
	fprintf(out,
			"Usage: %s [options]\n"
			"Run a local Kafka-protocol broker (librdkafka mock cluster) on 127.0.0.1.\n"
			"\n"
			"Options:\n"
			"  --brokers N            number of mock brokers (default 1, max %d)\n"
			"  --partitions N         partitions per topic (default 3, max %d)\n"
			"  --topics a,b,c         topics to create up front (default\n"
			"                         %s)\n"
			"  --bootstrap-file PATH  write the bootstrap address to PATH (atomically)\n"
			"  --pid-file PATH        write this process id to PATH\n"
			"  --slow-rtt-ms N        response delay in slow mode (default 100)\n"
			"  --help                 show this help and exit\n"
			"\n"
			"Prints \"bootstrap=<host:port,...>\" on stdout when ready.\n"
			"Signals: SIGTERM/SIGINT stop; SIGUSR1 takes all brokers down;\n"
			"SIGUSR2 brings them back up; SIGRTMIN delays every response by the\n"
			"slow-mode delay, SIGRTMIN+1 removes the delay.\n",
			prog, MAX_BROKERS, MAX_PARTITIONS, DEFAULT_TOPICS);
}

/* Report a command-line error and exit with status 2. */
static void
bad_usage(const char *prog, const char *what, const char *arg)
{
	if (arg)
		fprintf(stderr, "%s: %s: \"%s\"\n", prog, what, arg);
	else
		fprintf(stderr, "%s: %s\n", prog, what);
	fprintf(stderr, "Try \"%s --help\" for more information.\n", prog);
	exit(2);
}

/* Parse a decimal integer in [min, max]; return -1 if invalid. */
static int
parse_int(const char *s, int min, int max)
{
	char	   *end;
	long		v;

	if (s == NULL || *s == '\0')
		return -1;
	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || *end != '\0' || v < min || v > max)
		return -1;
	return (int) v;
}

/* Check a topic name against Kafka's rules (legal chars, length). */
static int
valid_topic(const char *t, size_t len)
{
	size_t		i;

	if (len == 0 || len > MAX_TOPIC_LEN)
		return 0;
	if ((len == 1 && t[0] == '.') || (len == 2 && t[0] == '.' && t[1] == '.'))
		return 0;
	for (i = 0; i < len; i++)
	{
		char		c = t[i];

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			  (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
			return 0;
	}
	return 1;
}

/* Validate every entry of a comma-separated topic list; exit 2 if bad. */
static void
check_topics(const char *prog, const char *list)
{
	const char *p = list;

	for (;;)
	{
		const char *comma = strchr(p, ',');
		size_t		len = comma ? (size_t) (comma - p) : strlen(p);

		if (!valid_topic(p, len))
			bad_usage(prog, "invalid topic list (names use [A-Za-z0-9._-], no empty entries)", list);
		if (!comma)
			break;
		p = comma + 1;
	}
}

/* Parse argv into opts; exits 0 for --help and 2 on errors. */
static void
parse_options(int argc, char **argv, struct options *opts)
{
	static const struct option longopts[] = {
		{"brokers", required_argument, NULL, 'b'},
		{"partitions", required_argument, NULL, 'p'},
		{"bootstrap-file", required_argument, NULL, 'f'},
		{"pid-file", required_argument, NULL, 'P'},
		{"topics", required_argument, NULL, 't'},
		{"slow-rtt-ms", required_argument, NULL, 'r'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0}
	};
	const char *prog = argv[0];
	int			c;

	opts->brokers = 1;
	opts->partitions = 3;
	opts->bootstrap_file = NULL;
	opts->pid_file = NULL;
	opts->topics = DEFAULT_TOPICS;
	opts->slow_rtt_ms = 100;

	opterr = 0;					/* we print our own messages */
	while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1)
	{
		switch (c)
		{
			case 'b':
				opts->brokers = parse_int(optarg, 1, MAX_BROKERS);
				if (opts->brokers < 0)
					bad_usage(prog, "invalid --brokers value", optarg);
				break;
			case 'p':
				opts->partitions = parse_int(optarg, 1, MAX_PARTITIONS);
				if (opts->partitions < 0)
					bad_usage(prog, "invalid --partitions value", optarg);
				break;
			case 'f':
				if (*optarg == '\0')
					bad_usage(prog, "empty --bootstrap-file path", NULL);
				opts->bootstrap_file = optarg;
				break;
			case 'P':
				if (*optarg == '\0')
					bad_usage(prog, "empty --pid-file path", NULL);
				opts->pid_file = optarg;
				break;
			case 't':
				check_topics(prog, optarg);
				opts->topics = optarg;
				break;
			case 'r':
				opts->slow_rtt_ms = parse_int(optarg, 0, 60000);
				if (opts->slow_rtt_ms < 0)
					bad_usage(prog, "--slow-rtt-ms must be 0..60000", optarg);
				break;
			case 'h':
				usage(stdout, prog);
				exit(0);
			case ':':
				bad_usage(prog, "option requires an argument",
						  optind > 0 && optind <= argc ? argv[optind - 1] : NULL);
				break;
			default:
				bad_usage(prog, "unrecognized option",
						  optind > 0 && optind <= argc ? argv[optind - 1] : NULL);
				break;
		}
	}
	if (optind < argc)
		bad_usage(prog, "unexpected argument", argv[optind]);
}

/* Write text to path atomically (path.tmp, fsync, rename); 0 on success. */
static int
write_file_atomic(const char *path, const char *text)
{
	size_t		n = strlen(path) + sizeof(".tmp");
	char	   *tmp = malloc(n);
	FILE	   *f;
	int			ok;

	if (tmp == NULL)
		return -1;
	snprintf(tmp, n, "%s.tmp", path);
	f = fopen(tmp, "w");
	if (f == NULL)
	{
		logmsg("cannot write \"%s\": %s", tmp, strerror(errno));
		free(tmp);
		return -1;
	}
	ok = fputs(text, f) >= 0 && fflush(f) == 0 && fsync(fileno(f)) == 0;
	if (fclose(f) != 0)
		ok = 0;
	if (!ok || rename(tmp, path) != 0)
	{
		logmsg("cannot write \"%s\": %s", path, strerror(errno));
		unlink(tmp);
		free(tmp);
		return -1;
	}
	free(tmp);
	return 0;
}

/* librdkafka log callback: forward library messages to stderr. */
static void
rk_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
	(void) rk;
	logmsg("rdkafka %d %s: %s", level, fac, buf);
}

/* Create the owning handle; mock cluster needs one, it never produces. */
static rd_kafka_t *
make_handle(void)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	char		errstr[512];
	rd_kafka_t *rk;

	rd_kafka_conf_set_log_cb(conf, rk_log);
	/* warnings and worse only; the idle owner handle has nothing to say */
	if (rd_kafka_conf_set(conf, "log_level", "4", errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK ||
		rd_kafka_conf_set(conf, "client.id", "eventshop-devbroker", errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
	{
		logmsg("config error: %s", errstr);
		rd_kafka_conf_destroy(conf);
		return NULL;
	}
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
	{
		logmsg("cannot create librdkafka handle: %s", errstr);
		rd_kafka_conf_destroy(conf);
	}
	return rk;
}

/* Create each topic of the comma-separated list; 0 on success. */
static int
create_topics(rd_kafka_mock_cluster_t *mc, const char *list, int partitions, int rf)
{
	char	   *copy = strdup(list);
	char	   *save = NULL;
	char	   *t;
	int			rc = 0;

	if (copy == NULL)
		return -1;
	for (t = strtok_r(copy, ",", &save); t != NULL; t = strtok_r(NULL, ",", &save))
	{
		rd_kafka_resp_err_t err = rd_kafka_mock_topic_create(mc, t, partitions, rf);

		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			logmsg("cannot create topic \"%s\": %s", t, rd_kafka_err2str(err));
			rc = -1;
			break;
		}
	}
	free(copy);
	return rc;
}

/* Milliseconds on a monotonic clock. */
static long long
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Try one TCP connect to host:port; 1 if accepted, 0 if not. */
static int
probe_addr(const char *host, const char *port)
{
	struct addrinfo hints;
	struct addrinfo *res;
	struct addrinfo *ai;
	int			open_ = 0;

	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_NUMERICSERV;
	if (getaddrinfo(host, port, &hints, &res) != 0)
		return 0;
	for (ai = res; ai != NULL && !open_; ai = ai->ai_next)
	{
		int			fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);

		if (fd < 0)
			continue;
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
			open_ = 1;
		close(fd);
	}
	freeaddrinfo(res);
	return open_;
}

/*
 * Wait until every listener in the bootstrap list accepts (want_open) or
 * refuses (!want_open) connections.  librdkafka applies a broker's up/down
 * state to its listening socket asynchronously (we saw up to ~1 s delay), so
 * without this the "brokers down" line could precede the actual outage.
 * Returns the number of listeners that never reached the state.
 */
static int
wait_listeners(const char *bootstrap, int want_open)
{
	char	   *copy = strdup(bootstrap);
	char	   *save = NULL;
	char	   *addr;
	long long	deadline = now_ms() + STATE_WAIT_MS;
	int			stuck = 0;

	if (copy == NULL)
		return -1;
	for (addr = strtok_r(copy, ",", &save); addr != NULL; addr = strtok_r(NULL, ",", &save))
	{
		char	   *colon = strrchr(addr, ':');
		const struct timespec pause = {0, 20 * 1000 * 1000};

		if (colon == NULL)
			continue;
		*colon = '\0';
		while (probe_addr(addr, colon + 1) != want_open)
		{
			if (now_ms() >= deadline)
			{
				logmsg("warning: listener %s:%s still %s", addr, colon + 1,
					   want_open ? "refusing connections" : "accepting connections");
				stuck++;
				break;
			}
			nanosleep(&pause, NULL);
		}
	}
	free(copy);
	return stuck;
}

/* Set every broker 1..n down (up == 0) or up (up != 0). */
static void
set_brokers(rd_kafka_mock_cluster_t *mc, int n, int up)
{
	int32_t		id;

	for (id = 1; id <= n; id++)
	{
		rd_kafka_resp_err_t err = up ? rd_kafka_mock_broker_set_up(mc, id)
			: rd_kafka_mock_broker_set_down(mc, id);

		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
			logmsg("cannot set broker %d %s: %s", (int) id, up ? "up" : "down",
				   rd_kafka_err2str(err));
	}
}

/* Delay every response of brokers 1..n by rtt_ms (0: no delay). */
static void
set_brokers_rtt(rd_kafka_mock_cluster_t *mc, int n, int rtt_ms)
{
	int32_t		id;

	for (id = 1; id <= n; id++)
	{
		rd_kafka_resp_err_t err = rd_kafka_mock_broker_set_rtt(mc, id, rtt_ms);

		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
			logmsg("cannot set the delay of broker %d: %s", (int) id,
				   rd_kafka_err2str(err));
	}
}

/* Entry point: parse options, start the cluster, serve signals. */
int
main(int argc, char **argv)
{
	struct options opts;
	sigset_t	sigs;
	struct sigaction sa;
	rd_kafka_t *rk;
	rd_kafka_mock_cluster_t *mc;
	const char *bootstrap;
	char	   *line;
	size_t		linelen;
	int			rf;
	int			down = 0;
	int			status = 0;

	parse_options(argc, argv, &opts);

	/*
	 * Block the signals we serve before librdkafka starts any thread, so every
	 * thread inherits the mask and only sigwait() below receives them.
	 */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGUSR1);
	sigaddset(&sigs, SIGUSR2);
	sigaddset(&sigs, SIGRTMIN);
	sigaddset(&sigs, SIGRTMIN + 1);
	if (pthread_sigmask(SIG_BLOCK, &sigs, NULL) != 0)
	{
		logmsg("cannot block signals");
		return 1;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = SIG_IGN;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGPIPE, &sa, NULL);

	if (opts.pid_file)
	{
		char		pidbuf[32];

		snprintf(pidbuf, sizeof(pidbuf), "%ld\n", (long) getpid());
		if (write_file_atomic(opts.pid_file, pidbuf) != 0)
			return 1;
	}

	rk = make_handle();
	mc = rk ? rd_kafka_mock_cluster_new(rk, opts.brokers) : NULL;
	if (mc == NULL)
	{
		if (rk != NULL)
			logmsg("cannot create mock cluster");
		status = 1;
		goto out;
	}

	rf = opts.brokers < 3 ? opts.brokers : 3;
	if (create_topics(mc, opts.topics, opts.partitions, rf) != 0)
	{
		status = 1;
		goto out;
	}

	bootstrap = rd_kafka_mock_cluster_bootstraps(mc);
	if (wait_listeners(bootstrap, 1) != 0)
	{
		status = 1;
		goto out;
	}
	linelen = strlen(bootstrap) + 2;
	line = malloc(linelen);
	if (line == NULL)
	{
		status = 1;
		goto out;
	}
	snprintf(line, linelen, "%s\n", bootstrap);
	if (opts.bootstrap_file && write_file_atomic(opts.bootstrap_file, line) != 0)
	{
		free(line);
		status = 1;
		goto out;
	}
	free(line);

	printf("bootstrap=%s\n", bootstrap);
	fflush(stdout);
	logmsg("%d broker(s), %d partition(s) per topic, listening on %s",
		   opts.brokers, opts.partitions, bootstrap);

	for (;;)
	{
		int			sig;

		if (sigwait(&sigs, &sig) != 0)
			continue;
		if (sig == SIGUSR1)
		{
			set_brokers(mc, opts.brokers, 0);
			wait_listeners(bootstrap, 0);
			logmsg(down ? "brokers down (already down)" : "brokers down");
			down = 1;
		}
		else if (sig == SIGUSR2)
		{
			set_brokers(mc, opts.brokers, 1);
			wait_listeners(bootstrap, 1);
			logmsg(down ? "brokers up" : "brokers up (already up)");
			down = 0;
		}
		else if (sig == SIGRTMIN || sig == SIGRTMIN + 1)
		{
			int			rtt = sig == SIGRTMIN ? opts.slow_rtt_ms : 0;

			set_brokers_rtt(mc, opts.brokers, rtt);
			logmsg("brokers answer after %d ms", rtt);
		}
		else
		{
			logmsg("received signal %d, shutting down", sig);
			break;
		}
	}

out:
	if (mc != NULL)
		rd_kafka_mock_cluster_destroy(mc);
	if (rk != NULL)
		rd_kafka_destroy(rk);
	if (opts.pid_file)
		unlink(opts.pid_file);
	return status;
}
