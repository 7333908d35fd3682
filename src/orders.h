/*
 * orders.h
 *		Order ids and order-item validation (src/orders.c), shared with
 *		src/place_order.c.
 */
#ifndef EVENTSHOP_ORDERS_H
#define EVENTSHOP_ORDERS_H

#include "utils/jsonb.h"
#include "utils/uuid.h"

extern void es_uuid_v7(pg_uuid_t *uuid);
extern int	es_parse_order_items(Jsonb *items, Datum **skus, Datum **quantities);

#endif							/* EVENTSHOP_ORDERS_H */
