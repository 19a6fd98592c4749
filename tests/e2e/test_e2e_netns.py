"""Pre-copy over a veth pair between two network namespaces, with a ``tc tbf`` bandwidth limit.

The test makes its own two hosts: namespaces A and B joined by a veth pair with link-local
addresses (169.254.77.1/30 and .2/30, on links the test created, so no traffic leaves them),
200 Mbit/s token-bucket shaping on A's side. The source runs in A, the destination in B;
QMP stays on pathname unix sockets, which work across network namespaces. Skipped with the
reason when not root or ``ip netns`` is not usable; the namespaces are always deleted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from livemig.testing.procs import ProcHarness, free_tcp_port

from .test_e2e_precopy import check_completed_source, check_guest_continues

ADDR_A, ADDR_B, PREFIX = "169.254.77.1", "169.254.77.2", 30


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)


def _must(*args: str) -> None:
    r = _ip(*args)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@pytest.fixture
def netns_pair() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("iproute2 (ip, tc) is not installed")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"lmA{tag}", f"lmB{tag}"
    veth_a, veth_b = f"lmva{tag}", f"lmvb{tag}"
    try:
        r = _ip("netns", "add", ns_a)
        if r.returncode:
            pytest.skip(f"ip netns add failed: {r.stderr.strip()}")
        _must("netns", "add", ns_b)
        _must("link", "add", veth_a, "netns", ns_a, "type", "veth", "peer", "name", veth_b,
              "netns", ns_b)  # fmt: skip
        for ns, dev, addr in ((ns_a, veth_a, ADDR_A), (ns_b, veth_b, ADDR_B)):
            _must("-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", dev)
            _must("-n", ns, "link", "set", dev, "up")
            _must("-n", ns, "link", "set", "lo", "up")
        tc = subprocess.run(
            ["ip", "netns", "exec", ns_a, "tc", "qdisc", "add", "dev", veth_a, "root", "tbf",
             "rate", "200mbit", "burst", "64kb", "latency", "50ms"],
            capture_output=True, text=True, timeout=15,
        )  # fmt: skip
        if tc.returncode:
            pytest.skip(f"tc tbf is not available: {tc.stderr.strip()}")
        ping = subprocess.run(["ip", "netns", "exec", ns_a, "ping", "-c", "1", "-W", "2", ADDR_B],
                              capture_output=True, timeout=15)  # fmt: skip
        if shutil.which("ping") and ping.returncode:
            raise RuntimeError(f"{ADDR_A} cannot reach {ADDR_B} over the veth pair")
        yield ns_a, ns_b
    except RuntimeError as exc:
        pytest.skip(f"could not build the test network: {exc}")
    finally:
        for ns in (ns_a, ns_b):
            _ip("netns", "del", ns)  # deleting a namespace deletes its veth end too


@pytest.mark.timeout(120)
def test_precopy_over_veth_with_tbf(harness: ProcHarness, netns_pair: tuple[str, str]) -> None:
    ns_a, ns_b = netns_pair
    port = free_tcp_port()  # any port: B's namespace has nothing else listening
    uri = f"tcp:{ADDR_B}:{port}"
    # 4 MiB rewritten at 5000 pages/s: fits in 300 ms of a 25 MB/s link, so it converges
    src = harness.source(append="ws=4M rate=5000", netns=ns_a)
    dst = harness.destination(incoming=f"tcp:{ADDR_B}:{port}", netns=ns_b)
    src.wait_passes_increase(0, timeout=20)
    # max-bandwidth above the shaped link: the link, not the limiter, sets the pace
    harness.migrate(src, uri, caps={"events": True, "return-path": True, "x-verify": True},
                    params={"max-bandwidth": 64 << 20})  # fmt: skip
    info = src.wait_migration(timeout=60)
    check_completed_source(src, info)
    # 200 Mbit/s is 25 MB/s: the measured throughput cannot beat the shaper by much
    assert 0 < info["ram"]["mbps"] < 260, info["ram"]
    at_source = src.guest_check()
    assert at_source["ok"], at_source["problems"]
    assert dst.query_migrate()["x-verify"] == {"equal": True, "state-equal": True}
    check_guest_continues(dst, at_source)
