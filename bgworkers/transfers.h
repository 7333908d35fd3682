/*
 * transfers.h
 *		The sender worker's transfer engine: runs many deliveries at once on
 *		one libcurl multi handle, each on its channel's protocol.
 */
#ifndef EVENTSHOP_TRANSFERS_H
#define EVENTSHOP_TRANSFERS_H

#include "delivery.h"

/* Creates libcurl's state in this worker (never in the postmaster) and frees it at exit. */
extern void es_transfers_init(void);

/*
 * Sends deliveries[0..count-1] (e-mail, SMS, push or webhook), at most
 * eventshop.sender_concurrency at a time, and sets each one's outcome.
 * None is started at or after start_deadline, nor once SIGTERM arrived:
 * those, and transfers cut short by SIGTERM, come back as released.
 */
extern void es_transfers_run(EsDelivery **deliveries, int count, TimestampTz start_deadline);

#endif							/* EVENTSHOP_TRANSFERS_H */
