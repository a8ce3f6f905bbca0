"""Poisoned-sample detectors: the dense-set search, TRAK's influence matrix on every input kind, flagging
and its metrics, and all three detectors on a small patch attack trained here, down to retraining on the
unflagged samples without the backdoor."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.detectors import strongest_feature
from pipeline_pkg.detectors.base import detection_metrics, penultimate_features
from pipeline_pkg.detectors.spectral import spectral_scores
from pipeline_pkg.detectors.maxsum import (densest_subset, expected_influence_correction, local_optima,
                                           subset_value)
from pipeline_pkg.detectors.strongest_feature import subset_sizes, trak_influence
from pipeline_pkg.evaluator import accuracy, predict
from pipeline_pkg.models.base import Classifier
from pipeline_pkg.models.resnet9 import ResNet9Spec
from pipeline_pkg.models.rf_cnn import RFCNNSpec
from pipeline_pkg.registry import ATTACKS, DETECTORS
from pipeline_pkg.runtime import seed_everything
from pipeline_pkg.trainer import TrainSettings, fit

torch.set_num_threads(1)

DETECTOR_NAMES = ("spectral", "activation_clustering", "strongest_feature")


# --- the dense-set search ---

def test_search_recovers_a_planted_dense_block_exactly():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((200, 200))
    block = np.sort(rng.choice(200, size=20, replace=False))
    matrix[np.ix_(block, block)] += 1.5
    found = densest_subset(matrix, 20, restarts=10, seed=0)
    assert found.tolist() == block.tolist()
    # Also with the paper's correction; single restarts can stop in a local optimum of pure noise, which
    # is what the restarts are for, but most of them reach the block.
    correction = expected_influence_correction(matrix, 20)
    assert densest_subset(matrix, 20, restarts=10, seed=1, unary=correction).tolist() == block.tolist()
    optima = local_optima(matrix, 20, 10, seed=1, unary=correction)
    assert sum(s.tolist() == block.tolist() for s in optima) >= 5


def test_search_stops_only_at_swap_optima_and_finds_the_optimum_of_small_problems():
    rng = np.random.default_rng(1)
    for trial in range(5):
        matrix = rng.standard_normal((12, 12))
        # Every restart ends where no single swap raises the value.
        for subset in local_optima(matrix, 4, 5, seed=trial):
            value = subset_value(matrix, subset)
            for out, into in itertools.product(subset, np.setdiff1d(np.arange(12), subset)):
                assert subset_value(matrix, np.append(subset[subset != out], into)) <= value + 1e-9
        # Random matrices have many such optima (one of these five is reached by 18% of restarts);
        # 40 restarts find the best set, checked against all 495 sets.
        best = max(itertools.combinations(range(12), 4), key=lambda s: subset_value(matrix, np.array(s)))
        assert densest_subset(matrix, 4, restarts=40, seed=trial).tolist() == list(best)


def test_correction_discounts_samples_that_influence_everything():
    # Sample 7 strongly influences every sample; 20 samples also support each other. Without the
    # correction the hub joins the best set, with it (minus its expected influence on a random set) not.
    rng = np.random.default_rng(2)
    matrix = 0.1 * rng.standard_normal((100, 100))
    group = np.arange(20, 40)
    matrix[np.ix_(group, group)] += 1.0
    matrix[7, :] += 3.0
    plain = densest_subset(matrix, 20, restarts=5, seed=0)
    corrected = densest_subset(matrix, 20, restarts=5, seed=0,
                               unary=expected_influence_correction(matrix, 20))
    assert 7 in plain
    assert corrected.tolist() == group.tolist()
    # The correction is −(k/N) × the off-diagonal row sum, and value() counts it once per member.
    u = expected_influence_correction(matrix, 20)
    assert u[7] == pytest.approx(-(20 / 100) * (matrix[7].sum() - matrix[7, 7]))
    assert subset_value(matrix, group, u) == pytest.approx(
        matrix[np.ix_(group, group)].sum() - np.trace(matrix[np.ix_(group, group)]) + u[group].sum())


def test_subset_sizes_are_geometric_shares_of_n():
    assert subset_sizes(0.0002, 0.1024, 10, 50_000) == [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120]
    assert subset_sizes(0.0002, 0.1024, 10, 400)[0] == 2 and subset_sizes(0.0002, 0.1024, 10, 400)[-1] == 41
    assert subset_sizes(5, 40, 4, 400) == [5, 10, 20, 40]
    with pytest.raises(ValueError, match="k_min"):
        subset_sizes(50, 0.01, 4, 400)


# --- TRAK on RF frames and point clouds ---

class PointsFirst(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)  # (N, P, 3) → (N, 3, P)


class MaxOverPoints(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(-1)


class TinyPointNet(Classifier):
    """A shared per-point MLP with BatchNorm and a max over points: the shape of point-cloud classifiers."""

    def __init__(self, classes: int):
        super().__init__()
        self.features = nn.Sequential(PointsFirst(), nn.Conv1d(3, 8, 1), nn.BatchNorm1d(8), nn.ReLU(inplace=True),
                                      nn.Conv1d(8, 16, 1), nn.ReLU(inplace=True), MaxOverPoints())
        self.classifier = nn.Linear(16, classes)


@pytest.mark.parametrize("kind", ["rf", "pointcloud"])
def test_trak_matrix_is_the_kernel_projection_with_rows_as_training_samples(kind):
    # With one checkpoint and no loss weighting, TRAK's train × train matrix is c·G(GᵀG)⁻¹Gᵀ for the
    # projected per-sample gradients G: symmetric, with exactly proj_dim equal non-zero eigenvalues (which
    # needs BatchNorm in eval mode under the per-sample vmap). With loss weighting, row i is scaled by
    # 1 − p_i(label): rows are the training samples whose influence is measured.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if kind == "rf":
        model, x = RFCNNSpec(width=4, hidden=8).build([2, 64], 3), torch.randn(48, 2, 64, generator=gen)
    else:
        model, x = TinyPointNet(3), torch.randn(48, 32, 3, generator=gen)
    model.eval()
    y = torch.arange(48) % 3
    before = copy.deepcopy(model.state_dict())
    kernel = trak_influence([model], x, y, proj_dim=12, batch_size=16, seed=0, loss_weighting=False)
    weighted = trak_influence([model], x, y, proj_dim=12, batch_size=16, seed=0, loss_weighting=True)
    kernel, weighted = kernel.astype(np.float64), weighted.astype(np.float64)

    assert kernel.shape == (48, 48) and np.isfinite(kernel).all()
    scale = np.abs(kernel).max()
    assert np.abs(kernel - kernel.T).max() < 1e-3 * scale
    eigenvalues = np.sort(np.linalg.eigvalsh((kernel + kernel.T) / 2))[::-1]
    assert eigenvalues[11] > 0.99 * eigenvalues[0]
    assert np.abs(eigenvalues[12:]).max() < 1e-4 * eigenvalues[0]

    with torch.no_grad():
        one_minus_p = 1 - torch.softmax(model(x), 1)[torch.arange(48), y].double().numpy()
    assert np.allclose(weighted, one_minus_p[:, None] * kernel, rtol=1e-3, atol=1e-5 * scale)
    # TRAK worked on a copy: the caller's model is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trak_projection_regenerated_per_batch_is_the_kept_one(monkeypatch):
    # A projection too big for the memory budget is redrawn chunk by chunk for every batch: same matrix,
    # so the same influence, up to float error, over two checkpoints; another seed, another matrix.
    monkeypatch.setattr(strongest_feature, "PROJECTION_CHUNK_ROWS", 100)  # 12 chunks of its 1115 parameters
    torch.manual_seed(0)
    models = [RFCNNSpec(width=4, hidden=8).build([2, 64], 3).eval() for _ in range(2)]
    x, y = torch.randn(40, 2, 64, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 3
    settings = dict(proj_dim=8, batch_size=16, loss_weighting=True)
    kept = trak_influence(models, x, y, seed=0, **settings)
    redrawn = trak_influence(models, x, y, seed=0, projection_budget_bytes=0, **settings)
    assert np.abs(redrawn - kept).max() < 1e-4 * np.abs(kept).max()
    assert np.abs(trak_influence(models, x, y, seed=1, **settings) - kept).max() > 0.01 * np.abs(kept).max()


# --- flag and metrics ---

def test_flag_takes_the_top_share_and_breaks_ties_by_index():
    detector = DETECTORS.get("spectral")(flag_rate=0.3)
    assert detector.flag(np.array([1, 3, 3, 0, 3, 2, 1.0])).tolist() == [1, 2]  # round(2.1) = 2
    scores = np.random.default_rng(0).random(400)
    flagged = DETECTORS.get("spectral")().flag(scores)
    assert len(flagged) == 60 and flagged.tolist() == sorted(np.argsort(-scores)[:60].tolist())
    assert len(DETECTORS.get("spectral")(flag_rate=0.0).flag(scores)) == 0
    with pytest.raises(ValueError, match="NaN"):
        detector.flag(np.array([0.1, np.nan, 0.3]))


def test_spectral_one_sided_score_ranks_the_minority_tail_and_two_sided_is_the_papers_square():
    # One class: 40 clean samples around the origin, 10 poisoned ones shifted by 4 along the first axis.
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(50, 3, generator=gen)
    features[40:, 0] += 4.0
    labels = torch.zeros(50, dtype=torch.long)
    one_sided = spectral_scores(features, labels, one_sided=True)
    two_sided = spectral_scores(features, labels, one_sided=False)
    assert set(np.argsort(-one_sided)[:10]) == set(range(40, 50))
    assert (one_sided[:40] < one_sided[40:].min()).all()
    centred = features.double() - features.double().mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False)[2][0]
    np.testing.assert_allclose(two_sided, ((centred @ direction) ** 2).numpy(), rtol=1e-12)
    # The clean side of the projection scores 0 one-sided: its far end is no longer ranked with the poison.
    assert (one_sided == 0).sum() > 20


def test_detection_metrics_on_a_hand_made_example():
    scores = np.array([0.9, 0.8, 0.1, 0.7, 0.2, 0.3, 0.05, 0.0, 0.4, 0.6])
    metrics = detection_metrics(scores, np.array([0, 1, 3, 9]), np.array([0, 1, 2]), 10)
    # Poisoned 0, 1 flagged, 2 missed; clean 3 and 9 flagged of 7 clean. AUROC: 0.9 and 0.8 beat all 7
    # clean scores, 0.1 beats 0.05 and 0.0: 16 of 21 pairs.
    assert metrics == {"tpr": pytest.approx(2 / 3), "fpr": pytest.approx(2 / 7), "auroc": pytest.approx(16 / 21),
                       "flagged": 4, "poisoned": 3}
    none_poisoned = detection_metrics(scores, np.array([0]), np.array([], dtype=np.int64), 10)
    assert math.isnan(none_poisoned["tpr"]) and math.isnan(none_poisoned["auroc"])
    assert none_poisoned["fpr"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="10 samples"):
        detection_metrics(scores[:5], np.array([0]), np.array([0]), 10)


def test_detectors_reject_bad_settings():
    with pytest.raises(ConfigError, match="flag_rate"):
        DETECTORS.get("spectral")(flag_rate=1.0)
    with pytest.raises(ConfigError, match="one_sided"):
        DETECTORS.get("spectral")(one_sided="yes")
    with pytest.raises(ConfigError, match="max_cluster_share"):
        DETECTORS.get("activation_clustering")(max_cluster_share=0.6)
    with pytest.raises(ConfigError, match="reduction"):
        DETECTORS.get("activation_clustering")(reduction="tsne")
    with pytest.raises(ConfigError, match="aggregate"):
        DETECTORS.get("strongest_feature")(aggregate="mean")
    with pytest.raises(ConfigError, match="valid parameters"):
        DETECTORS.get("strongest_feature")(proj=8)


# --- the three detectors on a backdoored model ---

CLASSES, TARGET, RATE = 10, 0, 0.05
SETTINGS = {"epochs": 15, "batch_size": 32, "lr": 0.05, "optimizer": "sgd"}


def patch_attack(n_train: int = 400, n_test: int = 500, seed: int = 1) -> dict:
    """Ten classes of 16×16 grey images, each a fixed smooth random pattern under heavy pixel noise, so
    that every class is a loose group of samples; 5% of the training samples (none from class 0) get
    BadNets' 4×4 checkerboard in a corner and label 0. The trigger is then the strongest feature of the
    training set (strongest_feature's assumption), and the poisoned samples are a third of class 0
    (within activation clustering's relative-size test)."""
    gen = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.randn(CLASSES, 1, 4, 4, generator=gen), size=(16, 16), mode="bilinear",
                             align_corners=False)
    patterns = patterns / patterns.std(dim=(1, 2, 3), keepdim=True)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % CLASSES
        x = 128 + 60 * patterns[y] + 60 * torch.randn(n, 1, 16, 16, generator=gen)
        return x.clamp(0, 255).round().to(torch.uint8), y

    x, y = draw(n_train)
    x_test, y_test = draw(n_test)
    attack = ATTACKS.get("badnets")(size=4, margin=1, pattern="checkerboard", rate=RATE, target=TARGET)
    rng = np.random.default_rng(seed)
    poisoned = np.sort(rng.choice(np.flatnonzero(y.numpy() != TARGET), round(RATE * n_train), replace=False))
    x[poisoned] = attack.apply_trigger(x[poisoned])
    y[poisoned] = TARGET
    return {"x": x, "y": y, "poisoned": poisoned, "x_test": x_test, "y_test": y_test,
            "x_test_bd": attack.apply_trigger(x_test[y_test != TARGET])}


def train(x: torch.Tensor, y: torch.Tensor, snapshot_epochs: tuple[int, ...] = ()) -> list[Classifier]:
    """A ResNet-9 of width 4 trained with the pipeline's trainer: the checkpoints after `snapshot_epochs`
    (0-based) and the final model, last."""
    seed_everything(0)
    model = ResNet9Spec(width=4).build([1, 16, 16], CLASSES)
    states = []

    def on_epoch(epoch: int, metrics: dict) -> None:
        if epoch in snapshot_epochs:
            states.append(copy.deepcopy(model.state_dict()))

    fit(model, x, y, TrainSettings(**SETTINGS), seed=0, on_epoch=on_epoch)
    snapshots = []
    for state in states:
        snapshot = copy.deepcopy(model)
        snapshot.load_state_dict(state)
        snapshots.append(snapshot.eval())
    return [*snapshots, model]


def attack_success(model: nn.Module, data: dict) -> float:
    return float((predict(model, data["x_test_bd"]) == TARGET).float().mean())


@pytest.fixture(scope="module")
def backdoored():
    deterministic = torch.are_deterministic_algorithms_enabled()
    data = patch_attack()
    # Snapshots after epochs 5 and 10 of 15, as the train stage keeps for an ensemble of 3.
    models = train(data["x"], data["y"], snapshot_epochs=(4, 9))
    clean_acc, asr = accuracy(models[-1], data["x_test"], data["y_test"]), attack_success(models[-1], data)
    yield data, models, clean_acc, asr
    torch.use_deterministic_algorithms(deterministic)  # seed_everything switched it on


@pytest.fixture(scope="module")
def detections(backdoored):
    data, models, _, _ = backdoored
    params = {"flag_rate": 1.5 * RATE}
    detectors = {"spectral": DETECTORS.get("spectral")(**params),
                 "activation_clustering": DETECTORS.get("activation_clustering")(**params),
                 "strongest_feature": DETECTORS.get("strongest_feature")(restarts=20, **params)}
    results = {}
    for name, detector in detectors.items():
        scores = detector.scores(models, data["x"], data["y"], seed=0)
        flagged = detector.flag(scores)
        results[name] = (scores, flagged, detection_metrics(scores, flagged, data["poisoned"], len(data["y"])))
    return results


def test_the_attack_works(backdoored):
    _, models, clean_acc, asr = backdoored
    assert len(models) == 3
    assert clean_acc > 0.95 and asr > 0.95


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_detector_ranks_the_poisoned_samples_first(backdoored, detections, name):
    data = backdoored[0]
    scores, flagged, metrics = detections[name]
    assert scores.shape == (len(data["y"]),) and np.isfinite(scores).all()
    assert metrics["flagged"] == len(flagged) == round(1.5 * RATE * len(data["y"]))
    assert metrics["poisoned"] == len(data["poisoned"])
    assert metrics["auroc"] >= 0.9, metrics
    assert metrics["tpr"] >= 0.8, metrics


def test_activation_clustering_ranks_the_target_class_cluster_first(backdoored):
    # The relative-size test alone also passes the arbitrary 2-means splits of some clean classes (two of
    # them here); the silhouette ranks their small clusters behind the poisoned one.
    data, models, _, _ = backdoored
    detector = DETECTORS.get("activation_clustering")()
    scores = detector.scores(models, data["x"], data["y"], seed=0)
    assert TARGET in detector.poisoned_classes and len(detector.poisoned_classes) > 1
    labels = data["y"].numpy()
    flagged_mean = {c: scores[(labels == c) & (scores >= 2)].mean() for c in detector.poisoned_classes}
    assert max(flagged_mean, key=flagged_mean.get) == TARGET, flagged_mean
    top = np.argsort(-scores, kind="stable")[:len(data["poisoned"])]
    assert len(np.intersect1d(top, data["poisoned"])) >= 0.9 * len(data["poisoned"])


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_retraining_without_the_flagged_samples_removes_the_backdoor(backdoored, detections, name):
    data, _, clean_acc, _ = backdoored
    _, flagged, _ = detections[name]
    keep = np.setdiff1d(np.arange(len(data["y"])), flagged)
    model = train(data["x"][keep], data["y"][keep])[-1]
    assert attack_success(model, data) < 0.1
    assert accuracy(model, data["x_test"], data["y_test"]) > clean_acc - 0.05


def test_penultimate_features_keep_the_mode_and_match_the_classifier(backdoored):
    data, models, _, _ = backdoored
    model = models[-1].train()
    features = penultimate_features(model, data["x"][:50], batch_size=16)
    assert model.training
    model.eval()
    assert features.shape == (50, 32)
    with torch.no_grad():
        assert torch.allclose(model.classifier(features), model(data["x"][:50]), atol=1e-5)
