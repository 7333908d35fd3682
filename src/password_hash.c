/*
 * password_hash.c
 *		Password hashing for the accounts module: argon2id through libargon2
 *		(OWASP's minimum parameters, 19 MiB, t=2, p=1, raised by settings),
 *		verification of bcrypt hashes imported from older systems through
 *		libxcrypt's crypt_r, and the common-password list shipped with the
 *		extension.
 *
 * Hashes are PHC strings ($argon2id$v=19$m=...,t=...,p=...$salt$hash) so
 * that parameters can rise without breaking stored hashes; a stored hash
 * below the current parameters (or a bcrypt hash) is replaced at the next
 * successful login. Stored hashes are parsed strictly and bounded (memory,
 * passes, lanes, salt and output lengths) before anything is computed, and
 * an argon2id hash is verified in the backend's own thread whatever its lane
 * count; a malformed or oversized hash is an error that names no part of it.
 *
 * Every hash costs eventshop.password_hash_memory of memory and tens of
 * milliseconds of CPU, so a server-wide gate (a counter in shared memory and
 * a condition variable) lets at most eventshop.max_concurrent_password_hashes
 * run at once; the others wait interruptibly. The slot is never held across
 * anything that can raise an error, and a backend that exits holding one
 * gives it back.
 */
#include "postgres.h"

#include <argon2.h>
#include <crypt.h>
#include <stdio.h>

#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "port.h"
#include "storage/condition_variable.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/builtins.h"
#include "utils/tuplestore.h"
#include "utils/wait_event.h"

#include "config.h"
#include "password_hash.h"

#define ES_ARGON2_LANES			1
#define ES_ARGON2_SALT_LEN		16
#define ES_ARGON2_HASH_LEN		32
#define ES_MAX_PASSWORD_BYTES	4096
/*
 * Bounds on what a stored hash may ask for, so that a bad row cannot exhaust
 * the server: memory and passes as high as the settings allow (a stored hash
 * may have been made with the highest), lanes as argon2 implementations
 * elsewhere use (computed in one thread here), salt and output lengths as
 * PHC strings have them.
 */
#define ES_ARGON2_MAX_MEMORY_KIB	1048576
#define ES_ARGON2_MAX_ITERATIONS	64
#define ES_ARGON2_MAX_LANES			16
#define ES_ARGON2_MIN_SALT_LEN		8
#define ES_ARGON2_MAX_SALT_LEN		64
#define ES_ARGON2_MIN_HASH_LEN		16
#define ES_ARGON2_MAX_HASH_LEN		64
#define ES_BCRYPT_MAX_COST			16
#define ES_COMMON_PASSWORDS_FILE	"eventshop_common_passwords.txt"

/* The parts of an argon2id PHC string, as es_parse_argon2id reads them. */
typedef struct EsArgon2Params
{
	uint32		version;
	uint32		m;				/* KiB */
	uint32		t;
	uint32		p;
	uint8		salt[ES_ARGON2_MAX_SALT_LEN];
	size_t		salt_len;
	uint8		hash[ES_ARGON2_MAX_HASH_LEN];
	size_t		hash_len;
} EsArgon2Params;

/* Why es_parse_argon2id refused a string. */
typedef enum EsArgon2Parse
{
	ES_ARGON2_OK,
	ES_ARGON2_MALFORMED,		/* not $argon2id$v=..$m=..,t=..,p=..$salt$hash */
	ES_ARGON2_UNSUPPORTED,		/* well formed, but a version or parameter beyond the bounds */
} EsArgon2Parse;

typedef struct EsHashGate
{
	slock_t		mutex;			/* protects active */
	int			active;			/* hashes being computed right now */
	ConditionVariable cv;		/* signalled whenever a slot is freed */
} EsHashGate;

static EsHashGate *es_hash_gate = NULL;
static bool es_holding_hash_slot = false;
static bool es_hash_gate_exit_registered = false;

PG_FUNCTION_INFO_V1(eventshop_hash_password);
PG_FUNCTION_INFO_V1(eventshop_verify_password);
PG_FUNCTION_INFO_V1(eventshop_dummy_verify_password);
PG_FUNCTION_INFO_V1(eventshop_password_needs_rehash);
PG_FUNCTION_INFO_V1(eventshop_read_common_passwords);
PG_FUNCTION_INFO_V1(eventshop_password_hash_status);

static void es_check_password_size(const text *password);
static void es_hash_gate_enter(void);
static void es_hash_gate_leave(void);
static void es_hash_gate_on_exit(int code, Datum arg);
static EsArgon2Parse es_parse_argon2id(const char *encoded, EsArgon2Params *params);
static bool es_parse_uint(const char **pos, const char *prefix, uint32 *value);
static bool es_parse_b64(const char **pos, char stop, uint8 *out, size_t max, size_t *len);
static bool es_argon2id_verify_bounded(const EsArgon2Params *params, const text *password);
static bool es_is_bcrypt(const char *encoded, int *cost);
static bool es_bcrypt_verify(const char *password, const char *encoded);
static void es_argon2_error(int rc, const char *what);

/* Size of the hash gate in shared memory. */
Size
es_password_hash_shmem_size(void)
{
	return MAXALIGN(sizeof(EsHashGate));
}

/* Creates or attaches to the hash gate; called from the shmem startup hook under AddinShmemInitLock. */
void
es_password_hash_shmem_startup(void)
{
	bool		found;

	es_hash_gate = ShmemInitStruct("eventshop password hash gate", sizeof(EsHashGate), &found);
	if (!found)
	{
		SpinLockInit(&es_hash_gate->mutex);
		es_hash_gate->active = 0;
		ConditionVariableInit(&es_hash_gate->cv);
	}
}

/* Returns an argon2id PHC string for the password with the current parameters and a fresh random salt. */
Datum
eventshop_hash_password(PG_FUNCTION_ARGS)
{
	text	   *password = PG_GETARG_TEXT_PP(0);
	uint8		salt[ES_ARGON2_SALT_LEN];
	uint32		t_cost = (uint32) es_password_hash_iterations;
	uint32		m_cost = (uint32) es_password_hash_memory_kib;
	size_t		encoded_len;
	char	   *encoded;
	int			rc;

	es_check_password_size(password);
	if (!pg_strong_random(salt, sizeof(salt)))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate a random salt")));

	encoded_len = argon2_encodedlen(t_cost, m_cost, ES_ARGON2_LANES,
									ES_ARGON2_SALT_LEN, ES_ARGON2_HASH_LEN, Argon2_id);
	encoded = palloc(encoded_len);
	es_hash_gate_enter();
	rc = argon2id_hash_encoded(t_cost, m_cost, ES_ARGON2_LANES,
							   VARDATA_ANY(password), VARSIZE_ANY_EXHDR(password),
							   salt, sizeof(salt), ES_ARGON2_HASH_LEN,
							   encoded, encoded_len);
	es_hash_gate_leave();
	if (rc != ARGON2_OK)
		es_argon2_error(rc, "hash");
	PG_RETURN_TEXT_P(cstring_to_text(encoded));
}

/*
 * Checks a password against a stored hash (argon2id PHC string, or a bcrypt
 * $2a$/$2b$/$2y$ hash imported from another system); false for a mismatch,
 * an error (22023, naming no part of the hash) for a hash that is malformed
 * or asks for more than the bounds above. argon2id is computed in this
 * backend's thread whatever the lane count (libargon2's own verify would
 * start a thread per lane).
 */
Datum
eventshop_verify_password(PG_FUNCTION_ARGS)
{
	text	   *password = PG_GETARG_TEXT_PP(0);
	char	   *encoded = text_to_cstring(PG_GETARG_TEXT_PP(1));
	EsArgon2Params params;
	int			cost;
	bool		ok;

	es_check_password_size(password);
	if (strlen(encoded) > 512)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("stored password hash is not an argon2id or bcrypt hash")));

	if (es_is_bcrypt(encoded, &cost))
	{
		char	   *plain = text_to_cstring(password);

		if (cost > ES_BCRYPT_MAX_COST)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("stored bcrypt hash has a cost above %d", ES_BCRYPT_MAX_COST)));
		ok = es_bcrypt_verify(plain, encoded);
		explicit_bzero(plain, strlen(plain));
		PG_RETURN_BOOL(ok);
	}

	if (strncmp(encoded, "$argon2id$", 10) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("stored password hash is not an argon2id or bcrypt hash")));
	switch (es_parse_argon2id(encoded, &params))
	{
		case ES_ARGON2_OK:
			break;
		case ES_ARGON2_MALFORMED:
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("stored argon2id hash is malformed"),
					 errdetail("An argon2id hash must read $argon2id$v=19$m=<KiB>,t=<passes>,p=<lanes>$<salt>$<hash> "
							   "with decimal numbers and unpadded base64.")));
			break;
		case ES_ARGON2_UNSUPPORTED:
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("stored argon2id hash has parameters above the supported limits"),
					 errdetail("Supported: version 19, m up to %d KiB (and at least 8 per lane), t from 1 to %d, "
							   "p from 1 to %d, a salt of %d to %d bytes and a hash of %d to %d bytes.",
							   ES_ARGON2_MAX_MEMORY_KIB, ES_ARGON2_MAX_ITERATIONS, ES_ARGON2_MAX_LANES,
							   ES_ARGON2_MIN_SALT_LEN, ES_ARGON2_MAX_SALT_LEN,
							   ES_ARGON2_MIN_HASH_LEN, ES_ARGON2_MAX_HASH_LEN)));
			break;
	}
	ok = es_argon2id_verify_bounded(&params, password);
	explicit_bzero(&params, sizeof(params));
	PG_RETURN_BOOL(ok);
}

/*
 * Spends what verifying against a current hash spends and returns false, so
 * that a login for an unknown address takes as long as one for a known one.
 */
Datum
eventshop_dummy_verify_password(PG_FUNCTION_ARGS)
{
	text	   *password = PG_GETARG_TEXT_PP(0);
	uint8		salt[ES_ARGON2_SALT_LEN] = {0};
	uint8		hash[ES_ARGON2_HASH_LEN];
	int			rc;

	es_check_password_size(password);
	es_hash_gate_enter();
	rc = argon2id_hash_raw((uint32) es_password_hash_iterations, (uint32) es_password_hash_memory_kib,
						   ES_ARGON2_LANES, VARDATA_ANY(password), VARSIZE_ANY_EXHDR(password),
						   salt, sizeof(salt), hash, sizeof(hash));
	es_hash_gate_leave();
	if (rc != ARGON2_OK)
		es_argon2_error(rc, "verify");
	PG_RETURN_BOOL(false);
}

/* Whether a stored hash should be replaced: bcrypt, or argon2id below the current parameters. */
Datum
eventshop_password_needs_rehash(PG_FUNCTION_ARGS)
{
	char	   *encoded = text_to_cstring(PG_GETARG_TEXT_PP(0));
	EsArgon2Params params;

	if (es_parse_argon2id(encoded, &params) != ES_ARGON2_OK)
		PG_RETURN_BOOL(true);
	PG_RETURN_BOOL(params.m < (uint32) es_password_hash_memory_kib ||
				   params.t < (uint32) es_password_hash_iterations ||
				   params.p != ES_ARGON2_LANES ||
				   params.salt_len < ES_ARGON2_SALT_LEN ||
				   params.hash_len != ES_ARGON2_HASH_LEN);
}

/*
 * Returns the passwords of the common-password list installed beside the
 * extension's scripts ($sharedir/extension/eventshop_common_passwords.txt),
 * one row per line; lines starting with "#!" are comments. CREATE EXTENSION
 * loads the list into eventshop.common_passwords through this function, so
 * the list ships as a plain data file rather than as SQL.
 */
Datum
eventshop_read_common_passwords(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char		sharepath[MAXPGPATH];
	char		path[MAXPGPATH];
	char		line[1024];
	FILE	   *file;
	int			lineno = 0;

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	get_share_path(my_exec_path, sharepath);
	snprintf(path, sizeof(path), "%s/extension/%s", sharepath, ES_COMMON_PASSWORDS_FILE);

	file = AllocateFile(path, "r");
	if (file == NULL)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open common-password list \"%s\": %m", path),
				 errhint("Reinstall eventshop (make install) so that the list is installed beside its scripts.")));

	while (fgets(line, sizeof(line), file) != NULL)
	{
		size_t		len = strlen(line);
		Datum		value;
		bool		isnull = false;

		lineno++;
		if (len == sizeof(line) - 1 && line[len - 1] != '\n')
		{
			FreeFile(file);
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("line %d of common-password list \"%s\" is too long", lineno, path)));
		}
		while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
			line[--len] = '\0';
		if (len == 0 || strncmp(line, "#!", 2) == 0)
			continue;
		if (!pg_verifymbstr(line, (int) len, true))
		{
			FreeFile(file);
			ereport(ERROR,
					(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
					 errmsg("line %d of common-password list \"%s\" is not valid in the database encoding",
							lineno, path)));
		}
		value = PointerGetDatum(cstring_to_text_with_len(line, (int) len));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, &value, &isnull);
	}
	if (ferror(file))
	{
		FreeFile(file);
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not read common-password list \"%s\": %m", path)));
	}
	FreeFile(file);
	return (Datum) 0;
}

/* Reports the gate: hashes running now and the configured limit, for monitoring and tests. */
Datum
eventshop_password_hash_status(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[2];
	bool		nulls[2] = {false, false};
	int			active;

	(void) fcinfo;
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	if (es_hash_gate == NULL)
		elog(ERROR, "eventshop shared state is not initialized");
	SpinLockAcquire(&es_hash_gate->mutex);
	active = es_hash_gate->active;
	SpinLockRelease(&es_hash_gate->mutex);
	values[0] = Int32GetDatum(active);
	values[1] = Int32GetDatum(es_max_concurrent_password_hashes);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
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

/*
 * Waits for one of the server's hashing slots. The wait is a condition
 * variable sleep, so cancel and terminate requests interrupt it (raising
 * before the slot is taken). Between enter and leave nothing may raise.
 */
static void
es_hash_gate_enter(void)
{
	bool		waited = false;

	if (es_hash_gate == NULL)
		elog(ERROR, "eventshop shared state is not initialized");
	if (!es_hash_gate_exit_registered)
	{
		before_shmem_exit(es_hash_gate_on_exit, (Datum) 0);
		es_hash_gate_exit_registered = true;
	}
	Assert(!es_holding_hash_slot);

	for (;;)
	{
		bool		got = false;

		SpinLockAcquire(&es_hash_gate->mutex);
		if (es_hash_gate->active < es_max_concurrent_password_hashes)
		{
			es_hash_gate->active++;
			got = true;
		}
		SpinLockRelease(&es_hash_gate->mutex);
		if (got)
			break;
		ConditionVariableSleep(&es_hash_gate->cv, PG_WAIT_EXTENSION);
		waited = true;
	}
	if (waited)
		ConditionVariableCancelSleep();
	es_holding_hash_slot = true;
}

/* Frees this backend's hashing slot and wakes the waiters. */
static void
es_hash_gate_leave(void)
{
	if (!es_holding_hash_slot)
		return;
	SpinLockAcquire(&es_hash_gate->mutex);
	es_hash_gate->active--;
	SpinLockRelease(&es_hash_gate->mutex);
	es_holding_hash_slot = false;
	ConditionVariableBroadcast(&es_hash_gate->cv);
}

/* Gives the slot back if the backend exits while hashing (for instance terminated mid-hash). */
static void
es_hash_gate_on_exit(int code, Datum arg)
{
	(void) code;
	(void) arg;
	es_hash_gate_leave();
}

/*
 * Parses an argon2id PHC string strictly:
 * $argon2id$v=19$m=<KiB>,t=<passes>,p=<lanes>$<salt>$<hash>, every part
 * present and in this order, numbers in plain decimal (no sign, no leading
 * zero, no spaces), salt and hash in unpadded standard base64 with no stray
 * bits. The bounds are checked here, so nothing that exceeds them reaches
 * libargon2.
 */
static EsArgon2Parse
es_parse_argon2id(const char *encoded, EsArgon2Params *params)
{
	const char *pos = encoded;

	memset(params, 0, sizeof(*params));
	if (strncmp(pos, "$argon2id$", 10) != 0)
		return ES_ARGON2_MALFORMED;
	pos += 10;
	if (!es_parse_uint(&pos, "v=", &params->version) || *pos++ != '$' ||
		!es_parse_uint(&pos, "m=", &params->m) || *pos++ != ',' ||
		!es_parse_uint(&pos, "t=", &params->t) || *pos++ != ',' ||
		!es_parse_uint(&pos, "p=", &params->p) || *pos++ != '$' ||
		!es_parse_b64(&pos, '$', params->salt, sizeof(params->salt), &params->salt_len) || *pos++ != '$' ||
		!es_parse_b64(&pos, '\0', params->hash, sizeof(params->hash), &params->hash_len) || *pos != '\0')
		return ES_ARGON2_MALFORMED;
	if (params->version != ARGON2_VERSION_13 ||
		params->m > ES_ARGON2_MAX_MEMORY_KIB ||
		params->t < 1 || params->t > ES_ARGON2_MAX_ITERATIONS ||
		params->p < 1 || params->p > ES_ARGON2_MAX_LANES ||
		params->m < 8 * params->p ||
		params->salt_len < ES_ARGON2_MIN_SALT_LEN ||
		params->hash_len < ES_ARGON2_MIN_HASH_LEN)
		return ES_ARGON2_UNSUPPORTED;
	return ES_ARGON2_OK;
}

/*
 * Reads prefix then a decimal number at *pos, advancing past it; false when
 * the prefix is missing or the number is not plain decimal digits (the sign,
 * spaces and leading zeros strtol would take are refused). A number beyond
 * uint32 reads as PG_UINT32_MAX, so that it fails the bounds, not the syntax.
 */
static bool
es_parse_uint(const char **pos, const char *prefix, uint32 *value)
{
	size_t		plen = strlen(prefix);
	const char *digits;
	char	   *end;
	long		v;

	if (strncmp(*pos, prefix, plen) != 0)
		return false;
	digits = *pos + plen;
	if (!isdigit((unsigned char) digits[0]) || (digits[0] == '0' && isdigit((unsigned char) digits[1])))
		return false;
	errno = 0;
	v = strtol(digits, &end, 10);
	if (end == digits || v < 0)
		return false;
	*value = (errno == ERANGE || v > (long) PG_UINT32_MAX) ? PG_UINT32_MAX : (uint32) v;
	*pos = end;
	return true;
}

/*
 * Decodes unpadded standard base64 at *pos up to the stop character into
 * out (at most max bytes), advancing *pos to the stop character; false for
 * any other character, a length that cannot be base64, non-zero leftover
 * bits, or more than max bytes.
 */
static bool
es_parse_b64(const char **pos, char stop, uint8 *out, size_t max, size_t *len)
{
	const char *p = *pos;
	uint32		acc = 0;
	int			bits = 0;
	size_t		n = 0;

	for (; *p != stop; p++)
	{
		char		c = *p;
		int			v;

		if (c >= 'A' && c <= 'Z')
			v = c - 'A';
		else if (c >= 'a' && c <= 'z')
			v = c - 'a' + 26;
		else if (c >= '0' && c <= '9')
			v = c - '0' + 52;
		else if (c == '+')
			v = 62;
		else if (c == '/')
			v = 63;
		else
			return false;		/* includes '\0' before the stop, '=' and '$' */
		acc = (acc << 6) | (uint32) v;
		bits += 6;
		if (bits >= 8)
		{
			bits -= 8;
			if (n >= max)
				return false;
			out[n++] = (uint8) (acc >> bits);
			acc &= (1u << bits) - 1;
		}
	}
	/* 6 leftover bits mean a length of 4k+1 characters; other leftovers must be zero */
	if (bits >= 6 || acc != 0)
		return false;
	*len = n;
	*pos = p;
	return true;
}

/*
 * Computes argon2id with a stored hash's parameters through argon2_ctx with
 * one thread (lanes are processed in turn), and compares the result with
 * the stored hash in constant time.
 */
static bool
es_argon2id_verify_bounded(const EsArgon2Params *params, const text *password)
{
	uint8		out[ES_ARGON2_MAX_HASH_LEN];
	uint8		salt[ES_ARGON2_MAX_SALT_LEN];
	argon2_context ctx;
	unsigned char diff = 0;
	int			rc;

	memcpy(salt, params->salt, params->salt_len);
	memset(&ctx, 0, sizeof(ctx));
	ctx.out = out;
	ctx.outlen = (uint32) params->hash_len;
	ctx.pwd = (uint8 *) VARDATA_ANY(password);
	ctx.pwdlen = (uint32) VARSIZE_ANY_EXHDR(password);
	ctx.salt = salt;
	ctx.saltlen = (uint32) params->salt_len;
	ctx.t_cost = params->t;
	ctx.m_cost = params->m;
	ctx.lanes = params->p;
	ctx.threads = 1;
	ctx.version = params->version;
	ctx.flags = ARGON2_DEFAULT_FLAGS;

	es_hash_gate_enter();
	rc = argon2_ctx(&ctx, Argon2_id);
	es_hash_gate_leave();
	if (rc != ARGON2_OK)
	{
		explicit_bzero(out, sizeof(out));
		es_argon2_error(rc, "verify");
	}
	for (size_t i = 0; i < params->hash_len; i++)
		diff |= (unsigned char) (out[i] ^ params->hash[i]);
	explicit_bzero(out, sizeof(out));
	return diff == 0;
}

/* Whether the string is a bcrypt hash of a variant we verify ($2a$, $2b$, $2y$), and its cost. */
static bool
es_is_bcrypt(const char *encoded, int *cost)
{
	static const char alphabet[] =
		"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

	if (strlen(encoded) != 60 || encoded[0] != '$' || encoded[1] != '2' ||
		(encoded[2] != 'a' && encoded[2] != 'b' && encoded[2] != 'y') || encoded[3] != '$' ||
		!isdigit((unsigned char) encoded[4]) || !isdigit((unsigned char) encoded[5]) ||
		encoded[6] != '$')
		return false;
	if (strspn(encoded + 7, alphabet) != 53)
		return false;
	*cost = (encoded[4] - '0') * 10 + (encoded[5] - '0');
	return *cost >= 4 && *cost <= 31;
}

/* Verifies a password against a bcrypt hash with libxcrypt, comparing in constant time. */
static bool
es_bcrypt_verify(const char *password, const char *encoded)
{
	struct crypt_data *data = palloc0(sizeof(struct crypt_data));
	const char *result;
	size_t		len = strlen(encoded);
	unsigned char diff = 0;

	es_hash_gate_enter();
	result = crypt_r(password, encoded, data);
	es_hash_gate_leave();

	/* crypt_r returns NULL or a string starting with '*' on failure */
	if (result == NULL || result[0] == '*' || strlen(result) != len)
		diff = 1;
	else
	{
		for (size_t i = 0; i < len; i++)
			diff |= (unsigned char) (result[i] ^ encoded[i]);
	}
	explicit_bzero(data, sizeof(struct crypt_data));
	pfree(data);
	return diff == 0;
}

/* Raises the error for a failed libargon2 call. */
static void
es_argon2_error(int rc, const char *what)
{
	ereport(ERROR,
			(errcode(rc == ARGON2_MEMORY_ALLOCATION_ERROR ? ERRCODE_OUT_OF_MEMORY : ERRCODE_INTERNAL_ERROR),
			 errmsg("could not %s password: %s", what, argon2_error_message(rc))));
}
