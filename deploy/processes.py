"""Process control for the session cluster: is a pid alive, signal it, kill a set and wait until it is gone, and
the /proc reads (parents, command lines) that find a TaskManager's Python workers."""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path

log = logging.getLogger("deploy.cluster")  # the cluster's logger, as before the split


def kill_all(pids: list[int], what: str, where: str, timeout_s: float) -> list[int]:
    """``kill -9`` of ``pids`` (processes of kind ``what``), once all are gone; an empty list is an error."""
    if not pids:
        raise RuntimeError(f"cluster: no live {what}{where} to kill")
    for pid in pids:
        send_signal(pid, signal.SIGKILL)
    wait_gone(pids, timeout_s)
    log.info("cluster: killed %s(s) %s", what, pids)
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie still answers kill(0) but is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def send_signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"cluster: processes {[p for p in pids if alive(p)]} outlived SIGKILL")
        time.sleep(0.05)


def parent_map() -> dict[int, int]:
    """pid -> parent pid of every process we can see."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
