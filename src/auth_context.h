/*
 * auth_context.h
 *		The caller of the current transaction (src/auth_context.c), for the
 *		C modules that establish or need it.
 */
#ifndef EVENTSHOP_AUTH_CONTEXT_H
#define EVENTSHOP_AUTH_CONTEXT_H

#include "utils/array.h"
#include "utils/uuid.h"

extern void es_auth_set(pg_uuid_t *user_id, ArrayType *roles, pg_uuid_t *session_id);
extern bool es_auth_current(pg_uuid_t *user_id, pg_uuid_t *session_id);

#endif							/* EVENTSHOP_AUTH_CONTEXT_H */
