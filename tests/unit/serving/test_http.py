"""The bounded HTTP server (flink_job/serving/http.py) over real sockets: slow clients hold no worker, every wait ends,
and a full queue answers 503 at once."""
from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from flink_job.serving.http import BoundedHTTPServer, HeadHandler, HttpLimits
from flink_job.serving.recommend import _parse_target


class _Echo(HeadHandler):
    """Answers the path; ``/block`` waits until the test releases it (a worker kept busy)."""

    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        if self.path == "/block":
            self.release.wait(20)
        data = b"x" * 50_000_000 if self.path == "/big" else self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextmanager
def running(limits: HttpLimits) -> Iterator[tuple[BoundedHTTPServer, str]]:
    server = BoundedHTTPServer(("127.0.0.1", 0), _Echo, limits)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        _Echo.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as ex:
        return ex.code, ex.read()


def _connect(url: str) -> socket.socket:
    host, port = url.rsplit("/", 1)[-1].split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closes ``sock`` within ``within_s`` (reads to end of file, ignoring an answer)."""
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_slow_clients_hold_no_worker_and_are_closed() -> None:
    """Many clients that connect and send nothing, or half a request head, neither take a thread each (the old
    ThreadingHTTPServer started one per connection) nor keep a normal request waiting; the server closes them once
    ``head_timeout_s`` has passed (the old server waited for ever)."""
    limits = HttpLimits(workers=2, queue=2, head_timeout_s=1.5, request_timeout_s=5)
    with running(limits) as (server, url):
        threads_before = threading.active_count()
        silent = [_connect(url) for _ in range(40)]
        partial = [_connect(url) for _ in range(40)]
        for s in partial:
            s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")  # and never the blank line that ends the head
        time.sleep(0.3)
        started = time.monotonic()
        assert _get(f"{url}/normal") == (200, b"/normal")
        assert time.monotonic() - started < 1.0  # not after the slow clients' timeout
        assert threading.active_count() <= threads_before + limits.workers
        assert all(_closed_by_server(s, within_s=5) for s in silent + partial)
        assert server.counts["idle_closed"] == 80
        assert _get(f"{url}/after") == (200, b"/after")
        for s in silent + partial:
            s.close()


def test_a_full_queue_answers_busy_at_once_and_recovers() -> None:
    limits = HttpLimits(workers=1, queue=1, request_timeout_s=10)
    _Echo.release.clear()
    with running(limits) as (server, url):
        held = [threading.Thread(target=_get, args=(f"{url}/block", 15)) for _ in range(2)]  # the worker, the queue
        for t in held:
            t.start()
        deadline = time.monotonic() + 5
        while server.counts["accepted"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        started = time.monotonic()
        status, body = _get(f"{url}/third")
        assert status == 503 and b"busy" in body and time.monotonic() - started < 1.0
        assert server.counts["busy"] == 1
        _Echo.release.set()
        for t in held:
            t.join(timeout=10)
        assert _get(f"{url}/fourth") == (200, b"/fourth")


def test_a_client_that_does_not_read_its_answer_is_cut_off() -> None:
    """A worker gives one connection at most ``request_timeout_s``, also when the client never reads the answer."""
    limits = HttpLimits(workers=1, queue=0, request_timeout_s=1.5)
    with running(limits) as (server, url):
        sock = _connect(url)
        sock.sendall(b"GET /big HTTP/1.0\r\n\r\n")  # 50 MB that it never reads
        deadline = time.monotonic() + 5
        while not server._busy and time.monotonic() < deadline:  # the worker took it
            time.sleep(0.02)
        time.sleep(0.2)
        status, body = _get(f"{url}/ok")
        assert status == 503 and b"busy" in body  # the only worker is still writing
        started = time.monotonic()
        # Freed: it answers again (polled, since the one worker may still be marking itself free after an answer).
        while (answer := _get(f"{url}/ok", timeout=2)) != (200, b"/ok"):
            assert time.monotonic() - started < 10, f"the worker was never freed: {answer}"
            time.sleep(0.1)
        sock.close()


def test_a_huge_request_head_is_refused() -> None:
    with running(HttpLimits(max_head_bytes=1024)) as (server, url):
        sock = _connect(url)
        sock.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 5000)
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.0 431") and server.counts["too_large"] == 1
        sock.close()


def test_limits_are_validated() -> None:
    for bad in ({"workers": 0}, {"queue": -1}, {"head_timeout_s": 0}, {"request_timeout_s": float("inf")}):
        with pytest.raises(ValueError, match="config: http"):
            HttpLimits(**bad)  # type: ignore[arg-type]


def test_request_targets_are_percent_encoded_utf8() -> None:
    assert _parse_target("/recommend/us%C3%A9r%2F1?n=3") == ("/recommend", "usér/1", {"n": "3"})
    assert _parse_target("/recommend?user=us%C3%A9r&n=2") == ("/recommend", "", {"user": "usér", "n": "2"})
    assert _parse_target("/similar/i%20x") == ("/similar", "i x", {})
    assert _parse_target("/recommend/us\xc3\xa9r") == ("/recommend", "usér", {})  # raw UTF-8 as http.server reads it
    assert _parse_target("/healthz") == ("/healthz", "", {})
    for bad in ("/recommend/%FF", "/recommend?user=%C3", "/recommend/\xff"):
        with pytest.raises(ValueError, match="UTF-8"):
            _parse_target(bad)
