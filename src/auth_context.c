/*
 * auth_context.c
 *		Who the caller is, for the rest of the current transaction: the user,
 *		roles and session that eventshop.authenticate(token) established.
 *		Every other module asks eventshop.current_user_id() or calls
 *		eventshop._require_user() / _require_admin() instead of trusting an
 *		id passed by the application.
 *
 * The context lives only in this backend's memory and only until the
 * transaction ends: a transaction callback clears it at commit, abort and
 * PREPARE, so a pooled connection never carries one client's identity into
 * the next client's transaction. It follows subtransactions: a context set
 * inside a savepoint that is rolled back is undone (the one before it comes
 * back), one set inside a savepoint that is released stays.
 *
 * Only eventshop._set_auth_context() sets it, and nobody but the extension's
 * owner may execute that function; the owner's SECURITY DEFINER function
 * eventshop.authenticate() calls it after verifying the token.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/memutils.h"
#include "utils/uuid.h"

#include "auth_context.h"

typedef struct EsAuthFrame
{
	struct EsAuthFrame *prev;	/* the context this one replaced */
	int			nest_level;		/* (sub)transaction level that set it */
	bool		authenticated;	/* false: explicitly cleared (logout) */
	pg_uuid_t	user_id;
	pg_uuid_t	session_id;
	ArrayType  *roles;			/* text[], in TopTransactionContext */
} EsAuthFrame;

/* The current context; frames live in TopTransactionContext. */
static EsAuthFrame *es_auth = NULL;
static bool es_auth_callbacks_registered = false;

PG_FUNCTION_INFO_V1(eventshop_set_auth_context);
PG_FUNCTION_INFO_V1(eventshop_clear_auth_context);
PG_FUNCTION_INFO_V1(eventshop_current_user_id);
PG_FUNCTION_INFO_V1(eventshop_current_roles);
PG_FUNCTION_INFO_V1(eventshop_current_session_id);

static void es_auth_push(bool authenticated, pg_uuid_t *user_id, pg_uuid_t *session_id, ArrayType *roles);
static void es_auth_xact_callback(XactEvent event, void *arg);
static void es_auth_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
									 SubTransactionId parentSubid, void *arg);

/* Establishes the caller (user, roles, session) for the rest of the transaction; internal. */
Datum
eventshop_set_auth_context(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *user_id = PG_GETARG_UUID_P(0);
	ArrayType  *roles = PG_GETARG_ARRAYTYPE_P(1);
	pg_uuid_t  *session_id = PG_GETARG_UUID_P(2);

	if (ARR_ELEMTYPE(roles) != TEXTOID || ARR_NDIM(roles) > 1 || array_contains_nulls(roles))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("roles must be a one-dimensional text array without NULLs")));
	es_auth_push(true, user_id, session_id, roles);
	PG_RETURN_VOID();
}

/* Establishes the caller from C (authenticate); roles must be a text[] without NULLs. */
void
es_auth_set(pg_uuid_t *user_id, ArrayType *roles, pg_uuid_t *session_id)
{
	es_auth_push(true, user_id, session_id, roles);
}

/* Whether a caller is established; if so, fills in its user and session. */
bool
es_auth_current(pg_uuid_t *user_id, pg_uuid_t *session_id)
{
	if (es_auth == NULL || !es_auth->authenticated)
		return false;
	*user_id = es_auth->user_id;
	*session_id = es_auth->session_id;
	return true;
}

/* Forgets the caller for the rest of the transaction (after logging out); internal. */
Datum
eventshop_clear_auth_context(PG_FUNCTION_ARGS)
{
	(void) fcinfo;
	if (es_auth != NULL && es_auth->authenticated)
		es_auth_push(false, NULL, NULL, NULL);
	PG_RETURN_VOID();
}

/* The authenticated user of this transaction, or NULL. */
Datum
eventshop_current_user_id(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *result;

	(void) fcinfo;
	if (es_auth == NULL || !es_auth->authenticated)
		PG_RETURN_NULL();
	result = palloc(sizeof(pg_uuid_t));
	*result = es_auth->user_id;
	PG_RETURN_UUID_P(result);
}

/* The roles the authenticated user had when authenticate() ran, or NULL. */
Datum
eventshop_current_roles(PG_FUNCTION_ARGS)
{
	(void) fcinfo;
	if (es_auth == NULL || !es_auth->authenticated)
		PG_RETURN_NULL();
	PG_RETURN_ARRAYTYPE_P(DatumGetArrayTypePCopy(PointerGetDatum(es_auth->roles)));
}

/* The session of the authenticated caller, or NULL. */
Datum
eventshop_current_session_id(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *result;

	(void) fcinfo;
	if (es_auth == NULL || !es_auth->authenticated)
		PG_RETURN_NULL();
	result = palloc(sizeof(pg_uuid_t));
	*result = es_auth->session_id;
	PG_RETURN_UUID_P(result);
}

/* Makes a new context current, remembering the one it replaces for a savepoint rollback. */
static void
es_auth_push(bool authenticated, pg_uuid_t *user_id, pg_uuid_t *session_id, ArrayType *roles)
{
	MemoryContext old;
	EsAuthFrame *frame;

	if (!IsTransactionState())
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TRANSACTION_STATE),
				 errmsg("the caller can only be established inside a transaction")));
	if (!es_auth_callbacks_registered)
	{
		RegisterXactCallback(es_auth_xact_callback, NULL);
		RegisterSubXactCallback(es_auth_subxact_callback, NULL);
		es_auth_callbacks_registered = true;
	}

	old = MemoryContextSwitchTo(TopTransactionContext);
	frame = palloc0(sizeof(EsAuthFrame));
	frame->authenticated = authenticated;
	if (authenticated)
	{
		frame->user_id = *user_id;
		frame->session_id = *session_id;
		frame->roles = DatumGetArrayTypePCopy(PointerGetDatum(roles));
	}
	MemoryContextSwitchTo(old);

	frame->nest_level = GetCurrentTransactionNestLevel();
	frame->prev = es_auth;
	es_auth = frame;
}

/* Clears the context when the transaction ends, however it ends. */
static void
es_auth_xact_callback(XactEvent event, void *arg)
{
	(void) arg;
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			/* the frames are freed with TopTransactionContext */
			es_auth = NULL;
			break;
		default:
			break;
	}
}

/* Undoes contexts set inside an aborted subtransaction; hands those of a released one to its parent. */
static void
es_auth_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						 SubTransactionId parentSubid, void *arg)
{
	int			level = GetCurrentTransactionNestLevel();

	(void) mySubid;
	(void) parentSubid;
	(void) arg;
	if (event == SUBXACT_EVENT_ABORT_SUB)
	{
		while (es_auth != NULL && es_auth->nest_level >= level)
			es_auth = es_auth->prev;
	}
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
	{
		for (EsAuthFrame *frame = es_auth; frame != NULL && frame->nest_level >= level; frame = frame->prev)
			frame->nest_level = level - 1;
	}
}
