"""The config is checked at start-up: shape by the JSON schema, names by the registries."""

import copy
from pathlib import Path

import pytest
import yaml

from pipeline_pkg.config import ConfigError, load, validate


@pytest.fixture
def default(repo):
    return load(repo / "config" / "config.yaml")


def raw(repo):
    return yaml.safe_load((repo / "config" / "config.yaml").read_text())


def test_default_and_tiny_configs_validate_and_fill_defaults(repo, default):
    assert default["results_dir"] == "results"
    assert default["tracking"]["uri"] is None
    assert default["clean_budget"]["one_shot"] is False
    assert set(default["defenses"]) == {"none", "ft", "fip", "sor"}
    assert default["datasets"]["rf1024"]["attacks"] == ["none", "burst", "phase"]
    load(repo / "config" / "tiny.yaml")


@pytest.mark.parametrize("section, bad, valid", [
    ("dataset", lambda c: c["datasets"].update(rf9999=c["datasets"].pop("rf1024")), "rf1024"),
    ("attack", lambda c: c["datasets"]["rf1024"]["attacks"].append("badnetz"), "burst"),
    ("arch", lambda c: c["datasets"]["rf1024"]["archs"].append("resnet999"), "rf_cnn"),
    ("defense", lambda c: c["defenses"].update(fipp={}), "fip"),
])
def test_unknown_names_list_the_valid_ones(repo, section, bad, valid):
    config = raw(repo)
    bad(config)
    with pytest.raises(ConfigError) as err:
        validate(config)
    message = str(err.value)
    assert f"unknown {section}" in message and valid in message


def test_unknown_parameter_names_the_key_and_the_valid_ones(repo):
    config = raw(repo)
    config["defenses"]["fip"] = {"stepz": 10}
    with pytest.raises(ConfigError, match=r"defenses: defense 'fip' has no parameter\(s\) \['stepz'\]"):
        validate(config)


def test_bad_values_are_rejected_with_the_key(repo):
    config = raw(repo)
    config["attacks"]["burst"]["rate"] = 1.5
    with pytest.raises(ConfigError, match="rate=1.5"):
        validate(config)
    config = raw(repo)
    config["train"]["optimizer"] = "adam9"
    with pytest.raises(ConfigError, match="train: .*optimizer"):
        validate(config)


def test_schema_errors_name_the_path(repo):
    config = raw(repo)
    config["seeds"] = ["zero"]
    config["unknown_top_level"] = 1
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert "seeds.0" in str(err.value) and "unknown_top_level" in str(err.value)


def test_validation_does_not_mutate_the_input(repo):
    config = raw(repo)
    before = copy.deepcopy(config)
    validate(config)
    assert config == before


def test_per_dataset_overrides_and_their_errors(repo):
    from pipeline_pkg.config import clean_budget_settings, defenses_for, detectors_for, train_settings

    config = raw(repo)
    config["datasets"]["rf1024"].update(defenses=["none", "fip"], train={"epochs": 3},
                                        clean_budget={"fraction": 0.2})
    checked = validate(config)
    assert defenses_for(checked, "rf1024") == ["none", "fip"]
    assert defenses_for(checked, "digits") == ["none", "ft", "fip"]  # not sor: point clouds only
    assert defenses_for(checked, "shapes") == ["none", "ft", "fip", "sor"]
    assert train_settings(checked, "rf1024").epochs == 3 and train_settings(checked, "digits").epochs == 15
    # The benign reference gets only its own evaluation unless defend_benign asks for the rest.
    assert defenses_for(checked, "digits", "none") == ["none"] and detectors_for(checked, "digits", "none") == []
    assert detectors_for(checked, "digits", "badnets") == ["spectral", "strongest_feature"]
    assert defenses_for(validate({**config, "defend_benign": True}), "digits", "none") == ["none", "ft", "fip"]
    assert clean_budget_settings(checked, "rf1024")["fraction"] == 0.2
    config["datasets"]["rf1024"]["defenses"] = ["none", "anp"]
    with pytest.raises(ConfigError, match=r"datasets.rf1024.defenses: \['anp'\] are not configured"):
        validate(config)
    config = raw(repo)
    config["datasets"]["digits"]["train"] = {"optimizer": "adam9"}
    with pytest.raises(ConfigError, match="datasets.digits.train: .*optimizer"):
        validate(config)


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "config").glob("*.yaml")))
def test_shipped_configs_validate(repo, name):
    config = load(repo / "config" / name)
    assert config["datasets"] and config["defenses"]


def test_cifar10_config_is_the_full_grid(repo):
    from pipeline_pkg.registry import ATTACKS, DEFENSES, DATASETS

    config = load(repo / "config" / "cifar10.yaml")
    image_attacks = {n for n in ATTACKS.names() if "image" in ATTACKS.get(n).modalities}
    assert set(config["datasets"]["cifar10"]["attacks"]) == image_attacks
    assert set(config["defenses"]) == {n for n in DEFENSES.names() if "image" in DEFENSES.get(n).modalities}
    assert DATASETS.get("cifar10").modality == "image"


def test_a_point_cloud_filter_runs_only_on_point_clouds(repo):
    from pipeline_pkg.config import defenses_for

    raw = yaml.safe_load((repo / "config" / "tiny.yaml").read_text())
    raw["defenses"]["sor"] = {}
    raw["datasets"]["shapes"] = {"archs": ["pointnet"], "attacks": ["pointba_i"]}
    config = validate(raw)
    assert "sor" in defenses_for(config, "shapes") and "sor" not in defenses_for(config, "rf1024")
    raw["datasets"]["rf1024"]["defenses"] = ["none", "sor"]
    with pytest.raises(ConfigError, match=r"datasets.rf1024.defenses: \['sor'\] only work on \[\['pointcloud'\]\]"):
        validate(raw)


def test_modelnet40_config_is_the_full_point_cloud_grid(repo):
    from pipeline_pkg.config import defenses_for, detectors_for
    from pipeline_pkg.registry import ATTACKS, DEFENSES, DETECTORS, MODELS

    config = load(repo / "config" / "modelnet40.yaml")
    cloud_attacks = {n for n in ATTACKS.names() if "pointcloud" in ATTACKS.get(n).modalities}
    assert set(config["datasets"]["modelnet40"]["attacks"]) == cloud_attacks
    assert set(config["datasets"]["modelnet40"]["archs"]) == {
        n for n in MODELS.names() if "pointcloud" in MODELS.get(n).modalities}
    assert set(defenses_for(config, "modelnet40")) == set(DEFENSES.names())
    assert set(detectors_for(config, "modelnet40")) == set(DETECTORS.names())
    assert config["attacks"]["pcba"] == {"target": 35, "source": 8, "count": 15}  # chair → toilet


def test_per_dataset_defense_settings_override_the_defenses_section(repo):
    from pipeline_pkg import stages

    config = raw(repo)
    config["datasets"]["rf1024"]["defense_settings"] = {"fip": {"steps": 7, "lr_schedule": "cosine"}}
    checked = validate(copy.deepcopy(config))
    on_rf = stages.make_defense(checked, "rf1024", "fip")
    assert on_rf.params["steps"] == 7 and on_rf.params["lr_schedule"] == "cosine"
    on_digits = stages.make_defense(checked, "digits", "fip")
    assert on_digits.params["steps"] == 250 and on_digits.params["lr_schedule"] == "constant"
    assert stages.make_defense(checked, "rf1024", "fip", {"steps": 9}).params["steps"] == 9
    # The purify job's settings (its MLflow params and rerun trigger) carry the override; training does not.
    assert stages.job_settings(checked, "rf1024", "burst", "rf_cnn", "fip")["defense"]["steps"] == 7
    assert "defense" not in stages.job_settings(checked, "rf1024", "burst", "rf_cnn")

    for settings, message in (({"fipp": {}}, r"defense_settings: unknown defense 'fipp'; valid .*fast_fip, fip, fp"),
                              ({"fip": {"stepz": 1}}, r"datasets.rf1024.defense_settings.*stepz"),
                              ({"fip": {"lr_schedule": "linear"}}, r"lr_schedule.*\['constant', 'cosine'\]")):
        config["datasets"]["rf1024"]["defense_settings"] = settings
        with pytest.raises(ConfigError, match=message):
            validate(copy.deepcopy(config))
    # Settings of a defense the config does not run are checked, and unused.
    config["datasets"]["rf1024"]["defense_settings"] = {"anp": {"steps": 3}}
    assert stages.make_defense(validate(copy.deepcopy(config)), "rf1024", "anp").params["steps"] == 3
