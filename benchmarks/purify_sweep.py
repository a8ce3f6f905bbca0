"""Run one defense on a model the pipeline trained, with the config's hyper-parameters overridden by
--params, and print ACC/ASR/RA before and after with the wall time: the tool behind the README's FIP
measurements. --clean-augment overrides the dataset's clean_budget.augment (comma-separated; "" for none).

    python benchmarks/purify_sweep.py --attack burst --defense fip --params '{"steps": 300}'
    python benchmarks/purify_sweep.py --dataset digits --attack blend --arch resnet9 --defense fip \
        --defense-seeds 0,1,2

Reads results/<dataset>/<attack>/<arch>/seed<seed>/model.pt and the poison file next to it (run
`snakemake --cores 2` first); writes nothing."""

from __future__ import annotations

import copy
import json
import statistics

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
@click.option("--defense-seeds", default=None,
              help="comma-separated purification seeds (default: the run's --seed); each purifies a fresh "
                   "copy of the trained model, and the line ends with mean ± sd over them")
def main(config_path, dataset, attack, arch, seed, defense, params, clean_augment, defense_seeds, threads) -> None:
    config = load(config_path)
    if clean_augment is not None:
        budget = config["datasets"][dataset].setdefault("clean_budget", {})
        budget["augment"] = [name for name in clean_augment.split(",") if name]
    _, data, model, x, y = open_run(config, dataset, attack, arch, seed, threads)
    before = attack_metrics(model, data)
    runs = []
    for defense_seed in [int(s) for s in defense_seeds.split(",")] if defense_seeds else [seed]:
        method = stages.make_defense(config, dataset, defense, json.loads(params))
        purified, seconds = stages.timed_purify(method, copy.deepcopy(model), x, y, defense_seed)
        runs.append({"defense_seed": defense_seed, **attack_metrics(purified, data), "seconds": round(seconds, 1),
                     **method.diagnostics})
    summary = {key: {"mean": statistics.mean(r[key] for r in runs),
                     "sd": statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0, "n": len(runs)}
               for key in ("acc", "asr")}
    click.echo(json.dumps({"dataset": dataset, "attack": attack, "seed": seed, "defense": defense,
                           "params": json.loads(params), "clean_augment": method.clean_augment,
                           "before": before, "after": runs, "summary": summary}))


if __name__ == "__main__":
    main()
