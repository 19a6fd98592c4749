/*
 * compute - a CPU-bound guest, to measure how much a migration slows a guest down.
 *
 * Boot arguments: buf=SIZE (per-vCPU buffer, default 64K), seconds=N (exit after N seconds of
 * guest time, 0 = forever), seed=N.
 *
 * One operation hashes one 4 KiB block of the vCPU's buffer with FNV-1a over its 64-bit words
 * and stores the hash back into the block (xorshift-mixed), so each operation depends on the
 * last and the work cannot be optimised away. Every vCPU publishes its running operation count
 * in passes[cpu] of the GuestReport (kind REPORT_KIND_COMPUTE) and prints its operations per
 * second once per second of guest time.
 */
#include "livemig.h"

#define FNV_OFFSET 0xcbf29ce484222325UL
#define FNV_PRIME 0x100000001b3UL
#define BLOCK_WORDS (PAGE_SIZE / 8)

static volatile u32 published;

static u64 xorshift64(u64 x)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

static u64 hash_block(u64 *block)
{
	u64 h = FNV_OFFSET;
	for (u64 i = 0; i < BLOCK_WORDS; i++)
		h = (h ^ block[i]) * FNV_PRIME;
	return h;
}

int main(int cpu, const struct boot_info *bi)
{
	u64 buf_size = ALIGN_UP(arg_size("buf", 64UL << 10), PAGE_SIZE);
	u64 seconds = arg_u64("seconds", 0);
	u64 seed = arg_u64("seed", 1);
	u64 blocks = buf_size / PAGE_SIZE;
	u64 start = ALIGN_UP(bi->heap_start, PAGE_SIZE);
	volatile struct guest_report *r = GUEST_REPORT;

	if (!blocks || start + buf_size * bi->ncpus > bi->heap_end) {
		if (cpu == 0)
			printf("compute: buf=%lu per vCPU does not fit in the heap\n", buf_size);
		return 2;
	}
	if (cpu == 0) {
		r->magic = 0;
		barrier();
		r->kind = REPORT_KIND_COMPUTE;
		r->ws_start = start;
		r->ws_pages = blocks * bi->ncpus;
		r->nslices = bi->ncpus;
		for (int i = 0; i < MAX_CPUS; i++)
			r->passes[i] = 0;
		barrier();
		r->magic = REPORT_MAGIC;
		published = 1;
	} else {
		while (!published)
			cpu_relax();
	}

	u64 *buf = (u64 *)(start + buf_size * cpu);
	u64 x = seed * 0x9E3779B97F4A7C15UL + cpu + 1;
	for (u64 i = 0; i < buf_size / 8; i++) {
		x = xorshift64(x);
		buf[i] = x;
	}

	u64 t_start = clock_ns(), t_mark = t_start, ops = 0, ops_mark = 0, h = 0;
	for (;;) {
		u64 *block = buf + (ops % blocks) * BLOCK_WORDS;
		h = hash_block(block);
		block[h % BLOCK_WORDS] ^= xorshift64(h);
		r->passes[cpu] = ++ops;
		if (ops & 63)
			continue;
		u64 now = clock_ns();
		if (now - t_mark >= NS_PER_SEC) {
			u64 rate = (ops - ops_mark) * NS_PER_SEC / (now - t_mark);
			printf("compute: cpu%d %lu ops/s (total %lu, hash %lx)\n", cpu, rate, ops, h);
			t_mark = now;
			ops_mark = ops;
		}
		if (seconds && now - t_start >= seconds * NS_PER_SEC)
			break;
	}
	if (cpu == 0)
		printf("compute: done after %lu s, %lu ops on cpu0\n", seconds, ops);
	return 0;
}
