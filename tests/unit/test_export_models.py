"""export.models: model specs, weights, the default layer, and an ActivationModel that leaves the user's model alone."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from export.models import ActivationModel, ModelSpecError, find_default_layer, resolve_model
from tests.tiny_models import Encoder

SIZE = (64, 64)  # small enough for every model below to stay above 1x1 at its last stage
THIS = __name__


class StageNet(nn.Module):
    """Layer names unlike torchvision's: encoder.stem, encoder.blocks.0..2, pool, head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.encoder(x)), 1))


def build_stage_net(num_classes: int = 10) -> StageNet:
    torch.manual_seed(0)
    model = StageNet(num_classes)
    for module in model.modules():  # non-trivial batch-norm statistics, so that eval mode matters
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def build_without_num_classes() -> StageNet:
    return build_stage_net()


def not_a_model() -> str:
    return "a string"


NOT_CALLABLE = 3


def snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "attributes": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "hooks": {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()},
        "modes": {name: m.training for name, m in model.named_modules()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(model)
    assert after["attributes"] == before["attributes"]
    assert all(hooks == (0, 0) for hooks in after["hooks"].values())  # type: ignore[union-attr]
    assert after["modes"] == before["modes"]
    state_before: dict[str, torch.Tensor] = before["state"]  # type: ignore[assignment]
    assert all(torch.equal(v, state_before[k]) for k, v in after["state"].items())  # type: ignore[union-attr]


# --- default layer ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet18", "layer4"),
        ("resnet50", "layer4"),
        ("vgg11_bn", "features"),
        ("densenet121", "features"),
        ("mobilenet_v3_small", "features"),
        ("efficientnet_b0", "features"),
        ("convnext_tiny", "features"),
        ("swin_t", "features.7.1.mlp.1"),  # its last block's MLP activation: not the norm after it (flat means)
    ],
)
def test_default_layer_of_torchvision_models(name: str, expected: str) -> None:
    model = resolve_model(name, num_classes=10)
    before = snapshot(model)
    assert find_default_layer(model, SIZE) == expected
    assert_unchanged(model, before)


def test_default_layer_at_the_default_input_size() -> None:
    assert find_default_layer(resolve_model("resnet18", num_classes=10)) == "layer4"


def test_default_layer_of_a_custom_model_is_the_shallowest_module_returning_the_last_activation() -> None:
    # encoder, encoder.blocks, encoder.blocks.2 and its ReLU (in place, so also its BN) return the same tensor.
    assert find_default_layer(build_stage_net(), SIZE) == "encoder"


def test_default_layer_restores_train_mode_and_leaves_no_hooks() -> None:
    model = build_stage_net().train()
    before = snapshot(model)
    find_default_layer(model, SIZE)
    assert_unchanged(model, before)  # batch-norm statistics included: the probe ran in eval mode


def test_default_layer_needs_a_spatial_activation() -> None:
    with pytest.raises(ModelSpecError, match=r"no module returns a 4-D activation larger than 1x1.*pass the layers"):
        find_default_layer(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), (8, 8))
    model = build_stage_net()
    with pytest.raises(ModelSpecError, match=r"input_size=\(2, 2\)"):
        find_default_layer(model, (2, 2))  # every stage is 1x1
    assert_unchanged(model, snapshot(build_stage_net()))


def test_default_layer_reports_a_failing_forward_pass() -> None:
    model = nn.Conv2d(1, 2, 3)  # expects one channel
    with pytest.raises(ModelSpecError, match=r"dummy forward pass at input_size=\(8, 8\) failed"):
        find_default_layer(model, (8, 8))
    assert not model._forward_hooks


@pytest.mark.parametrize("size", [(0, 8), (8,), "64", (8.0, 8)])
def test_default_layer_rejects_bad_input_size(size: object) -> None:
    with pytest.raises(ModelSpecError, match=r"input_size=.*two positive integers"):
        find_default_layer(build_stage_net(), size)  # type: ignore[arg-type]


class ChannelLast(nn.Module):
    """Two channel-last stages, like Swin's: (N, 8, 8, 8) at 32 px is ambiguous, (N, 4, 4, 16) is not."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.stage1 = nn.Sequential(nn.Linear(8, 8), nn.GELU())
        self.merge = nn.Conv2d(8, 16, 2, stride=2)
        self.stage2 = nn.Sequential(nn.Linear(16, 16), nn.GELU())
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.embed(x).permute(0, 2, 3, 1))  # (N, 8, 8, 8)
        x = self.stage2(self.merge(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))  # (N, 4, 4, 16)
        return self.head(self.norm(x).mean(dim=(1, 2)))


def test_default_layer_of_channel_last_stages_skips_the_norm() -> None:
    torch.manual_seed(0)
    assert find_default_layer(ChannelLast().eval(), (32, 32)) == "stage2"


def test_activation_model_permutes_channel_last_stages_and_settles_ambiguous_shapes() -> None:
    torch.manual_seed(0)
    model = ChannelLast().eval()
    x = torch.randn(2, 3, 32, 32)
    stage1: list[torch.Tensor] = []
    handle = model.stage1.register_forward_hook(lambda _m, _a, out: stage1.append(out))
    with torch.no_grad():
        model(x)
    handle.remove()
    decided = ActivationModel(model, ["stage1", "stage2"], input_size=(32, 32))  # the blocks vote: channel-last
    assert [decided.layouts[n].kind for n in ("stage1", "stage2")] == ["nhwc", "nhwc"]
    with torch.no_grad():
        _, first, second = decided(x)
    torch.testing.assert_close(first, stage1[0].permute(0, 3, 1, 2))
    assert second.shape == (2, 16, 4, 4)
    lazy = ActivationModel(model, ["stage1"])  # decided at the first forward, from the shape alone: NCHW
    with torch.no_grad():
        lazy(x)
    assert lazy.layouts["stage1"].kind == "nchw"
    hinted = ActivationModel(model, ["stage1"], hints={"stage1": "nhwc"})
    with torch.no_grad():
        torch.testing.assert_close(hinted(x)[1], first)
    with pytest.raises(ModelSpecError, match=r"hints=.*'nchw' or 'nhwc'"):
        ActivationModel(model, ["stage1"], hints={"stage1": "tokens"})


def test_a_stem_default_is_refused() -> None:
    # a conv stem, then a sequence model on (N, T, C) rows that are no token grid: the stem would be the default
    class Rows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 4, stride=4)
            self.mixer = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 8))
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = self.stem(x).flatten(2).transpose(1, 2)[:, :-3]  # 61 of 64 positions: no grid
            return self.head(self.mixer(rows).mean(dim=1))

    with pytest.raises(ModelSpecError, match=r"'stem' \(Conv2d\), the model's stem or patch embedding.*--layer"):
        find_default_layer(Rows().eval(), (32, 32))


# --- ActivationModel ----------------------------------------------------------------------------------------------


def test_activation_model_leaves_the_user_model_untouched() -> None:
    model = build_stage_net()
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    before = snapshot(model)
    wrapped = ActivationModel(model, ["encoder.blocks.2", "encoder.stem"])
    with torch.no_grad():
        main, *activations = wrapped(x)
        again = model(x)
    assert_unchanged(model, before)
    assert torch.equal(again, expected)
    assert torch.equal(main, expected)
    assert [tuple(a.shape) for a in activations] == [(2, 16, 16, 16), (2, 8, 32, 32)]
    own = {p.data_ptr() for p in model.parameters()}
    assert not own & {p.data_ptr() for p in wrapped.parameters()}  # a deep copy, not shared tensors


def test_activation_is_taken_before_later_in_place_ops() -> None:
    # encoder.blocks.2.1 is a BatchNorm whose output the next ReLU(inplace=True) overwrites.
    model = build_stage_net()
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    blocks = model.encoder.blocks
    with torch.no_grad():
        _, activation = ActivationModel(model, ["encoder.blocks.2.1"])(x)
        expected = blocks[2][1](blocks[2][0](blocks[1](blocks[0](model.encoder.stem(x)))))
    assert (activation < 0).any()
    assert torch.equal(activation, expected)


def test_activation_model_records_nothing_outside_its_forward() -> None:
    wrapped = ActivationModel(build_stage_net(), ["encoder"])
    with torch.no_grad():
        wrapped.model(torch.zeros(1, 3, *SIZE))  # the inner model alone: hooks stay silent
    assert wrapped._recording is None


def test_activation_model_deep_copy_hooks_its_own_copy() -> None:
    wrapped = ActivationModel(build_stage_net(), ["encoder.blocks.2"])
    twin = copy.deepcopy(wrapped)
    with torch.no_grad():
        for parameter in twin.model.encoder.parameters():
            parameter.add_(0.1)
        x = torch.randn(1, 3, *SIZE)
        _, original = wrapped(x)
        _, changed = twin(x)
    assert not torch.allclose(original, changed)


def test_layer_shapes() -> None:
    wrapped = ActivationModel(resolve_model("resnet18", num_classes=10), ["layer4", "layer3"])
    assert wrapped.layer_shapes(SIZE) == {"layer4": (512, 2, 2), "layer3": (256, 4, 4)}
    assert wrapped.layer_shapes((96, 64)) == {"layer4": (512, 3, 2), "layer3": (256, 6, 4)}
    assert not wrapped.training


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ("encoder.block.2", r"layer 'encoder\.block\.2' is not a module of StageNet .*encoder\.blocks\.2"),
        ("decoder", r"layer 'decoder' is not a module .*valid names include: .*encoder"),
        ("", r"layer '' is not a module"),
    ],
)
def test_activation_model_rejects_unknown_layers(layer: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message):
        ActivationModel(build_stage_net(), [layer])


def test_activation_model_rejects_empty_and_duplicated_layers() -> None:
    with pytest.raises(ModelSpecError, match="layers is empty"):
        ActivationModel(build_stage_net(), [])
    with pytest.raises(ModelSpecError, match="lists encoder more than once"):
        ActivationModel(build_stage_net(), ["encoder", "encoder"])


def test_activation_model_needs_4d_activations() -> None:
    wrapped = ActivationModel(build_stage_net(), ["head"])
    with pytest.raises(ModelSpecError, match=r"layer 'head' \(Linear\) returns a 2-D tensor .*choose a convolutional"):
        wrapped.layer_shapes(SIZE)


def test_activation_model_needs_layers_that_run() -> None:
    model = build_stage_net()
    model.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(ModelSpecError, match="unused did not run during the forward pass"):
        ActivationModel(model, ["unused"]).layer_shapes(SIZE)


# --- resolve_model: specs ---------------------------------------------------------------------------------------


def test_resolve_torchvision_model() -> None:
    model = resolve_model("ResNet18", num_classes=7)
    assert not model.training
    with torch.no_grad():
        assert model(torch.zeros(1, 3, *SIZE)).shape == (1, 7)


def test_resolve_factory_passes_num_classes() -> None:
    model = resolve_model(f"{THIS}:build_stage_net", num_classes=3)
    assert isinstance(model, StageNet)
    assert model.head.out_features == 3
    assert not model.training


def test_resolve_factory_class() -> None:
    assert isinstance(resolve_model(f"{THIS}:StageNet", num_classes=4), StageNet)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spec": "resnet51"}, r"spec='resnet51' is not a torchvision classification model \(close matches: resnet50"),
        ({"spec": "mypkg.models.build"}, r"with a colon"),
        ({"spec": "pkg.mod:"}, r"not of the form 'package\.module:factory'"),
        ({"spec": ":factory"}, r"not of the form 'package\.module:factory'"),
        ({"spec": "a:b:c"}, r"not of the form 'package\.module:factory'"),
        ({"spec": "my pkg:f"}, r"not of the form 'package\.module:factory'"),
        (
            {"spec": "no_such_package_xyz.models:build"},
            r"cannot import module 'no_such_package_xyz\.models'.*PYTHONPATH",
        ),
        ({"spec": f"{THIS}:build_stage_nte"}, r"has no attribute 'build_stage_nte' \(close matches: build_stage_net"),
        ({"spec": f"{THIS}:NOT_CALLABLE"}, r"'NOT_CALLABLE' is a int, not a callable factory"),
        ({"spec": f"{THIS}:not_a_model"}, r"returned a str, not a torch\.nn\.Module; make it return the model"),
        (
            {"spec": f"{THIS}:build_without_num_classes", "num_classes": 3},
            r"num_classes=3 was given but factory .* takes no num_classes argument; drop num_classes",
        ),
        ({"spec": "", "num_classes": None}, r"spec='' must be a torchvision model name"),
        ({"spec": "resnet18", "num_classes": 0}, r"num_classes=0 must be a positive integer"),
        ({"spec": "resnet18", "num_classes": True}, r"num_classes=True must be a positive integer"),
        ({"spec": "resnet18", "task": "detection"}, r"task='detection' is not supported; use one of: classification"),
    ],
)
def test_resolve_rejects_bad_specs(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ModelSpecError, match=message):
        resolve_model(**kwargs)  # type: ignore[arg-type]


def test_model_spec_error_is_a_value_error() -> None:
    assert issubclass(ModelSpecError, ValueError)


# --- resolve_model: weights ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(3)
    model = resolve_model("resnet18", num_classes=10)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module-prefix"])
def test_weights_round_trip(resnet_weights: tuple[nn.Module, Path], tmp_path: Path, wrap: str) -> None:
    model, path = resnet_weights
    state = model.state_dict()
    if wrap != "plain":
        path = tmp_path / f"{wrap}.pt"
        if wrap == "module-prefix":
            torch.save({f"module.{k}": v for k, v in state.items()}, path)
        else:
            torch.save({wrap: state, "epoch": 3}, path)
    loaded = resolve_model("resnet18", num_classes=10, weights=path)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training


@pytest.mark.parametrize("wrap", ["plain", "data-parallel"])
def test_weights_keep_the_module_versions_a_model_needs(tmp_path: Path, wrap: str) -> None:
    # MNASNet's _load_from_state_dict refuses a state_dict without the versions torch.save keeps beside it.
    torch.manual_seed(0)
    model = resolve_model("mnasnet0_5", num_classes=10)
    path = tmp_path / "mnasnet.pt"
    torch.save((model if wrap == "plain" else nn.DataParallel(model)).state_dict(), path)
    loaded = resolve_model("mnasnet0_5", num_classes=10, weights=path)
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_weights_for_another_head_name_num_classes(resnet_weights: tuple[nn.Module, Path]) -> None:
    _, path = resnet_weights
    with pytest.raises(ModelSpecError, match=r"shape mismatch: fc\.weight .*pass num_classes=10"):
        resolve_model("resnet18", weights=path)


def test_weights_with_missing_and_unexpected_keys(resnet_weights: tuple[nn.Module, Path], tmp_path: Path) -> None:
    model, _ = resnet_weights
    state = model.state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(ModelSpecError, match=r"missing keys: layer1\.0\.conv1\.weight; unexpected keys: extra\.weight"):
        resolve_model("resnet18", num_classes=10, weights=path)


def test_weights_files_that_are_not_state_dicts(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match=r"weights='.*missing\.pt' is not a file"):
        resolve_model("resnet18", weights=tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelSpecError, match=r"cannot be read with torch\.load\(weights_only=True\)"):
        resolve_model("resnet18", weights=garbage)
    pickled = tmp_path / "pickled.pt"
    torch.save(build_stage_net(), pickled)
    with pytest.raises(ModelSpecError, match=r"save a state_dict .*not a pickled model"):
        resolve_model(f"{THIS}:build_stage_net", weights=pickled)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ModelSpecError, match=r"does not hold a state_dict"):
        resolve_model(f"{THIS}:build_stage_net", weights=listed)


# --- resolve_model: embeddings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dim"),
    [
        ("resnet18", 512),
        ("vgg11_bn", 4096),
        ("densenet121", 1024),
        ("mobilenet_v3_small", 1024),
        ("efficientnet_b0", 1280),
        ("convnext_tiny", 768),
    ],
)
def test_embedding_drops_the_final_linear_layer(name: str, dim: int) -> None:
    model = resolve_model(name, task="embedding")
    with torch.no_grad():
        assert model(torch.zeros(1, 3, *SIZE)).shape == (1, dim)


def test_embedding_from_a_classifier_checkpoint(resnet_weights: tuple[nn.Module, Path], tmp_path: Path) -> None:
    classifier, path = resnet_weights
    encoder = resolve_model("resnet18", task="embedding", num_classes=10, weights=path)
    classifier = copy.deepcopy(classifier)
    classifier.fc = nn.Identity()
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(encoder(x), classifier(x))
    encoder_only = tmp_path / "encoder.pt"
    torch.save(classifier.state_dict(), encoder_only)  # no fc.* keys
    reloaded = resolve_model("resnet18", task="embedding", weights=encoder_only)
    with torch.no_grad():
        assert torch.equal(reloaded(x), classifier(x))


def test_embedding_needs_a_linear_head() -> None:
    with pytest.raises(ModelSpecError, match=r"cannot find the classification head of 'squeezenet1_0'"):
        resolve_model("squeezenet1_0", task="embedding")


def test_embedding_factory_model_is_used_as_returned() -> None:
    assert isinstance(resolve_model(f"{THIS}:build_stage_net", task="embedding").head, nn.Linear)
