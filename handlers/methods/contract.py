"""The one contract every explanation method follows: what it declares, what it gets, what it returns.

A method is a subclass of :class:`Method` registered once (:func:`handlers.methods.registry.register`).
Its class attributes declare everything the rest of the server needs to know about it: the endpoint that
serves it, what it needs from the model (:class:`Need`), whether classes compete, whether its cost grows
with the number of classes K, its default number of classes, the options it reads and its valid bases.
Request options, the service, the response encoder and the evaluation read these declarations; none of
them names a method. Its one method, :meth:`Method.explain`, gets one image's :class:`Inputs` and returns
one :class:`Explanation`.

Example:
    >>> class Saliency(Method):
    ...     '''|∂y_c/∂x| summed over colour channels (Simonyan et al., arXiv:1312.6034).'''
    ...     name = "saliency"
    ...     endpoint = Endpoint.BACKWARD
    ...     needs = frozenset({Need.EAGER, Need.CLASSES})
    ...     reads = ("classes", "top_classes")
    ...     def explain(self, inputs: Inputs) -> Explanation:
    ...         x = inputs.as_batch().requires_grad_(True)
    ...         logits = inputs.require_engines().model(x)
    ...         (grads,) = torch.autograd.grad(logits[0, inputs.classes[0]], x)
    ...         return Explanation(grads.abs().sum(1), inputs.classes[:1])
    >>> register(Saliency())
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

from ..explain.distribution import select_classes

if TYPE_CHECKING:
    from ..options import RequestOptions
    from .engines import Engines

T = TypeVar("T")


class Endpoint(enum.Enum):
    """Where a method is served."""

    FORWARD = "forward"
    """Computed from the served graph's own outputs (activations): ``/predictions`` and ``/explanations``."""
    BACKWARD = "backward"
    """Needs the archive's eager model and autograd: ``/explanations`` only."""


class Need(enum.Enum):
    """What a method needs from the served model.

    A need is either met, missing with a reason (the method stays listed and a request for it is a 400
    that gives the reason), or absent (the method is not offered by this model at all).
    """

    EAGER = "the eager model"
    """The archive ships the eager model (``export --eager``); absent otherwise."""
    CLASSES = "a classifier"
    """The model outputs class logits (classes are chosen and explained); absent for encoders."""
    LRP = "LRP"
    """The LRP engine can be built for the eager model; missing with the engine's reason otherwise."""


class ContractError(RuntimeError):
    """A method broke the contract (a bug in the method: answered as a 500, never blamed on the client)."""


@dataclass(frozen=True)
class Explanation:
    """What every method returns for one image.

    Attributes:
        maps: ``(K, h, w)`` float maps, one per explained class, or ``(1, h, w)`` for a label-free method,
            at the method's native resolution (the layer's, or the input's for pixel-level methods).
        classes: the explained classes, in the order of ``maps``; ``None`` for a label-free method.
        competitors: the classes that competed (distributions), target first; ``None`` otherwise.
        layer: the layer the method used, or ``None`` for input-level methods.
        signed: the maps are signed attributions (encoded divided by their largest ``|value|``) rather than
            maps already in [0, 1] (LaFAM).
        extras: method-specific keys added to the response's ``explanation`` object (e.g. a distribution's
            ``base``, ``temperature`` and ``tau``).

    Raises:
        ContractError: ``maps`` is not a 3-D float tensor, or does not hold one map per class.
    """

    maps: torch.Tensor
    classes: tuple[int, ...] | None = None
    competitors: tuple[int, ...] | None = None
    layer: str | None = None
    signed: bool = True
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        maps = self.maps
        if not isinstance(maps, torch.Tensor) or maps.dim() != 3 or not maps.is_floating_point():
            got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise ContractError(f"an Explanation's maps must be a float (K, h, w) tensor, got {got}")
        expected = 1 if self.classes is None else len(self.classes)
        if maps.shape[0] != expected or expected == 0:
            raise ContractError(
                f"an Explanation needs one map per class ({expected} for classes={self.classes}), got {maps.shape[0]}"
            )


def once(memo: dict[Hashable, Any], key: Hashable, compute: Callable[[], T]) -> T:
    """``memo[key]``, computed by ``compute()`` the first time: work shared by the images of one batch."""
    if key not in memo:
        memo[key] = compute()
    return memo[key]


@dataclass(frozen=True)
class Inputs:
    """What a method gets for one image.

    Attributes:
        image: the decoded, normalised image ``(3, H, W)`` (on the CPU).
        options: the request's validated options.
        probabilities: ``(C,)`` class probabilities from the served graph, or ``None`` (encoders).
        classes: the classes to explain, chosen once from ``probabilities`` and ``options`` (methods that
            need :attr:`Need.CLASSES`; for competing methods every competitor, target first), else ``None``.
        batch_activations: the served graph's activations of the whole batch this image came in,
            ``(N, C, h, w)`` per exported layer name.
        batch_maps: the channel means the runtime computed in the same pass, per exported layer name whose
            LaFAM map it fuses (:mod:`handlers.fused`): ``(N, 1, h, w)`` float32; may be empty.
        row: this image's index in the batch.
        engines: what the backward methods share (eager model, LRP, Grad-CAM), or ``None`` without an
            eager model.
        memo: shared by every image of the batch and dropped after it (see :meth:`once`).
    """

    image: torch.Tensor
    options: RequestOptions
    probabilities: torch.Tensor | None = None
    classes: tuple[int, ...] | None = None
    batch_activations: Mapping[str, torch.Tensor] = field(default_factory=dict)
    batch_maps: Mapping[str, torch.Tensor] = field(default_factory=dict)
    row: int = 0
    engines: Engines | None = None
    memo: dict[Hashable, Any] = field(default_factory=dict)

    @property
    def activations(self) -> dict[str, torch.Tensor]:
        """This image's activations, ``(C, h, w)`` per exported layer name."""
        return {name: batch[self.row] for name, batch in self.batch_activations.items()}

    def once(self, key: Hashable, compute: Callable[[], T]) -> T:
        """``compute()`` once per batch and ``key``: work a method shares between the images of a batch.

        E.g. LaFAM reduces the batch's activations in one call, then each image takes its row.
        """
        return once(self.memo, key, compute)

    def require_engines(self) -> Engines:
        """The engines; raises ``ValueError`` without an eager model (the options admit no such request)."""
        if self.engines is None:
            raise ValueError(f"method {self.options.method!r} needs the eager model (export with --eager)")
        return self.engines

    def as_batch(self) -> torch.Tensor:
        """The image as a batch of one, ``(1, 3, H, W)``, on the eager model's device."""
        return self.image[None].to(self.require_engines().device)

    def class_tensor(self) -> torch.Tensor:
        """The classes as a ``(1, K)`` long tensor on the eager model's device."""
        if self.classes is None:
            raise ValueError(f"method {self.options.method!r} needs classes; it must declare Need.CLASSES")
        return torch.tensor([self.classes], dtype=torch.long, device=self.require_engines().device)


class Method(ABC):
    """One explanation method: its declarations and :meth:`explain`.

    Subclasses set the class attributes and implement :meth:`explain`; their docstring gives the formula and
    the paper. A method that depends on the base it runs over overrides :meth:`cost_grows_with_k`.

    Attributes:
        name: the value of the ``method`` option (lower case, ``[a-z][a-z0-9_]*``).
        title: its name in evaluation tables.
        endpoint: :attr:`Endpoint.FORWARD` (from the graph's outputs) or :attr:`Endpoint.BACKWARD` (eager
            model, ``/explanations`` only).
        needs: what it needs from the model; a backward method needs :attr:`Need.EAGER`.
        competes: the classes compete (attribution distributions): the least likely class is added to the
            chosen ones when ``least_likely`` is on.
        target_only: only the first chosen class (the target) gets a map; the others only compete.
        default_classes: the number of most likely classes explained when a request names none.
        reads: the request options it reads (besides ``method``, ``format``, ``size``, ``upsample``, ``top_k``).
        bases: the valid values of the ``base`` option, the default first (empty: reads no base).
        signed: its maps are signed attributions, not [0, 1] maps.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    endpoint: ClassVar[Endpoint]
    needs: ClassVar[frozenset[Need]]
    competes: ClassVar[bool] = False
    target_only: ClassVar[bool] = False
    default_classes: ClassVar[int] = 1
    reads: ClassVar[tuple[str, ...]] = ()
    bases: ClassVar[tuple[str, ...]] = ()
    signed: ClassVar[bool] = True

    def requires(self, base: str | None = None) -> frozenset[Need]:
        """What it needs when run over ``base`` (its own needs plus the base's, for methods with bases)."""
        from .bases import BASES

        if base is not None and base in self.bases:
            return self.needs | BASES[base].needs
        return self.needs

    def cost_grows_with_k(self, base: str | None = None) -> bool:
        """Whether one request's cost grows with the number of classes K (then K is capped at ``max_classes``)."""
        return False

    def normalize(self) -> str:
        """The default ``normalize``: ``max`` for methods whose classes compete, whatever the base.

        Scale-free for every base: per-pixel LRP and input×gradient values (~1e-3) and Grad-CAM on a
        transformer's token grid are far below the scale the paper's T = 10 assumes, where ``none`` (the
        reference formula) empties most maps (:mod:`handlers.explain.distribution`).
        """
        return "max" if self.competes else "none"

    @abstractmethod
    def explain(self, inputs: Inputs) -> Explanation:
        """Explain one image.

        Raises:
            ValueError: the options cannot be honoured for this model (answered as a 400).
        """

    def __repr__(self) -> str:
        return f"<method {self.name!r} ({self.endpoint.value})>"


def distribution_extras(options: RequestOptions) -> dict[str, object]:
    """The options of an attribution distribution, echoed in its response."""
    return {
        "base": options.base,
        "temperature": options.temperature,
        "tau": options.tau,
        "normalize": options.normalize,
    }


def choose_classes(method: Method, options: RequestOptions, probabilities: torch.Tensor | None) -> tuple[int, ...]:
    """The classes ``method`` explains for one image: the request's, else the most likely (+ the least likely).

    Args:
        method: the requested method (its ``competes`` adds the least likely class).
        options: the validated options (``classes``, ``top_classes``, ``least_likely``).
        probabilities: ``(C,)`` class probabilities from the served graph.

    Raises:
        ValueError: no probabilities (an encoder; the options admit no such request).
    """
    if probabilities is None:
        raise ValueError(f"method {method.name!r} needs class probabilities")
    chosen = select_classes(
        probabilities[None].detach().float().cpu(),
        options.top_classes,
        options.least_likely and method.competes,
        options.classes,
    )
    return tuple(int(c) for c in chosen[0])
