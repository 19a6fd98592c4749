"""The emulator process: a machine with its guest, its QMP monitor, its migration manager and
its service front, assembled as one ``livemig run`` (QEMU's ``system/``: what
``qemu-system-x86_64`` builds from its command line in ``vl.c``).

``System(SystemOptions(...)).start()`` brings one up inside the calling process; ``wait``
returns the exit status ``livemig run`` exits with. The layer sits above ``machine``,
``migration``, ``qmp`` and ``service``, which it only connects; ``livemig run``
(``livemig.cli.run``) parses the flags into ``SystemOptions``, turns Ctrl-C into
``shutdown``, and prints what ``on_message`` says. Driving such processes from outside, over
QMP, is ``livemig.control``.
"""

from livemig.system.emulator import System, SystemOptions, check_options, require_checksums

__all__ = ["System", "SystemOptions", "check_options", "require_checksums"]
