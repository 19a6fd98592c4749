"""Replication across a real link: the primary and the front in network namespace A, the
standby in B, a veth pair between them (link-local addresses on links the test creates).

* The link is cut (``ip link set down``): both sides hear nothing. The standby takes over
  after its heartbeat time-out, with nobody to serve; the primary goes on unreplicated and
  tells the front first, so the front stays with it: clients see no error and lose nothing.
  Then the primary dies too: the front has no standby to go to and tells its clients so.
* The link becomes slow (``tc tbf``) under a guest that dirties memory faster than it carries:
  checkpoints are late and reported, the guest's pauses stay short (a capture, whatever the
  link), and after x-colo-checkpoint-timeout the primary gives up replicating, saying why.

The test process itself enters A (its main thread, restored at the end), so that its clients
and the processes it starts there share A's loopback. Skipped when not root or without
``ip``/``tc``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from livemig.testing.procs import ProcHarness, free_tcp_port, wait_until
from livemig.testing.replication import Writers, answers, audit, replicate

ADDR_A, ADDR_B, PREFIX = "169.254.79.1", "169.254.79.2", 30
CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)


def _must(*args: str) -> None:
    r = _ip(*args)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


@pytest.fixture
def in_ns_a() -> Iterator[tuple[str, str, str]]:
    """(namespace B, A's veth, the name of A): this thread runs in A meanwhile."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("iproute2 (ip, tc) is not installed")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b, veth_a, veth_b = f"lmcA{tag}", f"lmcB{tag}", f"lmca{tag}", f"lmcb{tag}"
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    entered = False
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
        fd = os.open(f"/var/run/netns/{ns_a}", os.O_RDONLY)
        try:
            _setns(fd)
            entered = True
        finally:
            os.close(fd)
        yield ns_b, veth_a, ns_a
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"could not build the test network: {exc}")
    finally:
        if entered:
            _setns(home)
        os.close(home)
        for ns in (ns_a, ns_b):
            _ip("netns", "del", ns)


def _start(h: ProcHarness, ns_b: str, guest: str = "kvserver", append: str = "",
           params: dict | None = None) -> tuple:  # fmt: skip
    p1, p2, pf = free_tcp_port(), free_tcp_port(), free_tcp_port()
    primary = h.source(guest=guest, append=append,
                       extra=["--serve", f"tcp:127.0.0.1:{p1}"])  # fmt: skip
    uri = f"tcp:{ADDR_B}:{p2 + 1 if p2 < 65000 else p2 - 1}"
    standby = h.destination(incoming=uri, netns=ns_b, extra=["--serve", f"tcp:{ADDR_B}:{p2}"])
    wait_until(lambda: standby.status() == "inmigrate", 30, "standby listening")
    front = None
    if guest == "kvserver":
        front = h.front(f"tcp:127.0.0.1:{p1}", f"tcp:127.0.0.1:{pf}",
                        extra=["--failover-timeout", "3"])  # fmt: skip
        wait_until(lambda: answers(pf), 30, "front answering")
    replicate(primary, uri, 25, params)
    return primary, standby, front, pf


@pytest.mark.timeout(120)
def test_cut_link_primary_goes_on_and_the_front_stays(in_ns_a: tuple[str, str, str]) -> None:
    ns_b, veth_a, _ns_a = in_ns_a
    with ProcHarness(memory="64M", smp=1) as h:
        primary, standby, front, pf = _start(h, ns_b, params={"x-colo-heartbeat-timeout": 500})
        assert front is not None
        wait_until(lambda: front.cmd("x-query-front")["successor"], 10, "the standby announced")
        w = Writers(pf).start()
        wait_until(lambda: w.count() > 50, 30, "clients writing")
        _must("link", "set", veth_a, "down")  # this thread is in A: A's end of the link
        wait_until(lambda: primary.cmd("query-colo-status")["mode"] == "none", 15,
                   "the primary to give up its standby")  # fmt: skip
        colo = primary.cmd("query-colo-status")
        # Which of the primary's two watches sees the cut first is a race: the heartbeat's
        # silence, or a checkpoint whose write makes no progress (the same time-out). Either
        # way the standby is lost through the link, never through an error of its own.
        assert colo["reason"] == "error", colo
        assert "heartbeat" in colo["x-error"] or "no progress writing" in colo["x-error"], colo
        wait_until(lambda: standby.status() == "running", 15, "the standby to take over")
        assert "no heartbeat" in standby.cmd("query-colo-status")["x-how"]
        before = w.count()
        wait_until(lambda: w.count() > before + 200, 30, "clients writing, unreplicated")
        info = front.cmd("x-query-front")
        assert info["failovers"] == 0 and info["successor"] is None, info
        w.stop()
        result = audit(pf, w)
        assert result["errors"] == [] and (result["lost"], result["wrong"]) == (0, 0), result
        assert result["counter-exact"], result
        # the primary dies now: there is no standby that holds what the clients were told
        primary.kill()
        time.sleep(0.5)
        wait_until(lambda: front.cmd("x-query-front")["gone"], 15, "the front to give up")
        assert not answers(pf)
        assert front.cmd("x-query-front")["failovers"] == 0


@pytest.mark.timeout(150)
def test_a_link_that_cannot_keep_up(in_ns_a: tuple[str, str, str]) -> None:
    ns_b, veth_a, _ns_a = in_ns_a
    with ProcHarness(memory="64M", smp=2) as h:
        primary, standby, _front, _pf = _start(
            h, ns_b, guest="memstress", append="ws=16M rate=5000",
            params={"x-colo-checkpoint-timeout": 3000, "x-colo-heartbeat-timeout": 2000},
        )  # fmt: skip
        time.sleep(1)
        fast = primary.cmd("query-colo-status")
        assert fast["x-late"] <= fast["x-checkpoints"] // 4, fast
        # 20 MB/s of writes over an 8 Mbit/s link: each checkpoint takes longer than the last
        subprocess.run(["tc", "qdisc", "add", "dev", veth_a, "root", "tbf", "rate", "8mbit",
                        "burst", "32kb", "latency", "400ms"], check=True, timeout=15)  # fmt: skip
        wait_until(lambda: primary.cmd("query-colo-status")["mode"] == "none", 60,
                   "the primary to give up")  # fmt: skip
        colo = primary.cmd("query-colo-status")
        assert "cannot keep up" in colo["x-error"], colo
        assert colo["x-late"] >= 1, colo
        # the guest paused for captures only: never for the time a checkpoint took to travel
        assert colo["x-pause-ms"]["max"] < 1000, colo
        assert primary.status() == "running"
        report = primary.guest_check()
        assert report["ok"], report
        # the standby heard X_EXIT (or the abandoned checkpoint) and stood down, or, if its
        # end of the stream stopped short, took over with nobody to serve: either way it acts
        wait_until(lambda: not standby.alive() or standby.status() == "running", 15,
                   "the standby to stand down or take over")  # fmt: skip
