"""The densest-subset search behind `strongest_feature` (Khaddaj et al., ICML 2023): among the training
samples, find the k whose mutual influence is largest. Pure numpy.

For an influence matrix M (M[i, j]: influence of training sample i on sample j) a set S is worth

    value(S) = Σ_{i≠j ∈ S} M[i, j] + Σ_{i ∈ S} u[i],

where u is a per-sample correction; `expected_influence_correction` gives the paper's: minus the influence
that sample i would have on a random set of size k, so that samples that influence everything (outliers
with large gradients) do not win the search just for that. Finding the best S is NP-hard (it contains
the densest-k-subgraph problem); a local search over swap moves (each step the best of the most promising
swaps, until no swap at all improves), restarted from random sets, finds it in practice and exactly
recovers a planted dense block.

Only the symmetric part matters: value(S) = ½ Σ_{i≠j ∈ S} W[i, j] + Σ u[i] with W = M + Mᵀ. With
g_i = Σ_{j ∈ S} W[i, j] + u[i] (the gain of adding i to S, or i's contribution when in S), swapping r ∈ S
for a ∉ S changes the value by g_a − g_r − W[a, r]."""

from __future__ import annotations

import numpy as np


def pairwise_weights(matrix: np.ndarray) -> np.ndarray:
    """W = M + Mᵀ with a zero diagonal: the mutual influence of every pair. float32 stays float32 (a
    50 000-sample matrix is 10 GB in it), anything else becomes float64."""
    matrix = np.asarray(matrix)
    matrix = matrix.astype(np.float32 if matrix.dtype == np.float32 else np.float64, copy=False)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"the influence matrix must be square (train × train), got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("the influence matrix has NaN or infinite entries")
    weights = matrix + matrix.T
    np.fill_diagonal(weights, 0.0)
    return weights


def expected_influence_correction(matrix: np.ndarray, k: int) -> np.ndarray:
    """The paper's diagonal correction for sets of size k: u[i] = −(k / N) Σ_{j≠i} M[i, j], minus the
    influence sample i is expected to have on a random set of k samples (the official code writes it on
    the diagonal of M, which the search counts once per selected sample)."""
    matrix = np.asarray(matrix)
    n = len(matrix)
    off_diagonal_row_sums = matrix.sum(1, dtype=np.float64) - np.diagonal(matrix)
    return -off_diagonal_row_sums * (k / n)


def subset_value(matrix: np.ndarray, subset: np.ndarray, unary: np.ndarray | None = None) -> float:
    """value(S) = Σ_{i≠j ∈ S} M[i, j] + Σ_{i ∈ S} unary[i]."""
    subset = np.asarray(subset, dtype=np.int64)
    block = np.asarray(matrix, dtype=np.float64)[np.ix_(subset, subset)]
    value = block.sum() - np.trace(block)
    return float(value + (0.0 if unary is None else np.asarray(unary, dtype=np.float64)[subset].sum()))


def _extremes(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` smallest values, smallest first (ties: lower index first)."""
    if count < len(values):
        part = np.argpartition(values, count - 1)[:count]
    else:
        part = np.arange(len(values))
    return part[np.lexsort((part, values[part]))]


FULL_CHECK_BLOCK = 1024  # candidates a side beyond which every pair is checked, in chunks
CHUNK_ENTRIES = 1 << 22  # members × outsiders evaluated at once in the full check


def _all_pairs_best_swap(weights: np.ndarray, gains: np.ndarray,
                         selected: np.ndarray) -> tuple[int, int, float]:
    """The best swap over all (member, outsider) pairs, a chunk of outsiders at a time."""
    members, outsiders = np.flatnonzero(selected), np.flatnonzero(~selected)
    step = max(1, CHUNK_ENTRIES // len(members))
    best = (-1, -1, -np.inf)
    for start in range(0, len(outsiders), step):
        chunk = outsiders[start:start + step]
        delta = gains[chunk][None, :] - gains[members][:, None] - weights[np.ix_(members, chunk)]
        r_pos, a_pos = np.unravel_index(int(np.argmax(delta)), delta.shape)
        if delta[r_pos, a_pos] > best[2]:
            best = (int(members[r_pos]), int(chunk[a_pos]), float(delta[r_pos, a_pos]))
    return best


def _best_swap(weights: np.ndarray, gains: np.ndarray, selected: np.ndarray, weight_min: float,
               tolerance: float) -> tuple[int, int, float]:
    """A swap (r out of S, a into S) that raises the value by more than `tolerance`, with its value change
    g_a − g_r − W[a, r]; or a change ≤ tolerance when no swap does (a local optimum).

    Improving swaps almost always pair an outsider with a large gain and a member with a small one, so
    a block of those is tried first (exact changes inside it; the best is taken), doubling while it
    holds no improving swap. Once the block holds none, the bound min W proves that none exists beyond
    it either, or the block grows; past FULL_CHECK_BLOCK a side every pair is checked."""
    n_in = int(selected.sum())
    n_out = len(selected) - n_in
    # Members sort as +inf among outsiders and the other way round, so one partition serves each side.
    out_key = np.where(selected, np.inf, -gains)
    in_key = np.where(selected, gains, np.inf)
    block = 16
    while block <= FULL_CHECK_BLOCK:
        out_order = _extremes(out_key, min(block + 1, n_out))
        in_order = _extremes(in_key, min(block + 1, n_in))
        cand_out, cand_in = out_order[:block], in_order[:block]
        delta = gains[cand_out][None, :] - gains[cand_in][:, None] - weights[np.ix_(cand_in, cand_out)]
        r_pos, a_pos = np.unravel_index(int(np.argmax(delta)), delta.shape)
        best = float(delta[r_pos, a_pos])
        if best > tolerance:
            return int(cand_in[r_pos]), int(cand_out[a_pos]), best
        # Any swap using an outsider beyond the block changes the value by at most
        # g(next outsider) − min g_r − min W; likewise for a member beyond the block.
        bound = -np.inf
        if len(out_order) > block:
            bound = max(bound, gains[out_order[block]] - gains[in_order[0]] - weight_min)
        if len(in_order) > block:
            bound = max(bound, gains[out_order[0]] - gains[in_order[block]] - weight_min)
        if bound <= tolerance:
            return int(cand_in[r_pos]), int(cand_out[a_pos]), best
        block *= 2
    return _all_pairs_best_swap(weights, gains, selected)


def weight_range(weights: np.ndarray) -> tuple[float, float]:
    """(min W, max |W|): the swap bound and the tolerance scale. Computed once per matrix, since a pass
    over a large N × N matrix costs more than a whole search."""
    return float(weights.min()), float(np.abs(weights).max())


def local_search(weights: np.ndarray, unary: np.ndarray, k: int, rng: np.random.Generator,
                 bounds: tuple[float, float] | None = None) -> np.ndarray:
    """One swap search from a random set of size k on prepared pairwise `weights` (see
    `pairwise_weights`, symmetric): swap while a swap raises the value. `bounds` is `weight_range(weights)`.
    Returns the sorted local optimum."""
    n = len(weights)
    check_size(k, n)
    if k == n:
        return np.arange(n)
    weight_min, weight_max_abs = weight_range(weights) if bounds is None else bounds
    selected = np.zeros(n, dtype=bool)
    selected[rng.choice(n, size=k, replace=False)] = True
    gains = weights[selected].sum(0, dtype=np.float64) + unary  # rows, not columns: W is symmetric
    # Rounding in the running gains must not make the search cycle: only a clear improvement counts.
    tolerance = 1e-10 * weight_max_abs * k
    for _ in range(10 * n * k):  # far above what any run needs; a guard, not a budget
        removed, added, delta = _best_swap(weights, gains, selected, weight_min, tolerance)
        if delta <= tolerance:
            break
        selected[removed], selected[added] = False, True
        gains += weights[added] - weights[removed]
    return np.flatnonzero(selected)


def check_size(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"subset size k={k} must be between 1 and the number of samples ({n})")


def local_optima(matrix: np.ndarray, k: int, restarts: int, seed: int,
                 unary: np.ndarray | None = None) -> list[np.ndarray]:
    """The local optima of `restarts` searches from seeded random sets of size k (sorted index arrays)."""
    weights = pairwise_weights(matrix)
    n = len(weights)
    check_size(k, n)
    unary = np.zeros(n) if unary is None else np.asarray(unary, dtype=np.float64)
    rng = np.random.default_rng(seed)
    bounds = weight_range(weights)
    return [local_search(weights, unary, k, rng, bounds) for _ in range(int(restarts))]


def densest_subset(matrix: np.ndarray, k: int, restarts: int, seed: int,
                   unary: np.ndarray | None = None) -> np.ndarray:
    """The size-k set with the largest value(S) found by `restarts` seeded local searches: sorted indices.
    The first of equally good optima wins, so a seed always gives the same set."""
    if restarts < 1:
        raise ValueError(f"restarts={restarts}: the search needs at least one start")
    optima = local_optima(matrix, k, restarts, seed, unary)
    values = [subset_value(matrix, subset, unary) for subset in optima]
    return optima[int(np.argmax(values))]
