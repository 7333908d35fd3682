/*
 * config.h
 *		The eventshop.* settings (GUCs) shared by the SQL functions and the
 *		background workers.
 */
#ifndef EVENTSHOP_CONFIG_H
#define EVENTSHOP_CONFIG_H

/* Where the workers run. */
extern char *es_database;
extern bool es_relay_enabled;
extern bool es_dispatcher_enabled;

/* Kafka, shared by both workers. */
extern char *es_kafka_brokers;
extern char *es_kafka_properties;
extern char *es_topic_prefix;

/* Relay. */
extern int	es_relay_batch_size;

/* Dispatcher. */
extern char *es_dispatcher_group;
extern char *es_dispatcher_topics;
extern int	es_dispatcher_batch_size;

/* Notification sending. */
extern char *es_smtp_url;
extern char *es_smtp_from;
extern char *es_smtp_username;
extern char *es_smtp_password_file;
extern int	es_smtp_timeout_ms;
extern int	es_notification_max_attempts;

extern void es_define_settings(void);

#endif							/* EVENTSHOP_CONFIG_H */
