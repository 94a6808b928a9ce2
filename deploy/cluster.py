"""A standalone Flink session cluster made from the pip-installed PyFlink, configured and logging under ``.run``.

    python -m deploy.cluster start [--port 8081]     # leaves the cluster running, in the background, until `stop`
    python -m deploy.cluster submit [--savepoint PATH] -- --config job.yaml --set batch.size=1024
    python -m deploy.cluster status | cancel JOBID | stop-savepoint JOBID [--dir DIR] | stop

PyFlink's ``conf/`` is copied to ``<run dir>/conf`` and edited there (``FLINK_CONF_DIR``), and ``<run dir>/lib``
links PyFlink's ``lib/`` jars plus ``opt/flink-python`` (``FLINK_LIB_DIR``), so the installed package is never
changed; logs, pid files, temporary files, checkpoints and savepoints stay in the run dir too. Each cluster has its
own run dir and ports, so a development cluster and a test cluster can run side by side.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy.jars import CONNECTOR_JAR_ENV, UDF_JAR_ENV, connector_jar, flink_home, udf_jar
from deploy.kafka import signals_as_exit
from flink_job.secrets import redacted_args, write_private

log = logging.getLogger(__name__)
PROJECT = Path(__file__).resolve().parent.parent
RUN_DIR = PROJECT / ".run" / "flink-cluster"
# The Python packages the job needs on the TaskManagers; shipped with --pyFiles as one zip.
SOURCES = ("flink_job", "model")  # the job imports nothing from deploy
IDENT = "streamrec"  # FLINK_IDENT_STRING: names the pid and log files of the daemons
ENDED = ("FINISHED", "CANCELED", "FAILED")


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


def parse_job_id(output: str) -> str:
    """The job id that ``flink run`` prints.

    >>> parse_job_id("Job has been submitted with JobID 0123456789abcdef0123456789abcdef")
    '0123456789abcdef0123456789abcdef'
    """
    m = re.search(r"JobID ([0-9a-f]{32})", output)
    if not m:
        raise RuntimeError(f"cluster: no job id in the output of flink run:\n{output[-4000:]}")
    return m.group(1)


class RestError(RuntimeError):
    """Flink's REST API answered with an HTTP error."""


@dataclass(frozen=True)
class SessionCluster:
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

    def _env(self) -> dict[str, str]:
        inherited = ("FLINK_HOME", "FLINK_LOG_DIR", "FLINK_PID_DIR", "FLINK_OPT_DIR", "FLINK_PLUGINS_DIR")
        env = {k: v for k, v in os.environ.items() if k not in inherited}  # ours, not another install's
        env.update(FLINK_CONF_DIR=str(self.conf_dir), FLINK_LIB_DIR=str(self.lib_dir), FLINK_IDENT_STRING=IDENT)
        return env

    def site_packages(self) -> str:
        """The venv's package directories, as a path list."""
        out = subprocess.run([self.python, "-c", "import site; print('\\n'.join(site.getsitepackages()))"],
                             check=True, capture_output=True, text=True, timeout=60).stdout
        return os.pathsep.join(out.splitlines())

    def _script(self, name: str, *args: str, timeout_s: float = 120.0,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Runs ``bin/<name>`` against our conf dir (``env``: more variables); raises with its output if it fails."""
        cmd = [str(flink_home() / "bin" / name), *args]
        # A session of its own: the daemons outlive this process and a Ctrl-C meant for it does not reach them.
        res = subprocess.run(cmd, check=False, env={**self._env(), **(env or {})}, cwd=PROJECT, capture_output=True, text=True,
                             timeout=timeout_s, start_new_session=True)
        if res.returncode != 0:
            raise RuntimeError(
                f"cluster: {name} {' '.join(redacted_args(args))} exited with {res.returncode}; logs in {self.log_dir}\n"
                f"{res.stdout[-4000:]}{res.stderr[-4000:]}"
            )
        return res

    def daemon_pids(self) -> list[int]:
        """The live JobManager and TaskManager JVMs of this cluster, from the pid files in the run dir."""
        pids = []
        for pid_file in self.run_dir.glob(f"flink-{IDENT}-*.pid"):
            for line in pid_file.read_text().split():
                if line.isdigit() and _alive(int(line)):
                    pids.append(int(line))
        return pids

    def processes(self) -> list[int]:
        """Every process started for this cluster (JVMs, Python workers, clients): they carry our FLINK_CONF_DIR."""
        marker = f"FLINK_CONF_DIR={self.conf_dir}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                continue
        return found

    # --- TaskManagers and their Python workers (fault injection) ---

    def taskmanager_pids(self) -> list[int]:
        """The live TaskManager JVMs of this cluster."""
        pid_file = self.run_dir / f"flink-{IDENT}-taskexecutor.pid"
        if not pid_file.exists():
            return []
        return [int(p) for p in pid_file.read_text().split() if p.isdigit() and _alive(int(p))]

    def taskmanager_ids(self) -> set[str]:
        """The TaskManagers the JobManager has registered (a killed one stays until its heartbeat times out)."""
        return {tm["id"] for tm in self.rest("GET", "/taskmanagers")["taskmanagers"]}

    def kill_taskmanager(self, timeout_s: float = 10.0) -> list[int]:
        """``kill -9`` every TaskManager JVM of this cluster, as a machine or JVM crash would; returns their pids.

        The Python workers the TaskManager started are not signalled: as after a real crash, they exit when their
        connection to it breaks (none was left behind in the tests; ``stop()`` ends any that linger).
        """
        return _kill(self.taskmanager_pids(), "TaskManager", f" (pid file in {self.run_dir})", timeout_s)

    def start_taskmanager(self, timeout_s: float = 120.0) -> str:
        """Starts one more TaskManager (``bin/taskmanager.sh start``); returns its id once it has registered."""
        before = self.taskmanager_ids()
        self._script("taskmanager.sh", "start")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            new = self.taskmanager_ids() - before
            if new:
                log.info("cluster: TaskManager %s registered", next(iter(new)))
                return next(iter(new))
            time.sleep(0.5)
        raise TimeoutError(f"cluster: the new TaskManager did not register within {timeout_s}s; logs in {self.log_dir}")

    def python_worker_pids(self) -> list[int]:
        """The Python worker processes of the live TaskManagers (process mode): descendants of a TaskManager JVM
        running ``pyflink.fn_execution`` (the ``beam_boot`` launcher and the worker it starts)."""
        parents = _parent_map()
        tms = set(self.taskmanager_pids())
        found = []
        for pid, ppid in parents.items():
            ancestor = ppid
            while ancestor > 1 and ancestor not in tms:
                ancestor = parents.get(ancestor, 0)
            if ancestor in tms and b"pyflink.fn_execution" in _cmdline(pid):
                found.append(pid)
        return sorted(found)

    def kill_python_workers(self, timeout_s: float = 10.0) -> list[int]:
        """``kill -9`` the TaskManagers' Python workers (the TaskManager itself keeps running); returns their pids."""
        return _kill(self.python_worker_pids(), "Python worker", " of a live TaskManager", timeout_s)

    def start(self, timeout_s: float = 120.0) -> None:
        """Starts one JobManager and one TaskManager and waits until the TaskManager has registered."""
        if self.daemon_pids():
            log.info("cluster: already running (%s)", self.rest_url)
            self.wait_ready(timeout_s)
            return
        for port in (self.rest_port, self.rpc_port):
            if _port_open(port):
                raise RuntimeError(f"cluster: port {port} is taken by another process; pick other ports")
        self.write_conf()
        self._script("start-cluster.sh")
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info("cluster: up on %s, logs in %s", self.rest_url, self.log_dir)

    def wait_ready(self, timeout_s: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        overview: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if not self.daemon_pids():
                raise RuntimeError(f"cluster: the Flink daemons exited; see the logs in {self.log_dir}")
            try:
                overview = self.rest("GET", "/overview")
                if overview.get("taskmanagers", 0) >= 1:
                    return overview
            except (OSError, RestError):  # not listening yet, or the REST endpoint is up before the dispatcher
                pass
            time.sleep(1.0)
        raise TimeoutError(
            f"cluster: no TaskManager registered at {self.rest_url} within {timeout_s}s "
            f"(last overview: {overview or 'none'}); see the logs in {self.log_dir}"
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops the daemons with bin/stop-cluster.sh, then ends whatever of ours is still running."""
        if self.conf_dir.exists() and self.daemon_pids():
            try:
                self._script("stop-cluster.sh", timeout_s=timeout_s + 30)
            except (RuntimeError, subprocess.TimeoutExpired) as ex:
                log.warning("cluster: stop-cluster.sh: %s", ex)
        deadline = time.monotonic() + timeout_s
        left = self.processes()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                _signal(pid, sig)
            while left and time.monotonic() < deadline:
                time.sleep(0.2)
                left = [p for p in left if _alive(p)]
            if not left:
                break
            log.warning("cluster: processes %s outlived %s", left, sig.name)
            deadline = time.monotonic() + 5.0
        for pid_file in self.run_dir.glob(f"flink-{IDENT}-*.pid"):
            pid_file.unlink(missing_ok=True)
        log.info("cluster: stopped (%s)", self.rest_url)

    # --- jobs ---

    def package_sources(self) -> Path:
        """The project's Python packages as one zip: Flink unpacks it on each TaskManager and puts it on PYTHONPATH.

        Shipping the project directory itself would ship .venv and .run as well.
        """
        target = self.run_dir / "streamrec-src.zip"
        partial = target.with_suffix(f".{os.getpid()}.partial")  # two submissions at once must not mix files
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
            for package in SOURCES:
                for path in sorted((PROJECT / package).rglob("*.py")):
                    zf.write(path, path.relative_to(PROJECT).as_posix())
        partial.replace(target)
        return target

    def submit(self, job_args: list[str], detached: bool = True, savepoint: str | None = None,
               allow_non_restored: bool = False, archives: Sequence[str] = (), pyexec: str | None = None,
               timeout_s: float = 300.0) -> str:
        """Submits ``python -m flink_job <job_args>`` with ``flink run``; returns the job id.

        ``detached=False`` waits (up to ``timeout_s``) for the job to end, which a streaming job does not do.
        ``archives``: ``-pyarch`` entries, ``path.zip`` or ``path.zip#dir``; Flink extracts each into the Python
        workers' working directory (under ``dir``), so the job reaches their files by relative paths, e.g. a
        warm-start model as ``flink.initial_model=dir/state.npz``, or a whole venv with ``pyexec`` (the workers'
        interpreter, default this cluster's ``worker_launcher``) pointing into it, e.g. ``venv/bin/python``.

        The client runs from the project directory, so it resolves the connector jar and default paths there;
        the job's own config puts that jar into ``pipeline.jars``, which ``flink run`` ships with the job.
        """
        cmd = ["run"]
        if detached:
            cmd.append("-d")
        cmd += ["-m", f"127.0.0.1:{self.rest_port}", "-pym", "flink_job", "-pyfs", str(self.package_sources()),
                "-pyexec", pyexec or str(self.worker_launcher), "-pyclientexec", self.python]
        if archives:
            cmd += ["-pyarch", ",".join(archives)]
        if savepoint:
            cmd += ["-s", savepoint]
            if allow_non_restored:
                cmd.append("-n")
        # The client runs the job's main from a temporary directory when archives are given, where the shipped
        # code has no deploy/.jars: it takes the jars resolved here (jars in the job's config still win).
        private = self.private_job_args(job_args)
        try:
            res = self._script("flink", *cmd, "--", *private, timeout_s=timeout_s,
                               env={CONNECTOR_JAR_ENV: str(connector_jar()), UDF_JAR_ENV: str(udf_jar())})
        finally:
            if private != job_args:  # the job's main has run: its plan, settings included, is on the cluster
                Path(private[1]).unlink(missing_ok=True)
        job_id = parse_job_id(res.stdout + res.stderr)
        log.info("cluster: submitted job %s%s", job_id, f" from {savepoint}" if savepoint else "")
        return job_id

    def private_job_args(self, job_args: list[str]) -> list[str]:
        """``job_args`` with their ``--set`` overrides moved into a configuration file only the owner reads, so that
        no setting (a secret among them) shows on the command lines of ``flink run`` and of the job's client
        process: ``["--config", FILE]``. Without overrides they are returned as they are.

        The file is the ``--config`` file (a relative path is taken from the project directory, where ``flink run``
        runs) with the overrides applied; ``STREAMREC__*`` variables still apply after it in the job process.
        """
        from flink_job.config import JobConfig, config_tree
        from flink_job.flink.job import parse_args

        args = parse_args(job_args)
        if not args.overrides:
            return job_args
        config = None if args.config is None else (args.config if args.config.is_absolute() else PROJECT / args.config)
        JobConfig.load(config, args.overrides)  # a bad setting fails here, with its clear message, before flink run
        path = self.run_dir / "submit" / f"job-{os.getpid()}-{time.monotonic_ns()}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, yaml.safe_dump(config_tree(config, args.overrides)))
        return ["--config", str(path)]

    def rest(self, method: str, path: str, body: dict[str, Any] | None = None, timeout_s: float = 10.0) -> Any:
        """One call of Flink's REST API; JSON in and out."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.rest_url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as ex:
            detail = ex.read().decode(errors="replace")[:2000]
            raise RestError(f"cluster: {method} {path} answered {ex.code}: {detail}") from ex
        return json.loads(raw) if raw else {}

    def jobs(self) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self.rest("GET", "/jobs/overview")["jobs"]
        return jobs

    def job(self, job_id: str) -> dict[str, Any]:
        info: dict[str, Any] = self.rest("GET", f"/jobs/{job_id}")
        return info

    def job_status(self, job_id: str) -> str:
        """``CREATED``, ``RUNNING``, ``FAILED``, ``CANCELED``, ``FINISHED`` ..."""
        return str(self.job(job_id)["state"])

    def wait_running(self, job_id: str, timeout_s: float = 120.0) -> None:
        """Waits until the job and all of its tasks run (the Python workers have started)."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["state"] in ENDED:
                raise RuntimeError(
                    f"cluster: job {job_id} ended as {info['state']}: {self.exception(job_id)}; "
                    f"logs in {self.log_dir}"
                )
            if info["state"] == "RUNNING" and all(v["status"] == "RUNNING" for v in info["vertices"]):
                return
            time.sleep(1.0)
        states = {v["name"][:40]: v["status"] for v in info.get("vertices", [])}
        raise TimeoutError(f"cluster: job {job_id} not running after {timeout_s}s: {info.get('state')} {states}")

    def wait_ended(self, job_id: str, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.job_status(job_id)
            if state in ENDED:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"cluster: job {job_id} still {self.job_status(job_id)} after {timeout_s}s")

    def exception(self, job_id: str) -> str:
        """The root cause of the job's latest failure, if any."""
        try:
            info = self.rest("GET", f"/jobs/{job_id}/exceptions")
        except RuntimeError as ex:
            return str(ex)
        root = (info.get("exceptionHistory") or {}).get("entries") or []
        return str(root[0].get("stacktrace", ""))[:4000] if root else "none recorded"

    def cancel(self, job_id: str, wait_s: float = 60.0) -> str:
        """Cancels without a savepoint; returns the final state."""
        self.rest("PATCH", f"/jobs/{job_id}?mode=cancel")
        state = self.wait_ended(job_id, wait_s)
        log.info("cluster: job %s %s", job_id, state)
        return state

    def checkpoints(self, job_id: str) -> dict[str, Any]:
        """The job's checkpoint statistics: ``counts`` (completed, failed, ...) and ``latest`` (completed, restored)."""
        info: dict[str, Any] = self.rest("GET", f"/jobs/{job_id}/checkpoints")
        return info

    def completed_checkpoint(self, job_id: str) -> int:
        """The id of the job's latest completed checkpoint, 0 if none yet."""
        latest = (self.checkpoints(job_id).get("latest") or {}).get("completed") or {}
        return int(latest.get("id", 0))

    def stop_with_savepoint(self, job_id: str, directory: str | Path | None = None, timeout_s: float = 120.0) -> str:
        """Takes a savepoint and stops the job (no drain, as for an upgrade); returns the savepoint's path.

        The REST form of ``flink stop --savepointPath DIR JOBID``; resume with ``submit(..., savepoint=path)``.
        """
        body: dict[str, Any] = {"drain": False}
        if directory is not None:
            has_scheme = re.match(r"[a-z][a-z0-9+.-]*:", str(directory)) is not None
            body["targetDirectory"] = str(directory) if has_scheme else Path(directory).resolve().as_uri()
        trigger = self.rest("POST", f"/jobs/{job_id}/stop", body)["request-id"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.rest("GET", f"/jobs/{job_id}/savepoints/{trigger}")
            if info["status"]["id"] == "COMPLETED":
                op = info.get("operation") or {}
                if "failure-cause" in op:
                    cause = op["failure-cause"].get("stack-trace", op["failure-cause"])
                    raise RuntimeError(f"cluster: savepoint of job {job_id} failed: {str(cause)[:4000]}")
                path = str(op["location"])
                # The savepoint request completes a moment before the job leaves RUNNING; callers that resubmit
                # or cancel next need the job ended.
                state = self.wait_ended(job_id, max(deadline - time.monotonic(), 10.0))
                log.info("cluster: job %s %s with savepoint %s", job_id, state, path)
                return path
            time.sleep(0.5)
        raise TimeoutError(f"cluster: savepoint of job {job_id} not done after {timeout_s}s")


def _kill(pids: list[int], what: str, where: str, timeout_s: float) -> list[int]:
    """``kill -9`` of ``pids`` (processes of kind ``what``), once all are gone; an empty list is an error."""
    if not pids:
        raise RuntimeError(f"cluster: no live {what}{where} to kill")
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    _wait_gone(pids, timeout_s)
    log.info("cluster: killed %s(s) %s", what, pids)
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie still answers kill(0) but is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"cluster: processes {[p for p in pids if _alive(p)]} outlived SIGKILL")
        time.sleep(0.05)


def _parent_map() -> dict[int, int]:
    """pid -> parent pid of every process we can see."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8081, help="REST port")
    p.add_argument("--rpc-port", type=int, default=6123, help="JobManager RPC port")
    p.add_argument("--run-dir", type=Path, default=RUN_DIR)
    sub = p.add_subparsers(dest="command", required=True)
    start_help = ("start a JobManager and a TaskManager and leave them running after this command returns, until "
                  "`stop` (if they do not come up, or on Ctrl-C or SIGTERM meanwhile, they are stopped)")
    sub.add_parser("start", help=start_help, description=start_help)
    sub.add_parser("stop", help="stop the cluster's daemons and every process started for it")
    sub.add_parser("status")
    s = sub.add_parser("submit", help="submit the job; arguments after -- go to python -m flink_job")
    s.add_argument("--savepoint", default=None, help="resume from this savepoint")
    s.add_argument("--allow-non-restored", action="store_true")
    s.add_argument("--pyarch", action="append", default=[], metavar="ZIP[#DIR]",
                   help="an archive for the Python workers' working directory (repeatable)")
    s.add_argument("--pyexec", default=None, help="the Python workers' interpreter, e.g. venv/bin/python inside "
                   "a --pyarch venv.zip#venv (default: the cluster's launcher of this venv's python)")
    s.add_argument("job_args", nargs=argparse.REMAINDER)
    c = sub.add_parser("cancel")
    c.add_argument("job_id")
    sp = sub.add_parser("stop-savepoint")
    sp.add_argument("job_id")
    sp.add_argument("--dir", default=None, help="savepoint directory (default: <run dir>/savepoints)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cluster = SessionCluster(args.port, args.rpc_port, args.run_dir)
    if args.command == "start":
        with signals_as_exit():  # SIGTERM while waiting for the TaskManager: start() stops what it started
            cluster.start()
    elif args.command == "stop":
        cluster.stop()
    elif args.command == "status":
        if not cluster.daemon_pids():
            print("not running")
            sys.exit(1)
        overview = cluster.rest("GET", "/overview")
        print(f"running on {cluster.rest_url}: {overview['taskmanagers']} TaskManager(s), "
              f"{overview['slots-available']}/{overview['slots-total']} slots free, Flink {overview['flink-version']}")
        for job in cluster.jobs():
            print(f"  {job['jid']}  {job['state']:<10} {job['name']}")
    elif args.command == "submit":
        job_args = args.job_args[1:] if args.job_args[:1] == ["--"] else args.job_args
        print(cluster.submit(job_args, savepoint=args.savepoint, allow_non_restored=args.allow_non_restored,
                             archives=args.pyarch, pyexec=args.pyexec))
    elif args.command == "cancel":
        print(cluster.cancel(args.job_id))
    else:
        print(cluster.stop_with_savepoint(args.job_id, args.dir))


if __name__ == "__main__":
    main()
