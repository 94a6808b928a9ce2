"""Files the project writes with settings in them are private (mode 0600), and secrets stay out of logs and
command lines (flink_job.secrets)."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

from flink_job.config import JobConfig


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- settings with secrets: redacted wherever shown, private wherever written ------------------------------------

FLINK_SECRET = "fl1nk-s3cr3t-9c2e"


def _secret_cfg(monkeypatch: pytest.MonkeyPatch) -> JobConfig:
    monkeypatch.setenv("TEST_FLINK_PASSPHRASE", FLINK_SECRET + "-env")
    return JobConfig.load(overrides=[
        f"flink.options={{s3.secret-key: {FLINK_SECRET}, my.ssl.passphrase: '${{env:TEST_FLINK_PASSPHRASE}}', "
        f"rest.port: '18999'}}",
    ])


def test_secret_flink_options_are_hidden_in_logs_and_resolved_into_the_flink_configuration(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    import logging

    from flink_job.flink import job
    from flink_job.flink.topology import flink_configuration

    cfg = _secret_cfg(monkeypatch)
    monkeypatch.setattr(job, "create_env", lambda c: type("Env", (), {"execute": lambda self, name: None})())
    config = tmp_path / "job.yaml"
    config.write_text(__import__("yaml").safe_dump(cfg.to_dict()))
    with caplog.at_level(logging.DEBUG):
        job.main(["--config", str(config)])  # logs the job config at start
    assert "job config" in caplog.text and "<secret ${env:TEST_FLINK_PASSPHRASE}>" in caplog.text
    assert "'rest.port': '18999'" in caplog.text  # other options stay visible
    for shown in (caplog.text, str(cfg), repr(cfg.flink)):
        assert FLINK_SECRET not in shown
    conf = flink_configuration(cfg, [tmp_path / "connector.jar"])
    assert conf.get_string("s3.secret-key", "") == FLINK_SECRET
    assert conf.get_string("my.ssl.passphrase", "") == FLINK_SECRET + "-env"


def test_a_missing_reference_in_flink_options_fails_at_load_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMREC_TEST_UNSET_VAR", raising=False)
    with pytest.raises(ValueError, match=r"^config: flink.options.s3.secret-key: environment variable "
                                         r"STREAMREC_TEST_UNSET_VAR is not set$"):
        JobConfig.load(overrides=["flink.options={s3.secret-key: '${env:STREAMREC_TEST_UNSET_VAR}'}"])


def test_the_session_cluster_config_file_is_private(tmp_path: Path) -> None:
    from deploy.cluster import SessionCluster

    cluster = SessionCluster(run_dir=tmp_path / "run", extra_settings={"s3.secret-key": FLINK_SECRET})
    cluster.write_conf()
    conf_file = cluster.conf_dir / "config.yaml"
    assert FLINK_SECRET in conf_file.read_text() and _mode(conf_file) == 0o600
    assert _mode(cluster.run_dir) == 0o700
    conf_file.chmod(0o644)  # written again: a wider mode of the old file does not carry over
    cluster.write_conf()
    assert _mode(conf_file) == 0o600


def test_submitted_overrides_travel_in_a_private_file_not_on_the_command_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from deploy.cluster import SessionCluster

    cluster = SessionCluster(run_dir=tmp_path / "run")
    base = tmp_path / "job.yaml"
    base.write_text("batch:\n  size: 99\nflink:\n  job_name: base\n")
    args = cluster.private_job_args(["--config", str(base), "--set", f"flink.options={{s3.secret-key: {FLINK_SECRET}}}",
                                     "--set", "flink.job_name=over"])
    assert args[0] == "--config" and len(args) == 2 and FLINK_SECRET not in " ".join(args)
    written = Path(args[1])
    assert _mode(written) == 0o600 and _mode(written.parent) == 0o700
    loaded = JobConfig.load(written)
    assert (loaded.batch.size, loaded.flink.job_name, loaded.flink.options) == (99, "over", {"s3.secret-key": FLINK_SECRET})
    assert cluster.private_job_args(["--config", str(base)]) == ["--config", str(base)]
    with pytest.raises(ValueError, match="config: unknown key 'flink.nope'"):  # checked before flink run
        cluster.private_job_args(["--set", "flink.nope=1"])


def test_a_failed_script_names_its_arguments_without_secrets(tmp_path: Path) -> None:
    from flink_job.secrets import redacted_args

    shown = " ".join(redacted_args(["run", "--", "--set", f"flink.options={{s3.secret-key: {FLINK_SECRET}}}",
                                    "--set", "kafka.group_id=g", "-Dsecurity.ssl.key-password=" + FLINK_SECRET]))
    assert FLINK_SECRET not in shown and "kafka.group_id=g" in shown and "s3.secret-key: <secret>" in shown


def test_the_job_process_writes_its_settings_and_log_privately(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from flink_job.flink import runner

    started: list[list[str]] = []

    class Process:
        pid = 0

        def __init__(self, cmd: list[str], **kwargs: object) -> None:
            started.append(cmd)

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", Process)
    cfg = _secret_cfg(monkeypatch)
    proc = runner.JobProcess(cfg, tmp_path / "job.log")
    proc.start()
    settings = tmp_path / "job.yaml"
    assert _mode(settings) == 0o600 and _mode(tmp_path / "job.log") == 0o600
    assert FLINK_SECRET not in " ".join(started[0]) and started[0][-2:] == ["--config", str(settings)]
    assert "${env:TEST_FLINK_PASSPHRASE}" in settings.read_text()  # the reference, not what it names
    assert FLINK_SECRET + "-env" not in settings.read_text()
