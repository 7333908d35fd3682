/*
 * jwt.h
 *		Compact JWS signing and strict verification (RS256, ES256, EdDSA)
 *		with cached OpenSSL keys; libjwt is not involved.
 */
#ifndef EVENTSHOP_JWT_H
#define EVENTSHOP_JWT_H

#include "utils/jsonb.h"

/* Longest token accepted or produced, in bytes. */
#define ES_JWT_MAX_LEN		8192

/* Deepest JSON nesting accepted in a header or payload. */
#define ES_JWT_MAX_DEPTH	32

/* Checks a token's shape, header, key and signature; returns its claims (28000 otherwise). */
extern JsonbValue *es_jwt_verify(const char *tok, size_t len);
/* Raises 28000 "invalid token" with a non-secret detail (also authenticate's claim checks). */
extern void es_invalid_token(const char *fmt,...) pg_attribute_printf(1, 2) pg_attribute_noreturn();

#endif							/* EVENTSHOP_JWT_H */
