"""Real QEMUs for the tests in this folder: 7.2 (Debian bookworm's) and 10.0 (today's
reference, from bookworm-backports: ``./dev setup`` installs both; ``livemig.testing.qemu``
finds them). A test that takes the ``qemu`` fixture runs once with each; ``qemu10`` and
``qemu72`` pin one."""

from __future__ import annotations

import pytest

from livemig.testing.qemu import QemuBinary, find_qemu


def _find(series: str) -> QemuBinary:
    found = find_qemu(series)
    if found is None:
        pytest.skip(f"QEMU {series} is not installed (./dev setup installs it)")
    return found


@pytest.fixture(params=["7.2", "10.0"], ids=["qemu7.2", "qemu10.0"])
def qemu(request: pytest.FixtureRequest) -> QemuBinary:
    return _find(request.param)


@pytest.fixture
def qemu10() -> QemuBinary:
    return _find("10.0")


@pytest.fixture
def qemu72() -> QemuBinary:
    return _find("7.2")
