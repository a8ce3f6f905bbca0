"""Each listed defense on each of a dataset's trained backdoored models, purified under several defense
seeds (the trained model and its clean budget fixed): ACC and ASR as mean ± sd over the seeds, with n.
A defense's own variance, which one purification per model hides.

    snakemake --cores 2 --until train
    python benchmarks/defense_seeds.py --dataset digits --arch resnet9 \\
        --defenses fip,fast_fip,nft,ngf,anp --defense-seeds 0,1,2 \\
        --out benchmarks/results/defense-seeds-digits-cpu.md

Hyper-parameters are the config's (`defenses.<name>`, then the dataset's `defense_settings`), then
--params (JSON: defense → overrides). Writes the Markdown table and, beside it, every run as JSON."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import click

from pipeline_pkg import stages
from pipeline_pkg.config import load
from pipeline_pkg.evaluator import attack_metrics
from report import publish  # benchmarks/report.py: scripts run from this folder
from trained_run import open_run, run_options  # benchmarks/trained_run.py


def spread(values: list[float]) -> str:
    """`mean ± sd` in percent; sd is the sample standard deviation (0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


@click.command()
@run_options
@click.option("--attacks", default=None, help="comma-separated; default: the dataset's attacks in the config, but `none`")
@click.option("--defenses", default="fip,fast_fip,nft,ngf,anp", show_default=True)
@click.option("--defense-seeds", default="0,1,2", show_default=True)
@click.option("--params", default="{}", help='JSON: defense → hyper-parameter overrides, e.g. {"fast_fip": {"steps": 250}}')
@click.option("--out", default=None, help="also write the table here (and the runs to the same name .json)")
def main(config_path, dataset, attack, arch, seed, threads, attacks, defenses, defense_seeds, params, out) -> None:
    config = load(config_path)
    overrides = json.loads(params)
    attacks = attacks.split(",") if attacks else [a for a in config["datasets"][dataset]["attacks"] if a != "none"]
    defenses, seeds = defenses.split(","), [int(s) for s in defense_seeds.split(",")]
    runs, rows = [], []
    for name in attacks:
        _, data, model, x, y = open_run(config, dataset, name, arch, seed, threads)
        before = attack_metrics(model, data)
        cells = [f"{100 * before['acc']:.1f} / {100 * before['asr']:.1f}"]
        for defense in defenses:
            results = []
            for defense_seed in seeds:
                method = stages.make_defense(config, dataset, defense, overrides.get(defense))
                purified, seconds = stages.timed_purify(method, copy.deepcopy(model), x, y, defense_seed)
                results.append({"attack": name, "defense": defense, "defense_seed": defense_seed,
                                **attack_metrics(purified, data), "seconds": seconds, **method.diagnostics})
                click.echo(json.dumps(results[-1]), err=True)
            runs += results
            cells.append(f"{spread([r['acc'] for r in results])} / {spread([r['asr'] for r in results])}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    header = " | ".join(f"`{d}` ACC / ASR" for d in defenses)
    lines = [f"# Defenses under {len(seeds)} defense seeds on {dataset} / {arch} / training seed {seed}", "",
             f"Each cell: mean ± sd over defense seeds {seeds} (n = {len(seeds)}), in %; the trained model and "
             f"its clean budget ({len(x)} samples) are fixed. Overrides: {overrides or 'none'}.", "",
             f"Command: `python benchmarks/defense_seeds.py --config {config_path} --dataset {dataset} --arch {arch} "
             f"--seed {seed} --attacks {','.join(attacks)} --defenses {','.join(defenses)} "
             f"--defense-seeds {','.join(map(str, seeds))} --params '{json.dumps(overrides)}'`", "",
             f"| attack | undefended ACC / ASR | {header} |", "| --- | --- | " + " | ".join("---" for _ in defenses) + " |",
             *rows]
    seconds = {d: statistics.median(r["seconds"] for r in runs if r["defense"] == d) for d in defenses}
    lines += ["", "Median seconds per purification (one thread): "
              + ", ".join(f"`{d}` {s:.1f}" for d, s in seconds.items())]
    publish("\n".join(lines) + "\n", out)
    if out:
        Path(out).with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
