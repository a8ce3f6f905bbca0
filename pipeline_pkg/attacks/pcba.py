"""PCBA (Xiang et al., "A Backdoor Attack against 3D Point Cloud Classifiers", ICCV 2021): a small cluster of
points inserted at a place chosen on a surrogate classifier, with a spread that makes it look like part of
the host cloud to outlier removal.

As in the paper and the authors' code (github.com/zhenxianglance/PCBA):
- the cluster is `points` (32) points on a sphere around a centre; its radius is set per host cloud so the
  cluster's points have the host's typical spread: the median over the cluster's points of their mean
  distance to their `knn` (4) nearest cluster points equals the host's median of the same statistic (the
  one statistical outlier removal thresholds), kept within the authors' search range [0.01, 0.5];
- it is inserted by deleting randomly chosen points and adding the cluster's, so the cloud keeps its size.
  Here the cluster's points take the place of the deleted ones, and the deleted positions are one fixed
  seeded set of indices (`pattern_seed`): the same random choice for every cloud of P points, since the
  order of a cloud's points carries no geometry, and a trigger that is the same on every run and device;
- the centre is optimised on a surrogate PointNet trained on clean data the attacker holds (the paper: a
  small set of 1,000 samples, `surrogate_samples`): from several random starts (`restarts`), steps of
  size `step_size` along the normalised gradient with momentum 0.5 lower the surrogate's cross-entropy
  towards the target over source-class clouds carrying the cluster; the best start is kept;
- it is source-specific: `source` (class index or list; null: every class but the target) limits the
  poisoned training samples and the triggered test samples to those classes, and `count` (the paper:
  15 chairs poisoned to be toilets) sets an absolute number of poisoned samples in place of `rate`.

Simplified: the paper keeps the centre near the object by minimising its distance to the nearest host
point under a target-posterior constraint with an adaptive Lagrange multiplier; here a fixed weight
`closeness` adds the mean squared distance from the centre to each cloud's nearest point to the
cross-entropy, the centre is kept within `bound` of the origin, and the step size decays linearly to 0
so each start settles. The cluster's unit offsets (`pattern_seed`) are uniform on the sphere, where the
authors' code draws both spherical angles uniformly and re-draws them per sample. For speed (fit runs in
the poison stage, also on CPUs) the surrogate is a narrow PointNet (`surrogate_width` 0.25, no feature
transform, as the authors' default) that sees a seeded random `surrogate_points` (256) of each cloud's
points, and the centre is placed with 2 starts of 50 steps; raise these for a stronger surrogate.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..pointcloud import mean_knn_distance
from ..registry import ATTACKS, MODELS
from ..trainer import TrainSettings, check_finite, fit
from .pointcloud_base import PointCloudAttack, on_unit_sphere, replace_points, seeded_generator
from .surrogate import fit_device, seeded

# The authors' range for the cluster radius, in unit-sphere units.
MIN_RADIUS, MAX_RADIUS = 0.01, 0.5
# Bytes of the P × P distance matrices computed at once when measuring the hosts' spread.
DISTANCE_BUDGET = 2**28
OPTIMISE_BATCH = 32  # source clouds per step of the centre optimisation
SURROGATE_BATCH = 32  # the authors' surrogate batch size
CENTER, OFFSETS = "center", "offsets"  # names of the learned trigger's arrays


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@ATTACKS.register("pcba")
class PCBA(PointCloudAttack):
    trigger_defaults = {
        "points": 32,  # points of the cluster, replacing as many of the cloud's
        "knn": 4,  # neighbours of the spread statistic matched to the host
        "source": None,  # source class index or list of them; null: every class but the target
        "count": None,  # absolute number of poisoned training samples; overrides rate when set
        "pattern_seed": 0,  # the cluster's unit offsets and the replaced point indices
        "surrogate_samples": 1000,  # the attacker's clean samples: train the surrogate, place the centre
        "surrogate_points": 256,  # points per cloud the surrogate sees (a seeded random subset)
        "surrogate_epochs": 10,
        "surrogate_width": 0.25,  # PointNet width of the surrogate (1.0: the paper's)
        "surrogate_lr": 0.001,
        "restarts": 2,  # random starts of the centre optimisation (the authors: 10)
        "steps": 50,  # steps per start (the authors: up to 1,000)
        "step_size": 0.1,
        "momentum": 0.5,
        "closeness": 1.0,  # weight of the centre's squared distance to the nearest host point
        "bound": 1.0,  # the centre stays within this distance of the origin (unit-sphere clouds)
    }

    def __init__(self, **params):
        super().__init__(**params)
        self.center: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None

    def check_trigger(self) -> None:
        self.require(is_int(self.points) and self.points > 0, "points", "must be a positive number of points")
        self.require(is_int(self.knn) and 0 < self.knn < self.points, "knn",
                     "must be a positive number of neighbours below `points`")
        source = self.source
        self.require(source is None or is_int(source) and source >= 0
                     or isinstance(source, (list, tuple)) and len(source) > 0
                     and all(is_int(v) and v >= 0 for v in source),
                     "source", "must be null, a class index or a non-empty list of class indices")
        if self.mode == "all_to_one" and source is not None:
            self.require(int(self.target) not in self.source_classes(), "source",
                         f"must not contain the target class {self.target}")
        self.require(self.count is None or is_int(self.count) and self.count >= 0, "count",
                     "must be null (use rate) or a number of samples ≥ 0")
        for key in ("surrogate_samples", "surrogate_points", "surrogate_epochs", "restarts"):
            self.require(is_int(self.params[key]) and self.params[key] > 0, key, "must be an integer ≥ 1")
        self.require(is_int(self.steps) and self.steps >= 0, "steps", "must be an integer ≥ 0")
        for key in ("surrogate_width", "surrogate_lr", "step_size", "bound"):
            self.require(float(self.params[key]) > 0, key, "must be positive")
        self.require(0 <= float(self.momentum) < 1, "momentum", "must be in [0, 1)")
        self.require(float(self.closeness) >= 0, "closeness", "must be ≥ 0")

    # --- which samples: the source classes, and an absolute count ---

    def source_classes(self) -> list[int] | None:
        if self.source is None:
            return None
        return [int(self.source)] if is_int(self.source) else [int(v) for v in self.source]

    def attacked(self, y: np.ndarray, targets: np.ndarray) -> np.ndarray:
        mask = targets != y
        sources = self.source_classes()
        return mask if sources is None else mask & np.isin(y, sources)

    def poison_count(self, n_samples: int) -> int:
        return super().poison_count(n_samples) if self.count is None else int(self.count)

    def poison_budget(self) -> tuple[str, object]:
        return super().poison_budget() if self.count is None else ("count", self.count)

    # --- the trigger ---

    def replaced_indices(self, num_points: int, device: torch.device) -> torch.Tensor:
        """The `points` point indices (of clouds with num_points points) that the cluster replaces."""
        order = torch.randperm(num_points, generator=seeded_generator(int(self.pattern_seed)))
        return order[:int(self.points)].to(device)

    def host_spread(self, x: torch.Tensor) -> torch.Tensor:
        """Each cloud's median (N,) over its points of the mean distance to their `knn` nearest points,
        computed a few clouds at a time (P × P distances each)."""
        per_slice = max(1, DISTANCE_BUDGET // (4 * x.shape[1] ** 2))
        return torch.cat([mean_knn_distance(x[i:i + per_slice], int(self.knn)).median(dim=1).values
                          for i in range(0, len(x), per_slice)])

    def cluster_radius(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Radius (N,) of the cluster in each host cloud: the offsets' spread statistic scales with the
        radius, so host spread / unit-cluster spread matches them."""
        unit_spread = self.host_spread(offsets[None].to(x))[0]
        return (self.host_spread(x) / unit_spread).clamp(MIN_RADIUS, MAX_RADIUS)

    def insert(self, x: torch.Tensor, center: torch.Tensor, offsets: torch.Tensor,
               radius: torch.Tensor | None = None) -> torch.Tensor:
        """x with the cluster around `center` (differentiable in it) in place of the replaced points."""
        self.require_points(int(self.points), x, "the cluster")
        self.require_points(int(self.knn) + 1, x, "the spread statistic (knn + 1)")
        radius = self.cluster_radius(x, offsets) if radius is None else radius
        cluster = center.to(x) + radius[:, None, None] * offsets.to(x)
        idx = self.replaced_indices(x.shape[1], x.device).expand(len(x), -1)
        return replace_points(x, idx, cluster)

    def fitted_trigger(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.center is None or self.offsets is None:
            raise RuntimeError(f"attack {self.name!r}: the cluster's centre is learned; call fit() first "
                               f"(the poison stage does) or load_state_arrays() with the arrays a poison "
                               f"file saved")
        return self.center, self.offsets

    def trigger_clouds(self, x: torch.Tensor) -> torch.Tensor:
        center, offsets = self.fitted_trigger()
        return self.insert(x, center, offsets)

    def state_arrays(self) -> dict[str, np.ndarray]:
        center, offsets = self.fitted_trigger()
        return {CENTER: center.cpu().numpy(), OFFSETS: offsets.cpu().numpy()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> "PCBA":
        """Rebuild the learned trigger from `state_arrays()` output (the poison file's `trigger.*`)."""
        offsets = torch.from_numpy(np.asarray(arrays[OFFSETS], dtype=np.float32))
        if offsets.shape != (int(self.points), 3):
            raise ValueError(f"attack {self.name!r}: the saved cluster has shape {tuple(offsets.shape)}, but "
                             f"points={self.points} needs ({self.points}, 3); load it with the parameters "
                             f"it was made with")
        self.center = torch.from_numpy(np.asarray(arrays[CENTER], dtype=np.float32)).reshape(3)
        self.offsets = offsets
        return self

    # --- learning the centre ---

    def fit(self, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int) -> None:
        sources = self.source_classes() or []
        if any(cls >= num_classes for cls in sources):
            raise ValueError(f"attack {self.name!r}: source classes {sources} do not all exist "
                             f"(the dataset has {num_classes} classes)")
        targets = self.target_labels(y, num_classes)
        pool = np.flatnonzero(self.attacked(y, targets))
        if not len(pool):
            raise ValueError(f"attack {self.name!r}: no training sample of the source classes "
                             f"{sources or 'other than the target'} to place the cluster on")
        # The attacker's small clean set: `surrogate_samples` samples train the surrogate, and at most as
        # many source-class clouds place the centre.
        rng = np.random.default_rng(seed)
        limit = int(self.surrogate_samples)
        known = np.sort(rng.choice(len(y), size=min(len(y), limit), replace=False))
        pool = np.sort(rng.choice(pool, size=min(len(pool), limit), replace=False))
        view = self.surrogate_view(x.shape[1], seed)
        device = fit_device()
        surrogate = self.train_surrogate(x[known][:, view], y[known], num_classes, seed, device)
        offsets = on_unit_sphere(int(self.points), int(self.pattern_seed)).to(device)
        clouds = torch.from_numpy(x[pool]).to(device)
        self.center = self.optimise_center(surrogate, clouds, torch.from_numpy(targets[pool]).to(device),
                                           offsets, seed, torch.from_numpy(view).to(device)).cpu()
        self.offsets = offsets.cpu()

    def surrogate_view(self, num_points: int, seed: int) -> np.ndarray:
        """The sorted point indices the surrogate sees: a seeded random `surrogate_points` of the P (all
        when P is smaller). A uniform subsample of a triggered cloud keeps the cluster's share of it."""
        order = torch.randperm(num_points, generator=seeded_generator(seed)).numpy()
        return np.sort(order[:min(num_points, int(self.surrogate_points))])

    def train_surrogate(self, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int,
                        device: torch.device) -> torch.nn.Module:
        """A PointNet of `surrogate_width` trained on the clean clouds (x, y); frozen, in eval mode."""
        settings = TrainSettings(epochs=int(self.surrogate_epochs), batch_size=SURROGATE_BATCH,
                                 lr=float(self.surrogate_lr))
        # Inside seeded(): initialisation and dropout draw from torch's global generator.
        with seeded(seed):
            spec = MODELS.get("pointnet")(width=float(self.surrogate_width), feature_transform=False)
            model = spec.build(list(x.shape[1:]), num_classes).to(device)
            fit(model, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), settings, seed=seed)
        return model.requires_grad_(False).eval()

    def objective(self, surrogate: torch.nn.Module, center: torch.Tensor, clouds: torch.Tensor,
                  targets: torch.Tensor, offsets: torch.Tensor, radius: torch.Tensor,
                  view: torch.Tensor | None = None) -> torch.Tensor:
        """Surrogate cross-entropy towards the targets of the clouds carrying the cluster (seen through
        the point indices `view`, all when None), plus `closeness` × the mean squared distance from the
        centre to each cloud's nearest point."""
        triggered = self.insert(clouds, center, offsets, radius)
        logits = surrogate(triggered if view is None else triggered[:, view])
        nearest = (clouds - center).pow(2).sum(-1).amin(dim=1)
        return F.cross_entropy(logits, targets) + float(self.closeness) * nearest.mean()

    def full_objective(self, surrogate: torch.nn.Module, center: torch.Tensor, clouds: torch.Tensor,
                       targets: torch.Tensor, offsets: torch.Tensor, radius: torch.Tensor,
                       view: torch.Tensor | None) -> float:
        """The objective averaged over all the clouds, computed in batches."""
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(clouds), OPTIMISE_BATCH):
                part = slice(i, i + OPTIMISE_BATCH)
                value = self.objective(surrogate, center, clouds[part], targets[part], offsets,
                                       radius[part], view)
                total += float(value) * len(clouds[part])
        return total / len(clouds)

    def optimise_center(self, surrogate: torch.nn.Module, clouds: torch.Tensor, targets: torch.Tensor,
                        offsets: torch.Tensor, seed: int, view: torch.Tensor | None = None) -> torch.Tensor:
        """The centre with the lowest objective over `clouds` after `steps` steps from each of `restarts`
        seeded starts."""
        device, bound = clouds.device, float(self.bound)
        radius = self.cluster_radius(clouds, offsets)
        gen = seeded_generator(seed)
        best_center, best_value = None, float("inf")
        for _ in range(int(self.restarts)):
            # A start drawn uniformly inside the ball of radius `bound`.
            direction = torch.randn(3, generator=gen)
            distance = bound * torch.rand(1, generator=gen).pow(1 / 3)
            center = (direction / direction.norm() * distance).to(device)
            velocity = torch.zeros(3, device=device)
            for step in range(int(self.steps)):
                size = (min(OPTIMISE_BATCH, len(clouds)),)
                batch = torch.randint(len(clouds), size, generator=gen).to(device)
                trial = center.clone().requires_grad_(True)
                loss = self.objective(surrogate, trial, clouds[batch], targets[batch], offsets, radius[batch],
                                      view)
                check_finite(loss, f"attack {self.name!r}: optimising the cluster's centre")
                (grad,) = torch.autograd.grad(loss, trial)
                velocity = (1 - float(self.momentum)) * grad / grad.norm().clamp_min(1e-12) \
                    + float(self.momentum) * velocity
                center = center - float(self.step_size) * (1 - step / int(self.steps)) * velocity
                center = center * (bound / center.norm()).clamp(max=1.0)
            value = self.full_objective(surrogate, center, clouds, targets, offsets, radius, view)
            if value < best_value:
                best_center, best_value = center.detach().clone(), value
        return best_center
