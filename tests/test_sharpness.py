"""λ_max and Tr(H) against the exact Hessian of small models, computed by brute force; the chunked
products against the unchunked ones; precision (fp32 under autocast, half-precision weights, uint8
images); the power iteration on explicit matrices (negative dominant eigenvalue, convergence)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pipeline_pkg.models.base import ImageInput
from pipeline_pkg.sharpness import (Hessian, full_precision, hutchinson_trace, measure, sample_count,
                                    sample_indices, sharpness, top_eigenvalue)


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Hessian of the mean cross-entropy in every trainable parameter, in float64, model in eval mode."""
    model = model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    buffers = {n: b.double() if b.is_floating_point() else b for n, b in model.named_buffers()}
    flat = torch.cat([p.detach().double().reshape(-1) for p in params])
    x = x.double() if x.is_floating_point() else x

    def loss(theta):
        weights = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, {**weights, **buffers}, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


def small_mlp(seed: int = 0, inputs: int = 4, hidden: int = 5, classes: int = 3) -> nn.Module:
    """4·5 + 5 + 5·3 + 3 = 43 parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def small_batchnorm_net(seed: int = 0) -> nn.Module:
    """Linear, BatchNorm with non-default running statistics, dropout: eval mode matters for each."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3))
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(32, 4) * 3 + 1)
    return model


def data(n: int = 40, seed: int = 1, inputs: int = 4, classes: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, inputs, generator=gen) * 2, torch.randint(0, classes, (n,), generator=gen)


def trained_mlp(seed: int = 0, steps: int = 60) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """small_mlp fitted for a few steps to learnable labels: near a minimum, as the measured models are,
    where the Hessian's largest eigenvalue is also its dominant one."""
    model = small_mlp(seed)
    x, _ = data(seed=seed + 1)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    for _ in range(steps):  # plain gradient descent (torch.optim's first step imports for seconds)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p.sub_(0.5 * g)
    return model, x, y


def symmetric(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues),
                                       generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def test_lambda_max_matches_the_top_eigenvalue_of_the_exact_hessian():
    model, x, y = trained_mlp()
    hessian = exact_hessian(model, x, y)
    assert hessian.shape == (43, 43)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    top = eigenvalues.max().item()
    assert top > 0 and top > 2 * eigenvalues.min().abs().item()  # the largest is also the dominant one
    # float32 weights and inputs, as the pipeline measures; the default stopping rule.
    measured = measure(model, x, y, seed=0)
    assert measured["sharpness_converged"] and 1 < measured["sharpness_iterations"] < 100
    assert measured["lambda_max"] == pytest.approx(top, rel=0.01)
    assert measured["sharpness_samples"] == 40
    # Another start converges to the same eigenvalue; a tight tolerance to it within float32 accuracy.
    tight = measure(model, x, y, seed=7, tol=1e-6, max_iterations=500, probes=1)
    assert tight["sharpness_converged"] and tight["lambda_max"] == pytest.approx(top, rel=1e-4)


def test_lambda_max_is_the_largest_eigenvalue_also_where_a_negative_one_dominates():
    model = small_mlp()  # untrained, on random labels: a saddle, more concave than convex
    x, y = data()
    eigenvalues = torch.linalg.eigvalsh(exact_hessian(model, x, y))
    assert -eigenvalues.min() > eigenvalues.max() > 0
    measured = measure(model, x, y, seed=0, tol=1e-8, max_iterations=3000, probes=1)
    assert measured["sharpness_converged"]
    assert measured["lambda_max"] == pytest.approx(eigenvalues.max().item(), rel=0.01)


def test_hutchinson_trace_is_within_its_standard_error_of_the_exact_trace():
    model, x, y = trained_mlp(seed=2)
    hessian = exact_hessian(model, x, y)
    exact = hessian.trace().item()
    # Var(zᵀHz) over Rademacher z is 2 Σ_{i≠j} H_ij²: the mean of p probes is off by 4 standard errors
    # (a 1-in-16,000 event for a normal mean) at most.
    probes = 400
    stderr = math.sqrt(2 * ((hessian ** 2).sum() - (hessian.diagonal() ** 2).sum()).item() / probes)
    assert stderr < 0.05 * abs(exact)  # the bound is tight enough to catch a wrong estimate
    measured = measure(model, x, y, probes=probes, seed=0, max_iterations=5)
    assert abs(measured["hessian_trace"] - exact) < 4 * stderr
    # The estimator alone, on an explicit matrix: the same bound, and its seed reproduces it.
    matrix = symmetric([5.0, -2.0, 1.0, 0.5, 3.0, 0.0], seed=4).float()
    variance = 2 * ((matrix ** 2).sum() - (matrix.diagonal() ** 2).sum()).item()
    estimate = hutchinson_trace(lambda vs: [matrix @ v for v in vs], 6, probes=probes, seed=1)
    assert abs(estimate - matrix.trace().item()) < 4 * math.sqrt(variance / probes)
    assert estimate == hutchinson_trace(lambda vs: [matrix @ v for v in vs], 6, probes=probes, seed=1)
    # zᵀDz = Tr(D) for every Rademacher z and diagonal D: exact for any probe count, in groups or not.
    diagonal = torch.tensor([3.0, -1.0, 0.5, 2.0, 7.0])
    for count, group in [(1, 8), (3, 8), (10, 4)]:
        assert hutchinson_trace(lambda vs: [diagonal * v for v in vs], 5, probes=count, seed=count,
                                group=group) == pytest.approx(11.5, rel=1e-6)


@pytest.mark.parametrize("batch_size", [3, 16])
def test_chunked_products_equal_the_full_batch_ones(batch_size):
    model = small_batchnorm_net()
    x, y = data(n=40)
    full = Hessian(model.eval(), x, y, batch_size=40)
    chunked = Hessian(model, x, y, batch_size=batch_size)
    assert len(full.chunks) == 1 and len(chunked.chunks) == math.ceil(40 / batch_size)
    vectors = [torch.randn(full.dim, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    reference = exact_hessian(model, x, y)
    for v, a, b in zip(vectors, full.matvecs(vectors), chunked.matvecs(vectors)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.double(), reference @ v.double(), rtol=1e-4, atol=1e-5)
    # The whole measurement too, with the model left in train mode (sharpness switches to eval and back).
    model.train()
    one = measure(model, x, y, seed=3, batch_size=40)
    many = measure(model, x, y, seed=3, batch_size=batch_size)
    assert model.training
    assert many["lambda_max"] == pytest.approx(one["lambda_max"], rel=1e-4)
    assert many["hessian_trace"] == pytest.approx(one["hessian_trace"], rel=1e-4, abs=1e-5)
    assert many["lambda_max"] == pytest.approx(torch.linalg.eigvalsh(reference).max().item(), rel=0.01)


def test_power_iteration_reports_the_largest_eigenvalue_when_a_negative_one_dominates():
    matrix = symmetric([-10.0, 4.0, 1.0, 0.5, -3.0, 2.0, 0.0, 0.1])
    found = top_eigenvalue(lambda v: matrix @ v, 8, seed=0, tol=1e-8, max_iterations=2000, dtype=torch.float64)
    assert found.converged
    assert found.value == pytest.approx(4.0, rel=1e-4)
    positive = symmetric([-1.0, 6.0, 1.0, 5.0])
    found = top_eigenvalue(lambda v: positive @ v, 4, seed=0, tol=1e-8, max_iterations=2000, dtype=torch.float64)
    assert found.value == pytest.approx(6.0, rel=1e-4)


def test_power_iteration_stops_on_the_tolerance_or_the_iteration_cap():
    # Eigenvalues 10 and 9.9: the iterate turns slowly, the Rayleigh quotient still settles near 10.
    slow = symmetric([10.0, 9.9, 1.0, 0.5, 0.1])
    capped = top_eigenvalue(lambda v: slow @ v, 5, seed=0, tol=1e-12, max_iterations=3, dtype=torch.float64)
    assert capped.iterations == 3 and not capped.converged
    fast = symmetric([10.0, 1.0, 0.5, 0.1])
    done = top_eigenvalue(lambda v: fast @ v, 4, seed=0, tol=1e-6, max_iterations=1000, dtype=torch.float64)
    assert done.converged and done.iterations < 20 and done.value == pytest.approx(10.0, rel=1e-6)
    zero = top_eigenvalue(lambda v: torch.zeros_like(v), 4, seed=0)
    assert zero.value == 0.0 and zero.converged


def test_measured_in_float32_under_bf16_autocast_and_for_half_precision_weights():
    model = small_mlp(seed=4, inputs=6, hidden=8, classes=4)
    x, y = data(n=32, seed=5, inputs=6, classes=4)
    reference = measure(model, x, y, seed=0, probes=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = measure(model, x, y, seed=0, probes=4)
    assert inside == pytest.approx(reference, rel=1e-5)
    # Half-precision weights are measured as a float32 copy (the model itself is left as it was).
    half = small_mlp(seed=4, inputs=6, hidden=8, classes=4).bfloat16()
    measured = measure(half, x.bfloat16(), y, seed=0, probes=4)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    promoted = measure(small_mlp(seed=4, inputs=6, hidden=8, classes=4).bfloat16().float(), x.bfloat16().float(),
                         y, seed=0, probes=4)
    assert measured == pytest.approx(promoted, rel=1e-6)


def test_uint8_images_are_measured_as_the_model_sees_them():
    torch.manual_seed(6)
    model = nn.Sequential(ImageInput(), nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    gen = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (12, 1, 6, 6), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 3, (12,), generator=gen)
    _, floats = full_precision(model, images)
    assert floats.dtype == torch.float32 and floats.max() <= 1.0
    assert measure(model, images, y, seed=0, probes=3) == pytest.approx(
        measure(model, images.float() / 255.0, y, seed=0, probes=3), rel=1e-6)
    top = torch.linalg.eigvalsh(exact_hessian(model, images.double() / 255.0, y)).max().item()
    assert measure(model, images, y, seed=0, probes=1, tol=1e-6, max_iterations=2000)["lambda_max"] == \
        pytest.approx(top, rel=1e-3)


def test_sample_count_and_the_fixed_subset():
    assert sample_count("all", 450) == 450 and sample_count(None, 450) == 450
    assert sample_count(512, 450) == 450 and sample_count(512, 1600) == 512 and sample_count(0, 1600) == 0
    for bad in (-1, "some", 2.5, True):
        with pytest.raises(ValueError):
            sample_count(bad, 10)
    assert torch.equal(sample_indices(450, 450), torch.arange(450))
    subset = sample_indices(1600, 512)
    assert len(subset) == 512 and len(set(subset.tolist())) == 512
    assert torch.equal(subset, subset.sort().values) and subset.max() < 1600
    assert torch.equal(subset, sample_indices(1600, 512))  # the same for every method of a run
    assert subset.max() > 1200  # not a prefix: a class-ordered test set is still sampled across classes


def test_sharper_model_measures_sharper_and_mode_is_restored():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    soft = sharpness(model, x, y, probes=50)
    with torch.no_grad():
        model[0].weight.mul_(0.01)  # near-uniform softmax: curvature of CE in the weights is largest
    model.train()
    flat_logits = sharpness(model, x, y, probes=50)
    assert model.training
    assert flat_logits["lambda_max"] > soft["lambda_max"] > 0
    # `sharpness` (what benchmarks/defenses.py calls) reports the two numbers alone; `iterations` caps them.
    assert set(soft) == {"lambda_max", "hessian_trace"}
    assert sharpness(model, x, y, iterations=50, probes=50) == pytest.approx(
        {k: v for k, v in measure(model, x, y, max_iterations=50, probes=50).items() if k in soft})
