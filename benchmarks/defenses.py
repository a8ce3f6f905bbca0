"""Time every defense on the same trained model and clean budget, side by side in one run, and write a
Markdown table: median wall seconds over --repeats, tunable parameters, ACC, ASR and λ_max after.

    snakemake --cores 2                      # trains the default models first
    python benchmarks/defenses.py --out benchmarks/results/defenses-rf1024-cpu.md

On a GPU the same command measures GPU times (CUDA is picked automatically; times are taken after
torch.cuda.synchronize())."""

from __future__ import annotations

import copy
import json
import platform
import statistics

import click
import torch

from pipeline_pkg import stages
from pipeline_pkg.config import load
from pipeline_pkg.evaluator import attack_metrics
from pipeline_pkg.registry import DEFENSES
from pipeline_pkg.sharpness import sharpness
from report import publish  # benchmarks/report.py: scripts run from this folder
from trained_run import open_run, run_options  # benchmarks/trained_run.py


@click.command()
@run_options
@click.option("--defenses", default="", help="comma-separated names (default: every registered defense)")
@click.option("--params", default="{}", help='JSON {defense: {param: value}} overriding the config')
@click.option("--repeats", default=1, show_default=True, help="timed runs per defense (median reported)")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Markdown file to write")
def main(config_path, dataset, attack, arch, seed, defenses, params, repeats, threads, out) -> None:
    config = load(config_path)
    device, data, backdoored, x, y = open_run(config, dataset, attack, arch, seed, threads)
    probe = (data["x_test"][:256], data["y_test"][:256])
    overrides = json.loads(params)
    names = [n for n in defenses.split(",") if n] or DEFENSES.names()

    before = {**attack_metrics(backdoored, data), **sharpness(backdoored, *probe, iterations=10, probes=1)}
    rows = [("undefended", 0.0, 0, before)]
    for name in names:
        seconds = []
        for _ in range(repeats):
            defense = stages.make_defense(config, dataset, name, overrides.get(name, {}))
            purified, elapsed = stages.timed_purify(defense, copy.deepcopy(backdoored), x, y, seed)
            seconds.append(elapsed)
        metrics = {**attack_metrics(purified, data), **sharpness(purified, *probe, iterations=10, probes=1)}
        rows.append((name, statistics.median(seconds), defense.tunable_parameters, metrics))
        click.echo(f"{name}: {statistics.median(seconds):.2f} s, ACC {metrics['acc']:.3f}, ASR {metrics['asr']:.3f}",
                   err=True)

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {threads} thread(s))"
    lines = [f"# Defenses on {dataset} / {attack} / {arch} / seed {seed}", "",
             f"Device: {device_name}; clean budget: {len(x)} samples; median of {repeats} run(s); "
             f"settings: the config's `defenses` section, defaults elsewhere, overrides `{params}`.", "",
             f"Command: `python benchmarks/defenses.py --config {config_path} --dataset {dataset} --attack {attack} "
             f"--arch {arch} --seed {seed} --repeats {repeats} --threads {threads}"
             + (f" --defenses {defenses}" if defenses else "") + (f" --params '{params}'" if params != "{}" else "") + "`", "",
             "| defense | seconds | tunable params | ACC % | ASR % | λ_max |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, secs, tunable, m in rows:
        lines.append(f"| {name} | {secs:.2f} | {tunable} | {100 * m['acc']:.1f} | {100 * m['asr']:.1f} | {m['lambda_max']:.0f} |")
    table = "\n".join(lines) + "\n"
    publish(table, out)


if __name__ == "__main__":
    main()
