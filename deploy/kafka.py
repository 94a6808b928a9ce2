"""A single-node KRaft Kafka broker on 127.0.0.1, run from the Maven-fetched jars, data under ``.run/kafka``.

    python -m deploy.kafka start [--port 9092]     # leaves the broker running, in the background, until `stop`
    python -m deploy.kafka create-topics [--partitions 2]
    python -m deploy.kafka status | stop [--run-dir DIR]

Commands that need a broker only while they run use ``with broker.running(keep=...)``: it stops the broker when
the command ends, on an error, Ctrl-C or SIGTERM too, unless asked to keep it.
"""
from __future__ import annotations

import argparse
import base64
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from deploy.jars import kafka_classpath
from flink_job.secrets import write_private

log = logging.getLogger(__name__)
PROJECT = Path(__file__).resolve().parent.parent
RUN_DIR = PROJECT / ".run" / "kafka"

LOG4J = """status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = %d %p %c{{1}}: %m%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = warn
logger.apache.name = org.apache.kafka
logger.apache.level = warn
"""


@dataclass(frozen=True)
class Broker:
    port: int = 9092
    controller_port: int = 9093
    run_dir: Path = RUN_DIR
    heap: str = "768m"
    # A second listener, SASL_PLAINTEXT with the PLAIN mechanism, on this port (0: none), accepting these
    # (user, password) pairs: for testing the clients' security settings against a real broker. The passwords land
    # in the broker's own server.properties under run_dir, as a broker's JAAS config does.
    sasl_port: int = 0
    sasl_users: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        if not self.sasl_port:
            raise ValueError("kafka: this broker has no SASL listener (sasl_port=0)")
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "broker.pid"

    def _listeners(self) -> list[str]:
        """The listener settings: PLAINTEXT (between broker and tools) and CONTROLLER, plus the SASL one if any."""
        plain = f"PLAINTEXT://127.0.0.1:{self.port}"
        controller = f"CONTROLLER://127.0.0.1:{self.controller_port}"
        if not self.sasl_port:
            return [f"listeners={plain},{controller}", f"advertised.listeners={plain}",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"]
        if not self.sasl_users:
            raise ValueError("kafka: a SASL listener needs at least one (user, password) in sasl_users")
        from flink_job.secrets import jaas_quote

        sasl = f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}"
        users = " ".join(f'user_{name}="{jaas_quote(pw)}"' for name, pw in self.sasl_users)
        return [
            f"listeners={plain},{sasl},{controller}", f"advertised.listeners={plain},{sasl}",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
            "sasl.enabled.mechanisms=PLAIN",
            # A .properties file reads backslashes as escapes: the JAAS line's own escapes are escaped once more.
            "listener.name.sasl_plaintext.plain.sasl.jaas.config="
            + f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};".replace("\\", "\\\\"),
        ]

    def properties(self) -> str:
        return "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}",
                *self._listeners(),
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                f"log.dirs={self.run_dir / 'data'}",
                "num.partitions=1",
                "auto.create.topics.enable=false",
                "offsets.topic.replication.factor=1",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                # Flink's exactly-once sink asks for 1 h transactions by default; allow it (broker default: 15 min).
                "transaction.max.timeout.ms=3600000",
                "log.cleaner.min.compaction.lag.ms=0",
            ]
        ) + "\n"

    def running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None

    def start(self, timeout_s: float = 60.0) -> None:
        """Formats storage on first use, starts the broker in the background and waits until it answers."""
        if self.running_pid():
            log.info("kafka: already running on %s", self.bootstrap)
            return
        if _port_open(self.port):
            raise RuntimeError(f"kafka: port {self.port} is taken by another process; pick another with --port")
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        props = self.run_dir / "server.properties"
        write_private(props, self.properties())  # it holds the SASL users' passwords
        (self.run_dir / "log4j2.properties").write_text(LOG4J.format(log_file=self.run_dir / "broker.log"))
        cp = kafka_classpath()
        java = shutil.which("java") or "java"
        if not (self.run_dir / "data" / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
            subprocess.run(
                # "--cluster-id=<id>" in one argument: a random id may start with "-", which the tool's argument
                # parser would take for an option (it did, once in 64 runs).
                [java, "-cp", cp, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(props),
                 "--standalone"],
                check=True, stdout=subprocess.DEVNULL,
            )
        out = open(self.run_dir / "broker.out", "ab")
        proc = subprocess.Popen(
            [java, f"-Xmx{self.heap}", f"-Dlog4j2.configurationFile={self.run_dir / 'log4j2.properties'}",
             "-cp", cp, "kafka.Kafka", str(props)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"kafka: broker exited with {proc.returncode}; see {self.run_dir / 'broker.out'}")
            if _port_open(self.port) and self._answers():
                log.info("kafka: broker up on %s (pid %d)", self.bootstrap, proc.pid)
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"kafka: broker did not answer on {self.bootstrap} within {timeout_s}s")

    def _answers(self) -> bool:
        from confluent_kafka.admin import AdminClient

        try:
            AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=2)
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False

    def stop(self, timeout_s: float = 30.0) -> None:
        pid = self.running_pid()
        if pid is None:
            return
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.running_pid():
            _reap(pid)  # a broker started by this process stays a zombie (still "alive" to kill 0) until reaped
            time.sleep(0.2)
        if self.running_pid():
            os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        log.info("kafka: broker stopped")

    @contextmanager
    def running(self, keep: bool = False, timeout_s: float = 60.0) -> Iterator[Broker]:
        """``with broker.running(keep=args.keep):`` the broker is up inside the block and stopped when the block
        ends: normally, on an exception, on Ctrl-C and on SIGTERM/SIGHUP. Kept running with ``keep``; a broker
        that was already running is someone else's (a ``start``, a kept run) and is left as it was found."""
        ours = self.running_pid() is None
        with signals_as_exit():
            try:
                self.start(timeout_s)
                yield self
            finally:
                if not ours:
                    log.info("kafka: leaving the broker on %s running, as it was found", self.bootstrap)
                elif keep:
                    log.info("kafka: keeping the broker on %s; stop it with python -m deploy.kafka stop --port %d "
                             "--run-dir %s", self.bootstrap, self.port, self.run_dir)
                else:
                    self.stop()


@contextmanager
def signals_as_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit inside the block, so that its ``finally`` clauses run (Python's default
    for them is to die at once, leaving background brokers behind). Outside the main thread: nothing to do, since
    only the main thread receives signals."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, exit_on) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its own parent reaps it


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def create_topics(bootstrap: str, topics: dict[str, dict[str, str]], partitions: int = 1,
                  security: dict[str, str] | None = None) -> None:
    """Creates the topics that do not exist yet; ``topics`` maps a name to its topic configs.

    ``security``: librdkafka settings for a secured cluster, ``KafkaConfig.librdkafka_properties()``.
    """
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap, **(security or {})})
    existing = set(admin.list_topics(timeout=10).topics)
    new = [NewTopic(name, partitions, 1, config=conf) for name, conf in topics.items() if name not in existing]
    if not new:
        return
    for name, fut in admin.create_topics(new, operation_timeout=30).items():
        fut.result()
        log.info("kafka: created topic %s", name)
    wait_for_leaders(admin, [t.topic for t in new])


def wait_for_leaders(admin: Any, topics: list[str], timeout_s: float = 30.0) -> None:
    """Until every partition of ``topics`` has a leader. A topic is created before its partitions have one, and a
    reader that looks it up in between sees no partitions: a consumer assigned to them then read nothing, ever."""
    deadline = time.monotonic() + timeout_s
    while True:
        meta = admin.list_topics(timeout=10).topics
        waiting = [name for name in topics
                   if name not in meta or meta[name].error is not None or not meta[name].partitions
                   or any(p.leader < 0 for p in meta[name].partitions.values())]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"kafka: topics without a leader after {timeout_s:.0f}s: {waiting}")
        time.sleep(0.1)


def job_topics(cfg: object) -> dict[str, dict[str, str]]:
    """The job's topics and their configs: the embeddings topic is compacted (a changelog of the latest vectors);
    user-sharded trainers (more than one: ``flink.trainers``, else ``flink.parallelism``) add the item-delta topic."""
    k = cfg.kafka  # type: ignore[attr-defined]
    topics: dict[str, dict[str, str]] = {
        k.input_topic: {},
        k.embeddings_topic: {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1", "segment.ms": "600000"},
        k.dead_letter_topic: {},
        k.stats_topic: {},
    }
    if cfg.trainer_count > 1:  # type: ignore[attr-defined]
        topics[k.item_delta_topic] = {}
    return topics


def main(argv: list[str] | None = None) -> None:
    from flink_job.config import JobConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["start", "stop", "status", "create-topics"],
                   help="start: starts the broker and leaves it running after this command returns, until `stop`")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--controller-port", type=int, default=9093)
    p.add_argument("--run-dir", type=Path, default=RUN_DIR,
                   help="the broker's data and pid file (a benchmark's kept broker: .run/bench-kafka)")
    p.add_argument("--partitions", type=int, default=2, help="partitions of the input topic")
    p.add_argument("--config", type=Path, default=None, help="job config naming the topics")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    broker = Broker(args.port, args.controller_port, args.run_dir.resolve())
    if args.command == "start":
        broker.start()
    elif args.command == "stop":
        broker.stop()
    elif args.command == "status":
        pid = broker.running_pid()
        print(f"running on {broker.bootstrap} (pid {pid})" if pid else "not running")
        sys.exit(0 if pid else 1)
    else:
        cfg = JobConfig.load(args.config, [f"kafka.bootstrap={broker.bootstrap}"])
        topics = job_topics(cfg)
        create_topics(broker.bootstrap, {cfg.kafka.input_topic: topics.pop(cfg.kafka.input_topic)}, args.partitions)
        create_topics(broker.bootstrap, topics, 1)


if __name__ == "__main__":
    main()
