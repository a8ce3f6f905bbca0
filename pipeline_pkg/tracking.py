"""MLflow tracking for pipeline jobs, as a mirror of the files on disk.

Files written by a job are the source of truth; MLflow only mirrors them. So tracking must never
crash a job: every MLflow call is retried with exponential backoff, and if it still fails the
tracker warns once and turns itself off for the rest of the run.

mlflow is imported lazily, inside functions, because this package must import on GPU machines that
have torch, numpy and h5py but no mlflow. There tracking is disabled with a single warning.

A fresh sqlite database cannot take parallel writers (concurrent schema migrations lock it), so
the pipeline calls :func:`ensure_experiment` once before parallel jobs start (Snakemake ``onstart``).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping
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


def _with_retries(what: str, call: Callable[[], _T], retries: int, backoff: float) -> _T:
    """Run ``call``; on any exception retry up to ``retries`` more times, sleeping ``backoff``,
    then twice as long, and so on. Re-raises the last exception."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as error:  # sqlite locks, HTTP hiccups: anything may be transient
            if attempt == retries:
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


class Tracker:
    """One MLflow run as a context manager; never raises because of MLflow.

    The run ends FINISHED, or FAILED when an exception leaves the ``with`` block (that exception
    always propagates). Uses its own MlflowClient rather than the fluent API, so no active-run
    state leaks between runs or processes.
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
    ) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags)
        self.params = dict(params)
        self.retries = retries
        self.backoff = backoff
        self._enabled = enabled
        self._client: Any = None
        self._run_id: str | None = None

    @property
    def run_id(self) -> str | None:
        return self._run_id if self._enabled else None

    def __enter__(self) -> Tracker:
        if self._enabled and not _mlflow_available():
            self._enabled = False
        if not self._enabled:
            return self
        self._client = self._call("client", lambda: _client(self.uri))
        experiment_id = self._call(
            "experiment",
            lambda: _get_or_create_experiment(self._client, self.uri, self.experiment),
        )
        tags = dict(self.tags)
        invocation = os.environ.get("PIPELINE_INVOCATION_ID")
        if invocation:
            tags["invocation"] = invocation
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
        self._call("set_terminated", lambda: self._client.set_terminated(self._run_id, status))
        # Returning None lets any exception from the block propagate.

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
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = [
            Metric(key, float(value), timestamp, step or 0) for key, value in metrics.items()
        ]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self._call("log_metrics", lambda: self._client.log_batch(self._run_id, metrics=chunk))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self._call(
            "log_artifact",
            lambda: self._client.log_artifact(self._run_id, os.fspath(path), artifact_path),
        )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self._enabled:
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

    The stage is added as tag ``stage`` so runs can be filtered per pipeline step.
    """
    tracking = config.get("tracking") or {}
    uri = resolve_tracking_uri(tracking.get("uri"), config.get("results_dir", "results"))
    return Tracker(
        uri,
        tracking.get("experiment", DEFAULT_EXPERIMENT),
        run_name,
        tags={"stage": stage, **tags},
        params=params,
        enabled=bool(tracking.get("enabled", True)),
    )
