"""Section handlers: the ``ram`` section and the vmstate (cpu, device) sections."""
