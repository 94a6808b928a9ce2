"""The ``streamrec`` command: one entry point over the project's ``python -m`` commands, which stay as they are.

    streamrec run [--events N] [--keep]        # python -m deploy.demo: broker, stream, job, summary
    streamrec job --config job.yaml            # python -m flink_job: the job on a local mini-cluster
    streamrec produce synthetic --events 1000  # python -m flink_job.tools.produce
    streamrec recommend serve                  # python -m flink_job.serving.recommend
    streamrec report --stats-file stats.jsonl  # python -m flink_job.tools.report
    streamrec cluster start | submit | stop    # python -m deploy.cluster
    streamrec broker start | status | stop     # python -m deploy.kafka

Everything after the subcommand goes to that command's own parser (``streamrec produce --help``).
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import NamedTuple


class Command(NamedTuple):
    target: str  # "module:function", imported only when the command runs (report needs no torch)
    help: str
    needs_jars: bool = False  # starts a job in this process: resolve the jars first (flink_job never imports deploy)


COMMANDS: dict[str, Command] = {
    "run": Command("deploy.demo:main", "the demo: a local broker, a synthetic stream, the job, a summary", True),
    "job": Command("flink_job.flink.job:main", "the streaming job on a local mini-cluster (--config, --set)", True),
    "produce": Command("flink_job.tools.produce:main", "write a synthetic stream or a MovieLens file to Kafka"),
    "recommend": Command("flink_job.serving.recommend:main", "serve or query recommendations from the embeddings"),
    "report": Command("flink_job.tools.report:main", "summarise and plot a run's job stats"),
    "cluster": Command("deploy.cluster:main", "a standalone Flink session cluster: start, submit, status, stop"),
    "broker": Command("deploy.kafka:main", "a local single-node Kafka broker: start, stop, status, create-topics"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {c.help}" for name, c in COMMANDS.items()]
    return "usage: streamrec COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines) + "\n"


def resolve(name: str) -> Callable[[list[str]], object]:
    module, _, function = COMMANDS[name].target.partition(":")
    main: Callable[[list[str]], object] = getattr(importlib.import_module(module), function)
    return main


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"streamrec: unknown command {name!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    if COMMANDS[name].needs_jars:
        from deploy.jars import export_job_jars

        export_job_jars()
    result = resolve(name)(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
