"""The base of every settings model: strict frozen pydantic models, the one error type, and YAML files
plus ``key=value`` overrides turned into a validated object (:func:`build`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """An invalid setting; the message names the field, the value and what is allowed."""


class Strict(BaseModel):
    """Unknown keys are refused, values are frozen and defaults validated too."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["peft.rank=4", "data.classes=[5,6]"]`` -> nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} is not of the form key=value (e.g. peft.rank=4)")
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r} conflicts with an earlier override of {part!r}")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at top level")
    return raw


def build(model: type[BaseModel], raw: dict[str, Any]):
    """Validate ``raw`` into ``model``, turning pydantic's report into one readable ConfigError."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "<top level>"
            if e["type"] == "extra_forbidden":
                lines.append(f"{field}: unknown setting (value {e['input']!r}); check the spelling")
            elif e["type"] == "value_error":  # our own validators already name fields and values
                lines.append(f"{field}: {e['msg'].removeprefix('Value error, ')}")
            else:
                lines.append(f"{field}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
