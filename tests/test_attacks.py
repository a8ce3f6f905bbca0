"""Attacks: the burst and phase triggers, the shared poisoning logic, the benign `none` reference and the
attack registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline_pkg.attacks.burst import BurstAttack
from pipeline_pkg.attacks.none import NoAttack
from pipeline_pkg.attacks.phase import PhaseAttack
from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.registry import ATTACKS

torch.set_num_threads(1)

L = 256
C = 4


def frames(n: int = 6, length: int = L, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, length, generator=gen, dtype=torch.float32)


def dataset(n: int = 200, length: int = L, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2, length)).astype(np.float32)
    y = (np.arange(n) % C).astype(np.int64)
    rng.shuffle(y)
    return x, y


def burst(**params) -> BurstAttack:
    params = {"offset": 32, "length": 64, **params}
    return ATTACKS.get("burst")(**params).prepare("rf")


def as_complex(x: torch.Tensor) -> torch.Tensor:
    return torch.complex(x[:, 0].double(), x[:, 1].double())


# --- burst ---

def test_burst_adds_waveform_only_inside_window():
    atk = burst(offset=40, length=64, tsr_db=3.0)
    x = frames()
    original = x.clone()
    out = atk.apply_trigger(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(x, original), "apply_trigger must not modify its input"
    delta = out - x
    assert torch.count_nonzero(delta[..., :40]) == 0
    assert torch.count_nonzero(delta[..., 104:]) == 0
    wave = atk.waveform()
    assert wave.shape == (2, 64)
    # Inside the window the output is exactly x + waveform (same float32 op) ...
    assert torch.equal(out[..., 40:104], x[..., 40:104] + wave)
    # ... so the difference is the waveform up to float32 rounding of the sum.
    torch.testing.assert_close(delta[..., 40:104], wave.expand_as(delta[..., 40:104]), atol=1e-5, rtol=0)
    assert torch.count_nonzero(wave) > 0


@pytest.mark.parametrize("tsr_db", [-10.0, 0.0, 3.0, 6.5])
def test_burst_power_matches_tsr(tsr_db):
    wave = burst(tsr_db=tsr_db).waveform().double()
    power = float((wave[0] ** 2 + wave[1] ** 2).mean())
    assert power == pytest.approx(10 ** (tsr_db / 10), abs=1e-4, rel=1e-4)


def test_burst_is_a_linear_chirp_from_f_start_to_f_stop():
    atk = burst(length=128, f_start=-0.2, f_stop=0.3)
    w = as_complex(atk.waveform()[None])[0]
    # Instantaneous frequency (cycles/sample) between consecutive samples.
    freq = torch.angle(w[1:] * w[:-1].conj()) / (2 * math.pi)
    n = torch.arange(127, dtype=torch.float64)
    expected = -0.2 + 0.5 / 128 * (n + 0.5)
    torch.testing.assert_close(freq, expected, atol=1e-4, rtol=0)


def test_burst_window_past_frame_end_raises():
    x = frames()
    burst(offset=192, length=64).apply_trigger(x)  # ends exactly at L: allowed
    with pytest.raises(ValueError, match="exceeds the frame"):
        burst(offset=200, length=64).apply_trigger(x)
    with pytest.raises(ValueError):
        ATTACKS.get("burst")().prepare("rf").apply_trigger(x)  # defaults: 256 + 64 > 256


@pytest.mark.parametrize("params, key", [
    ({"length": 0}, "length"),
    ({"length": -3}, "length"),
    ({"f_start": 0.7}, "f_start"),
    ({"offset": -1}, "offset"),
    ({"rate": 1.0}, "rate"),
    ({"mode": "some_to_some"}, "mode"),
    ({"target": -1}, "target"),
])
def test_burst_bad_params_raise_config_error(params, key):
    with pytest.raises(ConfigError, match=rf"parameter {key}="):
        ATTACKS.get("burst")(**params)


def test_unknown_attack_parameter_lists_valid_ones():
    with pytest.raises(ConfigError, match="lenght") as info:
        ATTACKS.get("burst")(lenght=3)
    assert "length" in str(info.value) and "tsr_db" in str(info.value)


# --- phase ---

def phase_angles(atk: PhaseAttack, x: torch.Tensor) -> torch.Tensor:
    out = atk.apply_trigger(x)
    return torch.angle(as_complex(out) * as_complex(x).conj())


def test_phase_preserves_magnitude():
    atk = ATTACKS.get("phase")(angle_deg=60.0, segment=32).prepare("rf")
    x = frames()
    out = atk.apply_trigger(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.pow(2).sum(1).sqrt(), x.pow(2).sum(1).sqrt(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)


@pytest.mark.parametrize("angle_deg, segment", [(90.0, 32), (30.0, 16), (180.0, 64)])
def test_phase_rotation_pattern(angle_deg, segment):
    atk = PhaseAttack(angle_deg=angle_deg, segment=segment, pattern_seed=7).prepare("rf")
    x = frames(n=3)
    d = phase_angles(atk, x)  # (N, L) radians
    half = math.radians(angle_deg) / 2
    assert torch.allclose(d.abs(), torch.full_like(d, half), atol=1e-4)
    # Same pattern for every frame.
    assert torch.allclose(d, d[:1].expand_as(d), atol=1e-4)
    # Constant within each segment.
    seg = d.reshape(3, L // segment, segment)
    assert float((seg.max(-1).values - seg.min(-1).values).max()) < 1e-4
    signs = torch.sign(seg[0, :, 0])
    assert set(signs.tolist()) <= {-1.0, 1.0}
    # Matches the documented rotation().
    torch.testing.assert_close(d[0], atk.rotation(L), atol=1e-4, rtol=0)


def test_phase_pattern_seeded():
    x1, x2 = frames(n=2, seed=1), frames(n=2, seed=2)
    a = PhaseAttack(pattern_seed=11, segment=16).prepare("rf")
    b = PhaseAttack(pattern_seed=11, segment=16).prepare("rf")
    c = PhaseAttack(pattern_seed=12, segment=16).prepare("rf")
    da, db, dc = phase_angles(a, x1), phase_angles(b, x2), phase_angles(c, x1)
    assert torch.allclose(da[0], db[1], atol=1e-4), "same seed, different frames → same pattern"
    signs_a = torch.sign(da[0].reshape(-1, 16)[:, 0])
    assert (signs_a > 0).any() and (signs_a < 0).any(), "the pattern should mix both rotations"
    assert not torch.allclose(da[0], dc[0], atol=1e-3), "different pattern_seed → different pattern"


@pytest.mark.parametrize("params, key", [({"angle_deg": 0.0}, "angle_deg"), ({"angle_deg": 190.0}, "angle_deg"),
                                         ({"segment": 0}, "segment")])
def test_phase_bad_params(params, key):
    with pytest.raises(ConfigError, match=rf"parameter {key}="):
        PhaseAttack(**params)


# --- poisoning ---

@pytest.mark.parametrize("rate", [0.05, 0.1, 0.333, 0.7])
def test_poison_all_to_one(rate):
    x, y = dataset()
    x0, y0 = x.copy(), y.copy()
    atk = burst(rate=rate, target=2, mode="all_to_one")
    xp, yp, idx = atk.poison(x, y, C, np.random.default_rng(0))
    assert np.array_equal(x, x0) and np.array_equal(y, y0), "poison must not modify its inputs"
    assert len(idx) == round(rate * len(y))
    assert np.all(np.diff(idx) > 0), "indices sorted and unique"
    assert np.all(y[idx] != 2), "no sample of the target class is poisoned in all_to_one"
    assert np.all(yp[idx] == 2)
    mask = np.zeros(len(y), bool)
    mask[idx] = True
    assert np.array_equal(xp[~mask], x[~mask]) and np.array_equal(yp[~mask], y[~mask])
    assert xp.dtype == x.dtype and yp.dtype == y.dtype
    triggered = atk.apply_trigger(torch.from_numpy(x[idx])).numpy()
    assert np.array_equal(xp[idx], triggered)
    assert not np.array_equal(xp[idx], x[idx])


@pytest.mark.parametrize("rate", [0.1, 0.85])
def test_poison_all_to_all(rate):
    x, y = dataset()
    atk = burst(rate=rate, mode="all_to_all")
    xp, yp, idx = atk.poison(x, y, C, np.random.default_rng(1))
    assert len(idx) == round(rate * len(y))
    assert np.array_equal(yp[idx], (y[idx] + 1) % C)
    mask = np.zeros(len(y), bool)
    mask[idx] = True
    assert np.array_equal(xp[~mask], x[~mask]) and np.array_equal(yp[~mask], y[~mask])
    assert np.array_equal(xp[idx], atk.apply_trigger(torch.from_numpy(x[idx])).numpy())


def test_poison_is_reproducible_from_rng():
    x, y = dataset()
    atk = burst(rate=0.2)
    a = atk.poison(x, y, C, np.random.default_rng(5))
    b = atk.poison(x, y, C, np.random.default_rng(5))
    c = atk.poison(x, y, C, np.random.default_rng(6))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[2], c[2])


def test_poison_rate_too_high_for_eligible_pool():
    x, y = dataset()  # 150 of 200 samples are not of class 0
    with pytest.raises(ValueError, match="eligible"):
        burst(rate=0.8, target=0).poison(x, y, C, np.random.default_rng(0))
    burst(rate=0.75, target=0).poison(x, y, C, np.random.default_rng(0))  # exactly 150: fine


def test_poison_target_outside_classes():
    x, y = dataset()
    with pytest.raises(ValueError, match="target class 9"):
        burst(target=9).poison(x, y, C, np.random.default_rng(0))


def test_triggered_test_all_to_one():
    x, y = dataset(n=40)
    atk = burst(target=1)
    x_bd, y_bd, y_true = atk.triggered_test(x, y, C)
    keep = y != 1
    assert len(x_bd) == len(y_bd) == len(y_true) == keep.sum() == 30
    assert np.all(y_bd == 1)
    assert np.array_equal(y_true, y[keep])
    assert np.array_equal(x_bd, atk.apply_trigger(torch.from_numpy(x[keep])).numpy())


def test_triggered_test_all_to_all():
    x, y = dataset(n=40)
    x_bd, y_bd, y_true = burst(mode="all_to_all").triggered_test(x, y, C)
    assert len(x_bd) == 40
    assert np.array_equal(y_true, y) and np.array_equal(y_bd, (y + 1) % C)


# --- none ---

def test_none_requires_rate_zero():
    with pytest.raises(ConfigError, match="parameter rate="):
        ATTACKS.get("none")(rate=0.1)
    with pytest.raises(ConfigError, match="parameter probe="):
        ATTACKS.get("none")(probe="none")


def test_none_probes_with_burst_and_poisons_nothing():
    atk = ATTACKS.get("none")()
    assert isinstance(atk, NoAttack)
    x = frames(length=512)
    with pytest.raises(RuntimeError, match="prepared"):
        atk.apply_trigger(x)
    atk.prepare("rf")
    expected = ATTACKS.get("burst")().prepare("rf").apply_trigger(x)
    assert torch.equal(atk.apply_trigger(x), expected)
    assert not torch.equal(expected, x)

    xs, ys = dataset(n=40, length=512)
    xp, yp, idx = atk.poison(xs, ys, C, np.random.default_rng(0))
    assert len(idx) == 0
    assert np.array_equal(xp, xs) and np.array_equal(yp, ys)

    x_bd, y_bd, y_true = atk.triggered_test(xs, ys, C)
    keep = ys != 0
    assert len(x_bd) == keep.sum() and np.all(y_bd == 0) and np.array_equal(y_true, ys[keep])


def test_none_probe_uses_configured_trigger_geometry():
    # With the config's attacks section, the probe is the configured burst (here offset 64 on 256-sample
    # frames, where the default offset 256 would not fit), aimed at the none attack's target.
    attack_params = {"burst": {"rate": 0.1, "target": 0, "offset": 64, "length": 32, "tsr_db": 3.0}}
    atk = ATTACKS.get("none")(target=2).prepare("rf", attack_params)
    xs, ys = dataset(n=40)
    x_bd, y_bd, y_true = atk.triggered_test(xs, ys, C)
    keep = ys != 2
    expected = burst(offset=64, length=32, tsr_db=3.0).apply_trigger(torch.from_numpy(xs[keep])).numpy()
    assert np.array_equal(x_bd, expected)
    assert np.all(y_bd == 2) and np.array_equal(y_true, ys[keep])


def test_none_with_explicit_probe():
    atk = ATTACKS.get("none")(probe="phase").prepare("rf")
    x = frames()
    assert torch.equal(atk.apply_trigger(x), PhaseAttack().prepare("rf").apply_trigger(x))


@pytest.mark.parametrize("name", ["burst", "phase"])
def test_wrong_modality(name):
    with pytest.raises(ValueError, match=rf"attack '{name}'.*'image'"):
        ATTACKS.get(name)().prepare("image")


# --- registry ---
