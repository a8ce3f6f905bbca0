"""Faults: a training job killed mid-epoch resumes to the same model; a corrupt input fails its job
with one error naming the file and the rule that rebuilds it; a full disk leaves nothing half-written."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline_pkg import stages
from pipeline_pkg.config import load
from pipeline_pkg.h5io import CorruptFileError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 8
RUN = "results/rf1024/burst/rf_cnn/seed0"
POISON = "results/rf1024/burst/poison-seed0.h5"
LIMIT = 256 * 1024  # bytes of "disk"; every write below needs about 1 MB


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args],
        capture_output=True, text=True, timeout=600)


def cli(workdir: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline_pkg", *args], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def train_cli(workdir: Path, out: Path) -> subprocess.Popen:
    return cli(workdir, "train", "--config", "config.yaml", "--dataset", "rf1024", "--attack", "burst",
               "--arch", "rf_cnn", "--seed", "0", "--out", str(out))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """config/tiny.yaml cut down to rf1024/burst, no tracking, run by Snakemake up to the poison file."""
    workdir = tmp_path_factory.mktemp("faults")
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config.update(results_dir="results", defenses={"none": {}, "ft": {"steps": 20}},
                  evaluate={"sharpness_samples": 0}, tracking={"enabled": False})
    config["datasets"] = {"rf1024": {**config["datasets"]["rf1024"], "attacks": ["burst"], "detectors": []}}
    config["train"]["epochs"] = EPOCHS
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(workdir, "--until", "poison")
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir


@pytest.fixture(scope="module")
def reference(workdir, tmp_path_factory) -> Path:
    """The same training, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "model.pt"
    config = load(workdir / "config.yaml")
    stages.train(config, "rf1024", "burst", "rf_cnn", 0, workdir / POISON, out)
    return out


# --- (1) a killed training job resumes from its last checkpoint ---

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_training_resumes_to_the_uninterrupted_result(workdir, reference, tmp_path, sig):
    out = tmp_path / "model.pt"
    checkpoint = out.with_name("checkpoint.pt")
    job = train_cli(workdir, out)
    deadline = time.monotonic() + 120
    while not checkpoint.exists():  # written after every epoch, so the first epoch is done
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.01)
    job.send_signal(sig)
    job.communicate(timeout=60)
    assert job.returncode == -sig
    assert not out.exists()
    done_epochs = int(torch.load(checkpoint, weights_only=True)["epoch"]) + 1
    assert done_epochs < EPOCHS  # killed mid-run, not after it

    rerun = train_cli(workdir, out)
    _, log = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, log[-3000:]
    assert f"resumed from {checkpoint} after epoch {done_epochs}" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "snapshots.pt", "train.json"]  # no temp files
    resumed = torch.load(out, weights_only=True)["model"]
    uninterrupted = torch.load(reference, weights_only=True)["model"]
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)  # bit for bit on CPU
    # The detectors' snapshots survive the kill too: the same epochs, the same weights.
    snapshots = torch.load(out.with_name("snapshots.pt"), weights_only=True)
    expected = torch.load(reference.with_name("snapshots.pt"), weights_only=True)
    assert snapshots["epochs"] == expected["epochs"] == [3]  # 8 epochs, tiny.yaml's ensemble of 2
    assert all(torch.equal(a[k], b[k]) for a, b in zip(snapshots["states"], expected["states"]) for k in a)
    final = json.loads((tmp_path / "train.json").read_text())["final"]
    expected = json.loads(reference.with_name("train.json").read_text())["final"]
    assert {k: final[k] for k in ("acc", "asr", "ra")} == {k: expected[k] for k in ("acc", "asr", "ra")}


# --- (2) a corrupt input: one clear error naming the file and the rule that makes it ---

def test_corrupt_inputs_name_the_file_and_the_rule_that_rebuilds_it(workdir, reference, tmp_path):
    config = load(workdir / "config.yaml")
    poison = workdir / POISON
    truncated = tmp_path / "rf1024/burst/poison-seed0.h5"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(poison.read_bytes()[:4096])
    garbage = tmp_path / "seed0" / "model.pt"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a checkpoint" * 64)
    out = tmp_path / "seed0" / "ft"
    cases = [(truncated, reference, "poison"), (poison, garbage, "train")]
    for poison_file, model, rule in cases:
        with pytest.raises(CorruptFileError) as info:
            stages.purify(config, "rf1024", "burst", "rf_cnn", 0, "ft", poison_file, model,
                          out / "model.pt", out / "purify.json")
        message = str(info.value)
        bad = truncated if rule == "poison" else garbage
        assert str(bad) in message and f"rule '{rule}'" in message and f"--forcerun {bad}" in message
        assert not out.exists()


def test_corrupt_input_fails_the_job_cleanly_and_a_forced_rebuild_recovers(workdir, reference):
    poison = workdir / POISON
    poison.write_bytes(poison.read_bytes()[:4096])  # a truncated copy, newer than its consumers
    failed = snakemake(workdir, "--until", "train")
    assert failed.returncode != 0
    log = (workdir / "results/logs/train/rf1024/burst/rf_cnn/seed0.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("pipeline_pkg.h5io.CorruptFileError")]
    assert len(errors) == 1, log[-3000:]
    assert POISON in errors[0] and "rule 'poison'" in errors[0]
    assert "Error in rule train" in failed.stderr
    run_dir = workdir / RUN
    assert not (run_dir / "model.pt").exists()
    assert not list(run_dir.glob(".*.part"))

    # What the message says: force the rule that makes the file (or delete it and rerun).
    done = snakemake(workdir, "--until", "train", "--forcerun", POISON)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rule poison:" in done.stderr and "rule train:" in done.stderr
    trained = torch.load(run_dir / "model.pt", weights_only=True)["model"]
    uninterrupted = torch.load(reference, weights_only=True)["model"]
    assert all(torch.equal(trained[k], uninterrupted[k]) for k in trained)


# --- (3) a full disk while writing outputs ---

WRITERS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np, torch
    from pipeline_pkg.h5io import save_checkpoint, write_h5, write_json

    out, errors = Path(sys.argv[1]), {}
    for name, write in [("data.h5", lambda p: write_h5(p, {"x": np.ones((256, 1024), np.float32)})),
                        ("model.pt", lambda p: save_checkpoint({"w": torch.ones(256, 1024)}, p)),
                        ("metrics.json", lambda p: write_json(p, {"x": [0.5] * 200_000}))]:
        try:
            write(out / name)
        except OSError as exc:
            errors[name] = [type(exc).__name__, exc.errno, str(exc)]
    print(json.dumps(errors))
    """
)


def _limit_file_size() -> None:
    # A file size limit stands in for a full disk; the ignored SIGXFSZ makes writes fail with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.fixture(params=["tmpfs", "rlimit"])
def small_disk(request, tmp_path):
    """(folder, preexec_fn): a tmpfs of LIMIT bytes where root may mount one, else a file size limit."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if request.param == "rlimit":
        yield disk, _limit_file_size
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the rlimit case stands in")
    try:
        yield disk, None
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_full_disk_gives_a_clear_error_and_leaves_nothing(workdir, small_disk):
    disk, preexec = small_disk
    writers = subprocess.run([sys.executable, "-c", WRITERS, str(disk)], capture_output=True, text=True,
                             timeout=120, preexec_fn=preexec, cwd=REPO)
    assert writers.returncode == 0, writers.stderr[-3000:]
    errors = json.loads(writers.stdout)
    assert sorted(errors) == ["data.h5", "metrics.json", "model.pt"]
    for name, (kind, errno, message) in errors.items():
        assert kind == "OutputWriteError" and errno in (27, 28), message  # EFBIG, ENOSPC
        assert f"could not write {disk / name}" in message and "nothing of it was left behind" in message

    # A whole stage through the CLI: it fails with that message, and the folder stays empty.
    stage = cli(workdir, "build-dataset", "--config", "config.yaml", "--dataset", "rf1024",
                "--out", str(disk / "rf1024.h5"), preexec_fn=preexec)
    _, log = stage.communicate(timeout=300)
    assert stage.returncode != 0
    assert "OutputWriteError: [Errno " in log and f"could not write {disk / 'rf1024.h5'}" in log
    assert list(disk.iterdir()) == []


def test_testing_every_few_epochs_logs_fewer_points_and_trains_the_same_model(workdir, reference, tmp_path):
    """train.eval_every only thins the test curve: the model and its final metrics stay the same."""
    config = load(workdir / "config.yaml")
    config["train"]["eval_every"] = 3
    out = tmp_path / "model.pt"
    stages.train(config, "rf1024", "burst", "rf_cnn", 0, workdir / POISON, out)
    logged = json.loads(out.with_name("train.json").read_text())
    assert [h["epoch"] for h in logged["history"] if "acc" in h] == [2, 5, 7]  # every 3rd, and the last
    assert len(logged["history"]) == EPOCHS and all("train_loss" in h for h in logged["history"])
    assert logged["final"]["acc"] == logged["history"][-1]["acc"]
    expected = json.loads(reference.with_name("train.json").read_text())
    assert {k: logged["final"][k] for k in ("acc", "asr", "ra")} == {
        k: expected["final"][k] for k in ("acc", "asr", "ra")}
    trained, uninterrupted = (torch.load(p, weights_only=True)["model"] for p in (out, reference))
    assert all(torch.equal(trained[k], uninterrupted[k]) for k in trained)
