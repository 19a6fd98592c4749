"""Two test hosts on one machine: network namespaces joined by a veth pair, shaped with tbf.

``TwoHosts`` creates namespaces ``<prefix>-a`` and ``<prefix>-b``, a veth pair between them with
link-local addresses (169.254.0.0/16: the project's own hosts, nobody else's), optionally a
``tc tbf`` bandwidth limit on both ends, and removes all of it on exit. Processes are started
inside with ``prefix_a`` / ``prefix_b`` (``ip netns exec NAME``). Root only; the error says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from livemig.errors import UsageError

_TC_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
             "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}  # fmt: skip


def tc_rate_bytes(rate: str) -> int:
    """Bytes per second of a ``tc`` rate such as ``1gbit`` or ``200mbit`` (tc's own units)."""
    import re

    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]+)", rate.strip().lower())
    if not m or m.group(2) not in _TC_UNITS:
        raise UsageError(f"link rate {rate!r}: expected e.g. 1gbit, 200mbit, 100kbit")
    return int(float(m.group(1)) * _TC_UNITS[m.group(2)] / 8)


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise UsageError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


class TwoHosts:
    """A pair of network namespaces ``a`` and ``b`` joined by a veth link."""

    def __init__(self, prefix: str | None = None, rate: str | None = "1gbit",
                 subnet: int | None = None) -> None:  # fmt: skip
        pid = os.getpid()
        self.prefix = prefix or f"lm{pid % 100000}"
        self.ns_a = f"{self.prefix}-a"
        self.ns_b = f"{self.prefix}-b"
        self.dev_a = f"{self.prefix}a"[:15]
        self.dev_b = f"{self.prefix}b"[:15]
        octet = subnet if subnet is not None else pid % 250 + 1
        self.addr_a = f"169.254.{octet}.1"
        self.addr_b = f"169.254.{octet}.2"
        self.rate = rate
        self._made: list[str] = []

    @staticmethod
    def check() -> None:
        """Refuse clearly where namespaces cannot be made."""
        if os.geteuid() != 0:
            raise UsageError("two hosts need root (network namespaces and tc): run as root")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise UsageError(f"two hosts need '{tool}' (apt-get install iproute2)")

    def __enter__(self) -> TwoHosts:
        self.check()
        try:
            for ns in (self.ns_a, self.ns_b):
                _ip("netns", "add", ns)
                self._made.append(ns)
            _ip("link", "add", self.dev_a, "type", "veth", "peer", "name", self.dev_b)
            _ip("link", "set", self.dev_a, "netns", self.ns_a)
            _ip("link", "set", self.dev_b, "netns", self.ns_b)
            for ns, dev, addr in ((self.ns_a, self.dev_a, self.addr_a),
                                  (self.ns_b, self.dev_b, self.addr_b)):  # fmt: skip
                _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _ip("-n", ns, "link", "set", "dev", dev, "up")
                _ip("-n", ns, "link", "set", "dev", "lo", "up")
                if self.rate:
                    proc = subprocess.run(
                        ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                         self.rate, "burst", "256kb", "latency", "50ms"],
                        capture_output=True, text=True, timeout=10)  # fmt: skip
                    if proc.returncode != 0:
                        raise UsageError(f"tc tbf on {dev}: {proc.stderr.strip()}")
        except BaseException:
            self.close()
            raise
        return self

    def prefix_a(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns_a]

    def prefix_b(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns_b]

    def close(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self._made.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()
