"""Device choice, seeding and batching shared by the trainer, the defenses and the evaluator."""

from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterator

import numpy as np
import torch


def pick_device(requested: str | None = None) -> torch.device:
    """`auto`/None → CUDA when present, else CPU."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed every generator; on CPU also ask torch for deterministic kernels, so equal seeds give
    equal models."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(int(threads))
    if not torch.cuda.is_available():
        deterministic_algorithms()


def deterministic_algorithms() -> None:
    """torch.use_deterministic_algorithms(True) without its import of the inductor compiler, which
    only sets the compiler's own flag and costs about a second in every job; nothing here compiles."""
    set_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_flag is None:  # a torch without the private setter: pay the import
        torch.use_deterministic_algorithms(True)
    else:
        set_flag(True)


PRECISIONS = ("auto", "bf16", "fp32")
_precision = "auto"


def set_precision(mode: str) -> None:
    """The config's `precision` for this process's autocast: `auto` (bf16 on GPU, fp32 on CPU), `bf16`
    (on CPU too, where the CPU has bf16 instructions) or `fp32`."""
    global _precision
    if mode not in PRECISIONS:
        raise ValueError(f"precision is {mode!r}; use one of {', '.join(PRECISIONS)}")
    _precision = mode


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 or AMX); elsewhere it emulates it, slowly."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU; on CPU full precision unless the config asks for bf16 (about 1.3–2× faster
    training where the CPU has bf16 instructions, but no longer bit-reproducible for every model)."""
    if _precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if _precision == "bf16" and device.type == "cpu" and cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The sample order of one epoch, derived from (seed, epoch) alone, so a resumed job sees exactly
    the order an uninterrupted one would have."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


def minibatches(x: torch.Tensor, y: torch.Tensor, batch_size: int, order: torch.Tensor | None = None,
                training: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Slices of device-resident tensors: no per-sample Python and no host-device copies in the loop.
    For `training`, a trailing batch of one sample is skipped: BatchNorm after a pooled layer (PointNet's
    and DGCNN's heads) cannot normalise a single value."""
    n = len(x)
    for start in range(0, n, batch_size):
        if training and n - start == 1 and n > 1:
            return
        idx = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
        yield x[idx], y[idx]


def clean_batch_size(batch_size: int, budget: int) -> int:
    """The batch size a step-based defense draws from a clean budget of `budget` samples: `batch_size`,
    but at most half the budget. A batch as large as the budget is the same full batch at every step, a
    gradient the model memorises within a few steps (on 70 digits with batch 128, ‖∇CE‖ fell to 0.0025);
    halves drawn from a fresh shuffle each epoch differ from step to step, as the papers' 500-sample
    clean sets in batches of 128 do."""
    # At least 2 where the budget allows: BatchNorm after a pooled layer cannot train on one sample.
    return max(min(2, budget), min(batch_size, budget // 2))


class InfiniteBatches:
    """Endless shuffled batches of a small clean budget, for step-based defenses (`clean_batch_size`
    decides their size); `augment`, if given, maps each batch of inputs to an augmented one
    (pipeline_pkg.augment.augmenter)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.x, self.y = x, y
        self.augment = augment
        self.batch_size = clean_batch_size(batch_size, len(x))
        self.seed = seed
        self.epoch = 0
        self._iter: Iterator | None = None

    def __iter__(self) -> "InfiniteBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._iter is None:
                order = epoch_order(len(self.x), self.seed, self.epoch, self.x.device)
                self._iter = minibatches(self.x, self.y, self.batch_size, order, training=True)
                self.epoch += 1
            try:
                xb, yb = next(self._iter)
            except StopIteration:
                self._iter = None
                continue
            return (self.augment(xb) if self.augment is not None else xb), yb
