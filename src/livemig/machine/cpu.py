"""A vCPU's architectural state as plain data, and the small interface a vCPU backend provides.

``CPUState`` holds everything a 64-bit guest can observe: the sixteen general registers, rip,
rflags, the six segment registers with their hidden parts (QEMU's ``SegmentCache``: selector,
base, limit, flags), LDTR/TR, GDTR/IDTR, control and debug registers, the MSRs of long mode,
and the x87/SSE state. It is encoded for a migration stream through ``CPU_VMSD`` (a
``VMStateDescription`` named ``cpu``, one section per vCPU, instance id = vCPU index), so the
binary form and the vmdesc JSON both come from that one declaration.

``CPUBackend`` is what the machine needs from an emulator; ``livemig.machine.unicorn_cpu``
implements it with unicorn. Another backend (KVM, a different TCG build) only has to provide
these few methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from livemig import vmstate as vs

GPR_NAMES = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip
SEGMENT_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")  # QEMU's R_ES..R_GS order

# Long-mode MSRs a 64-bit guest uses, by QEMU's field names.
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_FMASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_SYSENTER_CS = 0x174
MSR_SYSENTER_ESP = 0x175
MSR_SYSENTER_EIP = 0x176
MSR_PAT = 0x277

MSRS: dict[str, int] = {
    "efer": MSR_EFER,
    "star": MSR_STAR,
    "lstar": MSR_LSTAR,
    "cstar": MSR_CSTAR,
    "fmask": MSR_FMASK,
    "kernelgsbase": MSR_KERNEL_GS_BASE,
    "sysenter_cs": MSR_SYSENTER_CS,
    "sysenter_esp": MSR_SYSENTER_ESP,
    "sysenter_eip": MSR_SYSENTER_EIP,
    "pat": MSR_PAT,
}


@dataclass
class SegmentCache:
    """A segment register with its hidden part (QEMU: ``SegmentCache``)."""

    selector: int = 0
    base: int = 0
    limit: int = 0
    flags: int = 0


def _segment_values(s: SegmentCache) -> dict[str, int]:
    """``SEGMENT_VMSD``'s values of ``s``: ``dataclasses.asdict`` deep-copies, and for the ten
    segments of a vCPU that was 0.15 ms of a post-copy switch's downtime."""
    return {"selector": s.selector, "base": s.base, "limit": s.limit, "flags": s.flags}


@dataclass
class CPUState:
    """Everything needed to continue a vCPU exactly where it stopped."""

    vmsd: ClassVar[vs.VMStateDescription]  # CPU_VMSD, set below

    index: int = 0
    regs: list[int] = field(default_factory=lambda: [0] * 16)
    rip: int = 0
    rflags: int = 0x2
    segs: list[SegmentCache] = field(default_factory=lambda: [SegmentCache() for _ in range(6)])
    ldt: SegmentCache = field(default_factory=SegmentCache)
    tr: SegmentCache = field(default_factory=SegmentCache)
    gdt: SegmentCache = field(default_factory=SegmentCache)  # base and limit only
    idt: SegmentCache = field(default_factory=SegmentCache)  # base and limit only
    cr: list[int] = field(default_factory=lambda: [0] * 5)  # cr0, cr2, cr3, cr4, cr8
    dr: list[int] = field(default_factory=lambda: [0] * 8)
    msrs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MSRS, 0))
    fpuc: int = 0x37F
    fpus: int = 0  # status word, TOP included
    fptag: int = 0xFFFF  # full 2-bit-per-register tag word
    fpop: int = 0
    fpip: int = 0
    fpdp: int = 0
    fpcs: int = 0
    fpds: int = 0
    fpregs: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)] * 8)  # mant, exp
    xmm: list[int] = field(default_factory=lambda: [0] * 16)  # 128-bit values
    mxcsr: int = 0x1F80
    halted: bool = False

    # -- convenient names ---------------------------------------------------------------------

    def reg(self, name: str) -> int:
        """A general register by name (``"rax"`` ... ``"r15"``)."""
        return self.regs[GPR_NAMES.index(name)]

    def set_reg(self, name: str, value: int) -> None:
        self.regs[GPR_NAMES.index(name)] = value & 0xFFFF_FFFF_FFFF_FFFF

    def seg(self, name: str) -> SegmentCache:
        return self.segs[SEGMENT_NAMES.index(name)]

    @property
    def fs_base(self) -> int:
        return self.segs[SEGMENT_NAMES.index("fs")].base

    @property
    def gs_base(self) -> int:
        return self.segs[SEGMENT_NAMES.index("gs")].base

    # -- vmstate ------------------------------------------------------------------------------

    def to_vmstate(self) -> dict[str, Any]:
        """The field values ``CPU_VMSD`` encodes."""
        seg = _segment_values
        return {
            "cpu_index": self.index,
            "regs": list(self.regs),
            "rip": self.rip,
            "rflags": self.rflags,
            "segs": [seg(s) for s in self.segs],
            "ldt": seg(self.ldt),
            "tr": seg(self.tr),
            "gdt": seg(self.gdt),
            "idt": seg(self.idt),
            "cr": list(self.cr),
            "dr": list(self.dr),
            **{name: self.msrs[name] for name in MSRS},
            "fpuc": self.fpuc,
            "fpus": self.fpus,
            "fptag": self.fptag,
            "fpop": self.fpop,
            "fpip": self.fpip,
            "fpdp": self.fpdp,
            "fpcs": self.fpcs,
            "fpds": self.fpds,
            "fpregs": [m.to_bytes(8, "little") + e.to_bytes(2, "little") for m, e in self.fpregs],
            "xmm": [x.to_bytes(16, "little") for x in self.xmm],
            "mxcsr": self.mxcsr,
            "halted": self.halted,
        }

    @classmethod
    def from_vmstate(cls, v: dict[str, Any]) -> CPUState:
        """Rebuild a state from decoded ``CPU_VMSD`` values."""
        return cls(
            index=v["cpu_index"],
            regs=list(v["regs"]),
            rip=v["rip"],
            rflags=v["rflags"],
            segs=[SegmentCache(**s) for s in v["segs"]],
            ldt=SegmentCache(**v["ldt"]),
            tr=SegmentCache(**v["tr"]),
            gdt=SegmentCache(**v["gdt"]),
            idt=SegmentCache(**v["idt"]),
            cr=list(v["cr"]),
            dr=list(v["dr"]),
            msrs={name: v[name] for name in MSRS},
            fpuc=v["fpuc"],
            fpus=v["fpus"],
            fptag=v["fptag"],
            fpop=v["fpop"],
            fpip=v["fpip"],
            fpdp=v["fpdp"],
            fpcs=v["fpcs"],
            fpds=v["fpds"],
            fpregs=[
                (int.from_bytes(b[:8], "little"), int.from_bytes(b[8:10], "little"))
                for b in v["fpregs"]
            ],
            xmm=[int.from_bytes(b, "little") for b in v["xmm"]],
            mxcsr=v["mxcsr"],
            halted=bool(v["halted"]),
        )

    def encode(self) -> bytes:
        """The ``cpu`` section payload for this vCPU."""
        return CPU_VMSD.encode(self.to_vmstate())

    @classmethod
    def decode(cls, data: bytes | memoryview, version_id: int | None = None) -> CPUState:
        values, _ = CPU_VMSD.decode(data, 0, version_id)
        return cls.from_vmstate(values)


SEGMENT_VMSD = vs.vmsd(
    "segment", 1, [vs.u32("selector"), vs.u64("base"), vs.u32("limit"), vs.u32("flags")]
)

CPU_VMSD = vs.vmsd(
    "cpu",
    1,
    [
        vs.u32("cpu_index"),
        vs.u64("regs", 16),
        vs.u64("rip"),
        vs.u64("rflags"),
        vs.struct_field("segs", SEGMENT_VMSD, 6),
        vs.struct_field("ldt", SEGMENT_VMSD),
        vs.struct_field("tr", SEGMENT_VMSD),
        vs.struct_field("gdt", SEGMENT_VMSD),
        vs.struct_field("idt", SEGMENT_VMSD),
        vs.u64("cr", 5),
        vs.u64("dr", 8),
        *(vs.u64(name) for name in MSRS),
        vs.u16("fpuc"),
        vs.u16("fpus"),
        vs.u16("fptag"),
        vs.u16("fpop"),
        vs.u64("fpip"),
        vs.u64("fpdp"),
        vs.u16("fpcs"),
        vs.u16("fpds"),
        vs.buffer("fpregs", 10, 8),
        vs.buffer("xmm", 16, 16),
        vs.u32("mxcsr"),
        vs.boolean("halted"),
    ],
)


CPUState.vmsd = CPU_VMSD

# Why a vCPU's run call returned.
EXIT_STOPPED = "stopped"  # stop() was called (pause, shutdown request, device)
EXIT_HALTED = "halted"  # the guest executed hlt
EXIT_ERROR = "error"  # the guest faulted; the backend's error is attached


PortRead = Callable[[int, int, int], int]  # (cpu index, port, size) -> value
PortWrite = Callable[[int, int, int, int], None]  # (cpu index, port, size, value)


class CPUBackend(Protocol):
    """What the machine needs from a vCPU emulator (one instance per vCPU)."""

    index: int

    def map_ram(self, gpa: int, size: int, host_addr: int) -> None:
        """Make ``size`` bytes of host memory at ``host_addr`` guest-physical at ``gpa``."""

    def set_port_io(self, read: PortRead, write: PortWrite) -> None:
        """Route the guest's IN and OUT instructions to these callbacks."""

    def run(self) -> tuple[str, str | None]:
        """Run from the current rip until stopped; returns ``(EXIT_*, detail)``. Blocks."""

    def stop(self) -> None:
        """Ask a running ``run`` to return at the next instruction boundary (thread-safe)."""

    def get_state(self) -> CPUState:
        """The architectural state (only while not running)."""

    def set_state(self, state: CPUState) -> None:
        """Load an architectural state (only while not running)."""

    def flush_translations(self) -> None:
        """Forget cached translations: guest code in RAM was changed from the host side."""

    def close(self) -> None:
        """Release the emulator."""
