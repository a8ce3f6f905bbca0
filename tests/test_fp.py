"""Fine-Pruning on a small backdoored RF model trained inside the test session."""

import torch

from pipeline_pkg import stages
from pipeline_pkg.defenses.fp import mean_clean_activation
from pipeline_pkg.evaluator import attack_metrics
from pipeline_pkg.registry import DEFENSES


def test_fp_prunes_dormant_units_and_lowers_asr(backdoored_rf):
    config, data, model_path = backdoored_rf
    model, _ = stages.load_model(config, model_path, torch.device("cpu"))
    before = attack_metrics(model, data)
    assert before["asr"] > 0.9
    activation = mean_clean_activation(model, data["x_val"])

    defense = DEFENSES.get("fp")(max_acc_drop=0.1, steps=50)
    purified = defense.purify(model, data["x_val"], data["y_val"], seed=0)
    after = attack_metrics(purified, data)

    # The pruned units are exactly the most dormant ones, and their classifier columns stay zero
    # through fine-tuning; the state dict is a plain one again.
    pruned = defense.pruned_units
    assert pruned > 0
    zero_columns = (purified.classifier.weight == 0).all(0).nonzero().flatten()
    assert set(zero_columns.tolist()) == set(activation.argsort()[:pruned].tolist())
    assert set(purified.state_dict()) == set(model.state_dict()) and "classifier.weight_orig" not in purified.state_dict()
    assert after["asr"] < before["asr"] - 0.1
    assert after["acc"] > 0.3  # far above chance (1/8)


def test_fp_rejects_bad_settings():
    import pytest

    from pipeline_pkg.configurable import ConfigError

    with pytest.raises(ConfigError, match="max_prune"):
        DEFENSES.get("fp")(max_prune=1.0)
