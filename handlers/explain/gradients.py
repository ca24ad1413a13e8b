"""Gradient base attributions for many classes at once: Grad-CAM and input × gradient.

Both run ONE forward pass and then a batched vector-Jacobian product over the classes (``torch.autograd.grad``
with ``is_grads_batched=True``), in chunks of ``chunk_size`` classes so that memory stays bounded for any number
of classes (K = 1000 included). No Python loop over single classes.

Every base returns maps ``(N, K, h, w)``, one per requested class, at its native resolution (the layer's for
Grad-CAM, the input's for input × gradient); :mod:`handlers.explain.distribution` turns them into attribution
distributions. Any callable with the signature of :data:`Base` (``base(x, classes) -> (N, K, H, W)``) can be used
instead, e.g. an LRP explainer's ``for_classes``.

Classes are given either as a ``(N, K)`` long tensor or as a callable ``select(logits) -> (N, K)``, which lets a
base pick the classes (e.g. top-k plus least likely) from the logits of its own forward pass, so that
prediction and explanation share a single forward.

The model is never modified: hooks live inside ``with`` blocks and are removed on exit, no parameter's
``requires_grad`` is changed, parameter ``.grad`` fields are not touched (gradients are taken with
``torch.autograd.grad`` with respect to the input or the captured activations only).

Example:
    >>> cam = GradCAM(model, "layer4")
    >>> maps = cam(x, torch.tensor([[3, 7]]))          # (1, 2, 7, 7), closed form for a ResNet head
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from .tokens import from_grid, map_layout, to_grid

Base = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A base attribution: ``base(x (N, 3, H, W), classes (N, K) long) -> maps (N, K, h, w)``."""

ClassSpec = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
"""Classes: a ``(N, K)`` long tensor, or ``select(logits (N, C)) -> (N, K)`` applied to the forward's logits."""

_PASS_THROUGH = (nn.Identity, nn.Flatten, nn.Dropout)
_CLOSED_FORM_RTOL = 1e-4


class Attribution(NamedTuple):
    """Maps for K classes, the classes they belong to and the logits of the forward pass that produced them."""

    maps: torch.Tensor
    """``(N, K, h, w)`` float maps."""
    classes: torch.Tensor
    """``(N, K)`` long class indices."""
    logits: torch.Tensor
    """``(N, C)`` detached logits."""


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    """Return the submodule ``layer`` names (dotted path, e.g. ``"layer4"``) or ``layer`` itself.

    Raises:
        ValueError: ``layer`` is not a submodule of ``model``.
    """
    modules = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        if not any(module is layer for module in modules.values()):
            raise ValueError("layer must be a submodule of model; pass model.<layer> or its dotted name")
        return layer
    if not isinstance(layer, str) or layer not in modules or layer == "":
        names = ", ".join(name for name in modules if name and "." not in name)
        raise ValueError(f"layer must name a submodule of model (e.g. {names}), got {layer!r}")
    return modules[layer]


def logits_of(output: object) -> torch.Tensor:
    """The logits of a model output: the tensor itself, or the first element of a tuple/list.

    Raises:
        ValueError: the output is neither a 2-D tensor nor a tuple/list starting with one.
    """
    if isinstance(output, tuple | list) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        raise ValueError("model must return logits (N, C) or a tuple (logits, ...); wrap it so that it does")
    return output


@contextlib.contextmanager
def capture(
    layer: nn.Module, *, input_size: tuple[int, int] | None = None, hint: str | None = None
) -> Iterator[list[torch.Tensor]]:
    """Record the outputs of ``layer`` during the block; the hook is removed on exit, even on error.

    Args:
        layer: the module whose outputs are recorded.
        input_size: ``(H, W)`` of the model's input: record each output as a map ``(N, C, h, w)``
            (:func:`handlers.explain.tokens.map_layout` and :func:`~handlers.explain.tokens.to_grid`: a
            channel-last Swin stage is permuted, a ViT block's tokens lose their class/register tokens and are
            reshaped to the patch grid). The layer's output is then replaced by the same values rebuilt from
            that map (:func:`~handlers.explain.tokens.from_grid`), so the rest of the forward depends on the
            recorded map and gradients w.r.t. it can be taken. ``None``: record outputs as they are.
        hint: ``"nchw"`` or ``"nhwc"`` for an ambiguous 4-D output (e.g. ``(N, 56, 56, 56)``), with
            ``input_size``; the manifest records it as each layer's ``layout``.

    Yields:
        A list that receives the layer's output tensor (or map) at each call.

    Raises:
        ValueError: with ``input_size``, from the forward pass: an output that is no map nor token grid.
    """
    outputs: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: object) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor):
            return None
        if input_size is None:
            outputs.append(output)
            return None
        layout = map_layout(tuple(output.shape), input_size, hint)
        grid = to_grid(output, layout)
        outputs.append(grid)
        return None if layout.kind == "nchw" else from_grid(grid, layout, output)

    handle = layer.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


@contextlib.contextmanager
def _trace_after(model: nn.Module, layer: nn.Module) -> Iterator[list[nn.Module]]:
    """Record the leaf modules that run after ``layer`` (in order); hooks removed on exit."""
    order: list[nn.Module] = []
    seen = [False]

    def mark(_module: nn.Module, _inputs: object, _output: object) -> None:
        seen[0] = True
        order.clear()

    def record(module: nn.Module, _inputs: object, _output: object) -> None:
        if seen[0]:
            order.append(module)

    inside = {id(m) for m in layer.modules()}
    handles = [layer.register_forward_hook(mark)]
    handles += [
        m.register_forward_hook(record)
        for m in model.modules()
        if id(m) not in inside and not any(True for _ in m.children())
    ]
    try:
        yield order
    finally:
        for handle in handles:
            handle.remove()


def _linear_head(order: list[nn.Module]) -> nn.Linear | None:
    """The head Linear if the modules after the layer are only global pooling / pass-through then one Linear."""
    if not order or not isinstance(order[-1], nn.Linear):
        return None
    for module in order[:-1]:
        if isinstance(module, nn.Dropout) and module.training:
            return None
        if isinstance(module, _PASS_THROUGH):
            continue
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
            continue
        return None
    return order[-1]


def _closed_form_holds(head: nn.Linear, acts: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether ``logits == head(mean_hw acts)`` on this batch (the numerical half of the closed-form check)."""
    if acts.dim() != 4 or head.in_features != acts.shape[1] or head.out_features != logits.shape[1]:
        return False
    with torch.no_grad():
        expected = head(acts.mean(dim=(2, 3)))
        scale = float(logits.abs().max().clamp_min(1.0))
        return bool((expected - logits).abs().max() <= _CLOSED_FORM_RTOL * scale)


def _classes(classes: ClassSpec, logits: torch.Tensor) -> torch.Tensor:
    if callable(classes) and not isinstance(classes, torch.Tensor):
        classes = classes(logits.detach())
    return check_classes(classes, logits.shape[0], logits.shape[1])


def check_classes(classes: torch.Tensor, batch: int, num_classes: int) -> torch.Tensor:
    """Validate ``classes`` ``(N, K)`` of integer indices into ``num_classes`` logits; return it as long.

    Raises:
        ValueError: wrong shape, non-integer dtype, empty, or an index out of ``[0, num_classes)``.
    """
    if not isinstance(classes, torch.Tensor) or classes.dim() != 2 or classes.shape[0] != batch:
        shape = tuple(classes.shape) if isinstance(classes, torch.Tensor) else type(classes).__name__
        raise ValueError(f"classes must be a (N={batch}, K) long tensor, got {shape}")
    if classes.dtype.is_floating_point or classes.dtype.is_complex or classes.dtype == torch.bool:
        raise ValueError(f"classes must hold integer indices, got dtype {classes.dtype}; use .long()")
    if classes.shape[1] == 0:
        raise ValueError("classes must name at least one class per image (K >= 1)")
    if classes.min() < 0 or classes.max() >= num_classes:
        raise ValueError(f"classes must be in [0, {num_classes}), got values from {int(classes.min())}")
    return classes.long()


def _check_common(x: torch.Tensor, chunk_size: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float (N, C, H, W) batch, got {getattr(x, 'shape', type(x).__name__)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (classes per batched backward), got {chunk_size!r}")


def _batched_vjp(
    logits: torch.Tensor, wrt: torch.Tensor, classes: torch.Tensor, chunk_size: int, *, keep: bool = False
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(class slice, d logit[n, classes[n, k]] / d wrt)`` as ``(N, k_chunk, *wrt.shape[1:])`` per chunk."""
    n, k = classes.shape
    rows = torch.arange(n, device=logits.device)
    for start in range(0, k, chunk_size):
        part = classes[:, start : start + chunk_size]
        onehot = torch.zeros(part.shape[1], n, logits.shape[1], dtype=logits.dtype, device=logits.device)
        onehot[torch.arange(part.shape[1], device=logits.device)[:, None], rows[None, :], part.T] = 1.0
        last = start + chunk_size >= k and not keep
        if part.shape[1] == 1:  # a single class: a plain backward, no vmap overhead
            (grads,) = torch.autograd.grad(logits, wrt, grad_outputs=onehot[0], retain_graph=not last)
            grads = grads[None]
        else:
            (grads,) = torch.autograd.grad(
                logits, wrt, grad_outputs=onehot, is_grads_batched=True, retain_graph=not last
            )
        yield slice(start, start + part.shape[1]), grads.transpose(0, 1)


class _PerClassAttribution:
    """What every per-class base attribution shares: the bound model, the chunk size, ``__call__``."""

    def __init__(self, model: nn.Module, chunk_size: int) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int (classes per batched backward), got {chunk_size!r}")
        self.model = model
        self.chunk_size = chunk_size

    def __call__(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Maps ``(N, K, ...)`` for ``classes`` ``(N, K)``; see ``attribute``."""
        return self.attribute(x, classes).maps

    def attribute(self, x: torch.Tensor, classes: ClassSpec) -> Attribution:
        """Per-class maps and the classes and logits they were computed for."""
        raise NotImplementedError


class GradCAM(_PerClassAttribution):
    r"""Grad-CAM for K classes at once.

    For activations :math:`A \in \mathbb{R}^{C \times h \times w}` of ``layer`` and logit :math:`y_k`::

        alpha_kc = 1/(h w) Σ_ij ∂y_k / ∂A_c(i, j)          (spatially averaged gradient)
        map_k    = Σ_c alpha_kc A_c                        (ReLU applied only if relu=True)

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
    ICCV 2017. The map is returned WITHOUT the ReLU by default (``relu=False``), as captum's ``LayerGradCam``
    does and as attribution distributions need: the competition uses ``|map_k|``, and the sign is kept in the
    result.

    Closed form: when ``layer`` is followed only by global average pooling (+ flatten / identity / eval
    dropout) and one ``nn.Linear`` (torchvision ResNets: layer4 → avgpool → flatten → fc; the demo's
    ShapesCNN: block3 → pool → head), ``∂y_k/∂A_c(i, j) = W_kc / (h w)``, so every class's map is one
    contraction ``map_k = Σ_c W_kc A_c / (h w)`` with no backward at all. ``closed_form=None`` detects this by
    tracing the leaf modules that run after the layer AND checking ``logits == fc(mean_hw A)`` on the batch;
    if either fails, a batched backward is used (one extra forward with autograd). ``True`` forces the closed
    form (raises if the head is not of that shape), ``False`` forces autograd. :meth:`decide` makes the
    structural half of that decision once (a serving worker does it at start) so that no call traces again.

    Otherwise: one forward with autograd, then batched vector-Jacobian products from the logits to the
    captured activations, ``chunk_size`` classes per backward.

    Transformers: the layer's output is explained as a map on its token grid (:func:`capture` with the input
    size): a ViT block's patch tokens without the class/register tokens, a Swin stage's ``(N, h, w, C)``
    permuted, so the maps are ``(N, K, h, w)`` as for a CNN. A class-token ViT is never in closed form: a
    LayerNorm follows the layer (the structural check fails) and, without one, the head reads token 0, not
    the mean of the patch tokens (the numerical check fails), so autograd is used.

    Example:
        >>> cam = GradCAM(resnet, "layer4")
        >>> cam(x, torch.tensor([[207, 281]])).shape     # x: (1, 3, 224, 224)
        torch.Size([1, 2, 7, 7])
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module,
        *,
        relu: bool = False,
        closed_form: bool | None = None,
        chunk_size: int = 64,
        layout: str | None = None,
    ) -> None:
        """Bind the model and layer.

        Args:
            model: an eager ``nn.Module`` returning logits ``(N, C)`` (or a tuple starting with them).
            layer: the submodule (or its dotted name) whose output is explained.
            relu: apply ReLU to each map (the original Grad-CAM); off by default.
            closed_form: ``None`` detect, ``True`` require, ``False`` never use the closed form.
            chunk_size: classes per batched backward (memory ∝ chunk_size × N × activation size).
            layout: ``"nchw"`` or ``"nhwc"`` to settle an ambiguous 4-D layer output (a manifest's
                ``LayerSpec.layout``); ``None`` or ``"tokens"``: decided from the output's shape alone.

        Raises:
            ValueError: ``layer`` not in ``model``, bad ``closed_form``, ``chunk_size`` or ``layout``.
            TypeError: ``model`` is not an ``nn.Module``.
        """
        super().__init__(model, chunk_size)
        self.layer = resolve_layer(model, layer)
        if closed_form not in (None, True, False):
            raise ValueError(f"closed_form must be None (detect), True or False, got {closed_form!r}")
        if layout not in (None, "nchw", "nhwc", "tokens"):
            raise ValueError(f"layout must be None, 'nchw', 'nhwc' or 'tokens', got {layout!r}")
        self.layout = layout
        self.relu = bool(relu)
        self.closed_form = closed_form
        self._head: nn.Linear | None = None

    @property
    def head(self) -> nn.Linear | None:
        """The closed form's head decided by :meth:`decide` (``None``: undecided, or no closed form)."""
        return self._head

    def closed_form_holds(self, acts: torch.Tensor, logits: torch.Tensor) -> bool:
        """Whether this batch's ``logits`` are the decided head applied to the mean of ``acts`` (cheap)."""
        return self._head is not None and _closed_form_holds(self._head, acts, logits)

    def decide(self, x: torch.Tensor) -> GradCAM:
        """Decide the closed form once, on an example batch; return a Grad-CAM that never traces the head again.

        A worker calls this at start (with a seeded random image): the modules after the layer are traced
        once here, and the returned explainer has ``closed_form`` fixed to the outcome and keeps the head.
        Its calls skip the trace; the cheap numerical half of the check (``logits == fc(mean_hw A)``) still
        runs on every batch, and a batch where it fails falls back to autograd instead of raising.

        Args:
            x: an example input batch ``(N, 3, H, W)`` on the model's device.

        Returns:
            A new :class:`GradCAM` on the same model, layer, ``relu`` and ``chunk_size``.

        Raises:
            ValueError: bad ``x``; the layer did not run exactly once or is not 4-D; ``closed_form=True``
                on a model whose head does not allow it.
        """
        _check_common(x, self.chunk_size)
        with torch.no_grad():
            _, _, head = self.forward(x)
        decided = GradCAM(
            self.model,
            self.layer,
            relu=self.relu,
            closed_form=head is not None,
            chunk_size=self.chunk_size,
            layout=self.layout,
        )
        decided._head = head
        return decided

    def attribute(self, x: torch.Tensor, classes: ClassSpec) -> Attribution:
        """Grad-CAM maps for the given classes, from one forward pass (two if the closed-form check fails).

        Args:
            x: input batch ``(N, 3, H, W)``.
            classes: ``(N, K)`` long tensor, or ``select(logits) -> (N, K)``.

        Returns:
            :class:`Attribution` with maps ``(N, K, h, w)`` at the layer's resolution.

        Raises:
            ValueError: bad ``x`` or ``classes``; ``closed_form=True`` on a model whose head is not
                global-average-pooling + linear; the layer did not run or is not 4-D.
        """
        _check_common(x, self.chunk_size)
        if self.closed_form is not False:
            with torch.no_grad():
                logits, acts, head = self.forward(x)
            if head is not None:
                chosen = _classes(classes, logits)
                return Attribution(self.maps(acts, logits, chosen, head), chosen, logits.detach())
        with torch.enable_grad():
            logits, acts, _ = self.forward(x, trace=False)
        chosen = _classes(classes, logits)
        return Attribution(self.maps(acts, logits, chosen, None), chosen, logits.detach())

    def forward(self, x: torch.Tensor, *, trace: bool = True) -> tuple[torch.Tensor, torch.Tensor, nn.Linear | None]:
        """Run the model once, capturing the layer; return logits, activations and the closed-form head.

        The head is the ``nn.Linear`` when the closed form is valid (see the class docstring) and
        ``closed_form`` allows it, else ``None``; after :meth:`decide` the head found then is only
        re-checked numerically. Grad mode is the caller's.

        Raises:
            ValueError: ``closed_form=True`` on a model whose head does not allow it; the layer did not run
                exactly once or is not 4-D.
        """
        wanted = trace and self.closed_form is not False
        known = self._head if wanted else None  # decided once by decide(): no trace
        trace = wanted and known is None
        with contextlib.ExitStack() as stack:
            order = stack.enter_context(_trace_after(self.model, self.layer)) if trace else []
            hint = self.layout if self.layout in ("nchw", "nhwc") else None
            outs = stack.enter_context(capture(self.layer, input_size=tuple(x.shape[-2:]), hint=hint))
            logits = logits_of(self.model(x))
        if len(outs) != 1 or outs[0].dim() != 4:
            raise ValueError(
                "layer must run exactly once per forward and output a map (N, C, h, w), (N, h, w, C) or tokens "
                f"(N, T, C) on the input's patch grid; it ran {len(outs)} time(s)"
            )
        acts = outs[0]
        head = known if known is not None else (_linear_head(order) if trace else None)
        if head is not None and not _closed_form_holds(head, acts, logits):
            head = None
        if head is None and self.closed_form and known is None:
            raise ValueError(
                "closed_form=True needs layer → global average pooling → one nn.Linear producing the logits; "
                "this model's head differs: use closed_form=None or False"
            )
        return logits, acts, head

    def maps(
        self, acts: torch.Tensor, logits: torch.Tensor, classes: torch.Tensor, head: nn.Linear | None
    ) -> torch.Tensor:
        """Grad-CAM maps ``(N, K, h, w)`` from a forward's activations and logits (closed form if ``head``).

        Without ``head``, ``acts`` must be part of the autograd graph of ``logits``; the graph is kept
        (``retain_graph``) so that the caller can still backpropagate through it.

        Raises:
            ValueError: no closed-form head and ``acts`` does not require grad.
        """
        if head is not None:
            weight = head.weight.detach()[classes].to(acts.dtype)  # (N, K, C)
            maps = torch.einsum("nkc,nchw->nkhw", weight, acts.detach()) / (acts.shape[2] * acts.shape[3])
        else:
            if not acts.requires_grad:
                raise ValueError("the layer's output does not require grad; Grad-CAM needs autograd through the head")
            maps = acts.new_empty(acts.shape[0], classes.shape[1], *acts.shape[2:])
            for part, grads in _batched_vjp(logits, acts, classes, self.chunk_size, keep=True):
                alpha = grads.mean(dim=(3, 4))  # (N, k, C)
                maps[:, part] = torch.einsum("nkc,nchw->nkhw", alpha, acts.detach())
        return maps.detach().clamp_min(0.0) if self.relu else maps.detach()


class InputXGradient(_PerClassAttribution):
    r"""Input × gradient for K classes at once, summed over colour channels.

    ``map_k(i, j) = Σ_ch x_ch(i, j) · ∂y_k / ∂x_ch(i, j)``

    Shrikumar et al., "Not Just a Black Box: Learning Important Features Through Propagating Activation
    Differences", 2016 (arXiv:1605.01713). One forward with autograd, then batched vector-Jacobian products
    from the logits to the input, ``chunk_size`` classes per backward (memory ∝ chunk_size × N × the
    network's activation memory: keep it small for big networks).

    Example:
        >>> ixg = InputXGradient(model, chunk_size=8)
        >>> ixg(x, torch.tensor([[3, 7]])).shape         # x: (1, 3, 224, 224)
        torch.Size([1, 2, 224, 224])
    """

    def __init__(self, model: nn.Module, *, chunk_size: int = 16) -> None:
        """Bind the model.

        Args:
            model: an eager ``nn.Module`` returning logits ``(N, C)`` (or a tuple starting with them).
            chunk_size: classes per batched backward.

        Raises:
            ValueError: bad ``chunk_size``.
            TypeError: ``model`` is not an ``nn.Module``.
        """
        super().__init__(model, chunk_size)

    def attribute(self, x: torch.Tensor, classes: ClassSpec) -> Attribution:
        """Input × gradient maps for the given classes, from one forward pass.

        Args:
            x: input batch ``(N, 3, H, W)``.
            classes: ``(N, K)`` long tensor, or ``select(logits) -> (N, K)``.

        Returns:
            :class:`Attribution` with maps ``(N, K, H, W)`` at the input's resolution.

        Raises:
            ValueError: bad ``x`` or ``classes``.
        """
        _check_common(x, self.chunk_size)
        inputs = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = logits_of(self.model(inputs))
        chosen = _classes(classes, logits)
        maps = x.new_empty(x.shape[0], chosen.shape[1], *x.shape[2:])
        for part, grads in _batched_vjp(logits, inputs, chosen, self.chunk_size):
            maps[:, part] = (grads * x.detach()[:, None]).sum(dim=2)
        return Attribution(maps, chosen, logits.detach())
