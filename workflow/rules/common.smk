import os
import uuid

from pipeline_pkg import config as pipeline_config
from pipeline_pkg import paths, stages
from pipeline_pkg.h5io import atomic_path


# Names are checked against the registries and every parameter block against its component, so a typo
# fails here, before any job runs, with the list of valid names.
config.update(pipeline_config.validate(config))

RESULTS = config["results_dir"]
DATA_ROOT = config["data_root"]
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
RUN = "{dataset}/{attack}/{arch}/seed{seed}"
CONDA_ENV = "../envs/pipeline.yaml"

# One id for every job of this invocation: MLflow groups the runs by it (the `invocation` tag).
os.environ.setdefault("PIPELINE_INVOCATION_ID", uuid.uuid4().hex[:12])


def job_settings(wildcards):
    """Resolved settings of a job, passed as a param so that a config change reruns the affected jobs."""
    return stages.job_settings(
        config,
        wildcards.dataset,
        wildcards.attack,
        wildcards.get("arch"),
        wildcards.get("defense"),
    )


def detect_settings(wildcards):
    """Resolved settings of a detect or retrain job (a config change reruns it)."""
    return stages.job_settings(
        config,
        wildcards.dataset,
        wildcards.attack,
        wildcards.arch,
        stages.detect_folder(wildcards.detector),
    )


def methods(dataset, attack):
    """Folders of the methods evaluated on one attack's models: the defenses, then detect-<detector> per
    detector (only `none` on the benign reference unless `defend_benign`)."""
    return pipeline_config.defenses_for(config, dataset, attack) + [
        stages.detect_folder(d) for d in pipeline_config.detectors_for(config, dataset, attack)
    ]


def run_dirs(dataset):
    """(run folder, attack) of every trained model of a dataset."""
    entry = config["datasets"][dataset]
    return [
        (f"{RESULTS}/{dataset}/{attack}/{arch}/seed{seed}", attack)
        for attack in entry["attacks"]
        for arch in entry["archs"]
        for seed in config["seeds"]
    ]


def dataset_metrics(wildcards):
    return [
        f"{run}/{method}/metrics.json"
        for run, attack in run_dirs(wildcards.dataset)
        for method in methods(wildcards.dataset, attack)
    ]


def dataset_detections(wildcards):
    return [
        f"{run}/{stages.detect_folder(detector)}/detection.json"
        for run, attack in run_dirs(wildcards.dataset)
        for detector in pipeline_config.detectors_for(config, wildcards.dataset, attack)
    ]


def method_run(wildcards):
    """The (results, dataset, attack, arch, seed, method) that pipeline_pkg.paths names one method's
    files by."""
    return (
        RESULTS,
        wildcards.dataset,
        wildcards.attack,
        wildcards.arch,
        wildcards.seed,
        wildcards.defense,
    )


def purified_input(wildcards):
    """The model a method's evaluation measures: `none` measures the trained model itself."""
    return str(paths.purified_model(*method_run(wildcards)))


def purify_report_input(wildcards):
    """The purify (or retrain) report; `none` has no purify job, hence none."""
    path = paths.purify_report(*method_run(wildcards))
    return [] if path is None else str(path)


def undefended_input(wildcards):
    """The undefended model is measured once, by the `none` evaluation; the others read its numbers."""
    path = paths.undefended_metrics(*method_run(wildcards))
    return [] if path is None else str(path)


def trigger_figures():
    """One picture of a clean and a triggered test input per (dataset, backdoor attack)."""
    return [
        paths.trigger_figure(RESULTS, dataset, attack)
        for dataset, entry in config["datasets"].items()
        for attack in entry["attacks"]
        if attack != "none"
    ]


def all_summaries():
    return [
        path
        for dataset in config["datasets"]
        for path in paths.summary_files(RESULTS, dataset).values()
    ]
