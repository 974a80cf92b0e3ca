"""Reading configuration, one way for every command: a YAML mapping, ``--set dotted.key=value``
overrides (values parsed as YAML), then a typed dataclass that refuses unknown keys by name.

The dataclasses themselves (``TrainConfig``, ``SearchConfig``, ``FeatureConfig``, ``ServeConfig``, ...)
live with the stage they configure; this module only reads and checks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict:
    """The mapping in the YAML file ``path`` (an empty file is ``{}``); anything else is a clear error."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} is a YAML mapping of keys to values")
    return data


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """``data`` with each ``dotted.key=value`` applied; values are parsed as YAML (``5``, ``0.3``, ``null``)."""
    data = dict(data)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value, e.g. epochs=5 or hparams.dropout=0.3")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            # copy nested dicts so the caller's dict is never modified
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return data


def check_keys(cls, data: dict, where: str) -> None:
    """Refuse keys that are not fields of the dataclass ``cls``, naming the valid ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
