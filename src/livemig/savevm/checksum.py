"""Checksummed streams between livemig peers: what is hashed, where, and how it is checked.

Theory of operation
-------------------
A livemig source with capability ``x-checksums`` announces it in the configuration section
(``configuration/capabilities`` lists ``x-checksums``, as QEMU lists its enforced capabilities)
and then closes every *unit* of the stream with a checksum. A unit is what the source sent
since the previous checksum: RAM records (ZERO, PAGE, XBZRLE) and device sections. The reader
(a destination, ``livemig analyze --verify``) checks each unit before it goes on, and refuses
the stream at the first unit whose data differs, naming the RAM block and page range (or the
device sections) and the stream offset.

**The digest** of a unit is XXH3-64 (``xxhash``, measured fastest of XXH3, CRC32C, BLAKE3 and
zlib's CRC-32 here: ~50 GB/s on data in cache) over, in this order:

1. one little-endian u64 per RAM record, in stream order: ``page offset | block index << 4 |
   kind`` (kind 1 = zero page, 2 = page data, 3 = fill-byte page), so a record that names the
   wrong page, block or kind breaks the digest even when its data is right;
2. each device section's idstr, instance id, version and payload as QEMU encodes it;
3. the little-endian u64 XXH3-64 of the contents of the data records, in stream order, each
   run of consecutive pages hashed with one call *from guest RAM*: on the source right after
   the send (the kernel has just copied those bytes, so they are in cache), on the
   destination right after placing them. No second pass over RAM, no copy.

**A guest that writes while its page is sent.** In pre-copy the vCPUs run: a page can change
between the moment the kernel copies it into the socket and the moment it is hashed, and the
destination would see a mismatch although nothing was corrupted. Such a page is always sent
again (the write made it dirty), so it need not be checked now, but the source must know which
pages it is: after hashing, it asks the dirty tracker which pages of the unit were written since
the last sync (``DirtyTracker.written``: a ``PAGEMAP_SCAN`` without re-protecting, about 4 us),
hashes again without them if there are any, and lists them in the checksum record
(``excluded``). A page not written since the sync was stable from before the send until after
the hash, so the digest is exact for it. The destination leaves excluded pages *pending* and
requires a later, checked copy of each (or its post-copy discard) before the guest may run.
With the guest stopped (the blackout, a paused guest, post-copy) nothing is excluded.

**Wire format** (documented in ``docs/checksums.md``):

* main stream: a FULL section ``x-checksum`` (instance 0, version 1) right after the unit:
  ``be32 records`` (RAM records + device sections covered), ``be64 digest``, 128 bytes
  ``excluded`` (bit *i*, little-endian bit order, = the unit's *i*-th data record is excluded).
  A RAM section holds at most ``MAX_DATA`` (1024) data records when checksums are on. It is described
  in the vmdesc like any device, so QEMU's ``analyze-migration.py`` reads it as a device.
* multifd: after each job's packets the channel sends a trailer packet (flag
  ``MULTIFD_FLAG_X_CHECKSUM``, no pages) whose reserved bytes hold records and digest and whose
  offset area holds the excluded bitmap (``livemig.migration.multifd``).
* mapped-ram files: a digest per page, stored between a block's bitmap and its pages
  (``livemig.migration.mapped_ram``), itself covered by the stream's last ``x-checksum``.

QEMU peers never see any of it: QEMU streams carry no ``x-checksums`` announcement, and a
livemig stream (machine type ``livemig-x86_64``) is not one a QEMU can load.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import xxhash

from livemig.errors import StreamError
from livemig.savevm.ram import page_runs

CAPABILITY = "x-checksums"
IDSTR = "x-checksum"  # = wire.xsections.CHECKSUM_IDSTR
SECTION_ID = 1  # RAM is 2, the devices 3 and up
VERSION = 1
# Data records one unit of the main stream may hold (the excluded bitmap's bits): 4 MiB of
# pages, so that what a unit costs in Python (~100 us on each side) is paid per 4 MiB.
MAX_DATA = 1024
BITMAP_BYTES = MAX_DATA // 8
KIND_ZERO = 1
KIND_DATA = 2
KIND_FILL = 3
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


PREEMPT_CHECKSUM_WORD = 0x200  # a record word no preempt channel carries otherwise
PREEMPT_CHECKSUM = struct.Struct(">QIQ")  # the word, records, digest


def discard_record(block: str, ranges: Any) -> tuple[str, int, int, bytes]:
    """A POSTCOPY_RAM_DISCARD command as a unit's pseudo device section."""
    body = b"".join(struct.pack(">QQ", s, n) for s, n in ranges)
    return "discard", 0, 0, block.encode() + b"\0" + body


class ChecksumError(StreamError):
    """A unit of the stream does not match its checksum: the data was corrupted on the way."""


def vmsd() -> Any:
    """The section's layout: built into every decoder (``wire.xsections``)."""
    from livemig.wire.xsections import CHECKSUM_VMSD

    return CHECKSUM_VMSD


def pack_bits(flags: np.ndarray | None, nbytes: int) -> bytes:
    """A bool array as a little-endian bitmap of ``nbytes`` bytes (all zero for None)."""
    if flags is None or not flags.any():
        return bytes(nbytes)
    if len(flags) > nbytes * 8:
        raise ValueError(f"{len(flags)} flags do not fit {nbytes} bytes")
    bits = np.packbits(flags, bitorder="little").tobytes()
    return bits + bytes(nbytes - len(bits))


def unpack_bits(raw: bytes | memoryview, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[:n].astype(bool)


class Unit:
    """The records of one unit in stream order, and its digest.

    ``parts`` are ``(block, kind, page indexes, data)``; ``data`` is None for pages hashed from
    the block's RAM, or an ``(n, 4096)`` array holding what was sent (a copy the source made,
    e.g. XBZRLE's). Device sections go to ``devices`` as their encoded bytes. ``feed`` hashes the
    data records added so far while they are still in cache; ``digest`` finishes.
    """

    __slots__ = ("_content", "_fed", "_fed_ex", "devices", "ndata", "part_ex", "parts", "records")

    def __init__(self) -> None:
        self.parts: list[tuple[str, int, np.ndarray, Any]] = []
        # per part: the data records left out of ``feed`` (pages already written again when
        # the source looked before hashing), or None
        self.part_ex: list[np.ndarray | None] = []
        self.devices: list[bytes] = []
        self.records = 0
        self.ndata = 0
        self._content = xxhash.xxh3_64()
        self._fed = 0
        self._fed_ex = False  # something was left out of the fed digest

    def __bool__(self) -> bool:
        return self.records > 0

    def add(self, block: str, kind: int, idx: np.ndarray, data: Any = None) -> None:
        if len(idx) == 0:
            return
        self.parts.append((block, kind, idx, data))
        self.part_ex.append(None)
        self.records += len(idx)
        if kind == KIND_DATA:
            self.ndata += len(idx)

    def add_device(self, idstr: str, instance_id: int, version_id: int, payload: bytes) -> None:
        head = f"{idstr}\0{instance_id}\0{version_id}\0".encode()
        self.devices.append(head + payload)
        self.records += 1

    def data_pages(self) -> list[tuple[str, np.ndarray]]:
        return [(b, idx) for b, kind, idx, _ in self.parts if kind == KIND_DATA]

    def feed(self, views: Mapping[str, Any]) -> None:
        """Hash the data records added since the last call, less ``part_ex``'s."""
        for i in range(self._fed, len(self.parts)):
            ex = self.part_ex[i]
            _hash_part(self._content, views, self.parts[i], ex)
            self._fed_ex = self._fed_ex or (ex is not None and bool(ex.any()))
        self._fed = len(self.parts)

    def fed_exclusions(self) -> np.ndarray | None:
        """The data records ``feed`` left out, in unit order (None: none)."""
        if not self._fed_ex:
            return None
        return np.concatenate([ex if ex is not None else np.zeros(len(idx), bool)
                               for (_b, kind, idx, _d), ex in zip(self.parts, self.part_ex,
                                                                   strict=True)
                               if kind == KIND_DATA])  # fmt: skip

    def digest(self, views: Mapping[str, Any], blocks: Mapping[str, int],
               excluded: np.ndarray | None = None) -> int:  # fmt: skip
        """XXH3-64 of the unit (see the module docstring); ``excluded`` flags data records."""
        fed = self.fed_exclusions()
        if excluded is not None and not excluded.any():
            excluded = None
        same = (excluded is None and fed is None) or (
            excluded is not None and fed is not None and np.array_equal(excluded, fed)
        )
        if same:
            self.feed(views)
            content = self._content.intdigest()
        else:
            h = xxhash.xxh3_64()
            at = 0
            for part in self.parts:
                if part[1] != KIND_DATA:
                    continue
                n = len(part[2])
                _hash_part(h, views, part, excluded[at : at + n])
                at += n
            content = h.intdigest()
        h = xxhash.xxh3_64()
        if self.parts:
            words = [(idx.astype(np.uint64) << np.uint64(PAGE_SHIFT))
                     | np.uint64((blocks.get(b, 255) & 0xFF) << 4 | kind)
                     for b, kind, idx, _ in self.parts]  # fmt: skip
            h.update(np.concatenate(words).astype("<u8").tobytes())
        for dev in self.devices:
            h.update(dev)
        h.update(content.to_bytes(8, "little"))
        return h.intdigest()

    def span(self) -> str:
        """The blocks and page ranges the unit covers, for an error message."""
        if not self.parts:
            return self._device_span()
        by: dict[str, list[np.ndarray]] = {}
        for b, _k, idx, _d in self.parts:
            by.setdefault(b, []).append(idx)
        out = []
        for b, arrs in by.items():
            idx = np.concatenate(arrs)
            lo, hi = int(idx.min()), int(idx.max())
            out.append(f"RAM block {b!r} pages {lo:#x}-{hi:#x} "
                       f"(bytes {lo << PAGE_SHIFT:#x}-{((hi + 1) << PAGE_SHIFT) - 1:#x})")  # fmt: skip
        if self.devices:
            out.append(self._device_span())
        return ", ".join(out)

    def _device_span(self) -> str:
        names = dict.fromkeys(d.split(b"\0", 1)[0].decode(errors="replace") for d in self.devices)
        return f"{len(self.devices)} device section(s) ({', '.join(names)})"


def _hash_part(h: Any, views: Mapping[str, Any], part: tuple, ex: np.ndarray | None) -> None:
    block, kind, idx, data = part
    if kind != KIND_DATA:
        return
    if ex is not None and not ex.any():
        ex = None
    if data is not None:
        if ex is None and data.flags.c_contiguous:
            h.update(data)
            return
        for r in np.flatnonzero(~ex) if ex is not None else range(len(idx)):
            h.update(np.ascontiguousarray(data[r]))
        return
    view = views[block]
    keep = idx if ex is None else idx[~ex]
    for first, count in page_runs(keep):
        h.update(view[first << PAGE_SHIFT : (first + count) << PAGE_SHIFT])


def block_indexes(blocks: Any) -> dict[str, int]:
    """Block idstr -> its index in the stream's block list (the digest's block number)."""
    return {getattr(b, "idstr", b): i for i, b in enumerate(blocks)}


# -- source ----------------------------------------------------------------------------------


class SourceChecks:
    """The source's side: closes units with their checksum (called after the unit was sent).

    ``written(block, idx)`` is the dirty tracker's query of pages written since the last sync;
    ``live()`` says whether the guest may be writing now (else nothing is excluded);
    ``requeue(block, idx)`` makes pages dirty again.
    """

    def __init__(self, blocks: list, written: Any, live: Any, requeue: Any = None) -> None:
        self.views = {b.idstr: b.view for b in blocks}
        self.blocks = block_indexes(blocks)
        self._written = written
        self._live = live
        self._requeue = requeue or (lambda block, idx: None)
        self.units = 0
        self.excluded_pages = 0

    def query(self) -> dict[str, int]:
        """The ``x-checksums`` member of query-migrate: units closed, pages left to a resend."""
        return {"units": self.units, "excluded-pages": self.excluded_pages}

    def exclusions(self, unit: Unit, limit: int = MAX_DATA) -> np.ndarray | None:
        """The data records of ``unit`` hashed from RAM whose page was written since the last
        sync (None: none). The caller hashes *before* asking (see the module docstring)."""
        if not unit.ndata or not self._live():
            return None
        flags = []
        any_ = False
        for block, kind, idx, data in unit.parts:
            if kind != KIND_DATA:
                continue
            if data is not None:
                flags.append(np.zeros(len(idx), bool))
                continue
            w = self._written(block, idx)
            flags.append(w)
            any_ = any_ or bool(w.any())
        if not any_:
            return None
        ex = np.concatenate(flags)
        if len(ex) > limit:
            raise ValueError(f"a checksum unit holds {len(ex)} data records, at most {limit}")
        return ex

    def prepare(self, unit: Unit) -> None:
        """Before hashing the parts added since the last ``feed``: leave out the pages already
        written again since the last sync (they are dirty: a later copy is checked). With a
        guest that rewrites its working set that is most of a unit, which would otherwise be
        hashed twice, once whole and once without them."""
        if not self._live():
            return
        for i in range(unit._fed, len(unit.parts)):
            block, kind, idx, data = unit.parts[i]
            if kind == KIND_DATA and data is None:
                w = self._written(block, idx)
                unit.part_ex[i] = w if w.any() else None

    def close(self, unit: Unit, limit: int = MAX_DATA) -> tuple[int, np.ndarray | None]:
        """(digest, excluded) of a unit that has just been sent (hashed before or after)."""
        before = unit.fed_exclusions()
        ex = self.exclusions(unit, limit)
        if ex is not None and before is not None:
            ex = ex | before
        elif ex is None:
            ex = before
        if ex is None or (before is not None and np.array_equal(ex, before)):
            # nothing written since the look before hashing: the fed digest is exact
            digest = unit.digest(self.views, self.blocks, ex)
        else:
            # A page written after the hash shows in a later look: hash without what is
            # written until two looks agree. A guest that keeps writing new pages of the unit
            # meanwhile gets them all excluded and sent again (marked dirty here).
            for _ in range(4):
                digest = unit.digest(self.views, self.blocks, ex)
                again = self.exclusions(unit, limit)
                if again is None or not bool((again & ~ex).any()):
                    break
                ex = ex | again
            else:
                ex = np.ones(unit.ndata, bool)
                digest = unit.digest(self.views, self.blocks, ex)
                for block, idx in unit.data_pages():
                    self._requeue(block, idx)
        self.units += 1
        if ex is not None:
            self.excluded_pages += int(np.count_nonzero(ex))
        return digest, ex

    def section_state(self, unit: Unit) -> dict[str, Any]:
        """The ``x-checksum`` section's values for a unit that has just been sent."""
        digest, ex = self.close(unit)
        return {"records": unit.records, "digest": digest,
                "excluded": pack_bits(ex, BITMAP_BYTES)}  # fmt: skip


# -- destination -------------------------------------------------------------------------------


class IncomingChecks:
    """The reader's side: collects the records of the open unit and checks it at its checksum.

    ``pending`` pages were received only in excluded form; each needs a later checked copy
    (or a post-copy discard) before the guest runs: ``check_nothing_pending``.
    """

    def __init__(self, blocks: list) -> None:
        self.views = {b.idstr: b.view for b in blocks}
        self.npages = {b.idstr: b.npages for b in blocks}
        self.blocks = block_indexes(blocks)
        self.unit = Unit()
        self.pending = {b.idstr: np.zeros(b.npages, bool) for b in blocks}
        self.units = 0
        self._lock = threading.Lock()
        # Hash pages as they are placed (in cache), unless the last unit had excluded pages:
        # then the next one likely has too, and is hashed once, at its checksum, without them
        self.eager = True

    def query(self) -> dict[str, int]:
        return {"units": self.units}

    def add_blocks(self, blocks: list) -> None:
        """RAM blocks known only once the stream named them (``livemig analyze``)."""
        for b in blocks:
            self.views[b.idstr] = b.view
            self.npages[b.idstr] = b.npages
            self.pending[b.idstr] = np.zeros(b.npages, bool)
        self.blocks.update(block_indexes(blocks))

    def set_block_order(self, names: list[str]) -> None:
        """The stream's block list order (the digest's block numbers)."""
        self.blocks.clear()
        self.blocks.update({n: i for i, n in enumerate(names)})

    def fork(self) -> IncomingChecks:
        """A checker for another channel (multifd): its own open unit, the rest shared."""
        other = object.__new__(IncomingChecks)
        other.views, other.npages, other.blocks = self.views, self.npages, self.blocks
        other.pending, other.unit, other.units = self.pending, Unit(), 0
        other._lock, other.eager = self._lock, True
        return other

    def verify(self, records: int, digest: int, excluded: bytes | memoryview,
               offset: int | None, what: str = "") -> None:  # fmt: skip
        """Check the open unit against its checksum record; a new unit begins."""
        unit, self.unit = self.unit, Unit()
        if records != unit.records:
            raise ChecksumError(f"checksum record covers {records} records, the stream held "
                                f"{unit.records} since the previous one ({unit.span()})"
                                f"{what}", offset)  # fmt: skip
        ex = unpack_bits(excluded, min(unit.ndata, 8 * len(excluded))) if unit.ndata else None
        if ex is not None and not ex.any():
            ex = None
        if ex is not None and len(ex) < unit.ndata:
            raise ChecksumError(f"checksum record excludes pages of a unit of {unit.ndata} "
                                f"data records, more than it can name ({unit.span()})",
                                offset)  # fmt: skip

        got = unit.digest(self.views, self.blocks, ex)
        self.eager = ex is None
        if got != digest:
            raise ChecksumError(f"checksum mismatch: {unit.span()}{what} (got {got:016x}, "
                                f"the source sent {digest:016x}): the data was corrupted on "
                                "the way", offset)  # fmt: skip
        self._settle(unit, ex)
        self.units += 1

    def _settle(self, unit: Unit, ex: np.ndarray | None) -> None:
        at = 0
        for block, kind, idx, _ in unit.parts:
            pend = self.pending[block]
            if kind != KIND_DATA:
                pend[idx] = False
                continue
            n = len(idx)
            if ex is None:
                pend[idx] = False
            else:
                e = ex[at : at + n]
                pend[idx[~e]] = False
                pend[idx[e]] = True
            at += n

    def discard(self, block: str, first: int, count: int) -> None:
        """Post-copy: these pages will come again (checked), so none of them is pending."""
        self.pending[block][first : first + count] = False

    def check_nothing_pending(self, offset: int | None, when: str) -> None:
        for block, pend in self.pending.items():
            idx = np.flatnonzero(pend)
            if len(idx):
                lo, hi = int(idx[0]), int(idx[-1])
                raise ChecksumError(f"{len(idx)} page(s) of RAM block {block!r} (pages "
                                    f"{lo:#x}-{hi:#x}) came only in copies the source could "
                                    f"not vouch for, and no checked copy followed {when}",
                                    offset)  # fmt: skip


class StreamChecks(IncomingChecks):
    """The checks of a whole main stream, event by event: the rules the destination and
    ``livemig analyze --verify`` apply alike.

    * the configuration section says whether the stream is checksummed (``checked``); with
      ``required`` a stream that is not is refused there;
    * a RAM section that held records must be followed at once by its ``x-checksum``;
    * device sections are covered by the next ``x-checksum``, which must come before EOF;
    * at EOF nothing is left unchecked and no page is still pending.

    Call ``before(ev)`` for every event before handling it (True: it was a checksum, already
    handled) and ``pages(ev)`` after a RAM event's data was placed.
    """

    def __init__(self, blocks: list, required: bool = False, on_checked: Any = None) -> None:
        super().__init__(blocks)
        self.required = required
        self.checked: bool | None = None  # None until the configuration section told
        self.mapped_seals: list[tuple[str, bytes]] = []  # set by a mapped-ram reader
        self._must_check = False
        self._on_checked = on_checked or (lambda checked: None)

    def announce(self, announced: bool, offset: int | None) -> None:
        self.checked = announced
        self._on_checked(announced)
        if not announced and self.required:
            raise ChecksumError(f"this destination requires a checksummed stream (capability "
                                f"{CAPABILITY}) and the source sent one without: turn "
                                f"{CAPABILITY} on at the source, or off here to load it "
                                "unchecked", offset)  # fmt: skip

    def before(self, ev: Any, offset: int, vmsds: Mapping[str, Any]) -> bool:
        from livemig.wire import events as E

        if self.checked is None and not isinstance(ev, E.Header):
            announced = isinstance(ev, E.Configuration) and CAPABILITY in (ev.capabilities
                                                                          or ())  # fmt: skip
            self.announce(announced, offset)
        if not self.checked:
            return False
        if self._must_check:
            self._must_check = False
            if not (isinstance(ev, E.SectionFull) and ev.idstr == IDSTR):
                raise ChecksumError(f"the RAM section before this point ({self.unit.span()}) is "
                                    "not followed by its checksum", offset)  # fmt: skip
        if isinstance(ev, E.SectionFull):
            if ev.idstr == IDSTR:
                st = ev.state
                self.verify(st["records"], st["digest"], st["excluded"], offset)
                return True
            vmsd = vmsds.get(ev.idstr)
            if vmsd is not None:
                self.unit.add_device(ev.idstr, ev.instance_id, ev.version_id,
                                     vmsd.encode(ev.state))  # fmt: skip
        elif isinstance(ev, E.RamSetup):
            self.set_block_order([b.idstr for b in ev.blocks])
        elif isinstance(ev, E.SectionFooter) and self.unit.parts:
            self._must_check = True
        elif isinstance(ev, E.SectionEnd):
            for idstr, sealed in self.mapped_seals:
                # a mapped-ram file's bitmaps and page digests, checked with the END section
                self.unit.add_device(SEAL_IDSTR, 0, 1, idstr.encode() + sealed)
        elif isinstance(ev, E.PostcopyRamDiscard):
            self.unit.add_device(*discard_record(ev.block, ev.ranges))
            for start, length in ev.ranges:
                self.discard(ev.block, start >> PAGE_SHIFT, length >> PAGE_SHIFT)
        elif isinstance(ev, E.Packaged):
            self.require_checked(offset, "before the post-copy package")
        return False

    def require_checked(self, offset: int | None, where: str) -> None:
        """Nothing received since the last checksum may stay unchecked past this point."""
        if self.checked and self.unit:
            raise ChecksumError(f"{self.unit.span()} came without a checksum {where}", offset)

    def pages(self, ev: Any) -> None:
        """A RAM event whose data is now in place."""
        if not self.checked:
            return
        from livemig.wire import events as E

        if isinstance(ev, E.RamPages):
            self.unit.add(ev.block, KIND_DATA, ev.offsets >> np.uint64(PAGE_SHIFT))
            if self.eager:
                self.unit.feed(self.views)  # just placed: in cache
        elif isinstance(ev, E.RamZeroPages):
            kind = KIND_FILL if ev.fill else KIND_ZERO
            self.unit.add(ev.block, kind, ev.offsets >> np.uint64(PAGE_SHIFT))
        elif isinstance(ev, E.RamXbzrlePage | E.RamCompressedPage):
            self.unit.add(ev.block, KIND_DATA, np.array([ev.offset >> PAGE_SHIFT]))

    def at_end(self, offset: int | None) -> None:
        """At EOF: every unit checked, every page that came unchecked came again checked."""
        if self.checked is None:
            self.announce(False, offset)
        if not self.checked:
            return
        if self.unit:
            raise ChecksumError(f"the stream ends without the checksum of its last part "
                                f"({self.unit.span()})", offset)  # fmt: skip
        self.check_nothing_pending(offset, "before the end of the stream")


SEAL_IDSTR = "mapped-ram"  # the pseudo device of a mapped-ram block's seal in a unit
