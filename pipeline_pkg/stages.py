"""The pipeline's stages as plain functions: the Snakemake rule scripts and the click CLI both call
these, so every job can be rerun by hand with the same code and the same outputs."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .attacks import Attack
from .config import clean_budget_settings, component, train_settings
from .datasets.base import Dataset
from .evaluator import attack_metrics, defense_effectiveness
from .h5io import load_checkpoint, read_h5, read_json, save_checkpoint, write_h5, write_json
from .models import Classifier, count_parameters
from .registry import ATTACKS, DATASETS, DEFENSES, MODELS
from .runtime import pick_device, seed_everything
from .sharpness import sharpness
from .trainer import fit, settings_hash

log = logging.getLogger(__name__)

# Prefix of a learned trigger's arrays in the poison file (Attack.state_arrays).
TRIGGER_STATE = "trigger."


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
        "clean_budget": clean_budget_settings(config, dataset),
    }
    if arch is not None:
        settings["arch"] = {"name": arch, **component(MODELS, arch, config["models"].get(arch), "models").params}
        settings["train"] = train_settings(config, dataset).params
    if defense is not None:
        settings["defense"] = {"name": defense,
                               **component(DEFENSES, defense, config["defenses"].get(defense), "defenses").params}
    return settings


def tags(stage: str, dataset: str, attack: str, arch: str = "", seed: int | str = "",
         defense: str = "") -> dict[str, str]:
    return {"stage": stage, "dataset": dataset, "attack": attack, "arch": arch, "seed": str(seed),
            "defense": defense}


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
    budget = clean_budget_settings(config, dataset)
    val_idx = stratified_holdout(y_train, float(budget["fraction"]), rng)
    rest = np.setdiff1d(np.arange(len(y_train)), val_idx)
    atk.fit(x_train[rest], y_train[rest], num_classes, seed)
    x_p, y_p, poisoned = atk.poison(x_train[rest], y_train[rest], num_classes, rng)
    x_bd, y_bd, y_bd_true = atk.triggered_test(arrays["x_test"], arrays["y_test"], num_classes)
    log.info("%s: poisoned %d of %d training samples; %d triggered test samples; %d clean held out",
             attack, len(poisoned), len(rest), len(x_bd), len(val_idx))
    return write_h5(out, {
        "x_train": x_p, "y_train": y_p, "y_train_clean": y_train[rest], "poisoned_idx": poisoned,
        "x_val": x_train[val_idx], "y_val": y_train[val_idx],
        "x_test": arrays["x_test"], "y_test": arrays["y_test"],
        "x_test_bd": x_bd, "y_test_bd": y_bd, "y_test_bd_true": y_bd_true,
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
    """The model and its metadata (arch, input shape, classes), without the weights."""
    ckpt = load_checkpoint(path)
    state = ckpt.pop("model")
    model = build_model(config, ckpt["arch"], ckpt["input_shape"], int(ckpt["num_classes"]))
    model.load_state_dict(state)
    return model.to(device).eval(), ckpt


def load_trained(config: dict, dataset: str, attack: str, arch: str, seed: int,
                 device: torch.device) -> tuple[dict[str, torch.Tensor], Classifier]:
    """The poison-stage tensors and the trained (undefended) model of one run, from the results folder."""
    from . import paths

    results = config["results_dir"]
    data, _ = load_poisoned(paths.poison_file(results, dataset, attack, seed), device)
    model, _ = load_model(config, paths.train_dir(results, dataset, attack, arch, seed) / "model.pt", device)
    return data, model


# --- train ---

def train(config: dict, dataset: str, attack: str, arch: str, seed: int, poison_file: str | Path,
          out: str | Path) -> Path:
    device = pick_device(config["device"])
    seed_everything(seed, config["threads"])
    data, attrs = load_poisoned(poison_file, device)
    settings = train_settings(config, dataset)
    resolved = {**job_settings(config, dataset, attack, arch), "seed": seed}
    model = build_model(config, arch, data["x_train"].shape[1:], len(attrs["class_names"])).to(device)
    run_tags = tags("train", dataset, attack, arch, seed)
    history: list[dict] = []
    with tracker(config, "train", f"train/{dataset}/{attack}/{arch}/seed{seed}", run_tags, resolved) as run:
        def on_epoch(epoch: int, metrics: dict) -> None:
            metrics = {**metrics, **attack_metrics(model, data)}
            history.append({"epoch": epoch, **metrics})
            model.train()
            log.info("epoch %d test: acc %.4f asr %.4f", epoch + 1, metrics["acc"], metrics["asr"])
            run.log_metrics(metrics, step=epoch)

        started = time.perf_counter()
        fit(model, data["x_train"], data["y_train"], settings, seed=seed,
            checkpoint=Path(out).with_name("checkpoint.pt"), resume_key=settings_hash(resolved),
            augment=dataset_obj(config, dataset).params.get("augment", ()), on_epoch=on_epoch)
        final = {**attack_metrics(model, data), "train_seconds": time.perf_counter() - started}
        run.log_metrics(final)
    # What the run logged, on disk, so that `sync-tracking` can re-send it if MLflow missed it.
    write_json(Path(out).with_name("train.json"), {"final": final, "history": history})
    meta = {"arch": arch, "input_shape": list(data["x_train"].shape[1:]),
            "num_classes": len(attrs["class_names"]), "package_version": __version__}
    path = save_model(model, out, meta)
    Path(out).with_name("checkpoint.pt").unlink(missing_ok=True)
    return path


# --- purify ---

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
    device = pick_device(config["device"])
    seed_everything(seed, config["threads"])
    data, _ = load_poisoned(poison_file, device)
    model, meta = load_model(config, model_in, device)
    method = component(DEFENSES, defense, config["defenses"].get(defense), f"defenses.{defense}")
    x_clean, y_clean = clean_budget(data, clean_budget_settings(config, dataset), seed)
    resolved = {**job_settings(config, dataset, attack, arch, defense), "seed": seed}
    run_tags = tags("purify", dataset, attack, arch, seed, defense)
    with tracker(config, "purify", f"purify/{dataset}/{attack}/{arch}/seed{seed}/{defense}",
                 run_tags, resolved) as run:
        purified, seconds = timed_purify(method, model, x_clean, y_clean, seed, log=run.log_metrics)
        report = {"purify_seconds": seconds, "trainable_params": int(method.tunable_parameters),
                  "total_params": count_parameters(purified, trainable_only=False),
                  "clean_samples": len(x_clean)}
        run.log_metrics({k: float(v) for k, v in report.items()})
    save_model(purified, model_out, meta)
    return write_json(report_out, report)


# --- evaluate ---

def evaluate(config: dict, dataset: str, attack: str, arch: str, seed: int, defense: str,
             poison_file: str | Path, backdoored_model: str | Path, purified_model: str | Path,
             purify_report: str | Path, out: str | Path) -> Path:
    device = pick_device(config["device"])
    seed_everything(seed, config["threads"])
    data, _ = load_poisoned(poison_file, device)
    backdoored = load_model(config, backdoored_model, device)[0]
    purified = load_model(config, purified_model, device)[0]
    before, after = attack_metrics(backdoored, data), attack_metrics(purified, data)
    settings = config["evaluate"]
    if settings["sharpness_samples"] > 0:
        # The loss surface on clean test data that no defense has seen, before and after purification.
        n = settings["sharpness_samples"]
        x, y = data["x_test"][:n], data["y_test"][:n]
        measure = {"iterations": settings["power_iterations"], "probes": settings["trace_probes"], "seed": seed}
        before.update(sharpness(backdoored, x, y, **measure))
        unchanged = all(torch.equal(a, b) for a, b in zip(backdoored.state_dict().values(),
                                                          purified.state_dict().values()))
        after.update({k: before[k] for k in ("lambda_max", "hessian_trace")} if unchanged
                     else sharpness(purified, x, y, **measure))
    report = read_json(purify_report)
    result = {"dataset": dataset, "attack": attack, "arch": arch, "seed": seed, "defense": defense,
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
