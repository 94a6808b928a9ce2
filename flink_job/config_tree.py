"""The raw configuration tree: a YAML file's sections and ``section.key=value`` overrides merged before they are
validated, and the typed sections built from it (``flink_job.config`` holds the sections themselves)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, get_type_hints

import yaml  # type: ignore[import-untyped, unused-ignore]  # stubs only where types-PyYAML is installed

from model.config import SECTIONS as MODEL_SECTIONS
from model.config import RETIRED, canonical_path


def config_tree(path: str | Path | None, overrides: list[str]) -> dict[str, dict[str, Any]]:
    """The YAML file's sections (if any) with ``section.key=value`` overrides applied, not yet validated. A model
    key may be dotted into its sub-section (``model.optimizer.lr``) or be a flat key of older versions (``model.lr``);
    both land in the same place, so the later setting wins whichever form each used.

    >>> config_tree(None, ["batch.size=7", "flink.options={a: 1}", "model.lr=0.1", "model.ids.max_rows=8"])
    {'batch': {'size': 7}, 'flink': {'options': {'a': 1}}, 'model': {'optimizer': {'lr': 0.1}, 'ids': {'max_rows': 8}}}
    """
    tree: dict[str, dict[str, Any]] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config: {path} must hold a mapping of sections, got {type(loaded).__name__}")
        for section, values in loaded.items():
            section_values = tree.setdefault(section, {})
            for key, value in dict(values or {}).items():
                _put(section_values, section, [key], value)
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"config: override must look like section.key=value, got {key.strip()!r}=...")
        _put(tree.setdefault(section, {}), section, name.split("."), yaml.safe_load(raw))
    return tree


def _put(values: dict[str, Any], section: str, path: list[str], value: Any) -> None:
    """Set ``section.<path>`` to ``value``; model keys go to their sub-section, whose mappings merge key by key."""
    if section == "model" and path[0] in RETIRED:
        raise ValueError(f"config: model.{'.'.join(path)} is no longer a setting: {RETIRED[path[0]]}")
    if section == "model" and len(path) == 1:
        path = list(canonical_path(path[0], value))
        if len(path) == 1 and path[0] in MODEL_SECTIONS:  # a whole sub-section: merged, not replaced
            for key, sub in value.items():
                _put(values, section, [path[0], str(key)], sub)
            return
    node = values
    for i, part in enumerate(path[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            where = ".".join([section, *path[: i + 1]])
            raise ValueError(f"config: {where} is a value, not a section, so {section}.{'.'.join(path)} cannot be set")
    node[path[-1]] = value


def build_section(section_type: Any, where: str, values: Any) -> Any:
    """``section_type`` of ``values``, each converted to its field's type; nested sections are built alike."""
    if not isinstance(values, dict):
        raise ValueError(f"config: {where} must be a mapping of settings, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(section_type)}
    hints = get_type_hints(section_type)
    kwargs = {}
    for name, value in values.items():
        if name not in known:
            raise ValueError(f"config: unknown key '{where}.{name}' ({where} has: {', '.join(known)})")
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build_section(hints[name], f"{where}.{name}", value)
        else:
            kwargs[name] = _coerce(f"{where}.{name}", value, hints[name])
    return section_type(**kwargs)


def replace_known(section: Any, values: dict[str, Any]) -> Any:
    """``section`` with the keys of ``values`` it knows replaced, nested sections alike; the others left out."""
    changes = {}
    for f in dataclasses.fields(section):
        if f.name not in values:
            continue
        current, value = getattr(section, f.name), values[f.name]
        if dataclasses.is_dataclass(current):
            if isinstance(value, dict):
                changes[f.name] = replace_known(current, value)
        else:
            changes[f.name] = value
    return dataclasses.replace(section, **changes)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    try:
        if hint is bool:
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if hint in (int, float, str):
            return hint(value)
    except (TypeError, ValueError) as ex:
        raise ValueError(f"config: {key} expects {hint.__name__}, got {value!r}") from ex
    return value
