"""Export an :class:`~export.models.ActivationModel` to one self-contained ONNX file.

The graph has one input, ``input`` ``(N, 3, H, W)`` with a dynamic batch dimension ``N`` (and, with
``dynamic_size``, dynamic ``H`` and ``W``), and the outputs named by the caller in the model's order (main
output, then one activation per layer, whose height and width then follow the input's). The
``torch.export``-based exporter (``dynamo=True``) is tried first; if it fails for a model, the legacy
TorchScript-based exporter (``dynamo=False``) is used and the result records which one wrote the file.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
from onnx.external_data_helper import uses_external_data

from export.models import ActivationModel
from handlers.backends import INPUT_NAME

logger = logging.getLogger(__name__)

Exporter = Literal["auto", "dynamo", "legacy"]
EXPORTERS: tuple[str, ...] = ("auto", "dynamo", "legacy")
BATCH_DIM = "batch"
HEIGHT_DIM = "height"
WIDTH_DIM = "width"


class OnnxExportError(RuntimeError):
    """The model could not be exported to ONNX, or the written file is not the graph that was asked for."""


def export_onnx(
    model: ActivationModel,
    path: str | Path,
    input_size: tuple[int, int],
    output_names: Sequence[str],
    opset: int | None = None,
    *,
    exporter: Exporter = "auto",
    dynamic_size: bool = False,
    min_side: int = 1,
    log: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Write ``model`` as an ONNX graph with a dynamic batch dimension and check the file.

    Args:
        model: the wrapped model; put in eval mode.
        path: the ``.onnx`` file to write (weights are stored inside it, never in an external data file).
        input_size: ``(H, W)`` of the graph input.
        output_names: one name per model output, in order (main output first).
        opset: ONNX opset; ``None`` uses the exporter's default.
        exporter: ``auto`` (``dynamo``, falling back to ``legacy`` when it fails), ``dynamo`` or ``legacy``.
        dynamic_size: also make the input's height and width (dims 2 and 3) dynamic, from ``min_side`` up;
            the caller verifies the graph at a second size (a graph may still compute with the example's size).
        min_side: the smallest height and width declared to the ``dynamo`` exporter.
        log: receives progress lines and exporter warnings.

    Returns:
        Provenance for the manifest: ``exporter`` (``dynamo`` or ``legacy``), ``opset`` (read back from the
        file) and, after a fallback, ``fallback_reason``.

    Raises:
        OnnxExportError: when no exporter succeeds or the file does not have the requested interface.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter={exporter!r} is not supported; use one of: {', '.join(EXPORTERS)}")
    if len(output_names) != 1 + len(model.layers):
        raise ValueError(
            f"output_names has {len(output_names)} names but the model has {1 + len(model.layers)} outputs "
            f"(main output + {len(model.layers)} layers)"
        )
    path = Path(path)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    # A batch of 2: torch.export specialises a dimension whose example size is 1.
    example = torch.randn(2, 3, *input_size, generator=generator)
    info: dict[str, Any] = {}
    used = "legacy"
    sized = " with a dynamic height and width (--dynamic-size)" if dynamic_size else ""
    if exporter in ("auto", "dynamo"):
        try:
            _run_logged(
                lambda: _export_dynamo(
                    model, example, path, output_names, opset, dynamic_size=dynamic_size, min_side=min_side
                ),
                log,
            )
            used = "dynamo"
        except Exception as exc:
            if exporter == "dynamo":
                raise OnnxExportError(f"the dynamo ONNX exporter failed{sized}: {exc}") from exc
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            log(f"dynamo ONNX exporter failed ({reason}); falling back to the legacy exporter (dynamo=False)")
            info["fallback_reason"] = reason
    if used == "legacy":
        try:
            _run_logged(
                lambda: _export_legacy(model, example, path, output_names, opset, dynamic_size=dynamic_size), log
            )
        except Exception as exc:
            raise OnnxExportError(f"the legacy ONNX exporter failed{sized}: {exc}") from exc
    info["exporter"] = used
    info["opset"] = _check_graph(path, output_names, dynamic_size)
    return info


def _export_dynamo(
    model: ActivationModel,
    example: torch.Tensor,
    path: Path,
    output_names: Sequence[str],
    opset: int | None,
    *,
    dynamic_size: bool = False,
    min_side: int = 1,
) -> None:
    dims: dict[int, Any] = {0: torch.export.Dim(BATCH_DIM, min=1)}
    if dynamic_size:
        dims[2] = torch.export.Dim(HEIGHT_DIM, min=min_side)
        dims[3] = torch.export.Dim(WIDTH_DIM, min=min_side)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=list(output_names),
        dynamic_shapes=(dims,),
        opset_version=opset,
        external_data=False,
        verbose=False,
    )


def _export_legacy(
    model: ActivationModel,
    example: torch.Tensor,
    path: Path,
    output_names: Sequence[str],
    opset: int | None,
    *,
    dynamic_size: bool = False,
) -> None:
    dynamic_axes: dict[str, dict[int, str]] = {name: {0: BATCH_DIM} for name in (INPUT_NAME, *output_names)}
    if dynamic_size:  # the input's height and width, and every activation's (the main output is (N, K))
        dynamic_axes[INPUT_NAME].update({2: HEIGHT_DIM, 3: WIDTH_DIM})
        for name in output_names[1:]:
            dynamic_axes[name].update({2: f"{name}_{HEIGHT_DIM}", 3: f"{name}_{WIDTH_DIM}"})
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )


def _run_logged(action: Callable[[], None], log: Callable[[str], None]) -> None:
    """Run ``action`` and pass each distinct warning it raised to ``log`` instead of stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    for message in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught):
        log(f"exporter warning: {message}")


def _check_graph(path: Path, output_names: Sequence[str], dynamic_size: bool = False) -> int:
    """Check the written file (and, with ``dynamic_size``, its dynamic height and width); return its opset."""
    graph_model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in graph_model.graph.initializer if uses_external_data(t)]
    if external:
        raise OnnxExportError(f"{path} keeps {len(external)} tensors in external data files; it must be one file")
    onnx.checker.check_model(graph_model, full_check=True)
    inputs = [i.name for i in graph_model.graph.input]
    outputs = [o.name for o in graph_model.graph.output]
    if inputs != [INPUT_NAME]:
        raise OnnxExportError(f"{path} has inputs {inputs}, expected [{INPUT_NAME!r}]")
    if outputs != list(output_names):
        raise OnnxExportError(f"{path} has outputs {outputs}, expected {list(output_names)}")
    dims = graph_model.graph.input[0].type.tensor_type.shape.dim
    if not dims[0].dim_param:
        raise OnnxExportError(f"{path} has a fixed batch size {dims[0].dim_value}; the batch must be dynamic")
    fixed = [f"{side} {dims[i].dim_value}" for i, side in ((2, "height"), (3, "width")) if not dims[i].dim_param]
    if dynamic_size and fixed:
        raise OnnxExportError(
            f"{path} has a fixed input {' and '.join(fixed)} although --dynamic-size asked for dynamic ones: the "
            f"model's forward fixes its input size; export without --dynamic-size"
        )
    return next(o.version for o in graph_model.opset_import if o.domain in ("", "ai.onnx"))
