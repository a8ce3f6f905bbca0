"""pipeline_pkg.optim against torch.optim (the reference here): the same parameters after 20 steps, the
same learning-rate schedules, exact resumption through a weights_only checkpoint, and no torch._dynamo
import in a training + purification job."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from pipeline_pkg import optim
from pipeline_pkg.trainer import warmup_then_decay

CASES = {
    "sgd": (optim.SGD, torch.optim.SGD, {"lr": 0.1}),
    "sgd-momentum": (optim.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "sgd-nesterov-wd": (optim.SGD, torch.optim.SGD,
                        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-3}),
    "adam": (optim.Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 1e-2}),
    "adamw": (optim.AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
}


def tiny_problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, torch.randn(32, 5), torch.randint(0, 3, (32,))


def groups(model: nn.Module) -> list[dict]:
    # Two groups with their own lr, as the input-aware attack builds them.
    return [{"params": model[0].parameters(), "lr": 0.02}, {"params": model[2].parameters()}]


def train(model, optimizer, x, y, steps: int, schedule=None) -> None:
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-9), f"parameter {name} differs"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("grouped", [False, True])
def test_twenty_steps_match_torch_optim(case, grouped):
    ours_cls, torch_cls, options = CASES[case]
    ours, x, y = tiny_problem()
    reference = copy.deepcopy(ours)
    params = (lambda m: groups(m)) if grouped else (lambda m: m.parameters())
    train(ours, ours_cls(params(ours), **options), x, y, 20)
    train(reference, torch_cls(params(reference), **options), x, y, 20)
    assert_same_parameters(ours, reference)
    assert not torch.equal(ours[0].weight, tiny_problem()[0][0].weight), "the weights must have moved"


def schedule_pair(make_ours, make_torch) -> tuple[list[float], list[float]]:
    """lr before each of 17 steps, and after the last, from our schedule and torch's."""
    sequences = []
    for make, optimizer_cls in ((make_ours, optim.SGD), (make_torch, torch.optim.SGD)):
        optimizer = optimizer_cls([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
        schedule, lrs = make(optimizer), []
        for _ in range(17):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()  # no gradients: nothing moves, but torch wants a step before its schedule's
            schedule.step()
        sequences.append(lrs + [optimizer.param_groups[0]["lr"]])
    return sequences[0], sequences[1]


def test_warmup_then_decay_gives_torch_lambda_lr_values():
    factor = warmup_then_decay(optim.SGD([torch.zeros(1)], lr=1.0), 13).factor
    ours, reference = schedule_pair(lambda o: warmup_then_decay(o, 13),
                                    lambda o: torch.optim.lr_scheduler.LambdaLR(o, factor))
    assert ours == reference
    assert ours[3] == 0.1 and ours[13] == 0.0  # peak after warm-up, zero at the end


def test_cosine_annealing_gives_torch_values():
    # 17 steps with T_max 7 also cover torch's restart past T_max (the closed form is periodic too).
    ours, reference = schedule_pair(lambda o: optim.CosineAnnealingLR(o, 7),
                                    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 7))
    assert ours == pytest.approx(reference, rel=1e-12, abs=1e-15)
    assert ours[0] == 0.1 and ours[7] == 0.0


def weights_only_copy(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("case", ["sgd-nesterov-wd", "adamw"])
def test_resumed_optimizer_and_schedule_continue_identically(case):
    ours_cls, _, options = CASES[case]
    model, x, y = tiny_problem()
    optimizer = ours_cls(groups(model), **options)
    schedule = warmup_then_decay(optimizer, 12)
    train(model, optimizer, x, y, 5, schedule)
    saved = weights_only_copy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "schedule": schedule.state_dict()})

    resumed, _, _ = tiny_problem(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = ours_cls(groups(resumed), **options)
    resumed_schedule = warmup_then_decay(resumed_optimizer, 12)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_schedule.load_state_dict(saved["schedule"])

    train(model, optimizer, x, y, 7, schedule)
    train(resumed, resumed_optimizer, x, y, 7, resumed_schedule)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_a_torch_optim_checkpoint_resumes_into_ours():
    # Checkpoints written before this module existed hold torch.optim.AdamW's state dict.
    model, x, y = tiny_problem()
    reference = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    train(model, reference, x, y, 3)
    saved = weights_only_copy(reference.state_dict())
    resumed = copy.deepcopy(model)
    ours = optim.AdamW(resumed.parameters(), lr=0.5)
    ours.load_state_dict(saved)
    train(model, reference, x, y, 4)
    train(resumed, ours, x, y, 4)
    assert_same_parameters(resumed, model)


def test_load_state_dict_names_a_mismatched_model():
    model, _, _ = tiny_problem()
    saved = optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="parameter group 0 was saved with 4 parameters.*has 2"):
        optim.SGD(model[0].parameters(), lr=0.1).load_state_dict(saved)


def test_training_and_purifying_never_import_torch_dynamo():
    script = textwrap.dedent("""
        import sys
        import torch
        from pipeline_pkg.models.rf_cnn import RFCNNSpec
        from pipeline_pkg.registry import DEFENSES
        from pipeline_pkg.trainer import TrainSettings, fit

        torch.manual_seed(0)
        model = RFCNNSpec(width=4, hidden=8).build([2, 64], 3)
        x, y = torch.randn(48, 2, 64), torch.arange(48) % 3
        fit(model, x, y, TrainSettings(epochs=1, batch_size=16), seed=0)
        DEFENSES.get("ft")(steps=2, batch_size=8).purify(model, x[:16], y[:16], seed=0)
        assert "torch._dynamo" not in sys.modules, "something imported torch._dynamo"
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
