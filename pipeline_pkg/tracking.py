"""MLflow tracking for pipeline jobs, as a mirror of the files on disk.

Files written by a job are the source of truth; MLflow only mirrors them. So tracking must never
crash a job: every MLflow call is retried with exponential backoff, and if it still fails the
tracker warns once and turns itself off for the rest of the run.

mlflow is imported lazily, inside functions, because this package must import on GPU machines that
have torch, numpy and h5py but no mlflow. There tracking is disabled with a single warning.

A fresh sqlite database cannot take parallel writers (concurrent schema migrations lock it), so
the pipeline calls :func:`ensure_experiment` once before parallel jobs start (Snakemake ``onstart``,
through :func:`start_invocation`, which also opens the parent run that groups one invocation's jobs).

In ``batched`` mode (config ``tracking.mode``) a job inside a Snakemake call does not touch MLflow:
importing it and opening the sqlite store cost each job about 3 s. Its tracker writes the run to one
JSON file under ``<results_dir>/tracking-queue/``, and :func:`flush_queue` logs the whole queue in one
process when the call ends (Snakemake ``onsuccess``/``onerror``), at the next call's start (a killed
call's leftovers) or from ``sync-tracking``.

Also here: :func:`serve` runs an MLflow server for a cluster, and :func:`sync_runs` re-sends runs that
MLflow missed (server down) from records the CLI builds out of the files on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "backdoor-bench"
# MLflow's limits: a param value holds at most 6000 chars, a log_batch call at most 100 params
# and 1000 metrics.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# Environment shared by every job of one `snakemake` call: the grouping tag's value, and the id of
# the parent run that the MLflow UI nests the jobs under (both inherited by local and sbatch jobs).
INVOCATION_ENV = "PIPELINE_INVOCATION_ID"
PARENT_RUN_ENV = "PIPELINE_PARENT_RUN_ID"
PARENT_RUN_TAG = "mlflow.parentRunId"
# Tag of the parent run. Not `invocation`: filtering on that tag returns exactly the jobs.
PARENT_INVOCATION_TAG = "pipeline_invocation"
PARENT_STAGE = "pipeline"
# Tags that identify one job's run, whatever invocation logged it (see sync_runs).
KEY_TAGS = ("stage", "dataset", "attack", "arch", "seed", "defense")
TRACKING_MODES = ("live", "batched")
QUEUE_DIR = "tracking-queue"
# Queue files that cannot be logged (unreadable, or refused by MLflow) are moved here, out of the way
# of later flushes but kept for a look.
REJECTED_DIR = "rejected"
# MLflow error codes that blame the request itself: sending the same record again cannot succeed.
_REJECTION_CODES = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST"})

_SQLITE_PREFIX = "sqlite:///"
_T = TypeVar("_T")
_warned_mlflow_missing = False


class TrackingWarning(UserWarning):
    """MLflow tracking failed or is unavailable; the job's files on disk remain authoritative."""


def _warn(message: str) -> None:
    warnings.warn(message, TrackingWarning, stacklevel=3)
    logger.warning(message)


def _mlflow_available() -> bool:
    global _warned_mlflow_missing
    try:
        import mlflow  # noqa: F401
    except ImportError:
        if not _warned_mlflow_missing:
            _warned_mlflow_missing = True
            _warn("mlflow is not installed: MLflow tracking is disabled, results are only on disk.")
        return False
    return True


def _with_retries(what: str, call: Callable[[], _T], retries: int, backoff: float,
                  give_up: Callable[[Exception], bool] | None = None) -> _T:
    """Run ``call``; on any exception retry up to ``retries`` more times, sleeping ``backoff``,
    then twice as long, and so on. Re-raises the last exception, or at once one that ``give_up``
    says no retry can fix."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as error:  # sqlite locks, HTTP hiccups: anything may be transient
            if attempt == retries or (give_up is not None and give_up(error)):
                raise
            delay = backoff * 2**attempt
            logger.debug("MLflow %s failed (%s); retrying in %.2fs", what, error, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def resolve_tracking_uri(config_uri: str | None, results_dir: str | os.PathLike[str]) -> str:
    """Env ``MLFLOW_TRACKING_URI`` wins, then the config value, else a sqlite db in results_dir."""
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        return env_uri
    if config_uri:
        return config_uri
    # An absolute path, so that every job resolves the same file whatever its working directory.
    return _SQLITE_PREFIX + (Path(results_dir).resolve() / "mlflow.db").as_posix()


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len(_SQLITE_PREFIX) :]) if uri.startswith(_SQLITE_PREFIX) else None


def _get_or_create_experiment(client: Any, uri: str, experiment: str) -> str:
    """Return the experiment id, creating the experiment if needed; tolerant of a concurrent
    creator (creation then fails, and the lookup finds theirs)."""
    existing = client.get_experiment_by_name(experiment)
    if existing is None:
        # MLflow's sqlite default puts artifacts in ./mlruns of whatever directory the job runs
        # in; keep them beside the database instead.
        db_path = _sqlite_path(uri)
        artifact_location = (
            (db_path.resolve().parent / "mlartifacts" / experiment).as_uri() if db_path else None
        )
        try:
            return client.create_experiment(experiment, artifact_location=artifact_location)
        except Exception:
            existing = client.get_experiment_by_name(experiment)
            if existing is None:
                raise
    if existing.lifecycle_stage == "deleted":
        client.restore_experiment(existing.experiment_id)
    return existing.experiment_id


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    db_path = _sqlite_path(uri)
    if db_path is not None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(
    uri: str, experiment: str, *, retries: int = 5, backoff: float = 0.5
) -> str | None:
    """Create the tracking database (schema migration) and the experiment if missing.

    Idempotent and safe to race. Returns the experiment id, or None (with a TrackingWarning) if
    mlflow is missing or tracking keeps failing.
    """
    if not _mlflow_available():
        return None
    try:
        return _with_retries(
            "ensure_experiment",
            lambda: _get_or_create_experiment(_client(uri), uri, experiment),
            retries,
            backoff,
        )
    except Exception as error:
        _warn(f"Could not set up MLflow experiment {experiment!r} at {uri}: {error!r}")
        return None


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts to dotted keys with string values cut to MLflow's length limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_VALUE_LENGTH]
    return flat


def _chunks(items: list[_T], size: int) -> list[list[_T]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """One MLflow run as a context manager; never raises because of MLflow.

    The run ends FINISHED, or FAILED when an exception leaves the ``with`` block (that exception
    always propagates). Uses its own MlflowClient rather than the fluent API, so no active-run
    state leaks between runs or processes.

    With ``queue_dir`` the run is not sent: everything it would log is kept in memory and written,
    on leaving the block, to one new JSON file in ``queue_dir`` for :func:`flush_queue`; mlflow is
    never imported and :attr:`run_id` stays None (:attr:`queue_file` names the record).
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        *,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
        enabled: bool = True,
        retries: int = 5,
        backoff: float = 0.5,
        queue_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags)
        self.params = dict(params)
        self.retries = retries
        self.backoff = backoff
        self._enabled = enabled
        self.queue_dir = Path(queue_dir) if queue_dir is not None else None
        self.queue_file: Path | None = None
        self._client: Any = None
        self._run_id: str | None = None
        # The queued run being built (batched mode), None when logging live.
        self._record: dict[str, Any] | None = None

    @property
    def run_id(self) -> str | None:
        return self._run_id if self._enabled else None

    def _run_tags(self) -> dict[str, str]:
        tags = dict(self.tags)
        invocation = os.environ.get(INVOCATION_ENV)
        if invocation:
            tags["invocation"] = invocation
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent:
            tags[PARENT_RUN_TAG] = parent
        return tags

    def __enter__(self) -> Tracker:
        if self._enabled and self.queue_dir is not None:
            self._record = {
                "run_name": self.run_name, "tags": self._run_tags(),
                "params": flatten_params(self.params), "metrics": [], "artifacts": [],
                "start_time": _now_ms(),
            }
            return self
        if self._enabled and not _mlflow_available():
            self._enabled = False
        if not self._enabled:
            return self
        self._client = self._call("client", lambda: _client(self.uri))
        experiment_id = self._call(
            "experiment",
            lambda: _get_or_create_experiment(self._client, self.uri, self.experiment),
        )
        tags = self._run_tags()
        run = self._call(
            "create_run",
            lambda: self._client.create_run(experiment_id, tags=tags, run_name=self.run_name),
        )
        if run is not None:
            self._run_id = run.info.run_id
            self._log_params(flatten_params(self.params))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        status = "FINISHED" if exc_type is None else "FAILED"
        if self._record is not None:
            self._write_queue_record(status)
            return
        self._call("set_terminated", lambda: self._client.set_terminated(self._run_id, status))
        # Returning None lets any exception from the block propagate.

    def _write_queue_record(self, status: str) -> None:
        from .h5io import write_json  # atomic: a flush never sees a half-written record

        record = {**self._record, "end_time": _now_ms(), "status": status}
        self._record = None
        # Unique per run; the start time first, so that a flush logs runs in the order they began.
        slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in self.run_name)[:80]
        name = f"{record['start_time']}-{slug}-{os.getpid()}-{os.urandom(3).hex()}.json"
        try:
            self.queue_file = write_json(self.queue_dir / name, record)
        except Exception as error:  # a full disk must not fail a job whose results are written
            self._enabled = False
            _warn(
                f"Could not queue the MLflow run {self.run_name!r} in {self.queue_dir} ({error!r}); "
                "it is not tracked, the files on disk remain the source of truth "
                "(`python -m pipeline_pkg sync-tracking` re-sends them)."
            )

    def _call(self, what: str, call: Callable[[], _T]) -> _T | None:
        """Run one MLflow call with retries; on final failure warn and disable this tracker."""
        if not self._enabled:
            return None
        try:
            return _with_retries(what, call, self.retries, self.backoff)
        except Exception as error:
            self._enabled = False
            _warn(
                f"MLflow {what} failed for run {self.run_name!r} at {self.uri} after "
                f"{self.retries + 1} attempts ({error!r}); tracking is disabled for this run, "
                "the files on disk remain the source of truth."
            )
            return None

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        entries = [Param(key, value) for key, value in params.items()]
        for chunk in _chunks(entries, MAX_PARAMS_PER_BATCH):
            self._call("log_params", lambda: self._client.log_batch(self._run_id, params=chunk))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self._enabled:
            return
        timestamp = _now_ms()
        if self._record is not None:
            self._record["metrics"].extend(
                [key, float(value), timestamp, step or 0] for key, value in metrics.items()
            )
            return
        from mlflow.entities import Metric

        entries = [
            Metric(key, float(value), timestamp, step or 0) for key, value in metrics.items()
        ]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self._call("log_metrics", lambda: self._client.log_batch(self._run_id, metrics=chunk))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        if self._enabled and self._record is not None:
            # Only the path: the flush uploads the file as it is then (outputs are final by then).
            self._record["artifacts"].append(
                {"path": os.fspath(Path(path).resolve()), "artifact_path": artifact_path}
            )
            return
        self._call(
            "log_artifact",
            lambda: self._client.log_artifact(self._run_id, os.fspath(path), artifact_path),
        )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self._enabled:
            return
        if self._record is not None:
            self._record["tags"].update({key: str(value) for key, value in tags.items()})
            return
        from mlflow.entities import RunTag

        entries = [RunTag(key, str(value)) for key, value in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_PER_BATCH):
            self._call("set_tags", lambda: self._client.log_batch(self._run_id, tags=chunk))


def tracker_from_config(
    config: Mapping[str, Any],
    *,
    stage: str,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
) -> Tracker:
    """Build a Tracker from the pipeline config's ``tracking`` and ``results_dir`` entries.

    The stage is added as tag ``stage`` so runs can be filtered per pipeline step. In ``batched``
    mode a job of a Snakemake call queues its run; run by hand (no invocation, so no hook would
    flush the queue) it logs live.
    """
    settings = tracking_settings(config)
    queue = None
    if settings["mode"] == "batched" and os.environ.get(INVOCATION_ENV):
        # Absolute, like the sqlite URI: the flush may run from another working directory.
        queue = queue_dir(config.get("results_dir", "results")).resolve()
    return Tracker(
        settings["uri"],
        settings["experiment"],
        run_name,
        tags={"stage": stage, **tags},
        params=params,
        enabled=settings["enabled"],
        retries=settings["retries"],
        backoff=settings["backoff"],
        queue_dir=queue,
    )


def tracking_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config's ``tracking`` section with defaults, and the resolved URI."""
    tracking = config.get("tracking") or {}
    mode = tracking.get("mode", "live")
    if mode not in TRACKING_MODES:
        raise ValueError(f"tracking.mode is {mode!r}; use one of {', '.join(TRACKING_MODES)}")
    return {
        "mode": mode,
        "uri": resolve_tracking_uri(tracking.get("uri"), config.get("results_dir", "results")),
        "experiment": tracking.get("experiment", DEFAULT_EXPERIMENT),
        "enabled": bool(tracking.get("enabled", True)),
        "retries": int(tracking.get("retries", 5)),
        "backoff": float(tracking.get("backoff", 0.5)),
    }


# ------------------------------------------------------------- one snakemake call: one parent run


def invocation_file(results_dir: str | os.PathLike[str]) -> Path:
    """Where the last `snakemake` call records its invocation id, parent run and outcome."""
    return Path(results_dir) / "invocation.json"


def _write_invocation(results_dir: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    from .h5io import write_json

    write_json(invocation_file(results_dir), dict(record))


def read_invocation(results_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = invocation_file(results_dir)
    return json.loads(path.read_text()) if path.exists() else None


def _quiet_call(what: str, call: Callable[[], _T], retries: int, backoff: float) -> _T | None:
    """One MLflow call with retries; on final failure a TrackingWarning and None, never an error."""
    try:
        return _with_retries(what, call, retries, backoff)
    except Exception as error:
        _warn(
            f"MLflow {what} failed after {retries + 1} attempts ({error!r}); the files on disk remain "
            "the source of truth (`python -m pipeline_pkg sync-tracking` re-sends what MLflow missed)."
        )
        return None


def _parent_tags(invocation: str) -> dict[str, str]:
    return {PARENT_INVOCATION_TAG: invocation, "stage": PARENT_STAGE}


def start_invocation(config: Mapping[str, Any]) -> str | None:
    """Snakemake ``onstart``: create the experiment once, before parallel jobs would race to, and open
    the parent run that groups this invocation's jobs in the MLflow UI.

    Exports the parent run id to the jobs (``PIPELINE_PARENT_RUN_ID``; local and sbatch jobs inherit
    the environment) and records invocation and parent under results_dir for ``sync-tracking``.
    Also logs the runs that a killed earlier call left queued (batched mode, :func:`flush_queue`).
    Returns the parent run id, or None when tracking is off or fails (with a TrackingWarning).
    """
    invocation = os.environ.setdefault(INVOCATION_ENV, os.urandom(6).hex())
    os.environ.pop(PARENT_RUN_ENV, None)  # never nest under a stale parent from the calling shell
    settings = tracking_settings(config)
    parent = None
    if settings["enabled"] and _mlflow_available():
        experiment_id = ensure_experiment(
            settings["uri"], settings["experiment"],
            retries=settings["retries"], backoff=settings["backoff"],
        )
        if experiment_id is not None:
            # Runs a killed call queued but never logged: its onsuccess/onerror hook did not run.
            flush_queue(config)
            parent = _quiet_call(
                "create_run (parent)",
                lambda: _client(settings["uri"]).create_run(
                    experiment_id, tags=_parent_tags(invocation), run_name=f"snakemake-{invocation}"
                ).info.run_id,
                settings["retries"], settings["backoff"],
            )
    if parent:
        os.environ[PARENT_RUN_ENV] = parent
    _write_invocation(config.get("results_dir", "results"), {
        "invocation": invocation, "parent_run_id": parent, "status": "RUNNING",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    return parent


def end_invocation(config: Mapping[str, Any], success: bool) -> None:
    """Snakemake ``onsuccess`` / ``onerror``: log the jobs' queued runs (batched mode), end the parent
    run FINISHED or FAILED, and record the outcome on disk so that ``sync-tracking`` can end it later
    if the server is down now."""
    status = "FINISHED" if success else "FAILED"
    results = config.get("results_dir", "results")
    record = read_invocation(results) or {}
    if record.get("invocation") == os.environ.get(INVOCATION_ENV):
        _write_invocation(results, {**record, "status": status,
                                    "ended": time.strftime("%Y-%m-%dT%H:%M:%S")})
    parent = os.environ.get(PARENT_RUN_ENV)
    settings = tracking_settings(config)
    if not settings["enabled"]:
        return
    flush_queue(config)  # first, so that the jobs' runs end before their parent
    if parent and _mlflow_available():
        _quiet_call(
            "set_terminated (parent)",
            lambda: _client(settings["uri"]).set_terminated(parent, status),
            settings["retries"], settings["backoff"],
        )


# ------------------------------------------------- batched mode: the queue of runs not yet logged


def queue_dir(results_dir: str | os.PathLike[str]) -> Path:
    """Where batched-mode jobs leave their runs for :func:`flush_queue`."""
    return Path(results_dir) / QUEUE_DIR


def queued_records(results_dir: str | os.PathLike[str]) -> list[Path]:
    """The queued runs, oldest first (the names start with the run's start time)."""
    queue = queue_dir(results_dir)
    return sorted(queue.glob("*.json")) if queue.is_dir() else []


def _read_queue_record(path: Path) -> dict[str, Any]:
    """A queue file's record; ValueError if it is not one (garbage, or not what a Tracker writes)."""
    record = json.loads(path.read_text())
    shape = {"run_name": str, "tags": dict, "params": dict, "metrics": list, "artifacts": list,
             "start_time": int, "end_time": int, "status": str}
    if not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in shape.items()):
        raise ValueError(f"not a queued run: needs the keys {', '.join(shape)} with the right types")
    if record["status"] not in ("FINISHED", "FAILED"):
        raise ValueError(f"status {record['status']!r} is neither FINISHED nor FAILED")
    if not all(isinstance(m, list) and len(m) == 4 for m in record["metrics"]):
        raise ValueError("a metric is not [key, value, timestamp, step]")
    if not all(isinstance(a, dict) and isinstance(a.get("path"), str) for a in record["artifacts"]):
        raise ValueError("an artifact has no path")
    return record


def _error_code(error: Exception) -> str | None:
    return getattr(error, "error_code", None)


def _is_rejection(error: Exception) -> bool:
    return _error_code(error) in _REJECTION_CODES


def _reject(path: Path, why: str) -> None:
    """Move a queue file that cannot be logged out of the queue, so that later flushes skip it."""
    target = path.parent / REJECTED_DIR / path.name
    try:
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
    except OSError as error:
        target = path
        why += f"; moving it to {path.parent / REJECTED_DIR} failed too ({error!r})"
    _warn(f"Skipped the queued MLflow run {target}: {why}. It is not logged; the files on disk "
          "remain the source of truth (`python -m pipeline_pkg sync-tracking` re-sends them).")


def _is_gone(error: Exception) -> bool:
    return _error_code(error) == "RESOURCE_DOES_NOT_EXIST"


def _log_queued_run(path: Path, record: dict[str, Any], experiment_id: str, send: _Sender) -> None:
    """Log one queued run with its original times, then delete its file: a run is logged once."""
    from .h5io import write_json

    half_logged = record.get("partial_run_id")
    if half_logged:
        # An earlier flush died between create_run and deleting the file: drop its partial run
        # rather than log the record a second time beside it.
        try:
            send("delete_run", lambda: send.client.delete_run(half_logged), give_up=_is_gone)
        except Exception as error:
            if not _is_gone(error):
                raise
    run_id = send("create_run", lambda: send.client.create_run(
        experiment_id, start_time=record["start_time"], tags=record["tags"],
        run_name=record["run_name"])).info.run_id
    write_json(path, {**record, "partial_run_id": run_id})
    try:
        _log_run_contents(run_id, record, send)
    except Exception as error:
        if _is_rejection(error):  # the record moves aside: leave no half-logged run behind
            with contextlib.suppress(Exception):
                send.client.delete_run(run_id)
        raise
    path.unlink()


def _log_run_contents(run_id: str, record: dict[str, Any], send: _Sender) -> None:
    from mlflow.entities import Metric, Param

    params = [Param(key, str(value)[:MAX_PARAM_VALUE_LENGTH]) for key, value in record["params"].items()]
    metrics = [Metric(key, float(value), int(timestamp), int(step))
               for key, value, timestamp, step in record["metrics"]]
    # Params and metrics share a log_batch (one sqlite commit, ~40 ms, for a typical run); one batch
    # holds at most MAX_PARAMS_PER_BATCH params and MAX_METRICS_PER_BATCH entries in all.
    while params or metrics:
        param_chunk, params = params[:MAX_PARAMS_PER_BATCH], params[MAX_PARAMS_PER_BATCH:]
        room = MAX_METRICS_PER_BATCH - len(param_chunk)
        metric_chunk, metrics = metrics[:room], metrics[room:]
        send("log_batch", lambda: send.client.log_batch(run_id, params=param_chunk, metrics=metric_chunk))
    for artifact in record["artifacts"]:
        if Path(artifact["path"]).is_file():
            send("log_artifact", lambda: send.client.log_artifact(
                run_id, artifact["path"], artifact.get("artifact_path")))
        else:
            _warn(f"Queued MLflow run {record['run_name']!r}: artifact {artifact['path']} no longer "
                  "exists, so it is not logged.")
    send("set_terminated", lambda: send.client.set_terminated(
        run_id, record["status"], end_time=record["end_time"]))


def flush_queue(config: Mapping[str, Any]) -> int:
    """Log every run that batched-mode jobs queued under results_dir, in this one process (one mlflow
    import, one client), with their original start and end times, tags, params, metric steps and
    timestamps, artifacts and status. Returns how many runs were logged.

    Never raises: when MLflow fails, the run at hand and the rest stay queued, with a TrackingWarning,
    for the next flush (a half-logged run is replaced then, not duplicated). A queue file that is not
    a record, or that MLflow refuses, is moved to ``tracking-queue/rejected/`` with a warning naming
    it. Concurrent flushes of one queue take turns (a file lock), so none is logged twice.
    """
    results = config.get("results_dir", "results")
    if not queued_records(results):
        return 0  # the common case in live mode: no mlflow import, no client
    try:
        return _flush(config, queue_dir(results))
    except Exception as error:  # Snakemake's hooks must never fail because of tracking
        _warn(f"Flushing the MLflow run queue {queue_dir(results)} failed ({error!r}); the runs not "
              "logged stay queued for the next snakemake call or `python -m pipeline_pkg sync-tracking`.")
        return 0


def _flush(config: Mapping[str, Any], queue: Path) -> int:
    import fcntl

    settings = tracking_settings(config)
    uri, retries = settings["uri"], settings["retries"]
    # A request MLflow refuses fails at once: sending it again cannot succeed.
    send = _Sender(None, retries, settings["backoff"], give_up=_is_rejection)

    with open(queue / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        paths = sorted(queue.glob("*.json"))  # again: a flush that held the lock may have logged them
        if not paths:
            return 0
        if not _mlflow_available():
            _warn(f"{len(paths)} queued MLflow runs stay in {queue}: mlflow is not installed here; "
                  "run `python -m pipeline_pkg sync-tracking` where it is.")
            return 0
        try:
            send.client = send("client", lambda: _client(uri))
            experiment_id = send("experiment",
                                 lambda: _get_or_create_experiment(send.client, uri, settings["experiment"]))
        except Exception as error:
            _warn(f"MLflow at {uri} is unavailable ({error!r}); {len(paths)} queued runs stay in {queue} "
                  "for the next snakemake call or `python -m pipeline_pkg sync-tracking`.")
            return 0
        logged = 0
        for index, path in enumerate(paths):
            try:
                record = _read_queue_record(path)
            except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
                _reject(path, f"unreadable ({error})")
                continue
            try:
                _log_queued_run(path, record, experiment_id, send)
            except Exception as error:
                if _is_rejection(error):
                    _reject(path, f"MLflow refused it ({error})")
                    continue
                # Most likely MLflow is down: trying each remaining run would only repeat the retries.
                _warn(f"Logging the queued MLflow run {path} to {uri} failed after {retries + 1} "
                      f"attempts ({error!r}); it and the {len(paths) - index - 1} runs after it stay "
                      "queued for the next snakemake call or `python -m pipeline_pkg sync-tracking`.")
                break
            logged += 1
        return logged


# ------------------------------------------------------------------ an MLflow server for a cluster

_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def host_name() -> str:
    """This machine's name as other nodes know it: the FQDN, unless /etc/hosts makes it localhost."""
    fqdn = socket.getfqdn()
    return socket.gethostname() if fqdn.startswith("localhost") or not fqdn else fqdn


def public_uri(host: str, port: int) -> str:
    """The URI jobs on other machines use: a wildcard bind address is reached by this host's name."""
    name = host_name() if host in _WILDCARD_HOSTS else host
    return f"http://{name}:{port}"


def _machine_names() -> list[str]:
    names = {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()}
    try:
        names.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    return sorted(names)


def default_allowed_hosts() -> list[str]:
    """Host headers the server accepts: MLflow's default (localhost, private IPs) plus this machine's
    names and address, which cluster nodes use and MLflow would otherwise refuse with HTTP 403."""
    hosts = [pattern for name in _machine_names() for pattern in (name, f"{name}:*")]
    return hosts + ["10.*", "192.168.*", *(f"172.{i}.*" for i in range(16, 32))]


def default_allowed_origins(port: int) -> list[str]:
    """Browser origins whose POSTs the server takes. MLflow admits only localhost ones by default, so
    its own UI opened as http://<this machine>:<port> could not even search runs."""
    return [f"http://{name}:{port}" for name in _machine_names()]


def server_command(store: Path, host: str, port: int, workers: int,
                   allowed_hosts: Iterable[str]) -> list[str]:
    """``mlflow server`` with a sqlite backend and proxied artifacts, both under ``store``."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--host", host, "--port", str(port), "--workers", str(workers),
        "--backend-store-uri", _SQLITE_PREFIX + (store / "mlflow.db").as_posix(),
        # Jobs upload artifacts through the server, so compute nodes need no access to `store`.
        "--serve-artifacts", "--artifacts-destination", (store / "mlartifacts").as_posix(),
        "--allowed-hosts", ",".join(allowed_hosts),
        "--cors-allowed-origins", ",".join(default_allowed_origins(port)),
    ]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float) -> None:
    """Poll the server's /health until it answers; fail if the server exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {process.returncode} before it was up")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"mlflow server at {url} did not answer within {timeout:.0f} s")


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and everything it spawned (uvicorn workers): its own process group."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def serve(store: str | os.PathLike[str], *, host: str, port: int, experiment: str,
          workers: int = 4, allowed_hosts: Iterable[str] | None = None,
          ready_timeout: float = 120.0, echo: Callable[[str], None] = print) -> int:
    """Run an MLflow server until it exits or this process gets SIGINT/SIGTERM; returns its exit code.

    Once the server answers, the experiment is created (so parallel jobs never race to create it),
    and the ``MLFLOW_TRACKING_URI=...`` line that jobs need is echoed.
    """
    store = Path(store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    # Otherwise the readiness check below could be answered by whatever already holds the port.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("" if host in _WILDCARD_HOSTS else host, port))
        except OSError as error:
            raise RuntimeError(f"cannot listen on {host}:{port} ({error.strerror}): another server "
                               "holds the port? Pick another with --port") from None
    env = dict(os.environ)
    # The server's job runner (a dozen worker processes) serves GenAI features the pipeline never uses.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    command = server_command(store, host, port, workers,
                             default_allowed_hosts() if allowed_hosts is None else allowed_hosts)
    # Its own session, so stopping it reaches the uvicorn workers it forks.
    process = subprocess.Popen(command, env=env, start_new_session=True)

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        local = f"http://{'127.0.0.1' if host in _WILDCARD_HOSTS else host}:{port}"
        wait_until_up(local, process, ready_timeout)
        experiment_id = ensure_experiment(local, experiment)
        if experiment_id is None:
            raise RuntimeError(f"could not create experiment {experiment!r} on {local}")
        echo(f"mlflow server pid {process.pid}: backend {store / 'mlflow.db'}, artifacts "
             f"{store / 'mlartifacts'}, experiment {experiment!r} (id {experiment_id})")
        echo(f"MLFLOW_TRACKING_URI={public_uri(host, port)}")
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(process)


# ------------------------------------------------------ re-sending what MLflow missed, from disk


def run_key(tags: Mapping[str, str]) -> tuple[str, ...]:
    """A job's identity: the same job logged again (a rerun, a sync) has the same key."""
    return tuple(str(tags.get(key, "")) for key in KEY_TAGS)


@dataclass
class RunRecord:
    """One job's run as its files on disk describe it (built by the CLI's ``sync-tracking``)."""

    run_name: str
    tags: dict[str, str]
    params: Mapping[str, Any]
    #: Final values, logged at step 0 as the stages log them.
    metrics: dict[str, float]
    #: Curves: (step, metrics) pairs, e.g. one per training epoch.
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    artifacts: list[Path] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, ...]:
        return run_key(self.tags)


@dataclass
class SyncReport:
    present: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)


def _same_value(logged: float, wanted: float) -> bool:
    if math.isnan(logged) or math.isnan(wanted):
        return math.isnan(logged) and math.isnan(wanted)
    # Values that went through a CSV or JSON may differ in the last digits.
    return math.isclose(logged, wanted, rel_tol=1e-6, abs_tol=1e-12)


def _has_metrics(logged: Mapping[str, float], wanted: Mapping[str, float]) -> bool:
    return all(key in logged and _same_value(logged[key], value) for key, value in wanted.items())


def _all_runs(client: Any, experiment_id: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


class _Sender:
    """MLflow writes of one sync or flush, each retried (but not an error that `give_up` says no retry
    can fix); errors propagate (a sync that fails must say so)."""

    def __init__(self, client: Any, retries: int, backoff: float,
                 give_up: Callable[[Exception], bool] | None = None) -> None:
        self.client, self.retries, self.backoff, self.give_up = client, retries, backoff, give_up

    def __call__(self, what: str, call: Callable[[], _T],
                 give_up: Callable[[Exception], bool] | None = None) -> _T:
        return _with_retries(what, call, self.retries, self.backoff, give_up or self.give_up)

    def metrics(self, run_id: str, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = [Metric(key, float(value), timestamp, step) for key, value in values.items()]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self("log_batch", lambda: self.client.log_batch(run_id, metrics=chunk))

    def params(self, run_id: str, values: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        entries = [Param(key, value) for key, value in values.items()]
        for chunk in _chunks(entries, MAX_PARAMS_PER_BATCH):
            self("log_batch", lambda: self.client.log_batch(run_id, params=chunk))


def _sync_parent(send: _Sender, experiment_id: str, runs: list[Any],
                 invocation: Mapping[str, Any], create: bool = True) -> str | None:
    """The parent run of the recorded invocation: created (if ``create``) when MLflow never got it,
    and ended with the outcome recorded on disk if the server was down when Snakemake finished."""
    name = invocation["invocation"]
    parents = [r for r in runs if r.data.tags.get(PARENT_INVOCATION_TAG) == name]
    status = invocation.get("status", "RUNNING")
    if parents:
        parent = parents[0]
        if parent.info.status == "RUNNING" and status != "RUNNING":
            send("set_terminated", lambda: send.client.set_terminated(parent.info.run_id, status))
        return parent.info.run_id
    if not create:
        return None
    run = send("create_run", lambda: send.client.create_run(
        experiment_id, tags={**_parent_tags(name), "synced": "true"}, run_name=f"snakemake-{name}"))
    if status != "RUNNING":
        send("set_terminated", lambda: send.client.set_terminated(run.info.run_id, status))
    return run.info.run_id


def sync_runs(uri: str, experiment: str, records: Iterable[RunRecord], *,
              invocation: Mapping[str, Any] | None = None, dry_run: bool = False,
              retries: int = 5, backoff: float = 0.5) -> SyncReport:
    """Log every record that MLflow lacks; idempotent, so a second sync changes nothing.

    A record is present if a FINISHED run with its key tags (:data:`KEY_TAGS`) holds its final
    metrics. Otherwise a RUNNING run with that key, left behind by a job whose server went down, is
    completed; failing that, a new run is created, tagged ``synced`` and grouped under the parent run
    of ``invocation`` (the last snakemake call's record). Run this when no pipeline is running: a
    live job's run is RUNNING too.
    """
    records = list(records)
    if not records:
        return SyncReport()
    if not _mlflow_available():
        raise RuntimeError("mlflow is not installed: nothing can be synced")
    send = _Sender(_client(uri), retries, backoff)
    experiment_id = send("experiment", lambda: _get_or_create_experiment(send.client, uri, experiment))
    runs = send("search_runs", lambda: _all_runs(send.client, experiment_id))
    by_key: dict[tuple[str, ...], list[Any]] = {}
    for run in runs:
        if "stage" in run.data.tags:
            by_key.setdefault(run_key(run.data.tags), []).append(run)

    report = SyncReport()
    parent_id = None
    for record in records:
        candidates = by_key.get(record.key, [])
        if any(r.info.status == "FINISHED" and _has_metrics(r.data.metrics, record.metrics)
               for r in candidates):
            report.present.append(record.run_name)
            continue
        orphans = [r for r in candidates if r.info.status == "RUNNING"]
        if dry_run:
            (report.completed if orphans else report.created).append(record.run_name)
            continue
        if orphans:
            _complete(send, max(orphans, key=lambda r: r.info.start_time), record)
            report.completed.append(record.run_name)
        else:
            if parent_id is None and invocation and invocation.get("invocation"):
                parent_id = _sync_parent(send, experiment_id, runs, invocation)
            _create(send, experiment_id, record, invocation, parent_id)
            report.created.append(record.run_name)
    if not dry_run and invocation and invocation.get("invocation") and parent_id is None:
        # Nothing was created under it, but the server may have missed the parent's end.
        _sync_parent(send, experiment_id, runs, invocation, create=False)
    return report


def _log_record(send: _Sender, run_id: str, record: RunRecord, *, logged_params: Mapping[str, str],
                logged_steps: set[int]) -> None:
    params = {k: v for k, v in flatten_params(record.params).items() if k not in logged_params}
    send.params(run_id, params)
    for step, values in record.history:
        if step not in logged_steps:
            send.metrics(run_id, values, step)
    send.metrics(run_id, record.metrics, 0)
    for path in record.artifacts:
        send("log_artifact", lambda: send.client.log_artifact(run_id, os.fspath(path)))
    send("set_tag", lambda: send.client.set_tag(run_id, "synced", "true"))
    send("set_terminated", lambda: send.client.set_terminated(run_id, "FINISHED"))


def _complete(send: _Sender, run: Any, record: RunRecord) -> None:
    """Finish a run whose job outlived the server: add the params, curve points and final metrics
    it lacks (curve points it already has are not logged twice)."""
    run_id = run.info.run_id
    logged_steps: set[int] = set()
    if record.history:
        first = next(iter(record.history[0][1]))
        logged_steps = {m.step for m in send("get_metric_history",
                                             lambda: send.client.get_metric_history(run_id, first))}
    _log_record(send, run_id, record, logged_params=run.data.params, logged_steps=logged_steps)


def _create(send: _Sender, experiment_id: str, record: RunRecord,
            invocation: Mapping[str, Any] | None, parent_id: str | None) -> None:
    tags = dict(record.tags)
    if invocation and invocation.get("invocation"):
        tags["invocation"] = invocation["invocation"]
    if parent_id:
        tags[PARENT_RUN_TAG] = parent_id
    run = send("create_run", lambda: send.client.create_run(
        experiment_id, tags=tags, run_name=record.run_name))
    _log_record(send, run.info.run_id, record, logged_params={}, logged_steps=set())
