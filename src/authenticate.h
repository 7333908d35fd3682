/*
 * authenticate.h
 *		Verifying the caller from an access token and re-checking its session
 *		(src/authenticate.c), for C functions of other modules.
 */
#ifndef EVENTSHOP_AUTHENTICATE_H
#define EVENTSHOP_AUTHENTICATE_H

#include "utils/array.h"
#include "utils/uuid.h"

extern ArrayType *es_authenticate(text *token, pg_uuid_t *user_id, pg_uuid_t *session_id);
extern void es_require_user(pg_uuid_t *user_id);

#endif							/* EVENTSHOP_AUTHENTICATE_H */
