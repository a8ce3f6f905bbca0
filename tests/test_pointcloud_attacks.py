"""The point-cloud attacks (pointba_i, pointba_o, pcba, irba) on tiny synthetic clouds (spheres, boxes and
cylinders of 128 points; no dataset): the shared poisoning rules, determinism and modality checks, and
what each trigger promises geometrically, checked against independent reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.pointcloud import mean_knn_distance, normalize_unit_sphere
from pipeline_pkg.registry import ATTACKS

# Module fixtures are built before conftest's per-test fixture sets the thread count.
torch.set_num_threads(1)

CLASSES = 3
POINTS = 128
NAMES = ["pointba_i", "pointba_o", "pcba", "irba"]
# PCBA with just enough surrogate training and centre optimisation to exercise fit quickly.
QUICK_PCBA = {"surrogate_epochs": 2, "surrogate_points": 64, "restarts": 2, "steps": 8}


def shapes(per_class: int, points: int = POINTS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit-sphere-normalised clouds of class 0 (sphere surfaces), 1 (box surfaces), 2 (cylinder sides),
    each randomly stretched and jittered a little; labels shuffled."""
    gen = torch.Generator().manual_seed(seed)
    clouds, labels = [], []
    for cls in range(CLASSES):
        for _ in range(per_class):
            d = torch.randn(points, 3, generator=gen)
            if cls == 0:
                pts = d / d.norm(dim=1, keepdim=True)
            elif cls == 1:
                pts = d / d.abs().amax(dim=1, keepdim=True)
            else:
                angle = torch.rand(points, generator=gen) * 2 * math.pi
                pts = torch.stack([angle.cos(), torch.rand(points, generator=gen) * 2 - 1, angle.sin()], 1)
            stretch = 1 + 0.3 * torch.rand(3, generator=gen)
            pts = pts * stretch + 0.01 * torch.randn(points, 3, generator=gen)
            clouds.append(pts)
            labels.append(cls)
    order = torch.randperm(len(labels), generator=gen)
    x = normalize_unit_sphere(torch.stack(clouds))[order]
    return x.numpy().astype(np.float32), np.asarray(labels, dtype=np.int64)[order.numpy()]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return shapes(20)


def make(name: str, **params):
    return ATTACKS.get(name)(**params).prepare("pointcloud")


@pytest.fixture(scope="module")
def fitted_pcba(data):
    """PCBA fitted once on the module's data, with torch's global RNG state before and after the fit."""
    x, y = data
    attack = make("pcba", **QUICK_PCBA)
    before = torch.random.get_rng_state()
    attack.fit(x, y, CLASSES, 0)
    return attack, before, torch.random.get_rng_state()


@pytest.fixture
def attack(request, fitted_pcba):
    """The attack named by the (indirect) `attack` parameter, ready to trigger (PCBA fitted)."""
    name = request.param
    return fitted_pcba[0] if name == "pcba" else make(name)


def sphere_counts(x: torch.Tensor, center: torch.Tensor, radius: float) -> torch.Tensor:
    return ((x - center).norm(dim=-1) <= radius).sum(dim=1)


# --- shared behaviour ---

@pytest.mark.parametrize("attack", NAMES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trigger_keeps_shape_dtype_and_input(attack, data, dtype):
    x = torch.from_numpy(data[0][:8]).to(dtype)
    original = x.clone()
    out = attack.apply_trigger(x)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.equal(x, original), "apply_trigger must not modify its input"
    assert not torch.allclose(out, x), "the trigger must change the clouds"
    assert torch.isfinite(out).all()
    assert attack.apply_trigger(x[:0]).shape == (0, POINTS, 3)


@pytest.mark.parametrize("attack", NAMES, indirect=True)
def test_trigger_is_per_cloud(attack, data):
    """A cloud's trigger does not depend on the other clouds of the batch (the poison stage slices)."""
    x = torch.from_numpy(data[0][:10])
    whole = attack.apply_trigger(x)
    parts = torch.cat([attack.apply_trigger(x[:3]), attack.apply_trigger(x[3:])])
    torch.testing.assert_close(whole, parts, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attack", NAMES, indirect=True)
@pytest.mark.parametrize("rate", [0.1, 0.25])
def test_poison_count_labels_and_indices(attack, data, rate):
    x, y = data
    attack.params["rate"] = rate
    try:
        xp, yp, idx = attack.poison(x, y, CLASSES, np.random.default_rng(3))
    finally:
        attack.params["rate"] = 0.1
    assert len(idx) == round(rate * len(y))
    assert np.all(np.diff(idx) > 0), "poisoned indices must be sorted and unique"
    assert np.all(y[idx] != 0), "only samples whose label changes are poisoned"
    assert np.all(yp[idx] == 0) and np.array_equal(np.delete(yp, idx), np.delete(y, idx))
    assert np.array_equal(np.delete(xp, idx, axis=0), np.delete(x, idx, axis=0))
    np.testing.assert_array_equal(xp[idx], attack.trigger_numpy(x[idx]))


@pytest.mark.parametrize("attack", NAMES, indirect=True)
def test_triggered_test_only_non_target(attack, data):
    x, y = data
    x_bd, y_bd, y_true = attack.triggered_test(x, y, CLASSES)
    keep = y != 0
    assert len(x_bd) == keep.sum() and np.all(y_bd == 0)
    assert np.array_equal(y_true, y[keep])
    np.testing.assert_array_equal(x_bd, attack.trigger_numpy(x[keep]))


@pytest.mark.parametrize("attack", NAMES, indirect=True)
def test_poison_is_deterministic(attack, data):
    x, y = data
    first = attack.poison(x, y, CLASSES, np.random.default_rng(7))
    second = attack.poison(x, y, CLASSES, np.random.default_rng(7))
    for a, b in zip(first, second):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name", ["pointba_i", "pointba_o", "irba"])
def test_fixed_triggers_are_the_same_for_a_new_instance(name, data):
    x = torch.from_numpy(data[0][:6])
    assert torch.equal(make(name).apply_trigger(x), make(name).apply_trigger(x))


@pytest.mark.parametrize("name", NAMES)
def test_wrong_modality_is_rejected(name, fitted_pcba):
    with pytest.raises(ValueError, match="pointcloud"):
        ATTACKS.get(name)().prepare("image")
    attack = fitted_pcba[0] if name == "pcba" else make(name)
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\(N, P, 3\)"):
        attack.apply_trigger(images)


@pytest.mark.parametrize("name, params, key", [
    ("pointba_i", {"radius": 0}, "radius"),
    ("pointba_i", {"center": [0, 1]}, "center"),
    ("pointba_i", {"points": 0}, "points"),
    ("pointba_o", {"axis": "w"}, "axis"),
    ("pointba_o", {"angle_deg": 0}, "angle_deg"),
    ("irba", {"sigma": 0}, "sigma"),
    ("irba", {"anchors": 0}, "anchors"),
    ("irba", {"scale": -1}, "scale"),
    ("pcba", {"source": [0, 1]}, "source"),  # contains the target
    ("pcba", {"source": "chair"}, "source"),
    ("pcba", {"count": -1}, "count"),
    ("pcba", {"knn": 32}, "knn"),
])
def test_bad_parameters_raise_config_error(name, params, key):
    with pytest.raises(ConfigError, match=key):
        ATTACKS.get(name)(**params)


@pytest.mark.parametrize("name, params", [("pointba_i", {"points": 200}), ("irba", {"anchors": 200}),
                                          ("pcba", {"points": 200})])
def test_more_points_than_the_cloud_has(name, params, data):
    attack = make(name, **params)
    if name == "pcba":
        attack.load_state_arrays({"center": np.zeros(3, np.float32),
                                  "offsets": np.ones((200, 3), np.float32)})
    with pytest.raises(ValueError, match="lower it"):
        attack.apply_trigger(torch.from_numpy(data[0][:2]))


# --- PointBA-I: the ball ---

def test_pointba_i_replaces_the_nearest_points_with_the_fixed_ball(data):
    attack = make("pointba_i")
    x = torch.from_numpy(data[0][:10])
    out = attack.apply_trigger(x)
    center = torch.tensor([0.05, 0.05, 0.6])
    pattern = attack.pattern()
    assert pattern.shape == (32, 3)
    assert ((pattern - center).norm(dim=1) <= 0.05).all(), "the ball's points lie within its radius"
    assert len(torch.unique(pattern, dim=0)) == 32
    for cloud, moved in zip(x, out):
        nearest = torch.argsort((cloud - center).norm(dim=1))[:32]
        changed = torch.nonzero((moved != cloud).any(dim=1)).flatten()
        assert set(changed.tolist()) <= set(nearest.tolist()), "only the 32 nearest points may change"
        # The replaced points are the pattern exactly (the nearest gets the pattern's first point).
        assert torch.equal(moved[nearest], pattern)
        # Everything else is untouched.
        rest = torch.ones(POINTS, dtype=torch.bool)
        rest[nearest] = False
        assert torch.equal(moved[rest], cloud[rest])


def test_pointba_i_ball_holds_exactly_its_points_when_the_area_was_empty():
    # A sphere of radius 1 has no point within 0.05 of (0, 0, 0.6): afterwards exactly 32 are.
    x = torch.from_numpy(shapes(3)[0])
    x = x / x.norm(dim=-1, keepdim=True)
    center = torch.tensor([0.05, 0.05, 0.6])
    assert (sphere_counts(x, center, 0.05) == 0).all()
    assert (sphere_counts(make("pointba_i").apply_trigger(x), center, 0.05) == 32).all()


def test_pointba_i_pattern_is_seeded_and_placed_by_parameters():
    a = make("pointba_i", pattern_seed=0)
    assert torch.equal(a.pattern(), make("pointba_i").pattern())
    assert not torch.equal(a.pattern(), make("pointba_i", pattern_seed=1).pattern())
    moved = make("pointba_i", center=[0.0, -0.5, 0.0], radius=0.1, points=8).pattern()
    assert moved.shape == (8, 3)
    assert ((moved - torch.tensor([0.0, -0.5, 0.0])).norm(dim=1) <= 0.1).all()


# --- PointBA-O: the rotation ---

@pytest.mark.parametrize("axis, angle", [("y", 10.0), ("x", -30.0), ("z", 45.0)])
def test_pointba_o_rotates_by_the_angle_about_the_axis(axis, angle, data):
    params = {} if (axis, angle) == ("y", 10.0) else {"axis": axis, "angle_deg": angle}
    attack = make("pointba_o", **params)
    x = torch.from_numpy(data[0][:5])
    out = attack.apply_trigger(x)
    k = "xyz".index(axis)
    # Right-handed in-plane coordinates: x→y about z, y→z about x, z→x about y.
    u, v = (k + 1) % 3, (k + 2) % 3
    torch.testing.assert_close(out[..., k], x[..., k], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-6, rtol=0)
    before = torch.atan2(x[..., v].double(), x[..., u].double())
    after = torch.atan2(out[..., v].double(), out[..., u].double())
    turned = torch.remainder(after - before + math.pi, 2 * math.pi) - math.pi
    # Points off the axis (in-plane distance > 0.1), where float32 rounding cannot swamp the angle.
    off_axis = x[..., [u, v]].norm(dim=-1) > 0.1
    assert off_axis.sum() > 400
    torch.testing.assert_close(turned[off_axis], torch.full_like(turned[off_axis], math.radians(angle)),
                               atol=1e-5, rtol=0)


# --- IRBA: the weighted local transformation ---

def reference_fps(cloud: np.ndarray, count: int) -> list[int]:
    """Farthest point sampling, written out: start at the point farthest from the centroid."""
    picked = [int(np.argmax(np.linalg.norm(cloud - cloud.mean(0), axis=1)))]
    nearest = np.full(len(cloud), np.inf)
    for _ in range(count - 1):
        nearest = np.minimum(nearest, np.linalg.norm(cloud - cloud[picked[-1]], axis=1))
        picked.append(int(np.argmax(nearest)))
    return picked


def euler_zyx(deg: float) -> np.ndarray:
    """Rz(a) Ry(a) Rx(a) written out entry by entry (the authors' formula)."""
    s, c = math.sin(math.radians(deg)), math.cos(math.radians(deg))
    return np.array([[c * c, c * s * s - s * c, c * s * c + s * s],
                     [s * c, s * s * s + c * c, s * s * c - c * s],
                     [-s, c * s, c * c]])


def reference_wlt(cloud: np.ndarray, anchors: np.ndarray, sigma: float, deg: float,
                  scale: float) -> np.ndarray:
    """The WLT as written in the paper: every anchor transforms every point, then a normalised
    Gaussian-kernel average over the anchors."""
    transform = euler_zyx(deg) * scale
    moved = np.stack([a + (cloud - a) @ transform for a in anchors])  # (M, P, 3)
    weight = np.exp(-0.5 * ((cloud[None] - anchors[:, None]) ** 2).sum(-1) / sigma**2)  # (M, P)
    return (weight[..., None] * moved).sum(0) / weight.sum(0)[:, None]


def test_irba_anchors_are_farthest_point_samples(data):
    attack = make("irba")
    x = torch.from_numpy(data[0][:4]).double()
    idx = attack.anchor_indices(x)
    assert idx.shape == (4, 16)
    for cloud, anchors in zip(x.numpy(), idx):
        assert len(set(anchors.tolist())) == 16
        assert anchors.tolist() == reference_fps(cloud, 16)


def test_irba_matches_the_written_out_transformation(data):
    attack = make("irba")
    x = torch.from_numpy(data[0][:4]).double()
    idx = attack.anchor_indices(x)
    warped = attack.local_warp(x)
    for cloud, anchors, got in zip(x.numpy(), idx, warped):
        expected = reference_wlt(cloud, cloud[anchors.numpy()], 0.5, 5.0, 5.0)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)  # float32 rotation matrix
    # The trigger is the warp brought back to the cloud's centroid and radius (unit sphere here).
    out = attack.apply_trigger(x)
    torch.testing.assert_close(out.mean(dim=1), x.mean(dim=1), atol=1e-9, rtol=0)
    def radius(clouds: torch.Tensor) -> torch.Tensor:
        return (clouds - clouds.mean(dim=1, keepdim=True)).norm(dim=-1).amax(dim=1)

    torch.testing.assert_close(radius(out), radius(x), atol=1e-9, rtol=0)


def test_irba_without_rotation_or_scaling_changes_nothing(data):
    x = torch.from_numpy(data[0][:6])
    identity = make("irba", rotation_deg=0.0, scale=1.0)
    torch.testing.assert_close(identity.apply_trigger(x), x, atol=1e-6, rtol=0)


def test_irba_displacement_is_smooth_and_bounded(data):
    x = torch.from_numpy(data[0])
    shift = make("irba").apply_trigger(x) - x
    size = shift.norm(dim=-1)
    assert size.mean() > 0.02, "the trigger must move the points measurably"
    assert size.max() < 0.35, "a local distortion, not a different shape"
    # Nearby points move alike: the difference of two points' shifts is below their distance.
    dist = torch.cdist(x, x)
    shift_diff = torch.cdist(shift, shift)
    near = (dist > 0) & (dist < 0.2)
    assert near.sum() > 1000
    assert (shift_diff[near] / dist[near]).max() < 1.0


def test_irba_does_not_depend_on_the_point_order(data):
    attack = make("irba")
    x = torch.from_numpy(data[0][:6])
    perm = torch.randperm(POINTS, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(attack.apply_trigger(x[:, perm]), attack.apply_trigger(x)[:, perm],
                               atol=1e-6, rtol=0)


def test_irba_tiny_sigma_moves_each_point_by_its_nearest_anchor(data):
    attack = make("irba", sigma=1e-3)
    x = torch.from_numpy(data[0][:4]).double()
    warped = attack.local_warp(x)
    transform = torch.from_numpy(euler_zyx(5.0) * 5.0)
    for cloud, idx, got in zip(x, attack.anchor_indices(x), warped):
        anchors = cloud[idx]
        nearest = anchors[torch.cdist(cloud, anchors).argmin(dim=1)]
        torch.testing.assert_close(got, nearest + (cloud - nearest) @ transform, atol=1e-5, rtol=0)
        # An anchor itself stays where it is: its own transformation is about itself.
        torch.testing.assert_close(got[idx], anchors, atol=1e-9, rtol=0)


# --- PCBA: the optimised cluster ---

def test_pcba_inserts_a_cluster_with_the_hosts_spread(fitted_pcba, data):
    attack = fitted_pcba[0]
    x = torch.from_numpy(data[0][:6])
    out = attack.apply_trigger(x)
    center, offsets = attack.center, attack.offsets
    replaced = attack.replaced_indices(POINTS, x.device)
    assert len(set(replaced.tolist())) == 32
    changed = (out != x).any(dim=-1)
    kept = np.setdiff1d(np.arange(POINTS), replaced.numpy())
    assert not changed[:, kept].any(), "only the replaced points move"
    assert torch.equal(replaced, make("pcba").replaced_indices(POINTS, x.device)), "seeded, the same set"
    torch.testing.assert_close(offsets.norm(dim=1), torch.ones(32))
    host_spread = mean_knn_distance(x, 4).median(dim=1).values
    for cloud, spread in zip(out, host_spread):
        cluster = cloud[replaced]
        radius = (cluster - center).norm(dim=1)
        torch.testing.assert_close(radius, radius[:1].expand(32), atol=1e-5, rtol=0)  # on one sphere
        torch.testing.assert_close((cluster - center) / radius[:, None], offsets, atol=1e-4, rtol=0)
        # The cluster's own spread statistic is the host's (the radius is not clamped here).
        assert 0.01 < float(radius[0]) < 0.5
        cluster_spread = mean_knn_distance(cluster[None], 4).median()
        assert float(cluster_spread) == pytest.approx(float(spread), rel=1e-4)


def test_pcba_cluster_is_not_a_statistical_outlier(fitted_pcba, data):
    """Statistical outlier removal (k = 4, threshold: mean + 1 std of the mean k-NN distance) flags the
    cluster's points no more often than the host's own; a cluster 4× as wide would stand out."""
    attack = fitted_pcba[0]
    x = torch.from_numpy(data[0])
    replaced = attack.replaced_indices(POINTS, x.device)
    is_cluster = torch.zeros(POINTS, dtype=torch.bool)
    is_cluster[replaced] = True

    def flagged(clouds: torch.Tensor) -> tuple[float, float]:
        stat = mean_knn_distance(clouds, 4)
        outlier = stat > stat.mean(dim=1, keepdim=True) + stat.std(dim=1, keepdim=True)
        return float(outlier[:, is_cluster].float().mean()), float(outlier[:, ~is_cluster].float().mean())

    cluster_rate, host_rate = flagged(attack.apply_trigger(x))
    assert cluster_rate <= host_rate
    wide = attack.insert(x, attack.center, attack.offsets, 4 * attack.cluster_radius(x, attack.offsets))
    wide_cluster_rate, wide_host_rate = flagged(wide)
    assert wide_cluster_rate > 2 * wide_host_rate


def test_pcba_fit_keeps_center_in_bound_and_global_rng_untouched(fitted_pcba):
    attack, before, after = fitted_pcba
    assert attack.center.shape == (3,) and float(attack.center.norm()) <= 1.0 + 1e-6
    assert torch.equal(before, after), "fit must not shift torch's global random state"


def test_pcba_fit_is_deterministic(fitted_pcba, data):
    again = make("pcba", **QUICK_PCBA)
    again.fit(*data, CLASSES, 0)
    assert torch.equal(again.center, fitted_pcba[0].center)
    assert torch.equal(again.offsets, fitted_pcba[0].offsets)


def test_pcba_state_round_trip_reproduces_the_trigger(fitted_pcba, data):
    attack = fitted_pcba[0]
    state = attack.state_arrays()
    assert set(state) == {"center", "offsets"} and all(isinstance(v, np.ndarray) for v in state.values())
    rebuilt = make("pcba", **QUICK_PCBA).load_state_arrays({k: v.copy() for k, v in state.items()})
    x = torch.from_numpy(data[0][:8])
    assert torch.equal(rebuilt.apply_trigger(x), attack.apply_trigger(x))
    with pytest.raises(RuntimeError, match="fit"):
        make("pcba").apply_trigger(x)
    with pytest.raises(ValueError, match="points=16"):
        make("pcba", points=16).load_state_arrays(state)


def unit_offsets() -> torch.Tensor:
    """32 seeded unit vectors, a cluster shape independent of the attack's own."""
    gen = torch.Generator().manual_seed(5)
    return torch.nn.functional.normalize(torch.randn(32, 3, generator=gen), dim=1)


class PullsMeanTo(nn.Module):
    """A stand-in surrogate: class 0's logit is highest when the cloud's mean is at `goal`."""

    def __init__(self, goal: torch.Tensor):
        super().__init__()
        self.goal = goal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = -50.0 * (x.mean(dim=1) - self.goal).pow(2).sum(-1)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def test_pcba_optimisation_finds_the_centre_the_surrogate_rewards(data):
    attack = make("pcba", closeness=0.0, restarts=2, steps=150, bound=2.0)
    cloud = torch.from_numpy(data[0][:1])
    offsets = unit_offsets()
    wanted = torch.tensor([0.3, -0.2, 0.5])
    # The mean of the cloud with the cluster at `wanted`: the stand-in rewards exactly that centre.
    goal = attack.insert(cloud, wanted, offsets).mean(dim=1)[0]
    target = torch.zeros(1, dtype=torch.long)
    found = attack.optimise_center(PullsMeanTo(goal), cloud, target, offsets, seed=0)
    assert float((found - wanted).norm()) < 0.02


def test_pcba_source_classes_and_count(data):
    x, y = data
    attack = make("pcba", source=1, count=5)
    offsets = unit_offsets()
    attack.load_state_arrays({"center": np.array([0.0, 0.0, 0.9], np.float32), "offsets": offsets.numpy()})
    xp, yp, idx = attack.poison(x, y, CLASSES, np.random.default_rng(0))
    assert len(idx) == 5 and np.all(y[idx] == 1) and np.all(yp[idx] == 0)
    x_bd, y_bd, y_true = attack.triggered_test(x, y, CLASSES)
    assert len(x_bd) == (y == 1).sum() and np.all(y_true == 1) and np.all(y_bd == 0)
    with pytest.raises(ValueError, match="count 30 .* lower the count"):
        make("pcba", source=[1], count=30).poison(x, y, CLASSES, np.random.default_rng(0))
    with pytest.raises(ValueError, match="source classes"):
        make("pcba", source=[2, 5]).fit(x, y, CLASSES, 0)
