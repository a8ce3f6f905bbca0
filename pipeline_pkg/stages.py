"""The pipeline's stages as plain functions: the Snakemake rule scripts and the click CLI both call
these, so every job can be rerun by hand with the same code and the same outputs."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import __version__, paths
from .attacks import Attack
from .config import (clean_augment, clean_budget_settings, clean_pool_settings, component, defense_settings,
                     train_settings)
from .datasets.base import Dataset
from .evaluator import attack_metrics, defense_effectiveness
from .h5io import load_checkpoint, read_h5, read_json, save_checkpoint, write_h5, write_json
from .models import Classifier, count_parameters
from .registry import ATTACKS, DATASETS, DEFENSES, DETECTORS, MODELS
from .runtime import pick_device, seed_everything, set_precision
from .sharpness import KEYS as SHARPNESS_KEYS  # what the measurement adds to a metrics dict
from .sharpness import measure as sharpness
from .sharpness import sample_count as sharpness_sample_count
from .sharpness import sample_indices as sharpness_sample_indices
from .trainer import fit, settings_hash

if TYPE_CHECKING:
    from .defenses.base import Defense

log = logging.getLogger(__name__)

# Prefix of a learned trigger's arrays in the poison file (Attack.state_arrays).
TRIGGER_STATE = "trigger."
# A detector's results live beside the defenses' as `detect-<detector>/`: evaluate and aggregate treat
# "detect:<detector>" (detection, then retraining without the flagged samples) like a defense.
DETECT_PREFIX = "detect-"


def detect_folder(detector: str) -> str:
    return DETECT_PREFIX + detector


def detector_of(method: str) -> str | None:
    """The detector behind a `detect-<detector>` method folder; None for a defense."""
    return method[len(DETECT_PREFIX):] if method.startswith(DETECT_PREFIX) else None


def method_label(method: str) -> str:
    """How results name a method: the defense, or `detect:<detector>`."""
    detector = detector_of(method)
    return method if detector is None else f"detect:{detector}"


def start_job(config: dict, seed: int) -> torch.device:
    """What every model-handling stage does first: pick the device, seed every generator and set the
    autocast precision from the config."""
    set_precision(config.get("precision", "auto"))
    seed_everything(seed, config["threads"])
    return pick_device(config["device"])


# --- resolved settings: what each job depends on; logged as MLflow params and hashed for resume ---

def dataset_obj(config: dict, dataset: str) -> Dataset:
    return component(DATASETS, dataset, config["datasets"][dataset].get("params"), f"datasets.{dataset}")


def attack_obj(config: dict, attack: str, modality: str) -> Attack:
    atk = component(ATTACKS, attack, config["attacks"].get(attack), f"attacks.{attack}")
    return atk.prepare(modality, config["attacks"])


def job_settings(config: dict, dataset: str, attack: str, arch: str | None = None,
                 defense: str | None = None) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "dataset": {"name": dataset, **dataset_obj(config, dataset).params},
        "data_seed": config["data_seed"],
        "attack": {"name": attack, **component(ATTACKS, attack, config["attacks"].get(attack), "attacks").params},
        "clean_budget": clean_pool_settings(config, dataset),
    }
    if arch is not None:
        settings["arch"] = {"name": arch, **component(MODELS, arch, config["models"].get(arch), "models").params}
        settings["train"] = train_settings(config, dataset).params
        settings["precision"] = config.get("precision", "auto")
    if defense is not None and detector_of(defense) is not None:
        detector = detector_of(defense)
        settings["detector"] = {"name": detector, **detector_obj(config, detector).params}
    elif defense is not None:
        settings["defense"] = {"name": defense, **make_defense(config, dataset, defense).params}
        settings["clean_budget"] = {**clean_budget_settings(config, dataset),
                                    "augment": clean_augment(config, dataset)}
    return settings


def detector_obj(config: dict, detector: str):
    return component(DETECTORS, detector, config["detectors"].get(detector), f"detectors.{detector}")


def tags(stage: str, dataset: str, attack: str, arch: str = "", seed: int | str = "",
         defense: str = "") -> dict[str, str]:
    return {"stage": stage, "dataset": dataset, "attack": attack, "arch": arch, "seed": str(seed),
            "defense": method_label(defense)}


def tracker(config: dict, stage: str, run_name: str, run_tags: dict, params: dict):
    from .tracking import tracker_from_config

    return tracker_from_config(config, stage=stage, run_name=run_name, tags=run_tags, params=params)


# --- download / generate ---

def download(config: dict, dataset: str, manifest: str | Path | None = None) -> Path:
    """Fetch and verify the dataset's raw files into data_root/<dataset>/ and write a manifest of what
    was used (name, URL, checksum, size). A generated dataset has no raw files: its manifest says so."""
    from .download import download as fetch

    ds = dataset_obj(config, dataset)
    raw_dir = Path(config["data_root"]) / dataset
    entries = []
    for remote in [] if ds.generated else ds.files:
        path = fetch(remote, raw_dir)
        algo, digest = remote.checksum
        entries.append({"name": remote.name, "url": remote.url, algo: digest, "bytes": path.stat().st_size})
    manifest = Path(manifest) if manifest else raw_dir / "manifest.json"
    return write_json(manifest, {"dataset": dataset, "generated": ds.generated, "files": entries,
                                 "package_version": __version__})


def build_dataset(config: dict, dataset: str, out: str | Path, manifest: str | Path | None = None) -> Path:
    """Generate (or convert from downloaded files) the dataset into one HDF5 file."""
    ds = dataset_obj(config, dataset)
    raw_files = read_json(manifest)["files"] if manifest else []
    started = time.perf_counter()
    arrays = ds.build(Path(config["data_root"]) / dataset, int(config["data_seed"]))
    log.info("built %s in %.1f s: train %s, test %s", dataset, time.perf_counter() - started,
             arrays.x_train.shape, arrays.x_test.shape)
    return write_h5(out, {"x_train": arrays.x_train, "y_train": arrays.y_train, "x_test": arrays.x_test,
                          "y_test": arrays.y_test, **arrays.extras},
                    {"dataset": dataset, "modality": ds.modality, "class_names": list(arrays.class_names),
                     "params": ds.params, "data_seed": int(config["data_seed"]), "raw_files": raw_files})


# --- poison ---

def stratified_holdout(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a class-balanced share of the samples (at least one per class)."""
    picked = []
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        n = max(1, int(round(fraction * len(members))))
        picked.append(rng.choice(members, size=n, replace=False))
    return np.sort(np.concatenate(picked))


def poison(config: dict, dataset: str, attack: str, seed: int, data_file: str | Path,
           out: str | Path) -> Path:
    """The poisoned training set, the clean validation pool for the defenses (held out before poisoning,
    so never poisoned), the clean and triggered test sets and the poisoned indices."""
    arrays, attrs = read_h5(data_file)
    num_classes = len(attrs["class_names"])
    atk = attack_obj(config, attack, attrs["modality"])
    rng = np.random.default_rng(seed)
    x_train, y_train = arrays["x_train"], arrays["y_train"]
    budget = clean_pool_settings(config, dataset)
    val_idx = stratified_holdout(y_train, float(budget["fraction"]), rng)
    rest = np.setdiff1d(np.arange(len(y_train)), val_idx)
    atk.fit(x_train[rest], y_train[rest], num_classes, seed)
    x_p, y_p, poisoned = atk.poison(x_train[rest], y_train[rest], num_classes, rng)
    x_bd, y_bd, y_bd_true = atk.triggered_test(arrays["x_test"], arrays["y_test"], num_classes)
    # Which clean test sample each triggered one was made from (the report draws the pairs).
    test_bd_idx = np.flatnonzero(atk.attacked(arrays["y_test"], atk.target_labels(arrays["y_test"], num_classes)))
    log.info("%s: poisoned %d of %d training samples; %d triggered test samples; %d clean held out",
             attack, len(poisoned), len(rest), len(x_bd), len(val_idx))
    return write_h5(out, {
        "x_train": x_p, "y_train": y_p, "y_train_clean": y_train[rest], "poisoned_idx": poisoned,
        "x_val": x_train[val_idx], "y_val": y_train[val_idx],
        "x_test": arrays["x_test"], "y_test": arrays["y_test"],
        "x_test_bd": x_bd, "y_test_bd": y_bd, "y_test_bd_true": y_bd_true, "test_bd_idx": test_bd_idx,
        **{TRIGGER_STATE + key: value for key, value in atk.state_arrays().items()},
    }, {**{k: attrs[k] for k in ("dataset", "modality", "class_names")}, "attack": attack,
        "attack_params": atk.params, "seed": seed, "clean_budget": budget})


def load_poisoned(path: str | Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """The poison stage's arrays as device tensors (images stay uint8), without the trigger state."""
    arrays, attrs = read_h5(path)
    tensors = {k: torch.from_numpy(v).to(device) for k, v in arrays.items() if not k.startswith(TRIGGER_STATE)}
    return tensors, attrs


def clean_budget(data: dict[str, torch.Tensor], settings: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The defenses' clean data: the held-out pool, or one sample per class in one-shot mode
    (`settings`: the dataset's clean_budget_settings)."""
    x, y = data["x_val"], data["y_val"]
    if x.dtype == torch.uint8:
        # Defenses mix and perturb their clean images, which needs floats (models take [0, 1]).
        x = x.float() / 255.0
    if settings.get("one_shot"):
        rng = np.random.default_rng(seed)
        y_np = y.cpu().numpy()
        idx = [rng.choice(np.flatnonzero(y_np == c)) for c in np.unique(y_np)]
        return x[idx], y[idx]
    return x, y


# --- models on disk ---

def build_model(config: dict, arch: str, input_shape, num_classes: int) -> Classifier:
    spec = component(MODELS, arch, config["models"].get(arch), f"models.{arch}")
    return spec.build(list(input_shape), num_classes)


def save_model(model: torch.nn.Module, path: str | Path, meta: dict) -> Path:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_checkpoint({**meta, "model": state}, path)


def load_model(config: dict, path: str | Path, device: torch.device) -> tuple[Classifier, dict]:
    """The model and its metadata (arch, input shape, classes), without the weights. A model purified
    by a test-time defense (e.g. `sor`) comes back wrapped in that defense's input filter."""
    ckpt = load_checkpoint(path)
    state = ckpt.pop("model")
    model = build_model(config, ckpt["arch"], ckpt["input_shape"], int(ckpt["num_classes"]))
    model.load_state_dict(state)
    model = model.to(device).eval()
    if ckpt.get("input_filter"):
        params = dict(ckpt["input_filter"])
        model = DEFENSES.get(params.pop("name"))(**params).wrap(model).eval()
    return model, ckpt


def load_trained(config: dict, dataset: str, attack: str, arch: str, seed: int,
                 device: torch.device) -> tuple[dict[str, torch.Tensor], Classifier]:
    """The poison-stage tensors and the trained (undefended) model of one run, from the results folder."""
    results = config["results_dir"]
    data, _ = load_poisoned(paths.poison_file(results, dataset, attack, seed), device)
    model, _ = load_model(config, paths.train_dir(results, dataset, attack, arch, seed) / "model.pt", device)
    return data, model


# --- train ---

def snapshot_epochs(epochs: int, ensemble: int) -> list[int]:
    """The epochs (0-based) whose weights the train stage keeps besides the final model, evenly spaced,
    so that a detector can use `ensemble` checkpoints of one training run (TRAK's ensemble)."""
    picks = {round(epochs * i / ensemble) - 1 for i in range(1, ensemble)}
    return sorted(e for e in picks if 0 <= e < epochs - 1)


def fit_on(config: dict, dataset: str, arch: str, seed: int, data: dict[str, torch.Tensor],
           keep: torch.Tensor | None, num_classes: int, run, out: str | Path, resume_key: str,
           snapshots: list[int] = ()) -> tuple[Classifier, dict, list[dict], dict[int, dict]]:
    """Train a fresh `arch` on the poisoned training set (only the samples `keep` when given), logging
    per-epoch test metrics to `run`: the train stage and the retraining after detection share it.
    Returns the model, its final metrics, the per-epoch history and the weights at the `snapshots` epochs."""
    settings = train_settings(config, dataset)
    x, y = data["x_train"], data["y_train"]
    if keep is not None:
        x, y = x[keep], y[keep]
    model = build_model(config, arch, x.shape[1:], num_classes).to(x.device)
    history: list[dict] = []
    # Snapshots taken so far are kept on disk too: a job resumed after a restart still has them all.
    partial = Path(out).with_name("snapshots.partial.pt")
    kept_states: dict[int, dict] = {}
    if snapshots and partial.exists():
        saved = load_checkpoint(partial)
        if saved.get("resume_key") == resume_key:
            kept_states = dict(zip(saved["epochs"], saved["states"]))

    last_epoch, every = int(settings.epochs) - 1, int(settings.eval_every)
    tests: dict[int, dict[str, float]] = {}  # epoch → test metrics, for the epochs this process trained

    def on_epoch(epoch: int, metrics: dict) -> None:
        if (epoch + 1) % every == 0 or epoch == last_epoch:
            tests[epoch] = attack_metrics(model, data)
            metrics = {**metrics, **tests[epoch]}
            log.info("epoch %d test: acc %.4f asr %.4f", epoch + 1, metrics["acc"], metrics["asr"])
        history.append({"epoch": epoch, **metrics})
        model.train()
        run.log_metrics(metrics, step=epoch)
        if epoch in snapshots:
            kept_states[epoch] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            save_checkpoint({"resume_key": resume_key, "epochs": list(kept_states),
                             "states": list(kept_states.values())}, partial)

    started = time.perf_counter()
    fit(model, x, y, settings, seed=seed, checkpoint=Path(out).with_name("checkpoint.pt"),
        resume_key=resume_key, augment=dataset_obj(config, dataset).params.get("augment", ()),
        on_epoch=on_epoch)
    # The last epoch's test is the final model's, unless a resumed job had nothing left to train.
    measured = tests[last_epoch] if last_epoch in tests else attack_metrics(model, data)
    final = {**measured, "train_seconds": time.perf_counter() - started}
    run.log_metrics(final)
    return model, final, history, kept_states


def model_meta(arch: str, data: dict[str, torch.Tensor], num_classes: int) -> dict:
    return {"arch": arch, "input_shape": list(data["x_train"].shape[1:]), "num_classes": num_classes,
            "package_version": __version__}


def train(config: dict, dataset: str, attack: str, arch: str, seed: int, poison_file: str | Path,
          out: str | Path) -> Path:
    """The (possibly backdoored) model, its train.json (final metrics and per-epoch history) and
    snapshots.pt (weights at `detection.ensemble` − 1 earlier epochs, for the detectors)."""
    device = start_job(config, seed)
    data, attrs = load_poisoned(poison_file, device)
    num_classes = len(attrs["class_names"])
    resolved = {**job_settings(config, dataset, attack, arch), "seed": seed}
    epochs = snapshot_epochs(int(train_settings(config, dataset).epochs), int(config["detection"]["ensemble"]))
    run_tags = tags("train", dataset, attack, arch, seed)
    with tracker(config, "train", f"train/{dataset}/{attack}/{arch}/seed{seed}", run_tags, resolved) as run:
        model, final, history, states = fit_on(config, dataset, arch, seed, data, None, num_classes, run, out,
                                               settings_hash(resolved), epochs)
    # What the run logged, on disk, so that `sync-tracking` can re-send it if MLflow missed it.
    write_json(Path(out).with_name("train.json"), {"final": final, "history": history})
    save_checkpoint({"epochs": sorted(states), "states": [states[e] for e in sorted(states)]},
                    Path(out).with_name("snapshots.pt"))
    path = save_model(model, out, model_meta(arch, data, num_classes))
    for leftover in ("checkpoint.pt", "snapshots.partial.pt"):
        Path(out).with_name(leftover).unlink(missing_ok=True)
    return path


def load_ensemble(config: dict, model_file: str | Path, snapshots_file: str | Path,
                  device: torch.device) -> list[Classifier]:
    """The train stage's snapshots and its final model (last), as models in eval mode."""
    final, _ = load_model(config, model_file, device)
    models = []
    for state in load_checkpoint(snapshots_file)["states"]:
        model = copy.deepcopy(final)
        model.load_state_dict(state)
        models.append(model.eval())
    return [*models, final]


# --- detect and retrain ---

def detect(config: dict, dataset: str, attack: str, arch: str, seed: int, detector: str,
           poison_file: str | Path, model_file: str | Path, snapshots_file: str | Path,
           out_dir: str | Path) -> Path:
    """Score every training sample with one detector, flag the top `flag_rate` share, and measure the
    flags against the poisoned indices the poison stage recorded: detection.json and flagged.h5."""
    from .detectors.base import detection_metrics

    device = start_job(config, seed)
    data, attrs = load_poisoned(poison_file, device)
    models = load_ensemble(config, model_file, snapshots_file, device)
    method = detector_obj(config, detector)
    method_dir = detect_folder(detector)
    resolved = {**job_settings(config, dataset, attack, arch, method_dir), "seed": seed}
    run_tags = tags("detect", dataset, attack, arch, seed, method_dir)
    with tracker(config, "detect", f"detect/{dataset}/{attack}/{arch}/seed{seed}/{detector}",
                 run_tags, resolved) as run:
        started = time.perf_counter()
        scores = np.asarray(method.scores(models, data["x_train"], data["y_train"], seed=seed), dtype=np.float64)
        flagged = method.flag(scores)
        seconds = time.perf_counter() - started
        poisoned = data["poisoned_idx"].cpu().numpy()
        metrics = {**detection_metrics(scores, flagged, poisoned, len(scores)), "detect_seconds": seconds}
        run.log_metrics({k: float(v) for k, v in metrics.items()})
    out_dir = Path(out_dir)
    write_h5(out_dir / "flagged.h5", {"scores": scores, "flagged": np.asarray(flagged, dtype=np.int64)},
             {"detector": detector, "params": method.params, "dataset": dataset, "attack": attack})
    log.info("%s on %s/%s: %s", detector, dataset, attack, {k: round(float(v), 4) for k, v in metrics.items()})
    return write_json(out_dir / "detection.json", {"dataset": dataset, "attack": attack, "arch": arch,
                                                   "seed": seed, "detector": detector, **metrics})


def retrain(config: dict, dataset: str, attack: str, arch: str, seed: int, detector: str,
            poison_file: str | Path, flagged_file: str | Path, detection_file: str | Path,
            model_out: str | Path, report_out: str | Path) -> Path:
    """Train a fresh model on the training set minus the flagged samples; its report counts detection
    and retraining time as the method's cost (purify_seconds), like a defense's."""
    device = start_job(config, seed)
    data, attrs = load_poisoned(poison_file, device)
    num_classes = len(attrs["class_names"])
    flagged = read_h5(flagged_file, ["flagged"])[0]["flagged"]
    keep = np.setdiff1d(np.arange(len(data["y_train"])), flagged)
    method_dir = detect_folder(detector)
    resolved = {**job_settings(config, dataset, attack, arch, method_dir), "seed": seed}
    run_tags = tags("retrain", dataset, attack, arch, seed, method_dir)
    with tracker(config, "retrain", f"retrain/{dataset}/{attack}/{arch}/seed{seed}/{detector}",
                 run_tags, resolved) as run:
        model, final, _, _ = fit_on(config, dataset, arch, seed, data, torch.from_numpy(keep).to(device),
                                    num_classes, run, model_out, settings_hash(resolved))
        report = {"purify_seconds": read_json(detection_file)["detect_seconds"] + final["train_seconds"],
                  "trainable_params": count_parameters(model), "total_params": count_parameters(model, False),
                  "clean_samples": 0, "removed_samples": int(len(flagged))}
        run.log_metrics({k: float(v) for k, v in report.items()})
    save_model(model, model_out, model_meta(arch, data, num_classes))
    Path(model_out).with_name("checkpoint.pt").unlink(missing_ok=True)
    return write_json(report_out, report)


# --- purify ---

def make_defense(config: dict, dataset: str, defense: str, overrides: dict | None = None) -> Defense:
    """The configured defense (hyper-parameters from `defenses.<name>`, then the dataset's
    `defense_settings.<name>`, then `overrides`), set to augment its clean-budget batches with the
    dataset's clean_budget.augment."""
    method = component(DEFENSES, defense, {**defense_settings(config, dataset, defense), **(overrides or {})},
                       f"defenses.{defense}")
    method.clean_augment = clean_augment(config, dataset)
    return method


def timed_purify(method, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int,
                 log=None) -> tuple[torch.nn.Module, float]:
    """Run one defense and measure its wall time; on a GPU the clock waits for queued kernels on
    both ends, or it would time the launches instead of the work."""
    def synchronize() -> None:
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    synchronize()
    started = time.perf_counter()
    purified = method.purify(model, x, y, seed=seed, log=log or (lambda metrics, step: None))
    synchronize()
    return purified, time.perf_counter() - started


def purify(config: dict, dataset: str, attack: str, arch: str, seed: int, defense: str,
           poison_file: str | Path, model_in: str | Path, model_out: str | Path,
           report_out: str | Path) -> Path:
    device = start_job(config, seed)
    data, _ = load_poisoned(poison_file, device)
    model, meta = load_model(config, model_in, device)
    method = make_defense(config, dataset, defense)
    x_clean, y_clean = clean_budget(data, clean_budget_settings(config, dataset), seed)
    resolved = {**job_settings(config, dataset, attack, arch, defense), "seed": seed}
    run_tags = tags("purify", dataset, attack, arch, seed, defense)
    with tracker(config, "purify", f"purify/{dataset}/{attack}/{arch}/seed{seed}/{defense}",
                 run_tags, resolved) as run:
        purified, seconds = timed_purify(method, model, x_clean, y_clean, seed, log=run.log_metrics)
        report = {"purify_seconds": seconds, "trainable_params": int(method.tunable_parameters),
                  "total_params": count_parameters(purified, trainable_only=False),
                  "clean_samples": len(x_clean), **method.diagnostics}
        run.log_metrics({k: float(v) for k, v in report.items()})
    if getattr(method, "test_time", False):
        # A test-time defense leaves the weights alone: keep them, and the filter to re-apply on load.
        save_model(model, model_out, {**meta, "input_filter": {"name": defense, **method.params}})
    else:
        save_model(purified, model_out, meta)
    return write_json(report_out, report)


# --- evaluate ---

# What `none` costs, in place of a purify report: it has no purify job and optimises nothing.
NO_PURIFICATION = {"purify_seconds": 0.0, "trainable_params": 0}


def evaluate(config: dict, dataset: str, attack: str, arch: str, seed: int, defense: str,
             poison_file: str | Path, backdoored_model: str | Path, purified_model: str | Path,
             purify_report: str | Path | None, out: str | Path,
             undefended_metrics: str | Path | None = None) -> Path:
    """ACC, ASR, RA (and the loss surface's sharpness) of the purified model, against the undefended one.

    The undefended model's numbers are measured once, by the `none` evaluation: every other method reads
    them from its metrics.json (`undefended_metrics`) instead of measuring the same model again. `none`
    has no purify job: its `purified_model` is the trained model and it has no `purify_report` (None),
    so it reports 0 s of purification and 0 trainable parameters.

    Sharpness (λ_max, Tr(H) and how they were measured: SHARPNESS_KEYS) is measured only by the methods in
    `evaluate.sharpness_defenses`, the undefended model's only when `none` is among them; the other jobs'
    results lack those keys."""
    if purify_report is None and defense != paths.NO_DEFENSE:
        raise ValueError(f"evaluate {defense!r}: no purify report given; only `none` has none, every other "
                         "method's evaluation needs the purify.json its purify (or retrain) job wrote")
    device = start_job(config, seed)
    data, _ = load_poisoned(poison_file, device)
    settings = config["evaluate"]
    # The loss surface on clean test data that no defense has seen, before and after purification: all
    # of the test set or a fixed subset of it, the same for every method (pipeline_pkg.sharpness).
    n = sharpness_sample_count(settings["sharpness_samples"], len(data["x_test"]))
    idx = sharpness_sample_indices(len(data["x_test"]), n).to(device)
    x, y = data["x_test"][idx], data["y_test"][idx]
    measure = {"max_iterations": settings["power_iterations"], "tol": settings["power_tolerance"],
               "probes": settings["trace_probes"], "batch_size": settings["sharpness_batch"], "seed": seed}
    # Sharpness costs many Hessian-vector products: only the methods in `sharpness_defenses` measure it
    # (`none`: the undefended model, hence the `undefended` numbers of every method of the run).
    methods = settings["sharpness_defenses"]

    def wants_sharpness(method: str) -> bool:
        return n > 0 and (methods == "all" or method_label(method) in methods)

    def measured(model: Classifier, with_sharpness: bool) -> dict[str, float]:
        return {**attack_metrics(model, data), **(sharpness(model, x, y, **measure) if with_sharpness else {})}

    purified, purified_meta = load_model(config, purified_model, device)
    # A test-time defense filters the inputs and leaves the weights, hence the loss surface, as they were.
    test_time = bool(purified_meta.get("input_filter"))
    unchanged = False  # the very model that was measured as undefended (defense `none`)
    if undefended_metrics is None:
        # `none` evaluates the trained model file itself: loading it twice would only cost time.
        same_file = Path(purified_model).resolve() == Path(backdoored_model).resolve()
        backdoored = purified if same_file else load_model(config, backdoored_model, device)[0]
        before = measured(backdoored, wants_sharpness(paths.NO_DEFENSE))
        unchanged = not test_time and (same_file or all(
            torch.equal(a, b) for a, b in zip(backdoored.state_dict().values(), purified.state_dict().values())))
    else:
        before = read_json(undefended_metrics)["undefended"]
    measure_after = wants_sharpness(defense)
    same_weights = unchanged or test_time
    if unchanged:
        after = {k: v for k, v in before.items() if k not in SHARPNESS_KEYS}
    elif test_time:
        after = attack_metrics(purified, data)
    else:
        after = measured(purified, measure_after)
    if same_weights and measure_after:
        if "lambda_max" in before:  # the same weights, hence the same loss surface, as measured before
            after.update({k: before[k] for k in SHARPNESS_KEYS if k in before})
        else:  # the weights are the backdoored model's (a test-time filter leaves them): measure them bare
            after.update(sharpness(load_model(config, backdoored_model, device)[0], x, y, **measure))
    report = NO_PURIFICATION if purify_report is None else read_json(purify_report)
    result = {"dataset": dataset, "attack": attack, "arch": arch, "seed": seed, "defense": method_label(defense),
              **after, "der": defense_effectiveness(before, after), "undefended": before,
              "purify_seconds": report["purify_seconds"], "trainable_params": report["trainable_params"]}
    run_tags = tags("evaluate", dataset, attack, arch, seed, defense)
    with tracker(config, "evaluate", f"evaluate/{dataset}/{attack}/{arch}/seed{seed}/{defense}",
                 run_tags, {**job_settings(config, dataset, attack, arch, defense), "seed": seed}) as run:
        run.log_metrics({k: float(result[k]) for k in ("acc", "asr", "ra", "der", "purify_seconds",
                                                         "trainable_params", "lambda_max", "hessian_trace")
                         if k in result})
        run.log_metrics({f"undefended_{k}": float(v) for k, v in before.items()})
    log.info("%s", {k: result[k] for k in ("acc", "asr", "ra", "der")})
    return write_json(out, result)
