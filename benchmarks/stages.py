"""Where the time goes: the JVM stages of the job alone, each run to a blackhole sink over the same pre-filled
topic, timed from submission to the end of the bounded input (start-up included, reported apart by the
``source`` row, which does nothing but read).

    python -m benchmarks.stages --topic bench.input.1000000.7.2 --port 19492

Run ``benchmarks.throughput --keep`` first: it pre-fills the topic and leaves its broker running (stop it after
with ``python -m deploy.kafka stop --port 19492 --run-dir .run/bench-kafka``). This command starts no broker.
"""
from __future__ import annotations

import argparse
import json
import time

from pyflink.datastream import StreamExecutionEnvironment
from pyflink.table import StreamTableEnvironment

from deploy.jars import connector_jar, udf_jar
from flink_job.flink import sql
from flink_job.config import JobConfig
from flink_job.flink.topology import flink_configuration

STAGES = {
    "source": "INSERT INTO sink SELECT payload FROM raw_events",
    "ids": "INSERT INTO sink SELECT CONCAT(dedup_key, line) FROM keyed_events",
    "dedup": "INSERT INTO sink SELECT line FROM deduped_events",
    "chunks": "INSERT INTO sink SELECT CAST(CARDINALITY(chunk.lines) AS STRING) FROM "
    "event_chunks",
}


def run_stage(cfg: JobConfig, stage: str) -> float:
    env = StreamExecutionEnvironment.get_execution_environment(flink_configuration(cfg, [connector_jar(), udf_jar()]))
    t_env = StreamTableEnvironment.create(env)
    sql.register_functions(t_env)
    t_env.execute_sql(sql.source_ddl(cfg, bounded=True))
    for view in sql.chunk_views(cfg):
        t_env.execute_sql(view)
    t_env.execute_sql("CREATE TEMPORARY TABLE sink (v STRING) WITH ('connector' = 'blackhole')")
    start = time.monotonic()
    t_env.execute_sql(STAGES[stage]).wait()
    return time.monotonic() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topic", required=True)
    p.add_argument("--port", type=int, default=19492)
    p.add_argument("--stages", nargs="*", default=list(STAGES))
    args = p.parse_args()
    for stage in args.stages:
        cfg = JobConfig.load(overrides=[f"kafka.bootstrap=127.0.0.1:{args.port}", f"kafka.input_topic={args.topic}",
                                        f"kafka.group_id=stages-{stage}-{time.time_ns()}"])
        print(json.dumps({"stage": stage, "seconds": round(run_stage(cfg, stage), 2)}), flush=True)


if __name__ == "__main__":
    main()
