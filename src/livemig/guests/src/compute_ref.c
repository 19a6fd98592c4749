/*
 * compute_ref.c - the host-side reference of the compute guest (see compute.h), built as a
 * shared library by livemig.guests.compute and called through ctypes.
 */
#include "compute.h"

/* Fill a vCPU's buffer as the guest does before its first operation. */
void compute_ref_fill(uint64_t *buf, uint64_t words, uint64_t seed, int cpu)
{
	compute_fill(buf, words, seed, cpu);
}

/* Apply operations first .. last-1 to buf, as the guest does. */
void compute_ref_run(uint64_t *buf, uint64_t blocks, uint64_t first, uint64_t last)
{
	for (uint64_t n = first; n < last; n++)
		compute_op(buf, blocks, n);
}
