"""``livemig analyze FILE|-``: decode a migration stream (QEMU's or ours) and report on it.

Prints the sections, the RAM block list, page counts per block (normal, zero, XBZRLE,
compressed) and bytes per section; ``--devices`` adds every device's state as JSON (layouts
from the stream's vmdesc trailer, found first from the end as QEMU's analyze-migration.py
does), with what has a meaning decoded (``globalstate``'s run state as its name, text fields as
text). ``--dump-ram DIR`` writes each RAM block's final contents to ``DIR/<idstr with '/' ->
'_'>``; ``--json`` prints one JSON document instead of tables (devices included). Bad input is
one error line naming the offset. ``--verify`` checks a livemig stream's checksums and RAM
digests. The decoding, the RAM dump and the checks are ``livemig.streams.analyze``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from livemig.streams.analyze import analyze_stream, dump_ram, read_stream


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("analyze", help="decode a migration stream and report on it")
    parser.add_argument("file", help="stream file, or - for standard input")
    parser.add_argument("--dump-ram", metavar="DIR", help="write each RAM block to DIR")
    parser.add_argument("--verify", action="store_true",
                        help="check the stream's checksums and RAM digests (livemig streams "
                        "made with x-checksums)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--devices", action="store_true",
                        help="print every device section's state (JSON)")  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.file == "-" else read_stream(args.file)
    result = analyze_stream(data, keep_ram=bool(args.dump_ram), verify=args.verify)
    report = result.report()
    if args.dump_ram:
        report["dump_ram"] = dump_ram(result, args.dump_ram)
    if result.verifier is not None:
        report["verify"] = result.verifier.report
    try:
        if args.json:
            json.dump(report, sys.stdout, indent=1)
            print()
        else:
            _print_tables(report, len(data), args.devices)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (| head): not an error of ours, and no traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _print_tables(report: dict[str, Any], total: int, show_devices: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = report["header"]
    console.print(
        f"stream: {total} bytes, version {head.get('version')}, machine "
        f"{head.get('machine_type')}, capabilities {head.get('capabilities', [])}"
    )
    blocks = Table(title="RAM blocks")
    kinds = ("normal", "zero", "xbzrle", "compressed", "mapped")
    for col in ("idstr", "used_length", *kinds):
        blocks.add_column(col, justify="left" if col == "idstr" else "right")
    for b in report["ram_blocks"]:
        c = report["pages"].get(b["idstr"], {})
        blocks.add_row(b["idstr"], hex(b["used_length"]), *(str(c.get(k, 0)) for k in kinds))
    console.print(blocks)
    for d in report.get("dump_ram", []):
        if "skipped" in d:
            console.print(f"dump-ram: {d['idstr']} not written: {d['skipped']}")
        else:
            console.print(f"dump-ram: wrote {d['path']}: {d['pages']} pages, {d['from-stream']} "
                          f"from the stream, {d['never-sent']} never sent (zero)")  # fmt: skip
    if "verify" in report:
        v = report["verify"]
        console.print(f"verify: {v['checksum-units']} checksummed units match"
                      + (f"; RAM {v['ram-digests']}" if "ram-digests" in v else ""))  # fmt: skip
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
    devices = report["devices"]
    if not show_devices:
        names: dict[str, int] = {}
        for d in devices:
            names[d["idstr"]] = names.get(d["idstr"], 0) + 1
        listed = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in names.items())
        console.print(f"{len(devices)} device sections ({listed}): --devices shows their state")
        return
    console.print("devices:")
    console.print_json(json.dumps(devices))
