"""Kafka security settings (flink_job.config): they reach every client, secrets come from the environment or
files, never from the config itself, and never show in logs, dumps, errors or the job's name."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from flink_job.flink import sql
from flink_job.config import JobConfig, KafkaConfig

SECRET = "pa\"ss\\wörd-7f3a"  # quotes and backslashes must survive the JAAS line


@pytest.fixture
def cfg(monkeypatch: pytest.MonkeyPatch) -> JobConfig:
    monkeypatch.setenv("TEST_KAFKA_USER", "svc-streamrec")
    monkeypatch.setenv("TEST_KAFKA_PASSWORD", SECRET)
    return JobConfig.load(overrides=[
        "kafka.bootstrap=127.0.0.1:1",
        'kafka.client_properties={security.protocol: SASL_PLAINTEXT, sasl.mechanism: SCRAM-SHA-256, '
        'sasl.username: "${env:TEST_KAFKA_USER}", sasl.password: "${env:TEST_KAFKA_PASSWORD}", '
        'ssl.truststore.location: /etc/ca.jks, ssl.ca.location: /etc/ca.pem, client.dns.lookup: use_all_dns_ips}',
    ])


def test_properties_reach_the_source_and_every_sink_ddl(cfg: JobConfig) -> None:
    ddls = [sql.source_ddl(cfg)] + [sql.sink_ddl(cfg, t, "x") for t in ("embeddings_sink", "dead_letter_sink", "stats_sink")]
    for ddl in ddls:
        assert "'properties.security.protocol' = 'SASL_PLAINTEXT'" in ddl
        assert "'properties.sasl.mechanism' = 'SCRAM-SHA-256'" in ddl
        assert "'properties.ssl.truststore.location' = '/etc/ca.jks'" in ddl
        assert "'properties.client.dns.lookup' = 'use_all_dns_ips'" in ddl
        jaas = 'org.apache.flink.kafka.shaded.org.apache.kafka.common.security.scram.ScramLoginModule required ' \
               'username="svc-streamrec" ' \
               'password="pa\\"ss\\\\wörd-7f3a";'
        assert f"'properties.sasl.jaas.config' = '{jaas}'" in ddl
        # librdkafka-only settings stay out of the job graph
        assert "sasl.password" not in ddl and "sasl.username" not in ddl and "ssl.ca.location" not in ddl


def test_the_confluent_clients_get_the_translated_properties(cfg: JobConfig) -> None:
    conf = cfg.kafka.client_config()
    assert conf["sasl.username"] == "svc-streamrec" and conf["sasl.password"] == SECRET
    assert conf["security.protocol"] == "SASL_PLAINTEXT" and conf["ssl.ca.location"] == "/etc/ca.pem"
    assert "sasl.jaas.config" not in conf and "ssl.truststore.location" not in conf
    # librdkafka itself accepts every key (it refuses unknown ones); nothing listens on port 1.
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient

    conf.pop("ssl.ca.location")  # read at start-up: the file does not exist here
    Producer(conf).flush(0)
    Consumer({**conf, "group.id": "g"}).close()
    AdminClient(conf)


def test_jaas_config_is_translated_for_librdkafka(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KAFKA_PASSWORD", SECRET)
    jaas = ('org.apache.kafka.common.security.plain.PlainLoginModule required username="app" '
            'password="${env:TEST_KAFKA_PASSWORD}";')
    k = KafkaConfig(client_properties={"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN",
                                       "sasl.jaas.config": jaas, "ssl.endpoint.identification.algorithm": ""})
    rd = k.librdkafka_properties()
    assert (rd["sasl.username"], rd["sasl.password"]) == ("app", SECRET)
    assert rd["ssl.endpoint.identification.algorithm"] == "none" and "sasl.jaas.config" not in rd
    java = k.java_properties()["sasl.jaas.config"]
    assert 'password="pa\\"ss\\\\wörd-7f3a"' in java
    # The connector's jar relocates the Kafka client: the module named in Kafka's docs would not be found.
    assert java.startswith("org.apache.flink.kafka.shaded.org.apache.kafka.common.security.plain.PlainLoginModule ")
    # Given in the shaded form, it stays as it is and still translates for librdkafka.
    shaded = KafkaConfig(client_properties={"sasl.mechanism": "PLAIN", "sasl.jaas.config": java.replace(
        SECRET.replace("\\", "\\\\").replace('"', '\\"'), "${env:TEST_KAFKA_PASSWORD}")})
    assert shaded.java_properties()["sasl.jaas.config"] == java
    assert shaded.librdkafka_properties()["sasl.password"] == SECRET


def test_every_confluent_client_builder_passes_security(cfg: JobConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    import confluent_kafka
    import confluent_kafka.admin

    seen: list[dict[str, Any]] = []

    class Fake:
        def __init__(self, conf: dict[str, Any]) -> None:
            seen.append(conf)

        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("stop here")

    monkeypatch.setattr(confluent_kafka, "Producer", Fake)
    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", Fake)
    from deploy.kafka import create_topics
    from flink_job.kafka import topics
    from flink_job.tools import produce

    monkeypatch.setattr(topics, "Consumer", Fake)
    security = cfg.kafka.librdkafka_properties()
    for call in (lambda: produce.send(iter(()), "b:1", "t", extra_config=security),
                 lambda: create_topics("b:1", {"t": {}}, security=security),
                 lambda: topics.end_offsets("b:1", "t", security=security),
                 lambda: topics.read_all("b:1", "t", security=security)):
        with pytest.raises(RuntimeError, match="stop here"):
            call()
    # the produce command takes them from the job config (here: the environment)
    monkeypatch.setenv("STREAMREC__KAFKA__CLIENT_PROPERTIES",
                       '{security.protocol: SASL_PLAINTEXT, sasl.mechanism: PLAIN, '
                       'sasl.username: u, sasl.password: "${env:TEST_KAFKA_PASSWORD}"}')
    with pytest.raises(RuntimeError, match="stop here"):
        produce.main(["--bootstrap", "b:1", "synthetic", "--events", "1"])
    assert len(seen) == 5
    for conf in seen:
        assert conf["sasl.password"] == SECRET and conf["security.protocol"] == "SASL_PLAINTEXT"


def test_secrets_never_show_in_logs_dumps_or_the_job_name(cfg: JobConfig, caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from flink_job.flink import job

    class Env:
        name = ""

        def execute(self, name: str) -> None:
            Env.name = name

    monkeypatch.setattr(job, "create_env", lambda c: Env())
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))  # what the runner hands its child process
    with caplog.at_level(logging.DEBUG):
        job.main(["--config", str(config)])
        logging.getLogger("t").info("config %s / %r / %s", cfg, cfg.kafka, cfg.to_dict())
    assert "job config" in caplog.text and "${env:TEST_KAFKA_PASSWORD}" in caplog.text
    for text in (caplog.text, config.read_text(), str(cfg), repr(cfg), Env.name, str(cfg.to_dict())):
        assert SECRET not in text and "7f3a" not in text


def test_the_pipeline_configuration_holds_no_secret(cfg: JobConfig, tmp_path: Path) -> None:
    from flink_job.flink.topology import flink_configuration

    conf = flink_configuration(cfg, [tmp_path / "connector.jar"])
    assert "7f3a" not in str(conf.to_dict())
    assert conf.get_string("pipeline.name", "") == cfg.flink.job_name


def test_file_references_and_escapes(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET + "\n")
    k = KafkaConfig(client_properties={"sasl.mechanism": "PLAIN", "sasl.username": "$${env:literal}",
                                       "sasl.password": f"${{file:{secret_file}}}"})
    rd = k.librdkafka_properties()
    assert rd["sasl.password"] == SECRET and rd["sasl.username"] == "${env:literal}"


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({"sasl.password": "${env:STREAMREC_TEST_UNSET_VAR}"}, "environment variable STREAMREC_TEST_UNSET_VAR is not set"),
        ({"sasl.password": "${file:/nonexistent/pw}"}, "cannot read secret file /nonexistent/pw"),
        ({"sasl.password": "hunter2"}, "holds a secret: give it as ${env:NAME}"),
        ({"ssl.keystore.password": "x${env:HOME}"}, "holds a secret"),
        ({"sasl.jaas.config": 'x.PlainLoginModule required username="u" password="hunter2";'}, "holds a secret"),
        ({"bootstrap.servers": "a:1"}, "set by the job itself"),
        ({"properties.security.protocol": "SSL"}, "without the 'properties.' prefix"),
        ({"security.protocol": None}, "must be a string"),
    ],
)
def test_bad_client_properties_fail_at_load_with_a_clear_error(props: dict[str, Any], message: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMREC_TEST_UNSET_VAR", raising=False)
    with pytest.raises(ValueError) as err:
        KafkaConfig(client_properties=props)
    assert message in str(err.value) and "hunter2" not in str(err.value)


def test_an_untranslatable_login_module_is_named_without_its_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KAFKA_PASSWORD", SECRET)
    k = KafkaConfig(client_properties={
        "sasl.jaas.config": 'com.example.Custom required password="${env:TEST_KAFKA_PASSWORD}";'})
    with pytest.raises(ValueError, match="com.example.Custom has no librdkafka translation") as err:
        k.librdkafka_properties()
    assert "7f3a" not in str(err.value)
