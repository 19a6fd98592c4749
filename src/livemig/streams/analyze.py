"""Analyze: decode a whole migration stream (QEMU's or livemig's) into what it contains.

``analyze(data)`` returns an ``Analysis``: the header, the RAM block list, page counts per
block (normal, zero, XBZRLE, compressed, mapped), bytes per section, the commands, and every
device's state (layouts from the stream's vmdesc trailer, found first from the end as QEMU's
analyze-migration.py does), with what has a meaning decoded (``globalstate``'s run state as its
name, text fields as text). Bad input is a ``StreamError`` naming the offset.

The zero count is of zero-page records in the stream. ``livemig migrate``'s "zero pages"
(QEMU's ``duplicate``) also counts pages the guest never populated, which livemig does not
send (zero on both sides): its summary shows the two parts.

With ``keep_ram`` each block is rebuilt only from what the stream holds: its page records and,
for a mapped-ram file, the pages its bitmaps mark (read at the file offsets its headers give).
A page the stream never mentions is zero, as on a destination's fresh RAM; ``dump_ram`` writes
the blocks and says how many pages of each came from where. A layout it cannot decode (another
page size, a block the stream skips) is an error, never a dump of zeros.

``verify`` checks a livemig stream's checksums (``x-checksums``) as a destination would, and
the source's RAM digests (``x-verify``) against the RAM the stream rebuilds. A stream without
checksums fails it: nothing vouches for its bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from livemig.errors import MigrationError, StreamError, UsageError
from livemig.wire import events as E
from livemig.wire import xbzrle
from livemig.wire.decoder import Decoder, UnknownLayoutError
from livemig.wire.vmdesc import find_vmdesc


def jsonable(value: Any) -> Any:
    """Device state with bytes shown as hex strings."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _text(raw: Any) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode("ascii", errors="replace")


def readable(idstr: str, state: dict[str, Any]) -> Any:
    """A device state for people: buffers that hold text or a name shown as such (the run
    state of ``globalstate``, ``x-machine``'s device list, the ring's follow address), the rest
    as ``jsonable`` shows it (other bytes as hex)."""
    out = jsonable(state)
    if idstr == "globalstate":
        from livemig.savevm.devices import decode_globalstate

        try:
            out["runstate"] = decode_globalstate(state)
        except StreamError:
            pass  # shown as it is: hex
    elif idstr == "x-machine":
        out["devices"] = _text(state["devices"])
    elif idstr == "livemig-ring" and "livemig-ring/follow" in state:
        out["livemig-ring/follow"]["host"] = _text(state["livemig-ring/follow"]["host"])
    return out


class Analysis:
    """Accumulates what a stream contains; ``keep_ram`` rebuilds the RAM blocks."""

    def __init__(self, keep_ram: bool, page_size: int = 4096, data: bytes = b"") -> None:
        self.keep_ram = keep_ram
        self.data = data  # the whole stream: mapped-ram pages are read at file offsets
        # per block, which pages the stream wrote (each once counted) and what it skipped
        self.written: dict[str, np.ndarray] = {}
        self.skipped: dict[str, str] = {}
        self.checks: Any = None  # StreamChecks with --verify
        self.verifier: StreamVerifier | None = None  # with verify
        self.page_size = page_size
        self.header: dict[str, Any] = {}
        self.blocks: list[dict[str, Any]] = []
        self.ram: dict[str, np.ndarray] = {}
        self.pages: dict[str, dict[str, int]] = {}
        self.sections: list[dict[str, Any]] = []
        self.section_bytes: dict[str, int] = {}
        self.commands: list[dict[str, Any]] = []
        self.devices: list[dict[str, Any]] = []
        self.vmdesc: bool = False
        # what could not be decoded, and why: a post-copy package's device sections when the
        # stream has no vmdesc (QEMU writes none after a post-copy switch)
        self.undecoded: list[dict[str, Any]] = []
        self._open: dict[int, dict[str, Any]] = {}
        self._current = "(stream)"

    def _count(self, block: str, kind: str, n: int) -> None:
        counts = self.pages.setdefault(
            block, {"normal": 0, "zero": 0, "xbzrle": 0, "compressed": 0, "mapped": 0}
        )
        counts[kind] += n

    def _page(self, block: str, offset: int) -> np.ndarray:
        return self.ram[block][offset // self.page_size]

    def event(self, ev: E.Event, size: int, decoder: Decoder) -> None:
        key = self._current
        if isinstance(ev, E.SectionStart):
            info = {
                "type": "start",
                "section_id": ev.section_id,
                "idstr": ev.idstr,
                "instance_id": ev.instance_id,
                "version_id": ev.version_id,
            }
            self._open[ev.section_id] = info
            self.sections.append(info)
            key = self._current = ev.idstr
        elif isinstance(ev, E.SectionPart | E.SectionEnd):
            idstr = self._open.get(ev.section_id, {}).get("idstr", "?")
            kind = "part" if isinstance(ev, E.SectionPart) else "end"
            self.sections.append({"type": kind, "section_id": ev.section_id, "idstr": idstr})
            key = self._current = idstr
        elif isinstance(ev, E.SectionFooter):
            self._current = "(stream)"
        elif isinstance(ev, E.SectionFull):
            key = ev.idstr
            self.sections.append(
                {
                    "type": "full",
                    "section_id": ev.section_id,
                    "idstr": ev.idstr,
                    "instance_id": ev.instance_id,
                    "version_id": ev.version_id,
                }
            )
            self.devices.append(
                {
                    "idstr": ev.idstr,
                    "instance_id": ev.instance_id,
                    "version_id": ev.version_id,
                    "state": readable(ev.idstr, ev.state),
                }
            )
        elif isinstance(ev, E.Header):
            self.header["version"] = ev.version
        elif isinstance(ev, E.Configuration):
            self.header["machine_type"] = ev.machine_type
            if ev.capabilities is not None:
                self.header["capabilities"] = list(ev.capabilities)
            if ev.uuid is not None:
                self.header["uuid"] = ev.uuid.hex()
        elif isinstance(ev, E.RamSetup):
            for b in ev.blocks:
                self.blocks.append(
                    {
                        "idstr": b.idstr,
                        "used_length": b.used_length,
                        "page_size": b.page_size,
                        "mr_addr": b.mr_addr,
                    }
                )
            self.alloc_ram(ev)
            if any(b.mapped_ram is not None for b in ev.blocks):
                self._mapped_ram(ev, decoder.offset)
        elif isinstance(ev, E.RamPages):
            self._count(ev.block, "normal", len(ev))
            if self.keep_ram:
                idx = ev.offsets // self.page_size
                self.ram[ev.block][idx] = ev.data
                self.written[ev.block][idx] = True
        elif isinstance(ev, E.RamZeroPages):
            self._count(ev.block, "zero", len(ev))
            if self.keep_ram:
                idx = ev.offsets // self.page_size
                self.ram[ev.block][idx] = ev.fill
                self.written[ev.block][idx] = True
        elif isinstance(ev, E.RamXbzrlePage):
            self._count(ev.block, "xbzrle", 1)
            if self.keep_ram:
                xbzrle.decode(ev.data, self._page(ev.block, ev.offset), decoder.offset)
                self.written[ev.block][ev.offset // self.page_size] = True
        elif isinstance(ev, E.RamCompressedPage):
            self._count(ev.block, "compressed", 1)
            if self.keep_ram:
                self._page(ev.block, ev.offset)[:] = self._inflate(ev, decoder.offset)
                self.written[ev.block][ev.offset // self.page_size] = True
        elif isinstance(ev, E.VMDescription):
            self.vmdesc = True
            key = "(vmdesc)"
        elif isinstance(ev, E.Eof | E.RamEos | E.RamMultifdFlush | E.RamHook):
            pass
        else:
            self.commands.append({"command": type(ev).__name__, **_fields(ev)})
            if not isinstance(ev, E.Packaged):
                key = "(commands)"
        self.section_bytes[key] = self.section_bytes.get(key, 0) + size

    def alloc_ram(self, ev: E.RamSetup) -> None:
        """Zeroed RAM for the blocks of a setup list (with ``keep_ram``)."""
        for b in ev.blocks:
            if self.keep_ram and b.idstr not in self.ram:
                npages = -(-b.used_length // self.page_size)
                self.ram[b.idstr] = np.zeros((npages, self.page_size), np.uint8)
                self.written[b.idstr] = np.zeros(npages, bool)

    def _mapped_ram(self, ev: E.RamSetup, offset: int) -> None:
        """The pages of a mapped-ram file: each block's bitmap says which are at their fixed
        offsets (``livemig.migration.mapped_ram``); counted always, kept with ``keep_ram``."""
        from livemig.migration.mapped_ram import bitmap_size

        for b in ev.blocks:
            if b.mapped_ram is None:
                raise StreamError(f"RAM block {b.idstr!r} has no mapped-ram header", offset)
            _version, page_size, bitmap_offset, pages_offset = b.mapped_ram
            if bitmap_offset == 0 and pages_offset == 0:
                self.skipped[b.idstr] = "not in the file (x-ignore-shared: shared with the host)"
                continue
            where = f"mapped-ram block {b.idstr!r}"
            if page_size != self.page_size:
                raise StreamError(f"{where}: page size {page_size}; livemig analyze reads "
                                  f"{self.page_size}-byte pages only", offset)  # fmt: skip
            npages = -(-b.used_length // page_size)
            nbits = bitmap_size(npages)
            if (bitmap_offset + nbits > pages_offset
                    or pages_offset + b.used_length > len(self.data)):  # fmt: skip
                raise StreamError(f"{where}: bitmap at {bitmap_offset} and pages at "
                                  f"{pages_offset} do not fit the {len(self.data)}-byte "
                                  "stream (mapped-ram is a file layout: give the file, not a "
                                  "pipe)", offset)  # fmt: skip
            bitmap = self.data[bitmap_offset : bitmap_offset + nbits]
            bits = np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little")[:npages]
            idx = np.flatnonzero(bits)
            self._count(b.idstr, "mapped", len(idx))
            if self.keep_ram:
                pages = np.frombuffer(self.data, np.uint8, npages * page_size, pages_offset)
                pages = pages.reshape(npages, page_size)
                self.ram[b.idstr][idx] = pages[idx]
                self.written[b.idstr][idx] = True
            if self.checks is not None and self.checks.checked:
                self._mapped_digests(b, bits, bitmap, offset)

    def _mapped_digests(self, b: Any, bits: np.ndarray, bitmap: bytes, offset: int) -> None:
        """--verify: each marked page against the file's page digest (x-checksums)."""
        from livemig.migration.mapped_ram import MAPPED_RAM_HEADER, page_digests, seal
        from livemig.savevm import checksum as CK

        _version, _ps, bitmap_offset, pages_offset = b.mapped_ram
        npages = len(bits)
        at = bitmap_offset + len(bitmap)
        raw = self.data[at : at + 8 * npages]
        if at + 8 * npages > pages_offset or len(raw) != 8 * npages:
            raise CK.ChecksumError(f"mapped-ram block {b.idstr!r}: no page digests between "
                                   "its bitmap and its pages", offset)  # fmt: skip
        digests = np.frombuffer(raw, "<u8")
        view = memoryview(self.ram[b.idstr]).cast("B")
        idx = np.flatnonzero(bits)
        wrong = idx[page_digests(view, idx) != digests[idx]]
        stray = np.flatnonzero(digests.astype(bool) & ~bits.astype(bool))
        if len(wrong) or len(stray):
            bad = wrong if len(wrong) else stray
            raise CK.ChecksumError(f"mapped-ram block {b.idstr!r}: {len(bad)} page(s) do not "
                                   f"match their checksums, first {int(bad[0]):#x}",
                                   offset)  # fmt: skip
        header = MAPPED_RAM_HEADER.pack(*b.mapped_ram)
        self.checks.mapped_seals.append((b.idstr, seal(b.idstr, header, bitmap, raw)))

    def _inflate(self, ev: E.RamCompressedPage, offset: int) -> np.ndarray:
        try:
            page = zlib.decompress(bytes(ev.data))
        except zlib.error as exc:
            raise StreamError(f"compressed page does not inflate: {exc}", offset) from None
        if len(page) != self.page_size:
            raise StreamError(f"compressed page inflates to {len(page)} bytes", offset)
        return np.frombuffer(page, np.uint8)

    def report(self) -> dict[str, Any]:
        return {
            "header": self.header,
            "ram_blocks": self.blocks,
            "pages": self.pages,
            "sections": self.sections,
            "section_bytes": self.section_bytes,
            "commands": self.commands,
            "devices": self.devices,
            "vmdesc": self.vmdesc,
            "undecoded": self.undecoded,
        }


def _fields(ev: E.Event) -> dict[str, Any]:
    if isinstance(ev, E.Packaged):
        return {"bytes": len(ev.data)}
    return {k: jsonable(v) for k, v in vars(ev).items()}


def _events(decoder: Decoder) -> Iterator[tuple[E.Event, int]]:
    while True:
        before = decoder.offset
        ev = decoder.next_event()
        if ev is E.NEED_DATA:
            return
        yield ev, decoder.offset - before  # type: ignore[misc]


def analyze_stream(data: bytes, keep_ram: bool = False, verify: bool = False) -> Analysis:
    """Decode a whole stream (``livemig analyze``); raises ``StreamError`` naming the offset of any problem. With
    ``verify`` (which keeps the RAM) its checksums and RAM digests are checked too."""
    vmdesc = find_vmdesc(data)
    result = Analysis(keep_ram or verify, data=data)
    decoder = Decoder(vmdesc=vmdesc)
    decoder.receive_data(data)
    decoder.receive_data(b"")
    if verify:
        result.verifier = StreamVerifier(result, vmdesc)
    _consume(decoder, result, vmdesc)
    if not decoder.finished:
        raise StreamError("stream did not end cleanly", decoder.offset)
    if result.verifier is not None:
        result.verifier.finish(decoder.offset)
    return result


class _Block:
    """What ``StreamChecks`` needs of a RAM block: analyze's rebuilt copy of it."""

    def __init__(self, idstr: str, ram: np.ndarray) -> None:
        self.idstr = idstr
        self.npages = len(ram)
        self.view = memoryview(ram).cast("B")


class StreamVerifier:
    """``--verify``: the destination's checksum rules over analyze's rebuilt RAM, then the
    source's RAM digests (the ``x-verify`` section) against it."""

    def __init__(self, result: Analysis, vmdesc: dict[str, Any] | None) -> None:
        from livemig.wire.vmdesc import descriptions_from_vmdesc

        self.result = result
        self.vmsds: dict[Any, Any] = dict(descriptions_from_vmdesc(vmdesc)) if vmdesc else {}
        self.checks: Any = None
        self.digests: dict[str, str] | None = None
        self.report: dict[str, Any] = {}
        self._announced: bool | None = None
        self._ram = False  # the RAM setup came: the rebuilt blocks exist

    def before(self, ev: E.Event, offset: int) -> bool:
        from livemig.savevm import checksum as CK

        if isinstance(ev, E.Configuration):
            self._announced = CK.CAPABILITY in (ev.capabilities or ())
            if not self._announced:
                raise CK.ChecksumError(
                    "the stream carries no checksums (made without "
                    f"{CK.CAPABILITY}): nothing to verify it with",
                    offset,
                )
            # From here on, as on a destination: the sections before the RAM's (the machine's
            # shape) are a unit with its checksum too, which went unchecked when the checks
            # began at the RAM setup. The RAM blocks join when the stream names them.
            self.checks = CK.StreamChecks([], required=True)
            self.result.checks = self.checks
        if isinstance(ev, E.RamSetup) and not self._ram:
            # the blocks exist from here on; the announcement came before
            self._ram = True
            self.result.alloc_ram(ev)
            blocks = [_Block(b.idstr, self.result.ram[b.idstr]) for b in ev.blocks]
            if self.checks is None:  # no configuration section: refused by announce
                self.checks = CK.StreamChecks(blocks, required=True)
                self.checks.announce(bool(self._announced), offset)
                self.result.checks = self.checks
            else:
                self.checks.add_blocks(blocks)
        if isinstance(ev, E.SectionFull) and ev.idstr == "x-verify":
            self.digests = {k: bytes(v).hex() for k, v in ev.state.items()
                            if isinstance(v, bytes | bytearray | memoryview)}  # fmt: skip
        if self.checks is None:
            return False
        return bool(self.checks.before(ev, offset, _ByIdstr(self.vmsds)))

    def pages(self, ev: E.Event) -> None:
        if self.checks is not None:
            self.checks.pages(ev)

    def finish(self, offset: int) -> None:
        import xxhash

        from livemig.savevm import checksum as CK

        if self.checks is None or not self._ram:
            raise CK.ChecksumError("the stream holds no RAM section: nothing to verify", offset)
        self.checks.at_end(offset)
        self.report = {"checksum-units": self.checks.units}
        if self.digests is not None:
            mine = {name: xxhash.xxh3_128(ram).hexdigest()
                    for name, ram in self.result.ram.items() if name in self.digests}  # fmt: skip
            # the section's RAM blocks (it may hold other digests than those of RAM)
            bad = [n for n in mine if mine[n] != self.digests[n]]
            if bad:
                raise CK.ChecksumError(f"RAM rebuilt from the stream differs from the source's "
                                       f"at switch-over (x-verify digest): {', '.join(bad)}",
                                       offset)  # fmt: skip
            self.report["ram-digests"] = "equal to the source's at switch-over"


class _ByIdstr(dict):
    """vmdesc layouts keyed by (idstr, instance id), looked up by idstr as well."""

    def __init__(self, by_key: dict[Any, Any]) -> None:
        super().__init__(by_key)
        for (idstr, _inst), vmsd in by_key.items():
            self.setdefault(idstr, vmsd)


def _consume(decoder: Decoder, result: Analysis, vmdesc: dict[str, Any] | None) -> None:
    verifier = result.verifier
    for ev, size in _events(decoder):
        if verifier is not None and verifier.before(ev, decoder.offset):
            result.event(ev, size, decoder)  # a checksum section: a device in the report
            continue
        result.event(ev, size, decoder)
        if verifier is not None:
            verifier.pages(ev)
        if isinstance(ev, E.Packaged):
            base = decoder.offset - len(ev.data)
            nested = Decoder(
                with_header=False,
                vmdesc=vmdesc,
                block_sizes=decoder.block_sizes,
                start_offset=base,
                capabilities=decoder.capabilities,
            )
            nested.last_block = decoder.last_block
            nested.receive_data(bytes(ev.data))
            nested.receive_data(b"")
            try:
                _consume(nested, result, vmdesc)
            except UnknownLayoutError as exc:
                if vmdesc is not None:
                    raise
                # Device state without a layout (a post-copy stream has no vmdesc): the
                # package's length bounds it, so the stream goes on after it.
                end = base + len(ev.data)
                result.undecoded.append({"offset": exc.offset, "bytes": end - (exc.offset or base),
                                         "reason": str(exc)})  # fmt: skip


def read_stream(path: str | PathLike[str], offset: int = 0) -> bytes:
    """A stream file's bytes from ``offset`` on; ``UsageError`` when it cannot be read."""
    try:
        return _read(path, offset)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc


def verify_file(path: str | PathLike[str], offset: int = 0) -> Analysis:
    """Read back a stream file a migration wrote (from ``offset``, a ``file:`` URI's) and check
    its checksums and RAM digests as a destination would: ``analyze_stream(verify=True)``;
    ``result.verifier.report`` says what was checked. Raises ``StreamError``
    (``ChecksumError``) when it does not verify, ``MigrationError`` when it cannot be read."""
    try:
        data = _read(path, offset)
    except OSError as exc:
        raise MigrationError(f"cannot read {path} back: {exc.strerror}") from exc
    return analyze_stream(data, verify=True)


def _read(path: str | PathLike[str], offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def dump_ram(result: Analysis, directory: str | PathLike[str]) -> list[dict[str, Any]]:
    """Write each RAM block the stream holds; what was written, page counts by origin."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for b in result.blocks:
        name = b["idstr"]
        if name in result.skipped:
            written.append({"idstr": name, "skipped": result.skipped[name]})
            continue
        path = out / name.replace("/", "_")
        path.write_bytes(memoryview(result.ram[name]).cast("B")[: b["used_length"]])
        have = result.written[name]
        counts = result.pages.get(name, {})
        written.append({"idstr": name, "path": str(path), "pages": len(have),
                        "from-stream": int(np.count_nonzero(have)),
                        "never-sent": int(len(have) - np.count_nonzero(have)),
                        **{k: v for k, v in counts.items() if v}})  # fmt: skip
    return written
