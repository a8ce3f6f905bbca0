"""Aggregation of evaluation JSONs into the per-dataset CSV, Markdown table and plot."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")

from pipeline_pkg.aggregate import aggregate, load_results  # noqa: E402
from pipeline_pkg.h5io import CorruptFileError  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATASET = "rf1024"
ARCH = "rf_cnn"

# (attack, defense, seed) -> (acc, asr, ra, der, purify_seconds, trainable_params)
# First-appearance order of defenses is fip, ft, nad; burst x fip has two seeds.
RESULTS: dict[tuple[str, str, int], tuple[float, float, float, float, float, int]] = {
    ("burst", "fip", 0): (0.90, 0.02, 0.85, 0.97, 10.0, 1000),
    ("burst", "fip", 1): (0.92, 0.04, 0.87, 0.95, 14.0, 1000),
    ("burst", "ft", 0): (0.88, 0.50, 0.40, 0.70, 5.0, 2000),
    ("burst", "nad", 0): (0.89, 0.10, 0.80, 0.90, 20.0, 3000),
    ("sine", "fip", 0): (0.91, 0.031, 0.82, 0.96, 11.0, 1000),
    ("sine", "ft", 0): (0.875, 0.6, 0.30, 0.65, 6.0, 2000),
    ("sine", "nad", 0): (0.86, 0.2, 0.70, 0.85, 21.0, 3000),
    ("none", "fip", 0): (0.93, 0.11, 0.0, 0.5, 9.0, 1000),
    ("none", "ft", 0): (0.935, 0.10, 0.0, 0.5, 4.0, 2000),
    ("none", "nad", 0): (0.925, 0.12, 0.0, 0.5, 19.0, 3000),
}
# attack -> undefended (acc, asr, ra); the same backdoored model for every defense and seed
UNDEFENDED = {"burst": (0.92, 0.99, 0.01), "sine": (0.915, 0.98, 0.02), "none": (0.94, 0.10, 0.0)}


def make_record(attack: str, defense: str, seed: int, dataset: str = DATASET) -> dict:
    acc, asr, ra, der, seconds, params = RESULTS[(attack, defense, seed)]
    u_acc, u_asr, u_ra = UNDEFENDED[attack]
    return {"dataset": dataset, "attack": attack, "arch": ARCH, "seed": seed, "defense": defense,
            "acc": acc, "asr": asr, "ra": ra, "der": der,
            "undefended": {"acc": u_acc, "asr": u_asr, "ra": u_ra},
            "purify_seconds": seconds, "trainable_params": params}


def write_record(directory: Path, record: dict) -> Path:
    path = directory / (f"{record['dataset']}-{record['attack']}-{record['arch']}-"
                        f"{record['seed']}-{record['defense']}.json")
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def metrics_files(tmp_path: Path) -> list[Path]:
    directory = tmp_path / "metrics"
    directory.mkdir()
    return [write_record(directory, make_record(*key)) for key in RESULTS]


def tracking_importable() -> bool:
    try:
        importlib.import_module("pipeline_pkg.tracking")
    except Exception:  # not written yet, or mid-edit by its author
        return False
    return True


def parse_markdown_table(text: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Header cells and {row label: {column: cell}} of the single pipe table in `text`."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, body = split[0], split[2:]  # split[1] is the alignment rule
    return header, {row[0]: dict(zip(header[1:], row[1:])) for row in body}


def test_load_results_flattens_undefended(metrics_files: list[Path]) -> None:
    df = load_results(metrics_files)
    assert len(df) == len(RESULTS)
    row = df[(df["attack"] == "sine") & (df["defense"] == "ft")].iloc[0]
    assert row["undefended_acc"] == pytest.approx(0.915)
    assert row["undefended_asr"] == pytest.approx(0.98)
    assert row["undefended_ra"] == pytest.approx(0.02)
    assert "undefended" not in df.columns


def test_aggregate_csv_markdown_png(metrics_files: list[Path], tmp_path: Path) -> None:
    out_dir = tmp_path / "results"
    outputs = aggregate(metrics_files, out_dir)

    assert outputs == {"csv": out_dir / "rf1024.csv", "md": out_dir / "rf1024.md",
                       "png": out_dir / "rf1024.png"}
    # nothing half-written or temporary left beside the outputs
    assert sorted(p.name for p in out_dir.iterdir()) == ["rf1024.csv", "rf1024.md", "rf1024.png"]

    # CSV: one row per attack x arch x defense, mean and sample std over seeds
    csv = pd.read_csv(outputs["csv"])
    assert len(csv) == 9
    for metric in ("acc", "asr", "ra", "der", "purify_seconds", "trainable_params"):
        assert f"{metric}_mean" in csv.columns and f"{metric}_std" in csv.columns
    cell = csv[(csv["attack"] == "burst") & (csv["defense"] == "fip")].iloc[0]
    assert cell["dataset"] == DATASET and cell["arch"] == ARCH
    assert cell["n_seeds"] == 2
    assert cell["acc_mean"] == pytest.approx(0.91)
    assert cell["acc_std"] == pytest.approx(math.sqrt(2) * 0.01)  # sample std of 0.90, 0.92
    assert cell["asr_mean"] == pytest.approx(0.03)
    assert cell["asr_std"] == pytest.approx(math.sqrt(2) * 0.01)
    assert cell["ra_mean"] == pytest.approx(0.86)
    assert cell["der_mean"] == pytest.approx(0.96)
    assert cell["purify_seconds_mean"] == pytest.approx(12.0)
    assert cell["purify_seconds_std"] == pytest.approx(math.sqrt(8))
    assert cell["trainable_params_mean"] == pytest.approx(1000)
    assert cell["trainable_params_std"] == pytest.approx(0)
    single = csv[(csv["attack"] == "sine") & (csv["defense"] == "nad")].iloc[0]
    assert single["n_seeds"] == 1
    assert single["acc_mean"] == pytest.approx(0.86)
    assert math.isnan(single["acc_std"])  # one seed: std undefined, not zero
    assert list(csv["defense"].drop_duplicates()) == ["fip", "ft", "nad"]

    # Markdown: title, legend, columns in first-appearance order, exact cell strings
    markdown = outputs["md"].read_text()
    assert markdown.startswith("# ") and "rf1024" in markdown.splitlines()[0]
    assert "ACC" in markdown and "ASR" in markdown
    header, table = parse_markdown_table(markdown)
    assert header == ["Attack", "undefended", "fip", "ft", "nad"]  # one arch: no "(arch)" in labels
    assert list(table) == ["burst", "sine", "none"]
    assert table["burst"] == {"undefended": "92.0 ± 0.0 / 99.0 ± 0.0", "fip": "91.0 ± 1.4 / 3.0 ± 1.4",
                              "ft": "88.0 / 50.0", "nad": "89.0 / 10.0"}
    assert table["sine"] == {"undefended": "91.5 / 98.0", "fip": "91.0 / 3.1",
                             "ft": "87.5 / 60.0", "nad": "86.0 / 20.0"}
    assert table["none"]["ft"] == "93.5 / 10.0"
    assert "| 91.0 ± 1.4 / 3.0 ± 1.4 |" in markdown.replace("  ", " ")

    # PNG: a real, non-empty PNG file
    png = outputs["png"].read_bytes()
    assert len(png) > 1000
    assert png[:8] == PNG_SIGNATURE


def test_aggregate_labels_rows_with_arch_when_several(metrics_files: list[Path], tmp_path: Path) -> None:
    record = make_record("burst", "fip", 0)
    record["arch"] = "rf_resnet"
    extra = write_record(tmp_path / "metrics", record)
    outputs = aggregate([*metrics_files, extra], tmp_path / "results", dataset=DATASET)
    header, table = parse_markdown_table(outputs["md"].read_text())
    assert header[0] == "Attack (arch)"
    assert list(table) == ["burst (rf_cnn)", "burst (rf_resnet)", "sine (rf_cnn)", "none (rf_cnn)"]
    # a cell that was not run is marked, not left blank
    assert table["burst (rf_resnet)"] == {"undefended": "92.0 / 99.0", "fip": "90.0 / 2.0",
                                          "ft": "—", "nad": "—"}


def test_missing_key_names_key_and_file(metrics_files: list[Path], tmp_path: Path) -> None:
    broken = make_record("sine", "fip", 0)
    del broken["asr"]
    del broken["undefended"]["ra"]
    broken_path = tmp_path / "broken.json"
    broken_path.write_text(json.dumps(broken))
    with pytest.raises(CorruptFileError) as info:
        aggregate([*metrics_files, broken_path], tmp_path / "results")
    message = str(info.value)
    assert str(broken_path) in message
    assert "'asr'" in message and "undefended.ra" in message
    assert not (tmp_path / "results" / "rf1024.csv").exists()


def test_unparsable_json_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"dataset": "rf1024", ')
    with pytest.raises(CorruptFileError, match="bad.json"):
        load_results([bad])


def test_duplicate_job_is_rejected(metrics_files: list[Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy.json"
    copy.write_text(metrics_files[0].read_text())
    with pytest.raises(ValueError, match="same job"):
        aggregate([*metrics_files, copy], tmp_path / "results")


def test_dataset_mismatch_fails_clearly(metrics_files: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"expected only dataset 'other'.*rf1024"):
        aggregate(metrics_files, tmp_path / "results", dataset="other")

    stray = write_record(tmp_path, make_record("sine", "ft", 0, dataset="rf2048"))
    with pytest.raises(ValueError) as info:
        aggregate([*metrics_files, stray], tmp_path / "results")
    assert "rf2048" in str(info.value) and str(stray) in str(info.value)
    assert not (tmp_path / "results").exists()


def test_no_files_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no metrics files"):
        aggregate([], tmp_path / "results", dataset=DATASET)


@pytest.mark.skipif(not tracking_importable(), reason="pipeline_pkg.tracking cannot be imported yet")
def test_aggregate_logs_mlflow_run(metrics_files: list[Path], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # any default artifact root lands in tmp_path, not the repo
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # it would override the config's URI
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # config order differs from first appearance: the table must follow the config
    config = {"results_dir": str(tmp_path), "tracking": {"uri": uri, "experiment": "t"},
              "datasets": {DATASET: {"archs": [ARCH], "attacks": ["none", "sine", "burst"]}},
              "defenses": {"nad": {}, "fip": {}, "ft": {}}}
    outputs = aggregate(metrics_files, tmp_path / "results", config=config, dataset=DATASET)

    header, table = parse_markdown_table(outputs["md"].read_text())
    assert header == ["Attack", "undefended", "nad", "fip", "ft"]
    assert list(table) == ["none", "sine", "burst"]

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("t")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    runs = [r for r in runs if r.data.tags.get("stage") == "aggregate"]
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags.get("dataset") == DATASET
    assert run.data.params.get("n_results") == str(len(RESULTS))
    # mean ASR over the two backdoor attacks, the benign reference excluded
    assert run.data.metrics["asr/fip"] == pytest.approx((0.03 + 0.031) / 2)
    artifacts = set()
    pending = [None]
    while pending:  # artifacts may sit in a sub-folder, depending on the tracker
        for info in client.list_artifacts(run.info.run_id, pending.pop()):
            (pending.append(info.path) if info.is_dir else artifacts.add(Path(info.path).name))
    assert {"rf1024.csv", "rf1024.md", "rf1024.png"} <= artifacts


def test_detection_table_averages_seeds_and_marks_what_was_not_run(metrics_files: list[Path],
                                                                   tmp_path: Path) -> None:
    directory = tmp_path / "detections"
    directory.mkdir()
    rows = [("burst", "spectral", 0, 0.90, 0.02, 0.97), ("burst", "spectral", 1, 0.70, 0.04, 0.93),
            ("burst", "strongest_feature", 0, 1.0, 0.05, 0.99), ("none", "spectral", 0, None, 0.15, None)]
    files = []
    for attack, detector, seed, tpr, fpr, auroc in rows:
        path = directory / f"{attack}-{detector}-{seed}.json"
        path.write_text(json.dumps({"dataset": DATASET, "attack": attack, "arch": ARCH, "seed": seed,
                                    "detector": detector, "tpr": tpr, "fpr": fpr, "auroc": auroc,
                                    "flagged": 15, "poisoned": 10, "detect_seconds": 1.5}))
        files.append(path)
    config = {"datasets": {DATASET: {"attacks": ["none", "burst"], "archs": [ARCH]}},
              "detectors": {"strongest_feature": {}, "spectral": {}}}
    outputs = aggregate(metrics_files, tmp_path / "out", dataset=DATASET, detection_files=files)
    table = outputs["detection_md"].read_text()
    burst_row = next(line for line in table.splitlines() if line.startswith("| burst"))
    # seeds averaged: TPR (0.9 + 0.7) / 2, FPR 3%, AUROC 95%
    assert "80.0 / 3.0 / 95.0" in burst_row and "100.0 / 5.0 / 99.0" in burst_row
    none_row = next(line for line in table.splitlines() if line.startswith("| none"))
    assert "n/a / 15.0 / n/a" in none_row and "—" in none_row  # strongest_feature not run on none
    csv = pd.read_csv(outputs["detection_csv"])
    assert len(csv) == 3 and set(csv["detector"]) == {"spectral", "strongest_feature"}
    # with a config, columns follow its detector order
    from pipeline_pkg.aggregate import aggregate_detection
    ordered = aggregate_detection(files, {"csv": tmp_path / "d.csv", "md": tmp_path / "d.md"},
                                  config=config, dataset=DATASET)
    header = ordered["md"].read_text().splitlines()[4]
    assert header.index("strongest_feature") < header.index("spectral")
    empty = aggregate(metrics_files, tmp_path / "none", dataset=DATASET, detection_files=[])
    assert "No detector was configured" in empty["detection_md"].read_text()
