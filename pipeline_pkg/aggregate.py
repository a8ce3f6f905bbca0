"""Aggregate per-job evaluation JSONs into one table, one Markdown summary and one plot per dataset.

Input: the JSON that the evaluate stage writes for each (dataset, attack, arch, seed, defense) job.
Output, per dataset, all written atomically:

* ``<dataset>.csv``: long format, one row per attack x arch x defense, mean and std over seeds;
* ``<dataset>.md``: paper-style table, attacks as rows, defenses as columns, cells "ACC / ASR" in %;
* ``<dataset>.png``: ASR against ACC scatter, one marker per defense, annotated with the attack.

pandas and matplotlib are imported inside the functions so that the package stays importable on a
GPU box that has only torch, numpy and h5py.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from .h5io import CorruptFileError, atomic_path, read_json
from .paths import summary_paths

if TYPE_CHECKING:  # only for annotations: pandas is imported lazily at run time
    import pandas as pd

#: Keys identifying a job; strings except seed.
ID_KEYS: tuple[str, ...] = ("dataset", "attack", "arch", "seed", "defense")
#: Per-job metrics that are averaged over seeds.
METRIC_KEYS: tuple[str, ...] = ("acc", "asr", "ra", "der", "purify_seconds", "trainable_params")
#: Metrics of the undefended (backdoored, not purified) model, nested under "undefended".
UNDEFENDED_KEYS: tuple[str, ...] = ("acc", "asr", "ra")
REQUIRED_KEYS: tuple[str, ...] = ID_KEYS + METRIC_KEYS + ("undefended",)
#: Sharpness of the clean loss surface, present when the evaluate stage measured it (NaN otherwise),
#: for the purified and (nested under "undefended") the backdoored model.
OPTIONAL_KEYS: tuple[str, ...] = ("lambda_max", "hessian_trace")
#: Every averaged column of the long table.
VALUE_COLUMNS: tuple[str, ...] = (*METRIC_KEYS, *OPTIONAL_KEYS,
                                  *(f"undefended_{k}" for k in UNDEFENDED_KEYS + OPTIONAL_KEYS))

#: Attack name of the benign reference model: not a backdoor, so it is kept out of the scatter
#: and out of the per-defense ASR summary.
BENIGN_ATTACK = "none"
#: Column label of the undefended baseline in the Markdown table; the plot uses the same name.
UNDEFENDED_LABEL = "undefended"

_GROUP_KEYS = ["attack", "arch", "defense"]


# --------------------------------------------------------------------------------------------- load

def _is_number(value: Any) -> bool:
    # bool is an int subclass, but True as an accuracy is a bug upstream, not a value
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_record(record: Any, path: Path) -> None:
    """Raise CorruptFileError naming `path` and every problem found, not only the first."""
    if not isinstance(record, dict):
        raise CorruptFileError(f"{path}: expected a JSON object, got {type(record).__name__}")
    problems: list[str] = []
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        problems.append(f"missing key(s) {missing}")
    for key in ("dataset", "attack", "arch", "defense"):
        if key in record and not isinstance(record[key], str):
            problems.append(f"{key!r} must be a string, got {record[key]!r}")
    if "seed" in record and not (isinstance(record["seed"], int) and not isinstance(record["seed"], bool)):
        problems.append(f"'seed' must be an integer, got {record['seed']!r}")
    # null is accepted for metrics (e.g. a DER that is undefined for the benign model) and becomes NaN
    for key in METRIC_KEYS:
        if key in record and record[key] is not None and not _is_number(record[key]):
            problems.append(f"{key!r} must be a number or null, got {record[key]!r}")
    undefended = record.get("undefended")
    if "undefended" in record:
        if not isinstance(undefended, dict):
            problems.append(f"'undefended' must be an object with keys {list(UNDEFENDED_KEYS)}")
        else:
            missing_nested = [f"undefended.{k}" for k in UNDEFENDED_KEYS if k not in undefended]
            if missing_nested:
                problems.append(f"missing key(s) {missing_nested}")
            for key in UNDEFENDED_KEYS:
                value = undefended.get(key)
                if key in undefended and value is not None and not _is_number(value):
                    problems.append(f"'undefended.{key}' must be a number or null, got {value!r}")
    if problems:
        raise CorruptFileError(
            f"invalid metrics file {path}: " + "; ".join(problems)
            + " (it should be written by the evaluate stage; delete it and rerun that job)")


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def load_results(paths: Iterable[str | os.PathLike]) -> "pd.DataFrame":
    """One row per evaluation JSON; ``undefended.*`` flattened to ``undefended_acc`` etc.

    A column ``source`` keeps the file each row came from, so later errors can name it. Raises
    CorruptFileError naming the file for unparsable JSON or missing/mistyped keys, and ValueError
    when two files describe the same job (dataset, attack, arch, seed, defense).
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for raw_path in paths:
        path = Path(raw_path)
        record = read_json(path)
        _validate_record(record, path)
        row: dict[str, Any] = {key: record[key] for key in ID_KEYS}
        row.update({key: _as_float(record[key]) for key in METRIC_KEYS})
        row.update({key: _as_float(record.get(key)) for key in OPTIONAL_KEYS})
        row.update({f"undefended_{key}": _as_float(record["undefended"][key]) for key in UNDEFENDED_KEYS})
        row.update({f"undefended_{key}": _as_float(record["undefended"].get(key)) for key in OPTIONAL_KEYS})
        row["source"] = str(path)
        rows.append(row)

    columns = [*ID_KEYS, *VALUE_COLUMNS, "source"]
    df = pd.DataFrame(rows, columns=columns)
    df["seed"] = df["seed"].astype("int64")

    # the same job twice would silently double its weight in the mean
    duplicated = df[df.duplicated(list(ID_KEYS), keep=False)]
    if not duplicated.empty:
        first = duplicated.iloc[0]
        clash = duplicated[(duplicated[list(ID_KEYS)] == first[list(ID_KEYS)]).all(axis=1)]
        job = ", ".join(f"{key}={first[key]}" for key in ID_KEYS)
        raise ValueError(f"several metrics files describe the same job ({job}): {list(clash['source'])}")
    return df


# ---------------------------------------------------------------------------------------- summarise

def _names(section: Any) -> list[str]:
    """A dict's keys (its order is the user's order) or a list's items; else nothing."""
    if isinstance(section, (Mapping, list, tuple)):
        return [str(name) for name in section]
    return []


def _config_order(config: Mapping[str, Any] | None, key: str, dataset: str) -> list[str]:
    """The user's order for `key`: the dataset's own list (config["datasets"][dataset][key]),
    which is what was actually run, else the top-level config[key]."""
    config = config or {}
    per_dataset = (config.get("datasets") or {}).get(dataset)
    if isinstance(per_dataset, Mapping) and _names(per_dataset.get(key)):
        return _names(per_dataset.get(key))
    return _names(config.get(key))


def _ordered(present: Sequence[str], preferred: Sequence[str]) -> list[str]:
    """`present` names sorted by `preferred` order; names not in it follow in first-seen order."""
    rank = {name: i for i, name in enumerate(preferred)}
    first_seen = list(dict.fromkeys(present))
    return sorted(first_seen, key=lambda name: (rank.get(name, len(rank)), first_seen.index(name)))


def summarise(df: "pd.DataFrame") -> "pd.DataFrame":
    """Long table: mean and sample std (ddof=1; NaN for a single seed) per attack x arch x defense.

    Also carries the undefended model's mean/std per cell, so the CSV alone shows what each
    defense started from.
    """
    import pandas as pd

    value_columns = list(VALUE_COLUMNS)
    grouped = df.groupby(_GROUP_KEYS, sort=False)
    means = grouped[value_columns].mean()
    stds = grouped[value_columns].std(ddof=1)
    n_seeds = grouped["seed"].nunique().rename("n_seeds")

    summary = pd.concat(
        [n_seeds]
        + [pd.concat([means[c].rename(f"{c}_mean"), stds[c].rename(f"{c}_std")], axis=1)
           for c in value_columns],
        axis=1,
    ).reset_index()
    summary.insert(0, "dataset", df["dataset"].iloc[0])
    return summary


def _sort_summary(summary: "pd.DataFrame", attacks: list[str], archs: list[str],
                  defenses: list[str]) -> "pd.DataFrame":
    order = summary.assign(
        _a=summary["attack"].map({n: i for i, n in enumerate(attacks)}),
        _r=summary["arch"].map({n: i for i, n in enumerate(archs)}),
        _d=summary["defense"].map({n: i for i, n in enumerate(defenses)}),
    ).sort_values(["_a", "_r", "_d"], kind="stable")
    return order.drop(columns=["_a", "_r", "_d"]).reset_index(drop=True)


def _undefended_baseline(df: "pd.DataFrame") -> "pd.DataFrame":
    """Undefended ACC/ASR per attack x arch: one value per seed (every defense job of a seed
    reports the same undefended model), then mean and std over seeds."""
    per_seed = df.groupby(["attack", "arch", "seed"], sort=False)[
        ["undefended_acc", "undefended_asr"]].mean()
    grouped = per_seed.groupby(["attack", "arch"], sort=False)
    baseline = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_std"))
    baseline["n_seeds"] = grouped.size()
    return baseline.reset_index()


# ----------------------------------------------------------------------------------------- markdown

def _pct(mean: float, std: float, n_seeds: int) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    text = f"{100 * mean:.1f}"
    # a std from one seed is undefined; showing "± 0.0" would claim a precision never measured
    if n_seeds > 1 and std is not None and not math.isnan(std):
        text += f" ± {100 * std:.1f}"
    return text


def format_cell(acc_mean: float, acc_std: float, asr_mean: float, asr_std: float, n_seeds: int) -> str:
    """'ACC / ASR' in percent with one decimal, e.g. '91.2 / 3.1', or '91.2 ± 0.4 / 3.1 ± 1.0'."""
    return f"{_pct(acc_mean, acc_std, n_seeds)} / {_pct(asr_mean, asr_std, n_seeds)}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    # label column left-aligned, numbers right-aligned, as in a paper
    rule = "| " + " | ".join([":" + "-" * (widths[0] - 1)] + ["-" * (w - 1) + ":" for w in widths[1:]]) + " |"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def render_markdown(summary: "pd.DataFrame", baseline: "pd.DataFrame", dataset: str,
                    attacks: list[str], archs: list[str], defenses: list[str],
                    include_undefended: bool = True) -> str:
    """Title, one-line legend and the table; rows attack (arch), columns [undefended,] defenses."""
    show_arch = len(archs) > 1
    cells = {(r.attack, r.arch, r.defense):
             format_cell(r.acc_mean, r.acc_std, r.asr_mean, r.asr_std, r.n_seeds)
             for r in summary.itertuples(index=False)}
    base_cells = {(r.attack, r.arch): format_cell(r.undefended_acc_mean, r.undefended_acc_std,
                                                  r.undefended_asr_mean, r.undefended_asr_std, r.n_seeds)
                  for r in baseline.itertuples(index=False)}
    seeds = sorted(set(summary["n_seeds"].astype(int)))

    header = ["Attack (arch)" if show_arch else "Attack"]
    header += ([UNDEFENDED_LABEL] if include_undefended else []) + list(defenses)
    rows: list[list[str]] = []
    for attack in attacks:
        for arch in archs:
            if (attack, arch) not in base_cells:
                continue  # this attack was not run with this arch
            label = f"{attack} ({arch})" if show_arch else attack
            row = [label] + ([base_cells[(attack, arch)]] if include_undefended else [])
            row += [cells.get((attack, arch, defense), "—") for defense in defenses]
            rows.append(row)

    seed_text = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    legend = (f"Cells: clean accuracy (ACC) / attack success rate (ASR) in %, mean ± std over "
              f"seeds (n = {seed_text} per cell; no ± with one seed); higher ACC and lower ASR are better; "
              f"'{UNDEFENDED_LABEL}' is the backdoored model before purification, attack "
              f"'{BENIGN_ATTACK}' the benign reference (its ASR is the chance rate), '—' not run.")
    return f"# Backdoor purification results: {dataset}\n\n{legend}\n\n{_markdown_table(header, rows)}\n"


# --------------------------------------------------------------------------------------------- plot

def render_plot(summary: "pd.DataFrame", baseline: "pd.DataFrame", dataset: str, path: Path,
                defenses: list[str], show_arch: bool) -> None:
    """ASR (y) against ACC (x) in %, one marker and colour per defense, each point labelled with
    its attack; the benign reference is left out because its ASR is not a backdoor's.

    Uses matplotlib's object API with the Agg canvas, never pyplot, so no global backend is
    switched and no GUI is needed on a headless node.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    markers = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p"]
    colours = [f"C{i}" for i in range(10)]

    def label_of(attack: str, arch: str) -> str:
        return f"{attack} ({arch})" if show_arch else attack

    def scatter(frame: "pd.DataFrame", acc: str, asr: str, name: str, marker: str, colour: str) -> None:
        frame = frame[frame["attack"] != BENIGN_ATTACK]
        if frame.empty:
            return
        # an outline only makes sense on filled markers; matplotlib warns for line markers like "x"
        outline = {} if marker in ("x", "+") else {"edgecolors": "black", "linewidths": 0.4}
        axes.scatter(100 * frame[acc], 100 * frame[asr], marker=marker, color=colour, s=45,
                     label=name, alpha=0.85, **outline)
        for row in frame.itertuples(index=False):
            axes.annotate(label_of(row.attack, row.arch), (100 * getattr(row, acc), 100 * getattr(row, asr)),
                          textcoords="offset points", xytext=(4, 3), fontsize=7, color=colour)

    # the undefended model in grey shows where each defense started from
    scatter(baseline, "undefended_acc_mean", "undefended_asr_mean", UNDEFENDED_LABEL, "x", "grey")
    for i, defense in enumerate(defenses):
        scatter(summary[summary["defense"] == defense], "acc_mean", "asr_mean", defense,
                markers[i % len(markers)], colours[i % len(colours)])

    if not axes.collections:
        axes.text(0.5, 0.5, "no backdoor attack results", ha="center", va="center",
                  transform=axes.transAxes)
    else:
        axes.legend(title="defense", fontsize=8, title_fontsize=8, loc="best")
    axes.set_xlim(-2, 102)
    axes.set_ylim(-2, 102)
    axes.set_xlabel("clean accuracy ACC (%), higher is better")
    axes.set_ylabel("attack success rate ASR (%), lower is better")
    axes.set_title(f"{dataset}: ASR vs ACC after purification (mean over seeds)")
    axes.grid(True, alpha=0.3)
    # the temporary name ends in .part, so the format has to be given explicitly
    figure.savefig(path, format="png", dpi=150)


# ------------------------------------------------------------------------------------------ tracking

def _metric_name(prefix: str, name: str) -> str:
    # MLflow rejects metric names outside [A-Za-z0-9_\-. /]
    safe_name = re.sub(r"[^A-Za-z0-9_\-. ]", "_", name)
    return f"{prefix}/{safe_name}"


def summary_metrics(summary: "pd.DataFrame") -> dict[str, float]:
    """Per defense: mean ASR and DER over backdoor attacks, mean ACC and RA over all attacks."""
    metrics: dict[str, float] = {}
    attacked = summary[summary["attack"] != BENIGN_ATTACK]
    for defense, frame in summary.groupby("defense", sort=False):
        backdoor = attacked[attacked["defense"] == defense]
        values = {"acc": frame["acc_mean"].mean(), "ra": backdoor["ra_mean"].mean(),
                  "asr": backdoor["asr_mean"].mean(), "der": backdoor["der_mean"].mean(),
                  "purify_seconds": frame["purify_seconds_mean"].mean()}
        for key, value in values.items():
            if not math.isnan(value):  # MLflow stores NaN, but it only clutters the comparison view
                metrics[_metric_name(key, str(defense))] = float(value)
    return metrics


def _log_to_tracker(config: dict, dataset: str, n_results: int, summary: "pd.DataFrame",
                    outputs: dict[str, Path]) -> None:
    try:
        from .tracking import tracker_from_config
    except ImportError as exc:
        # the tables are already written; a missing tracker must not fail the pipeline
        warnings.warn(f"aggregate: MLflow tracking unavailable ({exc}); results written without a run")
        return
    with tracker_from_config(config, stage="aggregate", run_name=f"aggregate-{dataset}",
                             tags={"stage": "aggregate", "dataset": dataset},
                             params={"n_results": n_results}) as tracker:
        tracker.log_metrics(summary_metrics(summary))
        for path in outputs.values():
            tracker.log_artifact(path)


# ----------------------------------------------------------------------------------------- detection

#: What the detect stage measures per job (stages.detect), averaged over seeds in the detection table.
DETECTION_KEYS: tuple[str, ...] = ("tpr", "fpr", "auroc", "flagged", "poisoned", "detect_seconds")


def load_detections(paths: Iterable[str | os.PathLike]) -> "pd.DataFrame":
    """One row per detection.json (dataset, attack, arch, seed, detector and DETECTION_KEYS)."""
    import pandas as pd

    rows = []
    for raw_path in paths:
        path = Path(raw_path)
        record = read_json(path)
        missing = [k for k in ("dataset", "attack", "arch", "seed", "detector", *DETECTION_KEYS)
                   if not isinstance(record, dict) or k not in record]
        if missing:
            raise CorruptFileError(f"invalid detection file {path}: missing key(s) {missing} (it should be "
                                   f"written by the detect stage; delete it and rerun that job)")
        rows.append({**{k: record[k] for k in ("dataset", "attack", "arch", "seed", "detector")},
                     **{k: _as_float(record[k]) for k in DETECTION_KEYS}})
    return pd.DataFrame(rows, columns=["dataset", "attack", "arch", "seed", "detector", *DETECTION_KEYS])


def render_detection_markdown(summary: "pd.DataFrame", dataset: str, attacks: list[str], archs: list[str],
                              detectors: list[str]) -> str:
    show_arch = len(archs) > 1
    cells = {(r.attack, r.arch, r.detector): f"{_pct(r.tpr, math.nan, 1)} / {_pct(r.fpr, math.nan, 1)} / "
                                             f"{_pct(r.auroc, math.nan, 1)}"
             for r in summary.itertuples(index=False)}
    header = ["Attack (arch)" if show_arch else "Attack", *detectors]
    rows = [[f"{attack} ({arch})" if show_arch else attack,
             *(cells.get((attack, arch, d), "—") for d in detectors)]
            for attack in attacks for arch in archs
            if any((attack, arch, d) in cells for d in detectors)]
    legend = ("Cells: TPR / FPR / AUROC in %, mean over seeds: the share of the poisoned training samples "
              "each detector flagged, the share of clean ones it flagged, and the area under the ROC curve "
              "of its scores. The benign reference (attack "
              f"'{BENIGN_ATTACK}') has no poisoned sample: only its FPR is defined. '—' not run.")
    if not rows:
        return f"# Poison detection: {dataset}\n\nNo detector was configured for this dataset.\n"
    return f"# Poison detection: {dataset}\n\n{legend}\n\n{_markdown_table(header, rows)}\n"


def aggregate_detection(detection_files: list[str | os.PathLike], outputs: dict[str, Path], *,
                        config: dict | None = None, dataset: str) -> dict[str, Path]:
    """The detection table (csv and md) of one dataset: TPR, FPR and AUROC per attack × detector."""
    df = load_detections(detection_files)
    group = ["attack", "arch", "detector"]
    summary = (df.groupby(group, sort=False)[list(DETECTION_KEYS)].mean().reset_index()
               if len(df) else df.drop(columns=["dataset", "seed"]))
    summary.insert(0, "dataset", dataset)
    attacks = _ordered(list(summary["attack"]), _config_order(config, "attacks", dataset))
    archs = _ordered(list(summary["arch"]), _config_order(config, "archs", dataset))
    detectors = _ordered(list(summary["detector"]), _config_order(config, "detectors", dataset))
    with atomic_path(outputs["csv"]) as tmp:
        summary.to_csv(tmp, index=False, float_format="%.10g")
    with atomic_path(outputs["md"]) as tmp:
        tmp.write_text(render_detection_markdown(summary, dataset, attacks, archs, detectors), encoding="utf-8")
    return outputs


# --------------------------------------------------------------------------------------------- main

def aggregate(metrics_files: list[str | os.PathLike], out_dir: str | os.PathLike, *,
              config: dict | None = None, dataset: str | None = None,
              include_undefended: bool = True,
              detection_files: list[str | os.PathLike] | None = None) -> dict[str, Path]:
    """Write ``<dataset>.csv``, ``<dataset>.md`` and ``<dataset>.png`` into `out_dir`, and with
    `detection_files` (a list, possibly empty) the detection table ``<dataset>.detection.{csv,md}``.

    All files must belong to one dataset (`dataset` if given). With a `config`, columns follow the
    order of config["defenses"] and rows that of config["datasets"][dataset]["attacks"/"archs"]
    (names the config lacks follow in first-seen order), and a summary MLflow run is logged
    through `pipeline_pkg.tracking`; without one, everything is in first-seen order.
    Returns {"csv": path, "md": path, "png": path}.
    """
    files = [Path(p) for p in metrics_files]
    if not files:
        raise ValueError(f"aggregate: no metrics files given for dataset {dataset!r}")
    df = load_results(files)

    found = list(dict.fromkeys(df["dataset"]))
    if len(found) > 1 or (dataset is not None and found != [dataset]):
        expected = dataset if dataset is not None else found[0]
        strays = df.loc[df["dataset"] != expected, ["dataset", "source"]]
        listing = ", ".join(f"{src} ({name})" for name, src in strays.itertuples(index=False, name=None))
        raise ValueError(f"aggregate: expected only dataset {expected!r} but found {found}; "
                         f"files of another dataset: {listing}")
    dataset = found[0]

    attacks = _ordered(list(df["attack"]), _config_order(config, "attacks", dataset))
    archs = _ordered(list(df["arch"]), _config_order(config, "archs", dataset))
    defenses = _ordered(list(df["defense"]), _config_order(config, "defenses", dataset))

    summary = _sort_summary(summarise(df), attacks, archs, defenses)
    baseline = _undefended_baseline(df)

    every_output = summary_paths(out_dir, dataset)
    outputs = {k: every_output[k] for k in ("csv", "md", "png")}
    with atomic_path(outputs["csv"]) as tmp:
        summary.to_csv(tmp, index=False, float_format="%.10g")
    with atomic_path(outputs["md"]) as tmp:
        tmp.write_text(render_markdown(summary, baseline, dataset, attacks, archs, defenses,
                                       include_undefended), encoding="utf-8")
    with atomic_path(outputs["png"]) as tmp:
        render_plot(summary, baseline, dataset, tmp, defenses, show_arch=len(archs) > 1)
    if detection_files is not None:
        detection = {"csv": every_output["detection_csv"], "md": every_output["detection_md"]}
        aggregate_detection(detection_files, detection, config=config, dataset=dataset)
        outputs.update({f"detection_{k}": v for k, v in detection.items()})

    if config is not None:
        _log_to_tracker(config, dataset, len(df), summary, outputs)
    return outputs
