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
