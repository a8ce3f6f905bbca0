"""What every rule script shares: logging into the rule's log file, starting with the CLI command that
reruns the same job by hand, and the resolved config. Keeps the scripts in workflow/scripts/ to a call."""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator

from .paths import resolved_config_file

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Which wildcards each CLI subcommand takes, in order.
CLI_ARGS = {
    "download": ("dataset",),
    "build-dataset": ("dataset",),
    "poison": ("dataset", "attack", "seed"),
    "train": ("dataset", "attack", "arch", "seed"),
    "purify": ("dataset", "attack", "arch", "seed", "defense"),
    "evaluate": ("dataset", "attack", "arch", "seed", "defense"),
    "detect": ("dataset", "attack", "arch", "seed", "detector"),
    "retrain": ("dataset", "attack", "arch", "seed", "detector"),
    "aggregate": ("dataset",),
    "render-trigger": ("dataset", "attack"),
}


def rerun_command(command: str, config_file: Path, values: dict[str, Any]) -> str:
    args = ["python", "-m", "pipeline_pkg", command, "--config", str(config_file)]
    for key in CLI_ARGS[command]:
        args += [f"--{key}", str(values[key])]
    return shlex.join(args)


@contextlib.contextmanager
def job(snakemake: Any, command: str, **fixed: Any) -> Iterator[dict]:
    """Set up one Snakemake job: log to its log file (and stderr, for the cluster's job log), write the
    equivalent CLI command first, and yield the config Snakemake validated."""
    config = snakemake.config
    log_file = Path(snakemake.log[0])
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text("")
    # Both the handler and the redirected stderr append, so neither overwrites the other's lines.
    handlers = [logging.FileHandler(log_file, mode="a"), logging.StreamHandler(sys.stderr)]
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=handlers, force=True)
    logging.captureWarnings(True)
    # tqdm writes to stderr; route it to the same log so the progress bar shows in the rule's log.
    sys.stderr = open(log_file, "a", buffering=1)
    log = logging.getLogger("pipeline_pkg.job")
    values = {**dict(snakemake.wildcards.items()), **fixed}
    log.info("rerun by hand: %s", rerun_command(command, resolved_config_file(config["results_dir"]), values))
    try:
        yield config
    except Exception:
        log.exception("job failed")
        # The traceback is logged once; an uncaught exception would print it again into the same file.
        raise SystemExit(1) from None
