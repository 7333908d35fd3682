/*
 * jwt.h
 *		Compact JWS signing and strict verification (RS256, ES256, EdDSA)
 *		with cached OpenSSL keys; libjwt is not involved.
 */
#ifndef EVENTSHOP_JWT_H
#define EVENTSHOP_JWT_H

#include "utils/jsonb.h"

#include "key_store.h"

/* Longest token accepted or produced, in bytes. */
#define ES_JWT_MAX_LEN		8192

/* Deepest JSON nesting accepted in a header or payload. */
#define ES_JWT_MAX_DEPTH	32

/*
 * The signing key of a token verified by es_jwt_verify_deferred. When
 * pending, the signature is known good (this backend verified these exact
 * bytes before: signature_cache.c) but the key's state (checks 4 and 5 of
 * jwt.c) has not been read: the caller reads it in a statement of its own
 * and passes it to es_jwt_check_key, or calls es_jwt_check_key_now, before
 * it trusts anything in the token.
 */
typedef struct EsJwtKeyCheck
{
	char		kid[ES_KID_LEN + 1];
	int			alg;			/* the header's (EsJwtAlg) */
	bool		pending;
} EsJwtKeyCheck;

/* Checks a token's shape, header, key and signature; returns its claims (28000 otherwise). */
extern Jsonb *es_jwt_verify(const char *tok, size_t len);
/* The same, but leaves the key's state to the caller when the signature is remembered. */
extern Jsonb *es_jwt_verify_deferred(const char *tok, size_t len, EsJwtKeyCheck *check);
/* Checks 4 and 5 for a key state read by the caller (28000 if the key may not verify). */
extern void es_jwt_check_key(EsJwtKeyCheck *check, EsKeyStatus status, int key_alg);
/* Reads the key's state and checks it, if still pending. */
extern void es_jwt_check_key_now(EsJwtKeyCheck *check);
/* Raises 28000 "invalid token" with a non-secret detail (also authenticate's claim checks). */
extern void es_invalid_token(const char *fmt,...) pg_attribute_printf(1, 2) pg_attribute_noreturn();

#endif							/* EVENTSHOP_JWT_H */
