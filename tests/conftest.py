"""Suite-wide set-up: metrics go to a private folder and no exporter binds a port unless a test asks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from handlers import metrics


@pytest.fixture(scope="session", autouse=True)
def metrics_folder(tmp_path_factory: pytest.TempPathFactory) -> metrics.Configuration:
    """Configure the metrics as a worker does at start, once for the whole run: a private folder, no exporter.

    Handlers initialised by the tests call ``metrics.configure()`` again, which keeps this configuration.
    """
    return metrics.configure(tmp_path_factory.mktemp("metrics"), address="off")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests: on a shared 2-core machine two threads per process
    oversubscribe the cores and make LRP and the explainers ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
