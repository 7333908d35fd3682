/*
 * emit_event.h
 *		Writing CloudEvents to the outbox from C (see emit_event.c).
 */
#ifndef EVENTSHOP_EMIT_EVENT_H
#define EVENTSHOP_EMIT_EVENT_H

#include "utils/jsonb.h"
#include "utils/uuid.h"

extern pg_uuid_t *es_emit_event(const char *topic, const char *message_key,
								const char *event_type, Jsonb *data);
extern text *es_event_envelope(const char *topic, const char *message_key,
							   const char *event_type, Jsonb *data, pg_uuid_t *id);

#endif							/* EVENTSHOP_EMIT_EVENT_H */
