/*
 * idle - a guest that does nothing but wait on the clock: vCPU 0 prints a heartbeat every
 * second of guest time (the sleep port lets the host vCPU thread sleep), the other vCPUs park.
 *
 * Boot arguments: seconds=N (exit after N heartbeats, 0 = forever), period_ms=N (default 1000).
 * The heartbeat count is published in passes[0] of the GuestReport (kind REPORT_KIND_IDLE), so
 * a gap in guest time (a migration's downtime) shows up in the clock the line prints.
 */
#include "livemig.h"

int main(int cpu, const struct boot_info *bi)
{
	(void)bi;
	if (cpu != 0)
		return 0;
	u64 seconds = arg_u64("seconds", 0);
	u64 period = arg_u64("period_ms", 1000) * 1000000UL;
	volatile struct guest_report *r = GUEST_REPORT;
	r->magic = 0;
	barrier();
	r->kind = REPORT_KIND_IDLE;
	r->ws_start = 0;
	r->ws_pages = 0;
	r->nslices = 1;
	for (int i = 0; i < MAX_CPUS; i++)
		r->passes[i] = 0;
	barrier();
	r->magic = REPORT_MAGIC;

	u64 t0 = clock_ns();
	for (u64 beat = 1; !seconds || beat <= seconds; beat++) {
		sleep_until_ns(t0 + beat * period);
		r->passes[0] = beat;
		printf("idle: heartbeat %lu at %lu ms\n", beat, (clock_ns() - t0) / 1000000UL);
	}
	return 0;
}
