"""The manifest: what ``export`` writes beside a graph and what the handler reads at start-up.

It is the only contract between build time and serve time. It is stored as ``lafam.json`` inside the
``.mar`` and validated when loaded, so a broken archive fails at worker start with a message that names
the field, not at the first request.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = 1
MANIFEST_FILE = "lafam.json"

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""The torchvision normalisation, the default ``mean``/``std`` of exports and explainers."""

Task = Literal["classification", "embedding"]
BackendName = Literal["onnx", "torchscript"]
TASKS: tuple[str, ...] = ("classification", "embedding")
BACKENDS: tuple[str, ...] = ("onnx", "torchscript")
LAYOUTS: tuple[str, ...] = ("nchw", "nhwc", "tokens")
"""How an exported layer's eager output became its graph output; see :attr:`LayerSpec.layout`."""
QUANTIZED_DTYPES: tuple[str, ...] = ("int8",)
"""What :attr:`Manifest.quantization` may record (``export --quantize``)."""
QUANTIZED_FORMATS: tuple[str, ...] = ("QDQ",)
AGREEMENT_METRICS: tuple[str, ...] = ("top1_agreement", "cosine_similarity")
"""How a quantised graph's main output was compared with the float graph's: classification, embedding."""


class ManifestError(ValueError):
    """The manifest is missing, malformed or inconsistent."""


def output_name_for(layer: str) -> str:
    """Return the graph output name of a layer's activations, e.g. ``layer4.1`` -> ``act_layer4_1``."""
    return "act_" + "".join(ch if ch.isalnum() else "_" for ch in layer)


def sha256_file(path: str | Path) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LayerSpec:
    """One exported intermediate activation.

    Attributes:
        name: module path in the eager model (``layer4``, ``features.7``).
        output: graph output name carrying its activations (``act_layer4``).
        shape: ``(C, h, w)`` of the activations at the manifest's input size.
        layout: what the eager layer returns, which the graph turns into that map
            (:func:`handlers.explain.tokens.to_grid`): ``nchw`` (a map, as is; omitted from the JSON),
            ``nhwc`` (a channel-last map, e.g. a Swin stage, permuted) or ``tokens`` (a ViT block's
            ``(N, T, C)``, leading class/register tokens dropped, reshaped to the patch grid).
    """

    name: str
    output: str
    shape: tuple[int, int, int]
    layout: str = "nchw"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} of layer {self.name!r} (valid: {', '.join(LAYOUTS)})")


@dataclass(frozen=True)
class Defaults:
    """Per-model defaults of the request options (see ``handlers.options``)."""

    top_k: int = 5
    format: str = "png"
    upsample: str = "nearest"
    size: str = "input"
    resize: str | int = "model"


@dataclass(frozen=True)
class EagerSpec:
    """The eager model an archive carries for backward-pass explanations (see :mod:`handlers.eager`).

    Attributes:
        architecture: torchvision model name or ``package.module:factory``.
        num_classes: ``num_classes`` passed to the builder (``None``: its default).
        head: module path replaced by ``nn.Identity`` after building (the head an embedding model drops).
        state_dict: file (relative to the manifest) holding the weights.
        code: folder (relative to the manifest) holding the factory's package, put first on ``sys.path``
            while it is imported; ``None`` for torchvision models.
    """

    architecture: str
    state_dict: str
    num_classes: int | None = None
    head: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class QuantizationSpec:
    """How a quantised graph was made and how closely it follows the float graph it came from.

    Written by ``lafam-serve export --quantize int8`` (:mod:`export.quantize`); the served graph is
    :attr:`Manifest.model_file`, whose outputs are float32 like any other graph's, so serving reads nothing
    here: it is provenance and the figures the export was held to.

    Attributes:
        dtype: ``int8``.
        format: ``QDQ`` (QuantizeLinear / DequantizeLinear pairs around float operators, which ONNX Runtime
            fuses into integer kernels).
        method: the tool that quantised the graph (``onnxruntime.quantization.quantize_static``).
        onnxruntime_version: its version.
        weight_type: ``QInt8``; ``per_channel`` and ``reduce_range`` (7-bit weights) as used.
        activation_type: ``QUInt8`` or ``QInt8``.
        per_channel: weights quantised per output channel.
        reduce_range: weights quantised to 7 bits (no saturation on CPUs without VNNI).
        calibrate_method: ONNX Runtime's calibration method (``MinMax``).
        calibration: ``source`` (what the images were), ``images`` (how many calibrated the ranges),
            ``preprocessing`` (as served).
        agreement: the main output against the float graph's on held-out images: ``metric``
            (``top1_agreement`` or, for an embedding, ``cosine_similarity``), ``value`` (the fraction of equal
            top-1 classes; the median cosine), ``min`` (cosine only), ``threshold``, ``images``.
        maps: per activation output (``act_<layer>``): ``layer``, the Spearman rank correlation of the INT8 and
            float LaFAM maps per held-out image at native resolution, ``median`` and ``min``, ``threshold``
            (on the median) and ``images``.
        float_model: the float graph the quantised one was made from: ``file``, ``sha256`` (not archived).
    """

    dtype: str
    format: str
    method: str
    onnxruntime_version: str
    weight_type: str
    activation_type: str
    per_channel: bool
    reduce_range: bool
    calibrate_method: str
    calibration: dict[str, Any]
    agreement: dict[str, Any]
    maps: dict[str, dict[str, Any]]
    float_model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in QUANTIZED_DTYPES:
            problems.append(f"dtype {self.dtype!r} (valid: {', '.join(QUANTIZED_DTYPES)})")
        if self.format not in QUANTIZED_FORMATS:
            problems.append(f"format {self.format!r} (valid: {', '.join(QUANTIZED_FORMATS)})")
        for name in ("per_channel", "reduce_range"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} {getattr(self, name)!r} (need true or false)")
        for name in ("calibration", "agreement", "maps", "float_model"):
            if not isinstance(getattr(self, name), dict):
                problems.append(f"{name} (need an object)")
        if isinstance(self.agreement, dict):
            if self.agreement.get("metric") not in AGREEMENT_METRICS:
                problems.append(
                    f"agreement.metric {self.agreement.get('metric')!r} (valid: {', '.join(AGREEMENT_METRICS)})"
                )
            if not all(_is_number(self.agreement.get(key)) for key in ("value", "threshold")):
                problems.append("agreement (need numbers 'value' and 'threshold')")
        if isinstance(self.maps, dict):
            for output, figures in self.maps.items():
                if not isinstance(figures, dict) or not all(
                    _is_number(figures.get(key)) for key in ("median", "min", "threshold")
                ):
                    problems.append(f"maps.{output} (need numbers 'median', 'min' and 'threshold')")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Manifest:
    """Everything the handler needs to serve an exported graph.

    Attributes:
        name: model name (also the ``model`` label of the metrics).
        task: ``classification`` (main output are logits) or ``embedding`` (main output is a vector).
        backend: ``onnx`` or ``torchscript``.
        model_file: graph file name, relative to the manifest's folder.
        input_size: ``(H, W)`` the graph expects.
        mean: per-channel mean of the normalisation, RGB, on [0, 1] pixel values.
        std: per-channel standard deviation of the normalisation.
        main_output: graph output name of the logits / embedding.
        layers: exported activations, the first one is the default explanation layer.
        labels: class names (classification only; may be empty, then indices are reported as labels).
        num_outputs: number of classes, or the embedding dimension.
        defaults: request option defaults.
        max_pixels: largest decoded image (width x height) accepted.
        checksums: SHA-256 of the files next to the manifest, by file name.
        verification: max |eager - exported| per output and the tolerance it was held to.
        source: provenance (model spec, weights checksum, torch version, opset).
        eager: the eager model shipped for backward-pass explanations, or ``None``.
        dynamic_size: the graph takes any input height and width (``export --dynamic-size``, verified against
            eager at ``input_size`` and at another, non-square size); ``False`` (older manifests too): only
            ``input_size``, every image is resized to it.
        min_side: the smallest input side a dynamic graph is served at (its total stride, or larger where the
            model needs it); ``None`` where not recorded.
        quantization: how the graph was quantised (``export --quantize int8``, ONNX only) and the agreement
            figures it passed, or ``None`` (older manifests too): a float graph. ``verification`` then describes
            the float graph it was quantised from (``quantization.float_model``).
        schema_version: manifest format version.
    """

    name: str
    task: Task
    backend: BackendName
    model_file: str
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    main_output: str
    layers: tuple[LayerSpec, ...]
    num_outputs: int
    labels: tuple[str, ...] = ()
    defaults: Defaults = field(default_factory=Defaults)
    max_pixels: int = 40_000_000
    checksums: dict[str, str] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    eager: EagerSpec | None = None
    dynamic_size: bool = False
    min_side: int | None = None
    quantization: QuantizationSpec | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        problems = []
        if self.schema_version != SCHEMA_VERSION:
            problems.append(f"schema_version {self.schema_version} (this handler reads {SCHEMA_VERSION})")
        if self.task not in TASKS:
            problems.append(f"task {self.task!r} (valid: {', '.join(TASKS)})")
        if self.backend not in BACKENDS:
            problems.append(f"backend {self.backend!r} (valid: {', '.join(BACKENDS)})")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            problems.append(f"input_size {self.input_size!r} (need [H, W], positive)")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append("mean/std (need 3 values each, std > 0)")
        if not self.layers:
            problems.append("layers (need at least one exported activation)")
        if not _is_positive_int(self.num_outputs):
            problems.append(f"num_outputs {self.num_outputs!r} (need a positive integer)")
        if self.labels and len(self.labels) != self.num_outputs:
            problems.append(f"labels ({len(self.labels)} labels for {self.num_outputs} outputs)")
        if self.task == "embedding" and self.labels:
            problems.append("labels (an embedding model has no labels)")
        if not _is_positive_int(self.max_pixels):
            problems.append(f"max_pixels {self.max_pixels!r} (need a positive integer)")
        if not isinstance(self.dynamic_size, bool):
            problems.append(f"dynamic_size {self.dynamic_size!r} (need true or false)")
        if self.min_side is not None and not _is_positive_int(self.min_side):
            problems.append(f"min_side {self.min_side!r} (need a positive integer or null)")
        if not isinstance(self.checksums, dict):
            problems.append(f"checksums {self.checksums!r} (need an object {{file name: sha256}})")
        if self.quantization is not None:
            if self.backend != "onnx":
                problems.append(f"quantization (an ONNX graph only, not backend {self.backend!r})")
            outputs = {spec.output for spec in self.layers}
            if isinstance(self.quantization.maps, dict) and set(self.quantization.maps) != outputs:
                problems.append(
                    f"quantization.maps (figures for {sorted(self.quantization.maps)}, layers {sorted(outputs)})"
                )
        if problems:
            raise ManifestError("invalid manifest: " + "; ".join(problems))

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Names of the exported layers, default first."""
        return tuple(spec.name for spec in self.layers)

    def layer(self, name: str | None) -> LayerSpec:
        """Return the spec of layer ``name`` (the default layer when ``None``)."""
        if name is None:
            return self.layers[0]
        for spec in self.layers:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def label(self, index: int) -> str:
        """Return the class name of ``index`` (its decimal string when there are no labels)."""
        return self.labels[index] if self.labels else str(index)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (a layer's default ``nchw`` layout is left out)."""
        data = asdict(self)
        if data["quantization"] is None:  # a float graph's manifest reads as before the field existed
            del data["quantization"]
        for layer in data["layers"]:
            if layer["layout"] == "nchw":
                del layer["layout"]
        return data

    def dump(self, path: str | Path) -> None:
        """Write the manifest as pretty JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Build a manifest from parsed JSON, naming the field that is wrong.

        Raises:
            ManifestError: when a field is missing, unknown or of the wrong type.
        """
        if not isinstance(data, dict):
            raise ManifestError("invalid manifest: expected a JSON object")
        known = {spec.name: spec for spec in fields(cls)}
        required = [name for name, spec in known.items() if spec.default is MISSING and spec.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ManifestError(f"invalid manifest: missing field(s) {', '.join(map(repr, missing))}")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ManifestError(f"invalid manifest: unknown field(s) {', '.join(map(repr, unknown))}")
        values = dict(data)
        for name, convert in _CONVERTERS.items():
            if name not in values:
                continue
            try:
                values[name] = convert(values[name])
            except KeyError as exc:
                raise ManifestError(f"invalid manifest: field {name!r}: missing key {exc}") from exc
            except (TypeError, ValueError) as exc:
                raise ManifestError(f"invalid manifest: field {name!r}: {exc}") from exc
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path, verify_checksums: bool = True) -> Manifest:
        """Read ``path`` (a manifest file or the folder holding ``lafam.json``) and validate it.

        Args:
            path: the manifest file, or its folder.
            verify_checksums: also check the SHA-256 of every file listed in ``checksums``.

        Raises:
            ManifestError: when the file is missing or invalid, or a checksum does not match.
        """
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ManifestError(f"manifest not found: {path}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from exc
        manifest = cls.from_dict(data)
        if manifest.eager is not None and manifest.eager.state_dict not in manifest.checksums:
            raise ManifestError(f"invalid manifest: eager.state_dict {manifest.eager.state_dict!r} is not in checksums")
        if manifest.quantization is not None and manifest.model_file not in manifest.checksums:
            raise ManifestError(f"invalid manifest: the quantised graph {manifest.model_file!r} is not in checksums")
        if verify_checksums:
            for file_name, expected in manifest.checksums.items():
                target = path.parent / file_name
                if not target.exists():
                    raise ManifestError(f"file {file_name} listed in the manifest is missing from {path.parent}")
                if sha256_file(target) != expected:
                    raise ManifestError(f"checksum mismatch for {file_name}: the archive is corrupt or was edited")
        return manifest


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _layers(value: Any) -> tuple[LayerSpec, ...]:
    return tuple(
        LayerSpec(
            name=str(s["name"]),
            output=str(s["output"]),
            shape=tuple(int(v) for v in s["shape"]),
            layout=str(s.get("layout", "nchw")),
        )
        for s in value
    )


# How each JSON field becomes its dataclass value; a failure is reported with the field's name.
_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "input_size": lambda value: tuple(int(v) for v in value),
    "mean": lambda value: tuple(float(v) for v in value),
    "std": lambda value: tuple(float(v) for v in value),
    "labels": lambda value: tuple(str(v) for v in value),
    "layers": _layers,
    "defaults": lambda value: Defaults(**value),
    "eager": lambda value: None if value is None else EagerSpec(**value),
    "quantization": lambda value: None if value is None else QuantizationSpec(**value),
}
