"""The run report from the stats topic of a real broker."""
from __future__ import annotations
import json
import re
import uuid
from pathlib import Path
from typing import Any
import pytest
from flink_job.tools.report import main
from tests.unit.tools.test_report import assert_png, stats_records, write_jsonl


@pytest.mark.integration
def test_report_from_the_stats_topic_of_a_real_broker(kafka: Any, tmp_path: Path) -> None:
    from confluent_kafka import Producer

    from deploy.kafka import create_topics

    topic = f"report-{uuid.uuid4().hex[:8]}.stats"
    create_topics(kafka.bootstrap, {topic: {}}, 1)
    records = stats_records(120)
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 5})
    for rec in records:
        producer.produce(topic, json.dumps(rec).encode())
    assert producer.flush(30) == 0

    saved = tmp_path / "saved.jsonl"
    args = ["--bootstrap", kafka.bootstrap, "--stats-topic", topic, "--out", str(tmp_path / "kafka"),
            "--save-stats", str(saved)]
    assert main(args) == 0
    assert [json.loads(x) for x in saved.read_text().splitlines()] == records
    assert main(["--stats-file", str(write_jsonl(records, tmp_path / "f.jsonl")), "--out", str(tmp_path / "file")]) == 0
    from_kafka, from_file = ((tmp_path / d / "summary.md").read_text() for d in ("kafka", "file"))
    assert f"`{topic}@{kafka.bootstrap}`" in from_kafka
    assert re.sub(r"`[^`]*`", "", from_kafka) == re.sub(r"`[^`]*`", "", from_file)
    assert_png(tmp_path / "kafka" / "prequential.png", 1000)


@pytest.mark.integration
def test_an_empty_stats_topic_is_a_clear_error(kafka: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deploy.kafka import create_topics

    topic = f"report-{uuid.uuid4().hex[:8]}.stats"
    create_topics(kafka.bootstrap, {topic: {}}, 1)
    assert main(["--bootstrap", kafka.bootstrap, "--stats-topic", topic, "--out", str(tmp_path)]) == 2
    assert f"no stats records in {topic}@{kafka.bootstrap}" in capsys.readouterr().err

