"""Fetches the JVM artifacts pinned in ``deploy/pom.xml`` from Maven Central into ``deploy/.jars/``.

    python -m deploy.jars          # both sets, skipping those already present
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)
DEPLOY = Path(__file__).resolve().parent
POM = DEPLOY / "pom.xml"
JARS = DEPLOY / ".jars"
PROFILES = ("kafka", "flink")
CONNECTOR_JAR_ENV = "STREAMREC_CONNECTOR_JAR"


def pinned(prop: str) -> str:
    """A version property of the pom, e.g. ``kafka.version``."""
    m = re.search(rf"<{re.escape(prop)}>([^<]+)</{re.escape(prop)}>", POM.read_text())
    if not m:
        raise ValueError(f"jars: {POM} has no property {prop}")
    return m.group(1)


def fetch(profile: str) -> Path:
    """Resolves one profile's jars (with transitive dependencies) into ``deploy/.jars/<profile>/``."""
    if profile not in PROFILES:
        raise ValueError(f"jars: unknown profile {profile!r}, expected one of {PROFILES}")
    out = JARS / profile
    marker = out / ".complete"
    if marker.exists() and marker.read_text() == POM.read_text():
        return out
    if not shutil.which("mvn"):
        raise RuntimeError("jars: Maven (mvn) is not on PATH; install it (apt-get install maven)")
    shutil.rmtree(out, ignore_errors=True)
    log.info("jars: resolving profile %s from Maven Central into %s", profile, out)
    subprocess.run(
        ["mvn", "-q", "-B", "-f", str(POM), f"-P{profile}", "dependency:copy-dependencies",
         f"-DoutputDirectory={out}", "-DincludeScope=runtime"],
        check=True,
    )
    marker.write_text(POM.read_text())
    return out


def kafka_classpath() -> str:
    return str(fetch("kafka") / "*")


def connector_jar() -> Path:
    """The pinned Kafka connector jar, fetched on first use; ``$STREAMREC_CONNECTOR_JAR`` if set (a job client
    running away from the project's files, see ``deploy.cluster.SessionCluster.submit``)."""
    given = os.environ.get(CONNECTOR_JAR_ENV)
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"jars: ${CONNECTOR_JAR_ENV} names {given}, which is not a file")
        return Path(given)
    name = f"flink-sql-connector-kafka-{pinned('flink.kafka.connector.version')}.jar"
    jar = fetch("flink") / name
    if not jar.exists():
        raise FileNotFoundError(f"jars: {jar} missing after resolving the flink profile")
    return jar


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for profile in PROFILES:
        print(fetch(profile))
    print(connector_jar())


if __name__ == "__main__":
    sys.exit(main())
