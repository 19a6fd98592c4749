"""``livemig analyze FILE|-``: decode a migration stream (QEMU's or ours) and report on it.

Prints the sections, the RAM block list, page counts per block (normal, zero, XBZRLE,
compressed), bytes per section and every device's state as JSON (layouts from the stream's
vmdesc trailer, found first from the end as QEMU's analyze-migration.py does). ``--dump-ram
DIR`` writes each RAM block's final contents to ``DIR/<idstr with '/' -> '_'>``; ``--json``
prints one JSON document instead of tables. Bad input is one error line naming the offset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from livemig.errors import StreamError, UsageError
from livemig.wire import events as E
from livemig.wire import xbzrle
from livemig.wire.decoder import Decoder, UnknownLayoutError
from livemig.wire.vmdesc import find_vmdesc


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("analyze", help="decode a migration stream and report on it")
    parser.add_argument("file", help="stream file, or - for standard input")
    parser.add_argument("--dump-ram", metavar="DIR", help="write each RAM block to DIR")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def jsonable(value: Any) -> Any:
    """Device state with bytes shown as hex strings."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


class Analysis:
    """Accumulates what a stream contains; ``keep_ram`` rebuilds the RAM blocks."""

    def __init__(self, keep_ram: bool, page_size: int = 4096) -> None:
        self.keep_ram = keep_ram
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
        self.data: bytes | memoryview = b""  # the whole stream: mapped-ram pages are read there

    def _count(self, block: str, kind: str, n: int) -> None:
        counts = self.pages.setdefault(
            block, {"normal": 0, "zero": 0, "xbzrle": 0, "compressed": 0}
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
                    "state": jsonable(ev.state),
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
                if self.keep_ram and b.idstr not in self.ram:
                    npages = -(-b.used_length // self.page_size)
                    self.ram[b.idstr] = np.zeros((npages, self.page_size), np.uint8)
                if b.mapped_ram is not None:
                    self._mapped_ram(b, decoder.offset)
        elif isinstance(ev, E.RamPages):
            self._count(ev.block, "normal", len(ev))
            if self.keep_ram:
                self.ram[ev.block][ev.offsets // self.page_size] = ev.data
        elif isinstance(ev, E.RamZeroPages):
            self._count(ev.block, "zero", len(ev))
            if self.keep_ram:
                self.ram[ev.block][ev.offsets // self.page_size] = ev.fill
        elif isinstance(ev, E.RamXbzrlePage):
            self._count(ev.block, "xbzrle", 1)
            if self.keep_ram:
                xbzrle.decode(ev.data, self._page(ev.block, ev.offset), decoder.offset)
        elif isinstance(ev, E.RamCompressedPage):
            self._count(ev.block, "compressed", 1)
            if self.keep_ram:
                self._page(ev.block, ev.offset)[:] = self._inflate(ev, decoder.offset)
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

    def _mapped_ram(self, block: E.RamBlockInfo, offset: int) -> None:
        """A mapped-ram block's pages: in the file at fixed offsets, not in the stream."""
        from livemig.migration.mapped_ram import file_pages

        idx, pages = file_pages(self.data, block, offset)
        self._count(block.idstr, "normal", len(idx))
        if self.keep_ram:
            self.ram[block.idstr][idx] = pages[idx]

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


def analyze(data: bytes, keep_ram: bool = False) -> Analysis:
    """Decode a whole stream; raises ``StreamError`` naming the offset of any problem."""
    vmdesc = find_vmdesc(data)
    result = Analysis(keep_ram)
    result.data = data
    decoder = Decoder(vmdesc=vmdesc)
    decoder.receive_data(data)
    decoder.receive_data(b"")
    _consume(decoder, result, vmdesc)
    if not decoder.finished:
        raise StreamError("stream did not end cleanly", decoder.offset)
    return result


def _consume(decoder: Decoder, result: Analysis, vmdesc: dict[str, Any] | None) -> None:
    for ev, size in _events(decoder):
        result.event(ev, size, decoder)
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


def dump_ram(result: Analysis, directory: str) -> list[Path]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for b in result.blocks:
        path = out / b["idstr"].replace("/", "_")
        path.write_bytes(memoryview(result.ram[b["idstr"]]).cast("B")[: b["used_length"]])
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    if args.file == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(args.file).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    result = analyze(data, keep_ram=bool(args.dump_ram))
    if args.dump_ram:
        dump_ram(result, args.dump_ram)
    report = result.report()
    try:
        if args.json:
            json.dump(report, sys.stdout, indent=1)
            print()
        else:
            _print_tables(report, len(data))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (| head): not an error of ours, and no traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _print_tables(report: dict[str, Any], total: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = report["header"]
    console.print(
        f"stream: {total} bytes, version {head.get('version')}, machine "
        f"{head.get('machine_type')}, capabilities {head.get('capabilities', [])}"
    )
    blocks = Table(title="RAM blocks")
    for col in ("idstr", "used_length", "normal", "zero", "xbzrle", "compressed"):
        blocks.add_column(col, justify="left" if col == "idstr" else "right")
    for b in report["ram_blocks"]:
        c = report["pages"].get(b["idstr"], {})
        blocks.add_row(
            b["idstr"],
            hex(b["used_length"]),
            *(str(c.get(k, 0)) for k in ("normal", "zero", "xbzrle", "compressed")),
        )
    console.print(blocks)
    secs = Table(title="bytes per section")
    secs.add_column("section")
    secs.add_column("records", justify="right")
    secs.add_column("bytes", justify="right")
    counts: dict[str, int] = {}
    for s in report["sections"]:
        counts[s["idstr"]] = counts.get(s["idstr"], 0) + 1
    for name, size in report["section_bytes"].items():
        secs.add_row(name, str(counts.get(name, "")), str(size))
    console.print(secs)
    for c in report["commands"]:
        console.print(f"command {c}")
    for u in report["undecoded"]:
        console.print(f"not decoded: {u['bytes']} bytes of a post-copy package from offset "
                      f"{u['offset']} (the stream has no vmdesc): {u['reason']}")  # fmt: skip
    console.print("devices:")
    console.print_json(json.dumps(report["devices"]))
