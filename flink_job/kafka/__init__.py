"""Kafka clients outside Flink: reading topics and producing records."""
