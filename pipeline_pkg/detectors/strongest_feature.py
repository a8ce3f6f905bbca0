"""`strongest_feature`: detection as finding the strongest feature (Khaddaj et al., ICML 2023, "Rethinking
Backdoor Attacks").

A backdoor trigger is, to the learner, the strongest feature of the training set: the poisoned samples
support each other's predictions far more than any other group of samples of that size does. The method
measures how much every training sample influences every other one, then looks for the set of samples
with the largest total mutual influence.

1. Influence matrix with TRAK (Park et al., ICML 2023; the `traker` package), train × train, over the
   given checkpoints: M[i, j] = influence of training sample i on the model's margin for sample j. The
   paper uses datamodels, which need thousands of retrainings; TRAK estimates them from gradients.
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
import tempfile

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


def _margin_output(loss_weighting: bool):
    """TRAK's image-classification output (the margin log p/(1 − p)); without loss weighting its
    out-to-loss term is 1 for every sample, which leaves TRAK's kernel."""
    from trak.modelout_functions import ImageClassificationModelOutput

    if loss_weighting:
        return ImageClassificationModelOutput()

    class UnweightedMargin(ImageClassificationModelOutput):
        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            images, _ = batch
            return torch.ones(len(images), 1, device=images.device)

    return UnweightedMargin()


def trak_influence(models: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, *, proj_dim: int,
                   batch_size: int, seed: int, loss_weighting: bool = True) -> np.ndarray:
    """The train × train TRAK matrix over the checkpoints `models`: M[i, j] = influence of training sample
    i on the margin of training sample j (rows: train, columns: targets, TRAK's own orientation), float32.
    The margin works on any input a classifier takes (images, RF frames, point clouds): TRAK takes
    per-sample gradients with torch.func over single inputs, the model in eval mode. TRAK's files live in a
    temporary directory removed afterwards."""
    from trak import TRAKer

    n = len(x)
    # TRAK mutates the model it is given (load_state_dict per checkpoint): work on a copy.
    work_model = copy.deepcopy(models[-1]).eval()
    checkpoints = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    device = str(x.device)  # TRAK picks its CPU projector by comparing the device with the string "cpu"
    parameters = sum(p.numel() for p in work_model.parameters())
    # XᵀX (proj_dim × proj_dim) is inverted from N projected gradients: it needs proj_dim < N.
    dim = int(min(proj_dim, parameters, n - 1))
    with tempfile.TemporaryDirectory(prefix="trak-") as save_dir:
        traker = TRAKer(model=work_model, task=_margin_output(loss_weighting), train_set_size=n,
                        save_dir=save_dir, device=device, proj_dim=dim, use_half_precision=False,
                        projector_seed=seed, logging_level=logging.WARNING)
        for model_id, state in enumerate(checkpoints):
            traker.load_checkpoint(state, model_id=model_id)
            for start in range(0, n, batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                traker.featurize(batch=(xb, yb), num_samples=len(xb))
        traker.finalize_features()
        # traker 0.3's finalize_features frees the CPU projector's matrix, and with a single projection
        # block of the same checkpoint `score` would use it without rebuilding it: rebuild it here.
        projector = traker.projector
        if getattr(projector, "proj_matrix_available", True) is False:
            projector.generate_sketch_matrix(projector.generator_states[0])
        for model_id, state in enumerate(checkpoints):
            traker.start_scoring_checkpoint(exp_name="train_on_train", checkpoint=state, model_id=model_id,
                                            num_targets=n)
            for start in range(0, n, batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                traker.score(batch=(xb, yb), num_samples=len(xb))
        matrix = np.array(traker.finalize_scores(exp_name="train_on_train"), dtype=np.float32)
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
