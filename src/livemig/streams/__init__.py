"""Recorded migration streams: capture a live migration into a stream, replay a stream into a
destination as its source would, analyze a stream (decode it, rebuild its RAM, check it).

``capture`` (with ``capture_multifd``), ``replay`` (with ``replay_postcopy``) and ``analyze``
build their pipelines from the layers below: ``transport`` channels, ``wire``'s codec,
``savevm``'s RAM loader and ``migration``'s multifd sender and receiver. ``livemig capture``,
``replay`` and ``analyze`` are their command lines.
"""
