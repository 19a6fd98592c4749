"""livemig: live migration of running virtual machines, built the way QEMU builds it.

Layers, bottom up (see docs and ARCHITECTURE.md): ``machine`` (RAM blocks, vCPUs, devices),
``memtrack`` (dirty pages), ``wire`` (sans-IO stream codec), ``savevm`` (section handlers),
``transport`` (URIs to byte channels), ``migration`` (the state machine and data plane),
``qmp`` (control protocol), ``cli`` and ``report``.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
