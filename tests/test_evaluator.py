"""The evaluator: DER on hand-computed cases; ACC/ASR/RA from a model whose predictions are known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline_pkg.evaluator import accuracy, attack_metrics, defense_effectiveness, predict

torch.set_num_threads(1)

C = 4


class Lookup(nn.Module):
    """Predicts the class stored in the input's first element (one-hot logits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x[:, 0].long(), C).float()


def inputs(classes: list[int]) -> torch.Tensor:
    x = torch.randn(len(classes), 3, generator=torch.Generator().manual_seed(len(classes)))
    x[:, 0] = torch.tensor(classes, dtype=torch.float32)
    return x


@pytest.mark.parametrize("before, after, expected", [
    ({"acc": 0.9, "asr": 1.0}, {"acc": 0.85, "asr": 0.05}, 0.95),   # (0.95 - 0.05 + 1) / 2
    ({"acc": 0.9, "asr": 1.0}, {"acc": 0.9, "asr": 0.0}, 1.0),      # perfect defense
    ({"acc": 1.0, "asr": 0.5}, {"acc": 0.0, "asr": 0.5}, 0.0),      # worst case
    ({"acc": 0.9, "asr": 0.2}, {"acc": 0.9, "asr": 0.5}, 0.5),      # ASR rises: no credit, no penalty
    ({"acc": 0.9, "asr": 0.2}, {"acc": 0.8, "asr": 0.5}, 0.45),     # ASR rises and ACC drops
    ({"acc": 0.8, "asr": 0.9}, {"acc": 0.9, "asr": 0.1}, 0.9),      # ACC rises: no bonus
    ({"acc": 0.7, "asr": 0.9}, {"acc": 0.7, "asr": 0.9}, 0.5),      # nothing changes
])
def test_defense_effectiveness(before, after, expected):
    assert defense_effectiveness(before, after) == pytest.approx(expected, abs=1e-12)


def test_predict_batches_in_order_and_sets_eval():
    model = nn.Sequential(Lookup()).train()
    classes = [3, 1, 0, 2, 2, 1, 0]
    pred = predict(model, inputs(classes), batch_size=3)
    assert pred.tolist() == classes
    assert not model.training


def test_accuracy():
    x = inputs([0, 1, 2, 3, 1])
    assert accuracy(Lookup(), x, torch.tensor([0, 1, 2, 0, 0])) == pytest.approx(0.6)
    assert math.isnan(accuracy(Lookup(), x[:0], torch.tensor([], dtype=torch.long)))


def test_attack_metrics_exact():
    data = {
        "x_test": inputs([0, 1, 2, 3, 1]),
        "y_test": torch.tensor([0, 1, 2, 0, 0]),              # 3 of 5 correct
        "x_test_bd": inputs([2, 2, 1, 0, 2, 3]),
        "y_test_bd": torch.tensor([2, 2, 2, 2, 2, 2]),         # 3 of 6 hit the target
        "y_test_bd_true": torch.tensor([0, 1, 1, 3, 3, 3]),    # 2 of 6 keep their true class
    }
    metrics = attack_metrics(Lookup(), data)
    assert metrics["acc"] == pytest.approx(3 / 5)
    assert metrics["asr"] == pytest.approx(3 / 6)
    assert metrics["ra"] == pytest.approx(2 / 6)


def test_attack_metrics_all_to_all_targets():
    # Per-sample targets (all_to_all): ASR compares with each sample's own target.
    data = {
        "x_test": inputs([1, 2]),
        "y_test": torch.tensor([1, 2]),
        "x_test_bd": inputs([1, 2, 3, 3]),
        "y_test_bd": torch.tensor([1, 3, 3, 0]),
        "y_test_bd_true": torch.tensor([0, 2, 2, 3]),
    }
    metrics = attack_metrics(Lookup(), data)
    assert metrics == pytest.approx({"acc": 1.0, "asr": 0.5, "ra": 0.5})


# --- the evaluate stage's sharpness measurement (pipeline_pkg.sharpness) ---

REPO = Path(__file__).resolve().parents[1]
SHARPNESS = {"sharpness_samples": 24, "sharpness_defenses": ["none", "fip"], "sharpness_batch": 10,
             "trace_probes": 2, "power_iterations": 30, "power_tolerance": 1e-3}


@pytest.fixture
def run_on_disk(tmp_path):
    """A digits-shaped run: a poison file (uint8 images, 40 clean test samples), a random ResNet-9 and
    two rescaled copies of it as the `fip` and `ft` purifications; (config, folder, arrays)."""
    from pipeline_pkg import stages
    from pipeline_pkg.config import apply_schema, load_yaml
    from pipeline_pkg.h5io import write_h5, write_json

    config = apply_schema(load_yaml(REPO / "config" / "tiny.yaml"))
    config.update(results_dir=str(tmp_path), device="cpu", threads=1,
                  tracking={**config["tracking"], "enabled": False})
    config["models"] = {**config["models"], "resnet9": {"width": 4}}
    gen = torch.Generator().manual_seed(0)

    def images(n):
        return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=gen)

    def labels(n):
        return torch.randint(0, 10, (n,), generator=gen)

    arrays = {"x_train": images(4), "y_train": labels(4), "x_test": images(40), "y_test": labels(40),
              "x_test_bd": images(12), "y_test_bd": torch.zeros(12, dtype=torch.long), "y_test_bd_true": labels(12)}
    write_h5(tmp_path / "poison.h5", {k: v.numpy() for k, v in arrays.items()})
    torch.manual_seed(0)
    model = stages.build_model(config, "resnet9", [1, 16, 16], 10).eval()
    meta = stages.model_meta("resnet9", arrays, 10)
    stages.save_model(model, tmp_path / "model.pt", meta)
    for scale, defense in [(1.5, "fip"), (0.5, "ft")]:
        with torch.no_grad():
            rescaled = {k: v * scale if v.is_floating_point() and "running" not in k else v
                        for k, v in model.state_dict().items()}
        purified = stages.build_model(config, "resnet9", [1, 16, 16], 10)
        purified.load_state_dict(rescaled)
        stages.save_model(purified, tmp_path / defense / "model.pt", meta)
        write_json(tmp_path / defense / "purify.json", {"purify_seconds": 1.0, "trainable_params": 5})
    return config, tmp_path, arrays


def evaluate_method(config: dict, folder: Path, defense: str, **settings) -> dict:
    """stages.evaluate of one method as the evaluate rule calls it (`none` first: the others read its
    metrics.json for the undefended numbers)."""
    from pipeline_pkg import stages

    config = {**config, "evaluate": {**config["evaluate"], **settings}}
    none = defense == "none"
    out = folder / defense / "metrics.json"
    stages.evaluate(config, "digits", "badnets", "resnet9", 0, defense, folder / "poison.h5", folder / "model.pt",
                    folder / ("model.pt" if none else f"{defense}/model.pt"),
                    None if none else folder / defense / "purify.json", out,
                    None if none else folder / "none" / "metrics.json")
    return json.loads(out.read_text())


def test_evaluate_measures_sharpness_for_the_listed_methods_on_the_stated_samples(run_on_disk):
    from pipeline_pkg import stages
    from pipeline_pkg.sharpness import KEYS, measure, sample_indices

    assert stages.SHARPNESS_KEYS == KEYS
    config, folder, arrays = run_on_disk
    none = evaluate_method(config, folder, "none", **SHARPNESS)
    fip, ft = (evaluate_method(config, folder, d, **SHARPNESS) for d in ("fip", "ft"))
    assert none["sharpness_samples"] == 24 and none["undefended"]["sharpness_samples"] == 24
    assert none["sharpness_iterations"] >= 2 and isinstance(none["sharpness_converged"], bool)
    assert {k: none[k] for k in stages.SHARPNESS_KEYS} == {k: none["undefended"][k] for k in stages.SHARPNESS_KEYS}
    # fip measures its own model; ft, not listed, reports no sharpness of its own, only the undefended one.
    assert fip["sharpness_samples"] == 24 and fip["lambda_max"] != pytest.approx(none["lambda_max"], rel=0.01)
    assert fip["undefended"] == none["undefended"] == ft["undefended"]
    assert not set(stages.SHARPNESS_KEYS) & set(ft) and "lambda_max" in ft["undefended"]
    # The numbers are those of the stated samples: a fixed subset of the 40, the uint8 images as floats,
    # whatever the chunking (the stage chunked by 10).
    for path, reported in [(folder / "model.pt", none), (folder / "fip" / "model.pt", fip)]:
        model, _ = stages.load_model(config, path, torch.device("cpu"))
        idx = sample_indices(40, 24)
        again = measure(model, arrays["x_test"][idx], arrays["y_test"][idx], max_iterations=30, tol=1e-3,
                          probes=2, seed=0, batch_size=24)
        assert again["lambda_max"] == pytest.approx(reported["lambda_max"], rel=1e-4)
        assert again["hessian_trace"] == pytest.approx(reported["hessian_trace"], rel=1e-4)


def test_evaluate_sample_count_all_and_off(run_on_disk):
    from pipeline_pkg import stages

    config, folder, _ = run_on_disk
    every = evaluate_method(config, folder, "none", **{**SHARPNESS, "sharpness_samples": "all"})
    assert every["sharpness_samples"] == 40 == every["undefended"]["sharpness_samples"]
    listed = evaluate_method(config, folder, "fip", **{**SHARPNESS, "sharpness_samples": "all",
                                                       "sharpness_defenses": "all"})
    assert listed["sharpness_samples"] == 40
    off = evaluate_method(config, folder, "none", **{**SHARPNESS, "sharpness_samples": 0})
    assert not set(stages.SHARPNESS_KEYS) & (set(off) | set(off["undefended"]))
    # Without `none` in the list, no job measures the undefended model.
    skipped = evaluate_method(config, folder, "none", **{**SHARPNESS, "sharpness_defenses": ["fip"]})
    fip = evaluate_method(config, folder, "fip", **{**SHARPNESS, "sharpness_defenses": ["fip"]})
    assert "lambda_max" not in skipped and "lambda_max" not in fip["undefended"] and fip["sharpness_samples"] == 24
