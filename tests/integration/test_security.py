"""Kafka security against a real SASL broker: the job reads and writes through it, a wrong password is refused, and no secret shows in a log, a command line or a readable file."""
from __future__ import annotations
import secrets as secrets_module
from collections.abc import Iterator
from pathlib import Path
import pytest
from deploy.kafka import Broker
from flink_job.tools.generate import SyntheticConfig, generate
from flink_job.kafka.produce import send
from flink_job.tools.produce import synthetic_timed
from flink_job.flink.runner import LocalJob
from flink_job.kafka.topics import read_all
from tests.helpers import PROJECT, Truth, fresh_topics, job_args, locked_broker


SASL_USER = "streamrec"


@pytest.fixture(scope="module")
def sasl_broker() -> Iterator[tuple[Broker, str]]:
    """A KRaft broker with a SASL_PLAINTEXT/PLAIN listener (port + 2) and one user with a fresh random password
    (quotes and backslashes included, as the JAAS lines on both sides must carry them)."""
    password = f'{secrets_module.token_urlsafe(12)}"\\x'
    with locked_broker(19692, 4, "test-kafka-sasl", sasl_users=((SASL_USER, password),)) as broker:
        yield broker, password

SASL_PROPERTIES = ('kafka.client_properties={security.protocol: SASL_PLAINTEXT, sasl.mechanism: PLAIN, '
                   'sasl.username: "${env:SASL_TEST_USER}", sasl.password: "${env:SASL_TEST_PASSWORD}"}')


@pytest.mark.integration
def test_the_job_reads_and_writes_through_a_sasl_listener(sasl_broker: tuple[Broker, str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every client (the connector's source and sinks in the JVM, the Python producer, the runner's stats reader,
    the admin client) authenticates with the settings of kafka.client_properties, secrets from the environment."""
    broker, password = sasl_broker
    monkeypatch.setenv("SASL_TEST_USER", SASL_USER)
    monkeypatch.setenv("SASL_TEST_PASSWORD", password)
    cfg = fresh_topics(broker.sasl_bootstrap, "sasl", tmp_path, [SASL_PROPERTIES, "batch.size=256"])
    security = cfg.kafka.librdkafka_properties()
    syn = SyntheticConfig(n_users=40, n_items=30, n_events=1_000, malformed_rate=0.02, seed=23)
    truth = Truth.of(list(generate(syn)))
    assert truth.malformed > 0
    sent = send(synthetic_timed(syn), broker.sasl_bootstrap, cfg.kafka.input_topic, extra_config=security)
    assert sent == truth.total
    with LocalJob(cfg) as job:
        result = job.wait_idle(idle_s=4.0, timeout_s=300, min_received=truth.received)
    assert (result.last["trained"], result.last["dead_lettered"]) == (truth.valid, truth.malformed)
    assert len(read_all(broker.sasl_bootstrap, cfg.kafka.dead_letter_topic, security=security)) == truth.malformed
    embeddings = read_all(broker.sasl_bootstrap, cfg.kafka.embeddings_topic, security=security)
    assert {k.decode().split(":", 1)[0] for k, _v, _p, _o in embeddings} == {"user", "item"}
    # The report command reads the stats topic with the job config's security settings.
    from flink_job.tools.report import SUMMARY_MD, main as report

    config = job_args(cfg, tmp_path)[1]
    out = tmp_path / "report"
    assert report(["--bootstrap", broker.sasl_bootstrap, "--stats-topic", cfg.kafka.stats_topic, "--config", config,
                   "--out", str(out)]) == 0
    assert f"{truth.valid:,}" in (out / SUMMARY_MD).read_text()


@pytest.mark.integration
def test_the_sasl_listener_refuses_a_wrong_password(sasl_broker: tuple[Broker, str]) -> None:
    """The check above proves something only if the listener authenticates: a wrong password is refused."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    broker, password = sasl_broker
    conf = {"bootstrap.servers": broker.sasl_bootstrap, "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN", "sasl.username": SASL_USER}
    AdminClient({**conf, "sasl.password": password}).list_topics(timeout=20)
    with pytest.raises(KafkaException):
        AdminClient({**conf, "sasl.password": password + "-wrong"}).list_topics(timeout=5)


def _session_cmdlines(session: int) -> dict[int, bytes]:
    """The command lines of every live process in session ``session`` (a JobProcess and all it started)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == session:
                    out[int(entry.name)] = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
    return out


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_no_secret_in_a_log_a_command_line_or_a_readable_file(sasl_broker: tuple[Broker, str], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The job in its own process (JVM, Python workers) with a Kafka password from the environment and Flink
    options holding a literal secret and a ${env:..} one: none of them shows on a command line of the processes
    it starts or in any log, and the settings file it was given is private."""
    import stat
    import time

    import pyflink

    from flink_job.flink.runner import JobProcess

    broker, password = sasl_broker
    flink_secret, env_passphrase = f"lit-{secrets_module.token_hex(8)}", f"env-{secrets_module.token_hex(8)}"
    monkeypatch.setenv("SASL_TEST_USER", SASL_USER)
    monkeypatch.setenv("SASL_TEST_PASSWORD", password)
    monkeypatch.setenv("FLINK_TEST_PASSPHRASE", env_passphrase)
    cfg = fresh_topics(broker.sasl_bootstrap, f"secrets-{mode}", tmp_path, [
        SASL_PROPERTIES, "batch.size=256", f"flink.python_execution_mode={mode}",
        f"flink.options={{s3.secret-key: {flink_secret}, streamrec.test.passphrase: '${{env:FLINK_TEST_PASSPHRASE}}'}}",
    ])
    syn = SyntheticConfig(n_users=40, n_items=30, n_events=600, seed=29)
    send(synthetic_timed(syn), broker.sasl_bootstrap, cfg.kafka.input_topic,
         extra_config=cfg.kafka.librdkafka_properties())
    secrets_ = [s.encode() for s in (password, flink_secret, env_passphrase)]
    started = time.time()
    cmdlines: dict[int, bytes] = {}
    log_path = tmp_path / "job.log"
    with JobProcess(cfg, log_path) as job:
        assert job.process is not None
        session = job.process.pid
        result = job.wait_idle(idle_s=4.0, timeout_s=300, min_received=syn.n_events,
                               progress=lambda _last: cmdlines.update(_session_cmdlines(session)))
        cmdlines.update(_session_cmdlines(session))
    assert result.last["trained"] == syn.n_events
    # the job process, its JVM and (process mode) the Python workers were all seen
    assert any(b"java" in c for c in cmdlines.values()) and len(cmdlines) >= 2 + (mode == "process")
    for pid, cmdline in cmdlines.items():
        assert not [s for s in secrets_ if s in cmdline], (pid, cmdline)

    jvm_logs = [p for p in (Path(pyflink.__file__).parent / "log").glob("*.log") if p.stat().st_mtime >= started]
    assert jvm_logs  # the local JVM logs there
    logs = [log_path, *jvm_logs]
    logs += [p for p in (PROJECT / ".run").glob("test-kafka-sasl-*/*.log")]
    assert log_path.read_text() and "job config" in log_path.read_text()
    for path in logs:
        text = path.read_bytes()
        assert not [s for s in secrets_ if s in text], path
    settings = log_path.with_suffix(".yaml")
    assert flink_secret in settings.read_text() and env_passphrase not in settings.read_text()  # a reference there
    for private in (settings, log_path):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private

