"""``livemig migrate``: drive a live migration of a running process over QMP, with progress.

The source is any QMP server speaking QEMU's migration commands (a ``livemig run`` process or a
QEMU). Capabilities and parameters are set first, then ``migrate``; progress is polled from
``query-migrate`` until a final state. Ctrl-C cancels the migration (the guest keeps running on
the source). ``--json`` prints the final ``query-migrate`` reply plus ``"verified"``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

from livemig.errors import UsageError
from livemig.report.progress import follow, summary_table
from livemig.transport import parse_uri


def _param(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    low = value.lower()
    if low in ("on", "true", "yes"):
        return name, True
    if low in ("off", "false", "no"):
        return name, False
    try:
        return name, int(value)
    except ValueError:
        pass
    from livemig.units import parse_size

    if name in ("max-bandwidth", "xbzrle-cache-size", "max-postcopy-bandwidth",
                "avail-switchover-bandwidth"):  # fmt: skip
        return name, parse_size(value, name)
    return name, value


def _cap(text: str) -> tuple[str, bool]:
    name, sep, value = text.partition("=")
    if not sep:
        return name, True
    if value.lower() not in ("on", "off", "true", "false"):
        raise argparse.ArgumentTypeError(f"capability {name!r}: expected on or off")
    return name, value.lower() in ("on", "true")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("migrate", help="migrate a running guest live (over QMP)",
                       description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("uri", help="destination: tcp:HOST:PORT, unix:PATH, exec:CMD, file:PATH")
    p.add_argument("--qmp", required=True, help="QMP of the source: unix:PATH or tcp:HOST:PORT")
    p.add_argument(
        "--set",
        dest="params",
        action="append",
        type=_param,
        default=[],
        metavar="PARAM=VALUE",
        help="migration parameter, e.g. downtime-limit=50 max-bandwidth=1G",
    )
    p.add_argument(
        "--cap",
        dest="caps",
        action="append",
        type=_cap,
        default=[],
        metavar="NAME[=on|off]",
        help="migration capability, e.g. auto-converge",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="hash every RAM block on both sides at switch-over and compare",
    )
    p.add_argument(
        "--no-return-path",
        action="store_true",
        help="do not ask the destination to confirm (return-path capability)",
    )
    p.add_argument(
        "--postcopy",
        action="store_true",
        help="enable post-copy (postcopy-ram); switch when told (QMP migrate-start-postcopy)",
    )
    p.add_argument(
        "--postcopy-after-precopy",
        action="store_true",
        help="enable post-copy and switch to it after the first full pre-copy pass",
    )
    p.add_argument("--json", action="store_true", help="print the final result as JSON")
    p.add_argument("--multifd", type=int, metavar="N", default=None,
                   help="capability multifd with N channels (the destination needs it too: "
                   "see --dest-qmp)")  # fmt: skip
    p.add_argument("--compress", choices=("none", "zlib", "zstd"), default=None,
                   help="multifd-compression (with --multifd)")  # fmt: skip
    p.add_argument("--xbzrle", metavar="SIZE", default=None,
                   help="capability xbzrle with this xbzrle-cache-size (e.g. 64M)")  # fmt: skip
    p.add_argument("--dest-qmp", metavar="ADDR", default=None,
                   help="QMP of a destination started with --incoming defer: set the same "
                   "multifd capability and parameters there, then migrate-incoming URI")  # fmt: skip
    p.add_argument(
        "--timeout", type=float, default=None, help="cancel if not finished after this many seconds"
    )
    p.add_argument("--interval", type=float, default=0.2, help="progress poll interval (s)")
    p.set_defaults(func=run)


def _multifd_options(args: argparse.Namespace, caps: dict[str, bool]) -> None:
    """--multifd/--compress/--xbzrle as capabilities and parameters; --dest-qmp applies the
    multifd ones to the destination too and starts its incoming side."""
    from livemig.units import parse_size

    if args.compress is not None and args.multifd is None:
        raise UsageError("--compress needs --multifd N")
    if args.multifd is not None:
        if args.multifd < 1 or args.multifd > 255:
            raise UsageError("--multifd: 1 to 255 channels")
        if args.xbzrle is not None:
            raise UsageError("--xbzrle and --multifd exclude each other (QEMU: xbzrle is not "
                             "compatible with multifd)")  # fmt: skip
        caps["multifd"] = True
        args.params.append(("multifd-channels", args.multifd))
        args.params.append(("multifd-compression", args.compress or "none"))
    if args.xbzrle is not None:
        caps["xbzrle"] = True
        args.params.append(("xbzrle-cache-size", parse_size(args.xbzrle, "--xbzrle")))
    if args.dest_qmp is not None:
        from livemig.qmp.client import QMPConnection

        with QMPConnection(args.dest_qmp).connect() as dq:
            if args.multifd is not None:
                dq.command("migrate-set-capabilities",
                           capabilities=[{"capability": "multifd", "state": True}])  # fmt: skip
                dq.command("migrate-set-parameters", **{
                    "multifd-channels": args.multifd,
                    "multifd-compression": args.compress or "none"})  # fmt: skip
            dq.command("migrate-incoming", uri=args.uri)


def run(args: argparse.Namespace) -> int:

    from livemig.qmp.client import QMPConnection

    uri = parse_uri(args.uri)
    console = Console(stderr=True)
    caps = dict(args.caps)
    if uri.has_return_path and not args.no_return_path:
        caps.setdefault("return-path", True)
    if args.verify:
        caps["x-verify"] = True
        if not uri.has_return_path or args.no_return_path:
            raise UsageError("--verify needs a return path (a tcp:, unix: or fd: URI)")
    if args.postcopy or args.postcopy_after_precopy:
        caps["postcopy-ram"] = True
    _multifd_options(args, caps)
    with QMPConnection(args.qmp).connect() as qmp:
        if caps:
            qmp.command("migrate-set-capabilities", capabilities=[
                {"capability": k, "state": v} for k, v in caps.items()])  # fmt: skip
        if args.params:
            qmp.command("migrate-set-parameters", **dict(args.params))
        qmp.command("migrate", uri=args.uri)
        switched = False

        def query() -> dict[str, Any]:
            nonlocal switched
            info = qmp.command("query-migrate")
            # After the first full pass (QEMU's tests wait for dirty-sync-count 2 likewise).
            if args.postcopy_after_precopy and not switched and info.get("status") == "active" \
                    and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:  # fmt: skip
                qmp.command("migrate-start-postcopy")
                switched = True
            return info

        try:
            info = follow(query, interval=args.interval,
                          timeout=args.timeout, console=console, quiet=args.json)  # fmt: skip
            if info.get("status") not in ("completed", "failed", "cancelled"):
                console.print("[yellow]time-out: cancelling the migration[/]")
                qmp.command("migrate_cancel")
                info = follow(lambda: qmp.command("query-migrate"), quiet=True, timeout=30)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: cancelling the migration[/]")
            qmp.command("migrate_cancel")
            info = follow(lambda: qmp.command("query-migrate"), quiet=True, timeout=30)
    verified = info.get("x-verified") if args.verify else None
    if args.json:
        out = dict(info)
        if args.verify:
            out["verified"] = bool(verified)
        json.dump(out, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        extra = {"verified": "yes, RAM identical" if verified else "NO"} if args.verify else None
        if "x-dirty-tracker" in info:
            extra = {**(extra or {}), "dirty tracker": info["x-dirty-tracker"]}
        Console().print(summary_table(info, extra))
    return 0 if info.get("status") == "completed" else 1
