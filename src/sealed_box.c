/*
 * sealed_box.c
 *		_seal and _open_sealed: anonymous public-key encryption of secrets
 *		(password-reset and magic-link tokens) for the notifier.
 *
 * Format, base64url without padding:
 *
 *   0x01 || E (32, ephemeral X25519 public key) || C || T (16)
 *
 * shared = X25519(e, R) where R is eventshop.seal_public_key;
 * key (32) || nonce (12) = HKDF-SHA256(ikm = shared, salt = E || R,
 * info = "eventshop seal v1"); C || T = AES-256-GCM(key, nonce,
 * aad = 0x01 || E, plaintext). Every box has a fresh ephemeral key, so the
 * derived nonce is never reused under a key. Opening needs the private key
 * in eventshop.seal_private_key_file; any alteration makes it fail.
 */
#include "postgres.h"

#include <openssl/err.h>
#include <openssl/evp.h>

#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"

#include "config.h"
#include "crypto_util.h"
#include "sealed_box.h"

#define ES_X25519_LEN		32
#define ES_BOX_VERSION		0x01
#define ES_BOX_HEADER		(1 + ES_X25519_LEN)
#define ES_BOX_OVERHEAD		(ES_BOX_HEADER + ES_GCM_TAG_LEN)

PG_FUNCTION_INFO_V1(eventshop_seal);
PG_FUNCTION_INFO_V1(eventshop_open_sealed);

static bool es_x25519(EVP_PKEY *own, const uint8 *peer_pub, uint8 *shared);
static void es_box_keys(const uint8 *shared, const uint8 *eph_pub, const uint8 *recipient_pub,
						uint8 *key, uint8 *nonce);

/* X25519 between our key and a peer's raw public key; false for a low-order (all-zero) result. */
static bool
es_x25519(EVP_PKEY *own, const uint8 *peer_pub, uint8 *shared)
{
	EVP_PKEY   *peer = EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, NULL, peer_pub, ES_X25519_LEN);
	EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, own, NULL);
	size_t		len = ES_X25519_LEN;
	uint8		zero[ES_X25519_LEN] = {0};
	bool		ok;

	ok = peer != NULL && ctx != NULL &&
		EVP_PKEY_derive_init(ctx) == 1 &&
		EVP_PKEY_derive_set_peer(ctx, peer) == 1 &&
		EVP_PKEY_derive(ctx, shared, &len) == 1 &&
		len == ES_X25519_LEN &&
		!es_ct_equal(shared, zero, ES_X25519_LEN);
	EVP_PKEY_CTX_free(ctx);
	EVP_PKEY_free(peer);
	ERR_clear_error();
	return ok;
}

/* Derives the box's AES key and nonce from the shared secret and both public keys. */
static void
es_box_keys(const uint8 *shared, const uint8 *eph_pub, const uint8 *recipient_pub,
			uint8 *key, uint8 *nonce)
{
	uint8		salt[2 * ES_X25519_LEN];
	uint8		okm[ES_KEY_LEN + ES_GCM_NONCE_LEN];

	memcpy(salt, eph_pub, ES_X25519_LEN);
	memcpy(salt + ES_X25519_LEN, recipient_pub, ES_X25519_LEN);
	es_hkdf_sha256(shared, ES_X25519_LEN, salt, sizeof(salt), ES_HKDF_INFO_SEAL, okm, sizeof(okm));
	memcpy(key, okm, ES_KEY_LEN);
	memcpy(nonce, okm + ES_KEY_LEN, ES_GCM_NONCE_LEN);
	explicit_bzero(okm, sizeof(okm));
}

/* _seal(plaintext) -> sealed box for the holder of eventshop.seal_private_key_file. */
Datum
eventshop_seal(PG_FUNCTION_ARGS)
{
	text	   *plain = PG_GETARG_TEXT_PP(0);
	size_t		len = VARSIZE_ANY_EXHDR(plain);
	uint8		recipient[ES_X25519_LEN + 2];
	size_t		rlen = 0;
	EVP_PKEY   *eph;
	uint8		shared[ES_X25519_LEN];
	uint8		key[ES_KEY_LEN];
	uint8		nonce[ES_GCM_NONCE_LEN];
	uint8	   *box;
	size_t		boxlen;
	size_t		elen = ES_X25519_LEN;
	text	   *result;
	bool		ok;

	if (es_seal_public_key == NULL || es_seal_public_key[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("eventshop.seal_public_key is not set"),
				 errhint("Generate a key pair with \"openssl genpkey -algorithm X25519\", set eventshop.seal_public_key to the raw public key in base64url and eventshop.seal_private_key_file to a file with the raw private key in hex, then reload.")));
	if (!es_b64url_decode(es_seal_public_key, strlen(es_seal_public_key), recipient, &rlen) ||
		rlen != ES_X25519_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("eventshop.seal_public_key is not a base64url X25519 public key")));
	if (len > ES_SEAL_MAX_PLAINTEXT)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("value to seal is too long"),
				 errdetail("At most %d bytes can be sealed.", ES_SEAL_MAX_PLAINTEXT)));

	boxlen = ES_BOX_OVERHEAD + len;
	box = palloc(boxlen);
	box[0] = ES_BOX_VERSION;
	eph = EVP_PKEY_Q_keygen(NULL, NULL, "X25519");
	ok = eph != NULL &&
		EVP_PKEY_get_raw_public_key(eph, box + 1, &elen) == 1 && elen == ES_X25519_LEN &&
		es_x25519(eph, recipient, shared);
	EVP_PKEY_free(eph);
	if (!ok)
		es_openssl_error("sealing a secret");

	es_box_keys(shared, box + 1, recipient, key, nonce);
	explicit_bzero(shared, sizeof(shared));
	es_aead_seal(key, nonce, box, ES_BOX_HEADER, (const uint8 *) VARDATA_ANY(plain), len,
				 box + ES_BOX_HEADER);
	explicit_bzero(key, sizeof(key));

	result = palloc(VARHDRSZ + ES_B64URL_LEN(boxlen));
	SET_VARSIZE(result, VARHDRSZ + es_b64url_encode(box, boxlen, VARDATA(result)));
	PG_RETURN_TEXT_P(result);
}

/* _open_sealed(sealed) -> plaintext, with the private key in eventshop.seal_private_key_file. */
Datum
eventshop_open_sealed(PG_FUNCTION_ARGS)
{
	text	   *sealed = PG_GETARG_TEXT_PP(0);
	size_t		slen = VARSIZE_ANY_EXHDR(sealed);
	uint8		priv_raw[ES_KEY_LEN];
	uint8		own_pub[ES_X25519_LEN];
	size_t		own_len = ES_X25519_LEN;
	EVP_PKEY   *priv;
	uint8		shared[ES_X25519_LEN];
	uint8		key[ES_KEY_LEN];
	uint8		nonce[ES_GCM_NONCE_LEN];
	uint8	   *box;
	size_t		boxlen = 0;
	text	   *result;
	bool		ok;

	if (slen > ES_B64URL_LEN(ES_BOX_OVERHEAD + ES_SEAL_MAX_PLAINTEXT))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("sealed value is too long")));
	box = palloc(slen);
	if (!es_b64url_decode(VARDATA_ANY(sealed), slen, box, &boxlen) ||
		boxlen < ES_BOX_OVERHEAD || box[0] != ES_BOX_VERSION)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("sealed value is malformed")));

	es_read_hex_key_file(es_seal_private_key_file, "eventshop.seal_private_key_file", priv_raw);
	priv = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, NULL, priv_raw, ES_KEY_LEN);
	explicit_bzero(priv_raw, sizeof(priv_raw));
	ok = priv != NULL &&
		EVP_PKEY_get_raw_public_key(priv, own_pub, &own_len) == 1 &&
		es_x25519(priv, box + 1, shared);
	EVP_PKEY_free(priv);
	ERR_clear_error();
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("sealed value could not be opened"),
				 errdetail("Its ephemeral key is invalid.")));

	es_box_keys(shared, box + 1, own_pub, key, nonce);
	explicit_bzero(shared, sizeof(shared));
	result = palloc(VARHDRSZ + boxlen - ES_BOX_OVERHEAD + 1);
	ok = es_aead_open(key, nonce, box, ES_BOX_HEADER, box + ES_BOX_HEADER,
					  boxlen - ES_BOX_HEADER, (uint8 *) VARDATA(result));
	explicit_bzero(key, sizeof(key));
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("sealed value could not be opened"),
				 errdetail("It was altered, or sealed to another key than eventshop.seal_private_key_file's.")));
	SET_VARSIZE(result, VARHDRSZ + boxlen - ES_BOX_OVERHEAD);
	if (!pg_verifymbstr(VARDATA(result), boxlen - ES_BOX_OVERHEAD, true))
		ereport(ERROR,
				(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
				 errmsg("sealed value is not valid text in the database encoding")));
	PG_RETURN_TEXT_P(result);
}
