"""fast_fip: the SVD factorisation is exact at δ = 0, only the singular-value shifts are tuned, the
purified model is a plain one whose weights keep their singular vectors, biases and norm layers are
untouched, runs are deterministic, bad settings are rejected by name, and it runs on a real backdoor."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import pipeline_pkg.defenses.fast_fip  # noqa: F401  (registers fast_fip)
from pipeline_pkg import stages
from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.defenses.fast_fip import FACTORED, SpectralShift, bake, factorize
from pipeline_pkg.defenses.fip import FisherInformationPurification
from pipeline_pkg.evaluator import attack_metrics
from pipeline_pkg.models.conv5 import Conv5Spec
from pipeline_pkg.models.rf_cnn import RFCNNSpec
from pipeline_pkg.registry import DEFENSES
from pipeline_pkg.trainer import TrainingDiverged
from tiny import clean_budget

torch.set_num_threads(1)

L = 64
C = 3


def with_running_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Non-default BatchNorm running statistics, as a trained model would have."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x * 2 + 0.5)
    return model.eval()


class Mixed(nn.Module):
    """Conv2d (grouped), Conv3d and wide/narrow Linear layers, for the architecture-generic checks."""

    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(4, 6, 3, groups=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c3 = nn.Conv3d(1, 5, (2, 3, 3), bias=False)
        self.wide = nn.Linear(5 * 5 * 4 * 4, 7)   # in > out
        self.tall = nn.Linear(7, 20)              # out > in
        self.classifier = nn.Linear(20, C)

    def forward(self, x):
        h = torch.relu(self.bn(self.c2(x)))                   # (N, 6, 6, 6)
        h = torch.relu(self.c3(h.unsqueeze(1)))               # (N, 5, 5, 4, 4)
        return self.classifier(torch.tanh(self.tall(torch.tanh(self.wide(h.flatten(1))))))


@pytest.fixture(scope="module")
def backdoored():
    torch.manual_seed(0)
    model = RFCNNSpec(width=4, hidden=8).build([2, L], C)
    return with_running_stats(model, torch.randn(16, 2, L))


@pytest.fixture(scope="module")
def clean():
    return clean_budget(L, C)


def make(**params):
    return DEFENSES.get("fast_fip")(**{"steps": 5, "fisher_every": 2, "batch_size": 8, **params})


def factored_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FACTORED)}


def expected_count(model: nn.Module) -> int:
    return sum(min(m.weight.shape[0], m.weight[0].numel()) for m in factored_modules(model).values())


def test_registered_with_fip_defaults():
    cls = DEFENSES.get("fast_fip")
    assert issubclass(cls, FisherInformationPurification)
    assert cls.defaults == DEFENSES.get("fip").defaults
    assert cls.defaults["steps"] == 2000 and cls.defaults["lr"] == 0.005 and cls.defaults["eta_f"] == 0.001


@pytest.mark.parametrize("arch", ["rf_cnn", "conv5", "mixed"])
def test_factorisation_is_exact_at_zero_shift(arch):
    torch.manual_seed(0)
    if arch == "rf_cnn":
        model, x = RFCNNSpec(width=8, hidden=16).build([2, L], C), torch.randn(8, 2, L)
    elif arch == "conv5":
        model, x = Conv5Spec(stem=8, hidden=16).build([2, L], C), torch.randn(8, 2, L)
    else:
        model, x = Mixed(), torch.randn(8, 4, 6, 6)
    model = with_running_stats(model, x)
    with torch.no_grad():
        reference = model(x)
    keys = {k: v.shape for k, v in model.state_dict().items()}

    deltas = factorize(model)
    assert len(deltas) == len(factored_modules(model))
    assert all(parametrize.is_parametrized(m, "weight") for m in factored_modules(model).values())
    assert all(torch.equal(d, torch.zeros_like(d)) for d in deltas)
    assert factorize(model) == deltas  # idempotent: no second layer of parametrizations
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, atol=1e-4, rtol=1e-4)

    bake(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize("arch", ["rf_cnn", "mixed"])
def test_tunable_parameters_are_one_per_singular_value(arch, clean):
    torch.manual_seed(0)
    if arch == "rf_cnn":
        model, (x, y) = RFCNNSpec(width=16, hidden=32).build([2, L], C), clean
    else:
        model, x = Mixed(), torch.randn(24, 4, 6, 6)
        y = torch.arange(24) % C
    expected = expected_count(model)
    total = sum(p.numel() for p in model.parameters())
    defense = make(steps=2)
    defense.purify(model, x, y, seed=0)
    assert defense.tunable_parameters == expected
    assert defense.tunable_parameters * 20 < total, (defense.tunable_parameters, total)


def test_purified_model_is_plain_and_keeps_singular_vectors(backdoored, clean):
    model = copy.deepcopy(backdoored)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bases = {}
    for name, m in factored_modules(model).items():
        matrix = m.weight.detach().reshape(m.weight.shape[0], -1).double()
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        bases[name] = (u, vh.T)
    logged = []
    out = make(steps=20, lr=0.05).purify(model, *clean, seed=0, log=lambda m, s: logged.append((s, m)))

    assert out is model
    assert not out.training and not any(m.training for m in out.modules())
    assert not any(parametrize.is_parametrized(m) for m in out.modules())
    assert all(p.requires_grad for p in out.parameters())
    assert logged and logged[0][0] == 0 and "loss" in logged[0][1]
    after = out.state_dict()
    assert list(after) == list(state)
    assert all(after[k].shape == v.shape and after[k].dtype == v.dtype for k, v in state.items())
    assert all(torch.isfinite(v).all() for v in after.values())

    weights = {f"{n}.weight" for n in factored_modules(model)}
    # Everything but the factored weights — biases, BatchNorm affine parameters and running
    # statistics (bn_stats=frozen) — is bit-for-bit unchanged.
    for k, v in state.items():
        if k not in weights:
            assert torch.equal(after[k], v), f"{k} changed"
    assert any(not torch.equal(after[k], state[k]) for k in weights), "the weights must change"

    for name, m in factored_modules(out).items():
        u, v = bases[name]
        core = u.T @ m.weight.detach().reshape(m.weight.shape[0], -1).double() @ v
        diagonal = torch.diagonal(core)
        off = core - torch.diag(diagonal)
        assert off.abs().max() < 1e-4 * max(1.0, diagonal.abs().max().item()), name
        assert (diagonal > -1e-5).all(), name  # ReLU(S + δ) ≥ 0


def test_purify_is_deterministic(backdoored, clean):
    a = make().purify(copy.deepcopy(backdoored), *clean, seed=3)
    b = make().purify(copy.deepcopy(backdoored), *clean, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    c = make().purify(copy.deepcopy(backdoored), *clean, seed=4)
    assert any(not torch.equal(sa[k], v) for k, v in c.state_dict().items())


def test_diverging_run_still_returns_a_plain_model(backdoored, clean):
    model = copy.deepcopy(backdoored)
    keys = list(model.state_dict())
    with pytest.raises(TrainingDiverged):
        make(steps=50, lr=1e38, max_grad_norm=1e38, eta_f=0.0).purify(model, *clean, seed=0)
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, SpectralShift) for m in model.modules())


@pytest.mark.parametrize("params, key", [
    ({"momentum": 1.5}, "momentum"),
    ({"bn_stats": "x"}, "bn_stats"),
    ({"eta_f": -1}, "eta_f"),
    ({"eta_r": -1}, "eta_r"),
    ({"probes": 0}, "probes"),
    ({"fisher_every": 0}, "fisher_every"),
    ({"steps": 0}, "steps"),
    ({"lr": -1}, "lr"),
])
def test_bad_hyper_parameters(params, key):
    with pytest.raises(ConfigError, match=rf"defense 'fast_fip': parameter {key}="):
        DEFENSES.get("fast_fip")(**params)


def test_unknown_hyper_parameter_named():
    with pytest.raises(ConfigError) as info:
        DEFENSES.get("fast_fip")(foo=1)
    assert "foo" in str(info.value) and "eta_f" in str(info.value)


def test_on_backdoored_rf_model(backdoored_rf):
    config, data, model_path = backdoored_rf
    cpu = torch.device("cpu")
    x, y = data["x_val"], data["y_val"]
    results = {}
    for name in ["fip", "fast_fip"]:
        model, _ = stages.load_model(config, model_path, cpu)
        before = attack_metrics(model, data)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        defense = DEFENSES.get(name)(steps=100)
        t0 = time.perf_counter()
        purified = defense.purify(model, x, y, seed=0)
        seconds = time.perf_counter() - t0
        after = attack_metrics(purified, data)
        results[name] = (before, after, seconds, defense.tunable_parameters)
        print(f"\n{name}: {defense.tunable_parameters} tunable values, {seconds:.2f} s for 100 steps; "
              f"ACC {before['acc']:.4f} -> {after['acc']:.4f}, "
              f"ASR {before['asr']:.4f} -> {after['asr']:.4f}, "
              f"RA {before['ra']:.4f} -> {after['ra']:.4f}")
        assert set(purified.state_dict()) == set(start)
        assert any(not torch.equal(v, start[k]) for k, v in purified.state_dict().items())
        assert after["acc"] > 0.125  # above chance (8 classes)

    model, _ = stages.load_model(config, model_path, cpu)
    assert results["fast_fip"][3] == expected_count(model)
    assert results["fast_fip"][3] * 50 < results["fip"][3]
    print(f"wall time fast_fip / fip at 100 steps: {results['fast_fip'][2] / results['fip'][2]:.2f}")
