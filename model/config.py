"""Model settings, kept apart from the modules that use them.

Every field is also a job configuration key ``model.<field>``; each is checked here, so a bad value fails when the
configuration is loaded, with the key and the value received.

>>> ModelConfig(optimizer="rmsprop")
Traceback (most recent call last):
...
ValueError: model config: optimizer must be one of adagrad, adam, sgd, got 'rmsprop'
"""
from __future__ import annotations

from dataclasses import dataclass

IMPLICIT_LOSSES = ("bpr", "sampled_softmax")
NEGATIVES = ("uniform", "popularity", "in_batch")
OPTIMIZERS = ("adagrad", "adam", "sgd")
LR_SCHEDULES = ("constant", "warmup_constant", "warmup_rsqrt")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 32
    lr: float = 0.05  # step size of the row-wise optimiser
    rank_bias_lr: float = 1.0  # step size multiplier of the ranking bias
    rating_bias_lr: float = 1.0  # step size multiplier of the rating biases
    l2: float = 1e-4  # L2 on the vectors of the rows a batch touches (once per row and step)
    init_std: float = 0.05
    rating_min: float = 1.0
    rating_max: float = 5.0
    # Implicit objective. bpr: pairwise, ``implicit_negatives`` negatives per event. sampled_softmax: each event
    # against ``shared_negatives`` negatives shared by the batch, logits corrected by log Q (sampling bias).
    implicit_loss: str = "bpr"
    negatives: str = "uniform"  # uniform | popularity (count^popularity_power) | in_batch (the batch's own items)
    implicit_negatives: int = 4
    shared_negatives: int = 256
    popularity_power: float = 0.75
    # Ratings also train the ranking side as implicit positives of this weight (0: off) when >= rating_implicit_min.
    rating_implicit_weight: float = 1.0
    rating_implicit_min: float = 0.0
    # Ranking extras, both folded into what a server ranks by (``bias_i + p_u . q_i``): the user vector adds
    # ``history_weight`` times the mean vector of the user's last ``history_size`` items (0: off), and the item bias
    # adds ``popularity_weight`` times the log of its event count decayed with a half-life of ``popularity_halflife``
    # events (0: off).
    history_size: int = 0
    history_weight: float = 1.0
    popularity_weight: float = 0.0
    popularity_halflife: float = 10_000.0
    # Item-to-item: adds ``cooccurrence_weight`` times the mean cosine similarity (co-occurrence within users' last
    # ``history_size`` items) between an item and the user's ``cooccurrence_recent`` latest items (0: off). Not a
    # dot product with published vectors: a server needs the co-occurrence rows too. Items past row
    # ``cooccurrence_capacity`` get no such term.
    cooccurrence_weight: float = 0.0
    cooccurrence_recent: int = 10
    cooccurrence_capacity: int = 2048  # a dense (C, C) float32 matrix: 16 MB at 2,048
    optimizer: str = "adagrad"  # adagrad | adam, both row-wise and applied to the rows a batch touched only
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_norm: float = 0.0  # per-row gradient norm bound; 0: off
    lr_schedule: str = "constant"  # constant | warmup_constant | warmup_rsqrt (by trained batches)
    warmup_steps: int = 100
    inner_steps: int = 1  # optimisation passes over each micro-batch
    # Bounded memory (docs/model.md, "Ids and bounded memory"): each of these is on by default, so that no stream of new ids can
    # grow the job without limit.
    # Row cap: a table holds at most max_rows ids; a batch whose new ids would pass it first evicts the least
    # recently used ids (by batch, never the batch's own), which the job publishes as tombstones. Why 2^18: the whole
    # training stage is one pickled state value, written every few seconds and copied by each checkpoint, so its
    # worst case must sit well inside the task heap of the shipped 3 GB TaskManager (deploy/cluster.py). A row is
    # about 4 dim + 70 bytes of state with Adagrad (about 200 at dim 32), so both tables at 2^18 rows are about 100 MB of
    # state, and the cleaner's and the evaluator's per-id memory is capped at the same count (docs/model.md). Raise it with
    # the TaskManager's memory.
    max_rows: int = 262_144
    # Id admission: an id gets its own row from its admit_after-th sighting; before that it shares the table's
    # fallback row. Sightings of ids not yet admitted are counted for at most admit_capacity ids (oldest forgotten).
    # Kept at 1: the row cap bounds memory without it, and a shared fallback row costs ranking quality (all ids not
    # yet admitted score alike), how much depending on the batch size and the ranking extras (BENCHMARKS.md). 2 keeps
    # one-off ids (most of a flood of random ids) from taking rows at all.
    admit_after: int = 1
    admit_capacity: int = 100_000
    # Expiry: ids without an event for ttl_ms of event time (``learn_many(..., ts=...)``) give their row back; 0: off.
    # 30 days: longer than any session or weekly habit, so a returning user keeps their row, while ids that left
    # stop holding rows and state long before the cap is reached.
    ttl_ms: int = 30 * 24 * 3600 * 1000
    sweep_rows: int = 1024  # rows checked for expiry per table and batch (amortised sweep)
    # Stability: replay of past events (reservoir sample) and a proximal pull toward the last published rows.
    replay_size: int = 0
    replay_ratio: float = 0.0  # replayed events per real event of a batch
    replay_weight: float = 1.0  # weight of a replayed event's gradients, relative to a real event's
    proximal: float = 0.0
    inject_nan_every: int = 0  # test hook: every n-th batch gets a NaN loss (and is skipped); 0: off
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    threads: int = 1  # torch intra-op threads; the JVM and Kafka need the other core

    def __post_init__(self) -> None:
        for name, choices in (
            ("implicit_loss", IMPLICIT_LOSSES), ("negatives", NEGATIVES), ("optimizer", OPTIMIZERS),
            ("lr_schedule", LR_SCHEDULES), ("device", DEVICES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"model config: {name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                )
        positive = ("dim", "lr", "inner_steps", "max_rows", "admit_after", "admit_capacity", "sweep_rows", "warmup_steps",
                    "threads", "init_std", "rank_bias_lr", "rating_bias_lr",
                    "popularity_halflife", "cooccurrence_recent", "cooccurrence_capacity")
        non_negative = ("l2", "implicit_negatives", "shared_negatives", "popularity_power", "rating_implicit_weight",
                        "clip_norm", "ttl_ms", "history_size", "history_weight", "popularity_weight", "cooccurrence_weight",
                        "replay_size", "replay_ratio", "replay_weight", "proximal", "inject_nan_every")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"model config: {name} must be positive, got {getattr(self, name)}")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ValueError(f"model config: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be in [0, 1), got {getattr(self, name)}")
        if not self.rating_min < self.rating_max:
            raise ValueError(
                f"model config: rating_min must be below rating_max, got {self.rating_min} and {self.rating_max}"
            )
