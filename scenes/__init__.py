"""Synthetic scenes with exact object masks (:mod:`scenes.synthetic`) and map overlays (:mod:`scenes.overlay`).

The lowest layer beside ``handlers``: plain numpy and PIL, importing nothing of the project, so the demo's
training, the evaluation, the benchmarks and the ``lafam-serve`` command all draw their scenes from here.
"""
