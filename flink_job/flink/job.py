"""Entry point of the streaming job, for a local mini-cluster and for ``flink run``.

    python -m flink_job --set kafka.bootstrap=127.0.0.1:9092 --set batch.size=4096
    python -m deploy.cluster submit -- --config job.yaml    # flink run -pym flink_job -pyfs <code zip> ...
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from flink_job.config import JobConfig

log = logging.getLogger(__name__)
# The job's two jars come from its configuration or from these variables, which whoever starts the job sets
# (deploy.jars resolves them; flink_job never imports deploy, which is not shipped to the cluster).
CONNECTOR_JAR_ENV = "STREAMREC_CONNECTOR_JAR"
UDF_JAR_ENV = "STREAMREC_UDF_JAR"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flink_job", description="Streaming recommender embedding trainer")
    p.add_argument("--config", type=Path, default=None, help="YAML file with sections kafka, batch, clean, flink, model")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting (repeatable)")
    return p.parse_args(argv)


def create_env(cfg: JobConfig):  # type: ignore[no-untyped-def]
    from pyflink.datastream import StreamExecutionEnvironment

    from flink_job.flink import worker
    from flink_job.flink.topology import build, flink_configuration

    jars = job_jars(cfg)
    worker.tune()  # a local run's Python worker runs in this process (PyFlink's loopback mode)
    env = StreamExecutionEnvironment.get_execution_environment(flink_configuration(cfg, jars))
    build(env, cfg)
    return env


def job_jars(cfg: JobConfig) -> list[Path]:
    """The Kafka connector jar and the job's SQL function jar: ``flink.connector_jar``/``flink.udf_jar`` if set,
    else ``$STREAMREC_CONNECTOR_JAR``/``$STREAMREC_UDF_JAR``; a clear error if neither names one."""
    return [_jar(cfg.flink.connector_jar, "flink.connector_jar", CONNECTOR_JAR_ENV),
            _jar(cfg.flink.udf_jar, "flink.udf_jar", UDF_JAR_ENV)]


def _jar(configured: str, key: str, env: str) -> Path:
    if configured:
        return Path(configured)
    given = os.environ.get(env)
    if not given:
        raise ValueError(f"job: no jar for {key}: set it in the job's configuration or set ${env}; "
                         f"`python -m deploy.jars` fetches and builds the jars and prints their paths")
    if not Path(given).is_file():
        raise FileNotFoundError(f"job: ${env} names {given}, which is not a file")
    return Path(given)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = JobConfig.load(args.config, args.overrides)
    log.info("job config: %s", cfg)
    from flink_job.flink.topology import submitted_by_flink

    log.info("job: %s", "submitted by Flink's client" if submitted_by_flink() else "a local run on a mini-cluster")
    create_env(cfg).execute(cfg.flink.job_name)


if __name__ == "__main__":
    main()
