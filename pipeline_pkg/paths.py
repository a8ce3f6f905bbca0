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


def summary_files(results: str | Path, dataset: str) -> dict[str, Path]:
    base = Path(results) / "summary"
    return {ext: base / f"{dataset}.{ext}" for ext in ("csv", "md", "png")}


def resolved_config_file(results: str | Path) -> Path:
    """The config of the last Snakemake invocation, defaults filled: what the CLI reruns use."""
    return Path(results) / "config.yaml"
