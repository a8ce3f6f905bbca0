"""Every registry refuses an unknown name with one message that lists the valid names."""

import pytest

from pipeline_pkg.registry import REGISTRIES, UnknownNameError


@pytest.mark.parametrize("kind, expected", [
    ("dataset", {"rf1024", "radioml2016"}),
    ("attack", {"none", "burst", "phase"}),
    ("arch", {"rf_cnn", "conv5"}),
    ("defense", {"none", "ft", "fip"}),
])
def test_unknown_name_lists_the_valid_names(kind, expected):
    registry = REGISTRIES[kind]
    assert expected <= set(registry.names())
    with pytest.raises(UnknownNameError) as info:
        registry.get("nope")
    message = str(info.value)
    assert message.startswith(f"unknown {kind} 'nope'")
    assert all(name in message for name in registry.names())
    assert isinstance(info.value, KeyError)


def test_registering_a_name_twice_is_refused():
    registry = REGISTRIES["defense"]
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("ft")(type("Again", (), {}))
