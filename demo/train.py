"""Train :class:`demo.model.ShapesCNN` from scratch on generated scenes, on the CPU.

``python -m demo.train --out demo/weights/shapes_cnn.pt`` generates a training set (single-object scenes
with a one-hot target, two-object scenes with 0.5/0.5 soft targets), trains with AdamW and a one-cycle
schedule under random flips and quarter turns, evaluates on freshly generated held-out scenes (other
seeds), and writes the float32 ``state_dict`` to ``--out`` and a JSON report beside it (same stem).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from demo.model import INPUT_SIZE, LAST_CONV_STAGE, MEAN, STAGE_CHANNELS, STAGES, STD, preprocess, shapes_cnn
from demo.scenes import CLASSES, Scene, generate_dataset

SINGLE_EVAL_SEED_OFFSET = 10_000
"""Held-out single-object scenes use ``seed + SINGLE_EVAL_SEED_OFFSET``."""

PAIR_EVAL_SEED_OFFSET = 20_000
"""Held-out two-object scenes use ``seed + PAIR_EVAL_SEED_OFFSET``."""


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (all recorded in the JSON report).

    Attributes:
        seed: seed of the training scenes, the initialisation and the batch order.
        train_scenes: number of generated training scenes.
        two_object_fraction: share of two-object scenes in the training set.
        epochs: passes over the training set.
        batch_size: scenes per optimisation step.
        lr: peak learning rate of the one-cycle schedule.
        weight_decay: decoupled weight decay of the conv and linear weights (none on BN and biases).
        eval_single: number of held-out single-object scenes.
        eval_pairs: number of held-out two-object scenes.
        threads: torch intra-op threads.
    """

    seed: int = 0
    train_scenes: int = 16_000
    two_object_fraction: float = 0.25
    epochs: int = 7
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    eval_single: int = 2_000
    eval_pairs: int = 1_000
    threads: int = 2

    def __post_init__(self) -> None:
        """Validate the settings.

        Raises:
            ValueError: naming the first setting that is out of range.
        """
        for name in ("train_scenes", "epochs", "batch_size", "eval_single", "eval_pairs", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.two_object_fraction <= 1.0:
            raise ValueError(f"two_object_fraction must be in [0, 1], got {self.two_object_fraction}")
        for name in ("lr", "weight_decay"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def soft_targets(scenes: Sequence[Scene]) -> np.ndarray:
    """Return ``(N, num_classes)`` float32 targets: each scene's objects share probability 1 equally.

    Args:
        scenes: the scenes.

    Returns:
        The target distributions (one-hot for single-object scenes, 0.5/0.5 for two-object scenes).
    """
    targets = np.zeros((len(scenes), len(CLASSES)), dtype=np.float32)
    for i, scene in enumerate(scenes):
        targets[i, list(scene.labels)] = 1.0 / len(scene.labels)
    return targets


def _augment(batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Apply one random element of the square's symmetry group (quarter turns, mirror) to the whole batch.

    Every class is still itself after any of these, so the labels stay valid.
    """
    turns = int(rng.integers(0, 4))
    if turns:
        batch = torch.rot90(batch, turns, dims=(2, 3))
    if rng.random() < 0.5:
        batch = torch.flip(batch, dims=(3,))
    return batch


@torch.no_grad()
def predict_logits(model: nn.Module, scenes: Sequence[Scene], batch_size: int = 256) -> torch.Tensor:
    """Return the model's ``(N, num_classes)`` logits for the scenes' images, in eval mode.

    Args:
        model: the classifier.
        scenes: the scenes.
        batch_size: images per forward pass.

    Returns:
        The logits, float32, on the CPU.
    """
    model.eval()
    chunks = []
    for start in range(0, len(scenes), batch_size):
        images = np.stack([scene.image for scene in scenes[start : start + batch_size]])
        chunks.append(model(preprocess(images).contiguous(memory_format=torch.channels_last)))
    return torch.cat(chunks) if chunks else torch.empty(0, len(CLASSES))


def single_object_accuracy(model: nn.Module, scenes: Sequence[Scene]) -> tuple[float, dict[str, float]]:
    """Top-1 accuracy on single-object scenes, overall and per class.

    Args:
        model: the classifier.
        scenes: single-object scenes.

    Returns:
        ``(accuracy, {class name: accuracy})``.

    Raises:
        ValueError: if ``scenes`` is empty or holds a scene with other than one object.
    """
    if not scenes or any(len(scene.labels) != 1 for scene in scenes):
        raise ValueError("scenes must be a non-empty list of single-object scenes")
    predicted = predict_logits(model, scenes).argmax(dim=1).numpy()
    truth = np.array([scene.labels[0] for scene in scenes])
    per_class = {
        name: float(np.mean(predicted[truth == c] == c)) for c, name in enumerate(CLASSES) if np.any(truth == c)
    }
    return float(np.mean(predicted == truth)), per_class


def both_in_top2_rate(model: nn.Module, scenes: Sequence[Scene]) -> float:
    """Share of two-object scenes whose two classes are exactly the model's top-2 predictions.

    Args:
        model: the classifier.
        scenes: two-object scenes.

    Returns:
        The rate, in [0, 1].

    Raises:
        ValueError: if ``scenes`` is empty or holds a scene with other than two objects.
    """
    if not scenes or any(len(scene.labels) != 2 for scene in scenes):
        raise ValueError("scenes must be a non-empty list of two-object scenes")
    top2 = predict_logits(model, scenes).topk(2, dim=1).indices.numpy()
    hits = [set(row.tolist()) == set(scene.labels) for row, scene in zip(top2, scenes, strict=True)]
    return float(np.mean(hits))


def train(config: TrainConfig, log: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Generate the data, train a fresh model and evaluate it on held-out scenes.

    Args:
        config: the settings.
        log: print progress to stdout (for the command line).

    Returns:
        The trained model (eval mode, contiguous float32 weights) and the report written beside the weights.
    """
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    scenes = generate_dataset(
        config.train_scenes, config.seed, size=INPUT_SIZE[0], two_object_fraction=config.two_object_fraction
    )
    images = np.stack([scene.image for scene in scenes])
    targets = torch.from_numpy(soft_targets(scenes))
    del scenes
    generation_s = time.perf_counter() - started
    if log:
        print(f"generated {len(images)} training scenes in {generation_s:.1f} s")

    model = shapes_cnn(len(CLASSES)).to(memory_format=torch.channels_last)
    decay = [p for name, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for name, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    steps_per_epoch = len(images) // config.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.1
    )

    history = []
    for epoch in range(config.epochs):
        model.train()
        order = rng.permutation(len(images))
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            index = np.sort(order[step * config.batch_size : (step + 1) * config.batch_size])
            batch = _augment(preprocess(images[index]), rng).contiguous(memory_format=torch.channels_last)
            target = targets[index]
            logits = model(batch)
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(index)
            correct += int((logits.argmax(1) == target.argmax(1)).sum())
            seen += len(index)
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "train_top1": correct / seen})
        if log:
            elapsed = time.perf_counter() - started
            print(
                f"epoch {epoch + 1}/{config.epochs}: loss {loss_sum / seen:.4f}, "
                f"train top-1 {correct / seen:.4f}, {elapsed:.0f} s"
            )
    del images

    model = model.to(memory_format=torch.contiguous_format).float().eval()
    single_seed = config.seed + SINGLE_EVAL_SEED_OFFSET
    pair_seed = config.seed + PAIR_EVAL_SEED_OFFSET
    single = generate_dataset(config.eval_single, single_seed, size=INPUT_SIZE[0], two_object_fraction=0.0)
    pairs = generate_dataset(config.eval_pairs, pair_seed, size=INPUT_SIZE[0], two_object_fraction=1.0)
    top1, per_class = single_object_accuracy(model, single)
    top2 = both_in_top2_rate(model, pairs)
    wall_s = time.perf_counter() - started

    report: dict[str, Any] = {
        "model": "ShapesCNN",
        "classes": list(CLASSES),
        "input_size": list(INPUT_SIZE),
        "mean": list(MEAN),
        "std": list(STD),
        "stages": dict(zip(STAGES, STAGE_CHANNELS, strict=True)),
        "last_conv_stage": LAST_CONV_STAGE,
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout": {
            "single_object_top1": top1,
            "single_object_top1_per_class": per_class,
            "single_object_scenes": config.eval_single,
            "single_object_seed": single_seed,
            "two_object_both_in_top2": top2,
            "two_object_scenes": config.eval_pairs,
            "two_object_seed": pair_seed,
        },
        "training": {
            **asdict(config),
            "optimizer": "AdamW, no weight decay on BN and biases",
            "schedule": "OneCycleLR, pct_start=0.1",
            "loss": "cross-entropy on soft targets (one-hot, or 0.5/0.5 for two-object scenes)",
            "augmentation": "random quarter turn and horizontal flip per batch",
            "steps": config.epochs * steps_per_epoch,
            "history": history,
        },
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "device": "cpu",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "generation_s": round(generation_s, 1),
        "wall_time_s": round(wall_s, 1),
    }
    return model, report


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: ``python -m demo.train --out demo/weights/shapes_cnn.pt``."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description="Train the demo ShapesCNN on generated scenes (CPU).")
    parser.add_argument("--out", required=True, type=Path, help="state_dict output (.pt); the report goes beside it")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--train-scenes", type=int, default=defaults.train_scenes)
    parser.add_argument("--two-object-fraction", type=float, default=defaults.two_object_fraction)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--eval-single", type=int, default=defaults.eval_single)
    parser.add_argument("--eval-pairs", type=int, default=defaults.eval_pairs)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    args = parser.parse_args(argv)
    try:
        config = TrainConfig(
            seed=args.seed,
            train_scenes=args.train_scenes,
            two_object_fraction=args.two_object_fraction,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            eval_single=args.eval_single,
            eval_pairs=args.eval_pairs,
            threads=args.threads,
        )
    except ValueError as error:
        parser.error(str(error))

    model, report = train(config, log=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Floating tensors as float32; BN's integer num_batches_tracked keeps its dtype.
    state = {
        name: tensor.detach().clone().float() if tensor.is_floating_point() else tensor.detach().clone()
        for name, tensor in model.state_dict().items()
    }
    torch.save(state, args.out)
    report["weights_file"] = args.out.name
    report["weights_bytes"] = args.out.stat().st_size
    report_path = args.out.with_suffix(".json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    heldout = report["heldout"]
    print(
        f"held-out single-object top-1 {heldout['single_object_top1']:.4f} ({config.eval_single} scenes), "
        f"two-object both-in-top-2 {heldout['two_object_both_in_top2']:.4f} ({config.eval_pairs} scenes), "
        f"wall time {report['wall_time_s']:.0f} s; wrote {args.out} and {report_path}"
    )


if __name__ == "__main__":
    main()
