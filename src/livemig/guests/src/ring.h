/*
 * ring.h - the guest side of the livemig-ring device (livemig/machine/devices/ring.py; keep the
 * two in step, tests/service/test_ring_device.py compares them).
 *
 * The ring area at RING_ADDR holds a header page, RING_SLOTS request slots written by the host
 * and RING_SLOTS response slots written by the guest. Indices are free-running u32 counters
 * (slot = index % RING_SLOTS). The host owns req_prod and resp_cons, the guest req_cons and
 * resp_prod. One request ("chain") is one or more consecutive slots of one connection, every
 * slot but the last flagged RING_F_MORE; a chain holds whole RESP commands only, so the guest
 * needs no per-connection parser state. Responses are a byte stream per connection id.
 */
#ifndef LIVEMIG_RING_H
#define LIVEMIG_RING_H

#include "livemig.h"

#define RING_MAGIC 0x31474E49524D4CUL /* "LMRING1" little-endian */
#define RING_SLOTS 32
#define RING_SLOT_SIZE 4096
#define RING_ENTRY_HDR 16
#define RING_PAYLOAD (RING_SLOT_SIZE - RING_ENTRY_HDR)
#define RING_REQ_OFF 0x1000
#define RING_RESP_OFF 0x21000
#define RING_F_MORE 1
#define RING_WAIT_TOUCH 0xFFFFFFFF /* from WAIT/SPACE: read every ring page, then SETUP 2 */
#define RING_SETUP_INIT 1
#define RING_SETUP_TOUCHED 2

struct ring_header {
	u64 magic;
	u32 req_prod;  /* host */
	u32 req_cons;  /* guest */
	u32 resp_prod; /* guest */
	u32 resp_cons; /* host */
};

struct ring_entry {
	u64 conn; /* host-chosen connection id, echoed in the responses */
	u32 len;  /* payload bytes in this slot */
	u32 flags;
	u8 data[];
};

#define RING_HEADER ((volatile struct ring_header *)RING_ADDR)
#define RING_REQ(i) ((volatile struct ring_entry *)(RING_ADDR + RING_REQ_OFF + \
	((i) % RING_SLOTS) * RING_SLOT_SIZE))
#define RING_RESP(i) ((volatile struct ring_entry *)(RING_ADDR + RING_RESP_OFF + \
	((i) % RING_SLOTS) * RING_SLOT_SIZE))

#endif
