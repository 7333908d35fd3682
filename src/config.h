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
extern int	es_relay_max_in_flight;
extern int	es_relay_checkpoint_interval_ms;

/* Dispatcher. */
extern char *es_dispatcher_group;
extern char *es_dispatcher_topics;
extern int	es_dispatcher_batch_size;
extern char *es_app_url;

/* Notification sending. */
extern char *es_smtp_url;
extern char *es_smtp_from;
extern char *es_smtp_username;
extern char *es_smtp_password_file;
extern int	es_smtp_timeout_ms;
extern int	es_notification_max_attempts;

/* Sender pool and channels (bgworkers/sender.c and the channel modules). */
typedef enum EsSmtpTls
{
	ES_SMTP_TLS_OFF,			/* never STARTTLS (smtps:// still uses TLS) */
	ES_SMTP_TLS_OPPORTUNISTIC,	/* STARTTLS when the server offers it */
	ES_SMTP_TLS_REQUIRED		/* STARTTLS or fail */
} EsSmtpTls;

extern int	es_sender_workers;
extern int	es_sender_concurrency;
extern int	es_sender_batch_size;
extern int	es_notification_max_backoff_s;
extern int	es_smtp_tls;
extern bool es_tls_verify;
extern char *es_tls_ca_file;
extern int	es_http_timeout_ms;
extern char *es_webhook_url;
extern char *es_webhook_secret_file;
extern char *es_sms_url;
extern char *es_sms_token_file;
extern char *es_push_url;
extern char *es_push_token_file;

/* Keys and JWT (auth module). */
typedef enum EsJwtAlg
{
	ES_JWT_RS256,
	ES_JWT_ES256,
	ES_JWT_EDDSA
} EsJwtAlg;

extern char *es_key_file;
extern char *es_seal_public_key;
extern char *es_seal_private_key_file;
extern char *es_jwt_issuer;
extern char *es_jwt_audience;
extern int	es_access_token_ttl_s;
extern int	es_refresh_token_ttl_s;
extern int	es_jwt_default_alg;
extern int	es_refresh_reuse_grace_ms;

extern const char *es_jwt_alg_name(int alg);

/* Accounts: password hashing, login throttling, one-time tokens. */
extern int	es_password_hash_memory_kib;
extern int	es_password_hash_iterations;
extern int	es_max_concurrent_password_hashes;
extern int	es_login_max_failures;
extern int	es_login_max_failures_per_source;
extern int	es_login_failure_window_s;
extern int	es_login_lockout_s;
extern int	es_login_lockout_max_s;
extern int	es_login_throttle_entries;
extern int	es_login_failure_min_duration_ms;
extern int	es_password_reset_ttl_s;
extern int	es_magic_link_ttl_s;
extern int	es_email_verification_ttl_s;

/* Orders. */
extern int	es_reservation_ttl_s;

extern void es_define_settings(void);

#endif							/* EVENTSHOP_CONFIG_H */
