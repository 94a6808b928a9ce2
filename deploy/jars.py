"""Fetches the JVM artifacts pinned in ``deploy/pom.xml`` from Maven Central into ``deploy/.jars/``, and builds the
job's own SQL function (``flink_job/flink/jvm``) against the installed Flink.

    python -m deploy.jars          # both sets and the function's jar, skipping those already present
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from flink_job.flink.job import CONNECTOR_JAR_ENV, UDF_JAR_ENV

log = logging.getLogger(__name__)
DEPLOY = Path(__file__).resolve().parent
POM = DEPLOY / "pom.xml"
JARS = DEPLOY / ".jars"
PROFILES = ("kafka", "flink")
UDF_SOURCES = DEPLOY.parent / "flink_job" / "flink" / "jvm"


def flink_home() -> Path:
    """The Flink distribution inside the pyflink package (bin/, conf/, lib/, opt/), found without importing it."""
    spec = importlib.util.find_spec("pyflink")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("jars: pyflink is not installed in this Python environment")
    return Path(next(iter(spec.submodule_search_locations)))


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


def _jar_from_env(name: str) -> Path | None:
    """The jar the environment variable ``name`` names, if it is set; an error if it names no file."""
    given = os.environ.get(name)
    if not given:
        return None
    if not Path(given).is_file():
        raise FileNotFoundError(f"jars: ${name} names {given}, which is not a file")
    return Path(given)


def connector_jar() -> Path:
    """The pinned Kafka connector jar, fetched on first use; ``$STREAMREC_CONNECTOR_JAR`` if set (a job client
    running away from the project's files, see ``deploy.cluster.SessionCluster.submit``)."""
    given = _jar_from_env(CONNECTOR_JAR_ENV)
    if given:
        return given
    name = f"flink-sql-connector-kafka-{pinned('flink.kafka.connector.version')}.jar"
    jar = fetch("flink") / name
    if not jar.exists():
        raise FileNotFoundError(f"jars: {jar} missing after resolving the flink profile")
    return jar


def udf_jar() -> Path:
    """The jar of the job's Java SQL functions and Kafka partitioner, compiled on first use against the jars of the
    installed Flink (so it matches the Flink it runs in) and the Kafka connector into ``deploy/.jars/udf/``, named
    by a hash of its sources; ``$STREAMREC_UDF_JAR`` if set (a job client away from the project's files, or an image
    that built it already)."""
    given = _jar_from_env(UDF_JAR_ENV)
    if given:
        return given
    sources = sorted(UDF_SOURCES.rglob("*.java"))
    if not sources:
        raise FileNotFoundError(f"jars: no Java sources under {UDF_SOURCES}")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    jar = JARS / "udf" / f"streamrec-udf-{digest}.jar"
    if jar.exists():
        return jar
    javac = shutil.which("javac")
    if not javac:
        raise RuntimeError("jars: javac is not on PATH; the job's SQL function needs a JDK (apt-get install openjdk-17-jdk)")
    jar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=jar.parent) as tmp:
        classes = Path(tmp) / "classes"
        # The Kafka connector for the item-delta sink's partitioner (streamrec.SenderPartitioner).
        classpath = os.pathsep.join([str(flink_home() / "lib" / "*"), str(connector_jar())])
        subprocess.run([javac, "--release", "17", "-nowarn", "-cp", classpath,
                        "-d", str(classes), *map(str, sources)], check=True)
        part = Path(tmp) / jar.name
        with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\r\n\r\n")
            for f in sorted(classes.rglob("*.class")):
                z.write(f, f.relative_to(classes).as_posix())
        part.replace(jar)  # whole or absent, also for a second process building the same jar
    log.info("jars: built %s", jar)
    return jar


def export_job_jars() -> dict[str, str]:
    """Resolves both jars and puts them into this process's environment, where a job started from here
    (``flink_job.flink.runner.LocalJob``, ``flink run``'s client) reads them; variables already set are kept.
    Returns the two variables."""
    for name, resolve in ((CONNECTOR_JAR_ENV, connector_jar), (UDF_JAR_ENV, udf_jar)):
        if not os.environ.get(name):
            os.environ[name] = str(resolve())
    return {name: os.environ[name] for name in (CONNECTOR_JAR_ENV, UDF_JAR_ENV)}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for profile in PROFILES:
        print(fetch(profile))
    print(connector_jar())
    print(udf_jar())


if __name__ == "__main__":
    sys.exit(main())
