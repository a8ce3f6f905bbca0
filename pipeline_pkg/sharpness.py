"""Sharpness of the loss surface on clean data: λ_max of the Hessian (power iteration on Hessian-vector
products) and Tr(H) (Hutchinson). FIP's premise is that backdoored models sit in sharper minima than
benign ones and purified models in smoother ones; the evaluate stage measures both so a benchmark can
check that premise per modality (`measure`: both numbers and how they were obtained; `sharpness`: the
two numbers alone).

What is measured, and how it is made trustworthy:

* The loss is the mean cross-entropy over `n` clean test samples, the model in eval mode (running
  BatchNorm statistics, no dropout), so the numbers depend on the weights alone. The samples are all of
  the test set or a fixed random subset of it (`sample_indices`), the same for every method of a run.
* Always in (at least) float32: outside any autocast region, with half-precision weights promoted to a
  float32 copy and uint8 images converted to floats in [0, 1] as the image models do themselves.
* The samples are processed in chunks of `batch_size`: the Hessian of the mean loss is the chunk-size-
  weighted sum of the chunks' Hessians of their mean losses (exactly, as every sample's loss depends on
  the weights alone in eval mode), so memory stays bounded by one chunk's double-backward graph. With a
  single chunk its gradient graph is built once and reused by every product.
* `lambda_max` is the largest (algebraic) eigenvalue. Power iteration finds the eigenvalue of largest
  magnitude; it stops when the Rayleigh quotient changes by less than `tol` (relative) between two
  iterations, or after `max_iterations`. Should that eigenvalue be negative (a saddle more concave than
  convex; not seen on trained models), a second power iteration on H − λ_dominant·I, whose spectrum is
  shifted to be non-negative, finds the largest eigenvalue instead. `sharpness_iterations` counts the
  Hessian-vector products both spent, `sharpness_converged` says whether the tolerance was met.
* `hessian_trace` is Hutchinson's mean of zᵀHz over `probes` Rademacher vectors z: unbiased, with a
  standard deviation of sqrt(2 Σ_{i≠j} H_ij² / probes).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: `sharpness_samples` value meaning every test sample.
ALL = "all"
#: The keys of `measure`'s report, which the evaluate stage adds to a metrics dict.
KEYS = ("lambda_max", "hessian_trace", "sharpness_samples", "sharpness_iterations", "sharpness_converged")
#: Seed of the random subset of test samples: fixed, so every method and seed of a run is measured on
#: the same samples.
SUBSET_SEED = 0
_HALF = (torch.float16, torch.bfloat16)


def sample_count(setting: int | str | None, available: int) -> int:
    """How many samples `evaluate.sharpness_samples` asks for: every one for "all" (or None), else
    min(setting, available); 0 turns the measurement off."""
    if setting is None or setting == ALL:
        return available
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(f"sharpness_samples is {setting!r}; use a count >= 0 or {ALL!r}")
    return min(setting, available)


def sample_indices(available: int, n: int) -> torch.Tensor:
    """Indices of the `n` of `available` test samples to measure on: all of them in order, or a fixed
    random subset (sorted), so that a dataset stored in class order is not measured on a few classes."""
    if n >= available:
        return torch.arange(available)
    gen = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(available, generator=gen)[:n].sort().values


def full_precision(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """The model with weights in float32 (a copy if they were half precision; float64 stays) and `x` as
    floats of the same dtype: uint8 images become [0, 1], which the image models take as they are."""
    dtypes = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    if dtypes & set(_HALF):
        model = copy.deepcopy(model).float()
        dtypes = {torch.float32}
    dtype = torch.float64 if dtypes == {torch.float64} else torch.float32
    if x.dtype == torch.uint8:
        x = x.to(dtype) / 255.0
    elif x.is_floating_point():
        x = x.to(dtype)
    return model, x


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A region where any enclosing autocast (pipeline_pkg.runtime.autocast) is switched off."""
    kind = device.type if device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
    return torch.autocast(kind, enabled=False)


class Hessian:
    """Products of the Hessian of the mean cross-entropy over (x, y), in the model's trainable
    parameters, with flat vectors; the samples in chunks of `batch_size` (see the module docstring).
    The model must be in eval mode and in full precision (`full_precision`)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512):
        if len(x) == 0:
            raise ValueError("no samples to measure the Hessian on")
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}; it must be at least 1")
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.chunks = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        self.weights = [len(cx) / len(x) for cx, _ in self.chunks]
        self._cached: tuple | None = None  # the gradient graph, when there is a single chunk

    def _gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        with torch.enable_grad():
            loss = F.cross_entropy(self.model(x), y)
            return torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)

    def _product(self, grads: tuple, vector: torch.Tensor, retain: bool) -> torch.Tensor:
        pieces = vector.split(self.sizes)
        terms = [(g * v.view_as(g)).sum() for g, v in zip(grads, pieces) if g is not None and g.requires_grad]
        if not terms:  # a loss linear in every parameter
            return torch.zeros_like(vector)
        with torch.enable_grad():
            hv = torch.autograd.grad(sum(terms), self.params, retain_graph=retain, allow_unused=True)
        return torch.cat([(h if h is not None else torch.zeros_like(p)).detach().reshape(-1)
                          for h, p in zip(hv, self.params)])

    def matvecs(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """[H v for v in vectors]: one gradient graph per chunk serves all of them."""
        if len(self.chunks) == 1:
            if self._cached is None:
                self._cached = self._gradients(*self.chunks[0])
            return [self._product(self._cached, v, retain=True) for v in vectors]
        out = [torch.zeros_like(v) for v in vectors]
        for (cx, cy), weight in zip(self.chunks, self.weights):
            grads = self._gradients(cx, cy)
            for i, v in enumerate(vectors):
                out[i].add_(self._product(grads, v, retain=i < len(vectors) - 1), alpha=weight)
            del grads
        return out

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        return self.matvecs([vector])[0]


@dataclass
class Eigen:
    value: float
    iterations: int  # matrix-vector products used
    converged: bool


def _power(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, max_iterations: int,
           tol: float) -> Eigen:
    """The eigenvalue of largest magnitude (with its sign), as the Rayleigh quotient of the iterate."""
    vector = start / start.norm()
    previous = None
    for k in range(1, max_iterations + 1):
        hv = matvec(vector)
        quotient = float(torch.dot(vector, hv))
        norm = float(hv.norm())
        if norm == 0.0 or not math.isfinite(norm):
            return Eigen(quotient if math.isfinite(quotient) else math.nan, k, norm == 0.0)
        vector = hv / norm
        if previous is not None and abs(quotient - previous) <= tol * abs(quotient):
            return Eigen(quotient, k, True)
        previous = quotient
    return Eigen(quotient, max_iterations, False)


def top_eigenvalue(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, *, max_iterations: int = 100,
                   tol: float = 1e-3, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> Eigen:
    """The largest eigenvalue of the symmetric operator `matvec` on R^dim, by power iteration from a
    seeded Gaussian start (see the module docstring for a negative dominant eigenvalue)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(dim, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    dominant = _power(matvec, start, max_iterations, tol)
    if not dominant.value < 0:
        return dominant
    shift = dominant.value
    start = torch.randn(dim, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    shifted = _power(lambda v: matvec(v) - shift * v, start, max_iterations, tol)
    return Eigen(shifted.value + shift, dominant.iterations + shifted.iterations, shifted.converged)


def hutchinson_trace(matvecs: Callable[[list[torch.Tensor]], list[torch.Tensor]], dim: int, *,
                     probes: int = 10, seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu", group: int = 8) -> float:
    """Hutchinson's estimate of Tr(H): the mean of zᵀHz over `probes` seeded Rademacher vectors z,
    `group` of them per call of `matvecs`."""
    gen = torch.Generator().manual_seed(seed)
    total, left = 0.0, probes
    while left > 0:
        batch = [(torch.randint(0, 2, (dim,), generator=gen) * 2 - 1).to(device=device, dtype=dtype)
                 for _ in range(min(group, left))]
        total += sum(float(torch.dot(z, hz)) for z, hz in zip(batch, matvecs(batch)))
        left -= len(batch)
    return total / probes


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, max_iterations: int = 100,
            tol: float = 1e-3, probes: int = 10, seed: int = 0, batch_size: int = 512) -> dict:
    """λ_max and Tr(H) of the mean cross-entropy on (x, y) (module docstring), with how they were
    obtained: {"lambda_max", "hessian_trace", "sharpness_samples", "sharpness_iterations",
    "sharpness_converged"} (KEYS). The model's train/eval mode is restored afterwards."""
    was_training = model.training
    measured, x = full_precision(model, x)
    measured.eval()
    try:
        with no_autocast(x.device):
            hessian = Hessian(measured, x, y.to(x.device), batch_size)
            place = {"dtype": hessian.dtype, "device": hessian.device}
            top = top_eigenvalue(hessian, hessian.dim, max_iterations=max_iterations, tol=tol, seed=seed, **place)
            # A seed of its own for the probes, so that they are not the start vectors' draws.
            trace = hutchinson_trace(hessian.matvecs, hessian.dim, probes=probes, seed=seed + 1_000_003, **place)
    finally:
        model.train(was_training)
    return {"lambda_max": top.value, "hessian_trace": trace, "sharpness_samples": len(x),
            "sharpness_iterations": top.iterations, "sharpness_converged": top.converged}


def sharpness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, iterations: int = 100, tol: float = 1e-3,
              probes: int = 10, seed: int = 0, batch_size: int = 512) -> dict[str, float]:
    """{"lambda_max": ..., "hessian_trace": ...} as `measure` finds them, `iterations` the most power
    iterations."""
    found = measure(model, x, y, max_iterations=iterations, tol=tol, probes=probes, seed=seed, batch_size=batch_size)
    return {"lambda_max": found["lambda_max"], "hessian_trace": found["hessian_trace"]}
