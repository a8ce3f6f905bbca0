"""Check every λ_max the evaluate stage reported against an independent computation on the same samples:
for each metrics.json under a results folder that reports `lambda_max` (and the undefended model's, under
`undefended`), rebuild the model it measured and the clean test samples it measured on
(`sharpness_samples`, the subset pipeline_pkg.sharpness.sample_indices picks), and find the Hessian's
largest eigenvalue again by a different route: Lanczos with full re-orthogonalisation (the largest Ritz
value of its tridiagonal matrix), on Hessian-vector products by forward-over-reverse differentiation
(torch.func.jvp of torch.func.grad of the summed loss), in its own chunks, from a start vector of its own
seed. Prints, per job: the reported λ_max, the independent one, their relative difference and whether
they agree within --tolerance (15%); exits 1 if any disagrees, 2 if nothing reports λ_max.

    python benchmarks/check_sharpness.py                        # every metrics.json under results/
    python benchmarks/check_sharpness.py --results results-tiny --dataset digits

Reads <results>/config.yaml (the config of the last Snakemake call) for the architectures; writes nothing.
A job whose undefended λ_max is the `none` job's own (as every job's is) is checked once."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp

from pipeline_pkg import paths, stages
from pipeline_pkg.config import apply_schema, load_yaml
from pipeline_pkg.h5io import load_checkpoint, read_json
from pipeline_pkg.runtime import pick_device
from pipeline_pkg.sharpness import sample_indices

# Added to a job's seed for the start vector: the evaluate stage's power iteration starts from `seed`.
START_SEED = 7_919


@dataclass
class Claim:
    """One reported λ_max: which job, which weights, which samples."""
    label: str
    model_file: Path
    poison_file: Path
    samples: int
    seed: int
    reported: float


def summed_loss_hvp(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """v ↦ H v of the mean cross-entropy over (x, y), as the sum over chunks of the Hessians of the summed
    loss (divided by the sample count at the end), by forward-over-reverse differentiation."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    buffers = dict(model.named_buffers())

    def hvp(vector: torch.Tensor) -> torch.Tensor:
        tangent = {n: t.reshape(s) for n, t, s in zip(names, vector.split(sizes), shapes)}
        total = torch.zeros_like(vector)
        for start in range(0, len(x), batch_size):
            xc, yc = x[start:start + batch_size], y[start:start + batch_size]

            def loss(p):
                return F.cross_entropy(functional_call(model, {**p, **buffers}, (xc,)), yc, reduction="sum")

            _, hv = jvp(grad(loss), (params,), (tangent,))
            total += torch.cat([hv[n].reshape(-1) for n in names])
        return total / len(x)

    return hvp, sum(sizes)


def lanczos_top(hvp, dim: int, *, steps: int, seed: int, device: torch.device,
                tol: float = 1e-5) -> tuple[float, int]:
    """The largest eigenvalue of the symmetric operator `hvp` (the largest Ritz value), and the steps
    taken: Lanczos with full re-orthogonalisation, stopped when that value changes by less than `tol`
    (relative) twice in a row or after `steps`."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=torch.float64).to(device=device, dtype=torch.float32)
    basis = [q / q.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    top, settled = math.nan, 0
    for k in range(steps):
        w = hvp(basis[-1])
        alphas.append(float(torch.dot(basis[-1], w)))
        for _ in range(2):  # twice is enough (Kahan): the basis stays orthogonal in float32
            for b in basis:
                w -= torch.dot(b, w) * b
        beta = float(w.norm())
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        value = float(torch.linalg.eigvalsh(t).max())
        settled = settled + 1 if abs(value - top) <= tol * abs(value) else 0
        top = value
        if settled >= 2 or beta <= 1e-10 * max(abs(value), 1.0):  # converged, or an invariant subspace
            return top, k + 1
        betas.append(beta)
        basis.append(w / beta)
    return top, steps


def claims_of(results: Path, datasets: tuple[str, ...]) -> tuple[list[Claim], list[str]]:
    claims: list[Claim] = []
    undefended: list[Claim] = []
    notes: list[str] = []
    for file in sorted(results.rglob("metrics.json")):
        record = read_json(file)
        if not isinstance(record, dict) or "dataset" not in record or (datasets and record["dataset"] not in datasets):
            continue
        run = paths.train_dir(results, record["dataset"], record["attack"], record["arch"], record["seed"])
        poison = paths.poison_file(results, record["dataset"], record["attack"], record["seed"])
        job = f"{record['dataset']}/{record['attack']}/{record['arch']}/seed{record['seed']}/{record['defense']}"
        own = file.parent / "model.pt" if record["defense"] != paths.NO_DEFENSE else run / "model.pt"
        for label, values, model_file, found in [
                (job, record, own, claims),
                (f"{job} (undefended)", record.get("undefended") or {}, run / "model.pt", undefended)]:
            if "lambda_max" not in values:
                continue
            if "sharpness_samples" not in values:
                notes.append(f"{label}: no sharpness_samples (an older metrics.json): rerun its evaluate job")
                continue
            found.append(Claim(label, model_file, poison, int(values["sharpness_samples"]), int(record["seed"]),
                               float(values["lambda_max"])))
    # Every job carries the `none` job's undefended numbers: check each (weights, samples, value) once,
    # under the name of the job that measured it where that job's file is there.
    unique: dict[tuple, Claim] = {}
    for claim in claims + undefended:
        unique.setdefault((claim.model_file.resolve(), claim.poison_file, claim.samples, claim.reported), claim)
    return list(unique.values()), notes


def measured_weights(config: dict, model_file: Path, device: torch.device) -> torch.nn.Module:
    """The weights evaluate measured: a test-time defense's (e.g. sor) checkpoint holds the backdoored
    weights and an input filter, which the loss surface is measured without."""
    if load_checkpoint(model_file).get("input_filter"):
        model_file = model_file.parent.parent / "model.pt"
    model, _ = stages.load_model(config, model_file, device)
    return model.float().eval()


@click.command()
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(path_type=Path))
@click.option("--config", "config_path", default=None, type=click.Path(path_type=Path),
              help="default: <results>/config.yaml, the config of the last Snakemake call")
@click.option("--dataset", "datasets", multiple=True, help="only these datasets (repeatable)")
@click.option("--tolerance", default=0.15, show_default=True, help="largest relative difference that agrees")
@click.option("--steps", default=60, show_default=True, help="most Lanczos steps")
@click.option("--batch-size", default=128, show_default=True, help="samples per chunk of the products")
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", default=1, show_default=True)
def main(results_dir, config_path, datasets, tolerance, steps, batch_size, device, threads) -> None:
    torch.set_num_threads(threads)
    config = apply_schema(load_yaml(config_path or paths.resolved_config_file(results_dir)))
    dev = pick_device(device)
    claims, notes = claims_of(results_dir, datasets)
    for note in notes:
        click.echo(f"skipped: {note}", err=True)
    if not claims:
        click.echo(f"no metrics.json under {results_dir} reports lambda_max", err=True)
        sys.exit(2)
    click.echo(f"{'job':<52} {'n':>5} {'reported':>11} {'independent':>11} {'rel diff':>9}  agrees  steps  seconds")
    poisons: dict[Path, dict] = {}
    failures = 0
    for claim in claims:
        if claim.poison_file not in poisons:
            poisons[claim.poison_file] = stages.load_poisoned(claim.poison_file, dev)[0]
        data = poisons[claim.poison_file]
        idx = sample_indices(len(data["x_test"]), claim.samples).to(dev)
        x, y = data["x_test"][idx], data["y_test"][idx]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()  # the image models' own conversion
        model = measured_weights(config, claim.model_file, dev)
        started = time.perf_counter()
        with torch.autocast(dev.type if dev.type in ("cpu", "cuda") else "cpu", enabled=False):
            hvp, dim = summed_loss_hvp(model, x, y, batch_size)
            independent, used = lanczos_top(hvp, dim, steps=steps, seed=START_SEED + claim.seed, device=dev)
        seconds = time.perf_counter() - started
        difference = abs(claim.reported - independent) / max(abs(independent), 1e-12)
        agrees = difference <= tolerance
        failures += not agrees
        click.echo(f"{claim.label:<52} {claim.samples:>5} {claim.reported:>11.4g} {independent:>11.4g} "
                   f"{100 * difference:>8.2f}%  {'yes' if agrees else 'NO':>6}  {used:>5}  {seconds:>7.1f}")
    click.echo(f"{len(claims) - failures} of {len(claims)} λ_max agree within {100 * tolerance:.0f}% "
               "with an independent Lanczos iteration on the same samples")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
