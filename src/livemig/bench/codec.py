"""``livemig bench codec``: decode and encode 1 GiB of RAM page records, beside a memory copy.

The mix: pages of one 64 MiB block in runs of 56 normal pages followed by 8 zero pages (7/8 of
the pages carry data), every record after the first with CONTINUE, as a pre-copy pass of a busy
guest looks. The stream for one pass over the block is built once and decoded (and encoded)
repeatedly until ``--size`` bytes of page records went through. The baseline is a numpy copy of
the same number of bytes in the same run; results are printed as GB/s and as ratios to it.
Targets on the project machine: decode >= 1 GB/s, encode to sendmsg buffers >= 2 GB/s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from livemig.bench.common import table_console
from livemig.units import PAGE_SIZE, format_size, parse_size
from livemig.wire import (
    NEED_DATA,
    Decoder,
    Encoder,
    Eof,
    Header,
    RamBlockInfo,
    RamEos,
    RamPages,
    RamSetup,
    SectionFooter,
    SectionPart,
    SectionStart,
)

BLOCK = "pc.ram"
RUN_NORMAL, RUN_ZERO = 56, 8


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("codec", help="page record decode/encode speed vs memory copy")
    parser.add_argument("--size", default="1G", help="bytes of page records to process (1G)")
    parser.add_argument("--block", default="64M", help="RAM block size per pass (64M)")
    parser.set_defaults(func=run)


def _layout(npages: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(npages)
    normal = (idx % (RUN_NORMAL + RUN_ZERO)) < RUN_NORMAL
    return idx[normal].astype(np.uint64) * PAGE_SIZE, idx[~normal].astype(np.uint64) * PAGE_SIZE


def _encode_pass(enc: Encoder, ram: np.ndarray, normal: np.ndarray, zero: np.ndarray) -> list:
    bufs: list = []
    # One call per run, as a RAM iteration would issue them.
    for start in range(0, len(normal), RUN_NORMAL):
        run = normal[start : start + RUN_NORMAL]
        bufs += enc.encode_pages(BLOCK, run, ram)
        zi = (start // RUN_NORMAL) * RUN_ZERO
        bufs += enc.encode_zero_pages(BLOCK, zero[zi : zi + RUN_ZERO])
    return bufs


def _time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    total = parse_size(args.size, "--size")
    block = parse_size(args.block, "--block")
    npages = block // PAGE_SIZE
    rng = np.random.default_rng(0)
    ram = rng.integers(0, 256, block, dtype=np.uint8)  # pre-faulted by the fill
    normal, zero = _layout(npages)
    enc = Encoder()
    head = [Header(), SectionStart(2, "ram", 0, 4), RamSetup(block, (RamBlockInfo(BLOCK, block),))]
    head += [RamEos(), SectionFooter(2), SectionPart(2)]
    parts = [b for ev in head for b in enc.send(ev)] + _encode_pass(enc, ram, normal, zero)
    parts += [b for ev in (RamEos(), SectionFooter(2), Eof()) for b in enc.send(ev)]
    stream = b"".join(bytes(b) for b in parts)
    pass_bytes = len(normal) * PAGE_SIZE  # page payload per pass
    repeat = max(1, -(-total // pass_bytes))

    def decode() -> None:
        dec = Decoder()
        dec.receive_data(stream)
        pages = 0
        while (ev := dec.next_event()) is not NEED_DATA:
            if isinstance(ev, RamPages):
                pages += len(ev)
        assert pages == len(normal)

    def encode() -> None:
        bufs = _encode_pass(Encoder(), ram, normal, zero)
        assert len(bufs) > len(normal)

    dst = np.empty(len(stream), np.uint8)
    src = np.frombuffer(stream, np.uint8)

    def copy() -> None:
        np.copyto(dst, src)

    processed = repeat * pass_bytes
    t_copy = _time(copy, repeat)
    t_dec = _time(decode, repeat)
    t_enc = _time(encode, repeat)
    console = table_console()
    table = Table(title=f"codec: {format_size(processed)} of page records "
                        f"({RUN_NORMAL} normal + {RUN_ZERO} zero pages per run)")  # fmt: skip
    for col in ("operation", "GB/s", "x memory copy", "target"):
        table.add_column(col, justify="left" if col == "operation" else "right")
    gbs = {name: processed / t / 1e9 for name, t in (("copy", t_copy), ("dec", t_dec),
                                                      ("enc", t_enc))}  # fmt: skip
    table.add_row("memory copy (numpy)", f"{gbs['copy']:.2f}", "1.00", "")
    table.add_row("decode", f"{gbs['dec']:.2f}", f"{gbs['dec'] / gbs['copy']:.2f}", ">= 1 GB/s")
    table.add_row("encode (sendmsg buffers)", f"{gbs['enc']:.2f}",
                  f"{gbs['enc'] / gbs['copy']:.2f}", ">= 2 GB/s")  # fmt: skip
    console.print(table)
    return 0
