"""Tests for pipeline_pkg.tracking: parallel writers, retries that end in a warning, run status."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from pipeline_pkg import tracking
from pipeline_pkg.tracking import (
    Tracker,
    TrackingWarning,
    ensure_experiment,
    flatten_params,
    resolve_tracking_uri,
    tracker_from_config,
)

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
N_WORKERS = 4

# One job of the pipeline, run in its own interpreter: argv = uri, experiment, worker index.
WORKER_SCRIPT = textwrap.dedent(
    """
    import sys
    from pipeline_pkg.tracking import Tracker

    uri, experiment, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
    params = {"model": {"arch": "resnet18", "width": 64}, "seed": index}
    with Tracker(uri, experiment, f"job-{index}", tags={"worker": str(index)}, params=params,
                 backoff=0.2) as tracker:
        for step in range(3):
            tracker.log_metrics({"accuracy": index + step / 10, "loss": 1.0 / (step + 1)}, step)
        tracker.set_tags({"done": "yes"})
        print(tracker.run_id)
    """
)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A sqlite database shared by the tests of this module: each migration costs about a second."""
    db_dir = tmp_path_factory.mktemp("tracking") / "nested" / "results"
    return f"sqlite:///{db_dir / 'mlflow.db'}"


def test_parallel_jobs_log_to_one_sqlite_db(tracking_uri: str) -> None:
    experiment_id = ensure_experiment(tracking_uri, "parallel")
    assert experiment_id is not None

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PIPELINE_INVOCATION_ID": "inv-42"}
    env.pop("MLFLOW_TRACKING_URI", None)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT, tracking_uri, "parallel", str(index)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(N_WORKERS)
    ]
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=120)  # generous: CI boxes may be busy
        assert worker.returncode == 0, stderr
        assert "TrackingWarning" not in stderr, stderr
        assert stdout.strip(), stderr

    client = MlflowClient(tracking_uri=tracking_uri)
    assert [e.name for e in client.search_experiments()].count("parallel") == 1
    runs = client.search_runs([experiment_id])
    assert len(runs) == N_WORKERS
    by_worker = {int(run.data.tags["worker"]): run for run in runs}
    assert sorted(by_worker) == list(range(N_WORKERS))
    for index, run in by_worker.items():
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"job-{index}"
        assert run.data.tags["invocation"] == "inv-42"
        assert run.data.tags["done"] == "yes"
        assert run.data.params == {
            "model.arch": "resnet18",
            "model.width": "64",
            "seed": str(index),
        }
        assert run.data.metrics["accuracy"] == pytest.approx(index + 0.2)
        assert run.data.metrics["loss"] == pytest.approx(1.0 / 3)
        history = client.get_metric_history(run.info.run_id, "accuracy")
        assert sorted(m.step for m in history) == [0, 1, 2]


def test_ensure_experiment_is_idempotent(tracking_uri: str) -> None:
    first = ensure_experiment(tracking_uri, "twice")
    assert first is not None
    assert ensure_experiment(tracking_uri, "twice") == first


def test_exception_in_block_propagates_and_marks_run_failed(tracking_uri: str, tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    report.write_text("partial results\n")
    with pytest.raises(RuntimeError, match="training diverged"):
        with Tracker(tracking_uri, "failing", "doomed", tags={}, params={"lr": 0.1}) as tracker:
            tracker.log_metrics({"loss": 3.5})
            tracker.log_artifact(report)
            run_id = tracker.run_id
            raise RuntimeError("training diverged")

    assert run_id is not None
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"loss": 3.5}
    assert [a.path for a in client.list_artifacts(run_id)] == ["report.txt"]


def test_unreachable_server_warns_and_disables(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep MLflow's own HTTP retries out of the way so the test measures only ours.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"

    with pytest.warns(TrackingWarning, match="tracking is disabled") as caught:
        with Tracker(uri, "offline", "job", tags={"a": "b"}, params={"x": 1},
                     retries=2, backoff=0.01) as tracker:
            tracker.log_metrics({"accuracy": 0.9})
            tracker.set_tags({"c": "d"})
            assert tracker.run_id is None
    # The first failure disables the tracker, so later calls neither retry nor warn again.
    assert len([w for w in caught if issubclass(w.category, TrackingWarning)]) == 1
    assert tracker.run_id is None


def test_missing_mlflow_disables_tracking_with_one_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # makes `import mlflow` raise ImportError
    monkeypatch.setattr(tracking, "_warned_mlflow_missing", False)
    with pytest.warns(TrackingWarning, match="not installed") as caught:
        for _ in range(2):
            with Tracker("sqlite:///unused.db", "e", "r", tags={}, params={}) as tracker:
                tracker.log_metrics({"accuracy": 1.0})
                assert tracker.run_id is None
        assert ensure_experiment("sqlite:///unused.db", "e") is None
    assert len(caught) == 1


def test_tracking_uri_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    expected_default = f"sqlite:///{tmp_path.resolve() / 'results' / 'mlflow.db'}"
    assert resolve_tracking_uri(None, "results") == expected_default
    assert resolve_tracking_uri("", "results") == expected_default
    assert resolve_tracking_uri("http://config:5000", "results") == "http://config:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri("http://config:5000", "results") == "http://env:5000"
    assert resolve_tracking_uri(None, "results") == "http://env:5000"


def test_tracker_from_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {"results_dir": str(tmp_path / "res"), "tracking": {"enabled": False}}
    tracker = tracker_from_config(config, stage="train", run_name="r", tags={"k": "v"}, params={})
    assert tracker.uri == f"sqlite:///{tmp_path / 'res' / 'mlflow.db'}"
    assert tracker.experiment == "backdoor-bench"
    assert tracker.tags == {"stage": "train", "k": "v"}
    with tracker:
        tracker.log_metrics({"accuracy": 1.0})
        assert tracker.run_id is None
    assert not (tmp_path / "res").exists()  # disabled means MLflow is never touched


def test_flatten_params_dots_stringifies_and_truncates() -> None:
    flat = flatten_params({"a": {"b": {"c": 1}, "d": [1, 2]}, "long": "x" * 7000, "none": None})
    assert flat == {"a.b.c": "1", "a.d": "[1, 2]", "long": "x" * 6000, "none": "None"}


def test_one_invocation_is_one_parent_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(tracking.INVOCATION_ENV, "inv-7")
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    config = {"results_dir": str(tmp_path), "tracking": {"experiment": "grouped"}}
    parent = tracking.start_invocation(config)
    assert parent is not None and os.environ[tracking.PARENT_RUN_ENV] == parent
    for name in ("a", "b"):
        with tracker_from_config(config, stage="train", run_name=name, tags={}, params={}):
            pass
    tracking.end_invocation(config, success=False)

    client = MlflowClient(resolve_tracking_uri(None, tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("grouped").experiment_id])
    jobs = [r for r in runs if r.info.run_id != parent]
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent}
    assert {r.data.tags["invocation"] for r in jobs} == {"inv-7"}
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(parent).data.tags["pipeline_invocation"] == "inv-7"
    record = tracking.read_invocation(tmp_path)
    assert (record["invocation"], record["parent_run_id"], record["status"]) == ("inv-7", parent, "FAILED")


def test_disabled_tracking_records_the_invocation_without_mlflow(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(tracking.INVOCATION_ENV, "inv-8")
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, "stale")
    config = {"results_dir": str(tmp_path / "res"), "tracking": {"enabled": False}}
    assert tracking.start_invocation(config) is None
    assert tracking.PARENT_RUN_ENV not in os.environ  # a stale parent from the shell is dropped
    tracking.end_invocation(config, success=True)
    assert tracking.read_invocation(tmp_path / "res")["status"] == "FINISHED"
    assert not (tmp_path / "res" / "mlflow.db").exists()


def test_sync_runs_creates_completes_and_is_idempotent(tracking_uri: str) -> None:
    def record(stage: str, defense: str, acc: float) -> tracking.RunRecord:
        tags = {"stage": stage, "dataset": "d", "attack": "a", "arch": "m", "seed": "0", "defense": defense}
        return tracking.RunRecord(f"{stage}/{defense}", tags, {"lr": 0.1, "net": {"width": 8}},
                                  {"acc": acc}, history=[(0, {"loss": 2.0}), (1, {"loss": 1.0})])

    experiment = "sync"
    # A run whose job lost the server after its first curve point: left RUNNING.
    orphan = MlflowClient(tracking_uri).create_run(
        ensure_experiment(tracking_uri, experiment),
        tags={"stage": "train", "dataset": "d", "attack": "a", "arch": "m", "seed": "0", "defense": ""})
    MlflowClient(tracking_uri).log_metric(orphan.info.run_id, "loss", 2.0, step=0)
    records = [record("train", "", 0.5), record("evaluate", "ft", 0.25)]
    invocation = {"invocation": "inv-9", "status": "FINISHED"}

    first = tracking.sync_runs(tracking_uri, experiment, records, invocation=invocation, backoff=0.01)
    assert (first.present, first.completed, first.created) == ([], ["train/"], ["evaluate/ft"])
    second = tracking.sync_runs(tracking_uri, experiment, records, invocation=invocation, backoff=0.01)
    assert (second.present, second.completed, second.created) == (["train/", "evaluate/ft"], [], [])

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 3  # two jobs and the parent that sync made for the invocation
    parent = next(r for r in runs if r.data.tags.get("pipeline_invocation") == "inv-9")
    assert parent.info.status == "FINISHED"
    for run in runs:
        if run is parent:
            continue
        assert run.info.status == "FINISHED" and run.data.metrics["acc"] in (0.5, 0.25)
        assert run.data.params == {"lr": "0.1", "net.width": "8"} and run.data.tags["synced"] == "true"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [0, 1]
    created = next(r for r in runs if r.data.tags["stage"] == "evaluate")
    assert created.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert created.data.tags["invocation"] == "inv-9"


def test_tracking_server_refuses_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(RuntimeError, match="another server holds the port"):
            tracking.serve(tmp_path / "store", host="127.0.0.1", port=busy.getsockname()[1],
                           experiment="e")


# --- batched mode: jobs queue their runs, one process logs the queue ---

def batched_config(results: Path, uri: str, experiment: str) -> dict:
    # No retries: a failure the test provokes should not wait out the backoff.
    return {"results_dir": str(results),
            "tracking": {"uri": uri, "experiment": experiment, "mode": "batched", "retries": 0}}


def runs_of(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_batched_mode_queues_only_inside_an_invocation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = batched_config(tmp_path, "sqlite:///unused.db", "e")
    monkeypatch.delenv(tracking.INVOCATION_ENV, raising=False)
    by_hand = tracker_from_config(config, stage="train", run_name="r", tags={}, params={})
    assert by_hand.queue_dir is None  # no hook would flush it: a rerun by hand logs live
    monkeypatch.setenv(tracking.INVOCATION_ENV, "inv-q")
    in_snakemake = tracker_from_config(config, stage="train", run_name="r", tags={}, params={})
    assert in_snakemake.queue_dir == (tmp_path / "tracking-queue").resolve()
    assert tracking.tracking_settings({})["mode"] == "live"


def test_batched_job_is_logged_once_by_the_flush(tracking_uri: str, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv(tracking.INVOCATION_ENV, "inv-b")
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    config = batched_config(tmp_path, tracking_uri, "batched")
    # Tiny batch limits, so that the flush must split params and metrics over several log_batch calls.
    monkeypatch.setattr(tracking, "MAX_PARAMS_PER_BATCH", 1)
    monkeypatch.setattr(tracking, "MAX_METRICS_PER_BATCH", 2)
    report = tmp_path / "report.txt"
    report.write_text("final table\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        parent = tracking.start_invocation(config)
        with tracker_from_config(config, stage="train", run_name="train/d/a", tags={"seed": "0"},
                                 params={"net": {"width": 8}, "lr": 0.1}) as tracker:
            tracker.log_metrics({"loss": 2.0}, step=0)
            tracker.log_metrics({"loss": 1.0}, step=1)
            tracker.log_metrics({"acc": 0.5})
            tracker.set_tags({"done": "yes"})
            tracker.log_artifact(report)
            assert tracker.run_id is None
        record = json.loads(tracker.queue_file.read_text())
        assert tracking.queued_records(tmp_path) == [tracker.queue_file]
        assert [r.info.run_id for r in runs_of(tracking_uri, "batched")] == [parent]  # not logged yet
        tracking.end_invocation(config, success=True)

    runs = runs_of(tracking_uri, "batched")
    job = next(r for r in runs if r.info.run_id != parent)
    assert len(runs) == 2 and job.info.run_name == "train/d/a" and job.info.status == "FINISHED"
    assert (job.info.start_time, job.info.end_time) == (record["start_time"], record["end_time"])
    assert job.data.tags["stage"] == "train" and job.data.tags["seed"] == "0" and job.data.tags["done"] == "yes"
    assert job.data.tags["invocation"] == "inv-b" and job.data.tags["mlflow.parentRunId"] == parent
    assert job.data.params == {"net.width": "8", "lr": "0.1"}
    assert job.data.metrics == {"loss": 1.0, "acc": 0.5}
    client = MlflowClient(tracking_uri)
    assert [(m.step, m.value) for m in client.get_metric_history(job.info.run_id, "loss")] == [(0, 2.0), (1, 1.0)]
    assert [a.path for a in client.list_artifacts(job.info.run_id)] == ["report.txt"]
    assert client.get_run(parent).info.status == "FINISHED"
    assert tracking.queued_records(tmp_path) == []
    assert tracking.flush_queue(config) == 0  # a second flush changes nothing
    assert sorted(r.info.run_id for r in runs_of(tracking_uri, "batched")) == sorted(r.info.run_id for r in runs)


def test_batched_failure_is_failed_and_a_flush_that_dies_midway_logs_each_run_once(
        tracking_uri: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(tracking.INVOCATION_ENV, "inv-f")
    config = batched_config(tmp_path, tracking_uri, "batched-failure")
    with pytest.raises(RuntimeError, match="diverged"):
        with tracker_from_config(config, stage="train", run_name="doomed", tags={}, params={}) as tracker:
            tracker.log_metrics({"loss": 9.0})
            raise RuntimeError("diverged")
    with tracker_from_config(config, stage="evaluate", run_name="fine", tags={}, params={"x": 1}) as tracker:
        tracker.log_metrics({"acc": 0.9})

    # MLflow dies right after creating the first run: that record and the next stay queued.
    real = tracking._log_run_contents
    monkeypatch.setattr(tracking, "_log_run_contents", lambda *a: (_ for _ in ()).throw(OSError("down")))
    with pytest.warns(TrackingWarning, match="it and the 1 runs after it stay queued"):
        assert tracking.flush_queue(config) == 0
    assert len(tracking.queued_records(tmp_path)) == 2
    monkeypatch.setattr(tracking, "_log_run_contents", real)
    assert tracking.flush_queue(config) == 2

    runs = {r.info.run_name: r for r in runs_of(tracking_uri, "batched-failure")}  # active runs only
    assert sorted(runs) == ["doomed", "fine"]  # the half-logged "doomed" run was replaced, not doubled
    assert runs["doomed"].info.status == "FAILED" and runs["doomed"].data.metrics == {"loss": 9.0}
    assert runs["fine"].info.status == "FINISHED" and runs["fine"].data.params == {"x": "1"}
    assert tracking.queued_records(tmp_path) == []


def test_an_unreadable_queue_file_is_moved_aside_with_a_warning(
        tracking_uri: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(tracking.INVOCATION_ENV, "inv-c")
    config = batched_config(tmp_path, tracking_uri, "batched-corrupt")
    with tracker_from_config(config, stage="train", run_name="good", tags={}, params={}) as tracker:
        tracker.log_metrics({"acc": 1.0})
    garbage = tmp_path / "tracking-queue" / "0-half-written.json"
    garbage.write_text('{"run_name": "cut off')
    with pytest.warns(TrackingWarning, match="0-half-written.json: unreadable"):
        assert tracking.flush_queue(config) == 1
    assert (tmp_path / "tracking-queue" / "rejected" / garbage.name).exists()
    assert tracking.queued_records(tmp_path) == []
    assert [r.info.run_name for r in runs_of(tracking_uri, "batched-corrupt")] == ["good"]


# A batched job in its own interpreter, as Snakemake starts it; argv = results dir.
BATCHED_JOB = textwrap.dedent(
    """
    import sys
    from pipeline_pkg.tracking import tracker_from_config

    config = {"results_dir": sys.argv[1], "tracking": {"mode": "batched"}}
    with tracker_from_config(config, stage="train", run_name="job", tags={}, params={"a": 1}) as run:
        run.log_metrics({"acc": 0.5}, step=1)
        run.log_artifact(__import__("os").devnull)
    print("mlflow" in sys.modules, run.queue_file)
    """
)


def test_a_batched_job_never_imports_mlflow(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), tracking.INVOCATION_ENV: "inv-s"}
    done = subprocess.run([sys.executable, "-c", BATCHED_JOB, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    imported, queue_file = done.stdout.split()
    assert imported == "False"
    assert json.loads(Path(queue_file).read_text())["metrics"][0][::3] == ["acc", 1]
