/*
 * signature_cache.h
 *		Signatures of access tokens already verified by this backend (see
 *		signature_cache.c for why skipping their re-verification is safe).
 */
#ifndef EVENTSHOP_SIGNATURE_CACHE_H
#define EVENTSHOP_SIGNATURE_CACHE_H

extern bool es_signature_cache_contains(const uint8 *digest);
extern void es_signature_cache_add(const uint8 *digest);

#endif							/* EVENTSHOP_SIGNATURE_CACHE_H */
