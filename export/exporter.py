"""Model spec in, verified graphs out: one folder per backend with the graph, ``labels.txt`` and ``lafam.json``.

The manifest is written last, after the graph has been verified through the serving code, so a folder
holding a ``lafam.json`` always holds a graph that passed verification. When verification fails the
graph is left in place (for inspection) without a manifest and the error is raised.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import math
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn

from export.models import ActivationModel, check_input_size, find_default_layer, resolve_model
from export.onnx import export_onnx
from export.quantize import (
    INT8_GRAPH_FILE,
    QUANTIZE_CHOICES,
    CalibrationSet,
    Thresholds,
    load_calibration,
    quantize_and_check,
)
from export.torchscript import export_torchscript
from export.verify import DEFAULT_TOLERANCE, VerificationError, VerificationReport, verify_report
from handlers.eager import build_architecture, head_path, load_eager
from handlers.manifest import (
    BACKENDS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MANIFEST_FILE,
    EagerSpec,
    LayerSpec,
    Manifest,
    output_name_for,
    sha256_file,
)

logger = logging.getLogger(__name__)

GRAPH_FILES: dict[str, str] = {"onnx": "model.onnx", "torchscript": "model.pt"}
LABELS_FILE = "labels.txt"
EAGER_FILE = "eager.pt"
EAGER_CODE_DIR = "eager_code"
MAIN_OUTPUTS: dict[str, str] = {"classification": "logits", "embedding": "embedding"}
VERIFY_BATCH_SIZES: tuple[int, ...] = (1, 3)
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class ExportError(ValueError):
    """An export argument is invalid; the message names it and the fix."""


def export_model(
    spec: str,
    out_dir: str | Path,
    *,
    backends: Sequence[str] = ("onnx",),
    layers: Sequence[str] | None = None,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    labels: Sequence[str] | str | Path | None = None,
    input_size: tuple[int, int] = (224, 224),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    task: str = "classification",
    name: str | None = None,
    tolerance: float | None = None,
    opset: int | None = None,
    eager: bool = False,
    dynamic_size: bool = False,
    quantize: str = "none",
    calibration: str | Path | Sequence[bytes] | None = None,
    calibration_source: str | None = None,
    int8_min_agreement: float | None = None,
    int8_min_spearman: float | None = None,
    log: Callable[[str], None] = logger.info,
) -> dict[str, Path]:
    """Export a model to verified graphs, one folder per backend.

    Each ``out_dir/<backend>/`` receives the graph (``model.onnx`` or ``model.pt``), ``labels.txt`` when
    there are labels, and the manifest ``lafam.json`` (see :class:`handlers.manifest.Manifest`), written
    only once the graph has passed :func:`export.verify.verify_report`. A manifest left by an earlier export in
    that folder is removed first, so it can never describe the new graph.

    Args:
        spec: torchvision model name or ``package.module:factory`` (see :func:`export.models.resolve_model`).
        out_dir: parent folder of the per-backend folders; created if missing.
        backends: any of ``onnx`` and ``torchscript``.
        layers: module paths to explain, the first is the default; ``None`` finds the last convolutional
            stage (:func:`export.models.find_default_layer`).
        weights: state_dict file; ``None`` keeps the random initialisation.
        num_classes: classes of the head; ``None`` keeps the model's default.
        labels: class names, or a file with one name per line (blank lines ignored); their number must
            equal the model's number of outputs. Not allowed for ``task="embedding"``.
        input_size: ``(H, W)`` of the graph input.
        mean: per-channel normalisation mean, RGB, for pixel values in [0, 1].
        std: per-channel normalisation standard deviation.
        task: ``classification`` (main output ``logits``) or ``embedding`` (main output ``embedding``).
        name: model name; defaults to the spec's last component (``resnet50``, ``build_net``).
        tolerance: verification tolerance, relative to each output's magnitude (rule in :mod:`export.verify`);
            ``None`` uses 1e-4.
        opset: ONNX opset; ``None`` uses the exporter's default.
        eager: also write the eager model for backward-pass explanations (``/explanations``): its
            state_dict (``eager.pt``) and, for a ``package.module:factory`` spec, the Python files of the
            factory's top-level package (``eager_code/``); the rebuilt model is checked to give the same
            output as the exported one's source.
        dynamic_size: the graph takes any input height and width (``lafam-serve export --dynamic-size``), for
            fully convolutional models with global pooling: served with the ``resize`` option ``none`` or N,
            an image is run at (about) its own size. The eager model is first run at a second, non-square size
            (:func:`second_size`) and must give outputs of the same shape; the graph is then verified against
            eager at both sizes. The manifest records ``dynamic_size`` and ``min_side``: the model's total
            stride (input side / the explained layer's side), raised to the smallest side the eager model runs
            at. Without it (the default) the graph is served at ``input_size`` only.
        quantize: ``none`` (the default) or ``int8``: the ONNX graph is statically quantised by ONNX Runtime
            (QDQ, per-channel QInt8 weights, QUInt8 activations; :mod:`export.quantize`) after the float graph
            passed verification; the folder then serves ``model.int8.onnx`` (the float ``model.onnx`` stays
            beside it, unarchived) and the manifest records ``quantization``. ONNX only: with ``torchscript``
            alone it is an error; with both backends the TorchScript graph stays float32.
        calibration: with ``quantize="int8"`` (required then): a folder of ``.jpg``/``.png`` images or encoded
            images, decoded and resized as the server does; every fourth is held out for the agreement check
            (``lafam-serve export`` passes generated demo scenes when no ``--calibration`` folder is given).
        calibration_source: what the ``calibration`` images are, for the manifest (default: the folder, or
            their count).
        int8_min_agreement: least top-1 agreement with the float graph on the held-out images (median cosine
            similarity for an embedding); ``None``: 0.99.
        int8_min_spearman: least median Spearman correlation of the INT8 and float LaFAM maps, per layer;
            ``None``: 0.95.
        log: receives progress lines (``print`` works).

    Returns:
        The folder written for each backend, by backend name.

    Raises:
        ExportError: for invalid arguments (backends, labels, name, input size, outputs of the model), or
            ``dynamic_size`` for a model that cannot take another input size (the message names the module
            that fails, or the output whose shape changes).
        ModelSpecError: when the model, its weights or a layer cannot be resolved.
        VerificationError: when an exported graph does not match the eager model.
        QuantizationError: (a ``VerificationError``) the INT8 graph misses a threshold or does not run; the
            message names the figure. No manifest is written for it.
    """
    chosen = _check_backends(backends)
    thresholds = _check_quantize(quantize, chosen, calibration, int8_min_agreement, int8_min_spearman)
    size = check_input_size(input_size, allow_int=True, error=ExportError)
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    if not tolerance > 0:
        raise ExportError(f"tolerance={tolerance!r} must be positive, e.g. {DEFAULT_TOLERANCE}")
    model_name = _model_name(spec, name)
    label_list = _read_labels(labels) if labels is not None else ()
    if label_list and task == "embedding":
        raise ExportError("labels were given for task='embedding'; an embedding model has no classes, drop labels")

    model = resolve_model(spec, num_classes=num_classes, weights=weights, task=task)
    eager_head = _dropped_head(spec, num_classes) if eager and task == "embedding" else None
    default_chosen = layers is None
    layer_names = [find_default_layer(model, size)] if layers is None else list(layers)
    reference = ActivationModel(model, layer_names, input_size=size)
    del model
    with torch.no_grad():
        main, *activations = reference(torch.zeros(1, 3, *size))
    if main.dim() != 2:
        raise ExportError(
            f"{spec!r} returns a tensor of shape {tuple(main.shape)} for one image; expected (1, K) logits or an "
            f"embedding: wrap the model so that it returns a 2-D tensor"
        )
    num_outputs = int(main.shape[1])
    layer_specs = tuple(
        LayerSpec(
            name=layer,
            output=output_name_for(layer),
            shape=(int(a.shape[1]), int(a.shape[2]), int(a.shape[3])),
            layout=reference.layouts[layer].kind,
        )
        for layer, a in zip(layer_names, activations, strict=True)
    )
    _check_output_names(layer_specs)
    if default_chosen:
        c, h, w = layer_specs[0].shape
        layout = reference.layouts[layer_specs[0].name]
        shown = "" if layout.kind == "nchw" else f", from {layout.describe()}"
        log(f"default layer: {layer_specs[0].name} ({c}x{h}x{w} at {size[0]}x{size[1]}{shown})")
    if label_list and len(label_list) != num_outputs:
        raise ExportError(
            f"labels: {len(label_list)} labels for {num_outputs} model outputs; give exactly one label per class "
            f"(one per line in a labels file, blank lines ignored) or pass num_classes={len(label_list)}"
        )
    min_side, sizes = _check_dynamic_size(reference, spec, size, layer_specs, log) if dynamic_size else (None, (size,))

    # Built before any graph is written so that bad mean/std/sizes fail fast, with the manifest's messages.
    draft = Manifest(
        name=model_name,
        task=task,  # type: ignore[arg-type]  # checked by resolve_model
        backend=chosen[0],  # type: ignore[arg-type]  # checked above
        model_file=GRAPH_FILES[chosen[0]],
        input_size=size,
        mean=_three_floats(mean, "mean"),
        std=_three_floats(std, "std"),
        main_output=MAIN_OUTPUTS[task],
        layers=layer_specs,
        num_outputs=num_outputs,
        labels=label_list,
        dynamic_size=dynamic_size,
        min_side=min_side,
        source={
            "spec": spec,
            "weights_sha256": sha256_file(weights) if weights is not None else None,
            "num_classes": num_classes,
            "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__,
        },
    )
    if eager:
        draft = dataclasses.replace(
            draft,
            eager=EagerSpec(
                architecture=spec.strip(),
                state_dict=EAGER_FILE,
                num_classes=num_classes,
                head=eager_head,
                code=EAGER_CODE_DIR if ":" in spec else None,
            ),
        )
    int8 = None
    if thresholds is not None and calibration is not None:  # _check_quantize: both or neither
        try:
            int8 = (load_calibration(calibration, draft, calibration_source), thresholds)
        except ValueError as exc:
            raise ExportError(str(exc)) from exc
        if "torchscript" in chosen:
            log("int8: quantising the ONNX graph; the TorchScript graph stays float32")
    out = Path(out_dir)
    return {
        backend: _export_backend(
            reference,
            draft,
            backend,
            out / backend,
            tolerance=tolerance,
            opset=opset,
            sizes=sizes,
            int8=int8 if backend == "onnx" else None,
            log=log,
        )
        for backend in chosen
    }


def second_size(input_size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """The second size a ``--dynamic-size`` export is checked at: clearly different from ``input_size``.

    Shorter by a quarter and wider by a quarter (non-square even for a square ``input_size``, so a height/width
    mix-up shows), plus one pixel so that neither side is a multiple of the model's stride, as a posted
    image's side rarely is; never under ``min_side``.
    """
    height, width = input_size
    return max(min_side, 3 * height // 4) + 1, max(min_side, 5 * width // 4) + 1


class _ForwardFailed(Exception):
    """The eager model failed at a size; ``where`` names the innermost module that was running."""

    def __init__(self, where: str, error: Exception) -> None:
        super().__init__(f"{where} fails: {type(error).__name__}: {str(error).strip().splitlines()[0]}")


def _run_at(reference: ActivationModel, size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Run the eager model on one blank image of ``size``; on failure name the module that raised.

    Hooks on the reference's own copy of the model keep the stack of modules running; they are removed after.
    """
    running: list[str] = []

    def enter(name: str, module: nn.Module, args: object) -> None:
        running.append(name)

    def leave(module: nn.Module, args: object, output: object) -> None:
        running.pop()

    handles = []
    for name, module in reference.model.named_modules():
        handles.append(module.register_forward_pre_hook(functools.partial(enter, name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad():
            return reference(torch.zeros(1, 3, *size))
    except Exception as exc:
        name = running[-1] if running else ""
        module = reference.model.get_submodule(name)
        where = f"module {name!r} ({type(module).__name__})" if name else f"{type(module).__name__}.forward"
        raise _ForwardFailed(where, exc) from exc
    finally:
        for handle in handles:
            handle.remove()


def _check_dynamic_size(
    reference: ActivationModel,
    spec: str,
    size: tuple[int, int],
    layer_specs: Sequence[LayerSpec],
    log: Callable[[str], None],
) -> tuple[int, tuple[tuple[int, int], ...]]:
    """Check that the eager model takes another input size.

    Returns:
        The smallest side it is served at, and the sizes to verify the graph at: ``size`` and a second one.

    Raises:
        ExportError: the model fails at :func:`second_size`, or an output changes shape (the main output at
            all, an activation in anything but its height and width); the message names what fails.
    """
    stride = max(
        1, *(max(math.ceil(size[0] / h), math.ceil(size[1] / w)) for _, h, w in (s.shape for s in layer_specs))
    )
    other = second_size(size, stride)
    what = f"--dynamic-size: {spec!r} cannot take another input size than {size[0]}x{size[1]}"
    fix = f"; export it without --dynamic-size (every image is then resized to {size[0]}x{size[1]})"
    with torch.no_grad():
        expected = reference(torch.zeros(1, 3, *size))
    try:
        outputs = _run_at(reference, other)
    except _ForwardFailed as exc:
        raise ExportError(
            f"{what}: at {other[0]}x{other[1]} its {exc} (a fully convolutional model with global pooling before "
            f"its head takes any size; a head that flattens a fixed-size map, or fixed position embeddings, do not)"
            f"{fix}"
        ) from exc
    changed = _changed_output(expected, outputs, layer_specs)
    if changed is not None:
        raise ExportError(
            f"{what}: {changed} at {other[0]}x{other[1]} (its output depends on the input size: is there no "
            f"global pooling before the head?){fix}"
        )
    smallest = stride
    while smallest < min(size):
        try:
            if _changed_output(expected, _run_at(reference, (smallest, smallest)), layer_specs) is None:
                break
        except _ForwardFailed as exc:
            log(f"dynamic size: at {smallest}x{smallest} its {exc}; trying a larger minimum side")
        smallest *= 2
    smallest = min(smallest, *size)
    log(
        f"dynamic size: {spec} runs at {other[0]}x{other[1]} as at {size[0]}x{size[1]}; minimum side {smallest} "
        f"(total stride {stride})"
    )
    return smallest, (size, other)


def _changed_output(
    expected: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], layer_specs: Sequence[LayerSpec]
) -> str | None:
    """How an output's shape at another input size differs from ``expected``'s, or ``None`` where none does."""
    main, *activations = outputs
    if main.shape != expected[0].shape:
        return f"its output has shape {tuple(main.shape)} instead of {tuple(expected[0].shape)}"
    for spec, activation, reference in zip(layer_specs, activations, expected[1:], strict=True):
        if activation.dim() != 4 or activation.shape[:2] != reference.shape[:2]:
            return f"layer {spec.name!r} gives {tuple(activation.shape)} instead of (1, {spec.shape[0]}, h, w)"
    return None


def _dropped_head(spec: str, num_classes: int | None) -> str | None:
    """The head :func:`~export.models.resolve_model` replaces by an Identity for an embedding (not a factory's)."""
    return None if ":" in spec else head_path(build_architecture(spec.strip(), num_classes), spec)


def _write_eager(reference: ActivationModel, draft: Manifest, folder: Path) -> dict[str, str]:
    """Write the eager model's files into ``folder``; return their checksums by relative path.

    The model is then rebuilt with :func:`handlers.eager.load_eager`, the code the worker runs, and must
    give the reference's output bit for bit (same code, same weights, same CPU kernels).
    """
    spec = draft.eager
    if spec is None:
        return {}
    code_root = folder / EAGER_CODE_DIR
    if code_root.exists():
        shutil.rmtree(code_root)
    files = [folder / spec.state_dict]
    torch.save(reference.model.state_dict(), files[0])
    if spec.code is not None:
        files += _copy_package(spec.architecture.partition(":")[0], code_root)
    checksums = {path.relative_to(folder).as_posix(): sha256_file(path) for path in files}
    rebuilt = load_eager(spec, folder)
    x = torch.randn(2, 3, *draft.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(x)[0], rebuilt(x)
    if not torch.equal(expected, got):
        raise VerificationError(
            f"the eager model rebuilt from {folder} differs from the exported one (max |diff| "
            f"{float((expected - got).abs().max()):.3g}); its factory must build the same module every call"
        )
    return checksums


def _copy_package(module_name: str, target: Path) -> list[Path]:
    """Copy the Python files of ``module_name``'s top-level package (or module) into ``target``."""
    top = importlib.import_module(module_name.partition(".")[0])
    origin = Path(inspect.getfile(top))
    target.mkdir(parents=True)
    if origin.name != "__init__.py":
        return [Path(shutil.copy2(origin, target / origin.name))]
    copied = []
    for source in sorted(origin.parent.rglob("*.py")):
        if "__pycache__" in source.parts:
            continue
        destination = target / origin.parent.name / source.relative_to(origin.parent)
        destination.parent.mkdir(parents=True, exist_ok=True)
        copied.append(Path(shutil.copy2(source, destination)))
    return copied


def _export_backend(
    reference: ActivationModel,
    draft: Manifest,
    backend: str,
    folder: Path,
    *,
    tolerance: float,
    opset: int | None,
    sizes: tuple[tuple[int, int], ...],
    int8: tuple[CalibrationSet, Thresholds] | None = None,
    log: Callable[[str], None],
) -> Path:
    """Write, verify (at every size in ``sizes``) and describe one backend's graph in ``folder``.

    With ``int8``, the verified float graph is then quantised and checked (:func:`export.quantize.quantize_and_check`)
    and the manifest describes the INT8 graph.
    """
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / MANIFEST_FILE
    if manifest_path.exists():
        log(f"{backend}: removing the manifest of an earlier export, {manifest_path}")
        manifest_path.unlink()
    labels_path = folder / LABELS_FILE
    if draft.labels:
        labels_path.write_text("".join(label + "\n" for label in draft.labels))
    elif labels_path.exists():
        log(f"{backend}: removing {labels_path} of an earlier export (this model has no labels)")
        labels_path.unlink()
    graph_path = folder / GRAPH_FILES[backend]
    stale_int8 = folder / INT8_GRAPH_FILE
    if int8 is None and stale_int8.exists():
        log(f"{backend}: removing {stale_int8} of an earlier INT8 export (this export is float32)")
        stale_int8.unlink()
    eager_checksums = _write_eager(reference, draft, folder)
    names = [draft.main_output, *(spec.output for spec in draft.layers)]
    input_size = draft.input_size

    def write_graph(freeze: bool) -> Manifest:
        if backend == "onnx":
            info = export_onnx(
                reference,
                graph_path,
                input_size,
                names,
                opset=opset,
                dynamic_size=draft.dynamic_size,
                min_side=draft.min_side or 1,
                log=log,
            )
        else:
            info = export_torchscript(reference, graph_path, input_size, freeze=freeze, log=log)
        checksums = {graph_path.name: sha256_file(graph_path), **eager_checksums}
        if draft.labels:
            checksums[LABELS_FILE] = sha256_file(labels_path)
        source = {**draft.source, "opset": None, **info}
        return dataclasses.replace(
            draft, backend=backend, model_file=graph_path.name, checksums=checksums, source=source
        )

    def verify(manifest: Manifest) -> VerificationReport:
        return verify_report(
            reference, folder, manifest, batch_sizes=VERIFY_BATCH_SIZES, tolerance=tolerance, input_sizes=sizes
        )

    manifest = write_graph(freeze=True)
    try:
        try:
            report = verify(manifest)
        except VerificationError as exc:
            if not manifest.source.get("frozen"):
                raise
            log(f"{backend}: the frozen TorchScript graph failed verification ({exc}); exporting it unfrozen")
            manifest = write_graph(freeze=False)
            report = verify(manifest)
    except VerificationError as exc:
        if len(sizes) == 1:
            raise
        shown = " and ".join(f"{h}x{w}" for h, w in sizes)
        raise VerificationError(
            f"{exc}. --dynamic-size verifies the graph at {shown}: a graph ({backend}) that keeps the example's "
            f"size cannot be served at others; export without --dynamic-size"
        ) from exc
    manifest = dataclasses.replace(manifest, verification=report.to_dict())
    if int8 is not None:
        calibration, thresholds = int8
        manifest = quantize_and_check(
            folder, manifest, calibration, thresholds, batch_sizes=VERIFY_BATCH_SIZES, sizes=sizes, log=log
        )
    manifest.dump(manifest_path)
    worst = ", ".join(f"{name} {diff:.2g}" for name, diff in report.max_abs_diff.items())
    served = f"; serves the INT8 graph {manifest.model_file}" if manifest.quantization else ""
    log(f"{backend}: wrote {folder} ({manifest.source['exporter']} exporter; max |eager - exported|: {worst}{served})")
    return folder


def _check_quantize(
    quantize: str,
    backends: Sequence[str],
    calibration: object,
    min_agreement: float | None,
    min_spearman: float | None,
) -> Thresholds | None:
    """Check the INT8 arguments; the thresholds with ``quantize="int8"``, else ``None``."""
    if quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"quantize={quantize!r} is not supported; choose from: {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "none":
        given = [
            name
            for name, value in (
                ("calibration", calibration),
                ("int8_min_agreement", min_agreement),
                ("int8_min_spearman", min_spearman),
            )
            if value is not None
        ]
        if given:
            raise ExportError(f"{', '.join(given)} given without quantize='int8' (--quantize int8)")
        return None
    if "onnx" not in backends:
        raise ExportError(
            "quantize='int8' needs the onnx backend (ONNX Runtime static quantisation); a TorchScript graph is "
            "exported in float32 only: use --backend onnx (or both: the ONNX graph is quantised, the TorchScript "
            "one stays float32)"
        )
    if calibration is None:
        raise ExportError(
            "quantize='int8' needs calibration images: a folder of .jpg/.png images like the served ones "
            "(--calibration DIR), or encoded images"
        )
    defaults = Thresholds()
    try:
        return Thresholds(
            top1_agreement=defaults.top1_agreement if min_agreement is None else min_agreement,
            cosine=defaults.cosine if min_agreement is None else min_agreement,
            map_spearman=defaults.map_spearman if min_spearman is None else min_spearman,
        )
    except ValueError as exc:
        raise ExportError(str(exc)) from exc


def _check_backends(backends: Sequence[str]) -> list[str]:
    names = [backends] if isinstance(backends, str) else list(backends)
    if not names:
        raise ExportError(f"backends is empty; choose from: {', '.join(BACKENDS)}")
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise ExportError(
            f"backends: {', '.join(map(repr, unknown))} not supported; choose from: {', '.join(BACKENDS)}"
        )
    return list(dict.fromkeys(names))


def _check_output_names(layer_specs: Sequence[LayerSpec]) -> None:
    by_output: dict[str, list[str]] = {}
    for spec in layer_specs:
        by_output.setdefault(spec.output, []).append(spec.name)
    clashes = [names for names in by_output.values() if len(names) > 1]
    if clashes:
        raise ExportError(
            f"layers {' and '.join(map(repr, clashes[0]))} map to the same graph output name "
            f"{output_name_for(clashes[0][0])!r}; keep only one of them"
        )


def _three_floats(values: Sequence[float], argument: str) -> tuple[float, float, float]:
    try:
        floats = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{argument}={values!r} must be three numbers (R, G, B)") from exc
    if len(floats) != 3:
        raise ExportError(f"{argument}={values!r} must be three numbers (R, G, B)")
    return floats  # type: ignore[return-value]  # length checked


def _model_name(spec: str, name: str | None) -> str:
    if name is None:
        name = str(spec).strip().rsplit(":", 1)[-1].rsplit(".", 1)[-1]
        if ":" not in spec:
            name = name.lower()
    if not _MODEL_NAME.match(name):
        raise ExportError(f"name={name!r} must start with a letter or digit and use only letters, digits, '_', '-'")
    return name


def _read_labels(labels: Sequence[str] | str | Path) -> tuple[str, ...]:
    if isinstance(labels, (str, Path)):
        path = Path(labels)
        if not path.is_file():
            raise ExportError(f"labels={str(labels)!r} is not a file; pass a text file with one class name per line")
        return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    values = tuple(labels)
    bad = [v for v in values if not isinstance(v, str) or not v.strip() or "\n" in v or "\r" in v]
    if bad:
        raise ExportError(f"labels contains {bad[0]!r}; each label must be a non-empty single-line string")
    return tuple(v.strip() for v in values)
