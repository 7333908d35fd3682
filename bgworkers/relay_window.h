/*
 * relay_window.h
 *		The relay's reading side: which committed outbox rows come next, in
 *		commit order, and the checkpoint that says what is published.
 *
 * The relay publishes in "windows": the rows whose transactions became
 * visible between two snapshots, prev and cur. Windows follow each other
 * in commit order; inside a window rows go in id order, which is commit
 * order for every pair of transactions that could see each other (the
 * later one drew its ids after the earlier one committed).
 */
#ifndef EVENTSHOP_RELAY_WINDOW_H
#define EVENTSHOP_RELAY_WINDOW_H

#include "datatype/timestamp.h"

/* One snapshot with the sequence and transaction-id positions around it. */
typedef struct RelaySnapshot
{
	char	   *snapshot;		/* pg_snapshot, text form */
	int64		id_bound;		/* outbox_id_seq position read just before it */
	int64		id_limit;		/* ... and just after it (cur only) */
	uint64		next_xid;		/* next transaction id read just after it */
	char	   *pending;		/* xid8[] text: transactions it could not see that
								 * may hold ids <= id_bound; NULL if none */
	uint64		xmin;
} RelaySnapshot;

typedef struct RelayWindow
{
	MemoryContext context;		/* holds the snapshot strings */
	RelaySnapshot prev;			/* everything visible here is published */
	RelaySnapshot cur;			/* the window's upper snapshot, if open */
	bool		open;
	int64		read_id;		/* window rows up to this id have been read */
	int64		acked_id;		/* window rows up to this id are published */
	bool		all_read;		/* nothing left to read in this window */
	bool		phase1_located; /* read_id was moved to the first late row */
	int64		rows_read;		/* rows read in this window */
	int64		published_below;	/* every row with id <= this is published */
	int64		published_total;
	bool		dirty;			/* differs from the stored checkpoint */
} RelayWindow;

/* One outbox row as read; pointers are valid during the callback only. */
typedef struct RelayRow
{
	int64		id;
	const char *topic;
	const char *key;
	int			key_len;
	char		event_id[37];
	const char *event_type;
	const char *payload;
	int			payload_len;
	TimestampTz created_at;
} RelayRow;

typedef void (*RelayRowCallback) (const RelayRow *row, void *arg);

/* Loads the checkpoint (in its own transaction). */
extern void relay_window_load(RelayWindow *window);

/*
 * In one transaction: opens a window if none is open, then reads up to
 * limit rows of it in order, calling emit for each. Returns the number of
 * rows read; sets all_read when the window has no more.
 */
extern int	relay_window_read(RelayWindow *window, int limit, RelayRowCallback emit, void *arg);

/* Closes a fully read and acknowledged window: cur becomes prev. */
extern void relay_window_close(RelayWindow *window);

/* Forgets what was read but not acknowledged, so it is read again. */
extern void relay_window_rewind(RelayWindow *window);

/*
 * Stores the checkpoint in its own transaction, parking the given rows
 * (refused permanently by Kafka) in eventshop.outbox_parked first.
 */
extern void relay_window_save(RelayWindow *window, int nparked, const int64 *parked_ids,
							  char *const *parked_errors);

#endif							/* EVENTSHOP_RELAY_WINDOW_H */
