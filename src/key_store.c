/*
 * key_store.c
 *		JWT signing keys: generation (RS256 = RSA-2048, ES256 = P-256,
 *		EdDSA = Ed25519) with OpenSSL's EVP API, sealing of private keys at
 *		rest, JWK export, and a per-backend cache of parsed keys by kid.
 *
 * Rows live in eventshop.signing_keys; the SQL functions there manage the
 * life cycle (standby -> active -> retired -> revoked). This file only
 * creates key material and reads rows:
 *
 * - kid is the RFC 7638 SHA-256 thumbprint of the public JWK, so a kid names
 *   one public key forever and a cached public key can never go stale; the
 *   thumbprint is re-checked whenever a key is loaded.
 * - A private key is stored as 0x01 || nonce(12) || AES-256-GCM(PKCS#8 DER)
 *   || tag(16), under the KEK derived from eventshop.key_file with HKDF
 *   ("eventshop kek v1"), with the kid as additional data, so a sealed key
 *   cannot be moved to another row.
 * - Parsed EVP_PKEYs and ready-to-use signing/verification contexts are
 *   cached per backend by kid, so no call parses PEM, DER or JSON keys. The
 *   row's state is still read on every verification, so revocation applies
 *   to the next statement. Only the active key of an algorithm keeps its
 *   private half cached: the others' are freed at the next signing with
 *   that algorithm after a rotation or revocation.
 * - Private key material (the decrypted DER, the KEK, OpenSSL key objects)
 *   is freed and cleansed on every path, errors included: nothing that can
 *   raise runs while it exists outside a PG_TRY that cleans up.
 */
#include "postgres.h"

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "access/htup_details.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/tuplestore.h"

#include "config.h"
#include "crypto_util.h"
#include "key_store.h"
#include "spi_util.h"

#define ES_KEY_CACHE_SIZE	32
#define ES_SEAL_VERSION		0x01
#define ES_SEAL_OVERHEAD	(1 + ES_GCM_NONCE_LEN + ES_GCM_TAG_LEN)
#define ES_MAX_PRIVATE_DER	4096

PG_FUNCTION_INFO_V1(eventshop_generate_signing_key);
PG_FUNCTION_INFO_V1(eventshop_signing_key_cache);

/* Public parts of a key in JWK form (base64url strings; unused ones NULL). */
typedef struct EsJwkParts
{
	const char *kty;
	const char *crv;
	char	   *n;
	char	   *e;
	char	   *x;
	char	   *y;
} EsJwkParts;

static EsKey es_keys[ES_KEY_CACHE_SIZE];
static uint64 es_key_clock = 0;

static SPIPlanPtr es_plan_status = NULL;
static SPIPlanPtr es_plan_jwk = NULL;
static SPIPlanPtr es_plan_active = NULL;
static SPIPlanPtr es_plan_sealed = NULL;

static EsKey *es_cache_find(const char *kid);
static EsKey *es_cache_insert(const char *kid, int alg);
static void es_cache_free_private(EsKey *key);
static void es_cache_free(EsKey *key);
static void es_cache_drop_private_except(int alg, const char *active_kid);
static char *es_b64url_palloc(const uint8 *src, size_t len);
static bool es_export_jwk(EVP_PKEY *pkey, int alg, EsJwkParts *parts);
static void es_thumbprint(const EsJwkParts *parts, char *kid);
static EVP_PKEY *es_pkey_from_jwk(int alg, const EsJwkParts *parts);
static void es_load_public(EsKey *key, int alg);
static void es_load_private(EsKey *key, bytea *sealed);
static void es_prepare_verify(EsKey *key);
static void es_prepare_sign(EsKey *key, EVP_PKEY *priv);
static void es_build_header(EsKey *key);
static const char *es_kty(int alg);

/* Maps a JOSE algorithm name (exact, case-sensitive) to EsJwtAlg, or -1. */
int
es_jwt_alg_from_name(const char *name, size_t len)
{
	if (len == 5 && memcmp(name, "RS256", 5) == 0)
		return ES_JWT_RS256;
	if (len == 5 && memcmp(name, "ES256", 5) == 0)
		return ES_JWT_ES256;
	if (len == 5 && memcmp(name, "EdDSA", 5) == 0)
		return ES_JWT_EDDSA;
	return -1;
}

/* The JWK key type of an algorithm. */
static const char *
es_kty(int alg)
{
	return alg == ES_JWT_RS256 ? "RSA" : alg == ES_JWT_ES256 ? "EC" : "OKP";
}

/* Finds a cached key by kid. */
static EsKey *
es_cache_find(const char *kid)
{
	int			i;

	for (i = 0; i < ES_KEY_CACHE_SIZE; i++)
		if (es_keys[i].kid[0] != '\0' && strcmp(es_keys[i].kid, kid) == 0)
		{
			es_keys[i].last_used = ++es_key_clock;
			return &es_keys[i];
		}
	return NULL;
}

/* Takes a free cache slot (or the least recently used one) for a kid. */
static EsKey *
es_cache_insert(const char *kid, int alg)
{
	EsKey	   *victim = &es_keys[0];
	int			i;

	for (i = 0; i < ES_KEY_CACHE_SIZE; i++)
	{
		if (es_keys[i].kid[0] == '\0')
		{
			victim = &es_keys[i];
			break;
		}
		if (es_keys[i].last_used < victim->last_used)
			victim = &es_keys[i];
	}
	es_cache_free(victim);
	strlcpy(victim->kid, kid, sizeof(victim->kid));
	victim->alg = alg;
	victim->last_used = ++es_key_clock;
	es_build_header(victim);
	return victim;
}

/* Frees the signing half of a cached key, because a retired key never signs again. */
static void
es_cache_free_private(EsKey *key)
{
	EVP_PKEY_CTX_free(key->sign_ctx);
	EVP_MD_CTX_free(key->sign_mdctx);
	EVP_PKEY_free(key->priv);
	key->sign_ctx = NULL;
	key->sign_mdctx = NULL;
	key->priv = NULL;
}

/*
 * Frees the private half of every cached key of an algorithm except the
 * active one (NULL: none is active), so that a retired or revoked private
 * key does not stay in backend memory.
 */
static void
es_cache_drop_private_except(int alg, const char *active_kid)
{
	for (int i = 0; i < ES_KEY_CACHE_SIZE; i++)
	{
		EsKey	   *key = &es_keys[i];

		if (key->priv != NULL && key->alg == alg &&
			(active_kid == NULL || strcmp(key->kid, active_kid) != 0))
			es_cache_free_private(key);
	}
}

/* Empties a cache slot. */
static void
es_cache_free(EsKey *key)
{
	es_cache_free_private(key);
	EVP_PKEY_CTX_free(key->verify_ctx);
	EVP_MD_CTX_free(key->verify_mdctx);
	EVP_PKEY_free(key->pub);
	memset(key, 0, sizeof(*key));
}

/* Precomputes the encoded JOSE header of a key, the same for every token it signs. */
static void
es_build_header(EsKey *key)
{
	char		json[96];
	int			len;

	len = snprintf(json, sizeof(json), "{\"alg\":\"%s\",\"typ\":\"JWT\",\"kid\":\"%s\"}",
				   es_jwt_alg_name(key->alg), key->kid);
	Assert(len > 0 && len < (int) sizeof(json) && ES_B64URL_LEN(len) < sizeof(key->header_b64));
	key->header_b64_len = (int) es_b64url_encode((const uint8 *) json, len, key->header_b64);
	key->header_b64[key->header_b64_len] = '\0';
}

/* Base64url of a buffer as a palloc'd C string. */
static char *
es_b64url_palloc(const uint8 *src, size_t len)
{
	char	   *out = palloc(ES_B64URL_LEN(len) + 1);

	out[es_b64url_encode(src, len, out)] = '\0';
	return out;
}

/* Reads the public parameters of a key into JWK members; false when OpenSSL cannot. */
static bool
es_export_jwk(EVP_PKEY *pkey, int alg, EsJwkParts *parts)
{
	uint8		buf[512];
	size_t		len = 0;

	memset(parts, 0, sizeof(*parts));
	parts->kty = es_kty(alg);
	if (alg == ES_JWT_RS256)
	{
		BIGNUM	   *n = NULL;
		BIGNUM	   *e = NULL;
		uint8		ebuf[8];
		size_t		elen = 0;
		bool		ok;

		/* copy out and free the BIGNUMs before anything that can raise (palloc) */
		ok = EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_RSA_N, &n) == 1 &&
			EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_RSA_E, &e) == 1 &&
			BN_num_bytes(n) <= (int) sizeof(buf) && BN_num_bytes(e) <= (int) sizeof(ebuf);
		if (ok)
		{
			len = BN_bn2bin(n, buf);
			elen = BN_bn2bin(e, ebuf);
		}
		BN_free(n);
		BN_free(e);
		if (ok)
		{
			parts->n = es_b64url_palloc(buf, len);
			parts->e = es_b64url_palloc(ebuf, elen);
		}
		return ok;
	}
	if (alg == ES_JWT_ES256)
	{
		parts->crv = "P-256";
		if (EVP_PKEY_get_octet_string_param(pkey, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY,
											buf, sizeof(buf), &len) != 1 ||
			len != 65 || buf[0] != 0x04)
			return false;
		parts->x = es_b64url_palloc(buf + 1, 32);
		parts->y = es_b64url_palloc(buf + 33, 32);
		return true;
	}
	parts->crv = "Ed25519";
	len = sizeof(buf);
	if (EVP_PKEY_get_raw_public_key(pkey, buf, &len) != 1 || len != 32)
		return false;
	parts->x = es_b64url_palloc(buf, 32);
	return true;
}

/* Computes the RFC 7638 JWK thumbprint (SHA-256, base64url) into kid[ES_KID_LEN + 1]. */
static void
es_thumbprint(const EsJwkParts *parts, char *kid)
{
	StringInfoData buf;
	uint8		digest[ES_SHA256_LEN];

	/* members required for the key type, in lexicographic order, no whitespace */
	initStringInfo(&buf);
	if (strcmp(parts->kty, "RSA") == 0)
		appendStringInfo(&buf, "{\"e\":\"%s\",\"kty\":\"RSA\",\"n\":\"%s\"}", parts->e, parts->n);
	else if (strcmp(parts->kty, "EC") == 0)
		appendStringInfo(&buf, "{\"crv\":\"%s\",\"kty\":\"EC\",\"x\":\"%s\",\"y\":\"%s\"}",
						 parts->crv, parts->x, parts->y);
	else
		appendStringInfo(&buf, "{\"crv\":\"%s\",\"kty\":\"OKP\",\"x\":\"%s\"}", parts->crv, parts->x);
	es_sha256(buf.data, buf.len, digest);
	kid[es_b64url_encode(digest, sizeof(digest), kid)] = '\0';
	pfree(buf.data);
}

/* Builds a public EVP_PKEY from JWK members, checking sizes and (through OpenSSL) the curve point. */
static EVP_PKEY *
es_pkey_from_jwk(int alg, const EsJwkParts *parts)
{
	uint8		a[520];
	uint8		b[16];
	size_t		alen = 0;
	size_t		blen = 0;
	EVP_PKEY   *pkey = NULL;

	if (alg == ES_JWT_EDDSA)
	{
		if (parts->x == NULL || strlen(parts->x) != ES_B64URL_LEN(32) ||
			!es_b64url_decode(parts->x, strlen(parts->x), a, &alen) || alen != 32)
			return NULL;
		return EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, a, 32);
	}
	else
	{
		OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
		OSSL_PARAM *params = NULL;
		EVP_PKEY_CTX *ctx = NULL;
		BIGNUM	   *n = NULL;
		BIGNUM	   *e = NULL;
		bool		ok = bld != NULL;

		if (alg == ES_JWT_RS256)
		{
			/* 2048 to 4096 bits, no leading zero byte; e at most 8 bytes */
			ok = ok && parts->n != NULL && parts->e != NULL &&
				strlen(parts->n) <= ES_B64URL_LEN(512) && strlen(parts->e) <= ES_B64URL_LEN(8) &&
				es_b64url_decode(parts->n, strlen(parts->n), a, &alen) &&
				es_b64url_decode(parts->e, strlen(parts->e), b, &blen) &&
				alen >= 256 && a[0] != 0 && blen >= 1 && b[0] != 0;
			ok = ok && (n = BN_bin2bn(a, (int) alen, NULL)) != NULL &&
				(e = BN_bin2bn(b, (int) blen, NULL)) != NULL &&
				OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, n) == 1 &&
				OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, e) == 1;
			ok = ok && (ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL)) != NULL;
		}
		else
		{
			size_t		ylen = 0;

			a[0] = 0x04;
			ok = ok && parts->x != NULL && parts->y != NULL && parts->crv != NULL &&
				strcmp(parts->crv, "P-256") == 0 &&
				strlen(parts->x) == ES_B64URL_LEN(32) && strlen(parts->y) == ES_B64URL_LEN(32) &&
				es_b64url_decode(parts->x, strlen(parts->x), a + 1, &alen) && alen == 32 &&
				es_b64url_decode(parts->y, strlen(parts->y), a + 33, &ylen) && ylen == 32;
			ok = ok &&
				OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0) == 1 &&
				OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, a, 65) == 1;
			ok = ok && (ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL)) != NULL;
		}
		ok = ok && (params = OSSL_PARAM_BLD_to_param(bld)) != NULL &&
			EVP_PKEY_fromdata_init(ctx) == 1 &&
			EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) == 1;
		if (!ok)
		{
			EVP_PKEY_free(pkey);
			pkey = NULL;
		}
		OSSL_PARAM_free(params);
		OSSL_PARAM_BLD_free(bld);
		EVP_PKEY_CTX_free(ctx);
		BN_free(n);
		BN_free(e);
		return pkey;
	}
}

/* Makes the reusable verification context of a cached public key. */
static void
es_prepare_verify(EsKey *key)
{
	bool		ok;

	if (key->alg == ES_JWT_EDDSA)
	{
		key->verify_mdctx = EVP_MD_CTX_new();
		ok = key->verify_mdctx != NULL &&
			EVP_DigestVerifyInit_ex(key->verify_mdctx, NULL, NULL, NULL, NULL, key->pub, NULL) == 1;
	}
	else
	{
		key->verify_ctx = EVP_PKEY_CTX_new_from_pkey(NULL, key->pub, NULL);
		ok = key->verify_ctx != NULL &&
			EVP_PKEY_verify_init(key->verify_ctx) == 1 &&
			(key->alg != ES_JWT_RS256 ||
			 EVP_PKEY_CTX_set_rsa_padding(key->verify_ctx, RSA_PKCS1_PADDING) == 1) &&
			EVP_PKEY_CTX_set_signature_md(key->verify_ctx, EVP_sha256()) == 1;
	}
	if (!ok)
	{
		es_cache_free(key);
		es_openssl_error("preparing signature verification");
	}
}

/* Makes the reusable signing context of a cached private key (takes ownership of priv). */
static void
es_prepare_sign(EsKey *key, EVP_PKEY *priv)
{
	bool		ok;

	key->priv = priv;
	if (key->alg == ES_JWT_EDDSA)
	{
		key->sign_mdctx = EVP_MD_CTX_new();
		ok = key->sign_mdctx != NULL &&
			EVP_DigestSignInit_ex(key->sign_mdctx, NULL, NULL, NULL, NULL, priv, NULL) == 1;
	}
	else
	{
		key->sign_ctx = EVP_PKEY_CTX_new_from_pkey(NULL, priv, NULL);
		ok = key->sign_ctx != NULL &&
			EVP_PKEY_sign_init(key->sign_ctx) == 1 &&
			(key->alg != ES_JWT_RS256 ||
			 EVP_PKEY_CTX_set_rsa_padding(key->sign_ctx, RSA_PKCS1_PADDING) == 1) &&
			EVP_PKEY_CTX_set_signature_md(key->sign_ctx, EVP_sha256()) == 1;
	}
	if (!ok)
	{
		es_cache_free_private(key);
		es_openssl_error("preparing signing");
	}
}

/*
 * Loads the public key of a cached entry from its row's JWK (inside an SPI
 * connection), after checking that the JWK's thumbprint is the kid.
 */
static void
es_load_public(EsKey *key, int alg)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1];
	SPIPlanPtr	plan;
	EsJwkParts	parts;
	char		thumb[ES_KID_LEN + 1];
	TupleDesc	desc;
	HeapTuple	tup;
	char	   *kty;

	plan = es_keep_plan(&es_plan_jwk,
						"SELECT k.public_jwk->>'kty', k.public_jwk->>'crv', k.public_jwk->>'n', "
						"k.public_jwk->>'e', k.public_jwk->>'x', k.public_jwk->>'y' "
						"FROM eventshop.signing_keys k WHERE k.kid = $1",
						1, argtypes);
	values[0] = CStringGetTextDatum(key->kid);
	if (SPI_execute_plan(plan, values, NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "signing key %s disappeared while it was being loaded", key->kid);
	desc = SPI_tuptable->tupdesc;
	tup = SPI_tuptable->vals[0];
	memset(&parts, 0, sizeof(parts));
	kty = SPI_getvalue(tup, desc, 1);
	parts.crv = SPI_getvalue(tup, desc, 2);
	parts.n = SPI_getvalue(tup, desc, 3);
	parts.e = SPI_getvalue(tup, desc, 4);
	parts.x = SPI_getvalue(tup, desc, 5);
	parts.y = SPI_getvalue(tup, desc, 6);
	parts.kty = es_kty(alg);
	if (kty == NULL || strcmp(kty, parts.kty) != 0 ||
		(alg == ES_JWT_EDDSA && (parts.crv == NULL || strcmp(parts.crv, "Ed25519") != 0)) ||
		(alg == ES_JWT_RS256 && (parts.n == NULL || parts.e == NULL)) ||
		(alg != ES_JWT_RS256 && parts.x == NULL) ||
		(alg == ES_JWT_ES256 && (parts.y == NULL || parts.crv == NULL)))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("signing key %s has a malformed public JWK", key->kid)));
	es_thumbprint(&parts, thumb);
	if (strcmp(thumb, key->kid) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("the public JWK of signing key %s does not match its kid", key->kid),
				 errdetail("A kid is the RFC 7638 thumbprint of its public key; the row was altered.")));
	key->pub = es_pkey_from_jwk(alg, &parts);
	if (key->pub == NULL)
	{
		ERR_clear_error();
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("signing key %s has an invalid public key", key->kid)));
	}
	es_prepare_verify(key);
}

/* Unseals and parses the private key of a cached entry, checking it belongs to the kid. */
static void
es_load_private(EsKey *key, bytea *sealed)
{
	uint8		kek[ES_KEY_LEN];
	uint8		der[ES_MAX_PRIVATE_DER];
	const uint8 *blob = (const uint8 *) VARDATA_ANY(sealed);
	size_t		bloblen = VARSIZE_ANY_EXHDR(sealed);
	size_t		derlen;
	const unsigned char *p = der;
	PKCS8_PRIV_KEY_INFO *p8;
	EVP_PKEY   *volatile priv = NULL;	/* volatile: PG_CATCH frees it */
	EsJwkParts	parts;
	char		thumb[ES_KID_LEN + 1];
	bool		opened;

	if (bloblen < ES_SEAL_OVERHEAD || bloblen - ES_SEAL_OVERHEAD > sizeof(der) ||
		blob[0] != ES_SEAL_VERSION)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("the sealed private key of signing key %s is malformed", key->kid)));
	derlen = bloblen - ES_SEAL_OVERHEAD;

	es_derive_master_subkey(ES_HKDF_INFO_KEK, kek);
	opened = es_aead_open(kek, blob + 1, (const uint8 *) key->kid, strlen(key->kid),
						  blob + 1 + ES_GCM_NONCE_LEN, bloblen - 1 - ES_GCM_NONCE_LEN, der);
	explicit_bzero(kek, sizeof(kek));
	if (!opened)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("could not unseal the private key of signing key %s", key->kid),
				 errdetail("The key in eventshop.key_file is not the one the signing key was sealed with, or the sealed key was altered."),
				 errhint("Restore the original key file, or revoke the key and rotate: SELECT eventshop.rotate_signing_keys('%s').",
						 es_jwt_alg_name(key->alg))));

	p8 = d2i_PKCS8_PRIV_KEY_INFO(NULL, &p, (long) derlen);
	if (p8 != NULL)
		priv = EVP_PKCS82PKEY(p8);
	PKCS8_PRIV_KEY_INFO_free(p8);
	explicit_bzero(der, sizeof(der));
	if (priv == NULL)
	{
		ERR_clear_error();
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("the private key of signing key %s is not a valid %s key",
						key->kid, es_jwt_alg_name(key->alg))));
	}

	/* from here the private key exists: free it whatever raises */
	PG_TRY();
	{
		if (!EVP_PKEY_is_a(priv, key->alg == ES_JWT_RS256 ? "RSA" : key->alg == ES_JWT_ES256 ? "EC" : "ED25519") ||
			!es_export_jwk(priv, key->alg, &parts))
		{
			ERR_clear_error();
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("the private key of signing key %s is not a valid %s key",
							key->kid, es_jwt_alg_name(key->alg))));
		}
		es_thumbprint(&parts, thumb);
		if (strcmp(thumb, key->kid) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("the private key of signing key %s does not match its kid", key->kid)));
	}
	PG_CATCH();
	{
		EVP_PKEY_free(priv);
		PG_RE_THROW();
	}
	PG_END_TRY();
	es_prepare_sign(key, priv);
}

/*
 * Looks up a kid for verification: always reads the row's state (so a
 * revocation applies to the next statement), and returns the cached key
 * when the state allows verification (active, or retired less than
 * access_token_ttl ago), loading it on first use. *alg is the key's own
 * algorithm. Returns NULL otherwise, with *status saying why.
 */
EsKey *
es_key_for_verify(const char *kid, EsKeyStatus *status, int *alg)
{
	Oid			argtypes[2] = {TEXTOID, INT4OID};
	Datum		values[2];
	SPIPlanPtr	plan;
	EsKey	   *key = NULL;

	*status = ES_KEY_UNKNOWN;
	*alg = -1;
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	plan = es_keep_plan(&es_plan_status,
						"SELECT " ES_KEY_STATE_SQL("$2") " FROM eventshop.signing_keys k WHERE k.kid = $1",
						2, argtypes);
	values[0] = CStringGetTextDatum(kid);
	values[1] = Int32GetDatum(es_access_token_ttl_s);
	if (SPI_execute_plan(plan, values, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "signing key lookup failed");
	if (SPI_processed == 1)
	{
		bool		isnull;
		Datum		state = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		*status = es_key_state_decode(state, isnull, alg);
	}
	if (*status == ES_KEY_ACTIVE || *status == ES_KEY_RETIRED)
	{
		key = es_cache_find(kid);
		if (key != NULL && key->alg != *alg)
		{
			/* cannot happen with thumbprint kids; never trust a stale entry */
			es_cache_free(key);
			key = NULL;
		}
		if (key == NULL)
			key = es_cache_insert(kid, *alg);
		if (key->pub == NULL)
			es_load_public(key, *alg);
	}
	SPI_finish();
	return key;
}

/*
 * The EsKeyStatus and algorithm (*key_alg, -1 if none of ours) of an
 * ES_KEY_STATE_SQL value; NULL (no row) is ES_KEY_UNKNOWN. A row whose
 * algorithm is none of ours counts as revoked.
 */
EsKeyStatus
es_key_state_decode(Datum state, bool isnull, int *key_alg)
{
	int32		code = isnull ? 0 : DatumGetInt32(state);
	EsKeyStatus status = isnull ? ES_KEY_UNKNOWN : (EsKeyStatus) (code / 4);

	*key_alg = (isnull || code % 4 == 3) ? -1 : code % 4;
	if (status != ES_KEY_UNKNOWN && *key_alg < 0)
		status = ES_KEY_REVOKED;
	return status;
}

/*
 * Returns the cached key that signs for an algorithm now (the row in state
 * active), loading and unsealing it on first use; NULL when the algorithm
 * has no active key.
 */
EsKey *
es_active_signing_key(int alg)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1];
	SPIPlanPtr	plan;
	EsKey	   *key = NULL;
	char		kid[ES_KID_LEN + 1];
	bool		isnull;
	bool		have_active = false;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	plan = es_keep_plan(&es_plan_active,
						"SELECT k.kid FROM eventshop.signing_keys k WHERE k.alg = $1 AND k.state = 'active'",
						1, argtypes);
	values[0] = CStringGetTextDatum(es_jwt_alg_name(alg));
	if (SPI_execute_plan(plan, values, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "active signing key lookup failed");
	if (SPI_processed == 1)
	{
		text	   *t = DatumGetTextPP(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));

		if (isnull || VARSIZE_ANY_EXHDR(t) != ES_KID_LEN)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("the active %s signing key has a malformed kid", es_jwt_alg_name(alg))));
		memcpy(kid, VARDATA_ANY(t), ES_KID_LEN);
		kid[ES_KID_LEN] = '\0';
		have_active = true;
	}
	/* after a rotation or revocation: only the active key keeps its private half */
	es_cache_drop_private_except(alg, have_active ? kid : NULL);
	if (have_active)
	{
		key = es_cache_find(kid);
		if (key != NULL && key->alg != alg)
		{
			es_cache_free(key);
			key = NULL;
		}
		if (key == NULL)
			key = es_cache_insert(kid, alg);
		if (key->priv == NULL)
		{
			Oid			argtypes2[1] = {TEXTOID};
			Datum		d;

			plan = es_keep_plan(&es_plan_sealed,
								"SELECT k.private_key_sealed FROM eventshop.signing_keys k "
								"WHERE k.kid = $1 AND k.state = 'active'",
								1, argtypes2);
			values[0] = CStringGetTextDatum(kid);
			if (SPI_execute_plan(plan, values, NULL, true, 1) != SPI_OK_SELECT)
				elog(ERROR, "signing key lookup failed");
			if (SPI_processed != 1)
				elog(ERROR, "signing key %s disappeared while it was being loaded", kid);
			d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
			if (isnull)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("the active signing key %s has no private key", kid)));
			es_load_private(key, DatumGetByteaPP(d));
		}
	}
	SPI_finish();
	return key;
}

/*
 * _generate_signing_key(alg) -> (kid, public_jwk, private_key_sealed): a
 * fresh key pair, its public JWK, and its private key sealed under the KEK.
 * The SQL functions store the row; this one never writes.
 */
Datum
eventshop_generate_signing_key(PG_FUNCTION_ARGS)
{
	text	   *alg_text = PG_GETARG_TEXT_PP(0);
	int			alg = es_jwt_alg_from_name(VARDATA_ANY(alg_text), VARSIZE_ANY_EXHDR(alg_text));
	uint8		kek[ES_KEY_LEN];
	/* OpenSSL objects holding the private key: volatile, as PG_CATCH frees them */
	EVP_PKEY   *volatile pkey = NULL;
	PKCS8_PRIV_KEY_INFO *volatile p8 = NULL;
	unsigned char *volatile der = NULL;
	volatile int derlen = 0;
	EsJwkParts	parts;
	char		kid[ES_KID_LEN + 1];
	bytea	   *sealed;
	uint8	   *blob;
	StringInfoData jwk;
	TupleDesc	tupdesc;
	Datum		values[3];
	bool		nulls[3] = {false, false, false};

	if (alg < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unsupported signing algorithm"),
				 errhint("Use RS256, ES256 or EdDSA (case-sensitive).")));
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "_generate_signing_key must return a record");

	/* the KEK and the output buffer first: a missing key file must fail before any key exists */
	es_derive_master_subkey(ES_HKDF_INFO_KEK, kek);
	sealed = palloc(VARHDRSZ + ES_SEAL_OVERHEAD + ES_MAX_PRIVATE_DER);
	blob = (uint8 *) VARDATA(sealed);

	/*
	 * From key generation until the DER is sealed, anything that raises
	 * (OpenSSL failures, palloc, the CSPRNG) goes through PG_CATCH, which
	 * frees the key objects and cleanses the DER and the KEK.
	 */
	PG_TRY();
	{
		unsigned char *der_out = NULL;
		int			n;
		bool		ok;

		if (alg == ES_JWT_RS256)
			pkey = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t) 2048);
		else if (alg == ES_JWT_ES256)
			pkey = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
		else
			pkey = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
		ok = pkey != NULL && (p8 = EVP_PKEY2PKCS8(pkey)) != NULL;
		if (ok)
		{
			n = i2d_PKCS8_PRIV_KEY_INFO(p8, &der_out);
			der = der_out;
			derlen = n;
			ok = n > 0 && n <= ES_MAX_PRIVATE_DER;
		}
		ok = ok && es_export_jwk(pkey, alg, &parts);
		EVP_PKEY_free(pkey);
		pkey = NULL;
		PKCS8_PRIV_KEY_INFO_free(p8);
		p8 = NULL;
		if (!ok)
			es_openssl_error("generating a signing key");
		es_thumbprint(&parts, kid);

		SET_VARSIZE(sealed, VARHDRSZ + ES_SEAL_OVERHEAD + derlen);
		blob[0] = ES_SEAL_VERSION;
		es_random_bytes(blob + 1, ES_GCM_NONCE_LEN);
		es_aead_seal(kek, blob + 1, (const uint8 *) kid, strlen(kid), der, derlen,
					 blob + 1 + ES_GCM_NONCE_LEN);
	}
	PG_CATCH();
	{
		EVP_PKEY_free(pkey);
		PKCS8_PRIV_KEY_INFO_free(p8);
		if (der != NULL)
			OPENSSL_clear_free(der, derlen);
		explicit_bzero(kek, sizeof(kek));
		PG_RE_THROW();
	}
	PG_END_TRY();
	OPENSSL_clear_free(der, derlen);
	explicit_bzero(kek, sizeof(kek));

	initStringInfo(&jwk);
	appendStringInfo(&jwk, "{\"kty\":\"%s\",\"kid\":\"%s\",\"alg\":\"%s\",\"use\":\"sig\"",
					 parts.kty, kid, es_jwt_alg_name(alg));
	if (alg == ES_JWT_RS256)
		appendStringInfo(&jwk, ",\"n\":\"%s\",\"e\":\"%s\"}", parts.n, parts.e);
	else if (alg == ES_JWT_ES256)
		appendStringInfo(&jwk, ",\"crv\":\"%s\",\"x\":\"%s\",\"y\":\"%s\"}", parts.crv, parts.x, parts.y);
	else
		appendStringInfo(&jwk, ",\"crv\":\"%s\",\"x\":\"%s\"}", parts.crv, parts.x);

	values[0] = CStringGetTextDatum(kid);
	values[1] = DirectFunctionCall1(jsonb_in, CStringGetDatum(jwk.data));
	values[2] = PointerGetDatum(sealed);
	tupdesc = BlessTupleDesc(tupdesc);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * _signing_key_cache() -> (kid, alg, has_public_key, has_private_key): the
 * keys this backend holds parsed, so that tests (and an operator) can see
 * that retired and revoked keys no longer keep their private half here.
 */
Datum
eventshop_signing_key_cache(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	for (int i = 0; i < ES_KEY_CACHE_SIZE; i++)
	{
		Datum		values[4];
		bool		nulls[4] = {false, false, false, false};

		if (es_keys[i].kid[0] == '\0')
			continue;
		values[0] = CStringGetTextDatum(es_keys[i].kid);
		values[1] = CStringGetTextDatum(es_jwt_alg_name(es_keys[i].alg));
		values[2] = BoolGetDatum(es_keys[i].pub != NULL);
		values[3] = BoolGetDatum(es_keys[i].priv != NULL);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
