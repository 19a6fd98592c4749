/*
 * memstress - the migration workload. It dirties guest memory at a chosen rate in a way that
 * can be verified from outside at any instant (livemig.guests.memstress.check_invariant).
 *
 * Boot arguments: ws=SIZE (working set, default 16M), rate=N (dirtied pages per second over
 * all vCPUs, 0 = flat out), seed=N, passes=N (stop after N passes, 0 = forever),
 * mark_ms=N (at most one pass mark per N ms of guest time per vCPU, default 100; 0 = every pass),
 * comp=N (N percent of the pages get a pattern that repeats every 8 words, so that compression
 * has something to do; default 0: no page compresses).
 *
 * The working set starts at heap_start and is split into one contiguous slice per vCPU. Each
 * vCPU first fills every page of its slice with the page's pattern, then sweeps its slice in
 * order forever, adding one to the counter at the start of every page. Hence, at any
 * instruction boundary, counters along a slice are non-increasing with at most one step of
 * one, and passes[cpu] <= counter(last) <= counter(first) <= passes[cpu] + 1.
 */
#include "livemig.h"
#include "memstress.h"

/* Flat out, the pass mark looks at the clock once per this many pages written. */
#define MARK_CHECK_PAGES (32UL * 1024)

static volatile u32 published; /* vCPU 0 set the report up: the others may start */

static void fill_page(volatile u64 *page, u64 seed, u64 comp, u64 p)
{
	u64 h = page_hash(seed, p);
	u64 mask = pattern_index(seed, p, comp, ~0UL);
	for (u64 j = 1; j < PAGE_WORDS; j++)
		page[j] = h ^ ((j & mask) * PATTERN_STEP);
	page[0] = 0;
}

static void publish(u64 ws_start, u64 ws_pages, u32 nslices, u64 seed, u64 rate, u64 comp)
{
	volatile struct guest_report *r = GUEST_REPORT;
	volatile struct memstress_info *info = MEMSTRESS_INFO;
	r->magic = 0;
	info->magic = 0;
	barrier();
	r->kind = REPORT_KIND_MEMSTRESS;
	r->ws_start = ws_start;
	r->ws_pages = ws_pages;
	r->nslices = nslices;
	for (int i = 0; i < MAX_CPUS; i++) {
		r->passes[i] = 0;
		info->filled[i] = 0;
	}
	info->seed = seed;
	info->rate = rate;
	info->comp = comp;
	barrier();
	info->magic = MEMSTRESS_INFO_MAGIC;
	r->magic = REPORT_MAGIC;
}

int main(int cpu, const struct boot_info *bi)
{
	u32 nslices = bi->ncpus;
	u64 ws = arg_size("ws", 16UL << 20);
	u64 rate = arg_u64("rate", 0);
	u64 seed = arg_u64("seed", 1);
	u64 max_passes = arg_u64("passes", 0);
	u64 mark_ns = arg_u64("mark_ms", 100) * 1000000UL;
	u64 comp = arg_u64("comp", 0);
	u64 ws_start = ALIGN_UP(bi->heap_start, PAGE_SIZE);
	u64 ws_pages = ws / PAGE_SIZE;

	if (ws_start + ws_pages * PAGE_SIZE > bi->heap_end || ws_pages < nslices) {
		if (cpu == 0)
			printf("memstress: ws=%lu does not fit: heap is 0x%lx..0x%lx, %u vCPUs\n", ws,
			       ws_start, bi->heap_end, nslices);
		return 2;
	}
	if (cpu == 0) {
		publish(ws_start, ws_pages, nslices, seed, rate, comp > 100 ? 100 : comp);
		printf("memstress: ws 0x%lx + %lu pages, %u slices, rate %lu pages/s, seed %lu\n",
		       ws_start, ws_pages, nslices, rate, seed);
		published = 1;
	} else {
		while (!published)
			cpu_relax();
	}

	u64 first = ws_pages * cpu / nslices, end = ws_pages * (cpu + 1) / nslices;
	volatile struct guest_report *r = GUEST_REPORT;
	volatile u64 *filled = &MEMSTRESS_INFO->filled[cpu];
	for (u64 p = first; p < end; p++) {
		fill_page((volatile u64 *)(ws_start + p * PAGE_SIZE), seed, comp, p);
		barrier();
		*filled = p - first + 1;
	}

	/* Pacing: this vCPU's share of the rate, checked against the clock every ~1 ms of work. */
	u64 my_rate = rate / nslices + ((u64)cpu < rate % nslices);
	if (rate && !my_rate)
		my_rate = 1;
	u64 check_every = my_rate / 1000 ? my_rate / 1000 : 1;
	u64 t0 = clock_ns(), last_mark = t0, paced = 0, since_check = 0, since_mark = 0;

	for (u64 pass = 1;; pass++) {
		for (u64 p = first; p < end; p++) {
			volatile u64 *counter = (volatile u64 *)(ws_start + p * PAGE_SIZE);
			*counter = *counter + 1;
			if (!my_rate || ++since_check < check_every)
				continue;
			paced += since_check;
			since_check = 0;
			u64 due = t0 + paced * NS_PER_SEC / my_rate, now = clock_ns();
			if (now < due) {
				sleep_until_ns(due);
			} else if (now - due > NS_PER_SEC / 10) {
				/* Far behind (slow host): rebase rather than catch up in a burst. */
				t0 = now;
				paced = 0;
			}
		}
		r->passes[cpu] = pass;
		/* Every port access takes the host's attention (and its interpreter lock): flat out,
		 * look at the clock for the pass mark only every ~32K pages, not every pass. */
		since_mark += end - first;
		if (mark_ns && !my_rate && since_mark < MARK_CHECK_PAGES &&
		    !(max_passes && pass >= max_passes))
			continue;
		since_mark = 0;
		u64 now = clock_ns();
		if (!mark_ns || now - last_mark >= mark_ns) {
			last_mark = now;
			printf("memstress: cpu%d pass %lu\n", cpu, pass);
		}
		if (max_passes && pass >= max_passes)
			break;
	}

	if (cpu == 0) {
		for (u32 c = 1; c < nslices; c++)
			while (r->passes[c] < max_passes)
				sleep_us(1000);
		printf("memstress: done, %lu passes on %u vCPUs\n", max_passes, nslices);
	}
	return 0;
}
