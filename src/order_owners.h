/*
 * order_owners.h
 *		What place_order does so that every order keeps an existing user
 *		(src/order_owners.c).
 */
#ifndef EVENTSHOP_ORDER_OWNERS_H
#define EVENTSHOP_ORDER_OWNERS_H

#include "utils/uuid.h"

extern void es_order_owner_before_auth(void);
extern void es_order_owner_after_auth(pg_uuid_t *user_id);

#endif							/* EVENTSHOP_ORDER_OWNERS_H */
