"""Serving against the real broker: the index read from a hand-made changelog, the HTTP service, and the issue's
acceptance test: new events for a user change what the service answers while the real job runs."""
from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import orjson
import pytest

from flink_job.config import JobConfig
from flink_job.kafka.produce import Record
from flink_job.kafka.produce import send
from flink_job.serving import recommend
from flink_job.serving.recommend import RecommendServer
from flink_job.flink.runner import LocalJob
from flink_job.serving.config import ServingConfig
from flink_job.serving.index import EmbeddingIndex
from flink_job.serving.records import example_record
from flink_job.kafka.topics import end_offsets

from tests.embeddings import DIM, Changelog, hostile_embeddings

pytestmark = pytest.mark.integration



def _produce(bootstrap: str, topic: str, records: list[tuple[str, bytes | None]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for key, value in records:
        producer.produce(topic, value, key.encode())
    assert producer.flush(30) == 0


def _caught_up(bootstrap: str, topic: str) -> Callable[[EmbeddingIndex], bool]:
    """Predicate: the index has applied everything the topic holds now."""
    ends = end_offsets(bootstrap, topic)
    return lambda ix: all(ix.positions().get(p, 0) >= end for p, end in ends.items())




@contextmanager
def following(cfg: JobConfig, config: ServingConfig | None = None) -> Iterator[EmbeddingIndex]:
    with EmbeddingIndex(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic, config=config) as index:
        yield index


def test_index_keeps_the_newest_version_drops_tombstones_and_follows(topics) -> None:
    cfg = topics("serve-index", input_partitions=1)
    log = Changelog()
    _produce(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic, log.records)

    with following(cfg) as index:
        index.wait_until(lambda ix: ix.ready, timeout=30)
        assert index.item_ids() == sorted(log.items)
        assert "i7" not in index.item_ids()
        for ident, (version, bias, vec, _events) in log.items.items():
            got = index.item(ident)
            assert got is not None and got[0] == version
            assert got[1] == pytest.approx(bias) and np.allclose(got[2], vec)
        assert index.user_ids() == ["u1", "u2"] and index.user_version("u1") == 2
        assert index.counts["stale"] == 3 and index.counts["malformed"] == 1 and index.counts["tombstones"] == 1

        rec = index.recommend("u1", 5)
        assert not rec.fallback and rec.user_version == 2 and rec.item_step == 3
        assert rec.seen_published and rec.excluded_seen == 3
        assert [s.id for s in rec.items] == [i for i, _ in log.expected_top("u1", 5)]
        assert [s.score for s in rec.items] == pytest.approx([s for _, s in log.expected_top("u1", 5)], rel=1e-5)
        assert [s.version for s in rec.items] == [log.items[s.id][0] for s in rec.items]
        assert [s.id for s in index.recommend("u2", 7).items] == [i for i, _ in log.expected_top("u2", 7)]
        assert not index.recommend("u2").seen_published

        pop = index.recommend("nobody", 4)
        by_events = sorted(log.items, key=lambda i: (-log.items[i][3], i))[:4]
        assert pop.fallback and pop.user_version is None and [s.id for s in pop.items] == by_events
        assert [s.score for s in pop.items] == [log.items[i][3] for i in by_events]

        sim = index.similar("i3", 6)
        assert sim.item_version == 3 and "i3" not in [s.id for s in sim.items]
        assert [s.id for s in sim.items] == [i for i, _ in log.expected_similar("i3", 6)]
        assert [s.score for s in sim.items] == pytest.approx([s for _, s in log.expected_similar("i3", 6)], rel=1e-5)
        with pytest.raises(KeyError):
            index.similar("i7")

        # The topic moves on: a newer user vector, an item removed, a new item in the freed row, a replay of i7.
        log.records = []
        log.user("u1", 3, np.random.default_rng(5))
        log.tombstone("item", "i3")
        log.item("i_new", 1, np.random.default_rng(6), events=10_000)
        log.stale("item:i7", example_record("item", "i7", 1, [9.0] * DIM))  # removed at version 1: not resurrected
        _produce(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic, log.records)
        index.wait_until(_caught_up(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic), timeout=30)
        assert index.user_version("u1") == 3
        assert index.item_ids() == sorted(log.items) and "i7" not in index.item_ids()
        assert [s.id for s in index.recommend("u1", 5).items] == [i for i, _ in log.expected_top("u1", 5)]
        assert index.recommend("nobody", 1).items[0].id == "i_new"


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as ex:
        return ex.code, orjson.loads(ex.read())


@contextmanager
def serving(index: EmbeddingIndex) -> Iterator[str]:
    server = RecommendServer(index, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_http_service_answers_recommend_similar_and_health(topics) -> None:
    cfg = topics("serve-http", input_partitions=1)
    log = Changelog()
    _produce(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic, log.records)

    with following(cfg) as index, serving(index) as url:
        index.wait_until(lambda ix: ix.ready, timeout=30)
        status, health = _get(f"{url}/healthz")
        assert status == 200 and health["ready"] and health["items"] == len(log.items) and health["users"] == 2

        status, body = _get(f"{url}/recommend?user=u1&n=3")
        assert status == 200 and not body["fallback"] and body["user_version"] == 2
        assert [s["id"] for s in body["items"]] == [i for i, _ in log.expected_top("u1", 3)]
        assert all(s["version"] == log.items[s["id"]][0] for s in body["items"])
        status, body = _get(f"{url}/recommend?user=stranger")
        assert status == 200 and body["fallback"] and len(body["items"]) == 10

        status, body = _get(f"{url}/similar?item=i4&n=2")
        assert status == 200 and body["item_version"] == 1
        assert [s["id"] for s in body["items"]] == [i for i, _ in log.expected_similar("i4", 2)]

        assert _get(f"{url}/similar?item=i7")[0] == 404  # removed by a tombstone
        assert _get(f"{url}/similar?item=nope")[0] == 404
        for bad in ("/recommend", "/recommend?user=u1&n=x", "/recommend?user=u1&n=0", "/similar?n=3",
                    "/similar?item=i4&n=100000"):
            status, body = _get(url + bad)
            assert status == 400 and body["error"], bad
        assert _get(f"{url}/nope")[0] == 404


def test_command_line_answers_from_the_job_config(topics, capsys) -> None:
    cfg = topics("serve-cli", input_partitions=1)
    log = Changelog()
    _produce(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic, log.records)
    where = ["--set", f"kafka.bootstrap={cfg.kafka.bootstrap}", "--set", f"kafka.embeddings_topic={cfg.kafka.embeddings_topic}"]

    assert recommend.main([*where, "user", "u1", "--top", "4", "--json"]) == 0
    body = orjson.loads(capsys.readouterr().out)
    assert body["user_version"] == 2 and [s["id"] for s in body["items"]] == [i for i, _ in log.expected_top("u1", 4)]
    assert recommend.main([*where, "item", "i4", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("similar to item i4 (version 1)") and len(out.splitlines()) == 3
    assert recommend.main(["--bootstrap", cfg.kafka.bootstrap, "--topic", cfg.kafka.embeddings_topic,
                           "item", "i7"]) == 1


def _event(n: int, user: str, item: str, action: str, ts: int) -> Record:
    value = 4.0 if action == "rating" else 1.0
    payload = orjson.dumps({"event_id": f"e{n}", "user_id": user, "item_id": item, "action": action,
                            "value": value, "ts": ts})
    return Record(user.encode(), payload, "event", f"e{n}")


def test_new_events_change_the_served_answer_of_the_running_job(topics) -> None:
    """The issue's acceptance test: serve from the real job's topic, send a user new purchases, and the answer moves
    on to a newer version of the user's vector."""
    cfg = topics("serve-job", overrides=["batch.size=64", "publish.interval_ms=0"])
    base, target = 1_700_000_000_000, "target"
    rng = np.random.default_rng(8)
    actions = ["view", "click", "cart", "purchase", "rating"]
    first = [_event(n, f"u{rng.integers(30)}", f"i{rng.integers(40)}", actions[rng.integers(5)], base + n)
             for n in range(600)]
    first += [_event(1000 + n, target, f"i{n % 5}", "click", base + 600 + n) for n in range(10)]
    send(((r, 0) for r in first), cfg.kafka.bootstrap, cfg.kafka.input_topic)
    bought = ["i30", "i31", "i32"]  # items the target user never touched
    second = [_event(2000 + n, target, bought[n % 3], "purchase", base + 700 + n) for n in range(12)]

    with LocalJob(cfg) as job, following(cfg) as index, serving(index) as url:
        job.wait_idle(idle_s=2.0, timeout_s=120, min_received=len(first))
        index.wait_until(_caught_up(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic), timeout=30)
        status, before = _get(f"{url}/recommend?user={target}&n=10")
        assert status == 200 and not before["fallback"] and before["user_version"] >= 1
        scores_before = index.scores(target, bought)
        assert len(scores_before) == 3

        send(((r, 0) for r in second), cfg.kafka.bootstrap, cfg.kafka.input_topic)
        index.wait_until(lambda ix: (ix.user_version(target) or 0) > before["user_version"], timeout=60)
        job.wait_idle(idle_s=2.0, timeout_s=60, min_received=len(first) + len(second))
        index.wait_until(_caught_up(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic), timeout=30)
        status, after = _get(f"{url}/recommend?user={target}&n=10")
        scores_after = index.scores(target, bought)

    assert status == 200 and not after["fallback"]
    assert after["user_version"] > before["user_version"]
    assert after["item_step"] > before["item_step"]
    assert [(s["id"], s["score"]) for s in after["items"]] != [(s["id"], s["score"]) for s in before["items"]]
    # The purchases pulled the user toward the bought items.
    assert sum(scores_after.values()) > sum(scores_before.values())
    if after["seen_published"]:  # the job publishes the user's recent items: the bought ones are not offered again
        assert not set(bought) & {s["id"] for s in after["items"]}


def test_read_committed_serves_only_committed_transactions(topics) -> None:
    """The job's exactly-once mode writes in Kafka transactions: an open or aborted one is not served, and an open
    one does not keep the index from being ready."""
    from confluent_kafka import Producer

    cfg = topics("serve-txn", input_partitions=1)
    topic = cfg.kafka.embeddings_topic
    producer = Producer({"bootstrap.servers": cfg.kafka.bootstrap, "transactional.id": f"serving-test-{topic}"})
    producer.init_transactions(30)

    def transaction(item: str, commit: bool | None) -> None:
        producer.begin_transaction()
        producer.produce(topic, example_record("item", item, 1, [1.0] * DIM), f"item:{item}".encode())
        producer.flush(30)
        if commit is True:
            producer.commit_transaction(30)
        elif commit is False:
            producer.abort_transaction(30)

    transaction("committed", True)
    transaction("aborted", False)
    transaction("open", None)
    with following(cfg, ServingConfig(max_lag_s=1.0, lag_check_s=0.1)) as index:
        index.wait_until(lambda ix: ix.ready, timeout=30)
        assert index.item_ids() == ["committed"]
        time.sleep(2.0)  # an open transaction is not data the index could have read: it is not behind
        assert index.health() == (True, None) and index.lag_s() < 0.5
        producer.commit_transaction(30)
        index.wait_until(lambda ix: "open" in ix.item_ids(), timeout=30)
        assert index.item_ids() == ["committed", "open"]


def _produce_raw(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    from confluent_kafka import Producer

    failed: list[Any] = []
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "batch.size": 100_000})
    for key, value in records:
        producer.produce(topic, value, key, on_delivery=lambda err, _msg: err and failed.append(err))
    assert producer.flush(30) == 0 and not failed




def _get_text(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as ex:
        return ex.code, ex.read().decode()


def test_malformed_records_are_skipped_and_counted_and_never_stop_the_index(topics) -> None:
    """Every hostile record is skipped and counted, by reason; the valid records around them are all served, and an
    index started again on the same topic (a restart) does the same. Before the fix, a version beyond int64 stopped
    the index for good and every request got 503."""
    cfg = topics("serve-hostile", input_partitions=1)
    log = Changelog()  # also one "{not json" record
    before = [(k.encode(), v) for k, v in log.records]
    hostile = hostile_embeddings()
    log.records = []
    rng = np.random.default_rng(11)
    log.item("after", 2, rng, events=50_000)
    log.user("u2", 5, rng)
    log.user("usér/1", 1, rng)  # percent-encoded UTF-8 in URLs, and a slash
    after = [(k.encode(), v) for k, v in log.records]
    _produce_raw(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic, before + hostile + after)

    for _restart in range(2):
        with following(cfg) as index, serving(index) as url:
            index.wait_until(_caught_up(cfg.kafka.bootstrap, cfg.kafka.embeddings_topic), timeout=60)
            assert index.error is None and index.ready
            assert index.counts["malformed"] == len(hostile) + 1
            assert index.item_ids() == sorted(log.items)
            assert index.user_ids() == sorted(log.users)
            assert index.item("i1") is not None and index.item("i1")[0] == 1  # no hostile record replaced it
            assert index.user_version("u1") == 2 and index.user_version("u2") == 5

            status, health = _get(f"{url}/healthz")
            assert status == 200 and health["healthy"] and health["malformed"] == len(hostile) + 1
            assert sum(health["malformed_reasons"].values()) == health["malformed"]
            assert {"version", "bias", "vector", "json", "key", "id", "seen", "tombstone"} <= set(
                health["malformed_reasons"])
            status, metrics = _get_text(f"{url}/metrics")
            assert status == 200
            assert f'streamrec_serving_records_total{{outcome="malformed"}} {len(hostile) + 1}' in metrics
            assert 'streamrec_serving_malformed_total{reason="vector"}' in metrics

            status, body = _get(f"{url}/recommend?user=u1&n=3")
            assert status == 200 and body["user_version"] == 2
            assert [s["id"] for s in body["items"]] == [i for i, _ in log.expected_top("u1", 3)]
            assert _get(f"{url}/recommend?user=stranger&n=1")[1]["items"][0]["id"] == "after"
            for path in ("/recommend/us%C3%A9r%2F1", "/recommend?user=us%C3%A9r%2F1&n=5"):
                status, body = _get(url + path)
                assert status == 200 and not body["fallback"] and body["user"] == "usér/1", path
                assert body["user_version"] == 1
            status, body = _get(f"{url}/similar/i%34?n=2")
            assert status == 200 and body["item"] == "i4"
            for bad in ("/recommend/%FF%FE", "/recommend?user=%FF"):  # not UTF-8
                status, body = _get(url + bad)
                assert status == 400 and "UTF-8" in body["error"], bad


class _Throttled(EmbeddingIndex):
    """An index that applies every batch slowly while ``slow`` is set, so that it falls behind the topic."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slow = threading.Event()

    def apply(self, records: Any) -> None:
        if self.slow.is_set():
            time.sleep(0.2)
        super().apply(records)


def test_healthz_is_unhealthy_while_the_index_is_behind_the_topic_for_too_long(topics) -> None:
    cfg = topics("serve-lag", input_partitions=1)
    topic = cfg.kafka.embeddings_topic
    _produce(cfg.kafka.bootstrap, topic, [(f"item:i{n}", example_record("item", f"i{n}", 1, [1.0] * DIM))
                                           for n in range(10)])
    index = _Throttled(cfg.kafka.bootstrap, topic, max_batch=5, config=ServingConfig(max_lag_s=1.5, lag_check_s=0.1))
    with index, serving(index) as url:
        index.wait_until(lambda ix: ix.ready, timeout=30)
        assert _get(f"{url}/healthz")[0] == 200
        index.slow.set()  # 200 records at 5 per 0.2 s: about 8 s behind
        _produce(cfg.kafka.bootstrap, topic, [(f"item:j{n}", example_record("item", f"j{n}", 1, [1.0] * DIM))
                                               for n in range(200)])
        deadline = time.monotonic() + 20
        while (answer := _get(f"{url}/healthz"))[0] == 200:
            assert time.monotonic() < deadline, "never reported behind"
            time.sleep(0.1)
        status, health = answer
        assert status == 503 and not health["healthy"] and "behind" in health["reason"] and health["lag_s"] > 1.5
        assert _get(f"{url}/recommend?user=x")[0] == 200  # still answers, from what it has
        index.slow.clear()
        index.wait_until(_caught_up(cfg.kafka.bootstrap, topic), timeout=30)
        status, health = _get(f"{url}/healthz")
        assert status == 200 and health["healthy"] and health["reason"] is None and len(index.item_ids()) == 210
