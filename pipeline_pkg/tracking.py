"""MLflow tracking for pipeline jobs, as a mirror of the files on disk.

Files written by a job are the source of truth; MLflow only mirrors them. So tracking must never
crash a job: every MLflow call is retried with exponential backoff, and if it still fails the
tracker warns once and turns itself off for the rest of the run.

mlflow is imported lazily, inside functions, because this package must import on GPU machines that
have torch, numpy and h5py but no mlflow. There tracking is disabled with a single warning.

A fresh sqlite database cannot take parallel writers (concurrent schema migrations lock it), so
the pipeline calls :func:`ensure_experiment` once before parallel jobs start (Snakemake ``onstart``,
through :func:`start_invocation`, which also opens the parent run that groups one invocation's jobs).

Also here: :func:`serve` runs an MLflow server for a cluster, and :func:`sync_runs` re-sends runs that
MLflow missed (server down) from records the CLI builds out of the files on disk.
"""

from __future__ import annotations

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
        invocation = os.environ.get(INVOCATION_ENV)
        if invocation:
            tags["invocation"] = invocation
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent:
            tags[PARENT_RUN_TAG] = parent
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
    settings = tracking_settings(config)
    return Tracker(
        settings["uri"],
        settings["experiment"],
        run_name,
        tags={"stage": stage, **tags},
        params=params,
        enabled=settings["enabled"],
        retries=settings["retries"],
        backoff=settings["backoff"],
    )


def tracking_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config's ``tracking`` section with defaults, and the resolved URI."""
    tracking = config.get("tracking") or {}
    return {
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
    """Snakemake ``onsuccess`` / ``onerror``: end the parent run FINISHED or FAILED, and record the
    outcome on disk so that ``sync-tracking`` can end it later if the server is down now."""
    status = "FINISHED" if success else "FAILED"
    results = config.get("results_dir", "results")
    record = read_invocation(results) or {}
    if record.get("invocation") == os.environ.get(INVOCATION_ENV):
        _write_invocation(results, {**record, "status": status,
                                    "ended": time.strftime("%Y-%m-%dT%H:%M:%S")})
    parent = os.environ.get(PARENT_RUN_ENV)
    settings = tracking_settings(config)
    if parent and settings["enabled"] and _mlflow_available():
        _quiet_call(
            "set_terminated (parent)",
            lambda: _client(settings["uri"]).set_terminated(parent, status),
            settings["retries"], settings["backoff"],
        )


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
    """MLflow writes of one sync, each retried; errors propagate (a sync that fails must say so)."""

    def __init__(self, client: Any, retries: int, backoff: float) -> None:
        self.client, self.retries, self.backoff = client, retries, backoff

    def __call__(self, what: str, call: Callable[[], _T]) -> _T:
        return _with_retries(what, call, self.retries, self.backoff)

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
