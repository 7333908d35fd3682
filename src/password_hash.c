/*
 * password_hash.c
 *		argon2id password hashing through libargon2, with the OWASP minimum
 *		parameters (19 MiB, t=2, p=1). Hashes are PHC strings
 *		($argon2id$v=19$m=...,t=...,p=...$salt$hash) so that parameters can
 *		rise later without breaking stored hashes.
 */
#include "postgres.h"

#include <argon2.h>

#include "fmgr.h"
#include "port.h"
#include "utils/builtins.h"

#define ES_ARGON2_MEMORY_KIB	19456
#define ES_ARGON2_ITERATIONS	2
#define ES_ARGON2_LANES			1
#define ES_ARGON2_SALT_LEN		16
#define ES_ARGON2_HASH_LEN		32
#define ES_MAX_PASSWORD_BYTES	4096

PG_FUNCTION_INFO_V1(eventshop_hash_password);
PG_FUNCTION_INFO_V1(eventshop_verify_password);

static void es_check_password_size(const text *password);

/* Returns an argon2id PHC string for the password, with a fresh random salt. */
Datum
eventshop_hash_password(PG_FUNCTION_ARGS)
{
	text	   *password = PG_GETARG_TEXT_PP(0);
	uint8		salt[ES_ARGON2_SALT_LEN];
	size_t		encoded_len;
	char	   *encoded;
	int			rc;

	es_check_password_size(password);
	if (!pg_strong_random(salt, sizeof(salt)))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate a random salt")));

	encoded_len = argon2_encodedlen(ES_ARGON2_ITERATIONS, ES_ARGON2_MEMORY_KIB, ES_ARGON2_LANES,
									ES_ARGON2_SALT_LEN, ES_ARGON2_HASH_LEN, Argon2_id);
	encoded = palloc(encoded_len);
	rc = argon2id_hash_encoded(ES_ARGON2_ITERATIONS, ES_ARGON2_MEMORY_KIB, ES_ARGON2_LANES,
							   VARDATA_ANY(password), VARSIZE_ANY_EXHDR(password),
							   salt, sizeof(salt), ES_ARGON2_HASH_LEN,
							   encoded, encoded_len);
	if (rc != ARGON2_OK)
		ereport(ERROR,
				(errcode(rc == ARGON2_MEMORY_ALLOCATION_ERROR ? ERRCODE_OUT_OF_MEMORY : ERRCODE_INTERNAL_ERROR),
				 errmsg("could not hash password: %s", argon2_error_message(rc))));
	PG_RETURN_TEXT_P(cstring_to_text(encoded));
}

/* Checks a password against a PHC string; false for a mismatch, error for a malformed hash. */
Datum
eventshop_verify_password(PG_FUNCTION_ARGS)
{
	text	   *password = PG_GETARG_TEXT_PP(0);
	char	   *encoded = text_to_cstring(PG_GETARG_TEXT_PP(1));
	int			rc;

	es_check_password_size(password);
	if (strncmp(encoded, "$argon2id$", 10) != 0 || strlen(encoded) > 512)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("stored password hash is not an argon2id hash")));

	/* argon2_verify compares the hashes in constant time */
	rc = argon2id_verify(encoded, VARDATA_ANY(password), VARSIZE_ANY_EXHDR(password));
	if (rc == ARGON2_OK)
		PG_RETURN_BOOL(true);
	if (rc == ARGON2_VERIFY_MISMATCH)
		PG_RETURN_BOOL(false);
	ereport(ERROR,
			(errcode(rc == ARGON2_MEMORY_ALLOCATION_ERROR ? ERRCODE_OUT_OF_MEMORY : ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("could not verify password: %s", argon2_error_message(rc))));
	PG_RETURN_BOOL(false);		/* not reached */
}

/* Refuses absurdly long passwords before spending memory on them. */
static void
es_check_password_size(const text *password)
{
	if (VARSIZE_ANY_EXHDR(password) > ES_MAX_PASSWORD_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("password is too long"),
				 errdetail("Passwords are limited to %d bytes.", ES_MAX_PASSWORD_BYTES)));
}
