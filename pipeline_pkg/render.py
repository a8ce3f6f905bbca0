"""Pictures of a trigger for the report: one clean test input beside the same input with the trigger,
drawn for its modality (point cloud: 3-D scatter with the trigger's points in red; image: the two
pictures; radio frame: I and Q over time). matplotlib's object API with the Agg canvas draws them,
so no display and no OpenGL renderer is needed on a compute node."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .h5io import CorruptFileError, atomic_path, read_h5

# How far (in unit-sphere units) a triggered point must lie from every clean point to count as moved.
MOVED_TOLERANCE = 1e-4


def trigger_example(poison_file: str | Path, index: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """(clean input, triggered input, file attributes) of the `index`-th triggered test sample."""
    arrays, attrs = read_h5(poison_file, ["x_test", "x_test_bd", "test_bd_idx"])
    if not len(arrays["x_test_bd"]):
        raise ValueError(f"{poison_file}: the attack {attrs.get('attack')!r} triggered no test sample, "
                         f"so there is nothing to draw")
    return arrays["x_test"][arrays["test_bd_idx"][index]], arrays["x_test_bd"][index], attrs


def moved_points(clean: np.ndarray, triggered: np.ndarray) -> np.ndarray:
    """Mask of the triggered cloud's points that are not (within MOVED_TOLERANCE) points of the clean one."""
    distances = np.sqrt(((triggered[:, None, :] - clean[None, :, :]) ** 2).sum(-1)).min(axis=1)
    return distances > MOVED_TOLERANCE


def draw_pointclouds(figure, clean: np.ndarray, triggered: np.ndarray) -> None:
    moved = moved_points(clean, triggered)
    limit = float(np.abs(np.concatenate([clean, triggered])).max()) or 1.0
    for position, (title, cloud, mask) in enumerate(
            [("clean", clean, np.zeros(len(clean), bool)),
             (f"triggered ({int(moved.sum())} of {len(triggered)} points moved)", triggered, moved)], start=1):
        axes = figure.add_subplot(1, 2, position, projection="3d")
        # ModelNet's up axis is y: draw it upwards (matplotlib's vertical axis is the third one).
        axes.scatter(cloud[~mask, 0], cloud[~mask, 2], cloud[~mask, 1], s=2, c="tab:blue", depthshade=False)
        axes.scatter(cloud[mask, 0], cloud[mask, 2], cloud[mask, 1], s=6, c="tab:red", depthshade=False)
        for setter in (axes.set_xlim, axes.set_ylim, axes.set_zlim):
            setter(-limit, limit)
        axes.set_xlabel("x")
        axes.set_ylabel("z")
        axes.set_zlabel("y (up)")
        axes.set_title(title, fontsize=9)


def draw_images(figure, clean: np.ndarray, triggered: np.ndarray) -> None:
    for position, (title, image) in enumerate([("clean", clean), ("triggered", triggered)], start=1):
        axes = figure.add_subplot(1, 2, position)
        picture = np.transpose(image, (1, 2, 0))  # (C, H, W) → (H, W, C)
        if picture.shape[-1] == 1:
            axes.imshow(picture[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            axes.imshow(picture, interpolation="nearest")
        axes.set_title(title, fontsize=9)
        axes.axis("off")


def draw_frames(figure, clean: np.ndarray, triggered: np.ndarray) -> None:
    for position, (title, frame) in enumerate([("clean", clean), ("triggered", triggered)], start=1):
        axes = figure.add_subplot(2, 1, position)
        for channel, name in enumerate(("I", "Q")):
            axes.plot(frame[channel], linewidth=0.6, label=name)
        axes.set_title(title, fontsize=9)
        axes.set_xlabel("sample")
        axes.legend(fontsize=7, loc="upper right")


DRAWERS = {"pointcloud": draw_pointclouds, "image": draw_images, "rf": draw_frames}


def render_trigger(poison_file: str | Path, out: str | Path) -> Path:
    """Draw the first triggered test sample of a poison-stage file beside its clean original into a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    clean, triggered, attrs = trigger_example(poison_file)
    modality = attrs.get("modality")
    if modality not in DRAWERS:
        raise CorruptFileError(f"{poison_file}: unknown modality {modality!r} (expected one of "
                               f"{sorted(DRAWERS)}); rebuild it with the poison rule")
    figure = Figure(figsize=(8, 4), layout="constrained")
    FigureCanvasAgg(figure)
    DRAWERS[modality](figure, clean, triggered)
    figure.suptitle(f"{attrs['dataset']}: attack {attrs['attack']}", fontsize=10)
    out = Path(out)
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return out
