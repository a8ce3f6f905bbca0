"""How large FIP's Fisher-trace term is against its cross-entropy, on a model the pipeline trained: the
gradient norms of CE and of η_F·Tr(F) on the batches FIP itself draws (clean budget, with the dataset's
clean_budget.augment), medians over --draws batches. When η_F·‖∇Tr(F)‖ is far above FIP's
max_grad_norm, the clipped trace steps point along ∇Tr(F) alone and η_F no longer sets their size.

    snakemake --cores 2 --until train
    python benchmarks/fip_gradient_scale.py --config results/config.yaml --attack burst \\
        --out benchmarks/results/fip-gradient-scale-rf1024-burst-cpu.md"""

from __future__ import annotations

import statistics

import click
import torch
import torch.nn.functional as F

from pipeline_pkg import stages
from pipeline_pkg.config import load
from pipeline_pkg.defenses.fip import grad_norm
from pipeline_pkg.defenses.fisher import fisher_trace_estimate
from report import publish  # benchmarks/report.py: scripts run from this folder
from trained_run import open_run, run_options  # benchmarks/trained_run.py


@click.command()
@run_options
@click.option("--draws", default=10, show_default=True, help="batches to measure")
@click.option("--out", default=None, help="also write the table here")
def main(config_path, dataset, attack, arch, seed, draws, threads, out) -> None:
    config = load(config_path)
    _, data, model, x, y = open_run(config, dataset, attack, arch, seed, threads)
    fip = stages.make_defense(config, dataset, "fip")
    params = fip.trainable(model)
    fip.train_mode(model)
    batches = fip.batches(x, y, seed)
    gen = torch.Generator().manual_seed(seed)
    eta_f, clip = float(fip.eta_f), float(fip.max_grad_norm)
    rows = {"‖∇CE‖": [], "Tr(F) estimate": [], "η_F·‖∇Tr(F)‖": []}
    for _ in range(draws):
        xb, yb = next(batches)
        logits = model(xb)
        ce_grads = torch.autograd.grad(F.cross_entropy(logits, yb), params, retain_graph=True)
        rows["‖∇CE‖"].append(float(grad_norm(ce_grads)))
        trace = fisher_trace_estimate(logits, params, gen, int(fip.probes))
        rows["Tr(F) estimate"].append(float(trace.detach()))
        rows["η_F·‖∇Tr(F)‖"].append(eta_f * float(grad_norm(torch.autograd.grad(trace, params))))
    medians = {k: statistics.median(v) for k, v in rows.items()}
    ratio = medians["η_F·‖∇Tr(F)‖"] / medians["‖∇CE‖"]
    lines = [f"# FIP's gradient terms on {dataset} / {attack} / {arch} / seed {seed}", "",
             f"Clean budget: {len(x)} samples, batches of {batches.batch_size}, clean_budget.augment "
             f"{fip.clean_augment}; {sum(p.numel() for p in params)} tuned values; η_F = {eta_f}, "
             f"probes = {int(fip.probes)}, max_grad_norm = {clip}; median of {draws} batches.", "",
             f"Command: `python benchmarks/fip_gradient_scale.py --config {config_path} --dataset {dataset} "
             f"--attack {attack} --arch {arch} --seed {seed} --draws {draws}`", "",
             "| quantity | median | min | max |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {k} | {medians[k]:.4g} | {min(v):.4g} | {max(v):.4g} |" for k, v in rows.items()]
    lines += ["", f"η_F·‖∇Tr(F)‖ / ‖∇CE‖ = {ratio:.3g}; on a trace step the clip to {clip} leaves the CE "
                  f"gradient about {1 / (1 + ratio):.2g} of the update."]
    publish("\n".join(lines) + "\n", out)


if __name__ == "__main__":
    main()
