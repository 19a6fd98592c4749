/*
 * vcpu_stop.c - the block hook through which livemig stops a unicorn vCPU exactly.
 *
 * unicorn's uc_emu_stop() called from another thread can stop a vCPU in the middle of an
 * instruction that has already written memory, and the vCPU then executes that instruction a
 * second time when it resumes (see livemig/machine/stop_hook.py for the whole story). So no
 * thread but the vCPU's own ever calls uc_emu_stop: a stopper only raises the flag below, and
 * this hook, which unicorn calls on the vCPU's thread at the start of every translation block,
 * turns the flag into uc_emu_stop there. unicorn has synced rip to the block's address just
 * before calling the hook, and the request is seen by the check at the block's start, before
 * any instruction of the block ran: the vCPU stops on an instruction boundary, every time.
 *
 * It is C, not a Python callback, because it runs at every block: a call into Python there
 * would slow the guest down many times; this costs a few nanoseconds.
 */
#include <stdint.h>

struct livemig_vcpu_stop {
	int32_t requested;	/* set by any thread, read here, cleared by the vCPU's owner */
	int32_t reserved;
	int (*emu_stop)(void *uc);	/* unicorn's uc_emu_stop, handed over by the loader */
	uint64_t stops;		/* how many times this hook stopped the vCPU */
};

void livemig_vcpu_stop_hook(void *uc, uint64_t address, uint32_t size, void *user)
{
	struct livemig_vcpu_stop *s = user;

	(void)address;
	(void)size;
	if (__atomic_load_n(&s->requested, __ATOMIC_ACQUIRE)) {
		s->stops++;
		s->emu_stop(uc);
	}
}
