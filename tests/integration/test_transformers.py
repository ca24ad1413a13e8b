"""Transformers end to end: a ViT block's tokens and a Swin stage's channel-last map, exported and served.

A tiny torchvision ``VisionTransformer`` (32 px, patches of 8: a class token + 4x4 patch tokens) and
``swin_t`` (random init, 64 px: a 2x2 last stage) are exported with their eager model; the graph turns the
layer's output into a map ``(N, C, h, w)`` and ``LafamService`` serves LaFAM on ``/predictions`` and the
backward methods (Grad-CAM on the token grid, input x gradient, both distributions) on ``/explanations``.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from export.exporter import export_model
from export.models import ActivationModel, ModelSpecError, find_default_layer, resolve_model
from handlers.explain.gradients import GradCAM
from handlers.manifest import Manifest
from handlers.service import LafamService, Request

pytestmark = pytest.mark.usefixtures("one_torch_thread")

THIS = __name__
VIT_SIZE = (32, 32)
SWIN_SIZE = (64, 64)
CLASSES = 4
LAST = "encoder.layers.encoder_layer_1"
VIT_BLOCK = "encoder.layers.encoder_layer_0"  # the class token alone leaves the last block: see find_default_layer
VIT_DEFAULT = VIT_BLOCK + ".mlp.1"  # that block's MLP activation (GELU): non-negative, as LaFAM's channel mean wants


def tiny_vit(num_classes: int = CLASSES) -> VisionTransformer:
    """torchvision's ViT, tiny: 32 px, 8 px patches (4x4 grid + class token), 2 blocks of width 32."""
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=num_classes
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision initialises the head to zero: no gradients
    return model.eval()


class RegisterViT(nn.Module):
    """The tiny ViT with ``registers`` learned tokens before its class token (read by the head: token 0)."""

    def __init__(self, num_classes: int = CLASSES, registers: int = 4) -> None:
        super().__init__()
        self.vit = tiny_vit(num_classes)
        self.registers = nn.Parameter(torch.randn(1, registers, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        tokens = vit._process_input(x)
        n = tokens.shape[0]
        tokens = torch.cat([vit.class_token.expand(n, -1, -1), tokens], dim=1) + vit.encoder.pos_embedding
        tokens = torch.cat([self.registers.expand(n, -1, -1), tokens], dim=1)
        return vit.heads(vit.encoder.ln(vit.encoder.layers(tokens))[:, self.registers.shape[1]])


def register_vit(num_classes: int = CLASSES, registers: int = 4) -> RegisterViT:
    return RegisterViT(num_classes, registers).eval()


def too_many_registers(num_classes: int = CLASSES) -> RegisterViT:
    return RegisterViT(num_classes, registers=20).eval()  # 21 leading tokens: more than the 16 tried


class HeadOnClassToken(nn.Module):
    """A ViT without a final LayerNorm: the block's tokens → token 0 → Linear. Structurally GAP-like to a trace."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = tiny_vit()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        tokens = vit._process_input(x)
        tokens = torch.cat([vit.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return vit.heads.head(vit.encoder.layers(tokens + vit.encoder.pos_embedding)[:, 0])


def image_bytes(size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def ask(service: LafamService, *, explain: bool = True, **options: Any) -> tuple[int, dict[str, Any]]:
    headers = {f"x-lafam-{k.replace('_', '-')}": str(v) for k, v in options.items()}
    (reply,) = service.predict([Request({"body": image_bytes()}, headers, {}, explain=explain)])
    return reply.status, json.loads(json.dumps(reply.body))


# ---- the default layer ------------------------------------------------------------------------------------------


def test_default_layer_of_a_vit_is_the_mlp_activation_of_the_last_block_whose_patch_tokens_reach_the_head() -> None:
    assert find_default_layer(tiny_vit(), VIT_SIZE) == VIT_DEFAULT
    assert find_default_layer(register_vit(), VIT_SIZE) == "vit." + VIT_DEFAULT


def test_default_layer_of_swin_is_the_mlp_activation_of_its_last_block() -> None:
    assert find_default_layer(resolve_model("swin_t", num_classes=CLASSES), SWIN_SIZE) == "features.7.1.mlp.1"


def test_a_transformer_block_without_an_activation_on_its_grid_is_taken_as_it_is() -> None:
    model = tiny_vit()
    for layer in model.encoder.layers:
        layer.mlp[1] = nn.Identity()  # no activation module left in the blocks
    assert find_default_layer(model, VIT_SIZE) == VIT_BLOCK


def test_a_default_on_the_patch_embedding_is_refused() -> None:
    with pytest.raises(ModelSpecError) as info:
        find_default_layer(too_many_registers(), VIT_SIZE)
    message = str(info.value)
    assert "'vit.conv_proj' (Conv2d), the model's stem or patch embedding" in message
    assert "not a token grid" in message
    assert "T=37" in message
    assert "--layer" in message


# ---- the graph's outputs: tokens and channel-last maps become (N, C, h, w) ---------------------------------------


def test_activation_model_turns_tokens_into_the_patch_grid() -> None:
    model = register_vit()
    wrapped = ActivationModel(model, ["vit." + LAST, "vit.conv_proj"], input_size=VIT_SIZE)
    assert wrapped.layouts["vit." + LAST][:3] == ("tokens", 5, (4, 4))
    x = torch.randn(2, 3, *VIT_SIZE)
    with torch.no_grad():
        _, tokens_map, patches = wrapped(x)
        tokens = []
        hook = model.vit.encoder.layers[1].register_forward_hook(lambda _m, _a, out: tokens.append(out))
        model(x)
        hook.remove()
    assert tokens_map.shape == patches.shape == (2, 32, 4, 4)
    torch.testing.assert_close(tokens_map.flatten(2).transpose(1, 2), tokens[0][:, 5:])


def test_activation_model_names_why_a_token_output_is_no_grid() -> None:
    with pytest.raises(ModelSpecError, match=r"returns a 3-D tensor .*not a token grid.*T=37"):
        ActivationModel(too_many_registers(), ["vit." + LAST], input_size=VIT_SIZE)


# ---- Grad-CAM on the token grid ------------------------------------------------------------------------------------


def test_gradcam_on_vit_tokens_falls_back_to_autograd_and_matches_the_definition() -> None:
    model = tiny_vit()
    x = torch.randn(2, 3, *VIT_SIZE, generator=torch.Generator().manual_seed(1))
    cam = GradCAM(model, VIT_BLOCK).decide(x)
    assert cam.closed_form is False  # a LayerNorm after the layer, and a class-token head
    maps = cam(x, torch.tensor([[0, 3], [1, 2]]))
    assert maps.shape == (2, 2, 4, 4)
    # reference: gradients w.r.t. the block's raw output, patch tokens only
    captured = []
    hook = model.encoder.layers[0].register_forward_hook(lambda _m, _a, out: captured.append(out))
    logits = model(x)
    hook.remove()
    tokens = captured[0]
    (grad,) = torch.autograd.grad(logits[0, 3], tokens)
    acts, grads = tokens[0, 1:].detach().T.reshape(32, 4, 4), grad[0, 1:].T.reshape(32, 4, 4)
    expected = (grads.mean(dim=(1, 2))[:, None, None] * acts).sum(0)
    torch.testing.assert_close(maps[0, 1], expected, rtol=1e-4, atol=1e-6)
    assert float(maps.abs().amax()) > 0


def test_gradcam_closed_form_says_no_to_a_class_token_head_without_a_norm() -> None:
    model = HeadOnClassToken().eval()
    x = torch.randn(1, 3, *VIT_SIZE, generator=torch.Generator().manual_seed(2))
    cam = GradCAM(model, "vit.encoder.layers").decide(x)
    assert cam.closed_form is False  # the trace sees layer → Linear, but the head does not read the token mean
    with pytest.raises(ValueError, match="closed_form=True needs"):
        GradCAM(model, "vit.encoder.layers", closed_form=True)(x, torch.tensor([[1]]))


def test_gradcam_on_a_swin_stage() -> None:
    model = resolve_model("swin_t", num_classes=CLASSES)
    x = torch.randn(1, 3, *SWIN_SIZE, generator=torch.Generator().manual_seed(3))
    cam = GradCAM(model, "features.5").decide(x)
    assert cam.closed_form is False
    maps = cam(x, torch.tensor([[0, 1]]))
    assert maps.shape == (1, 2, 4, 4)  # stage 3 of swin_t: stride 16
    assert bool(maps.isfinite().all())
    assert float(maps.abs().amax()) > 0


# ---- served end to end ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_service(tmp_path_factory: pytest.TempPathFactory) -> LafamService:
    folders = export_model(
        f"{THIS}:tiny_vit",
        tmp_path_factory.mktemp("vit"),
        backends=("onnx", "torchscript"),
        input_size=VIT_SIZE,
        eager=True,
        log=lambda _: None,
    )
    for backend, folder in folders.items():
        manifest = Manifest.load(folder)
        assert manifest.layers[0].name == VIT_DEFAULT, backend
        assert (manifest.layers[0].layout, manifest.layers[0].shape) == ("tokens", (64, 4, 4))  # the MLP width
    return LafamService.from_folder(folders["onnx"])


@pytest.fixture(scope="module")
def swin_service(tmp_path_factory: pytest.TempPathFactory) -> LafamService:
    folders = export_model(
        "swin_t",
        tmp_path_factory.mktemp("swin"),
        backends=("torchscript",),
        num_classes=CLASSES,
        layers=["features.5", "features"],
        input_size=SWIN_SIZE,
        eager=True,
        log=lambda _: None,
    )
    manifest = Manifest.load(folders["torchscript"])
    assert [(s.layout, s.shape) for s in manifest.layers] == [("nhwc", (384, 4, 4)), ("nhwc", (768, 2, 2))]
    return LafamService.from_folder(folders["torchscript"])


REQUESTS: list[dict[str, str]] = [
    {"method": "gradcam"},
    {"method": "input_x_gradient"},
    {"method": "distribution", "base": "gradcam"},
    {"method": "distribution", "base": "input_x_gradient"},
    {"method": "distribution_fast", "base": "input_x_gradient"},
]


def served_maps(service: LafamService, grid: tuple[int, int], input_size: tuple[int, int]) -> None:
    status, body = ask(service, explain=False, format="array")  # arrays come at the native resolution
    assert status == 200, body
    assert tuple(body["explanation"]["native_size"]) == grid
    lafam = np.asarray(body["explanation"]["data"])
    assert lafam.shape == grid
    assert (lafam.min(), lafam.max()) == (0.0, 1.0)
    for options in REQUESTS:
        status, body = ask(service, format="array", top_k=2, **options)
        assert status == 200, (options, body)
        explanation = body["explanation"]
        at_layer = options["method"] == "gradcam" or options.get("base") == "gradcam"
        native = grid if at_layer else input_size
        assert tuple(explanation["native_size"]) == native, options
        data = np.asarray(explanation["classes"][0]["data"])
        assert data.shape == native, options
        assert np.isfinite(data).all(), options
        assert np.abs(data).max() > 0, options
    status, body = ask(service, method="lrp", format="array")  # LRP through attention: served, or a 400 saying why
    assert status in (200, 400), body
    if status == 400:
        assert "LRP cannot explain it" in body["error"]["message"], body


def test_vit_served_on_the_token_grid(vit_service: LafamService) -> None:
    served_maps(vit_service, (4, 4), VIT_SIZE)


def test_swin_served_on_its_stage_grid(swin_service: LafamService) -> None:
    served_maps(swin_service, (4, 4), SWIN_SIZE)
    status, body = ask(swin_service, method="gradcam", layer="features", format="array")
    assert status == 200, body
    assert body["explanation"]["layer"] == "features"
    assert np.asarray(body["explanation"]["classes"][0]["data"]).shape == (2, 2)
