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
 * successful login.
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
/* Bounds on parameters read from stored hashes, so a bad row cannot exhaust the server. */
#define ES_ARGON2_MAX_MEMORY_KIB	1048576
#define ES_ARGON2_MAX_ITERATIONS	64
#define ES_ARGON2_MAX_LANES			16
#define ES_BCRYPT_MAX_COST			16
#define ES_COMMON_PASSWORDS_FILE	"eventshop_common_passwords.txt"

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
static bool es_parse_argon2id(const char *encoded, int *version, int *m, int *t, int *p);
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
 * an error for a malformed or unsupported hash.
 */
Datum
eventshop_verify_password(PG_FUNCTION_ARGS)
{
	text	   *password = PG_GETARG_TEXT_PP(0);
	char	   *encoded = text_to_cstring(PG_GETARG_TEXT_PP(1));
	int			version,
				m,
				t,
				p,
				cost;
	int			rc;

	es_check_password_size(password);
	if (strlen(encoded) > 512)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("stored password hash is not an argon2id or bcrypt hash")));

	if (es_is_bcrypt(encoded, &cost))
	{
		char	   *plain = text_to_cstring(password);
		bool		ok;

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
	if (es_parse_argon2id(encoded, &version, &m, &t, &p) &&
		(m > ES_ARGON2_MAX_MEMORY_KIB || t > ES_ARGON2_MAX_ITERATIONS || p > ES_ARGON2_MAX_LANES))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("stored argon2id hash has parameters above the supported limits")));

	/* argon2_verify compares the hashes in constant time */
	es_hash_gate_enter();
	rc = argon2id_verify(encoded, VARDATA_ANY(password), VARSIZE_ANY_EXHDR(password));
	es_hash_gate_leave();
	if (rc == ARGON2_OK)
		PG_RETURN_BOOL(true);
	if (rc == ARGON2_VERIFY_MISMATCH)
		PG_RETURN_BOOL(false);
	if (rc == ARGON2_MEMORY_ALLOCATION_ERROR)
		es_argon2_error(rc, "verify");
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("could not verify password: %s", argon2_error_message(rc))));
	PG_RETURN_BOOL(false);		/* not reached */
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
	int			version,
				m,
				t,
				p;

	if (!es_parse_argon2id(encoded, &version, &m, &t, &p))
		PG_RETURN_BOOL(true);
	PG_RETURN_BOOL(version != ARGON2_VERSION_13 ||
				   m < es_password_hash_memory_kib ||
				   t < es_password_hash_iterations ||
				   p != ES_ARGON2_LANES);
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

/* Parses the parameters of an argon2id PHC string; false if it is not one. */
static bool
es_parse_argon2id(const char *encoded, int *version, int *m, int *t, int *p)
{
	int			consumed = 0;

	if (strncmp(encoded, "$argon2id$", 10) != 0)
		return false;
	if (sscanf(encoded + 10, "v=%d$m=%d,t=%d,p=%d$%n", version, m, t, p, &consumed) != 4 || consumed == 0)
		return false;
	return true;
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
