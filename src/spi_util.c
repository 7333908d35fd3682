/*
 * spi_util.c
 *		Statements prepared once per backend and kept across calls (SPI
 *		plans saved with SPI_keepplan), for the lookups and writes that run
 *		on every call of a C function: they skip parsing, analysis and
 *		planning, and the plan cache re-plans them after DDL on what they use.
 */
#include "postgres.h"

#include "executor/spi.h"
#include "nodes/parsenodes.h"
#include "utils/guc.h"

#include "spi_util.h"

/*
 * Prepares sql once per backend into *slot and keeps it. Always a generic
 * plan: these statements look rows up by key or by arrays of keys, whose
 * values never change the best plan, so a custom plan per call would only
 * add planning time.
 */
SPIPlanPtr
es_keep_plan(SPIPlanPtr *slot, const char *sql, int nargs, Oid *argtypes)
{
	if (*slot == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare_cursor(sql, nargs, argtypes, CURSOR_OPT_GENERIC_PLAN);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed for \"%s\": %s", sql, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "SPI_keepplan failed for \"%s\"", sql);
		*slot = plan;
	}
	return *slot;
}

/*
 * SPI_execute_snapshot (SPI_execute_plan when snapshot is InvalidSnapshot)
 * with the planner held to index scans (seq and bitmap scans off) while the
 * statement is planned, if the plan cache plans it again now, and run: for
 * statements that rely on reaching their rows in an index's order. The
 * settings are restored before returning, and by the transaction's abort on
 * error. (About 2 us a call: not for statements that only want speed.)
 */
int
es_execute_by_index(SPIPlanPtr plan, Datum *args, const char *nulls, Snapshot snapshot, bool read_only,
					long count)
{
	int			guc_level = NewGUCNestLevel();
	int			rc;

	(void) set_config_option("enable_seqscan", "off", PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("enable_bitmapscan", "off", PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("enable_indexscan", "on", PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	if (snapshot == InvalidSnapshot)
		rc = SPI_execute_plan(plan, args, nulls, read_only, count);
	else
		rc = SPI_execute_snapshot(plan, args, nulls, snapshot, InvalidSnapshot, read_only, true, count);
	AtEOXact_GUC(true, guc_level);
	return rc;
}
