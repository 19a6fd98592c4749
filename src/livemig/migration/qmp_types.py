"""The QAPI types of livemig's migration commands and events, as QEMU 10.0 declares them
(qapi/migration.json), for query-qmp-schema: what the replies hold, member by member. Members
livemig does not fill (``vfio``, ``blocked-reasons``, ...) are left out; livemig's own are
``x-`` and typed ``any``.
"""

from __future__ import annotations

from livemig.migration.options import CAPABILITIES, PARAMETERS
from livemig.migration.state import MigrationStatus
from livemig.qmp import Arg

STATUS = Arg(str, choices=tuple(s.value for s in MigrationStatus), qtype="MigrationStatus")
CAPABILITY = Arg(str, choices=CAPABILITIES, qtype="MigrationCapability")


def _opt(arg: Arg) -> Arg:
    return Arg(arg.type, optional=True, choices=arg.choices, items=arg.items,
               members=arg.members, nullable=arg.nullable, qtype=arg.qtype)  # fmt: skip


_INT = Arg(int)
_OINT = Arg(int, optional=True)
_ONUM = Arg(float, optional=True)
_ANY = Arg(object, optional=True)

MIGRATION_STATS = Arg(dict, members={
    "transferred": _INT, "remaining": _INT, "total": _INT, "duplicate": _INT, "normal": _INT,
    "normal-bytes": _INT, "dirty-pages-rate": _INT, "mbps": Arg(float),
    "dirty-sync-count": _INT, "postcopy-requests": _INT, "page-size": _INT,
    "multifd-bytes": _INT, "pages-per-second": _INT, "precopy-bytes": _INT,
    "downtime-bytes": _INT, "postcopy-bytes": _INT, "dirty-sync-missed-zero-copy": _INT,
    "x-hot-pages": _ANY,
})  # fmt: skip

XBZRLE_STATS = Arg(dict, members={
    "cache-size": _INT, "bytes": _INT, "pages": _INT, "cache-miss": _INT,
    "cache-miss-rate": Arg(float), "encoding-rate": Arg(float), "overflow": _INT,
})  # fmt: skip

SOCKET_ADDRESS = Arg(object)  # QEMU's SocketAddress union (inet, unix, fd)

MIGRATION_INFO = Arg(dict, members={
    "status": _opt(STATUS),
    "ram": _opt(MIGRATION_STATS),
    "xbzrle-cache": _opt(XBZRLE_STATS),
    "total-time": _OINT, "expected-downtime": _OINT, "downtime": _OINT, "setup-time": _OINT,
    "cpu-throttle-percentage": _OINT,
    "error-desc": Arg(str, optional=True),
    "postcopy-blocktime": _OINT,
    "postcopy-vcpu-blocktime": Arg(list, optional=True, items=Arg(int)),
    "socket-address": Arg(list, optional=True, items=SOCKET_ADDRESS),
    "x-dirty-tracker": _ANY, "x-verified": _ANY, "x-verify": _ANY, "x-postcopy": _ANY,
    "x-multifd": _ANY,
})  # fmt: skip

CAPABILITY_STATUS = Arg(dict, members={"capability": CAPABILITY, "state": Arg(bool)})


def _param(p: object) -> Arg:
    qtype = p.qtype  # type: ignore[attr-defined]
    choices = p.choices  # type: ignore[attr-defined]
    if choices is not None:
        return Arg(str, optional=True, choices=choices, qtype=qtype)
    if qtype == "bool":
        return Arg(bool, optional=True)
    if qtype == "StrOrNull":
        return Arg(str, optional=True)  # MigrationParameters reports strings
    return Arg(int, optional=True, qtype=qtype)


MIGRATION_PARAMETERS = Arg(dict, members={p.name: _param(p) for p in PARAMETERS})

THREAD_INFO = Arg(dict, members={"name": Arg(str), "thread-id": Arg(int)})

DIRTY_RATE_INFO = Arg(dict, members={
    "dirty-rate": _OINT,
    "status": Arg(str, choices=("unstarted", "measuring", "measured"), qtype="DirtyRateStatus"),
    "start-time": _INT, "calc-time": _INT,
    "calc-time-unit": Arg(str, choices=("second", "millisecond"), qtype="TimeUnit"),
    "sample-pages": _INT,
    "mode": Arg(str, choices=("page-sampling", "dirty-ring", "dirty-bitmap"),
                qtype="DirtyRateMeasureMode"),
})  # fmt: skip

COLO_MODE = Arg(str, choices=("none", "primary", "secondary"), qtype="COLOMode")
COLO_EXIT_REASON = Arg(str, choices=("none", "request", "error", "processing"),
                       qtype="COLOExitReason")  # fmt: skip
COLO_STATUS = Arg(dict, members={
    "mode": COLO_MODE, "last-mode": COLO_MODE, "reason": COLO_EXIT_REASON,
    "x-replicated": _ANY, "x-standby": _ANY, "x-sending": _ANY, "x-error": _ANY,
    "x-checkpoints": _ANY, "x-acknowledged": _ANY, "x-bytes": _ANY, "x-pages": _ANY,
    "x-late": _ANY, "x-pause-ms": _ANY, "x-bytes-per-checkpoint": _ANY, "x-ack-ms": _ANY,
    "x-checkpoints-applied": _ANY, "x-took-over": _ANY, "x-partial-discarded": _ANY,
    "x-apply-ms": _ANY, "x-how": _ANY,
})  # fmt: skip

EVENTS: dict[str, dict[str, Arg]] = {
    "MIGRATION": {"status": STATUS},
    "MIGRATION_PASS": {"pass": Arg(int)},
    "COLO_EXIT": {"mode": COLO_MODE, "reason": COLO_EXIT_REASON},
}
