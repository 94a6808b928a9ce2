"""Entry point of the streaming job, for a local mini-cluster and for ``flink run``.

    python -m flink_job --set kafka.bootstrap=127.0.0.1:9092 --set batch.size=4096
    python -m deploy.cluster submit -- --config job.yaml    # flink run -pym flink_job -pyfs <code zip> ...
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from flink_job.config import JobConfig

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flink_job", description="Streaming recommender embedding trainer")
    p.add_argument("--config", type=Path, default=None, help="YAML file with sections kafka, batch, clean, flink, model")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting (repeatable)")
    return p.parse_args(argv)


def create_env(cfg: JobConfig):  # type: ignore[no-untyped-def]
    from pyflink.datastream import StreamExecutionEnvironment

    from deploy.jars import connector_jar, udf_jar
    from flink_job.topology import build, flink_configuration
    from flink_job import worker

    worker.tune()  # a local run's Python worker runs in this process (PyFlink's loopback mode)
    jars = [Path(cfg.flink.connector_jar) if cfg.flink.connector_jar else connector_jar(),
            Path(cfg.flink.udf_jar) if cfg.flink.udf_jar else udf_jar()]
    env = StreamExecutionEnvironment.get_execution_environment(flink_configuration(cfg, jars))
    build(env, cfg)
    return env


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = JobConfig.load(args.config, args.overrides)
    log.info("job config: %s", cfg)
    from flink_job.topology import submitted_by_flink

    log.info("job: %s", "submitted by Flink's client" if submitted_by_flink() else "a local run on a mini-cluster")
    create_env(cfg).execute(cfg.flink.job_name)


if __name__ == "__main__":
    main()
