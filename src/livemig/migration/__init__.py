"""Migration: the state machine, the source thread, the destination, options, statistics,
post-copy, multifd and the QMP commands that drive them."""
