"""The eager model beside the graph: how its architecture is named, rebuilt and loaded in a worker.

Backward-pass explanations (LRP, Grad-CAM, attribution distributions) need autograd or the module tree,
which an ONNX or TorchScript graph does not give, so an archive can carry the eager model too: an
architecture reference (a torchvision name, or ``package.module:factory`` whose package is shipped in the
archive), the head it drops for embeddings, and a state_dict (:class:`~handlers.manifest.EagerSpec`).
``export`` builds models with the same functions, so build time and serve time construct the same module.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from .manifest import EagerSpec

logger = logging.getLogger(__name__)

_IDENTIFIER_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

# Classification heads of torchvision models, by attribute name. For ``task="embedding"`` the last child
# of the head (which must be a Linear) becomes an Identity, see ``strip_head``.
_HEAD_ATTRIBUTES: tuple[str, ...] = ("fc", "classifier", "head", "heads")


class ArchitectureError(ValueError):
    """An architecture reference cannot be built; the message names it and the fix."""


def close_matches(word: str, candidates: Sequence[str], n: int = 5) -> list[str]:
    """Return up to ``n`` candidates close to ``word`` (for "did you mean" hints)."""
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)


def describe(value: object) -> str:
    """Name a value's type (and a tensor's shape) for an error message."""
    if isinstance(value, Tensor):
        return f"a {value.dim()}-D tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def torchvision_model_names() -> list[str]:
    """Return the names of torchvision's classification models, sorted."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_architecture(spec: str, num_classes: int | None = None) -> nn.Module:
    """Build a randomly initialised model from a torchvision name or ``package.module:factory``.

    Args:
        spec: torchvision classification model name, or ``package.module:factory`` (a callable returning an
            ``nn.Module``).
        num_classes: classes of the head; ``None`` keeps the default. A factory must then accept it.

    Raises:
        ArchitectureError: unknown name, malformed spec, failed import, or a factory that does not return a
            module or does not take ``num_classes``.
    """
    return _build_torchvision(spec, num_classes) if ":" not in spec else _build_from_factory(spec, num_classes)


def _build_torchvision(name: str, num_classes: int | None) -> nn.Module:
    known = torchvision_model_names()
    key = name.lower()
    if key not in known:
        close = close_matches(key, known)
        hint = f"close matches: {', '.join(close)}; " if close else ""
        own = " (for your own model write 'package.module:factory', with a colon)" if "." in name else ""
        raise ArchitectureError(
            f"spec={name!r} is not a torchvision classification model ({hint}see "
            f"torchvision.models.list_models(module=torchvision.models)){own}"
        )
    kwargs: dict[str, Any] = {"num_classes": num_classes} if num_classes is not None else {}
    return torchvision.models.get_model(key, weights=None, **kwargs)


def _build_from_factory(spec: str, num_classes: int | None) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not _IDENTIFIER_PATH.match(module_name) or not _IDENTIFIER_PATH.match(attribute):
        raise ArchitectureError(
            f"spec={spec!r} is not of the form 'package.module:factory' (dotted Python names on both sides of "
            f"a single colon), e.g. 'mypkg.models:build_net'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArchitectureError(
            f"spec={spec!r}: cannot import module {module_name!r} ({exc}); install it or run from the folder "
            f"that contains it (or add that folder to PYTHONPATH)"
        ) from exc
    except Exception as exc:
        raise ArchitectureError(f"spec={spec!r}: importing module {module_name!r} failed: {exc!r}") from exc
    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            public = [n for n in dir(factory) if not n.startswith("_")]
            close = close_matches(part, public)
            hint = f" (close matches: {', '.join(close)})" if close else ""
            raise ArchitectureError(f"spec={spec!r}: {module_name!r} has no attribute {attribute!r}{hint}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ArchitectureError(f"spec={spec!r}: {attribute!r} is a {type(factory).__name__}, not a callable factory")
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        if not _accepts_keyword(factory, "num_classes"):
            raise ArchitectureError(
                f"num_classes={num_classes} was given but factory {spec!r} takes no num_classes argument; "
                f"drop num_classes or add a num_classes parameter to the factory"
            )
        kwargs["num_classes"] = num_classes
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ArchitectureError(
            f"spec={spec!r}: the factory returned {describe(model)}, not a torch.nn.Module; make it return the "
            f"model instance"
        )
    return model


def _accepts_keyword(function: Any, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == name and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
        for p in parameters
    )


def head_path(model: nn.Module, spec: str) -> str:
    """Return the module path of the final classification layer (``fc``, ``classifier.6``, ``heads.head``)."""
    for attribute in _HEAD_ATTRIBUTES:
        head = getattr(model, attribute, None)
        if isinstance(head, nn.Linear):
            return attribute
        if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear):
            last_child = [name for name, _ in head.named_children()][-1]
            return f"{attribute}.{last_child}"
    raise ArchitectureError(
        f"task='embedding': cannot find the classification head of {spec!r} (looked for a Linear "
        f"{', '.join(_HEAD_ATTRIBUTES)} or a Sequential ending in a Linear); use task='classification' or a "
        f"'package.module:factory' that returns the encoder"
    )


def strip_head(model: nn.Module, path: str) -> None:
    """Replace the submodule at ``path`` (the classification layer) by ``nn.Identity``."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, nn.Identity())


@contextlib.contextmanager
def _code_first_on_path(code: Path | None) -> Iterator[None]:
    if code is None:
        yield
        return
    sys.path.insert(0, str(code))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(code))


def load_eager(spec: EagerSpec, folder: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the eager model an archive describes and load its weights, in eval mode, on ``device``.

    The architecture's package (``spec.code``) is put first on ``sys.path`` while it is imported, so the
    archive's copy is used rather than an installed one of the same name (unless that module was already
    imported by the process, which is logged). Weights are read with ``weights_only=True`` and strictly.

    Args:
        spec: the manifest's ``eager`` entry.
        folder: the archive's folder (TorchServe's ``model_dir``).
        device: where the model goes: ``cuda:<gpu_id>`` or ``cpu``.

    Raises:
        ArchitectureError: the architecture cannot be built, or the weights do not fit it.
    """
    folder = Path(folder)
    code = folder / spec.code if spec.code else None
    with _code_first_on_path(code):
        model = build_architecture(spec.architecture, spec.num_classes)
    if code is not None:
        source = Path(inspect.getfile(type(model))).resolve()
        if not source.is_relative_to(code.resolve()):
            logger.info("eager model class %s comes from %s, not from the archive", type(model).__name__, source)
    if spec.head:
        strip_head(model, spec.head)
    state = torch.load(folder / spec.state_dict, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArchitectureError(f"the archive's eager weights do not fit {spec.architecture!r}: {exc}") from exc
    return model.eval().to(device)
