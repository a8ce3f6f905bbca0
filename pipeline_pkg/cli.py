"""The command line: one subcommand per pipeline stage, calling the same functions as the Snakemake rules,
so any job can be rerun by hand (`python -m pipeline_pkg train --help`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from . import paths, stages
from .config import ConfigError, load

CONFIG = click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                      default="config/config.yaml", show_default=True, help="pipeline config file")
DATASET = click.option("--dataset", required=True)
ATTACK = click.option("--attack", required=True)
ARCH = click.option("--arch", required=True)
SEED = click.option("--seed", type=int, required=True)
DEFENSE = click.option("--defense", required=True)


def out_option(help_text: str):
    return click.option("--out", type=click.Path(dir_okay=False), default=None,
                        help=f"{help_text} (default: the path the pipeline uses)")


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def main(verbose: bool) -> None:
    """Backdoor attack and purification benchmark: run one pipeline stage."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _config(path: str) -> dict:
    try:
        return load(path)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


@main.command("download")
@CONFIG
@DATASET
def download_cmd(config_path: str, dataset: str) -> None:
    """Fetch a dataset's raw files into data_root/<dataset>/ (checksummed, resumable) and write its
    manifest.json."""
    click.echo(stages.download(_config(config_path), dataset))


@main.command("build-dataset")
@CONFIG
@DATASET
@out_option("output HDF5 file")
def build_dataset_cmd(config_path: str, dataset: str, out: str | None) -> None:
    """Generate a dataset (e.g. RF1024) or convert its downloaded files into one HDF5 file."""
    config = _config(config_path)
    manifest = Path(config["data_root"]) / dataset / "manifest.json"
    click.echo(stages.build_dataset(config, dataset, out or paths.dataset_file(config["results_dir"], dataset),
                                    manifest if manifest.exists() else None))


@main.command("poison")
@CONFIG
@DATASET
@ATTACK
@SEED
@click.option("--data", type=click.Path(exists=True), default=None, help="dataset HDF5 file")
@out_option("output HDF5 file")
def poison_cmd(config_path, dataset, attack, seed, data, out) -> None:
    """Poison the training set and build the triggered test set."""
    config = _config(config_path)
    results = config["results_dir"]
    click.echo(stages.poison(config, dataset, attack, seed, data or paths.dataset_file(results, dataset),
                             out or paths.poison_file(results, dataset, attack, seed)))


@main.command("train")
@CONFIG
@DATASET
@ATTACK
@ARCH
@SEED
@out_option("output model checkpoint")
def train_cmd(config_path, dataset, attack, arch, seed, out) -> None:
    """Train one (possibly backdoored) model on the poisoned training set."""
    config = _config(config_path)
    results = config["results_dir"]
    click.echo(stages.train(config, dataset, attack, arch, seed,
                            paths.poison_file(results, dataset, attack, seed),
                            out or paths.train_dir(results, dataset, attack, arch, seed) / "model.pt"))


def run_options(command):
    """The options that name one purify/evaluate job."""
    for option in reversed((CONFIG, DATASET, ATTACK, ARCH, SEED, DEFENSE)):
        command = option(command)
    return command


def run_files(config: dict, dataset: str, attack: str, arch: str, seed: int, defense: str) -> dict[str, Path]:
    """Where the pipeline keeps one (dataset, attack, arch, seed, defense) job's inputs and outputs."""
    results = config["results_dir"]
    out_dir = paths.defense_dir(results, dataset, attack, arch, seed, defense)
    return {"poison": paths.poison_file(results, dataset, attack, seed),
            "backdoored": paths.train_dir(results, dataset, attack, arch, seed) / "model.pt",
            "purified": out_dir / "model.pt", "report": out_dir / "purify.json", "metrics": out_dir / "metrics.json"}


@main.command("purify")
@run_options
def purify_cmd(config_path, dataset, attack, arch, seed, defense) -> None:
    """Purify a trained model with one defense on the clean budget."""
    config = _config(config_path)
    f = run_files(config, dataset, attack, arch, seed, defense)
    click.echo(stages.purify(config, dataset, attack, arch, seed, defense, f["poison"], f["backdoored"],
                             f["purified"], f["report"]))


@main.command("evaluate")
@run_options
def evaluate_cmd(config_path, dataset, attack, arch, seed, defense) -> None:
    """ACC, ASR, RA and DER of a purified model against its undefended original."""
    config = _config(config_path)
    f = run_files(config, dataset, attack, arch, seed, defense)
    click.echo(stages.evaluate(config, dataset, attack, arch, seed, defense, f["poison"], f["backdoored"],
                               f["purified"], f["report"], f["metrics"]))


@main.command("aggregate")
@CONFIG
@DATASET
@click.argument("metrics", nargs=-1, type=click.Path(exists=True, dir_okay=False))
def aggregate_cmd(config_path, dataset, metrics) -> None:
    """Tables and plot for one dataset from evaluate JSON files (default: all found under results)."""
    from .aggregate import aggregate

    config = _config(config_path)
    results = Path(config["results_dir"])
    files = list(metrics) or sorted((results / dataset).glob("*/*/seed*/*/metrics.json"))
    if not files:
        raise click.UsageError(f"no metrics.json found under {results / dataset}; run evaluate first")
    out_dir = paths.summary_files(results, dataset)["csv"].parent
    for kind, path in aggregate(files, out_dir, config=config, dataset=dataset).items():
        click.echo(f"{kind}: {path}")


@main.command("init-tracking")
@CONFIG
def init_tracking_cmd(config_path) -> None:
    """Create the MLflow database and experiment once, before parallel jobs race to create them."""
    from .tracking import ensure_experiment, resolve_tracking_uri

    config = _config(config_path)
    uri = resolve_tracking_uri(config["tracking"]["uri"], config["results_dir"])
    click.echo(f"{uri} experiment={config['tracking']['experiment']} "
               f"id={ensure_experiment(uri, config['tracking']['experiment'])}")


@main.command("list")
def list_cmd() -> None:
    """List the registered datasets, attacks, archs and defenses."""
    from .registry import REGISTRIES

    for kind, registry in REGISTRIES.items():
        click.echo(f"{kind}: {', '.join(registry.names())}")


if __name__ == "__main__":
    sys.exit(main())
