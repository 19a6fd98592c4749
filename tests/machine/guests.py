"""Tiny assembly guests for the machine tests (AT&T syntax; see conftest.assemble)."""

HELLO_AND_EXIT_7 = r"""
    lea msg(%rip), %rsi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $0x501, %dx
    mov $7, %al
    out %al, %dx
3:  jmp 3b
msg: .asciz "hello\n"
"""

# Echo every received byte plus one, polling LSR bit 0 (data ready).
ECHO_PLUS_ONE = r"""
1:  mov $0x3fd, %dx
    in %dx, %al
    test $1, %al
    jz 1b
    mov $0x3f8, %dx
    in %dx, %al
    inc %al
    out %al, %dx
    jmp 1b
"""

# Keep storing the guest clock at 0x300000.
CLOCK_STORE = r"""
1:  mov $0x510, %dx
    in %dx, %eax
    mov %eax, %ecx
    mov $0x514, %dx
    in %dx, %eax
    shl $32, %rax
    or %rcx, %rax
    mov %rax, 0x300000
    jmp 1b
"""

# Sleep a second at a time, forever.
SLEEPER = r"""
1:  mov $0x518, %dx
    mov $1000000, %eax
    out %eax, %dx
    jmp 1b
"""

# Each vCPU counts in rax and stores the count twice in its own page at 0x300000 + cpu*4096:
# at any instruction boundary  rax-1 <= word1 <= word0 <= rax.
COUNTER = r"""
    mov %rdi, %rbx
    shl $12, %rbx
    add $0x300000, %rbx
    xor %eax, %eax
1:  inc %rax
    mov %rax, (%rbx)
    mov %rax, 8(%rbx)
    jmp 1b
"""

# A mixed workload whose registers (general, SSE, x87) all change: a CPU state that loses any
# part of itself makes the checksum at 0x300010 + cpu*4096 diverge from a replay.
MIXED = r"""
    mov %rdi, %rbx
    shl $12, %rbx
    add $0x300000, %rbx
    mov $1, %r8
    pxor %xmm1, %xmm1
    mov $3, %eax
    cvtsi2sd %rax, %xmm2
    fld1
1:  add %r8, %r9
    rol $7, %r9
    xor %r9, %r10
    paddq %xmm2, %xmm1
    fadd %st(0), %st(0)
    fld1
    fdivrp %st(0), %st(1)
    inc %r11
    mov %r11, (%rbx)
    mov %r10, 8(%rbx)
    jmp 1b
"""

UD2 = "    nop\n    ud2\n"
JUMP_NOWHERE = "    mov $0x7f0000000000, %rax\n    jmp *%rax\n"
HALT = "    hlt\n"

# Each vCPU increments a word of its own page with a read-modify-write instruction and counts
# the same in rcx, stores rcx beside it, adds 1 to a third word with lock xadd counting those
# adds in rdx, and xors rcx into a fourth. At any instruction boundary  rcx <= word0 <= rcx+1,
# word1 in {rcx-1, rcx} and rdx <= word3 <= rdx+1. An instruction executed twice after a pause
# (livemig issue #24) breaks these for good. (Each vCPU has its own words: a locked instruction
# is not atomic *between* vCPUs here, each runs its own emulator instance; see runtime.c.)
RMW_COUNTER = r"""
    mov %rdi, %rbx
    shl $12, %rbx
    add $0x300000, %rbx
    xor %ecx, %ecx
    xor %edx, %edx
1:  addq $1, (%rbx)
    inc %rcx
    mov %rcx, 8(%rbx)
    mov $1, %eax
    lock xadd %rax, 24(%rbx)
    inc %rdx
    xorq %rcx, 16(%rbx)
    jmp 1b
"""
