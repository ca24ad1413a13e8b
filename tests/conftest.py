"""Suite-wide set-up: metrics go to a private folder and no exporter binds a port unless a test asks."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest
import torch

# Must run before handlers.metrics is imported (prometheus-client picks its storage at import).
os.environ.setdefault("LAFAM_METRICS_DIR", tempfile.mkdtemp(prefix="lafam-test-metrics-"))
os.environ.setdefault("LAFAM_METRICS_ADDRESS", "off")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests: on a shared 2-core machine two threads per process
    oversubscribe the cores and make LRP and the explainers ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
