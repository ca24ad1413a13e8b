"""Turn a model spec into an eager module, find its explanation layer, and expose its activations.

A spec is either a torchvision classification model name (``resnet50``) or ``package.module:factory``
for a user's own ``nn.Module``. Models are always built with ``weights=None``: trained parameters come
only from an explicit state_dict file, so nothing is ever downloaded.
"""

from __future__ import annotations

import copy
import functools
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

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
from handlers.explain.tokens import MAX_EXTRA, Layout, grid_layout, map_layout, to_grid
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


class _Fired(NamedTuple):
    """One module's forward hook firing during a probe: in firing order, so a module fires after its children."""

    index: int
    name: str
    module: nn.Module
    input: object
    output: object
    leaf: bool


_NORMALISERS: tuple[type[nn.Module], ...] = (nn.LayerNorm,)
"""Modules normalising each position over its channels: their output's channel mean is the same everywhere."""
_INFLUENCE_SEED = 0
_STEM_SHARE = 0.5


def _probe(model: nn.Module, input_size: tuple[int, int], *, grad: bool) -> tuple[list[_Fired], Tensor]:
    """Run one dummy image (eval mode) with a hook on every submodule; return what fired and the output.

    Without ``grad`` the image is blank and nothing is recorded for autograd; with it the image is seeded
    noise that requires grad, so that the outputs recorded stay connected to the model's output. Hooks are
    removed and each module's train/eval mode restored afterwards.

    Raises:
        ModelSpecError: the forward pass fails.
    """
    fired: list[_Fired] = []

    def record(name: str, module: nn.Module, args: tuple[object, ...], output: object) -> None:
        leaf = next(module.children(), None) is None
        fired.append(_Fired(len(fired), name, module, args[0] if args else None, output, leaf))

    modes = {module: module.training for module in model.modules()}
    handles = [
        module.register_forward_hook(functools.partial(record, name)) for name, module in model.named_modules() if name
    ]
    parameter = next(model.parameters(), None)
    options = {
        "dtype": parameter.dtype if parameter is not None else torch.float32,
        "device": parameter.device if parameter is not None else "cpu",
    }
    if grad:
        noise = torch.randn(1, 3, *input_size, generator=torch.Generator().manual_seed(_INFLUENCE_SEED))
        dummy = noise.to(**options).requires_grad_(True)
    else:
        dummy = torch.zeros(1, 3, *input_size, **options)
    try:
        model.eval()
        with torch.set_grad_enabled(grad):
            output = model(dummy)
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
    return fired, output


def _normalised(fired: Sequence[_Fired]) -> set[int]:
    """Ids of the outputs that are a LayerNorm's output, or a parameter-free reshaping of one (Swin's permute)."""
    ids: set[int] = set()
    for record in fired:
        if not isinstance(record.output, Tensor):
            continue
        if isinstance(record.module, _NORMALISERS) or (
            record.leaf
            and id(record.input) in ids
            and next(record.module.parameters(), None) is None
            and record.output.numel() == record.input.numel()  # type: ignore[union-attr]
        ):
            ids.add(id(record.output))
    return ids


def _ambiguity_hint(fired: Sequence[_Fired], input_size: tuple[int, int]) -> str | None:
    """``"nhwc"`` when most blocks (non-leaf modules) with an unambiguous 4-D map output are channel-last."""
    counts = dict.fromkeys(("nchw", "nhwc"), 0)
    for record in fired:
        output = record.output
        if record.leaf or not isinstance(output, Tensor) or output.dim() != 4:
            continue
        try:
            first, last = grid_layout(output.shape, input_size), grid_layout(output.shape, input_size, hint="nhwc")
        except ValueError:
            continue
        if first.kind == last.kind:
            counts[first.kind] += 1
    return "nhwc" if counts["nhwc"] > counts["nchw"] else None


def _macs(record: _Fired) -> int:
    """Multiply-accumulates of a convolution, linear layer or multi-head attention's projections (estimate)."""
    output, module = record.output, record.module
    if isinstance(module, nn.MultiheadAttention) and isinstance(output, tuple) and isinstance(output[0], Tensor):
        return 4 * output[0].numel() * module.embed_dim
    if not isinstance(output, Tensor):
        return 0
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return 0


def _spatial_work(record: _Fired) -> int:
    """:func:`_macs` of work on maps or token sequences (outputs of 3 or more dims); heads on vectors excluded."""
    output = record.output[0] if isinstance(record.output, tuple) and record.output else record.output
    counted = isinstance(output, Tensor) and output.dim() >= 3
    return _macs(record) if counted and (record.leaf or isinstance(record.module, nn.MultiheadAttention)) else 0


class _Candidate(NamedTuple):
    record: _Fired
    layout: Layout


def _candidates(
    fired: Sequence[_Fired], input_size: tuple[int, int]
) -> tuple[list[_Candidate], list[tuple[_Fired, str]]]:
    """Outputs a default layer may be taken from, in firing order, and the other map-like outputs with why not.

    A candidate is a module output other than a pooling layer's and a LayerNorm's (or a parameter-free
    reshaping of one) whose layout (:func:`~handlers.explain.tokens.map_layout`) has a grid larger than 1x1.
    Channel-last maps and token outputs count only from blocks (modules with children), not from the linear
    layers inside them.
    """
    normalised = _normalised(fired)
    hint = _ambiguity_hint(fired, input_size)
    chosen: list[_Candidate] = []
    rejected: list[tuple[_Fired, str]] = []
    for record in fired:
        output = record.output
        if not isinstance(output, Tensor) or output.dim() not in (3, 4) or isinstance(record.module, _POOLING_LAYERS):
            continue
        if id(output) in normalised:
            rejected.append((record, "a LayerNorm's output: its channel mean is the same at every position"))
            continue
        try:
            layout = map_layout(output.shape, input_size, hint)
        except ValueError as exc:
            rejected.append((record, str(exc)))
            continue
        if layout.grid[0] * layout.grid[1] > 1 and (layout.kind == "nchw" or not record.leaf):
            chosen.append(_Candidate(record, layout))
    return chosen, rejected


def _patches(output: Tensor, layout: Layout) -> Tensor:
    """The part of an output (or its gradient) that lies on the grid: tokens without the extra ones."""
    return output[:, layout.extra :] if layout.kind == "tokens" else output


def _last_influential(candidates: Sequence[_Candidate], fired: Sequence[_Fired], output: object) -> _Candidate:
    """The last candidate whose grid positions reach the model's output.

    A class-token ViT's head reads token 0 only, so the patch tokens of its last block never reach the logits
    (nor does anything computed from them): LaFAM there maps activations the prediction never used, and
    Grad-CAM is zero. The reference is the input of the final ``nn.Linear`` (a head initialised to zero, as
    torchvision's ViT head is, would hide every gradient) or else the model's output; a seeded random
    projection of it is differentiated w.r.t. the channel-last and token candidates. Channel-first maps (CNN
    stages) are taken as they are.
    """
    if candidates[-1].layout.kind == "nchw":
        return candidates[-1]
    leaves = [record for record in fired if record.leaf]
    last = leaves[-1] if leaves else None
    reference = last.input if last is not None and isinstance(last.module, nn.Linear) else output
    if isinstance(reference, tuple | list) and reference:
        reference = reference[0]
    probed = [c for c in candidates if c.layout.kind != "nchw" and c.record.output.requires_grad]  # type: ignore[union-attr]
    if not isinstance(reference, Tensor) or not reference.requires_grad or not probed:
        return candidates[-1]
    weights = torch.randn(reference.shape, generator=torch.Generator().manual_seed(_INFLUENCE_SEED))
    scalar = (reference * weights.to(reference)).sum()
    grads = torch.autograd.grad(scalar, [c.record.output for c in probed], allow_unused=True)
    reaches = {
        id(c.record.output)
        for c, g in zip(probed, grads, strict=True)
        if g is not None and bool(_patches(g, c.layout).abs().amax() > 0)
    }
    for candidate in reversed(candidates):
        if candidate.layout.kind == "nchw" or id(candidate.record.output) in reaches:
            return candidate
    return candidates[-1]


def _refuse_stem(
    chosen: _Candidate, fired: Sequence[_Fired], rejected: Sequence[tuple[_Fired, str]], name: str
) -> None:
    """Raise when most of the model's work on maps and tokens runs after ``chosen`` (a stem, a patch embedding)."""
    total = sum(_spatial_work(record) for record in fired)
    after = sum(_spatial_work(record) for record in fired if record.index > chosen.record.index)
    if total == 0 or after <= _STEM_SHARE * total:
        return
    later = [(record, why) for record, why in rejected if record.index > chosen.record.index]
    blocks = [(record, why) for record, why in later if not record.leaf and "LayerNorm" not in why]
    example = (blocks or later or [None])[-1]
    seen = f" (e.g. {example[0].name!r}: {example[1]})" if example is not None else ""
    raise ModelSpecError(
        f"the default layer would be {name!r} ({type(chosen.record.module).__name__}), the model's stem or patch "
        f"embedding: {after / total:.0%} of its convolution/linear work on maps and tokens runs after it, in "
        f"modules whose outputs are not spatial maps LaFAM can read{seen}; a map there shows the input's "
        f"patches, not what the model computed. Pass the layer to explain with --layer (layers=[...] in "
        f"Python): a later module whose output is (N, C, h, w), (N, h, w, C), or tokens (N, T, C) with at "
        f"most {MAX_EXTRA} leading class/register tokens before an h x w grid of patches"
    )


def find_default_layer(model: nn.Module, input_size: tuple[int, int] = (224, 224)) -> str:
    """Find the default LaFAM layer: the last convolutional stage, or the last transformer block that counts.

    One dummy forward pass (batch 1, eval mode) records every submodule's output. Candidates are outputs
    with a spatial grid above 1x1 (see :func:`_candidates`): channel-first maps ``(N, C, h, w)`` of any
    module, and channel-last maps ``(N, h, w, C)`` (Swin stages) or tokens ``(N, T, C)`` on the input's patch
    grid (ViT blocks, see :func:`handlers.explain.tokens.grid_layout`) of blocks; never a pooling layer's, nor
    a LayerNorm's (a per-position normalisation over channels makes the channel mean flat: the final
    ``encoder.ln`` of a ViT, the ``norm``/``permute`` after Swin's last stage). The candidate whose hook fires
    last wins, except that channel-last and token candidates must reach the model's output (one extra
    forward and backward, see :func:`_last_influential`): the last block of a class-token ViT does not, so
    the block before it is taken. Among modules that returned that very tensor (a Sequential and its last
    child) the shallowest name is taken; for a transformer block (channel-last or tokens), its MLP's
    activation on the same grid is taken instead when there is one (:func:`_block_activation`: the residual
    stream's channel mean has no meaningful sign). Hooks are removed and each module's train/eval mode is
    restored afterwards, so the model is left as it was.

    Args:
        model: the eager model.
        input_size: ``(H, W)`` of the dummy input; use the size the model will be served at.

    Returns:
        A module path such as ``layer4`` (resnet), ``features`` (vgg, densenet, mobilenet, convnext),
        ``features.7.1.mlp.1`` (swin_t: its last block's GELU) or ``encoder.layers.encoder_layer_10.mlp.1``
        (vit_b_16, whose class token only leaves its last block: the GELU of the block before).

    Raises:
        ModelSpecError: when the forward pass fails, no module qualifies, or the default would be the stem or
            patch embedding (more than half of the work on maps and tokens runs after it, e.g. a ViT whose
            token grid is not recognised): then the message asks for the layer.
    """
    size = check_input_size(input_size)
    fired, output = _probe(model, size, grad=False)
    candidates, rejected = _candidates(fired, size)
    if candidates and candidates[-1].layout.kind != "nchw":
        fired, output = _probe(model, size, grad=True)  # again, connected to the output, to see what reaches it
        candidates, rejected = _candidates(fired, size)
    if not candidates:
        raise ModelSpecError(
            f"no module returns a 4-D activation larger than 1x1 (nor tokens on the input's patch grid) at "
            f"input_size={input_size}; use a larger input_size or pass the layers explicitly"
        )
    chosen = _last_influential(candidates, fired, output)
    same = [record.name for record in fired if record.output is chosen.record.output]
    name = min(same, key=lambda name: name.count("."))
    _refuse_stem(chosen, fired, rejected, name)
    if chosen.layout.kind == "nchw":
        return name
    return _block_activation(chosen, fired, max(same, key=lambda name: name.count(".")), size) or name


_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.GELU, nn.ReLU, nn.SiLU, nn.Hardswish, nn.Mish)
"""Element-wise activations whose output is (nearly) non-negative, as LaFAM's channel mean assumes."""


def _block_activation(
    chosen: _Candidate, fired: Sequence[_Fired], block: str, input_size: tuple[int, int]
) -> str | None:
    """The last activation module inside the transformer ``block`` on the same grid as its output, if any.

    LaFAM averages channels that are non-negative after a ReLU in a CNN. A transformer block's output is the
    residual stream, signed, where the sign of the channel mean means nothing (on the project's demo ViT the
    block output's LaFAM scores an AUC of 0.15 against the object masks: inverted; its MLP's GELU 0.61). The
    MLP's hidden activation (the GELU of a ViT or Swin block, ``(N, T, 4C)`` or ``(N, h, w, 4C)``) is the
    block's only non-negative per-position activation, so it is taken when it lies on the block's own grid.
    """
    hint = _ambiguity_hint(fired, input_size)
    for record in reversed(fired[: chosen.record.index]):
        if not record.name.startswith(block + ".") or not isinstance(record.module, _ACTIVATIONS):
            continue
        if not isinstance(record.output, Tensor) or record.output.dim() not in (3, 4):
            continue
        try:
            layout = map_layout(record.output.shape, input_size, hint)
        except ValueError:
            continue
        if layout.kind == chosen.layout.kind and layout.grid == chosen.layout.grid:
            return record.name
    return None


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
    """A deep copy of a model whose forward also returns the activations of chosen layers, as maps.

    ``forward(x)`` returns ``(main_output, act_layer1, act_layer2, ...)``, each activation ``(N, C, h, w)``.
    Forward hooks on the copy's submodules record each layer's output during the call; nothing is registered
    on the model passed in. A layer's output is turned into a map inside the forward (so inside the exported
    graph), by :func:`handlers.explain.tokens.to_grid`: a channel-first map as is, a channel-last map (Swin
    stage, ``(N, h, w, C)``) permuted, tokens (ViT block, ``(N, T, C)``) without their leading class/register
    tokens reshaped to the patch grid (its size follows the input: ``H // stride`` by ``W // stride``). Each
    layer's :class:`~handlers.explain.tokens.Layout` is decided from its output's shape at the first forward
    (or at construction, given ``input_size``) and kept in :attr:`layouts`. Each activation is cloned when its
    layer returns, so a later in-place op (densenet applies an in-place ReLU to ``features``) cannot change it
    and eager, TorchScript and ONNX agree on what a layer's activation is. The wrapper traces with
    ``torch.jit.trace`` and exports with ``torch.onnx.export``. One forward at a time: it is not thread-safe.

    Args:
        model: the eager model (left untouched).
        layers: module paths (as in ``model.named_modules()``) whose outputs are returned as maps.
        input_size: ``(H, W)``: decide the layouts now, with one dummy forward in which an ambiguous 4-D shape
            (e.g. ``(N, 56, 56, 56)``) is settled by the layout most of the model's blocks have. Without it
            they are decided at the first forward, an ambiguous shape as NCHW.
        hints: ``"nchw"`` or ``"nhwc"`` by layer name, to settle an ambiguous 4-D shape explicitly.

    Raises:
        ModelSpecError: for an empty or duplicated layer list, or an unknown layer name; with ``input_size``,
            a layer whose output is not a map nor a token grid.

    Example:
        >>> wrapped = ActivationModel(torchvision.models.resnet18(), ["layer4"])
        >>> logits, layer4 = wrapped(torch.zeros(1, 3, 224, 224))
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        *,
        input_size: tuple[int, int] | None = None,
        hints: Mapping[str, str] | None = None,
    ) -> None:
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
        bad = {k: v for k, v in (hints or {}).items() if k not in names or v not in ("nchw", "nhwc")}
        if bad:
            raise ModelSpecError(f"hints={bad!r}: give 'nchw' or 'nhwc' for layers in {names}")
        self.model = copy.deepcopy(model)
        self.layers: tuple[str, ...] = tuple(names)
        self.hints: dict[str, str] = dict(hints or {})
        self.layouts: dict[str, Layout] = {}
        """Each layer's output layout (decided at construction with ``input_size``, else at the first forward)."""
        self._recording: dict[str, Tensor] | None = None
        self._input_size: tuple[int, int] | None = None
        for name in names:
            # A bound method in a partial (not a closure) so that deep copies of this wrapper hook their own copy.
            self.model.get_submodule(name).register_forward_hook(functools.partial(self._record, name))
        self.eval()
        if input_size is not None:
            self._decide_layouts(check_input_size(input_size))

    def _decide_layouts(self, size: tuple[int, int]) -> None:
        fired, _ = _probe(self.model, size, grad=False)
        hint = _ambiguity_hint(fired, size)
        outputs = {record.name: record for record in fired if record.name in self.layers}
        for name in self.layers:
            record = outputs.get(name)
            if record is not None:
                self.layouts[name] = self._layout(name, record.module, record.output, size, hint)

    def _layout(
        self, name: str, module: nn.Module, output: object, size: tuple[int, int], hint: str | None = None
    ) -> Layout:
        if not isinstance(output, Tensor) or output.dim() not in (3, 4):
            why = ""
        else:
            try:
                return map_layout(output.shape, size, self.hints.get(name, hint))
            except ValueError as exc:
                why = f" ({exc})"
        raise ModelSpecError(
            f"layer {name!r} ({type(module).__name__}) returns {describe(output)}; LaFAM needs a spatial activation: "
            f"(N, C, h, w), (N, h, w, C), or tokens (N, T, C) on the input's patch grid: choose a convolutional "
            f"module or a transformer block{why}"
        )

    def _record(self, name: str, module: nn.Module, args: object, output: object) -> None:
        if self._recording is None:
            return
        layout = self.layouts.get(name)
        if layout is None or not isinstance(output, Tensor) or output.dim() != (3 if layout.kind == "tokens" else 4):
            assert self._input_size is not None
            layout = self._layout(name, module, output, self._input_size)
            self.layouts[name] = layout
        size = self._input_size if layout.kind == "tokens" else None
        self._recording[name] = to_grid(output, layout, size).clone()  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Run the model on ``x`` and return its output followed by each layer's activations as maps."""
        self._recording = {}
        self._input_size = x.shape[-2:]  # type: ignore[assignment]  # traced as sizes, not constants
        try:
            main = self.model(x)
            recorded = self._recording
        finally:
            self._recording = None
            self._input_size = None
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
        """Return ``(C, h, w)`` of each layer's activations (as maps) for an input of ``(H, W)``."""
        height, width = check_input_size(input_size)
        parameter = next(self.parameters(), None)
        dummy = torch.zeros(1, 3, height, width, device=parameter.device if parameter is not None else "cpu")
        with torch.no_grad():
            _, *activations = self(dummy)
        return {
            name: (int(act.shape[1]), int(act.shape[2]), int(act.shape[3]))
            for name, act in zip(self.layers, activations, strict=True)
        }
