"""``livemig guests build | list``: build the guest programs into the cache, or list them.

``build`` with no names builds every built-in guest (the ``./dev`` script runs it during
setup, so the first ``livemig run`` does not wait for the compiler); names or paths to .c
files build those instead. ``list`` shows the built-in guests and whether each is cached.
"""

from __future__ import annotations

import argparse
import time

from livemig.guests import BUILTIN_GUESTS, build_guest, builtin_guests, cache_dir
from livemig.guests.build import cache_key, find_compiler, find_objcopy, resolve_source


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
