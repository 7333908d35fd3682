/*
 * raw_producer.c
 *		The relay benchmark's baseline: librdkafka's own producer rate to the
 *		same broker, with the relay's producer settings (idempotence,
 *		murmur2_random, linger.ms=1) and messages shaped like outbox events
 *		(CloudEvents JSON value, a user-id key, ce_id/ce_type headers).
 *
 *	usage: raw_producer BOOTSTRAP TOPIC COUNT VALUE_BYTES
 *	prints: messages per second, from the first produce to the last ack.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <librdkafka/rdkafka.h>

static long acked = 0;
static long failed = 0;

static void
on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque)
{
	(void) rk;
	(void) opaque;
	if (msg->err)
		failed++;
	else
		acked++;
}

static double
now_seconds(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
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

	if (argc != 5)
	{
		fprintf(stderr, "usage: %s BOOTSTRAP TOPIC COUNT VALUE_BYTES\n", argv[0]);
		return 2;
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

		snprintf(key, sizeof(key), "00000000-0000-4000-8000-%012ld", i % 10000);
		snprintf(id, sizeof(id), "10000000-0000-4000-8000-%012ld", i);
		while (rd_kafka_producev(rk, RD_KAFKA_V_RKT(rkt),
								 RD_KAFKA_V_KEY(key, strlen(key)),
								 RD_KAFKA_V_VALUE(value, value_bytes),
								 RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
								 RD_KAFKA_V_HEADER("ce_id", id, -1),
								 RD_KAFKA_V_HEADER("ce_type", "order.created", -1),
								 RD_KAFKA_V_END) == RD_KAFKA_RESP_ERR__QUEUE_FULL)
			rd_kafka_poll(rk, 10);
		rd_kafka_poll(rk, 0);
	}
	rd_kafka_flush(rk, 60000);
	printf("%.0f\n", count / (now_seconds() - start));
	fprintf(stderr, "raw producer: %ld acknowledged, %ld failed\n", acked, failed);
	rd_kafka_topic_destroy(rkt);
	rd_kafka_destroy(rk);
	free(value);
	return failed > 0 || acked != count;
}
