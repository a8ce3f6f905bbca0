"""The image attacks whose trigger is learned in `fit` (trojan, lc, inputaware, lira, issba), on scikit-learn
digits: trigger shape and determinism, how many samples are poisoned and how, the clean-label rules,
the saved trigger state, the bounds each trigger promises, and whether a small model trained on the
poisoned set learns the backdoor while staying accurate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_pkg.attacks.badnets import checkerboard
from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.h5io import read_h5, write_h5
from pipeline_pkg.registry import ATTACKS, DATASETS, MODELS
from pipeline_pkg.stages import TRIGGER_STATE
from pipeline_pkg.trainer import TrainSettings, fit

# Module fixtures are built before conftest's per-test fixture sets the thread count.
torch.set_num_threads(1)

SEED = 0
CLASSES = 10
NAMES = ["trojan", "lc", "inputaware", "lira", "issba"]
LEARNED = ["trojan", "inputaware", "lira", "issba"]  # the trigger itself is learned and saved
SAMPLE_SPECIFIC = ["inputaware", "lira", "issba"]

# Defaults, except lc: the paper's 8/255 budget (for CIFAR) leaves digits as easy as before, so the
# victim never needs the trigger (ASR ≈ 0); 0.25 is the scale at which digits are attacked.
FULL_PARAMS = {"trojan": {}, "lc": {"eps": 0.25}, "inputaware": {}, "lira": {}, "issba": {}}
# What a victim reaches (seed 0, 12 epochs, no augmentation) is near 1.0 for trojan, lira and issba;
# lc ≈ 0.9 (0.7–0.9 over victim seeds) and inputaware ≈ 0.8 (its cross-trigger samples, labels kept,
# teach the victim that a trigger made for another image means nothing): their bars sit below that,
# far above the ≈ 0.01 a clean model gives.
MIN_ASR = {"trojan": 0.8, "lc": 0.5, "inputaware": 0.6, "lira": 0.8, "issba": 0.8}
MIN_ACC = 0.85
VICTIM_EPOCHS = 12
# Just enough training to check shapes and determinism.
QUICK_PARAMS = {
    "trojan": {"surrogate_epochs": 1, "steps": 5},
    "lc": {"surrogate_epochs": 1, "steps": 2},
    "inputaware": {"mask_epochs": 1, "epochs": 1},
    "lira": {"epochs": 1},
    "issba": {"epochs": 1},
}


def make(name: str, **params):
    return ATTACKS.get(name)(**params).prepare("image")


@pytest.fixture(scope="module")
def digits():
    return DATASETS.get("digits")().build(None, 0)


@pytest.fixture(scope="module")
def fitted(digits):
    """name → the attack with FULL_PARAMS fitted on the digits training set (each fitted once)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            attack = make(name, **FULL_PARAMS[name])
            attack.fit(digits.x_train, digits.y_train, CLASSES, SEED)
            cache[name] = attack
        return cache[name]

    return get


@pytest.fixture(scope="module")
def poisoned(digits, fitted):
    """name → (x, y, poisoned indices) of the digits training set poisoned by the fitted attack."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = fitted(name).poison(digits.x_train, digits.y_train, CLASSES,
                                              np.random.default_rng(SEED))
        return cache[name]

    return get


def quick_fit(name: str, x: np.ndarray, y: np.ndarray, seed: int):
    attack = make(name, **QUICK_PARAMS[name])
    attack.fit(x, y, CLASSES, seed)
    return attack


# --- shape, dtype, determinism ---

@pytest.mark.parametrize("name", NAMES)
def test_trigger_is_uint8_and_deterministic_for_a_seed(digits, name):
    x, y = digits.x_train[:300], digits.y_train[:300]
    rng_state = torch.random.get_rng_state()
    first = quick_fit(name, x, y, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_state), "fit must not consume the global RNG"
    second = quick_fit(name, x, y, seed=3)
    batch = torch.from_numpy(digits.x_test[:40])
    original = batch.clone()
    out = first.apply_trigger(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert torch.equal(batch, original), "apply_trigger must not modify its input"
    assert torch.equal(out, second.apply_trigger(batch))
    assert not torch.equal(out, batch)
    x_first, y_first, idx_first = first.poison(x, y, CLASSES, np.random.default_rng(1))
    x_second, y_second, idx_second = second.poison(x, y, CLASSES, np.random.default_rng(1))
    assert np.array_equal(x_first, x_second) and np.array_equal(y_first, y_second)
    assert np.array_equal(idx_first, idx_second)
    if name in LEARNED:
        other_seed = quick_fit(name, x, y, seed=4)
        assert not torch.equal(out, other_seed.apply_trigger(batch)), "another seed learns another trigger"


@pytest.mark.parametrize("name", LEARNED)
def test_learned_trigger_needs_fit_first(name):
    with pytest.raises(RuntimeError, match="fit"):
        make(name).apply_trigger(torch.zeros((2, 1, 16, 16), dtype=torch.uint8))


# --- poisoning ---

@pytest.mark.parametrize("name", NAMES)
def test_poisons_round_rate_times_n_samples(digits, fitted, poisoned, name):
    attack = fitted(name)
    x, y = digits.x_train, digits.y_train
    x_p, y_p, idx = poisoned(name)
    assert len(idx) == round(float(attack.rate) * len(y))
    assert np.array_equal(idx, np.sort(idx)) and len(np.unique(idx)) == len(idx)
    rest = np.setdiff1d(np.arange(len(y)), idx)
    assert np.array_equal(y_p[rest], y[rest])
    if not attack.clean_label:
        assert np.all(y_p[idx] == int(attack.target)) and np.all(y[idx] != int(attack.target))
    changed_rest = rest[np.any(x_p[rest] != x[rest], axis=(1, 2, 3))]
    if name == "inputaware":
        # Cross-trigger samples: another image's trigger, label kept.
        assert len(changed_rest) == round(float(attack.cross_ratio) * len(idx))
    else:
        assert len(changed_rest) == 0


def test_lc_is_clean_label_on_the_target_class(digits, fitted, poisoned):
    attack = fitted("lc")
    x_p, y_p, idx = poisoned("lc")
    assert attack.clean_label and float(attack.rate) == 0.05
    assert np.array_equal(y_p, digits.y_train), "a clean-label attack changes no label"
    assert np.all(digits.y_train[idx] == int(attack.target))
    with pytest.raises(ConfigError, match="all_to_one"):
        make("lc", mode="all_to_all")


def test_all_to_all_relabels_to_the_next_class(digits):
    x, y = digits.x_train[:300], digits.y_train[:300]
    attack = make("lira", epochs=1, mode="all_to_all")
    attack.fit(x, y, CLASSES, SEED)
    _, y_p, idx = attack.poison(x, y, CLASSES, np.random.default_rng(0))
    assert np.array_equal(y_p[idx], (y[idx] + 1) % CLASSES)


# --- saved state ---

@pytest.mark.parametrize("name", LEARNED)
def test_trigger_state_round_trips_through_the_poison_file(digits, fitted, tmp_path, name):
    attack = fitted(name)
    arrays = attack.state_arrays()
    assert arrays and all(isinstance(v, np.ndarray) for v in arrays.values())
    write_h5(tmp_path / "poison.h5", {TRIGGER_STATE + key: value for key, value in arrays.items()})
    stored, _ = read_h5(tmp_path / "poison.h5")
    rebuilt = make(name, **FULL_PARAMS[name]).load_state_arrays(
        {key[len(TRIGGER_STATE):]: value for key, value in stored.items()})
    batch = torch.from_numpy(digits.x_test)
    assert torch.equal(rebuilt.apply_trigger(batch), attack.apply_trigger(batch))


def test_lc_saves_no_state(fitted):
    assert fitted("lc").state_arrays() == {}


# --- what each trigger promises ---

@pytest.mark.parametrize("name", SAMPLE_SPECIFIC)
def test_sample_specific_triggers_differ_between_images(digits, fitted, name):
    x = torch.from_numpy(digits.x_test[:50])
    residual = fitted(name).apply_trigger(x).int() - x.int()
    distinct = {r.numpy().tobytes() for r in residual}
    assert len(distinct) >= 45, f"only {len(distinct)} distinct residuals among 50 images"


@pytest.mark.parametrize("name, bound_key", [("lira", "eps"), ("issba", "max_residual")])
def test_additive_triggers_stay_within_their_bound(digits, fitted, name, bound_key):
    attack = fitted(name)
    x = torch.from_numpy(digits.x_test)
    change = (attack.apply_trigger(x).int() - x.int()).abs()
    assert change.max() <= float(attack.params[bound_key]) * 255 + 1
    assert change.float().mean() > 0.5, "the trigger must change the image"


def test_trojan_changes_pixels_only_inside_its_mask(digits, fitted):
    attack = fitted("trojan")
    x = torch.from_numpy(digits.x_test)
    out = attack.apply_trigger(x)
    rows, cols = attack.patch_box(16, 16)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[rows, cols] = True
    assert torch.equal(out[..., ~inside], x[..., ~inside])
    expected = (attack.patch() * 255).round().to(torch.uint8)
    assert torch.equal(out[..., rows, cols], expected.expand_as(out[..., rows, cols]))


def corner_mask(attack) -> torch.Tensor:
    inside = torch.zeros(16, 16, dtype=torch.bool)
    for rows, cols in attack.corner_boxes(16, 16):
        inside[rows, cols] = True
    return inside


def test_lc_test_trigger_is_exactly_the_four_corner_pattern(digits, fitted):
    attack = fitted("lc")
    x = torch.from_numpy(digits.x_test)
    out = attack.apply_trigger(x)
    pattern = (checkerboard(int(attack.size)) * 255).to(torch.uint8)
    for rows, cols in attack.corner_boxes(16, 16):
        assert torch.equal(out[..., rows, cols], pattern.expand_as(out[..., rows, cols]))
    outside = ~corner_mask(attack)
    assert torch.equal(out[..., outside], x[..., outside])


def test_lc_poisons_are_bounded_perturbations_plus_the_corners(digits, fitted, poisoned):
    attack = fitted("lc")
    x_p, _, idx = poisoned("lc")
    clean, poisoned_images = torch.from_numpy(digits.x_train[idx]), torch.from_numpy(x_p[idx])
    assert torch.equal(poisoned_images, attack.apply_trigger(poisoned_images)), "corners carry the pattern"
    outside = ~corner_mask(attack)
    change = (poisoned_images.int() - clean.int())[..., outside].abs()
    assert change.max() <= float(attack.eps) * 255 + 1
    assert change.float().mean() > 1, "the adversarial perturbation must change the image"


# --- outcome: the backdoor is learned ---

@pytest.mark.parametrize("name", NAMES)
def test_a_victim_trained_on_the_poisoned_set_learns_the_backdoor(digits, fitted, poisoned, name):
    attack = fitted(name)
    x_p, y_p, _ = poisoned(name)
    x_bd, y_bd, _ = attack.triggered_test(digits.x_test, digits.y_test, CLASSES)
    torch.manual_seed(SEED)
    victim = MODELS.get("resnet9")(width=8).build([1, 16, 16], CLASSES)
    settings = TrainSettings(epochs=VICTIM_EPOCHS, batch_size=64, lr=0.01)
    fit(victim, torch.from_numpy(x_p), torch.from_numpy(y_p), settings, seed=SEED)
    with torch.no_grad():
        acc = (victim(torch.from_numpy(digits.x_test)).argmax(1).numpy() == digits.y_test).mean()
        asr = (victim(torch.from_numpy(x_bd)).argmax(1).numpy() == y_bd).mean()
    print(f"{name}: clean accuracy {acc:.3f}, attack success rate {asr:.3f}")
    assert acc >= MIN_ACC
    assert asr >= MIN_ASR[name]


def test_benign_reference_fits_a_learned_probe_trigger(digits):
    x, y = digits.x_train[:300], digits.y_train[:300]
    benign = ATTACKS.get("none")(probe="trojan").prepare("image", {"trojan": QUICK_PARAMS["trojan"]})
    benign.fit(x, y, 10, seed=0)
    assert benign.state_arrays()
    x_bd, y_bd, _ = benign.triggered_test(x[:20], y[:20], 10)
    assert x_bd.dtype == np.uint8 and (y_bd == 0).all() and not np.array_equal(x_bd, x[:20][y[:20] != 0])
