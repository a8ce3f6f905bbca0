"""config/README.md documents every registered component and every one of its parameters, and every
top-level config key: the docs cannot drift from the code unnoticed."""

import re

import pytest
import yaml

from pipeline_pkg.registry import REGISTRIES


@pytest.fixture
def config_readme(repo):
    return (repo / "config" / "README.md").read_text()


def row_of(text: str, name: str) -> str:
    match = re.search(rf"^\| `{re.escape(name)}` \|.*$", text, flags=re.MULTILINE)
    assert match, f"config/README.md has no table row for `{name}`"
    return match.group(0)


@pytest.mark.parametrize("kind", ["attack", "arch", "defense", "detector"])
def test_every_component_and_parameter_is_documented(config_readme, kind):
    for name in REGISTRIES[kind].names():
        component = REGISTRIES[kind].get(name)
        own = getattr(component, "trigger_defaults", None) if kind == "attack" else (
            getattr(component, "method_defaults", None) if kind in ("defense", "detector") else component.defaults)
        row = row_of(config_readme, name)
        for key in own or {}:
            assert f"`{key}`" in row, f"{kind} {name}: parameter `{key}` missing from its config/README.md row"


def test_every_dataset_parameter_is_documented(config_readme):
    for name in REGISTRIES["dataset"].names():
        for key in REGISTRIES["dataset"].get(name).defaults:
            assert f"`{key}`" in config_readme, f"dataset {name}: parameter `{key}` undocumented"


def test_every_top_level_key_is_documented(repo, config_readme):
    schema = yaml.safe_load((repo / "workflow" / "schemas" / "config.schema.yaml").read_text())
    for key in schema["properties"]:
        assert f"`{key}" in config_readme, f"top-level config key `{key}` undocumented"
