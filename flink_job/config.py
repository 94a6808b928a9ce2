"""Job configuration: frozen dataclasses per concern, loaded once from defaults, YAML and ``--set`` overrides.

>>> cfg = JobConfig.load(overrides=["batch.size=512", "kafka.bootstrap=127.0.0.1:9999"])
>>> cfg.batch.size, cfg.kafka.bootstrap
(512, '127.0.0.1:9999')
>>> JobConfig.load(overrides=["batch.nope=1"])
Traceback (most recent call last):
...
ValueError: config: unknown key 'batch.nope' (batch has: size, max_wait_ms, chunk_ms, shards)
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints


from flink_job import secrets
from flink_job.config_tree import build_section, config_tree, replace_known
from flink_job.schema import ACTIONS, FLOAT32_MAX, MISSING_POLICIES, NUMERIC_FIELDS, OUTLIER_POLICIES
from model.config import ModelConfig, nest, subtask_device

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class KafkaConfig:
    """Where the job reads and writes, and the client settings every Kafka client of the job gets.

    ``client_properties`` are Java-style Kafka client settings (``security.protocol``, ``sasl.*``, ``ssl.*``) for
    the Flink connector's source and sinks and, translated by ``flink_job.secrets``, for the confluent-kafka
    clients. Secrets in them are references, ``${env:NAME}`` or ``${file:PATH}``, checked here and resolved only
    when a client is built; a literal secret is refused, and ``repr`` shows where a secret comes from, never its
    value.

    >>> import os
    >>> os.environ["DOCTEST_KAFKA_SECRET"] = "p4ss"
    >>> k = KafkaConfig(client_properties={"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
    ...                 "sasl.username": "app", "sasl.password": "${env:DOCTEST_KAFKA_SECRET}"})
    >>> "p4ss" in repr(k), k.librdkafka_properties()["sasl.password"]
    (False, 'p4ss')
    """

    bootstrap: str = "127.0.0.1:9092"
    input_topic: str = "streamrec.events"
    embeddings_topic: str = "streamrec.embeddings"
    dead_letter_topic: str = "streamrec.dead-letters"
    stats_topic: str = "streamrec.job-stats"
    # User-sharded trainers (flink.parallelism > 1) exchange their item changes through this topic (docs/sharding.md).
    item_delta_topic: str = "streamrec.item-deltas"
    # A trainer's item delta larger than this goes out as several records: it must stay under the producer's
    # max.request.size and the topic's max.message.bytes (1 MiB by default); a batch over 50,000 items moves ~20,000.
    item_delta_record_bytes: int = 512 * 1024
    # An item row moved only as a sampled negative goes into a delta once its parameters moved by more than this
    # (relative L2 change) since it last went out; until then the trainer holds it back (in its checkpointed
    # journal). A batch over 50,000 items moves ~16,000 rows, most of them a little as negatives: at 0 every trainer
    # applied every other's moves of the whole table. 0.05 is publish.negative_tolerance's bound for the same rows.
    item_delta_tolerance: float = 0.05
    group_id: str = "streamrec-job"
    start_from: str = "earliest"  # earliest | latest | committed
    # Extra Kafka client settings for every source and sink (security.protocol, sasl.*, ssl.*); secrets only as
    # ${env:NAME} or ${file:PATH} references (docs/operations.md, "Kafka security").
    client_properties: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        given = self.client_properties
        if not isinstance(given, dict):
            raise ValueError(f"config: kafka.client_properties must be a mapping of Kafka client settings, "
                             f"got {type(given).__name__}")
        props = {}
        for key, value in given.items():
            if not isinstance(key, str) or isinstance(value, (dict, list)) or value is None:
                raise ValueError(f"config: kafka.client_properties.{key} must be a string, number or boolean")
            # YAML reads true/123 as bool/int; Kafka clients take strings ("true", not "True").
            props[key] = str(value).lower() if isinstance(value, bool) else str(value)
        try:
            secrets.check(props)
        except ValueError as ex:
            raise ValueError(f"config: {ex}") from None
        object.__setattr__(self, "client_properties", props)
        if not 0 <= self.item_delta_tolerance < float("inf"):
            raise ValueError(f"config: kafka.item_delta_tolerance must be a finite number >= 0, got "
                             f"{self.item_delta_tolerance}")
        if self.item_delta_record_bytes < 1024:
            raise ValueError(f"config: kafka.item_delta_record_bytes must be at least 1024, got "
                             f"{self.item_delta_record_bytes}")

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["client_properties"] = secrets.redacted(self.client_properties)
        return f"KafkaConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def java_properties(self) -> dict[str, str]:
        """Resolved client settings for the Flink Kafka connector (``properties.<key>`` in the DDL)."""
        return secrets.java_properties(self.client_properties)

    def librdkafka_properties(self) -> dict[str, str]:
        """Resolved client settings for confluent-kafka producers, consumers and admin clients."""
        return secrets.librdkafka_properties(self.client_properties)

    def client_config(self, **extra: Any) -> dict[str, Any]:
        """A complete confluent-kafka config: bootstrap servers, the security settings, then ``extra``."""
        return {"bootstrap.servers": self.bootstrap, **self.librdkafka_properties(), **extra}


@dataclass(frozen=True)
class BatchConfig:
    size: int = 4096  # events per training batch
    max_wait_ms: int = 200  # flush a partial batch after this long
    chunk_ms: int = 100  # the JVM gathers events into chunks over this processing-time window
    shards: int = 8  # chunks are formed per hash(user) shard, so per-user order is kept inside a shard

    def __post_init__(self) -> None:
        if self.size <= 0 or self.max_wait_ms <= 0 or self.chunk_ms <= 0 or self.shards <= 0:
            raise ValueError(f"config: batch settings must be positive, got {self}")


DELIVERY_MODES = ("at_least_once", "exactly_once")
RECORD_FORMATS = ("json", "binary")


@dataclass(frozen=True)
class PublishConfig:
    # Touched users are coalesced and published at most this often (0: after every batch) while batches close full;
    # a batch closed short of batch.size by max_wait_ms (traffic below it) publishes them at once.
    interval_ms: int = 250
    # Touched items likewise, less often: freshness is measured on users' records. (Items moved only as sampled
    # negatives wait for negative_tolerance besides.)
    item_interval_ms: int = 1000
    # A touched id whose vector moved by more than this (relative L2 change since its last publish) is published
    # after the batch that moved it instead of waiting for the interval; 0: off (the interval alone decides).
    tolerance: float = 0.0
    # A row moved without an event of its own id in the batch (a sampled negative, a replayed event's user or item)
    # waits for publishing only once its (bias, vector) moved by more than this since its last publish (relative L2
    # change), so that the records published follow the events, not the number of ids. 0.05 keeps every served
    # score within 5% of |(1, p)| |(b, q)| of the model's (Cauchy-Schwarz) while a negative's many tiny moves
    # accumulate before it goes out; 0: every moved row is published (before issue 18).
    negative_tolerance: float = 0.05
    # Value format of embedding records: json, or binary (flink_job.stages.binary_records: float32 vectors, a third
    # of the bytes); serving reads both, told apart by the value's first byte.
    format: str = "json"
    max_records: int = 100_000  # cap per publish; ids beyond it stay pending for the next one (0: no cap)
    # at_least_once: records are readable as soon as the sink flushes them; consumers keep the highest version.
    # exactly_once: Kafka transactions committed with each checkpoint; consumers read committed.
    delivery: str = "at_least_once"
    # Kafka transaction timeout for exactly_once: must not exceed the broker's transaction.max.timeout.ms (15 min by
    # default) and must outlast the longest outage to recover from (docs/operations.md, "Delivery guarantees").
    transaction_timeout_ms: int = 15 * 60 * 1000
    snapshot_dir: str = ""  # also write every table as NumPy files with an id index here (local runs); empty: off
    snapshot_interval_ms: int = 60_000

    def __post_init__(self) -> None:
        if min(self.interval_ms, self.item_interval_ms, self.max_records) < 0 or self.snapshot_interval_ms <= 0:
            raise ValueError(
                f"config: publish.interval_ms, publish.item_interval_ms and publish.max_records must be >= 0 and"
                f" publish.snapshot_interval_ms > 0, got {self.interval_ms}, {self.item_interval_ms},"
                f" {self.max_records} and {self.snapshot_interval_ms}"
            )
        for name in ("tolerance", "negative_tolerance"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"config: publish.{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.format not in RECORD_FORMATS:
            raise ValueError(f"config: publish.format must be one of {RECORD_FORMATS}, got {self.format!r}")
        if self.delivery not in DELIVERY_MODES:
            raise ValueError(f"config: publish.delivery must be one of {DELIVERY_MODES}, got {self.delivery!r}")
        if self.transaction_timeout_ms <= 0:
            raise ValueError(f"config: publish.transaction_timeout_ms must be > 0, got {self.transaction_timeout_ms}")


@dataclass(frozen=True)
class CleanConfig:
    max_id_length: int = 128
    max_record_chars: int = 65_536
    # Event time may be ahead of processing time by at most this (further: dead letter future_ts), and so may each
    # partition's newest event time behind the watermark: one bad clock cannot make the real events late.
    max_future_ms: int = 5 * 60 * 1000
    max_value: float = 100.0  # an implicit action's value (its training weight) must be in (0, max_value]
    dedup_ttl_s: int = 24 * 3600  # how long an event id is remembered for de-duplication
    near_duplicate_window_ms: int = 0  # same user, item and action again within this counts once; 0: off
    out_of_orderness_ms: int = 5 * 60 * 1000  # the watermark trails the newest event time by this much
    allowed_lateness_ms: int = 60 * 60 * 1000  # events further behind the watermark are dead-lettered as late; <0: off
    # Training weight of each implicit action (times the event's own value); ratings train on their value.
    action_weights: dict[str, float] = field(
        default_factory=lambda: {"view": 0.25, "click": 0.5, "cart": 0.75, "purchase": 1.0}
    )
    # Context fields (flink_job.stages.clean). A mapping names only the fields it changes; the others keep their default.
    # Missing value policy per field: default | global_mean | user_mean | drop (category: default | drop).
    missing: dict[str, str] = field(
        default_factory=lambda: {"dwell_ms": "user_mean", "price": "global_mean", "category": "default"}
    )
    defaults: dict[str, float | str] = field(
        default_factory=lambda: {"dwell_ms": 0.0, "price": 0.0, "category": "unknown"}
    )
    outliers: dict[str, str] = field(default_factory=lambda: {"dwell_ms": "clip", "price": "clip"})  # clip|drop|off
    outlier_window: int = 4096  # recent accepted values per field the median and MAD are taken over
    outlier_warmup: int = 256  # outlier rule off until this many values were accepted
    outlier_k: float = 6.0  # outlier beyond k robust standard deviations (1.4826 MAD) of log1p(value)
    recent_items: int = 20  # items remembered per user, most recent last
    user_ttl_ms: int = 7 * 24 * 3600 * 1000  # per-user state is forgotten after this long without events (event time)

    def __post_init__(self) -> None:
        unknown = set(self.action_weights) - set(ACTIONS[:-1])
        if unknown or any(not 0 <= float(w) for w in self.action_weights.values()):
            raise ValueError(
                f"config: clean.action_weights takes non-negative weights for {ACTIONS[:-1]}, got {self.action_weights}"
            )
        for spec in dataclasses.fields(self):
            if spec.name in ("missing", "defaults", "outliers"):
                given = getattr(self, spec.name)
                if not isinstance(given, dict):
                    raise ValueError(f"config: clean.{spec.name} must be a mapping by field name, got {given!r}")
                if spec.name == "outliers":  # YAML reads a bare `off` as false
                    given = {k: "off" if v is False else v for k, v in given.items()}
                # Complete the mapping, so that the policy in force shows in the logged config.
                object.__setattr__(self, spec.name, {**spec.default_factory(), **given})  # type: ignore[misc]
        for key, given, choices in (
            ("missing", self.missing, MISSING_POLICIES),
            ("outliers", self.outliers, {f: OUTLIER_POLICIES for f in NUMERIC_FIELDS}),
        ):
            for name, policy in given.items():
                if name not in choices or policy not in choices[name]:
                    allowed = "; ".join(f"{f}: {' | '.join(c)}" for f, c in choices.items())
                    raise ValueError(f"config: clean.{key}.{name} = {policy!r} is not allowed ({allowed})")
        if set(self.defaults) - set(MISSING_POLICIES):
            raise ValueError(f"config: clean.defaults takes {', '.join(MISSING_POLICIES)}, got {self.defaults!r}")
        for name, value in self.defaults.items():
            ok = (
                isinstance(value, str) if name == "category"
                else isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")
            )
            if not ok:
                wanted = "a string" if name == "category" else "a finite number >= 0"
                raise ValueError(f"config: clean.defaults.{name} must be {wanted}, got {value!r}")
        if not (self.outlier_window > 0 and 0 <= self.outlier_warmup <= self.outlier_window):
            raise ValueError(
                f"config: clean.outlier_window must be > 0 and 0 <= clean.outlier_warmup <= it, "
                f"got {self.outlier_window} and {self.outlier_warmup}"
            )
        if isinstance(self.max_future_ms, bool) or not isinstance(self.max_future_ms, int) or self.max_future_ms < 0:
            raise ValueError(f"config: clean.max_future_ms must be an integer >= 0, got {self.max_future_ms!r}")
        if not (isinstance(self.max_value, (int, float)) and not isinstance(self.max_value, bool)
                and 0 < self.max_value <= FLOAT32_MAX):
            raise ValueError(f"config: clean.max_value must be a number in (0, {FLOAT32_MAX:g}] (float32), "
                             f"got {self.max_value!r}")
        if not self.outlier_k > 0:
            raise ValueError(f"config: clean.outlier_k must be > 0, got {self.outlier_k}")
        if self.recent_items < 0 or self.user_ttl_ms <= 0:
            raise ValueError(
                f"config: clean.recent_items must be >= 0 and clean.user_ttl_ms > 0, "
                f"got {self.recent_items} and {self.user_ttl_ms}"
            )


@dataclass(frozen=True)
class EvalConfig:
    """Prequential (test-then-train) quality measured inside the job: each batch is scored before it trains."""

    enabled: bool = True
    k: int = 10  # HR@k and NDCG@k
    # Share of users whose positives are ranked against every item (a stable hash of the id picks them): full
    # ranking costs a (users x items) product per batch, so a sample keeps it off the throughput path. RMSE and MAE
    # use every rating. The ML-100K benchmark sets 1.0.
    user_sample: float = 0.05
    positive_rating: float = 4.0  # a rating at or above this is a positive for ranking
    positive_actions: str = "click,cart,purchase"  # implicit actions that are positives (comma-separated)
    log_every_batches: int = 100  # a running summary in the log every this many batches (0: never)

    def __post_init__(self) -> None:
        if self.k <= 0 or not 0 < self.user_sample <= 1 or self.log_every_batches < 0:
            raise ValueError(
                f"config: eval.k must be > 0, eval.user_sample in (0, 1] and eval.log_every_batches >= 0, got "
                f"{self.k}, {self.user_sample} and {self.log_every_batches}"
            )
        unknown = set(self.positive_action_list) - set(ACTIONS[:-1])
        if unknown:
            raise ValueError(f"config: eval.positive_actions takes actions of {ACTIONS[:-1]}, got {sorted(unknown)}")

    @property
    def positive_action_list(self) -> list[str]:
        return [a.strip() for a in self.positive_actions.split(",") if a.strip()]


@dataclass(frozen=True)
class FlinkConfig:
    parallelism: int = 1  # the trainer operator's subtasks
    # User-sharded trainers, each a model (its users' rows, a replica of every item) in keyed state of its own; 0:
    # one per subtask. Fixed for the life of the job's state (the trainers' max parallelism): a job with more than
    # ``parallelism`` runs several on a subtask and can be restored at any parallelism up to this number
    # (docs/sharding.md, "Rescaling").
    trainers: int = 0
    checkpoint_interval_ms: int = 10_000
    state_backend: str = "hashmap"  # hashmap (heap) or rocksdb
    checkpoint_dir: str = ""  # empty: <project>/.run/checkpoints; use a shared file system on a cluster
    # Thread mode: the training stage's state is a snapshot written at most this often plus the calls made since,
    # which a restore replays (flink_job.flink.stage_log): longer means less serialising and a longer replay.
    state_snapshot_interval_ms: int = 2_000
    # ...and at most this share of the trainer's time: a snapshot that took t ms waits t / share ms before the next
    # (flink_job.flink.stage_log.SnapshotSchedule), so that a large state (~200 MB, 0.4 s at a million users) is not
    # written every 2 s; 0: the interval alone.
    state_snapshot_share: float = 0.05
    # Thread mode: the snapshot is written as map-state entries of at most this many bytes, so that no single state
    # value grows with the table (a Java byte[] holds at most 2 GiB; flink_job.flink.stage_log.StageChunks).
    state_chunk_bytes: int = 16 * 1024 * 1024
    restore_from: str = ""  # a checkpoint (chk-N directory) or savepoint to start from; empty: start fresh
    # A model pre-trained in batch (python -m model.warm_start --out FILE): a job without restored state starts from it.
    initial_model: str = ""
    # "thread" (Python inside the TaskManager's JVM: no worker process, no bundles, fresher output; torch runs on a
    # thread of its own, flink_job.flink.torch_thread; state is a snapshot and a call log, flink_job.flink.stage_log)
    # or "process" (a Python worker fed in bundles). The embedded interpreter finds the venv through
    # python.pythonpath (flink_job.flink.topology, deploy/cluster_conf.py, deploy/k8s). Figures: BENCHMARKS.md.
    python_execution_mode: str = "thread"
    # Python results reach the JVM, and the stage's state is serialised into Flink state, at the end of each bundle:
    # shorter bundles mean fresher output and more state writes (the trade-off measured: BENCHMARKS.md).
    bundle_time_ms: int = 50
    # After a failure the job restarts from its last checkpoint, waiting 1 s, then twice as long after each further
    # failure up to the maximum; a job that ran an hour without failing starts again from the initial wait.
    restart_initial_backoff_ms: int = 1_000
    restart_max_backoff_ms: int = 60_000
    restart_attempts: int = 0  # consecutive failed attempts before the job fails for good; 0: keep trying
    # Consecutive failed checkpoints (checkpoint storage unwritable, a checkpoint timing out) the job rides out
    # without failing over (execution.checkpointing.tolerable-failed-checkpoints, Flink's default 0); -1: any
    # number. A restart cannot mend the storage, and restores from it, so the job keeps training and checkpoints
    # again when the storage returns; failed checkpoints show in the REST API and metrics.
    tolerable_failed_checkpoints: int = -1
    connector_jar: str = ""  # empty: the jar fetched by deploy/jars.py
    udf_jar: str = ""  # the job's Java SQL function (flink_job/flink/jvm); empty: built by deploy/jars.py
    job_name: str = "streamrec"
    # Further Flink configuration entries, applied after the job's own (``{"taskmanager.memory.network.max": "256m"}``).
    # A value may be, or hold, a ${env:NAME} or ${file:PATH} reference, resolved only into the job's Flink
    # configuration; values of secret keys (flink_job.secrets.is_redacted) are hidden in logs and repr.
    options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.python_execution_mode not in ("process", "thread"):
            raise ValueError(f"config: flink.python_execution_mode is process or thread, got {self.python_execution_mode!r}")
        if self.state_snapshot_interval_ms < 0:
            raise ValueError(f"config: flink.state_snapshot_interval_ms must be >= 0, got {self.state_snapshot_interval_ms}")
        if self.state_chunk_bytes < 1:
            raise ValueError(f"config: flink.state_chunk_bytes must be >= 1, got {self.state_chunk_bytes}")
        if not 0 <= self.state_snapshot_share <= 1:
            raise ValueError(f"config: flink.state_snapshot_share must be in [0, 1], got {self.state_snapshot_share}")
        if self.tolerable_failed_checkpoints < -1:
            raise ValueError(f"config: flink.tolerable_failed_checkpoints must be >= 0, or -1 for any number, "
                             f"got {self.tolerable_failed_checkpoints}")
        if not isinstance(self.options, dict):
            raise ValueError(f"config: flink.options must be a mapping of Flink settings, got {type(self.options).__name__}")
        for key, value in self.options.items():
            try:
                secrets.resolve(str(value), str(key), section="flink.options")  # a missing variable or file fails here
            except ValueError as ex:
                raise ValueError(f"config: {ex}") from None

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["options"] = secrets.redacted(self.options)
        return f"FlinkConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def resolved_options(self) -> dict[str, str]:
        """``options`` as strings with their ${env:..}/${file:..} references resolved: for the Flink configuration
        only, never for logs."""
        return {str(k): secrets.resolve(str(v), str(k), section="flink.options") for k, v in self.options.items()}


# What the training stage's behaviour depends on (flink_job.stages.train): a restore replays logged calls under the
# settings they first ran with, which the stage's snapshot records.
STAGE_SECTIONS = ("batch", "clean", "publish", "model", "eval")
PLACEMENT = ("device", "threads")  # model settings of the machine, not of what the stage learns


@dataclass(frozen=True)
class JobConfig:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    flink: FlinkConfig = field(default_factory=FlinkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        p, trainers = self.flink.parallelism, self.flink.trainers
        if p < 1 or trainers < 0:
            raise ValueError(f"config: flink.parallelism must be >= 1 and flink.trainers >= 0 (0: one per subtask), "
                             f"got {p} and {trainers}")
        if trainers and trainers < p:
            raise ValueError(f"config: flink.trainers ({trainers}) must be at least flink.parallelism ({p}): a "
                             f"subtask without a trainer would have nothing to do")
        if self.batch.shards < self.trainer_count:
            raise ValueError(f"config: the number of trainers (flink.trainers, else flink.parallelism) must be at "
                             f"most batch.shards (each trainer owns whole user shards), got {self.trainer_count} "
                             f"and {self.batch.shards}")

    @property
    def trainer_count(self) -> int:
        """User-sharded trainers: ``flink.trainers``, or one per subtask of the trainer operator.

        >>> JobConfig().trainer_count, JobConfig.load(overrides=["flink.parallelism=2"]).trainer_count
        (1, 2)
        >>> JobConfig.load(overrides=["flink.parallelism=2", "flink.trainers=4"]).trainer_count
        4
        """
        return self.flink.trainers or self.flink.parallelism

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
        """Defaults, then the YAML file, then ``STREAMREC__SECTION__KEY`` environment variables, then overrides."""
        env = [f"{k[11:].lower().replace('__', '.')}={v}" for k, v in os.environ.items() if k.startswith("STREAMREC__")]
        return cls._build(config_tree(path, env + list(overrides or [])))

    @classmethod
    def _build(cls, tree: dict[str, dict[str, Any]]) -> JobConfig:
        sections = {f.name: f for f in dataclasses.fields(cls)}
        built = {}
        for section, values in tree.items():
            if section not in sections:
                raise ValueError(f"config: unknown section {section!r} (known: {', '.join(sections)})")
            built[section] = build_section(get_type_hints(cls)[section], section, values)
        return cls(**built)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def stage_settings(self) -> dict[str, dict[str, Any]]:
        """The sections that decide what the training stage does with a call (no secrets among them)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in STAGE_SECTIONS}

    def on_subtask(self, subtask: int, gpus: int) -> JobConfig:
        """This configuration for parallel trainer ``subtask`` on a machine with ``gpus`` GPUs: its model's device
        is ``model.config.subtask_device``'s choice.

        >>> JobConfig().on_subtask(3, 2).model.device, JobConfig().on_subtask(3, 0).model.device
        ('cuda:1', 'auto')
        """
        device = subtask_device(self.model.device, subtask, gpus)
        return dataclasses.replace(self, model=dataclasses.replace(self.model, device=device))

    def with_stage_settings(self, settings: dict[str, dict[str, Any]]) -> JobConfig:
        """This configuration with the stage's sections as ``stage_settings`` returned them, perhaps in an older
        version: keys this version does not know are left out, keys it added keep this configuration's values, and
        the flat model keys of older versions count as the nested ones they became.

        >>> old = JobConfig.load(overrides=["model.optimizer.lr=0.5"]).stage_settings()
        >>> old["model"]["retired_key"] = 1
        >>> new = JobConfig.load(overrides=["model.optimizer.lr=0.1", "batch.size=7"])
        >>> new.with_stage_settings(old).model.optimizer.lr
        0.5
        """
        sections = {}
        for name in STAGE_SECTIONS:
            recorded = settings.get(name, {})
            sections[name] = replace_known(getattr(self, name), nest(recorded) if name == "model" else recorded)
        # Where the stage runs is this run's choice, not the recording's: a checkpoint written on a GPU (or by
        # another subtask's GPU) is restored on whatever this machine has.
        here = {key: getattr(self.model, key) for key in PLACEMENT}
        sections["model"] = dataclasses.replace(sections["model"], **here)
        return dataclasses.replace(self, **sections)
