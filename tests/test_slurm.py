"""profiles/slurm through snakemake-executor-plugin-slurm.

Two parts:
- the sbatch calls the plugin builds from the profile, recorded by a fake `sbatch` first on PATH, so
  they are checked without SLURM or a GPU: the GPU rules ask for a GPU, the others do not, and memory
  and runtime grow with each retry;
- a reduced tiny DAG through a real one-node SLURM cluster (profiles/slurm/local-cluster.sh), every
  job but the local download checked to have been a completed SLURM job, the train job preempted once
  mid-run (SLURM requeues it) and resumed from its checkpoint to the uninterrupted model. Skips where
  SLURM cannot run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
CPU_PROFILE = REPO / "profiles" / "slurm-cpu"
CLUSTER_SCRIPT = PROFILE / "local-cluster.sh"
GPU_RULES = {"train", "purify", "evaluate", "detect", "retrain"}
# What a cluster without accounting (like the local test cluster) needs; see the profile's header.
NO_ACCOUNTING = ["--slurm-status-command", "squeue", "--slurm-no-account"]

RESULTS = "results-slurm"
RUN = f"{RESULTS}/rf1024/burst/rf_cnn/seed0"
DEFENSES = ["none", "ft"]
# Every output of the reduced DAG, per rule, in DAG order.
STAGES = [
    ("download", ["data/rf1024/manifest.json"]),
    ("generate_rf1024", [f"{RESULTS}/data/rf1024.h5"]),
    ("poison", [f"{RESULTS}/rf1024/burst/poison-seed0.h5"]),
    ("train", [f"{RUN}/model.pt"]),
    ("purify", [f"{RUN}/ft/{f}" for f in ("model.pt", "purify.json")]),  # `none` is not a purify job
    ("evaluate", [f"{RUN}/{d}/metrics.json" for d in DEFENSES]),
    ("aggregate", [f"{RESULTS}/summary/rf1024.{ext}" for ext in ("csv", "md", "png", "detection.md")]),
    ("render_trigger", [f"{RESULTS}/figures/rf1024/burst.png"]),
]
EPOCHS = 12  # enough for the train job to be preempted mid-run, ~0.25 s each
THREADS = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())["threads"]
SLURM_JOBS = {"generate_rf1024": 1, "poison": 1, "train": 1, "purify": 1, "evaluate": 2, "aggregate": 1,
              "render_trigger": 1}


def write_config(workdir: Path) -> Path:
    """tiny.yaml cut down to RF1024, one attack and two defenses: 8 SLURM jobs, 6 of them in sequence.
    No MLflow and no Hessian measurements: this checks where jobs run (test_pipeline.py checks what
    they compute), and each job wave waits for the plugin's next status check, so short jobs count."""
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["datasets"] = {"rf1024": {**config["datasets"]["rf1024"], "attacks": ["burst"], "detectors": []}}
    config["attacks"] = {"burst": config["attacks"]["burst"]}
    config["models"] = {"rf_cnn": config["models"]["rf_cnn"]}
    config["defenses"] = {"none": {}, "ft": {"steps": 20}}
    config["train"] = {**config["train"], "epochs": EPOCHS}
    config["evaluate"] = {"sharpness_samples": 0}
    config["results_dir"] = RESULTS
    config["data_root"] = "data"
    config["tracking"] = {**config["tracking"], "enabled": False}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(workdir: Path, profiles: list[Path], *args: str, env: dict, timeout: int):
    profile_args = [a for p in profiles for a in ("--profile", str(p))]
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(workdir / "config.yaml"), *profile_args, *NO_ACCOUNTING, *args],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PIPELINE_INVOCATION_ID") and not k.startswith("SLURM_")}
    env.update(extra)
    return env


def profile_resources(rule: str, profiles: list[Path], attempt: int) -> dict:
    """The resources a profile stack gives a rule, evaluated the way Snakemake does for `attempt`.
    A later profile replaces a whole key, and set-resources falls back to default-resources."""
    merged: dict = {}
    for profile in profiles:
        merged.update(yaml.safe_load((profile / "config.yaml").read_text()))
    values = {**merged.get("default-resources", {}), **merged.get("set-resources", {}).get(rule, {})}
    return {k: eval(str(values[k]), {"attempt": attempt}) for k in ("mem_mb", "runtime")}


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# ---------------------------------------------------------------------------------------------------
# The sbatch calls, with a fake sbatch: no SLURM, no GPU needed.

FAKE_SBATCH = """#!{python}
# Records its arguments, then fails like a rejected submission, so that Snakemake retries the job.
import json, os, sys
with open(os.environ["FAKE_SBATCH_RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
sys.exit("sbatch: error: fake sbatch, nothing submitted")
"""
# The other SLURM commands the plugin calls before submitting: a default partition for `sinfo -o %P`,
# no accounting (sacct fails), nothing queued.
FAKE_TOOLS = {
    "sinfo": "#!/bin/sh\necho PARTITION\necho 'fake*'\n",
    "sacct": "#!/bin/sh\necho 'Slurm accounting storage is disabled' >&2\nexit 1\n",
    "squeue": "#!/bin/sh\nexit 0\n",
    "scontrol": "#!/bin/sh\nexit 1\n",
}


def submit_with_fake_sbatch(tmp_path: Path, rule: str, profiles: list[Path]):
    """Run the reduced DAG up to one job of `rule`, everything before it already there, with a fake
    sbatch; return Snakemake's result and the recorded sbatch argument lists."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    write_config(workdir)
    names = [name for name, _ in STAGES]
    for _, outputs in STAGES[:names.index(rule)]:
        for out in outputs:
            path = workdir / out
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            os.utime(path, (1_600_000_000, 1_600_000_000))  # all equally old: no mtime-triggered rerun
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name, text in {"sbatch": FAKE_SBATCH.format(python=sys.executable), **FAKE_TOOLS}.items():
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    record = tmp_path / "sbatch.jsonl"
    env = clean_env(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", FAKE_SBATCH_RECORD=str(record))
    target = dict(STAGES)[rule][-1 if rule in ("purify", "evaluate") else 0]  # the `ft` job
    # Only mtime decides reruns: the placeholder files have no Snakemake metadata. A short first
    # status check keeps the run from idling 40 s after the failed submissions.
    done = snakemake(workdir, profiles, target, "--rerun-triggers", "mtime",
                     "--slurm-init-seconds-before-status-checks", "1", env=env, timeout=300)
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return done, calls


@pytest.mark.parametrize("rule", [name for name, _ in STAGES])
def test_sbatch_asks_for_a_gpu_exactly_for_the_gpu_rules_and_more_on_each_retry(tmp_path, rule):
    profiles = [PROFILE]
    retries = yaml.safe_load((PROFILE / "config.yaml").read_text())["retries"]
    done, calls = submit_with_fake_sbatch(tmp_path, rule, profiles)
    log = done.stdout + done.stderr
    if rule == "download":
        # A localrule: it runs on the submitting host and never reaches sbatch.
        assert done.returncode == 0, log[-3000:]
        assert calls == [] and "localrule download:" in log
        assert (tmp_path / "work/data/rf1024/manifest.json").stat().st_size > 0
        return
    assert done.returncode != 0  # every submission was refused
    assert len(calls) == 1 + retries, log[-3000:]
    for attempt, args in enumerate(calls, start=1):
        assert option(args, "--comment").startswith(f"rule_{rule}")
        assert f"--attempt {attempt} " in next(a for a in args if a.startswith("--wrap="))
        gpu_args = [a for a in args if a.startswith(("--gpus", "--gres"))]
        assert gpu_args == (["--gpus=1"] if rule in GPU_RULES else []), args
        expected = profile_resources(rule, profiles, attempt)
        assert int(option(args, "--mem")) == expected["mem_mb"]
        assert int(option(args, "-t")) == expected["runtime"]
        assert option(args, "-D") == str(tmp_path / "work")
        assert f"--cpus-per-task={THREADS}" in args  # the config's `threads`, as the profile says
    mems = [int(option(args, "--mem")) for args in calls]
    runtimes = [int(option(args, "-t")) for args in calls]
    assert mems == sorted(set(mems)) and runtimes == sorted(set(runtimes))  # strictly growing


# The GPU rules of the reduced DAG (it runs no detector, so no detect or retrain job).
@pytest.mark.parametrize("rule", sorted(GPU_RULES & set(dict(STAGES))))
def test_cpu_profile_drops_only_the_gpu_request(tmp_path, rule):
    profiles = [PROFILE, CPU_PROFILE]
    done, calls = submit_with_fake_sbatch(tmp_path, rule, profiles)
    assert calls, (done.stdout + done.stderr)[-3000:]
    first = calls[0]
    assert not [a for a in first if a.startswith(("--gpus", "--gres"))], first
    gpu = profile_resources(rule, [PROFILE], 1)
    assert int(option(first, "--mem")) == gpu["mem_mb"] and int(option(first, "-t")) == gpu["runtime"]


def test_cpu_profile_restates_the_gpu_profile_without_gpus():
    gpu = yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]
    cpu = yaml.safe_load((CPU_PROFILE / "config.yaml").read_text())
    assert set(cpu) == {"set-resources"}  # everything else comes from profiles/slurm
    assert set(gpu) == GPU_RULES and all(r["gpu"] == 1 for r in gpu.values())
    without_gpu = {rule: {k: v for k, v in res.items() if k not in ("gpu", "gpu_model")}
                   for rule, res in gpu.items()}
    assert cpu["set-resources"] == without_gpu


def test_download_stays_a_localrule():
    assert re.search(r"^localrules:\s*\n\s+download,", (REPO / "workflow/rules/download.smk").read_text(),
                     re.MULTILINE)


# ---------------------------------------------------------------------------------------------------
# The reduced tiny DAG on a real one-node SLURM cluster.

@pytest.fixture(scope="module")
def slurm_cluster():
    if shutil.which("sinfo") is None:
        pytest.skip("SLURM is not installed (no sinfo on PATH); as root on Debian, "
                    "`bash profiles/slurm/local-cluster.sh start` installs and starts a local cluster")
    if os.geteuid() != 0:
        pytest.skip("profiles/slurm/local-cluster.sh needs root to start the local SLURM cluster")
    done = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip("SLURM could not be started by local-cluster.sh: "
                    + (done.stderr.strip() or done.stdout.strip())[-1500:])
    node_mem = int(subprocess.run(["sinfo", "-h", "-N", "-o", "%m"], capture_output=True, text=True,
                                  check=True).stdout.split()[0])
    needed = max(profile_resources(r, [PROFILE, CPU_PROFILE], 1)["mem_mb"] for r in SLURM_JOBS)
    if node_mem < needed:
        pytest.skip(f"the SLURM node has {node_mem} MB, the profile asks for up to {needed} MB per job")


def squeue(*args: str) -> list[list[str]]:
    out = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, check=True).stdout
    return [line.split() for line in out.splitlines()]


class Preemption(threading.Thread):
    """Preempts the train job once, as a higher-priority job would: as soon as its first checkpoint
    exists, `scontrol requeue` kills it and puts it back in the queue. SLURM then holds a requeued job
    for about two minutes (Reason=BeginTime); the test lets it start at once."""

    def __init__(self, checkpoint: Path, timeout: float = 300):
        super().__init__(daemon=True)
        self.checkpoint, self.deadline = checkpoint, time.monotonic() + timeout
        self.job_id: str | None = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.job_id = self._requeue_after_first_checkpoint()
            # Killed (COMPLETING), then back in the queue; a SLURM that does not hold requeued jobs may
            # already have started it again, which needs nothing more.
            while (state := squeue("-j", self.job_id, "-o", "%T")) in ([["COMPLETING"]], [["REQUEUED"]]):
                self._wait()
            if state == [["PENDING"]]:
                subprocess.run(["scontrol", "update", f"jobid={self.job_id}", "StartTime=now"], check=True,
                               capture_output=True)
        except Exception as error:  # reported by the test, which cannot see this thread's exceptions
            self.error = repr(error)

    def _requeue_after_first_checkpoint(self) -> str:
        while True:
            if self.checkpoint.exists():
                # The plugin names each job's rule in its comment (%k).
                running = [job for job, *comment in squeue("-t", "RUNNING", "-o", "%i %k")
                           if comment and comment[0].startswith("rule_train")]
                if running:
                    subprocess.run(["scontrol", "requeue", running[0]], check=True, capture_output=True)
                    return running[0]
            self._wait()

    def _wait(self) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"gave up waiting for the train job (checkpoint {self.checkpoint}, "
                               f"job {self.job_id})")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm")
    write_config(workdir)
    preemption = Preemption(workdir / RUN / "checkpoint.pt")
    preemption.start()
    # The CPU overlay because the local node has no GPU. Successful jobs' SLURM logs are kept to be
    # checked; short status-check intervals keep the six job waves within a few minutes.
    done = snakemake(workdir, [PROFILE, CPU_PROFILE], "--slurm-keep-successful-logs",
                     "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2",
                     env=clean_env(), timeout=540)
    preemption.join(timeout=10)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return workdir, done.stdout + done.stderr, preemption


def scontrol_job(job_id: str) -> dict:
    line = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                          check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", line))


def test_the_dag_completes_through_the_slurm_profile(slurm_run):
    workdir, _, _ = slurm_run
    for name, outputs in STAGES:
        for out in outputs:
            assert (workdir / out).stat().st_size > 0, out
    table = (workdir / RESULTS / "summary/rf1024.md").read_text()
    assert "| burst" in table
    for defense in DEFENSES:
        metrics = json.loads((workdir / RUN / defense / "metrics.json").read_text())
        assert 0 <= metrics["acc"] <= 1 and 0 <= metrics["asr"] <= 1


def test_every_job_but_download_ran_as_a_completed_slurm_job(slurm_run):
    workdir, log, _ = slurm_run
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.", log)
    rules = [Path(path).relative_to(workdir / ".snakemake/slurm_logs").parts[0].removeprefix("rule_")
             for _, path in submitted]
    assert sorted(rules) == sorted(r for r, n in SLURM_JOBS.items() for _ in range(n))
    for (job_id, path), rule in zip(submitted, rules):
        slurm_log = Path(path).read_text()
        # The job's own Snakemake ran this rule inside the allocation and finished it.
        assert f"rule {rule}:" in slurm_log and f"Finished jobid: 0 (Rule: {rule})" in slurm_log
        job = scontrol_job(job_id)
        assert job["JobState"] == "COMPLETED", job
        assert job["JobName"] == run_id and job["Comment"].startswith(f"rule_{rule}")
        assert Path(job["StdOut"]) == Path(path) and Path(job["WorkDir"]) == workdir
        assert "gpu" not in job.get("TresPerNode", "") + job.get("TresPerJob", "")  # CPU overlay
    assert len({job_id for job_id, _ in submitted}) == len(submitted)


def test_download_ran_on_the_submitting_host(slurm_run):
    workdir, log, _ = slurm_run
    assert "localrule download:" in log
    assert not (workdir / ".snakemake/slurm_logs/rule_download").exists()
    assert (workdir / "data/rf1024/manifest.json").stat().st_size > 0


def test_preempted_training_resumes_from_its_checkpoint_to_the_uninterrupted_model(slurm_run, tmp_path):
    import torch

    from pipeline_pkg import stages
    from pipeline_pkg.config import load

    workdir, log, preemption = slurm_run
    assert preemption.error is None, preemption.error
    train_job = re.search(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: \S+/rule_train/", log).group(1)
    assert preemption.job_id == train_job
    job = scontrol_job(train_job)
    assert job["Restarts"] == "1" and job["JobState"] == "COMPLETED", job
    # The second run of the job picked up where the first was killed, part-way through.
    train_log = (workdir / RESULTS / "logs/train/rf1024/burst/rf_cnn/seed0.log").read_text()
    resumed = re.search(r"resumed from \S+checkpoint\.pt after epoch (\d+)", train_log)
    assert resumed and 1 <= int(resumed.group(1)) < EPOCHS, train_log[-3000:]
    assert not (workdir / RUN / "checkpoint.pt").exists()
    # ... and ended where an uninterrupted training does, bit for bit on CPU.
    reference = tmp_path / "model.pt"
    stages.train(load(workdir / "config.yaml"), "rf1024", "burst", "rf_cnn", 0,
                 workdir / RESULTS / "rf1024/burst/poison-seed0.h5", reference)
    resumed_state = torch.load(workdir / RUN / "model.pt", weights_only=True)["model"]
    uninterrupted = torch.load(reference, weights_only=True)["model"]
    assert resumed_state.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed_state[k], uninterrupted[k]) for k in resumed_state)
