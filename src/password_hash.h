/*
 * password_hash.h
 *		Shared memory of the password hashing gate (at most
 *		eventshop.max_concurrent_password_hashes hashes at once per server).
 */
#ifndef EVENTSHOP_PASSWORD_HASH_H
#define EVENTSHOP_PASSWORD_HASH_H

extern Size es_password_hash_shmem_size(void);
extern void es_password_hash_shmem_startup(void);

#endif							/* EVENTSHOP_PASSWORD_HASH_H */
