"""Recommendations from the embeddings topic: one-off answers on the command line, or a small HTTP service.

    python -m flink_job.serving.recommend [--config job.yaml] [--set kafka.bootstrap=HOST:PORT] user <id> [--top 10]
    python -m flink_job.serving.recommend --bootstrap HOST:PORT --topic T item <id> [--top 10]
    python -m flink_job.serving.recommend serve [--host 127.0.0.1] [--port 8080]

The bootstrap servers, topic and Kafka client properties default to the job's configuration (``--config`` YAML,
``STREAMREC__*`` environment variables, ``--set`` overrides, as for ``python -m flink_job``). The service answers
``GET /recommend?user=<id>&n=10`` (or ``/recommend/<id>``), ``GET /similar?item=<id>&n=10`` (or ``/similar/<id>``)
and ``GET /healthz`` with JSON, and ``GET /metrics`` in the Prometheus text format. Ids are percent-encoded UTF-8.
It answers 503 until the index has caught up with the topic's end offsets at start; ``/healthz`` also answers 503
with a ``reason`` when the index stopped or has been behind the topic for longer than ``--max-lag-s``.

>>> parse_args(["--set", "kafka.embeddings_topic=t", "user", "u1", "--top", "3"]).top
3
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

from flink_job.config import JobConfig
from flink_job.serving.http import BoundedHTTPServer, HeadHandler, HttpLimits
from flink_job.serving.config import ISOLATION_LEVELS, ServingConfig
from flink_job.serving.index import EmbeddingIndex

log = logging.getLogger(__name__)
MAX_N = 1_000


class RecommendServer(BoundedHTTPServer):
    """An HTTP server (bounded workers and timeouts: :mod:`flink_job.serving.http`) answering from one
    :class:`EmbeddingIndex` (port 0: an ephemeral port)."""

    def __init__(self, index: EmbeddingIndex, host: str = "127.0.0.1", port: int = 8080,
                 limits: HttpLimits | None = None) -> None:
        self.index = index
        super().__init__((host, port), _Handler, limits)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _Handler(HeadHandler):
    server: RecommendServer

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        index = self.server.index
        try:
            route, path_id, params = _parse_target(self.path)
            if route == "/healthz":
                stats = index.stats()
                self._send(HTTPStatus.OK if stats["healthy"] else HTTPStatus.SERVICE_UNAVAILABLE, stats)
                return
            if route == "/metrics":
                self._send_text(metrics_text(index.stats(), self.server.counts))
                return
            if route not in ("/recommend", "/similar"):
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no such path {route!r}; try /recommend?user=, "
                                                  "/recommend/<user>, /similar?item=, /similar/<item>, /healthz"})
                return
            name = "user" if route == "/recommend" else "item"
            ident, n = path_id or params.get(name, ""), _parse_n(params.get("n", "10"))
            if not ident:
                raise ValueError(f"missing parameter {name!r}")
            if not index.ready:
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "the index is still catching up with the topic"})
                return
            if name == "user":
                self._send(HTTPStatus.OK, index.recommend(ident, n).to_dict())
                return
            try:
                self._send(HTTPStatus.OK, index.similar(ident, n).to_dict())
            except KeyError:
                self._send(HTTPStatus.NOT_FOUND, {"error": f"unknown item {ident!r}"})
        except ValueError as ex:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(ex)})
        except Exception as ex:  # noqa: BLE001 - a bug answers 500 and is logged; the server goes on
            log.exception("recommend: answering %r", self.path[:200])
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(ex).__name__}"})

    def _send(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        self._write(status, "application/json", orjson.dumps(body))

    def _send_text(self, text: str) -> None:
        self._write(HTTPStatus.OK, "text/plain; version=0.0.4; charset=utf-8", text.encode())

    def _write(self, status: HTTPStatus, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the signature of http.server
        log.debug("recommend: %s %s", self.address_string(), format % args)


def _parse_target(target: str) -> tuple[str, str, dict[str, str]]:
    """``(route, id from the path or "", query parameters)`` of a request target; ids are percent-encoded UTF-8
    (``/recommend/us%C3%A9r``; an encoded slash ``%2F`` belongs to the id). ValueError if not valid UTF-8."""
    try:
        # http.server decodes the request line as Latin-1: back to its bytes, then UTF-8 throughout
        url = urlsplit(target.encode("latin-1").decode("utf-8"))
        route, _, raw_id = url.path.partition("/")[2].partition("/")
        path_id = unquote(raw_id, errors="strict")
        params = {k: v[-1] for k, v in parse_qs(url.query, errors="strict").items()}
    except UnicodeError:
        raise ValueError("the request target is not valid percent-encoded UTF-8") from None
    return f"/{route}", path_id, params


def metrics_text(stats: dict[str, Any], http: dict[str, int]) -> str:
    """The index's and the HTTP server's counters and gauges in the Prometheus text format."""
    lines = ["# TYPE streamrec_serving_records_total counter"]
    for outcome in ("applied", "stale", "tombstones", "malformed"):
        lines.append(f'streamrec_serving_records_total{{outcome="{outcome}"}} {stats[outcome]}')
    lines.append("# TYPE streamrec_serving_malformed_total counter")
    for reason, count in stats["malformed_reasons"].items():
        lines.append(f'streamrec_serving_malformed_total{{reason="{reason}"}} {count}')
    lines.append("# TYPE streamrec_serving_evicted_total counter")
    lines.append(f"streamrec_serving_evicted_total {stats['evicted']}")
    lines.append("# TYPE streamrec_serving_ids gauge")
    for kind in ("users", "items"):
        lines.append(f'streamrec_serving_ids{{kind="{kind[:-1]}"}} {stats[kind]}')
    lines.append("# TYPE streamrec_serving_lag_seconds gauge")
    lines.append(f"streamrec_serving_lag_seconds {stats['lag_s']}")
    lines.append("# TYPE streamrec_serving_healthy gauge")
    lines.append(f"streamrec_serving_healthy {int(stats['healthy'])}")
    lines.append("# TYPE streamrec_serving_http_connections_total counter")
    for outcome, count in http.items():
        lines.append(f'streamrec_serving_http_connections_total{{outcome="{outcome}"}} {count}')
    return "\n".join(lines) + "\n"


def _parse_n(raw: str) -> int:
    try:
        n = int(raw)
    except ValueError as ex:
        raise ValueError(f"n must be an integer, got {raw!r}") from ex
    if not 1 <= n <= MAX_N:
        raise ValueError(f"n must be in 1..{MAX_N}, got {n}")
    return n


def _cli_n(raw: str) -> int:
    try:
        return _parse_n(raw)
    except ValueError as ex:
        raise argparse.ArgumentTypeError(str(ex)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flink_job.serving.recommend", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="job YAML config (kafka section: bootstrap, embeddings topic)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--bootstrap", default=None, help="default: kafka.bootstrap of the job config")
    p.add_argument("--topic", default=None, help="default: kafka.embeddings_topic of the job config")
    p.add_argument("--isolation-level", choices=ISOLATION_LEVELS, default="read_committed")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the index to catch up")
    d = ServingConfig()
    p.add_argument("--max-users", type=int, default=d.max_users, help="users kept; the least recently updated go")
    p.add_argument("--max-items", type=int, default=d.max_items, help="items kept; the least recently updated go")
    p.add_argument("--dim", type=int, default=d.dim, help="vector length of every record (0: the first record's)")
    p.add_argument("--max-lag-s", type=float, default=d.max_lag_s,
                   help="/healthz is unhealthy once the index has been behind the topic for longer")
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in (("user", "top-N items for a user"), ("item", "items similar to an item")):
        s = sub.add_parser(name, help=what)
        s.add_argument("id")
        s.add_argument("--top", type=_cli_n, default=10, help=f"how many (1..{MAX_N})")
        s.add_argument("--json", action="store_true", help="print the answer as JSON")
    s = sub.add_parser("serve", help="HTTP service: /recommend, /similar, /healthz")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--workers", type=int, default=HttpLimits().workers, help="threads answering requests")
    return p.parse_args(argv)


def index_from_args(args: argparse.Namespace) -> EmbeddingIndex:
    cfg = JobConfig.load(args.config, args.overrides)
    return EmbeddingIndex(
        args.bootstrap or cfg.kafka.bootstrap,
        args.topic or cfg.kafka.embeddings_topic,
        isolation_level=args.isolation_level,
        client_properties=cfg.kafka.librdkafka_properties(),
        config=ServingConfig(max_users=args.max_users, max_items=args.max_items, dim=args.dim,
                             max_lag_s=args.max_lag_s),
    )


def _print_answer(answer: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    if "user" in answer:
        how = "popularity fallback (unknown user)" if answer["fallback"] else (
            f"user version {answer['user_version']} (step {answer['user_step']})")
        print(f"top {len(answer['items'])} for user {answer['user']}: {how}; item watermark step {answer['item_step']}")
    else:
        print(f"similar to item {answer['item']} (version {answer['item_version']}); "
              f"item watermark step {answer['item_step']}")
    for s in answer["items"]:
        print(f"  {s['id']:>12}  {s['score']:+.4f}  v{s['version']}")


def _log_when_ready(index: EmbeddingIndex) -> None:
    try:
        index.wait_until(lambda ix: ix.ready, 365 * 86400.0)
    except RuntimeError:
        return  # the index logged why it stopped
    log.info("recommend: caught up with %s: %s", index.topic, index.stats())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    index = index_from_args(args).start()
    try:
        if args.command == "serve":
            server = RecommendServer(index, args.host, args.port, HttpLimits(workers=args.workers))
            log.info("recommend: serving %s on %s", index.topic, server.url)
            threading.Thread(target=_log_when_ready, args=(index,), daemon=True).start()
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
            finally:
                server.server_close()
            return 0
        index.wait_until(lambda ix: ix.ready, args.timeout)
        if args.command == "user":
            _print_answer(index.recommend(args.id, args.top).to_dict(), args.json)
            return 0
        try:
            _print_answer(index.similar(args.id, args.top).to_dict(), args.json)
        except KeyError:
            print(f"unknown item {args.id!r} in {index.topic}", file=sys.stderr)
            return 1
        return 0
    finally:
        index.close()


if __name__ == "__main__":
    sys.exit(main())
