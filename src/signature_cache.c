/*
 * signature_cache.c
 *		Per-backend memory of JWS tokens this backend has already verified,
 *		so that an application presenting the same access token on every
 *		call pays for one public-key operation and one parse, not one per
 *		call (an RS256 verification is ~35 us here, a quarter of placing an
 *		order; parsing the header and the claims another ~8 us).
 *
 * Why remembering is safe: a signature's validity depends only on the
 * signing input, the signature and the public key. The token names its key
 * by kid, and a kid is the RFC 7638 thumbprint of the public key (key_store.c
 * refuses a row whose JWK does not match its kid), so the token's bytes fix
 * all three. The header and the claims are a function of the same bytes, so
 * their parsed form is remembered with the signature. Only checks that
 * depend on nothing but those bytes are skipped: the key's state (revoked,
 * retired too long ago...) and every claim against the clock, the session
 * and the account are still checked on every call.
 *
 * Entries are SHA-256 digests of the whole token (es_sha256), in a
 * direct-mapped table (a newer token takes the slot of an older one),
 * compared in constant time, with the token's kid, algorithm and claims
 * (claims of up to ES_CACHED_CLAIMS_MAX bytes; a token with larger claims is
 * remembered without them and parsed on every call).
 */
#include "postgres.h"

#include <openssl/crypto.h>

#include "utils/memutils.h"

#include "crypto_util.h"
#include "signature_cache.h"

#define ES_SIGNATURE_CACHE_SLOTS 256
#define ES_CACHED_CLAIMS_MAX	2048

typedef struct VerifiedToken
{
	bool		used;
	uint8		digest[ES_SHA256_LEN];
	char		kid[ES_KID_LEN + 1];
	int			alg;
	Jsonb	   *claims;			/* in TopMemoryContext; NULL: too large to keep */
} VerifiedToken;

static VerifiedToken verified[ES_SIGNATURE_CACHE_SLOTS];

/*
 * Whether a token with this digest was verified before in this backend; if
 * so, fills in its kid (ES_KID_LEN + 1 bytes), algorithm and claims (a copy
 * in the current memory context, or NULL when they were not kept).
 */
bool
es_signature_cache_lookup(const uint8 *digest, char *kid, int *alg, Jsonb **claims)
{
	VerifiedToken *slot = &verified[digest[0] % ES_SIGNATURE_CACHE_SLOTS];

	if (!slot->used || CRYPTO_memcmp(slot->digest, digest, ES_SHA256_LEN) != 0)
		return false;
	memcpy(kid, slot->kid, ES_KID_LEN + 1);
	*alg = slot->alg;
	*claims = NULL;
	if (slot->claims != NULL)
	{
		*claims = palloc(VARSIZE(slot->claims));
		memcpy(*claims, slot->claims, VARSIZE(slot->claims));
	}
	return true;
}

/* Remembers a token whose signature was just verified, with its kid, algorithm and claims. */
void
es_signature_cache_add(const uint8 *digest, const char *kid, int alg, Jsonb *claims)
{
	VerifiedToken *slot = &verified[digest[0] % ES_SIGNATURE_CACHE_SLOTS];

	if (slot->claims != NULL)
		pfree(slot->claims);
	slot->used = false;
	slot->claims = NULL;
	if (VARSIZE(claims) <= ES_CACHED_CLAIMS_MAX)
		slot->claims = MemoryContextAllocExtended(TopMemoryContext, VARSIZE(claims), MCXT_ALLOC_NO_OOM);
	if (slot->claims != NULL)
		memcpy(slot->claims, claims, VARSIZE(claims));
	memcpy(slot->digest, digest, ES_SHA256_LEN);
	memcpy(slot->kid, kid, ES_KID_LEN + 1);
	slot->alg = alg;
	slot->used = true;
}
