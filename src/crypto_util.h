/*
 * crypto_util.h
 *		Small cryptographic building blocks shared by the auth module:
 *		base64url, hex, SHA-256, HMAC, HKDF, AES-256-GCM, key files and
 *		constant-time comparison, all on OpenSSL 3.
 */
#ifndef EVENTSHOP_CRYPTO_UTIL_H
#define EVENTSHOP_CRYPTO_UTIL_H

#define ES_SHA256_LEN		32
#define ES_KEY_LEN			32
#define ES_GCM_NONCE_LEN	12
#define ES_GCM_TAG_LEN		16

/* HKDF info strings of the keys derived from eventshop.key_file. */
#define ES_HKDF_INFO_KEK	"eventshop kek v1"
#define ES_HKDF_INFO_PII	"eventshop pii v1"

/* Length of the base64url (unpadded) form of n bytes. */
#define ES_B64URL_LEN(n)	(((n) / 3) * 4 + (((n) % 3) ? ((n) % 3) + 1 : 0))

extern size_t es_b64url_encode(const uint8 *src, size_t len, char *dst);
extern bool es_b64url_decode(const char *src, size_t len, uint8 *dst, size_t *dstlen);
extern bool es_hex_decode(const char *src, size_t len, uint8 *dst);

extern void es_sha256(const void *data, size_t len, uint8 *out);
extern void es_hmac_sha256(const uint8 *key, size_t keylen, const void *data, size_t len,
						   uint8 *out);
extern void es_hkdf_sha256(const uint8 *ikm, size_t ikmlen, const uint8 *salt, size_t saltlen,
						   const char *info, uint8 *out, size_t outlen);
extern bool es_ct_equal(const void *a, const void *b, size_t len);
extern void es_random_bytes(uint8 *dst, size_t len);

extern void es_aead_seal(const uint8 *key, const uint8 *nonce, const uint8 *aad, size_t aadlen,
						 const uint8 *plain, size_t len, uint8 *out);
extern bool es_aead_open(const uint8 *key, const uint8 *nonce, const uint8 *aad, size_t aadlen,
						 const uint8 *sealed, size_t len, uint8 *out);

extern void es_read_hex_key_file(const char *path, const char *setting, uint8 *key);
extern void es_derive_master_subkey(const char *info, uint8 *key);

extern void es_openssl_error(const char *what) pg_attribute_noreturn();

#endif							/* EVENTSHOP_CRYPTO_UTIL_H */
