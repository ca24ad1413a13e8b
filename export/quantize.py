"""INT8 export: ONNX Runtime static quantisation of a verified float graph, checked on held-out images.

``lafam-serve export --quantize int8`` writes the float graph as usual (``model.onnx``, verified against eager at
the float tolerance), then quantises it into :data:`INT8_GRAPH_FILE`, the graph the manifest then serves:

- **Format and types.** ONNX Runtime's ``quantize_static`` in the QDQ format (QuantizeLinear /
  DequantizeLinear pairs that its CPU provider fuses into integer kernels, the format it recommends since
  1.11), weights ``QInt8`` per output channel, activations ``QUInt8``, weights in 7 bits (``reduce_range``):
  ONNX Runtime's guide for x86-64 CPUs. u8 x s8 is the operand pair of x86's integer dot products
  (``vpmaddubsw`` on AVX2, ``vpdpbusd`` with VNNI); without VNNI, pairs of products are summed in saturating
  16 bits (255 x 127 x 2 overflows, 255 x 64 x 2 does not), so 7-bit weights keep the integer arithmetic from
  saturating on any x86 CPU: figures checked on an exporting machine with VNNI also hold on a serving one
  without, at the cost of one bit of weight precision. Asymmetric u8 spends all 256 levels on a post-ReLU range.
- **Calibration.** MinMax ranges over the user's images, each decoded, resized and normalised by the serving
  code itself (:func:`handlers.images.open_image`, :func:`handlers.sizing.input_size` at ``resize=model``,
  :func:`handlers.images.to_tensor` with the manifest's mean and std), so the ranges are those of what the
  server feeds the graph. Every :data:`HELD_OUT_EVERY`-th image (in file-name order) is held out of the
  calibration and used only for the agreement check.
- **Outputs stay float32.** QDQ quantises a tensor, not an output: a graph output that gets quantised is the
  output of its DequantizeLinear, float32, holding the values the INT8 graph computes. The activation outputs
  (``act_*``) keep that pair (the next layer reads the same 8-bit tensor, so the map shows what the INT8 model
  computes); the main output's pair is removed (:func:`_unquantize_output`): the last layer writes its float
  result, so nearly equal logits are not rounded onto one 8-bit step. The check asserts every output's dtype.
- **The check** (the float tolerance cannot hold for 8 bits): the INT8 graph is run through the serving backend
  at the verification batch sizes (and at the second size of a ``--dynamic-size`` export) for output names,
  shapes, dtypes and finiteness; then on the held-out images, against the float graph: top-1 agreement (an
  embedding: cosine similarity of the embeddings, median and minimum) and the Spearman rank correlation of the
  LaFAM maps per image over the map's pixels at native resolution, median and minimum, per exported layer.
  Below the thresholds (:data:`MIN_TOP1_AGREEMENT`, :data:`MIN_COSINE`, :data:`MIN_MAP_SPEARMAN`) the export
  fails with :class:`QuantizationError` naming the figure, and no manifest is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from export.onnx import _check_graph
from export.verify import VerificationError
from handlers.backends import Backend, load_backend, output_names
from handlers.errors import ServeError
from handlers.explain.lafam import lafam
from handlers.images import open_image, to_tensor
from handlers.manifest import Manifest, QuantizationSpec, sha256_file
from handlers.sizing import input_size

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES: tuple[str, ...] = ("none", "int8")
"""The values of ``export_model(quantize=...)`` and ``lafam-serve export --quantize``."""
INT8_GRAPH_FILE = "model.int8.onnx"
"""The quantised graph's file, beside the float ``model.onnx`` it was made from."""
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
"""The files of a calibration folder that are read (case-insensitive); others are ignored."""
HELD_OUT_EVERY = 4
"""Image ``i`` (in file-name order) is held out of calibration when ``i % 4 == 3``: a quarter, spread evenly."""
MIN_IMAGES = HELD_OUT_EVERY
"""The fewest calibration images accepted: three to calibrate, one held out."""
MAX_IMAGES = 1024
"""The most images read: a larger folder is sampled evenly (in file-name order) down to this many. MinMax ranges
settle within a few hundred images, and 1024 preprocessed 224x224 images already take 600 MB."""
MIN_TOP1_AGREEMENT = 0.99
"""Least share of held-out images whose INT8 top-1 class is the float graph's (classification). Under 100
held-out images it allows no flip: 8 bits that change a trained model's decision are a broken calibration."""
MIN_COSINE = 0.99
"""Least median cosine similarity of the INT8 and float embeddings on held-out images (an embedding model)."""
MIN_MAP_SPEARMAN = 0.95
"""Least median Spearman correlation of the INT8 and float LaFAM maps on held-out images, per layer: the
ranking of the map's pixels (which regions the map puts first) must survive quantisation."""
WEIGHT_TYPE = "QInt8"
ACTIVATION_TYPE = "QUInt8"
PER_CHANNEL = True
REDUCE_RANGE = True
CALIBRATE_METHOD = "MinMax"
CALIBRATION_BATCH = 8
"""Images per calibration run."""


class QuantizationError(VerificationError):
    """The INT8 graph cannot be made, does not run as served, or misses an agreement threshold."""


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration images preprocessed as served, split into the images that calibrate and those held out.

    Attributes:
        calibrate: ``(n, 3, H, W)`` float32 batch that sets the activation ranges.
        held_out: ``(m, 3, H, W)`` float32 batch the agreement is measured on (never calibrated on).
        source: what the images are, for the manifest.
    """

    calibrate: torch.Tensor
    held_out: torch.Tensor
    source: str


@dataclass(frozen=True)
class Thresholds:
    """The figures an INT8 graph must reach; see the module's constants for the defaults."""

    top1_agreement: float = MIN_TOP1_AGREEMENT
    cosine: float = MIN_COSINE
    map_spearman: float = MIN_MAP_SPEARMAN

    def __post_init__(self) -> None:
        for name, low in (("top1_agreement", 0.0), ("cosine", -1.0), ("map_spearman", -1.0)):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and low <= value <= 1.0):
                raise ValueError(f"INT8 threshold {name}={value!r} must be a number from {low:g} to 1")


def load_calibration(
    images: str | Path | Sequence[bytes], manifest: Manifest, source: str | None = None
) -> CalibrationSet:
    """Decode calibration images as the server decodes a request, and hold every fourth one out.

    Args:
        images: a folder of ``.jpg`` / ``.jpeg`` / ``.png`` files (read in file-name order, at most
            :data:`MAX_IMAGES`, sampled evenly), or encoded images.
        manifest: the export's draft manifest: ``input_size``, ``mean``, ``std``, ``max_pixels``.
        source: what the images are, recorded in the manifest; default: the folder, or ``N encoded images``.

    Raises:
        ValueError: no such folder, fewer than :data:`MIN_IMAGES` images, or an image the server would
            refuse (the message names the file).
    """
    if isinstance(images, str | Path):
        folder = Path(images)
        if not folder.is_dir():
            raise ValueError(f"calibration={str(images)!r} is not a folder; pass a folder of .jpg/.png images")
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        sampled = [files[i * len(files) // MAX_IMAGES] for i in range(MAX_IMAGES)] if len(files) > MAX_IMAGES else files
        named = [(p.name, p.read_bytes()) for p in sampled]
        shown = f"{len(files)} images" if len(files) == len(sampled) else f"{len(sampled)} of its {len(files)} images"
        source = source or f"folder {folder} ({shown})"
    else:
        named = [(f"#{i}", bytes(data)) for i, data in enumerate(images)]
        source = source or f"{len(named)} encoded images"
    if len(named) < MIN_IMAGES:
        raise ValueError(
            f"calibration: {len(named)} images in {source}; INT8 export needs at least {MIN_IMAGES} (every "
            f"{HELD_OUT_EVERY}th is held out to check the INT8 graph; a few hundred like the served ones are best)"
        )
    tensors = []
    for name, data in named:
        try:
            picture = open_image(data, manifest.max_pixels)
        except ServeError as exc:
            raise ValueError(f"calibration image {name}: {exc.message}") from exc
        size = input_size("model", (picture.height, picture.width), manifest)
        tensors.append(to_tensor(picture, size, manifest.mean, manifest.std))
    held = [i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 for i in range(len(tensors))]
    return CalibrationSet(
        calibrate=torch.stack([t for t, h in zip(tensors, held, strict=True) if not h]),
        held_out=torch.stack([t for t, h in zip(tensors, held, strict=True) if h]),
        source=source,
    )


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally sized arrays (ties get their average rank).

    Two constant arrays correlate 1 (both maps are blank: they agree), one constant array 0.
    """
    x, y = _ranks(np.asarray(a, dtype=np.float64).ravel()), _ranks(np.asarray(b, dtype=np.float64).ravel())
    if x.size != y.size:
        raise ValueError(f"spearman: {x.size} values against {y.size}")
    x, y = x - x.mean(), y - y.mean()
    norm = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    if norm == 0.0:
        return 1.0 if not x.any() and not y.any() else 0.0
    return float((x * y).sum()) / norm


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    group = np.cumsum(starts) - 1
    bounds = np.concatenate((np.flatnonzero(starts), [values.size]))
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = 0.5 * (bounds[group] + bounds[group + 1] - 1)  # the mean of the group's 0-based positions
    return ranks


def compare(
    float_backend: Backend, int8_backend: Backend, held_out: torch.Tensor, manifest: Manifest, batch: int = 8
) -> dict[str, Any]:
    """Run both graphs on ``held_out`` and measure how closely the INT8 graph follows the float one.

    Returns:
        ``agreement``: ``metric``, ``value`` (top-1 agreement; median cosine for an embedding), ``min``
        (cosine only), ``images``; ``maps``: per activation output, ``layer``, ``median`` and ``min`` of the
        per-image Spearman correlation of the LaFAM maps at native resolution, ``images``.
    """
    names = output_names(manifest)
    runs: dict[str, list[list[torch.Tensor]]] = {name: [[], []] for name in names}
    for start in range(0, len(held_out), batch):
        chunk = held_out[start : start + batch]
        for side, backend in enumerate((float_backend, int8_backend)):
            outputs = backend.run(chunk)
            for name in names:
                runs[name][side].append(outputs[name].detach().to("cpu", torch.float32))
    joined = {name: [torch.cat(parts) for parts in sides] for name, sides in runs.items()}
    count = len(held_out)
    reference, quantized = joined[manifest.main_output]
    if manifest.task == "classification":
        same = (reference.argmax(dim=1) == quantized.argmax(dim=1)).double()
        agreement: dict[str, Any] = {"metric": "top1_agreement", "value": float(same.mean()), "images": count}
    else:
        cosine = torch.nn.functional.cosine_similarity(reference.double(), quantized.double(), dim=1)
        agreement = {
            "metric": "cosine_similarity",
            "value": float(cosine.median()),
            "min": float(cosine.min()),
            "images": count,
        }
    maps = {}
    for spec in manifest.layers:
        a, b = (lafam(t).numpy() for t in joined[spec.output])
        correlations = np.array([spearman(a[i], b[i]) for i in range(count)])
        maps[spec.output] = {
            "layer": spec.name,
            "median": float(np.median(correlations)),
            "min": float(correlations.min()),
            "images": count,
        }
    return {"agreement": agreement, "maps": maps}


def failures(figures: dict[str, Any], thresholds: Thresholds) -> list[str]:
    """The figures of :func:`compare` under their thresholds, each named (empty when all pass)."""
    problems = []
    agreement = figures["agreement"]
    if agreement["metric"] == "top1_agreement" and not agreement["value"] >= thresholds.top1_agreement:
        problems.append(
            f"top-1 agreement {agreement['value']:.4f} < {thresholds.top1_agreement:g} "
            f"(--int8-min-agreement; {agreement['images']} held-out images)"
        )
    if agreement["metric"] == "cosine_similarity" and not agreement["value"] >= thresholds.cosine:
        problems.append(
            f"median cosine similarity of the embeddings {agreement['value']:.4f} < {thresholds.cosine:g} "
            f"(--int8-min-agreement; {agreement['images']} held-out images)"
        )
    for output, figure in figures["maps"].items():
        if not figure["median"] >= thresholds.map_spearman:
            problems.append(
                f"median Spearman correlation of the LaFAM maps of layer {figure['layer']!r} ({output}) "
                f"{figure['median']:.4f} < {thresholds.map_spearman:g} (--int8-min-spearman; min {figure['min']:.4f})"
            )
    return problems


def quantize_graph(float_path: Path, int8_path: Path, calibrate: torch.Tensor, main_output: str) -> dict[str, Any]:
    """Write the statically quantised QDQ graph of ``float_path`` to ``int8_path``, calibrated on ``calibrate``.

    The graph is first pre-processed as ONNX Runtime advises (shape inference, graph optimisation); a graph its
    pre-processing cannot handle is quantised as it is (``preprocessed`` is then false). The main output's
    QuantizeLinear / DequantizeLinear pair is removed afterwards, so the last layer writes float32 directly.

    Returns:
        ``preprocessed`` and, when pre-processing failed, ``preprocess_error``.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.preprocess import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(
                calibrate[i : i + CALIBRATION_BATCH].contiguous().numpy()
                for i in range(0, len(calibrate), CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {"input": batch}

    info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lafam-int8-") as scratch:
        source = Path(scratch) / "preprocessed.onnx"
        try:
            quant_pre_process(str(float_path), str(source))
            info["preprocessed"] = True
        except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation; quantise the graph as it is
            info.update(preprocessed=False, preprocess_error=f"{type(exc).__name__}: {exc}"[:300])
            source = float_path
        with _quiet("onnxruntime", ""):
            quantize_static(
                str(source),
                str(int8_path),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=PER_CHANNEL,
                reduce_range=REDUCE_RANGE,
                activation_type=getattr(QuantType, ACTIVATION_TYPE),
                weight_type=getattr(QuantType, WEIGHT_TYPE),
                # MinMax keeps only each run's per-tensor minimum and maximum, so memory does not grow with the
                # images. (Not CalibMaxIntermediateOutputs: in ONNX Runtime 1.31.1 it discards every full chunk of
                # runs without folding it into the ranges.)
                calibrate_method=getattr(CalibrationMethod, CALIBRATE_METHOD),
            )
    graph = onnx.load(str(int8_path))
    if _unquantize_output(graph, main_output):
        onnx.save(graph, str(int8_path))
    return info


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Raise the named loggers (``""``: the root) to ERROR meanwhile: ONNX Runtime logs every tensor it skips."""
    loggers = [logging.getLogger(name or None) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(max(log.level, logging.ERROR))
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def _unquantize_output(graph: onnx.ModelProto, name: str) -> bool:
    """Remove the QuantizeLinear -> DequantizeLinear pair in front of graph output ``name``; whether there was one.

    The node that computed the tensor the pair quantised then writes ``name`` itself, in float32.
    """
    nodes = graph.graph.node
    producers = {out: node for node in nodes for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    dequantize = producers.get(name)
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return False
    quantize = producers.get(dequantize.input[0])
    if quantize is None or quantize.op_type != "QuantizeLinear" or len(consumers[quantize.output[0]]) != 1:
        return False
    source = quantize.input[0]
    producer = producers.get(source)
    outputs = {o.name for o in graph.graph.output}
    if producer is None or len(consumers.get(source, [])) != 1 or source in outputs:
        return False
    producer.output[list(producer.output).index(source)] = name
    for node in (quantize, dequantize):
        nodes.remove(node)
    used = {tensor for node in nodes for tensor in node.input}
    kept = [t for t in graph.graph.initializer if t.name in used]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    kept_info = [v for v in graph.graph.value_info if v.name not in (source, quantize.output[0])]
    del graph.graph.value_info[:]
    graph.graph.value_info.extend(kept_info)
    return True


def _check_runs(
    backend: Backend, manifest: Manifest, where: str, batch_sizes: Sequence[int], sizes: Sequence[tuple[int, int]]
) -> None:
    """Run the INT8 graph at every batch size and input size: every output present, float32, shaped, finite."""
    generator = torch.Generator().manual_seed(0)
    graph = onnx.load(str(where), load_external_data=False)
    dtypes = {o.name: o.type.tensor_type.elem_type for o in graph.graph.output}
    not_float = [name for name, dtype in dtypes.items() if dtype != onnx.TensorProto.FLOAT]
    if not_float:
        raise QuantizationError(f"{where}: outputs {not_float} are not float32 in the INT8 graph")
    for height, width in sizes:
        expected_side = {spec.output: spec for spec in manifest.layers}
        for batch_size in batch_sizes:
            batch = torch.randn(batch_size, 3, height, width, generator=generator)
            try:
                outputs = backend.run(batch)
            except Exception as exc:
                raise QuantizationError(
                    f"{where}: running batch {batch_size} at {height}x{width} failed: {exc}"
                ) from exc
            for name in output_names(manifest):
                value = outputs.get(name)
                if value is None:
                    raise QuantizationError(f"{where}: output {name!r} is missing (got {sorted(outputs)})")
                if value.dtype != torch.float32:
                    raise QuantizationError(f"{where}: output {name!r} is {value.dtype}, not float32")
                if value.shape[0] != batch_size or (name == manifest.main_output and value.dim() != 2):
                    raise QuantizationError(f"{where}: output {name!r} has shape {tuple(value.shape)}")
                if name in expected_side and (value.dim() != 4 or value.shape[1] != expected_side[name].shape[0]):
                    raise QuantizationError(f"{where}: output {name!r} has shape {tuple(value.shape)}")
                if not torch.isfinite(value).all():
                    raise QuantizationError(f"{where}: output {name!r} is not finite at batch {batch_size}")


def quantize_and_check(
    folder: Path,
    manifest: Manifest,
    calibration: CalibrationSet,
    thresholds: Thresholds,
    *,
    batch_sizes: Sequence[int],
    sizes: Sequence[tuple[int, int]],
    log: Callable[[str], None] = logger.info,
) -> Manifest:
    """Quantise the verified float graph of ``manifest`` in ``folder``, check it, return the INT8 manifest.

    Args:
        folder: the backend folder holding the float ONNX graph (``manifest.model_file``).
        manifest: the float graph's manifest, verified (not yet written).
        calibration: the preprocessed calibration and held-out images.
        thresholds: the least agreement figures accepted.
        batch_sizes: batch sizes the INT8 graph is run at (the float verification's).
        sizes: input sizes it is run at (the second one of a ``--dynamic-size`` export too).
        log: progress lines.

    Returns:
        The manifest of :data:`INT8_GRAPH_FILE`: ``model_file`` and ``checksums`` name it instead of the float
        graph (which stays in ``folder`` but is not archived), ``quantization`` records how and the figures.

    Raises:
        QuantizationError: the graph cannot be quantised, does not run as served, or misses a threshold.
    """
    import onnxruntime

    if manifest.backend != "onnx":
        raise QuantizationError(f"INT8 quantisation needs an ONNX graph, not {manifest.backend}")
    float_path = folder / manifest.model_file
    int8_path = folder / INT8_GRAPH_FILE
    log(
        f"int8: calibrating on {len(calibration.calibrate)} images ({calibration.source}); "
        f"{len(calibration.held_out)} held out"
    )
    try:
        info = quantize_graph(float_path, int8_path, calibration.calibrate, manifest.main_output)
        _check_graph(int8_path, output_names(manifest), manifest.dynamic_size)
    except Exception as exc:
        raise QuantizationError(f"ONNX Runtime could not quantise {float_path}: {type(exc).__name__}: {exc}") from exc
    if not info["preprocessed"]:
        log(f"int8: ONNX Runtime's pre-processing failed ({info['preprocess_error']}); quantised the graph as it is")
    int8_manifest = dataclasses.replace(manifest, model_file=INT8_GRAPH_FILE)
    int8_backend = load_backend(int8_manifest, folder, "cpu")
    _check_runs(int8_backend, int8_manifest, str(int8_path), batch_sizes, sizes)
    figures = compare(load_backend(manifest, folder, "cpu"), int8_backend, calibration.held_out, manifest)
    agreement, maps = figures["agreement"], figures["maps"]
    agreement["threshold"] = thresholds.top1_agreement if agreement["metric"] == "top1_agreement" else thresholds.cosine
    for figure in maps.values():
        figure["threshold"] = thresholds.map_spearman
    shown = ", ".join(f"{f['layer']} median {f['median']:.4f} (min {f['min']:.4f})" for f in maps.values())
    log(f"int8: {agreement['metric']} {agreement['value']:.4f}; LaFAM map Spearman: {shown}")
    problems = failures(figures, thresholds)
    if problems:
        raise QuantizationError(
            f"the INT8 graph {int8_path} does not follow the float graph closely enough on "
            f"{len(calibration.held_out)} held-out images: " + "; ".join(problems) + ". No manifest was written. "
            "Calibrate on more images like the served ones (--calibration DIR), export without --quantize, or "
            "lower the threshold if this loss is acceptable"
        )
    checksums = {
        INT8_GRAPH_FILE: sha256_file(int8_path),
        **{name: digest for name, digest in manifest.checksums.items() if name != manifest.model_file},
    }
    height, width = manifest.input_size
    spec = QuantizationSpec(
        dtype="int8",
        format="QDQ",
        method="onnxruntime.quantization.quantize_static",
        onnxruntime_version=onnxruntime.__version__,
        weight_type=WEIGHT_TYPE,
        activation_type=ACTIVATION_TYPE,
        per_channel=PER_CHANNEL,
        reduce_range=REDUCE_RANGE,
        calibrate_method=CALIBRATE_METHOD,
        calibration={
            "source": calibration.source,
            "images": len(calibration.calibrate),
            "held_out": len(calibration.held_out),
            "held_out_rule": f"image i (in file-name order) with i % {HELD_OUT_EVERY} == {HELD_OUT_EVERY - 1}",
            "preprocessing": f"as served: decoded, resized to {height}x{width} (bilinear, whole image), normalised",
            **info,
        },
        agreement=agreement,
        maps=maps,
        float_model={"file": manifest.model_file, "sha256": manifest.checksums.get(manifest.model_file)},
    )
    return dataclasses.replace(int8_manifest, checksums=checksums, quantization=spec)
