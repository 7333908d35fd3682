/*
 * crypto_util.c
 *		Cryptographic building blocks of the auth module (base64url, HMAC,
 *		HKDF, AES-256-GCM, key files, constant-time comparison) and the small
 *		SQL-callable helpers built on them: _pii_hash, _random_token and
 *		_token_hash.
 *
 * Everything goes through OpenSSL 3. Secrets read from key files live on the
 * stack only as long as needed and are wiped with explicit_bzero; no error
 * message carries key material or a key file's path.
 */
#include "postgres.h"

#include <fcntl.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "fmgr.h"
#include "storage/fd.h"
#include "utils/builtins.h"

#include "config.h"
#include "crypto_util.h"

/* Longest PII value hashed, and the hash's length in base64url characters. */
#define ES_PII_MAX_BYTES	4096
#define ES_PII_HASH_CHARS	22

PG_FUNCTION_INFO_V1(eventshop_pii_hash);
PG_FUNCTION_INFO_V1(eventshop_random_token);
PG_FUNCTION_INFO_V1(eventshop_token_hash);

static const char es_b64url_alphabet[] =
"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* Value of each base64url character, -1 for anything else (built once). */
static int8 es_b64url_value[256];
static bool es_b64url_ready = false;

static const EVP_MD *es_md_sha256 = NULL;

static const EVP_MD *es_sha256_md(void);

/* Encodes len bytes as unpadded base64url into dst; returns the characters written (no NUL). */
size_t
es_b64url_encode(const uint8 *src, size_t len, char *dst)
{
	char	   *p = dst;
	size_t		i = 0;

	for (; i + 3 <= len; i += 3)
	{
		uint32		v = ((uint32) src[i] << 16) | ((uint32) src[i + 1] << 8) | src[i + 2];

		*p++ = es_b64url_alphabet[(v >> 18) & 63];
		*p++ = es_b64url_alphabet[(v >> 12) & 63];
		*p++ = es_b64url_alphabet[(v >> 6) & 63];
		*p++ = es_b64url_alphabet[v & 63];
	}
	if (len - i == 1)
	{
		uint32		v = (uint32) src[i] << 16;

		*p++ = es_b64url_alphabet[(v >> 18) & 63];
		*p++ = es_b64url_alphabet[(v >> 12) & 63];
	}
	else if (len - i == 2)
	{
		uint32		v = ((uint32) src[i] << 16) | ((uint32) src[i + 1] << 8);

		*p++ = es_b64url_alphabet[(v >> 18) & 63];
		*p++ = es_b64url_alphabet[(v >> 12) & 63];
		*p++ = es_b64url_alphabet[(v >> 6) & 63];
	}
	return p - dst;
}

/*
 * Decodes strict unpadded base64url: only the 64 URL-safe characters, no
 * '=', no length of 1 mod 4, and unused trailing bits must be zero, so that
 * every byte string has exactly one accepted encoding (no malleability).
 * dst needs room for len * 3 / 4 bytes.
 */
bool
es_b64url_decode(const char *src, size_t len, uint8 *dst, size_t *dstlen)
{
	uint8	   *p = dst;
	size_t		i = 0;
	int			rem = len % 4;

	if (!es_b64url_ready)
	{
		memset(es_b64url_value, -1, sizeof(es_b64url_value));
		for (i = 0; i < 64; i++)
			es_b64url_value[(uint8) es_b64url_alphabet[i]] = (int8) i;
		es_b64url_ready = true;
		i = 0;
	}
	if (rem == 1)
		return false;
	for (; i + 4 <= len; i += 4)
	{
		int			a = es_b64url_value[(uint8) src[i]];
		int			b = es_b64url_value[(uint8) src[i + 1]];
		int			c = es_b64url_value[(uint8) src[i + 2]];
		int			d = es_b64url_value[(uint8) src[i + 3]];
		uint32		v;

		if ((a | b | c | d) < 0)
			return false;
		v = ((uint32) a << 18) | ((uint32) b << 12) | ((uint32) c << 6) | (uint32) d;
		*p++ = (v >> 16) & 0xff;
		*p++ = (v >> 8) & 0xff;
		*p++ = v & 0xff;
	}
	if (rem)
	{
		int			a = es_b64url_value[(uint8) src[i]];
		int			b = es_b64url_value[(uint8) src[i + 1]];
		int			c = rem == 3 ? es_b64url_value[(uint8) src[i + 2]] : 0;

		if ((a | b | c) < 0)
			return false;
		if (rem == 2)
		{
			if (b & 0x0f)
				return false;	/* non-canonical trailing bits */
			*p++ = (uint8) ((a << 2) | (b >> 4));
		}
		else
		{
			if (c & 0x03)
				return false;
			*p++ = (uint8) ((a << 2) | (b >> 4));
			*p++ = (uint8) (((b & 0x0f) << 4) | (c >> 2));
		}
	}
	*dstlen = p - dst;
	return true;
}

/* Decodes exactly len hex characters (either case) into len / 2 bytes; false on anything else. */
bool
es_hex_decode(const char *src, size_t len, uint8 *dst)
{
	size_t		i;

	if (len % 2)
		return false;
	for (i = 0; i < len; i++)
	{
		char		ch = src[i];
		int			v;

		if (ch >= '0' && ch <= '9')
			v = ch - '0';
		else if (ch >= 'a' && ch <= 'f')
			v = ch - 'a' + 10;
		else if (ch >= 'A' && ch <= 'F')
			v = ch - 'A' + 10;
		else
			return false;
		if (i % 2 == 0)
			dst[i / 2] = (uint8) (v << 4);
		else
			dst[i / 2] |= (uint8) v;
	}
	return true;
}

/* Returns the SHA-256 implementation, fetched from the provider once per backend. */
static const EVP_MD *
es_sha256_md(void)
{
	if (es_md_sha256 == NULL)
	{
		es_md_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
		if (es_md_sha256 == NULL)
			es_openssl_error("loading SHA-256");
	}
	return es_md_sha256;
}

/* SHA-256 of a buffer. */
void
es_sha256(const void *data, size_t len, uint8 *out)
{
	if (!EVP_Digest(data, len, out, NULL, es_sha256_md(), NULL))
		es_openssl_error("SHA-256");
}

/* HMAC-SHA256 of a buffer under a key. */
void
es_hmac_sha256(const uint8 *key, size_t keylen, const void *data, size_t len, uint8 *out)
{
	unsigned int outlen = ES_SHA256_LEN;

	if (HMAC(es_sha256_md(), key, (int) keylen, data, len, out, &outlen) == NULL)
		es_openssl_error("HMAC-SHA256");
}

/*
 * HKDF-SHA256 (RFC 5869) written over HMAC, because it is two lines of
 * HMAC and avoids fetching a KDF object per call. outlen <= 255 * 32.
 */
void
es_hkdf_sha256(const uint8 *ikm, size_t ikmlen, const uint8 *salt, size_t saltlen,
			   const char *info, uint8 *out, size_t outlen)
{
	uint8		zero_salt[ES_SHA256_LEN] = {0};
	uint8		prk[ES_SHA256_LEN];
	uint8		t[ES_SHA256_LEN];
	uint8		block[ES_SHA256_LEN + 256 + 1];
	size_t		infolen = strlen(info);
	size_t		done = 0;
	size_t		tlen = 0;
	uint8		counter = 1;

	Assert(infolen <= 256 && outlen <= 255 * ES_SHA256_LEN);
	if (salt == NULL || saltlen == 0)
	{
		salt = zero_salt;
		saltlen = sizeof(zero_salt);
	}
	es_hmac_sha256(salt, saltlen, ikm, ikmlen, prk);
	while (done < outlen)
	{
		size_t		n;

		memcpy(block, t, tlen);
		memcpy(block + tlen, info, infolen);
		block[tlen + infolen] = counter++;
		es_hmac_sha256(prk, sizeof(prk), block, tlen + infolen + 1, t);
		tlen = ES_SHA256_LEN;
		n = Min(outlen - done, (size_t) ES_SHA256_LEN);
		memcpy(out + done, t, n);
		done += n;
	}
	explicit_bzero(prk, sizeof(prk));
	explicit_bzero(t, sizeof(t));
	explicit_bzero(block, sizeof(block));
}

/* Compares two buffers in time independent of where they differ. */
bool
es_ct_equal(const void *a, const void *b, size_t len)
{
	return CRYPTO_memcmp(a, b, len) == 0;
}

/* Fills a buffer from the CSPRNG, or fails loudly. */
void
es_random_bytes(uint8 *dst, size_t len)
{
	if (RAND_bytes(dst, (int) len) != 1)
		es_openssl_error("generating random bytes");
}

/* AES-256-GCM: writes len bytes of ciphertext followed by the 16-byte tag to out. */
void
es_aead_seal(const uint8 *key, const uint8 *nonce, const uint8 *aad, size_t aadlen,
			 const uint8 *plain, size_t len, uint8 *out)
{
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	int			n;
	bool		ok;

	ok = ctx != NULL &&
		EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, nonce) == 1 &&
		(aadlen == 0 || EVP_EncryptUpdate(ctx, NULL, &n, aad, (int) aadlen) == 1) &&
		EVP_EncryptUpdate(ctx, out, &n, plain, (int) len) == 1 &&
		EVP_EncryptFinal_ex(ctx, out + n, &n) == 1 &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, ES_GCM_TAG_LEN, out + len) == 1;
	EVP_CIPHER_CTX_free(ctx);
	if (!ok)
		es_openssl_error("AES-256-GCM encryption");
}

/* Opens what es_aead_seal wrote (len includes the tag); false when it was altered or the key is wrong. */
bool
es_aead_open(const uint8 *key, const uint8 *nonce, const uint8 *aad, size_t aadlen,
			 const uint8 *sealed, size_t len, uint8 *out)
{
	EVP_CIPHER_CTX *ctx;
	size_t		ctlen;
	int			n;
	bool		ok;

	if (len < ES_GCM_TAG_LEN)
		return false;
	ctlen = len - ES_GCM_TAG_LEN;
	ctx = EVP_CIPHER_CTX_new();
	ok = ctx != NULL &&
		EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, nonce) == 1 &&
		(aadlen == 0 || EVP_DecryptUpdate(ctx, NULL, &n, aad, (int) aadlen) == 1) &&
		EVP_DecryptUpdate(ctx, out, &n, sealed, (int) ctlen) == 1 &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, ES_GCM_TAG_LEN,
							(void *) (sealed + ctlen)) == 1 &&
		EVP_DecryptFinal_ex(ctx, out + n, &n) == 1;
	EVP_CIPHER_CTX_free(ctx);
	ERR_clear_error();
	if (!ok)
		explicit_bzero(out, ctlen);
	return ok;
}

/*
 * Reads a 32-byte key stored as 64 hex characters (plus an optional
 * newline) from the file named by a setting. Errors name the setting, never
 * the path or the content: the message can reach application roles.
 */
void
es_read_hex_key_file(const char *path, const char *setting, uint8 *key)
{
	char		buf[ES_KEY_LEN * 2 + 4];
	int			fd;
	ssize_t		n;
	size_t		len;
	bool		ok;

	if (path == NULL || path[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("%s is not set", setting),
				 errhint("Create a key file with \"openssl rand -hex 32 > file\" (mode 0600, owned by the server's user), set %s to its absolute path and reload the configuration.",
						 setting)));

	fd = OpenTransientFile(path, O_RDONLY | PG_BINARY);
	if (fd < 0)
	{
		int			save_errno = errno;

		ereport(ERROR,
				(errcode(save_errno == ENOENT ? ERRCODE_UNDEFINED_FILE : ERRCODE_SYSTEM_ERROR),
				 errmsg("could not open the key file named by %s: %s", setting, strerror(save_errno)),
				 errhint("Create it with \"openssl rand -hex 32 > file\" (mode 0600, owned by the server's user) or correct %s, then reload the configuration.",
						 setting)));
	}
	n = read(fd, buf, sizeof(buf));
	if (n < 0)
	{
		int			save_errno = errno;

		CloseTransientFile(fd);
		ereport(ERROR,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("could not read the key file named by %s: %s", setting, strerror(save_errno))));
	}
	CloseTransientFile(fd);

	len = (size_t) n;
	if (len > 0 && buf[len - 1] == '\n')
		len--;
	if (len > 0 && buf[len - 1] == '\r')
		len--;
	ok = len == ES_KEY_LEN * 2 && es_hex_decode(buf, len, key);
	explicit_bzero(buf, sizeof(buf));
	if (!ok)
	{
		explicit_bzero(key, ES_KEY_LEN);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the key file named by %s is malformed", setting),
				 errdetail("It must hold exactly 64 hexadecimal characters (32 bytes), optionally followed by a newline."),
				 errhint("Create it with \"openssl rand -hex 32 > file\".")));
	}
}

/*
 * Derives a 32-byte subkey of the master secret in eventshop.key_file. The
 * file is read on every call (a few microseconds, and only on slow paths),
 * so a replaced file or a reloaded setting applies at once and the master
 * secret is never kept in backend memory.
 */
void
es_derive_master_subkey(const char *info, uint8 *key)
{
	uint8		master[ES_KEY_LEN];

	es_read_hex_key_file(es_key_file, "eventshop.key_file", master);
	es_hkdf_sha256(master, sizeof(master), NULL, 0, info, key, ES_KEY_LEN);
	explicit_bzero(master, sizeof(master));
}

/* Raises an internal error with OpenSSL's reason, after emptying its error queue. */
void
es_openssl_error(const char *what)
{
	unsigned long e = ERR_get_error();
	char		reason[256];

	if (e != 0)
		ERR_error_string_n(e, reason, sizeof(reason));
	else
		strlcpy(reason, "no further information", sizeof(reason));
	ERR_clear_error();
	ereport(ERROR,
			(errcode(ERRCODE_INTERNAL_ERROR),
			 errmsg("%s failed", what),
			 errdetail("OpenSSL: %s", reason)));
}

/*
 * _pii_hash(value): HMAC-SHA256 under the PII key, base64url, 22 characters
 * (132 bits), because events need a stable pseudonym for an e-mail address
 * that cannot be reversed by hashing guessed addresses without the key.
 */
Datum
eventshop_pii_hash(PG_FUNCTION_ARGS)
{
	text	   *value = PG_GETARG_TEXT_PP(0);
	uint8		key[ES_KEY_LEN];
	uint8		mac[ES_SHA256_LEN];
	char		out[ES_B64URL_LEN(ES_SHA256_LEN)];

	if (VARSIZE_ANY_EXHDR(value) > ES_PII_MAX_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("value to hash is too long"),
				 errdetail("At most %d bytes are accepted.", ES_PII_MAX_BYTES)));
	es_derive_master_subkey(ES_HKDF_INFO_PII, key);
	es_hmac_sha256(key, sizeof(key), VARDATA_ANY(value), VARSIZE_ANY_EXHDR(value), mac);
	explicit_bzero(key, sizeof(key));
	es_b64url_encode(mac, sizeof(mac), out);
	PG_RETURN_TEXT_P(cstring_to_text_with_len(out, ES_PII_HASH_CHARS));
}

/* _random_token(nbytes): base64url of nbytes CSPRNG bytes, for refresh, reset and magic-link tokens. */
Datum
eventshop_random_token(PG_FUNCTION_ARGS)
{
	int32		nbytes = PG_GETARG_INT32(0);
	uint8		buf[64];
	char		out[ES_B64URL_LEN(64)];
	size_t		len;

	if (nbytes < 16 || nbytes > 64)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("token length must be between 16 and 64 bytes")));
	es_random_bytes(buf, nbytes);
	len = es_b64url_encode(buf, nbytes, out);
	explicit_bzero(buf, sizeof(buf));
	PG_RETURN_TEXT_P(cstring_to_text_with_len(out, len));
}

/* _token_hash(token): SHA-256 of a token, the only form in which tokens are stored. */
Datum
eventshop_token_hash(PG_FUNCTION_ARGS)
{
	text	   *token = PG_GETARG_TEXT_PP(0);
	bytea	   *result = palloc(VARHDRSZ + ES_SHA256_LEN);

	SET_VARSIZE(result, VARHDRSZ + ES_SHA256_LEN);
	es_sha256(VARDATA_ANY(token), VARSIZE_ANY_EXHDR(token), (uint8 *) VARDATA(result));
	PG_RETURN_BYTEA_P(result);
}
