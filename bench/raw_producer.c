/*
 * raw_producer.c
 *		The relay benchmark's baseline: librdkafka's own producer rate to the
 *		same broker, with the relay's producer settings (idempotence,
 *		murmur2_random, linger.ms=1) and messages shaped like outbox events
 *		(CloudEvents JSON value, a user-id key, ce_id/ce_type headers).
 *
 *	usage: raw_producer BOOTSTRAP TOPIC COUNT VALUE_BYTES [RATE]
 *	prints: messages per second, from the first produce to the last ack;
 *	with RATE, produces RATE messages a second instead (one at a time,
 *	like a stream of single-event commits) and prints the
 *	produce-to-acknowledgement latency: "p50_ms p99_ms".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <librdkafka/rdkafka.h>

static long acked = 0;
static long failed = 0;
static double *latencies = NULL;	/* rate mode: ms from produce to ack */
static long nlatencies = 0;

static double
now_seconds(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void
on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque)
{
	(void) rk;
	(void) opaque;
	if (msg->err)
		failed++;
	else
		acked++;
	if (latencies != NULL && msg->_private != NULL)
	{
		latencies[nlatencies++] = (now_seconds() - *(double *) msg->_private) * 1000.0;
		free(msg->_private);
	}
}

static int
compare_doubles(const void *a, const void *b)
{
	double		x = *(const double *) a,
				y = *(const double *) b;

	return (x > y) - (x < y);
}

static void
set(rd_kafka_conf_t *conf, const char *name, const char *value)
{
	char		err[256];

	if (rd_kafka_conf_set(conf, name, value, err, sizeof(err)) != RD_KAFKA_CONF_OK)
	{
		fprintf(stderr, "%s: %s\n", name, err);
		exit(1);
	}
}

int
main(int argc, char **argv)
{
	rd_kafka_conf_t *conf;
	rd_kafka_t *rk;
	rd_kafka_topic_t *rkt;
	char		err[256];
	long		count;
	int			value_bytes;
	char	   *value;
	double		start;

	double		rate = 0;

	if (argc != 5 && argc != 6)
	{
		fprintf(stderr, "usage: %s BOOTSTRAP TOPIC COUNT VALUE_BYTES [RATE]\n", argv[0]);
		return 2;
	}
	if (argc == 6)
	{
		rate = atof(argv[5]);
		latencies = calloc(atol(argv[3]), sizeof(double));
	}
	count = atol(argv[3]);
	value_bytes = atoi(argv[4]);
	value = malloc(value_bytes + 1);
	memset(value, 'x', value_bytes);
	value[value_bytes] = '\0';

	conf = rd_kafka_conf_new();
	set(conf, "bootstrap.servers", argv[1]);
	set(conf, "enable.idempotence", "true");
	set(conf, "partitioner", "murmur2_random");
	set(conf, "linger.ms", "1");
	set(conf, "socket.nagle.disable", "true");
	set(conf, "batch.num.messages", "10000");
	set(conf, "queue.buffering.max.messages", "200000");
	set(conf, "queue.buffering.max.kbytes", "1048576");
	rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err));
	if (rk == NULL)
	{
		fprintf(stderr, "%s\n", err);
		return 1;
	}
	rkt = rd_kafka_topic_new(rk, argv[2], NULL);

	start = now_seconds();
	for (long i = 0; i < count; i++)
	{
		char		key[64];
		char		id[64];

		double	   *sent_at = NULL;

		if (rate > 0)
		{
			/* steady pace: wait for this message's slot, serving reports meanwhile */
			while (now_seconds() < start + i / rate)
				rd_kafka_poll(rk, 1);
			sent_at = malloc(sizeof(double));
			*sent_at = now_seconds();
		}
		snprintf(key, sizeof(key), "00000000-0000-4000-8000-%012ld", i % 10000);
		snprintf(id, sizeof(id), "10000000-0000-4000-8000-%012ld", i);
		while (rd_kafka_producev(rk, RD_KAFKA_V_RKT(rkt),
								 RD_KAFKA_V_KEY(key, strlen(key)),
								 RD_KAFKA_V_VALUE(value, value_bytes),
								 RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
								 RD_KAFKA_V_HEADER("ce_id", id, -1),
								 RD_KAFKA_V_HEADER("ce_type", "order.created", -1),
								 RD_KAFKA_V_OPAQUE(sent_at),
								 RD_KAFKA_V_END) == RD_KAFKA_RESP_ERR__QUEUE_FULL)
			rd_kafka_poll(rk, 10);
		rd_kafka_poll(rk, 0);
	}
	rd_kafka_flush(rk, 60000);
	if (rate > 0 && nlatencies > 0)
	{
		qsort(latencies, nlatencies, sizeof(double), compare_doubles);
		printf("%.2f %.2f\n", latencies[nlatencies / 2], latencies[(long) (nlatencies * 0.99)]);
	}
	else
		printf("%.0f\n", count / (now_seconds() - start));
	fprintf(stderr, "raw producer: %ld acknowledged, %ld failed\n", acked, failed);
	rd_kafka_topic_destroy(rkt);
	rd_kafka_destroy(rk);
	free(value);
	return failed > 0 || acked != count;
}
