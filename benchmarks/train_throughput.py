"""Training throughput (images/s) of the pipeline's device-resident path against a conventional
per-sample DataLoader path, on the same model, side by side in one run; writes a Markdown table.

  resident    the pipeline's own trainer (trainer.fit): the uint8 dataset lives on the device, batches
              are index slices, crop/flip run batched on the device, no per-sample Python.
  dataloader  a torch Dataset whose __getitem__ crops and flips one image at a time, batched by a
              DataLoader with worker processes and copied to the device every step.
Both use the same model, optimizer, loss, bf16 autocast and channels-last on GPU: only the data path
differs. Data: CIFAR-shaped random tensors by default (a machine without internet cannot fetch
CIFAR-10), or the images of a dataset file the pipeline built (--data results/data/cifar10.h5).

    python benchmarks/train_throughput.py --arch resnet9 --out benchmarks/results/throughput-cpu.md
"""

from __future__ import annotations

import platform
import statistics
import time

import click
import numpy as np
import torch
import torch.nn.functional as F

from pipeline_pkg.h5io import read_h5
from pipeline_pkg.registry import MODELS
from pipeline_pkg.runtime import autocast, pick_device
from pipeline_pkg.trainer import TrainSettings, fit, make_optimizer
from report import publish  # benchmarks/report.py: scripts run from this folder


class PerSampleImages(torch.utils.data.Dataset):
    """The conventional path: one image at a time, padded, cropped and flipped in Python."""

    def __init__(self, x: np.ndarray, y: np.ndarray, pad: int, flip: bool):
        self.x, self.y, self.pad, self.flip = x, y, pad, flip

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        image = torch.from_numpy(self.x[i]).float() / 255
        padded = F.pad(image, (self.pad,) * 4)
        dy, dx = np.random.randint(0, 2 * self.pad + 1, size=2)
        image = padded[:, dy:dy + image.shape[1], dx:dx + image.shape[2]]
        if self.flip and np.random.rand() < 0.5:
            image = image.flip(-1)
        return image, int(self.y[i])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def dataloader_epoch(model, loader, optimizer, device, settings: TrainSettings) -> None:
    model.train()
    channels_last = device.type == "cuda"
    for xb, yb in loader:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            loss = F.cross_entropy(model(xb), yb, label_smoothing=float(settings.label_smoothing))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def load_images(data: str | None, n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if data:
        arrays, _ = read_h5(data, ["x_train", "y_train"])
        return arrays["x_train"][:n], arrays["y_train"][:n].astype(np.int64)
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


@click.command()
@click.option("--arch", default="resnet9", show_default=True)
@click.option("--width", default=None, type=int, help="the arch's width parameter (default: its own)")
@click.option("--data", default=None, help="a dataset HDF5 file built by the pipeline (default: random CIFAR-shaped)")
@click.option("--samples", default=2048, show_default=True, help="training images per timed epoch")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="timed epochs per path (median reported)")
@click.option("--workers", default=2, show_default=True, help="DataLoader worker processes")
@click.option("--threads", default=2, show_default=True, help="torch CPU threads")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Markdown file to write")
def main(arch, width, data, samples, batch_size, repeats, workers, threads, out) -> None:
    torch.set_num_threads(threads)
    device = pick_device("auto")
    x, y = load_images(data, samples, 32, seed=0)
    spec = MODELS.get(arch)(**({"width": width} if width else {}))
    model = spec.build(list(x.shape[1:]), int(y.max()) + 1).to(device)
    settings = TrainSettings(epochs=1, batch_size=batch_size, lr=0.01, optimizer="sgd", label_smoothing=0.2)
    x_dev, y_dev = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    loader = torch.utils.data.DataLoader(
        PerSampleImages(x, y, pad=4, flip=True), batch_size=batch_size, shuffle=True, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=False)
    optimizer = make_optimizer(model.parameters(), settings)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    def resident(epoch: int) -> None:
        fit(model, x_dev, y_dev, settings, seed=epoch, augment=["crop", "flip"])

    def conventional(epoch: int) -> None:
        dataloader_epoch(model, loader, optimizer, device, settings)

    times: dict[str, list[float]] = {"resident": [], "dataloader": []}
    for path in times:
        run = resident if path == "resident" else conventional
        run(-1)  # warm-up: allocator, cuDNN autotuning, worker start-up
        for epoch in range(repeats):
            synchronize(device)
            started = time.perf_counter()
            run(epoch)
            synchronize(device)
            times[path].append(time.perf_counter() - started)
    rate = {path: samples / statistics.median(t) for path, t in times.items()}
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {threads} threads)"
    lines = [
        f"# Training throughput: device-resident vs per-sample DataLoader ({arch})",
        "",
        f"Device: {where}. Data: {data or 'random CIFAR-shaped uint8 (3×32×32)'}, {samples} images per epoch, "
        f"batch {batch_size}, crop (pad 4) + flip, {workers} DataLoader workers, median of {repeats} epochs "
        f"after one warm-up epoch each.",
        "",
        "| path | median epoch s | images/s |",
        "| --- | --- | --- |",
        *(f"| {p} | {statistics.median(t):.3f} | {rate[p]:.0f} |" for p, t in times.items()),
        "",
        f"Speed-up of the resident path: **{rate['resident'] / rate['dataloader']:.2f}×**.",
        "",
        "Command: `python benchmarks/train_throughput.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in [("arch", arch), ("width", width), ("data", data),
                                                         ("samples", samples), ("batch_size", batch_size),
                                                         ("repeats", repeats), ("workers", workers),
                                                         ("threads", threads)] if v is not None) + "`",
    ]
    text = "\n".join(lines) + "\n"
    publish(text, out)


if __name__ == "__main__":
    main()
