"""Loading and checking the pipeline config: the JSON schema (workflow/schemas/config.schema.yaml) checks
its shape and fills defaults; then every dataset, attack, arch and defense name is checked against the
registries, and every parameter block against its component's parameters, so a typo fails at start-up
with the list of valid names instead of hours later in one job."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .configurable import ConfigError
from .registry import ATTACKS, DATASETS, DEFENSES, DETECTORS, MODELS, UnknownNameError

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def load_yaml(path: str | Path) -> Any:
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None


def apply_schema(config: dict) -> dict:
    """Validate against the schema and fill its defaults (as snakemake.utils.validate does)."""
    import jsonschema

    schema = load_yaml(SCHEMA_PATH)
    config = copy.deepcopy(config)

    def fill_defaults(validator, properties, instance, schema_):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from jsonschema.Draft202012Validator.VALIDATORS["properties"](
            validator, properties, instance, schema_)

    validator_class = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                                   {"properties": fill_defaults})
    errors = sorted(validator_class(schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        lines = [f"  {'.'.join(map(str, e.path)) or '<top level>'}: {e.message}" for e in errors]
        raise ConfigError("invalid config (see config/README.md):\n" + "\n".join(lines))
    return config


def component(registry, name: str, params: dict | None, where: str):
    """Instantiate a registered component, naming the config key on any error."""
    try:
        return registry.get(name)(**(params or {}))
    except UnknownNameError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def check_names(config: dict) -> None:
    from .augment import MODALITY_AUGMENTATIONS  # here: it imports torch, which reading a config needs not

    for ds_name, entry in config["datasets"].items():
        dataset = component(DATASETS, ds_name, entry.get("params"), f"datasets.{ds_name}")
        for arch in entry["archs"]:
            spec = component(MODELS, arch, config["models"].get(arch), f"datasets.{ds_name}.archs")
            if dataset.modality not in spec.modalities:
                raise ConfigError(f"datasets.{ds_name}.archs: arch {arch!r} is for {list(spec.modalities)} "
                                  f"data, not {dataset.modality!r}")
        for attack in entry["attacks"]:
            obj = component(ATTACKS, attack, config["attacks"].get(attack), f"datasets.{ds_name}.attacks")
            try:
                obj.prepare(dataset.modality, config["attacks"])
            except (ValueError, UnknownNameError) as exc:
                raise ConfigError(f"datasets.{ds_name}.attacks: {exc}") from None
    # Parameter blocks of components no dataset lists yet are checked too: a typo there should not wait
    # for the day the component is switched on.
    for section, registry in (("attacks", ATTACKS), ("models", MODELS)):
        for name, params in config[section].items():
            component(registry, name, params, f"{section}.{name}")
    for name, params in config["defenses"].items():
        component(DEFENSES, name, params, "defenses")
    for name, params in config["detectors"].items():
        component(DETECTORS, name, params, f"detectors.{name}")
    for ds_name, entry in config["datasets"].items():
        for section in ("defenses", "detectors"):
            unknown = sorted(set(entry.get(section) or []) - set(config[section]))
            if unknown:
                raise ConfigError(f"datasets.{ds_name}.{section}: {unknown} are not configured under "
                                  f"`{section}` (configured: {sorted(config[section])}); add them there first")
        # Settings of a defense the config does not run are checked but unused: a config that drops a
        # defense from `defenses` need not also strip it from every dataset.
        for name in entry.get("defense_settings", {}):
            component(DEFENSES, name, defense_settings(config, ds_name, name),
                      f"datasets.{ds_name}.defense_settings")
        modality = DATASETS.get(ds_name).modality
        valid = MODALITY_AUGMENTATIONS.get(modality, ())
        wrong = [a for a in clean_augment(config, ds_name) if a not in valid]
        if wrong:
            raise ConfigError(f"datasets.{ds_name}.clean_budget.augment: {wrong} are not augmentations of "
                              f"{modality!r} data; valid: {list(valid)}")
        misfits = [d for d in entry.get("defenses") or [] if modality not in DEFENSES.get(d).modalities]
        if misfits:
            raise ConfigError(f"datasets.{ds_name}.defenses: {misfits} only work on "
                              f"{[list(DEFENSES.get(d).modalities) for d in misfits]} data, not {modality!r}")
    from .trainer import TrainSettings

    try:
        TrainSettings(**config["train"])
    except ConfigError as exc:
        raise ConfigError(f"train: {exc}") from None
    for ds_name in config["datasets"]:
        try:
            train_settings(config, ds_name)
        except ConfigError as exc:
            raise ConfigError(f"datasets.{ds_name}.train: {exc}") from None


def defends(config: dict, attack: str | None) -> bool:
    """Whether the defenses and detectors run on this attack's models: always on backdoored ones; on the
    benign reference (attack `none`) only with `defend_benign`, as a check of what each costs a clean model."""
    return attack != "none" or bool(config.get("defend_benign", True))


def defenses_for(config: dict, dataset: str, attack: str | None = None) -> list[str]:
    """The defenses run on one dataset: datasets.<name>.defenses (a subset of the `defenses` section),
    else every configured defense that applies to the dataset's modality (a point-cloud filter such as
    `sor` runs only on point clouds). Given an attack whose models are not defended (see `defends`),
    only `none`: the model's own evaluation."""
    if not defends(config, attack):
        return ["none"]
    chosen = config["datasets"][dataset].get("defenses")
    if chosen:
        return list(chosen)
    modality = DATASETS.get(dataset).modality
    return [d for d in config["defenses"] if modality in DEFENSES.get(d).modalities]


def detectors_for(config: dict, dataset: str, attack: str | None = None) -> list[str]:
    """The detectors run on one dataset: datasets.<name>.detectors (an empty list turns detection off
    there), else every configured detector; none for an attack whose models are not defended."""
    if not defends(config, attack):
        return []
    chosen = config["datasets"][dataset].get("detectors")
    return list(config["detectors"] if chosen is None else chosen)


def clean_budget_settings(config: dict, dataset: str) -> dict:
    """The clean budget of one dataset: the `clean_budget` section, overridden by
    datasets.<name>.clean_budget (1% of a 1,347-image set is 13 images; of RF1024, 80 frames)."""
    return {**config["clean_budget"], **config["datasets"][dataset].get("clean_budget", {})}


def clean_augment(config: dict, dataset: str) -> list[str]:
    """The augmentations a dataset's step-based defenses apply to their clean-budget batches:
    `clean_budget.augment` when set (an empty list turns them off); by default the dataset's own training
    augmentations (crop for digits, crop and flip for CIFAR-10, scale/shift/jitter for point clouds), or
    every augmentation of its modality for a dataset that trains without any (RF1024's five). The FIP,
    NFT and NGF codes all train on their clean split with the training transforms."""
    names = clean_budget_settings(config, dataset).get("augment")
    if names is not None:
        return list(names)
    from .augment import MODALITY_AUGMENTATIONS  # here: it imports torch, which reading a config needs not

    ds = component(DATASETS, dataset, config["datasets"][dataset].get("params"), f"datasets.{dataset}")
    return list(ds.params.get("augment") or MODALITY_AUGMENTATIONS.get(ds.modality, ()))


def defense_settings(config: dict, dataset: str, defense: str) -> dict:
    """One defense's hyper-parameters on one dataset: `defenses.<name>`, overridden by
    datasets.<dataset>.defense_settings.<name> (an RF model and a digits model rarely want the same steps)."""
    return {**(config["defenses"].get(defense) or {}),
            **config["datasets"][dataset].get("defense_settings", {}).get(defense, {})}


def clean_pool_settings(config: dict, dataset: str) -> dict:
    """The clean-budget settings that decide which samples are held out, without `augment`, which only
    the defenses use: changing it reruns the purify jobs, not the poisoning and training."""
    return {k: v for k, v in clean_budget_settings(config, dataset).items() if k != "augment"}


def train_settings(config: dict, dataset: str):
    """The trainer settings of one dataset: the `train` section, overridden by datasets.<name>.train
    (an image set and an RF set rarely want the same epochs and learning rate)."""
    from .trainer import TrainSettings

    return TrainSettings(**{**config["train"], **config["datasets"][dataset].get("train", {})})


def validate(config: dict) -> dict:
    """The checked config with defaults filled in."""
    config = apply_schema(config)
    config["defenses"] = {k: (v or {}) for k, v in config["defenses"].items()}
    config["detectors"] = {k: (v or {}) for k, v in config["detectors"].items()}
    check_names(config)
    return config


def load(path: str | Path) -> dict:
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    return validate(raw)
