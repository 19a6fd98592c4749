"""The ``livemig`` command line: one sub-command per module in this package.

Each module listed in ``COMMANDS`` exposes ``register(subparsers)`` which adds its parser and
sets ``func`` to a callable taking the parsed arguments and returning an exit status. Any
``LivemigError`` escaping a command is printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from livemig.errors import LivemigError

COMMANDS = (
    "run", "guests", "demo", "migrate", "front", "plan", "report", "analyze", "capture",
    "replay", "bench",
)  # fmt: skip


def describe(doc: str | None) -> str:
    """A command's ``--help`` description from its module docstring's first paragraph, as
    text: without the ``livemig NAME ...``: lead and the reStructuredText quotes."""
    first = (doc or "").split("\n\n")[0]
    first = re.sub(r"^``livemig [^`]*``:\s*", "", first.strip())
    first = first.replace("``", "").replace("\n", " ")
    return first[:1].upper() + first[1:]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livemig", description="Live migration of running virtual machines."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"livemig.cli.{name}")
        except ModuleNotFoundError as exc:
            # A command whose module has not been written yet is simply absent.
            if exc.name == f"livemig.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LivemigError as exc:
        print(f"livemig {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"livemig {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
