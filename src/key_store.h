/*
 * key_store.h
 *		JWT signing keys: generation, sealing at rest, JWK export, and the
 *		per-backend cache of parsed OpenSSL keys used by jwt.c.
 */
#ifndef EVENTSHOP_KEY_STORE_H
#define EVENTSHOP_KEY_STORE_H

#include <openssl/evp.h>

/* kids are RFC 7638 SHA-256 thumbprints: 43 base64url characters. */
#define ES_KID_LEN		43

/* What the signing_keys row of a kid allows, as read by es_key_for_verify. */
typedef enum EsKeyStatus
{
	ES_KEY_UNKNOWN = 0,			/* no row */
	ES_KEY_ACTIVE = 1,
	ES_KEY_RETIRED = 2,			/* retired less than access_token_ttl ago */
	ES_KEY_STANDBY = 3,
	ES_KEY_REVOKED = 4,
	ES_KEY_EXPIRED = 5			/* retired longer ago: no token it signed can be valid */
} EsKeyStatus;

/*
 * SQL of one int4 that describes a signing_keys row k, for statements that
 * read a key's state (es_key_state_decode reads it): its EsKeyStatus * 4 +
 * its EsJwtAlg (3: none of ours). ttl names the parameter holding
 * eventshop.access_token_ttl in seconds.
 */
#define ES_KEY_STATE_SQL(ttl) \
	"CASE k.state WHEN 'active' THEN 1 WHEN 'retired' THEN CASE WHEN k.retired_at > " \
	"pg_catalog.clock_timestamp() - " ttl " * interval '1 second' THEN 2 ELSE 5 END " \
	"WHEN 'standby' THEN 3 ELSE 4 END * 4 + " \
	"CASE k.alg WHEN 'RS256' THEN 0 WHEN 'ES256' THEN 1 WHEN 'EdDSA' THEN 2 ELSE 3 END"

/* One cached key: OpenSSL objects live in OpenSSL's heap for the backend's lifetime. */
typedef struct EsKey
{
	char		kid[ES_KID_LEN + 1];
	int			alg;			/* EsJwtAlg */
	/* verification (public key from the stored JWK) */
	EVP_PKEY   *pub;
	EVP_PKEY_CTX *verify_ctx;	/* RS256, ES256: over a SHA-256 digest */
	EVP_MD_CTX *verify_mdctx;	/* EdDSA: over the message */
	/* signing (private key unsealed from the table) */
	EVP_PKEY   *priv;
	EVP_PKEY_CTX *sign_ctx;
	EVP_MD_CTX *sign_mdctx;
	/* base64url of {"alg":...,"typ":"JWT","kid":...} and its length */
	char		header_b64[128];
	int			header_b64_len;
	uint64		last_used;
} EsKey;

extern EsKey *es_key_for_verify(const char *kid, EsKeyStatus *status, int *alg);
extern EsKeyStatus es_key_state_decode(Datum state, bool isnull, int *key_alg);
extern EsKey *es_active_signing_key(int alg);
extern int	es_jwt_alg_from_name(const char *name, size_t len);

#endif							/* EVENTSHOP_KEY_STORE_H */
