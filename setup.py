"""streamrec: real-time incremental learning of recommender embeddings on Apache Flink and PyTorch.

Versions that matter are pinned here and only here (the JVM side is pinned in deploy/pom.xml).
"""
from setuptools import find_packages, setup

FLINK = "apache-flink==2.2.1"  # the Kafka connector in deploy/pom.xml (5.0.0-2.2) targets Flink 2.2
TORCH = "torch==2.13.0"

setup(
    name="streamrec",
    version="0.1.0",
    description="Streaming recommender embeddings: PyFlink job, online PyTorch trainer, Kafka in and out",
    python_requires=">=3.11,<3.12",
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
    extras_require={
        "dev": [
            "pytest==9.2.0",
            "hypothesis==6.170.17",
            "pytest-timeout==2.4.0",
            "ruff==0.14.0",
            "mypy==1.18.2",
        ],
    },
)
