"""The demo's migration, step by step: two local ``livemig run`` processes, a guest migrated
live between them, checked and reported (``livemig demo`` prints between the steps).

``Demo(DemoOptions(...), stack, workdir)``: ``start`` starts (with ``two_hosts``, in two
network namespaces joined by a veth pair shaped with tc tbf) a source running the guest and a
destination waiting with ``--incoming defer``, sets there the capabilities both sides need and
sends ``migrate-incoming``; ``configure`` sets the source's capabilities (with ``x-verify``:
both sides hash RAM at the switch-over) and parameters; ``plan`` samples the guest and
predicts the migration (``livemig.control.plan``); ``migrate`` follows it to its end
(switching to post-copy after the first full pass when asked), cancelling it if it did not
complete; ``result`` adds the destination's side, ``check_invariant`` memstress's invariant
there after a completed migration; ``report`` writes the JSON and PNG report. Every process is ended by
the ``ExitStack`` given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livemig.errors import LivemigError, UsageError
from livemig.units import PAGE_SIZE, parse_size


@dataclass
class DemoOptions:
    """``livemig demo``'s flags, by the same names."""

    memory: str = "256M"
    smp: int = 2
    working_set: str = "64M"
    dirty_rate: str | None = None  # bytes/s; None: 20M, or 0 (as fast as it can) with postcopy
    guest: str = "memstress"
    params: dict[str, Any] = field(default_factory=dict)
    caps: dict[str, bool] = field(default_factory=dict)
    postcopy: bool = False  # switch to post-copy after the first full pass, with preempt
    multifd: int | None = None
    two_hosts: bool = False
    link_rate: str = "1gbit"  # tc tbf rate with two_hosts
    out: str | Path = "livemig-report"  # report path stem

    def check(self) -> int:
        """Refuse what does not fit (UsageError); fill in the dirty rate; the working set."""
        from livemig.netns import tc_rate_bytes
        from livemig.report import timeline

        if self.dirty_rate is None:
            # A 20 MB/s guest converges in pre-copy within a pass or two, before a post-copy
            # switch could come: the post-copy demo needs a guest that outruns the link.
            self.dirty_rate = "0" if self.postcopy else "20M"
        memory = parse_size(self.memory, "--memory")
        if memory <= 0 or memory % PAGE_SIZE:
            raise UsageError(f"--memory {self.memory}: a positive multiple of 4 KiB, e.g. 256M")
        ws = parse_size(self.working_set, "--working-set")
        parse_size(self.dirty_rate, "--dirty-rate")  # before the guest is built, not after
        if self.two_hosts:
            tc_rate_bytes(self.link_rate)
        timeline.prepare_stem(Path(self.out), "--out")
        if ws > memory // 2:
            raise UsageError(f"--working-set {self.working_set} must be at most half of --memory")
        if self.smp < 1:
            raise UsageError("--smp must be at least 1")
        if self.multifd is not None and not 1 <= self.multifd <= 255:
            raise UsageError("--multifd takes 1 to 255 channels")
        return ws


@dataclass
class DemoResult:
    """How the demo's migration ended."""

    final: dict[str, Any]  # the source's final query-migrate
    destination: dict[str, Any]  # the destination's query-migrate ({} if it could not say)
    invariant: dict[str, Any] | None  # memstress's check on the destination (None: not run)
    report: dict[str, Any] | None = None  # livemig.report.timeline's report
    report_paths: tuple[Path, Path] | None = None

    @property
    def ok(self) -> bool:
        inv = self.invariant
        return self.final.get("status") == "completed" and (inv is None or bool(inv.get("ok")))


class Demo:
    """See the module docstring; ``src`` and ``dst`` are ``livemig.procs`` processes."""

    def __init__(self, options: DemoOptions, stack: contextlib.ExitStack, workdir: Path) -> None:
        self.opts = options
        self.ws = options.check()
        self.stack = stack
        self.workdir = Path(workdir)
        self.hosts: Any = None  # livemig.netns.TwoHosts with two_hosts
        self.src: Any = None
        self.dst: Any = None
        self.uri = ""  # where the source migrates to
        self.listen = ""  # where the destination listens
        self.caps: dict[str, bool] = {}
        self.params: dict[str, Any] = {}
        self.postcopy_started = False
        self.prediction: Any = None
        self._sampler: Any = None

    def start_hosts(self) -> Any:
        """With two_hosts: the two network namespaces (their TwoHosts), else None."""
        if self.opts.two_hosts:
            from livemig.netns import TwoHosts

            self.hosts = self.stack.enter_context(TwoHosts(rate=self.opts.link_rate))
        return self.hosts

    def shared_capabilities(self) -> list[str]:
        """Capabilities both sides must have on."""
        o = self.opts
        preempt = o.caps.get("postcopy-preempt", True)
        return [c for c, on in (("postcopy-ram", o.postcopy),
                                ("postcopy-preempt", o.postcopy and preempt),
                                ("multifd", bool(o.multifd)),
                                ("x-checksums", True)) if on]  # fmt: skip

    def start(self) -> None:
        """The source with the guest, the destination waiting, set up and listening."""
        from livemig import procs

        o = self.opts
        pre_src = pre_dst = None
        host = "127.0.0.1"
        if self.hosts is not None:
            pre_src, pre_dst, host = (self.hosts.prefix_a(), self.hosts.prefix_b(),
                                      self.hosts.addr_b)  # fmt: skip
        port = procs.free_port() if not o.two_hosts else 4444
        self.uri = f"tcp:{host}:{port}"
        rate = parse_size(o.dirty_rate or "0", "--dirty-rate") // PAGE_SIZE
        append = f"ws={self.ws} rate={rate} mark_ms=500"
        self.src = self.stack.enter_context(procs.source(
            self.workdir, guest=o.guest, memory=o.memory, smp=o.smp, append=append,
            prefix=pre_src))  # fmt: skip
        self.listen = f"tcp:{'0.0.0.0' if o.two_hosts else host}:{port}"
        # The destination waits with -incoming defer: capabilities that both sides need
        # (multifd, postcopy-ram) must be set there before it starts listening, as with QEMU.
        self.dst = self.stack.enter_context(procs.destination(
            self.workdir, memory=o.memory, smp=o.smp, incoming="defer", prefix=pre_dst))  # fmt: skip
        self.src.wait_ready()
        self.dst.wait_ready()
        both = self.shared_capabilities()
        if both:
            self.dst.qmp("migrate-set-capabilities",
                         capabilities=[{"capability": c, "state": True} for c in both])  # fmt: skip
        if o.multifd:
            self.dst.qmp("migrate-set-parameters", **{"multifd-channels": o.multifd})
        self.dst.qmp("migrate-incoming", uri=self.listen)

    def configure(self) -> None:
        """The source's capabilities and parameters for the migration."""
        o = self.opts
        both = self.shared_capabilities()
        self.caps = {**{c: True for c in ("events", "return-path", "x-verify", *both)}, **o.caps}
        self.src.qmp("migrate-set-capabilities",
                     capabilities=[{"capability": c, "state": v}
                                   for c, v in self.caps.items()])  # fmt: skip
        self.params = dict(o.params)
        if o.multifd:
            self.params["multifd-channels"] = o.multifd
        if self.params:
            self.src.qmp("migrate-set-parameters", **self.params)

    def plan(self) -> Any:
        """Sample the guest for a moment and predict the migration (a
        ``livemig.migration.planner.Prediction``; LivemigError when it cannot)."""
        from livemig.control.plan import plan_for

        link = None
        if self.opts.two_hosts:
            from livemig.netns import tc_rate_bytes

            link = tc_rate_bytes(self.opts.link_rate)
        self.prediction = plan_for(self.src._qmp, 1.0, link, None)
        return self.prediction

    def migrate(self, on_progress: Callable[[dict[str, Any]], None] | None = None
                ) -> dict[str, Any]:  # fmt: skip
        """Migrate and follow to the end (``on_progress`` with each ``query-migrate``);
        cancelled if it did not complete. Returns the source's final reply."""
        from livemig.report import progress, timeline

        src = self.src
        self._sampler = sampler = timeline.Sampler()
        src.qmp("migrate", uri=self.uri)

        def poll(info: dict[str, Any]) -> None:
            sampler(info)
            if self.opts.postcopy and not self.postcopy_started \
                    and info.get("status") == "active" \
                    and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:  # fmt: skip
                # after the first full pass (QEMU's advice)
                src.qmp("migrate-start-postcopy")
                self.postcopy_started = True
            if on_progress is not None:
                on_progress(info)

        final = progress.follow(lambda: src.qmp("query-migrate"), quiet=True, on_poll=poll,
                                timeout=600)  # fmt: skip
        if final.get("status") != "completed":
            with contextlib.suppress(LivemigError):
                src.qmp("migrate_cancel")
            final = progress.follow(lambda: src.qmp("query-migrate"), quiet=True, timeout=30)
        return final

    def result(self, final: dict[str, Any]) -> DemoResult:
        """The migration's result, with the destination's ``query-migrate``."""
        dest: dict[str, Any] = {}
        with contextlib.suppress(LivemigError):
            dest = self.dst.qmp("query-migrate")
        return DemoResult(final=final, destination=dest, invariant=None)

    def check_invariant(self, result: DemoResult) -> DemoResult:
        """memstress's invariant on the destination (after a completed migration), read while
        the guest is briefly paused, into ``result``."""
        try:
            self.dst.qmp("stop")
            try:
                result.invariant = self.dst.qmp("x-guest-check")
            finally:
                self.dst.qmp("cont")
        except LivemigError as exc:
            result.invariant = {"ok": False, "error": str(exc)}
        return result

    def report(self, result: DemoResult) -> DemoResult:
        """Write the report (JSON and PNG at ``out``) into ``result``."""
        from livemig.report import timeline

        o, sampler, pred = self.opts, self._sampler, self.prediction
        final = result.final
        result.report = timeline.build(
            config={"guest": o.guest, "memory": o.memory, "smp": o.smp,
                    "working-set": o.working_set, "dirty-rate": o.dirty_rate, "uri": self.uri,
                    "two-hosts": o.two_hosts, "parameters": self.params,
                    "postcopy": o.postcopy, "multifd": o.multifd},
            source_final=final, source_report=_safe(self.src, "x-query-migration-report"),
            destination_final=result.destination, samples=sampler.samples,
            sample_t0=sampler.t0,
            destination_report=_safe(self.dst, "x-query-migration-report"),
            prediction=None if pred is None else pred.as_dict(),
            verification={"ram-hashes-equal": final.get("x-verified"),
                          "invariant": result.invariant},
        )  # fmt: skip
        result.report_paths = timeline.save(result.report, Path(o.out))
        return result


def _safe(proc: Any, command: str) -> Any:
    try:
        return proc.qmp(command)
    except LivemigError:
        return None
