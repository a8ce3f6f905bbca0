"""The trainer: bit-reproducible on CPU, resumes exactly from its per-epoch checkpoint (only for the same
resume key), fails clearly on NaN, and actually learns."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.evaluator import accuracy
from pipeline_pkg.h5io import load_checkpoint
from pipeline_pkg.models.rf_cnn import RFCNNSpec
from pipeline_pkg.runtime import seed_everything
from pipeline_pkg.trainer import TrainingDiverged, TrainSettings, fit, settings_hash

torch.set_num_threads(1)

L = 256
C = 4


@pytest.fixture(autouse=True)
def _restore_determinism_flag():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def make_data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes told apart by a constant I/Q offset on a circle, in noise: separable."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    angle = 2 * math.pi * y.double() / C
    x = 0.5 * torch.randn(n, 2, L, generator=gen)
    x[:, 0] += torch.cos(angle).float()[:, None]
    x[:, 1] += torch.sin(angle).float()[:, None]
    return x, y


def new_model(seed: int = 0):
    seed_everything(seed)
    return RFCNNSpec(width=8, hidden=16).build([2, L], C)


def settings(**kw) -> TrainSettings:
    return TrainSettings(**{"epochs": 3, "batch_size": 32, "lr": 0.01, **kw})


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


class Interrupt(Exception):
    pass


def test_fit_is_deterministic():
    x, y = make_data()
    init = new_model()
    a = fit(copy.deepcopy(init), x, y, settings(), seed=3)
    b = fit(copy.deepcopy(init), x, y, settings(), seed=3)
    assert not a.training and not b.training, "fit returns the model in eval mode"
    assert_same_state(a.state_dict(), b.state_dict())
    # and it trained: the weights moved away from the initial ones
    assert not torch.equal(a.classifier.weight, init.classifier.weight)
    # a different seed changes the batch order and so the result
    c = fit(copy.deepcopy(init), x, y, settings(), seed=4)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    x, y = make_data()
    init = new_model()
    reference = fit(copy.deepcopy(init), x, y, settings(), seed=1).state_dict()

    ckpt = tmp_path / "run" / "checkpoint.pt"

    def stop_after_first(epoch, metrics):
        if epoch == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(copy.deepcopy(init), x, y, settings(), seed=1, checkpoint=ckpt, resume_key="k",
            on_epoch=stop_after_first)
    assert ckpt.exists()
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 0 and state["resume_key"] == "k"

    # A fresh model with different initial weights: everything must come from the checkpoint.
    fresh = new_model(seed=99)
    assert not torch.equal(fresh.classifier.weight, init.classifier.weight)
    calls = []
    fit(fresh, x, y, settings(), seed=1, checkpoint=ckpt, resume_key="k",
        on_epoch=lambda e, m: calls.append(e))
    assert calls == [1, 2]
    assert_same_state(fresh.state_dict(), reference)
    assert load_checkpoint(ckpt)["epoch"] == 2

    # A finished checkpoint: nothing left to train, the weights are the final ones.
    again, calls = new_model(seed=7), []
    fit(again, x, y, settings(), seed=1, checkpoint=ckpt, resume_key="k", on_epoch=lambda e, m: calls.append(e))
    assert calls == []
    assert_same_state(again.state_dict(), reference)


def test_checkpoint_with_other_resume_key_is_ignored(tmp_path):
    x, y = make_data()
    init = new_model()
    reference = fit(copy.deepcopy(init), x, y, settings(), seed=1).state_dict()
    ckpt = tmp_path / "checkpoint.pt"

    def stop_after_first(epoch, metrics):
        if epoch == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(copy.deepcopy(init), x, y, settings(), seed=1, checkpoint=ckpt, resume_key=settings_hash({"a": 1}),
            on_epoch=stop_after_first)
    calls = []
    model = copy.deepcopy(init)
    fit(model, x, y, settings(), seed=1, checkpoint=ckpt, resume_key=settings_hash({"a": 2}),
        on_epoch=lambda e, m: calls.append(e))
    assert calls == [0, 1, 2]
    assert_same_state(model.state_dict(), reference)


def test_on_epoch_metrics():
    x, y = make_data(n=64)
    seen = []
    fit(new_model(), x, y, settings(epochs=3), seed=0, on_epoch=lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [0, 1, 2]
    for _, m in seen:
        assert {"train_loss", "train_acc", "epoch_seconds"} <= set(m)
        assert 0.0 <= m["train_acc"] <= 1.0 and math.isfinite(m["train_loss"])


@pytest.mark.parametrize("n, epochs", [(64, 2), (32, 4)])
def test_fit_with_four_optimizer_steps(n, epochs):
    # Regression: torch's OneCycleLR divided by zero at exactly 4 steps.
    x, y = make_data(n=n)
    model = fit(new_model(), x, y, settings(epochs=epochs), seed=0)  # 4 steps in all
    assert not model.training


def test_fit_with_few_steps_other_than_four():
    x, y = make_data(n=32)
    for epochs in (1, 2, 3, 5):
        fit(new_model(), x, y, settings(epochs=epochs), seed=0)


def test_nan_input_raises_training_diverged():
    x, y = make_data(n=64)
    x[5, 0, 10] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"epoch 1\b"):
        fit(new_model(), x, y, settings(), seed=0)


def test_model_learns_separable_data():
    x, y = make_data(n=256)
    model = new_model()
    assert accuracy(model, x, y) < 0.6, "untrained model should be near chance"
    model = fit(model, x, y, settings(), seed=0)
    assert accuracy(model, x, y) >= 0.9
    x_test, y_test = make_data(n=128, seed=1)
    assert accuracy(model, x_test, y_test) >= 0.9


@pytest.mark.parametrize("params, key", [({"epochs": 0}, "epochs"), ({"lr": 0}, "lr"),
                                         ({"optimizer": "adam"}, "optimizer"),
                                         ({"label_smoothing": 1.0}, "label_smoothing")])
def test_bad_train_settings(params, key):
    with pytest.raises(ConfigError, match=rf"parameter {key}="):
        TrainSettings(**params)


def test_a_lone_trailing_sample_is_skipped_in_training_but_not_elsewhere():
    from pipeline_pkg.runtime import minibatches

    x, y = torch.arange(9.0)[:, None], torch.arange(9)
    assert [len(b) for b, _ in minibatches(x, y, 4, training=True)] == [4, 4]
    assert [len(b) for b, _ in minibatches(x, y, 4)] == [4, 4, 1]
    assert [len(b) for b, _ in minibatches(x[:1], y[:1], 4, training=True)] == [1]


def test_guarded_step_clips_the_gradient_norm_when_asked():
    from pipeline_pkg.trainer import guarded_step

    for max_norm, expected in [(5.0, [-3.0, -4.0, 0.0]), (None, [-30.0, -40.0, 0.0])]:
        weight = torch.nn.Parameter(torch.zeros(3))
        optimizer = torch.optim.SGD([weight], lr=1.0)
        guarded_step(optimizer, (weight * torch.tensor([30.0, 40.0, 0.0])).sum(), "test", max_grad_norm=max_norm)
        assert torch.allclose(weight.detach(), torch.tensor(expected))


def test_precision_decides_the_cpu_autocast():
    from pipeline_pkg.runtime import autocast, cpu_has_bf16, set_precision

    cpu = torch.device("cpu")
    try:
        set_precision("auto")  # fp32 on CPU: bit-reproducible
        with autocast(cpu):
            assert not torch.is_autocast_enabled("cpu")
        set_precision("bf16")
        with autocast(cpu):
            assert torch.is_autocast_enabled("cpu") == cpu_has_bf16()
            if cpu_has_bf16():
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        set_precision("fp32")
        with autocast(cpu):
            assert not torch.is_autocast_enabled("cpu")
        with pytest.raises(ValueError, match="precision is 'half'; use one of auto, bf16, fp32"):
            set_precision("half")
    finally:
        set_precision("auto")
