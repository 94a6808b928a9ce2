"""Wires the job: SQL source and de-duplication -> Python training -> Kafka sinks. Does nothing else.

    raw_events (Kafka, raw)          # (payload, partition, offset, proc)
    -> keyed_events                  # (user_id, dedup_key, line)        EVENT_KEY in the JVM
    -> deduped_events                # first of each dedup_key only      Flink's de-duplication operator
    -> event_chunks                  # (k, (shard, [line]))              processing-time window, ARRAY_AGG
    -> keyed in the JVM -> train      # Python, one call per chunk: parse, validate, batch, learn
       -> stage output               # (embeddings {k: v}, dead_letters [v], stats [v], deltas {k: v}), a row a call
          -> UNNEST(embeddings)      # (k, v)                            -> embeddings topic
          -> UNNEST(dead_letters)    # (partition-offset, v)             -> dead-letter topic
          -> UNNEST(stats)           # ("stats", v)                      -> job-stats topic
          -> UNNEST(deltas)          # (trainer:sequence, delta)         -> item-delta topic (T > 1)

With T > 1 trainers (``flink.trainers``, else ``flink.parallelism``) each trainer owns whole user shards (``k`` routes
shard ``s`` to trainer ``s mod T``) and reads the item-delta topic back as its second input, each record once per
trainer other than its sender (docs/sharding.md). They run on ``flink.parallelism`` P subtasks, T / P each. The SQL
part stays one subtask whatever P is: in parallel it de-duplicated and merged the subtasks' outputs per
window, which reordered a user's events inside a chunk.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from pyflink.common import Configuration, Types
from pyflink.datastream import DataStream, KeyedStream, StreamExecutionEnvironment
from pyflink.table import StreamTableEnvironment

from flink_job.flink import sql
from flink_job.config import PROJECT_ROOT, JobConfig
from flink_job.flink.outputs import CHUNK, DELTA, STAGE_OUTPUT
from flink_job.flink.train_function import make_train_function
from flink_job.flink.worker import embedded_python_path

log = logging.getLogger(__name__)
TRAIN = "train"
ONE_TRAINER_MAX_PARALLELISM = 128  # what Flink chose by default for one subtask, which older checkpoints hold
LOCAL_ROCKSDB_MANAGED_MEMORY = "1 gb"  # a local run's managed memory with RocksDB (flink.options can change it)


def flink_configuration(cfg: JobConfig, jars: list[Path]) -> Configuration:
    """``jars``: the Kafka connector and the job's SQL functions, shipped with the job."""
    conf = Configuration()
    settings = {
        "pipeline.name": cfg.flink.job_name,
        "pipeline.jars": ";".join(jar.resolve().as_uri() for jar in jars),
        "pipeline.object-reuse": "true",
        "table.exec.uid.generation": "ALWAYS",  # SQL operators get stable uids from the plan
        "parallelism.default": "1",  # the JVM stages; the trainers run at flink.parallelism (build)
        "python.execution-mode": cfg.flink.python_execution_mode,
        "execution.checkpointing.interval": f"{cfg.flink.checkpoint_interval_ms} ms",
        "execution.checkpointing.storage": "filesystem",
        # Kept when the job is cancelled or fails for good, so it can be restarted from its last checkpoint.
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        "execution.checkpointing.tolerable-failed-checkpoints": str(tolerable_failed_checkpoints(cfg)),
        "state.backend.type": cfg.flink.state_backend,
        "table.exec.state.ttl": f"{cfg.clean.dedup_ttl_s} s",
        "python.fn-execution.bundle.time": str(cfg.flink.bundle_time_ms),
        "restart-strategy.type": "exponential-delay",
        "restart-strategy.exponential-delay.initial-backoff": f"{cfg.flink.restart_initial_backoff_ms} ms",
        "restart-strategy.exponential-delay.max-backoff": f"{cfg.flink.restart_max_backoff_ms} ms",
        "restart-strategy.exponential-delay.backoff-multiplier": "2.0",
        "restart-strategy.exponential-delay.reset-backoff-threshold": "1 h",
        "restart-strategy.exponential-delay.jitter-factor": "0.1",
    }
    if cfg.flink.python_execution_mode == "thread" and not submitted_by_flink():
        # A local run: pemja embeds this interpreter's libpython, which needs this venv's packages on its path.
        settings["python.executable"] = sys.executable
        settings["python.pythonpath"] = embedded_python_path()
    if cfg.flink.state_backend == "rocksdb":
        # A checkpoint uploads only the files written since the last one (the heap backend writes all state each time).
        settings["execution.checkpointing.incremental"] = "true"
        if not submitted_by_flink():
            # RocksDB's memtables and block cache live in managed memory, which a mini-cluster sizes at 128 MB (a
            # cluster's TaskManager: 40% of its memory). There, past ~1.5 million events, each de-duplicated record
            # took ~300 µs in ``RocksDB.get`` and the job fell to ~2,500 events/s; with 1 GB it held ~4,600 over
            # 3,000,000 events (BENCHMARKS.md, 2026-12-07).
            settings["taskmanager.memory.managed.size"] = LOCAL_ROCKSDB_MANAGED_MEMORY
        # Most lookups miss (de-duplication looks up each new event id): a Bloom filter answers them without reading
        # the files' blocks. With 1 GB it cut de-duplication from 53 to 22 µs a record late in a 3,000,000-event run;
        # in the 128 MB cache it made matters worse.
        settings["state.backend.rocksdb.use-bloom-filter"] = "true"
    if cfg.flink.restart_attempts:
        settings["restart-strategy.exponential-delay.attempts-before-reset-backoff"] = str(cfg.flink.restart_attempts)
    if cfg.flink.restore_from:
        settings["execution.state-recovery.path"] = cfg.flink.restore_from
    checkpoints = checkpoint_uri(cfg)
    if checkpoints:
        settings["execution.checkpointing.dir"] = checkpoints
    settings.update(cfg.flink.resolved_options())
    for key, value in settings.items():
        conf.set_string(key, value)
    return conf


def tolerable_failed_checkpoints(cfg: JobConfig) -> int:
    """Flink's count for ``flink.tolerable_failed_checkpoints``: its own "unlimited" is Integer.MAX_VALUE.

    >>> tolerable_failed_checkpoints(JobConfig()), tolerable_failed_checkpoints(JobConfig.load(
    ...     overrides=["flink.tolerable_failed_checkpoints=3"]))
    (2147483647, 3)
    """
    n = cfg.flink.tolerable_failed_checkpoints
    return 2**31 - 1 if n < 0 else n


def submitted_by_flink() -> bool:
    """Whether this program runs under Flink's client (``flink run``, an application cluster): its PythonDriver
    starts the program with the port of the JVM's gateway. FLINK_CONF_DIR says nothing: PyFlink's loopback worker
    sets it, with the rest of the worker's environment, in a process that has run a local job in process mode."""
    return "PYFLINK_GATEWAY_PORT" in os.environ


def checkpoint_uri(cfg: JobConfig) -> str | None:
    """The configured checkpoint directory; unset, a local run uses ``.run/checkpoints`` and a job submitted to a
    cluster keeps the cluster's own ``execution.checkpointing.dir``.
    """
    if cfg.flink.checkpoint_dir:
        return cfg.flink.checkpoint_dir
    if submitted_by_flink():
        return None
    return (PROJECT_ROOT / ".run" / "checkpoints").as_uri()


def build(env: StreamExecutionEnvironment, cfg: JobConfig) -> StreamTableEnvironment:
    """Adds the whole pipeline to ``env``; the caller executes it."""
    t_env = StreamTableEnvironment.create(env)
    sql.register_functions(t_env)
    t_env.execute_sql(sql.source_ddl(cfg))
    trainers = cfg.trainer_count
    keys = route_keys(trainers) if trainers > 1 else None
    for view in sql.chunk_views(cfg, keys):
        t_env.execute_sql(view)

    chunks = key_by_first_field(t_env.to_data_stream(t_env.from_path(sql.CHUNK_VIEW)), CHUNK)  # (shard, [line])
    function = make_train_function(cfg, keys)
    if keys is None:
        trained = chunks.process(function, output_type=STAGE_OUTPUT)
    else:
        t_env.execute_sql(sql.delta_source_ddl(cfg, int(time.time() * 1000)))
        t_env.execute_sql(sql.delta_view(keys))
        deltas = key_by_first_field(t_env.to_data_stream(t_env.from_path(sql.DELTA_VIEW)), DELTA)
        trained = chunks.connect(deltas).process(function, output_type=STAGE_OUTPUT)
    # The trainers' max parallelism is their number: a key group per trainer, which Flink moves whole between
    # subtasks when the job is restored at another parallelism, and refuses to restore at another number of trainers
    # (each holds its own users' rows). One trainer keeps Flink's default for one, 128.
    trained = (trained.name(TRAIN).uid(TRAIN).set_parallelism(cfg.flink.parallelism)
               .set_max_parallelism(trainers if trainers > 1 else ONE_TRAINER_MAX_PARALLELISM))
    # (embeddings: {key: bytes}, dead_letters: [json], stats: [json], deltas: {key: bytes})

    t_env.create_temporary_view("stage_output", t_env.from_data_stream(trained))
    sinks = {  # table: (topic, value type); embeddings may be binary records (publish.format)
        "embeddings_sink": (cfg.kafka.embeddings_topic, "BYTES"),
        "dead_letter_sink": (cfg.kafka.dead_letter_topic, "STRING"),
        "stats_sink": (cfg.kafka.stats_topic, "STRING"),
    }
    if keys is not None:
        sinks["item_delta_sink"] = (cfg.kafka.item_delta_topic, "BYTES")
    for table, (topic, value_type) in sinks.items():
        # A receiver applies each sender's deltas in sequence order, so they must keep it: one partition per
        # sender, whatever the topic's partitions and whichever subtask runs the sender (SENDER_PARTITIONER).
        partitioner = sql.SENDER_PARTITIONER if table == "item_delta_sink" else None
        t_env.execute_sql(sql.sink_ddl(cfg, table, topic, value_type, partitioner))

    statements = t_env.create_statement_set()
    statements.add_insert_sql(
        "INSERT INTO embeddings_sink SELECT e.k, e.v FROM stage_output CROSS JOIN UNNEST(embeddings) AS e(k, v)"
    )
    statements.add_insert_sql(
        "INSERT INTO dead_letter_sink SELECT CONCAT(JSON_VALUE(d.v, '$.partition'), '-', JSON_VALUE(d.v, '$.offset')), d.v"
        " FROM stage_output CROSS JOIN UNNEST(dead_letters) AS d(v)"
    )
    statements.add_insert_sql("INSERT INTO stats_sink SELECT 'stats', s FROM stage_output CROSS JOIN UNNEST(stats) AS t(s)")
    if keys is not None:
        statements.add_insert_sql(
            "INSERT INTO item_delta_sink SELECT d.k, d.v FROM stage_output CROSS JOIN UNNEST(deltas) AS d(k, v)"
        )
    statements.attach_as_datastream()
    return t_env


def route_keys(trainers: int) -> list[int]:
    """For each trainer i, the smallest key ``k`` in key group i when the trainers' max parallelism is their number
    (``KeyGroupRangeAssignment``, on the key ``KeyByKeySelector`` makes of ``k``): user shards spread evenly over the
    trainers rather than as their hashes fall, and trainer i runs on subtask ``i * P // trainers`` at any
    parallelism P."""
    from pyflink.java_gateway import get_gateway

    jvm = get_gateway().jvm
    selector = jvm.KeyByKeySelector()
    assignment = jvm.org.apache.flink.runtime.state.KeyGroupRangeAssignment
    keys: dict[int, int] = {}
    k = 0
    while len(keys) < trainers:
        row = jvm.org.apache.flink.types.Row(2)
        row.setField(0, k)
        keys.setdefault(assignment.assignKeyToParallelOperator(selector.getKey(row), trainers, trainers), k)
        k += 1
    return [keys[i] for i in range(trainers)]


def key_by_first_field(stream: DataStream, value_type: Any) -> KeyedStream:
    """Keys a ``(k INT, value ROW)`` stream from SQL by ``k`` inside the JVM.

    ``DataStream.key_by`` would run a Python key selector that receives and returns every chunk, a second trip
    of all the data through a Python worker. Instead the stream gets the row type PyFlink's keyed operators
    expect and Flink's own ``KeyByKeySelector`` (the one ``key_by`` uses after its Python step) keys it.
    """
    from pyflink.java_gateway import get_gateway

    gateway = get_gateway()
    stream._j_data_stream.getTransformation().setOutputType(Types.ROW([Types.INT(), value_type]).get_java_type_info())
    j_keyed = stream._j_data_stream.keyBy(gateway.jvm.KeyByKeySelector(), Types.ROW([Types.INT()]).get_java_type_info())
    return KeyedStream(j_keyed, value_type, stream)
