"""The ``lafam-serve`` command: export, archive, eval, explain, demo (:func:`cli.main.main`).

The top layer: it may import every package of the project except ``benchmarks`` and ``tests``.
"""
