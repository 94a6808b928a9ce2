"""Model settings by concern, kept apart from the modules that use them.

``ModelConfig`` holds the general settings and one frozen section per concern: ``optimizer``, ``objective``,
``extras``, ``ids``, ``stability`` and ``cold``. Every field is a job configuration key
``model.<section>.<key>`` (``model.<key>`` for the general ones); each section checks itself, so a bad value fails
when the configuration is loaded, with the key and the value received. The flat keys of older configurations and
recorded settings (``model.lr``) stay valid: ``FLAT_KEYS`` maps each to its place, derived from the fields.
Keys that are gone (``RETIRED``) are refused in a configuration and dropped from recorded settings.

>>> ModelConfig(optimizer=OptimizerConfig(name="rmsprop"))
Traceback (most recent call last):
...
ValueError: config: model.optimizer.name must be one of adagrad, adam, sgd, got 'rmsprop'
>>> ModelConfig.from_dict({"lr": 0.1, "objective": {"negatives": "in_batch"}}).optimizer.lr
0.1
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

IMPLICIT_LOSSES = ("bpr", "sampled_softmax")
NEGATIVES = ("uniform", "popularity", "in_batch")
OPTIMIZERS = ("adagrad", "adam", "sgd")
LR_SCHEDULES = ("constant", "warmup_constant", "warmup_rsqrt")
DEVICES = ("auto", "cpu", "cuda")


def _check(where: str, obj: object, choices: Mapping[str, tuple[str, ...]] = {},
           positive: Iterable[str] = (), non_negative: Iterable[str] = (), unit: Iterable[str] = ()) -> None:
    """Raise ``ValueError("config: <where>.<key> ...")`` for the first field of ``obj`` out of its range."""
    for name, allowed in choices.items():
        if getattr(obj, name) not in allowed:
            raise ValueError(f"config: {where}.{name} must be one of {', '.join(allowed)}, got {getattr(obj, name)!r}")
    for name in positive:
        if not getattr(obj, name) > 0:
            raise ValueError(f"config: {where}.{name} must be positive, got {getattr(obj, name)}")
    for name in non_negative:
        if not getattr(obj, name) >= 0:
            raise ValueError(f"config: {where}.{name} must be >= 0, got {getattr(obj, name)}")
    for name in unit:
        if not 0 <= getattr(obj, name) < 1:
            raise ValueError(f"config: {where}.{name} must be in [0, 1), got {getattr(obj, name)}")


@dataclass(frozen=True)
class OptimizerConfig:
    """The row-wise update step: applied to the rows a batch touched only."""
    # adagrad | adam | sgd; its flat key was ``model.optimizer``, hence the metadata
    name: str = field(default="adagrad", metadata={"flat": "optimizer"})
    lr: float = 0.05  # step size of the row-wise optimiser
    rank_bias_lr: float = 1.0  # step size multiplier of the ranking bias
    rating_bias_lr: float = 4.0  # step size multiplier of the rating biases under rating_bias_prior 0
    # > 0: a rating bias is the running mean of its row's rating residuals, shrunk toward 0 by this many pseudo-ratings
    # (a Newton step on the bias, model.rating_offsets): it needs no step size and is as exact after one large batch
    # as after many small ones. The ratio of a rating's noise variance to the spread of users' and items' biases, about
    # 1 to 0.2 on star scales, makes the prior about 5 ratings. 0: Adagrad at lr * rating_bias_lr like the vectors.
    rating_bias_prior: float = 5.0
    # The residual count stops growing here, so a bias goes on following its row's latest ~window ratings (drift).
    rating_bias_window: float = 200.0
    l2: float = 1e-4  # L2 on the vectors of the rows a batch touches (once per row and step)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_norm: float = 0.0  # per-row gradient norm bound; 0: off
    lr_schedule: str = "constant"  # constant | warmup_constant | warmup_rsqrt (by trained batches)
    warmup_steps: int = 100
    inner_steps: int = 1  # optimisation passes over each sub-step
    # A micro-batch is learned in event order in sub-steps of at most sub_batch events (0: no bound), each tested
    # before it trains (model.sequential), so later events of a batch are scored and trained after earlier ones...
    sub_batch: int = 0
    # ...and a batch of n events takes about sub_step_budget / n sub-steps (model.sequential.step_size; 0: one): a full
    # batch (4,096, at high traffic) two, a small one (at low traffic, when time is spare) nearly one per event.
    sub_step_budget: int = 8192
    user_once: bool = False  # a sub-step also ends before a user's second event in it: one step per user and event
    row_mean: bool = False  # a row's step follows the mean gradient of its entries in a sub-step, not their sum

    def __post_init__(self) -> None:
        _check("model.optimizer", self, {"name": OPTIMIZERS, "lr_schedule": LR_SCHEDULES},
               positive=("lr", "rank_bias_lr", "rating_bias_lr", "rating_bias_window", "warmup_steps", "inner_steps"),
               non_negative=("l2", "clip_norm", "sub_batch", "sub_step_budget", "rating_bias_prior"),
               unit=("adam_beta1", "adam_beta2"))


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the ranking side learns from. bpr: pairwise, ``implicit_negatives`` negatives per event.
    sampled_softmax: each event against ``shared_negatives`` negatives shared by the batch, logits corrected by
    log Q (sampling bias)."""
    implicit_loss: str = "bpr"
    negatives: str = "uniform"  # uniform | popularity (count^popularity_power) | in_batch (the batch's own items)
    implicit_negatives: int = 4
    shared_negatives: int = 256
    popularity_power: float = 0.75
    # Ratings also train the ranking side as implicit positives of this weight (0: off) when >= rating_implicit_min.
    rating_implicit_weight: float = 1.0
    rating_implicit_min: float = 0.0

    def __post_init__(self) -> None:
        _check("model.objective", self, {"implicit_loss": IMPLICIT_LOSSES, "negatives": NEGATIVES},
               non_negative=("implicit_negatives", "shared_negatives", "popularity_power", "rating_implicit_weight"))


@dataclass(frozen=True)
class ExtrasConfig:
    """Ranking extras, folded into what a server ranks by (``bias_i + p_u . q_i``): the user vector adds
    ``history_weight`` times the mean vector of the user's last ``history_size`` items (0: off); the item bias adds
    ``popularity_weight`` times the log of its event count decayed with a half-life of ``popularity_halflife``
    events (0: off). Item-to-item adds ``cooccurrence_weight`` times the mean cosine similarity (co-occurrence
    within users' histories) between an item and the user's ``cooccurrence_recent`` latest items (0: off); not a dot
    product with published vectors, so a server needs the co-occurrence rows too. Items past row
    ``cooccurrence_capacity`` get no such term (the matrix is dense, capacity squared)."""
    history_size: int = 20
    history_weight: float = 2.0
    popularity_weight: float = 0.5
    popularity_halflife: float = 10_000.0
    cooccurrence_weight: float = 0.0
    cooccurrence_recent: int = 10
    cooccurrence_capacity: int = 2048

    def __post_init__(self) -> None:
        _check("model.extras", self,
               positive=("popularity_halflife", "cooccurrence_recent", "cooccurrence_capacity"),
               non_negative=("history_size", "history_weight", "popularity_weight", "cooccurrence_weight"))


@dataclass(frozen=True)
class IdsConfig:
    """Bounded memory (docs/model.md, "Ids and bounded memory"): each bound is on by default, so that no stream of
    new ids can grow the job without limit."""
    # Row cap: a table holds at most max_rows ids; a batch whose new ids would pass it first evicts the least
    # recently used ids (by batch, never the batch's own), published as tombstones. The whole training stage is one
    # state value copied by each checkpoint, so its worst case must sit well inside the shipped TaskManager's task
    # heap (deploy/cluster_conf.py); the cleaner's and the evaluator's per-id memory is capped at the same count. Raise
    # it with the TaskManager's memory.
    max_rows: int = 262_144
    # Id admission: an id gets its own row from its admit_after-th sighting; before that it shares the table's
    # fallback row. Sightings of ids not yet admitted are counted for at most admit_capacity ids (oldest forgotten).
    # Kept at 1: the row cap bounds memory without it, and a shared fallback row costs ranking quality (all ids
    # not yet admitted score alike). 2 keeps one-off ids (most of a flood of random ids) from taking rows at all.
    admit_after: int = 1
    admit_capacity: int = 100_000
    # Expiry: ids without an event for ttl_ms of event time (``learn_many(..., ts=...)``) give their row back; 0: off.
    # 30 days: longer than any session or weekly habit, so a returning user keeps their row, while ids that left
    # stop holding rows and state long before the cap is reached.
    ttl_ms: int = 30 * 24 * 3600 * 1000
    sweep_rows: int = 1024  # rows checked for expiry per table and batch (amortised sweep)

    def __post_init__(self) -> None:
        _check("model.ids", self, positive=("max_rows", "admit_after", "admit_capacity", "sweep_rows"),
               non_negative=("ttl_ms",))


@dataclass(frozen=True)
class StabilityConfig:
    """Against forgetting and drift: replay of past events (reservoir sample) and a proximal pull toward the last
    published rows."""
    replay_size: int = 0
    replay_ratio: float = 0.0  # replayed events per real event of a batch
    replay_weight: float = 1.0  # weight of a replayed event's gradients, relative to a real event's
    # A batch of n events replays at most replay_budget - n past events (0: no bound), as sub-steps are budgeted
    # (optimizer.sub_step_budget): a full batch (high traffic) replays none and costs what it did without replay; a
    # small one (low traffic, when time is spare) replays up to replay_ratio per event.
    replay_budget: int = 0
    proximal: float = 0.0

    def __post_init__(self) -> None:
        _check("model.stability", self,
               non_negative=("replay_size", "replay_ratio", "replay_weight", "replay_budget", "proximal"))

    def replay_count(self, n: int) -> int:
        """Past events replayed into a batch of ``n`` events.

        >>> StabilityConfig(replay_ratio=8.0, replay_budget=4096).replay_count(256)
        2048
        >>> [StabilityConfig(replay_ratio=8.0, replay_budget=4096).replay_count(n) for n in (1, 3000, 4096)]
        [8, 1096, 0]
        """
        k = int(round(self.replay_ratio * n))
        return min(k, max(0, self.replay_budget - n)) if self.replay_budget > 0 else k


@dataclass(frozen=True)
class ColdConfig:
    """Cold ids (``model.unknown_users``): ``unknown_users`` popularity (a user without a row is ranked by the
    items' event counts, as serving ranks a user it does not know) | fallback_row (by the shared fallback row)."""
    unknown_users: str = "popularity"

    def __post_init__(self) -> None:
        _check("model.cold", self, {"unknown_users": ("popularity", "fallback_row")})


def subtask_device(setting: str, subtask: int, gpus: int) -> str:
    """The device setting of parallel trainer ``subtask`` on a machine with ``gpus`` GPUs: ``auto`` and ``cuda``
    spread the subtasks over the GPUs round-robin (``cuda:<subtask mod gpus>``), so that trainers sharing a
    TaskManager do not share one GPU; any other setting, or no GPU, stays as it is.

    >>> subtask_device("auto", 5, 4), subtask_device("cuda", 1, 1), subtask_device("auto", 3, 0)
    ('cuda:1', 'cuda:0', 'auto')
    """
    if setting in ("auto", "cuda") and gpus > 0:
        return f"cuda:{subtask % gpus}"
    return setting


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 32
    init_std: float = 0.05
    rating_min: float = 1.0
    rating_max: float = 5.0
    device: str = "auto"  # auto | cpu | cuda | cuda:N; a parallel trainer's auto/cuda is cuda:<subtask mod GPUs>
    seed: int = 0
    threads: int = 1  # torch intra-op threads; the JVM and Kafka need the other core
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    extras: ExtrasConfig = field(default_factory=ExtrasConfig)
    ids: IdsConfig = field(default_factory=IdsConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    cold: ColdConfig = field(default_factory=ColdConfig)

    def __post_init__(self) -> None:
        _check("model", self, positive=("dim", "threads", "init_std"))
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", self.device):
            raise ValueError(f"config: model.device must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}")
        if not self.rating_min < self.rating_max:
            raise ValueError(
                f"config: model.rating_min must be below model.rating_max, got {self.rating_min} and {self.rating_max}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """The configuration of nested or flat (older) settings, as ``to_dict`` or an older version wrote them; the
        ``RETIRED`` keys an older version recorded are dropped."""
        nested = {k: v for k, v in nest(values).items() if k not in RETIRED}
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in nested.items():
            if key not in known:
                raise ValueError(f"config: unknown key 'model.{key}' (model has: {', '.join(known_keys())})")
            if key in SECTIONS:
                section = SECTIONS[key]
                names = {f.name for f in dataclasses.fields(section)}
                unknown = sorted(set(value) - names)
                if unknown:
                    raise ValueError(f"config: unknown key 'model.{key}.{unknown[0]}' "
                                     f"(model.{key} has: {', '.join(sorted(names))})")
                value = section(**value)
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Any]:
        """The settings under their flat keys, as model states of format version 4 record them (so a state written
        now still loads in the versions before the sections)."""
        nested = self.to_dict()
        flat = {k: v for k, v in nested.items() if k not in SECTIONS}
        flat.update({key: nested[section][name] for key, (section, name) in FLAT_KEYS.items()})
        # Settings newer than format 4 are written only when set: a model that does not use them writes what the
        # versions before them read (they reject unknown keys).
        defaults = ModelConfig().to_dict()
        return {k: v for k, v in flat.items()
                if FLAT_KEYS.get(k, ("",))[0] not in NEWER_SECTIONS or v != defaults[FLAT_KEYS[k][0]][FLAT_KEYS[k][1]]}


# Keys of older versions that are no longer settings -> why. A model state or stage snapshot that recorded them
# still loads without them; a configuration that sets them fails (``flink_job.config_tree``).
RETIRED = {
    key: "it was a test seam; the fault test injects NaN batches itself (tests/faulty_job)"
    for key in ("testing", "inject_nan_every")  # the section and its flat alias
}
NEWER_SECTIONS = ("cold",)  # sections added after the state format 4
SECTIONS: dict[str, Any] = {f.name: f.default_factory for f in dataclasses.fields(ModelConfig)
                            if f.default_factory is not dataclasses.MISSING}
# Flat key of older configurations -> its place now, e.g. "lr" -> ("optimizer", "lr").
FLAT_KEYS: dict[str, tuple[str, str]] = {
    f.metadata.get("flat", f.name): (section, f.name)
    for section, section_type in SECTIONS.items() for f in dataclasses.fields(section_type)
}


def known_keys() -> list[str]:
    """Every key of the model section, dotted below it, for error messages."""
    top = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in SECTIONS]
    return top + [f"{s}.{f.name}" for s, t in SECTIONS.items() for f in dataclasses.fields(t)]


def canonical_path(key: str, value: Any) -> tuple[str, ...]:
    """Where ``model.<key>`` belongs: a flat alias moves to its section; a section given a mapping stays a section
    (``optimizer`` is both: the old flat optimiser name and the new section)."""
    if key in SECTIONS and isinstance(value, Mapping):
        return (key,)
    return FLAT_KEYS.get(key, (key,))


def nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """Model settings, flat aliases and nested sections mixed, as nested sections; later entries win."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        path = canonical_path(key, value)
        if len(path) == 2:
            out.setdefault(path[0], {})[path[1]] = value
        elif path[0] in SECTIONS:
            out.setdefault(path[0], {}).update(value)
        else:
            out[key] = value
    return out
