"""Runtimes behind one small contract: a batch tensor in, a dict of named output tensors out.

The same classes serve requests in the TorchServe worker and verify graphs at export time, so a graph
that passed verification is run by exactly the code that serves it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from .fused import MAX_FUSED_BYTES, channel_mean, fuse_onnx, fused_output
from .manifest import Manifest

logger = logging.getLogger(__name__)

INPUT_NAME = "input"


class Backend(Protocol):
    """A loaded graph that maps an input batch to its named outputs."""

    name: str
    device: torch.device
    maps: dict[str, str]
    """``{activation output: its fused output}`` (the channel mean) for the activations whose LaFAM reduction the
    runtime computes (:mod:`handlers.fused`); ``run`` returns those outputs too. Empty: none (the handler does)."""

    def run(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run one batch ``(N, 3, H, W)`` float32 and return every graph output by name."""
        ...


def session_options(threads: int = 0) -> object:
    """ONNX Runtime's session options for serving.

    Every graph optimisation, ``threads`` intra-op threads (0: its default), no spinning.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    # Idle intra-op threads would otherwise busy-wait after each run and steal the cores that decode,
    # explain and encode the batch in this same process.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxBackend:
    """ONNX Runtime session; CUDA execution provider on ``cuda:<id>`` when asked and available.

    Outputs come back as CPU tensors sharing memory with ONNX Runtime's numpy arrays (no copy). ``maps``: the
    activation outputs (and their channels) whose channel mean is added to the graph in memory
    (:func:`handlers.fused.fuse_onnx`); the graph file itself is not changed.
    """

    name = "onnx"

    def __init__(
        self,
        model_path: str | Path,
        output_names: list[str],
        device: torch.device,
        threads: int = 0,
        maps: Mapping[str, int] | None = None,
    ) -> None:
        import onnxruntime as ort

        options = session_options(threads)
        providers: list[str | tuple[str, dict[str, int]]] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            else:
                logger.warning(
                    "a GPU was assigned but onnxruntime has no CUDA provider: running on CPU "
                    "(install the 'gpu' extra, onnxruntime-gpu)"
                )
        self.maps: dict[str, str] = {}
        graph: str | bytes = str(model_path)
        if maps and Path(model_path).stat().st_size <= MAX_FUSED_BYTES:
            import onnx

            model = onnx.load(str(model_path))
            self.maps = fuse_onnx(model, maps)
            graph = model.SerializeToString()
        self._session = ort.InferenceSession(graph, sess_options=options, providers=providers)
        self._outputs = [*output_names, *self.maps.values()]
        on_gpu = self._session.get_providers()[0] == "CUDAExecutionProvider"
        self.device = device if on_gpu else torch.device("cpu")

    def run(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the session on a CPU copy of ``batch``; outputs are CPU tensors."""
        array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        results = self._session.run(self._outputs, {INPUT_NAME: array})
        return {name: torch.from_numpy(value) for name, value in zip(self._outputs, results, strict=True)}


class TorchScriptBackend:
    """A TorchScript module on the given device, run under ``torch.inference_mode``.

    ``maps``: the activation outputs (and their channels) whose channel mean (:func:`handlers.fused.channel_mean`)
    is computed right after the module, inside the same inference-mode call.
    """

    name = "torchscript"

    def __init__(
        self,
        model_path: str | Path,
        output_names: list[str],
        device: torch.device,
        maps: Mapping[str, int] | None = None,
    ) -> None:
        self.device = device
        self.maps = {source: fused_output(source) for source in maps or {}}
        with warnings.catch_warnings():  # TorchScript is deprecated upstream; users still ship it
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
            self._module = torch.jit.load(str(model_path), map_location=device).eval()
        self._outputs = list(output_names)

    def run(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the module on ``batch`` moved to the backend's device; outputs stay on that device."""
        with torch.inference_mode():
            results = self._module(batch.to(self.device, torch.float32, non_blocking=True))
            if isinstance(results, torch.Tensor):
                results = (results,)
            outputs = dict(zip(self._outputs, results, strict=True))
            for source, name in self.maps.items():
                outputs[name] = channel_mean(outputs[source])
        return outputs


def output_names(manifest: Manifest) -> list[str]:
    """Return the graph outputs in order: the main output, then one per exported layer."""
    return [manifest.main_output, *(spec.output for spec in manifest.layers)]


def load_backend(
    manifest: Manifest,
    folder: str | Path,
    device: torch.device | str = "cpu",
    threads: int = 0,
    fuse_maps: bool = False,
) -> Backend:
    """Load the graph a manifest describes.

    Args:
        manifest: the validated manifest.
        folder: the folder holding the manifest and the graph file.
        device: ``cpu`` or ``cuda:<id>`` (the GPU TorchServe assigned to this worker).
        threads: ONNX Runtime's intra-op threads (0: its default, one per physical core); TorchScript runs
            on torch's threads, set process-wide by the caller.
        fuse_maps: let the runtime compute each layer's LaFAM map in the same pass (:mod:`handlers.fused`).

    Returns:
        A backend whose ``run`` returns every output named in :func:`output_names`, and the fused maps named in
        its ``maps``.
    """
    device = torch.device(device)
    path = Path(folder) / manifest.model_file
    names = output_names(manifest)
    maps = {spec.output: spec.shape[0] for spec in manifest.layers} if fuse_maps else {}
    if manifest.backend == "onnx":
        return OnnxBackend(path, names, device, threads, maps)
    return TorchScriptBackend(path, names, device, maps)
