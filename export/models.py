"""Turn a model spec into an eager module, find its explanation layer, and expose its activations.

A spec is either a torchvision classification model name (``resnet50``) or ``package.module:factory``
for a user's own ``nn.Module``. Models are always built with ``weights=None``: trained parameters come
only from an explicit state_dict file, so nothing is ever downloaded.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from handlers.eager import (
    ArchitectureError,
    build_architecture,
    close_matches,
    describe,
    head_path,
    strip_head,
)
from handlers.manifest import TASKS

_POOLING_LAYERS: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.LPPool1d,
    nn.LPPool2d,
    nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
)


class ModelSpecError(ArchitectureError):
    """A model spec, its weights or a layer name cannot be used; the message names the argument and the fix."""


def _shorten(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def resolve_model(
    spec: str,
    *,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    task: str = "classification",
) -> nn.Module:
    """Build the eager model a spec names, load its weights, and put it in eval mode.

    For ``task="embedding"`` a torchvision model loses its final classification layer: the last child of
    its head (``fc``, ``classifier``, ``head`` or ``heads``), which must be a ``Linear``, becomes an
    ``nn.Identity``. The embedding is therefore the input of the final linear layer: the pooled features
    for resnet, densenet and efficientnet (512/2048, 1024, 1280), the layer-normalised pooled features for
    convnext (768), and the hidden fully connected layer for vgg (4096) and mobilenet_v3 (1024/1280), whose
    heads have one. Weights are loaded before the head is removed, so a classifier checkpoint (with
    ``num_classes`` set to its class count) or an encoder-only checkpoint (no head keys) both work. A
    ``package.module:factory`` model is used as returned: for embeddings the factory returns the encoder.

    Args:
        spec: a torchvision classification model name (``resnet50``) or ``package.module:factory``, where
            ``factory`` is a callable (function or class) returning an ``nn.Module``.
        num_classes: number of classes of the classification head; ``None`` keeps the model's default.
            Given with a factory, the factory must take a ``num_classes`` argument (it is never dropped
            silently).
        weights: a file holding a state_dict (``torch.save(model.state_dict(), path)``), possibly wrapped
            under a ``"state_dict"`` or ``"model"`` key and with the ``module.`` prefix of DataParallel
            removed; loaded strictly. ``None`` keeps the random initialisation.
        task: ``classification`` or ``embedding``.

    Returns:
        The model, in eval mode.

    Raises:
        ModelSpecError: for an unknown name, a malformed spec, an import failure, a factory that does not
            return an ``nn.Module``, or weights that do not match the model.

    Example:
        >>> model = resolve_model("resnet18", num_classes=10)
    """
    if task not in TASKS:
        raise ModelSpecError(f"task={task!r} is not supported; use one of: {', '.join(TASKS)}")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ModelSpecError(f"num_classes={num_classes!r} must be a positive integer, or None for the default")
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"spec={spec!r} must be a torchvision model name or 'package.module:factory'")
    spec = spec.strip()
    from_torchvision = ":" not in spec
    try:
        model = build_architecture(spec, num_classes)
        head = head_path(model, spec) if from_torchvision and task == "embedding" else None
    except ArchitectureError as exc:
        raise ModelSpecError(str(exc)) from exc
    if weights is not None:
        state = _read_state_dict(weights)
        if head is not None and not any(key.startswith(head + ".") for key in state):
            strip_head(model, head)  # an encoder-only checkpoint: drop the head first so it loads strictly
            head = None
        _load_state_dict(model, state, spec=spec, weights=weights)
    if head is not None:
        strip_head(model, head)
    return model.eval()


def _read_state_dict(weights: str | Path) -> dict[str, Tensor]:
    path = Path(weights)
    if not path.is_file():
        raise ModelSpecError(
            f"weights={str(weights)!r} is not a file; pass the path of a saved state_dict "
            f"(torch.save(model.state_dict(), path))"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelSpecError(
            f"weights={str(weights)!r} cannot be read with torch.load(weights_only=True) ({exc}); save a "
            f"state_dict with torch.save(model.state_dict(), path), not a pickled model"
        ) from exc
    if isinstance(loaded, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.items()
    ):
        raise ModelSpecError(
            f"weights={str(weights)!r} does not hold a state_dict (a mapping of parameter names to tensors, "
            f"possibly under 'state_dict' or 'model'); save one with torch.save(model.state_dict(), path)"
        )
    state = dict(loaded)
    # The per-module versions torch.save keeps beside the tensors: some modules (torchvision's MNASNet) refuse
    # to load without them, and a copy of the mapping would drop them.
    metadata = getattr(loaded, "_metadata", None)
    prefix = "module."  # left by DataParallel / DistributedDataParallel
    if state and all(key.startswith(prefix) for key in state):
        state = {key[len(prefix) :]: value for key, value in state.items()}
        if metadata is not None:
            metadata = {  # "module" (the wrapped model itself) becomes "", "module.x" becomes "x"
                key.removeprefix("module").removeprefix("."): value
                for key, value in metadata.items()
                if key == "module" or key.startswith(prefix)
            }
    result = OrderedDict(state)
    if metadata is not None:
        result._metadata = metadata  # type: ignore[attr-defined]  # as Module.state_dict sets it
    return result


def _load_state_dict(model: nn.Module, state: dict[str, Tensor], *, spec: str, weights: str | Path) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [key for key in expected if key in state and tuple(state[key].shape) != tuple(expected[key].shape)]
    if not (missing or unexpected or wrong_shape):
        model.load_state_dict(state, strict=True)
        return
    problems = []
    if missing:
        problems.append(f"missing keys: {_shorten(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_shorten(unexpected)}")
    if wrong_shape:
        shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})" for k in wrong_shape]
        problems.append(f"shape mismatch: {_shorten(shapes, 4)}")
    hint = "check that spec and num_classes are the ones the checkpoint was trained with"
    head_keys = [key for key in wrong_shape if key in list(expected)[-2:]]
    if head_keys:
        classes = state[head_keys[-1]].shape[0]
        hint = f"the classification head differs: pass num_classes={classes} if the checkpoint has {classes} classes"
    raise ModelSpecError(f"weights={str(weights)!r} do not match model {spec!r}: {'; '.join(problems)}; {hint}")


def find_default_layer(model: nn.Module, input_size: tuple[int, int] = (224, 224)) -> str:
    """Find the last convolutional stage of a model, the default LaFAM layer.

    One dummy forward pass (batch 1, no grad, eval mode) records every submodule's output. Candidates are
    modules other than pooling layers whose output is a 4-D tensor with a spatial size above 1x1; the
    candidate whose hook fires last wins, and among modules that returned that very tensor (a Sequential
    and its last child) the shallowest name is taken. Hooks are removed and each module's train/eval mode
    is restored afterwards, so the model is left as it was.

    Args:
        model: the eager model.
        input_size: ``(H, W)`` of the dummy input; use the size the model will be served at.

    Returns:
        A module path such as ``layer4`` (resnet) or ``features`` (vgg, densenet, mobilenet, convnext).

    Raises:
        ModelSpecError: when the forward pass fails or no module qualifies.
    """
    height, width = check_input_size(input_size)
    fired: list[tuple[str, Tensor]] = []

    def record(name: str, module: nn.Module, args: object, output: object) -> None:
        if (
            isinstance(output, Tensor)
            and output.dim() == 4
            and output.shape[-2] * output.shape[-1] > 1
            and not isinstance(module, _POOLING_LAYERS)
        ):
            fired.append((name, output))

    modes = {module: module.training for module in model.modules()}
    handles = [
        module.register_forward_hook(functools.partial(record, name)) for name, module in model.named_modules() if name
    ]
    parameter = next(model.parameters(), None)
    dummy = torch.zeros(
        1,
        3,
        height,
        width,
        dtype=parameter.dtype if parameter is not None else torch.float32,
        device=parameter.device if parameter is not None else "cpu",
    )
    try:
        model.eval()
        with torch.no_grad():
            model(dummy)
    except Exception as exc:
        raise ModelSpecError(
            f"the dummy forward pass at input_size={input_size} failed ({exc!r}); check input_size or pass the "
            f"layers explicitly"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if not fired:
        raise ModelSpecError(
            f"no module returns a 4-D activation larger than 1x1 at input_size={input_size}; use a larger "
            f"input_size or pass the layers explicitly"
        )
    last = fired[-1][1]
    same = [name for name, output in fired if output is last]
    return min(same, key=lambda name: name.count("."))


def check_input_size(
    input_size: Sequence[int] | int, *, allow_int: bool = False, error: type[ValueError] = ModelSpecError
) -> tuple[int, int]:
    """Return ``(height, width)`` as ints, or raise ``error`` naming ``input_size``.

    Args:
        input_size: ``(H, W)``; also a single ``N`` for a square input when ``allow_int``.
        allow_int: accept one integer for ``(N, N)``.
        error: the ``ValueError`` subclass to raise.
    """
    size = (input_size, input_size) if allow_int and isinstance(input_size, int) else input_size
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise error(f"input_size={input_size!r} must be (height, width), two positive integers")
    return int(size[0]), int(size[1])


class ActivationModel(nn.Module):
    """A deep copy of a model whose forward also returns the activations of chosen layers.

    ``forward(x)`` returns ``(main_output, act_layer1, act_layer2, ...)``. Forward hooks on the copy's
    submodules record each layer's output during the call; nothing is registered on the model passed in.
    Each activation is cloned when its layer returns, so a later in-place op (densenet applies an in-place
    ReLU to ``features``) cannot change it and eager, TorchScript and ONNX agree on what a layer's
    activation is. The wrapper traces with ``torch.jit.trace`` and exports with ``torch.onnx.export``. One
    forward at a time: it is not thread-safe.

    Args:
        model: the eager model (left untouched).
        layers: module paths (as in ``model.named_modules()``) whose 4-D outputs are returned.

    Raises:
        ModelSpecError: for an empty or duplicated layer list, or an unknown layer name.

    Example:
        >>> wrapped = ActivationModel(torchvision.models.resnet18(), ["layer4"])
        >>> logits, layer4 = wrapped(torch.zeros(1, 3, 224, 224))
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        names = [layers] if isinstance(layers, str) else list(layers)
        if not names:
            raise ModelSpecError("layers is empty; name at least one module, e.g. 'layer4'")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ModelSpecError(f"layers lists {', '.join(duplicates)} more than once; name each layer once")
        valid = [name for name, _ in model.named_modules() if name]
        for name in names:
            if name not in valid:
                close = close_matches(name, valid) or [n for n in valid if "." not in n][:8]
                raise ModelSpecError(
                    f"layer {name!r} is not a module of {type(model).__name__} (valid names include: "
                    f"{', '.join(close)}; see dict(model.named_modules()))"
                )
        self.model = copy.deepcopy(model)
        self.layers: tuple[str, ...] = tuple(names)
        self._recording: dict[str, Tensor] | None = None
        for name in names:
            # A bound method in a partial (not a closure) so that deep copies of this wrapper hook their own copy.
            self.model.get_submodule(name).register_forward_hook(functools.partial(self._record, name))
        self.eval()

    def _record(self, name: str, module: nn.Module, args: object, output: object) -> None:
        if self._recording is None:
            return
        if not isinstance(output, Tensor) or output.dim() != 4:
            raise ModelSpecError(
                f"layer {name!r} ({type(module).__name__}) returns {describe(output)}; LaFAM needs a 4-D "
                f"(N, C, h, w) activation: choose a convolutional module"
            )
        self._recording[name] = output.clone()

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Run the model on ``x`` and return its output followed by each layer's activations."""
        self._recording = {}
        try:
            main = self.model(x)
            recorded = self._recording
        finally:
            self._recording = None
        if not isinstance(main, Tensor):
            raise ModelSpecError(
                f"{type(self.model).__name__} returns {describe(main)}; the model must return one tensor "
                f"(logits or an embedding)"
            )
        silent = [name for name in self.layers if name not in recorded]
        if silent:
            raise ModelSpecError(
                f"layer(s) {', '.join(silent)} did not run during the forward pass; choose modules the model calls"
            )
        return (main, *(recorded[name] for name in self.layers))

    def layer_shapes(self, input_size: tuple[int, int] = (224, 224)) -> dict[str, tuple[int, int, int]]:
        """Return ``(C, h, w)`` of each layer's activations for an input of ``(H, W)``."""
        height, width = check_input_size(input_size)
        parameter = next(self.parameters(), None)
        dummy = torch.zeros(1, 3, height, width, device=parameter.device if parameter is not None else "cpu")
        with torch.no_grad():
            _, *activations = self(dummy)
        return {
            name: (int(act.shape[1]), int(act.shape[2]), int(act.shape[3]))
            for name, act in zip(self.layers, activations, strict=True)
        }
