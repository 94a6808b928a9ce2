"""What a benchmark samples while the job runs: resident memory of a process tree and the largest checkpoint
directory, from /proc and the file system (psutil is not in the venv).

>>> tree_rss(os.getpid())[os.getpid()] > 0
True
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from deploy.processes import parent_map

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> dict[int, int]:
    """Resident bytes of ``root`` and each of its descendants, by pid (processes that end meanwhile are skipped)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_map().items():
        children.setdefault(ppid, []).append(pid)
    rss: dict[int, int] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            rss[pid] = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        todo.extend(children.get(pid, []))
    return rss


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (files removed meanwhile, as Flink removes old checkpoints, are skipped)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def largest_checkpoint(root: Path) -> int:
    """Bytes of the largest ``chk-N`` directory under ``root`` (``<job id>/chk-N``), 0 if there is none yet.
    Shared state (``shared/``, incremental checkpoints) is not counted."""
    return max((dir_bytes(chk) for chk in root.glob("*/chk-*")), default=0)


class Sampler:
    """``with Sampler(pid, checkpoints) as s:`` samples every ``interval_s`` in a thread; ``s.figures()`` gives
    the peaks: RSS of the root process, of its descendants, of all together, and the largest checkpoint directory."""

    def __init__(self, root: int, checkpoints: Path | None = None, interval_s: float = 1.0) -> None:
        self.root, self.checkpoints, self.interval_s = root, checkpoints, interval_s
        self.peak = {"rss_self": 0, "rss_children": 0, "rss_total": 0, "checkpoint_dir": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        rss = tree_rss(self.root)
        own = rss.pop(self.root, 0)
        now = {"rss_self": own, "rss_children": sum(rss.values()), "rss_total": own + sum(rss.values())}
        if self.checkpoints is not None:
            now["checkpoint_dir"] = largest_checkpoint(self.checkpoints)
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def figures(self) -> dict[str, Any]:
        return {f"peak_{k}_mb": round(v / 2**20, 1) for k, v in self.peak.items()} | {"memory_samples": self.samples}
