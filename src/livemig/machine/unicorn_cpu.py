"""The unicorn vCPU backend: one ``Uc`` instance in x86-64 long mode per vCPU.

unicorn is QEMU's TCG as a library. ``emu_start`` releases the GIL, so each vCPU runs in its
own thread in parallel. ``stop`` never calls unicorn's ``emu_stop`` from the calling thread:
that can stop a vCPU inside an instruction that already wrote memory and make it execute the
instruction again on resume (``livemig.machine.stop_hook`` explains it). It raises a flag that
a C block hook checks on the vCPU's own thread at the start of every translation block, so the
vCPU stops before the block's first instruction, rip is the next instruction to execute, and a
later ``run`` resumes without losing or repeating one. ``hlt`` also makes ``emu_start`` return,
with rip after the ``hlt``; the two are told apart by whether ``stop`` was called.

unicorn exposes only the selector of CS/DS/ES/SS and the base of FS/GS; the rest of their
hidden parts stay at the backend's long-mode reset values (base 0, limit 0, flags 0: in 64-bit
mode the CPU ignores them), and a flat 64-bit guest cannot change them without a GDT. The state
read here reports exactly those values, and ``set_state`` refuses any other.
"""

from __future__ import annotations

import ctypes
import importlib
import threading

from unicorn import UC_ARCH_X86, UC_HOOK_BLOCK, UC_HOOK_INSN, UC_MODE_64, UC_PROT_ALL, Uc, UcError
from unicorn import x86_const as x

from livemig.errors import MachineError
from livemig.machine import stop_hook
from livemig.machine.cpu import (
    EXIT_ERROR,
    EXIT_HALTED,
    EXIT_STOPPED,
    MSRS,
    SEGMENT_NAMES,
    CPUState,
    PortRead,
    PortWrite,
    SegmentCache,
)

_GPRS = [
    x.UC_X86_REG_RAX, x.UC_X86_REG_RCX, x.UC_X86_REG_RDX, x.UC_X86_REG_RBX,
    x.UC_X86_REG_RSP, x.UC_X86_REG_RBP, x.UC_X86_REG_RSI, x.UC_X86_REG_RDI,
    x.UC_X86_REG_R8, x.UC_X86_REG_R9, x.UC_X86_REG_R10, x.UC_X86_REG_R11,
    x.UC_X86_REG_R12, x.UC_X86_REG_R13, x.UC_X86_REG_R14, x.UC_X86_REG_R15,
]  # fmt: skip
_SEGS = [
    x.UC_X86_REG_ES, x.UC_X86_REG_CS, x.UC_X86_REG_SS,
    x.UC_X86_REG_DS, x.UC_X86_REG_FS, x.UC_X86_REG_GS,
]  # fmt: skip
_CRS = [x.UC_X86_REG_CR0, x.UC_X86_REG_CR2, x.UC_X86_REG_CR3, x.UC_X86_REG_CR4, x.UC_X86_REG_CR8]
_DRS = [getattr(x, f"UC_X86_REG_DR{i}") for i in range(8)]
_FPREGS = [getattr(x, f"UC_X86_REG_FP{i}") for i in range(8)]
_XMMS = [getattr(x, f"UC_X86_REG_XMM{i}") for i in range(16)]
_FS, _GS = SEGMENT_NAMES.index("fs"), SEGMENT_NAMES.index("gs")
_UNTIL_NEVER = 0xFFFF_FFFF_FFFF_FFFF
_uc_binding = importlib.import_module(Uc.__module__)
# Registers read and written by one uc_reg_*_batch call each, in this order (the order matters
# for writes: control registers first, then the rest; FS/GS bases after their selectors).
_SIMPLE = [*_DRS, *_GPRS, x.UC_X86_REG_RFLAGS, *_SEGS, x.UC_X86_REG_FS_BASE,
           x.UC_X86_REG_GS_BASE]  # fmt: skip
_FPU = [x.UC_X86_REG_FPCW, x.UC_X86_REG_FPSW, x.UC_X86_REG_FPTAG, x.UC_X86_REG_FOP,
        x.UC_X86_REG_FIP, x.UC_X86_REG_FDP, x.UC_X86_REG_FCS, x.UC_X86_REG_FDS,
        x.UC_X86_REG_MXCSR]  # fmt: skip
_WIDE = [*_FPREGS, *_XMMS]  # 16 bytes each: an 80-bit FP register (mantissa, exponent), an XMM


class _RegBatch:
    """Many registers in one C call: unicorn's uc_reg_read_batch / uc_reg_write_batch.

    The binding's own ``reg_read_batch`` still does a few Python steps per register; this
    keeps one ctypes buffer per group and makes one call for the whole group. A CPU state's
    ~90 registers took 0.36 ms to read and 0.22 ms to write one by one, all inside the blackout
    (each vCPU, on both sides). Every slot is ``slot`` bytes (8, or 16 for FP/XMM registers)
    and zeroed before a read, since unicorn writes only a register's own width (2 bytes for a
    selector): the little-endian rest reads as zero.
    """

    def __init__(self, lib: object, handle: object, regs: list[int], slot: int = 8) -> None:
        n = len(regs)
        self._lib, self._handle, self._n, self._slot = lib, handle, n, slot
        self._ids = (ctypes.c_int * n)(*regs)
        self._words = (ctypes.c_uint64 * (n * slot // 8))()
        base = ctypes.addressof(self._words)
        self._ptrs = (ctypes.c_void_p * n)(*(base + slot * i for i in range(n)))

    def prepare(self) -> None:
        """Ready the buffer for a read (``_ReadAll``, which reads every group at once)."""
        ctypes.memset(self._words, 0, ctypes.sizeof(self._words))

    def values(self) -> list[int]:
        """The registers as the last read left them."""
        w = self._words
        if self._slot == 8:
            return list(w)
        return [w[2 * i] | w[2 * i + 1] << 64 for i in range(self._n)]

    def write(self, values: list[int]) -> None:
        mask = (1 << 64) - 1
        if self._slot == 8:
            self._words[:] = [v & mask for v in values]
        else:
            self._words[:] = [part for v in values for part in (v & mask, v >> 64 & mask)]
        status = self._lib.uc_reg_write_batch(self._handle, self._ids, self._ptrs, self._n)
        if status:
            raise UcError(status)


class _MMR(ctypes.Structure):
    """unicorn's ``uc_x86_mmr`` (LDTR, TR, GDTR, IDTR)."""

    _fields_ = [("selector", ctypes.c_uint16), ("base", ctypes.c_uint64),
                ("limit", ctypes.c_uint32), ("flags", ctypes.c_uint32)]  # fmt: skip


class _MSR(ctypes.Structure):
    """unicorn's ``uc_x86_msr``: which MSR (``rid``, set before a read) and its value."""

    _fields_ = [("rid", ctypes.c_uint32), ("value", ctypes.c_uint64)]


_MMRS = [x.UC_X86_REG_LDTR, x.UC_X86_REG_TR, x.UC_X86_REG_GDTR, x.UC_X86_REG_IDTR]


class _SystemRegs:
    """rip, the four memory-management registers and the MSRs: the buffers ``_ReadAll`` fills.

    Through the binding they took 15 calls of several Python steps each: 70 us of a warm
    ``get_state``, more right after the vCPU ran, inside the downtime of a post-copy switch.
    The structs are zeroed before a read (GDTR and IDTR get only base and limit, as through
    the binding, whose fresh struct is zeroed); each MSR slot keeps its ``rid``.
    """

    def __init__(self) -> None:
        self._rip = ctypes.c_uint64()
        self._mmrs = (_MMR * len(_MMRS))()
        self._msrs = (_MSR * len(MSRS))()
        regs = [x.UC_X86_REG_RIP, *_MMRS, *[x.UC_X86_REG_MSR] * len(MSRS)]
        slots = [self._rip, *self._mmrs, *self._msrs]
        self._ids = (ctypes.c_int * len(regs))(*regs)
        self._ptrs = (ctypes.c_void_p * len(regs))(*(ctypes.addressof(v) for v in slots))

    def prepare(self) -> None:
        ctypes.memset(self._mmrs, 0, ctypes.sizeof(self._mmrs))
        for slot, rid in zip(self._msrs, MSRS.values(), strict=True):
            slot.rid, slot.value = rid, 0

    def values(self) -> tuple[int, list[SegmentCache], dict[str, int]]:
        """(rip, [LDTR, TR, GDTR, IDTR], {MSR name: value}) as the last read left them."""
        mmrs = [SegmentCache(m.selector, m.base, m.limit, m.flags) for m in self._mmrs]
        return self._rip.value, mmrs, {n: m.value for n, m in zip(MSRS, self._msrs, strict=True)}


class _ReadAll:
    """Several register groups read by one uc_reg_read_batch call: a CPU state took five
    (one per group), each a ctypes call of its own, inside a switch-over's downtime."""

    def __init__(self, lib: object, handle: object, groups: list) -> None:
        self._lib, self._handle, self._groups = lib, handle, groups
        ids = [i for g in groups for i in g._ids]
        ptrs = [p for g in groups for p in g._ptrs]
        self._n = len(ids)
        self._ids = (ctypes.c_int * self._n)(*ids)
        self._ptrs = (ctypes.c_void_p * self._n)(*ptrs)

    def read(self) -> list:
        """Each group's ``values()``, in order."""
        for g in self._groups:
            g.prepare()
        status = self._lib.uc_reg_read_batch(self._handle, self._ids, self._ptrs, self._n)
        if status:
            raise UcError(status)
        return [g.values() for g in self._groups]


class UnicornCPU:
    """A ``CPUBackend`` on unicorn: one x86-64 vCPU."""

    def __init__(self, index: int) -> None:
        self.index = index
        self._uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self._hook_error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = stop_hook.StopFlag()
        self._install_stop_hook()
        lib, handle = _uc_binding.uclib, self._uc._uch  # checked by _install_stop_hook
        self._crs = _RegBatch(lib, handle, _CRS)
        self._simple = _RegBatch(lib, handle, _SIMPLE)
        self._fpu = _RegBatch(lib, handle, _FPU)
        self._wide = _RegBatch(lib, handle, _WIDE, slot=16)
        self._system = _SystemRegs()
        self._all = _ReadAll(lib, handle, [self._simple, self._fpu, self._wide, self._system,
                                           self._crs])  # fmt: skip
        # unicorn's reset leaves FPCW and MXCSR at 0 (all exceptions unmasked); a real CPU
        # resets them to these values and compilers assume them.
        self._uc.reg_write(x.UC_X86_REG_FPCW, 0x37F)
        self._uc.reg_write(x.UC_X86_REG_MXCSR, 0x1F80)

    def _install_stop_hook(self) -> None:
        # The binding keeps its ctypes library and engine handle in these two attributes (2.1
        # onwards); the hook is a C function pointer, which its hook_add (Python callbacks
        # only) cannot take.
        lib = getattr(_uc_binding, "uclib", None)
        handle = getattr(self._uc, "_uch", None)
        if lib is None or handle is None:
            raise MachineError(
                "this unicorn Python binding does not expose uclib / Uc._uch, which livemig's "
                "vCPU stop hook needs (install unicorn 2.1.x)"
            )
        self._stop.emu_stop = ctypes.cast(lib.uc_emu_stop, ctypes.c_void_p).value
        hook = ctypes.c_size_t()
        status = lib.uc_hook_add(
            handle,
            ctypes.byref(hook),
            UC_HOOK_BLOCK,
            ctypes.c_void_p(stop_hook.hook_address()),
            ctypes.cast(ctypes.pointer(self._stop), ctypes.c_void_p),
            ctypes.c_uint64(1),
            ctypes.c_uint64(0),
        )
        if status:
            raise MachineError(f"vCPU {self.index}: cannot add the stop hook: {UcError(status)}")

    @property
    def hook_stops(self) -> int:
        """How many times the stop hook stopped this vCPU."""
        return int(self._stop.stops)

    def map_ram(self, gpa: int, size: int, host_addr: int) -> None:
        try:
            self._uc.mem_map_ptr(gpa, size, UC_PROT_ALL, host_addr)
        except UcError as exc:
            raise MachineError(
                f"vCPU {self.index}: cannot map {size:#x} bytes of RAM at gpa {gpa:#x}: {exc}"
            ) from exc

    def set_port_io(self, read: PortRead, write: PortWrite) -> None:
        index = self.index

        def on_in(uc: Uc, port: int, size: int, _user: object) -> int:
            try:
                return read(index, port, size)
            except BaseException as exc:  # a device bug must not vanish inside ctypes
                self._fail_in_hook(exc)
                return 0

        def on_out(uc: Uc, port: int, size: int, value: int, _user: object) -> None:
            try:
                write(index, port, size, value)
            except BaseException as exc:
                self._fail_in_hook(exc)

        self._uc.hook_add(UC_HOOK_INSN, on_in, None, 1, 0, x.UC_X86_INS_IN)
        self._uc.hook_add(UC_HOOK_INSN, on_out, None, 1, 0, x.UC_X86_INS_OUT)

    def _fail_in_hook(self, exc: BaseException) -> None:
        # On the vCPU's own thread, inside a port-I/O instruction that touches no memory: the
        # guest is failing anyway, and stopping right here reports the rip of the fault.
        self._hook_error = exc
        self._uc.emu_stop()

    def run(self) -> tuple[str, str | None]:
        uc = self._uc
        rip = uc.reg_read(x.UC_X86_REG_RIP)
        try:
            uc.emu_start(rip, _UNTIL_NEVER)
        except UcError as exc:
            rip = uc.reg_read(x.UC_X86_REG_RIP)
            return EXIT_ERROR, f"vCPU {self.index}: {exc} at rip {rip:#x}"
        if self._hook_error is not None:
            err, self._hook_error = self._hook_error, None
            return EXIT_ERROR, f"vCPU {self.index}: device error: {err!r}"
        with self._lock:
            stopped, self._stop.requested = bool(self._stop.requested), 0
        return (EXIT_STOPPED, None) if stopped else (EXIT_HALTED, None)

    def stop(self) -> None:
        """Ask the vCPU to stop at the start of its next translation block (any thread).

        A request made while the vCPU is not running stops its next run before the first
        instruction, unless ``clear_stop`` forgets it first.
        """
        with self._lock:
            self._stop.requested = 1

    def clear_stop(self) -> None:
        """Forget a stop request that arrived while not running (the caller re-checks flags)."""
        with self._lock:
            self._stop.requested = 0

    # -- state --------------------------------------------------------------------------------

    def get_state(self) -> CPUState:
        simple, fpu, wide, system, crs = self._all.read()
        nd, ng = len(_DRS), len(_GPRS)
        dr, regs, rflags = simple[:nd], simple[nd : nd + ng], simple[nd + ng]
        sels = simple[nd + ng + 1 : nd + ng + 1 + len(_SEGS)]
        fs_base, gs_base = simple[-2:]
        segs = [SegmentCache(selector=sel) for sel in sels]
        segs[_FS].base = fs_base
        segs[_GS].base = gs_base
        fpuc, fpus, fptag, fpop, fpip, fpdp, fpcs, fpds, mxcsr = fpu
        nf = len(_FPREGS)
        # an FP register's slot: the 64-bit mantissa, then the 16-bit sign and exponent
        fpregs = [(v & 0xFFFF_FFFF_FFFF_FFFF, v >> 64 & 0xFFFF) for v in wide[:nf]]
        rip, (ldt, tr, gdt, idt), msrs = system
        return CPUState(
            index=self.index,
            regs=regs,
            rip=rip,
            rflags=rflags,
            segs=segs,
            ldt=ldt,
            tr=tr,
            gdt=gdt,
            idt=idt,
            cr=crs,
            dr=dr,
            msrs=msrs,
            fpuc=fpuc,
            fpus=fpus,
            fptag=fptag,
            fpop=fpop,
            fpip=fpip,
            fpdp=fpdp,
            fpcs=fpcs,
            fpds=fpds,
            fpregs=fpregs,
            xmm=wide[nf:],
            mxcsr=mxcsr,
        )

    def set_state(self, state: CPUState) -> None:
        try:
            self._set_state(state)
        except UcError as exc:
            raise MachineError(f"vCPU {self.index}: cannot load CPU state: {exc}") from exc

    def _set_state(self, s: CPUState) -> None:
        uc = self._uc
        wr = uc.reg_write
        for name, seg in zip(SEGMENT_NAMES, s.segs, strict=True):
            movable_base = name in ("fs", "gs")
            if seg.limit or seg.flags or (seg.base and not movable_base):
                raise MachineError(
                    f"vCPU {self.index}: segment {name} has hidden state {seg} that the unicorn "
                    "backend cannot load (it keeps the flat long-mode descriptors)"
                )
        if len(s.regs) != len(_GPRS) or len(s.dr) != len(_DRS) or len(s.cr) != len(_CRS) \
                or len(s.segs) != len(_SEGS) or len(s.fpregs) != len(_FPREGS) \
                or len(s.xmm) != len(_XMMS):  # fmt: skip
            raise MachineError(f"vCPU {self.index}: CPU state has the wrong number of registers")
        # Control registers and EFER first: they decide how the rest is interpreted.
        self._crs.write(s.cr)
        for name, msr in MSRS.items():
            uc.msr_write(msr, s.msrs[name])
        # (in _SIMPLE's order: writing an FS/GS selector reloads its base, so the bases last)
        self._simple.write([*s.dr, *s.regs, s.rflags, *(seg.selector for seg in s.segs),
                            s.segs[_FS].base, s.segs[_GS].base])  # fmt: skip
        wr(x.UC_X86_REG_LDTR, _tuple(s.ldt))
        wr(x.UC_X86_REG_TR, _tuple(s.tr))
        wr(x.UC_X86_REG_GDTR, _tuple(s.gdt))
        wr(x.UC_X86_REG_IDTR, _tuple(s.idt))
        self._wide.write([mant | (exp & 0xFFFF) << 64 for mant, exp in s.fpregs] + list(s.xmm))
        self._fpu.write([s.fpuc, s.fpus, s.fptag, s.fpop, s.fpip, s.fpdp, s.fpcs, s.fpds,
                         s.mxcsr])  # fmt: skip
        wr(x.UC_X86_REG_RIP, s.rip)

    def flush_translations(self) -> None:
        self._uc.ctl_flush_tb()

    def close(self) -> None:
        # Dropping the last reference frees the engine; unmapping first keeps unicorn from
        # touching host memory that the machine is about to unmap.
        for begin, end, _perms in list(self._uc.mem_regions()):
            self._uc.mem_unmap(begin, end - begin + 1)


def _tuple(seg: SegmentCache) -> tuple[int, int, int, int]:
    return (seg.selector, seg.base, seg.limit, seg.flags)
