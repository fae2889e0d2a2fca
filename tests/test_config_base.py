"""Settings from YAML files and ``key=value`` overrides, validated into strict frozen models."""

import pytest

from distlap.config import load_config
from distlap.config_base import ConfigError, Strict, build, deep_merge, parse_overrides, read_yaml


def test_overrides_parse_as_yaml_and_nest():
    assert parse_overrides(["peft.rank=4", "data.classes=[1, 2]", "train.lr=0.5", "output_dir="]) == {
        "peft": {"rank": 4},
        "data": {"classes": [1, 2]},
        "train": {"lr": 0.5},
        "output_dir": None,
    }
    assert load_config(overrides=["train.lr=1e-3"]).train.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["peft.rank"])


def test_deep_merge_keeps_siblings_and_replaces_leaves():
    base = {"a": {"x": 1, "y": {"z": 2}}, "b": [1]}
    assert deep_merge(base, {"a": {"y": {"z": 3}}, "b": [2]}) == {"a": {"x": 1, "y": {"z": 3}}, "b": [2]}
    assert base == {"a": {"x": 1, "y": {"z": 2}}, "b": [1]}  # not modified


def test_build_names_every_bad_field_on_its_own_line(tmp_path):
    class Small(Strict):
        n: int = 1

    with pytest.raises(ConfigError, match=r"invalid config:\n  n: .*integer.*'x'\)\n  m: unknown setting"):
        build(Small, {"n": "x", "m": 2})
    path = tmp_path / "bad.yaml"
    path.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        read_yaml(path)
