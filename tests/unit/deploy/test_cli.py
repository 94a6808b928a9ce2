"""The streamrec command (deploy.cli): one entry point that hands each subcommand to its python -m main."""
from __future__ import annotations

import re

import pytest

from deploy import cli
from tests.helpers import PROJECT


def test_without_a_command_it_prints_the_commands_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    for name in ("run", "job", "produce", "recommend", "report", "cluster", "broker"):
        assert re.search(rf"^  {name} +\S", out, re.M), out


def test_an_unknown_command_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_every_command_resolves_to_its_modules_main() -> None:
    from deploy import cluster, demo, kafka
    from flink_job.flink import job
    from flink_job.serving import recommend
    from flink_job.tools import produce, report

    mains = {"run": demo.main, "job": job.main, "produce": produce.main, "recommend": recommend.main,
             "report": report.main, "cluster": cluster.main, "broker": kafka.main}
    assert {name: cli.resolve(name) for name in cli.COMMANDS} == mains


def test_the_arguments_after_the_command_go_to_its_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["produce", "--help"])
    assert stop.value.code == 0
    assert "movielens" in capsys.readouterr().out  # the produce command's own help
    with pytest.raises(SystemExit) as stop:
        cli.main(["broker", "restart"])  # not one of the broker command's choices
    assert stop.value.code == 2
    assert "invalid choice: 'restart'" in capsys.readouterr().err


def test_setup_installs_the_command() -> None:
    assert '"streamrec=deploy.cli:main"' in (PROJECT / "setup.py").read_text()
