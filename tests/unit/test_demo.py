"""The demo's labels file, ShapesCNN and its shipped weights, and the training set built from the scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from demo.model import INPUT_SIZE, LAST_CONV_STAGE, NUM_CLASSES, preprocess, shapes_cnn
from scenes.synthetic import CLASSES, generate_dataset

DEMO = Path(__file__).resolve().parents[2] / "demo"
WEIGHTS = DEMO / "weights" / "shapes_cnn.pt"


def test_labels_file_matches_classes() -> None:
    assert (DEMO / "labels.txt").read_text().splitlines() == list(CLASSES)
    assert len(CLASSES) == NUM_CLASSES  # counted in demo.model, which must not import scenes (archives)


def test_last_conv_stage_is_8x8() -> None:
    model = shapes_cnn().eval()
    with torch.no_grad():
        features = model.features(torch.zeros(1, 3, *INPUT_SIZE))
        logits = model(torch.zeros(1, 3, *INPUT_SIZE))
    assert features.shape == (1, 128, 8, 8)
    assert logits.shape == (1, len(CLASSES))
    assert isinstance(getattr(model, LAST_CONV_STAGE), torch.nn.Module)


def test_shipped_weights_classify_fresh_scenes() -> None:
    model = shapes_cnn()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    model.eval()
    assert WEIGHTS.stat().st_size < 3 * 1024 * 1024
    scenes = generate_dataset(64, seed=424_242, two_object_fraction=0.0)
    with torch.no_grad():
        predicted = model(preprocess(np.stack([scene.image for scene in scenes]))).argmax(dim=1)
    truth = torch.tensor([scene.labels[0] for scene in scenes])
    assert (predicted == truth).float().mean().item() >= 0.9


def test_training_set_mixes_plain_grid_and_zoomed_scenes() -> None:
    from demo.train import TrainConfig, training_set

    config = TrainConfig(train_scenes=20, grid_fraction=0.25, zoom_fraction=0.25, grid_max_objects=2)
    images, targets, counts = training_set(config)
    assert images.shape == (20, *INPUT_SIZE, 3)
    assert counts["grid"] == 5
    assert counts["zoomed"] == 5
    assert sum(counts.values()) == 20
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    assert set(np.unique(targets)) <= {0.0, 0.5, 1.0}
    again, _, _ = training_set(config)
    np.testing.assert_array_equal(images, again)
    with pytest.raises(ValueError, match="grid_fraction"):
        TrainConfig(grid_fraction=0.7, zoom_fraction=0.5)


def test_lafam_pointing_game_matches_evaluation_metrics() -> None:
    import torch.nn.functional as F

    from demo.train import _features, lafam_pointing_game
    from evaluation import metrics

    model = shapes_cnn()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    model.eval()
    scenes = generate_dataset(24, seed=77, two_object_fraction=0.0)
    cam = _features(model, np.stack([scene.image for scene in scenes])).mean(dim=1, keepdim=True)
    low, high = cam.amin(dim=(2, 3), keepdim=True), cam.amax(dim=(2, 3), keepdim=True)
    cam = F.interpolate((cam - low) / (high - low), size=INPUT_SIZE, mode="nearest")[:, 0].double().numpy()
    expected = np.mean([metrics.pointing_game(a, scene.masks[0]) for a, scene in zip(cam, scenes, strict=True)])
    assert lafam_pointing_game(model, scenes)["any_max"] == pytest.approx(expected)
