"""rnp (Reconstructive Neuron Pruning): unlearning stops at the accuracy floor on a copy and never touches
the original; only the pruned channels' γ/β change and those channels output exactly zero; recovery masks
stay in [0, 1]; the clean-budget threshold search; deterministic on CPU; bad hyper-parameters rejected by
name; a plain state dict; and what it does to a small backdoored RF model."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeline_pkg.defenses.rnp as rnp
from pipeline_pkg import stages
from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.defenses.nft import masked_layers
from pipeline_pkg.evaluator import accuracy, attack_metrics
from pipeline_pkg.models.base import Classifier
from pipeline_pkg.registry import DEFENSES
from pipeline_pkg.trainer import TrainingDiverged

torch.set_num_threads(1)

L = 64
C = 3


class Tiny(Classifier):
    """BatchNorm, GroupNorm and LayerNorm: channel masks on three kinds of norm layer."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 6, 5, padding=2), nn.BatchNorm1d(6), nn.ReLU(),
            nn.Conv1d(6, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(),
        )
        self.classifier = nn.Linear(8, C)


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes told apart by a constant offset on one of the two I/Q channels."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    offsets = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    return torch.randn(n, 2, L, generator=gen) + offsets[y][:, :, None], y


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A tiny model that classifies the synthetic data perfectly (so there is accuracy to unlearn)."""
    torch.manual_seed(0)
    model = Tiny()
    x, y = synthetic(96, 0)
    optimizer = torch.optim.Adam(model.parameters(), 0.01)
    model.train()
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def clean() -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic(48, 1)


def make(**params) -> rnp.ReconstructiveNeuronPruning:
    return DEFENSES.get("rnp")(**{"batch_size": 16, "unlearn_floor": 0.5, "unlearn_steps": 100,
                                  "recover_steps": 60, **params})


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_registered_with_defaults():
    assert DEFENSES.get("rnp") is rnp.ReconstructiveNeuronPruning
    d = DEFENSES.get("rnp")()
    assert (d.unlearn_steps, d.unlearn_floor, d.unlearn_lr, d.unlearn_momentum, d.unlearn_weight_decay) == \
        (50, 0.2, 0.01, 0.9, 5e-4)
    assert (d.recover_steps, d.recover_lr, d.recover_momentum, d.threshold, d.max_acc_drop) == \
        (200, 0.2, 0.9, 0.2, None)
    assert d.bn_stats == "frozen"


def test_unlearning_stops_at_the_floor_and_never_touches_the_original(trained, clean):
    x, y = clean
    assert accuracy(trained, x, y) == 1.0
    model = copy.deepcopy(trained)
    before = snapshot(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    d = make(log_every=1)
    logged = []
    unlearned = d.unlearn(model, x, y, seed=0, log=lambda m, s: logged.append(m["unlearn_acc"]))

    # Stopped at the first step whose clean-budget accuracy is at or below the floor, before the budget
    # of steps ran out; every earlier step was still above it.
    assert 0 < d.unlearn_steps_run < 100
    assert len(logged) == d.unlearn_steps_run
    assert logged[-1] == d.unlearned_acc == accuracy(unlearned, x, y) <= 0.5
    assert all(acc > 0.5 for acc in logged[:-1])
    assert unlearned is not model
    # The original model: same values, same requires_grad flags, still in eval mode.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not model.training
    assert accuracy(model, x, y) == 1.0
    # The copy's weights did move (gradient ascent), all of them, not only the norm layers.
    moved = [k for k, v in unlearned.state_dict().items() if not torch.equal(v, before[k])]
    assert "features.0.weight" in moved and "classifier.weight" in moved

    # With too few steps to reach the floor, unlearning runs them all and stops above the floor.
    short = make(unlearn_steps=5)
    short.unlearn(model, x, y, seed=0, log=lambda m, s: None)
    assert short.unlearn_steps_run == 5 and short.unlearned_acc > 0.5


def test_only_pruned_channels_change_and_output_exactly_zero(trained, clean):
    x, y = clean
    model = copy.deepcopy(trained)
    before = snapshot(model)
    d = make(threshold=0.5)
    out = d.purify(model, x, y, seed=0)
    assert out is model
    assert d.threshold == 0.5 and d.pruned > 0

    layers = masked_layers(out)
    names = rnp.layer_names(out, layers)
    assert names == list(d.masks) == list(d.pruned_channels)
    assert d.tunable_parameters == sum(m.numel() for m in d.masks.values()) == sum(l.weight.numel() for l in layers)
    assert d.pruned == sum(len(v) for v in d.pruned_channels.values())
    norm_keys = set()
    for name, layer in zip(names, layers):
        mask = d.masks[name]
        # masks in [0, 1], and the pruned channels are exactly those below the threshold
        assert ((mask >= 0) & (mask <= 1)).all()
        pruned = d.pruned_channels[name]
        assert pruned == (mask.flatten() < 0.5).nonzero().flatten().tolist()
        for leaf in ("weight", "bias"):
            key = f"{name}.{leaf}"
            norm_keys.add(key)
            new, old = out.state_dict()[key].flatten(), before[key].flatten()
            changed = (new != old).nonzero().flatten().tolist()
            assert set(changed) <= set(pruned), key  # nothing outside the pruned channels moved
            assert (new[pruned] == 0).all(), key  # and every pruned channel is zeroed
    # Every other tensor (conv/linear weights, running statistics) is untouched.
    for k, v in before.items():
        if k not in norm_keys:
            assert torch.equal(out.state_dict()[k], v), k

    # Forward hooks: the pruned channels come out of their norm layer as exact zeros.
    outputs = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o.detach()))
             for n, layer in zip(names, layers)]
    try:
        with torch.no_grad():
            out(x)
    finally:
        for h in hooks:
            h.remove()
    checked = 0
    for name, layer in zip(names, layers):
        pruned = d.pruned_channels[name]
        o = outputs[name]
        if isinstance(layer, nn.LayerNorm):  # mask over the normalised (trailing) shape
            o = o.reshape(-1, layer.weight.numel())[:, pruned]
        else:  # BatchNorm / GroupNorm: channel dimension 1
            o = o[:, pruned]
        assert (o == 0).all(), name
        checked += len(pruned)
    assert checked == d.pruned
    # all three kinds of norm layer had channels pruned, so each kind was checked
    assert {type(layer) for layer, n in zip(layers, names) if d.pruned_channels[n]} == \
        {nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm}


def test_masks_stay_in_unit_interval_under_a_large_learning_rate(trained, clean):
    d = make(recover_lr=20.0, recover_steps=20, threshold=0.0)
    out = d.purify(copy.deepcopy(trained), *clean, seed=0)
    masks = torch.cat([m.flatten() for m in d.masks.values()])
    assert ((masks >= 0) & (masks <= 1)).all()
    assert (masks == 0).any() and (masks == 1).any()  # the clip was really exercised at both ends
    assert d.pruned == 0  # threshold 0 prunes nothing
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in out.state_dict().items())


def test_recovery_lowers_the_clean_loss_of_the_unlearned_copy(trained, clean):
    x, y = clean
    d = make()
    d.purify(copy.deepcopy(trained), x, y, seed=0)
    assert d.recovered_acc > d.unlearned_acc


def test_max_acc_drop_picks_the_largest_threshold_within_the_drop_on_the_budget(trained, clean):
    x, y = clean
    baseline = accuracy(trained, x, y)
    d = make(max_acc_drop=0.4, threshold_step=0.1)
    out = d.purify(copy.deepcopy(trained), x, y, seed=0)
    scan = d.threshold_scan
    assert list(scan) == pytest.approx([0.1 * k for k in range(1, 11)])
    allowed = [t for t, acc in scan.items() if baseline - acc <= 0.4]
    assert d.threshold == (max(allowed) if allowed else 0.0)
    assert baseline - accuracy(out, x, y) <= 0.4
    if d.threshold > 0:
        assert accuracy(out, x, y) == scan[d.threshold]
    # A drop of 0 still leaves a valid model (possibly nothing pruned).
    strict = make(max_acc_drop=0.0)
    assert accuracy(strict.purify(copy.deepcopy(trained), x, y, seed=0), x, y) >= baseline


def test_plain_state_dict(trained, clean):
    model = copy.deepcopy(trained)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    out = make(threshold=0.5).purify(model, *clean, seed=0)
    assert list(out.state_dict()) == list(trained.state_dict())  # same keys, same order
    assert [n for n, _ in out.named_parameters()] == [n for n, _ in trained.named_parameters()]
    assert not any("parametriz" in k or "mask" in k for k in out.state_dict())
    assert all(type(m) is type(o) for m, o in zip(out.modules(), trained.modules()))
    assert all(type(p) is nn.Parameter for p in out.parameters())
    assert {n: p.requires_grad for n, p in out.named_parameters()} == grads
    assert not out.training and not any(m.training for m in out.modules())
    fresh = copy.deepcopy(trained)
    fresh.load_state_dict(out.state_dict())
    x = clean[0][:5]
    assert torch.equal(fresh(x), out(x))


def test_deterministic_on_cpu(trained, clean):
    def run(seed):
        d = make(threshold=0.5)
        state = d.purify(copy.deepcopy(trained), *clean, seed=seed).state_dict()
        return d, state

    d1, a = run(3)
    d2, b = run(3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(d1.masks[n], d2.masks[n]) for n in d1.masks)
    assert d1.unlearn_steps_run == d2.unlearn_steps_run and d1.pruned_channels == d2.pruned_channels
    d3, _ = run(4)
    assert any(not torch.equal(d1.masks[n], d3.masks[n]) for n in d1.masks)


def test_bad_inputs_are_rejected(trained, clean):
    with pytest.raises(ValueError, match="normalisation"):
        make().purify(nn.Sequential(nn.Flatten(), nn.Linear(2 * L, C)), *clean, seed=0)
    with pytest.raises(ValueError, match="empty"):
        make().purify(copy.deepcopy(trained), clean[0][:0], clean[1][:0], seed=0)
    # Gradient ascent below chance level explodes; the original model is left as it was.
    model = copy.deepcopy(trained)
    with pytest.raises(TrainingDiverged):
        make(unlearn_floor=0.0, unlearn_steps=2000, unlearn_lr=1.0).purify(model, *clean, seed=0)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("params, key", [
    ({"unlearn_steps": 0}, "unlearn_steps"),
    ({"unlearn_steps": 2.5}, "unlearn_steps"),
    ({"recover_steps": -1}, "recover_steps"),
    ({"recover_steps": "200"}, "recover_steps"),
    ({"batch_size": 0}, "batch_size"),
    ({"unlearn_floor": 1.5}, "unlearn_floor"),
    ({"unlearn_floor": -0.1}, "unlearn_floor"),
    ({"unlearn_lr": 0.0}, "unlearn_lr"),
    ({"unlearn_lr": float("nan")}, "unlearn_lr"),
    ({"recover_lr": -0.2}, "recover_lr"),
    ({"unlearn_momentum": 1.0}, "unlearn_momentum"),
    ({"recover_momentum": -0.1}, "recover_momentum"),
    ({"unlearn_weight_decay": -1e-4}, "unlearn_weight_decay"),
    ({"threshold": 1.2}, "threshold"),
    ({"threshold": -0.1}, "threshold"),
    ({"threshold_step": 0.0}, "threshold_step"),
    ({"max_acc_drop": -0.05}, "max_acc_drop"),
    ({"max_acc_drop": "0.1"}, "max_acc_drop"),
    ({"bn_stats": "train"}, "bn_stats"),
])
def test_bad_hyper_parameters(params, key):
    with pytest.raises(ConfigError, match=rf"parameter {key}="):
        DEFENSES.get("rnp")(**params)


def test_unknown_hyper_parameter_named():
    with pytest.raises(ConfigError) as info:
        DEFENSES.get("rnp")(floor=0.2)
    message = str(info.value)
    assert "floor" in message and "unlearn_floor" in message


def test_rnp_on_backdoored_rf(backdoored_rf):
    """What RNP does to the small RF burst backdoor (its trigger path is dormant on clean data).

    Observed (deterministic on CPU): the premise of RNP holds — unlearning the clean budget wipes out
    clean accuracy while the backdoor survives in the copy — but the recovery does not separate backdoor
    channels from clean ones: with the default threshold 0.2 the pruned set contains first-layer channels
    clean accuracy depends on, so ASR falls only because the model collapses to near chance. With
    `max_acc_drop` the clean budget rejects every threshold and nothing is pruned, leaving ASR unchanged.
    So ASR does NOT genuinely go down here; the test asserts what holds and prints the numbers."""
    config, data, model_path = backdoored_rf
    x, y = data["x_val"], data["y_val"]
    model, _ = stages.load_model(config, model_path, torch.device("cpu"))
    before = attack_metrics(model, data)
    assert before["asr"] > 0.9

    # Premise: the unlearned copy keeps the backdoor while losing clean accuracy.
    probe = DEFENSES.get("rnp")()
    unlearned = probe.unlearn(model, x, y, seed=0, log=lambda m, s: None)
    premise = attack_metrics(unlearned, data)
    assert probe.unlearned_acc <= 0.2
    assert premise["acc"] < 0.3 and premise["asr"] > 0.8

    results = {}
    for label, params in (("threshold 0.2", {}), ("max_acc_drop 0.1", {"max_acc_drop": 0.1})):
        m, _ = stages.load_model(config, model_path, torch.device("cpu"))
        d = DEFENSES.get("rnp")(**params)
        start = time.perf_counter()
        out = d.purify(m, x, y, seed=0)
        wall = time.perf_counter() - start
        after = attack_metrics(out, data)
        results[label] = (d, out, after)
        print(f"\nrnp {label} on backdoored_rf ({len(x)} clean samples; {d.unlearn_steps_run} unlearn steps "
              f"→ budget acc {d.unlearned_acc:.3f}, recovered {d.recovered_acc:.3f}; {d.tunable_parameters} masks; "
              f"threshold {d.threshold:.2f}, pruned {d.pruned}; {wall:.2f}s): "
              f"ACC {before['acc']:.3f} -> {after['acc']:.3f}, ASR {before['asr']:.3f} -> {after['asr']:.3f}, "
              f"RA {before['ra']:.3f} -> {after['ra']:.3f}")
        assert set(out.state_dict()) == set(model.state_dict())
        assert d.recovered_acc > d.unlearned_acc  # the masks did recover some clean accuracy

    d, _, after = results["threshold 0.2"]
    assert d.pruned > 0
    # ASR drops, but only with a collapse of clean accuracy to near chance (1/8): not a purification.
    assert after["asr"] < before["asr"] and after["acc"] < 0.3

    d, out, after = results["max_acc_drop 0.1"]
    # The clean-budget guard holds by construction; here it forbids every threshold.
    assert accuracy(model, x, y) - accuracy(out, x, y) <= 0.1
    assert d.threshold == 0.0 and d.pruned == 0
    assert after == pytest.approx(before)
