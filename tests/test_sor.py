"""The `sor` test-time defense: statistical outlier removal removes exactly an obvious outlier cluster,
refills the cloud with kept points only, hands the filtered batch to the wrapped model, leaves a clean
cloud nearly whole, and refuses inputs that are not point clouds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.defenses.sor import SORFiltered
from pipeline_pkg.registry import DEFENSES

SPHERE_POINTS = 256
OUTLIERS = 8
CLUSTER_CENTRE = torch.tensor([3.0, 3.0, 3.0])


def fibonacci_sphere(count: int) -> torch.Tensor:
    """Evenly spread points on the unit sphere: every point has the same neighbourhood density."""
    i = torch.arange(count, dtype=torch.float64) + 0.5
    y = 1 - 2 * i / count
    radius = torch.sqrt(1 - y**2)
    angle = math.pi * (3 - math.sqrt(5)) * i
    return torch.stack([radius * torch.cos(angle), y, radius * torch.sin(angle)], dim=1).float()


def sphere_with_outliers(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A sphere plus a tight cluster far away, the cluster's points scattered through the cloud's order.
    Returns the cloud (P, 3) and the mask of outlier rows."""
    g = torch.Generator().manual_seed(seed)
    cluster = CLUSTER_CENTRE + 0.02 * torch.randn(OUTLIERS, 3, generator=g)
    cloud = torch.cat([fibonacci_sphere(SPHERE_POINTS), cluster])
    order = torch.randperm(len(cloud), generator=g)
    is_outlier = torch.arange(len(cloud)) >= SPHERE_POINTS
    return cloud[order], is_outlier[order]


def random_sphere(count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(count, 3, generator=g)
    return points / points.norm(dim=1, keepdim=True)


class Recorder(nn.Module):
    """Stands in for a classifier: remembers its input, returns one score per cloud."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.detach().clone()
        return (x * self.scale).sum(dim=(1, 2))[:, None]


def rows_in(points: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """For each row of `points`, whether it is exactly one of the rows of `reference`."""
    return (points[:, None] == reference[None]).all(-1).any(-1)


def test_removes_exactly_the_outlier_cluster_and_refills_with_kept_points() -> None:
    cloud, is_outlier = sphere_with_outliers()
    defense = DEFENSES.get("sor")()
    assert (defense.neighbors, defense.std_ratio) == (20, 2.0)
    filtered = defense.wrap(Recorder()).filter(cloud[None])[0]

    assert filtered.shape == cloud.shape
    # None of the cluster survives, and every point is an original inlier...
    assert (filtered - CLUSTER_CENTRE).norm(dim=1).min() > 3.0
    assert rows_in(filtered, cloud[~is_outlier]).all()
    # ...and every inlier is kept: exactly the outliers were removed.
    assert rows_in(cloud[~is_outlier], filtered).all()
    # Kept points first, in their order, then the first kept points again in place of the removed ones.
    assert torch.equal(filtered[:SPHERE_POINTS], cloud[~is_outlier])
    assert torch.equal(filtered[SPHERE_POINTS:], cloud[~is_outlier][:OUTLIERS])


def test_wrapped_model_sees_the_filtered_batch_and_gradients_reach_kept_points() -> None:
    cloud, is_outlier = sphere_with_outliers(seed=1)
    clean = random_sphere(SPHERE_POINTS + OUTLIERS, seed=2)
    batch = torch.stack([cloud, clean]).requires_grad_(True)
    inner = Recorder().eval()
    defense = DEFENSES.get("sor")()
    wrapped = defense.purify(inner, batch.detach(), torch.zeros(2, dtype=torch.long), seed=0)

    assert isinstance(wrapped, SORFiltered) and wrapped.model is inner
    assert not wrapped.training and defense.tunable_parameters == 0
    assert type(defense).test_time is True
    scores = wrapped(batch)
    assert torch.equal(inner.seen, wrapped.filter(batch.detach()))
    assert torch.equal(scores.detach(), inner(inner.seen))
    assert (inner.seen[0] - CLUSTER_CENTRE).norm(dim=1).min() > 3.0

    scores.sum().backward()
    grad = batch.grad[0]
    assert (grad[is_outlier] == 0).all()  # removed points do not reach the model
    assert (grad[~is_outlier] != 0).all()


def test_a_clean_cloud_passes_nearly_unchanged() -> None:
    clean = random_sphere(512, seed=3)
    filtered = DEFENSES.get("sor")().wrap(Recorder()).filter(clean[None])[0]
    assert rows_in(filtered, clean).all()
    kept = torch.unique(filtered, dim=0)
    assert len(kept) >= 0.95 * len(clean)


def test_reloading_from_stored_parameters_gives_the_same_filter() -> None:
    cloud, _ = sphere_with_outliers(seed=4)
    defense = DEFENSES.get("sor")(neighbors=10, std_ratio=1.0)
    stored = {"name": "sor", **defense.params}  # what the pipeline keeps in the checkpoint
    params = dict(stored)
    again = DEFENSES.get(params.pop("name"))(**params).wrap(Recorder())
    assert (again.neighbors, again.std_ratio) == (10, 1.0)
    assert torch.equal(again.filter(cloud[None]), defense.wrap(Recorder()).filter(cloud[None]))
    # On an unevenly sampled sphere, a stricter ratio removes more: the parameters are really used.
    clean = random_sphere(512, seed=5)[None]
    strict, loose = (len(torch.unique(DEFENSES.get("sor")(std_ratio=ratio).wrap(Recorder()).filter(clean)[0], dim=0))
                     for ratio in (0.5, 3.0))
    assert strict < loose


def test_refuses_inputs_that_are_not_point_clouds() -> None:
    defense = DEFENSES.get("sor")()
    images = torch.rand(4, 3, 8, 8)
    with pytest.raises(ValueError, match="defense 'sor' filters point clouds.*point-cloud datasets"):
        defense.purify(Recorder(), images, torch.zeros(4, dtype=torch.long), seed=0)
    with pytest.raises(ValueError, match="sor"):
        defense.wrap(Recorder())(torch.rand(2, 16, 2))


@pytest.mark.parametrize("params, key", [({"neighbors": 0}, "neighbors"), ({"neighbors": 2.5}, "neighbors"),
                                         ({"std_ratio": 0}, "std_ratio")])
def test_bad_parameters(params: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        DEFENSES.get("sor")(**params)
