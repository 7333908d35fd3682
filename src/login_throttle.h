/*
 * login_throttle.h
 *		Failed-login counters and the security events about them, kept in
 *		shared memory so that rolling back a transaction cannot erase them.
 */
#ifndef EVENTSHOP_LOGIN_THROTTLE_H
#define EVENTSHOP_LOGIN_THROTTLE_H

extern void es_login_throttle_shmem_request(void);
extern void es_login_throttle_shmem_startup(void);

/* Whether failed-login events wait in shared memory (a hint: read without the lock). */
extern bool es_deferred_events_pending(void);

#endif							/* EVENTSHOP_LOGIN_THROTTLE_H */
