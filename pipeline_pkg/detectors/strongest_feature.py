"""`strongest_feature`: detection as finding the strongest feature (Khaddaj et al., ICML 2023, "Rethinking
Backdoor Attacks").

A backdoor trigger is, to the learner, the strongest feature of the training set: the poisoned samples
support each other's predictions far more than any other group of samples of that size does. The method
measures how much every training sample influences every other one, then looks for the set of samples
with the largest total mutual influence.

1. Influence matrix with TRAK (Park et al., ICML 2023), train × train, over the given checkpoints:
   M[i, j] = influence of training sample i on the model's margin for sample j. The paper uses
   datamodels, which need thousands of retrainings; TRAK estimates them from gradients: per checkpoint,
   the per-sample margin gradients G projected by a Gaussian matrix P to proj_dim dimensions, Φ = GP,
   give the kernel Φ(ΦᵀΦ)⁻¹Φᵀ; the checkpoints' kernels are averaged. We compute this ourselves rather
   than with the `traker` package, whose CPU projector draws P anew for every batch and which takes the
   gradients twice (once to featurize, once to score), where targets that are the training set need one
   pass: the matrix of the default digits job (3 checkpoints, 1277 samples) went from ~105 s to 23 s.
2. For each size k of a geometric range, `restarts` swap local searches from random sets maximise
   Σ_{i≠j ∈ S} M[i, j] − (k/N) Σ_{i ∈ S} Σ_{j≠i} M[i, j] (the paper's correction: minus the influence each
   member is expected to have on a random set of size k; pipeline_pkg.detectors.maxsum).
3. A sample's score is Σ_k [sample in the best set of size k] / k: the small sets weigh most.

Choices that depart from TRAK's or the official code's defaults, each a parameter:

- loss_weighting false: TRAK multiplies sample i's row by its average 1 − p(label), the out-to-loss term of
  the logistic loss. A strong trigger is fit within the first epochs, so that term is ~0 for exactly the
  poisoned samples, and their rows vanish: on small synthetic patch attacks where the attack reached
  ≥ 99.6% success, the loss-weighted matrix ranked the poisons below chance (AUROC 0.26–0.45), the
  unweighted one found them (0.92–1.00). Without the term M is TRAK's kernel φ_i (ΦᵀΦ)⁻¹ φ_j: how strongly
  the trained function ties the margins of i and j together. (Where a trigger is only partly learned,
  the weighted matrix can do better: one such run of ours had 0.999 weighted, 0.66 unweighted.)
- max_proj_share 0.08: TRAK's projection is capped at 8% of N. The kernel inverts ΦᵀΦ estimated from N
  projected gradients; as proj_dim nears N, its off-diagonal entries drown in noise (on 400 samples,
  projections of 32% and 64% of N ranked the poisons at chance where 8% found them). TRAK's 2048 on
  CIFAR-10's 50 000 samples is 4%.
- aggregate "best": the official code (github.com/MadryLab/rethinking-backdoor-attacks) instead counts
  every restart's local optimum ("restarts": Σ_k share of restarts containing the sample / k); that spreads
  votes over whichever groups the restarts happened to fall into, and ranked the poisons lower in our
  trials.

The default sizes are the official ones for CIFAR-10 (k = 10 … 5120 doubling on 50 000 samples) as shares
of N, so they scale with the training set; sizes below 2 are raised to 2. The influence matrix is N × N
float32 (10 GB for 50 000 samples), its symmetrised copy as much again."""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from ..registry import DETECTORS
from .base import Detector
from .maxsum import check_size, expected_influence_correction, local_search, pairwise_weights, weight_range

log = logging.getLogger(__name__)

AGGREGATES = ("best", "restarts")


def subset_sizes(k_min: float, k_max: float, count: int, n: int) -> list[int]:
    """`count` geometrically spaced set sizes from k_min to k_max, each a share of n when ≤ 1 and a
    number of samples otherwise; rounded, clipped to [2, n − 1], without repeats."""
    def as_count(k: float) -> float:
        return float(k) * n if float(k) <= 1 else float(k)

    low, high = as_count(k_min), as_count(k_max)
    if low > high:
        raise ValueError(f"strongest_feature: the smallest subset size k_min ({low:g} samples) exceeds the "
                         f"largest, k_max ({high:g} samples)")
    sizes = np.geomspace(max(low, 1.0), max(high, 1.0), int(count))
    return sorted({int(min(max(round(k), 2), n - 1)) for k in sizes})


# P is drawn in fixed chunks of this many rows (parameters), each from its own seeded generator, so that
# it is the same matrix whether it is kept whole or regenerated chunk by chunk for every batch.
PROJECTION_CHUNK_ROWS = 1 << 14
# Above this size (parameters × proj_dim × 4 bytes) P is not kept but regenerated for every batch, as
# TRAK's own CPU projector does (ResNet-18's 11 M parameters × 2048 would take 90 GB).
PROJECTION_BUDGET_BYTES = 1 << 30


class GaussianProjection:
    """The projection P (parameters × dim, entries N(0, 1)) of one checkpoint. Its scale does not matter:
    the kernel Φ(ΦᵀΦ)⁻¹Φᵀ is the same for Φ = GP and Φ = cGP."""

    def __init__(self, parameter_count: int, dim: int, seed: int, checkpoint: int, device: torch.device,
                 budget_bytes: int = PROJECTION_BUDGET_BYTES):
        self.parameter_count, self.dim, self.device = parameter_count, dim, device
        self.chunk_rows = PROJECTION_CHUNK_ROWS
        # One generator seed per chunk from (seed, checkpoint, chunk). Like TRAK (whose projector seeds
        # with the model id), every checkpoint gets its own projection: the ensemble averages its noise.
        self.chunk_seeds = [int(np.random.SeedSequence([seed, checkpoint, chunk]).generate_state(1)[0])
                            for chunk in range(len(self.chunks()))]
        self.matrix = None
        if parameter_count * dim * 4 <= budget_bytes:
            self.matrix = torch.empty(parameter_count, dim, device=device)
            for chunk, rows in enumerate(self.chunks()):
                self.draw(chunk, self.matrix[rows])

    def chunks(self) -> list[slice]:
        return [slice(start, min(start + self.chunk_rows, self.parameter_count))
                for start in range(0, self.parameter_count, self.chunk_rows)]

    def draw(self, chunk: int, out: torch.Tensor) -> None:
        generator = torch.Generator(device=self.device).manual_seed(self.chunk_seeds[chunk])
        out.normal_(generator=generator)

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        """gradients (batch × parameter_count) @ P."""
        if self.matrix is not None:
            return gradients @ self.matrix
        projected = torch.zeros(len(gradients), self.dim, device=self.device)
        block = torch.empty(self.chunk_rows, self.dim, device=self.device)
        for chunk, rows in enumerate(self.chunks()):
            part = block[:rows.stop - rows.start]
            self.draw(chunk, part)
            projected.addmm_(gradients[:, rows], part)
        return projected


def margin_gradients(model: torch.nn.Module, parameters: dict, buffers: dict, x: torch.Tensor,
                     y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients (batch × parameters, flattened in `parameters`' order) of the margin
    f(x) = logit_y − log Σ_{c≠y} exp(logit_c) = log p/(1 − p), and the margins. Each sample goes through
    the model alone (vmap), so this works on any input a classifier takes (images, RF frames, point
    clouds) and with BatchNorm in eval mode."""
    def margin(params, sample, label):
        logits = torch.func.functional_call(model, (params, buffers), (sample.unsqueeze(0),))[0]
        is_label = torch.arange(len(logits), device=logits.device) == label
        return (logits.gather(0, label.unsqueeze(0))[0]
                - logits.masked_fill(is_label, float("-inf")).logsumexp(0))

    per_sample = torch.func.vmap(torch.func.grad_and_value(margin), in_dims=(None, 0, 0))
    grads, margins = per_sample(parameters, x, y)
    return torch.cat([grads[name].reshape(len(x), -1) for name in parameters], 1), margins


def projection_kernel(features: torch.Tensor) -> tuple[torch.Tensor, float]:
    """W with W Wᵀ = Φ(ΦᵀΦ)⁻¹Φᵀ for Φ (N × d), in float64: W = Φ L⁻ᵀ for the Cholesky factor L of
    ΦᵀΦ; and TRAK's weight of this checkpoint in the ensemble, 1 / mean |(ΦᵀΦ)⁻¹| (see trak_influence).
    Undamped, as TRAK; only if ΦᵀΦ is singular (fewer independent gradients than d), damped by a tiny
    share of its mean diagonal."""
    phi = features.double()
    gram = phi.T @ phi
    mean_diagonal = float(gram.diagonal().mean())
    identity = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    for damping in (0.0, 1e-10, 1e-8, 1e-6, 1e-4):
        factor, info = torch.linalg.cholesky_ex(gram + damping * mean_diagonal * identity)
        if int(info) == 0 and mean_diagonal > 0:
            if damping:
                log.warning("strongest_feature: ΦᵀΦ of the projected gradients is singular; damped by %g × "
                            "its mean diagonal", damping)
            weight = 1.0 / float(torch.cholesky_inverse(factor).abs().mean())
            return torch.linalg.solve_triangular(factor, phi.T, upper=False).T, weight
    raise RuntimeError(f"TRAK: the {len(gram)} × {len(gram)} matrix ΦᵀΦ of the projected gradients is not "
                       f"positive definite even when damped (mean diagonal {mean_diagonal:g}); try a "
                       f"smaller proj_dim or max_proj_share")


def trak_influence(models: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, *, proj_dim: int,
                   batch_size: int, seed: int, loss_weighting: bool = True,
                   projection_budget_bytes: int = PROJECTION_BUDGET_BYTES) -> np.ndarray:
    """The train × train TRAK matrix over the checkpoints `models`: M[i, j] = influence of training sample
    i on the margin of training sample j (rows: train, columns: targets, TRAK's own orientation), float32.

    Per checkpoint c: Φ_c = G_c P_c, the per-sample margin gradients (model in eval mode) times a
    Gaussian projection of its own, and the kernel K_c = Φ_c (Φ_cᵀΦ_c)⁻¹ Φ_cᵀ. M = Σ_c w_c K_c / Σ_c w_c
    with w_c = 1 / mean |(Φ_cᵀΦ_c)⁻¹|: the `traker` package rescales each (ΦᵀΦ)⁻¹ to mean absolute
    entry 1 before averaging the checkpoints, which weighs them so; we keep its weights, as a weighted
    mean that leaves M in kernel units (diagonal: leverages, d/N on average). With loss_weighting, row i
    is multiplied by mean_c (1 − p_c,i(label)), as traker's finalize_scores does. The targets are the
    training set, so one gradient pass per checkpoint serves both sides of the kernel. P is kept whole
    when it fits projection_budget_bytes and otherwise regenerated chunk by chunk for every batch, the
    same matrix either way. The callers' models are left as they are."""
    n = len(x)
    device = x.device
    # Functional calls on an eval-mode copy, with each checkpoint's own parameters and buffers.
    template = copy.deepcopy(models[-1]).eval()
    parameter_count = sum(p.numel() for p in template.parameters())
    # ΦᵀΦ (d × d) is inverted from N projected gradients: it needs d < N.
    dim = int(min(proj_dim, parameter_count, n - 1))
    kernel = torch.zeros(n, n, device=device)
    out_to_loss = torch.zeros(n, device=device, dtype=torch.float64)
    total_weight = 0.0
    for checkpoint, model in enumerate(models):
        parameters = {name: p.detach() for name, p in model.named_parameters()}
        buffers = {name: b.detach() for name, b in model.named_buffers()}
        projection = GaussianProjection(parameter_count, dim, seed, checkpoint, device,
                                        projection_budget_bytes)
        features = torch.empty(n, dim, device=device)
        for start in range(0, n, batch_size):
            gradients, margins = margin_gradients(template, parameters, buffers, x[start:start + batch_size],
                                                  y[start:start + batch_size])
            features[start:start + batch_size] = projection.project(gradients)
            # 1 − p = sigmoid(−margin), without the cancellation of 1 − p in float32.
            out_to_loss[start:start + batch_size] += torch.sigmoid(-margins.double())
        del projection
        whitened, weight = projection_kernel(features)
        whitened = whitened.float()
        kernel.addmm_(whitened, whitened.T, alpha=weight)
        total_weight += weight
    kernel /= total_weight
    if loss_weighting:
        kernel *= (out_to_loss / len(models)).float()[:, None]
    matrix = kernel.cpu().numpy()
    if matrix.shape != (n, n) or not np.isfinite(matrix).all():
        raise RuntimeError(f"TRAK returned a {matrix.shape} matrix with "
                           f"{int((~np.isfinite(matrix)).sum())} non-finite entries for {n} samples; try "
                           f"a smaller proj_dim or max_proj_share")
    return matrix


def strongest_feature_scores(matrix: np.ndarray, sizes: list[int], restarts: int, seed: int,
                             aggregate: str = "best") -> np.ndarray:
    """Σ_k [sample in the best size-k set found] / k over the given sizes ("best"), or Σ_k (share of the
    restarts whose size-k optimum contains the sample) / k ("restarts", the official code's)."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r} must be one of {list(AGGREGATES)}")
    # M + Mᵀ without the diagonal: what a pair of samples does for each other; self-influence is no
    # evidence of a shared feature.
    weights = pairwise_weights(matrix)
    n = len(weights)
    bounds = weight_range(weights)
    rng = np.random.default_rng(seed)
    scores = np.zeros(n)
    for k in sizes:
        check_size(k, n)
        unary = expected_influence_correction(matrix, k)
        optima = [local_search(weights, unary, k, rng, bounds) for _ in range(restarts)]
        if aggregate == "best":
            # value(S) = ½ Σ_{i,j ∈ S} W[i, j] + Σ_{i ∈ S} u[i]; the first of equal optima wins.
            values = [0.5 * weights[np.ix_(s, s)].sum() + unary[s].sum() for s in optima]
            scores[optima[int(np.argmax(values))]] += 1.0 / k
        else:
            for subset in optima:
                scores[subset] += 1.0 / (restarts * k)
    return scores


@DETECTORS.register("strongest_feature")
class StrongestFeature(Detector):
    method_defaults = {
        "proj_dim": 2048,  # TRAK's random projection (its default), ...
        "max_proj_share": 0.08,  # ... capped at this share of N (see the module docstring)
        "loss_weighting": False,  # TRAK's out-to-loss term; off: it hides the well-fit poisons
        "k_min": 0.0002,  # smallest subset: a share of N (≤ 1) or a count (> 1); raised to 2 at least
        "k_max": 0.1024,  # largest subset; with k_min, the official 10 … 5120 on CIFAR-10's 50 000
        "sizes": 10,  # geometrically spaced subset sizes between k_min and k_max
        "restarts": 100,  # local searches per size, as the official code's trials
        "aggregate": "best",  # or "restarts", the official code's vote over all restarts
        "batch_size": 64,  # samples per TRAK per-sample-gradient batch (memory: batch × parameters)
    }

    def check_method(self) -> None:
        # Whether k_min ≤ k_max is only known with N when one is a share and the other a count:
        # subset_sizes checks it then.
        self.positive("proj_dim", "k_min", "k_max", "sizes", "restarts", "batch_size")
        self.require(0 < float(self.max_proj_share) < 1, "max_proj_share", "must be in (0, 1)")
        self.require(isinstance(self.loss_weighting, bool), "loss_weighting", "must be true or false")
        self.require(self.aggregate in AGGREGATES, "aggregate", f"must be one of {list(AGGREGATES)}")

    def projection_dimension(self, n: int) -> int:
        """proj_dim, capped at max_proj_share × N (at least 1)."""
        dim = min(int(self.proj_dim), max(1, round(float(self.max_proj_share) * n)))
        if dim < int(self.proj_dim):
            log.info("strongest_feature: TRAK projection of %d dimensions for %d samples (max_proj_share=%g)",
                     dim, n, float(self.max_proj_share))
        return dim

    def scores(self, models, x, y, *, seed):
        self.check_inputs(models, x, y)
        n = len(x)
        if n < 4:
            raise ValueError(f"strongest_feature needs at least 4 training samples, got {n}")
        sizes = subset_sizes(float(self.k_min), float(self.k_max), int(self.sizes), n)
        influence = trak_influence(models, x, y, proj_dim=self.projection_dimension(n),
                                   batch_size=int(self.batch_size), seed=seed,
                                   loss_weighting=bool(self.loss_weighting))
        log.info("strongest_feature: TRAK matrix of %d samples done; searching sets of sizes %s", n, sizes)
        return strongest_feature_scores(influence, sizes, int(self.restarts), seed, self.aggregate)
