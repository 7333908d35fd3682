/*
 * sealed_box.h
 *		X25519 sealed boxes: secrets sealed by any backend with the
 *		dispatcher's public key, opened only with its private key file.
 */
#ifndef EVENTSHOP_SEALED_BOX_H
#define EVENTSHOP_SEALED_BOX_H

/* Largest plaintext _seal accepts, in bytes. */
#define ES_SEAL_MAX_PLAINTEXT	65536

/* HKDF info of the box key and nonce. */
#define ES_HKDF_INFO_SEAL		"eventshop seal v1"

#endif							/* EVENTSHOP_SEALED_BOX_H */
