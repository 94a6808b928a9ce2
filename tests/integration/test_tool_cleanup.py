"""Commands that start a Kafka broker stop it when they end: normally, on an error, on SIGTERM and on Ctrl-C,
unless run with ``--keep``.

Each command runs as a subprocess with a unique marker in its environment, which every process it starts inherits
(the broker's JVM, PyFlink's gateway JVM with the mini-cluster); afterwards no process may carry the marker and the
broker's port must be closed.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.kafka import Broker
from tests.helpers import PROJECT

pytestmark = pytest.mark.integration

MARKER = "STREAMREC_CLEANUP_TEST"
BENCH_RUN_DIR = PROJECT / ".run" / "bench-kafka"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _free_port_pair() -> int:
    """A port whose pair (broker, controller) is free, away from the test broker's and the benchmarks' defaults."""
    for port in range(19702, 19992, 10):
        if not _port_open(port) and not _port_open(port + 1):
            return port
    raise RuntimeError("tests: no free port pair in 19702..19992 for a command's broker")


@dataclass
class Command:
    """One run of a command: its marker, broker port, run dir and process."""

    tag: str
    port: int
    run_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, module: str, *args: str) -> None:
        env = {**os.environ, MARKER: self.tag}
        with self.log.open("wb") as out:
            # Ctrl-C comes from a terminal, whose commands start with SIGINT at its default; a test run started in
            # the background (``cmd &`` in a script) would otherwise pass on an ignored SIGINT, which Python keeps.
            self.proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(self.port), *args], cwd=PROJECT,
                                         env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_sigint_default)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the command did not end within {timeout_s}s; output:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def processes(self) -> dict[int, str]:
        """The live processes carrying this run's marker (zombies have no readable environment), by pid."""
        marker = f"{MARKER}={self.tag}".encode()
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # gone, or not ours to read
                continue
        return found

    def wait_for(self, what: str, cmdline_part: str, timeout_s: float) -> None:
        """Waits until a process of this run has ``cmdline_part`` in its command line."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(cmdline_part in c for c in self.processes().values()):
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"the command ended ({self.proc.returncode}) before {what} started:\n{self.output()}")
            time.sleep(0.5)
        pytest.fail(f"{what} did not start within {timeout_s}s:\n{self.output()}")

    def assert_nothing_left(self, settle_s: float = 30.0) -> None:
        """No process of the run survives it (a JVM may take a moment to see its parent's pipe close)."""
        deadline = time.monotonic() + settle_s
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = {pid: cmdline[:300] for pid, cmdline in self.processes().items()}
        assert not left, f"processes left running after the command ended: {left}\n{self.output()}"
        assert not _port_open(self.port), f"port {self.port} still open after the command ended"


@pytest.fixture
def command(tmp_path: Path) -> Iterator[Command]:
    """A run of a command on a free port; whatever of it a failing test leaves behind is stopped."""
    if Broker(run_dir=BENCH_RUN_DIR).running_pid():
        pytest.fail(f"a benchmark broker is running from {BENCH_RUN_DIR} (a --keep run?); stop it first with "
                    f"python -m deploy.kafka stop --run-dir {BENCH_RUN_DIR}")
    cmd = Command(uuid.uuid4().hex, _free_port_pair(), BENCH_RUN_DIR, tmp_path / "command.log")
    yield cmd
    if cmd.proc is not None and cmd.proc.poll() is None:
        cmd.proc.kill()
        cmd.proc.wait(30)
    for pid in cmd.processes():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    Broker(cmd.port, cmd.port + 1, cmd.run_dir).pid_file.unlink(missing_ok=True)


def test_finished_benchmark_stops_its_broker(command: Command) -> None:
    """``python -m benchmarks.freshness`` used to leave its broker running after printing its result."""
    command.start("benchmarks.freshness", "--rate", "200", "--seconds", "4", "--warmup", "1",
                  "--set", "flink.checkpoint_interval_ms=2000")
    rc = command.wait(600)
    assert rc == 0, command.output()
    assert '"p50_ms"' in command.output()  # it did measure
    command.assert_nothing_left()


def test_failing_benchmark_stops_its_broker(command: Command) -> None:
    """An error after the broker is up (here a bad override, read once the broker's address is known)."""
    command.start("benchmarks.freshness", "--set", "batch.size=0")
    rc = command.wait(180)
    assert rc == 1, command.output()
    assert "kafka: broker up" in command.output()  # the error came after the broker started
    assert "batch settings must be positive" in command.output()
    command.assert_nothing_left()


def test_keep_leaves_the_broker_running_until_stopped(command: Command) -> None:
    command.start("benchmarks.freshness", "--keep", "--set", "batch.size=0")
    rc = command.wait(180)
    assert rc == 1, command.output()
    broker = Broker(command.port, command.port + 1, command.run_dir)
    assert broker.running_pid() in command.processes(), command.output()
    assert _port_open(command.port)
    assert "--keep" in subprocess.run([sys.executable, "-m", "benchmarks.freshness", "--help"], cwd=PROJECT,
                                      capture_output=True, text=True, check=True).stdout
    # The command the log names stops it.
    subprocess.run([sys.executable, "-m", "deploy.kafka", "stop", "--port", str(command.port),
                    "--run-dir", str(command.run_dir)], cwd=PROJECT, check=True, timeout=60)
    command.assert_nothing_left()


def _ml100k_file(tmp_path: Path) -> Path:
    path = tmp_path / "u.data"
    path.write_text("".join(f"{1 + n % 40}\t{1 + n % 70}\t{1 + n % 5}\t{880000000 + n}\n" for n in range(400)))
    return path


COMMANDS: dict[str, tuple[str, ...]] = {
    "freshness": ("benchmarks.freshness", "--rate", "100", "--seconds", "600"),
    "throughput": ("benchmarks.throughput", "--events", "2000"),
    "ml100k_job": ("benchmarks.ml100k_job", "--data", "{data}"),
    "flood": ("benchmarks.flood", "--mode", "job", "--ids", "2000"),
    "demo": ("deploy.demo", "--events", "2000"),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_sigterm_while_the_job_runs_stops_everything(command: Command, tmp_path: Path, name: str) -> None:
    """SIGTERM (a container stop, ``kill``) once the job runs on the mini-cluster: the broker and the job's JVM go."""
    module, *args = COMMANDS[name]
    command.start(module, *(a.format(data=_ml100k_file(tmp_path)) for a in args))
    command.wait_for("the broker", "kafka.Kafka", 120)
    command.wait_for("the job's JVM", "PythonGatewayServer", 300)
    time.sleep(3)
    assert command.proc is not None
    command.proc.send_signal(signal.SIGTERM)
    rc = command.wait(120)
    assert rc == 128 + signal.SIGTERM, command.output()  # it exited by itself, through its clean-up
    command.assert_nothing_left()


def test_ctrl_c_stops_the_broker(command: Command) -> None:
    command.start("benchmarks.freshness", "--rate", "100", "--seconds", "600")
    command.wait_for("the broker", "kafka.Kafka", 120)
    command.wait_for("the job's JVM", "PythonGatewayServer", 300)
    assert command.proc is not None
    command.proc.send_signal(signal.SIGINT)
    command.wait(120)
    command.assert_nothing_left()
