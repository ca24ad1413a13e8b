"""Train :func:`demo.vit.shapes_vit` (torchvision ViT, 16-px patches) from scratch on generated scenes, on the CPU.

``python -m demo.train_vit --out demo/weights/shapes_vit.pt`` generates a training set with
:func:`demo.train.training_set` (plain single- and two-object scenes, 2x2 grids of four half-scale scenes with
soft targets 0.25 each, zoomed-out single-object scenes), trains with AdamW, a linear warmup then a cosine decay,
label smoothing, per-image augmentation (a random element of the square's symmetry group, as
:func:`demo.train._augment`, then a random translation with reflected borders) and an auxiliary loss during
training only: a linear classifier on the average of the last block's patch tokens (global average pooling, the
CNN's readout), beside the model's own head on the class token. Without it the class-token readout stayed at
chance for the first few hundred steps (the plateau of ViTs trained from scratch on little data); the auxiliary
head is dropped afterwards, the shipped ``state_dict`` is torchvision's model alone. Evaluates on freshly generated
held-out scenes (the seeds of :mod:`demo.train`) and writes the float32 ``state_dict`` to ``--out`` and a JSON
report beside it (same stem).

Only what is the ViT's own lives here (its settings, augmentation, schedule and auxiliary loss); the data, the
epoch loop, the held-out classification figures, the report's common keys and the command line are
:mod:`demo.train`'s.

A torchvision ViT takes one input size: 2x2 grids are evaluated at 128 px (each 128-px scene shrunk to 64 px,
``generate_grid(rng, 128, size=128)``), which is what a 256-px grid becomes when served (resized to 128).
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer

from demo import vit
from demo.model import INPUT_SIZE
from demo.train import (
    GRID_EVAL_SEED_OFFSET,
    GRID_TILE,
    TRAIN_GRID_SEED_OFFSET,
    TRAIN_ZOOM_SEED_OFFSET,
    SceneTrainConfig,
    _augment,
    fit,
    heldout_classification,
    heldout_grids,
    make_report,
    parameter_groups,
    parse_config,
    save,
    single_object_accuracy,
    top_k_rate,
    training_data,
)
from scenes.synthetic import CLASSES, generate_dataset

VALIDATION_SEED_OFFSET = 80_000
"""The small per-epoch validation set (single-object scenes) uses ``seed + VALIDATION_SEED_OFFSET``."""


@dataclass(frozen=True)
class ViTTrainConfig(SceneTrainConfig):
    """ViT training settings: :class:`demo.train.SceneTrainConfig`'s (with other defaults) and these.

    Training grids always hold four objects (soft target 0.25 each).

    Attributes:
        min_lr: learning rate at the end of the cosine decay.
        warmup_fraction: share of the steps spent in the linear warmup.
        label_smoothing: share of each target spread uniformly over the classes.
        shift: largest random translation, in pixels, per axis (reflected borders).
        aux_gap_weight: weight of the auxiliary loss of a linear classifier on the mean of the last block's
            patch tokens (training only; 0: none).
        clip_grad: gradient norm clipping threshold (0: none).
        val_scenes: single-object scenes evaluated after every epoch (their own seed; progress only).
    """

    LIMITS = (
        *SceneTrainConfig.LIMITS,
        *((name, 0, 1) for name in ("warmup_fraction", "label_smoothing")),
        *((name, 0, math.inf) for name in ("min_lr", "clip_grad", "aux_gap_weight", "val_scenes")),
        ("shift", 0, INPUT_SIZE[0] // 2 - 1),
    )

    train_scenes: int = 16_000
    grid_fraction: float = 0.15
    zoom_fraction: float = 0.15
    epochs: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    min_lr: float = 1e-5
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.1
    shift: int = 8
    aux_gap_weight: float = 1.0
    clip_grad: float = 1.0
    val_scenes: int = 500


def augment_each(batch: torch.Tensor, rng: np.random.Generator, shift: int) -> torch.Tensor:
    """Augment every image on its own: a random symmetry of the square, then a random translation.

    The symmetry is :func:`demo.train._augment`'s (a quarter turn and a mirror) applied to one image at a time;
    the translation is by up to ``shift`` pixels per axis, with reflected borders.

    Args:
        batch: ``(N, 3, H, W)`` normalised images.
        rng: the random generator.
        shift: largest translation in pixels (0: none).

    Returns:
        The augmented batch, same shape.
    """
    height, width = batch.shape[-2:]
    padded = F.pad(batch, (shift, shift, shift, shift), mode="reflect") if shift else batch
    offsets = rng.integers(0, 2 * shift + 1, size=(len(batch), 2)) if shift else np.zeros((len(batch), 2), int)
    out = torch.empty_like(batch)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = _augment(padded[i : i + 1, :, dy : dy + height, dx : dx + width], rng)[0]
    return out


def tokens(model: VisionTransformer, batch: torch.Tensor) -> torch.Tensor:
    """The encoder's output tokens ``(N, 1 + h*w, hidden)`` (after its final LayerNorm), as in ``forward``.

    ``model.heads(tokens(model, x)[:, 0])`` is ``model(x)``: torchvision's ``VisionTransformer.forward``
    step by step, so that the patch tokens are at hand too.
    """
    x = model._process_input(batch)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    return model.encoder(x)


def _schedule(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Learning rate at ``step``: linear warmup to ``lr`` over ``warmup`` steps, then cosine to ``min_lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def heldout_figures(model: nn.Module, config: ViTTrainConfig) -> dict[str, Any]:
    """Evaluate the model on freshly generated held-out scenes (the seeds of :mod:`demo.train`).

    Args:
        model: the classifier (eval mode).
        config: the settings (seed and held-out counts).

    Returns:
        The ``heldout`` section of the report.
    """
    size = INPUT_SIZE[0]
    figures, _ = heldout_classification(model, config)
    grid_seed = config.seed + GRID_EVAL_SEED_OFFSET
    return {
        **figures,
        "grid_128px_top4": top_k_rate(model, heldout_grids(config, size), 4),
        "grid_scenes": config.eval_grids,
        "grid_seed": grid_seed,
        "grid_definition": (
            f"generate_grid(default_rng({grid_seed}), tile={GRID_TILE}, size={size}): four {GRID_TILE}-px "
            f"single-object scenes of distinct classes, each shrunk (bilinear) to {size // 2} px, i.e. a "
            f"{2 * GRID_TILE}-px grid as served to this fixed-size model (resized to {size}); top4: the model's "
            "top-4 classes are the four labels"
        ),
    }


def train(config: ViTTrainConfig, log: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Generate the data, train a fresh ShapesViT and evaluate it on held-out scenes.

    Args:
        config: the settings.
        log: print progress to stdout (for the command line).

    Returns:
        The trained model (eval mode, float32) and the report written beside the weights.
    """
    started = time.perf_counter()
    images, targets, counts, rng = training_data(config)
    smoothed = targets * (1.0 - config.label_smoothing) + config.label_smoothing / len(CLASSES)
    validation = generate_dataset(
        config.val_scenes, config.seed + VALIDATION_SEED_OFFSET, size=INPUT_SIZE[0], two_object_fraction=0.0
    )
    generation_s = time.perf_counter() - started
    if log:
        print(f"generated {len(images)} training images ({counts}) in {generation_s:.1f} s", flush=True)

    model = vit.shapes_vit(len(CLASSES))
    aux_head = nn.Linear(model.hidden_dim, len(CLASSES))  # training only, on the mean patch token
    optimizer = torch.optim.AdamW(parameter_groups([model, aux_head], config.weight_decay), lr=config.lr)
    total_steps = config.epochs * (len(images) // config.batch_size)
    warmup = max(1, round(config.warmup_fraction * total_steps))

    def step(batch: torch.Tensor, index: np.ndarray, number: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = augment_each(batch, rng, config.shift)
        for group in optimizer.param_groups:
            group["lr"] = _schedule(number, total_steps, warmup, config.lr, config.min_lr)
        encoded = tokens(model, batch)
        logits = model.heads(encoded[:, 0])
        loss = F.cross_entropy(logits, smoothed[index])
        total, aux_loss = loss, 0.0
        if config.aux_gap_weight:
            aux = F.cross_entropy(aux_head(encoded[:, 1:].mean(dim=1)), smoothed[index])
            total, aux_loss = loss + config.aux_gap_weight * aux, aux.item()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if config.clip_grad:
            nn.utils.clip_grad_norm_([*model.parameters(), *aux_head.parameters()], config.clip_grad)
        optimizer.step()
        return logits, {"loss": loss.item(), "aux_gap_loss": aux_loss}

    def after_epoch() -> dict[str, float]:
        figures = {"val_top1": single_object_accuracy(model, validation)[0]} if validation else {}
        return {**figures, "elapsed_s": round(time.perf_counter() - started, 1)}

    history = fit(model, images, targets, config, rng=rng, step=step, after_epoch=after_epoch, log=log, started=started)
    del images

    model = model.float().eval()
    training_s = time.perf_counter() - started
    training = {
        **asdict(config),
        "optimizer": "AdamW (betas 0.9, 0.999), no weight decay on biases, norms, position embedding, class token",
        "schedule": "linear warmup over warmup_fraction of the steps, then cosine decay to min_lr (per step)",
        "loss": (
            "cross-entropy on soft targets (one-hot; 0.5/0.5 for two-object scenes; 0.25 x 4 for grids), "
            "smoothed: target * (1 - label_smoothing) + label_smoothing / num_classes; plus aux_gap_weight x "
            "the same loss of a linear classifier on the mean of the last block's patch tokens (after "
            "encoder.ln), training only: it is not part of the shipped state_dict"
        ),
        "augmentation": (
            "per image: random quarter turn and horizontal flip (demo.train._augment), then a random "
            "translation by up to `shift` px per axis with reflected borders"
        ),
        "data": {
            "plain": "generate_dataset(n_plain, seed, 128, two_object_fraction)",
            "grids": (
                f"generate_grid(rng, tile={GRID_TILE}, size={INPUT_SIZE[0]}), seed "
                f"{config.seed + TRAIN_GRID_SEED_OFFSET}; soft target 0.25 on each of the four classes"
            ),
            "zoomed": (
                f"generate_zoomed_scene(rng, {INPUT_SIZE[0]}, (zoom_min, zoom_max)), seed "
                f"{config.seed + TRAIN_ZOOM_SEED_OFFSET}; one-hot target"
            ),
            "counts": counts,
        },
        "validation": (
            f"val_top1: {config.val_scenes} single-object scenes, seed {config.seed + VALIDATION_SEED_OFFSET} "
            "(progress only; the weights of the last epoch are kept)"
        ),
        "train_top1": "on one-hot rows (single-object, plain or zoomed), under augmentation",
        "steps": total_steps,
        "warmup_steps": warmup,
        "history": history,
    }
    architecture = {
        "image_size": INPUT_SIZE[0],
        "patch_size": vit.PATCH_SIZE,
        "patch_grid": [INPUT_SIZE[0] // vit.PATCH_SIZE, INPUT_SIZE[1] // vit.PATCH_SIZE],
        "patch_embedding": (
            "torchvision conv stem (conv_stem_configs): 3x3 conv/BN/ReLU, (out_channels, stride) "
            f"{[list(layer) for layer in vit.STEM]}, then a 1x1 conv to hidden_dim (conv_proj.conv_last)"
        ),
        "num_layers": vit.NUM_LAYERS,
        "num_heads": vit.NUM_HEADS,
        "hidden_dim": vit.HIDDEN_DIM,
        "mlp_dim": vit.MLP_DIM,
        "tokens": "1 class token + 64 patch tokens; the head (heads.head) reads the class token",
    }
    report = make_report(
        model,
        header={"model": "ShapesViT (torchvision.models.VisionTransformer)", "factory": vit.SPEC},
        architecture={"architecture": architecture},
        heldout=heldout_figures(model, config),
        training=training,
        started=started,
        generation_s=generation_s,
        training_s=training_s,
    )
    return model, report


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: ``python -m demo.train_vit --out demo/weights/shapes_vit.pt``."""
    description = "Train the demo ShapesViT (torchvision ViT) on generated scenes."
    out, config = parse_config(ViTTrainConfig, description, argv)
    model, report = train(config, log=True)
    command = sys.argv[1:] if argv is None else list(argv)
    report["command"] = shlex.join(["python", "-m", "demo.train_vit", *command])
    report_path = save(model, report, out)
    heldout = report["heldout"]
    print(
        f"held-out single-object top-1 {heldout['single_object_top1']:.4f} ({config.eval_single} scenes), "
        f"two-object both-in-top-2 {heldout['two_object_both_in_top2']:.4f} ({config.eval_pairs} scenes), "
        f"grid top-4 at 128 px {heldout['grid_128px_top4']:.4f} ({config.eval_grids} grids), "
        f"wall time {report['wall_time_s']:.0f} s; wrote {out} and {report_path}"
    )


if __name__ == "__main__":
    main()
