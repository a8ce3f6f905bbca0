"""nft (Neural mask Fine-Tuning): only the scales of normalisation layers change, within the per-layer
clip bounds (layers numbered from 1, as in the official code); the learning rate follows the official
block-wise cosine down to its floor; the masks are baked into a plain state dict; MixUp pairs labels as
it mixes inputs; one-shot budgets work; deterministic on CPU; bad hyper-parameters rejected by name; and
what it does to a small backdoored RF model."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeline_pkg.defenses.nft as nft
from pipeline_pkg import stages
from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.evaluator import attack_metrics
from pipeline_pkg.models.base import Classifier
from pipeline_pkg.models.rf_cnn import RFCNNSpec
from pipeline_pkg.registry import DEFENSES
from pipeline_pkg.trainer import TrainingDiverged
from tiny import clean_budget, with_running_stats

torch.set_num_threads(1)

L = 64
C = 3


class MixedNorms(Classifier):
    """Every kind of norm layer NFT masks (and one without an affine scale, which it must skip)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 6, 5, padding=2), nn.BatchNorm1d(6), nn.ReLU(),
            nn.Conv1d(6, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.ReLU(),
            nn.Conv1d(6, 4, 3, stride=2, padding=1), nn.LayerNorm([4, L // 2]), nn.ReLU(),
            nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4, affine=False), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(),
        )
        self.classifier = nn.Linear(8, C)


def with_stats(model: nn.Module) -> nn.Module:
    """Non-default running statistics and non-trivial scales, as a trained model would have."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nft.NORM_TYPES) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return with_running_stats(model, L)


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    return with_stats(MixedNorms())


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    return with_stats(RFCNNSpec(width=4, hidden=8).build([2, L], C))


@pytest.fixture(scope="module")
def clean():
    return clean_budget(L, C)


def make(**params):
    return DEFENSES.get("nft")(**{"steps": 10, "batch_size": 8, **params})


def is_norm_scale(model: nn.Module, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    return leaf == "weight" and isinstance(module, nft.NORM_TYPES)


def test_registered():
    assert DEFENSES.get("nft") is nft.NeuralMaskFineTuning
    d = DEFENSES.get("nft")()
    assert (d.steps, d.lr, d.momentum, d.batch_size, d.c, d.a, d.b, d.mixup_alpha, d.lr_min, d.lr_every) == \
        (1000, 0.05, 0.95, 128, 1e-3, 0.8, 0.5, 1.0, 0.02, 200)
    assert d.bn_stats == "frozen"


@pytest.mark.parametrize("arch", ["mixed", "small_cnn"])
def test_only_norm_scales_change_within_clip_bounds(arch, request, clean):
    base = request.getfixturevalue(arch)
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    # Tight bounds and a large learning rate drive masks into their clip bounds, so the bounds are
    # really exercised; b > 0 makes each layer's bound a different one.
    a, b = 0.97, 0.02
    out = make(steps=30, lr=5.0, a=a, b=b).purify(model, *clean, seed=0)
    after = out.state_dict()

    layers = nft.masked_layers(base)
    names = {id(m): n for n, m in base.named_modules()}
    scale_keys = [f"{names[id(m)]}.weight" for m in layers]
    assert scale_keys == [k for k, _ in base.named_parameters() if is_norm_scale(base, k)]
    for k, v in before.items():
        if k not in scale_keys:  # conv/linear weights and biases, norm biases, running statistics
            assert torch.equal(after[k], v), f"{k} changed"

    lower = nft.clip_bounds(len(layers), a, b)
    assert lower == pytest.approx([a * math.exp(-b * layer) for layer in range(1, len(layers) + 1)])
    hit_lower, moved = [], 0
    for layer, key in enumerate(scale_keys):
        g0, g1 = before[key], after[key]
        nonzero = g0 != 0
        assert nonzero.all()
        ratio = g1[nonzero] / g0[nonzero]
        assert (ratio >= lower[layer] * (1 - 1e-6)).all(), (key, ratio.min().item(), lower[layer])
        assert (ratio <= 1 + 1e-6).all(), (key, ratio.max().item())
        hit_lower.append(int(torch.isclose(ratio, torch.tensor(lower[layer]), rtol=1e-5).sum()))
        moved += int((ratio < 1 - 1e-4).sum())
    assert moved > 0, "no mask moved"
    if arch == "mixed":
        # Here every layer has masks pinned at exactly its own bound a·exp(−b·l) (on the random-data
        # CNN the gradients are too weak to get there in 30 steps).
        assert all(hit_lower), f"layers whose masks never reached their bound: {hit_lower}"


def test_clip_bounds_number_layers_from_one():
    # The official mask_clip clamps layer count_layer = 1, 2, … to [alpha·exp(−beta·count_layer), 1]:
    # the first layer's floor is a·e^(−b), not a, and the last one's a·e^(−b·L).
    assert nft.clip_bounds(3, 0.8, 0.5) == pytest.approx(
        [0.4852245277701068, 0.2943035529371539, 0.17850412811874386], rel=1e-12)
    bounds = nft.clip_bounds(7, 0.9, 0.3)
    assert len(bounds) == 7
    assert bounds[0] == pytest.approx(0.9 * math.exp(-0.3), rel=1e-15)
    assert bounds[-1] == pytest.approx(0.9 * math.exp(-0.3 * 7), rel=1e-15)
    assert nft.clip_bounds(2, 0.8, 0.0) == [0.8, 0.8]  # b = 0: one floor a for every layer
    assert nft.clip_bounds(0, 0.8, 0.5) == []


def lr_per_step(monkeypatch, defense, model, clean):
    """The learning rate of every optimiser step of a purification, and the rate left after it."""
    used, optimizers = [], []

    def recording_step(optimizer, loss, what, **kwargs):
        used.append(optimizer.param_groups[0]["lr"])
        optimizers.append(optimizer)
        return real_step(optimizer, loss, what, **kwargs)

    real_step = nft.guarded_step
    monkeypatch.setattr(nft, "guarded_step", recording_step)
    defense.purify(model, *clean, seed=0)
    assert len({id(o) for o in optimizers}) == 1
    return used, optimizers[0].param_groups[0]["lr"]


def tiny_masked_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * L, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, C))


def test_learning_rate_follows_the_official_schedule_to_its_floor(monkeypatch, clean):
    # Official: CosineAnnealingLR(T_max = ceil(1000 / 200) = 5, eta_min = 0.02) from lr 0.05, stepped
    # once per 200 mask steps. So 200 steps at each of these rates, then the floor 0.02 — never 0, and
    # constant within a block (a per-step cosine, with or without the floor, fails both).
    used, final = lr_per_step(monkeypatch, DEFENSES.get("nft")(), tiny_masked_model(), clean)
    blocks = [0.05, 0.04713525491562421, 0.03963525491562421, 0.03036474508437579, 0.02286474508437579]
    assert len(used) == 1000
    assert used == pytest.approx([lr for lr in blocks for _ in range(200)], rel=1e-12)
    assert final == pytest.approx(0.02, rel=1e-12)
    assert min(used) > 0.0228


def test_learning_rate_schedule_with_a_partial_last_block(monkeypatch, clean):
    # steps 25 in blocks of 10: T_max = 3, blocks of 10, 10 and 5 steps; the scheduler also steps after
    # the last (partial) block, so the rate still ends at the floor lr_min.
    defense = make(steps=25, lr=0.1, lr_min=0.01, lr_every=10)
    used, final = lr_per_step(monkeypatch, defense, tiny_masked_model(), clean)
    expected = [0.1] * 10 + [0.01 + 0.09 * 0.75] * 10 + [0.01 + 0.09 * 0.25] * 5
    assert used == pytest.approx(expected, rel=1e-12)
    assert final == pytest.approx(0.01, rel=1e-12)
    # Shorter than one block: the official code's single pass, all at lr, then the floor.
    used, final = lr_per_step(monkeypatch, make(steps=7), tiny_masked_model(), clean)
    assert used == [0.05] * 7 and final == pytest.approx(0.02, rel=1e-12)


def test_tunable_parameters_counts_norm_affine_channels(mixed, small_cnn, clean):
    # MixedNorms: BatchNorm1d(6) + GroupNorm(3, 6) + LayerNorm([4, 32]) + LayerNorm(8); the
    # BatchNorm1d(4, affine=False) has no scale and is skipped.
    defense = make(steps=1)
    defense.purify(copy.deepcopy(mixed), *clean, seed=0)
    assert defense.tunable_parameters == 6 + 6 + 4 * (L // 2) + 8
    defense.purify(copy.deepcopy(small_cnn), *clean, seed=0)
    channels = sum(m.num_features for m in small_cnn.modules() if isinstance(m, nn.BatchNorm1d))
    assert defense.tunable_parameters == channels == 4 + 4 + 8 + 8 + 16


@pytest.mark.parametrize("arch", ["mixed", "small_cnn"])
def test_plain_state_dict_after_purification(arch, request, clean):
    base = request.getfixturevalue(arch)
    model = copy.deepcopy(base)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    out = make().purify(model, *clean, seed=0)
    assert out is model
    assert list(out.state_dict()) == list(base.state_dict())  # same keys, same order
    assert [n for n, _ in out.named_parameters()] == [n for n, _ in base.named_parameters()]
    assert not any("parametriz" in k or "mask" in k for k in out.state_dict())
    assert all(type(m) is type(o) for m, o in zip(out.modules(), base.modules()))
    assert all(type(p) is nn.Parameter for p in out.parameters())
    assert {n: p.requires_grad for n, p in out.named_parameters()} == grads
    assert not out.training and not any(m.training for m in out.modules())
    # The state dict loads into a fresh copy of the architecture and gives the same outputs.
    fresh = copy.deepcopy(base)
    fresh.load_state_dict(out.state_dict())
    x = clean[0][:5]
    assert torch.equal(fresh(x), out(x))


def test_mixup_helper_pairs_labels_and_draws_lambda_from_the_generator():
    n = 16
    x = torch.eye(n).reshape(n, 1, n)  # sample i is the unit vector e_i: the partner can be read off
    y = torch.arange(n) % 5
    x_mix, y_a, y_b, lam = nft.mixup(x, y, 1.0, torch.Generator().manual_seed(0))
    assert 0.0 <= lam <= 1.0
    assert torch.equal(y_a, y)
    partner = (x_mix - lam * x).reshape(n, n).argmax(1)
    if lam < 1:
        assert sorted(partner.tolist()) == list(range(n)), "partners must be a permutation of the batch"
    assert torch.equal(y_b, y[partner])
    assert torch.allclose(x_mix, lam * x + (1 - lam) * x[partner])
    # Seeded: the same generator state gives the same λ and pairing; another seed gives others.
    again = nft.mixup(x, y, 1.0, torch.Generator().manual_seed(0))
    assert again[3] == lam and torch.equal(again[0], x_mix)
    other = nft.mixup(x, y, 1.0, torch.Generator().manual_seed(1))
    assert other[3] != lam

    # λ ~ Beta(α, α): α = 1 is uniform on [0, 1] (mean 1/2, variance 1/12); small α pushes λ to the ends.
    gen = torch.Generator().manual_seed(0)
    lams = torch.tensor([nft.beta_sample(1.0, gen) for _ in range(4000)], dtype=torch.float64)
    assert ((lams >= 0) & (lams <= 1)).all()
    assert lams.mean().item() == pytest.approx(0.5, abs=0.02)
    assert lams.var().item() == pytest.approx(1 / 12, abs=0.01)
    small = torch.tensor([nft.beta_sample(0.2, gen) for _ in range(4000)], dtype=torch.float64)
    assert small.var().item() == pytest.approx(1 / (4 * 1.4), abs=0.02)

    # The loss: λ·CE(y_a) + (1 − λ)·CE(y_b).
    logits = torch.randn(n, 5, generator=torch.Generator().manual_seed(2))
    expected = lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)
    assert torch.allclose(nft.mixup_loss(logits, y_a, y_b, lam), expected)
    assert torch.allclose(nft.mixup_loss(logits, y_a, y_b, 1.0), F.cross_entropy(logits, y_a))


def test_mixup_mixes_across_classes_with_one_sample_per_class():
    x = torch.randn(8, 2, L)
    y = torch.arange(8)
    gen = torch.Generator().manual_seed(0)
    crossed = sum(int((nft.mixup(x, y, 1.0, gen)[2] != y).sum()) for _ in range(10))
    assert crossed > 40  # a random permutation of 8 leaves about 1 of 8 in place


def test_one_shot_budget(backdoored_rf):
    config, data, model_path = backdoored_rf
    model, _ = stages.load_model(config, model_path, torch.device("cpu"))
    x, y = stages.clean_budget(data, {**config["clean_budget"], "one_shot": True}, seed=0)
    classes = int(data["y_test"].max()) + 1
    assert len(x) == classes and sorted(y.tolist()) == list(range(classes))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    defense = make(steps=50)
    logged = []
    out = defense.purify(model, x, y, seed=0, log=lambda m, s: logged.append(m))
    assert all(torch.isfinite(v.float()).all() for v in out.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items())
    assert logged and all(math.isfinite(m["loss"]) for m in logged)
    assert attack_metrics(out, data)["acc"] > 0.125


def test_bn_stats_frozen_keeps_running_statistics_update_changes_them(small_cnn, clean):
    def stats(m):
        return {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}

    base = stats(small_cnn)
    frozen = make(bn_stats="frozen").purify(copy.deepcopy(small_cnn), *clean, seed=0)
    assert all(torch.equal(v, base[k]) for k, v in stats(frozen).items())
    updated = make(bn_stats="update").purify(copy.deepcopy(small_cnn), *clean, seed=0)
    after = stats(updated)
    assert any(not torch.equal(after[k], base[k]) for k in base if k.endswith("running_mean"))
    assert not updated.training


def test_deterministic_on_cpu(mixed, clean):
    a = make().purify(copy.deepcopy(mixed), *clean, seed=3).state_dict()
    b = make().purify(copy.deepcopy(mixed), *clean, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = make().purify(copy.deepcopy(mixed), *clean, seed=4).state_dict()
    assert any(not torch.equal(a[k], v) for k, v in c.items())


def test_diverging_run_leaves_the_model_untouched_and_plain(mixed, clean):
    model = copy.deepcopy(mixed)
    x, y = clean
    x = x.clone()
    x[0, 0, 0] = float("nan")
    with pytest.raises(TrainingDiverged):
        make(batch_size=24).purify(model, x, y, seed=0)
    assert list(model.state_dict()) == list(mixed.state_dict())
    assert all(torch.equal(v, mixed.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(type(p) is nn.Parameter and p.requires_grad for p in model.parameters())
    assert not model.training


def test_model_without_norm_layers_is_rejected(clean):
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * L, C))
    with pytest.raises(ValueError, match="normalisation"):
        make().purify(model, *clean, seed=0)


@pytest.mark.parametrize("params, key", [
    ({"a": 0.0}, "a"),
    ({"a": 1.5}, "a"),
    ({"b": -0.1}, "b"),
    ({"c": -1e-3}, "c"),
    ({"mixup_alpha": 0.0}, "mixup_alpha"),
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"lr": -0.1}, "lr"),
    ({"momentum": 1.0}, "momentum"),
    ({"batch_size": 0}, "batch_size"),
    ({"lr_min": -0.01}, "lr_min"),
    ({"lr_min": 0.06}, "lr_min"),  # above lr 0.05: the "floor" would raise the rate
    ({"lr_min": float("nan")}, "lr_min"),
    ({"lr_every": 0}, "lr_every"),
    ({"lr_every": 2.5}, "lr_every"),
    ({"bn_stats": "train"}, "bn_stats"),
])
def test_bad_hyper_parameters(params, key):
    with pytest.raises(ConfigError, match=rf"parameter {key}="):
        DEFENSES.get("nft")(**params)


def test_unknown_hyper_parameter_named():
    with pytest.raises(ConfigError) as info:
        DEFENSES.get("nft")(alpha=1)
    message = str(info.value)
    assert "alpha" in message and "mixup_alpha" in message and "bn_stats" in message


def test_nft_on_backdoored_rf(backdoored_rf):
    config, data, model_path = backdoored_rf
    model, _ = stages.load_model(config, model_path, torch.device("cpu"))
    before = attack_metrics(model, data)
    gammas = {k: v.clone() for k, v in model.state_dict().items()}
    defense = DEFENSES.get("nft")(steps=200)
    start = time.perf_counter()
    purified = defense.purify(model, data["x_val"], data["y_val"], seed=0)
    wall = time.perf_counter() - start
    after = attack_metrics(purified, data)
    print(f"\nnft on backdoored_rf ({len(data['x_val'])} clean samples, 200 steps, "
          f"{defense.tunable_parameters} masks, {wall:.2f}s): "
          f"ACC {before['acc']:.3f} -> {after['acc']:.3f}, ASR {before['asr']:.3f} -> {after['asr']:.3f}, "
          f"RA {before['ra']:.3f} -> {after['ra']:.3f}; mean mask per layer "
          f"{[round(m, 3) for m in defense.mask_means]}")
    assert before["asr"] > 0.9
    assert after["acc"] > 0.125  # above chance (8 classes)
    assert min(defense.mask_means) < 1 - 1e-3, "masks never moved from 1"
    changed = [k for k in gammas if not torch.equal(gammas[k], purified.state_dict()[k])]
    assert changed and all(k.endswith(".weight") and is_norm_scale(purified, k) for k in changed)


def test_masks_minimise_the_clean_loss_without_mixup(backdoored_rf):
    # With α → 0, λ is 0 or 1 and the objective is plain cross-entropy on the budget: training the
    # masks must lower it (a sign error, a missing step or masks not in the graph would not).
    config, data, model_path = backdoored_rf
    model, _ = stages.load_model(config, model_path, torch.device("cpu"))
    x, y = data["x_val"], data["y_val"]
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
    DEFENSES.get("nft")(steps=100, mixup_alpha=1e-3).purify(model, x, y, seed=0)
    with torch.no_grad():
        after = F.cross_entropy(model(x), y).item()
    print(f"\nnft without MixUp: clean-budget CE {before:.3f} -> {after:.3f}")
    assert after < before - 0.02
