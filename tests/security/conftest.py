"""Fixtures for the security tests: x509 credential directories made once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from livemig.transport.tls import generate_creds


@pytest.fixture(scope="session")
def creds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``good``: CA + server/client certs; ``rogue``: same layout, signed by another CA;
    ``good2``: a second pair signed by the good CA (a legitimate other host)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not installed (apt package openssl)")
    base = tmp_path_factory.mktemp("tls")
    good = generate_creds(base / "good")
    rogue = generate_creds(base / "rogue")
    good2 = generate_creds(base / "good2", ca_dir=good)
    wrongname = generate_creds(base / "wrongname", ca_dir=good, names=("elsewhere.example",))
    return {"good": good, "rogue": rogue, "good2": good2, "wrongname": wrongname}
