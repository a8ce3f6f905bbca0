"""Run one defense on a model the pipeline trained, with the config's hyper-parameters overridden by
--params, and print ACC/ASR/RA before and after with the wall time: the tool behind the README's FIP
measurements. --clean-augment overrides the dataset's clean_budget.augment (comma-separated; "" for none).

    python benchmarks/purify_sweep.py --attack burst --defense fip --params '{"steps": 300}'

Reads results/<dataset>/<attack>/<arch>/seed<seed>/model.pt and the poison file next to it (run
`snakemake --cores 2` first); writes nothing."""

from __future__ import annotations

import json

import click

from pipeline_pkg import stages
from pipeline_pkg.config import load
from pipeline_pkg.evaluator import attack_metrics
from trained_run import open_run, run_options  # benchmarks/trained_run.py: scripts run from this folder


@click.command()
@run_options
@click.option("--defense", default="fip", show_default=True)
@click.option("--params", default="{}", help="the defense's hyper-parameters as JSON")
@click.option("--clean-augment", default=None, help="e.g. rotate,roll,conjugate; default: the config's")
def main(config_path, dataset, attack, arch, seed, defense, params, clean_augment, threads) -> None:
    config = load(config_path)
    if clean_augment is not None:
        budget = config["datasets"][dataset].setdefault("clean_budget", {})
        budget["augment"] = [name for name in clean_augment.split(",") if name]
    _, data, model, x, y = open_run(config, dataset, attack, arch, seed, threads)
    before = attack_metrics(model, data)
    method = stages.make_defense(config, dataset, defense, json.loads(params))
    purified, seconds = stages.timed_purify(method, model, x, y, seed)
    after = attack_metrics(purified, data)
    click.echo(json.dumps({"attack": attack, "defense": defense, "params": json.loads(params),
                           "clean_augment": method.clean_augment,
                           "before": before, "after": after, "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
