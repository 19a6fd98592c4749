"""Management over QMP: what a tool such as libvirt does on top of the monitor protocol.

``migrate`` moves the guest of a running source (a ``livemig run`` process or a QEMU, reached
by its QMP address) to a URI with typed options (``MigrateOptions``): it sets every migration
capability and parameter the source manages for this run (``settings``: nothing is inherited
from an earlier run), optionally prepares a destination waiting with ``--incoming defer``
(``setup_destination``), follows the migration to its end with progress callbacks, cancels it
on a time-out or when asked, reads back a ``file:`` it wrote when asked to verify, and returns
a ``MigrateResult`` (or raises ``MigrationFailed`` carrying it). ``plan_for`` samples a running
guest's dirty rate and predicts its migration (``livemig.migration.planner``'s model).
``Demo`` runs ``livemig demo``'s steps: two local processes, a guest migrated live between
them, checked and reported.

The layer is a client: it only speaks QMP (``livemig.qmp.client``) to processes that hold the
guests, and reads what they wrote (``livemig.streams``). It never touches a machine itself; the
process that does is ``livemig.system``. ``livemig migrate``, ``plan`` and ``demo``
(``livemig.cli``) parse arguments and print what these return.
"""

from livemig.control.demo import Demo, DemoOptions, DemoResult
from livemig.control.migrate import (
    Cancelled,
    MigrateOptions,
    MigrateResult,
    MigrationFailed,
    destination_result,
    migrate,
    setup_destination,
)
from livemig.control.plan import plan_for
from livemig.control.settings import apply_settings, peer_defaults

__all__ = [
    "Cancelled",
    "Demo",
    "DemoOptions",
    "DemoResult",
    "MigrateOptions",
    "MigrateResult",
    "MigrationFailed",
    "apply_settings",
    "destination_result",
    "migrate",
    "peer_defaults",
    "plan_for",
    "setup_destination",
]
