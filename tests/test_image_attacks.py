"""The fixed image triggers, checked exactly: patch position and values, blend ratio, SIG amplitude,
warp field bounds, dither levels, DCT bumps; and the poisoning rules shared by all attacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline_pkg.attacks.bpp import floyd_steinberg
from pipeline_pkg.attacks.ftrojan import RGB_TO_YUV, color_transform, dct_matrix
from pipeline_pkg.attacks.wanet import identity_grid
from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.registry import ATTACKS

FIXED = ["badnets", "blend", "sig", "wanet", "bpp", "ftrojan"]


def attack(name: str, **params):
    return ATTACKS.get(name)(**params).prepare("image")


def images(n=6, channels=3, size=16, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)


def test_badnets_stamps_exactly_the_patch_in_its_corner():
    x = images()
    out = attack("badnets").apply_trigger(x)  # 3×3 checkerboard, bottom-right, 1-pixel margin
    expected_patch = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert torch.equal(out[:, :, 12:15, 12:15], expected_patch.expand(6, 3, 3, 3))
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[12:15, 12:15] = False
    assert torch.equal(out[..., outside], x[..., outside])
    white = attack("badnets", pattern="white", corner="top_left", margin=0, size=2).apply_trigger(x)
    assert (white[..., :2, :2] == 255).all() and torch.equal(white[..., 2:, :], x[..., 2:, :])
    with pytest.raises(ValueError, match="does not fit"):
        attack("badnets", size=16).apply_trigger(x)


def test_blend_mixes_a_fixed_pattern_at_ratio_alpha():
    x = images()
    blend = attack("blend", alpha=0.2)
    pattern = blend.pattern((3, 16, 16), torch.device("cpu"))
    expected = (0.8 * x.float() / 255 + 0.2 * pattern) * 255
    out = blend.apply_trigger(x)
    assert (out.float() - expected).abs().max() <= 0.5 + 1e-4  # rounding to uint8 only
    assert torch.equal(out, attack("blend", alpha=0.2).apply_trigger(x))  # same pattern every time
    assert not torch.equal(out, attack("blend", alpha=0.2, pattern_seed=1).apply_trigger(x))
    # The pattern is the same for every image: the blend of two images differs only through them.
    assert 0 <= pattern.min() and pattern.max() <= 1


def test_sig_adds_a_sinusoid_of_the_configured_amplitude_and_frequency():
    x = torch.full((2, 1, 8, 32), 128, dtype=torch.uint8)
    out = attack("sig", delta=20, frequency=4).apply_trigger(x).float()
    cols = torch.arange(32, dtype=torch.float32)
    expected = 128 + 20 * torch.sin(2 * math.pi * cols * 4 / 32)
    assert (out - expected).abs().max() <= 0.5 + 1e-4
    assert out.max() - 128 == pytest.approx(20, abs=0.5) and out.min() - 128 == pytest.approx(-20, abs=0.5)
    assert torch.equal(out[:, :, 0], out[:, :, 5])  # the same signal on every row


def test_clean_label_attack_poisons_only_target_samples_and_keeps_every_label():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 20)
    x = images(len(y)).numpy()
    sig = attack("sig", rate=0.05, target=3)
    x_p, y_p, idx = sig.poison(x, y, 10, rng)
    assert len(idx) == round(0.05 * len(y)) == 10
    assert np.array_equal(y_p, y) and (y[idx] == 3).all()
    changed = np.flatnonzero((x_p != x).reshape(len(x), -1).any(1))
    assert set(changed) <= set(idx)
    with pytest.raises(ValueError, match="eligible"):
        attack("sig", rate=0.2).poison(x, y, 10, rng)  # more than the target class holds
    with pytest.raises(ConfigError, match="mode"):
        ATTACKS.get("sig")(mode="all_to_all")


@pytest.mark.parametrize("name", FIXED)
def test_poisoned_count_is_rate_times_n_and_labels_follow_the_mode(name):
    y = np.repeat(np.arange(10), 30)
    x = images(len(y)).numpy()
    rate = 0.05 if name == "sig" else 0.1
    atk = attack(name, rate=rate)
    x_p, y_p, idx = atk.poison(x, y, 10, np.random.default_rng(1))
    assert len(idx) == round(rate * len(y))
    assert x_p.dtype == np.uint8 and x_p.shape == x.shape
    assert np.array_equal(x_p[idx], atk.trigger_numpy(x[idx]))
    if not atk.clean_label:
        assert (y_p[idx] == 0).all() and (y[idx] != 0).all()
        all_to_all = attack(name, mode="all_to_all")
        _, y_a, idx_a = all_to_all.poison(x, y, 10, np.random.default_rng(1))
        assert np.array_equal(y_a[idx_a], (y[idx_a] + 1) % 10)
    untouched = np.setdiff1d(np.arange(len(y)), idx)
    assert np.array_equal(y_p[untouched], y[untouched])
    x_bd, y_bd, y_true = atk.triggered_test(x, y, 10)
    assert (y_bd == 0).all() and (y_true != 0).all() and len(x_bd) == (y != 0).sum()


def test_wanet_field_is_bounded_smooth_and_fixed():
    wanet = attack("wanet", strength=0.5, k=4)
    field = wanet.field(16, 16, torch.device("cpu"))
    grid = wanet.grid(16, 16, torch.device("cpu"))
    identity = identity_grid(16, 16, torch.device("cpu"))
    assert grid.shape == (1, 16, 16, 2) and grid.abs().max() <= 1
    # The k×k control field has mean magnitude 1; each pixel moves by at most strength·max|field|/H.
    displacement = (grid - identity).abs()
    assert displacement.max() <= 0.5 * field.abs().max() / 16 + 1e-6
    assert displacement.max() > 0.1 * 0.5 / 16  # and it does move pixels
    assert torch.allclose(grid, (identity + 0.5 * field / 16).clamp(-1, 1))
    x = images()
    out = wanet.apply_trigger(x)
    assert torch.equal(out, attack("wanet").apply_trigger(x))
    # A tiny warp: far from a random image, but close to a smooth one.
    smooth = torch.linspace(0, 255, 16).round().to(torch.uint8).expand(2, 1, 16, 16).contiguous()
    assert (wanet.apply_trigger(smooth).float() - smooth.float()).abs().mean() < 8


def test_wanet_noise_mode_adds_cross_samples_with_their_labels():
    y = np.repeat(np.arange(10), 30)
    x = images(len(y)).numpy()
    x_p, y_p, idx = attack("wanet", rate=0.1, cross_ratio=2).poison(x, y, 10, np.random.default_rng(0))
    changed = np.flatnonzero((x_p != x).reshape(len(x), -1).any(1))
    cross = np.setdiff1d(changed, idx)
    assert len(idx) == 30 and len(cross) == 60  # cross_ratio × poisoned, labels kept
    assert np.array_equal(y_p[cross], y[cross])
    _, _, idx_plain = attack("wanet", noise_mode=False).poison(x, y, 10, np.random.default_rng(0))
    assert len(idx_plain) == 30


def reference_floyd_steinberg(image: np.ndarray, levels: int) -> np.ndarray:
    """A plain-Python version of the error diffusion, one pixel at a time."""
    work = image.astype(np.float32).copy()  # the same precision as the batched version
    height, width = work.shape
    for i in range(height):
        for j in range(width):
            old = work[i, j]
            new = np.round(np.clip(old, 0, 1) * (levels - 1)) / (levels - 1)
            work[i, j] = new
            err = old - new
            for di, dj, share in ((0, 1, 7 / 16), (1, -1, 3 / 16), (1, 0, 5 / 16), (1, 1, 1 / 16)):
                if i + di < height and 0 <= j + dj < width:
                    work[i + di, j + dj] += share * err
    return work


def test_bpp_quantises_to_the_level_set_with_floyd_steinberg_dither():
    x = images(3, channels=3, size=8)
    out = attack("bpp", levels=8).apply_trigger(x)
    level_set = torch.tensor([round(255 * k / 7) for k in range(8)], dtype=torch.uint8)
    assert torch.isin(out, level_set).all()
    unit = x.float() / 255
    ours = floyd_steinberg(unit, 8)
    for n in range(3):
        for c in range(3):
            ref = reference_floyd_steinberg(unit[n, c].numpy(), 8)
            assert np.allclose(ours[n, c].numpy(), ref, atol=1e-5)
    # Dithering keeps the mean brightness; plain quantisation is the no-dither mode.
    assert abs(out.float().mean() - x.float().mean()) < 3
    plain = attack("bpp", levels=8, dither=False).apply_trigger(x)
    assert torch.equal(plain, (torch.round(unit * 7) / 7 * 255).round().to(torch.uint8))


def test_ftrojan_puts_its_bump_at_exactly_the_chosen_dct_frequencies():
    size = 16
    grey = torch.full((2, 1, size, size), 128, dtype=torch.uint8)
    ft = attack("ftrojan", magnitude=30)
    diff = ft.trigger_float(grey.float() / 255) - grey.float() / 255
    d = dct_matrix(size, torch.device("cpu"))
    spectrum = d @ diff[0, 0] @ d.T * 255
    expected = torch.zeros(size, size)
    expected[7, 7] = expected[15, 15] = 30  # a mid (H/2 − 1) and the highest frequency
    assert torch.allclose(spectrum, expected, atol=1e-3)
    # Colour: only the chrominance channels carry it; luminance is unchanged.
    rgb = torch.full((2, 3, size, size), 128, dtype=torch.uint8)
    unit = rgb.float() / 255
    yuv_diff = color_transform(ft.trigger_float(unit), RGB_TO_YUV) - color_transform(unit, RGB_TO_YUV)
    assert yuv_diff[:, 0].abs().max() < 1e-5
    for channel in (1, 2):
        assert torch.allclose(d @ yuv_diff[0, channel] @ d.T * 255, expected, atol=1e-3)
    out = ft.apply_trigger(rgb)
    assert 0 < (out.float() - rgb.float()).abs().max() <= 30
    with pytest.raises(ValueError, match="outside"):
        attack("ftrojan", frequencies=[[20, 3]]).apply_trigger(rgb)


def test_dct_matrix_is_orthonormal():
    d = dct_matrix(12, torch.device("cpu"))
    assert torch.allclose(d @ d.T, torch.eye(12), atol=1e-5)


@pytest.mark.parametrize("name", FIXED)
def test_image_triggers_refuse_other_modalities_and_float_input(name):
    with pytest.raises(ValueError, match="image"):
        ATTACKS.get(name)().prepare("rf")
    with pytest.raises(TypeError, match="uint8"):
        attack(name).apply_trigger(torch.rand(2, 3, 16, 16))
