/*
 * jwt.h
 *		Compact JWS signing and strict verification (RS256, ES256, EdDSA)
 *		with cached OpenSSL keys; libjwt is not involved.
 */
#ifndef EVENTSHOP_JWT_H
#define EVENTSHOP_JWT_H

/* Longest token accepted or produced, in bytes. */
#define ES_JWT_MAX_LEN		8192

/* Deepest JSON nesting accepted in a header or payload. */
#define ES_JWT_MAX_DEPTH	32

#endif							/* EVENTSHOP_JWT_H */
