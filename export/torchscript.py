"""Export an :class:`~export.models.ActivationModel` to TorchScript with ``torch.jit.trace``.

Tracing records the operations run on one example batch. The example has 2 images so that a batch size
baked into the graph by mistake shows up when verification runs batches of 1 and 3. Likewise a model whose
forward turns the input's height or width into a Python number bakes the example's size into the trace;
for ``export --dynamic-size`` verification also runs a second, non-square size, which shows it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from export.models import ActivationModel

logger = logging.getLogger(__name__)

# torch deprecates TorchScript as a whole; these notices are expected here and say nothing about the model.
_EXPECTED_WARNINGS = ("is deprecated. Please switch to", "is deprecated. Please use")


class TorchScriptExportError(RuntimeError):
    """The model could not be traced."""


def export_torchscript(
    model: ActivationModel,
    path: str | Path,
    input_size: tuple[int, int],
    *,
    freeze: bool = True,
    log: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Trace ``model`` on a batch of 2 and save it with ``torch.jit.save``.

    Args:
        model: the wrapped model; put in eval mode.
        path: the ``.pt`` file to write.
        input_size: ``(H, W)`` of the example input.
        freeze: also apply ``torch.jit.freeze`` (inlines parameters and folds batch norms into convolutions,
            which changes results by rounding only). The caller verifies the file and re-exports with
            ``freeze=False`` if the frozen graph does not verify.
        log: receives tracer warnings (other than torch's TorchScript deprecation notices).

    Returns:
        Provenance for the manifest: ``exporter`` (``torch.jit.trace``) and ``frozen``.

    Raises:
        TorchScriptExportError: when tracing, freezing or saving fails.
    """
    model.eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, *input_size, generator=generator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                # check_trace re-runs the model twice; the export is verified on other batch sizes anyway.
                traced = torch.jit.trace(model, example, check_trace=False)
                module = torch.jit.freeze(traced) if freeze else traced
            torch.jit.save(module, str(path))
        except Exception as exc:
            raise TorchScriptExportError(f"tracing {type(model.model).__name__} failed: {exc}") from exc
    messages = dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught)
    for message in messages:
        if not any(expected in message for expected in _EXPECTED_WARNINGS):
            log(f"tracer warning: {message}")
    return {"exporter": "torch.jit.trace", "frozen": freeze}
