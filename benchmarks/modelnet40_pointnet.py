"""The point-cloud goal: a PointBA-I-poisoned PointNet on ModelNet40 (1024 points) to ≥ 88% clean ACC and
≥ 95% ASR in ≤ 60 s of training on one H100. Runs the pipeline's own poison and train stages with the
settings of the config (datasets.modelnet40: its params, train settings; models.pointnet; attacks) and
writes a Markdown table (train seconds, ACC, ASR). `train seconds` is the train stage's own clock: every
epoch, including its per-epoch test evaluation.

Needs the ModelNet40 dataset file; on a machine with internet the pipeline makes it (the archive is
~415 MiB; without internet put modelnet40_ply_hdf5_2048.zip into data_root/modelnet40/ first):
    snakemake --configfile config/modelnet40.yaml results-modelnet40/data/modelnet40.h5 --cores 1
    python benchmarks/modelnet40_pointnet.py --out benchmarks/results/modelnet40-pointnet-gpu.md

`--quick` checks the script anywhere, CPU included, without ModelNet40: the same stages on the generated
`shapes` dataset (10 classes of deformed mesh primitives, 256 points) with a quarter-width PointNet and a
few epochs. Its numbers say nothing about the goal.
    python benchmarks/modelnet40_pointnet.py --quick
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import torch

from pipeline_pkg import paths, stages
from pipeline_pkg.config import ConfigError, load, validate
from pipeline_pkg.h5io import read_json
from report import publish  # benchmarks/report.py: scripts run from this folder

DATASET = "modelnet40"
GOAL = {"acc": 0.88, "asr": 0.95, "train_seconds": 60.0}


def quick_config(arch: str, attack: str, seed: int, folder: str) -> dict:
    """A self-contained small config: the generated `shapes` dataset instead of ModelNet40."""
    return validate({
        "results_dir": folder, "data_root": folder, "seeds": [seed], "threads": 1,
        "datasets": {"shapes": {
            "archs": [arch], "attacks": [attack],
            "params": {"points": 256, "train_per_class": 40, "test_per_class": 10},
            "train": {"epochs": 10, "batch_size": 32, "lr": 0.01, "optimizer": "adamw"}}},
        "models": {arch: {"width": 0.25}},
        "defenses": {"none": {}},
        "tracking": {"enabled": False},
    })


def full_config(config_path: str) -> dict:
    if not Path(config_path).exists():
        raise click.ClickException(f"config {config_path} does not exist; pass --config a pipeline config with a "
                                   f"datasets.{DATASET} entry (or --quick to check the script without ModelNet40)")
    try:
        config = load(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if DATASET not in config["datasets"]:
        raise click.ClickException(f"{config_path} has no datasets.{DATASET} entry; add one (archs, attacks, its "
                                   f"train settings) or pass another --config")
    return config


@click.command()
@click.option("--config", "config_path", default="config/modelnet40.yaml", show_default=True)
@click.option("--arch", default="pointnet", show_default=True)
@click.option("--attack", default="pointba_i", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--epochs", type=int, default=None, help="override the config's epochs for this dataset")
@click.option("--batch-size", type=int, default=None, help="override the config's batch size for this dataset")
@click.option("--lr", type=float, default=None, help="override the config's learning rate for this dataset")
@click.option("--quick", is_flag=True, help="check the script on the small generated `shapes` dataset instead")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Markdown file to write")
def main(config_path: str, arch: str, attack: str, seed: int, epochs: int | None, batch_size: int | None,
         lr: float | None, quick: bool, out: str | None) -> None:
    overrides = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)) if v is not None}
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            dataset = "shapes"
            config = quick_config(arch, attack, seed, tmp)
            data_file = stages.build_dataset(config, dataset, Path(tmp) / "shapes.h5")
        else:
            dataset = DATASET
            config = full_config(config_path)
            data_file = paths.dataset_file(config["results_dir"], dataset)
            if not data_file.exists():
                raise click.ClickException(
                    f"{data_file} is missing: build it first with `snakemake --configfile {config_path} {data_file} "
                    f"--cores 1` (downloads ModelNet40, ~415 MiB), or run the script with --quick to check it "
                    f"without ModelNet40")
            config = {**config, "results_dir": tmp, "tracking": {**config["tracking"], "enabled": False}}
        config["datasets"][dataset]["train"] = {**config["datasets"][dataset].get("train", {}), **overrides}
        poison_file, model_file = Path(tmp) / "poison.h5", Path(tmp) / "model.pt"
        stages.poison(config, dataset, attack, seed, data_file, poison_file)
        stages.train(config, dataset, attack, arch, seed, poison_file, model_file)
        result = read_json(model_file.with_name("train.json"))["final"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    met = all(result[k] >= GOAL[k] for k in ("acc", "asr")) and result["train_seconds"] <= GOAL["train_seconds"]
    verdict = "n/a (--quick)" if quick else ("met" if met else "missed")
    arch_params = config["models"].get(arch, {})
    command = " ".join(["python benchmarks/modelnet40_pointnet.py",
                        *(["--quick"] if quick else [f"--config {config_path}"]),
                        f"--arch {arch} --attack {attack} --seed {seed}",
                        *(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())])
    text = "\n".join([
        f"# {attack} on {dataset}, {arch} ({device})", "",
        *(["Quick check on the generated `shapes` dataset, not ModelNet40: says nothing about the goal.", ""]
          if quick else []),
        (f"Train settings: `{json.dumps(stages.train_settings(config, dataset).params)}`; "
         f"arch: `{json.dumps(arch_params)}`; attack: `{json.dumps(config['attacks'].get(attack, {}))}`"), "",
        "| train s | ACC | ASR | goal (≥ 88% ACC, ≥ 95% ASR, ≤ 60 s) |", "| --- | --- | --- | --- |",
        f"| {result['train_seconds']:.1f} | {100 * result['acc']:.2f} | {100 * result['asr']:.2f} | {verdict} |", "",
        f"Command: `{command}`", ""])
    publish(text, out)


if __name__ == "__main__":
    main()
