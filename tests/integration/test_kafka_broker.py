"""A real broker started by a tool is stopped when the tool ends (deploy.kafka.Broker.running), unless asked to keep
it; one that was running before is left running."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from deploy.kafka import Broker


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the listener and the controller)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def test_a_broker_started_for_a_block_stops_with_it_even_on_an_error(tmp_path: Path) -> None:
    port = _free_port_pair()
    broker = Broker(port, port + 1, tmp_path / "broker")
    try:
        with pytest.raises(KeyboardInterrupt), broker.running():
            assert broker.running_pid() is not None
            raise KeyboardInterrupt  # Ctrl-C in the middle of a benchmark
        assert broker.running_pid() is None
    finally:
        broker.stop()


def test_keep_leaves_it_running_and_a_broker_running_before_is_left_alone(tmp_path: Path) -> None:
    port = _free_port_pair()
    broker = Broker(port, port + 1, tmp_path / "broker")
    try:
        with broker.running(keep=True):
            pid = broker.running_pid()
        assert pid is not None and broker.running_pid() == pid
        with broker.running():  # already up: not this block's to stop
            pass
        assert broker.running_pid() == pid
    finally:
        broker.stop()
    assert broker.running_pid() is None
