"""The session cluster's configuration: its ports, memory and run dir, and the copy of PyFlink's ``conf/`` and
``lib/`` written there with its settings (``FLINK_CONF_DIR``, ``FLINK_LIB_DIR``), so the installed package is never
changed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy.jars import flink_home
from flink_job.secrets import write_private

PROJECT = Path(__file__).resolve().parent.parent
RUN_DIR = PROJECT / ".run" / "flink-cluster"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flink's nested YAML as ``dotted.key: value`` pairs, which Flink 2.x reads just the same.

    >>> flatten({"rest": {"address": "localhost", "port": 8081}, "parallelism.default": 1})
    {'rest.address': 'localhost', 'rest.port': 8081, 'parallelism.default': 1}
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@dataclass(frozen=True)
class ClusterConf:
    rest_port: int = 8081
    rpc_port: int = 6123  # the JobManager's RPC port; the TaskManager's ports are chosen by the OS
    run_dir: Path = RUN_DIR
    slots: int = 4
    jobmanager_memory: str = "1g"
    # Managed memory (40 % of Flink memory) is where the Python workers' memory is budgeted in process mode.
    taskmanager_memory: str = "3g"
    python: str = field(default=sys.executable)  # the venv's python, not resolved: it must keep the venv
    # More Flink settings on top of ``settings()``, e.g. shorter heartbeats so that a killed TaskManager is noticed
    # in seconds rather than after the default 50 s heartbeat timeout (the fault-tolerance tests).
    extra_settings: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir).absolute())  # it ends up in URIs and env vars

    @property
    def conf_dir(self) -> Path:
        return self.run_dir / "conf"

    @property
    def lib_dir(self) -> Path:
        return self.run_dir / "lib"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "log"

    @property
    def worker_launcher(self) -> Path:
        """The workers' ``python.executable``: the venv's python running the worker through ``flink_job.flink.worker``,
        which tunes it first (see that module). The shipped code is on the workers' path when they start."""
        return self.run_dir / "python-worker"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def settings(self) -> dict[str, Any]:
        """What differs from PyFlink's shipped config: loopback only, our ports, small memory, the venv's python."""
        return {
            "jobmanager.rpc.address": "127.0.0.1",
            "jobmanager.rpc.port": self.rpc_port,
            "jobmanager.bind-host": "127.0.0.1",
            "taskmanager.bind-host": "127.0.0.1",
            "taskmanager.host": "127.0.0.1",
            "rest.address": "127.0.0.1",
            "rest.bind-address": "127.0.0.1",
            "rest.port": self.rest_port,
            "jobmanager.memory.process.size": self.jobmanager_memory,
            "taskmanager.memory.process.size": self.taskmanager_memory,
            "taskmanager.memory.managed.fraction": 0.4,
            "taskmanager.numberOfTaskSlots": self.slots,
            "parallelism.default": 1,
            "python.executable": str(self.worker_launcher),
            "python.client.executable": self.python,
            # Thread mode: pemja starts the interpreter behind ``self.python`` inside the TaskManager with that
            # interpreter's default sys.path, which lacks the venv's packages.
            "python.pythonpath": self.site_packages(),
            "env.log.dir": str(self.log_dir),
            "env.pid.dir": str(self.run_dir),
            "io.tmp.dirs": str(self.run_dir / "tmp"),
            "execution.checkpointing.dir": (self.run_dir / "checkpoints").as_uri(),
            "execution.checkpointing.savepoint-dir": (self.run_dir / "savepoints").as_uri(),
            **self.extra_settings,
        }

    def write_conf(self) -> None:
        """A fresh copy of PyFlink's conf/ with ``settings()`` applied; the installed conf/ stays as it is."""
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # logs, conf and checkpoints: the owner's only
        shutil.rmtree(self.conf_dir, ignore_errors=True)
        shutil.copytree(flink_home() / "conf", self.conf_dir)
        conf_file = self.conf_dir / "config.yaml"
        conf = flatten(yaml.safe_load(conf_file.read_text()) or {})
        conf.update(self.settings())
        # Clients, JobManager and TaskManager leave their scratch files in the run dir rather than in /tmp.
        tmpdir = f"-Djava.io.tmpdir={self.run_dir / 'tmp'}"
        conf["env.java.opts.all"] = f"{conf.get('env.java.opts.all', '')} {tmpdir}".strip()
        # Settings reach the daemons through this file, never as -D options on their command lines; Flink hides
        # the values of its secret keys (password, secret, token, ...) when it logs the file.
        write_private(conf_file, yaml.safe_dump(conf, sort_keys=True, width=10_000))
        # lib/ as shipped plus opt/flink-python: the JobManager and TaskManagers need the Python operators on
        # their own class path (Flink's advice for clusters running Python jobs); symlinks, not copies.
        shutil.rmtree(self.lib_dir, ignore_errors=True)
        self.lib_dir.mkdir(parents=True)
        for jar in [*(flink_home() / "lib").glob("*.jar"), *(flink_home() / "opt").glob("flink-python-*.jar")]:
            (self.lib_dir / jar.name).symlink_to(jar)
        (self.conf_dir / "masters").write_text(f"127.0.0.1:{self.rest_port}\n")
        (self.conf_dir / "workers").write_text("127.0.0.1\n")
        for sub in (self.log_dir, self.run_dir / "tmp"):
            sub.mkdir(parents=True, exist_ok=True)
        # Flink also runs python.executable for other things (-c "import pyflink ..."): only the worker is wrapped.
        self.worker_launcher.write_text(
            "#!/bin/sh\n"
            'if [ "$1" = "-m" ] && [ "$2" = "pyflink.fn_execution.beam.beam_boot" ]; then\n'
            f'  exec "{self.python}" -m flink_job.flink.worker "$@"\n'
            "fi\n"
            f'exec "{self.python}" "$@"\n'
        )
        self.worker_launcher.chmod(0o755)


    def site_packages(self) -> str:
        """The venv's package directories, as a path list."""
        out = subprocess.run([self.python, "-c", "import site; print('\\n'.join(site.getsitepackages()))"],
                             check=True, capture_output=True, text=True, timeout=60).stdout
        return os.pathsep.join(out.splitlines())
