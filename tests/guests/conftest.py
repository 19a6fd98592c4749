"""Guest tests build into a private cache, so they never depend on (or spoil) the user's."""

from __future__ import annotations

from pathlib import Path

import pytest

from livemig.guests import GuestImage, build_guest


@pytest.fixture(scope="session")
def guest_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guest-cache")


@pytest.fixture(autouse=True)
def _private_cache(guest_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_CACHE", str(guest_cache))


@pytest.fixture(scope="session")
def images(guest_cache: Path) -> dict[str, GuestImage]:
    """Every built-in guest, built once per session."""
    return {
        name: build_guest(name, cache=guest_cache / "guests")
        for name in ("memstress", "compute", "idle")
    }
