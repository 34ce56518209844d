"""Benchmarks: our extract job vs a plain single-process script (``run``, ``baseline``)."""
