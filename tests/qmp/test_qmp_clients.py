"""Real QMP clients against a real ``livemig run``: ``qmp-shell`` (from the qemu.qmp package),
and a client that discovers what it may send from ``query-qmp-schema``, as libvirt does
(``virQEMUQAPISchemaPathExists``: "migrate-set-parameters/arg-type/downtime-limit" ...)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_qmp_conformance import Livemig, Raw, _x

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def livemig(tmp_path: Path) -> Iterator[Livemig]:
    side = Livemig(tmp_path, incoming=False)
    yield side
    side.stop()


def test_qmp_shell(livemig: Livemig) -> None:
    """qmp-shell's own syntax (``key=value`` arguments, JSON for lists), its banner from the
    greeting, its completion list from query-commands."""
    shell = shutil.which("qmp-shell", path=str(Path(sys.executable).parent))
    assert shell is not None, "qemu.qmp installs qmp-shell beside the interpreter"
    script = "\n".join([
        "query-status",
        "migrate-set-parameters downtime-limit=100 max-bandwidth=1000000",
        "query-migrate-parameters",
        'migrate-set-capabilities capabilities=[{"capability":"events","state":true}]',
        "query-name",
        "migrate-set-parameters multifd-channels=300",
        "nope",
    ]) + "\n"  # fmt: skip
    out = subprocess.run([shell, str(livemig.qmp_path)], input=script, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Connected to QEMU 10.0.2" in out.stdout
    replies = [json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines()
               if line.startswith("(QEMU) {")]  # fmt: skip
    assert replies[0] == {"return": {"status": "prelaunch", "running": False}}
    assert replies[1] == {"return": {}}
    assert replies[2]["return"]["downtime-limit"] == 100
    assert replies[3] == {"return": {}} and replies[4] == {"return": {}}
    assert replies[5]["error"]["desc"] == "Parameter 'multifd-channels' expects uint8_t"
    assert replies[6]["error"]["class"] == "CommandNotFound"


def _resolve(schema: dict[str, dict], path: str) -> dict[str, Any] | None:
    """libvirt's schema path lookup: ``command/arg-type/member/...`` to the entry it names."""
    parts = path.split("/")
    entry = schema.get(parts[0])
    for part in parts[1:]:
        if entry is None:
            return None
        if part in ("arg-type", "ret-type", "element-type"):
            entry = schema.get(entry.get(part, ""))
            while entry is not None and entry["meta-type"] == "array":
                entry = schema.get(entry["element-type"])
            continue
        member = next((m for m in entry.get("members", []) if m.get("name") == part), None)
        entry = schema.get(member["type"]) if member else None
        while entry is not None and entry["meta-type"] == "array":
            entry = schema.get(entry["element-type"])
    return entry


def test_a_schema_driven_client(livemig: Livemig) -> None:
    """What the schema promises is what the monitor takes: every parameter the schema lists
    for migrate-set-parameters is set back to the value query-migrate-parameters reports
    (with the JSON type the schema names), every capability of its enum is switched off, and
    the lookups a management layer makes find QEMU's paths."""
    raw = Raw(livemig.qmp_path)
    try:
        schema = {e["name"]: e for e in raw.ask(_x("query-qmp-schema"))["return"]}
        for path in ("migrate-set-parameters/arg-type/avail-switchover-bandwidth",
                     "migrate-set-parameters/arg-type/zero-page-detection",
                     "query-migrate/ret-type/ram/dirty-sync-count",
                     "query-migrate/ret-type/status", "MIGRATION/arg-type/status",
                     "migrate-set-capabilities/arg-type/capabilities/capability"):  # fmt: skip
            assert _resolve(schema, path) is not None, path
        assert "device" in _resolve(schema, "MIGRATION/arg-type/status")["values"]
        assert schema["migrate-recover"].get("allow-oob") is True
        current = raw.ask(_x("query-migrate-parameters"))["return"]
        args = schema[schema["migrate-set-parameters"]["arg-type"]]
        json_types = {"int": int, "bool": bool, "str": str}
        for member in args["members"]:
            name, t = member["name"], schema[member["type"]]
            value = current[name]
            if t["meta-type"] == "builtin":
                assert isinstance(value, json_types[t["name"]]), (name, value)
            elif t["meta-type"] == "enum":
                assert value in t["values"], (name, value)
            reply = raw.ask({"execute": "migrate-set-parameters", "arguments": {name: value}})
            assert reply == {"return": {}}, (name, reply)
        caps = _resolve(schema, "migrate-set-capabilities/arg-type/capabilities/capability")
        assert caps is not None
        states = [{"capability": c, "state": False} for c in caps["values"]]
        assert raw.ask(_x("migrate-set-capabilities", capabilities=states)) == {"return": {}}
        listed = {e["name"] for e in schema.values() if e["meta-type"] == "command"}
        assert listed == {c["name"] for c in raw.ask(_x("query-commands"))["return"]}
    finally:
        raw.close()
