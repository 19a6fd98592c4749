/*
 * compute.h - the compute guest's work, shared by the guest (compute.c) and by the host-side
 * reference (compute_ref.c, loaded by livemig.guests.compute), so that a host program can
 * recompute exactly what a vCPU's buffer must hold after any number of operations.
 *
 * Plain C99 over uint64_t, no runtime: it compiles freestanding for the guest and as a host
 * shared library. The guest publishes COMPUTE_INFO (seed, buffer size) and its operation count
 * per vCPU in the GuestReport; everything else follows from these functions.
 *
 *   fill:  buf[i] = xorshift64^(i+1)(seed * GOLDEN + cpu + 1), i = 0 .. words-1
 *   op n:  block = buf + (n mod blocks) * 512 words
 *          h = FNV-1a over the block's 512 words
 *          block[h mod 512] ^= xorshift64(h)            (a read-modify-write store)
 */
#ifndef LIVEMIG_COMPUTE_H
#define LIVEMIG_COMPUTE_H

#include <stdint.h>

#define COMPUTE_FNV_OFFSET 0xcbf29ce484222325UL
#define COMPUTE_FNV_PRIME 0x100000001b3UL
#define COMPUTE_GOLDEN 0x9E3779B97F4A7C15UL
#define COMPUTE_BLOCK_WORDS 512 /* one 4 KiB page */
#define COMPUTE_INFO_MAGIC 0x4F464E49504D434CUL /* "LCMPINFO" little-endian */

/* At GUEST_REPORT_ADDR + 0x200, written by vCPU 0 before the report's magic. */
struct compute_info {
	uint64_t magic;
	uint64_t seed;
	uint64_t buf_size; /* bytes per vCPU; vCPU c's buffer is at ws_start + c * buf_size */
	uint64_t filled[8]; /* per vCPU (MAX_CPUS): 1 once its buffer is filled, before op 0 */
};

static inline uint64_t compute_xorshift64(uint64_t x)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

static inline void compute_fill(uint64_t *buf, uint64_t words, uint64_t seed, int cpu)
{
	uint64_t x = seed * COMPUTE_GOLDEN + (uint64_t)cpu + 1;

	for (uint64_t i = 0; i < words; i++) {
		x = compute_xorshift64(x);
		buf[i] = x;
	}
}

static inline uint64_t compute_hash_block(const uint64_t *block)
{
	uint64_t h = COMPUTE_FNV_OFFSET;

	for (uint64_t i = 0; i < COMPUTE_BLOCK_WORDS; i++)
		h = (h ^ block[i]) * COMPUTE_FNV_PRIME;
	return h;
}

/* Operation number n (0-based); returns its hash. */
static inline uint64_t compute_op(uint64_t *buf, uint64_t blocks, uint64_t n)
{
	uint64_t *block = buf + (n % blocks) * COMPUTE_BLOCK_WORDS;
	uint64_t h = compute_hash_block(block);

	block[h % COMPUTE_BLOCK_WORDS] ^= compute_xorshift64(h);
	return h;
}

#endif
