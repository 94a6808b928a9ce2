"""The session cluster's jobs through Flink's REST API: status, waiting for a state, cancel, checkpoints and
stop-with-savepoint."""
from __future__ import annotations

import json
import logging
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from deploy.cluster_conf import ClusterConf

log = logging.getLogger("deploy.cluster")  # the cluster's logger, as before the split
ENDED = ("FINISHED", "CANCELED", "FAILED")


class RestError(RuntimeError):
    """Flink's REST API answered with an HTTP error."""


class ClusterRest(ClusterConf):
    """The REST calls of a configured cluster (``rest_url``)."""

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
