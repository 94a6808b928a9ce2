"""An HTTP server whose threads no client can hold: a fixed pool of workers that only ever see complete requests.

``http.server.ThreadingHTTPServer`` starts a thread per connection and waits on the client without a timeout, so a
client that connects and sends nothing (or a byte a minute) holds a thread for ever, and many of them exhaust the
process. Here one "waiting room" thread reads the request heads of all open connections without blocking; a
connection is handed to a worker only once its head is complete, so slow clients cost a socket and a buffer, never
a worker. Every wait is bounded:

- a connection must send its complete head within ``head_timeout_s`` of being accepted (closed otherwise);
- at most ``max_waiting`` connections wait for their head; a new one beyond that closes the oldest;
- at most ``workers + queue`` requests are being answered or waiting for a worker; beyond that a request is answered
  ``503`` at once by the waiting room;
- a worker gives one connection at most ``request_timeout_s`` (a slow reader of the answer is cut off then).
"""
from __future__ import annotations

import io
import logging
import math
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer

log = logging.getLogger(__name__)



def _canned(status: str, error: str) -> bytes:
    """A complete answer the waiting room sends itself, without a worker."""
    body = b'{"error": "' + error.encode() + b'"}'
    return (f"HTTP/1.0 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


BUSY = _canned("503 Service Unavailable", "busy: all workers and the queue are taken, try again")
TOO_LARGE = _canned("431 Request Header Fields Too Large", "the request head is too large")


@dataclass(frozen=True)
class HttpLimits:
    workers: int = 8  # threads answering requests
    queue: int = 64  # complete requests waiting for a worker
    max_waiting: int = 1024  # connections still sending their request head
    max_head_bytes: int = 16_384  # request line and headers
    head_timeout_s: float = 10.0  # from accept to a complete request head
    request_timeout_s: float = 10.0  # a worker's time for one connection: answering and writing the answer

    def __post_init__(self) -> None:
        for name in ("workers", "max_waiting", "max_head_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"config: http.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.queue, int) or self.queue < 0:
            raise ValueError(f"config: http.queue must be an integer >= 0, got {self.queue!r}")
        for name in ("head_timeout_s", "request_timeout_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"config: http.{name} must be a finite number > 0, got {getattr(self, name)!r}")


class HeadHandler(BaseHTTPRequestHandler):
    """A request handler that reads the request head the waiting room already read, not the socket."""

    server: BoundedHTTPServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket stays open for the answer
        self.rfile = io.BytesIO(self.server.take_head(self.connection))


@dataclass
class _Waiting:
    sock: socket.socket
    address: tuple[str, int]
    deadline: float
    head: bytearray


class BoundedHTTPServer(HTTPServer):
    """``HTTPServer`` with the bounds of :class:`HttpLimits`; ``serve_forever``/``shutdown``/``server_close`` as usual.
    ``counts``: connections accepted, rejected as busy, closed idle, too large, and requests cut off."""

    request_queue_size = 128  # the listen backlog: connections are accepted at once, so this rarely fills

    def __init__(self, address: tuple[str, int], handler: Callable[..., HeadHandler],
                 limits: HttpLimits | None = None) -> None:
        self.limits = limits if limits is not None else HttpLimits()
        super().__init__(address, handler)
        self.counts = {"accepted": 0, "busy": 0, "idle_closed": 0, "too_large": 0, "cut_off": 0}
        self._pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="http-worker")
        self._slots = threading.BoundedSemaphore(self.limits.workers + self.limits.queue)
        self._new: queue.SimpleQueue[tuple[socket.socket, tuple[str, int]]] = queue.SimpleQueue()
        self._heads: dict[socket.socket, bytes] = {}
        self._busy: dict[socket.socket, float] = {}  # connection -> deadline of its worker
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = threading.Event()
        self._room = threading.Thread(target=self._waiting_room, name="http-waiting-room", daemon=True)
        self._room.start()

    # socketserver calls this on the serving thread for every accepted connection
    def process_request(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        self.counts["accepted"] += 1
        self._new.put((request, client_address))
        self._wake()

    def take_head(self, sock: socket.socket) -> bytes:
        with self._lock:
            return self._heads.pop(sock, b"")

    def server_close(self) -> None:
        super().server_close()
        self._closed.set()
        self._wake()
        self._room.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # the buffer is full (a wake-up is pending anyway) or the server is closing
            pass

    def _waiting_room(self) -> None:
        waiting: dict[socket.socket, _Waiting] = {}  # insertion order: oldest first
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed.is_set():
                try:
                    self._turn(sel, waiting)
                except Exception:  # noqa: BLE001 - this thread feeds every worker: it must outlive any one socket
                    log.exception("http: waiting room")
            for w in list(waiting.values()):
                self._drop(sel, waiting, w)

    def _turn(self, sel: selectors.BaseSelector, waiting: dict[socket.socket, _Waiting]) -> None:
        for key, _ in sel.select(timeout=0.25):
            if key.fileobj is self._wake_r:
                self._wake_r.recv(4096)
            elif key.fileobj in waiting:
                self._read_head(sel, waiting, waiting[key.fileobj])  # type: ignore[index]
        while not self._new.empty():
            self._admit(sel, waiting, *self._new.get())
        self._expire(sel, waiting, time.monotonic())

    def _admit(self, sel: selectors.BaseSelector, waiting: dict[socket.socket, _Waiting], sock: socket.socket,
               address: tuple[str, int]) -> None:
        if len(waiting) >= self.limits.max_waiting:
            self.counts["idle_closed"] += 1
            self._drop(sel, waiting, next(iter(waiting.values())))
        sock.setblocking(False)
        w = _Waiting(sock, address, time.monotonic() + self.limits.head_timeout_s, bytearray())
        waiting[sock] = w
        sel.register(sock, selectors.EVENT_READ)

    def _read_head(self, sel: selectors.BaseSelector, waiting: dict[socket.socket, _Waiting], w: _Waiting) -> None:
        try:
            data = w.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._drop(sel, waiting, w)
            return
        w.head += data
        if b"\r\n\r\n" in w.head or b"\n\n" in w.head:
            sel.unregister(w.sock)
            del waiting[w.sock]
            self._dispatch(w)
        elif len(w.head) > self.limits.max_head_bytes:
            self.counts["too_large"] += 1
            self._answer_and_close(w.sock, TOO_LARGE)
            sel.unregister(w.sock)
            del waiting[w.sock]

    def _dispatch(self, w: _Waiting) -> None:
        if not self._slots.acquire(blocking=False):
            self.counts["busy"] += 1
            self._answer_and_close(w.sock, BUSY)
            return
        with self._lock:
            self._heads[w.sock] = bytes(w.head)
        self._pool.submit(self._work, w.sock, w.address)

    def _work(self, sock: socket.socket, address: tuple[str, int]) -> None:
        try:
            sock.setblocking(True)
            sock.settimeout(self.limits.request_timeout_s)
            with self._lock:
                self._busy[sock] = time.monotonic() + self.limits.request_timeout_s
            self.finish_request(sock, address)
        except Exception:  # noqa: BLE001 - a failed request must not take its worker down
            self.handle_error(sock, address)
        finally:
            with self._lock:
                self._busy.pop(sock, None)
                self._heads.pop(sock, None)
            self.shutdown_request(sock)
            self._slots.release()

    def _expire(self, sel: selectors.BaseSelector, waiting: dict[socket.socket, _Waiting], now: float) -> None:
        for w in [w for w in waiting.values() if w.deadline <= now]:
            self.counts["idle_closed"] += 1
            self._drop(sel, waiting, w)
        with self._lock:
            late = [s for s, deadline in self._busy.items() if deadline <= now]
            for s in late:
                del self._busy[s]
        for s in late:  # the worker's blocked send or receive returns at once
            self.counts["cut_off"] += 1
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _drop(self, sel: selectors.BaseSelector, waiting: dict[socket.socket, _Waiting], w: _Waiting) -> None:
        sel.unregister(w.sock)
        del waiting[w.sock]
        self.shutdown_request(w.sock)

    @staticmethod
    def _answer_and_close(sock: socket.socket, answer: bytes) -> None:
        try:
            sock.send(answer)  # non-blocking: a client that does not read just misses it
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
