"""The command line: one subcommand per pipeline stage, calling the same functions as the Snakemake rules,
so any job can be rerun by hand (`python -m pipeline_pkg train --help`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from . import paths, stages
from .config import ConfigError, defenses_for, detectors_for, load

CONFIG = click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                      default="config/config.yaml", show_default=True, help="pipeline config file")
DATASET = click.option("--dataset", required=True)
ATTACK = click.option("--attack", required=True)
ARCH = click.option("--arch", required=True)
SEED = click.option("--seed", type=int, required=True)
DEFENSE = click.option("--defense", required=True,
                       help="a defense, or detect-<detector> for the model retrained after detection")
DETECTOR = click.option("--detector", required=True)


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
    """Where the pipeline keeps one (dataset, attack, arch, seed, defense) job's inputs and outputs. For
    `none`, "purified" is the trained model and "report" is None: `none` has no purify job."""
    results = config["results_dir"]
    run = (results, dataset, attack, arch, seed, defense)
    out_dir = paths.defense_dir(*run)
    return {"poison": paths.poison_file(results, dataset, attack, seed),
            "backdoored": paths.train_dir(results, dataset, attack, arch, seed) / "model.pt",
            "out_dir": out_dir, "purified": paths.purified_model(*run), "report": paths.purify_report(*run),
            "metrics": out_dir / "metrics.json", "undefended": paths.undefended_metrics(*run)}


@main.command("purify")
@run_options
def purify_cmd(config_path, dataset, attack, arch, seed, defense) -> None:
    """Purify a trained model with one defense on the clean budget."""
    if defense == paths.NO_DEFENSE:
        raise click.UsageError("defense `none` has no purify job: its evaluation reads the trained model "
                               "itself (run `evaluate --defense none`)")
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
                               f["purified"], f["report"], f["metrics"], f["undefended"]))


def detect_options(command):
    """The options that name one detect/retrain job."""
    for option in reversed((CONFIG, DATASET, ATTACK, ARCH, SEED, DETECTOR)):
        command = option(command)
    return command


@main.command("detect")
@detect_options
def detect_cmd(config_path, dataset, attack, arch, seed, detector) -> None:
    """Score and flag suspicious training samples of one trained run with one detector."""
    config = _config(config_path)
    f = run_files(config, dataset, attack, arch, seed, stages.detect_folder(detector))
    train_dir = f["backdoored"].parent
    click.echo(stages.detect(config, dataset, attack, arch, seed, detector, f["poison"], f["backdoored"],
                             train_dir / "snapshots.pt", f["out_dir"]))


@main.command("retrain")
@detect_options
def retrain_cmd(config_path, dataset, attack, arch, seed, detector) -> None:
    """Train a fresh model on the training set minus one detector's flagged samples."""
    config = _config(config_path)
    f = run_files(config, dataset, attack, arch, seed, stages.detect_folder(detector))
    out_dir = f["out_dir"]
    click.echo(stages.retrain(config, dataset, attack, arch, seed, detector, f["poison"], out_dir / "flagged.h5",
                              out_dir / "detection.json", f["purified"], f["report"]))


@main.command("render-trigger")
@CONFIG
@DATASET
@ATTACK
@out_option("output PNG")
def render_trigger_cmd(config_path, dataset, attack, out) -> None:
    """Draw a clean test input beside its triggered copy (from the first seed's poison file)."""
    from .render import render_trigger

    config = _config(config_path)
    results = config["results_dir"]
    click.echo(render_trigger(paths.poison_file(results, dataset, attack, config["seeds"][0]),
                              out or paths.trigger_figure(results, dataset, attack)))


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
    detections = sorted({Path(f).parent / "detection.json" for f in files
                         if (Path(f).parent / "detection.json").exists()})
    out_dir = paths.summary_files(results, dataset)["csv"].parent
    for kind, path in aggregate(files, out_dir, config=config, dataset=dataset,
                                detection_files=detections).items():
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


@main.command("tracking-server")
@CONFIG
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; 0.0.0.0 lets compute nodes reach it")
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--store", type=click.Path(file_okay=False), default="mlflow-server", show_default=True,
              help="folder of the sqlite database (mlflow.db) and the artifacts (mlartifacts/)")
@click.option("--experiment", default=None, help="experiment to create (default: the config's)")
@click.option("--workers", type=int, default=4, show_default=True, help="server worker processes")
@click.option("--allowed-hosts", default=None,
              help="comma-separated Host headers to accept (default: this machine's names, "
                   "localhost and private IPs)")
def tracking_server_cmd(config_path, host, port, store, experiment, workers, allowed_hosts) -> None:
    """Run an MLflow server for a cluster's jobs: sqlite backend and proxied artifacts under --store.

    Creates the experiment before any job starts, then prints the MLFLOW_TRACKING_URI=... line to
    export where snakemake runs (sbatch jobs inherit it). Runs until interrupted.
    """
    from .tracking import serve

    name = experiment or _config(config_path)["tracking"]["experiment"]
    hosts = allowed_hosts.split(",") if allowed_hosts else None
    try:
        code = serve(store, host=host, port=port, experiment=name, workers=workers,
                     allowed_hosts=hosts, echo=lambda line: click.echo(line))
    except (RuntimeError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@main.command("sync-tracking")
@CONFIG
@click.option("--dry-run", is_flag=True, help="only list what would be sent")
def sync_tracking_cmd(config_path, dry_run) -> None:
    """Re-send to MLflow the runs it missed, from the results on disk (after a server outage).

    Every train, purify, evaluate and aggregate run whose files exist is checked against MLflow by
    its tags (stage, dataset, attack, arch, seed, defense); a missing one is logged, a run its job
    left RUNNING is completed. Running it twice sends nothing new. Use it when no pipeline runs.
    Runs that batched-mode jobs queued (tracking.mode: batched) are logged first, as they were.
    """
    from .tracking import flush_queue, queued_records, read_invocation, sync_runs, tracking_settings

    config = _config(config_path)
    queued = len(queued_records(config["results_dir"]))
    if queued:
        logged = 0 if dry_run else flush_queue(config)
        click.echo(f"{queued} queued runs would be logged" if dry_run
                   else f"{logged} of {queued} queued runs logged")
    records, skipped = sync_records(config)
    settings = tracking_settings(config)
    try:
        report = sync_runs(settings["uri"], settings["experiment"], records,
                           invocation=read_invocation(config["results_dir"]), dry_run=dry_run,
                           retries=settings["retries"], backoff=settings["backoff"])
    except Exception as exc:
        raise click.ClickException(f"sync to {settings['uri']} failed: {exc!r}") from exc
    verb = "would be " if dry_run else ""
    for name in report.completed:
        click.echo(f"{verb}completed: {name}")
    for name in report.created:
        click.echo(f"{verb}created: {name}")
    for note in skipped:
        click.echo(f"skipped: {note}", err=True)
    click.echo(f"{len(records)} runs on disk: {len(report.present)} already in MLflow, "
               f"{len(report.completed)} {verb}completed, {len(report.created)} {verb}created "
               f"({settings['uri']}, experiment {settings['experiment']!r})")


# The final metrics the evaluate stage logs (stages.evaluate), besides undefended_<metric>.
EVALUATE_METRICS = ("acc", "asr", "ra", "der", "purify_seconds", "trainable_params", "lambda_max",
                    "hessian_trace")


def sync_records(config: dict):
    """The runs that the results on disk describe, as the stages would have logged them, and notes on
    finished jobs that cannot be re-sent."""
    from .aggregate import DETECTION_KEYS, load_results, summarise, summary_metrics
    from .h5io import read_json
    from .tracking import RunRecord

    def floats(values: dict) -> dict[str, float]:
        return {k: float(v) for k, v in values.items() if v is not None}

    records, skipped = [], []
    results = config["results_dir"]
    for dataset, entry in config["datasets"].items():
        all_metrics = []
        for attack in entry["attacks"]:
            for arch in entry["archs"]:
                for seed in config["seeds"]:
                    settings = {**stages.job_settings(config, dataset, attack, arch), "seed": seed}
                    train_dir = paths.train_dir(results, dataset, attack, arch, seed)
                    if (train_dir / "model.pt").exists():
                        if (train_dir / "train.json").exists():
                            logged = read_json(train_dir / "train.json")
                            history = [(int(h.pop("epoch")), floats(h)) for h in logged["history"]]
                            records.append(RunRecord(
                                f"train/{dataset}/{attack}/{arch}/seed{seed}",
                                stages.tags("train", dataset, attack, arch, seed), settings,
                                floats(logged["final"]), history))
                        else:
                            skipped.append(f"{train_dir / 'model.pt'} has no train.json beside it "
                                           "(older results); rerun its train job to re-send it")
                    detect_folders = [stages.detect_folder(d) for d in detectors_for(config, dataset, attack)]
                    for defense in defenses_for(config, dataset, attack) + detect_folders:
                        detector = stages.detector_of(defense)
                        name = f"{dataset}/{attack}/{arch}/seed{seed}/{detector or defense}"
                        settings = {**stages.job_settings(config, dataset, attack, arch, defense),
                                    "seed": seed}
                        f = run_files(config, dataset, attack, arch, seed, defense)
                        all_metrics.append(f["metrics"])
                        detection = f["out_dir"] / "detection.json"
                        if detector and detection.exists():
                            found = read_json(detection)
                            records.append(RunRecord(
                                f"detect/{name}", stages.tags("detect", dataset, attack, arch, seed, defense),
                                settings, floats({k: found[k] for k in DETECTION_KEYS})))
                        # `none` has no purify job, hence no report and no purify run to re-send.
                        if f["report"] is not None and f["report"].exists() and f["purified"].exists():
                            stage = "retrain" if detector else "purify"
                            records.append(RunRecord(
                                f"{stage}/{name}", stages.tags(stage, dataset, attack, arch, seed, defense),
                                settings, floats(read_json(f["report"]))))
                        if f["metrics"].exists():
                            result = read_json(f["metrics"])
                            metrics = floats({k: result[k] for k in EVALUATE_METRICS if k in result})
                            metrics.update({f"undefended_{k}": v
                                            for k, v in floats(result["undefended"]).items()})
                            records.append(RunRecord(
                                f"evaluate/{name}", stages.tags("evaluate", dataset, attack, arch, seed,
                                                                defense),
                                settings, metrics))
        outputs = paths.summary_files(results, dataset)
        if all(p.exists() for p in [*outputs.values(), *all_metrics]):
            # The same numbers the aggregate job computed: from the same metrics files.
            frame = load_results(all_metrics)
            records.append(RunRecord(f"aggregate-{dataset}", {"stage": "aggregate", "dataset": dataset},
                                     {"n_results": len(frame)}, summary_metrics(summarise(frame)),
                                     artifacts=list(outputs.values())))
    return records, skipped


@main.command("list")
def list_cmd() -> None:
    """List the registered datasets, attacks, archs and defenses."""
    from .registry import REGISTRIES

    for kind, registry in REGISTRIES.items():
        click.echo(f"{kind}: {', '.join(registry.names())}")


if __name__ == "__main__":
    sys.exit(main())
