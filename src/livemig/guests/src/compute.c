/*
 * compute - a CPU-bound guest, to measure how much a migration slows a guest down.
 *
 * Boot arguments: buf=SIZE (per-vCPU buffer, default 64K), seconds=N (exit after N seconds of
 * guest time, 0 = forever), seed=N.
 *
 * One operation hashes one 4 KiB block of the vCPU's buffer with FNV-1a over its 64-bit words
 * and stores the hash back into the block (xorshift-mixed, a read-modify-write), so each
 * operation depends on the last and the work cannot be optimised away (compute.h). Every vCPU
 * publishes its running operation count in passes[cpu] of the GuestReport (kind
 * REPORT_KIND_COMPUTE) right after each operation, and vCPU 0 publishes the seed and buffer
 * size in COMPUTE_INFO, so the host can recompute every buffer exactly
 * (livemig.guests.compute): at any instruction boundary a vCPU's buffer is the reference after
 * passes[cpu] or passes[cpu] + 1 operations. It prints its operations per second once per
 * second of guest time.
 */
#include "livemig.h"
#include "compute.h"

#define COMPUTE_INFO ((volatile struct compute_info *)(GUEST_REPORT_ADDR + 0x200))

static volatile u32 published;

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
		for (int i = 0; i < MAX_CPUS; i++)
			COMPUTE_INFO->filled[i] = 0;
		COMPUTE_INFO->seed = seed;
		COMPUTE_INFO->buf_size = buf_size;
		COMPUTE_INFO->magic = COMPUTE_INFO_MAGIC;
		barrier();
		r->magic = REPORT_MAGIC;
		published = 1;
	} else {
		while (!published)
			cpu_relax();
	}

	u64 *buf = (u64 *)(start + buf_size * cpu);
	compute_fill(buf, buf_size / 8, seed, cpu);
	barrier();
	COMPUTE_INFO->filled[cpu] = 1;

	u64 t_start = clock_ns(), t_mark = t_start, ops = 0, ops_mark = 0, h = 0;
	for (;;) {
		h = compute_op(buf, blocks, ops);
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
