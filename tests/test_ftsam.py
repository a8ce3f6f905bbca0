"""FT-SAM: the ascent step has radius ρ and is undone before the update."""

import copy

import pytest
import torch
from torch import nn

from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.evaluator import attack_metrics
from pipeline_pkg import stages
from pipeline_pkg.registry import DEFENSES


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    return model, x, y


@pytest.mark.parametrize("adaptive", [False, True])
def test_ascent_has_radius_rho(adaptive):
    model, x, y = tiny()
    defense = DEFENSES.get("ftsam")(rho=0.3, adaptive=adaptive)
    params = list(model.parameters())
    nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in params]
    steps = defense.ascent(params)
    for p, b, e in zip(params, before, steps):
        assert torch.allclose(p, b + e)
    if adaptive:  # ‖T⁻¹e‖ = ρ with T = |θ|
        norm = torch.sqrt(sum(((e / b.abs().clamp_min(1e-12)) ** 2).sum() for e, b in zip(steps, before)))
    else:
        norm = torch.sqrt(sum((e ** 2).sum() for e in steps))
    assert norm.item() == pytest.approx(0.3, rel=1e-4)


def test_perturbation_is_undone_before_the_update():
    model, x, y = tiny()
    start = copy.deepcopy(model.state_dict())
    # lr 0 and no weight decay: the only change could come from a perturbation left behind
    out = DEFENSES.get("ftsam")(steps=5, lr=1e-12, weight_decay=0.0, momentum=0.0).purify(model, x, y, seed=0)
    for key, value in out.state_dict().items():
        assert torch.allclose(value.float(), start[key].float(), atol=1e-9), key


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="rho"):
        DEFENSES.get("ftsam")(rho=0)
    with pytest.raises(ConfigError, match="adaptive"):
        DEFENSES.get("ftsam")(adaptive="yes")


def test_ftsam_lowers_asr_more_than_the_accuracy_it_costs(backdoored_rf):
    config, data, model_path = backdoored_rf
    model, _ = stages.load_model(config, model_path, torch.device("cpu"))
    before = attack_metrics(model, data)
    after = attack_metrics(DEFENSES.get("ftsam")(steps=100).purify(model, data["x_val"], data["y_val"], seed=0),
                           data)
    assert after["asr"] < before["asr"] - 0.05
    assert after["acc"] > 0.3
