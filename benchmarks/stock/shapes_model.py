"""The demo's ShapesCNN as TorchServe's stock eager loader wants it (one class, built with no arguments).

Imports ``demo`` from the installed lafam-serve package, so this archive is for benchmarks only.
"""

from demo.model import ShapesCNN as _ShapesCNN


class ShapesCNN(_ShapesCNN):
    """The demo CNN with its default number of classes."""
