"""The JVM half of the pipeline, as Flink SQL: Kafka source, de-duplication and chunking.

Per-record work stays in the JVM, several times faster than a Python call per record: the
Kafka source reads raw payloads, ``EVENT_KEY`` (a Java function of the job's, ``flink_job/flink/jvm``) extracts the two
ids that de-duplication keys on in one pass, a ``ROW_NUMBER`` de-duplication keeps the first record of each
``(user_id, event_id)``, and a processing-time tumbling window gathers the survivors into chunks (``ARRAY_AGG``) per user shard. Python
sees one row per chunk, not one call per record.

Each chunk line is ``"<partition>,<offset>,<payload>"``, so the Python side keeps the original bytes
(for dead letters) and the input position (for freshness).

Records without an ``event_id`` or ``user_id`` cannot be de-duplicated; they are keyed by their input position
(so that they are not collapsed into one) and reach Python, which dead-letters them with a reason.
"""
from __future__ import annotations

from typing import Any

from flink_job.config import JobConfig

SOURCE_TABLE = "raw_events"
CHUNK_VIEW = "event_chunks"
DELTA_TABLE = "item_deltas"
DELTA_VIEW = "routed_item_deltas"
EVENT_KEY = "streamrec.EventKey"  # in the jar deploy.jars.udf_jar builds from flink_job/flink/jvm
OTHER_TRAINERS = "streamrec.OtherTrainers"
SENDER_PARTITIONER = "streamrec.SenderPartitioner"  # the item-delta sink's: a partition per sending trainer


def register_functions(t_env: Any) -> None:
    """The job's Java SQL functions; their jar is in ``pipeline.jars``."""
    t_env.create_java_temporary_function("EVENT_KEY", EVENT_KEY)
    t_env.create_java_temporary_function("OTHER_TRAINERS", OTHER_TRAINERS)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def kafka_options(cfg: JobConfig, topic: str) -> dict[str, str]:
    """Connector options shared by every Kafka table (the source and each sink), including the client security
    settings, resolved from their ``${env:..}``/``${file:..}`` references (``KafkaConfig.java_properties``).

    The returned options and the DDL built from them hold secrets: they go to Flink, never to a log.
    """
    opts = {
        "connector": "kafka",
        "topic": topic,
        "properties.bootstrap.servers": cfg.kafka.bootstrap,
    }
    for key, value in cfg.kafka.java_properties().items():
        opts[f"properties.{key}"] = value
    return opts


def _with(opts: dict[str, str]) -> str:
    return ",\n  ".join(f"{_quote(k)} = {_quote(v)}" for k, v in opts.items())


def source_ddl(cfg: JobConfig, bounded: bool = False) -> str:
    """The raw Kafka source. ``bounded`` (benchmarks of the JVM stages only) stops at the latest offsets."""
    start = {"earliest": "earliest-offset", "latest": "latest-offset", "committed": "group-offsets"}
    if cfg.kafka.start_from not in start:
        raise ValueError(f"source: kafka.start_from must be one of {sorted(start)}, got {cfg.kafka.start_from!r}")
    opts = kafka_options(cfg, cfg.kafka.input_topic)
    opts.update(
        {
            "properties.group.id": cfg.kafka.group_id,
            "properties.auto.offset.reset": "earliest",
            "scan.startup.mode": start[cfg.kafka.start_from],
            "format": "raw",
            "raw.charset": "UTF-8",
        }
    )
    if bounded:
        opts["scan.bounded.mode"] = "latest-offset"
    return f"""CREATE TEMPORARY TABLE {SOURCE_TABLE} (
  payload STRING,
  `partition` INT METADATA VIRTUAL,
  `offset` BIGINT METADATA VIRTUAL,
  proc AS PROCTIME()
) WITH (
  {_with(opts)}
)"""


def chunk_views(cfg: JobConfig, route_keys: list[int] | None = None) -> list[str]:
    """Views: ids extracted -> de-duplicated by (user, event id) -> chunked per processing-time window and shard.

    ``route_keys``: of user-sharded trainers, the key that reaches each trainer (``topology.route_keys``); a chunk
    of shard ``s`` goes to trainer ``s mod len(route_keys)``. None: one trainer, key 0."""
    line = "CONCAT_WS(',', CAST(`partition` AS STRING), CAST(`offset` AS STRING), payload)"
    # The de-duplication key is one string, user and event id joined by a unit separator (ids with control
    # characters are dead-lettered by the parser). A record without both ids, or not well-formed, gets its input
    # position as key, so it passes de-duplication alone and reaches Python, which dead-letters it with a reason:
    # one key string instead of a (user, event) pair and no second branch measured 17.2 s -> 14.3 s for this stage
    # on 1M events.
    keyed = f"""CREATE TEMPORARY VIEW keyed_events AS
SELECT SPLIT_INDEX(ids, U&'\\001F', 0) AS user_id,
       COALESCE(ids, CONCAT(U&'\\0000', CAST(`partition` AS STRING), ',', CAST(`offset` AS STRING))) AS dedup_key,
       line, proc
FROM (
  SELECT EVENT_KEY(payload) AS ids, {line} AS line, `partition`, `offset`, proc
  FROM {SOURCE_TABLE}
)"""
    # ROW_NUMBER ... ORDER BY proc ASC with rn = 1 is planned as Flink's keep-first de-duplication operator,
    # whose keyed state expires after table.exec.state.ttl (the de-duplication memory).
    deduped = """CREATE TEMPORARY VIEW deduped_events AS
SELECT user_id, line, proc FROM (
  SELECT user_id, line, proc, ROW_NUMBER() OVER (PARTITION BY dedup_key ORDER BY proc ASC) AS rn
  FROM keyed_events
) WHERE rn = 1"""
    seconds = cfg.batch.chunk_ms / 1000.0
    shard = f"MOD(ABS(HASH_CODE(COALESCE(user_id, ''))), {cfg.batch.shards})"
    # k: the trainer's key, one per trainer; the row is shaped (key, value) so that the JVM can key the stream
    # itself (see topology.key_by_first_field) instead of a Python key selector copying every chunk.
    key = "0" if not route_keys else (
        f"CASE MOD({shard}, {len(route_keys)}) "
        + " ".join(f"WHEN {i} THEN {k}" for i, k in enumerate(route_keys)) + " END")
    chunks = f"""CREATE TEMPORARY VIEW {CHUNK_VIEW} AS
SELECT {key} AS k,
       CAST(ROW({shard}, ARRAY_AGG(line)) AS ROW<shard INT, lines ARRAY<STRING>>) AS chunk
FROM TABLE(TUMBLE(TABLE deduped_events, DESCRIPTOR(proc), INTERVAL '{seconds:.3f}' SECOND))
GROUP BY window_start, window_end, {shard}"""
    return [keyed, deduped, chunks]


def delta_source_ddl(cfg: JobConfig, start_ms: int) -> str:
    """The item-delta topic read back by user-sharded trainers: ``(sender, payload)``, the record key (the sending
    trainer and its sequence) and the encoded delta. Read committed: with ``publish.delivery: exactly_once`` a
    trainer sees another's delta once that one's checkpoint has completed. A new job starts at ``start_ms`` (its
    build time), so the deltas of an earlier job on the same topic are not applied; a restored one where its
    checkpoint was."""
    opts = kafka_options(cfg, cfg.kafka.item_delta_topic)
    opts.update(
        {
            "properties.group.id": f"{cfg.kafka.group_id}-item-deltas",
            "properties.isolation.level": "read_committed",
            "scan.startup.mode": "timestamp",
            "scan.startup.timestamp-millis": str(start_ms),
            "key.format": "raw",
            "key.fields": "sender",
            "value.format": "raw",
            "value.fields-include": "EXCEPT_KEY",
        }
    )
    return f"""CREATE TEMPORARY TABLE {DELTA_TABLE} (
  sender STRING,
  payload BYTES
) WITH (
  {_with(opts)}
)"""


def delta_view(route_keys: list[int]) -> str:
    """Every delta record once per other trainer, keyed by that trainer's route key (``OTHER_TRAINERS``, the job's
    Java table function). One correlated call, so the plan has the same operators whatever the number of trainers:
    one projection per key shifted the generated uids of the sinks after them with the number, and a
    CROSS JOIN UNNEST of a key array was planned as a join against a bounded VALUES input, whose state kept every
    record and whose finished task blocked checkpoints."""
    keys = ",".join(str(k) for k in route_keys)
    return f"""CREATE TEMPORARY VIEW {DELTA_VIEW} AS
SELECT r.k AS k, CAST(ROW(sender, payload) AS ROW<sender STRING, payload BYTES>) AS delta
FROM {DELTA_TABLE}, LATERAL TABLE(OTHER_TRAINERS(sender, '{keys}')) AS r(k)"""


def sink_ddl(cfg: JobConfig, table: str, topic: str, value_type: str = "STRING",
             partitioner: str | None = None) -> str:
    """A Kafka table taking ``(k, v)`` as the record key and value, as they are: ``v`` a string, or ``BYTES`` for the
    embeddings (JSON or binary records, ``publish.format``).

    With ``publish.delivery: exactly_once`` the sink writes in Kafka transactions that commit when a checkpoint
    completes, so a consumer reading committed sees each record once, a checkpoint interval late.
    """
    exactly_once = cfg.publish.delivery == "exactly_once"
    opts = kafka_options(cfg, topic)
    opts.update(
        {
            "key.format": "raw",
            "key.fields": "k",
            "value.format": "raw",
            "value.fields-include": "EXCEPT_KEY",
            "sink.delivery-guarantee": "exactly-once" if exactly_once else "at-least-once",
        }
    )
    if partitioner:  # a Flink name (fixed, round-robin, default) or a class of the job's jars
        opts["sink.partitioner"] = partitioner
    if exactly_once:
        # Unique per topic: two jobs sharing a prefix would fence each other's transactions.
        opts["sink.transactional-id-prefix"] = f"{cfg.flink.job_name}-{topic}"
        opts["properties.transaction.timeout.ms"] = str(cfg.publish.transaction_timeout_ms)
    return f"""CREATE TEMPORARY TABLE {table} (
  k STRING,
  v {value_type}
) WITH (
  {_with(opts)}
)"""
