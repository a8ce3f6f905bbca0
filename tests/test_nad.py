"""nad (Neural Attention Distillation): attention maps by hand for 1-D and 2-D features; the distilled
layers are the last spatial outputs of `features` (or the named ones, checked); with β = 0 it is exactly
plain fine-tuning, and β > 0 changes the result; deterministic on CPU; bad hyper-parameters rejected by
name; and what it does to a small backdoored RF model."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch

import pipeline_pkg.defenses.nad as nad
from pipeline_pkg import stages
from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.evaluator import attack_metrics
from pipeline_pkg.models.conv5 import Conv5Spec
from pipeline_pkg.models.rf_cnn import RFCNNSpec
from pipeline_pkg.registry import DEFENSES
from tiny import clean_budget, with_running_stats

torch.set_num_threads(1)

L = 64
C = 4


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Non-default running statistics, as a trained model would have."""
    return with_running_stats(model, L)


@pytest.fixture
def small_cnn():
    torch.manual_seed(0)
    return trained_like(RFCNNSpec(width=4, hidden=8).build([2, L], C))


@pytest.fixture
def tiny_conv5():
    torch.manual_seed(0)
    return trained_like(Conv5Spec(stem=8, hidden=8).build([2, L], C))


@pytest.fixture(scope="module")
def clean():
    return clean_budget(L, C)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def no_hooks_left(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


# --- attention maps -----------------------------------------------------------------------------------

def test_attention_map_1d_by_hand():
    f = torch.tensor([[[1.0, -2.0, 0.0],
                       [3.0, 0.0, 4.0]]])  # (N=1, C=2, L=3)
    # channel mean of f²: [(1+9)/2, (4+0)/2, (0+16)/2] = [5, 2, 8]; ‖·‖ = √93
    expected = torch.tensor([[5.0, 2.0, 8.0]]) / math.sqrt(93)
    assert torch.allclose(nad.attention_map(f), expected)
    # p = 1: channel mean of |f| = [2, 1, 2], ‖·‖ = 3
    assert torch.allclose(nad.attention_map(f, p=1), torch.tensor([[2.0, 1.0, 2.0]]) / 3)


def test_attention_map_2d_by_hand_and_unit_norm():
    f = torch.zeros(2, 3, 2, 2)  # (N=2, C=3, H=2, W=2)
    f[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    f[0, 1] = torch.tensor([[0.0, -2.0], [0.0, 0.0]])
    f[0, 2] = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    f[1] = torch.randn(3, 2, 2) * 10
    a = nad.attention_map(f)
    assert a.shape == (2, 4)
    # sample 0: channel mean of f² = [1, 4, 0, 4] / 3, normalised: [1, 4, 0, 4] / √33 (row-major H, W)
    assert torch.allclose(a[0], torch.tensor([1.0, 4.0, 0.0, 4.0]) / math.sqrt(33))
    assert torch.allclose(a.norm(dim=1), torch.ones(2))
    # scale-free: multiplying a feature map does not change its attention
    assert torch.allclose(nad.attention_map(f * 7.5), a, atol=1e-6)
    with pytest.raises(ValueError, match="spatial"):
        nad.attention_map(torch.randn(2, 5))


def test_attention_loss_by_hand():
    # sample 0: all mass at position 0 vs position 1 → ‖e₀ − e₁‖ = √2; sample 1: equal maps → 0
    f_s = torch.tensor([[[3.0, 0.0]], [[1.0, 1.0]]])  # (N=2, C=1, L=2)
    f_t = torch.tensor([[[0.0, 5.0]], [[2.0, -2.0]]])
    assert nad.attention_loss(f_s, f_t).item() == pytest.approx(math.sqrt(2) / 2)
    assert nad.attention_loss(f_s, f_s).item() == 0.0


# --- layers -------------------------------------------------------------------------------------------

def test_layer_discovery_rf_cnn(small_cnn, clean):
    x, _ = clean
    # rf_cnn.features: five conv blocks (0–4), then global pool (N, C, 1), flatten, linear, relu
    assert DEFENSES.get("nad")().attention_layers(small_cnn, x[:2]) == ["features.2", "features.3", "features.4"]
    assert DEFENSES.get("nad")(n_layers=2).attention_layers(small_cnn, x[:2]) == ["features.3", "features.4"]
    every_block = [f"features.{i}" for i in range(5)]
    assert DEFENSES.get("nad")(n_layers=50).attention_layers(small_cnn, x[:2]) == every_block


def test_layer_discovery_conv5(tiny_conv5, clean):
    x, _ = clean
    # conv5.features: as-image, conv, bn, relu, max-pool (4), two residual blocks (5, 6), global pool, …
    assert DEFENSES.get("nad")().attention_layers(tiny_conv5, x[:2]) == ["features.4", "features.5", "features.6"]
    before = copy.deepcopy(tiny_conv5.state_dict())
    DEFENSES.get("nad")().attention_layers(tiny_conv5, x[:2])  # the dry pass leaves BN statistics alone
    assert all(torch.equal(v, before[k]) for k, v in tiny_conv5.state_dict().items())
    assert no_hooks_left(tiny_conv5) and not tiny_conv5.training


def test_explicit_layers_are_used_on_2d_features(tiny_conv5, clean):
    x, y = clean
    # features.2 is a BatchNorm followed by an in-place ReLU: its recorded output must survive that
    names = ["features.2", "features.5.body"]
    recorder = nad.FeatureRecorder(tiny_conv5, names)
    with torch.no_grad():
        tiny_conv5(x[:4])
    bn_out, _ = recorder.take()
    recorder.remove()
    assert bn_out.min() < 0  # the BatchNorm's output as it was, not as the in-place ReLU left it
    defense = DEFENSES.get("nad")(layers=names, teacher_steps=2, steps=3, batch_size=8)
    assert defense.attention_layers(tiny_conv5, x[:2]) == names
    logs = []
    defense.purify(tiny_conv5, x, y, seed=0, log=lambda m, s: logs.append(m))
    assert defense.layer_names == names
    assert logs[0]["at"] > 0
    assert no_hooks_left(tiny_conv5)


def test_unknown_or_flat_layers_are_named(small_cnn, clean):
    x, y = clean
    with pytest.raises(ConfigError, match="features.99"):
        DEFENSES.get("nad")(layers=["features.2", "features.99"]).purify(small_cnn, x, y, seed=0)
    with pytest.raises(ConfigError, match="features.7"):  # the Linear layer: (N, hidden), no spatial axis
        DEFENSES.get("nad")(layers=["features.7"]).purify(small_cnn, x, y, seed=0)
    with pytest.raises(ConfigError, match="features.5"):  # the global pool: (N, C, 1), one position
        DEFENSES.get("nad")(layers=["features.5"]).purify(small_cnn, x, y, seed=0)
    assert no_hooks_left(small_cnn)


# --- training -----------------------------------------------------------------------------------------

def test_beta_zero_is_plain_fine_tuning(small_cnn, clean):
    x, y = clean
    settings = {"steps": 15, "lr": 0.02, "batch_size": 8}
    ft = DEFENSES.get("ft")(**settings).purify(copy.deepcopy(small_cnn), x, y, seed=3)
    defense = DEFENSES.get("nad")(beta=0, teacher_steps=7, **settings)
    zero = defense.purify(copy.deepcopy(small_cnn), x, y, seed=3)
    assert same_weights(zero, ft)
    assert defense.tunable_parameters == sum(p.numel() for p in small_cnn.parameters())
    distilled = DEFENSES.get("nad")(beta=10, teacher_steps=7, **settings).purify(copy.deepcopy(small_cnn), x, y,
                                                                                seed=3)
    assert not same_weights(distilled, ft)
    assert not distilled.training and no_hooks_left(distilled)


def test_teacher_is_a_fine_tuned_copy(small_cnn, clean):
    x, y = clean
    # teacher_steps 0: the teacher is the backdoored model itself, so the maps agree at the first step
    logs = []
    DEFENSES.get("nad")(teacher_steps=0, steps=2, batch_size=8).purify(copy.deepcopy(small_cnn), x, y, seed=0,
                                                                      log=lambda m, s: logs.append(m))
    assert logs[0]["at"] == pytest.approx(0.0, abs=1e-6)
    logs = []
    DEFENSES.get("nad")(teacher_steps=5, steps=2, batch_size=8).purify(copy.deepcopy(small_cnn), x, y, seed=0,
                                                                      log=lambda m, s: logs.append(m))
    assert logs[0]["at"] > 1e-4


def test_deterministic_on_cpu(small_cnn, clean):
    x, y = clean
    runs = [DEFENSES.get("nad")(teacher_steps=5, steps=10, batch_size=8).purify(copy.deepcopy(small_cnn), x, y,
                                                                               seed=1)
            for _ in range(2)]
    assert same_weights(*runs)
    assert not same_weights(runs[0], small_cnn)


@pytest.mark.parametrize("key, value", [
    ("beta", -1.0), ("beta", float("nan")), ("p", 0), ("steps", 0), ("steps", 2.5), ("teacher_steps", -1),
    ("lr", 0), ("lr", float("inf")), ("momentum", 1.0), ("weight_decay", -1e-4), ("batch_size", 0),
    ("n_layers", 0), ("layers", "features.2"), ("layers", []), ("layers", [""]), ("beta", True),
])
def test_bad_settings_are_named(key, value):
    with pytest.raises(ConfigError, match=key):
        DEFENSES.get("nad")(**{key: value})


def test_unknown_setting_is_named():
    with pytest.raises(ConfigError, match="alpha"):
        DEFENSES.get("nad")(alpha=1.0)


# --- a backdoored RF model ----------------------------------------------------------------------------

def test_nad_on_a_backdoored_rf_model(backdoored_rf):
    config, data, model_path = backdoored_rf
    model, _ = stages.load_model(config, model_path, torch.device("cpu"))
    start = copy.deepcopy(model)
    before = attack_metrics(model, data)
    defense = DEFENSES.get("nad")(teacher_steps=50, steps=100)
    started = time.perf_counter()
    purified = defense.purify(model, data["x_val"], data["y_val"], seed=0)
    seconds = time.perf_counter() - started
    after = attack_metrics(purified, data)
    print(f"\nnad (teacher 50, student 100 steps, β {defense.beta}, layers {defense.layer_names}) on "
          f"{len(data['x_val'])} clean frames: ACC {before['acc']:.4f} → {after['acc']:.4f}, "
          f"ASR {before['asr']:.4f} → {after['asr']:.4f}, RA {before['ra']:.4f} → {after['ra']:.4f}, "
          f"{seconds:.1f} s")
    assert defense.layer_names == ["features.2", "features.3", "features.4"]
    assert not same_weights(purified, start)
    assert before["asr"] > 0.9
    # Measured: ASR 98.6 % → 8 % at ACC 60.8 % → 50 %; plain ft of 100 steps leaves ASR at 92.6 %.
    assert after["asr"] < before["asr"] - 0.1
    assert after["acc"] > 0.3  # far above chance (1/8)
