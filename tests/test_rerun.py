"""Debugging one job: `snakemake --forcerun <its output>` reruns that job and only what depends on it,
reusing the trained model; `--until` and a rule name given to --forcerun reach what the README says."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RUN = "results/rf1024/burst/rf_cnn/seed0"
TARGET = f"{RUN}/ft/model.pt"  # one purify job's output


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args],
        capture_output=True, text=True, timeout=600)


def cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline_pkg", *args], cwd=workdir, capture_output=True,
                          text=True, timeout=300)


def job_counts(done: subprocess.CompletedProcess) -> dict[str, int]:
    """The `Job stats` table of a (dry) run: rule -> number of jobs, without the `all` and total rows."""
    assert done.returncode == 0, done.stderr[-3000:]
    table = (done.stdout + done.stderr).split("Job stats:")[1].split("\n\n")[0]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.MULTILINE))
    return {rule: int(n) for rule, n in counts.items() if rule not in ("all", "total")}


def plans(done: subprocess.CompletedProcess) -> dict[str, str]:
    """`snakemake --summary`: output file -> plan ("no update" or "update pending")."""
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("\t") for line in done.stdout.splitlines()[1:] if "\t" in line]
    return {row[0]: row[-1] for row in rows}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A complete run of config/tiny.yaml cut down to one attack, defenses none, ft and fp (two purify
    jobs: `none` has none), no tracking."""
    workdir = tmp_path_factory.mktemp("rerun")
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config.update(results_dir="results", defenses={"none": {}, "ft": {"steps": 20}, "fp": {"steps": 10}},
                  evaluate={"sharpness_samples": 0}, tracking={"enabled": False})
    config["datasets"] = {"rf1024": {**config["datasets"]["rf1024"], "attacks": ["burst"], "detectors": []}}
    config["train"]["epochs"] = 3
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(workdir)
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir


def test_forcerun_of_one_output_plans_that_job_and_its_downstream_only(workdir):
    assert "Nothing to be done" in snakemake(workdir, "-n").stdout
    assert job_counts(snakemake(workdir, "-n", "--forcerun", TARGET)) == {
        "purify": 1, "evaluate": 1, "aggregate": 1}
    plan = plans(snakemake(workdir, "--summary", "--forcerun", TARGET))
    pending = {path for path, what in plan.items() if what == "update pending"}
    assert pending == {f"{RUN}/ft/model.pt", f"{RUN}/ft/purify.json", f"{RUN}/ft/metrics.json",
                       "results/summary/rf1024.csv", "results/summary/rf1024.md",
                       "results/summary/rf1024.png", "results/summary/rf1024.detection.csv",
                       "results/summary/rf1024.detection.md"}
    assert plan[f"{RUN}/model.pt"] == "no update"


def test_until_and_rule_names_select_what_the_readme_says(workdir):
    # --until stops at the purify rule: only the forced job, nothing downstream.
    assert job_counts(snakemake(workdir, "-n", "--forcerun", TARGET, "--until", "purify")) == {"purify": 1}
    # A rule name forces every job of that rule. --forcerun takes several values, so a file after it
    # is one more thing to force, not the target: `--forcerun purify FILE` reruns every purify job.
    every = {"purify": 2, "evaluate": 2, "aggregate": 1}  # ft and fp; `none` reads the trained model
    assert job_counts(snakemake(workdir, "-n", "--forcerun", "purify")) == every
    assert job_counts(snakemake(workdir, "-n", "--forcerun", "purify", TARGET)) == every


def test_forcerun_reruns_one_purify_job_and_reuses_the_trained_model(workdir):
    files = [f"{RUN}/model.pt", f"{RUN}/train.json", "results/rf1024/burst/poison-seed0.h5",
             f"{RUN}/none/metrics.json", f"{RUN}/fp/model.pt", f"{RUN}/ft/model.pt",
             f"{RUN}/ft/metrics.json", "results/summary/rf1024.csv",
             "results/logs/train/rf1024/burst/rf_cnn/seed0.log"]
    before = {f: (workdir / f).stat().st_mtime_ns for f in files}
    metrics_before = json.loads((workdir / RUN / "ft/metrics.json").read_text())

    done = snakemake(workdir, "--forcerun", TARGET)
    assert job_counts(done) == {"purify": 1, "evaluate": 1, "aggregate": 1}
    after = {f: (workdir / f).stat().st_mtime_ns for f in files}
    unchanged = [f for f in files if after[f] == before[f]]
    assert unchanged == files[:5] + ["results/logs/train/rf1024/burst/rf_cnn/seed0.log"]
    # Same inputs, same seed, CPU: the rerun reproduces the job's numbers.
    metrics_after = json.loads((workdir / RUN / "ft/metrics.json").read_text())
    assert {k: metrics_after[k] for k in ("acc", "asr", "ra", "der")} == {
        k: metrics_before[k] for k in ("acc", "asr", "ra", "der")}
    assert "Nothing to be done" in snakemake(workdir, "-n").stdout


def test_none_has_no_purify_job_and_is_evaluated_from_the_trained_model(workdir):
    assert not (workdir / RUN / "none/model.pt").exists() and not (workdir / RUN / "none/purify.json").exists()
    # Nothing can make a copy of the trained model under none/.
    missing = snakemake(workdir, "-n", f"{RUN}/none/model.pt")
    assert missing.returncode != 0 and "No rule to produce" in missing.stdout + missing.stderr
    # A retrained model changes `none`'s evaluation (and the others', which read its numbers).
    assert job_counts(snakemake(workdir, "-n", "--forcerun", f"{RUN}/model.pt")) == {
        "train": 1, "purify": 2, "evaluate": 3, "aggregate": 1}
    # By hand: `purify --defense none` is refused, `evaluate --defense none` reproduces the job's numbers.
    job = ["--config", "config.yaml", "--dataset", "rf1024", "--attack", "burst", "--arch", "rf_cnn",
           "--seed", "0", "--defense", "none"]
    refused = cli(workdir, "purify", *job)
    assert refused.returncode == 2 and "`none` has no purify job" in refused.stderr
    metrics = workdir / RUN / "none/metrics.json"
    before = json.loads(metrics.read_text())
    rerun = cli(workdir, "evaluate", *job)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = json.loads(metrics.read_text())
    assert after == {**before, "purify_seconds": 0.0, "trainable_params": 0}
    assert not (workdir / RUN / "none/model.pt").exists()
