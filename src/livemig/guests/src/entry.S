/*
 * entry.S - the first instructions of every livemig guest (placed at LOAD_ADDR by guest.ld).
 *
 * The machine starts each vCPU here with RDI = cpu index, RSI = &boot_info, RSP = its stack.
 * vCPU 0 zeroes .bss; the others spin until it is done, because zeroing it under their feet
 * would wipe anything they had already stored there. Then every vCPU calls
 * lm_start(cpu, boot_info), which runs main and never returns.
 */
	.section .text.entry, "ax"
	.globl _start
	.type _start, @function
_start:
	mov	%rdi, %r12
	mov	%rsi, %r13
	/* The SysV ABI wants RSP 16-byte aligned at the call below. */
	and	$-16, %rsp
	test	%edi, %edi
	jnz	2f
	lea	__bss_start(%rip), %rdi
	lea	__bss_end(%rip), %rcx
	sub	%rdi, %rcx
	xor	%eax, %eax
	cld
	rep stosb
	/* lm_bss_ready lives in .data, outside the region just cleared. */
	movl	$1, lm_bss_ready(%rip)
	jmp	3f
2:	pause
	cmpl	$0, lm_bss_ready(%rip)
	je	2b
3:	mov	%r12, %rdi
	mov	%r13, %rsi
	call	lm_start
4:	hlt
	jmp	4b
	.size _start, . - _start

	.data
	.align 4
	.globl lm_bss_ready
lm_bss_ready:
	.long 0

	.section .note.GNU-stack, "", @progbits
