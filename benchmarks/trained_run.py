"""What the benchmarks that study one trained model share: the options that name the run (config,
dataset, attack, arch, seed, threads) and loading its model and clean budget as the purify job does."""

from __future__ import annotations

import click
import torch

from pipeline_pkg import stages
from pipeline_pkg.config import clean_budget_settings
from pipeline_pkg.runtime import pick_device, seed_everything

RUN_OPTIONS = [
    click.option("--config", "config_path", default="config/config.yaml", show_default=True),
    click.option("--dataset", default="rf1024", show_default=True),
    click.option("--attack", default="burst", show_default=True),
    click.option("--arch", default="rf_cnn", show_default=True),
    click.option("--seed", default=0, show_default=True),
    click.option("--threads", default=1, show_default=True),
]


def run_options(command):
    """Add RUN_OPTIONS to a click command, in their listed order."""
    for option in reversed(RUN_OPTIONS):
        command = option(command)
    return command


def open_run(config: dict, dataset: str, attack: str, arch: str, seed: int, threads: int):
    """(device, poison-stage tensors, trained model, clean-budget x, y) of one run, seeded."""
    device: torch.device = pick_device(config["device"])
    seed_everything(seed, threads)
    data, model = stages.load_trained(config, dataset, attack, arch, seed, device)
    x, y = stages.clean_budget(data, clean_budget_settings(config, dataset), seed)
    return device, data, model, x, y
