"""Cluster mode: jobs log to a real MLflow server, started by `python -m pipeline_pkg tracking-server`.

One server serves the whole module. In order: parallel processes race to create an experiment; a
reduced tiny pipeline runs 4 jobs at a time against the server, and every run comes back once, under
one parent run per invocation; then the server dies in the middle of a run, the jobs finish anyway,
and `sync-tracking` re-sends what the server missed, once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFENSES = ["none", "ft"]
KEYS = ("stage", "dataset", "attack", "arch", "seed", "defense")
N_RACERS = 4

# One job that races the others: all start at once, then create (or find) the experiment and log.
RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import mlflow.entities, mlflow.tracking  # imported before the start line, so all start together
    from pipeline_pkg.tracking import Tracker, ensure_experiment

    uri, experiment, index, barrier = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    (barrier / f"ready-{index}").touch()
    while not (barrier / "go").exists():
        time.sleep(0.005)
    if index % 2:
        ensure_experiment(uri, experiment, backoff=0.2)
    with Tracker(uri, experiment, f"racer-{index}", tags={"racer": str(index)},
                 params={"index": index}, backoff=0.2) as run:
        run.log_metrics({"value": index})
        print(run.run_id)
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m pipeline_pkg tracking-server` on 127.0.0.1, restartable on the same store and port."""

    def __init__(self, store: Path) -> None:
        self.store, self.port = store, free_port()
        self.process: subprocess.Popen | None = None
        self.uri = f"http://127.0.0.1:{self.port}"
        self.starts = 0

    def start(self, timeout: float = 120) -> None:
        self.starts += 1
        self.log = self.store.parent / f"server-{self.starts}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline_pkg", "tracking-server", "--config",
             str(REPO / "config" / "tiny.yaml"), "--host", "127.0.0.1", "--port", str(self.port),
             "--store", str(self.store), "--workers", "2"],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if f"MLFLOW_TRACKING_URI={self.uri}\n" in text:
                self.server_pid = int(text.split("mlflow server pid ")[1].split(":")[0])
                return
            assert self.process.poll() is None, text[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"no MLFLOW_TRACKING_URI line within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def crash(self) -> None:
        """SIGKILL the server and its workers at once, as a dying node would; the CLI then exits."""
        os.killpg(self.server_pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # the CLI stops its server's process group
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mlflow-server") / "store")
    server.start()
    yield server
    server.stop()


def reduced_config(path: Path, experiment: str, attacks: list[str], epochs: int,
                   defenses: list[str] = DEFENSES, **tracking) -> Path:
    """config/tiny.yaml cut down: rf1024, the given attacks and defenses, few steps, no Hessian."""
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["results_dir"] = str(path / "results")
    config["data_root"] = str(path / "data")
    config["datasets"] = {"rf1024": {**config["datasets"]["rf1024"], "attacks": attacks, "detectors": []}}
    config["defenses"] = {"none": {}, "ft": {"steps": 20}}
    config["defenses"] = {name: config["defenses"][name] for name in defenses}
    config["train"]["epochs"] = epochs
    config["evaluate"] = {"sharpness_samples": 0}
    config["tracking"] = {"enabled": True, "experiment": experiment, **tracking}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path / "config.yaml"


def snakemake(config: Path, uri: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("PIPELINE_INVOCATION_ID", None)  # each snakemake call makes its own
    env.pop("PIPELINE_PARENT_RUN_ID", None)
    return subprocess.Popen(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
         str(config.parent), "--configfile", str(config), "--cores", "4", "-j", "4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def expected_keys(attacks: list[str], defenses: list[str] = DEFENSES) -> set[tuple[str, ...]]:
    keys = {("aggregate", "rf1024", "", "", "", "")}
    for attack in attacks:
        keys.add(("train", "rf1024", attack, "rf_cnn", "0", ""))
        for defense in defenses:
            # `none` has no purify job: its evaluation reads the trained model.
            stages = ("evaluate",) if defense == "none" else ("purify", "evaluate")
            keys |= {(stage, "rf1024", attack, "rf_cnn", "0", defense) for stage in stages}
    return keys


def search(uri: str, experiment: str) -> list:
    """Every run of the experiment, through mlflow.search_runs as a user would read them."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(experiment_names=[experiment], output_format="list", max_results=1000)
    finally:
        mlflow.set_tracking_uri(previous)


def key(run) -> tuple[str, ...]:
    return tuple(run.data.tags.get(k, "") for k in KEYS)


def check_runs_match_files(runs: list, results: Path, attacks: list[str],
                           defenses: list[str] = DEFENSES) -> None:
    """Every expected job is one FINISHED run whose params, tags and final metrics are the files'."""
    jobs = [r for r in runs if r.data.tags.get("stage") != "pipeline"]
    assert sorted(key(r) for r in jobs) == sorted(expected_keys(attacks, defenses))
    for run in jobs:
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        assert run.info.status == "FINISHED", key(run)
        if tags["stage"] == "aggregate":
            assert params == {"n_results": str(len(attacks) * len(defenses))}
            assert set(metrics) >= {f"{m}/{d}" for m in ("acc", "purify_seconds") for d in defenses}
            continue
        base = results / "rf1024" / tags["attack"] / "rf_cnn" / "seed0"
        assert params["seed"] == "0" and params["attack.name"] == tags["attack"]
        assert params["arch.name"] == "rf_cnn" and params["train.epochs"]
        if tags["stage"] == "train":
            final = json.loads((base / "train.json").read_text())["final"]
            assert {k: metrics[k] for k in final} == pytest.approx(final)
            assert "defense.name" not in params
            continue
        assert params["defense.name"] == tags["defense"]
        if tags["stage"] == "purify":
            report = json.loads((base / tags["defense"] / "purify.json").read_text())
            assert {k: metrics[k] for k in report} == pytest.approx(report)
        else:
            result = json.loads((base / tags["defense"] / "metrics.json").read_text())
            for name in ("acc", "asr", "ra", "der", "purify_seconds", "trainable_params"):
                assert metrics[name] == pytest.approx(result[name]), name
            assert metrics["undefended_asr"] == pytest.approx(result["undefended"]["asr"])


# --- A: the server, racing jobs, a pipeline through it ---

def test_racing_processes_create_one_experiment(server, tmp_path):
    """Against the module's fresh server: racers create the experiment at the same moment."""
    experiment = "race"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, server.uri, experiment, str(i), str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
              for i in range(N_RACERS)]
    deadline = time.monotonic() + 90
    while len(list(tmp_path.glob("ready-*"))) < N_RACERS:
        assert time.monotonic() < deadline, "racers did not start"
        assert all(r.poll() is None for r in racers), [r.communicate() for r in racers]
        time.sleep(0.05)
    (tmp_path / "go").touch()
    run_ids = []
    for racer in racers:
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0 and "TrackingWarning" not in err, err
        run_ids.append(out.split()[0])  # MLflow prints "View run" links after it

    client = MlflowClient(server.uri)
    assert len(client.search_experiments(filter_string=f"name = '{experiment}'")) == 1
    runs = search(server.uri, experiment)
    assert sorted(r.info.run_id for r in runs) == sorted(run_ids)
    assert sorted(int(r.data.tags["racer"]) for r in runs) == list(range(N_RACERS))
    assert all(r.info.status == "FINISHED" and r.data.metrics["value"] == int(r.data.tags["racer"])
               for r in runs)


def test_tracking_server_created_the_experiment_before_any_job(server):
    assert MlflowClient(server.uri).get_experiment_by_name("backdoor-bench-tiny") is not None
    assert (server.store / "mlflow.db").exists()


@pytest.fixture(scope="module")
def pipeline(server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline-server")
    attacks = ["none", "burst"]
    config = reduced_config(workdir, "bench-server", attacks, epochs=4)
    done = snakemake(config, server.uri)
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 0, out[-5000:]
    return workdir / "results", attacks, out


def test_every_job_is_one_run_with_its_tags_params_and_metrics(server, pipeline):
    results, attacks, log = pipeline
    assert "TrackingWarning" not in log
    runs = search(server.uri, "bench-server")
    check_runs_match_files(runs, results, attacks)
    client = MlflowClient(server.uri)
    train = next(r for r in runs if key(r)[:3] == ("train", "rf1024", "burst"))
    assert [m.step for m in client.get_metric_history(train.info.run_id, "train_loss")] == [0, 1, 2, 3]
    # Artifacts go through the server (--serve-artifacts) into its store.
    aggregate = next(r for r in runs if r.data.tags["stage"] == "aggregate")
    assert {a.path for a in client.list_artifacts(aggregate.info.run_id)} == {
        "rf1024.csv", "rf1024.md", "rf1024.png", "rf1024.detection.csv", "rf1024.detection.md"}
    assert len(list((server.store / "mlartifacts").rglob("rf1024.png"))) == 1


# --- B: one invocation, one group ---

def test_one_invocation_shares_one_tag_and_one_parent_run(server, pipeline):
    results, attacks, _ = pipeline
    runs = search(server.uri, "bench-server")
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    jobs = [r for r in runs if r.data.tags.get("stage") != "pipeline"]
    assert len(parents) == 1 and len(jobs) == len(expected_keys(attacks))
    parent = parents[0]
    invocation = parent.data.tags["pipeline_invocation"]
    assert {r.data.tags["invocation"] for r in jobs} == {invocation}
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.info.run_name == f"snakemake-{invocation}"
    assert "invocation" not in parent.data.tags  # so filtering on tags.invocation gives the jobs
    record = json.loads((results / "invocation.json").read_text())
    assert record == {**record, "invocation": invocation, "parent_run_id": parent.info.run_id,
                      "status": "FINISHED"}


def sync(config: Path, uri: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pipeline_pkg", "sync-tracking", "--config", str(config), *args],
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                          timeout=300, cwd=config.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_sync_reads_from_disk_exactly_the_runs_the_jobs_logged(server, pipeline):
    # In particular no purify run for `none`, which has no purify job (nor purify.json).
    results, attacks, _ = pipeline
    n = len(expected_keys(attacks))
    out = sync(results.parent / "config.yaml", server.uri, "--dry-run")
    assert f"{n} runs on disk: {n} already in MLflow, 0 would be completed, 0 would be created" in out


# --- C: the server dies mid-run; the jobs finish; sync re-sends what it missed ---

def test_server_down_mid_run_then_sync_sends_each_missing_run_once(server, tmp_path):
    experiment, attacks, defenses = "bench-outage", ["burst"], ["ft"]
    # One quick retry: a dead server costs each job a second, not the default 15 s of backoff.
    config = reduced_config(tmp_path, experiment, attacks, epochs=6, defenses=defenses, retries=1,
                            backoff=0.2)
    results = tmp_path / "results"
    checkpoint = results / "rf1024/burst/rf_cnn/seed0/checkpoint.pt"
    job = snakemake(config, server.uri)
    deadline = time.monotonic() + 300
    while not checkpoint.exists():  # the first epoch is done: the train run is live
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-5000:]
        time.sleep(0.02)
    server.crash()
    out, _ = job.communicate(timeout=600)

    # The jobs finished and kept their files; they only warned about tracking.
    assert job.returncode == 0, out[-5000:]
    assert (results / "rf1024/burst/rf_cnn/seed0/ft/metrics.json").exists()
    assert (results / "summary/rf1024.md").exists()
    assert "tracking is disabled" in (results / "logs/train/rf1024/burst/rf_cnn/seed0.log").read_text()

    server.start()
    before = search(server.uri, experiment)
    orphan = [r for r in before if r.data.tags.get("stage") == "train"]
    assert [r.info.status for r in orphan] == ["RUNNING"]  # it died with the server

    first = sync(config, server.uri)
    assert "completed: train/rf1024/burst/rf_cnn/seed0" in first
    assert "4 runs on disk: 0 already in MLflow, 1 completed, 3 created" in first
    runs = search(server.uri, experiment)
    check_runs_match_files(runs, results, attacks, defenses)
    assert all(r.data.tags.get("synced") == "true" for r in runs if r.data.tags["stage"] != "pipeline")
    # The orphan was completed, not duplicated: each epoch's point is there once.
    train = next(r for r in runs if r.data.tags["stage"] == "train")
    assert train.info.run_id == orphan[0].info.run_id
    steps = [m.step for m in MlflowClient(server.uri).get_metric_history(train.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(6))
    # All of them grouped under the invocation's parent, which sync ended as Snakemake recorded.
    parent = next(r for r in runs if r.data.tags["stage"] == "pipeline")
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs if r is not parent} == {parent.info.run_id}

    second = sync(config, server.uri)
    assert "4 runs on disk: 4 already in MLflow, 0 completed, 0 created" in second
    assert sorted(r.info.run_id for r in search(server.uri, experiment)) == sorted(r.info.run_id for r in runs)
