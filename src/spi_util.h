/*
 * spi_util.h
 *		Statements prepared once per backend and kept across calls.
 */
#ifndef EVENTSHOP_SPI_UTIL_H
#define EVENTSHOP_SPI_UTIL_H

#include "executor/spi.h"

extern SPIPlanPtr es_keep_plan(SPIPlanPtr *slot, const char *sql, int nargs, Oid *argtypes);
extern int	es_execute_by_index(SPIPlanPtr plan, Datum *args, const char *nulls, Snapshot snapshot,
								bool read_only, long count);

#endif							/* EVENTSHOP_SPI_UTIL_H */
