/*
 * spi_util.h
 *		Statements prepared once per backend and kept across calls.
 */
#ifndef EVENTSHOP_SPI_UTIL_H
#define EVENTSHOP_SPI_UTIL_H

#include "executor/spi.h"

extern SPIPlanPtr es_keep_plan(SPIPlanPtr *slot, const char *sql, int nargs, Oid *argtypes);

#endif							/* EVENTSHOP_SPI_UTIL_H */
