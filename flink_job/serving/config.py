"""The serving index's configuration: what a record may hold, how many ids the index keeps, and when it is behind."""
from __future__ import annotations

import math
from dataclasses import dataclass

ISOLATION_LEVELS = ("read_committed", "read_uncommitted")


@dataclass(frozen=True)
class ServingConfig:
    """Bounds of the index: what a record may hold and how many ids it keeps, and when it counts as behind.

    The caps bound memory whatever the topic holds: an id beyond ``max_users``/``max_items`` evicts the least recently
    updated one of its kind, and ``max_removed`` bounds the memory of removed (tombstoned or evicted) ids (what that
    comes to with the defaults: docs/serving.md). The default caps sit above the model's default row cap
    (``model.ids.max_rows``), so with the defaults serving never evicts an id the model still holds.
    """

    max_users: int = 1_000_000
    max_items: int = 1_000_000
    # Removed ids remembered with their version, so that an older re-delivered record does not bring them back;
    # beyond this the oldest are forgotten (such a record would then be served again until a newer one replaces it).
    max_removed: int = 1_000_000
    dim: int = 0  # the vector length every record must have; 0: the first valid record sets it
    max_dim: int = 4096
    max_id_length: int = 1024
    max_seen: int = 10_000  # items in a user record's ``seen`` list
    max_abs_value: float = 1e6  # |bias| and |vector entries|: scores stay finite in float32
    max_lag_s: float = 60.0  # /healthz is unhealthy once the index has been behind the topic for longer than this
    lag_check_s: float = 5.0  # how often the consumer compares its positions with the topic's end offsets

    def __post_init__(self) -> None:
        for name in ("max_users", "max_items", "max_removed", "max_dim", "max_id_length", "max_seen"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config: serving.{name} must be a positive integer, got {value!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or not 0 <= self.dim <= self.max_dim:
            raise ValueError(f"config: serving.dim must be in 0..{self.max_dim} (0: from the first record), "
                             f"got {self.dim!r}")
        for name in ("max_abs_value", "max_lag_s", "lag_check_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"config: serving.{name} must be a finite number > 0, got {value!r}")

