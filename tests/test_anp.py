"""anp (Adversarial Neuron Pruning): the pruning threshold comes from the clean budget alone; pruned
neurons output exactly 0 and nothing else in the model changes; masks stay in [0, 1] and the noise in
[−ε, ε]; deterministic on CPU; bad hyper-parameters rejected by name; a plain state dict after
purification; with its default batch statistics it prunes a planted trigger channel that frozen
statistics cannot see; and what it does to a small backdoored RF model."""

from __future__ import annotations

import copy
import inspect
import math
import time

import pytest
import torch
from torch import nn

import pipeline_pkg.defenses.anp as anp
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
    """Every kind of norm layer ANP perturbs, one without a shift β, and one without an affine scale
    (which it must skip)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 6, 5, padding=2), nn.BatchNorm1d(6), nn.ReLU(),
            nn.Conv1d(6, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.ReLU(),
            nn.Conv1d(6, 4, 3, stride=2, padding=1), nn.LayerNorm([4, L // 2]), nn.ReLU(),
            nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4, affine=False), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(),
            nn.Linear(8, 8), nn.RMSNorm(8), nn.ReLU(),
        )
        self.classifier = nn.Linear(8, C)


def with_stats(model: nn.Module) -> nn.Module:
    """Non-default running statistics and non-trivial scales/shifts, as a trained model would have."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in anp.masked_layers(model):
            m.weight.uniform_(0.5, 1.5)
            if isinstance(getattr(m, "bias", None), torch.Tensor):
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
    return DEFENSES.get("anp")(**{"steps": 10, "batch_size": 8, **params})


def norm_keys(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """state-dict key → (layer, 'weight'/'bias') for the γ/β of every perturbed norm layer."""
    names = {id(m): n for n, m in model.named_modules()}
    keys = {}
    for layer in anp.masked_layers(model):
        for leaf in ("weight", "bias"):
            if isinstance(getattr(layer, leaf, None), torch.Tensor):
                keys[f"{names[id(layer)]}.{leaf}"] = (layer, leaf)
    return keys


def test_registered_with_the_papers_defaults():
    assert DEFENSES.get("anp") is anp.AdversarialNeuronPruning
    d = DEFENSES.get("anp")()
    assert (d.steps, d.lr, d.momentum, d.batch_size, d.eps, d.anp_steps, d.alpha, d.rand_init) == \
        (500, 0.2, 0.9, 128, 0.4, 1, 0.2, True)
    assert (d.max_acc_drop, d.threshold_step, d.max_threshold) == (0.05, 0.05, 0.95)
    # the reference code trains the masks in train mode: batch statistics, running ones kept (momentum 0)
    assert d.bn_stats == "batch"


# --- the threshold comes from the clean budget only ---

def test_purify_sees_only_the_clean_budget(monkeypatch, small_cnn, clean):
    # The signature has no room for test data, and every accuracy the threshold search measures is on
    # the very clean-budget tensors purify was given.
    assert list(inspect.signature(anp.AdversarialNeuronPruning.purify).parameters) == \
        ["self", "model", "x", "y", "seed", "log"]
    seen = []
    real = anp.accuracy
    running = {k: v.clone() for k, v in small_cnn.state_dict().items() if "running" in k or "num_batches" in k}
    momenta = [m.momentum for m in small_cnn.modules() if isinstance(m, nn.BatchNorm1d)]

    def spy(model, x, y):
        # the masks train on batch statistics, but every accuracy is the model's own: original
        # running statistics and momenta
        sd = model.state_dict()
        seen.append((x, y, all(torch.equal(sd[k], v) for k, v in running.items()),
                     [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm1d)] == momenta))
        return real(model, x, y)

    monkeypatch.setattr(anp, "accuracy", spy)
    x, y = clean
    make().purify(copy.deepcopy(small_cnn), x, y, seed=0)
    assert len(seen) >= 3  # baseline, at least one threshold, the final pruned model
    assert all(xs is x and ys is y and stats and moms for xs, ys, stats, moms in seen)


def test_threshold_grid():
    grid = anp.threshold_grid(0.05, 0.95)
    assert len(grid) == 19 and grid[0] == 0.05 and grid[-1] == 0.95
    assert grid == pytest.approx([0.05 * k for k in range(1, 20)])
    assert anp.threshold_grid(0.1, 1.0)[-1] == 1.0
    assert anp.threshold_grid(0.3, 0.5) == [0.3]


def test_select_threshold_picks_the_largest_within_the_drop():
    grid = anp.threshold_grid(0.05, 0.95)
    calls = []

    def smooth(t):  # flat up to 0.4, then falling 0.5 per unit of threshold
        calls.append(t)
        return 0.9 - 0.5 * max(0.0, t - 0.4)

    t, curve = anp.select_threshold(grid, smooth, 0.9, 0.05)
    assert t == pytest.approx(0.5)  # 0.9 − 0.5·0.1 = 0.85 is exactly the allowed drop
    assert calls == sorted(calls, reverse=True) and calls[-1] == t  # searched from the top, stopped there
    assert curve == [(c, 0.9 - 0.5 * max(0.0, c - 0.4)) for c in calls]
    # a looser budget admits more pruning, a zero budget only the flat part
    assert anp.select_threshold(grid, smooth, 0.9, 0.2)[0] == pytest.approx(0.8)
    assert anp.select_threshold(grid, smooth, 0.9, 0.0)[0] == pytest.approx(0.4)
    # accuracy that is not monotone in the threshold: the largest qualifying threshold wins
    bumpy = {0.1: 0.9, 0.2: 0.7, 0.3: 0.88, 0.4: 0.5}
    assert anp.select_threshold(list(bumpy), bumpy.get, 0.9, 0.05)[0] == 0.3
    # nothing qualifies: prune nothing
    t, curve = anp.select_threshold(grid, lambda t: 0.1, 0.9, 0.05)
    assert t == 0.0 and len(curve) == len(grid)


# --- pruning removes exactly the pruned neurons ---

def norm_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
             for layer in anp.masked_layers(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def test_prune_helper_zeroes_exactly_the_masked_neurons(mixed, clean):
    model = copy.deepcopy(mixed)
    layers = anp.masked_layers(model)
    gen = torch.Generator().manual_seed(0)
    masks = [torch.rand(layer.weight.shape, generator=gen) for layer in layers]
    for mask in masks:  # at least one pruned and one kept neuron per layer
        mask.view(-1)[:2] = torch.tensor([0.0, 1.0])
    counts = anp.prune_(layers, masks, 0.3)
    assert counts == [int((m < 0.3).sum()) for m in masks] and all(counts)
    outputs = norm_outputs(model, clean[0])
    for out, mask in zip(outputs, masks):
        off = mask < 0.3
        # the neuron dims follow the batch dim (channels for BN/GN, the normalised shape for LN/RMSNorm)
        picked, kept = out[:, off], out[:, ~off]
        assert torch.equal(picked, torch.zeros_like(picked))
        assert (kept != 0).any()


@pytest.mark.parametrize("bn_stats", ["batch", "update"])
def test_pruned_neurons_output_zero_and_nothing_else_changes(bn_stats, mixed, clean):
    base = mixed
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    # "batch" (the default) counts num_batches_tracked and "update" also moves the running statistics
    # while optimising; ANP must keep neither. max_acc_drop=1 accepts the largest threshold, so neurons
    # really are pruned.
    defense = make(steps=20, max_acc_drop=1.0, bn_stats=bn_stats)
    out = defense.purify(model, *clean, seed=0)
    assert defense.threshold == pytest.approx(0.95)
    assert defense.pruned > 0 and defense.pruned == sum(defense.pruned_per_layer)
    assert defense.tunable_parameters == sum(m.numel() for m in defense.masks) == 6 + 6 + 4 * (L // 2) + 8 + 8

    after = out.state_dict()
    keys = norm_keys(out)
    pruned_by_key = {}
    for (key, (layer, _)) in keys.items():
        mask = defense.masks[anp.masked_layers(out).index(layer)]
        pruned_by_key[key] = mask < defense.threshold
    for k, v in before.items():
        if k not in keys:  # conv/linear weights and biases, running statistics, the non-affine norm
            assert torch.equal(after[k], v), f"{k} changed"
            continue
        off = pruned_by_key[k]
        assert torch.equal(after[k][~off], v[~off]), f"{k}: a non-pruned entry changed"
        assert torch.equal(after[k][off], torch.zeros_like(v[off])), f"{k}: a pruned entry is not 0"

    outputs = norm_outputs(out, clean[0])
    for out_t, mask in zip(outputs, defense.masks):
        off = mask < defense.threshold
        assert torch.equal(out_t[:, off], torch.zeros_like(out_t[:, off]))


def test_masks_stay_in_unit_interval_and_noise_in_eps_box(small_cnn, clean):
    for eps, inner, rand_init in [(0.4, 1, True), (0.1, 3, False)]:
        logged = []
        # A large learning rate drives masks into the clip bounds, so the clipping is really exercised.
        make(steps=30, lr=50.0, eps=eps, anp_steps=inner, rand_init=rand_init, log_every=1).purify(
            copy.deepcopy(small_cnn), *clean, seed=0, log=lambda m, s: logged.append(m))
        steps = [m for m in logged if "loss" in m]
        assert len(steps) == 30
        assert all(0.0 <= m["mask_min"] <= m["mask_max"] <= 1.0 for m in steps)
        assert min(m["mask_min"] for m in steps) == 0.0, "the lower clip bound was never reached"
        eps32 = torch.tensor(eps).item()  # ε as the float32 noise holds it
        assert all(m["noise_absmax"] <= eps32 for m in steps)
        # a signed step of size ε/anp_steps from inside the box reaches its boundary
        assert all(m["noise_absmax"] == pytest.approx(eps) for m in steps)
        assert all(math.isfinite(m["loss"]) for m in steps)


def test_no_noise_when_eps_is_zero(small_cnn, clean):
    logged = []
    make(eps=0.0, log_every=1).purify(copy.deepcopy(small_cnn), *clean, seed=0,
                                      log=lambda m, s: logged.append(m))
    steps = [m for m in logged if "loss" in m]
    assert all(m["noise_absmax"] == 0.0 and m["ce_perturbed"] == m["ce_clean"] == m["loss"] for m in steps)


# --- generic plumbing ---

@pytest.mark.parametrize("arch", ["mixed", "small_cnn"])
def test_plain_state_dict_after_purification(arch, request, clean):
    base = request.getfixturevalue(arch)
    model = copy.deepcopy(base)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    out = make(max_acc_drop=1.0).purify(model, *clean, seed=0)
    assert out is model
    assert list(out.state_dict()) == list(base.state_dict())  # same keys, same order
    assert [n for n, _ in out.named_parameters()] == [n for n, _ in base.named_parameters()]
    assert not any("parametriz" in k or "mask" in k or "noise" in k for k in out.state_dict())
    assert all(type(m) is type(o) for m, o in zip(out.modules(), base.modules()))
    assert all(type(p) is nn.Parameter for p in out.parameters())
    assert {n: p.requires_grad for n, p in out.named_parameters()} == grads
    assert not out.training and not any(m.training for m in out.modules())
    fresh = copy.deepcopy(base)
    fresh.load_state_dict(out.state_dict())
    x = clean[0][:5]
    assert torch.equal(fresh(x), out(x))


def test_tunable_parameters_counts_mask_entries(small_cnn, clean):
    defense = make(steps=1)
    defense.purify(copy.deepcopy(small_cnn), *clean, seed=0)
    channels = sum(m.num_features for m in small_cnn.modules() if isinstance(m, nn.BatchNorm1d))
    assert defense.tunable_parameters == channels == 4 + 4 + 8 + 8 + 16


def test_deterministic_on_cpu(mixed, clean):
    def run(seed):
        d = make(max_acc_drop=1.0)
        sd = d.purify(copy.deepcopy(mixed), *clean, seed=seed).state_dict()
        return d, sd

    da, a = run(3)
    db, b = run(3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(m, n) for m, n in zip(da.masks, db.masks))
    assert (da.pruned, da.threshold) == (db.pruned, db.threshold)
    dc, _ = run(4)
    assert any(not torch.equal(m, n) for m, n in zip(da.masks, dc.masks))


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
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"lr": 0.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
    ({"batch_size": 0}, "batch_size"),
    ({"eps": -0.1}, "eps"),
    ({"eps": float("inf")}, "eps"),
    ({"anp_steps": 0}, "anp_steps"),
    ({"anp_steps": 1.5}, "anp_steps"),
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"rand_init": "yes"}, "rand_init"),
    ({"max_acc_drop": -0.01}, "max_acc_drop"),
    ({"threshold_step": 0.0}, "threshold_step"),
    ({"threshold_step": 0.5, "max_threshold": 0.3}, "threshold_step"),
    ({"max_threshold": 1.5}, "max_threshold"),
    ({"max_threshold": 0.0}, "max_threshold"),
    ({"steps": "many"}, "steps"),
    ({"bn_stats": "train"}, "bn_stats"),
    ({"batch_size": 1}, "batch_size"),  # no batch statistics of one sample
    ({"batch_size": 1, "bn_stats": "update"}, "batch_size"),
])
def test_bad_hyper_parameters(params, key):
    with pytest.raises(ConfigError, match=rf"parameter {key}="):
        DEFENSES.get("anp")(**params)


def test_batch_statistics_need_two_samples(small_cnn, clean):
    assert DEFENSES.get("anp")(batch_size=1, bn_stats="frozen").batch_size == 1
    x, y = clean
    with pytest.raises(ValueError, match="bn_stats"):
        make().purify(copy.deepcopy(small_cnn), x[:1], y[:1], seed=0)
    make(steps=2, bn_stats="frozen").purify(copy.deepcopy(small_cnn), x[:1], y[:1], seed=0)


def test_unknown_hyper_parameter_named():
    with pytest.raises(ConfigError) as info:
        DEFENSES.get("anp")(epsilon=0.4)
    message = str(info.value)
    assert "epsilon" in message and "eps" in message and "max_acc_drop" in message


# --- a planted backdoor channel: why the masks train on batch statistics ---

TARGET = 0
BURST = slice(0, 16)  # the trigger: +4 on the first 16 of the L = 64 samples of the trigger input channel


def planted_data(n: int, seed: int, triggered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """C class input channels (mean +1 on the true class's, −1 elsewhere, noise σ 3) and one trigger
    input channel, uniform in [−0.2, 0.2] on clean data (bounded, so the planted channel's dormancy
    below is exact), with the burst added when `triggered`. Labels cycle through the classes."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = torch.randn(n, C + 1, L, generator=gen) * 3 - 1
    x[torch.arange(n), y] += 2
    x[:, C] = (torch.rand(n, L, generator=gen) * 2 - 1) * 0.2
    if triggered:
        x[:, C, BURST] += 4
    return x, y


class PlantedBackdoor(Classifier):
    """1×1 conv (identity) → BatchNorm → ReLU → mean over time → linear. Channels 0…C−1 carry the
    classes; channel C is a planted trigger detector (γ 1, β −1) that adds 8 to the target logit.
    Running statistics come from a poisoned training set (10% triggered), as a backdoored model's do.

    Eval mode, clean input: the planted channel's normalised value is ≤ (0.2 − 0.1)/0.63 ≈ 0.16, so even
    under ANP's worst noise in the ε = 0.4 box, 1.4·0.16 − 0.6 < 0: it is dead on every clean sample and
    the clean loss has no gradient for its mask. Batch statistics of a clean batch rescale the channel's
    tiny clean spread to unit variance, so it fires on clean inputs and pushes them to the target: the
    clean loss now wants its mask at 0."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(C + 1, C + 1, 1, bias=False), nn.BatchNorm1d(C + 1), nn.ReLU(),
                                      nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.classifier = nn.Linear(C + 1, C)
        bn = self.features[1]
        with torch.no_grad():
            self.features[0].weight.copy_(torch.eye(C + 1).unsqueeze(-1))
            bn.bias[C] = -1.0
            self.classifier.weight.zero_()
            self.classifier.bias.zero_()
            self.classifier.weight[:, :C] = 5 * torch.eye(C)
            self.classifier.weight[TARGET, C] = 8.0
            # running statistics of one pass over 180 clean + 20 triggered samples (cumulative average)
            bn.momentum = None
            self.train()
            self(torch.cat([planted_data(180, 10)[0], planted_data(20, 11, triggered=True)[0]]))
            bn.momentum = 0.1
        self.eval()


@pytest.fixture(scope="module")
def planted():
    model = PlantedBackdoor()
    x_test, y_test = planted_data(300, 2)
    x_bd, y_bd_true = planted_data(300, 3, triggered=True)
    keep = y_bd_true != TARGET
    data = {"x_test": x_test, "y_test": y_test, "x_test_bd": x_bd[keep],
            "y_test_bd": torch.full((int(keep.sum()),), TARGET), "y_test_bd_true": y_bd_true[keep]}
    before = attack_metrics(model, data)
    assert before["asr"] == 1.0 and before["acc"] > 0.95  # a working backdoor on an accurate model
    return model, data, before


def test_anp_prunes_a_planted_backdoor_channel_under_batch_statistics(planted):
    model, data, before = planted
    x, y = planted_data(60, 1)  # the clean budget
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    # ANP's defaults (bn_stats "batch"), fewer steps for speed
    defense = DEFENSES.get("anp")(steps=100)
    purified = defense.purify(copy.deepcopy(model), x, y, seed=0)
    after = attack_metrics(purified, data)
    mask = defense.masks[0]
    assert mask[C] < anp.threshold_grid(0.05, 0.95)[0]  # selective: the planted mask went to 0 …
    assert (mask[:C] > defense.threshold).all()  # … and no class channel's
    assert defense.pruned_per_layer == [1]
    bn = purified.features[1]
    assert bn.weight[C] == 0 and bn.bias[C] == 0  # the planted channel is pruned
    assert after["asr"] < 0.1
    assert after["acc"] >= before["acc"] - 0.03
    # nothing but the pruned γ/β changed: the running statistics are the backdoored model's
    changed = {k for k, v in purified.state_dict().items() if not torch.equal(v, sd[k])}
    assert changed == {"features.1.weight", "features.1.bias"}

    # The same run on frozen running statistics cannot see the dormant channel (no gradient for its
    # mask, exactly): nothing is pruned and the backdoor survives.
    frozen = DEFENSES.get("anp")(steps=100, bn_stats="frozen")
    still = frozen.purify(copy.deepcopy(model), x, y, seed=0)
    assert frozen.masks[0][C] == 1.0 and frozen.pruned == 0
    assert attack_metrics(still, data) == before


# --- a real backdoor ---

def run_on_backdoor(backdoored_rf, **params):
    config, data, model_path = backdoored_rf
    model, _ = stages.load_model(config, model_path, torch.device("cpu"))
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = attack_metrics(model, data)
    defense = DEFENSES.get("anp")(**params)
    logged = []
    start = time.perf_counter()
    purified = defense.purify(model, data["x_val"], data["y_val"], seed=0, log=lambda m, s: logged.append(m))
    wall = time.perf_counter() - start
    after = attack_metrics(purified, data)
    print(f"\nanp {params} on backdoored_rf ({len(data['x_val'])} clean samples, {defense.tunable_parameters} "
          f"masks, {wall:.1f}s): ACC {before['acc']:.3f} -> {after['acc']:.3f}, ASR {before['asr']:.3f} -> "
          f"{after['asr']:.3f}, RA {before['ra']:.3f} -> {after['ra']:.3f}; pruned {defense.pruned} "
          f"{defense.pruned_per_layer} at threshold {defense.threshold}; clean-budget ACC "
          f"{defense.baseline_acc:.3f} -> {defense.pruned_acc:.3f}")
    return before, after, before_sd, purified, defense, [m for m in logged if "loss" in m]


def test_anp_on_backdoored_rf_with_the_papers_defaults(backdoored_rf):
    # Observed (deterministic on CPU), with the defaults' batch statistics: the perturbation raises the
    # clean loss a lot (ANP's premise); the clean-budget rule prunes 12-26 of 160 neurons (threshold
    # 0.1-0.4, depending on how the 64-sample budget is cut into batches) and ASR falls from 0.99 to
    # 0.01-0.05. Clean-budget ACC stays within the 5 points, but test ACC drops 10-13 (0.615 -> ~0.5):
    # 64 clean samples estimate the cost loosely (printed, not asserted). With frozen running
    # statistics the masks were not selective and nothing was pruned (ASR stayed 0.99).
    before, after, before_sd, purified, defense, steps = run_on_backdoor(backdoored_rf, steps=200)
    assert before["asr"] > 0.9
    assert steps[0]["ce_perturbed"] > 2 * steps[0]["ce_clean"]
    assert steps[-1]["mask_min"] < 1
    assert defense.pruned > 0 and after["asr"] < 0.1
    assert defense.pruned_acc >= defense.baseline_acc - 0.05 - 1e-9
    after_sd = purified.state_dict()
    changed = [k for k in before_sd if not torch.equal(before_sd[k], after_sd[k])]
    assert set(changed) <= set(norm_keys(purified))


def test_anp_on_backdoored_rf_with_a_smaller_eps_and_lr(backdoored_rf):
    # Sensitivity check, reported rather than tuned for: with ε = 0.1 and mask lr 0.02 the masks barely
    # separate in 300 steps; the clean-budget rule prunes one neuron (threshold 0.25), a benign one: ASR
    # stays where it was (printed, not asserted either way). What holds: pruning happens, within the
    # clean-budget rule.
    before, after, before_sd, purified, defense, steps = run_on_backdoor(backdoored_rf, eps=0.1, lr=0.02, steps=300)
    assert defense.pruned > 0
    assert defense.pruned_acc >= defense.baseline_acc - 0.05 - 1e-9
    after_sd = purified.state_dict()
    assert {k for k in before_sd if not torch.equal(before_sd[k], after_sd[k])} <= set(norm_keys(purified))
