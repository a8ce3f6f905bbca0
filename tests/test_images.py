"""The image path: the digits dataset, device augmentations, the three image architectures, and every
defense running unchanged on each of them."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml

from pipeline_pkg.augment import augmenter, random_crop, random_flip
from pipeline_pkg.models import count_parameters
from pipeline_pkg.registry import DATASETS, DEFENSES, MODELS

torch.set_num_threads(1)

TINY_ARCHS = {"resnet9": {"width": 4}, "preact_resnet18": {"width": 4},
              "vit": {"patch": 4, "dim": 16, "depth": 1, "heads": 2}}


@pytest.fixture(scope="module")
def digits():
    return DATASETS.get("digits")().build(None, seed=0)


def test_digits_is_an_upscaled_stratified_split_of_sklearn_digits(digits):
    from sklearn.datasets import load_digits

    assert digits.x_train.shape == (1347, 1, 16, 16) and digits.x_test.shape == (450, 1, 16, 16)
    assert digits.x_train.dtype == np.uint8 and digits.x_train.max() == 255 and digits.x_train.min() == 0
    per_class = np.bincount(load_digits().target)
    counts = np.bincount(digits.y_test, minlength=10)
    assert np.abs(counts - 0.25 * per_class).max() <= 1  # stratified: 25% of each class
    again = DATASETS.get("digits")().build(None, seed=0)
    assert np.array_equal(again.x_train, digits.x_train)
    other = DATASETS.get("digits")().build(None, seed=1)
    assert not np.array_equal(other.y_train, digits.y_train)
    # Upscaling keeps the picture: block-averaging back to 8×8 recovers sklearn's image of that sample.
    originals = {img.tobytes(): lbl for img, lbl in zip(load_digits().images.astype(np.uint8), load_digits().target)}
    assert len(originals) > 1700
    small = DATASETS.get("digits")(size=8).build(None, seed=0)
    found = [(np.round(img[0] / 255 * 16).astype(np.uint8)).tobytes() in originals for img in small.x_train[:50]]
    assert all(found)


def test_random_crop_is_a_zero_padded_shift_of_each_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).reshape(2, 3, 8, 8).to(torch.uint8)
    gen = torch.Generator().manual_seed(0)
    out = random_crop(x, gen, pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for n in range(2):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(out[n], padded[n, :, dy:dy + 8, dx:dx + 8])]
        assert matches, "every output must be one window of the padded image"
    assert out.dtype == torch.uint8


def test_flip_mirrors_about_half_of_the_batch_and_augmentation_is_seeded():
    x = torch.randint(0, 256, (400, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) and not torch.equal(o, xi) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped | kept).all()) and 150 < int(flipped.sum()) < 250
    a = augmenter(["crop", "flip"], torch.device("cpu"), seed=5)(x)
    b = augmenter(["crop", "flip"], torch.device("cpu"), seed=5)(x)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown augmentation"):
        augmenter(["spin"], torch.device("cpu"), 0)


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 32, 32)])
def test_image_models_take_uint8_or_unit_floats_alike(arch, shape):
    torch.manual_seed(0)
    model = MODELS.get(arch)(**TINY_ARCHS[arch]).build(list(shape), 10).eval()
    x = torch.randint(0, 256, (3, *shape), dtype=torch.uint8)
    logits = model(x)
    assert logits.shape == (3, 10)
    assert torch.allclose(logits, model(x.float() / 255), atol=1e-5)
    assert torch.allclose(logits, model.classifier(model.features(x)), atol=1e-6)
    assert isinstance(model.classifier, torch.nn.Linear)


def test_standard_sizes_match_the_literature():
    # PreAct-ResNet18 on CIFAR-10 has about 11.17 M parameters; ResNet-9 (width 64) about 6.57 M.
    assert count_parameters(MODELS.get("preact_resnet18")().build([3, 32, 32], 10)) == pytest.approx(11.17e6, rel=1e-3)
    assert count_parameters(MODELS.get("resnet9")().build([3, 32, 32], 10)) == pytest.approx(6.57e6, rel=1e-3)
    with pytest.raises(ValueError, match="divide"):
        MODELS.get("vit")(patch=5).build([3, 32, 32], 10)


def tiny_defense_params(repo) -> dict:
    return yaml.safe_load((repo / "config" / "tiny.yaml").read_text())["defenses"]


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_every_defense_runs_unchanged_on_every_image_architecture(arch, repo, digits):
    torch.manual_seed(0)
    model = MODELS.get(arch)(**TINY_ARCHS[arch]).build([1, 16, 16], 10)
    model.train()
    with torch.no_grad():  # non-default BatchNorm statistics, as a trained model has
        model(torch.from_numpy(digits.x_train[:64]))
    model.eval()
    idx = np.concatenate([np.flatnonzero(digits.y_train == c)[:3] for c in range(10)])
    x = torch.from_numpy(digits.x_train[idx]).float() / 255
    y = torch.from_numpy(digits.y_train[idx])
    for name, params in tiny_defense_params(repo).items():
        if "image" not in DEFENSES.get(name).modalities:
            continue
        defense = DEFENSES.get(name)(**(params or {}))
        purified = defense.purify(copy.deepcopy(model), x, y, seed=0, log=lambda m, s: None)
        logits = purified(torch.from_numpy(digits.x_test[:8]))
        assert logits.shape == (8, 10) and torch.isfinite(logits).all(), name
        assert type(purified.features[0]).__name__ == "ImageInput", name
