"""The wiring: Flink settings the job passes, and the operators of its plan (needs a JVM, no cluster)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flink_job.config import JobConfig
from flink_job.flink.topology import LOCAL_ROCKSDB_MANAGED_MEMORY, flink_configuration


def test_raw_flink_options_are_applied_last() -> None:
    cfg = JobConfig.load(overrides=[
        "flink.bundle_time_ms=100",
        "flink.options={python.fn-execution.bundle.time: '250', taskmanager.memory.network.max: 256mb}",
    ])
    conf = flink_configuration(cfg, [Path("connector.jar")])
    assert conf.get_string("python.fn-execution.bundle.time", "") == "250"  # the raw option wins
    assert conf.get_string("taskmanager.memory.network.max", "") == "256mb"


@pytest.mark.parametrize(("key", "rocksdb", "other"), [
    ("execution.checkpointing.incremental", "true", "false"),
    ("taskmanager.memory.managed.size", LOCAL_ROCKSDB_MANAGED_MEMORY, "256 mb"),  # a local run's, as here
    ("state.backend.rocksdb.use-bloom-filter", "true", "false"),
])
def test_rocksdb_settings_unless_told_otherwise(key: str, rocksdb: str, other: str) -> None:
    def setting(*overrides: str) -> str:
        conf = flink_configuration(JobConfig.load(overrides=list(overrides)), [Path("connector.jar")])
        return conf.get_string(key, "unset")

    assert setting() == "unset"  # the heap backend writes whole snapshots and keeps its state on the heap
    assert setting("flink.state_backend=rocksdb") == rocksdb
    assert setting("flink.state_backend=rocksdb", f"flink.options={{{key}: '{other}'}}") == other


def test_a_submitted_job_leaves_the_clusters_managed_memory_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYFLINK_GATEWAY_PORT", "1")  # what Flink's client sets: the TaskManagers are sized already
    conf = flink_configuration(JobConfig.load(overrides=["flink.state_backend=rocksdb"]), [Path("connector.jar")])
    assert conf.get_string("taskmanager.memory.managed.size", "unset") == "unset"
    assert conf.get_string("execution.checkpointing.incremental", "unset") == "true"
    assert conf.get_string("state.backend.rocksdb.use-bloom-filter", "unset") == "true"


def test_the_plan_has_one_python_operator_and_no_side_output_maps(job_jars: dict[str, str]) -> None:
    """PyFlink reads every side output through a Python identity map with bundles of its own; the trainer's outputs
    leave in one row that the JVM unnests, so the trainer is the plan's only Python operator."""
    from flink_job.flink.job import create_env

    plan = json.loads(create_env(JobConfig.load()).get_execution_plan())
    names = [n["type"] for n in plan["nodes"]]
    assert names.count("train") == 1
    assert "Map" not in names, names
    assert sum("_sink" in n and "Writer" in n for n in names) == 3


def test_user_sharded_trainers_run_at_the_parallelism_and_the_sql_part_at_one(job_jars: dict[str, str]) -> None:
    """At P = 2: two trainers with the item-delta topic as their second input and sink, everything before them one
    subtask (in parallel the SQL part reordered a user's events), and the deltas fanned out by projections, not
    a join (a join against a bounded VALUES input kept every record in state and blocked checkpoints)."""
    from flink_job.flink.job import create_env
    from flink_job.flink.topology import route_keys

    plan = json.loads(create_env(JobConfig.load(overrides=["flink.parallelism=2"])).get_execution_plan())
    nodes = {n["type"]: n for n in plan["nodes"]}
    assert nodes["train"]["parallelism"] == 2
    before = [n for n in plan["nodes"] if n["id"] < nodes["train"]["id"]]
    assert before and all(n["parallelism"] == 1 for n in before)
    assert any("item_deltas" in n["type"] for n in before)
    assert sum("_sink" in n and "Writer" in n for n in nodes) == 4
    assert not any("Join" in n or "Values" in n for n in nodes), sorted(nodes)
    # The same operators at 4 trainers: a rescale is refused by the trainers' max parallelism, not by operators
    # that the other plan lacks (the SQL operators' generated uids follow their place in the plan).
    four = json.loads(create_env(JobConfig.load(overrides=["flink.parallelism=4"])).get_execution_plan())
    shape = [re.sub(r"\d+", "", n["type"]).split("(")[0] for n in plan["nodes"]]  # numbers: the planner's counter
    assert [re.sub(r"\d+", "", n["type"]).split("(")[0] for n in four["nodes"]] == shape
    # A route key per trainer, each reaching its own subtask when the max parallelism is the number of trainers.
    from pyflink.java_gateway import get_gateway

    jvm = get_gateway().jvm
    for trainers in (2, 3, 4):
        keys = route_keys(trainers)
        assert len(set(keys)) == trainers
        subtasks = []
        for k in keys:
            row = jvm.org.apache.flink.types.Row(2)
            row.setField(0, k)
            key = jvm.KeyByKeySelector().getKey(row)
            subtasks.append(jvm.org.apache.flink.runtime.state.KeyGroupRangeAssignment.assignKeyToParallelOperator(
                key, trainers, trainers))
        assert subtasks == list(range(trainers))


def test_more_trainers_than_user_shards_is_refused() -> None:
    with pytest.raises(ValueError, match="at most batch.shards"):
        JobConfig.load(overrides=["flink.parallelism=4", "batch.shards=2"])
    with pytest.raises(ValueError, match="at most batch.shards"):
        JobConfig.load(overrides=["flink.parallelism=2", "flink.trainers=16"])
    with pytest.raises(ValueError, match="must be at least flink.parallelism"):
        JobConfig.load(overrides=["flink.parallelism=4", "flink.trainers=2"])


def test_trainers_keep_their_plan_and_key_groups_at_every_parallelism(job_jars: dict[str, str]) -> None:
    """Four trainers (``flink.trainers=4``) at P = 1, 2 and 4: the same operators, the trainer operator at P with max
    parallelism 4, and trainer i's route key in key group i, so on subtask i * P // 4: a savepoint of one plan
    restores into the others with each trainer's state whole."""
    from pyflink.java_gateway import get_gateway

    from flink_job.flink.job import create_env
    from flink_job.flink.topology import route_keys

    shapes = []
    for p in (1, 2, 4):
        env = create_env(JobConfig.load(overrides=[f"flink.parallelism={p}", "flink.trainers=4"]))
        plan = json.loads(env.get_execution_plan())
        train = [n for n in plan["nodes"] if n["type"] == "train"]
        assert [n["parallelism"] for n in train] == [p]
        shapes.append([re.sub(r"\d+", "", n["type"]).split("(")[0] for n in plan["nodes"]])
        trainers = [t for t in env._j_stream_execution_environment.getTransformations() if t.getName() == "train"]
        assert [t.getMaxParallelism() for t in trainers] == [4]
    assert shapes[0] == shapes[1] == shapes[2]
    jvm = get_gateway().jvm
    assignment = jvm.org.apache.flink.runtime.state.KeyGroupRangeAssignment
    for i, k in enumerate(route_keys(4)):
        row = jvm.org.apache.flink.types.Row(2)
        row.setField(0, k)
        key = jvm.KeyByKeySelector().getKey(row)
        assert assignment.assignToKeyGroup(key, 4) == i
        assert [assignment.assignKeyToParallelOperator(key, 4, p) for p in (1, 2, 4)] == [0, i * 2 // 4, i]


def test_a_process_that_ran_a_local_job_still_starts_local_runs(monkeypatch) -> None:
    """PyFlink's loopback worker leaves the TaskManager's environment, FLINK_CONF_DIR among it, in a process that
    ran a local job in process mode (tests/test_restore.py in a full run). A job process started from it, or a
    thread-mode job built in it, is still a local run: it gets the embedded interpreter's path and its own
    checkpoint directory. Only Flink's client, which passes its gateway's port, makes a cluster submission."""
    from flink_job.flink import runner
    from flink_job.flink.topology import checkpoint_uri

    monkeypatch.setattr(runner, "_INITIAL_VARIABLES", frozenset({"HOME"}))
    for key, value in {"FLINK_CONF_DIR": "/venv/pyflink/conf", "PYTHONPATH": "/elsewhere", "HOME": "/root",
                       "PYTHON_LOOPBACK_SERVER_ADDRESS": "localhost:1"}.items():
        monkeypatch.setenv(key, value)
    env = runner._client_environment()
    assert "FLINK_CONF_DIR" not in env and "PYTHONPATH" not in env and "PYTHON_LOOPBACK_SERVER_ADDRESS" not in env
    assert env["HOME"] == "/root"

    cfg = JobConfig.load(overrides=["flink.python_execution_mode=thread"])
    conf = flink_configuration(cfg, [Path("connector.jar")])
    assert conf.get_string("python.pythonpath", "") and checkpoint_uri(cfg)
    monkeypatch.setenv("PYFLINK_GATEWAY_PORT", "40000")
    conf = flink_configuration(cfg, [Path("connector.jar")])
    assert conf.get_string("python.pythonpath", "") == "" and checkpoint_uri(cfg) is None


def test_a_job_without_jars_fails_naming_the_setting_and_the_command(monkeypatch, tmp_path) -> None:
    """flink_job never imports deploy: its jars come from the configuration or the environment, and when neither
    names one the job says which setting is missing and which command resolves it."""
    import pytest

    from flink_job.flink.job import CONNECTOR_JAR_ENV, UDF_JAR_ENV, job_jars

    monkeypatch.delenv(CONNECTOR_JAR_ENV, raising=False)
    monkeypatch.delenv(UDF_JAR_ENV, raising=False)
    with pytest.raises(ValueError, match=r"flink\.connector_jar.*STREAMREC_CONNECTOR_JAR.*python -m deploy\.jars"):
        job_jars(JobConfig.load())
    monkeypatch.setenv(CONNECTOR_JAR_ENV, str(tmp_path / "missing.jar"))
    with pytest.raises(FileNotFoundError, match="STREAMREC_CONNECTOR_JAR names"):
        job_jars(JobConfig.load())
    (tmp_path / "c.jar").write_bytes(b"")
    monkeypatch.setenv(CONNECTOR_JAR_ENV, str(tmp_path / "c.jar"))
    cfg = JobConfig.load(overrides=["flink.udf_jar=/opt/udf.jar"])
    assert job_jars(cfg) == [tmp_path / "c.jar", Path("/opt/udf.jar")]  # the configuration wins over the environment
