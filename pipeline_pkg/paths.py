"""One readable path pattern for every output: <results>/<dataset>/<attack>/<arch>/seed<seed>/<defense>/.
The Snakefile and the CLI both build paths here, so a job rerun by hand writes where Snakemake looks."""

from __future__ import annotations

from pathlib import Path


def dataset_file(results: str | Path, dataset: str) -> Path:
    return Path(results) / "data" / f"{dataset}.h5"


def poison_file(results: str | Path, dataset: str, attack: str, seed: int | str) -> Path:
    return Path(results) / dataset / attack / f"poison-seed{seed}.h5"


def train_dir(results: str | Path, dataset: str, attack: str, arch: str, seed: int | str) -> Path:
    return Path(results) / dataset / attack / arch / f"seed{seed}"


def defense_dir(results, dataset, attack, arch, seed, defense) -> Path:
    return train_dir(results, dataset, attack, arch, seed) / defense


# The defense that leaves the model as trained: it has no purify job, its evaluation reads RUN/model.pt.
NO_DEFENSE = "none"


def purified_model(results, dataset, attack, arch, seed, defense) -> Path:
    """The model a method's evaluation measures: its own model.pt, or for `none` the trained one (a
    copy of it would be a job that only loads and saves)."""
    if defense == NO_DEFENSE:
        return train_dir(results, dataset, attack, arch, seed) / "model.pt"
    return defense_dir(results, dataset, attack, arch, seed, defense) / "model.pt"


def purify_report(results, dataset, attack, arch, seed, defense) -> Path | None:
    """The purify (or retrain) job's purify.json; None for `none`, which has no such job."""
    if defense == NO_DEFENSE:
        return None
    return defense_dir(results, dataset, attack, arch, seed, defense) / "purify.json"


def undefended_metrics(results, dataset, attack, arch, seed, defense) -> Path | None:
    """The `none` evaluation's metrics.json, which every other method's evaluation reads its undefended
    numbers from; None for `none` itself, which measures them."""
    if defense == NO_DEFENSE:
        return None
    return defense_dir(results, dataset, attack, arch, seed, NO_DEFENSE) / "metrics.json"


def trigger_figure(results: str | Path, dataset: str, attack: str) -> Path:
    return Path(results) / "figures" / dataset / f"{attack}.png"


def summary_paths(out_dir: str | Path, dataset: str) -> dict[str, Path]:
    """The aggregate outputs of one dataset in `out_dir`: results table (csv, md), plot (png) and
    detection table (detection_csv, detection_md)."""
    out_dir = Path(out_dir)
    return {**{ext: out_dir / f"{dataset}.{ext}" for ext in ("csv", "md", "png")},
            **{f"detection_{ext}": out_dir / f"{dataset}.detection.{ext}" for ext in ("csv", "md")}}


def summary_files(results: str | Path, dataset: str) -> dict[str, Path]:
    return summary_paths(Path(results) / "summary", dataset)


def resolved_config_file(results: str | Path) -> Path:
    """The config of the last Snakemake invocation, defaults filled: what the CLI reruns use."""
    return Path(results) / "config.yaml"
