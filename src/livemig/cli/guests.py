"""``livemig guests build | list``: build the guest programs into the cache, or list them.

``build`` with no names builds every built-in guest and the small host libraries livemig
loads with ctypes (the vCPU stop hook, the compute guest's reference; the ``./dev`` script
runs it during setup, so the first ``livemig run`` does not wait for the compiler); names or paths to .c
files build those instead. ``list`` shows the built-in guests and whether each is cached.
"""

from __future__ import annotations

import argparse
import time

from livemig.guests import BUILTIN_GUESTS, build_guest, builtin_guests, cache_dir, compute
from livemig.guests.build import cache_key, find_compiler, find_objcopy, resolve_source
from livemig.machine import stop_hook


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("guests", help="build or list the guest programs")
    actions = parser.add_subparsers(dest="guests_action", metavar="ACTION")

    build = actions.add_parser("build", help="build guests into the cache and print where")
    build.add_argument(
        "guests", nargs="*", metavar="GUEST", help="built-in names or .c files (default: all)"
    )
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    build.set_defaults(func=_build)

    listing = actions.add_parser("list", help="list the built-in guests")
    listing.set_defaults(func=_list)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _build(args: argparse.Namespace) -> int:
    for guest in args.guests or builtin_guests():
        started = time.monotonic()
        img = build_guest(guest, rebuild=args.force)
        took = time.monotonic() - started
        print(f"{img.name:<12} {len(img.data):>7} bytes  {img.path}  ({took:.2f} s)")
    if not args.guests:
        # The host-side C livemig loads with ctypes: the vCPU stop hook every machine needs,
        # and the compute guest's reference. Built here so that no run waits for them.
        for name, build in (
            ("vcpu_stop", stop_hook.library_path),
            ("compute_ref", compute.library_path),
        ):
            started = time.monotonic()
            path = build(rebuild=args.force)
            took = time.monotonic() - started
            print(f"{name:<12} {path.stat().st_size:>7} bytes  {path}  ({took:.2f} s)")
    return 0


def _list(args: argparse.Namespace) -> int:
    cc, objcopy = find_compiler(), find_objcopy()
    print(f"built-in guests (cache: {cache_dir()}):")
    for name in builtin_guests():
        _, source = resolve_source(name)
        cached = (cache_dir() / f"{name}-{cache_key(source, cc, objcopy)}.bin").is_file()
        state = "built" if cached else "not built"
        print(f"  {name:<12} {state:<10} {BUILTIN_GUESTS[name]}")
    return 0
