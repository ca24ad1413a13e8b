"""LaFAM on hand-set activations, with exact expected maps (tolerance stated per test)."""

from __future__ import annotations

import pytest
import torch

from handlers.explain.lafam import lafam, minmax_scale, resize_maps

EXACT = {"rtol": 0.0, "atol": 0.0}
FLOAT32 = {"rtol": 0.0, "atol": 1e-7}  # one float32 rounding of values in [0, 1]


def test_channel_mean_then_minmax_gives_the_expected_map() -> None:
    acts = torch.tensor(
        [
            [[[1.0, 2.0], [3.0, 6.0]], [[3.0, 2.0], [1.0, 6.0]], [[2.0, 5.0], [8.0, 3.0]]],
        ]
    )  # channel mean: [[2, 3], [4, 5]]
    expected = torch.tensor([[[0.0, 1 / 3], [2 / 3, 1.0]]])
    torch.testing.assert_close(lafam(acts), expected, **FLOAT32)


def test_docstring_example() -> None:
    acts = torch.zeros(1, 2, 2, 2)
    acts[0, :, 0, 0] = 4.0
    torch.testing.assert_close(lafam(acts), torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), **EXACT)


def test_negative_activations_are_shifted_not_clipped() -> None:
    acts = torch.tensor([[[[-4.0, -2.0], [0.0, 4.0]]], [[[-3.0, -3.0], [-1.0, -2.0]]]])
    expected = torch.tensor([[[0.0, 0.25], [0.5, 1.0]], [[0.0, 0.0], [1.0, 0.5]]])
    torch.testing.assert_close(lafam(acts), expected, **EXACT)


def test_output_spans_zero_to_one() -> None:
    acts = torch.randn(3, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    maps = lafam(acts)
    assert maps.shape == (3, 4, 6)
    torch.testing.assert_close(maps.flatten(1).amin(1), torch.zeros(3), **EXACT)
    torch.testing.assert_close(maps.flatten(1).amax(1), torch.ones(3), **EXACT)


@pytest.mark.parametrize("value", [0.0, 1.0, -7.5, 1e30, -1e30, torch.finfo(torch.float32).max])
def test_constant_map_is_all_zeros_and_finite(value: float) -> None:
    maps = lafam(torch.full((2, 3, 4, 5), value))
    assert torch.isfinite(maps).all()
    torch.testing.assert_close(maps, torch.zeros(2, 4, 5), **EXACT)


def test_huge_non_constant_values_are_finite_and_exact() -> None:
    acts = torch.tensor([[[[1e30, 2e30], [3e30, 5e30]]]])
    maps = lafam(acts)
    assert torch.isfinite(maps).all()
    torch.testing.assert_close(maps, torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]), rtol=0.0, atol=1e-6)


def test_tiny_contrast_is_still_scaled() -> None:
    acts = torch.tensor([[[[1.0, 1.0 + 2**-20]]]])  # a span far below 1, far above float32's tiny
    torch.testing.assert_close(lafam(acts), torch.tensor([[[0.0, 1.0]]]), **EXACT)


def test_batch_items_are_scaled_independently() -> None:
    small = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    large = 1000.0 * small - 50.0
    constant = torch.full((1, 2, 2), 3.0)
    acts = torch.stack([small, large, constant])  # (3, 1, 2, 2)
    maps = lafam(acts)
    expected_one = torch.tensor([[0.0, 0.25], [0.5, 1.0]])
    torch.testing.assert_close(maps[0], expected_one, **EXACT)
    torch.testing.assert_close(maps[1], expected_one, **FLOAT32)
    torch.testing.assert_close(maps[2], torch.zeros(2, 2), **EXACT)
    torch.testing.assert_close(lafam(acts[1:2])[0], maps[1], **EXACT)  # alone or in a batch: the same


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float32])
def test_any_float_dtype_gives_float32(dtype: torch.dtype) -> None:
    acts = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]], [[0.0, 1.0], [2.0, 4.0]]]], dtype=dtype)
    maps = lafam(acts)
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps, torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]), **EXACT)


def test_float16_near_its_maximum_does_not_overflow() -> None:
    acts = torch.full((1, 4, 2, 2), 60000.0, dtype=torch.float16)
    acts[0, :, 1, 1] = 0.0  # a float16 sum over channels would overflow to inf
    torch.testing.assert_close(lafam(acts), torch.tensor([[[1.0, 1.0], [1.0, 0.0]]]), **EXACT)


def test_minmax_scale_returns_float32_for_float16() -> None:
    maps = torch.tensor([[[2.0, 4.0], [6.0, 10.0]]], dtype=torch.float16)
    scaled = minmax_scale(maps)
    assert scaled.dtype == torch.float32
    torch.testing.assert_close(scaled, torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]), **EXACT)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), 3e38])
def test_non_finite_or_huge_activations_give_a_finite_map(bad: float) -> None:
    acts = torch.ones(2, 3, 2, 2)
    acts[0, :, 0, 0] = bad
    maps = lafam(acts)
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0
    assert maps.max() <= 1


@pytest.mark.parametrize("shape", [(2, 3), (3, 2, 3), (1, 1, 1, 2, 3)])
def test_lafam_rejects_non_4d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"activations must be \(N, C, h, w\)"):
        lafam(torch.zeros(shape))


# resize_maps


def test_nearest_integer_factor_replicates_blocks_exactly() -> None:
    maps = torch.tensor([[[0.0, 0.5], [0.25, 1.0]]])
    out = resize_maps(maps, (4, 6), "nearest")
    expected = torch.tensor(
        [
            [
                [0.0, 0.0, 0.0, 0.5, 0.5, 0.5],
                [0.0, 0.0, 0.0, 0.5, 0.5, 0.5],
                [0.25, 0.25, 0.25, 1.0, 1.0, 1.0],
                [0.25, 0.25, 0.25, 1.0, 1.0, 1.0],
            ]
        ]
    )
    torch.testing.assert_close(out, expected, **EXACT)


def test_nearest_7_to_224_is_32x32_blocks() -> None:
    maps = lafam(torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(1)))
    out = resize_maps(maps, (224, 224), "nearest")
    assert out.shape == (2, 224, 224)
    expected = maps.repeat_interleave(32, dim=1).repeat_interleave(32, dim=2)
    torch.testing.assert_close(out, expected, **EXACT)


@pytest.mark.parametrize(("size", "mode"), [((300, 200), "nearest"), ((300, 200), "bilinear"), ((10, 3), "nearest")])
def test_non_integer_factors_give_the_requested_shape(size: tuple[int, int], mode: str) -> None:
    maps = lafam(torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(2)))
    out = resize_maps(maps, size, mode)
    assert out.shape == (2, *size)
    assert out.min() >= 0.0
    assert out.max() <= 1.0


def test_nearest_non_integer_factor_only_uses_input_values() -> None:
    maps = torch.tensor([[[0.0, 0.5, 1.0]]])
    out = resize_maps(maps, (2, 7), "nearest")
    assert set(out.unique().tolist()) <= {0.0, 0.5, 1.0}
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 1.0]), **EXACT)


def test_bilinear_stays_in_unit_range_and_differs_from_nearest() -> None:
    maps = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    bilinear = resize_maps(maps, (8, 8), "bilinear")
    nearest = resize_maps(maps, (8, 8), "nearest")
    assert bilinear.shape == nearest.shape == (1, 8, 8)
    assert bilinear.min() >= 0.0
    assert bilinear.max() <= 1.0
    assert not torch.equal(bilinear, nearest)


def test_bilinear_exact_values_with_pixel_centres_aligned() -> None:
    # align_corners=False: output x samples input x' = (x + 0.5) / 2 - 0.5, clamped to the border
    out = resize_maps(torch.tensor([[[0.0, 1.0]]]), (1, 4), "bilinear")
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.25, 0.75, 1.0]]]), **FLOAT32)


def test_same_size_is_unchanged() -> None:
    maps = torch.tensor([[[0.0, 0.3], [0.6, 1.0]]])
    for mode in ("nearest", "bilinear"):
        torch.testing.assert_close(resize_maps(maps, (2, 2), mode), maps, **EXACT)


def test_downsampling_keeps_the_range() -> None:
    maps = lafam(torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(3)))
    out = resize_maps(maps, (4, 4), "bilinear")
    assert out.shape == (1, 4, 4)
    assert out.min() >= 0.0
    assert out.max() <= 1.0


@pytest.mark.parametrize("mode", ["bicubic", "Nearest", "", "area"])
def test_resize_rejects_unknown_mode(mode: str) -> None:
    with pytest.raises(ValueError, match="mode must be one of nearest, bilinear"):
        resize_maps(torch.zeros(1, 2, 2), (4, 4), mode)


@pytest.mark.parametrize("shape", [(2, 2), (1, 1, 2, 2)])
def test_resize_rejects_maps_that_are_not_3d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"maps must be \(N, h, w\)"):
        resize_maps(torch.zeros(shape), (2, 2))


@pytest.mark.parametrize("size", [(0, 4), (4, -1)])
def test_resize_rejects_non_positive_size(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="size must be"):
        resize_maps(torch.zeros(1, 2, 2), size)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_resize_keeps_signed_maps_negative_and_above_one(mode):
    """Signed maps (LRP, Grad-CAM, distributions) are resized before their PNG: no clamp to [0, 1]."""
    maps = torch.tensor([[[-0.33, 2.0], [0.5, -1.5]]])
    out = resize_maps(maps, (8, 8), mode)
    assert float(out.min()) == pytest.approx(-1.5)
    assert float(out.max()) == pytest.approx(2.0)


def test_the_served_cpu_path_equals_the_torch_scaling() -> None:
    """The numpy min-max of the served CPU path gives exactly the torch one (used on GPUs and with autograd)."""
    activations = torch.randn(3, 16, 7, 5, generator=torch.Generator().manual_seed(0))
    activations[1] = 2.5  # a constant map: zeros
    activations[2, :, 0, 0] = float("inf")  # non-finite: clamped first
    served = lafam(activations)
    reference = minmax_scale(activations.float().mean(dim=1))
    assert torch.equal(served, reference)
    assert torch.equal(lafam(activations.clone().requires_grad_()).detach(), reference)
