"""Migrate a running source to a URI over QMP, as a management tool does: ``migrate``.

The source is any QMP server speaking QEMU's migration commands (a ``livemig run`` process or a
QEMU). Every capability and parameter it manages is set first, to what the options ask or else
to the source's default, so nothing leaks from an earlier run (``livemig.control.settings``).
With ``dest_qmp`` the destination (started with ``--incoming defer``) gets the capabilities
and parameters both sides need, then ``migrate-incoming``. Then ``migrate``; ``query-migrate``
is polled until a final state (``colo`` for a replication), each reply handed to
``on_progress``. A time-out, the ``cancel`` event or Ctrl-C cancels the migration (the guest
keeps running on the source).

A livemig source (one whose capabilities list ``x-checksums``) sends a checksummed stream
unless ``checksums=False``; a QEMU source is left as it is. ``verify``: on a socket, both sides
hash RAM at switch-over and the destination's verdict comes back; to a ``file:`` the file is
read back when the migration is over and its checksums and RAM digests checked
(``livemig.streams.verify_file``); through ``exec:`` the loader checks them.

Errors: ``UsageError`` for options that do not fit together (before anything is sent to either
side), ``QMPClientError`` when a side refuses a command (the source's ``migrate`` to a URI it
cannot open, a destination that is not waiting for ``migrate-incoming``), and
``MigrationFailed`` when the migration ran and ended failed or cancelled; it carries the
``MigrateResult`` with everything known (the reason, the last progress, the destination's
side). ``livemig migrate`` (``livemig.cli.migrate``) is its command line and only prints.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livemig.errors import LivemigError, MigrationError, UsageError
from livemig.report import timeline
from livemig.report.progress import FINAL, follow, with_last_progress
from livemig.transport import parse_uri
from livemig.units import format_size, parse_size

REPLICATE_DELAY_MS = 50  # QEMU's x-checkpoint-delay default (20 s) suits COLO's compare mode

# What a destination must have set too, as in QEMU: the stream alone does not turn these on
# (a post-copy or multifd stream into a destination without them fails at its first packet).
DEST_CAPS = ("multifd", "postcopy-ram", "postcopy-preempt", "mapped-ram")
DEST_PARAMS = ("multifd-channels", "multifd-compression", "multifd-zlib-level",
               "multifd-zstd-level")  # fmt: skip

GROWTH_FACTOR = 3  # a snapshot past this many times the guest's RAM is not converging


@dataclass
class MigrateOptions:
    """What ``livemig migrate``'s flags ask, by the same names (the error messages name the
    flags). ``caps`` and ``params`` are QMP's names and values (``parse_cap`` /
    ``parse_param`` read the command line's ``--cap`` / ``--set``)."""

    caps: dict[str, bool] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    verify: bool = False  # hash RAM on both sides (a file: is read back and checked)
    checksums: bool = True  # a livemig source sends livemig's checksums (x-checksums)
    return_path: bool = True  # ask the destination to confirm (return-path), when the URI can
    postcopy: bool = False  # postcopy-ram; switch when told (migrate-start-postcopy)
    postcopy_after_precopy: bool = False  # postcopy-ram, switched after the first full pass
    replicate: bool = False  # keep a standby (x-colo): returns once replication runs
    checkpoint_delay: int | None = None  # ms between checkpoints, with replicate
    multifd: int | None = None  # channels
    multifd_compression: str | None = None  # none, zlib, zstd (with multifd)
    xbzrle: str | int | None = None  # xbzrle-cache-size (a size such as "64M", or bytes)
    dest_qmp: str | None = None  # QMP of a destination started with --incoming defer
    stop: bool = False  # stop the guest first (a snapshot of one pass); cont if not completed
    timeout: float | None = None  # cancel if not finished after this many seconds
    interval: float = 0.2  # seconds between two query-migrate
    report: str | Path | None = None  # write STEM.json and STEM.png (livemig.report.timeline)


@dataclass
class MigrateResult:
    """How a migration ended, and what it took."""

    uri: str
    info: dict[str, Any]  # the source's final query-migrate (x-last-progress when it failed)
    capabilities: dict[str, bool]  # what was asked of the source (others: its defaults)
    parameters: dict[str, Any]
    changed: dict[str, list[str]]  # per side ("source", "destination"): "name old -> new"
    replicate: bool = False
    verified: bool | None = None  # with verify: RAM identical / the file's checksums match
    verified_how: str | None = None  # with verify: in words
    destination: dict[str, Any] | None = None  # the destination's final query-migrate
    colo: dict[str, Any] | None = None  # query-colo-status once replication runs
    postcopy_started: bool = False  # postcopy_after_precopy: migrate-start-postcopy was sent
    report_paths: tuple[Path, Path] | None = None  # STEM.json, STEM.png

    @property
    def status(self) -> str:
        return str(self.info.get("status", "none"))

    @property
    def ok(self) -> bool:
        """Completed (or, replicating, replication running)."""
        return self.status in (("completed", "colo") if self.replicate else ("completed",))

    @property
    def error(self) -> str | None:
        return self.info.get("error-desc")

    def destination_needs(self) -> dict[str, bool]:
        """The capabilities on at the source that the destination must have on too."""
        return _dest_caps(self.capabilities)


class MigrationFailed(MigrationError):
    """The migration ran and ended failed or cancelled; ``result`` says what is known."""

    def __init__(self, result: MigrateResult) -> None:
        self.result = result
        why = result.error or ("cancelled" if result.status == "cancelled" else result.status)
        super().__init__(f"migration to {result.uri} {result.status}: {why}",
                         phase=result.status)  # fmt: skip


class Cancelled(LivemigError):
    """The ``cancel`` event was set before the migration started: the source's settings were
    not touched (a ``dest_qmp`` destination may already wait). Set while it runs, the
    migration is cancelled and ``MigrationFailed`` raised."""


class _Stop(Exception):
    """``cancel`` seen between two QMP exchanges."""


def _dest_caps(caps: dict[str, bool]) -> dict[str, bool]:
    return {k: v for k, v in caps.items() if k in DEST_CAPS and v}


def _replicate_options(opts: MigrateOptions, caps: dict[str, bool], params: dict[str, Any],
                       uri: Any) -> None:  # fmt: skip
    """replicate: x-colo (and the return path it needs) and the checkpoint interval."""
    if opts.checkpoint_delay is not None and not opts.replicate:
        raise UsageError("--checkpoint-delay goes with --replicate")
    if not opts.replicate:
        return
    if not uri.has_return_path or not opts.return_path:
        raise UsageError("--replicate needs a return path (a tcp:, unix: or fd: URI): the "
                         "standby acknowledges every checkpoint")  # fmt: skip
    clash = [n for n in ("postcopy", "postcopy_after_precopy", "multifd", "xbzrle")
             if getattr(opts, n)]  # fmt: skip
    if clash:
        raise UsageError(f"--replicate does not go with --{clash[0].replace('_', '-')}: "
                         "checkpoints are pre-copy streams on one channel")  # fmt: skip
    caps["x-colo"] = True
    if "x-checkpoint-delay" not in params:
        delay = REPLICATE_DELAY_MS if opts.checkpoint_delay is None else opts.checkpoint_delay
        params["x-checkpoint-delay"] = delay
    elif opts.checkpoint_delay is not None:
        raise UsageError("give the interval once: --checkpoint-delay or --set x-checkpoint-delay")


def _multifd_options(opts: MigrateOptions, caps: dict[str, bool], params: dict[str, Any]) -> None:
    """multifd/multifd_compression/xbzrle as capabilities and parameters."""
    if opts.multifd_compression is not None and opts.multifd is None:
        raise UsageError("--multifd-compression needs --multifd N")
    if opts.multifd is not None:
        if opts.multifd < 1 or opts.multifd > 255:
            raise UsageError("--multifd: 1 to 255 channels")
        if opts.xbzrle is not None:
            raise UsageError("--xbzrle and --multifd exclude each other (QEMU: xbzrle is not "
                             "compatible with multifd)")  # fmt: skip
        caps["multifd"] = True
        params["multifd-channels"] = opts.multifd
        params["multifd-compression"] = opts.multifd_compression or "none"
    if opts.xbzrle is not None:
        caps["xbzrle"] = True
        size = opts.xbzrle
        if not isinstance(size, int):
            size = parse_size(size, "--xbzrle")
        params["xbzrle-cache-size"] = size


def _capability_names(qmp: Any) -> set[str]:
    return {c["capability"] for c in qmp.command("query-migrate-capabilities")}


def _checksum_capability(opts: MigrateOptions, caps: dict[str, bool], qmp: Any,
                         uri: Any) -> None:  # fmt: skip
    """x-checksums on by default for a livemig source; verify to a file or a pipe needs it."""
    livemig = "x-checksums" in _capability_names(qmp)
    if livemig:
        # set either way: capabilities outlive a migration in the source process
        caps.setdefault("x-checksums", opts.checksums)
        caps.setdefault("x-verify", bool(opts.verify))
    if opts.verify and not uri.has_return_path and not caps.get("x-checksums"):
        why = "--no-checksums" if livemig else "a source without x-checksums (QEMU)"
        raise UsageError(f"--verify to {uri} is the check of the stream's checksums when it "
                         f"is loaded: not possible with {why}")  # fmt: skip


def setup_destination(dest_qmp: str, uri: str, caps: dict[str, bool],
                      params: dict[str, Any]) -> list[str]:  # fmt: skip
    """A destination started with ``--incoming defer``: the capabilities and parameters both
    sides need (of the source's ``caps`` / ``params``; the rest back to the destination's
    defaults), then ``migrate-incoming URI``; returns what changed there."""
    from livemig.control.settings import apply_settings
    from livemig.qmp.client import QMPClientError, QMPConnection

    dcaps = _dest_caps(caps)
    if caps.get("x-checksums"):
        dcaps["x-checksums"] = True  # not needed there, but then it refuses a stream without
    if dcaps.get("postcopy-ram"):
        dcaps["postcopy-blocktime"] = True  # the destination's post-copy figures
    dparams = {k: v for k, v in params.items() if k in DEST_PARAMS}
    try:
        with QMPConnection(dest_qmp).connect() as dq:
            if "x-checksums" in dcaps and "x-checksums" not in _capability_names(dq):
                del dcaps["x-checksums"]  # a QEMU destination: it would not know the name
            changed = apply_settings(dq, dcaps, dparams,
                                     only_caps=(*DEST_CAPS, "postcopy-blocktime", "x-checksums"),
                                     only_params=DEST_PARAMS)  # fmt: skip
            dq.command("migrate-incoming", uri=uri)
    except QMPClientError as exc:
        if exc.command is None:
            raise
        # a refusal there read as the source's ("QMP migrate-set-capabilities failed: ...")
        hint = ""
        if "incoming" in (exc.desc or "").lower():
            hint = (" (--dest-qmp sets up a destination started with --incoming defer, then "
                    "sends migrate-incoming)")  # fmt: skip
        raise QMPClientError(f"the destination at {dest_qmp}: {exc}{hint}", command=exc.command,
                             arguments=exc.arguments, error_class=exc.error_class,
                             desc=exc.desc) from exc  # fmt: skip
    return changed


def _verify_file(path: str, offset: int = 0) -> tuple[bool, str]:
    """Read back a file the migration wrote: its checksums and RAM digests (analyze)."""
    from livemig.errors import StreamError
    from livemig.streams import verify_file

    try:
        result = verify_file(path, offset)
    except (MigrationError, StreamError) as exc:
        return False, f"NO: {exc}"
    assert result.verifier is not None
    rep = result.verifier.report
    text = f"yes, {rep['checksum-units']} checksums of the file match"
    if "ram-digests" in rep:
        text += ", RAM digests equal the source's"
    return True, text


def destination_result(addr: str) -> dict[str, Any] | None:
    """The destination's query-migrate once it has finished (post-copy ends there a moment
    after the source); None when it cannot be asked (it may have exited on failure)."""
    from livemig.qmp.client import QMPConnection

    try:
        with QMPConnection(addr).connect() as dq:
            return follow(lambda: dq.command("query-migrate"), quiet=True, timeout=10)
    except (OSError, LivemigError):
        return None


class _GrowthWatch:
    """A ``file:`` or ``exec:`` snapshot keeps every pass: a guest that dirties memory as fast
    as it is saved makes it grow without end (20 GB of a 1 GiB guest was seen). Past a few
    passes' worth of RAM, say so once, with the ways out."""

    def __init__(self, uri: Any, caps: dict[str, bool], warn: Callable[[str], None]) -> None:
        self.on = uri.scheme in ("file", "exec") and not caps.get("mapped-ram")
        self.warn = warn
        self.warned = False

    def __call__(self, info: dict[str, Any]) -> None:
        ram = info.get("ram", {})
        total, sent = ram.get("total", 0), ram.get("transferred", 0)
        if not self.on or self.warned or info.get("status") != "active" or not total:
            return
        if sent > GROWTH_FACTOR * total:
            self.warned = True
            self.warn(
                f"the snapshot has grown to {format_size(sent)}, {sent / total:.1f} times the "
                "guest's RAM, and is not done: the guest dirties memory as fast as it is saved, "
                "and the file keeps every pass. Ctrl-C cancels it. To make it converge: --stop "
                "(the guest stops first: one pass), --cap mapped-ram (a fixed-size file: pages "
                "are overwritten in place), or a slower guest (--cap auto-converge)")  # fmt: skip


def _nothing(*_args: Any) -> None:
    pass


def migrate(
    source_qmp: str,
    uri: str,
    options: MigrateOptions | None = None,
    *,
    on_changed: Callable[[str, list[str]], None] = _nothing,
    on_progress: Callable[[dict[str, Any]], None] = _nothing,
    on_warning: Callable[[str], None] = _nothing,
    on_cancel: Callable[[str], None] = _nothing,
    cancel: threading.Event | None = None,
) -> MigrateResult:
    """Migrate the guest behind ``source_qmp`` (``unix:PATH`` or ``tcp:HOST:PORT``) to ``uri``.

    Callbacks, all in the calling thread: ``on_changed(side, lines)`` once the settings are
    made, for the source then the destination (``name old -> new`` lines, possibly none);
    ``on_progress(info)`` with each ``query-migrate`` reply while following; ``on_warning``
    with a sentence worth showing now (a snapshot that does not converge); ``on_cancel(why)``
    (``"time-out"`` or ``"interrupted"``) just before ``migrate_cancel``. ``cancel``, once
    set, cancels the migration at the next poll, as Ctrl-C does. An exception raised by
    ``on_progress`` cancels the migration and propagates.

    Returns the result when the migration completed (or replication runs); raises
    ``MigrationFailed`` (with the result) when it failed or was cancelled.
    """
    from livemig.control.settings import apply_settings
    from livemig.qmp.client import QMPConnection

    opts = options or MigrateOptions()
    target = parse_uri(uri)
    caps = dict(opts.caps)
    params = dict(opts.params)
    if target.has_return_path and opts.return_path:
        caps.setdefault("return-path", True)
    if opts.verify:
        caps["x-verify"] = True
        if target.has_return_path and not opts.return_path:
            raise UsageError("--verify on a socket needs the return path (the destination's "
                             "verdict comes back on it): drop --no-return-path")  # fmt: skip
    if opts.postcopy or opts.postcopy_after_precopy:
        caps["postcopy-ram"] = True
    _replicate_options(opts, caps, params, target)
    _multifd_options(opts, caps, params)
    if opts.report:
        timeline.prepare_stem(Path(opts.report), "--report")
    stop = cancel or threading.Event()

    def not_cancelled() -> None:
        if stop.is_set():
            raise Cancelled("cancelled before the migration started")

    with QMPConnection(source_qmp).connect() as qmp:
        _checksum_capability(opts, caps, qmp, target)
    not_cancelled()
    dest_changed = (setup_destination(opts.dest_qmp, uri, caps, params)
                    if opts.dest_qmp is not None else [])  # fmt: skip
    not_cancelled()
    with QMPConnection(source_qmp).connect() as qmp:
        changed = apply_settings(qmp, caps, params)
        on_changed("source", changed)
        on_changed("destination", dest_changed)
        stopped = opts.stop and qmp.command("query-status").get("status") == "running"
        if stopped:
            qmp.command("stop")
        try:
            qmp.command("migrate", uri=uri)
        except LivemigError:
            if stopped:
                qmp.command("cont")
            raise
        switched = False
        growth = _GrowthWatch(target, caps, on_warning)
        last: dict[str, Any] = {}
        sampler = timeline.Sampler()

        def query() -> dict[str, Any]:
            nonlocal switched
            if stop.is_set():
                raise _Stop
            info = qmp.command("query-migrate")
            # After the first full pass (QEMU's tests wait for dirty-sync-count 2 likewise).
            if opts.postcopy_after_precopy and not switched and info.get("status") == "active" \
                    and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:  # fmt: skip
                qmp.command("migrate-start-postcopy")
                switched = True
            growth(info)
            sampler(info)
            if "ram" in info:
                last.update(info)
            try:
                on_progress(info)
            except Exception:  # the caller's bug must not leave a migration running unseen
                with contextlib.suppress(LivemigError):
                    qmp.command("migrate_cancel")
                raise
            return info

        def cancelled(why: str) -> dict[str, Any]:
            on_cancel(why)
            qmp.command("migrate_cancel")
            return follow(lambda: qmp.command("query-migrate"), quiet=True, timeout=30)

        until = ("completed", "failed", "cancelled", "colo") if opts.replicate else FINAL
        try:
            info = follow(query, interval=opts.interval, timeout=opts.timeout, quiet=True,
                          until=until)  # fmt: skip
            if info.get("status") not in until:
                info = cancelled("time-out")
        except (_Stop, KeyboardInterrupt):
            info = cancelled("interrupted")
        if stopped and info.get("status") != "completed":
            qmp.command("cont")  # as it was before stop
        colo = None
        if opts.replicate and info.get("status") == "colo":
            colo = qmp.command("query-colo-status")
        source_report = None
        if opts.report:
            with contextlib.suppress(LivemigError):  # QEMU has no such command
                source_report = qmp.command("x-query-migration-report")
    info = with_last_progress(info, last or None)
    result = MigrateResult(uri=uri, info=info, capabilities=caps, parameters=params,
                           changed={"source": changed, "destination": dest_changed},
                           replicate=opts.replicate, colo=colo,
                           postcopy_started=switched)  # fmt: skip
    if opts.verify:
        result.verified = bool(info.get("x-verified"))
        result.verified_how = "yes, RAM identical" if result.verified else "NO"
        if not target.has_return_path and info.get("status") == "completed":
            if target.scheme == "file":
                how = _verify_file(target.path, target.offset or 0)
                result.verified, result.verified_how = how
            else:
                result.verified = None
                result.verified_how = "when loaded: the stream carries checksums"
    if opts.dest_qmp is not None:
        result.destination = destination_result(opts.dest_qmp)
    if opts.report:
        rep = timeline.build(
            config={"uri": uri, "capabilities": caps, "parameters": params},
            source_final=info, source_report=source_report, destination_final=result.destination,
            samples=sampler.samples, sample_t0=sampler.t0,
            verification={"ram-hashes-equal": result.verified} if opts.verify else None,
        )  # fmt: skip
        result.report_paths = timeline.save(rep, Path(opts.report))
    if not result.ok:
        raise MigrationFailed(result)
    return result
