"""The training stage's snapshot as bytes: the model's own bytes, the settings it ran with, and one plain dict per
component, each written and read by the component itself (``state()``/``load_state()``).

Version 2 groups the parts by component. Version 1 (before the stage was split into components) kept them by the
attribute they lived in: ``parts`` with ``counters``, ``batcher``, ``watermarks``, ``near_duplicates``, ``scalars``,
``dirty_users``, ``dirty_items``, ``cleaner`` and ``quality``; ``load_state`` reads both, as version 2.
"""
from __future__ import annotations

import io
import pickle
from typing import Any

STATE_VERSION = 2
READABLE = (1, 2)
STAGE_CLOCKS = ("pending_since_ms", "first_chunk_ms")  # the stage's own; the publisher holds the others

# Modules of the stages before they moved into flink_job.stages: a checkpoint or savepoint taken before names its
# classes (the pending batch's EventBatch) by these paths.
_MOVED_MODULES = {f"flink_job.{m}": f"flink_job.stages.{m}"
                  for m in ("parse", "lateness", "near_dups", "clean", "users", "batch", "publish", "train")}


class _StateUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(_MOVED_MODULES.get(module, module), name)


def dump_state(state: dict[str, Any]) -> bytes:
    """``state``: the components' dicts by name, ``model`` (bytes) and ``settings``; the version is added here."""
    return pickle.dumps({"version": STATE_VERSION, **state}, pickle.HIGHEST_PROTOCOL)


def load_state(data: bytes) -> dict[str, Any]:
    """The state ``dump_state`` wrote, or one of version 1 regrouped as version 2."""
    state: dict[str, Any] = _StateUnpickler(io.BytesIO(data)).load()
    version = state.get("version")
    if version not in READABLE:
        raise ValueError(f"train: state version {version} is not one of {READABLE}")
    return from_version_1(state) if version == 1 else state


def from_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """A version-1 state as version 2: the same values under the components that hold them now."""
    parts = state["parts"]
    scalars = parts["scalars"]
    batcher = parts["batcher"]
    upgraded = {
        "version": STATE_VERSION,
        "model": state["model"],
        "stage": {k: scalars[k] for k in STAGE_CLOCKS if k in scalars},
        "counters": parts["counters"],
        "batcher": {k: batcher[old] for k, old in (("parts", "_parts"), ("pending", "pending")) if old in batcher},
        "admission": {"watermarks": parts["watermarks"], "near_duplicates": parts["near_duplicates"],
                      "cleaner": parts["cleaner"]},
        "publisher": {"dirty_users": parts["dirty_users"], "dirty_items": parts["dirty_items"],
                      **{k: v for k, v in scalars.items() if k not in STAGE_CLOCKS}},
        "quality": parts.get("quality"),
    }
    if "settings" in state:  # written before the settings were kept: replayed under the current ones
        upgraded["settings"] = state["settings"]
    return upgraded
