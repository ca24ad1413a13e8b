"""Attribution distributions: class-relevant saliency by letting K classes compete per location.

For base attributions ``A_k`` (one map per class k of a set of K classes), at every location::

    M_k   = softmax_k(T · |A_k|)                      (distribution of attribution mass over the classes)
    Var_c = A_c ⊙ M_c ⊙ 1[M_c − 1/K > τ]              (class c's map: only where c beats the uniform share by τ)

Walter, Vreeken and Fischer, "Now you see me! A framework for obtaining class-relevant saliency maps",
arXiv:2503.07346 (2025). Defaults follow the authors' reference code (github.com/nilspwalter/var,
``src/attribution_wrapper.py``, ``ContrastiveAttributionWrapper``): temperature ``T = 10`` (hard-coded there)
and ``τ = 0.01`` (the default of the wrapper that takes the top classes plus the least likely one), with the
classes being the top-2 by probability plus the least likely class.

Edge case K = 1: ``M = 1`` and ``M − 1/K = 0`` is never ``> τ`` (τ ≥ 0), so the map is all zeros — a class that
competes with nothing has no class-specific evidence. Maps stay at the base's native resolution;
:func:`handlers.explain.lafam.resize_maps` upsamples them.

Example:
    >>> base = GradCAM(model, "layer4")
    >>> result = explain(model, x, base)                  # top-2 + least likely, one forward for ResNets
    >>> result.maps.shape, result.classes.shape           # (N, 3, 7, 7), (N, 3)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .gradients import Attribution, Base, GradCAM, check_classes, logits_of, resolve_layer
from .lafam import resize_maps
from .lrp import LRP

TEMPERATURE = 10.0
"""The paper's softmax temperature T (reference code: ``temperature = 10.0``)."""

TAU = 0.01
"""The paper's significance threshold τ (reference code: ``ContrastiveAttributionWrapper(tau=0.01)``)."""

NORMALIZE: tuple[str, ...] = ("max", "none")
"""How the K maps are scaled before they compete: ``max`` divides them jointly by their largest ``|A|`` per
image (the ratios between classes and locations are kept, the attribution's own scale is not); ``none`` is
the reference formula on the raw attributions."""


class Distribution(NamedTuple):
    """Result of :func:`explain`: class-relevant maps, their classes and the model's probabilities."""

    maps: torch.Tensor
    """``(N, K, h, w)`` class-relevant maps, at the base's native resolution."""
    classes: torch.Tensor
    """``(N, K)`` class indices, in the order of ``maps``."""
    probabilities: torch.Tensor
    """``(N, C)`` softmax of the logits."""


def _check_temperature_tau(temperature: float, tau: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number (paper: {TEMPERATURE}), got {temperature!r}")
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not 0 <= tau < 1:
        raise ValueError(f"tau must be in [0, 1) (paper: {TAU}); tau >= 1 - 1/K empties every map, got {tau!r}")


def _check_attributions(attributions: torch.Tensor) -> None:
    if not isinstance(attributions, torch.Tensor) or attributions.dim() != 4 or not attributions.is_floating_point():
        got = getattr(attributions, "shape", type(attributions).__name__)
        raise ValueError(f"attributions must be a float (N, K, h, w) tensor, one map per class; got {got}")
    if attributions.shape[1] < 1:
        raise ValueError("attributions must hold at least one class (K >= 1)")


def _check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")


def class_weights(
    attributions: torch.Tensor, temperature: float = TEMPERATURE, normalize: str = "none"
) -> torch.Tensor:
    """``M = softmax_k(T · |A_k| / s)`` over the class dimension of ``(N, K, h, w)``; sums to 1 over k.

    ``s`` is 1 (``normalize="none"``, the reference) or, with ``normalize="max"``, the largest ``|A|`` of the
    image's K maps together (1 where they are all zero): the competition then no longer depends on the
    attribution's scale (per-pixel LRP relevance is about 1e-6 to 1e-3, where ``T · |A|`` stays near 0, the
    softmax near uniform and every map empty), while the ratios between classes are kept.

    Raises:
        ValueError: ``attributions`` not a 4-D float tensor with K ≥ 1, bad ``temperature`` or ``normalize``.
    """
    _check_attributions(attributions)
    _check_temperature_tau(temperature, 0.0)
    _check_normalize(normalize)
    magnitude = attributions.abs()
    if normalize == "max":
        peak = magnitude.amax(dim=(1, 2, 3), keepdim=True)
        magnitude = magnitude / torch.where(peak > 0, peak, torch.ones_like(peak))
    return torch.softmax(float(temperature) * magnitude, dim=1)


def attribution_distribution(
    attributions: torch.Tensor, temperature: float = TEMPERATURE, tau: float = TAU, normalize: str = "none"
) -> torch.Tensor:
    """Class-relevant maps ``A_c ⊙ M_c ⊙ 1[M_c − 1/K > τ]`` for every class of ``(N, K, h, w)``.

    Args:
        attributions: base maps, one per class, ``(N, K, h, w)`` (signed; the competition uses ``|A|``).
        temperature: softmax temperature T > 0; larger is closer to a hard arg-max over classes.
        tau: threshold τ in [0, 1) on ``M_c − 1/K``; larger keeps fewer locations.
        normalize: ``none`` (the reference) or ``max`` (see :func:`class_weights`); the maps returned are
            the raw ``A_c`` times the weights either way.

    Returns:
        ``(N, K, h, w)`` maps, same dtype and device; all zeros when K = 1.

    Raises:
        ValueError: ``attributions`` not a 4-D float tensor, ``temperature`` not positive, ``tau`` not in [0, 1).

    Example:
        >>> a = torch.tensor([[[[1.0]], [[0.0]]]])           # two classes, one pixel
        >>> attribution_distribution(a)                     # M = softmax(10, 0) ≈ (1.0, 4.5e-5)
        tensor([[[[1.0000]], [[0.0000]]]])
    """
    _check_temperature_tau(temperature, tau)
    weights = class_weights(attributions, temperature, normalize)
    keep = (weights - 1.0 / attributions.shape[1]) > tau
    return attributions * weights * keep


def select_classes(
    probabilities: torch.Tensor,
    top_k: int = 2,
    add_least_likely: bool = True,
    classes: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """The classes that compete: top-k by probability (+ the least likely one), or the caller's list.

    Automatic selection sorts each row once (stable), so the least likely class is never one of the top-k and
    rows have no duplicates; it needs ``top_k + add_least_likely <= C``. A caller's list (``(K,)`` for every
    image, or ``(N, K)``) is used in its order; duplicates in a row are REJECTED (they would split a class's
    share of M between two copies of itself).

    Args:
        probabilities: ``(N, C)`` class probabilities (or logits: only the order matters).
        top_k: number of most likely classes, ≥ 1.
        add_least_likely: append each image's least likely class.
        classes: explicit classes; overrides ``top_k`` and ``add_least_likely``.

    Returns:
        ``(N, K)`` long class indices on the probabilities' device, the most likely first.

    Raises:
        ValueError: ``probabilities`` not 2-D; ``top_k`` not in ``[1, C - add_least_likely]``; ``classes`` of
            the wrong shape, out of ``[0, C)``, empty, or with a duplicate in a row.
        TypeError: ``add_least_likely`` is not a bool.
    """
    if not isinstance(probabilities, torch.Tensor) or probabilities.dim() != 2 or probabilities.shape[1] < 1:
        raise ValueError(f"probabilities must be (N, C), got {getattr(probabilities, 'shape', probabilities)!r}")
    n, c = probabilities.shape
    if classes is not None:
        chosen = torch.as_tensor(classes, device=probabilities.device)
        if chosen.dim() == 1:
            chosen = chosen.expand(n, -1)
        chosen = check_classes(chosen, n, c)
        ordered = chosen.sort(dim=1).values
        if (ordered[:, 1:] == ordered[:, :-1]).any():
            raise ValueError("classes must not repeat a class within an image; remove the duplicates")
        return chosen
    if not isinstance(add_least_likely, bool):
        raise TypeError(f"add_least_likely must be a bool, got {add_least_likely!r}")
    most = c - int(add_least_likely)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= most:
        raise ValueError(f"top_k must be an int in [1, {most}] for {c} classes (add_least_likely={add_least_likely})")
    order = torch.sort(probabilities.detach(), dim=1, descending=True, stable=True).indices
    return torch.cat([order[:, :top_k], order[:, -1:]], dim=1) if add_least_likely else order[:, :top_k]


def explain(
    model: nn.Module,
    x: torch.Tensor,
    base: Base,
    *,
    classes: Sequence[int] | torch.Tensor | None = None,
    top_k: int = 2,
    add_least_likely: bool = True,
    temperature: float = TEMPERATURE,
    tau: float = TAU,
    normalize: str = "none",
) -> Distribution:
    """Attribution distributions for the selected classes of each image.

    If ``base`` has an ``attribute(x, select)`` method (:class:`~.gradients.GradCAM`,
    :class:`~.gradients.InputXGradient`), the classes are chosen from the logits of the base's own forward
    pass (one forward in all). Any other callable ``base(x, classes) -> (N, K, h, w)`` (e.g. an LRP
    explainer's ``for_classes``) gets the classes from a separate no-grad forward of ``model``.

    Args:
        model: the eager model (used for the probabilities when ``base`` is a plain callable).
        x: input batch ``(N, 3, H, W)``.
        base: the base attribution.
        classes: explicit classes, see :func:`select_classes`.
        top_k: number of most likely classes.
        add_least_likely: append the least likely class.
        temperature: softmax temperature T.
        tau: threshold τ.
        normalize: scaling of the maps before they compete (:data:`NORMALIZE`, :func:`class_weights`).

    Returns:
        :class:`Distribution` with maps ``(N, K, h, w)``.

    Raises:
        ValueError: any bad argument (see :func:`select_classes`, :func:`attribution_distribution`), or a
            base returning maps of the wrong shape.
        TypeError: ``base`` is not callable, or ``add_least_likely`` is not a bool.
    """
    _check_temperature_tau(temperature, tau)
    _check_normalize(normalize)
    if not callable(base):
        raise TypeError(f"base must be callable as base(x, classes) -> (N, K, h, w), got {type(base).__name__}")

    select = _selector(classes, top_k, add_least_likely)
    attribute = getattr(base, "attribute", None)
    if callable(attribute):
        result: Attribution = attribute(x, select)
        maps, chosen, logits = result.maps, result.classes, result.logits
    else:
        with torch.no_grad():
            logits = logits_of(model(x))
        chosen = select(logits)
        maps = base(x, chosen)
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4 or tuple(maps.shape[:2]) != tuple(chosen.shape):
        raise ValueError(
            f"base must return (N, K) = {tuple(chosen.shape)} maps of shape (N, K, h, w), "
            f"got {getattr(maps, 'shape', type(maps).__name__)}"
        )
    distribution = attribution_distribution(maps, temperature, tau, normalize)
    return Distribution(distribution, chosen, torch.softmax(logits.float(), dim=1))


def _layer_competition(
    model: nn.Module,
    x: torch.Tensor,
    layer: str | nn.Module,
    select: Callable[[torch.Tensor], torch.Tensor],
    *,
    temperature: float,
    tau: float,
    normalize: str,
    chunk_size: int,
    grad: bool,
    cam: GradCAM | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target class's share M_t ⊙ 1[M_t − 1/K > τ] of the layer-level Grad-CAM competition.

    Returns the mask ``(N, h, w)``, the classes ``(N, K)`` (target first) and the logits. With ``grad`` the
    forward keeps the autograd graph from ``x`` (which must require grad) to the logits. ``cam`` is a
    Grad-CAM of ``layer`` built beforehand (e.g. decided at worker start); by default one is built here.
    """
    _check_temperature_tau(temperature, tau)
    if cam is None:
        cam = GradCAM(model, resolve_layer(model, layer), chunk_size=chunk_size)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float (N, C, H, W) batch, got {getattr(x, 'shape', type(x).__name__)}")
    if grad:
        with torch.enable_grad():
            logits, acts, head = cam.forward(x)
        chosen = select(logits.detach())
        layer_maps = cam.maps(acts, logits, chosen, head)
    else:
        layer_maps, chosen, logits = cam.attribute(x, select)
    return _target_share(layer_maps, chosen, temperature, tau, normalize), chosen, logits


def _target_share(
    layer_maps: torch.Tensor, chosen: torch.Tensor, temperature: float, tau: float, normalize: str
) -> torch.Tensor:
    """``M_t ⊙ 1[M_t − 1/K > τ]`` of the first class from the K layer-level maps ``(N, K, h, w)``."""
    weights = class_weights(layer_maps.detach(), temperature, normalize)[:, 0]
    return weights * ((weights - 1.0 / chosen.shape[1]) > tau)


def _selector(
    classes: Sequence[int] | torch.Tensor | None, top_k: int, add_least_likely: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    def select(logits: torch.Tensor) -> torch.Tensor:
        return select_classes(torch.softmax(logits.float(), dim=1), top_k, add_least_likely, classes)

    return select


def fast_input_x_gradient(
    model: nn.Module,
    x: torch.Tensor,
    layer: str | nn.Module,
    *,
    classes: Sequence[int] | torch.Tensor | None = None,
    top_k: int = 2,
    add_least_likely: bool = True,
    temperature: float = TEMPERATURE,
    tau: float = TAU,
    normalize: str = "none",
    mode: str = "nearest",
    chunk_size: int = 64,
    cam: GradCAM | None = None,
) -> Distribution:
    r"""Fast attribution distribution for input × gradient: the classes compete at the layer, not per pixel.

    Computes, for the FIRST selected class t of each image (the most likely one by default)::

        G_k   = Grad-CAM map of class k at ``layer``               (closed form when the head allows)
        M_t   = softmax_k(T · |G_k|)[t] ⊙ 1[softmax_k(T · |G_k|)[t] − 1/K > τ]     (at layer resolution)
        map_t = upsample(M_t → H × W) ⊙ Σ_ch x ⊙ ∂y_t/∂x           (ONE backward of the target logits)

    i.e. the exact per-pixel distribution of :func:`explain` with an input × gradient base, except that the
    class competition (the weights M and the threshold) is decided by the layer-level Grad-CAM maps and
    upsampled (``mode``: ``nearest`` or ``bilinear``), so the cost is one forward and one backward whatever K.
    Idea from attribution distributions (Walter et al., arXiv:2503.07346) on Grad-CAM (Selvaraju et al. 2017)
    and input × gradient (Shrikumar et al. 2016).

    Args:
        model: eager model returning logits (or a tuple starting with them).
        x: input batch ``(N, 3, H, W)``.
        layer: the convolutional layer where classes compete.
        classes: explicit classes (first = target), see :func:`select_classes`.
        top_k: number of most likely classes.
        add_least_likely: append the least likely class.
        temperature: softmax temperature T.
        tau: threshold τ.
        normalize: scaling of the layer-level maps before they compete (:func:`class_weights`).
        mode: upsampling of the mask, ``nearest`` or ``bilinear``.
        chunk_size: classes per batched backward of the layer-level Grad-CAM (if not closed form).
        cam: a :class:`~.gradients.GradCAM` of ``layer`` built once (e.g. :meth:`~.gradients.GradCAM.decide`
            at worker start); default: built here.

    Returns:
        :class:`Distribution` whose ``maps`` are ``(N, 1, H, W)`` for the target class ``classes[:, 0]``
        (``classes`` still lists all K competitors).

    Raises:
        ValueError: any bad argument.
    """
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be one of nearest, bilinear, got {mode!r}")
    inputs = x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) else x
    select = _selector(classes, top_k, add_least_likely)
    mask, chosen, logits = _layer_competition(
        model,
        inputs,
        layer,
        select,
        temperature=temperature,
        tau=tau,
        normalize=normalize,
        chunk_size=chunk_size,
        grad=True,
        cam=cam,
    )
    mask = resize_maps(mask.float(), tuple(x.shape[-2:]), mode).to(x.dtype)
    target = logits.gather(1, chosen[:, :1]).sum()
    (grads,) = torch.autograd.grad(target, inputs)
    maps = (grads * x.detach()).sum(dim=1) * mask
    return Distribution(maps[:, None], chosen, torch.softmax(logits.detach().float(), dim=1))


def fast_lrp(
    model: nn.Module,
    lrp: LRP,
    x: torch.Tensor,
    layer: str,
    *,
    classes: Sequence[int] | torch.Tensor | None = None,
    top_k: int = 2,
    add_least_likely: bool = True,
    temperature: float = TEMPERATURE,
    tau: float = TAU,
    normalize: str = "none",
    chunk_size: int = 64,
    cam: GradCAM | None = None,
) -> Distribution:
    r"""Fast attribution distribution for LRP: the classes compete at the layer, one LRP pass to the pixels.

    For the FIRST selected class t of each image (the most likely one by default)::

        G_k   = Grad-CAM map of class k at ``layer``                  (closed form when the head allows)
        M_t   = softmax_k(T · |G_k|)[t] ⊙ 1[softmax_k(T · |G_k|)[t] − 1/K > τ]       (layer resolution)
        R_t   = LRP relevance of logit t at ``layer``'s output, times M_t at every channel
        map_t = R_t propagated to the pixels by the same LRP rules                    (ONE relevance pass)

    For a head of global average pooling + linear (ResNets, the demo model), class k's LRP-ε relevance at
    the layer, summed over channels, is ``G_k · y_k / (y_k − b_k)``: the competition is then that of LRP
    itself at the layer, up to the bias share of each logit. The exact method (:func:`explain` with an LRP
    base) runs K relevance passes and lets the classes compete per pixel; this one costs one LRP forward
    and one relevance pass whatever K: with a ``cam`` whose closed form was decided
    (:meth:`~.gradients.GradCAM.decide`, as the server does at worker start) the competition is read from
    LRP's own forward (the layer's activations and the logits); otherwise a Grad-CAM forward comes first.

    Args:
        model: the eager model (for the Grad-CAM competition).
        lrp: an :class:`~.lrp.LRP` built from the same model.
        x: input batch ``(N, 3, H, W)``.
        layer: the convolutional layer where classes compete (a layer :attr:`LRP.layers` lists).
        classes: explicit classes (first = target), see :func:`select_classes`.
        top_k: number of most likely classes.
        add_least_likely: append the least likely class.
        temperature: softmax temperature T.
        tau: threshold τ.
        normalize: scaling of the layer-level maps before they compete (:func:`class_weights`).
        chunk_size: classes per batched backward of the layer-level Grad-CAM (if not closed form).
        cam: a :class:`~.gradients.GradCAM` of ``layer`` built once (e.g. :meth:`~.gradients.GradCAM.decide`
            at worker start); default: built here.

    Returns:
        :class:`Distribution` whose ``maps`` are ``(N, 1, H, W)`` for the target class ``classes[:, 0]``.

    Raises:
        ValueError: any bad argument.
    """
    select = _selector(classes, top_k, add_least_likely)
    if cam is not None and cam.head is not None:
        _check_temperature_tau(temperature, tau)
        _check_normalize(normalize)
        return _fast_lrp_one_forward(lrp, cam, x, layer, select, temperature=temperature, tau=tau, normalize=normalize)
    mask, chosen, logits = _layer_competition(
        model,
        x,
        layer,
        select,
        temperature=temperature,
        tau=tau,
        normalize=normalize,
        chunk_size=chunk_size,
        grad=False,
        cam=cam,
    )
    relevance = lrp.relevance(x, classes=chosen[:, 0], mask=(layer, mask))
    return Distribution(relevance.maps[:, None], chosen, torch.softmax(logits.detach().float(), dim=1))


def _fast_lrp_one_forward(
    lrp: LRP,
    cam: GradCAM,
    x: torch.Tensor,
    layer: str,
    select: Callable[[torch.Tensor], torch.Tensor],
    *,
    temperature: float,
    tau: float,
    normalize: str,
) -> Distribution:
    """:func:`fast_lrp` inside LRP's own forward.

    The closed-form Grad-CAM competition reads the layer's activations and the logits LRP computes anyway,
    so the whole method costs one LRP explanation plus one small contraction (a batch whose logits do not
    match the closed form falls back to a Grad-CAM forward).
    """
    chosen: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []

    def target(logits: torch.Tensor) -> torch.Tensor:
        chosen.append(select(logits))
        seen.append(logits)
        return chosen[0][:, 0]

    def competition(acts: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if cam.closed_form_holds(acts, logits):
            layer_maps = cam.maps(acts, logits, chosen[0], cam.head)
        else:
            layer_maps = cam.attribute(x, chosen[0]).maps
        return _target_share(layer_maps, chosen[0], temperature, tau, normalize)

    relevance = lrp.relevance(x, classes=target, mask=(layer, competition))
    return Distribution(relevance.maps[:, None], chosen[0], torch.softmax(seen[0].detach().float(), dim=1))
