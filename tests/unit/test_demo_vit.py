"""The demo's ShapesViT: a torchvision ViT, its shipped weights and their training report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.models import VisionTransformer

from demo import vit
from demo.model import INPUT_SIZE, preprocess
from demo.train import parse_config, training_set
from demo.train_vit import ViTTrainConfig, augment_each, tokens, train
from scenes.synthetic import CLASSES, generate_dataset


def _shipped() -> VisionTransformer:
    model = vit.shapes_vit()
    model.load_state_dict(torch.load(vit.WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()


def test_factory_is_a_torchvision_vit_on_an_8x8_patch_grid() -> None:
    model = vit.shapes_vit().eval()
    assert type(model) is VisionTransformer
    assert model.image_size == INPUT_SIZE[0]
    assert INPUT_SIZE[0] // model.patch_size == 8
    assert any(isinstance(module, torch.nn.MultiheadAttention) for module in model.modules())
    captured = []
    handle = model.encoder.layers[-2].register_forward_hook(lambda _m, _i, output: captured.append(output))
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, *INPUT_SIZE))
    handle.remove()
    assert logits.shape == (1, len(CLASSES))
    assert captured[0].shape == (1, 1 + 8 * 8, vit.HIDDEN_DIM)
    with pytest.raises(ValueError, match="num_classes"):
        vit.shapes_vit(0)


def test_shipped_weights_load_and_are_small() -> None:
    assert vit.WEIGHTS.stat().st_size < 5 * 1024 * 1024
    state = torch.load(vit.WEIGHTS, map_location="cpu", weights_only=True)
    assert all(tensor.dtype == torch.float32 for tensor in state.values() if tensor.is_floating_point())
    vit.shapes_vit().load_state_dict(state)  # strict: same architecture, every key


def test_report_records_the_training_and_held_out_figures() -> None:
    report = json.loads(vit.REPORT.read_text())
    heldout = report["heldout"]
    assert heldout["single_object_top1"] >= 0.90
    assert heldout["single_object_scenes"] >= 1000
    assert 0.0 <= heldout["two_object_both_in_top2"] <= 1.0
    assert 0.0 <= heldout["grid_128px_top4"] <= 1.0
    assert report["command"].startswith("python -m demo.train_vit")
    assert report["wall_time_s"] > 0
    assert report["weights_bytes"] == vit.WEIGHTS.stat().st_size
    assert report["classes"] == list(CLASSES)
    assert report["architecture"]["patch_size"] == vit.PATCH_SIZE
    assert report["architecture"]["num_layers"] == vit.NUM_LAYERS
    assert report["architecture"]["hidden_dim"] == vit.HIDDEN_DIM
    ViTTrainConfig(**{key: report["training"][key] for key in ViTTrainConfig.__dataclass_fields__})


def test_shipped_weights_classify_fresh_scenes() -> None:
    model = _shipped()
    scenes = generate_dataset(20, seed=515_151, two_object_fraction=0.0)  # no training or report seed
    with torch.no_grad():
        predicted = model(preprocess(np.stack([scene.image for scene in scenes]))).argmax(dim=1)
    truth = torch.tensor([scene.labels[0] for scene in scenes])
    assert int((predicted == truth).sum()) >= 18


def test_tokens_is_the_forward_pass_step_by_step() -> None:
    torch.manual_seed(0)
    model = vit.shapes_vit().eval()
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
    x = torch.randn(2, 3, *INPUT_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.heads(tokens(model, x)[:, 0]), model(x), rtol=0, atol=0)


def test_augment_each_keeps_shape_and_moves_images_independently() -> None:
    batch = preprocess(np.stack([scene.image for scene in generate_dataset(4, seed=3, two_object_fraction=0.0)]))
    same = augment_each(batch, np.random.default_rng(0), shift=0)
    assert same.shape == batch.shape
    for original, augmented in zip(batch, same, strict=True):  # a symmetry of the square only: same pixels
        torch.testing.assert_close(original.flatten().sort().values, augmented.flatten().sort().values)
    moved = augment_each(batch, np.random.default_rng(0), shift=8)
    assert moved.shape == batch.shape
    with pytest.raises(ValueError, match="shift"):
        ViTTrainConfig(shift=INPUT_SIZE[0])


def test_training_set_grids_hold_four_objects() -> None:
    config = ViTTrainConfig(train_scenes=8, grid_fraction=0.25, zoom_fraction=0.25, threads=1)
    images, targets, counts = training_set(config)
    assert images.shape == (8, *INPUT_SIZE, 3)
    assert counts == {"single": 3, "two_object": 1, "grid": 2, "zoomed": 2}
    grids = targets[4:6]  # plain scenes first, then grids, then zoomed-out scenes
    np.testing.assert_array_equal(np.sort(grids, axis=1), [[0, 0, 0.25, 0.25, 0.25, 0.25]] * 2)


def test_command_line_has_an_option_per_setting(tmp_path) -> None:
    out, config = parse_config(
        ViTTrainConfig, "test", ["--out", str(tmp_path / "w.pt"), "--shift", "4", "--lr", "2e-3"]
    )
    assert out == tmp_path / "w.pt"
    assert config == ViTTrainConfig(shift=4, lr=2e-3)
    with pytest.raises(SystemExit):
        parse_config(ViTTrainConfig, "test", ["--out", "w.pt", "--shift", str(INPUT_SIZE[0])])


def test_tiny_training_run_records_each_epoch() -> None:
    threads = torch.get_num_threads()
    config = ViTTrainConfig(
        train_scenes=16, batch_size=8, epochs=1, eval_single=4, eval_pairs=2, eval_grids=2, val_scenes=2, threads=1
    )
    try:
        model, report = train(config)
    finally:
        torch.set_num_threads(threads)
    assert report["training"]["steps"] == 2
    assert list(report["training"]["history"][0]) == [
        "epoch",
        "loss",
        "aux_gap_loss",
        "train_top1",
        "val_top1",
        "elapsed_s",
    ]
    vit.shapes_vit().load_state_dict(model.state_dict())  # the auxiliary head is not part of the model
