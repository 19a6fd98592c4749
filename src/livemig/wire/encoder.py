"""Sans-IO encoder of the main migration stream: give events, get buffers for ``sendmsg``.

``Encoder.send(event)`` returns a list of bytes-like buffers whose concatenation is the wire
form of the event. Page data is never copied: ``encode_pages`` returns the record headers built
in one numpy array and memoryview slices of guest RAM interleaved with them. The encoder keeps
QEMU's "last sent block" so that only the first page record after a block change names it
(later ones carry CONTINUE); ``reset_block()`` forgets it (new migration, postcopy resume).
Device sections (FULL) are encoded through the ``VMStateDescription`` registered for their
idstr, and remembered, so ``vmdesc()`` can describe them for the trailer.

The caller chunks the buffer list for ``sendmsg`` (IOV_MAX, 1024 on Linux).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from livemig import iovec
from livemig.errors import StreamError
from livemig.vmstate import VMStateDescription
from livemig.wire import constants as C
from livemig.wire import events as E
from livemig.wire.vmdesc import build_vmdesc, configuration_entry, dump_vmdesc

Buffers = list[bytes | memoryview]

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def cstr(text: str) -> bytes:
    """A counted string (u8 length + bytes)."""
    raw = text.encode()
    if len(raw) > 255:
        raise ValueError(f"{text!r:.40}: counted strings hold at most 255 bytes")
    return bytes((len(raw),)) + raw


def _byte_view(ram: Any) -> memoryview:
    mem = memoryview(ram)
    return mem if mem.format == "B" and mem.ndim == 1 else mem.cast("B")


def _command(cmd: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BHH", C.QEMU_VM_COMMAND, cmd, len(payload)) + payload


class PageGather(iovec.Gather):
    """PAGE records ``words[i]`` + page ``offsets[i]`` of ``ram``, for every i, as iovec rows."""

    def __init__(self, words: np.ndarray, ram: memoryview, offsets: np.ndarray, ps: int) -> None:
        self.words, self.ram, self.offsets, self.page_size = words, ram, offsets, ps
        self.nbytes = len(offsets) * (8 + ps)

    def iov(self) -> np.ndarray:
        n = len(self.offsets)
        rows = np.empty((2 * n, 2), np.uint64)
        rows[0::2, 0] = np.uint64(self.words.ctypes.data) + np.arange(0, 8 * n, 8, dtype=np.uint64)
        rows[0::2, 1] = 8
        rows[1::2, 0] = np.uint64(iovec.address(self.ram)[0]) + self.offsets
        rows[1::2, 1] = self.page_size
        return rows

    def buffers(self) -> list[memoryview]:
        heads = memoryview(self.words.view(np.uint8))
        ps = self.page_size
        out = []
        for i, o in enumerate(self.offsets.tolist()):
            out += [heads[8 * i : 8 * i + 8], self.ram[o : o + ps]]
        return out


class Encoder:
    """Turns main-stream events into buffers (see ``livemig.wire`` for the API)."""

    def __init__(
        self,
        *,
        page_size: int = C.TARGET_PAGE_SIZE,
        capabilities: frozenset[str] | set[str] | tuple[str, ...] = (),
        block_page_sizes: Mapping[str, int] | None = None,
        host_page_size: int = C.TARGET_PAGE_SIZE,
        devices: Mapping[str, VMStateDescription] | None = None,
        section_footers: bool = True,
    ) -> None:
        self.page_size = page_size
        self.capabilities = frozenset(capabilities)
        self._block_page_sizes = dict(block_page_sizes or {})
        self._host_page_size = host_page_size
        self.devices: dict[str, VMStateDescription] = dict(devices or {})
        self.section_footers = section_footers
        self.last_block: str | None = None
        self.bytes_sent = 0
        self._described: list[tuple[str, int, VMStateDescription, Mapping[str, Any]]] = []
        self._described_keys: set[tuple[str, int]] = set()
        # called with (idstr, instance_id, version_id, payload) of every FULL section encoded
        # (livemig's checksums hash device state as it goes out)
        self.on_full: Any = None
        self._configuration_desc: dict[str, Any] | None = None

    def reset_block(self) -> None:
        """Forget the last sent block: the next page record names its block again."""
        self.last_block = None

    def _account(self, bufs: Buffers) -> Buffers:
        self.bytes_sent += sum(len(b) if isinstance(b, bytes) else b.nbytes for b in bufs)
        return bufs

    # -- generic --------------------------------------------------------------------------

    def send(self, event: E.Event) -> Buffers:
        """Buffers of one event; their concatenation is its wire form."""
        if isinstance(event, E.RamPages):
            return self.encode_pages(event.block, event.offsets, event.data)
        if isinstance(event, E.RamZeroPages):
            return self.encode_zero_pages(event.block, event.offsets, event.fill)
        return self._account(self._encode(event))

    def postcopy_discards(self, block: str, ranges: np.ndarray) -> Buffers:
        """``send(PostcopyRamDiscard(block, rows))`` for each run of at most 12 rows of
        ``ranges`` ((n, 2) [start, length) in bytes), in order, as one buffer: the same bytes,
        made at once. With a busy guest the switch sends hundreds of single-page ranges, and
        one ``send`` per command cost ~0.1 ms inside the downtime."""
        per = C.MAX_DISCARDS_PER_COMMAND
        raw = np.ascontiguousarray(ranges, dtype=">u8").view(np.uint8).reshape(-1, 16)
        head = b"\x00" + cstr(block) + b"\x00"
        full, rest = divmod(len(raw), per)
        if full < 4:  # a few commands: the array costs more than it saves
            out = b"".join(_command(C.Command.POSTCOPY_RAM_DISCARD, head + raw[i : i + per].tobytes())
                           for i in range(0, len(raw), per))  # fmt: skip
            return self._account([out])
        # the full commands as rows of one array: the same header, then 12 ranges
        first = _command(C.Command.POSTCOPY_RAM_DISCARD, head + bytes(16 * per))[: -16 * per]
        rows = np.empty((full, len(first) + 16 * per), dtype=np.uint8)
        rows[:, : len(first)] = np.frombuffer(first, dtype=np.uint8)
        rows[:, len(first) :] = raw[: full * per].reshape(full, 16 * per)
        out = rows.tobytes()
        if rest:
            out += _command(C.Command.POSTCOPY_RAM_DISCARD, head + raw[full * per :].tobytes())
        return self._account([out])

    def to_bytes(self, event: E.Event) -> bytes:
        """The wire form of one event as a single bytes object (copies)."""
        return b"".join(self.send(event))

    def _encode(self, ev: E.Event) -> Buffers:
        if isinstance(ev, E.Header):
            return [struct.pack(">II", C.QEVM_MAGIC, ev.version)]
        if isinstance(ev, E.Configuration):
            return [self._configuration(ev)]
        if isinstance(ev, E.SectionStart):
            head = struct.pack(">BI", C.QEMU_VM_SECTION_START, ev.section_id)
            return [head + cstr(ev.idstr) + struct.pack(">II", ev.instance_id, ev.version_id)]
        if isinstance(ev, E.SectionPart):
            return [struct.pack(">BI", C.QEMU_VM_SECTION_PART, ev.section_id)]
        if isinstance(ev, E.SectionEnd):
            return [struct.pack(">BI", C.QEMU_VM_SECTION_END, ev.section_id)]
        if isinstance(ev, E.SectionFooter):
            return [self._footer(ev.section_id)]
        if isinstance(ev, E.SectionFull):
            return [self._full(ev)]
        if isinstance(ev, E.Eof):
            return [bytes((C.QEMU_VM_EOF,))]
        if isinstance(ev, E.VMDescription):
            raw = dump_vmdesc(ev.description)
            return [struct.pack(">BI", C.QEMU_VM_VMDESCRIPTION, len(raw)) + raw]
        if isinstance(ev, E.RamSetup):
            return [self._setup(ev)]
        if isinstance(ev, E.RamEos):
            return [_BE64.pack(C.RAM_SAVE_FLAG_EOS)]
        if isinstance(ev, E.RamMultifdFlush):
            return [_BE64.pack(C.RAM_SAVE_FLAG_MULTIFD_FLUSH)]
        if isinstance(ev, E.RamHook):
            return [_BE64.pack(C.RAM_SAVE_FLAG_HOOK)]
        if isinstance(ev, E.RamXbzrlePage):
            if len(ev.data) > self.page_size:
                raise ValueError("XBZRLE data longer than a page: send a normal page instead")
            head = self._page_head(ev.block, ev.offset, C.RAM_SAVE_FLAG_XBZRLE)
            return [head + struct.pack(">BH", C.ENCODING_FLAG_XBZRLE, len(ev.data)), ev.data]
        if isinstance(ev, E.RamCompressedPage):
            head = self._page_head(ev.block, ev.offset, C.RAM_SAVE_FLAG_COMPRESS_PAGE)
            return [head + _BE32.pack(len(ev.data)), ev.data]
        return [self._command(ev)]

    def _configuration(self, ev: E.Configuration) -> bytes:
        name = ev.machine_type.encode()
        out = bytearray(struct.pack(">BI", C.QEMU_VM_CONFIGURATION, len(name)) + name)

        def sub(sname: str, body: bytes) -> None:
            out.extend(bytes((C.QEMU_VM_SUBSECTION,)) + cstr(sname) + _BE32.pack(1) + body)

        if ev.target_page_bits is not None:
            sub("configuration/target-page-bits", _BE32.pack(ev.target_page_bits))
        if ev.capabilities is not None:
            caps = b"".join(cstr(c) for c in ev.capabilities)
            sub("configuration/capabilities", _BE32.pack(len(ev.capabilities)) + caps)
        if ev.uuid is not None:
            if len(ev.uuid) != 16:
                raise ValueError("a VM UUID is 16 bytes")
            sub("configuration/uuid", ev.uuid)
        self.capabilities |= frozenset(ev.capabilities or ())
        self._configuration_desc = configuration_entry(
            ev.machine_type, ev.capabilities, ev.target_page_bits, ev.uuid
        )
        return bytes(out)

    def _footer(self, section_id: int) -> bytes:
        return (
            struct.pack(">BI", C.QEMU_VM_SECTION_FOOTER, section_id)
            if self.section_footers
            else b""
        )

    def _full(self, ev: E.SectionFull) -> bytes:
        vmsd = self.devices.get(ev.idstr)
        if vmsd is None:
            raise StreamError(f"no VMStateDescription registered for device {ev.idstr!r}")
        head = struct.pack(">BI", C.QEMU_VM_SECTION_FULL, ev.section_id) + cstr(ev.idstr)
        head += struct.pack(">II", ev.instance_id, ev.version_id)
        if (ev.idstr, ev.instance_id) not in self._described_keys:
            # one entry per device, as QEMU's: a section sent many times (livemig's
            # x-checksum) is described once
            self._described_keys.add((ev.idstr, ev.instance_id))
            self._described.append((ev.idstr, ev.instance_id, vmsd, ev.state))
        payload = vmsd.encode(ev.state)
        if self.on_full is not None:
            self.on_full(ev.idstr, ev.instance_id, ev.version_id, payload)
        return head + payload + self._footer(ev.section_id)

    def vmdesc(self) -> E.VMDescription:
        """The VMDESCRIPTION event describing every FULL section sent so far."""
        return E.VMDescription(
            build_vmdesc(self._described, self.page_size, self._configuration_desc)
        )

    def _setup(self, ev: E.RamSetup) -> bytes:
        out = bytearray(_BE64.pack(ev.total | C.RAM_SAVE_FLAG_MEM_SIZE))
        for b in ev.blocks:
            out += cstr(b.idstr) + _BE64.pack(b.used_length)
            if C.CAP_POSTCOPY_RAM in self.capabilities and (
                self._block_page_sizes.get(b.idstr, self._host_page_size) != self._host_page_size
            ):
                out += _BE64.pack(b.page_size or self._block_page_sizes[b.idstr])
            if C.CAP_X_IGNORE_SHARED in self.capabilities:
                out += _BE64.pack(b.mr_addr or 0)
            if C.CAP_MAPPED_RAM in self.capabilities:
                raise StreamError("mapped-ram streams are file layouts: not encoded here")
        return bytes(out)

    def _page_head(self, block: str, offset: int, flag: int) -> bytes:
        if offset % self.page_size:
            raise ValueError(f"page offset {offset:#x} is not page aligned")
        if block == self.last_block:
            return _BE64.pack(offset | flag | C.RAM_SAVE_FLAG_CONTINUE)
        self.last_block = block
        return _BE64.pack(offset | flag) + cstr(block)

    def _command(self, ev: E.Event) -> bytes:
        Cm = C.Command
        if isinstance(ev, E.OpenReturnPath):
            return _command(Cm.OPEN_RETURN_PATH)
        if isinstance(ev, E.Ping):
            return _command(Cm.PING, _BE32.pack(ev.value))
        if isinstance(ev, E.PostcopyAdvise):
            if ev.page_size_summary is None:
                return _command(Cm.POSTCOPY_ADVISE)
            body = struct.pack(">QQ", ev.page_size_summary, ev.target_page_size or 0)
            return _command(Cm.POSTCOPY_ADVISE, body)
        if isinstance(ev, E.PostcopyListen):
            return _command(Cm.POSTCOPY_LISTEN)
        if isinstance(ev, E.PostcopyRun):
            return _command(Cm.POSTCOPY_RUN)
        if isinstance(ev, E.PostcopyRamDiscard):
            if len(ev.ranges) > C.MAX_DISCARDS_PER_COMMAND:
                raise ValueError("at most 12 ranges per POSTCOPY_RAM_DISCARD command")
            body = b"\x00" + cstr(ev.block) + b"\x00"
            body += b"".join(struct.pack(">QQ", s, n) for s, n in ev.ranges)
            return _command(Cm.POSTCOPY_RAM_DISCARD, body)
        if isinstance(ev, E.Packaged):
            if len(ev.data) > C.MAX_PACKAGED_SIZE:
                raise ValueError("a package holds at most 16 MiB")
            return _command(Cm.PACKAGED, _BE32.pack(len(ev.data))) + bytes(ev.data)
        if isinstance(ev, E.EnableColo):
            return _command(Cm.ENABLE_COLO)
        if isinstance(ev, E.PostcopyResume):
            return _command(Cm.POSTCOPY_RESUME)
        if isinstance(ev, E.RecvBitmap):
            return _command(Cm.RECV_BITMAP, cstr(ev.block))
        if isinstance(ev, E.SwitchoverStart):
            return _command(Cm.SWITCHOVER_START)
        raise TypeError(f"not a main-stream event: {ev!r}")

    # -- batches of pages -----------------------------------------------------------------

    def _words(self, offsets: np.ndarray, flag: int) -> np.ndarray:
        offs = np.asarray(offsets, dtype=np.uint64)
        if len(offs) and int((offs & np.uint64(self.page_size - 1)).max()):
            raise ValueError("page offsets must be page aligned")
        return (offs | np.uint64(flag | C.RAM_SAVE_FLAG_CONTINUE)).astype(">u8")

    def _lead(self, block: str, words: np.ndarray, first_page: memoryview) -> Buffers:
        """The first record when ``block`` is not the last one named: it names the block, the
        rest continue it. [] when it is."""
        if block == self.last_block:
            return []
        self.last_block = block
        w = int(words[0]) & ~C.RAM_SAVE_FLAG_CONTINUE
        return [_BE64.pack(w) + cstr(block), first_page]

    def encode_pages_gather(self, block: str, offsets: np.ndarray, ram: memoryview | bytes) -> list:
        """``encode_pages`` for the whole block ``ram`` (1-D), with the records after the first
        as one ``PageGather``: headers and pages as address rows, no Python object per page
        (``livemig/iovec.py``). For ``Channel.sendv``; ``PageGather.buffers()`` gives the
        plain form."""
        ps = self.page_size
        n = len(offsets)
        if n == 0:
            return []
        mem = _byte_view(ram)
        offs = np.asarray(offsets, dtype=np.uint64)
        if int(offs.max()) + ps > len(mem):
            raise ValueError(f"page offset {int(offs.max()):#x} outside the {len(mem)}-byte block")
        words = self._words(offs, C.RAM_SAVE_FLAG_PAGE)
        first = int(offs[0])
        out: list = self._lead(block, words, mem[first : first + ps])
        rest = 1 if out else 0
        if rest < n:
            out.append(PageGather(words[rest:], mem, offs[rest:], ps))
        self.bytes_sent += n * (8 + ps) + (len(out[0]) - 8 if rest else 0)
        return out

    def encode_pages(
        self, block: str, offsets: np.ndarray, ram: memoryview | np.ndarray | bytes
    ) -> Buffers:
        """PAGE records for ``offsets`` of ``block``.

        ``ram`` is either the whole block (1-D bytes-like: pages are sliced from it at their
        offsets) or an ``(n, page_size)`` array holding the n pages in order. No page is copied.
        """
        if not (isinstance(ram, np.ndarray) and ram.ndim == 2):
            return [x for b in self.encode_pages_gather(block, offsets, ram)
                    for x in (b.buffers() if isinstance(b, PageGather) else (b,))]  # fmt: skip
        ps = self.page_size
        n = len(offsets)
        if n == 0:
            return []
        words = self._words(offsets, C.RAM_SAVE_FLAG_PAGE)
        heads = memoryview(words.view(np.uint8))
        bufs: Buffers = self._lead(block, words, self._page_view(ram, 0, int(offsets[0]), ps))
        first = 1 if bufs else 0
        for i in range(first, n):
            bufs.append(heads[8 * i : 8 * i + 8])
            bufs.append(memoryview(ram[i]))
        self.bytes_sent += n * (8 + ps) + (len(bufs[0]) - 8 if first else 0)
        return bufs

    def encode_page(self, block: str, offset: int, page: memoryview | bytes) -> Buffers:
        """One PAGE record (a zero page is the caller's to detect: ``encode_zero_page``). No
        numpy: post-copy sends a requested page on its own, and array set-up for one page
        cost more than sending it."""
        return self._one(block, offset, C.RAM_SAVE_FLAG_PAGE, page)

    def encode_zero_page(self, block: str, offset: int, fill: int = 0) -> Buffers:
        """One ZERO record (its fill byte follows the header)."""
        return self._one(block, offset, C.RAM_SAVE_FLAG_ZERO, bytes((fill,)))

    def _one(self, block: str, offset: int, flag: int, body: memoryview | bytes) -> Buffers:
        if offset % self.page_size:
            raise ValueError("page offsets must be page aligned")
        if block == self.last_block:
            head = _BE64.pack(offset | flag | C.RAM_SAVE_FLAG_CONTINUE)
        else:
            head = _BE64.pack(offset | flag) + cstr(block)
            self.last_block = block
        return self._account([head, body])

    def _page_view(self, ram: Any, i: int, offset: int, ps: int) -> memoryview:
        if isinstance(ram, np.ndarray) and ram.ndim == 2:
            return memoryview(ram[i])
        mem = _byte_view(ram)
        if offset + ps > len(mem):
            raise ValueError(f"page offset {offset:#x} outside the {len(mem)}-byte block")
        return mem[offset : offset + ps]

    def encode_zero_pages(self, block: str, offsets: np.ndarray, fill: int = 0) -> Buffers:
        """ZERO records for ``offsets`` of ``block``, as one buffer."""
        n = len(offsets)
        if n == 0:
            return []
        words = self._words(offsets, C.RAM_SAVE_FLAG_ZERO)
        recs = np.empty((n, 9), np.uint8)
        recs[:, :8] = words.view(np.uint8).reshape(n, 8)
        recs[:, 8] = fill
        out: Buffers = []
        body = recs
        if block != self.last_block:
            w = int(words[0]) & ~C.RAM_SAVE_FLAG_CONTINUE
            out.append(_BE64.pack(w) + cstr(block) + bytes((fill,)))
            body = recs[1:]
            self.last_block = block
        if len(body):
            out.append(memoryview(body.reshape(-1)))
        return self._account(out)
