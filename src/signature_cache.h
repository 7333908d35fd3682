/*
 * signature_cache.h
 *		Access tokens already verified by this backend, with what their bytes
 *		fix (see signature_cache.c for why reusing that is safe).
 */
#ifndef EVENTSHOP_SIGNATURE_CACHE_H
#define EVENTSHOP_SIGNATURE_CACHE_H

#include "utils/jsonb.h"

#include "key_store.h"

extern bool es_signature_cache_lookup(const uint8 *digest, char *kid, int *alg, Jsonb **claims);
extern void es_signature_cache_add(const uint8 *digest, const char *kid, int alg, Jsonb *claims);

#endif							/* EVENTSHOP_SIGNATURE_CACHE_H */
