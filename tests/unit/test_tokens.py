"""handlers.explain.tokens: deciding a layer output's layout and turning it into (N, C, h, w), traceably."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from handlers.explain.tokens import Layout, grid_layout, to_grid


@pytest.mark.parametrize(
    ("shape", "size", "expected"),
    [
        ((2, 197, 768), (224, 224), Layout("tokens", 1, (14, 14), 16)),  # ViT-B/16: class token
        ((1, 196, 768), (224, 224), Layout("tokens", 0, (14, 14), 16)),  # no class token (GAP ViT)
        ((1, 201, 384), (224, 224), Layout("tokens", 5, (14, 14), 16)),  # class + 4 registers
        ((1, 198, 768), (224, 224), Layout("tokens", 2, (14, 14), 16)),  # class + distillation (DeiT)
        ((1, 17, 32), (32, 32), Layout("tokens", 1, (4, 4), 8)),
        ((1, 1 + 6 * 6, 8), (90, 90), Layout("tokens", 1, (6, 6), 15)),
        ((1, 768, 14, 14), (224, 224), Layout("nchw", 0, (14, 14), 16)),
        ((1, 7, 7, 768), (224, 224), Layout("nhwc", 0, (7, 7), 32)),  # Swin-T last stage
        ((1, 56, 56, 96), (224, 224), Layout("nhwc", 0, (56, 56), 4)),  # Swin-T first stage
        ((1, 8, 4, 5), (32, 40), Layout("nchw", 0, (4, 5), 8)),  # non-square input
        ((1, 4, 5, 8), (32, 40), Layout("nhwc", 0, (4, 5), 8)),
        ((1, 16, 13, 13), (100, 100), Layout("nchw", 0, (13, 13), 8)),  # padded stage: ceil(100 / 8)
    ],
)
def test_grid_layout(shape: tuple[int, ...], size: tuple[int, int], expected: Layout) -> None:
    assert grid_layout(shape, size) == expected


def test_non_square_tokens_follow_the_aspect_ratio() -> None:
    # 32x64 input at stride 8: 4x8 = 32 patches + a class token
    assert grid_layout((1, 33, 16), (32, 64)) == Layout("tokens", 1, (4, 8), 8)


def test_rounded_grids_only_for_maps() -> None:
    # conv at stride 16 on 84 px: floor(84 / 16) = 5 (the stride is then the smallest that fits)
    layout = grid_layout((1, 8, 5, 5), (84, 84))
    assert layout[:3] == ("nchw", 0, (5, 5))
    assert 84 // layout.stride == 5
    with pytest.raises(ValueError, match="not a token grid"):  # tokens need a stride that divides the input
        grid_layout((1, 1 + 14 * 14, 8), (230, 230))


def test_ambiguous_4d_prefers_nchw_unless_hinted() -> None:
    assert grid_layout((1, 56, 56, 56), (224, 224)).kind == "nchw"
    assert grid_layout((1, 56, 56, 56), (224, 224), hint="nchw").kind == "nchw"
    assert grid_layout((1, 56, 56, 56), (224, 224), hint="nhwc").kind == "nhwc"
    assert grid_layout((1, 768, 14, 14), (224, 224), hint="nhwc").kind == "nchw"  # hint only settles ties


@pytest.mark.parametrize(
    ("shape", "size", "match"),
    [
        ((1, 1000), (224, 224), r"2-D output has no spatial grid"),
        ((1, 3, 4, 5, 6), (224, 224), r"5-D output"),
        ((1, 300, 512), (224, 224), r"not a token grid.*T=300"),
        ((1, 768, 13, 17), (224, 224), r"not a spatial map.*\(13, 17\)"),
    ],
)
def test_grid_layout_refuses(shape: tuple[int, ...], size: tuple[int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        grid_layout(shape, size)
    assert str(shape) in str(info.value)


def test_grid_layout_rejects_bad_hint() -> None:
    with pytest.raises(ValueError, match="hint"):
        grid_layout((1, 8, 4, 4), (16, 16), hint="tokens")


def test_to_grid_tokens_drops_extra_and_keeps_row_major_order() -> None:
    n, h, w, c = 2, 3, 4, 5
    patches = torch.randn(n, h, w, c)
    cls = torch.full((n, 2, c), 99.0)
    tokens = torch.cat([cls, patches.reshape(n, h * w, c)], dim=1)
    out = to_grid(tokens, Layout("tokens", 2, (h, w), 8))
    assert out.shape == (n, c, h, w)
    torch.testing.assert_close(out, patches.permute(0, 3, 1, 2))


def test_to_grid_maps() -> None:
    x = torch.randn(2, 5, 3, 4)
    assert to_grid(x, Layout("nchw", 0, (3, 4), 8)) is x
    torch.testing.assert_close(to_grid(x.permute(0, 2, 3, 1), Layout("nhwc", 0, (3, 4), 8)), x)
    with pytest.raises(ValueError, match="3-D output"):
        to_grid(x, Layout("tokens", 1, (3, 4), 8))


def test_to_grid_tokens_at_another_input_size() -> None:
    layout = grid_layout((1, 17, 6), (32, 32))
    out = to_grid(torch.randn(2, 1 + 6 * 5, 6), layout, input_size=(48, 40))
    assert out.shape == (2, 6, 6, 5)


def test_layout_round_trips_through_dict() -> None:
    layout = Layout("tokens", 1, (14, 14), 16)
    assert Layout.from_dict(layout.to_dict()) == layout
    assert "1 extra + 14x14" in layout.describe()
    with pytest.raises(ValueError, match="kind in"):
        Layout.from_dict({"kind": "conv", "extra": 0, "grid": [1, 1], "stride": 1})


class _Tokens(torch.nn.Module):
    def __init__(self, layout: Layout) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_grid(x * 2.0, self.layout)


def test_to_grid_traces_with_dynamic_batch(tmp_path: Path) -> None:
    layout = Layout("tokens", 1, (2, 3), 8)
    module = _Tokens(layout)
    traced = torch.jit.trace(module, torch.randn(1, 7, 4))
    x = torch.randn(3, 7, 4)
    torch.testing.assert_close(traced(x), module(x))
    pytest.importorskip("onnx")
    path = tmp_path / "tokens.onnx"
    torch.onnx.export(
        module, (torch.randn(1, 7, 4),), str(path), input_names=["x"], dynamic_axes={"x": {0: "n"}}, dynamo=False
    )
    ort = pytest.importorskip("onnxruntime")
    (out,) = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), module(x))
