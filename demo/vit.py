"""ShapesViT: a small Vision Transformer for the demo, built from torchvision's ``VisionTransformer``.

The model is a ``torchvision.models.VisionTransformer`` (class token, learned position embeddings, pre-norm
encoder blocks with ``nn.MultiheadAttention``, a linear head on the class token) at the demo's 128x128 input
with 16-pixel patches, so its encoder blocks return ``(N, 1 + 8*8, hidden)`` tokens on an 8x8 patch grid, the
same grid as ShapesCNN's ``block3``. Its patch embedding is torchvision's convolutional stem
(``conv_stem_configs``, as in Xiao et al. 2021, "Early Convolutions Help Transformers See Better"): 3x3
conv/BN/ReLU layers of total stride 16, then a 1x1 convolution to the token width, instead of one 16x16
stride-16 convolution. Trained from scratch on the CPU budget of :mod:`demo.train_vit`, the plain patchify
ViT stayed at chance (see ``STEM`` below); the stem gives the tokens the locality a small data set cannot
teach quickly. Nothing is demo-specific in the module itself: the project's transformer support (token
layers read as ``(N, C, h, w)`` maps on export, LRP through ``nn.MultiheadAttention``) treats it exactly as
it treats a user's torchvision ViT. Like every torchvision ViT it takes one input size only (128x128):
larger images are resized to it when served.

``shapes_vit`` is the factory for ``lafam-serve export demo.vit:shapes_vit``; it is trained by
``python -m demo.train_vit`` (weights ``demo/weights/shapes_vit.pt``, report ``shapes_vit.json``), and
:func:`build_vit_archive` exports and archives the shipped weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torchvision.models import VisionTransformer
from torchvision.models.vision_transformer import ConvStemConfig

from demo.model import INPUT_SIZE, MEAN, NUM_CLASSES, STD

__all__ = [
    "HIDDEN_DIM",
    "INPUT_SIZE",
    "MEAN",
    "MLP_DIM",
    "MODEL_NAME",
    "NUM_HEADS",
    "NUM_LAYERS",
    "PATCH_SIZE",
    "REPORT",
    "SPEC",
    "STD",
    "STEM",
    "WEIGHTS",
    "build_vit_archive",
    "shapes_vit",
]

PATCH_SIZE = 16
"""Side of a patch in pixels: 128x128 input → an 8x8 grid of patch tokens (plus the class token)."""

STEM: tuple[tuple[int, int], ...] = ((16, 2), (32, 2), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1))
"""``(out_channels, stride)`` of each 3x3 conv/BN/ReLU layer of the patch embedding (total stride 16); a 1x1
convolution to :data:`HIDDEN_DIM` follows (torchvision's ``conv_proj.conv_last``). On this CPU budget a plain
16x16 patchify embedding stayed at chance (loss ln 6): 675 steps of 64 images at lr 5e-4, 200 steps with the
auxiliary pooled-token loss of :mod:`demo.train_vit`; so did a 4-conv stem (one conv per stride 2)."""

NUM_LAYERS = 4
"""Encoder blocks."""

NUM_HEADS = 4
"""Attention heads per block."""

HIDDEN_DIM = 128
"""Token width."""

MLP_DIM = 384
"""Hidden width of each block's MLP (3x the token width)."""

DEMO_DIR = Path(__file__).resolve().parent
WEIGHTS = DEMO_DIR / "weights" / "shapes_vit.pt"
"""The shipped float32 ``state_dict``."""

REPORT = DEMO_DIR / "weights" / "shapes_vit.json"
"""The training report of the shipped weights (settings, command, held-out figures)."""

LABELS = DEMO_DIR / "labels.txt"
MODEL_NAME = "shapes_vit"
"""Model name of the archive built by :func:`build_vit_archive`."""

SPEC = "demo.vit:shapes_vit"
"""The factory as ``lafam-serve export`` takes it."""


def shapes_vit(num_classes: int = NUM_CLASSES) -> VisionTransformer:
    """Build an untrained ShapesViT: torchvision's ``VisionTransformer`` at 128x128, 16-px patches, conv stem.

    Args:
        num_classes: number of output logits (6 for the demo's shape classes).

    Returns:
        The model, in training mode, with torchvision's initialisation (the head starts at zero).

    Raises:
        ValueError: if ``num_classes`` is smaller than 1.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return VisionTransformer(
        image_size=INPUT_SIZE[0],
        patch_size=PATCH_SIZE,
        num_layers=NUM_LAYERS,
        num_heads=NUM_HEADS,
        hidden_dim=HIDDEN_DIM,
        mlp_dim=MLP_DIM,
        num_classes=num_classes,
        conv_stem_configs=[ConvStemConfig(out_channels=c, kernel_size=3, stride=s) for c, s in STEM],
    )


def build_vit_archive(
    out: Path,
    model_store: Path,
    *,
    backend: str = "torchscript",
    name: str = MODEL_NAME,
    weights: Path = WEIGHTS,
    log: Callable[[str], None] = print,
) -> Path:
    """Export the shipped ShapesViT (default layer, eager model too) into ``<model_store>/<name>.mar``.

    The default LaFAM layer is found by the exporter: the MLP activation (GELU) of the last encoder block
    whose patch tokens reach the class token, ``encoder.layers.encoder_layer_2.mlp.1`` (see
    :func:`export.models.find_default_layer`). The graph takes 128x128 only (a ViT's
    position embeddings fix its size): larger images are resized to it when served.

    Args:
        out: work folder; the export goes to ``out/export/<name>/<backend>``.
        model_store: folder that receives the ``.mar``.
        backend: ``torchscript`` or ``onnx``.
        name: model name.
        weights: the ``state_dict`` to export.
        log: receives progress lines.

    Returns:
        The path of the ``.mar``.
    """
    from export.pipeline import export_and_archive

    return export_and_archive(
        SPEC,
        Path(out) / "export" / name,
        model_store,
        backend=backend,
        name=name,
        log=log,
        weights=weights,
        labels=LABELS,
        input_size=INPUT_SIZE,
        mean=MEAN,
        std=STD,
        eager=True,
    )
