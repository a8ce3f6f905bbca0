"""The whole DAG on the tiny config, through Snakemake, as a user runs it; then one job rerun by hand."""

import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
DEFENSES = [d for d in TINY["defenses"] if d != "sor"]  # on rf1024; sor filters point clouds only
ATTACKS = ["none", "burst"]
IMAGE_ATTACKS = ["badnets"]  # on digits
IMAGE_DEFENSES = TINY["datasets"]["digits"]["defenses"]
CLOUD_ATTACKS = TINY["datasets"]["shapes"]["attacks"]
CLOUD_DEFENSES = TINY["datasets"]["shapes"]["defenses"]
# One detector per dataset: each dataset's list in tiny.yaml.
DETECTORS = {name: entry["detectors"] for name, entry in TINY["datasets"].items()}
STAGES = ["download", "generate_rf1024", "prepare_dataset", "poison", "train", "purify", "detect", "retrain",
          "evaluate", "aggregate", "render_trigger"]


def snakemake(repo: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(repo / "config" / "tiny.yaml"), *args],
        capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    repo = Path(__file__).resolve().parents[1]
    workdir = tmp_path_factory.mktemp("pipeline")
    done = snakemake(repo, workdir, "--cores", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    return repo, workdir, workdir / "results-tiny"


def read_metrics(results: Path, attack: str, defense: str) -> dict:
    return json.loads((results / f"rf1024/{attack}/rf_cnn/seed0/{defense}/metrics.json").read_text())


def test_every_stage_ran_and_wrote_its_outputs(run):
    _, _, results = run
    assert json.loads((Path(run[1]) / "data/rf1024/manifest.json").read_text())["generated"] is True
    for stage in STAGES:
        assert any((results / "logs" / stage).rglob("*.log")), stage
        assert any((results / "benchmarks" / stage).rglob("*.tsv")), stage
    for ext in ("csv", "md", "png"):
        assert (results / f"summary/rf1024.{ext}").stat().st_size > 0
    table = (results / "summary/rf1024.md").read_text()
    assert "| burst" in table and "| none" in table
    assert all(f"{d} |" in table.splitlines()[4] for d in DEFENSES)


def test_backdoor_is_planted_and_benign_model_is_not_backdoored(run):
    _, _, results = run
    benign = read_metrics(results, "none", "none")
    poisoned = read_metrics(results, "burst", "none")
    assert poisoned["asr"] >= 0.9
    assert benign["asr"] <= 0.2
    assert benign["acc"] > 0.3 and poisoned["acc"] > 0.3  # 8 classes: chance is 0.125
    assert poisoned["der"] == 0.5  # no defense: no change
    for attack in ATTACKS:
        for defense in DEFENSES:
            m = read_metrics(results, attack, defense)
            assert set(m) >= {"acc", "asr", "ra", "der", "undefended", "purify_seconds", "trainable_params"}
            assert 0 <= m["der"] <= 1
            assert m["undefended"]["asr"] == read_metrics(results, attack, "none")["asr"]


def test_image_backdoor_runs_through_every_stage_and_every_defense(run):
    _, workdir, results = run
    manifest = json.loads((workdir / "data/digits/manifest.json").read_text())
    assert manifest["generated"] is False and manifest["files"] == []  # ships with scikit-learn
    with h5py.File(results / "digits/badnets/poison-seed0.h5") as f:
        assert f["x_train"].dtype == "uint8" and f["x_train"].shape[1:] == (1, 16, 16)
        assert len(f["poisoned_idx"]) == round(0.1 * len(f["x_train"]))
        assert (f["x_test_bd"][:, :, 12:15, 12:15] == f["x_test_bd"][0, :, 12:15, 12:15]).all()
    undefended = json.loads((results / "digits/badnets/resnet9/seed0/none/metrics.json").read_text())
    assert undefended["acc"] > 0.85 and undefended["asr"] > 0.9
    for defense in IMAGE_DEFENSES:
        metrics = json.loads((results / f"digits/badnets/resnet9/seed0/{defense}/metrics.json").read_text())
        assert 0 <= metrics["asr"] <= 1 and metrics["defense"] == defense
    assert not (results / "digits/badnets/resnet9/seed0/ft").exists()  # not in the dataset's list
    table = (results / "summary/digits.md").read_text()
    assert "| badnets" in table


def test_defenses_change_the_model_and_none_is_the_trained_model_itself(run):
    _, _, results = run
    base = results / "rf1024/burst/rf_cnn/seed0"
    original = torch.load(base / "model.pt", weights_only=True)["model"]
    for defense in [d for d in DEFENSES if d != "none"]:
        purified = torch.load(base / defense / "model.pt", weights_only=True)["model"]
        # anp only prunes, and its clean-budget rule may legitimately prune nothing on a tiny model.
        if defense != "anp":
            assert any(not torch.equal(original[k], purified[k]) for k in original), defense
        report = json.loads((base / defense / "purify.json").read_text())
        assert report["trainable_params"] > 0, defense
    # `none` has no purify job: nothing copies the trained model; its evaluation reads it and costs nothing.
    run_dirs = list(results.glob("*/*/*/seed0"))
    assert len(run_dirs) == len(ATTACKS) + len(IMAGE_ATTACKS) + len(CLOUD_ATTACKS)
    for run_dir in run_dirs:
        assert not (run_dir / "none/model.pt").exists() and not (run_dir / "none/purify.json").exists()
        assert (run_dir / "none/metrics.json").exists(), run_dir
    none = read_metrics(results, "burst", "none")
    assert none["purify_seconds"] == 0 and none["trainable_params"] == 0
    assert {k: none[k] for k in ("acc", "asr", "ra")} == {k: none["undefended"][k] for k in ("acc", "asr", "ra")}


def test_hdf5_carries_shapes_and_provenance(run):
    _, _, results = run
    with h5py.File(results / "rf1024/burst/poison-seed0.h5") as f:
        n_train = len(f["y_train"])
        assert len(f["poisoned_idx"]) == round(0.1 * n_train)
        assert f["x_train"].dtype == "float32" and f["x_train"].shape[1:] == (2, 256)
        assert (f["y_train"][:][f["poisoned_idx"][:]] == 0).all()
        assert (f["y_test_bd"][:] == 0).all() and (f["y_test_bd_true"][:] != 0).all()
        attrs = dict(f.attrs)
        assert attrs["attack"] == "burst" and int(attrs["seed"]) == 0 and "package_version" in attrs
        assert json.loads(attrs["attack_params"])["offset"] == 64


def test_logs_start_with_the_cli_command_that_reruns_the_job(run):
    _, _, results = run
    log = (results / "logs/evaluate/rf1024/burst/rf_cnn/seed0/fip.log").read_text().splitlines()[0]
    assert "rerun by hand: python -m pipeline_pkg evaluate --config results-tiny/config.yaml" in log
    assert "--attack burst --arch rf_cnn --seed 0 --defense fip" in log


def test_cli_rerun_of_one_job_reproduces_its_result(run):
    _, workdir, results = run
    target = results / "rf1024/burst/rf_cnn/seed0/fip/metrics.json"
    before = json.loads(target.read_text())
    done = subprocess.run([sys.executable, "-m", "pipeline_pkg", "evaluate", "--config",
                           "results-tiny/config.yaml", "--dataset", "rf1024", "--attack", "burst",
                           "--arch", "rf_cnn", "--seed", "0", "--defense", "fip"],
                          cwd=workdir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after = json.loads(target.read_text())
    assert {k: after[k] for k in ("acc", "asr", "ra", "der")} == {k: before[k] for k in ("acc", "asr", "ra", "der")}


def test_every_job_is_one_mlflow_run_with_tags_and_metrics(run):
    import mlflow

    _, _, results = run
    client = mlflow.tracking.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("backdoor-bench-tiny")
    # Only the Snakemake invocation's runs: the CLI rerun test logs one more, without that tag.
    runs = [r for r in client.search_runs([experiment.experiment_id], max_results=1000)
            if "invocation" in r.data.tags]
    stages = sorted(r.data.tags["stage"] for r in runs)
    trained = len(ATTACKS) + len(IMAGE_ATTACKS) + len(CLOUD_ATTACKS)
    n = len(ATTACKS) * len(DEFENSES) + len(IMAGE_ATTACKS) * len(IMAGE_DEFENSES) + len(CLOUD_ATTACKS) * len(CLOUD_DEFENSES)
    detected = len(ATTACKS) + len(IMAGE_ATTACKS) + len(CLOUD_ATTACKS)  # one detector per dataset
    purified = n - trained  # every trained model is evaluated as `none`, which has no purify job
    assert stages.count("train") == trained and stages.count("purify") == purified
    assert not [r for r in runs if r.data.tags["stage"] == "purify" and r.data.tags["defense"] == "none"]
    assert stages.count("detect") == detected and stages.count("retrain") == detected
    assert stages.count("evaluate") == n + detected
    assert stages.count("aggregate") == 3 and len(runs) == trained + 3 + purified + n + 3 * detected
    assert len({r.data.tags["invocation"] for r in runs}) == 1
    evaluations = [r for r in runs if r.data.tags["stage"] == "evaluate" and r.data.tags["dataset"] == "rf1024"]
    assert {(r.data.tags["attack"], r.data.tags["defense"]) for r in evaluations} == {
        (a, d) for a in ATTACKS for d in DEFENSES + ["detect:spectral"]}
    for r in evaluations:
        if r.data.tags["defense"].startswith("detect:"):
            assert r.data.params["detector.name"] == "spectral"
            continue
        assert {"acc", "asr", "ra", "der", "purify_seconds"} <= set(r.data.metrics)
        assert r.data.params["defense.name"] == r.data.tags["defense"]
        m = read_metrics(results, r.data.tags["attack"], r.data.tags["defense"])
        assert r.data.metrics["asr"] == pytest.approx(m["asr"])
    train = next(r for r in runs if r.data.tags["stage"] == "train" and r.data.tags["attack"] == "burst")
    history = client.get_metric_history(train.info.run_id, "train_loss")
    assert len(history) == 6  # one point per epoch
    # tiny.yaml tracks in batched mode: the call's end logged every queued run and emptied the queue.
    assert not list((results / "tracking-queue").glob("*.json"))


def test_html_report_has_the_tables_plots_captions_and_the_configuration(run):
    repo, workdir, results = run
    done = snakemake(repo, workdir, "--report", "report.html")
    assert done.returncode == 0, done.stderr[-3000:]
    html = (workdir / "report.html").read_text()
    for name in ("rf1024.md", "digits.png", "shapes.detection.md", "burst.png"):  # tables, plots, triggers
        assert name in html, name
    assert "against clean accuracy" in html  # a caption (workflow/report/plot.rst)
    # The configuration the jobs ran with, defaults filled in, rendered from workflow/report/workflow.rst.
    assert "Configuration of this run" in html and "sharpness_samples" in html
    assert "backdoor-bench-tiny" in html


def test_nothing_left_to_do_after_a_complete_run(run):
    repo, workdir, _ = run
    done = snakemake(repo, workdir, "-n", "--cores", "2")
    assert done.returncode == 0
    assert "Nothing to be done" in done.stdout + done.stderr


def test_lint_is_clean_and_dry_run_lists_all_seven_stages(repo, tmp_path):
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert lint.returncode == 0 and "Congratulations" in lint.stdout + lint.stderr
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--config",
                          f"results_dir={tmp_path / 'r'}", f"data_root={tmp_path / 'd'}"],
                         cwd=repo, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    for stage in STAGES:
        assert f"rule {stage}:" in dry.stdout or f"localrule {stage}:" in dry.stdout, stage
    # The default config does not defend its benign references (defend_benign: false): each is evaluated
    # on its own, while backdoored models get every defense and detector.
    results = tmp_path / "r"
    assert f"{results}/digits/badnets/resnet9/seed0/fip/metrics.json" in dry.stdout
    assert f"{results}/digits/badnets/resnet9/seed0/detect-spectral/metrics.json" in dry.stdout
    assert f"{results}/digits/none/resnet9/seed0/none/metrics.json" in dry.stdout
    assert f"{results}/digits/none/resnet9/seed0/fip/" not in dry.stdout
    assert f"{results}/digits/none/resnet9/seed0/detect-" not in dry.stdout
    # `none` is evaluated from the trained model: no purify job copies it.
    assert f"{results}/digits/badnets/resnet9/seed0/none/metrics.json" in dry.stdout
    assert "/none/model.pt" not in dry.stdout and "/none/purify.json" not in dry.stdout


def test_point_clouds_run_through_every_stage_with_the_test_time_filter(run):
    _, workdir, results = run
    assert json.loads((workdir / "data/shapes/manifest.json").read_text())["generated"] is True
    with h5py.File(results / "shapes/pointba_i/poison-seed0.h5") as f:
        assert f["x_train"].dtype == "float32" and f["x_train"].shape[1:] == (64, 3)
        assert len(f["poisoned_idx"]) == round(0.1 * len(f["x_train"]))
    base = results / "shapes/pointba_i/pointnet/seed0"
    sor = json.loads((base / "sor/metrics.json").read_text())
    assert sor["defense"] == "sor" and sor["trainable_params"] == 0 and sor["purify_seconds"] >= 0
    # The weights are the backdoored model's; the filter is stored beside them and re-applied on load.
    saved = torch.load(base / "sor/model.pt", weights_only=True)
    original = torch.load(base / "model.pt", weights_only=True)["model"]
    assert saved["input_filter"]["name"] == "sor"
    assert all(torch.equal(original[k], saved["model"][k]) for k in original)
    assert "| pointba_i" in (results / "summary/shapes.md").read_text()


def test_detectors_flag_train_set_samples_and_retrained_models_are_evaluated_beside_the_defenses(run):
    _, _, results = run
    for dataset, attack, arch in [("rf1024", "burst", "rf_cnn"), ("digits", "badnets", "resnet9"),
                                  ("shapes", "pointba_i", "pointnet")]:
        detector = DETECTORS[dataset][0]
        folder = results / dataset / attack / arch / "seed0" / f"detect-{detector}"
        found = json.loads((folder / "detection.json").read_text())
        with h5py.File(results / dataset / attack / "poison-seed0.h5") as f:
            n_train, n_poisoned = len(f["y_train"]), len(f["poisoned_idx"])
        with h5py.File(folder / "flagged.h5") as f:
            assert len(f["scores"]) == n_train and len(f["flagged"]) == round(0.15 * n_train)
        assert found["poisoned"] == n_poisoned and found["flagged"] == round(0.15 * n_train)
        assert 0 <= found["tpr"] <= 1 and 0 <= found["fpr"] <= 1 and 0 <= found["auroc"] <= 1
        report = json.loads((folder / "purify.json").read_text())
        assert report["removed_samples"] == found["flagged"] and report["purify_seconds"] > found["detect_seconds"]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["defense"] == f"detect:{detector}"
        assert f"detect:{detector}" in (results / f"summary/{dataset}.md").read_text()
        table = (results / f"summary/{dataset}.detection.md").read_text()
        assert f"| {attack}" in table and detector in table
    # A strong patch on digits is found: the strongest-feature detector ranks its poisons high.
    digits = json.loads((results / "digits/badnets/resnet9/seed0/detect-strongest_feature/detection.json").read_text())
    assert digits["auroc"] > 0.8


def test_each_backdoor_gets_a_picture_of_its_trigger(run):
    _, _, results = run
    for dataset, attack in [("rf1024", "burst"), ("digits", "badnets"), ("shapes", "pointba_i")]:
        assert (results / "figures" / dataset / f"{attack}.png").read_bytes().startswith(b"\x89PNG")
    assert not (results / "figures/rf1024/none.png").exists()


def test_a_config_file_given_on_the_command_line_replaces_the_default(repo, tmp_path):
    # Merged into config/config.yaml (Snakemake's default), config/modelnet40.yaml would also run the
    # default's rf1024, digits and shapes grids.
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--configfile",
                          "config/detection.yaml", "--config", f"results_dir={tmp_path / 'r'}",
                          f"data_root={tmp_path / 'd'}"],
                         cwd=repo, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    results = tmp_path / "r"
    assert f"{results}/shapes/pointba_o/pointnet/seed0/detect-activation_clustering/metrics.json" in dry.stdout
    assert "/wanet/" not in dry.stdout  # an attack of the default config only
    assert "purify" not in dry.stdout.split("Job stats:")[1].split("\n\n")[0]  # detection.yaml defends nothing


def test_the_fip_benchmarks_run_on_the_pipeline_s_models(run):
    """benchmarks/purify_sweep.py and fip_gradient_scale.py read a trained model the way the jobs do."""
    repo, workdir, results = run
    config = str(results / "config.yaml")
    sweep = subprocess.run([sys.executable, str(repo / "benchmarks/purify_sweep.py"), "--config", config,
                            "--params", '{"steps": 3}', "--clean-augment", "roll", "--defense-seeds", "0,1"],
                           cwd=workdir, capture_output=True, text=True, timeout=300)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    report = json.loads(sweep.stdout.strip().splitlines()[-1])
    assert report["clean_augment"] == ["roll"] and report["params"] == {"steps": 3}
    assert [run["defense_seed"] for run in report["after"]] == [0, 1] and report["before"]["asr"] > 0.5
    assert all(0 <= run["asr"] <= 1 and 0 <= run["clip_rate"] <= 1 for run in report["after"])
    asrs = [run["asr"] for run in report["after"]]
    assert report["summary"]["asr"]["n"] == 2
    assert report["summary"]["asr"]["mean"] == pytest.approx(sum(asrs) / 2)
    assert report["summary"]["asr"]["sd"] == pytest.approx(abs(asrs[0] - asrs[1]) / 2 ** 0.5)
    out = workdir / "fip-gradient-scale.md"
    scale = subprocess.run([sys.executable, str(repo / "benchmarks/fip_gradient_scale.py"), "--config", config,
                            "--draws", "2", "--out", str(out)],
                           cwd=workdir, capture_output=True, text=True, timeout=300)
    assert scale.returncode == 0, scale.stderr[-3000:]
    table = out.read_text()
    assert "clean_budget.augment ['rotate', 'roll', 'conjugate', 'cfo', 'noise']" in table
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in table.splitlines()
            if line.startswith("| ‖") or line.startswith("| Tr") or line.startswith("| η")}
    assert set(rows) == {"‖∇CE‖", "Tr(F) estimate", "η_F·‖∇Tr(F)‖"} and all(v > 0 for v in rows.values())
