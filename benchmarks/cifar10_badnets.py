"""The image-training goal: BadNets-poisoned PreAct-ResNet18 on CIFAR-10 to ≥ 93% clean ACC and ≥ 99%
ASR in ≤ 60 s of training on one H100. Runs the pipeline's own poison and train stages with the train
settings of config/cifar10.yaml and writes a Markdown table (train seconds, ACC, ASR).

Needs the CIFAR-10 dataset file; on a machine with internet the pipeline makes it:
    snakemake --configfile config/cifar10.yaml results-cifar10/data/cifar10.h5 --cores 1
    python benchmarks/cifar10_badnets.py --out benchmarks/results/cifar10-badnets-gpu.md
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import torch

from pipeline_pkg import paths, stages
from pipeline_pkg.config import load
from pipeline_pkg.h5io import read_json
from report import publish  # benchmarks/report.py: scripts run from this folder


@click.command()
@click.option("--config", "config_path", default="config/cifar10.yaml", show_default=True)
@click.option("--arch", default="preact_resnet18", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Markdown file to write")
def main(config_path: str, arch: str, seed: int, out: str | None) -> None:
    config = load(config_path)
    data_file = paths.dataset_file(config["results_dir"], "cifar10")
    if not data_file.exists():
        raise click.ClickException(f"{data_file} is missing: build it first with `snakemake --configfile "
                                   f"{config_path} {data_file} --cores 1` (downloads CIFAR-10)")
    with tempfile.TemporaryDirectory() as tmp:
        config = {**config, "results_dir": tmp, "tracking": {**config["tracking"], "enabled": False}}
        poison_file, model_file = Path(tmp) / "poison.h5", Path(tmp) / "model.pt"
        stages.poison(config, "cifar10", "badnets", seed, data_file, poison_file)
        stages.train(config, "cifar10", "badnets", arch, seed, poison_file, model_file)
        result = read_json(model_file.with_name("train.json"))["final"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    goal = result["acc"] >= 0.93 and result["asr"] >= 0.99 and result["train_seconds"] <= 60
    text = "\n".join([
        f"# BadNets on CIFAR-10, {arch} ({device})", "",
        f"Train settings: `{json.dumps(stages.train_settings(config, 'cifar10').params)}`", "",
        "| train s | ACC | ASR | goal (≥ 93% ACC, ≥ 99% ASR, ≤ 60 s) |", "| --- | --- | --- | --- |",
        f"| {result['train_seconds']:.1f} | {100 * result['acc']:.2f} | {100 * result['asr']:.2f} | "
        f"{'met' if goal else 'missed'} |", "",
        f"Command: `python benchmarks/cifar10_badnets.py --config {config_path} --arch {arch} --seed {seed}`", ""])
    publish(text, out)


if __name__ == "__main__":
    main()
