/*
 * signature_cache.c
 *		Per-backend memory of JWS signatures this backend has already
 *		verified, so that an application presenting the same access token on
 *		every call pays for one public-key operation, not one per call (an
 *		RS256 verification is ~35 us here, a quarter of placing an order).
 *
 * Why remembering is safe: a signature's validity depends only on the
 * signing input, the signature and the public key. The token names its key
 * by kid, and a kid is the RFC 7638 thumbprint of the public key (key_store.c
 * refuses a row whose JWK does not match its kid), so the token's bytes fix
 * all three. Only the signature check is skipped: the key's state (revoked,
 * retired too long ago...) and every claim are still checked on every call.
 *
 * Entries are SHA-256 digests of the whole token (es_sha256), in a direct-mapped table
 * (a newer token takes the slot of an older one), compared in constant time.
 */
#include "postgres.h"

#include <openssl/crypto.h>

#include "crypto_util.h"
#include "signature_cache.h"

#define ES_SIGNATURE_CACHE_SLOTS 256

typedef struct VerifiedSignature
{
	bool		used;
	uint8		digest[ES_SHA256_LEN];
} VerifiedSignature;

static VerifiedSignature verified[ES_SIGNATURE_CACHE_SLOTS];

/* Whether a token with this digest was verified before in this backend. */
bool
es_signature_cache_contains(const uint8 *digest)
{
	VerifiedSignature *slot = &verified[digest[0] % ES_SIGNATURE_CACHE_SLOTS];

	return slot->used && CRYPTO_memcmp(slot->digest, digest, ES_SHA256_LEN) == 0;
}

/* Remembers a token whose signature was just verified. */
void
es_signature_cache_add(const uint8 *digest)
{
	VerifiedSignature *slot = &verified[digest[0] % ES_SIGNATURE_CACHE_SLOTS];

	memcpy(slot->digest, digest, ES_SHA256_LEN);
	slot->used = true;
}
