"""CPU state as data: every part survives a backend round trip and the vmstate encoding."""

from __future__ import annotations

import pytest

from livemig.errors import MachineError
from livemig.machine.cpu import CPU_VMSD, MSRS, CPUState
from livemig.machine.unicorn_cpu import UnicornCPU


def _busy_state(index: int = 1) -> CPUState:
    cpu = UnicornCPU(index)
    s = cpu.get_state()
    s.regs = [(0x1111_0000_0000_0000 * (i + 1) + i) & (2**64 - 1) for i in range(16)]
    s.rip = 0x10_2345
    s.rflags = 0x247  # CF, PF, ZF, IF... as a guest could leave them
    s.seg("fs").base = 0x7FFF_0000_1000
    s.seg("gs").base = 0x7FFF_0000_2000
    s.msrs["kernelgsbase"] = 0xFFFF_8000_0000_0000
    s.msrs["lstar"] = 0xFFFF_FFFF_8100_0000
    s.msrs["star"] = 0x0023_0010_0000_0000
    s.msrs["fmask"] = 0x4700
    s.msrs["sysenter_eip"] = 0x1234
    s.cr[1] = 0xDEAD_B000  # cr2
    s.dr[0] = 0x4000
    s.fpuc = 0x27F
    s.fpregs = [(0x8000_0000_0000_0000 | i, 0x3FFF + i) for i in range(8)]
    s.fptag = 0
    s.xmm = [(i + 1) * 0x0102_0304_0506_0708_090A_0B0C_0D0E_0F10 % 2**128 for i in range(16)]
    s.mxcsr = 0x1FA0
    s.halted = True
    return s


def test_backend_round_trip() -> None:
    want = _busy_state()
    cpu = UnicornCPU(1)
    cpu.set_state(want)
    got = cpu.get_state()
    got.halted = want.halted  # the machine, not the backend, keeps "halted"
    assert got == want
    assert got.fs_base == 0x7FFF_0000_1000 and got.gs_base == 0x7FFF_0000_2000
    assert set(got.msrs) == set(MSRS)
    assert got.msrs["efer"] & 0x500 == 0x500  # still in long mode


def test_vmstate_round_trip() -> None:
    want = _busy_state()
    data = want.encode()
    assert len(data) == CPU_VMSD.fixed_size()
    assert CPUState.decode(data) == want
    assert CPUState.vmsd is CPU_VMSD
    assert CPU_VMSD.describe()["vmsd_name"] == "cpu"


def test_fresh_cpu_has_real_reset_values() -> None:
    s = UnicornCPU(0).get_state()
    assert s.mxcsr == 0x1F80 and s.fpuc == 0x37F
    assert s.cr[0] & 1  # protected mode


def test_segment_hidden_state_the_backend_cannot_hold_is_refused() -> None:
    s = UnicornCPU(0).get_state()
    s.seg("cs").flags = 0xA09B00
    with pytest.raises(MachineError, match="segment cs"):
        UnicornCPU(0).set_state(s)


def test_batched_registers_agree_with_unicorns_own_reads() -> None:
    """get_state reads registers in batches through raw buffers (16-byte slots for FP and XMM
    registers, 2-byte selectors in 8-byte slots): every value must be what unicorn's own
    per-register API reads."""
    from unicorn import x86_const as x

    from livemig.machine import unicorn_cpu as U

    cpu = UnicornCPU(1)
    cpu.set_state(_busy_state())
    got = cpu.get_state()
    rd = cpu._uc.reg_read
    assert got.regs == [rd(r) for r in U._GPRS]
    assert got.cr == [rd(r) for r in U._CRS] and got.dr == [rd(r) for r in U._DRS]
    assert [s.selector for s in got.segs] == [rd(r) for r in U._SEGS]
    assert got.fs_base == rd(x.UC_X86_REG_FS_BASE) and got.gs_base == rd(x.UC_X86_REG_GS_BASE)
    assert got.rflags == rd(x.UC_X86_REG_RFLAGS)
    assert [tuple(p) for p in got.fpregs] == [tuple(rd(r)) for r in U._FPREGS]
    assert got.xmm == [rd(r) for r in U._XMMS]
    fpu = (got.fpuc, got.fpus, got.fptag, got.fpop, got.fpip, got.fpdp, got.fpcs, got.fpds,
           got.mxcsr)  # fmt: skip
    assert list(fpu) == [rd(r) for r in U._FPU]


def test_system_registers_batch_agrees_with_unicorns_own_reads() -> None:
    """rip, LDTR/TR/GDTR/IDTR and the MSRs come from one batch of structs: each must be what
    unicorn's per-register API reads, GDTR and IDTR with selector and flags zero."""
    from unicorn import x86_const as x

    cpu = UnicornCPU(1)
    want = _busy_state()
    want.gdt.base, want.gdt.limit = 0x7000, 0x37
    want.idt.base, want.idt.limit = 0x8000, 0xFFF
    cpu.set_state(want)
    uc = cpu._uc
    for _ in range(2):  # a second read starts from the slots the first one filled
        got = cpu.get_state()
        assert got.rip == uc.reg_read(x.UC_X86_REG_RIP) == 0x10_2345
        for seg, reg in ((got.ldt, x.UC_X86_REG_LDTR), (got.tr, x.UC_X86_REG_TR),
                         (got.gdt, x.UC_X86_REG_GDTR), (got.idt, x.UC_X86_REG_IDTR)):  # fmt: skip
            assert (seg.selector, seg.base, seg.limit, seg.flags) == tuple(uc.reg_read(reg))
        assert (got.gdt.base, got.gdt.limit, got.idt.base, got.idt.limit) == \
            (0x7000, 0x37, 0x8000, 0xFFF)  # fmt: skip
        assert got.msrs == {name: uc.msr_read(msr) for name, msr in MSRS.items()}
        assert got.msrs["lstar"] == 0xFFFF_FFFF_8100_0000
