/*
 * memstress.h - what memstress publishes beside the GuestReport, and how its pages look, so
 * that livemig/guests/memstress.py can check its memory from outside. Keep in step with the
 * MEMSTRESS_INFO struct and page_pattern() there (tests/guests/test_layout.py checks both).
 *
 * Every page of the working set: u64 word 0 is the pass counter; words 1..511 hold
 *   pattern(p, j) = page_hash(seed, p) ^ (j * PATTERN_STEP)
 * where p is the page's index in the working set.
 */
#ifndef MEMSTRESS_H
#define MEMSTRESS_H

#include "livemig.h"

#define MEMSTRESS_INFO_ADDR (GUEST_REPORT_ADDR + 0x200)
#define MEMSTRESS_INFO_MAGIC 0x4f464e4953534d4cUL /* "LMSSINFO" */
#define PAGE_WORDS (PAGE_SIZE / 8)
#define PATTERN_STEP 0x9E3779B97F4A7C15UL
#define SEED_MULT 0xD6E8FEB86659FD93UL

struct memstress_info {
	u64 magic;
	u64 seed;
	u64 rate;             /* target dirtied pages per second, all vCPUs; 0 = flat out */
	u64 filled[MAX_CPUS]; /* pages of each slice already filled with their pattern */
	u64 comp;             /* percent of pages whose pattern repeats every 8 words */
};

#define MEMSTRESS_INFO ((volatile struct memstress_info *)MEMSTRESS_INFO_ADDR)

/* splitmix64's finaliser over the page index mixed with the seed. */
static inline u64 page_hash(u64 seed, u64 p)
{
	u64 z = (p ^ (seed * SEED_MULT)) + PATTERN_STEP;
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
	return z ^ (z >> 31);
}

/* Word j's multiplier: a compressible page repeats its first 8 words (zstd and zlib shrink
 * it to a few dozen bytes), the others never repeat within the page. */
static inline u64 pattern_index(u64 seed, u64 p, u64 comp, u64 j)
{
	return comp && page_hash(seed ^ 0xC0, p) % 100 < comp ? (j & 7) : j;
}

#endif
