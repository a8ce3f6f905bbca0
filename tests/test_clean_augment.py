"""Augmenting the defenses' clean budget: the RF augmentations, their wiring into every defense's batches,
and the `clean_budget.augment` config key."""

import copy

import pytest
import torch
import yaml

from pipeline_pkg import stages
from pipeline_pkg.augment import (MODALITY_AUGMENTATIONS, augmenter, random_cfo, random_conjugate, random_noise,
                                  random_roll, random_rotate)
from pipeline_pkg.config import ConfigError, validate
from pipeline_pkg.registry import DEFENSES
from pipeline_pkg.runtime import InfiniteBatches
from tiny import clean_budget, tiny_rf_cnn

L, C = 64, 4


def frames(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 2, L, generator=torch.Generator().manual_seed(3))


def test_rotate_turns_each_frame_by_its_own_angle_and_keeps_every_sample_s_power():
    x = frames()
    out = random_rotate(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close((out ** 2).sum(1), (x ** 2).sum(1))
    # The angle between input and output is the same at every sample of a frame, and differs by frame.
    angle = torch.atan2(out[:, 1], out[:, 0]) - torch.atan2(x[:, 1], x[:, 0])
    turn = torch.remainder(angle, 2 * torch.pi)
    spread = torch.minimum(turn - turn[:, :1], 2 * torch.pi - (turn - turn[:, :1])).abs()
    assert spread.max() < 1e-4
    assert len(set(turn[:, 0].round(decimals=3).tolist())) == len(x)


def test_roll_is_a_circular_shift_of_each_frame_and_seeded():
    x = frames()
    out = random_roll(x, torch.Generator().manual_seed(0))
    shifts = []
    for original, rolled in zip(x, out):
        matches = [k for k in range(L) if torch.equal(torch.roll(original, -k, dims=-1), rolled)]
        assert len(matches) == 1
        shifts.append(matches[0])
    assert len(set(shifts)) > 4
    assert torch.equal(out, random_roll(x, torch.Generator().manual_seed(0)))


def test_conjugate_negates_q_of_about_half_the_frames_and_leaves_the_rest():
    x = frames(64)
    out = random_conjugate(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, 0], x[:, 0])
    mirrored = (out[:, 1] == -x[:, 1]).all(1)
    kept = (out[:, 1] == x[:, 1]).all(1)
    assert bool((mirrored | kept).all()) and 20 < int(mirrored.sum()) < 44


def test_cfo_turns_each_frame_at_its_own_constant_rate_within_the_bound():
    x = frames()
    out = random_cfo(x, torch.Generator().manual_seed(0), max_cfo=0.002)
    torch.testing.assert_close((out ** 2).sum(1), (x ** 2).sum(1))
    # out = x·e^{j2πfn}: the phase added at sample n is 2πfn, a line through 0 of slope 2πf per frame.
    z_in, z_out = torch.complex(x[:, 0], x[:, 1]), torch.complex(out[:, 0], out[:, 1])
    added = torch.angle(z_out * z_in.conj())
    n = torch.arange(L, dtype=torch.float32)
    rate = added[:, 1:2] / (2 * torch.pi)  # cycles per sample, from the first step
    torch.testing.assert_close(added, 2 * torch.pi * rate * n, atol=1e-4, rtol=0)
    assert rate.abs().max() <= 0.002 + 1e-6 and len(set(rate.flatten().round(decimals=6).tolist())) == len(x)


def test_noise_lowers_the_snr_by_a_bounded_seeded_amount_and_keeps_unit_power():
    # Unit power and no noise; long frames, so that the added noise's estimated variance is exact to ~0.005.
    gen = torch.Generator().manual_seed(1)
    clean = torch.complex(torch.randn(256, 4096, generator=gen), torch.randn(256, 4096, generator=gen)) / 2 ** 0.5
    x = torch.stack([clean.real, clean.imag], 1)
    out = random_noise(x, torch.Generator().manual_seed(0), max_variance=0.1)
    assert torch.equal(out, random_noise(x, torch.Generator().manual_seed(0), max_variance=0.1))
    assert abs(float((out ** 2).sum(1).mean()) - 1.0) < 0.02
    # out = (x + noise)/sqrt(1 + v): what is left after taking out the part along x has power v/(1 + v).
    along = (x * out).sum((1, 2), keepdim=True) / (x * x).sum((1, 2), keepdim=True)
    leftover = ((out - along * x) ** 2).sum(1).mean(1)
    variance = leftover / (1 - leftover)
    assert float(variance.min()) > -0.01 and float(variance.max()) < 0.11
    assert float(variance.min()) < 0.01 and float(variance.max()) > 0.09


def test_infinite_batches_apply_the_augmentation_to_every_batch():
    x, y = clean_budget(L, C, n=10)
    plain = InfiniteBatches(x, y, 4, seed=0)
    shifted = InfiniteBatches(x, y, 4, seed=0, augment=lambda batch: batch + 1.0)
    for _ in range(7):  # across epoch boundaries
        (xa, ya), (xb, yb) = next(plain), next(shifted)
        assert torch.equal(ya, yb) and torch.equal(xb, xa + 1.0)


@pytest.mark.parametrize("budget, batch_size, size", [(70, 128, 35), (20, 128, 10), (80, 128, 40),
                                                      (128, 128, 64), (7, 128, 3), (300, 128, 128)])
def test_no_clean_budget_batch_is_the_whole_budget(budget, batch_size, size):
    """A budget no larger than the batch is drawn in halves from a fresh shuffle each epoch, so no step
    sees the whole budget and consecutive batches differ; a larger budget keeps `batch_size`."""
    x = torch.arange(budget, dtype=torch.float32)[:, None]
    y = torch.zeros(budget, dtype=torch.long)
    batches = InfiniteBatches(x, y, batch_size, seed=0)
    drawn = [set(next(batches)[0].flatten().tolist()) for _ in range(12)]
    assert len(drawn[0]) == size and all(1 < len(b) <= size for b in drawn)
    assert all(len(b) < budget for b in drawn)
    assert all(a != b for a, b in zip(drawn, drawn[1:]))
    epoch = budget // size  # the first epoch's full batches: each sample at most once
    assert len(set().union(*drawn[:epoch])) == epoch * size


@pytest.mark.parametrize("dataset, expected", [
    ("digits", ["crop"]), ("shapes", ["scale", "shift", "jitter"]),
    ("rf1024", ["rotate", "roll", "conjugate", "cfo", "noise"])])
def test_defenses_augment_with_the_dataset_s_training_augmentations_by_default(config, dataset, expected):
    """Unset, clean_budget.augment is the dataset's own training augmentations (RF1024 trains without any:
    all five I/Q ones); an empty list turns augmentation off."""
    for entry in config["datasets"].values():
        entry.pop("clean_budget", None)
    config.pop("clean_budget", None)
    checked = validate(copy.deepcopy(config))
    assert stages.make_defense(checked, dataset, "ft").clean_augment == expected
    assert stages.job_settings(checked, dataset, "none", config["datasets"][dataset]["archs"][0],
                               "ft")["clean_budget"]["augment"] == expected
    config["datasets"][dataset]["clean_budget"] = {"augment": []}
    assert stages.make_defense(validate(config), dataset, "ft").clean_augment == []


def test_every_step_based_defense_trains_on_augmented_batches(monkeypatch):
    """Each defense draws its clean batches from Defense.batches, so `clean_augment` reaches all of them."""
    seen = []
    original = InfiniteBatches.__next__

    def spy(self):
        batch = original(self)
        seen.append(self.augment is not None)
        return batch

    monkeypatch.setattr(InfiniteBatches, "__next__", spy)
    x, y = clean_budget(L, C)
    for name in ("ft", "fip", "fast_fip", "ngf", "nft", "anp", "fp", "ftsam", "ibau", "nad", "rnp"):
        seen.clear()
        method = DEFENSES.get(name)(steps=2) if "steps" in DEFENSES.get(name).defaults else DEFENSES.get(name)()
        method.clean_augment = ["roll"]
        method.purify(tiny_rf_cnn(L, C), x, y, seed=0)
        assert seen and all(seen), name


def test_a_defense_with_clean_augment_is_deterministic_and_differs_from_one_without():
    x, y = clean_budget(L, C)

    def tuned(augment):
        method = DEFENSES.get("ft")(steps=5, lr=0.05)
        method.clean_augment = augment
        return torch.cat([p.flatten() for p in method.purify(tiny_rf_cnn(L, C), x, y, seed=0).parameters()])

    with_aug = tuned(["rotate", "roll", "conjugate"])
    assert torch.equal(with_aug, tuned(["rotate", "roll", "conjugate"]))
    assert not torch.equal(with_aug, tuned([]))


def test_augmenter_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="unknown augmentation"):
        augmenter(["spin"], torch.device("cpu"), seed=0)


@pytest.fixture
def config(repo):
    return yaml.safe_load((repo / "config" / "config.yaml").read_text())


def test_config_accepts_the_modality_s_augmentations_and_names_the_valid_ones_otherwise(config):
    config["datasets"]["rf1024"]["clean_budget"] = {"augment": ["rotate", "roll", "conjugate"]}
    checked = validate(copy.deepcopy(config))
    assert stages.make_defense(checked, "rf1024", "fip").clean_augment == ["rotate", "roll", "conjugate"]
    assert stages.make_defense(checked, "digits", "fip").clean_augment == ["crop"]  # digits' training set
    config["datasets"]["rf1024"]["clean_budget"] = {"augment": ["crop"]}
    with pytest.raises(ConfigError, match=r"datasets.rf1024.clean_budget.augment: \['crop'\] .*'rf'.*"
                                          r"\['rotate', 'roll', 'conjugate', 'cfo', 'noise'\]"):
        validate(config)
    assert MODALITY_AUGMENTATIONS["image"] == ("crop", "flip")


def test_clean_augment_changes_the_purify_settings_only(config):
    """Only the purify jobs depend on the augmentation: poisoning and training are not redone for it."""
    plain = validate(copy.deepcopy(config))
    config["datasets"]["rf1024"]["clean_budget"] = {"augment": ["roll"]}
    augmented = validate(config)
    for args in (("rf1024", "burst"), ("rf1024", "burst", "rf_cnn")):
        assert stages.job_settings(plain, *args) == stages.job_settings(augmented, *args)
    purify = ("rf1024", "burst", "rf_cnn", "fip")
    assert stages.job_settings(augmented, *purify)["clean_budget"]["augment"] == ["roll"]
    assert stages.job_settings(plain, *purify) != stages.job_settings(augmented, *purify)
    overridden = stages.make_defense(augmented, "rf1024", "fip", {"steps": 7})
    assert overridden.params["steps"] == 7 and overridden.clean_augment == ["roll"]
