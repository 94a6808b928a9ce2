"""Local set-up: Maven-fetched jars, a single-node KRaft Kafka broker, a standalone Flink session cluster."""
