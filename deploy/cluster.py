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
import logging
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploy.cluster_conf import PROJECT, RUN_DIR
from deploy.cluster_rest import ClusterRest, RestError
from deploy.jars import CONNECTOR_JAR_ENV, UDF_JAR_ENV, connector_jar, flink_home, udf_jar
from deploy.kafka import signals_as_exit
from deploy.processes import alive, cmdline, kill_all, parent_map, port_open, send_signal
from flink_job.secrets import redacted_args, write_private

log = logging.getLogger(__name__)

# The Python packages the job needs on the TaskManagers; shipped with --pyFiles as one zip.
SOURCES = ("flink_job", "model")  # the job imports nothing from deploy
IDENT = "streamrec"  # FLINK_IDENT_STRING: names the pid and log files of the daemons


def parse_job_id(output: str) -> str:
    """The job id that ``flink run`` prints.

    >>> parse_job_id("Job has been submitted with JobID 0123456789abcdef0123456789abcdef")
    '0123456789abcdef0123456789abcdef'
    """
    m = re.search(r"JobID ([0-9a-f]{32})", output)
    if not m:
        raise RuntimeError(f"cluster: no job id in the output of flink run:\n{output[-4000:]}")
    return m.group(1)


@dataclass(frozen=True)
class SessionCluster(ClusterRest):
    """A cluster of ``ClusterConf``: started, stopped and fed jobs here, its jobs watched through ``ClusterRest``."""

    def _env(self) -> dict[str, str]:
        inherited = ("FLINK_HOME", "FLINK_LOG_DIR", "FLINK_PID_DIR", "FLINK_OPT_DIR", "FLINK_PLUGINS_DIR")
        env = {k: v for k, v in os.environ.items() if k not in inherited}  # ours, not another install's
        env.update(FLINK_CONF_DIR=str(self.conf_dir), FLINK_LIB_DIR=str(self.lib_dir), FLINK_IDENT_STRING=IDENT)
        return env

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
                if line.isdigit() and alive(int(line)):
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
        return [int(p) for p in pid_file.read_text().split() if p.isdigit() and alive(int(p))]

    def taskmanager_ids(self) -> set[str]:
        """The TaskManagers the JobManager has registered (a killed one stays until its heartbeat times out)."""
        return {tm["id"] for tm in self.rest("GET", "/taskmanagers")["taskmanagers"]}

    def kill_taskmanager(self, timeout_s: float = 10.0) -> list[int]:
        """``kill -9`` every TaskManager JVM of this cluster, as a machine or JVM crash would; returns their pids.

        The Python workers the TaskManager started are not signalled: as after a real crash, they exit when their
        connection to it breaks (none was left behind in the tests; ``stop()`` ends any that linger).
        """
        return kill_all(self.taskmanager_pids(), "TaskManager", f" (pid file in {self.run_dir})", timeout_s)

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
        parents = parent_map()
        tms = set(self.taskmanager_pids())
        found = []
        for pid, ppid in parents.items():
            ancestor = ppid
            while ancestor > 1 and ancestor not in tms:
                ancestor = parents.get(ancestor, 0)
            if ancestor in tms and b"pyflink.fn_execution" in cmdline(pid):
                found.append(pid)
        return sorted(found)

    def kill_python_workers(self, timeout_s: float = 10.0) -> list[int]:
        """``kill -9`` the TaskManagers' Python workers (the TaskManager itself keeps running); returns their pids."""
        return kill_all(self.python_worker_pids(), "Python worker", " of a live TaskManager", timeout_s)

    def start(self, timeout_s: float = 120.0) -> None:
        """Starts one JobManager and one TaskManager and waits until the TaskManager has registered."""
        if self.daemon_pids():
            log.info("cluster: already running (%s)", self.rest_url)
            self.wait_ready(timeout_s)
            return
        for port in (self.rest_port, self.rpc_port):
            if port_open(port):
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
                send_signal(pid, sig)
            while left and time.monotonic() < deadline:
                time.sleep(0.2)
                left = [p for p in left if alive(p)]
            if not left:
                break
            log.warning("cluster: processes %s outlived %s", left, sig.name)
            deadline = time.monotonic() + 5.0
        for pid_file in self.run_dir.glob(f"flink-{IDENT}-*.pid"):
            pid_file.unlink(missing_ok=True)
        log.info("cluster: stopped (%s)", self.rest_url)

    # --- jobs ---

    def package_sources(self, packages: Sequence[str] = SOURCES) -> Path:
        """The project's Python packages as one zip: Flink unpacks it on each TaskManager and puts it on PYTHONPATH.

        Shipping the project directory itself would ship .venv and .run as well.
        """
        extra = "".join(f"-{p}" for p in packages if p not in SOURCES)  # a zip per set of packages
        target = self.run_dir / f"streamrec-src{extra}.zip"
        partial = target.with_suffix(f".{os.getpid()}.partial")  # two submissions at once must not mix files
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
            for package in packages:
                for path in sorted((PROJECT / package).rglob("*.py")):
                    zf.write(path, path.relative_to(PROJECT).as_posix())
        partial.replace(target)
        return target

    def submit(self, job_args: list[str], detached: bool = True, savepoint: str | None = None,
               allow_non_restored: bool = False, archives: Sequence[str] = (), pyexec: str | None = None,
               timeout_s: float = 300.0, entry: str = "flink_job", packages: Sequence[str] = SOURCES) -> str:
        """Submits ``python -m <entry> <job_args>`` (``python -m flink_job``) with ``flink run``; returns the job id.

        ``detached=False`` waits (up to ``timeout_s``) for the job to end, which a streaming job does not do.
        ``archives``: ``-pyarch`` entries, ``path.zip`` or ``path.zip#dir``; Flink extracts each into the Python
        workers' working directory (under ``dir``), so the job reaches their files by relative paths, e.g. a
        warm-start model as ``flink.initial_model=dir/state.npz``, or a whole venv with ``pyexec`` (the workers'
        interpreter, default this cluster's ``worker_launcher``) pointing into it, e.g. ``venv/bin/python``.
        ``entry`` and ``packages``: another job module and the project packages shipped for it, ``SOURCES`` first
        (the fault tests submit a job of their own from ``tests``).

        The client runs from the project directory, so it resolves the connector jar and default paths there;
        the job's own config puts that jar into ``pipeline.jars``, which ``flink run`` ships with the job.
        """
        cmd = ["run"]
        if detached:
            cmd.append("-d")
        cmd += ["-m", f"127.0.0.1:{self.rest_port}", "-pym", entry, "-pyfs", str(self.package_sources(packages)),
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
