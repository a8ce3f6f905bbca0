"""Training throughput (clouds/s) of the point-cloud architectures, PointNet and DGCNN, through the
pipeline's own trainer (trainer.fit): the clouds live on the device, batches are index slices, the
scale/shift/jitter augmentations run batched on the device, bf16 autocast on GPU. Every (arch, batch size)
pair gets one warm-up epoch and then `repeats` timed epochs; the table reports the median. Writes a
Markdown table.

Data: ModelNet40-shaped random clouds by default (1024 points on the unit sphere's scale, 40 classes; a
machine without internet cannot fetch ModelNet40), or the training clouds of a dataset file the pipeline
built (--data results/data/modelnet40.h5).

    python benchmarks/pointcloud_throughput.py --out benchmarks/results/throughput-pointcloud-gpu.md
    python benchmarks/pointcloud_throughput.py --width 0.25 --samples 256 --points 256 --out /tmp/t.md
"""

from __future__ import annotations

import platform
import statistics
import time

import click
import numpy as np
import torch

from pipeline_pkg.h5io import read_h5
from pipeline_pkg.models import count_parameters
from pipeline_pkg.pointcloud import normalize_unit_sphere
from pipeline_pkg.registry import MODELS
from pipeline_pkg.runtime import pick_device
from pipeline_pkg.trainer import TrainSettings, fit
from report import publish  # benchmarks/report.py: scripts run from this folder

AUGMENT = ["scale", "shift", "jitter"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_clouds(data: str | None, n: int, points: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if data:
        arrays, _ = read_h5(data, ["x_train", "y_train"])
        return arrays["x_train"][:n].astype(np.float32), arrays["y_train"][:n].astype(np.int64)
    gen = torch.Generator().manual_seed(seed)
    x = normalize_unit_sphere(torch.randn(n, points, 3, generator=gen)).numpy()
    return x, torch.randint(0, classes, (n,), generator=gen).numpy().astype(np.int64)


@click.command()
@click.option("--arch", "archs", multiple=True, default=["pointnet", "dgcnn"], show_default=True,
              help="point-cloud architecture(s); repeat the option for several")
@click.option("--width", default=None, type=float, help="the archs' width multiplier (default: their own, 1.0)")
@click.option("--data", default=None, help="a dataset HDF5 file built by the pipeline (default: random clouds)")
@click.option("--points", default=1024, show_default=True, help="points per random cloud")
@click.option("--classes", default=40, show_default=True, help="classes of the random labels")
@click.option("--samples", default=2048, show_default=True, help="training clouds per timed epoch")
@click.option("--batch-size", "batch_sizes", multiple=True, type=int, default=[32, 64], show_default=True,
              help="batch size(s); repeat the option for several")
@click.option("--repeats", default=3, show_default=True, help="timed epochs per (arch, batch size) (median reported)")
@click.option("--threads", default=2, show_default=True, help="torch CPU threads")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Markdown file to write")
def main(archs, width, data, points, classes, samples, batch_sizes, repeats, threads, out) -> None:
    torch.set_num_threads(threads)
    device = pick_device("auto")
    x, y = load_clouds(data, samples, points, classes, seed=0)
    for batch_size in batch_sizes:
        if len(x) % batch_size == 1:
            # BatchNorm in the heads cannot train on a last batch of one cloud.
            raise click.BadParameter(f"{len(x)} clouds leave a last batch of 1 at batch size {batch_size}; "
                                     f"choose another --samples", param_hint="--samples")
    num_classes = int(y.max()) + 1
    x_dev, y_dev = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    rows = []
    for arch in archs:
        spec = MODELS.get(arch)(**({"width": width} if width else {}))
        for batch_size in batch_sizes:
            torch.manual_seed(0)
            model = spec.build(list(x.shape[1:]), num_classes).to(device)
            settings = TrainSettings(epochs=1, batch_size=batch_size, lr=0.001, optimizer="adamw")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            fit(model, x_dev, y_dev, settings, seed=0, augment=AUGMENT)  # warm-up: allocator, kernel choice
            times = []
            for epoch in range(repeats):
                synchronize(device)
                started = time.perf_counter()
                fit(model, x_dev, y_dev, settings, seed=epoch + 1, augment=AUGMENT)
                synchronize(device)
                times.append(time.perf_counter() - started)
            seconds = statistics.median(times)
            memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            rows.append((arch, count_parameters(model), batch_size, seconds, len(x) / seconds, memory))
            print(f"{arch} batch {batch_size}: {len(x) / seconds:.0f} clouds/s", flush=True)
            del model
    where = (torch.cuda.get_device_name() if device.type == "cuda"
             else f"CPU ({platform.processor() or platform.machine()}, {threads} threads)")
    memory_header = " peak GPU memory GiB |" if device.type == "cuda" else ""
    lines = [
        "# Training throughput: point-cloud architectures",
        "",
        (f"Device: {where}. Data: {data or f'random clouds ({x.shape[1]} points, {num_classes} classes)'}, "
         f"{len(x)} clouds per epoch, augmentations {'/'.join(AUGMENT)} on the device, "
         f"{'bf16 autocast, ' if device.type == 'cuda' else ''}the pipeline's trainer (trainer.fit, AdamW); "
         f"median of {repeats} epochs after one warm-up epoch. Width: {width or 'the archs’ default (1.0)'}."),
        "",
        "| arch | parameters | batch | median epoch s | clouds/s |" + memory_header,
        "| --- | --- | --- | --- | --- |" + (" --- |" if memory_header else ""),
        *(f"| {arch} | {params / 1e6:.2f} M | {batch} | {seconds:.3f} | {rate:.0f} |"
          + (f" {memory:.2f} |" if memory_header else "")
          for arch, params, batch, seconds, rate, memory in rows),
        "",
        "Command: `python benchmarks/pointcloud_throughput.py " + " ".join(
            [f"--arch {a}" for a in archs] + [f"--batch-size {b}" for b in batch_sizes]
            + [f"--{k.replace('_', '-')} {v}" for k, v in [("width", width), ("data", data), ("points", points),
                                                           ("classes", classes), ("samples", samples),
                                                           ("repeats", repeats), ("threads", threads)]
               if v is not None]) + "`",
    ]
    text = "\n".join(lines) + "\n"
    publish(text, out)


if __name__ == "__main__":
    main()
